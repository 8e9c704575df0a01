//! Sigma detections, compiled from rsigma's parse of a rule into riskd's
//! own matcher (so that the fields they read are known at load and decoded
//! alone, like every other rule's).
//!
//! The semantics are those of the rsigma engine, which riskd is tested
//! against (`tests/sigma.rs`): strings match case-insensitively unless
//! `|cased` (`|re` is case-sensitive unless `|i`); `*` and `?` are
//! wildcards; a field name is first a top-level key as written, else a
//! dotted path that fans out over arrays; an array matches when any element
//! does; only a bare `null` matches an absent field; numbers written
//! unquoted compare as numbers (a numeric string in the event too); keyword
//! lists search every string value of the event. What riskd does not
//! support is refused with the reason ([`Unsupported`]), never matched
//! differently.

use crate::event::{Event, FieldPath};
use base64::Engine as _;
use rsigma_parser::{
    ConditionExpr, Detection as SigmaDetection, DetectionItem, Modifier, Quantifier, SigmaRule, SigmaString,
    SigmaValue, SpecialChar, StringPart,
};
use serde_json::Value;

/// Why a Sigma rule cannot be compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct Unsupported {
    /// What is not supported, and where in the rule.
    pub reason: String,
    /// Text to look for in the rule file to find the line at fault.
    pub near: Option<String>,
}

fn unsupported(reason: impl Into<String>, near: Option<&str>) -> Unsupported {
    Unsupported { reason: reason.into(), near: near.map(String::from) }
}

/// A Sigma rule's detection, compiled.
#[derive(Debug)]
pub struct Detection {
    /// The named detections, in name order.
    named: Vec<(String, Det)>,
    /// Its conditions: the rule matches when any holds.
    conditions: Vec<Cond>,
    /// The field paths it reads.
    reads: Vec<FieldPath>,
    /// It searches every string of the event (keywords).
    whole: bool,
}

#[derive(Debug)]
enum Cond {
    And(Vec<Cond>),
    Or(Vec<Cond>),
    Not(Box<Cond>),
    /// A named detection, by index.
    Is(usize),
    /// At least this many of these named detections.
    AtLeast(u64, Vec<usize>),
    /// Every one of these (true when there are none).
    All(Vec<usize>),
}

#[derive(Debug)]
enum Det {
    AllOf(Vec<Item>),
    AnyOf(Vec<Det>),
    /// Any of these against every string value of the event.
    Keywords(Vec<Matcher>),
}

#[derive(Debug)]
struct Item {
    /// `None`: the item is tested against every string of the event.
    field: Option<Field>,
    /// `|exists`: whether the field must be present (and not null).
    exists: Option<bool>,
    matcher: Matcher,
}

/// A field as a Sigma rule names it.
#[derive(Debug, Clone)]
struct Field {
    /// As written: a top-level key first.
    name: String,
    /// Split on dots.
    path: Vec<String>,
}

#[derive(Debug)]
enum Matcher {
    Exact(String, Case),
    Contains(String, Case),
    StartsWith(String, Case),
    EndsWith(String, Case),
    Regex(regex::Regex),
    Number(f64),
    Bool(bool),
    Null,
    Cidr(ipnet::IpNet),
    Compare(std::cmp::Ordering, bool, f64),
    FieldRef(Field, StrOp, Case),
    Any(Vec<Matcher>),
    All(Vec<Matcher>),
    Not(Box<Matcher>),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Case {
    Insensitive,
    Sensitive,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum StrOp {
    Exact,
    Contains,
    StartsWith,
    EndsWith,
}

impl Field {
    fn new(name: &str) -> Self {
        Self { name: name.to_string(), path: name.split('.').map(String::from).collect() }
    }

    /// The values at this field: the top-level key as written if there is
    /// one, else the dotted path, fanning out over arrays (empty: absent).
    fn resolve<'a>(&self, event: &'a Value) -> Option<Resolved<'a>> {
        let obj = event.as_object()?;
        if let Some(v) = obj.get(&self.name) {
            return Some(Resolved::One(v));
        }
        if self.path.len() < 2 {
            return None;
        }
        let mut found = Vec::new();
        walk(obj.get(&self.path[0])?, &self.path[1..], &mut found);
        match found.len() {
            0 => None,
            1 => Some(Resolved::One(found[0])),
            _ => Some(Resolved::Many(found)),
        }
    }

    /// The top-level keys the field may be read from.
    fn reads(&self) -> Vec<FieldPath> {
        let mut out = vec![FieldPath::key(&self.name)];
        if self.path.len() > 1 {
            out.push(FieldPath::key(&self.path[0]));
        }
        out
    }
}

fn walk<'a>(v: &'a Value, rest: &[String], out: &mut Vec<&'a Value>) {
    match (rest.split_first(), v) {
        (None, v) => out.push(v),
        (Some(_), Value::Array(items)) => items.iter().for_each(|x| walk(x, rest, out)),
        (Some((key, tail)), Value::Object(m)) => {
            if let Some(x) = m.get(key) {
                walk(x, tail, out);
            }
        }
        _ => {}
    }
}

/// The values a field resolved to: one, or several from arrays on the way
/// (matched as an array: any of them).
enum Resolved<'a> {
    One(&'a Value),
    Many(Vec<&'a Value>),
}

impl Detection {
    /// Compiles a parsed Sigma rule's detection.
    pub fn compile(rule: &SigmaRule) -> Result<Self, Unsupported> {
        if rule.sigma_version.is_some_and(|v| v >= 3) {
            return Err(unsupported("sigma-version 3 (array matching) is not supported", Some("sigma-version")));
        }
        let mut names: Vec<&String> = rule.detection.named.keys().collect();
        names.sort();
        let mut named = Vec::new();
        let (mut reads, mut whole) = (Vec::new(), false);
        for name in names {
            let det = compile_detection(&rule.detection.named[name], &mut reads, &mut whole)?;
            named.push((name.clone(), det));
        }
        let names: Vec<&str> = named.iter().map(|(n, _)| n.as_str()).collect();
        let conditions =
            rule.detection.conditions.iter().map(|c| compile_condition(c, &names)).collect::<Result<Vec<_>, _>>()?;
        if conditions.is_empty() {
            return Err(unsupported("the detection has no condition", Some("detection:")));
        }
        if rule.detection.timeframe.is_some() {
            return Err(unsupported("`timeframe` in a detection (use a correlation rule)", Some("timeframe")));
        }
        reads.sort_by(|a: &FieldPath, b| a.as_str().cmp(b.as_str()));
        reads.dedup();
        Ok(Self { named, conditions, reads, whole })
    }

    /// The field paths it reads (top-level keys, read whole).
    pub fn reads(&self) -> &[FieldPath] {
        &self.reads
    }

    /// Whether it searches every string of the event (keywords), so reads
    /// the whole event.
    pub fn reads_whole_event(&self) -> bool {
        self.whole
    }

    /// Whether the event matches.
    pub fn matches(&self, event: &Event) -> bool {
        let fields = if self.whole { event.whole() } else { &event.value };
        self.matches_value(fields)
    }

    /// Whether a whole event (a JSON object) matches.
    pub fn matches_value(&self, event: &Value) -> bool {
        // Each named detection is evaluated once at most (on the stack for
        // the usual handful).
        let mut small = [None; 16];
        let mut large = Vec::new();
        let memo: &mut [Option<bool>] = if self.named.len() <= small.len() {
            &mut small[..self.named.len()]
        } else {
            large.resize(self.named.len(), None);
            &mut large
        };
        self.conditions.iter().any(|c| self.holds(c, event, memo))
    }

    fn named(&self, i: usize, event: &Value, memo: &mut [Option<bool>]) -> bool {
        *memo[i].get_or_insert_with(|| self.named[i].1.matches(event))
    }

    fn holds(&self, c: &Cond, event: &Value, memo: &mut [Option<bool>]) -> bool {
        match c {
            Cond::And(cs) => cs.iter().all(|c| self.holds(c, event, memo)),
            Cond::Or(cs) => cs.iter().any(|c| self.holds(c, event, memo)),
            Cond::Not(c) => !self.holds(c, event, memo),
            Cond::Is(i) => self.named(*i, event, memo),
            Cond::AtLeast(n, is) => {
                let mut hits = 0u64;
                for &i in is {
                    if hits >= *n {
                        break;
                    }
                    hits += u64::from(self.named(i, event, memo));
                }
                hits >= *n
            }
            Cond::All(is) => is.iter().all(|&i| self.named(i, event, memo)),
        }
    }
}

fn compile_condition(c: &ConditionExpr, names: &[&str]) -> Result<Cond, Unsupported> {
    Ok(match c {
        ConditionExpr::And(cs) => Cond::And(cs.iter().map(|c| compile_condition(c, names)).collect::<Result<_, _>>()?),
        ConditionExpr::Or(cs) => Cond::Or(cs.iter().map(|c| compile_condition(c, names)).collect::<Result<_, _>>()?),
        ConditionExpr::Not(c) => Cond::Not(Box::new(compile_condition(c, names)?)),
        ConditionExpr::Identifier(id) => match names.iter().position(|n| n == id) {
            Some(i) => Cond::Is(i),
            None => return Err(unsupported(format!("the condition names no detection {id:?}"), Some("condition"))),
        },
        ConditionExpr::Selector { quantifier, pattern } => {
            let picked: Vec<usize> = (0..names.len()).filter(|&i| pattern.matches_detection_name(names[i])).collect();
            match quantifier {
                Quantifier::Any => Cond::AtLeast(1, picked),
                Quantifier::Count(n) => Cond::AtLeast(*n, picked),
                Quantifier::All => Cond::All(picked),
            }
        }
    })
}

fn compile_detection(d: &SigmaDetection, reads: &mut Vec<FieldPath>, whole: &mut bool) -> Result<Det, Unsupported> {
    Ok(match d {
        SigmaDetection::AllOf(items) => {
            if items.is_empty() {
                return Err(unsupported("an empty detection", Some("detection:")));
            }
            Det::AllOf(items.iter().map(|i| compile_item(i, reads, whole)).collect::<Result<_, _>>()?)
        }
        SigmaDetection::AnyOf(ds) => {
            Det::AnyOf(ds.iter().map(|d| compile_detection(d, reads, whole)).collect::<Result<_, _>>()?)
        }
        SigmaDetection::Keywords(values) => {
            *whole = true;
            Det::Keywords(values.iter().map(keyword).collect::<Result<_, _>>()?)
        }
        _ => return Err(unsupported("sigma-version 3 array matching is not supported", Some("detection:"))),
    })
}

/// A keyword: a case-insensitive substring of any string of the event.
fn keyword(v: &SigmaValue) -> Result<Matcher, Unsupported> {
    Ok(match v {
        SigmaValue::String(s) if s.is_plain() => {
            Matcher::Contains(s.as_plain().unwrap_or_default().to_lowercase(), Case::Insensitive)
        }
        SigmaValue::String(s) => wildcard(s, StrOp::Contains, Case::Insensitive)?,
        // Only strings are searched: other keywords never match.
        SigmaValue::Integer(n) => Matcher::Number(*n as f64),
        SigmaValue::Float(n) => Matcher::Number(*n),
        SigmaValue::Bool(b) => Matcher::Bool(*b),
        SigmaValue::Null => Matcher::Null,
    })
}

/// The modifiers of one detection item.
#[derive(Default)]
struct Mods {
    op: Option<Modifier>,
    all: bool,
    cased: bool,
    base64: bool,
    base64offset: bool,
    windash: bool,
    fieldref: bool,
    neq: bool,
    exists: bool,
    re_flags: String,
}

impl Mods {
    fn read(item: &DetectionItem, near: &str) -> Result<Self, Unsupported> {
        let mut m = Mods::default();
        for modifier in &item.field.modifiers {
            match modifier {
                Modifier::Contains
                | Modifier::StartsWith
                | Modifier::EndsWith
                | Modifier::Re
                | Modifier::Cidr
                | Modifier::Gt
                | Modifier::Gte
                | Modifier::Lt
                | Modifier::Lte => {
                    if m.op.is_some() {
                        return Err(unsupported("two matching modifiers on one field", Some(near)));
                    }
                    m.op = Some(*modifier);
                }
                Modifier::Exists => m.exists = true,
                Modifier::All => m.all = true,
                Modifier::Cased => m.cased = true,
                Modifier::Base64 => m.base64 = true,
                Modifier::Base64Offset => m.base64offset = true,
                Modifier::WindAsh => m.windash = true,
                Modifier::FieldRef => m.fieldref = true,
                Modifier::Neq => m.neq = true,
                Modifier::IgnoreCase => m.re_flags.push('i'),
                Modifier::Multiline => m.re_flags.push('m'),
                Modifier::DotAll => m.re_flags.push('s'),
                other => {
                    return Err(unsupported(format!("the modifier {other:?} is not supported"), Some(near)));
                }
            }
        }
        let encoded = m.base64 || m.base64offset || m.windash;
        let special = matches!(
            m.op,
            Some(Modifier::Re | Modifier::Cidr | Modifier::Gt | Modifier::Gte | Modifier::Lt | Modifier::Lte)
        ) || m.exists
            || m.fieldref;
        if (m.base64 && m.base64offset) || (encoded && special) || (m.exists && m.op.is_some()) {
            return Err(unsupported("these modifiers do not go together", Some(near)));
        }
        if !m.re_flags.is_empty() && m.op != Some(Modifier::Re) {
            return Err(unsupported("|i, |m or |s without |re", Some(near)));
        }
        if m.fieldref
            && matches!(
                m.op,
                Some(Modifier::Re | Modifier::Cidr | Modifier::Gt | Modifier::Gte | Modifier::Lt | Modifier::Lte)
            )
        {
            return Err(unsupported("|fieldref takes only |contains, |startswith or |endswith", Some(near)));
        }
        if m.all && item.values.len() <= 1 {
            return Err(unsupported("|all with one value", Some(near)));
        }
        Ok(m)
    }

    fn case(&self) -> Case {
        if self.cased {
            Case::Sensitive
        } else {
            Case::Insensitive
        }
    }

    fn str_op(&self) -> StrOp {
        match self.op {
            Some(Modifier::Contains) => StrOp::Contains,
            Some(Modifier::StartsWith) => StrOp::StartsWith,
            Some(Modifier::EndsWith) => StrOp::EndsWith,
            _ => StrOp::Exact,
        }
    }
}

fn compile_item(item: &DetectionItem, reads: &mut Vec<FieldPath>, whole: &mut bool) -> Result<Item, Unsupported> {
    let written = item.field.name.clone().unwrap_or_default();
    let near = if written.is_empty() { "detection:".to_string() } else { written.clone() };
    let m = Mods::read(item, &near)?;
    let field = match item.field.name.as_deref().map(rsigma_parser::fieldpath::unescape_brackets) {
        Some(name) if !name.is_empty() => {
            let f = Field::new(&name);
            reads.extend(f.reads());
            Some(f)
        }
        _ => {
            *whole = true;
            None
        }
    };
    if m.exists {
        let want = match item.values.first() {
            Some(SigmaValue::Bool(b)) => *b,
            Some(SigmaValue::String(s)) => !matches!(s.original.to_lowercase().as_str(), "false" | "no"),
            _ => true,
        };
        return Ok(Item { field, exists: Some(want), matcher: Matcher::Any(Vec::new()) });
    }
    let mut matchers = Vec::new();
    for v in &item.values {
        let matcher = value(v, &m, &near)?;
        if let Matcher::FieldRef(f, ..) = &matcher {
            reads.extend(f.reads());
        }
        matchers.push(matcher);
    }
    let mut matcher = if m.all { Matcher::All(matchers) } else { one_or_any(matchers) };
    if m.neq {
        matcher = Matcher::Not(Box::new(matcher));
    }
    Ok(Item { field, exists: None, matcher })
}

fn one_or_any(mut ms: Vec<Matcher>) -> Matcher {
    if ms.len() == 1 {
        ms.pop().unwrap_or(Matcher::Any(Vec::new()))
    } else {
        Matcher::Any(ms)
    }
}

/// The text of a value given to a modifier that takes text.
fn text(v: &SigmaValue, near: &str) -> Result<String, Unsupported> {
    match v {
        SigmaValue::String(s) => Ok(s.as_plain().unwrap_or_else(|| s.original.clone())),
        SigmaValue::Integer(n) => Ok(n.to_string()),
        SigmaValue::Float(n) => Ok(n.to_string()),
        SigmaValue::Bool(b) => Ok(b.to_string()),
        SigmaValue::Null => Err(unsupported("null given to a modifier that takes text", Some(near))),
    }
}

fn value(v: &SigmaValue, m: &Mods, near: &str) -> Result<Matcher, Unsupported> {
    let case = m.case();
    if m.fieldref {
        let name = text(v, near)?;
        if name.contains(['*', '?']) {
            return Err(unsupported("|fieldref with a wildcard", Some(near)));
        }
        return Ok(Matcher::FieldRef(Field::new(&name), m.str_op(), case));
    }
    match m.op {
        Some(Modifier::Re) => {
            let pattern = match v {
                SigmaValue::String(s) => s.original.clone(),
                other => text(other, near)?,
            };
            let flags = if m.re_flags.is_empty() { String::new() } else { format!("(?{})", m.re_flags) };
            return regex::Regex::new(&format!("{flags}{pattern}"))
                .map(Matcher::Regex)
                .map_err(|e| unsupported(format!("a regular expression riskd cannot compile: {e}"), Some(near)));
        }
        Some(Modifier::Cidr) => {
            let net = text(v, near)?;
            return net
                .parse::<ipnet::IpNet>()
                .map(Matcher::Cidr)
                .map_err(|e| unsupported(format!("{net:?} is not a network: {e}"), Some(near)));
        }
        Some(ref op @ (Modifier::Gt | Modifier::Gte | Modifier::Lt | Modifier::Lte)) => {
            let n = match v {
                SigmaValue::Integer(n) => *n as f64,
                SigmaValue::Float(n) => *n,
                SigmaValue::String(s) => s.original.parse::<f64>().map_err(|_| {
                    unsupported(format!("{:?} is not a number to compare with", s.original), Some(near))
                })?,
                _ => return Err(unsupported("a comparison needs a number", Some(near))),
            };
            use std::cmp::Ordering::{Greater, Less};
            return Ok(match op {
                Modifier::Gt => Matcher::Compare(Greater, false, n),
                Modifier::Gte => Matcher::Compare(Greater, true, n),
                Modifier::Lt => Matcher::Compare(Less, false, n),
                _ => Matcher::Compare(Less, true, n),
            });
        }
        _ => {}
    }
    let op = m.str_op();
    let s = match v {
        SigmaValue::Integer(n) if op != StrOp::Exact => return Ok(plain(&n.to_string(), op, case)),
        SigmaValue::Float(n) if op != StrOp::Exact => return Ok(plain(&n.to_string(), op, case)),
        SigmaValue::Integer(n) => return Ok(Matcher::Number(*n as f64)),
        SigmaValue::Float(n) => return Ok(Matcher::Number(*n)),
        SigmaValue::Bool(b) => return Ok(Matcher::Bool(*b)),
        SigmaValue::Null if m.base64 || m.base64offset || m.windash || op != StrOp::Exact => {
            return Err(unsupported("null with a string modifier", Some(near)));
        }
        SigmaValue::Null => return Ok(Matcher::Null),
        SigmaValue::String(s) => s,
    };
    let bytes = s.as_plain().unwrap_or_else(|| s.original.clone());
    if m.base64 {
        return Ok(plain(&base64::engine::general_purpose::STANDARD.encode(bytes.as_bytes()), op, case));
    }
    if m.base64offset {
        let ms = base64_offsets(bytes.as_bytes()).iter().map(|p| plain(p, StrOp::Contains, case)).collect();
        return Ok(Matcher::Any(ms));
    }
    if m.windash {
        let dashes = bytes.matches('-').count();
        if dashes > 8 {
            return Err(unsupported("|windash on a value with more than 8 dashes", Some(near)));
        }
        return Ok(Matcher::Any(windash(&bytes).iter().map(|v| plain(v, op, case)).collect()));
    }
    if s.is_plain() {
        return Ok(plain(&bytes, op, case));
    }
    wildcard(s, op, case)
}

fn plain(text: &str, op: StrOp, case: Case) -> Matcher {
    let text = if case == Case::Insensitive { text.to_lowercase() } else { text.to_string() };
    match op {
        StrOp::Exact => Matcher::Exact(text, case),
        StrOp::Contains => Matcher::Contains(text, case),
        StrOp::StartsWith => Matcher::StartsWith(text, case),
        StrOp::EndsWith => Matcher::EndsWith(text, case),
    }
}

/// A string with wildcards, as a regular expression (`.` does not cross a
/// line break, as in rsigma).
fn wildcard(s: &SigmaString, op: StrOp, case: Case) -> Result<Matcher, Unsupported> {
    let mut pattern = String::new();
    if case == Case::Insensitive {
        pattern.push_str("(?i)");
    }
    if !matches!(op, StrOp::Contains | StrOp::StartsWith) {
        pattern.push('^');
    }
    for part in &s.parts {
        match part {
            StringPart::Plain(t) => pattern.push_str(&regex::escape(t)),
            StringPart::Special(SpecialChar::WildcardMulti) => pattern.push_str(".*"),
            StringPart::Special(SpecialChar::WildcardSingle) => pattern.push('.'),
        }
    }
    if !matches!(op, StrOp::Contains | StrOp::EndsWith) {
        pattern.push('$');
    }
    regex::Regex::new(&pattern)
        .map(Matcher::Regex)
        .map_err(|e| unsupported(format!("a wildcard value riskd cannot compile: {e}"), None))
}

/// `|base64offset`: the value base64-encoded at each of the three offsets
/// it may start at in a longer encoded text, less the characters the
/// neighbouring bytes change (as rsigma computes them).
fn base64_offsets(value: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    for offset in 0..3usize {
        let mut padded = vec![0u8; offset];
        padded.extend_from_slice(value);
        let encoded = base64::engine::general_purpose::STANDARD.encode(&padded);
        let start = (offset * 4).div_ceil(3);
        let trimmed = encoded.trim_end_matches('=');
        if start < trimmed.len() {
            out.push(trimmed[start..].to_string());
        }
    }
    out
}

/// `|windash`: every `-` of the value as each of `-`, `/` and three other dashes.
fn windash(value: &str) -> Vec<String> {
    const DASHES: [char; 5] = ['-', '/', '\u{2013}', '\u{2014}', '\u{2015}'];
    let mut out = vec![String::new()];
    for c in value.chars() {
        if c == '-' {
            out = out.iter().flat_map(|prefix| DASHES.iter().map(move |d| format!("{prefix}{d}"))).collect();
        } else {
            out.iter_mut().for_each(|p| p.push(c));
        }
    }
    out
}

impl Det {
    fn matches(&self, event: &Value) -> bool {
        match self {
            Det::AllOf(items) => items.iter().all(|i| i.matches(event)),
            Det::AnyOf(ds) => ds.iter().any(|d| d.matches(event)),
            // One walk over the event's strings, each lowercased once for all keywords.
            Det::Keywords(ms) => {
                let mut folded = String::new();
                any_string(event, 0, &mut |s| {
                    folded.clear();
                    if s.is_ascii() {
                        folded.push_str(s);
                        folded.make_ascii_lowercase();
                    } else {
                        folded.push_str(&s.to_lowercase());
                    }
                    ms.iter().any(|m| m.matches_folded(s, &folded))
                })
            }
        }
    }
}

impl Item {
    fn matches(&self, event: &Value) -> bool {
        let Some(field) = &self.field else {
            return any_string(event, 0, &mut |s| self.matcher.matches_str(s));
        };
        let found = field.resolve(event);
        if let Some(want) = self.exists {
            let present = match &found {
                Some(Resolved::One(v)) => !v.is_null(),
                Some(Resolved::Many(_)) => true,
                None => false,
            };
            return present == want;
        }
        match found {
            Some(Resolved::One(v)) => self.matcher.matches(v, event),
            Some(Resolved::Many(vs)) => self.matcher.matches_many(&vs, event),
            None => matches!(self.matcher, Matcher::Null),
        }
    }
}

/// Whether `test` holds for any string in `v`, looking into objects and
/// arrays (64 levels at most).
fn any_string(v: &Value, depth: usize, test: &mut dyn FnMut(&str) -> bool) -> bool {
    if depth > 64 {
        return false;
    }
    match v {
        Value::String(s) => test(s),
        Value::Array(a) => a.iter().any(|x| any_string(x, depth + 1, test)),
        Value::Object(m) => m.values().any(|x| any_string(x, depth + 1, test)),
        _ => false,
    }
}

/// A value as the text string matchers compare (rsigma's coercion): numbers
/// as Rust prints them (5.0 as "5"), booleans as words; not null or objects.
fn as_text(v: &Value) -> Option<std::borrow::Cow<'_, str>> {
    match v {
        Value::String(s) => Some(std::borrow::Cow::Borrowed(s)),
        Value::Number(n) => Some(std::borrow::Cow::Owned(match n.as_i64() {
            Some(i) => i.to_string(),
            None => n.as_f64().map(|f| f.to_string()).unwrap_or_default(),
        })),
        Value::Bool(b) => Some(std::borrow::Cow::Borrowed(if *b { "true" } else { "false" })),
        _ => None,
    }
}

/// A value as a number (a numeric string too).
fn as_number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_i64().map(|i| i as f64).or_else(|| n.as_f64()),
        Value::String(s) => s.parse::<f64>().ok(),
        _ => None,
    }
}

impl Matcher {
    /// Against the value of a field (an array: any element).
    fn matches(&self, v: &Value, event: &Value) -> bool {
        match self {
            Matcher::Any(ms) => ms.iter().any(|m| m.matches(v, event)),
            Matcher::All(ms) => ms.iter().all(|m| m.matches(v, event)),
            Matcher::Not(m) => !m.matches(v, event),
            Matcher::Null => v.is_null(),
            Matcher::FieldRef(field, op, case) => fieldref(field, *op, *case, v, event),
            _ if v.is_array() => v.as_array().is_some_and(|a| a.iter().any(|x| self.matches(x, event))),
            Matcher::Number(n) => as_number(v).is_some_and(|x| (x - n).abs() < f64::EPSILON),
            Matcher::Compare(ord, or_equal, n) => as_number(v)
                .and_then(|x| x.partial_cmp(n))
                .is_some_and(|c| c == *ord || (*or_equal && c == std::cmp::Ordering::Equal)),
            Matcher::Bool(b) => match v {
                Value::Bool(x) => x == b,
                Value::String(s) => {
                    let s = s.to_lowercase();
                    if *b {
                        matches!(s.as_str(), "true" | "1" | "yes")
                    } else {
                        matches!(s.as_str(), "false" | "0" | "no")
                    }
                }
                _ => false,
            },
            Matcher::Cidr(net) => {
                as_text(v).and_then(|s| s.parse::<std::net::IpAddr>().ok()).is_some_and(|ip| net.contains(&ip))
            }
            _ => as_text(v).is_some_and(|s| self.matches_str(&s)),
        }
    }

    /// Against the values of a field found through arrays: any of them.
    fn matches_many(&self, vs: &[&Value], event: &Value) -> bool {
        match self {
            Matcher::Any(ms) => ms.iter().any(|m| m.matches_many(vs, event)),
            Matcher::All(ms) => ms.iter().all(|m| m.matches_many(vs, event)),
            Matcher::Not(m) => !m.matches_many(vs, event),
            Matcher::Null => false,
            _ => vs.iter().any(|v| self.matches(v, event)),
        }
    }

    /// Against a string (keywords search strings only).
    fn matches_str(&self, s: &str) -> bool {
        // ASCII text against an ASCII value: no lowercase copy needed (both
        // ASCII, Unicode and ASCII case folding agree).
        if s.is_ascii() {
            let fold = |v: &str, c: &Case, t: &str| match c {
                Case::Insensitive => v.is_ascii() && t.eq_ignore_ascii_case(v),
                Case::Sensitive => t == v,
            };
            match self {
                Matcher::Exact(v, c) if v.is_ascii() => return fold(v, c, s),
                Matcher::StartsWith(v, c) if v.is_ascii() => {
                    return s.len() >= v.len() && fold(v, c, &s[..v.len()]);
                }
                Matcher::EndsWith(v, c) if v.is_ascii() => {
                    return s.len() >= v.len() && fold(v, c, &s[s.len() - v.len()..]);
                }
                _ => {}
            }
        }
        let folded =
            if self.folds() { std::borrow::Cow::Owned(s.to_lowercase()) } else { std::borrow::Cow::Borrowed(s) };
        self.matches_folded(s, &folded)
    }

    /// Against a string and its lowercase.
    fn matches_folded(&self, s: &str, folded: &str) -> bool {
        let text = |c: &Case| if *c == Case::Insensitive { folded } else { s };
        match self {
            Matcher::Exact(v, c) => text(c) == v,
            Matcher::Contains(v, c) => text(c).contains(v.as_str()),
            Matcher::StartsWith(v, c) => text(c).starts_with(v.as_str()),
            Matcher::EndsWith(v, c) => text(c).ends_with(v.as_str()),
            Matcher::Regex(r) => r.is_match(s),
            Matcher::Any(ms) => ms.iter().any(|m| m.matches_folded(s, folded)),
            Matcher::All(ms) => ms.iter().all(|m| m.matches_folded(s, folded)),
            Matcher::Not(m) => !m.matches_folded(s, folded),
            _ => false,
        }
    }

    fn folds(&self) -> bool {
        match self {
            Matcher::Exact(_, c) | Matcher::Contains(_, c) | Matcher::StartsWith(_, c) | Matcher::EndsWith(_, c) => {
                *c == Case::Insensitive
            }
            Matcher::Any(ms) | Matcher::All(ms) => ms.iter().any(Matcher::folds),
            Matcher::Not(m) => m.folds(),
            _ => false,
        }
    }
}

/// `|fieldref`: the field's value compared with another field's.
fn fieldref(other: &Field, op: StrOp, case: Case, v: &Value, event: &Value) -> bool {
    let Some(found) = other.resolve(event) else { return false };
    let reference = match &found {
        Resolved::One(r) => *r,
        // Values gathered through arrays compare as a list: not as text.
        Resolved::Many(_) => return false,
    };
    match op {
        StrOp::Exact => match (case, as_text(v), as_text(reference)) {
            (Case::Insensitive, Some(a), Some(b)) if !v.is_array() && !reference.is_array() => {
                a.to_lowercase() == b.to_lowercase()
            }
            _ => v == reference,
        },
        op => {
            let Some(r) = as_text(reference) else { return false };
            plain(&r, op, case).matches(v, event)
        }
    }
}

/// A field a detection can only match when it holds one of some values:
/// its prefilter for [`Index`]. The values are ASCII, lowercased (a
/// superset of what matches, whatever the case rule).
#[derive(Debug, Clone)]
pub struct Required {
    field: Field,
    values: Vec<String>,
}

impl Required {
    /// Two requirements on the same field: either holds.
    fn or(self, other: Required) -> Option<Required> {
        (self.field.name == other.field.name).then(|| {
            let mut values = self.values;
            values.extend(other.values);
            values.sort();
            values.dedup();
            Required { field: self.field, values }
        })
    }

    /// Several alternatives: each must require the same field.
    pub fn any_of(alternatives: impl IntoIterator<Item = Option<Required>>) -> Option<Required> {
        let mut out: Option<Required> = None;
        for r in alternatives {
            let r = r?;
            out = Some(match out {
                None => r,
                Some(o) => o.or(r)?,
            });
        }
        out
    }
}

impl Detection {
    /// A field and values without which the detection cannot match, if its
    /// conditions name one (an exact value, or a list of them, of a field
    /// in every way it can match); `None` when it may match otherwise.
    pub fn required(&self) -> Option<Required> {
        Required::any_of(self.conditions.iter().map(|c| self.cond_required(c)))
    }

    fn cond_required(&self, c: &Cond) -> Option<Required> {
        match c {
            Cond::And(cs) => cs.iter().find_map(|c| self.cond_required(c)),
            Cond::Or(cs) => Required::any_of(cs.iter().map(|c| self.cond_required(c))),
            Cond::Not(_) => None,
            Cond::Is(i) => self.named[*i].1.required(),
            Cond::AtLeast(n, is) if *n >= 1 => Required::any_of(is.iter().map(|i| self.named[*i].1.required())),
            Cond::AtLeast(..) => None,
            Cond::All(is) => is.iter().find_map(|i| self.named[*i].1.required()),
        }
    }
}

impl Det {
    fn required(&self) -> Option<Required> {
        match self {
            Det::AllOf(items) => items.iter().find_map(Item::required),
            Det::AnyOf(ds) => Required::any_of(ds.iter().map(Det::required)),
            Det::Keywords(_) => None,
        }
    }
}

impl Item {
    fn required(&self) -> Option<Required> {
        let field = self.field.clone()?;
        if self.exists.is_some() {
            return None;
        }
        let exact = |m: &Matcher| match m {
            Matcher::Exact(v, _) if v.is_ascii() => Some(v.to_ascii_lowercase()),
            _ => None,
        };
        let values = match &self.matcher {
            Matcher::Any(ms) => ms.iter().map(exact).collect::<Option<Vec<_>>>()?,
            m => vec![exact(m)?],
        };
        Some(Required { field, values })
    }
}

/// A field of the index: the rules that need a value of it, by value, and
/// all its rules.
type IndexedField = (Field, std::collections::HashMap<String, Vec<usize>>, Vec<usize>);

/// Which Sigma rules an event can match at all, from their [`Required`]
/// fields: an event whose field holds none of a rule's values is not
/// evaluated against it. A value that is not plain ASCII text (a number
/// read as text, a Unicode string whose lowercase may be ASCII) passes
/// every rule of its field; a rule without a prefilter is always evaluated.
#[derive(Debug, Default)]
pub struct Index {
    /// By field: the rules (indexes) that need a value, by value, and all
    /// the rules on that field.
    fields: Vec<IndexedField>,
    /// Per rule: it has a prefilter (it is evaluated only when marked).
    filtered: Vec<bool>,
}

impl Index {
    /// For the rules (by index) and their requirements, if any.
    pub fn new(rules: impl IntoIterator<Item = Option<Required>>) -> Self {
        let mut index = Index::default();
        for (i, req) in rules.into_iter().enumerate() {
            index.filtered.push(req.is_some());
            let Some(req) = req else { continue };
            let at = match index.fields.iter().position(|(f, _, _)| f.name == req.field.name) {
                Some(at) => at,
                None => {
                    index.fields.push((req.field.clone(), Default::default(), Vec::new()));
                    index.fields.len() - 1
                }
            };
            let (_, by_value, all) = &mut index.fields[at];
            all.push(i);
            for v in req.values {
                by_value.entry(v).or_default().push(i);
            }
        }
        index
    }

    /// Whether any rule is filtered (else [`Index::candidates`] marks all).
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// Marks in `out` (one per rule) the rules the event may match.
    pub fn candidates(&self, event: &Value, out: &mut Vec<bool>) {
        out.clear();
        out.extend(self.filtered.iter().map(|f| !f));
        let mut mark = |rules: &[usize]| rules.iter().for_each(|&i| out[i] = true);
        for (field, by_value, all) in &self.fields {
            let values: Vec<&Value> = match field.resolve(event) {
                None => continue,
                Some(Resolved::One(v)) => vec![v],
                Some(Resolved::Many(vs)) => vs,
            };
            for v in values {
                match v {
                    Value::String(s) if s.is_ascii() => {
                        if let Some(rules) = by_value.get(s.to_ascii_lowercase().as_str()) {
                            mark(rules);
                        }
                    }
                    Value::Array(_) | Value::Object(_) | Value::Null => {
                        // Arrays match by element, and are rare here: every rule of the field.
                        if v.is_array() {
                            mark(all);
                        }
                    }
                    _ => mark(all),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rule(detection: &str) -> Detection {
        let yaml = format!("title: t\nlogsource: {{product: aws, service: cloudtrail}}\ndetection:\n{detection}");
        let c = rsigma_parser::parse_sigma_yaml(&yaml).unwrap();
        assert!(c.errors.is_empty(), "{:?}", c.errors);
        Detection::compile(&c.rules[0]).unwrap()
    }

    #[test]
    fn strings_match_without_case_and_with_wildcards() {
        let d = rule("  sel:\n    eventName: 'DeleteBucket'\n  condition: sel");
        assert!(d.matches_value(&json!({"eventName": "deletebucket"})));
        assert!(!d.matches_value(&json!({"eventName": "DeleteBuckets"})));
        let d = rule("  sel:\n    eventName: 'Delete*'\n  condition: sel");
        assert!(d.matches_value(&json!({"eventName": "DELETEbucket"})));
        assert!(!d.matches_value(&json!({"eventName": "xDelete"})));
        let d = rule("  sel:\n    eventName|contains|all: ['Del', 'Buck']\n  condition: sel");
        assert!(d.matches_value(&json!({"eventName": "DeleteBucket"})));
        assert!(!d.matches_value(&json!({"eventName": "DeleteObject"})));
        let d = rule("  sel:\n    eventName|cased: 'DeleteBucket'\n  condition: sel");
        assert!(!d.matches_value(&json!({"eventName": "deletebucket"})));
    }

    #[test]
    fn fields_are_keys_first_then_paths_over_arrays() {
        let d = rule("  sel:\n    userIdentity.type: 'Root'\n  condition: sel");
        assert!(d.matches_value(&json!({"userIdentity": {"type": "Root"}})));
        assert!(d.matches_value(&json!({"userIdentity.type": "root"})));
        assert!(d.matches_value(&json!({"userIdentity": [{"type": "x"}, {"type": "Root"}]})));
        assert!(!d.matches_value(&json!({"userIdentity": {"kind": "Root"}})));
        let paths: Vec<&str> = d.reads().iter().map(FieldPath::as_str).collect();
        assert_eq!(paths, ["userIdentity", "userIdentity.type"]);
    }

    #[test]
    fn null_numbers_and_conditions() {
        let d = rule("  a:\n    errorCode: null\n  b:\n    n: 5\n  filter_x:\n    k: v\n  condition: a and b and not 1 of filter_*");
        assert!(d.matches_value(&json!({"n": 5})));
        assert!(d.matches_value(&json!({"errorCode": null, "n": "5.0"})));
        assert!(!d.matches_value(&json!({"errorCode": "x", "n": 5})));
        assert!(!d.matches_value(&json!({"n": 5, "k": "V"})));
    }

    #[test]
    fn keywords_search_every_string() {
        let d = rule("  keywords:\n    - 'evil'\n  condition: keywords");
        assert!(d.reads_whole_event());
        assert!(d.matches_value(&json!({"a": {"b": ["x", "an EVIL one"]}})));
        assert!(!d.matches_value(&json!({"evil": 1})));
    }

    #[test]
    fn encodings() {
        assert_eq!(base64_offsets(b"Test"), ["VGVzdA", "Rlc3Q", "UZXN0"]);
        assert_eq!(windash("a-b").len(), 5);
        assert!(windash("a-b").contains(&"a/b".to_string()));
    }

    #[test]
    fn what_riskd_cannot_express_is_refused_with_why() {
        let yaml = "title: t\nlogsource: {product: aws}\ndetection:\n  sel:\n    a|expand: '%x%'\n  condition: sel";
        let c = rsigma_parser::parse_sigma_yaml(yaml).unwrap();
        let e = Detection::compile(&c.rules[0]).unwrap_err();
        assert!(e.reason.contains("Expand"), "{e:?}");
        assert_eq!(e.near.as_deref(), Some("a"));
    }
}
