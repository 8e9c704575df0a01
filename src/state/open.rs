//! Opening, setting up, checking and pruning the store the config names.
//! The DynamoDB store blocks on a runtime of its own: call these from a
//! blocking thread, not an async task.

use super::{dynamodb, DynamoConfig, DynamoStore, EmbeddedStore, Instrumented, MemoryStore, Result, Store};
use std::path::PathBuf;
use std::time::Duration;

/// Which store holds state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreKind {
    /// In memory, gone at exit.
    Memory,
    /// redb file.
    Embedded(PathBuf),
    /// A DynamoDB table.
    DynamoDb(DynamoConfig),
}

/// Opens the configured store, with metrics around it.
pub fn open_store(kind: &StoreKind) -> Result<Box<dyn Store>> {
    let inner: Box<dyn Store> = match kind {
        StoreKind::Memory => Box::new(MemoryStore::new()),
        StoreKind::Embedded(path) => Box::new(EmbeddedStore::open(path)?),
        StoreKind::DynamoDb(cfg) => Box::new(DynamoStore::open(cfg)?),
    };
    Ok(Box::new(Instrumented::new(inner)))
}

/// `riskd store init`: sets up what the configured store needs (a DynamoDB
/// table with TTL); returns what was done, one line per step.
pub fn init_store(kind: &StoreKind) -> Result<Vec<String>> {
    match kind {
        StoreKind::DynamoDb(cfg) => dynamodb::init_table(cfg),
        StoreKind::Embedded(path) => {
            Ok(vec![format!("the embedded store needs no setup: {} is created on first use", path.display())])
        }
        StoreKind::Memory => Ok(vec!["the memory store needs no setup".into()]),
    }
}

/// `riskd store check`: everything wrong with the configured store's setup
/// (empty when nothing is).
pub fn check_store(kind: &StoreKind) -> Result<Vec<String>> {
    match kind {
        StoreKind::DynamoDb(cfg) => dynamodb::check_table(cfg),
        StoreKind::Embedded(_) | StoreKind::Memory => Ok(Vec::new()),
    }
}

/// `riskd store prune`: removes what the store keeps and no longer needs
/// (DynamoDB commit markers of runs no item names).
pub fn prune_store(kind: &StoreKind, idle: Duration) -> Result<Vec<String>> {
    match kind {
        StoreKind::DynamoDb(cfg) => dynamodb::prune_markers(cfg, idle),
        StoreKind::Embedded(_) | StoreKind::Memory => Ok(vec!["this store keeps no commit markers".into()]),
    }
}
