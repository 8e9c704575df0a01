//! The DynamoDB cells of the fault matrix: a fault of the store or of the
//! network to it, applied while riskd follows a stream, slows riskd down
//! and never drops or double-applies an event. Each test ends with exactly
//! the alerts and the state of an undisturbed run of the same input, riskd
//! still running (then stopped with SIGTERM, exit 0), and prints
//! `fault <name>: resumed … s after the fault cleared, events lost …,
//! applied twice …` from what it observed (`--nocapture` shows it).
//! - `frozen`: DynamoDB Local (an instance of the test's own) gets SIGSTOP
//!   for 30 s, then SIGCONT: connections still open, nothing answers.
//! - `resets`: for 20 s a proxy cuts 80 % of the connections part-way
//!   through a request or its answer (a reset or a close, at random from a
//!   fixed seed).
//! - `latency`: for 20 s a proxy holds every request 2 s.
//!
//! DynamoDB Local killed and restarted is `tests/outage.rs`; riskd killed
//! during a commit is `tests/resume.rs`.

mod common;

use common::dynamodb::{send_signal, DynamoLocal};
use common::follow::{append, Following};
use common::proxy::{Fault, FaultProxy};
use common::*;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Events in the stream; the first ones are there when riskd starts, the
/// others are appended a chunk at a time before, during and after the fault.
const EVENTS: usize = 4000;
const FIRST: usize = 500;
const CHUNK: usize = 50;
/// Events keep coming this long before the fault and after it clears.
const LEAD: Duration = Duration::from_secs(3);
const TAIL: Duration = Duration::from_secs(4);

/// The stream and what an undisturbed run of it ends with.
struct Reference {
    lines: Vec<String>,
    alert_ids: Vec<String>,
    state: String,
}

/// Computed once for all the tests, on the shared DynamoDB Local.
fn reference() -> &'static Reference {
    static REFERENCE: OnceLock<Reference> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let out = riskd(&["generate", "--events", &EVENTS.to_string(), "--users", "200", "--attack-every", "100"]);
        assert!(out.status.success(), "riskd generate failed");
        let text = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<String> = text.lines().map(String::from).collect();
        assert_eq!(lines.len(), EVENTS);
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("events.jsonl");
        std::fs::write(&input, text).unwrap();
        let config = write_dynamodb_config(dir.path(), &input, "", "ttl = false");
        let stderr = run_ok(&config);
        assert!(
            stderr.contains(&format!("events read {EVENTS}, skipped 0 (invalid 0, too large 0), incomplete 0,")),
            "every generated line is an event riskd applies: {stderr}"
        );
        let alert_ids = alert_ids(dir.path());
        assert!(alert_ids.len() > 20, "the stream should raise alerts ({} raised)", alert_ids.len());
        Reference { lines, alert_ids, state: export_state(&config) }
    })
}

fn alert_ids(dir: &Path) -> Vec<String> {
    alerts(dir).iter().map(|a| a["alert_id"].as_str().expect("an alert id").to_string()).collect()
}

/// The `[store]` section of a fresh table at `endpoint`, flushing often.
fn store_at(endpoint: &str) -> String {
    format!(
        "kind = \"dynamodb\"\ntable = \"faults-{}\"\nregion = \"us-east-1\"\nendpoint_url = {endpoint:?}\nttl = false\nflush_interval = \"200ms\"",
        uuid::Uuid::new_v4().simple()
    )
}

/// Appends `lines` to `input`, a chunk every `period`, counting in `appended`.
fn feed(input: &Path, lines: Vec<String>, period: Duration, appended: Arc<AtomicUsize>) -> std::thread::JoinHandle<()> {
    let input = input.to_path_buf();
    std::thread::spawn(move || {
        for chunk in lines.chunks(CHUNK) {
            std::thread::sleep(period);
            append(&input, chunk);
            appended.fetch_add(chunk.len(), Ordering::SeqCst);
        }
    })
}

/// How the store misbehaves, and for how long.
struct Disturbance<'a> {
    name: &'static str,
    lasts: Duration,
    apply: Box<dyn FnMut() + 'a>,
    clear: Box<dyn FnMut() + 'a>,
    /// Whether the fault makes requests fail (so riskd must report it),
    /// rather than only slowing them down.
    fails_requests: bool,
}

/// What a run under a fault showed.
struct Observed {
    /// Seconds from the fault to the first not-ready `/readyz`, and its body.
    not_ready: Option<(f64, String)>,
    /// Events applied while the fault lasted.
    applied_during: f64,
}

/// Runs riskd following the reference stream on `store`, disturbs it
/// mid-stream, and checks that it ends exactly as the undisturbed run.
fn ride_out(store: &str, mut fault: Disturbance<'_>) -> Observed {
    let reference = reference();
    let dir = tempfile::tempdir().unwrap();
    let (first, rest) = reference.lines.split_at(FIRST);
    let mut riskd = Following::start(dir.path(), first, store);
    let appended = Arc::new(AtomicUsize::new(FIRST));
    let chunks = rest.len().div_ceil(CHUNK) as u32;
    let period = (LEAD + fault.lasts + TAIL) / chunks;
    let feeder = feed(&riskd.input, rest.to_vec(), period, Arc::clone(&appended));
    std::thread::sleep(LEAD);

    let faults_before = riskd.store_faults_retried();
    let counted_before = riskd.counted();
    (fault.apply)();
    let began = Instant::now();
    let mut not_ready = None;
    while began.elapsed() < fault.lasts {
        if not_ready.is_none() {
            if let Some((503, body)) = riskd.readyz() {
                not_ready = Some((began.elapsed().as_secs_f64(), body));
            }
        }
        assert!(riskd.running(), "riskd exited during the fault: {}", riskd.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    let counted_at_clear = riskd.counted();
    (fault.clear)();

    let cleared = Instant::now();

    // Resumed: ready, and applying events again (or caught up with the input).
    let deadline = cleared + Duration::from_secs(90);
    let resumed = loop {
        let counted = riskd.counted();
        if riskd.ready() == Some(true)
            && (counted > counted_at_clear || counted >= appended.load(Ordering::SeqCst) as f64)
        {
            break cleared.elapsed().as_secs_f64();
        }
        assert!(riskd.running(), "riskd exited after the fault: {}", riskd.stderr());
        assert!(Instant::now() < deadline, "riskd did not resume within 90 s of the fault clearing");
        std::thread::sleep(Duration::from_millis(50));
    };
    feeder.join().unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    while riskd.counted() < EVENTS as f64 && Instant::now() < deadline && riskd.running() {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500)); // anything counted twice shows now
    let counted = riskd.counted();
    let faults_retried = riskd.store_faults_retried() - faults_before;
    assert!(riskd.running(), "riskd must still be running after the fault: {}", riskd.stderr());
    let config = riskd.config.clone();
    let stderr = riskd.stop();
    let summary = stderr.lines().rfind(|l| l.starts_with("riskd: events read")).unwrap_or_default().to_string();

    // Losses and repeats, from the events counted and the alerts written.
    let got = alert_ids(dir.path());
    let mut seen: HashMap<&str, i64> = HashMap::new();
    for id in &reference.alert_ids {
        *seen.entry(id).or_default() += 1;
    }
    for id in &got {
        *seen.entry(id).or_default() -= 1;
    }
    let alerts_missing: i64 = seen.values().filter(|n| **n > 0).sum();
    let alerts_extra: i64 = -seen.values().filter(|n| **n < 0).sum::<i64>();
    let lost = (EVENTS as f64 - counted).max(0.0) as i64 + alerts_missing;
    let twice = (counted - EVENTS as f64).max(0.0) as i64 + alerts_extra;
    eprintln!(
        "fault {}: resumed {resumed:.1} s after the fault cleared, events lost {lost}, applied twice {twice}",
        fault.name
    );
    eprintln!(
        "fault {}: not ready {}; {} events applied during the {} s fault; store faults retried {faults_retried}; {} of {} alerts",
        fault.name,
        match &not_ready {
            Some((secs, body)) => format!("{secs:.1} s after it began ({:?})", body.chars().take(160).collect::<String>()),
            None => "never".into(),
        },
        counted_at_clear - counted_before,
        fault.lasts.as_secs(),
        got.len(),
        reference.alert_ids.len(),
    );

    assert_eq!(counted, EVENTS as f64, "every event applied once (riskd_events_total ok)");
    assert!(
        summary.starts_with(&format!("riskd: events read {EVENTS},")),
        "the summary counts every event once: {stderr}"
    );
    assert_eq!(got, reference.alert_ids, "exactly the alerts of the undisturbed run");
    assert!(export_state(&config) == reference.state, "exactly the state of the undisturbed run");
    if fault.fails_requests {
        let (_, reason) = not_ready.as_ref().unwrap_or_else(|| panic!("/readyz never said not ready during the fault"));
        assert!(reason.contains("store:") && reason.contains("dynamodb"), "the reason names the store: {reason}");
        assert!(faults_retried > 0.0, "riskd_faults_total{{component=\"store\",outcome=\"retried\"}} moved");
        assert!(
            stderr.contains("failed; retrying") && stderr.contains("store"),
            "each back-off step is logged: {stderr}"
        );
    }
    Observed { not_ready, applied_during: counted_at_clear - counted_before }
}

#[test]
fn dynamodb_frozen_for_30_s_then_thawed() {
    // Frozen at the worst moment: as a flush's first write goes out (a
    // proxy that only passes requests on sees it first). The flush's
    // writes wait, unanswered, in the frozen store's sockets; riskd gives
    // up on them, abandons the flush and tries it again.
    let dynamodb = DynamoLocal::start(free_port(), None);
    let proxy = FaultProxy::start(&dynamodb.endpoint(), 0);
    let store = store_at(&proxy.endpoint);
    // None: not yet; Some(false): armed; Some(true): frozen.
    let freeze = Arc::new(std::sync::Mutex::new(None::<bool>));
    // The proxy's thread outlives the test: it holds the JVM's pid, not the
    // JVM, which is killed at the end.
    let (hook_freeze, jvm) = (Arc::clone(&freeze), dynamodb.pid());
    proxy.before_request(move |request| {
        let mut freeze = hook_freeze.lock().unwrap();
        if *freeze == Some(false) && request.windows(25).any(|w| w == b"DynamoDB_20120810.PutItem") {
            send_signal(jvm, "STOP");
            *freeze = Some(true);
        }
    });
    let observed = ride_out(
        &store,
        Disturbance {
            name: "frozen",
            lasts: Duration::from_secs(30),
            apply: Box::new(|| {
                *freeze.lock().unwrap() = Some(false);
                wait_for("a flush to freeze the store at", Duration::from_secs(30), || {
                    *freeze.lock().unwrap() == Some(true)
                });
            }),
            clear: Box::new(|| dynamodb.signal("CONT")),
            fails_requests: true,
        },
    );
    // Frozen, the store answers nothing: riskd must notice within seconds
    // (its requests time out), not wait on it for minutes.
    let (secs, _) = observed.not_ready.unwrap();
    assert!(secs < 25.0, "a frozen store is reported within seconds (after {secs:.1} s)");
    dynamodb.kill();
}

#[test]
fn connections_cut_mid_request_at_random_for_20_s() {
    let proxy = FaultProxy::start(&dynamodb_endpoint(), 0x5EED_F417);
    let store = store_at(&proxy.endpoint);
    ride_out(
        &store,
        Disturbance {
            name: "resets",
            lasts: Duration::from_secs(20),
            apply: Box::new(|| proxy.set(Fault::Cut(0.8))),
            clear: Box::new(|| proxy.set(Fault::None)),
            fails_requests: true,
        },
    );
    let counts = proxy.counts();
    eprintln!(
        "fault resets: the proxy cut {} requests and {} answers of {}",
        counts.cut_requests, counts.cut_answers, counts.requests
    );
    assert!(counts.cut_requests > 0 && counts.cut_answers > 0, "connections were cut both ways: {counts:?}");
}

#[test]
fn two_seconds_of_latency_on_every_request_for_20_s() {
    let proxy = FaultProxy::start(&dynamodb_endpoint(), 1);
    let store = store_at(&proxy.endpoint);
    let observed = ride_out(
        &store,
        Disturbance {
            name: "latency",
            lasts: Duration::from_secs(20),
            apply: Box::new(|| proxy.set(Fault::Delay(Duration::from_secs(2)))),
            clear: Box::new(|| proxy.set(Fault::None)),
            fails_requests: false,
        },
    );
    let counts = proxy.counts();
    assert!(counts.delayed > 0, "requests were held back: {counts:?}");
    // Slow is not down: each request waits 2 s and gets its answer (the
    // attempt timeout is longer), so events keep being applied.
    assert!(observed.applied_during > 0.0, "riskd kept applying events at 2 s a request");
}
