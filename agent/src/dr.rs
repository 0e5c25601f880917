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
use cutover_shared::task::{FailoverAction, TaskKind, TaskParams};

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
        }
        Ok(Ok(None)) => status.role = Some(db.role()),
        Ok(Err(e)) => status.error = Some(e.to_string()),
        Err(_) => status.error = Some(format!("no answer within {OBSERVE_TIMEOUT:?}")),
    }
    status.observed_at_unix_ms = now_unix_ms();
    status
}

/// Observes every configured database, concurrently.
pub async fn observe_all(databases: &[DatabaseConfig], data_dir: &Path) -> Vec<DatabaseStatus> {
    futures::future::join_all(databases.iter().map(|d| observe(d, data_dir))).await
}

/// Kinds `DrRuntime` executes.
pub const KINDS: &[TaskKind] = &[TaskKind::DbFailover];

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
    fn read(&self) -> BTreeMap<String, u64> {
        std::fs::read(&self.path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Records `epoch` for `app` unless a newer one is known; refuses an
    /// older one.
    fn admit(&self, app: &str, epoch: u64) -> Result<(), String> {
        let _held = self.lock.lock().expect("epochs");
        let mut all = self.read();
        let known = all.get(app).copied().unwrap_or(0);
        if epoch < known {
            return Err(format!(
                "stale epoch {epoch} for {app}: this agent has seen epoch {known}; the task comes from a superseded failover"
            ));
        }
        if epoch > known {
            all.insert(app.to_owned(), epoch);
            let tmp = self.path.with_extension("json.tmp");
            let write = || -> std::io::Result<()> {
                use std::io::Write;
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&serde_json::to_vec(&all).unwrap_or_default())?;
                f.sync_all()?;
                std::fs::rename(&tmp, &self.path)
            };
            write().map_err(|e| format!("cannot record epoch {epoch} of {app}: {e}"))?;
        }
        Ok(())
    }
}

/// Executes `db.failover` tasks against the agent's configured databases.
pub struct DrRuntime {
    databases: BTreeMap<String, DatabaseConfig>,
    data_dir: PathBuf,
    epochs: Epochs,
}

impl DrRuntime {
    pub fn new(databases: &[DatabaseConfig], data_dir: &Path) -> DrRuntime {
        DrRuntime {
            databases: databases.iter().map(|d| (d.app.clone(), d.clone())).collect(),
            data_dir: data_dir.to_owned(),
            epochs: Epochs {
                path: data_dir.join("dr-epochs.json"),
                lock: Mutex::new(()),
            },
        }
    }

    /// The highest epoch this agent has seen for `app` (0: none).
    pub fn epoch(&self, app: &str) -> u64 {
        self.epochs.read().get(app).copied().unwrap_or(0)
    }

    pub async fn execute(&self, task: &TaskSpec, progress: &(dyn Fn(String) + Send + Sync)) -> TaskResult {
        let (success, message, outputs) = match self.run(task, progress).await {
            Ok((msg, out)) => (true, msg, out),
            Err(e) => (false, e, FailoverOutputs::default()),
        };
        TaskResult {
            task_id: task.task_id.clone(),
            success,
            message,
            outputs: outputs.to_wire(),
            replayed: false,
            finished_at_unix_ms: now_unix_ms(),
        }
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
                let lsn = migrate::fence(&cfg).await.map_err(|e| e.to_string())?;
                out.lsn = Some(lsn);
                format!(
                    "{app}'s database is read-only, its sessions ended; last write at {}",
                    format_lsn(lsn)
                )
            }
            FailoverAction::Unfence => {
                migrate::unfence(&cfg).await.map_err(|e| e.to_string())?;
                format!("{app}'s database takes writes again")
            }
            FailoverAction::Promote => {
                if let Some(l) = f.wait_for_lsn {
                    progress(format!("waiting for the standby to replay up to {}", format_lsn(l)));
                }
                let (lsn, waited) = migrate::promote(&cfg, f.wait_for_lsn, CATCH_UP)
                    .await
                    .map_err(|e| e.to_string())?;
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
        let restarted = epochs();
        let refused = restarted.admit("shop", 1).unwrap_err();
        assert!(
            refused.contains("stale epoch 1") && refused.contains("seen epoch 2"),
            "{refused}"
        );
        restarted.admit("shop", 3).unwrap();
        assert_eq!(restarted.read().get("shop"), Some(&3));
        assert_eq!(restarted.read().get("other"), Some(&1));
    }
}
