//! Conditions: CEL expressions, compiled once at load.
//!
//! The conjuncts of a condition that are plain field tests — `path ==
//! literal`, `path != literal`, `has(path)` — are also compiled to a native
//! matcher. They run first, as a pre-filter, so most rules skip most events
//! without touching CEL; when the whole condition is made of them (as in all
//! shipped rules), CEL is not run at all. `cargo bench --bench throughput`
//! measures both paths on the same rule.
//!
//! Event fields are CEL variables: `errorCode`, `userIdentity.arn`. A field
//! the event lacks makes a comparison an error, and an error reads as
//! "false", so an absent field never matches; `has(a.b)` tests presence.
//!
//! A condition knows the field paths it reads ([`Condition::reads`]): only
//! those are decoded of each event. One that reads more than a path can
//! name — a whole object or list (`size(a)`, `x in a.b`), a key computed at
//! run time (`a[k]`), a macro over a map or list (`a.exists(…)`) — runs its
//! CEL part on the whole event, parsed for the events that reach it.

use crate::event::{Event, FieldPath};
use cel::common::ast::{Expr, LiteralValue, SelectExpr};
use cel::common::value::CowVal;
use cel::context::VariableResolver;
use cel::objects::{Key, Map};
use cel::{Context, Program};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

/// A compiled condition.
pub struct Condition {
    source: String,
    native: Vec<Term>,
    /// `None` when the native terms are the whole condition.
    program: Option<Program>,
    /// The field paths it reads.
    reads: Vec<FieldPath>,
    /// It reads more than paths name: its CEL part runs on the whole event.
    whole: bool,
    /// A Sigma rule's detection instead of CEL, and the condition an event
    /// must meet first (its logsource's), if any.
    sigma: Option<Box<(super::sigma::Detection, Option<Condition>)>>,
    /// Parts of which any one is enough (a Sigma correlation's referenced
    /// rules); empty for every other condition.
    any: Vec<Condition>,
}

impl std::fmt::Debug for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Condition").field("source", &self.source).field("native", &self.native).finish()
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Term {
    Eq(FieldPath, Literal),
    Ne(FieldPath, Literal),
    Has(FieldPath),
}

#[derive(Debug, Clone, PartialEq)]
enum Literal {
    Str(String),
    Num(f64),
    Bool(bool),
}

impl Literal {
    fn equals(&self, v: &Value) -> bool {
        match (self, v) {
            (Literal::Str(s), Value::String(x)) => s == x,
            (Literal::Num(n), Value::Number(x)) => x.as_f64() == Some(*n),
            (Literal::Bool(b), Value::Bool(x)) => b == x,
            _ => false,
        }
    }
}

impl Term {
    fn test(&self, event: &Value) -> bool {
        match self {
            Term::Eq(p, lit) => p.lookup(event).is_some_and(|v| lit.equals(v)),
            // Like CEL here: an absent field is an error, which reads as false.
            Term::Ne(p, lit) => p.lookup(event).is_some_and(|v| !lit.equals(v)),
            Term::Has(p) => p.lookup(event).is_some(),
        }
    }
}

/// Variables other than the event's fields (such as `state`), by name.
pub type Extra<'a> = &'a [(&'a str, &'a Value)];

impl Condition {
    /// Compiles `source`; the error is the parser's message.
    pub fn compile(source: &str) -> Result<Self, String> {
        let program = Program::compile(source).map_err(|e| e.to_string().trim().to_string())?;
        let mut conjuncts = Vec::new();
        flatten_and(&program.expression().expr, &mut conjuncts);
        let native: Vec<Term> = conjuncts.iter().filter_map(|e| native_term(e)).collect();
        let all_native = native.len() == conjuncts.len();
        let mut reads = Vec::new();
        let whole = !cel_paths(&program.expression().expr, &mut reads);
        let program = (!all_native).then_some(program);
        Ok(Self { source: source.to_string(), native, program, reads, whole, sigma: None, any: Vec::new() })
    }

    /// A Sigma rule's detection as a condition, behind `gate` if given;
    /// `source` names it.
    pub fn sigma(detection: super::sigma::Detection, gate: Option<Condition>, source: String) -> Self {
        let mut reads = detection.reads().to_vec();
        let mut whole = detection.reads_whole_event();
        if let Some(g) = &gate {
            reads.extend(g.reads.iter().cloned());
            whole |= g.whole;
        }
        Self {
            source,
            native: Vec::new(),
            program: None,
            reads,
            whole,
            sigma: Some(Box::new((detection, gate))),
            any: Vec::new(),
        }
    }

    /// A condition that holds when any of `parts` does (in order, the first
    /// that holds decides); `source` names it.
    pub fn any(parts: Vec<Condition>, source: String) -> Self {
        let mut reads: Vec<FieldPath> = parts.iter().flat_map(|p| p.reads.iter().cloned()).collect();
        reads.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        reads.dedup();
        let whole = parts.iter().any(|p| p.whole);
        Self { source, native: Vec::new(), program: None, reads, whole, sigma: None, any: parts }
    }

    /// A field and values without which the condition cannot hold (a
    /// Sigma detection's, see [`super::sigma::Required`]); `None` for CEL.
    pub fn required(&self) -> Option<super::sigma::Required> {
        if let Some(s) = &self.sigma {
            return s.0.required();
        }
        if self.any.is_empty() {
            return None;
        }
        super::sigma::Required::any_of(self.any.iter().map(Condition::required))
    }

    /// For a condition made by [`Condition::any`]: the indexes of the parts
    /// that hold for the event.
    pub fn parts_matching(&self, event: &Event) -> Vec<usize> {
        (0..self.any.len()).filter(|i| self.any[*i].matches(event, &[])).collect()
    }

    /// The field paths the condition reads (each read whole).
    pub fn reads(&self) -> &[FieldPath] {
        &self.reads
    }

    /// Whether it reads more than [`reads`](Self::reads) names, so that its
    /// CEL part runs on the whole event.
    pub fn reads_whole_event(&self) -> bool {
        self.whole
    }

    /// Evaluates against an event's fields, or against the whole event
    /// when the condition reads more than paths.
    pub fn matches(&self, event: &Event, extra: Extra<'_>) -> bool {
        if !self.any.is_empty() {
            return self.any.iter().any(|p| p.matches(event, extra));
        }
        if let Some(s) = &self.sigma {
            // The detection first: it rejects most events more cheaply than
            // CEL; but not one that searches the whole event (keywords).
            let gate = || s.1.as_ref().is_none_or(|g| g.matches(event, extra));
            let whole = s.0.reads_whole_event();
            if whole && !gate() {
                return false;
            }
            return s.0.matches(event) && (whole || gate());
        }
        if !self.native.iter().all(|t| t.test(&event.value)) {
            return false;
        }
        match &self.program {
            None => true,
            Some(p) => eval_cel(p, if self.whole { event.whole() } else { &event.value }, extra),
        }
    }

    /// The condition as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The field paths the condition reads: those of its plain field tests,
    /// and the top-level variables of its CEL part.
    pub fn fields(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .native
            .iter()
            .map(|t| match t {
                Term::Eq(p, _) | Term::Ne(p, _) | Term::Has(p) => p.as_str().to_string(),
            })
            .collect();
        if let Some(p) = &self.program {
            out.extend(p.references().variables().into_iter().map(String::from));
        }
        if self.sigma.is_some() || !self.any.is_empty() {
            out.extend(self.reads.iter().map(|p| p.as_str().to_string()));
        }
        out.sort();
        out.dedup();
        out
    }

    /// Whether the condition can never hold: it is `false`, or it asks one
    /// field to equal two different values.
    pub fn never_true(&self) -> bool {
        if self.source.trim() == "false" {
            return true;
        }
        self.native.iter().enumerate().any(|(i, a)| {
            self.native[i + 1..].iter().any(|b| match (a, b) {
                (Term::Eq(p, x), Term::Eq(q, y)) => p == q && x != y,
                (Term::Eq(p, x), Term::Ne(q, y)) | (Term::Ne(q, y), Term::Eq(p, x)) => p == q && x == y,
                _ => false,
            })
        })
    }

    /// Whether evaluation needs CEL (some part is not a plain field test).
    pub fn uses_cel(&self) -> bool {
        self.program.is_some()
    }

    /// Evaluates against an event; `extra` binds more variables.
    pub fn eval(&self, event: &Value, extra: Extra<'_>) -> bool {
        if !self.any.is_empty() {
            return self.any.iter().any(|p| p.eval(event, extra));
        }
        if let Some(s) = &self.sigma {
            return s.0.matches_value(event) && s.1.as_ref().is_none_or(|g| g.eval(event, extra));
        }
        if !self.native.iter().all(|t| t.test(event)) {
            return false;
        }
        match &self.program {
            None => true,
            Some(p) => eval_cel(p, event, extra),
        }
    }
}

/// Compiles a condition to a bare CEL program (for comparing with the native matcher).
pub fn compile_cel(source: &str) -> Result<Program, String> {
    Program::compile(source).map_err(|e| e.to_string())
}

/// Runs a compiled CEL program on an event; any error is `false`.
pub fn eval_cel(program: &Program, event: &Value, extra: Extra<'_>) -> bool {
    let vars = Vars { event, extra };
    let mut ctx = Context::with_env(env());
    ctx.set_variable_resolver(&vars);
    matches!(program.execute(&ctx), Ok(cel::Value::Bool(true)))
}

fn env() -> Arc<cel::Env> {
    static ENV: OnceLock<Arc<cel::Env>> = OnceLock::new();
    ENV.get_or_init(|| Arc::new(cel::Env::stdlib())).clone()
}

struct Vars<'a> {
    event: &'a Value,
    extra: Extra<'a>,
}

impl VariableResolver for Vars<'_> {
    fn resolve<'b>(&'b self, name: &str) -> Option<CowVal<'b, 'b>> {
        let v = match self.extra.iter().find(|(n, _)| *n == name) {
            Some((_, v)) => *v,
            None => self.event.get(name)?,
        };
        let boxed: Box<dyn cel::common::value::Val> = json_to_cel(v).try_into().ok()?;
        Some(CowVal::Owned(boxed))
    }
}

/// Converts a JSON value to a CEL value (only for the fields a condition reads).
pub fn json_to_cel(v: &Value) -> cel::Value {
    match v {
        Value::Null => cel::Value::Null,
        Value::Bool(b) => cel::Value::Bool(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => cel::Value::Int(i),
            (None, Some(u)) => cel::Value::UInt(u),
            _ => cel::Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => cel::Value::String(Arc::new(s.clone())),
        Value::Array(a) => cel::Value::List(Arc::new(a.iter().map(json_to_cel).collect())),
        Value::Object(m) => {
            let map: HashMap<Key, cel::Value> =
                m.iter().map(|(k, v)| (Key::from(k.as_str()), json_to_cel(v))).collect();
            cel::Value::Map(Map { map: Arc::new(map) })
        }
    }
}

/// Calls whose arguments are read as values: a path among them is read as
/// a path (its whole value is decoded).
const VALUE_CALLS: &[&str] = &[
    "_==_",
    "_!=_",
    "_<_",
    "_<=_",
    "_>_",
    "_>=_",
    "_&&_",
    "_||_",
    "!_",
    "_?_:_",
    "_+_",
    "_-_",
    "_*_",
    "_/_",
    "_%_",
    "-_",
    "@not_strictly_false",
    "startsWith",
    "endsWith",
    "contains",
    "matches",
    "int",
    "uint",
    "double",
    "string",
    "bool",
    "bytes",
    "timestamp",
    "duration",
];

/// Adds the paths `e` reads to `out`; false when it reads more than paths
/// name (see the module's documentation).
fn cel_paths(e: &Expr, out: &mut Vec<FieldPath>) -> bool {
    if let Some(p) = path_of(e) {
        out.push(p);
        return true;
    }
    let whole_if_path = |e: &Expr, out: &mut Vec<FieldPath>| path_of(e).is_none() && cel_paths(e, out);
    match e {
        Expr::Literal(_) => true,
        Expr::Select(s) if s.test => match has_path(s) {
            Some(p) => {
                out.push(p);
                true
            }
            None => path_segments(&s.operand.expr).is_none() && cel_paths(&s.operand.expr, out),
        },
        Expr::Select(s) => cel_paths(&s.operand.expr, out),
        Expr::List(l) => l.elements.iter().all(|x| cel_paths(&x.expr, out)),
        Expr::Call(c) if VALUE_CALLS.contains(&c.func_name.as_str()) => {
            c.target.iter().map(|t| &**t).chain(c.args.iter()).all(|x| cel_paths(&x.expr, out))
        }
        // `x in a.b`: x is a value, the list or map is read whole.
        Expr::Call(c) if c.func_name == "@in" && c.target.is_none() && c.args.len() == 2 => {
            cel_paths(&c.args[0].expr, out) && whole_if_path(&c.args[1].expr, out)
        }
        // Any other function (`size`, `a[k]`, …) reads what it is given whole.
        Expr::Call(c) => c.target.iter().map(|t| &**t).chain(c.args.iter()).all(|x| whole_if_path(&x.expr, out)),
        // Macros over maps and lists, map and struct literals.
        _ => false,
    }
}

fn flatten_and<'a>(e: &'a Expr, out: &mut Vec<&'a Expr>) {
    match e {
        Expr::Call(c) if c.func_name == "_&&_" && c.target.is_none() && c.args.len() == 2 => {
            flatten_and(&c.args[0].expr, out);
            flatten_and(&c.args[1].expr, out);
        }
        other => out.push(other),
    }
}

fn native_term(e: &Expr) -> Option<Term> {
    match e {
        Expr::Select(s) if s.test => Some(Term::Has(has_path(s)?)),
        Expr::Call(c)
            if c.target.is_none() && c.args.len() == 2 && (c.func_name == "_==_" || c.func_name == "_!=_") =>
        {
            let (path, lit) = match (path_of(&c.args[0].expr), literal(&c.args[1].expr)) {
                (Some(p), Some(l)) => (p, l),
                _ => (path_of(&c.args[1].expr)?, literal(&c.args[0].expr)?),
            };
            Some(if c.func_name == "_==_" { Term::Eq(path, lit) } else { Term::Ne(path, lit) })
        }
        _ => None,
    }
}

/// The path `has(a.b)` tests, when its operand is a path.
fn has_path(s: &SelectExpr) -> Option<FieldPath> {
    let mut segs = path_segments(&s.operand.expr)?;
    segs.push(s.field.clone());
    FieldPath::parse(&segs.join(".")).ok()
}

fn path_of(e: &Expr) -> Option<FieldPath> {
    FieldPath::parse(&path_segments(e)?.join(".")).ok()
}

fn path_segments(e: &Expr) -> Option<Vec<String>> {
    match e {
        Expr::Ident(name) => Some(vec![name.clone()]),
        Expr::Select(s) if !s.test => {
            let mut segs = path_segments(&s.operand.expr)?;
            segs.push(s.field.clone());
            Some(segs)
        }
        _ => None,
    }
}

fn literal(e: &Expr) -> Option<Literal> {
    match e {
        Expr::Literal(LiteralValue::String(s)) => Some(Literal::Str(s.inner().to_string())),
        Expr::Literal(LiteralValue::Int(i)) => Some(Literal::Num(*i.inner() as f64)),
        Expr::Literal(LiteralValue::Double(d)) => Some(Literal::Num(*d.inner())),
        Expr::Literal(LiteralValue::Boolean(b)) => Some(Literal::Bool(*b.inner())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn native_and_cel_agree() {
        let events = [
            json!({"eventName": "ConsoleLogin", "responseElements": {"ConsoleLogin": "Failure"}, "n": 3}),
            json!({"eventName": "ConsoleLogin", "responseElements": {"ConsoleLogin": "Success"}, "n": 4}),
            json!({"eventName": "AssumeRole"}),
            json!({}),
        ];
        for src in [
            r#"eventName == "ConsoleLogin" && responseElements.ConsoleLogin == "Failure""#,
            r#"eventName == "ConsoleLogin" && has(responseElements.ConsoleLogin)"#,
            r#""AssumeRole" == eventName"#,
            r#"eventName != "AssumeRole""#,
            r#"n == 3"#,
            r#"eventName == "ConsoleLogin" && n > 3"#,
            r#"eventName == "ConsoleLogin" || eventName == "AssumeRole""#,
        ] {
            let c = Condition::compile(src).unwrap();
            let p = compile_cel(src).unwrap();
            for e in &events {
                assert_eq!(c.eval(e, &[]), eval_cel(&p, e, &[]), "{src} on {e}");
            }
        }
    }

    /// Decodes `line` as the pipeline does, taking only what `c` reads.
    fn decoded(c: &Condition, line: &str) -> Event {
        let reads = crate::event::Reads::new(c.reads(), &[]);
        let fields = reads.take(&crate::event::parse_line(line.as_bytes()).unwrap());
        crate::event::EventTime::new(vec![]).event_of_line(fields, line.as_bytes(), &reads, 0)
    }

    #[test]
    fn paths_known_at_load_are_read_alone_the_rest_reads_the_whole_event() {
        let paths = |src: &str| {
            let c = Condition::compile(src).unwrap();
            let mut p: Vec<String> = c.reads().iter().map(|p| p.to_string()).collect();
            p.sort();
            (p, c.reads_whole_event())
        };
        let known = |v: &[&str]| (v.iter().map(|s| s.to_string()).collect::<Vec<_>>(), false);
        assert_eq!(paths(r#"a.b == "x" && has(c.d) && n > 3"#), known(&["a.b", "c.d", "n"]));
        assert_eq!(paths(r#"e in ["A", "B"] && a.b.startsWith("x") && !(f.g < 2)"#), known(&["a.b", "e", "f.g"]));
        for whole in [
            r#"size(requestParameters) > 2"#,                         // a whole object
            r#"requestParameters[eventName] == "x""#,                 // a key known only at run time
            r#"requestParameters.exists(k, k.startsWith("bucket"))"#, // a function over a map
            r#""x" in tags"#,                                         // a whole list
            r#"requestParameters.filter(k, k == "a").size() == 1"#,   // a macro, then a method
        ] {
            assert!(paths(whole).1, "{whole} reads more than paths");
        }
    }

    #[test]
    fn conditions_on_decoded_fields_agree_with_the_whole_event() {
        let lines = [
            r#"{"eventName": "PutObject", "requestParameters": {"bucketName": "b", "key": "k"}, "tags": ["x"], "n": 4}"#,
            r#"{"eventName": "GetObject", "requestParameters": {"bucketName": "c"}, "tags": [], "n": 2, "a": {"b": "xy"}}"#,
            r#"{"eventName": "PutObject", "requestParameters": "not a map", "n": "4", "a": {}}"#,
            r#"{"eventName": "PutObject", "a": {"b": null}, "requestParameters": {"PutObject": "x"}}"#,
        ];
        for src in [
            r#"eventName == "PutObject" && size(requestParameters) > 1"#,
            r#"eventName == "PutObject" && requestParameters[eventName] == "x""#,
            r#"requestParameters.exists(k, k.startsWith("bucket")) && n > 3"#,
            r#""x" in tags || !has(a.b)"#,
            r#"a.b.startsWith("x") || n >= 4"#,
            r#"has(a.b) && a.b == null"#,
        ] {
            let c = Condition::compile(src).unwrap();
            for line in lines {
                let whole: Value = serde_json::from_str(line).unwrap();
                let event = decoded(&c, line);
                assert_eq!(c.matches(&event, &[]), c.eval(&whole, &[]), "{src} on {line}");
            }
        }
    }

    #[test]
    fn the_whole_event_is_parsed_only_for_events_that_reach_the_cel_part() {
        let c = Condition::compile(r#"eventName == "PutObject" && size(requestParameters) > 1"#).unwrap();
        let other = decoded(&c, r#"{"eventName": "GetObject", "requestParameters": {"a": 1, "b": 2}}"#);
        assert!(!c.matches(&other, &[]));
        assert!(!other.has_whole(), "the native test failed first: nothing more was parsed");
        let put = decoded(&c, r#"{"eventName": "PutObject", "requestParameters": {"a": 1, "b": 2}}"#);
        assert!(c.matches(&put, &[]));
        assert!(put.has_whole());
        let paths = Condition::compile(r#"eventName == "PutObject" && n > 1"#).unwrap();
        let event = decoded(&paths, r#"{"eventName": "PutObject", "n": 2, "big": {"x": [1, 2, 3]}}"#);
        assert!(paths.matches(&event, &[]));
        assert!(!event.has_whole(), "paths alone were enough");
    }

    #[test]
    fn plain_field_tests_skip_cel() {
        assert!(!Condition::compile(r#"a == "x" && has(b.c) && d != 1"#).unwrap().uses_cel());
        assert!(Condition::compile(r#"a == "x" && size(b) > 2"#).unwrap().uses_cel());
    }

    #[test]
    fn extra_variables_and_errors() {
        let c = Condition::compile("state.count >= 3").unwrap();
        let state = json!({"count": 3});
        assert!(c.eval(&json!({}), &[("state", &state)]));
        assert!(!c.eval(&json!({}), &[]), "undeclared variable reads as false");
        assert!(Condition::compile("a ==").is_err());
    }
}
