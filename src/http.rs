//! The one HTTP server of a running riskd: `/metrics` (every metric of
//! [`crate::telemetry`]), `/healthz`, `/readyz` (the [`Health`] reasons)
//! and the read-only API's `/v1` routes.

use crate::api::{self, Api};
use crate::telemetry::{metrics, Health};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::task::JoinHandle;

async fn metrics_handler() -> impl IntoResponse {
    ([("content-type", "text/plain; version=0.0.4")], metrics().render())
}

async fn healthz() -> impl IntoResponse {
    "ok\n"
}

async fn readyz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    match health.readiness() {
        (true, _) => (StatusCode::OK, "ready\n".to_string()),
        (false, reasons) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", reasons.join("; "))),
    }
}

/// Serves `/metrics`, `/healthz`, `/readyz` and the read-only API on
/// `addr` until the returned task is aborted. Binding errors are returned at once.
pub async fn serve(addr: SocketAddr, health: Arc<Health>, api: Arc<Api>) -> std::io::Result<JoinHandle<()>> {
    let app = axum::Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(health)
        .merge(api::routes(api));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "telemetry endpoint stopped");
        }
    }))
}
