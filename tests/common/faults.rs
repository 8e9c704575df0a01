//! Helpers for fault tests on local resources (they need root): a small
//! tmpfs or a loop-mounted ext4 under a test's folder, filling a file
//! system, and riskd running as a service (following its input, serving
//! `/readyz` and `/metrics`) that a test stops with SIGTERM.

use super::{free_port, http_get, riskd_command, wait_for, Guard};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn sh(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program).args(args).output().map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// A file system mounted at a folder of the test, unmounted when dropped
/// (even when the test panics), after thawing it if frozen.
pub struct Mount {
    pub dir: PathBuf,
    image: Option<PathBuf>,
}

impl Mount {
    /// A tmpfs of `size` (e.g. `"512k"`) at `dir` (created).
    pub fn tmpfs(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let dir_s = dir.display().to_string();
        sh("mount", &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", &dir_s])
            .unwrap_or_else(|e| panic!("mounting a tmpfs needs root: {e}"));
        Mount { dir: dir.to_path_buf(), image: None }
    }

    /// An ext4 file system of `mib` MiB in an image file beside `dir`,
    /// loop-mounted at `dir` (created). Unlike tmpfs it can be frozen
    /// (`fsfreeze`) and it enforces `chattr +i` on files already open.
    pub fn ext4(dir: &Path, mib: u64) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let image = dir.with_extension("img");
        std::fs::File::create(&image).unwrap().set_len(mib << 20).unwrap();
        let image_s = image.display().to_string();
        sh("mkfs.ext4", &["-q", "-F", &image_s]).unwrap_or_else(|e| panic!("{e}"));
        sh("mount", &["-o", "loop", &image_s, &dir.display().to_string()])
            .unwrap_or_else(|e| panic!("loop-mounting ext4 needs root and a free loop device: {e}"));
        Mount { dir: dir.to_path_buf(), image: Some(image) }
    }

    /// Freezes the file system: every write to it blocks until [`thaw`](Self::thaw).
    pub fn freeze(&self) {
        sh("fsfreeze", &["-f", &self.dir.display().to_string()]).unwrap();
    }

    pub fn thaw(&self) {
        sh("fsfreeze", &["-u", &self.dir.display().to_string()]).unwrap();
    }

    /// Fills the file system with `filler` until a write fails (no space
    /// left); returns the filler's path. Removing it makes room again.
    pub fn fill(&self) -> PathBuf {
        let filler = self.dir.join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0xa5u8; 4096];
        loop {
            match f.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(28), "filling {}: {e}", self.dir.display());
                    break;
                }
            }
        }
        let _ = f.sync_all();
        filler
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let dir = self.dir.display().to_string();
        if self.image.is_some() {
            let _ = sh("fsfreeze", &["-u", &dir]);
        }
        // Lazy: a process that still holds a file there cannot keep it mounted.
        if let Err(e) = sh("umount", &[&dir]).or_else(|_| sh("umount", &["-l", &dir])) {
            eprintln!("unmounting {dir}: {e}");
        }
        if let Some(image) = &self.image {
            let _ = std::fs::remove_file(image);
        }
    }
}

/// Replaces `from` with `to` in a config file (once; panics when absent).
pub fn edit_config(config: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(config).unwrap();
    assert!(text.contains(from), "{from:?} not in {}", config.display());
    std::fs::write(config, text.replacen(from, to, 1)).unwrap();
}

/// Lines of a generated stream (`riskd generate`) with a line that is not
/// JSON after every `bad_every` lines (0: none), for dead letters.
pub fn event_lines(events: u64, users: u32, bad_every: usize) -> Vec<String> {
    let out = super::riskd(&[
        "generate",
        "--events",
        &events.to_string(),
        "--users",
        &users.to_string(),
        "--attack-every",
        "50",
    ]);
    assert!(out.status.success());
    let mut lines = Vec::new();
    for (i, l) in String::from_utf8(out.stdout).unwrap().lines().enumerate() {
        lines.push(l.to_string());
        if bad_every > 0 && (i + 1) % bad_every == 0 {
            lines.push(format!("not json, line {}", lines.len() + 1));
        }
    }
    lines
}

/// Appends lines to a file.
pub fn append_lines(path: &Path, lines: &[String]) {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
    f.write_all((lines.join("\n") + "\n").as_bytes()).unwrap();
}

/// The sum of a metric's series whose labels include all of `labels`, from
/// a Prometheus text body.
pub fn metric_sum(body: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// `riskd run` as a service: following its input, serving telemetry on
/// its own port; killed when dropped.
pub struct Service {
    child: Guard,
    pub port: u16,
    /// Its stderr, read as it comes (a pipe left unread would stall riskd's logging).
    stderr: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Service {
    /// Sets `config` (from [`super::write_config`] and friends) to follow its
    /// input with a flush every 200 ms and to serve telemetry (unless done
    /// by an earlier start), starts riskd and waits until it is ready.
    pub fn start(config: &Path) -> Self {
        let text = std::fs::read_to_string(config).unwrap();
        let port = match text.split("listen = \"127.0.0.1:").nth(1) {
            Some(rest) => rest.split('"').next().unwrap().parse().unwrap(),
            None => {
                let port = free_port();
                edit_config(config, "listen = \"\"", &format!("listen = \"127.0.0.1:{port}\""));
                edit_config(config, "[source]\n", "[source]\nfollow = true\n");
                edit_config(config, "[store]\n", "[store]\nflush_interval = \"200ms\"\n");
                port
            }
        };
        let mut child = riskd_command(&["run", "--config", &config.display().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let (pipe, into) = (child.stderr.take().unwrap(), Arc::clone(&stderr));
        let reader = std::thread::spawn(move || {
            for line in std::io::BufRead::lines(std::io::BufReader::new(pipe)) {
                let Ok(line) = line else { break };
                let mut s = into.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let mut service = Service { child: Guard(child), port, stderr, reader: Some(reader) };
        wait_for("riskd to be ready", Duration::from_secs(30), || {
            assert!(service.running(), "riskd exited at start: {}", service.stderr());
            service.ready() == Some(true)
        });
        service
    }

    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    pub fn readyz(&self) -> Option<(u16, String)> {
        http_get(&format!("http://127.0.0.1:{}/readyz", self.port), None)
    }

    pub fn ready(&self) -> Option<bool> {
        self.readyz().map(|(status, _)| status == 200)
    }

    pub fn metrics(&self) -> String {
        http_get(&format!("http://127.0.0.1:{}/metrics", self.port), None).map(|(_, b)| b).unwrap_or_default()
    }

    /// Lines taken so far (`riskd_events_total`, every outcome).
    pub fn events(&self) -> f64 {
        metric_sum(&self.metrics(), "riskd_events_total", &[])
    }

    /// `riskd_faults_total` of a component with outcome `retried`.
    pub fn retried(&self, component: &str) -> f64 {
        metric_sum(&self.metrics(), "riskd_faults_total", &[("component", component), ("outcome", "retried")])
    }

    pub fn running(&mut self) -> bool {
        self.child.0.try_wait().unwrap().is_none()
    }

    /// Waits until `/readyz` answers 503 with a reason containing `reason`;
    /// returns the reasons. Fails if riskd exits meanwhile.
    pub fn wait_not_ready(&mut self, reason: &str, timeout: Duration) -> String {
        let mut body = String::new();
        wait_for(&format!("/readyz to report {reason:?}"), timeout, || {
            assert!(self.running(), "riskd exited instead of riding out the fault: {}", self.stderr());
            match self.readyz() {
                Some((503, b)) if b.contains(reason) => {
                    body = b;
                    true
                }
                _ => false,
            }
        });
        body
    }

    /// Waits until `/readyz` says ready; how long that took.
    pub fn wait_ready(&mut self, timeout: Duration) -> Duration {
        let start = Instant::now();
        wait_for("riskd ready again", timeout, || {
            assert!(self.running(), "riskd exited: {}", self.stderr());
            self.ready() == Some(true)
        });
        start.elapsed()
    }

    /// Waits until riskd has taken `n` lines.
    pub fn wait_events(&mut self, n: usize, timeout: Duration) {
        wait_for(&format!("riskd to take {n} lines"), timeout, || {
            assert!(self.running(), "riskd exited: {}", self.stderr());
            self.events() >= n as f64
        });
    }

    /// Waits until riskd has committed at least `n` times since it started
    /// (`riskd_flushes_total{outcome="ok"}`). Counting from the start, not
    /// from "now": the commit awaited may already have happened.
    pub fn wait_commits(&mut self, n: f64, timeout: Duration) {
        wait_for(&format!("{n} commits"), timeout, || {
            assert!(self.running(), "riskd exited: {}", self.stderr());
            metric_sum(&self.metrics(), "riskd_flushes_total", &[("outcome", "ok")]) >= n
        });
    }

    /// Sends SIGTERM.
    pub fn term(&self) {
        sh("kill", &["-TERM", &self.pid().to_string()]).unwrap();
    }

    /// Waits for riskd to exit; its status and stderr.
    pub fn wait_exit(&mut self, timeout: Duration) -> (ExitStatus, String) {
        let mut status = None;
        wait_for("riskd to exit", timeout, || {
            status = self.child.0.try_wait().unwrap();
            status.is_some()
        });
        (status.unwrap(), self.stderr())
    }

    /// SIGTERM, then the exit status and stderr (the summary last).
    pub fn stop(mut self) -> (ExitStatus, String) {
        self.term();
        self.wait_exit(Duration::from_secs(30))
    }

    /// What riskd wrote to stderr so far (all of it once riskd has exited).
    pub fn stderr(&mut self) -> String {
        if self.child.0.try_wait().ok().flatten().is_some() {
            if let Some(reader) = self.reader.take() {
                let _ = reader.join();
            }
        }
        self.stderr.lock().unwrap().clone()
    }

    /// Threads of riskd in uninterruptible sleep (`D`): blocked in the kernel.
    pub fn blocked_threads(&self) -> usize {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.pid())) else { return 0 };
        tasks
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("stat")).ok())
            .filter(|stat| stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('D')))
            .count()
    }
}

/// The number in `riskd: events read N,` of a summary line.
pub fn summary_read(stderr: &str) -> u64 {
    stderr
        .split("riskd: events read ")
        .nth(1)
        .and_then(|s| s.split(',').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no summary in: {stderr}"))
}

/// Prints the line the fault tests report, from what they observed.
pub fn report(name: &str, resumed: Duration, expected: u64, applied: u64) {
    eprintln!(
        "fault {name}: resumed {:.1} s after the fault cleared, events lost {}, applied twice {}",
        resumed.as_secs_f64(),
        expected.saturating_sub(applied),
        applied.saturating_sub(expected)
    );
}
