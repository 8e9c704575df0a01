//! Live reload. On SIGHUP, and when the config file or a rule file changes,
//! the config is loaded and validated again. A valid config is handed to the
//! running job, which swaps its rules and scoring in between events (see
//! `Engine::set_rules`); an invalid one is rejected whole — logged and
//! counted — and the running config stays. Other settings (source, sink,
//! store, telemetry) take effect at the next start.

use crate::config::Config;
use crate::telemetry::metrics;
use notify::{RecursiveMode, Watcher};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::time::Duration;

/// Keeps the file watcher and the reload task alive; dropping it stops both.
pub struct Reloader {
    _watcher: Option<notify::RecommendedWatcher>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Reloader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn is_rule_file(p: &Path) -> bool {
    p.extension().is_some_and(|x| x == "yaml" || x == "yml")
}

/// Watches `config_path` and `rule_paths`, listens for SIGHUP, and sends
/// every valid reloaded config to `tx`.
// One function: the watcher, the signal and the debounce loop share the
// channel and the runtime they are built on, and read best together.
pub fn spawn(config_path: PathBuf, rule_paths: Vec<PathBuf>, tx: Sender<Config>) -> Reloader {
    let (changed_tx, mut changed) = tokio::sync::mpsc::channel::<()>(16);
    let config_file = std::path::absolute(&config_path).unwrap_or_else(|_| config_path.clone());
    let rule_roots: Vec<PathBuf> =
        rule_paths.iter().map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone())).collect();
    let (file, roots) = (config_file.clone(), rule_roots.clone());
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else { return };
        if event.kind.is_access() {
            return;
        }
        let relevant =
            event.paths.iter().any(|p| p == &file || (is_rule_file(p) && roots.iter().any(|r| p.starts_with(r))));
        if relevant {
            let _ = changed_tx.try_send(());
        }
    });
    let watcher = match watcher {
        Ok(mut w) => {
            // Folders rather than files: editors often replace a file by renaming.
            let mut dirs: Vec<PathBuf> =
                rule_roots.iter().map(|r| if r.is_dir() { r.clone() } else { parent(r) }).collect();
            dirs.push(parent(&config_file));
            dirs.sort();
            dirs.dedup();
            for d in dirs {
                if let Err(e) = w.watch(&d, RecursiveMode::Recursive) {
                    tracing::warn!(dir = %d.display(), error = %e, "cannot watch for config changes (SIGHUP still reloads)");
                }
            }
            Some(w)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch for config changes (SIGHUP still reloads)");
            None
        }
    };
    let task = tokio::spawn(async move {
        #[cfg(unix)]
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP");
                None
            }
        };
        loop {
            #[cfg(unix)]
            let hup_recv = async {
                match hup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let hup_recv = std::future::pending::<Option<()>>();
            tokio::select! {
                _ = hup_recv => tracing::info!("SIGHUP: reloading the config"),
                got = changed.recv() => {
                    if got.is_none() {
                        break;
                    }
                    // Let a burst of writes settle, then reload once.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    while changed.try_recv().is_ok() {}
                    tracing::info!("config files changed: reloading");
                }
            }
            let path = config_path.clone();
            let loaded = tokio::task::spawn_blocking(move || Config::load(&path)).await;
            match loaded {
                Ok(Ok(cfg)) => {
                    if tx.send(cfg).is_err() {
                        break;
                    }
                    // Counted once handed over: the job applies it before its next line.
                    metrics().config_reloads.with_label_values(&["ok"]).inc();
                }
                Ok(Err(errors)) => {
                    metrics().config_reloads.with_label_values(&["error"]).inc();
                    tracing::error!(errors = %errors, "config reload rejected; the running config stays");
                }
                Err(e) => tracing::error!(error = %e, "config reload failed"),
            }
        }
    });
    Reloader { _watcher: watcher, task }
}

fn parent(p: &Path) -> PathBuf {
    p.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}
