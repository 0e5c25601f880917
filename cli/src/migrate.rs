//! `cutover release …` and `cutover migrate …`: releases with their
//! migrations, and the migration operations the seed's database-migration
//! workflow offered (status, plan / dry run, up or down to a target).

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use cutover_shared::proto as pb;
use cutover_shared::release::Bundle;
use cutover_shared::task::outputs::MigrateOutputs;
use serde_json::json;

use crate::client::{ConnOpts, Output, call};

#[derive(Subcommand)]
pub enum ReleaseCmd {
    /// Upload a release: the image and its migrations directory (sqlx layout).
    Create {
        #[arg(long)]
        app: String,
        #[arg(long)]
        image: String,
        /// Directory of `<version>_<name>.up.sql` / `.down.sql` (or `.sql`) files.
        #[arg(long)]
        migrations: Option<std::path::PathBuf>,
    },
    /// An app's releases, newest first.
    List {
        #[arg(long)]
        app: String,
    },
    /// One release and its migration files.
    Get {
        #[arg(long)]
        app: String,
        #[arg(long)]
        image: String,
        /// Print each file's SQL too.
        #[arg(long)]
        sql: bool,
    },
}

/// Options every migrate action takes.
#[derive(Clone, Debug, clap::Args)]
pub struct MigrateOpts {
    #[arg(long)]
    app: String,
    /// One region (required by up and down).
    #[arg(long)]
    region: Option<String>,
    /// The release whose migrations to use (default: the app's newest).
    #[arg(long)]
    image: Option<String>,
}

#[derive(Subcommand)]
pub enum MigrateCmd {
    /// Applied version, pending migrations and drift in every region.
    Status {
        #[command(flatten)]
        opts: MigrateOpts,
    },
    /// What `up` would run, statement by statement; changes nothing.
    Plan {
        #[command(flatten)]
        opts: MigrateOpts,
        #[arg(long)]
        target: Option<i64>,
    },
    /// Apply migrations up to a target version (default: the newest).
    Up {
        #[command(flatten)]
        opts: MigrateOpts,
        #[arg(long)]
        target: Option<i64>,
        /// Show the plan only.
        #[arg(long)]
        dry_run: bool,
    },
    /// Revert migrations down to a target version (0: all of them).
    Down {
        #[command(flatten)]
        opts: MigrateOpts,
        #[arg(long)]
        target: i64,
        /// Show the plan only.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Reads every `*.sql` file of `dir` (not recursively; hidden files skipped).
fn read_migrations(dir: &Path) -> Result<Vec<pb::MigrationFile>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !name.ends_with(".sql") || !entry.file_type()?.is_file() {
            continue;
        }
        let content = std::fs::read(entry.path()).with_context(|| format!("reading {}", entry.path().display()))?;
        files.push(pb::MigrationFile { name, content });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

pub(crate) fn release_json(r: &pb::Release) -> serde_json::Value {
    json!({
        "app": r.app, "image": r.image, "digest": r.digest,
        "newest_version": (r.newest_version > 0).then_some(r.newest_version),
        "reversible": r.reversible, "created_by": r.created_by, "created_at_unix_ms": r.created_at_unix_ms,
        "files": r.files.iter().map(|f| json!({"name": f.name, "bytes": f.bytes, "sha256": f.sha256})).collect::<Vec<_>>(),
    })
}

fn print_release(r: &pb::Release) {
    let newest = if r.newest_version > 0 {
        r.newest_version.to_string()
    } else {
        "-".into()
    };
    println!(
        "{} {}  migrations to version {newest}  {}  digest {}  by {}",
        r.app,
        r.image,
        if r.reversible { "reversible" } else { "irreversible" },
        &r.digest[..r.digest.len().min(12)],
        r.created_by
    );
}

pub async fn run_release(cmd: ReleaseCmd, conn: ConnOpts) -> Result<ExitCode> {
    match cmd {
        ReleaseCmd::Create { app, image, migrations } => {
            let files = match &migrations {
                Some(dir) => read_migrations(dir)?,
                None => vec![],
            };
            // The coordinator checks too; checking here first gives the same
            // error without sending a bundle that is too large to send.
            Bundle::parse(files.iter().map(|f| (f.name.clone(), f.content.clone())).collect())?;
            let r = call(&conn, |mut c| {
                let req = pb::CreateReleaseRequest {
                    app: app.clone(),
                    image: image.clone(),
                    migrations: files.clone(),
                };
                async move { c.create_release(req).await }
            })
            .await?;
            let release = r.release.context("no release in the answer")?;
            if conn.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&release_json(&release))?);
            } else {
                print_release(&release);
                for op in &r.running_operations {
                    println!(
                        "note: operation {op} is running on {app}; it keeps the release it started with, this one applies to the next operation"
                    );
                }
            }
        }
        ReleaseCmd::List { app } => {
            let r = call(&conn, |mut c| {
                let app = app.clone();
                async move { c.list_releases(pb::ListReleasesRequest { app }).await }
            })
            .await?;
            if conn.output == Output::Json {
                let v: Vec<_> = r.releases.iter().map(release_json).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                r.releases.iter().for_each(print_release);
            }
        }
        ReleaseCmd::Get { app, image, sql } => {
            let r = call(&conn, |mut c| {
                let req = pb::GetReleaseRequest {
                    app: app.clone(),
                    image: image.clone(),
                };
                async move { c.get_release(req).await }
            })
            .await?;
            let release = r.release.context("no release in the answer")?;
            if conn.output == Output::Json {
                let mut v = release_json(&release);
                if sql {
                    v["sql"] = json!(
                        r.migrations
                            .iter()
                            .map(|m| json!({"name": m.name, "sql": String::from_utf8_lossy(&m.content)}))
                            .collect::<Vec<_>>()
                    );
                }
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_release(&release);
                for f in &release.files {
                    println!("  {:<48} {:>8} bytes  sha256 {}", f.name, f.bytes, f.sha256);
                }
                if sql {
                    for m in &r.migrations {
                        println!("-- {}\n{}", m.name, String::from_utf8_lossy(&m.content).trim_end());
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Polls an operation until it finishes.
pub(crate) async fn finished_operation(conn: &ConnOpts, id: &str) -> Result<pb::Operation> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30 * 60);
    loop {
        let op = call(conn, |mut c| {
            let operation_id = id.to_owned();
            async move { c.get_operation(pb::GetOperationRequest { operation_id }).await }
        })
        .await?
        .operation
        .context("no operation in the answer")?;
        let done = op.state == pb::TaskState::Succeeded as i32 || op.state == pb::TaskState::Failed as i32;
        if done {
            return Ok(op);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("operation {id} did not finish within 30 minutes; follow it with cutover operations watch {id}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One cluster's answer to a migrate or backup task.
pub(crate) struct RegionResult {
    pub target: String,
    pub ok: bool,
    pub message: String,
    pub outputs: std::collections::HashMap<String, String>,
}

pub(crate) fn results(op: &pb::Operation) -> Vec<RegionResult> {
    op.tasks
        .iter()
        .filter_map(|t| {
            let spec = t.task.as_ref()?;
            let c = spec.target.clone().unwrap_or_default();
            let r = t.result.as_ref()?;
            Some(RegionResult {
                target: format!("{}/{}", c.region, c.cluster),
                ok: r.success,
                message: r.message.clone(),
                outputs: r.outputs.clone(),
            })
        })
        .collect()
}

pub async fn run_migrate(cmd: MigrateCmd, conn: ConnOpts) -> Result<ExitCode> {
    let (opts, action, target, dry_run) = match cmd {
        MigrateCmd::Status { opts } => (opts, pb::MigrateAction::Status, None, false),
        MigrateCmd::Plan { opts, target } => (opts, pb::MigrateAction::Plan, target, false),
        MigrateCmd::Up { opts, target, dry_run } => (opts, pb::MigrateAction::Up, target, dry_run),
        MigrateCmd::Down { opts, target, dry_run } => (opts, pb::MigrateAction::Down, Some(target), dry_run),
    };
    let req = pb::MigrateRequest {
        app: opts.app.clone(),
        region: opts.region.clone().unwrap_or_default(),
        action: action as i32,
        target,
        dry_run,
        image: opts.image.clone().unwrap_or_default(),
    };
    let id = call(&conn, |mut c| {
        let req = req.clone();
        async move { c.migrate(req).await }
    })
    .await?
    .operation_id;
    let op = finished_operation(&conn, &id).await?;
    let results = results(&op);
    let succeeded = op.state == pb::TaskState::Succeeded as i32;
    if conn.output == Output::Json {
        let v = json!({
            "operation_id": op.id, "ok": succeeded, "summary": op.summary,
            "clusters": results.iter().map(|r| json!({
                "cluster": r.target, "ok": r.ok, "message": r.message, "outputs": r.outputs,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let outputs = |r: &RegionResult| MigrateOutputs::from_wire(&r.outputs.clone().into_iter().collect());
        let dash = |s: String| if s.is_empty() { "-".to_owned() } else { s };
        let list = |v: Option<Vec<i64>>| {
            v.unwrap_or_default()
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        if action == pb::MigrateAction::Status {
            println!(
                "{:<28} {:>8}  {:<20} {:<12} NOTE",
                "CLUSTER", "APPLIED", "PENDING", "DRIFT"
            );
            for r in &results {
                let o = outputs(r);
                let note = if !r.ok {
                    format!("FAILED: {}", r.message)
                } else {
                    o.skipped.clone().unwrap_or_default()
                };
                println!(
                    "{:<28} {:>8}  {:<20} {:<12} {}",
                    r.target,
                    dash(o.applied_version.map(|v| v.to_string()).unwrap_or_default()),
                    dash(list(o.pending)),
                    dash(list(o.drift)),
                    note
                );
            }
        } else {
            for r in &results {
                println!("{} {}: {}", if r.ok { "ok" } else { "FAILED" }, r.target, r.message);
                let o = outputs(r);
                for line in o.plan.as_deref().unwrap_or_default().lines() {
                    println!("    {line}");
                }
                if let Some(b) = &o.backup {
                    println!("    backup {} ({} bytes, sha256 {})", b.path, b.bytes, b.sha256);
                }
            }
            println!("operation {id}: {}", if succeeded { "succeeded" } else { "failed" });
        }
    }
    Ok(if succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
