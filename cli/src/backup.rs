//! `cutover backup …`: backups of an app's databases to the agents' object
//! stores, the catalog the coordinators keep, and validation and restore
//! (the seed's `backup`, `list-backups`, `validate-backup --backup-name`
//! and `restore --backup-name`).

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Subcommand, ValueEnum};
use cutover_shared::proto as pb;
use serde_json::json;

use crate::client::{ConnOpts, Output, call};
use crate::migrate::{finished_operation, results};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RestoreTo {
    /// A new database next to the primary's, kept for you to inspect.
    Scratch,
    /// The primary itself (its data is replaced; needs --confirm).
    Primary,
}

#[derive(Subcommand)]
pub enum BackupCmd {
    /// Back up the app's database in a region (default: every region).
    Create {
        #[arg(long)]
        app: String,
        #[arg(long)]
        region: Option<String>,
        /// Print the operation id and return at once.
        #[arg(long)]
        detach: bool,
    },
    /// The catalog, newest first.
    #[command(visible_alias = "ls")]
    List {
        #[arg(long)]
        app: Option<String>,
        #[arg(long)]
        region: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// One backup, with its validations.
    Get { id: String },
    /// Prove a backup restorable: download, check, restore into a scratch
    /// database, run the app's checks and compare row counts, drop it.
    Validate {
        id: String,
        #[arg(long)]
        detach: bool,
    },
    /// Restore a backup.
    Restore {
        id: String,
        #[arg(long, value_enum, default_value_t = RestoreTo::Scratch)]
        to: RestoreTo,
        /// Required with --to primary: its data is replaced (the app is in
        /// maintenance meanwhile, and a safety backup is taken first).
        #[arg(long)]
        confirm: bool,
        #[arg(long)]
        detach: bool,
    },
    /// Delete a backup's object and its catalog entry (audited). Refused
    /// while the object is under Object Lock.
    Delete {
        id: String,
        /// Also delete the newest backup of its app and cluster that passed
        /// validation.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        detach: bool,
    },
    /// Scheduled backups and their retention.
    Schedule {
        #[command(subcommand)]
        cmd: ScheduleCmd,
    },
}

#[derive(Subcommand)]
pub enum ScheduleCmd {
    /// Set (create or replace) an app's schedule.
    Set {
        #[arg(long)]
        app: String,
        /// Default: every region the app runs in.
        #[arg(long)]
        region: Option<String>,
        /// UTC; five fields (minute hour day month weekday), e.g. "0 3 * * *".
        #[arg(long)]
        cron: String,
        /// The newest backup of each of the last N days, weeks, months is kept.
        #[arg(long, default_value = "daily=30")]
        retention: String,
        /// Validate each scheduled backup by restore once it is taken.
        #[arg(long)]
        validate: bool,
    },
    /// Every schedule, with its next slot.
    #[command(visible_alias = "ls")]
    List,
    /// Remove an app's schedule (its backups stay).
    Delete {
        #[arg(long)]
        app: String,
    },
}

fn schedule_json(s: &pb::BackupSchedule) -> serde_json::Value {
    json!({
        "app": s.app, "region": (!s.region.is_empty()).then_some(&s.region), "cron": s.cron,
        "retention": s.retention, "validate": s.validate, "updated_by": s.updated_by,
        "updated_at_unix_ms": s.updated_at_unix_ms, "last_slot_unix_ms": s.last_slot_unix_ms,
        "next_slot_unix_ms": s.next_slot_unix_ms,
    })
}

fn print_schedule(s: &pb::BackupSchedule) {
    println!(
        "{:<20} {:<10} {:<16} {:<32} {:<9} next {}",
        s.app,
        if s.region.is_empty() { "all" } else { &s.region },
        s.cron,
        s.retention,
        if s.validate { "validate" } else { "-" },
        time(s.next_slot_unix_ms)
    );
}

async fn run_schedule(cmd: ScheduleCmd, conn: ConnOpts) -> Result<ExitCode> {
    match cmd {
        ScheduleCmd::Set {
            app,
            region,
            cron,
            retention,
            validate,
        } => {
            let req = pb::SetBackupScheduleRequest {
                app,
                region: region.unwrap_or_default(),
                cron,
                retention,
                validate,
            };
            let s = call(&conn, |mut c| {
                let req = req.clone();
                async move { c.set_backup_schedule(req).await }
            })
            .await?
            .schedule
            .context("the coordinator returned no schedule")?;
            if conn.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&schedule_json(&s))?);
            } else {
                print_schedule(&s);
            }
        }
        ScheduleCmd::List => {
            let list = call(&conn, |mut c| async move {
                c.list_backup_schedules(pb::ListBackupSchedulesRequest {}).await
            })
            .await?
            .schedules;
            if conn.output == Output::Json {
                let v: Vec<serde_json::Value> = list.iter().map(schedule_json).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if list.is_empty() {
                println!("no backup schedules");
            } else {
                println!(
                    "{:<20} {:<10} {:<16} {:<32} {:<9} NEXT",
                    "APP", "REGION", "CRON", "RETENTION", "VALIDATE"
                );
                for s in &list {
                    print_schedule(s);
                }
            }
        }
        ScheduleCmd::Delete { app } => {
            call(&conn, |mut c| {
                let app = app.clone();
                async move { c.delete_backup_schedule(pb::DeleteBackupScheduleRequest { app }).await }
            })
            .await?;
            if conn.output == Output::Json {
                println!("{}", json!({ "deleted": app }));
            } else {
                println!("schedule of {app} deleted; its backups stay");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn time(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second]Z"
            ))
            .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

fn size(n: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    if n as f64 >= MIB {
        format!("{:.1} MiB", n as f64 / MIB)
    } else if n >= 1024 {
        format!("{:.1} KiB", n as f64 / 1024.0)
    } else {
        format!("{n} B")
    }
}

fn validation_word(b: &pb::Backup) -> String {
    match b.validations.last() {
        None => "not validated".into(),
        Some(v) if v.passed => format!("validated {}", time(v.at_unix_ms)),
        Some(v) => format!("FAILED {} ({})", v.verdict, time(v.at_unix_ms)),
    }
}

pub(crate) fn backup_json(b: &pb::Backup) -> serde_json::Value {
    json!({
        "id": b.id, "app": b.app, "region": b.region, "cluster": b.cluster, "database": b.database,
        "engine": b.engine, "object_key": b.object_key, "version_id": b.version_id,
        "size_bytes": b.size_bytes, "sha256": b.sha256, "key_id": b.key_id, "dump_bytes": b.dump_bytes,
        "migration_version": b.migration_version,
        "table_rows": b.table_rows.iter().collect::<std::collections::BTreeMap<_, _>>(),
        "started_at_unix_ms": b.started_at_unix_ms, "finished_at_unix_ms": b.finished_at_unix_ms,
        "requested_by": b.requested_by, "operation_id": b.operation_id, "trigger": b.trigger,
        "retain_until_unix_ms": b.retain_until_unix_ms,
        "validations": b.validations.iter().map(|v| json!({
            "operation_id": v.operation_id, "at_unix_ms": v.at_unix_ms, "passed": v.passed,
            "verdict": v.verdict, "message": v.message, "duration_ms": v.duration_ms,
        })).collect::<Vec<_>>(),
    })
}

/// Follows a backup operation and prints each cluster's outcome.
async fn follow(conn: &ConnOpts, id: &str, detach: bool) -> Result<ExitCode> {
    if detach {
        if conn.output == Output::Json {
            println!("{}", json!({ "operation_id": id }));
        } else {
            println!("{id}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let op = finished_operation(conn, id).await?;
    let succeeded = op.state == pb::TaskState::Succeeded as i32;
    let results = results(&op);
    if conn.output == Output::Json {
        let v = json!({
            "operation_id": op.id, "ok": succeeded, "summary": op.summary,
            "clusters": results.iter().map(|r| json!({
                "cluster": r.target, "ok": r.ok, "message": r.message,
                "outputs": r.outputs.iter().collect::<std::collections::BTreeMap<_, _>>(),
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for r in &results {
            println!("{} {}: {}", if r.ok { "ok" } else { "FAILED" }, r.target, r.message);
        }
        println!("operation {id}: {}", if succeeded { "succeeded" } else { "failed" });
    }
    Ok(if succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub async fn run(cmd: BackupCmd, conn: ConnOpts) -> Result<ExitCode> {
    match cmd {
        BackupCmd::Schedule { cmd } => run_schedule(cmd, conn).await,
        BackupCmd::Create { app, region, detach } => {
            let req = pb::CreateBackupRequest {
                app,
                region: region.unwrap_or_default(),
            };
            let id = call(&conn, |mut c| {
                let req = req.clone();
                async move { c.create_backup(req).await }
            })
            .await?
            .operation_id;
            follow(&conn, &id, detach).await
        }
        BackupCmd::List { app, region, limit } => {
            let req = pb::ListBackupsRequest {
                app: app.unwrap_or_default(),
                region: region.unwrap_or_default(),
                limit,
            };
            let list = call(&conn, |mut c| {
                let req = req.clone();
                async move { c.list_backups(req).await }
            })
            .await?
            .backups;
            if conn.output == Output::Json {
                let v: Vec<serde_json::Value> = list.iter().map(backup_json).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if list.is_empty() {
                println!("no backups");
            } else {
                println!(
                    "{:<52} {:<21} {:>10} {:>8}  {:<10} VALIDATION",
                    "ID", "TAKEN", "SIZE", "SCHEMA", "TRIGGER"
                );
                for b in &list {
                    println!(
                        "{:<52} {:<21} {:>10} {:>8}  {:<10} {}",
                        b.id,
                        time(b.finished_at_unix_ms),
                        size(b.size_bytes),
                        b.migration_version,
                        b.trigger,
                        validation_word(b)
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        BackupCmd::Get { id } => {
            let b = call(&conn, |mut c| {
                let id = id.clone();
                async move { c.get_backup(pb::GetBackupRequest { id }).await }
            })
            .await?
            .backup
            .context("the coordinator returned no backup")?;
            if conn.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&backup_json(&b))?);
                return Ok(ExitCode::SUCCESS);
            }
            println!("backup {}", b.id);
            println!(
                "  app {} in {}/{}, database {} ({})",
                b.app, b.region, b.cluster, b.database, b.engine
            );
            println!(
                "  taken {} to {} by {} ({}, operation {})",
                time(b.started_at_unix_ms),
                time(b.finished_at_unix_ms),
                b.requested_by,
                b.trigger,
                b.operation_id
            );
            println!(
                "  object {} version {} ({} stored, {} dumped, key {})",
                b.object_key,
                if b.version_id.is_empty() { "-" } else { &b.version_id },
                size(b.size_bytes),
                size(b.dump_bytes),
                b.key_id
            );
            println!("  sha256 {}", b.sha256);
            if b.retain_until_unix_ms > 0 {
                println!("  under Object Lock until {}", time(b.retain_until_unix_ms));
            }
            println!("  schema at migration {}", b.migration_version);
            let mut tables: Vec<_> = b.table_rows.iter().collect();
            tables.sort();
            for (t, n) in tables {
                println!("    {t}: {n} rows");
            }
            if b.validations.is_empty() {
                println!("  not validated yet (cutover backup validate {})", b.id);
            }
            for v in &b.validations {
                println!(
                    "  validation {} {}: {} in {} ms: {}",
                    time(v.at_unix_ms),
                    if v.passed { "passed" } else { "FAILED" },
                    v.verdict,
                    v.duration_ms,
                    v.message
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        BackupCmd::Validate { id, detach } => {
            let op = call(&conn, |mut c| {
                let id = id.clone();
                async move { c.validate_backup(pb::ValidateBackupRequest { id }).await }
            })
            .await?
            .operation_id;
            follow(&conn, &op, detach).await
        }
        BackupCmd::Delete { id, force, detach } => {
            let op = call(&conn, |mut c| {
                let id = id.clone();
                async move { c.delete_backup(pb::DeleteBackupRequest { id, force }).await }
            })
            .await?
            .operation_id;
            follow(&conn, &op, detach).await
        }
        BackupCmd::Restore {
            id,
            to,
            confirm,
            detach,
        } => {
            let to = match to {
                RestoreTo::Scratch => pb::RestoreTarget::Scratch,
                RestoreTo::Primary => pb::RestoreTarget::Primary,
            };
            let op = call(&conn, |mut c| {
                let req = pb::RestoreBackupRequest {
                    id: id.clone(),
                    to: to as i32,
                    confirm,
                };
                async move { c.restore_backup(req).await }
            })
            .await?
            .operation_id;
            follow(&conn, &op, detach).await
        }
    }
}
