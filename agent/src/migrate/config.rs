//! Which database an app's migrations run against, as declared in the
//! agent's TOML config (`[[databases]]`), and the resolved form the engine
//! works with. The connection string is a secret: it is read from a file or
//! an environment variable (never written in the config itself) and held in
//! a [`DbUrl`] whose `Debug` and `Display` print `<redacted>`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::MigrateError;

pub use cutover_shared::config::{
    DEFAULT_LOCK_TIMEOUT_MS, DEFAULT_STATEMENT_TIMEOUT_MS, DatabaseConfig, DbDriver as Driver,
};

/// A database connection string. It may hold a password, so it is never
/// printed: `Debug` and `Display` show `<redacted>`, and [`DbUrl::expose`]
/// is the one way to read it.
#[derive(Clone, PartialEq, Eq)]
pub struct DbUrl(String);

impl DbUrl {
    pub fn new(url: impl Into<String>) -> DbUrl {
        DbUrl(url.into())
    }

    /// Reads the URL from a file (surrounding whitespace removed), e.g. a
    /// mounted Kubernetes secret. The error names the file, not its content.
    pub fn from_file(path: &Path) -> Result<DbUrl, MigrateError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| MigrateError::Config(format!("cannot read the database URL from {}: {e}", path.display())))?;
        let url = text.trim();
        if url.is_empty() {
            return Err(MigrateError::Config(format!(
                "{} is empty: no database URL",
                path.display()
            )));
        }
        Ok(DbUrl(url.to_owned()))
    }

    /// Reads the URL from an environment variable.
    pub fn from_env(var: &str) -> Result<DbUrl, MigrateError> {
        match std::env::var(var) {
            Ok(v) if !v.trim().is_empty() => Ok(DbUrl(v.trim().to_owned())),
            Ok(_) => Err(MigrateError::Config(format!(
                "environment variable {var} is empty: no database URL"
            ))),
            Err(_) => Err(MigrateError::Config(format!(
                "environment variable {var} is not set (or not UTF-8): no database URL"
            ))),
        }
    }

    /// The secret itself. Use it to connect; never format it into a message.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for DbUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for DbUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Checks a `[[databases]]` entry, naming the field.
pub fn check_config(d: &DatabaseConfig) -> Result<(), MigrateError> {
    d.validate().map_err(|e| MigrateError::Config(e.to_string()))
}

/// Reads the entry's secret and fills in defaults; `data_dir` is the agent's.
pub fn resolve(d: &DatabaseConfig, data_dir: &Path) -> Result<DbConfig, MigrateError> {
    check_config(d)?;
    let url = match (&d.url_file, &d.url_env) {
        (Some(f), _) => DbUrl::from_file(f)?,
        (None, Some(v)) => DbUrl::from_env(v)?,
        (None, None) => unreachable!("validated"),
    };
    Ok(DbConfig {
        app: d.app.clone(),
        driver: d.driver,
        url,
        primary: d.is_primary(),
        lock_timeout: Duration::from_millis(d.lock_timeout_ms),
        statement_timeout: Duration::from_millis(d.statement_timeout_ms),
        backup_dir: d
            .backup_dir
            .clone()
            .unwrap_or_else(|| data_dir.join("db-backups").join(&d.app)),
        pg_bin_dir: d.pg_bin_dir.clone(),
    })
}

/// A database as the engine uses it. `Debug` is safe to log: the URL
/// prints as `<redacted>`.
#[derive(Clone, Debug)]
pub struct DbConfig {
    /// The app (a label on metrics and backup file names).
    pub app: String,
    pub driver: Driver,
    pub url: DbUrl,
    /// Only a primary is migrated, rolled back or restored.
    pub primary: bool,
    pub lock_timeout: Duration,
    pub statement_timeout: Duration,
    pub backup_dir: PathBuf,
    /// Where the PostgreSQL client tools are; see [`DatabaseConfig::pg_bin_dir`].
    pub pg_bin_dir: Option<PathBuf>,
}

impl DbConfig {
    /// A primary with the default timeouts.
    pub fn new(app: &str, driver: Driver, url: DbUrl, backup_dir: PathBuf) -> DbConfig {
        DbConfig {
            app: app.to_owned(),
            driver,
            url,
            primary: true,
            lock_timeout: Duration::from_millis(DEFAULT_LOCK_TIMEOUT_MS),
            statement_timeout: Duration::from_millis(DEFAULT_STATEMENT_TIMEOUT_MS),
            backup_dir,
            pg_bin_dir: None,
        }
    }
}
