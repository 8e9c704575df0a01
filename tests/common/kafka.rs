//! Kafka helpers for the integration tests: the broker `scripts/test.sh`
//! starts (Tansu), topics, producing, reading back, committed offsets.

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The broker's address, from `scripts/test.sh`; a test that needs it
/// fails without it.
pub fn brokers() -> String {
    std::env::var("RISKD_TEST_KAFKA_BROKERS").unwrap_or_else(|_| {
        panic!(
            "RISKD_TEST_KAFKA_BROKERS is not set: this test needs a Kafka broker; \
             run ./scripts/test.sh, which installs and starts Tansu"
        )
    })
}

/// A name no other test uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(f)
}

/// Creates a topic with `partitions` partitions.
pub fn create_topic(brokers: &str, name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().expect("admin client");
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(-1));
    let results = block_on(admin.create_topics([&topic], &AdminOptions::new())).expect("create topics");
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
    }
}

/// Produces `(key, payload)` messages in order; returns how many landed
/// on each partition (the end offset of each, for a fresh topic).
pub fn produce(brokers: &str, topic: &str, messages: &[(Option<String>, String)]) -> BTreeMap<i32, i64> {
    let partitions = partition_count(brokers, topic);
    // The partition is chosen here (murmur2 is the Java client's; any
    // stable hash keeps a key on one partition), so counts are known.
    let placed = messages.iter().map(|(key, payload)| {
        let partition = match key {
            Some(k) => (fnv(k.as_bytes()) % partitions as u64) as i32,
            None => 0,
        };
        (partition, key.as_deref(), payload.as_str())
    });
    send(brokers, topic, placed)
}

/// Produces un-keyed `(partition, payload)` messages in order, each to the
/// partition it names; returns how many landed on each partition.
pub fn produce_to(brokers: &str, topic: &str, messages: &[(i32, String)]) -> BTreeMap<i32, i64> {
    send(brokers, topic, messages.iter().map(|(partition, payload)| (*partition, None, payload.as_str())))
}

/// Sends `(partition, key, payload)` messages in order and waits until the
/// broker has acknowledged them all; counts them by partition.
fn send<'a>(
    brokers: &str,
    topic: &str,
    messages: impl Iterator<Item = (i32, Option<&'a str>, &'a str)>,
) -> BTreeMap<i32, i64> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    let mut counts = BTreeMap::new();
    for (partition, key, payload) in messages {
        *counts.entry(partition).or_insert(0i64) += 1;
        let mut record = BaseRecord::to(topic).payload(payload).partition(partition);
        if let Some(k) = key {
            record = record.key(k);
        }
        let mut record = record;
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    record = back;
                    producer.poll(Duration::from_millis(50));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(60)).expect("all produced messages acknowledged");
    counts
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// Partitions of a topic.
pub fn partition_count(brokers: &str, topic: &str) -> i32 {
    let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers).create().expect("consumer");
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).expect("metadata");
    md.topics().first().map_or(0, |t| t.partitions().len() as i32)
}

/// A message read back: key, `alert_id` header, payload.
#[derive(Debug, Clone)]
pub struct Read {
    pub key: Option<String>,
    pub alert_id: Option<String>,
    pub value: serde_json::Value,
}

/// Reads every message of `topic` from the start until none has come for
/// `quiet` (and at least `min` were read), failing after `timeout`.
pub fn read_topic(brokers: &str, topic: &str, min: usize, quiet: Duration, timeout: Duration) -> Vec<Read> {
    let out = read_topic_for(brokers, topic, min, quiet, timeout);
    assert!(out.len() >= min, "read {} of at least {min} messages from {topic} before the timeout", out.len());
    out
}

/// As [`read_topic`], but what was read by `timeout` is returned, however
/// little (for a caller that says what is missing).
pub fn read_topic_for(brokers: &str, topic: &str, min: usize, quiet: Duration, timeout: Duration) -> Vec<Read> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partition_count(brokers, topic) {
        tpl.add_partition_offset(topic, p, Offset::Beginning).expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut last = Instant::now();
    loop {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                last = Instant::now();
                let alert_id = m.headers().and_then(|h| {
                    h.iter()
                        .find(|x| x.key == "alert_id")
                        .and_then(|x| x.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                });
                out.push(Read {
                    key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    alert_id,
                    value: serde_json::from_slice(m.payload().unwrap_or(b"null")).expect("JSON message"),
                });
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => {}
        }
        if (out.len() >= min && last.elapsed() >= quiet) || Instant::now() >= deadline {
            return out;
        }
    }
}

/// The offsets `group` has committed on `topic`, by partition (absent: none).
pub fn committed(brokers: &str, group: &str, topic: &str) -> BTreeMap<i32, i64> {
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", brokers).set("group.id", group).create().expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partition_count(brokers, topic) {
        tpl.add_partition(topic, p);
    }
    let Ok(got) = consumer.committed_offsets(tpl, Duration::from_secs(10)) else { return BTreeMap::new() };
    got.elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect()
}

/// Waits until `group` has committed `expected` (partition → end offset) on `topic`.
pub fn wait_committed(brokers: &str, group: &str, topic: &str, expected: &BTreeMap<i32, i64>, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let got = committed(brokers, group, topic);
        if &got == expected {
            return;
        }
        assert!(Instant::now() < deadline, "group {group} committed {got:?} on {topic}, expected {expected:?}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Writes a `riskd.toml` reading Kafka: `kafka` is the `[kafka]` section's
/// lines after `bootstrap_servers`, `store` the whole `[store]` section.
pub fn write_kafka_config(dir: &Path, rules: &Path, kafka: &str, store: &str, extra: &str) -> PathBuf {
    let text = format!(
        r#"[source]
kind = "kafka"
dead_letter = "dead-letter.jsonl"

[store]
{store}
flush_interval = "300ms"

[rules]
paths = [{rules:?}]

[telemetry]
listen = ""

{extra}

[kafka]
bootstrap_servers = {brokers:?}
drain_timeout = "20s"
{kafka}

[kafka.properties]
"session.timeout.ms" = "3000"
"heartbeat.interval.ms" = "500"
"#,
        rules = rules.display().to_string(),
        brokers = brokers(),
    );
    let path = dir.join("riskd.toml");
    std::fs::write(&path, text).expect("write config");
    path
}
