//! Rule files through the loader: whatever the bytes, a config loads or is
//! refused with located errors; it never panics. A loaded one also compiles
//! the fields its rules read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use riskd::config::Config;
use std::path::PathBuf;
use std::sync::OnceLock;

fn dir() -> &'static (tempfile::TempDir, PathBuf, PathBuf) {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf, PathBuf)> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let rules = dir.path().join("rules.yaml");
        let config = dir.path().join("riskd.toml");
        let text = format!(
            "[source]\npath = \"-\"\n[sink]\npath = \"alerts.jsonl\"\n[store]\nkind = \"memory\"\n[rules]\npaths = [{:?}]\n[telemetry]\nlisten = \"\"\n",
            rules.display().to_string()
        );
        std::fs::write(&config, text).unwrap();
        (dir, rules, config)
    })
}

fuzz_target!(|data: &[u8]| {
    let (_dir, rules, config) = dir();
    std::fs::write(rules, data).unwrap();
    match Config::load(config) {
        Ok(cfg) => {
            let decoder = riskd::source::Decoder::new(&cfg.rules, &cfg.event_time);
            std::hint::black_box(decoder);
        }
        Err(errors) => {
            for e in &errors.0 {
                assert!(!e.to_string().is_empty());
            }
        }
    }
});
