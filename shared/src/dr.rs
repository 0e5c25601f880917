//! Disaster recovery: what agents observe about an app's databases
//! (replication role, WAL position, lag), an app's DR settings, and the
//! failover runbook (`plan`), a pure function of the replicated state and a
//! clock reading, so `cutover dr plan` and the failover itself can never
//! disagree about what would happen.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::app::AppSpec;
use crate::backup::BackupEntry;
use crate::config::DbDriver;
use crate::domain::ClusterRef;

/// A database's replication role.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DbRole {
    /// Accepts writes.
    #[default]
    Primary,
    /// Replays a primary's WAL (streaming replication), read-only.
    Standby,
}

impl DbRole {
    pub fn as_str(self) -> &'static str {
        match self {
            DbRole::Primary => "primary",
            DbRole::Standby => "standby",
        }
    }
}

impl std::fmt::Display for DbRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Most regions one region-health report may name.
pub const MAX_REPORTED_REGIONS: usize = 32;

/// One region of an app as a traffic agent probes it from outside.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionHealth {
    pub region: String,
    pub healthy: bool,
    /// What the failing probe saw; `None` when healthy.
    #[serde(default)]
    pub detail: Option<String>,
}

/// A region's health as the state keeps it: who probed it and since when
/// (the leader's clock at the report that changed it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionHealthView {
    pub healthy: bool,
    #[serde(default)]
    pub detail: Option<String>,
    /// The reporting agent's cluster (`region/cluster`).
    pub by: String,
    pub since_unix_ms: i64,
}

/// One app's database in one cluster, as its agent observed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatabaseStatus {
    pub app: String,
    pub driver: DbDriver,
    /// What the agent's config says it is.
    pub configured_role: DbRole,
    /// What the server says it is now; `None` when it could not be asked.
    pub role: Option<DbRole>,
    /// The `region/cluster` whose primary a standby follows (config).
    #[serde(default)]
    pub follows: Option<String>,
    /// A primary's current WAL write position, a standby's replayed one.
    #[serde(default)]
    pub lsn: Option<u64>,
    /// A standby's received position.
    #[serde(default)]
    pub receive_lsn: Option<u64>,
    /// A standby's replay delay: 0 when it replayed all it received, else
    /// the age of the last transaction it replayed.
    #[serde(default)]
    pub lag_ms: Option<u64>,
    /// Why the server could not be asked (credentials redacted).
    #[serde(default)]
    pub error: Option<String>,
    /// When the leader received the report, by its own clock: the
    /// coordinator replaces the agent's reading, so an agent's clock never
    /// meets a leader-stamped time in a comparison.
    pub observed_at_unix_ms: i64,
    /// A primary that refuses writes: one a failover fenced.
    #[serde(default)]
    pub fenced: bool,
    /// A standby's WAL receiver streams from its primary (its region
    /// reaches the primary's server); `None` for a primary.
    #[serde(default)]
    pub streaming: Option<bool>,
    /// Since when the server has been reported unreachable without a
    /// break. Set by the state machine from consecutive reports (what an
    /// agent sends is ignored), so every node agrees.
    #[serde(default)]
    pub unreachable_since_unix_ms: Option<i64>,
    /// The Raft term of the entry that set `unreachable_since_unix_ms`
    /// (see `AgentRecord::since_term`).
    #[serde(default)]
    pub unreachable_since_term: u64,
    /// How long before sending the report its agent began the observation
    /// (its own clock, a duration): `lag_ms` is as of
    /// `observed_at_unix_ms - observed_age_ms`, which the data-loss window
    /// counts from (the arrival alone would understate it by the
    /// observation's time and the report's wait). At most
    /// [`MAX_OBSERVED_AGE_MS`].
    #[serde(default)]
    pub observed_age_ms: u64,
    /// The agent registration (session) whose stream carried the report,
    /// set by the leader on arrival (what an agent sends is ignored; 0 in
    /// reports applied before it was recorded): whether a report was made
    /// since the agent last came back is a comparison of sessions, not of
    /// times two leaders' clocks stamped.
    #[serde(default)]
    pub session: u64,
}

/// The oldest observation a report may carry.
pub const MAX_OBSERVED_AGE_MS: u64 = 3_600_000;

/// An app's primary epoch: bumped (committed) by every failover before it
/// acts, so agents can refuse work from a superseded decision.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrEpoch {
    pub epoch: u64,
    /// The cluster the last successful failover made primary (`None`
    /// before the first, or while the epoch's failover has not succeeded).
    pub primary: Option<ClusterRef>,
    /// The failover that committed this epoch.
    pub operation_id: String,
    pub at_unix_ms: i64,
}

/// Drill reports kept per app, newest last.
pub const MAX_DRILLS: usize = 100;

/// What one drill measured, kept in the replicated state (bounded by
/// [`MAX_DRILLS`] per app).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillReport {
    pub operation_id: String,
    pub app: String,
    /// Where the scratch copy ran.
    pub cluster: ClusterRef,
    pub passed: bool,
    /// `passed`, or the phase that failed: `clone`, `checks`, `serve`,
    /// `gates`, or `error`.
    pub verdict: String,
    pub message: String,
    /// `standby` (a copy of the region's streaming standby).
    pub source: String,
    pub started_at_unix_ms: i64,
    pub finished_at_unix_ms: i64,
    /// From the drill's start to a serving copy whose gates passed.
    pub rto_ms: Option<u64>,
    /// How old the newest data in the copy was when it was taken.
    pub rpo_ms: Option<u64>,
    /// Duration of each phase, ms: `clone`, `checks`, `serve`, `gates`,
    /// `teardown`.
    #[serde(default)]
    pub phase_ms: BTreeMap<String, u64>,
    /// The release the scratch color ran.
    pub image: String,
    pub requested_by: String,
}

/// An app's drill schedule (one per app): a drill at every slot of `cron`,
/// into `region` or wherever a failover would go at that moment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillSchedule {
    pub app: String,
    /// The region to drill into; `None`: the failover plan's target at
    /// each slot.
    #[serde(default)]
    pub region: Option<String>,
    /// Five fields (minute hour day month weekday), or six with seconds
    /// first; UTC.
    pub cron: String,
    pub updated_by: String,
    pub updated_at_unix_ms: i64,
    /// The newest slot started (Unix ms); a slot at or before it never
    /// starts again, whichever leader proposes it.
    pub last_slot_unix_ms: i64,
}

/// Parses PostgreSQL's textual LSN (`16/B374D848`).
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    (hi <= u64::from(u32::MAX) && lo <= u64::from(u32::MAX)).then_some((hi << 32) | lo)
}

/// Formats an LSN as PostgreSQL does.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// An app's disaster-recovery settings (`[dr]` in the app file).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrSettings {
    /// The largest data-loss window (a standby's lag, or the age of the
    /// newest validated backup) a failover accepts without
    /// `--accept-data-loss`, seconds. Default 30.
    #[serde(default = "default_max_data_loss_secs")]
    pub max_data_loss_secs: u64,
    /// Fail over automatically when the primary region is lost (its agent
    /// down for `failover_after_secs`, the standby within
    /// `max_data_loss_secs`). Default off.
    #[serde(default)]
    pub automatic: bool,
    /// How long the primary region must be down before an automatic
    /// failover, seconds. Default 30.
    #[serde(default = "default_failover_after_secs")]
    pub failover_after_secs: u64,
    /// The least time between two automatic failovers, seconds. Default 3600.
    #[serde(default = "default_cooldown_secs")]
    pub cooldown_secs: u64,
}

fn default_max_data_loss_secs() -> u64 {
    30
}
fn default_failover_after_secs() -> u64 {
    30
}
fn default_cooldown_secs() -> u64 {
    3600
}

impl Default for DrSettings {
    fn default() -> Self {
        DrSettings {
            max_data_loss_secs: default_max_data_loss_secs(),
            automatic: false,
            failover_after_secs: default_failover_after_secs(),
            cooldown_secs: default_cooldown_secs(),
        }
    }
}

impl DrSettings {
    /// Whether every setting is its default (such an app file leaves `[dr]`
    /// out, and so does its digest).
    pub fn is_default(&self) -> bool {
        *self == DrSettings::default()
    }

    /// Checks the settings, naming the field.
    pub fn validate(&self) -> Result<(), crate::Error> {
        let bad = |f: &str, why: &str| Err(crate::Error::InvalidArgument(format!("dr.{f}: {why}")));
        // A day of accepted loss is a restore from backup, not a failover
        // setting anyone means; refusing it catches a value in ms.
        if self.max_data_loss_secs > 86_400 {
            return bad("max_data_loss_secs", "at most 86400 (one day)");
        }
        if !(1..=86_400).contains(&self.failover_after_secs) {
            return bad("failover_after_secs", "between 1 and 86400");
        }
        if self.cooldown_secs > 30 * 86_400 {
            return bad("cooldown_secs", "at most 2592000 (30 days)");
        }
        Ok(())
    }
}

/// One cluster of an app as the DR view sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterView {
    pub cluster: ClusterRef,
    pub agent_up: bool,
    /// The app's database there, as last reported.
    pub database: Option<DatabaseStatus>,
    /// When the cluster was lost: for an agent marked down, its last
    /// database report (the last sign of the region); for a database its
    /// agent cannot reach, the first report that said so. `None` while it
    /// is there.
    pub lost_at_unix_ms: Option<i64>,
}

/// Where the new primary's data comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum DataSource {
    /// Promote the streaming standby.
    Standby { lag_ms: Option<u64> },
    /// Restore the newest validated backup.
    Backup { id: String, taken_at_unix_ms: i64 },
}

/// A step of the runbook.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PlanStep {
    pub name: &'static str,
    pub description: String,
    /// From the last drill; `None` until one measured it.
    pub expected_ms: Option<u64>,
}

/// What stops a failover from starting now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Blocker {
    pub reason: String,
    /// The failover flag that proceeds anyway, if any.
    pub overridden_by: Option<&'static str>,
}

/// The failover runbook for an app, computed from the live state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FailoverPlan {
    pub app: String,
    pub from: Option<ClusterRef>,
    pub to: Option<ClusterRef>,
    pub source: Option<DataSource>,
    /// At most this much committed data would be lost now.
    pub data_loss_window_ms: Option<u64>,
    /// WAL the standby is known not to have replayed: the primary's last
    /// reported position minus the standby's (a lower bound when the
    /// primary stopped reporting).
    pub wal_behind_bytes: Option<u64>,
    pub max_data_loss_ms: u64,
    pub steps: Vec<PlanStep>,
    pub blockers: Vec<Blocker>,
}

/// Why no plan can be made at all (the caller asked for something that
/// does not exist): the API's INVALID_ARGUMENT.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("app {app} does not run in region {region}")]
    UnknownRegion { app: String, region: String },
    #[error("{0} holds the primary already: fail over to another region")]
    AlreadyPrimary(ClusterRef),
}

/// What `plan` reads, all of it from the replicated state.
pub struct PlanInput<'a> {
    pub app: &'a AppSpec,
    pub clusters: Vec<ClusterView>,
    /// The app's backups (any cluster).
    pub backups: Vec<&'a BackupEntry>,
    /// An unfinished operation on the app, if any.
    pub running_operation: Option<String>,
    /// The region asked for, if any.
    pub to: Option<&'a str>,
    pub now_unix_ms: i64,
    /// The app's drill reports, oldest first: the newest that passed in
    /// the target gives the steps' expected durations.
    pub drills: &'a [DrillReport],
}

/// The current primary: the cluster whose database last said it is one,
/// else the one configured as one. Two that say so are returned both: the
/// caller reports split brain.
pub fn primaries(clusters: &[ClusterView]) -> Vec<&ClusterView> {
    let observed: Vec<&ClusterView> = clusters
        .iter()
        .filter(|c| {
            c.database
                .as_ref()
                .is_some_and(|d| d.role == Some(DbRole::Primary) && !d.fenced)
        })
        .collect();
    if !observed.is_empty() {
        return observed;
    }
    clusters
        .iter()
        .filter(|c| {
            c.database
                .as_ref()
                .is_some_and(|d| d.role.is_none() && d.configured_role == DbRole::Primary)
        })
        .take(1)
        .collect()
}

/// Computes the runbook. Refuses only a request that names something
/// impossible; everything else that stands in the way is a `Blocker`.
pub fn plan(input: &PlanInput<'_>) -> Result<FailoverPlan, PlanError> {
    let app = &input.app.name;
    let max_data_loss_ms = input.app.dr.max_data_loss_secs.saturating_mul(1000);
    let mut blockers = Vec::new();
    let block = |blockers: &mut Vec<Blocker>, reason: String, by: Option<&'static str>| {
        blockers.push(Blocker {
            reason,
            overridden_by: by,
        })
    };

    let primaries = primaries(&input.clusters);
    if primaries.len() > 1 {
        let names: Vec<String> = primaries.iter().map(|c| c.cluster.to_string()).collect();
        block(
            &mut blockers,
            format!("more than one primary reports itself: {}", names.join(", ")),
            None,
        );
    }
    let from = primaries.first().map(|c| (*c).clone());

    let candidates: Vec<&ClusterView> = match input.to {
        Some(region) => {
            let v: Vec<&ClusterView> = input.clusters.iter().filter(|c| c.cluster.region == region).collect();
            if v.is_empty() {
                return Err(PlanError::UnknownRegion {
                    app: app.clone(),
                    region: region.to_owned(),
                });
            }
            if let Some(f) = &from
                && v.iter().all(|c| c.cluster == f.cluster)
            {
                return Err(PlanError::AlreadyPrimary(f.cluster.clone()));
            }
            v
        }
        None => input.clusters.iter().collect(),
    };
    let from_cluster = from.as_ref().map(|f| f.cluster.clone());
    let candidates: Vec<&ClusterView> = candidates
        .into_iter()
        .filter(|c| from_cluster.as_ref() != Some(&c.cluster))
        .collect();

    // Prefer a reachable standby with the least lag; then any standby;
    // then a cluster with a database to restore into.
    let standby = |c: &ClusterView| {
        c.database.as_ref().is_some_and(|d| {
            d.role == Some(DbRole::Standby) || (d.role.is_none() && d.configured_role == DbRole::Standby)
        })
    };
    let lag = |c: &ClusterView| c.database.as_ref().and_then(|d| d.lag_ms).unwrap_or(u64::MAX);
    let target = candidates
        .iter()
        .filter(|c| standby(c))
        .min_by_key(|c| (!c.agent_up, lag(c), c.cluster.clone()))
        .or_else(|| {
            candidates
                .iter()
                .filter(|c| c.database.is_some())
                .min_by_key(|c| (!c.agent_up, c.cluster.clone()))
        })
        .or_else(|| candidates.iter().min_by_key(|c| (!c.agent_up, c.cluster.clone())))
        .copied();

    let newest_backup = crate::backup::newest_validated(input.backups.iter().copied());
    let (source, window) = match target {
        Some(t) if standby(t) => {
            let lag_ms = t.database.as_ref().and_then(|d| d.lag_ms);
            (Some(DataSource::Standby { lag_ms }), window_at_loss(t, from.as_ref()))
        }
        Some(t) if t.database.is_some() => match newest_backup {
            Some(b) => (
                Some(DataSource::Backup {
                    id: b.id.clone(),
                    taken_at_unix_ms: b.started_at_unix_ms,
                }),
                Some(u64::try_from(input.now_unix_ms.saturating_sub(b.started_at_unix_ms)).unwrap_or(0)),
            ),
            None => (None, None),
        },
        _ => (None, None),
    };

    match target {
        None => block(
            &mut blockers,
            format!("{app} runs in no other cluster to fail over to"),
            None,
        ),
        Some(t) => {
            if !t.agent_up {
                block(&mut blockers, format!("the agent for {} is down", t.cluster), None);
            }
            match &t.database {
                None => block(
                    &mut blockers,
                    format!(
                        "the agent for {} has no database for {app} (add a [[databases]] entry with role = \"standby\")",
                        t.cluster
                    ),
                    None,
                ),
                Some(d) => {
                    if let Some(e) = &d.error {
                        block(
                            &mut blockers,
                            format!("the database in {} cannot be reached: {e}", t.cluster),
                            None,
                        );
                    }
                    if source.is_none() {
                        block(
                            &mut blockers,
                            format!(
                                "{} has no standby and {app} has no validated backup to restore",
                                t.cluster
                            ),
                            None,
                        );
                    }
                }
            }
        }
    }
    match window {
        Some(w) if w > max_data_loss_ms => block(
            &mut blockers,
            format!(
                "the data-loss window ({}) is over the app's max_data_loss ({})",
                human_ms(w),
                human_ms(max_data_loss_ms)
            ),
            Some("--accept-data-loss"),
        ),
        None if matches!(source, Some(DataSource::Standby { .. })) => block(
            &mut blockers,
            "the standby's lag is unknown".into(),
            Some("--accept-data-loss"),
        ),
        _ => {}
    }
    match &from {
        None => block(
            &mut blockers,
            format!("no database of {app} has reported as primary"),
            Some("--force"),
        ),
        Some(f) if !f.agent_up => block(
            &mut blockers,
            format!(
                "the agent for the primary {} is down: it cannot be fenced, only superseded",
                f.cluster
            ),
            Some("--force"),
        ),
        Some(_) => {}
    }
    if let Some(op) = &input.running_operation {
        block(&mut blockers, format!("operation {op} is running on {app}"), None);
    }

    let wal_behind_bytes = match (&source, &from, target) {
        (Some(DataSource::Standby { .. }), Some(f), Some(t)) => {
            let lsn = |c: &ClusterView| c.database.as_ref().and_then(|d| d.lsn);
            lsn(f).zip(lsn(t)).map(|(p, s)| p.saturating_sub(s))
        }
        _ => None,
    };
    let mut steps = steps(
        app,
        from.as_ref().map(|f| &f.cluster),
        target.map(|t| &t.cluster),
        source.as_ref(),
    );
    // What the last drill into the target measured: starting the release
    // and passing its gates there is what `repoint` does, the gates alone
    // what `verify` does, copying the data what `restore` does.
    if let Some(d) = target.and_then(|t| input.drills.iter().rev().find(|d| d.passed && d.cluster == t.cluster)) {
        let phase = |p: &str| d.phase_ms.get(p).copied();
        for s in &mut steps {
            s.expected_ms = match s.name {
                "repoint" => phase("serve").zip(phase("gates")).map(|(a, b)| a + b),
                "verify" => phase("gates"),
                "restore" if d.source == "backup" => phase("clone"),
                _ => None,
            };
        }
    }
    Ok(FailoverPlan {
        app: app.clone(),
        from: from.map(|f| f.cluster),
        to: target.map(|t| t.cluster.clone()),
        source,
        data_loss_window_ms: window,
        wal_behind_bytes,
        max_data_loss_ms,
        steps,
        blockers,
    })
}

/// The data a promotion of standby `t` would lose. With the primary there,
/// the standby's lag now. With the primary lost, its lag when the primary
/// was last seen: once the primary is gone the standby receives nothing,
/// so its lag (the age of the last transaction it replayed) grows by the
/// clock alone, and a window that grew that way would block every failover
/// that waits `failover_after_secs` past `max_data_loss_secs`. Like
/// Patroni's `maximum_lag_on_failover` against the leader's last known
/// position, it cannot see writes after the primary's last report (one
/// report interval at most).
fn window_at_loss(t: &ClusterView, from: Option<&ClusterView>) -> Option<u64> {
    let db = t.database.as_ref()?;
    let lag = db.lag_ms?;
    let Some(lost_at) = from.and_then(|f| f.lost_at_unix_ms) else {
        return Some(lag);
    };
    // When the standby last replayed a transaction: its lag is as of the
    // observation, which began `observed_age_ms` before the report left.
    let replayed_at = db
        .observed_at_unix_ms
        .saturating_sub(i64::try_from(db.observed_age_ms).unwrap_or(i64::MAX))
        .saturating_sub(i64::try_from(lag).unwrap_or(i64::MAX));
    Some(u64::try_from(lost_at.saturating_sub(replayed_at)).unwrap_or(0).min(lag))
}

fn steps(app: &str, from: Option<&ClusterRef>, to: Option<&ClusterRef>, source: Option<&DataSource>) -> Vec<PlanStep> {
    let from = from.map_or_else(|| "the old primary".to_owned(), ToString::to_string);
    let to = to.map_or_else(|| "the target".to_owned(), ToString::to_string);
    let step = |name, description: String| PlanStep {
        name,
        description,
        expected_ms: None,
    };
    let data = match source {
        Some(DataSource::Backup { id, .. }) => {
            step("restore", format!("restore backup {id} onto the database in {to}"))
        }
        _ => step(
            "promote",
            format!("promote the standby in {to} (pg_promote) and wait until it accepts writes"),
        ),
    };
    vec![
        step(
            "fence",
            format!("commit a new primary epoch for {app}; the agent in {from} stops {app}'s writes and its database"),
        ),
        data,
        step(
            "repoint",
            format!("run {app}'s current release in {to} against the new primary and pass its gates"),
        ),
        step("move-traffic", format!("send {app}'s traffic to {to}")),
        step(
            "verify",
            format!("run {app}'s gates through the front door and record RTO and RPO"),
        ),
    ]
}

/// `1.5 s`, `12 s`, `4 min 3 s`, for messages.
pub fn human_ms(ms: u64) -> String {
    if ms < 10_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else if ms < 120_000 {
        format!("{} s", ms / 1000)
    } else if ms < 7_200_000 {
        format!("{} min {} s", ms / 60_000, ms % 60_000 / 1000)
    } else {
        format!("{} h {} min", ms / 3_600_000, ms % 3_600_000 / 60_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(role: Option<DbRole>, configured: DbRole, lag_ms: Option<u64>) -> DatabaseStatus {
        DatabaseStatus {
            app: "shop".into(),
            driver: DbDriver::Postgres,
            configured_role: configured,
            role,
            follows: None,
            lsn: Some(100),
            receive_lsn: None,
            lag_ms,
            error: None,
            observed_at_unix_ms: 1,
            fenced: false,
            streaming: None,
            unreachable_since_unix_ms: None,
            unreachable_since_term: 0,
            observed_age_ms: 0,
            session: 0,
        }
    }

    fn view(region: &str, up: bool, database: Option<DatabaseStatus>) -> ClusterView {
        ClusterView {
            lost_at_unix_ms: None,
            cluster: ClusterRef::new(region, "c1").unwrap(),
            agent_up: up,
            database,
        }
    }

    fn app() -> AppSpec {
        let text = r#"
            name = "shop"
            [[clusters]]
            region = "us-east"
            cluster = "c1"
            driver = "local"
            local = { command = ["x"], listen = "127.0.0.1:1", preview_listen = "127.0.0.1:2" }
            [[clusters]]
            region = "eu-west"
            cluster = "c1"
            driver = "local"
            local = { command = ["x"], listen = "127.0.0.1:3", preview_listen = "127.0.0.1:4" }
        "#;
        toml::from_str(text).unwrap()
    }

    fn input<'a>(app: &'a AppSpec, clusters: Vec<ClusterView>, to: Option<&'a str>) -> PlanInput<'a> {
        PlanInput {
            app,
            clusters,
            backups: vec![],
            running_operation: None,
            to,
            now_unix_ms: 1_000_000,
            drills: &[],
        }
    }

    #[test]
    fn lsns_parse_and_print_as_postgres_does() {
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn("0/0"), Some(0));
        for bad in ["", "16", "x/1", "1/100000000", "1/2/3"] {
            assert_eq!(parse_lsn(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_healthy_standby_is_the_target_and_its_lag_the_window() {
        let app = app();
        let clusters = vec![
            view("us-east", true, Some(db(Some(DbRole::Primary), DbRole::Primary, None))),
            view(
                "eu-west",
                true,
                Some(db(Some(DbRole::Standby), DbRole::Standby, Some(250))),
            ),
        ];
        let p = plan(&input(&app, clusters, None)).unwrap();
        assert_eq!(p.from.unwrap().region, "us-east");
        assert_eq!(p.to.unwrap().region, "eu-west");
        assert_eq!(p.source, Some(DataSource::Standby { lag_ms: Some(250) }));
        assert_eq!(p.data_loss_window_ms, Some(250));
        assert!(p.blockers.is_empty(), "{:?}", p.blockers);
        let names: Vec<&str> = p.steps.iter().map(|s| s.name).collect();
        assert_eq!(names, ["fence", "promote", "repoint", "move-traffic", "verify"]);
    }

    /// Once the primary is lost the standby's lag grows by the clock alone;
    /// the window is its lag when the loss was noticed, so waiting
    /// `failover_after_secs` does not push it over `max_data_loss_secs`.
    #[test]
    fn a_lost_primary_s_window_is_the_standby_s_lag_when_it_was_lost() {
        let app = app();
        let lost_at = 1_000_000;
        // Observed 40 s after the loss: the last transaction it replayed
        // was 40.3 s old, so 300 ms before the loss.
        let mut standby = db(Some(DbRole::Standby), DbRole::Standby, Some(40_300));
        standby.observed_at_unix_ms = lost_at + 40_000;
        // A report that arrived 2 s after its observation began: the lag
        // is as of then (window 2.3 s, not 300 ms).
        let mut late = standby.clone();
        late.observed_age_ms = 2_000;
        let mut primary = view("us-east", false, Some(db(Some(DbRole::Primary), DbRole::Primary, None)));
        primary.lost_at_unix_ms = Some(lost_at);
        let clusters = vec![primary, view("eu-west", true, Some(standby.clone()))];
        let p = plan(&input(&app, clusters, None)).unwrap();
        assert_eq!(p.source, Some(DataSource::Standby { lag_ms: Some(40_300) }));
        assert_eq!(p.data_loss_window_ms, Some(300));
        assert!(
            p.blockers.iter().all(|b| !b.reason.contains("data-loss window")),
            "{:?}",
            p.blockers
        );
        let mut primary = view("us-east", false, Some(db(Some(DbRole::Primary), DbRole::Primary, None)));
        primary.lost_at_unix_ms = Some(lost_at);
        let p = plan(&input(&app, vec![primary, view("eu-west", true, Some(late))], None)).unwrap();
        assert_eq!(p.data_loss_window_ms, Some(2_300));
        // A primary that is there: the lag now.
        let clusters = vec![
            view("us-east", true, Some(db(Some(DbRole::Primary), DbRole::Primary, None))),
            view("eu-west", true, Some(standby)),
        ];
        let p = plan(&input(&app, clusters, None)).unwrap();
        assert_eq!(p.data_loss_window_ms, Some(40_300));
    }

    #[test]
    fn what_stands_in_the_way_is_named_with_the_flag_that_overrides_it() {
        let app = app();
        let clusters = vec![
            view("us-east", false, Some(db(Some(DbRole::Primary), DbRole::Primary, None))),
            view(
                "eu-west",
                true,
                Some(db(Some(DbRole::Standby), DbRole::Standby, Some(45_000))),
            ),
        ];
        let mut i = input(&app, clusters, Some("eu-west"));
        i.running_operation = Some("op-1".into());
        let p = plan(&i).unwrap();
        let by: Vec<(Option<&str>, &str)> = p
            .blockers
            .iter()
            .map(|b| (b.overridden_by, b.reason.as_str()))
            .collect();
        assert!(
            by.iter()
                .any(|(f, r)| *f == Some("--accept-data-loss") && r.contains("45 s")),
            "{by:?}"
        );
        assert!(
            by.iter()
                .any(|(f, r)| *f == Some("--force") && r.contains("us-east/c1 is down")),
            "{by:?}"
        );
        assert!(by.iter().any(|(f, r)| f.is_none() && r.contains("op-1")), "{by:?}");
    }

    #[test]
    fn impossible_targets_are_refused() {
        let app = app();
        let clusters = || {
            vec![
                view("us-east", true, Some(db(Some(DbRole::Primary), DbRole::Primary, None))),
                view(
                    "eu-west",
                    true,
                    Some(db(Some(DbRole::Standby), DbRole::Standby, Some(0))),
                ),
            ]
        };
        assert!(matches!(
            plan(&input(&app, clusters(), Some("ap-south"))),
            Err(PlanError::UnknownRegion { .. })
        ));
        assert!(matches!(
            plan(&input(&app, clusters(), Some("us-east"))),
            Err(PlanError::AlreadyPrimary(_))
        ));
    }

    #[test]
    fn two_primaries_block_everything() {
        let app = app();
        let clusters = vec![
            view("us-east", true, Some(db(Some(DbRole::Primary), DbRole::Primary, None))),
            view("eu-west", true, Some(db(Some(DbRole::Primary), DbRole::Standby, None))),
        ];
        let p = plan(&input(&app, clusters, None)).unwrap();
        assert!(
            p.blockers
                .iter()
                .any(|b| b.reason.contains("more than one primary") && b.overridden_by.is_none()),
            "{:?}",
            p.blockers
        );
    }

    #[test]
    fn without_a_standby_the_newest_validated_backup_is_the_source() {
        let app = app();
        let clusters = vec![
            view("us-east", true, Some(db(Some(DbRole::Primary), DbRole::Primary, None))),
            view("eu-west", true, Some(db(Some(DbRole::Primary), DbRole::Primary, None))),
        ];
        // Both say primary: that is split brain, not a restore target.
        let p = plan(&input(&app, clusters, None)).unwrap();
        assert!(p.blockers.iter().any(|b| b.reason.contains("more than one primary")));

        let clusters = vec![
            view("us-east", true, Some(db(Some(DbRole::Primary), DbRole::Primary, None))),
            view("eu-west", true, None),
        ];
        let p = plan(&input(&app, clusters, None)).unwrap();
        assert_eq!(p.source, None);
        assert!(
            p.blockers.iter().any(|b| b.reason.contains("has no database for shop")),
            "{:?}",
            p.blockers
        );
    }

    #[test]
    fn settings_default_and_validate() {
        let d = DrSettings::default();
        assert!(d.is_default());
        assert!(d.validate().is_ok());
        let bad = DrSettings {
            failover_after_secs: 0,
            ..DrSettings::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("dr.failover_after_secs")
        );
    }
}
