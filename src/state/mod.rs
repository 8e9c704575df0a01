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
pub mod dynamodb;
mod embedded;
mod instrumented;
mod memory;
mod open;
mod shared;

pub use cache::{check_dict_size, granular_expiry, Access, Expiry, StateCache};
pub use dynamodb::{DynamoConfig, DynamoStore, Layout};
pub use embedded::EmbeddedStore;
pub use instrumented::Instrumented;
pub use memory::MemoryStore;
pub use open::{check_store, init_store, open_store, prune_store, StoreKind};
pub use shared::SharedStore;

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Where riskd keeps its own state. A rule's state is `<namespace>/<entity
/// type>/<entity id>`; a dedup window `riskd/dedup/<rule id>/<dedup key>`;
/// an entity's risk `riskd/risk/<entity type>/<entity id>`. Every such key
/// is built by [`join_key`] / [`key`].
pub const DEDUP_PREFIX: &str = "riskd/dedup";
/// See [`DEDUP_PREFIX`].
pub const RISK_PREFIX: &str = "riskd/risk";

/// Writes `a/b/c` into `out`, reusing its allocation (with push_str: on the
/// per-rule hot path `format!` costs more than the lookup it prepares).
pub fn join_key(out: &mut String, parts: [&str; 3]) {
    out.clear();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(part);
    }
}

/// `a/b/c` as a new string.
pub fn key(parts: [&str; 3]) -> String {
    let mut out = String::new();
    join_key(&mut out, parts);
    out
}

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
    /// A request to a remote store failed for good: not worth retrying, or
    /// still failing when the retries ran out.
    #[error("{0}")]
    Request(Box<RequestFailure>),
    /// A key the store cannot hold (empty, or too long).
    #[error("{store} store: key {key:?} cannot be stored: {message}")]
    BadKey {
        /// Which store.
        store: &'static str,
        /// The key.
        key: String,
        /// Why.
        message: String,
    },
    /// A record whose item would be over the store's item size limit.
    #[error("{store} store: key {key:?} would be a {bytes}-byte item, over the {limit}-byte limit (the item holds the key's previous version too)")]
    ItemTooLarge {
        /// Which store.
        store: &'static str,
        /// The key.
        key: String,
        /// The item's size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// A table that exists but is not laid out as riskd needs.
    #[error("table {table:?} does not fit riskd: {}", .problems.join("; "))]
    TableMisfit {
        /// The table.
        table: String,
        /// Each thing wrong with it.
        problems: Vec<String>,
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

/// A request to a remote store that failed for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestFailure {
    /// Which store.
    pub store: &'static str,
    /// The request: `BatchWriteItem`, `Scan`, …
    pub operation: &'static str,
    /// The table.
    pub table: String,
    /// The key at fault, where one is.
    pub key: Option<String>,
    /// The service's error code (`ValidationException`, …) or the kind of
    /// failure (`Timeout`, `DispatchFailure`).
    pub code: String,
    /// The service's message.
    pub message: String,
    /// Whether it failed on something a later try may mend (throttling, a
    /// timeout, the service unreachable): the job backs off and retries.
    pub transient: bool,
}

impl std::fmt::Display for RequestFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} store: {} on table {:?}", self.store, self.operation, self.table)?;
        if let Some(key) = &self.key {
            write!(f, " (key {key:?})")?;
        }
        write!(f, ": {}: {}", self.code, self.message)
    }
}

impl StateError {
    /// Whether the failure may pass (the store unreachable, throttled, slow):
    /// the job then backs off, reports not-ready and tries again, rather
    /// than stopping. Corrupt data, bad keys and oversized values are not.
    pub fn is_transient(&self) -> bool {
        match self {
            StateError::Backend { .. } => true,
            StateError::Request(r) => r.transient,
            _ => false,
        }
    }
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
    /// For a topic written by `riskd route`: per upstream partition
    /// (`<topic>/<partition>`), the last upstream offset applied; a copy
    /// the router produced again after a restart is skipped by it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub upstream: BTreeMap<String, i64>,
    /// With events held for ordering (`event_time.max_delay`): how far the
    /// input was read (byte offset, line); `offset` and `line` then stand
    /// before the oldest event held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read: Option<(u64, u64)>,
    /// Every event read up to `read` at or before this event time has been
    /// applied; those after it were held, and are read again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released_ms: Option<i64>,
    /// The latest trusted event time when the oldest held event was read
    /// (what stands in for times that cannot be true, read again from there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_ms: Option<i64>,
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
    /// The input positions these changes bring the store to, by source id
    /// (a file; a Kafka partition each).
    pub checkpoints: Vec<(&'a str, &'a Checkpoint)>,
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
    /// Whether reads are worth gathering across many events (a remote store,
    /// where a request costs a round trip); local stores read on demand.
    fn batched_reads(&self) -> bool {
        false
    }
    /// Changes one key atomically, for keys written by several riskd
    /// processes (`consistency: direct` rules): `f` gets the live record (the
    /// default when absent or expired at `now_ms`) and says whether it
    /// changed it; the change is written at once. A store shared between
    /// processes retries `f` on a concurrent change, so `f` may run more than
    /// once. Local stores have one writer: a read and a write suffice.
    fn update(&mut self, key: &str, now_ms: i64, f: &mut dyn FnMut(&mut Record) -> bool) -> Result<()> {
        let mut record = self.get_many(&[key])?.pop().flatten().filter(|r| r.is_live(now_ms)).unwrap_or_default();
        if !f(&mut record) {
            return Ok(());
        }
        let mutation =
            if record.is_empty() && record.expires_at_ms.is_none() { Mutation::Delete } else { Mutation::Put(&record) };
        self.apply(WriteBatch { mutations: vec![(key, mutation)], checkpoints: Vec::new() })
    }
    /// Deletes the records that expired (event time) at or before
    /// `before_ms`, for a store that keeps them (the embedded one); returns
    /// how many. They read as absent already, except to events older than
    /// their expiry.
    fn purge_expired(&mut self, before_ms: i64) -> Result<usize> {
        let _ = before_ms;
        Ok(0)
    }
    /// Forgets what the store remembers of keys' values between calls:
    /// another process may change them from now on (this one gave up the
    /// partitions they belong to).
    fn forget(&mut self) {}
    /// Another handle on the same data, for reading from another thread
    /// while the job writes (the HTTP API); `None` where the data cannot be
    /// shared (the memory store).
    fn reader(&self) -> Option<Box<dyn Store>> {
        None
    }
}

#[doc(hidden)]
pub mod store_tests {
    //! Behaviour every [`Store`] must share: each implementation runs all of
    //! these through [`shared_store_tests!`], with the same code. Public
    //! (but hidden) so that integration tests can run them too: the
    //! DynamoDB store's tests live in `tests/`, where they need a server.
    use super::*;

    /// Expands to one `#[test]` per shared behaviour; `$make` returns a
    /// fresh, empty store and whatever must live as long as it.
    #[macro_export]
    #[doc(hidden)]
    macro_rules! shared_store_tests {
        ($make:expr) => {
            #[test]
            fn shared_round_trip() {
                let (mut store, _keep) = $make;
                $crate::state::store_tests::round_trip(&mut store);
            }
            #[test]
            fn shared_expiry_is_kept_to_the_millisecond() {
                let (mut store, _keep) = $make;
                $crate::state::store_tests::expiry_is_kept_to_the_millisecond(&mut store);
            }
            #[test]
            fn shared_checkpoints_per_source() {
                let (mut store, _keep) = $make;
                $crate::state::store_tests::checkpoints_per_source(&mut store);
            }
            #[test]
            fn shared_scan_is_in_key_order_within_the_prefix() {
                let (mut store, _keep) = $make;
                $crate::state::store_tests::scan_is_in_key_order_within_the_prefix(&mut store);
            }
            #[test]
            fn shared_many_keys_in_one_batch() {
                let (mut store, _keep) = $make;
                $crate::state::store_tests::many_keys_in_one_batch(&mut store);
            }
            #[test]
            fn shared_update_is_read_modify_write_on_live_values() {
                let (mut store, _keep) = $make;
                $crate::state::store_tests::update_is_read_modify_write_on_live_values(&mut store);
            }
            #[test]
            fn shared_entity_shaped_keys() {
                let (mut store, _keep) = $make;
                $crate::state::store_tests::entity_shaped_keys(&mut store);
            }
            #[test]
            fn shared_put_replaces_the_whole_record() {
                let (mut store, _keep) = $make;
                $crate::state::store_tests::put_replaces_the_whole_record(&mut store);
            }
        };
    }
    pub use crate::shared_store_tests;

    fn put<'a>(key: &'a str, record: &'a Record) -> (&'a str, Mutation<'a>) {
        (key, Mutation::Put(record))
    }

    fn apply(store: &mut dyn Store, mutations: Vec<(&str, Mutation<'_>)>) {
        store.apply(WriteBatch { mutations, checkpoints: Vec::new() }).unwrap();
    }

    fn keys(store: &dyn Store, prefix: &str) -> Vec<String> {
        let mut seen = Vec::new();
        store.scan(prefix, &mut |k, _| seen.push(k.to_string())).unwrap();
        seen
    }

    /// `update` reads the live value (the default when expired), writes
    /// only what changed, and removes a key it empties.
    pub fn update_is_read_modify_write_on_live_values(store: &mut dyn Store) {
        let bump = |store: &mut dyn Store, now| {
            store
                .update("u/k", now, &mut |r| {
                    if r.count == 0 {
                        r.expires_at_ms = Some(now + 1000);
                    }
                    r.count += 1;
                    true
                })
                .unwrap()
        };
        bump(store, 0);
        bump(store, 10);
        let got = store.get_many(&["u/k"]).unwrap().pop().flatten();
        assert_eq!(got.map(|r| (r.count, r.expires_at_ms)), Some((2, Some(1000))));
        // Expired at 1000: the update starts from the default (no resurrection).
        bump(store, 1000);
        let got = store.get_many(&["u/k"]).unwrap().pop().flatten();
        assert_eq!(got.map(|r| (r.count, r.expires_at_ms)), Some((1, Some(2000))));
        // An update that changes nothing writes nothing; one that empties the key removes it.
        store.update("u/k", 1500, &mut |_| false).unwrap();
        store
            .update("u/k", 1500, &mut |r| {
                *r = Record::default();
                true
            })
            .unwrap();
        assert_eq!(store.get_many(&["u/k"]).unwrap(), vec![None]);
    }

    /// Records and checkpoints read back as written; deletes remove.
    pub fn round_trip(store: &mut dyn Store) {
        let rec = Record {
            count: 3,
            set: ["a".to_string()].into(),
            dict: Some(serde_json::json!({"ip": "1.2.3.4"}).as_object().cloned().unwrap_or_default()),
            expires_at_ms: Some(1_000),
        };
        let cp = Checkpoint { offset: 42, line: 2, watermark_ms: 5, outputs: BTreeMap::new(), ..Default::default() };
        let empty = Record::default();
        store
            .apply(WriteBatch {
                mutations: vec![("r/a", Mutation::Put(&rec)), ("r/b", Mutation::Put(&empty))],
                checkpoints: vec![("in", &cp)],
            })
            .unwrap();
        assert_eq!(store.get_many(&["r/a", "zz"]).unwrap(), vec![Some(rec.clone()), None]);
        assert_eq!(store.get_many(&["r/b"]).unwrap(), vec![Some(empty)], "an empty record is still a record");
        assert_eq!(store.checkpoint("in").unwrap(), Some(cp));
        assert_eq!(store.checkpoint("other").unwrap(), None);
        assert_eq!(keys(store, "r/"), vec!["r/a", "r/b"]);
        assert_eq!(keys(store, ""), vec!["r/a", "r/b"], "checkpoints are not records");
        store.apply(WriteBatch { mutations: vec![("r/a", Mutation::Delete)], checkpoints: Vec::new() }).unwrap();
        assert_eq!(store.get_many(&["r/a"]).unwrap(), vec![None]);
        assert_eq!(keys(store, "r/"), vec!["r/b"]);
    }

    /// The store keeps expiry exactly and never decides liveness itself
    /// (the cache does, on event time): expired records read back as stored.
    pub fn expiry_is_kept_to_the_millisecond(store: &mut dyn Store) {
        let at = |ms| Record { count: 1, expires_at_ms: Some(ms), ..Record::default() };
        let records =
            [at(999), at(1_000), at(1_001), at(-1_500), Record { expires_at_ms: Some(7), ..Record::default() }];
        let names = ["e/999", "e/1000", "e/1001", "e/neg", "e/only-expiry"];
        apply(store, names.iter().zip(&records).map(|(k, r)| put(k, r)).collect());
        let got = store.get_many(&names).unwrap();
        assert_eq!(got, records.iter().cloned().map(Some).collect::<Vec<_>>());
        // Overwriting drops the old expiry with the old record.
        let plain = Record { count: 2, ..Record::default() };
        apply(store, vec![put("e/999", &plain)]);
        assert_eq!(store.get_many(&["e/999"]).unwrap(), vec![Some(plain)]);
    }

    /// Each source has its own checkpoint, replaced by the next one.
    pub fn checkpoints_per_source(store: &mut dyn Store) {
        let first = Checkpoint {
            offset: 10,
            line: 1,
            watermark_ms: 1,
            outputs: BTreeMap::from([("alerts:x".into(), 7)]),
            ..Default::default()
        };
        let second =
            Checkpoint { offset: 20, line: 2, watermark_ms: 2, outputs: BTreeMap::new(), ..Default::default() };
        let other = Checkpoint { offset: 5, ..Checkpoint::default() };
        let rec = Record { count: 1, ..Record::default() };
        store.apply(WriteBatch { mutations: vec![put("c/k", &rec)], checkpoints: vec![("file:/a", &first)] }).unwrap();
        store.apply(WriteBatch { mutations: vec![], checkpoints: vec![("file:/b", &other)] }).unwrap();
        assert_eq!(store.checkpoint("file:/a").unwrap(), Some(first));
        store.apply(WriteBatch { mutations: vec![], checkpoints: vec![("file:/a", &second)] }).unwrap();
        assert_eq!(store.checkpoint("file:/a").unwrap(), Some(second));
        assert_eq!(store.checkpoint("file:/b").unwrap(), Some(other));
        assert_eq!(keys(store, ""), vec!["c/k"]);
    }

    /// `scan` visits the keys under a prefix, and only those, in key order.
    pub fn scan_is_in_key_order_within_the_prefix(store: &mut dyn Store) {
        let rec = Record { count: 1, ..Record::default() };
        let names = ["b/2", "a/1", "b/10", "b/1", "b", "c/1", "b/\u{e9}", "b/Z", "ba/1"];
        apply(store, names.iter().map(|k| put(k, &rec)).collect());
        assert_eq!(keys(store, "b/"), vec!["b/1", "b/10", "b/2", "b/Z", "b/\u{e9}"]);
        assert_eq!(keys(store, "b"), vec!["b", "b/1", "b/10", "b/2", "b/Z", "b/\u{e9}", "ba/1"]);
        assert_eq!(keys(store, "zz"), Vec::<String>::new());
        let mut all = names.map(String::from).to_vec();
        all.sort();
        assert_eq!(keys(store, ""), all);
        let mut visited = Vec::new();
        store.scan("a/", &mut |k, r| visited.push((k.to_string(), r.clone()))).unwrap();
        assert_eq!(visited, vec![("a/1".to_string(), rec)]);
    }

    /// More keys than one request of a remote store carries (DynamoDB: 25
    /// writes, 100 reads), repeats in a read, and absent keys among them.
    pub fn many_keys_in_one_batch(store: &mut dyn Store) {
        let records: Vec<(String, Record)> = (0..260)
            .map(|i| (format!("m/{i:03}"), Record { count: i + 1, set: [format!("v{i}")].into(), ..Record::default() }))
            .collect();
        apply(store, records.iter().map(|(k, r)| put(k, r)).collect());
        let mut wanted: Vec<&str> = records.iter().map(|(k, _)| k.as_str()).collect();
        wanted.push("m/absent");
        wanted.push("m/007");
        let got = store.get_many(&wanted).unwrap();
        assert_eq!(got.len(), 262);
        for (i, (_, r)) in records.iter().enumerate() {
            assert_eq!(got[i].as_ref(), Some(r));
        }
        assert_eq!(got[260], None);
        assert_eq!(got[261].as_ref(), Some(&records[7].1));
        assert_eq!(keys(store, "m/").len(), 260);
        apply(store, records.iter().take(100).map(|(k, _)| (k.as_str(), Mutation::Delete)).collect());
        assert_eq!(keys(store, "m/").len(), 160);
    }

    /// Keys of rule state and risk (`<ns>/<type>/<id>`,
    /// `riskd/risk/<type>/<id>`), which a store may keep together per
    /// entity, behave as any other key: changing or removing one leaves the
    /// others of its entity, and scans see each under its own key.
    pub fn entity_shaped_keys(store: &mut dyn Store) {
        let rec = |n| Record { count: n, expires_at_ms: (n % 2 == 0).then_some(n * 1000), ..Record::default() };
        let (a1, a2, a3, b1, d) = (rec(1), rec(2), rec(3), rec(4), rec(5));
        let arn = "r1/role/arn:aws:iam::1:role/x";
        apply(
            store,
            vec![
                put("r1/user/a", &a1),
                put("r2/user/a", &a2),
                put("riskd/risk/user/a", &a3),
                put("r1/user/b", &b1),
                put("riskd/dedup/r1/a", &d),
                put(arn, &a1),
            ],
        );
        let wanted = ["r1/user/a", "r2/user/a", "riskd/risk/user/a", "r1/user/b", "riskd/dedup/r1/a", "r2/user/b", arn];
        let want = |v: [Option<&Record>; 7]| v.map(|r| r.cloned()).to_vec();
        assert_eq!(
            store.get_many(&wanted).unwrap(),
            want([Some(&a1), Some(&a2), Some(&a3), Some(&b1), Some(&d), None, Some(&a1)])
        );
        assert_eq!(keys(store, "r1/"), vec![arn, "r1/user/a", "r1/user/b"]);
        assert_eq!(keys(store, "riskd/"), vec!["riskd/dedup/r1/a", "riskd/risk/user/a"]);
        assert_eq!(keys(store, "r2/user/a"), vec!["r2/user/a"]);
        apply(store, vec![put("r2/user/a", &b1), ("r1/user/a", Mutation::Delete)]);
        assert_eq!(
            store.get_many(&["r1/user/a", "r2/user/a", "riskd/risk/user/a"]).unwrap(),
            vec![None, Some(b1.clone()), Some(a3.clone())]
        );
        apply(store, vec![("r2/user/a", Mutation::Delete), ("riskd/risk/user/a", Mutation::Delete)]);
        assert_eq!(keys(store, ""), vec![arn, "r1/user/b", "riskd/dedup/r1/a"]);
        assert_eq!(store.get_many(&["r2/user/a", "r1/user/b"]).unwrap(), vec![None, Some(b1)]);
    }

    /// A put replaces every value of the record, not just those it sets.
    pub fn put_replaces_the_whole_record(store: &mut dyn Store) {
        let full = Record {
            count: 4,
            set: ["x".into(), "y".into()].into(),
            dict: Some(serde_json::json!({"a": [1, {"b": null}], "c": "d"}).as_object().cloned().unwrap_or_default()),
            expires_at_ms: Some(123_456),
        };
        apply(store, vec![put("p", &full)]);
        assert_eq!(store.get_many(&["p"]).unwrap(), vec![Some(full)]);
        let small = Record { set: ["z".into()].into(), ..Record::default() };
        apply(store, vec![put("p", &small)]);
        assert_eq!(store.get_many(&["p"]).unwrap(), vec![Some(small)]);
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
        store.apply(WriteBatch { mutations, checkpoints: Vec::new() })?;
    }
    Ok(records.len())
}
