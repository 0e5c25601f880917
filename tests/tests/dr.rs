//! Disaster recovery against a real PostgreSQL primary and its streaming
//! standby (`pg_basebackup -R`), with real agents and coordinators:
//! - agents report each database's role as the server sees it, its WAL
//!   position and its lag;
//! - `GetDrStatus` (and `cutover dr status`) show them per cluster;
//! - `PlanFailover` (and `cutover dr plan`) picks the standby, reports the
//!   data-loss window, and names what blocks a failover and the flag that
//!   overrides it: a paused standby's lag, a down agent;
//! - bad input (an unknown app or region, the primary's own region) is
//!   refused; a viewer may read; no connection password reaches the state
//!   or the logs.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use cutover_shared::app::AppSpec;
use cutover_shared::config::{DatabaseConfig, Route53Config, TrafficConfig, TrafficDriverKind};
use cutover_shared::domain::ClusterRef;
use cutover_shared::dr::{DbRole, parse_lsn};
use cutover_shared::proto as pb;
use cutover_tests::postgres::TestPostgres;
use cutover_tests::writer::{SequenceWriter, numbers_on};
use cutover_tests::{TestCluster, captured_logs, cutover_bin, sample_app_spec};

const REGIONS: &[(&str, &str)] = &[("us-east", "c1"), ("eu-west", "c1")];
/// Where the front door runs, when a test has one.
const EDGE: (&str, &str) = ("global", "edge");
const T: Duration = Duration::from_secs(30);

fn database(url_file: &Path, role: DbRole, follows: Option<&str>) -> DatabaseConfig {
    cutover_tests::writer::database("shop", url_file, role, follows)
}

/// The `cutover` CLI as the operator, against node `node`.
fn cli(c: &TestCluster, node: usize, args: &[&str]) -> (i32, String, String) {
    let op = &c.pki.operator;
    let env: HashMap<&str, String> = HashMap::from([
        ("CUTOVER_ADDR", c.addrs()[node].clone()),
        ("CUTOVER_CA", op.ca.display().to_string()),
        ("CUTOVER_CERT", op.cert.display().to_string()),
        ("CUTOVER_KEY", op.key.display().to_string()),
    ]);
    let out = Command::new(cutover_bin()).args(args).envs(env).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A primary with a `shop` database, its streaming standby, and a cluster
/// whose us-east agent has the primary and eu-west agent the standby, with
/// app `shop` declared in both (`max_data_loss_secs` 5).
struct Fixture {
    primary: TestPostgres,
    standby: TestPostgres,
    c: TestCluster,
    leader: usize,
}

async fn fixture(schema: &str) -> Fixture {
    fixture_with(schema, None, false, None).await
}

/// [`fixture`], with `scratch` as eu-west's scratch server (for drills),
/// with `servers` each agent controlling its own server and knowing how to
/// replicate from the other's (for rejoins), and with `traffic` a third
/// agent, `global/edge`, whose traffic driver (configured by `traffic`
/// from the app's definition) moves `shop`'s traffic.
async fn fixture_with(
    schema: &str,
    scratch: Option<&TestPostgres>,
    servers: bool,
    traffic: Option<&dyn Fn(&AppSpec) -> TrafficConfig>,
) -> Fixture {
    let primary = TestPostgres::start().unwrap();
    let url = primary.create_database("shop").unwrap();
    primary.psql("shop", schema).unwrap();
    let standby = primary.start_standby().unwrap();
    let standby_url = standby.url("shop");

    let mut spec = sample_app_spec("shop", REGIONS);
    spec.dr.max_data_loss_secs = 5;
    spec.bake_secs = 0;
    let mut regions = REGIONS.to_vec();
    if traffic.is_some() {
        regions.push(EDGE);
    }
    let mut c = TestCluster::builder().nodes(3).regions(&regions).start().await.unwrap();
    let leader = c.wait_leader(T).await.unwrap();
    let dir = c.tmp.path().to_owned();
    let (primary_file, standby_file) = (dir.join("primary-url"), dir.join("standby-url"));
    std::fs::write(&primary_file, &url).unwrap();
    std::fs::write(&standby_file, &standby_url).unwrap();
    let mut cfg = c.agent_config(0);
    cfg.databases = vec![database(&primary_file, DbRole::Primary, None)];
    if servers {
        let file = dir.join("eu-west-replication-url");
        std::fs::write(&file, standby.url("postgres")).unwrap();
        cfg.databases[0].server = Some(primary.server_control().unwrap());
        cfg.databases[0].replication_sources = [("eu-west/c1".to_owned(), file)].into();
    }
    c.start_agent_with(0, cfg).unwrap();
    let mut cfg = c.agent_config(1);
    cfg.databases = vec![database(&standby_file, DbRole::Standby, Some("us-east/c1"))];
    if let Some(s) = scratch {
        let file = dir.join("scratch-url");
        std::fs::write(&file, s.url("postgres")).unwrap();
        cfg.databases[0].scratch_url_file = Some(file);
    }
    if servers {
        let file = dir.join("us-east-replication-url");
        std::fs::write(&file, primary.url("postgres")).unwrap();
        cfg.databases[0].server = Some(standby.server_control().unwrap());
        cfg.databases[0].replication_sources = [("us-east/c1".to_owned(), file)].into();
    }
    c.start_agent_with(1, cfg).unwrap();
    if let Some(traffic) = traffic {
        let mut cfg = c.agent_config(2);
        cfg.traffic = Some(traffic(&spec));
        c.start_agent_with(2, cfg).unwrap();
    }
    c.wait_state(leader, T, "every agent up", |s| {
        s.agents
            .values()
            .filter(|a| a.state == cutover_shared::domain::AgentState::Up)
            .count()
            == regions.len()
    })
    .await
    .unwrap();
    c.operator(leader)
        .apply_app(pb::ApplyAppRequest { app: Some(spec.into()) })
        .await
        .unwrap();
    Fixture {
        primary,
        standby,
        c,
        leader,
    }
}

/// Waits until both agents reported, the standby caught up with everything
/// the primary wrote so far.
async fn wait_caught_up(primary: &TestPostgres, c: &TestCluster, leader: usize) {
    let written = parse_lsn(&primary.current_lsn().unwrap()).unwrap();
    c.wait_state(leader, T, "the standby's report to pass the primary's write", |s| {
        let Some(dbs) = s.db_status.get("shop") else {
            return false;
        };
        let (Some(p), Some(st)) = (dbs.get("us-east/c1"), dbs.get("eu-west/c1")) else {
            return false;
        };
        p.role == Some(DbRole::Primary)
            && st.role == Some(DbRole::Standby)
            && st.lsn.is_some_and(|l| l >= written)
            && p.lsn.is_some_and(|l| l >= written)
            && st.lag_ms == Some(0)
            && p.lsn == st.lsn
    })
    .await
    .unwrap();
}

/// Waits until the leader's automatic failover ended and returns it.
async fn automatic_failover(c: &TestCluster, leader: usize) -> cutover_shared::domain::Operation {
    let auto = |o: &&cutover_shared::domain::Operation| o.created_by == "cutover/dr-auto";
    c.wait_state(leader, T, "the automatic failover to finish", |s| {
        s.all_operations().filter(auto).any(|o| o.state.is_finished())
    })
    .await
    .unwrap();
    c.node(leader)
        .consensus()
        .read(|s| s.all_operations().find(auto).cloned().unwrap())
}

/// Waits until operation `id` ended, asserts it succeeded, returns it.
async fn succeeded(c: &TestCluster, leader: usize, id: &str, what: &str) -> cutover_shared::domain::Operation {
    c.wait_state(leader, T, what, |s| s.operations[id].state.is_finished())
        .await
        .unwrap();
    let done = c.node(leader).consensus().read(|s| (*s.operations[id]).clone());
    assert_eq!(
        done.state,
        cutover_shared::domain::TaskState::Succeeded,
        "{}",
        done.summary
    );
    done
}

/// Waits until eu-west's standby reports a replay lag over 5 s (the
/// fixture's max_data_loss).
async fn wait_standby_lag_over_5s(c: &TestCluster, leader: usize) {
    c.wait_state(leader, T, "the standby's lag over 5 s", |s| {
        s.db_status
            .get("shop")
            .and_then(|d| d.get("eu-west/c1"))
            .is_some_and(|d| d.lag_ms.is_some_and(|l| l > 5000))
    })
    .await
    .unwrap();
}

/// Waits until the agent of `cluster` (`region/cluster`) is marked down.
async fn wait_agent_down(c: &TestCluster, leader: usize, cluster: &str) {
    c.wait_state(leader, T, &format!("{cluster}'s agent down"), |s| {
        s.agents
            .get(cluster)
            .is_some_and(|a| a.state == cutover_shared::domain::AgentState::Down)
    })
    .await
    .unwrap();
}

/// A planned failover of `shop` to eu-west, followed until it succeeded.
async fn fail_over_to_eu_west(c: &TestCluster, leader: usize) -> cutover_shared::domain::Operation {
    let id = c
        .operator(leader)
        .failover(pb::FailoverRequest {
            app: "shop".into(),
            to: "eu-west".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .operation_id;
    succeeded(c, leader, &id, "the failover to finish").await
}

/// Deploys `sample:v1` of `shop` everywhere and waits until it succeeded.
async fn deploy_v1(c: &TestCluster, leader: usize) {
    let id = c
        .operator(leader)
        .deploy(pb::DeployRequest {
            app: "shop".into(),
            image: "sample:v1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .operation_id;
    succeeded(c, leader, &id, "the deploy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_and_its_standby_are_reported_and_the_plan_promotes_the_standby() {
    let logs = captured_logs();
    let Fixture {
        primary,
        standby,
        mut c,
        leader,
    } = fixture(
        "create table orders (id bigint primary key, item text not null); \
         insert into orders select g, md5(g::text) from generate_series(1, 1000) g;",
    )
    .await;
    let mut op = c.operator(leader);

    // Writes on the primary reach the standby, and both agents say so: the
    // standby's replayed position catches up with the primary's.
    primary
        .psql(
            "shop",
            "insert into orders select g, 'late' from generate_series(1001, 1500) g",
        )
        .unwrap();
    wait_caught_up(&primary, &c, leader).await;

    // A viewer may read the DR status; it shows both roles and no lag.
    let mut viewer = c.client(&c.pki.viewer, leader).unwrap();
    let st = viewer
        .get_dr_status(pb::GetDrStatusRequest { app: "shop".into() })
        .await
        .unwrap()
        .into_inner();
    let by: HashMap<String, &pb::DrClusterStatus> = st
        .clusters
        .iter()
        .map(|c| (format!("{}/{}", c.region, c.cluster), c))
        .collect();
    let (p, s) = (&by["us-east/c1"], &by["eu-west/c1"]);
    assert!(p.agent_up && s.agent_up);
    let (pd, sd) = (p.database.as_ref().unwrap(), s.database.as_ref().unwrap());
    assert_eq!(pd.role, pb::DatabaseRole::Primary as i32);
    assert_eq!(sd.role, pb::DatabaseRole::Standby as i32);
    assert_eq!(sd.follows, "us-east/c1");
    assert_eq!(s.lag_bytes, Some(0));
    assert_eq!(p.lag_bytes, None);

    // The plan: promote eu-west's standby, nothing lost, nothing blocking.
    let plan = shop_plan(&mut op, "").await;
    assert_eq!(
        (plan.from_region.as_str(), plan.to_region.as_str()),
        ("us-east", "eu-west")
    );
    assert_eq!(plan.source, "standby");
    assert_eq!(plan.data_loss_window_ms, Some(0));
    assert_eq!(plan.max_data_loss_ms, 5000);
    assert!(plan.blockers.is_empty(), "{:?}", plan.blockers);
    let steps: Vec<&str> = plan.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(steps, ["fence", "promote", "repoint", "move-traffic", "verify"]);

    // The CLI prints the same plan as JSON for tools, exit 0 when ready.
    let (code, out, err) = cli(&c, leader, &["dr", "plan", "--app", "shop", "-o", "json"]);
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["to"], "eu-west/c1");
    assert_eq!(v["ready"], true);
    let (code, out, err) = cli(&c, leader, &["dr", "status", "--app", "shop"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("us-east/c1") && out.contains("primary") && out.contains("standby"),
        "{out}"
    );

    // Bad input changes nothing and says why.
    let e = op
        .plan_failover(pb::PlanFailoverRequest {
            app: "shop".into(),
            to: "us-east".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("holds the primary already"), "{}", e.message());
    let e = op
        .plan_failover(pb::PlanFailoverRequest {
            app: "shop".into(),
            to: "ap-south".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = op
        .get_dr_status(pb::GetDrStatusRequest { app: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = op
        .plan_failover(pb::PlanFailoverRequest {
            app: "../x".into(),
            to: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    // A standby that stops replaying falls behind: once its lag is over the
    // app's max_data_loss (5 s), the plan says so and names the override.
    standby.psql("postgres", "SELECT pg_wal_replay_pause()").unwrap();
    primary
        .psql(
            "shop",
            "insert into orders select g, 'paused' from generate_series(1501, 1600) g",
        )
        .unwrap();
    wait_standby_lag_over_5s(&c, leader).await;
    let plan = shop_plan(&mut op, "eu-west").await;
    assert!(
        plan.blockers
            .iter()
            .any(|b| b.overridden_by == "--accept-data-loss" && b.reason.contains("max_data_loss")),
        "{:?}",
        plan.blockers
    );
    let (code, out, _) = cli(&c, leader, &["dr", "plan", "--app", "shop"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("override: --accept-data-loss"), "{out}");
    standby.psql("postgres", "SELECT pg_wal_replay_resume()").unwrap();
    c.wait_state(leader, T, "the standby caught up again", |s| {
        s.db_status
            .get("shop")
            .and_then(|d| d.get("eu-west/c1"))
            .is_some_and(|d| d.lag_ms == Some(0))
    })
    .await
    .unwrap();

    // The standby's agent goes away: the plan is blocked, with no override.
    c.stop_agent(1).await;
    wait_agent_down(&c, leader, "eu-west/c1").await;
    let plan = shop_plan(&mut op, "").await;
    assert!(
        plan.blockers
            .iter()
            .any(|b| b.reason.contains("agent for eu-west/c1 is down") && b.overridden_by.is_empty()),
        "{:?}",
        plan.blockers
    );

    // The password of either server is nowhere in the state or the logs.
    let state = c.node(leader).consensus().read(|s| format!("{:?}", s.db_status));
    assert!(!state.contains(primary.password()), "{state}");
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(!text.contains(primary.password()), "a password reached the logs");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_failover_under_writes_loses_nothing_and_fences_the_old_primary() {
    let Fixture {
        primary,
        standby,
        c,
        leader,
    } = fixture("create table seq (n bigint primary key)").await;
    let mut op = c.operator(leader);
    wait_caught_up(&primary, &c, leader).await;
    // The app runs in both regions, so the failover verifies eu-west with
    // the gates of the color serving there.
    deploy_v1(&c, leader).await;

    // A refused failover changes nothing: the primary's own region.
    let before = c
        .node(leader)
        .consensus()
        .read(|s| (s.operations.len(), s.audit_sequence));
    let e = op
        .failover(pb::FailoverRequest {
            app: "shop".into(),
            to: "us-east".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
    let after = c
        .node(leader)
        .consensus()
        .read(|s| (s.operations.len(), s.audit_sequence));
    assert_eq!(before, after);

    let writer = SequenceWriter::start(vec![primary.url("shop"), standby.url("shop")]);
    c.wait_state(leader, T, "the writer to get going", |_| writer.acked_on(0) >= 50)
        .await
        .unwrap();
    let started = op
        .failover(pb::FailoverRequest {
            app: "shop".into(),
            to: "eu-west".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(started.epoch, 1);
    let done = succeeded(&c, leader, &started.operation_id, "the failover to finish").await;
    assert!(done.summary.contains("data lost: nothing"), "{}", done.summary);
    let steps: Vec<String> = done
        .tasks
        .iter()
        .map(|t| format!("{} {}", t.spec.kind, t.spec.target.region))
        .collect();
    assert_eq!(
        steps,
        [
            "app.maintenance us-east",
            "db.failover us-east",
            "db.failover eu-west",
            "app.gates eu-west"
        ]
    );

    // The writer carries on against the new primary; then every number
    // whose commit was acknowledged, on either server, is there.
    c.wait_state(leader, T, "writes on the new primary", |_| writer.acked_on(1) >= 50)
        .await
        .unwrap();
    let acked = writer.finish().await;
    let rows = numbers_on(&standby);
    let lost: Vec<&i64> = acked.iter().filter(|n| !rows.contains(n)).collect();
    assert!(lost.is_empty(), "{} acknowledged writes lost: {lost:?}", lost.len());
    assert!(acked.len() >= 100);

    // The old primary refuses writes; the new one is a primary.
    let e = primary
        .psql("shop", "insert into seq values (-1)")
        .unwrap_err()
        .to_string();
    assert!(e.contains("read-only transaction"), "{e}");
    assert_eq!(standby.psql("shop", "select pg_is_in_recovery()").unwrap(), "f");

    // DR status shows the epoch, the new primary and the fenced old one.
    c.wait_state(leader, T, "us-east reported fenced, eu-west primary", |s| {
        let Some(dbs) = s.db_status.get("shop") else {
            return false;
        };
        dbs.get("us-east/c1").is_some_and(|d| d.fenced)
            && dbs
                .get("eu-west/c1")
                .is_some_and(|d| d.role == Some(DbRole::Primary) && !d.fenced)
    })
    .await
    .unwrap();
    let st = op
        .get_dr_status(pb::GetDrStatusRequest { app: "shop".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((st.epoch, st.epoch_primary.as_str()), (1, "eu-west/c1"));
    let (code, out, err) = cli(&c, leader, &["dr", "status", "--app", "shop"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("fenced") && out.contains("primary epoch 1, made primary: eu-west/c1"),
        "{out}"
    );
    c.shutdown().await;
}

/// A planned failover behind the built-in front door, under steady load
/// through it: no request fails. The front door (on a third agent) holds
/// new requests from before the fence until the standby is promoted, then
/// sends them, and everything after, to eu-west. us-east stays in
/// maintenance afterwards, so every answer after the failover is eu-west's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_planned_failover_through_the_front_door_fails_no_request() {
    let door = cutover_tests::stable_free_addr();
    let Fixture {
        primary,
        standby: _standby,
        c,
        leader,
    } = fixture_with(
        "create table seq (n bigint primary key)",
        None,
        false,
        Some(&|spec: &AppSpec| cutover_tests::shop_traffic_config(spec, TrafficDriverKind::FrontDoor, Some(&door))),
    )
    .await;
    wait_caught_up(&primary, &c, leader).await;
    deploy_v1(&c, leader).await;

    // 4 keep-alive connections, a request every 20 ms each.
    let load = cutover_shared::load::SteadyLoad::start(&door, 4, Duration::from_millis(20));
    c.wait_state(leader, T, "load through the front door", |_| load.counts().0 >= 100)
        .await
        .unwrap();
    let (ok_before, failed_before) = load.counts();
    assert_eq!(failed_before, 0, "requests failed before the failover");
    let started = std::time::Instant::now();
    let done = fail_over_to_eu_west(&c, leader).await;
    let finished = std::time::Instant::now();
    c.wait_state(leader, T, "load on eu-west", |_| load.counts().0 >= ok_before + 200)
        .await
        .unwrap();
    let window = load.latencies_started_between(started, finished);
    let (ok, failed) = load.stop().await;
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed during a planned failover",
        ok + failed
    );

    let steps: Vec<String> = done
        .tasks
        .iter()
        .map(|t| format!("{} {}", t.spec.kind, t.spec.target))
        .collect();
    assert_eq!(
        steps,
        [
            "traffic.move global/edge",
            "app.maintenance us-east/c1",
            "db.failover us-east/c1",
            "db.failover eu-west/c1",
            "traffic.move global/edge",
            "app.gates eu-west/c1",
        ]
    );
    assert!(
        done.summary.contains("traffic sent to eu-west (front-door, ")
            && done.summary.contains("held requests released"),
        "{}",
        done.summary
    );
    let moved = done.tasks[4].result.as_ref().unwrap();
    assert!(
        moved
            .message
            .contains("verified through the front door: 1 probes passed"),
        "{}",
        moved.message
    );
    let out = cutover_shared::task::outputs::TrafficOutputs::from_wire(&moved.outputs);
    assert_eq!(out.region.as_deref(), Some("eu-west"));
    let released = out.released.unwrap();
    assert!(released > 0, "the front door held nothing: {}", moved.message);
    assert!(out.held_max_ms.unwrap() < 30_000, "{}", moved.message);
    assert!(!window.is_empty(), "no request started during the failover");
    let p99 = window[(window.len() * 99 / 100).min(window.len() - 1)];
    println!(
        "planned failover through the front door: {ok} requests, 0 failed; {released} held, longest {} ms; \
         requests started during the failover: {}, p99 {} ms, max {} ms",
        out.held_max_ms.unwrap(),
        window.len(),
        p99.as_millis(),
        window.last().unwrap().as_millis()
    );

    // us-east is fenced and in maintenance: a 200 now comes from eu-west.
    let after = cutover_shared::load::SteadyLoad::start(&door, 1, Duration::from_millis(10));
    c.wait_state(leader, T, "answers after the failover", |_| after.counts().0 >= 20)
        .await
        .unwrap();
    assert_eq!(after.stop().await.1, 0);
    c.shutdown().await;
}

/// A failover whose traffic driver is Route 53 (moto's server): the move
/// step upserts one weighted record set per region, the new primary's
/// weighted 100 and the old one's 0, and nothing else in the zone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_moves_route53_weights_to_the_new_region() {
    let moto = cutover_tests::s3::TestS3::start().unwrap();
    let r53 = moto.route53();
    let zone = r53
        .create_hosted_zone()
        .name("example.com.")
        .caller_reference("cutover-test")
        .send()
        .await
        .unwrap()
        .hosted_zone
        .unwrap()
        .id;
    let zone = zone.trim_start_matches("/hostedzone/").to_owned();
    let creds = tempfile::tempdir().unwrap();
    let creds_file = creds.path().join("credentials");
    std::fs::write(
        &creds_file,
        "[default]\naws_access_key_id = AKIDTEST\naws_secret_access_key = test-secret\n",
    )
    .unwrap();
    let r53_config = Route53Config {
        hosted_zone_id: zone.clone(),
        endpoint: Some(moto.endpoint()),
        region: "us-east-1".into(),
        credentials_file: Some(creds_file),
    };
    let Fixture {
        primary,
        standby: _standby,
        c,
        leader,
    } = fixture_with(
        "create table seq (n bigint primary key)",
        None,
        false,
        Some(&|spec: &AppSpec| TrafficConfig {
            route53: Some(r53_config.clone()),
            ..cutover_tests::shop_traffic_config(spec, TrafficDriverKind::Route53, None)
        }),
    )
    .await;
    wait_caught_up(&primary, &c, leader).await;
    let done = fail_over_to_eu_west(&c, leader).await;
    let moves: Vec<&str> = done
        .tasks
        .iter()
        .filter(|t| t.spec.kind == "traffic.move")
        .map(|t| t.result.as_ref().unwrap().message.as_str())
        .collect();
    assert_eq!(moves.len(), 2, "{moves:?}");
    assert!(moves[0].contains("cannot hold"), "{}", moves[0]);
    assert!(moves[1].contains("INSYNC"), "{}", moves[1]);

    let sets = r53
        .list_resource_record_sets()
        .hosted_zone_id(&zone)
        .send()
        .await
        .unwrap()
        .resource_record_sets;
    let mut weights: Vec<(String, String, i64)> = sets
        .iter()
        .filter(|s| s.name == "shop.example.com.")
        .map(|s| {
            (
                s.r#type.as_str().to_owned(),
                s.set_identifier.clone().unwrap_or_default(),
                s.weight.unwrap_or(-1),
            )
        })
        .collect();
    weights.sort();
    assert_eq!(
        weights,
        [
            ("CNAME".into(), "eu-west".into(), 100),
            ("CNAME".into(), "us-east".into(), 0),
        ]
    );
    // Each set's value, from the raw answer (moto wraps values in CDATA,
    // which the SDK's XML parser reads as empty).
    let xml = moto
        .route53_get(&format!("/2013-04-01/hostedzone/{zone}/rrset"))
        .unwrap();
    for (region, weight) in [("eu-west", 100), ("us-east", 0)] {
        let set = xml
            .split("<ResourceRecordSet>")
            .find(|s| s.contains(&format!("<SetIdentifier>{region}</SetIdentifier>")))
            .unwrap_or_else(|| panic!("no set for {region}: {xml}"));
        assert!(set.contains(&format!("<Weight>{weight}</Weight>")), "{set}");
        assert!(set.contains(&format!("shop.{region}.example.com]]>")), "{set}");
    }
    c.shutdown().await;
}

/// The old region is lost (its agent down) while the standby lags: a
/// failover is refused until `--force` (the old primary cannot be fenced)
/// and `--accept-data-loss` (the lag is over max_data_loss) are both
/// given; then it promotes and reports the window. When the old region
/// comes back, the leader fences the primary it still has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_failover_past_a_lost_region_reports_its_loss_and_the_region_comes_back_fenced() {
    let Fixture {
        primary,
        standby,
        mut c,
        leader,
    } = fixture("create table seq (n bigint primary key)").await;
    let mut op = c.operator(leader);
    // One transaction replayed, so the standby's lag has a clock.
    primary.psql("shop", "insert into seq values (0)").unwrap();
    wait_caught_up(&primary, &c, leader).await;
    deploy_v1(&c, leader).await;

    // The standby loses its primary (no WAL receiver any more); the primary
    // takes 100 more writes, which the standby will never see.
    standby
        .psql("postgres", "ALTER SYSTEM SET primary_conninfo = ''")
        .unwrap();
    standby.psql("postgres", "SELECT pg_reload_conf()").unwrap();
    primary
        .psql("shop", "insert into seq select g from generate_series(1, 100) g")
        .unwrap();
    wait_standby_lag_over_5s(&c, leader).await;
    // The primary's report names the 100 writes too (before its agent is
    // lost), so the plan knows the WAL the standby lacks.
    let written = parse_lsn(&primary.current_lsn().unwrap()).unwrap();
    // ... made over 5 s after the standby replayed its last transaction:
    // the data-loss window of a lost primary ends at its last report.
    c.wait_state(
        leader,
        T,
        "the primary's report of the 100 writes, 5 s past the standby",
        |s| {
            let Some(dbs) = s.db_status.get("shop") else {
                return false;
            };
            let (Some(p), Some(st)) = (dbs.get("us-east/c1"), dbs.get("eu-west/c1")) else {
                return false;
            };
            let replayed_at = st.lag_ms.map(|l| st.observed_at_unix_ms - l as i64);
            p.lsn.is_some_and(|l| l >= written) && replayed_at.is_some_and(|r| p.observed_at_unix_ms - r > 5_500)
        },
    )
    .await
    .unwrap();
    // The agent's config, to bring it back later.
    let mut us_east_cfg = c.agent_config(0);
    us_east_cfg.databases = vec![database(&c.tmp.path().join("primary-url"), DbRole::Primary, None)];
    // ... able to rejoin: it controls its server and reaches eu-west's.
    let eu_west_url = c.tmp.path().join("eu-west-replication-url");
    std::fs::write(&eu_west_url, standby.url("postgres")).unwrap();
    us_east_cfg.databases[0].server = Some(primary.server_control().unwrap());
    us_east_cfg.databases[0].replication_sources = [("eu-west/c1".to_owned(), eu_west_url)].into();
    c.stop_agent(0).await;
    wait_agent_down(&c, leader, "us-east/c1").await;

    let failover = |force: bool, accept_data_loss: bool| pb::FailoverRequest {
        app: "shop".into(),
        to: "eu-west".into(),
        force,
        accept_data_loss,
        rejoin: false,
    };
    let ops_before = c.node(leader).consensus().read(|s| s.operations.len());
    let e = op.failover(failover(false, false)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(
        e.message().contains("override: --force") && e.message().contains("override: --accept-data-loss"),
        "{}",
        e.message()
    );
    let e = op.failover(failover(true, false)).await.unwrap_err();
    assert!(
        e.message().contains("override: --accept-data-loss") && !e.message().contains("override: --force"),
        "{}",
        e.message()
    );
    assert_eq!(c.node(leader).consensus().read(|s| s.operations.len()), ops_before);

    let started = op.failover(failover(true, true)).await.unwrap().into_inner();
    let done = succeeded(&c, leader, &started.operation_id, "the forced failover to finish").await;
    assert!(
        done.summary.contains("could not be fenced")
            && done.summary.contains("bytes of WAL the standby never replayed"),
        "{}",
        done.summary
    );
    assert_eq!(
        done.tasks.len(),
        2,
        "promote and gates in eu-west only: {:?}",
        done.tasks
    );
    // What was lost: the writes the standby never replayed.
    let new_rows: i64 = standby
        .psql("shop", "select count(*) from seq")
        .unwrap()
        .parse()
        .unwrap();
    assert!(new_rows < 100, "the paused standby had {new_rows} of 100 rows");
    assert_eq!(standby.psql("shop", "select pg_is_in_recovery()").unwrap(), "f");

    // us-east comes back: its database is still a writable primary until
    // the leader fences it under the current epoch.
    c.start_agent_with(0, us_east_cfg).unwrap();
    c.wait_state(leader, T, "us-east's old primary fenced", |s| {
        s.db_status
            .get("shop")
            .and_then(|d| d.get("us-east/c1"))
            .is_some_and(|d| d.fenced)
    })
    .await
    .unwrap();
    let e = primary
        .psql("shop", "insert into seq values (-1)")
        .unwrap_err()
        .to_string();
    assert!(e.contains("read-only transaction"), "{e}");
    c.wait_state(leader, T, "the fence operation to finish", |s| {
        s.operations
            .values()
            .any(|o| o.created_by == "cutover/dr-fence" && o.state.is_finished())
    })
    .await
    .unwrap();
    let fence = c.node(leader).consensus().read(|s| {
        s.operations
            .values()
            .find(|o| o.created_by == "cutover/dr-fence")
            .cloned()
    });
    let fence = fence.expect("a fence operation");
    assert_eq!(
        fence.state,
        cutover_shared::domain::TaskState::Succeeded,
        "{}",
        fence.summary
    );
    assert!(
        fence.summary.contains("left over from before epoch 1"),
        "{}",
        fence.summary
    );

    // Rejoined, it gives up the writes the failover gave up (pg_rewind
    // rewinds them away) and follows eu-west: the same rows on both.
    let (code, out, err) = cli(&c, leader, &["dr", "rejoin", "--app", "shop", "--region", "us-east"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("us-east/c1 rejoined as a standby of eu-west/c1 (pg_rewind)"),
        "{out}"
    );
    wait_recovery(&primary, "t").await;
    standby.psql("shop", "insert into seq values (1000001)").unwrap();
    let deadline = std::time::Instant::now() + T;
    while numbers_on(&primary) != numbers_on(&standby) {
        assert!(std::time::Instant::now() < deadline, "us-east never matched eu-west");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.shutdown().await;
}

/// `show default_transaction_read_only` in a new session, polled until it
/// reads `want` (the agent acts on its own clock: there is nothing to
/// wait on but the server).
fn wait_read_only(pg: &TestPostgres, want: &str) {
    let deadline = std::time::Instant::now() + T;
    loop {
        // The fence ends every other session, this one included if it is
        // caught open: that is a "not yet".
        let now = pg
            .psql("shop", "show default_transaction_read_only")
            .unwrap_or_else(|e| e.to_string());
        if now == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "default_transaction_read_only still {now} after {T:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Cut off from every coordinator for its lease, an agent fences its own
/// primary (writes refused); when a leader is back and no failover was
/// decided meanwhile, it lifts the fence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cut_off_from_the_coordinators_fences_its_primary_until_they_return() {
    let primary = TestPostgres::start().unwrap();
    let url = primary.create_database("shop").unwrap();
    primary.psql("shop", "create table seq (n bigint primary key)").unwrap();
    let mut c = TestCluster::builder()
        .nodes(3)
        .regions(&[("us-east", "c1")])
        .start()
        .await
        .unwrap();
    let leader = c.wait_leader(T).await.unwrap();
    let url_file = c.tmp.path().join("primary-url");
    std::fs::write(&url_file, &url).unwrap();
    let mut cfg = c.agent_config(0);
    cfg.databases = vec![database(&url_file, DbRole::Primary, None)];
    cfg.lease_secs = 2;
    c.start_agent_with(0, cfg).unwrap();
    c.wait_state(leader, T, "the primary reported", |s| {
        s.db_status
            .get("shop")
            .and_then(|d| d.get("us-east/c1"))
            .is_some_and(|d| d.role == Some(DbRole::Primary) && !d.fenced)
    })
    .await
    .unwrap();
    primary.psql("shop", "insert into seq values (1)").unwrap();

    for i in 0..3 {
        c.stop_node(i).await;
    }
    wait_read_only(&primary, "on");
    let e = primary
        .psql("shop", "insert into seq values (2)")
        .unwrap_err()
        .to_string();
    assert!(e.contains("read-only transaction"), "{e}");

    for i in 0..3 {
        c.start_node(i).await.unwrap();
    }
    c.wait_leader(T).await.unwrap();
    wait_read_only(&primary, "off");
    primary.psql("shop", "insert into seq values (3)").unwrap();
    c.shutdown().await;
}

/// The primary region is lost (its agent and its database stop). With
/// `dr.automatic`, the leader fails the app over to the standby once the
/// agent has been down for `failover_after_secs`, not before, and a writer
/// that follows the primary carries on there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_primary_region_fails_over_automatically() {
    lose_the_primary_region(false).await;
}

/// The same with synchronous replication (`synchronous_standby_names`):
/// every write the lost primary acknowledged is on the new one (RPO 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_primary_with_synchronous_replication_loses_no_acknowledged_write() {
    lose_the_primary_region(true).await;
}

async fn lose_the_primary_region(synchronous: bool) {
    let Fixture {
        primary,
        standby,
        mut c,
        leader,
    } = fixture("create table seq (n bigint primary key)").await;
    let mut op = c.operator(leader);
    let mut spec = sample_app_spec("shop", REGIONS);
    spec.bake_secs = 0;
    spec.dr.automatic = true;
    spec.dr.failover_after_secs = 1;
    spec.dr.max_data_loss_secs = 5;
    op.apply_app(pb::ApplyAppRequest { app: Some(spec.into()) })
        .await
        .unwrap();
    if synchronous {
        // A commit is acknowledged once the standby flushed it.
        primary
            .psql("postgres", "ALTER SYSTEM SET synchronous_standby_names = '*'")
            .unwrap();
        primary.psql("postgres", "SELECT pg_reload_conf()").unwrap();
    }
    primary.psql("shop", "insert into seq values (0)").unwrap();
    wait_caught_up(&primary, &c, leader).await;
    let writer = SequenceWriter::start(vec![primary.url("shop"), standby.url("shop")]);
    c.wait_state(leader, T, "the writer to get going", |_| writer.acked_on(0) >= 50)
        .await
        .unwrap();

    c.stop_agent(0).await;
    primary.stop_immediately().unwrap();
    let done = automatic_failover(&c, leader).await;
    let down_at = c
        .node(leader)
        .consensus()
        .read(|s| s.agents["us-east/c1"].since_unix_ms);
    assert_eq!(
        done.state,
        cutover_shared::domain::TaskState::Succeeded,
        "{}",
        done.summary
    );
    assert!(done.summary.contains("to eu-west/c1 at epoch 1"), "{}", done.summary);
    assert!(
        done.created_at_unix_ms - down_at >= 1000,
        "started {} ms after the agent was marked down, before failover_after_secs",
        done.created_at_unix_ms - down_at
    );
    c.wait_state(leader, T, "writes on the new primary", |_| writer.acked_on(1) >= 50)
        .await
        .unwrap();
    let acked = writer.finish().await;
    let rows = numbers_on(&standby);
    // Asynchronous replication: what the lost primary acknowledged last may
    // be gone, but never a write the new primary acknowledged.
    let lost = acked.iter().filter(|n| !rows.contains(n)).count();
    let max = acked.iter().max().copied().unwrap_or(0);
    assert!(
        rows.contains(&max),
        "the newest acknowledged write is on the new primary"
    );
    eprintln!(
        "automatic failover ({}): {}; {lost} of {} acknowledged writes lost",
        if synchronous { "synchronous" } else { "asynchronous" },
        done.summary,
        acked.len()
    );
    if synchronous {
        assert_eq!(lost, 0, "synchronous replication lost acknowledged writes");
    }
    let audit = c.node(leader).consensus().read(|s| {
        s.audit
            .iter()
            .any(|e| e.actor == "cutover/dr-auto" && e.action == "AutomaticFailover")
    });
    assert!(audit, "the automatic failover is audited");
    c.shutdown().await;
}

/// `shop`'s failover plan into `to` (empty: the region the plan picks).
async fn shop_plan(
    c: &mut cutover_shared::proto::control_service_client::ControlServiceClient<tonic::transport::Channel>,
    to: &str,
) -> pb::FailoverPlan {
    c.plan_failover(pb::PlanFailoverRequest {
        app: "shop".into(),
        to: to.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .plan
    .unwrap()
}

/// `shop`'s drill reports, newest first (at most `limit`; 0: all).
async fn list_drills(
    c: &mut cutover_shared::proto::control_service_client::ControlServiceClient<tonic::transport::Channel>,
    limit: u32,
) -> Vec<pb::DrillReport> {
    c.list_drills(pb::ListDrillsRequest {
        app: "shop".into(),
        limit,
    })
    .await
    .unwrap()
    .into_inner()
    .drills
}

/// The scratch databases drills left on `pg` (none, after each drill).
fn drill_databases(pg: &TestPostgres) -> String {
    pg.psql(
        "postgres",
        "select coalesce(string_agg(datname, ','), '') from pg_database where datname like 'shop_drill_%'",
    )
    .unwrap()
    .trim()
    .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drill_under_load_measures_rto_and_rpo_and_changes_nothing_in_production() {
    let scratch = TestPostgres::start().unwrap();
    let Fixture {
        primary,
        standby,
        c,
        leader,
    } = fixture_with(
        "create table seq (n bigint primary key); \
         create table orders (id bigint primary key); insert into orders select generate_series(1, 500);",
        Some(&scratch),
        false,
        None,
    )
    .await;
    deploy_v1(&c, leader).await;
    wait_caught_up(&primary, &c, leader).await;
    let mut op = c.operator(leader);
    let spec = c.node(leader).consensus().read(|s| s.apps["shop"].clone());
    let service = spec.clusters[0].local.as_ref().unwrap().listen.clone();

    // Production under steady load: requests at us-east's front door and
    // numbered writes on the primary.
    let load = cutover_tests::load::SteadyLoad::start(&service, 4, Duration::from_millis(20));
    let writer = SequenceWriter::start(vec![primary.url("shop")]);
    let timeline = primary
        .psql("shop", "select timeline_id from pg_control_checkpoint()")
        .unwrap();

    let (code, out, err) = cli(&c, leader, &["dr", "drill", "--app", "shop", "--to", "eu-west"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("drill into eu-west/c1 passed: RTO"), "{out}");

    // The report: kept in Raft, listed newest first, with RTO and RPO and
    // each phase measured; the CLI and the status show it.
    let drills = list_drills(&mut op, 0).await;
    assert_eq!(drills.len(), 1, "{drills:?}");
    let d = &drills[0];
    assert!(d.passed, "{d:?}");
    assert_eq!(
        (d.region.as_str(), d.verdict.as_str(), d.source.as_str()),
        ("eu-west", "passed", "standby")
    );
    assert_eq!(d.image, "sample:v1");
    let (rto, rpo) = (d.rto_ms.unwrap(), d.rpo_ms.unwrap());
    assert!(rto > 0 && rto < 60_000, "RTO {rto} ms");
    assert!(rpo < 5_000, "RPO {rpo} ms from a standby that keeps up");
    for phase in ["clone", "checks", "serve", "gates", "teardown"] {
        assert!(d.phase_ms.contains_key(phase), "{phase} not measured: {:?}", d.phase_ms);
    }
    eprintln!("drill: RTO {rto} ms, RPO {rpo} ms, phases {:?}", d.phase_ms);
    // The failover runbook now expects what the drill measured.
    let plan = shop_plan(&mut op, "eu-west").await;
    let expected = |name: &str| plan.steps.iter().find(|s| s.name == name).and_then(|s| s.expected_ms);
    assert_eq!(expected("verify"), Some(d.phase_ms["gates"]));
    assert_eq!(expected("repoint"), Some(d.phase_ms["serve"] + d.phase_ms["gates"]));
    assert_eq!(expected("promote"), None);
    let (code, out, err) = cli(&c, leader, &["dr", "drills", "list", "--app", "shop"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("eu-west/c1") && out.contains("passed") && out.contains(&d.operation_id),
        "{out}"
    );
    let (code, out, _) = cli(&c, leader, &["dr", "status", "--app", "shop"]);
    assert_eq!(code, 0);
    assert!(out.contains("last drill into eu-west/c1: passed: RTO"), "{out}");

    // Production is untouched: no request failed, every write landed on
    // the same primary on the same timeline, the standby still follows,
    // no epoch was committed, and the scratch copy and color are gone.
    let (ok, failed) = load.stop().await;
    let acked = writer.finish().await;
    eprintln!(
        "during the drill: {ok} requests ok, {failed} failed; {} writes acknowledged",
        acked.len()
    );
    assert_eq!(failed, 0, "{failed} requests failed during a drill");
    assert!(ok > 0 && !acked.is_empty());
    let stored = primary.psql("shop", "select count(*) from seq").unwrap();
    assert_eq!(stored.trim(), acked.len().to_string());
    assert_eq!(
        primary
            .psql("shop", "select timeline_id from pg_control_checkpoint()")
            .unwrap(),
        timeline
    );
    assert_eq!(primary.psql("shop", "select pg_is_in_recovery()").unwrap().trim(), "f");
    assert_eq!(standby.psql("shop", "select pg_is_in_recovery()").unwrap().trim(), "t");
    assert!(c.node(leader).consensus().read(|s| s.dr_epochs.is_empty()));
    assert_eq!(drill_databases(&scratch), "");

    // A drill whose copy fails the app's checks is reported failed at that
    // phase, and still tears down.
    let mut strict = spec.clone();
    strict.migration_checks = vec!["select count(*) > 1000000 from orders".into()];
    op.apply_app(pb::ApplyAppRequest {
        app: Some(strict.into()),
    })
    .await
    .unwrap();
    let (code, out, _) = cli(&c, leader, &["dr", "drill", "--app", "shop", "--to", "eu-west"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("failed at checks"), "{out}");
    let drills = list_drills(&mut op, 1).await;
    assert_eq!(drills.len(), 1);
    assert!(
        !drills[0].passed && drills[0].verdict == "checks" && drills[0].rto_ms.is_none(),
        "{:?}",
        drills[0]
    );
    assert_eq!(drill_databases(&scratch), "");

    // Bad input changes nothing and says why; a viewer reads the reports
    // but cannot start a drill.
    let e = op
        .drill(pb::DrillRequest {
            app: "nope".into(),
            to: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = op
        .drill(pb::DrillRequest {
            app: "shop".into(),
            to: "ap-south".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = op
        .drill(pb::DrillRequest {
            app: "shop".into(),
            to: "../x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let mut viewer = c.client(&c.pki.viewer, leader).unwrap();
    let e = viewer
        .drill(pb::DrillRequest {
            app: "shop".into(),
            to: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    let listed = list_drills(&mut viewer, 0).await;
    assert_eq!(listed.len(), 2);

    // On a schedule: the leader starts a drill at the next slot (every
    // 2 s here), as the schedule's actor, until it is removed.
    op.apply_app(pb::ApplyAppRequest { app: Some(spec.into()) })
        .await
        .unwrap();
    let (code, out, err) = cli(
        &c,
        leader,
        &[
            "dr",
            "drill",
            "schedule",
            "--app",
            "shop",
            "--cron",
            "*/2 * * * * *",
            "--to",
            "eu-west",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("into eu-west"), "{out}");
    c.wait_state(leader, T, "a scheduled drill to pass", |s| {
        s.drills["shop"]
            .iter()
            .any(|d| d.requested_by == "cutover/drill-schedule" && d.passed)
    })
    .await
    .unwrap();
    let (code, out, err) = cli(&c, leader, &["dr", "drill", "unschedule", "--app", "shop"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = cli(&c, leader, &["dr", "drills", "list", "--app", "shop"]);
    assert_eq!(code, 0);
    assert!(out.contains("schedule: none"), "{out}");
    let e = op
        .delete_drill_schedule(pb::DeleteDrillScheduleRequest { app: "shop".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    c.shutdown().await;
}

/// Waits until `pg`'s role is `recovery` (`t`: a standby, `f`: a primary).
async fn wait_recovery(pg: &TestPostgres, want: &str) {
    let deadline = std::time::Instant::now() + T;
    loop {
        let got = pg.psql("postgres", "select pg_is_in_recovery()").unwrap_or_default();
        if got.trim() == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pg_is_in_recovery() stayed {got:?}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_over_primary_rejoins_and_fails_back_ending_where_it_started_with_nothing_lost() {
    let Fixture {
        primary,
        standby,
        c,
        leader,
    } = fixture_with("create table seq (n bigint primary key)", None, true, None).await;
    deploy_v1(&c, leader).await;
    wait_caught_up(&primary, &c, leader).await;
    let writer = SequenceWriter::start(vec![primary.url("shop"), standby.url("shop")]);
    writer.wait_acked(0, 50).await;

    // Planned failover: eu-west is the primary, us-east fenced.
    let (code, out, err) = cli(&c, leader, &["dr", "failover", "--app", "shop", "--to", "eu-west"]);
    assert_eq!(code, 0, "{out}{err}");
    writer.wait_acked(1, 50).await;

    // Rejoin: us-east's server is rewound onto eu-west's timeline and
    // streams from it; its app takes traffic again.
    let (code, out, err) = cli(&c, leader, &["dr", "rejoin", "--app", "shop", "--region", "us-east"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("us-east/c1 rejoined as a standby of eu-west/c1 (pg_rewind)"),
        "{out}"
    );
    wait_recovery(&primary, "t").await;
    c.wait_state(leader, T, "us-east reported as a standby", |s| {
        s.db_status
            .get("shop")
            .and_then(|d| d.get("us-east/c1"))
            .is_some_and(|d| d.role == Some(DbRole::Standby) && d.lag_ms.is_some_and(|l| l < 5000))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", c.node(leader).consensus().read(|s| s.db_status.clone())));
    // Rejoining the current primary is refused, changing nothing.
    let (code, _, err) = cli(&c, leader, &["dr", "rejoin", "--app", "shop", "--region", "eu-west"]);
    assert_ne!(code, 0);
    assert!(err.contains("holds shop's primary"), "{err}");

    // Failback: us-east is the primary again and eu-west a standby of it.
    let (code, out, err) = cli(&c, leader, &["dr", "failback", "--app", "shop"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("failed over eu-west/c1 to us-east/c1 at epoch 2"), "{out}");
    assert!(out.contains("eu-west/c1 rejoined as a standby of us-east/c1"), "{out}");
    writer.wait_acked(0, 50).await;
    wait_recovery(&standby, "t").await;
    wait_recovery(&primary, "f").await;

    // Nothing lost: every acknowledged number is on us-east, and reaches
    // eu-west's standby.
    let acked = writer.finish().await;
    let stored = numbers_on(&primary);
    let missing: Vec<&i64> = acked.iter().filter(|n| !stored.contains(n)).collect();
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
    eprintln!(
        "failover, rejoin, failback: {} writes acknowledged, none lost",
        acked.len()
    );
    wait_caught_up(&primary, &c, leader).await;
    assert_eq!(
        standby.psql("shop", "select count(*) from seq").unwrap(),
        primary.psql("shop", "select count(*) from seq").unwrap()
    );
    assert_eq!(
        primary
            .psql("shop", "show default_transaction_read_only")
            .unwrap()
            .trim(),
        "off"
    );
    let epoch = c.node(leader).consensus().read(|s| s.dr_epochs["shop"].clone());
    assert_eq!(
        (epoch.epoch, epoch.primary),
        (2, Some(ClusterRef::new("us-east", "c1").unwrap()))
    );
    c.shutdown().await;
}

/// Behind the front door, the front door's probes are the other regions'
/// view of the app. us-east's agent and database are lost, but the address
/// the front door sends us-east's traffic to still passes its probes: the
/// app serves there, so nothing fails over, however long the agent stays
/// down. Once that address fails its probes too, the automatic failover
/// starts, and its audit records what the front door saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_automatic_failover_waits_for_the_front_door_to_lose_the_region() {
    // What the front door reaches in us-east: a server outside the agent,
    // so it outlives it.
    let east = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let east_addr = east.local_addr().unwrap().to_string();
    let (stop_east, stopped) = tokio::sync::oneshot::channel::<()>();
    let east_app = tokio::spawn(cutover_agent::sample_app::serve("us-east".into(), east, async move {
        let _ = stopped.await;
    }));
    let door = cutover_tests::stable_free_addr();
    let Fixture {
        primary,
        standby,
        mut c,
        leader,
    } = fixture_with(
        "create table seq (n bigint primary key)",
        None,
        false,
        Some(&|spec: &AppSpec| {
            let mut t = cutover_tests::shop_traffic_config(spec, TrafficDriverKind::FrontDoor, Some(&door));
            t.apps[0].regions.insert("us-east".into(), east_addr.clone());
            t
        }),
    )
    .await;
    // The spec the front door was configured from (its routers' ports).
    let mut spec = c.node(leader).consensus().read(|s| s.apps["shop"].clone());
    spec.dr.automatic = true;
    spec.dr.failover_after_secs = 1;
    spec.dr.max_data_loss_secs = 5;
    c.operator(leader)
        .apply_app(pb::ApplyAppRequest { app: Some(spec.into()) })
        .await
        .unwrap();
    wait_caught_up(&primary, &c, leader).await;
    deploy_v1(&c, leader).await;
    c.wait_state(leader, T, "the front door to report both regions healthy", |s| {
        s.region_health
            .get("shop")
            .is_some_and(|m| m.len() == 2 && m.values().all(|h| h.healthy && h.by == "global/edge"))
    })
    .await
    .unwrap();

    // A writer keeps the standby's lag known (and in max_data_loss).
    let writer = SequenceWriter::start(vec![primary.url("shop"), standby.url("shop")]);
    c.wait_state(leader, T, "the writer to get going", |_| writer.acked_on(0) >= 50)
        .await
        .unwrap();
    c.stop_agent(0).await;
    primary.stop_immediately().unwrap();
    // The watch decides every tick: with us-east's agent down for three
    // times failover_after and the standby no longer streaming, only the
    // front door's view holds the failover back.
    c.wait_state(
        leader,
        T,
        "us-east's agent down for 3 s, its standby cut off (or a failover)",
        |s| {
            let down_for = s
                .agents
                .get("us-east/c1")
                .filter(|a| a.state == cutover_shared::domain::AgentState::Down)
                .map(|a| cutover_shared::domain::now_unix_ms() - a.since_unix_ms);
            let cut_off = s
                .db_status
                .get("shop")
                .and_then(|d| d.get("eu-west/c1"))
                .is_some_and(|d| d.streaming == Some(false));
            let failed_over = s.operations.values().any(|o| o.created_by == "cutover/dr-auto");
            (down_for.is_some_and(|ms| ms >= 3_000) && cut_off) || failed_over
        },
    )
    .await
    .unwrap();
    let started = c
        .node(leader)
        .consensus()
        .read(|s| s.operations.values().any(|o| o.created_by == "cutover/dr-auto"));
    assert!(!started, "failed over while the front door still reached us-east");

    // What the watch would do but for the front door: the plan it
    // follows is blocked only by the lost agent, which automatic failover
    // overrides.
    let plan = shop_plan(&mut c.operator(leader), "").await;
    let blockers: Vec<&str> = plan.blockers.iter().map(|b| b.overridden_by.as_str()).collect();
    assert_eq!(blockers, ["--force"], "{:?}", plan.blockers);
    let region_lost = cutover_shared::domain::now_unix_ms();
    let _ = stop_east.send(());
    east_app.await.unwrap().unwrap();
    let op = automatic_failover(&c, leader).await;
    let audit = c.node(leader).consensus().read(|s| {
        s.audit
            .iter()
            .find(|e| e.action == "AutomaticFailover")
            .map(|e| e.parameters.clone())
            .unwrap()
    });
    assert_eq!(op.state, cutover_shared::domain::TaskState::Succeeded, "{}", op.summary);
    assert!(
        op.created_at_unix_ms >= region_lost,
        "started before the front door lost us-east"
    );
    let params: serde_json::Value = serde_json::from_str(&audit).unwrap();
    assert_eq!(params["region_probes"]["healthy"], false, "{audit}");
    assert_eq!(params["region_probes"]["by"], "global/edge", "{audit}");
    c.shutdown().await;
}

/// No standby in eu-west: a cold server (its `[[databases]]` entry says
/// standby; it does not replicate) and a validated backup of us-east. The
/// cold server's agent fences it (never a second primary) until a failover
/// claims it. The plan restores the newest validated backup, its age the
/// data-loss window. With us-east lost, a forced failover claims eu-west's
/// server, restores the backup onto it (checked against the rows recorded
/// when it was taken), and eu-west takes writes with every row the backup
/// held; what us-east took after the backup is the loss the plan named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_without_a_standby_fails_over_by_restoring_the_newest_validated_backup() {
    let s3 = cutover_tests::s3::TestS3::start().unwrap();
    s3.create_bucket("backups", true).unwrap();
    let primary = TestPostgres::start().unwrap();
    let url = primary.create_database("shop").unwrap();
    primary
        .psql(
            "shop",
            "create table seq (n bigint primary key); insert into seq select g from generate_series(1, 1000) g",
        )
        .unwrap();
    let cold = TestPostgres::start().unwrap();
    let cold_url = cold.create_database("shop").unwrap();
    // Where drills into eu-west put their scratch copy.
    let scratch = TestPostgres::start().unwrap();

    let mut c = TestCluster::builder().nodes(3).regions(REGIONS).start().await.unwrap();
    let leader = c.wait_leader(T).await.unwrap();
    let dir = c.tmp.path().to_owned();
    let key = cutover_agent::backup::seal::BackupKey::generate("k1").unwrap().to_hex();
    let store = s3.backup_config("backups", "cutover/", &dir, &key, "s3cret").unwrap();
    let (primary_file, cold_file) = (dir.join("primary-url"), dir.join("cold-url"));
    std::fs::write(&primary_file, &url).unwrap();
    std::fs::write(&cold_file, &cold_url).unwrap();
    let mut cfg = c.agent_config(0);
    cfg.databases = vec![database(&primary_file, DbRole::Primary, None)];
    cfg.backup = Some(store.clone());
    c.start_agent_with(0, cfg).unwrap();
    let mut cfg = c.agent_config(1);
    cfg.databases = vec![database(&cold_file, DbRole::Standby, None)];
    let scratch_file = dir.join("scratch-url");
    std::fs::write(&scratch_file, scratch.url("postgres")).unwrap();
    cfg.databases[0].scratch_url_file = Some(scratch_file);
    cfg.backup = Some(store);
    c.start_agent_with(1, cfg).unwrap();
    c.wait_state(leader, T, "eu-west's cold server fenced", |s| {
        s.db_status
            .get("shop")
            .and_then(|d| d.get("eu-west/c1"))
            .is_some_and(|d| d.role == Some(DbRole::Primary) && d.fenced)
    })
    .await
    .unwrap();
    assert_eq!(cold.psql("shop", "show default_transaction_read_only").unwrap(), "on");

    let mut spec = sample_app_spec("shop", REGIONS);
    spec.bake_secs = 0;
    spec.dr.max_data_loss_secs = 3600;
    let mut op = c.operator(leader);
    op.apply_app(pb::ApplyAppRequest { app: Some(spec.into()) })
        .await
        .unwrap();
    deploy_v1(&c, leader).await;
    // A drill into the cold standby has nothing to copy until a backup is
    // validated.
    let e = op
        .drill(pb::DrillRequest {
            app: "shop".into(),
            to: "eu-west".into(),
        })
        .await
        .unwrap_err();
    assert!(
        e.message().contains("no validated backup to drill with"),
        "{}",
        e.message()
    );
    let created = op
        .create_backup(pb::CreateBackupRequest {
            app: "shop".into(),
            region: "us-east".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .operation_id;
    succeeded(&c, leader, &created, "the backup").await;
    let backup_id = c.node(leader).consensus().read(|s| {
        s.backups
            .values()
            .find(|b| b.operation_id == created)
            .map(|b| b.id.clone())
            .unwrap()
    });
    let validated = op
        .validate_backup(pb::ValidateBackupRequest { id: backup_id.clone() })
        .await
        .unwrap()
        .into_inner()
        .operation_id;
    succeeded(&c, leader, &validated, "the validation").await;
    // Drilled from the backup: restored into a scratch database, served,
    // checked, torn down; the cold server untouched.
    let drill = op
        .drill(pb::DrillRequest {
            app: "shop".into(),
            to: "eu-west".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .operation_id;
    succeeded(&c, leader, &drill, "the drill from the backup").await;
    let report = list_drills(&mut op, 1).await.remove(0);
    assert_eq!((report.source.as_str(), report.passed), ("backup", true), "{report:?}");
    assert!(report.rpo_ms.is_some_and(|ms| ms > 0), "{report:?}");
    assert_eq!(drill_databases(&scratch), "", "the scratch copy is gone");
    assert_eq!(
        cold.psql("shop", "select count(*) from pg_tables where tablename = 'seq'")
            .unwrap(),
        "0"
    );
    // Taken after the backup: lost with us-east.
    primary
        .psql("shop", "insert into seq select g from generate_series(1001, 1100) g")
        .unwrap();

    let plan = shop_plan(&mut op, "").await;
    assert_eq!(
        (plan.source.as_str(), plan.backup_id.as_str(), plan.to_region.as_str()),
        ("backup", backup_id.as_str(), "eu-west")
    );
    assert!(plan.steps.iter().any(|s| s.name == "restore"), "{:?}", plan.steps);
    assert!(plan.blockers.is_empty(), "{:?}", plan.blockers);

    c.stop_agent(0).await;
    primary.stop_immediately().unwrap();
    wait_agent_down(&c, leader, "us-east/c1").await;
    let id = op
        .failover(pb::FailoverRequest {
            app: "shop".into(),
            to: "eu-west".into(),
            force: true,
            accept_data_loss: false,
            rejoin: false,
        })
        .await
        .unwrap()
        .into_inner()
        .operation_id;
    let done = succeeded(&c, leader, &id, "the failover").await;
    let restored = done
        .tasks
        .iter()
        .find(|t| t.spec.kind == "db.backup")
        .and_then(|t| t.result.as_ref())
        .map(|r| r.message.clone())
        .unwrap();
    assert!(restored.contains(&backup_id), "{restored}");
    assert_eq!(cold.psql("shop", "select count(*) from seq").unwrap(), "1000");
    cold.psql("shop", "insert into seq values (5000)").unwrap();
    let primary_now = c.node(leader).consensus().read(|s| s.dr_epochs["shop"].primary.clone());
    assert_eq!(primary_now, Some(ClusterRef::new("eu-west", "c1").unwrap()));
    c.shutdown().await;
}
