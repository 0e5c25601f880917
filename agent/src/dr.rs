//! What this agent observes about its databases for disaster recovery: each
//! one's replication role (asked of the server, not taken from the config:
//! a promoted standby is a primary whatever the file says), WAL position
//! and lag. The session reports them every `db_status_interval_ms`. And
//! the `db.failover` tasks that act on them: fence a primary, lift a fence,
//! promote a standby, each under the app's primary epoch.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use cutover_shared::config::{DatabaseConfig, DbDriver};
use cutover_shared::domain::{TaskResult, TaskSpec, now_unix_ms};
use cutover_shared::dr::{DatabaseStatus, DbRole, format_lsn};
use cutover_shared::task::outputs::FailoverOutputs;
use cutover_shared::task::{self, FailoverAction, TaskKind, TaskParams};

use crate::migrate;

/// How long one observation may take before it counts as unreachable: a
/// hung server must not hold up the next report.
const OBSERVE_TIMEOUT: Duration = Duration::from_secs(3);

/// Observes one database. Never fails: what went wrong is the status's
/// `error` (redacted), and its role is then unknown.
pub async fn observe(db: &DatabaseConfig, data_dir: &Path) -> DatabaseStatus {
    let mut status = DatabaseStatus {
        app: db.app.clone(),
        driver: db.driver,
        configured_role: db.role(),
        role: None,
        follows: db.follows.clone(),
        lsn: None,
        receive_lsn: None,
        lag_ms: None,
        error: None,
        observed_at_unix_ms: now_unix_ms(),
        fenced: false,
        streaming: None,
        unreachable_since_unix_ms: None,
        unreachable_since_term: 0,
        observed_age_ms: 0,
        session: 0,
    };
    if db.driver == DbDriver::Sqlite {
        // A SQLite file has no replication: it is what the config says.
        status.role = Some(db.role());
        return status;
    }
    let observed = async {
        let cfg = migrate::resolve(db, data_dir)?;
        migrate::replication(&cfg).await
    };
    match tokio::time::timeout(OBSERVE_TIMEOUT, observed).await {
        Ok(Ok(Some(r))) => {
            status.role = Some(if r.in_recovery {
                DbRole::Standby
            } else {
                DbRole::Primary
            });
            status.lsn = r.lsn;
            status.receive_lsn = r.receive_lsn;
            status.lag_ms = r.lag_ms;
            status.fenced = !r.in_recovery && r.read_only;
            status.streaming = r.in_recovery.then_some(r.streaming);
        }
        Ok(Ok(None)) => status.role = Some(db.role()),
        Ok(Err(e)) => status.error = Some(e.to_string()),
        Err(_) => status.error = Some(format!("no answer within {OBSERVE_TIMEOUT:?}")),
    }
    // `observed_at_unix_ms` stays when the observation began: the lag is as
    // of then or later, so the age counted from it is never short.
    status
}

/// Whether migrations may change `cfg`'s database now. A PostgreSQL server
/// in recovery or fenced is not a primary, whatever the config says; one
/// that is neither is, if the config says so or this agent promoted it
/// (a failover does not rewrite config files). SQLite, or a server that
/// cannot be asked (its connection will fail anyway): as configured.
pub async fn acts_as_primary(cfg: &migrate::DbConfig, data_dir: &Path) -> bool {
    match tokio::time::timeout(OBSERVE_TIMEOUT, migrate::replication(cfg)).await {
        Ok(Ok(Some(r))) if r.in_recovery || r.read_only => false,
        Ok(Ok(Some(_))) => cfg.primary || promoted_here(data_dir, &cfg.app),
        _ => cfg.primary,
    }
}

/// Whether this agent promoted `app`'s database (and no later fence
/// undid it), from `<data_dir>/dr-epochs.json`.
pub fn promoted_here(data_dir: &Path, app: &str) -> bool {
    read_epochs(&data_dir.join(EPOCHS_FILE))
        .get(app)
        .is_some_and(|e| e.promoted)
}

const EPOCHS_FILE: &str = "dr-epochs.json";

/// What this agent knows of one app's failovers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct AppEpoch {
    /// The highest primary epoch seen.
    epoch: u64,
    /// This agent promoted the app's database (and did not fence it since).
    #[serde(default)]
    promoted: bool,
    /// This agent fenced the app's primary itself when its lease ran out
    /// (as opposed to a failover's fence, which only a rejoin lifts).
    #[serde(default)]
    self_fenced: bool,
    /// The epoch of the last failover whose fence this agent started, and
    /// whether it found the server already fenced by someone else (an
    /// operator's `default_transaction_read_only`): that failover's
    /// compensation then leaves the fence where it found it. Recorded
    /// before the fence acts, once per epoch, so a re-sent fence does not
    /// take the fence it set itself for an operator's.
    #[serde(default)]
    fence_found: Option<(u64, bool)>,
}

fn read_epochs(path: &Path) -> BTreeMap<String, AppEpoch> {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Observes every configured database, concurrently.
pub async fn observe_all(databases: &[DatabaseConfig], data_dir: &Path) -> Vec<DatabaseStatus> {
    futures::future::join_all(databases.iter().map(|d| observe(d, data_dir))).await
}

/// Checks the lease every quarter of it (at least once a second): once no
/// leader renewed it for `lease`, fences this agent's primaries.
pub async fn watch_lease(
    dr: std::sync::Arc<DrRuntime>,
    renewed: std::sync::Arc<Mutex<std::time::Instant>>,
    lease: Duration,
) {
    let mut tick = tokio::time::interval((lease / 4).clamp(Duration::from_millis(100), Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // The lease is read under the fencing lock: a registration that
        // renews it meanwhile either lifts the fence this check puts up
        // (it waits for the lock) or is seen here and no fence goes up.
        let _held = dr.fencing.lock().await;
        let since = renewed.lock().expect("lease").elapsed();
        if since > lease {
            dr.self_fence(since).await;
        }
    }
}

/// Kinds `DrRuntime` executes.
pub const KINDS: &[TaskKind] = &[TaskKind::DbFailover, TaskKind::DrDrill];

/// How long a standby may take to replay up to the fenced primary's last
/// write before a promotion gives up (and the failover is undone).
const CATCH_UP: Duration = Duration::from_secs(30);

/// The highest primary epoch this agent has seen per app, on disk
/// (`<data_dir>/dr-epochs.json`, replaced atomically): a task stamped with
/// an older one comes from a superseded decision and is refused, across
/// restarts too.
struct Epochs {
    path: PathBuf,
    lock: Mutex<()>,
}

impl Epochs {
    fn read(&self) -> BTreeMap<String, AppEpoch> {
        read_epochs(&self.path)
    }

    fn write(&self, all: &BTreeMap<String, AppEpoch>) -> std::io::Result<()> {
        use std::io::Write;
        let tmp = self.path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(all).unwrap_or_default())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)
    }

    /// Records `epoch` for `app` unless a newer one is known; refuses an
    /// older one.
    fn admit(&self, app: &str, epoch: u64) -> Result<(), String> {
        let _held = self.lock.lock().expect("epochs");
        let mut all = self.read();
        let known = all.get(app).map_or(0, |e| e.epoch);
        if epoch < known {
            return Err(format!(
                "stale epoch {epoch} for {app}: this agent has seen epoch {known}; the task comes from a superseded failover"
            ));
        }
        if epoch > known {
            all.entry(app.to_owned()).or_default().epoch = epoch;
            self.write(&all)
                .map_err(|e| format!("cannot record epoch {epoch} of {app}: {e}"))?;
        }
        Ok(())
    }

    fn update(&self, app: &str, f: impl FnOnce(&mut AppEpoch)) -> Result<(), String> {
        let _held = self.lock.lock().expect("epochs");
        let mut all = self.read();
        f(all.entry(app.to_owned()).or_default());
        self.write(&all)
            .map_err(|e| format!("cannot record {app}'s failover state: {e}"))
    }

    /// Records whether this agent's database of `app` is one it promoted.
    fn set_promoted(&self, app: &str, promoted: bool) -> Result<(), String> {
        let _held = self.lock.lock().expect("epochs");
        let mut all = self.read();
        all.entry(app.to_owned()).or_default().promoted = promoted;
        self.write(&all)
            .map_err(|e| format!("cannot record the promotion of {app}: {e}"))
    }
}

/// Executes `db.failover` and `dr.drill` tasks against the agent's
/// configured databases (and, for drills, its apps).
pub struct DrRuntime {
    apps: std::sync::Arc<crate::app_tasks::AppRuntime>,
    /// Drills into a cold standby restore a backup through it.
    backups: std::sync::Arc<crate::backup::task::BackupRuntime>,
    databases: BTreeMap<String, DatabaseConfig>,
    data_dir: PathBuf,
    epochs: Epochs,
    /// Held while the lease watcher fences or a registration lifts a
    /// fence, so the two never interleave (a lift between a lease check
    /// and its fence would leave a primary fenced with the lease renewed).
    fencing: tokio::sync::Mutex<()>,
}

impl DrRuntime {
    pub fn new(
        databases: &[DatabaseConfig],
        data_dir: &Path,
        apps: std::sync::Arc<crate::app_tasks::AppRuntime>,
        backups: std::sync::Arc<crate::backup::task::BackupRuntime>,
    ) -> DrRuntime {
        DrRuntime {
            apps,
            backups,
            databases: databases.iter().map(|d| (d.app.clone(), d.clone())).collect(),
            data_dir: data_dir.to_owned(),
            epochs: Epochs {
                path: data_dir.join(EPOCHS_FILE),
                lock: Mutex::new(()),
            },
            fencing: tokio::sync::Mutex::new(()),
        }
    }

    /// Fences every PostgreSQL database of this agent that is a writable
    /// primary, recording that the agent did it itself. One that cannot
    /// be reached is tried again at the next check. The caller holds
    /// `fencing`.
    async fn self_fence(&self, since: Duration) {
        for (app, db) in &self.databases {
            if db.driver != DbDriver::Postgres {
                continue;
            }
            let Ok(cfg) = migrate::resolve(db, &self.data_dir) else {
                continue;
            };
            match tokio::time::timeout(OBSERVE_TIMEOUT, migrate::replication(&cfg)).await {
                Ok(Ok(Some(r))) if !r.in_recovery && !r.read_only => {}
                _ => continue,
            }
            if let Err(e) = self.epochs.update(app, |e| e.self_fenced = true) {
                tracing::error!("{e}");
                continue;
            }
            match migrate::fence(&cfg).await {
                Ok(lsn) => tracing::warn!(
                    app = %app,
                    "no leader renewed the lease for {since:?}: fenced {app}'s primary (read-only) at {}",
                    format_lsn(lsn)
                ),
                Err(e) => tracing::error!(app = %app, "lease lost, and {app}'s primary could not be fenced: {e}"),
            }
        }
    }

    /// Fences `app`'s database if it is a cold standby: configured with
    /// `role = "standby"` and no `follows`, its server not in recovery (a server a failover restores
    /// a backup onto, not a streaming replica), writable, and not promoted
    /// by this agent. Taking writes, it would be a second primary; fenced,
    /// it waits for a failover to claim it (the promotion lifts the
    /// fence). True when it fenced.
    pub async fn fence_if_cold(&self, app: &str) -> bool {
        let _held = self.fencing.lock().await;
        let Some(db) = self.databases.get(app) else {
            return false;
        };
        // Only `role = "standby"` with no `follows` is a cold standby: the
        // older `primary = false` names a read replica, which is left alone.
        if db.driver != DbDriver::Postgres
            || db.role != Some(DbRole::Standby)
            || db.follows.is_some()
            || self.epochs.read().get(app).is_some_and(|e| e.promoted)
        {
            return false;
        }
        let Ok(cfg) = migrate::resolve(db, &self.data_dir) else {
            return false;
        };
        match tokio::time::timeout(OBSERVE_TIMEOUT, migrate::replication(&cfg)).await {
            Ok(Ok(Some(r))) if !r.in_recovery && !r.read_only => {}
            _ => return false,
        }
        match migrate::fence(&cfg).await {
            Ok(_) => {
                tracing::warn!(
                    app = %app,
                    "{app}'s database is configured as a standby but is not one (not in recovery, not promoted here): \
                     fenced it (read-only) as a cold standby until a failover claims it"
                );
                true
            }
            Err(e) => {
                tracing::error!(app = %app, "{app}'s cold standby takes writes and could not be fenced: {e}");
                false
            }
        }
    }

    /// After registering: a primary this agent fenced itself is lifted if
    /// no failover was decided since (the app's epoch is the one the agent
    /// knows, and names no other cluster as primary); otherwise it stays
    /// fenced until an operator rejoins it.
    pub async fn after_register(
        &self,
        epochs: &[cutover_shared::proto::AppEpoch],
        me: &cutover_shared::domain::ClusterRef,
    ) {
        let _held = self.fencing.lock().await;
        for (app, mine) in self.epochs.read() {
            if !mine.self_fenced {
                continue;
            }
            let (epoch, primary) = epochs
                .iter()
                .find(|e| e.app == app)
                .map_or((0, String::new()), |e| (e.epoch, e.primary.clone()));
            if epoch != mine.epoch || !(primary.is_empty() || primary == me.to_string()) {
                tracing::warn!(
                    app = %app,
                    "{app}'s primary stays fenced: the coordinators are at epoch {epoch} (primary {primary:?}), this agent fenced it at {}",
                    mine.epoch
                );
                continue;
            }
            let Some(db) = self.databases.get(&app) else { continue };
            let Ok(cfg) = migrate::resolve(db, &self.data_dir) else {
                continue;
            };
            match migrate::unfence(&cfg).await {
                Ok(()) => {
                    if let Err(e) = self.epochs.update(&app, |e| e.self_fenced = false) {
                        tracing::error!("{e}");
                    }
                    tracing::info!(app = %app, "lease renewed and no failover decided: {app}'s primary takes writes again");
                }
                Err(e) => tracing::error!(app = %app, "could not lift {app}'s fence: {e}"),
            }
        }
    }

    pub async fn execute(&self, task: &TaskSpec, progress: &(dyn Fn(String) + Send + Sync)) -> TaskResult {
        if task.kind == TaskKind::DrDrill.as_str() {
            let mut out = cutover_shared::task::outputs::DrillOutputs::default();
            let app = task::app_of(&task.params).unwrap_or_default();
            let ran = crate::drill::run(
                &self.apps,
                &self.backups,
                self.databases.get(app),
                &self.data_dir,
                task,
                progress,
                &mut out,
            )
            .await;
            let (success, message) = match ran {
                Ok(m) => (true, m),
                Err(e) => (false, e),
            };
            return TaskResult::finished(&task.task_id, success, message, out.to_wire());
        }
        let (success, message, outputs) = match self.run(task, progress).await {
            Ok((msg, out)) => (true, msg, out),
            Err(e) => (false, e, FailoverOutputs::default()),
        };
        TaskResult::finished(&task.task_id, success, message, outputs.to_wire())
    }

    async fn run(
        &self,
        task: &TaskSpec,
        progress: &(dyn Fn(String) + Send + Sync),
    ) -> Result<(String, FailoverOutputs), String> {
        let f = match TaskParams::from_wire(&task.kind, &task.params) {
            Ok(TaskParams::DbFailover(f)) => f,
            Ok(other) => return Err(format!("{} is not a failover task", other.kind())),
            Err(e) => return Err(e.to_string()),
        };
        let app = &f.app.app;
        let db = self.databases.get(app).ok_or_else(|| {
            format!(
                "no database is configured for app {app} on {} (add a [[databases]] entry to the agent's config)",
                task.target
            )
        })?;
        // The epoch is recorded before anything is touched: from here on
        // this agent refuses what an older decision asks.
        self.epochs.admit(app, f.epoch)?;
        let mut out = FailoverOutputs {
            epoch: Some(f.epoch),
            ..FailoverOutputs::default()
        };
        let cfg = migrate::resolve(db, &self.data_dir).map_err(|e| e.to_string())?;
        let msg = match f.action {
            FailoverAction::Fence => {
                progress(format!("fencing {app}'s database (epoch {})", f.epoch));
                let known = self.epochs.read().get(app).copied().unwrap_or_default();
                if known.fence_found.is_none_or(|(epoch, _)| epoch != f.epoch) {
                    // A fence this agent set when its lease ran out is its
                    // own, not an operator's.
                    let found = !known.self_fenced
                        && matches!(
                            tokio::time::timeout(OBSERVE_TIMEOUT, migrate::replication(&cfg)).await,
                            Ok(Ok(Some(r))) if !r.in_recovery && r.read_only
                        );
                    self.epochs.update(app, |e| e.fence_found = Some((f.epoch, found)))?;
                }
                self.epochs.set_promoted(app, false)?;
                let lsn = migrate::fence(&cfg).await.map_err(|e| e.to_string())?;
                out.lsn = Some(lsn);
                format!(
                    "{app}'s database is read-only, its sessions ended; last write at {}",
                    format_lsn(lsn)
                )
            }
            FailoverAction::Unfence => {
                let found = self.epochs.read().get(app).and_then(|e| e.fence_found);
                if found == Some((f.epoch, true)) {
                    format!(
                        "{app}'s database stays read-only: it already was when this failover fenced it \
                         (epoch {}); lift that fence yourself when it is time",
                        f.epoch
                    )
                } else {
                    migrate::unfence(&cfg).await.map_err(|e| e.to_string())?;
                    format!("{app}'s database takes writes again")
                }
            }
            FailoverAction::Rejoin => {
                let source = f.source.as_ref().ok_or("a rejoin task names no source")?;
                let (method, lsn) = crate::rejoin::rejoin(db, &cfg, source, progress).await?;
                self.epochs.update(app, |e| {
                    e.promoted = false;
                    e.self_fenced = false;
                })?;
                out.lsn = lsn;
                out.method = Some(method.as_str().to_owned());
                format!(
                    "{app}'s database is a standby of {source} again ({}), replaying at {}",
                    match method {
                        crate::rejoin::Method::Rewind => "rewound with pg_rewind",
                        crate::rejoin::Method::BaseBackup => "from a fresh base backup",
                    },
                    lsn.map_or_else(|| "?".to_owned(), format_lsn)
                )
            }
            FailoverAction::Promote => {
                // Not while a cold-standby check runs: it would fence
                // what this promotes before the promotion is recorded.
                let _held = self.fencing.lock().await;
                if let Some(l) = f.wait_for_lsn {
                    progress(format!("waiting for the standby to replay up to {}", format_lsn(l)));
                }
                let (lsn, waited) = migrate::promote(&cfg, f.wait_for_lsn, CATCH_UP)
                    .await
                    .map_err(|e| e.to_string())?;
                self.epochs.set_promoted(app, true)?;
                out.lsn = Some(lsn);
                out.caught_up_ms = Some(u64::try_from(waited.as_millis()).unwrap_or(u64::MAX));
                format!(
                    "{app}'s database is the primary (epoch {}), at {}",
                    f.epoch,
                    format_lsn(lsn)
                )
            }
        };
        Ok((msg, out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A task from an older epoch is refused, across a restart (the file);
    /// the same or a newer one is admitted.
    #[test]
    fn an_older_epoch_is_refused_and_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let epochs = || Epochs {
            path: dir.path().join("dr-epochs.json"),
            lock: Mutex::new(()),
        };
        let e = epochs();
        e.admit("shop", 2).unwrap();
        e.admit("shop", 2).unwrap();
        e.admit("other", 1).unwrap();
        e.set_promoted("shop", true).unwrap();
        assert!(promoted_here(dir.path(), "shop") && !promoted_here(dir.path(), "other"));
        let restarted = epochs();
        let refused = restarted.admit("shop", 1).unwrap_err();
        assert!(
            refused.contains("stale epoch 1") && refused.contains("seen epoch 2"),
            "{refused}"
        );
        restarted.admit("shop", 3).unwrap();
        let read = restarted.read();
        assert_eq!((read["shop"].epoch, read["shop"].promoted), (3, true));
        assert_eq!((read["other"].epoch, read["other"].promoted), (1, false));
    }
}
