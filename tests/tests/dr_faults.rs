//! Failover under coordinator faults, with coordinators and agents as real
//! processes, a real PostgreSQL primary and its streaming standby, and a
//! writer that numbers its writes: the leader is killed with SIGKILL while
//! each step of a planned failover runs (maintenance, fence, promote,
//! gates). The failover completes exactly once: one epoch, every step
//! executed once by its agent, nothing acknowledged lost.

use std::time::{Duration, Instant};

use cutover_shared::dr::DbRole;
use cutover_shared::proto as pb;
use cutover_tests::postgres::TestPostgres;
use cutover_tests::process::{ProcessCluster, TaskEventKind};
use cutover_tests::sample_app_spec;
use cutover_tests::writer::{SequenceWriter, database, numbers_on};

const T: Duration = Duration::from_secs(120);
const REGIONS: &[(&str, &str)] = &[("us-east", "c1"), ("eu-west", "c1")];

/// Waits until agent `agent` logged the start of task `task_id`.
async fn wait_started(pc: &ProcessCluster, agent: usize, task_id: &str) {
    let deadline = Instant::now() + T;
    loop {
        let started = pc
            .agent_task_events(agent)
            .iter()
            .any(|e| e.task_id == task_id && matches!(e.kind, TaskEventKind::Started { .. }));
        if started {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "task {task_id} never started\n{}",
            pc.log_tails(30)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leader_killed_during_each_failover_step_fails_over_exactly_once() {
    let primary = TestPostgres::start().unwrap();
    let url = primary.create_database("shop").unwrap();
    primary.psql("shop", "create table seq (n bigint primary key)").unwrap();
    let standby = primary.start_standby().unwrap();
    let standby_url = standby.url("shop");
    let mut pc = ProcessCluster::start_with(3, REGIONS, |i, cfg, dir| {
        let file = dir.join(format!("db-url-{i}"));
        if i == 0 {
            std::fs::write(&file, &url).unwrap();
            cfg.databases = vec![database("shop", &file, DbRole::Primary, None)];
        } else {
            std::fs::write(&file, &standby_url).unwrap();
            cfg.databases = vec![database("shop", &file, DbRole::Standby, Some("us-east/c1"))];
        }
    })
    .await
    .unwrap();
    pc.wait_leader(T).await.unwrap();
    pc.wait_agents_up(T).await.unwrap();
    let mut spec = sample_app_spec("shop", REGIONS);
    spec.bake_secs = 0;
    pc.any("ApplyApp", |mut c| {
        let spec = spec.clone();
        async move { c.apply_app(pb::ApplyAppRequest { app: Some(spec.into()) }).await }
    })
    .await
    .unwrap();
    let deploy = pc
        .any("Deploy", |mut c| async move {
            c.deploy(pb::DeployRequest {
                app: "shop".into(),
                image: "sample:v1".into(),
                ..Default::default()
            })
            .await
        })
        .await
        .unwrap()
        .operation_id;
    let d = pc.wait_finished(&deploy, T).await.unwrap();
    assert_eq!(d.state, pb::TaskState::Succeeded as i32, "{}", d.summary);

    let writer = SequenceWriter::start(vec![primary.url("shop"), standby.url("shop")]);
    writer.wait_acked(0, 50).await;
    // The plan is ready once both agents reported the standby caught up.
    let deadline = Instant::now() + T;
    loop {
        let plan = pc
            .any("PlanFailover", |mut c| async move {
                c.plan_failover(pb::PlanFailoverRequest {
                    app: "shop".into(),
                    to: "eu-west".into(),
                })
                .await
            })
            .await
            .unwrap()
            .plan
            .unwrap();
        if plan.blockers.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "{:?}", plan.blockers);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let started = pc
        .any("Failover", |mut c| async move {
            c.failover(pb::FailoverRequest {
                app: "shop".into(),
                to: "eu-west".into(),
                ..Default::default()
            })
            .await
        })
        .await
        .unwrap();
    let id = started.operation_id;
    // Steps: maintenance and fence in us-east (agent 0), promote and
    // gates in eu-west (agent 1). Kill the leader as each starts, and
    // bring the killed node back before the next kill, so a majority
    // always remains.
    for (step, agent) in [(1, 0), (2, 0), (3, 1), (4, 1)] {
        wait_started(&pc, agent, &format!("{id}-{step}")).await;
        let leader = pc.wait_leader(T).await.unwrap();
        pc.kill9_coordinator(leader);
        let next = pc.wait_leader(T).await.unwrap();
        assert_ne!(next, leader);
        pc.start_coordinator(leader).unwrap();
    }
    let op = pc.wait_finished(&id, T).await.unwrap();
    assert_eq!(op.state, pb::TaskState::Succeeded as i32, "{}", op.summary);
    writer.wait_acked(1, 50).await;
    let acked = writer.finish().await;

    // Exactly once: four steps, each started once by its agent (a task a
    // new leader sent again was not run again), one epoch, one failover.
    assert_eq!(op.tasks.len(), 4, "{:?}", op.tasks);
    for (i, agent) in [(1, 0), (2, 0), (3, 1), (4, 1)] {
        let task = format!("{id}-{i}");
        let starts = pc
            .agent_task_events(agent)
            .iter()
            .filter(|e| e.task_id == task && matches!(e.kind, TaskEventKind::Started { .. }))
            .count();
        assert_eq!(starts, 1, "task {task} started {starts} times");
    }
    let st = pc
        .any("GetDrStatus", |mut c| async move {
            c.get_dr_status(pb::GetDrStatusRequest { app: "shop".into() }).await
        })
        .await
        .unwrap();
    assert_eq!((st.epoch, st.epoch_primary.as_str()), (1, "eu-west/c1"));
    let ops = pc
        .any("ListOperations", |mut c| async move {
            c.list_operations(pb::ListOperationsRequest { limit: 1000 }).await
        })
        .await
        .unwrap()
        .operations;
    assert_eq!(
        ops.iter()
            .filter(|o| o.kind == pb::OperationKind::Failover as i32)
            .count(),
        1
    );

    // Nothing lost; the old primary refuses writes, the new one takes them.
    let stored = numbers_on(&standby);
    let missing: Vec<&i64> = acked.iter().filter(|n| !stored.contains(n)).collect();
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
    assert!(
        primary
            .psql("shop", "insert into seq values (-1)")
            .is_err_and(|e| e.to_string().contains("read-only")),
        "the old primary took a write"
    );
    eprintln!(
        "failover with the leader killed at each of its 4 steps: {} writes acknowledged, none lost",
        acked.len()
    );
}
