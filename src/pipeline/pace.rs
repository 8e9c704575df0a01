//! When the job flushes: after `store.flush_interval` or
//! `store.flush_every_events`, whichever comes first — both stretched, with
//! `store.max_write_units_per_second`, so that flushes write about that many
//! DynamoDB write units a second at most. A flush that wrote `u` units sets
//! the next one `u / budget` seconds later at the earliest (never sooner
//! than the settings say, never later than [`MAX_GAP`]); a key changed many
//! times in between is written once, so a longer gap writes fewer units per
//! event. The budget is a target, not a limit: a flush the cache's memory
//! bounds or the outputs call for is not held back, and a slow start can
//! overshoot it for one flush.

use std::time::{Duration, Instant};

/// The longest a budget stretches the time between flushes: what a crash
/// replays at most, and how long the API's view of the state may lag.
pub(super) const MAX_GAP: Duration = Duration::from_secs(900);

/// The flush schedule (see the module documentation).
pub(super) struct Pace {
    interval: Duration,
    every_events: u64,
    /// Write units a second the flushes aim to stay under.
    budget: Option<f64>,
    /// How much longer than the settings the current gap is (≥ 1).
    stretch: f64,
    /// When the last flush ended (or scoring started).
    last: Instant,
    /// Write units counted when the last flush ended.
    units_at_last: f64,
}

impl Pace {
    /// A schedule of the settings, counting from `now`; `units_total` is the
    /// write units counted so far.
    pub(super) fn new(
        interval: Duration,
        every_events: u64,
        budget: Option<f64>,
        now: Instant,
        units_total: f64,
    ) -> Self {
        let pace = Self { interval, every_events, budget, stretch: 1.0, last: now, units_at_last: units_total };
        crate::telemetry::metrics().flush_gap.set(pace.gap().as_secs_f64());
        pace
    }

    /// Counts the next gap from `now` (scoring starts).
    pub(super) fn restart(&mut self, now: Instant) {
        self.last = now;
    }

    /// The time between flushes aimed at now.
    fn gap(&self) -> Duration {
        self.interval.mul_f64(self.stretch)
    }

    /// Whether a flush is due at `now` with `events` applied since the last.
    pub(super) fn due(&self, now: Instant, events: u64) -> bool {
        self.due_by_events(events) || (events > 0 && now.saturating_duration_since(self.last) >= self.gap())
    }

    /// Whether `events` applied since the last flush make one due, whatever the time.
    pub(super) fn due_by_events(&self, events: u64) -> bool {
        events > 0 && events as f64 >= self.every_events as f64 * self.stretch
    }

    /// A flush ended at `now`, with `units_total` write units counted so far.
    pub(super) fn flushed(&mut self, now: Instant, units_total: f64) {
        let units = (units_total - self.units_at_last).max(0.0);
        self.units_at_last = units_total;
        self.last = now;
        if let Some(budget) = self.budget {
            let most = (MAX_GAP.as_secs_f64() / self.interval.as_secs_f64()).max(1.0);
            self.stretch = (units / budget / self.interval.as_secs_f64()).clamp(1.0, most);
            crate::telemetry::metrics().flush_gap.set(self.gap().as_secs_f64());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_budget_the_settings_decide() {
        let t0 = Instant::now();
        let mut pace = Pace::new(Duration::from_secs(2), 1000, None, t0, 0.0);
        assert!(!pace.due(t0 + Duration::from_secs(1), 999));
        assert!(!pace.due(t0 + Duration::from_secs(5), 0), "nothing to flush");
        assert!(pace.due(t0 + Duration::from_secs(1), 1000));
        assert!(pace.due(t0 + Duration::from_secs(2), 1));
        pace.flushed(t0 + Duration::from_secs(2), 1e9);
        assert!(pace.due(t0 + Duration::from_secs(4), 1));
    }

    #[test]
    fn a_budget_stretches_flushes_to_the_units_they_wrote() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut pace = Pace::new(s(2), 1000, Some(100.0), t0, 0.0);
        // 1,000 units at 100 a second: the next flush 10 s later, or after 5,000 events.
        pace.flushed(t0 + s(2), 1000.0);
        assert!(!pace.due(t0 + s(11), 4999));
        assert!(pace.due(t0 + s(12), 1));
        assert!(pace.due(t0 + s(3), 5000));
        // A flush within the budget goes back to the settings.
        pace.flushed(t0 + s(12), 1100.0);
        assert!(pace.due(t0 + s(14), 1));
        // However much was written, at most MAX_GAP.
        pace.flushed(t0 + s(14), 1e12);
        assert!(!pace.due(t0 + s(14) + MAX_GAP - s(1), 1));
        assert!(pace.due(t0 + s(14) + MAX_GAP, 1));
        // Scoring starting again counts the gap from then.
        pace.restart(t0 + s(100));
        assert!(!pace.due(t0 + s(100) + MAX_GAP - s(1), 1));
    }
}
