//! Backups as the catalog records them: what an agent uploaded, where, and
//! what validating it found. The coordinator keeps the catalog in Raft
//! (an entry is committed only once its upload completed); agents hold the
//! object store's credentials and the encryption keys, which never appear
//! here.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::domain::ClusterRef;

/// The longest backup id (ids are `<app>-<yyyymmdd>-<hhmmss>-<region>-<cluster>-<suffix>`).
pub const MAX_BACKUP_ID_LEN: usize = 200;
/// Validation results kept per backup, newest last.
pub const MAX_VALIDATIONS: usize = 10;
/// Tables whose row counts a backup records (a sanity bound, not a limit on
/// what is backed up).
pub const MAX_RECORDED_TABLES: usize = 1000;

/// A stored backup object: enough to fetch exactly these bytes again and
/// check them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupObject {
    /// The object's key in the agent's bucket (prefix included).
    pub key: String,
    /// The version the upload created (versioned buckets), so a later
    /// overwrite of the key cannot change what this backup is.
    #[serde(default)]
    pub version_id: Option<String>,
    /// Bytes stored (compressed and sealed).
    pub size: u64,
    /// SHA-256 of the stored bytes, hex.
    pub sha256: String,
    /// Parts of the multipart upload.
    #[serde(default)]
    pub parts: u32,
    /// The id of the key that sealed it (the key itself stays with the agent).
    pub key_id: String,
    /// Bytes of the dump inside, before compression and sealing.
    pub dump_bytes: u64,
}

/// Why a backup was taken.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "by")]
pub enum BackupTrigger {
    /// `cutover backup create`.
    #[default]
    Manual,
    /// A schedule's slot (the slot's time, Unix ms).
    Schedule { slot_unix_ms: i64 },
    /// Before a migration ran.
    Migration,
    /// Before a restore replaced the primary's data.
    Safety,
}

impl BackupTrigger {
    pub fn as_str(&self) -> &'static str {
        match self {
            BackupTrigger::Manual => "manual",
            BackupTrigger::Schedule { .. } => "schedule",
            BackupTrigger::Migration => "migration",
            BackupTrigger::Safety => "safety",
        }
    }
}

/// What one validation of a backup found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Validation {
    pub operation_id: String,
    pub at_unix_ms: i64,
    pub passed: bool,
    /// `passed`, or what failed: `corrupt`, `truncated`, `wrong-key`,
    /// `restore-failed`, `check-failed`, `rows-differ`, `error`.
    pub verdict: String,
    pub message: String,
    pub duration_ms: u64,
}

/// One backup in the catalog.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupEntry {
    pub id: String,
    pub app: String,
    pub cluster: ClusterRef,
    /// The database's name on its server.
    pub database: String,
    /// The server it was taken from (`PostgreSQL 16.4`).
    pub engine: String,
    pub object: BackupObject,
    /// The newest migration applied when it was taken (0: none).
    pub migration_version: i64,
    /// Rows per table when it was taken (`schema.table`), which validation
    /// compares the restored copy against.
    #[serde(default)]
    pub table_rows: BTreeMap<String, i64>,
    pub started_at_unix_ms: i64,
    pub finished_at_unix_ms: i64,
    /// Who asked (an operator, or the schedule).
    pub requested_by: String,
    pub operation_id: String,
    #[serde(default)]
    pub trigger: BackupTrigger,
    /// Validations, oldest first (at most [`MAX_VALIDATIONS`]).
    #[serde(default)]
    pub validations: Vec<Validation>,
}

impl BackupEntry {
    /// The newest validation, if any.
    pub fn last_validation(&self) -> Option<&Validation> {
        self.validations.last()
    }

    /// True when the newest validation passed.
    pub fn validated(&self) -> bool {
        self.last_validation().is_some_and(|v| v.passed)
    }
}

/// What a backup operation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupAction {
    /// Dump, compress, seal and upload each target's database.
    Create,
    /// Download, check, restore into a scratch database, run the checks,
    /// drop it.
    Validate,
    /// Restore into a new scratch database, kept for the operator.
    Restore,
}

impl BackupAction {
    pub fn as_str(self) -> &'static str {
        match self {
            BackupAction::Create => "create",
            BackupAction::Validate => "validate",
            BackupAction::Restore => "restore",
        }
    }

    pub fn parse(s: &str) -> Option<BackupAction> {
        [BackupAction::Create, BackupAction::Validate, BackupAction::Restore]
            .into_iter()
            .find(|a| a.as_str() == s)
    }
}

/// The id a backup of `app` in `target` gets, from the operation that takes
/// it: readable, sortable by time within an app and cluster, and unique
/// (the operation id's first hex digits end it). Only lowercase letters,
/// digits and `-`, so it is safe in an object key and a file name.
pub fn backup_id(app: &str, target: &ClusterRef, operation_id: &str, at_unix_ms: i64) -> String {
    let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(at_unix_ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let suffix: String = operation_id
        .trim_start_matches("op-")
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(6)
        .collect::<String>()
        .to_ascii_lowercase();
    format!(
        "{app}-{:04}{:02}{:02}-{:02}{:02}{:02}-{}-{}-{suffix}",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        target.region,
        target.cluster,
    )
}

/// Checks a backup id given by a caller: what [`backup_id`] makes.
pub fn validate_backup_id(id: &str) -> Result<(), crate::Error> {
    let ok = !id.is_empty()
        && id.len() <= MAX_BACKUP_ID_LEN
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !id.starts_with('-')
        && !id.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(crate::Error::InvalidArgument(format!(
            "backup id {} is not a backup id (lowercase letters, digits and -, at most {MAX_BACKUP_ID_LEN})",
            crate::domain::quote(id)
        )))
    }
}

/// The object key (below the store's prefix) of backup `id`: the agent's
/// own part of a shared bucket (`<region>/<cluster>/`), then the app.
pub fn object_name(target: &ClusterRef, app: &str, id: &str) -> String {
    format!("{}/{}/{app}/{id}.cbk", target.region, target.cluster)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_readable_unique_and_safe() {
        let t = ClusterRef::new("us-east", "us-east-1").unwrap();
        // 2026-11-29 03:00:05 UTC.
        let id = backup_id("shop", &t, "op-3FA2c1d9e8", 1_795_921_205_000);
        assert_eq!(id, "shop-20261129-030005-us-east-us-east-1-3fa2c1");
        validate_backup_id(&id).unwrap();
        assert_eq!(object_name(&t, "shop", &id), format!("us-east/us-east-1/shop/{id}.cbk"));
        for bad in ["", "../x", "a/b", "UP", "-x", "x-", "a b", &"a".repeat(201)] {
            assert!(validate_backup_id(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn triggers_and_actions_round_trip() {
        for t in [
            BackupTrigger::Manual,
            BackupTrigger::Schedule { slot_unix_ms: 7 },
            BackupTrigger::Migration,
            BackupTrigger::Safety,
        ] {
            let json = serde_json::to_string(&t).unwrap();
            assert_eq!(serde_json::from_str::<BackupTrigger>(&json).unwrap(), t);
        }
        for a in [BackupAction::Create, BackupAction::Validate, BackupAction::Restore] {
            assert_eq!(BackupAction::parse(a.as_str()), Some(a));
        }
    }
}
