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
//! Order: the router takes the messages of the partitions it reads in
//! event-time order ([`crate::pipeline::align`], waiting at most
//! `kafka.max_idle` for a partition with nothing buffered), so with one
//! router the routed topics hold each entity's events in event-time order
//! whatever the raw partitioning. Several routers each order their own
//! partitions: a routed partition then interleaves their streams, in order
//! within the drift between them, which the scorers' `event_time.max_delay`
//! absorbs.
//!
//! Delivery is at least once: offsets are committed after the broker has
//! acknowledged what was produced from them. Every routed message carries
//! its upstream place (`riskd-upstream: <topic>/<partition>/<offset>`), and
//! a scorer skips a copy it has already applied, so a router restart
//! repeats messages but never effects.

use crate::config::{Config, KafkaConfig};
use crate::event::TimeSource;
use crate::kafka::{
    commit_offsets, consumer_config, ensure_topics, record_error, set_paused, Context, Ends, KafkaFailure,
    UPSTREAM_HEADER,
};
use crate::pipeline::align::{Align, Next, QUEUE_CAP};
use crate::pipeline::RunError;
use crate::shutdown::Shutdown;
use crate::sink::KafkaProducer;
use crate::source::{decode_message, Decoded, Decoder};
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
type RouterConsumer = BaseConsumer<Context<Ends>>;

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
        .create_with_context(Context { watch: Ends::default() })
        .map_err(|e| KafkaFailure::of("creating the router's consumer", &e))?;
    let names: Vec<&str> = k.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&names).map_err(|e| KafkaFailure::of(format!("subscribing to {names:?}"), &e))?;
    health.set_source(None);
    tracing::info!(topics = ?names, group, routed = ?routed, "routing");
    let mut summary = RouteSummary::default();
    // Next offset to commit per upstream partition, once acknowledged.
    let mut positions: BTreeMap<(String, i32), i64> = BTreeMap::new();
    let mut align: Align<(String, i32), Queued> = Align::new(k.max_idle, QUEUE_CAP);
    let mut queued: BTreeMap<(String, i32), i64> = BTreeMap::new();
    // The partition the others wait for, and since when (metrics).
    let mut waiting: Option<((String, i32), Instant)> = None;
    let mut last_flush = Instant::now();
    let mut pending = 0u64;
    let decoder = Decoder::new(&cfg.rules, &cfg.event_time);
    while !stop.is_triggered() {
        let polled = poll_batch(&consumer);
        // Partitions given in this poll are queued before their messages.
        follow_assignment(&consumer, &mut align, &mut queued);
        let ingest = crate::event::now_ms();
        for (key, offset, payload) in polled {
            queued.insert(key.clone(), offset + 1);
            let line = u64::try_from(offset).unwrap_or(0);
            let decoded = decode_message(&payload, line, cfg.max_line_bytes, &decoder, ingest);
            let time = match &decoded {
                Decoded::Event(e) if e.time_source == TimeSource::Event => Some(e.time_ms),
                _ => None,
            };
            align.push(&key, time, Queued { offset, payload, decoded });
        }
        loop {
            match align.next(Instant::now()) {
                Next::Take((topic, partition), q) => {
                    if let Some((_, since)) = waiting.take() {
                        metrics().kafka_wait_seconds.inc_by(since.elapsed().as_secs_f64());
                    }
                    summary.read += 1;
                    pending += 1;
                    let next = q.offset + 1;
                    route_one(cfg, &producer, (&topic, partition), q, &mut summary)?;
                    positions.insert((topic, partition), next);
                }
                Next::Wait(key) => {
                    if waiting.as_ref().is_none_or(|(k, _)| *k != key) {
                        if let Some((_, since)) = waiting.take() {
                            metrics().kafka_wait_seconds.inc_by(since.elapsed().as_secs_f64());
                        }
                        metrics().kafka_waits.with_label_values(&[key.0.as_str()]).inc();
                        waiting = Some((key, Instant::now()));
                    }
                    break;
                }
                Next::Empty => break,
            }
        }
        metrics().kafka_queued.set(align.len() as i64);
        for (parts, pause) in [(align.take_to_pause(), true), (align.take_to_resume(), false)] {
            let parts: Vec<(&str, i32)> = parts.iter().map(|(t, p)| (t.as_str(), *p)).collect();
            set_paused(&consumer, &parts, pause);
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

/// A raw message queued for alignment, decoded.
struct Queued {
    offset: i64,
    payload: Vec<u8>,
    decoded: Decoded,
}

/// Polls up to a batch of messages, copied out: `((topic, partition), offset, payload)`.
fn poll_batch(consumer: &RouterConsumer) -> Vec<((String, i32), i64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut wait = Duration::from_millis(200);
    while out.len() < 1024 {
        match consumer.poll(wait) {
            None => break,
            Some(Err(e)) => {
                record_error(&e, "poll");
                break;
            }
            Some(Ok(m)) => {
                out.push(((m.topic().to_string(), m.partition()), m.offset(), m.payload().unwrap_or(&[]).to_vec()));
            }
        }
        wait = Duration::ZERO;
    }
    out
}

/// The queues follow the assignment: partitions given are waited for
/// (unless at their end), those taken away are dropped (their next owner
/// routes them). `queued` is the next offset queued per partition.
fn follow_assignment(
    consumer: &RouterConsumer,
    align: &mut Align<(String, i32), Queued>,
    queued: &mut BTreeMap<(String, i32), i64>,
) {
    let Ok(held) = consumer.assignment() else { return };
    let held: BTreeSet<(String, i32)> =
        held.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect();
    align.retain(|k| held.contains(k));
    queued.retain(|k, _| held.contains(k));
    let now = Instant::now();
    let ends = &consumer.context().watch;
    for k in held {
        let at_end = match (queued.get(&k), ends.get(&k.0, k.1)) {
            (Some(q), Some(end)) => *q >= end,
            _ => false,
        };
        align.add(k.clone(), now);
        align.set_at_end(&k, at_end);
    }
}

/// Produces one raw message to the routed topic of each of its entities.
fn route_one(
    cfg: &Config,
    producer: &KafkaProducer,
    (topic, partition): (&str, i32),
    q: Queued,
    summary: &mut RouteSummary,
) -> Result<(), RunError> {
    let k = cfg.kafka.as_ref().ok_or_else(|| RunError::Config("riskd route needs a [kafka] section".into()))?;
    match q.decoded {
        Decoded::Blank => {}
        Decoded::Rejected { reason, detail } => {
            summary.invalid += 1;
            metrics().dead_letters.with_label_values(&[reason]).inc();
            tracing::warn!(topic, partition, offset = q.offset, reason, detail, "event set aside by the router");
        }
        Decoded::Event(event) => {
            let targets = entities(cfg, &event.value);
            if targets.is_empty() {
                summary.unkeyed += 1;
            }
            let upstream = format!("{topic}/{partition}/{}", q.offset);
            for (entity_type, id) in targets {
                let headers =
                    OwnedHeaders::new().insert(Header { key: UPSTREAM_HEADER, value: Some(upstream.as_str()) });
                producer.send(&k.routed_topic(&entity_type), &id, &q.payload, headers)?;
                summary.routed += 1;
            }
        }
    }
    Ok(())
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
