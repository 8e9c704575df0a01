//! When the job flushes: after `store.flush_interval` or
//! `store.flush_every_events`, whichever comes first — held back, with
//! `store.max_write_units_per_second`, so that flushes write about that many
//! DynamoDB write units a second at most: a flush that wrote `u` units holds
//! the next one until `u / budget` seconds after it (at most [`MAX_GAP`]).
//! A key changed many times meanwhile is written once, so a longer gap
//! writes fewer units per event. The budget is a target, not a limit: a
//! flush the cache's memory bounds or the outputs call for is not held
//! back, and the first flush is not held at all.

use std::time::{Duration, Instant};

/// The longest a budget holds a flush back: what a crash replays at most,
/// and how long the API's view of the state may lag.
pub(super) const MAX_GAP: Duration = Duration::from_secs(900);

/// The flush schedule (see the module documentation).
pub(super) struct Pace {
    interval: Duration,
    every_events: u64,
    /// Write units a second the flushes aim to stay under.
    budget: Option<f64>,
    /// When the last flush ended (or scoring started).
    last: Instant,
    /// No flush before this (the budget's hold).
    hold: Option<Instant>,
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
        crate::telemetry::metrics().flush_gap.set(interval.as_secs_f64());
        Self { interval, every_events, budget, last: now, hold: None, units_at_last: units_total }
    }

    /// Counts the next interval from `now` (scoring starts).
    pub(super) fn restart(&mut self, now: Instant) {
        self.last = now;
    }

    /// Whether a flush is due at `now` with `events` applied since the
    /// last (the caller knows whether there is anything to flush).
    pub(super) fn due(&self, now: Instant, events: u64) -> bool {
        if self.hold.is_some_and(|until| now < until) {
            return false;
        }
        events >= self.every_events || now.saturating_duration_since(self.last) >= self.interval
    }

    /// Whether `events` make a flush due, for a caller that reads the clock
    /// only now and then: never while the budget may be holding flushes
    /// back (the clock decides then, through [`Pace::due`]).
    pub(super) fn due_by_events(&self, events: u64) -> bool {
        self.hold.is_none() && events >= self.every_events
    }

    /// A flush ended just now.
    pub(super) fn flushed_now(&mut self) {
        self.flushed(Instant::now(), crate::state::dynamodb::write_units_total());
    }

    /// A flush ended at `now`, with `units_total` write units counted so far.
    pub(super) fn flushed(&mut self, now: Instant, units_total: f64) {
        let units = (units_total - self.units_at_last).max(0.0);
        self.units_at_last = units_total;
        self.last = now;
        if let Some(budget) = self.budget {
            let wait = Duration::from_secs_f64((units / budget).min(MAX_GAP.as_secs_f64()));
            self.hold = Some(now + wait);
            crate::telemetry::metrics().flush_gap.set(wait.max(self.interval).as_secs_f64());
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
        assert!(pace.due(t0 + Duration::from_secs(1), 1000) && pace.due_by_events(1000));
        assert!(pace.due(t0 + Duration::from_secs(2), 0), "the time is up (whether to flush is the caller's)");
        pace.flushed(t0 + Duration::from_secs(2), 1e9);
        assert!(!pace.due(t0 + Duration::from_secs(3), 1));
        assert!(pace.due(t0 + Duration::from_secs(4), 1) && pace.due_by_events(1000));
    }

    #[test]
    fn a_budget_holds_flushes_back_by_the_units_they_wrote() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut pace = Pace::new(s(2), 1000, Some(100.0), t0, 0.0);
        assert!(pace.due_by_events(1000), "nothing written yet: nothing held");
        // 1,000 units at 100 a second: nothing before 10 s, whatever the events.
        pace.flushed(t0 + s(2), 1000.0);
        assert!(!pace.due_by_events(1_000_000), "while held, the clock decides");
        assert!(!pace.due(t0 + s(11), 1_000_000));
        assert!(pace.due(t0 + s(12), 1000));
        assert!(pace.due(t0 + s(12), 1), "the interval is long past");
        // A flush within the budget holds for less than the interval.
        pace.flushed(t0 + s(12), 1100.0);
        assert!(!pace.due(t0 + s(13), 1) && pace.due(t0 + s(13), 1000));
        // However much was written, at most MAX_GAP.
        pace.flushed(t0 + s(14), 1e12);
        assert!(!pace.due(t0 + s(14) + MAX_GAP - s(1), 1000));
        assert!(pace.due(t0 + s(14) + MAX_GAP, 1000));
    }
}
