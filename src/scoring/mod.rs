//! Entity risk: every emitted rule alert adds its rule's risk points to its
//! entity; the score decays with a half-life; an entity whose score crosses
//! its threshold raises one `entity_risk` alert, and re-arms once a later
//! contribution finds the score back under `rearm_below`.
//!
//! The score at event time `t` is `Σ points × 0.5^((t − time) / half_life)`
//! over the contributions with `time ≤ t`. Contributions live in the state
//! store like any other value — a dictionary under `riskd/risk/<type>/<id>`
//! — so they survive restarts, are covered by the checkpoint, and work on
//! every store. Risk alerts never add risk.
//!
//! - `policy.rs`: thresholds, bands and modifiers ([`ScoringConfig`]);
//! - `risk.rs`: adding contributions, raising risk alerts ([`contribute`]);
//! - `scorer.rs`: the rule engine's alerts of an event scored ([`Scorer`]);
//! - `explain.rs`: what riskd knows about one entity ([`explain_entity`]);
//! - `board.rs`: who is riskiest, an index kept in the process ([`Board`]).

mod board;
mod explain;
mod policy;
mod risk;
mod scorer;

pub use board::{list, rank, score_at, Board, Leaderboard, Listed, Listing, Ranking};
pub use explain::{
    explain_contributions, explain_entity, no_state, ContributionRow, CrossingRow, Explanation, PeakRow, RuleStateRow,
};
pub use policy::{default_bands, Modifier, ScoringConfig, TypePolicy};
pub use risk::{contribute, load, risk_key, Contribution, Crossing, Mark, RiskSource, RiskState, Scored};
pub use scorer::Scorer;

/// Rule id of risk alerts.
pub const RISK_RULE_ID: &str = "entity_risk";
