//! Configuration: the service config (`riskd.toml`) and the rule files it
//! points at. Loading is two-phase: serde parses (unknown keys are errors),
//! then everything is validated and every rule compiled, and *all* problems
//! are reported together, each with file, line and rule id.
//!
//! Relative paths in `riskd.toml` are taken from the folder the file is in.

mod rule_files;

use crate::event::{EventTime, FieldPath};
use crate::rules::Rule;
use serde::Deserialize;
use std::fmt;
use std::path::{Path, PathBuf};

/// One problem in the configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    /// The file at fault.
    pub file: PathBuf,
    /// 1-based line, where known.
    pub line: Option<usize>,
    /// The rule at fault, where there is one.
    pub rule: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(rule) = &self.rule {
            write!(f, ": rule {rule}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found while loading; the config is rejected whole.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration ({} error{}):", self.0.len(), if self.0.len() == 1 { "" } else { "s" })?;
        for e in &self.0 {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

/// `riskd.toml`, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Where events come from.
    #[serde(default)]
    pub source: SourceFile,
    /// Where alerts go.
    #[serde(default)]
    pub sink: SinkFile,
    /// Where state is kept.
    #[serde(default)]
    pub store: StoreFile,
    /// Which rules run.
    #[serde(default)]
    pub rules: RulesFile,
    /// How an event's time is found.
    #[serde(default)]
    pub event_time: EventTimeFile,
}

/// `[source]`: a JSON-lines file or stdin.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceFile {
    /// JSON-lines file to read; `-` reads standard input.
    #[serde(default = "dash")]
    pub path: String,
    /// Longer lines are set aside as too large.
    #[serde(default = "one_mib")]
    pub max_line_bytes: usize,
    /// File that receives every line set aside, with the reason; none when absent.
    #[serde(default)]
    pub dead_letter: Option<String>,
}

impl Default for SourceFile {
    fn default() -> Self {
        Self { path: dash(), max_line_bytes: one_mib(), dead_letter: None }
    }
}

/// `[sink]`: where alerts are written as JSON lines.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkFile {
    /// File to append alerts to; `-` writes standard output.
    #[serde(default = "dash")]
    pub path: String,
}

impl Default for SinkFile {
    fn default() -> Self {
        Self { path: dash() }
    }
}

/// `[store]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreFile {
    /// `embedded` (on disk, the default) or `memory` (lost at exit).
    #[serde(default = "embedded")]
    pub kind: String,
    /// Database file of the embedded store.
    #[serde(default = "default_db")]
    pub path: String,
    /// State and checkpoint are flushed after this many events…
    #[serde(default = "hundred_thousand")]
    pub flush_every_events: u64,
    /// …or this long after the last flush, whichever comes first (and at the end).
    #[serde(default = "two_seconds")]
    pub flush_interval: String,
    /// Clean cache entries kept after a flush; beyond it the cache is emptied.
    #[serde(default = "million")]
    pub cache_max_entries: usize,
}

impl Default for StoreFile {
    fn default() -> Self {
        Self {
            kind: embedded(),
            path: default_db(),
            flush_every_events: hundred_thousand(),
            flush_interval: two_seconds(),
            cache_max_entries: million(),
        }
    }
}

/// `[rules]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesFile {
    /// Rule files, or folders whose `*.yaml`/`*.yml` files are all loaded
    /// (in name order; `*.test.yaml` files are rule tests, not rules).
    #[serde(default = "rules_dir")]
    pub paths: Vec<String>,
}

impl Default for RulesFile {
    fn default() -> Self {
        Self { paths: rules_dir() }
    }
}

/// `[event_time]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventTimeFile {
    /// Field paths tried in order; the first holding a readable time wins,
    /// else the time of ingest is used.
    #[serde(default = "time_fields")]
    pub fields: Vec<String>,
}

impl Default for EventTimeFile {
    fn default() -> Self {
        Self { fields: time_fields() }
    }
}

fn dash() -> String {
    "-".into()
}
fn one_mib() -> usize {
    1 << 20
}
fn embedded() -> String {
    "embedded".into()
}
fn default_db() -> String {
    "riskd.redb".into()
}
fn hundred_thousand() -> u64 {
    100_000
}
fn two_seconds() -> String {
    "2s".into()
}
fn million() -> usize {
    1_000_000
}
fn rules_dir() -> Vec<String> {
    vec!["rules".into()]
}
fn time_fields() -> Vec<String> {
    ["p_event_time", "eventTime", "published"].map(String::from).to_vec()
}

/// A file path, or the standard stream (`-`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stream {
    /// Standard input or output.
    Std,
    /// A file.
    File(PathBuf),
}

impl Stream {
    /// `-` is the standard stream; anything else a path, relative to `base`.
    pub fn parse(text: &str, base: &Path) -> Self {
        if text == "-" {
            Stream::Std
        } else {
            Stream::File(base.join(text))
        }
    }
}

/// Which store holds state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreKind {
    /// In memory, gone at exit.
    Memory,
    /// redb file.
    Embedded(PathBuf),
}

/// The validated configuration riskd runs with.
#[derive(Debug)]
pub struct Config {
    /// The file it was loaded from.
    pub path: PathBuf,
    /// Input.
    pub input: Stream,
    /// Longest accepted line.
    pub max_line_bytes: usize,
    /// Dead-letter file.
    pub dead_letter: Option<PathBuf>,
    /// Alert output.
    pub alerts: Stream,
    /// State store.
    pub store: StoreKind,
    /// Events between flushes.
    pub flush_every_events: u64,
    /// Wall-clock time between flushes.
    pub flush_interval: std::time::Duration,
    /// Cache bound.
    pub cache_max_entries: usize,
    /// Event time.
    pub event_time: EventTime,
    /// Compiled rules, in evaluation order (file name, then position in file).
    pub rules: Vec<Rule>,
}

impl Config {
    /// Reads and validates `path` and every rule file it names.
    pub fn load(path: &Path) -> Result<Self, ConfigErrors> {
        let at =
            |line, message| ConfigErrors(vec![ConfigError { file: path.to_path_buf(), line, rule: None, message }]);
        let text = std::fs::read_to_string(path).map_err(|e| at(None, format!("cannot read: {e}")))?;
        let file: ConfigFile = toml::from_str(&text).map_err(|e| {
            let line = e.span().map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            at(line, e.message().to_string())
        })?;
        Self::build(path, &text, file)
    }

    fn build(path: &Path, text: &str, file: ConfigFile) -> Result<Self, ConfigErrors> {
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let mut errors = Vec::new();
        let mut err = |key: &str, message: String| {
            let line = text.lines().position(|l| l.trim_start().starts_with(key)).map(|i| i + 1);
            errors.push(ConfigError { file: path.to_path_buf(), line, rule: None, message });
        };
        let store = match file.store.kind.as_str() {
            "embedded" => StoreKind::Embedded(base.join(&file.store.path)),
            "memory" => StoreKind::Memory,
            other => {
                err("kind", format!("store.kind {other:?} is not one of embedded, memory"));
                StoreKind::Memory
            }
        };
        if file.store.flush_every_events == 0 {
            err("flush_every_events", "store.flush_every_events must be at least 1".into());
        }
        let flush_interval = match humantime::parse_duration(&file.store.flush_interval) {
            Ok(d) if !d.is_zero() => d,
            _ => {
                err(
                    "flush_interval",
                    format!(
                        "store.flush_interval {:?} is not a duration above zero, e.g. 2s",
                        file.store.flush_interval
                    ),
                );
                std::time::Duration::from_secs(2)
            }
        };
        if file.source.max_line_bytes == 0 {
            err("max_line_bytes", "source.max_line_bytes must be at least 1".into());
        }
        let mut time_fields = Vec::new();
        for f in &file.event_time.fields {
            match FieldPath::parse(f) {
                Ok(p) => time_fields.push(p),
                Err(e) => err("fields", format!("event_time.fields: {e}")),
            }
        }
        if file.rules.paths.is_empty() {
            err("paths", "rules.paths is empty: riskd would have no rules".into());
        }
        let rule_paths: Vec<PathBuf> = file.rules.paths.iter().map(|p| base.join(p)).collect();
        let rules = rule_files::load(&rule_paths, &mut errors);
        if rules.is_empty() && errors.is_empty() {
            errors.push(ConfigError {
                file: path.to_path_buf(),
                line: None,
                rule: None,
                message: "no rules found under rules.paths".into(),
            });
        }
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        Ok(Config {
            path: path.to_path_buf(),
            input: Stream::parse(&file.source.path, &base),
            max_line_bytes: file.source.max_line_bytes,
            dead_letter: file.source.dead_letter.map(|p| base.join(p)),
            alerts: Stream::parse(&file.sink.path, &base),
            store,
            flush_every_events: file.store.flush_every_events,
            flush_interval,
            cache_max_entries: file.store.cache_max_entries,
            event_time: EventTime::new(time_fields),
            rules,
        })
    }
}
