//! The `cutover` binary as users drive it: `certs init`, `dev` with its
//! shell exports, operator verbs with `--output json` and exit codes, and a
//! clean stop on Ctrl-C.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cutover_tests::cutover_bin;
use cutover_tests::dev::{start_dev, stop_dev};

#[test]
fn certs_init_writes_every_identity_with_private_keys_0600() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(cutover_bin())
        .args(["certs", "init", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut keys = 0;
    for stem in [
        "coordinator-1",
        "coordinator-2",
        "coordinator-3",
        "agent-us-east-us-east-1",
        "agent-eu-west-eu-west-1",
        "operator",
        "viewer",
    ] {
        let key = dir.path().join(format!("{stem}.key"));
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} has mode {mode:o}", key.display());
        assert!(dir.path().join(format!("{stem}.crt")).exists());
        keys += 1;
    }
    assert_eq!(keys, 7);
    assert!(dir.path().join("ca.crt").exists());
}

fn cutover(env: &HashMap<String, String>, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(cutover_bin()).args(args).envs(env).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn dev_prints_exports_that_drive_it_and_stops_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let (mut dev, env, out, log) = start_dev(dir.path());
    assert_eq!(env["CUTOVER_ADDR"].split(',').count(), 3);
    // The sample app serves in every region.
    let text = std::fs::read_to_string(&out).unwrap();
    // The terminal gets the exports; the logs go to their file.
    assert!(text.contains(&format!("# logs: {}", log.display())), "{text}");
    assert!(!text.contains(" INFO "), "log lines on the terminal:\n{text}");
    assert!(std::fs::read_to_string(&log).unwrap().contains("coordinator started"));
    let services: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with("# app \"sample\""))
        .filter_map(|l| l.split("http://").nth(1))
        .map(|a| a.trim_end_matches('/').to_owned())
        .collect();
    assert_eq!(services.len(), 2, "{text}");
    for s in &services {
        let mut conn = std::net::TcpStream::connect(s).unwrap();
        use std::io::{Read, Write};
        conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut reply = String::new();
        conn.read_to_string(&mut reply).unwrap();
        assert!(reply.contains("version sample:v1"), "{reply}");
    }

    let (ok, out, err) = cutover(&env, &["cluster", "status", "--output", "json"]);
    assert!(ok, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_ne!(status["leader_id"], 0);
    assert_eq!(status["members"].as_array().unwrap().len(), 3);

    let (ok, out, err) = cutover(&env, &["agents", "list", "--output", "json"]);
    assert!(ok, "{err}");
    let agents: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(agents.as_array().unwrap().len(), 2, "{out}");
    assert!(agents.as_array().unwrap().iter().all(|a| a["state"] == "up"), "{out}");

    let args = [
        "task",
        "run",
        "--region",
        "us-east",
        "--cluster",
        "us-east-1",
        "--param",
        "message=hi",
        "-o",
        "json",
    ];
    let (ok, out, err) = cutover(&env, &args);
    assert!(ok, "{err}");
    let op: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(op["state"], "succeeded");
    assert_eq!(op["tasks"][0]["result"]["message"], "hi");

    // The issue's new-user path: read the app back as a file, change only
    // its bake, apply it, deploy. `apps get` used to fail ("unsupported unit
    // type"); the deploy used to fail with "Address already in use" (the
    // re-built local driver bound the app's address while the old one held
    // it), and the other region's agent used to lose its session meanwhile.
    let (ok, out, err) = cutover(&env, &["apps", "get", "sample"]);
    assert!(ok, "apps get: {err}");
    assert!(out.contains("name = \"sample\""), "{out}");
    let bake = out
        .lines()
        .find(|l| l.starts_with("bake_secs"))
        .unwrap_or_else(|| panic!("no bake_secs in {out}"))
        .to_owned();
    let file = dir.path().join("sample.toml");
    std::fs::write(&file, out.replace(&bake, "bake_secs = 2")).unwrap();
    let (ok, out, err) = cutover(&env, &["apps", "apply", "-f", file.to_str().unwrap()]);
    assert!(ok, "apps apply: {err}");
    assert!(out.contains("applied"), "{out}");
    for image in ["sample:v11", "sample:v12"] {
        let (ok, out, err) = cutover(
            &env,
            &["deploy", "--app", "sample", "--image", image, "--region", "us-east"],
        );
        assert!(ok, "deploy {image}: {out}\n{err}");
        // Piped: plain lines, no terminal codes.
        assert!(
            out.contains("app.switch on us-east/") && !out.contains('\u{1b}'),
            "{out}"
        );
    }
    // On a terminal (a pty from util-linux's `script`), a deploy shows a
    // spinner per cluster, redrawn in place under the operation's lines.
    let run = format!(
        "{} deploy --app sample --image sample:v13 --region us-east",
        cutover_bin().display()
    );
    let tty = Command::new("script")
        .args(["-qfec", &run, "/dev/null"])
        .envs(&env)
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&tty.stdout);
    assert!(tty.status.success(), "deploy on a terminal:\n{shown}");
    assert!(shown.contains("app.switch on us-east/"), "{shown}");
    assert!(
        shown.contains("\u{1b}[") && shown.contains("us-east/us-east-1") && shown.contains("app.bake ok"),
        "no live progress on a terminal:\n{shown}"
    );
    let (ok, out, err) = cutover(&env, &["agents", "list", "--output", "json"]);
    assert!(ok, "{err}");
    let agents: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        agents.as_array().unwrap().iter().all(|a| a["state"] == "up"),
        "an agent lost its session during the deploys: {out}"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("no heartbeat acknowledgement"), "{text}");
    // Its log is a file here: no colour codes in it.
    assert!(!text.contains('\u{1b}'), "ANSI escapes in a log file:\n{text}");

    // Failures exit non-zero and say why.
    let (ok, _, err) = cutover(&env, &["status", "--app", "nope"]);
    assert!(!ok && err.contains("NOT_FOUND") && err.contains("nope"), "{err}");
    let (ok, _, err) = cutover(&env, &["task", "run", "--region", "../x", "--cluster", "c", "--detach"]);
    assert!(!ok && err.contains("INVALID_ARGUMENT"), "{err}");

    // Ctrl-C stops it cleanly.
    stop_dev(&mut dev);
    // It stopped the sample app too.
    for s in &services {
        assert!(
            std::net::TcpStream::connect(s).is_err(),
            "{s} still answers after dev stopped"
        );
    }
}

/// Replaces `path` the way cert-manager and kubelet do: the new content
/// appears at once (write beside, then rename), never half-written.
fn replace(path: &Path, data: &str, private: bool) {
    let tmp = path.with_extension("rotating");
    cutover_shared::certs::write_file(&tmp, data, private).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Runs `cluster status` against each coordinator alone with `env` until
/// `done` holds for its outcome, within `within`.
fn until_each(
    addrs: &[String],
    env: &HashMap<String, String>,
    within: Duration,
    what: &str,
    done: impl Fn(bool, &str) -> bool,
) {
    for addr in addrs {
        let mut env = env.clone();
        env.insert("CUTOVER_ADDR".into(), addr.clone());
        let deadline = Instant::now() + within;
        loop {
            let (ok, _, err) = cutover(&env, &["cluster", "status"]);
            if done(ok, &err) {
                break;
            }
            assert!(Instant::now() < deadline, "{addr}: {what} (last: ok={ok} {err})");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Finding 4 (rotation without restart): every certificate of a running
/// `cutover dev` is replaced, the CA included, the way an operator rotates
/// a CA: first trust old and new, then re-issue every leaf from the new CA,
/// then drop the old CA. Every process picks each step up from disk; the
/// old CA's certificates stop working, also on connections opened before
/// (agent sessions, Raft channels), and the system keeps deploying.
#[test]
fn dev_keeps_working_while_every_certificate_rotates_to_a_new_ca() {
    use cutover_shared::certs::{CertAuthority, write_issued};
    use cutover_shared::identity::{Identity, Role};
    let dir = tempfile::tempdir().unwrap();
    let (mut dev, env, _, log) = start_dev(dir.path());
    let certs = dir.path().join("data/certs");
    let addrs: Vec<String> = env["CUTOVER_ADDR"].split(',').map(str::to_owned).collect();
    let within = cutover_shared::material::RELOAD_INTERVAL * 4;
    let old_ca = std::fs::read_to_string(certs.join("ca.crt")).unwrap();
    let new_ca = CertAuthority::generate("rotated CA").unwrap();
    let keep = dir.path().join("kept");
    std::fs::create_dir_all(&keep).unwrap();
    for f in ["operator.crt", "operator.key"] {
        std::fs::copy(certs.join(f), keep.join(f)).unwrap();
    }
    let with = |ca: &Path, cert: &Path, key: &Path| {
        let mut e = env.clone();
        e.insert("CUTOVER_CA".into(), ca.display().to_string());
        e.insert("CUTOVER_CERT".into(), cert.display().to_string());
        e.insert("CUTOVER_KEY".into(), key.display().to_string());
        e
    };
    let who = |role, name: &str| Identity {
        role,
        name: name.to_owned(),
    };

    // 1. Trust both CAs: a new-CA operator gets in everywhere.
    replace(&certs.join("ca.crt"), &format!("{old_ca}{}", new_ca.cert_pem()), false);
    let probe = write_issued(
        &keep,
        "new-operator",
        &new_ca.issue(&who(Role::Operator, "admin"), &[]).unwrap(),
        &certs.join("ca.crt"),
    )
    .unwrap();
    let probe_env = with(&probe.ca, &probe.cert, &probe.key);
    until_each(
        &addrs,
        &probe_env,
        within,
        "a new-CA operator still refused",
        |ok, _| ok,
    );

    // 2. Re-issue every leaf from the new CA.
    let mut leaves = vec![];
    for id in 1..=addrs.len() {
        let host = format!("coordinator-{id}");
        leaves.push((
            host.clone(),
            who(Role::Coordinator, &id.to_string()),
            vec!["localhost".to_owned(), host],
        ));
    }
    for (region, cluster) in [("us-east", "us-east-1"), ("eu-west", "eu-west-1")] {
        leaves.push((
            format!("agent-{region}-{cluster}"),
            who(Role::Agent, &format!("{region}/{cluster}")),
            vec![],
        ));
    }
    leaves.push(("operator".into(), who(Role::Operator, "admin"), vec![]));
    leaves.push(("viewer".into(), who(Role::Viewer, "viewer"), vec![]));
    for (stem, identity, names) in &leaves {
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let issued = new_ca.issue(identity, &names).unwrap();
        // Key first, then certificate: the window in between holds a pair
        // that does not match, which a reload must skip, not take.
        replace(&certs.join(format!("{stem}.key")), &issued.key_pem, true);
        replace(&certs.join(format!("{stem}.crt")), &issued.cert_pem, false);
    }
    // Every coordinator now presents a new-CA certificate.
    let new_only = keep.join("new-ca.crt");
    std::fs::write(&new_only, new_ca.cert_pem()).unwrap();
    let new_env = with(&new_only, &certs.join("operator.crt"), &certs.join("operator.key"));
    until_each(
        &addrs,
        &new_env,
        within,
        "still presents an old-CA certificate",
        |ok, _| ok,
    );

    // 3. Drop the old CA: its certificates stop working.
    replace(&certs.join("ca.crt"), new_ca.cert_pem(), false);
    let old_env = with(
        &certs.join("ca.crt"),
        &keep.join("operator.crt"),
        &keep.join("operator.key"),
    );
    until_each(
        &addrs,
        &old_env,
        within,
        "an old-CA operator still accepted",
        |ok, err| !ok && err.contains("UNAUTHENTICATED"),
    );

    // Work continues with the exports as printed (they name the rotated
    // files): both agents are back on new-CA sessions and a deploy runs in
    // every region.
    for (region, cluster) in [("us-east", "us-east-1"), ("eu-west", "eu-west-1")] {
        let (ok, out, err) = cutover(
            &env,
            &[
                "task",
                "run",
                "--region",
                region,
                "--cluster",
                cluster,
                "--param",
                "message=rotated",
                "-o",
                "json",
            ],
        );
        assert!(ok, "task on {region} after rotation: {out}\n{err}");
        let op: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(op["tasks"][0]["result"]["message"], "rotated", "{out}");
    }
    let (ok, out, err) = cutover(&env, &["deploy", "--app", "sample", "--image", "sample:v2"]);
    assert!(ok, "deploy after rotation: {out}\n{err}");
    let (ok, out, err) = cutover(&env, &["agents", "list", "--output", "json"]);
    assert!(ok, "{err}");
    let agents: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(agents.as_array().unwrap().iter().all(|a| a["state"] == "up"), "{out}");

    let text = std::fs::read_to_string(&log).unwrap();
    let reloads = text.matches("reloaded TLS certificate").count();
    assert!(
        reloads >= 3 * 5,
        "expected every process's files reloaded three times, saw {reloads}:\n{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains("no longer accepted") && l.contains("agent/us-east/us-east-1")),
        "the agents' old-CA sessions were not closed:\n{text}"
    );
    assert!(!text.contains("panicked"), "{text}");
    stop_dev(&mut dev);
}

/// `cutover --version` names the commit it was built from, as users quote
/// it in bug reports.
#[test]
fn version_names_the_git_revision() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(&root)
        .output()
        .unwrap();
    assert!(head.status.success(), "the tests run from a git checkout");
    let head = String::from_utf8(head.stdout).unwrap().trim().to_owned();
    let (ok, out, err) = cutover(&HashMap::new(), &["--version"]);
    assert!(ok, "{err}");
    assert_eq!(
        out.trim(),
        format!("cutover {} (git {head})", env!("CARGO_PKG_VERSION"))
    );
}

/// Shell completions and a man page, generated from the same definition
/// as the parser, so they list every verb.
#[test]
fn completions_and_man_page_cover_the_verbs() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef cutover"),
        ("fish", "complete -c cutover"),
    ] {
        let (ok, out, err) = cutover(&HashMap::new(), &["completions", shell]);
        assert!(ok, "{shell}: {err}");
        assert!(out.contains(marker), "{shell}: no {marker:?} in\n{out}");
        for verb in ["deploy", "rollback", "coordinator", "demo"] {
            assert!(out.contains(verb), "{shell} completions lack {verb}");
        }
    }
    let (ok, _, err) = cutover(&HashMap::new(), &["completions", "tcsh"]);
    assert!(!ok && err.contains("invalid value"), "{err}");
    let (ok, man, err) = cutover(&HashMap::new(), &["man"]);
    assert!(ok, "{err}");
    assert!(man.starts_with(".ie") || man.contains(".TH cutover"), "{man}");
    assert!(man.contains("deploy") && man.contains("demo"), "{man}");
}
