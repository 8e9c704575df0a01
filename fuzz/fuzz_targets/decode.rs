//! Differential fuzzing of riskd's decoder against serde_json: for any
//! bytes, the same verdict (an object, JSON but not an object, not JSON),
//! and for an object the same value at every path the rules could read,
//! and the same event time.
#![no_main]

use libfuzzer_sys::fuzz_target;
use riskd::event::{EventTime, FieldPath};
use riskd::source::{decode, Decoded, Decoder, LineInfo};
use serde_json::Value;
use std::sync::OnceLock;

/// Paths of every shape: nested keys, array indexes, keys spelled with
/// digits, a path inside another, the event time's field.
const PATHS: &[&str] =
    &["a", "a.b", "a.b.c", "b[0]", "b[1].c", "c.0", "0", "eventName", "userIdentity.arn", "x.y.z", "t.u"];

fn setup() -> &'static (Decoder, EventTime, Vec<FieldPath>) {
    static SETUP: OnceLock<(Decoder, EventTime, Vec<FieldPath>)> = OnceLock::new();
    SETUP.get_or_init(|| {
        let paths: Vec<FieldPath> = PATHS.iter().map(|p| FieldPath::parse(p).unwrap()).collect();
        let time = EventTime::new(vec![FieldPath::parse("t").unwrap(), FieldPath::parse("eventTime").unwrap()]);
        (Decoder::of_paths(&paths, &time), time, paths)
    })
}

fuzz_target!(|data: &[u8]| {
    let (decoder, time, paths) = setup();
    let ingest = 1_700_000_000_000;
    let info = LineInfo { line: 1, end_offset: data.len() as u64 + 1, len: data.len(), too_large: false };
    let got = decode(data, &info, usize::MAX, decoder, ingest);
    if data.iter().all(u8::is_ascii_whitespace) {
        assert!(matches!(got, Decoded::Blank));
        return;
    }
    match (serde_json::from_slice::<Value>(data), got) {
        (Ok(whole @ Value::Object(_)), Decoded::Event(event)) => {
            for p in paths.iter().chain(time.fields()) {
                assert_eq!(p.lookup(&event.value), p.lookup(&whole), "path {p}");
            }
            let expected = time.event(whole.clone(), ingest);
            assert_eq!((event.time_ms, event.time_source), (expected.time_ms, expected.time_source));
            assert_eq!(event.whole(), &whole);
        }
        (Ok(Value::Object(_)), other) => panic!("serde_json reads an object, riskd: {}", verdict(&other)),
        (Ok(_), Decoded::Rejected { reason: "not_object", .. }) => {}
        (Ok(_), other) => panic!("serde_json reads JSON that is not an object, riskd: {}", verdict(&other)),
        (Err(e), Decoded::Rejected { reason: "invalid_json", detail }) => assert_eq!(detail, e.to_string()),
        (Err(e), other) => panic!("serde_json refuses it ({e}), riskd: {}", verdict(&other)),
    }
});

fn verdict(d: &Decoded) -> String {
    match d {
        Decoded::Blank => "blank".into(),
        Decoded::Rejected { reason, .. } => (*reason).into(),
        Decoded::Event(e) => format!("an event {}", e.value),
    }
}
