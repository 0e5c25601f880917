//! `cutover demo`'s disaster-recovery chapter, on real PostgreSQL servers
//! started from the installed binaries (what `scripts/setup --demo`
//! installs): app `shop` runs in us-east (the primary) and eu-west (a
//! streaming standby, `pg_basebackup -R`), with ap-south's agent running the
//! built-in front door before both.
//!
//! 1. A drill into eu-west: a copy of the standby served by a scratch color
//!    on a scratch server, its gates run, RTO and RPO measured, torn down.
//! 2. us-east is lost under load (its agent stopped, its database stopped
//!    at once) while a writer numbers its writes and a steady load goes
//!    through the front door. The app fails over to eu-west automatically.
//!    The chapter reports the RTO (from the loss to the failover's end), the
//!    RPO as acknowledged writes the new primary lacks, and the requests
//!    that failed at the front door meanwhile.
//! 3. us-east's agent comes back and its old primary rejoins as a standby
//!    of eu-west (`pg_rewind`, or a fresh base backup).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cutover_devkit::ports::stable_free_addr;
use cutover_devkit::postgres::TestPostgres;
use cutover_devkit::writer::{SequenceWriter, database, numbers_on};
use cutover_shared::app::AppSpec;
use cutover_shared::config::{TrafficApp, TrafficConfig, TrafficDriverKind};
use cutover_shared::domain::{Operation, TaskState};
use cutover_shared::dr::DbRole;
use cutover_shared::load::SteadyLoad;
use cutover_shared::proto as pb;

use crate::client::{ConnOpts, call};
use crate::dev::{AgentExtras, DevSystem};

/// The app the chapter fails over.
const APP: &str = "shop";
/// Where the front door runs: a region the app is not in, so it outlives
/// us-east.
const FRONT_DOOR_REGION: &str = "ap-south";
/// The chapter's own timeout for each wait.
const WAIT: Duration = Duration::from_secs(90);

/// The chapter's servers and addresses, chosen before the agents start
/// (their configs name them).
pub struct DrRig {
    primary: TestPostgres,
    standby: TestPostgres,
    /// Where drills restore their copies.
    _scratch: TestPostgres,
    /// Where the connection URLs are, unless the demo keeps its data.
    _files: Option<tempfile::TempDir>,
    /// `shop`'s router address in us-east and eu-west.
    routers: [String; 2],
    front_door: String,
}

/// What the chapter measured, for the report.
#[derive(Default, serde::Serialize)]
pub struct DrFigures {
    pub drill_rto_ms: Option<u64>,
    pub drill_rpo_ms: Option<u64>,
    pub failover_rto_ms: Option<u64>,
    pub writes_acknowledged: usize,
    pub writes_lost: usize,
    pub requests_served: u64,
    pub requests_failed: u64,
    pub rejoin_method: Option<String>,
}

fn secret_file(dir: &Path, name: &str, content: &str) -> Result<std::path::PathBuf> {
    let path = dir.join(name);
    cutover_shared::certs::write_file(&path, content, true)?;
    Ok(path)
}

impl DrRig {
    /// Starts the primary (with `shop.seq`), its standby and a scratch
    /// server, and says what the agents get: us-east the primary, eu-west
    /// the standby (each able to rebuild itself from the other), ap-south
    /// the front door. The servers' connection URLs (with passwords, mode
    /// 0600) go under `keep` when the demo keeps its data, else into a
    /// temporary directory.
    pub fn start(keep: Option<&Path>) -> Result<(DrRig, AgentExtras)> {
        let hint = "the DR chapter runs real PostgreSQL servers: `bash scripts/setup --demo` installs them, \
                    `cutover demo --no-dr` leaves the chapter out";
        let primary = TestPostgres::start().context(hint)?;
        let url = primary.create_database(APP)?;
        primary.psql(APP, "create table seq (n bigint primary key)")?;
        let standby = primary.start_standby().context(hint)?;
        let scratch = TestPostgres::start().context(hint)?;
        let (files, dir) = match keep {
            Some(d) => {
                let dir = d.join("dr");
                std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
                (None, dir)
            }
            None => {
                let t = tempfile::Builder::new().prefix("cutover-demo-dr-").tempdir()?;
                let dir = t.path().to_owned();
                (Some(t), dir)
            }
        };
        let dir = dir.as_path();
        let mut east = database(APP, &secret_file(dir, "primary-url", &url)?, DbRole::Primary, None);
        east.server = Some(primary.server_control()?);
        east.replication_sources = [(
            "eu-west/eu-west-1".to_owned(),
            secret_file(dir, "eu-west-replication-url", &standby.url("postgres"))?,
        )]
        .into();
        let mut west = database(
            APP,
            &secret_file(dir, "standby-url", &standby.url(APP))?,
            DbRole::Standby,
            Some("us-east/us-east-1"),
        );
        west.server = Some(standby.server_control()?);
        west.scratch_url_file = Some(secret_file(dir, "scratch-url", &scratch.url("postgres"))?);
        west.replication_sources = [(
            "us-east/us-east-1".to_owned(),
            secret_file(dir, "us-east-replication-url", &primary.url("postgres"))?,
        )]
        .into();
        let routers = [stable_free_addr(), stable_free_addr()];
        let front_door = stable_free_addr();
        let traffic = TrafficConfig {
            driver: TrafficDriverKind::FrontDoor,
            max_hold_ms: 10_000,
            route53: None,
            probe_interval_ms: 200,
            probe_failures: 2,
            apps: vec![TrafficApp {
                app: APP.into(),
                regions: [
                    ("us-east".to_owned(), routers[0].clone()),
                    ("eu-west".to_owned(), routers[1].clone()),
                ]
                .into(),
                primary: "us-east".into(),
                listen: Some(front_door.clone()),
                record: None,
                record_type: "CNAME".into(),
                ttl: 60,
                health: vec![cutover_shared::app::Probe::http("/health")],
            }],
        };
        let extras = AgentExtras {
            databases: [("us-east".to_owned(), vec![east]), ("eu-west".to_owned(), vec![west])].into(),
            traffic: [(FRONT_DOOR_REGION.to_owned(), traffic)].into(),
        };
        Ok((
            DrRig {
                primary,
                standby,
                _scratch: scratch,
                _files: files,
                routers,
                front_door,
            },
            extras,
        ))
    }

    /// `shop` in us-east and eu-west: the sample app (this binary) on the
    /// rig's router addresses, failing over automatically one second after
    /// its primary is lost, accepting at most 5 s of data loss.
    fn spec(&self) -> Result<AppSpec> {
        let exe = std::env::current_exe()?;
        let mut spec =
            cutover_devkit::sample_app::spec(APP, &[("us-east", "us-east-1"), ("eu-west", "eu-west-1")], &exe);
        for (c, listen) in spec.clusters.iter_mut().zip(&self.routers) {
            if let Some(l) = c.local.as_mut() {
                l.listen = listen.clone();
            }
        }
        spec.bake_secs = 0;
        spec.dr.automatic = true;
        spec.dr.failover_after_secs = 1;
        spec.dr.max_data_loss_secs = 5;
        Ok(spec)
    }
}

/// Waits until the replicated state satisfies `pred`.
async fn wait_state(
    sys: &DevSystem,
    what: &str,
    pred: impl Fn(&cutover_coordinator::state::State) -> bool,
) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let node = sys.any_node();
        if node.consensus().read(&pred) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {WAIT:?} waiting for {what}");
        }
        let mut applied = node.consensus().applied();
        let _ = tokio::time::timeout(Duration::from_millis(50), applied.changed()).await;
    }
}

async fn wait_until(what: &str, f: impl Fn() -> bool) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    while !f() {
        if Instant::now() > deadline {
            bail!("timed out after {WAIT:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn finished(sys: &DevSystem, id: &str) -> Result<Operation> {
    wait_state(sys, &format!("operation {id}"), |s| {
        s.operations.get(id).is_some_and(|o| o.state.is_finished())
    })
    .await?;
    let op = sys.any_node().consensus().read(|s| (*s.operations[id]).clone());
    if op.state != TaskState::Succeeded {
        bail!("{} {id} failed: {}", op.kind.as_str(), op.summary);
    }
    Ok(op)
}

/// Declares `shop`, deploys sample:v1 in both regions, and waits until the
/// standby replays what the primary wrote.
pub async fn install(conn: &ConnOpts, sys: &DevSystem, rig: &DrRig) -> Result<String> {
    let spec = rig.spec()?;
    call(conn, |mut c| {
        let spec = spec.clone();
        async move { c.apply_app(pb::ApplyAppRequest { app: Some(spec.into()) }).await }
    })
    .await?;
    let id = call(conn, |mut c| async move {
        c.deploy(pb::DeployRequest {
            app: APP.into(),
            image: "sample:v1".into(),
            ..Default::default()
        })
        .await
    })
    .await?
    .operation_id;
    finished(sys, &id).await?;
    rig.primary.psql(APP, "insert into seq values (0)")?;
    let written = cutover_shared::dr::parse_lsn(&rig.primary.current_lsn()?).context("the primary's WAL position")?;
    wait_state(sys, "the standby to report replaying the primary", |s| {
        s.db_status.get(APP).is_some_and(|dbs| {
            dbs.values()
                .any(|d| d.role == Some(DbRole::Standby) && d.lsn.is_some_and(|l| l >= written))
        })
    })
    .await?;
    Ok(format!(
        "primary in us-east, streaming standby in eu-west, front door {} on {FRONT_DOOR_REGION}'s agent",
        rig.front_door
    ))
}

/// Step 1: a drill into eu-west, then its report.
pub async fn drill(conn: &ConnOpts, sys: &DevSystem, figures: &mut DrFigures) -> Result<String> {
    let id = call(conn, |mut c| async move {
        c.drill(pb::DrillRequest {
            app: APP.into(),
            to: "eu-west".into(),
        })
        .await
    })
    .await?
    .operation_id;
    finished(sys, &id).await?;
    let drills = call(conn, |mut c| async move {
        c.list_drills(pb::ListDrillsRequest {
            app: APP.into(),
            limit: 1,
        })
        .await
    })
    .await?
    .drills;
    let d = drills.first().context("the drill has no report")?;
    if !d.passed {
        bail!("the drill failed ({}): {}", d.verdict, d.message);
    }
    figures.drill_rto_ms = d.rto_ms;
    figures.drill_rpo_ms = d.rpo_ms;
    let ms = |v: Option<u64>| v.map_or_else(|| "?".to_owned(), |v| format!("{v} ms"));
    Ok(format!(
        "a copy of eu-west's standby served by a scratch color and torn down: RTO {}, RPO {}",
        ms(d.rto_ms),
        ms(d.rpo_ms)
    ))
}

/// Step 2: us-east is lost under load and writes; the app fails over to
/// eu-west by itself.
pub async fn lose_us_east(sys: &mut DevSystem, rig: &DrRig, figures: &mut DrFigures) -> Result<String> {
    let load = SteadyLoad::start(&rig.front_door, 4, Duration::from_millis(20));
    let writer = SequenceWriter::start(vec![rig.primary.url(APP), rig.standby.url(APP)]);
    wait_until("writes on the primary and answers at the front door", || {
        writer.acked_on(0) >= 50 && load.counts().0 >= 50
    })
    .await?;
    let east = sys
        .agents
        .iter()
        .position(|a| a.region == "us-east")
        .context("no us-east agent")?;
    let lost = Instant::now();
    sys.stop_agent(east).await;
    rig.primary.stop_immediately()?;
    wait_state(sys, "the automatic failover", |s| {
        s.operations
            .values()
            .any(|o| o.created_by == "cutover/dr-auto" && o.state.is_finished())
    })
    .await?;
    let recovered = lost.elapsed();
    let op = sys.any_node().consensus().read(|s| {
        s.operations
            .values()
            .find(|o| o.created_by == "cutover/dr-auto")
            .cloned()
            .expect("checked above")
    });
    if op.state != TaskState::Succeeded {
        let (_, _) = (load.stop().await, writer.finish().await);
        bail!("the automatic failover failed: {}", op.summary);
    }
    let (served_then, _) = load.counts();
    wait_until("writes on the new primary and answers from eu-west", || {
        writer.acked_on(1) >= 50 && load.counts().0 >= served_then + 50
    })
    .await?;
    let (served, failed) = load.stop().await;
    let acked = writer.finish().await;
    let rows = numbers_on(&rig.standby);
    let lost_writes = acked.iter().filter(|n| !rows.contains(n)).count();
    figures.failover_rto_ms = Some(recovered.as_millis() as u64);
    figures.writes_acknowledged = acked.len();
    figures.writes_lost = lost_writes;
    figures.requests_served = served;
    figures.requests_failed = failed;
    Ok(format!(
        "automatic failover to eu-west: RTO {:.1} s (loss to traffic on the new primary); \
         RPO {lost_writes} of {} acknowledged writes lost; {failed} of {} requests failed at the front door; {}",
        recovered.as_secs_f64(),
        acked.len(),
        served + failed,
        op.summary
    ))
}

/// Step 3: us-east's agent is back; its old primary rejoins as a standby.
pub async fn rejoin(conn: &ConnOpts, sys: &mut DevSystem, figures: &mut DrFigures) -> Result<String> {
    let east = sys
        .agents
        .iter()
        .position(|a| a.region == "us-east")
        .context("no us-east agent")?;
    sys.start_agent(east)?;
    wait_state(sys, "us-east's agent to come back", |s| {
        s.agents
            .get("us-east/us-east-1")
            .is_some_and(|a| a.state == cutover_shared::domain::AgentState::Up)
    })
    .await?;
    let id = call(conn, |mut c| async move {
        c.rejoin(pb::RejoinRequest {
            app: APP.into(),
            region: "us-east".into(),
        })
        .await
    })
    .await?
    .operation_id;
    let op = finished(sys, &id).await?;
    figures.rejoin_method = op
        .tasks
        .iter()
        .filter_map(|t| t.result.as_ref())
        .find_map(|r| r.outputs.get("method").cloned());
    Ok(op.summary)
}
