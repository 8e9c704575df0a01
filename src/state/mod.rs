//! Per-entity state: typed values under string keys, each key with an
//! event-time expiry, kept behind one small, batch-friendly [`Store`] trait.
//!
//! A [`Record`] has the shape of an item of Panther's `panther-kv-store`: a
//! counter, a string set and a JSON dictionary side by side under one key, and
//! one expiry for the key. Unlike Panther, writing one of them never wipes the
//! others, and an expired record reads as empty on every read.
//!
//! The rule engine never talks to a store directly: it goes through the
//! write-back [`StateCache`], which implements the twelve cache primitives and
//! flushes the records it changed, with the source checkpoint they cover, in
//! one [`WriteBatch`].

mod cache;
mod embedded;
mod instrumented;
mod memory;

pub use cache::{check_dict_size, Expiry, StateCache};
pub use embedded::EmbeddedStore;
pub use instrumented::Instrumented;
pub use memory::MemoryStore;

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Key whose counter holds the latest event time (ms) the state has seen.
pub const WATERMARK_KEY: &str = "riskd/watermark";

/// Largest serialized dictionary, as DynamoDB's item limit (400 KB).
pub const MAX_DICT_BYTES: usize = 400 * 1024;

/// Errors of the state layer; each names the store and, where one is at
/// fault, the key.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The backing store failed (disk, database, network).
    #[error("{store} store: {message}")]
    Backend {
        /// Which store: `embedded`, `memory`, `dynamodb`.
        store: &'static str,
        /// What failed.
        message: String,
    },
    /// A stored record could not be decoded.
    #[error("{store} store: key {key:?} holds an unreadable record: {message}")]
    Corrupt {
        /// Which store.
        store: &'static str,
        /// The key.
        key: String,
        /// The decoder's message.
        message: String,
    },
    /// A dictionary over [`MAX_DICT_BYTES`] once serialized.
    #[error("dictionary for key {key:?} is {bytes} bytes serialized, over the {limit}-byte limit")]
    DictionaryTooLarge {
        /// The key.
        key: String,
        /// Its serialized size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
}

/// Result of the state layer.
pub type Result<T, E = StateError> = std::result::Result<T, E>;

/// The values kept under one key.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Integer counter (Panther `intCount`), default 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub count: i64,
    /// String set (Panther `stringSet`), default empty.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub set: BTreeSet<String>,
    /// JSON object (Panther `dictionary`), default `{}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dict: Option<serde_json::Map<String, serde_json::Value>>,
    /// Event time, in milliseconds since the epoch, from which the record
    /// reads as absent (Panther `expiresAt`, kept here to the millisecond).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<i64>,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

impl Record {
    /// Whether the record still holds at event time `now_ms`: it expires when
    /// event time reaches `expires_at_ms`.
    pub fn is_live(&self, now_ms: i64) -> bool {
        self.expires_at_ms.is_none_or(|at| now_ms < at)
    }

    /// Whether the record holds no value at all (so it need not be stored).
    pub fn is_empty(&self) -> bool {
        self.count == 0 && self.set.is_empty() && self.dict.is_none()
    }
}

/// How far into one input the stored state reaches: every effect of the
/// events before `offset` is in the store, none after it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Byte offset in the input of the first event not yet applied.
    pub offset: u64,
    /// Line number (1-based) of the last line applied; 0 before any.
    pub line: u64,
    /// Greatest event time seen so far (ms), the "now" of state browsing.
    pub watermark_ms: i64,
    /// Length of each file output (alerts, dead letters) that holds exactly
    /// the output of the events applied, keyed by the output's path.
    #[serde(default)]
    pub outputs: BTreeMap<String, u64>,
}

/// A change to one key. Borrowed from the cache: a flush copies nothing.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mutation<'a> {
    /// Store this record under the key, replacing what was there.
    Put(&'a Record),
    /// Remove the key.
    Delete,
}

/// Changes applied together: in a transactional store all of them and the
/// checkpoint commit atomically, so a crash leaves either all or none.
#[derive(Clone, Debug, Default)]
pub struct WriteBatch<'a> {
    /// Changed keys, each once.
    pub mutations: Vec<(&'a str, Mutation<'a>)>,
    /// The input position these changes bring the store to, by source id.
    pub checkpoint: Option<(&'a str, &'a Checkpoint)>,
}

/// A place to keep records. Small and batch-shaped, so that a remote store
/// costs one request per batch rather than one per event.
pub trait Store: Send {
    /// Short name for messages and metrics: `memory`, `embedded`, `dynamodb`.
    fn kind(&self) -> &'static str;
    /// Reads many keys at once; `None` for a key that is not stored.
    fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Record>>>;
    /// Applies a batch, with its checkpoint, as one unit.
    fn apply(&mut self, batch: WriteBatch<'_>) -> Result<()>;
    /// The checkpoint last applied for a source.
    fn checkpoint(&self, source: &str) -> Result<Option<Checkpoint>>;
    /// Visits every stored key starting with `prefix`, in key order.
    fn scan(&self, prefix: &str, visit: &mut dyn FnMut(&str, &Record)) -> Result<()>;
}

#[cfg(test)]
pub(crate) mod store_tests {
    //! Behaviour every [`Store`] must share; each implementation runs these.
    use super::*;

    pub fn round_trip(store: &mut dyn Store) {
        let rec = Record {
            count: 3,
            set: ["a".to_string()].into(),
            dict: Some(serde_json::json!({"ip": "1.2.3.4"}).as_object().cloned().unwrap_or_default()),
            expires_at_ms: Some(1_000),
        };
        let cp = Checkpoint { offset: 42, line: 2, watermark_ms: 5, outputs: BTreeMap::new() };
        let empty = Record::default();
        store
            .apply(WriteBatch {
                mutations: vec![("r/a", Mutation::Put(&rec)), ("r/b", Mutation::Put(&empty))],
                checkpoint: Some(("in", &cp)),
            })
            .unwrap();
        assert_eq!(store.get_many(&["r/a", "zz"]).unwrap(), vec![Some(rec.clone()), None]);
        assert_eq!(store.checkpoint("in").unwrap(), Some(cp));
        assert_eq!(store.checkpoint("other").unwrap(), None);
        let mut seen = Vec::new();
        store.scan("r/", &mut |k, _| seen.push(k.to_string())).unwrap();
        assert_eq!(seen, vec!["r/a", "r/b"]);
        store.apply(WriteBatch { mutations: vec![("r/a", Mutation::Delete)], checkpoint: None }).unwrap();
        assert_eq!(store.get_many(&["r/a"]).unwrap(), vec![None]);
    }
}

/// One record of `riskd state export`.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct ExportedRecord {
    /// The key.
    pub key: String,
    /// Its values and expiry.
    #[serde(flatten)]
    pub record: Record,
}

/// Writes every record of `store` as JSON lines, in key order; returns how many.
pub fn export(store: &dyn Store, out: &mut dyn std::io::Write) -> std::io::Result<u64> {
    let mut n = 0u64;
    let mut failure: Option<std::io::Error> = None;
    store
        .scan("", &mut |key, record| {
            if failure.is_some() {
                return;
            }
            let line = ExportedRecord { key: key.to_string(), record: record.clone() };
            let res = serde_json::to_writer(&mut *out, &line)
                .map_err(std::io::Error::other)
                .and_then(|()| out.write_all(b"\n"));
            match res {
                Ok(()) => n += 1,
                Err(e) => failure = Some(e),
            }
        })
        .map_err(std::io::Error::other)?;
    if let Some(e) = failure {
        return Err(e);
    }
    out.flush()?;
    Ok(n)
}

/// The latest event time the state has seen (ms), 0 when none.
pub fn watermark(store: &dyn Store) -> Result<i64> {
    Ok(store.get_many(&[WATERMARK_KEY])?.pop().flatten().map_or(0, |r| r.count))
}

/// A record as JSON for people: values, expiry as RFC 3339, and whether it
/// is live at `now_ms`.
pub fn describe(key: &str, record: Option<&Record>, now_ms: i64) -> serde_json::Value {
    match record {
        None => serde_json::json!({ "key": key, "absent": true }),
        Some(r) => serde_json::json!({
            "key": key,
            "count": r.count,
            "set": r.set,
            "dict": r.dict,
            "expires_at": r.expires_at_ms.map(crate::event::format_time_ms),
            "live": r.is_live(now_ms),
        }),
    }
}

/// One line for `riskd state list`.
pub fn summarize(key: &str, r: &Record, now_ms: i64) -> String {
    let mut parts = vec![key.to_string()];
    if r.count != 0 {
        parts.push(format!("count={}", r.count));
    }
    if !r.set.is_empty() {
        parts.push(format!("set[{}]", r.set.len()));
    }
    if let Some(d) = &r.dict {
        parts.push(format!("dict{{{} keys}}", d.len()));
    }
    parts.push(match r.expires_at_ms {
        None => "no expiry".to_string(),
        Some(at) if r.is_live(now_ms) => format!("expires {}", crate::event::format_time_ms(at)),
        Some(at) => format!("EXPIRED {}", crate::event::format_time_ms(at)),
    });
    parts.join("  ")
}

/// An import that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// A line is not a record of the export format.
    #[error("line {line}: {message}")]
    Line {
        /// 1-based line.
        line: usize,
        /// The parser's message.
        message: String,
    },
    /// The store failed.
    #[error(transparent)]
    State(#[from] StateError),
}

/// Writes the records of an export (JSON lines) to the store, in batches;
/// nothing is written if any line is bad.
pub fn import(store: &mut dyn Store, text: &str) -> std::result::Result<usize, ImportError> {
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let r: ExportedRecord =
            serde_json::from_str(line).map_err(|e| ImportError::Line { line: i + 1, message: e.to_string() })?;
        records.push(r);
    }
    for chunk in records.chunks(1000) {
        let mutations = chunk.iter().map(|r| (r.key.as_str(), Mutation::Put(&r.record))).collect();
        store.apply(WriteBatch { mutations, checkpoint: None })?;
    }
    Ok(records.len())
}
