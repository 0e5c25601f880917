//! The run itself: pre-flight, lock, backup, migrations, checks, and the
//! undo of a failed run (see the module docs of [`super`]).

use std::time::Instant;

use super::backup::{self, hex};
use super::config::DbConfig;
use super::conn::{Access, AppliedRow, Conn, Replication};
use super::source::MigrationSource;
use super::split::split_statements;
use super::{
    AppliedMigration, BackupInfo, Direction, MigrateError, MigrationStatus, Outcome, Plan, PlannedStep, RunEvent,
    RunObserver, RunReport, StepReport,
};

fn compute_status(rows: &[AppliedRow], source: &MigrationSource) -> MigrationStatus {
    let applied: Vec<AppliedMigration> = rows
        .iter()
        .map(|r| AppliedMigration {
            version: r.version,
            description: r.description.clone(),
            checksum: hex(&r.checksum),
            success: r.success,
        })
        .collect();
    let is_applied = |v: i64| rows.iter().any(|r| r.version == v && r.success);
    let pending = source.versions().filter(|v| !is_applied(*v)).collect();
    let drifted = rows
        .iter()
        .filter(|r| {
            source
                .get(r.version)
                .is_some_and(|m| m.checksum() != r.checksum.as_slice())
        })
        .map(|r| r.version)
        .collect();
    let unknown = rows
        .iter()
        .filter(|r| source.get(r.version).is_none())
        .map(|r| r.version)
        .collect();
    let dirty = rows.iter().filter(|r| !r.success).map(|r| r.version).collect();
    let newest_applied = rows.iter().filter(|r| r.success).map(|r| r.version).max();
    MigrationStatus {
        applied,
        pending,
        drifted,
        unknown,
        dirty,
        newest_applied,
    }
}

/// The refusals every run (and plan) starts with.
fn preflight(st: &MigrationStatus) -> Result<(), MigrateError> {
    if !st.dirty.is_empty() {
        return Err(MigrateError::Dirty {
            versions: st.dirty.clone(),
        });
    }
    if !st.unknown.is_empty() {
        return Err(MigrateError::UnknownApplied {
            versions: st.unknown.clone(),
        });
    }
    if !st.drifted.is_empty() {
        return Err(MigrateError::Drift {
            versions: st.drifted.clone(),
        });
    }
    Ok(())
}

fn check_target(source: &MigrationSource, direction: Direction, target: Option<i64>) -> Result<(), MigrateError> {
    match target {
        // Down to 0: revert everything.
        Some(0) if direction == Direction::Down => Ok(()),
        Some(t) if source.get(t).is_none() => Err(MigrateError::UnknownTarget(t)),
        _ => Ok(()),
    }
}

/// The migrations a run executes, in order. Up: every pending version up to
/// `target` (all if none). Down: every applied version above `target`,
/// newest first; with no target, only the newest (as `sqlx migrate revert`).
fn plan_steps(
    source: &MigrationSource,
    st: &MigrationStatus,
    direction: Direction,
    target: Option<i64>,
) -> Result<Vec<PlannedStep>, MigrateError> {
    check_target(source, direction, target)?;
    let applied = st.applied_versions();
    let mut steps = Vec::new();
    match direction {
        Direction::Up => {
            for m in source.iter() {
                if target.is_some_and(|t| m.version > t) || applied.contains(&m.version) {
                    continue;
                }
                steps.push(PlannedStep {
                    version: m.version,
                    description: m.description.clone(),
                    direction,
                    file: m.up_file.clone(),
                    no_transaction: m.up.no_tx,
                    statements: split_statements(m.up.sql.as_str()),
                });
            }
        }
        Direction::Down => {
            let revert: Vec<i64> = match target {
                Some(t) => applied.iter().rev().copied().filter(|v| *v > t).collect(),
                None => applied.last().copied().into_iter().collect(),
            };
            for v in revert {
                // Known: preflight refused applied versions not in the source.
                let Some(m) = source.get(v) else {
                    return Err(MigrateError::UnknownApplied { versions: vec![v] });
                };
                let (Some(down), Some(file)) = (&m.down, &m.down_file) else {
                    return Err(MigrateError::Irreversible {
                        version: v,
                        file: m.up_file.clone(),
                    });
                };
                steps.push(PlannedStep {
                    version: v,
                    description: m.description.clone(),
                    direction,
                    file: file.clone(),
                    no_transaction: down.no_tx,
                    statements: split_statements(down.sql.as_str()),
                });
            }
        }
    }
    Ok(steps)
}

/// Fences a PostgreSQL primary (see [`Conn::fence`]); its final WAL position.
pub async fn fence(cfg: &DbConfig) -> Result<u64, MigrateError> {
    let mut c = pg_conn(cfg).await?;
    let r = c.fence().await;
    c.close().await;
    r
}

/// Lifts a fence.
pub async fn unfence(cfg: &DbConfig) -> Result<(), MigrateError> {
    let mut c = pg_conn(cfg).await?;
    let r = c.unfence().await;
    c.close().await;
    r
}

/// Forces a checkpoint on a PostgreSQL server (see [`Conn::checkpoint`]).
pub async fn checkpoint(cfg: &DbConfig) -> Result<(), MigrateError> {
    let mut c = pg_conn(cfg).await?;
    let r = c.checkpoint().await;
    c.close().await;
    r
}

/// Promotes a standby (see [`Conn::promote`]).
pub async fn promote(
    cfg: &DbConfig,
    wait_for: Option<u64>,
    catch_up: std::time::Duration,
) -> Result<(u64, std::time::Duration), MigrateError> {
    let mut c = pg_conn(cfg).await?;
    let r = c.promote(wait_for, catch_up).await;
    c.close().await;
    r
}

async fn pg_conn(cfg: &DbConfig) -> Result<Conn, MigrateError> {
    if cfg.driver != super::config::Driver::Postgres {
        return Err(MigrateError::Config(format!(
            "{}: only PostgreSQL databases are fenced and promoted",
            cfg.app
        )));
    }
    Conn::connect(cfg, Access::ReadWrite)
        .await?
        .ok_or_else(|| MigrateError::Config("no database".into()))
}

/// The server's replication state (`None` for SQLite). Changes nothing.
pub async fn replication(cfg: &DbConfig) -> Result<Option<Replication>, MigrateError> {
    match Conn::connect(cfg, Access::ReadOnly).await? {
        None => Ok(None),
        Some(mut c) => {
            let r = c.replication().await;
            c.close().await;
            r
        }
    }
}

/// Where the database stands against `source`. Changes nothing (a SQLite
/// file that does not exist is an empty database, and is not created).
pub async fn status(cfg: &DbConfig, source: &MigrationSource) -> Result<MigrationStatus, MigrateError> {
    let rows = match Conn::connect(cfg, Access::ReadOnly).await? {
        None => Vec::new(),
        Some(mut c) => {
            let r = c.applied().await;
            c.close().await;
            r?
        }
    };
    Ok(compute_status(&rows, source))
}

/// What [`up`] (`Direction::Up`) or [`down`] would run, migration by
/// migration and statement by statement, with the same refusals; changes
/// nothing.
pub async fn plan(
    cfg: &DbConfig,
    source: &MigrationSource,
    target: Option<i64>,
    direction: Direction,
) -> Result<Plan, MigrateError> {
    check_target(source, direction, target)?;
    let st = status(cfg, source).await?;
    preflight(&st)?;
    let steps = plan_steps(source, &st, direction, target)?;
    Ok(Plan {
        direction,
        target,
        applied: st.applied_versions(),
        steps,
    })
}

/// Applies pending migrations up to `target` (all if none), then runs
/// `checks` (queries that must each return one row with one `true`); on
/// any failure undoes the run (see [`Outcome`]). `Err` means nothing was
/// changed (refused in pre-flight, lock not acquired, backup failed); a run
/// that started always ends in `Ok(report)`, whose `outcome` says how.
pub async fn up(
    cfg: &DbConfig,
    source: &MigrationSource,
    target: Option<i64>,
    checks: &[String],
    observer: &dyn RunObserver,
) -> Result<RunReport, MigrateError> {
    run(cfg, source, Direction::Up, target, checks, observer).await
}

/// Reverts applied migrations above `target`, newest first (`Some(0)`:
/// all; `None`: only the newest). Refuses up front if one of them has no
/// down migration. Failures are undone as in [`up`].
pub async fn down(
    cfg: &DbConfig,
    source: &MigrationSource,
    target: Option<i64>,
    observer: &dyn RunObserver,
) -> Result<RunReport, MigrateError> {
    run(cfg, source, Direction::Down, target, &[], observer).await
}

/// Restores a backup taken by a run over the database, under the
/// migration lock; checks the file's SHA-256 first and the applied
/// versions after.
pub async fn restore(cfg: &DbConfig, backup: &BackupInfo) -> Result<(), MigrateError> {
    if !cfg.primary {
        return Err(MigrateError::NotPrimary);
    }
    backup::verify(backup)?;
    let _file_lock = lock_file(cfg).await?;
    let mut conn = connect_rw(cfg).await?;
    if let Err(e) = conn.lock(cfg.lock_timeout).await {
        conn.close().await;
        return Err(e);
    }
    let mut conn = backup::restore_into(cfg, conn, backup).await?;
    conn.unlock().await;
    conn.close().await;
    tracing::info!(app = %cfg.app, backup = %backup.path.display(), "database restored from a backup");
    Ok(())
}

async fn lock_file(cfg: &DbConfig) -> Result<Option<backup::FileLock>, MigrateError> {
    Ok(match cfg.driver {
        super::Driver::Sqlite => Some(backup::lock_sqlite(cfg).await?),
        super::Driver::Postgres => None,
    })
}

async fn connect_rw(cfg: &DbConfig) -> Result<Conn, MigrateError> {
    Conn::connect(cfg, Access::ReadWrite)
        .await?
        .ok_or_else(|| MigrateError::Database("the database did not open".into()))
}

fn record(cfg: &DbConfig, direction: Direction, ok: bool, secs: f64) {
    metrics::histogram!(
        "cutover_migration_seconds",
        "app" => cfg.app.clone(),
        "driver" => cfg.driver.as_str(),
        "direction" => direction.to_string(),
        "result" => if ok { "ok" } else { "error" },
    )
    .record(secs);
}

async fn run(
    cfg: &DbConfig,
    source: &MigrationSource,
    direction: Direction,
    target: Option<i64>,
    checks: &[String],
    obs: &dyn RunObserver,
) -> Result<RunReport, MigrateError> {
    if !cfg.primary {
        return Err(MigrateError::NotPrimary);
    }
    check_target(source, direction, target)?;
    let _file_lock = lock_file(cfg).await?;
    let mut conn = connect_rw(cfg).await?;
    if let Err(e) = conn.lock(cfg.lock_timeout).await {
        conn.close().await;
        return Err(e);
    }
    obs.on_event(&RunEvent::LockAcquired);
    let mut slot = Some(conn);
    let result = run_locked(cfg, source, direction, target, checks, obs, &mut slot).await;
    if let Some(mut c) = slot {
        c.unlock().await;
        c.close().await;
    }
    if let Ok(r) = &result {
        metrics::counter!(
            "cutover_migration_runs_total",
            "app" => cfg.app.clone(),
            "direction" => direction.to_string(),
            "outcome" => r.outcome.as_str(),
        )
        .increment(1);
        match &r.error {
            None => tracing::info!(app = %cfg.app, %direction, steps = r.applied.len(), "migrations applied"),
            Some(e) => tracing::warn!(app = %cfg.app, %direction, outcome = ?r.outcome, "migration run failed: {e}"),
        }
    }
    result
}

async fn run_locked(
    cfg: &DbConfig,
    source: &MigrationSource,
    direction: Direction,
    target: Option<i64>,
    checks: &[String],
    obs: &dyn RunObserver,
    slot: &mut Option<Conn>,
) -> Result<RunReport, MigrateError> {
    let conn = slot.as_mut().expect("connected");
    // sqlx would create it on its first run too; creating it before the
    // backup keeps a restore exact.
    conn.ensure_table().await?;
    let st = compute_status(&conn.applied().await?, source);
    preflight(&st)?;
    let steps = plan_steps(source, &st, direction, target)?;
    let versions_before = st.applied_versions();
    let mut report = RunReport {
        direction,
        target,
        versions_before: versions_before.clone(),
        applied: Vec::new(),
        compensation: Vec::new(),
        backup: None,
        outcome: Outcome::Applied,
        error: None,
        versions_after: versions_before.clone(),
    };
    if steps.is_empty() {
        return Ok(report);
    }
    let backup = backup::take(cfg, conn, versions_before).await?;
    obs.on_event(&RunEvent::BackupTaken(&backup));
    report.backup = Some(backup.clone());

    // Forward.
    let mut failure: Option<String> = None;
    // A migration outside a transaction that failed may have done part of
    // its work, which no down migration knows how to undo.
    let mut partial = false;
    for step in &steps {
        let m = source.get(step.version).expect("planned from the source");
        let migration = match direction {
            Direction::Up => &m.up,
            Direction::Down => m.down.as_ref().expect("planned with a down"),
        };
        obs.on_event(&RunEvent::StepStarted {
            version: step.version,
            direction,
            compensating: false,
        });
        let t = Instant::now();
        let r = match direction {
            Direction::Up => conn.apply(migration).await,
            Direction::Down => conn.revert(migration).await,
        };
        record(cfg, direction, r.is_ok(), t.elapsed().as_secs_f64());
        match r {
            Ok(duration) => {
                let s = StepReport {
                    version: step.version,
                    description: step.description.clone(),
                    direction,
                    duration,
                };
                obs.on_event(&RunEvent::StepFinished {
                    step: &s,
                    compensating: false,
                });
                report.applied.push(s);
            }
            Err(e) => {
                obs.on_event(&RunEvent::StepFailed {
                    version: step.version,
                    direction,
                    error: &e,
                });
                failure = Some(format!(
                    "migration {} {direction} ({}) failed: {e}",
                    step.version, step.file
                ));
                partial = migration.no_tx;
                break;
            }
        }
    }
    if failure.is_none() {
        for check in checks {
            if let Err(e) = conn.check(check).await {
                obs.on_event(&RunEvent::CheckFailed { check, error: &e });
                failure = Some(format!("check {check:?} failed: {e}"));
                break;
            }
        }
    }
    let Some(error) = failure else {
        report.versions_after = applied_versions(slot, cfg).await;
        return Ok(report);
    };

    // Undo.
    obs.on_event(&RunEvent::Undoing { error: &error });
    let inverse = direction_inverse(direction);
    let mut undo_error = if partial {
        Some("the failed migration runs without a transaction, so its partial effects are unknown".to_owned())
    } else {
        None
    };
    if undo_error.is_none() {
        for done in report.applied.clone().iter().rev() {
            let m = source.get(done.version).expect("ran from the source");
            let migration = match inverse {
                Direction::Down => m.down.as_ref(),
                Direction::Up => Some(&m.up),
            };
            let Some(migration) = migration else {
                undo_error = Some(format!(
                    "migration {} ({}) has no down migration",
                    done.version, m.up_file
                ));
                break;
            };
            obs.on_event(&RunEvent::StepStarted {
                version: done.version,
                direction: inverse,
                compensating: true,
            });
            let t = Instant::now();
            let r = match inverse {
                Direction::Down => conn.revert(migration).await,
                Direction::Up => conn.apply(migration).await,
            };
            record(cfg, inverse, r.is_ok(), t.elapsed().as_secs_f64());
            match r {
                Ok(duration) => {
                    let s = StepReport {
                        version: done.version,
                        description: done.description.clone(),
                        direction: inverse,
                        duration,
                    };
                    obs.on_event(&RunEvent::StepFinished {
                        step: &s,
                        compensating: true,
                    });
                    report.compensation.push(s);
                }
                Err(e) => {
                    undo_error = Some(format!("undoing migration {} ({inverse}) failed: {e}", done.version));
                    break;
                }
            }
        }
    }
    match undo_error {
        None => {
            report.outcome = match direction {
                Direction::Up => Outcome::RolledBackByDowns,
                Direction::Down => Outcome::RolledBackByUps,
            };
            report.error = Some(error);
        }
        Some(undo) => {
            obs.on_event(&RunEvent::Restoring(&backup));
            let c = slot.take().expect("connected");
            match backup::restore_into(cfg, c, &backup).await {
                Ok(c) => {
                    *slot = Some(c);
                    obs.on_event(&RunEvent::Restored);
                    report.outcome = Outcome::RestoredFromBackup;
                    report.error = Some(format!("{error}; {undo}; restored the backup"));
                }
                Err(e) => {
                    report.outcome = Outcome::Unrecovered;
                    report.error = Some(format!(
                        "{error}; {undo}; restoring the backup {} failed too: {e}",
                        backup.path.display()
                    ));
                }
            }
        }
    }
    report.versions_after = applied_versions(slot, cfg).await;
    Ok(report)
}

fn direction_inverse(d: Direction) -> Direction {
    match d {
        Direction::Up => Direction::Down,
        Direction::Down => Direction::Up,
    }
}

/// The applied versions now, for the report: on the run's connection, or a
/// new one if a failed restore lost it (empty if that fails too).
async fn applied_versions(slot: &mut Option<Conn>, cfg: &DbConfig) -> Vec<i64> {
    let rows = match slot.as_mut() {
        Some(c) => c.applied().await,
        None => match Conn::connect(cfg, Access::ReadOnly).await {
            Ok(Some(mut c)) => {
                let r = c.applied().await;
                c.close().await;
                r
            }
            Ok(None) => Ok(Vec::new()),
            Err(e) => Err(e),
        },
    };
    rows.map(|r| r.iter().filter(|r| r.success).map(|r| r.version).collect())
        .unwrap_or_default()
}
