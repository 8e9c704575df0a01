//! A store outage slows riskd down; it never drops or double-applies an
//! event, and a quiet spell is no outage at all.
//! - DynamoDB Local (its own instance, on disk so its data survives) is
//!   stopped for 10 s while riskd follows a stream: riskd backs off,
//!   `/readyz` says not ready and why, and once the store is back every
//!   event is scored exactly once — the same alerts as a run that saw no
//!   outage.
//! - No event for 45 s while riskd follows a stream on DynamoDB Local, which
//!   closes idle connections meanwhile: the next request must not fail the
//!   job.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn jar() -> PathBuf {
    PathBuf::from(std::env::var("RISKD_TEST_DYNAMODB_JAR").unwrap_or_else(|_| {
        panic!("RISKD_TEST_DYNAMODB_JAR is not set: run ./scripts/test.sh, which installs DynamoDB Local")
    }))
}

fn answers(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

fn start_dynamodb(port: u16, data: &Path) -> Guard {
    let jar = jar();
    let dir = jar.parent().expect("the jar's folder");
    let child = Command::new("java")
        .current_dir(dir)
        .args(["-Xmx256m", "-Djava.library.path=./DynamoDBLocal_lib", "-jar"])
        .arg(&jar)
        .args(["-sharedDb", "-disableTelemetry", "-dbPath"])
        .arg(data)
        .args(["-port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("java runs DynamoDB Local");
    wait_for("DynamoDB Local", Duration::from_secs(60), || answers(port));
    Guard(child)
}

fn get(url: &str) -> Option<(u16, String)> {
    http_get(url, None)
}

fn events_counted(port: u16) -> f64 {
    get(&format!("http://127.0.0.1:{port}/metrics"))
        .map(|(_, body)| body)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("riskd_events_total{outcome=\"ok\",source=\"file\"} ")?.parse().ok())
        .unwrap_or(0.0)
}

/// riskd following `input` (its first lines already written) with `store`
/// as its `[store]` section, serving telemetry on `port`.
struct Following {
    riskd: Guard,
    port: u16,
    input: PathBuf,
}

impl Following {
    fn start(dir: &Path, first: &[String], store: &str) -> Self {
        let input = dir.join("events.jsonl");
        std::fs::write(&input, first.join("\n") + "\n").unwrap();
        let port = free_port();
        let config = write_config_with_store(dir, &input, &root().join("config/rules"), "follow = true", store);
        let text = std::fs::read_to_string(&config)
            .unwrap()
            .replace("listen = \"\"", &format!("listen = \"127.0.0.1:{port}\""));
        std::fs::write(&config, text).unwrap();
        let c = config.display().to_string();
        let out = riskd(&["store", "init", "--config", &c]);
        assert!(out.status.success(), "riskd store init: {}", String::from_utf8_lossy(&out.stderr));
        let child =
            riskd_command(&["run", "--config", &c]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let following = Following { riskd: Guard(child), port, input };
        wait_for("riskd ready", Duration::from_secs(30), || following.ready() == Some(true));
        wait_for("the first events", Duration::from_secs(30), || following.counted() >= first.len() as f64);
        following
    }

    fn readyz(&self) -> Option<(u16, String)> {
        get(&format!("http://127.0.0.1:{}/readyz", self.port))
    }

    fn ready(&self) -> Option<bool> {
        self.readyz().map(|(status, _)| status == 200)
    }

    fn counted(&self) -> f64 {
        events_counted(self.port)
    }

    fn append(&self, lines: &[String]) {
        std::fs::OpenOptions::new()
            .append(true)
            .open(&self.input)
            .and_then(|mut f| std::io::Write::write_all(&mut f, (lines.join("\n") + "\n").as_bytes()))
            .unwrap();
    }

    fn running(&mut self) -> bool {
        self.riskd.0.try_wait().unwrap().is_none()
    }

    /// What riskd wrote to stderr (once it has exited).
    fn stderr(&mut self) -> String {
        let mut stderr = String::new();
        if let Some(mut pipe) = self.riskd.0.stderr.take() {
            std::io::Read::read_to_string(&mut pipe, &mut stderr).unwrap();
        }
        stderr
    }

    /// SIGTERM, then what riskd wrote to stderr (its summary last).
    fn stop(mut self) -> String {
        let pid = self.riskd.0.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        wait_for("riskd to stop", Duration::from_secs(30), || self.riskd.0.try_wait().ok().flatten().is_some());
        self.stderr()
    }
}

fn sample_lines() -> Vec<String> {
    std::fs::read_to_string(samples()).unwrap().lines().map(String::from).collect()
}

/// The alert ids of the sample stream scored with no outage (embedded store).
fn undisturbed_alert_ids() -> Vec<serde_json::Value> {
    let calm = tempfile::tempdir().unwrap();
    run_ok(&write_config(calm.path(), &samples(), "", ""));
    alerts(calm.path()).iter().map(|a| a["alert_id"].clone()).collect()
}

fn alert_ids(dir: &Path) -> Vec<serde_json::Value> {
    alerts(dir).iter().map(|a| a["alert_id"].clone()).collect()
}

#[test]
fn a_store_outage_is_ridden_out_without_losing_or_repeating_an_event() {
    let dir = tempfile::tempdir().unwrap();
    let ddb_port = free_port();
    let mut dynamodb = start_dynamodb(ddb_port, dir.path());
    let lines = sample_lines();
    let (first, rest) = lines.split_at(100);
    let store = format!(
        "kind = \"dynamodb\"\ntable = \"outage\"\nregion = \"us-east-1\"\nendpoint_url = \"http://127.0.0.1:{ddb_port}\"\nttl = false\nflush_interval = \"200ms\""
    );
    let mut riskd = Following::start(dir.path(), first, &store);
    std::thread::sleep(Duration::from_millis(500)); // let a flush commit them

    // The outage: the store goes away, more events arrive.
    let _ = dynamodb.0.kill();
    let _ = dynamodb.0.wait();
    let outage = Instant::now();
    riskd.append(rest);
    let mut reason = String::new();
    wait_for("riskd to report not ready", Duration::from_secs(30), || match riskd.readyz() {
        Some((503, body)) => {
            reason = body;
            true
        }
        _ => false,
    });
    assert!(reason.contains("store:"), "the reason names the store: {reason}");
    let stuck = riskd.counted();
    assert!(stuck < 210.0, "riskd stopped taking events while the store is down ({stuck} counted)");
    std::thread::sleep(Duration::from_secs(10).saturating_sub(outage.elapsed()));
    assert!(riskd.running(), "riskd must ride out the outage, not exit");

    // The store comes back with its data.
    dynamodb = start_dynamodb(ddb_port, dir.path());
    wait_for("riskd ready again", Duration::from_secs(60), || riskd.ready() == Some(true));
    wait_for("all 210 events", Duration::from_secs(60), || riskd.counted() >= 210.0);
    assert_eq!(riskd.counted(), 210.0, "no event counted twice");
    let stderr = riskd.stop();
    assert!(stderr.contains("riskd: events read 210,"), "{stderr}");
    assert!(stderr.contains("failed; retrying") && stderr.contains("store"), "the outage is logged: {stderr}");
    assert_eq!(alert_ids(dir.path()), undisturbed_alert_ids(), "the same alerts as a run with no outage");
    drop(dynamodb);
}

#[test]
fn a_quiet_minute_on_dynamodb_is_not_an_outage() {
    let dir = tempfile::tempdir().unwrap();
    let lines = sample_lines();
    let (first, rest) = lines.split_at(100);
    let store = dynamodb_store_section("ttl = false\nflush_interval = \"200ms\"");
    let mut riskd = Following::start(dir.path(), first, &store);
    // DynamoDB Local closes a connection idle for 30 s; the SDK's pool
    // still holds it, and the next request is sent on it.
    let quiet = Instant::now();
    while quiet.elapsed() < Duration::from_secs(45) {
        assert!(riskd.running(), "riskd exited during a quiet spell: {}", riskd.stderr());
        std::thread::sleep(Duration::from_secs(1));
    }
    riskd.append(rest);
    wait_for("all 210 events", Duration::from_secs(60), || {
        assert!(riskd.running(), "riskd exited at the first request after a quiet spell: {}", riskd.stderr());
        riskd.counted() >= 210.0
    });
    assert_eq!(riskd.counted(), 210.0, "no event counted twice");
    let stderr = riskd.stop();
    assert!(stderr.contains("riskd: events read 210,"), "{stderr}");
    assert_eq!(alert_ids(dir.path()), undisturbed_alert_ids(), "the same alerts as a run with no quiet spell");
}
