//! Configuration: the service config (`riskd.toml`) and the rule files it
//! points at. Loading is two-phase: serde parses (unknown keys are errors),
//! then everything is validated and every rule compiled, and *all* problems
//! are reported together, each with file, line and rule id.
//!
//! Relative paths in `riskd.toml` are taken from the folder the file is in.

mod kafka;
mod rule_files;

pub use kafka::{Consume, KafkaConfig, KafkaFile};
pub use rule_files::Override;

use crate::alert::Severity;
use crate::event::{EventTime, FieldPath};
use crate::rules::Rule;
use crate::scoring::{default_bands, Modifier, ScoringConfig, TypePolicy};
use crate::state::dynamodb::{DynamoConfig, DEFAULT_TABLE};
pub use crate::state::StoreKind;
use serde::Deserialize;
use std::collections::BTreeMap;
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
    /// How rule alerts add up to entity risk.
    #[serde(default)]
    pub scoring: ScoringFile,
    /// Metrics, health endpoints, logs.
    #[serde(default)]
    pub telemetry: TelemetryFile,
    /// Kafka: the broker, the consumer group, topics.
    #[serde(default)]
    pub kafka: Option<KafkaFile>,
}

/// `[telemetry]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryFile {
    /// Address of `/metrics`, `/healthz` and `/readyz`; `""` turns the endpoint off.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Log level (`error`, `warn`, `info`, `debug`, or a `tracing` filter); `RUST_LOG` wins.
    #[serde(default = "warn")]
    pub log_level: String,
}

impl Default for TelemetryFile {
    fn default() -> Self {
        Self { listen: default_listen(), log_level: warn() }
    }
}

fn default_listen() -> String {
    "127.0.0.1:9464".into()
}

fn warn() -> String {
    "warn".into()
}

/// `[scoring]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoringFile {
    /// Contributions whose decayed value falls below this many points are dropped.
    #[serde(default = "half_point")]
    pub floor: f64,
    /// Policy of every entity type not listed under `types`.
    #[serde(default)]
    pub defaults: TypeFile,
    /// Policy per entity type (`[scoring.types.user]`); unset keys come from `defaults`.
    #[serde(default)]
    pub types: BTreeMap<String, TypeFile>,
    /// Point multipliers for matching entities (`[[scoring.modifiers]]`).
    #[serde(default)]
    pub modifiers: Vec<ModifierFile>,
}

impl Default for ScoringFile {
    fn default() -> Self {
        Self { floor: half_point(), defaults: TypeFile::default(), types: BTreeMap::new(), modifiers: Vec::new() }
    }
}

fn half_point() -> f64 {
    0.5
}

/// How one entity type is scored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TypeFile {
    /// Score that raises an `entity_risk` alert (default 100).
    pub threshold: Option<f64>,
    /// A disarmed entity re-arms when a contribution finds its score below
    /// this (default: half the threshold).
    pub rearm_below: Option<f64>,
    /// Half-life of a contribution (default 24h).
    pub half_life: Option<String>,
    /// Severity by score, e.g. `[{min_score = 100, severity = "MEDIUM"}, {min_score = 200, severity = "HIGH"}]`
    /// (default: MEDIUM at the threshold, HIGH at 1.5×, CRITICAL at 3×).
    pub bands: Option<Vec<BandFile>>,
}

/// One severity band.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BandFile {
    /// Lowest score of the band.
    pub min_score: f64,
    /// Severity of risk alerts in it.
    pub severity: String,
}

/// A point multiplier.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModifierFile {
    /// Entity type it applies to; all types when absent.
    #[serde(default)]
    pub entity_type: Option<String>,
    /// Entity ids or glob patterns (`admin-*`).
    pub ids: Vec<String>,
    /// Factor on the points (2 doubles, 0 ignores the entity).
    pub multiply: f64,
}

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
}

impl Default for SourceFile {
    fn default() -> Self {
        Self { kind: file_kind(), path: dash(), max_line_bytes: one_mib(), dead_letter: None, follow: false }
    }
}

/// `[sink]`: where alerts are written as JSON lines.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkFile {
    /// File to append alerts to; `-` writes standard output (the default,
    /// unless alerts go to `kafka.alerts_topic`).
    #[serde(default)]
    pub path: Option<String>,
}

/// `[store]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreFile {
    /// `embedded` (on disk, the default), `dynamodb` or `memory` (lost at exit).
    #[serde(default = "embedded")]
    pub kind: String,
    /// Database file of the embedded store (default `riskd.redb`).
    #[serde(default)]
    pub path: Option<String>,
    /// DynamoDB table (default `panther-kv-store`).
    #[serde(default)]
    pub table: Option<String>,
    /// AWS region of the table; the standard AWS chain's when absent.
    #[serde(default)]
    pub region: Option<String>,
    /// DynamoDB endpoint instead of AWS's, e.g. DynamoDB Local's `http://127.0.0.1:8000`.
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// Whether the table deletes expired items with DynamoDB's TTL on
    /// `expiresAt` (default true). TTL runs on wall-clock time: turn it off
    /// for a table that replays events older than their state's lifetime.
    #[serde(default)]
    pub ttl: Option<bool>,
    /// DynamoDB read requests (BatchGetItem, Scan, …) per second at most; no limit when absent.
    #[serde(default)]
    pub read_requests_per_second: Option<u32>,
    /// DynamoDB write requests (BatchWriteItem, TransactWriteItems, …) per second at most; no limit when absent.
    #[serde(default)]
    pub write_requests_per_second: Option<u32>,
    /// State and checkpoint are flushed after this many events…
    #[serde(default = "hundred_thousand")]
    pub flush_every_events: u64,
    /// …or this long after the last flush, whichever comes first (and at the end).
    #[serde(default = "two_seconds")]
    pub flush_interval: String,
    /// Entries the write-back cache may hold; past it (or `cache_max_bytes`)
    /// the job flushes early and the cache evicts its least recently used clean entries.
    #[serde(default = "million")]
    pub cache_max_entries: usize,
    /// Approximate bytes the write-back cache may hold (default 1 GiB).
    #[serde(default = "one_gib")]
    pub cache_max_bytes: usize,
    /// Embedded store: records that expired this long (event time) before
    /// the latest event seen are deleted from the file, about once an hour
    /// of running; absent or `"off"` keeps them. (DynamoDB's TTL does this
    /// itself.)
    #[serde(default)]
    pub purge_after: Option<String>,
}

impl Default for StoreFile {
    fn default() -> Self {
        Self {
            kind: embedded(),
            path: None,
            table: None,
            region: None,
            endpoint_url: None,
            ttl: None,
            read_requests_per_second: None,
            write_requests_per_second: None,
            flush_every_events: hundred_thousand(),
            flush_interval: two_seconds(),
            cache_max_entries: million(),
            cache_max_bytes: one_gib(),
            purge_after: None,
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

fn file_kind() -> String {
    "file".into()
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
fn hundred_thousand() -> u64 {
    100_000
}
fn two_seconds() -> String {
    "2s".into()
}
fn one_gib() -> usize {
    1 << 30
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
    /// Wait for more lines at the end of a file.
    pub follow: bool,
    /// Alert output; none when alerts only go to a Kafka topic.
    pub alerts: Option<Stream>,
    /// Kafka settings, when `[kafka]` is present.
    pub kafka: Option<KafkaConfig>,
    /// Events come from Kafka (`source.kind = "kafka"`), not `input`.
    pub from_kafka: bool,
    /// State store.
    pub store: StoreKind,
    /// Events between flushes.
    pub flush_every_events: u64,
    /// Wall-clock time between flushes.
    pub flush_interval: std::time::Duration,
    /// Cache bound.
    pub cache_max_entries: usize,
    /// Cache bound, bytes.
    pub cache_max_bytes: usize,
    /// Delete stored records expired this long before the watermark (event
    /// time); `None`: never.
    pub purge_after: Option<std::time::Duration>,
    /// Event time.
    pub event_time: EventTime,
    /// Compiled rules, in evaluation order (file name, then position in file);
    /// shared by the engine and the HTTP API.
    pub rules: std::sync::Arc<Vec<Rule>>,
    /// The rule files and folders (where `riskd test` looks for tests).
    pub rule_paths: Vec<PathBuf>,
    /// Entity risk scoring.
    pub scoring: ScoringConfig,
    /// Telemetry endpoint address, if on.
    pub listen: Option<std::net::SocketAddr>,
    /// Default log filter.
    pub log_level: String,
}

impl Config {
    /// Reads and validates `path` and every rule file it names.
    pub fn load(path: &Path) -> Result<Self, ConfigErrors> {
        Self::load_with(path, &[])
    }

    /// As [`load`](Self::load), with rule settings overridden (`--set`).
    pub fn load_with(path: &Path, overrides: &[Override]) -> Result<Self, ConfigErrors> {
        let at =
            |line, message| ConfigErrors(vec![ConfigError { file: path.to_path_buf(), line, rule: None, message }]);
        let text = std::fs::read_to_string(path).map_err(|e| at(None, format!("cannot read: {e}")))?;
        let file: ConfigFile = toml::from_str(&text).map_err(|e| {
            let line = e.span().map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            at(line, e.message().to_string())
        })?;
        Self::build(path, &text, file, overrides)
    }

    fn build(path: &Path, text: &str, file: ConfigFile, overrides: &[Override]) -> Result<Self, ConfigErrors> {
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let mut errors = Vec::new();
        let mut err = |key: &str, message: String| {
            let line = text.lines().position(|l| l.trim_start().starts_with(key)).map(|i| i + 1);
            errors.push(ConfigError { file: path.to_path_buf(), line, rule: None, message });
        };
        let store = store_kind(&file.store, &base, &mut err);
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
        let purge_after = match (file.store.purge_after.as_deref(), &store) {
            (Some("off") | None, _) => None,
            (Some(_), StoreKind::DynamoDb(_)) => {
                err(
                    "purge_after",
                    "store.purge_after does not apply to DynamoDB (its TTL deletes expired items)".into(),
                );
                None
            }
            (Some(text), _) => match humantime::parse_duration(text) {
                Ok(d) => Some(d),
                Err(_) => {
                    err("purge_after", format!("store.purge_after {text:?} is not a duration such as 7d, or \"off\""));
                    None
                }
            },
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
        let scoring = scoring_config(&file.scoring, &mut err);
        let listen = match file.telemetry.listen.trim() {
            "" => None,
            addr => match addr.parse::<std::net::SocketAddr>() {
                Ok(a) => Some(a),
                Err(e) => {
                    err("listen", format!("telemetry.listen {addr:?} is not an address such as 127.0.0.1:9464: {e}"));
                    None
                }
            },
        };
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&file.telemetry.log_level) {
            err("log_level", format!("telemetry.log_level {:?}: {e}", file.telemetry.log_level));
        }
        if file.rules.paths.is_empty() {
            err("paths", "rules.paths is empty: riskd would have no rules".into());
        }
        let rule_paths: Vec<PathBuf> = file.rules.paths.iter().map(|p| base.join(p)).collect();
        let rules = rule_files::load(&rule_paths, overrides, &mut errors);
        if rules.is_empty() && errors.is_empty() {
            errors.push(ConfigError {
                file: path.to_path_buf(),
                line: None,
                rule: None,
                message: "no rules found under rules.paths".into(),
            });
        }
        let mut types: Vec<&str> = rules.iter().map(|r| r.entity_type.as_str()).collect();
        types.sort_unstable();
        types.dedup();
        let mut kafka_err = |key: &str, message: String| {
            let line = text.lines().position(|l| l.trim_start().starts_with(key)).map(|i| i + 1);
            errors.push(ConfigError { file: path.to_path_buf(), line, rule: None, message });
        };
        let kafka = file.kafka.as_ref().map(|k| kafka::build(k, &types, &mut kafka_err));
        let from_kafka = match file.source.kind.as_str() {
            "file" => false,
            "kafka" => true,
            other => {
                kafka_err("kind", format!("source.kind {other:?} is not one of file, kafka"));
                false
            }
        };
        if from_kafka {
            match &kafka {
                None => kafka_err("kind", "source.kind = \"kafka\" needs a [kafka] section".into()),
                Some(k) if k.consume == Consume::Raw && k.topics.is_empty() => {
                    kafka_err("topics", "kafka.topics is empty: name the topics of raw events".into())
                }
                Some(_) => {}
            }
        }
        let alerts_to_kafka = from_kafka && kafka.as_ref().is_some_and(|k| k.alerts_topic.is_some());
        let alerts = match &file.sink.path {
            Some(p) => Some(Stream::parse(p, &base)),
            None if alerts_to_kafka => None,
            None => Some(Stream::Std),
        };
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        Ok(Config {
            path: path.to_path_buf(),
            input: Stream::parse(&file.source.path, &base),
            max_line_bytes: file.source.max_line_bytes,
            dead_letter: file.source.dead_letter.map(|p| base.join(p)),
            follow: file.source.follow,
            alerts,
            kafka,
            from_kafka,
            store,
            flush_every_events: file.store.flush_every_events,
            flush_interval,
            cache_max_entries: file.store.cache_max_entries,
            cache_max_bytes: file.store.cache_max_bytes,
            purge_after,
            event_time: EventTime::new(time_fields),
            rules: std::sync::Arc::new(rules),
            rule_paths,
            scoring,
            listen,
            log_level: file.telemetry.log_level,
        })
    }
}

/// The store `[store]` names, with every misplaced or malformed key reported.
fn store_kind(file: &StoreFile, base: &Path, err: &mut impl FnMut(&str, String)) -> StoreKind {
    let dynamodb_only = [
        ("table", file.table.is_some()),
        ("region", file.region.is_some()),
        ("endpoint_url", file.endpoint_url.is_some()),
        ("ttl", file.ttl.is_some()),
        ("read_requests_per_second", file.read_requests_per_second.is_some()),
        ("write_requests_per_second", file.write_requests_per_second.is_some()),
    ];
    fn not_here(kind: &str, keys: &[(&str, bool)], err: &mut impl FnMut(&str, String)) {
        for (key, set) in keys {
            if *set {
                err(key, format!("store.{key} does not apply to store.kind = {kind:?}"));
            }
        }
    }
    match file.kind.as_str() {
        "embedded" => {
            not_here("embedded", &dynamodb_only, err);
            StoreKind::Embedded(base.join(file.path.as_deref().unwrap_or("riskd.redb")))
        }
        "memory" => {
            not_here("memory", &dynamodb_only, err);
            StoreKind::Memory
        }
        "dynamodb" => {
            not_here("dynamodb", &[("path", file.path.is_some())], err);
            let table = file.table.clone().unwrap_or_else(|| DEFAULT_TABLE.to_string());
            let table_ok = (3..=255).contains(&table.len())
                && table.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
            if !table_ok {
                err(
                    "table",
                    format!("store.table {table:?} is not a DynamoDB table name (3-255 of a-z A-Z 0-9 _ - .)"),
                );
            }
            if let Some(region) = &file.region {
                if region.is_empty()
                    || !region.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                {
                    err("region", format!("store.region {region:?} is not an AWS region name, e.g. us-east-1"));
                }
            }
            if let Some(url) = &file.endpoint_url {
                let host = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"));
                if host.is_none_or(|h| h.is_empty() || h.starts_with('/')) {
                    err("endpoint_url", format!("store.endpoint_url {url:?} is not an http:// or https:// URL"));
                }
            }
            for (key, v) in [
                ("read_requests_per_second", file.read_requests_per_second),
                ("write_requests_per_second", file.write_requests_per_second),
            ] {
                if v == Some(0) {
                    err(key, format!("store.{key} must be at least 1 (leave it out for no limit)"));
                }
            }
            StoreKind::DynamoDb(DynamoConfig {
                table,
                region: file.region.clone(),
                endpoint_url: file.endpoint_url.clone(),
                ttl: file.ttl.unwrap_or(true),
                remember_versions: file.cache_max_entries,
                read_requests_per_second: file.read_requests_per_second.filter(|v| *v > 0),
                write_requests_per_second: file.write_requests_per_second.filter(|v| *v > 0),
            })
        }
        other => {
            err("kind", format!("store.kind {other:?} is not one of embedded, dynamodb, memory"));
            StoreKind::Memory
        }
    }
}

fn scoring_config(file: &ScoringFile, err: &mut impl FnMut(&str, String)) -> ScoringConfig {
    if !(file.floor >= 0.0 && file.floor.is_finite()) {
        err("floor", format!("scoring.floor must be 0 or more, got {}", file.floor));
    }
    let mut policy = |name: &str, t: &TypeFile, base: Option<&TypeFile>| -> TypePolicy {
        let pick = |f: fn(&TypeFile) -> Option<f64>| f(t).or_else(|| base.and_then(f));
        let threshold = pick(|t| t.threshold).unwrap_or(100.0);
        // An explicit threshold without an explicit rearm re-arms at half of it.
        let rearm_below = t.rearm_below.or(if t.threshold.is_some() { None } else { base.and_then(|b| b.rearm_below) });
        let rearm_below = rearm_below.unwrap_or(threshold / 2.0);
        if !(threshold > 0.0 && threshold.is_finite()) {
            err("threshold", format!("scoring {name}: threshold must be above 0, got {threshold}"));
        }
        if !(0.0..=threshold).contains(&rearm_below) {
            err(
                "rearm_below",
                format!("scoring {name}: rearm_below must be between 0 and the threshold, got {rearm_below}"),
            );
        }
        let half_life = t.half_life.as_deref().or(base.and_then(|b| b.half_life.as_deref())).unwrap_or("24h");
        let half_life_ms = match humantime::parse_duration(half_life) {
            Ok(d) if !d.is_zero() => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
            _ => {
                err(
                    "half_life",
                    format!("scoring {name}: half_life {half_life:?} is not a duration above zero, e.g. 24h"),
                );
                24 * 3_600_000
            }
        };
        let bands = match t.bands.as_ref().or(base.and_then(|b| b.bands.as_ref())) {
            None => default_bands(threshold),
            Some(bands) => {
                let mut out = Vec::new();
                for b in bands {
                    match Severity::parse(&b.severity) {
                        Some(s) => out.push((b.min_score, s)),
                        None => err("bands", format!("scoring {name}: unknown severity {:?} in bands", b.severity)),
                    }
                }
                if out.windows(2).any(|w| w[0].0 >= w[1].0) {
                    err("bands", format!("scoring {name}: bands must be in increasing min_score order"));
                }
                out
            }
        };
        TypePolicy { threshold, rearm_below, half_life_ms, bands }
    };
    let default = policy("defaults", &file.defaults, None);
    let types = file
        .types
        .iter()
        .map(|(name, t)| (name.clone(), policy(&format!("types.{name}"), t, Some(&file.defaults))))
        .collect();
    let mut modifiers = Vec::new();
    for (i, m) in file.modifiers.iter().enumerate() {
        if !(m.multiply >= 0.0 && m.multiply.is_finite()) {
            err("multiply", format!("scoring.modifiers[{i}]: multiply must be 0 or more, got {}", m.multiply));
        }
        let mut set = globset::GlobSetBuilder::new();
        for id in &m.ids {
            match globset::Glob::new(id) {
                Ok(g) => {
                    set.add(g);
                }
                Err(e) => err("ids", format!("scoring.modifiers[{i}]: bad pattern {id:?}: {e}")),
            }
        }
        match set.build() {
            Ok(ids) => modifiers.push(Modifier { entity_type: m.entity_type.clone(), ids, multiply: m.multiply }),
            Err(e) => err("ids", format!("scoring.modifiers[{i}]: {e}")),
        }
    }
    ScoringConfig { floor: file.floor, default, types, modifiers }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> Result<Config, ConfigErrors> {
        let dir = tempfile::tempdir().unwrap();
        let rules = dir.path().join("rules");
        std::fs::create_dir(&rules).unwrap();
        std::fs::write(
            rules.join("r.yaml"),
            "id: r\ntitle: t\nseverity: LOW\nentity: {type: user, key: u}\nmatch: 'true'\n",
        )
        .unwrap();
        let path = dir.path().join("riskd.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(&path)
    }

    #[test]
    fn scoring_types_inherit_defaults_and_modifiers_compile() {
        let cfg = load_text(
            "[scoring.defaults]\nthreshold = 80\nhalf_life = \"12h\"\n[scoring.types.ip]\nthreshold = 40\n[scoring.types.user]\nhalf_life = \"2d\"\n[[scoring.modifiers]]\nids = [\"admin-*\"]\nmultiply = 2\n",
        )
        .unwrap();
        let s = &cfg.scoring;
        assert_eq!((s.default.threshold, s.default.rearm_below, s.default.half_life_ms), (80.0, 40.0, 12 * 3_600_000));
        let ip = s.policy("ip");
        assert_eq!((ip.threshold, ip.rearm_below, ip.half_life_ms), (40.0, 20.0, 12 * 3_600_000));
        assert_eq!(s.policy("user").half_life_ms, 48 * 3_600_000);
        assert_eq!(s.policy("role"), &s.default);
        assert!(s.modifiers[0].ids.is_match("admin-root"));
    }

    #[test]
    fn dynamodb_store_defaults_and_every_store_error() {
        let cfg = load_text("[store]\nkind = \"dynamodb\"\n").unwrap();
        let StoreKind::DynamoDb(d) = &cfg.store else { panic!("{:?}", cfg.store) };
        assert_eq!((d.table.as_str(), &d.region, &d.endpoint_url, d.ttl), ("panther-kv-store", &None, &None, true));
        let cfg = load_text(
            "[store]\nkind = \"dynamodb\"\ntable = \"t-1\"\nregion = \"eu-west-1\"\nendpoint_url = \"http://127.0.0.1:8000\"\nttl = false\n",
        )
        .unwrap();
        let StoreKind::DynamoDb(d) = &cfg.store else { panic!("{:?}", cfg.store) };
        assert_eq!(d.region.as_deref(), Some("eu-west-1"));
        assert_eq!((d.endpoint_url.as_deref(), d.ttl), (Some("http://127.0.0.1:8000"), false));

        let errors = load_text(
            "[store]\nkind = \"dynamodb\"\npath = \"x.redb\"\ntable = \"a\"\nregion = \"US East\"\nendpoint_url = \"ftp://h\"\n",
        )
        .unwrap_err();
        assert_eq!(errors.0.len(), 4, "{errors}");
        assert!(errors.0.iter().all(|e| e.line.is_some()), "{errors}");
        let text = errors.to_string();
        for needle in
            ["store.path does not apply", "store.table \"a\"", "store.region \"US East\"", "store.endpoint_url"]
        {
            assert!(text.contains(needle), "{needle} missing from {text}");
        }
        let errors = load_text("[store]\nkind = \"embedded\"\ntable = \"t-1\"\nttl = true\n").unwrap_err();
        assert_eq!(errors.0.len(), 2, "{errors}");
        assert!(errors.to_string().contains("store.table does not apply to store.kind = \"embedded\""), "{errors}");
        let errors = load_text("[store]\nkind = \"cassandra\"\n").unwrap_err();
        assert!(errors.to_string().contains("not one of embedded, dynamodb, memory"), "{errors}");
    }

    #[test]
    fn every_scoring_error_is_reported() {
        let errors = load_text(
            "[scoring]\nfloor = -1\n[scoring.types.user]\nthreshold = 0\nhalf_life = \"soon\"\nbands = [{min_score = 10, severity = \"SEVERE\"}]\n[[scoring.modifiers]]\nids = [\"[\"]\nmultiply = -2\n",
        )
        .unwrap_err();
        let lines: Vec<(Option<usize>, bool)> = errors.0.iter().map(|e| (e.line, e.rule.is_none())).collect();
        assert_eq!(errors.0.len(), 6, "{errors}");
        assert!(lines.iter().all(|(line, no_rule)| line.is_some() && *no_rule), "{errors}");
        let text = errors.to_string();
        for needle in ["floor", "threshold must be above 0", "half_life \"soon\"", "SEVERE", "multiply", "bad pattern"]
        {
            assert!(text.contains(needle), "{needle} missing from {text}");
        }
    }
}
