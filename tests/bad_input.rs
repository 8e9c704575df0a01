//! Bad input is counted, reported with where it came from, set aside and
//! skipped; a bad config is rejected whole before any event is read.

mod common;

use common::*;

#[test]
fn bad_lines_are_counted_set_aside_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let good: Vec<String> = std::fs::read_to_string(samples()).unwrap().lines().take(30).map(String::from).collect();
    let mut lines = good.clone();
    lines.insert(3, "this is not json".into());
    lines.insert(5, "[1, 2, 3]".into());
    lines.insert(7, format!(r#"{{"eventName": "GetObject", "pad": "{}"}}"#, "x".repeat(5000)));
    // Matches okta_ip_change but has no actor: the rule cannot key it.
    lines.insert(9, r#"{"eventType": "user.session.start", "published": "2024-03-01T00:00:00Z", "client": {"ipAddress": "1.2.3.4"}}"#.into());
    lines.insert(11, "".into());
    let input = dir.path().join("mixed.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let config = write_config(dir.path(), &input, "max_line_bytes = 2048", "");
    let stderr = run_ok(&config);
    assert!(
        stderr.contains("riskd: events read 34, skipped 3 (invalid 2, too large 1), incomplete 1, alerts"),
        "{stderr}"
    );
    let dead = read_lines(&dir.path().join("dead-letter.jsonl"));
    let got: Vec<(u64, &str)> =
        dead.iter().map(|d| (d["line"].as_u64().unwrap_or(0), d["reason"].as_str().unwrap_or(""))).collect();
    assert_eq!(got, vec![(4, "invalid_json"), (6, "not_object"), (8, "too_large"), (10, "incomplete")]);
    assert!(dead.iter().all(|d| d["source"] == input.display().to_string()));
    assert_eq!(dead[0]["raw"], "this is not json");
    assert_eq!(
        dead[0]["detail"],
        "not valid JSON at byte 2: a word that is not true, false or null (a string needs double quotes), near \"this is not j\""
    );
    assert!(dead[2]["raw"].as_str().map(str::len) == Some(2048), "too large: first bytes kept");
    assert!(dead[3]["detail"].as_str().unwrap_or("").contains("okta_ip_change"), "{}", dead[3]);
    // The good lines were all applied: the same alerts as the good lines alone.
    let only_good = tempfile::tempdir().unwrap();
    let good_input = only_good.path().join("good.jsonl");
    std::fs::write(&good_input, good.join("\n") + "\n").unwrap();
    run_ok(&write_config(only_good.path(), &good_input, "", ""));
    let ids = |d: &std::path::Path| alerts(d).iter().map(|a| a["alert_id"].clone()).collect::<Vec<_>>();
    assert_eq!(ids(dir.path()), ids(only_good.path()));
}

#[test]
fn bad_config_is_rejected_whole_with_every_error() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    std::fs::copy(root().join("config/rules/okta.yaml"), rules.join("a_okta.yaml")).unwrap();
    std::fs::write(
        rules.join("b_broken.yaml"),
        "id: broken_match\ntitle: t\nseverity: HIGH\nentity: { type: user, key: actor.alternateId }\nmatch: eventType ==\n---\nid: okta_ip_change\ntitle: duplicate\nseverity: LOW\nentity: { type: user, key: a }\nmatch: 'true'\n",
    )
    .unwrap();
    std::fs::write(
        rules.join("c_typo.yaml"),
        "id: typo_rule\ntitle: t\nseverity: HIGH\nentity: { type: user, key: u }\nmatch: 'true'\nstate:\n  count: { window: 1 hour, threshold: 10, on_fire: explode }\n",
    )
    .unwrap();
    let config = write_config_with_rules(dir.path(), &samples(), &rules, "", "");
    let out = riskd(&["run", "--config", &config.display().to_string()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let b = rules.join("b_broken.yaml").display().to_string();
    let c = rules.join("c_typo.yaml").display().to_string();
    for expected in [
        "invalid configuration (3 errors)".to_string(),
        format!("{b}:5: rule broken_match: match does not compile"),
        format!("{b}:7: rule okta_ip_change: duplicate rule id, first defined at"),
        format!("{c}:7: rule typo_rule: state.count.on_fire: unknown variant `explode`"),
    ] {
        assert!(stderr.contains(&expected), "missing {expected:?} in:\n{stderr}");
    }
    assert!(!dir.path().join("alerts.jsonl").exists(), "no event may be read");
    let check = riskd(&["check", "--config", &config.display().to_string()]);
    assert!(!check.status.success());
    assert_eq!(String::from_utf8_lossy(&check.stderr), stderr);
}

/// Files that cannot be opened are named once, with the cause once; a
/// config that cannot be read is not called invalid.
#[test]
fn missing_files_are_named_once_with_their_cause() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &samples(), "", "");
    let missing = dir.path().join("nope.jsonl").display().to_string();
    let out = riskd(&["run", "--config", &config.display().to_string(), "--input", &missing]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("No such file or directory").count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!("riskd: cannot open the input {missing}: No such file or directory")),
        "{stderr}"
    );

    let nope = dir.path().join("nope.toml").display().to_string();
    for command in
        [&["run", "--config", &nope][..], &["check", "--config", &nope], &["entity", "user", "x", "--config", &nope]]
    {
        let out = riskd(command);
        assert!(!out.status.success());
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            format!("riskd: cannot read the config file {nope}: No such file or directory (os error 2); name it with --config FILE\n")
        );
    }
}

#[test]
fn bad_service_config_names_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("riskd.toml");
    std::fs::write(&path, "[source]\npath = \"x\"\n\n[store]\nkind = \"embedded\"\nflush_evry = 3\n").unwrap();
    let out = riskd(&["check", "--config", &path.display().to_string()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("{}:6: unknown field `flush_evry`", path.display())), "{stderr}");
}

#[test]
fn an_overlong_entity_id_is_set_aside_not_a_store_failure() {
    // DynamoDB refuses keys over 2,048 bytes: an attacker-controlled field
    // must not be able to stop the job.
    let dir = tempfile::tempdir().unwrap();
    let mut text = std::fs::read_to_string(samples()).unwrap();
    let long = "a".repeat(3000);
    text.push_str(&format!(
        r#"{{"eventType": "user.session.start", "published": "2024-03-09T00:00:00Z", "actor": {{"alternateId": "{long}"}}, "client": {{"ipAddress": "1.2.3.4"}}}}"#
    ));
    text.push('\n');
    let input = dir.path().join("events.jsonl");
    std::fs::write(&input, text).unwrap();
    let config = write_dynamodb_config(dir.path(), &input, "", "ttl = false");
    let stderr = run_ok(&config);
    assert!(
        stderr.contains("events read 371, skipped 0 (invalid 0, too large 0), incomplete 1, alerts 18"),
        "{stderr}"
    );
    let dead = read_lines(&dir.path().join("dead-letter.jsonl"));
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0]["line"].as_u64(), dead[0]["reason"].as_str()), (Some(371), Some("incomplete")));
    assert!(dead[0]["detail"].as_str().unwrap_or("").contains("3000 bytes, over the 1024-byte limit"), "{}", dead[0]);
}

/// An Okta sign-in of `who`, at `published`, from `ip` at (`lat`, `lon`).
fn okta_login(who: &str, published: &str, ip: &str, lat: f64, lon: f64) -> String {
    serde_json::json!({
        "published": published,
        "eventType": "user.session.start",
        "actor": {"alternateId": who, "type": "User"},
        "client": {"ipAddress": ip, "geographicalContext": {"city": "X", "geolocation": {"lat": lat, "lon": lon}}}
    })
    .to_string()
}

#[test]
fn times_that_cannot_be_true_move_nothing_and_blank_ids_or_impossible_places_are_set_aside() {
    let samples_text = std::fs::read_to_string(samples()).unwrap();
    let mut lines: Vec<String> = samples_text.lines().map(String::from).collect();
    // Mallory signs in again from another address, stamped in the year 9999,
    // then from a third, stamped before the year 2000: both are applied at
    // the latest trusted time (the stream's last, 2024-04-24), which neither
    // stamp moves; the second finds the first as her previous sign-in.
    lines.push(okta_login("mallory@example.com", "9999-12-31T23:59:59Z", "198.51.100.99", 51.5, -0.12));
    lines.push(okta_login("mallory@example.com", "1971-01-01T00:00:00Z", "198.51.100.98", 51.5, -0.12));
    // No id worth keying, and a latitude that is no place.
    lines.push(okta_login("   ", "2024-03-02T00:00:00Z", "198.51.100.97", 51.5, -0.12));
    lines.push(okta_login("oscar@example.com", "2024-03-02T00:00:00Z", "198.51.100.96", 95.0, -0.12));
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let config = write_config(dir.path(), &input, "", "");
    let stderr = run_ok(&config);
    assert!(stderr.contains("riskd: events read 374, skipped 0 (invalid 0, too large 0), incomplete 2,"), "{stderr}");

    // The latest event time seen is the stream's own, not the year 9999.
    let watermark = riskd(&["state", "--config", &config.display().to_string(), "get", "riskd/watermark"]);
    let watermark = String::from_utf8_lossy(&watermark.stdout).to_string();
    assert!(watermark.contains("1713916800000"), "the watermark stays at 2024-04-24: {watermark}");

    let alerts = alerts(dir.path());
    let stamped: Vec<&serde_json::Value> = alerts
        .iter()
        .filter(|a| a["event"]["client"]["ipAddress"].as_str().is_some_and(|ip| ip.starts_with("198.51.100.9")))
        .collect();
    assert_eq!(stamped.len(), 1, "the sign-in from a third address alerts: {stamped:?}");
    let a = stamped[0];
    assert_eq!(a["event_time_source"], "latest_trusted", "{a}");
    assert_eq!(a["event_time"], "2024-04-24T00:00:00.000Z", "{a}");
    assert_eq!(a["context"]["previous"]["ip"], "198.51.100.99", "{a}");
    assert_eq!(a["context"]["previous"]["time"], "2024-04-24T00:00:00.000Z", "{a}");
    assert!(alerts.iter().filter(|a| !stamped.contains(a)).all(|a| a["event_time_source"] == "event"));

    let dead = read_lines(&dir.path().join("dead-letter.jsonl"));
    let details: Vec<&str> = dead.iter().map(|d| d["detail"].as_str().unwrap_or("")).collect();
    assert_eq!(dead.len(), 2, "{details:?}");
    assert!(details[0].contains("entity key field actor.alternateId is absent"), "{details:?}");
    assert!(details[1].contains("is not a number in [-90, 90]"), "{details:?}");
}
