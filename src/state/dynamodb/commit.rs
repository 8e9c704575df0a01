//! The flush and commit protocol of the module documentation: writing a
//! flush's items stamped with their flush and previous versions, the
//! commit that makes them count, and reading items as committed versions.

use super::client::CommitCondition;
use super::codec::{
    attr, check_item_size, check_key, checkpoint_item, checkpoint_key, decode, integer, item_key, key_item, marker_key,
    record_attributes, stamp, FlushId, Item, Stored, MARKER_PREFIX,
};
use super::{backend, entity, DynamoStore, Layout, STORE};
use crate::state::{Mutation, Record, RequestFailure, Result, StateError, WriteBatch};
use aws_sdk_dynamodb::types::AttributeValue;
use std::collections::{HashMap, HashSet};

/// The commit id a checkpoint item holds.
pub(super) fn commit_of(item: &Item) -> Option<String> {
    match item.get(attr::COMMIT) {
        Some(AttributeValue::S(id)) => Some(id.clone()),
        _ => None,
    }
}

/// Items in one TransactWriteItems.
const MAX_TRANSACT_ITEMS: usize = 100;

/// A new run id: random, so that no two opened stores share one.
pub(super) fn new_run() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// What the table holds under a key as far as the store knows, which
/// every write there is conditioned on: a write that was delayed (a
/// request that timed out, then landed after a later one) or a writer that
/// came between finds the item changed, and fails instead of overwriting a
/// newer version.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) enum Stamp {
    /// No item, or one riskd did not write (no `riskdFlush`).
    #[default]
    Unstamped,
    /// An item written by this flush.
    Flush(String),
}

impl Stamp {
    /// The stamp of an item as read.
    pub(super) fn of(flush: Option<&FlushId>) -> Self {
        flush.map_or(Stamp::Unstamped, |f| Stamp::Flush(f.text.clone()))
    }
}

/// A key's committed version and the stamp of its item.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Version {
    /// The committed record (`None`: absent).
    pub(super) record: Option<Record>,
    /// What its item is stamped with.
    pub(super) stamp: Stamp,
}

/// One item written by a flush, conditioned on what it replaces.
#[derive(Clone, Debug)]
pub(super) struct Write {
    /// Its key.
    pub(super) key: String,
    /// The item to put; `None` deletes it.
    pub(super) item: Option<Item>,
    /// What the item must still be stamped with.
    pub(super) over: Stamp,
    /// The flush writing it (a retry of a put that landed finds it).
    pub(super) flush: String,
}

impl Write {
    /// The key's stamp once this write landed.
    pub(super) fn stamp_after(&self) -> Stamp {
        match self.item {
            Some(_) => Stamp::Flush(self.flush.clone()),
            None => Stamp::Unstamped,
        }
    }
}

/// The write of `mutation` of `key` as an item of its own in flush
/// `flush`, over its committed version `prev`; `None` when the item already
/// holds it. A tombstone's key is added to `tombstones`.
pub(super) fn own_item_write(
    key: &str,
    mutation: Mutation<'_>,
    prev: &Version,
    flush: &str,
    tombstones: &mut Vec<String>,
) -> Result<Option<Write>> {
    check_key(key)?;
    let item = match mutation {
        // The key already holds exactly this: nothing to write.
        Mutation::Put(record) if prev.record.as_ref() == Some(record) => return Ok(None),
        Mutation::Put(record) => {
            let mut item = record_attributes(key, record)?;
            stamp(&mut item, key, flush, prev.record.as_ref())?;
            check_item_size(key, &item)?;
            Some(item)
        }
        // Nothing committed, nothing stored: nothing to do.
        Mutation::Delete if prev.record.is_none() && prev.stamp == Stamp::Unstamped => return Ok(None),
        // Nothing committed to keep: a plain delete (of the half-written
        // item of a crashed flush).
        Mutation::Delete if prev.record.is_none() => None,
        Mutation::Delete => {
            let mut item = key_item(key);
            item.insert(attr::DELETED.into(), AttributeValue::Bool(true));
            stamp(&mut item, key, flush, prev.record.as_ref())?;
            check_item_size(key, &item)?;
            tombstones.push(key.to_string());
            Some(item)
        }
    };
    Ok(Some(Write { key: key.to_string(), item, over: prev.stamp.clone(), flush: flush.to_string() }))
}

/// What a flush writes.
#[derive(Default)]
pub(super) struct FlushWrites {
    /// One write per item that changes.
    pub(super) writes: Vec<Write>,
    /// The keys whose writes are tombstones, removed after the commit.
    pub(super) tombstones: Vec<String>,
    /// Each key kept as an item of its own: its version once the flush committed.
    pub(super) after: Vec<(String, Version)>,
}

impl FlushWrites {
    /// Adds the write of `mutation` of `key`, an item of its own, over its
    /// committed version `prev` (see [`own_item_write`]), and the key's
    /// version after it.
    pub(super) fn own_item(&mut self, key: &str, mutation: Mutation<'_>, prev: Version, flush: &str) -> Result<()> {
        let record = match mutation {
            Mutation::Put(r) => Some(r.clone()),
            Mutation::Delete => None,
        };
        let stamp = match own_item_write(key, mutation, &prev, flush, &mut self.tombstones)? {
            Some(write) => {
                let stamp = write.stamp_after();
                self.writes.push(write);
                stamp
            }
            None => prev.stamp,
        };
        self.after.push((key.to_string(), Version { record, stamp }));
        Ok(())
    }
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
    pub(super) fn read_committed(&self, keys: &[&str]) -> Result<HashMap<String, Version>> {
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
        Ok(stored
            .into_iter()
            .map(|(k, s)| {
                let stamp = Stamp::of(s.as_ref().and_then(|s| s.flush.as_ref()));
                (k.to_string(), Version { record: s.and_then(|s| self.resolve(s)), stamp })
            })
            .collect())
    }

    /// Remembers committed versions for `riskdPrev`, forgetting all the
    /// others first when the bound would be passed.
    pub(super) fn remember(&self, read: &HashMap<String, Version>) {
        let mut versions = self.versions.borrow_mut();
        if versions.len() + read.len() > self.remember_versions {
            versions.clear();
        }
        versions.extend(read.iter().map(|(k, v)| (k.clone(), v.clone())));
    }

    /// Forgets everything a failed `apply` may have made untrue, and starts
    /// a new run so that nothing of the failed flush can ever commit.
    pub(super) fn abandon_run(&mut self) {
        crate::state::Store::forget(self);
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
        let seq = self.seq + 1;
        let flush = format!("{}:{seq}", self.run);
        let mut out = self.flush_writes(&own, &flush)?;
        let entities = self.entity_writes(&parts, &flush, &mut out)?;
        let FlushWrites { writes, tombstones, after } = out;
        let wrote = !writes.is_empty();
        if wrote {
            self.remote.write_items(writes)?;
        }
        self.commit(batch, &flush, seq, wrote)?;
        if wrote {
            self.seq = seq;
            self.committed.borrow_mut().insert(self.run.clone(), seq);
        }
        self.remember_versions(after);
        self.remember_entities(entities);
        if !tombstones.is_empty() {
            self.remove_tombstones(tombstones, &flush);
        }
        Ok(())
    }

    /// The versions of `keys`, from what the store remembers or read now
    /// (remembering them could evict others this flush needs, so they are
    /// used from here).
    pub(super) fn versions_of(&self, keys: &[&str]) -> Result<HashMap<String, Version>> {
        let missing: Vec<&str> = {
            let versions = self.versions.borrow();
            keys.iter().copied().filter(|k| !versions.contains_key(*k)).collect()
        };
        let mut out = if missing.is_empty() { HashMap::new() } else { self.read_committed(&missing)? };
        let versions = self.versions.borrow();
        for key in keys {
            if let Some(v) = versions.get(*key) {
                out.entry(key.to_string()).or_insert_with(|| v.clone());
            }
        }
        Ok(out)
    }

    /// The writes of flush `flush` for keys kept as items of their own,
    /// stamped with the keys' previous committed versions.
    fn flush_writes(&self, mutations: &[(&str, Mutation<'_>)], flush: &str) -> Result<FlushWrites> {
        let keys: Vec<&str> = mutations.iter().map(|(k, _)| *k).collect();
        let versions = self.versions_of(&keys)?;
        let mut out = FlushWrites::default();
        for (key, mutation) in mutations {
            out.own_item(key, *mutation, versions.get(*key).cloned().unwrap_or_default(), flush)?;
        }
        Ok(out)
    }

    /// The commit point: writes the batch's checkpoints and, when the flush
    /// `wrote` items, sets the run's marker to `seq`, all in one request.
    fn commit(&self, batch: &WriteBatch<'_>, flush: &str, seq: u64, wrote: bool) -> Result<()> {
        let mut items = Vec::with_capacity(batch.checkpoints.len() + 1);
        // Each checkpoint is conditioned on the one this store last saw: a
        // delayed commit of an abandoned flush cannot move it back.
        let sources: Vec<&str> = batch.checkpoints.iter().map(|(s, _)| *s).collect();
        self.learn_checkpoint_commits(&sources)?;
        let commit_id = new_run();
        let mut committing = Vec::new();
        {
            let commits = self.commits.borrow();
            for (source, cp) in &batch.checkpoints {
                let mut item = checkpoint_item(source, cp, wrote.then_some(flush))?;
                item.insert(attr::COMMIT.into(), AttributeValue::S(commit_id.clone()));
                let over = commits.get(*source).cloned().flatten();
                items.push((item, Some(CommitCondition { over, mine: commit_id.clone() })));
                committing.push(source.to_string());
            }
        }
        if wrote {
            let mut item = key_item(&marker_key(&self.run));
            item.insert(attr::META.into(), AttributeValue::S("flush".into()));
            item.insert(attr::COMMITTED_SEQ.into(), AttributeValue::N(seq.to_string()));
            // Wall-clock time of the commit: `riskd store prune` leaves recent markers alone.
            item.insert(attr::COMMITTED_AT.into(), AttributeValue::N(crate::event::now_ms().to_string()));
            items.push((item, None));
        }
        let sent = match items.len() {
            0 => Ok(()),
            1 => {
                let (item, condition) = items.pop().ok_or_else(|| backend("no item"))?;
                let key = item_key(&item).unwrap_or_default().to_string();
                self.remote.put(&key, item, condition.as_ref())
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
        };
        sent?;
        let mut commits = self.commits.borrow_mut();
        for source in committing {
            commits.insert(source, Some(commit_id.clone()));
        }
        Ok(())
    }

    /// Learns the commit ids of the checkpoints of `sources` the store does
    /// not know yet.
    fn learn_checkpoint_commits(&self, sources: &[&str]) -> Result<()> {
        let unknown: Vec<(&str, String)> = {
            let commits = self.commits.borrow();
            sources.iter().filter(|s| !commits.contains_key(**s)).map(|s| (*s, checkpoint_key(s))).collect()
        };
        if unknown.is_empty() {
            return Ok(());
        }
        let keys: Vec<&str> = unknown.iter().map(|(_, key)| key.as_str()).collect();
        let items = self.remote.fetch(&keys)?;
        let mut commits = self.commits.borrow_mut();
        for (source, key) in &unknown {
            commits.insert(source.to_string(), items.get(key).and_then(commit_of));
        }
        Ok(())
    }

    /// Remembers the keys' versions after a flush.
    fn remember_versions(&self, after: Vec<(String, Version)>) {
        let mut versions = self.versions.borrow_mut();
        if versions.len() + after.len() > self.remember_versions {
            versions.clear();
        }
        versions.extend(after);
    }

    /// Deletes the tombstones of committed flush `flush`.
    fn remove_tombstones(&self, tombstones: Vec<String>, flush: &str) {
        // Committed tombstones read as absent: removing them only saves
        // space, so a failure here is not the flush's failure (the store
        // then forgets them, and reads them again when it next writes there).
        let deletes: Vec<Write> = tombstones
            .iter()
            .map(|key| Write {
                key: key.clone(),
                item: None,
                over: Stamp::Flush(flush.to_string()),
                flush: flush.to_string(),
            })
            .collect();
        let result = self.remote.write_items(deletes);
        let mut versions = self.versions.borrow_mut();
        let mut entities = self.entities.borrow_mut();
        for key in &tombstones {
            match (&result, key.strip_prefix(entity::ENTITY_PREFIX)) {
                (Ok(()), None) => {
                    versions.insert(key.clone(), Version::default());
                }
                (Ok(()), Some(e)) => {
                    if let Some(k) = entities.get_mut(e) {
                        k.stamp = Stamp::Unstamped;
                    }
                }
                (Err(_), None) => {
                    versions.remove(key);
                }
                (Err(_), Some(e)) => {
                    entities.remove(e);
                }
            }
        }
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not remove committed tombstones (they read as absent)");
        }
    }
}
