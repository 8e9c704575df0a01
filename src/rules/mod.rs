//! Rules: the model operators write ([`spec`]), its compiled form
//! ([`Rule`]), conditions ([`condition`]) and evaluation ([`engine`]).

mod behaviour;
pub mod condition;
pub mod correlation;
pub mod engine;
mod forms;
pub mod sigma;
pub mod spec;

pub use behaviour::describe;
pub use condition::Condition;
pub use engine::{Engine, Outcome, Problem, RuleStats, Scope};
use spec::{BaselineSpec, ChangedSpec, CountSpec, DistinctSpec, FirstSeenSpec, RareSpec, TravelSpec};
pub use spec::{OnFire, RuleSpec, StateSpec};

use crate::alert::Severity;
use crate::event::{FieldPath, Reads};
use crate::state::Access;
use std::time::Duration;

/// What a rule keeps per entity, compiled.
#[derive(Debug)]
pub enum Form {
    /// No state: every matching event fires.
    Stateless,
    /// Counter in a window opened by its first event.
    Count {
        /// Window, ms.
        window_ms: i64,
        /// Count that fires.
        threshold: i64,
        /// After firing.
        on_fire: OnFire,
    },
    /// Distinct values in a window opened by its first event.
    Distinct {
        /// Value.
        field: FieldPath,
        /// Window, ms.
        window_ms: i64,
        /// Number of values that fires.
        threshold: usize,
        /// After firing.
        on_fire: OnFire,
    },
    /// Values seen, trust on first use.
    FirstSeen {
        /// Value.
        field: FieldPath,
        /// Kept this long after the last event, ms.
        ttl_ms: i64,
    },
    /// Fields of the last event.
    Changed {
        /// Name and path of each field.
        fields: Vec<(String, FieldPath)>,
        /// Kept this long after the last event, ms.
        ttl_ms: i64,
    },
    /// Place and time of the last event.
    Travel {
        /// Latitude.
        lat: FieldPath,
        /// Longitude.
        lon: FieldPath,
        /// Place name.
        city: Option<FieldPath>,
        /// Kept this long after the last event, ms.
        ttl_ms: i64,
        /// Distance that never fires, km.
        min_km: f64,
        /// Impossible speed, km/h.
        max_kmh: f64,
    },
    /// A Sigma correlation's sliding window, per group.
    Correlation(Box<correlation::Correlation>),
    /// Volume per bucket against the entity's own baseline.
    Baseline(behaviour::Baseline),
    /// A value rare for the entity.
    Rare(behaviour::Rare),
}

/// A compiled, validated rule.
#[derive(Debug)]
pub struct Rule {
    /// Rule id.
    pub id: String,
    /// Title.
    pub title: String,
    /// Description.
    pub description: String,
    /// Severity of its alerts.
    pub severity: Severity,
    /// Whether it is evaluated.
    pub enabled: bool,
    /// Risk points per alert.
    pub risk: u32,
    /// Contributions per entity per half-life.
    pub risk_cap: Option<u32>,
    /// Entity type.
    pub entity_type: String,
    /// Where the entity id is.
    pub entity_key: FieldPath,
    /// More fields that, with the entity id, name the rule's state and its
    /// dedup window (a Sigma correlation's `group-by` beyond its entity);
    /// an event without one of them is skipped by the rule.
    pub group: Vec<FieldPath>,
    /// Which events it looks at.
    pub matcher: Condition,
    /// What it remembers.
    pub form: Form,
    /// Extra firing condition.
    pub fire: Option<Condition>,
    /// First part of its state keys: its id, or a shared key.
    pub namespace: String,
    /// Its state is changed directly in the store (`consistency: direct`).
    pub direct: bool,
    /// Dedup window, ms.
    pub dedup_window_ms: i64,
    /// Dedup key path; the entity id when `None`.
    pub dedup_key: Option<FieldPath>,
    /// Event fields copied into alerts.
    pub context: Vec<(String, FieldPath)>,
    /// Constant values in every alert's context (a Sigma rule's id, level, tags).
    pub labels: serde_json::Map<String, serde_json::Value>,
}

impl Rule {
    /// Every field path the rule reads of an event: its entity key, its
    /// conditions, its state's fields, its dedup key and context.
    pub fn reads(&self) -> Vec<&FieldPath> {
        let mut out = vec![&self.entity_key];
        out.extend(&self.group);
        out.extend(self.matcher.reads());
        out.extend(self.fire.iter().flat_map(|f| f.reads()));
        match &self.form {
            Form::Stateless | Form::Count { .. } => {}
            Form::Distinct { field, .. } | Form::FirstSeen { field, .. } => out.push(field),
            Form::Changed { fields, .. } => out.extend(fields.iter().map(|(_, p)| p)),
            Form::Travel { lat, lon, city, .. } => out.extend([lat, lon].into_iter().chain(city)),
            Form::Correlation(c) => {
                if let correlation::Kind::ValueCount(fields) = &c.kind {
                    out.extend(fields);
                }
            }
            Form::Baseline(b) => out.extend(&b.value),
            Form::Rare(r) => out.push(&r.field),
        }
        out.extend(&self.dedup_key);
        out.extend(self.context.iter().map(|(_, p)| p));
        out
    }

    /// What the rule's stored state means: the form and the fields it keeps,
    /// the entity and the key namespace — not its thresholds or windows. A
    /// reload keeps the state of a rule whose shape is unchanged.
    pub fn state_shape(&self) -> String {
        let form = match &self.form {
            Form::Stateless => "stateless".to_string(),
            Form::Count { .. } => "count".to_string(),
            Form::Distinct { field, .. } => format!("distinct {field}"),
            Form::FirstSeen { field, .. } => format!("first_seen {field}"),
            Form::Changed { fields, .. } => {
                let f: Vec<String> = fields.iter().map(|(n, p)| format!("{n}={p}")).collect();
                format!("changed {}", f.join(","))
            }
            Form::Travel { lat, lon, city, .. } => {
                format!("travel {lat} {lon} {}", city.as_ref().map(FieldPath::as_str).unwrap_or(""))
            }
            Form::Correlation(c) => {
                let fields = match &c.kind {
                    correlation::Kind::ValueCount(f) => f.iter().map(FieldPath::as_str).collect::<Vec<_>>().join(","),
                    _ => String::new(),
                };
                let group: Vec<&str> = self.group.iter().map(FieldPath::as_str).collect();
                format!("correlation {} {} {fields} by {}", c.type_name(), c.rules.join(","), group.join(","))
            }
            // The bucket is part of the shape: the stored index counts buckets.
            Form::Baseline(b) => {
                format!("baseline {} {}", b.bucket_ms, b.value.as_ref().map(FieldPath::as_str).unwrap_or(""))
            }
            Form::Rare(r) => format!("rare {}", r.field),
        };
        let consistency = if self.direct { "direct" } else { "cached" };
        format!("{}|{}|{}|{}|{consistency}", self.namespace, self.entity_type, self.entity_key, form)
    }
}

/// A problem with one field of a rule spec; the loader adds file and line.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    /// The YAML key at fault (used to find its line).
    pub field: &'static str,
    /// What is wrong.
    pub message: String,
}

fn duration_ms(text: &str, field: &'static str, errors: &mut Vec<FieldError>) -> i64 {
    match humantime::parse_duration(text.trim()) {
        Ok(d) if d > Duration::ZERO => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Ok(_) => {
            errors.push(FieldError { field, message: format!("{field} must be longer than zero, got {text:?}") });
            0
        }
        Err(e) => {
            errors.push(FieldError {
                field,
                message: format!("{field}: invalid duration {text:?} ({e}); use e.g. 90s, 15m, 1h, 7d"),
            });
            0
        }
    }
}

fn path(text: &str, field: &'static str, errors: &mut Vec<FieldError>) -> FieldPath {
    FieldPath::parse(text).unwrap_or_else(|e| {
        errors.push(FieldError { field, message: e.to_string() });
        FieldPath::parse("invalid").unwrap_or_else(|_| unreachable!("a plain word is a valid path"))
    })
}

fn is_ident(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn threshold(n: u32, field: &'static str, errors: &mut Vec<FieldError>) -> u32 {
    if n == 0 {
        errors.push(FieldError { field, message: "threshold must be at least 1".into() });
    }
    n
}

/// The fields the enabled rules read, and `extra` fields (the event
/// time's): what decoding takes of each event.
pub fn reads(rules: &[Rule], extra: &[FieldPath]) -> Reads {
    Reads::new(rules.iter().filter(|r| r.enabled).flat_map(Rule::reads), extra)
}

/// How the risk of an entity type is changed: directly in the store when an
/// enabled rule of that type is `consistency: direct` (the type's keys are
/// then written from many places), else in the write-back cache.
pub fn risk_access(rules: &[Rule], entity_type: &str) -> Access {
    Access::direct_if(rules.iter().any(|r| r.enabled && r.direct && r.entity_type == entity_type))
}

/// Validates and compiles a rule spec, collecting every problem.
// Long on purpose: it walks the spec field by field, in the order of the
// rule file, so that every error is collected in one pass.
pub fn compile(spec: RuleSpec) -> Result<Rule, Vec<FieldError>> {
    let mut errors = Vec::new();
    if !is_ident(&spec.id) {
        errors.push(FieldError {
            field: "id",
            message: format!("id {:?} must be lowercase letters, digits and _", spec.id),
        });
    }
    if spec.title.trim().is_empty() {
        errors.push(FieldError { field: "title", message: "title is empty".into() });
    }
    let severity = Severity::parse(&spec.severity).unwrap_or_else(|| {
        errors.push(FieldError {
            field: "severity",
            message: format!("unknown severity {:?}; use INFO, LOW, MEDIUM, HIGH or CRITICAL", spec.severity),
        });
        Severity::Info
    });
    if !is_ident(&spec.entity.type_) {
        errors.push(FieldError {
            field: "type",
            message: format!("entity type {:?} must be lowercase letters, digits and _", spec.entity.type_),
        });
    }
    let entity_key = path(&spec.entity.key, "key", &mut errors);
    let matcher = Condition::compile(&spec.match_).map_err(|e| {
        errors.push(FieldError { field: "match", message: format!("match does not compile: {e}") });
    });
    let fire = spec.fire.as_deref().map(|src| {
        Condition::compile(src)
            .map_err(|e| errors.push(FieldError { field: "fire", message: format!("fire does not compile: {e}") }))
    });
    let form = match spec.state {
        None => Form::Stateless,
        Some(state) => compile_state(state, &mut errors),
    };
    let direct = match spec.consistency.as_str() {
        "cached" => false,
        "direct" => true,
        other => {
            errors.push(FieldError {
                field: "consistency",
                message: format!("consistency {other:?} is not one of cached, direct"),
            });
            false
        }
    };
    if spec.risk_cap == Some(0) {
        errors.push(FieldError { field: "risk_cap", message: "risk_cap must be at least 1 (or absent)".into() });
    }
    if let Some(shared) = &spec.shared_key {
        if shared.is_empty() || shared.contains('/') {
            errors.push(FieldError {
                field: "shared_key",
                message: format!("shared_key {shared:?} must be non-empty, without '/'"),
            });
        }
    }
    let dedup_window_ms = duration_ms(&spec.dedup.window, "window", &mut errors);
    let dedup_key = spec.dedup.key.as_deref().map(|k| path(k, "dedup", &mut errors));
    let context = spec.context.iter().map(|(name, p)| (name.clone(), path(p, "context", &mut errors))).collect();
    let fire = match fire {
        Some(Ok(c)) => Some(c),
        _ => None,
    };
    match (matcher, errors.is_empty()) {
        (Ok(matcher), true) => Ok(Rule {
            namespace: spec.shared_key.unwrap_or_else(|| spec.id.clone()),
            direct,
            id: spec.id,
            title: spec.title,
            description: spec.description,
            severity,
            enabled: spec.enabled,
            risk: spec.risk,
            risk_cap: spec.risk_cap,
            entity_type: spec.entity.type_,
            entity_key,
            group: Vec::new(),
            matcher,
            form,
            fire,
            dedup_window_ms,
            dedup_key,
            context,
            labels: serde_json::Map::new(),
        }),
        _ => Err(errors),
    }
}

fn compile_state(state: StateSpec, errors: &mut Vec<FieldError>) -> Form {
    let StateSpec { count, distinct, first_seen, changed, travel, baseline, rare } = state;
    let given = [
        count.is_some(),
        distinct.is_some(),
        first_seen.is_some(),
        changed.is_some(),
        travel.is_some(),
        baseline.is_some(),
        rare.is_some(),
    ];
    if given.iter().filter(|g| **g).count() != 1 {
        errors.push(FieldError {
            field: "state",
            message: "state needs exactly one of count, distinct, first_seen, changed, travel, baseline, rare".into(),
        });
    }
    if let Some(b) = baseline {
        return Form::Baseline(compile_baseline(b, errors));
    }
    if let Some(r) = rare {
        return Form::Rare(compile_rare(r, errors));
    }
    if let Some(CountSpec { window, threshold: t, on_fire }) = count {
        return Form::Count {
            window_ms: duration_ms(&window, "window", errors),
            threshold: i64::from(threshold(t, "threshold", errors)),
            on_fire,
        };
    }
    if let Some(DistinctSpec { field, window, threshold: t, on_fire }) = distinct {
        return Form::Distinct {
            field: path(&field, "field", errors),
            window_ms: duration_ms(&window, "window", errors),
            threshold: threshold(t, "threshold", errors) as usize,
            on_fire,
        };
    }
    if let Some(FirstSeenSpec { field, ttl }) = first_seen {
        return Form::FirstSeen { field: path(&field, "field", errors), ttl_ms: duration_ms(&ttl, "ttl", errors) };
    }
    if let Some(ChangedSpec { fields, ttl }) = changed {
        if fields.is_empty() {
            errors.push(FieldError { field: "fields", message: "changed needs at least one field".into() });
        }
        return Form::Changed {
            fields: fields.iter().map(|(name, p)| (name.clone(), path(p, "fields", errors))).collect(),
            ttl_ms: duration_ms(&ttl, "ttl", errors),
        };
    }
    if let Some(TravelSpec { lat, lon, city, ttl, min_km, max_kmh }) = travel {
        if !(min_km >= 0.0 && min_km.is_finite()) {
            errors.push(FieldError { field: "min_km", message: format!("min_km must be 0 or more, got {min_km}") });
        }
        if !(max_kmh > 0.0 && max_kmh.is_finite()) {
            errors.push(FieldError { field: "max_kmh", message: format!("max_kmh must be above 0, got {max_kmh}") });
        }
        return Form::Travel {
            lat: path(&lat, "lat", errors),
            lon: path(&lon, "lon", errors),
            city: city.map(|c| path(&c, "city", errors)),
            ttl_ms: duration_ms(&ttl, "ttl", errors),
            min_km,
            max_kmh,
        };
    }
    Form::Stateless
}

fn compile_baseline(b: BaselineSpec, errors: &mut Vec<FieldError>) -> behaviour::Baseline {
    if !(b.k >= 0.0 && b.k.is_finite()) {
        errors.push(FieldError { field: "k", message: format!("k must be 0 or more, got {}", b.k) });
    }
    if !b.min_value.is_finite() {
        errors.push(FieldError {
            field: "min_value",
            message: format!("min_value must be a number, got {}", b.min_value),
        });
    }
    behaviour::Baseline {
        bucket_ms: duration_ms(&b.bucket, "bucket", errors),
        value: b.value.map(|v| path(&v, "value", errors)),
        half_life_ms: duration_ms(&b.half_life, "half_life", errors),
        k: b.k,
        min_value: b.min_value,
        min_history: u64::from(b.min_history),
        ttl_ms: duration_ms(&b.ttl, "ttl", errors),
    }
}

fn compile_rare(r: RareSpec, errors: &mut Vec<FieldError>) -> behaviour::Rare {
    if !(r.max_share > 0.0 && r.max_share <= 1.0) {
        errors.push(FieldError {
            field: "max_share",
            message: format!("max_share must be above 0 and at most 1, got {}", r.max_share),
        });
    }
    if !(r.min_history >= 0.0 && r.min_history.is_finite()) {
        errors.push(FieldError {
            field: "min_history",
            message: format!("min_history must be 0 or more, got {}", r.min_history),
        });
    }
    if r.max_values == 0 || r.max_values > behaviour::MAX_RARE_VALUES {
        errors.push(FieldError {
            field: "max_values",
            message: format!("max_values must be 1 to {}, got {}", behaviour::MAX_RARE_VALUES, r.max_values),
        });
    }
    behaviour::Rare {
        field: path(&r.field, "field", errors),
        half_life_ms: duration_ms(&r.half_life, "half_life", errors),
        max_share: r.max_share,
        min_history: r.min_history,
        max_values: r.max_values as usize,
        ttl_ms: duration_ms(&r.ttl, "ttl", errors),
    }
}
