//! The main job reading Kafka: one consumer in the group, the partitions
//! it holds merged in event-time order, a checkpoint per partition.
//!
//! - **Event-time order.** Messages wait in a queue per partition
//!   ([`super::align`]): the next taken is the head with the smallest event
//!   time, a partition with nothing buffered being waited for at most
//!   `kafka.max_idle`. What is taken is held ([`super::order`]) and applied
//!   in event-time order once `event_time.max_delay` has passed it.
//! - **Checkpoints with events held.** A partition's checkpoint stands
//!   before its oldest event held (`offset`), records how far it was taken
//!   (`read`) and the released time: a restart reads from `offset` again,
//!   skips what was applied (at or before the released time, no time of
//!   its own, set aside) and holds the rest again. Until every partition
//!   has been read again that far, nothing is released, so a checkpoint
//!   written meanwhile stays exact.
//! - **Offsets after effects.** Each partition's position (the next offset
//!   to apply) is a checkpoint in the store, `kafka:<topic>:<partition>`,
//!   committed in the same batch as the state it covers. Offsets are
//!   committed to Kafka only after that, so Kafka's committed offset never
//!   runs ahead of the state. A message below the stored position is a
//!   redelivery and is skipped: effects are applied once.
//! - **Rebalance.** On revoke the job flushes (alerts acknowledged, state
//!   and positions committed), commits offsets, forgets every cached value
//!   and only then lets the partitions go, within `kafka.drain_timeout`;
//!   past it, it stops without committing. On assign it loads each
//!   partition's checkpoint and starts the partition there.
//! - **One instance per local store.** The embedded store is one process's:
//!   a member that is given only part of the partitions stops scoring and
//!   says so (a newcomer exits; an instance that held them all pauses,
//!   not ready, until it holds them all again).
//! - **Routed topics** (`consume = "routed"`): on `<prefix><type>` only the
//!   rules of entity type `type` apply, for the entity the message is keyed
//!   by; the router's header names the upstream offset, and a copy the
//!   router produced twice (after a restart of its own) is skipped.
//!
//! The rebalance callback runs inside `poll`, on the job's thread; the job
//! sits behind a mutex that the poll loop never holds while polling.

use super::align::{Align, Next, QUEUE_CAP};
use super::job::{Job, JobSource, Lane, Origin, Settings};
use super::order::Reorder;
use super::outputs::Outputs;
use super::pace::Pace;
use super::retry::RetryPolicy;
use super::{RunError, RunOptions, Summary};
use crate::alert::Alert;
use crate::config::{Config, Consume, KafkaConfig};
use crate::event::{now_ms, Event, TimeSource};
use crate::kafka::{
    commit_offsets, consumer_config, ensure_topics, partition_id, record_error, set_paused, Context, Ends,
    KafkaFailure, Watch, UPSTREAM_HEADER,
};
use crate::rules::{Outcome, Scope};
use crate::shutdown::Shutdown;
use crate::sink::AlertProducer;
use crate::source::{decode_message, Decoded};
use crate::state::{Checkpoint, SharedStore, StateCache, Store};
use crate::telemetry::{metrics, Health};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Messages read (and whose state is loaded in one batch) at a time.
const READ_AHEAD: usize = 1024;

/// A wait on one partition longer than this is a `/readyz` reason.
const LONG_WAIT: Duration = Duration::from_secs(1);

/// A partition held.
struct Partition {
    /// What the next flush commits; `offset` is where a restart reads from.
    cp: Checkpoint,
    /// Next offset to queue (lower ones are redeliveries).
    queued: u64,
    /// Next offset to take from the queue.
    taken: u64,
    /// A resumed partition is read again up to here: of those messages,
    /// only the events held at the commit (after `resumed`) are applied.
    reread_to: u64,
    resumed: Option<i64>,
    /// Routed: upstream positions met while reading again.
    reread_seen: BTreeMap<String, i64>,
}

impl Partition {
    fn new(cp: Checkpoint) -> Self {
        let reread_to = cp.read.map_or(cp.offset, |(offset, _)| offset);
        Self {
            queued: cp.offset,
            taken: cp.offset,
            reread_to,
            resumed: cp.released_ms,
            reread_seen: BTreeMap::new(),
            cp,
        }
    }

    fn rereading(&self) -> bool {
        self.taken < self.reread_to
    }
}

/// A message queued for alignment, decoded.
struct Msg {
    offset: u64,
    payload: Vec<u8>,
    /// Routed: the entity type and id it is for.
    entity: Option<(String, String)>,
    /// Routed: its upstream partition and offset.
    upstream: Option<(String, i64)>,
    decoded: Decoded,
    ingest: i64,
}

/// An event taken: held for order, then applied.
struct Ready {
    id: String,
    offset: u64,
    payload: Vec<u8>,
    entity: Option<(String, String)>,
    event: Event,
    late: bool,
}

/// The job and what the rebalance callback needs beside it.
struct KafkaJob {
    job: Job,
    /// With several lanes: an engine and cache per lane, each caching the
    /// keys of its own entities; the job's own lane then only flushes
    /// (their changes are moved into its cache first).
    lanes: Vec<Lane>,
    /// Each partition held, by source id, and which moved since the last flush.
    partitions: BTreeMap<String, Partition>,
    moved: BTreeSet<String>,
    /// Messages queued per partition, taken in event-time order.
    align: Align<String, Msg>,
    /// Events taken, held until their time is released.
    order: Reorder<Ready>,
    /// The partition the others wait for, since when, and whether that is
    /// a `/readyz` reason yet.
    waiting: Option<(String, Instant, bool)>,
    kafka: KafkaConfig,
    /// The topics subscribed to.
    topics: Vec<String>,
    /// The store is this process's alone (embedded, memory).
    local_store: bool,
    /// This process has held every partition at some point.
    had_all: bool,
    /// Why events are not being applied (a local store given part of the partitions).
    paused: Option<String>,
    /// A failure met in the rebalance callback: the job stops with it.
    failure: Option<RunError>,
    /// The job failed: what it applied and did not commit is given up; no
    /// flush may happen any more (a revoke only lets the partitions go).
    abandoned: bool,
    settings: Settings,
    since_flush: u64,
    pace: Pace,
}

/// The consumer's part of its context: rebalances and readiness.
struct Ctx {
    shared: Arc<Mutex<KafkaJob>>,
    health: Arc<Health>,
    brokers_down: AtomicBool,
    /// Partitions are held and being scored (readiness, once brokers answer again).
    scoring: AtomicBool,
    /// Where the partitions end (alignment waits only for one behind).
    ends: Ends,
    /// Rebalances so far: a message polled before one belongs to the old
    /// assignment (the queues it would join were handed back).
    rebalances: AtomicU64,
}

fn lock(m: &Mutex<KafkaJob>) -> MutexGuard<'_, KafkaJob> {
    // A panic while holding it is a bug that ends the job anyway.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Watch for Ctx {
    fn brokers_up(&self) {
        // Brokers answer again: ready, unless something else holds it back.
        if self.brokers_down.swap(false, Ordering::Relaxed) && self.scoring.load(Ordering::Relaxed) {
            self.health.set_source(None);
        }
    }
    fn brokers_down(&self, reason: &str) {
        self.brokers_down.store(true, Ordering::Relaxed);
        self.health.set_source(Some(format!("kafka brokers unreachable: {reason}")));
    }
    fn ends(&self) -> Option<&Ends> {
        Some(&self.ends)
    }
}

/// The consumer of `riskd run`.
type ScoringConsumer = BaseConsumer<Context<Ctx>>;

impl ConsumerContext for Context<Ctx> {
    fn rebalance(&self, consumer: &ScoringConsumer, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let this = &self.watch;
        this.rebalances.fetch_add(1, Ordering::Relaxed);
        let mut kj = lock(&this.shared);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                metrics().kafka_rebalances.with_label_values(&["assign"]).inc();
                kj.assign(consumer, tpl, &this.health);
                if let Err(e) = consumer.assign(tpl) {
                    kj.fail(KafkaFailure::of("taking the assigned partitions", &e).into());
                }
                this.scoring.store(kj.failure.is_none() && kj.paused.is_none(), Ordering::Relaxed);
            }
            other => {
                metrics().kafka_rebalances.with_label_values(&["revoke"]).inc();
                if other != RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS {
                    tracing::error!(error = ?other, "rebalance failed; giving the partitions up");
                }
                // Not scoring from here until the group assigns partitions
                // again (the flush below may wait for the brokers).
                this.scoring.store(false, Ordering::Relaxed);
                this.health.set_source(Some(format!(
                    "consumer group {:?} is rebalancing: partitions revoked ({other:?}), waiting for an assignment",
                    kj.kafka.group_id
                )));
                kj.revoke(consumer);
                if let Err(e) = consumer.unassign() {
                    tracing::warn!(error = %e, "unassign failed");
                }
            }
        }
    }
}

impl KafkaJob {
    fn fail(&mut self, e: RunError) {
        tracing::error!(error = %e, "kafka job failed; stopping without committing");
        if self.failure.is_none() {
            self.failure = Some(e);
        }
        self.abandoned = true;
        self.job.shutdown().trigger();
    }

    /// Moves the lanes' changes into the job's cache, then flushes
    /// (alerts, state and the positions of the partitions that moved).
    fn flush(&mut self) -> Result<(), RunError> {
        for lane in &mut self.lanes {
            lane.publish_metrics();
            self.job.main().cache.absorb(&mut lane.cache);
        }
        self.settle_positions();
        let moved: Vec<(String, Checkpoint)> =
            self.moved.iter().filter_map(|id| self.partitions.get(id).map(|p| (id.clone(), p.cp.clone()))).collect();
        self.job.flush(&moved)?;
        self.moved.clear();
        if !self.lanes.is_empty() {
            // The lanes hold the live copies.
            self.job.main().cache.drop_clean();
            for lane in &mut self.lanes {
                lane.cache.trim();
            }
        }
        Ok(())
    }

    /// Flushes, then commits the offsets.
    fn flush_and_commit(&mut self, consumer: &ScoringConsumer, mode: CommitMode) -> Result<(), RunError> {
        self.flush()?;
        self.since_flush = 0;
        self.pace.flushed_now();
        let mut tpl = TopicPartitionList::new();
        for (id, p) in &self.partitions {
            let cp = &p.cp;
            if cp.offset == 0 {
                continue;
            }
            if let Some((topic, partition)) = split_id(id) {
                tpl.add_partition_offset(topic, partition, Offset::Offset(cp.offset as i64))
                    .map_err(|e| KafkaFailure::of("listing offsets", &e))?;
            }
        }
        commit_offsets(consumer, &tpl, mode);
        Ok(())
    }

    fn revoke(&mut self, consumer: &ScoringConsumer) {
        if self.abandoned {
            self.partitions.clear();
            return;
        }
        if !self.partitions.is_empty() {
            self.job.set_deadline(Some(Instant::now() + self.kafka.drain_timeout));
            let flushed = self.flush_and_commit(consumer, CommitMode::Sync);
            self.job.set_deadline(None);
            if let Err(e) = flushed {
                // Unflushed effects of partitions another member is about
                // to replay: this process must never commit them.
                self.fail(e);
                return;
            }
        }
        let n = self.partitions.len();
        // What was queued or held is handed back: not applied, and read
        // again (from the checkpoint just committed) by the next owner.
        self.align.retain(|_| false);
        self.order.retain(|_| false);
        self.partitions.clear();
        self.moved.clear();
        self.job.main().cache.forget();
        for lane in &mut self.lanes {
            lane.cache.forget();
        }
        metrics().kafka_partitions.set(0);
        tracing::info!(partitions = n, "partitions revoked: state flushed, offsets committed, cache dropped");
    }

    fn assign(&mut self, consumer: &ScoringConsumer, tpl: &mut TopicPartitionList, health: &Health) {
        if self.abandoned {
            return;
        }
        let held: Vec<(String, i32)> = tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect();
        self.job.set_deadline(Some(Instant::now() + self.kafka.drain_timeout));
        for (topic, partition) in &held {
            let id = partition_id(topic, *partition);
            let found = self.job.retry("load checkpoint", |job| Ok(job.store().checkpoint(&id)?));
            match found {
                Ok(Some(cp)) => {
                    if let Err(e) = tpl.set_partition_offset(topic, *partition, Offset::Offset(cp.offset as i64)) {
                        self.fail(KafkaFailure::of(format!("starting {id} at its checkpoint"), &e).into());
                    }
                    self.order.resume_at(cp.released_ms);
                    self.align.add(id.clone(), Instant::now());
                    self.partitions.insert(id, Partition::new(cp));
                }
                Ok(None) => {
                    self.align.add(id.clone(), Instant::now());
                    self.partitions.insert(id, Partition::new(Checkpoint::default()));
                }
                Err(e) => self.fail(e),
            }
        }
        self.job.set_deadline(None);
        // The flush interval counts from when scoring starts.
        self.pace.restart(Instant::now());
        metrics().kafka_partitions.set(held.len() as i64);
        tracing::info!(partitions = ?held, "partitions assigned");
        if self.local_store {
            let total = total_partitions(consumer, &self.topics);
            if held.len() < total {
                let why = format!(
                    "consumer group {:?} gave this process {} of {total} partitions: another member has joined, \
                     but the {} store is local to one process (run one instance, or use the DynamoDB store)",
                    self.kafka.group_id,
                    held.len(),
                    self.job.store().kind()
                );
                if self.had_all {
                    tracing::error!("{why}; not scoring until this process holds every partition again");
                    health.set_source(Some(why.clone()));
                    self.paused = Some(why);
                } else {
                    self.fail(RunError::Config(why));
                }
                return;
            }
            self.had_all = true;
        }
        if self.paused.take().is_some() {
            tracing::info!("this process holds every partition again: scoring resumes");
        }
        health.set_source(None);
    }

    /// Queues the messages of a batch, decoded (in parallel), on their
    /// partitions: those held, past what was queued already.
    fn intake(&mut self, batch: &[BorrowedMessage<'_>]) {
        if self.paused.is_some() {
            return;
        }
        let routed = self.kafka.consume == Consume::Routed;
        let mut msgs = Vec::with_capacity(batch.len());
        for m in batch {
            let id = partition_id(m.topic(), m.partition());
            let Some(p) = self.partitions.get_mut(&id) else { continue };
            let Ok(offset) = u64::try_from(m.offset()) else { continue };
            if offset < p.queued {
                metrics().kafka_skipped.with_label_values(&[m.topic()]).inc();
                continue;
            }
            p.queued = offset + 1;
            let entity = routed.then(|| {
                let entity_type = m.topic().strip_prefix(self.kafka.route_prefix.as_str()).unwrap_or(m.topic());
                let entity_id = m.key().and_then(|k| std::str::from_utf8(k).ok()).unwrap_or("");
                (entity_type.to_string(), entity_id.to_string())
            });
            let upstream = if routed { upstream_of(m) } else { None };
            msgs.push((id, m.payload().unwrap_or(&[]), offset, entity, upstream));
        }
        let ingest = now_ms();
        let (max_bytes, decoder) = (self.settings.max_line_bytes, &self.job.decoder());
        let decoded = super::parallel_map(&msgs, self.lanes.len().max(1), |(_, payload, offset, entity, _)| {
            // A routed message names its entity in its key: without one, no rule could apply it.
            if entity.as_ref().is_some_and(|(_, id)| id.is_empty()) {
                let detail = "a message on a routed topic has no UTF-8 key (the entity id)".to_string();
                return Decoded::Rejected { reason: "no_key", detail };
            }
            decode_message(payload, *offset, max_bytes, decoder, ingest)
        });
        for ((id, payload, offset, entity, upstream), decoded) in msgs.into_iter().zip(decoded) {
            let time = match &decoded {
                Decoded::Event(e) if e.time_source == TimeSource::Event => Some(e.time_ms),
                _ => None,
            };
            let msg = Msg { offset, payload: payload.to_vec(), entity, upstream, decoded, ingest };
            self.align.push(&id, time, msg);
        }
    }

    /// Takes queued messages in event-time order (while no partition is
    /// waited for) and holds their events; returns the events due.
    fn take(&mut self, health: &Health, ends: &Ends) -> Result<Vec<Ready>, RunError> {
        let mut ready = Vec::new();
        let now = Instant::now();
        for (id, p) in &self.partitions {
            let end = split_id(id).and_then(|(topic, partition)| ends.get(topic, partition));
            self.align.set_at_end(id, end.is_some_and(|end| i64::try_from(p.queued).is_ok_and(|q| q >= end)));
        }
        loop {
            match self.align.next(now) {
                Next::Take(id, msg) => {
                    self.end_wait(health);
                    if let Some(r) = self.settle(id, msg)? {
                        self.hold(r, now, &mut ready);
                    }
                }
                Next::Wait(id) => {
                    self.wait_on(id, now, health);
                    break;
                }
                Next::Empty => {
                    self.end_wait(health);
                    break;
                }
            }
        }
        // Nothing is released until every partition resumed has been read
        // again as far as it was (see the module's notes).
        let rereading = self.partitions.values().any(Partition::rereading);
        self.order.freeze(rereading);
        while let Some(r) = self.order.pop(now) {
            ready.push(r);
        }
        metrics().events_held.set(self.order.len() as i64);
        metrics().kafka_queued.set(self.align.len() as i64);
        if let Some(released) = self.order.released() {
            metrics().watermark_lag.set((now_ms() - released) as f64 / 1000.0);
        }
        Ok(ready)
    }

    /// A message taken from its queue: its event to hold, if it is one to
    /// apply (not set aside, not a copy, not applied before a restart).
    fn settle(&mut self, id: String, msg: Msg) -> Result<Option<Ready>, RunError> {
        let Some(p) = self.partitions.get_mut(&id) else { return Ok(None) };
        let rereading = msg.offset < p.reread_to;
        p.taken = msg.offset + 1;
        self.moved.insert(id.clone());
        self.since_flush += 1;
        if let Some((k, o)) = &msg.upstream {
            let seen = if rereading { &mut p.reread_seen } else { &mut p.cp.upstream };
            if seen.get(k).is_some_and(|s| s >= o) {
                // A copy the router produced again.
                if let Some((topic, _)) = split_id(&id) {
                    metrics().kafka_skipped.with_label_values(&[topic]).inc();
                }
                return Ok(None);
            }
            seen.insert(k.clone(), *o);
        }
        let event = if rereading {
            match msg.decoded {
                Decoded::Event(mut event) => {
                    self.job.reread(&mut event);
                    // Applied before the restart: at or before the released
                    // time, or with no time of its own (applied as read).
                    let resumed = p.resumed;
                    let applied =
                        event.time_source == TimeSource::Ingest || resumed.is_some_and(|r| event.time_ms <= r);
                    (!applied).then_some(event)
                }
                // Counted and set aside before the restart.
                _ => None,
            }
        } else {
            let origin = Origin { source: &id, line: msg.offset };
            self.job.admit(&origin, &msg.payload, msg.decoded, msg.ingest)?
        };
        Ok(event.map(|event| Ready {
            id,
            offset: msg.offset,
            payload: msg.payload,
            entity: msg.entity,
            event,
            late: false,
        }))
    }

    /// Holds an event for order, or puts it in `ready` when it is due.
    fn hold(&mut self, r: Ready, now: Instant, ready: &mut Vec<Ready>) {
        let (time, source) = (r.event.time_ms, r.event.time_source);
        if self.order.take_into(time, source, r, now, ready) {
            if let Some(item) = ready.last_mut() {
                self.job.late(&Origin { source: &item.id, line: item.offset });
                item.late = true;
            }
        }
    }

    /// The others wait for partition `id`: counted, and a `/readyz` reason
    /// once it lasts.
    fn wait_on(&mut self, id: String, now: Instant, health: &Health) {
        match &mut self.waiting {
            Some((waited, since, reported)) if *waited == id => {
                if !*reported && now.saturating_duration_since(*since) >= LONG_WAIT {
                    *reported = true;
                    health.set_source(Some(format!(
                        "waiting up to kafka.max_idle ({:?}) for partition {id}: nothing buffered, and it may hold \
                         earlier events than the other partitions",
                        self.kafka.max_idle
                    )));
                }
            }
            _ => {
                self.end_wait(health);
                if let Some((topic, _)) = split_id(&id) {
                    metrics().kafka_waits.with_label_values(&[topic]).inc();
                }
                self.waiting = Some((id, now, false));
            }
        }
    }

    fn end_wait(&mut self, health: &Health) {
        if let Some((_, since, reported)) = self.waiting.take() {
            metrics().kafka_wait_seconds.inc_by(since.elapsed().as_secs_f64());
            if reported && self.paused.is_none() {
                health.set_source(None);
            }
        }
    }

    /// At a clean stop: the events held are applied (when no partition is
    /// still being read again; else they are handed back).
    fn release_all(&mut self) -> Result<(), RunError> {
        if self.partitions.values().any(Partition::rereading) {
            return Ok(());
        }
        let mut ready = Vec::new();
        while let Some(r) = self.order.pop_any() {
            ready.push(r);
        }
        self.apply(ready)
    }

    /// Sets each moved partition's checkpoint from what is held: before its
    /// oldest event held, with how far it was taken and the released time.
    /// A partition still being read again keeps its checkpoint (nothing
    /// was released meanwhile).
    fn settle_positions(&mut self) {
        let mut oldest: BTreeMap<&str, u64> = BTreeMap::new();
        for r in self.order.items() {
            let o = oldest.entry(r.id.as_str()).or_insert(r.offset);
            *o = (*o).min(r.offset);
        }
        let released = self.order.released();
        let watermark = self.job.position().watermark_ms;
        for id in &self.moved {
            let Some(p) = self.partitions.get_mut(id) else { continue };
            if p.rereading() {
                continue;
            }
            let cp = &mut p.cp;
            match oldest.get(id.as_str()) {
                Some(&o) => (cp.offset, cp.read) = (o, Some((p.taken, p.taken))),
                None => (cp.offset, cp.read) = (p.taken, None),
            }
            cp.line = cp.offset;
            cp.released_ms = released;
            cp.watermark_ms = cp.watermark_ms.max(watermark);
        }
    }

    /// Applies events in order: each lane applies, in order, the events of
    /// its entities; then, in order again, alerts are written.
    fn apply(&mut self, ready: Vec<Ready>) -> Result<(), RunError> {
        if ready.is_empty() {
            return Ok(());
        }
        for r in &ready {
            // A held event applied moves its partition's checkpoint.
            self.moved.insert(r.id.clone());
        }
        let policy = self.job.retry_policy();
        let lanes = match self.lanes.as_mut_slice() {
            [] => std::slice::from_mut(self.job.main()),
            lanes => lanes,
        };
        let per_lane = evaluate(lanes, &ready, &policy)?;
        let mut outcomes: Vec<(Outcome, Vec<Alert>)> = ready.iter().map(|_| Default::default()).collect();
        for (i, outcome, alerts) in per_lane.into_iter().flatten() {
            let (o, a) = &mut outcomes[i];
            o.matched += outcome.matched;
            o.suppressed += outcome.suppressed;
            o.capped += outcome.capped;
            o.problems.extend(outcome.problems);
            a.extend(alerts);
        }
        for (r, (outcome, mut alerts)) in ready.iter().zip(outcomes) {
            self.job.emit(&Origin { source: &r.id, line: r.offset }, &r.payload, outcome, &mut alerts, r.late)?;
        }
        Ok(())
    }

    fn flush_due(&mut self) -> bool {
        // Held events applied later (by wall clock) move positions too.
        !self.moved.is_empty()
            && (self.pace.due(Instant::now(), self.since_flush)
                || self.job.main().cache.over_bounds()
                || self.job.outputs_over_bounds()
                || self.lanes.iter().any(|l| l.cache.over_bounds()))
    }
}

/// What a lane did with one message (by index): the events it applied
/// that matched a rule.
type LaneResults = Vec<(usize, Outcome, Vec<Alert>)>;

/// Each engine (lane) applies, in order, the events of its own entities.
/// Several lanes run on threads of their own; a store failure is retried
/// in the lane (events of a lane are never skipped or applied twice).
fn evaluate(engines: &mut [Lane], ready: &[Ready], policy: &RetryPolicy) -> Result<Vec<LaneResults>, RunError> {
    let lanes = engines.len();
    let run_lane = |lane: usize, engine: &mut Lane| -> Result<LaneResults, RunError> {
        let scope = |i: usize| {
            let entity = ready[i].entity.as_ref().map(|(t, id)| (t.as_str(), id.as_str()));
            let s = Scope { entity, lane: (lanes > 1).then_some((lane, lanes)) };
            (s != Scope::default()).then_some(s)
        };
        if engine.cache.store().batched_reads() {
            let wanted: Vec<(&Event, Option<Scope<'_>>)> =
                ready.iter().enumerate().map(|(i, r)| (&r.event, scope(i))).collect();
            policy.run("load state", || engine.prefetch(&wanted))?;
        }
        let mut out = Vec::new();
        for (i, event) in ready.iter().map(|r| &r.event).enumerate() {
            let mut alerts = Vec::new();
            let outcome = policy.run("load state", || {
                alerts.clear();
                engine.process(event, scope(i), &mut alerts)
            })?;
            if outcome.matched > 0 || !outcome.problems.is_empty() || !alerts.is_empty() {
                out.push((i, outcome, alerts));
            }
        }
        Ok(out)
    };
    if lanes == 1 {
        return Ok(vec![run_lane(0, &mut engines[0])?]);
    }
    std::thread::scope(|s| {
        let handles: Vec<_> =
            engines.iter_mut().enumerate().map(|(lane, e)| s.spawn(move || run_lane(lane, e))).collect();
        handles.into_iter().map(|h| h.join().map_err(|_| RunError::Task("a lane panicked".into()))?).collect()
    })
}

/// Pauses the partitions whose queue is full, resumes those drained.
fn pause_and_resume(consumer: &ScoringConsumer, align: &mut Align<String, Msg>) {
    for (ids, pause) in [(align.take_to_pause(), true), (align.take_to_resume(), false)] {
        let parts: Vec<(&str, i32)> = ids.iter().filter_map(|id| split_id(id)).collect();
        set_paused(consumer, &parts, pause);
    }
}

/// `kafka:<topic>:<partition>` back into its parts.
fn split_id(id: &str) -> Option<(&str, i32)> {
    let rest = id.strip_prefix("kafka:")?;
    let (topic, partition) = rest.rsplit_once(':')?;
    Some((topic, partition.parse().ok()?))
}

/// The routed message's upstream partition and offset (its header).
fn upstream_of(m: &BorrowedMessage<'_>) -> Option<(String, i64)> {
    let headers = m.headers()?;
    let value = headers.iter().find(|h| h.key == UPSTREAM_HEADER)?.value?;
    let text = std::str::from_utf8(value).ok()?;
    let (partition, offset) = text.rsplit_once('/')?;
    Some((partition.to_string(), offset.parse().ok()?))
}

/// Partitions of the subscribed topics, as the brokers' metadata says.
fn total_partitions(consumer: &ScoringConsumer, topics: &[String]) -> usize {
    match consumer.fetch_metadata(None, Duration::from_secs(10)) {
        Ok(md) => {
            md.topics().iter().filter(|t| topics.iter().any(|s| s == t.name())).map(|t| t.partitions().len()).sum()
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read topic metadata to check the assignment");
            0
        }
    }
}

/// The topics `riskd run` subscribes to.
fn subscribed_topics(cfg: &Config, k: &KafkaConfig) -> Vec<String> {
    match k.consume {
        Consume::Raw => k.topics.clone(),
        Consume::Routed => {
            let mut types: Vec<&str> = cfg.rules.iter().filter(|r| r.enabled).map(|r| r.entity_type.as_str()).collect();
            types.sort_unstable();
            types.dedup();
            types.into_iter().map(|t| k.routed_topic(t)).collect()
        }
    }
}

/// Runs the main job from Kafka until shutdown.
pub(super) fn run(
    cfg: Config,
    opts: RunOptions,
    store: Box<dyn Store>,
    shutdown: Shutdown,
    health: Arc<Health>,
) -> Result<Summary, RunError> {
    let k = cfg.kafka.clone().ok_or_else(|| RunError::Config("source.kind = \"kafka\" needs [kafka]".into()))?;
    for w in k.key_warnings(&cfg.rules) {
        tracing::warn!("{w}");
    }
    let topics = subscribed_topics(&cfg, &k);
    health.set_source(Some(format!("connecting to the Kafka brokers {}", k.bootstrap_servers)));
    let consumer = start(&cfg, opts, store, &topics, shutdown.clone(), Arc::clone(&health))?;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&names).map_err(|e| KafkaFailure::of(format!("subscribing to {names:?}"), &e))?;
    health.set_source(Some(format!("waiting for partitions of {names:?} from group {:?}", k.group_id)));
    tracing::info!(topics = ?names, group = %k.group_id, "consuming");
    let shared = Arc::clone(&consumer.context().watch.shared);
    let result = pump(&consumer, &shared, &shutdown, &health);
    let outcome = {
        let mut kj = lock(&shared);
        let failed = match result {
            Err(e) => Some(e),
            Ok(()) => kj.failure.take(),
        };
        let drained = match failed {
            Some(e) => Err(e),
            None => {
                // Draining: commit what is applied, within the drain timeout.
                kj.job.set_deadline(Some(Instant::now() + k.drain_timeout));
                kj.release_all().and_then(|()| kj.flush_and_commit(&consumer, CommitMode::Sync))
            }
        };
        match drained {
            Ok(()) => {
                kj.partitions.clear();
                Ok(kj.job.summary().clone())
            }
            Err(e) => {
                // What is not committed must never be: not even by the
                // revoke that leaving the group runs below.
                kj.abandoned = true;
                Err(e)
            }
        }
    };
    // Leaving the group: the revoke callback finds nothing left to flush.
    drop(consumer);
    if outcome.is_ok() {
        tracing::info!("left the consumer group");
    }
    outcome
}

/// Sets the job up (outputs, alerts topic, lanes) and creates the consumer
/// whose context holds it.
fn start(
    cfg: &Config,
    opts: RunOptions,
    store: Box<dyn Store>,
    topics: &[String],
    shutdown: Shutdown,
    health: Arc<Health>,
) -> Result<ScoringConsumer, RunError> {
    let k = cfg.kafka.clone().ok_or_else(|| RunError::Config("source.kind = \"kafka\" needs [kafka]".into()))?;
    let local_store = !store.batched_reads();
    // File outputs are cut back to what the state covers only where one
    // process owns both: a local store. With a shared store each process
    // appends (a replay may repeat alerts: the alert id tells them apart).
    let source_id = local_store.then(|| format!("kafka:{}:outputs", k.group_id));
    let cp = match &source_id {
        Some(id) => store.checkpoint(id)?.unwrap_or_default(),
        None => Checkpoint::default(),
    };
    let outputs = Outputs::open(cfg, &opts, &cp)?;
    crate::kafka::register_series(topics, k.alerts_topic.as_ref().map(|_| "alert"));
    let source = JobSource { name: format!("kafka {}", topics.join(",")), id: source_id, kind: "kafka", position: cp };
    // Lanes: entities spread by hash over engines applying in parallel, all
    // over one store. A rule with its own dedup key may share that key
    // between entities of different lanes: then one lane.
    let lanes = if cfg.rules.iter().any(|r| r.enabled && r.dedup_key.is_some()) {
        tracing::info!("a rule has its own dedup key: one lane");
        1
    } else {
        k.lanes
    };
    let (store, shared): (Box<dyn Store>, _) = if lanes > 1 {
        let shared = SharedStore::new(store);
        (Box::new(shared.clone()), Some(shared))
    } else {
        (store, None)
    };
    let mut job = Job::new(cfg, opts.reloads, store, outputs, source, (shutdown, Arc::clone(&health)));
    if let Some(topic) = &k.alerts_topic {
        // Brokers away at start: waited for (not ready, saying why).
        job.retry("creating the alerts topic", |_| {
            Ok(ensure_topics(&k, std::slice::from_ref(topic), k.route_partitions)?)
        })?;
        job.add_producer(AlertProducer::new(&k, topic)?);
    }
    let lanes: Vec<Lane> = match &shared {
        None => Vec::new(),
        Some(shared) => (0..lanes)
            .map(|_| {
                let bounds = (cfg.cache_max_entries / lanes, cfg.cache_max_bytes / lanes);
                job.lane(
                    StateCache::with_bounds(Box::new(shared.clone()), bounds.0, bounds.1)
                        .with_expiry_granule(cfg.expiry_granule),
                )
            })
            .collect(),
    };
    tracing::info!(lanes = lanes.len().max(1), "lanes");
    if !local_store {
        job.share_watermark();
    }
    let kj = KafkaJob {
        job,
        lanes,
        partitions: BTreeMap::new(),
        moved: BTreeSet::new(),
        align: Align::new(k.max_idle, QUEUE_CAP),
        order: Reorder::new(cfg.event_time.max_delay(), None),
        waiting: None,
        kafka: k.clone(),
        topics: topics.to_vec(),
        local_store,
        had_all: false,
        paused: None,
        failure: None,
        abandoned: false,
        pace: Settings::new(cfg).pace(),
        settings: Settings::new(cfg),
        since_flush: 0,
    };
    let ctx = Ctx {
        shared: Arc::new(Mutex::new(kj)),
        health,
        brokers_down: AtomicBool::new(false),
        scoring: AtomicBool::new(false),
        ends: Ends::default(),
        rebalances: AtomicU64::new(0),
    };
    Ok(consumer_config(&k, &k.group_id)
        .create_with_context(Context { watch: ctx })
        .map_err(|e| KafkaFailure::of("creating the consumer", &e))?)
}

/// Polls batches and applies them until shutdown or a failure.
fn pump(
    consumer: &ScoringConsumer,
    shared: &Mutex<KafkaJob>,
    shutdown: &Shutdown,
    health: &Health,
) -> Result<(), RunError> {
    // Lanes meet at the end of each batch: larger batches, fewer meetings.
    let ahead = {
        let kj = lock(shared);
        if kj.local_store && kj.lanes.is_empty() {
            256
        } else {
            READ_AHEAD
        }
    };
    let mut batch: Vec<BorrowedMessage<'_>> = Vec::with_capacity(ahead);
    while !shutdown.is_triggered() {
        batch.clear();
        let mut wait = Duration::from_millis(200);
        let rebalances = &consumer.context().watch.rebalances;
        let mut seen = rebalances.load(Ordering::Relaxed);
        while batch.len() < ahead {
            let polled = consumer.poll(wait);
            let now = rebalances.load(Ordering::Relaxed);
            if now != seen {
                // A rebalance ran inside this poll: what was polled before
                // it is read again from the checkpoints (queuing it after
                // the handed-back queues would skip them).
                batch.clear();
                seen = now;
            }
            match polled {
                None => break,
                Some(Ok(m)) => batch.push(m),
                Some(Err(e)) => {
                    record_error(&e, "poll");
                    break;
                }
            }
            wait = Duration::ZERO;
        }
        if !batch.is_empty() && consumer.context().watch.brokers_down.swap(false, Ordering::Relaxed) {
            health.set_source(None);
        }
        let mut kj = lock(shared);
        if let Some(e) = kj.failure.take() {
            return Err(e);
        }
        if kj.abandoned {
            return Err(RunError::Task("the job was abandoned".into()));
        }
        let kj = &mut *kj;
        kj.job.reload(&mut kj.lanes)?;
        kj.intake(&batch);
        batch.clear();
        let ready = kj.take(health, &consumer.context().watch.ends)?;
        kj.apply(ready)?;
        pause_and_resume(consumer, &mut kj.align);
        if kj.flush_due() {
            kj.flush_and_commit(consumer, CommitMode::Async)?;
        }
        if kj.since_flush.is_multiple_of(1024) {
            kj.job.main().publish_metrics();
        }
    }
    Ok(())
}
