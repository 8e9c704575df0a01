//! The docs stay true to the code: the README's metrics table against the
//! metrics `src/telemetry.rs` registers, `dashboards/README.md` against the
//! dashboards' panels, the dashboards' Grafana import declarations, the
//! README's prerequisites against `Cargo.toml`, and its layout table.
//!
//! Each check is a function of the texts it compares, returning what is
//! wrong, so that the `*_catches_*` tests below can show it failing on a
//! broken copy. No service is needed.

use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: impl AsRef<Path>) -> String {
    let path = root().join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `dashboards/*.json`, by file name, sorted, with its text.
fn dashboards() -> Vec<(String, String)> {
    let dir = root().join("dashboards");
    let mut out: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read_to_string(&p).unwrap()))
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no dashboards in {}", dir.display());
    out
}

fn parse(name: &str, text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{name}: not JSON: {e}"))
}

fn report(what: &str, problems: Vec<String>) {
    assert!(problems.is_empty(), "{what}:\n  - {}", problems.join("\n  - "));
}

fn set_difference(a: &BTreeSet<String>, b: &BTreeSet<String>) -> Vec<String> {
    a.difference(b).cloned().collect()
}

// --- Markdown ------------------------------------------------------------------

/// The cells of a table row (`| a | b |`), trimmed.
fn cells(line: &str) -> Vec<String> {
    let line = line.trim();
    let inner = line.strip_prefix('|').unwrap_or(line);
    let inner = inner.strip_suffix('|').unwrap_or(inner);
    inner.split('|').map(|c| c.trim().to_string()).collect()
}

/// The tables of a Markdown text: each its rows' cells, header row first,
/// the `| --- |` line left out.
fn tables(md: &str) -> Vec<Vec<Vec<String>>> {
    let mut out = Vec::new();
    let mut current: Vec<Vec<String>> = Vec::new();
    for line in md.lines().chain(std::iter::once("")) {
        if line.trim_start().starts_with('|') {
            let row = cells(line);
            if !row.iter().all(|c| !c.is_empty() && c.chars().all(|ch| matches!(ch, '-' | ':' | ' '))) {
                current.push(row);
            }
        } else if !current.is_empty() {
            out.push(std::mem::take(&mut current));
        }
    }
    out
}

/// The `code spans` of a text.
fn code_spans(text: &str) -> Vec<String> {
    text.split('`').skip(1).step_by(2).map(str::to_string).collect()
}

// --- a. the README's metrics table ------------------------------------------

/// What disagrees between the README's metrics table (`| metric | type |
/// labels |`) and the metrics riskd registers (`exported`).
fn metrics_table_problems(readme: &str, exported: &BTreeSet<String>) -> Vec<String> {
    let mut problems = Vec::new();
    let candidates: Vec<_> = tables(readme)
        .into_iter()
        .filter(|t| t.first().is_some_and(|h| h.first().is_some_and(|c| c == "metric")))
        .collect();
    let [table] = candidates.as_slice() else {
        problems.push(format!("README.md: expected one table headed `| metric | … |`, found {}", candidates.len()));
        return problems;
    };
    let mut documented = BTreeSet::new();
    for row in &table[1..] {
        let names = code_spans(&row[0]);
        if names.is_empty() {
            problems.push(format!("README.md metrics table: a row names no metric: {row:?}"));
        }
        for name in names {
            if name == "process_*" {
                continue;
            } else if name.starts_with("riskd_") {
                if !documented.insert(name.clone()) {
                    problems.push(format!("README.md metrics table lists `{name}` twice"));
                }
            } else {
                problems.push(format!("README.md metrics table: `{name}` is not a riskd metric"));
            }
        }
    }
    let missing = set_difference(exported, &documented);
    if !missing.is_empty() {
        problems.push(format!("exported by riskd but missing from README.md's metrics table: {missing:?}"));
    }
    let extra = set_difference(&documented, exported);
    if !extra.is_empty() {
        problems.push(format!("in README.md's metrics table but not exported by riskd: {extra:?}"));
    }
    problems
}

fn exported() -> BTreeSet<String> {
    riskd::telemetry::metrics().names().iter().cloned().collect()
}

#[test]
fn readme_metrics_table_lists_exactly_the_exported_metrics() {
    let exported = exported();
    assert!(exported.len() > 20, "{exported:?}");
    report(
        "README.md metrics table vs the metrics riskd registers",
        metrics_table_problems(&read("README.md"), &exported),
    );
}

#[test]
fn metrics_check_catches_a_missing_row_and_an_unknown_name() {
    let readme = read("README.md");
    let row = "| `riskd_kafka_partitions` | gauge | |\n";
    assert!(readme.contains(row), "the row this test removes is gone from README.md; pick another");
    let broken = readme.replace(row, "| `riskd_kafka_partitions_held` | gauge | |\n");
    let problems = metrics_table_problems(&broken, &exported()).join("\n");
    assert!(problems.contains("missing from README.md's metrics table: [\"riskd_kafka_partitions\"]"), "{problems}");
    assert!(problems.contains("not exported by riskd: [\"riskd_kafka_partitions_held\"]"), "{problems}");
    // A metric added in the code only.
    let mut more = exported();
    more.insert("riskd_new_thing".into());
    let problems = metrics_table_problems(&readme, &more).join("\n");
    assert!(problems.contains("missing from README.md's metrics table: [\"riskd_new_thing\"]"), "{problems}");
}

// --- b. dashboards/README.md ----------------------------------------------------

/// The titles of a dashboard's panels, those nested in rows included (a row
/// itself is a heading, not a panel).
fn panel_titles(dashboard: &Value) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(panels: &Value, out: &mut Vec<String>) {
        for p in panels.as_array().into_iter().flatten() {
            if p["type"] != "row" {
                out.push(p["title"].as_str().unwrap_or("<no title>").to_string());
            }
            walk(&p["panels"], out);
        }
    }
    walk(&dashboard["panels"], &mut out);
    out
}

/// The dashboard README's sections: the file named in each `## \`file.json\``
/// heading, with the text up to the next heading.
fn readme_sections(md: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in md.lines() {
        if let Some(heading) = line.strip_prefix("## ") {
            let file = code_spans(heading).into_iter().next().filter(|f| f.ends_with(".json"));
            out.push((file.unwrap_or_default(), String::new()));
        } else if let Some((_, body)) = out.last_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    out.retain(|(file, _)| !file.is_empty());
    out
}

/// What disagrees between `dashboards/README.md` and the dashboards.
fn dashboards_readme_problems(readme: &str, dashboards: &[(String, Value)]) -> Vec<String> {
    let mut problems = Vec::new();
    let sections = readme_sections(readme);
    let documented: BTreeSet<String> = sections.iter().map(|(f, _)| f.clone()).collect();
    let files: BTreeSet<String> = dashboards.iter().map(|(f, _)| f.clone()).collect();
    let missing = set_difference(&files, &documented);
    if !missing.is_empty() {
        problems.push(format!("dashboards without a `## `file.json`` section in dashboards/README.md: {missing:?}"));
    }
    let extra = set_difference(&documented, &files);
    if !extra.is_empty() {
        problems.push(format!("dashboards/README.md documents dashboards that do not exist: {extra:?}"));
    }
    for (file, dashboard) in dashboards {
        let Some((_, body)) = sections.iter().find(|(f, _)| f == file) else { continue };
        let body_tables = tables(body);
        let [table] = body_tables.as_slice() else {
            problems.push(format!("dashboards/README.md, {file}: expected one table, found {}", body_tables.len()));
            continue;
        };
        let mut listed = BTreeSet::new();
        for row in &table[1..] {
            if !listed.insert(row[0].clone()) {
                problems.push(format!("dashboards/README.md, {file}: panel {:?} listed twice", row[0]));
            }
        }
        let mut titles = BTreeSet::new();
        for title in panel_titles(dashboard) {
            if !titles.insert(title.clone()) {
                problems.push(format!("{file}: two panels titled {title:?}"));
            }
        }
        let missing = set_difference(&titles, &listed);
        if !missing.is_empty() {
            problems.push(format!("panels of {file} missing from its table in dashboards/README.md: {missing:?}"));
        }
        let extra = set_difference(&listed, &titles);
        if !extra.is_empty() {
            problems.push(format!("dashboards/README.md lists panels {file} does not have: {extra:?}"));
        }
        // The import paragraph names what the import dialog asks for.
        for input in dashboard["__inputs"].as_array().into_iter().flatten() {
            let name = input["name"].as_str().unwrap_or_default();
            if !readme.contains(&format!("`{name}`")) {
                problems.push(format!("dashboards/README.md does not mention {file}'s import input `{name}`"));
            }
        }
    }
    problems
}

fn parsed_dashboards() -> Vec<(String, Value)> {
    dashboards().into_iter().map(|(f, text)| (f.clone(), parse(&f, &text))).collect()
}

#[test]
fn dashboards_readme_documents_every_dashboard_and_panel() {
    report(
        "dashboards/README.md vs dashboards/*.json",
        dashboards_readme_problems(&read("dashboards/README.md"), &parsed_dashboards()),
    );
}

#[test]
fn dashboards_check_catches_a_renamed_panel_and_a_missing_section() {
    let readme = read("dashboards/README.md");
    let mut dashboards = parsed_dashboards();
    let (file, d) = &mut dashboards[0];
    let file = file.clone();
    let old = d["panels"][0]["title"].as_str().unwrap().to_string();
    d["panels"][0]["title"] = json!("Renamed panel");
    let problems = dashboards_readme_problems(&readme, &dashboards).join("\n");
    eprintln!("{problems}");
    assert!(
        problems
            .contains(&format!("panels of {file} missing from its table in dashboards/README.md: [\"Renamed panel\"]")),
        "{problems}"
    );
    assert!(
        problems.contains(&format!("dashboards/README.md lists panels {file} does not have: [{old:?}]")),
        "{problems}"
    );

    let heading = format!("## `{file}`");
    assert!(readme.contains(&heading));
    let problems = dashboards_readme_problems(&readme.replace(&heading, "## nothing"), &parsed_dashboards()).join("\n");
    assert!(
        problems.contains(&format!("without a `## `file.json`` section in dashboards/README.md: [{file:?}]")),
        "{problems}"
    );
}

// --- c. Grafana import ------------------------------------------------------------

/// The panel types a dashboard uses (rows are not plugins).
fn panel_types(dashboard: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    fn walk(panels: &Value, out: &mut BTreeSet<String>) {
        for p in panels.as_array().into_iter().flatten() {
            if let Some(t) = p["type"].as_str().filter(|t| *t != "row") {
                out.insert(t.to_string());
            }
            walk(&p["panels"], out);
        }
    }
    walk(&dashboard["panels"], &mut out);
    out
}

/// The `${DS_…}` placeholders in a text.
fn ds_placeholders(text: &str) -> BTreeSet<String> {
    text.split("${")
        .skip(1)
        .filter_map(|rest| rest.split_once('}').map(|(name, _)| name.to_string()))
        .filter(|name| name.starts_with("DS_"))
        .collect()
}

/// What keeps a dashboard from importing as Grafana's "Export for sharing
/// externally" would have it: the import dialog asking for the Prometheus
/// data source, and the dashboard starting on it.
fn grafana_import_problems(file: &str, text: &str) -> Vec<String> {
    let d = parse(file, text);
    let mut problems = Vec::new();
    let mut problem = |p: String| problems.push(format!("{file}: {p}"));

    match d.get("id") {
        Some(Value::Null) => {}
        other => problem(format!("top-level `id` must be null (an export carries no database id), found {other:?}")),
    }

    // __inputs: exactly the Prometheus data source.
    let inputs = d["__inputs"].as_array().cloned().unwrap_or_default();
    match inputs.as_slice() {
        [input] => {
            let description = input["description"].as_str().unwrap_or_default();
            if description.trim().is_empty() {
                problem("the DS_PROMETHEUS input needs a description".into());
            }
            let expected = json!({
                "name": "DS_PROMETHEUS",
                "label": "Prometheus",
                "description": description,
                "type": "datasource",
                "pluginId": "prometheus",
                "pluginName": "Prometheus",
            });
            if *input != expected {
                problem(format!("`__inputs` must be [{expected}], found [{input}]"));
            }
        }
        _ => problem(format!("`__inputs` must hold exactly one input (DS_PROMETHEUS), found {}", d["__inputs"])),
    }
    let declared: BTreeSet<String> = inputs.iter().filter_map(|i| i["name"].as_str().map(str::to_string)).collect();

    // Every placeholder anywhere is declared; every input is used outside `__inputs`.
    let undeclared = set_difference(&ds_placeholders(text), &declared);
    if !undeclared.is_empty() {
        problem(format!("placeholders not declared in `__inputs`: {undeclared:?}"));
    }
    let mut rest = d.clone();
    if let Some(o) = rest.as_object_mut() {
        o.remove("__inputs");
    }
    let used = ds_placeholders(&rest.to_string());
    let unused = set_difference(&declared, &used);
    if !unused.is_empty() {
        problem(format!("inputs declared but used nowhere (the import would ask for nothing): {unused:?}"));
    }

    // __requires: Grafana, the Prometheus data source and every panel type used, nothing else.
    let requires = d["__requires"].as_array().cloned().unwrap_or_default();
    if requires.is_empty() {
        problem("`__requires` is missing or empty".into());
    }
    let mut required = BTreeSet::new();
    for r in &requires {
        let (Some(kind), Some(id)) = (r["type"].as_str(), r["id"].as_str()) else {
            problem(format!("`__requires` entry without a type and id: {r}"));
            continue;
        };
        if r["name"].as_str().is_none_or(str::is_empty) || !r["version"].is_string() {
            problem(format!("`__requires` entry needs a name and a version: {r}"));
        }
        required.insert(format!("{kind}:{id}"));
    }
    let mut needed: BTreeSet<String> = ["grafana:grafana", "datasource:prometheus"].map(String::from).into();
    needed.extend(panel_types(&d).into_iter().map(|t| format!("panel:{t}")));
    let missing = set_difference(&needed, &required);
    if !missing.is_empty() {
        problem(format!("`__requires` lacks {missing:?}"));
    }
    let extra = set_difference(&required, &needed);
    if !extra.is_empty() {
        problem(format!("`__requires` names what the dashboard does not use: {extra:?}"));
    }

    // The `datasource` variable: the panels query it, it starts on the input.
    let vars = d["templating"]["list"].as_array().cloned().unwrap_or_default();
    let ds_vars: Vec<&Value> = vars.iter().filter(|v| v["type"] == "datasource").collect();
    match ds_vars.as_slice() {
        [v] => {
            if v["name"] != "datasource" || v["query"] != "prometheus" {
                problem(format!(
                    "the data source variable must be named `datasource` with query `prometheus`, found {} / {}",
                    v["name"], v["query"]
                ));
            }
            let current = json!({"selected": false, "text": "${DS_PROMETHEUS}", "value": "${DS_PROMETHEUS}"});
            if v["current"] != current {
                problem(format!("the `datasource` variable's `current` must be {current}, found {}", v["current"]));
            }
        }
        _ => problem(format!("expected one templating variable of type `datasource`, found {}", ds_vars.len())),
    }
    fn check_datasources(panels: &Value, file_problems: &mut Vec<String>) {
        for p in panels.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("<no title>");
            if p["type"] != "row" {
                let wanted = json!({"type": "prometheus", "uid": "${datasource}"});
                if p["datasource"] != wanted {
                    file_problems
                        .push(format!("panel {title:?}: datasource must be {wanted}, found {}", p["datasource"]));
                }
                // tests/observability.rs reads `panels[].targets[].expr` of top-level panels.
                let targets = p["targets"].as_array().cloned().unwrap_or_default();
                if targets.is_empty() {
                    file_problems.push(format!("panel {title:?} has no targets"));
                }
                for t in targets {
                    if t["datasource"] != wanted {
                        file_problems.push(format!(
                            "panel {title:?}: target datasource must be {wanted}, found {}",
                            t["datasource"]
                        ));
                    }
                    if !t["expr"].is_string() {
                        file_problems.push(format!("panel {title:?}: a target without a PromQL `expr`"));
                    }
                }
            }
            check_datasources(&p["panels"], file_problems);
        }
    }
    let mut panel_problems = Vec::new();
    check_datasources(&d["panels"], &mut panel_problems);
    problems.extend(panel_problems.into_iter().map(|p| format!("{file}: {p}")));
    problems
}

#[test]
fn dashboards_import_asking_for_the_prometheus_data_source() {
    let mut problems = Vec::new();
    for (file, text) in dashboards() {
        problems.extend(grafana_import_problems(&file, &text));
    }
    report("dashboards/*.json as Grafana imports them", problems);
}

#[test]
fn grafana_import_check_catches_an_undeclared_placeholder_and_a_stale_current() {
    let (file, text) = dashboards().remove(0);
    let broken = text.replacen("\"${datasource}\"", "\"${DS_OTHER}\"", 1).replacen(
        "\"text\": \"${DS_PROMETHEUS}\"",
        "\"text\": \"Prometheus\"",
        1,
    );
    assert_ne!(broken, text);
    let problems = grafana_import_problems(&file, &broken).join("\n");
    eprintln!("{problems}");
    assert!(problems.contains("placeholders not declared in `__inputs`: [\"DS_OTHER\"]"), "{problems}");
    assert!(problems.contains("the `datasource` variable's `current` must be"), "{problems}");
    assert!(problems.contains("datasource must be {\"type\":\"prometheus\",\"uid\":\"${datasource}\"}"), "{problems}");
}

// --- d. prerequisites ---------------------------------------------------------------

const FIRST_COMMAND: &str = "cargo run --release -- run --config config/riskd.toml";

/// What the README's prerequisites paragraph (before the first command
/// block) lacks, or says against `Cargo.toml` and `Cargo.lock`.
fn prerequisites_problems(readme: &str, cargo_toml: &str, cargo_lock: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let Some(block) = readme.find(&format!("```sh\n{FIRST_COMMAND}\n```")) else {
        return vec![format!("README.md: no command block `{FIRST_COMMAND}`")];
    };
    let before = &readme[..block];
    let Some(start) = before.find("\nPrerequisites:") else {
        return vec![format!("README.md: no paragraph starting `Prerequisites:` before the `{FIRST_COMMAND}` block")];
    };
    let para = &before[start + 1..];
    let para = &para[..para.find("\n\n").unwrap_or(para.len())];
    let flat = para.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut require = |what: &str, any: &[&str]| {
        if !any.iter().any(|w| flat.contains(w)) {
            problems.push(format!("README.md prerequisites name no {what} (looked for {any:?}): {flat}"));
        }
    };
    require("Rust", &["Rust"]);
    require("cargo", &["cargo"]);
    require("C compiler or toolchain", &["C toolchain", "C compiler", "C and C++ toolchain", "gcc"]);
    require("pkg-config", &["`pkg-config`"]);
    require("OpenSSL headers", &["`libssl-dev`"]);

    let manifest: toml::Table = toml::from_str(cargo_toml).unwrap_or_else(|e| panic!("Cargo.toml: {e}"));
    if let Some(rv) = manifest.get("package").and_then(|p| p.get("rust-version")).and_then(|v| v.as_str()) {
        if !flat.contains(&format!("Rust {rv}")) {
            problems.push(format!("README.md prerequisites must say `Rust {rv}` (Cargo.toml's rust-version)"));
        }
    }
    let rdkafka = manifest.get("dependencies").and_then(|d| d.get("rdkafka"));
    let features: BTreeSet<&str> = rdkafka
        .and_then(|r| r.get("features"))
        .and_then(|f| f.as_array())
        .map(|f| f.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    if rdkafka.is_none() {
        problems.push("Cargo.toml has no rdkafka dependency: the prerequisites paragraph is about it".into());
    }
    let mut claim = |ok: bool, what: String| {
        if !ok {
            problems.push(format!("README.md prerequisites vs Cargo.toml's rdkafka features {features:?}: {what}"));
        }
    };
    claim(features.contains("ssl"), "the `ssl` feature is off, yet the paragraph asks for OpenSSL headers".into());
    claim(!features.contains("ssl-vendored"), "OpenSSL is vendored (`ssl-vendored`), not the system's".into());
    claim(!features.contains("dynamic-linking"), "librdkafka is linked dynamically (`dynamic-linking`)".into());
    claim(flat.contains("links statically"), "say that librdkafka is built and linked statically".into());
    let no_cmake = flat.contains("cmake is not needed");
    claim(
        features.contains("cmake-build") != no_cmake,
        format!(
            "the `cmake-build` feature is {}, so the paragraph must {}say `cmake is not needed`",
            if features.contains("cmake-build") { "on" } else { "off" },
            if no_cmake { "not " } else { "" }
        ),
    );
    for (feature, said) in [("ssl", "`ssl`"), ("libz", "`libz`")] {
        claim(
            features.contains(feature) == flat.contains(said),
            format!("the paragraph must name exactly the features in use ({said})"),
        );
    }

    // The vendored librdkafka's version, as Cargo.lock's rdkafka-sys carries it (`4.10.0+2.12.1`).
    let lock: toml::Table = toml::from_str(cargo_lock).unwrap_or_else(|e| panic!("Cargo.lock: {e}"));
    let librdkafka = lock
        .get("package")
        .and_then(|p| p.as_array())
        .into_iter()
        .flatten()
        .find(|p| p.get("name").and_then(|n| n.as_str()) == Some("rdkafka-sys"))
        .and_then(|p| p.get("version")?.as_str()?.split_once('+').map(|(_, v)| v.to_string()));
    match librdkafka {
        Some(v) if flat.contains(&format!("librdkafka {v}")) => {}
        Some(v) => {
            problems.push(format!("README.md prerequisites must name the vendored `librdkafka {v}` (Cargo.lock)"))
        }
        None => problems.push("Cargo.lock: no rdkafka-sys with a `+librdkafka` version".into()),
    }
    problems
}

#[test]
fn readme_names_the_prerequisites_before_the_first_command() {
    report(
        "README.md prerequisites",
        prerequisites_problems(&read("README.md"), &read("Cargo.toml"), &read("Cargo.lock")),
    );
}

#[test]
fn prerequisites_check_catches_a_missing_tool_and_a_changed_feature() {
    let readme = read("README.md");
    let toml = read("Cargo.toml");
    let lock = read("Cargo.lock");
    let problems = prerequisites_problems(&readme.replace("`pkg-config`", "pkgconf"), &toml, &lock).join("\n");
    eprintln!("{problems}");
    assert!(problems.contains("prerequisites name no pkg-config"), "{problems}");
    let problems = prerequisites_problems(
        &readme,
        &toml.replace("\"libz\", \"ssl\"", "\"libz\", \"ssl\", \"cmake-build\""),
        &lock,
    )
    .join("\n");
    eprintln!("{problems}");
    assert!(problems.contains("the `cmake-build` feature is on"), "{problems}");
}

// --- e. the layout table ----------------------------------------------------------

fn layout_problems(readme: &str, dashboard_files: &[String]) -> Vec<String> {
    let Some(layout) = readme.split("\n## Layout\n").nth(1) else {
        return vec!["README.md: no `## Layout` section".into()];
    };
    let layout = layout.split("\n## ").next().unwrap_or_default();
    let rows: Vec<Vec<String>> = tables(layout).into_iter().flatten().filter(|r| r[0] == "`dashboards/`").collect();
    let [row] = rows.as_slice() else {
        return vec![format!("README.md Layout: expected one `dashboards/` row, found {}", rows.len())];
    };
    let text = row.get(1).cloned().unwrap_or_default().to_lowercase();
    dashboard_files
        .iter()
        .filter_map(|file| {
            // riskd-state.json → "state"
            let word = file.trim_end_matches(".json").trim_start_matches("riskd-").to_lowercase();
            (!text.contains(&word)).then(|| {
                format!("README.md Layout row `dashboards/` does not name the {word} dashboard ({file}): {row:?}")
            })
        })
        .collect()
}

#[test]
fn readme_layout_names_every_dashboard() {
    let files: Vec<String> = dashboards().into_iter().map(|(f, _)| f).collect();
    report("README.md Layout", layout_problems(&read("README.md"), &files));
}

#[test]
fn layout_check_catches_an_unnamed_dashboard() {
    let files = vec!["riskd-overview.json".to_string(), "riskd-costs.json".to_string()];
    let problems = layout_problems(&read("README.md"), &files).join("\n");
    assert!(problems.contains("does not name the costs dashboard (riskd-costs.json)"), "{problems}");
    assert!(!problems.contains("the overview dashboard"), "{problems}");
}
