//! Helpers of the Kafka fault tests: a Tansu broker of a test's own that can
//! be frozen, killed and started again (on S3 storage that outlives it), a
//! proxy that refuses the producer's writes while letting the consumer
//! through, a `riskd run` process, and a watch over its `/readyz` and
//! metrics that tells when it stopped and resumed.

use super::kafka::{brokers, unique};
use super::{free_port, http_get, riskd, riskd_command, root, wait_for, write_config_with_store, Guard};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const SCORING: &str = "[scoring.defaults]\nthreshold = 45\n";

/// A folder with the Okta rules only: every rule keyed by the user, the key
/// of the topics below.
pub fn okta_rules(dir: &Path) -> PathBuf {
    let rules = dir.join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::copy(root().join("config/rules/okta.yaml"), rules.join("okta.yaml")).unwrap();
    rules
}

/// A generated stream (CloudTrail and Okta, attacks planted), as lines.
pub fn generated(events: u64) -> Vec<String> {
    let out = riskd(&["generate", "--events", &events.to_string(), "--users", "200", "--attack-every", "300"]);
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().lines().map(String::from).collect()
}

/// Each line keyed by its user (Okta's actor, CloudTrail's user name).
pub fn keyed_by_user(lines: &[String]) -> Vec<(Option<String>, String)> {
    lines
        .iter()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let key = v["actor"]["alternateId"].as_str().or(v["userIdentity"]["userName"].as_str()).map(String::from);
            (key, l.clone())
        })
        .collect()
}

/// What one undisturbed run makes of `lines`: its alerts by id, and the
/// state export of the store `store` names (`[store]` lines), reached by a
/// file run.
pub fn undisturbed(dir: &Path, rules: &Path, lines: &[String], store: &str) -> (BTreeMap<String, Value>, String) {
    let ref_dir = dir.join("reference");
    std::fs::create_dir_all(&ref_dir).unwrap();
    let input = ref_dir.join("events.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let config = write_config_with_store(&ref_dir, &input, rules, "", store);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(SCORING);
    std::fs::write(&config, text).unwrap();
    let config_arg = config.display().to_string();
    if store.contains("dynamodb") {
        assert!(riskd(&["store", "init", "--config", &config_arg]).status.success());
    }
    super::run_ok(&config);
    let alerts = by_id(super::alerts(&ref_dir));
    (alerts, super::export_state(&config))
}

pub fn by_id(alerts: impl IntoIterator<Item = Value>) -> BTreeMap<String, Value> {
    alerts.into_iter().map(|a| (a["alert_id"].as_str().unwrap().to_string(), a)).collect()
}

/// The `[kafka]` lines of a raw topic keyed by user, alerts to a topic.
pub fn keyed_topic(group: &str, topic: &str, alerts_topic: &str, extra: &str) -> String {
    format!("group_id = {group:?}\ntopics = [{topic:?}]\nkeyed_by = \"user\"\nalerts_topic = {alerts_topic:?}\n{extra}")
}

/// `write_kafka_config` pointed at `bootstrap` with `/readyz` and metrics on
/// `listen`, each `(from, to)` of `edits` applied to the text.
pub fn kafka_config(
    dir: &Path,
    rules: &Path,
    kafka: &str,
    store: &str,
    bootstrap: &str,
    listen: u16,
    edits: &[(&str, &str)],
) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let config = super::kafka::write_kafka_config(dir, rules, kafka, store, SCORING);
    let mut text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&format!("bootstrap_servers = {:?}", brokers()), &format!("bootstrap_servers = {bootstrap:?}"))
        .replace("listen = \"\"", &format!("listen = \"127.0.0.1:{listen}\""));
    for (from, to) in edits {
        assert!(text.contains(from), "{from} is in the config");
        text = text.replace(from, to);
    }
    std::fs::write(&config, text).unwrap();
    config
}

/// Sends a signal to a process (`STOP`, `CONT`, `TERM`, `KILL`).
pub fn signal(pid: u32, sig: &str) {
    let out = Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).output().unwrap();
    assert!(out.status.success(), "kill -{sig} {pid}");
}

/// A bucket of its own on the S3 endpoint `scripts/test.sh` starts (moto).
pub fn s3_storage() -> (String, String) {
    let endpoint = std::env::var("RISKD_TEST_S3_ENDPOINT")
        .expect("RISKD_TEST_S3_ENDPOINT: run ./scripts/test.sh, which starts moto (S3 for Tansu)");
    let bucket = unique("tansu");
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let status = agent.put(&format!("{endpoint}/{bucket}")).send_empty().expect("S3 answers").status();
    assert!(status.is_success(), "creating bucket {bucket}: {status}");
    (endpoint, format!("s3://{bucket}/"))
}

/// A Tansu broker of a test's own: memory storage (lost when it dies), or
/// S3 storage on a bucket of its own (kept across a restart).
pub struct Broker {
    pub listen: String,
    advertised: String,
    s3: Option<(String, String)>,
    process: Option<Guard>,
}

impl Broker {
    /// Starts a broker on a free port, advertising it.
    pub fn start(persistent: bool) -> Self {
        let listen = format!("127.0.0.1:{}", free_port());
        Self::start_behind(&listen.clone(), &listen, persistent)
    }

    /// Starts a broker on `listen`, telling clients to connect to `advertised`.
    pub fn start_behind(listen: &str, advertised: &str, persistent: bool) -> Self {
        let mut b = Broker {
            listen: listen.into(),
            advertised: advertised.into(),
            s3: persistent.then(s3_storage),
            process: None,
        };
        b.launch();
        b
    }

    fn launch(&mut self) {
        let tansu = std::env::var("RISKD_TEST_TANSU").expect("RISKD_TEST_TANSU: run ./scripts/test.sh");
        let mut c = Command::new(tansu);
        c.args(["broker", "--listener-url", &format!("tcp://{}", self.listen)])
            .args(["--advertised-listener-url", &format!("tcp://{}", self.advertised)])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        match &self.s3 {
            Some((endpoint, storage)) => {
                c.args(["--storage-engine", storage])
                    .env("AWS_ENDPOINT", endpoint)
                    .env("AWS_ALLOW_HTTP", "true")
                    .env("AWS_ACCESS_KEY_ID", "local")
                    .env("AWS_SECRET_ACCESS_KEY", "local")
                    .env("AWS_DEFAULT_REGION", "us-east-1");
            }
            None => {
                c.args(["--storage-engine", "memory://tansu/"]);
            }
        }
        self.process = Some(Guard(c.spawn().unwrap()));
        let listen = self.listen.clone();
        wait_for("the broker", Duration::from_secs(30), || TcpStream::connect(&listen).is_ok());
    }

    fn pid(&self) -> u32 {
        self.process.as_ref().expect("the broker runs").0.id()
    }

    /// SIGSTOP: connections stay open, nothing answers.
    pub fn freeze(&self) {
        signal(self.pid(), "STOP");
    }

    /// SIGCONT.
    pub fn thaw(&self) {
        signal(self.pid(), "CONT");
    }

    /// SIGKILL, waited for.
    pub fn kill(&mut self) {
        drop(self.process.take());
    }

    /// Starts it again on the same address and storage.
    pub fn restart(&mut self) {
        assert!(self.process.is_none(), "killed first");
        self.launch();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        // A frozen broker must be woken to die of SIGKILL cleanly.
        if let Some(p) = &self.process {
            signal(p.0.id(), "CONT");
        }
    }
}

/// A TCP forwarder to a broker that, while refusing, closes any connection
/// on which a Produce request (Kafka API key 0) from client id `client`
/// comes, before the broker sees it, and keeps closing the new ones: the
/// alerts topic refuses riskd's writes. Its consumer's requests (Fetch,
/// group requests), and other clients' writes, pass.
pub struct ProduceRefusingProxy {
    pub addr: String,
    refusing: Arc<AtomicBool>,
    /// Connections closed on a refused write.
    pub cut: Arc<Mutex<u64>>,
}

impl ProduceRefusingProxy {
    pub fn start(listener: TcpListener, upstream: String, client: &'static str) -> Self {
        let addr = listener.local_addr().unwrap().to_string();
        let refusing = Arc::new(AtomicBool::new(false));
        let cut: Arc<Mutex<u64>> = Arc::default();
        let (flag, cuts) = (Arc::clone(&refusing), Arc::clone(&cut));
        std::thread::spawn(move || {
            for client_conn in listener.incoming() {
                let Ok(client_conn) = client_conn else { return };
                let Ok(server) = TcpStream::connect(&upstream) else { continue };
                let (mut from_server, mut to_client) = (server.try_clone().unwrap(), client_conn.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from_server, &mut to_client);
                    let _ = to_client.shutdown(Shutdown::Both);
                });
                let (flag, cuts) = (Arc::clone(&flag), Arc::clone(&cuts));
                std::thread::spawn(move || forward_requests(client_conn, server, client, &flag, &cuts));
            }
        });
        Self { addr, refusing, cut }
    }

    pub fn refuse(&self, on: bool) {
        self.refusing.store(on, Ordering::Relaxed);
    }
}

/// Passes requests frame by frame (4-byte size, then the request header:
/// API key, version, correlation id, client id); a Produce request from
/// `refused` while refusing closes both sides instead.
fn forward_requests(
    mut client: TcpStream,
    mut server: TcpStream,
    refused: &str,
    refusing: &AtomicBool,
    cuts: &Mutex<u64>,
) {
    loop {
        let mut size = [0u8; 4];
        if client.read_exact(&mut size).is_err() {
            break;
        }
        let mut frame = vec![0u8; u32::from_be_bytes(size) as usize];
        if client.read_exact(&mut frame).is_err() {
            break;
        }
        let api_key = frame.get(..2).map(|k| i16::from_be_bytes([k[0], k[1]]));
        let id_len = frame.get(8..10).map_or(0, |l| i16::from_be_bytes([l[0], l[1]]).max(0) as usize);
        let client_id = frame.get(10..10 + id_len).unwrap_or_default();
        if api_key == Some(0) && client_id == refused.as_bytes() && refusing.load(Ordering::Relaxed) {
            *cuts.lock().unwrap() += 1;
            break;
        }
        if server.write_all(&size).and_then(|()| server.write_all(&frame)).is_err() {
            break;
        }
    }
    let _ = client.shutdown(Shutdown::Both);
    let _ = server.shutdown(Shutdown::Both);
}

/// A `riskd run` process with its log, `/readyz` and metrics.
pub struct Riskd {
    pub process: Guard,
    pub log: PathBuf,
    pub listen: u16,
}

/// `riskd run` on `config`, logging at info to the file `log`.
pub fn spawn_run(config: &Path, log: &Path) -> Guard {
    spawn_riskd("run", config, log)
}

/// `riskd COMMAND` (`run`, `route`) on `config`, logging at info to the file `log`.
pub fn spawn_riskd(command: &str, config: &Path, log: &Path) -> Guard {
    let child = riskd_command(&[command, "--config", &config.display().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .env("RUST_LOG", "info")
        .spawn()
        .unwrap();
    Guard(child)
}

impl Riskd {
    pub fn spawn(config: &Path, log: &Path, listen: u16) -> Self {
        Self::spawn_command("run", config, log, listen)
    }

    /// `riskd route` on `config`, its telemetry on `listen`.
    pub fn spawn_route(config: &Path, log: &Path, listen: u16) -> Self {
        Self::spawn_command("route", config, log, listen)
    }

    fn spawn_command(command: &str, config: &Path, log: &Path, listen: u16) -> Self {
        let r = Riskd { process: spawn_riskd(command, config, log), log: log.to_path_buf(), listen };
        wait_for("the telemetry endpoint", Duration::from_secs(30), || http_get(&r.url("/readyz"), None).is_some());
        r
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.listen)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A series' value on `/metrics` (`name{labels}` as exposed).
    pub fn metric(&self, series: &str) -> Option<f64> {
        metric(&self.url("/metrics"), series)
    }

    /// Events it applied (from Kafka, every outcome).
    pub fn events(&self) -> f64 {
        events(&self.url("/metrics"))
    }

    /// The process has not exited.
    pub fn assert_running(&mut self) {
        assert!(self.process.0.try_wait().unwrap().is_none(), "riskd still runs: {}", self.log());
    }

    /// SIGTERM: it drains and exits 0.
    pub fn stop_ok(mut self) {
        assert!(self.process.0.try_wait().unwrap().is_none(), "riskd still runs before SIGTERM: {}", self.log());
        signal(self.process.0.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = self.process.0.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "riskd did not exit within 60 s of SIGTERM: {}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(status.success(), "SIGTERM drains and exits 0: {}", self.log());
    }
}

impl Drop for Riskd {
    fn drop(&mut self) {
        // A failing test shows what riskd said (its folder is deleted).
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            eprintln!("--- last lines of {}:", self.log.display());
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

fn metric(url: &str, series: &str) -> Option<f64> {
    http_get(url, None).and_then(|(_, body)| {
        body.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
    })
}

fn events(url: &str) -> f64 {
    ["ok", "invalid", "too_large", "incomplete"]
        .iter()
        .filter_map(|o| metric(url, &format!("riskd_events_total{{outcome=\"{o}\",source=\"kafka\"}}")))
        .sum()
}

/// What a watch saw at one poll.
#[derive(Clone, Debug)]
pub struct Seen {
    pub at: Instant,
    pub ready: bool,
    pub body: String,
    pub events: f64,
    pub commits: f64,
}

/// Polls `/readyz` and two counters of one or more riskd processes every
/// 100 ms on a thread of its own.
pub struct Watch {
    seen: Arc<Mutex<Vec<Vec<Seen>>>>,
    stop: Arc<AtomicBool>,
}

impl Watch {
    pub fn start(listens: &[u16]) -> Self {
        let seen: Arc<Mutex<Vec<Vec<Seen>>>> = Arc::new(Mutex::new(vec![Vec::new(); listens.len()]));
        let stop = Arc::new(AtomicBool::new(false));
        let (log, halt, listens) = (Arc::clone(&seen), Arc::clone(&stop), listens.to_vec());
        std::thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                for (i, port) in listens.iter().enumerate() {
                    let base = format!("http://127.0.0.1:{port}");
                    let Some((status, body)) = http_get(&format!("{base}/readyz"), None) else { continue };
                    let metrics = format!("{base}/metrics");
                    let commits = metric(&metrics, "riskd_kafka_commits_total{outcome=\"ok\"}").unwrap_or(0.0);
                    let s = Seen { at: Instant::now(), ready: status == 200, body, events: events(&metrics), commits };
                    log.lock().unwrap()[i].push(s);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Watch { seen, stop }
    }

    /// What process `i` looked like between `from` and `to`.
    pub fn between(&self, i: usize, from: Instant, to: Instant) -> Vec<Seen> {
        self.seen.lock().unwrap()[i].iter().filter(|s| s.at >= from && s.at <= to).cloned().collect()
    }

    /// The reasons process `i` gave for not being ready between `from` and `to`.
    pub fn not_ready_reasons(&self, i: usize, from: Instant, to: Instant) -> Vec<String> {
        let mut reasons: Vec<String> =
            self.between(i, from, to).into_iter().filter(|s| !s.ready).map(|s| s.body).collect();
        reasons.dedup();
        reasons
    }

    /// Waits until every process is ready again after `cleared` with more
    /// offsets committed than when the fault cleared: how long that took.
    pub fn resumed_after(&self, cleared: Instant, timeout: Duration) -> Duration {
        let deadline = Instant::now() + timeout;
        loop {
            let now = Instant::now();
            let resumed: Option<Instant> = {
                let seen = self.seen.lock().unwrap();
                seen.iter()
                    .map(|polls| {
                        let before = polls.iter().rev().find(|s| s.at <= cleared).map_or(0.0, |s| s.commits);
                        polls.iter().find(|s| s.at > cleared && s.ready && s.commits > before).map(|s| s.at)
                    })
                    .try_fold(cleared, |latest, at| at.map(|a| a.max(latest)))
            };
            if let Some(at) = resumed {
                return at - cleared;
            }
            assert!(
                now < deadline,
                "riskd did not resume (ready, committing) within {timeout:?} of the fault clearing"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Waits until `riskd` has applied `n` events.
pub fn wait_applied(riskd: &Riskd, n: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while riskd.events() < n as f64 {
        assert!(
            Instant::now() < deadline,
            "riskd applied {} of {n} events within {timeout:?}: {}",
            riskd.events(),
            riskd.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Compares the alerts topic with the undisturbed run's alerts: returns
/// (alert ids missing, alert messages beyond one per expected id).
pub fn compare_alerts(read: &[super::kafka::Read], expected: &BTreeMap<String, Value>) -> (usize, usize) {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for m in read {
        assert_eq!(m.alert_id.as_deref(), m.value["alert_id"].as_str(), "alert id header");
        *counts.entry(m.value["alert_id"].as_str().unwrap().to_string()).or_default() += 1;
    }
    let missing = expected.keys().filter(|id| !counts.contains_key(*id)).count();
    // Which, with the events that raised them (a fault test's timeline says
    // whether they were produced before the fault or after).
    for (id, alert) in expected.iter().filter(|(id, _)| !counts.contains_key(*id)) {
        eprintln!(
            "missing alert {id}: rule {}, entity {}, event time {}",
            alert["rule_id"], alert["entity"]["id"], alert["event_time"]
        );
    }
    let extra: usize = counts.iter().map(|(id, n)| if expected.contains_key(id) { n - 1 } else { *n }).sum();
    let got = by_id(read.iter().map(|m| m.value.clone()));
    if missing == 0 && extra == 0 {
        assert!(&got == expected, "the alerts' contents equal the undisturbed run's");
    }
    (missing, extra)
}
