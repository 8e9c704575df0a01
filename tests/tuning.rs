//! The tuning commands on the shipped config and on broken inputs:
//! `riskd test`, `riskd check`, `riskd replay`, `riskd state`.

mod common;

use common::*;
use serde_json::Value;

fn text(out: &std::process::Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn shipped_rule_tests_pass_and_a_wrong_expectation_fails_with_a_diff() {
    let config = root().join("config/riskd.toml").display().to_string();
    let out = riskd(&["test", "--config", &config]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert_eq!(stdout.lines().last(), Some("20 passed, 0 failed"), "{stdout}");
    assert!(stdout.contains("okta.test.yaml: two logins at the same instant far apart count as infinitely fast ... ok"));

    let dir = tempfile::tempdir().unwrap();
    let broken = std::fs::read_to_string(root().join("config/rules/okta.test.yaml"))
        .unwrap()
        .replace("context.previous.ip: 203.0.113.5", "context.previous.ip: 203.0.113.99")
        .replace("events_file: ../samples/events.jsonl", &format!("events_file: {}", samples().display()));
    let file = dir.path().join("okta.test.yaml");
    std::fs::write(&file, broken).unwrap();
    let out = riskd(&["test", "--config", &config, &file.display().to_string()]);
    let (stdout, _) = text(&out);
    assert!(!out.status.success());
    assert!(
        stdout.contains("field context.previous.ip\n  - expected \"203.0.113.99\"\n  + got \"203.0.113.5\""),
        "{stdout}"
    );
    assert_eq!(stdout.lines().last(), Some("5 passed, 1 failed"), "{stdout}");
}

#[test]
fn check_lists_warnings_separately_from_errors() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    std::fs::write(
        rules.join("r.yaml"),
        "id: never\ntitle: t\nseverity: LOW\nentity: {type: user, key: user.name}\nmatch: a == \"x\" && a == \"y\"\n---\nid: unseen\ntitle: t\nseverity: LOW\nentity: {type: user, key: actor.alternateId}\nmatch: eventType == \"user.session.start\" && has(client.device)\n",
    )
    .unwrap();
    let config = write_config_with_rules(dir.path(), &samples(), &rules, "", "");
    let out =
        riskd(&["check", "--config", &config.display().to_string(), "--sample", &samples().display().to_string()]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains(": ok, 2 rules\nwarnings (4):"), "{stdout}");
    for w in [
        "rule never: can never fire: its match condition can never hold",
        "rule never: field a is in none of the 370 sample events",
        "rule never: field user.name is in none of the 370 sample events",
        "rule unseen: field client.device is in none of the 370 sample events",
    ] {
        assert!(stdout.contains(w), "missing {w:?} in {stdout}");
    }
}

fn replay(args: &[&str]) -> Value {
    let config = root().join("config/riskd.toml").display().to_string();
    let input = samples().display().to_string();
    let mut all = vec!["replay", "--config", &config, "--input", &input, "--format", "json"];
    all.extend_from_slice(args);
    let out = riskd(&all);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    serde_json::from_str(&stdout).unwrap()
}

#[test]
fn replay_reports_per_rule_and_compares_settings() {
    let report = replay(&[]);
    assert_eq!((report["events"].as_u64(), report["risk_alerts"].as_u64()), (Some(370), Some(1)));
    let burst = &report["rules"][0];
    assert_eq!(burst["rule_id"], "aws_access_denied_burst");
    // alice 20 errors (one alert, one suppressed), bob 10, carol 10; dave's are other errors.
    assert_eq!(
        (burst["matches"].as_u64(), burst["alerts"].as_u64(), burst["suppressed"].as_u64()),
        (Some(40), Some(1), Some(1))
    );
    assert_eq!(
        burst["values"],
        serde_json::json!({"form": "count", "threshold": 10, "keys": 3, "p50": 9, "p90": 10, "p99": 10, "max": 10, "at_threshold": 1})
    );
    let spray = &report["rules"][2];
    assert_eq!(spray["values"]["p50"], 19);
    assert_eq!(spray["entities_matched"], 3);
    // A threshold of 9 would have alerted on bob and carol as well.
    let lower = replay(&["--set", "rules.aws_access_denied_burst.threshold=9"]);
    assert_eq!(lower["rules"][0]["alerts"], 3);
    assert_eq!(lower["rules"][0]["values"]["at_threshold"], 3);

    let out = riskd(&["replay", "--input", &samples().display().to_string(), "--set", "rules.nope.threshold=1"]);
    assert!(!out.status.success());
    assert!(text(&out).1.contains("--set rules.nope.threshold=1: no rule with this id"));
    // The configured store is never touched.
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &samples(), "", "");
    let out =
        riskd(&["replay", "--config", &config.display().to_string(), "--input", &samples().display().to_string()]);
    assert!(out.status.success());
    assert!(!dir.path().join("state").exists());
}

#[test]
fn state_get_list_delete_export_import() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &samples(), "", "");
    run_ok(&config);
    let c = config.display().to_string();
    let out = riskd(&["state", "--config", &c, "get", "okta_impossible_travel/user/trudy@example.com"]);
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["dict"]["city"], "Sydney");
    assert_eq!(got["expires_at"], "2024-03-08T10:00:00.000Z");
    assert_eq!(got["live"], false);

    let out = riskd(&["state", "--config", &c, "list", "--prefix", "riskd/risk/user/"]);
    let listed = text(&out).0;
    assert!(
        listed.lines().any(|l| l.starts_with("riskd/risk/user/trudy@example.com  dict{4 keys}  no expiry")),
        "{listed}"
    );

    let key = "okta_ip_change/user/grace@example.com";
    let out = riskd(&["state", "--config", &c, "delete", key]);
    assert!(!out.status.success(), "a write without --yes is refused");
    assert!(text(&out).1.contains("add --yes"));
    let before = export_state(&config);
    assert!(riskd(&["state", "--config", &c, "delete", key, "--yes"]).status.success());
    let after = export_state(&config);
    assert_eq!(after.lines().count() + 1, before.lines().count());
    assert!(!after.contains(key));

    // export → import into an empty store gives the same export.
    let other = tempfile::tempdir().unwrap();
    let other_config = write_config(other.path(), &samples(), "", "");
    let dump = dir.path().join("dump.jsonl");
    std::fs::write(&dump, &after).unwrap();
    let oc = other_config.display().to_string();
    let out = riskd(&["state", "--config", &oc, "import", &dump.display().to_string(), "--yes"]);
    assert!(out.status.success(), "{}", text(&out).1);
    assert_eq!(export_state(&other_config), after);
}

#[test]
fn check_warns_about_rules_keyed_by_another_entity_than_the_topics() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    for f in ["aws_cloudtrail.yaml", "okta.yaml"] {
        std::fs::copy(root().join("config/rules").join(f), rules.join(f)).unwrap();
    }
    // One rule made direct: it may be keyed by anything.
    let cloudtrail = std::fs::read_to_string(rules.join("aws_cloudtrail.yaml"))
        .unwrap()
        .replace("id: aws_console_login_spray\n", "id: aws_console_login_spray\nconsistency: direct\n");
    std::fs::write(rules.join("aws_cloudtrail.yaml"), cloudtrail).unwrap();
    let config = dir.path().join("riskd.toml");
    let kafka = |extra: &str| {
        format!(
            "[source]\nkind = \"kafka\"\n[rules]\npaths = [\"rules\"]\n[kafka]\nbootstrap_servers = \"127.0.0.1:9092\"\ntopics = [\"cloudtrail\"]\n{extra}"
        )
    };
    std::fs::write(&config, kafka("keyed_by = \"user\"\n")).unwrap();
    let out = riskd(&["check", "--config", &config.display().to_string()]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "warnings are not errors: {stdout}{stderr}");
    for (rule, warned) in [
        ("aws_access_denied_burst", true),
        ("aws_assume_role_new_source_ip", true),
        ("aws_console_login_spray", false),
        ("okta_ip_change", false),
        ("okta_impossible_travel", false),
    ] {
        let line = format!("rule {rule}: its entity");
        assert_eq!(stdout.contains(&line), warned, "{rule}: {stdout}");
    }
    assert!(stdout.contains("is not what topics cloudtrail are keyed by (entity type user)"), "{stdout}");
    // Routed topics are keyed by every rule's entity: nothing to warn about.
    std::fs::write(&config, kafka("consume = \"routed\"\n")).unwrap();
    let (stdout, _) = text(&riskd(&["check", "--config", &config.display().to_string()]));
    assert!(!stdout.contains("its entity"), "{stdout}");
    // A secret named in the properties must be set; a bad key is listed with the others.
    std::fs::write(
        &config,
        kafka(
            "keyed_by = \"team\"\nlanes = 0\n[kafka.properties]\n\"sasl.password\" = \"${RISKD_TEST_UNSET_SECRET}\"\n",
        ),
    )
    .unwrap();
    let out = riskd(&["check", "--config", &config.display().to_string()]);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success());
    for e in ["kafka.keyed_by \"team\"", "kafka.lanes must be at least 1", "RISKD_TEST_UNSET_SECRET, which is not set"]
    {
        assert!(stderr.contains(e) || stdout.contains(e), "{e}: {stdout}{stderr}");
    }
}
