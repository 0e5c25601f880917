//! The web console (`cutover ui`) in a real browser: Debian's chromium,
//! driven by npm's playwright-core (`tests/console.mjs`, installed by
//! `scripts/setup`), against `cutover dev`. An operator promotes a manual
//! cutover from the page; a viewer finds no button and cannot act.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cutover_tests::dev::{start_dev, stop_dev};
use cutover_tests::{Proc, cutover_bin};

/// Where `scripts/setup` installs playwright-core.
fn playwright_dir() -> PathBuf {
    let root = std::env::var_os("CUTOVER_PLAYWRIGHT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/cutover-playwright"));
    let modules = root.join("node_modules");
    assert!(
        modules.join("playwright-core").is_dir(),
        "playwright-core is not installed in {}: run scripts/setup",
        modules.display()
    );
    modules
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

/// Starts `cutover ui` with the certificate `cert`/`key` and returns it
/// with the URL it printed.
fn start_ui(dir: &Path, env: &HashMap<String, String>, who: &str, cert: &str, key: &str) -> (Proc, String) {
    let out = dir.join(format!("ui-{who}.out"));
    let ui = Proc::spawn(
        &[
            "ui",
            "--listen",
            "127.0.0.1:0",
            "--addr",
            &env["CUTOVER_ADDR"],
            "--ca",
            &env["CUTOVER_CA"],
            "--cert",
            cert,
            "--key",
            key,
        ],
        &out,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        if let Some(url) = text.split_whitespace().find(|w| w.starts_with("http://"))
            && text.contains("Ctrl-C stops it")
        {
            return (ui, url.to_owned());
        }
        assert!(Instant::now() < deadline, "cutover ui printed no URL:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Where screenshots go: `dir`, or `CUTOVER_CONSOLE_SHOTS` (the README's
/// are refreshed with `CUTOVER_CONSOLE_SHOTS=$PWD/docs`).
fn shots_dir(dir: &Path) -> PathBuf {
    std::env::var_os("CUTOVER_CONSOLE_SHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.to_owned())
}

/// Runs `tests/console.mjs MODE` and returns the `key=value` lines it printed.
fn drive(mode: &str, url: &str, env: &HashMap<String, String>, shots: &Path) -> BTreeMap<String, String> {
    let out = Command::new("node")
        .arg(workspace().join("tests/console.mjs"))
        .arg(mode)
        .env("CONSOLE_URL", url)
        .env("PLAYWRIGHT_DIR", playwright_dir())
        .env(
            "CHROMIUM",
            std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()),
        )
        .env("SHOTS", shots)
        .env("CUTOVER_BIN", cutover_bin())
        .envs(env)
        .output()
        .expect("node is installed (scripts/setup)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the browser run failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn cutover_json(env: &HashMap<String, String>, args: &[&str]) -> serde_json::Value {
    let out = Command::new(cutover_bin())
        .args(args)
        .args(["-o", "json"])
        .envs(env)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn an_operator_promotes_a_manual_cutover_from_the_console() {
    let dir = tempfile::tempdir().unwrap();
    let (mut dev, env, _, _) = start_dev(dir.path());
    let (_ui, url) = start_ui(dir.path(), &env, "operator", &env["CUTOVER_CERT"], &env["CUTOVER_KEY"]);
    assert!(
        url.starts_with("http://127.0.0.1:") && url.contains("/#token="),
        "{url}"
    );

    let shots = shots_dir(dir.path());
    let seen = drive("operator", &url, &env, &shots);
    assert_eq!(seen["agents_up"], "2", "{seen:?}");
    // The steps appeared live: deploy and gates before the first gate,
    // switch and bake after each promotion.
    assert_eq!(seen["steps"], "app.bake,app.deploy,app.gates,app.switch", "{seen:?}");
    // Two waves, two gates, each promoted through a confirmed click.
    assert_eq!(seen["confirmations"], "2", "{seen:?}");
    assert_eq!(seen["gates_promoted"], "2", "{seen:?}");
    // Each wave's gates (HTTP and load) shown passing.
    assert_eq!(seen["gate_checks_passed"], "4", "{seen:?}");
    assert_eq!(seen["state"], "succeeded", "{seen:?}");
    assert_eq!(seen["audit_has_promote"], "true", "{seen:?}");
    assert_eq!(seen["release_attested"], "true", "{seen:?}");
    assert_eq!(seen["without_token_status"], "401", "{seen:?}");
    assert_eq!(seen["console_errors"], "0", "{seen:?}");

    // The coordinators agree: the operation succeeded through both gates,
    // promoted by the operator's own identity.
    let op = cutover_json(&env, &["operations", "get", &seen["operation"]]);
    assert_eq!(op["state"], "succeeded", "{op}");
    assert_eq!(op["promoted_gates"], serde_json::json!([1, 2]), "{op}");
    let audit = cutover_json(&env, &["audit"]);
    let promotes = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "PromoteOperation" && e["actor"] == "operator/admin")
        .count();
    assert_eq!(promotes, 2, "{audit}");
    // Every page it visited was captured.
    for name in [
        "regions",
        "apps",
        "operation",
        "operation-succeeded",
        "audit",
        "releases",
        "dr",
    ] {
        assert!(
            shots.join(format!("console-{name}.png")).is_file(),
            "no {name} screenshot"
        );
    }
    stop_dev(&mut dev);
}

#[test]
fn a_viewer_gets_every_page_without_a_button_and_cannot_act() {
    let dir = tempfile::tempdir().unwrap();
    let (mut dev, env, _, _) = start_dev(dir.path());
    let certs = dir.path().join("data/certs");
    let (_ui, url) = start_ui(
        dir.path(),
        &env,
        "viewer",
        certs.join("viewer.crt").to_str().unwrap(),
        certs.join("viewer.key").to_str().unwrap(),
    );
    let seen = drive("viewer", &url, &env, &shots_dir(dir.path()));
    assert_eq!(seen["agents_up"], "2", "{seen:?}");
    assert_eq!(seen["pages"], "7", "{seen:?}");
    assert_eq!(seen["buttons"], "0", "{seen:?}");
    // A request forged past the page is refused by the coordinators.
    assert_eq!(seen["viewer_abort_status"], "403", "{seen:?}");
    assert_eq!(seen["viewer_abort_error"], "PERMISSION_DENIED", "{seen:?}");
    assert_eq!(seen["without_token_status"], "401", "{seen:?}");
    assert_eq!(seen["console_errors"], "0", "{seen:?}");
    // And nothing was aborted: dev's initial deploys stand.
    let ops = cutover_json(&env, &["operations", "list"]);
    assert!(ops.as_array().unwrap().iter().all(|o| o["state"] != "aborted"), "{ops}");
    stop_dev(&mut dev);
}

/// The README shows the console: every screenshot under docs/ is linked.
#[test]
fn readme_links_every_console_screenshot() {
    let readme = std::fs::read_to_string(workspace().join("README.md")).unwrap();
    let mut shots = 0;
    for entry in std::fs::read_dir(workspace().join("docs")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.starts_with("console-") && name.ends_with(".png") {
            assert!(
                readme.contains(&format!("docs/{name}")),
                "README does not link docs/{name}"
            );
            shots += 1;
        }
    }
    assert!(shots >= 7, "only {shots} console screenshots under docs/");
}

/// The console acts with the user's certificate, so it refuses to listen
/// beyond loopback, and it refuses a certificate that names no person.
#[test]
fn ui_refuses_a_public_listen_address_and_a_non_operator_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path();
    let init = Command::new(cutover_bin())
        .args(["certs", "init", "--dir"])
        .arg(certs)
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let ui = |listen: &str, who: &str| {
        let out = Command::new(cutover_bin())
            .args(["ui", "--listen", listen, "--addr", "127.0.0.1:1", "--ca"])
            .arg(certs.join("ca.crt"))
            .arg("--cert")
            .arg(certs.join(format!("{who}.crt")))
            .arg("--key")
            .arg(certs.join(format!("{who}.key")))
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (ok, err) = ui("0.0.0.0:0", "operator");
    assert!(!ok && err.contains("loopback address only"), "{err}");
    let (ok, err) = ui("127.0.0.1:0", "agent-us-east-us-east-1");
    assert!(
        !ok && err.contains("the console needs an operator's or a viewer's"),
        "{err}"
    );
}
