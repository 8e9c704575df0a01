//! `riskd store init`, `check` and `prune` on DynamoDB Local, and the
//! read-only commands (`riskd entity`, `riskd state export`) on a DynamoDB
//! store.

mod common;

use common::*;
use std::path::Path;

fn store(action: &str, config: &Path) -> std::process::Output {
    riskd(&["store", action, "--config", &config.display().to_string()])
}

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn init_twice_then_check_passes() {
    let dir = tempfile::tempdir().unwrap();
    let config =
        write_config_with_store(dir.path(), &samples(), &root().join("config/rules"), "", &dynamodb_store_section(""));
    let out = store("check", &config);
    assert!(!out.status.success(), "check of a missing table must fail: {}", text(&out));
    assert!(text(&out).contains("does not exist"), "{}", text(&out));

    let first = store("init", &config);
    assert!(first.status.success(), "{}", text(&first));
    assert!(text(&first).contains("created table") && text(&first).contains("enabled TTL on expiresAt"));
    let second = store("init", &config);
    assert!(second.status.success(), "{}", text(&second));
    assert!(
        text(&second).contains("exists") && text(&second).contains("TTL already on expiresAt"),
        "{}",
        text(&second)
    );
    let out = store("check", &config);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("store ok"));
}

#[test]
fn check_of_a_table_with_the_wrong_key_schema_fails_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let section = dynamodb_store_section("");
    let config = write_config_with_store(dir.path(), &samples(), &root().join("config/rules"), "", &section);
    let table = section.lines().find_map(|l| l.strip_prefix("table = ")).unwrap().trim_matches('"').to_string();
    // A table keyed by `id` (number), as someone else might have made it.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        use aws_sdk_dynamodb::types::{
            AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
        };
        let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(dynamodb_endpoint())
            .region(aws_config::Region::new("us-east-1"))
            .load()
            .await;
        aws_sdk_dynamodb::Client::new(&sdk)
            .create_table()
            .table_name(&table)
            .key_schema(KeySchemaElement::builder().attribute_name("id").key_type(KeyType::Hash).build().unwrap())
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name("id")
                    .attribute_type(ScalarAttributeType::N)
                    .build()
                    .unwrap(),
            )
            .billing_mode(BillingMode::PayPerRequest)
            .send()
            .await
            .unwrap();
    });
    let out = store("check", &config);
    assert!(!out.status.success());
    let said = text(&out);
    assert!(said.contains("key schema is [id HASH], expected [key HASH]"), "{said}");
    assert!(said.contains("TTL is DISABLED"), "{said}");
    let out = store("init", &config);
    assert!(!out.status.success(), "init must not accept a table it cannot use");
    assert!(text(&out).contains("key schema is [id HASH]"), "{}", text(&out));
}

#[test]
fn entity_and_export_read_a_dynamodb_store_as_they_read_the_embedded_one() {
    let embedded = tempfile::tempdir().unwrap();
    let embedded_config = write_config(embedded.path(), &samples(), "", "");
    run_ok(&embedded_config);
    let dynamo = tempfile::tempdir().unwrap();
    let dynamo_config = write_dynamodb_config(dynamo.path(), &samples(), "", "ttl = false");
    run_ok(&dynamo_config);

    assert_eq!(export_state(&dynamo_config), export_state(&embedded_config));
    for config in [&embedded_config, &dynamo_config] {
        let out = riskd(&["entity", "user", "trudy@example.com", "--config", &config.display().to_string(), "--json"]);
        assert!(out.status.success(), "{}", text(&out));
    }
    let explain = |config: &Path| {
        riskd(&["entity", "user", "trudy@example.com", "--config", &config.display().to_string(), "--json"]).stdout
    };
    assert_eq!(explain(&dynamo_config), explain(&embedded_config));

    // Pruning (every marker idle) deletes only markers no item names: no value changes.
    let before = export_state(&dynamo_config);
    let c = dynamo_config.display().to_string();
    let out = riskd(&["store", "prune", "--config", &c, "--idle", "0s"]);
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains("commit markers in table") && said.contains("deleted "), "{said}");
    assert_eq!(export_state(&dynamo_config), before, "pruning changes no value");
}

#[test]
fn init_on_the_embedded_store_has_nothing_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &samples(), "", "");
    let out = store("init", &config);
    assert!(out.status.success() && text(&out).contains("needs no setup"), "{}", text(&out));
    assert!(store("check", &config).status.success());
}
