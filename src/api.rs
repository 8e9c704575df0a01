//! The read-only HTTP API, served beside `/metrics`:
//! - `GET /v1/entities/{type}/{id}`: the entity's score, contributions,
//!   armed state and every rule's state for it (as `riskd entity --json`);
//! - `GET /v1/state/{key}`: one key's values, expiry and liveness.
//!
//! It reads the store through its own handle, so it shows state as of the
//! last flush (at most `flush_interval` old). On loopback it is open; bound
//! to any other address, riskd refuses to start unless a bearer token is set
//! in the environment, and every `/v1` request must carry it.

use crate::alert::EntityRef;
use crate::rules::Rule;
use crate::scoring::{Explanation, ScoringConfig};
use crate::state::Store;
use axum::extract::{Path, State};
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
}

impl Api {
    /// An API that answers 503 until [`Api::ready`]; `token` is required of
    /// every request when set.
    pub fn new(token: Option<String>) -> Arc<Self> {
        Arc::new(Self { token, inner: OnceLock::new() })
    }

    /// Starts answering from `store` (a reader handle) with these rules.
    pub fn ready(&self, store: Box<dyn Store>, rules: Arc<Vec<Rule>>, scoring: Arc<ScoringConfig>) {
        let _ = self.inner.set(Inner { store: Mutex::new(store), rules: Mutex::new((rules, scoring)) });
    }

    /// Explains entities with reloaded rules from now on.
    pub fn set_rules(&self, rules: Arc<Vec<Rule>>, scoring: Arc<ScoringConfig>) {
        if let Some(inner) = self.inner.get() {
            if let Ok(mut r) = inner.rules.lock() {
                *r = (rules, scoring);
            }
        }
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        match &self.token {
            None => true,
            Some(token) => headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .is_some_and(|t| t.as_bytes() == token.as_bytes()),
        }
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

async fn answer<T: serde::Serialize + Send + 'static>(
    api: Arc<Api>,
    headers: HeaderMap,
    f: fn(&Inner, Vec<String>) -> Result<T, Refusal>,
    args: Vec<String>,
) -> Response {
    if !api.authorized(&headers) {
        return respond(error(StatusCode::UNAUTHORIZED, format!("a bearer token ({TOKEN_ENV}) is required")));
    }
    let result = tokio::task::spawn_blocking(move || match api.inner.get() {
        None => {
            Err(error(StatusCode::SERVICE_UNAVAILABLE, "the store is not open yet, or cannot be shared (memory store)"))
        }
        Some(inner) => f(inner, args),
    })
    .await;
    match result {
        Ok(Ok(v)) => axum::Json(v).into_response(),
        Ok(Err(r)) => respond(r),
        Err(e) => respond(error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

fn entity(inner: &Inner, args: Vec<String>) -> Result<Explanation, Refusal> {
    let store = inner.store.lock().map_err(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "store handle poisoned"))?;
    let entity = EntityRef { type_: args[0].clone(), id: args[1].clone() };
    let (rules, scoring) =
        inner.rules.lock().map_err(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "rules poisoned"))?.clone();
    match crate::scoring::explain_entity(&rules, &scoring, store.as_ref(), &entity, None) {
        Ok(Some(x)) => Ok(x),
        Ok(None) => Err(error(StatusCode::NOT_FOUND, crate::scoring::no_state(&rules, &entity))),
        Err(e) => Err(error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
    }
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

/// The `/v1` routes.
pub fn routes(api: Arc<Api>) -> axum::Router {
    axum::Router::new()
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
