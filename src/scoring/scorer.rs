//! Scoring on top of the rules: the rule engine applies an event, then each
//! of its alerts adds its rule's risk to its entity, the entity's risk alert
//! (if its score crossed the threshold) right after the alert that raised
//! it.

use super::{contribute, RiskSource, Scored, ScoringConfig};
use crate::alert::Alert;
use crate::event::Event;
use crate::rules::{risk_access, Engine, Outcome, Rule, Scope};
use crate::state::{Access, StateCache, StateError};
use std::collections::HashMap;
use std::sync::Arc;

/// Adds rule alerts' risk to their entities.
pub struct Scorer {
    config: Arc<ScoringConfig>,
    /// Per rule id: its risk points, its cap, and how its entity's risk is changed.
    rules: HashMap<String, (u32, Option<u32>, Access)>,
}

impl Scorer {
    /// A scorer for these rules' alerts.
    pub fn new(rules: &[Rule], config: Arc<ScoringConfig>) -> Self {
        let rules =
            rules.iter().map(|r| (r.id.clone(), (r.risk, r.risk_cap, risk_access(rules, &r.entity_type)))).collect();
        Self { config, rules }
    }

    /// Applies one event with `engine` over `cache`, then scores the alerts
    /// it raised; alerts, risk alerts included, are appended to `alerts`.
    /// Only a failing store is an error (see [`Engine::process`]).
    pub fn process(
        &self,
        engine: &mut Engine,
        cache: &mut StateCache,
        event: &Event,
        scope: Option<Scope<'_>>,
        alerts: &mut Vec<Alert>,
    ) -> Result<Outcome, StateError> {
        let from = alerts.len();
        let mut outcome = engine.process(cache, event, scope, alerts)?;
        if alerts.len() == from {
            return Ok(outcome);
        }
        let fired: Vec<Alert> = alerts.drain(from..).collect();
        for alert in fired {
            let risk_alert = match self.rules.get(&alert.rule_id) {
                Some(&(risk, cap, access)) => {
                    let source = RiskSource { rule_id: &alert.rule_id, risk, cap };
                    let (scored, risk_alert) =
                        contribute(&self.config, cache, access, &source, &alert, event.whole(), event.time_ms)?;
                    outcome.capped += u32::from(scored == Scored::Capped);
                    risk_alert
                }
                None => None,
            };
            alerts.push(alert);
            alerts.extend(risk_alert);
        }
        Ok(outcome)
    }
}
