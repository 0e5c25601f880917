//! The `cutover` binary as users drive it: `certs init`, `dev` with its
//! shell exports, operator verbs with `--output json` and exit codes, and a
//! clean stop on Ctrl-C.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use cutover_tests::{Proc, cutover_bin};

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
    let log = dir.path().join("dev.log");
    let mut dev = Proc::spawn(&["dev", "--data-dir", dir.path().join("data").to_str().unwrap()], &log).unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    let env: HashMap<String, String> = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let exports: HashMap<String, String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.trim_matches('\'').to_owned()))
            .collect();
        if exports.len() == 4 {
            break exports;
        }
        assert!(Instant::now() < deadline, "dev printed no exports:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    for k in ["CUTOVER_ADDR", "CUTOVER_CA", "CUTOVER_CERT", "CUTOVER_KEY"] {
        assert!(env.contains_key(k), "{k} missing from {env:?}");
    }
    assert_eq!(env["CUTOVER_ADDR"].split(',').count(), 3);
    // The sample app serves in every region.
    let text = std::fs::read_to_string(&log).unwrap();
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

    // The new-user path: read the app back as a file, change only
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
    }
    let (ok, out, err) = cutover(&env, &["agents", "list", "--output", "json"]);
    assert!(ok, "{err}");
    let agents: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        agents.as_array().unwrap().iter().all(|a| a["state"] == "up"),
        "an agent lost its session during the deploys: {out}"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("no heartbeat acknowledgement"), "{text}");

    // Failures exit non-zero and say why.
    let (ok, _, err) = cutover(&env, &["status", "--app", "nope"]);
    assert!(!ok && err.contains("NOT_FOUND") && err.contains("nope"), "{err}");
    let (ok, _, err) = cutover(&env, &["task", "run", "--region", "../x", "--cluster", "c", "--detach"]);
    assert!(!ok && err.contains("INVALID_ARGUMENT"), "{err}");

    // Ctrl-C stops it cleanly.
    let pid = dev.child.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = dev.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "dev did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "dev exited with {status}");
    // It stopped the sample app too.
    for s in &services {
        assert!(
            std::net::TcpStream::connect(s).is_err(),
            "{s} still answers after dev stopped"
        );
    }
}
