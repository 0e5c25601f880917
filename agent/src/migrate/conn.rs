//! One connection to the migrated database, PostgreSQL or SQLite, with the
//! few operations the engine needs. Migrations themselves go through sqlx's
//! [`Migrate`] implementation, so the `_sqlx_migrations` bookkeeping (and,
//! on PostgreSQL, the advisory lock id) is exactly sqlx's.
//!
//! Every error leaves here already redacted.

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::{Migrate, Migration};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Executor, Row};

use super::MigrateError;
use super::config::{DbConfig, Driver};
use super::redact::Redactor;

/// sqlx's bookkeeping table.
pub const MIGRATIONS_TABLE: &str = "_sqlx_migrations";

/// A row of `_sqlx_migrations`.
#[derive(Clone, Debug)]
pub struct AppliedRow {
    pub version: i64,
    pub description: String,
    pub success: bool,
    pub checksum: Vec<u8>,
}

enum Inner {
    Pg(PgConnection),
    Sqlite(SqliteConnection),
}

pub struct Conn {
    inner: Inner,
    red: Redactor,
}

/// A PostgreSQL server's replication state (see [`Conn::replication`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replication {
    /// A standby (replaying WAL) rather than a primary.
    pub in_recovery: bool,
    /// A primary's current WAL position, a standby's replayed one.
    pub lsn: Option<u64>,
    /// A standby's received position.
    pub receive_lsn: Option<u64>,
    /// A standby's replay delay, ms.
    pub lag_ms: Option<u64>,
    /// New transactions are read-only (`default_transaction_read_only`):
    /// on a primary, a fence.
    pub read_only: bool,
    /// A standby's WAL receiver streams from its primary.
    pub streaming: bool,
}

/// How a connection may touch the database.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Status, plan, checksums: must change nothing (a missing SQLite file is
    /// not created).
    ReadOnly,
    ReadWrite,
}

/// Runs a driver call on whichever connection this is.
macro_rules! on {
    ($self:expr, $c:ident => $e:expr) => {
        match &mut $self.inner {
            Inner::Pg($c) => $e,
            Inner::Sqlite($c) => $e,
        }
    };
}

impl Conn {
    /// Connects; `Ok(None)` for a read-only look at a SQLite database file
    /// that does not exist yet (an empty database).
    pub async fn connect(cfg: &DbConfig, access: Access) -> Result<Option<Conn>, MigrateError> {
        let red = Redactor::new(&cfg.url);
        let db = |what: &str, e: sqlx::Error| MigrateError::Database(red.clean(&format!("{what}: {e}")));
        let inner = match cfg.driver {
            Driver::Postgres => {
                // Refuse parameters we could not hand on to pg_dump, before
                // sqlx sees (and logs) them.
                super::backup::pg_env(&cfg.url, &red)?;
                let opts = PgConnectOptions::from_str(cfg.url.expose())
                    .map_err(|e| db("invalid PostgreSQL URL", e))?
                    .application_name("cutover-agent")
                    .disable_statement_logging();
                let mut c = opts
                    .connect()
                    .await
                    .map_err(|e| db("cannot connect to PostgreSQL", e))?;
                // Bound how long a migration's DDL may wait for a table lock
                // (while it waits, the app's queries queue behind it) and how
                // long one statement may run.
                let set = format!(
                    "SET lock_timeout = {}; SET statement_timeout = {}",
                    cfg.lock_timeout.as_millis(),
                    cfg.statement_timeout.as_millis()
                );
                c.execute(AssertSqlSafe(set))
                    .await
                    .map_err(|e| db("cannot set the session timeouts", e))?;
                Inner::Pg(c)
            }
            Driver::Sqlite => {
                let path = sqlite_path(cfg)?;
                if access == Access::ReadOnly && !path.exists() {
                    return Ok(None);
                }
                let opts = SqliteConnectOptions::from_str(cfg.url.expose())
                    .map_err(|e| db("invalid SQLite URL", e))?
                    .create_if_missing(access == Access::ReadWrite)
                    .read_only(access == Access::ReadOnly)
                    .busy_timeout(cfg.lock_timeout)
                    .disable_statement_logging();
                Inner::Sqlite(
                    opts.connect()
                        .await
                        .map_err(|e| db("cannot open the SQLite database", e))?,
                )
            }
        };
        Ok(Some(Conn { inner, red }))
    }

    fn err(&self, what: &str, e: impl std::fmt::Display) -> MigrateError {
        MigrateError::Database(self.red.clean(&format!("{what}: {e}")))
    }

    pub async fn close(self) {
        let _ = match self.inner {
            Inner::Pg(c) => c.close().await,
            Inner::Sqlite(c) => c.close().await,
        };
    }

    /// The server's major version (PostgreSQL), to pick matching tools.
    pub async fn pg_major(&mut self) -> Result<Option<u32>, MigrateError> {
        let Inner::Pg(c) = &mut self.inner else {
            return Ok(None);
        };
        let n: String = sqlx::query_scalar("SHOW server_version_num")
            .fetch_one(&mut *c)
            .await
            .map_err(|e| MigrateError::Database(self.red.clean(&format!("cannot read the server version: {e}"))))?;
        Ok(n.parse::<u32>().ok().map(|n| n / 10_000))
    }

    /// A PostgreSQL server's replication state; `None` for SQLite.
    pub async fn replication(&mut self) -> Result<Option<Replication>, MigrateError> {
        let Inner::Pg(c) = &mut self.inner else {
            return Ok(None);
        };
        // A standby's lag is 0 only while its WAL receiver streams and it
        // has replayed all it received; otherwise it is the age of the last
        // transaction it replayed (unknown before the first one).
        let sql = "SELECT pg_is_in_recovery(), \
                   (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text, \
                   pg_last_wal_receive_lsn()::text, \
                   CASE WHEN NOT pg_is_in_recovery() THEN NULL \
                        WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() \
                             AND EXISTS (SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming') THEN 0::bigint \
                        ELSE (extract(epoch FROM now() - pg_last_xact_replay_timestamp()) * 1000)::bigint END, \
                   current_setting('default_transaction_read_only') = 'on', \
                   EXISTS (SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming')";
        type Row = (bool, Option<String>, Option<String>, Option<i64>, bool, bool);
        let (in_recovery, lsn, receive, lag, read_only, streaming): Row = sqlx::query_as(sql)
            .fetch_one(&mut *c)
            .await
            .map_err(|e| MigrateError::Database(self.red.clean(&format!("cannot read the replication state: {e}"))))?;
        let lsn_of = |s: Option<String>| s.as_deref().and_then(cutover_shared::dr::parse_lsn);
        Ok(Some(Replication {
            in_recovery,
            lsn: lsn_of(lsn),
            receive_lsn: lsn_of(receive),
            lag_ms: lag.map(|l| u64::try_from(l).unwrap_or(0)),
            read_only,
            streaming,
        }))
    }

    /// Runs one statement on PostgreSQL (outside any transaction block:
    /// `ALTER SYSTEM` refuses one); a no-op on SQLite.
    async fn pg_exec(&mut self, what: &str, sql: &'static str) -> Result<(), MigrateError> {
        let Inner::Pg(c) = &mut self.inner else {
            return Ok(());
        };
        let r = sqlx::raw_sql(sql).execute(&mut *c).await;
        r.map(|_| ()).map_err(|e| self.err(what, e))
    }

    async fn pg_scalar<T>(&mut self, what: &str, sql: &'static str) -> Result<T, MigrateError>
    where
        T: Send + Unpin + for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
    {
        let Inner::Pg(c) = &mut self.inner else {
            return Err(MigrateError::Config(format!("{what}: not a PostgreSQL database")));
        };
        let r = sqlx::query_scalar::<_, T>(sql).fetch_one(&mut *c).await;
        r.map_err(|e| self.err(what, e))
    }

    /// Sets (or resets) `default_transaction_read_only` server-wide and
    /// waits until this session sees it: the reload reaches backends
    /// asynchronously.
    async fn set_read_only(&mut self, on: bool) -> Result<(), MigrateError> {
        if on {
            self.pg_exec(
                "cannot make the server read-only",
                "ALTER SYSTEM SET default_transaction_read_only = on",
            )
            .await?;
        } else {
            self.pg_exec(
                "cannot lift read-only",
                "ALTER SYSTEM RESET default_transaction_read_only",
            )
            .await?;
        }
        self.pg_exec("cannot reload the configuration", "SELECT pg_reload_conf()")
            .await?;
        let want = if on { "on" } else { "off" };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let now: String = self
                .pg_scalar(
                    "cannot read the setting",
                    "SELECT current_setting('default_transaction_read_only')",
                )
                .await?;
            if now == want {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(MigrateError::Database(format!(
                    "default_transaction_read_only is still {now} 10 s after the reload"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Fences a PostgreSQL primary: new transactions are read-only
    /// server-wide, and every other client session is ended (an open
    /// transaction could still commit). Returns the final WAL position,
    /// which a standby must replay before it may be promoted. Idempotent.
    pub async fn fence(&mut self) -> Result<u64, MigrateError> {
        self.set_read_only(true).await?;
        // pg_terminate_backend(pid, timeout) waits for each to be gone.
        let _: i64 = self
            .pg_scalar(
                "cannot end the other sessions",
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity \
                 WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()) t",
            )
            .await?;
        let lsn: String = self
            .pg_scalar("cannot read the WAL position", "SELECT pg_current_wal_lsn()::text")
            .await?;
        cutover_shared::dr::parse_lsn(&lsn)
            .ok_or_else(|| MigrateError::Database(format!("unreadable WAL position {lsn:?}")))
    }

    /// Forces a checkpoint: after a promotion, it writes the new timeline
    /// into the control file, which `pg_rewind` reads from its source.
    pub async fn checkpoint(&mut self) -> Result<(), MigrateError> {
        self.pg_exec("cannot checkpoint", "CHECKPOINT").await
    }

    /// Lifts a fence. Idempotent.
    pub async fn unfence(&mut self) -> Result<(), MigrateError> {
        self.set_read_only(false).await
    }

    /// Promotes a PostgreSQL standby once it replayed up to `wait_for`
    /// (within `catch_up`), and waits until it accepts writes. A server
    /// that is already a primary is only made writable (a re-sent task).
    /// Returns the new primary's WAL position and how long the catch-up
    /// took.
    pub async fn promote(
        &mut self,
        wait_for: Option<u64>,
        catch_up: Duration,
    ) -> Result<(u64, Duration), MigrateError> {
        let started = std::time::Instant::now();
        let in_recovery: bool = self
            .pg_scalar("cannot read the role", "SELECT pg_is_in_recovery()")
            .await?;
        let mut waited = Duration::ZERO;
        if in_recovery {
            if let Some(target) = wait_for {
                loop {
                    let at: Option<String> = self
                        .pg_scalar(
                            "cannot read the replay position",
                            "SELECT pg_last_wal_replay_lsn()::text",
                        )
                        .await?;
                    let at = at.as_deref().and_then(cutover_shared::dr::parse_lsn).unwrap_or(0);
                    if at >= target {
                        break;
                    }
                    if started.elapsed() > catch_up {
                        return Err(MigrateError::Database(format!(
                            "the standby replayed up to {} of the fenced primary's {} in {catch_up:?}; not promoted",
                            cutover_shared::dr::format_lsn(at),
                            cutover_shared::dr::format_lsn(target)
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                waited = started.elapsed();
            }
            let promoted: bool = self.pg_scalar("cannot promote", "SELECT pg_promote(true, 60)").await?;
            if !promoted {
                return Err(MigrateError::Database("pg_promote did not finish within 60 s".into()));
            }
        }
        // A standby copied from a fenced primary inherits its fence.
        self.set_read_only(false).await?;
        let lsn: String = self
            .pg_scalar("cannot read the WAL position", "SELECT pg_current_wal_lsn()::text")
            .await?;
        let lsn = cutover_shared::dr::parse_lsn(&lsn)
            .ok_or_else(|| MigrateError::Database(format!("unreadable WAL position {lsn:?}")))?;
        Ok((lsn, waited))
    }

    async fn table_exists(&mut self) -> Result<bool, MigrateError> {
        let r = match &mut self.inner {
            // Unqualified, as sqlx creates it: the first schema on the
            // search path.
            Inner::Pg(c) => {
                sqlx::query_scalar::<_, bool>("SELECT to_regclass($1) IS NOT NULL")
                    .bind(MIGRATIONS_TABLE)
                    .fetch_one(&mut *c)
                    .await
            }
            Inner::Sqlite(c) => {
                sqlx::query_scalar::<_, bool>(
                    "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = ?1",
                )
                .bind(MIGRATIONS_TABLE)
                .fetch_one(&mut *c)
                .await
            }
        };
        r.map_err(|e| self.err("cannot look for the migrations table", e))
    }

    /// `_sqlx_migrations`, by version; empty if the table does not exist.
    pub async fn applied(&mut self) -> Result<Vec<AppliedRow>, MigrateError> {
        if !self.table_exists().await? {
            return Ok(Vec::new());
        }
        let sql = format!("SELECT version, description, success, checksum FROM {MIGRATIONS_TABLE} ORDER BY version");
        let rows: Result<Vec<AppliedRow>, sqlx::Error> = on!(self, c => {
            let rows = sqlx::query(AssertSqlSafe(sql)).fetch_all(&mut *c).await;
            rows.and_then(|rows| {
                rows.iter()
                    .map(|r| {
                        Ok(AppliedRow {
                            version: r.try_get(0)?,
                            description: r.try_get(1)?,
                            success: r.try_get(2)?,
                            checksum: r.try_get(3)?,
                        })
                    })
                    .collect()
            })
        });
        rows.map_err(|e| self.err("cannot read the applied migrations", e))
    }

    pub async fn ensure_table(&mut self) -> Result<(), MigrateError> {
        let r = on!(self, c => c.ensure_migrations_table(MIGRATIONS_TABLE).await);
        r.map_err(|e| self.err("cannot create the migrations table", e))
    }

    /// sqlx's migration lock: on PostgreSQL `pg_advisory_lock` on sqlx's id
    /// for this database, so that this engine, `sqlx migrate run` and an app
    /// migrating itself at startup all exclude each other. The session's
    /// `lock_timeout` bounds the wait. SQLite's lock is a file lock taken by
    /// the caller.
    pub async fn lock(&mut self, waited: Duration) -> Result<(), MigrateError> {
        let Inner::Pg(c) = &mut self.inner else {
            return Ok(());
        };
        match c.lock().await {
            Ok(()) => Ok(()),
            Err(sqlx::migrate::MigrateError::Execute(sqlx::Error::Database(e)))
                if e.code().as_deref() == Some("55P03") =>
            {
                Err(MigrateError::Locked {
                    waited_ms: waited.as_millis() as u64,
                })
            }
            Err(e) => Err(MigrateError::Database(
                self.red.clean(&format!("cannot take the migration lock: {e}")),
            )),
        }
    }

    pub async fn unlock(&mut self) {
        if let Inner::Pg(c) = &mut self.inner
            && let Err(e) = c.unlock().await
        {
            // Closing the session releases it anyway.
            tracing::warn!("releasing the migration lock: {}", self.red.clean(&e.to_string()));
        }
    }

    /// Runs an up migration (in its own transaction unless it says
    /// `-- no-transaction`) and records it; the error is redacted.
    pub async fn apply(&mut self, m: &Migration) -> Result<Duration, String> {
        let r = on!(self, c => c.apply(MIGRATIONS_TABLE, m).await);
        r.map_err(|e| self.red.clean(&flatten(&e)))
    }

    /// Runs a down migration and removes the version's record.
    pub async fn revert(&mut self, m: &Migration) -> Result<Duration, String> {
        let r = on!(self, c => c.revert(MIGRATIONS_TABLE, m).await);
        r.map_err(|e| self.red.clean(&flatten(&e)))
    }

    /// Runs an app-declared check: one row, one column, true. It runs where
    /// it cannot write (a read-only transaction; SQLite's `query_only`).
    pub async fn check(&mut self, sql: &str) -> Result<(), String> {
        let result: Result<Vec<Option<bool>>, sqlx::Error> = match &mut self.inner {
            Inner::Pg(c) => {
                async {
                    let mut tx = c.begin().await?;
                    tx.execute("SET TRANSACTION READ ONLY").await?;
                    let rows = sqlx::query(AssertSqlSafe(sql.to_owned())).fetch_all(&mut *tx).await;
                    tx.rollback().await?;
                    one_bool(rows?)
                }
                .await
            }
            Inner::Sqlite(c) => {
                async {
                    c.execute("PRAGMA query_only = ON").await?;
                    let rows = sqlx::query(AssertSqlSafe(sql.to_owned())).fetch_all(&mut *c).await;
                    c.execute("PRAGMA query_only = OFF").await?;
                    one_bool(rows?)
                }
                .await
            }
        };
        match result {
            Ok(v) if v == [Some(true)] => Ok(()),
            Ok(v) if v.len() == 1 => Err(format!("returned {}", v[0].map_or("NULL".into(), |b| b.to_string()))),
            Ok(v) => Err(format!(
                "returned {} rows; a check returns exactly one row with one boolean",
                v.len()
            )),
            Err(e) => Err(self.red.clean(&e.to_string())),
        }
    }

    /// SQLite's journal mode (`wal`, `delete`, ...).
    pub async fn sqlite_journal_mode(&mut self) -> Result<Option<String>, MigrateError> {
        let Inner::Sqlite(c) = &mut self.inner else {
            return Ok(None);
        };
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&mut *c)
            .await
            .map_err(|e| MigrateError::Database(self.red.clean(&format!("cannot read the journal mode: {e}"))))?;
        Ok(Some(mode.to_ascii_lowercase()))
    }

    pub async fn sqlite_set_wal(&mut self) -> Result<(), MigrateError> {
        if let Inner::Sqlite(c) = &mut self.inner {
            let r = c.execute("PRAGMA journal_mode = WAL").await;
            r.map_err(|e| self.err("cannot restore WAL mode", e))?;
        }
        Ok(())
    }

    /// `VACUUM INTO`: a consistent copy of a live SQLite database.
    pub async fn sqlite_vacuum_into(&mut self, path: &std::path::Path) -> Result<(), MigrateError> {
        if let Inner::Sqlite(c) = &mut self.inner {
            let p = path
                .to_str()
                .ok_or_else(|| MigrateError::Backup(format!("{} is not UTF-8", path.display())))?;
            let r = sqlx::query("VACUUM INTO ?1").bind(p).execute(&mut *c).await;
            r.map_err(|e| MigrateError::Backup(self.red.clean(&format!("VACUUM INTO failed: {e}"))))?;
        }
        Ok(())
    }

    /// The logical content of a SQLite database, one line per schema object
    /// and per row (rows sorted), for [`super::dump_checksum`]. Leaves out
    /// the rows of `_sqlx_migrations`, whose timings vary.
    pub async fn sqlite_logical_dump(&mut self) -> Result<Vec<String>, MigrateError> {
        let Inner::Sqlite(c) = &mut self.inner else {
            return Ok(Vec::new());
        };
        let red = self.red.clone();
        let e = move |e: sqlx::Error| MigrateError::Database(red.clean(&format!("cannot read the database: {e}")));
        let mut out = Vec::new();
        let version: i64 = sqlx::query_scalar("PRAGMA user_version")
            .fetch_one(&mut *c)
            .await
            .map_err(&e)?;
        out.push(format!("user_version {version}"));
        let objects =
            sqlx::query("SELECT type, name, tbl_name, coalesce(sql, '') FROM sqlite_master ORDER BY type, name")
                .fetch_all(&mut *c)
                .await
                .map_err(&e)?;
        let mut tables = Vec::new();
        for o in &objects {
            let (ty, name, tbl, sql): (String, String, String, String) = (
                o.try_get(0).map_err(&e)?,
                o.try_get(1).map_err(&e)?,
                o.try_get(2).map_err(&e)?,
                o.try_get(3).map_err(&e)?,
            );
            // SQLite's AUTOINCREMENT bookkeeping: its rows are content, the
            // table itself (which cannot be dropped once made) is not.
            if name == "sqlite_sequence" {
                tables.push(name);
                continue;
            }
            out.push(format!("{ty} {name} {tbl} {sql}"));
            if ty == "table" && name != MIGRATIONS_TABLE {
                tables.push(name);
            }
        }
        for t in tables {
            let cols: Vec<String> = sqlx::query(AssertSqlSafe(format!("PRAGMA table_info({})", quote_ident(&t))))
                .fetch_all(&mut *c)
                .await
                .map_err(&e)?
                .iter()
                .map(|r| r.try_get::<String, _>(1))
                .collect::<Result<_, _>>()
                .map_err(&e)?;
            if cols.is_empty() {
                continue;
            }
            let select = cols
                .iter()
                .map(|c| format!("quote({})", quote_ident(c)))
                .collect::<Vec<_>>()
                .join(" || '|' || ");
            let mut rows: Vec<String> =
                sqlx::query_scalar(AssertSqlSafe(format!("SELECT {select} FROM {}", quote_ident(&t))))
                    .fetch_all(&mut *c)
                    .await
                    .map_err(&e)?;
            rows.sort();
            if t == "sqlite_sequence" && rows.is_empty() {
                continue;
            }
            out.push(format!("data {t} ({})", cols.join(",")));
            out.extend(rows);
        }
        Ok(out)
    }
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// sqlx's error with its cause: `ExecuteMigration`'s message leaves the
/// database's own words to `source()`.
fn flatten(e: &sqlx::migrate::MigrateError) -> String {
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cause = c.source();
    }
    s
}

fn one_bool<R: Row>(rows: Vec<R>) -> Result<Vec<Option<bool>>, sqlx::Error>
where
    for<'r> Option<bool>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    usize: sqlx::ColumnIndex<R>,
{
    let mut out = Vec::new();
    for r in &rows {
        if r.len() != 1 {
            return Err(sqlx::Error::Protocol(format!(
                "the check returned {} columns; a check returns one boolean",
                r.len()
            )));
        }
        out.push(r.try_get::<Option<bool>, _>(0usize)?);
    }
    Ok(out)
}

/// The file of a SQLite URL; in-memory databases cannot be migrated here
/// (there is nothing to back up or restore, and nothing outlives the run).
pub fn sqlite_path(cfg: &DbConfig) -> Result<std::path::PathBuf, MigrateError> {
    let red = Redactor::new(&cfg.url);
    let url = cfg.url.expose();
    let opts = SqliteConnectOptions::from_str(url)
        .map_err(|e| MigrateError::Database(red.clean(&format!("invalid SQLite URL: {e}"))))?;
    let path = opts.get_filename().to_path_buf();
    let s = path.to_string_lossy();
    if url.contains(":memory:") || url.contains("mode=memory") || s.starts_with("file:sqlx-in-memory") || s.is_empty() {
        return Err(MigrateError::Config(
            "an in-memory SQLite database cannot be migrated by the agent".into(),
        ));
    }
    Ok(path)
}
