//! The alert rules in deploy/prometheus: valid, unit-tested with promtool
//! (each rule fires once and stays quiet once, in
//! `cutover-alerts.test.yml`), and naming only metrics cutover exports;
//! the Grafana dashboard in deploy/grafana: every query valid PromQL (as
//! promtool parses it) over metrics cutover exports.
//! promtool comes from Debian's `prometheus` package (scripts/setup); a
//! missing promtool fails the test.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new(std::env::var("CUTOVER_PROMTOOL").unwrap_or_else(|_| "promtool".into()))
        .args(args)
        .current_dir(root().join("deploy/prometheus"))
        .output()
        .expect("promtool (Debian package prometheus; scripts/setup installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn promtool_checks_the_rules_and_their_unit_tests_pass() {
    let checked = promtool(&["check", "rules", "cutover-alerts.yml"]);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&["test", "rules", "cutover-alerts.test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
    // Every alert has a firing and a quiet test.
    let rules = std::fs::read_to_string(root().join("deploy/prometheus/cutover-alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(root().join("deploy/prometheus/cutover-alerts.test.yml")).unwrap();
    for line in rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")) {
        for case in ["fires", "stays quiet"] {
            assert!(
                tests.contains(&format!("name: {line} {case}")),
                "no '{case}' test for {line}"
            );
        }
    }
}

fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("cutover_") {
        let start = i + at;
        let before_ok = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = start
            + text[start..]
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(text.len() - start);
        if before_ok && end > start + "cutover_".len() {
            out.insert(text[start..end].to_owned());
        }
        i = end;
    }
    out
}

fn rust_sources(dir: &Path, out: &mut String) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push_str(&std::fs::read_to_string(&p).unwrap());
        }
    }
}

/// The metric names cutover's sources register (as string literals).
fn exported() -> BTreeSet<String> {
    let mut code = String::new();
    for krate in ["coordinator/src", "agent/src", "shared/src", "cli/src"] {
        rust_sources(&root().join(krate), &mut code);
    }
    metric_names(&code)
        .into_iter()
        .filter(|m| code.contains(&format!("\"{m}\"")))
        .collect()
}

/// Every metric `text` names is one cutover exports (a histogram's series
/// by its base name).
fn assert_only_exported(text: &str, what: &str) -> usize {
    let exported = exported();
    let used = metric_names(text);
    for m in &used {
        let base = m
            .strip_suffix("_bucket")
            .or_else(|| m.strip_suffix("_count"))
            .or_else(|| m.strip_suffix("_sum"))
            .unwrap_or(m);
        assert!(
            exported.contains(base),
            "{what} uses {m}, which cutover does not export"
        );
    }
    used.len()
}

#[test]
fn alerts_name_only_metrics_cutover_exports() {
    let rules = std::fs::read_to_string(root().join("deploy/prometheus/cutover-alerts.yml")).unwrap();
    let used = assert_only_exported(&rules, "the rules");
    assert!(used >= 8, "{used}");
}

/// Each query of the dashboard, with Grafana's variables replaced by what
/// they stand for, is checked by promtool as a recording rule's
/// expression; panel ids are unique.
#[test]
fn the_dashboard_queries_are_valid_promql_over_exported_metrics() {
    let text = std::fs::read_to_string(root().join("deploy/grafana/cutover.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut ids = BTreeSet::new();
    let mut exprs = Vec::new();
    for p in dashboard["panels"].as_array().unwrap() {
        let id = p["id"].as_u64().unwrap();
        assert!(ids.insert(id), "panel id {id} is used twice");
        for t in p["targets"].as_array().into_iter().flatten() {
            let e = t["expr"].as_str().unwrap();
            exprs.push(e.replace("$__rate_interval", "5m").replace("$app", ".+"));
        }
    }
    assert!(exprs.len() >= 20, "{} queries", exprs.len());
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        // A JSON string is a YAML double-quoted scalar.
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(e).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dashboard-rules.yml");
    std::fs::write(&path, rules).unwrap();
    let checked = promtool(&["check", "rules", path.to_str().unwrap()]);
    assert!(
        checked.contains(&format!("SUCCESS: {} rules found", exprs.len())),
        "{checked}"
    );
    assert_only_exported(&exprs.join("\n"), "the dashboard");
}
