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
    /// Object Lock: the store refuses to delete it before this time.
    #[serde(default)]
    pub retain_until_unix_ms: Option<i64>,
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

    /// Until when Object Lock keeps it at `now_ms`, if it does.
    pub fn locked_until(&self, now_ms: i64) -> Option<i64> {
        self.object.retain_until_unix_ms.filter(|t| *t > now_ms)
    }
}

/// The newest of `backups` whose newest validation passed: the one
/// retention never deletes and a manual delete needs force for.
pub fn newest_validated<'a>(backups: impl IntoIterator<Item = &'a BackupEntry>) -> Option<&'a BackupEntry> {
    backups
        .into_iter()
        .filter(|b| b.validated())
        .max_by(|a, b| (a.finished_at_unix_ms, &a.id).cmp(&(b.finished_at_unix_ms, &b.id)))
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
    /// Replace the primary database's content with the backup's (the app
    /// is in maintenance meanwhile, and a safety backup was taken first).
    #[serde(rename = "restore-primary")]
    RestorePrimary,
    /// Delete backups' objects (retention).
    Delete,
}

impl BackupAction {
    pub fn as_str(self) -> &'static str {
        match self {
            BackupAction::Create => "create",
            BackupAction::Validate => "validate",
            BackupAction::Restore => "restore",
            BackupAction::RestorePrimary => "restore-primary",
            BackupAction::Delete => "delete",
        }
    }

    pub fn parse(s: &str) -> Option<BackupAction> {
        [
            BackupAction::Create,
            BackupAction::Validate,
            BackupAction::Restore,
            BackupAction::RestorePrimary,
            BackupAction::Delete,
        ]
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

/// How many backups a schedule keeps: the newest of each of the last
/// `daily` days, `weekly` ISO weeks and `monthly` months (grandfather,
/// father, son), counted back from now, in UTC. Whatever the policy, the
/// newest backup that passed validation and any backup under Object Lock
/// are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionPolicy {
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
}

/// The most periods of one kind a policy may name (ten years of days).
pub const MAX_RETENTION_PERIODS: u32 = 3660;

impl Default for RetentionPolicy {
    /// The seed's policy: 30 days.
    fn default() -> Self {
        RetentionPolicy {
            daily: 30,
            weekly: 0,
            monthly: 0,
        }
    }
}

impl RetentionPolicy {
    /// Parses `daily=30,weekly=8,monthly=12` (any of them; the others 0).
    pub fn parse(s: &str) -> Result<RetentionPolicy, crate::Error> {
        let bad = |why: String| crate::Error::InvalidArgument(format!("retention {}: {why}", crate::domain::quote(s)));
        let mut p = RetentionPolicy {
            daily: 0,
            weekly: 0,
            monthly: 0,
        };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("{part:?} is not period=count")))?;
            let n: u32 = v.trim().parse().map_err(|_| bad(format!("{v:?} is not a count")))?;
            if n > MAX_RETENTION_PERIODS {
                return Err(bad(format!("{n} is more than {MAX_RETENTION_PERIODS}")));
            }
            match k.trim() {
                "daily" => p.daily = n,
                "weekly" => p.weekly = n,
                "monthly" => p.monthly = n,
                other => return Err(bad(format!("unknown period {other:?} (daily, weekly, monthly)"))),
            }
        }
        if p.daily == 0 && p.weekly == 0 && p.monthly == 0 {
            return Err(bad(
                "it keeps nothing; name at least one of daily, weekly, monthly".into()
            ));
        }
        Ok(p)
    }
}

impl std::fmt::Display for RetentionPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "daily={},weekly={},monthly={}",
            self.daily, self.weekly, self.monthly
        )
    }
}

/// A backup schedule of one app, committed in Raft and run by the leader.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupSchedule {
    pub app: String,
    /// One region, or every region the app runs in.
    #[serde(default)]
    pub region: Option<String>,
    /// Five fields (minute hour day month weekday), or six with seconds
    /// first; UTC.
    pub cron: String,
    pub retention: RetentionPolicy,
    /// Validate each scheduled backup by restore right after taking it.
    #[serde(default)]
    pub validate: bool,
    pub updated_by: String,
    pub updated_at_unix_ms: i64,
    /// The newest slot started (Unix ms). A slot at or before it never
    /// starts again: this is what makes each slot run exactly once across
    /// leader changes.
    pub last_slot_unix_ms: i64,
}

/// Parses a cron expression (5 fields, or 6 with seconds first), UTC.
pub fn parse_cron(expr: &str) -> Result<croner::Cron, crate::Error> {
    if expr.len() > 200 {
        return Err(crate::Error::InvalidArgument(
            "cron expression longer than 200 characters".into(),
        ));
    }
    croner::Cron::new(expr)
        .with_seconds_optional()
        .parse()
        .map_err(|e| crate::Error::InvalidArgument(format!("cron {}: {e}", crate::domain::quote(expr))))
}

fn utc(ms: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// Unix ms as RFC 3339 UTC, to the second, for messages.
pub fn format_unix_ms(ms: i64) -> String {
    utc(ms).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The first slot of `cron` strictly after `after_ms`.
pub fn next_slot(cron: &croner::Cron, after_ms: i64) -> Option<i64> {
    cron.find_next_occurrence(&utc(after_ms), false)
        .ok()
        .map(|t| t.timestamp_millis())
}

/// The slot due now: the newest slot after `last_slot_ms` and at or before
/// `now_ms`. Older missed slots (a cluster down for days) are not run one
/// by one: the newest stands for them.
pub fn due_slot(cron: &croner::Cron, last_slot_ms: i64, now_ms: i64) -> Option<i64> {
    let mut due = None;
    let mut at = last_slot_ms;
    // Bounded: a schedule every second, a day behind.
    for _ in 0..100_000 {
        match next_slot(cron, at) {
            Some(s) if s <= now_ms => {
                due = Some(s);
                at = s;
            }
            _ => break,
        }
    }
    due
}

/// The backups of one app in one cluster that `policy` no longer keeps at
/// `now_ms`, oldest first. Kept whatever the policy: the newest backup
/// whose newest validation passed, and every backup under Object Lock.
pub fn expired<'a>(
    backups: impl IntoIterator<Item = &'a BackupEntry>,
    policy: &RetentionPolicy,
    now_ms: i64,
) -> Vec<&'a BackupEntry> {
    use chrono::Datelike;
    use std::collections::BTreeSet;
    let mut all: Vec<&BackupEntry> = backups.into_iter().collect();
    // Newest first.
    all.sort_by(|a, b| (b.finished_at_unix_ms, &b.id).cmp(&(a.finished_at_unix_ms, &a.id)));
    let now = utc(now_ms);
    let day = |t: chrono::DateTime<chrono::Utc>| t.date_naive().num_days_from_ce() as i64;
    let week = |t: chrono::DateTime<chrono::Utc>| {
        // ISO weeks start on Monday; day 1 of the common era was a Monday.
        (day(t) - 1).div_euclid(7)
    };
    let month = |t: chrono::DateTime<chrono::Utc>| t.year() as i64 * 12 + t.month0() as i64;
    let mut keep: BTreeSet<&str> = BTreeSet::new();
    for (period, count) in [
        (&day as &dyn Fn(chrono::DateTime<chrono::Utc>) -> i64, policy.daily),
        (&week, policy.weekly),
        (&month, policy.monthly),
    ] {
        let current = period(now);
        let mut seen = BTreeSet::new();
        for b in &all {
            let p = period(utc(b.finished_at_unix_ms));
            if current - p < i64::from(count) && p <= current && seen.insert(p) {
                keep.insert(b.id.as_str());
            }
        }
    }
    if let Some(v) = newest_validated(all.iter().copied()) {
        keep.insert(v.id.as_str());
    }
    let mut out: Vec<&BackupEntry> = all
        .into_iter()
        .filter(|b| !keep.contains(b.id.as_str()))
        .filter(|b| b.locked_until(now_ms).is_none())
        .collect();
    out.reverse();
    out
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
        for a in [
            BackupAction::Create,
            BackupAction::Validate,
            BackupAction::Restore,
            BackupAction::RestorePrimary,
            BackupAction::Delete,
        ] {
            assert_eq!(BackupAction::parse(a.as_str()), Some(a));
        }
    }

    #[test]
    fn retention_policies_parse_and_refuse_nonsense() {
        let p = RetentionPolicy::parse("daily=30,weekly=8,monthly=12").unwrap();
        assert_eq!((p.daily, p.weekly, p.monthly), (30, 8, 12));
        assert_eq!(RetentionPolicy::parse(&p.to_string()).unwrap(), p);
        assert_eq!(RetentionPolicy::parse("weekly=4").unwrap().daily, 0);
        for bad in ["", "daily=0", "hourly=3", "daily=x", "daily", "daily=99999"] {
            assert!(RetentionPolicy::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn slots_are_found_after_the_last_one() {
        let cron = parse_cron("0 3 * * *").unwrap();
        // 2026-11-29 03:00:05 UTC.
        let t = 1_795_921_205_000;
        let slot = 1_795_921_200_000;
        assert_eq!(next_slot(&cron, slot - 1), Some(slot));
        assert_eq!(next_slot(&cron, slot), Some(slot + 86_400_000));
        assert_eq!(due_slot(&cron, slot - 1, t), Some(slot));
        assert_eq!(due_slot(&cron, slot, t), None, "a slot runs once");
        // Three days behind: only the newest slot runs.
        assert_eq!(due_slot(&cron, slot - 3 * 86_400_000, t), Some(slot));
        assert!(parse_cron("0 3 * *").is_err());
        assert!(parse_cron("*/10 * * * * *").is_ok(), "seconds are allowed");
    }
}
