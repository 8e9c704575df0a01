//! What riskd knows about one entity, for `riskd entity` (text or `--json`),
//! `GET /v1/entities/{type}/{id}` and a risk alert's `context.contributions`.
//!
//! The JSON is the serialisation of [`Explanation`]. Its keys come in
//! alphabetical order, as they always have (the JSON used to be built as a
//! `serde_json::Value`, whose objects sort their keys): so the fields of these
//! types are declared in alphabetical order, and the entity is written id
//! first. A unit test holds the serialisation to that order.

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
/// time seen, its contributions with their decay, whether it is armed, and
/// the raw state of every rule keyed by its type (live or expired).
///
/// Serialises as `riskd entity --json` prints it; [`fmt::Display`] is the
/// text `riskd entity` prints.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Explanation {
    /// Whether crossing the threshold raises an alert.
    pub armed: bool,
    /// Contributions at `now`, largest decayed value first.
    pub contributions: Vec<ContributionRow>,
    /// The entity.
    #[serde(serialize_with = "id_first")]
    pub entity: EntityRef,
    /// The policy's half-life, hours.
    pub half_life_hours: f64,
    /// The event time the score is at: the latest seen (the store's
    /// watermark or the entity's latest contribution), formatted.
    pub now: String,
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
#[derive(Clone, Debug, PartialEq, Serialize)]
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

/// Explains `entity` from `store`: see [`Explanation`]. `rules` tell which
/// state keys belong to the entity.
pub fn explain_entity(
    rules: &[Rule],
    cfg: &ScoringConfig,
    store: &dyn crate::state::Store,
    entity: &EntityRef,
) -> Result<Explanation, StateError> {
    let policy = cfg.policy(&entity.type_);
    let risk = risk_key(entity);
    let mut keys: Vec<(String, String)> = vec![("(risk)".to_string(), risk.clone())];
    for rule in rules.iter().filter(|r| r.entity_type == entity.type_) {
        keys.push((rule.id.clone(), crate::state::key([&rule.namespace, &entity.type_, &entity.id])));
        keys.push((rule.id.clone(), crate::state::key([crate::state::DEDUP_PREFIX, &rule.id, &entity.id])));
    }
    let mut lookup: Vec<&str> = keys.iter().map(|(_, k)| k.as_str()).collect();
    lookup.push(crate::state::WATERMARK_KEY);
    let mut records = store.get_many(&lookup)?;
    let watermark = records.pop().flatten().map_or(0, |r| r.count);
    let state = RiskState::from_dict(records[0].as_ref().and_then(|r| r.dict.as_ref()));
    let latest = state.contributions.iter().map(|c| c.event_time).max().unwrap_or(0);
    let now = watermark.max(latest);
    let score = state.score(policy, now);
    let rule_state = keys
        .into_iter()
        .zip(records)
        .skip(1)
        .filter_map(|((rule_id, key), record)| {
            let r = record?;
            Some(RuleStateRow {
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
    Ok(Explanation {
        armed: state.armed,
        contributions: explain_contributions(policy, &state, now),
        entity: entity.clone(),
        half_life_hours: policy.half_life_hours(),
        now: format_time_ms(now),
        rearm_below: policy.rearm_below,
        rule_state,
        score: round3(score),
        threshold: policy.threshold,
    })
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
            "score  {} at {} (threshold {}, re-arms below {}, half-life {} h) — {}",
            number(self.score),
            self.now,
            number(self.threshold),
            number(self.rearm_below),
            number(self.half_life_hours),
            if self.armed { "armed" } else { "disarmed (alerted; re-arms below rearm_below)" }
        )?;
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
        write!(f, "{}  [{}]  {}  {}", self.key, self.rule_id, values.join(" "), expiry)
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
        };
        let dict: Map<String, Value> = serde_json::from_str(r#"{"lat":-33.8688,"city":"Sydney"}"#).unwrap();
        Explanation {
            armed: false,
            contributions: vec![ContributionRow {
                alert_id: "a-1".into(),
                decayed_points: 31.016,
                event_time: "2024-03-01T10:00:00.000Z".into(),
                points: 40.0,
                rule_id: "travel".into(),
            }],
            entity: EntityRef { type_: "user".into(), id: "trudy@example.com".into() },
            half_life_hours: 24.0,
            now: "2024-04-01T00:00:00.000Z".into(),
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

    #[test]
    fn text_shows_score_contributions_and_rule_state() {
        let text = explanation().to_string();
        let expected = "entity user trudy@example.com
score  105.0 at 2024-04-01T00:00:00.000Z (threshold 100.0, re-arms below 50.0, half-life 24.0 h) — disarmed (alerted; re-arms below rearm_below)
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
