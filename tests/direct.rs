//! `consistency: direct` rules: every change is an atomic read-modify-write
//! on DynamoDB. The shipped rules in direct mode give the same alerts as in
//! the default cached mode.

mod common;

use common::*;

#[test]
fn the_shipped_rules_in_direct_mode_give_the_same_alerts() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    for name in ["aws_cloudtrail.yaml", "okta.yaml", "ueba.yaml"] {
        let text = std::fs::read_to_string(root().join("config/rules").join(name)).unwrap();
        let direct: String = text
            .lines()
            .map(|l| if l.starts_with("id: ") { format!("{l}\nconsistency: direct\n") } else { format!("{l}\n") })
            .collect();
        std::fs::write(rules.join(name), direct).unwrap();
    }
    // Direct rules need the per-key layout.
    let store = dynamodb_store_section("ttl = false\nlayout = \"key\"");
    let config = write_config_with_store(dir.path(), &samples(), &rules, "", &store);
    let c = config.display().to_string();
    assert!(riskd(&["store", "init", "--config", &c]).status.success());
    let stderr = run_ok(&config);
    assert!(stderr.contains("alerts 18, suppressed 1, risk alerts 1"), "{stderr}");

    let cached = tempfile::tempdir().unwrap();
    run_ok(&write_config(cached.path(), &samples(), "", ""));
    let ids = |d: &std::path::Path| alerts(d).iter().map(|a| a["alert_id"].clone()).collect::<Vec<_>>();
    assert_eq!(ids(dir.path()), ids(cached.path()));
    // The state a direct rule keeps is in the table at once, in Panther's layout.
    let out = riskd(&["state", "--config", &c, "get", "okta_impossible_travel/user/trudy@example.com"]);
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["dict"]["city"], "Sydney");
}
