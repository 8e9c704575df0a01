//! The flush and commit protocol of the module documentation: writing a
//! flush's items stamped with their flush and previous versions, the
//! commit that makes them count, and reading items as committed versions.

use super::codec::{
    attr, check_item_size, check_key, checkpoint_item, decode, integer, item_key, key_item, marker_key,
    record_attributes, stamp, FlushId, Item, Stored, MARKER_PREFIX,
};
use super::{backend, entity, DynamoStore, Layout, STORE};
use crate::state::{Mutation, Record, RequestFailure, Result, StateError, WriteBatch};
use aws_sdk_dynamodb::types::{AttributeValue, DeleteRequest, PutRequest, WriteRequest};
use std::collections::{HashMap, HashSet};

/// Items in one TransactWriteItems.
const MAX_TRANSACT_ITEMS: usize = 100;

/// A new run id: random, so that no two opened stores share one.
pub(super) fn new_run() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// A request that puts `item`.
pub(super) fn put_request(item: Item) -> Result<WriteRequest> {
    let put = PutRequest::builder().set_item(Some(item)).build().map_err(|e| backend(e.to_string()))?;
    Ok(WriteRequest::builder().put_request(put).build())
}

/// A request that deletes the item under `key`.
fn delete_request(key: &str) -> Result<WriteRequest> {
    let delete = DeleteRequest::builder().set_key(Some(key_item(key))).build().map_err(|e| backend(e.to_string()))?;
    Ok(WriteRequest::builder().delete_request(delete).build())
}

/// The request that writes `mutation` of `key` as an item of its own in
/// flush `flush`, over its committed version `prev`; `None` when the item
/// already holds it. A tombstone's key is added to `tombstones`.
pub(super) fn own_item_write(
    key: &str,
    mutation: Mutation<'_>,
    prev: Option<&Record>,
    flush: &str,
    tombstones: &mut Vec<String>,
) -> Result<Option<WriteRequest>> {
    check_key(key)?;
    let request = match mutation {
        // The key already holds exactly this: nothing to write.
        Mutation::Put(record) if prev == Some(record) => return Ok(None),
        Mutation::Put(record) => {
            let mut item = record_attributes(key, record)?;
            stamp(&mut item, key, flush, prev)?;
            check_item_size(key, &item)?;
            put_request(item)?
        }
        // Nothing committed to keep: a plain delete (which also removes any
        // half-written item of a crashed flush).
        Mutation::Delete if prev.is_none() => delete_request(key)?,
        Mutation::Delete => {
            let mut item = key_item(key);
            item.insert(attr::DELETED.into(), AttributeValue::Bool(true));
            stamp(&mut item, key, flush, prev)?;
            check_item_size(key, &item)?;
            tombstones.push(key.to_string());
            put_request(item)?
        }
    };
    Ok(Some(request))
}

/// What a flush writes.
pub(super) struct FlushWrites {
    /// One request per key that changes, with the key.
    writes: Vec<(String, WriteRequest)>,
    /// The keys whose requests write tombstones, removed after the commit.
    tombstones: Vec<String>,
}

impl DynamoStore {
    /// Learns the committed flush numbers of the runs that wrote `stored`
    /// items, where what is known does not already commit them.
    pub(super) fn learn_commits<'a>(&self, flushes: impl Iterator<Item = &'a FlushId>) -> Result<()> {
        let unknown: HashSet<String> = {
            let committed = self.committed.borrow();
            flushes
                .filter(|f| f.run != self.run && committed.get(&f.run).is_none_or(|c| f.seq > *c))
                .map(|f| marker_key(&f.run))
                .collect()
        };
        if unknown.is_empty() {
            return Ok(());
        }
        let keys: Vec<&str> = unknown.iter().map(String::as_str).collect();
        let markers = self.remote.fetch(&keys)?;
        let mut committed = self.committed.borrow_mut();
        for key in &keys {
            let seq = match markers.get(*key).and_then(|m| m.get(attr::COMMITTED_SEQ)) {
                Some(v) => u64::try_from(integer(key, attr::COMMITTED_SEQ, v)?).unwrap_or(0),
                None => 0,
            };
            if let Some(run) = key.strip_prefix(MARKER_PREFIX) {
                committed.insert(run.to_string(), seq);
            }
        }
        Ok(())
    }

    /// Whether a flush is known to have committed (learn it first).
    pub(super) fn is_committed(&self, flush: &FlushId) -> bool {
        self.committed.borrow().get(&flush.run).is_some_and(|c| flush.seq <= *c)
    }

    /// The committed version of a stored item.
    pub(super) fn resolve(&self, stored: Stored) -> Option<Record> {
        let Some(flush) = &stored.flush else {
            return Some(stored.record);
        };
        match (self.is_committed(flush), stored.deleted) {
            (true, true) => None,
            (true, false) => Some(stored.record),
            (false, _) => stored.prev,
        }
    }

    /// Reads `keys` (any order, repeats allowed) as committed versions.
    pub(super) fn read_committed(&self, keys: &[&str]) -> Result<HashMap<String, Option<Record>>> {
        let mut unique: Vec<&str> = Vec::with_capacity(keys.len());
        let mut seen = HashSet::with_capacity(keys.len());
        for key in keys {
            check_key(key)?;
            if seen.insert(*key) {
                unique.push(key);
            }
        }
        let items = self.remote.fetch(&unique)?;
        let stored: Vec<(&str, Option<Stored>)> = unique
            .iter()
            .map(|k| Ok((*k, items.get(*k).map(|item| decode(k, item)).transpose()?)))
            .collect::<Result<_>>()?;
        self.learn_commits(stored.iter().filter_map(|(_, s)| s.as_ref()?.flush.as_ref()))?;
        Ok(stored.into_iter().map(|(k, s)| (k.to_string(), s.and_then(|s| self.resolve(s)))).collect())
    }

    /// Remembers committed versions for `riskdPrev`, forgetting all the
    /// others first when the bound would be passed.
    pub(super) fn remember(&self, read: &HashMap<String, Option<Record>>) {
        let mut versions = self.versions.borrow_mut();
        if versions.len() + read.len() > self.remember_versions {
            versions.clear();
        }
        versions.extend(read.iter().map(|(k, v)| (k.clone(), v.clone())));
    }

    /// Forgets everything a failed `apply` may have made untrue, and starts
    /// a new run so that nothing of the failed flush can ever commit.
    pub(super) fn abandon_run(&mut self) {
        self.versions.borrow_mut().clear();
        self.entities.borrow_mut().clear();
        self.run = new_run();
        self.seq = 0;
        self.committed.borrow_mut().insert(self.run.clone(), 0);
    }

    /// Writes a batch as flush `<run>:<seq+1>` and commits it (see the
    /// module documentation); on error the caller abandons the run.
    pub(super) fn apply_flush(&mut self, batch: &WriteBatch<'_>) -> Result<()> {
        // In the entity layout, the keys that are parts of entities go to
        // their entity's item; the others are items of their own.
        let (own, parts) = match self.layout {
            Layout::Key => (batch.mutations.clone(), Default::default()),
            Layout::Entity => entity::split(&batch.mutations),
        };
        let missing: Vec<&str> = {
            let versions = self.versions.borrow();
            own.iter().map(|(k, _)| *k).filter(|k| !versions.contains_key(*k)).collect()
        };
        // Keys the store has forgotten: read now (remembering them could
        // evict others this flush needs, so they are used from here).
        let fetched = if missing.is_empty() { HashMap::new() } else { self.read_committed(&missing)? };
        let seq = self.seq + 1;
        let flush = format!("{}:{seq}", self.run);
        let FlushWrites { mut writes, mut tombstones } = self.flush_writes(&own, &fetched, &flush)?;
        let entities = self.entity_writes(&parts, &flush, &mut writes, &mut tombstones)?;
        let wrote = !writes.is_empty();
        if wrote {
            self.remote.write(writes)?;
        }
        self.commit(batch, &flush, seq, wrote)?;
        if wrote {
            self.seq = seq;
            self.committed.borrow_mut().insert(self.run.clone(), seq);
        }
        self.remember_flush(&own);
        self.remember_entities(entities);
        if !tombstones.is_empty() {
            self.remove_tombstones(tombstones);
        }
        Ok(())
    }

    /// The write requests of flush `flush` (each with its key), stamped with
    /// the keys' previous committed versions from `fetched` or from what the
    /// store remembers; and the keys written as tombstones.
    fn flush_writes(
        &self,
        mutations: &[(&str, Mutation<'_>)],
        fetched: &HashMap<String, Option<Record>>,
        flush: &str,
    ) -> Result<FlushWrites> {
        let mut writes = Vec::new();
        let mut tombstones = Vec::new();
        let versions = self.versions.borrow();
        for (key, mutation) in mutations {
            let prev = match fetched.get(*key) {
                Some(read) => read.as_ref(),
                None => versions.get(*key).and_then(Option::as_ref),
            };
            let Some(request) = own_item_write(key, *mutation, prev, flush, &mut tombstones)? else { continue };
            writes.push((key.to_string(), request));
        }
        Ok(FlushWrites { writes, tombstones })
    }

    /// The commit point: writes the batch's checkpoints and, when the flush
    /// `wrote` items, sets the run's marker to `seq`, all in one request.
    fn commit(&self, batch: &WriteBatch<'_>, flush: &str, seq: u64, wrote: bool) -> Result<()> {
        let mut items = Vec::with_capacity(batch.checkpoints.len() + 1);
        for (source, cp) in &batch.checkpoints {
            items.push(checkpoint_item(source, cp, wrote.then_some(flush))?);
        }
        if wrote {
            let mut item = key_item(&marker_key(&self.run));
            item.insert(attr::META.into(), AttributeValue::S("flush".into()));
            item.insert(attr::COMMITTED_SEQ.into(), AttributeValue::N(seq.to_string()));
            // Wall-clock time of the commit: `riskd store prune` leaves recent markers alone.
            item.insert(attr::COMMITTED_AT.into(), AttributeValue::N(crate::event::now_ms().to_string()));
            items.push(item);
        }
        match items.len() {
            0 => Ok(()),
            1 => {
                let item = items.pop().ok_or_else(|| backend("no item"))?;
                let key = item_key(&item).unwrap_or_default().to_string();
                self.remote.put(&key, item)
            }
            n if n <= MAX_TRANSACT_ITEMS => self.remote.transact_put(items),
            n => Err(StateError::Request(Box::new(RequestFailure {
                store: STORE,
                operation: "TransactWriteItems",
                table: self.remote.table.clone(),
                key: None,
                code: "TooManyCheckpoints".into(),
                message: format!(
                    "one flush would commit {} input positions with its marker, over DynamoDB's {MAX_TRANSACT_ITEMS} items per transaction: run more instances, or fewer partitions per instance",
                    n - usize::from(wrote)
                ),
                transient: false,
            }))),
        }
    }

    /// Remembers the batch's values as the keys' committed versions.
    fn remember_flush(&self, mutations: &[(&str, Mutation<'_>)]) {
        let mut versions = self.versions.borrow_mut();
        for (key, mutation) in mutations {
            let now = match mutation {
                Mutation::Put(record) => Some((*record).clone()),
                Mutation::Delete => None,
            };
            versions.insert(key.to_string(), now);
        }
        if versions.len() > self.remember_versions {
            versions.clear();
        }
    }

    /// Deletes the tombstones of a committed flush.
    fn remove_tombstones(&self, tombstones: Vec<String>) {
        // Committed tombstones read as absent: removing them only saves
        // space, so a failure here is not the flush's failure.
        let deletes: Result<Vec<_>> =
            tombstones.into_iter().map(|key| delete_request(&key).map(|delete| (key, delete))).collect();
        if let Err(e) = deletes.and_then(|d| self.remote.write(d)) {
            tracing::warn!(error = %e, "could not remove committed tombstones (they read as absent)");
        }
    }
}
