//! Where each key of `riskd.toml` is written, as the TOML parser saw it, so
//! that every error names the line of its own key in its own table (a
//! `path` under `[store]`, not the first `path` of the file).

use super::ConfigError;
use std::path::Path;
use toml::de::{DeTable, DeValue};

/// The parsed document: every table, key and array element with its span.
pub(super) struct Spans<'t> {
    text: &'t str,
    root: DeValue<'t>,
}

impl<'t> Spans<'t> {
    /// The spans of `root`, parsed from `text`.
    pub fn new(text: &'t str, root: DeTable<'t>) -> Self {
        Self { text, root: DeValue::Table(root) }
    }

    /// 1-based line of the key at `path` (a table's name, then keys below
    /// it; an array element by its index, as `"0"`). Where the key is not
    /// written, the line of the nearest table above it that is (its header,
    /// or its first dotted key); `None` when not even the first is.
    pub fn line(&self, path: &[&str]) -> Option<usize> {
        let mut node = &self.root;
        let mut start = None;
        for part in path {
            let next = match node {
                DeValue::Table(table) => table.get_key_value(*part).map(|(key, value)| (key.span(), value)),
                DeValue::Array(items) => {
                    part.parse::<usize>().ok().and_then(|i| items.get(i)).map(|item| (item.span(), item))
                }
                _ => None,
            };
            let Some((span, value)) = next else { break };
            start = Some(span.start);
            node = value.get_ref();
        }
        start.map(|offset| line_at(self.text, offset))
    }
}

/// 1-based line of byte `offset` in `text`.
pub(super) fn line_at(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The problems found in `riskd.toml` and the rule files it names, in the
/// order found.
pub(super) struct Report<'a> {
    file: &'a Path,
    spans: Spans<'a>,
    /// Every problem so far.
    pub errors: Vec<ConfigError>,
}

impl<'a> Report<'a> {
    /// A report on `file`, whose keys are where `spans` says.
    pub fn new(file: &'a Path, spans: Spans<'a>) -> Self {
        Self { file, spans, errors: Vec::new() }
    }

    /// Where the errors of table `table` (`"store"`, `"scoring"`, …) go.
    pub fn section(&mut self, table: &'static str) -> Section<'_, 'a> {
        Section { report: self, table }
    }

    /// A problem of the file as a whole, on no line.
    pub fn file_error(&mut self, message: String) {
        self.errors.push(ConfigError { file: self.file.to_path_buf(), line: None, rule: None, message });
    }
}

/// The errors of one table of `riskd.toml`, each placed at its key's line.
pub(super) struct Section<'r, 'a> {
    report: &'r mut Report<'a>,
    table: &'static str,
}

impl Section<'_, '_> {
    /// `message`, at `key` of this table (at the table where the key is not written).
    pub fn at(&mut self, key: &str, message: String) {
        self.at_path(&[key], message);
    }

    /// `message`, at a key below this table, e.g. `["types", "user", "threshold"]`
    /// or `["modifiers", "0", "ids"]`.
    pub fn at_path(&mut self, keys: &[&str], message: String) {
        let path: Vec<&str> = std::iter::once(self.table).chain(keys.iter().copied()).collect();
        let line = self.report.spans.line(&path);
        self.report.errors.push(ConfigError { file: self.report.file.to_path_buf(), line, rule: None, message });
    }
}
