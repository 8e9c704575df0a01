//! `[rules] sigma` and `[sigma]`: Sigma rules loaded beside riskd's own.
//!
//! Each Sigma detection rule becomes a stateless riskd rule (default dedup):
//! its entity from the logsource mapping, its risk from its level (or its
//! id or a tag), its id, title, level and tags in every alert's `context.sigma`.
//! A rule riskd cannot express is skipped, and `riskd check` lists it with
//! its file, line and why ([`Skipped`]).

use super::ConfigError;
use crate::alert::Severity;
use crate::event::FieldPath;
use crate::rules::correlation::{Correlation, Kind, Op, MAX_LIMIT};
use crate::rules::sigma::{self as rules_sigma, Detection};
use crate::rules::{Condition, Form, Rule};
use rsigma_parser::{
    ConditionOperator, CorrelationCondition, CorrelationRule, CorrelationType, Level, LogSource, SigmaRule, WindowMode,
};
use serde::Deserialize;
use serde_json::{json, Map};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// `[sigma]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigmaFile {
    /// Risk points by level.
    #[serde(default)]
    pub risk: LevelRisk,
    /// Risk points by rule id (Sigma's or riskd's) or tag, over the level's.
    #[serde(default)]
    pub risk_by: BTreeMap<String, u32>,
    /// Entity by logsource, before (and over) the shipped mappings.
    #[serde(default)]
    pub logsources: Vec<LogsourceFile>,
    /// Field names of the rules → the events' names, where they differ.
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
    /// Entity type by event field, for correlations grouped by a field that
    /// is not their logsource's entity key (`sourceIPAddress = "ip"`), over
    /// the shipped ones.
    #[serde(default)]
    pub entities: BTreeMap<String, String>,
    /// Dedup window of the Sigma rules' alerts (default 1h).
    #[serde(default)]
    pub dedup: Option<String>,
}

/// The shipped entity types of group-by fields (besides every logsource's
/// entity key): the source addresses of the shipped logsources.
fn shipped_entities() -> Vec<(&'static str, &'static str)> {
    vec![
        ("sourceIPAddress", "ip"),
        ("client.ipAddress", "ip"),
        ("callerIpAddress", "ip"),
        ("ipAddress", "ip"),
        ("protoPayload.requestMetadata.callerIp", "ip"),
        ("ClientIP", "ip"),
    ]
}

/// Risk points of a Sigma rule by its level. The defaults: with the default
/// threshold (100) and half-life (24 h), four medium findings within half a
/// day, or five within a day, cross it; one critical does on its own.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LevelRisk {
    /// `informational` (alerts, adds no risk).
    pub informational: u32,
    /// `low`.
    pub low: u32,
    /// `medium`, and rules without a level.
    pub medium: u32,
    /// `high`.
    pub high: u32,
    /// `critical`.
    pub critical: u32,
}

impl Default for LevelRisk {
    fn default() -> Self {
        Self { informational: 0, low: 10, medium: 30, high: 50, critical: 100 }
    }
}

/// Which entity the rules of a logsource are about.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsourceFile {
    /// Sigma's `logsource.product`; absent: any.
    pub product: Option<String>,
    /// `logsource.service`; absent: any.
    pub service: Option<String>,
    /// `logsource.category`; absent: any.
    pub category: Option<String>,
    /// The entity type of its alerts.
    pub entity_type: String,
    /// Where the entity id is in its events.
    pub entity_key: String,
    /// A CEL condition an event must meet besides the detection (which
    /// events are of this logsource), if any.
    #[serde(rename = "match")]
    pub match_: Option<String>,
}

/// The shipped mappings for the logsources of SigmaHQ's cloud and identity
/// rules, by the field each log names its actor with.
fn shipped_logsources() -> Vec<LogsourceFile> {
    // Without a gate of its own, a logsource's events are those with its
    // entity key: other logs' events are passed over, not reported as
    // lacking an entity (and a rule searching whole events skips them).
    let m = |product: &str, service: &str, entity_type: &str, entity_key: &str, match_: Option<&str>| LogsourceFile {
        product: Some(product.into()),
        service: Some(service.into()),
        category: None,
        entity_type: entity_type.into(),
        entity_key: entity_key.into(),
        match_: Some(match_.map(String::from).unwrap_or_else(|| match entity_key.contains('.') {
            true => format!("has({entity_key})"),
            false => format!("{entity_key} != \"\""),
        })),
    };
    vec![
        m("aws", "cloudtrail", "principal", "userIdentity.arn", Some("eventSource.endsWith(\"amazonaws.com\")")),
        m("okta", "okta", "user", "actor.alternateId", Some("has(actor.alternateId) && eventType != \"\"")),
        m("azure", "activitylogs", "user", "caller", None),
        m("azure", "auditlogs", "user", "initiatedBy.user.userPrincipalName", None),
        m("azure", "signinlogs", "user", "userPrincipalName", None),
        m("azure", "riskdetection", "user", "userPrincipalName", None),
        m("azure", "pim", "user", "userPrincipalName", None),
        m("gcp", "gcp.audit", "user", "protoPayload.authenticationInfo.principalEmail", None),
        m("gcp", "google_workspace.admin", "user", "actor.email", None),
        m("gcp", "google_workspace.login", "user", "actor.email", None),
        m("m365", "audit", "user", "UserId", None),
        m("m365", "exchange", "user", "UserId", None),
        m("m365", "threat_detection", "user", "UserId", None),
        m("m365", "threat_management", "user", "UserId", None),
        m("onelogin", "onelogin.events", "user", "user_name", None),
        m("cisco", "duo", "user", "user.name", None),
    ]
}

/// A Sigma rule riskd skipped, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Skipped {
    /// Its file.
    pub file: PathBuf,
    /// The line at fault, where known.
    pub line: Option<usize>,
    /// Its Sigma id (or title), where known.
    pub rule: Option<String>,
    /// Why.
    pub reason: String,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(rule) = &self.rule {
            write!(f, ": {rule}")?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// What loading the Sigma rules gave: the rules, and those skipped.
#[derive(Debug, Default)]
pub struct SigmaLoad {
    /// Rules loaded, by logsource (`product/service/category`, as given).
    pub loaded: BTreeMap<String, usize>,
    /// Rules skipped, with why.
    pub skipped: Vec<Skipped>,
}

/// Loads the Sigma rules of `paths` (files, or folders searched for
/// `*.yml`/`*.yaml` at any depth, in path order). Files that cannot be read
/// or are not YAML are errors; rules riskd cannot express are skipped.
pub fn load(
    paths: &[PathBuf],
    cfg: &SigmaFile,
    taken: &HashSet<String>,
    errors: &mut Vec<ConfigError>,
) -> (Vec<Rule>, SigmaLoad) {
    let mut files = Vec::new();
    for p in paths {
        collect(p, &mut files, errors);
    }
    let mut logsources = cfg.logsources.clone();
    logsources.extend(shipped_logsources());
    let gates = compile_gates(&logsources, errors);
    let dedup_window_ms = match cfg.dedup.as_deref().map(|d| humantime::parse_duration(d.trim())) {
        None => 3_600_000,
        Some(Ok(d)) if !d.is_zero() => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Some(_) => {
            let given = cfg.dedup.clone().unwrap_or_default();
            errors.push(error(
                Path::new("[sigma]"),
                None,
                None,
                format!("dedup: invalid duration {given:?}; use e.g. 90s, 15m, 1h"),
            ));
            3_600_000
        }
    };
    for (field, t) in &cfg.entities {
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
            let message = format!("entities: {field} = {t:?}: an entity type is lowercase letters, digits and _");
            errors.push(error(Path::new("[sigma]"), None, None, message));
        }
    }
    let ctx = Ctx { cfg, logsources: &logsources, gates: &gates, dedup_window_ms };
    let mut out = (Vec::new(), SigmaLoad::default());
    let mut ids: HashSet<String> = taken.clone();
    // Detection rules by Sigma id and name (for correlations), and the
    // correlations, loaded once every file's rules are.
    let mut known: BTreeMap<String, (SigmaRule, usize)> = BTreeMap::new();
    let mut correlations = Vec::new();
    for file in files {
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) => {
                errors.push(error(&file, None, None, format!("cannot read Sigma rule file: {e}")));
                continue;
            }
        };
        let collection = match rsigma_parser::parse_sigma_yaml(&text) {
            Ok(c) => c,
            Err(e) => {
                out.1.skipped.push(skip(&file, &text, None, None, e.to_string()));
                continue;
            }
        };
        for e in &collection.errors {
            if e.starts_with("YAML parse error") {
                errors.push(error(&file, yaml_line(e), None, e.clone()));
            } else {
                out.1.skipped.push(skip(&file, &text, None, None, e.clone()));
            }
        }
        let stated = conditions_stated(&text);
        for (n, c) in collection.correlations.iter().enumerate() {
            let stated = stated.get(n).copied().unwrap_or(true);
            correlations.push((file.clone(), text.clone(), c.clone(), stated, n + 1));
        }
        for f in &collection.filters {
            let reason = "filter rules are not supported".to_string();
            out.1.skipped.push(skip(
                &file,
                &text,
                Some("filter:"),
                Some(f.id.clone().unwrap_or(f.title.clone())),
                reason,
            ));
        }
        let several = collection.rules.len() > 1;
        for (n, sigma) in collection.rules.iter().enumerate() {
            let name = sigma.id.clone().unwrap_or_else(|| sigma.title.clone());
            let mut id = riskd_id(&file, several.then_some(n + 1));
            while !ids.insert(id.clone()) {
                id.push('_');
            }
            match convert(sigma, id, &file, &ctx) {
                Ok((rule, logsource)) => {
                    *out.1.loaded.entry(logsource).or_default() += 1;
                    for name in sigma.id.iter().chain(&sigma.name) {
                        known.insert(name.clone(), (sigma.clone(), out.0.len()));
                    }
                    out.0.push(rule);
                }
                Err(why) => out.1.skipped.push(skip(&file, &text, why.near.as_deref(), Some(name), why.reason)),
            }
        }
    }
    // A referenced rule alerts on its own only if a correlation naming it
    // says `generate: true` (Sigma's default is false).
    let mut silenced = HashSet::new();
    let mut generated = HashSet::new();
    let several = correlations.len() > 1;
    for (file, text, c, stated, n) in correlations {
        let name = c.id.clone().unwrap_or_else(|| c.title.clone());
        let mut id = riskd_id(&file, None);
        id.push_str("_correlation");
        if several && n > 1 {
            id.push_str(&format!("_{n}"));
        }
        while !ids.insert(id.clone()) {
            id.push('_');
        }
        match convert_correlation(&c, stated, id, &file, &ctx, &known) {
            Ok((rule, referenced)) => {
                *out.1.loaded.entry(format!("correlation/{}", rule_type(&rule))).or_default() += 1;
                let to = if c.generate { &mut generated } else { &mut silenced };
                to.extend(referenced);
                out.0.push(rule);
            }
            Err(why) => out.1.skipped.push(skip(&file, &text, why.near.as_deref(), Some(name), why.reason)),
        }
    }
    for i in silenced.difference(&generated) {
        out.0[*i].enabled = false;
    }
    out
}

fn rule_type(rule: &Rule) -> &'static str {
    match &rule.form {
        Form::Correlation(c) => c.type_name(),
        _ => "detection",
    }
}

/// For each correlation document of a file, in order: whether it states a
/// `condition` (a `temporal` one without needs all its rules; the parser
/// cannot tell it from `gte: 1`).
fn conditions_stated(text: &str) -> Vec<bool> {
    use serde::Deserialize as _;
    serde_yaml_ng::Deserializer::from_str(text)
        .filter_map(|doc| serde_yaml_ng::Value::deserialize(doc).ok())
        .filter_map(|doc| doc.get("correlation").map(|c| c.get("condition").is_some()))
        .collect()
}

/// What converting a rule needs of the configuration.
struct Ctx<'a> {
    cfg: &'a SigmaFile,
    logsources: &'a [LogsourceFile],
    gates: &'a [Option<String>],
    dedup_window_ms: i64,
}

fn collect(path: &Path, files: &mut Vec<PathBuf>, errors: &mut Vec<ConfigError>) {
    if !path.is_dir() {
        files.push(path.to_path_buf());
        return;
    }
    let mut found = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        match std::fs::read_dir(&dir) {
            Ok(entries) => {
                for p in entries.filter_map(|e| e.ok().map(|e| e.path())) {
                    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    if p.is_dir() {
                        stack.push(p);
                    } else if (name.ends_with(".yml") || name.ends_with(".yaml")) && !name.contains(".test.") {
                        found.push(p);
                    }
                }
            }
            Err(e) => errors.push(error(&dir, None, None, format!("cannot list Sigma rules folder: {e}"))),
        }
    }
    found.sort();
    files.extend(found);
}

fn error(file: &Path, line: Option<usize>, rule: Option<String>, message: String) -> ConfigError {
    ConfigError { file: file.to_path_buf(), line, rule, message }
}

/// The line a YAML error names (`… at line N column M`).
fn yaml_line(message: &str) -> Option<usize> {
    let rest = &message[message.find(" line ")? + 6..];
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

fn skip(file: &Path, text: &str, near: Option<&str>, rule: Option<String>, reason: String) -> Skipped {
    let line = near.and_then(|n| text.lines().position(|l| l.contains(n))).map(|i| i + 1);
    Skipped { file: file.to_path_buf(), line, rule, reason }
}

/// `sigma_` and the file's name, in the letters riskd ids use.
fn riskd_id(file: &Path, n: Option<usize>) -> String {
    let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or("rule");
    let mut id: String =
        stem.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).collect();
    id.insert_str(0, "sigma_");
    if let Some(n) = n {
        id.push_str(&format!("_{n}"));
    }
    id
}

fn compile_gates(logsources: &[LogsourceFile], errors: &mut Vec<ConfigError>) -> Vec<Option<String>> {
    logsources
        .iter()
        .map(|l| {
            let src = l.match_.clone()?;
            match Condition::compile(&src) {
                Ok(_) => Some(src),
                Err(e) => {
                    errors.push(error(
                        Path::new("[sigma]"),
                        None,
                        None,
                        format!("logsources: match {src:?} does not compile: {e}"),
                    ));
                    None
                }
            }
        })
        .collect()
}

/// The mapping for a rule's logsource: the most specific that fits.
fn mapping<'a>(logsources: &'a [LogsourceFile], ls: &LogSource) -> Option<(usize, &'a LogsourceFile)> {
    let fits = |want: &Option<String>, have: &Option<String>| match want {
        None => true,
        Some(w) => have.as_ref().is_some_and(|h| h.eq_ignore_ascii_case(w)),
    };
    logsources
        .iter()
        .enumerate()
        .filter(|(_, l)| {
            fits(&l.product, &ls.product) && fits(&l.service, &ls.service) && fits(&l.category, &ls.category)
        })
        .max_by_key(|(i, l)| {
            let keys = [&l.product, &l.service, &l.category].iter().filter(|k| k.is_some()).count();
            (keys, std::cmp::Reverse(*i))
        })
}

fn logsource_name(ls: &LogSource) -> String {
    [&ls.product, &ls.service, &ls.category].iter().filter_map(|k| k.as_deref()).collect::<Vec<_>>().join("/")
}

fn level_name(level: Option<Level>) -> &'static str {
    match level {
        Some(Level::Informational) => "informational",
        Some(Level::Low) => "low",
        Some(Level::High) => "high",
        Some(Level::Critical) => "critical",
        Some(Level::Medium) | None => "medium",
    }
}

fn bad(what: &str, e: String) -> rules_sigma::Unsupported {
    rules_sigma::Unsupported { reason: format!("{what}: {e}"), near: None }
}

/// A detection rule's matcher (its detection behind its logsource's gate),
/// its logsource's mapping and its name.
fn matcher<'a>(
    sigma: &SigmaRule,
    file: &Path,
    ctx: &Ctx<'a>,
) -> Result<(Condition, &'a LogsourceFile), rules_sigma::Unsupported> {
    let logsource = logsource_name(&sigma.logsource);
    let Some((index, map)) = mapping(ctx.logsources, &sigma.logsource) else {
        return Err(rules_sigma::Unsupported {
            reason: format!("no entity for logsource {logsource:?}: map it under [[sigma.logsources]]"),
            near: Some("logsource:".into()),
        });
    };
    let renamed = rename_fields(sigma, &ctx.cfg.fields);
    let detection = Detection::compile(renamed.as_ref().unwrap_or(sigma))?;
    let gate = match &ctx.gates[index] {
        Some(src) => Some(Condition::compile(src).map_err(|e| bad("the logsource's match", e))?),
        None => None,
    };
    let sigma_id = sigma.id.clone().unwrap_or_default();
    let source = format!("sigma {} ({})", if sigma_id.is_empty() { &sigma.title } else { &sigma_id }, file.display());
    Ok((Condition::sigma(detection, gate, source), map))
}

/// Risk points and severity of a Sigma rule or correlation: by its id
/// (Sigma's, then riskd's), its tags, then its level.
fn risk_of(cfg: &SigmaFile, sigma_id: &str, id: &str, tags: &[String], level: Option<Level>) -> (u32, Severity) {
    let level = level_name(level);
    let risk = cfg
        .risk_by
        .get(sigma_id)
        .or_else(|| cfg.risk_by.get(id))
        .copied()
        .or_else(|| tags.iter().filter_map(|t| cfg.risk_by.get(t)).max().copied())
        .unwrap_or(match level {
            "informational" => cfg.risk.informational,
            "low" => cfg.risk.low,
            "high" => cfg.risk.high,
            "critical" => cfg.risk.critical,
            _ => cfg.risk.medium,
        });
    let severity = match level {
        "informational" => Severity::Info,
        "low" => Severity::Low,
        "high" => Severity::High,
        "critical" => Severity::Critical,
        _ => Severity::Medium,
    };
    (risk, severity)
}

fn convert(
    sigma: &SigmaRule,
    id: String,
    file: &Path,
    ctx: &Ctx<'_>,
) -> Result<(Rule, String), rules_sigma::Unsupported> {
    let logsource = logsource_name(&sigma.logsource);
    let (matcher, map) = matcher(sigma, file, ctx)?;
    let entity_key = FieldPath::parse(&map.entity_key).map_err(|e| bad("the logsource's entity_key", e.to_string()))?;
    let meta = Meta {
        id: &sigma.id,
        title: &sigma.title,
        description: &sigma.description,
        level: sigma.level,
        tags: &sigma.tags,
    };
    let labels = meta.labels(&logsource, file, json!({}));
    let rule = meta.rule(id, ctx, (map.entity_type.clone(), entity_key, Vec::new()), matcher, Form::Stateless, labels);
    Ok((rule, logsource))
}

/// What a Sigma detection or correlation rule says of itself.
struct Meta<'a> {
    id: &'a Option<String>,
    title: &'a String,
    description: &'a Option<String>,
    level: Option<Level>,
    tags: &'a [String],
}

impl Meta<'_> {
    /// `context.sigma` of its alerts: id, title, level, tags, ATT&CK tags,
    /// logsource, file, and `more`'s keys.
    fn labels(&self, logsource: &str, file: &Path, more: serde_json::Value) -> Map<String, serde_json::Value> {
        let attack: Vec<&String> = self.tags.iter().filter(|t| t.starts_with("attack.")).collect();
        let mut sigma = json!({
            "id": self.id,
            "title": self.title,
            "level": level_name(self.level),
            "tags": self.tags,
            "attack": attack,
            "logsource": logsource,
            "file": file.display().to_string(),
        });
        if let (Some(s), serde_json::Value::Object(more)) = (sigma.as_object_mut(), more) {
            s.extend(more);
        }
        Map::from_iter([("sigma".to_string(), sigma)])
    }

    /// The riskd rule: risk and severity by its id, tags or level; Sigma's
    /// dedup window; `entity` is its type, key and further group-by fields.
    fn rule(
        &self,
        id: String,
        ctx: &Ctx<'_>,
        (entity_type, entity_key, group): (String, FieldPath, Vec<FieldPath>),
        matcher: Condition,
        form: Form,
        labels: Map<String, serde_json::Value>,
    ) -> Rule {
        let (risk, severity) = risk_of(ctx.cfg, self.id.as_deref().unwrap_or_default(), &id, self.tags, self.level);
        Rule {
            namespace: id.clone(),
            id,
            title: self.title.clone(),
            description: self.description.clone().unwrap_or_default(),
            severity,
            enabled: true,
            risk,
            risk_cap: None,
            entity_type,
            entity_key,
            group,
            matcher,
            form,
            fire: None,
            direct: false,
            dedup_window_ms: ctx.dedup_window_ms,
            dedup_key: None,
            context: Vec::new(),
            labels,
        }
    }
}

/// The rule with its field names mapped (`[sigma.fields]`), if any is.
fn rename_fields(sigma: &SigmaRule, names: &BTreeMap<String, String>) -> Option<SigmaRule> {
    if names.is_empty() {
        return None;
    }
    let mut rule = sigma.clone();
    for detection in rule.detection.named.values_mut() {
        rename(detection, names);
    }
    Some(rule)
}

fn rename(d: &mut rsigma_parser::Detection, names: &BTreeMap<String, String>) {
    match d {
        rsigma_parser::Detection::AllOf(items) => {
            for item in items {
                if let Some(to) = item.field.name.as_ref().and_then(|n| names.get(n)) {
                    item.field.name = Some(to.clone());
                }
            }
        }
        rsigma_parser::Detection::AnyOf(ds) => ds.iter_mut().for_each(|d| rename(d, names)),
        _ => {}
    }
}

/// A Sigma correlation as a riskd rule whose matcher is its referenced
/// rules' detections; with the indexes of those rules.
fn convert_correlation(
    c: &CorrelationRule,
    stated: bool,
    id: String,
    file: &Path,
    ctx: &Ctx<'_>,
    known: &BTreeMap<String, (SigmaRule, usize)>,
) -> Result<(Rule, Vec<usize>), rules_sigma::Unsupported> {
    let no = |reason: String, near: &str| rules_sigma::Unsupported { reason, near: Some(near.into()) };
    if c.window != WindowMode::Sliding {
        return Err(no(format!("{} windows are not supported, only sliding ones", c.window.as_str()), "window:"));
    }
    if !c.aliases.is_empty() {
        let why = "aliases are not supported: name the same field in each rule, or map names with [sigma.fields]";
        return Err(no(why.into(), "aliases:"));
    }
    if c.group_by.is_empty() {
        return Err(no("a correlation without group-by has no entity to score".into(), "correlation:"));
    }
    if c.timespan.seconds == 0 {
        return Err(no("timespan must be longer than zero".into(), "timespan:"));
    }
    let rename = |f: &String| ctx.cfg.fields.get(f).cloned().unwrap_or_else(|| f.clone());
    let path = |f: &str| FieldPath::parse(f).map_err(|e| bad(&format!("field {f:?}"), e.to_string()));
    let (predicates, fields) = match &c.condition {
        CorrelationCondition::Threshold { predicates, field, .. } => (predicates, field),
        CorrelationCondition::Extended(_) => {
            let why = "a condition over rule names is not supported: give a count (gte: N)";
            return Err(no(why.into(), "condition:"));
        }
    };
    let kind = match c.correlation_type {
        CorrelationType::EventCount => Kind::EventCount,
        CorrelationType::Temporal => Kind::Temporal,
        CorrelationType::TemporalOrdered => Kind::TemporalOrdered,
        CorrelationType::ValueCount => match fields {
            Some(f) if !f.is_empty() => Kind::ValueCount(f.iter().map(|f| path(&rename(f))).collect::<Result<_, _>>()?),
            _ => return Err(no("value_count needs condition.field".into(), "condition:")),
        },
        other => {
            let why = format!(
                "{} correlations are not supported (event_count, value_count, temporal and temporal_ordered are)",
                other.as_str()
            );
            return Err(no(why, "type:"));
        }
    };
    if let Some((_, n)) = predicates.iter().find(|(_, n)| *n > MAX_LIMIT) {
        let why = format!("condition counts to {n}: riskd keeps up to {MAX_LIMIT} hits per group");
        return Err(no(why, "condition:"));
    }
    let mut predicates: Vec<(Op, f64)> = predicates
        .iter()
        .map(|(op, n)| {
            let op = match op {
                ConditionOperator::Lt => Op::Lt,
                ConditionOperator::Lte => Op::Lte,
                ConditionOperator::Gt => Op::Gt,
                ConditionOperator::Gte => Op::Gte,
                ConditionOperator::Eq => Op::Eq,
                ConditionOperator::Neq => Op::Neq,
            };
            (op, *n as f64)
        })
        .collect();
    if c.correlation_type == CorrelationType::Temporal && !stated {
        // Sigma: without a condition, every referenced rule must match.
        predicates = vec![(Op::Gte, c.rules.len() as f64)];
    }
    let mut parts = Vec::new();
    let mut maps = Vec::new();
    let mut referenced = Vec::new();
    for r in &c.rules {
        let Some((sigma, index)) = known.get(r) else {
            let why = format!("references rule {r:?}, which is not loaded (absent, skipped, or a correlation: correlations of correlations are not supported)");
            return Err(no(why, r));
        };
        let (m, map) = matcher(sigma, file, ctx)?;
        parts.push(m);
        maps.push(map);
        referenced.push(*index);
    }
    let group: Vec<String> = c.group_by.iter().map(rename).collect();
    let entity_of = |f: &str| -> Option<String> {
        if maps.iter().all(|m| m.entity_key == f) {
            return maps.first().map(|m| m.entity_type.clone());
        }
        ctx.cfg
            .entities
            .get(f)
            .cloned()
            .or_else(|| shipped_entities().into_iter().find(|(k, _)| *k == f).map(|(_, t)| t.to_string()))
            .or_else(|| ctx.logsources.iter().find(|l| l.entity_key == f).map(|l| l.entity_type.clone()))
    };
    let Some((at, entity_type)) = group.iter().enumerate().find_map(|(i, f)| Some((i, entity_of(f)?))) else {
        let why = format!(
            "no entity among the group-by fields {group:?}: name the entity type of one under [sigma.entities]"
        );
        return Err(no(why, "group-by:"));
    };
    let entity_key = path(&group[at])?;
    let others = group.iter().enumerate().filter(|(i, _)| *i != at).map(|(_, f)| path(f)).collect::<Result<_, _>>()?;
    let correlation = Correlation {
        kind,
        rules: c.rules.clone(),
        window_ms: (c.timespan.seconds as i64).saturating_mul(1000),
        predicates,
    };
    let meta = Meta { id: &c.id, title: &c.title, description: &c.description, level: c.level, tags: &c.tags };
    let labels = meta.labels("correlation", file, json!({"group_by": c.group_by, "timespan": c.timespan.original}));
    let name = c.id.as_ref().unwrap_or(&c.title);
    let matcher = Condition::any(parts, format!("sigma correlation {name} ({})", file.display()));
    let form = Form::Correlation(Box::new(correlation));
    let rule = meta.rule(id, ctx, (entity_type, entity_key, others), matcher, form, labels);
    Ok((rule, referenced))
}
