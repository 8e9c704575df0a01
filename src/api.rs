//! The read-only HTTP API, served beside `/metrics`:
//! - `GET /v1/entities?type=&top=&min_score=`: the riskiest entities
//!   (as `riskd entities --json`), from the job's leaderboard;
//! - `GET /v1/entities/{type}/{id}`: the entity's score, contributions,
//!   armed state and every rule's state for it (as `riskd entity --json`);
//! - `GET /v1/state/{key}`: one key's values, expiry and liveness.
//!
//! and the analyst's pages (`/`, `/entity/{type}/{id}`: see [`crate::web`]).
//!
//! It reads the store through its own handle, so it shows state as of the
//! last flush (at most `flush_interval` old). On loopback it is open; bound
//! to any other address, riskd refuses to start unless a bearer token is set
//! in the environment, and every `/v1` request must carry it.

use crate::alert::EntityRef;
use crate::rules::Rule;
use crate::scoring::{Explanation, Leaderboard, Listing, ScoringConfig};
use crate::state::Store;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use std::sync::{Arc, Mutex, OnceLock};

/// Environment variable holding the API's bearer token.
pub const TOKEN_ENV: &str = "RISKD_API_TOKEN";

/// What the API reads, set once the job has opened its store.
pub struct Api {
    token: Option<String>,
    inner: OnceLock<Inner>,
}

struct Inner {
    // std Mutex: held only inside spawn_blocking, never across an await.
    store: Mutex<Box<dyn Store>>,
    /// The rules and scoring in force: replaced on a reload.
    rules: Mutex<(Arc<Vec<Rule>>, Arc<ScoringConfig>)>,
    /// Who is riskiest, kept current by the job's store.
    board: Leaderboard,
}

impl Api {
    /// An API that answers 503 until [`Api::ready`]; `token` is required of
    /// every request when set.
    pub fn new(token: Option<String>) -> Arc<Self> {
        Arc::new(Self { token, inner: OnceLock::new() })
    }

    /// Starts answering from `store` (a reader handle) with these rules
    /// and the job's `board`.
    pub fn ready(&self, store: Box<dyn Store>, rules: Arc<Vec<Rule>>, scoring: Arc<ScoringConfig>, board: Leaderboard) {
        let _ = self.inner.set(Inner { store: Mutex::new(store), rules: Mutex::new((rules, scoring)), board });
    }

    /// Explains and ranks entities with reloaded rules from now on.
    pub fn set_rules(&self, rules: Arc<Vec<Rule>>, scoring: Arc<ScoringConfig>) {
        if let Some(inner) = self.inner.get() {
            let reader = inner.store.lock().ok().and_then(|s| s.reader());
            inner.board.set_scoring(Arc::clone(&scoring), reader);
            if let Ok(mut r) = inner.rules.lock() {
                *r = (rules, scoring);
            }
        }
    }

    /// The token as `Authorization: Bearer <token>`, or for a browser as
    /// HTTP Basic credentials whose password is the token (any user name).
    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(token) = &self.token else { return true };
        let Some(value) = headers.get("authorization").and_then(|v| v.to_str().ok()) else { return false };
        if let Some(t) = value.strip_prefix("Bearer ") {
            return t.as_bytes() == token.as_bytes();
        }
        use base64::Engine as _;
        value
            .strip_prefix("Basic ")
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b.trim()).ok())
            .and_then(|d| String::from_utf8(d).ok())
            .and_then(|d| d.split_once(':').map(|(_, password)| password.as_bytes() == token.as_bytes()))
            .unwrap_or(false)
    }
}

/// A refusal: the status and what to say.
type Refusal = (StatusCode, String);

fn error(status: StatusCode, message: impl Into<String>) -> Refusal {
    (status, message.into())
}

fn respond(refusal: Refusal) -> Response {
    (refusal.0, axum::Json(serde_json::json!({ "error": refusal.1 }))).into_response()
}

/// Runs `f` on the blocking pool against the open store; a refusal when
/// the store is not open yet, or when `f` refuses.
async fn read<T: Send + 'static>(
    api: Arc<Api>,
    f: fn(&Inner, Vec<String>) -> Result<T, Refusal>,
    args: Vec<String>,
) -> Result<T, Refusal> {
    let result = tokio::task::spawn_blocking(move || match api.inner.get() {
        None => {
            Err(error(StatusCode::SERVICE_UNAVAILABLE, "the store is not open yet, or cannot be shared (memory store)"))
        }
        Some(inner) => f(inner, args),
    })
    .await;
    result.unwrap_or_else(|e| Err(error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())))
}

async fn answer<T: serde::Serialize + Send + 'static>(
    api: Arc<Api>,
    headers: HeaderMap,
    f: fn(&Inner, Vec<String>) -> Result<T, Refusal>,
    args: Vec<String>,
) -> Response {
    if !api.authorized(&headers) {
        return respond(error(StatusCode::UNAUTHORIZED, format!("a bearer token ({TOKEN_ENV}) is required")));
    }
    match read(api, f, args).await {
        Ok(v) => axum::Json(v).into_response(),
        Err(r) => respond(r),
    }
}

/// `[type, id]`, or `[type, id, at]` with `at` an RFC 3339 time or empty.
fn entity(inner: &Inner, args: Vec<String>) -> Result<Explanation, Refusal> {
    let at = match args.get(2).map(String::as_str).unwrap_or("") {
        "" => None,
        a => Some(
            crate::event::parse_time_ms(&Value::from(a))
                .ok_or_else(|| error(StatusCode::BAD_REQUEST, format!("at must be an RFC 3339 time, got {a:?}")))?,
        ),
    };
    let store = inner.store.lock().map_err(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "store handle poisoned"))?;
    let entity = EntityRef { type_: args[0].clone(), id: args[1].clone() };
    let (rules, scoring) =
        inner.rules.lock().map_err(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "rules poisoned"))?.clone();
    match crate::scoring::explain_entity(&rules, &scoring, store.as_ref(), &entity, at) {
        Ok(Some(x)) => Ok(x),
        Ok(None) => Err(error(StatusCode::NOT_FOUND, crate::scoring::no_state(&rules, &entity))),
        Err(e) => Err(error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
    }
}

/// A page of the web view (see [`crate::web`]), or an error page.
async fn page(
    api: Arc<Api>,
    headers: HeaderMap,
    f: fn(&Inner, Vec<String>) -> Result<String, Refusal>,
    args: Vec<String>,
) -> Response {
    let html = |status: StatusCode, body: String| {
        (status, [("content-type", "text/html; charset=utf-8"), ("x-content-type-options", "nosniff")], body)
            .into_response()
    };
    if !api.authorized(&headers) {
        let mut r = html(StatusCode::UNAUTHORIZED, crate::web::error(401, "the API token is the password"));
        r.headers_mut().insert("www-authenticate", axum::http::HeaderValue::from_static("Basic realm=\"riskd\""));
        return r;
    }
    match read(api, f, args).await {
        Ok(body) => html(StatusCode::OK, body),
        Err((status, message)) => html(status, crate::web::error(status.as_u16(), &message)),
    }
}

fn leaderboard_page(inner: &Inner, args: Vec<String>) -> Result<String, Refusal> {
    let listing = listing(inner, args.clone())?;
    let rules = inner.rules.lock().map_err(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "rules poisoned"))?.0.clone();
    let mut types: Vec<String> = rules.iter().map(|r| r.entity_type.clone()).collect();
    types.sort();
    types.dedup();
    let selected = args.first().filter(|t| !t.is_empty()).map(String::as_str);
    Ok(crate::web::leaderboard(&listing, &types, selected))
}

fn entity_page(inner: &Inner, args: Vec<String>) -> Result<String, Refusal> {
    entity(inner, args).map(|x| crate::web::entity(&x))
}

/// `/entity/…` parameters.
#[derive(Debug, Default, serde::Deserialize)]
pub struct PageQuery {
    at: Option<String>,
}

/// Most entities one listing returns.
pub const MAX_TOP: usize = 1000;

/// `GET /v1/entities` parameters, as `riskd entities` takes them.
#[derive(Debug, Default, serde::Deserialize)]
pub struct ListQuery {
    #[serde(rename = "type")]
    type_: Option<String>,
    top: Option<String>,
    min_score: Option<String>,
}

impl ListQuery {
    /// `[type, top, min_score]`, empty when not given.
    fn args(self) -> Vec<String> {
        [self.type_, self.top, self.min_score].map(Option::unwrap_or_default).to_vec()
    }
}

fn listing(inner: &Inner, args: Vec<String>) -> Result<Listing, Refusal> {
    let bad = |m: String| error(StatusCode::BAD_REQUEST, m);
    let [type_, top, min_score] = <[String; 3]>::try_from(args).map_err(|_| bad("bad arguments".into()))?;
    let top = match top.as_str() {
        "" => 50,
        t => t
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_TOP).contains(n))
            .ok_or_else(|| bad(format!("top must be 1 to {MAX_TOP}, got {t:?}")))?,
    };
    let min_score = match min_score.as_str() {
        "" => 0.0,
        m => m
            .parse::<f64>()
            .ok()
            .filter(|x| x.is_finite())
            .ok_or_else(|| bad(format!("min_score must be a number, got {m:?}")))?,
    };
    let type_ = (!type_.is_empty()).then_some(type_.as_str());
    let store = inner.store.lock().map_err(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "store handle poisoned"))?;
    inner
        .board
        .list(store.as_ref(), (type_, top, min_score))
        .map_err(|e| error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))
}

fn state(inner: &Inner, args: Vec<String>) -> Result<Value, Refusal> {
    let store = inner.store.lock().map_err(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "store handle poisoned"))?;
    let key = &args[0];
    let read = |e: crate::state::StateError| error(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
    let record = store.get_many(&[key.as_str()]).map_err(read)?.pop().flatten();
    if record.is_none() {
        return Err(error(StatusCode::NOT_FOUND, format!("no key {key:?}")));
    }
    let now = crate::state::watermark(store.as_ref()).map_err(read)?;
    Ok(crate::state::describe(key, record.as_ref(), now))
}

/// The `/v1` routes and the pages.
pub fn routes(api: Arc<Api>) -> axum::Router {
    axum::Router::new()
        .route(
            "/",
            axum::routing::get(|State(api): State<Arc<Api>>, Query(q): Query<ListQuery>, headers: HeaderMap| {
                page(api, headers, leaderboard_page, q.args())
            }),
        )
        .route(
            "/entity/{entity_type}/{id}",
            axum::routing::get(
                |State(api): State<Arc<Api>>,
                 Path((t, id)): Path<(String, String)>,
                 Query(q): Query<PageQuery>,
                 headers: HeaderMap| {
                    page(api, headers, entity_page, vec![t, id, q.at.unwrap_or_default()])
                },
            ),
        )
        .route(
            "/v1/entities",
            axum::routing::get(|State(api): State<Arc<Api>>, Query(q): Query<ListQuery>, headers: HeaderMap| {
                answer(api, headers, listing, q.args())
            }),
        )
        .route(
            "/v1/entities/{entity_type}/{id}",
            axum::routing::get(
                |State(api): State<Arc<Api>>, Path((t, id)): Path<(String, String)>, headers: HeaderMap| {
                    answer(api, headers, entity, vec![t, id])
                },
            ),
        )
        .route(
            "/v1/state/{*key}",
            axum::routing::get(|State(api): State<Arc<Api>>, Path(key): Path<String>, headers: HeaderMap| {
                answer(api, headers, state, vec![key])
            }),
        )
        .with_state(api)
}
