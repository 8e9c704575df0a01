//! Throughput of riskd's main job against a parse-only baseline, in one run.
//!
//! `cargo bench --bench throughput` generates a mixed CloudTrail/Okta stream
//! (1 M events, 10 k users, attacks planted; `RISKD_BENCH_EVENTS` changes
//! the size), then times, on one thread, alternately and several times:
//! - parse-only: read the file line by line and parse each line into a
//!   `serde_json::Value`, nothing else;
//! - riskd: the full main job (`pipeline::run_blocking`) with the five
//!   shipped rules, the embedded redb store and alerts written to a file.
//!
//! It also times the shipped rules' match conditions on the native matcher
//! and on CEL alone, the measurement behind using the native fast path.

use riskd::config::Config;
use riskd::pipeline::{run_blocking, RunOptions};
use riskd::rules::condition::{compile_cel, eval_cel};
use riskd::source::JsonLines;
use serde_json::Value;
use std::fs::File;
use std::path::Path;
use std::time::Instant;

const ROUNDS: usize = 3;

fn parse_only(input: &Path) -> u64 {
    let mut reader = JsonLines::open_file(input, 0, 0, 1 << 20).expect("open input");
    let mut buf = Vec::new();
    let mut n = 0u64;
    while let Some(_info) = reader.next_line(&mut buf).expect("read") {
        let v: Value = serde_json::from_slice(&buf).expect("generated events are JSON");
        std::hint::black_box(&v);
        n += 1;
    }
    n
}

fn riskd_run(root: &Path, input: &Path, work: &Path) -> u64 {
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(work).expect("work dir");
    let config = work.join("riskd.toml");
    let text = format!(
        "[source]\npath = {:?}\n[sink]\npath = \"alerts.jsonl\"\n[store]\nkind = \"embedded\"\npath = \"state.redb\"\nflush_every_events = 100000\nflush_interval = \"2s\"\n[rules]\npaths = [{:?}]\n",
        input.display().to_string(),
        root.join("config/rules").display().to_string()
    );
    std::fs::write(&config, text).expect("write config");
    let cfg = Config::load(&config).expect("valid config");
    let summary = run_blocking(cfg, RunOptions::default(), riskd::shutdown::Shutdown::new()).expect("run");
    summary.read
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() {
    let events: u64 = std::env::var("RISKD_BENCH_EVENTS").ok().and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("events.jsonl");
    let spec = riskd::generate::Spec { events, users: 10_000, attack_every: 2_000, ..Default::default() };
    let attacks = {
        let mut out = std::io::BufWriter::new(File::create(&input).expect("create input"));
        riskd::generate::write_stream(&spec, &mut out).expect("generate")
    };
    let bytes = std::fs::metadata(&input).map(|m| m.len()).unwrap_or(0);
    println!("input: {events} events, {} users, {attacks} planted attacks, {:.0} MB", spec.users, bytes as f64 / 1e6);

    let (mut parse_rates, mut riskd_rates) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let t = Instant::now();
        let n = parse_only(&input);
        let parse = n as f64 / t.elapsed().as_secs_f64();
        let t = Instant::now();
        let n = riskd_run(root, &input, &dir.path().join("run"));
        let rate = n as f64 / t.elapsed().as_secs_f64();
        println!("round {}: parse-only {:>9.0} events/s   riskd {:>9.0} events/s", round + 1, parse, rate);
        parse_rates.push(parse);
        riskd_rates.push(rate);
    }
    let alerts = std::fs::read_to_string(dir.path().join("run/alerts.jsonl")).map(|s| s.lines().count()).unwrap_or(0);
    let (p, r) = (median(parse_rates), median(riskd_rates));
    println!(
        "median: parse-only {p:.0} events/s, riskd {r:.0} events/s = {:.0}% of parse-only ({alerts} alerts)",
        100.0 * r / p
    );

    // Conditions: native matcher vs CEL alone, on the same events.
    let cfg = Config::load(&root.join("config/riskd.toml")).expect("shipped config");
    let sample: Vec<Value> = std::fs::read_to_string(&input)
        .expect("read input")
        .lines()
        .take(100_000)
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    println!("match conditions over {} events (ns per evaluation):", sample.len());
    for rule in cfg.rules.iter() {
        let program = compile_cel(rule.matcher.source()).expect("compiles");
        let t = Instant::now();
        let native = sample.iter().filter(|e| rule.matcher.eval(e, &[])).count();
        let native_ns = t.elapsed().as_nanos() as f64 / sample.len() as f64;
        let t = Instant::now();
        let cel = sample.iter().filter(|e| eval_cel(&program, e, &[])).count();
        let cel_ns = t.elapsed().as_nanos() as f64 / sample.len() as f64;
        assert_eq!(native, cel, "native and CEL disagree on {}", rule.id);
        println!("  {:<32} native {native_ns:>7.1}   cel {cel_ns:>7.1}   ({native} matches)", rule.id);
    }
}
