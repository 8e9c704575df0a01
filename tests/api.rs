//! The read-only HTTP API beside `/metrics`: entities and state keys, a
//! bearer token when one is set, and a refusal to serve it beyond loopback
//! without one.

mod common;

use common::*;
use serde_json::Value;
use std::process::{Child, Stdio};

fn get(url: &str, token: Option<&str>) -> (u16, Value) {
    match http_get(url, token) {
        Some((status, body)) => (status, serde_json::from_str(&body).unwrap_or(Value::Null)),
        None => (0, Value::Null),
    }
}
use std::time::{Duration, Instant};

fn start(dir: &std::path::Path, listen: &str, token: Option<&str>) -> Child {
    let config = write_config(dir, &samples(), "follow = true", "flush_interval = \"200ms\"");
    let text = std::fs::read_to_string(&config).unwrap().replace("listen = \"\"", &format!("listen = \"{listen}\""));
    std::fs::write(&config, text).unwrap();
    let mut cmd = riskd_command(&["run", "--config", &config.display().to_string()]);
    cmd.env_remove("RISKD_API_TOKEN").stdout(Stdio::null()).stderr(Stdio::piped());
    if let Some(t) = token {
        cmd.env("RISKD_API_TOKEN", t);
    }
    cmd.spawn().unwrap()
}

#[test]
fn entities_and_state_keys_read_from_a_running_riskd() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _riskd = Guard(start(dir.path(), &format!("127.0.0.1:{port}"), None));
    let url = |path: &str| format!("http://127.0.0.1:{port}{path}");
    // State is read as of the last flush: wait until the whole sample is committed.
    let deadline = Instant::now() + Duration::from_secs(30);
    let trudy = loop {
        let (status, body) = get(&url("/v1/entities/user/trudy@example.com"), None);
        if status == 200 && body["contributions"].as_array().is_some_and(|c| c.len() == 6) {
            break body;
        }
        assert!(Instant::now() < deadline, "trudy never showed 6 contributions: {status} {body}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(trudy["armed"], false);
    assert_eq!(trudy["peak"]["score"], 143.73);
    assert_eq!(trudy["last_crossing"]["score"], 103.73);
    assert_eq!(trudy["entity"]["id"], "trudy@example.com");
    assert_eq!(trudy["rule_state"].as_array().map(Vec::len), Some(5));

    let (status, grace) = get(&url("/v1/state/okta_ip_change/user/grace@example.com"), None);
    assert_eq!(status, 200);
    assert_eq!(grace["dict"]["ip"], "203.0.113.11");
    assert_eq!(grace["expires_at"], "2024-03-08T14:00:00.000Z");
    let (status, missing) = get(&url("/v1/state/no/such/key"), None);
    assert_eq!(status, 404, "{missing}");
    let (status, nobody) = get(&url("/v1/entities/usr/trudy@example.com"), None);
    assert_eq!(status, 404, "{nobody}");
    assert!(
        nobody["error"].as_str().unwrap().contains("the rules' entity types are ip, principal, role, user"),
        "{nobody}"
    );

    // The leaderboard, from the job's index: what `riskd entities --json` prints.
    let (status, board) = get(&url("/v1/entities?top=2"), None);
    assert_eq!(status, 200, "{board}");
    assert_eq!((board["ranked"].as_u64(), board["complete"].as_bool()), (Some(9), Some(true)), "{board}");
    let listed: Vec<&str> = board["entities"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(listed, ["judy@example.com", "arn:aws:iam::123456789012:user/etl"], "{board}");
    assert_eq!(board["entities"][0]["top"][0]["rule_id"], "okta_rare_country");
    let (_, users) = get(&url("/v1/entities?type=user&min_score=1"), None);
    assert_eq!(users["entities"].as_array().map(Vec::len), Some(1), "{users}");
    let (_, none) = get(&url("/v1/entities?type=role&min_score=1"), None);
    assert_eq!(none["entities"], serde_json::json!([]), "{none}");
    for bad in ["top=0", "top=100000", "top=x", "min_score=NaN", "min_score=abc"] {
        let (status, body) = get(&url(&format!("/v1/entities?{bad}")), None);
        assert_eq!(status, 400, "{bad}: {body}");
    }
    // `riskd entities` asks the running riskd (which holds the embedded
    // store's file, so reading it would fail): the same listing at once.
    let config = dir.path().join("riskd.toml").display().to_string();
    let out = riskd(&["entities", "--config", &config, "--top", "2", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("listed by the riskd running on 127.0.0.1:{port}")));
    let cli: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cli, board, "the CLI prints what the API answers");
    let out = riskd(&["entities", "--config", &config, "--type", "user", "--min-score", "1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("1 entities listed of 9 with risk") && text.contains("judy@example.com"), "{text}");
}

#[test]
fn a_token_is_required_when_set_and_beyond_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _riskd = Guard(start(dir.path(), &format!("127.0.0.1:{port}"), Some("s3cret")));
    let url = format!("http://127.0.0.1:{port}/v1/state/riskd/watermark");
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(&url, Some("s3cret")).0 != 200 {
        assert!(Instant::now() < deadline, "the API never answered with the token");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(get(&url, None).0, 401);
    assert_eq!(get(&url, Some("wrong")).0, 401);
    // The pages too: a browser is asked for Basic credentials, the token as password.
    let page = format!("http://127.0.0.1:{port}/");
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let refused = agent.get(&page).call().unwrap();
    assert_eq!(refused.status().as_u16(), 401);
    assert_eq!(refused.headers().get("www-authenticate").and_then(|v| v.to_str().ok()), Some("Basic realm=\"riskd\""));
    let basic = |password: &str| {
        use base64::Engine as _;
        let credentials = base64::engine::general_purpose::STANDARD.encode(format!("analyst:{password}"));
        agent.get(&page).header("Authorization", &format!("Basic {credentials}")).call().unwrap().status().as_u16()
    };
    assert_eq!((basic("s3cret"), basic("wrong")), (200, 401));
    assert_eq!(http_get(&page, Some("s3cret")).map(|(s, _)| s), Some(200));

    // Beyond loopback without a token: refused before anything is bound.
    let other = tempfile::tempdir().unwrap();
    let mut child = start(other.path(), "0.0.0.0:0", None);
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    assert!(stderr.contains("is not a loopback address: set RISKD_API_TOKEN"), "{stderr}");
}

/// `riskd run --follow` on the shipped sample: once every line is applied it
/// keeps serving `/metrics` and the API, takes lines appended later, and
/// stops cleanly on SIGTERM with its summary.
#[test]
fn follow_keeps_serving_after_the_sample_ends() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    std::fs::copy(samples(), &input).unwrap();
    let port = free_port();
    let config = write_config(dir.path(), &input, "", "flush_interval = \"200ms\"");
    let text =
        std::fs::read_to_string(&config).unwrap().replace("listen = \"\"", &format!("listen = \"127.0.0.1:{port}\""));
    std::fs::write(&config, text).unwrap();
    let mut cmd = riskd_command(&["run", "--config", &config.display().to_string(), "--follow"]);
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    let mut riskd = Guard(cmd.spawn().unwrap());
    let read = || {
        let (_, body) = http_get(&format!("http://127.0.0.1:{port}/metrics"), None).unwrap_or((0, String::new()));
        body.lines()
            .filter(|l| l.starts_with("riskd_events_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    wait_for("the sample's 370 events on /metrics", Duration::from_secs(30), || read() == 370.0);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(riskd.0.try_wait().unwrap().is_none(), "riskd ended at the end of the sample");
    assert_eq!(read(), 370.0);
    wait_for("trudy on the API", Duration::from_secs(30), || {
        get(&format!("http://127.0.0.1:{port}/v1/entities/user/trudy@example.com"), None).0 == 200
    });
    // A line appended is read.
    let last = std::fs::read_to_string(samples()).unwrap().lines().last().unwrap().to_string();
    let mut f = std::fs::OpenOptions::new().append(true).open(&input).unwrap();
    std::io::Write::write_all(&mut f, format!("{last}\n").as_bytes()).unwrap();
    wait_for("the appended line", Duration::from_secs(30), || read() == 371.0);
    // SIGTERM: flushed, summary printed, exit 0.
    let pid = riskd.0.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = riskd.0.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut riskd.0.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("riskd: events read 371, skipped 0"), "{stderr}");
}
