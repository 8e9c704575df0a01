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
    // "now" is the latest event time seen in the stream (a role event 31 days in).
    assert_eq!(trudy["now"], "2024-04-01T00:00:00.000Z");
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
        ]
    );
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
