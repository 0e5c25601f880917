//! Real network partitions: each coordinator and the agent run as
//! processes in their own network namespaces, and nftables cuts the links
//! between them (see `cutover_tests::netns`). Run as root (CI does).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cutover_shared::proto as pb;
use cutover_tests::linearizability as lin;
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

/// The apps the linearizability clients write and read: each app's
/// `bake_secs` is a register.
const REGISTERS: [&str; 8] = ["lin-0", "lin-1", "lin-2", "lin-3", "lin-4", "lin-5", "lin-6", "lin-7"];

type RegisterOp = lin::Op<lin::RegisterInput, Option<u64>>;

/// One client bound to one coordinator: until `stop`, writes a unique
/// value to a random register or reads one, every 20 ms, and records what
/// it saw (register index, operation). A write that errs or times out is
/// indeterminate; a read that errs observed nothing and is left out.
async fn lin_client(
    id: u64,
    mut api: cutover_shared::proto::control_service_client::ControlServiceClient<tonic::transport::Channel>,
    start: Instant,
    stop: Arc<AtomicBool>,
) -> Vec<(usize, RegisterOp)> {
    let now = || start.elapsed().as_nanos() as u64;
    let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (id + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let regions = [("us-east", "us-east-1")];
    let mut seq = 0;
    let mut history = vec![];
    while !stop.load(Ordering::Relaxed) {
        let key = (next() % REGISTERS.len() as u64) as usize;
        let call = now();
        if next() % 2 == 0 {
            seq += 1;
            let value = id * 1_000_000 + seq;
            let mut spec = cutover_tests::sample_app_spec(REGISTERS[key], &regions);
            spec.bake_secs = value;
            let req = pb::ApplyAppRequest { app: Some(spec.into()) };
            let answered = tokio::time::timeout(Duration::from_secs(3), api.apply_app(req)).await;
            let ret = match answered {
                Ok(Ok(_)) => Some(now()),
                Ok(Err(s)) if s.code() == tonic::Code::InvalidArgument => {
                    panic!("a well-formed app was refused: {}", s.message())
                }
                _ => None,
            };
            history.push((
                key,
                lin::Op {
                    call,
                    ret,
                    input: lin::RegisterInput::Write(value),
                    output: ret.map(|_| None),
                },
            ));
        } else {
            let req = pb::GetAppRequest {
                name: REGISTERS[key].into(),
            };
            let seen = match tokio::time::timeout(Duration::from_secs(3), api.get_app(req)).await {
                Ok(Ok(r)) => Some(r.into_inner().app.and_then(|a| a.bake_secs)),
                Ok(Err(s)) if s.code() == tonic::Code::NotFound => Some(None),
                _ => None,
            };
            if let Some(seen) = seen {
                history.push((
                    key,
                    lin::Op {
                        call,
                        ret: Some(now()),
                        input: lin::RegisterInput::Read,
                        output: Some(seen),
                    },
                ));
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    history
}

/// Jepsen-style: six clients, two on each coordinator, write and read
/// eight apps while a nemesis cuts off the leader, then a follower, then
/// the leader again, 3 s each. Every app's recorded history is
/// linearizable: no read, on any node, returns a value older than one
/// already acknowledged, and none returns a value that was never written.
/// (Before reads were linearizable, a cut-off node answered from its own
/// stale state and this found anomalies within the first partition.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_control_api_history_stays_linearizable_under_partitions() {
    let pc = up().await;
    let net = pc.net.as_ref().unwrap();
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..6u64)
        .map(|id| tokio::spawn(lin_client(id, pc.operator(id as usize % 3), start, stop.clone())))
        .collect();
    let everyone = ["coordinator-1", "coordinator-2", "coordinator-3", "us-east"];
    for round in 0..3 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let leader = pc.wait_leader(T).await.unwrap();
        let victim = if round == 1 { (leader + 1) % 3 } else { leader };
        let cut = everyone[victim];
        let rest: Vec<&str> = everyone.iter().copied().filter(|n| *n != cut).collect();
        net.partition(&[cut], &rest).unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        net.heal().unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut per_key: Vec<Vec<RegisterOp>> = vec![vec![]; REGISTERS.len()];
    for c in clients {
        for (key, op) in c.await.unwrap() {
            per_key[key].push(op);
        }
    }
    let all: Vec<&RegisterOp> = per_key.iter().flatten().collect();
    let reads = all.iter().filter(|o| o.input == lin::RegisterInput::Read).count();
    let indeterminate = all.iter().filter(|o| o.ret.is_none()).count();
    let mut anomalies = vec![];
    for (key, history) in per_key.iter().enumerate() {
        if let lin::Verdict::Anomaly { stuck_at } = lin::check(&lin::Register, history) {
            anomalies.push(format!("{}: {:?}", REGISTERS[key], history[stuck_at]));
        }
    }
    println!(
        "histories checked: {}; operations: {} ({reads} reads, {} writes of which {indeterminate} indeterminate); anomalies: {}",
        per_key.len(),
        all.len(),
        all.len() - reads,
        anomalies.len()
    );
    assert!(anomalies.is_empty(), "not linearizable: {anomalies:#?}");
    assert!(reads > 200 && all.len() - reads > 200, "too few operations to tell");
}
