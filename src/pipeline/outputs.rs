//! Where a job's results go: the alerts file (or stdout), the alerts
//! topic, and the dead-letter file, with the lengths a checkpoint records.

use super::{io_err, RunError, RunOptions};
use crate::alert::Alert;
use crate::config::{Config, Stream};
use crate::sink::{AlertProducer, DeadLetter, JsonLinesSink};
use crate::state::Checkpoint;
use crate::telemetry::metrics;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub(super) fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The outputs of one job.
pub(super) struct Outputs {
    alerts: Option<JsonLinesSink>,
    alerts_key: Option<String>,
    /// Alerts to a Kafka topic.
    pub(super) producer: Option<AlertProducer>,
    dead: Option<(JsonLinesSink, String)>,
}

impl Outputs {
    /// Opens the file outputs at the lengths `cp` records (cutting back what
    /// a crash left after the last commit).
    pub(super) fn open(cfg: &Config, opts: &RunOptions, cp: &Checkpoint) -> Result<Self, RunError> {
        let alerts_to = opts.alerts.clone().or(cfg.alerts.clone());
        let (alerts, alerts_key) = match &alerts_to {
            None => (None, None),
            Some(Stream::Std) => (Some(JsonLinesSink::stdout()), None),
            Some(Stream::File(p)) => {
                let key = format!("alerts:{}", absolute(p).display());
                let sink = JsonLinesSink::open_file(p, cp.outputs.get(&key).copied())
                    .map_err(io_err("alerts file", &p.display().to_string()))?;
                (Some(sink), Some(key))
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
        Ok(Outputs { alerts, alerts_key, producer: None, dead })
    }

    /// Syncs every file output; returns the lengths to record in the checkpoint.
    pub(super) fn sync(&mut self) -> Result<BTreeMap<String, u64>, RunError> {
        let mut lens = BTreeMap::new();
        if let Some(alerts) = &mut self.alerts {
            let len = alerts.sync().map_err(io_err("alerts", "output"))?;
            if let Some(k) = &self.alerts_key {
                lens.insert(k.clone(), len);
            }
        }
        if let Some((sink, key)) = &mut self.dead {
            lens.insert(key.clone(), sink.sync().map_err(io_err("dead-letter file", key))?);
        }
        Ok(lens)
    }

    /// Writes an alert to the alerts file (or stdout).
    pub(super) fn alert(&mut self, alert: &Alert) -> Result<(), RunError> {
        if let Some(sink) = &mut self.alerts {
            sink.write(alert).map_err(io_err("alerts", "output"))?;
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
        if let Some((sink, key)) = &mut self.dead {
            sink.write(letter).map_err(io_err("dead-letter file", key))?;
        }
        Ok(())
    }
}
