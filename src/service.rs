//! The long-running process: `riskd run` and `riskd route` as services. A
//! job runs on a blocking thread until its input ends or a signal asks it
//! to stop ([`Shutdown`]); meanwhile the HTTP endpoint serves metrics,
//! health and the API, and reloads of the rules reach the job.

use crate::api::{Api, TOKEN_ENV};
use crate::config::Config;
use crate::pipeline::{run_with_store, RunError, RunOptions, Summary};
use crate::route::{self, RouteSummary};
use crate::scoring::Leaderboard;
use crate::shutdown::Shutdown;
use crate::state::open_store;
use crate::telemetry::Health;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

/// Completes on SIGINT or SIGTERM.
pub async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Runs the main job until the input ends or `shutdown` completes (then it
/// stops between events, flushes and returns). Serves `/metrics`,
/// `/healthz`, `/readyz` and the API meanwhile when the config names an
/// address.
pub async fn run(cfg: Config, opts: RunOptions, shutdown: impl Future<Output = ()>) -> Result<Summary, RunError> {
    let health = Health::new();
    let token = std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty());
    let api = Api::new(token.clone());
    let server = match cfg.listen {
        Some(addr) => {
            if !addr.ip().is_loopback() && token.is_none() {
                return Err(RunError::Config(format!(
                    "telemetry.listen {addr} is not a loopback address: set {TOKEN_ENV} to a bearer token for the API"
                )));
            }
            Some(serve_http(addr, &health, &api).await?)
        }
        None => None,
    };
    let mut opts = opts;
    let _reloader = if opts.watch {
        let (tx, rx) = std::sync::mpsc::channel::<Config>();
        let (to_job, for_job) = std::sync::mpsc::channel();
        opts.reloads = Some(for_job);
        // The API explains entities with the reloaded rules too.
        let api = Arc::clone(&api);
        std::thread::spawn(move || {
            for cfg in rx {
                api.set_rules(Arc::clone(&cfg.rules), Arc::new(cfg.scoring.clone()));
                if to_job.send(cfg).is_err() {
                    break;
                }
            }
        });
        let watched = cfg.rule_paths.iter().chain(&cfg.sigma_paths).cloned().collect();
        Some(crate::reload::spawn(cfg.path.clone(), watched, tx))
    } else {
        None
    };
    let serving = cfg.listen.is_some();
    let job = move |stop: Shutdown| {
        let mut store = open_store(&cfg.store)?;
        // Served: the API reads through a handle of its own, and the
        // leaderboard is filled from the store once, then kept current by
        // the job's writes.
        if let (true, Some(reader), Some(scan)) = (serving, store.reader(), store.reader()) {
            let scoring = Arc::new(cfg.scoring.clone());
            let board = Leaderboard::new(Arc::clone(&scoring));
            board.fill(scan);
            api.ready(reader, Arc::clone(&cfg.rules), scoring, board.clone());
            store = Box::new(board.ranking(store));
        }
        run_with_store(cfg, opts, store, stop, health)
    };
    until_shutdown(job, shutdown, "finishing the current event and flushing", server).await
}

/// Runs the router until `shutdown` completes, serving `/metrics`,
/// `/healthz` and `/readyz` meanwhile when the config names an address.
pub async fn route(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<RouteSummary, RunError> {
    let health = Health::new();
    health.rules_loaded();
    let server = match cfg.listen {
        Some(addr) => Some(serve_http(addr, &health, &Api::new(None)).await?),
        None => None,
    };
    let job = move |stop: Shutdown| route::run(&cfg, &stop, &health);
    until_shutdown(job, shutdown, "flushing what was routed and committing", server).await
}

/// Serves `/metrics`, `/healthz`, `/readyz` and the API on `addr`.
async fn serve_http(
    addr: SocketAddr,
    health: &Arc<Health>,
    api: &Arc<Api>,
) -> Result<tokio::task::JoinHandle<()>, RunError> {
    crate::http::serve(addr, Arc::clone(health), Arc::clone(api)).await.map_err(|source| RunError::Open {
        what: "telemetry endpoint",
        path: addr.to_string(),
        source,
    })
}

/// Runs `job` on a blocking thread until it returns, or until `shutdown`
/// completes: then it triggers the [`Shutdown`] `job` was given (logging
/// what `stopping` does) and waits for it. Stops `server` afterwards.
async fn until_shutdown<T: Send + 'static>(
    job: impl FnOnce(Shutdown) -> Result<T, RunError> + Send + 'static,
    shutdown: impl Future<Output = ()>,
    stopping: &str,
    server: Option<tokio::task::JoinHandle<()>>,
) -> Result<T, RunError> {
    let stop = Shutdown::new();
    let for_job = stop.clone();
    let mut task = tokio::task::spawn_blocking(move || job(for_job));
    let joined = tokio::select! {
        r = &mut task => r,
        () = shutdown => {
            tracing::info!("shutting down: {stopping}");
            stop.trigger();
            task.await
        }
    };
    if let Some(server) = server {
        server.abort();
    }
    joined.map_err(|e| RunError::Task(e.to_string()))?
}
