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
        // A Sigma rule library covers many logs: fields other logs lack are expected.
        if samples.is_empty() || rule.labels.contains_key("sigma") {
            continue;
        }
        let mut fields: Vec<String> = rule.matcher.fields();
        fields.push(rule.entity_key.as_str().to_string());
        match &rule.form {
            Form::Distinct { field, .. } | Form::FirstSeen { field, .. } => fields.push(field.as_str().to_string()),
            Form::Rare(r) => fields.push(r.field.as_str().to_string()),
            Form::Baseline(b) => fields.extend(b.value.iter().map(|v| v.as_str().to_string())),
            Form::Changed { fields: f, .. } => fields.extend(f.iter().map(|(_, p)| p.as_str().to_string())),
            Form::Travel { lat, lon, .. } => fields.extend([lat.as_str().to_string(), lon.as_str().to_string()]),
            Form::Stateless | Form::Count { .. } | Form::Correlation(_) => {}
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
