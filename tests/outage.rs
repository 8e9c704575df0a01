//! A store outage slows riskd down; it never drops or double-applies an
//! event. DynamoDB Local (its own instance, on disk so its data survives)
//! is stopped for 10 s while riskd follows a stream: riskd backs off,
//! `/readyz` says not ready and why, and once the store is back every event
//! is scored exactly once — the same alerts as a run that saw no outage.

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

#[test]
fn a_store_outage_is_ridden_out_without_losing_or_repeating_an_event() {
    let dir = tempfile::tempdir().unwrap();
    let ddb_port = free_port();
    let mut dynamodb = start_dynamodb(ddb_port, dir.path());

    let lines: Vec<String> = std::fs::read_to_string(samples()).unwrap().lines().map(String::from).collect();
    let (first, rest) = lines.split_at(100);
    let input = dir.path().join("events.jsonl");
    std::fs::write(&input, first.join("\n") + "\n").unwrap();

    let riskd_port = free_port();
    let store = format!(
        "kind = \"dynamodb\"\ntable = \"outage\"\nregion = \"us-east-1\"\nendpoint_url = \"http://127.0.0.1:{ddb_port}\"\nttl = false\nflush_interval = \"200ms\""
    );
    let config = write_config_with_store(dir.path(), &input, &root().join("config/rules"), "follow = true", &store);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("listen = \"\"", &format!("listen = \"127.0.0.1:{riskd_port}\""));
    std::fs::write(&config, text).unwrap();
    let c = config.display().to_string();
    assert!(riskd(&["store", "init", "--config", &c]).status.success());
    let riskd = riskd_command(&["run", "--config", &c]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let mut riskd = Guard(riskd);
    let readyz = format!("http://127.0.0.1:{riskd_port}/readyz");
    wait_for("riskd ready", Duration::from_secs(30), || get(&readyz).is_some_and(|(s, _)| s == 200));
    wait_for("the first 100 events", Duration::from_secs(30), || events_counted(riskd_port) >= 100.0);
    std::thread::sleep(Duration::from_millis(500)); // let a flush commit them

    // The outage: the store goes away, more events arrive.
    let _ = dynamodb.0.kill();
    let _ = dynamodb.0.wait();
    let outage = Instant::now();
    std::fs::OpenOptions::new()
        .append(true)
        .open(&input)
        .and_then(|mut f| std::io::Write::write_all(&mut f, (rest.join("\n") + "\n").as_bytes()))
        .unwrap();
    let mut reason = String::new();
    wait_for("riskd to report not ready", Duration::from_secs(30), || match get(&readyz) {
        Some((503, body)) => {
            reason = body;
            true
        }
        _ => false,
    });
    assert!(reason.contains("store:"), "the reason names the store: {reason}");
    let stuck = events_counted(riskd_port);
    assert!(stuck < 210.0, "riskd stopped taking events while the store is down ({stuck} counted)");
    std::thread::sleep(Duration::from_secs(10).saturating_sub(outage.elapsed()));
    assert!(riskd.0.try_wait().unwrap().is_none(), "riskd must ride out the outage, not exit");

    // The store comes back with its data.
    dynamodb = start_dynamodb(ddb_port, dir.path());
    wait_for("riskd ready again", Duration::from_secs(60), || get(&readyz).is_some_and(|(s, _)| s == 200));
    wait_for("all 210 events", Duration::from_secs(60), || events_counted(riskd_port) >= 210.0);
    assert_eq!(events_counted(riskd_port), 210.0, "no event counted twice");
    let pid = riskd.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    wait_for("riskd to stop", Duration::from_secs(30), || riskd.0.try_wait().ok().flatten().is_some());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut riskd.0.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("riskd: events read 210,"), "{stderr}");
    assert!(stderr.contains("store failed; retrying"), "the outage is logged: {stderr}");

    // The same alerts as a run with no outage (embedded store).
    let calm = tempfile::tempdir().unwrap();
    run_ok(&write_config(calm.path(), &samples(), "", ""));
    let ids = |d: &Path| alerts(d).iter().map(|a| a["alert_id"].clone()).collect::<Vec<_>>();
    assert_eq!(ids(dir.path()), ids(calm.path()));
    drop(dynamodb);
}
