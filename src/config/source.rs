//! Where events come from and alerts go: `[source]`, `[sink]`, and how an
//! event's time is found (`[event_time]`).

use super::spans::Section;
use super::Stream;
use crate::event::{parse_time_ms, EventTime, FieldPath, DEFAULT_MAX_DELAY, DEFAULT_MAX_FUTURE_MS, DEFAULT_MIN_MS};
use serde::Deserialize;
use std::path::Path;

/// `[source]`: a JSON-lines file or stdin, or Kafka.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceFile {
    /// `file` (a path, or `-` for stdin: the default) or `kafka` (see `[kafka]`).
    #[serde(default = "file_kind")]
    pub kind: String,
    /// JSON-lines file to read; `-` reads standard input.
    #[serde(default = "dash")]
    pub path: String,
    /// Longer lines are set aside as too large.
    #[serde(default = "one_mib")]
    pub max_line_bytes: usize,
    /// File that receives every line set aside, with the reason; none when absent.
    #[serde(default)]
    pub dead_letter: Option<String>,
    /// At the end of a file, wait for more lines (as `tail -f`) until stopped.
    #[serde(default)]
    pub follow: bool,
    /// Threads decoding lines read ahead from a file or stdin (Kafka
    /// messages are decoded by `kafka.lanes` threads); by default the CPUs
    /// less one, the one that applies the events.
    #[serde(default)]
    pub decode_threads: Option<usize>,
}

/// `source.decode_threads` by default: one CPU applies events in order
/// while the others decode (one at least).
pub fn decode_threads(file: &SourceFile) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    file.decode_threads.unwrap_or(cpus.saturating_sub(1)).max(1)
}

fn file_kind() -> String {
    "file".into()
}
fn dash() -> String {
    "-".into()
}
fn one_mib() -> usize {
    1 << 20
}

/// `[sink]`: where alerts are written as JSON lines.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkFile {
    /// File to append alerts to; `-` writes standard output (the default,
    /// unless alerts go to `kafka.alerts_topic`).
    #[serde(default)]
    pub path: Option<String>,
}

/// `[event_time]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventTimeFile {
    /// Field paths tried in order; the first holding a readable time wins,
    /// else the time of ingest is used.
    #[serde(default = "time_fields")]
    pub fields: Vec<String>,
    /// An event time this far after the time of ingest cannot be true
    /// (clock skew allowed); such a time is replaced by the latest trusted one.
    #[serde(default = "five_minutes")]
    pub max_future: String,
    /// An event time before this (RFC 3339) cannot be true either.
    #[serde(default = "year_2000")]
    pub min: String,
    /// Out-of-orderness absorbed: events are held up to this long (event
    /// time, or wall clock) and applied in event-time order; `0s` applies
    /// them as they arrive.
    #[serde(default = "no_delay")]
    pub max_delay: String,
}

fn no_delay() -> String {
    "0s".into()
}

fn five_minutes() -> String {
    "5m".into()
}

fn year_2000() -> String {
    "2000-01-01T00:00:00Z".into()
}

fn time_fields() -> Vec<String> {
    ["p_event_time", "eventTime", "published"].map(String::from).to_vec()
}

/// Checks the settings of `[source]` but its `kind` (see [`from_kafka`]).
pub(super) fn check(file: &SourceFile, err: &mut Section) {
    if file.decode_threads == Some(0) {
        err.at("decode_threads", "source.decode_threads must be at least 1 (or absent: the CPUs less one)".into());
    }
    if file.max_line_bytes == 0 {
        err.at("max_line_bytes", "source.max_line_bytes must be at least 1".into());
    }
}

/// Whether events come from Kafka (`kind = "kafka"`) rather than a file.
pub(super) fn from_kafka(file: &SourceFile, err: &mut Section) -> bool {
    match file.kind.as_str() {
        "file" => false,
        "kafka" => true,
        other => {
            err.at("kind", format!("source.kind {other:?} is not one of file, kafka"));
            false
        }
    }
}

/// Where alerts are written: `[sink] path`, else standard output unless
/// they go to a Kafka topic (`to_kafka`).
pub(super) fn alerts(file: &SinkFile, base: &Path, to_kafka: bool) -> Option<Stream> {
    match &file.path {
        Some(p) => Some(Stream::parse(p, base)),
        None if to_kafka => None,
        None => Some(Stream::Std),
    }
}

/// The field paths of `[event_time]`, each malformed one reported.
pub(super) fn event_time(file: &EventTimeFile, err: &mut Section) -> EventTime {
    let mut fields = Vec::new();
    for (i, f) in file.fields.iter().enumerate() {
        match FieldPath::parse(f) {
            Ok(p) => fields.push(p),
            Err(e) => err.at_path(&["fields", &i.to_string()], format!("event_time.fields: {e}")),
        }
    }
    let max_future_ms = match humantime::parse_duration(&file.max_future) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => {
            err.at("max_future", format!("event_time.max_future {:?}: {e}", file.max_future));
            DEFAULT_MAX_FUTURE_MS
        }
    };
    let min_ms = match parse_time_ms(&serde_json::Value::String(file.min.clone())) {
        Some(t) => t,
        None => {
            err.at("min", format!("event_time.min {:?} is not a time (RFC 3339, e.g. 2000-01-01T00:00:00Z)", file.min));
            DEFAULT_MIN_MS
        }
    };
    let max_delay = match humantime::parse_duration(&file.max_delay) {
        Ok(d) => d,
        Err(e) => {
            err.at("max_delay", format!("event_time.max_delay {:?}: {e}", file.max_delay));
            DEFAULT_MAX_DELAY
        }
    };
    EventTime::new(fields).with_bounds(max_future_ms, min_ms).with_max_delay(max_delay)
}
