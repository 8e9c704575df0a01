//! Bounded lateness: events are held and applied in event-time order.
//!
//! An event is held until the *released* time — the largest trusted event
//! time seen, less `event_time.max_delay` — reaches it, or until it has
//! waited `max_delay` of wall clock (a quiet stream is not held back
//! forever: the released time then moves up to it). Ties go in arrival
//! order. An event whose time the released time has already reached is
//! applied at once, and counted late when an event later than it was
//! applied before it (out of order). One behind the released time but
//! before everything applied so far — the released time was moved on by
//! an event far ahead, still held — is applied in order: not late.
//!
//! The released time only grows, and every held event is later than it, so
//! what has been applied is exactly the events read whose time is at or
//! before it: a checkpoint that records where the oldest held event was
//! read, how far the input was read, and the released time lets a restart
//! re-read the held events and skip the rest.

use crate::event::{Event, TimeSource};
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

/// An event held, ordered by (time, arrival).
struct Held<T> {
    time: i64,
    seq: u64,
    since: Instant,
    item: T,
}

impl<T> PartialEq for Held<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.time, self.seq) == (other.time, other.seq)
    }
}
impl<T> Eq for Held<T> {}
impl<T> PartialOrd for Held<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Held<T> {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.time, self.seq).cmp(&(other.time, other.seq))
    }
}

/// What became of an event given to [`Reorder::push`].
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Pushed<T> {
    /// Held until its time is released.
    Held,
    /// Its time is already released: apply it now (`late`: after a later one).
    Now { item: T, late: bool },
}

/// The buffer of one stream of events.
pub(super) struct Reorder<T> {
    max_delay_ms: i64,
    max_wait: Duration,
    held: BinaryHeap<Reverse<Held<T>>>,
    seq: u64,
    /// Largest trusted event time seen.
    max_seen: Option<i64>,
    /// Every event at or before this time has been released.
    released: Option<i64>,
    /// Nothing is released (a restart is still reading again what it held).
    frozen: bool,
    /// The latest time of the events given out so far.
    applied: Option<i64>,
}

impl<T> Reorder<T> {
    /// A buffer absorbing `max_delay` of out-of-orderness; `released` is a
    /// resumed run's released time.
    pub(super) fn new(max_delay: Duration, released: Option<i64>) -> Self {
        Self {
            max_delay_ms: i64::try_from(max_delay.as_millis()).unwrap_or(i64::MAX),
            max_wait: max_delay,
            held: BinaryHeap::new(),
            seq: 0,
            max_seen: None,
            released,
            frozen: false,
            applied: None,
        }
    }

    /// A resumed source's released time: everything at or before it was
    /// applied (the released time only grows).
    pub(super) fn resume_at(&mut self, released: Option<i64>) {
        if let Some(r) = released {
            self.release_to(r);
        }
    }

    /// While frozen, the released time stands still and nothing is popped:
    /// what a checkpoint records then stays exactly true.
    pub(super) fn freeze(&mut self, frozen: bool) {
        self.frozen = frozen;
        self.catch_up();
    }

    /// The released time follows the largest time seen, less the delay.
    fn catch_up(&mut self) {
        if let (Some(seen), false) = (self.max_seen, self.frozen) {
            self.release_to(seen.saturating_sub(self.max_delay_ms));
        }
    }

    /// Keeps only the held items `keep` says (the rest are handed back:
    /// not applied, read again by whoever reads their source next).
    pub(super) fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        self.held.retain(|Reverse(h)| keep(&h.item));
    }

    /// Every event at or before this time has been released.
    pub(super) fn released(&self) -> Option<i64> {
        self.released
    }

    /// Events held.
    pub(super) fn len(&self) -> usize {
        self.held.len()
    }

    /// The items held, in no order.
    pub(super) fn items(&self) -> impl Iterator<Item = &T> {
        self.held.iter().map(|Reverse(h)| &h.item)
    }

    /// Takes an event read at `now` whose time is `time`; `trusted` times
    /// (read from the event, and possible) move the released time on.
    pub(super) fn push(&mut self, time: i64, trusted: bool, item: T, now: Instant) -> Pushed<T> {
        if trusted {
            self.max_seen = Some(self.max_seen.map_or(time, |m| m.max(time)));
            self.catch_up();
        }
        if self.released.is_some_and(|r| time <= r) {
            // Late only when something later was given out before it
            // (without a delay nothing is held, so nothing is late).
            let late = self.applied.is_some_and(|a| time < a) && self.max_delay_ms > 0;
            self.gave(time);
            return Pushed::Now { item, late };
        }
        self.seq += 1;
        self.held.push(Reverse(Held { time, seq: self.seq, since: now, item }));
        Pushed::Held
    }

    /// Takes an event whose time is `time`, read from `source`: what is
    /// due now goes to `out`, in order (one with no time of its own at
    /// once). True when the event itself was applied at once and late: it
    /// is then the last of `out`.
    pub(super) fn take_into(&mut self, time: i64, source: TimeSource, item: T, now: Instant, out: &mut Vec<T>) -> bool {
        if source == TimeSource::Ingest {
            out.push(item);
            return false;
        }
        match self.push(time, source == TimeSource::Event, item, now) {
            Pushed::Now { item, late } => {
                out.push(item);
                late
            }
            Pushed::Held => {
                while let Some(item) = self.pop(now) {
                    out.push(item);
                }
                false
            }
        }
    }

    fn gave(&mut self, time: i64) {
        self.applied = Some(self.applied.map_or(time, |a| a.max(time)));
    }

    fn release_to(&mut self, time: i64) {
        self.released = Some(self.released.map_or(time, |r| r.max(time)));
    }

    /// The next event to apply at `now`, if one is due: released by event
    /// time, or held `max_delay` of wall clock (the released time moves up
    /// to it).
    pub(super) fn pop(&mut self, now: Instant) -> Option<T> {
        if self.frozen {
            return None;
        }
        let Reverse(next) = self.held.peek()?;
        let due = self.released.is_some_and(|r| next.time <= r);
        if !due && now.saturating_duration_since(next.since) < self.max_wait {
            return None;
        }
        self.pop_any()
    }

    /// The next event held, whatever its time (the input has ended).
    pub(super) fn pop_any(&mut self) -> Option<T> {
        let Reverse(next) = self.held.pop()?;
        self.release_to(next.time);
        self.gave(next.time);
        Some(next.item)
    }
}

/// Recorded events put in the order `riskd run` applies them, for `riskd
/// replay` and `riskd test`: held for `max_delay` of event time (a
/// recording has no wall clock to wait on), events without a time of their
/// own as they come.
pub(crate) struct Sequencer {
    order: Reorder<Event>,
    now: Instant,
}

impl Sequencer {
    pub(crate) fn new(max_delay: Duration) -> Self {
        Self { order: Reorder::new(max_delay, None), now: Instant::now() }
    }

    /// Takes an event (its time settled); those now due go to `out`, in order.
    pub(crate) fn push(&mut self, event: Event, out: &mut Vec<Event>) {
        let (time, source) = (event.time_ms, event.time_source);
        self.order.take_into(time, source, event, self.now, out);
    }

    /// The recording has ended: every event held goes to `out`, in order.
    pub(crate) fn finish(&mut self, out: &mut Vec<Event>) {
        while let Some(e) = self.order.pop_any() {
            out.push(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frozen_buffer_releases_nothing_until_thawed() {
        let mut r = Reorder::new(Duration::from_millis(10), Some(50));
        let now = Instant::now();
        r.freeze(true);
        assert_eq!(r.push(100, true, 'a', now), Pushed::Held);
        assert_eq!(r.push(40, true, 'b', now), Pushed::Now { item: 'b', late: false });
        assert_eq!(r.push(30, true, 'c', now), Pushed::Now { item: 'c', late: true }, "after 40");
        assert_eq!(r.pop(now + Duration::from_secs(1)), None);
        assert_eq!(r.released(), Some(50));
        r.freeze(false);
        assert_eq!(r.released(), Some(90));
        assert_eq!(r.pop(now + Duration::from_secs(1)), Some('a'));
    }

    /// Events (time, id) pushed in `order`, applied as the buffer says,
    /// the rest at the end.
    fn applied(max_delay_ms: u64, events: &[(i64, u32)]) -> Vec<u32> {
        let mut r = Reorder::new(Duration::from_millis(max_delay_ms), None);
        let now = Instant::now();
        let mut out = Vec::new();
        for &(t, id) in events {
            if let Pushed::Now { item, .. } = r.push(t, true, id, now) {
                out.push(item);
            }
            while let Some(id) = r.pop(now) {
                out.push(id);
            }
        }
        while let Some(id) = r.pop_any() {
            out.push(id);
        }
        out
    }

    #[test]
    fn events_displaced_by_at_most_the_delay_come_out_sorted() {
        // Sorted: 1..=8 at times 10, 20, … ; displaced by at most 30.
        let shuffled = [(20, 2), (10, 1), (40, 4), (50, 5), (30, 3), (70, 7), (60, 6), (80, 8)];
        assert_eq!(applied(30, &shuffled), vec![1, 2, 3, 4, 5, 6, 7, 8]);
        // Ties go in arrival order.
        assert_eq!(applied(30, &[(10, 1), (10, 2), (5, 0), (10, 3)]), vec![0, 1, 2, 3]);
    }

    #[test]
    fn one_event_far_ahead_does_not_make_the_rest_late() {
        let mut r = Reorder::new(Duration::from_millis(5), None);
        let now = Instant::now();
        assert_eq!(r.push(10, true, 'a', now), Pushed::Held);
        assert_eq!(r.push(600, true, 'z', now), Pushed::Held);
        assert_eq!(r.pop(now), Some('a'));
        assert_eq!(r.push(11, true, 'b', now), Pushed::Now { item: 'b', late: false });
        assert_eq!(r.push(12, true, 'c', now), Pushed::Now { item: 'c', late: false });
        assert_eq!(r.push(11, true, 'd', now), Pushed::Now { item: 'd', late: true }, "after c");
        assert_eq!(r.pop(now), None, "z waits for its time");
    }

    #[test]
    fn an_event_behind_the_released_time_is_applied_at_once_and_late() {
        let mut r = Reorder::new(Duration::from_millis(10), None);
        let now = Instant::now();
        assert_eq!(r.push(100, true, 'a', now), Pushed::Held);
        assert_eq!(r.push(200, true, 'b', now), Pushed::Held);
        assert_eq!(r.released(), Some(190));
        assert_eq!(r.pop(now), Some('a'));
        assert_eq!(r.push(50, true, 'c', now), Pushed::Now { item: 'c', late: true });
        assert_eq!(r.push(190, true, 'd', now), Pushed::Now { item: 'd', late: false });
        assert_eq!(r.pop(now), None, "b waits for 200 to be released");
    }

    #[test]
    fn a_quiet_stream_is_released_after_the_delay_of_wall_clock() {
        let mut r = Reorder::new(Duration::from_millis(50), None);
        let start = Instant::now();
        assert_eq!(r.push(1_000, true, 'a', start), Pushed::Held);
        assert_eq!(r.pop(start), None);
        assert_eq!(r.pop(start + Duration::from_millis(50)), Some('a'));
        assert_eq!(r.released(), Some(1_000), "the released time moved up to it");
        assert_eq!(r.push(999, true, 'b', start), Pushed::Now { item: 'b', late: true });
    }

    #[test]
    fn untrusted_times_never_release_anything() {
        let mut r = Reorder::new(Duration::from_millis(10), None);
        let now = Instant::now();
        assert_eq!(r.push(100, true, 'a', now), Pushed::Held);
        assert_eq!(r.push(i64::MAX / 2, false, 'b', now), Pushed::Held);
        assert_eq!(r.pop(now), None);
        assert_eq!(r.released(), Some(90));
    }
}
