//! The main job: read → decode → evaluate → write alerts, with a checkpoint
//! every `flush_every_events`.
//!
//! Order at each flush: alerts and dead letters are made durable first, then
//! the state changes and the checkpoint (input offset, output lengths) are
//! committed in one store batch. A crash before the commit leaves outputs
//! longer than the checkpoint says; the restart cuts them back and replays
//! from the checkpoint, and since evaluation is deterministic on event time
//! it writes the same alerts again. So a run killed at any point and
//! restarted ends with exactly the state and alerts of one uninterrupted run.

use crate::config::{Config, StoreKind, Stream};
use crate::event::now_ms;
use crate::rules::{Engine, Problem};
use crate::sink::{DeadLetter, JsonLinesSink};
use crate::source::JsonLines;
use crate::state::{
    dynamodb, Checkpoint, DynamoStore, EmbeddedStore, MemoryStore, StateCache, StateError, Store, WATERMARK_KEY,
};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Overrides of the config's input and alert output (`--input`, `--alerts`).
#[derive(Debug, Default, Clone)]
pub struct RunOptions {
    /// Replaces `[source] path`.
    pub input: Option<Stream>,
    /// Replaces `[sink] path`.
    pub alerts: Option<Stream>,
}

/// What a run did.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Lines read in this run (blank lines aside).
    pub read: u64,
    /// Lines that were not JSON or not an object.
    pub invalid: u64,
    /// Lines over the size limit.
    pub too_large: u64,
    /// Events some rule had to skip (a field it needs is absent).
    pub incomplete: u64,
    /// Alerts written.
    pub alerts: u64,
    /// Alerts suppressed by dedup.
    pub suppressed: u64,
    /// Of the alerts, `entity_risk` alerts.
    pub risk_alerts: u64,
    /// The line the run resumed after (0: from the start).
    pub resumed_after_line: u64,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "riskd: events read {}, skipped {} (invalid {}, too large {}), incomplete {}, alerts {}, suppressed {}, risk alerts {}",
            self.read,
            self.invalid + self.too_large,
            self.invalid,
            self.too_large,
            self.incomplete,
            self.alerts,
            self.suppressed,
            self.risk_alerts
        )?;
        if self.resumed_after_line > 0 {
            write!(f, " (resumed after line {})", self.resumed_after_line)?;
        }
        Ok(())
    }
}

/// Why a run stopped early.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A file could not be read or written.
    #[error("{what} {path}: {source}")]
    Io {
        /// Which file: input, alerts, dead letters.
        what: &'static str,
        /// Its path.
        path: String,
        /// The OS error.
        source: io::Error,
    },
    /// The state store failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// The processing thread panicked (a bug).
    #[error("processing task failed: {0}")]
    Task(String),
}

fn io_err<'a>(what: &'static str, path: &'a str) -> impl FnOnce(io::Error) -> RunError + 'a {
    move |source| RunError::Io { what, path: path.to_string(), source }
}

/// Opens the configured store. The DynamoDB store blocks on its own
/// runtime: open and use it from a blocking thread, not an async task.
pub fn open_store(kind: &StoreKind) -> Result<Box<dyn Store>, StateError> {
    Ok(match kind {
        StoreKind::Memory => Box::new(MemoryStore::new()),
        StoreKind::Embedded(path) => Box::new(EmbeddedStore::open(path)?),
        StoreKind::DynamoDb(cfg) => Box::new(DynamoStore::open(cfg)?),
    })
}

/// `riskd store init`: sets up what the configured store needs (a DynamoDB
/// table with TTL); returns what was done, one line per step. Blocks.
pub fn init_store(kind: &StoreKind) -> Result<Vec<String>, StateError> {
    match kind {
        StoreKind::DynamoDb(cfg) => dynamodb::init_table(cfg),
        StoreKind::Embedded(path) => {
            Ok(vec![format!("the embedded store needs no setup: {} is created on first use", path.display())])
        }
        StoreKind::Memory => Ok(vec!["the memory store needs no setup".into()]),
    }
}

/// `riskd store check`: everything wrong with the configured store's setup
/// (empty when nothing is). Blocks.
pub fn check_store(kind: &StoreKind) -> Result<Vec<String>, StateError> {
    match kind {
        StoreKind::DynamoDb(cfg) => dynamodb::check_table(cfg),
        StoreKind::Embedded(_) | StoreKind::Memory => Ok(Vec::new()),
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

struct Outputs {
    alerts: JsonLinesSink,
    alerts_key: Option<String>,
    dead: Option<(JsonLinesSink, String)>,
}

impl Outputs {
    /// Syncs every output; returns the lengths to record in the checkpoint.
    fn sync(&mut self) -> Result<BTreeMap<String, u64>, RunError> {
        let mut lens = BTreeMap::new();
        let len = self.alerts.sync().map_err(io_err("alerts", "output"))?;
        if let Some(k) = &self.alerts_key {
            lens.insert(k.clone(), len);
        }
        if let Some((sink, key)) = &mut self.dead {
            lens.insert(key.clone(), sink.sync().map_err(io_err("dead-letter file", key))?);
        }
        Ok(lens)
    }

    fn dead_letter(&mut self, letter: &DeadLetter<'_>) -> Result<(), RunError> {
        tracing::warn!(source = letter.source, line = letter.line, reason = letter.reason, detail = %letter.detail, "event set aside");
        if let Some((sink, key)) = &mut self.dead {
            sink.write(letter).map_err(io_err("dead-letter file", key))?;
        }
        Ok(())
    }
}

/// Runs the main job to the end of the input, or until `stop` is set.
pub fn run_blocking(cfg: Config, opts: &RunOptions, stop: &AtomicBool) -> Result<Summary, RunError> {
    let input = opts.input.clone().unwrap_or(cfg.input.clone());
    let alerts_to = opts.alerts.clone().unwrap_or(cfg.alerts.clone());
    let store = open_store(&cfg.store)?;
    let (source_name, source_id) = match &input {
        Stream::File(p) => (p.display().to_string(), Some(format!("file:{}", absolute(p).display()))),
        Stream::Std => ("stdin".to_string(), None),
    };
    let cp = match &source_id {
        Some(id) => store.checkpoint(id)?.unwrap_or_default(),
        None => Checkpoint::default(),
    };
    let (alerts, alerts_key) = match &alerts_to {
        Stream::Std => (JsonLinesSink::stdout(), None),
        Stream::File(p) => {
            let key = format!("alerts:{}", absolute(p).display());
            let sink = JsonLinesSink::open_file(p, cp.outputs.get(&key).copied())
                .map_err(io_err("alerts file", &p.display().to_string()))?;
            (sink, Some(key))
        }
    };
    let dead = match &cfg.dead_letter {
        None => None,
        Some(p) => {
            let key = format!("dead_letter:{}", absolute(p).display());
            let sink = JsonLinesSink::open_file(p, cp.outputs.get(&key).copied())
                .map_err(io_err("dead-letter file", &p.display().to_string()))?;
            Some((sink, key))
        }
    };
    let mut outputs = Outputs { alerts, alerts_key, dead };
    let mut reader = match &input {
        Stream::File(p) => {
            JsonLines::open_file(p, cp.offset, cp.line, cfg.max_line_bytes).map_err(io_err("input", &source_name))?
        }
        Stream::Std => JsonLines::stdin(cfg.max_line_bytes),
    };
    let mut summary = Summary { resumed_after_line: cp.line, ..Summary::default() };
    if cp.line > 0 {
        tracing::info!(source = %source_name, line = cp.line, "resuming after the last checkpoint");
    }
    let mut engine =
        Engine::new(Arc::new(cfg.rules), Arc::new(cfg.scoring), StateCache::new(store, cfg.cache_max_entries));
    let mut position = cp.clone();
    let mut buf = Vec::new();
    let mut alerts = Vec::new();
    let mut since_flush = 0u64;
    let mut last_flush = std::time::Instant::now();
    let flush = |engine: &mut Engine, outputs: &mut Outputs, position: &mut Checkpoint| -> Result<(), RunError> {
        position.outputs = outputs.sync()?;
        // The latest event time seen: "now" for `riskd entity` and state browsing.
        let clock = engine.cache().write(WATERMARK_KEY, position.watermark_ms)?;
        clock.count = clock.count.max(position.watermark_ms);
        let cp = source_id.as_ref().map(|id| (id.clone(), position.clone()));
        let keys = engine.cache().flush(cp)?;
        tracing::debug!(keys, line = position.line, "flushed state");
        Ok(())
    };
    while !stop.load(Ordering::Relaxed) {
        let Some(info) = reader.next_line(&mut buf).map_err(io_err("input", &source_name))? else {
            break;
        };
        position.offset = info.end_offset;
        position.line = info.line;
        since_flush += 1;
        // The clock is read every 1024 lines only: cheap, and often enough.
        if since_flush >= cfg.flush_every_events
            || (since_flush % 1024 == 0 && last_flush.elapsed() >= cfg.flush_interval)
        {
            flush(&mut engine, &mut outputs, &mut position)?;
            since_flush = 0;
            last_flush = std::time::Instant::now();
        }
        let set_aside = |reason, detail: String, buf: &[u8]| DeadLetter {
            source: &source_name,
            line: info.line,
            reason,
            detail,
            raw: String::from_utf8_lossy(buf).into_owned(),
        };
        if info.too_large {
            summary.read += 1;
            summary.too_large += 1;
            let detail = format!("line is {} bytes, over the {}-byte limit", info.len, cfg.max_line_bytes);
            outputs.dead_letter(&set_aside("too_large", detail, &buf))?;
            continue;
        }
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        summary.read += 1;
        let value = match serde_json::from_slice::<Value>(&buf) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => {
                summary.invalid += 1;
                outputs.dead_letter(&set_aside("not_object", "line is JSON but not an object".into(), &buf))?;
                continue;
            }
            Err(e) => {
                summary.invalid += 1;
                outputs.dead_letter(&set_aside("invalid_json", e.to_string(), &buf))?;
                continue;
            }
        };
        let event = cfg.event_time.event(value, now_ms());
        if event.time_from_event {
            position.watermark_ms = position.watermark_ms.max(event.time_ms);
        }
        let outcome = engine.process(&event, &mut alerts)?;
        summary.suppressed += u64::from(outcome.suppressed);
        for alert in alerts.drain(..) {
            tracing::info!(rule = %alert.rule_id, entity_type = %alert.entity.type_, alert_id = %alert.alert_id, "alert");
            outputs.alerts.write(&alert).map_err(io_err("alerts", "output"))?;
            summary.alerts += 1;
            summary.risk_alerts += u64::from(alert.rule_id == crate::scoring::RISK_RULE_ID);
        }
        if !outcome.problems.is_empty() {
            summary.incomplete += 1;
            let detail = describe(&outcome.problems);
            outputs.dead_letter(&set_aside("incomplete", detail, &buf))?;
        }
    }
    flush(&mut engine, &mut outputs, &mut position)?;
    Ok(summary)
}

fn describe(problems: &[Problem]) -> String {
    problems.iter().map(|p| format!("rule {}: {}", p.rule_id, p.message)).collect::<Vec<_>>().join("; ")
}

/// Runs the main job until the input ends or `shutdown` completes (then it
/// stops between events, flushes and returns).
pub async fn run(
    cfg: Config,
    opts: RunOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<Summary, RunError> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let mut task = tokio::task::spawn_blocking(move || run_blocking(cfg, &opts, &flag));
    let joined = tokio::select! {
        r = &mut task => r,
        () = shutdown => {
            tracing::info!("shutting down: finishing the current event and flushing");
            stop.store(true, Ordering::Relaxed);
            task.await
        }
    };
    joined.map_err(|e| RunError::Task(e.to_string()))?
}
