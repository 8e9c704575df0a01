//! Resume without double counting: a run killed with SIGKILL and restarted
//! on the same input ends with the same state and alerts as one
//! uninterrupted run.

mod common;

use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

fn generate(path: &Path, events: u64) {
    let out = riskd(&["generate", "--events", &events.to_string(), "--users", "500", "--attack-every", "300"]);
    assert!(out.status.success());
    std::fs::write(path, out.stdout).unwrap();
}

#[test]
fn rerun_on_the_same_state_applies_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &samples(), "", "");
    run_ok(&config);
    let alerts_before = std::fs::read(dir.path().join("alerts.jsonl")).unwrap();
    let state_before = export_state(&config);
    let stderr = run_ok(&config);
    assert!(stderr.contains("events read 0,"), "{stderr}");
    assert!(stderr.contains("resumed after line 210"), "{stderr}");
    assert_eq!(std::fs::read(dir.path().join("alerts.jsonl")).unwrap(), alerts_before);
    assert_eq!(export_state(&config), state_before);
}

#[test]
fn sigkill_mid_run_then_resume_equals_one_uninterrupted_run() {
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
