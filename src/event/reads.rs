//! The fields the rules read, as a tree of paths, and taking only those out
//! of a parsed line: an event's [`Event::value`](super::Event) holds the
//! values at these paths (each whole, whatever its type), nothing else.
//!
//! Taking follows `serde_json`'s reading of a line exactly, so a path looked
//! up in the fields taken finds what it would find in the whole object: a
//! key given twice keeps its last value, a number is an unsigned integer, a
//! negative integer or a float as `serde_json` would make it, `null` is kept.

use super::{FieldPath, Segment};
use serde_json::{Map, Number, Value};
use sonic_rs::{JsonNumberTrait, ValueRef};
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

    /// The fields read of a parsed JSON object (an empty object if `object`
    /// is not one).
    pub fn take(&self, object: &sonic_rs::Value) -> Value {
        match object.as_ref() {
            ValueRef::Object(o) => Value::Object(take_object(&self.root, o.iter())),
            _ => Value::Object(Map::new()),
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
        match v.as_ref() {
            ValueRef::Object(o) => Some(Value::Object(take_object(self, o.iter()))),
            ValueRef::Array(a) => {
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
            _ => None,
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

/// A parsed value as `serde_json` would have parsed it.
pub fn to_serde(v: &sonic_rs::Value) -> Value {
    match v.as_ref() {
        ValueRef::Null => Value::Null,
        ValueRef::Bool(b) => Value::Bool(b),
        ValueRef::Number(n) => {
            if let Some(u) = n.as_u64() {
                Value::Number(u.into())
            } else if let Some(i) = n.as_i64() {
                Value::Number(i.into())
            } else {
                n.as_f64().and_then(Number::from_f64).map_or(Value::Null, Value::Number)
            }
        }
        ValueRef::String(s) => Value::String(s.to_string()),
        ValueRef::Array(a) => Value::Array(a.iter().map(to_serde).collect()),
        ValueRef::Object(o) => Value::Object(o.iter().map(|(k, v)| (k.to_string(), to_serde(v))).collect()),
    }
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
        Reads::new(&p, &[]).take(&sonic_rs::from_str(line).unwrap())
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
    fn the_id_names_the_rules_paths_only() {
        let (a, b) = (paths(&["x", "y.z"]), paths(&["y.z", "x", "x"]));
        assert_eq!(Reads::new(&a, &paths(&["t"])).id(), Reads::new(&b, &[]).id());
        assert_ne!(Reads::new(&a, &[]).id(), Reads::new(&paths(&["x"]), &[]).id());
    }
}
