//! The rule file format: what an operator writes in `config/rules/*.yaml`.
//! Parsed with serde (unknown fields are errors), then compiled and
//! validated by [`super::compile`].

use serde::Deserialize;
use std::collections::BTreeMap;

/// One rule, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Unique id, `[a-z0-9_]+`; names the rule's state and its alerts.
    pub id: String,
    /// One-line title, copied into alerts.
    pub title: String,
    /// What the rule detects and why it matters.
    #[serde(default)]
    pub description: String,
    /// INFO, LOW, MEDIUM, HIGH or CRITICAL.
    pub severity: String,
    /// A disabled rule is validated but never evaluated.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Risk points an alert of this rule adds to its entity.
    #[serde(default)]
    pub risk: u32,
    /// At most this many of the rule's alerts add risk to one entity per
    /// half-life of its entity type; no limit when absent.
    #[serde(default)]
    pub risk_cap: Option<u32>,
    /// Whose state the rule keeps and whom its alerts are about.
    pub entity: EntitySpec,
    /// Condition (CEL) an event must meet to be looked at at all.
    #[serde(rename = "match")]
    pub match_: String,
    /// What the rule remembers per entity, and its built-in firing condition;
    /// without it the rule fires on every matching event.
    #[serde(default)]
    pub state: Option<StateSpec>,
    /// Extra condition (CEL) for firing, with the state's values in `state`
    /// and the event's fields as variables.
    #[serde(default)]
    pub fire: Option<String>,
    /// Keeps the rule's state under `<shared_key>/<entity type>/<entity id>`
    /// instead of under the rule id, so that rules naming the same shared key
    /// share state on purpose.
    #[serde(default)]
    pub shared_key: Option<String>,
    /// Repeats of an alert inside the window are suppressed.
    #[serde(default)]
    pub dedup: DedupSpec,
    /// `cached` (default): state goes through the write-back cache, for keys
    /// this process owns. `direct`: every change is an atomic
    /// read-modify-write on the store, for keys written by several processes.
    #[serde(default = "cached")]
    pub consistency: String,
    /// Event fields copied into the alert's context, by name.
    #[serde(default)]
    pub context: BTreeMap<String, String>,
}

fn yes() -> bool {
    true
}

fn cached() -> String {
    "cached".into()
}

/// The entity a rule scores.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntitySpec {
    /// Entity type, such as `user`, `ip`, `role`, `principal`.
    #[serde(rename = "type")]
    pub type_: String,
    /// Field path of the entity id in the event.
    pub key: String,
}

/// Alert de-duplication.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupSpec {
    /// Length of the suppression window, in event time.
    #[serde(default = "one_hour")]
    pub window: String,
    /// Field path of the dedup key; the entity id when absent.
    #[serde(default)]
    pub key: Option<String>,
}

impl Default for DedupSpec {
    fn default() -> Self {
        Self { window: one_hour(), key: None }
    }
}

fn one_hour() -> String {
    "1h".to_string()
}

/// What happens to a windowed state when its rule fires.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnFire {
    /// Clear the state: the next matching event opens a new window.
    #[default]
    Reset,
    /// Keep counting: every later event in the window fires again (subject to dedup).
    Keep,
}

/// The state forms: exactly one of them. Each is one per-entity value with
/// a built-in firing condition whose numbers are plain fields.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateSpec {
    /// Count matching events.
    #[serde(default)]
    pub count: Option<CountSpec>,
    /// Collect distinct values of a field.
    #[serde(default)]
    pub distinct: Option<DistinctSpec>,
    /// Alert on a value never seen for the entity.
    #[serde(default)]
    pub first_seen: Option<FirstSeenSpec>,
    /// Alert when remembered fields change.
    #[serde(default)]
    pub changed: Option<ChangedSpec>,
    /// Alert on impossible travel.
    #[serde(default)]
    pub travel: Option<TravelSpec>,
    /// Alert on a bucket's volume far above the entity's own baseline.
    #[serde(default)]
    pub baseline: Option<BaselineSpec>,
    /// Alert on a value rare for the entity.
    #[serde(default)]
    pub rare: Option<RareSpec>,
}

/// Per entity, the volume of matching events (or the sum of a field) per
/// bucket of event time, against an exponentially weighted mean and
/// variance of its past buckets; fire once per bucket when the volume is
/// over `mean + k·stddev`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaselineSpec {
    /// Bucket length (`1h`).
    pub bucket: String,
    /// Field path of a number to sum; absent: count events.
    #[serde(default)]
    pub value: Option<String>,
    /// Half-life of the baseline's memory (`7d`).
    pub half_life: String,
    /// Standard deviations above the mean that fire.
    #[serde(default = "four")]
    pub k: f64,
    /// A bucket below this volume never fires.
    #[serde(default)]
    pub min_value: f64,
    /// Closed buckets the baseline needs before it may fire.
    #[serde(default = "ten")]
    pub min_history: u32,
    /// How long after the entity's last matching event the baseline is kept.
    pub ttl: String,
}

/// Per entity, decayed weights of the values of a field; fire on a value
/// whose share of the total weight is under `max_share`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RareSpec {
    /// Field path of the value.
    pub field: String,
    /// Half-life of the weights (`30d`).
    pub half_life: String,
    /// Share under which a value is rare.
    #[serde(default = "two_percent")]
    pub max_share: f64,
    /// Decayed total weight (about: events) needed before it may fire.
    #[serde(default = "twenty")]
    pub min_history: f64,
    /// Values remembered; past it the lightest is forgotten.
    #[serde(default = "two_five_six")]
    pub max_values: u32,
    /// How long after the entity's last matching event it is kept.
    pub ttl: String,
}

fn four() -> f64 {
    4.0
}

fn ten() -> u32 {
    10
}

fn two_percent() -> f64 {
    0.02
}

fn twenty() -> f64 {
    20.0
}

fn two_five_six() -> u32 {
    256
}

/// Count matching events in a window that opens at the first one; fire
/// when the count reaches `threshold`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CountSpec {
    /// Window length.
    pub window: String,
    /// Count that fires.
    pub threshold: u32,
    /// What to do after firing.
    #[serde(default)]
    pub on_fire: OnFire,
}

/// Collect distinct values of a field in a window that opens at the first
/// one; fire when there are `threshold` of them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistinctSpec {
    /// Field path of the value.
    pub field: String,
    /// Window length.
    pub window: String,
    /// Number of distinct values that fires.
    pub threshold: u32,
    /// What to do after firing.
    #[serde(default)]
    pub on_fire: OnFire,
}

/// Remember the values of a field seen for the entity; fire on a value never
/// seen before, except for the very first (trust on first use). Every
/// matching event pushes the expiry to `ttl` after it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirstSeenSpec {
    /// Field path of the value.
    pub field: String,
    /// How long after the last matching event the set is kept.
    pub ttl: String,
}

/// Remember some fields of the last matching event; fire when one of them
/// differs from the previous event's.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangedSpec {
    /// Name → field path of each remembered field.
    pub fields: BTreeMap<String, String>,
    /// How long after the last matching event it is remembered.
    pub ttl: String,
}

/// Remember where the last matching event happened; fire when reaching this
/// one from there is farther than `min_km` and faster than `max_kmh`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TravelSpec {
    /// Field path of the latitude (degrees).
    pub lat: String,
    /// Field path of the longitude (degrees).
    pub lon: String,
    /// Field path of a place name, kept for the alert.
    #[serde(default)]
    pub city: Option<String>,
    /// How long after the last matching event it is remembered.
    pub ttl: String,
    /// Distances up to this many kilometres never fire.
    #[serde(default = "hundred")]
    pub min_km: f64,
    /// Speed above which travel is impossible.
    #[serde(default = "nine_hundred")]
    pub max_kmh: f64,
}

fn hundred() -> f64 {
    100.0
}

fn nine_hundred() -> f64 {
    900.0
}
