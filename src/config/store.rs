//! `[store]`: which store holds state (settings only: the store is opened
//! elsewhere), and how often the job flushes to it.

use super::spans::Section;
use crate::state::dynamodb::{DynamoConfig, Layout, DEFAULT_TABLE};
use crate::state::StoreKind;
use serde::Deserialize;
use std::path::Path;
use std::time::Duration;

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
    /// DynamoDB: write units a second the flushes aim to stay under; past
    /// it, flushes come less often (so more changes coalesce) instead of
    /// being throttled. No budget when absent.
    #[serde(default)]
    pub max_write_units_per_second: Option<f64>,
    /// DynamoDB: `entity` (the default: one item per entity, holding each
    /// rule's state and its risk) or `key` (one item per key, Panther's
    /// layout, which Panther's cache helpers read; `consistency: direct`
    /// rules need it).
    #[serde(default)]
    pub layout: Option<String>,
    /// State and checkpoint are flushed after this many events…
    #[serde(default = "hundred_thousand")]
    pub flush_every_events: u64,
    /// …or this long after the last flush, whichever comes first (and at
    /// the end). Default 2s; on DynamoDB, where every flush is billed by the
    /// items it writes, 1m (see the README's cost table).
    #[serde(default)]
    pub flush_interval: Option<String>,
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
    /// A refresh that moves a live key's expiry forward by less than this
    /// fraction of the lifetime it applies (`ttl`, or the distance from the
    /// event time to an absolute expiry) keeps the old expiry and leaves the
    /// key unwritten; in [0, 0.5], default 0.01; 0 applies every refresh.
    #[serde(default = "one_percent")]
    pub expiry_granule: f64,
}

fn one_percent() -> f64 {
    0.01
}

fn embedded() -> String {
    "embedded".into()
}
fn hundred_thousand() -> u64 {
    100_000
}
/// The default `flush_interval`: the embedded store's flushes cost a disk
/// write, so they can be frequent.
const FLUSH_INTERVAL: Duration = Duration::from_secs(2);
/// The default `flush_interval` on DynamoDB, where a flush is billed by the
/// items it writes: a key changed many times within a minute is written
/// once. What it costs: a crash replays up to a minute of events, and
/// `riskd entity` and the API see state up to a minute old.
const DYNAMODB_FLUSH_INTERVAL: Duration = Duration::from_secs(60);
fn one_gib() -> usize {
    1 << 30
}
fn million() -> usize {
    1_000_000
}

/// The validated `[store]` section.
pub(super) struct Store {
    /// The store.
    pub kind: StoreKind,
    /// Events between flushes.
    pub flush_every_events: u64,
    /// Wall-clock time between flushes.
    pub flush_interval: Duration,
    /// Cache bound, entries.
    pub cache_max_entries: usize,
    /// Cache bound, bytes.
    pub cache_max_bytes: usize,
    /// Purge of expired records; `None`: never.
    pub purge_after: Option<Duration>,
    /// Expiry refreshes smaller than this fraction of the lifetime are not written.
    pub expiry_granule: f64,
    /// Write units a second the flushes aim to stay under.
    pub write_budget: Option<f64>,
}

/// Validates `[store]`; relative paths are taken from `base`.
pub(super) fn build(file: &StoreFile, base: &Path, err: &mut Section) -> Store {
    let kind = store_kind(file, base, err);
    if file.flush_every_events == 0 {
        err.at("flush_every_events", "store.flush_every_events must be at least 1".into());
    }
    let flush_interval = match (file.flush_interval.as_deref(), &kind) {
        (None, StoreKind::DynamoDb(_)) => DYNAMODB_FLUSH_INTERVAL,
        (None, _) => FLUSH_INTERVAL,
        (Some(text), _) => match humantime::parse_duration(text) {
            Ok(d) if !d.is_zero() => d,
            _ => {
                err.at(
                    "flush_interval",
                    format!("store.flush_interval {text:?} is not a duration above zero, e.g. 2s"),
                );
                FLUSH_INTERVAL
            }
        },
    };
    let purge_after = match (file.purge_after.as_deref(), &kind) {
        (Some("off") | None, _) => None,
        (Some(_), StoreKind::DynamoDb(_)) => {
            err.at(
                "purge_after",
                "store.purge_after does not apply to DynamoDB (its TTL deletes expired items)".into(),
            );
            None
        }
        (Some(text), _) => match humantime::parse_duration(text) {
            Ok(d) => Some(d),
            Err(_) => {
                err.at("purge_after", format!("store.purge_after {text:?} is not a duration such as 7d, or \"off\""));
                None
            }
        },
    };
    let expiry_granule = if (0.0..=0.5).contains(&file.expiry_granule) {
        file.expiry_granule
    } else {
        err.at(
            "expiry_granule",
            format!(
                "store.expiry_granule {} is not a fraction of the lifetime in [0, 0.5], e.g. 0.01 (0 turns it off)",
                file.expiry_granule
            ),
        );
        0.0
    };
    let write_budget = match file.max_write_units_per_second {
        Some(v) if !(v.is_finite() && v > 0.0) => {
            err.at(
                "max_write_units_per_second",
                format!("store.max_write_units_per_second {v} must be above 0 (leave it out for no budget)"),
            );
            None
        }
        v => v,
    };
    Store {
        kind,
        write_budget,
        expiry_granule,
        flush_every_events: file.flush_every_events,
        flush_interval,
        cache_max_entries: file.cache_max_entries,
        cache_max_bytes: file.cache_max_bytes,
        purge_after,
    }
}

/// The store `[store]` names, with every misplaced or malformed key reported.
fn store_kind(file: &StoreFile, base: &Path, err: &mut Section) -> StoreKind {
    let dynamodb_only = [
        ("table", file.table.is_some()),
        ("region", file.region.is_some()),
        ("endpoint_url", file.endpoint_url.is_some()),
        ("ttl", file.ttl.is_some()),
        ("read_requests_per_second", file.read_requests_per_second.is_some()),
        ("write_requests_per_second", file.write_requests_per_second.is_some()),
        ("layout", file.layout.is_some()),
        ("max_write_units_per_second", file.max_write_units_per_second.is_some()),
    ];
    let mut not_here = |kind: &str, keys: &[(&str, bool)]| {
        for (key, set) in keys {
            if *set {
                err.at(key, format!("store.{key} does not apply to store.kind = {kind:?}"));
            }
        }
    };
    match file.kind.as_str() {
        "embedded" => {
            not_here("embedded", &dynamodb_only);
            StoreKind::Embedded(base.join(file.path.as_deref().unwrap_or("riskd.redb")))
        }
        "memory" => {
            not_here("memory", &dynamodb_only);
            StoreKind::Memory
        }
        "dynamodb" => {
            not_here("dynamodb", &[("path", file.path.is_some())]);
            StoreKind::DynamoDb(dynamo_config(file, err))
        }
        other => {
            err.at("kind", format!("store.kind {other:?} is not one of embedded, dynamodb, memory"));
            StoreKind::Memory
        }
    }
}

/// The table `[store]` names with `kind = "dynamodb"`, every malformed key reported.
fn dynamo_config(file: &StoreFile, err: &mut Section) -> DynamoConfig {
    let table = file.table.clone().unwrap_or_else(|| DEFAULT_TABLE.to_string());
    let table_ok = (3..=255).contains(&table.len())
        && table.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !table_ok {
        err.at("table", format!("store.table {table:?} is not a DynamoDB table name (3-255 of a-z A-Z 0-9 _ - .)"));
    }
    if let Some(region) = &file.region {
        if region.is_empty() || !region.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') {
            err.at("region", format!("store.region {region:?} is not an AWS region name, e.g. us-east-1"));
        }
    }
    if let Some(url) = &file.endpoint_url {
        let host = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"));
        if host.is_none_or(|h| h.is_empty() || h.starts_with('/')) {
            err.at("endpoint_url", format!("store.endpoint_url {url:?} is not an http:// or https:// URL"));
        }
    }
    for (key, v) in [
        ("read_requests_per_second", file.read_requests_per_second),
        ("write_requests_per_second", file.write_requests_per_second),
    ] {
        if v == Some(0) {
            err.at(key, format!("store.{key} must be at least 1 (leave it out for no limit)"));
        }
    }
    let layout = match file.layout.as_deref() {
        None => Layout::Entity,
        Some("key") => Layout::Key,
        Some("entity") => Layout::Entity,
        Some(other) => {
            err.at("layout", format!("store.layout {other:?} is not one of key, entity"));
            Layout::Key
        }
    };
    DynamoConfig {
        layout,
        table,
        region: file.region.clone(),
        endpoint_url: file.endpoint_url.clone(),
        ttl: file.ttl.unwrap_or(true),
        remember_versions: file.cache_max_entries,
        read_requests_per_second: file.read_requests_per_second.filter(|v| *v > 0),
        write_requests_per_second: file.write_requests_per_second.filter(|v| *v > 0),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::load_text;
    use super::*;

    #[test]
    fn dynamodb_store_defaults_and_every_store_error() {
        let cfg = load_text("[store]\nkind = \"dynamodb\"\n").unwrap();
        let StoreKind::DynamoDb(d) = &cfg.store else { panic!("{:?}", cfg.store) };
        assert_eq!((d.table.as_str(), &d.region, &d.endpoint_url, d.ttl), ("panther-kv-store", &None, &None, true));
        // On DynamoDB a flush is billed: one item per entity, a flush a minute.
        assert_eq!((d.layout, cfg.flush_interval), (Layout::Entity, Duration::from_secs(60)));
        assert_eq!(load_text("").unwrap().flush_interval, Duration::from_secs(2));
        assert_eq!(load_text("[store]\nkind = \"dynamodb\"\nflush_interval = \"5s\"\nlayout = \"key\"\nmax_write_units_per_second = 100\n").map(|c| (c.flush_interval, c.write_budget)).unwrap(), (Duration::from_secs(5), Some(100.0)));
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
        let errors = load_text("[store]\nkind = \"memory\"\nexpiry_granule = 0.9\n").unwrap_err();
        assert_eq!(errors.0.len(), 1, "{errors}");
        assert_eq!(errors.0[0].line, Some(3), "{errors}");
        assert!(errors.to_string().contains("store.expiry_granule 0.9 is not a fraction"), "{errors}");
        assert_eq!(load_text("[store]\nkind = \"memory\"\n").unwrap().expiry_granule, 0.01);
        assert_eq!(load_text("[store]\nkind = \"memory\"\nexpiry_granule = 0\n").unwrap().expiry_granule, 0.0);
        let errors = load_text("[store]\nkind = \"cassandra\"\n").unwrap_err();
        assert!(errors.to_string().contains("not one of embedded, dynamodb, memory"), "{errors}");
    }
}
