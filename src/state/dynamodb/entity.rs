//! The entity layout (`store.layout = "entity"`): everything riskd keeps
//! for one entity — each rule's state and its risk — in one item, so that
//! a flush writes at most one item per entity it changed, however many of
//! its keys changed.
//!
//! # Which keys
//!
//! A rule's state key `<namespace>/<type>/<id>` and an entity's risk
//! `riskd/risk/<type>/<id>` are *parts* of the entity item
//! `riskd/entity/<type>/<id>`, under the names `<namespace>` and
//! `riskd/risk`. Every other key — dedup windows (whose key may name
//! another entity than the rule's), the watermark, keys written by others —
//! is an item of its own, as in the per-key layout. So is every key of a
//! rule in `consistency: direct`: the config refuses such rules with this
//! layout, since an entity item has one writer.
//!
//! # The item
//!
//! `riskdParts` (S) holds the parts as a JSON object, name to record;
//! `expiresAt` (N) is the latest expiry of any part (absent when a part has
//! none), so DynamoDB's TTL deletes an item only when all its parts
//! expired. The crash protocol is the per-key layout's (flush id, commit
//! marker), with one difference: instead of the whole previous version,
//! `riskdUndo` (S, JSON) holds the previous committed version of each part
//! the flush changed (`null`: the part was absent), which is all a reader
//! needs to rebuild the committed item from an uncommitted one. An item
//! whose parts all went is written with no parts (a tombstone) and deleted
//! once its flush committed.
//!
//! # Size
//!
//! An item is at most 400 KB. A part over [`SPILL_BYTES`] serialized is
//! *spilled*: it is written as an item of its own under its key (the
//! per-key layout, with its own previous version), and the entity item
//! keeps `{"spilled": true}` for it; reading the entity then reads the
//! spilled parts too. Parts at most [`SPILL_BYTES`] each, at most
//! [`MAX_INLINE_PARTS`] of them inline — past that, the largest spill —
//! keep the entity item under the limit.

use super::codec::{attr, ceil_seconds, check_item_size, check_key, key_item, FlushId, Item};
use super::commit::{FlushWrites, Stamp, Version, Write};
use super::{backend, corrupt, DynamoStore};
use crate::state::{Mutation, Record, Result, RISK_PREFIX};
use aws_sdk_dynamodb::types::AttributeValue;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Key prefix of entity items.
pub(super) const ENTITY_PREFIX: &str = "riskd/entity/";
/// A part larger than this, serialized, is kept in an item of its own.
pub(super) const SPILL_BYTES: usize = 32 * 1024;
/// Parts kept inline at most (all of [`SPILL_BYTES`] at most stay well
/// under the item limit); past it the largest are spilled.
const MAX_INLINE_PARTS: usize = 10;

/// Where `key` lives in the entity layout: `(entity, name)`, the entity
/// (`<type>/<id>`) whose item holds it and its name there; `None` for a
/// key kept in an item of its own.
pub(super) fn place(key: &str) -> Option<(&str, &str)> {
    let (name, entity) = match key.strip_prefix("riskd/") {
        Some(rest) => (RISK_PREFIX, rest.strip_prefix("risk/")?),
        None => key.split_once('/')?,
    };
    let (kind, id) = entity.split_once('/')?;
    (!name.is_empty() && !kind.is_empty() && !id.is_empty()).then_some((entity, name))
}

/// The key a part of `entity` named `name` stands for.
pub(super) fn part_key(entity: &str, name: &str) -> String {
    format!("{name}/{entity}")
}

/// The key of an entity's item.
pub(super) fn entity_item_key(entity: &str) -> String {
    format!("{ENTITY_PREFIX}{entity}")
}

/// One part as stored in the item: the record, or a note that it is in an
/// item of its own.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub(super) enum Part {
    /// Kept in its own item, under its key.
    Spilled {
        /// Always true.
        spilled: bool,
    },
    /// Kept here.
    Inline(Record),
}

/// An entity's parts, by name, as stored (spilled parts as notes).
pub(super) type Parts = BTreeMap<String, Part>;

/// An entity item as stored, before its flush is known to be committed.
#[derive(Debug)]
pub(super) struct StoredEntity {
    /// Its own parts.
    pub(super) parts: Parts,
    /// The flush that wrote it.
    pub(super) flush: Option<FlushId>,
    /// For each part the flush changed, the part's committed version before it.
    pub(super) undo: BTreeMap<String, Option<Part>>,
}

impl StoredEntity {
    /// The parts as of the flush before this one (the item's committed
    /// version when its own flush did not commit).
    pub(super) fn undone(mut self) -> Parts {
        for (name, before) in std::mem::take(&mut self.undo) {
            match before {
                Some(part) => self.parts.insert(name, part),
                None => self.parts.remove(&name),
            };
        }
        self.parts
    }
}

/// Reads an entity item.
pub(super) fn decode_entity(key: &str, item: &Item) -> Result<StoredEntity> {
    let json = |name: &str| -> Result<Option<&str>> {
        match item.get(name) {
            None => Ok(None),
            Some(AttributeValue::S(text)) => Ok(Some(text)),
            Some(_) => Err(corrupt(key, format!("{name} is not a string"))),
        }
    };
    let parts = match json(attr::PARTS)? {
        Some(text) => serde_json::from_str(text)
            .map_err(|e| corrupt(key, format!("{} is not an object of records: {e}", attr::PARTS)))?,
        None => Parts::new(),
    };
    let undo = match json(attr::UNDO)? {
        Some(text) => serde_json::from_str(text)
            .map_err(|e| corrupt(key, format!("{} is not an object of records: {e}", attr::UNDO)))?,
        None => BTreeMap::new(),
    };
    let flush = json(attr::FLUSH)?.map(|f| FlushId::parse(key, f)).transpose()?;
    Ok(StoredEntity { parts, flush, undo })
}

/// The item of an entity holding `parts`, written by `flush` over the
/// committed versions in `undo`.
pub(super) fn entity_item(
    entity: &str,
    parts: &Parts,
    flush: &str,
    undo: &BTreeMap<String, Option<Part>>,
) -> Result<Item> {
    let key = entity_item_key(entity);
    let mut item = key_item(&key);
    item.insert(attr::PARTS.into(), AttributeValue::S(json_text(&key, parts)?));
    item.insert(attr::FLUSH.into(), AttributeValue::S(flush.to_string()));
    item.insert(attr::UNDO.into(), AttributeValue::S(json_text(&key, undo)?));
    // The latest expiry of anything the item holds, its undo included: TTL
    // must not delete a committed version that lives on.
    let records = parts.values().chain(undo.values().flatten());
    let mut latest: Option<i64> = None;
    let mut forever = false;
    for part in records {
        match part {
            Part::Inline(r) => match r.expires_at_ms {
                Some(at) => latest = Some(latest.map_or(at, |l| l.max(at))),
                None => forever = true,
            },
            // A spilled part's own item has its own expiry.
            Part::Spilled { .. } => {}
        }
    }
    if let (Some(at), false) = (latest, forever) {
        item.insert(attr::EXPIRES_AT.into(), AttributeValue::N(ceil_seconds(at).to_string()));
    }
    check_item_size(&key, &item)?;
    Ok(item)
}

/// What the store knows of an entity's committed version: its records
/// (spilled ones included) and which of its parts are spilled.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Known {
    /// Its records, by part name.
    pub(super) records: BTreeMap<String, Record>,
    /// The names its item marks as spilled (a spilled part whose own item
    /// is gone, deleted by TTL, is here but not in `records`).
    pub(super) spilled: BTreeSet<String>,
    /// What its item is stamped with.
    pub(super) stamp: Stamp,
}

impl Known {
    /// The part `name` as the entity item holds it.
    fn part(&self, name: &str) -> Option<Part> {
        if self.spilled.contains(name) {
            return Some(Part::Spilled { spilled: true });
        }
        self.records.get(name).cloned().map(Part::Inline)
    }

    /// The committed version of a spilled part's own item.
    fn own(&self, name: &str) -> Option<&Record> {
        self.records.get(name).filter(|_| self.spilled.contains(name))
    }

    /// Whether the two hold the same parts in the same places.
    fn same_parts(&self, other: &Known) -> bool {
        self.records == other.records && self.spilled == other.spilled
    }
}

/// Changes to parts of entities, by entity: `(name, change)`.
pub(super) type PartChanges<'a> = BTreeMap<&'a str, Vec<(&'a str, Mutation<'a>)>>;

/// Splits a batch's changes into those of keys kept as items of their own
/// and those of parts of entities.
pub(super) fn split<'a>(mutations: &[(&'a str, Mutation<'a>)]) -> (Vec<(&'a str, Mutation<'a>)>, PartChanges<'a>) {
    let mut own = Vec::new();
    let mut parts = PartChanges::new();
    for (key, mutation) in mutations {
        match place(key) {
            Some((entity, name)) => parts.entry(entity).or_default().push((name, *mutation)),
            None => own.push((*key, *mutation)),
        }
    }
    (own, parts)
}

impl DynamoStore {
    /// The parts of an entity item as of its last committed flush (learn
    /// its flush's commit first).
    fn committed_parts(&self, stored: StoredEntity) -> Parts {
        if stored.flush.as_ref().is_none_or(|f| self.is_committed(f)) {
            stored.parts
        } else {
            stored.undone()
        }
    }

    /// The committed versions of `entities` (each once), spilled parts read too.
    pub(super) fn read_entities(&self, entities: &[&str]) -> Result<HashMap<String, Known>> {
        let keys: Vec<String> = entities.iter().map(|e| entity_item_key(e)).collect();
        for key in &keys {
            check_key(key)?;
        }
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let items = self.remote.fetch(&refs)?;
        let mut stored = Vec::with_capacity(entities.len());
        for (entity, key) in entities.iter().zip(&keys) {
            stored.push((*entity, items.get(key).map(|item| decode_entity(key, item)).transpose()?));
        }
        self.learn_commits(stored.iter().filter_map(|(_, s)| s.as_ref()?.flush.as_ref()))?;
        let mut known = HashMap::with_capacity(stored.len());
        let mut spilled = Vec::new();
        for (entity, s) in stored {
            let stamp = Stamp::of(s.as_ref().and_then(|s| s.flush.as_ref()));
            let parts = s.map(|s| self.committed_parts(s)).unwrap_or_default();
            let mut k = Known { stamp, ..Known::default() };
            for (name, part) in parts {
                match part {
                    Part::Inline(r) => {
                        k.records.insert(name, r);
                    }
                    Part::Spilled { .. } => {
                        spilled.push((entity, part_key(entity, &name)));
                        k.spilled.insert(name);
                    }
                }
            }
            known.insert(entity.to_string(), k);
        }
        if !spilled.is_empty() {
            let refs: Vec<&str> = spilled.iter().map(|(_, k)| k.as_str()).collect();
            let read = self.read_committed(&refs)?;
            self.remember(&read);
            for (entity, key) in &spilled {
                if let (Some(Some(r)), Some((_, name))) = (read.get(key).map(|v| &v.record), place(key)) {
                    if let Some(k) = known.get_mut(*entity) {
                        k.records.insert(name.to_string(), r.clone());
                    }
                }
            }
        }
        Ok(known)
    }

    /// Remembers entities' committed versions, forgetting all the others
    /// first when the bound would be passed.
    pub(super) fn remember_entities(&self, read: impl IntoIterator<Item = (String, Known)>) {
        let mut entities = self.entities.borrow_mut();
        for (entity, known) in read {
            if entities.len() >= self.remember_versions {
                entities.clear();
            }
            entities.insert(entity, known);
        }
    }

    /// Adds to `out` the writes of flush `flush` that change parts of
    /// entities (entity items, and the own items of spilled parts); returns
    /// each changed entity's new version, to remember once committed.
    pub(super) fn entity_writes(
        &self,
        changes: &PartChanges<'_>,
        flush: &str,
        out: &mut FlushWrites,
    ) -> Result<Vec<(String, Known)>> {
        if changes.is_empty() {
            return Ok(Vec::new());
        }
        // Entities the store has forgotten (or never read): read now.
        let missing: Vec<&str> = {
            let entities = self.entities.borrow();
            changes.keys().copied().filter(|e| !entities.contains_key(*e)).collect()
        };
        let fetched = if missing.is_empty() { HashMap::new() } else { self.read_entities(&missing)? };
        let entities = self.entities.borrow();
        let mut changed = Vec::new();
        for (entity, mutations) in changes {
            let before = fetched.get(*entity).or_else(|| entities.get(*entity)).cloned().unwrap_or_default();
            let mut after =
                Known { records: before.records.clone(), spilled: BTreeSet::new(), stamp: before.stamp.clone() };
            for (name, mutation) in mutations {
                match mutation {
                    Mutation::Put(r) => after.records.insert(name.to_string(), (*r).clone()),
                    Mutation::Delete => after.records.remove(*name),
                };
            }
            after.spilled = spilled_names(&after.records).into_iter().collect();
            if after.same_parts(&before) {
                continue;
            }
            // Spilled parts: their own items, in the per-key layout.
            let names: Vec<String> = after.spilled.union(&before.spilled).cloned().collect();
            let keys: Vec<String> = names.iter().map(|n| part_key(entity, n)).collect();
            let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
            let versions = if refs.is_empty() { HashMap::new() } else { self.versions_of(&refs)? };
            for (name, key) in names.iter().zip(keys) {
                let mutation = match after.own(name) {
                    Some(r) => Mutation::Put(r),
                    None => Mutation::Delete,
                };
                // The own item's committed record is the entity's, wherever it was read.
                let stamp = versions.get(&key).map(|v| v.stamp.clone()).unwrap_or_default();
                out.own_item(&key, mutation, Version { record: before.own(name).cloned(), stamp }, flush)?;
            }
            // The entity item, with the undo of each part it changes.
            let names: BTreeSet<&String> =
                after.records.keys().chain(before.records.keys()).chain(&before.spilled).collect();
            let mut undo = BTreeMap::new();
            let mut parts = Parts::new();
            for name in names {
                let (was, now) = (before.part(name), after.part(name));
                if was != now {
                    undo.insert(name.clone(), was);
                }
                if let Some(now) = now {
                    parts.insert(name.clone(), now);
                }
            }
            if !undo.is_empty() {
                let key = entity_item_key(entity);
                check_key(&key)?;
                let item = entity_item(entity, &parts, flush, &undo)?;
                if parts.is_empty() {
                    out.tombstones.push(key.clone());
                }
                let write = Write { key, item: Some(item), over: before.stamp.clone(), flush: flush.to_string() };
                after.stamp = write.stamp_after();
                out.writes.push(write);
            }
            changed.push((entity.to_string(), after));
        }
        Ok(changed)
    }

    /// Every record under `prefix` that the items of a Scan hold, entity
    /// parts included, as committed versions.
    pub(super) fn scanned_records(&self, items: &[Item], prefix: &str) -> Result<BTreeMap<String, Record>> {
        use super::codec::{decode, item_key, Stored};
        let mut entities: Vec<(String, StoredEntity)> = Vec::new();
        let mut own: HashMap<String, Stored> = HashMap::new();
        for item in items {
            let Some(key) = item_key(item) else { continue };
            if let Some(entity) = key.strip_prefix(ENTITY_PREFIX) {
                entities.push((entity.to_string(), decode_entity(key, item)?));
            } else if key.starts_with(prefix) || place(key).is_some() {
                own.insert(key.to_string(), decode(key, item)?);
            }
        }
        let flushes = entities.iter().filter_map(|(_, s)| s.flush.as_ref());
        self.learn_commits(flushes.chain(own.values().filter_map(|s| s.flush.as_ref())))?;
        let mut records = BTreeMap::new();
        for (entity, s) in entities {
            for (name, part) in self.committed_parts(s) {
                let key = part_key(&entity, &name);
                if !key.starts_with(prefix) {
                    continue;
                }
                let record = match part {
                    Part::Inline(r) => Some(r),
                    Part::Spilled { .. } => own.remove(&key).and_then(|s| self.resolve(s)),
                };
                if let Some(r) = record {
                    records.insert(key, r);
                }
            }
        }
        // Own items of keys that are parts of entities count only through
        // their entity (above): what is left of them is stale.
        for (key, s) in own {
            if place(&key).is_none() && key.starts_with(prefix) {
                if let Some(r) = self.resolve(s) {
                    records.insert(key, r);
                }
            }
        }
        Ok(records)
    }
}

/// Serialized size of a record, which decides where it is kept.
pub(super) fn part_bytes(record: &Record) -> usize {
    serde_json::to_vec(record).map_or(usize::MAX, |v| v.len())
}

/// Which of an entity's records are spilled: those over [`SPILL_BYTES`],
/// and past [`MAX_INLINE_PARTS`] the largest of the rest.
pub(super) fn spilled_names(records: &BTreeMap<String, Record>) -> Vec<String> {
    // Smallest first (ties: the later name first): the smallest stay inline.
    let mut sized: Vec<(usize, &String)> = records.iter().map(|(n, r)| (part_bytes(r), n)).collect();
    sized.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| b.1.cmp(a.1)));
    let mut inline = 0;
    let mut out = Vec::new();
    for (bytes, name) in sized {
        if bytes > SPILL_BYTES || inline >= MAX_INLINE_PARTS {
            out.push(name.clone());
        } else {
            inline += 1;
        }
    }
    out.sort();
    out
}

fn json_text(key: &str, value: &impl Serialize) -> Result<String> {
    serde_json::to_string(value).map_err(|e| backend(format!("key {key:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_state_and_risk_are_parts_of_their_entity_and_nothing_else_is() {
        assert_eq!(place("okta_ip_change/user/m@x"), Some(("user/m@x", "okta_ip_change")));
        assert_eq!(
            place("aws_assume_role_new_source_ip/role/arn:aws:iam::1:role/deploy"),
            Some(("role/arn:aws:iam::1:role/deploy", "aws_assume_role_new_source_ip"))
        );
        assert_eq!(place("riskd/risk/user/m@x"), Some(("user/m@x", "riskd/risk")));
        assert_eq!(part_key("user/m@x", "riskd/risk"), "riskd/risk/user/m@x");
        assert_eq!(part_key("user/m@x", "okta_ip_change"), "okta_ip_change/user/m@x");
        for own in
            ["riskd/dedup/r/m@x", "riskd/watermark", "panther/full", "a/b", "a//c", "a/b/", "/b/c", "riskd/risk/u"]
        {
            assert_eq!(place(own), None, "{own}");
        }
    }

    #[test]
    fn the_undo_restores_the_committed_parts() {
        let rec = |count| Part::Inline(Record { count, ..Record::default() });
        let stored = StoredEntity {
            parts: Parts::from([("a".into(), rec(2)), ("b".into(), rec(5))]),
            flush: None,
            undo: BTreeMap::from([("a".into(), Some(rec(1))), ("b".into(), None), ("c".into(), Some(rec(9)))]),
        };
        assert_eq!(stored.undone(), Parts::from([("a".into(), rec(1)), ("c".into(), rec(9))]));
    }

    #[test]
    fn big_parts_and_parts_past_the_inline_bound_spill() {
        let sized = |n: usize| Record { set: (0..n).map(|i| format!("{i:08}")).collect(), ..Record::default() };
        let records: BTreeMap<String, Record> =
            [("big".to_string(), sized(5000)), ("small".to_string(), sized(1))].into();
        assert_eq!(spilled_names(&records), vec!["big".to_string()]);
        let many: BTreeMap<String, Record> = (0..12).map(|i| (format!("r{i:02}"), sized(i + 1))).collect();
        // The two largest of twelve small parts go.
        assert_eq!(spilled_names(&many), vec!["r10".to_string(), "r11".to_string()]);
        // Parts round-trip through JSON, spilled notes included.
        let parts = Parts::from([("a".into(), Part::Inline(sized(2))), ("b".into(), Part::Spilled { spilled: true })]);
        let text = serde_json::to_string(&parts).unwrap();
        assert_eq!(serde_json::from_str::<Parts>(&text).unwrap(), parts);
    }

    #[test]
    fn the_item_expires_with_its_last_part_and_never_with_a_part_that_does_not() {
        let at = |ms| Part::Inline(Record { count: 1, expires_at_ms: ms, ..Record::default() });
        let parts = Parts::from([("a".into(), at(Some(1_500))), ("b".into(), at(Some(9_000)))]);
        let undo = BTreeMap::from([("a".to_string(), Some(at(Some(20_001))))]);
        let item = entity_item("user/u", &parts, "run:1", &undo).unwrap();
        assert_eq!(item.get(attr::EXPIRES_AT), Some(&AttributeValue::N("21".into())));
        let parts = Parts::from([("a".into(), at(Some(1_500))), ("b".into(), at(None))]);
        let item = entity_item("user/u", &parts, "run:1", &BTreeMap::new()).unwrap();
        assert_eq!(item.get(attr::EXPIRES_AT), None);
        let back = decode_entity("riskd/entity/user/u", &item).unwrap();
        assert_eq!(back.parts, parts);
        assert_eq!(back.flush, Some(FlushId { run: "run".into(), seq: 1, text: "run:1".into() }));
    }
}
