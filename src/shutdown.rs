//! Asking a running job to stop, and waiting until it is asked.
//!
//! mini-redis's `Shutdown` in spirit, for the blocking threads riskd's jobs
//! run on: one value, cloned into every thread that must stop, that the
//! service triggers once. A thread checks it between units of work
//! ([`Shutdown::is_triggered`]) and sleeps on it ([`Shutdown::sleep`]),
//! waking at once when it is triggered: a condition variable, not a flag
//! polled in a loop.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A stop request shared by a job's threads.
#[derive(Clone, Default)]
pub struct Shutdown {
    inner: Arc<(Mutex<bool>, Condvar)>,
}

impl Shutdown {
    /// Not triggered.
    pub fn new() -> Self {
        Self::default()
    }

    // std Mutex: held for a flag read or write, never across a wait other
    // than the condition variable's own.
    fn flag(&self) -> MutexGuard<'_, bool> {
        self.inner.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Asks every holder to stop; wakes the sleepers.
    pub fn trigger(&self) {
        *self.flag() = true;
        self.inner.1.notify_all();
    }

    /// Whether a stop was asked for.
    pub fn is_triggered(&self) -> bool {
        *self.flag()
    }

    /// Sleeps `d`, or less if a stop is asked for meanwhile; true when the
    /// whole time passed without one.
    pub fn sleep(&self, d: Duration) -> bool {
        let until = Instant::now() + d;
        let mut stopped = self.flag();
        while !*stopped {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            stopped = match self.inner.1.wait_timeout(stopped, left) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trigger_wakes_a_sleeper_at_once() {
        let shutdown = Shutdown::new();
        assert!(shutdown.sleep(Duration::from_millis(5)), "not triggered: the whole time passes");
        let sleeper = shutdown.clone();
        let start = Instant::now();
        let handle = std::thread::spawn(move || sleeper.sleep(Duration::from_secs(60)));
        std::thread::sleep(Duration::from_millis(20));
        shutdown.trigger();
        assert!(!handle.join().unwrap(), "woken by the trigger");
        assert!(start.elapsed() < Duration::from_secs(30));
        assert!(shutdown.is_triggered());
        assert!(!shutdown.sleep(Duration::from_secs(60)), "once triggered, no sleep");
    }
}
