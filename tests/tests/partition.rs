//! Real network partitions: each coordinator and the agent run as
//! processes in their own network namespaces, and nftables cuts the links
//! between them (see `cutover_tests::netns`). Run as root (CI does).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cutover_shared::proto as pb;
use cutover_tests::process::{ProcessCluster, TaskEventKind, describe};

const T: Duration = Duration::from_secs(60);

/// Three coordinators and the us-east agent, each in its own namespace,
/// with a leader elected and the agent up.
async fn up() -> ProcessCluster {
    let pc = ProcessCluster::start_in_namespaces(3, &[("us-east", "us-east-1")])
        .await
        .unwrap();
    pc.wait_leader(T).await.unwrap();
    pc.wait_agents_up(T).await.unwrap();
    pc
}

/// An echo task on the us-east agent answering `message` after `delay_ms`.
fn echo(message: &str, delay_ms: u64) -> pb::RunTaskRequest {
    let params: BTreeMap<String, String> = [
        ("message".to_string(), message.to_string()),
        ("delay_ms".to_string(), delay_ms.to_string()),
    ]
    .into();
    pb::RunTaskRequest {
        target: Some(pb::ClusterRef {
            region: "us-east".into(),
            cluster: "us-east-1".into(),
        }),
        kind: "echo".into(),
        params: params.into_iter().collect(),
    }
}

/// Coordinator `i`'s view, if it answers within 2 s.
async fn view(pc: &ProcessCluster, i: usize) -> Option<pb::GetClusterStatusResponse> {
    pc.cluster_status(i).await
}

/// The leader `nodes` agree on, other than `not`, once one of them says
/// it leads.
async fn new_leader(pc: &ProcessCluster, nodes: &[usize], not: usize) -> anyhow::Result<(usize, u64)> {
    let deadline = Instant::now() + T;
    loop {
        for &i in nodes {
            if let Some(v) = view(pc, i).await
                && v.server_state == "leader"
                && i != not
            {
                return Ok((i, v.term));
            }
        }
        if Instant::now() > deadline {
            anyhow::bail!("no new leader among {nodes:?} after {T:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A leader cut off from the other coordinators and from the agent, in
/// the middle of an operation: the majority elects a new leader, the agent
/// reconnects to it, and the task the old leader dispatched finishes and
/// is committed exactly once (the agent ran it once). Healed, the old
/// leader steps down to follower under the new term and catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partitioned_leader_is_replaced_and_its_operation_finishes_once() {
    let pc = up().await;
    let net = pc.net.as_ref().unwrap();
    let old = pc.wait_leader(T).await.unwrap();
    let before = view(&pc, old).await.unwrap();

    // A task that runs 3 s on the agent, dispatched by the current leader.
    let r = pc
        .operator(old)
        .run_task(echo("across a partition", 3000))
        .await
        .unwrap()
        .into_inner();
    let task = r.task_id.clone();
    let deadline = Instant::now() + T;
    while !pc
        .agent_task_events(0)
        .iter()
        .any(|e| e.task_id == task && matches!(e.kind, TaskEventKind::Started { .. }))
    {
        assert!(Instant::now() < deadline, "the task never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The leader alone on one side; the others and the agent on the other.
    let old_name = format!("coordinator-{}", old + 1);
    let majority: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    let mut rest: Vec<String> = majority.iter().map(|i| format!("coordinator-{}", i + 1)).collect();
    rest.push("us-east".into());
    let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
    let cut = Instant::now();
    net.partition(&[&old_name], &rest).unwrap();

    let (leader, term) = new_leader(&pc, &majority, old).await.unwrap();
    let elected = cut.elapsed();
    assert!(
        term > before.term,
        "the new leader's term {term} is not above {}",
        before.term
    );
    println!(
        "partitioned node {}; node {} leads term {term} after {} ms",
        old + 1,
        leader + 1,
        elected.as_millis()
    );

    // The operation finishes through the new leader, the task run once.
    let deadline = Instant::now() + T;
    let op = loop {
        let op = pc
            .operator(leader)
            .get_operation(pb::GetOperationRequest {
                operation_id: r.operation_id.clone(),
            })
            .await
            .ok()
            .and_then(|r| r.into_inner().operation);
        if let Some(op) = &op
            && op.state == pb::TaskState::Succeeded as i32
        {
            break op.clone();
        }
        assert!(
            Instant::now() < deadline,
            "not finished through the new leader: {}\n{}",
            describe(op.as_ref()),
            pc.log_tails(30)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let result = op.tasks[0].result.clone().unwrap();
    assert!(result.message.contains("across a partition"), "{}", result.message);
    let started = pc
        .agent_task_events(0)
        .iter()
        .filter(|e| e.task_id == task && matches!(e.kind, TaskEventKind::Started { .. }))
        .count();
    assert_eq!(started, 1, "the agent ran the task {started} times");

    // The isolated node: openraft keeps it in the Leader state until it
    // hears of a higher term, but its lease ran out, so its leader duties
    // (dispatch, orchestration, agent streams) stopped.
    let isolated = view(&pc, old).await.unwrap();
    println!(
        "isolated node {} meanwhile: {} of term {}",
        old + 1,
        isolated.server_state,
        isolated.term
    );
    assert!(
        pc.coordinator_log(old).contains("not leading under a fresh lease"),
        "the isolated leader kept its duties"
    );

    // Healed, it follows the new leader and catches up.
    net.heal().unwrap();
    let deadline = Instant::now() + T;
    loop {
        let v = view(&pc, old).await;
        let caught_up = pc
            .operator(old)
            .get_operation(pb::GetOperationRequest {
                operation_id: r.operation_id.clone(),
            })
            .await
            .ok()
            .and_then(|r| r.into_inner().operation)
            .is_some_and(|o| o.state == pb::TaskState::Succeeded as i32);
        if let Some(v) = &v
            && v.server_state == "follower"
            && v.leader_id == leader as u64 + 1
            && v.term >= term
            && caught_up
        {
            break;
        }
        assert!(Instant::now() < deadline, "node {} did not rejoin: {v:?}", old + 1);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A flapping network: every 2 s one coordinator in turn is cut off from
/// everyone (the agent included) for 1 s, for 12 s, while ten tasks of
/// 1 to 10 s run on the agent. Once the flapping stops, every operation
/// ends succeeded, and the agent ran each task exactly once, however often
/// leaders changed and re-sent it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flapping_network_executes_each_task_once_and_strands_no_operation() {
    let pc = up().await;
    let net = pc.net.as_ref().unwrap();
    let mut ops = vec![];
    for n in 1..=10u64 {
        let r = pc
            .any("RunTask", |mut c| async move {
                c.run_task(echo(&format!("task {n}"), n * 1000)).await
            })
            .await
            .unwrap();
        ops.push((r.operation_id, r.task_id));
    }
    let everyone = ["coordinator-1", "coordinator-2", "coordinator-3", "us-east"];
    let started = Instant::now();
    let mut flaps = 0;
    while started.elapsed() < Duration::from_secs(12) {
        let cut = everyone[flaps % 3];
        let rest: Vec<&str> = everyone.iter().copied().filter(|n| *n != cut).collect();
        net.partition(&[cut], &rest).unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        net.heal().unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        flaps += 1;
    }
    for (id, _) in &ops {
        let op = pc.wait_finished(id, T).await.unwrap();
        assert_eq!(op.state, pb::TaskState::Succeeded as i32, "{}", describe(Some(&op)));
    }
    let events = pc.agent_task_events(0);
    let mut resent = 0;
    for (_, task) in &ops {
        let runs = events
            .iter()
            .filter(|e| &e.task_id == task && matches!(e.kind, TaskEventKind::Started { .. }))
            .count();
        assert_eq!(runs, 1, "task {task} ran {runs} times");
        resent += events
            .iter()
            .filter(|e| &e.task_id == task && e.kind == TaskEventKind::Replayed)
            .count();
    }
    println!(
        "{flaps} flaps; {} tasks ran once each; {resent} re-sent results answered from the agent's record",
        ops.len()
    );
}
