//! Cross-partition alignment: records of several partitions taken in
//! event-time order, as Kafka Streams does across a task's partitions.
//!
//! Each partition's records wait in a queue of their own, in offset order.
//! The next record taken is the head with the smallest event time (ties to
//! the first partition in key order). While a partition has nothing
//! buffered and is not known to be at its end, the others wait for it —
//! it may hold the smallest time still to come — but at most `max_idle` of
//! wall clock since it ran dry; past that they go on without it (an idle
//! partition never holds the rest back longer). A partition's queue past `cap` asks
//! to be paused, and to be resumed once it has drained to half of it, so
//! a partition ahead in event time does not fill memory while another is
//! waited for.
//!
//! A record with no trusted time of its own sorts with the last time of
//! its partition: it never holds anything back.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// Records queued per partition before it asks to be paused.
pub(crate) const QUEUE_CAP: usize = 4096;

/// What to do next.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Next<K, T> {
    /// Apply (or route) this record of partition `K`.
    Take(K, T),
    /// Partition `K` has nothing buffered and is waited for (poll more).
    Wait(K),
    /// Nothing buffered anywhere.
    Empty,
}

struct Part<T> {
    queue: VecDeque<(i64, T)>,
    /// The last time pushed (what a record without one sorts with).
    last: i64,
    /// When the queue last ran dry.
    dry_since: Instant,
    /// Known to be at its end: with nothing buffered, not waited for.
    at_end: bool,
    paused: bool,
}

/// The partitions one process reads, merged in event-time order.
pub(crate) struct Align<K, T> {
    max_idle: Duration,
    cap: usize,
    parts: BTreeMap<K, Part<T>>,
    buffered: usize,
}

impl<K: Ord + Clone, T> Align<K, T> {
    /// Waits at most `max_idle` for a partition with nothing buffered; a
    /// partition holding `cap` records asks to be paused.
    pub(crate) fn new(max_idle: Duration, cap: usize) -> Self {
        Self { max_idle, cap: cap.max(2), parts: BTreeMap::new(), buffered: 0 }
    }

    /// A partition now read (it is waited for from `now`).
    pub(crate) fn add(&mut self, key: K, now: Instant) {
        self.parts.entry(key).or_insert(Part {
            queue: VecDeque::new(),
            last: i64::MIN,
            dry_since: now,
            at_end: false,
            paused: false,
        });
    }

    /// Partitions no longer read: their records are dropped (not applied,
    /// so read again by whoever reads them next).
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&K) -> bool) {
        let buffered = &mut self.buffered;
        self.parts.retain(|k, p| {
            let kept = keep(k);
            if !kept {
                *buffered -= p.queue.len();
            }
            kept
        });
    }

    /// Whether partition `key` is known to be at its end (everything the
    /// broker holds was queued): then it is not waited for.
    pub(crate) fn set_at_end(&mut self, key: &K, at_end: bool) {
        if let Some(p) = self.parts.get_mut(key) {
            p.at_end = at_end;
        }
    }

    /// Records buffered over all partitions.
    pub(crate) fn len(&self) -> usize {
        self.buffered
    }

    /// Queues a record of partition `key` (ignored when it is not read),
    /// with its trusted event time, if any.
    pub(crate) fn push(&mut self, key: &K, time: Option<i64>, item: T) {
        let Some(p) = self.parts.get_mut(key) else { return };
        let time = time.unwrap_or(p.last);
        p.last = time;
        p.queue.push_back((time, item));
        self.buffered += 1;
    }

    /// The next record to take at `now`.
    pub(crate) fn next(&mut self, now: Instant) -> Next<K, T> {
        let mut best: Option<(&K, i64)> = None;
        let mut waited: Option<&K> = None;
        for (k, p) in &self.parts {
            match p.queue.front() {
                None if waited.is_none() && !p.at_end && now.saturating_duration_since(p.dry_since) < self.max_idle => {
                    waited = Some(k);
                }
                None => {}
                Some(&(t, _)) if best.is_none_or(|(_, b)| t < b) => best = Some((k, t)),
                Some(_) => {}
            }
        }
        // Nothing buffered anywhere: nothing is held back either.
        let Some((k, _)) = best else { return Next::Empty };
        if let Some(k) = waited {
            return Next::Wait(k.clone());
        }
        let k = k.clone();
        let Some(p) = self.parts.get_mut(&k) else { return Next::Empty };
        let Some((_, item)) = p.queue.pop_front() else { return Next::Empty };
        self.buffered -= 1;
        if p.queue.is_empty() {
            p.dry_since = now;
        }
        Next::Take(k, item)
    }

    /// Partitions that hold `cap` records or more and are not paused yet:
    /// marked paused, to be paused at the consumer.
    pub(crate) fn take_to_pause(&mut self) -> Vec<K> {
        let cap = self.cap;
        self.parts
            .iter_mut()
            .filter(|(_, p)| !p.paused && p.queue.len() >= cap)
            .map(|(k, p)| {
                p.paused = true;
                k.clone()
            })
            .collect()
    }

    /// Paused partitions drained to half of `cap`: marked running, to be
    /// resumed at the consumer.
    pub(crate) fn take_to_resume(&mut self) -> Vec<K> {
        let half = self.cap / 2;
        self.parts
            .iter_mut()
            .filter(|(_, p)| p.paused && p.queue.len() <= half)
            .map(|(k, p)| {
                p.paused = false;
                k.clone()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes every record the alignment gives at `now`.
    fn drain(a: &mut Align<u8, u32>, now: Instant) -> (Vec<u32>, Next<u8, u32>) {
        let mut out = Vec::new();
        loop {
            match a.next(now) {
                Next::Take(_, id) => out.push(id),
                other => return (out, other),
            }
        }
    }

    #[test]
    fn heads_are_taken_smallest_time_first() {
        let now = Instant::now();
        let mut a = Align::new(Duration::from_secs(1), 100);
        a.add(0, now);
        a.add(1, now);
        // Partition 0 is a day ahead of partition 1 in event time.
        for (t, id) in [(100, 1), (300, 3), (500, 5)] {
            a.push(&0, Some(t), id);
        }
        for (t, id) in [(200, 2), (400, 4)] {
            a.push(&1, Some(t), id);
        }
        a.push(&1, None, 44); // No time: sorts with 400.
        let (taken, next) = drain(&mut a, now);
        assert_eq!(taken, vec![1, 2, 3, 4, 44]);
        assert_eq!(next, Next::Wait(1), "partition 1 ran dry: it may still hold a time before 500");
        let (taken, next) = drain(&mut a, now + Duration::from_secs(1));
        assert_eq!((taken, next), (vec![5], Next::Empty), "nothing buffered: nothing held back");
        assert_eq!(a.len(), 0);
    }

    #[test]
    fn a_partition_with_nothing_is_waited_for_at_most_max_idle() {
        let start = Instant::now();
        let mut a = Align::new(Duration::from_millis(50), 100);
        a.add(0, start);
        a.add(1, start);
        a.push(&0, Some(10), 1);
        assert_eq!(a.next(start), Next::Wait(1));
        assert_eq!(a.next(start + Duration::from_millis(50)), Next::Take(0, 1));
        // Known to be at its end: not waited for.
        let mut e = Align::new(Duration::from_secs(60), 100);
        e.add(0, start);
        e.add(1, start);
        e.push(&0, Some(10), 1);
        e.set_at_end(&1, true);
        assert_eq!(e.next(start), Next::Take(0, 1));
        // Zero never waits.
        let mut z = Align::new(Duration::ZERO, 100);
        z.add(0, start);
        z.add(1, start);
        z.push(&1, Some(10), 7);
        assert_eq!(z.next(start), Next::Take(1, 7));
        assert_eq!(z.next(start), Next::Empty);
    }

    #[test]
    fn a_full_partition_is_paused_then_resumed_and_dropped_ones_are_forgotten() {
        let now = Instant::now();
        let mut a = Align::new(Duration::ZERO, 4);
        a.add(0, now);
        a.add(1, now);
        for t in 0..4 {
            a.push(&0, Some(t), t as u32);
        }
        a.push(&1, Some(100), 100);
        a.push(&7, Some(1), 1); // Not read: ignored.
        assert_eq!(a.take_to_pause(), vec![0]);
        assert_eq!(a.take_to_pause(), Vec::<u8>::new());
        assert_eq!(a.take_to_resume(), Vec::<u8>::new());
        assert_eq!(a.next(now), Next::Take(0, 0));
        assert_eq!(a.next(now), Next::Take(0, 1));
        assert_eq!(a.take_to_resume(), vec![0]);
        a.retain(|k| *k == 1);
        assert_eq!(a.len(), 1);
        assert_eq!(a.next(now), Next::Take(1, 100));
    }
}
