//! An event: the fields the rules read of a JSON object, its event time,
//! and where it came from. Field paths are compiled once and looked up
//! without allocating; [`Reads`] is every path the rules read.

mod reads;

pub use reads::{parse_line, Reads};

use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};
use serde_json::Value;
use std::fmt;
use std::sync::OnceLock;

/// A compiled field path such as `userIdentity.arn` or `resources[0].ARN`
/// (`resources.0.ARN` works too).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldPath {
    text: String,
    segments: Vec<Segment>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Key(String),
    /// A numeric segment: an array index, or an object key spelled with digits.
    Index(usize, String),
}

/// A field path that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid field path {path:?}: {reason}")]
pub struct PathError {
    /// The path as written.
    pub path: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl FieldPath {
    /// One top-level key, as it is (dots and brackets included).
    pub fn key(name: &str) -> Self {
        Self { text: name.to_string(), segments: vec![Segment::Key(name.to_string())] }
    }

    /// Parses `a.b[0].c`.
    pub fn parse(text: &str) -> Result<Self, PathError> {
        let err = |reason| PathError { path: text.to_string(), reason };
        if text.trim().is_empty() {
            return Err(err("empty"));
        }
        let mut segments = Vec::new();
        for part in text.split('.') {
            let (name, mut rest) = match part.find('[') {
                Some(i) => (&part[..i], &part[i..]),
                None => (part, ""),
            };
            if name.is_empty() && (rest.is_empty() || segments.is_empty()) {
                return Err(err("empty segment"));
            }
            if !name.is_empty() {
                segments.push(match name.parse::<usize>() {
                    Ok(i) => Segment::Index(i, name.to_string()),
                    Err(_) => Segment::Key(name.to_string()),
                });
            }
            while !rest.is_empty() {
                let close = rest.find(']').ok_or_else(|| err("unclosed '['"))?;
                let idx = rest[1..close].parse::<usize>().map_err(|_| err("index in [] is not a number"))?;
                segments.push(Segment::Index(idx, idx.to_string()));
                rest = &rest[close + 1..];
                if !rest.is_empty() && !rest.starts_with('[') {
                    return Err(err("text after ']'"));
                }
            }
        }
        Ok(Self { text: text.to_string(), segments })
    }

    /// The value at this path, if every step exists (JSON `null` counts as absent).
    pub fn lookup<'a>(&self, root: &'a Value) -> Option<&'a Value> {
        let mut v = root;
        for seg in &self.segments {
            v = match (seg, v) {
                (Segment::Key(k), Value::Object(m)) => m.get(k)?,
                (Segment::Index(_, k), Value::Object(m)) => m.get(k)?,
                (Segment::Index(i, _), Value::Array(a)) => a.get(*i)?,
                _ => return None,
            };
        }
        (!v.is_null()).then_some(v)
    }

    /// The path as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A scalar rendered as a string for keys and sets: strings as they are,
/// numbers and booleans in their JSON spelling; objects and arrays are not
/// scalars.
pub fn scalar_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// An id (an entity's, a dedup key) read from a scalar: absent when empty
/// or only white space, so that such events are never keyed under `…/`.
pub fn id_string(v: &Value) -> Option<String> {
    scalar_string(v).filter(|s| !s.trim().is_empty())
}

/// Reads an event time from a JSON value: an RFC 3339 string, Panther's
/// `2024-01-01 00:00:00.000` (UTC), or epoch seconds or milliseconds (a
/// number or a string of digits; values above 10^11 are milliseconds).
pub fn parse_time_ms(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => epoch_to_ms(n.as_f64()?),
        Value::String(s) => {
            let s = s.trim();
            if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
                return Some(dt.timestamp_millis());
            }
            if let Ok(dt) = NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f") {
                return Some(dt.and_utc().timestamp_millis());
            }
            epoch_to_ms(s.parse::<f64>().ok()?)
        }
        _ => None,
    }
}

fn epoch_to_ms(x: f64) -> Option<i64> {
    if !x.is_finite() || x < 0.0 {
        return None;
    }
    let ms = if x >= 1e11 { x } else { x * 1000.0 };
    (ms < 1e15).then_some(ms.round() as i64)
}

/// Event time as RFC 3339 (UTC, milliseconds).
pub fn format_time_ms(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|dt| dt.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_else(|| ms.to_string())
}

/// Milliseconds since the epoch now, by the wall clock (ingest time).
pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// Where in the input an event was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// Source name: a file path, `stdin`, later a topic.
    pub source: String,
    /// 1-based line number.
    pub line: u64,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.source, self.line)
    }
}

/// A decoded event.
#[derive(Debug)]
pub struct Event {
    /// The fields the rules read (see [`Reads`]); the whole object when the
    /// event was made from one ([`EventTime::event`]).
    pub value: Value,
    /// Event time (ms since the epoch).
    pub time_ms: i64,
    /// Where the time came from.
    pub time_source: TimeSource,
    /// The line it was taken from, when `value` holds only some fields.
    line: Option<Line>,
}

/// The line an event's fields were taken from.
#[derive(Debug)]
struct Line {
    raw: Box<[u8]>,
    /// [`Reads::id`] of the paths taken.
    reads: u64,
    /// The whole object, parsed when first asked for.
    whole: OnceLock<Value>,
}

impl Event {
    /// An event of a whole JSON object, with its time.
    pub fn new(value: Value, time_ms: i64, time_source: TimeSource) -> Self {
        Self { value, time_ms, time_source, line: None }
    }

    /// The whole JSON object, as `serde_json` parses it: for an alert's
    /// `event` and id, and for conditions that read more than paths. Parsed
    /// from the line once, when first asked for.
    pub fn whole(&self) -> &Value {
        match &self.line {
            None => &self.value,
            Some(line) => line.whole.get_or_init(|| serde_json::from_slice(&line.raw).unwrap_or(Value::Null)),
        }
    }

    /// Whether the whole object has been parsed (or was given).
    pub fn has_whole(&self) -> bool {
        self.line.as_ref().is_none_or(|l| l.whole.get().is_some())
    }

    /// The same event with the fields `reads` names, if it was taken with
    /// other paths (it was decoded before a reload): `None` when it has
    /// them already.
    pub fn retaken(&self, reads: &Reads) -> Option<Event> {
        let line = self.line.as_ref().filter(|l| l.reads != reads.id())?;
        let value = match parse_line(&line.raw) {
            Some(v) => reads.take(&v),
            None => self.whole().clone(),
        };
        let line = Line { raw: line.raw.clone(), reads: reads.id(), whole: OnceLock::new() };
        Some(Event { value, time_ms: self.time_ms, time_source: self.time_source, line: Some(line) })
    }
}

/// Where an event's time came from (an alert's `event_time_source`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeSource {
    /// A field of the event, and it could be true.
    Event,
    /// The time of ingest: no field held a readable time, or the event's
    /// time could not be true and no trusted time was seen yet.
    Ingest,
    /// The event's time could not be true (too far in the future, or
    /// before `event_time.min`); the latest trusted event time stands in.
    LatestTrusted,
    /// Decoded, not yet settled by an [`EventClock`]: the time could not
    /// be true, for this reason (`future`, `too_old`).
    Untrusted(&'static str),
}

/// Decides each event's time from the first present of configured fields,
/// and whether it can be true.
#[derive(Clone, Debug)]
pub struct EventTime {
    fields: Vec<FieldPath>,
    /// A time this far after the time of ingest cannot be true.
    max_future_ms: i64,
    /// A time before this cannot be true.
    min_ms: i64,
    /// The out-of-orderness absorbed: events are held this long (in event
    /// time, or of wall clock at most) and applied in event-time order.
    max_delay: std::time::Duration,
}

/// `event_time.max_future` by default: five minutes of clock skew.
pub const DEFAULT_MAX_FUTURE_MS: i64 = 5 * 60_000;
/// `event_time.min` by default: 2000-01-01T00:00:00Z.
pub const DEFAULT_MIN_MS: i64 = 946_684_800_000;
/// `event_time.max_delay` by default: none, events are applied in the
/// order taken (across partitions, event-time order already; see the
/// README's "Event-time order" for why).
pub const DEFAULT_MAX_DELAY: std::time::Duration = std::time::Duration::ZERO;

impl EventTime {
    /// From field paths, in order of preference, with the default bounds.
    pub fn new(fields: Vec<FieldPath>) -> Self {
        Self { fields, max_future_ms: DEFAULT_MAX_FUTURE_MS, min_ms: DEFAULT_MIN_MS, max_delay: DEFAULT_MAX_DELAY }
    }

    /// With another out-of-orderness absorbed (zero: none, events are
    /// applied as they arrive).
    pub fn with_max_delay(self, max_delay: std::time::Duration) -> Self {
        Self { max_delay, ..self }
    }

    /// The out-of-orderness absorbed.
    pub fn max_delay(&self) -> std::time::Duration {
        self.max_delay
    }

    /// With other bounds of a time that can be true.
    pub fn with_bounds(self, max_future_ms: i64, min_ms: i64) -> Self {
        Self { max_future_ms, min_ms, ..self }
    }

    /// Builds the event, falling back to `ingest_ms` when no field holds a
    /// readable time. A time that cannot be true is marked
    /// [`TimeSource::Untrusted`] (its time is `ingest_ms` until an
    /// [`EventClock`] settles it).
    pub fn event(&self, value: Value, ingest_ms: i64) -> Event {
        let (time_ms, time_source) = self.time(&value, ingest_ms);
        Event { time_ms, time_source, value, line: None }
    }

    /// As [`event`](Self::event), for the fields `reads` takes of `raw`
    /// (they include this event time's fields).
    pub fn event_of_line(&self, fields: Value, raw: &[u8], reads: &Reads, ingest_ms: i64) -> Event {
        let (time_ms, time_source) = self.time(&fields, ingest_ms);
        let line = Line { raw: raw.into(), reads: reads.id(), whole: OnceLock::new() };
        Event { time_ms, time_source, value: fields, line: Some(line) }
    }

    /// The time fields, in the order of preference.
    pub fn fields(&self) -> &[FieldPath] {
        &self.fields
    }

    fn time(&self, value: &Value, ingest_ms: i64) -> (i64, TimeSource) {
        let found = self.fields.iter().find_map(|p| p.lookup(value).and_then(parse_time_ms));
        match found {
            None => (ingest_ms, TimeSource::Ingest),
            Some(t) if t > ingest_ms.saturating_add(self.max_future_ms) => (ingest_ms, TimeSource::Untrusted("future")),
            Some(t) if t < self.min_ms => (ingest_ms, TimeSource::Untrusted("too_old")),
            Some(t) => (t, TimeSource::Event),
        }
    }
}

/// The latest trusted event time seen on an input, standing in for the
/// times that cannot be true: they never move the watermark, the dedup
/// windows or the decay of risk. Applied in input order.
#[derive(Clone, Copy, Debug, Default)]
pub struct EventClock {
    latest: Option<i64>,
}

impl EventClock {
    /// A clock that has seen `latest` (a resumed run's watermark), if any.
    pub fn new(latest: Option<i64>) -> Self {
        Self { latest }
    }

    /// The latest trusted event time seen.
    pub fn latest(&self) -> Option<i64> {
        self.latest
    }

    /// Settles an event's time: a trusted time moves the clock on; an
    /// untrusted one is replaced by the latest trusted time (the time of
    /// ingest when there is none yet). Returns why it was replaced.
    pub fn settle(&mut self, event: &mut Event) -> Option<&'static str> {
        match event.time_source {
            TimeSource::Event => {
                self.latest = Some(self.latest.map_or(event.time_ms, |l| l.max(event.time_ms)));
                None
            }
            TimeSource::Untrusted(reason) => {
                match self.latest {
                    Some(t) => (event.time_ms, event.time_source) = (t, TimeSource::LatestTrusted),
                    None => event.time_source = TimeSource::Ingest,
                }
                Some(reason)
            }
            TimeSource::Ingest | TimeSource::LatestTrusted => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths_reach_nested_objects_and_arrays() {
        let v = json!({"a": {"b": [{"c": 1}, {"c": 2}]}, "n": {"0": "zero"}, "z": null});
        assert_eq!(FieldPath::parse("a.b[1].c").unwrap().lookup(&v), Some(&json!(2)));
        assert_eq!(FieldPath::parse("a.b.0.c").unwrap().lookup(&v), Some(&json!(1)));
        assert_eq!(FieldPath::parse("n.0").unwrap().lookup(&v), Some(&json!("zero")));
        assert_eq!(FieldPath::parse("a.x").unwrap().lookup(&v), None);
        assert_eq!(FieldPath::parse("z").unwrap().lookup(&v), None);
        assert!(FieldPath::parse("a..b").is_err());
        assert!(FieldPath::parse("a[x]").is_err());
        assert!(FieldPath::parse("").is_err());
    }

    #[test]
    fn times_in_every_accepted_form() {
        let t = 1_700_000_000_000;
        assert_eq!(parse_time_ms(&json!("2023-11-14T22:13:20Z")), Some(t));
        assert_eq!(parse_time_ms(&json!("2023-11-14T23:13:20.000+01:00")), Some(t));
        assert_eq!(parse_time_ms(&json!("2023-11-14 22:13:20.000000000")), Some(t));
        assert_eq!(parse_time_ms(&json!(1_700_000_000)), Some(t));
        assert_eq!(parse_time_ms(&json!(1_700_000_000_000_i64)), Some(t));
        assert_eq!(parse_time_ms(&json!("1700000000")), Some(t));
        assert_eq!(parse_time_ms(&json!("yesterday")), None);
        assert_eq!(format_time_ms(t), "2023-11-14T22:13:20.000Z");
    }

    #[test]
    fn event_time_takes_first_present_field_then_ingest() {
        let et =
            EventTime::new(vec![FieldPath::parse("p_event_time").unwrap(), FieldPath::parse("eventTime").unwrap()]);
        let ingest = 1_700_000_100_000;
        let e = et.event(json!({"eventTime": "2023-11-14T22:13:20Z"}), ingest);
        assert_eq!((e.time_ms, e.time_source), (1_700_000_000_000, TimeSource::Event));
        let e = et.event(json!({"eventTime": "garbage"}), 5);
        assert_eq!((e.time_ms, e.time_source), (5, TimeSource::Ingest));
    }

    #[test]
    fn times_that_cannot_be_true_never_move_the_clock() {
        let et = EventTime::new(vec![FieldPath::parse("t").unwrap()]);
        let ingest = 1_700_000_000_000;
        let mut clock = EventClock::default();
        // Before any trusted time: the time of ingest stands in.
        let mut e = et.event(json!({"t": "9999-12-31T23:59:59Z"}), ingest);
        assert_eq!(clock.settle(&mut e), Some("future"));
        assert_eq!((e.time_ms, e.time_source), (ingest, TimeSource::Ingest));
        // A trusted time from last year (a replay) moves the clock.
        let mut e = et.event(json!({"t": "2022-06-01T00:00:00Z"}), ingest);
        assert_eq!(clock.settle(&mut e), None);
        let trusted = e.time_ms;
        for bad in [json!("9999-12-31T23:59:59Z"), json!("1970-01-02T00:00:00Z"), json!(ingest + 3_600_000)] {
            let mut e = et.event(json!({ "t": bad }), ingest);
            assert!(clock.settle(&mut e).is_some(), "{bad} cannot be true");
            assert_eq!((e.time_ms, e.time_source), (trusted, TimeSource::LatestTrusted));
        }
        // Within the allowed skew is trusted.
        let mut e = et.event(json!({ "t": ingest + 60_000 }), ingest);
        assert_eq!(clock.settle(&mut e), None);
        assert_eq!(e.time_source, TimeSource::Event);
    }
}
