//! `dr`: the RTO and RPO of an automatic failover when the primary region
//! is lost, in asynchronous and in synchronous replication
//! (`synchronous_standby_names = '*'`), with cutover's fastest settings
//! beside Patroni's default timings run by the same harness.
//!
//! Each trial starts afresh: a PostgreSQL primary with a `seq` table and
//! its streaming standby (`pg_basebackup -R`), three in-process
//! coordinators, the us-east agent with the primary and the eu-west agent
//! with the standby, and app `shop` failing over automatically. A writer
//! offers 500 numbered writes a second to whichever server takes them.
//! Then us-east is lost: its agent stops and its server is stopped at once
//! (`pg_ctl stop -m immediate`).
//! - RTO: from the loss to the first write the new primary acknowledged.
//! - RPO: the acknowledged writes the new primary lacks (and, at 500
//!   writes/s, the time they cover).
//!
//! The rows differ only in detection. cutover: agent heartbeats every 1 s
//! (down after 2.5 missed) and `failover_after_secs = 1`, its minimum.
//! Patroni's defaults (`ttl` 30, `loop_wait` 10) mapped onto the same
//! harness: heartbeats every 10 s (loop_wait; down after 25 s) and
//! `failover_after_secs = 5`, so a replica acts once the leader key's 30 s
//! ttl has run out. What follows detection (fence, promote, repoint) is the
//! same code for both.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cutover_shared::domain::{AgentState, TaskState};
use cutover_shared::dr::{DbRole, parse_lsn};
use cutover_shared::proto as pb;
use cutover_tests::postgres::TestPostgres;
use cutover_tests::writer::{SequenceWriter, database, numbers_on};
use cutover_tests::{TestCluster, sample_app_spec};
use serde_json::json;

use crate::util;

const REGIONS: &[(&str, &str)] = &[("us-east", "c1"), ("eu-west", "c1")];
const WRITES_PER_SEC: u32 = 500;
const T: Duration = Duration::from_secs(120);

/// How a row detects the lost region.
#[derive(Clone, Copy)]
struct Detection {
    name: &'static str,
    heartbeat_ms: u64,
    failover_after_secs: u64,
}

const CUTOVER: Detection = Detection {
    name: "cutover",
    heartbeat_ms: 1000,
    failover_after_secs: 1,
};
const PATRONI: Detection = Detection {
    name: "patroni-timings",
    heartbeat_ms: 10_000,
    failover_after_secs: 5,
};

struct Trial {
    rto_ms: f64,
    acked: usize,
    lost: usize,
}

/// Starts the first region's agent with `shop`'s primary at `primary_url`
/// and the second's with its standby at `standby_url`, following the
/// first (`us-east/c1`).
pub(crate) fn start_database_agents(c: &mut TestCluster, primary_url: &str, standby_url: &str) -> Result<()> {
    let dir = c.tmp.path().to_owned();
    let (pf, sf) = (dir.join("primary-url"), dir.join("standby-url"));
    std::fs::write(&pf, primary_url)?;
    std::fs::write(&sf, standby_url)?;
    let mut cfg = c.agent_config(0);
    cfg.databases = vec![database("shop", &pf, DbRole::Primary, None)];
    c.start_agent_with(0, cfg)?;
    let mut cfg = c.agent_config(1);
    cfg.databases = vec![database("shop", &sf, DbRole::Standby, Some("us-east/c1"))];
    c.start_agent_with(1, cfg)?;
    Ok(())
}

async fn trial(d: Detection, synchronous: bool) -> Result<Trial> {
    let primary = TestPostgres::start()?;
    let url = primary.create_database("shop")?;
    primary.psql("shop", "create table seq (n bigint primary key)")?;
    let standby = primary.start_standby()?;
    if synchronous {
        primary.psql("postgres", "ALTER SYSTEM SET synchronous_standby_names = '*'")?;
        primary.psql("postgres", "SELECT pg_reload_conf()")?;
    }
    let heartbeat = d.heartbeat_ms;
    let mut c = TestCluster::builder()
        .nodes(3)
        .regions(REGIONS)
        .configure(move |cfg| cfg.agent_heartbeat_interval_ms = heartbeat)
        .start()
        .await?;
    let leader = c.wait_leader(T).await?;
    start_database_agents(&mut c, &url, &standby.url("shop"))?;
    c.wait_state(leader, T, "both agents up", |s| {
        s.agents.values().filter(|a| a.state == AgentState::Up).count() == 2
    })
    .await?;
    let mut spec = sample_app_spec("shop", REGIONS);
    spec.dr.automatic = true;
    spec.dr.failover_after_secs = d.failover_after_secs;
    spec.dr.max_data_loss_secs = 5;
    c.operator(leader)
        .apply_app(pb::ApplyAppRequest { app: Some(spec.into()) })
        .await?;
    primary.psql("shop", "insert into seq values (0)")?;
    let written = parse_lsn(&primary.current_lsn()?).context("the primary's position")?;
    c.wait_state(leader, T, "the standby to catch up", |s| {
        s.db_status
            .get("shop")
            .and_then(|d| d.get("eu-west/c1"))
            .is_some_and(|st| st.role == Some(DbRole::Standby) && st.lsn.is_some_and(|l| l >= written))
    })
    .await?;

    let writer = SequenceWriter::start_paced(vec![primary.url("shop"), standby.url("shop")], Some(WRITES_PER_SEC));
    c.wait_state(leader, T, "the writer to get going", |_| writer.acked_on(0) >= 500)
        .await?;
    let lost_at = Instant::now();
    c.stop_agent(0).await;
    primary.stop_immediately()?;
    c.wait_state(leader, T, "a write acknowledged by the new primary", |_| {
        writer.first_ack_on(1).is_some()
    })
    .await?;
    let rto = writer.first_ack_on(1).expect("checked above") - lost_at;
    c.wait_state(leader, T, "the automatic failover to end", |s| {
        s.operations
            .values()
            .any(|o| o.created_by == "cutover/dr-auto" && o.state.is_finished())
    })
    .await?;
    let ok = c.node(leader).consensus().read(|s| {
        s.operations
            .values()
            .find(|o| o.created_by == "cutover/dr-auto")
            .map(|o| (o.state, o.summary.clone()))
    });
    if let Some((state, summary)) = ok
        && state != TaskState::Succeeded
    {
        bail!("the automatic failover failed: {summary}");
    }
    let acked = writer.finish().await;
    let rows = numbers_on(&standby);
    let lost = acked.iter().filter(|n| !rows.contains(n)).count();
    c.shutdown().await;
    Ok(Trial {
        rto_ms: rto.as_secs_f64() * 1000.0,
        acked: acked.len(),
        lost,
    })
}

pub async fn run(quick: bool, trials: usize) -> Result<serde_json::Value> {
    let n = if quick { 1 } else { trials.max(1) };
    let rows: &[(Detection, bool)] = if quick {
        &[(CUTOVER, false)]
    } else {
        &[(CUTOVER, false), (CUTOVER, true), (PATRONI, false), (PATRONI, true)]
    };
    println!(
        "dr: automatic failover after losing the primary region, {n} trials per row, {WRITES_PER_SEC} writes/s offered"
    );
    println!(
        "{:<16} {:<12} {:>6} {:>9} {:>9} {:>9} {:>11} {:>11} {:>12}",
        "detection", "replication", "trials", "RTO p50", "RTO p99", "RTO max", "lost p50", "lost max", "RPO max ms"
    );
    let mut out = Vec::new();
    for &(d, synchronous) in rows {
        let mut rto = Vec::new();
        let mut lost = Vec::new();
        let mut acked = 0;
        for i in 0..n {
            let t = trial(d, synchronous)
                .await
                .with_context(|| format!("{} trial {}", d.name, i + 1))?;
            rto.push(t.rto_ms);
            lost.push(t.lost as f64);
            acked += t.acked;
        }
        let (p50, p99, max) = util::summary(rto.clone());
        let (lost_p50, _, lost_max) = util::summary(lost.clone());
        let rpo_max_ms = lost_max * 1000.0 / f64::from(WRITES_PER_SEC);
        let replication = if synchronous { "synchronous" } else { "asynchronous" };
        println!(
            "{:<16} {:<12} {:>6} {:>7.0}ms {:>7.0}ms {:>7.0}ms {:>11.0} {:>11.0} {:>12.0}",
            d.name, replication, n, p50, p99, max, lost_p50, lost_max, rpo_max_ms
        );
        out.push(json!({
            "detection": d.name,
            "heartbeat_ms": d.heartbeat_ms,
            "failover_after_secs": d.failover_after_secs,
            "replication": replication,
            "trials": n,
            "rto_p50_ms": p50, "rto_p99_ms": p99, "rto_max_ms": max,
            "rto_samples_ms": rto,
            "writes_acknowledged": acked,
            "writes_lost_p50": lost_p50, "writes_lost_max": lost_max,
            "rpo_max_ms_at_offered_rate": rpo_max_ms,
            "writes_lost_samples": lost,
        }));
    }
    Ok(json!({"scenario": "dr", "writes_per_sec": WRITES_PER_SEC, "rows": out}))
}
