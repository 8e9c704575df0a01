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
use crate::rules::sigma::{self as rules_sigma, Detection};
use crate::rules::{Condition, Form, Rule};
use rsigma_parser::{Level, LogSource, SigmaRule};
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
    let m = |product: &str, service: &str, entity_type: &str, entity_key: &str, match_: Option<&str>| LogsourceFile {
        product: Some(product.into()),
        service: Some(service.into()),
        category: None,
        entity_type: entity_type.into(),
        entity_key: entity_key.into(),
        match_: match_.map(String::from),
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
    let mut out = (Vec::new(), SigmaLoad::default());
    let mut ids: HashSet<String> = taken.clone();
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
        for c in &collection.correlations {
            let reason = "correlation rules are not supported yet".to_string();
            out.1.skipped.push(skip(
                &file,
                &text,
                Some("correlation:"),
                Some(c.id.clone().unwrap_or(c.title.clone())),
                reason,
            ));
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
            match convert(sigma, id, &file, cfg, &logsources, &gates) {
                Ok((rule, logsource)) => {
                    *out.1.loaded.entry(logsource).or_default() += 1;
                    out.0.push(rule);
                }
                Err(why) => out.1.skipped.push(skip(&file, &text, why.near.as_deref(), Some(name), why.reason)),
            }
        }
    }
    out
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

fn convert(
    sigma: &SigmaRule,
    id: String,
    file: &Path,
    cfg: &SigmaFile,
    logsources: &[LogsourceFile],
    gates: &[Option<String>],
) -> Result<(Rule, String), rules_sigma::Unsupported> {
    let logsource = logsource_name(&sigma.logsource);
    let Some((index, map)) = mapping(logsources, &sigma.logsource) else {
        return Err(rules_sigma::Unsupported {
            reason: format!("no entity for logsource {logsource:?}: map it under [[sigma.logsources]]"),
            near: Some("logsource:".into()),
        });
    };
    let renamed = rename_fields(sigma, &cfg.fields);
    let detection = Detection::compile(renamed.as_ref().unwrap_or(sigma))?;
    let bad = |what: &str, e: String| rules_sigma::Unsupported { reason: format!("{what}: {e}"), near: None };
    let entity_key = FieldPath::parse(&map.entity_key).map_err(|e| bad("the logsource's entity_key", e.to_string()))?;
    let gate = match &gates[index] {
        Some(src) => Some(Condition::compile(src).map_err(|e| bad("the logsource's match", e))?),
        None => None,
    };
    let sigma_id = sigma.id.clone().unwrap_or_default();
    let level = level_name(sigma.level);
    let risk = cfg
        .risk_by
        .get(&sigma_id)
        .or_else(|| cfg.risk_by.get(&id))
        .copied()
        .or_else(|| sigma.tags.iter().filter_map(|t| cfg.risk_by.get(t)).max().copied())
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
    let attack: Vec<&String> = sigma.tags.iter().filter(|t| t.starts_with("attack.")).collect();
    let mut labels = Map::new();
    labels.insert(
        "sigma".into(),
        json!({
            "id": sigma.id,
            "title": sigma.title,
            "level": level,
            "tags": sigma.tags,
            "attack": attack,
            "logsource": logsource,
            "file": file.display().to_string(),
        }),
    );
    let source = format!("sigma {} ({})", if sigma_id.is_empty() { &sigma.title } else { &sigma_id }, file.display());
    let rule = Rule {
        namespace: id.clone(),
        id,
        title: sigma.title.clone(),
        description: sigma.description.clone().unwrap_or_default(),
        severity,
        enabled: true,
        risk,
        risk_cap: None,
        entity_type: map.entity_type.clone(),
        entity_key,
        matcher: Condition::sigma(detection, gate, source),
        form: Form::Stateless,
        fire: None,
        direct: false,
        dedup_window_ms: 3_600_000,
        dedup_key: None,
        context: Vec::new(),
        labels,
    };
    Ok((rule, logsource))
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
