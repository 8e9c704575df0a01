//! `riskd replay`: a backtest. The rules run over recorded events on a
//! throw-away in-memory store (never the configured one), and the report
//! says, per rule, what they would have done — and for `count` and
//! `distinct` rules how high each key's value went, which is what choosing a
//! threshold needs.

use crate::config::Config;
use crate::event::{now_ms, EventClock};
use crate::pipeline::order::Sequencer;
use crate::pipeline::RunError;
use crate::rules::{Engine, Form, Rule};
use crate::scoring::Scorer;
use crate::source::JsonLines;
use crate::source::{decode, Decoded, Decoder};
use crate::state::{MemoryStore, StateCache};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

/// Distribution of the values a windowed state reached, over its keys.
#[derive(Debug, Serialize, PartialEq)]
pub struct Values {
    /// `count` or `distinct`.
    pub form: &'static str,
    /// The rule's threshold.
    pub threshold: i64,
    /// State keys (entities) that reached a value.
    pub keys: usize,
    /// Percentiles of the highest value each key reached (nearest rank).
    pub p50: i64,
    /// 90th percentile.
    pub p90: i64,
    /// 99th percentile.
    pub p99: i64,
    /// Highest.
    pub max: i64,
    /// Keys that reached the threshold.
    pub at_threshold: usize,
}

/// Distribution of a behaviour rule's measure: for `baseline` the z of
/// each bucket closed with `min_history` behind it (empty buckets too; none
/// where the stddev is 0), for `rare` the value's share at each event with
/// `min_history` behind it. What choosing `k` and `max_share` needs.
#[derive(Debug, Serialize, PartialEq)]
pub struct Measures {
    /// `baseline z` or `rare share`.
    pub measure: &'static str,
    /// Closed buckets (`baseline`) or events (`rare`) measured.
    pub samples: usize,
    /// Percentiles (nearest rank), to 3 decimals: p50, p90, p99 and max
    /// of z; min, p1, p10 and p50 of the share (a rare value has a small one).
    #[serde(serialize_with = "in_order")]
    pub percentiles: Vec<(String, f64)>,
    /// The rule's `k` or `max_share`.
    pub limit: f64,
    /// Samples past it: z above `k`, share below `max_share`.
    pub past_limit: usize,
}

/// Pairs as a JSON object, in their order.
fn in_order<S: serde::Serializer>(pairs: &[(String, f64)], s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(pairs.iter().map(|(k, v)| (k, v)))
}

/// One rule's figures.
#[derive(Debug, Serialize, PartialEq)]
pub struct RuleReport {
    /// Rule id.
    pub rule_id: String,
    /// Events whose match held.
    pub matches: u64,
    /// Alerts that would have been written.
    pub alerts: u64,
    /// Alerts suppressed by dedup.
    pub suppressed: u64,
    /// Entities with a matching event.
    pub entities_matched: usize,
    /// Entities with an alert.
    pub entities_alerted: usize,
    /// For `count` and `distinct` rules.
    pub values: Option<Values>,
    /// For `baseline` and `rare` rules.
    pub measures: Option<Measures>,
}

/// The whole report.
#[derive(Debug, Serialize, PartialEq)]
pub struct Report {
    /// Lines read.
    pub events: u64,
    /// Lines set aside (not JSON, not an object, too large).
    pub invalid: u64,
    /// `entity_risk` alerts.
    pub risk_alerts: u64,
    /// Per rule, in rule order.
    pub rules: Vec<RuleReport>,
}

/// Nearest-rank percentile of sorted values (the default when there are none).
fn percentile<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn values(rule: &Rule, peaks: impl Iterator<Item = i64>) -> Option<Values> {
    let (form, threshold) = match &rule.form {
        Form::Count { threshold, .. } => ("count", *threshold),
        Form::Distinct { threshold, .. } => ("distinct", *threshold as i64),
        _ => return None,
    };
    let mut v: Vec<i64> = peaks.collect();
    v.sort_unstable();
    Some(Values {
        form,
        threshold,
        keys: v.len(),
        p50: percentile(&v, 50.0),
        p90: percentile(&v, 90.0),
        p99: percentile(&v, 99.0),
        max: v.last().copied().unwrap_or(0),
        at_threshold: v.iter().filter(|x| **x >= threshold).count(),
    })
}

fn measures(rule: &Rule, mut v: Vec<f64>) -> Option<Measures> {
    let (measure, limit, points): (_, _, &[(&str, f64)]) = match &rule.form {
        Form::Baseline(b) => ("baseline z", b.k, &[("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("max", 100.0)]),
        Form::Rare(r) => ("rare share", r.max_share, &[("min", 0.0), ("p1", 1.0), ("p10", 10.0), ("p50", 50.0)]),
        _ => return None,
    };
    v.sort_unstable_by(f64::total_cmp);
    let at = |p: f64| (percentile(&v, p) * 1000.0).round() / 1000.0;
    let past_limit = match &rule.form {
        Form::Baseline(_) => v.iter().filter(|z| **z > limit).count(),
        _ => v.iter().filter(|s| **s < limit).count(),
    };
    Some(Measures {
        measure,
        samples: v.len(),
        percentiles: points.iter().map(|(name, p)| (name.to_string(), at(*p))).collect(),
        limit,
        past_limit,
    })
}

/// Runs the config's rules over `input` on an in-memory store.
pub fn replay(cfg: Config, input: &Path) -> Result<Report, RunError> {
    let decoder = Decoder::new(&cfg.rules, &cfg.event_time);
    let rules = cfg.rules;
    let mut cache = StateCache::new(Box::new(MemoryStore::new()), usize::MAX);
    let mut engine = Engine::new(Arc::clone(&rules));
    let scorer = Scorer::new(&rules, Arc::new(cfg.scoring));
    engine.enable_stats();
    let path = input.display().to_string();
    let io = |source| RunError::Io { what: "input", path: path.clone(), source };
    let mut reader = JsonLines::open_file(input, 0, 0, cfg.max_line_bytes).map_err(|source| RunError::Open {
        what: "input",
        path: path.clone(),
        source,
    })?;
    let (mut buf, mut alerts, mut due) = (Vec::new(), Vec::new(), Vec::new());
    let mut clock = EventClock::default();
    // In the order `riskd run` applies them: event-time order within `event_time.max_delay`.
    let mut order = Sequencer::new(cfg.event_time.max_delay());
    let mut report = Report { events: 0, invalid: 0, risk_alerts: 0, rules: Vec::new() };
    let mut ended = false;
    while !ended {
        match reader.next_line(&mut buf).map_err(io)? {
            None => {
                order.finish(&mut due);
                ended = true;
            }
            Some(info) => match decode(&buf, &info, cfg.max_line_bytes, &decoder, now_ms()) {
                Decoded::Blank => continue,
                Decoded::Rejected { .. } => report.invalid += 1,
                Decoded::Event(mut event) => {
                    clock.settle(&mut event);
                    order.push(event, &mut due);
                }
            },
        }
        for event in due.drain(..) {
            scorer.process(&mut engine, &mut cache, &event, None, &mut alerts)?;
            report.risk_alerts += alerts.iter().filter(|a| a.rule_id == crate::scoring::RISK_RULE_ID).count() as u64;
            alerts.clear();
            report.events += 1;
        }
    }
    let stats = engine.stats().unwrap_or_default();
    report.rules = rules
        .iter()
        .zip(stats)
        .map(|(rule, s)| RuleReport {
            rule_id: rule.id.clone(),
            matches: s.matches,
            alerts: s.alerts,
            suppressed: s.suppressed,
            entities_matched: s.entities_matched.len(),
            entities_alerted: s.entities_alerted.len(),
            values: values(rule, s.peaks.values().copied()),
            measures: measures(rule, s.measures.clone()),
        })
        .collect();
    Ok(report)
}

/// The report as a table.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "replayed {} events ({} set aside), {} risk alerts",
        report.events, report.invalid, report.risk_alerts
    );
    let _ = writeln!(
        out,
        "{:<32} {:>8} {:>7} {:>10} {:>9} {:>9}   values reached per key (count/distinct), z per closed bucket (baseline), share per event (rare)",
        "rule", "matches", "alerts", "suppressed", "entities", "alerted"
    );
    for r in &report.rules {
        let values = match (&r.values, &r.measures) {
            (Some(v), _) => format!(
                "{} over {} keys: p50 {} p90 {} p99 {} max {}; {} keys reach the threshold {}",
                v.form, v.keys, v.p50, v.p90, v.p99, v.max, v.at_threshold, v.threshold
            ),
            (None, Some(m)) => {
                let points: Vec<String> = m.percentiles.iter().map(|(name, x)| format!("{name} {x}")).collect();
                let (unit, past) = match m.measure {
                    "baseline z" => ("closed buckets", format!("above k {}", m.limit)),
                    _ => ("events", format!("under max_share {}", m.limit)),
                };
                format!("{} over {} {unit}: {}; {} {past}", m.measure, m.samples, points.join(" "), m.past_limit)
            }
            (None, None) => String::new(),
        };
        let _ = writeln!(
            out,
            "{:<32} {:>8} {:>7} {:>10} {:>9} {:>9}   {}",
            r.rule_id, r.matches, r.alerts, r.suppressed, r.entities_matched, r.entities_alerted, values
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<i64> = (1..=10).collect();
        assert_eq!((percentile(&v, 50.0), percentile(&v, 90.0), percentile(&v, 99.0)), (5, 9, 10));
        assert_eq!(percentile(&[7], 50.0), 7);
        assert_eq!(percentile::<i64>(&[], 50.0), 0);
    }
}
