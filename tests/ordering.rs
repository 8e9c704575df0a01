//! The same events give the same alerts and state whatever their arrival
//! order, within `event_time.max_delay`: a stream whose every event is
//! displaced by less than the delay is scored as the sorted stream is, by
//! `riskd run` and by `riskd replay`.

mod common;

use common::*;
use std::path::Path;

/// A small deterministic generator (xorshift), for reproducible shuffles.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// The event time of a generated line (ms).
fn time_of(line: &str) -> i64 {
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    let text = v.get("eventTime").or_else(|| v.get("published")).and_then(|t| t.as_str()).unwrap();
    chrono_ms(text)
}

fn chrono_ms(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339).unwrap().timestamp_millis()
}

/// `sorted` (ascending event times), each event displaced by less than
/// `max_delay_ms` of event time: sorted again, stably, by its time plus a
/// random delay below `max_delay_ms` drawn once per distinct time (events
/// of one time keep their order: ties go in arrival order).
fn displaced(sorted: &[String], max_delay_ms: u64, seed: u64) -> Vec<String> {
    let mut keyed: Vec<(i64, usize)> = sorted
        .iter()
        .enumerate()
        .map(|(i, line)| {
            let t = time_of(line);
            let mut rng = Rng((t as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed | 1);
            (t + rng.below(max_delay_ms) as i64, i)
        })
        .collect();
    keyed.sort();
    keyed.into_iter().map(|(_, i)| sorted[i].clone()).collect()
}

/// Scores `lines` with `event_time` settings; the alerts (as written) and the state.
fn score(dir: &Path, lines: &[String], event_time: &str) -> (Vec<serde_json::Value>, String) {
    let config = write_scoring_config(dir, lines, event_time);
    run_ok(&config);
    (alerts(dir), export_state(&config))
}

/// `riskd replay` of `lines` with `event_time` settings: its JSON report.
fn replay(dir: &Path, lines: &[String], event_time: &str) -> serde_json::Value {
    let config = write_scoring_config(dir, lines, event_time);
    let (config, input) = (config.display().to_string(), dir.join("events.jsonl").display().to_string());
    let out = riskd(&["replay", "--config", &config, "--input", &input, "--format", "json"]);
    assert!(out.status.success(), "riskd replay: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `lines` as the input of a config with `event_time` settings.
fn write_scoring_config(dir: &Path, lines: &[String], event_time: &str) -> std::path::PathBuf {
    let input = dir.join("events.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let config = write_config(dir, &input, "", "");
    // A low risk threshold, so that entity risk alerts are part of the comparison.
    let text = std::fs::read_to_string(&config).unwrap()
        + "\n[event_time]\n"
        + event_time
        + "\n[scoring.defaults]\nthreshold = 40\n";
    std::fs::write(&config, text).unwrap();
    config
}

#[test]
fn a_stream_displaced_within_the_delay_scores_as_the_sorted_one() {
    // 100 ms between events, a few users and frequent attacks: every
    // shipped rule fires, dedup suppresses, and risk crosses thresholds.
    let spec = riskd::generate::Spec { events: 6000, users: 30, attack_every: 60, seed: 7, ..Default::default() };
    let mut out = Vec::new();
    riskd::generate::write_stream(&spec, &mut out).unwrap();
    let mut sorted: Vec<String> = String::from_utf8(out).unwrap().lines().map(String::from).collect();
    sorted.sort_by_key(|l| time_of(l));
    let work = tempfile::tempdir().unwrap();
    let (want_alerts, want_state) = score(&work.path().join("sorted").tap_mkdir(), &sorted, "max_delay = \"30s\"");
    let rules: std::collections::BTreeSet<&str> = want_alerts.iter().filter_map(|a| a["rule_id"].as_str()).collect();
    assert!(rules.len() >= 6, "the stream exercises the five rules and entity risk: {rules:?}");
    assert!(want_state.contains("riskd/dedup/"), "dedup windows are part of the state");
    let mut unordered_differs = false;
    for seed in [1, 2, 3] {
        let lines = displaced(&sorted, 30_000, seed);
        assert_ne!(lines, sorted);
        let dir = work.path().join(format!("seed{seed}")).tap_mkdir();
        let (got_alerts, got_state) = score(&dir, &lines, "max_delay = \"30s\"");
        assert!(got_alerts == want_alerts, "seed {seed}: the alerts differ from the sorted stream's");
        assert!(got_state == want_state, "seed {seed}: the state differs from the sorted stream's");
        // `riskd replay` applies events in the same order as `riskd run`.
        let sorted_report =
            replay(&work.path().join(format!("replay-sorted{seed}")).tap_mkdir(), &sorted, "max_delay = \"30s\"");
        let displaced_report =
            replay(&work.path().join(format!("replay{seed}")).tap_mkdir(), &lines, "max_delay = \"30s\"");
        assert_eq!(displaced_report, sorted_report, "seed {seed}: riskd replay differs from the sorted stream's");
        // Without the buffer the same stream gives other alerts: the test can fail.
        let dir = work.path().join(format!("seed{seed}-unordered")).tap_mkdir();
        unordered_differs |= score(&dir, &lines, "max_delay = \"0s\"").0 != want_alerts;
    }
    assert!(unordered_differs, "applied as they arrive, displaced events give other alerts");
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}

impl TapMkdir for std::path::PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}
