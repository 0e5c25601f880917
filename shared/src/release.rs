//! Releases and the migrations they carry.
//!
//! A release is an app's image plus the database migrations that image
//! expects, uploaded once (`cutover release create`) and kept in the
//! coordinator's replicated state. This module parses and validates a
//! migration bundle; the coordinator checks uploads with it (so a bad bundle
//! is refused at upload, naming the file) and the agent builds its sqlx
//! migrator from the same parse, so the two can never disagree about what a
//! file name means.
//!
//! File names follow the sqlx CLI: `<version>_<name>.up.sql` with its
//! `<version>_<name>.down.sql` (reversible), or `<version>_<name>.sql`
//! (irreversible, up only). Parsing is stricter than sqlx's own, which
//! silently skips a file it cannot parse: here every file must be a
//! migration.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Largest accepted bundle (the sum of its SQL files). Releases live in the
/// replicated state and travel in task parameters, so they stay small.
pub const MAX_BUNDLE_BYTES: u64 = 1024 * 1024;
/// Most files in one bundle.
pub const MAX_BUNDLE_FILES: usize = 2000;
/// Longest accepted migration file name.
pub const MAX_FILE_NAME: usize = 255;

/// Why a bundle was refused. Each names the offending file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("migration file {file:?}: {reason}")]
    BadFile { file: String, reason: String },
    #[error("migration version {version} is defined twice: {first:?} and {second:?}")]
    DuplicateVersion {
        version: i64,
        first: String,
        second: String,
    },
    #[error(
        "migration {file:?} has no down migration ({expected:?}) while other migrations have theirs; \
         name an intentionally irreversible migration <version>_<name>.sql"
    )]
    MissingDown { file: String, expected: String },
    #[error("down migration {file:?} has no up migration")]
    OrphanDown { file: String },
    #[error("the migrations are {bytes} bytes, over the limit of {limit} bytes (largest file: {largest:?})")]
    TooLarge { bytes: u64, limit: u64, largest: String },
    #[error("a release carries at most {0} migration files")]
    TooManyFiles(usize),
}

/// What a migration file is, by its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileKind {
    /// `<version>_<name>.up.sql`
    Up,
    /// `<version>_<name>.down.sql`
    Down,
    /// `<version>_<name>.sql`: irreversible.
    Simple,
}

/// A parsed file name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileName {
    pub version: i64,
    pub name: String,
    pub kind: FileKind,
}

fn bad(file: &str, reason: impl Into<String>) -> BundleError {
    BundleError::BadFile {
        file: file.to_owned(),
        reason: reason.into(),
    }
}

/// Parses a migration file name, refusing anything but sqlx's layout (and
/// anything that could be a path).
pub fn parse_file_name(file: &str) -> Result<FileName, BundleError> {
    if file.contains('/') || file.contains('\\') {
        return Err(bad(file, "a migration file name must not contain a path separator"));
    }
    if file.contains("..") {
        return Err(bad(file, "a migration file name must not contain `..`"));
    }
    if file.len() > MAX_FILE_NAME {
        return Err(bad(file, format!("file names are limited to {MAX_FILE_NAME} bytes")));
    }
    let expected = "expected <version>_<name>.up.sql, <version>_<name>.down.sql or <version>_<name>.sql";
    let (stem, kind) = if let Some(s) = file.strip_suffix(".up.sql") {
        (s, FileKind::Up)
    } else if let Some(s) = file.strip_suffix(".down.sql") {
        (s, FileKind::Down)
    } else if let Some(s) = file.strip_suffix(".sql") {
        (s, FileKind::Simple)
    } else {
        return Err(bad(file, expected));
    };
    let Some((version, name)) = stem.split_once('_') else {
        return Err(bad(file, expected));
    };
    if version.is_empty() || !version.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad(
            file,
            format!("the version {version:?} is not a number; {expected}"),
        ));
    }
    let version: i64 = version
        .parse()
        .map_err(|_| bad(file, format!("the version {version:?} is too large")))?;
    if version == 0 {
        // 0 is the target that means "revert everything".
        return Err(bad(file, "versions start at 1"));
    }
    if name.is_empty() {
        return Err(bad(file, format!("the name after the version is empty; {expected}")));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(bad(
            file,
            format!("{c:?} in the name; names use letters, digits, `_` and `-`"),
        ));
    }
    Ok(FileName {
        version,
        name: name.to_owned(),
        kind,
    })
}

/// One version of a bundle: its up migration and, if reversible, its down.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleMigration {
    pub version: i64,
    /// The name part of the file name (`add_orders`).
    pub name: String,
    pub up_file: String,
    pub up_sql: String,
    pub down_file: Option<String>,
    pub down_sql: Option<String>,
}

impl BundleMigration {
    /// An `.up.sql` (with its down), as opposed to a plain `.sql`.
    pub fn is_simple(&self) -> bool {
        !self.up_file.ends_with(".up.sql")
    }
}

/// A validated set of migrations, by version.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundle {
    pub migrations: Vec<BundleMigration>,
}

impl Bundle {
    /// Parses and validates `(file name, content)` pairs: every file must be
    /// a migration, versions unique, downs paired with ups, the whole within
    /// [`MAX_BUNDLE_BYTES`]. Refusals name the file.
    pub fn parse(files: Vec<(String, Vec<u8>)>) -> Result<Bundle, BundleError> {
        if files.len() > MAX_BUNDLE_FILES {
            return Err(BundleError::TooManyFiles(MAX_BUNDLE_FILES));
        }
        let total: u64 = files.iter().map(|(_, b)| b.len() as u64).sum();
        if total > MAX_BUNDLE_BYTES {
            let largest = files
                .iter()
                .max_by_key(|(_, b)| b.len())
                .map(|(f, _)| f.clone())
                .unwrap_or_default();
            return Err(BundleError::TooLarge {
                bytes: total,
                limit: MAX_BUNDLE_BYTES,
                largest,
            });
        }
        struct Half {
            file: String,
            name: String,
            kind: FileKind,
            sql: String,
        }
        let mut ups: BTreeMap<i64, Half> = BTreeMap::new();
        let mut downs: BTreeMap<i64, Half> = BTreeMap::new();
        for (file, bytes) in files {
            let parsed = parse_file_name(&file)?;
            let sql = String::from_utf8(bytes).map_err(|e| {
                bad(
                    &file,
                    format!("the SQL is not valid UTF-8 (byte {})", e.utf8_error().valid_up_to()),
                )
            })?;
            let slot = if parsed.kind == FileKind::Down {
                &mut downs
            } else {
                &mut ups
            };
            if let Some(first) = slot.get(&parsed.version) {
                return Err(BundleError::DuplicateVersion {
                    version: parsed.version,
                    first: first.file.clone(),
                    second: file,
                });
            }
            slot.insert(
                parsed.version,
                Half {
                    file,
                    name: parsed.name,
                    kind: parsed.kind,
                    sql,
                },
            );
        }
        for (version, down) in &downs {
            match ups.get(version) {
                None => {
                    return Err(BundleError::OrphanDown {
                        file: down.file.clone(),
                    });
                }
                Some(up) if up.kind == FileKind::Simple => {
                    return Err(bad(
                        &up.file,
                        format!(
                            "is an irreversible migration (plain .sql) but {} is its down; name it .up.sql",
                            down.file
                        ),
                    ));
                }
                Some(up) if up.name != down.name => {
                    return Err(bad(
                        &down.file,
                        format!("does not have the name of its up migration {}", up.file),
                    ));
                }
                Some(_) => {}
            }
        }
        // An `.up.sql` promises a `.down.sql`. Once any migration has one, a
        // missing down is a forgotten file, not a decision; a decision is
        // spelled as a plain `.sql`.
        if !downs.is_empty()
            && let Some(up) = ups
                .iter()
                .find(|(v, u)| u.kind == FileKind::Up && !downs.contains_key(v))
                .map(|(_, u)| u)
        {
            return Err(BundleError::MissingDown {
                file: up.file.clone(),
                expected: up.file.replace(".up.sql", ".down.sql"),
            });
        }
        let migrations = ups
            .into_iter()
            .map(|(version, up)| {
                let down = downs.remove(&version);
                BundleMigration {
                    version,
                    name: up.name,
                    up_file: up.file,
                    up_sql: up.sql,
                    down_file: down.as_ref().map(|d| d.file.clone()),
                    down_sql: down.map(|d| d.sql),
                }
            })
            .collect();
        Ok(Bundle { migrations })
    }

    /// The files again, as `(name, SQL)`, by version.
    pub fn files(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for m in &self.migrations {
            out.push((m.up_file.clone(), m.up_sql.clone()));
            if let (Some(f), Some(sql)) = (&m.down_file, &m.down_sql) {
                out.push((f.clone(), sql.clone()));
            }
        }
        out
    }

    /// Bytes of SQL in the bundle.
    pub fn total_bytes(&self) -> u64 {
        self.files().iter().map(|(_, s)| s.len() as u64).sum()
    }

    /// The newest version, if any.
    pub fn newest(&self) -> Option<i64> {
        self.migrations.last().map(|m| m.version)
    }

    /// True when every migration has a down (so a rollback can undo them).
    pub fn reversible(&self) -> bool {
        self.migrations.iter().all(|m| m.down_sql.is_some())
    }

    /// The bundle's content address: SHA-256 over each file's name and
    /// content, in version order.
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        for (name, sql) in self.files() {
            h.update((name.len() as u64).to_be_bytes());
            h.update(name.as_bytes());
            h.update((sql.len() as u64).to_be_bytes());
            h.update(sql.as_bytes());
        }
        hex(&h.finalize())
    }
}

/// SHA-256 of `bytes`, in lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Bytes in lowercase hex (digests, serials).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A release as the coordinator records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub app: String,
    pub image: String,
    /// [`Bundle::digest`] of its migrations; the bundle itself is stored
    /// once per digest.
    pub digest: String,
    /// Each file's name, size and SHA-256.
    pub files: Vec<ReleaseFile>,
    pub newest_version: Option<i64>,
    pub reversible: bool,
    pub created_by: String,
    pub created_at_unix_ms: i64,
}

/// One migration file of a release.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseFile {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

impl Release {
    /// The record of `bundle` as `image`'s release of `app`.
    pub fn new(app: &str, image: &str, bundle: &Bundle, created_by: &str, at_unix_ms: i64) -> Release {
        Release {
            app: app.to_owned(),
            image: image.to_owned(),
            digest: bundle.digest(),
            files: bundle
                .files()
                .into_iter()
                .map(|(name, sql)| ReleaseFile {
                    bytes: sql.len() as u64,
                    sha256: sha256_hex(sql.as_bytes()),
                    name,
                })
                .collect(),
            newest_version: bundle.newest(),
            reversible: bundle.reversible(),
            created_by: created_by.to_owned(),
            created_at_unix_ms: at_unix_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(list: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        list.iter()
            .map(|(n, s)| (n.to_string(), s.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn a_good_bundle_parses_and_round_trips() {
        let b = Bundle::parse(files(&[
            ("1_users.up.sql", "create table users (id int);"),
            ("1_users.down.sql", "drop table users;"),
            ("2_orders.up.sql", "create table orders (id int);"),
            ("2_orders.down.sql", "drop table orders;"),
        ]))
        .unwrap();
        assert_eq!(b.newest(), Some(2));
        assert!(b.reversible());
        let again = Bundle::parse(files(
            &b.files()
                .iter()
                .map(|(n, s)| (n.as_str(), s.as_str()))
                .collect::<Vec<_>>(),
        ))
        .unwrap();
        assert_eq!(again.digest(), b.digest());
        let simple = Bundle::parse(files(&[("1_seed.sql", "select 1;")])).unwrap();
        assert!(!simple.reversible());
    }

    #[test]
    fn bad_bundles_name_the_file() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("users.sql", "")], "\"users.sql\""),
            (&[("1_users.up.sql", ""), ("1_other.sql", "")], "\"1_other.sql\""),
            (
                &[("1_a.up.sql", ""), ("1_a.down.sql", ""), ("2_b.up.sql", "")],
                "\"2_b.up.sql\"",
            ),
            (&[("../1_a.sql", "")], "\"../1_a.sql\""),
            (&[("2_b.down.sql", "")], "\"2_b.down.sql\""),
        ];
        for (list, named) in cases {
            let e = Bundle::parse(files(list)).unwrap_err().to_string();
            assert!(e.contains(named), "{e} should name {named}");
        }
        let big = "x".repeat(MAX_BUNDLE_BYTES as usize + 1);
        let e = Bundle::parse(vec![("1_big.sql".into(), big.into_bytes())]).unwrap_err();
        assert!(
            matches!(e, BundleError::TooLarge { ref largest, .. } if largest == "1_big.sql"),
            "{e}"
        );
    }
}
