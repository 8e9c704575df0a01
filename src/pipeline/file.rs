//! The main job reading a file or stdin: lines in order, a checkpoint
//! (byte offset and line) committed with the state, a progress bar on a
//! terminal.

use super::job::{Job, JobSource, Origin, Settings};
use super::order::Reorder;
use super::outputs::{absolute, Outputs};
use super::retry::RetryPolicy;
use super::{io_err, open_err, RunError, RunOptions, Summary};
use crate::config::{Config, Stream};
use crate::event::{now_ms, Event, TimeSource};
use crate::shutdown::Shutdown;
use crate::source::{decode, Decoded, JsonLines, LineInfo};
use crate::state::Store;
use crate::telemetry::{metrics, Health};
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
    // The store may be down at start: its checkpoint is waited for like
    // any transient fault (not ready, with the reason), not a reason to stop.
    let policy = RetryPolicy { shutdown: shutdown.clone(), deadline: None, health: Arc::clone(&health) };
    let found = match &id {
        Some(id) => policy.run("load checkpoint", || Ok(store.checkpoint(id)?))?,
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

/// A line read, held for ordering until its event time is released.
struct Held {
    /// Where the line starts, its number, and the latest trusted time
    /// before it (where a restart reads it again from).
    before: (u64, u64, Option<i64>),
    info: LineInfo,
    raw: Vec<u8>,
    event: Event,
    /// Read after its time was released.
    late: bool,
}

/// The reading side of a run: where it stands in the input, and the events
/// held for ordering.
struct Reading {
    name: String,
    order: Reorder<Held>,
    /// A resumed run reads again from the oldest event held at the last
    /// commit; up to here, only the events held then are new.
    reread_to: u64,
    /// The released time of the last commit.
    released: Option<i64>,
    /// Where the last line read ends, and its number.
    last: (u64, u64),
    buf: Vec<u8>,
    /// How a failing read is retried.
    read_input: RetryPolicy,
}

impl Reading {
    fn new(job: &Job, settings: &Settings) -> Self {
        let start = job.position();
        Self {
            name: job.source_name().to_string(),
            order: Reorder::new(settings.event_time.max_delay(), start.released_ms),
            reread_to: start.read.map_or(start.offset, |(offset, _)| offset),
            released: start.released_ms,
            last: (start.offset, start.line),
            buf: Vec::new(),
            read_input: job.retry_policy(),
        }
    }

    /// Reads one line: an event is held, or put in `ready` when its time is
    /// released (or it has none). False at the end of the input.
    fn line(
        &mut self,
        job: &mut Job,
        reader: &mut JsonLines,
        settings: &Settings,
        ready: &mut Vec<Held>,
    ) -> Result<bool, RunError> {
        let buf = &mut self.buf;
        // A read that fails (an I/O error, say) is retried like a failing
        // store: the reader goes on where the failed read left it.
        let next = self.read_input.run("read input", || {
            let next = if settings.follow { reader.next_complete_line(buf) } else { reader.next_line(buf) };
            next.map_err(io_err("input", &self.name))
        });
        let Some(info) = next? else { return Ok(false) };
        let before = (self.last.0, self.last.1, job.trusted_time());
        self.last = (info.end_offset, info.line);
        self.order.freeze(self.last.0 < self.reread_to);
        let ingest = now_ms();
        let decoded = decode(buf, &info, settings.max_line_bytes, &settings.event_time, ingest);
        let event = if info.end_offset <= self.reread_to {
            match decoded {
                Decoded::Event(mut event) => {
                    job.reread(&mut event);
                    // Applied before the restart: at or before the released
                    // time, or with no time of its own (applied as read).
                    let applied =
                        event.time_source == TimeSource::Ingest || self.released.is_some_and(|r| event.time_ms <= r);
                    (!applied).then_some(event)
                }
                // Counted and set aside before the restart.
                _ => None,
            }
        } else {
            job.admit(&Origin { source: &self.name, line: info.line }, buf, decoded, ingest)?
        };
        let Some(event) = event else { return Ok(true) };
        // One allocation of the line's size: the read buffer keeps its capacity.
        let (time, source) = (event.time_ms, event.time_source);
        let held = Held { before, info, raw: buf.clone(), event, late: false };
        if self.order.take_into(time, source, held, Instant::now(), ready) {
            if let Some(item) = ready.last_mut() {
                job.late(&Origin { source: &self.name, line: item.info.line });
                item.late = true;
            }
        }
        Ok(true)
    }

    /// Still reading again what the last run held: nothing is released
    /// meanwhile, so the checkpoint it left stays exact until then.
    fn rereading(&self) -> bool {
        self.last.0 < self.reread_to
    }

    /// Moves the events now due to `ready`.
    fn release(&mut self, ready: &mut Vec<Held>) {
        while let Some(item) = self.order.pop(Instant::now()) {
            ready.push(item);
        }
    }
}

/// Reads, decodes and applies lines, `ahead` at a time, in event-time order
/// within `event_time.max_delay`, flushing as the settings say, until the
/// input ends (or, following, until shutdown).
fn pump(
    job: &mut Job,
    reader: &mut JsonLines,
    settings: &Settings,
    ahead: usize,
    progress: &Progress,
    shutdown: &Shutdown,
) -> Result<(), RunError> {
    let mut reading = Reading::new(job, settings);
    let mut ready: Vec<Held> = Vec::with_capacity(ahead);
    let mut since_flush = 0u64;
    let mut pace = settings.pace();
    let mut lines = 0u64;
    while !shutdown.is_triggered() {
        // A reloaded config is swapped in before the next lines (a channel poll: cheap).
        job.reload(&mut [])?;
        let mut read = 0;
        while read < ahead && reading.line(job, reader, settings, &mut ready)? {
            read += 1;
        }
        lines += read as u64;
        let ended = read == 0;
        if ended && !settings.follow {
            break;
        }
        reading.release(&mut ready);
        if ahead > 1 && !ready.is_empty() {
            let events: Vec<(&Event, _)> = ready.iter().map(|h| (&h.event, None)).collect();
            job.prefetch(&events)?;
        }
        if read == 0 {
            // Events released by wall clock while no line came: flushed too.
            since_flush += ready.len() as u64;
        }
        for h in ready.drain(..) {
            job.apply(&Origin { source: &reading.name, line: h.info.line }, &h.raw, &h.event, h.late)?;
        }
        since_flush += read as u64;
        // The clock is read every 1024 lines only (and when idle): cheap, and often enough.
        let tick = ended || lines % 1024 == 0;
        if tick {
            metrics().events_held.set(reading.order.len() as i64);
            if let Some(released) = reading.order.released() {
                metrics().watermark_lag.set((now_ms() - released) as f64 / 1000.0);
            }
            job.main().publish_metrics();
            progress.update(job.summary(), reading.last.0);
        }
        // Alerts and dead letters wait in memory until a flush: flush early
        // when they grow large.
        let due = since_flush > 0
            && (pace.due_by_events(since_flush)
                || job.outputs_over_bounds()
                || (tick && (pace.due(Instant::now(), since_flush) || job.main().cache.over_bounds())));
        if due {
            hold_position(job, &reading);
            job.flush(&[])?;
            since_flush = 0;
            pace.flushed_now();
        }
        if ended {
            // Following a file: wait for more lines.
            shutdown.sleep(Duration::from_millis(200));
        }
    }
    // The input has ended, or riskd stops cleanly: the events held are
    // applied now (a restart then finds nothing held). Only a stop while
    // still reading again what the last run held leaves them to the next.
    if !reading.rereading() {
        while let Some(h) = reading.order.pop_any() {
            job.apply(&Origin { source: &reading.name, line: h.info.line }, &h.raw, &h.event, h.late)?;
        }
    }
    hold_position(job, &reading);
    Ok(())
}

/// Sets the job's position from what is held (see [`Job::hold_position`]).
fn hold_position(job: &mut Job, reading: &Reading) {
    if reading.rereading() {
        // Nothing was released since the restart: its checkpoint stands.
        return;
    }
    let oldest = reading.order.items().map(|h| h.before).min_by_key(|b| b.0);
    let before = oldest.unwrap_or((reading.last.0, reading.last.1, job.trusted_time()));
    job.hold_position(before, reading.last, reading.order.released());
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
