//! The behaviour forms (`baseline`, `rare`) end to end: rule files parsed
//! and validated, run by the real engine through `riskd test`, and bad
//! parameters rejected with their line. The math is pinned by the unit
//! tests in `src/rules/behaviour.rs`.

mod common;

use common::*;

const RULES: &str = r#"id: api_volume_spike
title: A principal's hourly API volume far above its own baseline
severity: MEDIUM
risk: 20
entity: {type: principal, key: userIdentity.arn}
match: has(userIdentity.arn)
state:
  baseline: {bucket: 1h, half_life: 7d, k: 3, min_value: 5, min_history: 3, ttl: 30d}
---
id: okta_rare_country
title: An Okta user logging in from a country rare for them
severity: LOW
risk: 10
entity: {type: user, key: actor.alternateId}
match: eventType == "user.session.start"
state:
  rare: {field: client.geographicalContext.country, half_life: 30d, max_share: 0.1, min_history: 5, ttl: 90d}
"#;

fn call(hour: u32, minute: u32) -> String {
    format!(
        "{{eventTime: \"2024-05-01T{hour:02}:{minute:02}:00Z\", eventName: ListBuckets, userIdentity: {{arn: \"arn:aws:iam::1:user/p\"}}}}"
    )
}

fn login(day: u32, country: &str) -> String {
    format!(
        "{{published: \"2024-05-{day:02}T08:00:00Z\", eventType: user.session.start, actor: {{alternateId: u@example.com}}, client: {{geographicalContext: {{country: {country}}}}}}}"
    )
}

#[test]
fn baseline_and_rare_rules_fire_through_the_engine() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    std::fs::write(rules.join("behaviour.yaml"), RULES).unwrap();
    // Two calls an hour for three hours, then ten in the fourth: fires once
    // (at the fifth, the first at or above min_value over mean + 3·0).
    let mut steady: Vec<String> = (0..3).flat_map(|h| [call(h, 0), call(h, 30)]).collect();
    let spike: Vec<String> = (0..10).map(|m| call(3, m)).collect();
    let quiet: Vec<String> = (0..4).map(|m| call(3, m)).collect();
    let mut tests = String::new();
    let case = |name: &str, events: &[String], expect: &str| {
        let events: Vec<String> = events.iter().map(|e| format!("    - {e}")).collect();
        format!("- name: {name}\n  events:\n{}\n  expect:\n{expect}\n", events.join("\n"))
    };
    let mut with_spike = steady.clone();
    with_spike.extend(spike);
    tests.push_str(&case(
        "ten calls in an hour after three hours of two",
        &with_spike,
        "    alerts:\n      - rule: api_volume_spike\n        entity: \"arn:aws:iam::1:user/p\"\n        fields: {context.value: 5.0, context.mean: 2.0, context.history: 3}\n    total_alerts: 1",
    ));
    steady.extend(quiet);
    tests.push_str(&case("four calls stay under min_value", &steady, "    no_alerts: [api_volume_spike]"));
    let mut logins: Vec<String> = (1..=6).map(|d| login(d, "DE")).collect();
    logins.push(login(7, "BR"));
    tests.push_str(&case(
        "six logins from DE, then one from BR",
        &logins,
        "    alerts:\n      - rule: okta_rare_country\n        entity: u@example.com\n        fields: {context.value: BR, context.share: 0.0}\n    total_alerts: 1",
    ));
    let logins: Vec<String> = (1..=4).map(|d| login(d, "DE")).chain([login(5, "BR")]).collect();
    tests.push_str(&case("too little history to call anything rare", &logins, "    no_alerts: [okta_rare_country]"));
    std::fs::write(rules.join("behaviour.test.yaml"), &tests).unwrap();

    let input = dir.path().join("events.jsonl");
    std::fs::write(&input, "").unwrap();
    let config = write_config_with_rules(dir.path(), &input, &rules, "", "");
    let out = riskd(&[
        "test",
        &rules.join("behaviour.test.yaml").display().to_string(),
        "--config",
        &config.display().to_string(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}\n{tests}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("4 passed, 0 failed"), "{text}");
}

#[test]
fn bad_behaviour_parameters_are_rejected_with_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    let bad = RULES.replace("max_share: 0.1", "max_share: 1.5").replace("bucket: 1h", "bucket: soon");
    std::fs::write(rules.join("behaviour.yaml"), bad).unwrap();
    let input = dir.path().join("events.jsonl");
    std::fs::write(&input, "").unwrap();
    let config = write_config_with_rules(dir.path(), &input, &rules, "", "");
    let out = riskd(&["check", "--config", &config.display().to_string()]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("behaviour.yaml:") && text.contains("max_share must be above 0 and at most 1"), "{text}");
    assert!(text.contains("bucket: invalid duration \"soon\""), "{text}");
}

const START_MS: i64 = 1_714_521_600_000; // 2024-05-01T00:00:00Z
const HOUR: i64 = 3_600_000;

fn time(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

fn arn(name: &str) -> String {
    format!("arn:aws:iam::123456789012:user/{name}")
}

/// Five days of events with known per-entity behaviour, in time order:
/// eight principals at steady hourly rates (±25%, two of them in office
/// hours only), each calling S3, DynamoDB and KMS 7:2:1, and six Okta users
/// logging in every four hours from their home country (`u5` from DE and FR
/// 4:1). Planted: `p3` (20 an hour) makes 200 calls in hour 96, `p5` (60 an
/// hour) 300 in hour 100, `p2` calls IAM once in hour 100, and `u1` logs in
/// from BR in hour 110. Returns the lines and the alerts the shipped
/// behaviour rules must raise, as (rule, entity).
fn behaviour_stream() -> (Vec<String>, Vec<(String, String)>) {
    let principals = [
        (0, 2, false),
        (1, 5, false),
        (2, 10, false),
        (3, 20, false),
        (4, 40, true),
        (5, 60, false),
        (6, 8, true),
        (7, 30, false),
    ];
    let mut events: Vec<(i64, String)> = Vec::new();
    let call = |t: i64, p: u32, source: &str, name: &str| {
        (
            t,
            format!(
                r#"{{"eventTime":"{}","eventSource":"{source}","eventName":"{name}","sourceIPAddress":"10.0.0.{p}","userIdentity":{{"type":"IAMUser","arn":"{}"}}}}"#,
                time(t),
                arn(&format!("p{p}"))
            ),
        )
    };
    for (p, rate, office) in principals {
        let mut i = 0u64;
        for h in 0..120i64 {
            let off = office && !(9..17).contains(&(h % 24));
            let noise = (u64::from(p) * 7919 + h as u64 * 104_729) % (rate / 2 + 1);
            let mut n = if off { 0 } else { rate + noise - rate / 4 };
            n = match (p, h) {
                (3, 96) => 200,
                (5, 100) => 300,
                _ => n,
            };
            for j in 0..n {
                let t = START_MS + h * HOUR + (j as i64) * HOUR / (n as i64 + 1);
                let (source, name) = match i % 10 {
                    0..=6 => ("s3.amazonaws.com", "GetObject"),
                    7 | 8 => ("dynamodb.amazonaws.com", "GetItem"),
                    _ => ("kms.amazonaws.com", "Decrypt"),
                };
                events.push(call(t, p, source, name));
                i += 1;
            }
        }
    }
    events.push(call(START_MS + 100 * HOUR + 30 * 60_000, 2, "iam.amazonaws.com", "CreateAccessKey"));
    let login = |t: i64, u: u32, country: &str| {
        (
            t,
            format!(
                r#"{{"published":"{}","eventType":"user.session.start","actor":{{"alternateId":"u{u}@example.com"}},"client":{{"ipAddress":"198.18.2.{u}","geographicalContext":{{"city":"Somewhere","country":"{country}"}}}}}}"#,
                time(t)
            ),
        )
    };
    for u in 0..6u32 {
        for (k, h) in (0..120i64).step_by(4).enumerate() {
            let home = if u < 3 {
                "US"
            } else if u == 5 && k % 5 == 4 {
                "FR"
            } else {
                "DE"
            };
            events.push(login(START_MS + h * HOUR + i64::from(u) * 60_000, u, home));
        }
    }
    events.push(login(START_MS + 110 * HOUR, 1, "BR"));
    events.sort_by_key(|(t, _)| *t);
    let expected = [
        ("aws_api_volume_spike", arn("p3")),
        ("aws_api_volume_spike", arn("p5")),
        ("aws_rare_service", arn("p2")),
        ("okta_rare_country", "u1@example.com".to_string()),
    ];
    (events.into_iter().map(|(_, l)| l).collect(), expected.into_iter().map(|(r, e)| (r.to_string(), e)).collect())
}

/// A folder holding the shipped behaviour rules alone.
fn behaviour_rules(dir: &std::path::Path) -> std::path::PathBuf {
    let rules = dir.join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::copy(root().join("config/rules/ueba.yaml"), rules.join("ueba.yaml")).unwrap();
    rules
}

fn raised(dir: &std::path::Path) -> Vec<(String, String)> {
    let mut got: Vec<(String, String)> = alerts(dir)
        .iter()
        .map(|a| {
            (a["rule_id"].as_str().unwrap_or("").to_string(), a["entity"]["id"].as_str().unwrap_or("").to_string())
        })
        .collect();
    got.sort();
    got
}

#[test]
fn a_generated_stream_raises_exactly_the_planted_anomalies_on_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let (lines, expected) = behaviour_stream();
    let input = dir.path().join("events.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let rules = behaviour_rules(dir.path());
    let config = write_config_with_rules(dir.path(), &input, &rules, "", "");
    run_ok(&config);
    assert_eq!(raised(dir.path()), expected, "none of the normal entities, every planted anomaly, once");
    let c = config.display().to_string();

    // The entity view says what the baseline and the rare rule hold.
    let out = riskd(&["entity", "principal", &arn("p3"), "--config", &c]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("baseline: ") && text.contains("closed buckets; fires at a volume above"), "{text}");
    assert!(text.contains("rare: top values s3.amazonaws.com 70"), "{text}");

    // The replay gives the distributions that choosing k and max_share needs.
    let out = riskd(&["replay", "--config", &c, "--input", &input.display().to_string(), "--format", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rule = |id: &str| report["rules"].as_array().unwrap().iter().find(|r| r["rule_id"] == id).unwrap().clone();
    let spike = rule("aws_api_volume_spike")["measures"].clone();
    assert_eq!(spike["measure"], "baseline z");
    assert!(spike["samples"].as_u64().unwrap() > 8 * 40, "{spike}");
    // Two planted buckets (both closed) above k = 4, none of the normal ones.
    assert_eq!(spike["past_limit"], 2, "{spike}");
    assert!(spike["percentiles"]["p99"].as_f64().unwrap() < 4.0, "{spike}");
    let service = rule("aws_rare_service")["measures"].clone();
    assert_eq!(
        (service["measure"].as_str(), service["past_limit"].as_u64()),
        (Some("rare share"), Some(1)),
        "{service}"
    );
    assert_eq!(service["percentiles"]["min"], 0.0, "{service}");
    let country = rule("okta_rare_country")["measures"].clone();
    assert_eq!(country["past_limit"], 1, "{country}");
}

#[test]
fn a_generated_stream_raises_exactly_the_planted_anomalies_on_dynamodb_local() {
    let dir = tempfile::tempdir().unwrap();
    let (lines, expected) = behaviour_stream();
    let input = dir.path().join("events.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let rules = behaviour_rules(dir.path());
    // These events are older than their state's lifetime: no TTL.
    let config = write_config_with_store(dir.path(), &input, &rules, "", &dynamodb_store_section("ttl = false"));
    let c = config.display().to_string();
    assert!(riskd(&["store", "init", "--config", &c]).status.success());
    run_ok(&config);
    assert_eq!(raised(dir.path()), expected);
    // The same alerts, ids and all, as on the embedded store.
    let embedded = tempfile::tempdir().unwrap();
    run_ok(&write_config_with_rules(embedded.path(), &input, &rules, "", ""));
    let ids = |d: &std::path::Path| alerts(d).iter().map(|a| a["alert_id"].clone()).collect::<Vec<_>>();
    assert_eq!(ids(dir.path()), ids(embedded.path()));
    let out = riskd(&["state", "--config", &c, "get", &format!("aws_api_volume_spike/principal/{}", arn("p5"))]);
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["dict"]["n"], 119, "{got}");
}

#[test]
fn sigkill_mid_stream_then_resume_gives_the_uninterrupted_runs_alerts_and_state() {
    let (lines, _) = behaviour_stream();
    let work = tempfile::tempdir().unwrap();
    // The uninterrupted run, with every shipped rule.
    let reference = work.path().join("reference");
    std::fs::create_dir(&reference).unwrap();
    let whole = work.path().join("events.jsonl");
    std::fs::write(&whole, lines.join("\n") + "\n").unwrap();
    let ref_config = write_config(&reference, &whole, "", "flush_every_events = 700");
    run_ok(&ref_config);

    // Killed after 60% of the stream (before the planted anomalies), with
    // whatever it had flushed; then the rest, to the end.
    let killed = work.path().join("killed");
    std::fs::create_dir(&killed).unwrap();
    let cut = lines.len() * 6 / 10;
    let mut run = common::follow::Following::start(
        &killed,
        &lines[..cut],
        "kind = \"embedded\"\npath = \"state/riskd.redb\"\nflush_every_events = 700",
    );
    run.riskd.0.kill().unwrap(); // SIGKILL
    run.riskd.0.wait().unwrap();
    run.append(&lines[cut..]);
    common::faults::edit_config(&run.config, "follow = true", "follow = false");
    let stderr = run_ok(&run.config);
    assert!(stderr.contains("resumed after line"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(killed.join("alerts.jsonl")).unwrap(),
        std::fs::read_to_string(reference.join("alerts.jsonl")).unwrap(),
        "alerts differ from the uninterrupted run"
    );
    assert!(raised(&killed).contains(&("aws_api_volume_spike".to_string(), arn("p5"))));
    assert_eq!(export_state(&run.config), export_state(&ref_config), "state differs from the uninterrupted run");
}
