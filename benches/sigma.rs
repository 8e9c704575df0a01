//! Sigma rules' cost, in one run: the main job on the generated stream with
//! the five shipped rules alone, and with them plus every vendored SigmaHQ
//! rule (`config/sigma/rules`, 249), alternately; beside the rsigma engine
//! (`rsigma-eval`, as `rsigma engine eval` runs it: each line parsed with
//! serde_json and evaluated against every rule) on the same file.
//!
//! `cargo bench --bench sigma` (`RISKD_BENCH_EVENTS`, default 300,000).

use riskd::config::Config;
use riskd::pipeline::{run_blocking, RunOptions};
use std::io::BufRead;
use std::path::Path;
use std::time::Instant;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ROUNDS: usize = 3;

fn config(root: &Path, input: &Path, work: &Path, sigma: bool) -> std::path::PathBuf {
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(work).expect("work dir");
    let config = work.join("riskd.toml");
    let sigma = if sigma {
        format!("sigma = [{:?}]\n", root.join("config/sigma/rules").display().to_string())
    } else {
        String::new()
    };
    let text = format!(
        "[source]\npath = {:?}\n[sink]\npath = \"alerts.jsonl\"\n[store]\nkind = \"embedded\"\npath = \"state.redb\"\nflush_every_events = 100000\nflush_interval = \"2s\"\n[rules]\npaths = [{:?}, {:?}]\n{sigma}[telemetry]\nlisten = \"\"\n",
        input.display().to_string(),
        root.join("config/rules/aws_cloudtrail.yaml").display().to_string(),
                root.join("config/rules/okta.yaml").display().to_string()
    );
    std::fs::write(&config, text).expect("write config");
    config
}

/// The main job; events read and alerts written.
fn riskd_run(root: &Path, input: &Path, work: &Path, sigma: bool) -> (u64, u64) {
    let cfg = Config::load(&config(root, input, work, sigma)).expect("valid config");
    let summary = run_blocking(cfg, RunOptions::default(), riskd::shutdown::Shutdown::new()).expect("run");
    (summary.read, summary.alerts)
}

/// rsigma's engine over the file: events read and matches.
fn rsigma_run(engine: &rsigma_eval::Engine, input: &Path) -> (u64, u64) {
    let file = std::io::BufReader::new(std::fs::File::open(input).expect("input"));
    let (mut n, mut hits) = (0u64, 0u64);
    for line in file.lines() {
        let line = line.expect("read");
        let v: serde_json::Value = serde_json::from_str(&line).expect("generated events are JSON");
        hits += engine.evaluate(&rsigma_eval::JsonEvent::borrow(&v)).len() as u64;
        n += 1;
    }
    (n, hits)
}

/// The `rsigma` CLI (`rsigma engine eval`) over the file: events read and
/// matches (lines it printed). `RSIGMA` names the binary; by default the one
/// `scripts/bench.sh sigma` installs in `.services/rsigma`.
fn rsigma_cli(bin: &Path, rules: &Path, input: &Path, events: u64) -> (u64, u64) {
    let out = std::process::Command::new(bin)
        .args(["engine", "eval", "-q", "--output-format", "ndjson", "-r"])
        .arg(rules)
        .arg("-e")
        .arg(format!("@{}", input.display()))
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run rsigma");
    assert!(out.status.success(), "rsigma engine eval failed");
    (events, out.stdout.iter().filter(|b| **b == b'\n').count() as u64)
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let events: u64 = std::env::var("RISKD_BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(300_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("events.jsonl");
    let spec = riskd::generate::Spec { events, users: 10_000, ..Default::default() };
    let mut out = std::io::BufWriter::new(std::fs::File::create(&input).expect("create input"));
    riskd::generate::write_stream(&spec, &mut out).expect("generate");
    drop(out);

    let mut engine = rsigma_eval::Engine::new();
    let mut files = Vec::new();
    let mut stack = vec![root.join("config/sigma/rules")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("sigma dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.push(p);
            }
        }
    }
    let mut loaded = 0;
    for f in &files {
        let c = rsigma_parser::parse_sigma_yaml(&std::fs::read_to_string(f).expect("read")).expect("parse");
        for r in &c.rules {
            if engine.add_rule(r).is_ok() {
                loaded += 1;
            }
        }
    }
    println!("{events} generated events; {loaded} Sigma rules in the rsigma engine");

    let cli = std::env::var_os("RSIGMA")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join(".services/rsigma/bin/rsigma"));
    let mut rows: Vec<(&str, Vec<f64>, u64)> = vec![
        ("riskd, 5 rules", vec![], 0),
        ("riskd, 5 rules + 249 Sigma", vec![], 0),
        ("rsigma-eval library, 249 Sigma", vec![], 0),
    ];
    if cli.exists() {
        rows.push(("rsigma engine eval (CLI), 249", vec![], 0));
    } else {
        println!("no rsigma CLI at {} (scripts/bench.sh sigma installs it): its row is left out", cli.display());
    }
    for round in 0..ROUNDS {
        for (i, row) in rows.iter_mut().enumerate() {
            let t = Instant::now();
            let (n, hits) = match i {
                0 => riskd_run(root, &input, &dir.path().join("five"), false),
                1 => riskd_run(root, &input, &dir.path().join("sigma"), true),
                2 => rsigma_run(&engine, &input),
                _ => rsigma_cli(&cli, &root.join("config/sigma/rules"), &input, events),
            };
            let rate = n as f64 / t.elapsed().as_secs_f64();
            println!("round {round}: {:<32} {rate:>9.0} events/s ({hits} alerts/matches)", row.0);
            row.1.push(rate);
            row.2 = hits;
        }
    }
    println!("median of {ROUNDS}:");
    for (name, mut rates, hits) in rows {
        rates.sort_by(f64::total_cmp);
        println!("  {name:<32} {:>9.0} events/s ({hits} alerts/matches)", rates[rates.len() / 2]);
    }
}
