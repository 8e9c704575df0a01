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
//!
//! - [`job`]: what both inputs share: the engine and its cache, the
//!   outputs, admitting an event and emitting its alerts, flushing.
//! - [`file`]: the file or stdin loop (read ahead, progress bar).
//! - [`order`]: events held and applied in event-time order
//!   (`event_time.max_delay`).
//! - [`align`]: records of several partitions taken in event-time order
//!   (`kafka.max_idle`), for the Kafka job and `riskd route`.
//! - [`kafka`]: the Kafka loop: partitions, lanes, rebalances, offsets.
//! - [`retry`]: how transient failures (store, outputs, input) are waited out.
//! - [`outputs`]: the alert and dead-letter files and the alerts topic.

pub(crate) mod align;
mod file;
mod job;
mod kafka;
pub(crate) mod order;
mod outputs;
mod pace;
mod retry;

use crate::config::{Config, Stream};
use crate::shutdown::Shutdown;
use crate::state::{open_store, StateError, Store};
use crate::telemetry::Health;
use serde::Serialize;
use std::fmt;
use std::io;
use std::sync::Arc;

/// How to run: overrides of the config's input and alert output (`--input`,
/// `--alerts`), and live reload.
#[derive(Debug, Default)]
pub struct RunOptions {
    /// Replaces `[source] path`.
    pub input: Option<Stream>,
    /// Replaces `[sink] path`.
    pub alerts: Option<Stream>,
    /// Reload rules and scoring on SIGHUP and when their files change.
    pub watch: bool,
    /// Reloaded configs to swap in (set by the service when `watch` is on).
    pub reloads: Option<std::sync::mpsc::Receiver<Config>>,
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
    /// A file (or the telemetry address) could not be opened at start:
    /// permanent, nothing is read until the operator fixes it.
    #[error("cannot open the {what} {path}: {source}: {}; fix it and start riskd again: it resumes from its last checkpoint", open_advice(source))]
    Open {
        /// Which: input, alerts file, dead-letter file, telemetry endpoint.
        what: &'static str,
        /// Its path (or address).
        path: String,
        /// The OS error.
        source: io::Error,
    },
    /// A file failed while the job ran (reading the input, writing or
    /// syncing an output): retried unless [`io_transient`] says it cannot pass.
    #[error("{what} {path}: {source}{}", run_advice(source))]
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
    /// The config cannot run as it is.
    #[error("{0}")]
    Config(String),
    /// A Kafka client failed (transient or not: see [`crate::kafka::classify`]).
    #[error(transparent)]
    Kafka(#[from] crate::kafka::KafkaFailure),
    /// The processing thread panicked (a bug).
    #[error("processing task failed: {0}")]
    Task(String),
    /// Asked to stop while retrying a transient failure: the work retried
    /// was given up, uncommitted, as a crash would leave it.
    #[error("stopped on request while retrying {what} ({cause}); nothing was committed since the last checkpoint, and the next start resumes from it")]
    Stopped {
        /// What was being retried: `flush`, `load state`, `read input`.
        what: String,
        /// The last failure.
        cause: Box<RunError>,
    },
}

impl RunError {
    /// Whether a later try may succeed (the store or broker unreachable,
    /// throttled or slow, a local file failing during a run): the job then
    /// backs off, reports not-ready and tries again rather than stopping.
    pub fn is_transient(&self) -> bool {
        match self {
            RunError::State(e) => e.is_transient(),
            RunError::Io { source, .. } => io_transient(source),
            RunError::Kafka(k) => k.transient,
            _ => false,
        }
    }

    /// The component and kind of a fault, as `riskd_faults_total` labels them.
    fn fault(&self) -> (&'static str, String) {
        match self {
            RunError::State(StateError::Request(r)) => ("store", r.code.clone()),
            RunError::State(_) => ("store", "backend".into()),
            RunError::Kafka(k) => ("kafka", k.kind.clone()),
            RunError::Io { what: "input", source, .. } | RunError::Open { what: "input", source, .. } => {
                ("input", format!("{:?}", source.kind()))
            }
            RunError::Io { source, .. } | RunError::Open { source, .. } => ("output", format!("{:?}", source.kind())),
            RunError::Stopped { cause, .. } => cause.fault(),
            RunError::Config(_) | RunError::Task(_) => ("job", "internal".into()),
        }
    }
}

/// Whether a local file operation that failed during a run may succeed
/// later — the one place local I/O is classified. Permanent only when the
/// error says it will last: whatever read standard output has gone
/// (`EPIPE`), the file is at its size limit (`EFBIG`), the path cannot be
/// written at an offset (`ESPIPE`). A full disk or quota, an I/O error, a
/// read-only or frozen file system, `EPERM`/`EACCES` on a file already
/// open, `EAGAIN`, `EINTR` and anything unknown are waited out. (A file
/// that cannot be opened at start is [`RunError::Open`]: permanent.)
pub fn io_transient(e: &io::Error) -> bool {
    !matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::FileTooLarge | io::ErrorKind::NotSeekable)
}

/// What to do about a file that cannot be opened.
fn open_advice(e: &io::Error) -> &'static str {
    use io::ErrorKind as K;
    match e.kind() {
        K::PermissionDenied => "give the user riskd runs as the right to create and write it and its folder",
        K::NotFound => "check the path",
        K::IsADirectory => "the path is a folder: name a file",
        K::NotADirectory => "a part of the path is a file, not a folder",
        K::ReadOnlyFilesystem => "its file system is mounted read-only",
        K::StorageFull | K::QuotaExceeded => "free space on its file system",
        K::AddrInUse | K::AddrNotAvailable => "choose another [telemetry] listen address",
        K::InvalidInput => "point the config at the right file",
        _ => "check the path and its file system",
    }
}

/// What to do about a file that failed for good during a run (nothing for
/// a failure that is retried).
fn run_advice(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::BrokenPipe => {
            ": whatever read riskd's output has gone; start riskd again with a reader (it resumes from its last checkpoint)"
        }
        io::ErrorKind::FileTooLarge => {
            ": the file is at the largest size its file system (or RLIMIT_FSIZE) allows; move it aside or raise the limit, then start riskd again"
        }
        io::ErrorKind::NotSeekable => ": riskd needs a regular file here (`-` for standard output)",
        _ => "",
    }
}

fn io_err<'a>(what: &'static str, path: &'a str) -> impl FnOnce(io::Error) -> RunError + 'a {
    move |source| RunError::Io { what, path: path.to_string(), source }
}

fn open_err<'a>(what: &'static str, path: &'a str) -> impl FnOnce(io::Error) -> RunError + 'a {
    move |source| RunError::Open { what, path: path.to_string(), source }
}

/// Runs the main job on a given store (tests hand in stores that fail):
/// from Kafka when the config says so and no input file is given, else
/// from the file or stdin.
pub fn run_with_store(
    cfg: Config,
    opts: RunOptions,
    store: Box<dyn Store>,
    shutdown: Shutdown,
    health: Arc<Health>,
) -> Result<Summary, RunError> {
    health.rules_loaded();
    if cfg.from_kafka && opts.input.is_none() {
        kafka::run(cfg, opts, store, shutdown, health)
    } else {
        file::run(cfg, opts, store, shutdown, health)
    }
}

/// Runs the main job to the end of the input (or, following a file or
/// reading Kafka, until `shutdown` is triggered), on the configured store.
pub fn run_blocking(cfg: Config, opts: RunOptions, shutdown: Shutdown) -> Result<Summary, RunError> {
    let store = open_store(&cfg.store)?;
    run_with_store(cfg, opts, store, shutdown, Health::new())
}

/// `f` over `items`, split over `threads` threads, results in order.
pub(super) fn parallel_map<T: Sync, R: Send>(items: &[T], threads: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    if threads <= 1 || items.len() < 64 {
        return items.iter().map(&f).collect();
    }
    let chunk = items.len().div_ceil(threads);
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> =
            items.chunks(chunk).map(|c| s.spawn(move || c.iter().map(f).collect::<Vec<R>>())).collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Checkpoint, EmbeddedStore, Record, WriteBatch};
    use std::path::Path;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An embedded store that "crashes" (fails for good) at its nth apply.
    struct CrashAt {
        inner: EmbeddedStore,
        applies_left: Arc<AtomicUsize>,
    }

    impl Store for CrashAt {
        fn kind(&self) -> &'static str {
            "crash-at"
        }
        fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Record>>, StateError> {
            self.inner.get_many(keys)
        }
        fn apply(&mut self, batch: WriteBatch<'_>) -> Result<(), StateError> {
            if self.applies_left.fetch_sub(1, Ordering::SeqCst) == 0 {
                // Not a Backend error: the job gives up at once, as on a crash.
                return Err(StateError::Corrupt {
                    store: "crash-at",
                    key: String::new(),
                    message: "simulated crash".into(),
                });
            }
            self.inner.apply(batch)
        }
        fn checkpoint(&self, source: &str) -> Result<Option<Checkpoint>, StateError> {
            self.inner.checkpoint(source)
        }
        fn scan(&self, prefix: &str, visit: &mut dyn FnMut(&str, &Record)) -> Result<(), StateError> {
            self.inner.scan(prefix, visit)
        }
    }

    fn config(dir: &Path, input: &Path) -> Config {
        let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/rules");
        let text = format!(
            "[source]\npath = {:?}\n[sink]\npath = \"alerts.jsonl\"\n[store]\npath = \"s.redb\"\nflush_every_events = 97\n[rules]\npaths = [{:?}]\n[telemetry]\nlisten = \"\"\n[event_time]\nmax_delay = \"1m\"\n",
            input.display().to_string(),
            rules.display().to_string()
        );
        std::fs::write(dir.join("riskd.toml"), text).unwrap();
        Config::load(&dir.join("riskd.toml")).unwrap()
    }

    fn outcome(dir: &Path) -> (String, String) {
        let store = EmbeddedStore::open(&dir.join("s.redb")).unwrap();
        let mut state = Vec::new();
        crate::state::export(&store, &mut state).unwrap();
        (std::fs::read_to_string(dir.join("alerts.jsonl")).unwrap(), String::from_utf8(state).unwrap())
    }

    #[test]
    fn local_io_is_transient_during_a_run_unless_it_says_it_will_last() {
        use io::ErrorKind as K;
        let during = |e: io::Error| RunError::Io { what: "alerts file", path: "a.jsonl".into(), source: e };
        for kind in [K::StorageFull, K::QuotaExceeded, K::ReadOnlyFilesystem, K::PermissionDenied, K::Interrupted] {
            assert!(during(kind.into()).is_transient(), "{kind:?}");
        }
        for errno in [5, 11, 28, 30, 122] {
            // EIO, EAGAIN, ENOSPC, EROFS, EDQUOT
            assert!(during(io::Error::from_raw_os_error(errno)).is_transient(), "errno {errno}");
        }
        for kind in [K::BrokenPipe, K::FileTooLarge, K::NotSeekable] {
            assert!(!during(kind.into()).is_transient(), "{kind:?}");
        }
        let pipe = during(K::BrokenPipe.into()).to_string();
        assert!(pipe.contains("whatever read riskd's output has gone"), "{pipe}");
        // At start, a file that cannot be opened stops the job, saying what to do.
        let open = RunError::Open { what: "dead-letter file", path: "d".into(), source: K::IsADirectory.into() };
        assert!(!open.is_transient());
        assert!(open.to_string().starts_with("cannot open the dead-letter file d: "), "{open}");
        assert!(open.to_string().contains("the path is a folder: name a file; fix it and start riskd again"), "{open}");
        assert_eq!(open.fault(), ("output", "IsADirectory".to_string()));
        let stopped = RunError::Stopped { what: "flush".into(), cause: Box::new(during(K::StorageFull.into())) };
        assert!(!stopped.is_transient());
        assert_eq!(stopped.fault(), ("output", "StorageFull".to_string()));
    }

    #[test]
    fn a_crash_at_any_flush_then_resume_equals_one_uninterrupted_run() {
        let work = tempfile::tempdir().unwrap();
        let input = work.path().join("events.jsonl");
        let spec = crate::generate::Spec { events: 3000, users: 40, attack_every: 40, ..Default::default() };
        crate::generate::write_stream(&spec, &mut std::fs::File::create(&input).unwrap()).unwrap();
        let reference = work.path().join("reference");
        std::fs::create_dir(&reference).unwrap();
        let summary = run_blocking(config(&reference, &input), RunOptions::default(), Shutdown::new()).unwrap();
        assert!(summary.alerts > 50, "{summary}");
        let expected = outcome(&reference);
        // 3000 lines, a commit every 97: crash at several of them, the last included.
        for crash_at in [0, 1, 2, 7, 15, 31] {
            let dir = work.path().join(format!("crash{crash_at}"));
            std::fs::create_dir(&dir).unwrap();
            let store = CrashAt {
                inner: EmbeddedStore::open(&dir.join("s.redb")).unwrap(),
                applies_left: Arc::new(AtomicUsize::new(crash_at)),
            };
            let stop = Shutdown::new();
            let crashed = run_with_store(
                config(&dir, &input),
                RunOptions::default(),
                Box::new(store),
                stop.clone(),
                Health::new(),
            );
            assert!(crashed.is_err(), "crash at commit {crash_at} did not happen");
            if crash_at > 1 {
                // Events 100 ms apart, held a minute: the commit stood before held events.
                let store = EmbeddedStore::open(&dir.join("s.redb")).unwrap();
                let id = format!("file:{}", std::path::absolute(&input).unwrap().display());
                let cp = store.checkpoint(&id).unwrap().unwrap();
                assert!(cp.read.is_some_and(|(_, line)| line > cp.line), "events were held: {cp:?}");
            }
            let resumed = run_blocking(config(&dir, &input), RunOptions::default(), stop.clone()).unwrap();
            // Commit 0 records where the outputs start; then one every 97 lines.
            assert_eq!(
                resumed.resumed_after_line,
                97 * crash_at.saturating_sub(1) as u64,
                "resumed from the last commit"
            );
            assert!(outcome(&dir) == expected, "crash at commit {crash_at}: state or alerts differ");
        }
    }
}
