//! A line or a Kafka message → an event with its time, or the reason it is
//! set aside. Used by the main job, the router and replays.

use super::LineInfo;
use crate::event::{Event, EventTime};
use serde_json::Value;

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
pub fn decode(buf: &[u8], info: &LineInfo, max_line_bytes: usize, event_time: &EventTime, ingest_ms: i64) -> Decoded {
    if info.too_large {
        let detail = format!("line is {} bytes, over the {max_line_bytes}-byte limit", info.len);
        return Decoded::Rejected { reason: "too_large", detail };
    }
    if buf.iter().all(u8::is_ascii_whitespace) {
        return Decoded::Blank;
    }
    match serde_json::from_slice::<Value>(buf) {
        Ok(v @ Value::Object(_)) => Decoded::Event(event_time.event(v, ingest_ms)),
        Ok(_) => Decoded::Rejected { reason: "not_object", detail: "line is JSON but not an object".into() },
        Err(e) => Decoded::Rejected { reason: "invalid_json", detail: e.to_string() },
    }
}

/// Decodes one Kafka message (its payload at `offset`) as [`decode`] does a
/// line: a payload over `max_bytes` is set aside as too large.
pub fn decode_message(
    payload: &[u8],
    offset: u64,
    max_bytes: usize,
    event_time: &EventTime,
    ingest_ms: i64,
) -> Decoded {
    let len = payload.len();
    let info = LineInfo { line: offset, end_offset: offset + 1, len, too_large: len > max_bytes };
    decode(&payload[..len.min(max_bytes)], &info, max_bytes, event_time, ingest_ms)
}
