//! A line or a Kafka message → an event with its time, or the reason it is
//! set aside. Used by the main job, the router and replays.
//!
//! A line is parsed with `sonic-rs` (SIMD), which checks all of it, and
//! only the fields the rules read are kept ([`Reads`]); the whole object is
//! parsed with `serde_json` only when asked for ([`Event::whole`]: an
//! alert's event and id). A line `sonic-rs` refuses is read again with
//! `serde_json`, whose verdict and words are the dead letter's.

use super::LineInfo;
use crate::event::{parse_line, Event, EventTime, Reads};
use crate::rules::Rule;
use serde_json::Value;
use sonic_rs::JsonValueTrait;
use std::sync::Arc;

/// What decoding needs: the fields to take and how to read an event's time.
#[derive(Clone, Debug)]
pub struct Decoder {
    reads: Arc<Reads>,
    event_time: Arc<EventTime>,
}

impl Decoder {
    /// Takes what `rules` read, and the event time's fields.
    pub fn new(rules: &[Rule], event_time: &EventTime) -> Self {
        Self::of_reads(crate::rules::reads(rules, event_time.fields()), event_time)
    }

    /// Takes `paths` and the event time's fields (tests, fuzzing).
    pub fn of_paths(paths: &[crate::event::FieldPath], event_time: &EventTime) -> Self {
        Self::of_reads(Reads::new(paths, event_time.fields()), event_time)
    }

    fn of_reads(reads: Reads, event_time: &EventTime) -> Self {
        Self { reads: Arc::new(reads), event_time: Arc::new(event_time.clone()) }
    }

    /// The same event time, for other rules (a reload).
    pub fn with_rules(&self, rules: &[Rule]) -> Self {
        Self::new(rules, &self.event_time)
    }
}

/// One input line, decoded.
pub enum Decoded {
    /// Only white space: not an event, not an error.
    Blank,
    /// Set aside: `reason` is `too_large`, `invalid_json`, `not_object`, or
    /// (a routed Kafka message without its entity key) `no_key`.
    Rejected {
        /// Dead-letter reason.
        reason: &'static str,
        /// The details (the parser's message).
        detail: String,
    },
    /// An event.
    Event(Event),
}

/// Decodes one line read by [`JsonLines`](super::JsonLines) into an event, with its time.
pub fn decode(buf: &[u8], info: &LineInfo, max_line_bytes: usize, decoder: &Decoder, ingest_ms: i64) -> Decoded {
    if info.too_large {
        let detail = format!("line is {} bytes, over the {max_line_bytes}-byte limit", info.len);
        return Decoded::Rejected { reason: "too_large", detail };
    }
    if buf.iter().all(u8::is_ascii_whitespace) {
        return Decoded::Blank;
    }
    let not_object = || Decoded::Rejected { reason: "not_object", detail: "line is JSON but not an object".into() };
    match parse_line(buf) {
        Some(v) if v.is_object() => {
            let fields = decoder.reads.take(&v);
            Decoded::Event(decoder.event_time.event_of_line(fields, buf, &decoder.reads, ingest_ms))
        }
        Some(_) => not_object(),
        None => match serde_json::from_slice::<Value>(buf) {
            // Should sonic-rs refuse what serde_json takes, serde_json's reading stands.
            Ok(v @ Value::Object(_)) => Decoded::Event(decoder.event_time.event(v, ingest_ms)),
            Ok(_) => not_object(),
            Err(e) => Decoded::Rejected { reason: "invalid_json", detail: e.to_string() },
        },
    }
}

/// Decodes one Kafka message (its payload at `offset`) as [`decode`] does a
/// line: a payload over `max_bytes` is set aside as too large.
pub fn decode_message(payload: &[u8], offset: u64, max_bytes: usize, decoder: &Decoder, ingest_ms: i64) -> Decoded {
    let len = payload.len();
    let info = LineInfo { line: offset, end_offset: offset + 1, len, too_large: len > max_bytes };
    decode(&payload[..len.min(max_bytes)], &info, max_bytes, decoder, ingest_ms)
}
