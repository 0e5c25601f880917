//! `db.migrate`: the migration task. The coordinator sends a release's
//! migrations (a [`Bundle`]) and an action; this module finds the app's
//! database in the agent's own config (its connection string never leaves
//! this process, and is never logged) and runs the [`migrate`] engine.
//!
//! Actions: `status`, `plan` (what `up` would run), `up` and `down` (to a
//! target), and `dry_run` for the last two. Only a primary is migrated: on
//! a replica, `up` and `down` succeed as skipped, so a cutover runs its
//! migrations once per region's primary.
//!
//! Results carry plain outputs the CLI and the orchestrator read:
//! `applied_version`, `pending`, `drift` (status); `plan`; `outcome`,
//! `applied`, `from_version`, `to_version`, `backup_path`, `backup_bytes`,
//! `backup_sha256` (up / down); `skipped` when nothing ran.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cutover_shared::app::AppSpec;
use cutover_shared::config::DatabaseConfig;
use cutover_shared::domain::{TaskResult, TaskSpec};
use cutover_shared::release::Bundle;
use cutover_shared::task::outputs::{BackupOutput, MigrateOutputs};
use cutover_shared::task::{self, TaskKind, TaskParams};

use crate::backup::task::BackupRuntime;
use crate::migrate::{self, Direction, MigrationSource, Outcome, RunEvent};

/// Kinds this module executes.
pub const KINDS: &[TaskKind] = &[TaskKind::DbMigrate];

/// The databases this agent migrates, by app.
pub struct DbRuntime {
    databases: BTreeMap<String, DatabaseConfig>,
    data_dir: PathBuf,
    /// Where pre-migration backups are also uploaded, if configured.
    backups: Option<Arc<BackupRuntime>>,
}

fn join(versions: impl IntoIterator<Item = i64>) -> String {
    versions
        .into_iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

impl DbRuntime {
    /// The databases of an agent config (which `AgentConfig::validate`
    /// checked: a config error stops the agent at start, not at the first
    /// cutover).
    pub fn new(databases: &[DatabaseConfig], data_dir: &Path, backups: Option<Arc<BackupRuntime>>) -> DbRuntime {
        DbRuntime {
            databases: databases.iter().map(|d| (d.app.clone(), d.clone())).collect(),
            data_dir: data_dir.to_owned(),
            backups: backups.filter(|b| b.configured()),
        }
    }

    pub async fn execute(&self, task: &TaskSpec, progress: &(dyn Fn(String) + Send + Sync)) -> TaskResult {
        let (success, message, outputs) = match self.run(task, progress).await {
            Ok((ok, msg, out)) => (ok, msg, out),
            Err(e) => (false, e, MigrateOutputs::default()),
        };
        TaskResult::finished(&task.task_id, success, message, outputs.to_wire())
    }

    async fn run(
        &self,
        task: &TaskSpec,
        progress: &(dyn Fn(String) + Send + Sync),
    ) -> Result<(bool, String, MigrateOutputs), String> {
        let p = &task.params;
        let Ok(TaskParams::DbMigrate(m)) = TaskParams::from_wire(&task.kind, p) else {
            return Err(match TaskParams::from_wire(&task.kind, p) {
                Err(e) => e.to_string(),
                Ok(other) => format!("{} is not a migration task", other.kind()),
            });
        };
        let app = &m.app.app;
        let action = m.action.as_str();
        let dry_run = m.dry_run;
        let target = m.target;
        // The release's migrations, checked against the digest the task
        // names (tasks from older logs carry them inline, or none for a
        // status of an empty release).
        let bundle: Bundle = match (p.contains_key("bundle"), m.bundle_digest.is_empty()) {
            (false, true) => Bundle::default(),
            _ => task::attached_bundle(p).map_err(|e| format!("the task's migrations are unusable: {e}"))?,
        };
        let checks: Vec<String> = task::attached_spec(p)
            .map(|s: AppSpec| s.migration_checks)
            .unwrap_or_default();
        let db = self.databases.get(app).ok_or_else(|| {
            format!(
                "no database is configured for app {app} on {} (add a [[databases]] entry to the agent's config)",
                task.target
            )
        })?;
        let mut cfg = migrate::resolve(db, &self.data_dir).map_err(|e| e.to_string())?;
        // What the server is now, not what the file said: after a failover
        // the promoted standby is migrated and the fenced primary is not.
        cfg.primary = crate::dr::acts_as_primary(&cfg, &self.data_dir).await;
        let source = MigrationSource::from_bundle(&bundle).map_err(|e| e.to_string())?;
        let mut out = MigrateOutputs::default();
        let changes = matches!(action, "up" | "down") && !dry_run;
        if changes && !cfg.primary {
            let why = "not the primary (a replica): migrations run against the region's primary".to_owned();
            out.skipped = Some(why.clone());
            return Ok((true, format!("skipped: {why}"), out));
        }
        match (action, dry_run) {
            ("status", _) => {
                let st = migrate::status(&cfg, &source).await.map_err(|e| e.to_string())?;
                let at = st.newest_applied.unwrap_or(0);
                out.applied_version = Some(at);
                out.pending = Some(st.pending.to_vec());
                out.drift = Some(st.drifted.to_vec());
                out.dirty = Some(st.dirty.to_vec());
                out.unknown = Some(st.unknown.to_vec());
                if !cfg.primary {
                    out.skipped = Some("replica".into());
                }
                let mut msg = format!("at version {at}; {} pending", st.pending.len());
                if !st.drifted.is_empty() {
                    msg.push_str(&format!("; DRIFT in {}", join(st.drifted.iter().copied())));
                }
                Ok((true, msg, out))
            }
            ("plan", _) | ("up" | "down", true) => {
                let direction = if action == "down" {
                    Direction::Down
                } else {
                    Direction::Up
                };
                let plan = migrate::plan(&cfg, &source, target, direction)
                    .await
                    .map_err(|e| e.to_string())?;
                let mut text = String::new();
                for s in &plan.steps {
                    text.push_str(&format!(
                        "{} {} {} ({})\n",
                        s.direction, s.version, s.description, s.file
                    ));
                    for stmt in &s.statements {
                        text.push_str(&format!("    {}\n", stmt.trim()));
                    }
                }
                out.plan = Some(text);
                out.applied_version = Some(plan.applied.last().copied().unwrap_or(0));
                let msg = if plan.steps.is_empty() {
                    "nothing to run".to_owned()
                } else {
                    format!(
                        "would run {} migration(s) {}: {}",
                        plan.steps.len(),
                        plan.direction,
                        join(plan.steps.iter().map(|s| s.version))
                    )
                };
                Ok((true, msg, out))
            }
            ("up" | "down", false) => {
                let observer = |e: &RunEvent<'_>| progress(e.to_string());
                let report = if action == "up" {
                    migrate::up(&cfg, &source, target, &checks, &observer).await
                } else {
                    migrate::down(&cfg, &source, target, &observer).await
                }
                .map_err(|e| e.to_string())?;
                out.outcome = Some(
                    serde_json::to_value(report.outcome)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                );
                out.applied = Some(if report.succeeded() {
                    report.applied.iter().map(|s| s.version).collect()
                } else {
                    Vec::new()
                });
                let newest = |v: &[i64]| v.iter().max().copied().unwrap_or(0);
                out.from_version = Some(newest(&report.versions_before));
                out.to_version = Some(newest(&report.versions_after));
                out.backup = report.backup.as_ref().map(|b| BackupOutput {
                    path: b.path.display().to_string(),
                    bytes: b.size,
                    sha256: b.sha256.clone(),
                });
                // The pre-migration backup goes to the object store too, and
                // so into the catalog, whatever the migration's outcome.
                if let (Some(info), Some(store)) = (&report.backup, &self.backups) {
                    progress(format!("uploading the pre-migration backup of {app}"));
                    match store.store_migration_backup(app, &cfg, info, &task.operation_id).await {
                        Ok(s) => out.stored = Some(s),
                        Err(e) => tracing::warn!(app = %app, "the pre-migration backup stays local only: {e}"),
                    }
                }
                let steps = report
                    .applied
                    .iter()
                    .map(|s| format!("{} ({} ms)", s.version, s.duration.as_millis()))
                    .collect::<Vec<_>>()
                    .join(", ");
                let msg = match report.outcome {
                    Outcome::Applied if report.applied.is_empty() => {
                        format!("nothing to run; at version {}", newest(&report.versions_after))
                    }
                    Outcome::Applied => format!("{action} {steps}; now at version {}", newest(&report.versions_after)),
                    other => format!(
                        "{action} failed: {}; {}; the database is at version {}",
                        report.error.as_deref().unwrap_or("unknown error"),
                        match other {
                            Outcome::RolledBackByDowns => "undone by the down migrations",
                            Outcome::RolledBackByUps => "undone by re-applying the reverted migrations",
                            Outcome::RestoredFromBackup => "undone by restoring the pre-migration backup",
                            _ => "NOT undone: the database needs an operator",
                        },
                        newest(&report.versions_after)
                    ),
                };
                Ok((report.succeeded(), msg, out))
            }
            (other, _) => Err(format!("unknown migrate action {other:?} (status, plan, up or down)")),
        }
    }
}
