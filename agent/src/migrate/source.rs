//! A set of migrations held in memory, parsed from files named the way the
//! sqlx CLI names them, so an app's `migrations/` directory works as is:
//!
//! - `<version>_<name>.up.sql` and `<version>_<name>.down.sql`: reversible;
//! - `<version>_<name>.sql`: irreversible, up only.
//!
//! Parsing is stricter than sqlx's own (which silently skips a file it
//! cannot parse): every file handed in must be a migration, and every
//! refusal names the offending file. Descriptions, checksums and the
//! `-- no-transaction` marker are computed exactly as sqlx computes them, so
//! what this engine writes to `_sqlx_migrations` is what `sqlx migrate run`
//! would have written, and either tool accepts the other's history.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AssertSqlSafe, SqlSafeStr};

use cutover_shared::release::{Bundle, BundleError};

use super::MigrateError;

/// One version: its up migration and, if reversible, its down.
#[derive(Clone, Debug)]
pub struct VersionedMigration {
    pub version: i64,
    /// As sqlx records it: the name with `_` turned into spaces.
    pub description: String,
    pub up: Migration,
    pub down: Option<Migration>,
    pub up_file: String,
    pub down_file: Option<String>,
}

impl VersionedMigration {
    /// sqlx's SHA-384 of the up SQL, as stored in `_sqlx_migrations.checksum`.
    pub fn checksum(&self) -> &[u8] {
        &self.up.checksum
    }

    /// Whether sqlx runs the migration outside a transaction
    /// (`-- no-transaction` on its first line).
    pub fn no_transaction(&self, down: bool) -> bool {
        match (down, &self.down) {
            (true, Some(d)) => d.no_tx,
            _ => self.up.no_tx,
        }
    }
}

/// An in-memory, validated set of migrations.
#[derive(Clone, Debug, Default)]
pub struct MigrationSource {
    versions: BTreeMap<i64, VersionedMigration>,
    total_bytes: u64,
}

fn bad(file: &str, reason: impl Into<String>) -> MigrateError {
    MigrateError::Bundle(BundleError::BadFile {
        file: file.to_owned(),
        reason: reason.into(),
    })
}

/// A sqlx migration, with sqlx's own rules (`sqlx_core::migrate::source`)
/// for the description and the `-- no-transaction` marker, so that
/// descriptions and checksums match what `sqlx migrate` records.
fn migration(version: i64, name: &str, kind: MigrationType, sql: &str) -> Migration {
    Migration::new(
        version,
        Cow::Owned(name.replace('_', " ")),
        kind,
        AssertSqlSafe(sql.to_owned()).into_sql_str(),
        sql.starts_with("-- no-transaction"),
    )
}

impl MigrationSource {
    /// Parses and validates migration files given as `(file name, content)`
    /// with the same rules the coordinator applies at upload
    /// ([`Bundle::parse`]). Every file must be a migration; refusals name
    /// the file.
    pub fn from_files(files: Vec<(String, Vec<u8>)>) -> Result<MigrationSource, MigrateError> {
        let total_bytes = files.iter().map(|(_, b)| b.len() as u64).sum();
        let bundle = Bundle::parse(files)?;
        let versions = bundle
            .migrations
            .iter()
            .map(|m| {
                let up_kind = if m.is_simple() {
                    MigrationType::Simple
                } else {
                    MigrationType::ReversibleUp
                };
                let down = m
                    .down_sql
                    .as_ref()
                    .map(|sql| migration(m.version, &m.name, MigrationType::ReversibleDown, sql));
                let v = VersionedMigration {
                    version: m.version,
                    description: m.name.replace('_', " "),
                    up: migration(m.version, &m.name, up_kind, &m.up_sql),
                    down,
                    up_file: m.up_file.clone(),
                    down_file: m.down_file.clone(),
                };
                (m.version, v)
            })
            .collect();
        Ok(MigrationSource { versions, total_bytes })
    }

    /// The migrations of a release as the coordinator sent them, checked
    /// again here: the bundle crossed the network.
    pub fn from_bundle(bundle: &Bundle) -> Result<MigrationSource, MigrateError> {
        MigrationSource::from_files(bundle.files().into_iter().map(|(n, s)| (n, s.into_bytes())).collect())
    }

    /// Reads a migrations directory: every regular `*.sql` file in it (not
    /// recursively) must be a migration; other files (a README) and hidden
    /// files are ignored.
    pub fn from_dir(dir: &Path) -> Result<MigrationSource, MigrateError> {
        let io = |e: std::io::Error| MigrateError::Io(format!("{}: {e}", dir.display()));
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                let lossy = name.to_string_lossy().into_owned();
                if lossy.ends_with(".sql") {
                    return Err(bad(&lossy, "the file name is not UTF-8"));
                }
                continue;
            };
            if name.starts_with('.') || !name.ends_with(".sql") || !entry.file_type().map_err(io)?.is_file() {
                continue;
            }
            let bytes = std::fs::read(entry.path()).map_err(io)?;
            files.push((name.to_owned(), bytes));
        }
        MigrationSource::from_files(files)
    }

    /// The total size of the SQL, for a caller's limit on what it accepts.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    pub fn is_empty(&self) -> bool {
        self.versions.is_empty()
    }

    /// The versions, ascending.
    pub fn versions(&self) -> impl DoubleEndedIterator<Item = i64> + '_ {
        self.versions.keys().copied()
    }

    pub fn get(&self, version: i64) -> Option<&VersionedMigration> {
        self.versions.get(&version)
    }

    /// The migrations, ascending by version.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &VersionedMigration> + '_ {
        self.versions.values()
    }

    /// The newest version.
    pub fn newest(&self) -> Option<i64> {
        self.versions.keys().next_back().copied()
    }

    /// A sqlx [`Migrator`] over these migrations, for callers that want
    /// sqlx's own runner. The engine here drives [`sqlx::migrate::Migrate`]
    /// one migration at a time instead, to time each one and to undo a
    /// failed run.
    pub fn migrator(&self) -> Migrator {
        let mut all = Vec::new();
        for v in self.versions.values() {
            all.push(v.up.clone());
            if let Some(d) = &v.down {
                all.push(d.clone());
            }
        }
        Migrator::with_migrations(all)
    }
}
