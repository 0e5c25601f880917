//! `db.failover` `rejoin`: rebuilding a superseded primary (fenced by a
//! failover, or self-fenced) as a streaming standby of the app's current
//! primary, as Patroni does when an old leader comes back.
//!
//! The agent must run on the database's host, with `[databases.server]`
//! saying how to stop and start the server and which OS user owns its data
//! directory, and `replication_sources` naming a replication connection to
//! the new primary's server. Then:
//!
//! 1. stop the server (`server.stop`);
//! 2. `pg_rewind` the data directory onto the new primary's timeline: the
//!    old primary's writes after the split are discarded, which is what
//!    the failover already decided. If rewinding is impossible (no
//!    `wal_log_hints` nor data checksums, WAL gone), take a fresh
//!    `pg_basebackup` into the emptied directory instead;
//! 3. write `standby.signal` and `primary_conninfo` (the password in
//!    `postgresql.auto.conf`, mode 0600, as `pg_basebackup -R` does);
//! 4. start it (`server.start`) and wait until it replays and streams.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use cutover_shared::config::{DatabaseConfig, ServerControl};
use cutover_shared::domain::ClusterRef;

use crate::migrate::{self, DbConfig, DbUrl};

/// How long a rebuilt standby has to stream and catch up.
const STREAMING_WITHIN: Duration = Duration::from_secs(60);
/// How long a rewound one has, before a base backup replaces it.
const REWOUND_STREAMING_WITHIN: Duration = Duration::from_secs(20);

/// How the data directory was rebuilt.
pub enum Method {
    Rewind,
    BaseBackup,
}

impl Method {
    pub fn as_str(&self) -> &'static str {
        match self {
            Method::Rewind => "rewind",
            Method::BaseBackup => "base-backup",
        }
    }
}

/// Rebuilds `db`'s server as a standby of `source`'s; returns how, and
/// the standby's replay position once it streams.
pub async fn rejoin(
    db: &DatabaseConfig,
    cfg: &DbConfig,
    source: &ClusterRef,
    progress: &(dyn Fn(String) + Send + Sync),
) -> Result<(Method, Option<u64>), String> {
    let server = db.server.clone().ok_or_else(|| {
        format!(
            "rejoining needs [databases.server] in {}'s [[databases]] entry (how this agent stops and starts its \
             server); rebuild the standby by hand, or add it",
            db.app
        )
    })?;
    let source_url = db
        .replication_sources
        .get(&source.to_string())
        .ok_or_else(|| {
            format!(
                "no replication source for {source} in {}'s [[databases]] entry (replication_sources.\"{source}\" = \
                 a file holding its connection string)",
                db.app
            )
        })
        .and_then(|f| DbUrl::from_file(f).map_err(|e| e.to_string()))?;
    // The tools must be the server's own major version.
    let major = std::fs::read_to_string(server.data_directory.join("PG_VERSION"))
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok());
    let tool = |name: &str| migrate::pg_tool(cfg, major, name).map_err(|e| e.to_string());
    let (rewind, basebackup) = (tool("pg_rewind")?, tool("pg_basebackup")?);

    // A just-promoted primary writes its new timeline into its control
    // file only at its next checkpoint, and pg_rewind reads it from there:
    // without one it sees the same timeline and rewinds nothing.
    let source_cfg = DbConfig {
        url: source_url.clone(),
        primary: true,
        ..cfg.clone()
    };
    migrate::checkpoint(&source_cfg)
        .await
        .map_err(|e| format!("cannot checkpoint {source}'s primary before rewinding: {e}"))?;
    let start_msg = || progress(format!("starting {}'s server as a standby of {source}", db.app));
    progress(format!("stopping {}'s server", db.app));
    if let Err(e) = run_control(&server.stop, "server.stop").await {
        // A server that is already down (its host restarted, a crash) is
        // what stopping wants; one that still answers is not.
        if migrate::replication(cfg).await.is_ok() {
            return Err(e);
        }
        tracing::info!(app = %db.app, "{e}; the server does not answer, so it is down already");
    }
    progress(format!(
        "rewinding the data directory onto {source}'s timeline (pg_rewind)"
    ));
    let red = |s: &str| migrate::redact(&source_url, s);
    let rewound = {
        let (mut cmd, pass) =
            migrate::libpq_command_as(&rewind, &source_url, &std::env::temp_dir(), server.run_as.as_deref())
                .map_err(|e| e.to_string())?;
        cmd.arg(format!("--target-pgdata={}", server.data_directory.display()))
            .arg("--source-server=application_name=cutover-rejoin");
        let out = output(cmd).await;
        drop(pass);
        out
    };
    if let Err(why) = &rewound {
        tracing::warn!(app = %db.app, "pg_rewind could not rewind: {}", red(why));
    }
    if rewound.is_ok() {
        match start_following(&server, &source_url, cfg, REWOUND_STREAMING_WITHIN, &start_msg).await? {
            Ok(lsn) => return Ok((Method::Rewind, lsn)),
            Err(why) => {
                // E.g. WAL the rewound server needs is gone from the source.
                tracing::warn!(app = %db.app, "the rewound server does not stream: {why}");
                progress(format!(
                    "the rewound server does not stream ({why}); stopping it for a base backup"
                ));
                run_control(&server.stop, "server.stop").await?;
            }
        }
    } else if let Err(why) = &rewound {
        progress(format!(
            "pg_rewind could not rewind ({}); taking a fresh base backup instead",
            red(why)
        ));
    }
    empty_dir(&server.data_directory).map_err(|e| {
        format!(
            "cannot empty {} for a base backup: {e}",
            server.data_directory.display()
        )
    })?;
    let (mut cmd, pass) = migrate::libpq_command_as(
        &basebackup,
        &source_url,
        &std::env::temp_dir(),
        server.run_as.as_deref(),
    )
    .map_err(|e| e.to_string())?;
    cmd.arg("-D")
        .arg(&server.data_directory)
        .args(["-X", "stream", "-c", "fast", "--no-password"]);
    let out = output(cmd).await;
    drop(pass);
    out.map_err(|e| format!("pg_basebackup from {source} failed: {}", red(&e)))?;
    let lsn = start_following(&server, &source_url, cfg, STREAMING_WITHIN, &start_msg).await??;
    Ok((Method::BaseBackup, lsn))
}

/// Makes the data directory follow `source`, starts the server, and waits
/// `within` for it to stream: the outer error is a step that failed, the
/// inner one a server that started but does not stream.
async fn start_following(
    server: &ServerControl,
    source: &DbUrl,
    cfg: &DbConfig,
    within: Duration,
    starting: &(dyn Fn() + Sync),
) -> Result<Result<Option<u64>, String>, String> {
    follow(server, source).map_err(|e| format!("cannot configure the standby: {e}"))?;
    starting();
    run_control(&server.start, "server.start").await?;
    Ok(wait_streaming(cfg, within).await)
}

/// Runs a configured control command; fails with its output.
async fn run_control(argv: &[String], what: &str) -> Result<(), String> {
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]).stdin(std::process::Stdio::null());
    output(cmd).await.map(|_| ()).map_err(|e| format!("{what} failed: {e}"))
}

/// Runs `cmd` to its end; `Err` with its status and output unless it
/// succeeded.
async fn output(cmd: std::process::Command) -> Result<Output, String> {
    let mut cmd = tokio::process::Command::from(cmd);
    let out = cmd.output().await.map_err(|e| format!("cannot start it: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Removes everything inside `dir`, keeping `dir` (its owner and mode).
fn empty_dir(dir: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() && !p.is_symlink() {
            std::fs::remove_dir_all(&p)?;
        } else {
            std::fs::remove_file(&p)?;
        }
    }
    Ok(())
}

/// Makes the data directory start as a standby of `source`:
/// `standby.signal`, and `primary_conninfo` appended to
/// `postgresql.auto.conf` (the last setting wins), both owned like the
/// directory.
fn follow(server: &ServerControl, source: &DbUrl) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let dir = &server.data_directory;
    let meta = std::fs::metadata(dir).map_err(|e| e.to_string())?;
    let conninfo = migrate::conninfo(source).map_err(|e| e.to_string())?;
    let auto = dir.join("postgresql.auto.conf");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(&auto)
        .map_err(|e| format!("{}: {e}", auto.display()))?;
    writeln!(
        f,
        "# cutover dr rejoin\nprimary_conninfo = '{}'\nrecovery_target_timeline = 'latest'",
        conninfo.replace('\'', "''")
    )
    .map_err(|e| format!("{}: {e}", auto.display()))?;
    let signal = dir.join("standby.signal");
    std::fs::write(&signal, "").map_err(|e| format!("{}: {e}", signal.display()))?;
    for p in [&auto, &signal] {
        std::os::unix::fs::chown(p, Some(meta.uid()), Some(meta.gid())).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(())
}

/// Waits until the server answers, is in recovery, streams, and has
/// replayed all it received (its lag is 0), within `within`.
async fn wait_streaming(cfg: &DbConfig, within: Duration) -> Result<Option<u64>, String> {
    let started = Instant::now();
    let mut last = String::from("no answer");
    while started.elapsed() < within {
        match migrate::replication(cfg).await {
            Ok(Some(r)) if r.in_recovery && r.lag_ms == Some(0) => return Ok(r.lsn),
            Ok(Some(r)) if !r.in_recovery => last = "it is not in recovery".into(),
            Ok(_) => last = "it does not stream and replay yet".into(),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!("it did not stream within {within:?}: {last}"))
}
