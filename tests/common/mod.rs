//! Helpers shared by the integration tests: run the real `riskd` binary on
//! configs written into a temporary folder.
#![allow(dead_code)]

pub mod dynamodb;
pub mod faults;
pub mod follow;
pub mod kafka;
pub mod kafka_faults;
pub mod proxy;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The shipped sample stream.
pub fn samples() -> PathBuf {
    root().join("config/samples/events.jsonl")
}

/// Writes a `riskd.toml` into `dir` with the shipped rules, an embedded store
/// and alerts/dead letters in `dir`; `extra` is appended to `[source]`/`[store]`
/// as `key = value` lines via the two parameters.
pub fn write_config(dir: &Path, input: &Path, source_extra: &str, store_extra: &str) -> PathBuf {
    write_config_with_rules(dir, input, &root().join("config/rules"), source_extra, store_extra)
}

/// As [`write_config`], with another rules folder.
pub fn write_config_with_rules(
    dir: &Path,
    input: &Path,
    rules: &Path,
    source_extra: &str,
    store_extra: &str,
) -> PathBuf {
    let store = format!("kind = \"embedded\"\npath = \"state/riskd.redb\"\n{store_extra}");
    write_config_with_store(dir, input, rules, source_extra, &store)
}

/// Writes a `riskd.toml` into `dir` with the shipped rules and `store` as
/// the whole `[store]` section.
pub fn write_config_with_store(dir: &Path, input: &Path, rules: &Path, source_extra: &str, store: &str) -> PathBuf {
    let text = format!(
        r#"[source]
path = {input:?}
dead_letter = "dead-letter.jsonl"
{source_extra}

[sink]
path = "alerts.jsonl"

[store]
{store}

[rules]
paths = [{rules:?}]

[telemetry]
listen = ""
"#,
        input = input.display().to_string(),
        rules = rules.display().to_string(),
    );
    let path = dir.join("riskd.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// DynamoDB Local's address, from `scripts/test.sh`; a test that needs it
/// fails without it.
pub fn dynamodb_endpoint() -> String {
    std::env::var("RISKD_TEST_DYNAMODB_ENDPOINT").unwrap_or_else(|_| {
        panic!(
            "RISKD_TEST_DYNAMODB_ENDPOINT is not set: this test needs DynamoDB Local; \
             run ./scripts/test.sh, which installs and starts it"
        )
    })
}

/// A TCP proxy in front of DynamoDB Local, for tests that step into the
/// store's protocol: each connection gets a connection of its own to
/// DynamoDB Local, whose answers go back untouched, and `forward(client,
/// server)` on a thread of its own, which passes the requests on (or not).
/// Returns the proxy's endpoint. (`proxy::FaultProxy` cuts or delays.)
pub fn dynamodb_proxy(forward: impl Fn(TcpStream, TcpStream) + Clone + Send + 'static) -> String {
    proxy::relay(&dynamodb_endpoint(), move |client: TcpStream, server: TcpStream| {
        let (mut from_server, mut to_client) = (server.try_clone().unwrap(), client.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from_server, &mut to_client);
            let _ = to_client.shutdown(std::net::Shutdown::Both);
        });
        forward(client, server)
    })
}

/// The `[store]` lines of a DynamoDB store on a table no other test uses
/// (not created).
pub fn dynamodb_store_section(store_extra: &str) -> String {
    format!(
        "kind = \"dynamodb\"\ntable = \"riskd-test-{}\"\nregion = \"us-east-1\"\nendpoint_url = {:?}\n{store_extra}",
        uuid::Uuid::new_v4().simple(),
        dynamodb_endpoint()
    )
}

/// As [`write_config`], with a DynamoDB store on a fresh table that
/// `riskd store init` creates.
pub fn write_dynamodb_config(dir: &Path, input: &Path, source_extra: &str, store_extra: &str) -> PathBuf {
    let store = dynamodb_store_section(store_extra);
    let config = write_config_with_store(dir, input, &root().join("config/rules"), source_extra, &store);
    let out = riskd(&["store", "init", "--config", &config.display().to_string()]);
    assert!(out.status.success(), "riskd store init failed: {}", String::from_utf8_lossy(&out.stderr));
    config
}

/// `riskd ARGS…`, waited for.
pub fn riskd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_riskd")).args(args).stdin(Stdio::null()).output().expect("riskd runs")
}

/// A command for `riskd ARGS…` to spawn by hand.
pub fn riskd_command(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_riskd"));
    c.args(args);
    c
}

/// Runs `riskd run --config CONFIG`, asserts success, returns stderr.
pub fn run_ok(config: &Path) -> String {
    let out = riskd(&["run", "--config", &config.display().to_string()]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "riskd run failed: {stderr}");
    stderr
}

/// The alerts a run wrote into `dir`, parsed.
pub fn alerts(dir: &Path) -> Vec<serde_json::Value> {
    read_lines(&dir.join("alerts.jsonl"))
}

/// A JSON-lines file, parsed (missing: empty).
pub fn read_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// `riskd state export` of a config's store, as text.
pub fn export_state(config: &Path) -> String {
    let out = riskd(&["state", "--config", &config.display().to_string(), "export"]);
    assert!(out.status.success(), "export failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Kills the child when dropped, so a failing test leaves no process behind.
pub struct Guard(pub std::process::Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port free right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// `GET url` (with a bearer token if given): status and body, `None` when
/// nothing answers. Statuses of 400 and above are answers too.
pub fn http_get(url: &str, token: Option<&str>) -> Option<(u16, String)> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(5)))
        .build()
        .into();
    let mut req = agent.get(url);
    if let Some(t) = token {
        req = req.header("Authorization", &format!("Bearer {t}"));
    }
    let mut resp = req.call().ok()?;
    let status = resp.status().as_u16();
    Some((status, resp.body_mut().read_to_string().ok()?))
}

/// Polls `ok` every 100 ms until it holds; fails the test after `timeout`.
pub fn wait_for(what: &str, timeout: std::time::Duration, mut ok: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !ok() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
