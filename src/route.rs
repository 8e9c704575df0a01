//! `riskd route`: re-keys raw events by entity. It consumes `kafka.topics`
//! (group `<group_id>.route`) and produces each event to
//! `<route_prefix><entity type>`, keyed by the entity's id, once per entity
//! the rules key it by: an AssumeRole event goes to the `principal` topic
//! under the caller's ARN and to the `role` topic under the role's. The
//! scorers (`consume = "routed"`) then hold each entity in one partition.
//!
//! Use it when the raw topics are not keyed by the entity every rule uses
//! (most log pipelines key by nothing, or by source): without it, an
//! entity's events are spread over partitions and instances.
//!
//! Delivery is at least once: offsets are committed after the broker has
//! acknowledged what was produced from them. Every routed message carries
//! its upstream place (`riskd-upstream: <topic>/<partition>/<offset>`), and
//! a scorer skips a copy it has already applied, so a router restart
//! repeats messages but never effects.

use crate::config::{Config, KafkaConfig};
use crate::kafka::{
    commit_offsets, consumer_config, ensure_topics, record_error, Context, KafkaFailure, UPSTREAM_HEADER,
};
use crate::pipeline::RunError;
use crate::shutdown::Shutdown;
use crate::sink::KafkaProducer;
use crate::source::{decode_message, Decoded};
use crate::telemetry::{metrics, Health};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a router run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RouteSummary {
    /// Messages read.
    pub read: u64,
    /// Messages produced (one per entity of each event).
    pub routed: u64,
    /// Messages set aside: not JSON, not an object, too large.
    pub invalid: u64,
    /// Events no rule could key (no entity field present).
    pub unkeyed: u64,
}

impl std::fmt::Display for RouteSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "riskd route: events read {}, routed messages {}, invalid {}, no entity {}",
            self.read, self.routed, self.invalid, self.unkeyed
        )
    }
}

/// The entities an event is routed to: `(entity type, id)` for every
/// enabled rule whose entity field it holds, each once.
pub fn entities(cfg: &Config, event: &serde_json::Value) -> BTreeSet<(String, String)> {
    cfg.rules
        .iter()
        .filter(|r| r.enabled)
        .filter_map(|r| {
            let id = r.entity_key.lookup(event).and_then(crate::event::id_string)?;
            Some((r.entity_type.clone(), id))
        })
        .collect()
}

/// The router's consumer: riskd's logs and metrics, nothing more.
type RouterConsumer = BaseConsumer<Context<()>>;

/// Runs the router until shutdown.
pub fn run(cfg: &Config, stop: &Shutdown, health: &Arc<Health>) -> Result<RouteSummary, RunError> {
    let k: &KafkaConfig =
        cfg.kafka.as_ref().ok_or_else(|| RunError::Config("riskd route needs a [kafka] section".into()))?;
    if k.topics.is_empty() {
        return Err(RunError::Config("riskd route: kafka.topics is empty: name the raw topics".into()));
    }
    let mut types: Vec<&str> = cfg.rules.iter().filter(|r| r.enabled).map(|r| r.entity_type.as_str()).collect();
    types.sort_unstable();
    types.dedup();
    let routed: Vec<String> = types.iter().map(|t| k.routed_topic(t)).collect();
    ensure_topics(k, &routed, k.route_partitions)?;
    let producer = KafkaProducer::new(k, "routed")?;
    crate::kafka::register_series(&k.topics, Some("routed"));
    let group = format!("{}.route", k.group_id);
    let consumer: RouterConsumer = consumer_config(k, &group)
        .create_with_context(Context { watch: () })
        .map_err(|e| KafkaFailure::of("creating the router's consumer", &e))?;
    let names: Vec<&str> = k.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&names).map_err(|e| KafkaFailure::of(format!("subscribing to {names:?}"), &e))?;
    health.set_source(None);
    tracing::info!(topics = ?names, group, routed = ?routed, "routing");
    let mut summary = RouteSummary::default();
    // Next offset to commit per upstream partition, once acknowledged.
    let mut positions: BTreeMap<(String, i32), i64> = BTreeMap::new();
    let mut last_flush = Instant::now();
    let mut pending = 0u64;
    while !stop.is_triggered() {
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(e)) => {
                record_error(&e, "poll");
            }
            Some(Ok(m)) => {
                summary.read += 1;
                pending += 1;
                let payload = m.payload().unwrap_or(&[]);
                let offset = m.offset().max(0) as u64;
                match decode_message(payload, offset, cfg.max_line_bytes, &cfg.event_time, crate::event::now_ms()) {
                    Decoded::Blank => {}
                    Decoded::Rejected { reason, detail } => {
                        summary.invalid += 1;
                        metrics().dead_letters.with_label_values(&[reason]).inc();
                        tracing::warn!(
                            topic = m.topic(),
                            partition = m.partition(),
                            offset = m.offset(),
                            reason,
                            detail,
                            "event set aside by the router"
                        );
                    }
                    Decoded::Event(event) => {
                        let targets = entities(cfg, &event.value);
                        if targets.is_empty() {
                            summary.unkeyed += 1;
                        }
                        let upstream = format!("{}/{}/{}", m.topic(), m.partition(), m.offset());
                        for (entity_type, id) in targets {
                            let headers = OwnedHeaders::new()
                                .insert(Header { key: UPSTREAM_HEADER, value: Some(upstream.as_str()) });
                            producer.send(&k.routed_topic(&entity_type), &id, payload, headers)?;
                            summary.routed += 1;
                        }
                    }
                }
                positions.insert((m.topic().to_string(), m.partition()), m.offset() + 1);
            }
        }
        if pending > 0 && (pending >= cfg.flush_every_events || last_flush.elapsed() >= cfg.flush_interval) {
            commit(&consumer, &producer, &mut positions, stop, health)?;
            pending = 0;
            last_flush = Instant::now();
        }
    }
    commit(&consumer, &producer, &mut positions, stop, health)?;
    Ok(summary)
}

/// Waits for the broker to acknowledge what was produced, then commits the
/// upstream offsets it came from (of partitions still held).
fn commit(
    consumer: &RouterConsumer,
    producer: &KafkaProducer,
    positions: &mut BTreeMap<(String, i32), i64>,
    stop: &Shutdown,
    health: &Health,
) -> Result<(), RunError> {
    producer.flush(stop, &|problem| health.set_sink(problem))?;
    let held = consumer.assignment().map_err(|e| KafkaFailure::of("reading the assignment", &e))?;
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in std::mem::take(positions) {
        if held.find_partition(&topic, partition).is_some() {
            tpl.add_partition_offset(&topic, partition, Offset::Offset(offset))
                .map_err(|e| KafkaFailure::of("listing offsets", &e))?;
        }
    }
    // A failed commit: messages are routed again, and scorers skip them.
    commit_offsets(consumer, &tpl, CommitMode::Sync);
    Ok(())
}
