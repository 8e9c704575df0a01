//! Where a job's results go: the alerts file (or stdout), the alerts
//! topic, and the dead-letter file, with the lengths a checkpoint records.
//!
//! Lines wait in memory until the flush syncs them (see [`crate::sink`]):
//! writing an alert or a dead letter never fails, and a sync that fails is
//! retried with the flush, never losing or repeating a line. The job
//! flushes early once more than [`PENDING_MAX`] bytes wait.

use super::{io_err, open_err, RunError, RunOptions};
use crate::alert::Alert;
use crate::config::{Config, Stream};
use crate::sink::{AlertProducer, DeadLetter, JsonLinesSink};
use crate::state::Checkpoint;
use crate::telemetry::metrics;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Bytes of alerts and dead letters held in memory before the job flushes
/// early (as it does when the cache is over its bounds).
pub(super) const PENDING_MAX: usize = 16 << 20;

pub(super) fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// A file output (or stdout): the sink, what it is and where, for
/// messages, and its key in the checkpoint (none for stdout).
struct Output {
    sink: JsonLinesSink,
    what: &'static str,
    path: String,
    key: Option<String>,
}

impl Output {
    fn open(what: &'static str, prefix: &str, p: &Path, cp: &Checkpoint) -> Result<Self, RunError> {
        let key = format!("{prefix}:{}", absolute(p).display());
        let path = p.display().to_string();
        let sink = JsonLinesSink::open_file(p, cp.outputs.get(&key).copied()).map_err(open_err(what, &path))?;
        Ok(Output { sink, what, path, key: Some(key) })
    }

    fn write<T: serde::Serialize>(&mut self, record: &T) -> Result<(), RunError> {
        self.sink.write(record).map_err(|e| RunError::Task(format!("encoding a line for the {}: {e}", self.what)))
    }

    fn sync(&mut self, lens: &mut BTreeMap<String, u64>) -> Result<(), RunError> {
        let len = self.sink.sync().map_err(io_err(self.what, &self.path))?;
        if let Some(key) = &self.key {
            lens.insert(key.clone(), len);
        }
        Ok(())
    }
}

/// The outputs of one job.
pub(super) struct Outputs {
    alerts: Option<Output>,
    /// Alerts to a Kafka topic.
    pub(super) producer: Option<AlertProducer>,
    dead: Option<Output>,
}

impl Outputs {
    /// Opens the file outputs at the lengths `cp` records (cutting back what
    /// a crash left after the last commit). A file that cannot be opened
    /// stops the job before it reads anything: the operator must fix it.
    pub(super) fn open(cfg: &Config, opts: &RunOptions, cp: &Checkpoint) -> Result<Self, RunError> {
        let alerts = match opts.alerts.as_ref().or(cfg.alerts.as_ref()) {
            None => None,
            Some(Stream::Std) => Some(Output {
                sink: JsonLinesSink::stdout(),
                what: "alerts",
                path: "(standard output)".into(),
                key: None,
            }),
            Some(Stream::File(p)) => Some(Output::open("alerts file", "alerts", p, cp)?),
        };
        let dead = match &cfg.dead_letter {
            None => None,
            Some(p) => Some(Output::open("dead-letter file", "dead_letter", p, cp)?),
        };
        Ok(Outputs { alerts, producer: None, dead })
    }

    /// Syncs every file output; returns the lengths to record in the checkpoint.
    pub(super) fn sync(&mut self) -> Result<BTreeMap<String, u64>, RunError> {
        let mut lens = BTreeMap::new();
        for out in [&mut self.alerts, &mut self.dead].into_iter().flatten() {
            out.sync(&mut lens)?;
        }
        Ok(lens)
    }

    /// Whether more lines wait in memory than [`PENDING_MAX`]: flush.
    pub(super) fn over_bounds(&self) -> bool {
        let pending = |o: &Option<Output>| o.as_ref().map_or(0, |o| o.sink.pending_bytes());
        pending(&self.alerts) + pending(&self.dead) > PENDING_MAX
    }

    /// Writes an alert to the alerts file (or stdout).
    pub(super) fn alert(&mut self, alert: &Alert) -> Result<(), RunError> {
        if let Some(out) = &mut self.alerts {
            out.write(alert)?;
        }
        Ok(())
    }

    /// Queues an alert for the alerts topic (when there is one); a failure
    /// leaves it unqueued, so it can be tried again.
    pub(super) fn produce(&self, alert: &Alert) -> Result<(), RunError> {
        if let Some(producer) = &self.producer {
            producer.send(alert)?;
        }
        Ok(())
    }

    pub(super) fn dead_letter(&mut self, letter: &DeadLetter<'_>) -> Result<(), RunError> {
        tracing::warn!(source = letter.source, line = letter.line, reason = letter.reason, detail = %letter.detail, "event set aside");
        metrics().dead_letters.with_label_values(&[letter.reason]).inc();
        if let Some(out) = &mut self.dead {
            out.write(letter)?;
        }
        Ok(())
    }
}
