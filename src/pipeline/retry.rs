//! Waiting out a failing store: retried with backoff, reporting not-ready,
//! never skipping an event.

use super::RunError;
use crate::shutdown::Shutdown;
use crate::telemetry::Health;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Waits between retries of a failing store: doubling from 100 ms to 10 s.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(10);

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
        let mut wait = RETRY_FIRST;
        let mut failing = false;
        loop {
            match f() {
                Ok(v) => {
                    if failing {
                        tracing::info!(what, "store reachable again");
                        self.health.set_store(None);
                    }
                    return Ok(v);
                }
                Err(RunError::State(e)) if e.is_transient() => {
                    tracing::warn!(what, error = %e, retry_in_ms = wait.as_millis() as u64, "store failed; retrying");
                    self.health.set_store(Some(e.to_string()));
                    failing = true;
                    match self.deadline {
                        None if !self.shutdown.sleep(wait) => return Err(RunError::State(e)),
                        None => {}
                        Some(d) => {
                            let left = d.saturating_duration_since(Instant::now());
                            if left.is_zero() {
                                return Err(RunError::State(e));
                            }
                            std::thread::sleep(wait.min(left));
                        }
                    }
                    wait = (wait * 2).min(RETRY_MAX);
                }
                Err(e) => return Err(e),
            }
        }
    }
}
