//! The DynamoDB [`Store`]: records in one table laid out like Panther's
//! `panther-kv-store`, so riskd and Panther's cache helpers read each
//! other's values.
//!
//! # Table layout
//!
//! Hash key `key` (S). A record is one item: its counter in `intCount` (N,
//! absent when 0), its string set in `stringSet` (SS, absent when empty:
//! DynamoDB has no empty sets), its dictionary in `dictionary` (S, JSON
//! text), its expiry in `expiresAt` (N, epoch seconds, rounded up so the
//! item never expires early — the attribute DynamoDB's TTL deletes on).
//! riskd keeps the millisecond expiry in `riskdExpiresAtMs` and uses it
//! while it agrees with `expiresAt`; an item Panther wrote, or whose
//! `expiresAt` Panther changed, is read by its `expiresAt`.
//!
//! Two kinds of items are riskd's own and never visited by [`Store::scan`]
//! (they carry `riskdMeta`): the checkpoint of each input,
//! `riskd/checkpoint/<source>`, and the commit marker of each run of a
//! store, `riskd/flush/<run>`.
//!
//! # Crash consistency
//!
//! BatchWriteItem is not atomic, and a flush can be thousands of items: a
//! crash in the middle of [`Store::apply`] can leave some items of a flush
//! written and its checkpoint not. The restart replays from the old
//! checkpoint, so it must see none of the new values, or it would count
//! the replayed events twice. So every write is tentative until its flush
//! commits:
//!
//! - Each opened store is a *run* with a random id; each `apply` is flush
//!   `<run>:<seq>`, `seq` counting up from 1.
//! - Every item riskd writes carries its flush (`riskdFlush`) and a copy of
//!   the key's previous *committed* version (`riskdPrev`, JSON of the
//!   [`Record`]; absent when the key had none). The store knows that
//!   version without a read: the write-back cache above reads a key before
//!   changing it, and the store remembers what it read and what it last
//!   committed per key (bounded; a key it has forgotten is read again at
//!   flush time). A delete of a key that has a committed version is written
//!   as a tombstone (`riskdDeleted`) carrying that version, and removed
//!   once its flush has committed.
//! - When every item is written, one TransactWriteItems writes the
//!   checkpoint and sets the run's marker `riskdCommittedSeq` to `seq`:
//!   that transaction is the commit point. A flush without a checkpoint
//!   (stdin input) commits its marker alone, right after its items.
//! - A read sees an item as its own values when its flush is committed
//!   (`seq <= riskdCommittedSeq` of its run), as its `riskdPrev` otherwise.
//!   Markers of other runs are read on demand with BatchGetItem and kept in
//!   memory. Items without `riskdFlush` (written by Panther) read as they
//!   are.
//!
//! So after a crash at any point the store reads exactly as it did at the
//! last committed flush, which is what the checkpoint says. A failed
//! `apply` abandons its run (the next `apply` starts a new run), so a later
//! commit can never adopt the half-written flush. A marker per run (not
//! per flush) keeps their number at one per store opened that wrote.
//!
//! Like the write-back cache above it, this assumes one writer per key at a
//! time (riskd routes each entity to one lane); a dead run's half-written
//! items are overwritten when the replay writes those keys again.
//!
//! Writing the same [`Record`] a key already holds is skipped, which makes
//! a flush idempotent: applying the same batch twice changes no item.
//!
//! # Requests
//!
//! `get_many` sends BatchGetItem (100 keys each), `apply` BatchWriteItem
//! (25 items each), a few requests in flight at once, all reads strongly
//! consistent. Throttling, 5xx answers, timeouts, connection failures and
//! unprocessed keys or items are retried with exponential backoff and
//! jitter (the SDK's own retries are off, so there is one retry policy);
//! anything else fails the call, naming the key when one is at fault. The
//! store runs its requests on its own single-threaded tokio runtime, so its
//! methods block: call them from a blocking thread, never from an async
//! task.

use super::{Checkpoint, Mutation, Record, RequestFailure, Result, StateError, Store, WriteBatch};
use crate::telemetry::metrics;
use aws_config::BehaviorVersion;
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::config::retry::RetryConfig;
use aws_sdk_dynamodb::config::timeout::TimeoutConfig;
use aws_sdk_dynamodb::config::Region;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, DeleteRequest, KeySchemaElement, KeyType, KeysAndAttributes, Put,
    PutRequest, ScalarAttributeType, TableDescription, TableStatus, TimeToLiveSpecification, TimeToLiveStatus,
    TransactWriteItem, WriteRequest,
};
use aws_sdk_dynamodb::Client;
use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// The table name Panther uses, and riskd's default.
pub const DEFAULT_TABLE: &str = "panther-kv-store";

const STORE: &str = "dynamodb";

/// Attribute names of the table.
mod attr {
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
    pub const VERSION: &str = "riskdVersion";
}

const CHECKPOINT_PREFIX: &str = "riskd/checkpoint/";

/// Items in one TransactWriteItems.
const MAX_TRANSACT_ITEMS: usize = 100;
const MARKER_PREFIX: &str = "riskd/flush/";
/// DynamoDB's limits: partition key bytes, item bytes, keys per
/// BatchGetItem, requests per BatchWriteItem.
const MAX_KEY_BYTES: usize = 2048;
const MAX_ITEM_BYTES: usize = 400 * 1024;
const GET_BATCH: usize = 100;
const WRITE_BATCH: usize = 25;
/// Requests in flight at once for one `get_many` or `apply`.
const IN_FLIGHT: usize = 8;

/// `[store]` settings of the DynamoDB store. Credentials are not here: they
/// come from the standard AWS chain (environment, profile, web identity,
/// container or instance role).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DynamoConfig {
    /// Table name.
    pub table: String,
    /// AWS region; `None` takes it from the standard chain (`AWS_REGION`, profile, instance).
    pub region: Option<String>,
    /// Endpoint instead of AWS's (DynamoDB Local); `None` for AWS.
    pub endpoint_url: Option<String>,
    /// Whether the table deletes expired items with DynamoDB's TTL on
    /// `expiresAt`: `riskd store init` sets it up, `riskd store check`
    /// expects it.
    pub ttl: bool,
    /// How many keys' last committed versions the store keeps in memory
    /// (for `riskdPrev`) before it forgets them all.
    pub remember_versions: usize,
    /// Read requests per second at most (`governor`); no limit when `None`.
    pub read_requests_per_second: Option<u32>,
    /// Write requests per second at most; no limit when `None`.
    pub write_requests_per_second: Option<u32>,
}

impl DynamoConfig {
    /// The defaults for `table`, with region and endpoint from the AWS chain.
    pub fn new(table: impl Into<String>) -> Self {
        Self {
            table: table.into(),
            region: None,
            endpoint_url: None,
            ttl: true,
            remember_versions: 1_000_000,
            read_requests_per_second: None,
            write_requests_per_second: None,
        }
    }
}

fn backend(message: impl Into<String>) -> StateError {
    StateError::Backend { store: STORE, message: message.into() }
}

fn corrupt(key: &str, message: impl Into<String>) -> StateError {
    StateError::Corrupt { store: STORE, key: key.to_string(), message: message.into() }
}

// --- requests and retries ------------------------------------------------

/// A request that failed for good.
#[derive(Debug)]
struct Failure {
    code: String,
    message: String,
    /// Whether it failed on something retrying could help (and retries ran out).
    transient: bool,
}

impl Failure {
    fn into_error(self, operation: &'static str, table: &str, key: Option<&str>) -> StateError {
        let mut message = self.message;
        if self.code == "ResourceNotFoundException" {
            message.push_str(" (create the table with `riskd store init`)");
        }
        StateError::Request(Box::new(RequestFailure {
            store: STORE,
            operation,
            table: table.to_string(),
            key: key.map(str::to_string),
            code: self.code,
            message,
            transient: self.transient,
        }))
    }
}

/// Error codes worth another try, whatever the operation.
const RETRY_CODES: [&str; 7] = [
    "ProvisionedThroughputExceededException",
    "ThrottlingException",
    "RequestLimitExceeded",
    "InternalServerError",
    "ServiceUnavailable",
    "TransactionConflictException",
    "TransactionInProgressException",
];

fn transient<E: ProvideErrorMetadata>(e: &SdkError<E, HttpResponse>) -> bool {
    match e {
        SdkError::TimeoutError(_) | SdkError::ResponseError(_) => true,
        // Not a credentials failure, which also surfaces as a dispatch failure.
        SdkError::DispatchFailure(d) => d.is_io() || d.is_timeout(),
        SdkError::ServiceError(s) => {
            s.raw().status().is_server_error() || s.err().code().is_some_and(|c| RETRY_CODES.contains(&c))
        }
        _ => false,
    }
}

fn failure<E>(e: &SdkError<E, HttpResponse>, transient: bool) -> Failure
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let (code, message) = match e {
        // Modelled or not, a service error has a code and usually a message.
        SdkError::ServiceError(s) => (
            s.err().code().unwrap_or("UnknownError").to_string(),
            s.err().message().map(str::to_string).unwrap_or_else(|| DisplayErrorContext(e).to_string()),
        ),
        SdkError::TimeoutError(_) => ("Timeout".into(), DisplayErrorContext(e).to_string()),
        SdkError::DispatchFailure(_) => ("DispatchFailure".into(), DisplayErrorContext(e).to_string()),
        SdkError::ResponseError(_) => ("BadResponse".into(), DisplayErrorContext(e).to_string()),
        _ => ("RequestFailed".into(), DisplayErrorContext(e).to_string()),
    };
    Failure { code, message, transient }
}

/// The retry schedule: exponential from 25 ms, capped at 1 s a wait, with
/// jitter, 6 retries (about 1.6 s in all) before giving up. Longer outages
/// are the job's to ride out: it backs off further and reports not-ready.
fn backoff() -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(25))
        .with_max_delay(Duration::from_secs(1))
        .with_factor(2.0)
        .with_max_times(6)
        .with_jitter()
        .build()
}

/// Request budgets (`governor`), per kind of request; none when unlimited.
#[derive(Default)]
pub struct Limits {
    read: Option<governor::DefaultDirectRateLimiter>,
    write: Option<governor::DefaultDirectRateLimiter>,
}

impl Limits {
    fn new(cfg: &DynamoConfig) -> Self {
        // Known series start at zero, so dashboards see them before the first throttle.
        let m = metrics();
        for op in ["BatchGetItem", "BatchWriteItem", "TransactWriteItems", "Scan"] {
            for outcome in ["ok", "throttled", "error"] {
                m.dynamodb_requests.with_label_values(&[op, outcome]);
            }
            m.dynamodb_throttles.with_label_values(&[op]);
            m.dynamodb_retries.with_label_values(&[op]);
        }
        for kind in ["read", "write"] {
            m.rate_limiter_waits.with_label_values(&[kind]);
            m.rate_limiter_wait_seconds.with_label_values(&[kind]);
        }
        let limiter = |per_second: Option<u32>| {
            per_second
                .and_then(std::num::NonZeroU32::new)
                .map(|n| governor::RateLimiter::direct(governor::Quota::per_second(n)))
        };
        Self { read: limiter(cfg.read_requests_per_second), write: limiter(cfg.write_requests_per_second) }
    }

    /// Waits until the budget of `operation`'s kind allows one more request.
    async fn acquire(&self, operation: &'static str) {
        let write =
            matches!(operation, "BatchWriteItem" | "TransactWriteItems" | "PutItem" | "DeleteItem" | "UpdateItem");
        let (limiter, kind) = if write { (&self.write, "write") } else { (&self.read, "read") };
        if let Some(l) = limiter {
            if l.check().is_err() {
                let start = std::time::Instant::now();
                l.until_ready().await;
                let m = metrics();
                m.rate_limiter_waits.with_label_values(&[kind]).inc();
                m.rate_limiter_wait_seconds.with_label_values(&[kind]).inc_by(start.elapsed().as_secs_f64());
            }
        }
    }
}

const THROTTLE_CODES: [&str; 3] =
    ["ProvisionedThroughputExceededException", "ThrottlingException", "RequestLimitExceeded"];

/// Sends one request (built anew by `attempt` each time) within the request
/// budget, retrying what is transient by [`transient`] or by `also`.
async fn send<T, E, F, Fut>(
    limits: &Limits,
    operation: &'static str,
    mut attempt: F,
    also: impl Fn(&E) -> bool,
) -> Result<T, Failure>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, SdkError<E, HttpResponse>>>,
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let mut delays = backoff();
    let mut tries = 0u32;
    let m = metrics();
    loop {
        tries += 1;
        limits.acquire(operation).await;
        let start = std::time::Instant::now();
        let result = attempt().await;
        m.dynamodb_request_seconds.with_label_values(&[operation]).observe(start.elapsed().as_secs_f64());
        match result {
            Ok(out) => {
                m.dynamodb_requests.with_label_values(&[operation, "ok"]).inc();
                return Ok(out);
            }
            Err(e) => {
                let throttled = matches!(&e, SdkError::ServiceError(s) if s.err().code().is_some_and(|c| THROTTLE_CODES.contains(&c)));
                m.dynamodb_requests
                    .with_label_values(&[operation, if throttled { "throttled" } else { "error" }])
                    .inc();
                if throttled {
                    m.dynamodb_throttles.with_label_values(&[operation]).inc();
                }
                let retry = transient(&e) || matches!(&e, SdkError::ServiceError(s) if also(s.err()));
                if retry {
                    m.dynamodb_retries.with_label_values(&[operation]).inc();
                }
                match delays.next() {
                    Some(delay) if retry => {
                        tracing::debug!(operation, tries, error = %DisplayErrorContext(&e), delay_ms = delay.as_millis() as u64, "retrying");
                        tokio::time::sleep(delay).await;
                    }
                    _ => {
                        let mut f = failure(&e, retry);
                        if retry {
                            f.message = format!("{} (gave up after {tries} tries)", f.message);
                        }
                        return Err(f);
                    }
                }
            }
        }
    }
}

fn never<E>(_: &E) -> bool {
    false
}

/// A transaction cancelled only for throttling or a conflict is worth another try.
fn transaction_transient(e: &TransactWriteItemsError) -> bool {
    match e {
        TransactWriteItemsError::TransactionCanceledException(c) => c.cancellation_reasons().iter().all(|r| {
            matches!(
                r.code(),
                None | Some(
                    "None"
                        | "ThrottlingError"
                        | "TransactionConflict"
                        | "ProvisionedThroughputExceeded"
                        | "RequestLimitExceeded"
                )
            )
        }),
        _ => false,
    }
}

type Item = HashMap<String, AttributeValue>;

fn key_item(key: &str) -> Item {
    HashMap::from([(attr::KEY.to_string(), AttributeValue::S(key.to_string()))])
}

fn item_key(item: &Item) -> Option<&str> {
    match item.get(attr::KEY) {
        Some(AttributeValue::S(k)) => Some(k),
        _ => None,
    }
}

/// Reads up to 100 keys; when that fails for good on something other than
/// capacity, reads them one by one to name the key at fault.
async fn get_chunk(client: Client, limits: Arc<Limits>, table: String, keys: Vec<String>) -> Result<Vec<Item>> {
    match get_keys(&client, &limits, &table, &keys).await {
        Ok(items) => Ok(items),
        Err(f) if !f.transient && keys.len() > 1 => {
            for key in &keys {
                if let Err(f) = get_keys(&client, &limits, &table, std::slice::from_ref(key)).await {
                    return Err(f.into_error("BatchGetItem", &table, Some(key)));
                }
            }
            Err(f.into_error("BatchGetItem", &table, None))
        }
        Err(f) => {
            Err(f.into_error("BatchGetItem", &table, keys.first().filter(|_| keys.len() == 1).map(String::as_str)))
        }
    }
}

/// Reads up to 100 keys, retrying unprocessed ones.
async fn get_keys(client: &Client, limits: &Limits, table: &str, keys: &[String]) -> Result<Vec<Item>, Failure> {
    let mut pending: Vec<Item> = keys.iter().map(|k| key_item(k)).collect();
    let mut found = Vec::new();
    let mut delays = backoff();
    loop {
        let request = KeysAndAttributes::builder()
            .set_keys(Some(pending.clone()))
            .consistent_read(true)
            .build()
            .map_err(|e| Failure { code: "BuildError".into(), message: e.to_string(), transient: false })?;
        let mut out = send(
            limits,
            "BatchGetItem",
            || client.batch_get_item().request_items(table, request.clone()).send(),
            never,
        )
        .await?;
        if let Some(items) = out.responses.as_mut().and_then(|r| r.remove(table)) {
            found.extend(items);
        }
        let left = out.unprocessed_keys.and_then(|mut u| u.remove(table)).map(|k| k.keys).unwrap_or_default();
        if left.is_empty() {
            return Ok(found);
        }
        wait_for_leftovers(&mut delays, left.len(), pending.len(), "Keys").await?;
        pending = left;
    }
}

/// After a batch request left `left` of its `sent` keys or items
/// unprocessed: waits before the next try (the schedule starts again when
/// the request made progress), or gives up when the schedule is spent.
async fn wait_for_leftovers(
    delays: &mut ExponentialBackoff,
    left: usize,
    sent: usize,
    what: &str,
) -> Result<(), Failure> {
    if left < sent {
        *delays = backoff();
    }
    match delays.next() {
        Some(delay) => {
            tokio::time::sleep(delay).await;
            Ok(())
        }
        None => Err(Failure {
            code: format!("Unprocessed{what}"),
            message: format!("{left} {} still unprocessed after retries", what.to_lowercase()),
            transient: true,
        }),
    }
}

/// Writes up to 25 requests, retrying unprocessed ones.
async fn write_requests(
    client: &Client,
    limits: &Limits,
    table: &str,
    mut pending: Vec<WriteRequest>,
) -> Result<(), Failure> {
    let mut delays = backoff();
    loop {
        let mut out = send(
            limits,
            "BatchWriteItem",
            || client.batch_write_item().request_items(table, pending.clone()).send(),
            never,
        )
        .await?;
        let left = out.unprocessed_items.take().and_then(|mut u| u.remove(table)).unwrap_or_default();
        if left.is_empty() {
            return Ok(());
        }
        wait_for_leftovers(&mut delays, left.len(), pending.len(), "Items").await?;
        pending = left;
    }
}

/// Writes one chunk; when it fails for good on something other than
/// capacity (a validation error, an item over 400 KB), writes its items
/// one by one to name the key at fault.
async fn write_chunk(
    client: Client,
    limits: Arc<Limits>,
    table: String,
    chunk: Vec<(String, WriteRequest)>,
) -> Result<()> {
    let requests = chunk.iter().map(|(_, w)| w.clone()).collect();
    match write_requests(&client, &limits, &table, requests).await {
        Ok(()) => Ok(()),
        Err(f) if !f.transient && chunk.len() > 1 => {
            for (key, request) in chunk {
                if let Err(f) = write_requests(&client, &limits, &table, vec![request]).await {
                    return Err(f.into_error("BatchWriteItem", &table, Some(&key)));
                }
            }
            Err(f.into_error("BatchWriteItem", &table, None))
        }
        Err(f) => {
            let key = (chunk.len() == 1).then(|| chunk[0].0.as_str());
            Err(f.into_error("BatchWriteItem", &table, key))
        }
    }
}

/// Runs the futures with at most [`IN_FLIGHT`] at once; the first error
/// wins (the others are dropped, which cancels them).
async fn in_flight<T, F>(futures: Vec<F>) -> Result<Vec<T>>
where
    T: Send + 'static,
    F: Future<Output = Result<T>> + Send + 'static,
{
    let mut tasks = tokio::task::JoinSet::new();
    let mut waiting = futures.into_iter();
    for f in waiting.by_ref().take(IN_FLIGHT) {
        tasks.spawn(f);
    }
    let mut out = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        out.push(joined.map_err(|e| backend(format!("request task failed: {e}")))??);
        if let Some(f) = waiting.next() {
            tasks.spawn(f);
        }
    }
    Ok(out)
}

/// A client of one table, with the runtime its requests run on.
struct Remote {
    rt: tokio::runtime::Runtime,
    client: Client,
    table: String,
    /// Where it talks to, for messages: region and endpoint.
    place: String,
    /// Request budgets.
    limits: Arc<Limits>,
}

impl Remote {
    fn connect(cfg: &DynamoConfig) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| backend(format!("cannot start its runtime: {e}")))?;
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            // One retry policy, riskd's: it also covers unprocessed batch items.
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(3))
                    .operation_attempt_timeout(Duration::from_secs(10))
                    .build(),
            );
        if let Some(region) = &cfg.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(url) = &cfg.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        let sdk = rt.block_on(loader.load());
        let Some(region) = sdk.region().map(|r| r.to_string()) else {
            return Err(backend("no AWS region: set store.region, or AWS_REGION, or a region in the AWS profile"));
        };
        let place = match &cfg.endpoint_url {
            Some(url) => format!("{region} at {url}"),
            None => region,
        };
        Ok(Self { rt, client: Client::new(&sdk), table: cfg.table.clone(), place, limits: Arc::new(Limits::new(cfg)) })
    }

    /// The items stored under `keys` (each once), by key.
    fn fetch(&self, keys: &[&str]) -> Result<HashMap<String, Item>> {
        let chunks: Vec<_> = keys
            .chunks(GET_BATCH)
            .map(|c| {
                let keys = c.iter().map(|k| k.to_string()).collect();
                get_chunk(self.client.clone(), Arc::clone(&self.limits), self.table.clone(), keys)
            })
            .collect();
        let found = self.rt.block_on(in_flight(chunks))?;
        let mut by_key = HashMap::new();
        for item in found.into_iter().flatten() {
            if let Some(key) = item_key(&item) {
                by_key.insert(key.to_string(), item);
            }
        }
        Ok(by_key)
    }

    fn write(&self, requests: Vec<(String, WriteRequest)>) -> Result<()> {
        let mut chunks = Vec::new();
        let mut rest = requests.into_iter().peekable();
        while rest.peek().is_some() {
            let chunk: Vec<_> = rest.by_ref().take(WRITE_BATCH).collect();
            chunks.push(write_chunk(self.client.clone(), Arc::clone(&self.limits), self.table.clone(), chunk));
        }
        self.rt.block_on(in_flight(chunks)).map(|_| ())
    }

    fn put(&self, key: &str, item: Item) -> Result<()> {
        self.rt
            .block_on(send(
                &self.limits,
                "PutItem",
                || self.client.put_item().table_name(&self.table).set_item(Some(item.clone())).send(),
                never,
            ))
            .map(|_| ())
            .map_err(|f| f.into_error("PutItem", &self.table, Some(key)))
    }

    /// Puts `item` (or deletes the key, when `None`) only if the stored
    /// item's version is still `version` (0: no item, or one without a
    /// version, as Panther writes them). False when someone changed it first.
    fn put_if_version(&self, key: &str, item: Option<Item>, version: Option<i64>) -> Result<bool> {
        // `key` is a reserved word in expressions: named through `#k`.
        let names = HashMap::from([("#k".to_string(), attr::KEY.to_string())]);
        let (condition, values, names) = match version {
            None => ("attribute_not_exists(#k)".to_string(), None, Some(names)),
            Some(0) => (format!("attribute_not_exists({})", attr::VERSION), None, None),
            Some(v) => (
                format!("{} = :v", attr::VERSION),
                Some(HashMap::from([(":v".to_string(), AttributeValue::N(v.to_string()))])),
                None,
            ),
        };
        let operation = if item.is_some() { "PutItem" } else { "DeleteItem" };
        let sent = match item {
            Some(item) => self
                .rt
                .block_on(send(
                    &self.limits,
                    "PutItem",
                    || {
                        self.client
                            .put_item()
                            .table_name(&self.table)
                            .set_item(Some(item.clone()))
                            .condition_expression(&condition)
                            .set_expression_attribute_names(names.clone())
                            .set_expression_attribute_values(values.clone())
                            .send()
                    },
                    never,
                ))
                .map(|_| ()),
            None => self
                .rt
                .block_on(send(
                    &self.limits,
                    "DeleteItem",
                    || {
                        self.client
                            .delete_item()
                            .table_name(&self.table)
                            .set_key(Some(key_item(key)))
                            .condition_expression(&condition)
                            .set_expression_attribute_names(names.clone())
                            .set_expression_attribute_values(values.clone())
                            .send()
                    },
                    never,
                ))
                .map(|_| ()),
        };
        match sent {
            Ok(()) => Ok(true),
            Err(f) if f.code == "ConditionalCheckFailedException" => Ok(false),
            Err(f) => Err(f.into_error(operation, &self.table, Some(key))),
        }
    }

    fn transact_put(&self, items: Vec<Item>) -> Result<()> {
        let mut writes = Vec::new();
        for item in items {
            let put = Put::builder()
                .table_name(&self.table)
                .set_item(Some(item))
                .build()
                .map_err(|e| backend(e.to_string()))?;
            writes.push(TransactWriteItem::builder().put(put).build());
        }
        self.rt
            .block_on(send(
                &self.limits,
                "TransactWriteItems",
                || self.client.transact_write_items().set_transact_items(Some(writes.clone())).send(),
                transaction_transient,
            ))
            .map(|_| ())
            .map_err(|f| f.into_error("TransactWriteItems", &self.table, None))
    }

    /// Every record item whose key starts with `prefix` (a paginated Scan;
    /// riskd's own items are filtered out by the table).
    fn scan(&self, prefix: &str) -> Result<Vec<Item>> {
        self.rt.block_on(async {
            let mut items = Vec::new();
            let mut start: Option<Item> = None;
            loop {
                let mut filter = format!("attribute_not_exists({})", attr::META);
                if !prefix.is_empty() {
                    filter.push_str(" AND begins_with(#k, :p)");
                }
                let out = send(
                    &self.limits,
                    "Scan",
                    || {
                        let mut req = self
                            .client
                            .scan()
                            .table_name(&self.table)
                            .consistent_read(true)
                            .filter_expression(&filter)
                            .set_exclusive_start_key(start.clone());
                        if !prefix.is_empty() {
                            req = req
                                .expression_attribute_names("#k", attr::KEY)
                                .expression_attribute_values(":p", AttributeValue::S(prefix.to_string()));
                        }
                        req.send()
                    },
                    never,
                )
                .await
                .map_err(|f| f.into_error("Scan", &self.table, None))?;
                start = out.last_evaluated_key.filter(|k| !k.is_empty());
                items.extend(out.items.unwrap_or_default());
                if start.is_none() {
                    return Ok(items);
                }
            }
        })
    }
}

// --- items <-> records ---------------------------------------------------

/// Whole seconds at or after `ms`: `expiresAt` never falls before the expiry.
fn ceil_seconds(ms: i64) -> i64 {
    ms.div_euclid(1000) + i64::from(ms.rem_euclid(1000) != 0)
}

/// The Panther-layout attributes of a record.
fn record_attributes(key: &str, record: &Record) -> Result<Item> {
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
fn stamp(item: &mut Item, key: &str, flush: &str, prev: Option<&Record>) -> Result<()> {
    item.insert(attr::FLUSH.into(), AttributeValue::S(flush.to_string()));
    if let Some(prev) = prev {
        let text = serde_json::to_string(prev).map_err(|e| backend(format!("key {key:?}: {e}")))?;
        item.insert(attr::PREV.into(), AttributeValue::S(text));
    }
    Ok(())
}

/// DynamoDB's measure of an item: attribute names plus values, in bytes
/// (numbers counted by their digits, a little over the real cost).
fn item_bytes(item: &Item) -> usize {
    item.iter()
        .map(|(name, value)| {
            name.len()
                + match value {
                    AttributeValue::S(s) | AttributeValue::N(s) => s.len(),
                    AttributeValue::Ss(v) => v.iter().map(String::len).sum(),
                    _ => 1,
                }
        })
        .sum()
}

fn check_item_size(key: &str, item: &Item) -> Result<()> {
    let bytes = item_bytes(item);
    if bytes > MAX_ITEM_BYTES {
        return Err(StateError::ItemTooLarge { store: STORE, key: key.to_string(), bytes, limit: MAX_ITEM_BYTES });
    }
    Ok(())
}

fn number(key: &str, name: &str, value: &AttributeValue) -> Result<f64> {
    match value {
        AttributeValue::N(n) => n.parse().map_err(|_| corrupt(key, format!("{name} is not a number: {n:?}"))),
        _ => Err(corrupt(key, format!("{name} is not of type N"))),
    }
}

fn integer(key: &str, name: &str, value: &AttributeValue) -> Result<i64> {
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
struct FlushId {
    run: String,
    seq: u64,
}

impl FlushId {
    fn parse(key: &str, text: &str) -> Result<Self> {
        text.rsplit_once(':')
            .and_then(|(run, seq)| Some(Self { run: run.to_string(), seq: seq.parse().ok()? }))
            .filter(|f| !f.run.is_empty())
            .ok_or_else(|| corrupt(key, format!("{} {text:?} is not <run>:<seq>", attr::FLUSH)))
    }
}

/// An item as stored, before its flush is known to be committed or not.
#[derive(Debug)]
struct Stored {
    /// Its own values.
    record: Record,
    /// The flush that wrote it (`None`: written by someone else, e.g. Panther).
    flush: Option<FlushId>,
    /// Its key's previous committed version (when `flush` is set).
    prev: Option<Record>,
    /// A tombstone: once committed, the key is absent.
    deleted: bool,
}

fn decode(key: &str, item: &Item) -> Result<Stored> {
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

fn marker_key(run: &str) -> String {
    format!("{MARKER_PREFIX}{run}")
}

fn checkpoint_key(source: &str) -> String {
    format!("{CHECKPOINT_PREFIX}{source}")
}

fn check_key(key: &str) -> Result<()> {
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

// --- the store -------------------------------------------------------------

/// Records in a DynamoDB table, with crash-consistent flushes (see the
/// module documentation).
pub struct DynamoStore {
    remote: Remote,
    /// Its config, to open readers with.
    cfg: DynamoConfig,
    /// This run's id and its last flush number.
    run: String,
    seq: u64,
    // RefCell rather than a mutex: `Store` is `Send` but not `Sync`, so one
    // thread at a time calls `&self` methods, and no borrow is held across
    // a `block_on`.
    /// Highest committed flush number known per run (this one included).
    committed: RefCell<HashMap<String, u64>>,
    /// Last committed version per key, as read or written (`None`: absent).
    versions: RefCell<HashMap<String, Option<Record>>>,
    remember_versions: usize,
    /// Test hook: fail `apply` after its items are written, before the commit.
    #[cfg(test)]
    crash_before_commit: bool,
}

fn new_run() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

impl DynamoStore {
    /// Connects to the table (no request is sent until the first read).
    pub fn open(cfg: &DynamoConfig) -> Result<Self> {
        let remote = Remote::connect(cfg)?;
        let run = new_run();
        Ok(Self {
            remote,
            cfg: cfg.clone(),
            committed: RefCell::new(HashMap::from([(run.clone(), 0)])),
            run,
            seq: 0,
            versions: RefCell::new(HashMap::new()),
            remember_versions: cfg.remember_versions,
            #[cfg(test)]
            crash_before_commit: false,
        })
    }

    /// The table this store uses.
    pub fn table(&self) -> &str {
        &self.remote.table
    }

    /// Learns the committed flush numbers of the runs that wrote `stored`
    /// items, where what is known does not already commit them.
    fn learn_commits<'a>(&self, stored: impl Iterator<Item = &'a Stored>) -> Result<()> {
        let unknown: HashSet<String> = {
            let committed = self.committed.borrow();
            stored
                .filter_map(|s| s.flush.as_ref())
                .filter(|f| f.run != self.run && committed.get(&f.run).is_none_or(|c| f.seq > *c))
                .map(|f| marker_key(&f.run))
                .collect()
        };
        if unknown.is_empty() {
            return Ok(());
        }
        let keys: Vec<&str> = unknown.iter().map(String::as_str).collect();
        let markers = self.remote.fetch(&keys)?;
        let mut committed = self.committed.borrow_mut();
        for key in &keys {
            let seq = match markers.get(*key).and_then(|m| m.get(attr::COMMITTED_SEQ)) {
                Some(v) => u64::try_from(integer(key, attr::COMMITTED_SEQ, v)?).unwrap_or(0),
                None => 0,
            };
            if let Some(run) = key.strip_prefix(MARKER_PREFIX) {
                committed.insert(run.to_string(), seq);
            }
        }
        Ok(())
    }

    /// The committed version of a stored item.
    fn resolve(&self, stored: Stored) -> Option<Record> {
        let Some(flush) = &stored.flush else {
            return Some(stored.record);
        };
        let done = self.committed.borrow().get(&flush.run).is_some_and(|c| flush.seq <= *c);
        match (done, stored.deleted) {
            (true, true) => None,
            (true, false) => Some(stored.record),
            (false, _) => stored.prev,
        }
    }

    /// Reads `keys` (any order, repeats allowed) as committed versions.
    fn read_committed(&self, keys: &[&str]) -> Result<HashMap<String, Option<Record>>> {
        let mut unique: Vec<&str> = Vec::with_capacity(keys.len());
        let mut seen = HashSet::with_capacity(keys.len());
        for key in keys {
            check_key(key)?;
            if seen.insert(*key) {
                unique.push(key);
            }
        }
        let items = self.remote.fetch(&unique)?;
        let stored: Vec<(&str, Option<Stored>)> = unique
            .iter()
            .map(|k| Ok((*k, items.get(*k).map(|item| decode(k, item)).transpose()?)))
            .collect::<Result<_>>()?;
        self.learn_commits(stored.iter().filter_map(|(_, s)| s.as_ref()))?;
        Ok(stored.into_iter().map(|(k, s)| (k.to_string(), s.and_then(|s| self.resolve(s)))).collect())
    }

    /// Remembers committed versions for `riskdPrev`, forgetting all the
    /// others first when the bound would be passed.
    fn remember(&self, read: &HashMap<String, Option<Record>>) {
        let mut versions = self.versions.borrow_mut();
        if versions.len() + read.len() > self.remember_versions {
            versions.clear();
        }
        versions.extend(read.iter().map(|(k, v)| (k.clone(), v.clone())));
    }

    /// Forgets everything a failed `apply` may have made untrue, and starts
    /// a new run so that nothing of the failed flush can ever commit.
    fn abandon_run(&mut self) {
        self.versions.borrow_mut().clear();
        self.run = new_run();
        self.seq = 0;
        self.committed.borrow_mut().insert(self.run.clone(), 0);
    }

    fn apply_flush(&mut self, batch: &WriteBatch<'_>) -> Result<()> {
        let missing: Vec<&str> = {
            let versions = self.versions.borrow();
            batch.mutations.iter().map(|(k, _)| *k).filter(|k| !versions.contains_key(*k)).collect()
        };
        // Keys the store has forgotten: read now (remembering them could
        // evict others this flush needs, so they are used from here).
        let fetched = if missing.is_empty() { HashMap::new() } else { self.read_committed(&missing)? };
        let seq = self.seq + 1;
        let flush = format!("{}:{seq}", self.run);
        let mut writes = Vec::new();
        let mut tombstones = Vec::new();
        {
            let versions = self.versions.borrow();
            for (key, mutation) in &batch.mutations {
                check_key(key)?;
                let prev = match fetched.get(*key) {
                    Some(read) => read.as_ref(),
                    None => versions.get(*key).and_then(Option::as_ref),
                };
                let request = match mutation {
                    // The key already holds exactly this: nothing to write.
                    Mutation::Put(record) if prev == Some(*record) => continue,
                    Mutation::Put(record) => {
                        let mut item = record_attributes(key, record)?;
                        stamp(&mut item, key, &flush, prev)?;
                        check_item_size(key, &item)?;
                        let put =
                            PutRequest::builder().set_item(Some(item)).build().map_err(|e| backend(e.to_string()))?;
                        WriteRequest::builder().put_request(put).build()
                    }
                    // Nothing committed to keep: a plain delete (which also
                    // removes any half-written item of a crashed flush).
                    Mutation::Delete if prev.is_none() => {
                        let delete = DeleteRequest::builder()
                            .set_key(Some(key_item(key)))
                            .build()
                            .map_err(|e| backend(e.to_string()))?;
                        WriteRequest::builder().delete_request(delete).build()
                    }
                    Mutation::Delete => {
                        let mut item = key_item(key);
                        item.insert(attr::DELETED.into(), AttributeValue::Bool(true));
                        stamp(&mut item, key, &flush, prev)?;
                        check_item_size(key, &item)?;
                        tombstones.push(key.to_string());
                        let put =
                            PutRequest::builder().set_item(Some(item)).build().map_err(|e| backend(e.to_string()))?;
                        WriteRequest::builder().put_request(put).build()
                    }
                };
                writes.push((key.to_string(), request));
            }
        }
        let wrote = !writes.is_empty();
        if wrote {
            self.remote.write(writes)?;
        }
        #[cfg(test)]
        if self.crash_before_commit {
            return Err(backend("test: crashed before the commit"));
        }
        // The commit point.
        let marker = || {
            let mut item = key_item(&marker_key(&self.run));
            item.insert(attr::META.into(), AttributeValue::S("flush".into()));
            item.insert(attr::COMMITTED_SEQ.into(), AttributeValue::N(seq.to_string()));
            // Wall-clock time of the commit: `riskd store prune` leaves recent markers alone.
            item.insert(attr::COMMITTED_AT.into(), AttributeValue::N(crate::event::now_ms().to_string()));
            item
        };
        let mut items = Vec::with_capacity(batch.checkpoints.len() + 1);
        for (source, cp) in &batch.checkpoints {
            let mut item = key_item(&checkpoint_key(source));
            item.insert(attr::META.into(), AttributeValue::S("checkpoint".into()));
            let text = serde_json::to_string(cp).map_err(|e| backend(format!("checkpoint of {source}: {e}")))?;
            item.insert(attr::CHECKPOINT.into(), AttributeValue::S(text));
            if wrote {
                item.insert(attr::FLUSH.into(), AttributeValue::S(flush.clone()));
            }
            items.push(item);
        }
        if wrote {
            items.push(marker());
        }
        match items.len() {
            0 => {}
            1 => {
                let item = items.pop().ok_or_else(|| backend("no item"))?;
                let key = match item.get(attr::KEY) {
                    Some(AttributeValue::S(k)) => k.clone(),
                    _ => String::new(),
                };
                self.remote.put(&key, item)?
            }
            n if n <= MAX_TRANSACT_ITEMS => self.remote.transact_put(items)?,
            n => {
                return Err(StateError::Request(Box::new(RequestFailure {
                    store: STORE,
                    operation: "TransactWriteItems",
                    table: self.remote.table.clone(),
                    key: None,
                    code: "TooManyCheckpoints".into(),
                    message: format!(
                        "one flush would commit {} input positions with its marker, over DynamoDB's {MAX_TRANSACT_ITEMS} items per transaction: run more instances, or fewer partitions per instance",
                        n - usize::from(wrote)
                    ),
                    transient: false,
                })))
            }
        }
        if wrote {
            self.seq = seq;
            self.committed.borrow_mut().insert(self.run.clone(), seq);
        }
        {
            let mut versions = self.versions.borrow_mut();
            for (key, mutation) in &batch.mutations {
                let now = match mutation {
                    Mutation::Put(record) => Some((*record).clone()),
                    Mutation::Delete => None,
                };
                versions.insert(key.to_string(), now);
            }
            if versions.len() > self.remember_versions {
                versions.clear();
            }
        }
        if !tombstones.is_empty() {
            // Committed tombstones read as absent: removing them only saves
            // space, so a failure here is not the flush's failure.
            let deletes: Result<Vec<_>> = tombstones
                .into_iter()
                .map(|key| {
                    let delete = DeleteRequest::builder()
                        .set_key(Some(key_item(&key)))
                        .build()
                        .map_err(|e| backend(e.to_string()))?;
                    Ok((key, WriteRequest::builder().delete_request(delete).build()))
                })
                .collect();
            if let Err(e) = deletes.and_then(|d| self.remote.write(d)) {
                tracing::warn!(error = %e, "could not remove committed tombstones (they read as absent)");
            }
        }
        Ok(())
    }
}

impl Store for DynamoStore {
    fn kind(&self) -> &'static str {
        STORE
    }

    fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Record>>> {
        let mut resolved = self.read_committed(keys)?;
        self.remember(&resolved);
        Ok(keys.iter().map(|k| resolved.get_mut(*k).and_then(|r| r.clone())).collect())
    }

    fn apply(&mut self, batch: WriteBatch<'_>) -> Result<()> {
        let result = self.apply_flush(&batch);
        if result.is_err() {
            self.abandon_run();
        }
        result
    }

    fn checkpoint(&self, source: &str) -> Result<Option<Checkpoint>> {
        let key = checkpoint_key(source);
        let items = self.remote.fetch(&[&key])?;
        let Some(item) = items.get(&key) else {
            return Ok(None);
        };
        match item.get(attr::CHECKPOINT) {
            Some(AttributeValue::S(text)) => serde_json::from_str(text)
                .map(Some)
                .map_err(|e| corrupt(&key, format!("{} is not a checkpoint: {e}", attr::CHECKPOINT))),
            _ => Err(corrupt(&key, format!("no {} string", attr::CHECKPOINT))),
        }
    }

    fn batched_reads(&self) -> bool {
        true
    }

    fn forget(&mut self) {
        self.versions.borrow_mut().clear();
    }

    /// Optimistic concurrency: read the item (committed version) and its
    /// `riskdVersion`, apply `f`, write it back only if the version did not
    /// move meanwhile; otherwise read again and retry. Direct writes carry no
    /// flush id: they are committed as soon as they are written.
    fn update(&mut self, key: &str, now_ms: i64, f: &mut dyn FnMut(&mut Record) -> bool) -> Result<()> {
        check_key(key)?;
        for _ in 0..64 {
            let item = self.remote.fetch(&[key])?.remove(key);
            let version = match &item {
                None => None,
                Some(it) => Some(match it.get(attr::VERSION) {
                    Some(v) => integer(key, attr::VERSION, v)?,
                    None => 0,
                }),
            };
            let stored = match &item {
                None => None,
                Some(it) => {
                    let stored = decode(key, it)?;
                    self.learn_commits(std::iter::once(&stored))?;
                    self.resolve(stored)
                }
            };
            let mut record = stored.filter(|r| r.is_live(now_ms)).unwrap_or_default();
            if !f(&mut record) {
                return Ok(());
            }
            let next = if record.is_empty() && record.expires_at_ms.is_none() {
                None
            } else {
                let mut it = record_attributes(key, &record)?;
                it.insert(attr::VERSION.into(), AttributeValue::N((version.unwrap_or(0) + 1).to_string()));
                check_item_size(key, &it)?;
                Some(it)
            };
            if next.is_none() && item.is_none() {
                return Ok(());
            }
            if self.remote.put_if_version(key, next, version)? {
                // Whatever the write-back side remembered of this key is stale now.
                self.versions.borrow_mut().remove(key);
                return Ok(());
            }
            metrics().dynamodb_retries.with_label_values(&["PutItem"]).inc();
        }
        Err(backend(format!("key {key:?}: still changed by others after 64 tries")))
    }

    fn reader(&self) -> Option<Box<dyn Store>> {
        // A store of its own (client, runtime): it reads committed versions only.
        DynamoStore::open(&self.cfg).ok().map(|s| Box::new(s) as Box<dyn Store>)
    }

    fn scan(&self, prefix: &str, visit: &mut dyn FnMut(&str, &Record)) -> Result<()> {
        let items = self.remote.scan(prefix)?;
        let mut stored = Vec::with_capacity(items.len());
        for item in &items {
            let Some(key) = item_key(item) else { continue };
            stored.push((key.to_string(), decode(key, item)?));
        }
        self.learn_commits(stored.iter().map(|(_, s)| s))?;
        // Scan order is the table's hash order: sort to give key order.
        let records: BTreeMap<String, Record> =
            stored.into_iter().filter_map(|(k, s)| self.resolve(s).map(|r| (k, r))).collect();
        for (key, record) in &records {
            visit(key, record);
        }
        Ok(())
    }
}

// --- pruning commit markers ------------------------------------------------

/// `riskd store prune`: deletes the commit markers no item needs any more.
///
/// A marker `riskd/flush/<run>` says which flushes of a run committed; an
/// item that names the run in `riskdFlush` is read through it. Once every
/// such item has been overwritten by other runs, the marker is dead weight
/// (one per store opened that wrote). One Scan finds the runs still named
/// by some item and each marker's last commit; a marker whose run no item
/// names and whose last commit is older than `idle` is deleted, on the
/// condition that its commit count has not moved since the Scan. A run
/// that writes again meanwhile either commits before the Scan reads its
/// marker (then the commit is recent: kept) or after (then the count moved:
/// the delete fails), so no item ever loses the marker it is read through.
/// Returns what was done, one line per fact.
pub fn prune_markers(cfg: &DynamoConfig, idle: Duration) -> Result<Vec<String>> {
    let remote = Remote::connect(cfg)?;
    let now = crate::event::now_ms();
    let idle_ms = i64::try_from(idle.as_millis()).unwrap_or(i64::MAX);
    let items = remote.rt.block_on(async {
        let mut items = Vec::new();
        let mut start: Option<Item> = None;
        let projection = format!("#k, {}, {}, {}", attr::FLUSH, attr::COMMITTED_SEQ, attr::COMMITTED_AT);
        loop {
            let out = send(
                &remote.limits,
                "Scan",
                || {
                    remote
                        .client
                        .scan()
                        .table_name(&remote.table)
                        .consistent_read(true)
                        .projection_expression(&projection)
                        .expression_attribute_names("#k", attr::KEY)
                        .set_exclusive_start_key(start.clone())
                        .send()
                },
                never,
            )
            .await
            .map_err(|f| f.into_error("Scan", &remote.table, None))?;
            start = out.last_evaluated_key.filter(|k| !k.is_empty());
            items.extend(out.items.unwrap_or_default());
            if start.is_none() {
                return Ok::<_, StateError>(items);
            }
        }
    })?;
    let mut named = HashSet::new();
    let mut markers = Vec::new();
    for item in &items {
        let Some(key) = item_key(item) else { continue };
        if let Some(AttributeValue::S(text)) = item.get(attr::FLUSH) {
            named.insert(FlushId::parse(key, text)?.run);
        }
        if let Some(run) = key.strip_prefix(MARKER_PREFIX) {
            let Some(seq) = item.get(attr::COMMITTED_SEQ) else { continue };
            let at = match item.get(attr::COMMITTED_AT) {
                Some(v) => integer(key, attr::COMMITTED_AT, v)?,
                None => 0,
            };
            markers.push((run.to_string(), seq.clone(), at));
        }
    }
    let (mut deleted, mut recent, mut moved) = (0, 0, 0);
    let in_use = markers.iter().filter(|(run, _, _)| named.contains(run)).count();
    for (run, seq, at) in markers.iter().filter(|(run, _, _)| !named.contains(run)) {
        if now.saturating_sub(*at) < idle_ms {
            recent += 1;
            continue;
        }
        let key = marker_key(run);
        let gone = remote
            .rt
            .block_on(send(
                &remote.limits,
                "DeleteItem",
                || {
                    remote
                        .client
                        .delete_item()
                        .table_name(&remote.table)
                        .set_key(Some(key_item(&key)))
                        .condition_expression(format!("{} = :seq", attr::COMMITTED_SEQ))
                        .expression_attribute_values(":seq", seq.clone())
                        .send()
                },
                never,
            ))
            .map(|_| true);
        match gone {
            Ok(_) => deleted += 1,
            Err(f) if f.code == "ConditionalCheckFailedException" => moved += 1,
            Err(f) => return Err(f.into_error("DeleteItem", &remote.table, Some(&key))),
        }
    }
    Ok(vec![
        format!("{} commit markers in table {:?}; {in_use} still named by items", markers.len(), remote.table),
        format!("deleted {deleted}; kept {recent} that committed less than {} ago", humantime::format_duration(idle)),
        format!("kept {moved} whose run committed again during the prune"),
    ])
}

// --- setting up and checking the table -------------------------------------

async fn describe(remote: &Remote) -> Result<Option<TableDescription>> {
    match send(
        &remote.limits,
        "DescribeTable",
        || remote.client.describe_table().table_name(&remote.table).send(),
        never,
    )
    .await
    {
        Ok(out) => Ok(out.table),
        Err(f) if f.code == "ResourceNotFoundException" => Ok(None),
        Err(f) => Err(f.into_error("DescribeTable", &remote.table, None)),
    }
}

/// What is wrong with a table's key schema and status for riskd.
fn table_problems(table: &TableDescription) -> Vec<String> {
    let mut problems = Vec::new();
    let schema: Vec<String> =
        table.key_schema().iter().map(|k| format!("{} {}", k.attribute_name(), k.key_type().as_str())).collect();
    if schema != [format!("{} HASH", attr::KEY)] {
        problems.push(format!(
            "key schema is [{}], expected [{} HASH] (a hash key only)",
            schema.join(", "),
            attr::KEY
        ));
    }
    let key_type = table
        .attribute_definitions()
        .iter()
        .find(|d| d.attribute_name() == attr::KEY)
        .map(|d| d.attribute_type().as_str().to_string());
    if let Some(t) = key_type.filter(|t| t != "S") {
        problems.push(format!("attribute {} is of type {t}, expected S (string)", attr::KEY));
    }
    match table.table_status() {
        Some(TableStatus::Active | TableStatus::Updating) | None => {}
        Some(other) => problems.push(format!("table status is {}, not ACTIVE", other.as_str())),
    }
    problems
}

/// The table's TTL: status and attribute.
async fn ttl_state(remote: &Remote) -> Result<(Option<TimeToLiveStatus>, Option<String>)> {
    let out = send(
        &remote.limits,
        "DescribeTimeToLive",
        || remote.client.describe_time_to_live().table_name(&remote.table).send(),
        never,
    )
    .await
    .map_err(|f| f.into_error("DescribeTimeToLive", &remote.table, None))?;
    let d = out.time_to_live_description;
    Ok((
        d.as_ref().and_then(|d| d.time_to_live_status().cloned()),
        d.as_ref().and_then(|d| d.attribute_name().map(str::to_string)),
    ))
}

fn ttl_problems(want: bool, status: Option<&TimeToLiveStatus>, attribute: Option<&str>) -> Vec<String> {
    let on = matches!(status, Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling));
    let status_text = status.map_or("DISABLED", |s| s.as_str());
    match (want, on) {
        (true, true) if attribute == Some(attr::EXPIRES_AT) => vec![],
        (true, true) => vec![format!(
            "TTL is on attribute {}, expected {} (items would never expire)",
            attribute.unwrap_or("?"),
            attr::EXPIRES_AT
        )],
        (true, false) => vec![format!(
            "TTL is {status_text}, expected ENABLED on {} (`riskd store init` enables it)",
            attr::EXPIRES_AT
        )],
        (false, true) => vec![format!(
            "TTL is {status_text} on {} but store.ttl = false: DynamoDB would delete state whose event-time expiry is past in wall-clock time",
            attribute.unwrap_or("?")
        )],
        (false, false) => vec![],
    }
}

/// `riskd store check`: what is wrong with the configured table (empty:
/// nothing). A table that does not exist is one problem.
pub fn check_table(cfg: &DynamoConfig) -> Result<Vec<String>> {
    let remote = Remote::connect(cfg)?;
    remote.rt.block_on(async {
        let Some(table) = describe(&remote).await? else {
            return Ok(vec![format!(
                "table {:?} does not exist in {} (create it with `riskd store init`)",
                remote.table, remote.place
            )]);
        };
        let mut problems = table_problems(&table);
        let (status, attribute) = ttl_state(&remote).await?;
        problems.extend(ttl_problems(cfg.ttl, status.as_ref(), attribute.as_deref()));
        Ok(problems)
    })
}

/// `riskd store init`: creates the table (on-demand, hash key `key` S) if it
/// does not exist and enables TTL on `expiresAt` (unless `ttl` is off).
/// Running it again on a correct table changes nothing. Returns what it
/// did, one line per step.
pub fn init_table(cfg: &DynamoConfig) -> Result<Vec<String>> {
    let remote = Remote::connect(cfg)?;
    let table_name = remote.table.clone();
    let misfit = |problems: Vec<String>| StateError::TableMisfit { table: table_name.clone(), problems };
    remote.rt.block_on(async {
        let mut done = Vec::new();
        let mut table = describe(&remote).await?;
        if table.is_none() {
            let key = KeySchemaElement::builder()
                .attribute_name(attr::KEY)
                .key_type(KeyType::Hash)
                .build()
                .map_err(|e| backend(e.to_string()))?;
            let definition = AttributeDefinition::builder()
                .attribute_name(attr::KEY)
                .attribute_type(ScalarAttributeType::S)
                .build()
                .map_err(|e| backend(e.to_string()))?;
            let created = send(
                &remote.limits,
                "CreateTable",
                || {
                    remote
                        .client
                        .create_table()
                        .table_name(&remote.table)
                        .key_schema(key.clone())
                        .attribute_definitions(definition.clone())
                        .billing_mode(BillingMode::PayPerRequest)
                        .send()
                },
                never,
            )
            .await;
            match created {
                Ok(_) => done
                    .push(format!("created table {:?} in {} (on-demand, hash key key S)", remote.table, remote.place)),
                // Someone created it meanwhile: check it as an existing table.
                Err(f) if f.code == "ResourceInUseException" => {}
                Err(f) => return Err(f.into_error("CreateTable", &remote.table, None)),
            }
            // A new table takes seconds to become ACTIVE on AWS.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
            loop {
                table = describe(&remote).await?;
                let status = table.as_ref().and_then(|t| t.table_status().cloned());
                if status == Some(TableStatus::Active) {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    return Err(backend(format!("table {:?} is not ACTIVE after 5 minutes", remote.table)));
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        } else {
            done.push(format!("table {:?} exists in {}", remote.table, remote.place));
        }
        if let Some(t) = &table {
            let problems = table_problems(t);
            if !problems.is_empty() {
                return Err(misfit(problems));
            }
        }
        let (status, attribute) = ttl_state(&remote).await?;
        let on = matches!(status, Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling));
        if cfg.ttl && !on {
            if status == Some(TimeToLiveStatus::Disabling) {
                return Err(misfit(vec![
                    "TTL is DISABLING; DynamoDB allows enabling it again only once that ends (up to an hour)".into(),
                ]));
            }
            let spec = TimeToLiveSpecification::builder()
                .attribute_name(attr::EXPIRES_AT)
                .enabled(true)
                .build()
                .map_err(|e| backend(e.to_string()))?;
            send(
                &remote.limits,
                "UpdateTimeToLive",
                || {
                    remote
                        .client
                        .update_time_to_live()
                        .table_name(&remote.table)
                        .time_to_live_specification(spec.clone())
                        .send()
                },
                never,
            )
            .await
            .map_err(|f| f.into_error("UpdateTimeToLive", &remote.table, None))?;
            done.push(format!("enabled TTL on {}", attr::EXPIRES_AT));
        } else {
            let problems = ttl_problems(cfg.ttl, status.as_ref(), attribute.as_deref());
            if !problems.is_empty() {
                return Err(misfit(problems));
            }
            done.push(if cfg.ttl {
                format!("TTL already on {}", attr::EXPIRES_AT)
            } else {
                "TTL left off (store.ttl = false)".to_string()
            });
        }
        Ok(done)
    })
}

#[cfg(test)]
pub(crate) mod tests {
    //! Against the DynamoDB Local that `scripts/test.sh` starts, one fresh
    //! table per test.
    use super::*;
    use crate::state::store_tests::shared_store_tests;
    use serde_json::json;

    /// DynamoDB Local's address; without it the test fails, saying how to get it.
    pub fn endpoint() -> String {
        std::env::var("RISKD_TEST_DYNAMODB_ENDPOINT").unwrap_or_else(|_| {
            panic!(
                "RISKD_TEST_DYNAMODB_ENDPOINT is not set: this test needs DynamoDB Local; \
                 run ./scripts/test.sh, which installs and starts it"
            )
        })
    }

    /// A config for a table no other test uses (not created yet).
    pub fn test_config() -> DynamoConfig {
        DynamoConfig {
            table: format!("riskd-test-{}", uuid::Uuid::new_v4().simple()),
            region: Some("us-east-1".into()),
            endpoint_url: Some(endpoint()),
            ttl: true,
            remember_versions: 10_000,
            read_requests_per_second: None,
            write_requests_per_second: None,
        }
    }

    /// A store on a fresh table made by `init_table`.
    pub fn fresh() -> (DynamoStore, DynamoConfig) {
        let cfg = test_config();
        init_table(&cfg).unwrap();
        (DynamoStore::open(&cfg).unwrap(), cfg)
    }

    shared_store_tests!(fresh());

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
        let raw = raw(&store, "shared/counter").unwrap();
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

    fn raw(store: &DynamoStore, key: &str) -> Option<Item> {
        store.remote.fetch(&[key]).unwrap().remove(key)
    }

    fn raw_put(store: &DynamoStore, item: Item) {
        let key = item_key(&item).unwrap_or_default().to_string();
        store.remote.put(&key, item).unwrap();
    }

    fn s(v: &str) -> AttributeValue {
        AttributeValue::S(v.into())
    }

    fn n(v: &str) -> AttributeValue {
        AttributeValue::N(v.into())
    }

    fn dict(v: serde_json::Value) -> Option<serde_json::Map<String, serde_json::Value>> {
        v.as_object().cloned()
    }

    #[test]
    fn panther_items_read_as_records_and_riskd_items_have_panther_layout() {
        let (mut store, _) = fresh();
        // As Panther's helpers leave them: increment_counter, add_to_string_set,
        // put_dictionary and set_key_expiration on one key, and a bare counter. The
        // expiry is in the future: the table's TTL deletes items past it by the wall clock.
        raw_put(
            &store,
            HashMap::from([
                ("key".into(), s("panther/full")),
                ("intCount".into(), n("5")),
                ("stringSet".into(), AttributeValue::Ss(vec!["a".into(), "b".into()])),
                ("dictionary".into(), s(r#"{"ip": "1.2.3.4", "n": 2}"#)),
                ("expiresAt".into(), n("4102444800")),
            ]),
        );
        raw_put(&store, HashMap::from([("key".into(), s("panther/counter")), ("intCount".into(), n("12"))]));
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
        let item = raw(&store, "panther/full").unwrap();
        assert_eq!(item["intCount"], n("7"));
        assert_eq!(item["stringSet"], AttributeValue::Ss(vec!["x".into()]));
        assert_eq!(item["dictionary"], s(r#"{"city":"Paris"}"#));
        assert_eq!(item["expiresAt"], n("4102444801"), "rounded up: never expires early");
        assert_eq!(item["riskdExpiresAtMs"], n("4102444800500"));
        assert!(matches!(&item["riskdFlush"], AttributeValue::S(f) if f.ends_with(":1")));
        let prev: Record = serde_json::from_str(item["riskdPrev"].as_s().unwrap()).unwrap();
        assert_eq!(prev, full, "the previous committed version rides along");
        let item = raw(&store, "riskd/new").unwrap();
        assert!(!item.contains_key("stringSet"), "no empty sets in DynamoDB");
        assert!(!item.contains_key("dictionary") && !item.contains_key("expiresAt"));
        assert!(!item.contains_key("riskdPrev"), "the key had no previous version");

        // Panther moving the expiry (set_key_expiration) wins over riskd's milliseconds.
        let mut moved = raw(&store, "panther/full").unwrap();
        moved.insert("expiresAt".into(), n("1800000000"));
        raw_put(&store, moved);
        let fresh = DynamoStore::open(&cfg_of(&store)).unwrap();
        let got = fresh.get_many(&["panther/full"]).unwrap().remove(0).unwrap();
        assert_eq!(got.expires_at_ms, Some(1_800_000_000_000));
        assert_eq!(got.count, 7);
    }

    fn cfg_of(store: &DynamoStore) -> DynamoConfig {
        DynamoConfig { table: store.table().to_string(), ..test_config() }
    }

    #[test]
    fn the_same_batch_applied_twice_changes_no_item() {
        let (mut store, cfg) = fresh();
        let a = Record { count: 3, set: ["s".into()].into(), ..Record::default() };
        let b = Record { dict: dict(json!({"k": 1})), expires_at_ms: Some(5_000), ..Record::default() };
        raw_put(&store, HashMap::from([("key".into(), s("gone")), ("intCount".into(), n("1"))]));
        let cp = Checkpoint { offset: 9, ..Checkpoint::default() };
        let batch = || WriteBatch {
            mutations: vec![("a", Mutation::Put(&a)), ("b", Mutation::Put(&b)), ("gone", Mutation::Delete)],
            checkpoints: vec![("src", &cp)],
        };
        store.get_many(&["a", "b", "gone"]).unwrap();
        store.apply(batch()).unwrap();
        let before: Vec<Option<Item>> = ["a", "b", "gone"].iter().map(|k| raw(&store, k)).collect();
        assert!(before[2].is_none(), "the committed tombstone is removed");
        store.apply(batch()).unwrap();
        // And from another process, which knows nothing of the first apply.
        let mut other = DynamoStore::open(&cfg).unwrap();
        other.apply(batch()).unwrap();
        let after: Vec<Option<Item>> = ["a", "b", "gone"].iter().map(|k| raw(&store, k)).collect();
        assert_eq!(after, before);
        assert_eq!(other.get_many(&["a", "b", "gone"]).unwrap(), vec![Some(a.clone()), Some(b.clone()), None]);
        assert_eq!(other.checkpoint("src").unwrap(), Some(cp.clone()));
    }

    #[test]
    fn pruning_removes_only_the_markers_no_item_needs() {
        let (mut a, cfg) = fresh();
        let (v1, v2) = (Record { count: 1, ..Record::default() }, Record { count: 2, ..Record::default() });
        let put = |keys: &[&'static str], v| WriteBatch {
            mutations: keys.iter().map(|k| (*k, Mutation::Put(v))).collect(),
            checkpoints: Vec::new(),
        };
        a.apply(put(&["k1", "k2"], &v1)).unwrap();
        // Another run overwrites every key the first wrote; a third writes a key of its own.
        let mut b = DynamoStore::open(&cfg).unwrap();
        b.get_many(&["k1", "k2"]).unwrap();
        b.apply(put(&["k1", "k2"], &v2)).unwrap();
        let mut c = DynamoStore::open(&cfg).unwrap();
        c.apply(put(&["k3"], &v1)).unwrap();
        let markers = [&a.run, &b.run, &c.run].map(|run| raw(&a, &marker_key(run)).is_some());
        assert_eq!(markers, [true, true, true]);

        let recent = prune_markers(&cfg, Duration::from_secs(3600)).unwrap();
        assert_eq!(recent[1], "deleted 0; kept 1 that committed less than 1h ago", "{recent:?}");
        let done = prune_markers(&cfg, Duration::ZERO).unwrap();
        assert!(
            done[0].starts_with("3 commit markers in table") && done[0].ends_with("2 still named by items"),
            "{done:?}"
        );
        assert!(done[1].starts_with("deleted 1;"), "{done:?}");
        let markers = [&a.run, &b.run, &c.run].map(|run| raw(&a, &marker_key(run)).is_some());
        assert_eq!(markers, [false, true, true], "only the marker no item names is gone");
        let reader = DynamoStore::open(&cfg).unwrap();
        assert_eq!(reader.get_many(&["k1", "k2", "k3"]).unwrap(), vec![Some(v2.clone()), Some(v2), Some(v1)]);
    }

    #[test]
    fn a_crash_mid_flush_reads_as_the_last_committed_flush() {
        let (mut store, cfg) = fresh();
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
        store.crash_before_commit = true;
        assert!(store.apply(flush2()).is_err());
        assert_eq!(raw(&store, "k/changed").unwrap()["intCount"], n("2"), "the new value is in the table");
        assert!(raw(&store, "k/created").is_some());

        // A restart (a new process) sees exactly the state of flush 1.
        let mut restarted = DynamoStore::open(&cfg).unwrap();
        let keys = ["k/changed", "k/deleted", "k/created"];
        assert_eq!(restarted.get_many(&keys).unwrap(), vec![Some(v1.clone()), Some(v1.clone()), None]);
        assert_eq!(restarted.checkpoint("src").unwrap(), Some(cp1.clone()));
        let mut exported = Vec::new();
        restarted.scan("", &mut |k, r| exported.push((k.to_string(), r.clone()))).unwrap();
        assert_eq!(exported, vec![("k/changed".into(), v1.clone()), ("k/deleted".into(), v1.clone())]);
        // So does the crashed store itself: its failed flush can never commit.
        store.crash_before_commit = false;
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
        let mut small = DynamoStore::open(&DynamoConfig { remember_versions: 2, ..cfg.clone() }).unwrap();
        for key in keys {
            assert_eq!(small.get_many(&[key]).unwrap(), vec![Some(v1.clone())]);
        }
        small.crash_before_commit = true;
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
        let mut half = record_attributes("k", &Record { count: 99, ..Record::default() }).unwrap();
        stamp(&mut half, "k", "deadrun:1", Some(&v1)).unwrap();
        raw_put(&store, half);
        let mut fresh_key = record_attributes("new", &Record { count: 5, ..Record::default() }).unwrap();
        stamp(&mut fresh_key, "new", "deadrun:1", None).unwrap();
        raw_put(&store, fresh_key);
        let restarted = DynamoStore::open(&cfg).unwrap();
        assert_eq!(restarted.get_many(&["k", "new"]).unwrap(), vec![Some(v1), None]);
    }

    #[test]
    fn a_write_that_fails_for_good_names_the_key() {
        let (mut store, _) = fresh();
        // A dictionary near the 400 KB limit fits once, but not beside its previous version.
        let big = |c: &str| Record { dict: dict(json!({"x": c.repeat(300_000)})), ..Record::default() };
        let (first, second) = (big("a"), big("b"));
        store
            .apply(WriteBatch { mutations: vec![("big/key", Mutation::Put(&first))], checkpoints: Vec::new() })
            .unwrap();
        let err = store
            .apply(WriteBatch { mutations: vec![("big/key", Mutation::Put(&second))], checkpoints: Vec::new() })
            .unwrap_err();
        assert!(matches!(&err, StateError::ItemTooLarge { key, .. } if key == "big/key"), "{err}");
        assert_eq!(store.get_many(&["big/key"]).unwrap(), vec![Some(first)]);

        // A key DynamoDB refuses (a table keyed by a number): the service's
        // code, and the key, found by writing the chunk item by item.
        let cfg = test_config();
        let remote = Remote::connect(&cfg).unwrap();
        create_table_with(&remote, "key", ScalarAttributeType::N);
        let mut wrong = DynamoStore::open(&cfg).unwrap();
        let err = wrong.get_many(&["w/1", "w/2"]).unwrap_err();
        assert!(
            matches!(&err, StateError::Request(r) if r.operation == "BatchGetItem" && r.key.as_deref() == Some("w/1") && r.code == "ValidationException"),
            "{err}"
        );
        // As if the keys had been read: the write itself fails.
        wrong.versions.borrow_mut().extend([("w/1".to_string(), None), ("w/2".to_string(), None)]);
        let rec = Record { count: 1, ..Record::default() };
        let err = wrong
            .apply(WriteBatch {
                mutations: vec![("w/1", Mutation::Put(&rec)), ("w/2", Mutation::Put(&rec))],
                checkpoints: Vec::new(),
            })
            .unwrap_err();
        assert!(
            matches!(&err, StateError::Request(r) if r.operation == "BatchWriteItem" && r.key.as_deref() == Some("w/1") && r.code == "ValidationException"),
            "{err}"
        );
        assert!(err.to_string().contains("(key \"w/1\")"), "{err}");

        let long = "k".repeat(MAX_KEY_BYTES + 1);
        let err = store.get_many(&[&long]).unwrap_err();
        assert!(matches!(&err, StateError::BadKey { key, .. } if key == &long), "{err}");
    }

    fn create_table_with(remote: &Remote, key: &str, kind: ScalarAttributeType) {
        remote
            .rt
            .block_on(
                remote
                    .client
                    .create_table()
                    .table_name(&remote.table)
                    .key_schema(
                        KeySchemaElement::builder().attribute_name(key).key_type(KeyType::Hash).build().unwrap(),
                    )
                    .attribute_definitions(
                        AttributeDefinition::builder().attribute_name(key).attribute_type(kind).build().unwrap(),
                    )
                    .billing_mode(BillingMode::PayPerRequest)
                    .send(),
            )
            .unwrap();
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
        create_table_with(&Remote::connect(&wrong).unwrap(), "id", ScalarAttributeType::S);
        let problems = check_table(&wrong).unwrap();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("key schema is [id HASH], expected [key HASH]"), "{problems:?}");
        assert!(problems[1].contains("TTL is DISABLED"), "{problems:?}");
        let err = init_table(&wrong).unwrap_err();
        assert!(err.to_string().contains("key schema is [id HASH]"), "{err}");

        let numeric = test_config();
        create_table_with(&Remote::connect(&numeric).unwrap(), "key", ScalarAttributeType::N);
        let problems = check_table(&numeric).unwrap();
        assert!(problems[0].contains("attribute key is of type N, expected S"), "{problems:?}");

        // init enables TTL on a right table that lacks it; with ttl off it leaves it off.
        let bare = test_config();
        create_table_with(&Remote::connect(&bare).unwrap(), "key", ScalarAttributeType::S);
        let off = DynamoConfig { ttl: false, ..bare.clone() };
        assert_eq!(init_table(&off).unwrap()[1], "TTL left off (store.ttl = false)");
        assert_eq!(check_table(&off).unwrap(), Vec::<String>::new());
        assert_eq!(init_table(&bare).unwrap()[1], "enabled TTL on expiresAt");
    }

    #[test]
    fn flush_ids_and_expiry_seconds() {
        assert_eq!(ceil_seconds(1_000), 1);
        assert_eq!(ceil_seconds(1_001), 2);
        assert_eq!(ceil_seconds(0), 0);
        assert_eq!(ceil_seconds(-1), 0);
        assert_eq!(ceil_seconds(-1_000), -1);
        assert_eq!(FlushId::parse("k", "abc:12").unwrap(), FlushId { run: "abc".into(), seq: 12 });
        assert!(FlushId::parse("k", "abc").is_err());
        assert!(FlushId::parse("k", ":1").is_err());
    }
}
