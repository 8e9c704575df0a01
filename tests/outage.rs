//! A store outage slows riskd down; it never drops or double-applies an
//! event, and a quiet spell is no outage at all.
//! - DynamoDB Local (its own instance, on disk so its data survives) is
//!   stopped (SIGTERM: see `DynamoLocal::stop`) for 10 s while riskd
//!   follows a stream: riskd backs off, `/readyz` says not ready and why,
//!   and once the store is back every event is scored exactly once — the
//!   same alerts as a run that saw no outage.
//! - No event for 45 s while riskd follows a stream on DynamoDB Local, which
//!   closes idle connections meanwhile: the next request must not fail the
//!   job.

mod common;

use common::dynamodb::DynamoLocal;
use common::follow::Following;
use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

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

/// A DynamoDB Local of the test's own, keeping its data in `dir` (so it
/// survives a restart), and the `[store]` section of `table` on it.
fn own_dynamodb(dir: &Path, table: &str) -> (DynamoLocal, String) {
    let dynamodb = DynamoLocal::start(free_port(), Some(dir));
    let store = format!(
        "kind = \"dynamodb\"\ntable = {table:?}\nregion = \"us-east-1\"\nendpoint_url = {:?}\nttl = false\nflush_interval = \"200ms\"",
        dynamodb.endpoint()
    );
    (dynamodb, store)
}

#[test]
fn a_store_outage_is_ridden_out_without_losing_or_repeating_an_event() {
    let dir = tempfile::tempdir().unwrap();
    let (dynamodb, store) = own_dynamodb(dir.path(), "outage");
    let ddb_port = dynamodb.port;
    let lines = sample_lines();
    let (first, rest) = lines.split_at(100);
    let mut riskd = Following::start(dir.path(), first, &store);
    std::thread::sleep(Duration::from_millis(500)); // let a flush commit them

    // The outage: the store goes away, more events arrive.
    dynamodb.stop();
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
    assert!(stuck < 370.0, "riskd stopped taking events while the store is down ({stuck} counted)");
    std::thread::sleep(Duration::from_secs(10).saturating_sub(outage.elapsed()));
    assert!(riskd.running(), "riskd must ride out the outage, not exit");

    // The store comes back with its data.
    let dynamodb = DynamoLocal::start(ddb_port, Some(dir.path()));
    wait_for("riskd ready again", Duration::from_secs(60), || riskd.ready() == Some(true));
    wait_for("all 370 events", Duration::from_secs(60), || riskd.counted() >= 370.0);
    assert_eq!(riskd.counted(), 370.0, "no event counted twice");
    let stderr = riskd.stop();
    assert!(stderr.contains("riskd: events read 370,"), "{stderr}");
    assert!(stderr.contains("failed; retrying") && stderr.contains("store"), "the outage is logged: {stderr}");
    assert_eq!(alert_ids(dir.path()), undisturbed_alert_ids(), "the same alerts as a run with no outage");
    drop(dynamodb);
}

#[test]
fn a_store_down_at_start_is_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let (dynamodb, store) = own_dynamodb(dir.path(), "down_at_start");
    let ddb_port = dynamodb.port;
    let lines = sample_lines();
    let (first, rest) = lines.split_at(100);
    let mut riskd = Following::start(dir.path(), first, &store);
    // Stopped, then started again while the store is down, with more events.
    let input = riskd.input.clone();
    let stopped = riskd.restart(|| {
        dynamodb.kill();
        common::follow::append(&input, rest);
    });
    assert!(stopped.contains("riskd: events read 100,"), "{stopped}");
    let mut reason = String::new();
    wait_for("riskd to report the store not ready", Duration::from_secs(30), || match riskd.readyz() {
        Some((503, body)) => {
            reason = body;
            reason.contains("store:")
        }
        _ => false,
    });
    assert!(reason.contains("store:"), "the reason names the store: {reason}");
    std::thread::sleep(Duration::from_secs(5));
    assert!(riskd.running(), "riskd must wait for the store, not exit: {}", riskd.stderr());
    let dynamodb = DynamoLocal::start(ddb_port, Some(dir.path()));
    wait_for("riskd ready", Duration::from_secs(60), || riskd.ready() == Some(true));
    wait_for("the other 270 events", Duration::from_secs(60), || riskd.counted() >= 270.0);
    let stderr = riskd.stop();
    assert!(stderr.contains("riskd: events read 270,"), "each event once: {stderr}");
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
    wait_for("all 370 events", Duration::from_secs(60), || {
        assert!(riskd.running(), "riskd exited at the first request after a quiet spell: {}", riskd.stderr());
        riskd.counted() >= 370.0
    });
    assert_eq!(riskd.counted(), 370.0, "no event counted twice");
    let stderr = riskd.stop();
    assert!(stderr.contains("riskd: events read 370,"), "{stderr}");
    assert_eq!(alert_ids(dir.path()), undisturbed_alert_ids(), "the same alerts as a run with no quiet spell");
}
