//! `riskd test`: rule test cases written in YAML beside the rules
//! (`*.test.yaml`), run on the real engine with an in-memory store, on event
//! time — no mocks.
//!
//! ```yaml
//! - name: ten AccessDenied in an hour fire once
//!   events:                      # inline, or events_file: a JSON-lines file beside this one
//!     - {eventTime: "2024-03-01T00:00:00Z", errorCode: AccessDenied, userIdentity: {arn: a}}
//!   state:                       # optional initial state, by key
//!     aws_access_denied_burst/principal/a: {count: 9, expires_at: "2024-03-01T00:30:00Z"}
//!   expect:
//!     alerts:                    # exactly `count` (default 1) alerts of the rule (and entity)
//!       - {rule: aws_access_denied_burst, entity: a, fields: {severity: MEDIUM, context.count: 10}}
//!     no_alerts: [aws_console_login_spray]   # rules that must not alert
//!     total_alerts: 1
//!     state:                     # live values at the last event's time
//!       aws_access_denied_burst/principal/a: {absent: true}
//!     scores:
//!       - {type: principal, id: a, score: 20, tolerance: 0.01}
//! ```

use crate::alert::{Alert, EntityRef};
use crate::config::Config;
use crate::event::{format_time_ms, now_ms, parse_time_ms, EventClock, EventTime};
use crate::pipeline::order::Sequencer;
use crate::rules::{Engine, Rule};
use crate::scoring::{self, Scorer, ScoringConfig};
use crate::state::{MemoryStore, Mutation, Record, StateCache, Store, WriteBatch};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    #[serde(default)]
    events: Vec<Value>,
    #[serde(default)]
    events_file: Option<String>,
    #[serde(default)]
    state: BTreeMap<String, StateSpec>,
    expect: Expect,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateSpec {
    #[serde(default)]
    count: Option<i64>,
    #[serde(default)]
    set: Option<Vec<String>>,
    #[serde(default)]
    dict: Option<Map<String, Value>>,
    #[serde(default)]
    expires_at: Option<String>,
    #[serde(default)]
    absent: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    #[serde(default)]
    alerts: Vec<AlertExpect>,
    #[serde(default)]
    no_alerts: Vec<String>,
    #[serde(default)]
    total_alerts: Option<usize>,
    #[serde(default)]
    state: BTreeMap<String, StateSpec>,
    #[serde(default)]
    scores: Vec<ScoreExpect>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AlertExpect {
    rule: String,
    #[serde(default)]
    entity: Option<String>,
    #[serde(default = "one")]
    count: usize,
    #[serde(default)]
    fields: BTreeMap<String, Value>,
}

fn one() -> usize {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScoreExpect {
    #[serde(rename = "type")]
    type_: String,
    id: String,
    score: f64,
    #[serde(default = "hundredth")]
    tolerance: f64,
    #[serde(default)]
    armed: Option<bool>,
}

fn hundredth() -> f64 {
    0.01
}

/// The outcome of one test case.
#[derive(Debug)]
pub struct CaseResult {
    /// File it is in.
    pub file: PathBuf,
    /// Its name.
    pub name: String,
    /// Each failed expectation, as `- expected` / `+ actual` lines.
    pub failures: Vec<String>,
}

/// Every `*.test.yaml` under `paths` (files or folders, recursively), sorted.
pub fn discover(paths: &[PathBuf]) -> Vec<PathBuf> {
    fn walk(p: &Path, out: &mut Vec<PathBuf>) {
        if p.is_dir() {
            if let Ok(entries) = std::fs::read_dir(p) {
                for e in entries.flatten() {
                    walk(&e.path(), out);
                }
            }
        } else if p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(".test.yaml") || n.ends_with(".test.yml"))
        {
            out.push(p.to_path_buf());
        }
    }
    let mut out = Vec::new();
    for p in paths {
        if p.is_file() {
            out.push(p.clone());
        } else {
            walk(p, &mut out);
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Runs every case of every file.
pub fn run(cfg: Config, files: &[PathBuf]) -> Vec<CaseResult> {
    let rules = cfg.rules;
    let scoring = Arc::new(cfg.scoring);
    let mut results = Vec::new();
    for file in files {
        let fail =
            |name: &str, message: String| CaseResult { file: file.clone(), name: name.into(), failures: vec![message] };
        let cases: Vec<Case> = match std::fs::read_to_string(file)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_yaml_ng::from_str(&t).map_err(|e| e.to_string()))
        {
            Ok(c) => c,
            Err(e) => {
                results.push(fail("(file)", format!("cannot read test file: {e}")));
                continue;
            }
        };
        for case in cases {
            let failures = match run_case(&rules, &scoring, &cfg.event_time, file, &case) {
                Ok(f) => f,
                Err(e) => vec![e],
            };
            results.push(CaseResult { file: file.clone(), name: case.name, failures });
        }
    }
    results
}

fn record(spec: &StateSpec) -> Result<Record, String> {
    Ok(Record {
        count: spec.count.unwrap_or(0),
        set: spec.set.iter().flatten().cloned().collect(),
        dict: spec.dict.clone(),
        expires_at_ms: match &spec.expires_at {
            None => None,
            Some(t) => Some(parse_time_ms(&Value::String(t.clone())).ok_or_else(|| format!("bad expires_at {t:?}"))?),
        },
    })
}

fn run_case(
    rules: &Arc<Vec<Rule>>,
    scoring: &Arc<ScoringConfig>,
    event_time: &EventTime,
    file: &Path,
    case: &Case,
) -> Result<Vec<String>, String> {
    let mut store = MemoryStore::new();
    let initial: Vec<(String, Record)> =
        case.state.iter().map(|(k, s)| record(s).map(|r| (k.clone(), r))).collect::<Result<_, _>>()?;
    let batch = WriteBatch {
        mutations: initial.iter().map(|(k, r)| (k.as_str(), Mutation::Put(r))).collect(),
        checkpoints: Vec::new(),
    };
    store.apply(batch).map_err(|e| e.to_string())?;
    let mut events = case.events.clone();
    if let Some(f) = &case.events_file {
        let path = file.parent().unwrap_or(Path::new(".")).join(f);
        let text = std::fs::read_to_string(&path).map_err(|e| format!("events_file {}: {e}", path.display()))?;
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            events.push(serde_json::from_str(line).map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))?);
        }
    }
    let mut engine = Engine::new(Arc::clone(rules));
    let scorer = Scorer::new(rules, Arc::clone(scoring));
    let mut cache = StateCache::new(Box::new(store), usize::MAX);
    let mut alerts: Vec<Alert> = Vec::new();
    let mut now = i64::MIN;
    let mut clock = EventClock::default();
    // In the order `riskd run` applies them: event-time order within `event_time.max_delay`.
    let mut order = Sequencer::new(event_time.max_delay());
    let mut due = Vec::new();
    for (i, value) in events.into_iter().enumerate() {
        if !value.is_object() {
            return Err(format!("event {} is not a JSON object", i + 1));
        }
        let mut event = event_time.event(value, now_ms());
        clock.settle(&mut event);
        now = now.max(event.time_ms);
        order.push(event, &mut due);
    }
    order.finish(&mut due);
    for event in &due {
        scorer.process(&mut engine, &mut cache, event, None, &mut alerts).map_err(|e| e.to_string())?;
    }
    Ok(check(&mut cache, scoring, &case.expect, &alerts, now))
}

/// A dotted path into an alert (`context.count`, `entity.id`).
fn field<'a>(alert: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(alert, |v, k| v.get(k))
}

/// Every way the run differs from what the test expects.
fn check(cache: &mut StateCache, scoring: &ScoringConfig, expect: &Expect, alerts: &[Alert], now: i64) -> Vec<String> {
    let mut failures = check_alerts(expect, alerts);
    check_state(cache, expect, now, &mut failures);
    check_scores(cache, scoring, expect, now, &mut failures);
    failures
}

/// The alerts expected of each rule, their fields, and the total.
fn check_alerts(expect: &Expect, alerts: &[Alert]) -> Vec<String> {
    let mut failures = Vec::new();
    let as_json: Vec<Value> = alerts.iter().map(|a| serde_json::to_value(a).unwrap_or(Value::Null)).collect();
    let describe = |list: &[&Value]| -> String {
        let items: Vec<String> = list
            .iter()
            .map(|a| {
                format!(
                    "{} {} at {}",
                    a["rule_id"].as_str().unwrap_or(""),
                    a["entity"]["id"].as_str().unwrap_or(""),
                    a["event_time"].as_str().unwrap_or("")
                )
            })
            .collect();
        if items.is_empty() {
            "none".to_string()
        } else {
            items.join(", ")
        }
    };
    for exp in &expect.alerts {
        let matching: Vec<&Value> = as_json
            .iter()
            .filter(|a| {
                a["rule_id"] == exp.rule.as_str() && exp.entity.as_ref().is_none_or(|e| a["entity"]["id"] == e.as_str())
            })
            .collect();
        let who = match &exp.entity {
            Some(e) => format!("{} for {e}", exp.rule),
            None => exp.rule.clone(),
        };
        if matching.len() != exp.count {
            failures.push(format!(
                "alerts of {who}\n  - expected {}\n  + got {}: {}",
                exp.count,
                matching.len(),
                describe(&matching)
            ));
        }
        for a in &matching {
            for (path, want) in &exp.fields {
                let got = field(a, path).cloned().unwrap_or(Value::Null);
                if &got != want {
                    failures.push(format!("alert of {who}, field {path}\n  - expected {want}\n  + got {got}"));
                }
            }
        }
    }
    for rule in &expect.no_alerts {
        let fired: Vec<&Value> = as_json.iter().filter(|a| a["rule_id"] == rule.as_str()).collect();
        if !fired.is_empty() {
            failures.push(format!(
                "alerts of {rule}\n  - expected none\n  + got {}: {}",
                fired.len(),
                describe(&fired)
            ));
        }
    }
    if let Some(total) = expect.total_alerts {
        if total != alerts.len() {
            let all: Vec<&Value> = as_json.iter().collect();
            failures.push(format!("total alerts\n  - expected {total}\n  + got {}: {}", alerts.len(), describe(&all)));
        }
    }
    failures
}

/// The state expected under each key at the end.
fn check_state(cache: &mut StateCache, expect: &Expect, now: i64, failures: &mut Vec<String>) {
    for (key, want) in &expect.state {
        let got = match cache.read(key, now) {
            Ok(r) => r.cloned(),
            Err(e) => {
                failures.push(format!("state {key}: {e}"));
                continue;
            }
        };
        let show = |r: &Option<Record>| match r {
            None => "absent".to_string(),
            Some(r) => serde_json::to_string(r).unwrap_or_default(),
        };
        let ok = match (&got, want.absent) {
            (None, true) => true,
            (_, true) | (None, false) => false,
            (Some(r), false) => {
                want.count.is_none_or(|c| c == r.count)
                    && want
                        .set
                        .as_ref()
                        .is_none_or(|s| s.iter().cloned().collect::<std::collections::BTreeSet<_>>() == r.set)
                    && want.dict.as_ref().is_none_or(|d| Some(d) == r.dict.as_ref())
                    && want
                        .expires_at
                        .as_ref()
                        .is_none_or(|t| parse_time_ms(&Value::String(t.clone())) == r.expires_at_ms)
            }
        };
        if !ok {
            let wanted = if want.absent {
                "absent".to_string()
            } else {
                let mut m = Map::new();
                if let Some(c) = want.count {
                    m.insert("count".into(), c.into());
                }
                if let Some(s) = &want.set {
                    m.insert("set".into(), s.clone().into());
                }
                if let Some(d) = &want.dict {
                    m.insert("dict".into(), Value::Object(d.clone()));
                }
                if let Some(t) = &want.expires_at {
                    m.insert("expires_at".into(), t.clone().into());
                }
                Value::Object(m).to_string()
            };
            failures.push(format!(
                "state {key} at {}\n  - expected {wanted}\n  + got {}",
                format_time_ms(now),
                show(&got)
            ));
        }
    }
}

/// The score (and armed state) expected of each entity at the end.
fn check_scores(
    cache: &mut StateCache,
    scoring: &ScoringConfig,
    expect: &Expect,
    now: i64,
    failures: &mut Vec<String>,
) {
    for exp in &expect.scores {
        let entity = EntityRef { type_: exp.type_.clone(), id: exp.id.clone() };
        match scoring::load(cache, &entity, now) {
            Ok(state) => {
                let score = state.score(scoring.policy(&exp.type_), now);
                if (score - exp.score).abs() > exp.tolerance {
                    failures.push(format!(
                        "score of {} {}\n  - expected {} (±{})\n  + got {score:.3}",
                        exp.type_, exp.id, exp.score, exp.tolerance
                    ));
                }
                if let Some(armed) = exp.armed {
                    if armed != state.armed {
                        failures.push(format!(
                            "{} {} armed\n  - expected {armed}\n  + got {}",
                            exp.type_, exp.id, state.armed
                        ));
                    }
                }
            }
            Err(e) => failures.push(format!("score of {} {}: {e}", exp.type_, exp.id)),
        }
    }
}

/// Test-runner output; the last line is `N passed, N failed`.
pub fn render(results: &[CaseResult]) -> String {
    let mut out = String::new();
    for r in results {
        let status = if r.failures.is_empty() { "ok" } else { "FAILED" };
        let _ = writeln!(out, "test {}: {} ... {status}", r.file.display(), r.name);
    }
    let failed: Vec<&CaseResult> = results.iter().filter(|r| !r.failures.is_empty()).collect();
    if !failed.is_empty() {
        let _ = writeln!(out, "\nfailures:");
        for r in &failed {
            let _ = writeln!(out, "\n---- {}: {} ----", r.file.display(), r.name);
            for f in &r.failures {
                let _ = writeln!(out, "{f}");
            }
        }
        out.push('\n');
    }
    let _ = writeln!(out, "{} passed, {} failed", results.len() - failed.len(), failed.len());
    out
}
