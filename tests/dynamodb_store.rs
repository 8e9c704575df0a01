//! The DynamoDB store against the DynamoDB Local that `scripts/test.sh`
//! starts (`RISKD_TEST_DYNAMODB_ENDPOINT`; without it every test fails),
//! one fresh table per test. The store is driven through the crate's public
//! API only; the table's items are read and written with the SDK directly
//! where a test looks at the layout or leaves items as Panther or a crash
//! would.

mod common;

use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType, Projection,
    ProjectionType, ScalarAttributeType,
};
use common::{dynamodb_endpoint, dynamodb_proxy};
use riskd::state::dynamodb::{check_table, init_table, prune_markers};
use riskd::state::{Checkpoint, DynamoConfig, DynamoStore, Layout, Mutation, Record, StateError, Store, WriteBatch};
use riskd::telemetry::metrics;
use serde_json::json;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

type Item = HashMap<String, AttributeValue>;

/// A config for a table no other test uses (not created yet).
fn test_config() -> DynamoConfig {
    DynamoConfig {
        table: format!("riskd-test-{}", uuid::Uuid::new_v4().simple()),
        region: Some("us-east-1".into()),
        endpoint_url: Some(dynamodb_endpoint()),
        ttl: true,
        remember_versions: 10_000,
        read_requests_per_second: None,
        write_requests_per_second: None,
        layout: Layout::Key,
    }
}

/// A store on a fresh table made by `init_table`.
fn fresh() -> (DynamoStore, DynamoConfig) {
    let cfg = test_config();
    init_table(&cfg).unwrap();
    (DynamoStore::open(&cfg).unwrap(), cfg)
}

riskd::shared_store_tests!(fresh());

/// A test table reached past the store, with the SDK.
struct Table {
    rt: tokio::runtime::Runtime,
    client: aws_sdk_dynamodb::Client,
    name: String,
}

impl Table {
    fn of(name: &str) -> Self {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let sdk = rt.block_on(
            aws_config::defaults(aws_config::BehaviorVersion::latest())
                .endpoint_url(dynamodb_endpoint())
                .region(aws_config::Region::new("us-east-1"))
                .load(),
        );
        Self { rt, client: aws_sdk_dynamodb::Client::new(&sdk), name: name.to_string() }
    }

    /// The item under `key`, as stored.
    fn get(&self, key: &str) -> Option<Item> {
        let get = self.client.get_item().table_name(&self.name).key("key", s(key)).consistent_read(true).send();
        self.rt.block_on(get).unwrap().item
    }

    fn put(&self, item: Item) {
        self.rt.block_on(self.client.put_item().table_name(&self.name).set_item(Some(item)).send()).unwrap();
    }

    /// Creates the table with hash key `key` of type `kind`, and `indexes`.
    fn create(&self, key: &str, kind: ScalarAttributeType, indexes: Vec<(GlobalSecondaryIndex, AttributeDefinition)>) {
        let definition = |name: &str, kind| {
            AttributeDefinition::builder().attribute_name(name).attribute_type(kind).build().unwrap()
        };
        let (indexes, definitions): (Vec<_>, Vec<_>) = indexes.into_iter().unzip();
        let create = self
            .client
            .create_table()
            .table_name(&self.name)
            .key_schema(hash_key(key))
            .set_attribute_definitions(Some([vec![definition(key, kind)], definitions].concat()))
            .set_global_secondary_indexes((!indexes.is_empty()).then_some(indexes))
            .billing_mode(BillingMode::PayPerRequest)
            .send();
        self.rt.block_on(create).unwrap();
    }

    /// The run that wrote the item under `key` (its `riskdFlush` is `<run>:<seq>`).
    fn run_of(&self, key: &str) -> String {
        let item = self.get(key).unwrap();
        let flush = item["riskdFlush"].as_s().unwrap();
        flush.rsplit_once(':').unwrap().0.to_string()
    }

    /// Whether the commit marker of `run` is in the table.
    fn has_marker(&self, run: &str) -> bool {
        self.get(&format!("riskd/flush/{run}")).is_some()
    }
}

fn hash_key(name: &str) -> KeySchemaElement {
    KeySchemaElement::builder().attribute_name(name).key_type(KeyType::Hash).build().unwrap()
}

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: &str) -> AttributeValue {
    AttributeValue::N(v.into())
}

fn item<const N: usize>(attributes: [(&str, AttributeValue); N]) -> Item {
    attributes.into_iter().map(|(name, value)| (name.to_string(), value)).collect()
}

fn dict(v: serde_json::Value) -> Option<serde_json::Map<String, serde_json::Value>> {
    v.as_object().cloned()
}

/// A proxy in front of DynamoDB Local that, while `refuse` is set, cuts
/// every connection that sends a commit (TransactWriteItems, or PutItem
/// of a marker or checkpoint alone) before the request reaches the table: a flush's
/// items land and its commit never does, as when riskd dies between them.
struct CommitCutter {
    endpoint: String,
    refuse: Arc<AtomicBool>,
}

impl CommitCutter {
    fn start() -> Self {
        let refuse = Arc::new(AtomicBool::new(false));
        let shared = Arc::clone(&refuse);
        let endpoint = dynamodb_proxy(move |client, server| forward_requests(client, server, &shared));
        Self { endpoint, refuse }
    }

    /// A config of the same table, through the proxy.
    fn config(&self, cfg: &DynamoConfig) -> DynamoConfig {
        DynamoConfig { endpoint_url: Some(self.endpoint.clone()), ..cfg.clone() }
    }
}

/// Forwards HTTP/1.1 requests (each with a Content-Length) one at a time;
/// cuts the connection at a commit while `refuse` is set.
fn forward_requests(client: TcpStream, server: TcpStream, refuse: &AtomicBool) {
    // A marker or checkpoint alone is a PutItem too, as are a flush's items:
    // those carry `riskdMeta`.
    forward_each(client, server, |head, body| {
        let commit = head.contains("DynamoDB_20120810.TransactWriteItems")
            || (head.contains("DynamoDB_20120810.PutItem") && body.windows(9).any(|w| w == b"riskdMeta"));
        !(commit && refuse.load(Ordering::SeqCst))
    })
}

/// Forwards HTTP/1.1 requests (each with a Content-Length) one at a time,
/// each once `pass` (given its head and body) says so; cuts the
/// connection when it says no.
fn forward_each(client: TcpStream, mut server: TcpStream, pass: impl Fn(&str, &[u8]) -> bool) {
    let mut client = BufReader::new(client);
    loop {
        let mut head = String::new();
        let mut length = 0;
        loop {
            let mut line = String::new();
            if client.read_line(&mut line).unwrap_or(0) == 0 {
                let _ = server.shutdown(Shutdown::Write);
                return;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.trim().eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0; length];
        if client.read_exact(&mut body).is_err() {
            return;
        }
        if !pass(&head, &body) {
            let _ = client.get_ref().shutdown(Shutdown::Both);
            let _ = server.shutdown(Shutdown::Both);
            return;
        }
        if server.write_all(head.as_bytes()).and_then(|()| server.write_all(&body)).is_err() {
            return;
        }
    }
}

#[test]
fn a_write_delayed_past_its_timeout_cannot_undo_a_later_flush() {
    // The first item write of an armed flush is held 8 s, past the 5 s an
    // attempt may take: the store tries it again on another connection and
    // goes on; the held request reaches the table after the next flush.
    let (_, cfg) = fresh();
    let armed = Arc::new(AtomicBool::new(false));
    let landed = Arc::new(AtomicBool::new(false));
    let (hook_armed, hook_landed) = (Arc::clone(&armed), Arc::clone(&landed));
    let endpoint = dynamodb_proxy(move |client, server| {
        let (armed, landed) = (Arc::clone(&hook_armed), Arc::clone(&hook_landed));
        forward_each(client, server, move |head, body| {
            let item = head.contains("DynamoDB_20120810.PutItem") && !body.windows(9).any(|w| w == b"riskdMeta");
            if item && armed.swap(false, Ordering::SeqCst) {
                std::thread::sleep(Duration::from_secs(8));
                landed.store(true, Ordering::SeqCst);
            }
            true
        })
    });
    let mut store = DynamoStore::open(&DynamoConfig { endpoint_url: Some(endpoint), ..cfg.clone() }).unwrap();
    let v1 = Record { count: 1, ..Record::default() };
    let v2 = Record { count: 2, ..Record::default() };
    let cp = |offset| Checkpoint { offset, ..Checkpoint::default() };
    let (cp1, cp2) = (cp(1), cp(2));
    armed.store(true, Ordering::SeqCst);
    store.apply(WriteBatch { mutations: vec![("d/k", Mutation::Put(&v1))], checkpoints: vec![("src", &cp1)] }).unwrap();
    assert!(!landed.load(Ordering::SeqCst), "the held write is still held");
    store.apply(WriteBatch { mutations: vec![("d/k", Mutation::Put(&v2))], checkpoints: vec![("src", &cp2)] }).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !landed.load(Ordering::SeqCst) {
        assert!(std::time::Instant::now() < deadline, "the held write was never sent");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let reader = DynamoStore::open(&cfg).unwrap();
    assert_eq!(reader.get_many(&["d/k"]).unwrap(), vec![Some(v2)], "the delayed write changed nothing");
    assert_eq!(reader.checkpoint("src").unwrap(), Some(cp2));
}

#[test]
fn direct_updates_from_two_processes_lose_nothing() {
    let (_, cfg) = fresh();
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let cfg = cfg.clone();
            std::thread::spawn(move || {
                // Each thread is a riskd process of its own: its own store, client and runtime.
                let mut store = DynamoStore::open(&cfg).unwrap();
                for _ in 0..40 {
                    store
                        .update("shared/counter", 0, &mut |r| {
                            r.count += 1;
                            true
                        })
                        .unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let store = DynamoStore::open(&cfg).unwrap();
    let got = store.get_many(&["shared/counter"]).unwrap().pop().flatten();
    assert_eq!(got.map(|r| r.count), Some(80), "no increment lost to a concurrent one");
    let raw = Table::of(&cfg.table).get("shared/counter").unwrap();
    assert_eq!(raw["intCount"], n("80"), "Panther's layout");
}

#[test]
fn the_write_budget_holds() {
    let mut cfg = test_config();
    init_table(&cfg).unwrap();
    cfg.write_requests_per_second = Some(5);
    let mut store = DynamoStore::open(&cfg).unwrap();
    let waits = || metrics().rate_limiter_waits.with_label_values(&["write"]).get();
    let before = waits();
    let start = std::time::Instant::now();
    // Each flush sends two write requests (its items, then its commit):
    // 20 requests at 5/s with a burst of 5 take at least 3 s.
    for i in 0..10 {
        let record = Record { count: i, ..Record::default() };
        let key = format!("limit/{i}");
        store
            .apply(WriteBatch { mutations: vec![(key.as_str(), Mutation::Put(&record))], checkpoints: Vec::new() })
            .unwrap();
    }
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_millis(2500), "20 write requests at 5/s took only {elapsed:?}");
    assert!(waits() - before >= 10, "the limiter made requests wait");
}

#[test]
fn panther_items_read_as_records_and_riskd_items_have_panther_layout() {
    let (mut store, cfg) = fresh();
    let table = Table::of(&cfg.table);
    // As Panther's helpers leave them: increment_counter, add_to_string_set,
    // put_dictionary and set_key_expiration on one key, and a bare counter. The
    // expiry is in the future: the table's TTL deletes items past it by the wall clock.
    table.put(item([
        ("key", s("panther/full")),
        ("intCount", n("5")),
        ("stringSet", AttributeValue::Ss(vec!["a".into(), "b".into()])),
        ("dictionary", s(r#"{"ip": "1.2.3.4", "n": 2}"#)),
        ("expiresAt", n("4102444800")),
    ]));
    table.put(item([("key", s("panther/counter")), ("intCount", n("12"))]));
    let full = Record {
        count: 5,
        set: ["a".into(), "b".into()].into(),
        dict: dict(json!({"ip": "1.2.3.4", "n": 2})),
        expires_at_ms: Some(4_102_444_800_000),
    };
    let counter = Record { count: 12, ..Record::default() };
    assert_eq!(
        store.get_many(&["panther/full", "panther/counter", "panther/none"]).unwrap(),
        vec![Some(full.clone()), Some(counter), None]
    );

    // riskd's writes: Panther's attributes, expiry rounded up to the second.
    let mine = Record {
        count: 7,
        set: ["x".into()].into(),
        dict: dict(json!({"city": "Paris"})),
        expires_at_ms: Some(4_102_444_800_500),
    };
    let no_set = Record { count: 1, ..Record::default() };
    store
        .apply(WriteBatch {
            mutations: vec![("panther/full", Mutation::Put(&mine)), ("riskd/new", Mutation::Put(&no_set))],
            checkpoints: Vec::new(),
        })
        .unwrap();
    let written = table.get("panther/full").unwrap();
    assert_eq!(written["intCount"], n("7"));
    assert_eq!(written["stringSet"], AttributeValue::Ss(vec!["x".into()]));
    assert_eq!(written["dictionary"], s(r#"{"city":"Paris"}"#));
    assert_eq!(written["expiresAt"], n("4102444801"), "rounded up: never expires early");
    assert_eq!(written["riskdExpiresAtMs"], n("4102444800500"));
    assert!(matches!(&written["riskdFlush"], AttributeValue::S(f) if f.ends_with(":1")));
    let prev: Record = serde_json::from_str(written["riskdPrev"].as_s().unwrap()).unwrap();
    assert_eq!(prev, full, "the previous committed version rides along");
    let written = table.get("riskd/new").unwrap();
    assert!(!written.contains_key("stringSet"), "no empty sets in DynamoDB");
    assert!(!written.contains_key("dictionary") && !written.contains_key("expiresAt"));
    assert!(!written.contains_key("riskdPrev"), "the key had no previous version");

    // Panther moving the expiry (set_key_expiration) wins over riskd's milliseconds.
    let mut moved = table.get("panther/full").unwrap();
    moved.insert("expiresAt".into(), n("1800000000"));
    table.put(moved);
    let fresh = DynamoStore::open(&cfg).unwrap();
    let got = fresh.get_many(&["panther/full"]).unwrap().remove(0).unwrap();
    assert_eq!(got.expires_at_ms, Some(1_800_000_000_000));
    assert_eq!(got.count, 7);
}

#[test]
fn the_same_batch_applied_twice_changes_no_item() {
    let (mut store, cfg) = fresh();
    let table = Table::of(&cfg.table);
    let a = Record { count: 3, set: ["s".into()].into(), ..Record::default() };
    let b = Record { dict: dict(json!({"k": 1})), expires_at_ms: Some(5_000), ..Record::default() };
    table.put(item([("key", s("gone")), ("intCount", n("1"))]));
    let cp = Checkpoint { offset: 9, ..Checkpoint::default() };
    let batch = || WriteBatch {
        mutations: vec![("a", Mutation::Put(&a)), ("b", Mutation::Put(&b)), ("gone", Mutation::Delete)],
        checkpoints: vec![("src", &cp)],
    };
    store.get_many(&["a", "b", "gone"]).unwrap();
    store.apply(batch()).unwrap();
    let before: Vec<Option<Item>> = ["a", "b", "gone"].iter().map(|k| table.get(k)).collect();
    assert!(before[2].is_none(), "the committed tombstone is removed");
    store.apply(batch()).unwrap();
    // And from another process, which knows nothing of the first apply.
    let mut other = DynamoStore::open(&cfg).unwrap();
    other.apply(batch()).unwrap();
    let after: Vec<Option<Item>> = ["a", "b", "gone"].iter().map(|k| table.get(k)).collect();
    assert_eq!(after, before);
    assert_eq!(other.get_many(&["a", "b", "gone"]).unwrap(), vec![Some(a.clone()), Some(b.clone()), None]);
    assert_eq!(other.checkpoint("src").unwrap(), Some(cp.clone()));
}

#[test]
fn pruning_removes_only_the_markers_no_item_needs() {
    let (mut a, cfg) = fresh();
    let table = Table::of(&cfg.table);
    let (v1, v2) = (Record { count: 1, ..Record::default() }, Record { count: 2, ..Record::default() });
    let put = |keys: &[&'static str], v| WriteBatch {
        mutations: keys.iter().map(|k| (*k, Mutation::Put(v))).collect(),
        checkpoints: Vec::new(),
    };
    a.apply(put(&["k1", "k2"], &v1)).unwrap();
    let run_a = table.run_of("k1");
    // Another run overwrites every key the first wrote; a third writes a key of its own.
    let mut b = DynamoStore::open(&cfg).unwrap();
    b.get_many(&["k1", "k2"]).unwrap();
    b.apply(put(&["k1", "k2"], &v2)).unwrap();
    let run_b = table.run_of("k1");
    let mut c = DynamoStore::open(&cfg).unwrap();
    c.apply(put(&["k3"], &v1)).unwrap();
    let run_c = table.run_of("k3");
    let markers = || [&run_a, &run_b, &run_c].map(|run| table.has_marker(run));
    assert_eq!(markers(), [true, true, true]);

    let recent = prune_markers(&cfg, Duration::from_secs(3600)).unwrap();
    assert_eq!(recent[1], "deleted 0; kept 1 that committed less than 1h ago", "{recent:?}");
    let done = prune_markers(&cfg, Duration::ZERO).unwrap();
    assert!(
        done[0].starts_with("3 commit markers in table") && done[0].ends_with("2 still named by items"),
        "{done:?}"
    );
    assert!(done[1].starts_with("deleted 1;"), "{done:?}");
    assert_eq!(markers(), [false, true, true], "only the marker no item names is gone");
    let reader = DynamoStore::open(&cfg).unwrap();
    assert_eq!(reader.get_many(&["k1", "k2", "k3"]).unwrap(), vec![Some(v2.clone()), Some(v2), Some(v1)]);
}

#[test]
fn a_crash_mid_flush_reads_as_the_last_committed_flush() {
    let (_, cfg) = fresh();
    let proxy = CommitCutter::start();
    let mut store = DynamoStore::open(&proxy.config(&cfg)).unwrap();
    let v1 = Record { count: 1, ..Record::default() };
    let v2 = Record { count: 2, set: ["new".into()].into(), ..Record::default() };
    let cp1 = Checkpoint { offset: 100, line: 1, ..Checkpoint::default() };
    let cp2 = Checkpoint { offset: 200, line: 2, ..Checkpoint::default() };
    store
        .apply(WriteBatch {
            mutations: vec![("k/changed", Mutation::Put(&v1)), ("k/deleted", Mutation::Put(&v1))],
            checkpoints: vec![("src", &cp1)],
        })
        .unwrap();
    let flush2 = || WriteBatch {
        mutations: vec![
            ("k/changed", Mutation::Put(&v2)),
            ("k/deleted", Mutation::Delete),
            ("k/created", Mutation::Put(&v2)),
        ],
        checkpoints: vec![("src", &cp2)],
    };
    // The items of flush 2 are written, then the process dies before the commit.
    proxy.refuse.store(true, Ordering::SeqCst);
    assert!(store.apply(flush2()).is_err());
    let table = Table::of(&cfg.table);
    assert_eq!(table.get("k/changed").unwrap()["intCount"], n("2"), "the new value is in the table");
    assert!(table.get("k/created").is_some());

    // A restart (a new process) sees exactly the state of flush 1.
    let mut restarted = DynamoStore::open(&cfg).unwrap();
    let keys = ["k/changed", "k/deleted", "k/created"];
    assert_eq!(restarted.get_many(&keys).unwrap(), vec![Some(v1.clone()), Some(v1.clone()), None]);
    assert_eq!(restarted.checkpoint("src").unwrap(), Some(cp1.clone()));
    let mut exported = Vec::new();
    restarted.scan("", &mut |k, r| exported.push((k.to_string(), r.clone()))).unwrap();
    assert_eq!(exported, vec![("k/changed".into(), v1.clone()), ("k/deleted".into(), v1.clone())]);
    // So does the crashed store itself: its failed flush can never commit.
    proxy.refuse.store(false, Ordering::SeqCst);
    assert_eq!(store.get_many(&keys).unwrap(), vec![Some(v1.clone()), Some(v1.clone()), None]);
    store.apply(WriteBatch { mutations: vec![("other", Mutation::Put(&v1))], checkpoints: Vec::new() }).unwrap();
    assert_eq!(restarted.get_many(&keys).unwrap(), vec![Some(v1.clone()), Some(v1.clone()), None]);

    // The replay applies flush 2 again, and it commits.
    restarted.apply(flush2()).unwrap();
    let later = DynamoStore::open(&cfg).unwrap();
    assert_eq!(later.get_many(&keys).unwrap(), vec![Some(v2.clone()), None, Some(v2.clone())]);
    assert_eq!(later.checkpoint("src").unwrap(), Some(cp2));
}

#[test]
fn previous_versions_stay_right_when_the_store_forgets_versions() {
    let (mut store, cfg) = fresh();
    let v1 = Record { count: 1, ..Record::default() };
    let v2 = Record { count: 2, ..Record::default() };
    let keys = ["f/1", "f/2", "f/3"];
    store
        .apply(WriteBatch {
            mutations: keys.iter().map(|k| (*k, Mutation::Put(&v1))).collect(),
            checkpoints: Vec::new(),
        })
        .unwrap();
    // A store that remembers two versions reads three keys, one at a time
    // as the cache does: the first two are forgotten when the third comes.
    let proxy = CommitCutter::start();
    let mut small = DynamoStore::open(&DynamoConfig { remember_versions: 2, ..proxy.config(&cfg) }).unwrap();
    for key in keys {
        assert_eq!(small.get_many(&[key]).unwrap(), vec![Some(v1.clone())]);
    }
    proxy.refuse.store(true, Ordering::SeqCst);
    let batch = WriteBatch {
        mutations: vec![("f/1", Mutation::Put(&v2)), ("f/2", Mutation::Delete), ("f/3", Mutation::Put(&v2))],
        checkpoints: Vec::new(),
    };
    assert!(small.apply(batch).is_err());
    let restarted = DynamoStore::open(&cfg).unwrap();
    assert_eq!(restarted.get_many(&keys).unwrap(), vec![Some(v1.clone()), Some(v1.clone()), Some(v1)]);
}

#[test]
fn a_crash_with_only_some_items_written_reads_as_before() {
    // BatchWriteItem chunks land one by one: write a few items of a
    // flush by hand, as a crash between two chunks leaves them.
    let (mut store, cfg) = fresh();
    let v1 = Record { count: 1, ..Record::default() };
    store.apply(WriteBatch { mutations: vec![("k", Mutation::Put(&v1))], checkpoints: Vec::new() }).unwrap();
    let table = Table::of(&cfg.table);
    let prev = serde_json::to_string(&v1).unwrap();
    table.put(item([("key", s("k")), ("intCount", n("99")), ("riskdFlush", s("deadrun:1")), ("riskdPrev", s(&prev))]));
    table.put(item([("key", s("new")), ("intCount", n("5")), ("riskdFlush", s("deadrun:1"))]));
    let restarted = DynamoStore::open(&cfg).unwrap();
    assert_eq!(restarted.get_many(&["k", "new"]).unwrap(), vec![Some(v1), None]);
}

#[test]
fn a_write_that_fails_for_good_names_the_key() {
    let (mut store, _) = fresh();
    // A dictionary near the 400 KB limit fits once, but not beside its previous version.
    let big = |c: &str| Record { dict: dict(json!({"x": c.repeat(300_000)})), ..Record::default() };
    let (first, second) = (big("a"), big("b"));
    store.apply(WriteBatch { mutations: vec![("big/key", Mutation::Put(&first))], checkpoints: Vec::new() }).unwrap();
    let err = store
        .apply(WriteBatch { mutations: vec![("big/key", Mutation::Put(&second))], checkpoints: Vec::new() })
        .unwrap_err();
    assert!(matches!(&err, StateError::ItemTooLarge { key, .. } if key == "big/key"), "{err}");
    assert_eq!(store.get_many(&["big/key"]).unwrap(), vec![Some(first)]);

    // A key DynamoDB refuses (a table keyed by a number): the service's
    // code, and the key — the first the store reads is the table's layout mark.
    let cfg = test_config();
    Table::of(&cfg.table).create("key", ScalarAttributeType::N, Vec::new());
    let wrong = DynamoStore::open(&cfg).unwrap();
    let err = wrong.get_many(&["w/1", "w/2"]).unwrap_err();
    assert!(
        matches!(&err, StateError::Request(r) if r.operation == "BatchGetItem" && r.key.as_deref() == Some("riskd/layout") && r.code == "ValidationException"),
        "{err}"
    );

    // Items DynamoDB refuses (an index wants `intCount` as a string), on
    // keys it reads: the write itself fails, naming the key found by
    // writing the chunk item by item.
    let cfg = test_config();
    let by_count = GlobalSecondaryIndex::builder()
        .index_name("byCount")
        .key_schema(hash_key("intCount"))
        .projection(Projection::builder().projection_type(ProjectionType::KeysOnly).build())
        .build()
        .unwrap();
    let count_as_string = AttributeDefinition::builder()
        .attribute_name("intCount")
        .attribute_type(ScalarAttributeType::S)
        .build()
        .unwrap();
    Table::of(&cfg.table).create("key", ScalarAttributeType::S, vec![(by_count, count_as_string)]);
    let mut refusing = DynamoStore::open(&cfg).unwrap();
    assert_eq!(refusing.get_many(&["w/1", "w/2"]).unwrap(), vec![None, None]);
    let rec = Record { count: 1, ..Record::default() };
    let err = refusing
        .apply(WriteBatch {
            mutations: vec![("w/1", Mutation::Put(&rec)), ("w/2", Mutation::Put(&rec))],
            checkpoints: Vec::new(),
        })
        .unwrap_err();
    assert!(
        matches!(&err, StateError::Request(r) if r.operation == "PutItem" && matches!(r.key.as_deref(), Some("w/1" | "w/2")) && r.code == "ValidationException"),
        "{err}"
    );
    assert!(err.to_string().contains("(key \"w/"), "{err}");

    // Over DynamoDB's 2048-byte key limit.
    let long = "k".repeat(2049);
    let err = store.get_many(&[&long]).unwrap_err();
    assert!(matches!(&err, StateError::BadKey { key, .. } if key == &long), "{err}");
}

#[test]
fn init_is_idempotent_and_check_says_what_is_wrong() {
    let cfg = test_config();
    let missing = check_table(&cfg).unwrap();
    assert!(missing.len() == 1 && missing[0].contains("does not exist"), "{missing:?}");
    let done = init_table(&cfg).unwrap();
    assert!(done[0].starts_with("created table") && done[1] == "enabled TTL on expiresAt", "{done:?}");
    assert_eq!(init_table(&cfg).unwrap()[1], "TTL already on expiresAt");
    assert_eq!(check_table(&cfg).unwrap(), Vec::<String>::new());
    let no_ttl = DynamoConfig { ttl: false, ..cfg.clone() };
    let problems = check_table(&no_ttl).unwrap();
    assert!(problems.len() == 1 && problems[0].contains("store.ttl = false"), "{problems:?}");

    // Wrong key name, then wrong key type; TTL off.
    let wrong = test_config();
    Table::of(&wrong.table).create("id", ScalarAttributeType::S, Vec::new());
    let problems = check_table(&wrong).unwrap();
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].contains("key schema is [id HASH], expected [key HASH]"), "{problems:?}");
    assert!(problems[1].contains("TTL is DISABLED"), "{problems:?}");
    let err = init_table(&wrong).unwrap_err();
    assert!(err.to_string().contains("key schema is [id HASH]"), "{err}");

    let numeric = test_config();
    Table::of(&numeric.table).create("key", ScalarAttributeType::N, Vec::new());
    let problems = check_table(&numeric).unwrap();
    assert!(problems[0].contains("attribute key is of type N, expected S"), "{problems:?}");

    // init enables TTL on a right table that lacks it; with ttl off it leaves it off.
    let bare = test_config();
    Table::of(&bare.table).create("key", ScalarAttributeType::S, Vec::new());
    let off = DynamoConfig { ttl: false, ..bare.clone() };
    assert_eq!(init_table(&off).unwrap()[1], "TTL left off (store.ttl = false)");
    assert_eq!(check_table(&off).unwrap(), Vec::<String>::new());
    assert_eq!(init_table(&bare).unwrap()[1], "enabled TTL on expiresAt");
}

/// Runs the test `name` again, alone in a process of its own (this test
/// binary, `--exact`), so that the process-wide metrics move by what it does
/// only; true when this is that process, where the test does its work.
fn alone(name: &str) -> bool {
    if std::env::var("RISKD_TEST_ALONE").is_ok_and(|n| n == name) {
        return true;
    }
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env("RISKD_TEST_ALONE", name)
        .output()
        .unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.contains("1 passed"), "{name}, run alone, failed:\n{said}");
    false
}

/// An item's size by DynamoDB's documented rules (names and values in
/// UTF-8 bytes, a number 1 byte per two significant digits plus 1, a set
/// its members), written here again for the types riskd stores, apart
/// from riskd's own code.
fn size_by_the_rules(item: &Item) -> usize {
    let number = |text: &str| {
        let digits: String = text.chars().filter(char::is_ascii_digit).collect();
        digits.trim_matches('0').len().div_ceil(2) + 1
    };
    item.iter()
        .map(|(name, value)| {
            name.len()
                + match value {
                    AttributeValue::S(v) => v.len(),
                    AttributeValue::N(v) => number(v),
                    AttributeValue::Ss(v) => v.iter().map(String::len).sum(),
                    AttributeValue::Bool(_) => 1,
                    other => panic!("riskd does not store {other:?}"),
                }
        })
        .sum()
}

/// Units by the rules: per started KB written, per started 4 KB read
/// strongly consistent, 1 at least.
fn units(bytes: usize, per: usize) -> f64 {
    bytes.div_ceil(per).max(1) as f64
}

/// A proxy in front of DynamoDB Local that takes `ConsumedCapacity` out
/// of every answer, as a service that does not report it would: riskd
/// must then count its own estimate.
fn without_consumed_capacity() -> String {
    common::proxy::relay(&dynamodb_endpoint(), |client: TcpStream, server: TcpStream| {
        let (mut from_client, mut to_server) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from_client, &mut to_server);
            let _ = to_server.shutdown(Shutdown::Both);
        });
        let (mut from_server, mut to_client) = (BufReader::new(server), client);
        while let Some(answer) = common::proxy::read_message(&mut from_server) {
            let end = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            let mut body: serde_json::Value = serde_json::from_slice(&answer[end..]).unwrap_or_default();
            if let Some(fields) = body.as_object_mut() {
                fields.remove("ConsumedCapacity");
            }
            let body = serde_json::to_vec(&body).unwrap();
            // The head without its length and checksum, which no longer hold.
            let head: String = String::from_utf8_lossy(&answer[..end - 2])
                .split_inclusive("\r\n")
                .filter(|l| {
                    let name = l.split(':').next().unwrap_or_default().to_ascii_lowercase();
                    name != "content-length" && name != "x-amz-crc32"
                })
                .collect();
            let head = format!("{head}Content-Length: {}\r\n\r\n", body.len());
            if to_client.write_all(head.as_bytes()).and_then(|_| to_client.write_all(&body)).is_err() {
                return;
            }
        }
        let _ = to_client.shutdown(Shutdown::Both);
    })
}

/// Runs the store on `endpoint` through a known set of reads and writes,
/// on a fresh table; returns the units each operation costs by DynamoDB's
/// size rules, computed from the items as stored.
fn a_known_workload(endpoint: String) -> Vec<(&'static str, &'static str, f64)> {
    let cfg = DynamoConfig { endpoint_url: Some(endpoint), ..test_config() };
    init_table(&cfg).unwrap();
    let mut store = DynamoStore::open(&cfg).unwrap();
    let table = Table::of(&cfg.table);
    // Far from the unit boundaries: a counter (under 1 KB), a set of about
    // 1.5 KB (2 write units, 1 read unit), a dictionary of about 4.5 KB (5
    // write units, 2 read units).
    let small = Record { count: 42, ..Record::default() };
    let set = Record { set: (0..30).map(|i| format!("{i:02}-{}", "s".repeat(46))).collect(), ..Record::default() };
    let big = Record { dict: dict(json!({ "v": "d".repeat(4_500) })), ..Record::default() };
    let keys = ["cost/small", "cost/set", "cost/big"];
    let all = [&keys[..], &["cost/direct"]].concat();
    // Every key starts as a small item Panther wrote: DynamoDB bills a read
    // of a key not stored as 1 unit, DynamoDB Local as 0; reads of items
    // stored are billed alike (and each write below makes its item larger,
    // so what it replaces does not change its cost).
    let panther: Vec<Item> = all.iter().map(|k| item([("key", s(k)), ("intCount", n("1"))])).collect();
    for it in &panther {
        table.put(it.clone());
    }
    assert_eq!(store.get_many(&keys).unwrap().iter().filter(|r| r.is_some()).count(), 3);
    // One flush without a checkpoint: a PutItem per item, then its marker alone (PutItem).
    store
        .apply(WriteBatch {
            mutations: vec![
                (keys[0], Mutation::Put(&small)),
                (keys[1], Mutation::Put(&set)),
                (keys[2], Mutation::Put(&big)),
            ],
            checkpoints: Vec::new(),
        })
        .unwrap();
    // A direct update: a read, then a conditional PutItem.
    store
        .update("cost/direct", 0, &mut |r| {
            r.count += 7;
            true
        })
        .unwrap();
    // Reads of what is stored now, then a scan of it all.
    assert_eq!(store.get_many(&all).unwrap().iter().filter(|r| r.is_some()).count(), 4);
    let mut scanned = 0;
    store.scan("", &mut |_, _| scanned += 1).unwrap();
    assert_eq!(scanned, 4);

    let stored: Vec<Item> = all.iter().map(|k| table.get(k).unwrap()).collect();
    let marker = table.get(&format!("riskd/flush/{}", table.run_of(keys[0]))).unwrap();
    // `init_table` marks the table with its layout (a PutItem); the store
    // reads the mark before its first request.
    let mark = size_by_the_rules(&table.get("riskd/layout").unwrap());
    let sizes: Vec<usize> = stored.iter().map(size_by_the_rules).collect();
    assert!(sizes[1] > 1_300 && sizes[1] < 1_800 && sizes[2] > 4_300 && sizes[2] < 4_900, "sizes {sizes:?}");
    let writes = units(sizes[0], 1024) + units(sizes[1], 1024) + units(sizes[2], 1024);
    // The first reads (three keys, then the update's), then the last.
    let reads: f64 = panther.iter().map(|it| units(size_by_the_rules(it), 4096)).sum::<f64>()
        + sizes.iter().map(|&b| units(b, 4096)).sum::<f64>()
        + units(mark, 4096);
    // A scan is billed by the sum of the sizes of the items it reads (its
    // filter, which drops the marker, applies after), rounded up once.
    let scan = units(sizes.iter().sum::<usize>() + size_by_the_rules(&marker) + mark, 4096);
    assert_eq!((writes, reads, scan), (1.0 + 2.0 + 5.0, 4.0 + 1.0 + 1.0 + 2.0 + 1.0 + 1.0, 2.0), "the sizes chosen");
    vec![
        ("read", "BatchGetItem", reads),
        ("read", "Scan", scan),
        (
            "write",
            "PutItem",
            writes + units(size_by_the_rules(&marker), 1024) + units(sizes[3], 1024) + units(mark, 1024),
        ),
        ("write", "DeleteItem", 0.0),
        ("write", "TransactWriteItems", 0.0),
    ]
}

#[test]
fn capacity_units_counted_are_what_dynamodbs_size_rules_give() {
    if !alone("capacity_units_counted_are_what_dynamodbs_size_rules_give") {
        return;
    }
    let counted = |kind: &str, op: &str, source: &str| {
        metrics().dynamodb_capacity_units.with_label_values(&[kind, op, source]).get()
    };
    // DynamoDB Local reports what every request consumed: nothing is estimated.
    for (kind, op, units) in a_known_workload(dynamodb_endpoint()) {
        assert_eq!(counted(kind, op, "dynamodb"), units, "{kind} units of {op}, as DynamoDB Local reports them");
        assert_eq!(counted(kind, op, "estimate"), 0.0, "{kind} units of {op} estimated");
    }
    // Answers without it: riskd's estimate, the same figures.
    let reported: Vec<f64> = capacity_series().iter().map(|(k, o)| counted(k, o, "dynamodb")).collect();
    for (kind, op, units) in a_known_workload(without_consumed_capacity()) {
        // `init_table` reads the layout mark before there is one (a read of
        // a key not stored, estimated at 1 unit as AWS bills it), and scans
        // the empty table for any item (a read, at least 1 unit).
        let units = if kind == "read" { units + 1.0 } else { units };
        assert_eq!(counted(kind, op, "estimate"), units, "{kind} units of {op}, as riskd estimates them");
    }
    let after: Vec<f64> = capacity_series().iter().map(|(k, o)| counted(k, o, "dynamodb")).collect();
    assert_eq!(after, reported, "nothing reported through the proxy");
}

/// Every (kind, operation) series of the capacity metric.
fn capacity_series() -> Vec<(&'static str, &'static str)> {
    [("read", "BatchGetItem"), ("read", "Scan")]
        .into_iter()
        .chain(["PutItem", "DeleteItem", "TransactWriteItems"].map(|op| ("write", op)))
        .collect()
}

/// Write capacity units (reported and estimated) consumed so far.
fn write_units() -> f64 {
    capacity_series()
        .iter()
        .filter(|(kind, _)| *kind == "write")
        .flat_map(|(k, o)| {
            ["dynamodb", "estimate"].map(|s| metrics().dynamodb_capacity_units.with_label_values(&[k, o, s]).get())
        })
        .sum()
}

/// One run of the shipped rules on a fresh table.
struct Measured {
    /// Write units per 1,000 events.
    per_1000: f64,
    flushes: u64,
    /// Writes the expiry granule avoided.
    avoided: u64,
    /// The alerts file.
    alerts: Vec<u8>,
    config: std::path::PathBuf,
}

/// Runs the shipped rules over the same 20,000 generated events (500 users,
/// a flush every 700 events) once for each `[store]` addition of
/// `variants`, each on a fresh table; the temporary folder holds the runs.
fn shipped_rules_runs(variants: &[&str]) -> (tempfile::TempDir, Vec<Measured>) {
    use riskd::pipeline::{run_blocking, RunOptions};
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    let events = 20_000u64;
    let spec = riskd::generate::Spec { events, users: 500, attack_every: 300, ..Default::default() };
    riskd::generate::write_stream(&spec, &mut std::fs::File::create(&input).unwrap()).unwrap();
    let m = metrics();
    let counts = || {
        let avoided = m.state_writes_avoided.with_label_values(&["expiry_granule"]).get();
        (write_units(), m.flushes.with_label_values(&["ok"]).get(), avoided)
    };
    let mut runs = Vec::new();
    for (i, variant) in variants.iter().enumerate() {
        let run_dir = dir.path().join(format!("run-{i}"));
        std::fs::create_dir(&run_dir).unwrap();
        let store = format!("ttl = false\nflush_every_events = 700\n{variant}");
        let config = common::write_dynamodb_config(&run_dir, &input, "", &store);
        let cfg = riskd::config::Config::load(&config).unwrap();
        let before = counts();
        let summary = run_blocking(cfg, RunOptions::default(), riskd::shutdown::Shutdown::new()).unwrap();
        assert_eq!(summary.read, events);
        let after = counts();
        let per_1000 = 1000.0 * (after.0 - before.0) / events as f64;
        let (flushes, avoided) = (after.1 - before.1, after.2 - before.2);
        println!("{variant:?}: {per_1000:.1} write units per 1,000 events, {flushes} flushes");
        let alerts = std::fs::read(run_dir.join("alerts.jsonl")).unwrap();
        runs.push(Measured { per_1000, flushes, avoided, alerts, config });
    }
    (dir, runs)
}

#[test]
fn the_expiry_granule_saves_write_units_and_changes_no_alert() {
    if !alone("the_expiry_granule_saves_write_units_and_changes_no_alert") {
        return;
    }
    let (_dir, runs) = shipped_rules_runs(&["expiry_granule = 0.01", "expiry_granule = 0"]);
    let (with, without) = (&runs[0], &runs[1]);
    assert!(
        with.per_1000 < without.per_1000,
        "write units per 1,000 events: {} with the granule, {} without",
        with.per_1000,
        without.per_1000
    );
    assert!(
        with.avoided > 0 && without.avoided == 0,
        "writes avoided: {} with, {} without",
        with.avoided,
        without.avoided
    );
    assert!(!with.alerts.is_empty());
    assert!(with.alerts == without.alerts, "the granule changed the alerts");
}

#[test]
fn the_entity_layout_writes_fewer_units_and_changes_no_alert() {
    if !alone("the_entity_layout_writes_fewer_units_and_changes_no_alert") {
        return;
    }
    let (_dir, runs) = shipped_rules_runs(&["layout = \"entity\"", "layout = \"key\""]);
    // What the state says of the last entity alerted, read back by a new process.
    let entity_report = |run: &Measured| {
        let alerts = String::from_utf8_lossy(&run.alerts);
        let last: serde_json::Value = serde_json::from_str(alerts.lines().last().unwrap()).unwrap();
        let (kind, id) = (last["entity"]["type"].as_str().unwrap(), last["entity"]["id"].as_str().unwrap());
        let out = common::riskd(&["entity", kind, id, "--config", &run.config.display().to_string()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Item sizes by DynamoDB's rules, as the tables hold them at the end.
    for run in &runs {
        let text = std::fs::read_to_string(&run.config).unwrap();
        let table = text.lines().find_map(|l| l.strip_prefix("table = ")).unwrap().trim_matches('"').to_string();
        let t = Table::of(&table);
        let mut sizes: Vec<usize> = Vec::new();
        let mut start = None;
        loop {
            let page = t.rt.block_on(t.client.scan().table_name(&table).set_exclusive_start_key(start).send()).unwrap();
            sizes.extend(page.items().iter().map(size_by_the_rules));
            start = page.last_evaluated_key.filter(|k| !k.is_empty());
            if start.is_none() {
                break;
            }
        }
        sizes.sort_unstable();
        let mean = sizes.iter().sum::<usize>() / sizes.len().max(1);
        let p99 = sizes[sizes.len() * 99 / 100];
        let over_1kb = sizes.iter().filter(|&&b| b > 1024).count();
        println!(
            "{}: {} items, bytes mean {mean}, p99 {p99}, max {}; {over_1kb} over 1 KB",
            text.lines().find(|l| l.starts_with("layout")).unwrap_or(""),
            sizes.len(),
            sizes.last().unwrap_or(&0)
        );
    }
    let (entity, key) = (&runs[0], &runs[1]);
    assert!(
        entity.per_1000 < 0.75 * key.per_1000,
        "write units per 1,000 events: {} by entity, {} by key",
        entity.per_1000,
        key.per_1000
    );
    assert!(!entity.alerts.is_empty());
    assert!(entity.alerts == key.alerts, "the layout changed the alerts");
    assert_eq!(entity_report(entity), entity_report(key), "the layout changed what riskd entity reads");
}

#[test]
fn a_write_budget_stretches_flushes_and_changes_no_alert() {
    if !alone("a_write_budget_stretches_flushes_and_changes_no_alert") {
        return;
    }
    let (_dir, runs) = shipped_rules_runs(&["", "max_write_units_per_second = 50"]);
    let (without, with) = (&runs[0], &runs[1]);
    assert!(
        with.flushes * 2 < without.flushes,
        "flushes: {} with the budget, {} without",
        with.flushes,
        without.flushes
    );
    assert!(
        with.per_1000 < without.per_1000,
        "write units: {} with the budget, {} without",
        with.per_1000,
        without.per_1000
    );
    assert!(!with.alerts.is_empty());
    assert!(with.alerts == without.alerts, "the budget changed the alerts");
}

/// The entity layout (`store.layout = "entity"`): the same behaviour as
/// the per-key layout, one item per entity.
mod entity_layout {
    use super::*;

    fn config() -> DynamoConfig {
        DynamoConfig { layout: Layout::Entity, ..test_config() }
    }

    fn fresh_entity() -> (DynamoStore, DynamoConfig) {
        let cfg = config();
        init_table(&cfg).unwrap();
        (DynamoStore::open(&cfg).unwrap(), cfg)
    }

    riskd::shared_store_tests!(fresh_entity());

    /// Every item of the table, by key.
    fn items(table: &Table) -> std::collections::BTreeMap<String, Item> {
        let scan = table.client.scan().table_name(&table.name).consistent_read(true).send();
        let out = table.rt.block_on(scan).unwrap();
        out.items.unwrap_or_default().into_iter().map(|it| (it["key"].as_s().unwrap().clone(), it)).collect()
    }

    #[test]
    fn an_entity_is_one_item_and_a_crash_mid_flush_reads_as_the_last_committed_flush() {
        let (_, cfg) = fresh_entity();
        let proxy = CommitCutter::start();
        let mut store = DynamoStore::open(&proxy.config(&cfg)).unwrap();
        let v1 = Record { count: 1, expires_at_ms: Some(5_000), ..Record::default() };
        let v2 = Record { count: 2, set: ["new".into()].into(), ..Record::default() };
        let cp1 = Checkpoint { offset: 100, line: 1, ..Checkpoint::default() };
        let cp2 = Checkpoint { offset: 200, line: 2, ..Checkpoint::default() };
        let keys = ["r1/user/a", "r2/user/a", "riskd/risk/user/a", "r1/user/gone", "r1/user/new"];
        store
            .apply(WriteBatch {
                mutations: vec![
                    (keys[0], Mutation::Put(&v1)),
                    (keys[1], Mutation::Put(&v1)),
                    (keys[3], Mutation::Put(&v1)),
                    ("riskd/dedup/r1/a", Mutation::Put(&v1)),
                ],
                checkpoints: vec![("src", &cp1)],
            })
            .unwrap();
        let table = Table::of(&cfg.table);
        let stored: Vec<String> =
            items(&table).into_keys().filter(|k| !k.starts_with("riskd/flush/") && k != "riskd/layout").collect();
        assert_eq!(
            stored,
            vec!["riskd/checkpoint/src", "riskd/dedup/r1/a", "riskd/entity/user/a", "riskd/entity/user/gone"],
            "one item per entity; dedup windows are items of their own"
        );
        let flush2 = || WriteBatch {
            mutations: vec![
                (keys[0], Mutation::Put(&v2)),
                (keys[1], Mutation::Delete),
                (keys[2], Mutation::Put(&v2)),
                (keys[3], Mutation::Delete),
                (keys[4], Mutation::Put(&v2)),
            ],
            checkpoints: vec![("src", &cp2)],
        };
        // The items of flush 2 are written, then the process dies before the commit.
        proxy.refuse.store(true, Ordering::SeqCst);
        assert!(store.apply(flush2()).is_err());
        assert!(table.get("riskd/entity/user/new").is_some(), "the new item is in the table");

        let before = vec![Some(v1.clone()), Some(v1.clone()), None, Some(v1.clone()), None];
        let mut restarted = DynamoStore::open(&cfg).unwrap();
        assert_eq!(restarted.get_many(&keys).unwrap(), before);
        assert_eq!(restarted.checkpoint("src").unwrap(), Some(cp1.clone()));
        let mut exported = Vec::new();
        restarted.scan("r1/", &mut |k, r| exported.push((k.to_string(), r.clone()))).unwrap();
        assert_eq!(exported, vec![(keys[0].into(), v1.clone()), (keys[3].into(), v1.clone())]);
        // The crashed store itself reads the same once its connection is back.
        proxy.refuse.store(false, Ordering::SeqCst);
        assert_eq!(store.get_many(&keys).unwrap(), before);

        // The replay applies flush 2 again, and it commits; an entity whose
        // parts all went leaves no item.
        restarted.apply(flush2()).unwrap();
        let later = DynamoStore::open(&cfg).unwrap();
        assert_eq!(later.get_many(&keys).unwrap(), vec![Some(v2.clone()), None, Some(v2.clone()), None, Some(v2)]);
        assert_eq!(later.checkpoint("src").unwrap(), Some(cp2));
        assert!(table.get("riskd/entity/user/gone").is_none());
        // The item expires with its last part: the risk part has no expiry.
        let a = table.get("riskd/entity/user/a").unwrap();
        assert!(!a.contains_key("expiresAt"), "{a:?}");
    }

    #[test]
    fn a_part_too_large_for_the_item_spills_to_an_item_of_its_own_and_back() {
        let (_, cfg) = fresh_entity();
        let proxy = CommitCutter::start();
        let mut store = DynamoStore::open(&proxy.config(&cfg)).unwrap();
        let big = |n: usize| Record {
            set: (0..n).map(|i| format!("{i:06}-{}", "v".repeat(40))).collect(),
            expires_at_ms: Some(9_000),
            ..Record::default()
        };
        let small = Record { count: 3, ..Record::default() };
        // Twenty parts of 30 KB: 600 KB for one entity, over the 400 KB item limit.
        let names: Vec<String> = (0..20).map(|i| format!("r{i:02}/ip/1.2.3.4")).collect();
        let part = big(650);
        let mut mutations: Vec<(&str, Mutation<'_>)> =
            names.iter().map(|k| (k.as_str(), Mutation::Put(&part))).collect();
        let huge = big(2_000);
        mutations.push(("huge/ip/1.2.3.4", Mutation::Put(&huge)));
        mutations.push(("small/ip/1.2.3.4", Mutation::Put(&small)));
        store.apply(WriteBatch { mutations, checkpoints: Vec::new() }).unwrap();
        let table = Table::of(&cfg.table);
        let entity = table.get("riskd/entity/ip/1.2.3.4").unwrap();
        assert!(size_by_the_rules(&entity) < 400 * 1024, "{} bytes", size_by_the_rules(&entity));
        assert!(table.get("huge/ip/1.2.3.4").is_some(), "the part over the spill size has an item of its own");
        let mut all: Vec<&str> = names.iter().map(String::as_str).collect();
        all.extend(["huge/ip/1.2.3.4", "small/ip/1.2.3.4"]);
        let reader = DynamoStore::open(&cfg).unwrap();
        let got = reader.get_many(&all).unwrap();
        assert!(got[..20].iter().all(|r| r.as_ref() == Some(&part)));
        assert_eq!((got[20].as_ref(), got[21].as_ref()), (Some(&huge), Some(&small)));
        let mut scanned = 0;
        reader.scan("", &mut |_, _| scanned += 1).unwrap();
        assert_eq!(scanned, 22);

        // The huge part shrinks back inline, in a flush that does not commit:
        // the spilled version stays what is read.
        proxy.refuse.store(true, Ordering::SeqCst);
        let shrunk = big(2);
        let batch =
            || WriteBatch { mutations: vec![("huge/ip/1.2.3.4", Mutation::Put(&shrunk))], checkpoints: Vec::new() };
        assert!(store.apply(batch()).is_err());
        let restarted = DynamoStore::open(&cfg).unwrap();
        assert_eq!(restarted.get_many(&["huge/ip/1.2.3.4"]).unwrap(), vec![Some(huge.clone())]);
        proxy.refuse.store(false, Ordering::SeqCst);
        let mut again = DynamoStore::open(&cfg).unwrap();
        assert_eq!(again.get_many(&all[..]).unwrap()[20], Some(huge));
        again.apply(batch()).unwrap();
        assert!(table.get("huge/ip/1.2.3.4").is_none(), "back inline, its own item is gone");
        let later = DynamoStore::open(&cfg).unwrap();
        assert_eq!(later.get_many(&["huge/ip/1.2.3.4", "small/ip/1.2.3.4"]).unwrap(), vec![Some(shrunk), Some(small)]);
    }

    #[test]
    fn a_table_of_the_other_layout_is_refused_before_anything_is_read() {
        // A table set up for the per-key layout, with state in it.
        let key_cfg = test_config();
        init_table(&key_cfg).unwrap();
        let rec = Record { count: 1, ..Record::default() };
        let mut by_key = DynamoStore::open(&key_cfg).unwrap();
        by_key
            .apply(WriteBatch { mutations: vec![("r/user/a", Mutation::Put(&rec))], checkpoints: Vec::new() })
            .unwrap();
        let entity_cfg = DynamoConfig { layout: Layout::Entity, ..key_cfg.clone() };
        let err = DynamoStore::open(&entity_cfg).unwrap().get_many(&["r/user/a"]).unwrap_err();
        assert!(matches!(err, StateError::TableMisfit { .. }) && !err.is_transient(), "{err}");
        assert!(err.to_string().contains("it holds the \"key\" layout"), "{err}");
        let problems = check_table(&entity_cfg).unwrap();
        assert!(problems.iter().any(|p| p.contains("holds the \"key\" layout")), "{problems:?}");
        assert!(init_table(&entity_cfg).is_err());
        // An unmarked table that holds items (Panther's, or an older riskd's) is per-key.
        let panther = test_config();
        init_table(&panther).unwrap();
        let table = Table::of(&panther.table);
        table
            .rt
            .block_on(table.client.delete_item().table_name(&panther.table).key("key", s("riskd/layout")).send())
            .unwrap();
        table.put(item([("key", s("panther/k")), ("intCount", n("3"))]));
        let err = DynamoStore::open(&DynamoConfig { layout: Layout::Entity, ..panther.clone() })
            .unwrap()
            .get_many(&["r/user/a"])
            .unwrap_err();
        assert!(err.to_string().contains("it holds the \"key\" layout"), "{err}");
        assert_eq!(
            DynamoStore::open(&panther).unwrap().get_many(&["panther/k"]).unwrap()[0].as_ref().map(|r| r.count),
            Some(3)
        );
    }

    #[test]
    fn direct_rules_are_refused_with_this_layout() {
        let dir = tempfile::tempdir().unwrap();
        let rules = dir.path().join("rules");
        std::fs::create_dir(&rules).unwrap();
        std::fs::write(
            rules.join("r.yaml"),
            "id: shared_count\ntitle: t\nseverity: LOW\nentity: {type: user, key: u}\nmatch: 'true'\nconsistency: direct\nstate:\n  count: {window: 1h, threshold: 3}\n",
        )
        .unwrap();
        let path = dir.path().join("riskd.toml");
        std::fs::write(&path, "[store]\nkind = \"dynamodb\"\nlayout = \"entity\"\n").unwrap();
        let errors = riskd::config::Config::load(&path).unwrap_err().to_string();
        assert!(errors.contains("riskd.toml:3"), "{errors}");
        assert!(errors.contains("rule shared_count uses consistency: direct"), "{errors}");
        std::fs::write(&path, "[store]\nkind = \"dynamodb\"\nlayout = \"rows\"\n").unwrap();
        let errors = riskd::config::Config::load(&path).unwrap_err().to_string();
        assert!(errors.contains("store.layout \"rows\" is not one of key, entity"), "{errors}");
    }
}

/// The API keeps a reading handle of the store, which the server's task
/// drops at shutdown: a store dropped inside an async task must not panic
/// (dropping a runtime there used to, after riskd had printed its summary).
#[test]
fn a_store_dropped_inside_an_async_task_does_not_panic() {
    let (store, _) = fresh();
    store.get_many(&["a/b/c"]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move { tokio::spawn(async move { drop(store) }).await }).expect("dropped without a panic");
}
