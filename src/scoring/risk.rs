//! An entity's risk: its contributions as stored, adding one (capped,
//! decayed, multiplied by modifiers), and the risk alert raised when the score
//! crosses the threshold.

use super::explain::{explain_contributions, round3};
use super::{ScoringConfig, TypePolicy, RISK_RULE_ID};
use crate::alert::{Alert, EntityRef};
use crate::event::format_time_ms;
use crate::state::{check_dict_size, Access, StateCache, StateError};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// Namespace of risk alert ids.
const RISK_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x1f3e_77a0_2b9c_4d61_8e05_94c2_d3a8_6b10);

/// One rule alert's share of an entity's risk, as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Contribution {
    /// Rule that fired.
    pub rule_id: String,
    /// Points added (after modifiers).
    pub points: f64,
    /// Event time of the alert (ms).
    pub event_time: i64,
    /// The rule alert.
    pub alert_id: String,
}

/// An entity's risk state, kept as the dictionary of its risk key.
///
/// `peak`, `crossed` and `rearmed` came later than the rest: a state
/// stored without them reads as having none (and they are written only once
/// they have a value, so an entity that never crossed stores no more than it did).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RiskState {
    /// Whether crossing the threshold raises an alert.
    pub armed: bool,
    /// Contributions not yet decayed below the floor.
    pub contributions: Vec<Contribution>,
    /// The highest score reached (the score peaks at a contribution).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak: Option<Mark>,
    /// The last time the score crossed the threshold while armed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crossed: Option<Crossing>,
    /// The last time a contribution found the score below `rearm_below`
    /// and re-armed the entity (the score it found).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rearmed: Option<Mark>,
}

/// A score at an event time (ms).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mark {
    /// The score, to 3 decimals.
    pub score: f64,
    /// Event time (ms).
    pub at: i64,
}

/// A crossing of the threshold: when, the score reached, the risk alert raised.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Crossing {
    /// The score reached, to 3 decimals.
    pub score: f64,
    /// Event time (ms).
    pub at: i64,
    /// The risk alert raised.
    pub alert_id: String,
}

impl Default for RiskState {
    fn default() -> Self {
        Self { armed: true, contributions: Vec::new(), peak: None, crossed: None, rearmed: None }
    }
}

impl RiskState {
    /// Score at event time `now`.
    pub fn score(&self, policy: &TypePolicy, now: i64) -> f64 {
        // `+ 0.0`: an empty f64 sum is -0.0.
        self.contributions
            .iter()
            .filter(|c| c.event_time <= now)
            .map(|c| policy.decayed(c.points, now - c.event_time))
            .sum::<f64>()
            + 0.0
    }

    /// The highest score reached by event time `now`: the stored peak if it
    /// is that old, or the highest the contributions kept reach at their
    /// own times (those decayed below the floor are gone, so for a state
    /// stored without a peak this may be lower than the score really was).
    pub fn peak_by(&self, policy: &TypePolicy, now: i64) -> Option<Mark> {
        self.highest(policy, self.peak.filter(|p| p.at <= now), |t| t <= now)
    }

    /// The highest of `stored` and the scores at the times of the
    /// contributions `counted` picks (the score peaks at a contribution).
    fn highest(&self, policy: &TypePolicy, stored: Option<Mark>, counted: impl Fn(i64) -> bool) -> Option<Mark> {
        let reached = self
            .contributions
            .iter()
            .filter(|c| counted(c.event_time))
            .map(|c| Mark { score: round3(self.score(policy, c.event_time)), at: c.event_time });
        stored.into_iter().chain(reached).reduce(|a, b| if b.score > a.score { b } else { a })
    }

    pub(super) fn from_dict(dict: Option<&Map<String, Value>>) -> Self {
        dict.and_then(|d| serde_json::from_value(Value::Object(d.clone())).ok()).unwrap_or_default()
    }

    fn to_dict(&self) -> Map<String, Value> {
        match serde_json::to_value(self) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        }
    }
}

/// The state key of an entity's risk.
pub fn risk_key(entity: &EntityRef) -> String {
    crate::state::key([crate::state::RISK_PREFIX, &entity.type_, &entity.id])
}

/// What a contribution did.
#[derive(Debug, PartialEq)]
pub enum Scored {
    /// Added; the score is now this.
    Added(f64),
    /// The rule already contributed `risk_cap` times within one half-life.
    Capped,
    /// Zero points (no risk, or a ×0 modifier).
    Nothing,
}

/// The rule behind a contribution: what scoring needs of it.
#[derive(Clone, Copy, Debug)]
pub struct RiskSource<'a> {
    /// The rule's id.
    pub rule_id: &'a str,
    /// Its risk points per alert.
    pub risk: u32,
    /// At most this many contributions of the rule per entity within one half-life.
    pub cap: Option<u32>,
}

/// Adds `alert`'s risk to its entity; returns what happened, and a risk
/// alert when the score crosses the threshold while armed. `access` says
/// whether the entity's risk is changed in the cache or in one atomic store
/// update (its type has a rule whose keys are written from many places).
pub fn contribute(
    cfg: &ScoringConfig,
    cache: &mut StateCache,
    access: Access,
    source: &RiskSource<'_>,
    alert: &Alert,
    event: &Value,
    now: i64,
) -> Result<(Scored, Option<Alert>), StateError> {
    let points = f64::from(source.risk) * cfg.multiplier(&alert.entity);
    if points <= 0.0 {
        return Ok((Scored::Nothing, None));
    }
    let key = risk_key(&alert.entity);
    let mut change = Err(StateError::Backend { store: "scoring", message: "risk update did not run".into() });
    cache.update(access, &key, now, &mut |r| {
        change = add(cfg, source, alert, event, now, points, &key, r.dict.as_ref());
        // The new dictionary moves into the record; the rest of `change` stays.
        let dict = change.as_mut().ok().and_then(|c| c.dict.take());
        let changed = dict.is_some();
        if changed {
            r.dict = dict;
        }
        changed
    })?;
    let change = change?;
    // Metrics once the change is made (a store update may run `add` twice).
    let m = crate::telemetry::metrics();
    let t = alert.entity.type_.as_str();
    if change.rearmed {
        m.entities_at_risk.with_label_values(&[t]).dec();
    }
    match change.scored {
        Scored::Capped => m.risk_contributions.with_label_values(&[t, "capped"]).inc(),
        Scored::Added(score) => {
            m.risk_contributions.with_label_values(&[t, "added"]).inc();
            if change.risk_alert.is_some() {
                m.entities_at_risk.with_label_values(&[t]).inc();
                m.risk_score_at_alert.with_label_values(&[t]).observe(score);
            }
        }
        Scored::Nothing => {}
    }
    Ok((change.scored, change.risk_alert))
}

/// What adding a contribution does to an entity's risk.
struct Change {
    scored: Scored,
    risk_alert: Option<Alert>,
    /// The entity re-armed (its score had fallen below `rearm_below`).
    rearmed: bool,
    /// The new risk dictionary, taken by the caller to store; `None` when
    /// nothing changes.
    dict: Option<serde_json::Map<String, Value>>,
}

/// Most contributions an entity's risk keeps: beyond, the oldest are merged
/// into one, so that its record stays bounded (about 60 KB, well within a
/// DynamoDB item) whatever the rate of alerts about the entity, which an
/// attacker may drive.
pub const MAX_CONTRIBUTIONS: usize = 500;

/// The rule id of a contribution that holds several older ones, merged.
pub const MERGED: &str = "riskd_merged";

/// Merges the oldest past contributions into one, leaving room for one
/// more under [`MAX_CONTRIBUTIONS`]. Exact for every later score: decay is
/// exponential, so the merged contributions are worth at the newest one's
/// time their sum decayed to it, and decay together from there.
fn merge_oldest(state: &mut RiskState, policy: &TypePolicy, now: i64) {
    let excess = (state.contributions.len() + 1).saturating_sub(MAX_CONTRIBUTIONS);
    if excess == 0 {
        return;
    }
    let mut past: Vec<usize> =
        (0..state.contributions.len()).filter(|&i| state.contributions[i].event_time <= now).collect();
    past.sort_by_key(|&i| state.contributions[i].event_time);
    past.truncate(excess + 1);
    if past.len() < 2 {
        return;
    }
    let at = past.iter().map(|&i| state.contributions[i].event_time).max().unwrap_or(now);
    let points = past
        .iter()
        .map(|&i| policy.decayed(state.contributions[i].points, at - state.contributions[i].event_time))
        .sum();
    past.sort_unstable_by(|a, b| b.cmp(a));
    for i in past {
        state.contributions.remove(i);
    }
    state.contributions.push(Contribution {
        rule_id: MERGED.to_string(),
        points,
        event_time: at,
        alert_id: String::new(),
    });
}

/// Adds `points` to the risk held in `dict` (pure: the caller stores the result).
#[allow(clippy::too_many_arguments)]
fn add(
    cfg: &ScoringConfig,
    source: &RiskSource<'_>,
    alert: &Alert,
    event: &Value,
    now: i64,
    points: f64,
    key: &str,
    dict: Option<&serde_json::Map<String, Value>>,
) -> Result<Change, StateError> {
    let policy = cfg.policy(&alert.entity.type_);
    let mut state = RiskState::from_dict(dict);
    if let Some(cap) = source.cap {
        let recent = state
            .contributions
            .iter()
            .filter(|c| c.rule_id == source.rule_id && c.event_time <= now && now - c.event_time < policy.half_life_ms)
            .count();
        if recent >= cap as usize {
            return Ok(Change { scored: Scored::Capped, risk_alert: None, rearmed: false, dict: None });
        }
    }
    // Contributions that have decayed to nothing are dropped, so state stays bounded.
    state.contributions.retain(|c| c.event_time > now || policy.decayed(c.points, now - c.event_time) >= cfg.floor);
    let before = state.score(policy, now);
    // A late contribution, older than the last crossing, cannot re-arm:
    // what it finds is the score before the crossing.
    let after_crossing = state.crossed.as_ref().is_none_or(|c| now >= c.at);
    let rearmed = !state.armed && after_crossing && before < policy.rearm_below;
    if rearmed {
        state.armed = true;
        state.rearmed = Some(Mark { score: round3(before), at: now });
    }
    merge_oldest(&mut state, policy, now);
    state.contributions.push(Contribution {
        rule_id: source.rule_id.to_string(),
        points,
        event_time: now,
        alert_id: alert.alert_id.clone(),
    });
    let score = before + points;
    // The score at this contribution, and (were it late) at every later one.
    state.peak = state.highest(policy, state.peak, |t| t >= now);
    let mut risk_alert = None;
    if state.armed && score >= policy.threshold {
        state.armed = false;
        let raised = risk_alert_for(policy, &state, alert, event, score, now);
        state.crossed = Some(Crossing { score: round3(score), at: now, alert_id: raised.alert_id.clone() });
        risk_alert = Some(raised);
    }
    let dict = state.to_dict();
    check_dict_size(key, &dict)?;
    Ok(Change { scored: Scored::Added(score), risk_alert, rearmed, dict: Some(dict) })
}

/// The risk alert for `trigger` taking the score to `score`.
fn risk_alert_for(
    policy: &TypePolicy,
    state: &RiskState,
    trigger: &Alert,
    event: &Value,
    score: f64,
    now: i64,
) -> Alert {
    let name = format!("{}\0{}\0{}\0{}", trigger.entity.type_, trigger.entity.id, now, trigger.alert_id);
    let context = json!({
        "score": round3(score),
        "threshold": policy.threshold,
        "rearm_below": policy.rearm_below,
        "half_life_hours": policy.half_life_hours(),
        "triggered_by": trigger.alert_id,
        "contributions": explain_contributions(policy, state, now),
    });
    Alert {
        alert_id: uuid::Uuid::new_v5(&RISK_NAMESPACE, name.as_bytes()).to_string(),
        rule_id: RISK_RULE_ID.to_string(),
        title: format!("Risk of {} {} crossed {}", trigger.entity.type_, trigger.entity.id, policy.threshold),
        severity: policy.severity(score),
        entity: trigger.entity.clone(),
        event_time: format_time_ms(now),
        event_time_source: trigger.event_time_source,
        risk: 0,
        dedup_key: trigger.entity.id.clone(),
        context,
        event: event.clone(),
    }
}

/// An entity's risk state as stored (default when none).
pub fn load(cache: &mut StateCache, entity: &EntityRef, now: i64) -> Result<RiskState, StateError> {
    Ok(RiskState::from_dict(cache.read(&risk_key(entity), now)?.and_then(|r| r.dict.as_ref())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alert::Severity;
    use crate::rules::{compile, Rule, RuleSpec};
    use crate::scoring::Modifier;
    use crate::state::MemoryStore;

    const H: i64 = 3_600_000;

    fn rule(id: &str, risk: u32, cap: Option<u32>) -> Rule {
        let mut yaml =
            format!("id: {id}\ntitle: t\nseverity: LOW\nrisk: {risk}\nentity: {{type: user, key: u}}\nmatch: 'true'\n");
        if let Some(cap) = cap {
            yaml.push_str(&format!("risk_cap: {cap}\n"));
        }
        let spec: RuleSpec = serde_yaml_ng::from_str(&yaml).unwrap();
        compile(spec).unwrap()
    }

    fn alert(rule: &Rule, user: &str, n: u32) -> Alert {
        Alert {
            alert_id: format!("{}-{n}", rule.id),
            rule_id: rule.id.clone(),
            title: String::new(),
            severity: Severity::Low,
            entity: EntityRef { type_: "user".into(), id: user.into() },
            event_time: String::new(),
            event_time_source: crate::event::TimeSource::Event,
            risk: rule.risk,
            dedup_key: user.into(),
            context: Value::Null,
            event: Value::Null,
        }
    }

    struct Bench {
        cfg: ScoringConfig,
        cache: StateCache,
        n: u32,
        risk_alerts: Vec<Alert>,
        /// Change risk directly in the store, not in the cache.
        direct: bool,
    }

    impl Bench {
        fn new(cfg: ScoringConfig) -> Self {
            let cache = StateCache::new(Box::new(MemoryStore::new()), 1000);
            Self { cfg, cache, n: 0, risk_alerts: Vec::new(), direct: false }
        }
        fn direct(cfg: ScoringConfig) -> Self {
            Self { direct: true, ..Self::new(cfg) }
        }
        fn hit(&mut self, rule: &Rule, user: &str, t: i64) -> Scored {
            self.n += 1;
            let a = alert(rule, user, self.n);
            let source = RiskSource { rule_id: &rule.id, risk: rule.risk, cap: rule.risk_cap };
            let access = Access::direct_if(self.direct);
            let (scored, risk) = contribute(&self.cfg, &mut self.cache, access, &source, &a, &Value::Null, t).unwrap();
            self.risk_alerts.extend(risk);
            scored
        }
        fn score(&mut self, user: &str, t: i64) -> f64 {
            let e = EntityRef { type_: "user".into(), id: user.into() };
            let state = load(&mut self.cache, &e, t).unwrap();
            state.score(self.cfg.policy("user"), t)
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn decays_by_half_at_each_half_life() {
        let r = rule("r", 80, None);
        let mut b = Bench::new(ScoringConfig::default());
        assert_eq!(b.hit(&r, "u", 0), Scored::Added(80.0));
        assert!(close(b.score("u", 24 * H), 40.0));
        assert!(close(b.score("u", 48 * H), 20.0));
        assert!(close(b.score("u", -1), 0.0), "a contribution counts from its own time on");
    }

    #[test]
    fn crossing_alerts_once_then_rearms_below_half_and_alerts_again() {
        let r = rule("r", 60, None);
        let mut b = Bench::new(ScoringConfig::default());
        b.hit(&r, "u", 0); // 60
        assert!(b.risk_alerts.is_empty());
        b.hit(&r, "u", H); // ~118.3: crosses
        assert_eq!(b.risk_alerts.len(), 1);
        let first = &b.risk_alerts[0];
        assert_eq!((first.rule_id.as_str(), first.entity.id.as_str()), ("entity_risk", "u"));
        assert_eq!(first.risk, 0);
        b.hit(&r, "u", 2 * H); // still above: no second alert
        assert_eq!(b.risk_alerts.len(), 1);
        // ≈ 175 at 2 h.
        b.hit(&r, "u", 2 * H + 30 * H); // score before ≈ 74: not below 50, stays disarmed
        assert_eq!(b.risk_alerts.len(), 1);
        b.hit(&r, "u", 2 * H + 30 * H + 48 * H); // before ≈ 33 < 50: re-arms; ≈ 93 < 100
        assert_eq!(b.risk_alerts.len(), 1);
        b.hit(&r, "u", 2 * H + 30 * H + 48 * H + 1); // ≈ 152: crosses again
        assert_eq!(b.risk_alerts.len(), 2);
    }

    #[test]
    fn peak_crossing_and_rearming_are_kept() {
        let r = rule("r", 60, None);
        let mut b = Bench::new(ScoringConfig::default());
        let e = EntityRef { type_: "user".into(), id: "u".into() };
        b.hit(&r, "u", 10 * H); // 60
        b.hit(&r, "u", 11 * H); // ≈ 118.3: crosses
        let state = load(&mut b.cache, &e, 11 * H).unwrap();
        let crossed = state.crossed.clone().unwrap();
        assert_eq!((crossed.at, crossed.alert_id.as_str()), (11 * H, b.risk_alerts[0].alert_id.as_str()));
        assert!((crossed.score - 118.29).abs() < 0.01, "{crossed:?}");
        assert_eq!(state.peak.map(|p| p.at), Some(11 * H));
        // A late contribution (before the peak) raises the score at the peak
        // too; finding the score at its time under 50, it does not re-arm.
        b.hit(&r, "u", 9 * H);
        let state = load(&mut b.cache, &e, 11 * H).unwrap();
        let peak = state.peak.unwrap();
        assert_eq!(peak.at, 11 * H);
        assert!(close(peak.score, round3(state.score(b.cfg.policy("user"), 11 * H))), "{peak:?}");
        assert!(peak.score > 170.0);
        assert_eq!((state.rearmed, state.armed), (None, false));
        // Three days on the score is ≈ 22: the next contribution re-arms.
        b.hit(&r, "u", 11 * H + 72 * H);
        let state = load(&mut b.cache, &e, 11 * H + 72 * H).unwrap();
        let rearmed = state.rearmed.unwrap();
        assert_eq!(rearmed.at, 11 * H + 72 * H);
        assert!(rearmed.score < 50.0);
        assert_eq!(state.peak.unwrap(), peak, "the peak stays");
        // A state stored before these were kept reads as having none, and
        // its peak is found from the contributions kept.
        let old: Map<String, Value> = serde_json::from_str(
            r#"{"armed":false,"contributions":[{"rule_id":"r","points":60.0,"event_time":0,"alert_id":"a"}]}"#,
        )
        .unwrap();
        let old = RiskState::from_dict(Some(&old));
        assert_eq!((old.crossed.clone(), old.rearmed), (None, None));
        assert_eq!(old.peak_by(b.cfg.policy("user"), H), Some(Mark { score: 60.0, at: 0 }));
        assert_eq!(old.to_dict().len(), 2, "nothing is written for what is not known");
    }

    #[test]
    fn direct_risk_changes_the_store_as_the_cache_would() {
        let r = rule("r", 60, Some(3));
        let (mut cached, mut direct) = (Bench::new(ScoringConfig::default()), Bench::direct(ScoringConfig::default()));
        let times = [0, H, 2 * H, 2 * H + 1, 32 * H, 80 * H, 80 * H + 1];
        for t in times {
            assert_eq!(cached.hit(&r, "u", t), direct.hit(&r, "u", t), "at {t}");
        }
        assert_eq!(cached.risk_alerts.len(), 2);
        let ids = |b: &Bench| b.risk_alerts.iter().map(|a| a.alert_id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&cached), ids(&direct));
        assert_eq!(direct.cache.dirty_keys(), 0, "nothing went through the cache");
        let key = risk_key(&EntityRef { type_: "user".into(), id: "u".into() });
        cached.cache.flush(&[]).unwrap();
        let stored = |b: &Bench| b.cache.store().get_many(&[&key]).unwrap().pop().flatten();
        assert_eq!(stored(&cached), stored(&direct));
    }

    #[test]
    fn risk_alert_explains_the_score_largest_first() {
        let small = rule("small", 30, None);
        let big = rule("big", 90, None);
        let mut b = Bench::new(ScoringConfig::default());
        b.hit(&small, "u", 0);
        b.hit(&big, "u", 24 * H);
        let a = &b.risk_alerts[0];
        let rows = a.context["contributions"].as_array().unwrap();
        assert_eq!(rows[0]["rule_id"], "big");
        assert_eq!(rows[1]["rule_id"], "small");
        assert_eq!(rows[1]["decayed_points"], 15.0);
        let sum: f64 = rows.iter().map(|r| r["decayed_points"].as_f64().unwrap()).sum();
        assert!(close(sum, a.context["score"].as_f64().unwrap()));
        assert_eq!(a.context["score"], 105.0);
        assert_eq!(a.severity, Severity::Medium);
    }

    #[test]
    fn cap_limits_contributions_per_half_life() {
        let r = rule("r", 10, Some(2));
        let mut b = Bench::new(ScoringConfig::default());
        assert_eq!(b.hit(&r, "u", 0), Scored::Added(10.0));
        assert!(matches!(b.hit(&r, "u", H), Scored::Added(_)));
        assert_eq!(b.hit(&r, "u", 2 * H), Scored::Capped);
        assert!(matches!(b.hit(&r, "u", 24 * H), Scored::Added(_)), "the first left the half-life window");
    }

    #[test]
    fn modifiers_multiply_points() {
        let mut cfg = ScoringConfig::default();
        let glob = |p: &str| globset::GlobSet::builder().add(globset::Glob::new(p).unwrap()).build().unwrap();
        cfg.modifiers.push(Modifier { entity_type: Some("user".into()), ids: glob("admin-*"), multiply: 2.0 });
        cfg.modifiers.push(Modifier { entity_type: None, ids: glob("scanner"), multiply: 0.0 });
        let r = rule("r", 30, None);
        let mut b = Bench::new(cfg);
        assert_eq!(b.hit(&r, "admin-bob", 0), Scored::Added(60.0));
        assert_eq!(b.hit(&r, "scanner", 0), Scored::Nothing);
        assert_eq!(b.hit(&r, "carol", 0), Scored::Added(30.0));
    }

    #[test]
    fn a_flood_of_alerts_keeps_a_bounded_record_and_the_exact_score() {
        let r = rule("r", 10, None);
        let mut b = Bench::new(ScoringConfig::default());
        let minute = 60_000;
        for i in 0..2_000 {
            b.hit(&r, "u", i * minute);
        }
        let now = 1_999 * minute;
        let e = EntityRef { type_: "user".into(), id: "u".into() };
        let state = load(&mut b.cache, &e, now).unwrap();
        assert!(state.contributions.len() <= MAX_CONTRIBUTIONS, "{}", state.contributions.len());
        assert_eq!(state.contributions.iter().filter(|c| c.rule_id == MERGED).count(), 1);
        // None has decayed below the floor in 33 hours: every alert counts.
        let policy = b.cfg.policy("user").clone();
        let later = now + 30 * H;
        for t in [now, later] {
            // And later, decayed together.
            let exact: f64 = (0..2_000).map(|i| policy.decayed(10.0, t - i * minute)).sum();
            let score = b.score("u", t);
            assert!((score - exact).abs() < 1e-6 * exact, "at {t}: {score} vs {exact}");
        }
    }

    #[test]
    fn decayed_contributions_are_dropped() {
        let r = rule("r", 10, None);
        let mut b = Bench::new(ScoringConfig::default());
        b.hit(&r, "u", 0);
        // 10 points fall under the 0.5 floor after log2(20) ≈ 4.3 half-lives.
        b.hit(&r, "u", 5 * 24 * H);
        let e = EntityRef { type_: "user".into(), id: "u".into() };
        assert_eq!(load(&mut b.cache, &e, 5 * 24 * H).unwrap().contributions.len(), 1);
    }
}
