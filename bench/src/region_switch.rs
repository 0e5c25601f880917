//! `switch`, second table: moving an app's traffic to another region, the
//! way a planned DR failover does it, through each traffic driver.
//!
//! Each trial starts afresh: a PostgreSQL primary (us-east) and its
//! streaming standby (eu-west), three in-process coordinators, the two
//! regions' agents, and a third agent (`global/edge`) whose `[traffic]`
//! driver moves app `shop`: the built-in front door, or Route 53 weighted
//! records in moto's Route 53 (`moto_server`, the same program the S3
//! tests use). The operator's `Failover` to eu-west is timed:
//! - `moved`: from the call to the end of the `traffic.move` task that
//!   sends traffic to eu-west, as the agent reported it;
//! - `task`: that task alone, from its creation to its end (the driver's
//!   own cost: the door's flip and its probes, or the Route 53 change);
//! - `seen` (Route 53 only): from the call to the first `ListResourceRecordSets`
//!   answer, polled every 5 ms by an outside client, that weights eu-west
//!   100 and us-east 0;
//! - `done`: from the call to the operation's success.
//!
//! moto answers a change `INSYNC` at once; real Route 53 takes tens of
//! seconds to propagate a change to its name servers, and resolvers keep
//! the old answer for the record's TTL after that. The figures are what
//! cutover adds, not what a DNS client sees.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cutover_shared::app::AppSpec;
use cutover_shared::config::{Route53Config, TrafficConfig, TrafficDriverKind};
use cutover_shared::domain::{AgentState, Operation, TaskState, now_unix_ms};
use cutover_shared::dr::DbRole;
use cutover_shared::proto as pb;
use cutover_tests::postgres::TestPostgres;
use cutover_tests::s3::TestS3;
use cutover_tests::{TestCluster, sample_app_spec};
use serde_json::json;

use crate::util;

const REGIONS: &[(&str, &str)] = &[("us-east", "c1"), ("eu-west", "c1"), ("global", "edge")];
const T: Duration = Duration::from_secs(120);

/// One failover's figures, in milliseconds from the operator's call.
struct Trial {
    moved_ms: f64,
    /// The move task alone: its creation to its end.
    task_ms: f64,
    seen_ms: Option<f64>,
    done_ms: f64,
}

/// moto's Route 53 with a hosted zone for `example.com.`: the driver's
/// configuration, and a client to watch the zone with.
async fn hosted_zone(moto: &TestS3, dir: &Path) -> Result<(Route53Config, aws_sdk_route53::Client, String)> {
    let r53 = moto.route53();
    let zone = r53
        .create_hosted_zone()
        .name("example.com.")
        .caller_reference(format!("cutover-bench-{}", now_unix_ms()))
        .send()
        .await
        .context("creating a hosted zone in moto")?
        .hosted_zone
        .context("moto answered without the zone")?
        .id;
    let zone = zone.trim_start_matches("/hostedzone/").to_owned();
    let creds = dir.join("aws-credentials");
    std::fs::write(
        &creds,
        "[default]\naws_access_key_id = AKIDTEST\naws_secret_access_key = test-secret\n",
    )?;
    let cfg = Route53Config {
        hosted_zone_id: zone.clone(),
        endpoint: Some(moto.endpoint()),
        region: "us-east-1".into(),
        credentials_file: Some(creds),
    };
    Ok((cfg, r53, zone))
}

/// `shop`'s `[traffic]` (the DR tests'): us-east serving, through the
/// front door or through Route 53.
fn traffic(spec: &AppSpec, route53: Option<Route53Config>) -> TrafficConfig {
    let (driver, listen) = match route53 {
        None => (TrafficDriverKind::FrontDoor, Some(cutover_tests::stable_free_addr())),
        Some(_) => (TrafficDriverKind::Route53, None),
    };
    let mut cfg = TrafficConfig {
        route53,
        ..cutover_tests::shop_traffic_config(spec, driver, listen.as_deref())
    };
    // No probes of the regions in the background: the failover is what is
    // timed (the front door's move still checks the app's own probes).
    for app in &mut cfg.apps {
        app.health.clear();
    }
    cfg
}

/// Whether `zone` weights eu-west 100 and us-east 0 for `shop.example.com.`.
async fn eu_west_weighted(r53: &aws_sdk_route53::Client, zone: &str) -> Result<bool> {
    let sets = r53
        .list_resource_record_sets()
        .hosted_zone_id(zone)
        .send()
        .await
        .context("listing the zone's record sets")?
        .resource_record_sets;
    let weight = |region: &str| {
        sets.iter()
            .find(|s| s.name == "shop.example.com." && s.set_identifier.as_deref() == Some(region))
            .and_then(|s| s.weight)
    };
    Ok(weight("eu-west") == Some(100) && weight("us-east") == Some(0))
}

async fn trial(moto: Option<&TestS3>) -> Result<Trial> {
    let primary = TestPostgres::start()?;
    let url = primary.create_database("shop")?;
    primary.psql("shop", "create table seq (n bigint primary key)")?;
    let standby = primary.start_standby()?;
    let mut c = TestCluster::builder().nodes(3).regions(REGIONS).start().await?;
    let leader = c.wait_leader(T).await?;
    let dir = c.tmp.path().to_owned();
    let (route53, watcher) = match moto {
        Some(moto) => {
            let (cfg, client, zone) = hosted_zone(moto, &dir).await?;
            (Some(cfg), Some((client, zone)))
        }
        None => (None, None),
    };
    crate::dr::start_database_agents(&mut c, &url, &standby.url("shop"))?;
    let mut spec = sample_app_spec("shop", &REGIONS[..2]);
    spec.dr.max_data_loss_secs = 5;
    spec.bake_secs = 0;
    let mut cfg = c.agent_config(2);
    cfg.traffic = Some(traffic(&spec, route53));
    c.start_agent_with(2, cfg)?;
    c.wait_state(leader, T, "every agent up", |s| {
        s.agents.values().filter(|a| a.state == AgentState::Up).count() == REGIONS.len()
    })
    .await?;
    let mut op = c.operator(leader);
    op.apply_app(pb::ApplyAppRequest { app: Some(spec.into()) }).await?;
    // The app serves in both regions: the front door's move checks its
    // health probes through the door.
    let deploy = pb::DeployRequest {
        app: "shop".into(),
        image: "sample:v1".into(),
        ..Default::default()
    };
    let deployed = op.deploy(deploy).await?.into_inner().operation_id;
    crate::wait_op(&c, leader, &deployed).await?;
    primary.psql("shop", "insert into seq values (0)")?;
    let written = cutover_shared::dr::parse_lsn(&primary.current_lsn()?).context("the primary's position")?;
    c.wait_state(leader, T, "the standby to catch up", |s| {
        s.db_status.get("shop").is_some_and(|d| {
            let st = d.get("eu-west/c1");
            let p = d.get("us-east/c1");
            st.is_some_and(|st| st.role == Some(DbRole::Standby) && st.lsn.is_some_and(|l| l >= written))
                && p.is_some_and(|p| p.lsn.is_some_and(|l| l >= written))
        })
    })
    .await?;

    // The watcher starts before the call: its first "seen" is this
    // failover's doing.
    let watch = watcher.map(|(client, zone)| {
        tokio::spawn(async move {
            loop {
                if eu_west_weighted(&client, &zone).await? {
                    return Ok::<_, anyhow::Error>(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    });
    let called_unix_ms = now_unix_ms();
    let called = Instant::now();
    let id = op
        .failover(pb::FailoverRequest {
            app: "shop".into(),
            to: "eu-west".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .operation_id;
    c.wait_state(leader, T, "the failover to finish", |s| {
        s.operations.get(&id).is_some_and(|o| o.state.is_finished())
    })
    .await?;
    let done_ms = util::ms_since(called);
    let done: Operation = c.node(leader).consensus().read(|s| (*s.operations[&id]).clone());
    if done.state != TaskState::Succeeded {
        bail!("the failover failed: {}", done.summary);
    }
    let (created_at, moved_at) = done
        .tasks
        .iter()
        .filter(|t| t.spec.kind == "traffic.move" && t.spec.params.get("action").map(String::as_str) == Some("move"))
        .find_map(|t| t.result.as_ref().map(|r| (t.created_at_unix_ms, r.finished_at_unix_ms)))
        .context("the failover has no finished traffic move")?;
    let seen_ms = match watch {
        Some(w) => {
            let at = tokio::time::timeout(Duration::from_secs(30), w)
                .await
                .context("moto never listed eu-west at weight 100")???;
            Some(at.duration_since(called).as_secs_f64() * 1000.0)
        }
        None => None,
    };
    c.shutdown().await;
    Ok(Trial {
        moved_ms: (moved_at - called_unix_ms) as f64,
        task_ms: (moved_at - created_at) as f64,
        seen_ms,
        done_ms,
    })
}

/// The table's rows: a planned failover's traffic move through the front
/// door and through Route 53, `trials` each.
pub async fn run(quick: bool, trials: usize) -> Result<Vec<serde_json::Value>> {
    let n = if quick { 1 } else { trials.max(1) };
    let moto = TestS3::start().context("moto's server for Route 53")?;
    let mut rows = Vec::new();
    for driver in ["front-door", "route53"] {
        let mut moved = Vec::new();
        let mut task = Vec::new();
        let mut seen = Vec::new();
        let mut done = Vec::new();
        for i in 0..n {
            let t = trial((driver == "route53").then_some(&moto))
                .await
                .with_context(|| format!("{driver} trial {}", i + 1))?;
            moved.push(t.moved_ms);
            task.push(t.task_ms);
            seen.extend(t.seen_ms);
            done.push(t.done_ms);
        }
        let (moved_p50, moved_p99, moved_max) = util::summary(moved.clone());
        let (done_p50, done_p99, _) = util::summary(done.clone());
        let (task_p50, task_p99, _) = util::summary(task.clone());
        let seen_p = (!seen.is_empty()).then(|| util::summary(seen.clone()));
        rows.push(json!({
            "driver": driver,
            "trials": n,
            "moved_p50_ms": moved_p50, "moved_p99_ms": moved_p99, "moved_max_ms": moved_max,
            "move_task_p50_ms": task_p50, "move_task_p99_ms": task_p99,
            "seen_p50_ms": seen_p.map(|s| s.0), "seen_p99_ms": seen_p.map(|s| s.1),
            "done_p50_ms": done_p50, "done_p99_ms": done_p99,
            "moved_samples_ms": moved, "seen_samples_ms": seen, "done_samples_ms": done,
        }));
    }
    Ok(rows)
}

/// Prints [`run`]'s rows as a table.
pub fn print(rows: &[serde_json::Value]) {
    let trials = rows.first().and_then(|r| r["trials"].as_u64()).unwrap_or(0);
    println!(
        "switch between regions: a planned failover (Failover to eu-west) moving app traffic, {trials} trials per row, each from a fresh cluster"
    );
    println!(
        "{:<12} {:>13} {:>13} {:>12} {:>12} {:>12} {:>12} {:>12}",
        "driver",
        "moved p50 ms",
        "moved p99 ms",
        "task p50 ms",
        "seen p50 ms",
        "seen p99 ms",
        "done p50 ms",
        "done p99 ms"
    );
    for r in rows {
        let f = |k: &str| r[k].as_f64().map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"));
        println!(
            "{:<12} {:>13} {:>13} {:>12} {:>12} {:>12} {:>12} {:>12}",
            r["driver"].as_str().unwrap_or(""),
            f("moved_p50_ms"),
            f("moved_p99_ms"),
            f("move_task_p50_ms"),
            f("seen_p50_ms"),
            f("seen_p99_ms"),
            f("done_p50_ms"),
            f("done_p99_ms")
        );
    }
    println!(
        "(moved: call to the traffic.move task's end; task: that task alone, created to ended; seen: call to moto listing eu-west at 100; done: call to the operation's success)"
    );
}
