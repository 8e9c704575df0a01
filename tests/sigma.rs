//! Sigma rules: the vendored SigmaHQ cloud and identity rules load (what
//! riskd cannot express is listed with why, and that list can only
//! shrink); riskd's matcher agrees with an independent engine (rsigma's) on
//! events built to match each rule and on near misses; Sigma findings carry
//! their rule in the alert and add up to an entity's risk.

mod common;

use base64::Engine as _;
use common::*;
use rsigma_parser::{Detection as Det, Modifier, SigmaRule, SigmaValue, SpecialChar, StringPart};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};

fn vendored() -> PathBuf {
    root().join("config/sigma/rules")
}

fn sigma_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            sigma_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "yml" || x == "yaml") {
            out.push(p);
        }
    }
}

fn vendored_rules() -> Vec<(PathBuf, SigmaRule)> {
    let mut files = Vec::new();
    sigma_files(&vendored(), &mut files);
    let mut rules = Vec::new();
    for f in files {
        let c = rsigma_parser::parse_sigma_yaml(&std::fs::read_to_string(&f).unwrap()).unwrap();
        rules.extend(c.rules.into_iter().map(|r| (f.clone(), r)));
    }
    rules
}

/// Every vendored rule loads, or `riskd check` lists it with its file and why.
#[test]
fn every_vendored_rule_loads_or_is_listed_as_unsupported() {
    let out = riskd(&["check", "--config", &root().join("config/riskd-sigma.toml").display().to_string()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let summary = text.lines().find(|l| l.starts_with("Sigma rules: ")).unwrap_or_else(|| panic!("{text}"));
    // The unsupported count can only go down.
    const UNSUPPORTED: usize = 0;
    let skipped: Vec<&str> = text.lines().filter(|l| l.starts_with("  skipped ")).collect();
    assert_eq!(skipped.len(), UNSUPPORTED, "{text}");
    assert!(
        // 249 vendored rules and riskd's 3 correlations over them.
        summary.starts_with(&format!("Sigma rules: {} loaded (aws/cloudtrail 57, ", 252 - UNSUPPORTED)),
        "{summary}"
    );
    assert!(summary.contains("okta/okta 21"), "{summary}");
    assert!(summary.contains("correlation/event_count 1, correlation/temporal_ordered 1"), "{summary}");
    assert!(summary.ends_with(&format!(", {UNSUPPORTED} skipped")), "{summary}");
}

/// A rule riskd cannot express is skipped, named with its file, line and
/// why; the rest load.
#[test]
fn a_rule_riskd_cannot_express_is_listed_with_file_line_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let sigma = dir.path().join("sigma");
    std::fs::create_dir(&sigma).unwrap();
    std::fs::write(
        sigma.join("expand.yml"),
        "title: Expand\nid: 11111111-1111-1111-1111-111111111111\nlogsource:\n  product: aws\n  service: cloudtrail\ndetection:\n  sel:\n    eventName|expand: '%x%'\n  condition: sel\nlevel: low\n",
    )
    .unwrap();
    std::fs::write(
        sigma.join("nowhere.yml"),
        "title: Nowhere\nlogsource:\n  product: mainframe\ndetection:\n  sel:\n    a: b\n  condition: sel\n",
    )
    .unwrap();
    std::fs::write(
        sigma.join("fine.yml"),
        "title: Fine\nlogsource:\n  product: aws\n  service: cloudtrail\ndetection:\n  sel:\n    eventName: ListBuckets\n  condition: sel\n",
    )
    .unwrap();
    let config = write_config(dir.path(), &samples(), "", "");
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replacen("[rules]\n", &format!("[rules]\nsigma = [{:?}]\n", sigma.display().to_string()), 1);
    std::fs::write(&config, text).unwrap();
    let out = riskd(&["check", "--config", &config.display().to_string()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("Sigma rules: 1 loaded (aws/cloudtrail 1), 2 skipped"), "{text}");
    let expand = sigma.join("expand.yml").display().to_string();
    assert!(
        text.contains(&format!(
            "  skipped {expand}:8: 11111111-1111-1111-1111-111111111111: the modifier Expand is not supported"
        )),
        "{text}"
    );
    let nowhere = sigma.join("nowhere.yml").display().to_string();
    assert!(
        text.contains(&format!(
            "  skipped {nowhere}:2: Nowhere: no entity for logsource \"mainframe\": map it under [[sigma.logsources]]"
        )),
        "{text}"
    );
}

// --- events built from a rule --------------------------------------------------

/// Text a string value matches under `mods` (`None`: no sure way to build one).
fn text_for(v: &SigmaValue, mods: &[Modifier]) -> Option<String> {
    let base = match v {
        SigmaValue::String(s) if mods.contains(&Modifier::Re) => s.original.clone(),
        SigmaValue::String(s) => s
            .parts
            .iter()
            .map(|p| match p {
                StringPart::Plain(t) => t.clone(),
                StringPart::Special(SpecialChar::WildcardMulti) => "Ab".to_string(),
                StringPart::Special(SpecialChar::WildcardSingle) => "x".to_string(),
            })
            .collect(),
        SigmaValue::Integer(n) => n.to_string(),
        SigmaValue::Float(n) => n.to_string(),
        SigmaValue::Bool(b) => b.to_string(),
        SigmaValue::Null => return None,
    };
    let base = if mods.contains(&Modifier::WindAsh) { base.replace('-', "/") } else { base };
    let b64 = base64::engine::general_purpose::STANDARD;
    let base = if mods.contains(&Modifier::Base64) {
        b64.encode(base.as_bytes())
    } else if mods.contains(&Modifier::Base64Offset) {
        b64.encode(format!("ab{base}"))
    } else {
        base
    };
    Some(if mods.contains(&Modifier::Contains) {
        format!("pre {base} post")
    } else if mods.contains(&Modifier::StartsWith) {
        format!("{base} post")
    } else if mods.contains(&Modifier::EndsWith) {
        format!("pre {base}")
    } else {
        base
    })
}

/// A JSON value a detection value matches under `mods`.
fn value_for(v: &SigmaValue, mods: &[Modifier]) -> Option<Value> {
    let numeric = |n: f64| -> Value {
        if mods.contains(&Modifier::Gt) {
            json!(n + 1.0)
        } else if mods.contains(&Modifier::Lt) {
            json!(n - 1.0)
        } else {
            json!(n)
        }
    };
    let strmod =
        [Modifier::Contains, Modifier::StartsWith, Modifier::EndsWith, Modifier::Base64, Modifier::Base64Offset];
    match v {
        SigmaValue::Integer(n) if !strmod.iter().any(|m| mods.contains(m)) => Some(numeric(*n as f64)),
        SigmaValue::Float(n) if !strmod.iter().any(|m| mods.contains(m)) => Some(numeric(*n)),
        SigmaValue::Bool(b) => Some(json!(b)),
        SigmaValue::Null => Some(Value::Null),
        SigmaValue::String(s) if mods.contains(&Modifier::Cidr) => {
            let net: ipnet::IpNet = s.original.parse().ok()?;
            Some(json!(net.hosts().next().unwrap_or(net.addr()).to_string()))
        }
        SigmaValue::String(s)
            if [Modifier::Gt, Modifier::Gte, Modifier::Lt, Modifier::Lte].iter().any(|m| mods.contains(m)) =>
        {
            Some(numeric(s.original.parse().ok()?))
        }
        _ => text_for(v, mods).map(Value::String),
    }
}

/// Sets `field` (a dotted path) in `event` to `v`, as nested objects.
fn set(event: &mut Map<String, Value>, field: &str, v: Value) {
    let mut parts: Vec<&str> = field.split('.').collect();
    let last = parts.pop().unwrap_or(field);
    let mut node = event;
    for p in parts {
        let next = node.entry(p.to_string()).or_insert_with(|| json!({}));
        if !next.is_object() {
            *next = json!({});
        }
        node = next.as_object_mut().unwrap();
    }
    node.insert(last.to_string(), v);
}

/// Events built to meet `det`: one per alternative and per value.
fn events_for(det: &Det, out: &mut Vec<Map<String, Value>>) {
    match det {
        Det::AllOf(items) => {
            let mut base = Map::new();
            let mut variants = Vec::new();
            for item in items {
                let mods = &item.field.modifiers;
                let name = item.field.name.clone().unwrap_or_default();
                let key = if name.is_empty() { "message".to_string() } else { name };
                if mods.contains(&Modifier::Exists) {
                    let want = !matches!(item.values.first(), Some(SigmaValue::Bool(false)));
                    if want {
                        set(&mut base, &key, json!("present"));
                    }
                    continue;
                }
                if mods.contains(&Modifier::FieldRef) {
                    if let Some(SigmaValue::String(other)) = item.values.first() {
                        set(&mut base, &other.original, json!("same"));
                        set(&mut base, &key, json!("same"));
                    }
                    continue;
                }
                if mods.contains(&Modifier::All) {
                    let all: Vec<String> = item.values.iter().filter_map(|v| text_for(v, mods)).collect();
                    set(&mut base, &key, json!(all.join(" ")));
                    continue;
                }
                let values: Vec<Value> = item.values.iter().filter_map(|v| value_for(v, mods)).collect();
                if let Some(first) = values.first() {
                    set(&mut base, &key, first.clone());
                }
                for v in values.iter().skip(1) {
                    variants.push((key.clone(), v.clone()));
                }
            }
            for (key, v) in variants {
                let mut e = base.clone();
                set(&mut e, &key, v);
                out.push(e);
            }
            out.push(base);
        }
        Det::AnyOf(ds) => ds.iter().for_each(|d| events_for(d, out)),
        Det::Keywords(values) => {
            for v in values {
                if let Some(t) = text_for(v, &[Modifier::Contains]) {
                    let mut e = Map::new();
                    e.insert("message".into(), json!(t));
                    out.push(e);
                }
            }
        }
        _ => {}
    }
}

/// Near misses of an event: each string changed, each field removed, its
/// case changed, its value in an array, a number as text.
fn near_misses(event: &Map<String, Value>) -> Vec<Value> {
    let mut out = Vec::new();
    fn leaves(prefix: &str, v: &Value, out: &mut Vec<(String, Value)>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    leaves(&if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") }, x, out);
                }
            }
            other => out.push((prefix.to_string(), other.clone())),
        }
    }
    let mut all = Vec::new();
    leaves("", &Value::Object(event.clone()), &mut all);
    for (path, v) in all {
        let mut with = |x: Value| {
            let mut e = event.clone();
            set(&mut e, &path, x);
            out.push(Value::Object(e));
        };
        match &v {
            Value::String(s) => {
                with(json!(format!("#{s}")));
                with(json!(s.to_uppercase()));
                with(json!(s.to_lowercase()));
                with(json!(format!("{s}\nsecond line")));
                with(json!([s, "other"]));
                with(json!([["nested", s]]));
            }
            Value::Number(n) => {
                with(json!(n.to_string()));
                with(json!(n.as_f64().unwrap_or(0.0) + 7.0));
            }
            Value::Bool(b) => with(json!(b.to_string())),
            _ => with(json!("x")),
        }
        // The field absent, and the dotted path as a single key.
        let mut flat = event.clone();
        let top = path.split('.').next().unwrap_or(&path).to_string();
        flat.remove(&top);
        out.push(Value::Object(flat.clone()));
        if path.contains('.') {
            flat.insert(path.clone(), v.clone());
            out.push(Value::Object(flat));
        }
    }
    out
}

/// riskd's matcher and rsigma's engine give the same verdict on every event
/// built for every vendored rule (and on its near misses, and on events
/// built for the next rules).
#[test]
fn riskd_agrees_with_the_rsigma_engine_on_every_vendored_rule() {
    let rules = vendored_rules();
    assert!(rules.len() >= 249);
    let mut built: Vec<Vec<Value>> = Vec::new();
    for (_, rule) in &rules {
        let mut events = Vec::new();
        let mut names: Vec<&String> = rule.detection.named.keys().collect();
        names.sort();
        let mut union = Map::new();
        for name in &names {
            let mut own = Vec::new();
            events_for(&rule.detection.named[*name], &mut own);
            if !name.starts_with("filter") {
                if let Some(last) = own.last() {
                    union.extend(last.clone());
                }
            }
            events.extend(own);
        }
        events.push(union);
        let mut all: Vec<Value> = Vec::new();
        for e in &events {
            all.push(Value::Object(e.clone()));
            all.extend(near_misses(e));
        }
        built.push(all);
    }
    let (mut compared, mut matched, mut rules_matched) = (0usize, 0usize, 0usize);
    let mut disagreements = Vec::new();
    let ours: Vec<riskd::rules::sigma::Detection> = rules
        .iter()
        .map(|(file, rule)| {
            riskd::rules::sigma::Detection::compile(rule).unwrap_or_else(|e| panic!("{}: {e:?}", file.display()))
        })
        .collect();
    // The prefilter index riskd puts before the rules: it may pass an event
    // a rule does not match, never hold back one it does.
    let index = riskd::rules::sigma::Index::new(ours.iter().map(|d| d.required()));
    let (mut candidates, mut held_back) = (Vec::new(), 0usize);
    for (i, (file, rule)) in rules.iter().enumerate() {
        let theirs = rsigma_eval::compile_rule(rule).unwrap_or_else(|e| panic!("{}: rsigma: {e}", file.display()));
        let mut any = false;
        let others = (1..4).map(|k| &built[(i + k) % built.len()]);
        for event in built[i].iter().chain(others.flatten()) {
            let a = ours[i].matches_value(event);
            let b = rsigma_eval::evaluate_rule(&theirs, &rsigma_eval::JsonEvent::borrow(event)).is_some();
            index.candidates(event, &mut candidates);
            compared += 1;
            matched += usize::from(b);
            held_back += usize::from(!candidates[i]);
            any |= b;
            if a != b || (b && !candidates[i]) {
                disagreements.push(format!(
                    "{}: riskd {a} (index {}), rsigma {b}: {event}",
                    file.display(),
                    candidates[i]
                ));
            }
        }
        rules_matched += usize::from(any);
    }
    // Not vacuous: most rules have a prefilter, and it holds back many events.
    let filtered = ours.iter().filter(|d| d.required().is_some()).count();
    assert!(filtered * 10 >= ours.len() * 6, "{filtered} of {} rules have a prefilter", ours.len());
    assert!(held_back * 4 >= compared, "{held_back} of {compared} held back");
    println!("{filtered} of {} rules have a prefilter; it held back {held_back} of {compared} evaluations", ours.len());
    eprintln!("{compared} verdicts compared, {matched} matches, {rules_matched} of {} rules matched", rules.len());
    assert!(disagreements.is_empty(), "{} disagreements:\n{}", disagreements.len(), disagreements.join("\n"));
    // The test is not vacuous: events built to match do, for nearly every rule.
    assert!(rules_matched * 100 >= rules.len() * 95, "{rules_matched} of {} rules ever matched", rules.len());
}

// --- alerts and risk ----------------------------------------------------------------

fn cloudtrail(arn: &str, time: &str, fields: Value) -> String {
    let mut e = json!({
        "eventVersion": "1.08",
        "eventTime": time,
        "eventSource": "s3.amazonaws.com",
        "awsRegion": "us-east-1",
        "sourceIPAddress": "198.51.100.7",
        "userIdentity": {"type": "IAMUser", "arn": arn},
    });
    for (k, v) in fields.as_object().unwrap() {
        set(e.as_object_mut().unwrap(), k, v.clone());
    }
    e.to_string()
}

/// An entity that trips several medium Sigma detections within a day raises
/// one risk alert whose contributions name them; each Sigma alert carries
/// its rule's id, level and tags.
#[test]
fn medium_sigma_findings_add_up_to_one_risk_alert() {
    let dir = tempfile::tempdir().unwrap();
    let arn = "arn:aws:iam::123456789012:user/eve";
    // Four medium-level SigmaHQ CloudTrail rules, an hour apart.
    let lines = [
        cloudtrail(
            arn,
            "2024-05-01T08:00:00Z",
            json!({"eventName": "DeleteBucket", "eventSource": "s3.amazonaws.com"}),
        ),
        cloudtrail(
            arn,
            "2024-05-01T09:00:00Z",
            json!({"eventName": "StopLogging", "eventSource": "cloudtrail.amazonaws.com"}),
        ),
        cloudtrail(
            arn,
            "2024-05-01T10:00:00Z",
            json!({"eventName": "DeleteTrail", "eventSource": "cloudtrail.amazonaws.com"}),
        ),
        cloudtrail(
            arn,
            "2024-05-01T11:00:00Z",
            json!({"eventName": "UpdateTrail", "eventSource": "cloudtrail.amazonaws.com"}),
        ),
        cloudtrail(
            arn,
            "2024-05-01T12:00:00Z",
            json!({"eventName": "PutBucketLogging", "eventSource": "s3.amazonaws.com", "requestParameters": {"BucketLoggingStatus": ""}}),
        ),
    ];
    let input = dir.path().join("events.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let config = write_config(dir.path(), &input, "", "");
    let text = std::fs::read_to_string(&config).unwrap();
    let sigma = vendored().join("cloud/aws").display().to_string();
    std::fs::write(&config, text.replacen("[rules]\n", &format!("[rules]\nsigma = [{sigma:?}]\n"), 1)).unwrap();
    run_ok(&config);
    let alerts = alerts(dir.path());
    let sigma_alerts: Vec<&Value> =
        alerts.iter().filter(|a| a["rule_id"].as_str().unwrap().starts_with("sigma_")).collect();
    assert!(sigma_alerts.len() >= 4, "{alerts:#?}");
    for a in &sigma_alerts {
        assert_eq!(a["entity"], json!({"type": "principal", "id": arn}));
        let s = &a["context"]["sigma"];
        assert!(s["id"].as_str().is_some_and(|id| id.len() == 36), "{a}");
        assert!(s["tags"].is_array() && s["logsource"] == "aws/cloudtrail", "{a}");
        assert_eq!(a["severity"].as_str().unwrap().to_lowercase(), s["level"].as_str().unwrap(), "{a}");
    }
    let risk: Vec<&Value> = alerts.iter().filter(|a| a["rule_id"] == "entity_risk").collect();
    assert_eq!(risk.len(), 1, "{alerts:#?}");
    let named: Vec<&str> = risk[0]["context"]["contributions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["rule_id"].as_str().unwrap())
        .collect();
    assert!(named.len() >= 4 && named.iter().all(|r| r.starts_with("sigma_")), "{named:?}");
}

/// A Sigma file added while riskd runs is loaded (live reload), its rule
/// fires, and its alerts are counted under its rule id.
#[test]
fn a_sigma_file_added_while_running_is_loaded_and_fires() {
    let dir = tempfile::tempdir().unwrap();
    let sigma = dir.path().join("sigma");
    std::fs::create_dir(&sigma).unwrap();
    std::fs::write(
        sigma.join("first.yml"),
        "title: First\nlogsource: {product: aws, service: cloudtrail}\ndetection:\n  sel:\n    eventName: ListBuckets\n  condition: sel\nlevel: low\n",
    )
    .unwrap();
    let input = dir.path().join("events.jsonl");
    let arn = "arn:aws:iam::1:user/r";
    std::fs::write(&input, cloudtrail(arn, "2024-05-01T08:00:00Z", json!({"eventName": "ListBuckets"})) + "\n")
        .unwrap();
    let port = free_port();
    let config = write_config(dir.path(), &input, "follow = true", "flush_interval = \"200ms\"");
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replacen("[rules]\n", &format!("[rules]\nsigma = [{:?}]\n", sigma.display().to_string()), 1);
    std::fs::write(&config, text.replace("listen = \"\"", &format!("listen = \"127.0.0.1:{port}\""))).unwrap();
    let mut child = Guard(
        riskd_command(&["run", "--config", &config.display().to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let metric = |series: &str| -> f64 {
        let (_, body) = http_get(&format!("http://127.0.0.1:{port}/metrics"), None).unwrap_or((0, String::new()));
        body.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
    };
    let first = "riskd_alerts_total{rule=\"sigma_first\",severity=\"LOW\"}";
    wait_for("sigma_first's alert", std::time::Duration::from_secs(30), || metric(first) == 1.0);
    std::fs::write(
        sigma.join("second.yml"),
        "title: Second\nlogsource: {product: aws, service: cloudtrail}\ndetection:\n  sel:\n    eventName|startswith: 'Delete'\n  condition: sel\nlevel: high\n",
    )
    .unwrap();
    wait_for("the reload", std::time::Duration::from_secs(30), || {
        metric("riskd_config_reloads_total{outcome=\"ok\"}") >= 1.0
    });
    let mut f = std::fs::OpenOptions::new().append(true).open(&input).unwrap();
    let line = cloudtrail(arn, "2024-05-01T09:00:00Z", json!({"eventName": "DeleteBucket"}));
    std::io::Write::write_all(&mut f, format!("{line}\n").as_bytes()).unwrap();
    let second = "riskd_alerts_total{rule=\"sigma_second\",severity=\"HIGH\"}";
    wait_for("sigma_second's alert", std::time::Duration::from_secs(30), || metric(second) == 1.0);
    let _ = child.0.kill();
}

/// `riskd test` cases and `riskd replay` take Sigma rules like riskd's own.
#[test]
fn rule_tests_and_replay_take_sigma_rules() {
    let dir = tempfile::tempdir().unwrap();
    let sigma = vendored().join("cloud/aws/cloudtrail/aws_enum_buckets.yml");
    let config = write_config(dir.path(), &samples(), "", "");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replacen("[rules]\n", &format!("[rules]\nsigma = [{:?}]\n", sigma.display().to_string()), 1),
    )
    .unwrap();
    let tests = dir.path().join("sigma.test.yaml");
    std::fs::write(
        &tests,
        r#"- name: listing buckets is a Sigma finding
  events:
    - {eventTime: "2024-05-01T08:00:00Z", eventSource: s3.amazonaws.com, eventName: ListBuckets, userIdentity: {type: IAMUser, arn: "arn:aws:iam::1:user/t"}}
  expect:
    alerts:
      - rule: sigma_aws_enum_buckets
        entity: "arn:aws:iam::1:user/t"
        fields: {severity: LOW, risk: 10, context.sigma.title: "Potential Bucket Enumeration on AWS"}
    total_alerts: 1
"#,
    )
    .unwrap();
    let out = riskd(&["test", &tests.display().to_string(), "--config", &config.display().to_string()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("1 passed, 0 failed"), "{text}");
    let out = riskd(&[
        "replay",
        "--config",
        &config.display().to_string(),
        "--input",
        &samples().display().to_string(),
        "--format",
        "json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report.to_string().contains("sigma_aws_enum_buckets"), "{report}");
}
