//! Sigma correlation rules as riskd state, on event time: checked against
//! rsigma's correlation engine on generated streams (windows, group-by,
//! counts, distinct values, temporal and ordered sequences), and by hand
//! for what riskd decides on its own: an event without a group-by field is
//! skipped by the correlation, a referenced rule alerts only when a
//! correlation says `generate: true`, a run stopped half way resumes from
//! its state, and what cannot be expressed is listed by `riskd check`.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::Path;

/// Three CloudTrail detections and correlations of every supported type over them.
const RULES: &str = r#"
title: Console login
id: 00000000-0000-4000-8000-00000000000a
name: console_login
logsource: {product: aws, service: cloudtrail}
detection:
  sel: {eventName: ConsoleLogin}
  condition: sel
level: low
---
title: Access key created
id: 00000000-0000-4000-8000-00000000000b
name: key_created
logsource: {product: aws, service: cloudtrail}
detection:
  sel: {eventName: CreateAccessKey}
  condition: sel
level: low
---
title: Secret read
id: 00000000-0000-4000-8000-00000000000c
name: secret_read
logsource: {product: aws, service: cloudtrail}
detection:
  sel: {eventName: GetSecretValue}
  condition: sel
level: low
---
title: Many logins
id: 00000000-0000-4000-8000-000000000001
correlation:
  type: event_count
  rules: [console_login]
  group-by: [userIdentity.arn]
  timespan: 10m
  condition: {gte: 3}
  generate: true
level: medium
---
title: Logins and keys from one address
id: 00000000-0000-4000-8000-000000000002
correlation:
  type: event_count
  rules: [console_login, 00000000-0000-4000-8000-00000000000b]
  group-by: [userIdentity.arn, sourceIPAddress]
  timespan: 15m
  condition: {gt: 2, lte: 4}
  generate: true
level: medium
---
title: Logins from many addresses
id: 00000000-0000-4000-8000-000000000003
correlation:
  type: value_count
  rules: [console_login]
  group-by: [userIdentity.arn]
  timespan: 1h
  condition: {field: sourceIPAddress, gte: 3}
  generate: true
level: high
---
title: Login, key and secret
id: 00000000-0000-4000-8000-000000000004
correlation:
  type: temporal
  rules: [console_login, key_created, secret_read]
  group-by: [userIdentity.arn]
  timespan: 20m
  condition: {gte: 3}
  generate: true
level: high
---
title: Key then secret
id: 00000000-0000-4000-8000-000000000005
correlation:
  type: temporal_ordered
  rules: [key_created, secret_read]
  group-by: [userIdentity.arn]
  timespan: 10m
  generate: true
level: high
---
title: Secrets read from one address
id: 00000000-0000-4000-8000-000000000006
correlation:
  type: event_count
  rules: [secret_read]
  group-by: [sourceIPAddress]
  timespan: 30m
  condition: {gte: 4}
  generate: true
level: medium
"#;

fn event(n: usize, secs: i64, arn: &str, ip: &str, name: &str) -> Value {
    let time = chrono::DateTime::from_timestamp(secs, 0).unwrap().format("%Y-%m-%dT%H:%M:%SZ").to_string();
    json!({
        "eventTime": time,
        "eventSource": "iam.amazonaws.com",
        "eventName": name,
        "sourceIPAddress": ip,
        "requestID": format!("r{n}"),
        "userIdentity": {"type": "IAMUser", "arn": arn},
    })
}

/// A deterministic stream: a few principals and addresses, the three
/// detections and other calls, gaps of 1 s to 5 min.
fn stream(seed: u64, count: usize) -> Vec<Value> {
    let mut x = seed;
    let mut next = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let names = ["ConsoleLogin", "CreateAccessKey", "GetSecretValue", "ListBuckets"];
    let mut secs = 1_714_550_400; // 2024-05-01T08:00:00Z
    (0..count)
        .map(|n| {
            secs += 1 + next(300) as i64;
            let arn = format!("arn:aws:iam::123456789012:user/u{}", next(4));
            let ip = format!("198.51.100.{}", next(5));
            event(n, secs, &arn, &ip, names[next(4) as usize])
        })
        .collect()
}

fn config(dir: &Path, input: &Path, rules: &Path, sigma_extra: &str) -> std::path::PathBuf {
    let config = write_config(dir, input, "", "");
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replacen("[rules]\n", &format!("[rules]\nsigma = [{:?}]\n", rules.display().to_string()), 1);
    std::fs::write(&config, format!("{text}\n[sigma]\ndedup = \"1ms\"\n{sigma_extra}")).unwrap();
    config
}

/// (correlation's Sigma id, requestID of the event that fired it) of riskd's alerts.
fn riskd_firings(alerts: &[Value]) -> BTreeSet<(String, String)> {
    alerts
        .iter()
        .filter(|a| a["context"]["correlation"].is_object())
        .map(|a| {
            let id = a["context"]["sigma"]["id"].as_str().unwrap().to_string();
            (id, a["event"]["requestID"].as_str().unwrap().to_string())
        })
        .collect()
}

fn rsigma_firings(events: &[Value]) -> BTreeSet<(String, String)> {
    let collection = rsigma_parser::parse_sigma_yaml(RULES).unwrap();
    let config =
        rsigma_eval::CorrelationConfig { action_on_match: rsigma_eval::CorrelationAction::Reset, ..Default::default() };
    let mut engine = rsigma_eval::CorrelationEngine::new(config);
    engine.add_collection(&collection).unwrap();
    let mut out = BTreeSet::new();
    for e in events {
        let secs = chrono::DateTime::parse_from_rfc3339(e["eventTime"].as_str().unwrap()).unwrap().timestamp();
        for r in engine.process_event_at(&rsigma_eval::JsonEvent::borrow(e), secs) {
            if r.is_correlation() {
                out.insert((r.header.rule_id.clone().unwrap(), e["requestID"].as_str().unwrap().to_string()));
            }
        }
    }
    out
}

#[test]
fn correlations_fire_where_the_rsigma_engine_does() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("correlations.yml");
    std::fs::write(&rules, RULES).unwrap();
    let mut total = 0;
    let mut types = BTreeSet::new();
    for seed in [7, 1234, 99_991] {
        let events = stream(seed, 1500);
        let run = dir.path().join(format!("run-{seed}"));
        std::fs::create_dir_all(&run).unwrap();
        let input = run.join("events.jsonl");
        let lines: Vec<String> = events.iter().map(Value::to_string).collect();
        std::fs::write(&input, lines.join("\n") + "\n").unwrap();
        run_ok(&config(&run, &input, &rules, ""));
        let ours = riskd_firings(&alerts(&run));
        let theirs = rsigma_firings(&events);
        let only_ours: Vec<_> = ours.difference(&theirs).take(10).collect();
        let only_theirs: Vec<_> = theirs.difference(&ours).take(10).collect();
        assert!(
            only_ours.is_empty() && only_theirs.is_empty(),
            "seed {seed}: riskd only {only_ours:?}, rsigma only {only_theirs:?}"
        );
        total += ours.len();
        types.extend(ours.iter().map(|(id, _)| id.clone()));
    }
    // Not vacuous: every correlation fired, many times in all.
    assert_eq!(types.len(), 6, "{types:?}");
    assert!(total > 100, "{total}");
}

fn login(n: usize, secs: i64, arn: Option<&str>, ip: &str) -> Value {
    let mut e = event(n, secs, arn.unwrap_or(""), ip, "ConsoleLogin");
    if arn.is_none() {
        e["userIdentity"].as_object_mut().unwrap().remove("arn");
    }
    e
}

fn run_lines(dir: &Path, name: &str, events: &[Value], extra: &str) -> (Vec<Value>, std::path::PathBuf) {
    let rules = dir.join("correlations.yml");
    if !rules.exists() {
        std::fs::write(&rules, RULES).unwrap();
    }
    let input = dir.join(name);
    let lines: Vec<String> = events.iter().map(Value::to_string).collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let config = config(dir, &input, &rules, extra);
    run_ok(&config);
    (alerts(dir), config)
}

/// An event without a group-by field is not counted under an empty group:
/// the correlation skips it (and says so in replay's problems).
#[test]
fn an_event_without_a_group_by_field_is_skipped_not_grouped_under_an_empty_key() {
    let dir = tempfile::tempdir().unwrap();
    let t = 1_714_550_400;
    let events = [
        login(0, t, None, "198.51.100.1"),
        login(1, t + 60, None, "198.51.100.1"),
        login(2, t + 120, Some("arn:aws:iam::1:user/a"), "198.51.100.1"),
        login(3, t + 180, Some("arn:aws:iam::1:user/a"), "198.51.100.1"),
    ];
    let (alerts, _) = run_lines(dir.path(), "events.jsonl", &events, "");
    let fired = riskd_firings(&alerts);
    assert!(!fired.iter().any(|(id, _)| id.ends_with("000000000001")), "{fired:?}");
    // A third login of the principal does fire, grouped under its arn.
    let mut more = events.to_vec();
    more.push(login(4, t + 240, Some("arn:aws:iam::1:user/a"), "198.51.100.1"));
    let dir = tempfile::tempdir().unwrap();
    let (alerts, _) = run_lines(dir.path(), "events.jsonl", &more, "");
    let many: Vec<&Value> =
        alerts.iter().filter(|a| a["context"]["sigma"]["id"] == "00000000-0000-4000-8000-000000000001").collect();
    assert_eq!(many.len(), 1, "{alerts:#?}");
    let a = many[0];
    assert_eq!(a["entity"], json!({"type": "principal", "id": "arn:aws:iam::1:user/a"}));
    assert_eq!(a["event"]["requestID"], "r4");
    assert_eq!(a["context"]["count"], 3);
    assert_eq!(a["context"]["correlation"]["type"], "event_count");
    assert_eq!(a["context"]["sigma"]["level"], "medium");
}

/// A correlation grouped by the address scores the address (entity ip); one
/// grouped by principal and address scores the principal, its state kept
/// per address.
#[test]
fn the_entity_of_a_correlation_is_its_first_group_by_field_with_an_entity_type() {
    let dir = tempfile::tempdir().unwrap();
    let t = 1_714_550_400;
    let arn = "arn:aws:iam::1:user/a";
    let mut events = Vec::new();
    for i in 0..4 {
        events.push(event(i, t + 60 * i as i64, arn, "203.0.113.9", "GetSecretValue"));
    }
    // Logins and a key from two addresses: 2 + 1 from .1 (fires at 3), 2 from .2 (does not).
    for (i, ip) in ["198.51.100.1", "198.51.100.2", "198.51.100.1", "198.51.100.2"].iter().enumerate() {
        events.push(login(10 + i, t + 600 + 60 * i as i64, Some(arn), ip));
    }
    events.push(event(20, t + 900, arn, "198.51.100.1", "CreateAccessKey"));
    let (alerts, _) = run_lines(dir.path(), "events.jsonl", &events, "");
    let by_ip: Vec<&Value> =
        alerts.iter().filter(|a| a["context"]["sigma"]["id"] == "00000000-0000-4000-8000-000000000006").collect();
    assert_eq!(by_ip.len(), 1, "{alerts:#?}");
    assert_eq!(by_ip[0]["entity"], json!({"type": "ip", "id": "203.0.113.9"}));
    let pair: Vec<&Value> =
        alerts.iter().filter(|a| a["context"]["sigma"]["id"] == "00000000-0000-4000-8000-000000000002").collect();
    assert_eq!(pair.len(), 1, "{alerts:#?}");
    assert_eq!(pair[0]["entity"], json!({"type": "principal", "id": arn}));
    assert_eq!(pair[0]["event"]["requestID"], "r20");
}

/// Sigma's `generate`: a rule referenced only by correlations without
/// `generate: true` does not alert on its own; its correlation still does.
#[test]
fn a_referenced_rule_alerts_on_its_own_only_with_generate() {
    let dir = tempfile::tempdir().unwrap();
    let rules = RULES.replace("  generate: true\n", "");
    std::fs::write(dir.path().join("correlations.yml"), rules).unwrap();
    let t = 1_714_550_400;
    let arn = "arn:aws:iam::1:user/a";
    let events: Vec<Value> = (0..3).map(|i| login(i, t + 60 * i as i64, Some(arn), "198.51.100.1")).collect();
    let (alerts, config) = run_lines(dir.path(), "events.jsonl", &events, "");
    let own = |alerts: &[Value]| {
        let detection = |a: &&Value| !a["context"]["correlation"].is_object();
        alerts.iter().filter(|a| a["rule_id"].as_str().unwrap().starts_with("sigma_")).filter(detection).count()
    };
    let correlated = |alerts: &[Value]| alerts.iter().filter(|a| a["context"]["correlation"].is_object()).count();
    assert_eq!((own(&alerts), correlated(&alerts)), (0, 2), "{alerts:#?}");
    // With generate: true, each login alerts on its own too.
    let with = tempfile::tempdir().unwrap();
    let (alerts_with, _) = run_lines(with.path(), "events.jsonl", &events, "");
    assert_eq!((own(&alerts_with), correlated(&alerts_with)), (3, 2), "{alerts_with:#?}");
    let check = riskd(&["check", "--config", &config.display().to_string()]);
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(out.contains("correlation/event_count 3"), "{out}");
    assert!(out.contains("correlation/temporal_ordered 1"), "{out}");
}

/// A run stopped half way and resumed on the same state fires exactly what
/// one run over the whole stream does.
#[test]
fn a_correlation_resumes_from_its_state_after_a_stop() {
    let events = stream(42, 600);
    let whole = tempfile::tempdir().unwrap();
    let (all, _) = run_lines(whole.path(), "events.jsonl", &events, "");
    let split = tempfile::tempdir().unwrap();
    let (first, _) = run_lines(split.path(), "first.jsonl", &events[..300], "");
    assert!(!first.is_empty());
    let (both, _) = run_lines(split.path(), "second.jsonl", &events[300..], "");
    let key = |a: &Value| (a["rule_id"].as_str().unwrap().to_string(), a["alert_id"].as_str().unwrap().to_string());
    let all: BTreeSet<_> = all.iter().filter(|a| a["rule_id"] != "entity_risk").map(key).collect();
    let both: BTreeSet<_> = both.iter().filter(|a| a["rule_id"] != "entity_risk").map(key).collect();
    assert!(all.iter().any(|(r, _)| r.contains("_correlation")));
    assert_eq!(all, both);
}

/// A run SIGKILLed mid-stream and restarted writes exactly the alerts and
/// keeps exactly the state of one uninterrupted run: correlation windows
/// are state like any other, committed with the input's position.
#[test]
fn a_correlation_resumes_after_sigkill_as_if_never_stopped() {
    let work = tempfile::tempdir().unwrap();
    // Only the correlations alert (a detection alerting on every hit would
    // make the run about scoring), one per group and hour.
    std::fs::write(work.path().join("correlations.yml"), RULES.replace("  generate: true\n", "")).unwrap();
    let input = work.path().join("events.jsonl");
    let lines: Vec<String> = stream(2024, 20_000).iter().map(Value::to_string).collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let setup = |name: &str| {
        let dir = work.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        let cfg = config(&dir, &input, &work.path().join("correlations.yml"), "");
        let text = std::fs::read_to_string(&cfg).unwrap();
        let text = text.replacen("[store]\n", "[store]\nflush_every_events = 700\n", 1).replace("\"1ms\"", "\"1h\"");
        std::fs::write(&cfg, text).unwrap();
        (dir, cfg)
    };
    let (reference, ref_config) = setup("reference");
    run_ok(&ref_config);
    let ref_alerts = std::fs::read(reference.join("alerts.jsonl")).unwrap();
    let correlated = alerts(&reference).iter().filter(|a| a["context"]["correlation"].is_object()).count();
    assert!(correlated > 1000, "{correlated} correlation alerts");

    let (killed, config) = setup("killed");
    let mut child = riskd_command(&["run", "--config", &config.display().to_string()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let len = std::fs::metadata(killed.join("alerts.jsonl")).map(|m| m.len()).unwrap_or(0);
        if len as usize > ref_alerts.len() / 3 {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "riskd finished before it could be killed: make the input larger");
        assert!(std::time::Instant::now() < deadline, "riskd made no progress");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert!(child.try_wait().unwrap().is_none(), "riskd finished before it could be killed: make the input larger");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let stderr = run_ok(&config);
    assert!(stderr.contains("resumed after line "), "{stderr}");
    assert!(
        std::fs::read(killed.join("alerts.jsonl")).unwrap() == ref_alerts,
        "alerts differ from the uninterrupted run"
    );
    assert_eq!(export_state(&config), export_state(&ref_config), "state differs from the uninterrupted run");
}

/// What riskd cannot express is skipped and listed with file, line and why.
#[test]
fn unsupported_correlations_are_listed_with_file_line_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let extra = r#"---
title: Sum of bytes
id: 00000000-0000-4000-8000-0000000000f1
correlation:
  type: value_sum
  rules: [console_login]
  group-by: [userIdentity.arn]
  timespan: 1h
  condition: {field: bytes, gte: 1000}
---
title: Global count
id: 00000000-0000-4000-8000-0000000000f2
correlation:
  type: event_count
  rules: [console_login]
  timespan: 1h
  condition: {gte: 1000}
---
title: Unknown rule
id: 00000000-0000-4000-8000-0000000000f3
correlation:
  type: event_count
  rules: [no_such_rule]
  group-by: [userIdentity.arn]
  timespan: 1h
  condition: {gte: 2}
---
title: Grouped by what
id: 00000000-0000-4000-8000-0000000000f4
correlation:
  type: event_count
  rules: [console_login]
  group-by: [userAgent]
  timespan: 1h
  condition: {gte: 2}
"#;
    std::fs::write(dir.path().join("correlations.yml"), format!("{RULES}{extra}")).unwrap();
    let input = dir.path().join("events.jsonl");
    std::fs::write(&input, "").unwrap();
    let config = config(dir.path(), &input, &dir.path().join("correlations.yml"), "");
    let check = riskd(&["check", "--config", &config.display().to_string()]);
    let out = String::from_utf8_lossy(&check.stdout).into_owned();
    assert!(check.status.success(), "{out}");
    for (id, why) in [
        ("f1", "value_sum correlations are not supported"),
        ("f2", "without group-by"),
        ("f3", "references rule \"no_such_rule\", which is not loaded"),
        ("f4", "no entity among the group-by fields [\"userAgent\"]"),
    ] {
        let line =
            out.lines().find(|l| l.contains(&format!("0000000000{id}"))).unwrap_or_else(|| panic!("{id}: {out}"));
        assert!(line.contains(why) && line.contains("correlations.yml:"), "{line}");
    }
    // And with an entity type named for the field, the last one loads.
    std::fs::write(&config, std::fs::read_to_string(&config).unwrap() + "[sigma.entities]\nuserAgent = \"agent\"\n")
        .unwrap();
    let check = riskd(&["check", "--config", &config.display().to_string()]);
    let out = String::from_utf8_lossy(&check.stdout).into_owned();
    assert!(!out.contains("0000000000f4"), "{out}");
}

/// The shipped correlations work on the vendored SigmaHQ rules they
/// reference: five failed console logins in ten minutes raise one alert,
/// the detections still alert on their own (`generate: true`), and the
/// correlation's risk is its level's.
#[test]
fn the_shipped_correlations_fire_over_the_vendored_rules() {
    let dir = tempfile::tempdir().unwrap();
    let arn = "arn:aws:iam::123456789012:user/mallory";
    let t = 1_714_550_400;
    let events: Vec<Value> = (0..5)
        .map(|i| {
            let mut e = event(i, t + 90 * i as i64, arn, "203.0.113.5", "ConsoleLogin");
            e["eventSource"] = json!("signin.amazonaws.com");
            e["errorMessage"] = json!("Failed authentication");
            e
        })
        .collect();
    let input = dir.path().join("events.jsonl");
    let lines: Vec<String> = events.iter().map(Value::to_string).collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let config = write_config(dir.path(), &input, "", "");
    let text = std::fs::read_to_string(&config).unwrap();
    let paths = [root().join("config/sigma/rules/cloud/aws"), root().join("config/sigma-correlations")];
    let paths: Vec<String> = paths.iter().map(|p| format!("{:?}", p.display().to_string())).collect();
    std::fs::write(&config, text.replacen("[rules]\n", &format!("[rules]\nsigma = [{}]\n", paths.join(", ")), 1))
        .unwrap();
    run_ok(&config);
    let alerts = alerts(dir.path());
    let fired: Vec<&Value> = alerts.iter().filter(|a| a["context"]["correlation"].is_object()).collect();
    assert_eq!(fired.len(), 1, "{alerts:#?}");
    assert_eq!(fired[0]["title"], "Repeated failed AWS console logins");
    assert_eq!(fired[0]["entity"], json!({"type": "principal", "id": arn}));
    assert_eq!(fired[0]["context"]["count"], 5);
    assert_eq!(fired[0]["event"]["requestID"], "r4");
    let failed = alerts.iter().filter(|a| a["title"] == "AWS ConsoleLogin Failed Authentication").count();
    assert_eq!(failed, 1, "one per hour by dedup: {alerts:#?}");
    // Risk by level: high.
    assert_eq!(fired[0]["risk"], 50);
}

/// `riskd test` cases target correlations like any rule: a case that fires
/// one and a case that must not (the third login comes after the window).
#[test]
fn rule_tests_take_correlations() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("correlations.yml");
    std::fs::write(&rules, RULES).unwrap();
    let input = dir.path().join("events.jsonl");
    std::fs::write(&input, "").unwrap();
    let config = config(dir.path(), &input, &rules, "");
    let login = |t: &str| {
        format!(
            "{{eventTime: \"{t}\", eventSource: signin.amazonaws.com, eventName: ConsoleLogin, sourceIPAddress: 203.0.113.5, userIdentity: {{type: IAMUser, arn: \"arn:aws:iam::1:user/t\"}}}}"
        )
    };
    let tests = dir.path().join("correlations.test.yaml");
    std::fs::write(
        &tests,
        format!(
            r#"- name: three logins in ten minutes
  events:
    - {}
    - {}
    - {}
  expect:
    alerts:
      - rule: sigma_correlations_correlation
        entity: "arn:aws:iam::1:user/t"
        fields: {{context.count: 3, context.sigma.title: "Many logins"}}
- name: the third login is eleven minutes after the first
  events:
    - {}
    - {}
    - {}
  expect:
    no_alerts: [sigma_correlations_correlation]
"#,
            login("2024-05-01T08:00:00Z"),
            login("2024-05-01T08:05:00Z"),
            login("2024-05-01T08:09:00Z"),
            login("2024-05-01T08:00:00Z"),
            login("2024-05-01T08:05:00Z"),
            login("2024-05-01T08:11:00Z"),
        ),
    )
    .unwrap();
    let out = riskd(&["test", &tests.display().to_string(), "--config", &config.display().to_string()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("2 passed, 0 failed"), "{text}");
}
