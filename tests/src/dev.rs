//! `cutover dev` as a user runs it: a real process, driven through the
//! shell exports it prints and stopped with Ctrl-C.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::Proc;

/// Starts `cutover dev` with its data in `dir/data` and returns it, the
/// environment its exports print, what it printed (stdout and stderr) and
/// its own log file (`dir/data/cutover.log`).
pub fn start_dev(dir: &Path) -> (Proc, HashMap<String, String>, PathBuf, PathBuf) {
    let log = dir.join("dev.out");
    let dev = Proc::spawn(&["dev", "--data-dir", dir.join("data").to_str().unwrap()], &log).unwrap();
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
    (dev, env, log, dir.join("data/cutover.log"))
}

/// Stops `cutover dev` the way a user does, with Ctrl-C, and checks it
/// exits cleanly (and so stops the sample apps it started).
pub fn stop_dev(dev: &mut Proc) {
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
}
