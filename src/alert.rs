//! What riskd emits: an [`Alert`] about an entity ([`EntityRef`]) with a
//! [`Severity`]. Rules and scoring make alerts; sinks, the pipeline and the
//! API carry them. This module knows nothing else of riskd.

use crate::event::TimeSource;
use serde::Serialize;
use serde_json::Value;

/// Alert severity, lowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Severity {
    /// Informational.
    Info,
    /// Low.
    Low,
    /// Medium.
    Medium,
    /// High.
    High,
    /// Critical.
    Critical,
}

impl Severity {
    /// Parses `INFO` … `CRITICAL` (any case).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_uppercase().as_str() {
            "INFO" => Severity::Info,
            "LOW" => Severity::Low,
            "MEDIUM" => Severity::Medium,
            "HIGH" => Severity::High,
            "CRITICAL" => Severity::Critical,
            _ => return None,
        })
    }

    /// The label value, as in alerts.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "INFO",
            Severity::Low => "LOW",
            Severity::Medium => "MEDIUM",
            Severity::High => "HIGH",
            Severity::Critical => "CRITICAL",
        }
    }
}

/// The entity an alert is about.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EntityRef {
    /// Entity type.
    #[serde(rename = "type")]
    pub type_: String,
    /// Entity id.
    pub id: String,
}

/// An alert, as written to the alert sinks (one JSON object per line).
#[derive(Clone, Debug, Serialize)]
pub struct Alert {
    /// Deterministic id: the same event firing the same rule gives the same id.
    pub alert_id: String,
    /// The rule that fired.
    pub rule_id: String,
    /// The rule's title.
    pub title: String,
    /// The rule's severity.
    pub severity: Severity,
    /// Whom it is about.
    pub entity: EntityRef,
    /// Event time of the event that fired (RFC 3339).
    pub event_time: String,
    /// Where that time came from: `event`, `ingest` (no readable time), or
    /// `latest_trusted` (the event's own time could not be true).
    pub event_time_source: TimeSource,
    /// Risk points.
    pub risk: u32,
    /// Key its dedup window is kept under.
    pub dedup_key: String,
    /// The state values that led to the alert, and the rule's context fields.
    pub context: Value,
    /// The triggering event.
    pub event: Value,
}
