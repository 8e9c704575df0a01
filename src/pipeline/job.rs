//! What the file and Kafka loops share: one lane's engine and cache, the
//! outputs, the position, admitting a decoded event and emitting its
//! alerts, and the flush that makes it all durable together.

use super::outputs::Outputs;
use super::retry::RetryPolicy;
use super::{RunError, Summary};
use crate::alert::Alert;
use crate::config::Config;
use crate::event::{Event, EventClock, EventTime, TimeSource};
use crate::rules::{Engine, Outcome, Problem, Rule, Scope};
use crate::scoring::{Scorer, ScoringConfig};
use crate::shutdown::Shutdown;
use crate::sink::DeadLetter;
use crate::source::{Decoded, Decoder};
use crate::state::{Access, Checkpoint, StateCache, Store, WATERMARK_KEY};
use crate::telemetry::{metrics, Health};
use prometheus::IntCounter;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// How often expired records are purged from the embedded store.
const PURGE_EVERY: Duration = Duration::from_secs(3600);

/// The parts of the config the read loops need.
pub(super) struct Settings {
    pub(super) max_line_bytes: usize,
    pub(super) event_time: EventTime,
    pub(super) flush_every_events: u64,
    pub(super) flush_interval: Duration,
    /// Following a file: wait for more lines at its end.
    pub(super) follow: bool,
    /// `store.max_write_units_per_second`.
    pub(super) write_budget: Option<f64>,
}

impl Settings {
    pub(super) fn new(cfg: &Config) -> Self {
        Self {
            max_line_bytes: cfg.max_line_bytes,
            event_time: cfg.event_time.clone(),
            flush_every_events: cfg.flush_every_events,
            flush_interval: cfg.flush_interval,
            follow: cfg.follow,
            write_budget: cfg.write_budget,
        }
    }

    /// The flush schedule these settings give, from now.
    pub(super) fn pace(&self) -> super::pace::Pace {
        let units = crate::state::dynamodb::write_units_total();
        super::pace::Pace::new(self.flush_interval, self.flush_every_events, self.write_budget, Instant::now(), units)
    }
}

/// An engine, its scorer and the cache they work over: one lane of entities.
pub(super) struct Lane {
    pub(super) engine: Engine,
    scorer: Scorer,
    pub(super) cache: StateCache,
}

impl Lane {
    pub(super) fn new(rules: &Arc<Vec<Rule>>, scoring: &Arc<ScoringConfig>, cache: StateCache) -> Self {
        Self { engine: Engine::new(Arc::clone(rules)), scorer: Scorer::new(rules, Arc::clone(scoring)), cache }
    }

    /// Applies one event and scores its alerts (see [`Scorer::process`]).
    pub(super) fn process(
        &mut self,
        event: &Event,
        scope: Option<Scope<'_>>,
        alerts: &mut Vec<Alert>,
    ) -> Result<Outcome, RunError> {
        Ok(self.scorer.process(&mut self.engine, &mut self.cache, event, scope, alerts)?)
    }

    /// Swaps in reloaded rules and scoring (see [`Engine::set_rules`]); the
    /// ids of the rules whose state starts fresh.
    fn set_rules(&mut self, rules: &Arc<Vec<Rule>>, scoring: &Arc<ScoringConfig>) -> Result<Vec<String>, RunError> {
        let fresh = self.engine.set_rules(&mut self.cache, Arc::clone(rules))?;
        self.scorer = Scorer::new(rules, Arc::clone(scoring));
        Ok(fresh)
    }

    /// Loads the state these events need in one read (see [`Engine::prefetch`]).
    pub(super) fn prefetch(&mut self, events: &[(&Event, Option<Scope<'_>>)]) -> Result<(), RunError> {
        Ok(self.engine.prefetch(&mut self.cache, events)?)
    }

    /// Publishes the evaluation and cache counts gathered so far.
    pub(super) fn publish_metrics(&mut self) {
        self.engine.publish_metrics();
        self.cache.publish_metrics();
    }
}

/// What a job reads: for messages, metrics and its checkpoint.
pub(super) struct JobSource {
    pub(super) name: String,
    /// Checkpoint name in the store; none for stdin.
    pub(super) id: Option<String>,
    /// Metric label: `file`, `stdin`, `kafka`.
    pub(super) kind: &'static str,
    /// Where it starts.
    pub(super) position: Checkpoint,
}

/// Where a line came from, for dead letters: a file and line, or a Kafka
/// partition and offset.
pub(super) struct Origin<'a> {
    pub(super) source: &'a str,
    pub(super) line: u64,
}

/// Metric handles of the read loop, resolved once.
struct EventMetrics {
    ok: IntCounter,
    invalid: IntCounter,
    too_large: IntCounter,
    incomplete: IntCounter,
    late: IntCounter,
}

impl EventMetrics {
    fn new(source_kind: &str) -> Self {
        let c = |outcome| metrics().events.with_label_values(&[source_kind, outcome]);
        Self {
            ok: c("ok"),
            invalid: c("invalid"),
            too_large: c("too_large"),
            incomplete: c("incomplete"),
            late: c("late"),
        }
    }
}

/// One run of the main job: the engine over the cache that flushes, the
/// outputs and the position.
pub(super) struct Job {
    /// The lane that flushes: with several Kafka lanes, their changes are
    /// moved into its cache before each flush.
    main: Lane,
    rules: Arc<Vec<Rule>>,
    /// How lines are decoded for these rules (shared with a reading thread).
    decoder: Arc<RwLock<Decoder>>,
    scoring: Arc<ScoringConfig>,
    outputs: Outputs,
    source: JobSource,
    /// How the watermark is raised: directly where several processes share
    /// the store, in the cache where one owns it.
    watermark: Access,
    summary: Summary,
    /// The latest trusted event time: it stands in for times that cannot be true.
    clock: EventClock,
    alerts: Vec<Alert>,
    counters: EventMetrics,
    health: Arc<Health>,
    shutdown: Shutdown,
    /// While set, store retries go on until then even once shutdown is
    /// asked for (a drain), and give up after it even if not.
    deadline: Option<Instant>,
    reloads: Option<Receiver<Config>>,
    /// Records expired this long before the watermark are deleted from the
    /// store (embedded), at most once per [`PURGE_EVERY`].
    purge_after: Option<Duration>,
    last_purge: Option<Instant>,
}

impl Job {
    pub(super) fn new(
        cfg: &Config,
        reloads: Option<Receiver<Config>>,
        store: Box<dyn Store>,
        outputs: Outputs,
        source: JobSource,
        (shutdown, health): (Shutdown, Arc<Health>),
    ) -> Self {
        let rules = Arc::clone(&cfg.rules);
        let scoring = Arc::new(cfg.scoring.clone());
        let cache = StateCache::with_bounds(store, cfg.cache_max_entries, cfg.cache_max_bytes)
            .with_expiry_granule(cfg.expiry_granule);
        Job {
            main: Lane::new(&rules, &scoring, cache),
            rules,
            scoring,
            outputs,
            summary: Summary {
                resumed_after_line: source.position.read.map_or(source.position.line, |(_, line)| line),
                ..Summary::default()
            },
            clock: EventClock::new(
                source.position.clock_ms.or((source.position.watermark_ms > 0).then_some(source.position.watermark_ms)),
            ),
            counters: EventMetrics::new(source.kind),
            decoder: Arc::new(RwLock::new(Decoder::new(&cfg.rules, &cfg.event_time))),
            source,
            watermark: Access::Cached,
            alerts: Vec::new(),
            health,
            shutdown,
            deadline: None,
            reloads,
            purge_after: cfg.purge_after,
            last_purge: None,
        }
    }

    /// How lines are decoded now (it changes on a reload).
    pub(super) fn decoder(&self) -> Decoder {
        self.decoder.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The decoder as a reading thread follows it.
    pub(super) fn shared_decoder(&self) -> Arc<RwLock<Decoder>> {
        Arc::clone(&self.decoder)
    }

    /// A new lane with the job's rules over `cache`.
    pub(super) fn lane(&self, cache: StateCache) -> Lane {
        Lane::new(&self.rules, &self.scoring, cache)
    }

    /// The lane that flushes.
    pub(super) fn main(&mut self) -> &mut Lane {
        &mut self.main
    }

    /// The store behind the job's cache.
    pub(super) fn store(&self) -> &dyn Store {
        self.main.cache.store()
    }

    pub(super) fn summary(&self) -> &Summary {
        &self.summary
    }

    /// The position after the last event applied.
    pub(super) fn position(&self) -> &Checkpoint {
        &self.source.position
    }

    /// The input's name, for messages.
    pub(super) fn source_name(&self) -> &str {
        &self.source.name
    }

    /// Events are held for ordering: the checkpoint stands before the
    /// oldest held (`before`: offset, line, and the trusted time then) and
    /// records how far the input was `read` and the `released` time.
    pub(super) fn hold_position(&mut self, before: (u64, u64, Option<i64>), read: (u64, u64), released: Option<i64>) {
        let position = &mut self.source.position;
        (position.offset, position.line, position.clock_ms) = before;
        position.read = (read != (before.0, before.1)).then_some(read);
        position.released_ms = released;
    }

    /// The latest trusted event time (what stands in for times that cannot be true).
    pub(super) fn trusted_time(&self) -> Option<i64> {
        self.clock.latest()
    }

    /// An event arrived after its time was released: it is applied at once,
    /// out of order (and counted `late` then), and logged.
    pub(super) fn late(&mut self, at: &Origin<'_>) {
        tracing::info!(source = at.source, line = at.line, "late event: applied out of event-time order");
    }

    /// An event read again after a restart, applied or held before: its
    /// time is settled as the first time, nothing is counted.
    pub(super) fn reread(&mut self, event: &mut Event) {
        self.clock.settle(event);
    }

    /// Several processes write this store: the watermark is raised with an
    /// atomic update rather than cached.
    pub(super) fn share_watermark(&mut self) {
        self.watermark = Access::Direct;
    }

    /// Whether more alerts and dead letters wait in memory than a flush should hold.
    pub(super) fn outputs_over_bounds(&self) -> bool {
        self.outputs.over_bounds()
    }

    pub(super) fn add_producer(&mut self, producer: crate::sink::AlertProducer) {
        self.outputs.producer = Some(producer);
    }

    /// Store retries go on until `deadline` (a drain), whatever shutdown says.
    pub(super) fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
    }

    pub(super) fn shutdown(&self) -> &Shutdown {
        &self.shutdown
    }

    pub(super) fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy { shutdown: self.shutdown.clone(), deadline: self.deadline, health: Arc::clone(&self.health) }
    }

    /// Runs `f` until it succeeds, backing off while the store or an output
    /// fails (and reporting not-ready): events are never dropped. Gives up only on
    /// shutdown or on an error a retry cannot mend.
    pub(super) fn retry<T>(
        &mut self,
        what: &str,
        mut f: impl FnMut(&mut Self) -> Result<T, RunError>,
    ) -> Result<T, RunError> {
        let policy = self.retry_policy();
        policy.run(what, || f(self))
    }

    /// Makes the outputs durable, then commits state and checkpoints
    /// together: the job's own and `more` (the partitions that moved).
    pub(super) fn flush(&mut self, more: &[(String, Checkpoint)]) -> Result<(), RunError> {
        let start = Instant::now();
        self.main.publish_metrics();
        let result = self.retry("flush", |job| {
            job.source.position.outputs = job.outputs.sync()?;
            // Alerts on a topic are acknowledged before the state that
            // produced them is committed (and offsets after that).
            if let Some(producer) = &job.outputs.producer {
                let health = &job.health;
                producer.flush(&job.shutdown, &|problem| health.set_sink(problem))?;
            }
            // The latest event time seen: "now" for `riskd entity` and state browsing.
            let wm = job.source.position.watermark_ms;
            job.main.cache.update(job.watermark, WATERMARK_KEY, wm, &mut |r| {
                let raise = r.count < wm;
                r.count = r.count.max(wm);
                raise
            })?;
            let mut cps: Vec<(String, Checkpoint)> =
                job.source.id.iter().map(|id| (id.clone(), job.source.position.clone())).collect();
            cps.extend_from_slice(more);
            Ok(job.main.cache.flush(&cps)?)
        });
        if result.is_ok() {
            self.purge();
        }
        let m = metrics();
        match &result {
            Ok(keys) => {
                m.flushes.with_label_values(&["ok"]).inc();
                m.flush_keys.observe(*keys as f64);
                tracing::debug!(keys, line = self.source.position.line, "flushed state");
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
        let wm = self.source.position.watermark_ms;
        if wm <= 0 || self.last_purge.is_some_and(|t| t.elapsed() < PURGE_EVERY) {
            return;
        }
        self.last_purge = Some(Instant::now());
        let before = wm.saturating_sub(i64::try_from(after.as_millis()).unwrap_or(i64::MAX));
        match self.main.cache.store_mut().purge_expired(before) {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(records = n, before = %crate::event::format_time_ms(before), "purged expired records")
            }
            Err(e) => tracing::warn!(error = %e, "purging expired records failed; they stay until the next purge"),
        }
    }

    /// Swaps in every reloaded config that has arrived, in the job's lane
    /// and in `lanes`.
    pub(super) fn reload(&mut self, lanes: &mut [Lane]) -> Result<(), RunError> {
        while let Some(cfg) = self.reloads.as_ref().and_then(|rx| rx.try_recv().ok()) {
            let n = cfg.rules.len();
            self.rules = cfg.rules;
            self.scoring = Arc::new(cfg.scoring);
            let decoder = self.decoder().with_rules(&self.rules);
            *self.decoder.write().unwrap_or_else(|p| p.into_inner()) = decoder;
            let (rules, scoring) = (Arc::clone(&self.rules), Arc::clone(&self.scoring));
            let policy = self.retry_policy();
            let set = |lane: &mut Lane| policy.run("reload", || lane.set_rules(&rules, &scoring));
            let fresh = set(&mut self.main)?;
            for lane in lanes.iter_mut() {
                set(lane)?;
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
    pub(super) fn prefetch(&mut self, events: &[(&Event, Option<Scope<'_>>)]) -> Result<(), RunError> {
        if events.is_empty() {
            return Ok(());
        }
        self.retry("load state", |job| job.main.prefetch(events))
    }

    /// Applies an admitted event (`buf` is its line as read) to every rule.
    pub(super) fn apply(&mut self, at: &Origin<'_>, buf: &[u8], event: &Event, late: bool) -> Result<(), RunError> {
        // The engine loads every key before changing anything, so a store
        // failure leaves the event unapplied and it can be retried whole.
        let mut alerts = std::mem::take(&mut self.alerts);
        let outcome = self.retry("load state", |job| {
            alerts.clear();
            job.main.process(event, None, &mut alerts)
        });
        let result = match outcome {
            Ok(o) => self.emit(at, buf, o, &mut alerts, late),
            Err(e) => Err(e),
        };
        alerts.clear();
        self.alerts = alerts;
        result
    }

    /// Counts a decoded line and sets aside one that is not an event; the
    /// event, if it is one.
    pub(super) fn admit(
        &mut self,
        at: &Origin<'_>,
        buf: &[u8],
        decoded: Decoded,
        ingest: i64,
    ) -> Result<Option<Event>, RunError> {
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
        let mut event = event;
        match self.clock.settle(&mut event) {
            Some(reason) => {
                metrics().event_time_invalid.with_label_values(&[reason]).inc();
                let time = crate::event::format_time_ms(event.time_ms);
                tracing::warn!(source = at.source, line = at.line, reason, %time, "event time cannot be true; the latest trusted time stands in");
            }
            None if event.time_source == TimeSource::Event => {
                let position = &mut self.source.position;
                position.watermark_ms = position.watermark_ms.max(event.time_ms);
                metrics().event_lag.observe((ingest - event.time_ms) as f64 / 1000.0);
            }
            None => metrics().event_time_missing.inc(),
        }
        Ok(Some(event))
    }

    /// Writes an applied event's alerts, counts it (`late` when it came
    /// after its time was released), and sets it aside as incomplete when a
    /// rule had to skip it.
    pub(super) fn emit(
        &mut self,
        at: &Origin<'_>,
        buf: &[u8],
        outcome: Outcome,
        alerts: &mut Vec<Alert>,
        late: bool,
    ) -> Result<(), RunError> {
        let m = metrics();
        self.summary.suppressed += u64::from(outcome.suppressed);
        for alert in alerts.drain(..) {
            tracing::info!(rule = %alert.rule_id, entity_type = %alert.entity.type_, alert_id = %alert.alert_id, "alert");
            m.alerts.with_label_values(&[alert.rule_id.as_str(), alert.severity.as_str()]).inc();
            self.outputs.alert(&alert)?;
            if self.outputs.producer.is_some() {
                self.retry("produce alert", |job| job.outputs.produce(&alert))?;
            }
            self.summary.alerts += 1;
            self.summary.risk_alerts += u64::from(alert.rule_id == crate::scoring::RISK_RULE_ID);
        }
        if outcome.problems.is_empty() {
            if late { &self.counters.late } else { &self.counters.ok }.inc();
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

fn describe(problems: &[Problem]) -> String {
    problems.iter().map(|p| format!("rule {}: {}", p.rule_id, p.message)).collect::<Vec<_>>().join("; ")
}
