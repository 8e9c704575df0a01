//! riskd's DynamoDB bill fed live, beside Panther's helpers on the same events.
//!
//! `scripts/bench.sh cost` starts DynamoDB Local and runs this. For each rate
//! of `RISKD_BENCH_RATES` (events/s, default `1000,10000`) it generates
//! rate × `RISKD_BENCH_SECONDS` (default 300) events (5,000 users, 1 ms of
//! event time apart, attacks planted) into a file, then for each variant of
//! `RISKD_BENCH_VARIANTS` (default `defaults;layout=key,flush_interval=2s;layout=key;layout=entity,flush_interval=2s`
//! — the defaults are the entity layout and a flush a minute on DynamoDB —:
//! `;`-separated entries of `,`-separated `name=value` pairs appended to
//! `[store]`, `defaults` appending nothing) runs riskd in-process on a fresh
//! table, following a feed file (`[source] follow = true`) that a feeder
//! thread appends the stream's lines to at the rate, by wall clock, every
//! 10 ms. When the feeder is done and riskd has read every line
//! (`riskd_events_total`), riskd is stopped through its `Shutdown` handle:
//! it applies what it holds, flushes, and returns its summary.
//!
//! Counted from riskd's own metrics, as deltas over each run: DynamoDB
//! requests, capacity units (as DynamoDB Local reports them, riskd's
//! estimate where it reports none), the write-back cache's misses (the
//! distinct keys first touched: nothing is evicted at this size) and keys
//! written per flush. DynamoDB Local reports 0 read units for a key that
//! BatchGetItem does not find, where AWS bills it: on a fresh table most
//! reads are such, so the read units are also given with each miss charged
//! one more unit (an upper bound of AWS's bill), and the $ uses that bound.
//!
//! Panther's helpers (`scripts/panther_baseline/run.py`, with the python of
//! `RISKD_BENCH_PANTHER`, default `.services/panther/bin/python`) run on
//! the first `RISKD_BENCH_PANTHER_EVENTS` (default 300,000) events of the
//! 1,000/s stream, on a table of their own, at the same time as riskd's
//! runs: their units do not depend on timing.
//!
//! Every variant of a rate must raise the same alerts (same alert ids):
//! the bench fails if not. They are also compared with a replay of the
//! stream at full speed on the memory store (reported, not enforced).

use riskd::config::Config;
use riskd::pipeline::{run_blocking, RunOptions};
use riskd::shutdown::Shutdown;
use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// On-demand prices, us-east-1, $ per million request units.
const WRITE_PRICE: f64 = 0.625;
const READ_PRICE: f64 = 0.125;

const OPS: [&str; 5] = ["BatchGetItem", "TransactWriteItems", "Scan", "PutItem", "DeleteItem"];

/// The counters a run is measured by, read from riskd's metrics.
#[derive(Clone, Copy, Default)]
struct Counters {
    lines: f64,
    requests: f64,
    reads: f64,
    writes: f64,
    misses: f64,
    flushes: f64,
    flush_keys: f64,
}

impl Counters {
    fn now() -> Self {
        let m = riskd::telemetry::metrics();
        let units = |kind: &str| -> f64 {
            OPS.iter()
                .flat_map(|op| {
                    ["dynamodb", "estimate"].map(|s| m.dynamodb_capacity_units.with_label_values(&[kind, op, s]).get())
                })
                .sum()
        };
        Self {
            lines: ["ok", "invalid", "too_large"]
                .iter()
                .map(|o| m.events.with_label_values(&["file", o]).get())
                .sum::<u64>() as f64,
            requests: OPS
                .iter()
                .flat_map(|op| {
                    ["ok", "throttled", "error"].map(|o| m.dynamodb_requests.with_label_values(&[op, o]).get())
                })
                .sum::<u64>() as f64,
            reads: units("read"),
            writes: units("write"),
            misses: m.cache_lookups.with_label_values(&["miss"]).get() as f64,
            flushes: m.flush_keys.get_sample_count() as f64,
            flush_keys: m.flush_keys.get_sample_sum(),
        }
    }

    fn since(self, before: Self) -> Self {
        Self {
            lines: self.lines - before.lines,
            requests: self.requests - before.requests,
            reads: self.reads - before.reads,
            writes: self.writes - before.writes,
            misses: self.misses - before.misses,
            flushes: self.flushes - before.flushes,
            flush_keys: self.flush_keys - before.flush_keys,
        }
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("{name}={v:?} is not valid")),
        Err(_) => default,
    }
}

/// `name=value,…` as TOML lines: numbers and booleans as they are, anything else quoted.
fn variant_toml(variant: &str) -> String {
    if variant.trim() == "defaults" {
        return String::new();
    }
    variant
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|pair| {
            let (name, value) =
                pair.split_once('=').unwrap_or_else(|| panic!("variant {variant:?}: {pair:?} is not name=value"));
            let (name, value) = (name.trim(), value.trim());
            let bare = value.parse::<f64>().is_ok() || value == "true" || value == "false";
            if bare {
                format!("{name} = {value}\n")
            } else {
                format!("{name} = {value:?}\n")
            }
        })
        .collect()
}

/// Alert ids of an alerts file.
fn alert_ids(path: &Path) -> BTreeSet<String> {
    let Ok(file) = File::open(path) else { return BTreeSet::new() };
    BufReader::new(file)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(&l.expect("read alerts")).expect("an alert");
            v["alert_id"].as_str().expect("alert_id").to_string()
        })
        .collect()
}

/// Appends `stream`'s lines to `feed` at `rate` lines/s by wall clock,
/// counting them in `fed`; the seconds it took.
fn feed(stream: &Path, feed: &Path, rate: u64, total: u64, fed: &AtomicU64) -> f64 {
    let mut input = BufReader::new(File::open(stream).expect("open stream"));
    let mut out = BufWriter::new(OpenOptions::new().append(true).open(feed).expect("open feed"));
    let start = Instant::now();
    let mut written = 0u64;
    let mut line = String::new();
    while written < total {
        let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
        while written < due {
            line.clear();
            if input.read_line(&mut line).expect("read stream") == 0 {
                panic!("the stream ended after {written} of {total} lines");
            }
            out.write_all(line.as_bytes()).expect("write feed");
            written += 1;
        }
        out.flush().expect("flush feed");
        fed.store(written, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(10));
    }
    start.elapsed().as_secs_f64()
}

struct Run {
    rate: u64,
    variant: String,
    events: u64,
    alerts: u64,
    suppressed: u64,
    secs: f64,
    /// Seconds from the feeder's last line to riskd having read it.
    lag: f64,
    /// Most lines fed and not yet read by riskd, sampled every 100 ms.
    max_backlog: f64,
    c: Counters,
    ids: BTreeSet<String>,
}

impl Run {
    fn per_k(&self, x: f64) -> f64 {
        1000.0 * x / self.events as f64
    }
    /// Read units with every cache miss charged one more unit (AWS bills a missing key).
    fn reads_aws_bound(&self) -> f64 {
        self.c.reads + self.c.misses
    }
    fn dollars_per_million(&self) -> f64 {
        let per_event = |u: f64| u / self.events as f64;
        per_event(self.c.writes) * WRITE_PRICE + per_event(self.reads_aws_bound()) * READ_PRICE
    }
}

fn config_text(source: &Path, follow: bool, alerts: &Path, store: &str, rules: &Path) -> String {
    format!(
        "[source]\npath = {:?}\nfollow = {follow}\n[sink]\npath = {:?}\n[store]\n{store}[rules]\npaths = [{:?}]\n[telemetry]\nlisten = \"\"\n",
        source.display().to_string(),
        alerts.display().to_string(),
        rules.display().to_string()
    )
}

/// One live run: a fresh table, riskd following `feed_path`, the feeder at `rate`.
#[allow(clippy::too_many_arguments)]
fn live_run(
    dir: &Path,
    endpoint: &str,
    rules: &Path,
    stream: &Path,
    rate: u64,
    total: u64,
    index: usize,
    variant: &str,
) -> Run {
    let run_dir = dir.join(format!("{rate}-{index}"));
    std::fs::create_dir_all(&run_dir).expect("run folder");
    let feed_path = run_dir.join("feed.jsonl");
    File::create(&feed_path).expect("create feed");
    let alerts = run_dir.join("alerts.jsonl");
    let table = format!("riskd-cost-{}", uuid::Uuid::new_v4().simple());
    let store = format!(
        "kind = \"dynamodb\"\ntable = \"{table}\"\nregion = \"us-east-1\"\nendpoint_url = \"{endpoint}\"\nttl = false\n{}",
        variant_toml(variant)
    );
    let config = run_dir.join("riskd.toml");
    std::fs::write(&config, config_text(&feed_path, true, &alerts, &store, rules)).expect("write config");
    let cfg = Config::load(&config).unwrap_or_else(|e| panic!("variant {variant:?}: {e}"));
    riskd::state::init_store(&cfg.store).expect("create the table");

    let before = Counters::now();
    let start = Instant::now();
    let shutdown = Shutdown::new();
    let riskd = {
        let shutdown = shutdown.clone();
        std::thread::spawn(move || run_blocking(cfg, RunOptions::default(), shutdown))
    };
    let fed_lines = Arc::new(AtomicU64::new(0));
    let feeder = {
        let (stream, feed_path, fed_lines) = (stream.to_path_buf(), feed_path.clone(), Arc::clone(&fed_lines));
        std::thread::spawn(move || feed(&stream, &feed_path, rate, total, &fed_lines))
    };
    // How far riskd falls behind the feed, meanwhile.
    let mut max_backlog = 0f64;
    while !feeder.is_finished() {
        let backlog = fed_lines.load(Ordering::Relaxed) as f64 - Counters::now().since(before).lines;
        max_backlog = max_backlog.max(backlog);
        std::thread::sleep(Duration::from_millis(100));
    }
    let fed = feeder.join().expect("feeder");
    let fed_at = Instant::now();
    // riskd has read every line: stop it; it applies what it holds and flushes.
    while Counters::now().since(before).lines < total as f64 {
        if riskd.is_finished() {
            let result = riskd.join().expect("riskd thread");
            panic!("riskd stopped before reading every line: {result:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let lag = fed_at.elapsed().as_secs_f64();
    shutdown.trigger();
    let summary = riskd.join().expect("riskd thread").unwrap_or_else(|e| panic!("riskd failed: {e}"));
    let secs = start.elapsed().as_secs_f64();
    let c = Counters::now().since(before);
    assert_eq!(summary.read, total, "riskd read {} lines of {total}", summary.read);
    let _ = std::fs::remove_file(&feed_path);
    eprintln!("  fed {total} lines in {fed:.1} s");
    Run {
        rate,
        variant: variant.to_string(),
        events: summary.read,
        alerts: summary.alerts,
        suppressed: summary.suppressed,
        secs,
        lag,
        max_backlog,
        c,
        ids: alert_ids(&alerts),
    }
}

/// Alert ids of a replay of `stream` at full speed on the memory store.
fn replay_ids(dir: &Path, rules: &Path, stream: &Path, rate: u64) -> BTreeSet<String> {
    let run_dir = dir.join(format!("{rate}-replay"));
    std::fs::create_dir_all(&run_dir).expect("run folder");
    let alerts = run_dir.join("alerts.jsonl");
    let config = run_dir.join("riskd.toml");
    std::fs::write(&config, config_text(stream, false, &alerts, "kind = \"memory\"\n", rules)).expect("write config");
    let cfg = Config::load(&config).expect("valid config");
    run_blocking(cfg, RunOptions::default(), Shutdown::new()).expect("replay");
    alert_ids(&alerts)
}

fn main() {
    let Ok(endpoint) = std::env::var("RISKD_TEST_DYNAMODB_ENDPOINT") else {
        eprintln!("RISKD_TEST_DYNAMODB_ENDPOINT is not set: run scripts/bench.sh cost, which starts DynamoDB Local");
        std::process::exit(2);
    };
    let seconds: u64 = env_or("RISKD_BENCH_SECONDS", 300);
    let rates: Vec<u64> = env_or("RISKD_BENCH_RATES", "1000,10000".to_string())
        .split(',')
        .map(|r| r.trim().parse().unwrap_or_else(|_| panic!("RISKD_BENCH_RATES: {r:?} is not a rate")))
        .collect();
    let variants: Vec<String> = env_or(
        "RISKD_BENCH_VARIANTS",
        "defaults;layout=key,flush_interval=2s;layout=key;layout=entity,flush_interval=2s".to_string(),
    )
    .split(';')
    .map(|v| v.trim().to_string())
    .filter(|v| !v.is_empty())
    .collect();
    let panther_events: u64 = env_or("RISKD_BENCH_PANTHER_EVENTS", 300_000);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let panther_python = root.join(env_or("RISKD_BENCH_PANTHER", ".services/panther/bin/python".to_string()));
    let dir = tempfile::tempdir().expect("temp dir");
    // The five rules Panther's helpers implement (not the behaviour rules).
    let rules = dir.path().join("rules");
    std::fs::create_dir_all(&rules).expect("rules folder");
    for name in ["aws_cloudtrail.yaml", "okta.yaml"] {
        std::fs::copy(root.join("config/rules").join(name), rules.join(name)).expect("shipped rules");
    }
    println!(
        "riskd fed live at {rates:?} events/s for {seconds} s each; variants (appended to [store]): {}",
        variants.iter().map(|v| format!("{v:?}")).collect::<Vec<_>>().join(", ")
    );
    println!("on-demand prices (us-east-1): ${WRITE_PRICE} per million write request units, ${READ_PRICE} per million read request units");

    // One stream per rate, shared by its variants.
    let streams: Vec<(u64, u64, PathBuf)> = rates
        .iter()
        .map(|&rate| {
            let events = rate * seconds;
            let path = dir.path().join(format!("stream-{rate}.jsonl"));
            let spec = riskd::generate::Spec { events, users: 5000, step_ms: 1, ..Default::default() };
            let mut out = BufWriter::new(File::create(&path).expect("create stream"));
            riskd::generate::write_stream(&spec, &mut out).expect("generate");
            out.flush().expect("write stream");
            (rate, events, path)
        })
        .collect();

    // Panther's helpers, meanwhile, on the 1,000/s stream (or the first).
    let panther = if panther_python.exists() {
        let (rate, _, stream) = streams.iter().find(|s| s.0 == 1000).unwrap_or(&streams[0]);
        let out = dir.path().join("panther.json");
        let err = dir.path().join("panther.err");
        println!(
            "Panther's helpers: the first {panther_events} events of the {rate}/s stream (their cost per event does not depend on the rate), one request at a time, alongside riskd's runs"
        );
        let child = std::process::Command::new(&panther_python)
            .arg(root.join("scripts/panther_baseline/run.py"))
            .arg(stream)
            .args(["--endpoint", &endpoint, "--table", &format!("panther-cost-{}", uuid::Uuid::new_v4().simple())])
            .args(["--limit", &panther_events.to_string(), "--json"])
            .stdout(File::create(&out).expect("panther output"))
            .stderr(File::create(&err).expect("panther errors"))
            .spawn()
            .expect("start the Panther baseline");
        Some((child, out, err))
    } else {
        println!("Panther's helpers skipped: no python at {} (RISKD_BENCH_PANTHER)", panther_python.display());
        None
    };

    let mut runs: Vec<Run> = Vec::new();
    for (rate, events, stream) in &streams {
        for (i, variant) in variants.iter().enumerate() {
            eprintln!("== {rate} events/s, {variant}: {events} events");
            runs.push(live_run(dir.path(), &endpoint, &rules, stream, *rate, *events, i, variant));
        }
    }

    let panther: Option<serde_json::Value> = panther.map(|(mut child, out, err)| {
        let status = child.wait().expect("wait for the Panther baseline");
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        assert!(
            status.success(),
            "the Panther baseline failed ({status}): {}",
            std::fs::read_to_string(&err).unwrap_or_default()
        );
        serde_json::from_str(&text).expect("the Panther baseline's JSON")
    });

    println!();
    println!(
        "riskd fed live (units as DynamoDB Local reports them, riskd's estimate where it reports none; reads also with each first-touched key charged 1 unit, AWS's bill for a missing key: the $ uses that bound)"
    );
    for r in &runs {
        println!(
            "{:>6}/s {:<32} {} events, {} alerts ({} suppressed), {:.1} s (most behind the feed: {:.0} lines = {:.1} s; read all {:.1} s after the last line fed); per 1k events: {:.2} requests, {:.3} write units, {:.3} read units ({:.3} with misses charged); {:.0} distinct keys first touched, read units {:.0} ({:.0} with misses charged); {:.0} flushes, {:.1} keys written per flush (the entity layout packs an entity's keys into one item); ${:.5} per million events",
            r.rate,
            r.variant,
            r.events,
            r.alerts,
            r.suppressed,
            r.secs,
            r.max_backlog,
            r.max_backlog / r.rate as f64,
            r.lag,
            r.per_k(r.c.requests),
            r.per_k(r.c.writes),
            r.per_k(r.c.reads),
            r.per_k(r.reads_aws_bound()),
            r.c.misses,
            r.c.reads,
            r.reads_aws_bound(),
            r.c.flushes,
            if r.c.flushes > 0.0 { r.c.flush_keys / r.c.flushes } else { 0.0 },
            r.dollars_per_million()
        );
    }

    if let Some(p) = &panther {
        let k = &p["per_1000_events"];
        let f = |name: &str| k[name].as_f64().unwrap_or(f64::NAN);
        let (w, rd) = (f("computed_write_units"), f("computed_read_units"));
        let dollars = (w * WRITE_PRICE + rd * READ_PRICE) / 1000.0;
        println!(
            "Panther's helpers on the first {} events: {} alerts, {:.1} s ({} events/s); per 1k events: {:.2} requests, write units {:.3} computed by DynamoDB's size rules ({:.3} reported), read units {:.3} computed ({:.3} reported, {:.3} with missing GetItems charged); {} distinct keys; ${dollars:.5} per million events (computed units); mirror mismatches {}",
            p["events"],
            p["alerts_total"],
            p["seconds"].as_f64().unwrap_or(f64::NAN),
            p["events_per_s"],
            f("requests"),
            w,
            f("reported_write_units"),
            rd,
            f("reported_read_units"),
            f("reported_read_units_with_missing_gets_charged"),
            p["distinct_keys"],
            p["mirror_mismatches"]
        );
        for r in &runs {
            let ratio = r.per_k(r.c.writes) / w;
            println!(
                "  {:>6}/s {:<32} write units per 1k: riskd {:.3} / Panther {w:.3} = {ratio:.3}x (target <= 0.25x: {})",
                r.rate,
                r.variant,
                r.per_k(r.c.writes),
                if ratio <= 0.25 { "met" } else { "NOT met" }
            );
        }
    }

    // The same alerts in every variant of a rate, and as a replay on the memory store.
    let mut mismatched = Vec::new();
    for (rate, _, stream) in &streams {
        let of_rate: Vec<&Run> = runs.iter().filter(|r| r.rate == *rate).collect();
        let first = &of_rate[0];
        let differ_before = mismatched.len();
        for r in &of_rate[1..] {
            if r.ids != first.ids {
                mismatched.push(format!(
                    "{rate}/s: {:?} raised {} alerts, {:?} {} ({} only in the first, {} only in the second)",
                    first.variant,
                    first.ids.len(),
                    r.variant,
                    r.ids.len(),
                    first.ids.difference(&r.ids).count(),
                    r.ids.difference(&first.ids).count()
                ));
            }
        }
        if mismatched.len() == differ_before {
            println!("{rate}/s: every variant raised the same {} alerts (same alert ids)", first.ids.len());
        }
        let replay = replay_ids(dir.path(), &rules, stream, *rate);
        if replay == first.ids {
            println!("{rate}/s: the same alerts as a replay at full speed on the memory store");
        } else {
            println!(
                "{rate}/s: DIFFERENT alerts from a replay at full speed on the memory store: {} there, {} live ({} only in the replay, {} only live)",
                replay.len(),
                first.ids.len(),
                replay.difference(&first.ids).count(),
                first.ids.difference(&replay).count()
            );
        }
    }
    if !mismatched.is_empty() {
        for m in &mismatched {
            eprintln!("ALERTS DIFFER: {m}");
        }
        panic!("variants of one rate raised different alerts");
    }
}
