//! The embedded on-disk [`Store`], riskd's default: one redb file.
//!
//! Why redb: pure Rust, maintained, a stable file format, and ACID write
//! transactions over several tables — which is exactly what the resume
//! guarantee needs: the records a flush changes and the checkpoint of the
//! input they cover commit in one transaction, so after a crash the store
//! holds either both or neither. fjall (an LSM) would also do, but its
//! cross-keyspace atomic batches and background compaction bring more
//! moving parts than riskd's write pattern (one batched writer, point reads
//! on cache misses) needs.

use super::{Checkpoint, Mutation, Record, Result, StateError, Store, WriteBatch};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");
const CHECKPOINTS: TableDefinition<&str, &[u8]> = TableDefinition::new("checkpoints");

/// A redb database holding records (JSON-encoded) and checkpoints.
///
/// After an I/O error (a full disk, say) redb refuses every later
/// operation until the database is closed and opened again
/// (`StorageError::PreviousIo`); the failed commit is not in the file. So
/// the store reopens the file at the next operation, and a retry succeeds
/// once the disk has room again.
pub struct EmbeddedStore {
    // Shared with readers (the HTTP API): redb lets them read while the job
    // writes, each transaction seeing a consistent snapshot.
    db: Arc<Shared>,
}

struct Shared {
    path: PathBuf,
    /// Read-locked for each operation, write-locked to reopen: a reopen
    /// waits for the operations in progress. `None` once closed by a
    /// reopen that failed.
    db: RwLock<Option<Database>>,
    /// An operation failed on I/O: reopen before the next.
    reopen: AtomicBool,
}

fn backend(e: impl std::fmt::Display) -> StateError {
    StateError::Backend { store: "embedded", message: e.to_string() }
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| StateError::Corrupt {
        store: "embedded",
        key: key.to_string(),
        message: e.to_string(),
    })
}

/// Opens (or creates) the database and both tables, so read transactions
/// always find them.
fn open_db(path: &Path) -> Result<Database> {
    let db = Database::create(path).map_err(|e| backend(format!("{}: {e}", path.display())))?;
    let txn = db.begin_write().map_err(backend)?;
    txn.open_table(RECORDS).map_err(backend)?;
    txn.open_table(CHECKPOINTS).map_err(backend)?;
    txn.commit().map_err(backend)?;
    Ok(db)
}

impl Shared {
    /// The database, reopened first if an operation failed on I/O.
    fn get(&self) -> Result<RwLockReadGuard<'_, Option<Database>>> {
        if self.reopen.load(Ordering::Acquire) {
            let mut slot = self.db.write().unwrap_or_else(|p| p.into_inner());
            if self.reopen.load(Ordering::Acquire) {
                // Closing may fail on the same error: redb then leaves the
                // file as its last successful commit left it.
                drop(slot.take());
                *slot = Some(open_db(&self.path).map_err(|e| backend(format!("reopening after an I/O error: {e}")))?);
                self.reopen.store(false, Ordering::Release);
                tracing::info!(path = %self.path.display(), "embedded store reopened after an I/O error");
            }
        }
        let guard = self.db.read().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            return Err(backend("closed after an I/O error; reopening at the next try"));
        }
        Ok(guard)
    }

    /// Maps a redb error; after an I/O error the database is reopened
    /// before the next operation.
    fn fail<E: Into<redb::Error>>(&self) -> impl Fn(E) -> StateError + '_ {
        |e| {
            let e: redb::Error = e.into();
            if matches!(e, redb::Error::Io(_) | redb::Error::PreviousIo | redb::Error::DatabaseClosed) {
                self.reopen.store(true, Ordering::Release);
            }
            backend(e)
        }
    }
}

impl EmbeddedStore {
    /// Opens the database at `path`, creating it (and its folder) if needed.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| backend(format!("cannot create {}: {e}", dir.display())))?;
        }
        let db = open_db(path)?;
        let shared = Shared { path: path.to_path_buf(), db: RwLock::new(Some(db)), reopen: AtomicBool::new(false) };
        Ok(Self { db: Arc::new(shared) })
    }
}

impl Store for EmbeddedStore {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Record>>> {
        let guard = self.db.get()?;
        let db = guard.as_ref().expect("checked by get");
        let txn = db.begin_read().map_err(self.db.fail())?;
        let table = txn.open_table(RECORDS).map_err(self.db.fail())?;
        keys.iter()
            .map(|key| match table.get(*key).map_err(self.db.fail())? {
                Some(v) => decode(key, v.value()).map(Some),
                None => Ok(None),
            })
            .collect()
    }

    fn apply(&mut self, batch: WriteBatch<'_>) -> Result<()> {
        let guard = self.db.get()?;
        let db = guard.as_ref().expect("checked by get");
        let fail = self.db.fail();
        let txn = db.begin_write().map_err(self.db.fail())?;
        {
            let mut records = txn.open_table(RECORDS).map_err(self.db.fail())?;
            let mut bytes = Vec::with_capacity(256);
            for (key, mutation) in batch.mutations {
                match mutation {
                    Mutation::Put(record) => {
                        bytes.clear();
                        serde_json::to_writer(&mut bytes, record).map_err(backend)?;
                        records.insert(key, bytes.as_slice()).map_err(&fail)?;
                    }
                    Mutation::Delete => {
                        records.remove(key).map_err(&fail)?;
                    }
                }
            }
            let mut cps = txn.open_table(CHECKPOINTS).map_err(self.db.fail())?;
            for (source, cp) in batch.checkpoints {
                let bytes = serde_json::to_vec(cp).map_err(backend)?;
                cps.insert(source, bytes.as_slice()).map_err(&fail)?;
            }
        }
        txn.commit().map_err(self.db.fail())
    }

    fn checkpoint(&self, source: &str) -> Result<Option<Checkpoint>> {
        let guard = self.db.get()?;
        let db = guard.as_ref().expect("checked by get");
        let txn = db.begin_read().map_err(self.db.fail())?;
        let table = txn.open_table(CHECKPOINTS).map_err(self.db.fail())?;
        match table.get(source).map_err(self.db.fail())? {
            Some(v) => decode(source, v.value()).map(Some),
            None => Ok(None),
        }
    }

    fn purge_expired(&mut self, before_ms: i64) -> Result<usize> {
        let guard = self.db.get()?;
        let db = guard.as_ref().expect("checked by get");
        let fail = self.db.fail();
        let txn = db.begin_write().map_err(self.db.fail())?;
        let mut n = 0;
        {
            let mut records = txn.open_table(RECORDS).map_err(self.db.fail())?;
            let mut expired = Vec::new();
            for item in records.iter().map_err(&fail)? {
                let (k, v) = item.map_err(&fail)?;
                let record: Record = decode(k.value(), v.value())?;
                if record.expires_at_ms.is_some_and(|at| at <= before_ms) {
                    expired.push(k.value().to_string());
                }
            }
            for key in &expired {
                records.remove(key.as_str()).map_err(&fail)?;
                n += 1;
            }
        }
        txn.commit().map_err(self.db.fail())?;
        Ok(n)
    }

    fn reader(&self) -> Option<Box<dyn Store>> {
        Some(Box::new(EmbeddedStore { db: Arc::clone(&self.db) }))
    }

    fn scan(&self, prefix: &str, visit: &mut dyn FnMut(&str, &Record)) -> Result<()> {
        let guard = self.db.get()?;
        let db = guard.as_ref().expect("checked by get");
        let fail = self.db.fail();
        let txn = db.begin_read().map_err(self.db.fail())?;
        let table = txn.open_table(RECORDS).map_err(self.db.fail())?;
        for item in table.range(prefix..).map_err(&fail)? {
            let (k, v) = item.map_err(&fail)?;
            let key = k.value();
            if !key.starts_with(prefix) {
                break;
            }
            visit(key, &decode(key, v.value())?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh() -> (EmbeddedStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        (EmbeddedStore::open(&dir.path().join("s.redb")).unwrap(), dir)
    }

    crate::state::store_tests::shared_store_tests!(fresh());

    #[test]
    fn purge_deletes_only_records_expired_by_then() {
        let (mut store, _dir) = fresh();
        let at = |ms| Record { count: 1, expires_at_ms: Some(ms), ..Record::default() };
        let (old, edge, live, forever) = (at(100), at(200), at(300), Record { count: 1, ..Record::default() });
        let mutations = vec![
            ("old", Mutation::Put(&old)),
            ("edge", Mutation::Put(&edge)),
            ("live", Mutation::Put(&live)),
            ("forever", Mutation::Put(&forever)),
        ];
        store.apply(WriteBatch { mutations, checkpoints: Vec::new() }).unwrap();
        assert_eq!(store.purge_expired(200).unwrap(), 2);
        let got = store.get_many(&["old", "edge", "live", "forever"]).unwrap();
        assert_eq!(got, vec![None, None, Some(live), Some(forever)]);
        assert_eq!(store.purge_expired(200).unwrap(), 0);
    }

    #[test]
    fn persists_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/s.redb");
        {
            let mut store = EmbeddedStore::open(&path).unwrap();
            let record = Record { count: 7, ..Record::default() };
            let cp = Checkpoint { offset: 9, ..Checkpoint::default() };
            let batch = WriteBatch { mutations: vec![("k", Mutation::Put(&record))], checkpoints: vec![("src", &cp)] };
            store.apply(batch).unwrap();
        }
        let store = EmbeddedStore::open(&path).unwrap();
        assert_eq!(store.get_many(&["k"]).unwrap()[0].as_ref().map(|r| r.count), Some(7));
        assert_eq!(store.checkpoint("src").unwrap().map(|c| c.offset), Some(9));
    }
}
