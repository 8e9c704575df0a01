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
use crate::source::{decode, Decoded, Decoder, JsonLines, LineInfo};
use crate::state::Store;
use crate::telemetry::{metrics, Health};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// Lines read ahead and decoded together, at most (for a remote store,
/// their state is also loaded in one batch).
const BATCH: usize = 1024;

/// With no line coming, the loop wakes this often (to flush, release held
/// events by wall clock, and notice a stop).
const IDLE: Duration = Duration::from_millis(200);

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
    let (mut job, reader, progress) = start(&cfg, opts, &input, store, shutdown.clone(), health)?;
    let lines = read_ahead(reader, &job, &settings, cfg.decode_threads);
    pump(&mut job, lines, &settings, &progress, &shutdown)?;
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
        }
    }

    /// Takes one line read: its event is held, or put in `ready` when its
    /// time is released (or it has none).
    fn take(&mut self, job: &mut Job, line: Line, now: Instant, ready: &mut Vec<Held>) -> Result<(), RunError> {
        let Line { info, raw, decoded, ingest } = line;
        let before = (self.last.0, self.last.1, job.trusted_time());
        self.last = (info.end_offset, info.line);
        self.order.freeze(self.last.0 < self.reread_to);
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
            job.admit(&Origin { source: &self.name, line: info.line }, &raw, decoded, ingest)?
        };
        let Some(event) = event else { return Ok(()) };
        let (time, source) = (event.time_ms, event.time_source);
        let held = Held { before, info, raw, event, late: false };
        if self.order.take_into(time, source, held, now, ready) {
            if let Some(item) = ready.last_mut() {
                job.late(&Origin { source: &self.name, line: item.info.line });
                item.late = true;
            }
        }
        Ok(())
    }

    /// Still reading again what the last run held: nothing is released
    /// meanwhile, so the checkpoint it left stays exact until then.
    fn rereading(&self) -> bool {
        self.last.0 < self.reread_to
    }

    /// Moves the events due at `now` to `ready`.
    fn release(&mut self, now: Instant, ready: &mut Vec<Held>) {
        while let Some(item) = self.order.pop(now) {
            ready.push(item);
        }
    }
}

/// A line read and decoded by the reading thread.
struct Line {
    info: LineInfo,
    raw: Vec<u8>,
    decoded: Decoded,
    ingest: i64,
}

/// Batches of lines, read and decoded in order, or the error that ended reading.
/// With the channel the applied events go back on, to be dropped by the
/// reading thread (freeing an event costs about a fifth of applying it).
struct Lines {
    batches: Receiver<Result<Vec<Line>, RunError>>,
    spent: Sender<Vec<Held>>,
}

/// Reads lines on a thread of its own and decodes them on `threads`
/// threads, sending them in batches of up to [`BATCH`] — fewer from a pipe
/// or stdin, where a batch ends when nothing more is buffered (no event
/// waits for a writer). The channel closes at the end of the input (never,
/// following a file) or when the receiver is gone.
fn read_ahead(mut reader: JsonLines, job: &Job, settings: &Settings, threads: usize) -> Lines {
    let (tx, rx) = std::sync::mpsc::sync_channel(2);
    let (spent, spent_rx) = std::sync::mpsc::channel::<Vec<Held>>();
    let (decoder, policy, name): (Arc<RwLock<Decoder>>, RetryPolicy, String) =
        (job.shared_decoder(), job.retry_policy(), job.source_name().to_string());
    let (follow, max_line_bytes) = (settings.follow, settings.max_line_bytes);
    let read = move || {
        let mut buf = Vec::new();
        loop {
            while let Ok(applied) = spent_rx.try_recv() {
                drop(applied);
            }
            let mut lines = Vec::new();
            let mut ended = false;
            while lines.len() < BATCH {
                // A read that fails (an I/O error, say) is retried like a
                // failing store: the reader goes on where the failed read left it.
                let next = policy.run("read input", || {
                    let next = if follow { reader.next_complete_line(&mut buf) } else { reader.next_line(&mut buf) };
                    next.map_err(io_err("input", &name))
                });
                match next {
                    // One allocation of the line's size: the read buffer keeps its capacity.
                    Ok(Some(info)) => lines.push((info, buf.clone())),
                    Ok(None) => {
                        ended = true;
                        break;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                }
                if reader.may_wait() {
                    break;
                }
            }
            if !lines.is_empty() {
                let decoder = decoder.read().unwrap_or_else(|p| p.into_inner()).clone();
                let ingest = now_ms();
                let decoded = super::parallel_map(&lines, threads, |(info, raw)| {
                    decode(raw, info, max_line_bytes, &decoder, ingest)
                });
                let batch = lines.into_iter().zip(decoded);
                let batch = batch.map(|((info, raw), decoded)| Line { info, raw, decoded, ingest }).collect();
                if tx.send(Ok(batch)).is_err() {
                    return;
                }
            }
            if ended {
                if !follow || policy.shutdown.is_triggered() {
                    return;
                }
                policy.shutdown.sleep(IDLE);
            }
        }
    };
    // Not joined: a thread reading stdin may wait on it for ever; once the
    // receiver is gone it ends at its next batch.
    if let Err(e) = std::thread::Builder::new().name("riskd-read".into()).spawn(read) {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let _ = tx.send(Err(RunError::Io { what: "input", path: job.source_name().to_string(), source: e }));
        return Lines { batches: rx, spent };
    }
    Lines { batches: rx, spent }
}

/// Applies the lines read, in event-time order within
/// `event_time.max_delay`, flushing as the settings say, until the input
/// ends (or, following, until shutdown).
fn pump(
    job: &mut Job,
    lines: Lines,
    settings: &Settings,
    progress: &Progress,
    shutdown: &Shutdown,
) -> Result<(), RunError> {
    let mut reading = Reading::new(job, settings);
    let mut ready: Vec<Held> = Vec::with_capacity(BATCH);
    let mut since_flush = 0u64;
    let mut pace = settings.pace();
    let batched_reads = job.store().batched_reads();
    while !shutdown.is_triggered() {
        let batch = match lines.batches.recv_timeout(IDLE) {
            Ok(batch) => batch?,
            Err(RecvTimeoutError::Timeout) => Vec::new(),
            Err(RecvTimeoutError::Disconnected) => break,
        };
        // A reloaded config is swapped in before the next lines (a channel
        // poll: cheap); lines decoded for the old rules are taken again.
        job.reload(&mut [])?;
        let idle = batch.is_empty();
        let mut applied = Vec::with_capacity(batch.len());
        // Lines are applied one at a time, or for a remote store a batch at
        // a time (their state loaded in one read); a flush falls between.
        let step = if batched_reads { BATCH } else { 1 };
        let mut batch = batch.into_iter().peekable();
        loop {
            // The wall clock, once per step (not per batch: applying or a
            // flush may wait out a store outage, and an event taken after it
            // must not seem to have waited for `max_delay` already).
            let now = Instant::now();
            let mut read = 0u64;
            for line in batch.by_ref().take(step) {
                reading.take(job, line, now, &mut ready)?;
                read += 1;
            }
            reading.release(now, &mut ready);
            if batched_reads && !ready.is_empty() {
                let events: Vec<(&Event, _)> = ready.iter().map(|h| (&h.event, None)).collect();
                job.prefetch(&events)?;
            }
            // Events released by wall clock while no line came are flushed too.
            since_flush += if idle { ready.len() as u64 } else { read };
            for h in ready.drain(..) {
                job.apply(&Origin { source: &reading.name, line: h.info.line }, &h.raw, &h.event, h.late)?;
                applied.push(h);
            }
            // Alerts and dead letters wait in memory until a flush: flush
            // early when they grow large.
            if since_flush > 0 && (pace.due_by_events(since_flush) || job.outputs_over_bounds()) {
                hold_position(job, &reading);
                job.flush(&[])?;
                since_flush = 0;
                pace.flushed_now();
            }
            if batch.peek().is_none() {
                break;
            }
        }
        // Dropped on the reading thread (here, once it has ended).
        let _ = lines.spent.send(std::mem::take(&mut applied));
        // Once a batch (at most 1024 lines) or idle wake-up: cheap, and often enough.
        {
            metrics().events_held.set(reading.order.len() as i64);
            if let Some(released) = reading.order.released() {
                metrics().watermark_lag.set((now_ms() - released) as f64 / 1000.0);
            }
            job.main().publish_metrics();
            progress.update(job.summary(), reading.last.0);
        }
        if since_flush > 0 && (pace.due(Instant::now(), since_flush) || job.main().cache.over_bounds()) {
            hold_position(job, &reading);
            job.flush(&[])?;
            since_flush = 0;
            pace.flushed_now();
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
