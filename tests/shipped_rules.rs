//! The shipped rules (the five, and the three behaviour rules) on the
//! shipped sample stream: the exact alerts, and the planted near misses
//! that must not fire.

mod common;

use common::*;
use serde_json::Value;
use std::sync::OnceLock;

struct Run {
    _dir: tempfile::TempDir,
    alerts: Vec<Value>,
    stderr: String,
}

fn run() -> &'static Run {
    static RUN: OnceLock<Run> = OnceLock::new();
    RUN.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), &samples(), "", "");
        let stderr = run_ok(&config);
        Run { alerts: alerts(dir.path()), stderr, _dir: dir }
    })
}

fn of_rule(rule: &str) -> Vec<&'static Value> {
    run().alerts.iter().filter(|a| a["rule_id"] == rule).collect()
}

fn ids(alerts: &[&Value]) -> Vec<(String, String, String)> {
    alerts
        .iter()
        .map(|a| {
            let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
            (s(&a["entity"]["type"]), s(&a["entity"]["id"]), s(&a["event_time"]))
        })
        .collect()
}

fn t(s: &str) -> (String, String, String) {
    let mut parts = s.splitn(3, ' ');
    let mut next = || parts.next().unwrap_or_default().to_string();
    (next(), next(), next())
}

#[test]
fn summary_counts_every_event_alert_and_suppression() {
    let line = run().stderr.lines().last().unwrap_or_default();
    assert_eq!(
        line,
        "riskd: events read 370, skipped 0 (invalid 0, too large 0), incomplete 0, alerts 18, suppressed 1, risk alerts 1"
    );
    assert_eq!(run().alerts.len(), 18);
}

#[test]
fn alerts_have_the_documented_shape() {
    for a in &run().alerts {
        for field in [
            "alert_id",
            "rule_id",
            "title",
            "severity",
            "entity",
            "event_time",
            "risk",
            "dedup_key",
            "context",
            "event",
        ] {
            assert!(a.get(field).is_some(), "alert lacks {field}: {a}");
        }
        assert_eq!(a["dedup_key"], a["entity"]["id"], "default dedup key is the entity id");
        if a["rule_id"] == "entity_risk" {
            assert_eq!(a["risk"], 0, "risk alerts add no risk");
        }
        assert_eq!(a["alert_id"].as_str().map(str::len), Some(36), "a UUID");
    }
}

#[test]
fn access_denied_burst_fires_at_ten_and_only_for_alice() {
    let got = of_rule("aws_access_denied_burst");
    // bob's 10th is after his window, carol's is exactly at its end, dave's are other errors;
    // alice's second burst within the hour is suppressed (the summary counts it).
    assert_eq!(ids(&got), vec![t("principal arn:aws:iam::123456789012:user/alice 2024-03-01T00:09:00.000Z")]);
    let a = got[0];
    assert_eq!((a["severity"].as_str(), a["risk"].as_u64()), (Some("MEDIUM"), Some(20)));
    assert_eq!(a["context"]["count"], 10);
    assert_eq!(a["context"]["window_start"], "2024-03-01T00:00:00.000Z");
    assert_eq!(a["context"]["window_end"], "2024-03-01T01:00:00.000Z");
    assert_eq!(a["context"]["source_ip"], "192.0.2.10");
}

#[test]
fn assume_role_from_new_ip_fires_after_trust_on_first_use() {
    let got = of_rule("aws_assume_role_new_source_ip");
    // backup's second IP comes 31 days after its first: the set expired, so it is trusted again.
    assert_eq!(ids(&got), vec![t("role arn:aws:iam::123456789012:role/deploy 2024-03-01T00:10:00.000Z")]);
    let a = got[0];
    assert_eq!((a["severity"].as_str(), a["risk"].as_u64()), (Some("HIGH"), Some(30)));
    assert_eq!(a["context"]["new_value"], "198.51.100.2");
    assert_eq!(a["context"]["known_values"], serde_json::json!(["198.51.100.1"]));
}

#[test]
fn console_login_spray_fires_at_twenty_distinct_users() {
    let got = of_rule("aws_console_login_spray");
    // .77 repeats 19 users; .88's 20th user comes after the hour; .99's logins succeed.
    assert_eq!(ids(&got), vec![t("ip 203.0.113.66 2024-03-01T02:03:10.000Z")]);
    assert_eq!((got[0]["severity"].as_str(), got[0]["risk"].as_u64()), (Some("MEDIUM"), Some(25)));
    assert_eq!(got[0]["context"]["distinct"], 20);
    assert_eq!(got[0]["context"]["values"].as_array().map(Vec::len), Some(20));
}

#[test]
fn okta_ip_change_fires_when_previous_login_ip_differs() {
    let got = of_rule("okta_ip_change");
    // erin keeps her IP, heidi too; frank's previous login is 8 days old; ivan logs in once.
    assert_eq!(
        ids(&got),
        vec![
            t("user mallory@example.com 2024-03-01T05:00:00.000Z"),
            t("user trudy@example.com 2024-03-01T07:00:00.000Z"),
            t("user trudy@example.com 2024-03-01T08:30:00.000Z"),
            t("user trudy@example.com 2024-03-01T10:00:00.000Z"),
            t("user grace@example.com 2024-03-01T14:00:00.000Z"),
            t("user judy@example.com 2024-04-24T00:00:00.000Z"),
        ]
    );
    assert_eq!((got[0]["severity"].as_str(), got[0]["risk"].as_u64()), (Some("LOW"), Some(10)));
    assert_eq!(got[0]["context"]["previous"]["ip"], "203.0.113.5");
    assert_eq!(got[0]["context"]["current"]["ip"], "203.0.113.6");
}

#[test]
fn okta_impossible_travel_fires_on_speed_and_on_zero_time_difference() {
    let got = of_rule("okta_impossible_travel");
    // erin: 306 km in 2 h; grace: 878 km in 10 h; frank: previous login forgotten.
    assert_eq!(
        ids(&got),
        vec![
            t("user heidi@example.com 2024-03-01T04:00:00.000Z"),
            t("user mallory@example.com 2024-03-01T05:00:00.000Z"),
            t("user trudy@example.com 2024-03-01T07:00:00.000Z"),
            t("user trudy@example.com 2024-03-01T08:30:00.000Z"),
            t("user trudy@example.com 2024-03-01T10:00:00.000Z")
        ]
    );
    let heidi = got[0];
    assert_eq!(heidi["context"]["speed_kmh"], Value::Null, "same instant: infinite speed");
    let mallory = got[1];
    assert_eq!((mallory["severity"].as_str(), mallory["risk"].as_u64()), (Some("HIGH"), Some(40)));
    assert_eq!(mallory["context"]["distance_km"], 5570.2);
    assert_eq!(mallory["context"]["speed_kmh"], 5570.2);
    assert_eq!(mallory["context"]["previous"]["city"], "New York");
    assert_eq!(mallory["context"]["current"]["city"], "London");
}

#[test]
fn behaviour_rules_fire_once_each_on_the_planted_behaviour() {
    // etl: three calls every four hours for 80 hours, then 70 in one hour:
    // the 50th (min_value) is far above its baseline. No other principal
    // has 72 closed hours of history when it is busy.
    let got = of_rule("aws_api_volume_spike");
    assert_eq!(ids(&got), vec![t("principal arn:aws:iam::123456789012:user/etl 2024-04-13T09:24:30.000Z")]);
    let c = &got[0]["context"];
    assert_eq!((c["value"].as_f64(), c["history"].as_u64()), (Some(50.0), Some(81)));
    assert!(c["z"].as_f64().unwrap() > 4.0, "{c}");
    assert_eq!(c["bucket_start"], "2024-04-13T09:00:00.000Z");
    // An hour later etl calls IAM, with the weight of 130 calls to S3 and DynamoDB behind it.
    let got = of_rule("aws_rare_service");
    assert_eq!(ids(&got), vec![t("principal arn:aws:iam::123456789012:user/etl 2024-04-13T10:00:00.000Z")]);
    assert_eq!(got[0]["context"]["value"], "iam.amazonaws.com");
    assert_eq!(got[0]["context"]["top"][0]["value"], "s3.amazonaws.com");
    // judy: 28 logins from DE, then one from BR; nobody else has 20 logins.
    let got = of_rule("okta_rare_country");
    assert_eq!(ids(&got), vec![t("user judy@example.com 2024-04-24T00:00:00.000Z")]);
    assert_eq!((got[0]["context"]["value"].as_str(), got[0]["context"]["share"].as_f64()), (Some("BR"), Some(0.0)));
    assert_eq!((got[0]["severity"].as_str(), got[0]["risk"].as_u64()), (Some("MEDIUM"), Some(20)));
}

#[test]
fn same_input_from_empty_state_gives_identical_alerts() {
    let dir = tempfile::tempdir().unwrap();
    // A flush after every event: flush points must not change the outcome.
    let config = write_config(dir.path(), &samples(), "", "flush_every_events = 1");
    run_ok(&config);
    assert_eq!(alerts(dir.path()), run().alerts);
}

#[test]
fn purging_long_expired_records_keeps_the_alerts_and_only_drops_dead_state() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &samples(), "", "purge_after = \"7d\"");
    run_ok(&config);
    assert_eq!(alerts(dir.path()), run().alerts);
    // The samples end on 2024-04-24: what expired before 2024-04-17 is gone, the rest stays.
    let cutoff = 1_713_312_000_000; // 2024-04-17T00:00:00Z
    let kept: Vec<Value> = export_state(&config).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let expiry = |r: &Value| r["record"]["expires_at_ms"].as_i64().or(r["expires_at_ms"].as_i64());
    assert!(kept.iter().all(|r| expiry(r).is_none_or(|at| at > cutoff)), "{kept:?}");
    let unpurged = tempfile::tempdir().unwrap();
    let all = export_state(&{
        let c = write_config(unpurged.path(), &samples(), "", "");
        run_ok(&c);
        c
    });
    let all: Vec<Value> = all.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let survivors: Vec<&Value> = all.iter().filter(|r| expiry(r).is_none_or(|at| at > cutoff)).collect();
    assert!(all.len() > survivors.len(), "the samples leave long-expired state to purge");
    assert_eq!(kept.iter().collect::<Vec<_>>(), survivors, "exactly the long-expired records are gone");
}

#[test]
fn the_dynamodb_store_gives_the_same_alerts() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_dynamodb_config(dir.path(), &samples(), "", "");
    let stderr = run_ok(&config);
    assert_eq!(stderr.lines().last(), run().stderr.lines().last());
    assert_eq!(alerts(dir.path()), run().alerts);
}

#[test]
fn the_dynamodb_store_gives_the_same_alerts_when_every_read_goes_to_the_table() {
    let dir = tempfile::tempdir().unwrap();
    // A flush after every event and an empty cache after each: every key is
    // read back from DynamoDB. No TTL: these 2024 events' state is past its
    // wall-clock expiry, and DynamoDB Local would delete it within seconds.
    let config =
        write_dynamodb_config(dir.path(), &samples(), "", "flush_every_events = 1\ncache_max_entries = 0\nttl = false");
    run_ok(&config);
    assert_eq!(alerts(dir.path()), run().alerts);
}

#[test]
fn stdin_to_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &samples(), "", "");
    let out = riskd_command(&["run", "--config", &config.display().to_string(), "--input", "-", "--alerts", "-"])
        .stdin(std::fs::File::open(samples()).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let ids: Vec<&Value> = lines.iter().map(|a| &a["alert_id"]).collect();
    let expected: Vec<&Value> = run().alerts.iter().map(|a| &a["alert_id"]).collect();
    assert_eq!(ids, expected);
}

#[test]
fn one_planted_attacker_raises_exactly_one_entity_risk_alert() {
    let got = of_rule("entity_risk");
    // trudy: three continent hops, 10 + 40 points each, 24 h half-life; mallory
    // (50 points) and everyone else stay under 100.
    assert_eq!(ids(&got), vec![t("user trudy@example.com 2024-03-01T10:00:00.000Z")]);
    let a = got[0];
    assert_eq!(a["severity"], "MEDIUM");
    let score = a["context"]["score"].as_f64().unwrap();
    assert!((score - 103.73).abs() < 0.01, "{score}");
    let rows = a["context"]["contributions"].as_array().unwrap();
    let rules: Vec<&str> = rows.iter().map(|r| r["rule_id"].as_str().unwrap()).collect();
    assert_eq!(
        rules,
        ["okta_impossible_travel", "okta_impossible_travel", "okta_ip_change", "okta_ip_change", "okta_ip_change"]
    );
    let sum: f64 = rows.iter().map(|r| r["decayed_points"].as_f64().unwrap()).sum();
    assert!((sum - score).abs() < 0.01, "contributions sum to the score: {sum} vs {score}");
    // The contributions are the rule alerts that came before, by id.
    let earlier: Vec<&Value> = run().alerts.iter().filter(|x| x["entity"]["id"] == "trudy@example.com").collect();
    for r in rows {
        assert!(earlier.iter().any(|x| x["alert_id"] == r["alert_id"]), "{r}");
    }
}

/// The shipped rules on generated streams give the same alerts with the
/// default `store.expiry_granule` as with none: once on a stream of a few
/// hours (every refresh of a known value within the granule), once on one
/// of six weeks (past the 30-day `first_seen` ttl, where a kept expiry
/// ends a set up to 7.2 hours early).
#[test]
fn the_expiry_granule_changes_no_alert_on_generated_streams() {
    for (events, step_ms) in [(60_000u64, 100i64), (60_000, 60_000)] {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("events.jsonl");
        let spec = riskd::generate::Spec { events, users: 500, attack_every: 300, step_ms, ..Default::default() };
        riskd::generate::write_stream(&spec, &mut std::fs::File::create(&input).unwrap()).unwrap();
        let mut outputs = Vec::new();
        for granule in ["0.01", "0"] {
            let run = dir.path().join(format!("granule-{granule}"));
            std::fs::create_dir(&run).unwrap();
            let store = format!("flush_every_events = 700\nexpiry_granule = {granule}");
            run_ok(&write_config(&run, &input, "", &store));
            outputs.push(std::fs::read(run.join("alerts.jsonl")).unwrap());
        }
        assert!(outputs[0].len() > 1000, "the stream should raise alerts");
        assert!(outputs[0] == outputs[1], "step {step_ms} ms: the granule changed the alerts");
    }
}
