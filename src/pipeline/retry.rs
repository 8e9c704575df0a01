//! Waiting out a transient failure (the store, an output file or topic,
//! the input): retried with backoff, reporting not-ready, never skipping
//! an event.

use super::RunError;
use crate::shutdown::Shutdown;
use crate::telemetry::{metrics, Health};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Waits between retries of a failing store: doubling from 100 ms to 10 s,
/// with jitter (so that instances failing together do not retry together).
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(10);

fn backoff() -> backon::ExponentialBackoff {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(RETRY_FIRST)
        .with_max_delay(RETRY_MAX)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// How store failures are retried: with backoff, reporting not-ready,
/// until shutdown (or, when set, until the deadline).
#[derive(Clone)]
pub(super) struct RetryPolicy {
    pub(super) shutdown: Shutdown,
    /// While set, retries go on until then even once shutdown is asked for
    /// (a drain), and give up after it even if not.
    pub(super) deadline: Option<Instant>,
    pub(super) health: Arc<Health>,
}

impl RetryPolicy {
    /// Runs `f` until it succeeds, backing off while the store fails for a
    /// reason a retry can mend. Gives up on shutdown, past the deadline, or
    /// on any other error.
    pub(super) fn run<T>(&self, what: &str, mut f: impl FnMut() -> Result<T, RunError>) -> Result<T, RunError> {
        // Made at the first failure: the hot path (every event) pays nothing.
        let mut delays = None;
        // Every component that failed meanwhile (a flush may find its
        // outputs failing, then its store): each is reported fine again.
        let mut failing: Vec<&'static str> = Vec::new();
        loop {
            let e = match f() {
                Ok(v) => {
                    for component in failing {
                        tracing::info!(what, component, "reachable again");
                        self.report(component, None);
                    }
                    return Ok(v);
                }
                Err(e) => e,
            };
            let (component, kind) = e.fault();
            let faults = &metrics().faults;
            if !e.is_transient() {
                faults.with_label_values(&[component, &kind, "fatal"]).inc();
                return Err(e);
            }
            faults.with_label_values(&[component, &kind, "retried"]).inc();
            let wait = delays.get_or_insert_with(backoff).next().unwrap_or(RETRY_MAX).min(RETRY_MAX);
            tracing::warn!(what, component, kind, error = %e, retry_in_ms = wait.as_millis() as u64, "failed; retrying");
            self.report(component, Some(e.to_string()));
            if !failing.contains(&component) {
                failing.push(component);
            }
            match self.deadline {
                None if !self.shutdown.sleep(wait) => {
                    return Err(RunError::Stopped { what: what.to_string(), cause: Box::new(e) })
                }
                None => {}
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(e);
                    }
                    std::thread::sleep(wait.min(left));
                }
            }
        }
    }

    /// Readiness: the store, the output files, the input, or the alerts topic.
    fn report(&self, component: &str, problem: Option<String>) {
        match component {
            "store" => self.health.set_store(problem),
            "output" => self.health.set_output(problem),
            "input" => self.health.set_source(problem),
            _ => self.health.set_sink(problem),
        }
    }
}
