//! riskd following a file (`source.follow = true`) with telemetry on, for
//! tests that disturb it while it runs and watch `/readyz` and `/metrics`.

use super::{free_port, http_get, riskd, riskd_command, root, wait_for, write_config_with_store, Guard};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The sum of the samples of metric `name` whose labels include every
/// `labels` pair, in a Prometheus text exposition (0 when none).
pub fn metric_sum(exposition: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    exposition
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (set, value) = match rest.strip_prefix('{') {
                Some(r) => r.split_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            let all = labels.iter().all(|(k, v)| set.split(',').any(|p| p == format!("{k}={v:?}")));
            all.then(|| value.trim().parse::<f64>().ok())?
        })
        .sum()
}

/// riskd following `input` (its first lines already written) with `store`
/// as its `[store]` section, serving telemetry on `port`.
pub struct Following {
    pub riskd: Guard,
    pub port: u16,
    pub input: PathBuf,
    pub config: PathBuf,
}

impl Following {
    /// Writes `first` as the input and a config into `dir`, sets the store
    /// up (`riskd store init`), starts riskd and waits until it is ready and
    /// has counted the first lines.
    pub fn start(dir: &Path, first: &[String], store: &str) -> Self {
        let input = dir.join("events.jsonl");
        std::fs::write(&input, first.join("\n") + "\n").unwrap();
        let port = free_port();
        let config = write_config_with_store(dir, &input, &root().join("config/rules"), "follow = true", store);
        let text = std::fs::read_to_string(&config)
            .unwrap()
            .replace("listen = \"\"", &format!("listen = \"127.0.0.1:{port}\""));
        std::fs::write(&config, text).unwrap();
        let c = config.display().to_string();
        let out = riskd(&["store", "init", "--config", &c]);
        assert!(out.status.success(), "riskd store init: {}", String::from_utf8_lossy(&out.stderr));
        let child =
            riskd_command(&["run", "--config", &c]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let following = Following { riskd: Guard(child), port, input, config };
        wait_for("riskd ready", Duration::from_secs(30), || following.ready() == Some(true));
        wait_for("the first events", Duration::from_secs(30), || following.counted() >= first.len() as f64);
        following
    }

    /// Stops riskd (SIGTERM), runs `between`, and starts it again on the
    /// same config and port, without waiting for it to get ready; returns
    /// what the stopped one wrote to stderr.
    pub fn restart(&mut self, between: impl FnOnce()) -> String {
        let pid = self.riskd.0.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        wait_for("riskd to stop", Duration::from_secs(30), || self.riskd.0.try_wait().ok().flatten().is_some());
        let stderr = self.stderr();
        between();
        let c = self.config.display().to_string();
        let child =
            riskd_command(&["run", "--config", &c]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        self.riskd = Guard(child);
        stderr
    }

    /// `/readyz`: status and body, `None` when nothing answers.
    pub fn readyz(&self) -> Option<(u16, String)> {
        http_get(&format!("http://127.0.0.1:{}/readyz", self.port), None)
    }

    pub fn ready(&self) -> Option<bool> {
        self.readyz().map(|(status, _)| status == 200)
    }

    /// `/metrics` (empty when nothing answers).
    pub fn metrics(&self) -> String {
        http_get(&format!("http://127.0.0.1:{}/metrics", self.port), None).map(|(_, body)| body).unwrap_or_default()
    }

    /// Events applied so far: `riskd_events_total{outcome="ok",source="file"}`.
    pub fn counted(&self) -> f64 {
        metric_sum(&self.metrics(), "riskd_events_total", &[("outcome", "ok"), ("source", "file")])
    }

    /// Store faults the job retried: `riskd_faults_total{component="store",outcome="retried"}`, all kinds.
    pub fn store_faults_retried(&self) -> f64 {
        metric_sum(&self.metrics(), "riskd_faults_total", &[("component", "store"), ("outcome", "retried")])
    }

    /// Appends lines to the input.
    pub fn append(&self, lines: &[String]) {
        append(&self.input, lines);
    }

    pub fn running(&mut self) -> bool {
        self.riskd.0.try_wait().unwrap().is_none()
    }

    /// What riskd wrote to stderr (once it has exited).
    pub fn stderr(&mut self) -> String {
        let mut stderr = String::new();
        if let Some(mut pipe) = self.riskd.0.stderr.take() {
            std::io::Read::read_to_string(&mut pipe, &mut stderr).unwrap();
        }
        stderr
    }

    /// SIGTERM; asserts riskd exits 0 and returns what it wrote to stderr
    /// (its summary last).
    pub fn stop(mut self) -> String {
        let pid = self.riskd.0.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let mut status = None;
        wait_for("riskd to stop", Duration::from_secs(30), || {
            status = self.riskd.0.try_wait().ok().flatten();
            status.is_some()
        });
        let stderr = self.stderr();
        assert!(status.is_some_and(|s| s.success()), "riskd exited with {status:?} on SIGTERM: {stderr}");
        stderr
    }
}

/// Appends lines to a file.
pub fn append(path: &Path, lines: &[String]) {
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, (lines.join("\n") + "\n").as_bytes()))
        .unwrap();
}
