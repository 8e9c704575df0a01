//! Evaluation: every enabled rule, in a fixed order, on each event; state
//! through the write-back cache; alerts de-duplicated on event time.

use super::forms::{apply_form, Seen, Skip};
use super::{Form, Rule};
use crate::alert::{Alert, EntityRef};
use crate::event::{format_time_ms, id_string, Event, FieldPath, Reads};
use crate::state::{self, join_key, Access, Record, StateCache, StateError, DEDUP_PREFIX, RISK_PREFIX};
use crate::telemetry::metrics;
use hashbrown::HashMap;
use prometheus::{Histogram, IntCounter};
use serde_json::{Map, Value};
use std::sync::Arc;

/// Namespace of alert ids (UUID v5 over the alert's identity).
const ALERT_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6a0b_8d2e_51c4_4f0e_9b57_3c1d_2f8e_a4b1);

/// Something a rule could not do with an event (a field it needs is absent,
/// a value is too large). The event is reported and that rule skips it.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    /// The rule.
    pub rule_id: String,
    /// What was wrong.
    pub message: String,
}

/// What one event did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Rules whose match held.
    pub matched: u32,
    /// Alerts suppressed by dedup.
    pub suppressed: u32,
    /// Alerts whose risk was not added because of their rule's `risk_cap`.
    pub capped: u32,
    /// Rules that had to skip the event.
    pub problems: Vec<Problem>,
}

/// The rule engine of one lane: its rules, evaluated over a state cache the
/// caller owns and hands in.
pub struct Engine {
    rules: Arc<Vec<Rule>>,
    /// The fields they read: an event decoded for other rules (before a
    /// reload) is taken again.
    reads: Reads,
    /// Per rule: how its state and dedup window are changed, and how its
    /// entity's risk is (an entity type with a `direct` rule has its risk
    /// keys written from many places, so every rule changes them directly
    /// in the store). Chosen once per rule.
    access: Vec<RuleAccess>,
    /// Scratch buffer for state keys: no allocation per evaluation.
    key: String,
    /// Per event: the matched rules (index, entity) and the keys to load.
    matched: Vec<(usize, Target)>,
    keys: Vec<String>,
    /// Events seen (for sampling the evaluation timer).
    events: u64,
    /// Per rule: (evaluations, matches) not yet published.
    counts: Vec<(u64, u64)>,
    /// Per rule: evaluation time in the current sampled event.
    elapsed: Vec<std::time::Duration>,
    rule_metrics: Vec<RuleMetrics>,
    /// Per-rule replay figures, when enabled.
    stats: Option<Vec<RuleStats>>,
    /// Which rules an event can match at all (Sigma rules' prefilters).
    index: super::sigma::Index,
    /// Per event, per rule: it may match (from `index`).
    candidates: Vec<bool>,
}

/// How one rule's keys are changed.
#[derive(Clone, Copy)]
struct RuleAccess {
    /// Its state and dedup window.
    state: Access,
    /// Its entity's risk.
    risk: Access,
}

/// What one rule makes of an event ([`verdict`]).
enum Verdict {
    /// Not evaluated: with lanes, the entity is another lane's.
    Elsewhere,
    /// Evaluated; the match did not hold.
    NoMatch,
    /// Matched, but the entity is not in scope (another lane's, or not the
    /// routed entity).
    OutOfScope,
    /// Matched, but the rule cannot apply it (entity id absent or too long).
    Problem(String),
    /// Matched, for this entity.
    Match(Target),
}

/// Whom a matched rule is about: its entity, and the name of its state
/// when the rule groups by more than the entity (a Sigma correlation's
/// `group-by`).
struct Target {
    entity: String,
    group: Option<String>,
}

impl Target {
    /// The id the rule's state and default dedup key are kept under.
    fn state(&self) -> &str {
        self.group.as_deref().unwrap_or(&self.entity)
    }
}

/// A rule's metric handles, resolved once.
struct RuleMetrics {
    evaluations: IntCounter,
    matches: IntCounter,
    seconds: Histogram,
}

/// Per-rule figures of a replay (`riskd replay`), gathered when enabled.
#[derive(Debug, Default, Clone)]
pub struct RuleStats {
    /// Events whose match held.
    pub matches: u64,
    /// Alerts written.
    pub alerts: u64,
    /// Alerts suppressed by dedup.
    pub suppressed: u64,
    /// Entities with a matching event.
    pub entities_matched: std::collections::HashSet<String>,
    /// Entities with an alert.
    pub entities_alerted: std::collections::HashSet<String>,
    /// For `count` and `distinct` rules: the highest value each state key reached.
    pub peaks: HashMap<String, i64>,
    /// For `baseline` rules, the z of each bucket closed with enough
    /// history; for `rare` rules, the value's share at each event with
    /// enough history.
    pub measures: Vec<f64>,
}

/// Which rules apply to an event, for whom. `None` is every rule for
/// every entity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Scope<'a> {
    /// `(entity type, entity id)`: for an event read from a topic `riskd
    /// route` wrote for one entity, only the rules of that type, and only
    /// where the event's key for the rule is that entity (an event
    /// concerning a user and a role arrives once per entity).
    pub entity: Option<(&'a str, &'a str)>,
    /// `(lane, lanes)`: only the entities that [`lane_of`] puts in this
    /// lane (a rule whose entity field is absent belongs to lane 0, which
    /// reports it).
    pub lane: Option<(usize, usize)>,
}

/// The lane of an entity among `lanes`: a stable hash of its type and id,
/// so one entity's events are always applied by the same lane, in order.
pub fn lane_of(entity_type: &str, entity_id: &str, lanes: usize) -> usize {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    (entity_type, entity_id).hash(&mut h);
    (h.finish() % lanes.max(1) as u64) as usize
}

impl Scope<'_> {
    fn admits_type(scope: Option<Scope<'_>>, rule: &Rule) -> bool {
        scope.and_then(|s| s.entity).is_none_or(|(t, _)| t == rule.entity_type)
    }

    fn admits_entity(scope: Option<Scope<'_>>, rule: &Rule, entity_id: Option<&str>) -> bool {
        let Some(s) = scope else { return true };
        if let (Some((_, id)), Some(e)) = (s.entity, entity_id) {
            if id != e {
                return false;
            }
        }
        match (s.lane, entity_id) {
            (None, _) => true,
            (Some((lane, _)), None) => lane == 0,
            (Some((lane, n)), Some(e)) => lane_of(&rule.entity_type, e, n) == lane,
        }
    }
}

impl Engine {
    /// An engine over compiled rules (evaluated in the given order).
    pub fn new(rules: Arc<Vec<Rule>>) -> Self {
        let rule_metrics = rule_metrics(&rules);
        let index = index(&rules);
        Self {
            counts: vec![(0, 0); rules.len()],
            elapsed: vec![std::time::Duration::ZERO; rules.len()],
            access: access(&rules),
            reads: super::reads(&rules, &[]),
            rules,
            key: String::new(),
            matched: Vec::new(),
            keys: Vec::new(),
            events: 0,
            rule_metrics,
            stats: None,
            index,
            candidates: Vec::new(),
        }
    }

    /// Swaps in new rules and scoring (a reload), between events. The state
    /// of a rule whose [`Rule::state_shape`] changed, or that is gone, is
    /// removed, so that it starts fresh; every other rule keeps its state.
    /// Returns the ids of the rules that start fresh.
    pub fn set_rules(&mut self, cache: &mut StateCache, rules: Arc<Vec<Rule>>) -> Result<Vec<String>, StateError> {
        self.publish_metrics();
        let mut fresh = Vec::new();
        for old in self.rules.iter() {
            let shared = old.namespace != old.id;
            let same = rules.iter().find(|r| r.id == old.id).is_some_and(|r| r.state_shape() == old.state_shape());
            if !same && !shared {
                let n = cache.purge_prefix(&format!("{}/", old.namespace))?;
                tracing::info!(rule = %old.id, keys = n, "rule state starts fresh: its state shape changed or it is gone");
                fresh.push(old.id.clone());
            }
        }
        self.counts = vec![(0, 0); rules.len()];
        self.elapsed = vec![std::time::Duration::ZERO; rules.len()];
        self.rule_metrics = rule_metrics(&rules);
        self.access = access(&rules);
        self.reads = super::reads(&rules, &[]);
        self.index = index(&rules);
        self.stats = self.stats.as_ref().map(|_| vec![RuleStats::default(); rules.len()]);
        self.rules = rules;
        Ok(fresh)
    }

    /// Starts gathering per-rule figures for a replay report.
    pub fn enable_stats(&mut self) {
        self.stats = Some(vec![RuleStats::default(); self.rules.len()]);
    }

    /// Per-rule figures, in rule order, when enabled.
    pub fn stats(&self) -> Option<&[RuleStats]> {
        self.stats.as_deref()
    }

    /// Applies one event; alerts are appended to `alerts`. Only a failing
    /// store is an error, and then nothing of the event has been applied:
    /// every key it needs is loaded first, so the caller may retry it.
    /// Problems with the event are in the outcome.
    pub fn process(
        &mut self,
        cache: &mut StateCache,
        event: &Event,
        scope: Option<Scope<'_>>,
        alerts: &mut Vec<Alert>,
    ) -> Result<Outcome, StateError> {
        let retaken = event.retaken(&self.reads);
        let event = retaken.as_ref().unwrap_or(event);
        let mut out = Outcome::default();
        self.events += 1;
        let sampled = self.events.is_multiple_of(64);
        let mut timer = sampled.then(std::time::Instant::now);
        // Phase 1: which rules match, for which entity; load their keys.
        self.matched.clear();
        self.keys.clear();
        let rules = Arc::clone(&self.rules);
        self.index.candidates(&event.value, &mut self.candidates);
        for (i, rule, verdict) in verdicts(&rules, event, scope, &self.candidates) {
            if matches!(verdict, Verdict::Elsewhere) {
                continue;
            }
            self.counts[i].0 += 1;
            if let Some(t) = timer.as_mut() {
                self.elapsed[i] += t.elapsed();
                *t = std::time::Instant::now();
            }
            if matches!(verdict, Verdict::NoMatch) {
                continue;
            }
            self.counts[i].1 += 1;
            out.matched += 1;
            if let Some(stats) = self.stats.as_mut() {
                stats[i].matches += 1;
            }
            let target = match verdict {
                Verdict::Match(t) => t,
                Verdict::Problem(message) => {
                    out.problems.push(Problem { rule_id: rule.id.clone(), message });
                    continue;
                }
                _ => continue,
            };
            needed_keys(cache, &mut self.key, rule, self.access[i], &target, &event.value, &mut self.keys);
            if let Some(stats) = self.stats.as_mut() {
                stats[i].entities_matched.insert(target.entity.clone());
            }
            self.matched.push((i, target));
        }
        if self.matched.is_empty() {
            self.observe(timer.is_some());
            return Ok(out);
        }
        if !self.keys.is_empty() {
            let keys: Vec<&str> = self.keys.iter().map(String::as_str).collect();
            cache.prefetch(&keys)?;
        }
        // Phase 2: apply, in rule order; every key is in the cache now.
        let matched = std::mem::take(&mut self.matched);
        for (i, target) in &matched {
            let rule = &rules[*i];
            if let Err(e) = self.apply(cache, *i, rule, target, event, alerts, &mut out) {
                self.matched = matched;
                return Err(e);
            }
            if let Some(t) = timer.as_mut() {
                self.elapsed[*i] += t.elapsed();
                *t = std::time::Instant::now();
            }
        }
        self.matched = matched;
        self.observe(timer.is_some());
        Ok(out)
    }

    /// Loads, in one store read, every key that the rules matching these
    /// events will need and the cache lacks: for a remote store, one batch
    /// of requests for many events instead of one per event.
    pub fn prefetch(
        &mut self,
        cache: &mut StateCache,
        events: &[(&Event, Option<Scope<'_>>)],
    ) -> Result<(), StateError> {
        let mut keys = Vec::new();
        let mut candidates = Vec::new();
        for (event, scope) in events {
            let retaken = event.retaken(&self.reads);
            let event = retaken.as_ref().unwrap_or(event);
            self.index.candidates(&event.value, &mut candidates);
            for (i, rule, verdict) in verdicts(&self.rules, event, *scope, &candidates) {
                if let Verdict::Match(target) = verdict {
                    needed_keys(cache, &mut self.key, rule, self.access[i], &target, &event.value, &mut keys);
                }
            }
        }
        keys.sort_unstable();
        keys.dedup();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        cache.prefetch(&keys)
    }

    fn observe(&mut self, sampled: bool) {
        if sampled {
            for (m, d) in self.rule_metrics.iter().zip(self.elapsed.iter_mut()) {
                m.seconds.observe(d.as_secs_f64());
                *d = std::time::Duration::ZERO;
            }
        }
    }

    /// Adds the evaluation counts gathered since the last call to the
    /// exported metrics (counted locally: the hot path stays free of atomics).
    pub fn publish_metrics(&mut self) {
        for (m, c) in self.rule_metrics.iter().zip(self.counts.iter_mut()) {
            m.evaluations.inc_by(c.0);
            m.matches.inc_by(c.1);
            *c = (0, 0);
        }
    }

    /// Applies a matched rule to its entity's state and, when it fires and
    /// its dedup window is not open, alerts (its risk is scoring's to add).
    #[allow(clippy::too_many_arguments)]
    fn apply(
        &mut self,
        cache: &mut StateCache,
        rule_index: usize,
        rule: &Rule,
        target: &Target,
        event: &Event,
        alerts: &mut Vec<Alert>,
        out: &mut Outcome,
    ) -> Result<(), StateError> {
        let entity_id = target.entity.as_str();
        let Some(mut context) = self.decide(cache, rule_index, rule, target.state(), event, out)? else {
            return Ok(());
        };
        let Some(dedup_key) = dedup_key(rule, target.state(), &event.value) else {
            let path = rule.dedup_key.as_ref().map(FieldPath::as_str).unwrap_or_default();
            let message = format!("dedup key field {path} is absent, not a scalar, or over {MAX_ID_BYTES} bytes");
            out.problems.push(Problem { rule_id: rule.id.clone(), message });
            return Ok(());
        };
        let access = self.access[rule_index];
        if !first_in_window(cache, access.state, rule, &dedup_key, event.time_ms)? {
            out.suppressed += 1;
            if let Some(stats) = self.stats.as_mut() {
                stats[rule_index].suppressed += 1;
            }
            metrics().alerts_suppressed.with_label_values(&[rule.id.as_str(), rule.severity.as_str(), "dedup"]).inc();
            return Ok(());
        }
        for (name, path) in &rule.context {
            context.insert(name.clone(), path.lookup(&event.value).cloned().unwrap_or(Value::Null));
        }
        for (name, value) in &rule.labels {
            context.insert(name.clone(), value.clone());
        }
        let alert = Alert {
            alert_id: alert_id(rule, entity_id, event),
            rule_id: rule.id.clone(),
            title: rule.title.clone(),
            severity: rule.severity,
            entity: EntityRef { type_: rule.entity_type.clone(), id: entity_id.to_string() },
            event_time: format_time_ms(event.time_ms),
            event_time_source: event.time_source,
            risk: rule.risk,
            dedup_key,
            context: Value::Object(context),
            event: event.whole().clone(),
        };
        if let Some(stats) = self.stats.as_mut() {
            stats[rule_index].alerts += 1;
            stats[rule_index].entities_alerted.insert(entity_id.to_string());
        }
        alerts.push(alert);
        Ok(())
    }

    /// Changes the rule's state for the entity (`state_id`: [`Target::state`]) and decides whether it fires
    /// (its state form, then its `fire` condition); the alert's context if
    /// it does. A problem with the event is recorded in `out`.
    fn decide(
        &mut self,
        cache: &mut StateCache,
        rule_index: usize,
        rule: &Rule,
        state_id: &str,
        event: &Event,
        out: &mut Outcome,
    ) -> Result<Option<Map<String, Value>>, StateError> {
        join_key(&mut self.key, [&rule.namespace, &rule.entity_type, state_id]);
        let key = self.key.as_str();
        let mut seen = Seen { reached: None, measures: self.stats.is_some().then(Vec::new) };
        let access = self.access[rule_index];
        let granule = cache.expiry_granule();
        let mut kept = false;
        let result = if matches!(rule.form, Form::Stateless) {
            apply_form(&mut Record::default(), rule, key, event, &mut seen, (granule, &mut kept))
        } else {
            let mut result = Ok(None);
            let stored = cache.update(access.state, key, event.time_ms, &mut |r| {
                kept = false;
                result = apply_form(r, rule, key, event, &mut seen, (granule, &mut kept));
                result.is_ok() && !kept
            });
            if kept {
                cache.note_expiry_kept();
            }
            stored.map_err(Skip::State).and(result)
        };
        if let Some(stats) = self.stats.as_mut() {
            if let Some(v) = seen.reached {
                let peak = stats[rule_index].peaks.entry(key.to_string()).or_insert(0);
                *peak = (*peak).max(v);
            }
            stats[rule_index].measures.extend(seen.measures.unwrap_or_default());
        }
        let problem = |message: String| Problem { rule_id: rule.id.clone(), message };
        let decision = match result {
            Ok(Some(d)) => d,
            Ok(None) => return Ok(None),
            Err(Skip::Missing(m)) => {
                out.problems.push(problem(m));
                return Ok(None);
            }
            Err(Skip::State(e @ StateError::DictionaryTooLarge { .. })) => {
                out.problems.push(problem(e.to_string()));
                return Ok(None);
            }
            Err(Skip::State(e)) => return Err(e),
        };
        let mut context = decision.context;
        if let Some(fire) = &rule.fire {
            let state = Value::Object(context);
            if !fire.matches(event, &[("state", &state)]) {
                return Ok(None);
            }
            context = match state {
                Value::Object(m) => m,
                _ => Map::new(),
            };
        }
        if decision.reset {
            cache.update(access.state, key, event.time_ms, &mut |r| {
                *r = Record::default();
                true
            })?;
        }
        Ok(Some(context))
    }
}

/// Counts an alert in its dedup window, opening the window on the first;
/// whether it is the first (else it is suppressed).
fn first_in_window(
    cache: &mut StateCache,
    access: Access,
    rule: &Rule,
    dedup_key: &str,
    now: i64,
) -> Result<bool, StateError> {
    let dedup_state = state::key([DEDUP_PREFIX, &rule.id, dedup_key]);
    let mut seen = false;
    cache.update(access, &dedup_state, now, &mut |r| {
        seen = r.count > 0;
        r.count = r.count.saturating_add(1);
        if !seen {
            r.expires_at_ms = Some(now.saturating_add(rule.dedup_window_ms));
        }
        true
    })?;
    Ok(!seen)
}

fn access(rules: &[Rule]) -> Vec<RuleAccess> {
    rules
        .iter()
        .map(|r| RuleAccess { state: Access::direct_if(r.direct), risk: super::risk_access(rules, &r.entity_type) })
        .collect()
}

/// What each enabled rule of `scope`'s entity type makes of `event`, in
/// rule order. With lanes, another lane's entities are passed over before
/// any condition is evaluated.
fn verdicts<'r>(
    rules: &'r [Rule],
    event: &'r Event,
    scope: Option<Scope<'r>>,
    candidates: &'r [bool],
) -> impl Iterator<Item = (usize, &'r Rule, Verdict)> + 'r {
    rules
        .iter()
        .enumerate()
        .filter(move |(_, r)| r.enabled && Scope::admits_type(scope, r))
        .map(move |(i, rule)| (i, rule, verdict(rule, event, scope, candidates.get(i).copied().unwrap_or(true))))
}

/// The prefilter of every rule (see [`super::sigma::Index`]).
fn index(rules: &[Rule]) -> super::sigma::Index {
    super::sigma::Index::new(rules.iter().map(|r| r.matcher.required()))
}

/// What the rule makes of the event; `candidate` is false when its
/// prefilter rules the event out (it cannot match).
fn verdict(rule: &Rule, event: &Event, scope: Option<Scope<'_>>, candidate: bool) -> Verdict {
    let by_lane = scope.is_some_and(|s| s.lane.is_some());
    let known = by_lane.then(|| rule.entity_key.lookup(&event.value).and_then(id_string));
    if let Some(id) = &known {
        if !Scope::admits_entity(scope, rule, id.as_deref()) {
            return Verdict::Elsewhere;
        }
    }
    if !candidate || !rule.matcher.matches(event, &[]) {
        return Verdict::NoMatch;
    }
    let id = match known {
        Some(id) => id,
        None => rule.entity_key.lookup(&event.value).and_then(id_string),
    };
    let Some(entity_id) = id else {
        return Verdict::Problem(format!("entity key field {} is absent or not a scalar", rule.entity_key));
    };
    if entity_id.len() > MAX_ID_BYTES {
        return Verdict::Problem(format!(
            "entity key field {} is {} bytes, over the {MAX_ID_BYTES}-byte limit of an id in a state key",
            rule.entity_key,
            entity_id.len()
        ));
    }
    if !Scope::admits_entity(scope, rule, Some(&entity_id)) {
        return Verdict::OutOfScope;
    }
    if rule.group.is_empty() {
        return Verdict::Match(Target { entity: entity_id, group: None });
    }
    // The group's name: the entity id and each further group-by value,
    // joined by the unit separator (no id or value is taken for another).
    let mut group = entity_id.clone();
    for path in &rule.group {
        match path.lookup(&event.value).and_then(id_string) {
            Some(v) => {
                group.push('\u{1f}');
                group.push_str(&v);
            }
            None => return Verdict::Problem(format!("group-by field {path} is absent or not a scalar")),
        }
    }
    if group.len() > MAX_ID_BYTES {
        return Verdict::Problem(format!(
            "the group-by fields' values are {} bytes, over the {MAX_ID_BYTES}-byte limit of an id in a state key",
            group.len()
        ));
    }
    Verdict::Match(Target { entity: entity_id, group: Some(group) })
}

fn rule_metrics(rules: &[Rule]) -> Vec<RuleMetrics> {
    let m = metrics();
    rules
        .iter()
        .map(|r| RuleMetrics {
            evaluations: m.rule_evaluations.with_label_values(&[r.id.as_str()]),
            matches: m.rule_matches.with_label_values(&[r.id.as_str()]),
            seconds: m.rule_seconds.with_label_values(&[r.id.as_str()]),
        })
        .collect()
}

/// Appends to `out` the keys a matching rule needs for this entity (its
/// state, its dedup window, its entity's risk) that the cache lacks; `scratch`
/// builds them, so only missing keys are allocated.
fn needed_keys(
    cache: &mut StateCache,
    scratch: &mut String,
    rule: &Rule,
    access: RuleAccess,
    target: &Target,
    event: &Value,
    out: &mut Vec<String>,
) {
    let (entity_id, state_id) = (target.entity.as_str(), target.state());
    let mut need = |scratch: &mut String| {
        if !cache.is_cached(scratch) {
            out.push(scratch.clone());
        }
    };
    // A direct rule's state and dedup window are read by the store's own
    // update, not the cache; likewise the risk of an entity type with a
    // direct rule.
    let cached = access.state == Access::Cached;
    if cached && !matches!(rule.form, Form::Stateless) {
        join_key(scratch, [&rule.namespace, &rule.entity_type, state_id]);
        need(scratch);
    }
    if !cached {
    } else if rule.dedup_key.is_none() {
        join_key(scratch, [DEDUP_PREFIX, &rule.id, state_id]);
        need(scratch);
    } else if let Some(dedup) = dedup_key(rule, state_id, event) {
        join_key(scratch, [DEDUP_PREFIX, &rule.id, &dedup]);
        need(scratch);
    }
    if rule.risk > 0 && access.risk == Access::Cached {
        join_key(scratch, [RISK_PREFIX, &rule.entity_type, entity_id]);
        need(scratch);
    }
}

/// Longest entity id or dedup key riskd keeps state under: with the rule's
/// namespace and type, a key stays well within every store's limit
/// (DynamoDB's is 2,048 bytes). An event whose id is longer, from a field an
/// attacker may control, is set aside for that rule rather than failing the
/// store.
pub const MAX_ID_BYTES: usize = 1024;

/// The dedup key of a rule's alert on this event, if it can be read (and
/// is not over [`MAX_ID_BYTES`]).
fn dedup_key(rule: &Rule, entity_id: &str, event: &Value) -> Option<String> {
    match &rule.dedup_key {
        None => Some(entity_id.to_string()),
        Some(p) => p.lookup(event).and_then(id_string).filter(|k| k.len() <= MAX_ID_BYTES),
    }
}

fn alert_id(rule: &Rule, entity_id: &str, event: &Event) -> String {
    // serde_json's default map is ordered by key, so this serialization is
    // canonical: the same event gives the same bytes however it was spaced.
    let mut name = format!("{}\0{}\0{}\0{}\0", rule.id, rule.entity_type, entity_id, event.time_ms).into_bytes();
    name.extend(serde_json::to_vec(event.whole()).unwrap_or_default());
    uuid::Uuid::new_v5(&ALERT_NAMESPACE, &name).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::TimeSource;
    use serde_json::json;

    fn rules(yaml: &str) -> Arc<Vec<Rule>> {
        let rules = yaml
            .split("---\n")
            .map(|doc| crate::rules::compile(serde_yaml_ng::from_str(doc).unwrap()).unwrap())
            .collect();
        Arc::new(rules)
    }

    #[test]
    fn a_reload_keeps_the_state_of_unchanged_shapes_and_clears_the_others() {
        let base = "title: t\nseverity: LOW\nentity: {type: user, key: u}\nmatch: 'true'\n";
        let v1 = format!(
            "id: kept\n{base}state: {{count: {{window: 1h, threshold: 100}}}}\n---\nid: reshaped\n{base}state: {{count: {{window: 1h, threshold: 100}}}}\n"
        );
        let v2 = format!(
            "id: kept\n{base}state: {{count: {{window: 2h, threshold: 5}}}}\n---\nid: reshaped\n{base}state: {{distinct: {{field: u, window: 1h, threshold: 100}}}}\n"
        );
        let mut cache = StateCache::new(Box::new(crate::state::MemoryStore::new()), 1000);
        let mut engine = Engine::new(rules(&v1));
        let event = Event::new(json!({"u": "x"}), 0, TimeSource::Event);
        let mut alerts = Vec::new();
        engine.process(&mut cache, &event, None, &mut alerts).unwrap();
        engine.process(&mut cache, &event, None, &mut alerts).unwrap();
        let fresh = engine.set_rules(&mut cache, rules(&v2)).unwrap();
        assert_eq!(fresh, ["reshaped"]);
        assert_eq!(cache.get_counter("kept/user/x", 0).unwrap(), 2);
        assert_eq!(cache.read("reshaped/user/x", 0).unwrap(), None);
    }

    #[test]
    fn an_event_decoded_for_the_rules_before_a_reload_is_taken_again_for_the_new_ones() {
        let v1 = "id: r\ntitle: t\nseverity: LOW\nentity: {type: user, key: u}\nmatch: 'a == \"x\"'\n";
        let v2 =
            "id: r\ntitle: t\nseverity: LOW\nentity: {type: user, key: u}\nmatch: 'b == \"y\"'\ncontext: {c: c.d}\n";
        let line = r#"{"u": "someone", "a": "no", "b": "y", "c": {"d": 5}}"#;
        let (old, new) = (rules(v1), rules(v2));
        let reads = super::super::reads(&old, &[]);
        let event = crate::event::EventTime::new(vec![]).event_of_line(
            reads.take(&crate::event::parse_line(line.as_bytes()).unwrap()),
            line.as_bytes(),
            &reads,
            0,
        );
        assert_eq!(event.value, json!({"u": "someone", "a": "no"}), "only what the old rule reads");
        let mut cache = StateCache::new(Box::new(crate::state::MemoryStore::new()), 1000);
        let mut engine = Engine::new(old);
        let mut alerts = Vec::new();
        engine.process(&mut cache, &event, None, &mut alerts).unwrap();
        assert!(alerts.is_empty());
        engine.set_rules(&mut cache, new).unwrap();
        engine.process(&mut cache, &event, None, &mut alerts).unwrap();
        assert_eq!(alerts.len(), 1, "the new rule reads b, which the event was not decoded with");
        assert_eq!(alerts[0].context["c"], json!(5));
        assert_eq!(alerts[0].event, serde_json::from_str::<Value>(line).unwrap(), "the alert carries the whole event");
    }

    #[test]
    fn lanes_split_the_entities_and_together_do_what_one_engine_does() {
        let base =
            "title: t\nseverity: LOW\nmatch: 'true'\nstate: {count: {window: 1h, threshold: 3, on_fire: reset}}\n";
        let yaml = format!(
            "id: by_user\nentity: {{type: user, key: u}}\n{base}---\nid: by_ip\nentity: {{type: ip, key: ip}}\n{base}"
        );
        let events: Vec<Event> = (0..200)
            .map(|i| {
                let value = if i % 17 == 0 {
                    json!({"ip": "10.0.0.1"})
                } else {
                    json!({"u": format!("u{}", i % 7), "ip": format!("10.0.0.{}", i % 3)})
                };
                Event::new(value, i * 60_000, TimeSource::Event)
            })
            .collect();
        let engine = || {
            let cache = StateCache::new(Box::new(crate::state::MemoryStore::new()), 1000);
            (Engine::new(rules(&yaml)), cache)
        };
        let ((mut one, mut cache), mut alerts_one, mut problems_one) = (engine(), Vec::new(), 0);
        for e in &events {
            problems_one += one.process(&mut cache, e, None, &mut alerts_one).unwrap().problems.len();
        }
        let lanes = 3;
        let (mut alerts_lanes, mut problems_lanes) = (Vec::new(), 0);
        for lane in 0..lanes {
            let (mut engine, mut cache) = engine();
            let scope = Some(Scope { entity: None, lane: Some((lane, lanes)) });
            let mut mine = Vec::new();
            for e in &events {
                problems_lanes += engine.process(&mut cache, e, scope, &mut mine).unwrap().problems.len();
            }
            assert!(
                mine.iter().all(|a: &Alert| lane_of(&a.entity.type_, &a.entity.id, lanes) == lane),
                "a lane only alerts on its own entities"
            );
            alerts_lanes.extend(mine);
        }
        let ids = |alerts: &[Alert]| {
            let mut ids: Vec<String> = alerts.iter().map(|a| a.alert_id.clone()).collect();
            ids.sort();
            ids
        };
        assert!(alerts_one.len() > 20);
        assert_eq!(ids(&alerts_lanes), ids(&alerts_one));
        assert_eq!(problems_lanes, problems_one, "an event lacking the entity field is reported once, by lane 0");
    }

    #[test]
    fn first_seen_re_seeing_a_known_value_within_the_granule_writes_nothing() {
        let yaml = "id: fs\ntitle: t\nseverity: LOW\nentity: {type: user, key: u}\nmatch: 'true'\nstate: {first_seen: {field: ip, ttl: 100s}}\n";
        let at = |ip: &str, time_ms: i64| Event::new(json!({"u": "x", "ip": ip}), time_ms, TimeSource::Event);
        let mut cache = StateCache::new(Box::new(crate::state::MemoryStore::new()), 1000).with_expiry_granule(0.01);
        let mut engine = Engine::new(rules(yaml));
        let mut alerts = Vec::new();
        engine.process(&mut cache, &at("a", 1), None, &mut alerts).unwrap();
        cache.flush(&[]).unwrap();
        // 1% of 100 s is a 1 s step: a known value within the step keeps the expiry.
        engine.process(&mut cache, &at("a", 999), None, &mut alerts).unwrap();
        assert_eq!((cache.dirty_keys(), cache.expires_at("fs/user/x", 999).unwrap()), (0, Some(101_000)));
        // A new value is a change (and fires, writing its dedup window too), granule or not.
        engine.process(&mut cache, &at("b", 999), None, &mut alerts).unwrap();
        assert_eq!(alerts.len(), 1);
        assert_eq!(cache.expires_at("fs/user/x", 999).unwrap(), Some(101_000));
        cache.flush(&[]).unwrap();
        // A known value in the next step pushes the expiry one step on.
        engine.process(&mut cache, &at("a", 1_999), None, &mut alerts).unwrap();
        assert_eq!((cache.dirty_keys(), cache.expires_at("fs/user/x", 1_999).unwrap()), (1, Some(102_000)));
    }
}
