//! Speed from Kafka, against a real broker (Tansu).
//!
//! `scripts/bench.sh kafka` starts the broker and runs this: 200 k
//! generated events (10 k users, attacks planted; `RISKD_BENCH_EVENTS`
//! changes it) produced to a 4-partition topic keyed by user, then in the
//! same run:
//! - a bare consume of the topic (an rdkafka consumer that only counts);
//! - a consume that parses each message as JSON (what any consumer of
//!   JSON events pays before a rule runs);
//! - riskd's main job on it: the five shipped rules, the embedded store,
//!   alerts produced to an alerts topic, offsets committed after flushes;
//!   with one lane, then with a lane per CPU; then with one lane and the
//!   event-time buffer on (`event_time.max_delay` 5 s and 1 min; the
//!   default is off, and alignment across the partitions is on in all).
//!
//! Both rates are counted from the first message to the last (riskd's from
//! its own event counter), so the group join is left out of both.

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use riskd::config::Config;
use riskd::pipeline::{run_blocking, RunOptions};
use riskd::shutdown::Shutdown;
use std::time::{Duration, Instant};

const PARTITIONS: i32 = 4;

/// As the `riskd` binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    riskd::kafka::ensure_topics(&kafka_config(&brokers), std::slice::from_ref(&topic), PARTITIONS)
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

    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(&topic, p, Offset::Beginning).expect("partition");
    }
    // Bare consume: count messages, nothing else.
    let bare = consume_rate(&brokers, &format!("bench-bare-{run_id}"), &tpl, events, |_| {});
    println!("bare consume: {bare:.0} events/s");
    // Consume and parse: what any JSON consumer pays before a rule runs.
    let parse = consume_rate(&brokers, &format!("bench-parse-{run_id}"), &tpl, events, |payload| {
        let v: serde_json::Value = serde_json::from_slice(payload).expect("JSON");
        std::hint::black_box(v);
    });
    println!("consume + JSON parse: {parse:.0} events/s");

    // riskd: five rules, embedded store, alerts to a topic; one lane, then one per CPU.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut lane_counts = vec![1];
    if cpus > 1 {
        lane_counts.push(cpus);
    }
    // (lanes, event_time.max_delay, kafka.max_idle): the defaults, more
    // lanes, alignment waiting for nothing, the buffer on.
    let mut runs: Vec<(usize, &str, &str)> = lane_counts.into_iter().map(|l| (l, "0s", "2s")).collect();
    runs.extend([(1, "0s", "0s"), (1, "5s", "2s"), (1, "1m", "2s")]);
    if std::env::var("RISKD_BENCH_QUICK").is_ok() {
        runs = vec![(1, "0s", "2s"), (1, "0s", "0s")];
    }
    for (lanes, delay, idle) in runs {
        let run = Run { brokers: &brokers, topic: &topic, alerts: &alerts, run_id: &run_id, dir: dir.path(), root };
        let scored = run.riskd(lanes, delay, idle, events);
        println!(
            "riskd, {lanes} lane(s), max_delay {delay}, max_idle {idle}: {scored:.0} events/s = {:.0}% of a bare consume, {:.0}% of consume + parse",
            100.0 * scored / bare,
            100.0 * scored / parse
        );
    }
}

/// Events/s of a consumer reading `events` messages from `tpl`, doing
/// `work` on each payload, from the first message to the last.
fn consume_rate(brokers: &str, group: &str, tpl: &TopicPartitionList, events: u64, work: impl Fn(&[u8])) -> f64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.assign(tpl).expect("assign");
    let (mut n, mut first) = (0u64, None);
    while n < events {
        if let Some(m) = consumer.poll(Duration::from_secs(10)) {
            let m = m.expect("message");
            first.get_or_insert_with(Instant::now);
            work(m.payload().unwrap_or(b"{}"));
            n += 1;
        }
    }
    (n - 1) as f64 / first.map_or(1e-9, |t| t.elapsed().as_secs_f64())
}

/// Where a riskd run reads and writes.
struct Run<'a> {
    brokers: &'a str,
    topic: &'a str,
    alerts: &'a str,
    run_id: &'a str,
    dir: &'a std::path::Path,
    root: &'a std::path::Path,
}

impl Run<'_> {
    /// Runs riskd on the topic until it has applied `events` (less the
    /// last 1,000, which a buffer may hold for its delay of wall clock);
    /// its events/s.
    fn riskd(&self, lanes: usize, delay: &str, idle: &str, events: u64) -> f64 {
        let Run { brokers, topic, alerts, run_id, dir, root } = self;
        let name = format!("{lanes}-{delay}-{idle}");
        let config = dir.join(format!("riskd-{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "[source]\nkind = \"kafka\"\n[store]\nkind = \"embedded\"\npath = \"riskd-{name}.redb\"\n[rules]\npaths = [{:?}, {:?}]\n[telemetry]\nlisten = \"\"\n[event_time]\nmax_delay = {delay:?}\n[kafka]\nbootstrap_servers = {brokers:?}\ngroup_id = \"bench-riskd-{name}-{run_id}\"\ntopics = [{topic:?}]\nkeyed_by = \"user\"\nalerts_topic = {alerts:?}\nlanes = {lanes}\nmax_idle = {idle:?}\n[kafka.properties]\n\"session.timeout.ms\" = \"3000\"\n\"heartbeat.interval.ms\" = \"500\"\n",
                root.join("config/rules/aws_cloudtrail.yaml").display().to_string(),
                root.join("config/rules/okta.yaml").display().to_string()
            ),
        )
        .expect("write config");
        let cfg = Config::load(&config).expect("valid config");
        let stop = Shutdown::new();
        let flag = stop.clone();
        let (ok, late) = {
            let m = &riskd::telemetry::metrics().events;
            (m.with_label_values(&["kafka", "ok"]), m.with_label_values(&["kafka", "late"]))
        };
        let applied = || ok.get() + late.get();
        let base = applied();
        let events = events.saturating_sub(1_000);
        let job = std::thread::spawn(move || run_blocking(cfg, RunOptions::default(), flag));
        let (mut t0, mut n0) = (None, 0);
        while applied() - base < events {
            let seen = applied() - base;
            if t0.is_none() && seen > 0 {
                t0 = Some(Instant::now());
                n0 = seen;
            }
            assert!(!job.is_finished(), "the job ended early");
            std::thread::sleep(Duration::from_millis(5));
        }
        let secs = t0.map_or(1e-9, |t| t.elapsed().as_secs_f64());
        let m = riskd::telemetry::metrics();
        println!(
            "riskd, {lanes} lane(s), max_delay {delay}, max_idle {idle}: waited on a partition {:.2} s in all, {} times",
            m.kafka_wait_seconds.get(),
            m.kafka_waits.with_label_values(&[topic]).get()
        );
        let drain = Instant::now();
        stop.trigger();
        let summary = job.join().expect("job thread").expect("run");
        println!(
            "riskd, {lanes} lane(s), max_delay {delay}, max_idle {idle}: {} events, {} alerts produced; drained in {:.2} s",
            summary.read,
            summary.alerts,
            drain.elapsed().as_secs_f64()
        );
        (events - n0) as f64 / secs
    }
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
        max_idle: Duration::from_secs(2),
        lanes: 1,
        properties: Default::default(),
    }
}
