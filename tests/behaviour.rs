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
