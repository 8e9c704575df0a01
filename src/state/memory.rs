//! An in-memory [`Store`], for tests and `riskd test`/`replay` runs whose
//! state is thrown away.

use super::{Checkpoint, Mutation, Record, Result, Store, WriteBatch};
use std::collections::BTreeMap;

/// Records in a `BTreeMap`, so scans come out in key order.
#[derive(Debug, Default)]
pub struct MemoryStore {
    records: BTreeMap<String, Record>,
    checkpoints: BTreeMap<String, Checkpoint>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Store for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Record>>> {
        Ok(keys.iter().map(|k| self.records.get(*k).cloned()).collect())
    }

    fn apply(&mut self, batch: WriteBatch<'_>) -> Result<()> {
        for (key, mutation) in batch.mutations {
            match mutation {
                Mutation::Put(record) => {
                    self.records.insert(key.to_string(), record.clone());
                }
                Mutation::Delete => {
                    self.records.remove(key);
                }
            }
        }
        for (source, cp) in batch.checkpoints {
            self.checkpoints.insert(source.to_string(), cp.clone());
        }
        Ok(())
    }

    fn checkpoint(&self, source: &str) -> Result<Option<Checkpoint>> {
        Ok(self.checkpoints.get(source).cloned())
    }

    fn scan(&self, prefix: &str, visit: &mut dyn FnMut(&str, &Record)) -> Result<()> {
        for (k, v) in self.records.range(prefix.to_string()..) {
            if !k.starts_with(prefix) {
                break;
            }
            visit(k, v);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    crate::state::store_tests::shared_store_tests!((super::MemoryStore::new(), ()));
}
