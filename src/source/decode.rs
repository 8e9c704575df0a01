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
            Err(e) => Decoded::Rejected { reason: "invalid_json", detail: invalid_json(&e, buf) },
        },
    }
}

/// What is wrong with a line that is not JSON, in words: where (the byte),
/// what the parser found there, and the text around it.
fn invalid_json(e: &serde_json::Error, buf: &[u8]) -> String {
    let message = e.to_string();
    let what = message.split(" at line ").next().unwrap_or(&message);
    let words = match what {
        "expected ident" => "a word that is not true, false or null (a string needs double quotes)",
        "expected value" => "no JSON value where one was expected",
        "expected `,` or `}`" => "a missing comma or closing brace in an object",
        "expected `,` or `]`" => "a missing comma or closing bracket in an array",
        "expected `:`" => "a key not followed by a colon",
        "key must be a string" => "an object key that is not a string in double quotes",
        "trailing characters" => "more text after the JSON value ended",
        "trailing comma" => "a comma before a closing brace or bracket",
        "EOF while parsing a string" => "the line ends inside a string: it is cut short",
        "EOF while parsing an object" => "the line ends inside an object: it is cut short",
        "EOF while parsing a list" => "the line ends inside an array: it is cut short",
        "EOF while parsing a value" => "the line ends where a value was expected: it is cut short",
        "invalid escape" => "a backslash escape that JSON does not have",
        "invalid number" => "a malformed number",
        "number out of range" => "a number too large for a 64-bit float",
        "recursion limit exceeded" => "arrays and objects nested over 128 levels deep",
        "invalid unicode code point" | "lone leading surrogate in hex escape" | "unexpected end of hex escape" => {
            "a \\u escape that is not a valid character"
        }
        w if w.starts_with("control character") => "a control character inside a string (it must be escaped)",
        w if w.starts_with("invalid unicode") || w.contains("UTF-8") => "bytes that are not UTF-8",
        w => w,
    };
    // serde_json counts columns in bytes, from 1.
    let at = e.column().saturating_sub(1).min(buf.len());
    let from = at.saturating_sub(12);
    let to = (at + 12).min(buf.len());
    let near = String::from_utf8_lossy(&buf[from..to]);
    let near: String = near.chars().flat_map(char::escape_debug).collect();
    format!("not valid JSON at byte {}: {words}, near \"{near}\"", at + 1)
}

/// Decodes one Kafka message (its payload at `offset`) as [`decode`] does a
/// line: a payload over `max_bytes` is set aside as too large.
pub fn decode_message(payload: &[u8], offset: u64, max_bytes: usize, decoder: &Decoder, ingest_ms: i64) -> Decoded {
    let len = payload.len();
    let info = LineInfo { line: offset, end_offset: offset + 1, len, too_large: len > max_bytes };
    decode(&payload[..len.min(max_bytes)], &info, max_bytes, decoder, ingest_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detail(line: &str) -> String {
        let e = serde_json::from_str::<Value>(line).unwrap_err();
        invalid_json(&e, line.as_bytes())
    }

    #[test]
    fn invalid_json_is_said_in_words_with_where_and_what_is_there() {
        assert_eq!(
            detail("nope"),
            "not valid JSON at byte 2: a word that is not true, false or null (a string needs double quotes), near \"nope\""
        );
        assert_eq!(
            detail(r#"{"a": 1 "b": 2}"#),
            "not valid JSON at byte 9: a missing comma or closing brace in an object, near \"{\\\"a\\\": 1 \\\"b\\\": 2}\""
        );
        let cut = detail(r#"{"eventName": "ConsoleLogin", "user"#);
        assert_eq!(
            cut,
            "not valid JSON at byte 35: the line ends inside a string: it is cut short, near \"Login\\\", \\\"user\""
        );
        assert!(
            detail("{\"a\": \"x\u{1}\"}").contains("a control character inside a string (it must be escaped), near")
        );
        // What the line holds is shown escaped: nothing of it reaches a log raw.
        assert!(detail("{\"a\": 1}\u{1b}[31m")
            .contains(r#"more text after the JSON value ended, near "{\"a\": 1}\u{1b}[31m""#));
    }
}
