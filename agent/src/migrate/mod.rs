//! Database schema migrations for an app, run by the agent next to the
//! database (issue 5). The coordinator decides *when* (a deploy step); this
//! module is *how*: safely, against PostgreSQL or SQLite, with sqlx's
//! migration format and bookkeeping (`_sqlx_migrations`), so an app's
//! existing `migrations/` directory and history work unchanged.
//!
//! A run ([`up`] or [`down`]):
//!
//! 1. pre-flight: connect, read what is applied, refuse drift (an applied
//!    migration whose SQL changed), dirty records and applied versions the
//!    source does not know, naming the versions; take the migration lock
//!    (PostgreSQL: sqlx's advisory lock, so this excludes `sqlx migrate run`
//!    and apps migrating themselves too; SQLite: a lock file), waiting at
//!    most `lock_timeout`;
//! 2. back the database up (`pg_dump`, SQLite `VACUUM INTO`), recording size
//!    and SHA-256;
//! 3. run each migration in order, timed (`cutover_migration_seconds`), each
//!    in its own transaction unless it opts out with `-- no-transaction`;
//! 4. run the app's checks (queries that must return a single `true`);
//! 5. on any failure, undo: run the inverse of what this run did (downs of
//!    the migrations it applied, newest first), and if an inverse is
//!    missing or fails, restore the backup. The [`RunReport`] says which.
//!
//! Nothing here ever prints the connection string: it lives in a
//! [`DbUrl`], and every error from the drivers and tools is redacted.

mod backup;
mod config;
mod conn;
mod engine;
mod redact;
mod source;
mod split;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use backup::{
    Passfile, conninfo, create_database, database_name, database_url, drop_database, libpq_command_as, pg_tool,
    pg_tool_command, redact, swap_databases, user_ids,
};
pub use config::{
    DEFAULT_LOCK_TIMEOUT_MS, DEFAULT_STATEMENT_TIMEOUT_MS, DatabaseConfig, DbConfig, DbUrl, Driver, check_config,
    resolve,
};
pub use conn::Replication;
pub use engine::{checkpoint, down, fence, plan, promote, replication, restore, status, unfence, up};
pub use redact::REDACTED;
pub use source::{MigrationSource, VersionedMigration};
pub use split::split_statements;

/// Why a migration request was refused or could not run. Every message is
/// free of the connection string and its password.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// The migration files themselves are refused (the message names the
    /// file): the coordinator's upload check, run again here.
    #[error(transparent)]
    Bundle(#[from] cutover_shared::release::BundleError),
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Database(String),
    #[error("this database is not the primary: migrations, rollbacks and restores run only against the primary")]
    NotPrimary,
    #[error("target version {0} is not a migration in the source")]
    UnknownTarget(i64),
    #[error(
        "applied migration(s) {versions:?} differ from the source (their checksums changed since they \
         were applied); refusing to migrate"
    )]
    Drift { versions: Vec<i64> },
    #[error("applied migration(s) {versions:?} are not in the source; refusing to migrate")]
    UnknownApplied { versions: Vec<i64> },
    #[error(
        "migration(s) {versions:?} are recorded as failed (success = false in _sqlx_migrations); \
         repair the database or restore a backup first"
    )]
    Dirty { versions: Vec<i64> },
    #[error("cannot revert migration {version} ({file}): it is irreversible (it has no down migration)")]
    Irreversible { version: i64, file: String },
    #[error("another migration run holds the migration lock on this database; gave up after {waited_ms} ms")]
    Locked { waited_ms: u64 },
    #[error("backup failed: {0}")]
    Backup(String),
    #[error("restore failed: {0}")]
    Restore(String),
}

/// Which way a run goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Up,
    Down,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Up => "up",
            Direction::Down => "down",
        })
    }
}

/// One row of `_sqlx_migrations`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedMigration {
    pub version: i64,
    pub description: String,
    /// SHA-384 of the SQL that ran, hex.
    pub checksum: String,
    /// false: the migration failed part way (only possible for a
    /// `-- no-transaction` migration, or an older sqlx).
    pub success: bool,
}

/// Where a database stands against a source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationStatus {
    /// Everything `_sqlx_migrations` records, by version.
    pub applied: Vec<AppliedMigration>,
    /// In the source, not applied, ascending.
    pub pending: Vec<i64>,
    /// Applied, but the source's SQL has a different checksum.
    pub drifted: Vec<i64>,
    /// Applied, but not in the source.
    pub unknown: Vec<i64>,
    /// Recorded as failed.
    pub dirty: Vec<i64>,
    /// The newest successfully applied version.
    pub newest_applied: Option<i64>,
}

impl MigrationStatus {
    /// The successfully applied versions, ascending.
    pub fn applied_versions(&self) -> Vec<i64> {
        self.applied.iter().filter(|a| a.success).map(|a| a.version).collect()
    }
}

/// One migration a run would execute.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedStep {
    pub version: i64,
    pub description: String,
    pub direction: Direction,
    /// The file whose SQL runs.
    pub file: String,
    /// `-- no-transaction`: not wrapped in a transaction, so a failure part
    /// way cannot be undone by the migration's down; the run would restore
    /// the backup instead.
    pub no_transaction: bool,
    /// The SQL, statement by statement (for reading; the file runs whole).
    pub statements: Vec<String>,
}

/// What a run would do, computed without changing anything.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub direction: Direction,
    pub target: Option<i64>,
    /// Successfully applied versions now.
    pub applied: Vec<i64>,
    /// In the order they would run.
    pub steps: Vec<PlannedStep>,
}

/// A backup taken before a run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupInfo {
    pub path: PathBuf,
    pub size: u64,
    /// SHA-256 of the file, hex; checked again before a restore.
    pub sha256: String,
    pub driver: Driver,
    /// The applied versions the backup holds.
    pub versions: Vec<i64>,
    pub created_unix_ms: u64,
}

/// One migration executed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepReport {
    pub version: i64,
    pub description: String,
    pub direction: Direction,
    pub duration: Duration,
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every planned migration ran and every check passed.
    Applied,
    /// An `up` run failed; the downs of what it applied ran, newest first.
    RolledBackByDowns,
    /// A `down` run failed; the ups of what it reverted ran again.
    RolledBackByUps,
    /// A run failed and could not be undone migration by migration (an
    /// inverse was missing or failed, or a `-- no-transaction` migration
    /// failed part way); the pre-run backup was restored.
    RestoredFromBackup,
    /// A run failed and so did restoring the backup: the database is in an
    /// unknown state and needs an operator ([`RunReport::error`] says all).
    Unrecovered,
}

impl Outcome {
    /// The snake_case name (as serialized, and as the metrics label).
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::RolledBackByDowns => "rolled_back_by_downs",
            Outcome::RolledBackByUps => "rolled_back_by_ups",
            Outcome::RestoredFromBackup => "restored_from_backup",
            Outcome::Unrecovered => "unrecovered",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a run did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunReport {
    pub direction: Direction,
    pub target: Option<i64>,
    /// Successfully applied versions before the run.
    pub versions_before: Vec<i64>,
    /// The migrations this run executed as planned (ups for `up`, downs
    /// for `down`), in order, with their durations.
    pub applied: Vec<StepReport>,
    /// The inverse migrations run to undo a failed run, in order.
    pub compensation: Vec<StepReport>,
    /// None when there was nothing to do.
    pub backup: Option<BackupInfo>,
    pub outcome: Outcome,
    /// Why the run failed (and, if undoing it failed too, why), redacted.
    pub error: Option<String>,
    /// Successfully applied versions after the run.
    pub versions_after: Vec<i64>,
}

impl RunReport {
    pub fn succeeded(&self) -> bool {
        self.outcome == Outcome::Applied
    }
}

/// What happens during a run, for progress reporting.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum RunEvent<'a> {
    /// The migration lock is held; nothing else migrates this database now.
    LockAcquired,
    BackupTaken(&'a BackupInfo),
    StepStarted {
        version: i64,
        direction: Direction,
        compensating: bool,
    },
    StepFinished {
        step: &'a StepReport,
        compensating: bool,
    },
    StepFailed {
        version: i64,
        direction: Direction,
        error: &'a str,
    },
    CheckFailed {
        check: &'a str,
        error: &'a str,
    },
    /// The run failed; undoing it.
    Undoing {
        error: &'a str,
    },
    Restoring(&'a BackupInfo),
    Restored,
}

impl fmt::Display for RunEvent<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunEvent::LockAcquired => write!(f, "migration lock acquired"),
            RunEvent::BackupTaken(b) => write!(
                f,
                "backup taken: {} ({} bytes, sha256 {})",
                b.path.display(),
                b.size,
                b.sha256
            ),
            RunEvent::StepStarted {
                version,
                direction,
                compensating,
            } => write!(
                f,
                "{}running migration {version} {direction}",
                if *compensating { "undo: " } else { "" }
            ),
            RunEvent::StepFinished { step, compensating } => write!(
                f,
                "{}migration {} {} done in {:.3} s",
                if *compensating { "undo: " } else { "" },
                step.version,
                step.direction,
                step.duration.as_secs_f64()
            ),
            RunEvent::StepFailed {
                version,
                direction,
                error,
            } => write!(f, "migration {version} {direction} failed: {error}"),
            RunEvent::CheckFailed { check, error } => write!(f, "check {check:?} failed: {error}"),
            RunEvent::Undoing { error } => write!(f, "run failed ({error}); undoing it"),
            RunEvent::Restoring(b) => write!(f, "restoring the backup {}", b.path.display()),
            RunEvent::Restored => write!(f, "backup restored"),
        }
    }
}

/// Receives [`RunEvent`]s; any `Fn(&RunEvent)` is one, and [`Quiet`]
/// ignores them. Called inline on the run's task, so it must not block
/// (forward the event on a channel instead).
pub trait RunObserver: Send + Sync {
    fn on_event(&self, event: &RunEvent<'_>);
}

impl<F: Fn(&RunEvent<'_>) + Send + Sync> RunObserver for F {
    fn on_event(&self, event: &RunEvent<'_>) {
        self(event)
    }
}

/// An observer that ignores everything.
pub struct Quiet;

impl RunObserver for Quiet {
    fn on_event(&self, _: &RunEvent<'_>) {}
}

/// SHA-256 (hex) of the database's schema and data, the same for two
/// databases with the same content: for tests and for checking a restore.
/// PostgreSQL: `pg_dump --format=plain --no-owner` without comments and
/// with each table's rows sorted; SQLite: the schema (`sqlite_master`)
/// and every table's rows, sorted. The rows of `_sqlx_migrations` are left
/// out (their timestamps and timings vary); compare versions with
/// [`status`].
pub async fn dump_checksum(cfg: &DbConfig) -> Result<String, MigrateError> {
    backup::content_checksum(cfg).await
}

/// Runs an app's checks (`migration_checks`: each one row, one boolean,
/// true) against `cfg`'s database, where they cannot write. The error
/// names the first check that failed.
pub async fn run_checks(cfg: &DbConfig, checks: &[String]) -> Result<(), String> {
    if checks.is_empty() {
        return Ok(());
    }
    let Some(mut conn) = conn::Conn::connect(cfg, conn::Access::ReadOnly)
        .await
        .map_err(|e| e.to_string())?
    else {
        return Err("the database does not exist".into());
    };
    let mut result = Ok(());
    for check in checks {
        if let Err(e) = conn.check(check).await {
            result = Err(format!("check {check:?} failed: {e}"));
            break;
        }
    }
    conn.close().await;
    result
}

pub use conn::sqlite_path;

/// A consistent copy of a live SQLite database at `to` (`VACUUM INTO`),
/// taken read-only: the database itself is not changed.
pub async fn sqlite_copy(cfg: &DbConfig, to: &std::path::Path) -> Result<(), MigrateError> {
    let Some(mut conn) = conn::Conn::connect(cfg, conn::Access::ReadOnly).await? else {
        return Err(MigrateError::Config("the SQLite database does not exist".into()));
    };
    let r = conn.sqlite_vacuum_into(to).await;
    conn.close().await;
    r
}

/// Replaces the content of `cfg`'s live SQLite database with that of the
/// database file `from`, in one `BEGIN IMMEDIATE` transaction on the live
/// file itself: every schema object of the live database is dropped, every
/// one of `from` recreated from its SQL, the rows copied, `sqlite_sequence`
/// and `user_version` carried over. Processes that hold the file open see
/// the new content (the file is not swapped under them); a failure rolls
/// back and changes nothing.
pub async fn sqlite_replace(cfg: &DbConfig, from: &std::path::Path) -> Result<(), MigrateError> {
    use sqlx::{ConnectOptions, Connection};
    let red = redact::Redactor::new(&cfg.url);
    let path = sqlite_path(cfg)?;
    let fail = |what: &str, e: sqlx::Error| MigrateError::Database(red.clean(&format!("{what}: {e}")));
    let from_str = from
        .to_str()
        .ok_or_else(|| MigrateError::Backup(format!("{} is not UTF-8", from.display())))?;
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .foreign_keys(false)
        .busy_timeout(cfg.lock_timeout)
        .disable_statement_logging()
        .connect()
        .await
        .map_err(|e| fail("opening the database", e))?;
    let q = |sql: String| sqlx::raw_sql(sqlx::AssertSqlSafe(sql));
    let id = |name: &str| format!("\"{}\"", name.replace('"', "\"\""));
    let result = async {
        sqlx::query("ATTACH DATABASE ?1 AS restored")
            .bind(from_str)
            .execute(&mut conn)
            .await
            .map_err(|e| fail("attaching the restored copy", e))?;
        q("BEGIN IMMEDIATE".into())
            .execute(&mut conn)
            .await
            .map_err(|e| fail("locking the database", e))?;
        let replaced = async {
            let live: Vec<(String, String)> = sqlx::query_as(
                "SELECT type, name FROM main.sqlite_master WHERE name NOT LIKE 'sqlite_%' \
                 AND type IN ('view', 'trigger', 'table') ORDER BY type = 'table', name",
            )
            .fetch_all(&mut conn)
            .await
            .map_err(|e| fail("listing the live schema", e))?;
            for (kind, name) in live {
                q(format!("DROP {} IF EXISTS main.{}", kind.to_uppercase(), id(&name)))
                    .execute(&mut conn)
                    .await
                    .map_err(|e| fail(&format!("dropping {name}"), e))?;
            }
            let wanted: Vec<(String, String, String)> = sqlx::query_as(
                "SELECT type, name, sql FROM restored.sqlite_master WHERE sql IS NOT NULL \
                 AND name NOT LIKE 'sqlite_%' ORDER BY rowid",
            )
            .fetch_all(&mut conn)
            .await
            .map_err(|e| fail("reading the restored schema", e))?;
            // Tables and their rows first, then what refers to them.
            for (kind, name, sql) in wanted.iter().filter(|(k, _, _)| k == "table") {
                q(sql.clone())
                    .execute(&mut conn)
                    .await
                    .map_err(|e| fail(&format!("creating {kind} {name}"), e))?;
                q(format!("INSERT INTO main.{n} SELECT * FROM restored.{n}", n = id(name)))
                    .execute(&mut conn)
                    .await
                    .map_err(|e| fail(&format!("copying the rows of {name}"), e))?;
            }
            for (kind, name, sql) in wanted.iter().filter(|(k, _, _)| k != "table") {
                q(sql.clone())
                    .execute(&mut conn)
                    .await
                    .map_err(|e| fail(&format!("creating {kind} {name}"), e))?;
            }
            // AUTOINCREMENT counters: the restored ones, or none (the live
            // table, which SQLite never drops, is emptied).
            for (schema, sql) in [
                ("main", "DELETE FROM main.sqlite_sequence"),
                (
                    "restored",
                    "INSERT INTO main.sqlite_sequence SELECT * FROM restored.sqlite_sequence",
                ),
            ] {
                let exists: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT count(*) > 0 FROM {schema}.sqlite_master WHERE name = 'sqlite_sequence'"
                )))
                .fetch_one(&mut conn)
                .await
                .map_err(|e| fail("reading sqlite_sequence", e))?;
                if exists {
                    q(sql.into())
                        .execute(&mut conn)
                        .await
                        .map_err(|e| fail("copying sqlite_sequence", e))?;
                }
            }
            let version: i64 = sqlx::query_scalar("PRAGMA restored.user_version")
                .fetch_one(&mut conn)
                .await
                .map_err(|e| fail("reading user_version", e))?;
            q(format!("PRAGMA main.user_version = {version}"))
                .execute(&mut conn)
                .await
                .map_err(|e| fail("setting user_version", e))?;
            Ok::<_, MigrateError>(())
        }
        .await;
        let end = if replaced.is_ok() { "COMMIT" } else { "ROLLBACK" };
        let ended = q(end.into()).execute(&mut conn).await;
        replaced?;
        ended.map_err(|e| fail(end, e))?;
        Ok(())
    }
    .await;
    let _ = q("DETACH DATABASE restored".into()).execute(&mut conn).await;
    let _ = conn.close().await;
    result
}
