//! `dr.drill`: a failover rehearsal in this cluster that touches nothing in
//! production, measured.
//!
//! 1. **clone**: `pg_dump` of the app's database here (the region's
//!    streaming standby: a dump reads a snapshot and writes nothing) piped
//!    into `pg_restore` of a new scratch database on the cluster's scratch
//!    server (`scratch_url_file`; a primary's own server by default). The
//!    RPO is how far behind the primary the copy's data was: the standby's
//!    replay lag when the dump began (0 for a primary).
//! 2. **checks**: the app's `migration_checks` against the copy.
//! 3. **serve**: the release starts as the driver's scratch color, which no
//!    router or service sends traffic to.
//! 4. **gates**: the app's probes and load probe against the scratch color.
//!    The RTO is the time from the task's start to here, gates passed.
//! 5. **teardown**: whatever happened above, the scratch color stops and
//!    the scratch database is dropped.
//!
//! One task does all of it, so no interruption can leave a half-built
//! drill for another step to find; a crash mid-drill leaves at most a
//! scratch database named `<app>_drill_*` and a process the driver's state
//! records.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cutover_shared::app::validate_image_ref;
use cutover_shared::config::{DatabaseConfig, DbDriver};
use cutover_shared::domain::{TaskSpec, now_unix_ms};
use cutover_shared::dr::{DbRole, human_ms};
use cutover_shared::task::outputs::DrillOutputs;
use cutover_shared::task::{self, TaskParams};

use crate::app_tasks::AppRuntime;
use crate::gates;
use crate::migrate::{self, DbConfig, DbUrl};

/// Why a drill failed: the phase (the report's verdict) and what happened.
struct Failed {
    verdict: &'static str,
    message: String,
}

fn failed(verdict: &'static str, message: impl Into<String>) -> Failed {
    Failed {
        verdict,
        message: message.into(),
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Runs one drill; the outputs are filled whatever happens.
pub async fn run(
    apps: &Arc<AppRuntime>,
    backups: &crate::backup::task::BackupRuntime,
    db: Option<&DatabaseConfig>,
    data_dir: &std::path::Path,
    task: &TaskSpec,
    progress: &(dyn Fn(String) + Send + Sync),
    out: &mut DrillOutputs,
) -> Result<String, String> {
    let started = Instant::now();
    let (app, image, restore) = match TaskParams::from_wire(&task.kind, &task.params) {
        Ok(TaskParams::DrDrill { app, image, restore }) => (app.app, image, restore),
        Ok(other) => return Err(format!("{} is not a drill task", other.kind())),
        Err(e) => return Err(e.to_string()),
    };
    out.verdict = "error".into();
    let spec = task::attached_spec(&task.params).map_err(|e| format!("task has no valid app spec: {e}"))?;
    spec.validate().map_err(|e| e.to_string())?;
    validate_image_ref(&image).map_err(|e| e.to_string())?;
    let db = db.ok_or_else(|| {
        format!(
            "no database is configured for app {app} on {} (add a [[databases]] entry to the agent's config)",
            task.target
        )
    })?;
    if db.driver != DbDriver::Postgres {
        return Err(format!(
            "drills need PostgreSQL; {app}'s database here is {:?}",
            db.driver
        ));
    }
    let source = migrate::resolve(db, data_dir).map_err(|e| e.to_string())?;
    let scratch_server = scratch_server(db, &source)?;
    let driver = apps.driver(&spec).await.map_err(|e| e.to_string())?;
    let name = crate::backup::task::scratch_name(&app, "drill", &task.task_id);

    let mut phase_started = Instant::now();
    let mut phase = |out: &mut DrillOutputs, name: &str| {
        out.phase_ms.insert(name.to_owned(), ms(phase_started.elapsed()));
        phase_started = Instant::now();
    };
    let result = async {
        // clone: the newest validated backup when the coordinator named
        // one (this cluster has a cold standby, not a copy of the app's
        // data), else this cluster's own database.
        if let Some(r) = &restore {
            out.source = "backup".into();
            out.rpo_ms = Some(u64::try_from(now_unix_ms().saturating_sub(r.taken_at_unix_ms)).unwrap_or(0));
            progress(format!(
                "restoring backup {} into scratch database {name} (its data {} old)",
                r.backup_id,
                human_ms(out.rpo_ms.unwrap_or(0))
            ));
            let _ = migrate::drop_database(&scratch_server, &name).await;
            backups
                .restore_into(&scratch_server, &r.object, &name)
                .await
                .map_err(|e| failed("clone", e.to_string()))?;
        } else {
            let observed = crate::dr::observe(db, data_dir).await;
            let role = observed.role.unwrap_or(db.role());
            out.source = role.as_str().to_owned();
            out.rpo_ms = Some(if role == DbRole::Standby {
                observed.lag_ms.unwrap_or(0)
            } else {
                0
            });
            progress(format!(
                "cloning {app}'s {role} into scratch database {name} (its data {} behind the primary)",
                human_ms(out.rpo_ms.unwrap_or(0))
            ));
            // A copy left by a crashed drill of the same task goes first.
            let _ = migrate::drop_database(&scratch_server, &name).await;
            clone(&source, &scratch_server, &name)
                .await
                .map_err(|e| failed("clone", e))?;
        }
        phase(out, "clone");
        // checks
        let copy = DbConfig {
            url: migrate::database_url(&scratch_server, &name).map_err(|e| failed("clone", e.to_string()))?,
            ..scratch_server.clone()
        };
        progress(format!("running {} check(s) on the copy", spec.migration_checks.len()));
        migrate::run_checks(&copy, &spec.migration_checks)
            .await
            .map_err(|e| failed("checks", e))?;
        phase(out, "checks");
        // serve
        let addr = driver
            .start_scratch(&image, progress)
            .await
            .map_err(|e| failed("serve", e.message))?;
        phase(out, "serve");
        // gates
        progress(format!("running the gates against the scratch color on {addr}"));
        let report = gates::run_gates(&spec, &addr).await;
        phase(out, "gates");
        if !report.passed {
            return Err(failed("gates", format!("gates failed\n  {}", report.lines())));
        }
        out.rto_ms = Some(ms(started.elapsed()));
        Ok(report.lines())
    }
    .await;
    // teardown, whatever happened
    let mut teardown = Vec::new();
    if let Err(e) = driver.stop_scratch().await {
        teardown.push(format!("the scratch color could not be stopped: {}", e.message));
    }
    if let Err(e) = migrate::drop_database(&scratch_server, &name).await {
        teardown.push(format!("scratch database {name} could not be dropped: {e}"));
    }
    phase(out, "teardown");
    let teardown = if teardown.is_empty() {
        String::new()
    } else {
        format!("; {}", teardown.join("; "))
    };
    match result {
        Ok(lines) => {
            out.verdict = "passed".into();
            Ok(format!(
                "drill into {} passed: RTO {}, RPO {} ({} copied from the {}, {image} served it){teardown}\n  {lines}",
                task.target,
                human_ms(out.rto_ms.unwrap_or(0)),
                human_ms(out.rpo_ms.unwrap_or(0)),
                app,
                out.source,
            ))
        }
        Err(f) => {
            out.verdict = f.verdict.into();
            Err(format!(
                "drill into {} failed at {}: {}{teardown}",
                task.target, f.verdict, f.message
            ))
        }
    }
}

/// The server the scratch copy goes to: the configured scratch server, or
/// a primary's own server. A standby has no writable server of its own.
fn scratch_server(db: &DatabaseConfig, source: &DbConfig) -> Result<DbConfig, String> {
    let url = match (&db.scratch_url_file, &db.scratch_url_env) {
        (Some(f), _) => DbUrl::from_file(f).map_err(|e| e.to_string())?,
        (None, Some(v)) => DbUrl::from_env(v).map_err(|e| e.to_string())?,
        (None, None) if db.is_primary() => return Ok(source.clone()),
        (None, None) => {
            return Err(format!(
                "{}'s database here is a standby, which cannot hold a scratch copy; set scratch_url_file (or \
                 scratch_url_env) in its [[databases]] entry to a writable server in this cluster",
                db.app
            ));
        }
    };
    Ok(DbConfig {
        url,
        primary: true,
        ..source.clone()
    })
}

/// `pg_dump` of `source` into `pg_restore` of a new database `name` on
/// `server`, in one transaction: a failure leaves no database behind.
async fn clone(source: &DbConfig, server: &DbConfig, name: &str) -> Result<(), String> {
    migrate::create_database(server, name)
        .await
        .map_err(|e| e.to_string())?;
    let piped = async {
        let (mut dump, dump_pass) = migrate::pg_tool_command(source, "pg_dump", None)
            .await
            .map_err(|e| e.to_string())?;
        let (mut restore, restore_pass) = migrate::pg_tool_command(server, "pg_restore", Some(name))
            .await
            .map_err(|e| e.to_string())?;
        dump.arg("--format=custom")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        restore
            .arg("--no-owner")
            .arg("--exit-on-error")
            .arg("--single-transaction")
            .arg(format!("--dbname={name}"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let (source_url, server_url) = (source.url.clone(), server.url.clone());
        tokio::task::spawn_blocking(move || -> Result<(), String> {
            let _passes = (dump_pass, restore_pass);
            let mut d = dump.spawn().map_err(|e| format!("cannot start pg_dump: {e}"))?;
            let stdout = d.stdout.take().expect("piped");
            let r = restore
                .stdin(Stdio::from(stdout))
                .spawn()
                .map_err(|e| format!("cannot start pg_restore: {e}"));
            let r = match r {
                Ok(r) => r,
                Err(e) => {
                    let _ = d.kill();
                    let _ = d.wait();
                    return Err(e);
                }
            };
            let r = r.wait_with_output().map_err(|e| e.to_string())?;
            let d = d.wait_with_output().map_err(|e| e.to_string())?;
            if !d.status.success() {
                return Err(migrate::redact(
                    &source_url,
                    &format!(
                        "pg_dump failed ({}): {}",
                        d.status,
                        String::from_utf8_lossy(&d.stderr).trim()
                    ),
                ));
            }
            if !r.status.success() {
                return Err(migrate::redact(
                    &server_url,
                    &format!(
                        "pg_restore failed ({}): {}",
                        r.status,
                        String::from_utf8_lossy(&r.stderr).trim()
                    ),
                ));
            }
            Ok(())
        })
        .await
        .map_err(|e| e.to_string())?
    }
    .await;
    if piped.is_err() {
        let _ = migrate::drop_database(server, name).await;
    }
    piped
}
