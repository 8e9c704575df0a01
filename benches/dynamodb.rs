//! Cost and speed of the DynamoDB store, against DynamoDB Local.
//!
//! `scripts/bench.sh dynamodb` starts DynamoDB Local and runs this: 200 k
//! generated events (10 k users, attacks planted; `RISKD_BENCH_EVENTS`
//! changes it) through the five shipped rules with the write-back cache
//! (`cached` consistency), reporting events/s and DynamoDB requests per
//! 1,000 events, counted by riskd's own request metric.

use riskd::config::Config;
use riskd::pipeline::{run_blocking, RunOptions};
use std::fs::File;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

fn requests() -> f64 {
    let m = riskd::telemetry::metrics();
    ["BatchGetItem", "BatchWriteItem", "TransactWriteItems", "Scan", "PutItem"]
        .iter()
        .flat_map(|op| ["ok", "throttled", "error"].map(|o| m.dynamodb_requests.with_label_values(&[op, o]).get()))
        .sum::<u64>() as f64
}

fn main() {
    let Ok(endpoint) = std::env::var("RISKD_TEST_DYNAMODB_ENDPOINT") else {
        eprintln!(
            "RISKD_TEST_DYNAMODB_ENDPOINT is not set: run scripts/bench.sh dynamodb, which starts DynamoDB Local"
        );
        std::process::exit(2);
    };
    let events: u64 = std::env::var("RISKD_BENCH_EVENTS").ok().and_then(|s| s.parse().ok()).unwrap_or(200_000);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("events.jsonl");
    let spec = riskd::generate::Spec { events, users: 10_000, attack_every: 2_000, ..Default::default() };
    {
        let mut out = std::io::BufWriter::new(File::create(&input).expect("create input"));
        riskd::generate::write_stream(&spec, &mut out).expect("generate");
    }
    let table = format!("riskd-bench-{}", uuid::Uuid::new_v4().simple());
    let config = dir.path().join("riskd.toml");
    std::fs::write(
        &config,
        format!(
            "[source]\npath = {:?}\n[sink]\npath = \"alerts.jsonl\"\n[store]\nkind = \"dynamodb\"\ntable = \"{table}\"\nregion = \"us-east-1\"\nendpoint_url = \"{endpoint}\"\nttl = false\n[rules]\npaths = [{:?}]\n[telemetry]\nlisten = \"\"\n",
            input.display().to_string(),
            root.join("config/rules").display().to_string()
        ),
    )
    .expect("write config");
    let cfg = Config::load(&config).expect("valid config");
    riskd::pipeline::init_store(&cfg.store).expect("create the table");
    let before = requests();
    let start = Instant::now();
    let summary = run_blocking(cfg, &RunOptions::default(), &AtomicBool::new(false)).expect("run");
    let secs = start.elapsed().as_secs_f64();
    let sent = requests() - before;
    println!(
        "cached: {} events, {} alerts in {secs:.1} s = {:.0} events/s; {sent:.0} DynamoDB requests = {:.1} per 1,000 events",
        summary.read,
        summary.alerts,
        summary.read as f64 / secs,
        1000.0 * sent / summary.read as f64
    );
    println!("direct: not built yet (per-operation UpdateItem mode, see the DynamoDB issue)");
}
