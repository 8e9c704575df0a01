//! Observability against the real tools: riskd's exposition passes
//! `promtool check metrics`, its counters move as they should, and every
//! PromQL expression of every dashboard returns data from a real Prometheus
//! server scraping a running riskd.
//!
//! Needs Debian's `prometheus` package (`scripts/test.sh` installs it);
//! `RISKD_TEST_PROMETHEUS` / `RISKD_TEST_PROMTOOL` may point elsewhere.

mod common;

use common::*;
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn get(url: &str) -> Option<(u16, String)> {
    http_get(url, None)
}

fn tool(var: &str, name: &str) -> PathBuf {
    if let Ok(p) = std::env::var(var) {
        return PathBuf::from(p);
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} not found: run ./scripts/test.sh, which installs Debian's prometheus package (or set {var})");
}

/// The sample stream plus two malformed lines and one event a rule cannot key.
fn input_with_bad_lines(dir: &Path) -> PathBuf {
    let mut text = std::fs::read_to_string(samples()).unwrap();
    text.push_str("not json\n[1]\n");
    text.push_str(
        r#"{"eventType":"user.session.start","published":"2024-03-01T00:00:00Z","client":{"ipAddress":"1.2.3.4"}}"#,
    );
    text.push('\n');
    let path = dir.join("events.jsonl");
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts `riskd run` following `input`, serving telemetry on a free port;
/// on DynamoDB Local (with a request budget) or on the embedded store.
fn start_riskd(dir: &Path, input: &Path, dynamodb: bool) -> (Guard, u16) {
    let port = free_port();
    let config = if dynamodb {
        write_dynamodb_config(
            dir,
            input,
            "follow = true",
            "ttl = false\nflush_interval = \"200ms\"\nwrite_requests_per_second = 20\nread_requests_per_second = 50",
        )
    } else {
        write_config(dir, input, "follow = true", "flush_interval = \"200ms\"")
    };
    let text =
        std::fs::read_to_string(&config).unwrap().replace("listen = \"\"", &format!("listen = \"127.0.0.1:{port}\""));
    std::fs::write(&config, text).unwrap();
    let child = riskd_command(&["run", "--config", &config.display().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let guard = Guard(child);
    wait_for("riskd /readyz", Duration::from_secs(30), || {
        get(&format!("http://127.0.0.1:{port}/readyz")).is_some_and(|(s, _)| s == 200)
    });
    (guard, port)
}

/// Value of one sample line `name{labels} value` in an exposition.
fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

fn stop_gracefully(mut guard: Guard) -> String {
    let pid = guard.0.id().to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(s) = guard.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "riskd did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    if let Some(mut e) = guard.0.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
    }
    assert!(exit.success(), "riskd exited with {exit}: {stderr}");
    stderr
}

#[test]
fn counters_move_as_they_should_and_promtool_accepts_the_exposition() {
    let dir = tempfile::tempdir().unwrap();
    let input = input_with_bad_lines(dir.path());
    let (riskd, port) = start_riskd(dir.path(), &input, false);
    let url = format!("http://127.0.0.1:{port}/metrics");
    let mut exposition = String::new();
    wait_for("all 373 lines counted", Duration::from_secs(30), || {
        exposition = get(&url).map(|(_, body)| body).unwrap_or_default();
        let n: f64 = ["ok", "invalid", "incomplete"]
            .iter()
            .filter_map(|o| sample(&exposition, &format!("riskd_events_total{{outcome=\"{o}\",source=\"file\"}}")))
            .sum();
        n == 373.0
    });
    // 370 sample events in, 370 counted ok; the malformed lines as invalid.
    assert_eq!(sample(&exposition, "riskd_events_total{outcome=\"ok\",source=\"file\"}"), Some(370.0));
    assert_eq!(sample(&exposition, "riskd_events_total{outcome=\"invalid\",source=\"file\"}"), Some(2.0));
    assert_eq!(sample(&exposition, "riskd_events_total{outcome=\"incomplete\",source=\"file\"}"), Some(1.0));
    assert_eq!(sample(&exposition, "riskd_dead_letters_total{reason=\"invalid_json\"}"), Some(1.0));
    assert_eq!(sample(&exposition, "riskd_dead_letters_total{reason=\"not_object\"}"), Some(1.0));
    // alice's second burst within the hour: one suppressed alert.
    assert_eq!(
        sample(
            &exposition,
            "riskd_alerts_suppressed_total{reason=\"dedup\",rule=\"aws_access_denied_burst\",severity=\"MEDIUM\"}"
        ),
        Some(1.0)
    );
    assert_eq!(sample(&exposition, "riskd_alerts_total{rule=\"entity_risk\",severity=\"MEDIUM\"}"), Some(1.0));
    assert_eq!(sample(&exposition, "riskd_entities_at_risk{entity_type=\"user\"}"), Some(1.0));
    assert_eq!(sample(&exposition, "riskd_ready"), Some(1.0));
    let alerts: f64 = exposition
        .lines()
        .filter(|l| l.starts_with("riskd_alerts_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(alerts, 18.0);

    promtool_accepts(&exposition);

    assert_eq!(get(&format!("http://127.0.0.1:{port}/healthz")).map(|(s, _)| s), Some(200));
    let stderr = stop_gracefully(riskd);
    assert!(stderr.contains("riskd: events read 373,"), "{stderr}");
}

/// Every PromQL expression in `dashboards/*.json` (the Kafka dashboard's
/// when `kafka`, the others' otherwise), with Grafana's variables replaced
/// as Grafana would.
fn dashboard_queries(kafka: bool) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let dir = root().join("dashboards");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "expected the overview, state-store and Kafka dashboards in {}", dir.display());
    files.retain(|f| f.to_string_lossy().contains("kafka") == kafka);
    for file in files {
        let d: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        assert!(
            d["templating"]["list"].as_array().is_some_and(|l| l.iter().any(|v| v["type"] == "datasource")),
            "{}: the Prometheus data source must be a variable",
            file.display()
        );
        for panel in d["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"]
                    .as_str()
                    .unwrap()
                    .replace("$__rate_interval", "1m")
                    .replace("$__range", "5m")
                    .replace("$__interval", "15s");
                let name =
                    format!("{} / {}", file.file_name().unwrap().to_string_lossy(), panel["title"].as_str().unwrap());
                out.push((name, expr));
            }
        }
    }
    out
}

#[test]
fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    let dir = tempfile::tempdir().unwrap();
    let input = input_with_bad_lines(dir.path());
    // On DynamoDB, so that the state-store dashboard's DynamoDB panels have data too.
    let (riskd, riskd_port) = start_riskd(dir.path(), &input, true);
    // Read the exposition once every line is scored, so that every series exists.
    let mut exposition = String::new();
    wait_for("all 373 lines scored", Duration::from_secs(60), || {
        exposition = get(&format!("http://127.0.0.1:{riskd_port}/metrics")).map(|(_, b)| b).unwrap_or_default();
        sample(&exposition, "riskd_events_total{outcome=\"ok\",source=\"file\"}") == Some(370.0)
    });

    assert_dashboards_have_data(dir.path(), riskd_port, &exposition, &dashboard_queries(false));
    stop_gracefully(riskd);
}

/// `promtool check metrics` passes on the exposition.
fn promtool_accepts(exposition: &str) {
    let mut promtool = Command::new(tool("RISKD_TEST_PROMTOOL", "promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    promtool.stdin.take().unwrap().write_all(exposition.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every query names metrics riskd exports, and returns data from a real
/// Prometheus server scraping riskd on `riskd_port`.
fn assert_dashboards_have_data(dir: &Path, riskd_port: u16, exposition: &str, queries: &[(String, String)]) {
    // Every metric a dashboard names is one riskd exports.
    for (panel, expr) in queries {
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("riskd_") {
                let base = ["_bucket", "_count", "_sum"].iter().fold(word, |w, s| w.strip_suffix(s).unwrap_or(w));
                assert!(exposition.contains(&format!("# TYPE {base} ")), "{panel}: riskd does not export {word}");
            }
        }
    }

    let prom_port = free_port();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: riskd\n    static_configs:\n      - targets: ['127.0.0.1:{riskd_port}']\n"
        ),
    )
    .unwrap();
    let prometheus = Command::new(tool("RISKD_TEST_PROMETHEUS", "prometheus"))
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _prometheus = Guard(prometheus);
    let api = format!("http://127.0.0.1:{prom_port}");
    wait_for("prometheus ready", Duration::from_secs(60), || {
        get(&format!("{api}/-/ready")).is_some_and(|(s, _)| s == 200)
    });
    let query = |expr: &str| -> Value {
        let mut resp = ureq::get(format!("{api}/api/v1/query")).query("query", expr).call().unwrap();
        serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).unwrap()
    };
    // A few scrapes, so that rate() has two points in its window.
    wait_for("four scrapes of riskd", Duration::from_secs(60), || {
        query("count_over_time(riskd_ready[1m])")["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(|n| n >= 4.0)
    });
    let mut failures = Vec::new();
    for (panel, expr) in queries {
        let r = query(expr);
        if r["status"] != "success" {
            failures.push(format!("{panel}: {expr}: {}", r["error"]));
        } else if r["data"]["result"].as_array().is_none_or(|a| a.is_empty()) {
            failures.push(format!("{panel}: {expr}: no data"));
        }
    }
    assert!(failures.is_empty(), "dashboard queries failed:\n{}", failures.join("\n"));
}

#[test]
fn every_kafka_dashboard_query_returns_data_from_a_real_prometheus() {
    use common::kafka::*;
    let dir = tempfile::tempdir().unwrap();
    let lines: Vec<(Option<String>, String)> = std::fs::read_to_string(input_with_bad_lines(dir.path()))
        .unwrap()
        .lines()
        .map(|l| (None, l.to_string()))
        .collect();
    let (topic, alerts_topic, group) = (unique("events"), unique("alerts"), unique("riskd"));
    create_topic(&brokers(), &topic, 2);
    produce(&brokers(), &topic, &lines);
    let port = free_port();
    let kafka = format!("group_id = {group:?}\ntopics = [{topic:?}]\nalerts_topic = {alerts_topic:?}");
    let config = write_kafka_config(
        dir.path(),
        &root().join("config/rules"),
        &kafka,
        "kind = \"embedded\"\npath = \"riskd.redb\"",
        "",
    );
    let text =
        std::fs::read_to_string(&config).unwrap().replace("listen = \"\"", &format!("listen = \"127.0.0.1:{port}\""));
    std::fs::write(&config, text).unwrap();
    let riskd = Guard(
        riskd_command(&["run", "--config", &config.display().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Every message applied, and librdkafka's statistics (every 5 s) in.
    let mut exposition = String::new();
    wait_for("all lines scored and the lag reported", Duration::from_secs(90), || {
        exposition = get(&format!("http://127.0.0.1:{port}/metrics")).map(|(_, b)| b).unwrap_or_default();
        sample(&exposition, "riskd_events_total{outcome=\"ok\",source=\"kafka\"}") == Some(370.0)
            && exposition.contains("riskd_kafka_consumer_lag{")
    });
    assert_eq!(sample(&exposition, "riskd_kafka_partitions"), Some(2.0));
    // The Kafka series pass promtool too.
    promtool_accepts(&exposition);
    assert_dashboards_have_data(dir.path(), port, &exposition, &dashboard_queries(true));
    stop_gracefully(riskd);
}
