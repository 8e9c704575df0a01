//! `riskd check` warnings: things that are valid but probably wrong.

use crate::event::FieldPath;
use crate::rules::{Form, Rule};
use serde_json::Value;

/// Warnings about the rules; `samples` are example events (may be empty).
pub fn warnings(rules: &[Rule], samples: &[Value]) -> Vec<String> {
    let mut out = Vec::new();
    for rule in rules {
        if !rule.enabled {
            out.push(format!("rule {}: disabled", rule.id));
            continue;
        }
        if rule.matcher.never_true() {
            out.push(format!("rule {}: can never fire: its match condition can never hold", rule.id));
        }
        if rule.fire.as_ref().is_some_and(|f| f.never_true()) {
            out.push(format!("rule {}: can never fire: its fire condition can never hold", rule.id));
        }
        if samples.is_empty() {
            continue;
        }
        let mut fields: Vec<String> = rule.matcher.fields();
        fields.push(rule.entity_key.as_str().to_string());
        match &rule.form {
            Form::Distinct { field, .. } | Form::FirstSeen { field, .. } => fields.push(field.as_str().to_string()),
            Form::Changed { fields: f, .. } => fields.extend(f.iter().map(|(_, p)| p.as_str().to_string())),
            Form::Travel { lat, lon, .. } => fields.extend([lat.as_str().to_string(), lon.as_str().to_string()]),
            Form::Stateless | Form::Count { .. } => {}
        }
        fields.sort();
        fields.dedup();
        for f in fields {
            let Ok(path) = FieldPath::parse(&f) else { continue };
            if !samples.iter().any(|e| path.lookup(e).is_some()) {
                out.push(format!("rule {}: field {f} is in none of the {} sample events", rule.id, samples.len()));
            }
        }
    }
    out
}

/// Rules whose entity is not what the raw Kafka topics are keyed by, and
/// that are not `consistency: direct`: their entity's events are spread
/// over partitions, so several instances would each hold part of its state
/// in their caches. (Routed topics are keyed by every rule's entity.)
pub fn topic_key_warnings(kafka: &crate::config::KafkaConfig, rules: &[Rule]) -> Vec<String> {
    if kafka.consume == crate::config::Consume::Routed {
        return Vec::new();
    }
    let keyed = kafka.keyed_by.as_deref();
    rules
        .iter()
        .filter(|r| r.enabled && !r.direct && keyed != Some(r.entity_type.as_str()))
        .map(|r| {
            let by = keyed.map_or("nothing riskd knows (kafka.keyed_by is not set)".to_string(), |k| format!("entity type {k}"));
            format!(
                "rule {}: its entity ({}) is not what topics {} are keyed by ({by}), and it is not consistency: direct; \
                 run `riskd route` and consume = \"routed\", or make it direct",
                r.id,
                r.entity_type,
                kafka.topics.join(", ")
            )
        })
        .collect()
}
