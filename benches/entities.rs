//! The leaderboard at scale: `cargo bench --bench entities` writes the risk
//! of 1,000,000 entities (`RISKD_BENCH_ENTITIES` changes it; 1 to 12
//! contributions each, over 30 days, four types) into an embedded store,
//! then times, in one run:
//! - filling the board from the store (the scan a running riskd does once
//!   at start, in the background, and `riskd entities` does per call);
//! - a listing of the top 50 from the filled board with their
//!   contributions read from the store (what `GET /v1/entities` does per
//!   request), over all types and over one;
//! - the naive way, for comparison: read every risk record and score it at
//!   the listing's time, then sort.
//!
//! It checks that the board's top 50 is the naive top 50.

use riskd::scoring::{Board, Leaderboard, RiskState, ScoringConfig};
use riskd::state::{EmbeddedStore, Mutation, Record, Store, WriteBatch};
use std::sync::Arc;
use std::time::Instant;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const TYPES: [&str; 4] = ["user", "principal", "ip", "role"];
const DAY: i64 = 86_400_000;
const START: i64 = 1_714_521_600_000;

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() {
    let entities: u64 = std::env::var("RISKD_BENCH_ENTITIES").ok().and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let mut store = EmbeddedStore::open(&dir.path().join("state.redb")).expect("store");
    let cfg = ScoringConfig::default();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let t = Instant::now();
    let mut latest = START;
    for chunk in 0..entities.div_ceil(10_000) {
        let mut records = Vec::new();
        for i in chunk * 10_000..((chunk + 1) * 10_000).min(entities) {
            let contributions: Vec<serde_json::Value> = (0..1 + next(12))
                .map(|k| {
                    let at = START + next(30 * DAY as u64) as i64;
                    latest = latest.max(at);
                    serde_json::json!({"rule_id": format!("rule{}", next(8)), "points": (5 + next(40)) as f64, "event_time": at, "alert_id": format!("a-{i}-{k}")})
                })
                .collect();
            let dict = serde_json::json!({"armed": true, "contributions": contributions});
            let key = format!("riskd/risk/{}/entity-{i:07}", TYPES[(i % 4) as usize]);
            let record = Record { dict: dict.as_object().cloned(), ..Record::default() };
            records.push((key, record));
        }
        let mutations = records.iter().map(|(k, r)| (k.as_str(), Mutation::Put(r))).collect();
        store.apply(WriteBatch { mutations, checkpoints: Vec::new() }).expect("write");
    }
    let watermark = Record { count: latest, ..Record::default() };
    store
        .apply(WriteBatch {
            mutations: vec![(riskd::state::WATERMARK_KEY, Mutation::Put(&watermark))],
            checkpoints: Vec::new(),
        })
        .expect("watermark");
    println!("{entities} entities with risk written in {:.1} s", t.elapsed().as_secs_f64());

    let t = Instant::now();
    let board = Board::build(&store, &cfg, None).expect("build");
    let fill = t.elapsed().as_secs_f64();
    println!("fill the board from the store (one scan): {fill:.2} s, {} entities", board.len());

    let leaderboard = Leaderboard::new(Arc::new(cfg.clone()));
    let reader = store.reader().expect("reader");
    leaderboard.fill(store.reader().expect("reader"));
    while !leaderboard.list(reader.as_ref(), (None, 1, 0.0)).expect("list").complete {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for (what, filter) in [("top 50 of every type", (None, 50, 0.0)), ("top 50 users", (Some("user"), 50, 0.0))] {
        let mut times = Vec::new();
        let mut listing = None;
        for _ in 0..20 {
            let t = Instant::now();
            listing = Some(leaderboard.list(reader.as_ref(), filter).expect("list"));
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let listing = listing.expect("listed");
        println!("listing, {what}: median {:.2} ms over 20 ({} listed)", median(times), listing.entities.len());

        // The naive way: score every record, sort.
        let t = Instant::now();
        let mut all: Vec<(f64, String, String)> = Vec::new();
        store
            .scan("riskd/risk/", &mut |key, record| {
                let mut parts = key.splitn(4, '/').skip(2);
                let (type_, id) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                if filter.0.is_some_and(|want| want != type_) {
                    return;
                }
                let state: RiskState =
                    serde_json::from_value(serde_json::Value::Object(record.dict.clone().unwrap_or_default()))
                        .expect("risk state");
                all.push((state.score(cfg.policy(type_), latest), type_.to_string(), id.to_string()));
            })
            .expect("scan");
        all.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| (&a.1, &a.2).cmp(&(&b.1, &b.2))));
        println!("  naive (score every record, sort): {:.2} s", t.elapsed().as_secs_f64());
        let naive: Vec<(String, String)> = all.iter().take(50).map(|(_, t, i)| (t.clone(), i.clone())).collect();
        let listed: Vec<(String, String)> = listing.entities.iter().map(|e| (e.type_.clone(), e.id.clone())).collect();
        assert_eq!(listed, naive, "the board's top 50 is the naive top 50");
    }
}
