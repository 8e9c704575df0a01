//! Resume without double counting: a run killed with SIGKILL and restarted
//! on the same input ends with the same state and alerts as one
//! uninterrupted run, on the embedded store and on DynamoDB.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn generate(path: &Path, events: u64) {
    let out = riskd(&["generate", "--events", &events.to_string(), "--users", "500", "--attack-every", "300"]);
    assert!(out.status.success());
    std::fs::write(path, out.stdout).unwrap();
}

/// Writes a config into a folder for an input, with extra `[store]` lines.
type WriteConfig = fn(&Path, &Path, &str, &str) -> PathBuf;

/// DynamoDB without TTL: these events are older than their state's
/// lifetime in wall-clock time, so TTL would delete state the run still reads.
fn dynamodb_no_ttl(dir: &Path, input: &Path, source_extra: &str, store_extra: &str) -> PathBuf {
    write_dynamodb_config(dir, input, source_extra, &format!("ttl = false\n{store_extra}"))
}

#[test]
fn rerun_on_the_same_state_applies_nothing_twice() {
    rerun_applies_nothing_twice(write_config);
}

#[test]
fn rerun_on_the_same_dynamodb_state_applies_nothing_twice() {
    rerun_applies_nothing_twice(dynamodb_no_ttl);
}

fn rerun_applies_nothing_twice(write_config: WriteConfig) {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &samples(), "", "");
    run_ok(&config);
    let alerts_before = std::fs::read(dir.path().join("alerts.jsonl")).unwrap();
    let state_before = export_state(&config);
    let stderr = run_ok(&config);
    assert!(stderr.contains("events read 0,"), "{stderr}");
    assert!(stderr.contains("resumed after line 370"), "{stderr}");
    assert_eq!(std::fs::read(dir.path().join("alerts.jsonl")).unwrap(), alerts_before);
    assert_eq!(export_state(&config), state_before);
}

#[test]
fn sigkill_mid_run_then_resume_equals_one_uninterrupted_run() {
    sigkill_then_resume(write_config);
}

#[test]
fn sigkill_mid_run_then_resume_equals_one_uninterrupted_run_on_dynamodb() {
    sigkill_then_resume(dynamodb_no_ttl);
}

fn sigkill_then_resume(write_config: WriteConfig) {
    let work = tempfile::tempdir().unwrap();
    let input = work.path().join("events.jsonl");
    generate(&input, 60_000);

    let reference = work.path().join("reference");
    std::fs::create_dir(&reference).unwrap();
    let ref_config = write_config(&reference, &input, "", "flush_every_events = 700");
    run_ok(&ref_config);
    let ref_alerts = std::fs::read(reference.join("alerts.jsonl")).unwrap();
    assert!(ref_alerts.len() > 10_000, "the stream should raise plenty of alerts");

    let killed = work.path().join("killed");
    std::fs::create_dir(&killed).unwrap();
    let config = write_config(&killed, &input, "", "flush_every_events = 700");
    let mut child = riskd_command(&["run", "--config", &config.display().to_string()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once it has written about a third of the alerts: mid-run,
    // with some flushes committed and some output not yet covered by one.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let len = std::fs::metadata(killed.join("alerts.jsonl")).map(|m| m.len()).unwrap_or(0);
        if len as usize > ref_alerts.len() / 3 {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "riskd finished before it could be killed: make the input larger");
        assert!(Instant::now() < deadline, "riskd made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(child.try_wait().unwrap().is_none(), "riskd finished before it could be killed: make the input larger");
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();

    let stderr = run_ok(&config);
    let resumed: u64 = stderr
        .split("resumed after line ")
        .nth(1)
        .and_then(|s| s.trim_end_matches(|c: char| !c.is_ascii_digit()).parse().ok())
        .unwrap_or_else(|| panic!("the restart did not resume: {stderr}"));
    assert!(resumed > 0 && resumed < 60_000, "resumed after line {resumed}");

    assert!(
        std::fs::read(killed.join("alerts.jsonl")).unwrap() == ref_alerts,
        "alerts differ from the uninterrupted run"
    );
    assert_eq!(export_state(&config), export_state(&ref_config), "state differs from the uninterrupted run");
}

/// A TCP proxy in front of DynamoDB Local that SIGKILLs riskd at a chosen
/// point of the protocol: after `commits` flushes have committed, when the
/// `writes`-th item write (PutItem) of the next flush arrives (it is not
/// forwarded). The flush's earlier items are in the table, its commit is
/// not: exactly the crash the DynamoDB store must survive.
struct KillingProxy {
    endpoint: String,
    state: Arc<Mutex<ProxyState>>,
}

#[derive(Default)]
struct ProxyState {
    commits: usize,
    writes: usize,
    child: Option<std::process::Child>,
    killed: bool,
}

impl KillingProxy {
    fn start(commits: usize, writes: usize) -> Self {
        let state = Arc::new(Mutex::new(ProxyState::default()));
        let shared = Arc::clone(&state);
        let endpoint = dynamodb_proxy(move |client, server| {
            forward_requests(client, server, Arc::clone(&shared), commits, writes)
        });
        Self { endpoint, state }
    }
}

fn forward_requests(
    mut client: TcpStream,
    mut server: TcpStream,
    state: Arc<Mutex<ProxyState>>,
    commits: usize,
    writes: usize,
) {
    const COMMIT: &[u8] = b"DynamoDB_20120810.TransactWriteItems";
    const WRITE: &[u8] = b"DynamoDB_20120810.PutItem";
    let mut buf = vec![0u8; 64 * 1024];
    let mut window: Vec<u8> = Vec::new();
    loop {
        let n = match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Count each target header once, even when split across reads.
        let carried = window.len();
        window.extend_from_slice(&buf[..n]);
        let ends_here = |pat: &[u8]| {
            window.windows(pat.len()).enumerate().filter(|(i, w)| *w == pat && i + pat.len() > carried).count()
        };
        let (new_commits, new_writes) = (ends_here(COMMIT), ends_here(WRITE));
        let tail = window.len().saturating_sub(COMMIT.len());
        window.drain(..tail);
        let mut s = state.lock().unwrap();
        if !s.killed {
            s.commits += new_commits;
            if s.commits >= commits {
                s.writes += new_writes;
                if s.writes >= writes {
                    if let Some(child) = s.child.as_mut() {
                        let _ = child.kill(); // SIGKILL
                        let _ = child.wait();
                    }
                    s.killed = true;
                    let _ = server.shutdown(std::net::Shutdown::Both);
                    return;
                }
            }
        }
        drop(s);
        if server.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = server.shutdown(std::net::Shutdown::Write);
}

#[test]
fn sigkill_between_a_flushs_writes_and_its_commit_on_dynamodb() {
    sigkill_between_writes_and_commit("flush_every_events = 700");
}

#[test]
fn sigkill_between_a_flushs_writes_and_its_commit_on_dynamodb_per_key_layout() {
    sigkill_between_writes_and_commit("flush_every_events = 700\nlayout = \"key\"");
}

/// Kills riskd between the items and the commit of its ninth flush (see
/// [`KillingProxy`]), then resumes; `store` is added to `[store]`.
fn sigkill_between_writes_and_commit(store: &str) {
    let work = tempfile::tempdir().unwrap();
    let input = work.path().join("events.jsonl");
    generate(&input, 20_000);

    let reference = work.path().join("reference");
    std::fs::create_dir(&reference).unwrap();
    let ref_config = dynamodb_no_ttl(&reference, &input, "", store);
    run_ok(&ref_config);
    let ref_alerts = std::fs::read(reference.join("alerts.jsonl")).unwrap();

    // The killed run talks to DynamoDB through the proxy; its table is made directly.
    let proxy = KillingProxy::start(8, 40);
    let killed = work.path().join("killed");
    std::fs::create_dir(&killed).unwrap();
    let direct = dynamodb_no_ttl(&killed, &input, "", store);
    let text = std::fs::read_to_string(&direct).unwrap().replace(&dynamodb_endpoint(), &proxy.endpoint);
    std::fs::write(&direct, text).unwrap();
    let config = direct;
    let child = riskd_command(&["run", "--config", &config.display().to_string()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    proxy.state.lock().unwrap().child = Some(child);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut s = proxy.state.lock().unwrap();
        if s.killed {
            break;
        }
        let exited = s.child.as_mut().and_then(|c| c.try_wait().unwrap());
        assert!(exited.is_none(), "riskd finished before the proxy killed it: {exited:?}");
        drop(s);
        assert!(Instant::now() < deadline, "the proxy never saw the flush to kill");
        std::thread::sleep(Duration::from_millis(5));
    }

    // The restart goes through the proxy too, which now only forwards.
    let stderr = run_ok(&config);
    assert!(stderr.contains("resumed after line "), "the restart did not resume: {stderr}");
    assert!(
        std::fs::read(killed.join("alerts.jsonl")).unwrap() == ref_alerts,
        "alerts differ from the uninterrupted run"
    );
    assert_eq!(export_state(&config), export_state(&ref_config), "state differs from the uninterrupted run");
}
