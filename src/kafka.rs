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
use std::collections::BTreeMap;
use std::sync::Mutex;

/// A Kafka client failed: what riskd was doing, librdkafka's message, and
/// what the failure means, classified once here ([`classify`]).
#[derive(Debug, thiserror::Error)]
#[error("kafka: {what}: {message}")]
pub struct KafkaFailure {
    /// What riskd was doing.
    pub what: String,
    /// librdkafka's message.
    pub message: String,
    /// A bounded label for metrics and logs: librdkafka's error code
    /// (`AllBrokersDown`, `Fatal`, …) or the kind of failure (`config`).
    pub kind: String,
    /// A later try may succeed (brokers unreachable, a timeout, a leader
    /// moving): the job backs off and retries. Otherwise it stops, naming
    /// the cause (bad settings, authentication, a fatal producer error).
    pub transient: bool,
}

impl KafkaFailure {
    /// A client error, classified by [`classify`].
    pub fn of(what: impl Into<String>, e: &KafkaError) -> Self {
        let (kind, transient) = classify(e);
        Self { what: what.into(), message: e.to_string(), kind, transient }
    }

    /// A failure known to be for good: a retry would fail the same way
    /// (bad settings, a value riskd cannot encode, a fatal client error).
    pub fn permanent(what: impl Into<String>, kind: impl Into<String>, e: impl std::fmt::Display) -> Self {
        Self { what: what.into(), message: e.to_string(), kind: kind.into(), transient: false }
    }

    /// A failure a later try may mend.
    pub fn transient(what: impl Into<String>, kind: impl Into<String>, e: impl std::fmt::Display) -> Self {
        Self { what: what.into(), message: e.to_string(), kind: kind.into(), transient: true }
    }

    /// An error code (a topic's result, a delivery report), classified by
    /// [`code_is_permanent`].
    pub fn of_code(what: impl Into<String>, code: RDKafkaErrorCode) -> Self {
        Self {
            what: what.into(),
            message: code.to_string(),
            kind: format!("{code:?}"),
            transient: !code_is_permanent(code),
        }
    }
}

/// What a client error means: its bounded kind label, and whether a later
/// try may succeed. Anything not positively known to be permanent is
/// transient: a broker that is away, slow, moving a leader or electing a
/// coordinator comes back. Permanent: the client's own settings
/// (`ClientConfig`, `ClientCreation`, `Subscription`), a fatal error (the
/// client instance is unusable: an idempotent producer fenced or out of
/// sequence), and the codes of [`code_is_permanent`]. A transactional
/// error says for itself (`is_fatal`, `is_retriable`, `txn_requires_abort`).
pub fn classify(e: &KafkaError) -> (String, bool) {
    match e {
        KafkaError::ClientConfig(..) => ("ClientConfig".into(), false),
        KafkaError::ClientCreation(_) => ("ClientCreation".into(), false),
        KafkaError::Subscription(_) => ("Subscription".into(), false),
        KafkaError::Nul(_) => ("Nul".into(), false),
        KafkaError::AdminOpCreation(_) => ("AdminOpCreation".into(), false),
        KafkaError::MessageConsumptionFatal(code) => (format!("{code:?}"), false),
        KafkaError::AdminOp(code) => (format!("{code:?}"), !code_is_permanent(*code)),
        KafkaError::Transaction(t) => {
            let code = t.code();
            let transient = !t.is_fatal() && !t.txn_requires_abort() && (t.is_retriable() || !code_is_permanent(code));
            (format!("{code:?}"), transient)
        }
        other => match other.rdkafka_error_code() {
            Some(code) => (format!("{code:?}"), !code_is_permanent(code)),
            // Canceled, a seek or pause that failed, no message: nothing
            // says it is for good.
            None => ("other".into(), true),
        },
    }
}

/// The error codes that no retry mends: a fatal client error, credentials
/// and permissions, a request or setting the broker will never accept, a
/// message too large for it, an idempotent producer fenced or out of
/// sequence (librdkafka raises those as fatal when it cannot recover), and
/// a topic that does not exist or is not a valid name.
pub fn code_is_permanent(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::Fatal
            | C::Fenced
            | C::Authentication
            | C::SaslAuthenticationFailed
            | C::TopicAuthorizationFailed
            | C::GroupAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::TransactionalIdAuthorizationFailed
            | C::UnsupportedSASLMechanism
            | C::IllegalSASLState
            | C::InvalidArgument
            | C::InvalidConfig
            | C::InvalidRequest
            | C::InvalidRequiredAcks
            | C::InvalidGroupId
            | C::InvalidSessionTimeout
            | C::InvalidTopic
            | C::InvalidPartitions
            | C::InvalidReplicationFactor
            | C::InvalidReplicaAssignment
            | C::UnknownTopic
            | C::UnsupportedVersion
            | C::UnsupportedFeature
            | C::UnsupportedCompressionType
            | C::UnsupportedForMessageFormat
            | C::MessageSizeTooLarge
            | C::MessageBatchTooLarge
            | C::InvalidMessageSize
            | C::InvalidRecord
            | C::PolicyViolation
            | C::ProducerFenced
            | C::InvalidProducerEpoch
            | C::InvalidProducerIdMapping
            | C::OutOfOrderSequenceNumber
            | C::TopicDeletionDisabled
            | C::GroupMaxSizeReached
            | C::FencedInstanceId
            | C::KeySerialization
            | C::ValueSerialization
    )
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
    /// Where partition ends are kept, if the owner wants them.
    fn ends(&self) -> Option<&Ends> {
        None
    }
}

impl Watch for () {}

/// The end (high watermark) of each partition read, as librdkafka's
/// statistics last reported it: a partition with nothing buffered is
/// either at its end (nothing to wait for) or behind it (its next
/// messages are being fetched, and may be earlier in event time).
#[derive(Default)]
pub struct Ends(Mutex<BTreeMap<(String, i32), i64>>);

impl Ends {
    /// The last end reported of `topic`/`partition`.
    pub fn get(&self, topic: &str, partition: i32) -> Option<i64> {
        let ends = self.0.lock().unwrap_or_else(|p| p.into_inner());
        ends.get(&(topic.to_string(), partition)).copied()
    }

    fn record(&self, stats: &Statistics) {
        let mut ends = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for (topic, t) in &stats.topics {
            for (id, p) in &t.partitions {
                if *id >= 0 && p.hi_offset >= 0 {
                    ends.insert((topic.clone(), *id), p.hi_offset);
                }
            }
        }
    }
}

impl Watch for Ends {
    fn ends(&self) -> Option<&Ends> {
        Some(self)
    }
}

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
        if let Some(ends) = self.watch.ends() {
            ends.record(&stats);
        }
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
        m.kafka_waits.with_label_values(&[t.as_str()]);
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

/// Pauses (or resumes) fetching the partitions `(topic, partition)`: a
/// partition far ahead in event time waits while another is caught up.
pub fn set_paused<C: ConsumerContext>(consumer: &BaseConsumer<C>, partitions: &[(&str, i32)], pause: bool) {
    if partitions.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (topic, partition) in partitions {
        tpl.add_partition(topic, *partition);
    }
    let done = if pause { consumer.pause(&tpl) } else { consumer.resume(&tpl) };
    match done {
        Ok(()) => tracing::debug!(?partitions, pause, "partitions paused or resumed for alignment"),
        Err(e) => tracing::warn!(error = %e, pause, "pausing or resuming partitions failed"),
    }
}

/// Creates the topics that do not exist yet (`partitions` each); an
/// existing topic is left as it is. Blocks.
pub fn ensure_topics(k: &KafkaConfig, topics: &[String], partitions: i32) -> Result<(), KafkaFailure> {
    if topics.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> =
        client_config(k).create().map_err(|e| KafkaFailure::of("creating an admin client", &e))?;
    let new: Vec<NewTopic<'_>> =
        topics.iter().map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(-1))).collect();
    let opts = AdminOptions::new().operation_timeout(Some(std::time::Duration::from_secs(30)));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| KafkaFailure::permanent("starting a runtime for the admin client", "runtime", e))?;
    let results = rt
        .block_on(admin.create_topics(&new, &opts))
        .map_err(|e| KafkaFailure::of(format!("creating topics {topics:?}"), &e))?;
    for r in results {
        match r {
            Ok(t) => tracing::info!(topic = %t, partitions, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => return Err(KafkaFailure::of_code(format!("creating topic {t}"), code)),
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

/// A consumer that needs nothing beyond riskd's logs and metrics.
impl ConsumerContext for Context<()> {}
/// The router's consumer: logs, metrics and where its partitions end.
impl ConsumerContext for Context<Ends> {}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::types::RDKafkaConfRes;

    fn transient(e: KafkaError) -> bool {
        classify(&e).1
    }

    #[test]
    fn brokers_away_slow_or_moving_are_transient() {
        for code in [
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::Resolve,
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::OperationTimedOut,
            RDKafkaErrorCode::RequestTimedOut,
            RDKafkaErrorCode::NotLeaderForPartition,
            RDKafkaErrorCode::NotEnoughReplicas,
            RDKafkaErrorCode::KafkaStorageError,
            RDKafkaErrorCode::CoordinatorNotAvailable,
            RDKafkaErrorCode::UnknownTopicOrPartition,
            RDKafkaErrorCode::QueueFull,
        ] {
            assert!(transient(KafkaError::MessageProduction(code)), "{code:?}");
            assert!(transient(KafkaError::Global(code)), "{code:?}");
        }
        assert!(transient(KafkaError::Canceled), "nothing says it is for good");
        let admin = KafkaError::AdminOp(RDKafkaErrorCode::OperationTimedOut);
        assert_eq!(classify(&admin), ("OperationTimedOut".to_string(), true));
        let (kind, _) = classify(&KafkaError::Global(RDKafkaErrorCode::AllBrokersDown));
        assert_eq!(kind, "AllBrokersDown");
    }

    #[test]
    fn settings_credentials_and_fatal_errors_are_permanent() {
        for code in [
            RDKafkaErrorCode::Fatal,
            RDKafkaErrorCode::SaslAuthenticationFailed,
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::MessageSizeTooLarge,
            RDKafkaErrorCode::ProducerFenced,
            RDKafkaErrorCode::OutOfOrderSequenceNumber,
            RDKafkaErrorCode::UnknownTopic,
            RDKafkaErrorCode::InvalidArgument,
        ] {
            assert!(!transient(KafkaError::MessageProduction(code)), "{code:?}");
        }
        let bad = KafkaError::ClientConfig(RDKafkaConfRes::RD_KAFKA_CONF_INVALID, "bad".into(), "k".into(), "v".into());
        assert_eq!(classify(&bad), ("ClientConfig".to_string(), false));
        assert!(!transient(KafkaError::ClientCreation("no".into())));
        assert!(!transient(KafkaError::MessageConsumptionFatal(RDKafkaErrorCode::Fatal)));
    }

    #[test]
    fn a_failure_carries_its_class_into_the_job() {
        let down = KafkaFailure::of("producing", &KafkaError::Global(RDKafkaErrorCode::AllBrokersDown));
        assert!(down.transient);
        let e = crate::pipeline::RunError::from(down);
        assert!(e.is_transient());
        let refused = KafkaFailure::of_code("producing", RDKafkaErrorCode::TopicAuthorizationFailed);
        assert!(!crate::pipeline::RunError::from(refused).is_transient());
    }
}
