//! Telemetry, defined in one place: every Prometheus metric riskd exports,
//! the health state behind `/readyz`, and logging. It knows no stage of
//! riskd; the HTTP server serves it.
//!
//! Naming follows Prometheus: base units, counters end in `_total`,
//! durations are histograms in seconds, and labels come from bounded sets
//! (rule id, severity, entity type, store, operation, outcome) — never an
//! entity id, a key or an error message.

use prometheus::{
    exponential_buckets, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;
use tracing_subscriber::EnvFilter;

/// Every metric riskd exports.
pub struct Metrics {
    registry: Registry,
    /// Every metric's name, in the order declared (the process collector's
    /// `process_*` aside).
    names: Vec<String>,
    /// Lines read, by source kind and outcome (`ok`, `invalid`, `too_large`, `incomplete`).
    pub events: IntCounterVec,
    /// Lines written to the dead-letter file, by reason.
    pub dead_letters: IntCounterVec,
    /// Ingest time minus event time, for events carrying a time.
    pub event_lag: Histogram,
    /// Events without a readable event time (ingest time used).
    pub event_time_missing: IntCounter,
    /// Events held for ordering (`event_time.max_delay`), not applied yet.
    pub events_held: IntGauge,
    /// Wall clock less the released event time (what is applied up to).
    pub watermark_lag: prometheus::Gauge,
    /// Event times that cannot be true, by reason (`future`, `too_old`):
    /// the latest trusted time stood in.
    pub event_time_invalid: IntCounterVec,
    /// Match conditions evaluated, by rule.
    pub rule_evaluations: IntCounterVec,
    /// Match conditions that held, by rule.
    pub rule_matches: IntCounterVec,
    /// Time to evaluate one rule on one event, sampled on one event in 64.
    pub rule_seconds: HistogramVec,
    /// Matching events a rule had to skip, by rule and reason.
    pub rule_skips: IntCounterVec,
    /// Alerts written, by rule and severity.
    pub alerts: IntCounterVec,
    /// Alerts suppressed, by rule, severity and reason (`dedup`).
    pub alerts_suppressed: IntCounterVec,
    /// Risk contributions, by entity type and outcome (`added`, `capped`).
    pub risk_contributions: IntCounterVec,
    /// Entities disarmed above their threshold since this process started, by type.
    pub entities_at_risk: IntGaugeVec,
    /// Entity risk score when a risk alert fires, by entity type.
    pub risk_score_at_alert: HistogramVec,
    /// Store operations, by store, operation and outcome.
    pub store_operations: IntCounterVec,
    /// Store operation latency, by store and operation.
    pub store_seconds: HistogramVec,
    /// Write-back cache lookups, by result (`hit`, `miss`).
    pub cache_lookups: IntCounterVec,
    /// Entries in the write-back cache.
    pub cache_entries: IntGauge,
    /// Approximate bytes held by the write-back cache.
    pub cache_bytes: IntGauge,
    /// Clean entries dropped from the cache to honour its bound.
    pub cache_evictions: IntCounter,
    /// Changes that left a key clean, so it was not written, by reason
    /// (`expiry_granule`: an expiry refresh within `store.expiry_granule`).
    pub state_writes_avoided: IntCounterVec,
    /// Flushes (state + checkpoint commits), by outcome.
    pub flushes: IntCounterVec,
    /// Keys written per flush.
    pub flush_keys: Histogram,
    /// Duration of a flush, outputs sync included.
    pub flush_seconds: Histogram,
    /// Seconds between flushes the job aims at now.
    pub flush_gap: prometheus::Gauge,
    /// DynamoDB requests, by operation and outcome (`ok`, `throttled`, `error`).
    pub dynamodb_requests: IntCounterVec,
    /// DynamoDB request latency, by operation.
    pub dynamodb_request_seconds: HistogramVec,
    /// DynamoDB requests throttled, by operation.
    pub dynamodb_throttles: IntCounterVec,
    /// DynamoDB requests retried, by operation.
    pub dynamodb_retries: IntCounterVec,
    /// DynamoDB capacity units consumed, by kind (`read`, `write`),
    /// operation and source (`dynamodb`: as the answer reported;
    /// `estimate`: riskd's own count by DynamoDB's size rules).
    pub dynamodb_capacity_units: prometheus::CounterVec,
    /// Requests that waited for the rate limiter, by kind (`read`, `write`).
    pub rate_limiter_waits: IntCounterVec,
    /// Time spent waiting for the rate limiter, by kind.
    pub rate_limiter_wait_seconds: prometheus::CounterVec,
    /// Config reloads, by outcome (`ok`, `error`).
    pub config_reloads: IntCounterVec,
    /// Kafka consumer lag per partition held (librdkafka statistics).
    pub kafka_lag: IntGaugeVec,
    /// Kafka messages skipped because their effects are already in the
    /// store (redelivered after a crash or a rebalance), by topic.
    pub kafka_skipped: IntCounterVec,
    /// Offset commits to Kafka, by outcome.
    pub kafka_commits: IntCounterVec,
    /// Rebalances, by kind (`assign`, `revoke`).
    pub kafka_rebalances: IntCounterVec,
    /// Partitions this process holds.
    pub kafka_partitions: IntGauge,
    /// Messages queued for cross-partition alignment, not taken yet.
    pub kafka_queued: IntGauge,
    /// Times the other partitions waited for one with nothing buffered, by topic.
    pub kafka_waits: IntCounterVec,
    /// Time the other partitions spent waiting so.
    pub kafka_wait_seconds: prometheus::Counter,
    /// Messages produced (alerts, routed events), by topic kind and outcome.
    pub kafka_produced: IntCounterVec,
    /// Errors the Kafka client reported (broker down, authentication…), by code.
    pub kafka_errors: IntCounterVec,
    /// Faults met (a failing store, broker or output), by component
    /// (`store`, `kafka`, `output`), kind (the error's code or I/O kind) and
    /// outcome (`retried`, `fatal`).
    pub faults: IntCounterVec,
    /// 1 when riskd is ready (rules loaded, source open, store reachable).
    pub ready: IntGauge,
    /// Time spent not ready since the process started.
    pub not_ready_seconds: prometheus::Counter,
    /// Since when riskd is not ready (counted into `not_ready_seconds` as time passes).
    not_ready_since: Mutex<Option<Instant>>,
    /// Always 1, labelled with the version.
    pub build_info: IntGaugeVec,
}

/// A registry being filled, and the name of every metric in it.
#[derive(Default)]
struct Catalogue {
    registry: Registry,
    names: std::cell::RefCell<Vec<String>>,
}

impl Catalogue {
    fn add(&self, metric: Box<dyn prometheus::core::Collector>, name: &str) {
        self.names.borrow_mut().extend(metric.desc().iter().map(|d| d.fq_name.clone()));
        self.registry.register(metric).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    }
}

fn counter(r: &Catalogue, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.add(Box::new(c.clone()), name);
    c
}

fn histogram(r: &Catalogue, name: &str, help: &str, labels: &[&str], buckets: Vec<f64>) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.add(Box::new(h.clone()), name);
    h
}

fn gauge(r: &Catalogue, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.add(Box::new(g.clone()), name);
    g
}

fn float(r: &Catalogue, name: &str, help: &str) -> prometheus::Gauge {
    let g = prometheus::Gauge::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.add(Box::new(g.clone()), name);
    g
}

fn buckets(start: f64, factor: f64, count: usize) -> Vec<f64> {
    exponential_buckets(start, factor, count).unwrap_or_default()
}

impl Metrics {
    // The names and labels below are constants: registering them cannot
    // fail unless this function itself is wrong, which the tests catch.
    // Long on purpose: every metric riskd exports is declared here, once,
    // one after the other, so that the list reads as the catalogue.
    fn new() -> Self {
        let r = Catalogue::default();
        #[cfg(target_os = "linux")]
        {
            let _ = r.registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()));
        }
        let seconds = buckets(1e-6, 4.0, 12); // 1 µs … ~4 s
        let m = Metrics {
            events: counter(
                &r,
                "riskd_events_total",
                "Input lines read, by source kind and outcome.",
                &["source", "outcome"],
            ),
            dead_letters: counter(
                &r,
                "riskd_dead_letters_total",
                "Lines written to the dead-letter file, by reason.",
                &["reason"],
            ),
            event_lag: histogram(
                &r,
                "riskd_event_lag_seconds",
                "Ingest time minus event time.",
                &[],
                buckets(0.1, 4.0, 14), // 0.1 s … ~19 days
            )
            .with_label_values::<&str>(&[]),
            event_time_missing: counter(
                &r,
                "riskd_event_time_missing_total",
                "Events without a readable event time (ingest time used).",
                &[],
            )
            .with_label_values::<&str>(&[]),
            events_held: gauge(&r, "riskd_events_held", "Events held for event-time order, not applied yet.", &[])
                .with_label_values::<&str>(&[]),
            watermark_lag: float(
                &r,
                "riskd_watermark_lag_seconds",
                "Wall clock less the event time up to which events are applied (event_time.max_delay and lag).",
            ),
            event_time_invalid: counter(
                &r,
                "riskd_event_time_invalid_total",
                "Event times that cannot be true (the latest trusted time stood in), by reason.",
                &["reason"],
            ),
            rule_evaluations: counter(
                &r,
                "riskd_rule_evaluations_total",
                "Match conditions evaluated, by rule.",
                &["rule"],
            ),
            rule_matches: counter(&r, "riskd_rule_matches_total", "Match conditions that held, by rule.", &["rule"]),
            rule_seconds: histogram(
                &r,
                "riskd_rule_evaluation_seconds",
                "Time to evaluate one rule on one event (sampled: one event in 64).",
                &["rule"],
                seconds.clone(),
            ),
            rule_skips: counter(
                &r,
                "riskd_rule_skips_total",
                "Matching events a rule had to skip, by rule and reason.",
                &["rule", "reason"],
            ),
            alerts: counter(&r, "riskd_alerts_total", "Alerts written, by rule and severity.", &["rule", "severity"]),
            alerts_suppressed: counter(
                &r,
                "riskd_alerts_suppressed_total",
                "Alerts suppressed, by rule, severity and reason.",
                &["rule", "severity", "reason"],
            ),
            risk_contributions: counter(
                &r,
                "riskd_risk_contributions_total",
                "Risk contributions, by entity type and outcome.",
                &["entity_type", "outcome"],
            ),
            entities_at_risk: gauge(
                &r,
                "riskd_entities_at_risk",
                "Entities that crossed their risk threshold and have not re-armed (since start), by type.",
                &["entity_type"],
            ),
            risk_score_at_alert: histogram(
                &r,
                "riskd_risk_score_at_alert",
                "Entity risk score when a risk alert fires.",
                &["entity_type"],
                buckets(50.0, 1.5, 10),
            ),
            store_operations: counter(
                &r,
                "riskd_store_operations_total",
                "State store operations, by store, operation and outcome.",
                &["store", "op", "outcome"],
            ),
            store_seconds: histogram(
                &r,
                "riskd_store_operation_seconds",
                "State store operation latency.",
                &["store", "op"],
                seconds.clone(),
            ),
            cache_lookups: counter(
                &r,
                "riskd_cache_lookups_total",
                "Write-back cache lookups, by result.",
                &["result"],
            ),
            cache_entries: gauge(&r, "riskd_cache_entries", "Entries in the write-back cache.", &[])
                .with_label_values::<&str>(&[]),
            cache_bytes: gauge(&r, "riskd_cache_bytes", "Approximate bytes held by the write-back cache.", &[])
                .with_label_values::<&str>(&[]),
            cache_evictions: counter(
                &r,
                "riskd_cache_evictions_total",
                "Clean cache entries dropped to honour the cache bound.",
                &[],
            )
            .with_label_values::<&str>(&[]),
            state_writes_avoided: counter(
                &r,
                "riskd_state_writes_avoided_total",
                "State changes that left a key clean (not written), by reason.",
                &["reason"],
            ),
            flushes: counter(&r, "riskd_flushes_total", "State and checkpoint commits, by outcome.", &["outcome"]),
            flush_keys: histogram(&r, "riskd_flush_keys", "Keys written per flush.", &[], buckets(1.0, 4.0, 12))
                .with_label_values::<&str>(&[]),
            flush_seconds: histogram(
                &r,
                "riskd_flush_seconds",
                "Duration of a flush, outputs sync included.",
                &[],
                buckets(1e-4, 3.0, 12),
            )
            .with_label_values::<&str>(&[]),
            flush_gap: float(
                &r,
                "riskd_flush_gap_seconds",
                "Seconds between flushes the job aims at now: store.flush_interval, stretched by store.max_write_units_per_second.",
            ),
            dynamodb_requests: counter(
                &r,
                "riskd_dynamodb_requests_total",
                "DynamoDB requests, by operation and outcome.",
                &["op", "outcome"],
            ),
            dynamodb_request_seconds: histogram(
                &r,
                "riskd_dynamodb_request_seconds",
                "DynamoDB request latency.",
                &["op"],
                seconds.clone(),
            ),
            dynamodb_throttles: counter(&r, "riskd_dynamodb_throttles_total", "DynamoDB requests throttled.", &["op"]),
            dynamodb_retries: counter(&r, "riskd_dynamodb_retries_total", "DynamoDB requests retried.", &["op"]),
            dynamodb_capacity_units: {
                let name = "riskd_dynamodb_capacity_units_total";
                let c = prometheus::CounterVec::new(
                    Opts::new(
                        name,
                        "DynamoDB capacity units consumed, by kind, operation and source (dynamodb: reported; estimate: by its size rules).",
                    ),
                    &["kind", "op", "source"],
                )
                .unwrap_or_else(|e| panic!("metric {name}: {e}"));
                r.add(Box::new(c.clone()), name);
                c
            },
            rate_limiter_waits: counter(
                &r,
                "riskd_rate_limiter_waits_total",
                "Requests that waited for the request budget, by kind.",
                &["kind"],
            ),
            rate_limiter_wait_seconds: {
                let c = prometheus::CounterVec::new(
                    Opts::new("riskd_rate_limiter_wait_seconds_total", "Time spent waiting for the request budget."),
                    &["kind"],
                )
                .unwrap_or_else(|e| panic!("metric riskd_rate_limiter_wait_seconds_total: {e}"));
                r.add(Box::new(c.clone()), "riskd_rate_limiter_wait_seconds_total");
                c
            },
            config_reloads: counter(&r, "riskd_config_reloads_total", "Config reloads, by outcome.", &["outcome"]),
            kafka_lag: gauge(
                &r,
                "riskd_kafka_consumer_lag",
                "Messages behind the end of each partition held (librdkafka statistics).",
                &["topic", "partition"],
            ),
            kafka_skipped: counter(
                &r,
                "riskd_kafka_skipped_total",
                "Messages skipped because their effects are already stored (redeliveries), by topic.",
                &["topic"],
            ),
            kafka_commits: counter(
                &r,
                "riskd_kafka_commits_total",
                "Offset commits to Kafka, by outcome.",
                &["outcome"],
            ),
            kafka_rebalances: counter(
                &r,
                "riskd_kafka_rebalances_total",
                "Consumer group rebalances, by kind.",
                &["kind"],
            ),
            kafka_partitions: gauge(&r, "riskd_kafka_partitions", "Partitions this process holds.", &[])
                .with_label_values::<&str>(&[]),
            kafka_queued: gauge(
                &r,
                "riskd_kafka_queued_messages",
                "Messages queued for cross-partition event-time alignment, not taken yet.",
                &[],
            )
            .with_label_values::<&str>(&[]),
            kafka_waits: counter(
                &r,
                "riskd_kafka_partition_waits_total",
                "Times the other partitions waited (up to kafka.max_idle) for one with nothing buffered, by topic.",
                &["topic"],
            ),
            kafka_wait_seconds: {
                let c = prometheus::Counter::new(
                    "riskd_kafka_partition_wait_seconds_total",
                    "Time the other partitions spent waiting for one with nothing buffered.",
                )
                .unwrap_or_else(|e| panic!("metric riskd_kafka_partition_wait_seconds_total: {e}"));
                r.add(Box::new(c.clone()), "riskd_kafka_partition_wait_seconds_total");
                c
            },
            kafka_produced: counter(
                &r,
                "riskd_kafka_produced_total",
                "Messages produced, by kind (alert, routed) and outcome (ok, error).",
                &["kind", "outcome"],
            ),
            kafka_errors: counter(
                &r,
                "riskd_kafka_errors_total",
                "Errors reported by the Kafka client, by code.",
                &["code"],
            ),
            faults: counter(
                &r,
                "riskd_faults_total",
                "Faults met, by component (store, kafka, output), kind and outcome (retried, fatal).",
                &["component", "kind", "outcome"],
            ),
            ready: gauge(&r, "riskd_ready", "1 when riskd is ready to score events.", &[])
                .with_label_values::<&str>(&[]),
            not_ready_seconds: {
                let name = "riskd_not_ready_seconds_total";
                let c = prometheus::Counter::new(name, "Time spent not ready.")
                    .unwrap_or_else(|e| panic!("metric {name}: {e}"));
                r.add(Box::new(c.clone()), name);
                c
            },
            not_ready_since: Mutex::new(None),
            build_info: gauge(&r, "riskd_build_info", "Always 1, labelled with riskd's version.", &["version"]),
            registry: r.registry,
            names: r.names.into_inner(),
        };
        m.build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        m
    }

    /// Sets readiness, counting the time spent not ready.
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
        let mut since = self.not_ready_since.lock().unwrap_or_else(|p| p.into_inner());
        match (ready, *since) {
            (false, None) => *since = Some(Instant::now()),
            (true, Some(t)) => {
                self.not_ready_seconds.inc_by(t.elapsed().as_secs_f64());
                *since = None;
            }
            _ => {}
        }
    }

    /// The name of every metric riskd exports (`process_*` aside), as
    /// declared: the catalogue the README's table is checked against.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The exposition in the Prometheus text format.
    pub fn render(&self) -> String {
        // An outage still going on counts up to now.
        if let Some(t) = self.not_ready_since.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            self.not_ready_seconds.inc_by(t.elapsed().as_secs_f64());
            *t = Instant::now();
        }
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
    }
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// What `/readyz` reports: ready when rules are loaded, the source is open
/// and the store answers; otherwise the reasons.
#[derive(Default)]
pub struct Health {
    rules_loaded: AtomicBool,
    // std Mutex: held for a string copy only, never across an await.
    source_problem: Mutex<Option<String>>,
    store_problem: Mutex<Option<String>>,
    output_problem: Mutex<Option<String>>,
    sink_problem: Mutex<Option<String>>,
}

impl Health {
    /// A new health state: not ready until told otherwise.
    pub fn new() -> Arc<Self> {
        let h = Arc::new(Self::default());
        h.set_source(Some("source not opened yet".into()));
        h
    }

    /// Rules are loaded and compiled.
    pub fn rules_loaded(&self) {
        self.rules_loaded.store(true, Ordering::Relaxed);
        self.publish();
    }

    /// The source is fine (`None`) or not, and why.
    pub fn set_source(&self, problem: Option<String>) {
        if let Ok(mut p) = self.source_problem.lock() {
            *p = problem;
        }
        self.publish();
    }

    /// The store answers (`None`) or not, and why.
    pub fn set_store(&self, problem: Option<String>) {
        if let Ok(mut p) = self.store_problem.lock() {
            *p = problem;
        }
        self.publish();
    }

    /// The output files (alerts, dead letters) take lines (`None`) or not, and why.
    pub fn set_output(&self, problem: Option<String>) {
        if let Ok(mut p) = self.output_problem.lock() {
            *p = problem;
        }
        self.publish();
    }

    /// The alerts topic takes alerts (`None`) or not, and why.
    pub fn set_sink(&self, problem: Option<String>) {
        if let Ok(mut p) = self.sink_problem.lock() {
            *p = problem;
        }
        self.publish();
    }

    /// Whether ready, and the reasons it is not.
    pub fn readiness(&self) -> (bool, Vec<String>) {
        let mut reasons = Vec::new();
        if !self.rules_loaded.load(Ordering::Relaxed) {
            reasons.push("rules not loaded".to_string());
        }
        for (what, m) in [
            ("source", &self.source_problem),
            ("store", &self.store_problem),
            ("output", &self.output_problem),
            ("alerts", &self.sink_problem),
        ] {
            if let Some(p) = m.lock().ok().and_then(|p| p.clone()) {
                reasons.push(format!("{what}: {p}"));
            }
        }
        (reasons.is_empty(), reasons)
    }

    fn publish(&self) {
        metrics().set_ready(self.readiness().0);
    }
}

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable.
    Text,
    /// One JSON object per line.
    Json,
}

/// Sends `tracing` events to stderr; level from `RUST_LOG`, else `default`
/// (the config's `[telemetry] log_level`). Alerts themselves go to the alert
/// sink, never only to logs.
pub fn init_logging(format: LogFormat, default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // Colours on a terminal only: a log file or a journal gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_registers_and_renders() {
        let m = metrics();
        m.events.with_label_values(&["file", "ok"]).inc();
        let text = m.render();
        assert!(text.contains("riskd_build_info{version=\""));
        assert!(text.contains("riskd_events_total{outcome=\"ok\",source=\"file\"}"));
    }

    #[test]
    fn readiness_lists_every_reason() {
        let h = Health::new();
        assert_eq!(h.readiness(), (false, vec!["rules not loaded".into(), "source: source not opened yet".into()]));
        h.rules_loaded();
        h.set_source(None);
        assert_eq!(h.readiness(), (true, vec![]));
        h.set_store(Some("timed out".into()));
        assert_eq!(h.readiness(), (false, vec!["store: timed out".into()]));
        h.set_output(Some("alerts file a: No space left on device".into()));
        h.set_store(None);
        assert_eq!(h.readiness(), (false, vec!["output: alerts file a: No space left on device".into()]));
    }
}
