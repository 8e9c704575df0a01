//! What riskd knows about one entity, for `riskd entity` (text or `--json`),
//! `GET /v1/entities/{type}/{id}` and a risk alert's `context.contributions`.
//!
//! The JSON is the serialisation of [`Explanation`]. Its keys come in
//! alphabetical order, as they always have (the JSON used to be built as a
//! `serde_json::Value`, whose objects sort their keys): so the fields of these
//! types are declared in alphabetical order, and the entity is written id
//! first. A unit test holds the serialisation to that order.

use super::risk::{Crossing, Mark};
use super::{risk_key, Contribution, RiskState, ScoringConfig, TypePolicy};
use crate::alert::EntityRef;
use crate::event::format_time_ms;
use crate::rules::Rule;
use crate::state::StateError;
use serde::{Serialize, Serializer};
use serde_json::{Map, Value};
use std::collections::BTreeSet;
use std::fmt;

/// Everything riskd knows about one entity: its score at the latest event
/// time seen (or another), its peak and last crossing, its contributions
/// with their decay, whether it is armed and why, and the raw state of
/// every rule keyed by its type (live or expired).
///
/// Serialises as `riskd entity --json` prints it; [`fmt::Display`] is the
/// text `riskd entity` prints.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Explanation {
    /// Whether crossing the threshold raises an alert (at `now`).
    pub armed: bool,
    /// Why it is armed or not, in words with the numbers.
    pub armed_explained: String,
    /// Contributions at `now`, largest decayed value first.
    pub contributions: Vec<ContributionRow>,
    /// The entity.
    #[serde(serialize_with = "id_first")]
    pub entity: EntityRef,
    /// The policy's half-life, hours.
    pub half_life_hours: f64,
    /// The last crossing of the threshold by `now`, if one is recorded.
    pub last_crossing: Option<CrossingRow>,
    /// The event time the score is at: the latest seen (the store's
    /// watermark or the entity's latest contribution) unless asked for
    /// another, formatted.
    pub now: String,
    /// The highest score reached by `now`.
    pub peak: Option<PeakRow>,
    /// The policy's re-arm score.
    pub rearm_below: f64,
    /// The state of every rule of the entity's type that has any, in rule order.
    pub rule_state: Vec<RuleStateRow>,
    /// The score at `now`, to 3 decimals.
    pub score: f64,
    /// The policy's threshold.
    pub threshold: f64,
}

/// One contribution, decayed to the explanation's time.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct ContributionRow {
    /// The rule alert.
    pub alert_id: String,
    /// Its value now, to 3 decimals.
    pub decayed_points: f64,
    /// Event time of the alert, formatted.
    pub event_time: String,
    /// Points added.
    pub points: f64,
    /// Rule that fired.
    pub rule_id: String,
}

/// The highest score an entity reached, and when.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PeakRow {
    /// Event time, formatted.
    pub at: String,
    /// The score, to 3 decimals.
    pub score: f64,
}

/// A crossing of the threshold.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CrossingRow {
    /// The risk alert raised.
    pub alert_id: String,
    /// Event time, formatted.
    pub at: String,
    /// The score reached, to 3 decimals.
    pub score: f64,
}

/// One state key of a rule for the entity, as stored.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RuleStateRow {
    /// Integer counter.
    pub count: i64,
    /// JSON object, when one is stored.
    pub dict: Option<Map<String, Value>>,
    /// Event time from which the key reads as absent, formatted.
    pub expires_at: Option<String>,
    /// The state key.
    pub key: String,
    /// Whether the key is live at the explanation's time.
    pub live: bool,
    /// The rule keeping it.
    pub rule_id: String,
    /// String set.
    pub set: BTreeSet<String>,
    /// A behaviour rule's state in words (`baseline`, `rare`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
}

/// Writes an entity as `{"id": …, "type": …}`, the order explanations have
/// always had (an alert's entity is written type first).
fn id_first<S: Serializer>(entity: &EntityRef, s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct IdFirst<'a> {
        id: &'a str,
        #[serde(rename = "type")]
        type_: &'a str,
    }
    IdFirst { id: &entity.id, type_: &entity.type_ }.serialize(s)
}

/// Contributions at `now`, largest decayed value first.
pub fn explain_contributions(policy: &TypePolicy, state: &RiskState, now: i64) -> Vec<ContributionRow> {
    let mut rows: Vec<(f64, &Contribution)> = state
        .contributions
        .iter()
        .filter(|c| c.event_time <= now)
        .map(|c| (policy.decayed(c.points, now - c.event_time), c))
        .collect();
    rows.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.alert_id.cmp(&b.1.alert_id)));
    rows.into_iter()
        .map(|(decayed, c)| ContributionRow {
            alert_id: c.alert_id.clone(),
            decayed_points: round3(decayed),
            event_time: format_time_ms(c.event_time),
            points: c.points,
            rule_id: c.rule_id.clone(),
        })
        .collect()
}

/// `x` to 3 decimals, as scores are shown.
pub(super) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Explains `entity` from `store` at event time `at` (default: the latest
/// seen): see [`Explanation`]; `None` when the store holds nothing at all
/// for it (see [`no_state`]). `rules` tell which state keys belong to it.
pub fn explain_entity(
    rules: &[Rule],
    cfg: &ScoringConfig,
    store: &dyn crate::state::Store,
    entity: &EntityRef,
    at: Option<i64>,
) -> Result<Option<Explanation>, StateError> {
    let policy = cfg.policy(&entity.type_);
    let risk = risk_key(entity);
    // (rule id, state key, the rule when the key is its state)
    let mut keys: Vec<(String, String, Option<&Rule>)> = vec![("(risk)".to_string(), risk.clone(), None)];
    for rule in rules.iter().filter(|r| r.entity_type == entity.type_) {
        keys.push((rule.id.clone(), crate::state::key([&rule.namespace, &entity.type_, &entity.id]), Some(rule)));
        keys.push((rule.id.clone(), crate::state::key([crate::state::DEDUP_PREFIX, &rule.id, &entity.id]), None));
    }
    let mut lookup: Vec<&str> = keys.iter().map(|(_, k, _)| k.as_str()).collect();
    lookup.push(crate::state::WATERMARK_KEY);
    let mut records = store.get_many(&lookup)?;
    let watermark = records.pop().flatten().map_or(0, |r| r.count);
    if records.iter().all(Option::is_none) {
        return Ok(None);
    }
    let state = RiskState::from_dict(records[0].as_ref().and_then(|r| r.dict.as_ref()));
    let latest = state.contributions.iter().map(|c| c.event_time).max().unwrap_or(0);
    let now = at.unwrap_or(watermark.max(latest));
    let score = state.score(policy, now);
    let rule_state = keys
        .into_iter()
        .zip(records)
        .skip(1)
        .filter_map(|((rule_id, key, rule), record)| {
            let r = record?;
            let summary = rule.zip(r.dict.as_ref()).and_then(|(rule, d)| crate::rules::describe(&rule.form, d));
            Some(RuleStateRow {
                summary,
                count: r.count,
                expires_at: r.expires_at_ms.map(format_time_ms),
                live: r.is_live(now),
                dict: r.dict,
                key,
                rule_id,
                set: r.set,
            })
        })
        .collect();
    let crossed = state.crossed.as_ref().filter(|c| c.at <= now);
    let (armed, armed_explained) = armed_at(policy, &state, now, score);
    Ok(Some(Explanation {
        armed,
        armed_explained,
        contributions: explain_contributions(policy, &state, now),
        entity: entity.clone(),
        half_life_hours: policy.half_life_hours(),
        last_crossing: crossed.map(|c| CrossingRow {
            alert_id: c.alert_id.clone(),
            at: format_time_ms(c.at),
            score: c.score,
        }),
        now: format_time_ms(now),
        peak: state.peak_by(policy, now).map(|p| PeakRow { at: format_time_ms(p.at), score: p.score }),
        rearm_below: policy.rearm_below,
        rule_state,
        score: round3(score),
        threshold: policy.threshold,
    }))
}

/// Whether the entity is armed at event time `now` (its score there being
/// `score`), and why, in words. The state records the last crossing and the
/// last re-arming; before them, what is not recorded is said to be so.
pub(super) fn armed_at(policy: &TypePolicy, state: &RiskState, now: i64, score: f64) -> (bool, String) {
    let (threshold, rearm) = (number(policy.threshold), number(policy.rearm_below));
    let raises = format!("a score reaching {threshold} raises a risk alert");
    let rearmed = |r: &Mark| {
        format!(
            "armed since {}, when a contribution found the score at {}, below {rearm}; {raises}",
            format_time_ms(r.at),
            number(r.score)
        )
    };
    let disarmed = |c: &Crossing| {
        format!(
            "disarmed since {}, when the score reached {} (risk alert {}); re-arms when a new contribution finds \
             the score below {rearm} (it is {} now)",
            format_time_ms(c.at),
            number(c.score),
            c.alert_id,
            number(round3(score))
        )
    };
    let disarmed_unrecorded = |until: &str| {
        format!(
            "disarmed: it crossed {threshold} before, when is not recorded{until}; re-arms when a new contribution \
             finds the score below {rearm} (it is {} now)",
            number(round3(score))
        )
    };
    let r = state.rearmed.as_ref();
    match state.crossed.as_ref() {
        // Crossed later: armed until then, unless re-armed later still
        // after an earlier crossing.
        Some(c) if c.at > now => match r.filter(|r| r.at > now && r.at <= c.at) {
            Some(r) => (false, disarmed_unrecorded(&format!(" (it re-armed at {})", format_time_ms(r.at)))),
            None => (true, format!("armed: {raises} (it did at {})", format_time_ms(c.at))),
        },
        Some(c) => match r.filter(|r| r.at > c.at) {
            Some(r) if r.at <= now => (true, rearmed(r)),
            _ => (false, disarmed(c)),
        },
        // No crossing recorded (none, or stored before riskd recorded them).
        None => match r {
            Some(r) if r.at <= now => (true, rearmed(r)),
            Some(r) => (false, disarmed_unrecorded(&format!(" (it re-armed at {})", format_time_ms(r.at)))),
            None if state.armed => (true, format!("armed: {raises}")),
            None => (false, disarmed_unrecorded("")),
        },
    }
}

/// What to say of an entity the store holds nothing for: that, and when no
/// rule is keyed by its type, the types the rules are keyed by.
pub fn no_state(rules: &[Rule], entity: &EntityRef) -> String {
    let mut types: Vec<&str> = rules.iter().map(|r| r.entity_type.as_str()).collect();
    types.sort_unstable();
    types.dedup();
    if types.contains(&entity.type_.as_str()) {
        format!("no state for {} {:?}: no rule has kept anything for it, and it has no risk", entity.type_, entity.id)
    } else {
        format!(
            "no state for {} {:?}: no rule is keyed by entity type {:?}; the rules' entity types are {}",
            entity.type_,
            entity.id,
            entity.type_,
            types.join(", ")
        )
    }
}

/// A number as its JSON (`100.0`, `7.75`), as the text has always shown it.
fn number(x: f64) -> String {
    Value::from(x).to_string()
}

/// A set or an object as compact JSON (neither can fail to serialise).
fn compact(v: &impl Serialize) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// The text of `riskd entity`.
impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "entity {} {}", self.entity.type_, self.entity.id)?;
        writeln!(
            f,
            "score  {} at {} (threshold {}, re-arms below {}, half-life {} h)",
            number(self.score),
            self.now,
            number(self.threshold),
            number(self.rearm_below),
            number(self.half_life_hours),
        )?;
        match &self.peak {
            Some(p) => writeln!(f, "peak   {} at {}", number(p.score), p.at)?,
            None => writeln!(f, "peak   none (no contribution)")?,
        }
        match &self.last_crossing {
            Some(c) => writeln!(f, "last crossing at {}: score {}, risk alert {}", c.at, number(c.score), c.alert_id)?,
            None => writeln!(f, "last crossing: none recorded")?,
        }
        writeln!(f, "{}", self.armed_explained)?;
        writeln!(f, "contributions ({}), largest first:", self.contributions.len())?;
        for c in &self.contributions {
            writeln!(
                f,
                "  {:<32} {:>7} pts at {} → {:>9} now  alert {}",
                c.rule_id,
                number(c.points),
                c.event_time,
                number(c.decayed_points),
                c.alert_id
            )?;
        }
        writeln!(f, "rule state ({} keys):", self.rule_state.len())?;
        for r in &self.rule_state {
            writeln!(f, "  {r}")?;
        }
        Ok(())
    }
}

/// One line of the rule state: key, rule, the values it holds, expiry.
impl fmt::Display for RuleStateRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut values = Vec::new();
        if self.count != 0 {
            values.push(format!("count={}", self.count));
        }
        if !self.set.is_empty() {
            values.push(format!("set={}", compact(&self.set)));
        }
        if let Some(dict) = &self.dict {
            values.push(format!("dict={}", compact(dict)));
        }
        let expiry = match (&self.expires_at, self.live) {
            (None, _) => "no expiry".to_string(),
            (Some(at), true) => format!("expires {at}"),
            (Some(at), false) => format!("EXPIRED at {at} (reads as empty)"),
        };
        write!(f, "{}  [{}]  {}  {}", self.key, self.rule_id, values.join(" "), expiry)?;
        if let Some(summary) = &self.summary {
            write!(f, "\n      {summary}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn explanation() -> Explanation {
        let row = |rule_id: &str, key: &str| RuleStateRow {
            count: 0,
            dict: None,
            expires_at: None,
            key: key.into(),
            live: true,
            rule_id: rule_id.into(),
            set: BTreeSet::new(),
            summary: None,
        };
        let dict: Map<String, Value> = serde_json::from_str(r#"{"lat":-33.8688,"city":"Sydney"}"#).unwrap();
        Explanation {
            armed: false,
            armed_explained: "disarmed since …".into(),
            contributions: vec![ContributionRow {
                alert_id: "a-1".into(),
                decayed_points: 31.016,
                event_time: "2024-03-01T10:00:00.000Z".into(),
                points: 40.0,
                rule_id: "travel".into(),
            }],
            entity: EntityRef { type_: "user".into(), id: "trudy@example.com".into() },
            half_life_hours: 24.0,
            last_crossing: Some(CrossingRow {
                alert_id: "r-1".into(),
                at: "2024-03-01T10:00:00.000Z".into(),
                score: 103.731,
            }),
            now: "2024-04-01T00:00:00.000Z".into(),
            peak: Some(PeakRow { at: "2024-03-01T10:00:00.000Z".into(), score: 143.731 }),
            rearm_below: 50.0,
            rule_state: vec![
                RuleStateRow {
                    count: 3,
                    expires_at: Some("2024-03-01T11:00:00.000Z".into()),
                    live: false,
                    ..row("travel", "k1")
                },
                RuleStateRow {
                    set: ["b".to_string(), "a".to_string()].into(),
                    expires_at: Some("2024-04-02T00:00:00.000Z".into()),
                    ..row("spray", "k2")
                },
                RuleStateRow { dict: Some(dict), ..row("travel", "k3") },
            ],
            score: 105.0,
            threshold: 100.0,
        }
    }

    #[test]
    fn json_keys_come_in_the_order_they_always_had() {
        // The JSON was built as a `serde_json::Value`, whose objects sort their keys.
        let x = explanation();
        let value = serde_json::to_value(&x).unwrap();
        assert_eq!(serde_json::to_string(&x).unwrap(), value.to_string());
        assert_eq!(serde_json::to_string_pretty(&x).unwrap(), format!("{value:#}"));
        assert_eq!(value["entity"], serde_json::json!({"type": "user", "id": "trudy@example.com"}));
        assert_eq!(value["rule_state"][0]["dict"], Value::Null, "every key is written, empty or not");
    }

    /// Words for an entity at `now`, scored `score`, of `state`.
    fn words(state: &RiskState, now: i64) -> (bool, String) {
        let policy = ScoringConfig::default();
        let policy = policy.policy("user");
        armed_at(policy, state, now, state.score(policy, now))
    }

    #[test]
    fn armed_or_not_is_said_in_words_at_any_time() {
        let h = 3_600_000;
        let crossed = Crossing { score: 103.7, at: 10 * h, alert_id: "r-1".into() };
        let disarmed = RiskState { armed: false, crossed: Some(crossed.clone()), ..RiskState::default() };
        let (armed, text) = words(&disarmed, 20 * h);
        assert!(!armed);
        assert_eq!(
            text,
            "disarmed since 1970-01-01T10:00:00.000Z, when the score reached 103.7 (risk alert r-1); re-arms when a \
             new contribution finds the score below 50.0 (it is 0.0 now)"
        );
        // Before the crossing it was armed.
        let (armed, text) = words(&disarmed, 5 * h);
        assert!(armed);
        assert_eq!(text, "armed: a score reaching 100.0 raises a risk alert (it did at 1970-01-01T10:00:00.000Z)");
        // Re-armed after it: armed since then; between the two, disarmed.
        let rearmed = RiskState { armed: true, rearmed: Some(Mark { score: 12.5, at: 30 * h }), ..disarmed.clone() };
        let (armed, text) = words(&rearmed, 31 * h);
        assert!(armed);
        assert_eq!(
            text,
            "armed since 1970-01-02T06:00:00.000Z, when a contribution found the score at 12.5, below 50.0; a score \
             reaching 100.0 raises a risk alert"
        );
        assert!(!words(&rearmed, 20 * h).0);
        // Never crossed; and a state stored before crossings were recorded.
        assert_eq!(words(&RiskState::default(), h), (true, "armed: a score reaching 100.0 raises a risk alert".into()));
        let old = RiskState { armed: false, ..RiskState::default() };
        let (armed, text) = words(&old, h);
        assert!(!armed);
        assert!(text.starts_with("disarmed: it crossed 100.0 before, when is not recorded;"), "{text}");
    }

    #[test]
    fn text_shows_score_contributions_and_rule_state() {
        let text = explanation().to_string();
        let expected = "entity user trudy@example.com
score  105.0 at 2024-04-01T00:00:00.000Z (threshold 100.0, re-arms below 50.0, half-life 24.0 h)
peak   143.731 at 2024-03-01T10:00:00.000Z
last crossing at 2024-03-01T10:00:00.000Z: score 103.731, risk alert r-1
disarmed since …
contributions (1), largest first:
  travel                              40.0 pts at 2024-03-01T10:00:00.000Z →    31.016 now  alert a-1
rule state (3 keys):
  k1  [travel]  count=3  EXPIRED at 2024-03-01T11:00:00.000Z (reads as empty)
  k2  [spray]  set=[\"a\",\"b\"]  expires 2024-04-02T00:00:00.000Z
  k3  [travel]  dict={\"city\":\"Sydney\",\"lat\":-33.8688}  no expiry
";
        assert_eq!(text, expected);
    }
}
