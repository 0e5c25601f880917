//! `backup`: cutover's backup and restore of a PostgreSQL database into
//! Garage, side by side with the pipeline an operator would script, into
//! the same bucket of the same store from the same server in one run:
//!
//! - backup: cutover (`pg_dump -Fc --compress=0`, zstd level 3, AES-256-GCM,
//!   SHA-256 per part, multipart upload, by the agent process) against
//!   `pg_dump -Fc | zstd | aws s3 cp -` (pg_dump's own compression on, as
//!   typed) and `pg_dump -Fc -Z0 | zstd | aws s3 cp -` (the same work as
//!   cutover's minus the encryption and checksums);
//! - restore into a new database: cutover's `restore --to scratch` (a
//!   verification pass over the whole object, then the restore) against
//!   `aws s3 cp - | zstd -d | pg_restore` with cutover's pg_restore flags
//!   (`--no-owner --exit-on-error --single-transaction`).
//!
//! Throughput is the database's size (`pg_database_size`) over the wall
//! time of each; each is measured three times, cutover and its peers in
//! turn, and the median reported. The agent's peak resident memory (`VmHWM`) is read after
//! its backup and after its restore; the agent restarts before each size,
//! so each size's peak is its own. Databases come from `pgbench -i -s N`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cutover_agent::backup::seal::BackupKey;
use cutover_shared::config::{DatabaseConfig, DbDriver};
use cutover_shared::proto as pb;
use cutover_tests::garage::TestGarage;
use cutover_tests::postgres::TestPostgres;
use cutover_tests::process::ProcessCluster;
use serde_json::{Value, json};

const REGION: &[(&str, &str)] = &[("bench", "bench-1")];
const APP: &str = "ledger";
const BUCKET: &str = "bench";
/// A backup or restore of the largest size takes minutes.
const STEP_TIMEOUT: Duration = Duration::from_secs(1800);

/// Runs `script` in bash with `env`; returns its wall time.
fn timed_shell(script: &str, env: &[(&str, String)]) -> Result<f64> {
    let t = Instant::now();
    let out = Command::new("bash")
        .args(["-o", "pipefail", "-c", script])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .context("running bash")?;
    if !out.status.success() {
        bail!(
            "{script} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(t.elapsed().as_secs_f64())
}

/// The peak resident memory of process `pid`, MiB.
fn peak_rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmHWM")?;
    Ok(kb / 1024.0)
}

fn mib(bytes: f64) -> f64 {
    bytes / (1024.0 * 1024.0)
}

/// What the operation's (first) task reported as its duration, seconds.
fn task_seconds(op: &pb::Operation) -> f64 {
    op.tasks
        .first()
        .and_then(|t| t.result.as_ref())
        .and_then(|r| r.outputs.get("duration_ms"))
        .and_then(|d| d.parse::<f64>().ok())
        .map_or(0.0, |ms| ms / 1000.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// `cutover backup create`, to its end: wall seconds, the agent task's own
/// seconds, and the catalog entry.
async fn cutover_backup(pc: &ProcessCluster) -> Result<(f64, f64, pb::Backup)> {
    let started = Instant::now();
    let id = pc
        .any("CreateBackup", |mut c| async move {
            c.create_backup(pb::CreateBackupRequest {
                app: APP.into(),
                region: String::new(),
            })
            .await
        })
        .await?
        .operation_id;
    let op = finish(pc, &id).await?;
    let secs = started.elapsed().as_secs_f64();
    let entry = pc
        .any("ListBackups", |mut c| async move {
            c.list_backups(pb::ListBackupsRequest {
                app: APP.into(),
                ..Default::default()
            })
            .await
        })
        .await?
        .backups
        .into_iter()
        .find(|b| b.operation_id == id)
        .context("the backup is cataloged")?;
    Ok((secs, task_seconds(&op), entry))
}

/// `cutover backup restore ID --to scratch`, to its end (the scratch
/// database is dropped after): wall seconds and the agent task's own.
async fn cutover_restore(pc: &ProcessCluster, pg: &TestPostgres, backup: &str) -> Result<(f64, f64)> {
    let started = Instant::now();
    let rid = pc
        .any("RestoreBackup", |mut c| {
            let id = backup.to_owned();
            async move {
                c.restore_backup(pb::RestoreBackupRequest {
                    id,
                    to: pb::RestoreTarget::Scratch as i32,
                    confirm: false,
                })
                .await
            }
        })
        .await?
        .operation_id;
    let op = finish(pc, &rid).await?;
    let secs = started.elapsed().as_secs_f64();
    let scratch = op
        .tasks
        .first()
        .and_then(|t| t.result.as_ref())
        .and_then(|r| r.outputs.get("scratch").cloned())
        .context("the restore names its database")?;
    pg.psql("postgres", &format!("drop database {scratch}"))?;
    Ok((secs, task_seconds(&op)))
}

/// The scripted pipelines, with the AWS CLI against the same bucket.
struct Peer {
    env: Vec<(&'static str, String)>,
    endpoint: String,
    pg_dump: String,
    pg_restore: String,
    url: String,
}

impl Peer {
    /// `pg_dump -Fc{flags} | zstd | aws s3 cp - KEY`: seconds.
    fn backup(&self, key: &str, flags: &str) -> Result<f64> {
        let script = format!(
            "{} -Fc{flags} '{}' | zstd -q | aws --endpoint-url {} s3 cp --quiet - s3://{BUCKET}/{key}",
            self.pg_dump, self.url, self.endpoint
        );
        timed_shell(&script, &self.env)
    }

    /// `aws s3 cp KEY - | zstd -d | pg_restore` into a new database, with
    /// cutover's pg_restore flags (dropped after): seconds.
    fn restore(&self, pg: &TestPostgres, key: &str) -> Result<f64> {
        pg.psql("postgres", "drop database if exists peer_restore")?;
        pg.psql("postgres", "create database peer_restore")?;
        let script = format!(
            "aws --endpoint-url {} s3 cp --quiet s3://{BUCKET}/{key} - | zstd -dq | \
             {} --no-owner --exit-on-error --single-transaction -d '{}'",
            self.endpoint,
            self.pg_restore,
            pg.url("peer_restore")
        );
        let secs = timed_shell(&script, &self.env)?;
        pg.psql("postgres", "drop database peer_restore")?;
        Ok(secs)
    }
}

async fn finish(pc: &ProcessCluster, id: &str) -> Result<pb::Operation> {
    let op = pc.wait_finished(id, STEP_TIMEOUT).await?;
    if op.state != pb::TaskState::Succeeded as i32 {
        bail!("operation {id} failed: {}", cutover_tests::process::describe(Some(&op)));
    }
    Ok(op)
}

pub async fn run(quick: bool) -> Result<Value> {
    let scales: &[u32] = if quick { &[1] } else { &[7, 70] };
    let pg = TestPostgres::start()?;
    let garage = TestGarage::start(BUCKET)?;
    let key_hex = BackupKey::generate("k1")?.to_hex();
    let url = pg.create_database("ledger")?;
    let bin = pg.bin_dir().to_owned();
    let tool = |t: &str| bin.join(t).display().to_string();
    let pc_url = url.clone();
    let store = |dir: &Path| garage.backup_config("cutover/", dir, &key_hex);
    let mut pc = ProcessCluster::start_with(3, REGION, |_, cfg, dir| {
        std::fs::write(dir.join("ledger-db-url"), &pc_url).expect("writing the URL file");
        cfg.databases = vec![DatabaseConfig {
            statement_timeout_ms: 3_600_000,
            ..DatabaseConfig::with_url_file(APP, DbDriver::Postgres, dir.join("ledger-db-url"))
        }];
        cfg.backup = Some(store(dir).expect("the Garage store config"));
    })
    .await?;
    let t = Duration::from_secs(60);
    pc.wait_leader(t).await?;
    pc.wait_agents_up(t).await?;
    let spec = cutover_tests::sample_app_spec(APP, REGION);
    pc.any("ApplyApp", |mut c| {
        let spec = spec.clone();
        async move { c.apply_app(pb::ApplyAppRequest { app: Some(spec.into()) }).await }
    })
    .await?;
    let aws_env = vec![
        ("AWS_ACCESS_KEY_ID", garage.access_key().to_owned()),
        ("AWS_SECRET_ACCESS_KEY", garage.secret_key().to_owned()),
        ("AWS_DEFAULT_REGION", "garage".to_owned()),
        ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
    ];

    let peer = Peer {
        env: aws_env,
        endpoint: garage.endpoint(),
        pg_dump: tool("pg_dump"),
        pg_restore: tool("pg_restore"),
        url: url.clone(),
    };
    // Each measurement is repeated, cutover and the peers in turn, and the
    // median reported: single runs on this shared machine vary by 20 %.
    let reps = if quick { 1 } else { 3 };
    let mut rows = Vec::new();
    for &scale in scales {
        eprintln!("backup: pgbench -i -s {scale}");
        timed_shell(
            &format!("{} -i -q -s {scale} '{url}' >/dev/null 2>&1", tool("pgbench")),
            &[],
        )?;
        let size: f64 = pg
            .psql("postgres", "select pg_database_size('ledger')")?
            .trim()
            .parse()
            .context("pg_database_size")?;
        // A fresh agent process, so its peak memory is this size's.
        pc.kill9_agent(0);
        pc.start_agent(0)?;
        pc.wait_agents_up(t).await?;
        let pid = pc.agent_pid(0).context("the agent runs")?;

        let (mut ours, mut agent, mut typed, mut z0) = (vec![], vec![], vec![], vec![]);
        let mut entry = None;
        for rep in 0..reps {
            eprintln!("backup: {:.0} MiB, backups, round {}", mib(size), rep + 1);
            let (secs, task, e) = cutover_backup(&pc).await?;
            ours.push(secs);
            agent.push(task);
            entry = Some(e);
            typed.push(peer.backup(&format!("peer/s{scale}.dump.zst"), "")?);
            z0.push(peer.backup(&format!("peer/s{scale}-z0.dump.zst"), " -Z0")?);
        }
        let backup_rss = peak_rss_mib(pid)?;
        let entry = entry.context("no backup was taken")?;
        let (mut ours_r, mut agent_r, mut peer_r) = (vec![], vec![], vec![]);
        for rep in 0..reps {
            eprintln!("backup: {:.0} MiB, restores, round {}", mib(size), rep + 1);
            let (secs, task) = cutover_restore(&pc, &pg, &entry.id).await?;
            ours_r.push(secs);
            agent_r.push(task);
            peer_r.push(peer.restore(&pg, &format!("peer/s{scale}-z0.dump.zst"))?);
        }
        let restore_rss = peak_rss_mib(pid)?;
        rows.push(json!({
            "pgbench_scale": scale,
            "database_mib": mib(size),
            "runs": reps,
            "cutover_backup_s": median(ours),
            "cutover_agent_backup_s": median(agent),
            "peer_backup_s": median(typed),
            "peer_z0_backup_s": median(z0),
            "cutover_restore_s": median(ours_r),
            "cutover_agent_restore_s": median(agent_r),
            "peer_restore_s": median(peer_r),
            "cutover_stored_mib": mib(entry.size_bytes as f64),
            "agent_peak_rss_backup_mib": backup_rss,
            "agent_peak_rss_restore_mib": restore_rss,
        }));
    }

    println!(
        "backup: cutover (agent process, pg_dump -Fc -Z0 | zstd | AES-256-GCM | multipart) vs \
         pg_dump -Fc [-Z0] | zstd | aws s3 cp -, into Garage; restore vs aws s3 cp - | zstd -d | pg_restore"
    );
    println!(
        "{:>6} {:>9} | {:>16} {:>16} {:>16} {:>6} | {:>16} {:>16} {:>6} | {:>10} {:>10}",
        "scale",
        "DB MiB",
        "cutover backup",
        "peer (-Fc)",
        "peer (-Fc -Z0)",
        "ratio",
        "cutover restore",
        "peer restore",
        "ratio",
        "RSS bk MiB",
        "RSS rs MiB"
    );
    for r in &rows {
        let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
        let db = f("database_mib");
        let rate = |s: f64| format!("{s:.1}s {:.0}MiB/s", db / s);
        println!(
            "{:>6} {:>9.0} | {:>16} {:>16} {:>16} {:>6.2} | {:>16} {:>16} {:>6.2} | {:>10.0} {:>10.0}",
            r["pgbench_scale"].as_u64().unwrap_or(0),
            db,
            rate(f("cutover_backup_s")),
            rate(f("peer_backup_s")),
            rate(f("peer_z0_backup_s")),
            f("peer_z0_backup_s").min(f("peer_backup_s")) / f("cutover_backup_s"),
            rate(f("cutover_restore_s")),
            rate(f("peer_restore_s")),
            f("peer_restore_s") / f("cutover_restore_s"),
            f("agent_peak_rss_backup_mib"),
            f("agent_peak_rss_restore_mib"),
        );
    }
    println!(
        "each figure: the median of {} run(s); ratio: cutover's throughput over the faster peer's (above 1.00: \
         cutover is faster)",
        rows.first().and_then(|r| r["runs"].as_u64()).unwrap_or(1)
    );
    for r in &rows {
        println!(
            "scale {}: of cutover's backup, the agent's task took {:.2} s; of its restore, {:.2} s",
            r["pgbench_scale"].as_u64().unwrap_or(0),
            r["cutover_agent_backup_s"].as_f64().unwrap_or(0.0),
            r["cutover_agent_restore_s"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(json!({ "rows": rows }))
}
