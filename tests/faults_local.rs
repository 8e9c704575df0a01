//! Local faults slow riskd down; they never drop or double-apply an event.
//! Each test follows a stream, breaks a local resource for a while (a file
//! system that fills up, a file made immutable, a file system frozen, a
//! SIGTERM mid-flush), and checks that riskd rides it out — not ready with
//! the reason meanwhile, the fault counted as retried, no event taken —
//! and ends with exactly the alerts, dead letters and state of an
//! undisturbed run of the same input. They mount file systems: run as root.
//!
//! - the alerts file's tmpfs full for a while;
//! - the embedded store's tmpfs full for a while (redb must be reopened);
//! - the dead-letter file immutable (`EPERM`) for a while on ext4, and at
//!   start (and a folder in its place at start): a clean stop, then a
//!   correct resume;
//! - SIGTERM while a flush retries a full store: a clean stop, then a
//!   restart ends where one run would;
//! - SIGTERM while a flush is stuck on a frozen file system: the flush
//!   finishes once it thaws, exit 0;
//! - alerts to standard output whose reader has gone (`EPIPE`): permanent,
//!   a clean stop saying so.

mod common;

use common::faults::*;
use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long each fault lasts once riskd has reported it.
const HOLD: Duration = Duration::from_secs(3);

/// The alerts, dead letters (without their `source`, which names the
/// input's path) and state of a run.
#[derive(Debug, PartialEq)]
struct Outcome {
    alerts: String,
    dead_letters: Vec<serde_json::Value>,
    state: String,
}

impl Outcome {
    fn of(config: &Path, alerts: &Path, dead_letters: &Path) -> Self {
        let mut dead_letters = read_lines(dead_letters);
        for d in &mut dead_letters {
            d.as_object_mut().unwrap().remove("source");
        }
        Outcome { alerts: std::fs::read_to_string(alerts).unwrap(), dead_letters, state: export_state(config) }
    }

    /// An undisturbed run over `lines`, in `work/reference`.
    fn undisturbed(work: &Path, lines: &[String]) -> Self {
        let dir = work.join("reference");
        std::fs::create_dir(&dir).unwrap();
        let input = dir.join("events.jsonl");
        append_lines(&input, lines);
        let config = write_config(&dir, &input, "", "");
        run_ok(&config);
        let outcome = Outcome::of(&config, &dir.join("alerts.jsonl"), &dir.join("dead-letter.jsonl"));
        assert!(outcome.alerts.lines().count() > 20 && outcome.dead_letters.len() > 20, "too few alerts to compare");
        outcome
    }

    fn assert_same(&self, expected: &Outcome) {
        assert!(self.alerts == expected.alerts, "alerts differ from the undisturbed run");
        assert!(self.dead_letters == expected.dead_letters, "dead letters differ from the undisturbed run");
        assert!(self.state == expected.state, "state differs from the undisturbed run");
    }
}

/// A test's input and a run folder (`work/run`) with its config; the
/// input is written by the test, a part at a time.
struct Setup {
    work: tempfile::TempDir,
    lines: Vec<String>,
    dir: PathBuf,
    input: PathBuf,
    config: PathBuf,
}

impl Setup {
    fn new(events: u64, users: u32) -> Self {
        let work = tempfile::tempdir().unwrap();
        let lines = event_lines(events, users, 25);
        let dir = work.path().join("run");
        std::fs::create_dir(&dir).unwrap();
        let input = dir.join("events.jsonl");
        let config = write_config(&dir, &input, "", "");
        Setup { work, lines, dir, input, config }
    }

    /// The input's lines from `a` to `b` (fractions of the whole).
    fn part(&self, a: f64, b: f64) -> &[String] {
        let at = |f: f64| (self.lines.len() as f64 * f) as usize;
        &self.lines[at(a)..at(b)]
    }

    fn append(&self, a: f64, b: f64) {
        append_lines(&self.input, self.part(a, b));
    }

    fn outcome(&self, alerts: &str, dead_letters: &str) -> Outcome {
        Outcome::of(&self.config, &self.dir.join(alerts), &self.dir.join(dead_letters))
    }

    fn total(&self) -> u64 {
        self.lines.len() as u64
    }
}

/// While the fault lasts: the rest of the input arrives, riskd keeps
/// running, reports not ready and takes no event.
fn ride_out(riskd: &mut Service, setup: &Setup) {
    let taken = riskd.events();
    setup.append(0.8, 1.0);
    let until = Instant::now() + HOLD;
    while Instant::now() < until {
        assert!(riskd.running(), "riskd exited during the fault: {}", riskd.stderr());
        assert_eq!(riskd.ready(), Some(false), "ready during the fault");
        assert_eq!(riskd.events(), taken, "an event was taken during the fault");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(taken < setup.total() as f64, "the fault must hold events back");
}

/// Once the fault is cleared: riskd gets ready and takes every line; then
/// SIGTERM, exit 0, and each line counted once. Returns how long it took
/// to get ready and the lines the summary counts.
fn finish(mut riskd: Service, setup: &Setup) -> (Duration, u64) {
    let resumed = riskd.wait_ready(Duration::from_secs(60));
    riskd.wait_events(setup.lines.len(), Duration::from_secs(60));
    let counted = riskd.events();
    let (status, stderr) = riskd.stop();
    assert!(status.success(), "riskd failed: {stderr}");
    assert!(stderr.contains("failed; retrying"), "the fault is logged: {stderr}");
    let read = summary_read(&stderr);
    assert_eq!((read, counted), (setup.total(), setup.total() as f64), "each line counted once: {stderr}");
    (resumed, read)
}

#[test]
fn the_alerts_files_disk_full_for_a_while() {
    let setup = Setup::new(3000, 300);
    let expected = Outcome::undisturbed(setup.work.path(), &setup.lines);
    let out = Mount::tmpfs(&setup.dir.join("out"), "1m");
    edit_config(&setup.config, "path = \"alerts.jsonl\"", "path = \"out/alerts.jsonl\"");
    setup.append(0.0, 0.4);
    let mut riskd = Service::start(&setup.config);
    riskd.wait_events(setup.part(0.0, 0.4).len(), Duration::from_secs(60));

    let filler = out.fill();
    setup.append(0.4, 0.8);
    let reasons = riskd.wait_not_ready("output: alerts file", Duration::from_secs(30));
    assert!(reasons.contains("No space left on device"), "{reasons}");
    ride_out(&mut riskd, &setup);
    assert!(riskd.retried("output") > 0.0, "riskd_faults_total{{component=\"output\",outcome=\"retried\"}} moved");

    std::fs::remove_file(filler).unwrap();
    let (resumed, read) = finish(riskd, &setup);
    setup.outcome("out/alerts.jsonl", "dead-letter.jsonl").assert_same(&expected);
    report("alerts-disk-full", resumed, setup.total(), read);
}

#[test]
fn the_stores_disk_full_for_a_while() {
    let setup = Setup::new(4000, 3000);
    let expected = Outcome::undisturbed(setup.work.path(), &setup.lines);
    // The store's folder (`state/`) is the tmpfs.
    let state = Mount::tmpfs(&setup.dir.join("state"), "4m");
    setup.append(0.0, 0.4);
    let mut riskd = Service::start(&setup.config);
    riskd.wait_events(setup.part(0.0, 0.4).len(), Duration::from_secs(60));

    let filler = state.fill();
    setup.append(0.4, 0.8);
    let reasons = riskd.wait_not_ready("store: embedded store", Duration::from_secs(30));
    ride_out(&mut riskd, &setup);
    assert!(riskd.retried("store") > 0.0, "riskd_faults_total{{component=\"store\",outcome=\"retried\"}} moved");

    std::fs::remove_file(filler).unwrap();
    let (resumed, read) = finish(riskd, &setup);
    eprintln!("not ready while the store's disk was full: {reasons}");
    setup.outcome("alerts.jsonl", "dead-letter.jsonl").assert_same(&expected);
    report("store-disk-full", resumed, setup.total(), read);
}

#[test]
fn the_dead_letter_file_not_writable_at_start_and_for_a_while() {
    let setup = Setup::new(3000, 300);
    let expected = Outcome::undisturbed(setup.work.path(), &setup.lines);
    let dl = Mount::ext4(&setup.dir.join("dl"), 16);
    let dead = dl.dir.join("dead-letter.jsonl");
    edit_config(&setup.config, "dead_letter = \"dead-letter.jsonl\"", "dead_letter = \"dl/dead-letter.jsonl\"");
    setup.append(0.0, 0.4);
    let config = setup.config.display().to_string();

    // At start: a folder in its place, then the file immutable. A clean
    // stop naming the file, the cause and what to do, before any event.
    std::fs::create_dir(&dead).unwrap();
    let out = riskd(&["run", "--config", &config]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("cannot open the dead-letter file") && stderr.contains("the path is a folder: name a file"),
        "{stderr}"
    );
    assert!(stderr.contains("start riskd again: it resumes from its last checkpoint"), "{stderr}");
    std::fs::remove_dir(&dead).unwrap();
    std::fs::write(&dead, "").unwrap();
    chattr("+i", &dead);
    let out = riskd(&["run", "--config", &config]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("cannot open the dead-letter file") && stderr.contains("Operation not permitted"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(setup.dir.join("alerts.jsonl")).unwrap_or_default(), "", "no event read");
    chattr("-i", &dead);

    // Fixed: it starts from the beginning. Then, during the run, the file
    // is made immutable for a while.
    let mut riskd = Service::start(&setup.config);
    riskd.wait_events(setup.part(0.0, 0.4).len(), Duration::from_secs(60));
    chattr("+i", &dead);
    setup.append(0.4, 0.8);
    let reasons = riskd.wait_not_ready("output: dead-letter file", Duration::from_secs(30));
    assert!(reasons.contains("Operation not permitted"), "{reasons}");
    ride_out(&mut riskd, &setup);
    assert!(riskd.retried("output") > 0.0, "riskd_faults_total{{component=\"output\",outcome=\"retried\"}} moved");

    chattr("-i", &dead);
    let (resumed, read) = finish(riskd, &setup);
    setup.outcome("alerts.jsonl", "dl/dead-letter.jsonl").assert_same(&expected);
    report("dead-letter-not-writable", resumed, setup.total(), read);
}

fn chattr(flag: &str, path: &Path) {
    let out = std::process::Command::new("chattr").args([flag, &path.display().to_string()]).output().unwrap();
    assert!(out.status.success(), "chattr {flag}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The line a summary says a run resumed after (0: from the start).
fn resumed_after(stderr: &str) -> u64 {
    stderr.split("resumed after line ").nth(1).map_or(0, |s| s.split(')').next().unwrap().parse().unwrap())
}

/// Runs the config once more to the end of its input, not following it:
/// the lines it read and the line it resumed after.
fn rerun(config: &Path) -> (u64, u64) {
    edit_config(config, "follow = true", "follow = false");
    let stderr = run_ok(config);
    (summary_read(&stderr), resumed_after(&stderr))
}

#[test]
fn sigterm_while_a_flush_retries_a_full_store() {
    let setup = Setup::new(4000, 3000);
    let expected = Outcome::undisturbed(setup.work.path(), &setup.lines);
    let state = Mount::tmpfs(&setup.dir.join("state"), "4m");
    setup.append(0.0, 0.4);
    let mut riskd = Service::start(&setup.config);
    riskd.wait_events(setup.part(0.0, 0.4).len(), Duration::from_secs(60));
    // A checkpoint to resume from: the lines taken are committed within a
    // flush_interval (2 s) of the last; the commit may already have come
    // (counting commits from "now" raced with it under load).
    std::thread::sleep(Duration::from_millis(2500));
    riskd.wait_commits(1.0, Duration::from_secs(30));
    let filler = state.fill();
    setup.append(0.4, 1.0);
    riskd.wait_not_ready("store: embedded store", Duration::from_secs(30));
    assert!(riskd.retried("store") > 0.0, "riskd_faults_total{{component=\"store\",outcome=\"retried\"}} moved");

    // Asked to stop mid-flush: it gives the flush up at once, saying so.
    riskd.term();
    let (status, stderr) = riskd.wait_exit(Duration::from_secs(10));
    assert!(!status.success(), "a flush given up is an error: {stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("riskd: stopped on request while retrying flush (embedded store:")
            && last.ends_with("nothing was committed since the last checkpoint, and the next start resumes from it"),
        "{stderr}"
    );

    std::fs::remove_file(filler).unwrap();
    let cleared = Instant::now();
    let (read, after) = rerun(&setup.config);
    let resumed = cleared.elapsed();
    assert!(after > 0, "the restart resumes from a checkpoint");
    setup.outcome("alerts.jsonl", "dead-letter.jsonl").assert_same(&expected);
    report("sigterm-during-a-failing-flush", resumed, setup.total(), after + read);
}

#[test]
fn sigterm_while_a_flush_is_stuck_on_a_frozen_file_system() {
    let setup = Setup::new(3000, 300);
    let expected = Outcome::undisturbed(setup.work.path(), &setup.lines);
    // Outputs and store on one file system, frozen mid-run.
    let data = Mount::ext4(&setup.dir.join("data"), 32);
    edit_config(&setup.config, "dead_letter = \"dead-letter.jsonl\"", "dead_letter = \"data/dead-letter.jsonl\"");
    edit_config(&setup.config, "path = \"alerts.jsonl\"", "path = \"data/alerts.jsonl\"");
    edit_config(&setup.config, "path = \"state/riskd.redb\"", "path = \"data/riskd.redb\"");
    setup.append(0.0, 0.4);
    let mut riskd = Service::start(&setup.config);
    riskd.wait_events(setup.part(0.0, 0.4).len(), Duration::from_secs(60));

    data.freeze();
    setup.append(0.4, 1.0);
    // The next flush blocks in the kernel (the lines after it wait).
    wait_for("a flush blocked on the frozen file system", Duration::from_secs(30), || {
        riskd.running() && riskd.blocked_threads() > 0
    });
    riskd.term();
    std::thread::sleep(HOLD);
    assert!(riskd.running(), "riskd must not drop a flush in progress: {}", riskd.stderr());

    data.thaw();
    let thawed = Instant::now();
    let (status, stderr) = riskd.wait_exit(Duration::from_secs(30));
    let resumed = thawed.elapsed();
    assert!(status.success(), "riskd finishes the flush and stops: {stderr}");
    let read = summary_read(&stderr);
    let (again, after) = rerun(&setup.config);
    assert_eq!(after, read, "everything read was committed before the exit");
    setup.outcome("data/alerts.jsonl", "data/dead-letter.jsonl").assert_same(&expected);
    report("sigterm-during-a-stalled-flush", resumed, setup.total(), read + again);
}

#[test]
fn standard_output_whose_reader_has_gone_stops_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &samples(), "", "");
    let child = riskd_command(&["run", "--config", &config.display().to_string(), "--alerts", "-"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut riskd = Guard(child);
    drop(riskd.0.stdout.take());
    wait_for("riskd to stop", Duration::from_secs(30), || riskd.0.try_wait().unwrap().is_some());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut riskd.0.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!riskd.0.wait().unwrap().success());
    assert!(!stderr.contains("failed; retrying"), "EPIPE is not retried: {stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("riskd: alerts (standard output): Broken pipe")
            && last.contains("whatever read riskd's output has gone; start riskd again with a reader"),
        "{stderr}"
    );
}
