//! `cutover demo`: the README's main job on the embedded default. It starts
//! what `cutover dev` starts with three regions, puts a front door before
//! them (a round-robin proxy over every region's service address), keeps a
//! steady load on it, and through the public gRPC API (mutual TLS):
//! cuts over to v2 in waves, to v3 atomically, attempts a v4 that fails its
//! gates in the second wave (and is rolled back automatically), runs a
//! canary of a release with 3% errors that its analysis catches at 25% in
//! the first region (`demo_canary.rs`), backs up a
//! region's database to the embedded object store, validates it by restore
//! and catches a corrupted copy, runs the disaster-recovery chapter
//! (`demo_dr.rs`: a drill, a region lost under load and failed over
//! automatically, its rejoin), then loses the Raft leader and checks the
//! cluster carries on. It prints a report and
//! exits 0 only if every expectation held, zero failed requests included.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cutover_agent::router::Router;
use cutover_shared::load::SteadyLoad;
use cutover_shared::proto as pb;
use serde_json::json;

use crate::client::{ConnOpts, Output, call};
use crate::demo_dr::{self, DrFigures, DrRig};
use crate::dev::{AgentExtras, DEMO_REGIONS, DevSystem};

struct Step {
    name: String,
    ok: bool,
    millis: u128,
    detail: String,
    /// Per task: (kind, region, ms).
    tasks: Vec<TaskTime>,
}

/// (task kind, region, milliseconds).
pub(crate) type TaskTime = (String, String, i64);

pub(crate) async fn operation(conn: &ConnOpts, id: &str) -> Result<pb::Operation> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let r = call(conn, |mut c| {
            let operation_id = id.to_owned();
            async move { c.get_operation(pb::GetOperationRequest { operation_id }).await }
        })
        .await?;
        let op = r.operation.context("operation missing")?;
        if op.state == pb::TaskState::Succeeded as i32 || op.state == pb::TaskState::Failed as i32 {
            return Ok(op);
        }
        if Instant::now() > deadline {
            bail!("operation {id} did not finish within 180 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The backup chapter: us-east's database is backed up to the embedded
/// object store and cataloged, validated by a restore into a scratch copy,
/// then one byte of the stored object is flipped: validation must name it
/// corrupt and restore nothing.
async fn backup_chapter(conn: &ConnOpts, sys: &DevSystem) -> Result<(String, Vec<TaskTime>)> {
    let id = call(conn, |mut c| async move {
        c.create_backup(pb::CreateBackupRequest {
            app: "sample".into(),
            region: "us-east".into(),
        })
        .await
    })
    .await?
    .operation_id;
    let op = operation(conn, &id).await?;
    if op.state != pb::TaskState::Succeeded as i32 {
        bail!("the backup failed: {}", op.summary);
    }
    let mut times = task_times(&op);
    let backups = call(conn, |mut c| async move {
        c.list_backups(pb::ListBackupsRequest {
            app: "sample".into(),
            region: "us-east".into(),
            limit: 1,
        })
        .await
    })
    .await?
    .backups;
    let b = backups.first().context("the backup is not in the catalog")?;
    let validate = |id: String| async move {
        let v = call(conn, |mut c| {
            let id = id.clone();
            async move { c.validate_backup(pb::ValidateBackupRequest { id }).await }
        })
        .await?
        .operation_id;
        operation(conn, &v).await
    };
    let v = validate(b.id.clone()).await?;
    if v.state != pb::TaskState::Succeeded as i32 {
        bail!("validation failed: {}", v.summary);
    }
    times.extend(task_times(&v));
    // What a failing disk or a tampering hand would do to the stored copy.
    let path = sys.store.object_path(&b.object_key);
    let mut bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&path, bytes)?;
    let v = validate(b.id.clone()).await?;
    let verdict = v
        .tasks
        .first()
        .and_then(|t| t.result.as_ref())
        .and_then(|r| r.outputs.get("verdict").cloned())
        .unwrap_or_default();
    if v.state != pb::TaskState::Failed as i32 || verdict != "corrupt" {
        bail!("a corrupted backup was not caught (verdict {verdict:?}): {}", v.summary);
    }
    times.extend(task_times(&v));
    Ok((
        format!(
            "{} ({} bytes stored, schema version {}, {} tables) restored and checked; after one flipped byte: {verdict}",
            b.id,
            b.size_bytes,
            b.migration_version,
            b.table_rows.len()
        ),
        times,
    ))
}

pub(crate) async fn cutover(conn: &ConnOpts, image: &str, strategy: pb::Strategy) -> Result<pb::Operation> {
    let req = pb::DeployRequest {
        app: "sample".into(),
        image: image.into(),
        region: String::new(),
        no_switch: false,
        waves: vec![],
        strategy: strategy as i32,
        ..Default::default()
    };
    let id = call(conn, |mut c| {
        let req = req.clone();
        async move { c.deploy(req).await }
    })
    .await?
    .operation_id;
    operation(conn, &id).await
}

/// The migration sample:v2's release carries.
const V2_MIGRATIONS: &[(&str, &str)] = &[
    (
        "1_orders.up.sql",
        "create table orders (id integer primary key, item text not null, placed_at integer not null);",
    ),
    ("1_orders.down.sql", "drop table orders;"),
];

pub(crate) async fn serving(addr: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")
        .await?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await?;
    Ok(buf.split("\r\n\r\n").nth(1).unwrap_or("").trim().to_owned())
}

pub(crate) async fn all_serve(services: &[(String, String)], version: &str) -> Result<()> {
    for (region, addr) in services {
        let got = serving(addr).await?;
        if got != format!("version {version}") {
            bail!("{region} serves {got:?}, expected {version}");
        }
    }
    Ok(())
}

pub(crate) fn task_times(op: &pb::Operation) -> Vec<TaskTime> {
    op.tasks
        .iter()
        .map(|t| {
            let spec = t.task.clone().unwrap_or_default();
            let region = spec.target.map(|c| c.region).unwrap_or_default();
            let ms = t
                .result
                .as_ref()
                .map_or(0, |r| (r.finished_at_unix_ms - t.created_at_unix_ms).max(0));
            (spec.kind, region, ms)
        })
        .collect()
}

pub async fn run(
    output: Output,
    data_dir: Option<PathBuf>,
    database_url: Option<String>,
    dr: bool,
) -> Result<ExitCode> {
    // The terminal gets progress and the report; the logs go to a file.
    let log = crate::dev::log_path(data_dir.as_deref(), "demo");
    cutover_shared::telemetry::init_tracing_file(&log).with_context(|| format!("opening {}", log.display()))?;
    eprintln!("cutover demo: logs in {}", log.display());
    let metrics = cutover_shared::telemetry::metrics_handle();
    let started = Instant::now();
    let keep = data_dir.clone();
    // The DR chapter's servers come first: the agents' configs name them.
    let t = Instant::now();
    let (rig, extras, rig_error) = if dr {
        let keep = keep.clone();
        match tokio::task::spawn_blocking(move || DrRig::start(keep.as_deref())).await? {
            Ok((rig, extras)) => (Some(rig), extras, None),
            Err(e) => (None, AgentExtras::default(), Some(e)),
        }
    } else {
        (None, AgentExtras::default(), None)
    };
    let rig_ms = t.elapsed().as_millis();
    let mut sys = DevSystem::start_with(data_dir, DEMO_REGIONS, database_url, extras).await?;
    let conn = ConnOpts {
        addr: sys.addrs.clone(),
        ca: Some(sys.pki.ca.clone()),
        cert: Some(sys.pki.operator.cert.clone()),
        key: Some(sys.pki.operator.key.clone()),
        server_name: None,
        trust_domain: sys.pki.trust_domain.clone(),
        crl: None,
        output,
    };
    let mut steps: Vec<Step> = Vec::new();
    if let Some(e) = rig_error {
        steps.push(Step {
            name: "DR: PostgreSQL primary, standby and scratch server".into(),
            ok: false,
            millis: rig_ms,
            detail: format!("{e:#}"),
            tasks: vec![],
        });
    }
    let mut all_ok = steps.is_empty();
    let mut push = |name: &str, t: Instant, r: Result<(String, Vec<TaskTime>)>| {
        let ok = r.is_ok();
        // Progress, as each step ends (the report follows on stdout).
        eprintln!(
            "  {} {name} ({:.1} s)",
            if ok { "done" } else { "FAILED" },
            t.elapsed().as_secs_f64()
        );
        let (detail, tasks) = r.unwrap_or_else(|e| (format!("{e:#}"), vec![]));
        steps.push(Step {
            name: name.into(),
            ok,
            millis: t.elapsed().as_millis(),
            detail,
            tasks,
        });
        ok
    };

    let t = Instant::now();
    let setup = async {
        sys.wait_ready(Duration::from_secs(30)).await?;
        let services = sys.install_sample_app("sample:v1").await?;
        Ok::<_, anyhow::Error>(services)
    }
    .await;
    let services = match setup {
        Ok(s) => {
            push(
                "3 coordinators, agents in 3 regions, sample:v1 everywhere",
                t,
                Ok((format!("{} regions", s.len()), vec![])),
            );
            s
        }
        Err(e) => {
            push("3 coordinators, agents in 3 regions, sample:v1 everywhere", t, Err(e));
            vec![]
        }
    };
    all_ok &= !services.is_empty();
    // The front door: one address before every region, spreading requests
    // over them the way a global load balancer would. The steady load goes
    // through it (12 keep-alive connections at 50 req/s each), so every
    // switch and rollback below happens under traffic in every region.
    let upstreams: Vec<std::net::SocketAddr> = services.iter().filter_map(|(_, a)| a.parse().ok()).collect();
    let front = if all_ok {
        Some(Router::bind_balanced("127.0.0.1:0".parse()?, upstreams).await?)
    } else {
        None
    };
    let loads: Vec<SteadyLoad> = front
        .iter()
        .map(|f| SteadyLoad::start(&f.local_addr().to_string(), 12, Duration::from_millis(20)))
        .collect();
    let load_started = Instant::now();

    if all_ok {
        let t = Instant::now();
        let r = async {
            // v2 expects an `orders` table: its release carries the
            // migration, which every region's database (SQLite) runs after
            // the new color is deployed and before any switch.
            call(&conn, |mut c| async move {
                c.create_release(pb::CreateReleaseRequest {
                    app: "sample".into(),
                    image: "sample:v2".into(),
                    migrations: V2_MIGRATIONS
                        .iter()
                        .map(|(name, sql)| pb::MigrationFile {
                            name: name.to_string(),
                            content: sql.as_bytes().to_vec(),
                        })
                        .collect(),
                })
                .await
            })
            .await?;
            let op = cutover(&conn, "sample:v2", pb::Strategy::Waves).await?;
            if op.state != pb::TaskState::Succeeded as i32 {
                bail!("failed: {}", op.summary);
            }
            let migrated = op
                .tasks
                .iter()
                .filter(|t| {
                    t.task.as_ref().is_some_and(|s| s.kind == "db.migrate")
                        && t.result.as_ref().is_some_and(|r| {
                            cutover_shared::task::outputs::MigrateOutputs::from_wire(
                                &r.outputs.clone().into_iter().collect(),
                            )
                            .to_version
                                == Some(1)
                        })
                })
                .count();
            if migrated != services.len() {
                bail!("{migrated} of {} regions migrated their database", services.len());
            }
            all_serve(&services, "sample:v2").await?;
            Ok((
                "every region migrated its database to version 1 and serves sample:v2".to_owned(),
                task_times(&op),
            ))
        }
        .await;
        all_ok &= push("cutover to v2 in waves, with a database migration", t, r);
    }
    if all_ok {
        let t = Instant::now();
        let r = async {
            let op = cutover(&conn, "sample:v3", pb::Strategy::Atomic).await?;
            if op.state != pb::TaskState::Succeeded as i32 {
                bail!("failed: {}", op.summary);
            }
            all_serve(&services, "sample:v3").await?;
            Ok(("every region serves sample:v3".to_owned(), task_times(&op)))
        }
        .await;
        all_ok &= push("cutover to v3 atomically (all prepare, one switch)", t, r);
    }
    if all_ok {
        let t = Instant::now();
        let r = async {
            let op = cutover(&conn, "sample:v4-unhealthy-in-eu-west", pb::Strategy::Waves).await?;
            if op.state != pb::TaskState::Failed as i32 {
                bail!("the broken v4 was not refused: {}", op.summary);
            }
            if !op.summary.contains("switched back") {
                bail!("wave 1 was not rolled back: {}", op.summary);
            }
            all_serve(&services, "sample:v3").await?;
            Ok((
                format!("failed as expected, every region back on v3: {}", op.summary),
                task_times(&op),
            ))
        }
        .await;
        all_ok &= push("broken v4 fails its gates in wave 2 and rolls back", t, r);
    }
    let mut served = 0;
    let mut failed = 0;
    for l in loads {
        let (ok, bad) = l.stop().await;
        served += ok;
        failed += bad;
    }
    let load_secs = load_started.elapsed().as_secs_f64();
    let front_addr = front.as_ref().map(|f| f.local_addr().to_string()).unwrap_or_default();
    if let Some(f) = front {
        f.shutdown().await;
    }
    if all_ok {
        let t = Instant::now();
        let r = if failed == 0 {
            Ok((
                format!(
                    "{served} requests served through the front door {front_addr}, 0 failed ({:.0} req/s)",
                    served as f64 / load_secs
                ),
                vec![],
            ))
        } else {
            Err(anyhow::anyhow!("{failed} of {} requests failed", served + failed))
        };
        all_ok &= push("zero failed requests at the front door", t, r);
    }
    if all_ok {
        let t = Instant::now();
        let r = crate::demo_canary::run(&conn, &services).await;
        all_ok &= push(
            "canary 5 -> 25 -> 50: a 3% error rate is caught at 25% in us-east",
            t,
            r,
        );
    }
    if all_ok {
        let t = Instant::now();
        let r = backup_chapter(&conn, &sys).await;
        all_ok &= push("backup us-east, validate it by restore, catch a corrupted copy", t, r);
    }
    let mut figures = DrFigures::default();
    if all_ok && let Some(rig) = &rig {
        let t = Instant::now();
        let r = demo_dr::install(&conn, &sys, rig).await.map(|d| (d, vec![]));
        all_ok &= push("DR: shop in us-east (primary) and eu-west (standby)", t, r);
        if all_ok {
            let t = Instant::now();
            let r = demo_dr::drill(&conn, &sys, &mut figures).await.map(|d| (d, vec![]));
            all_ok &= push("DR: drill into eu-west on a scratch copy, torn down", t, r);
        }
        if all_ok {
            let t = Instant::now();
            let r = demo_dr::lose_us_east(&mut sys, rig, &mut figures)
                .await
                .map(|d| (d, vec![]));
            all_ok &= push("DR: us-east lost under load, automatic failover", t, r);
        }
        if all_ok {
            let t = Instant::now();
            let r = demo_dr::rejoin(&conn, &mut sys, &mut figures)
                .await
                .map(|d| (d, vec![]));
            all_ok &= push("DR: us-east rejoins as a standby of eu-west", t, r);
        }
    }
    if all_ok {
        let leader = sys.leader_index().context("no leader")?;
        let t = Instant::now();
        sys.stop_node(leader).await;
        let r = async {
            let req = pb::CreateAttestationRequest {
                image: "sample:v5".into(),
                checks: [("tests".to_string(), "passed".to_string())].into(),
            };
            let r = call(&conn, |mut c| {
                let req = req.clone();
                async move { c.create_attestation(req).await }
            })
            .await?;
            Ok((
                format!("first write committed at index {} on the new leader", r.log_index),
                vec![],
            ))
        }
        .await;
        all_ok &= push(
            &format!("Raft leader (node {}) lost: writes continue", leader + 1),
            t,
            r,
        );
    }
    let total = started.elapsed();
    sys.shutdown().await;
    if let Some(dir) = &keep {
        // What a Prometheus scrape would have seen at the end.
        let path = dir.join("metrics.prom");
        std::fs::write(&path, metrics.render()).with_context(|| format!("writing {}", path.display()))?;
    }

    let switch_ms: Vec<(String, i64)> = steps
        .iter()
        .flat_map(|s| s.tasks.iter())
        .filter(|(k, _, _)| k == "app.switch")
        .map(|(_, r, ms)| (r.clone(), *ms))
        .collect();
    if output == Output::Json {
        let report = json!({
            "ok": all_ok,
            "total_ms": total.as_millis(),
            "requests_served": served,
            "requests_failed": failed,
            "switch_ms": switch_ms.iter().map(|(r, ms)| json!({"region": r, "ms": ms})).collect::<Vec<_>>(),
            "dr": rig.as_ref().map(|_| &figures),
            "steps": steps.iter().map(|s| json!({
                "step": s.name, "ok": s.ok, "ms": s.millis, "detail": s.detail,
                "tasks": s.tasks.iter().map(|(k, r, ms)| json!({"kind": k, "region": r, "ms": ms})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "cutover demo: 3 coordinators, agents in {}",
            DEMO_REGIONS.iter().map(|r| r.0).collect::<Vec<_>>().join(", ")
        );
        for s in &steps {
            println!(
                "  [{}] {:<60} {:>6} ms  {}",
                if s.ok { " ok " } else { "FAIL" },
                s.name,
                s.millis,
                s.detail
            );
            for (kind, region, ms) in &s.tasks {
                println!("         {kind:<12} {region:<10} {ms:>6} ms");
            }
        }
        let sw: Vec<String> = switch_ms.iter().map(|(r, ms)| format!("{r} {ms} ms")).collect();
        println!("switch step durations: {}", sw.join(", "));
        println!("requests: {served} served, {failed} failed");
        if rig.is_some() {
            let ms = |v: Option<u64>| v.map_or_else(|| "?".to_owned(), |v| format!("{:.1} s", v as f64 / 1000.0));
            println!(
                "DR: drill RTO {}, RPO {}; region loss: RTO {}, RPO {} of {} acknowledged writes lost, {} of {} requests failed during the failover; rejoin by {}",
                ms(figures.drill_rto_ms),
                ms(figures.drill_rpo_ms),
                ms(figures.failover_rto_ms),
                figures.writes_lost,
                figures.writes_acknowledged,
                figures.requests_failed,
                figures.requests_served + figures.requests_failed,
                figures.rejoin_method.as_deref().unwrap_or("?")
            );
        }
        println!(
            "{} in {:.1} s",
            if all_ok { "all expectations held" } else { "DEMO FAILED" },
            total.as_secs_f64()
        );
    }
    if !all_ok {
        // What went wrong is in the logs: their end, where a run is read.
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        eprintln!("the last lines of {}:", log.display());
        for l in &lines[lines.len().saturating_sub(60)..] {
            eprintln!("  {l}");
        }
    }
    Ok(if all_ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
