//! Live reload while scoring a stream: a valid change is swapped in between
//! events, an invalid one is rejected whole and the running rules stay; no
//! event is lost.

mod common;

use common::*;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn get(url: &str) -> String {
    ureq::get(url).call().ok().and_then(|mut r| r.body_mut().read_to_string().ok()).unwrap_or_default()
}

fn sample(exposition: &str, series: &str) -> f64 {
    exposition.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
}

fn wait_metric(port: u16, series: &str, at_least: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = sample(&get(&format!("http://127.0.0.1:{port}/metrics")), series);
        if v >= at_least {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {series} >= {at_least} (is {v})");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn denied(input: &Path, principal: &str, minutes: std::ops::Range<u32>) {
    let mut f = std::fs::OpenOptions::new().append(true).create(true).open(input).unwrap();
    for m in minutes {
        writeln!(
            f,
            r#"{{"eventTime":"2024-03-01T00:{m:02}:00Z","errorCode":"AccessDenied","userIdentity":{{"arn":"{principal}"}}}}"#
        )
        .unwrap();
    }
}

#[test]
fn valid_changes_swap_in_invalid_ones_are_rejected_and_no_event_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    let rule_file = rules.join("aws.yaml");
    let original = std::fs::read_to_string(root().join("config/rules/aws_cloudtrail.yaml")).unwrap();
    std::fs::write(&rule_file, &original).unwrap();
    let input = dir.path().join("events.jsonl");
    denied(&input, "a", 0..5);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = write_config_with_rules(dir.path(), &input, &rules, "follow = true", "flush_interval = \"200ms\"");
    let text =
        std::fs::read_to_string(&config).unwrap().replace("listen = \"\"", &format!("listen = \"127.0.0.1:{port}\""));
    std::fs::write(&config, text).unwrap();
    let mut child = riskd_command(&["run", "--config", &config.display().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let events = "riskd_events_total{outcome=\"ok\",source=\"file\"}";
    wait_metric(port, events, 5.0);

    // A valid change: the burst threshold drops from 10 to 6. a's count (5)
    // is kept, since the rule's state shape is unchanged.
    std::fs::write(&rule_file, original.replace("threshold: 10", "threshold: 6")).unwrap();
    wait_metric(port, "riskd_config_reloads_total{outcome=\"ok\"}", 1.0);
    denied(&input, "a", 5..6);
    wait_metric(port, events, 6.0);
    wait_metric(port, "riskd_alerts_total{rule=\"aws_access_denied_burst\",severity=\"MEDIUM\"}", 1.0);

    // The read-only API explains entities with the reloaded scoring too.
    let entity = format!("http://127.0.0.1:{port}/v1/entities/principal/a");
    let threshold = || serde_json::from_str::<serde_json::Value>(&get(&entity)).ok().map(|v| v["threshold"].clone());
    assert_eq!(threshold(), Some(serde_json::json!(100.0)));
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("\n[scoring.defaults]\nthreshold = 77\n");
    std::fs::write(&config, text).unwrap();
    wait_metric(port, "riskd_config_reloads_total{outcome=\"ok\"}", 2.0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while threshold() != Some(serde_json::json!(77.0)) {
        assert!(Instant::now() < deadline, "the API still explains with the old scoring: {:?}", threshold());
        std::thread::sleep(Duration::from_millis(100));
    }

    // An invalid change is rejected whole; SIGHUP reloads too.
    std::fs::write(&rule_file, original.replace("threshold: 10", "threshold: ten")).unwrap();
    wait_metric(port, "riskd_config_reloads_total{outcome=\"error\"}", 1.0);
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    wait_metric(port, "riskd_config_reloads_total{outcome=\"error\"}", 2.0);
    // The running rules (threshold 6) still apply.
    denied(&input, "b", 10..16);
    wait_metric(port, events, 12.0);
    wait_metric(port, "riskd_alerts_total{rule=\"aws_access_denied_burst\",severity=\"MEDIUM\"}", 2.0);

    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "riskd did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("riskd: events read 12, skipped 0"), "{stderr}");
    assert!(stderr.contains("config reload rejected"), "{stderr}");
    let ids: Vec<String> =
        alerts(dir.path()).iter().map(|a| a["entity"]["id"].as_str().unwrap_or("").to_string()).collect();
    assert_eq!(ids, ["a", "b"]);
}
