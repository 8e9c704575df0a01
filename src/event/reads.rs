//! The fields the rules read, as a tree of paths, and taking only those out
//! of a parsed line: an event's [`Event::value`](super::Event) holds the
//! values at these paths (each whole, whatever its type), nothing else.
//!
//! Taking follows `serde_json`'s reading of a line exactly, so a path looked
//! up in the fields taken finds what it would find in the whole object: a
//! key given twice keeps its last value, a number is read from its text by
//! `serde_json` itself (the line is parsed with numbers kept as text, see
//! [`crate::source::decode`]), `null` is kept.

use super::{FieldPath, Segment};
use serde_json::{Map, Number, Value};
use sonic_rs::{JsonContainerTrait, JsonValueTrait};
use std::hash::{Hash, Hasher};

/// The paths read, merged into a tree.
#[derive(Debug, Default)]
pub struct Reads {
    root: Node,
    id: u64,
}

#[derive(Debug, Default)]
struct Node {
    /// The whole value here is read.
    whole: bool,
    children: Vec<(Segment, Node)>,
}

impl Segment {
    fn text(&self) -> &str {
        match self {
            Segment::Key(k) | Segment::Index(_, k) => k,
        }
    }
}

impl Reads {
    /// The rules' paths, and `extra` paths (the event time's) that are
    /// taken too but do not count in [`id`](Self::id).
    pub fn new<'a>(rules: impl IntoIterator<Item = &'a FieldPath>, extra: &[FieldPath]) -> Self {
        let mut texts: Vec<&str> = Vec::new();
        let mut root = Node::default();
        for p in rules {
            texts.push(p.as_str());
            root.add(&p.segments);
        }
        for p in extra {
            root.add(&p.segments);
        }
        texts.sort_unstable();
        texts.dedup();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        texts.hash(&mut h);
        Self { root, id: h.finish() }
    }

    /// Names the rules' paths: events taken with the same id hold every
    /// field these rules read (the engine takes them again otherwise).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The fields read of a JSON object [`parse_line`] parsed (an empty
    /// object if `object` is not one).
    pub fn take(&self, object: &sonic_rs::Value) -> Value {
        match object.as_object() {
            Some(o) => Value::Object(take_object(&self.root, o.iter())),
            None => Value::Object(Map::new()),
        }
    }
}

impl Node {
    fn add(&mut self, segments: &[Segment]) {
        let Some((first, rest)) = segments.split_first() else {
            self.whole = true;
            return;
        };
        let i = match self.children.iter().position(|(s, _)| s == first) {
            Some(i) => i,
            None => {
                self.children.push((first.clone(), Node::default()));
                self.children.len() - 1
            }
        };
        self.children[i].1.add(rest);
    }

    /// The value read at this node, if any: all of it, or what the paths
    /// below reach of an object or array.
    fn take(&self, v: &sonic_rs::Value) -> Option<Value> {
        if self.whole {
            return Some(to_serde(v));
        }
        if let Some(o) = v.as_object() {
            return Some(Value::Object(take_object(self, o.iter())));
        }
        match v.as_array() {
            Some(a) => {
                let mut out = Vec::new();
                for (seg, child) in &self.children {
                    if let Segment::Index(i, _) = seg {
                        if let Some(x) = a.get(*i).and_then(|v| child.take(v)) {
                            if out.len() <= *i {
                                out.resize(*i + 1, Value::Null);
                            }
                            out[*i] = x;
                        }
                    }
                }
                Some(Value::Array(out))
            }
            None => None,
        }
    }
}

fn take_object<'a>(node: &Node, pairs: impl Iterator<Item = (&'a str, &'a sonic_rs::Value)>) -> Map<String, Value> {
    let mut out = Map::new();
    for (k, v) in pairs {
        let Some((_, child)) = node.children.iter().find(|(s, _)| s.text() == k) else { continue };
        // A key given again replaces what it held, as in serde_json.
        match child.take(v) {
            Some(x) => {
                out.insert(k.to_string(), x);
            }
            None => {
                out.remove(k);
            }
        }
    }
    out
}

/// Parses a line with `sonic-rs`, numbers kept as their text: `None`
/// unless `serde_json` would take it too — UTF-8, one JSON value and
/// nothing after it, and every number finite as `serde_json` reads it
/// (`1e400` is an error to it). A line refused here is for `serde_json` to
/// judge (and word).
pub fn parse_line(buf: &[u8]) -> Option<sonic_rs::Value> {
    if too_deep(buf) {
        return None;
    }
    let text = std::str::from_utf8(buf).ok()?;
    let mut de = sonic_rs::Deserializer::from_str(text).use_rawnumber();
    let v: sonic_rs::Value = de.deserialize().ok()?;
    de.end().ok()?;
    finite(&v).then_some(v)
}

/// Deepest nesting of arrays and objects parsed here. No security event
/// nests this deep; a deeper line is left to `serde_json`, which bounds
/// its own recursion (it refuses a 128th level), so that an attacker's
/// `[[[[…` never reaches a parser or a walk that recurses without bound
/// (sonic-rs's parser, unoptimized, overflows a 2 MiB stack near 126).
const MAX_DEPTH: usize = 32;

/// Whether arrays and objects nest deeper than [`MAX_DEPTH`]. Counting
/// brackets, strings included, settles almost every line at once.
fn too_deep(buf: &[u8]) -> bool {
    if buf.iter().filter(|b| matches!(b, b'[' | b'{')).count() <= MAX_DEPTH {
        return false;
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in buf {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Whether every number in `v` is finite as `serde_json` reads it: only
/// one with an exponent or over 300 digits can be too large for an `f64`.
fn finite(v: &sonic_rs::Value) -> bool {
    if let Some(o) = v.as_object() {
        return o.iter().all(|(_, v)| finite(v));
    }
    if let Some(a) = v.as_array() {
        return a.iter().all(finite);
    }
    match v.as_raw_number() {
        Some(raw) => {
            let raw = raw.as_str();
            raw.len() <= 300 && !raw.contains(['e', 'E']) || serde_json::from_str::<Number>(raw).is_ok()
        }
        None => true,
    }
}

/// A value [`parse_line`] parsed, as `serde_json` would have parsed it.
fn to_serde(v: &sonic_rs::Value) -> Value {
    if let Some(o) = v.as_object() {
        return Value::Object(o.iter().map(|(k, v)| (k.to_string(), to_serde(v))).collect());
    }
    if let Some(a) = v.as_array() {
        return Value::Array(a.iter().map(to_serde).collect());
    }
    if let Some(s) = v.as_str() {
        return Value::String(s.to_string());
    }
    if let Some(raw) = v.as_raw_number() {
        // serde_json's own reading of the number's text: the same integer
        // or float, to the last bit (its rounding differs from sonic-rs's).
        return serde_json::from_str::<Number>(raw.as_str()).map_or(Value::Null, Value::Number);
    }
    if let Some(b) = v.as_bool() {
        return Value::Bool(b);
    }
    Value::Null
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn paths(ps: &[&str]) -> Vec<FieldPath> {
        ps.iter().map(|p| FieldPath::parse(p).unwrap()).collect()
    }

    fn take(ps: &[&str], line: &str) -> Value {
        let p = paths(ps);
        Reads::new(&p, &[]).take(&parse_line(line.as_bytes()).unwrap())
    }

    #[test]
    fn only_the_paths_read_are_taken_whole() {
        let line = r#"{"a": {"b": 1, "c": [1, {"d": "x"}]}, "e": "y", "f": {"g": null}, "h": [0, 1, 2]}"#;
        assert_eq!(take(&["a.b", "f"], line), json!({"a": {"b": 1}, "f": {"g": null}}));
        assert_eq!(take(&["a.c[1].d", "h.2"], line), json!({"a": {"c": [null, {"d": "x"}]}, "h": [null, null, 2]}));
        assert_eq!(take(&["a", "a.b"], line), json!({"a": {"b": 1, "c": [1, {"d": "x"}]}}));
        assert_eq!(take(&["e.x", "zz"], line), json!({}));
    }

    #[test]
    fn paths_find_what_they_find_in_the_whole_object() {
        let lines = [
            r#"{"a": {"b": 1}, "a": "replaced"}"#,
            r#"{"a": "first", "a": {"b": 2}}"#,
            r#"{"n": {"0": "key spelled with a digit"}, "m": [["x"]], "u": 18446744073709551615, "i": -3, "f": 1.5e3}"#,
            r#"{"s": "\u00e9\n\"", "z": null, "t": true}"#,
            r#"{"f": 184460748147419103232, "i": -0, "u": 1E2, "a": {"b": [1.0, -1e-400]}}"#,
        ];
        let ps = ["a", "a.b", "n.0", "m[0][0]", "u", "i", "f", "s", "z", "t", "missing.x"];
        for line in lines {
            let whole: Value = serde_json::from_str(line).unwrap();
            let taken = take(&ps, line);
            for p in paths(&ps) {
                assert_eq!(p.lookup(&taken), p.lookup(&whole), "{p} in {line}");
            }
        }
    }

    #[test]
    fn nesting_is_refused_where_serde_json_refuses_it_and_never_overflows_a_stack() {
        use crate::source::{decode, Decoded, Decoder, LineInfo};
        let decoder = Decoder::of_paths(&paths(&["a"]), &crate::event::EventTime::new(vec![]));
        for depth in [1, 30, 31, 32, 33, 126, 127, 128, 129, 1_000, 1_000_000] {
            let array = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
            let object = format!("{{\"a\":{}1{}, \"s\": \"[[[{{{{\"}}", "[".repeat(depth), "]".repeat(depth));
            for line in [array, object] {
                let serde = match serde_json::from_str::<Value>(&line) {
                    Ok(Value::Object(_)) => "event",
                    Ok(_) => "not_object",
                    Err(_) => "invalid_json",
                };
                let info = LineInfo { line: 1, end_offset: 0, len: line.len(), too_large: false };
                // On a 2 MiB thread, as the reading thread's.
                let decoder = decoder.clone();
                let ours = std::thread::Builder::new().stack_size(2 << 20).spawn(move || {
                    match decode(line.as_bytes(), &info, usize::MAX, &decoder, 0) {
                        Decoded::Event(_) => "event",
                        Decoded::Rejected { reason, .. } => reason,
                        Decoded::Blank => "blank",
                    }
                });
                assert_eq!(ours.unwrap().join().unwrap(), serde, "depth {depth}");
            }
            assert!(parse_line("[".repeat(depth).as_bytes()).is_none());
        }
        assert!(parse_line(format!("{}{}", "[".repeat(32), "]".repeat(32)).as_bytes()).is_some());
        assert!(parse_line(format!("{}{}", "[".repeat(33), "]".repeat(33)).as_bytes()).is_none());
    }

    #[test]
    fn the_id_names_the_rules_paths_only() {
        let (a, b) = (paths(&["x", "y.z"]), paths(&["y.z", "x", "x"]));
        assert_eq!(Reads::new(&a, &paths(&["t"])).id(), Reads::new(&b, &[]).id());
        assert_ne!(Reads::new(&a, &[]).id(), Reads::new(&paths(&["x"]), &[]).id());
    }
}
