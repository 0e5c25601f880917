//! No secret leaves where it is kept (issue: security hardening, "Secrets").
//!
//! A whole `cutover demo` runs with real secrets in play: the sample app's
//! databases are PostgreSQL with a password (in the agents' URL files), and
//! every process has a private key; the backups have an encryption key and
//! the embedded object store a secret access key. Afterwards every log line, every file
//! the demo wrote (Raft logs and snapshots, which hold the operation
//! records and the audit trail; agent state; app working directories) and
//! the final metrics are searched for those secrets. Only the files that
//! are the secrets' own homes may hold them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use cutover_tests::cutover_bin;
use cutover_tests::postgres::TestPostgres;

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let t = e.file_type().unwrap();
        if t.is_dir() {
            files_under(&e.path(), out);
        } else if t.is_file() {
            out.push(e.path());
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && memchr::memmem::find(hay, needle).is_some()
}

/// Each private key as the secrets it could leak as: every line of its PEM
/// body, and its DER bytes.
fn key_secrets(path: &Path) -> Vec<(String, Vec<u8>)> {
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read_to_string(path).unwrap();
    let mut out: Vec<(String, Vec<u8>)> = pem
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 32)
        .map(|l| (format!("a PEM line of {}", path.display()), l.as_bytes().to_vec()))
        .collect();
    let der = PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap();
    out.push((format!("the DER of {}", path.display()), der.secret_der().to_vec()));
    out
}

#[test]
fn a_whole_demo_leaves_no_secret_in_logs_state_or_metrics() {
    let pg = TestPostgres::start().unwrap();
    for region in ["us_east", "eu_west", "ap_south"] {
        pg.create_database(&format!("demo_{region}")).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log_path = dir.path().join("demo.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let status = Command::new(cutover_bin())
        .args(["demo", "--data-dir"])
        .arg(&data)
        .env("CUTOVER_DEMO_DATABASE_URL", pg.url("demo_{region}"))
        // Everything a verbose run logs is searched too.
        .env(
            "RUST_LOG",
            "debug,h2=info,hyper=info,hyper_util=info,tower=info,rustls=info,openraft=info",
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .status()
        .unwrap();
    let printed = std::fs::read_to_string(&log_path).unwrap();
    // The demo's own logs, in its data directory (searched below with
    // every other file there).
    let text = std::fs::read_to_string(data.join("cutover.log")).unwrap_or_default();
    assert!(status.success(), "the demo failed:\n{printed}\n{text}");
    // The demo did migrate PostgreSQL: the orders table exists everywhere.
    for region in ["us_east", "eu_west", "ap_south"] {
        let tables = pg
            .psql(
                &format!("demo_{region}"),
                "select count(*) from information_schema.tables where table_name = 'orders'",
            )
            .unwrap();
        assert_eq!(tables, "1", "demo_{region} was not migrated");
    }

    let mut secrets: Vec<(String, Vec<u8>)> = vec![("the database password".into(), pg.password().as_bytes().to_vec())];
    let mut files = Vec::new();
    files_under(&data, &mut files);
    let mut homes = Vec::new();
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".key") {
            secrets.extend(key_secrets(f));
            homes.push(f.clone());
        } else if name == "backup-key-dev-1" {
            // The backups' encryption key (hex).
            let hex = std::fs::read_to_string(f).unwrap();
            assert_eq!(hex.trim().len(), 64, "{}", f.display());
            secrets.push(("the backup encryption key".into(), hex.trim().as_bytes().to_vec()));
            homes.push(f.clone());
        } else if name == "credentials" {
            // The object store's secret access key.
            let text = std::fs::read_to_string(f).unwrap();
            let secret = text
                .lines()
                .find_map(|l| l.strip_prefix("aws_secret_access_key = "))
                .expect("a secret access key");
            secrets.push(("the object store's secret key".into(), secret.as_bytes().to_vec()));
            homes.push(f.clone());
        } else if f.parent().is_some_and(|p| p.ends_with("dr")) && name.ends_with("-url") {
            // The DR chapter's servers: each URL carries its password.
            let url = std::fs::read_to_string(f).unwrap();
            let password = url
                .split_once("://")
                .and_then(|(_, rest)| rest.split_once('@'))
                .and_then(|(auth, _)| auth.split_once(':'))
                .map(|(_, p)| p.to_owned())
                .unwrap_or_else(|| panic!("{} holds no password: the test proves nothing", f.display()));
            secrets.push((format!("the password in {}", f.display()), password.into_bytes()));
            homes.push(f.clone());
        } else if name.starts_with("sample-db-url-") {
            let url = std::fs::read_to_string(f).unwrap();
            assert!(
                url.contains(pg.password()),
                "{} holds no password: the test proves nothing",
                f.display()
            );
            homes.push(f.clone());
        }
    }
    assert_eq!(
        homes.len(),
        3 + 3 + 2 + 3 + 2 + 5,
        "keys of 3 coordinators, 3 agents, operator, viewer; 3 URL files; the backup key and store credentials; \
         the DR chapter's 5 URL files: {homes:?}"
    );

    // Where they must not be: the log, and every other file, metrics included.
    let searched: Vec<&PathBuf> = files.iter().filter(|f| !homes.contains(f)).collect();
    let mut leaks = Vec::new();
    let mut stores = (0, false, false);
    for f in std::iter::once(&log_path).chain(searched.iter().copied()) {
        let bytes = std::fs::read(f).unwrap();
        for (what, secret) in &secrets {
            if contains(&bytes, secret) {
                leaks.push(format!("{what} in {}", f.display()));
            }
        }
        if f.extension().is_some_and(|e| e == "redb") {
            stores.0 += 1;
        }
        // Proof that the search covered the records: the operations
        // (releases named by image) and the audit trail (actors).
        stores.1 |= contains(&bytes, b"sample:v2");
        stores.2 |= contains(&bytes, b"operator/admin");
    }
    assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
    assert!(stores.0 >= 3, "no Raft stores were searched: {searched:?}");
    assert!(
        stores.1 && stores.2,
        "the operation records and audit trail were not among the searched files"
    );
    let metrics = std::fs::read_to_string(data.join("metrics.prom")).unwrap();
    assert!(metrics.contains("cutover_"), "the metrics dump is empty:\n{metrics}");
    assert!(
        text.lines().count() > 100,
        "the debug log is suspiciously short:\n{text}"
    );
}
