//! The write-back cache and the twelve state primitives.
//!
//! Reads load a key from the store once; every change after that is made in
//! memory and the key is marked dirty; [`StateCache::flush`] writes each dirty
//! key once, with the checkpoint the changes cover, in one batch. So the store
//! sees one write per distinct key per flush, not one per event.
//!
//! All primitives take `now_ms`, the event time of the event being applied:
//! expiry is decided on event time, so a replay gives the same results. A key
//! whose expiry has been reached reads as its defaults (0, empty set, `{}`)
//! and a write to it starts from those defaults: an expired counter never
//! resurrects its old count.

use super::{Checkpoint, Mutation, Record, Result, StateError, Store, WriteBatch, MAX_DICT_BYTES};
use crate::telemetry::metrics;
use serde_json::{Map, Value};
// hashbrown for `entry_ref` (look up by &str, allocate the key only on
// insert) and its fast default hasher: this map is on every event's path.
use hashbrown::HashMap;
use std::collections::BTreeSet;

/// When a key expires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// At this event time (ms since the epoch).
    At(i64),
    /// This many milliseconds after the current event time.
    After(i64),
}

/// How a key is changed: in the write-back cache, or in the store at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// In the cache, written at the next flush: keys one process owns.
    Cached,
    /// One atomic store update per change: keys several processes write
    /// (`consistency: direct` rules, the watermark of a shared store).
    Direct,
}

impl Access {
    /// `Direct` when `direct`, else `Cached`.
    pub fn direct_if(direct: bool) -> Self {
        if direct {
            Access::Direct
        } else {
            Access::Cached
        }
    }
}

#[derive(Debug)]
struct Entry {
    record: Record,
    dirty: bool,
    /// The flush epoch it was last read or written in: eviction drops the
    /// least recently used clean entries first.
    used: u32,
}

/// Write-back cache in front of a [`Store`].
pub struct StateCache {
    store: Box<dyn Store>,
    entries: HashMap<String, Entry>,
    max_entries: usize,
    max_bytes: usize,
    /// Approximate bytes held: exact after a flush, grown by loads since.
    bytes: usize,
    /// Lookups (hits, misses) not yet published to the metrics.
    lookups: (u64, u64),
    /// Flushes so far (the clock of least-recently-used eviction).
    epoch: u32,
    /// `store.expiry_granule`: see [`granular_expiry`].
    expiry_granule: f64,
    /// Writes avoided by the granule, not yet published to the metrics.
    avoided: u64,
}

/// The expiry stored for a refresh at event time `now_ms` to `at`: `at`
/// rounded up to a multiple of `granule` times the lifetime being applied
/// (`at - now_ms`: the `ttl`, or the distance to an absolute expiry). Every
/// refresh within one step stores the same expiry, so the record does not
/// change and is not written again; an expiry is at most one granule later
/// than the strict one, never earlier (nothing is forgotten early). Only
/// event time and the refresh decide it, never when the cache flushed, so
/// a replay stores the same; `granule` 0 stores `at`.
pub fn granular_expiry(at: i64, now_ms: i64, granule: f64) -> i64 {
    let step = (granule * at.saturating_sub(now_ms) as f64) as i64;
    if step <= 1 {
        return at;
    }
    at.div_euclid(step).saturating_add(i64::from(at.rem_euclid(step) != 0)).saturating_mul(step)
}

impl StateCache {
    /// A cache over `store` bounded to `max_entries` entries; see
    /// [`with_bounds`](Self::with_bounds).
    pub fn new(store: Box<dyn Store>, max_entries: usize) -> Self {
        Self::with_bounds(store, max_entries, usize::MAX)
    }

    /// A cache over `store` bounded to `max_entries` entries and about
    /// `max_bytes` bytes. Dirty entries stay until flushed; the job flushes
    /// early when [`over_bounds`](Self::over_bounds), and a flush that leaves
    /// the cache over a bound evicts the least recently used clean entries.
    pub fn with_bounds(store: Box<dyn Store>, max_entries: usize, max_bytes: usize) -> Self {
        Self {
            store,
            entries: HashMap::new(),
            max_entries,
            max_bytes,
            bytes: 0,
            lookups: (0, 0),
            epoch: 0,
            expiry_granule: 0.0,
            avoided: 0,
        }
    }

    /// Sets `store.expiry_granule` (0, the default here, applies expiries strictly).
    pub fn with_expiry_granule(mut self, granule: f64) -> Self {
        self.expiry_granule = granule;
        self
    }

    /// `store.expiry_granule`, for expiry refreshes made inside [`update`](Self::update).
    pub fn expiry_granule(&self) -> f64 {
        self.expiry_granule
    }

    /// Counts a write avoided by the granule (published with the lookups).
    pub fn note_expiry_kept(&mut self) {
        self.avoided += 1;
    }

    /// Whether the cache holds more than its bounds allow (flush, then it evicts).
    pub fn over_bounds(&self) -> bool {
        self.entries.len() > self.max_entries || self.bytes > self.max_bytes
    }

    /// The store behind the cache.
    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// The store behind the cache, for changes that bypass it (`direct` rules).
    pub fn store_mut(&mut self) -> &mut dyn Store {
        self.store.as_mut()
    }

    /// Number of keys changed since the last flush.
    pub fn dirty_keys(&self) -> usize {
        self.entries.values().filter(|e| e.dirty).count()
    }

    /// Whether `key` is in the cache (counted as a hit when it is).
    pub fn is_cached(&mut self, key: &str) -> bool {
        let cached = self.entries.contains_key(key);
        self.lookups.0 += u64::from(cached);
        cached
    }

    /// Loads the keys not yet cached in one store read.
    pub fn prefetch(&mut self, keys: &[&str]) -> Result<()> {
        let missing: Vec<&str> = keys.iter().copied().filter(|k| !self.entries.contains_key(*k)).collect();
        self.lookups.0 += (keys.len() - missing.len()) as u64;
        if missing.is_empty() {
            return Ok(());
        }
        self.lookups.1 += missing.len() as u64;
        let found = self.store.get_many(&missing)?;
        for (key, record) in missing.into_iter().zip(found) {
            let record = record.unwrap_or_default();
            self.bytes += key.len() + approx_bytes(&record);
            self.entries.insert(key.to_string(), Entry { record, dirty: false, used: self.epoch });
        }
        Ok(())
    }

    fn entry(&mut self, key: &str) -> Result<&mut Entry> {
        match self.entries.entry_ref(key) {
            hashbrown::hash_map::EntryRef::Occupied(e) => {
                let entry = e.into_mut();
                entry.used = self.epoch;
                Ok(entry)
            }
            hashbrown::hash_map::EntryRef::Vacant(e) => {
                self.lookups.1 += 1;
                let record = self.store.get_many(&[key])?.pop().flatten().unwrap_or_default();
                self.bytes += key.len() + approx_bytes(&record);
                Ok(e.insert(Entry { record, dirty: false, used: self.epoch }))
            }
        }
    }

    /// The live record under `key` at `now_ms`, or `None`.
    pub fn read(&mut self, key: &str, now_ms: i64) -> Result<Option<&Record>> {
        let entry = self.entry(key)?;
        Ok(Some(&entry.record).filter(|r| r.is_live(now_ms) && (!r.is_empty() || r.expires_at_ms.is_some())))
    }

    /// The record under `key` for writing: expired values are cleared first.
    pub fn write(&mut self, key: &str, now_ms: i64) -> Result<&mut Record> {
        let entry = self.entry(key)?;
        entry.dirty = true;
        if !entry.record.is_live(now_ms) {
            entry.record = Record::default();
        }
        Ok(&mut entry.record)
    }

    /// Changes `key` at event time `now_ms` through `f`, which gets the live
    /// record (the default when absent or expired) and says whether it
    /// changed it. [`Access::Cached`] changes the cached copy (written at the
    /// next flush); [`Access::Direct`] changes the store at once, atomically
    /// (`f` may then run more than once: see [`Store::update`]).
    pub fn update(
        &mut self,
        access: Access,
        key: &str,
        now_ms: i64,
        f: &mut dyn FnMut(&mut Record) -> bool,
    ) -> Result<()> {
        if access == Access::Direct {
            return self.store.update(key, now_ms, f);
        }
        let entry = self.entry(key)?;
        if entry.record.is_live(now_ms) {
            entry.dirty |= f(&mut entry.record);
        } else {
            // An expired record reads as the default, and a write starts from it.
            let mut fresh = Record::default();
            if f(&mut fresh) {
                entry.record = fresh;
                entry.dirty = true;
            }
        }
        Ok(())
    }

    /// Removes every key starting with `prefix`, in the cache and (at the
    /// next flush) in the store; returns how many.
    pub fn purge_prefix(&mut self, prefix: &str) -> Result<usize> {
        let mut keys: Vec<String> = Vec::new();
        self.store.scan(prefix, &mut |k, _| keys.push(k.to_string()))?;
        keys.extend(self.entries.keys().filter(|k| k.starts_with(prefix)).cloned());
        keys.sort();
        keys.dedup();
        for key in &keys {
            let entry = self.entry(key)?;
            entry.record = Record::default();
            entry.dirty = true;
        }
        Ok(keys.len())
    }

    /// Removes every value and the expiry of `key`.
    pub fn delete(&mut self, key: &str, now_ms: i64) -> Result<()> {
        *self.write(key, now_ms)? = Record::default();
        Ok(())
    }

    // --- counters -------------------------------------------------------

    /// `get_counter`: the count, 0 when absent or expired.
    pub fn get_counter(&mut self, key: &str, now_ms: i64) -> Result<i64> {
        Ok(self.read(key, now_ms)?.map_or(0, |r| r.count))
    }

    /// `increment_counter`: adds `by` and returns the new count.
    pub fn increment_counter(&mut self, key: &str, by: i64, now_ms: i64) -> Result<i64> {
        let record = self.write(key, now_ms)?;
        record.count = record.count.saturating_add(by);
        Ok(record.count)
    }

    /// `reset_counter`: back to 0, leaving the key's other values alone.
    pub fn reset_counter(&mut self, key: &str, now_ms: i64) -> Result<()> {
        self.write(key, now_ms)?.count = 0;
        Ok(())
    }

    // --- string sets ----------------------------------------------------

    /// `get_string_set`: the set, empty when absent or expired.
    pub fn get_string_set(&mut self, key: &str, now_ms: i64) -> Result<BTreeSet<String>> {
        Ok(self.read(key, now_ms)?.map(|r| r.set.clone()).unwrap_or_default())
    }

    /// `put_string_set`: replaces the set.
    pub fn put_string_set(&mut self, key: &str, values: BTreeSet<String>, now_ms: i64) -> Result<()> {
        self.write(key, now_ms)?.set = values;
        Ok(())
    }

    /// `add_to_string_set`: adds one or many values, returns the new size.
    pub fn add_to_string_set<I, S>(&mut self, key: &str, values: I, now_ms: i64) -> Result<usize>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let record = self.write(key, now_ms)?;
        record.set.extend(values.into_iter().map(Into::into));
        Ok(record.set.len())
    }

    /// `remove_from_string_set`: removes one or many values, returns the new size.
    pub fn remove_from_string_set<I, S>(&mut self, key: &str, values: I, now_ms: i64) -> Result<usize>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let record = self.write(key, now_ms)?;
        for v in values {
            record.set.remove(v.as_ref());
        }
        Ok(record.set.len())
    }

    /// `reset_string_set`: empties the set, leaving the key's other values alone.
    pub fn reset_string_set(&mut self, key: &str, now_ms: i64) -> Result<()> {
        self.write(key, now_ms)?.set.clear();
        Ok(())
    }

    // --- dictionaries ---------------------------------------------------

    /// `get_dictionary`: the object, `{}` when absent or expired.
    pub fn get_dictionary(&mut self, key: &str, now_ms: i64) -> Result<Map<String, Value>> {
        Ok(self.read(key, now_ms)?.and_then(|r| r.dict.clone()).unwrap_or_default())
    }

    /// `put_dictionary`: replaces the object; over [`MAX_DICT_BYTES`]
    /// serialized it is refused and the stored one is left as it was.
    pub fn put_dictionary(&mut self, key: &str, dict: Map<String, Value>, now_ms: i64) -> Result<()> {
        check_dict_size(key, &dict)?;
        self.write(key, now_ms)?.dict = Some(dict);
        Ok(())
    }

    // --- expiry ---------------------------------------------------------

    /// `set_key_expiration`: the key reads as absent from that event time on.
    pub fn set_key_expiration(&mut self, key: &str, expiry: Expiry, now_ms: i64) -> Result<()> {
        let at = match expiry {
            Expiry::At(at) => at,
            Expiry::After(ms) => now_ms.saturating_add(ms),
        };
        let at = granular_expiry(at, now_ms, self.expiry_granule);
        let old = self.read(key, now_ms)?.and_then(|r| r.expires_at_ms);
        if old == Some(at) {
            // The same step as stored: nothing changes, nothing is written.
            self.avoided += 1;
            return Ok(());
        }
        self.write(key, now_ms)?.expires_at_ms = Some(at);
        Ok(())
    }

    /// The expiry of a live key, if it has one.
    pub fn expires_at(&mut self, key: &str, now_ms: i64) -> Result<Option<i64>> {
        Ok(self.read(key, now_ms)?.and_then(|r| r.expires_at_ms))
    }

    // --- flushing -------------------------------------------------------

    /// Writes every dirty key, and `checkpoint` with them, as one batch;
    /// then trims clean entries down to the configured bound. Returns the
    /// number of keys written.
    pub fn flush(&mut self, checkpoints: &[(String, Checkpoint)]) -> Result<usize> {
        let mut mutations = Vec::new();
        for (key, entry) in self.entries.iter().filter(|(_, e)| e.dirty) {
            let mutation = if entry.record.is_empty() && entry.record.expires_at_ms.is_none() {
                Mutation::Delete
            } else {
                Mutation::Put(&entry.record)
            };
            mutations.push((key.as_str(), mutation));
        }
        // A stable order keeps batches reproducible (and B-tree inserts local).
        mutations.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let written = mutations.len();
        if written == 0 && checkpoints.is_empty() {
            return Ok(0);
        }
        let checkpoints = checkpoints.iter().map(|(source, cp)| (source.as_str(), cp)).collect();
        self.store.apply(WriteBatch { mutations, checkpoints })?;
        for entry in self.entries.values_mut() {
            entry.dirty = false;
        }
        let m = metrics();
        self.bytes = self.entries.iter().map(|(k, e)| k.len() + approx_bytes(&e.record)).sum();
        self.trim();
        m.cache_entries.set(self.entries.len() as i64);
        m.cache_bytes.set(self.bytes as i64);
        Ok(written)
    }

    /// Moves the changes of `lane` (another cache over the same store, whose
    /// keys this one does not change) into this cache, to be flushed with
    /// its own; `lane` keeps them as clean copies.
    pub fn absorb(&mut self, lane: &mut StateCache) {
        for (key, entry) in lane.entries.iter_mut().filter(|(_, e)| e.dirty) {
            entry.dirty = false;
            self.bytes += key.len() + approx_bytes(&entry.record);
            self.entries.insert(key.clone(), Entry { record: entry.record.clone(), dirty: true, used: entry.used });
        }
    }

    /// When over a bound (after a flush), evicts the least recently used
    /// clean entries, down to three quarters of the bounds (headroom, so
    /// that the next flush is not forced at once).
    pub fn trim(&mut self) {
        self.epoch = self.epoch.wrapping_add(1);
        if !self.over_bounds() {
            return;
        }
        let (max_entries, max_bytes) = (self.max_entries / 4 * 3, self.max_bytes / 4 * 3);
        // Clean entries and bytes by the epoch of their last use, oldest first.
        let mut by_epoch: std::collections::BTreeMap<u32, (usize, usize)> = Default::default();
        for (k, e) in self.entries.iter().filter(|(_, e)| !e.dirty) {
            let slot = by_epoch.entry(e.used).or_default();
            slot.0 += 1;
            slot.1 += k.len() + approx_bytes(&e.record);
        }
        let (mut entries, mut bytes) = (self.entries.len(), self.bytes);
        let mut cut = None;
        for (epoch, (n, b)) in by_epoch {
            if entries <= max_entries && bytes <= max_bytes {
                break;
            }
            entries -= n;
            bytes = bytes.saturating_sub(b);
            cut = Some(epoch);
        }
        let Some(cut) = cut else { return };
        let before = self.entries.len();
        self.entries.retain(|_, e| e.dirty || e.used > cut);
        self.bytes = self.entries.iter().map(|(k, e)| k.len() + approx_bytes(&e.record)).sum();
        metrics().cache_evictions.inc_by((before - self.entries.len()) as u64);
    }

    /// Drops every clean entry (a cache whose keys live in lane caches).
    pub fn drop_clean(&mut self) {
        self.entries.retain(|_, e| e.dirty);
        self.bytes = self.entries.iter().map(|(k, e)| k.len() + approx_bytes(&e.record)).sum();
    }

    /// Drops every entry (all must be flushed): after giving up partitions,
    /// their keys may change in another process, so nothing cached is to
    /// be trusted. The store forgets what it remembers too.
    pub fn forget(&mut self) {
        debug_assert!(self.entries.values().all(|e| !e.dirty), "forget with unflushed changes");
        metrics().cache_evictions.inc_by(self.entries.len() as u64);
        self.entries.clear();
        self.bytes = 0;
        self.store.forget();
        metrics().cache_entries.set(0);
        metrics().cache_bytes.set(0);
    }

    /// Adds the lookups counted since the last call to the exported metrics.
    pub fn publish_metrics(&mut self) {
        let m = metrics();
        m.cache_lookups.with_label_values(&["hit"]).inc_by(self.lookups.0);
        m.cache_lookups.with_label_values(&["miss"]).inc_by(self.lookups.1);
        m.state_writes_avoided.with_label_values(&["expiry_granule"]).inc_by(self.avoided);
        self.lookups = (0, 0);
        self.avoided = 0;
    }
}

/// A rough size of a record in memory, for the cache-bytes gauge.
fn approx_bytes(r: &Record) -> usize {
    fn value(v: &Value) -> usize {
        match v {
            Value::String(s) => 24 + s.len(),
            Value::Array(a) => 24 + a.iter().map(value).sum::<usize>(),
            Value::Object(m) => 24 + m.iter().map(|(k, v)| 24 + k.len() + value(v)).sum::<usize>(),
            _ => 16,
        }
    }
    let set: usize = r.set.iter().map(|s| 32 + s.len()).sum();
    let dict: usize = r.dict.iter().flat_map(|d| d.iter()).map(|(k, v)| 24 + k.len() + value(v)).sum();
    64 + set + dict
}

/// An upper bound of a JSON value's serialized size, cheap to compute (every
/// character escaped as `\uXXXX`, numbers as long as they can be).
fn json_size_bound(v: &Value) -> usize {
    match v {
        Value::Null | Value::Bool(_) => 5,
        Value::Number(_) => 32,
        Value::String(s) => 2 + 6 * s.len(),
        Value::Array(a) => 2 + a.iter().map(|x| json_size_bound(x) + 1).sum::<usize>(),
        Value::Object(m) => 2 + m.iter().map(|(k, x)| 4 + 6 * k.len() + json_size_bound(x)).sum::<usize>(),
    }
}

/// Refuses a dictionary over [`MAX_DICT_BYTES`] serialized (counted, not
/// built; and not even counted when a cheap bound shows it is small).
pub fn check_dict_size(key: &str, dict: &Map<String, Value>) -> Result<()> {
    let bound = 2 + dict.iter().map(|(k, x)| 4 + 6 * k.len() + json_size_bound(x)).sum::<usize>();
    if bound <= MAX_DICT_BYTES {
        return Ok(());
    }
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    let bytes = match serde_json::to_writer(&mut count, dict) {
        Ok(()) => count.0,
        Err(_) => usize::MAX,
    };
    if bytes > MAX_DICT_BYTES {
        return Err(StateError::DictionaryTooLarge { key: key.to_string(), bytes, limit: MAX_DICT_BYTES });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{EmbeddedStore, MemoryStore};
    use serde_json::json;

    fn cache() -> StateCache {
        StateCache::new(Box::new(MemoryStore::new()), 1000)
    }

    const H: i64 = 3_600_000;

    #[test]
    fn counter_increments_resets_and_defaults_to_zero() {
        let mut c = cache();
        assert_eq!(c.get_counter("k", 0).unwrap(), 0);
        assert_eq!(c.increment_counter("k", 1, 0).unwrap(), 1);
        assert_eq!(c.increment_counter("k", 5, 0).unwrap(), 6);
        assert_eq!(c.get_counter("k", 0).unwrap(), 6);
        c.reset_counter("k", 0).unwrap();
        assert_eq!(c.get_counter("k", 0).unwrap(), 0);
    }

    #[test]
    fn expiry_boundary_is_exact_and_expired_counter_does_not_resurrect() {
        let mut c = cache();
        c.increment_counter("k", 4, 0).unwrap();
        c.set_key_expiration("k", Expiry::After(H), 0).unwrap();
        assert_eq!(c.expires_at("k", 0).unwrap(), Some(H));
        assert_eq!(c.get_counter("k", H - 1).unwrap(), 4, "live one ms before expiry");
        assert_eq!(c.get_counter("k", H).unwrap(), 0, "expired at exactly expiresAt");
        assert_eq!(c.increment_counter("k", 1, H).unwrap(), 1, "starts again from the increment");
        assert_eq!(c.expires_at("k", H).unwrap(), None, "old expiry is gone with the old value");
    }

    #[test]
    fn a_refresh_within_the_granule_leaves_the_key_clean() {
        let flushed = |c: &mut StateCache| c.flush(&[]).unwrap();
        let mut c = cache().with_expiry_granule(0.01);
        // 1% of an hour is a 36 s step: expiries are rounded up to one.
        c.increment_counter("k", 1, 0).unwrap();
        c.set_key_expiration("k", Expiry::After(H), 1).unwrap();
        assert_eq!(c.expires_at("k", 1).unwrap(), Some(H + 36_000), "up to one step later, never earlier");
        assert_eq!(flushed(&mut c), 1);
        // Refreshes within the same step store the same expiry: nothing is written.
        c.set_key_expiration("k", Expiry::After(H), 35_999).unwrap();
        c.set_key_expiration("k", Expiry::After(H), 36_000).unwrap();
        assert_eq!((c.dirty_keys(), c.expires_at("k", 36_000).unwrap()), (0, Some(H + 36_000)));
        // The next step is written.
        c.set_key_expiration("k", Expiry::After(H), 36_001).unwrap();
        assert_eq!((c.dirty_keys(), c.expires_at("k", 36_001).unwrap()), (1, Some(H + 72_000)));
        assert_eq!(flushed(&mut c), 1);
        // An expired key starts afresh.
        c.set_key_expiration("k", Expiry::After(H), 3 * H).unwrap();
        assert_eq!(c.dirty_keys(), 1);
    }

    #[test]
    fn granule_zero_writes_every_refresh() {
        let mut c = cache().with_expiry_granule(0.0);
        c.set_key_expiration("k", Expiry::After(H), 0).unwrap();
        c.flush(&[]).unwrap();
        c.set_key_expiration("k", Expiry::After(H), 1).unwrap();
        assert_eq!((c.dirty_keys(), c.expires_at("k", 1).unwrap()), (1, Some(H + 1)));
        assert_eq!(granular_expiry(H + 1, 1, 0.0), H + 1);
        assert_eq!(granular_expiry(H + 1, 1, 0.01), H + 36_000);
        assert_eq!(granular_expiry(H + 36_000, 36_000, 0.01), H + 36_000, "on a step: kept");
    }

    #[test]
    fn absolute_expiry() {
        let mut c = cache();
        c.add_to_string_set("k", ["a"], 0).unwrap();
        c.set_key_expiration("k", Expiry::At(500), 0).unwrap();
        assert_eq!(c.get_string_set("k", 499).unwrap().len(), 1);
        assert!(c.get_string_set("k", 500).unwrap().is_empty());
    }

    #[test]
    fn string_set_primitives() {
        let mut c = cache();
        assert!(c.get_string_set("s", 0).unwrap().is_empty());
        assert_eq!(c.add_to_string_set("s", ["a"], 0).unwrap(), 1);
        assert_eq!(c.add_to_string_set("s", ["b", "c", "a"], 0).unwrap(), 3);
        assert_eq!(c.remove_from_string_set("s", ["a", "zz"], 0).unwrap(), 2);
        assert_eq!(c.remove_from_string_set("s", ["b", "c"], 0).unwrap(), 0);
        c.put_string_set("s", ["x".to_string(), "y".to_string()].into(), 0).unwrap();
        assert_eq!(c.get_string_set("s", 0).unwrap(), ["x".to_string(), "y".to_string()].into());
        c.reset_string_set("s", 0).unwrap();
        assert!(c.get_string_set("s", 0).unwrap().is_empty());
    }

    #[test]
    fn dictionary_primitives_and_size_limit() {
        let mut c = cache();
        assert_eq!(c.get_dictionary("d", 0).unwrap(), Map::new());
        let small = json!({"ip": "1.1.1.1"}).as_object().cloned().unwrap();
        c.put_dictionary("d", small.clone(), 0).unwrap();
        assert_eq!(c.get_dictionary("d", 0).unwrap(), small);
        // Exactly at the limit is accepted; one byte over is refused.
        let pad = MAX_DICT_BYTES - r#"{"x":""}"#.len();
        let at_limit = json!({"x": "a".repeat(pad)}).as_object().cloned().unwrap();
        c.put_dictionary("d", at_limit, 0).unwrap();
        let over = json!({"x": "a".repeat(pad + 1)}).as_object().cloned().unwrap();
        let err = c.put_dictionary("d", over, 0).unwrap_err();
        assert!(matches!(err, StateError::DictionaryTooLarge { bytes, .. } if bytes == MAX_DICT_BYTES + 1));
        assert_eq!(c.get_dictionary("d", 0).unwrap()["x"].as_str().map(str::len), Some(pad));
    }

    #[test]
    fn typed_values_do_not_overwrite_each_other() {
        let mut c = cache();
        c.increment_counter("k", 2, 0).unwrap();
        c.put_dictionary("k", json!({"a": 1}).as_object().cloned().unwrap(), 0).unwrap();
        c.add_to_string_set("k", ["s"], 0).unwrap();
        assert_eq!(c.get_counter("k", 0).unwrap(), 2);
        assert_eq!(c.get_dictionary("k", 0).unwrap().len(), 1);
        assert_eq!(c.get_string_set("k", 0).unwrap().len(), 1);
    }

    #[test]
    fn eviction_drops_the_least_recently_used_first() {
        let mut c = StateCache::with_bounds(Box::new(MemoryStore::new()), 4, usize::MAX);
        for k in ["a", "b", "c", "d"] {
            c.increment_counter(k, 1, 0).unwrap();
        }
        c.flush(&[]).unwrap();
        // Since that flush: a and b used again, e new; c and d untouched.
        c.increment_counter("a", 1, 0).unwrap();
        c.get_counter("b", 0).unwrap();
        c.increment_counter("e", 1, 0).unwrap();
        assert!(c.over_bounds());
        c.flush(&[]).unwrap();
        let cached: Vec<bool> = ["a", "b", "c", "d", "e"].iter().map(|k| c.is_cached(k)).collect();
        assert_eq!(cached, [true, true, false, false, true], "down to 3 of 4, the least recently used out");
        assert_eq!(c.get_counter("c", 0).unwrap(), 1, "an evicted key reads back from the store");
    }

    #[test]
    fn bounds_trigger_and_a_flush_evicts_clean_entries() {
        let mut c = StateCache::with_bounds(Box::new(MemoryStore::new()), 3, usize::MAX);
        for k in ["a", "b", "c"] {
            c.increment_counter(k, 1, 0).unwrap();
        }
        assert!(!c.over_bounds());
        c.increment_counter("d", 1, 0).unwrap();
        assert!(c.over_bounds(), "four entries, three allowed");
        c.flush(&[]).unwrap();
        assert!(!c.over_bounds());
        assert_eq!(c.dirty_keys(), 0);
        assert_eq!(c.get_counter("d", 0).unwrap(), 1, "evicted entries are read back from the store");

        let mut c = StateCache::with_bounds(Box::new(MemoryStore::new()), usize::MAX, 1000);
        let big = json!({"x": "y".repeat(2000)}).as_object().cloned().unwrap();
        c.put_dictionary("big", big, 0).unwrap();
        c.flush(&[]).unwrap();
        assert!(!c.over_bounds(), "a flush over the byte bound evicts");
        assert_eq!(c.get_dictionary("big", 0).unwrap()["x"].as_str().map(str::len), Some(2000));
    }

    #[test]
    fn flush_writes_each_dirty_key_once_with_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        {
            let mut c = StateCache::new(Box::new(EmbeddedStore::open(&path).unwrap()), 0);
            for _ in 0..100 {
                c.increment_counter("a", 1, 0).unwrap();
                c.add_to_string_set("b", ["x"], 0).unwrap();
            }
            c.increment_counter("gone", 1, 0).unwrap();
            c.delete("gone", 0).unwrap();
            assert_eq!(c.dirty_keys(), 3);
            let cp = Checkpoint { offset: 10, ..Checkpoint::default() };
            assert_eq!(c.flush(&[("f".into(), cp)]).unwrap(), 3);
            assert_eq!(c.dirty_keys(), 0);
        }
        let mut c = StateCache::new(Box::new(EmbeddedStore::open(&path).unwrap()), 0);
        assert_eq!(c.get_counter("a", 0).unwrap(), 100);
        assert_eq!(c.get_string_set("b", 0).unwrap().len(), 1);
        assert_eq!(c.store().get_many(&["gone"]).unwrap(), vec![None]);
        assert_eq!(c.store().checkpoint("f").unwrap().map(|c| c.offset), Some(10));
    }
}
