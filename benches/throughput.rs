//! Throughput of riskd's main job against a parse-only baseline, in one run.
//!
//! `cargo bench --bench throughput` generates a mixed CloudTrail/Okta stream
//! (1 M events, 10 k users, attacks planted; `RISKD_BENCH_EVENTS` changes
//! the size), then times, alternately and several times:
//! - parse-only: read the file line by line and parse each line into a
//!   `serde_json::Value`, nothing else (one thread);
//! - read + validate: the same with riskd's `sonic-rs` parse, keeping
//!   nothing (one thread): the floor under any decoder that checks the
//!   whole line;
//! - riskd: the full main job (`pipeline::run_blocking`) with every shipped
//!   rule (`config/rules`: the five, and the three behaviour rules), the
//!   embedded redb store and alerts written to a file, with 1 decoding
//!   thread and with one per CPU (`source.decode_threads`);
//! - riskd with the five rules alone (`aws_cloudtrail.yaml`, `okta.yaml`),
//!   one decoding thread per CPU: what the behaviour rules cost;
//! - with `RISKD_BENCH_BEFORE=<riskd binary>`, that binary (an older build)
//!   on the same input and the five rules, for a before/after in the same run.
//!
//! After the runs it reports the bytes of state each rule keeps per entity
//! (the record as JSON, as the embedded store holds it), from the store of
//! the last run.
//!
//! It also times decoding alone (serde_json, sonic-rs, simd-json, riskd's
//! decoder), and the shipped rules' match conditions on the native matcher
//! and on CEL alone, the measurement behind using the native fast path.

use riskd::config::Config;
use riskd::pipeline::{run_blocking, RunOptions};
use riskd::rules::condition::{compile_cel, eval_cel};
use riskd::source::{decode, Decoded, Decoder, JsonLines, LineInfo};
use riskd::state::Store as _;
use serde_json::Value;
use simd_json::prelude::TypedObjectValue as _;
use sonic_rs::JsonValueTrait as _;
use std::fs::File;
use std::path::Path;
use std::time::Instant;

const ROUNDS: usize = 3;

/// As the `riskd` binary: the same allocator for every run here.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn parse_only(input: &Path) -> u64 {
    each_line(input, |line| {
        let v: Value = serde_json::from_slice(line).expect("generated events are JSON");
        std::hint::black_box(&v);
    })
}

/// The least any reader that checks each line is valid JSON does: read
/// the line and validate all of it with `sonic-rs` (riskd's parse, keeping
/// nothing), one thread. What riskd does on top of it is the rules' work.
fn read_validate(input: &Path) -> u64 {
    each_line(input, |line| {
        let v = riskd::event::parse_line(line).expect("generated events are JSON");
        std::hint::black_box(&v);
    })
}

/// Reads `input` line by line, one thread, giving each line to `f`; the lines read.
fn each_line(input: &Path, mut f: impl FnMut(&[u8])) -> u64 {
    let mut reader = JsonLines::open_file(input, 0, 0, 1 << 20).expect("open input");
    let mut buf = Vec::new();
    let mut n = 0u64;
    while let Some(_info) = reader.next_line(&mut buf).expect("read") {
        f(&buf);
        n += 1;
    }
    n
}

/// The rules of a run: every shipped rule, or the five alone.
fn rules(root: &Path, all: bool) -> Vec<String> {
    let dir = root.join("config/rules");
    let paths = if all { vec![dir] } else { vec![dir.join("aws_cloudtrail.yaml"), dir.join("okta.yaml")] };
    paths.iter().map(|p| p.display().to_string()).collect()
}

/// A fresh work folder with a config for `input` and `rules`, decoding on
/// `threads` threads (none: the line is left out, for older builds).
fn config(input: &Path, rules: &[String], work: &Path, threads: Option<usize>) -> std::path::PathBuf {
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(work).expect("work dir");
    let config = work.join("riskd.toml");
    let threads = threads.map(|n| format!("decode_threads = {n}\n")).unwrap_or_default();
    let text = format!(
        "[source]\npath = {:?}\n{threads}[sink]\npath = \"alerts.jsonl\"\n[store]\nkind = \"embedded\"\npath = \"state.redb\"\nflush_every_events = 100000\nflush_interval = \"2s\"\n[rules]\npaths = {rules:?}\n[telemetry]\nlisten = \"\"\n",
        input.display().to_string(),
    );
    std::fs::write(&config, text).expect("write config");
    config
}

fn riskd_run(rules: &[String], input: &Path, work: &Path, threads: usize) -> u64 {
    let config = config(input, rules, work, Some(threads));
    let cfg = Config::load(&config).expect("valid config");
    let summary = run_blocking(cfg, RunOptions::default(), riskd::shutdown::Shutdown::new()).expect("run");
    summary.read
}

/// An older riskd binary on the same input and config; events read.
fn before_run(bin: &Path, rules: &[String], input: &Path, work: &Path, events: u64) -> u64 {
    let config = config(input, rules, work, None);
    let status = std::process::Command::new(bin)
        .args(["run", "--config", &config.display().to_string()])
        .current_dir(work)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run the older riskd");
    assert!(status.success(), "the older riskd failed");
    events
}

/// Decoding alone, one thread, over `lines`: events/s of each decoder.
fn decoders(lines: &[&[u8]], cfg: &Config) {
    let time = |name: &str, f: &dyn Fn(&[u8]) -> bool| {
        let t = Instant::now();
        let ok = lines.iter().filter(|l| f(l)).count();
        assert_eq!(ok, lines.len(), "{name} decodes every generated line");
        println!("  {name:<44} {:>9.0} events/s", lines.len() as f64 / t.elapsed().as_secs_f64());
    };
    println!("decoding alone, {} lines, one thread:", lines.len());
    time("serde_json into Value (the parse-only baseline)", &|l| {
        serde_json::from_slice::<Value>(l).map(|v| std::hint::black_box(v).is_object()).unwrap_or(false)
    });
    time("simd-json into its borrowed value", &|l| {
        let mut copy = l.to_vec();
        simd_json::to_borrowed_value(&mut copy).map(|v| std::hint::black_box(v).is_object()).unwrap_or(false)
    });
    time("sonic-rs into its Value", &|l| {
        sonic_rs::from_slice::<sonic_rs::Value>(l).map(|v| std::hint::black_box(v).is_object()).unwrap_or(false)
    });
    let decoder = Decoder::new(&cfg.rules, &cfg.event_time);
    time("riskd: sonic-rs, then the fields the rules read", &|l| {
        let info = LineInfo { line: 1, end_offset: 0, len: l.len(), too_large: false };
        matches!(decode(l, &info, usize::MAX, &decoder, 0), Decoded::Event(_))
    });
}

/// Bytes of state per entity, by rule: each state key's record as JSON.
fn state_sizes(work: &Path, rules: &[String]) {
    let config = config(Path::new("unused"), rules, &work.join("sizes"), Some(1));
    let cfg = Config::load(&config).expect("valid config");
    let store = riskd::state::EmbeddedStore::open(&work.join("state.redb")).expect("the last run's store");
    println!("state per entity, by rule (record as JSON; keys, mean and max bytes):");
    for rule in cfg.rules.iter() {
        let (mut keys, mut total, mut max) = (0u64, 0u64, 0usize);
        let prefix = format!("{}/", rule.namespace);
        store
            .scan(&prefix, &mut |_, record| {
                let n = serde_json::to_vec(record).map_or(0, |v| v.len());
                keys += 1;
                total += n as u64;
                max = max.max(n);
            })
            .expect("scan");
        let mean = total.checked_div(keys).unwrap_or(0);
        let shape = rule.state_shape();
        let form = shape.split('|').nth(3).and_then(|f| f.split(' ').next()).unwrap_or("");
        println!("  {:<32} {form:<10} {keys:>7} keys {mean:>6} B mean {max:>7} B max", rule.id);
    }
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

    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let before = std::env::var_os("RISKD_BENCH_BEFORE").map(std::path::PathBuf::from);
    let alerts_of = |run: &str| std::fs::read_to_string(dir.path().join(run).join("alerts.jsonl")).unwrap_or_default();
    // Runs, by name: events/s each round.
    let mut names = vec!["parse-only".to_string(), "read + validate (sonic-rs)".to_string()];
    if before.is_some() {
        names.push("riskd before".to_string());
    }
    names.push(format!("riskd, the five rules, {cpus} decode threads"));
    names.push("riskd, 1 decode thread".to_string());
    names.push(format!("riskd, {cpus} decode threads"));
    let (five, all) = (rules(root, false), rules(root, true));
    let mut rates = vec![Vec::new(); names.len()];
    for round in 0..ROUNDS {
        let mut line = format!("round {}:", round + 1);
        for (i, name) in names.iter().enumerate() {
            let work = dir.path().join(format!("run{i}"));
            let t = Instant::now();
            let n = match i {
                0 => parse_only(&input),
                1 => read_validate(&input),
                _ if name == "riskd before" => {
                    before_run(before.as_deref().unwrap_or(Path::new("")), &five, &input, &work, events)
                }
                _ if name.contains("the five") => riskd_run(&five, &input, &work, cpus),
                _ if name.contains(" 1 decode") => riskd_run(&all, &input, &work, 1),
                _ => riskd_run(&all, &input, &work, cpus),
            };
            let rate = n as f64 / t.elapsed().as_secs_f64();
            line.push_str(&format!("  {name} {rate:>9.0}"));
            rates[i].push(rate);
        }
        println!("{line}  (events/s)");
    }
    let medians: Vec<f64> = rates.into_iter().map(median).collect();
    println!("median (events/s, and ratio to parse-only):");
    for (name, m) in names.iter().zip(&medians) {
        println!("  {name:<28} {m:>9.0}  {:.2}x", m / medians[0]);
    }
    // Runs with the same rules write the same alerts.
    let last = names.len() - 1;
    let same = |a: usize, b: usize| {
        assert_eq!(
            alerts_of(&format!("run{a}")),
            alerts_of(&format!("run{b}")),
            "{} and {} differ",
            names[a],
            names[b]
        );
    };
    same(last - 1, last);
    if before.is_some() {
        same(2, 3);
    }
    println!(
        "alerts: {} with every shipped rule, {} with the five (the same, byte for byte, in every run with the same rules)",
        alerts_of(&format!("run{last}")).lines().count(),
        alerts_of(&format!("run{}", last - 2)).lines().count()
    );
    state_sizes(&dir.path().join(format!("run{last}")), &all);

    let cfg = Config::load(&root.join("config/riskd.toml")).expect("shipped config");
    let text = std::fs::read(&input).expect("read input");
    let lines: Vec<&[u8]> = text.split(|b| *b == b'\n').filter(|l| !l.is_empty()).take(200_000).collect();
    decoders(&lines, &cfg);

    // Conditions: native matcher vs CEL alone, on the same events.
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
