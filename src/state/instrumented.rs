//! A [`Store`] decorator that counts and times every operation of the store
//! it wraps, so every store is measured the same way.

use super::{Checkpoint, Record, Result, Store, WriteBatch};
use crate::telemetry::metrics;
use std::time::Instant;

/// Wraps a store with metrics.
pub struct Instrumented {
    inner: Box<dyn Store>,
}

impl Instrumented {
    /// Measures `inner`.
    pub fn new(inner: Box<dyn Store>) -> Self {
        Self { inner }
    }

    fn measure<T>(&self, op: &str, f: impl FnOnce(&dyn Store) -> Result<T>) -> Result<T> {
        let start = Instant::now();
        let result = f(self.inner.as_ref());
        record(self.inner.kind(), op, start, result.is_ok());
        result
    }
}

/// Counts and times one operation.
fn record(kind: &str, op: &str, start: Instant, ok: bool) {
    let m = metrics();
    m.store_seconds.with_label_values(&[kind, op]).observe(start.elapsed().as_secs_f64());
    m.store_operations.with_label_values(&[kind, op, if ok { "ok" } else { "error" }]).inc();
}

impl Store for Instrumented {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Record>>> {
        self.measure("get_many", |s| s.get_many(keys))
    }

    fn apply(&mut self, batch: WriteBatch<'_>) -> Result<()> {
        let start = Instant::now();
        let result = self.inner.apply(batch);
        record(self.inner.kind(), "apply", start, result.is_ok());
        result
    }

    fn checkpoint(&self, source: &str) -> Result<Option<Checkpoint>> {
        self.measure("checkpoint", |s| s.checkpoint(source))
    }

    fn scan(&self, prefix: &str, visit: &mut dyn FnMut(&str, &Record)) -> Result<()> {
        self.measure("scan", |s| s.scan(prefix, visit))
    }

    fn batched_reads(&self) -> bool {
        self.inner.batched_reads()
    }

    fn update(&mut self, key: &str, now_ms: i64, f: &mut dyn FnMut(&mut Record) -> bool) -> Result<()> {
        let start = Instant::now();
        let result = self.inner.update(key, now_ms, f);
        record(self.inner.kind(), "update", start, result.is_ok());
        result
    }

    fn purge_expired(&mut self, before_ms: i64) -> Result<usize> {
        let start = Instant::now();
        let result = self.inner.purge_expired(before_ms);
        record(self.inner.kind(), "purge", start, result.is_ok());
        result
    }

    fn forget(&mut self) {
        self.inner.forget();
    }

    fn reader(&self) -> Option<Box<dyn Store>> {
        self.inner.reader().map(|r| Box::new(Instrumented::new(r)) as Box<dyn Store>)
    }
}
