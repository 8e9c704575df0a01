//! Cost and speed of the DynamoDB store, against DynamoDB Local.
//!
//! `scripts/bench.sh dynamodb` starts DynamoDB Local and runs this: 200 k
//! generated events (10 k users, attacks planted; `RISKD_BENCH_EVENTS`
//! changes it) through the five shipped rules with the write-back cache
//! (`cached` consistency), then the first 20 k of them
//! (`RISKD_BENCH_DIRECT_EVENTS`) with every rule in `direct` consistency,
//! reporting events/s, DynamoDB requests per 1,000 events and read and
//! write capacity units per 1,000 events for both, counted by riskd's own
//! request and capacity metrics (units as DynamoDB Local reports them, or
//! riskd's estimate where it reports none). DynamoDB Local reports 0 units
//! for a key BatchGetItem does not find, where AWS bills 1: on the fresh
//! table of each run most reads are such, so read units here understate
//! AWS's bill (by up to one unit per key read).
//!
//! DynamoDB Local answers in well under a millisecond, which flatters direct
//! mode (one request at a time). `RISKD_BENCH_LATENCY_MS=N` puts a proxy in
//! front of it that holds every request N ms before passing it on, as a
//! network round trip to AWS would (within a region: a few ms).

use riskd::config::Config;
use riskd::pipeline::{run_blocking, RunOptions};
use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

fn requests() -> f64 {
    let m = riskd::telemetry::metrics();
    ["BatchGetItem", "TransactWriteItems", "Scan", "PutItem", "DeleteItem"]
        .iter()
        .flat_map(|op| ["ok", "throttled", "error"].map(|o| m.dynamodb_requests.with_label_values(&[op, o]).get()))
        .sum::<u64>() as f64
}

/// Capacity units of `kind` (`read`, `write`) consumed so far, reported and estimated.
fn units(kind: &str) -> f64 {
    let m = riskd::telemetry::metrics();
    ["BatchGetItem", "TransactWriteItems", "Scan", "PutItem", "DeleteItem"]
        .iter()
        .flat_map(|op| {
            ["dynamodb", "estimate"].map(|s| m.dynamodb_capacity_units.with_label_values(&[kind, op, s]).get())
        })
        .sum()
}

/// A proxy to `upstream` holding each HTTP request `latency` before passing
/// it on (requests carry a Content-Length; responses pass straight back).
fn latency_proxy(upstream: String, latency: Duration) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { return };
            let Ok(mut server) = std::net::TcpStream::connect(&upstream) else { return };
            let (mut from_server, mut to_client) =
                (server.try_clone().expect("clone"), client.try_clone().expect("clone"));
            std::thread::spawn(move || std::io::copy(&mut from_server, &mut to_client));
            std::thread::spawn(move || {
                let mut pending: Vec<u8> = Vec::new();
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    // One whole request: headers, then Content-Length bytes.
                    let request_len = loop {
                        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&pending[..end]).to_ascii_lowercase();
                            let body: usize = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse().ok())
                                .unwrap_or(0);
                            if pending.len() >= end + 4 + body {
                                break end + 4 + body;
                            }
                        }
                        match client.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => pending.extend_from_slice(&buf[..n]),
                        }
                    };
                    std::thread::sleep(latency);
                    if server.write_all(&pending[..request_len]).is_err() {
                        return;
                    }
                    pending.drain(..request_len);
                }
            });
        }
    });
    url
}

fn main() {
    let Ok(endpoint) = std::env::var("RISKD_TEST_DYNAMODB_ENDPOINT") else {
        eprintln!(
            "RISKD_TEST_DYNAMODB_ENDPOINT is not set: run scripts/bench.sh dynamodb, which starts DynamoDB Local"
        );
        std::process::exit(2);
    };
    let latency_ms: u64 = std::env::var("RISKD_BENCH_LATENCY_MS").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    let endpoint = if latency_ms > 0 {
        let upstream = endpoint.trim_start_matches("http://").trim_end_matches('/').to_string();
        println!("every request held {latency_ms} ms by a proxy (a network round trip)");
        latency_proxy(upstream, Duration::from_millis(latency_ms))
    } else {
        endpoint
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
    // The same rules in `consistency: direct`: every change an atomic read-modify-write.
    // (The five rules: the behaviour rules are not in Panther's helpers.)
    let direct_rules = dir.path().join("direct-rules");
    let five_rules = dir.path().join("five-rules");
    std::fs::create_dir_all(&direct_rules).expect("rules folder");
    std::fs::create_dir_all(&five_rules).expect("rules folder");
    for name in ["aws_cloudtrail.yaml", "okta.yaml"] {
        std::fs::copy(root.join("config/rules").join(name), five_rules.join(name)).expect("shipped rules");
        let text = std::fs::read_to_string(root.join("config/rules").join(name)).expect("shipped rules");
        let direct: String = text
            .lines()
            .map(|l| if l.starts_with("id: ") { format!("{l}\nconsistency: direct\n") } else { format!("{l}\n") })
            .collect();
        std::fs::write(direct_rules.join(name), direct).expect("write rules");
    }
    // Direct mode is slow by design: it runs on the first events only (RISKD_BENCH_DIRECT_EVENTS).
    let direct_events: usize =
        std::env::var("RISKD_BENCH_DIRECT_EVENTS").ok().and_then(|s| s.parse().ok()).unwrap_or(20_000);
    let direct_input = dir.path().join("direct-events.jsonl");
    let text = std::fs::read_to_string(&input).expect("read input");
    let prefix: String = text.lines().take(direct_events).map(|l| format!("{l}\n")).collect();
    std::fs::write(&direct_input, prefix).expect("write input");

    let mut rates = Vec::new();
    for (mode, input, rules) in
        [("cached", &input, five_rules.clone()), ("direct", &direct_input, direct_rules.clone())]
    {
        let table = format!("riskd-bench-{}", uuid::Uuid::new_v4().simple());
        // Direct rules need the per-key layout; the cached run takes the default.
        let layout = if mode == "direct" { "key" } else { "entity" };
        let config = dir.path().join(format!("{mode}.toml"));
        std::fs::write(
            &config,
            format!(
                "[source]\npath = {:?}\n[sink]\npath = \"{mode}-alerts.jsonl\"\n[store]\nkind = \"dynamodb\"\ntable = \"{table}\"\nregion = \"us-east-1\"\nendpoint_url = \"{endpoint}\"\nttl = false\nlayout = \"{layout}\"\n[rules]\npaths = [{:?}]\n[telemetry]\nlisten = \"\"\n",
                input.display().to_string(),
                rules.display().to_string()
            ),
        )
        .expect("write config");
        let cfg = Config::load(&config).expect("valid config");
        riskd::state::init_store(&cfg.store).expect("create the table");
        let before = requests();
        let (reads_before, writes_before) = (units("read"), units("write"));
        let flush_before = riskd::telemetry::metrics().flush_seconds.get_sample_sum();
        let start = Instant::now();
        let summary = run_blocking(cfg, RunOptions::default(), riskd::shutdown::Shutdown::new()).expect("run");
        let secs = start.elapsed().as_secs_f64();
        let sent = requests() - before;
        let (reads, writes) = (units("read") - reads_before, units("write") - writes_before);
        let rate = summary.read as f64 / secs;
        rates.push(rate);
        let flushing = riskd::telemetry::metrics().flush_seconds.get_sample_sum() - flush_before;
        println!(
            "{mode}: {} events, {} alerts in {secs:.1} s ({flushing:.1} s flushing) = {rate:.0} events/s; {sent:.0} DynamoDB requests = {:.1} per 1,000 events; capacity units per 1,000 events: {:.1} read, {:.1} write",
            summary.read,
            summary.alerts,
            1000.0 * sent / summary.read as f64,
            1000.0 * reads / summary.read as f64,
            1000.0 * writes / summary.read as f64
        );
    }
    println!("cached is {:.0}x the events/s of direct", rates[0] / rates[1]);
}
