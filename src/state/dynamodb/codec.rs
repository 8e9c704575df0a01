//! Items ↔ records: the table's attribute names, the Panther layout of a
//! record, riskd's stamps on it (flush, previous version), sizes and keys.

use super::{backend, corrupt, STORE};
use crate::state::{Checkpoint, Record, Result, StateError};
use aws_sdk_dynamodb::types::AttributeValue;
use std::collections::HashMap;

/// Attribute names of the table.
pub(super) mod attr {
    pub const KEY: &str = "key";
    pub const INT_COUNT: &str = "intCount";
    pub const STRING_SET: &str = "stringSet";
    pub const DICTIONARY: &str = "dictionary";
    pub const EXPIRES_AT: &str = "expiresAt";
    pub const EXPIRES_AT_MS: &str = "riskdExpiresAtMs";
    pub const FLUSH: &str = "riskdFlush";
    pub const PREV: &str = "riskdPrev";
    pub const DELETED: &str = "riskdDeleted";
    pub const META: &str = "riskdMeta";
    pub const CHECKPOINT: &str = "riskdCheckpoint";
    pub const COMMITTED_SEQ: &str = "riskdCommittedSeq";
    pub const COMMITTED_AT: &str = "riskdCommittedAt";
    pub const COMMIT: &str = "riskdCommit";
    pub const LAYOUT: &str = "riskdLayout";
    pub const VERSION: &str = "riskdVersion";
    pub const PARTS: &str = "riskdParts";
    pub const UNDO: &str = "riskdUndo";
}

/// Where the checkpoint of each input is: `riskd/checkpoint/<source>`.
const CHECKPOINT_PREFIX: &str = "riskd/checkpoint/";
/// Where the commit marker of each run is: `riskd/flush/<run>`.
pub(super) const MARKER_PREFIX: &str = "riskd/flush/";
/// DynamoDB's limits: partition key bytes, item bytes.
const MAX_KEY_BYTES: usize = 2048;
const MAX_ITEM_BYTES: usize = 400 * 1024;

/// An item as the SDK holds it: attribute name to value.
pub(super) type Item = HashMap<String, AttributeValue>;

/// An item with only its key: the key of a request, or the start of an item.
pub(super) fn key_item(key: &str) -> Item {
    HashMap::from([(attr::KEY.to_string(), AttributeValue::S(key.to_string()))])
}

/// The key of an item (`None` for an item without a string key).
pub(super) fn item_key(item: &Item) -> Option<&str> {
    match item.get(attr::KEY) {
        Some(AttributeValue::S(k)) => Some(k),
        _ => None,
    }
}

/// Whole seconds at or after `ms`: `expiresAt` never falls before the expiry.
pub(super) fn ceil_seconds(ms: i64) -> i64 {
    ms.div_euclid(1000) + i64::from(ms.rem_euclid(1000) != 0)
}

/// The Panther-layout attributes of a record.
pub(super) fn record_attributes(key: &str, record: &Record) -> Result<Item> {
    let mut item = key_item(key);
    if record.count != 0 {
        item.insert(attr::INT_COUNT.into(), AttributeValue::N(record.count.to_string()));
    }
    if !record.set.is_empty() {
        item.insert(attr::STRING_SET.into(), AttributeValue::Ss(record.set.iter().cloned().collect()));
    }
    if let Some(dict) = &record.dict {
        let text = serde_json::to_string(dict).map_err(|e| backend(format!("key {key:?}: {e}")))?;
        item.insert(attr::DICTIONARY.into(), AttributeValue::S(text));
    }
    if let Some(ms) = record.expires_at_ms {
        item.insert(attr::EXPIRES_AT.into(), AttributeValue::N(ceil_seconds(ms).to_string()));
        item.insert(attr::EXPIRES_AT_MS.into(), AttributeValue::N(ms.to_string()));
    }
    Ok(item)
}

/// Adds the flush and the previous committed version to an item riskd writes.
pub(super) fn stamp(item: &mut Item, key: &str, flush: &str, prev: Option<&Record>) -> Result<()> {
    item.insert(attr::FLUSH.into(), AttributeValue::S(flush.to_string()));
    if let Some(prev) = prev {
        let text = serde_json::to_string(prev).map_err(|e| backend(format!("key {key:?}: {e}")))?;
        item.insert(attr::PREV.into(), AttributeValue::S(text));
    }
    Ok(())
}

/// Fails with [`StateError::ItemTooLarge`] for an item over DynamoDB's limit.
pub(super) fn check_item_size(key: &str, item: &Item) -> Result<()> {
    let bytes = super::capacity::item_size(item);
    if bytes > MAX_ITEM_BYTES {
        return Err(StateError::ItemTooLarge { store: STORE, key: key.to_string(), bytes, limit: MAX_ITEM_BYTES });
    }
    Ok(())
}

/// A number attribute.
fn number(key: &str, name: &str, value: &AttributeValue) -> Result<f64> {
    match value {
        AttributeValue::N(n) => n.parse().map_err(|_| corrupt(key, format!("{name} is not a number: {n:?}"))),
        _ => Err(corrupt(key, format!("{name} is not of type N"))),
    }
}

/// A whole-number attribute.
pub(super) fn integer(key: &str, name: &str, value: &AttributeValue) -> Result<i64> {
    if let AttributeValue::N(n) = value {
        if let Ok(i) = n.parse::<i64>() {
            return Ok(i);
        }
    }
    let f = number(key, name, value)?;
    if f.fract() != 0.0 || !f.is_finite() || f.abs() >= 9.2e18 {
        return Err(corrupt(key, format!("{name} is not a whole number: {f}")));
    }
    Ok(f as i64)
}

/// A flush id, `<run>:<seq>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct FlushId {
    /// The run: one opened store that wrote.
    pub(super) run: String,
    /// The run's flush number, from 1.
    pub(super) seq: u64,
    /// As the item holds it.
    pub(super) text: String,
}

impl FlushId {
    /// Reads `riskdFlush` of the item under `key`.
    pub(super) fn parse(key: &str, text: &str) -> Result<Self> {
        text.rsplit_once(':')
            .and_then(|(run, seq)| Some(Self { run: run.to_string(), seq: seq.parse().ok()?, text: text.to_string() }))
            .filter(|f| !f.run.is_empty())
            .ok_or_else(|| corrupt(key, format!("{} {text:?} is not <run>:<seq>", attr::FLUSH)))
    }
}

/// An item as stored, before its flush is known to be committed or not.
#[derive(Debug)]
pub(super) struct Stored {
    /// Its own values.
    pub(super) record: Record,
    /// The flush that wrote it (`None`: written by someone else, e.g. Panther).
    pub(super) flush: Option<FlushId>,
    /// Its key's previous committed version (when `flush` is set).
    pub(super) prev: Option<Record>,
    /// A tombstone: once committed, the key is absent.
    pub(super) deleted: bool,
}

/// Reads an item: a Panther item, or one riskd wrote with its stamps.
pub(super) fn decode(key: &str, item: &Item) -> Result<Stored> {
    let mut record = Record::default();
    if let Some(v) = item.get(attr::INT_COUNT) {
        record.count = integer(key, attr::INT_COUNT, v)?;
    }
    match item.get(attr::STRING_SET) {
        None => {}
        Some(AttributeValue::Ss(values)) => record.set = values.iter().cloned().collect(),
        Some(_) => return Err(corrupt(key, format!("{} is not a string set (SS)", attr::STRING_SET))),
    }
    match item.get(attr::DICTIONARY) {
        None => {}
        Some(AttributeValue::S(text)) => {
            let dict = serde_json::from_str(text)
                .map_err(|e| corrupt(key, format!("{} is not a JSON object: {e}", attr::DICTIONARY)))?;
            record.dict = Some(dict);
        }
        Some(_) => return Err(corrupt(key, format!("{} is not a string of JSON (S)", attr::DICTIONARY))),
    }
    if let Some(v) = item.get(attr::EXPIRES_AT) {
        // riskd's milliseconds refine expiresAt while they agree with it;
        // if someone else set expiresAt since, expiresAt wins.
        let exact = match item.get(attr::EXPIRES_AT_MS) {
            Some(ms) => Some(integer(key, attr::EXPIRES_AT_MS, ms)?),
            None => None,
        };
        let seconds = number(key, attr::EXPIRES_AT, v)?;
        record.expires_at_ms = match exact {
            Some(ms) if ceil_seconds(ms) as f64 == seconds => Some(ms),
            _ => Some((seconds * 1000.0).round() as i64),
        };
    }
    let flush = match item.get(attr::FLUSH) {
        None => None,
        Some(AttributeValue::S(text)) => Some(FlushId::parse(key, text)?),
        Some(_) => return Err(corrupt(key, format!("{} is not a string", attr::FLUSH))),
    };
    let prev = match item.get(attr::PREV) {
        None => None,
        Some(AttributeValue::S(text)) => {
            Some(serde_json::from_str(text).map_err(|e| corrupt(key, format!("{} is not a record: {e}", attr::PREV)))?)
        }
        Some(_) => return Err(corrupt(key, format!("{} is not a string", attr::PREV))),
    };
    let deleted = matches!(item.get(attr::DELETED), Some(AttributeValue::Bool(true)));
    Ok(Stored { record, flush, prev, deleted })
}

/// The key of a run's commit marker.
pub(super) fn marker_key(run: &str) -> String {
    format!("{MARKER_PREFIX}{run}")
}

/// The key of an input's checkpoint.
pub(super) fn checkpoint_key(source: &str) -> String {
    format!("{CHECKPOINT_PREFIX}{source}")
}

/// The item of an input's checkpoint; `flush` names the flush it commits
/// with, when that flush wrote items.
pub(super) fn checkpoint_item(source: &str, cp: &Checkpoint, flush: Option<&str>) -> Result<Item> {
    let mut item = key_item(&checkpoint_key(source));
    item.insert(attr::META.into(), AttributeValue::S("checkpoint".into()));
    let text = serde_json::to_string(cp).map_err(|e| backend(format!("checkpoint of {source}: {e}")))?;
    item.insert(attr::CHECKPOINT.into(), AttributeValue::S(text));
    if let Some(flush) = flush {
        item.insert(attr::FLUSH.into(), AttributeValue::S(flush.to_string()));
    }
    Ok(item)
}

/// The checkpoint an item under `key` holds.
pub(super) fn decode_checkpoint(key: &str, item: &Item) -> Result<Checkpoint> {
    match item.get(attr::CHECKPOINT) {
        Some(AttributeValue::S(text)) => serde_json::from_str(text)
            .map_err(|e| corrupt(key, format!("{} is not a checkpoint: {e}", attr::CHECKPOINT))),
        _ => Err(corrupt(key, format!("no {} string", attr::CHECKPOINT))),
    }
}

/// Fails with [`StateError::BadKey`] for a key DynamoDB cannot hold.
pub(super) fn check_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(StateError::BadKey {
            store: STORE,
            key: String::new(),
            message: "DynamoDB keys cannot be empty".into(),
        });
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(StateError::BadKey {
            store: STORE,
            key: key.to_string(),
            message: format!("{} bytes, over DynamoDB's {MAX_KEY_BYTES}-byte key limit", key.len()),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flush_ids_and_expiry_seconds() {
        assert_eq!(ceil_seconds(1_000), 1);
        assert_eq!(ceil_seconds(1_001), 2);
        assert_eq!(ceil_seconds(0), 0);
        assert_eq!(ceil_seconds(-1), 0);
        assert_eq!(ceil_seconds(-1_000), -1);
        assert_eq!(
            FlushId::parse("k", "abc:12").unwrap(),
            FlushId { run: "abc".into(), seq: 12, text: "abc:12".into() }
        );
        assert!(FlushId::parse("k", "abc").is_err());
        assert!(FlushId::parse("k", ":1").is_err());
    }
}
