//! Configuration: the service config (`riskd.toml`) and the rule files it
//! points at. Loading is two-phase: serde parses (unknown keys are errors),
//! then everything is validated and every rule compiled, and *all* problems
//! are reported together, each with file, line and rule id.
//!
//! Each section of `riskd.toml` is read and validated in its own module;
//! an error in `riskd.toml` names the line of its key in its own table, as
//! the TOML parser placed it (`spans.rs`).
//!
//! Relative paths in `riskd.toml` are taken from the folder the file is in.

mod kafka;
mod rule_files;
mod scoring;
pub mod sigma;
mod source;
mod spans;
mod store;
mod telemetry;

pub use crate::state::StoreKind;
pub use kafka::{Consume, KafkaConfig, KafkaFile};
pub use rule_files::{Override, RulesFile};
pub use scoring::{BandFile, ModifierFile, ScoringFile, TypeFile};
pub use source::{EventTimeFile, SinkFile, SourceFile};
pub use store::StoreFile;
pub use telemetry::TelemetryFile;

use crate::event::EventTime;
use crate::rules::Rule;
use crate::scoring::ScoringConfig;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use spans::{line_at, Report, Spans};
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
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Where events come from.
    #[serde(default = "absent")]
    pub source: SourceFile,
    /// Where alerts go.
    #[serde(default = "absent")]
    pub sink: SinkFile,
    /// Where state is kept.
    #[serde(default = "absent")]
    pub store: StoreFile,
    /// Which rules run.
    #[serde(default = "absent")]
    pub rules: RulesFile,
    /// How an event's time is found.
    #[serde(default = "absent")]
    pub event_time: EventTimeFile,
    /// How rule alerts add up to entity risk.
    #[serde(default = "absent")]
    pub scoring: ScoringFile,
    /// Metrics, health endpoints, logs.
    #[serde(default = "absent")]
    pub telemetry: TelemetryFile,
    /// Kafka: the broker, the consumer group, topics.
    #[serde(default)]
    pub kafka: Option<KafkaFile>,
    /// How Sigma rules become riskd rules.
    #[serde(default)]
    pub sigma: sigma::SigmaFile,
}

/// A section left out of the file: every key at its serde default, so that
/// each default is written once, by the field's function.
fn absent<T: DeserializeOwned>() -> T {
    toml::from_str("").expect("every key of a section that may be left out has a default")
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
    /// `source.decode_threads`: threads decoding lines read ahead.
    pub decode_threads: usize,
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
    /// `store.max_write_units_per_second`: flushes are stretched to write
    /// about this many units a second at most.
    pub write_budget: Option<f64>,
    /// `store.expiry_granule`: expiry refreshes smaller than this fraction
    /// of the lifetime keep the old expiry and are not written.
    pub expiry_granule: f64,
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
    /// The Sigma rule files and folders.
    pub sigma_paths: Vec<PathBuf>,
    /// The Sigma rules loaded, by logsource, and those skipped.
    pub sigma: sigma::SigmaLoad,
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
        let parse_error = |e: toml::de::Error| at(e.span().map(|s| line_at(&text, s.start)), e.message().to_string());
        // One parse: serde reads the document, and its spans place the errors found after.
        let doc = toml::de::DeTable::parse(&text).map_err(parse_error)?;
        let file = ConfigFile::deserialize(toml::de::Deserializer::from(doc.clone())).map_err(parse_error)?;
        Self::build(path, Spans::new(&text, doc.into_inner()), file, overrides)
    }

    /// Phase two: validates every section and compiles every rule, reporting
    /// every problem in the order found (store, source, event time, scoring,
    /// telemetry, rules, kafka, then the checks across sections).
    fn build(path: &Path, spans: Spans, file: ConfigFile, overrides: &[Override]) -> Result<Self, ConfigErrors> {
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let mut report = Report::new(path, spans);
        let store = store::build(&file.store, &base, &mut report.section("store"));
        source::check(&file.source, &mut report.section("source"));
        let event_time = source::event_time(&file.event_time, &mut report.section("event_time"));
        let scoring = scoring::build(&file.scoring, &mut report.section("scoring"));
        let listen = telemetry::build(&file.telemetry, &mut report.section("telemetry"));
        let rule_paths = rule_files::paths(&file.rules, &base, &mut report.section("rules"));
        let mut rules = rule_files::load(&rule_paths, overrides, &mut report.errors);
        let sigma_paths: Vec<PathBuf> = file.rules.sigma.iter().map(|p| base.join(p)).collect();
        let taken = rules.iter().map(|r| r.id.clone()).collect();
        let (sigma_rules, sigma) = sigma::load(&sigma_paths, &file.sigma, &taken, &mut report.errors);
        rules.extend(sigma_rules);
        if rules.is_empty() && report.errors.is_empty() {
            report.file_error("no rules found under rules.paths".into());
        }
        let mut types: Vec<&str> = rules.iter().map(|r| r.entity_type.as_str()).collect();
        types.sort_unstable();
        types.dedup();
        let kafka = file.kafka.as_ref().map(|k| kafka::build(k, &types, &mut report.section("kafka")));
        let from_kafka = source::from_kafka(&file.source, &mut report.section("source"));
        if from_kafka {
            match &kafka {
                None => report.section("source").at("kind", "source.kind = \"kafka\" needs a [kafka] section".into()),
                Some(k) if k.consume == Consume::Raw && k.topics.is_empty() => {
                    report.section("kafka").at("topics", "kafka.topics is empty: name the topics of raw events".into())
                }
                Some(_) => {}
            }
        }
        if let StoreKind::DynamoDb(d) = &store.kind {
            let direct: Vec<&str> = rules.iter().filter(|r| r.direct).map(|r| r.id.as_str()).collect();
            if d.layout == crate::state::Layout::Entity && !direct.is_empty() {
                report.section("store").at(
                    "layout",
                    format!(
                        "store.layout {} keeps each entity's state in one item with one writer, but rule{} {} {} consistency: direct (keys written by several processes): set store.layout = \"key\"",
                        if file.store.layout.is_some() { "= \"entity\"" } else { "(default \"entity\")" },
                        if direct.len() == 1 { "" } else { "s" },
                        direct.join(", "),
                        if direct.len() == 1 { "uses" } else { "use" }
                    ),
                );
            }
        }
        if !report.errors.is_empty() {
            return Err(ConfigErrors(report.errors));
        }
        let alerts_to_kafka = from_kafka && kafka.as_ref().is_some_and(|k| k.alerts_topic.is_some());
        Ok(Config {
            path: path.to_path_buf(),
            input: Stream::parse(&file.source.path, &base),
            max_line_bytes: file.source.max_line_bytes,
            decode_threads: source::decode_threads(&file.source),
            dead_letter: file.source.dead_letter.map(|p| base.join(p)),
            follow: file.source.follow,
            alerts: source::alerts(&file.sink, &base, alerts_to_kafka),
            kafka,
            from_kafka,
            store: store.kind,
            flush_every_events: store.flush_every_events,
            flush_interval: store.flush_interval,
            cache_max_entries: store.cache_max_entries,
            cache_max_bytes: store.cache_max_bytes,
            expiry_granule: store.expiry_granule,
            write_budget: store.write_budget,
            purge_after: store.purge_after,
            event_time,
            rules: std::sync::Arc::new(rules),
            rule_paths,
            sigma_paths,
            sigma,
            scoring,
            listen,
            log_level: file.telemetry.log_level,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loads `text` as `riskd.toml`, next to a folder `rules` of one rule.
    pub(super) fn load_text(text: &str) -> Result<Config, ConfigErrors> {
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

    /// Each error's line, with the start of its message.
    fn lines(text: &str) -> Vec<(Option<usize>, String)> {
        let errors = load_text(text).unwrap_err();
        errors.0.iter().map(|e| (e.line, e.message.split(' ').next().unwrap_or("").to_string())).collect()
    }

    #[test]
    fn a_store_path_error_names_the_store_path_line_not_the_source_one() {
        let text = "[source]\npath = \"events.jsonl\"\n\n[store]\nkind = \"dynamodb\"\npath = \"x.redb\"\n";
        assert_eq!(lines(text), vec![(Some(6), "store.path".to_string())]);
    }

    #[test]
    fn every_section_names_its_own_line() {
        let text = "\
[source]
kind = \"file\"
max_line_bytes = 0
[sink]
path = \"-\"
[store]
kind = \"embedded\"
flush_interval = \"never\"
[rules]
paths = []
[event_time]
fields = [\"a\",
  \"b..c\"]
[scoring]
floor = -1
[scoring.types.ip]
half_life = \"6h\"
rearm_below = 500
[[scoring.modifiers]]
ids = [\"a\"]
multiply = 1
[[scoring.modifiers]]
ids = [\"b\"]
multiply = -1
[telemetry]
listen = \"nowhere\"
[kafka]
bootstrap_servers = \"127.0.0.1:9092\"
lanes = 0
[kafka.properties]
\"group.id\" = \"g\"
";
        let want = [
            (8, "store.flush_interval"),
            (3, "source.max_line_bytes"),
            (13, "event_time.fields:"),
            (15, "scoring.floor"),
            (18, "scoring"),
            (24, "scoring.modifiers[1]:"),
            (26, "telemetry.listen"),
            (10, "rules.paths"),
            (29, "kafka.lanes"),
            (31, "kafka.properties.\"group.id\""),
        ];
        let want: Vec<_> = want.iter().map(|(line, start)| (Some(*line), start.to_string())).collect();
        assert_eq!(lines(text), want);
    }

    #[test]
    fn an_error_of_a_key_left_out_names_its_table() {
        // kafka.topics is absent: the error names the [kafka] header.
        let text = "[source]\nkind = \"kafka\"\n\n[kafka]\nbootstrap_servers = \"127.0.0.1:9092\"\n";
        assert_eq!(lines(text), vec![(Some(4), "kafka.topics".to_string())]);
        // Without [kafka], source.kind is at fault, not the first `kind` of the file.
        let text = "[store]\nkind = \"memory\"\n[source]\nkind = \"kafka\"\n";
        assert_eq!(lines(text), vec![(Some(4), "source.kind".to_string())]);
    }
}
