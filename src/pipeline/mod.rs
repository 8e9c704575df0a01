//! The main job: read → decode → evaluate → write alerts, with a checkpoint
//! every `flush_every_events`.
//!
//! Order at each flush: alerts and dead letters are made durable first, then
//! the state changes and the checkpoint (input offset, output lengths) are
//! committed in one store batch. A crash before the commit leaves outputs
//! longer than the checkpoint says; the restart cuts them back and replays
//! from the checkpoint, and since evaluation is deterministic on event time
//! it writes the same alerts again. So a run killed at any point and
//! restarted ends with exactly the state and alerts of one uninterrupted run.
//!
//! Reading Kafka instead of a file is [`kafka`]: the same job, a position
//! per partition.

mod kafka;

use crate::config::{Config, StoreKind, Stream};
use crate::event::{now_ms, Event, EventTime};
use crate::rules::Scope;
use crate::rules::{Alert, Engine, Outcome, Problem};
use crate::sink::AlertProducer;
use crate::sink::{DeadLetter, JsonLinesSink};
use crate::source::{JsonLines, LineInfo};
use crate::state::{
    dynamodb, Checkpoint, DynamoStore, EmbeddedStore, Instrumented, MemoryStore, StateCache, StateError, Store,
    WATERMARK_KEY,
};
use crate::telemetry::{metrics, Health};
use prometheus::IntCounter;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How to run: overrides of the config's input and alert output (`--input`,
/// `--alerts`), and live reload.
#[derive(Debug, Default)]
pub struct RunOptions {
    /// Replaces `[source] path`.
    pub input: Option<Stream>,
    /// Replaces `[sink] path`.
    pub alerts: Option<Stream>,
    /// Reload rules and scoring on SIGHUP and when their files change.
    pub watch: bool,
    /// Reloaded configs to swap in (set by [`run`] when `watch` is on).
    pub reloads: Option<std::sync::mpsc::Receiver<Config>>,
}

/// What a run did.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Lines read in this run (blank lines aside).
    pub read: u64,
    /// Lines that were not JSON or not an object.
    pub invalid: u64,
    /// Lines over the size limit.
    pub too_large: u64,
    /// Events some rule had to skip (a field it needs is absent).
    pub incomplete: u64,
    /// Alerts written.
    pub alerts: u64,
    /// Alerts suppressed by dedup.
    pub suppressed: u64,
    /// Of the alerts, `entity_risk` alerts.
    pub risk_alerts: u64,
    /// The line the run resumed after (0: from the start).
    pub resumed_after_line: u64,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "riskd: events read {}, skipped {} (invalid {}, too large {}), incomplete {}, alerts {}, suppressed {}, risk alerts {}",
            self.read,
            self.invalid + self.too_large,
            self.invalid,
            self.too_large,
            self.incomplete,
            self.alerts,
            self.suppressed,
            self.risk_alerts
        )?;
        if self.resumed_after_line > 0 {
            write!(f, " (resumed after line {})", self.resumed_after_line)?;
        }
        Ok(())
    }
}

/// Why a run stopped early.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A file could not be read or written.
    #[error("{what} {path}: {source}")]
    Io {
        /// Which file: input, alerts, dead letters.
        what: &'static str,
        /// Its path.
        path: String,
        /// The OS error.
        source: io::Error,
    },
    /// The state store failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// The config cannot run as it is.
    #[error("{0}")]
    Config(String),
    /// A Kafka client failed for good.
    #[error(transparent)]
    Kafka(#[from] crate::source::kafka::KafkaFailure),
    /// The processing thread panicked (a bug).
    #[error("processing task failed: {0}")]
    Task(String),
}

fn io_err<'a>(what: &'static str, path: &'a str) -> impl FnOnce(io::Error) -> RunError + 'a {
    move |source| RunError::Io { what, path: path.to_string(), source }
}

/// Opens the configured store, with metrics around it. The DynamoDB store
/// blocks on its own runtime: open and use it from a blocking thread, not an
/// async task.
pub fn open_store(kind: &StoreKind) -> Result<Box<dyn Store>, StateError> {
    let inner: Box<dyn Store> = match kind {
        StoreKind::Memory => Box::new(MemoryStore::new()),
        StoreKind::Embedded(path) => Box::new(EmbeddedStore::open(path)?),
        StoreKind::DynamoDb(cfg) => Box::new(DynamoStore::open(cfg)?),
    };
    Ok(Box::new(Instrumented::new(inner)))
}

/// `riskd store init`: sets up what the configured store needs (a DynamoDB
/// table with TTL); returns what was done, one line per step. Blocks.
pub fn init_store(kind: &StoreKind) -> Result<Vec<String>, StateError> {
    match kind {
        StoreKind::DynamoDb(cfg) => dynamodb::init_table(cfg),
        StoreKind::Embedded(path) => {
            Ok(vec![format!("the embedded store needs no setup: {} is created on first use", path.display())])
        }
        StoreKind::Memory => Ok(vec!["the memory store needs no setup".into()]),
    }
}

/// `riskd store check`: everything wrong with the configured store's setup
/// (empty when nothing is). Blocks.
pub fn check_store(kind: &StoreKind) -> Result<Vec<String>, StateError> {
    match kind {
        StoreKind::DynamoDb(cfg) => dynamodb::check_table(cfg),
        StoreKind::Embedded(_) | StoreKind::Memory => Ok(Vec::new()),
    }
}

/// `riskd store prune`: removes what the store keeps and no longer needs
/// (DynamoDB commit markers of runs no item names). Blocks.
pub fn prune_store(kind: &StoreKind, idle: Duration) -> Result<Vec<String>, StateError> {
    match kind {
        StoreKind::DynamoDb(cfg) => dynamodb::prune_markers(cfg, idle),
        StoreKind::Embedded(_) | StoreKind::Memory => Ok(vec!["this store keeps no commit markers".into()]),
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

struct Outputs {
    alerts: Option<JsonLinesSink>,
    alerts_key: Option<String>,
    /// Alerts to a Kafka topic.
    producer: Option<AlertProducer>,
    dead: Option<(JsonLinesSink, String)>,
}

impl Outputs {
    /// Syncs every output; returns the lengths to record in the checkpoint.
    fn sync(&mut self) -> Result<BTreeMap<String, u64>, RunError> {
        let mut lens = BTreeMap::new();
        if let Some(alerts) = &mut self.alerts {
            let len = alerts.sync().map_err(io_err("alerts", "output"))?;
            if let Some(k) = &self.alerts_key {
                lens.insert(k.clone(), len);
            }
        }
        if let Some((sink, key)) = &mut self.dead {
            lens.insert(key.clone(), sink.sync().map_err(io_err("dead-letter file", key))?);
        }
        Ok(lens)
    }

    fn alert(&mut self, alert: &Alert) -> Result<(), RunError> {
        if let Some(sink) = &mut self.alerts {
            sink.write(alert).map_err(io_err("alerts", "output"))?;
        }
        if let Some(producer) = &self.producer {
            producer.send(alert)?;
        }
        Ok(())
    }

    fn dead_letter(&mut self, letter: &DeadLetter<'_>) -> Result<(), RunError> {
        tracing::warn!(source = letter.source, line = letter.line, reason = letter.reason, detail = %letter.detail, "event set aside");
        metrics().dead_letters.with_label_values(&[letter.reason]).inc();
        if let Some((sink, key)) = &mut self.dead {
            sink.write(letter).map_err(io_err("dead-letter file", key))?;
        }
        Ok(())
    }
}

/// Metric handles of the read loop, resolved once.
struct EventMetrics {
    ok: IntCounter,
    invalid: IntCounter,
    too_large: IntCounter,
    incomplete: IntCounter,
}

impl EventMetrics {
    fn new(source_kind: &str) -> Self {
        let c = |outcome| metrics().events.with_label_values(&[source_kind, outcome]);
        Self { ok: c("ok"), invalid: c("invalid"), too_large: c("too_large"), incomplete: c("incomplete") }
    }
}

/// One run of the main job: the engine, the outputs and the positions.
struct Job {
    engine: Engine,
    /// Kafka with several lanes: an engine per lane, each caching the keys
    /// of its own entities; `engine` then only flushes (their changes are
    /// moved into its cache first).
    lanes: Vec<Engine>,
    outputs: Outputs,
    source_name: String,
    source_id: Option<String>,
    /// Position after the last line fully applied (a file), or where the
    /// outputs stand (Kafka).
    position: Checkpoint,
    /// Kafka: the position of each partition held, by source id, and
    /// which moved since the last flush.
    partitions: BTreeMap<String, Checkpoint>,
    moved: std::collections::BTreeSet<String>,
    /// The watermark is written by several processes (a shared store and
    /// Kafka): it is raised atomically rather than cached.
    shared_watermark: bool,
    summary: Summary,
    alerts: Vec<Alert>,
    counters: EventMetrics,
    health: Arc<Health>,
    stop: Arc<AtomicBool>,
    /// While set, store retries go on until then even once `stop` is set
    /// (a drain), and give up after it even if not.
    deadline: Option<Instant>,
    reloads: Option<std::sync::mpsc::Receiver<Config>>,
    /// Records expired this long before the watermark are deleted from the
    /// store (embedded), at most once per [`PURGE_EVERY`].
    purge_after: Option<Duration>,
    last_purge: Option<Instant>,
}

/// How often expired records are purged from the embedded store.
const PURGE_EVERY: Duration = Duration::from_secs(3600);

/// The parts of the config the read loop needs after the rules moved into the engine.
struct JobSettings {
    max_line_bytes: usize,
    event_time: EventTime,
    flush_every_events: u64,
    flush_interval: Duration,
    follow: bool,
}

/// Lines read ahead (and whose state is loaded in one batch) for a remote store.
const READ_AHEAD: usize = 1024;

/// Waits between retries of a failing store: doubling from 100 ms to 10 s.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(10);

impl Job {
    /// Runs `f` until it succeeds, backing off while the store fails (and
    /// reporting not-ready): events are never dropped. Gives up only on
    /// shutdown or on an error a retry cannot mend.
    fn retry<T>(&mut self, what: &str, mut f: impl FnMut(&mut Self) -> Result<T, RunError>) -> Result<T, RunError> {
        let policy = self.retry_policy();
        policy.run(what, || f(self))
    }

    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy { stop: Arc::clone(&self.stop), deadline: self.deadline, health: Arc::clone(&self.health) }
    }

    /// Makes the outputs durable, then commits state and checkpoint together.
    fn flush(&mut self) -> Result<(), RunError> {
        let start = Instant::now();
        self.engine.publish_metrics();
        for lane in &mut self.lanes {
            lane.publish_metrics();
            self.engine.cache().absorb(lane.cache());
        }
        let result = self.retry("flush", |job| {
            job.position.outputs = job.outputs.sync()?;
            // Alerts on a topic are acknowledged before the state that
            // produced them is committed (and offsets after that).
            if let Some(producer) = &job.outputs.producer {
                let health = &job.health;
                producer.flush(&job.stop, &|problem| health.set_sink(problem))?;
            }
            // The latest event time seen: "now" for `riskd entity` and state browsing.
            let wm = job.position.watermark_ms;
            if job.shared_watermark {
                job.engine.cache().store_mut().update(WATERMARK_KEY, wm, &mut |r| {
                    let raise = r.count < wm;
                    r.count = r.count.max(wm);
                    raise
                })?;
            } else {
                let clock = job.engine.cache().write(WATERMARK_KEY, wm)?;
                clock.count = clock.count.max(wm);
            }
            let mut cps: Vec<(String, Checkpoint)> =
                job.source_id.iter().map(|id| (id.clone(), job.position.clone())).collect();
            for id in &job.moved {
                if let Some(cp) = job.partitions.get(id) {
                    cps.push((id.clone(), cp.clone()));
                }
            }
            Ok(job.engine.cache().flush(&cps)?)
        });
        if result.is_ok() {
            self.moved.clear();
            self.purge();
            if !self.lanes.is_empty() {
                // The lanes hold the live copies.
                self.engine.cache().drop_clean();
                for lane in &mut self.lanes {
                    lane.cache().trim();
                }
            }
        }
        let m = metrics();
        match &result {
            Ok(keys) => {
                m.flushes.with_label_values(&["ok"]).inc();
                m.flush_keys.observe(*keys as f64);
                tracing::debug!(keys, line = self.position.line, "flushed state");
            }
            Err(_) => m.flushes.with_label_values(&["error"]).inc(),
        }
        m.flush_seconds.observe(start.elapsed().as_secs_f64());
        result.map(|_| ())
    }

    /// Deletes the records long expired (event time) from the store, once
    /// an hour at most. A failure only leaves them for the next time.
    fn purge(&mut self) {
        let Some(after) = self.purge_after else { return };
        let wm = self.position.watermark_ms;
        if wm <= 0 || self.last_purge.is_some_and(|t| t.elapsed() < PURGE_EVERY) {
            return;
        }
        self.last_purge = Some(Instant::now());
        let before = wm.saturating_sub(i64::try_from(after.as_millis()).unwrap_or(i64::MAX));
        match self.engine.cache().store_mut().purge_expired(before) {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(records = n, before = %crate::event::format_time_ms(before), "purged expired records")
            }
            Err(e) => tracing::warn!(error = %e, "purging expired records failed; they stay until the next purge"),
        }
    }

    /// Swaps in every reloaded config that has arrived.
    fn reload(&mut self) -> Result<(), RunError> {
        while let Some(cfg) = self.reloads.as_ref().and_then(|rx| rx.try_recv().ok()) {
            let n = cfg.rules.len();
            let rules = cfg.rules;
            let scoring = Arc::new(cfg.scoring);
            let fresh =
                self.retry("reload", |job| Ok(job.engine.set_rules(Arc::clone(&rules), Arc::clone(&scoring))?))?;
            for i in 0..self.lanes.len() {
                self.retry("reload", |job| Ok(job.lanes[i].set_rules(Arc::clone(&rules), Arc::clone(&scoring))?))?;
            }
            tracing::info!(rules = n, fresh = ?fresh, "config reloaded");
        }
        Ok(())
    }

    fn set_aside(&mut self, at: &Origin<'_>, reason: &'static str, detail: String, raw: &[u8]) -> Result<(), RunError> {
        let letter = DeadLetter {
            source: at.source,
            line: at.line,
            reason,
            detail,
            raw: String::from_utf8_lossy(raw).into_owned(),
        };
        self.outputs.dead_letter(&letter)
    }

    /// Loads the state the events need in one batch (remote stores).
    fn prefetch<'e>(&mut self, events: impl Iterator<Item = (&'e Decoded, Option<Scope<'e>>)>) -> Result<(), RunError> {
        let events: Vec<(&Event, Option<Scope<'_>>)> = events
            .filter_map(|(d, scope)| match d {
                Decoded::Event(e) => Some((e, scope)),
                _ => None,
            })
            .collect();
        if events.is_empty() {
            return Ok(());
        }
        self.retry("load state", |job| Ok(job.engine.prefetch(&events)?))
    }

    /// Applies one decoded line (`buf` is the line as read) to the rules in
    /// `scope`; the position is advanced by the caller.
    fn line(
        &mut self,
        at: &Origin<'_>,
        buf: &[u8],
        decoded: Decoded,
        ingest: i64,
        scope: Option<Scope<'_>>,
    ) -> Result<(), RunError> {
        let Some(event) = self.admit(at, buf, decoded, ingest)? else { return Ok(()) };
        // The engine loads every key before changing anything, so a store
        // failure leaves the event unapplied and it can be retried whole.
        let mut alerts = std::mem::take(&mut self.alerts);
        let outcome = self.retry("load state", |job| Ok(job.engine.process(&event, scope, &mut alerts)?));
        let result = match outcome {
            Ok(o) => self.emit(at, buf, o, &mut alerts),
            Err(e) => Err(e),
        };
        alerts.clear();
        self.alerts = alerts;
        result
    }

    /// Counts a decoded line and sets aside one that is not an event; the
    /// event, if it is one.
    fn admit(&mut self, at: &Origin<'_>, buf: &[u8], decoded: Decoded, ingest: i64) -> Result<Option<Event>, RunError> {
        let event = match decoded {
            Decoded::Blank => return Ok(None),
            Decoded::Rejected { reason, detail } => {
                self.summary.read += 1;
                if reason == "too_large" {
                    self.summary.too_large += 1;
                    self.counters.too_large.inc();
                } else {
                    self.summary.invalid += 1;
                    self.counters.invalid.inc();
                }
                self.set_aside(at, reason, detail, buf)?;
                return Ok(None);
            }
            Decoded::Event(event) => event,
        };
        self.summary.read += 1;
        if event.time_from_event {
            self.position.watermark_ms = self.position.watermark_ms.max(event.time_ms);
            metrics().event_lag.observe((ingest - event.time_ms) as f64 / 1000.0);
        } else {
            metrics().event_time_missing.inc();
        }
        Ok(Some(event))
    }

    /// Writes an applied event's alerts, counts it, and sets it aside as
    /// incomplete when a rule had to skip it.
    fn emit(&mut self, at: &Origin<'_>, buf: &[u8], outcome: Outcome, alerts: &mut Vec<Alert>) -> Result<(), RunError> {
        let m = metrics();
        self.summary.suppressed += u64::from(outcome.suppressed);
        for alert in alerts.drain(..) {
            tracing::info!(rule = %alert.rule_id, entity_type = %alert.entity.type_, alert_id = %alert.alert_id, "alert");
            m.alerts.with_label_values(&[alert.rule_id.as_str(), alert.severity.as_str()]).inc();
            self.outputs.alert(&alert)?;
            self.summary.alerts += 1;
            self.summary.risk_alerts += u64::from(alert.rule_id == crate::scoring::RISK_RULE_ID);
        }
        if outcome.problems.is_empty() {
            self.counters.ok.inc();
        } else {
            self.summary.incomplete += 1;
            self.counters.incomplete.inc();
            for p in &outcome.problems {
                m.rule_skips.with_label_values(&[p.rule_id.as_str(), "missing_field"]).inc();
            }
            let detail = describe(&outcome.problems);
            self.set_aside(at, "incomplete", detail, buf)?;
        }
        Ok(())
    }
}

/// How store failures are retried: with backoff, reporting not-ready,
/// until `stop` (or, when set, until the deadline).
#[derive(Clone)]
struct RetryPolicy {
    stop: Arc<AtomicBool>,
    /// While set, retries go on until then even once `stop` is set (a
    /// drain), and give up after it even if not.
    deadline: Option<Instant>,
    health: Arc<Health>,
}

impl RetryPolicy {
    fn run<T>(&self, what: &str, mut f: impl FnMut() -> Result<T, RunError>) -> Result<T, RunError> {
        let mut wait = RETRY_FIRST;
        let mut failing = false;
        loop {
            match f() {
                Ok(v) => {
                    if failing {
                        tracing::info!(what, "store reachable again");
                        self.health.set_store(None);
                    }
                    return Ok(v);
                }
                Err(RunError::State(e)) if e.is_transient() => {
                    tracing::warn!(what, error = %e, retry_in_ms = wait.as_millis() as u64, "store failed; retrying");
                    self.health.set_store(Some(e.to_string()));
                    failing = true;
                    match self.deadline {
                        None if !sleep_unless_stopped(wait, &self.stop) => return Err(RunError::State(e)),
                        None => {}
                        Some(d) => {
                            let left = d.saturating_duration_since(Instant::now());
                            if left.is_zero() {
                                return Err(RunError::State(e));
                            }
                            std::thread::sleep(wait.min(left));
                        }
                    }
                    wait = (wait * 2).min(RETRY_MAX);
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Where a line came from, for dead letters: a file and line, or a Kafka
/// partition and offset.
struct Origin<'a> {
    source: &'a str,
    line: u64,
}

/// One input line, decoded.
pub enum Decoded {
    /// Only white space: not an event, not an error.
    Blank,
    /// Set aside: `reason` is `too_large`, `invalid_json`, `not_object`, or
    /// (a routed Kafka message without its entity key) `no_key`.
    Rejected {
        /// Dead-letter reason.
        reason: &'static str,
        /// The details (the parser's message).
        detail: String,
    },
    /// An event.
    Event(Event),
}

/// Decodes one line read by [`JsonLines`] into an event, with its time.
pub fn decode(buf: &[u8], info: &LineInfo, max_line_bytes: usize, event_time: &EventTime, ingest_ms: i64) -> Decoded {
    if info.too_large {
        let detail = format!("line is {} bytes, over the {max_line_bytes}-byte limit", info.len);
        return Decoded::Rejected { reason: "too_large", detail };
    }
    if buf.iter().all(u8::is_ascii_whitespace) {
        return Decoded::Blank;
    }
    match serde_json::from_slice::<Value>(buf) {
        Ok(v @ Value::Object(_)) => Decoded::Event(event_time.event(v, ingest_ms)),
        Ok(_) => Decoded::Rejected { reason: "not_object", detail: "line is JSON but not an object".into() },
        Err(e) => Decoded::Rejected { reason: "invalid_json", detail: e.to_string() },
    }
}

/// Decodes one Kafka message (its payload at `offset`) as [`decode`] does a
/// line: a payload over `max_bytes` is set aside as too large.
pub fn decode_message(
    payload: &[u8],
    offset: u64,
    max_bytes: usize,
    event_time: &EventTime,
    ingest_ms: i64,
) -> Decoded {
    let len = payload.len();
    let info = LineInfo { line: offset, end_offset: offset + 1, len, too_large: len > max_bytes };
    decode(&payload[..len.min(max_bytes)], &info, max_bytes, event_time, ingest_ms)
}

/// Sleeps `d` in small steps; false when `stop` was set meanwhile.
fn sleep_unless_stopped(d: Duration, stop: &AtomicBool) -> bool {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20).min(until.saturating_duration_since(Instant::now())));
    }
    !stop.load(Ordering::Relaxed)
}

/// Runs the main job to the end of the input (or, following a file or
/// reading Kafka, until `stop` is set), on the configured store.
pub fn run_blocking(cfg: Config, opts: RunOptions, stop: Arc<AtomicBool>) -> Result<Summary, RunError> {
    let store = open_store(&cfg.store)?;
    run_with_store(cfg, opts, store, stop, Health::new())
}

/// Opens the file outputs at the lengths `cp` records (cutting back what a
/// crash left after the last commit).
fn open_outputs(cfg: &Config, opts: &RunOptions, cp: &Checkpoint) -> Result<Outputs, RunError> {
    let alerts_to = opts.alerts.clone().or(cfg.alerts.clone());
    let (alerts, alerts_key) = match &alerts_to {
        None => (None, None),
        Some(Stream::Std) => (Some(JsonLinesSink::stdout()), None),
        Some(Stream::File(p)) => {
            let key = format!("alerts:{}", absolute(p).display());
            let sink = JsonLinesSink::open_file(p, cp.outputs.get(&key).copied())
                .map_err(io_err("alerts file", &p.display().to_string()))?;
            (Some(sink), Some(key))
        }
    };
    let dead = match &cfg.dead_letter {
        None => None,
        Some(p) => {
            let key = format!("dead_letter:{}", absolute(p).display());
            let sink = JsonLinesSink::open_file(p, cp.outputs.get(&key).copied())
                .map_err(io_err("dead-letter file", &p.display().to_string()))?;
            Some((sink, key))
        }
    };
    Ok(Outputs { alerts, alerts_key, producer: None, dead })
}

/// What a job reads: for messages, metrics and its checkpoint.
struct JobSource {
    name: String,
    /// Checkpoint name in the store; none for stdin.
    id: Option<String>,
    /// Metric label: `file`, `stdin`, `kafka`.
    kind: &'static str,
    /// Where it starts.
    position: Checkpoint,
}

impl Job {
    fn new(
        cfg: Config,
        opts: RunOptions,
        store: Box<dyn Store>,
        outputs: Outputs,
        source: JobSource,
        (stop, health): (Arc<AtomicBool>, Arc<Health>),
    ) -> Self {
        let JobSource { name: source_name, id: source_id, kind: source_kind, position: cp } = source;
        Job {
            engine: Engine::new(
                cfg.rules,
                Arc::new(cfg.scoring),
                StateCache::with_bounds(store, cfg.cache_max_entries, cfg.cache_max_bytes),
            ),
            lanes: Vec::new(),
            outputs,
            source_name,
            source_id,
            summary: Summary { resumed_after_line: cp.line, ..Summary::default() },
            position: cp,
            partitions: BTreeMap::new(),
            moved: Default::default(),
            shared_watermark: false,
            alerts: Vec::new(),
            counters: EventMetrics::new(source_kind),
            health,
            stop,
            deadline: None,
            reloads: opts.reloads,
            purge_after: cfg.purge_after,
            last_purge: None,
        }
    }
}

/// Runs the main job on a given store (tests hand in stores that fail).
pub fn run_with_store(
    cfg: Config,
    opts: RunOptions,
    store: Box<dyn Store>,
    stop: Arc<AtomicBool>,
    health: Arc<Health>,
) -> Result<Summary, RunError> {
    health.rules_loaded();
    if cfg.from_kafka && opts.input.is_none() {
        return kafka::run(cfg, opts, store, stop, health);
    }
    let input = opts.input.clone().unwrap_or(cfg.input.clone());
    let (source_name, source_id, source_kind) = match &input {
        Stream::File(p) => (p.display().to_string(), Some(format!("file:{}", absolute(p).display())), "file"),
        Stream::Std => ("stdin".to_string(), None, "stdin"),
    };
    let found = match &source_id {
        Some(id) => store.checkpoint(id)?,
        None => None,
    };
    let first_run = found.is_none();
    let cp = found.unwrap_or_default();
    let outputs = open_outputs(&cfg, &opts, &cp)?;
    let mut reader = match &input {
        Stream::File(p) => {
            JsonLines::open_file(p, cp.offset, cp.line, cfg.max_line_bytes).map_err(io_err("input", &source_name))?
        }
        Stream::Std => JsonLines::stdin(cfg.max_line_bytes),
    };
    health.set_source(None);
    if cp.line > 0 {
        tracing::info!(source = %source_name, line = cp.line, "resuming after the last checkpoint");
    }
    let settings = JobSettings {
        max_line_bytes: cfg.max_line_bytes,
        event_time: cfg.event_time.clone(),
        flush_every_events: cfg.flush_every_events,
        flush_interval: cfg.flush_interval,
        follow: cfg.follow && matches!(input, Stream::File(_)),
    };
    let progress = Progress::new(&input, cp.offset);
    let source = JobSource { name: source_name, id: source_id, kind: source_kind, position: cp };
    let mut job = Job::new(cfg, opts, store, outputs, source, (Arc::clone(&stop), health));
    if first_run && job.source_id.is_some() {
        // Record where the outputs start before the first event: a crash
        // before the first commit must not leave its alerts in the file.
        job.flush()?;
    }
    // A remote store reads the state of many lines at once: lines are read
    // ahead, decoded, their keys loaded in one batch, then applied in order.
    // Only from a file, where reading ahead never waits on a writer (stdin
    // would hold events back until a whole batch arrived).
    let from_file = matches!(input, Stream::File(_));
    let ahead = if from_file && job.engine.cache().store().batched_reads() { READ_AHEAD } else { 1 };
    let mut buf = Vec::new();
    let mut arena = Vec::new();
    let mut lines: Vec<(LineInfo, std::ops::Range<usize>, Decoded, i64)> = Vec::with_capacity(ahead);
    let mut since_flush = 0u64;
    let mut last_flush = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        // A reloaded config is swapped in before the next lines (a channel poll: cheap).
        job.reload()?;
        arena.clear();
        while lines.len() < ahead {
            let next = if settings.follow { reader.next_complete_line(&mut buf) } else { reader.next_line(&mut buf) };
            let Some(info) = next.map_err(io_err("input", &job.source_name))? else { break };
            let ingest = now_ms();
            let decoded = decode(&buf, &info, settings.max_line_bytes, &settings.event_time, ingest);
            let start = arena.len();
            arena.extend_from_slice(&buf);
            lines.push((info, start..arena.len(), decoded, ingest));
        }
        if lines.is_empty() {
            if !settings.follow {
                break;
            }
            // Following a file: commit what is pending once the interval is
            // up, then wait for more lines.
            if since_flush > 0 && last_flush.elapsed() >= settings.flush_interval {
                job.flush()?;
                since_flush = 0;
                last_flush = Instant::now();
            }
            progress.update(&job.summary, job.position.offset);
            sleep_unless_stopped(Duration::from_millis(200), &stop);
            continue;
        }
        if ahead > 1 {
            job.prefetch(lines.iter().map(|(_, _, d, _)| (d, None)))?;
        }
        let name = job.source_name.clone();
        for (info, range, decoded, ingest) in lines.drain(..) {
            job.line(&Origin { source: &name, line: info.line }, &arena[range], decoded, ingest, None)?;
            // Only now is the line applied: the checkpoint may move past it.
            job.position.offset = info.end_offset;
            job.position.line = info.line;
            since_flush += 1;
            // The clock is read every 1024 lines only: cheap, and often enough.
            if since_flush % 1024 == 0 {
                job.engine.publish_metrics();
                progress.update(&job.summary, job.position.offset);
            }
            if since_flush >= settings.flush_every_events
                || (since_flush % 1024 == 0
                    && (last_flush.elapsed() >= settings.flush_interval || job.engine.cache().over_bounds()))
            {
                job.flush()?;
                since_flush = 0;
                last_flush = Instant::now();
            }
        }
    }
    job.flush()?;
    progress.finish();
    Ok(job.summary)
}

fn describe(problems: &[Problem]) -> String {
    problems.iter().map(|p| format!("rule {}: {}", p.rule_id, p.message)).collect::<Vec<_>>().join("; ")
}

/// A progress bar on a terminal (nothing on a pipe): events/s, alerts, and
/// for a file of known size, how far and how long to go.
struct Progress {
    bar: indicatif::ProgressBar,
}

impl Progress {
    fn new(input: &Stream, offset: u64) -> Self {
        let len = match input {
            Stream::File(p) => std::fs::metadata(p).map(|m| m.len()).ok(),
            Stream::Std => None,
        };
        let target = indicatif::ProgressDrawTarget::stderr_with_hz(4);
        let bar = match len {
            Some(len) => {
                let bar = indicatif::ProgressBar::with_draw_target(Some(len), target);
                bar.set_style(
                    indicatif::ProgressStyle::with_template("{spinner} {bar:30} {bytes}/{total_bytes} {msg} ETA {eta}")
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                bar.set_position(offset);
                bar
            }
            None => indicatif::ProgressBar::with_draw_target(None, target),
        };
        Self { bar }
    }

    fn update(&self, summary: &Summary, offset: u64) {
        if self.bar.is_hidden() {
            return;
        }
        self.bar.set_position(offset);
        let secs = self.bar.elapsed().as_secs_f64().max(1e-3);
        self.bar.set_message(format!(
            "{} events ({:.0}/s), {} alerts",
            summary.read,
            summary.read as f64 / secs,
            summary.alerts
        ));
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// Runs the main job until the input ends or `shutdown` completes (then it
/// stops between events, flushes and returns). Serves `/metrics`,
/// `/healthz` and `/readyz` meanwhile when the config names an address.
pub async fn run(
    cfg: Config,
    opts: RunOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<Summary, RunError> {
    let health = Health::new();
    let token = std::env::var(crate::api::TOKEN_ENV).ok().filter(|t| !t.is_empty());
    let api = crate::api::Api::new(token.clone());
    let server = match cfg.listen {
        Some(addr) => {
            if !addr.ip().is_loopback() && token.is_none() {
                return Err(RunError::Config(format!(
                    "telemetry.listen {addr} is not a loopback address: set {} to a bearer token for the API",
                    crate::api::TOKEN_ENV
                )));
            }
            Some(serve_telemetry(addr, &health, &api).await?)
        }
        None => None,
    };
    let mut opts = opts;
    let _reloader = if opts.watch {
        let (tx, rx) = std::sync::mpsc::channel::<Config>();
        let (to_job, for_job) = std::sync::mpsc::channel();
        opts.reloads = Some(for_job);
        // The API explains entities with the reloaded rules too.
        let api = Arc::clone(&api);
        std::thread::spawn(move || {
            for cfg in rx {
                api.set_rules(Arc::clone(&cfg.rules), Arc::new(cfg.scoring.clone()));
                if to_job.send(cfg).is_err() {
                    break;
                }
            }
        });
        Some(crate::reload::spawn(cfg.path.clone(), cfg.rule_paths.clone(), tx))
    } else {
        None
    };
    let job = move |stop| {
        let store = open_store(&cfg.store)?;
        if let Some(reader) = store.reader() {
            api.ready(reader, Arc::clone(&cfg.rules), Arc::new(cfg.scoring.clone()));
        }
        run_with_store(cfg, opts, store, stop, health)
    };
    until_shutdown(job, shutdown, "finishing the current event and flushing", server).await
}

/// Serves `/metrics`, `/healthz`, `/readyz` and the API on `addr`.
pub(crate) async fn serve_telemetry(
    addr: std::net::SocketAddr,
    health: &Arc<Health>,
    api: &Arc<crate::api::Api>,
) -> Result<tokio::task::JoinHandle<()>, RunError> {
    crate::telemetry::serve(addr, Arc::clone(health), Arc::clone(api)).await.map_err(|source| RunError::Io {
        what: "telemetry endpoint",
        path: addr.to_string(),
        source,
    })
}

/// Runs `job` on a blocking thread until it returns, or until `shutdown`
/// completes: then it sets the stop flag `job` was given (logging what
/// `stopping` does) and waits for it. Stops `server` afterwards.
pub(crate) async fn until_shutdown<T: Send + 'static>(
    job: impl FnOnce(Arc<AtomicBool>) -> Result<T, RunError> + Send + 'static,
    shutdown: impl std::future::Future<Output = ()>,
    stopping: &str,
    server: Option<tokio::task::JoinHandle<()>>,
) -> Result<T, RunError> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let mut task = tokio::task::spawn_blocking(move || job(flag));
    let joined = tokio::select! {
        r = &mut task => r,
        () = shutdown => {
            tracing::info!("shutting down: {stopping}");
            stop.store(true, Ordering::Relaxed);
            task.await
        }
    };
    if let Some(server) = server {
        server.abort();
    }
    joined.map_err(|e| RunError::Task(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Record, WriteBatch};
    use std::path::Path;
    use std::sync::atomic::AtomicUsize;

    /// An embedded store that "crashes" (fails for good) at its nth apply.
    struct CrashAt {
        inner: EmbeddedStore,
        applies_left: Arc<AtomicUsize>,
    }

    impl Store for CrashAt {
        fn kind(&self) -> &'static str {
            "crash-at"
        }
        fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Record>>, StateError> {
            self.inner.get_many(keys)
        }
        fn apply(&mut self, batch: WriteBatch<'_>) -> Result<(), StateError> {
            if self.applies_left.fetch_sub(1, Ordering::SeqCst) == 0 {
                // Not a Backend error: the job gives up at once, as on a crash.
                return Err(StateError::Corrupt {
                    store: "crash-at",
                    key: String::new(),
                    message: "simulated crash".into(),
                });
            }
            self.inner.apply(batch)
        }
        fn checkpoint(&self, source: &str) -> Result<Option<Checkpoint>, StateError> {
            self.inner.checkpoint(source)
        }
        fn scan(&self, prefix: &str, visit: &mut dyn FnMut(&str, &Record)) -> Result<(), StateError> {
            self.inner.scan(prefix, visit)
        }
    }

    fn config(dir: &Path, input: &Path) -> Config {
        let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/rules");
        let text = format!(
            "[source]\npath = {:?}\n[sink]\npath = \"alerts.jsonl\"\n[store]\npath = \"s.redb\"\nflush_every_events = 97\n[rules]\npaths = [{:?}]\n[telemetry]\nlisten = \"\"\n",
            input.display().to_string(),
            rules.display().to_string()
        );
        std::fs::write(dir.join("riskd.toml"), text).unwrap();
        Config::load(&dir.join("riskd.toml")).unwrap()
    }

    fn outcome(dir: &Path) -> (String, String) {
        let store = EmbeddedStore::open(&dir.join("s.redb")).unwrap();
        let mut state = Vec::new();
        crate::state::export(&store, &mut state).unwrap();
        (std::fs::read_to_string(dir.join("alerts.jsonl")).unwrap(), String::from_utf8(state).unwrap())
    }

    #[test]
    fn a_crash_at_any_flush_then_resume_equals_one_uninterrupted_run() {
        let work = tempfile::tempdir().unwrap();
        let input = work.path().join("events.jsonl");
        let spec = crate::generate::Spec { events: 3000, users: 40, attack_every: 40, ..Default::default() };
        crate::generate::write_stream(&spec, &mut std::fs::File::create(&input).unwrap()).unwrap();
        let reference = work.path().join("reference");
        std::fs::create_dir(&reference).unwrap();
        let summary =
            run_blocking(config(&reference, &input), RunOptions::default(), Arc::new(AtomicBool::new(false))).unwrap();
        assert!(summary.alerts > 50, "{summary}");
        let expected = outcome(&reference);
        // 3000 lines, a commit every 97: crash at several of them, the last included.
        for crash_at in [0, 1, 2, 7, 15, 31] {
            let dir = work.path().join(format!("crash{crash_at}"));
            std::fs::create_dir(&dir).unwrap();
            let store = CrashAt {
                inner: EmbeddedStore::open(&dir.join("s.redb")).unwrap(),
                applies_left: Arc::new(AtomicUsize::new(crash_at)),
            };
            let stop = Arc::new(AtomicBool::new(false));
            let crashed = run_with_store(
                config(&dir, &input),
                RunOptions::default(),
                Box::new(store),
                Arc::clone(&stop),
                Health::new(),
            );
            assert!(crashed.is_err(), "crash at commit {crash_at} did not happen");
            let resumed = run_blocking(config(&dir, &input), RunOptions::default(), Arc::clone(&stop)).unwrap();
            // Commit 0 records where the outputs start; then one every 97 lines.
            assert_eq!(
                resumed.resumed_after_line,
                97 * crash_at.saturating_sub(1) as u64,
                "resumed from the last commit"
            );
            assert!(outcome(&dir) == expected, "crash at commit {crash_at}: state or alerts differ");
        }
    }
}
