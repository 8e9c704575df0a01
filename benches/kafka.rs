//! Speed from Kafka, against a real broker (Tansu).
//!
//! `scripts/bench.sh kafka` starts the broker and runs this: 200 k
//! generated events (10 k users, attacks planted; `RISKD_BENCH_EVENTS`
//! changes it) produced to a 4-partition topic keyed by user, then in the
//! same run:
//! - a bare consume of the topic (an rdkafka consumer that only counts);
//! - riskd's main job on it: the five shipped rules, the embedded store,
//!   alerts produced to an alerts topic, offsets committed after flushes.
//!
//! Both rates are counted from the first message to the last (riskd's from
//! its own event counter), so the group join is left out of both.

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use riskd::config::Config;
use riskd::pipeline::{run_blocking, RunOptions};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PARTITIONS: i32 = 4;

fn main() {
    let Ok(brokers) = std::env::var("RISKD_TEST_KAFKA_BROKERS") else {
        eprintln!("RISKD_TEST_KAFKA_BROKERS is not set: run scripts/bench.sh kafka, which starts a broker");
        std::process::exit(2);
    };
    let events: u64 = std::env::var("RISKD_BENCH_EVENTS").ok().and_then(|s| s.parse().ok()).unwrap_or(200_000);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().expect("temp dir");
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let (topic, alerts) = (format!("bench-events-{run_id}"), format!("bench-alerts-{run_id}"));

    // The stream, keyed by user.
    let spec = riskd::generate::Spec { events, users: 10_000, attack_every: 2_000, ..Default::default() };
    let mut bytes = Vec::new();
    riskd::generate::write_stream(&spec, &mut bytes).expect("generate");
    let text = String::from_utf8(bytes).expect("utf-8");
    riskd::source::kafka::ensure_topics(&kafka_config(&brokers), std::slice::from_ref(&topic), PARTITIONS)
        .expect("create topic");
    let producer: BaseProducer =
        ClientConfig::new().set("bootstrap.servers", &brokers).set("linger.ms", "20").create().expect("producer");
    let start = Instant::now();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("JSON");
        let key = v["actor"]["alternateId"].as_str().or(v["userIdentity"]["userName"].as_str()).unwrap_or("");
        let mut record = BaseRecord::to(&topic).key(key).payload(line);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    record = back;
                    producer.poll(Duration::from_millis(10));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(120)).expect("produced");
    println!("produced {events} events in {:.1} s", start.elapsed().as_secs_f64());

    // Bare consume: count messages, nothing else.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", format!("bench-bare-{run_id}"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(&topic, p, Offset::Beginning).expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    let mut n = 0u64;
    let mut first = None;
    while n < events {
        if let Some(m) = consumer.poll(Duration::from_secs(10)) {
            m.expect("message");
            first.get_or_insert_with(Instant::now);
            n += 1;
        }
    }
    let bare = (n - 1) as f64 / first.map_or(1e-9, |t| t.elapsed().as_secs_f64());
    drop(consumer);
    println!("bare consume: {bare:.0} events/s");

    // riskd: five rules, embedded store, alerts to a topic.
    let config = dir.path().join("riskd.toml");
    std::fs::write(
        &config,
        format!(
            "[source]\nkind = \"kafka\"\n[store]\nkind = \"embedded\"\npath = \"riskd.redb\"\n[rules]\npaths = [{:?}]\n[telemetry]\nlisten = \"\"\n[kafka]\nbootstrap_servers = {brokers:?}\ngroup_id = \"bench-riskd-{run_id}\"\ntopics = [{topic:?}]\nkeyed_by = \"user\"\nalerts_topic = {alerts:?}\n[kafka.properties]\n\"session.timeout.ms\" = \"3000\"\n\"heartbeat.interval.ms\" = \"500\"\n",
            root.join("config/rules").display().to_string()
        ),
    )
    .expect("write config");
    let cfg = Config::load(&config).expect("valid config");
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let job = std::thread::spawn(move || run_blocking(cfg, RunOptions::default(), flag));
    let counter = riskd::telemetry::metrics().events.with_label_values(&["kafka", "ok"]);
    let (mut t0, mut n0) = (None, 0);
    while counter.get() < events {
        let seen = counter.get();
        if t0.is_none() && seen > 0 {
            t0 = Some(Instant::now());
            n0 = seen;
        }
        assert!(!job.is_finished(), "the job ended early");
        std::thread::sleep(Duration::from_millis(5));
    }
    let secs = t0.map_or(1e-9, |t| t.elapsed().as_secs_f64());
    let scored = (events - n0) as f64 / secs;
    let drain = Instant::now();
    stop.store(true, Ordering::Relaxed);
    let summary = job.join().expect("job thread").expect("run");
    println!(
        "riskd: {} events, {} alerts (to {alerts}): {scored:.0} events/s; drained in {:.2} s",
        summary.read,
        summary.alerts,
        drain.elapsed().as_secs_f64()
    );
    println!("riskd runs at {:.0}% of a bare consume", 100.0 * scored / bare);
}

fn kafka_config(brokers: &str) -> riskd::config::KafkaConfig {
    riskd::config::KafkaConfig {
        bootstrap_servers: brokers.to_string(),
        group_id: "bench".into(),
        topics: Vec::new(),
        keyed_by: None,
        consume: riskd::config::Consume::Raw,
        route_prefix: String::new(),
        route_partitions: PARTITIONS,
        alerts_topic: None,
        drain_timeout: Duration::from_secs(30),
        properties: Default::default(),
    }
}
