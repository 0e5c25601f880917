//! Real network faults: each coordinator and each agent run as processes
//! in their own network namespaces; nftables cuts the links between them
//! (see `cutover_tests::netns`), and a link proxy gives them WAN delay,
//! jitter and loss (`cutover_tests::wan`). Run as root (CI does).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cutover_shared::app::{AppSpec, UnreachableAction, UnreachablePolicy};
use cutover_shared::proto as pb;
use cutover_tests::linearizability as lin;
use cutover_tests::load::SteadyLoad;
use cutover_tests::process::{ProcessCluster, TaskEventKind, describe};
use cutover_tests::wan::Link;

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
    cutover_tests::echo_task("us-east", "us-east-1", message, delay_ms)
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

/// The coordinators agent `i` registered with, in order (from its log).
fn registrations(pc: &ProcessCluster, i: usize) -> Vec<usize> {
    pc.agent_log(i)
        .lines()
        .filter(|l| l.contains(r#""message":"registered""#))
        .filter_map(|l| {
            let at = l.split(r#""coordinator":""#).nth(1)?.split('"').next()?;
            // Agents in namespaces dial coordinators by name.
            (0..3).find(|&n| pc.addr(n) == at || at.starts_with(&format!("coordinator-{}:", n + 1)))
        })
        .collect()
}

/// A coordinator cut off from the other coordinators but not from the
/// agent it holds stops acknowledging the agent: no leader answers its
/// relays, so it cannot vouch for the agent's lease. The agent leaves it
/// for a node that serves (the leader it is redirected to, or the next it
/// tries), and work started after the cut runs there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_leaves_a_coordinator_cut_off_from_the_leader() {
    let pc = up().await;
    let net = pc.net.as_ref().unwrap();
    let leader = pc.wait_leader(T).await.unwrap();
    let before = registrations(&pc, 0);
    let held = *before
        .last()
        .unwrap_or_else(|| panic!("the agent registered:\n{}", pc.agent_log(0)));

    let name = format!("coordinator-{}", held + 1);
    let majority: Vec<usize> = (0..3).filter(|&i| i != held).collect();
    let others: Vec<String> = majority.iter().map(|i| format!("coordinator-{}", i + 1)).collect();
    let others: Vec<&str> = others.iter().map(String::as_str).collect();
    net.partition(&[&name], &others).unwrap();
    let leader = if held == leader {
        new_leader(&pc, &majority, held).await.unwrap().0
    } else {
        leader
    };

    let deadline = Instant::now() + T;
    let moved_to = loop {
        let now = registrations(&pc, 0);
        if now.len() > before.len()
            && let Some(&at) = now.last()
            && at != held
        {
            break at;
        }
        assert!(
            Instant::now() < deadline,
            "the agent stayed with the cut-off node {}: {now:?}\n{}",
            held + 1,
            pc.log_tails(30)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("agent moved from cut-off node {} to node {}", held + 1, moved_to + 1);
    let r = pc
        .operator(leader)
        .run_task(echo("after its coordinator was cut off", 0))
        .await
        .unwrap()
        .into_inner();
    let op = pc.wait_finished(&r.operation_id, T).await.unwrap();
    assert_eq!(op.state, pb::TaskState::Succeeded as i32, "{}", describe(Some(&op)));
    net.heal().unwrap();
}

/// Whether coordinator `i` has applied operation `id` as succeeded.
async fn succeeded_on(pc: &ProcessCluster, i: usize, id: &str) -> bool {
    pc.operator(i)
        .get_operation(pb::GetOperationRequest {
            operation_id: id.to_owned(),
        })
        .await
        .ok()
        .and_then(|r| r.into_inner().operation)
        .is_some_and(|o| o.state == pb::TaskState::Succeeded as i32)
}

/// Pre-Vote (Raft thesis 9.6): a follower cut off from everyone for five
/// election timeouts and more keeps its term, because no quorum answers its
/// Pre-Vote; healed, it follows the leader it had, at the term it had,
/// and catches up on what was committed without it. Without Pre-Vote it
/// raises its term on every timeout and, on its return, its higher term
/// makes the healthy leader step down: an election, and the leader's
/// duties (dispatch, agent streams) interrupted for nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_off_follower_rejoins_without_deposing_the_leader() {
    let pc = ProcessCluster::start_in_namespaces_with(3, &[("us-east", "us-east-1")], |c| {
        c.raft.pre_vote = true;
    })
    .await
    .unwrap();
    let net = pc.net.as_ref().unwrap();
    let leader = pc.wait_leader(T).await.unwrap();
    pc.wait_agents_up(T).await.unwrap();
    let follower = (0..3).find(|&i| i != leader).unwrap();
    let term = view(&pc, follower).await.unwrap().term;

    let name = format!("coordinator-{}", follower + 1);
    let mut rest: Vec<String> = (0..3)
        .filter(|&i| i != follower)
        .map(|i| format!("coordinator-{}", i + 1))
        .collect();
    rest.push("us-east".into());
    let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
    net.partition(&[&name], &rest).unwrap();

    // Committed while the follower is away: it must catch up on it.
    let r = pc
        .operator(leader)
        .run_task(echo("while a follower is away", 0))
        .await
        .unwrap()
        .into_inner();
    let deadline = Instant::now() + T;
    while !succeeded_on(&pc, leader, &r.operation_id).await {
        assert!(Instant::now() < deadline, "not finished: {}", pc.log_tails(30));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The fault lasts five or more election timeouts (the harness's are
    // 600-800 ms): long enough for a node without Pre-Vote to stand
    // several times.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let away = view(&pc, follower).await.unwrap();
    let before_heal = view(&pc, leader).await.unwrap();
    println!(
        "cut-off node {}: {} at term {} (the term it had: {term}); node {} {} at term {}",
        follower + 1,
        away.server_state,
        away.term,
        leader + 1,
        before_heal.server_state,
        before_heal.term
    );
    assert_eq!(away.term, term, "the cut-off node raised its term");
    assert_eq!(before_heal.server_state, "leader");

    net.heal().unwrap();
    let deadline = Instant::now() + T;
    loop {
        let v = view(&pc, follower).await;
        if let Some(v) = &v
            && v.server_state == "follower"
            && v.leader_id == leader as u64 + 1
            && succeeded_on(&pc, follower, &r.operation_id).await
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node {} did not rejoin: {v:?}\n{}",
            follower + 1,
            pc.log_tails(30)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = view(&pc, leader).await.unwrap();
    assert_eq!(
        (after.server_state.as_str(), after.term),
        ("leader", before_heal.term),
        "the rejoining node deposed the leader"
    );
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

/// Attestations that are registers too: image `lin-img-<k>`, check `c`,
/// whose value each write replaces.
const ATTESTED: usize = 8;

/// Operations the clients created (the id, once acknowledged), which any
/// client then reads back.
type Created = Arc<std::sync::Mutex<Vec<String>>>;

/// One client bound to one coordinator: until `stop`, every 20 ms, writes
/// a unique value to a random register (an app's `bake_secs`, or an
/// attestation's value) or reads one, creates an operation (`RunTask`)
/// or reads back one that some client created, and records what it saw
/// (register name, operation). An operation is a register too, absent
/// until created: a read that starts after its creation was acknowledged
/// must find it. A write that errs or times out is indeterminate; a read
/// that errs observed nothing and is left out.
async fn lin_client(
    id: u64,
    mut api: cutover_shared::proto::control_service_client::ControlServiceClient<tonic::transport::Channel>,
    start: Instant,
    stop: Arc<AtomicBool>,
    created: Created,
) -> Vec<(String, RegisterOp)> {
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
    let limit = Duration::from_secs(3);
    let write = |call: u64, ret: Option<u64>, value: u64| lin::Op {
        call,
        ret,
        input: lin::RegisterInput::Write(value),
        output: ret.map(|_| None),
    };
    let read = |call: u64, ret: u64, seen: Option<u64>| lin::Op {
        call,
        ret: Some(ret),
        input: lin::RegisterInput::Read,
        output: Some(seen),
    };
    while !stop.load(Ordering::Relaxed) {
        let call = now();
        seq += 1;
        let value = id * 1_000_000 + seq;
        match next() % 10 {
            0..=2 => {
                let key = (next() % REGISTERS.len() as u64) as usize;
                let mut spec = cutover_tests::sample_app_spec(REGISTERS[key], &regions);
                spec.bake_secs = value;
                let req = pb::ApplyAppRequest { app: Some(spec.into()) };
                let ret = match tokio::time::timeout(limit, api.apply_app(req)).await {
                    Ok(Ok(_)) => Some(now()),
                    Ok(Err(s)) if s.code() == tonic::Code::InvalidArgument => {
                        panic!("a well-formed app was refused: {}", s.message())
                    }
                    _ => None,
                };
                history.push((REGISTERS[key].to_string(), write(call, ret, value)));
            }
            3..=5 => {
                let key = (next() % REGISTERS.len() as u64) as usize;
                let req = pb::GetAppRequest {
                    name: REGISTERS[key].into(),
                };
                let seen = match tokio::time::timeout(limit, api.get_app(req)).await {
                    Ok(Ok(r)) => Some(r.into_inner().app.and_then(|a| a.bake_secs)),
                    Ok(Err(s)) if s.code() == tonic::Code::NotFound => Some(None),
                    _ => None,
                };
                if let Some(seen) = seen {
                    history.push((REGISTERS[key].to_string(), read(call, now(), seen)));
                }
            }
            6 => {
                let image = format!("lin-img-{}", next() % ATTESTED as u64);
                let req = pb::CreateAttestationRequest {
                    image: image.clone(),
                    checks: [("c".to_string(), value.to_string())].into(),
                };
                let ret = match tokio::time::timeout(limit, api.create_attestation(req)).await {
                    Ok(Ok(_)) => Some(now()),
                    _ => None,
                };
                history.push((image, write(call, ret, value)));
            }
            7 => {
                let image = format!("lin-img-{}", next() % ATTESTED as u64);
                let req = pb::ListAttestationsRequest { image: image.clone() };
                if let Ok(Ok(r)) = tokio::time::timeout(limit, api.list_attestations(req)).await {
                    let seen = r
                        .into_inner()
                        .attestations
                        .iter()
                        .find(|a| a.check == "c")
                        .map(|a| a.value.parse::<u64>().expect("a value a client wrote"));
                    history.push((image, read(call, now(), seen)));
                }
            }
            8 => {
                let req = echo(&format!("lin {value}"), 0);
                // An operation whose creation is indeterminate has no id to
                // read back: it is left out.
                if let Ok(Ok(r)) = tokio::time::timeout(limit, api.run_task(req)).await {
                    let op = r.into_inner().operation_id;
                    history.push((op.clone(), write(call, Some(now()), 1)));
                    created.lock().unwrap().push(op);
                }
            }
            _ => {
                let op = {
                    let c = created.lock().unwrap();
                    (!c.is_empty()).then(|| c[(next() % c.len() as u64) as usize].clone())
                };
                let Some(op) = op else { continue };
                let req = pb::GetOperationRequest {
                    operation_id: op.clone(),
                };
                let seen = match tokio::time::timeout(limit, api.get_operation(req)).await {
                    Ok(Ok(r)) => Some(r.into_inner().operation.map(|_| 1)),
                    Ok(Err(s)) if s.code() == tonic::Code::NotFound => Some(None),
                    _ => None,
                };
                if let Some(seen) = seen {
                    history.push((op, read(call, now(), seen)));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    history
}

/// Jepsen-style: six clients, two on each coordinator, write and read
/// eight apps and eight attestations, and create and read back operations,
/// while a nemesis cuts off the leader, then a follower, then the leader
/// again, 3 s each. Every register's recorded history is linearizable: no
/// read, on any node, returns a value older than one already acknowledged,
/// none returns a value that was never written, and no operation
/// acknowledged as created is missing from a read that started after.
/// (Before reads were linearizable, a cut-off node answered from its own
/// stale state and this found anomalies within the first partition.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_control_api_history_stays_linearizable_under_partitions() {
    let pc = up().await;
    let net = pc.net.as_ref().unwrap();
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let created = Created::default();
    let clients: Vec<_> = (0..6u64)
        .map(|id| {
            tokio::spawn(lin_client(
                id,
                pc.operator(id as usize % 3),
                start,
                stop.clone(),
                created.clone(),
            ))
        })
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
    let mut per_key: std::collections::BTreeMap<String, Vec<RegisterOp>> = Default::default();
    for c in clients {
        for (key, op) in c.await.unwrap() {
            per_key.entry(key).or_default().push(op);
        }
    }
    let all: Vec<&RegisterOp> = per_key.values().flatten().collect();
    let reads = all.iter().filter(|o| o.input == lin::RegisterInput::Read).count();
    let indeterminate = all.iter().filter(|o| o.ret.is_none()).count();
    let kinds = |prefix: &str| per_key.keys().filter(|k| k.starts_with(prefix)).count();
    let (apps, attested) = (kinds("lin-"), kinds("lin-img-"));
    let operations = per_key.len() - apps;
    let mut anomalies = vec![];
    for (key, history) in &per_key {
        if let lin::Verdict::Anomaly { stuck_at } = lin::check(&lin::Register, history) {
            anomalies.push(format!("{key}: {:?}", history[stuck_at]));
        }
    }
    println!(
        "histories checked: {} ({} apps, {attested} attestations, {operations} operations); operations: {} \
         ({reads} reads, {} writes of which {indeterminate} indeterminate); anomalies: {}",
        per_key.len(),
        apps - attested,
        all.len(),
        all.len() - reads,
        anomalies.len()
    );
    assert!(anomalies.is_empty(), "not linearizable: {anomalies:#?}");
    assert!(reads > 200 && all.len() - reads > 200, "too few operations to tell");
    assert!(
        attested > 0 && operations > 10,
        "attestations and operations went unchecked"
    );
}

/// App `shop` in `regions`, in waves (the first region, then the rest),
/// each region's front door on its namespace's address, which the test
/// process (outside every region) reaches over the bridge.
fn shop(net: &cutover_tests::netns::Net, regions: &[(&str, &str)]) -> AppSpec {
    let mut spec = cutover_tests::sample_app_spec("shop", regions);
    for c in spec.clusters.iter_mut() {
        let local = c.local.as_mut().unwrap();
        local.listen = format!("{}:8080", net.addr(&c.region));
        local.preview_listen = format!("{}:8081", net.addr(&c.region));
    }
    spec.waves = vec![
        vec![regions[0].0.into()],
        regions[1..].iter().map(|(r, _)| r.to_string()).collect(),
    ];
    spec
}

/// Each cluster's front door (its service address), in the spec's order.
fn front_doors(spec: &AppSpec) -> Vec<String> {
    spec.clusters
        .iter()
        .map(|c| c.local.as_ref().unwrap().listen.clone())
        .collect()
}

async fn apply(pc: &ProcessCluster, spec: &AppSpec) {
    pc.apply_app(spec).await.unwrap();
}

async fn start_deploy(pc: &ProcessCluster, image: &str) -> String {
    pc.start_deploy_waves("shop", image).await.unwrap()
}

/// Runs a deploy of `image` in waves through any coordinator and waits
/// for it to succeed.
async fn deploy_waves(pc: &ProcessCluster, image: &str) -> pb::Operation {
    let id = start_deploy(pc, image).await;
    let op = pc
        .wait_finished(&id, Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", pc.log_tails(30)));
    assert_eq!(op.state, pb::TaskState::Succeeded as i32, "{}", describe(Some(&op)));
    op
}

/// Three regions a WAN apart, one coordinator in each: 40 ms round trips
/// between us-east and eu-west, 90 ms to ap-south, ±5 ms jitter and 0.5%
/// of chunks lost once (a retransmission timeout each), through the
/// harness's link proxy. Two cutovers in waves (us-east, then eu-west and
/// ap-south) complete under steady load at every region's front door
/// without one failed request, and every region ends on the new version.
/// Prints each switch step's time (committed to finished on the agent).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cutover_in_waves_across_a_lossy_wan_fails_no_request() {
    let regions = [
        ("us-east", "us-east-1"),
        ("eu-west", "eu-west-1"),
        ("ap-south", "ap-south-1"),
    ];
    let pc = ProcessCluster::start_across_wan(&regions, |a, b| {
        let rtt = if a == "ap-south" || b == "ap-south" { 90 } else { 40 };
        Some(Link {
            rtt: Duration::from_millis(rtt),
            jitter: Duration::from_millis(5),
            loss: 0.005,
        })
    })
    .await
    .unwrap();
    pc.wait_leader(T)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", pc.log_tails(30)));
    pc.wait_agents_up(T)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", pc.log_tails(30)));
    let net = pc.net.as_ref().unwrap();

    let spec = shop(net, &regions);
    apply(&pc, &spec).await;
    deploy_waves(&pc, "sample:v1").await;

    let doors = front_doors(&spec);
    let loads: Vec<SteadyLoad> = doors
        .iter()
        .map(|d| SteadyLoad::start(d, 4, Duration::from_millis(20)))
        .collect();
    let mut switches = vec![];
    for image in ["sample:v2", "sample:v3"] {
        let op = deploy_waves(&pc, image).await;
        for t in &op.tasks {
            let (Some(task), Some(result)) = (&t.task, &t.result) else {
                continue;
            };
            if task.kind == "app.switch" {
                switches.push(Duration::from_millis(
                    (result.finished_at_unix_ms - t.created_at_unix_ms).max(0) as u64,
                ));
            }
        }
    }
    let mut served = 0;
    for (load, door) in loads.into_iter().zip(&doors) {
        let (ok, failed) = load.stop().await;
        assert_eq!(failed, 0, "{failed} requests failed at {door} (and {ok} answered)");
        assert!(ok > 0, "no request answered at {door}");
        served += ok;
        assert_eq!(cutover_tests::serving(door).await, "version sample:v3");
    }
    switches.sort();
    assert_eq!(switches.len(), 6, "a switch step per region per cutover");
    let stats = &pc.wan.as_ref().unwrap().stats;
    println!(
        "WAN 40/90 ms RTT, ±5 ms, 0.5% loss: {served} requests at the front doors, 0 failed; \
         switch step (committed to done on the agent), n={}: p50 {} ms, p99 {} ms; \
         the proxy carried {} connections, {} chunks, {} retransmitted",
        switches.len(),
        switches[switches.len() / 2].as_millis(),
        switches[(switches.len() * 99 / 100).min(switches.len() - 1)].as_millis(),
        stats.connections.load(Ordering::Relaxed),
        stats.chunks.load(Ordering::Relaxed),
        stats.retransmits.load(Ordering::Relaxed),
    );
}

/// Whether the leader lists `region`'s agent in `state`.
async fn agent_is(pc: &ProcessCluster, region: &str, state: pb::AgentState) -> bool {
    let agents = pc
        .any("ListAgents", |mut c| async move {
            c.list_agents(pb::ListAgentsRequest::default()).await
        })
        .await
        .map(|r| r.agents)
        .unwrap_or_default();
    agents
        .iter()
        .any(|a| a.cluster.as_ref().is_some_and(|c| c.region == region) && a.state == state as i32)
}

async fn wait_agent(pc: &ProcessCluster, region: &str, state: pb::AgentState) {
    let deadline = Instant::now() + T;
    while !agent_is(pc, region, state).await {
        assert!(Instant::now() < deadline, "{region}'s agent never {state:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The tasks of `op` on `region`.
fn tasks_in<'a>(op: &'a pb::Operation, region: &str) -> Vec<&'a pb::TaskStatus> {
    op.tasks
        .iter()
        .filter(|t| {
            t.task
                .as_ref()
                .and_then(|t| t.target.as_ref())
                .is_some_and(|c| c.region == region)
        })
        .collect()
}

/// A region's agent cut off from every coordinator in the middle of a
/// cutover in waves (us-east, then eu-west and ap-south), under each
/// `[unreachable]` policy:
/// - `wait` (the default): the operation holds at ap-south's step for as
///   long as the partition lasts (checked over 5 s, twice the other
///   policy's limit) and completes once healed, each of ap-south's tasks
///   run once;
/// - `rollback` after 2 s: ap-south's step fails without the agent, the
///   regions already switched switch back, and the operation ends failed
///   while the partition lasts. Healed, the agent is never sent the step
///   that was given up (a marker task sent after the agent is back runs,
///   and the given-up one never started), and every region serves what
///   it served before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_off_regions_agent_makes_the_operation_wait_or_roll_back_as_its_policy_says() {
    let regions = [
        ("us-east", "us-east-1"),
        ("eu-west", "eu-west-1"),
        ("ap-south", "ap-south-1"),
    ];
    let pc = ProcessCluster::start_in_namespaces(3, &regions).await.unwrap();
    pc.wait_leader(T).await.unwrap();
    pc.wait_agents_up(T)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", pc.log_tails(30)));
    let net = pc.net.as_ref().unwrap();
    let coordinators = ["coordinator-1", "coordinator-2", "coordinator-3"];
    let mut spec = shop(net, &regions);
    apply(&pc, &spec).await;
    deploy_waves(&pc, "sample:v1").await;
    let doors = front_doors(&spec);
    let ap_south = pc.agent_index("ap-south");

    // wait: the operation holds while ap-south is cut off, then completes.
    let id = start_deploy(&pc, "sample:v2").await;
    net.partition(&["ap-south"], &coordinators).unwrap();
    wait_agent(&pc, "ap-south", pb::AgentState::Down).await;
    let deadline = Instant::now() + T;
    while pc
        .operation(&id)
        .await
        .map_or(true, |op| tasks_in(&op, "ap-south").is_empty())
    {
        assert!(Instant::now() < deadline, "the deploy never reached ap-south");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let held = Instant::now();
    while held.elapsed() < Duration::from_secs(5) {
        let op = pc.operation(&id).await.unwrap();
        assert_eq!(op.state, pb::TaskState::Running as i32, "{}", describe(Some(&op)));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    net.heal().unwrap();
    let op = pc.wait_finished(&id, T).await.unwrap();
    assert_eq!(op.state, pb::TaskState::Succeeded as i32, "{}", describe(Some(&op)));
    let events = pc.agent_task_events(ap_south);
    for t in tasks_in(&op, "ap-south") {
        let task = &t.task.as_ref().unwrap().task_id;
        let runs = events
            .iter()
            .filter(|e| &e.task_id == task && matches!(e.kind, TaskEventKind::Started { .. }))
            .count();
        assert_eq!(runs, 1, "ap-south ran {task} {runs} times");
    }
    for door in &doors {
        assert_eq!(cutover_tests::serving(door).await, "version sample:v2");
    }

    // rollback after 2 s: the operation gives ap-south up and rolls back.
    spec.unreachable = Some(UnreachablePolicy {
        action: UnreachableAction::Rollback,
        after_secs: 2,
    });
    apply(&pc, &spec).await;
    let id = start_deploy(&pc, "sample:v3").await;
    net.partition(&["ap-south"], &coordinators).unwrap();
    let op = pc.wait_finished(&id, T).await.unwrap();
    assert_eq!(op.state, pb::TaskState::Failed as i32, "{}", describe(Some(&op)));
    let given_up: Vec<&pb::TaskStatus> = tasks_in(&op, "ap-south");
    assert_eq!(given_up.len(), 1, "{}", describe(Some(&op)));
    let message = &given_up[0].result.as_ref().unwrap().message;
    assert!(message.contains("unreachable"), "{message}");
    assert!(
        agent_is(&pc, "ap-south", pb::AgentState::Down).await,
        "the operation ended while ap-south was still cut off"
    );
    for door in &doors[..2] {
        assert_eq!(cutover_tests::serving(door).await, "version sample:v2");
    }

    net.heal().unwrap();
    wait_agent(&pc, "ap-south", pb::AgentState::Up).await;
    let marker = pc
        .any("RunTask", |mut c| async move {
            let mut t = echo("after the partition", 0);
            t.target = Some(pb::ClusterRef {
                region: "ap-south".into(),
                cluster: "ap-south-1".into(),
            });
            c.run_task(t).await
        })
        .await
        .unwrap();
    let done = pc.wait_finished(&marker.operation_id, T).await.unwrap();
    assert_eq!(done.state, pb::TaskState::Succeeded as i32, "{}", describe(Some(&done)));
    let given_up = &given_up[0].task.as_ref().unwrap().task_id;
    let started = pc
        .agent_task_events(ap_south)
        .iter()
        .filter(|e| &e.task_id == given_up && matches!(e.kind, TaskEventKind::Started { .. }))
        .count();
    assert_eq!(started, 0, "ap-south ran the step the operation gave up");
    assert_eq!(cutover_tests::serving(&doors[2]).await, "version sample:v2");
    println!(
        "wait: held 5 s, then succeeded; rollback: {message}; then {}",
        op.summary
    );
}
