//! The DynamoDB [`Store`]: records in one table laid out like Panther's
//! `panther-kv-store`, so riskd and Panther's cache helpers read each
//! other's values.
//!
//! # Table layout
//!
//! Hash key `key` (S). A record is one item: its counter in `intCount` (N,
//! absent when 0), its string set in `stringSet` (SS, absent when empty:
//! DynamoDB has no empty sets), its dictionary in `dictionary` (S, JSON
//! text), its expiry in `expiresAt` (N, epoch seconds, rounded up so the
//! item never expires early — the attribute DynamoDB's TTL deletes on).
//! riskd keeps the millisecond expiry in `riskdExpiresAtMs` and uses it
//! while it agrees with `expiresAt`; an item Panther wrote, or whose
//! `expiresAt` Panther changed, is read by its `expiresAt`.
//!
//! That is the per-key layout (`store.layout = "key"`). The entity layout
//! (`"entity"`, see `entity`) keeps every rule's state and the risk of one
//! entity as parts of one item, `riskd/entity/<type>/<id>`, so a flush
//! writes one item per entity it changed; Panther's helpers cannot read it.
//!
//! Two kinds of items are riskd's own and never visited by [`Store::scan`]
//! (they carry `riskdMeta`): the checkpoint of each input,
//! `riskd/checkpoint/<source>`, and the commit marker of each run of a
//! store, `riskd/flush/<run>`.
//!
//! # Crash consistency
//!
//! BatchWriteItem is not atomic, and a flush can be thousands of items: a
//! crash in the middle of [`Store::apply`] can leave some items of a flush
//! written and its checkpoint not. The restart replays from the old
//! checkpoint, so it must see none of the new values, or it would count
//! the replayed events twice. So every write is tentative until its flush
//! commits:
//!
//! - Each opened store is a *run* with a random id; each `apply` is flush
//!   `<run>:<seq>`, `seq` counting up from 1.
//! - Every item riskd writes carries its flush (`riskdFlush`) and a copy of
//!   the key's previous *committed* version (`riskdPrev`, JSON of the
//!   [`Record`]; absent when the key had none). The store knows that
//!   version without a read: the write-back cache above reads a key before
//!   changing it, and the store remembers what it read and what it last
//!   committed per key (bounded; a key it has forgotten is read again at
//!   flush time). A delete of a key that has a committed version is written
//!   as a tombstone (`riskdDeleted`) carrying that version, and removed
//!   once its flush has committed.
//! - When every item is written, one TransactWriteItems writes the
//!   checkpoint and sets the run's marker `riskdCommittedSeq` to `seq`:
//!   that transaction is the commit point. A flush without a checkpoint
//!   (stdin input) commits its marker alone, right after its items.
//! - A read sees an item as its own values when its flush is committed
//!   (`seq <= riskdCommittedSeq` of its run), as its `riskdPrev` otherwise.
//!   Markers of other runs are read on demand with BatchGetItem and kept in
//!   memory. Items without `riskdFlush` (written by Panther) read as they
//!   are.
//!
//! So after a crash at any point the store reads exactly as it did at the
//! last committed flush, which is what the checkpoint says. A failed
//! `apply` abandons its run (the next `apply` starts a new run), so a later
//! commit can never adopt the half-written flush. A marker per run (not
//! per flush) keeps their number at one per store opened that wrote.
//!
//! Like the write-back cache above it, this assumes one writer per key at a
//! time (riskd routes each entity to one lane); a dead run's half-written
//! items are overwritten when the replay writes those keys again.
//!
//! Writing the same [`Record`] a key already holds is skipped, which makes
//! a flush idempotent: applying the same batch twice changes no item.
//!
//! # Requests
//!
//! Every request goes through `client`, which batches, retries and
//! budgets them (its documentation says how). The store runs its requests
//! on its own single-threaded tokio runtime, so its methods block: call
//! them from a blocking thread, never from an async task.
//!
//! # Layout of this module
//!
//! Here: the store and its [`Store`] implementation. `codec`: items ↔
//! records, the attribute names and key helpers. `commit`: the flush and
//! commit protocol above, reads of committed versions included. `client`:
//! requests. `entity`: the entity layout. `capacity`: what requests cost, by DynamoDB's size rules and
//! its answers. `admin`: `riskd store init`, `check` and `prune`.

mod admin;
mod capacity;
mod client;
mod codec;
mod commit;
mod entity;

pub use admin::{check_table, init_table, prune_markers};
pub use capacity::write_units_total;

use super::{Checkpoint, Record, Result, StateError, Store, WriteBatch};
use crate::telemetry::metrics;
use aws_sdk_dynamodb::types::AttributeValue;
use client::Remote;
use codec::{
    attr, check_item_size, check_key, checkpoint_key, decode, decode_checkpoint, integer, item_key, record_attributes,
};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};

/// The table name Panther uses, and riskd's default.
pub const DEFAULT_TABLE: &str = "panther-kv-store";

const STORE: &str = "dynamodb";

/// `[store]` settings of the DynamoDB store. Credentials are not here: they
/// come from the standard AWS chain (environment, profile, web identity,
/// container or instance role).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DynamoConfig {
    /// Table name.
    pub table: String,
    /// AWS region; `None` takes it from the standard chain (`AWS_REGION`, profile, instance).
    pub region: Option<String>,
    /// Endpoint instead of AWS's (DynamoDB Local); `None` for AWS.
    pub endpoint_url: Option<String>,
    /// Whether the table deletes expired items with DynamoDB's TTL on
    /// `expiresAt`: `riskd store init` sets it up, `riskd store check`
    /// expects it.
    pub ttl: bool,
    /// How many keys' last committed versions the store keeps in memory
    /// (for `riskdPrev`) before it forgets them all.
    pub remember_versions: usize,
    /// Read requests per second at most (`governor`); no limit when `None`.
    pub read_requests_per_second: Option<u32>,
    /// Write requests per second at most; no limit when `None`.
    pub write_requests_per_second: Option<u32>,
    /// How records map to items.
    pub layout: Layout,
}

/// How records map to items (`store.layout`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Layout {
    /// One item per key, Panther's layout: Panther's helpers read riskd's
    /// values and riskd reads theirs.
    #[default]
    Key,
    /// One item per entity, holding each rule's state and its risk (see
    /// `entity.rs`): a flush writes one item per entity it changed.
    Entity,
}

impl Layout {
    /// Its name in the config.
    pub fn name(self) -> &'static str {
        match self {
            Layout::Key => "key",
            Layout::Entity => "entity",
        }
    }
}

impl DynamoConfig {
    /// The defaults for `table`, with region and endpoint from the AWS chain.
    pub fn new(table: impl Into<String>) -> Self {
        Self {
            table: table.into(),
            region: None,
            endpoint_url: None,
            ttl: true,
            remember_versions: 1_000_000,
            read_requests_per_second: None,
            write_requests_per_second: None,
            layout: Layout::Key,
        }
    }
}

fn backend(message: impl Into<String>) -> StateError {
    StateError::Backend { store: STORE, message: message.into() }
}

fn corrupt(key: &str, message: impl Into<String>) -> StateError {
    StateError::Corrupt { store: STORE, key: key.to_string(), message: message.into() }
}

/// Records in a DynamoDB table, with crash-consistent flushes (see the
/// module documentation).
pub struct DynamoStore {
    remote: Remote,
    /// Its config, to open readers with.
    cfg: DynamoConfig,
    /// This run's id and its last flush number.
    run: String,
    seq: u64,
    // RefCell rather than a mutex: `Store` is `Send` but not `Sync`, so one
    // thread at a time calls `&self` methods, and no borrow is held across
    // a `block_on`.
    /// Highest committed flush number known per run (this one included).
    committed: RefCell<HashMap<String, u64>>,
    /// Last committed version per key and the stamp of its item, as read or
    /// written.
    versions: RefCell<HashMap<String, commit::Version>>,
    /// The commit id each input's checkpoint holds, as read or written
    /// (`None`: no checkpoint).
    commits: RefCell<HashMap<String, Option<String>>>,
    /// Entity layout: each entity's committed version, as read or written.
    entities: RefCell<HashMap<String, entity::Known>>,
    /// How many versions `versions` (and entities `entities`) holds before it is cleared.
    remember_versions: usize,
    /// How records map to items.
    layout: Layout,
    /// The table was found to hold `layout` (checked before the first request).
    layout_checked: std::cell::Cell<bool>,
}

impl DynamoStore {
    /// Connects to the table (no request is sent until the first read).
    pub fn open(cfg: &DynamoConfig) -> Result<Self> {
        let remote = Remote::connect(cfg)?;
        let run = commit::new_run();
        Ok(Self {
            remote,
            cfg: cfg.clone(),
            committed: RefCell::new(HashMap::from([(run.clone(), 0)])),
            run,
            seq: 0,
            versions: RefCell::new(HashMap::new()),
            commits: RefCell::new(HashMap::new()),
            entities: RefCell::new(HashMap::new()),
            remember_versions: cfg.remember_versions,
            layout: cfg.layout,
            layout_checked: std::cell::Cell::new(false),
        })
    }

    /// The table this store uses.
    pub fn table(&self) -> &str {
        &self.remote.table
    }

    /// Makes sure, once, that the table holds this store's layout (see
    /// `admin::claim_layout`).
    fn check_layout(&self) -> Result<()> {
        if !self.layout_checked.get() {
            admin::claim_layout(&self.remote, self.layout)?;
            self.layout_checked.set(true);
        }
        Ok(())
    }
}

impl Store for DynamoStore {
    fn kind(&self) -> &'static str {
        STORE
    }

    fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Record>>> {
        self.check_layout()?;
        if self.layout == Layout::Key {
            let resolved = self.read_committed(keys)?;
            self.remember(&resolved);
            return Ok(keys.iter().map(|k| resolved.get(*k).and_then(|v| v.record.clone())).collect());
        }
        let (own, parts): (Vec<&str>, Vec<&str>) = keys.iter().partition(|k| entity::place(k).is_none());
        let resolved = if own.is_empty() { HashMap::new() } else { self.read_committed(&own)? };
        self.remember(&resolved);
        let mut entities: Vec<&str> = parts.iter().filter_map(|k| entity::place(k)).map(|(e, _)| e).collect();
        entities.sort_unstable();
        entities.dedup();
        let known = if entities.is_empty() { HashMap::new() } else { self.read_entities(&entities)? };
        let found = keys
            .iter()
            .map(|k| match entity::place(k) {
                Some((e, name)) => known.get(e).and_then(|k| k.records.get(name)).cloned(),
                None => resolved.get(*k).and_then(|v| v.record.clone()),
            })
            .collect();
        self.remember_entities(known);
        Ok(found)
    }

    fn apply(&mut self, batch: WriteBatch<'_>) -> Result<()> {
        self.check_layout()?;
        let result = self.apply_flush(&batch);
        if result.is_err() {
            self.abandon_run();
        }
        result
    }

    fn checkpoint(&self, source: &str) -> Result<Option<Checkpoint>> {
        self.check_layout()?;
        let key = checkpoint_key(source);
        let items = self.remote.fetch(&[&key])?;
        self.commits.borrow_mut().insert(source.to_string(), items.get(&key).and_then(commit::commit_of));
        items.get(&key).map(|item| decode_checkpoint(&key, item)).transpose()
    }

    fn batched_reads(&self) -> bool {
        true
    }

    fn forget(&mut self) {
        self.versions.borrow_mut().clear();
        self.commits.borrow_mut().clear();
        self.entities.borrow_mut().clear();
    }

    /// Optimistic concurrency: read the item (committed version) and its
    /// `riskdVersion`, apply `f`, write it back only if the version did not
    /// move meanwhile; otherwise read again and retry. Direct writes carry no
    /// flush id: they are committed as soon as they are written.
    fn update(&mut self, key: &str, now_ms: i64, f: &mut dyn FnMut(&mut Record) -> bool) -> Result<()> {
        self.check_layout()?;
        check_key(key)?;
        if self.layout == Layout::Entity && entity::place(key).is_some() {
            // The config refuses `consistency: direct` rules with this layout.
            return Err(StateError::BadKey {
                store: STORE,
                key: key.to_string(),
                message: "a part of an entity item (store.layout = \"entity\") has one writer: direct updates need store.layout = \"key\"".into(),
            });
        }
        for _ in 0..64 {
            let item = self.remote.fetch(&[key])?.remove(key);
            let version = match &item {
                None => None,
                Some(it) => Some(match it.get(attr::VERSION) {
                    Some(v) => integer(key, attr::VERSION, v)?,
                    None => 0,
                }),
            };
            let stored = match &item {
                None => None,
                Some(it) => {
                    let stored = decode(key, it)?;
                    self.learn_commits(stored.flush.iter())?;
                    self.resolve(stored)
                }
            };
            let mut record = stored.filter(|r| r.is_live(now_ms)).unwrap_or_default();
            if !f(&mut record) {
                return Ok(());
            }
            let next = if record.is_empty() && record.expires_at_ms.is_none() {
                None
            } else {
                let mut it = record_attributes(key, &record)?;
                it.insert(attr::VERSION.into(), AttributeValue::N((version.unwrap_or(0) + 1).to_string()));
                check_item_size(key, &it)?;
                Some(it)
            };
            if next.is_none() && item.is_none() {
                return Ok(());
            }
            if self.remote.put_if_version(key, next, version)? {
                // Whatever the write-back side remembered of this key is stale now.
                self.versions.borrow_mut().remove(key);
                return Ok(());
            }
            metrics().dynamodb_retries.with_label_values(&["PutItem"]).inc();
        }
        Err(backend(format!("key {key:?}: still changed by others after 64 tries")))
    }

    fn reader(&self) -> Option<Box<dyn Store>> {
        // A store of its own (client, runtime): it reads committed versions only.
        DynamoStore::open(&self.cfg).ok().map(|s| Box::new(s) as Box<dyn Store>)
    }

    fn scan(&self, prefix: &str, visit: &mut dyn FnMut(&str, &Record)) -> Result<()> {
        self.check_layout()?;
        // riskd's own items (checkpoints, markers) are filtered out by the table.
        let mut filter = format!("attribute_not_exists({})", attr::META);
        if self.layout == Layout::Entity {
            // Entity items hold keys of every prefix: the filter is ours.
            let items = self.remote.scan_all(|req| req.filter_expression(&filter))?;
            for (key, record) in &self.scanned_records(&items, prefix)? {
                visit(key, record);
            }
            return Ok(());
        }
        if !prefix.is_empty() {
            filter.push_str(" AND begins_with(#k, :p)");
        }
        let items = self.remote.scan_all(|req| {
            let req = req.filter_expression(&filter);
            if prefix.is_empty() {
                return req;
            }
            req.expression_attribute_names("#k", attr::KEY)
                .expression_attribute_values(":p", AttributeValue::S(prefix.to_string()))
        })?;
        let mut stored = Vec::with_capacity(items.len());
        for item in &items {
            let Some(key) = item_key(item) else { continue };
            stored.push((key.to_string(), decode(key, item)?));
        }
        self.learn_commits(stored.iter().filter_map(|(_, s)| s.flush.as_ref()))?;
        // Scan order is the table's hash order: sort to give key order.
        let records: BTreeMap<String, Record> =
            stored.into_iter().filter_map(|(k, s)| self.resolve(s).map(|r| (k, r))).collect();
        for (key, record) in &records {
            visit(key, record);
        }
        Ok(())
    }
}
