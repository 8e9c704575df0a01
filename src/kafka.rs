//! Kafka plumbing shared by the consumer of `riskd run`, the router and
//! the producers: client settings, one client context that turns
//! librdkafka's logs, statistics and errors into riskd's logs and metrics,
//! topic creation, offset commits, and a message's place.

use crate::config::KafkaConfig;
use crate::telemetry::metrics;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::TopicPartitionList;
use rdkafka::types::RDKafkaErrorCode;

/// A Kafka client failed in a way riskd cannot ride out (bad settings,
/// authentication, a topic it may not create).
#[derive(Debug, thiserror::Error)]
#[error("kafka: {what}: {message}")]
pub struct KafkaFailure {
    /// What riskd was doing.
    pub what: String,
    /// librdkafka's message.
    pub message: String,
}

impl KafkaFailure {
    /// Wraps a client error.
    pub fn new(what: impl Into<String>, e: impl std::fmt::Display) -> Self {
        Self { what: what.into(), message: e.to_string() }
    }
}

/// Settings common to every client: the brokers, then the configured
/// properties (TLS, SASL, …) as they are.
pub fn client_config(k: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.bootstrap_servers);
    c.set_log_level(RDKafkaLogLevel::Warning);
    for (key, value) in &k.properties {
        c.set(key, value);
    }
    if c.get("statistics.interval.ms").is_none() {
        c.set("statistics.interval.ms", "5000");
    }
    c
}

/// A consumer in `group`: offsets are committed by riskd after the state
/// they cover is durable, never automatically.
pub fn consumer_config(k: &KafkaConfig, group: &str) -> ClientConfig {
    let mut c = client_config(k);
    c.set("group.id", group).set("enable.auto.commit", "false").set("enable.auto.offset.store", "false");
    if c.get("auto.offset.reset").is_none() {
        // A new group reads a topic from its start: nothing is skipped.
        c.set("auto.offset.reset", "earliest");
    }
    // The consumer and producer share properties; keep librdkafka from
    // warning about the other side's.
    c.remove("message.timeout.ms");
    c.remove("linger.ms");
    c
}

/// An idempotent producer (no duplicates or reordering from its own
/// retries) that never gives up on a message on its own: while the broker
/// is away, riskd slows down rather than losing an alert.
pub fn producer_config(k: &KafkaConfig) -> ClientConfig {
    let mut c = client_config(k);
    c.set("enable.idempotence", "true");
    for consumer_only in ["auto.offset.reset", "session.timeout.ms", "heartbeat.interval.ms", "max.poll.interval.ms"] {
        c.remove(consumer_only);
    }
    if c.get("message.timeout.ms").is_none() {
        c.set("message.timeout.ms", "0");
    }
    if c.get("linger.ms").is_none() {
        c.set("linger.ms", "20");
    }
    c
}

/// What a client's owner hears beyond logs and metrics: brokers lost, and
/// back. Every method has a default that does nothing.
pub trait Watch: Send + Sync {
    /// Brokers answer again (a statistics report shows one up).
    fn brokers_up(&self) {}
    /// The brokers are out of reach, and why.
    fn brokers_down(&self, reason: &str) {
        let _ = reason;
    }
}

impl Watch for () {}

/// The context of every riskd client: librdkafka's log lines go to riskd's
/// log, its statistics and errors to metrics, broker reachability to `W`.
/// A consumer or producer adds its own callbacks by implementing
/// `ConsumerContext` or `ProducerContext` for its `Context<W>`.
pub struct Context<W> {
    /// The owner's part.
    pub watch: W,
}

impl<W: Watch> ClientContext for Context<W> {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        log(level, fac, message);
    }
    fn stats(&self, stats: Statistics) {
        record_stats(&stats);
        if stats.brokers.values().any(|b| b.state == "UP") {
            self.watch.brokers_up();
        }
    }
    fn error(&self, error: KafkaError, reason: &str) {
        if record_error(&error, reason) {
            self.watch.brokers_down(reason);
        }
    }
}

/// Publishes librdkafka statistics: consumer lag per partition.
fn record_stats(stats: &Statistics) {
    let lag = &metrics().kafka_lag;
    for (topic, t) in &stats.topics {
        for (id, p) in &t.partitions {
            // -1 is librdkafka's internal "unassigned" partition; lag -1
            // means unknown. A lag below that comes from a broker whose end
            // offset trails the committed one: nothing is behind.
            if *id < 0 || p.consumer_lag == -1 {
                continue;
            }
            lag.with_label_values(&[topic.as_str(), &id.to_string()]).set(p.consumer_lag.max(0));
        }
    }
}

/// Creates the Kafka series a dashboard plots, at zero, so that they exist
/// before the first event of each kind (a rebalance, an error, a skip).
pub fn register_series(topics: &[String], producing: Option<&str>) {
    let m = metrics();
    for outcome in ["ok", "error"] {
        m.kafka_commits.with_label_values(&[outcome]);
        if let Some(kind) = producing {
            m.kafka_produced.with_label_values(&[kind, outcome]);
        }
    }
    for kind in ["assign", "revoke"] {
        m.kafka_rebalances.with_label_values(&[kind]);
    }
    for code in [RDKafkaErrorCode::AllBrokersDown, RDKafkaErrorCode::BrokerTransportFailure] {
        m.kafka_errors.with_label_values(&[format!("{code:?}").as_str()]);
    }
    for t in topics {
        m.kafka_skipped.with_label_values(&[t.as_str()]);
    }
}

/// Counts and logs an error the client reports; returns whether it means
/// the brokers are out of reach (the source is then not ready).
pub fn record_error(error: &KafkaError, reason: &str) -> bool {
    let code = error.rdkafka_error_code();
    let label = code.map(|c| format!("{c:?}")).unwrap_or_else(|| "other".into());
    metrics().kafka_errors.with_label_values(&[label.as_str()]).inc();
    tracing::warn!(error = %error, reason, "kafka client error");
    matches!(code, Some(RDKafkaErrorCode::AllBrokersDown | RDKafkaErrorCode::BrokerTransportFailure))
}

/// Commits `tpl`'s offsets, counting the outcome. A failure is logged, not
/// returned: riskd's own positions are the record of what is applied, and a
/// commit that did not happen only means more redeliveries to skip.
pub fn commit_offsets<C: ConsumerContext>(consumer: &BaseConsumer<C>, tpl: &TopicPartitionList, mode: CommitMode) {
    if tpl.count() == 0 {
        return;
    }
    let outcome = match consumer.commit(tpl, mode) {
        Ok(()) => "ok",
        Err(e) => {
            tracing::warn!(error = %e, "offset commit failed (redeliveries up to the stored positions are skipped)");
            "error"
        }
    };
    metrics().kafka_commits.with_label_values(&[outcome]).inc();
}

/// Forwards librdkafka's own log lines to riskd's log.
fn log(level: RDKafkaLogLevel, fac: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
            tracing::error!(facility = fac, "librdkafka: {message}")
        }
        RDKafkaLogLevel::Warning => tracing::warn!(facility = fac, "librdkafka: {message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => tracing::info!(facility = fac, "librdkafka: {message}"),
        RDKafkaLogLevel::Debug => tracing::debug!(facility = fac, "librdkafka: {message}"),
    }
}

/// Creates the topics that do not exist yet (`partitions` each); an
/// existing topic is left as it is. Blocks.
pub fn ensure_topics(k: &KafkaConfig, topics: &[String], partitions: i32) -> Result<(), KafkaFailure> {
    if topics.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> =
        client_config(k).create().map_err(|e| KafkaFailure::new("creating an admin client", e))?;
    let new: Vec<NewTopic<'_>> =
        topics.iter().map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(-1))).collect();
    let opts = AdminOptions::new().operation_timeout(Some(std::time::Duration::from_secs(30)));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| KafkaFailure::new("starting a runtime for the admin client", e))?;
    let results = rt.block_on(admin.create_topics(&new, &opts)).map_err(|e| KafkaFailure::new("creating topics", e))?;
    for r in results {
        match r {
            Ok(t) => tracing::info!(topic = %t, partitions, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => return Err(KafkaFailure::new(format!("creating topic {t}"), code)),
        }
    }
    Ok(())
}

/// The source id of a partition: its checkpoint's name in the store.
pub fn partition_id(topic: &str, partition: i32) -> String {
    format!("kafka:{topic}:{partition}")
}

/// Header carrying an alert's id on the alerts topic.
pub const ALERT_ID_HEADER: &str = "alert_id";
/// Header of a routed message: where the router read it,
/// `<topic>/<partition>/<offset>`.
pub const UPSTREAM_HEADER: &str = "riskd-upstream";

/// A consumer that needs nothing beyond riskd's logs and metrics (the router's).
impl ConsumerContext for Context<()> {}
