//! Sigma correlations as state: `event_count`, `value_count`, `temporal`
//! and `temporal_ordered` over a sliding window of event time, per group
//! (the `group-by` fields, the first naming the entity).
//!
//! The semantics are rsigma's (`tests/sigma.rs` checks them against its
//! correlation engine): each referenced rule an event matches is one hit at
//! the event's time; hits older than `time − timespan` leave the window;
//! after each hit the window's value (hits, distinct values, or referenced
//! rules with a hit — for `temporal_ordered`, all of them in order or
//! none) is tested against every predicate of the condition. riskd's
//! choice where Sigma leaves it open: a correlation that fires clears its
//! group's window (rsigma's `reset` action), so the next alert needs the
//! condition met again from new hits, and the risk it adds is not repeated
//! by every later hit.
//!
//! What is kept is bounded whatever the event rate: only the newest hits
//! that can still change the verdict ([`Correlation::keep`]).

use super::forms::{Decision, Skip};
use crate::event::{format_time_ms, scalar_string, Event, FieldPath};
use crate::state::Record;
use serde_json::{json, Map, Value};

/// The largest count a condition may name: a group keeps up to one more
/// hit or value than its largest limit, and this many fit well within a
/// stored record (DynamoDB's item is 400 KB).
pub const MAX_LIMIT: u64 = 10_000;

/// Hits kept per referenced rule of a `temporal_ordered` correlation.
const ORDERED_HITS: usize = 64;

/// What a correlation counts.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// Hits.
    EventCount,
    /// Distinct values of these fields (together).
    ValueCount(Vec<FieldPath>),
    /// Referenced rules with a hit in the window.
    Temporal,
    /// Every referenced rule with a hit, in their order.
    TemporalOrdered,
}

/// A comparison of the window's value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Op {
    /// `lt`.
    Lt,
    /// `lte`.
    Lte,
    /// `gt`.
    Gt,
    /// `gte`.
    Gte,
    /// `eq`.
    Eq,
    /// `neq`.
    Neq,
}

impl Op {
    fn holds(self, value: f64, limit: f64) -> bool {
        match self {
            Op::Lt => value < limit,
            Op::Lte => value <= limit,
            Op::Gt => value > limit,
            Op::Gte => value >= limit,
            Op::Eq => (value - limit).abs() < f64::EPSILON,
            Op::Neq => (value - limit).abs() >= f64::EPSILON,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Op::Lt => "lt",
            Op::Lte => "lte",
            Op::Gt => "gt",
            Op::Gte => "gte",
            Op::Eq => "eq",
            Op::Neq => "neq",
        }
    }
}

/// A compiled Sigma correlation. The referenced rules' detections are the
/// parts of its rule's matcher, in the order of `rules`.
#[derive(Debug)]
pub struct Correlation {
    /// What it counts.
    pub kind: Kind,
    /// The referenced rules, as the correlation names them.
    pub rules: Vec<String>,
    /// `timespan`, ms.
    pub window_ms: i64,
    /// The condition: every predicate must hold.
    pub predicates: Vec<(Op, f64)>,
}

impl Correlation {
    /// The type's name, as Sigma writes it.
    pub fn type_name(&self) -> &'static str {
        match self.kind {
            Kind::EventCount => "event_count",
            Kind::ValueCount(_) => "value_count",
            Kind::Temporal => "temporal",
            Kind::TemporalOrdered => "temporal_ordered",
        }
    }

    /// How many of the newest hits (or values) decide every predicate: a
    /// value above every limit reads the same to all of them, so counting
    /// past the largest limit + 1 changes nothing.
    fn keep(&self) -> usize {
        let top = self.predicates.iter().map(|(_, l)| *l).fold(0.0, f64::max);
        (top.clamp(0.0, MAX_LIMIT as f64) as usize).saturating_add(1)
    }

    fn holds(&self, value: f64) -> bool {
        self.predicates.iter().all(|(op, limit)| op.holds(value, *limit))
    }

    /// The condition as written (`gte 10`, `gt 2, lte 5`).
    fn condition_text(&self) -> String {
        let parts: Vec<String> = self.predicates.iter().map(|(op, l)| format!("{} {l}", op.name())).collect();
        parts.join(", ")
    }
}

fn hits(list: Option<&Value>) -> Vec<i64> {
    list.and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_i64).collect()).unwrap_or_default()
}

/// Keeps the `n` newest times at or after `cutoff`, oldest first.
fn newest(mut times: Vec<i64>, cutoff: i64, n: usize) -> Vec<i64> {
    times.retain(|t| *t >= cutoff);
    times.sort_unstable();
    let drop = times.len().saturating_sub(n);
    times.drain(..drop);
    times
}

/// Whether each rule in order has a hit no earlier than the one before it.
fn in_order(lists: &[Vec<i64>]) -> bool {
    let mut after = i64::MIN;
    for list in lists {
        // The earliest usable hit leaves the most room to the rules after.
        match list.iter().filter(|t| **t >= after).min() {
            Some(t) => after = *t,
            None => return false,
        }
    }
    true
}

/// Applies one event to a correlation's window for its group; `parts`
/// are the indexes of the referenced rules the event matched.
pub(super) fn apply(r: &mut Record, c: &Correlation, event: &Event, parts: &[usize]) -> Result<Option<Decision>, Skip> {
    let now = event.time_ms;
    let cutoff = now.saturating_sub(c.window_ms);
    let mut dict = r.dict.take().unwrap_or_default();
    let (value, extra) = match &c.kind {
        Kind::EventCount => {
            let mut times = hits(dict.get("hits"));
            times.extend(std::iter::repeat_n(now, parts.len()));
            let times = newest(times, cutoff, c.keep());
            let value = times.len() as f64;
            dict.insert("hits".into(), json!(times));
            (value, ("count", json!(value as u64)))
        }
        Kind::ValueCount(fields) => {
            let mut parts_of_value = Vec::with_capacity(fields.len());
            for f in fields {
                let v = f.lookup(&event.value).and_then(scalar_string);
                match v {
                    Some(v) => parts_of_value.push(v),
                    None => {
                        r.dict = Some(dict);
                        return Err(Skip::Missing(format!("field {f} is absent or not a scalar")));
                    }
                }
            }
            let key = parts_of_value.join("\u{1f}");
            let mut values: Vec<(String, i64)> = dict
                .get("values")
                .and_then(Value::as_object)
                .map(|m| m.iter().filter_map(|(k, t)| Some((k.clone(), t.as_i64()?))).collect())
                .unwrap_or_default();
            match values.iter_mut().find(|(k, _)| *k == key) {
                Some((_, t)) => *t = (*t).max(now),
                None => values.push((key, now)),
            }
            values.retain(|(_, t)| *t >= cutoff);
            values.sort_by_key(|(_, t)| std::cmp::Reverse(*t));
            values.truncate(c.keep());
            let value = values.len() as f64;
            let listed: Vec<&str> = values.iter().take(50).map(|(k, _)| k.as_str()).collect();
            let extra = ("values", json!(listed));
            dict.insert("values".into(), Value::Object(values.into_iter().map(|(k, t)| (k, json!(t))).collect()));
            (value, extra)
        }
        Kind::Temporal | Kind::TemporalOrdered => {
            let ordered = c.kind == Kind::TemporalOrdered;
            let mut by_rule = dict.remove("rules").and_then(|v| v.as_object().cloned()).unwrap_or_default();
            let mut lists = Vec::with_capacity(c.rules.len());
            for (i, name) in c.rules.iter().enumerate() {
                let mut times = hits(by_rule.get(name));
                if parts.contains(&i) {
                    times.push(now);
                }
                // Unordered: the newest hit of each rule is all that counts.
                let times = newest(times, cutoff, if ordered { ORDERED_HITS } else { 1 });
                if times.is_empty() {
                    by_rule.remove(name);
                } else {
                    by_rule.insert(name.clone(), json!(times));
                }
                lists.push(times);
            }
            let with_hits: Vec<&str> =
                c.rules.iter().zip(&lists).filter(|(_, l)| !l.is_empty()).map(|(n, _)| n.as_str()).collect();
            let value = match ordered {
                false => with_hits.len(),
                true if in_order(&lists) => c.rules.len(),
                true => 0,
            } as f64;
            let extra = ("matched", json!(with_hits));
            dict.insert("rules".into(), Value::Object(by_rule));
            (value, extra)
        }
    };
    let latest = latest(&dict);
    let empty =
        dict.values().all(|v| v.as_array().is_some_and(Vec::is_empty) || v.as_object().is_some_and(Map::is_empty));
    r.expires_at_ms = (!empty).then(|| latest.unwrap_or(now).saturating_add(c.window_ms));
    r.dict = Some(dict);
    if !c.holds(value) {
        return Ok(None);
    }
    let mut context = Map::new();
    context.insert(
        "correlation".into(),
        json!({
            "type": c.type_name(),
            "rules": c.rules,
            "timespan_ms": c.window_ms,
            "condition": c.condition_text(),
            "value": value,
        }),
    );
    context.insert(extra.0.into(), extra.1);
    context.insert("window_start".into(), json!(format_time_ms(cutoff)));
    context.insert("window_end".into(), json!(format_time_ms(now)));
    Ok(Some(Decision { context, reset: true }))
}

/// The newest hit in the window's state.
fn latest(dict: &Map<String, Value>) -> Option<i64> {
    let mut all = Vec::new();
    for v in dict.values() {
        match v {
            Value::Array(a) => all.extend(a.iter().filter_map(Value::as_i64)),
            Value::Object(m) => {
                for x in m.values() {
                    match x {
                        Value::Array(a) => all.extend(a.iter().filter_map(Value::as_i64)),
                        other => all.extend(other.as_i64()),
                    }
                }
            }
            _ => {}
        }
    }
    all.into_iter().max()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(ms: i64) -> Event {
        Event::new(json!({"u": "x", "v": format!("v{ms}")}), ms, crate::event::TimeSource::Event)
    }

    fn corr(kind: Kind, rules: usize, predicates: Vec<(Op, f64)>) -> Correlation {
        Correlation { kind, rules: (0..rules).map(|i| format!("r{i}")).collect(), window_ms: 300_000, predicates }
    }

    fn run(c: &Correlation, hits: &[(i64, &[usize])]) -> Vec<bool> {
        let mut r = Record::default();
        hits.iter()
            .map(|(ms, parts)| {
                let fired = apply(&mut r, c, &event(*ms), parts).ok().flatten().is_some();
                if fired {
                    r = Record::default();
                }
                fired
            })
            .collect()
    }

    #[test]
    fn event_count_slides_with_event_time() {
        let c = corr(Kind::EventCount, 1, vec![(Op::Gte, 3.0)]);
        // 0, 4 min, 6 min: at 6 min the first has left the 5-minute window.
        assert_eq!(run(&c, &[(0, &[0]), (240_000, &[0]), (360_000, &[0])]), [false, false, false]);
        assert_eq!(run(&c, &[(0, &[0]), (120_000, &[0]), (240_000, &[0])]), [false, false, true]);
        // Exactly timespan old is still inside (rsigma: evicted when older).
        assert_eq!(run(&c, &[(0, &[0]), (1, &[0]), (300_000, &[0])]), [false, false, true]);
    }

    #[test]
    fn event_count_keeps_no_more_hits_than_decide() {
        let c = corr(Kind::EventCount, 1, vec![(Op::Gte, 3.0)]);
        let mut r = Record::default();
        for ms in 0..100 {
            let _ = apply(&mut r, &corr(Kind::EventCount, 1, vec![(Op::Gte, 1000.0)]), &event(ms), &[0]);
        }
        assert_eq!(hits(r.dict.as_ref().and_then(|d| d.get("hits"))).len(), 100);
        // gte 3: the newest 4 hits decide every verdict; no more are kept.
        let mut r = Record::default();
        for ms in 0..100 {
            let _ = apply(&mut r, &c, &event(ms), &[0]);
        }
        assert_eq!(hits(r.dict.as_ref().and_then(|d| d.get("hits"))), [96, 97, 98, 99]);
    }

    #[test]
    fn temporal_needs_every_rule_and_ordered_their_order() {
        let all = |n: usize| vec![(Op::Gte, n as f64)];
        let t = corr(Kind::Temporal, 2, all(2));
        assert_eq!(run(&t, &[(0, &[1]), (1_000, &[0])]), [false, true]);
        assert_eq!(run(&t, &[(0, &[1]), (400_000, &[0])]), [false, false]);
        let o = corr(Kind::TemporalOrdered, 2, vec![(Op::Gte, 1.0)]);
        assert_eq!(run(&o, &[(0, &[1]), (1_000, &[0])]), [false, false]);
        assert_eq!(run(&o, &[(0, &[1]), (1_000, &[0]), (2_000, &[1])]), [false, false, true]);
        // An early first rule still counts after a later one of its own.
        assert_eq!(run(&o, &[(0, &[0]), (5_000, &[0]), (2_000, &[1])]), [false, false, true]);
        // One event matching both, in order, is a sequence (hits may be equal in time).
        assert_eq!(run(&o, &[(0, &[0, 1])]), [true]);
    }

    #[test]
    fn value_count_counts_distinct_values_and_skips_a_missing_field() {
        let c = corr(Kind::ValueCount(vec![FieldPath::parse("v").unwrap()]), 1, vec![(Op::Gte, 2.0)]);
        assert_eq!(run(&c, &[(0, &[0]), (0, &[0]), (1, &[0])]), [false, false, true]);
        let missing = corr(Kind::ValueCount(vec![FieldPath::parse("w").unwrap()]), 1, vec![(Op::Gte, 1.0)]);
        assert!(matches!(apply(&mut Record::default(), &missing, &event(0), &[0]), Err(Skip::Missing(_))));
    }
}
