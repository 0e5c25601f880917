//! `cutover dr …`: an app's disaster-recovery posture (`status`), the
//! failover runbook computed from the live state (`plan`), the failover
//! itself (`failover`), and drills that rehearse it on a scratch copy
//! (`drill`, `drills list`).

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Subcommand;
use cutover_shared::dr::{format_lsn, human_ms};
use cutover_shared::proto as pb;
use serde_json::json;

use crate::backup::{backup_json, time};
use crate::client::{ConnOpts, Output, call};

/// Exit status of `dr plan` when something blocks the failover.
const BLOCKED: u8 = 2;

#[derive(Subcommand)]
pub enum DrCmd {
    /// Per cluster: the agent, the database's role, WAL position and lag,
    /// and the newest backups.
    Status {
        #[arg(long)]
        app: String,
    },
    /// The failover runbook from the live state: the cluster that would
    /// take over, the data-loss window it would accept now, the steps, and
    /// what blocks it. Changes nothing. Exits 2 when something blocks it.
    Plan {
        #[arg(long)]
        app: String,
        /// The region to fail over to (default: the reachable standby with
        /// the least lag).
        #[arg(long)]
        to: Option<String>,
    },
    /// Fail the app over: commit a new primary epoch, fence the old
    /// primary (app in maintenance, database read-only), promote the
    /// standby once it replayed the old primary's last write, run the
    /// gates there. Refused, changing nothing, while `dr plan` shows a
    /// blocker the flags do not override.
    Failover {
        #[arg(long)]
        app: String,
        /// The region to fail over to (default: the plan's choice).
        #[arg(long)]
        to: Option<String>,
        /// Proceed although the old primary's agent is down (it is
        /// superseded by the new epoch instead of fenced).
        #[arg(long)]
        force: bool,
        /// Proceed although the data-loss window is over the app's
        /// max_data_loss.
        #[arg(long)]
        accept_data_loss: bool,
        /// Then rebuild the old primary as a standby of the new one
        /// (needs its agent's [databases.server]).
        #[arg(long)]
        rejoin: bool,
        /// Print the operation id and return at once.
        #[arg(long)]
        detach: bool,
    },
    /// Rebuild a region's superseded primary (fenced after a failover) as
    /// a streaming standby of the current primary: its agent stops the
    /// server, rewinds it with pg_rewind (or takes a fresh base backup)
    /// and starts it replicating; then its app takes traffic again.
    Rejoin {
        #[arg(long)]
        app: String,
        #[arg(long)]
        region: String,
        /// Print the operation id and return at once.
        #[arg(long)]
        detach: bool,
    },
    /// A planned failover back to the region whose agent is configured
    /// with the primary (`role = "primary"`), rejoining the region it
    /// leaves as a standby: both regions end as they started.
    Failback {
        #[arg(long)]
        app: String,
        /// Print the operation id and return at once.
        #[arg(long)]
        detach: bool,
    },
    /// Rehearse a failover without touching production: clone the
    /// database (the region's standby) into a scratch database there,
    /// start the serving release as a scratch color that takes no traffic,
    /// run the gates against it, report RTO and RPO, tear it all down.
    /// `drill schedule` and `drill unschedule` manage recurring drills.
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Drill {
        #[command(subcommand)]
        schedule: Option<DrillScheduleCmd>,
        #[arg(long, required = true)]
        app: Option<String>,
        /// The region to rehearse in (default: where a failover would go).
        #[arg(long)]
        to: Option<String>,
        /// Print the operation id and return at once.
        #[arg(long)]
        detach: bool,
    },
    /// Drill reports.
    Drills {
        #[command(subcommand)]
        cmd: DrillsCmd,
    },
}

#[derive(Subcommand)]
pub enum DrillScheduleCmd {
    /// Drill the app at every slot of a cron schedule, each slot exactly
    /// once whichever coordinator leads. Replaces its schedule.
    Schedule {
        #[arg(long)]
        app: String,
        /// Five fields (minute hour day month weekday), or six with
        /// seconds first; UTC. E.g. "0 4 * * 1" (Mondays 04:00).
        #[arg(long)]
        cron: String,
        /// The region to drill into (default: where a failover would go
        /// at each slot).
        #[arg(long)]
        to: Option<String>,
    },
    /// Stop drilling the app on a schedule (its reports stay).
    Unschedule {
        #[arg(long)]
        app: String,
    },
}

#[derive(Subcommand)]
pub enum DrillsCmd {
    /// An app's drill reports, newest first.
    List {
        #[arg(long)]
        app: String,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
}

pub(crate) fn drill_json(d: &pb::DrillReport) -> serde_json::Value {
    json!({
        "operation_id": d.operation_id, "app": d.app, "region": d.region, "cluster": d.cluster,
        "passed": d.passed, "verdict": d.verdict, "message": d.message, "source": d.source,
        "started_at_unix_ms": d.started_at_unix_ms, "finished_at_unix_ms": d.finished_at_unix_ms,
        "rto_ms": d.rto_ms, "rpo_ms": d.rpo_ms, "phase_ms": d.phase_ms, "image": d.image,
        "requested_by": d.requested_by,
    })
}

/// `passed: RTO 3.1 s, RPO 0 ms` or `FAILED at gates`.
fn drill_line(d: &pb::DrillReport) -> String {
    if d.passed {
        format!(
            "passed: RTO {}, RPO {}",
            d.rto_ms.map_or_else(|| "?".into(), human_ms),
            d.rpo_ms.map_or_else(|| "?".into(), human_ms)
        )
    } else {
        format!("FAILED at {}", d.verdict)
    }
}

fn drill_schedule_json(s: &pb::DrillSchedule) -> serde_json::Value {
    json!({
        "app": s.app, "region": (!s.region.is_empty()).then_some(&s.region), "cron": s.cron,
        "updated_by": s.updated_by, "updated_at_unix_ms": s.updated_at_unix_ms,
        "last_slot_unix_ms": s.last_slot_unix_ms, "next_slot_unix_ms": s.next_slot_unix_ms,
    })
}

fn drill_schedule_line(s: &pb::DrillSchedule) -> String {
    format!(
        "schedule: {:?} into {}, next {} (set by {})",
        s.cron,
        if s.region.is_empty() {
            "the failover target"
        } else {
            &s.region
        },
        if s.next_slot_unix_ms > 0 {
            time(s.next_slot_unix_ms)
        } else {
            "-".into()
        },
        s.updated_by
    )
}

async fn schedule_drills(cmd: DrillScheduleCmd, conn: &ConnOpts) -> Result<ExitCode> {
    match cmd {
        DrillScheduleCmd::Schedule { app, cron, to } => {
            let req = pb::SetDrillScheduleRequest {
                app,
                region: to.unwrap_or_default(),
                cron,
            };
            let s = call(conn, |mut c| {
                let req = req.clone();
                async move { c.set_drill_schedule(req).await }
            })
            .await?
            .schedule
            .context("the coordinator answered without the schedule")?;
            if conn.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&drill_schedule_json(&s))?);
            } else {
                println!("{}", drill_schedule_line(&s));
            }
        }
        DrillScheduleCmd::Unschedule { app } => {
            call(conn, |mut c| {
                let app = app.clone();
                async move { c.delete_drill_schedule(pb::DeleteDrillScheduleRequest { app }).await }
            })
            .await?;
            if conn.output == Output::Text {
                println!("{app}: no drill schedule");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Waits for operation `id` and prints its outcome (`extra` joins the
/// JSON form); fails the command when the operation failed.
async fn wait_and_print(conn: &ConnOpts, id: &str, extra: serde_json::Value) -> Result<ExitCode> {
    let op = crate::migrate::finished_operation(conn, id).await?;
    let ok = op.state == pb::TaskState::Succeeded as i32;
    if conn.output == Output::Json {
        let mut v = json!({ "operation_id": id, "ok": ok, "summary": op.summary });
        if let (Some(v), serde_json::Value::Object(extra)) = (v.as_object_mut(), extra) {
            v.extend(extra);
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{}: {}", if ok { "succeeded" } else { "FAILED" }, op.summary);
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn role_word(r: i32) -> &'static str {
    match pb::DatabaseRole::try_from(r) {
        Ok(pb::DatabaseRole::Primary) => "primary",
        Ok(pb::DatabaseRole::Standby) => "standby",
        _ => "unknown",
    }
}

fn database_json(d: &pb::DatabaseStatus) -> serde_json::Value {
    json!({
        "app": d.app, "driver": d.driver,
        "configured_role": role_word(d.configured_role), "role": role_word(d.role),
        "follows": (!d.follows.is_empty()).then_some(&d.follows),
        "lsn": d.lsn.map(format_lsn), "receive_lsn": d.receive_lsn.map(format_lsn),
        "lag_ms": d.lag_ms, "error": (!d.error.is_empty()).then_some(&d.error), "fenced": d.fenced,
        "observed_at_unix_ms": d.observed_at_unix_ms, "streaming": d.streaming,
        "unreachable_since_unix_ms": (d.unreachable_since_unix_ms > 0).then_some(d.unreachable_since_unix_ms),
    })
}

pub async fn run(cmd: DrCmd, conn: ConnOpts) -> Result<ExitCode> {
    run_cmd(cmd, conn).await
}

async fn run_cmd(cmd: DrCmd, conn: ConnOpts) -> Result<ExitCode> {
    match cmd {
        DrCmd::Rejoin { app, region, detach } => {
            let req = pb::RejoinRequest { app, region };
            let id = call(&conn, |mut c| {
                let req = req.clone();
                async move { c.rejoin(req).await }
            })
            .await?
            .operation_id;
            if detach || conn.output == Output::Text {
                println!(
                    "{}",
                    if detach {
                        id.clone()
                    } else {
                        format!("rejoin {id} started")
                    }
                );
            }
            if detach {
                return Ok(ExitCode::SUCCESS);
            }
            wait_and_print(&conn, &id, json!({})).await
        }
        DrCmd::Failback { app, detach } => {
            // Home: the cluster whose agent's config names the primary
            // (a failover does not rewrite config files).
            let st = call(&conn, |mut c| {
                let app = app.clone();
                async move { c.get_dr_status(pb::GetDrStatusRequest { app }).await }
            })
            .await?;
            let home = st
                .clusters
                .iter()
                .find(|c| {
                    c.database
                        .as_ref()
                        .is_some_and(|d| d.configured_role == pb::DatabaseRole::Primary as i32)
                })
                .with_context(|| format!("no agent of {app} is configured with its primary; use dr failover --to"))?;
            let run = DrCmd::Failover {
                app,
                to: Some(home.region.clone()),
                force: false,
                accept_data_loss: false,
                rejoin: true,
                detach,
            };
            Box::pin(run_cmd(run, conn)).await
        }
        DrCmd::Failover {
            app,
            to,
            force,
            accept_data_loss,
            rejoin,
            detach,
        } => {
            let req = pb::FailoverRequest {
                app,
                to: to.unwrap_or_default(),
                force,
                accept_data_loss,
                rejoin,
            };
            let started = call(&conn, |mut c| {
                let req = req.clone();
                async move { c.failover(req).await }
            })
            .await?;
            let id = started.operation_id;
            if detach {
                if conn.output == Output::Json {
                    println!("{}", json!({ "operation_id": id, "epoch": started.epoch }));
                } else {
                    println!("{id}");
                }
                return Ok(ExitCode::SUCCESS);
            }
            if conn.output == Output::Text {
                println!("failover {id} started: epoch {}", started.epoch);
            }
            wait_and_print(&conn, &id, json!({ "epoch": started.epoch })).await
        }
        DrCmd::Drill {
            schedule: Some(cmd), ..
        } => schedule_drills(cmd, &conn).await,
        DrCmd::Drill { app, to, detach, .. } => {
            let req = pb::DrillRequest {
                app: app.unwrap_or_default(),
                to: to.unwrap_or_default(),
            };
            let started = call(&conn, |mut c| {
                let req = req.clone();
                async move { c.drill(req).await }
            })
            .await?;
            let id = started.operation_id;
            if detach {
                if conn.output == Output::Json {
                    println!("{}", json!({ "operation_id": id }));
                } else {
                    println!("{id}");
                }
                return Ok(ExitCode::SUCCESS);
            }
            if conn.output == Output::Text {
                println!("drill {id} started");
            }
            let code = wait_and_print(&conn, &id, json!({})).await?;
            Ok(code)
        }
        DrCmd::Drills {
            cmd: DrillsCmd::List { app, limit },
        } => {
            let listed = call(&conn, |mut c| {
                let app = app.clone();
                async move { c.list_drills(pb::ListDrillsRequest { app, limit }).await }
            })
            .await?;
            let (drills, schedule) = (listed.drills, listed.schedule);
            if conn.output == Output::Json {
                let all: Vec<serde_json::Value> = drills.iter().map(drill_json).collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "drills": all, "schedule": schedule.as_ref().map(drill_schedule_json),
                    }))?
                );
                return Ok(ExitCode::SUCCESS);
            }
            match &schedule {
                Some(s) => println!("{}", drill_schedule_line(s)),
                None => println!("schedule: none (cutover dr drill schedule --app {app} --cron ...)"),
            }
            println!(
                "{:<21} {:<24} {:<8} {:<10} {:>10} {:>10}  OPERATION",
                "FINISHED", "CLUSTER", "SOURCE", "VERDICT", "RTO", "RPO"
            );
            for d in &drills {
                println!(
                    "{:<21} {:<24} {:<8} {:<10} {:>10} {:>10}  {}",
                    time(d.finished_at_unix_ms),
                    format!("{}/{}", d.region, d.cluster),
                    if d.source.is_empty() { "-" } else { &d.source },
                    d.verdict,
                    d.rto_ms.map_or_else(|| "-".into(), human_ms),
                    d.rpo_ms.map_or_else(|| "-".into(), human_ms),
                    d.operation_id
                );
            }
            if drills.is_empty() {
                println!("(no drills yet: cutover dr drill --app {app})");
            }
            Ok(ExitCode::SUCCESS)
        }
        DrCmd::Status { app } => {
            let st = call(&conn, |mut c| {
                let app = app.clone();
                async move { c.get_dr_status(pb::GetDrStatusRequest { app }).await }
            })
            .await?;
            if conn.output == Output::Json {
                let clusters: Vec<serde_json::Value> = st
                    .clusters
                    .iter()
                    .map(|c| {
                        json!({
                            "region": c.region, "cluster": c.cluster, "agent_up": c.agent_up,
                            "database": c.database.as_ref().map(database_json),
                            "lag_bytes": c.lag_bytes,
                            "last_backup": c.last_backup.as_ref().map(backup_json),
                            "last_validated_backup": c.last_validated_backup.as_ref().map(backup_json),
                            "last_drill": c.last_drill.as_ref().map(drill_json),
                            "front_door": c.front_door.as_ref().map(|f| json!({
                                "healthy": f.healthy, "detail": f.detail, "by": f.by,
                                "since_unix_ms": f.since_unix_ms,
                            })),
                        })
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({ "app": st.app, "clusters": clusters }))?
                );
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<24} {:<6} {:<8} {:<14} {:>10} {:<21} LAST VALIDATED BACKUP",
                "CLUSTER", "AGENT", "ROLE", "LSN", "LAG", "LAST BACKUP"
            );
            for c in &st.clusters {
                let (role, lsn, lag) = match &c.database {
                    None => ("-".to_owned(), "-".to_owned(), "-".to_owned()),
                    Some(d) if !d.error.is_empty() => ("unreachable".to_owned(), "-".to_owned(), "-".to_owned()),
                    Some(d) if d.fenced => (
                        "fenced".to_owned(),
                        d.lsn.map_or_else(|| "-".into(), format_lsn),
                        "-".to_owned(),
                    ),
                    Some(d) => (
                        role_word(d.role).to_owned(),
                        d.lsn.map_or_else(|| "-".into(), format_lsn),
                        match (d.lag_ms, c.lag_bytes) {
                            (Some(ms), Some(b)) => format!("{} {b}B", human_ms(ms)),
                            (Some(ms), None) => human_ms(ms),
                            _ => "-".into(),
                        },
                    ),
                };
                println!(
                    "{:<24} {:<6} {:<8} {:<14} {:>10} {:<21} {}",
                    format!("{}/{}", c.region, c.cluster),
                    if c.agent_up { "up" } else { "DOWN" },
                    role,
                    lsn,
                    lag,
                    c.last_backup
                        .as_ref()
                        .map_or_else(|| "none".into(), |b| time(b.finished_at_unix_ms)),
                    c.last_validated_backup
                        .as_ref()
                        .map_or_else(|| "none".into(), |b| b.id.clone()),
                );
                if let Some(d) = c.database.as_ref().filter(|d| !d.error.is_empty()) {
                    println!("    {}", d.error);
                }
                if let Some(f) = c.front_door.as_ref().filter(|f| !f.healthy) {
                    println!(
                        "    the front door ({}) has failed to reach {} since {}: {}",
                        f.by,
                        c.region,
                        time(f.since_unix_ms),
                        f.detail
                    );
                }
            }
            if st.epoch > 0 {
                println!(
                    "primary epoch {}{}",
                    st.epoch,
                    if st.epoch_primary.is_empty() {
                        String::new()
                    } else {
                        format!(", made primary: {}", st.epoch_primary)
                    }
                );
            }
            let drills: Vec<&pb::DrClusterStatus> = st.clusters.iter().filter(|c| c.last_drill.is_some()).collect();
            if drills.is_empty() {
                println!("last drill: none yet (cutover dr drill --app {})", st.app);
            }
            for c in drills {
                let d = c.last_drill.as_ref().expect("filtered");
                println!(
                    "last drill into {}/{}: {} at {} ({})",
                    c.region,
                    c.cluster,
                    drill_line(d),
                    time(d.finished_at_unix_ms),
                    d.operation_id
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        DrCmd::Plan { app, to } => {
            let req = pb::PlanFailoverRequest {
                app,
                to: to.unwrap_or_default(),
            };
            let p = call(&conn, |mut c| {
                let req = req.clone();
                async move { c.plan_failover(req).await }
            })
            .await?
            .plan
            .context("the coordinator returned no plan")?;
            let code = if p.blockers.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(BLOCKED)
            };
            if conn.output == Output::Json {
                let v = json!({
                    "app": p.app,
                    "from": (!p.from_region.is_empty()).then(|| format!("{}/{}", p.from_region, p.from_cluster)),
                    "to": (!p.to_region.is_empty()).then(|| format!("{}/{}", p.to_region, p.to_cluster)),
                    "source": (!p.source.is_empty()).then_some(&p.source),
                    "backup_id": (!p.backup_id.is_empty()).then_some(&p.backup_id),
                    "data_loss_window_ms": p.data_loss_window_ms,
                    "wal_behind_bytes": p.wal_behind_bytes,
                    "max_data_loss_ms": p.max_data_loss_ms,
                    "steps": p.steps.iter().map(|s| json!({
                        "name": s.name, "description": s.description, "expected_ms": s.expected_ms,
                    })).collect::<Vec<_>>(),
                    "blockers": p.blockers.iter().map(|b| json!({
                        "reason": b.reason,
                        "overridden_by": (!b.overridden_by.is_empty()).then_some(&b.overridden_by),
                    })).collect::<Vec<_>>(),
                    "ready": p.blockers.is_empty(),
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(code);
            }
            let from = if p.from_region.is_empty() {
                "no reported primary".to_owned()
            } else {
                format!("{}/{}", p.from_region, p.from_cluster)
            };
            let to = if p.to_region.is_empty() {
                "nowhere".to_owned()
            } else {
                format!("{}/{}", p.to_region, p.to_cluster)
            };
            println!("failover of {}: {from} -> {to}", p.app);
            let source = match p.source.as_str() {
                "standby" => "promote the streaming standby".to_owned(),
                "backup" => format!("restore backup {}", p.backup_id),
                _ => "none".to_owned(),
            };
            println!("  data from:         {source}");
            println!(
                "  data-loss window:  {} (the app accepts {})",
                p.data_loss_window_ms.map_or_else(|| "unknown".into(), human_ms),
                human_ms(p.max_data_loss_ms)
            );
            if let Some(b) = p.wal_behind_bytes {
                println!("  WAL not replayed:  {b} bytes");
            }
            println!("  steps:");
            for (i, s) in p.steps.iter().enumerate() {
                let expected = s.expected_ms.map_or_else(
                    || "no drill has measured it".into(),
                    |ms| format!("about {}", human_ms(ms)),
                );
                println!("    {}. {:<13} {} ({expected})", i + 1, s.name, s.description);
            }
            if p.blockers.is_empty() {
                println!("  nothing blocks it");
            } else {
                println!("  blocked by:");
                for b in &p.blockers {
                    if b.overridden_by.is_empty() {
                        println!("    - {}", b.reason);
                    } else {
                        println!("    - {} (override: {})", b.reason, b.overridden_by);
                    }
                }
            }
            Ok(code)
        }
    }
}
