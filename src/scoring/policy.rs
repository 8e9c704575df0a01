//! How entities are scored: per-type thresholds, severity bands and half-lives,
//! and the modifiers that multiply points.

use crate::alert::{EntityRef, Severity};
use std::collections::HashMap;

/// How one entity type is scored.
#[derive(Clone, Debug, PartialEq)]
pub struct TypePolicy {
    /// Score that raises a risk alert.
    pub threshold: f64,
    /// A disarmed entity re-arms when a contribution finds its score below this.
    pub rearm_below: f64,
    /// Half-life of a contribution, ms.
    pub half_life_ms: i64,
    /// (lowest score, severity), ascending: a risk alert takes the last band
    /// whose lowest score it reaches.
    pub bands: Vec<(f64, Severity)>,
}

impl TypePolicy {
    /// Threshold 100, re-arm below 50, half-life 24 h, bands relative to the threshold.
    pub fn with_threshold(threshold: f64) -> Self {
        Self { threshold, rearm_below: threshold / 2.0, half_life_ms: 24 * 3_600_000, bands: default_bands(threshold) }
    }

    /// The band `score` is in: the last whose lowest score it reaches (none below the lowest).
    pub fn band(&self, score: f64) -> Option<Severity> {
        self.bands.iter().rev().find(|(min, _)| score >= *min).map(|(_, s)| *s)
    }

    /// A risk alert's severity: its band, MEDIUM below the lowest.
    pub(super) fn severity(&self, score: f64) -> Severity {
        self.band(score).unwrap_or(Severity::Medium)
    }

    /// A contribution's value `age_ms` after it was made.
    pub fn decayed(&self, points: f64, age_ms: i64) -> f64 {
        points * 0.5f64.powf(age_ms as f64 / self.half_life_ms as f64)
    }

    /// The half-life in hours, as explanations show it.
    pub(super) fn half_life_hours(&self) -> f64 {
        self.half_life_ms as f64 / 3_600_000.0
    }
}

/// MEDIUM at the threshold, HIGH at 1.5×, CRITICAL at 3×.
pub fn default_bands(threshold: f64) -> Vec<(f64, Severity)> {
    vec![(threshold, Severity::Medium), (threshold * 1.5, Severity::High), (threshold * 3.0, Severity::Critical)]
}

/// Multiplies the points of matching entities (×2 for privileged accounts,
/// ×0 for a known scanner).
#[derive(Clone, Debug)]
pub struct Modifier {
    /// Entity type it applies to; every type when `None`.
    pub entity_type: Option<String>,
    /// Entity ids (glob patterns: `*`, `?`, `[...]`).
    pub ids: globset::GlobSet,
    /// The factor.
    pub multiply: f64,
}

/// Scoring settings, validated.
#[derive(Clone, Debug)]
pub struct ScoringConfig {
    /// Contributions whose decayed value falls below this are dropped.
    pub floor: f64,
    /// Policy of types not listed in `types`.
    pub default: TypePolicy,
    /// Per entity type.
    pub types: HashMap<String, TypePolicy>,
    /// Applied in order; all that match multiply.
    pub modifiers: Vec<Modifier>,
}

impl Default for ScoringConfig {
    fn default() -> Self {
        Self { floor: 0.5, default: TypePolicy::with_threshold(100.0), types: HashMap::new(), modifiers: Vec::new() }
    }
}

impl ScoringConfig {
    /// The policy of an entity type.
    pub fn policy(&self, entity_type: &str) -> &TypePolicy {
        self.types.get(entity_type).unwrap_or(&self.default)
    }

    /// The product of the factors of every modifier matching `entity` (1 when none).
    pub(super) fn multiplier(&self, entity: &EntityRef) -> f64 {
        self.modifiers
            .iter()
            .filter(|m| m.entity_type.as_deref().is_none_or(|t| t == entity.type_))
            .filter(|m| m.ids.is_match(&entity.id))
            .map(|m| m.multiply)
            .product()
    }
}
