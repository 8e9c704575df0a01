//! `[scoring]`: how rule alerts add up to entity risk, validated into
//! [`ScoringConfig`].

use super::spans::Section;
use crate::alert::Severity;
use crate::scoring::{default_bands, Modifier, ScoringConfig, TypePolicy};
use serde::Deserialize;
use std::collections::BTreeMap;

/// `[scoring]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoringFile {
    /// Contributions whose decayed value falls below this many points are dropped.
    #[serde(default = "half_point")]
    pub floor: f64,
    /// Policy of every entity type not listed under `types`.
    #[serde(default)]
    pub defaults: TypeFile,
    /// Policy per entity type (`[scoring.types.user]`); unset keys come from `defaults`.
    #[serde(default)]
    pub types: BTreeMap<String, TypeFile>,
    /// Point multipliers for matching entities (`[[scoring.modifiers]]`).
    #[serde(default)]
    pub modifiers: Vec<ModifierFile>,
}

fn half_point() -> f64 {
    0.5
}

/// How one entity type is scored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TypeFile {
    /// Score that raises an `entity_risk` alert (default 100).
    pub threshold: Option<f64>,
    /// A disarmed entity re-arms when a contribution finds its score below
    /// this (default: half the threshold).
    pub rearm_below: Option<f64>,
    /// Half-life of a contribution (default 24h).
    pub half_life: Option<String>,
    /// Severity by score, e.g. `[{min_score = 100, severity = "MEDIUM"}, {min_score = 200, severity = "HIGH"}]`
    /// (default: MEDIUM at the threshold, HIGH at 1.5×, CRITICAL at 3×).
    pub bands: Option<Vec<BandFile>>,
}

/// One severity band.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BandFile {
    /// Lowest score of the band.
    pub min_score: f64,
    /// Severity of risk alerts in it.
    pub severity: String,
}

/// A point multiplier.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModifierFile {
    /// Entity type it applies to; all types when absent.
    #[serde(default)]
    pub entity_type: Option<String>,
    /// Entity ids or glob patterns (`admin-*`).
    pub ids: Vec<String>,
    /// Factor on the points (2 doubles, 0 ignores the entity).
    pub multiply: f64,
}

/// Validates `[scoring]`; every problem goes to `err`.
pub(super) fn build(file: &ScoringFile, err: &mut Section) -> ScoringConfig {
    if !(file.floor >= 0.0 && file.floor.is_finite()) {
        err.at("floor", format!("scoring.floor must be 0 or more, got {}", file.floor));
    }
    let default = policy("defaults", &["defaults"], &file.defaults, None, err);
    let types = file
        .types
        .iter()
        .map(|(name, t)| {
            let policy = policy(&format!("types.{name}"), &["types", name], t, Some(&file.defaults), err);
            (name.clone(), policy)
        })
        .collect();
    let modifiers = file.modifiers.iter().enumerate().filter_map(|(i, m)| modifier(i, m, err)).collect();
    ScoringConfig { floor: file.floor, default, types, modifiers }
}

/// The policy of one entity type (`name` in messages, at `keys` under
/// `[scoring]`), unset keys taken from `base`.
fn policy(name: &str, keys: &[&str], t: &TypeFile, base: Option<&TypeFile>, err: &mut Section) -> TypePolicy {
    let pick = |f: fn(&TypeFile) -> Option<f64>| f(t).or_else(|| base.and_then(f));
    let threshold = pick(|t| t.threshold).unwrap_or(100.0);
    // An explicit threshold without an explicit rearm re-arms at half of it.
    let rearm_below = t.rearm_below.or(if t.threshold.is_some() { None } else { base.and_then(|b| b.rearm_below) });
    let rearm_below = rearm_below.unwrap_or(threshold / 2.0);
    if !(threshold > 0.0 && threshold.is_finite()) {
        err.at_path(
            &[keys, &["threshold"]].concat(),
            format!("scoring {name}: threshold must be above 0, got {threshold}"),
        );
    }
    if !(0.0..=threshold).contains(&rearm_below) {
        err.at_path(
            &[keys, &["rearm_below"]].concat(),
            format!("scoring {name}: rearm_below must be between 0 and the threshold, got {rearm_below}"),
        );
    }
    let half_life = t.half_life.as_deref().or(base.and_then(|b| b.half_life.as_deref())).unwrap_or("24h");
    let half_life_ms = match humantime::parse_duration(half_life) {
        Ok(d) if !d.is_zero() => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        _ => {
            err.at_path(
                &[keys, &["half_life"]].concat(),
                format!("scoring {name}: half_life {half_life:?} is not a duration above zero, e.g. 24h"),
            );
            24 * 3_600_000
        }
    };
    let bands = match t.bands.as_ref().or(base.and_then(|b| b.bands.as_ref())) {
        None => default_bands(threshold),
        Some(bands) => {
            let mut out = Vec::new();
            for (i, b) in bands.iter().enumerate() {
                match Severity::parse(&b.severity) {
                    Some(s) => out.push((b.min_score, s)),
                    None => err.at_path(
                        &[keys, &["bands", &i.to_string()]].concat(),
                        format!("scoring {name}: unknown severity {:?} in bands", b.severity),
                    ),
                }
            }
            if out.windows(2).any(|w| w[0].0 >= w[1].0) {
                err.at_path(
                    &[keys, &["bands"]].concat(),
                    format!("scoring {name}: bands must be in increasing min_score order"),
                );
            }
            out
        }
    };
    TypePolicy { threshold, rearm_below, half_life_ms, bands }
}

/// The `i`th `[[scoring.modifiers]]`, or `None` when its ids do not compile.
fn modifier(i: usize, m: &ModifierFile, err: &mut Section) -> Option<Modifier> {
    let index = i.to_string();
    if !(m.multiply >= 0.0 && m.multiply.is_finite()) {
        err.at_path(
            &["modifiers", &index, "multiply"],
            format!("scoring.modifiers[{i}]: multiply must be 0 or more, got {}", m.multiply),
        );
    }
    let mut set = globset::GlobSetBuilder::new();
    for id in &m.ids {
        match globset::Glob::new(id) {
            Ok(g) => {
                set.add(g);
            }
            Err(e) => {
                err.at_path(&["modifiers", &index, "ids"], format!("scoring.modifiers[{i}]: bad pattern {id:?}: {e}"))
            }
        }
    }
    match set.build() {
        Ok(ids) => Some(Modifier { entity_type: m.entity_type.clone(), ids, multiply: m.multiply }),
        Err(e) => {
            err.at_path(&["modifiers", &index, "ids"], format!("scoring.modifiers[{i}]: {e}"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::load_text;

    #[test]
    fn scoring_types_inherit_defaults_and_modifiers_compile() {
        let cfg = load_text(
            "[scoring.defaults]\nthreshold = 80\nhalf_life = \"12h\"\n[scoring.types.ip]\nthreshold = 40\n[scoring.types.user]\nhalf_life = \"2d\"\n[[scoring.modifiers]]\nids = [\"admin-*\"]\nmultiply = 2\n",
        )
        .unwrap();
        let s = &cfg.scoring;
        assert_eq!((s.default.threshold, s.default.rearm_below, s.default.half_life_ms), (80.0, 40.0, 12 * 3_600_000));
        let ip = s.policy("ip");
        assert_eq!((ip.threshold, ip.rearm_below, ip.half_life_ms), (40.0, 20.0, 12 * 3_600_000));
        assert_eq!(s.policy("user").half_life_ms, 48 * 3_600_000);
        assert_eq!(s.policy("role"), &s.default);
        assert!(s.modifiers[0].ids.is_match("admin-root"));
    }

    #[test]
    fn every_scoring_error_is_reported() {
        let errors = load_text(
            "[scoring]\nfloor = -1\n[scoring.types.user]\nthreshold = 0\nhalf_life = \"soon\"\nbands = [{min_score = 10, severity = \"SEVERE\"}]\n[[scoring.modifiers]]\nids = [\"[\"]\nmultiply = -2\n",
        )
        .unwrap_err();
        let lines: Vec<(Option<usize>, bool)> = errors.0.iter().map(|e| (e.line, e.rule.is_none())).collect();
        assert_eq!(errors.0.len(), 6, "{errors}");
        assert!(lines.iter().all(|(line, no_rule)| line.is_some() && *no_rule), "{errors}");
        let text = errors.to_string();
        for needle in ["floor", "threshold must be above 0", "half_life \"soon\"", "SEVERE", "multiply", "bad pattern"]
        {
            assert!(text.contains(needle), "{needle} missing from {text}");
        }
    }
}
