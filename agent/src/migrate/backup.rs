//! Pre-migration backups and restores, and content checksums.
//!
//! - PostgreSQL: `pg_dump --format=custom` to a file; a restore replays it
//!   with `pg_restore | psql --single-transaction` after dropping every
//!   schema, so objects the failed run created are gone too and the result
//!   matches the backup exactly (or, if anything fails, nothing changed).
//!   The libpq tools get the connection through `PG*` environment variables
//!   and a temporary passfile (mode 0600): never on a command line, where
//!   `ps` would show it.
//! - SQLite: `VACUUM INTO` (an online, consistent copy) to a file; a
//!   restore replaces the database file with a copy of it.
//!
//! Backups are 0600 files in a 0700 directory: they hold the app's data.

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::config::{DbConfig, DbUrl, Driver};
use super::conn::{Access, Conn, sqlite_path};
use super::redact::{Redactor, percent_decode};
use super::{BackupInfo, MigrateError};

/// libpq environment for a connection string, and the password (which goes
/// to a passfile, not the environment).
pub struct PgEnv {
    pub vars: Vec<(&'static str, String)>,
    pub password: Option<String>,
    /// `-c name=value` settings for `PGOPTIONS`.
    pub options: Vec<String>,
}

/// Translates a `postgres://` URL (the forms sqlx accepts) into libpq
/// environment variables. Unknown parameters are refused by name (never
/// by value): silently dropping one could point the backup somewhere else
/// than the migration.
pub fn pg_env(url: &DbUrl, red: &Redactor) -> Result<PgEnv, MigrateError> {
    let bad = |why: String| MigrateError::Config(red.clean(&format!("database URL: {why}")));
    let u = url::Url::parse(url.expose()).map_err(|e| bad(e.to_string()))?;
    if !matches!(u.scheme(), "postgres" | "postgresql") {
        return Err(bad(format!("scheme {:?} is not postgres://", u.scheme())));
    }
    let decode = |s: &str| -> Result<String, MigrateError> {
        percent_decode(s).map_err(|_| bad("a component is not UTF-8".into()))
    };
    let mut env = PgEnv {
        vars: Vec::new(),
        password: None,
        options: Vec::new(),
    };
    let set = |k: &'static str, v: String, env: &mut PgEnv| {
        env.vars.retain(|(n, _)| *n != k);
        env.vars.push((k, v));
    };
    if let Some(host) = u.host_str() {
        // libpq wants an IPv6 address without the URL's brackets.
        let host = host.trim_start_matches('[').trim_end_matches(']');
        set("PGHOST", decode(host)?, &mut env);
    }
    if let Some(port) = u.port() {
        set("PGPORT", port.to_string(), &mut env);
    }
    if !u.username().is_empty() {
        set("PGUSER", decode(u.username())?, &mut env);
    }
    if let Some(p) = u.password() {
        env.password = Some(decode(p)?);
    }
    let path = u.path().trim_start_matches('/');
    if !path.is_empty() {
        set("PGDATABASE", decode(path)?, &mut env);
    }
    for (k, v) in u.query_pairs() {
        let v = v.into_owned();
        match &*k {
            "sslmode" | "ssl-mode" => set("PGSSLMODE", v, &mut env),
            "sslrootcert" | "ssl-root-cert" | "ssl-ca" => set("PGSSLROOTCERT", v, &mut env),
            "sslcert" | "ssl-cert" => set("PGSSLCERT", v, &mut env),
            "sslkey" | "ssl-key" => set("PGSSLKEY", v, &mut env),
            "host" => set("PGHOST", v, &mut env),
            "hostaddr" => set("PGHOSTADDR", v, &mut env),
            "port" => set("PGPORT", v, &mut env),
            "dbname" => set("PGDATABASE", v, &mut env),
            "user" => set("PGUSER", v, &mut env),
            "password" => env.password = Some(v),
            "application_name" => set("PGAPPNAME", v, &mut env),
            "options" => env.options.push(v),
            "statement-cache-capacity" => {}
            k if k.starts_with("options[") && k.ends_with(']') => {
                env.options
                    .push(format!("-c {}={v}", &k["options[".len()..k.len() - 1]));
            }
            other => return Err(bad(format!("unsupported parameter {other:?}"))),
        }
    }
    Ok(env)
}

/// A passfile for one tool run, removed on drop.
pub struct Passfile(PathBuf);

impl Passfile {
    fn write(dir: &Path, password: &str) -> std::io::Result<Passfile> {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!(".pgpass-{}-{n}", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let escaped = password.replace('\\', "\\\\").replace(':', "\\:");
        let r = writeln!(f, "*:*:*:*:{escaped}");
        let pass = Passfile(path);
        r?;
        Ok(pass)
    }
}

impl Drop for Passfile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Where the PostgreSQL client tools are: the configured directory, the
/// server's own major version under `/usr/lib/postgresql`, the newest there
/// (pg_dump must not be older than the server), or `PATH`.
pub fn pg_tool(cfg: &DbConfig, major: Option<u32>, tool: &str) -> Result<PathBuf, MigrateError> {
    if let Some(dir) = &cfg.pg_bin_dir {
        let p = dir.join(tool);
        return if p.exists() {
            Ok(p)
        } else {
            Err(MigrateError::Config(format!(
                "{} does not exist (pg_bin_dir)",
                p.display()
            )))
        };
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let p = e.path().join("bin").join(tool);
            p.exists().then_some((v, p))
        })
        .collect();
    found.sort();
    if let Some(m) = major
        && let Some((_, p)) = found.iter().find(|(v, _)| *v == m)
    {
        return Ok(p.clone());
    }
    if let Some((v, p)) = found.last()
        && major.is_none_or(|m| *v >= m)
    {
        return Ok(p.clone());
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let p = dir.join(tool);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(MigrateError::Config(format!(
        "{tool} not found (looked in pg_bin_dir, /usr/lib/postgresql/*/bin and PATH); install the PostgreSQL client tools"
    )))
}

/// `tool` (a path) with `url`'s connection in its environment (the
/// password in a passfile written to `dir`, removed on drop), run as
/// `run_as` through `runuser` when given: the passfile is handed to that
/// user. Nothing secret is on the command line.
pub fn libpq_command_as(
    tool: &Path,
    url: &DbUrl,
    dir: &Path,
    run_as: Option<&str>,
) -> Result<(Command, Option<Passfile>), MigrateError> {
    let env = pg_env(url, &Redactor::new(url))?;
    let pass = env
        .password
        .as_deref()
        .map(|p| Passfile::write(dir, p))
        .transpose()
        .map_err(|e| MigrateError::Backup(format!("cannot write a passfile: {e}")))?;
    let base = pg_command(tool, &env, &[], pass.as_ref());
    let Some(user) = run_as else {
        return Ok((base, pass));
    };
    if let Some(p) = &pass {
        let (uid, gid) = user_ids(user)?;
        std::os::unix::fs::chown(&p.0, Some(uid), Some(gid))
            .map_err(|e| MigrateError::Backup(format!("cannot hand the passfile to {user}: {e}")))?;
    }
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", user, "--"]).arg(tool);
    for (k, v) in base.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    cmd.stdin(Stdio::null());
    Ok((cmd, pass))
}

/// The uid and gid of OS user `user`.
pub fn user_ids(user: &str) -> Result<(u32, u32), MigrateError> {
    let id = |flag: &str| -> Result<u32, MigrateError> {
        let out = Command::new("id")
            .args([flag, user])
            .output()
            .map_err(|e| MigrateError::Config(format!("cannot run id: {e}")))?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|_| MigrateError::Config(format!("no OS user {user:?}")))
    };
    Ok((id("-u")?, id("-g")?))
}

/// `url` as a libpq keyword/value string, password included: what a
/// standby's `primary_conninfo` holds.
pub fn conninfo(url: &DbUrl) -> Result<String, MigrateError> {
    let env = pg_env(url, &Redactor::new(url))?;
    let quote = |v: &str| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
    let mut parts: Vec<String> = env
        .vars
        .iter()
        .filter_map(|(k, v)| {
            let key = match *k {
                "PGHOST" => "host",
                "PGHOSTADDR" => "hostaddr",
                "PGPORT" => "port",
                "PGUSER" => "user",
                "PGSSLMODE" => "sslmode",
                "PGSSLROOTCERT" => "sslrootcert",
                "PGSSLCERT" => "sslcert",
                "PGSSLKEY" => "sslkey",
                _ => return None,
            };
            Some(format!("{key}={}", quote(v)))
        })
        .collect();
    if let Some(p) = &env.password {
        parts.push(format!("password={}", quote(p)));
    }
    parts.push("application_name='cutover-standby'".into());
    Ok(parts.join(" "))
}

/// A libpq tool with the connection in its environment. Inherited `PG*`
/// variables are removed: the URL says where to connect, nothing else.
fn pg_command(tool: &Path, env: &PgEnv, extra_options: &[String], passfile: Option<&Passfile>) -> Command {
    let mut cmd = Command::new(tool);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("PG") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in &env.vars {
        cmd.env(k, v);
    }
    let options: Vec<&str> = env.options.iter().chain(extra_options).map(|s| s.as_str()).collect();
    if !options.is_empty() {
        cmd.env("PGOPTIONS", options.join(" "));
    }
    if let Some(p) = passfile {
        cmd.env("PGPASSFILE", &p.0);
    }
    cmd.env("PGCONNECT_TIMEOUT", "10");
    cmd.stdin(Stdio::null());
    cmd
}

/// Creates the backup directory (0700).
pub fn ensure_dir(dir: &Path) -> Result<(), MigrateError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| MigrateError::Backup(format!("cannot create {}: {e}", dir.display())))
}

/// SHA-256 (hex) and size of a file.
pub fn file_sha256(path: &Path) -> std::io::Result<(u64, String)> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    Ok((size, hex(&h.finalize())))
}

pub use cutover_shared::release::hex;

fn now_ms() -> u64 {
    cutover_shared::domain::now_unix_ms().max(0) as u64
}

fn tool_error(red: &Redactor, what: &str, out: &std::process::Output) -> String {
    red.clean(&format!(
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

/// A libpq tool (`pg_dump`, `pg_restore`) of the server's own major
/// version, connected to `cfg`'s server, to `database` instead of the URL's
/// when given. The password is in the returned passfile (in
/// `cfg.backup_dir`), which must outlive the tool. stdin is null; callers
/// pipe what they need. Errors are redacted.
pub async fn pg_tool_command(
    cfg: &DbConfig,
    tool: &str,
    database: Option<&str>,
) -> Result<(Command, Option<Passfile>), MigrateError> {
    let red = Redactor::new(&cfg.url);
    let major = match Conn::connect(cfg, Access::ReadOnly).await? {
        Some(mut conn) => {
            let m = conn.pg_major().await;
            conn.close().await;
            m?
        }
        None => None,
    };
    let path = pg_tool(cfg, major, tool)?;
    let mut env = pg_env(&cfg.url, &red)?;
    if let Some(db) = database {
        env.vars.retain(|(k, _)| *k != "PGDATABASE");
        env.vars.push(("PGDATABASE", db.to_owned()));
    }
    ensure_dir(&cfg.backup_dir)?;
    let pass = env
        .password
        .as_deref()
        .map(|p| Passfile::write(&cfg.backup_dir, p))
        .transpose()
        .map_err(|e| MigrateError::Backup(format!("cannot write a passfile: {e}")))?;
    let mut cmd = pg_command(&path, &env, &[], pass.as_ref());
    cmd.arg("--no-password");
    Ok((cmd, pass))
}

/// Backs the database up into `cfg.backup_dir` before a run. `versions` are
/// the applied versions at this point, recorded for the restore's check.
pub async fn take(cfg: &DbConfig, conn: &mut Conn, versions: Vec<i64>) -> Result<BackupInfo, MigrateError> {
    ensure_dir(&cfg.backup_dir)?;
    let red = Redactor::new(&cfg.url);
    let created = now_ms();
    let from = versions.last().copied().unwrap_or(0);
    let ext = match cfg.driver {
        Driver::Postgres => "dump",
        Driver::Sqlite => "sqlite",
    };
    let path = cfg
        .backup_dir
        .join(format!("{}-{}-v{from}-{created}.{ext}", cfg.app, cfg.driver));
    if path.exists() {
        return Err(MigrateError::Backup(format!("{} already exists", path.display())));
    }
    match cfg.driver {
        Driver::Postgres => {
            let major = conn.pg_major().await?;
            let tool = pg_tool(cfg, major, "pg_dump")?;
            let env = pg_env(&cfg.url, &red)?;
            let (cfg2, path2) = (cfg.clone(), path.clone());
            let out = tokio::task::spawn_blocking(move || -> Result<std::process::Output, MigrateError> {
                let pass = env
                    .password
                    .as_deref()
                    .map(|p| Passfile::write(&cfg2.backup_dir, p))
                    .transpose()
                    .map_err(|e| MigrateError::Backup(format!("cannot write a passfile: {e}")))?;
                // Created first, so the dump is never readable by others.
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path2)
                    .map_err(|e| MigrateError::Backup(format!("cannot create {}: {e}", path2.display())))?;
                pg_command(&tool, &env, &[], pass.as_ref())
                    .arg("--format=custom")
                    .arg("--no-password")
                    .arg(format!("--lock-wait-timeout={}", cfg2.lock_timeout.as_millis()))
                    .arg("--file")
                    .arg(&path2)
                    .output()
                    .map_err(|e| MigrateError::Backup(format!("cannot run {}: {e}", tool.display())))
            })
            .await
            .map_err(|e| MigrateError::Backup(e.to_string()))??;
            if !out.status.success() {
                let _ = std::fs::remove_file(&path);
                return Err(MigrateError::Backup(tool_error(&red, "pg_dump", &out)));
            }
        }
        Driver::Sqlite => {
            conn.sqlite_vacuum_into(&path).await?;
            // VACUUM INTO creates the file with the default mode.
            let _ = std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600));
        }
    }
    let (size, sha256) =
        file_sha256(&path).map_err(|e| MigrateError::Backup(format!("cannot read {}: {e}", path.display())))?;
    Ok(BackupInfo {
        path,
        size,
        sha256,
        driver: cfg.driver,
        versions,
        created_unix_ms: created,
    })
}

/// Checks that a backup file is still the one that was taken.
pub fn verify(backup: &BackupInfo) -> Result<(), MigrateError> {
    let (size, sha) = file_sha256(&backup.path)
        .map_err(|e| MigrateError::Restore(format!("cannot read the backup {}: {e}", backup.path.display())))?;
    if size != backup.size || sha != backup.sha256 {
        return Err(MigrateError::Restore(format!(
            "the backup {} changed since it was taken (sha256 {sha}, expected {})",
            backup.path.display(),
            backup.sha256
        )));
    }
    Ok(())
}

/// Drops every schema (and the database-wide objects pg_dump dumps: event
/// triggers, publications), then recreates `public` as it was: pg_dump does
/// not dump the `public` schema itself, only its contents. Runs in the same
/// transaction as the replayed dump.
const PG_RESTORE_PRELUDE: &str = r#"
DO $cutover$
DECLARE
  r record;
  pub_owner text;
  pub_comment text;
  pub_acl aclitem[];
BEGIN
  SELECT n.nspowner::regrole::text, obj_description(n.oid, 'pg_namespace'), n.nspacl
    INTO pub_owner, pub_comment, pub_acl
    FROM pg_namespace n WHERE n.nspname = 'public';
  FOR r IN SELECT evtname FROM pg_event_trigger LOOP
    EXECUTE format('DROP EVENT TRIGGER %I CASCADE', r.evtname);
  END LOOP;
  FOR r IN SELECT pubname FROM pg_publication LOOP
    EXECUTE format('DROP PUBLICATION %I CASCADE', r.pubname);
  END LOOP;
  FOR r IN SELECT nspname FROM pg_namespace
           WHERE nspname NOT IN ('pg_catalog', 'information_schema')
             AND nspname NOT LIKE 'pg\_toast%' AND nspname NOT LIKE 'pg\_temp\_%' LOOP
    EXECUTE format('DROP SCHEMA %I CASCADE', r.nspname);
  END LOOP;
  IF pub_owner IS NOT NULL THEN
    EXECUTE format('CREATE SCHEMA public AUTHORIZATION %s', pub_owner);
    IF pub_comment IS NOT NULL THEN
      EXECUTE format('COMMENT ON SCHEMA public IS %L', pub_comment);
    END IF;
    IF pub_acl IS NOT NULL THEN
      EXECUTE format('REVOKE ALL ON SCHEMA public FROM PUBLIC, %s', pub_owner);
      FOR r IN SELECT a.grantee, a.privilege_type, a.is_grantable FROM aclexplode(pub_acl) a LOOP
        EXECUTE format('GRANT %s ON SCHEMA public TO %s%s', r.privilege_type,
          CASE WHEN r.grantee = 0 THEN 'PUBLIC' ELSE r.grantee::regrole::text END,
          CASE WHEN r.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
      END LOOP;
    END IF;
  END IF;
END
$cutover$;
"#;

/// Restores `backup` over the database. PostgreSQL keeps `conn` (and so
/// the migration lock); SQLite closes it, replaces the file and reopens.
/// Returns the connection to go on with.
pub async fn restore_into(cfg: &DbConfig, conn: Conn, backup: &BackupInfo) -> Result<Conn, MigrateError> {
    verify(backup)?;
    let red = Redactor::new(&cfg.url);
    if backup.driver != cfg.driver {
        return Err(MigrateError::Restore(format!(
            "the backup is a {} backup; this is a {} database",
            backup.driver, cfg.driver
        )));
    }
    let mut conn = conn;
    match cfg.driver {
        Driver::Postgres => {
            // The passfile goes there.
            ensure_dir(&cfg.backup_dir).map_err(|e| MigrateError::Restore(e.to_string()))?;
            let major = conn.pg_major().await?;
            let pg_restore = pg_tool(cfg, major, "pg_restore")?;
            let psql = pg_tool(cfg, major, "psql")?;
            let env = pg_env(&cfg.url, &red)?;
            let (cfg2, backup2, red2) = (cfg.clone(), backup.clone(), red.clone());
            tokio::task::spawn_blocking(move || -> Result<(), MigrateError> {
                let fail = |m: String| MigrateError::Restore(red2.clean(&m));
                let pass = env
                    .password
                    .as_deref()
                    .map(|p| Passfile::write(&cfg2.backup_dir, p))
                    .transpose()
                    .map_err(|e| fail(format!("cannot write a passfile: {e}")))?;
                // The archive as SQL, on a pipe (never a second copy of the
                // data on disk).
                let mut script = Command::new(&pg_restore)
                    .arg("--file=-")
                    .arg(&backup2.path)
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .map_err(|e| fail(format!("cannot run {}: {e}", pg_restore.display())))?;
                let sql = script.stdout.take().expect("piped stdout");
                let timeouts = [
                    format!("-c lock_timeout={}", cfg2.lock_timeout.as_millis()),
                    format!("-c statement_timeout={}", cfg2.statement_timeout.as_millis()),
                ];
                let out = pg_command(&psql, &env, &timeouts, pass.as_ref())
                    .args([
                        "-X",
                        "-q",
                        "--no-password",
                        "-v",
                        "ON_ERROR_STOP=1",
                        "--single-transaction",
                    ])
                    .arg("-c")
                    .arg(PG_RESTORE_PRELUDE)
                    .args(["-f", "-"])
                    .stdin(Stdio::from(sql))
                    .output();
                let script_out = script.wait_with_output();
                let out = out.map_err(|e| fail(format!("cannot run {}: {e}", psql.display())))?;
                let script_out = script_out.map_err(|e| fail(format!("pg_restore: {e}")))?;
                // psql first: when it stops on an error, pg_restore dies of
                // the closed pipe, which says nothing.
                if !out.status.success() {
                    return Err(MigrateError::Restore(tool_error(
                        &red2,
                        "psql (replaying the backup)",
                        &out,
                    )));
                }
                if !script_out.status.success() {
                    return Err(MigrateError::Restore(tool_error(&red2, "pg_restore", &script_out)));
                }
                Ok(())
            })
            .await
            .map_err(|e| MigrateError::Restore(e.to_string()))??;
        }
        Driver::Sqlite => {
            let wal = conn.sqlite_journal_mode().await?.as_deref() == Some("wal");
            conn.close().await;
            let db = sqlite_path(cfg)?;
            let src = backup.path.clone();
            tokio::task::spawn_blocking(move || replace_sqlite_file(&src, &db))
                .await
                .map_err(|e| MigrateError::Restore(e.to_string()))??;
            conn = Conn::connect(cfg, Access::ReadWrite)
                .await?
                .ok_or_else(|| MigrateError::Restore("the restored database is missing".into()))?;
            if wal {
                conn.sqlite_set_wal().await?;
            }
        }
    }
    let now: Vec<i64> = conn
        .applied()
        .await?
        .iter()
        .filter(|r| r.success)
        .map(|r| r.version)
        .collect();
    if now != backup.versions {
        return Err(MigrateError::Restore(format!(
            "after the restore the applied versions are {now:?}, the backup had {:?}",
            backup.versions
        )));
    }
    Ok(conn)
}

/// Puts a copy of `src` in place of the database file `db`: written next to
/// it, synced, then renamed over it, so a crash leaves either the old or the
/// restored database, never half of one. The journal files of the old one
/// go first: a leftover `-wal` would be replayed into the restored file.
fn replace_sqlite_file(src: &Path, db: &Path) -> Result<(), MigrateError> {
    let fail = |what: &str, e: std::io::Error| MigrateError::Restore(format!("{what}: {e}"));
    let mut tmp_name = db.as_os_str().to_owned();
    tmp_name.push(".cutover-restore");
    let tmp = PathBuf::from(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    std::fs::copy(src, &tmp).map_err(|e| fail(&format!("copying {}", src.display()), e))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| fail("syncing the restored copy", e))?;
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        match std::fs::remove_file(PathBuf::from(p)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail(&format!("removing the {suffix} file"), e)),
        }
    }
    std::fs::rename(&tmp, db).map_err(|e| fail(&format!("replacing {}", db.display()), e))?;
    if let Some(dir) = db.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

/// SHA-256 of the database's schema and data, normalized so that two
/// databases with the same content hash the same (see
/// [`super::dump_checksum`]).
pub async fn content_checksum(cfg: &DbConfig) -> Result<String, MigrateError> {
    let red = Redactor::new(&cfg.url);
    let Some(mut conn) = Conn::connect(cfg, Access::ReadOnly).await? else {
        return Ok(hex(&Sha256::digest(b"")));
    };
    let lines = match cfg.driver {
        Driver::Sqlite => conn.sqlite_logical_dump().await,
        Driver::Postgres => {
            let major = conn.pg_major().await;
            match major {
                Ok(major) => pg_plain_dump(cfg, major, &red).await,
                Err(e) => Err(e),
            }
        }
    };
    conn.close().await;
    let mut h = Sha256::new();
    for l in lines? {
        h.update(l.as_bytes());
        h.update(b"\n");
    }
    Ok(hex(&h.finalize()))
}

/// `pg_dump --format=plain` without the `_sqlx_migrations` rows, minus
/// what varies between two dumps of the same content: comments (versions,
/// names), blank lines, the random `\restrict` keys, and row order within
/// each table's data.
async fn pg_plain_dump(cfg: &DbConfig, major: Option<u32>, red: &Redactor) -> Result<Vec<String>, MigrateError> {
    let tool = pg_tool(cfg, major, "pg_dump")?;
    let env = pg_env(&cfg.url, red)?;
    ensure_dir(&cfg.backup_dir)?;
    let dir = cfg.backup_dir.clone();
    let out = tokio::task::spawn_blocking(move || -> std::io::Result<std::process::Output> {
        let pass = env.password.as_deref().map(|p| Passfile::write(&dir, p)).transpose()?;
        pg_command(&tool, &env, &[], pass.as_ref())
            .args(["--format=plain", "--no-owner", "--no-password"])
            .arg(format!("--exclude-table-data={}", super::conn::MIGRATIONS_TABLE))
            .output()
    })
    .await
    .map_err(|e| MigrateError::Database(e.to_string()))?
    .map_err(|e| MigrateError::Database(red.clean(&format!("cannot run pg_dump: {e}"))))?;
    if !out.status.success() {
        return Err(MigrateError::Database(tool_error(red, "pg_dump", &out)));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = Vec::new();
    let mut copy: Option<Vec<String>> = None;
    for l in text.lines() {
        if let Some(rows) = copy.as_mut() {
            if l == "\\." {
                rows.sort();
                lines.append(rows);
                lines.push(l.to_owned());
                copy = None;
            } else {
                rows.push(l.to_owned());
            }
            continue;
        }
        if l.is_empty() || l.starts_with("--") || l.starts_with("\\restrict") || l.starts_with("\\unrestrict") {
            continue;
        }
        if l.starts_with("COPY ") && l.ends_with("FROM stdin;") {
            copy = Some(Vec::new());
        }
        lines.push(l.to_owned());
    }
    Ok(lines)
}

/// How long the lock-file poll sleeps between tries.
const LOCK_POLL: Duration = Duration::from_millis(50);

/// SQLite's migration lock: an exclusive `flock` on `<db>.cutover-migrate.lock`
/// (sqlx takes none for SQLite). It excludes other runs in this process and
/// in others; held until dropped.
pub struct FileLock(#[allow(dead_code)] std::fs::File);

pub async fn lock_sqlite(cfg: &DbConfig) -> Result<FileLock, MigrateError> {
    let db = sqlite_path(cfg)?;
    let mut name = db.as_os_str().to_owned();
    name.push(".cutover-migrate.lock");
    let path = PathBuf::from(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| MigrateError::Database(format!("cannot open the lock file {}: {e}", path.display())))?;
    let deadline = tokio::time::Instant::now() + cfg.lock_timeout;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(FileLock(file)),
            Err(std::fs::TryLockError::WouldBlock) => {
                if tokio::time::Instant::now() >= deadline {
                    return Err(MigrateError::Locked {
                        waited_ms: cfg.lock_timeout.as_millis() as u64,
                    });
                }
                tokio::time::sleep(LOCK_POLL).await;
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(MigrateError::Database(format!("cannot lock {}: {e}", path.display())));
            }
        }
    }
}

/// `db`'s URL with `database` in place of its database (a scratch database
/// on the same server, with the same credentials).
pub fn database_url(db: &DbConfig, database: &str) -> Result<DbUrl, MigrateError> {
    let red = Redactor::new(&db.url);
    let mut u =
        url::Url::parse(db.url.expose()).map_err(|e| MigrateError::Config(red.clean(&format!("database URL: {e}"))))?;
    u.set_path(&format!("/{database}"));
    Ok(DbUrl::new(u.to_string()))
}

/// Runs one statement on `db`'s server outside a transaction (CREATE and
/// DROP DATABASE cannot run in one).
async fn server_statement(db: &DbConfig, sql: &str) -> Result<(), MigrateError> {
    use sqlx::Connection;
    let red = Redactor::new(&db.url);
    let mut conn = sqlx::PgConnection::connect(db.url.expose())
        .await
        .map_err(|e| MigrateError::Database(red.clean(&format!("connecting: {e}"))))?;
    let r = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&mut conn)
        .await;
    let _ = conn.close().await;
    r.map(|_| ())
        .map_err(|e| MigrateError::Database(red.clean(&format!("{sql}: {e}"))))
}

/// `name` as a quoted SQL identifier.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The database `db`'s URL names (as libpq reads it: the path, or a
/// `dbname` parameter).
pub fn database_name(db: &DbConfig) -> Result<String, MigrateError> {
    pg_env(&db.url, &Redactor::new(&db.url))?
        .vars
        .into_iter()
        .find(|(k, _)| *k == "PGDATABASE")
        .map(|(_, v)| v)
        .ok_or_else(|| MigrateError::Config("the database URL names no database".into()))
}

/// Puts database `restored` in the place of `db`'s database: `db`'s is
/// renamed to `keep_as` and `restored` takes its name and owner, in one
/// transaction, so the app finds either all of the old data or all of the
/// new. Sessions still connected to either database (an idle pool of an
/// app in maintenance) are ended first, and new ones refused meanwhile.
/// Runs from the server's `postgres` database: neither renamed database
/// may have a session, ours included. On failure nothing is renamed and
/// `db`'s database accepts connections again.
pub async fn swap_databases(db: &DbConfig, restored: &str, keep_as: &str) -> Result<(), MigrateError> {
    use sqlx::Connection;
    check_database_name(restored)?;
    check_database_name(keep_as)?;
    let primary = database_name(db)?;
    let red = Redactor::new(&db.url);
    let admin = database_url(db, "postgres")?;
    let mut conn = sqlx::PgConnection::connect(admin.expose())
        .await
        .map_err(|e| MigrateError::Database(red.clean(&format!("connecting to the postgres database: {e}"))))?;
    let run = |sql: String| sqlx::raw_sql(sqlx::AssertSqlSafe(sql));
    let fail = |what: &str, e: sqlx::Error| MigrateError::Database(red.clean(&format!("{what}: {e}")));
    let (p, r, k) = (ident(&primary), ident(restored), ident(keep_as));
    let swapped = async {
        run(format!("ALTER DATABASE {p} WITH ALLOW_CONNECTIONS false"))
            .execute(&mut conn)
            .await
            .map_err(|e| fail(&format!("closing {primary} to new sessions"), e))?;
        // pg_terminate_backend only signals; wait until they are gone.
        let deadline = std::time::Instant::now() + db.lock_timeout.max(std::time::Duration::from_secs(5));
        loop {
            let left: i64 = sqlx::query_scalar(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE datname IN ($1, $2) AND pid <> pg_backend_pid()",
            )
            .bind(&primary)
            .bind(restored)
            .fetch_one(&mut conn)
            .await
            .map_err(|e| fail("ending sessions", e))?;
            if left == 0 {
                break;
            }
            if std::time::Instant::now() > deadline {
                return Err(MigrateError::Database(format!(
                    "{left} session(s) on {primary} did not end; nothing was replaced"
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let owner: String = sqlx::query_scalar("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = $1")
            .bind(&primary)
            .fetch_one(&mut conn)
            .await
            .map_err(|e| fail("reading the owner", e))?;
        let mut tx = conn.begin().await.map_err(|e| fail("BEGIN", e))?;
        for sql in [
            format!("ALTER DATABASE {p} RENAME TO {k}"),
            format!("ALTER DATABASE {r} RENAME TO {p}"),
            format!("ALTER DATABASE {p} OWNER TO {}", ident(&owner)),
            format!("ALTER DATABASE {k} WITH ALLOW_CONNECTIONS true"),
        ] {
            run(sql.clone()).execute(&mut *tx).await.map_err(|e| fail(&sql, e))?;
        }
        tx.commit().await.map_err(|e| fail("COMMIT", e))
    }
    .await;
    if swapped.is_err() {
        // Whatever failed, the primary takes sessions again.
        let _ = run(format!("ALTER DATABASE {p} WITH ALLOW_CONNECTIONS true"))
            .execute(&mut conn)
            .await;
    }
    let _ = conn.close().await;
    swapped
}

/// Creates database `name` (lowercase letters, digits, `_`) on `db`'s server.
pub async fn create_database(db: &DbConfig, name: &str) -> Result<(), MigrateError> {
    check_database_name(name)?;
    server_statement(db, &format!("CREATE DATABASE \"{name}\"")).await
}

/// Drops database `name` on `db`'s server, if it exists.
pub async fn drop_database(db: &DbConfig, name: &str) -> Result<(), MigrateError> {
    check_database_name(name)?;
    server_statement(db, &format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).await
}

fn check_database_name(name: &str) -> Result<(), MigrateError> {
    if name.is_empty()
        || name.len() > 63
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err(MigrateError::Config(format!(
            "database name {} must be 1 to 63 lowercase letters, digits and _",
            cutover_shared::domain::quote(name)
        )));
    }
    Ok(())
}

/// `text` with `url`'s secrets removed.
pub fn redact(url: &DbUrl, text: &str) -> String {
    Redactor::new(url).clean(text)
}
