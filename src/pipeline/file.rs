//! The main job reading a file or stdin: lines in order, a checkpoint
//! (byte offset and line) committed with the state, a progress bar on a
//! terminal.

use super::job::{Job, JobSource, Origin, Settings};
use super::outputs::{absolute, Outputs};
use super::{io_err, open_err, RunError, RunOptions, Summary};
use crate::config::{Config, Stream};
use crate::event::{now_ms, Event};
use crate::shutdown::Shutdown;
use crate::source::{decode, Decoded, JsonLines, LineInfo};
use crate::state::Store;
use crate::telemetry::Health;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Lines read ahead (and whose state is loaded in one batch) for a remote store.
const READ_AHEAD: usize = 1024;

/// Runs the main job over the configured (or given) file or stdin: to its
/// end, or, following a file, until shutdown.
pub(super) fn run(
    cfg: Config,
    opts: RunOptions,
    store: Box<dyn Store>,
    shutdown: Shutdown,
    health: Arc<Health>,
) -> Result<Summary, RunError> {
    let input = opts.input.clone().unwrap_or(cfg.input.clone());
    let mut settings = Settings::new(&cfg);
    settings.follow &= matches!(input, Stream::File(_));
    let (mut job, mut reader, progress) = start(&cfg, opts, &input, store, shutdown.clone(), health)?;
    // A remote store reads the state of many lines at once: lines are read
    // ahead, decoded, their keys loaded in one batch, then applied in order.
    // Only from a file, where reading ahead never waits on a writer (stdin
    // would hold events back until a whole batch arrived).
    let from_file = matches!(input, Stream::File(_));
    let ahead = if from_file && job.store().batched_reads() { READ_AHEAD } else { 1 };
    pump(&mut job, &mut reader, &settings, ahead, &progress, &shutdown)?;
    job.flush(&[])?;
    progress.finish();
    Ok(job.summary().clone())
}

/// Opens the input at its checkpoint and the outputs at the lengths it
/// records, and sets the job up.
fn start(
    cfg: &Config,
    opts: RunOptions,
    input: &Stream,
    store: Box<dyn Store>,
    shutdown: Shutdown,
    health: Arc<Health>,
) -> Result<(Job, JsonLines, Progress), RunError> {
    let (name, id, kind) = match input {
        Stream::File(p) => (p.display().to_string(), Some(format!("file:{}", absolute(p).display())), "file"),
        Stream::Std => ("stdin".to_string(), None, "stdin"),
    };
    let found = match &id {
        Some(id) => store.checkpoint(id)?,
        None => None,
    };
    let first_run = found.is_none();
    let position = found.unwrap_or_default();
    let outputs = Outputs::open(cfg, &opts, &position)?;
    let reader = match input {
        Stream::File(p) => JsonLines::open_file(p, position.offset, position.line, cfg.max_line_bytes)
            .map_err(open_err("input", &name))?,
        Stream::Std => JsonLines::stdin(cfg.max_line_bytes),
    };
    health.set_source(None);
    if position.line > 0 {
        tracing::info!(source = %name, line = position.line, "resuming after the last checkpoint");
    }
    let progress = Progress::new(input, position.offset);
    let source = JobSource { name, id, kind, position };
    let has_id = source.id.is_some();
    let mut job = Job::new(cfg, opts.reloads, store, outputs, source, (shutdown, health));
    if first_run && has_id {
        // Record where the outputs start before the first event: a crash
        // before the first commit must not leave its alerts in the file.
        job.flush(&[])?;
    }
    Ok((job, reader, progress))
}

/// Reads, decodes and applies lines, `ahead` at a time, flushing as the
/// settings say, until the input ends (or, following, until shutdown).
fn pump(
    job: &mut Job,
    reader: &mut JsonLines,
    settings: &Settings,
    ahead: usize,
    progress: &Progress,
    shutdown: &Shutdown,
) -> Result<(), RunError> {
    let mut buf = Vec::new();
    let mut arena = Vec::new();
    let mut lines: Vec<(LineInfo, std::ops::Range<usize>, Decoded, i64)> = Vec::with_capacity(ahead);
    let mut since_flush = 0u64;
    let mut last_flush = Instant::now();
    let name = job.source_name().to_string();
    // A read that fails (an I/O error, say) is retried like a failing
    // store: the reader goes on where the failed read left it.
    let read_input = job.retry_policy();
    while !shutdown.is_triggered() {
        // A reloaded config is swapped in before the next lines (a channel poll: cheap).
        job.reload(&mut [])?;
        arena.clear();
        while lines.len() < ahead {
            let next = read_input.run("read input", || {
                let next =
                    if settings.follow { reader.next_complete_line(&mut buf) } else { reader.next_line(&mut buf) };
                next.map_err(io_err("input", &name))
            });
            let Some(info) = next? else { break };
            let ingest = now_ms();
            let decoded = decode(&buf, &info, settings.max_line_bytes, &settings.event_time, ingest);
            let start = arena.len();
            arena.extend_from_slice(&buf);
            lines.push((info, start..arena.len(), decoded, ingest));
        }
        if lines.is_empty() {
            if !settings.follow {
                break;
            }
            // Following a file: commit what is pending once the interval is
            // up, then wait for more lines.
            if since_flush > 0 && last_flush.elapsed() >= settings.flush_interval {
                job.flush(&[])?;
                since_flush = 0;
                last_flush = Instant::now();
            }
            progress.update(job.summary(), job.position().offset);
            shutdown.sleep(Duration::from_millis(200));
            continue;
        }
        if ahead > 1 {
            let events: Vec<(&Event, _)> = lines
                .iter()
                .filter_map(|(_, _, d, _)| match d {
                    Decoded::Event(e) => Some((e, None)),
                    _ => None,
                })
                .collect();
            job.prefetch(&events)?;
        }
        for (info, range, decoded, ingest) in lines.drain(..) {
            job.line(&Origin { source: &name, line: info.line }, &arena[range], decoded, ingest)?;
            // Only now is the line applied: the checkpoint may move past it.
            job.advance(info.end_offset, info.line);
            since_flush += 1;
            // The clock is read every 1024 lines only: cheap, and often enough.
            if since_flush % 1024 == 0 {
                job.main().publish_metrics();
                progress.update(job.summary(), job.position().offset);
            }
            // Alerts and dead letters wait in memory until a flush: flush
            // early when they grow large.
            if since_flush >= settings.flush_every_events
                || job.outputs_over_bounds()
                || (since_flush % 1024 == 0
                    && (last_flush.elapsed() >= settings.flush_interval || job.main().cache.over_bounds()))
            {
                job.flush(&[])?;
                since_flush = 0;
                last_flush = Instant::now();
            }
        }
    }
    Ok(())
}

/// A progress bar on a terminal (nothing on a pipe): events/s, alerts, and
/// for a file of known size, how far and how long to go.
struct Progress {
    bar: indicatif::ProgressBar,
}

impl Progress {
    fn new(input: &Stream, offset: u64) -> Self {
        let len = match input {
            Stream::File(p) => std::fs::metadata(p).map(|m| m.len()).ok(),
            Stream::Std => None,
        };
        let target = indicatif::ProgressDrawTarget::stderr_with_hz(4);
        let bar = match len {
            Some(len) => {
                let bar = indicatif::ProgressBar::with_draw_target(Some(len), target);
                bar.set_style(
                    indicatif::ProgressStyle::with_template("{spinner} {bar:30} {bytes}/{total_bytes} {msg} ETA {eta}")
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                bar.set_position(offset);
                bar
            }
            None => indicatif::ProgressBar::with_draw_target(None, target),
        };
        Self { bar }
    }

    fn update(&self, summary: &Summary, offset: u64) {
        if self.bar.is_hidden() {
            return;
        }
        self.bar.set_position(offset);
        let secs = self.bar.elapsed().as_secs_f64().max(1e-3);
        self.bar.set_message(format!(
            "{} events ({:.0}/s), {} alerts",
            summary.read,
            summary.read as f64 / secs,
            summary.alerts
        ));
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
