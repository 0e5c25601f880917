//! Faults in the middle of a three-region cutover, with real processes
//! (three `cutover coordinator`s, one `cutover agent` per region, the sample
//! app on the local driver): kill -9 of the coordinator leader at each step
//! boundary (deploy, gates, switch, bake), and kill -9 of an agent while its
//! `app.deploy` runs. Whatever happens, the operation finishes, every region
//! ends up serving the same version (all the new one, or all the old one
//! after a rollback), and no agent executes a task twice.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cutover_shared::app::{AppCluster, AppSpec, DriverKind, LoadProbe, LocalSpec, Probe};
use cutover_shared::proto as pb;
use cutover_tests::cutover_bin;
use cutover_tests::process::{ProcessCluster, TaskEventKind, describe};
use cutover_tests::stable_free_addr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const REGIONS: &[(&str, &str)] = &[
    ("us-east", "us-east-1"),
    ("eu-west", "eu-west-1"),
    ("ap-south", "ap-south-1"),
];
/// Bound for elections, agents coming up, status converging.
const T: Duration = Duration::from_secs(30);
/// Bound for a cutover to finish, faults included.
const FINISH: Duration = Duration::from_secs(60);
const V1: &str = "sample:v1";
/// Its processes take a second to start listening (see `app`), so an
/// `app.deploy` of it is still running when a fault hits.
const V2: &str = "sample:v2-delayed";
const BAKE_SECS: u64 = 2;

fn app() -> AppSpec {
    let bin = cutover_bin().display().to_string();
    // An image whose name ends in -delayed starts one second late.
    let script = "case '{image}' in *-delayed) sleep 1;; esac; \
                  exec \"$0\" sample-app --version '{image}' --listen '{listen}'";
    AppSpec {
        name: "shop".into(),
        clusters: REGIONS
            .iter()
            .map(|(r, c)| AppCluster {
                region: r.to_string(),
                cluster: c.to_string(),
                driver: DriverKind::Local,
                local: Some(LocalSpec {
                    command: vec!["sh".into(), "-c".into(), script.into(), bin.clone()],
                    listen: stable_free_addr(),
                    preview_listen: stable_free_addr(),
                    drain_timeout_ms: 2000,
                }),
                kubernetes: None,
            })
            .collect(),
        health: vec![Probe::Http {
            path: "/health".into(),
            status: 200,
            body_contains: None,
        }],
        // Light enough for a loaded 2-core machine running several tests.
        load: LoadProbe {
            requests: 20,
            rate_per_sec: 100,
            min_rps: 5.0,
            ..LoadProbe::default()
        },
        waves: vec![vec!["us-east".into()], vec!["eu-west".into(), "ap-south".into()]],
        bake_secs: BAKE_SECS,
        ..Default::default()
    }
}

fn state_is(op: &pb::Operation, s: pb::TaskState) -> bool {
    op.state == s as i32
}

fn finished(op: &pb::Operation) -> bool {
    state_is(op, pb::TaskState::Succeeded) || state_is(op, pb::TaskState::Failed)
}

fn kind(t: &pb::TaskStatus) -> &str {
    t.task.as_ref().map_or("", |t| t.kind.as_str())
}

fn task_id(t: &pb::TaskStatus) -> &str {
    t.task.as_ref().map_or("", |t| t.task_id.as_str())
}

fn region(t: &pb::TaskStatus) -> &str {
    t.task
        .as_ref()
        .and_then(|t| t.target.as_ref())
        .map_or("", |c| c.region.as_str())
}

/// What `addr` serves (`version <image>`), retrying while it does not
/// answer at all (an agent restarting rebinds its router).
async fn serving(addr: &str) -> String {
    let deadline = Instant::now() + T;
    loop {
        let attempt = async {
            let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .ok()?;
            let mut buf = String::new();
            s.read_to_string(&mut buf).await.ok()?;
            buf.starts_with("HTTP/1.1 200")
                .then(|| buf.split("\r\n\r\n").nth(1).unwrap_or("").trim().to_owned())
        };
        if let Ok(Some(body)) = tokio::time::timeout(Duration::from_secs(5), attempt).await {
            return body;
        }
        assert!(Instant::now() < deadline, "{addr} did not answer within {T:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts a deploy of `image` to every region (the app's waves) through
/// coordinator `node`; returns the operation id.
async fn deploy(pc: &ProcessCluster, node: usize, image: &str, no_switch: bool) -> String {
    pc.operator(node)
        .deploy(pb::DeployRequest {
            app: "shop".into(),
            image: image.into(),
            no_switch,
            strategy: pb::Strategy::Waves as i32,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("deploy {image}: {e}"))
        .into_inner()
        .operation_id
}

struct Fixture {
    pc: ProcessCluster,
    spec: AppSpec,
    v1: pb::Operation,
}

/// Three coordinators and three agents as processes, the app declared and
/// v1 deployed everywhere (the local driver makes a first deploy active).
async fn setup() -> Fixture {
    setup_on(ProcessCluster::start(3, REGIONS).await.unwrap(), app()).await
}

/// [`setup`] on the processes `pc` runs, with `spec` as the app.
async fn setup_on(pc: ProcessCluster, spec: AppSpec) -> Fixture {
    pc.wait_leader(T)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", pc.log_tails(30)));
    pc.wait_agents_up(T)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", pc.log_tails(30)));
    let proto_app: pb::App = spec.clone().into();
    pc.any("ApplyApp", |mut c| {
        let app = proto_app.clone();
        async move { c.apply_app(pb::ApplyAppRequest { app: Some(app) }).await }
    })
    .await
    .unwrap();
    let leader = pc.wait_leader(T).await.unwrap();
    let id = deploy(&pc, leader, V1, true).await;
    let v1 = pc
        .wait_finished(&id, FINISH)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", pc.log_tails(30)));
    assert!(state_is(&v1, pb::TaskState::Succeeded), "{}", describe(Some(&v1)));
    for c in &spec.clusters {
        assert_eq!(
            serving(&c.local.as_ref().unwrap().listen).await,
            format!("version {V1}")
        );
    }
    Fixture { pc, spec, v1 }
}

/// The operation finished, and every region serves the same version: the
/// new one if it succeeded, the old one if it failed (every region it had
/// switched switched back), both through the service addresses and in the
/// status the coordinators report. Returns the version served.
async fn assert_not_half_switched(pc: &ProcessCluster, spec: &AppSpec, op: &pb::Operation) -> &'static str {
    let expected = if state_is(op, pb::TaskState::Succeeded) {
        V2
    } else {
        assert!(state_is(op, pb::TaskState::Failed), "{}", describe(Some(op)));
        assert!(!op.summary.contains("NOT switched back"), "{}", describe(Some(op)));
        // Every region it switched has a successful compensating switch.
        for t in op.tasks.iter().filter(|t| {
            kind(t) == "app.switch"
                && state_is_task(t, pb::TaskState::Succeeded)
                && !t.task.as_ref().is_some_and(|s| s.params.contains_key("compensate"))
        }) {
            assert!(
                op.tasks.iter().any(|c| kind(c) == "app.switch"
                    && region(c) == region(t)
                    && c.task.as_ref().is_some_and(|s| s.params.contains_key("compensate"))
                    && state_is_task(c, pb::TaskState::Succeeded)),
                "{} was switched and not switched back: {}",
                region(t),
                describe(Some(op))
            );
        }
        V1
    };
    for c in &spec.clusters {
        let addr = &c.local.as_ref().unwrap().listen;
        assert_eq!(
            serving(addr).await,
            format!("version {expected}"),
            "{} serves the wrong version after {}",
            c.region,
            describe(Some(op))
        );
    }
    // What the agents reported converges on the same picture.
    let deadline = Instant::now() + T;
    loop {
        let status = pc
            .any("GetStatus", |mut c| async move {
                c.get_status(pb::GetStatusRequest {
                    app: "shop".into(),
                    ..Default::default()
                })
                .await
            })
            .await
            .unwrap();
        let active: BTreeMap<String, String> = status
            .clusters
            .iter()
            .map(|c| {
                let region = c.cluster.as_ref().map(|r| r.region.clone()).unwrap_or_default();
                let image = c
                    .app
                    .as_ref()
                    .and_then(|a| a.colors.iter().find(|s| s.color == a.active && a.active != 0))
                    .map(|s| s.image.clone())
                    .unwrap_or_default();
                (region, image)
            })
            .collect();
        if active.len() == REGIONS.len() && active.values().all(|i| i == expected) {
            return expected;
        }
        assert!(
            Instant::now() < deadline,
            "reported active images {active:?}, expected {expected} everywhere"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn state_is_task(t: &pb::TaskStatus, s: pb::TaskState) -> bool {
    t.state == s as i32
}

/// Each task of `ops` was executed (started, not replayed) exactly once by
/// the agent of its target, as the agents' logs tell, and no task was
/// started again after it finished. `interrupted` (a task whose agent was
/// killed while it ran) may have started a second time, in the next run of
/// its agent, if its first run never finished.
fn assert_executed_once(pc: &ProcessCluster, ops: &[&pb::Operation], interrupted: Option<&str>) {
    for (i, (name, _)) in REGIONS.iter().enumerate() {
        let events = pc.agent_task_events(pc.agent_index(name));
        // No agent ever starts a task it has finished.
        let mut done = std::collections::HashSet::new();
        for e in &events {
            match e.kind {
                TaskEventKind::Finished { .. } => {
                    done.insert(e.task_id.clone());
                }
                TaskEventKind::Started { .. } => {
                    assert!(
                        !done.contains(&e.task_id),
                        "agent {name} started {} again after it finished it: {events:?}",
                        e.task_id
                    );
                }
                TaskEventKind::Replayed => {}
            }
        }
        for op in ops {
            for t in op.tasks.iter().filter(|t| region(t) == *name) {
                let id = task_id(t);
                let starts: Vec<(usize, u64)> = events
                    .iter()
                    .filter(|e| e.task_id == id)
                    .filter_map(|e| match e.kind {
                        TaskEventKind::Started { attempt } => Some((e.incarnation, attempt)),
                        _ => None,
                    })
                    .collect();
                if interrupted == Some(id) {
                    assert!(
                        starts == [(0, 1)] || starts == [(0, 1), (1, 2)],
                        "interrupted task {id} on agent {name}: starts (run, attempt) {starts:?}"
                    );
                } else {
                    assert_eq!(
                        starts,
                        [(starts.first().map_or(0, |s| s.0), 1)],
                        "task {id} ({}) on agent {name} (agent #{i}): starts (run, attempt)",
                        kind(t)
                    );
                }
            }
        }
    }
}

/// Deploys v2 and kill -9s the coordinator leader as soon as the first task
/// of `boundary` appears in the operation; then checks that a new leader
/// takes over, the cutover finishes within [`FINISH`] and is not half
/// switched, no task ran twice, and the killed node catches up once
/// restarted.
async fn kill_leader_at(boundary: &str) {
    let Fixture { mut pc, spec, v1 } = setup().await;
    let leader = pc.wait_leader(T).await.unwrap();
    let watcher = (leader + 1) % 3;
    let id = deploy(&pc, watcher, V2, false).await;
    let deadline = Instant::now() + FINISH;
    let mut watch = pc.operator(watcher);
    let seen = loop {
        let op = watch
            .get_operation(pb::GetOperationRequest {
                operation_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .operation
            .unwrap();
        if op.tasks.iter().any(|t| kind(t) == boundary) {
            break op;
        }
        assert!(
            !finished(&op),
            "finished before any {boundary} task: {}",
            describe(Some(&op))
        );
        assert!(Instant::now() < deadline, "no {boundary} task: {}", describe(Some(&op)));
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // Whoever leads at this moment.
    let victim = match pc.cluster_status(watcher).await {
        Some(s) if s.leader_id > 0 => s.leader_id as usize - 1,
        _ => pc.wait_leader(T).await.unwrap(),
    };
    pc.kill9_coordinator(victim);
    let killed_at = Instant::now();
    let new_leader = pc
        .wait_leader(T)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", pc.log_tails(30)));
    assert_ne!(new_leader, victim);
    let elected = killed_at.elapsed();
    let op = pc
        .wait_finished(&id, FINISH)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", pc.log_tails(40)));
    eprintln!(
        "{boundary}: killed leader node {} with {} task(s) added; node {} elected in {elected:?}; \
         finished {:?} after {:?}\n{}",
        victim + 1,
        seen.tasks.len(),
        new_leader + 1,
        pb::TaskState::try_from(op.state),
        killed_at.elapsed(),
        describe(Some(&op))
    );
    let served = assert_not_half_switched(&pc, &spec, &op).await;
    assert_executed_once(&pc, &[&v1, &op], None);
    // A coordinator kill alone never makes a cutover fail.
    assert_eq!(served, V2, "{}", describe(Some(&op)));

    // The killed node restarts from its data directory and catches up.
    let applied = pc.cluster_status(new_leader).await.map_or(0, |s| s.applied_index);
    pc.start_coordinator(victim).unwrap();
    let deadline = Instant::now() + T;
    loop {
        let caught_up = pc
            .cluster_status(victim)
            .await
            .is_some_and(|s| s.applied_index >= applied);
        let same = pc
            .operator(victim)
            .get_operation(pb::GetOperationRequest {
                operation_id: id.clone(),
            })
            .await
            .ok()
            .and_then(|r| r.into_inner().operation)
            .is_some_and(|o| o.state == op.state && o.tasks.len() == op.tasks.len());
        if caught_up && same {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "restarted node {} did not catch up\n{}",
            victim + 1,
            pc.log_tails(30)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_kill9_at_deploy_step() {
    kill_leader_at("app.deploy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_kill9_at_gates_step() {
    kill_leader_at("app.gates").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_kill9_at_switch_step() {
    kill_leader_at("app.switch").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_kill9_at_bake_step() {
    kill_leader_at("app.bake").await;
}

/// kill -9 of the eu-west agent (wave 2, after us-east was switched) while
/// its `app.deploy` runs; the agent restarts after the coordinator marks it
/// down. The task is re-sent and runs again (it never finished), or the
/// operation rolls back: either way it finishes, no region is left half
/// switched, and nothing that finished ran twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_kill9_mid_deploy() {
    let Fixture { mut pc, spec, v1 } = setup().await;
    let a = pc.agent_index("eu-west");
    let leader = pc.wait_leader(T).await.unwrap();
    let id = deploy(&pc, leader, V2, false).await;
    let deadline = Instant::now() + FINISH;
    let task = loop {
        let op = pc.operation(&id).await.unwrap();
        let started = op
            .tasks
            .iter()
            .find(|t| kind(t) == "app.deploy" && region(t) == "eu-west")
            .map(|t| task_id(t).to_owned())
            .filter(|t| {
                pc.agent_task_events(a)
                    .iter()
                    .any(|e| &e.task_id == t && matches!(e.kind, TaskEventKind::Started { .. }))
            });
        if let Some(t) = started {
            break t;
        }
        assert!(
            !finished(&op),
            "finished before eu-west deployed: {}",
            describe(Some(&op))
        );
        assert!(
            Instant::now() < deadline,
            "eu-west never started its deploy: {}",
            describe(Some(&op))
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    pc.kill9_agent(a);
    let killed_at = Instant::now();
    let ran_to_end = pc
        .agent_task_events(a)
        .iter()
        .any(|e| e.task_id == task && matches!(e.kind, TaskEventKind::Finished { .. }));
    // The coordinator notices the agent is gone before it comes back.
    let deadline = Instant::now() + T;
    loop {
        let agents = pc
            .any("ListAgents", |mut c| async move {
                c.list_agents(pb::ListAgentsRequest::default()).await
            })
            .await
            .unwrap();
        let down = agents.agents.iter().any(|g| {
            g.cluster.as_ref().is_some_and(|c| c.region == "eu-west") && g.state == pb::AgentState::Down as i32
        });
        if down {
            break;
        }
        assert!(Instant::now() < deadline, "eu-west agent never marked down");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    pc.start_agent(a).unwrap();
    let op = pc
        .wait_finished(&id, FINISH)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", pc.log_tails(40)));
    let starts: Vec<_> = pc
        .agent_task_events(a)
        .into_iter()
        .filter(|e| e.task_id == task)
        .collect();
    eprintln!(
        "agent killed {} its deploy {task} finished; operation {:?} {:?} after the kill; events {starts:?}\n{}",
        if ran_to_end { "after" } else { "before" },
        pb::TaskState::try_from(op.state),
        killed_at.elapsed(),
        describe(Some(&op))
    );
    assert!(
        !ran_to_end,
        "the deploy should still be running when its agent is killed"
    );
    assert_not_half_switched(&pc, &spec, &op).await;
    assert_executed_once(&pc, &[&v1, &op], Some(&task));
}

/// Atomic: every region prepares, then one committed decision switches all
/// of them. kill -9 of the leader once that decision is in the log: the new
/// leader carries it out everywhere, and no task runs twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn atomic_cutover_survives_a_leader_kill9_at_its_switch() {
    let Fixture { mut pc, spec, v1 } = setup().await;
    let leader = pc.wait_leader(T).await.unwrap();
    let watcher = (leader + 1) % 3;
    let id = pc
        .operator(watcher)
        .deploy(pb::DeployRequest {
            app: "shop".into(),
            image: V2.into(),
            strategy: pb::Strategy::Atomic as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .operation_id;
    let deadline = Instant::now() + FINISH;
    let seen = loop {
        let op = pc.operation(&id).await.unwrap();
        if op.tasks.iter().any(|t| kind(t) == "app.switch") {
            break op;
        }
        assert!(!finished(&op), "finished before switching: {}", describe(Some(&op)));
        assert!(Instant::now() < deadline, "no switch: {}", describe(Some(&op)));
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // The switches of every region arrived in one entry, after every gate.
    let switches = seen.tasks.iter().filter(|t| kind(t) == "app.switch").count();
    assert_eq!(switches, REGIONS.len(), "{}", describe(Some(&seen)));
    let first_switch = seen.tasks.iter().position(|t| kind(t) == "app.switch").unwrap();
    assert_eq!(
        seen.tasks[..first_switch]
            .iter()
            .filter(|t| kind(t) == "app.gates")
            .count(),
        REGIONS.len()
    );
    let victim = match pc.cluster_status(watcher).await {
        Some(s) if s.leader_id > 0 => s.leader_id as usize - 1,
        _ => pc.wait_leader(T).await.unwrap(),
    };
    pc.kill9_coordinator(victim);
    pc.wait_leader(T)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", pc.log_tails(30)));
    let op = pc
        .wait_finished(&id, FINISH)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", pc.log_tails(40)));
    assert_eq!(
        assert_not_half_switched(&pc, &spec, &op).await,
        V2,
        "{}",
        describe(Some(&op))
    );
    assert_executed_once(&pc, &[&v1, &op], None);
}

const LEVEL: u32 = cutover_coordinator::raft::level::FEATURE_LEVEL;

/// Waits until node `at`'s cluster status shows each (node index, feature
/// level) of `want` (0: not known, as for the previous release).
async fn wait_levels(pc: &ProcessCluster, at: usize, want: &[(usize, u32)]) {
    let deadline = Instant::now() + T;
    loop {
        let s = pc.cluster_status(at).await;
        let level = |n: usize| {
            s.as_ref()
                .and_then(|s| s.members.iter().find(|m| m.node_id == n as u64 + 1))
                .map(|m| m.feature_level)
        };
        if want.iter().all(|&(n, l)| level(n) == Some(l)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {} never showed the levels {want:?}: {:?}",
            at + 1,
            s.map(|s| s.members)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until node `i` has applied what node `leading` had applied, and
/// knows a leader.
async fn wait_caught_up(pc: &ProcessCluster, i: usize, leading: usize) {
    let applied = pc.cluster_status(leading).await.map_or(0, |s| s.applied_index);
    let deadline = Instant::now() + T;
    while !pc
        .cluster_status(i)
        .await
        .is_some_and(|s| s.applied_index >= applied && s.leader_id > 0)
    {
        assert!(
            Instant::now() < deadline,
            "node {} did not catch up with node {}\n{}",
            i + 1,
            leading + 1,
            pc.log_tails(30)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Restarts coordinator `i` on `bin` (SIGTERM, then its data directory)
/// and waits until it has caught up with the leader.
async fn restart_on(pc: &mut ProcessCluster, i: usize, bin: &std::path::Path) {
    let status = pc
        .stop_coordinator(i, T)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", pc.log_tails(30)));
    assert!(status.success(), "node {} exited with {status} on SIGTERM", i + 1);
    pc.set_coordinator_binary(i, bin);
    pc.start_coordinator(i).unwrap();
    let leading = pc
        .wait_leader(T)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", pc.log_tails(30)));
    wait_caught_up(pc, i, leading).await;
}

/// A cluster of mixed releases under a leader of this one: two
/// coordinators upgraded, the third on the previous release and not
/// leading (stopped while the upgraded two elect, if it won after the
/// second restart). The leader proposes no tick of the cluster clock (an
/// entry the previous release could not apply): it says so, the old member
/// keeps applying everything (it catches up on an app applied and deployed
/// under the upgraded leader, and keeps running), and no node has a tick.
/// Once the third is upgraded, the leader ticks in its term.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_proposes_nothing_a_member_of_the_previous_release_could_not_apply() {
    let previous = cutover_tests::previous_release();
    let this = cutover_bin();
    let mut pc = ProcessCluster::start_on_previous(3, REGIONS, &previous).await.unwrap();
    let first = pc.wait_leader(T).await.unwrap();
    let follower = (0..3).find(|&i| i != first).unwrap();
    restart_on(&mut pc, follower, &this).await;
    restart_on(&mut pc, first, &this).await;
    let old = (0..3).find(|&i| i != first && i != follower).unwrap();
    if pc.wait_leader(T).await.unwrap() == old {
        // It won the election after `first`'s restart. Stopped until the
        // upgraded two elect (a restart alone can leave it leading: its
        // term's lease outlives a quick restart), then started again.
        let status = pc.stop_coordinator(old, T).await.unwrap();
        assert!(status.success(), "node {} exited with {status} on SIGTERM", old + 1);
        let next = pc.wait_leader(T).await.unwrap();
        pc.start_coordinator(old).unwrap();
        wait_caught_up(&pc, old, next).await;
    }
    let leading = pc.wait_leader(T).await.unwrap();
    assert_ne!(leading, old, "the old release still leads");
    wait_levels(&pc, leading, &[(first, LEVEL), (follower, LEVEL), (old, 0)]).await;
    let deadline = Instant::now() + T;
    while !pc.coordinator_log(leading).contains("cluster clock not ticking") {
        assert!(
            Instant::now() < deadline,
            "leader {} never said its tick was refused\n{}",
            leading + 1,
            pc.log_tails(30)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let Fixture { mut pc, .. } = setup_on(pc, app()).await;
    let leading = pc.wait_leader(T).await.unwrap();
    wait_caught_up(&pc, old, leading).await;
    for i in 0..3 {
        let s = pc.cluster_status(i).await.unwrap();
        assert_eq!(s.clock_term, 0, "node {} applied a tick: {s:?}", i + 1);
    }
    assert!(pc.coordinator_exited(old).is_none(), "the old member stopped");
    restart_on(&mut pc, old, &this).await;
    let leading = pc.wait_leader(T).await.unwrap();
    wait_levels(&pc, leading, &[(0, LEVEL), (1, LEVEL), (2, LEVEL)]).await;
    wait_clock_ticked(&pc, leading).await;
}

/// Waits until node `at`, leading, has applied its own term's tick.
async fn wait_clock_ticked(pc: &ProcessCluster, at: usize) {
    let deadline = Instant::now() + T;
    loop {
        let s = pc.cluster_status(at).await;
        if s.as_ref().is_some_and(|s| s.clock_term > 0 && s.clock_term == s.term) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {} never ticked the cluster clock in its term: {s:?}\n{}",
            at + 1,
            pc.log_tails(30)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A rolling upgrade from the previous release (`scripts/previous-release`)
/// in the middle of a cutover. The cluster and its agents start on the
/// previous release's binary, with their config files as it reads them,
/// and deploy v1; then, while a cutover to v2 runs, each coordinator in
/// turn is stopped (SIGTERM), started on this release's binary on its own
/// data directory, and caught up before the next: one follower, then the
/// leader, then the other follower, so the cluster elects and commits with
/// mixed versions at every step, and the previous release's agents carry
/// out the cutover for coordinators of both. The cutover completes, is not
/// half switched, and no task ran twice. An upgraded leader knows which
/// members run the new release (their feature level) and which do not,
/// and proposes no entry the previous release could not apply (the
/// cluster clock's tick) until every member is upgraded. Then each agent is restarted on
/// this release, on its own task store, and a cutover back to v1 runs on
/// the upgraded fleet.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_upgrade_from_the_previous_release_in_the_middle_of_a_cutover() {
    let previous = cutover_tests::previous_release();
    let this = cutover_bin();
    // Bake long enough that the cutover spans the three restarts.
    let spec = AppSpec { bake_secs: 6, ..app() };
    let pc = ProcessCluster::start_on_previous(3, REGIONS, &previous).await.unwrap();
    let Fixture { mut pc, spec, v1 } = setup_on(pc, spec).await;
    let leader = pc.wait_leader(T).await.unwrap();
    let followers: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let id = deploy(&pc, followers[0], V2, false).await;
    for i in [followers[0], leader, followers[1]] {
        let op = pc.operation(&id).await.unwrap();
        assert!(
            !finished(&op),
            "the cutover finished before node {} was upgraded: {}",
            i + 1,
            describe(Some(&op))
        );
        let status = pc
            .stop_coordinator(i, T)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", pc.log_tails(30)));
        assert!(status.success(), "node {} exited with {status} on SIGTERM", i + 1);
        if i == leader {
            // The other two (one upgraded, one not) elect a leader before
            // the old one returns, as when a restart takes its time.
            let next = pc
                .wait_leader(T)
                .await
                .unwrap_or_else(|e| panic!("{e}\n{}", pc.log_tails(30)));
            eprintln!("node {} (stopped leader) replaced by node {}", i + 1, next + 1);
        }
        let upgraded_at = Instant::now();
        pc.set_coordinator_binary(i, &this);
        pc.start_coordinator(i).unwrap();
        let leading = pc
            .wait_leader(T)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", pc.log_tails(30)));
        wait_caught_up(&pc, i, leading).await;
        eprintln!(
            "node {} upgraded and caught up in {:?}; node {} leads; the cutover has {} task(s)",
            i + 1,
            upgraded_at.elapsed(),
            leading + 1,
            op.tasks.len()
        );
        if i == leader && leading != followers[1] {
            // Mixed, under an upgraded leader: it knows the other upgraded
            // node's feature level and none for the previous release's.
            let levels = [(followers[0], LEVEL), (leader, LEVEL), (followers[1], 0)];
            wait_levels(&pc, leading, &levels).await;
            // It has not ticked the cluster clock: the previous release
            // could not apply a tick (it would stop on the entry).
            let s = pc.cluster_status(leading).await.unwrap();
            assert_eq!(
                s.clock_term, 0,
                "the cluster clock ticked with a member of the previous release"
            );
        }
    }
    let leading = pc.wait_leader(T).await.unwrap();
    wait_levels(&pc, leading, &[(0, LEVEL), (1, LEVEL), (2, LEVEL)]).await;
    // Every member upgraded: the leader ticks the cluster clock in its term.
    wait_clock_ticked(&pc, leading).await;
    let op = pc
        .wait_finished(&id, FINISH)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", pc.log_tails(40)));
    assert!(state_is(&op, pb::TaskState::Succeeded), "{}", describe(Some(&op)));
    assert_eq!(assert_not_half_switched(&pc, &spec, &op).await, V2);
    assert_executed_once(&pc, &[&v1, &op], None);
    // A node of the previous release that did not know Pre-Vote was
    // counted as granting it, when an upgraded node stood meanwhile.
    let mixed_elections = (0..3)
        .filter(|&i| pc.coordinator_log(i).contains("predates Pre-Vote"))
        .count();
    eprintln!("upgraded nodes that stood against a node of the previous release: {mixed_elections}");

    // The agents, one at a time, each on its own task store.
    for a in 0..REGIONS.len() {
        pc.kill9_agent(a);
        pc.set_agent_binary(a, &this);
        pc.start_agent(a).unwrap();
    }
    pc.wait_agents_up(T)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", pc.log_tails(30)));
    let leader = pc.wait_leader(T).await.unwrap();
    let back = deploy(&pc, leader, V1, false).await;
    let back = pc
        .wait_finished(&back, FINISH)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", pc.log_tails(40)));
    assert!(state_is(&back, pb::TaskState::Succeeded), "{}", describe(Some(&back)));
    for c in &spec.clusters {
        assert_eq!(
            serving(&c.local.as_ref().unwrap().listen).await,
            format!("version {V1}"),
            "{} after the cutover on the upgraded fleet",
            c.region
        );
    }
    assert_executed_once(&pc, &[&v1, &op, &back], None);
}
