//! Requests to DynamoDB: batching, retries, rate limits and error
//! classification.
//!
//! `get_many` sends BatchGetItem (100 keys each, a few requests in flight
//! at once, strongly consistent); `apply` a conditional PutItem or
//! DeleteItem per item (many in flight at once: DynamoDB bills per item
//! either way, and BatchWriteItem takes no condition), then the commit. Throttling, 5xx answers, timeouts, connection failures and
//! unprocessed keys or items are retried with exponential backoff and
//! jitter (the SDK's own retries are off, so there is one retry policy);
//! anything else fails the call, naming the key when one is at fault.
//! Every request is bounded: 3 s to connect, 5 s an attempt, 10 s in all
//! with its retries, so a store that stops answering is reported within
//! seconds while a slow one (2 s a request) still gets its answers.
//! Every request asks what it consumed, and counts it (`capacity`).

use super::capacity;
use super::codec::{attr, item_key, key_item, Item};
use super::commit::{Stamp, Write};
use super::{backend, DynamoConfig, STORE};
use crate::state::{RequestFailure, Result, StateError};
use crate::telemetry::metrics;
use aws_config::BehaviorVersion;
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::config::retry::RetryConfig;
use aws_sdk_dynamodb::config::timeout::TimeoutConfig;
use aws_sdk_dynamodb::config::Region;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::scan::builders::ScanFluentBuilder;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{AttributeValue, KeysAndAttributes, Put, ReturnConsumedCapacity, TransactWriteItem};
use aws_sdk_dynamodb::Client;
use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// DynamoDB's limit: keys per BatchGetItem.
const GET_BATCH: usize = 100;
/// Read requests in flight at once for one `get_many`.
const IN_FLIGHT: usize = 8;
/// Item writes in flight at once for one flush: one item a request.
const WRITES_IN_FLIGHT: usize = 64;

/// A request that failed for good.
#[derive(Debug)]
pub(super) struct Failure {
    /// The service's error code, or the kind of failure (`Timeout`, …).
    pub(super) code: String,
    message: String,
    /// Whether it failed on something retrying could help (and retries ran out).
    transient: bool,
}

impl Failure {
    /// The state error for `operation` on `table`, naming `key` when one is at fault.
    pub(super) fn into_error(self, operation: &'static str, table: &str, key: Option<&str>) -> StateError {
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

/// Error codes worth another try, whatever the operation: throttling,
/// the service's own trouble, conflicts, and credentials that expired
/// (the provider refreshes them).
const RETRY_CODES: [&str; 9] = [
    "ProvisionedThroughputExceededException",
    "ThrottlingException",
    "RequestLimitExceeded",
    "InternalServerError",
    "ServiceUnavailable",
    "TransactionConflictException",
    "TransactionInProgressException",
    "ExpiredTokenException",
    "RequestExpired",
];

/// Whether a failed request is worth another try, whatever the operation.
/// What is not known to be permanent is transient: a request that never got
/// an answer (a connection refused, reset or closed under it — as a pooled
/// connection the service closed while idle —, a timeout, a response cut
/// short) may succeed the next time. Permanent: a request that could not be
/// built, a 4xx answer other than throttling or an expired token, and
/// credentials that are missing or misconfigured.
fn transient<E: ProvideErrorMetadata + std::error::Error + 'static>(e: &SdkError<E, HttpResponse>) -> bool {
    match e {
        SdkError::ConstructionFailure(_) => false,
        SdkError::DispatchFailure(d) => !d.is_user() && !credentials_missing(e),
        SdkError::ServiceError(s) => {
            s.raw().status().is_server_error() || s.err().code().is_some_and(|c| RETRY_CODES.contains(&c))
        }
        _ => true,
    }
}

/// Whether the credentials chain found none, or a configuration it cannot
/// use (a failing or timed-out provider may answer the next time).
fn credentials_missing(e: &(dyn std::error::Error + 'static)) -> bool {
    use aws_credential_types::provider::error::CredentialsError;
    let mut source = Some(e);
    while let Some(err) = source {
        if let Some(c) = err.downcast_ref::<CredentialsError>() {
            return matches!(c, CredentialsError::CredentialsNotLoaded(_) | CredentialsError::InvalidConfiguration(_));
        }
        source = err.source();
    }
    false
}

/// The code and message of a failed request.
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

/// How long a connection may take to open. DynamoDB opens one in
/// milliseconds; an address that does not answer at all is given up on
/// (and retried) after this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one attempt of a request may take, sending to last byte of the
/// answer. An answer normally takes milliseconds, and a slow network (2 s a
/// request) still gets its answers; a store that stopped answering
/// (frozen, or the network dropping everything) is noticed after this.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one request may take in all, its attempts and the waits
/// between them (waits for the request budget excluded). Past it the
/// request fails as transient, and the job reports not-ready and backs off.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The retry schedule: exponential from 25 ms, capped at 1 s a wait, with
/// jitter, 6 retries (about 1.6 s in all) before giving up, all within
/// [`REQUEST_TIMEOUT`]. Longer outages are the job's to ride out: it backs
/// off further and reports not-ready.
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
pub(super) struct Limits {
    read: Option<governor::DefaultDirectRateLimiter>,
    write: Option<governor::DefaultDirectRateLimiter>,
}

impl Limits {
    /// The budgets `cfg` sets.
    fn new(cfg: &DynamoConfig) -> Self {
        // Known series start at zero, so dashboards see them before the first throttle.
        let m = metrics();
        for op in ["BatchGetItem", "PutItem", "DeleteItem", "TransactWriteItems", "Scan"] {
            for outcome in ["ok", "throttled", "error"] {
                m.dynamodb_requests.with_label_values(&[op, outcome]);
            }
            m.dynamodb_throttles.with_label_values(&[op]);
            m.dynamodb_retries.with_label_values(&[op]);
        }
        capacity::register();
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
/// budget, retrying what is transient by [`transient`] or by `also`, for
/// [`REQUEST_TIMEOUT`] at most.
pub(super) async fn send<T, E, F, Fut>(
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
    // Time spent on this request: attempts and the waits between them.
    let mut spent = Duration::ZERO;
    let m = metrics();
    loop {
        tries += 1;
        limits.acquire(operation).await;
        let start = std::time::Instant::now();
        // Each attempt is bounded by the SDK (connect, attempt timeouts);
        // this bounds the last one by what is left of the request's time.
        let result = tokio::time::timeout(REQUEST_TIMEOUT.saturating_sub(spent), attempt()).await;
        let took = start.elapsed();
        spent += took;
        m.dynamodb_request_seconds.with_label_values(&[operation]).observe(took.as_secs_f64());
        let Ok(result) = result else {
            m.dynamodb_requests.with_label_values(&[operation, "error"]).inc();
            return Err(Failure {
                code: "Timeout".into(),
                message: format!("no answer within {REQUEST_TIMEOUT:?} ({tries} tries)"),
                transient: true,
            });
        };
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
                    Some(delay) if retry && spent + delay < REQUEST_TIMEOUT => {
                        tracing::debug!(operation, tries, error = %DisplayErrorContext(&e), delay_ms = delay.as_millis() as u64, "retrying");
                        tokio::time::sleep(delay).await;
                        spent += delay;
                    }
                    _ => {
                        let mut f = failure(&e, retry);
                        if retry {
                            f.message =
                                format!("{} (gave up after {tries} tries in {:.1} s)", f.message, spent.as_secs_f64());
                        }
                        return Err(f);
                    }
                }
            }
        }
    }
}

/// For [`send`]: no error is transient but those [`transient`] says.
pub(super) fn never<E>(_: &E) -> bool {
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

/// Reads up to 100 keys, naming the key at fault when that fails.
async fn get_chunk(client: Client, limits: Arc<Limits>, table: String, keys: Vec<String>) -> Result<Vec<Item>> {
    let (c, l, t) = (&client, &*limits, table.as_str());
    let chunk = keys.into_iter().map(|k| (k.clone(), k)).collect();
    naming_the_key("BatchGetItem", t, chunk, move |keys: Vec<String>| async move { get_keys(c, l, t, &keys).await })
        .await
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
            || {
                client
                    .batch_get_item()
                    .request_items(table, request.clone())
                    .return_consumed_capacity(ReturnConsumedCapacity::Total)
                    .send()
            },
            never,
        )
        .await?;
        let items = out.responses.as_mut().and_then(|r| r.remove(table)).unwrap_or_default();
        let left = out.unprocessed_keys.take().and_then(|mut u| u.remove(table)).map(|k| k.keys).unwrap_or_default();
        // Keys left unprocessed were not read, nor billed.
        let not_found = pending.len().saturating_sub(left.len() + items.len());
        capacity::count("BatchGetItem", capacity::reported(out.consumed_capacity()), || {
            capacity::batch_get_units(&items, not_found)
        });
        found.extend(items);
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

/// Condition names and values of a request.
type Expression = (String, HashMap<String, String>, Option<HashMap<String, AttributeValue>>);

/// What a checkpoint's put is conditioned on: the commit the store last
/// saw there (`None`: no checkpoint yet), or this very commit (its retry).
#[derive(Clone, Debug)]
pub(super) struct CommitCondition {
    /// The commit id the item holds now.
    pub(super) over: Option<String>,
    /// This commit's id.
    pub(super) mine: String,
}

impl CommitCondition {
    fn expression(&self) -> Expression {
        let mut values = HashMap::from([(":mine".to_string(), AttributeValue::S(self.mine.clone()))]);
        let mut names = HashMap::from([("#c".to_string(), attr::COMMIT.to_string())]);
        let expression = match &self.over {
            None => {
                names.insert("#k".into(), attr::KEY.into());
                "attribute_not_exists(#k) OR #c = :mine".to_string()
            }
            Some(id) => {
                values.insert(":over".into(), AttributeValue::S(id.clone()));
                "#c = :over OR #c = :mine".to_string()
            }
        };
        (expression, names, Some(values))
    }
}

type ConditionParts = (Option<String>, Option<HashMap<String, String>>, Option<HashMap<String, AttributeValue>>);

/// A condition's parts as the request builders take them.
fn condition_parts(condition: Option<&CommitCondition>) -> ConditionParts {
    match condition.map(CommitCondition::expression) {
        Some((expression, names, values)) => (Some(expression), Some(names), values),
        None => (None, None, None),
    }
}

/// The condition of a flush's write (see [`Remote::write_items`]).
fn write_condition(w: &Write) -> Expression {
    let mut names = HashMap::from([("#f".to_string(), attr::FLUSH.to_string())]);
    let mut values = HashMap::new();
    let known = match &w.over {
        Stamp::Unstamped => "attribute_not_exists(#f)".to_string(),
        Stamp::Flush(f) => {
            values.insert(":known".to_string(), AttributeValue::S(f.clone()));
            "#f = :known".to_string()
        }
    };
    let expression = if w.item.is_some() {
        values.insert(":mine".to_string(), AttributeValue::S(w.flush.clone()));
        format!("{known} OR #f = :mine")
    } else {
        // A delete that landed leaves nothing.
        names.insert("#k".to_string(), attr::KEY.to_string());
        format!("attribute_not_exists(#k) OR {known}")
    };
    (expression, names, (!values.is_empty()).then_some(values))
}

/// Sends one write of a flush (see [`Remote::write_items`]).
async fn write_item(client: Client, limits: Arc<Limits>, table: String, w: Write) -> Result<()> {
    let (expression, names, values) = write_condition(&w);
    let conflict = |f: &Failure| f.code == "ConditionalCheckFailedException";
    let (operation, sent, estimate) = match &w.item {
        Some(item) => {
            let estimate = capacity::write_units(capacity::item_size(item));
            let sent = send(
                &limits,
                "PutItem",
                || {
                    client
                        .put_item()
                        .table_name(&table)
                        .set_item(Some(item.clone()))
                        .condition_expression(&expression)
                        .set_expression_attribute_names(Some(names.clone()))
                        .set_expression_attribute_values(values.clone())
                        .return_consumed_capacity(ReturnConsumedCapacity::Total)
                        .send()
                },
                never,
            )
            .await
            .map(|out| capacity::reported(out.consumed_capacity()));
            ("PutItem", sent, estimate)
        }
        None => {
            let sent = send(
                &limits,
                "DeleteItem",
                || {
                    client
                        .delete_item()
                        .table_name(&table)
                        .set_key(Some(key_item(&w.key)))
                        .condition_expression(&expression)
                        .set_expression_attribute_names(Some(names.clone()))
                        .set_expression_attribute_values(values.clone())
                        .return_consumed_capacity(ReturnConsumedCapacity::Total)
                        .send()
                },
                never,
            )
            .await
            .map(|out| capacity::reported(out.consumed_capacity()));
            ("DeleteItem", sent, 1.0)
        }
    };
    match sent {
        Ok(reported) => {
            capacity::count(operation, reported, || estimate);
            Ok(())
        }
        Err(mut f) => {
            if conflict(&f) {
                // Billed, though the answer does not say how much.
                capacity::count(operation, None, || estimate);
                f.message = "the item changed since riskd read it (a delayed write landed, or another writer): the flush is tried again over what is there".into();
                f.transient = true;
            }
            Err(f.into_error(operation, &table, Some(&w.key)))
        }
    }
}

/// Sends a chunk of a batch request, one part per key, with `send_parts`;
/// when that fails for good on something other than capacity (a validation
/// error, an item over 400 KB), sends the parts one by one to name the key
/// at fault.
async fn naming_the_key<T, R, Fut>(
    operation: &'static str,
    table: &str,
    chunk: Vec<(String, T)>,
    send_parts: impl Fn(Vec<T>) -> Fut,
) -> Result<R>
where
    T: Clone,
    Fut: Future<Output = Result<R, Failure>>,
{
    match send_parts(chunk.iter().map(|(_, part)| part.clone()).collect()).await {
        Ok(out) => Ok(out),
        Err(f) if !f.transient && chunk.len() > 1 => {
            for (key, part) in chunk {
                if let Err(f) = send_parts(vec![part]).await {
                    return Err(f.into_error(operation, table, Some(&key)));
                }
            }
            Err(f.into_error(operation, table, None))
        }
        Err(f) => {
            let key = (chunk.len() == 1).then(|| chunk[0].0.as_str());
            Err(f.into_error(operation, table, key))
        }
    }
}

/// Runs the futures with at most `at_once` at once; the first error wins
/// (the others are dropped, which cancels them: a write among them may
/// still land, which its condition makes harmless).
async fn in_flight<T, F>(futures: Vec<F>, at_once: usize) -> Result<Vec<T>>
where
    T: Send + 'static,
    F: Future<Output = Result<T>> + Send + 'static,
{
    let mut tasks = tokio::task::JoinSet::new();
    let mut waiting = futures.into_iter();
    for f in waiting.by_ref().take(at_once) {
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
pub(super) struct Remote {
    /// The runtime every request runs on (the store's methods block on it).
    pub(super) rt: StoreRuntime,
    pub(super) client: Client,
    pub(super) table: String,
    /// Where it talks to, for messages: region and endpoint.
    pub(super) place: String,
    /// Request budgets.
    pub(super) limits: Arc<Limits>,
}

/// The store's own runtime. A store may be dropped inside an async task
/// (the API's reading handle, when the server stops at shutdown), where
/// dropping a runtime — which waits for its blocking tasks — panics: it is
/// shut down without waiting instead (nothing of the store's runs there
/// between its calls).
pub(super) struct StoreRuntime(Option<tokio::runtime::Runtime>);

impl std::ops::Deref for StoreRuntime {
    type Target = tokio::runtime::Runtime;

    fn deref(&self) -> &Self::Target {
        // `None` only inside `drop`.
        self.0.as_ref().unwrap_or_else(|| unreachable!("the store's runtime is used after its drop"))
    }
}

impl Drop for StoreRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

impl Remote {
    /// A client of `cfg`'s table (no request is sent yet).
    pub(super) fn connect(cfg: &DynamoConfig) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| backend(format!("cannot start its runtime: {e}")))?;
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            // One retry policy, riskd's: it also covers unprocessed batch items.
            .retry_config(RetryConfig::disabled())
            // The SDK makes one attempt per operation: both timeouts bound it.
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                    .operation_timeout(ATTEMPT_TIMEOUT)
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
        let rt = StoreRuntime(Some(rt));
        Ok(Self { rt, client: Client::new(&sdk), table: cfg.table.clone(), place, limits: Arc::new(Limits::new(cfg)) })
    }

    /// The items stored under `keys` (each once), by key.
    pub(super) fn fetch(&self, keys: &[&str]) -> Result<HashMap<String, Item>> {
        let chunks: Vec<_> = keys
            .chunks(GET_BATCH)
            .map(|c| {
                let keys = c.iter().map(|k| k.to_string()).collect();
                get_chunk(self.client.clone(), Arc::clone(&self.limits), self.table.clone(), keys)
            })
            .collect();
        let found = self.rt.block_on(in_flight(chunks, IN_FLIGHT))?;
        let mut by_key = HashMap::new();
        for item in found.into_iter().flatten() {
            if let Some(key) = item_key(&item) {
                by_key.insert(key.to_string(), item);
            }
        }
        Ok(by_key)
    }

    /// Puts one item, on `condition` when there is one.
    pub(super) fn put(&self, key: &str, item: Item, condition: Option<&CommitCondition>) -> Result<()> {
        let (expression, names, values) = condition_parts(condition);
        let out = self
            .rt
            .block_on(send(
                &self.limits,
                "PutItem",
                || {
                    self.client
                        .put_item()
                        .table_name(&self.table)
                        .set_item(Some(item.clone()))
                        .set_condition_expression(expression.clone())
                        .set_expression_attribute_names(names.clone())
                        .set_expression_attribute_values(values.clone())
                        .return_consumed_capacity(ReturnConsumedCapacity::Total)
                        .send()
                },
                never,
            ))
            .map_err(|f| f.into_error("PutItem", &self.table, Some(key)))?;
        capacity::count("PutItem", capacity::reported(out.consumed_capacity()), || {
            capacity::write_units(capacity::item_size(&item))
        });
        Ok(())
    }

    /// Sends the writes of a flush, each a PutItem or DeleteItem on the
    /// condition that its item is still stamped as the store knows it (or
    /// already holds this write: the retry of a write that landed), many at
    /// once. A failed condition fails the call as transient: the store then
    /// reads what is there, and the flush is tried again.
    pub(super) fn write_items(&self, writes: Vec<Write>) -> Result<()> {
        let futures: Vec<_> = writes
            .into_iter()
            .map(|w| write_item(self.client.clone(), Arc::clone(&self.limits), self.table.clone(), w))
            .collect();
        self.rt.block_on(in_flight(futures, WRITES_IN_FLIGHT)).map(|_| ())
    }

    /// Puts `item` (or deletes the key, when `None`) only if the stored
    /// item's version is still `version` (0: no item, or one without a
    /// version, as Panther writes them). False when someone changed it first.
    pub(super) fn put_if_version(&self, key: &str, item: Option<Item>, version: Option<i64>) -> Result<bool> {
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
        // A failed condition is billed too (the answer does not say how much).
        let estimate = item.as_ref().map_or(1.0, |it| capacity::write_units(capacity::item_size(it)));
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
                            .return_consumed_capacity(ReturnConsumedCapacity::Total)
                            .send()
                    },
                    never,
                ))
                .map(|out| capacity::reported(out.consumed_capacity())),
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
                            .return_consumed_capacity(ReturnConsumedCapacity::Total)
                            .send()
                    },
                    never,
                ))
                .map(|out| capacity::reported(out.consumed_capacity())),
        };
        match sent {
            Ok(reported) => {
                capacity::count(operation, reported, || estimate);
                Ok(true)
            }
            Err(f) if f.code == "ConditionalCheckFailedException" => {
                capacity::count(operation, None, || estimate);
                Ok(false)
            }
            Err(f) => Err(f.into_error(operation, &self.table, Some(key))),
        }
    }

    /// Puts the items in one transaction, each on its condition.
    pub(super) fn transact_put(&self, items: Vec<(Item, Option<CommitCondition>)>) -> Result<()> {
        let sizes: Vec<usize> = items.iter().map(|(item, _)| capacity::item_size(item)).collect();
        let mut writes = Vec::new();
        for (item, condition) in items {
            let (expression, names, values) = condition_parts(condition.as_ref());
            let put = Put::builder()
                .table_name(&self.table)
                .set_item(Some(item))
                .set_condition_expression(expression)
                .set_expression_attribute_names(names)
                .set_expression_attribute_values(values)
                .build()
                .map_err(|e| backend(e.to_string()))?;
            writes.push(TransactWriteItem::builder().put(put).build());
        }
        let out = self
            .rt
            .block_on(send(
                &self.limits,
                "TransactWriteItems",
                || {
                    self.client
                        .transact_write_items()
                        .set_transact_items(Some(writes.clone()))
                        .return_consumed_capacity(ReturnConsumedCapacity::Total)
                        .send()
                },
                transaction_transient,
            ))
            .map_err(|f| f.into_error("TransactWriteItems", &self.table, None))?;
        // A write in a transaction costs twice its units.
        capacity::count("TransactWriteItems", capacity::reported(out.consumed_capacity()), || {
            sizes.iter().map(|&bytes| 2.0 * capacity::write_units(bytes)).sum()
        });
        Ok(())
    }

    /// Every item a strongly consistent Scan returns, page after page;
    /// `shape` adds the filter or projection to each page's request.
    pub(super) fn scan_all(&self, shape: impl Fn(ScanFluentBuilder) -> ScanFluentBuilder) -> Result<Vec<Item>> {
        self.rt.block_on(async {
            let mut items = Vec::new();
            let mut start: Option<Item> = None;
            loop {
                let out = send(
                    &self.limits,
                    "Scan",
                    || {
                        let req = self
                            .client
                            .scan()
                            .table_name(&self.table)
                            .consistent_read(true)
                            .return_consumed_capacity(ReturnConsumedCapacity::Total);
                        shape(req).set_exclusive_start_key(start.clone()).send()
                    },
                    never,
                )
                .await
                .map_err(|f| f.into_error("Scan", &self.table, None))?;
                let page = out.items.unwrap_or_default();
                capacity::count("Scan", capacity::reported(out.consumed_capacity.as_ref()), || {
                    capacity::scan_units(&page)
                });
                start = out.last_evaluated_key.filter(|k| !k.is_empty());
                items.extend(page);
                if start.is_none() {
                    return Ok(items);
                }
            }
        })
    }
}
