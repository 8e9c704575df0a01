//! `[rules]` and the rule files it names: YAML, one or more rules per file
//! separated by `---`. Each document is parsed on its own so that an error
//! is reported with the line it is on in the file and the id of the rule it
//! belongs to.

use super::spans::Section;
use super::ConfigError;
use crate::rules::{self, Rule, RuleSpec};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// `[rules]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesFile {
    /// Rule files, or folders whose `*.yaml`/`*.yml` files are all loaded
    /// (in name order; `*.test.yaml` files are rule tests, not rules).
    #[serde(default = "rules_dir")]
    pub paths: Vec<String>,
    /// Sigma rule files, or folders searched at any depth (see `[sigma]`).
    #[serde(default)]
    pub sigma: Vec<String>,
}

fn rules_dir() -> Vec<String> {
    vec!["rules".into()]
}

/// The rule files and folders of `[rules]`, taken from `base`.
pub(super) fn paths(file: &RulesFile, base: &Path, err: &mut Section) -> Vec<PathBuf> {
    if file.paths.is_empty() {
        err.at("paths", "rules.paths is empty: riskd would have no rules".into());
    }
    file.paths.iter().map(|p| base.join(p)).collect()
}

/// A setting changed without editing a file: `rules.ID.threshold=15` (a key
/// of the rule's state form may be named directly) or a full path such as
/// `rules.ID.state.count.window=2h`, `rules.ID.risk=40`.
#[derive(Clone, Debug, PartialEq)]
pub struct Override {
    /// Rule id.
    pub rule: String,
    /// Keys inside the rule.
    pub path: Vec<String>,
    /// The new value (YAML).
    pub value: serde_yaml_ng::Value,
    /// As written.
    pub text: String,
}

impl Override {
    /// Parses `rules.ID.key[.key…]=value`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (lhs, rhs) = text.split_once('=').ok_or_else(|| format!("--set {text:?}: expected rules.ID.KEY=VALUE"))?;
        let mut parts = lhs.trim().split('.');
        if parts.next() != Some("rules") {
            return Err(format!("--set {text:?}: only rules.ID.KEY=VALUE settings can be overridden"));
        }
        let rule = parts.next().filter(|r| !r.is_empty()).ok_or_else(|| format!("--set {text:?}: no rule id"))?;
        let path: Vec<String> = parts.map(String::from).collect();
        if path.is_empty() || path.iter().any(String::is_empty) {
            return Err(format!("--set {text:?}: no setting named after the rule id"));
        }
        let value = serde_yaml_ng::from_str(rhs.trim()).map_err(|e| format!("--set {text:?}: {e}"))?;
        Ok(Self { rule: rule.to_string(), path, value, text: text.to_string() })
    }

    /// Applies the override to a rule document; the error says why not.
    fn apply(&self, doc: &mut serde_yaml_ng::Value) -> Result<(), String> {
        use serde_yaml_ng::Value as Y;
        let top_keys = [
            "id",
            "title",
            "description",
            "severity",
            "enabled",
            "risk",
            "risk_cap",
            "entity",
            "match",
            "state",
            "fire",
            "shared_key",
            "consistency",
            "dedup",
            "context",
        ];
        let path: Vec<&str> = self.path.iter().map(String::as_str).collect();
        if !top_keys.contains(&path[0]) {
            // A key of the state form, named directly: rules.ID.threshold.
            let form = doc
                .get("state")
                .and_then(Y::as_mapping)
                .and_then(|m| m.iter().find(|(_, v)| v.get(path[0]).is_some()))
                .and_then(|(k, _)| k.as_str())
                .map(String::from);
            match form {
                Some(form) => {
                    let mut full = vec!["state".to_string(), form];
                    full.extend(self.path.iter().cloned());
                    return self.set(doc, &full);
                }
                None => return Err(format!("--set {}: rule {} has no setting {:?}", self.text, self.rule, path[0])),
            }
        }
        self.set(doc, &self.path)
    }

    fn set(&self, doc: &mut serde_yaml_ng::Value, path: &[String]) -> Result<(), String> {
        use serde_yaml_ng::Value as Y;
        let mut node = doc;
        for key in &path[..path.len() - 1] {
            let map = node.as_mapping_mut().ok_or_else(|| format!("--set {}: {key} is not a mapping", self.text))?;
            node = map.entry(Y::String(key.clone())).or_insert_with(|| Y::Mapping(Default::default()));
        }
        let map = node.as_mapping_mut().ok_or_else(|| format!("--set {}: cannot set a key there", self.text))?;
        map.insert(Y::String(path[path.len() - 1].to_string()), self.value.clone());
        Ok(())
    }
}

/// Loads every rule under `paths` (files, or folders of `*.yaml`/`*.yml`),
/// with `overrides` applied, appending each problem to `errors`.
pub fn load(paths: &[PathBuf], overrides: &[Override], errors: &mut Vec<ConfigError>) -> Vec<Rule> {
    let mut rules = Vec::new();
    let mut seen: HashMap<String, (PathBuf, usize)> = HashMap::new();
    for file in rule_files(paths, errors) {
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) => {
                errors.push(file_error(&file, None, None, format!("cannot read rule file: {e}")));
                continue;
            }
        };
        for (start, doc) in documents(&text) {
            if doc.lines().all(|l| l.trim().is_empty() || l.trim_start().starts_with('#')) {
                continue;
            }
            let id = lenient_id(doc);
            let mine: Vec<&Override> = overrides.iter().filter(|o| Some(&o.rule) == id.as_ref()).collect();
            let parsed = if mine.is_empty() {
                serde_yaml_ng::from_str(doc)
            } else {
                let mut value: serde_yaml_ng::Value = serde_yaml_ng::from_str(doc).unwrap_or_default();
                for o in &mine {
                    if let Err(message) = o.apply(&mut value) {
                        errors.push(file_error(&file, Some(start), id.clone(), message));
                    }
                }
                serde_yaml_ng::from_value(value)
            };
            let spec: RuleSpec = match parsed {
                Ok(s) => s,
                Err(e) => {
                    let line = e.location().map(|l| start + l.line() - 1).or(Some(start));
                    let message = e.to_string();
                    // "at line N column M" would point into the document, not the file.
                    let message = message.split(" at line ").next().unwrap_or(&message).to_string();
                    errors.push(file_error(&file, line, lenient_id(doc), message));
                    continue;
                }
            };
            let id = spec.id.clone();
            let id_line = start + line_of(doc, "id").unwrap_or(1) - 1;
            if let Some((first_file, first_line)) = seen.get(&id) {
                errors.push(file_error(
                    &file,
                    Some(id_line),
                    Some(id.clone()),
                    format!("duplicate rule id, first defined at {}:{first_line}", first_file.display()),
                ));
                continue;
            }
            seen.insert(id.clone(), (file.clone(), id_line));
            match rules::compile(spec) {
                Ok(rule) => rules.push(rule),
                Err(field_errors) => {
                    for fe in field_errors {
                        let line = line_of(doc, fe.field).map(|l| start + l - 1).or(Some(id_line));
                        errors.push(file_error(&file, line, Some(id.clone()), fe.message));
                    }
                }
            }
        }
    }
    for o in overrides {
        if !seen.contains_key(&o.rule) {
            errors.push(ConfigError {
                file: PathBuf::from("--set"),
                line: None,
                rule: Some(o.rule.clone()),
                message: format!("--set {}: no rule with this id", o.text),
            });
        }
    }
    rules
}

/// The files of `paths`: each file as it is, each folder's rule files in name order.
fn rule_files(paths: &[PathBuf], errors: &mut Vec<ConfigError>) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            match std::fs::read_dir(path) {
                Ok(entries) => {
                    let mut found: Vec<PathBuf> =
                        entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| is_rule_file(p)).collect();
                    found.sort();
                    files.extend(found);
                }
                Err(e) => errors.push(file_error(path, None, None, format!("cannot list rules folder: {e}"))),
            }
        } else {
            files.push(path.clone());
        }
    }
    files
}

fn is_rule_file(p: &Path) -> bool {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
    (name.ends_with(".yaml") || name.ends_with(".yml")) && !name.contains(".test.")
}

fn file_error(file: &Path, line: Option<usize>, rule: Option<String>, message: String) -> ConfigError {
    ConfigError { file: file.to_path_buf(), line, rule, message }
}

/// Splits a multi-document YAML text; each document with its first line number.
fn documents(text: &str) -> Vec<(usize, &str)> {
    let mut docs = Vec::new();
    let mut start_byte = 0;
    let mut start_line = 1;
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end();
        if bare == "---" || bare.starts_with("--- ") {
            docs.push((start_line, &text[start_byte..offset]));
            start_byte = offset + line.len();
            start_line = i + 2;
        }
        offset += line.len();
    }
    docs.push((start_line, &text[start_byte..]));
    docs
}

/// 1-based line of the first `key:` in a document, in block or flow style.
fn line_of(doc: &str, key: &str) -> Option<usize> {
    let is_key_at = |l: &str, i: usize| {
        let before = l[..i].trim_end();
        (before.is_empty() || before.ends_with(['{', ',', '-'])) && l[i + key.len()..].starts_with(':')
    };
    doc.lines().position(|l| l.match_indices(key).any(|(i, _)| is_key_at(l, i))).map(|i| i + 1)
}

/// The rule id of a document that does not parse as a rule, if it has one.
fn lenient_id(doc: &str) -> Option<String> {
    let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(doc).ok()?;
    v.get("id")?.as_str().map(String::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_keep_their_line_numbers() {
        let text = "id: a\n---\n# c\nid: b\n--- \nid: c\n";
        let docs = documents(text);
        assert_eq!(docs.iter().map(|d| d.0).collect::<Vec<_>>(), vec![1, 3, 6]);
        assert_eq!(line_of(docs[1].1, "id"), Some(2));
    }

    #[test]
    fn every_error_is_listed_with_file_line_and_rule() {
        let dir = tempfile::tempdir().unwrap();
        let good = "id: ok_rule\ntitle: t\nseverity: LOW\nentity: {type: user, key: u}\nmatch: 'a == \"b\"'\n";
        let text = format!(
            "{good}---\nid: bad_one\ntitle: t\nseverity: SEVERE\nentity: {{type: user, key: u}}\nmatch: 'a =='\n---\nid: bad_two\ntitle: t\nseverity: LOW\nentity: {{type: user, key: u}}\nmatch: 'true'\nstate:\n  count: {{window: 1 fortnight, threshold: 0}}\n---\nid: bad_three\ntitlee: typo\n"
        );
        let f = dir.path().join("r.yaml");
        std::fs::write(&f, text).unwrap();
        let mut errors = Vec::new();
        let rules = load(&[dir.path().to_path_buf()], &[], &mut errors);
        assert_eq!(rules.len(), 1);
        let got: Vec<(Option<usize>, Option<&str>, bool)> =
            errors.iter().map(|e| (e.line, e.rule.as_deref(), e.file == f)).collect();
        assert_eq!(
            got,
            vec![
                (Some(9), Some("bad_one"), true),
                (Some(11), Some("bad_one"), true),
                (Some(19), Some("bad_two"), true),
                (Some(19), Some("bad_two"), true),
                (Some(22), Some("bad_three"), true),
            ],
            "{errors:#?}"
        );
        assert!(errors[0].message.contains("SEVERE"));
        assert!(errors[1].message.contains("match does not compile"));
        assert!(errors[4].message.contains("titlee"));
    }
}

#[cfg(test)]
mod override_tests {
    use super::Override;

    #[test]
    fn overrides_parse_and_reach_state_form_keys() {
        let o = Override::parse("rules.burst.threshold=15").unwrap();
        assert_eq!((o.rule.as_str(), o.path.as_slice()), ("burst", &["threshold".to_string()][..]));
        let mut doc: serde_yaml_ng::Value =
            serde_yaml_ng::from_str("id: burst\nrisk: 1\nstate:\n  count: {window: 1h, threshold: 10}\n").unwrap();
        o.apply(&mut doc).unwrap();
        Override::parse("rules.burst.risk=40").unwrap().apply(&mut doc).unwrap();
        Override::parse("rules.burst.state.count.window=2h").unwrap().apply(&mut doc).unwrap();
        assert_eq!(doc["state"]["count"]["threshold"].as_u64(), Some(15));
        assert_eq!(doc["state"]["count"]["window"].as_str(), Some("2h"));
        assert_eq!(doc["risk"].as_u64(), Some(40));
        assert!(Override::parse("rules.burst.nonsense=1").unwrap().apply(&mut doc).is_err());
        assert!(Override::parse("store.kind=memory").is_err());
        assert!(Override::parse("rules.burst").is_err());
    }
}
