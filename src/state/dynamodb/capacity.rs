//! What riskd's requests cost: DynamoDB's item size rules, the capacity
//! units they give, and `riskd_dynamodb_capacity_units_total`.
//!
//! Every request asks for `ReturnConsumedCapacity::Total` and counts what
//! the answer says (`source="dynamodb"`). An answer without it (a service
//! or emulator that leaves it out, or a conditional write that failed,
//! which AWS still bills) is counted from riskd's own estimate by the
//! rules below (`source="estimate"`).
//!
//! The rules are AWS's documented ones (Developer Guide, "Item sizes and
//! formats" and "DynamoDB read and write operations"), with these
//! approximations:
//! - a number's size is 1 byte per two significant digits plus 1, the
//!   guide's "approximately"; a negative number is not charged extra;
//! - a write that replaces an item is billed by the larger of the old and
//!   new items: the estimate counts the new one (riskd's writes rarely
//!   shrink an item), and a delete is estimated at 1 unit (riskd does not
//!   read the item it deletes);
//! - a key that BatchGetItem does not find is estimated at 1 unit, as AWS
//!   documents for reads of items that do not exist (DynamoDB Local
//!   reports 0 for them);
//! - a Scan is billed by every item it reads, before its filter: the
//!   estimate only sees the items that pass it;
//! - throttled and failed requests (but conditional writes) cost nothing.

use super::codec::Item;
use crate::telemetry::metrics;
use aws_sdk_dynamodb::types::{AttributeValue, ConsumedCapacity};

/// The operations riskd sends that consume capacity.
pub(super) const OPERATIONS: [&str; 5] = ["BatchGetItem", "Scan", "PutItem", "DeleteItem", "TransactWriteItems"];

/// Write units are per started KB, read units per started 4 KB.
const WRITE_UNIT_BYTES: usize = 1024;
const READ_UNIT_BYTES: usize = 4096;

/// An item's size by DynamoDB's rules: each attribute's name (UTF-8
/// bytes) plus its value's size.
pub(super) fn item_size(item: &Item) -> usize {
    item.iter().map(|(name, value)| name.len() + value_size(value)).sum()
}

/// A value's size: strings and binaries their bytes, numbers by their
/// significant digits, booleans and nulls 1 byte, sets the sum of their
/// members, maps and lists 3 bytes plus 1 a member plus the members
/// (a map's member with its name).
fn value_size(value: &AttributeValue) -> usize {
    match value {
        AttributeValue::S(s) => s.len(),
        AttributeValue::N(n) => number_size(n),
        AttributeValue::B(b) => b.as_ref().len(),
        AttributeValue::Ss(v) => v.iter().map(String::len).sum(),
        AttributeValue::Ns(v) => v.iter().map(|n| number_size(n)).sum(),
        AttributeValue::Bs(v) => v.iter().map(|b| b.as_ref().len()).sum(),
        AttributeValue::M(m) => 3 + m.iter().map(|(name, v)| 1 + name.len() + value_size(v)).sum::<usize>(),
        AttributeValue::L(l) => 3 + l.iter().map(|v| 1 + value_size(v)).sum::<usize>(),
        // Bool, Null, and whatever a later SDK adds.
        _ => 1,
    }
}

/// A number's size: 1 byte per two significant digits (leading and
/// trailing zeros dropped), plus 1.
fn number_size(text: &str) -> usize {
    let mantissa = text.split(['e', 'E']).next().unwrap_or_default();
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let significant = digits.trim_start_matches('0').trim_end_matches('0').len();
    significant.div_ceil(2) + 1
}

/// Write units of putting an item of `bytes` (outside a transaction).
pub(super) fn write_units(bytes: usize) -> f64 {
    bytes.div_ceil(WRITE_UNIT_BYTES).max(1) as f64
}

/// Read units of a strongly consistent read of an item of `bytes`.
pub(super) fn read_units(bytes: usize) -> f64 {
    bytes.div_ceil(READ_UNIT_BYTES).max(1) as f64
}

/// Read units of a strongly consistent BatchGetItem that found `items`
/// and not `not_found` keys: each item by its size, each key not found 1
/// (AWS bills a read of an item that does not exist as a read).
pub(super) fn batch_get_units(items: &[Item], not_found: usize) -> f64 {
    items.iter().map(|item| read_units(item_size(item))).sum::<f64>() + not_found as f64
}

/// Read units of a strongly consistent Scan that read `items`: their
/// sizes summed, then rounded up to 4 KB (a Scan is not billed per item).
pub(super) fn scan_units(items: &[Item]) -> f64 {
    read_units(items.iter().map(item_size).sum())
}

/// The units an answer reports, `None` when it reports none.
pub(super) fn reported<'a>(consumed: impl IntoIterator<Item = &'a ConsumedCapacity>) -> Option<f64> {
    consumed.into_iter().filter_map(ConsumedCapacity::capacity_units).reduce(|a, b| a + b)
}

/// Whether `operation` consumes read units (else write units).
fn kind(operation: &str) -> &'static str {
    if matches!(operation, "BatchGetItem" | "Scan") {
        "read"
    } else {
        "write"
    }
}

/// Counts what one answer of `operation` consumed: what it `reported`,
/// or else the `estimate`.
pub(super) fn count(operation: &'static str, reported: Option<f64>, estimate: impl FnOnce() -> f64) {
    let (units, source) = match reported {
        Some(units) => (units, "dynamodb"),
        None => (estimate(), "estimate"),
    };
    metrics().dynamodb_capacity_units.with_label_values(&[kind(operation), operation, source]).inc_by(units);
}

/// Write units counted so far, reported and estimated, by every store of
/// this process.
pub fn write_units_total() -> f64 {
    let m = metrics();
    OPERATIONS
        .iter()
        .filter(|op| kind(op) == "write")
        .flat_map(|op| {
            ["dynamodb", "estimate"].map(|s| m.dynamodb_capacity_units.with_label_values(&["write", op, s]).get())
        })
        .sum()
}

/// Starts every series at zero, so dashboards have them before the first request.
pub(super) fn register() {
    let m = metrics();
    for op in OPERATIONS {
        for source in ["dynamodb", "estimate"] {
            m.dynamodb_capacity_units.with_label_values(&[kind(op), op, source]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_dynamodb::primitives::Blob;
    use std::collections::HashMap;

    fn item<const N: usize>(attributes: [(&str, AttributeValue); N]) -> Item {
        attributes.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }

    fn s(v: &str) -> AttributeValue {
        AttributeValue::S(v.into())
    }

    fn n(v: &str) -> AttributeValue {
        AttributeValue::N(v.into())
    }

    #[test]
    fn sizes_follow_dynamodbs_rules() {
        // The guide's example: "shirt-color" = "R" is 11 + 1 = 12 bytes.
        assert_eq!(item_size(&item([("shirt-color", s("R"))])), 12);
        // Strings and names count UTF-8 bytes, not characters.
        assert_eq!(item_size(&item([("é", s("日本"))])), 2 + 6);
        // Numbers: 1 byte per two significant digits, plus 1; zeros at either end are free.
        assert_eq!(number_size("1"), 2);
        assert_eq!(number_size("12"), 2);
        assert_eq!(number_size("123"), 3);
        assert_eq!(number_size("1000"), 2);
        assert_eq!(number_size("0.0012"), 2);
        assert_eq!(number_size("-12.5"), 3);
        assert_eq!(number_size("1.5E+10"), 2);
        assert_eq!(number_size("0"), 1);
        assert_eq!(item_size(&item([("intCount", n("1700000000"))])), 8 + 2);
        // Binary its bytes, booleans and nulls 1.
        assert_eq!(item_size(&item([("b", AttributeValue::B(Blob::new(vec![0u8; 10])))])), 11);
        assert_eq!(item_size(&item([("t", AttributeValue::Bool(true)), ("z", AttributeValue::Null(true))])), 4);
        // Sets: their members summed.
        assert_eq!(item_size(&item([("stringSet", AttributeValue::Ss(vec!["ab".into(), "cde".into()]))])), 9 + 5);
        assert_eq!(item_size(&item([("ns", AttributeValue::Ns(vec!["1".into(), "22".into()]))])), 2 + 4);
        // Maps and lists: 3 bytes, plus 1 a member, plus the members (and names).
        assert_eq!(item_size(&item([("m", AttributeValue::M(HashMap::new()))])), 1 + 3);
        assert_eq!(
            item_size(&item([("m", AttributeValue::M(HashMap::from([("ab".to_string(), s("xyz"))])))])),
            1 + 3 + 1 + 2 + 3
        );
        assert_eq!(item_size(&item([("l", AttributeValue::L(vec![s("xyz"), n("12")]))])), 1 + 3 + (1 + 3) + (1 + 2));
    }

    #[test]
    fn units_round_up_per_item() {
        // The guide's examples: a 3,500-byte read costs 1 unit, 10 KB costs 3;
        // a 500-byte write 1, a 3.5 KB write 4.
        assert_eq!(read_units(3_500), 1.0);
        assert_eq!(read_units(10 * 1024), 3.0);
        assert_eq!(write_units(500), 1.0);
        assert_eq!(write_units(3_500), 4.0);
        assert_eq!(write_units(1024), 1.0);
        assert_eq!(write_units(1025), 2.0);
        // Even an empty item costs a unit.
        assert_eq!(write_units(0), 1.0);
        assert_eq!(read_units(0), 1.0);
        // A Scan sums its items before rounding: two 3 KB items cost 2 units, not 2 × 1.
        let three_kb = item([("v", s(&"x".repeat(3 * 1024 - 1)))]);
        assert_eq!(scan_units(&[three_kb.clone(), three_kb.clone()]), 2.0);
        // A batch read: each item found by its size (5 KB: 2 units), each key not found 1.
        let five_kb = item([("v", s(&"x".repeat(5 * 1024)))]);
        assert_eq!(batch_get_units(&[five_kb, three_kb.clone()], 3), 2.0 + 1.0 + 3.0);
        assert_eq!(write_units(item_size(&three_kb)), 3.0);
    }

    #[test]
    fn reported_units_win_over_the_estimate() {
        let reported_by = |units: &[f64]| {
            let consumed: Vec<_> =
                units.iter().map(|u| ConsumedCapacity::builder().table_name("t").capacity_units(*u).build()).collect();
            reported(&consumed)
        };
        assert_eq!(reported_by(&[]), None);
        assert_eq!(reported_by(&[1.5, 2.0]), Some(3.5));
        let series = |source| metrics().dynamodb_capacity_units.with_label_values(&["read", "Scan", source]).get();
        let (ddb, est) = (series("dynamodb"), series("estimate"));
        count("Scan", Some(2.5), || panic!("no estimate when the answer says"));
        count("Scan", None, || 4.0);
        assert_eq!(series("dynamodb") - ddb, 2.5);
        assert_eq!(series("estimate") - est, 4.0);
    }
}
