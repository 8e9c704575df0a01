//! One store behind several write-back caches: the lanes of a Kafka job
//! each cache the keys of their own entities, and read and write through
//! the same store (one transaction per flush, one DynamoDB run).

use super::{Checkpoint, Record, Result, Store, WriteBatch};
use std::sync::{Arc, Mutex, MutexGuard};

/// A [`Store`] handle that several caches (threads) share; each call takes
/// the store for its duration.
#[derive(Clone)]
pub struct SharedStore {
    inner: Arc<Mutex<Box<dyn Store>>>,
    kind: &'static str,
    batched_reads: bool,
}

impl SharedStore {
    /// Shares `store`.
    pub fn new(store: Box<dyn Store>) -> Self {
        let (kind, batched_reads) = (store.kind(), store.batched_reads());
        Self { inner: Arc::new(Mutex::new(store)), kind, batched_reads }
    }

    fn lock(&self) -> MutexGuard<'_, Box<dyn Store>> {
        // A panic while holding it is a bug that ends the job anyway.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Store for SharedStore {
    fn kind(&self) -> &'static str {
        self.kind
    }
    fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Record>>> {
        self.lock().get_many(keys)
    }
    fn apply(&mut self, batch: WriteBatch<'_>) -> Result<()> {
        self.lock().apply(batch)
    }
    fn checkpoint(&self, source: &str) -> Result<Option<Checkpoint>> {
        self.lock().checkpoint(source)
    }
    fn scan(&self, prefix: &str, visit: &mut dyn FnMut(&str, &Record)) -> Result<()> {
        self.lock().scan(prefix, visit)
    }
    fn batched_reads(&self) -> bool {
        self.batched_reads
    }
    fn update(&mut self, key: &str, now_ms: i64, f: &mut dyn FnMut(&mut Record) -> bool) -> Result<()> {
        self.lock().update(key, now_ms, f)
    }
    fn purge_expired(&mut self, before_ms: i64) -> Result<usize> {
        self.lock().purge_expired(before_ms)
    }
    fn forget(&mut self) {
        self.lock().forget();
    }
    fn reader(&self) -> Option<Box<dyn Store>> {
        self.lock().reader()
    }
}
