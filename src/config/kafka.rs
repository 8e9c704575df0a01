//! `[kafka]`: the broker, the consumer group, the topics riskd reads and
//! writes, and librdkafka properties passed through as they are.
//!
//! Secrets stay out of the file: a property value may name an environment
//! variable as `${NAME}`, read at load time; such values are never logged.

use super::spans::Section;
use crate::rules::Rule;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// `[kafka]`, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaFile {
    /// `host:port[,host:port…]`.
    pub bootstrap_servers: String,
    /// Consumer group of `riskd run` (`riskd route` uses `<group_id>.route`).
    #[serde(default = "default_group")]
    pub group_id: String,
    /// Topics of raw events.
    #[serde(default)]
    pub topics: Vec<String>,
    /// The entity type the raw topics' message key is (for the start-up
    /// check of rules keyed by something else).
    #[serde(default)]
    pub keyed_by: Option<String>,
    /// What `riskd run` consumes: `raw` (the `topics`, every rule applies)
    /// or `routed` (the topics `riskd route` writes, one per entity type).
    #[serde(default = "raw")]
    pub consume: String,
    /// Routed topics are `<route_prefix><entity type>`.
    #[serde(default = "default_prefix")]
    pub route_prefix: String,
    /// Partitions of a routed topic `riskd route` creates (when missing).
    #[serde(default = "default_partitions")]
    pub route_partitions: i32,
    /// Topic alerts are produced to; none when absent.
    #[serde(default)]
    pub alerts_topic: Option<String>,
    /// Longest wait to flush and commit on a rebalance or at shutdown.
    #[serde(default = "default_drain")]
    pub drain_timeout: String,
    /// Longest wall-clock wait for a partition with nothing buffered before
    /// the others go on without it (cross-partition event-time alignment).
    #[serde(default = "default_max_idle")]
    pub max_idle: String,
    /// Lanes applying events in parallel, entities spread over them by
    /// hash (default: the number of CPUs less one, at least one).
    #[serde(default)]
    pub lanes: Option<usize>,
    /// librdkafka properties (`security.protocol`, `sasl.mechanism`,
    /// `ssl.ca.location`, …), for the consumer and the producer alike.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

fn default_group() -> String {
    "riskd".into()
}
fn raw() -> String {
    "raw".into()
}
fn default_prefix() -> String {
    "riskd.entity.".into()
}
fn default_partitions() -> i32 {
    12
}
fn default_drain() -> String {
    "30s".into()
}
fn default_max_idle() -> String {
    "2s".into()
}

/// What `riskd run` reads from Kafka.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Consume {
    /// Raw topics: every rule applies to every event.
    Raw,
    /// Routed topics: on `<prefix><type>`, only rules of entity type `type`
    /// apply, and only for the entity the message is keyed by.
    Routed,
}

/// The validated `[kafka]` section.
#[derive(Clone, Debug)]
pub struct KafkaConfig {
    /// Brokers.
    pub bootstrap_servers: String,
    /// Consumer group.
    pub group_id: String,
    /// Raw topics.
    pub topics: Vec<String>,
    /// Entity type the raw topics are keyed by.
    pub keyed_by: Option<String>,
    /// What `run` consumes.
    pub consume: Consume,
    /// Routed topic prefix.
    pub route_prefix: String,
    /// Partitions of routed topics created by `riskd route`.
    pub route_partitions: i32,
    /// Alerts topic.
    pub alerts_topic: Option<String>,
    /// Drain timeout.
    pub drain_timeout: Duration,
    /// Longest wait for a partition with nothing buffered (alignment).
    pub max_idle: Duration,
    /// Parallel lanes in one process.
    pub lanes: usize,
    /// librdkafka properties, environment references resolved. Values may
    /// be secrets: never log them.
    pub properties: BTreeMap<String, String>,
}

/// Properties riskd sets itself: passing them would break its guarantees.
const RESERVED: [&str; 5] =
    ["group.id", "bootstrap.servers", "enable.auto.commit", "enable.auto.offset.store", "enable.idempotence"];

/// Validates `[kafka]`; every problem goes to `err`.
pub(super) fn build(file: &KafkaFile, entity_types: &[&str], err: &mut Section) -> KafkaConfig {
    if file.bootstrap_servers.trim().is_empty() {
        err.at("bootstrap_servers", "kafka.bootstrap_servers is empty: name at least one host:port".into());
    }
    if file.group_id.trim().is_empty() {
        err.at("group_id", "kafka.group_id is empty".into());
    }
    let consume = match file.consume.as_str() {
        "raw" => Consume::Raw,
        "routed" => Consume::Routed,
        other => {
            err.at("consume", format!("kafka.consume {other:?} is not one of raw, routed"));
            Consume::Raw
        }
    };
    let topics = file.topics.iter().map(|t| ("topics", t)).chain(file.alerts_topic.iter().map(|t| ("alerts_topic", t)));
    for (key, t) in topics {
        if !topic_name_ok(t) {
            err.at(key, format!("{t:?} is not a Kafka topic name (1-249 of a-z A-Z 0-9 . _ -)"));
        }
    }
    if !file.route_prefix.is_empty() && !topic_name_ok(&file.route_prefix) {
        err.at("route_prefix", format!("kafka.route_prefix {:?} is not the start of a topic name", file.route_prefix));
    }
    if file.route_partitions < 1 {
        err.at("route_partitions", "kafka.route_partitions must be at least 1".into());
    }
    if let Some(t) = &file.keyed_by {
        if !entity_types.contains(&t.as_str()) {
            err.at(
                "keyed_by",
                format!("kafka.keyed_by {t:?} is not the entity type of any rule ({})", entity_types.join(", ")),
            );
        }
    }
    let drain_timeout = match humantime::parse_duration(&file.drain_timeout) {
        Ok(d) if !d.is_zero() => d,
        _ => {
            err.at(
                "drain_timeout",
                format!("kafka.drain_timeout {:?} is not a duration above zero, e.g. 30s", file.drain_timeout),
            );
            Duration::from_secs(30)
        }
    };
    let max_idle = humantime::parse_duration(&file.max_idle).unwrap_or_else(|e| {
        err.at("max_idle", format!("kafka.max_idle {:?}: {e} (a duration, e.g. 2s; 0s never waits)", file.max_idle));
        Duration::from_secs(2)
    });
    if file.lanes == Some(0) {
        err.at("lanes", "kafka.lanes must be at least 1".into());
    }
    // By default a lane per CPU but one, left to librdkafka's threads (on
    // 2 CPUs, 2 lanes measured no faster than 1: BENCHMARKS.md).
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let lanes = file.lanes.unwrap_or(cpus.saturating_sub(1)).max(1);
    if let Some(ms) = file.properties.get("max.poll.interval.ms").and_then(|v| v.parse::<u64>().ok()) {
        if Duration::from_millis(ms) <= drain_timeout {
            err.at(
                "drain_timeout",
                format!("kafka.drain_timeout must be below max.poll.interval.ms ({ms} ms): a revoke must finish before the group moves on"),
            );
        }
    }
    KafkaConfig {
        bootstrap_servers: file.bootstrap_servers.clone(),
        group_id: file.group_id.clone(),
        topics: file.topics.clone(),
        keyed_by: file.keyed_by.clone(),
        consume,
        route_prefix: file.route_prefix.clone(),
        route_partitions: file.route_partitions,
        alerts_topic: file.alerts_topic.clone(),
        drain_timeout,
        max_idle,
        lanes,
        properties: properties(file, err),
    }
}

/// The librdkafka properties of `[kafka.properties]`, environment references
/// resolved; reserved and unresolvable ones are reported and left out.
fn properties(file: &KafkaFile, err: &mut Section) -> BTreeMap<String, String> {
    let mut properties = BTreeMap::new();
    for (k, v) in &file.properties {
        if RESERVED.contains(&k.as_str()) {
            err.at_path(
                &["properties", k],
                format!("kafka.properties.{k:?} is set by riskd (use the kafka.* keys, or leave it out)"),
            );
            continue;
        }
        match resolve_env(v) {
            Ok(v) => {
                properties.insert(k.clone(), v);
            }
            Err(name) => err.at_path(
                &["properties", k],
                format!("kafka.properties.{k:?} names environment variable {name}, which is not set"),
            ),
        }
    }
    properties
}

impl KafkaConfig {
    /// The routed topic of an entity type.
    pub fn routed_topic(&self, entity_type: &str) -> String {
        format!("{}{entity_type}", self.route_prefix)
    }
}

fn topic_name_ok(t: &str) -> bool {
    (1..=249).contains(&t.len()) && t.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Replaces every `${NAME}` with the variable's value; `Err(NAME)` when unset.
fn resolve_env(value: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        let Some(len) = rest[start + 2..].find('}') else { break };
        let name = &rest[start + 2..start + 2 + len];
        out.push_str(&rest[..start]);
        out.push_str(&std::env::var(name).map_err(|_| name.to_string())?);
        rest = &rest[start + 3 + len..];
    }
    out.push_str(rest);
    Ok(out)
}

impl KafkaConfig {
    /// Rules whose entity is not what the raw topics are keyed by, and that
    /// are not `consistency: direct`: their entity's events are spread over
    /// partitions, so several instances would each hold part of its state
    /// in their caches. (Routed topics are keyed by every rule's entity.)
    pub fn key_warnings(&self, rules: &[Rule]) -> Vec<String> {
        if self.consume == Consume::Routed {
            return Vec::new();
        }
        let keyed = self.keyed_by.as_deref();
        rules
            .iter()
            .filter(|r| r.enabled && !r.direct && keyed != Some(r.entity_type.as_str()))
            .map(|r| {
                let by = keyed
                    .map_or("nothing riskd knows (kafka.keyed_by is not set)".to_string(), |k| format!("entity type {k}"));
                format!(
                    "rule {}: its entity ({}) is not what topics {} are keyed by ({by}), and it is not consistency: direct; \
                     run `riskd route` and consume = \"routed\", or make it direct",
                    r.id,
                    r.entity_type,
                    self.topics.join(", ")
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_references_are_resolved() {
        std::env::set_var("RISKD_TEST_SECRET_X", "s3cret");
        assert_eq!(resolve_env("a-${RISKD_TEST_SECRET_X}-b").unwrap(), "a-s3cret-b");
        assert_eq!(resolve_env("plain").unwrap(), "plain");
        assert_eq!(resolve_env("${RISKD_TEST_UNSET_Y}").unwrap_err(), "RISKD_TEST_UNSET_Y");
    }
}
