//! Continuous scoring from Kafka, against the broker `scripts/test.sh`
//! starts (Tansu): alerts equal a file run's, offsets follow effects,
//! instances share partitions on DynamoDB, shutdown drains, the router
//! re-keys, and a broker that is not there yet is waited for.

mod common;

use common::kafka::*;
use common::kafka_faults::{by_id, generated, keyed_by_user, okta_rules, spawn_run};
use common::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SCORING: &str = "[scoring.defaults]\nthreshold = 45\n";

/// The alerts of a file run over `lines` with `rules` (memory store).
fn file_run(dir: &Path, rules: &Path, lines: &[String]) -> Vec<Value> {
    let ref_dir = dir.join("reference");
    std::fs::create_dir_all(&ref_dir).unwrap();
    let input = ref_dir.join("events.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let config = write_config_with_store(&ref_dir, &input, rules, "", "kind = \"memory\"");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(SCORING);
    std::fs::write(&config, text).unwrap();
    run_ok(&config);
    alerts(&ref_dir)
}

fn sigterm(child: &std::process::Child) {
    let out = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).output().unwrap();
    assert!(out.status.success());
}

/// Waits for the process to exit; its status.
fn wait_exit(g: &mut Guard, timeout: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = g.0.try_wait().unwrap() {
            return status;
        }
        assert!(std::time::Instant::now() < deadline, "riskd did not exit within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Stops riskd with SIGTERM; it must drain and exit 0.
fn stop_ok(riskd: &mut Guard, log: &Path) {
    sigterm(&riskd.0);
    assert!(wait_exit(riskd, Duration::from_secs(30)).success(), "SIGTERM drains and exits 0: {}", log_of(log));
}

/// The `[kafka]` lines of a raw topic keyed by user.
fn keyed_topic(group: &str, topic: &str, alerts_topic: Option<&str>, extra: &str) -> String {
    let alerts = alerts_topic.map(|t| format!("alerts_topic = {t:?}\n")).unwrap_or_default();
    format!("group_id = {group:?}\ntopics = [{topic:?}]\nkeyed_by = \"user\"\n{alerts}{extra}")
}

/// End offsets after producing `first`, then `second`.
fn ends_of(first: &BTreeMap<i32, i64>, second: &BTreeMap<i32, i64>) -> BTreeMap<i32, i64> {
    first.keys().chain(second.keys()).map(|p| (*p, first.get(p).unwrap_or(&0) + second.get(p).unwrap_or(&0))).collect()
}

/// A Tansu broker of the test's own on `listen`, telling clients to connect
/// to `advertised`; up once it answers.
fn start_broker(listen: &str, advertised: &str) -> Guard {
    let tansu = std::env::var("RISKD_TEST_TANSU").expect("RISKD_TEST_TANSU: run ./scripts/test.sh");
    let broker = Guard(
        std::process::Command::new(tansu)
            .args(["broker", "--listener-url", &format!("tcp://{listen}")])
            .args(["--advertised-listener-url", &format!("tcp://{advertised}"), "--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("the broker", Duration::from_secs(30), || TcpStream::connect(listen).is_ok());
    broker
}

fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The alerts topic, read back: every alert keyed by its entity with its
/// id in a header; returns them by id (repeats allowed, as Kafka may
/// deliver twice) and how many messages there were.
fn alerts_on_topic(topic: &str, min: usize) -> (BTreeMap<String, Value>, usize) {
    let read = read_topic(&brokers(), topic, min, Duration::from_secs(3), Duration::from_secs(120));
    for m in &read {
        assert_eq!(m.key.as_deref(), m.value["entity"]["id"].as_str(), "keyed by entity");
        assert_eq!(m.alert_id.as_deref(), m.value["alert_id"].as_str(), "alert id header");
    }
    let n = read.len();
    (by_id(read.into_iter().map(|m| m.value)), n)
}

#[test]
fn one_instance_on_a_keyed_four_partition_topic_alerts_as_a_file_run() {
    let dir = tempfile::tempdir().unwrap();
    let rules = okta_rules(dir.path());
    let lines = generated(20_000);
    let expected = file_run(dir.path(), &rules, &lines);
    assert!(expected.len() > 50 && expected.iter().any(|a| a["rule_id"] == "entity_risk"), "attacks planted");

    let (topic, alerts_topic, group) = (unique("events"), unique("alerts"), unique("riskd"));
    create_topic(&brokers(), &topic, 4);
    let ends = produce(&brokers(), &topic, &keyed_by_user(&lines));
    assert_eq!(ends.len(), 4, "the stream spans the four partitions");
    // Three lanes, whatever the machine: entities applied in parallel.
    let kafka = keyed_topic(&group, &topic, Some(&alerts_topic), "lanes = 3");
    let config =
        write_kafka_config(dir.path(), &rules, &kafka, "kind = \"embedded\"\npath = \"state/riskd.redb\"", SCORING);
    let log = dir.path().join("riskd.log");
    let mut riskd = spawn_run(&config, &log);
    wait_committed(&brokers(), &group, &topic, &ends, Duration::from_secs(180));
    stop_ok(&mut riskd, &log);

    let (got, messages) = alerts_on_topic(&alerts_topic, expected.len());
    assert_eq!(messages, expected.len(), "each alert produced once");
    assert!(got == by_id(expected), "the alerts topic holds exactly the file run's alerts");
    assert!(log_of(&log).contains("lanes=3"), "{}", log_of(&log));
}

#[test]
fn sigterm_mid_stream_then_restart_resumes_without_loss_or_double_count() {
    let dir = tempfile::tempdir().unwrap();
    let rules = okta_rules(dir.path());
    let lines = generated(20_000);
    let expected = file_run(dir.path(), &rules, &lines);

    let (topic, alerts_topic, group) = (unique("events"), unique("alerts"), unique("riskd"));
    create_topic(&brokers(), &topic, 4);
    let keyed = keyed_by_user(&lines);
    let half = keyed.len() / 2;
    let first = produce(&brokers(), &topic, &keyed[..half]);
    let kafka = keyed_topic(&group, &topic, Some(&alerts_topic), "");
    let config =
        write_kafka_config(dir.path(), &rules, &kafka, "kind = \"embedded\"\npath = \"state/riskd.redb\"", SCORING);
    let log = dir.path().join("riskd-1.log");
    let mut riskd = spawn_run(&config, &log);
    // Mid-stream: some offsets committed, the second half not produced yet.
    wait_for("a first commit", Duration::from_secs(120), || !committed(&brokers(), &group, &topic).is_empty());
    stop_ok(&mut riskd, &log);
    assert!(log_of(&log).contains("left the consumer group"), "{}", log_of(&log));

    let second = produce(&brokers(), &topic, &keyed[half..]);
    let ends = ends_of(&first, &second);
    let log = dir.path().join("riskd-2.log");
    let mut riskd = spawn_run(&config, &log);
    wait_committed(&brokers(), &group, &topic, &ends, Duration::from_secs(180));
    stop_ok(&mut riskd, &log);

    let (got, messages) = alerts_on_topic(&alerts_topic, expected.len());
    assert_eq!(messages, expected.len(), "no alert lost or repeated across the restart");
    assert!(got == by_id(expected), "same alerts as one uninterrupted file run");
}

#[test]
fn a_second_instance_on_an_embedded_store_is_refused_loudly() {
    let dir = tempfile::tempdir().unwrap();
    let rules = okta_rules(dir.path());
    let (topic, group) = (unique("events"), unique("riskd"));
    create_topic(&brokers(), &topic, 4);
    produce(&brokers(), &topic, &keyed_by_user(&generated(2_000)));
    let mk = |name: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        let kafka = keyed_topic(&group, &topic, None, "");
        write_kafka_config(
            &d,
            &rules,
            &kafka,
            "kind = \"embedded\"\npath = \"riskd.redb\"",
            "[sink]\npath = \"alerts.jsonl\"",
        )
    };
    let (first_cfg, second_cfg) = (mk("first"), mk("second"));
    let first_log = dir.path().join("first.log");
    let mut first = spawn_run(&first_cfg, &first_log);
    wait_for("the first instance to take the partitions", Duration::from_secs(60), || {
        log_of(&first_log).contains("partitions assigned")
    });
    let second_log = dir.path().join("second.log");
    let mut second = spawn_run(&second_cfg, &second_log);
    let status = wait_exit(&mut second, Duration::from_secs(60));
    assert!(!status.success(), "the second member exits with an error");
    assert!(log_of(&second_log).contains("is local to one process"), "{}", log_of(&second_log));
    // The first keeps its partitions once the intruder is gone.
    wait_for("the first instance to hold every partition again", Duration::from_secs(60), || {
        log_of(&first_log).matches("partitions assigned").count() >= 2
    });
    assert!(first.0.try_wait().unwrap().is_none(), "the first instance keeps running");
    stop_ok(&mut first, &first_log);
}

#[test]
fn two_instances_on_dynamodb_split_partitions_and_survive_a_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let rules = okta_rules(dir.path());
    let lines = generated(20_000);
    let expected = file_run(dir.path(), &rules, &lines);

    // The state of one uninterrupted run, on a DynamoDB table of its own.
    let reference_dir = dir.path().join("reference-ddb");
    std::fs::create_dir_all(&reference_dir).unwrap();
    let input = reference_dir.join("events.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let ref_config =
        write_config_with_store(&reference_dir, &input, &rules, "", &dynamodb_store_section("ttl = false"));
    let mut text = std::fs::read_to_string(&ref_config).unwrap();
    text.push_str(SCORING);
    std::fs::write(&ref_config, text).unwrap();
    assert!(riskd(&["store", "init", "--config", &ref_config.display().to_string()]).status.success());
    run_ok(&ref_config);
    let expected_state = export_state(&ref_config);

    let (topic, alerts_topic, group) = (unique("events"), unique("alerts"), unique("riskd"));
    create_topic(&brokers(), &topic, 4);
    let keyed = keyed_by_user(&lines);
    let half = keyed.len() / 2;
    let first = produce(&brokers(), &topic, &keyed[..half]);
    let store = dynamodb_store_section("ttl = false");
    let kafka = keyed_topic(&group, &topic, Some(&alerts_topic), "lanes = 2");
    let mk = |name: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        write_kafka_config(&d, &rules, &kafka, &store, SCORING)
    };
    let (a_cfg, b_cfg) = (mk("a"), mk("b"));
    assert!(riskd(&["store", "init", "--config", &a_cfg.display().to_string()]).status.success());
    let (a_log, b_log) = (dir.path().join("a.log"), dir.path().join("b.log"));
    let mut a = spawn_run(&a_cfg, &a_log);
    let mut b = spawn_run(&b_cfg, &b_log);
    // Both hold partitions, and work has been committed.
    wait_for("the two instances to split the partitions", Duration::from_secs(60), || {
        let held = |log: &str| {
            log.lines().rev().find(|l| l.contains("partitions assigned")).is_some_and(|l| l.contains("events-"))
        };
        held(&log_of(&a_log)) && held(&log_of(&b_log))
    });
    wait_for("a first commit", Duration::from_secs(120), || !committed(&brokers(), &group, &topic).is_empty());
    a.0.kill().unwrap();
    a.0.wait().unwrap();
    let second = produce(&brokers(), &topic, &keyed[half..]);
    let ends = ends_of(&first, &second);
    wait_committed(&brokers(), &group, &topic, &ends, Duration::from_secs(240));
    stop_ok(&mut b, &b_log);
    let b_log = log_of(&b_log);
    let takeover = b_log.lines().rev().find(|l| l.contains("partitions assigned")).unwrap_or_default();
    assert_eq!(takeover.matches(&topic).count(), 4, "the survivor took every partition: {takeover}");

    let (got, _) = alerts_on_topic(&alerts_topic, expected.len());
    let got_ids: BTreeSet<&String> = got.keys().collect();
    let expected = by_id(expected);
    let expected_ids: BTreeSet<&String> = expected.keys().collect();
    assert_eq!(got_ids, expected_ids, "the set of alert ids of one uninterrupted run");
    assert!(export_state(&b_cfg) == expected_state, "the final state of one uninterrupted run: nothing counted twice");
}

#[test]
fn unkeyed_input_through_the_router_gives_the_same_alerts() {
    let dir = tempfile::tempdir().unwrap();
    let rules = root().join("config/rules");
    let mut lines: Vec<String> = std::fs::read_to_string(samples()).unwrap().lines().map(String::from).collect();
    lines.extend(generated(5_000));
    let expected = file_run(dir.path(), &rules, &lines);
    assert!(expected.iter().any(|a| a["rule_id"] == "aws_console_login_spray"), "every entity type alerts");

    let (raw, alerts_topic, group, prefix) =
        (unique("raw"), unique("alerts"), unique("riskd"), format!("{}.", unique("by")));
    // Un-keyed: one partition keeps the order the file has.
    create_topic(&brokers(), &raw, 1);
    let unkeyed: Vec<(Option<String>, String)> = lines.iter().map(|l| (None, l.clone())).collect();
    let ends = produce(&brokers(), &raw, &unkeyed);
    let kafka = format!(
        "group_id = {group:?}\ntopics = [{raw:?}]\nconsume = \"routed\"\nroute_prefix = {prefix:?}\nroute_partitions = 4\nalerts_topic = {alerts_topic:?}"
    );
    let config =
        write_kafka_config(dir.path(), &rules, &kafka, "kind = \"embedded\"\npath = \"state/riskd.redb\"", SCORING);
    let check = riskd(&["check", "--config", &config.display().to_string()]);
    assert!(check.status.success());
    let route_log = dir.path().join("route.log");
    let mut router = Guard(
        riskd_command(&["route", "--config", &config.display().to_string()])
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&route_log).unwrap())
            .env("RUST_LOG", "info")
            .spawn()
            .unwrap(),
    );
    let log = dir.path().join("riskd.log");
    let mut scorer = spawn_run(&config, &log);
    wait_committed(&brokers(), &format!("{group}.route"), &raw, &ends, Duration::from_secs(120));
    // A message on a routed topic without its key (the entity) is set aside.
    produce(&brokers(), &format!("{prefix}user"), &[(None, lines[0].clone())]);
    let (got, _) = alerts_on_topic(&alerts_topic, expected.len());
    let dead_letters = dir.path().join("dead-letter.jsonl");
    wait_for("the keyless message set aside", Duration::from_secs(30), || !read_lines(&dead_letters).is_empty());
    stop_ok(&mut router, &route_log);
    stop_ok(&mut scorer, &log);
    let expected = by_id(expected);
    assert_eq!(got.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>(), "same alert ids");
    assert!(got == expected, "same alerts");
    let dead = read_lines(&dead_letters);
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["reason"], "no_key");
    assert_eq!(dead[0]["source"], format!("kafka:{prefix}user:0"));
}

#[test]
fn a_broker_down_at_start_is_waited_for_then_scored() {
    let dir = tempfile::tempdir().unwrap();
    let rules = okta_rules(dir.path());
    let port = free_port();
    let broker = format!("127.0.0.1:{port}");
    let (topic, group, listen) = (unique("events"), unique("riskd"), free_port());
    let kafka = keyed_topic(&group, &topic, None, "");
    let sink = format!("[sink]\npath = \"alerts.jsonl\"\n{SCORING}");
    let config = write_kafka_config(dir.path(), &rules, &kafka, "kind = \"embedded\"\npath = \"riskd.redb\"", &sink);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&format!("bootstrap_servers = {:?}", brokers()), &format!("bootstrap_servers = {broker:?}"))
        .replace("listen = \"\"", &format!("listen = \"127.0.0.1:{listen}\""));
    std::fs::write(&config, text).unwrap();
    let log = dir.path().join("riskd.log");
    let mut riskd = spawn_run(&config, &log);
    let readyz = format!("http://127.0.0.1:{listen}/readyz");
    wait_for("the endpoint", Duration::from_secs(30), || http_get(&readyz, None).is_some());
    std::thread::sleep(Duration::from_secs(3));
    let (status, body) = http_get(&readyz, None).unwrap();
    assert_eq!(status, 503, "not ready without a broker: {body}");
    assert!(riskd.0.try_wait().unwrap().is_none(), "riskd keeps retrying: {}", log_of(&log));

    let broker_proc = start_broker(&broker, &broker);
    // A topic created once the broker is up: the consumer picks it up.
    create_topic(&broker, &topic, 2);
    let lines = generated(2_000);
    let keyed = keyed_by_user(&lines);
    let producer_counts = produce(&broker, &topic, &keyed);
    wait_committed(&broker, &group, &topic, &producer_counts, Duration::from_secs(120));
    let (status, body) = http_get(&readyz, None).unwrap();
    assert_eq!(status, 200, "ready once the broker answers: {body}");
    stop_ok(&mut riskd, &log);
    let expected = file_run(dir.path(), &rules, &lines);
    assert_eq!(by_id(alerts(dir.path())), by_id(expected), "scored once the broker appeared");
    drop(broker_proc);
}

/// A TCP forwarder to a broker that can be paused (bytes read either way
/// are held back: the broker seems stalled) or cut (every connection
/// closed, new ones refused: the broker seems down).
struct PausingProxy {
    paused: Arc<AtomicBool>,
    cut: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl PausingProxy {
    fn start(listener: TcpListener, upstream: String) -> Self {
        use std::io::{Read, Write};
        let (paused, cut) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (flag, refuse, conns) = (Arc::clone(&paused), Arc::clone(&cut), Arc::clone(&open));
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                if refuse.load(Ordering::Relaxed) {
                    continue; // dropped: closed at once
                }
                let Ok(server) = TcpStream::connect(&upstream) else { continue };
                if let Ok(mut c) = conns.lock() {
                    c.extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                }
                for (mut from, mut to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)]
                {
                    let flag = Arc::clone(&flag);
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            while flag.load(Ordering::Relaxed) {
                                std::thread::sleep(Duration::from_millis(20));
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Self { paused, cut, open }
    }

    fn pause(&self, on: bool) {
        self.paused.store(on, Ordering::Relaxed);
    }

    fn cut(&self, on: bool) {
        self.cut.store(on, Ordering::Relaxed);
        if on {
            for c in self.open.lock().unwrap().drain(..) {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
    }
}

#[test]
fn alerts_the_broker_has_not_acknowledged_hold_the_offsets_back_and_readiness_follows_the_broker() {
    let dir = tempfile::tempdir().unwrap();
    let rules = okta_rules(dir.path());
    // A broker of its own, reached (and advertised) through the proxy.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_addr = listener.local_addr().unwrap().to_string();
    let broker_addr = format!("127.0.0.1:{}", free_port());
    let _broker = start_broker(&broker_addr, &proxy_addr);
    let proxy = PausingProxy::start(listener, broker_addr);
    let (topic, alerts_topic, group, listen) = (unique("events"), unique("alerts"), unique("riskd"), free_port());
    create_topic(&proxy_addr, &topic, 2);
    let lines = generated(5_000);
    let ends = produce(&proxy_addr, &topic, &keyed_by_user(&lines));
    let expected = file_run(dir.path(), &rules, &lines);
    assert!(!expected.is_empty());

    // Alerts wait 3 s in the producer before they are sent; the first flush
    // comes 8 s after the partitions are assigned: the proxy is paused in
    // between, for less than the session timeout (20 s).
    let kafka = keyed_topic(&group, &topic, Some(&alerts_topic), "");
    let config = write_kafka_config(dir.path(), &rules, &kafka, "kind = \"embedded\"\npath = \"riskd.redb\"", SCORING);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&format!("bootstrap_servers = {:?}", brokers()), &format!("bootstrap_servers = {proxy_addr:?}"))
        .replace("listen = \"\"", &format!("listen = \"127.0.0.1:{listen}\""))
        .replace("flush_interval = \"300ms\"", "flush_interval = \"8s\"")
        .replace("\"session.timeout.ms\" = \"3000\"", "\"session.timeout.ms\" = \"20000\"")
        .replace(
            "\"heartbeat.interval.ms\" = \"500\"",
            "\"heartbeat.interval.ms\" = \"500\"\n\"linger.ms\" = \"3000\"",
        );
    std::fs::write(&config, text).unwrap();
    let log = dir.path().join("riskd.log");
    let mut riskd = spawn_run(&config, &log);
    let metrics = format!("http://127.0.0.1:{listen}/metrics");
    let value = |series: &str| {
        http_get(&metrics, None).and_then(|(_, body)| {
            body.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
        })
    };
    let events = "riskd_events_total{outcome=\"ok\",source=\"kafka\"}";
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while value(events) != Some(5000.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "not every event applied ({:?}): {}",
            value(events),
            log_of(&log)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    proxy.pause(true);
    // The flush at 8 s waits for the alerts' acknowledgements: nothing is
    // committed, and /readyz says why.
    let readyz = format!("http://127.0.0.1:{listen}/readyz");
    wait_for("not ready while alerts are unacknowledged", Duration::from_secs(30), || {
        http_get(&readyz, None).is_some_and(|(s, body)| s == 503 && body.contains("not acknowledged"))
    });
    assert_eq!(value("riskd_kafka_commits_total{outcome=\"ok\"}"), Some(0.0), "no offset committed");
    assert_eq!(value("riskd_flushes_total{outcome=\"ok\"}").unwrap_or(0.0), 0.0, "no state committed");
    proxy.pause(false);
    wait_committed(&proxy_addr, &group, &topic, &ends, Duration::from_secs(120));
    wait_for("ready again", Duration::from_secs(30), || http_get(&readyz, None).is_some_and(|(s, _)| s == 200));
    // The broker goes away: not ready, saying so; back: ready again.
    proxy.cut(true);
    wait_for("not ready while the broker is down", Duration::from_secs(60), || {
        http_get(&readyz, None).is_some_and(|(s, body)| s == 503 && body.contains("brokers unreachable"))
    });
    proxy.cut(false);
    wait_for("ready once the broker is back", Duration::from_secs(60), || {
        http_get(&readyz, None).is_some_and(|(s, _)| s == 200)
    });
    stop_ok(&mut riskd, &log);
    let read = read_topic(&proxy_addr, &alerts_topic, expected.len(), Duration::from_secs(3), Duration::from_secs(60));
    assert_eq!(read.len(), expected.len(), "each alert delivered once");
    assert!(by_id(read.into_iter().map(|m| m.value)) == by_id(expected));
}
