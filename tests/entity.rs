//! `riskd entity`: an entity's score, contributions and rule state, from the
//! store a run left behind.

mod common;

use common::*;
use serde_json::Value;

fn explain(config: &std::path::Path, entity_type: &str, id: &str) -> Value {
    let out = riskd(&["entity", entity_type, id, "--config", &config.display().to_string(), "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn explains_scores_contributions_and_rule_state() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &samples(), "", "");
    run_ok(&config);

    let trudy = explain(&config, "user", "trudy@example.com");
    // "now" is the latest event time seen in the stream (judy's last login, 54 days in).
    assert_eq!(trudy["now"], "2024-04-24T00:00:00.000Z");
    assert_eq!(trudy["armed"], false, "alerted, and nothing came since to re-arm it");
    assert_eq!(trudy["contributions"].as_array().map(Vec::len), Some(6));
    let sum: f64 =
        trudy["contributions"].as_array().unwrap().iter().map(|c| c["decayed_points"].as_f64().unwrap()).sum();
    assert!((sum - trudy["score"].as_f64().unwrap()).abs() < 0.01);
    let keys: Vec<&str> = trudy["rule_state"].as_array().unwrap().iter().map(|r| r["key"].as_str().unwrap()).collect();
    assert_eq!(
        keys,
        [
            "okta_ip_change/user/trudy@example.com",
            "riskd/dedup/okta_ip_change/trudy@example.com",
            "okta_impossible_travel/user/trudy@example.com",
            "riskd/dedup/okta_impossible_travel/trudy@example.com",
            "okta_rare_country/user/trudy@example.com",
        ]
    );
    // A behaviour rule's state in words too: four logins from "XX", not yet history.
    let rare = &trudy["rule_state"][4]["summary"];
    assert_eq!(
        rare.as_str().unwrap_or_default(),
        "rare: top values XX 100% (1 remembered) of a total weight 3.992 at 2024-03-01T10:00:00.000Z; a value under \
         5% of it fires; fires only once it has a total weight of 20 (has 3.992)",
        "{trudy}"
    );
    assert_eq!(trudy["rule_state"][0].get("summary"), None, "other forms have none");
    assert_eq!(trudy["rule_state"][2]["dict"]["city"], "Sydney");
    assert_eq!(trudy["rule_state"][2]["live"], false, "expired 7 days after the last login");

    // alice's second burst was suppressed by dedup: it added no risk.
    let alice = explain(&config, "principal", "arn:aws:iam::123456789012:user/alice");
    let rows = alice["contributions"].as_array().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0]["rule_id"].as_str(), rows[0]["points"].as_f64()),
        (Some("aws_access_denied_burst"), Some(20.0))
    );

    // Text output for people.
    let out = riskd(&["entity", "user", "trudy@example.com", "--config", &config.display().to_string()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("entity user trudy@example.com\nscore "), "{text}");
    assert!(text.contains("contributions (6), largest first:"), "{text}");
}

/// The planted attacker's score has decayed away a month later; what it
/// reached, when it crossed and why it is disarmed are still shown.
#[test]
fn shows_the_peak_the_last_crossing_and_why_it_is_disarmed() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &samples(), "", "");
    run_ok(&config);
    let risk_alert: Value = std::fs::read_to_string(dir.path().join("alerts.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|a| a["rule_id"] == "entity_risk")
        .unwrap();

    let trudy = explain(&config, "user", "trudy@example.com");
    assert_eq!(trudy["score"], 0.0);
    // It crossed at 10:00 with the first of two contributions at that time
    // (103.73, the risk alert's score); the second took it to 143.73.
    assert_eq!(trudy["last_crossing"]["at"], "2024-03-01T10:00:00.000Z");
    assert_eq!(trudy["last_crossing"]["score"], risk_alert["context"]["score"]);
    assert_eq!(trudy["last_crossing"]["score"], 103.73);
    assert_eq!(trudy["last_crossing"]["alert_id"], risk_alert["alert_id"]);
    assert_eq!(trudy["peak"], serde_json::json!({"at": "2024-03-01T10:00:00.000Z", "score": 143.73}));
    let why = format!(
        "disarmed since 2024-03-01T10:00:00.000Z, when the score reached 103.73 (risk alert {}); re-arms when a new \
         contribution finds the score below 50.0 (it is 0.0 now)",
        risk_alert["alert_id"].as_str().unwrap()
    );
    assert_eq!(trudy["armed_explained"], why.as_str());

    let config_arg = config.display().to_string();
    let out = riskd(&["entity", "user", "trudy@example.com", "--config", &config_arg]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\npeak   143.73 at 2024-03-01T10:00:00.000Z\n"), "{text}");
    assert!(text.contains("\nlast crossing at 2024-03-01T10:00:00.000Z: score 103.73, risk alert "), "{text}");
    assert!(text.contains(&format!("\n{why}\n")), "{text}");

    // --at: scored at another event time.
    let at = |time: &str| {
        let out = riskd(&["entity", "user", "trudy@example.com", "--config", &config_arg, "--json", "--at", time]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let at_crossing = at("2024-03-01T10:00:00Z");
    assert_eq!(
        (at_crossing["now"].as_str(), at_crossing["score"].as_f64()),
        (Some("2024-03-01T10:00:00.000Z"), Some(143.73))
    );
    let before = at("2024-03-01T09:00:00Z");
    assert_eq!(before["armed"], true);
    assert_eq!(before["last_crossing"], Value::Null);
    assert_eq!(before["contributions"].as_array().map(Vec::len), Some(4));
    assert!(before["armed_explained"]
        .as_str()
        .unwrap()
        .starts_with("armed: a score reaching 100.0 raises a risk alert"));
    let out = riskd(&["entity", "user", "trudy@example.com", "--config", &config_arg, "--at", "yesterday"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"yesterday\" is not a time"));
}

#[test]
fn an_entity_without_state_is_an_error_naming_the_types_rules_use() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &samples(), "", "");
    run_ok(&config);
    let config = config.display().to_string();
    let out = riskd(&["entity", "usr", "trudy@example.com", "--config", &config]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "riskd: no state for usr \"trudy@example.com\": no rule is keyed by entity type \"usr\"; the rules' entity \
         types are ip, principal, role, user\n"
    );
    let out = riskd(&["entity", "user", "nobody@example.com", "--config", &config]);
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "riskd: no state for user \"nobody@example.com\": no rule has kept anything for it, and it has no risk\n"
    );
    let out = riskd(&["state", "--config", &config, "get", "okta_ip_change/user/nobody@example.com"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with("riskd: no key \"okta_ip_change/user/nobody@example.com\"")
    );
}

/// `riskd entities`: the leaderboard, at the latest event time and at the attack.
#[test]
fn entities_lists_the_riskiest_first_with_their_contributions() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &samples(), "", "");
    run_ok(&config);
    let c = config.display().to_string();
    let list = |args: &[&str]| -> Value {
        let mut all = vec!["entities", "--config", &c, "--json"];
        all.extend_from_slice(args);
        let out = riskd(&all);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let ids = |v: &Value| -> Vec<String> {
        v["entities"].as_array().unwrap().iter().map(|e| format!("{} {} {}", e["type"], e["id"], e["score"])).collect()
    };
    // At the latest event time (2024-04-24) only judy's fresh risk is left.
    let now = list(&["--min-score", "1"]);
    assert_eq!(now["now"], "2024-04-24T00:00:00.000Z");
    assert_eq!(ids(&now), [r#""user" "judy@example.com" 30.0"#]);
    assert_eq!(now["ranked"], 9, "every entity with risk is ranked");
    // At the attack, trudy first: disarmed by her crossing, in the MEDIUM band.
    let attack = list(&["--at", "2024-03-01T10:00:00Z", "--top", "3"]);
    assert_eq!(
        ids(&attack),
        [
            r#""user" "trudy@example.com" 143.73"#,
            r#""user" "mallory@example.com" 43.277"#,
            r#""user" "heidi@example.com" 33.636"#
        ]
    );
    let trudy = &attack["entities"][0];
    assert_eq!((trudy["band"].as_str(), trudy["armed"].as_bool()), (Some("MEDIUM"), Some(false)));
    assert_eq!(trudy["top"].as_array().map(Vec::len), Some(3));
    assert_eq!(trudy["top"][0]["rule_id"], "okta_impossible_travel");
    assert_eq!(trudy["last_alert"], "2024-03-01T10:00:00.000Z");
    // One type; text for people.
    let ips = list(&["--at", "2024-03-01T03:00:00Z", "--type", "ip"]);
    assert_eq!(ids(&ips), [r#""ip" "203.0.113.66" 24.325"#]);
    let out = riskd(&["entities", "--config", &c, "--at", "2024-03-01T10:00:00Z", "--top", "1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("1 entities listed of 6 with risk, scored at 2024-03-01T10:00:00.000Z\n"), "{text}");
    assert!(text.contains("trudy@example.com") && text.contains("MEDIUM") && text.contains("disarmed"), "{text}");
}
