//! Faults of one coordinator's machine, with real processes: its data
//! directory on a small tmpfs that a filler file then fills (run as root,
//! as CI does: the test mounts the tmpfs), and its wall clock jumping
//! forward and back under libfaketime.

use std::time::{Duration, Instant};

use cutover_shared::app::{UnreachableAction, UnreachablePolicy};
use cutover_shared::proto as pb;
use cutover_tests::disk::{SlowFsync, SmallDisk};
use cutover_tests::process::{ProcessCluster, describe};

const T: Duration = Duration::from_secs(60);

/// An echo task on the us-east agent whose message takes `pad` bytes more:
/// each write grows every node's Raft log by at least that.
fn echo(n: usize, pad: usize) -> pb::RunTaskRequest {
    cutover_tests::echo_task("us-east", "us-east-1", &format!("write {n} {}", "x".repeat(pad)), 0)
}

/// Write `n` through `node`: the operation's id once acknowledged.
async fn write(pc: &ProcessCluster, node: usize, n: usize) -> Option<String> {
    let r = pc.operator(node).run_task(echo(n, 4000)).await.ok()?;
    Some(r.into_inner().operation_id)
}

/// A follower's disk fills up while writes go on. It fails safe: its Raft
/// log write fails, and the process stops serving and exits (code 3),
/// naming the cause and the directory in its log, for a supervisor to
/// restart it, rather than linger half alive. The other two keep
/// acknowledging writes. Once the space is back and it is restarted, it
/// rejoins and every write acknowledged before, during and after the
/// fault reads back through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_coordinator_whose_disk_fills_stops_says_why_and_rejoins_when_space_returns() {
    disk_fills(false).await;
}

/// The same with the leader's disk: it stops the same way, the other two
/// elect a leader among themselves and acknowledge writes, and nothing
/// the full leader acknowledged before is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_whose_disk_fills_stops_and_the_others_carry_on() {
    disk_fills(true).await;
}

/// Fills the disk of a coordinator that leads (`leader`) or follows.
async fn disk_fills(leader: bool) {
    let mut pc = ProcessCluster::start(3, &[("us-east", "us-east-1")]).await.unwrap();
    let first = pc.wait_leader(T).await.unwrap();
    pc.wait_agents_up(T)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", pc.log_tails(30)));
    let victim = (first + 1) % 3;

    // The victim's data directory moves onto a 16 MiB tmpfs.
    pc.kill9_coordinator(victim);
    let disk = SmallDisk::mount_over(&pc.coordinator_data_dir(victim), 16).unwrap();
    pc.start_coordinator(victim).unwrap();
    // Writes go through another node. The leadership goes where the test
    // wants it, by the operator's transfer (the restart may have made the
    // victim leader, its disk not full yet).
    let via = (victim + 1) % 3;
    let now = pc.wait_leader(T).await.unwrap();
    let lead = if leader { victim } else { via };
    if now != lead {
        pc.operator(via)
            .transfer_leadership(pb::TransferLeadershipRequest {
                node_id: lead as u64 + 1,
            })
            .await
            .unwrap_or_else(|e| panic!("transfer to node {}: {e}\n{}", lead + 1, pc.log_tails(30)));
    }
    assert_eq!(pc.wait_leader(T).await.unwrap(), lead);

    let mut acked = vec![];
    for n in 0..10 {
        acked.extend(write(&pc, via, n).await);
    }
    let filled = disk.fill().unwrap();

    // Writes go on until the full node gives up.
    let deadline = Instant::now() + T;
    let mut n = 10;
    let status = loop {
        if let Some(status) = pc.coordinator_exited(victim) {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "node {} still runs on a full disk after {} writes\n{}",
            victim + 1,
            n,
            pc.log_tails(20)
        );
        acked.extend(write(&pc, via, n).await);
        n += 1;
    };
    let during = n - 10;
    assert_eq!(status.code(), Some(3), "{status}");
    let log = pc.coordinator_log(victim);
    assert!(log.contains("Raft stopped"), "{}", pc.log_tails(20));
    assert!(
        log.contains(&pc.coordinator_data_dir(victim).display().to_string()),
        "the log does not name the directory"
    );

    // The majority goes on without it.
    let before = acked.len();
    for m in 0..10 {
        acked.extend(write(&pc, via, n + m).await);
    }
    assert_eq!(acked.len(), before + 10, "the majority refused writes");
    n += 10;

    // Restarted on a disk still full, it stops again the same way (a
    // supervisor's restart loop, not a crash or a half-alive node).
    pc.start_coordinator(victim).unwrap();
    let deadline = Instant::now() + T;
    let again = loop {
        if let Some(status) = pc.coordinator_exited(victim) {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "restarted on a full disk, node {} still runs\n{}",
            victim + 1,
            pc.log_tails(20)
        );
        acked.extend(write(&pc, via, n).await);
        n += 1;
    };
    assert!(!again.success(), "{again}");
    let restarted_log = pc.coordinator_log(victim);
    assert!(
        restarted_log.matches("No space left on device").count() >= 2,
        "the restart did not name the cause\n{}",
        pc.log_tails(20)
    );

    // Space back, restarted: it rejoins and reads back every write.
    disk.free().unwrap();
    pc.start_coordinator(victim).unwrap();
    read_back(&pc, victim, &acked).await;
    let status = pc.cluster_status(victim).await.unwrap();
    assert_eq!(status.server_state, "follower");
    let said = log.lines().find(|l| l.contains("Raft stopped")).unwrap_or_default();
    println!(
        "{}: filler took {} KiB; node {} exited (code 3) after {during} writes on the full disk, \
         saying: {said}\nrestarted on the full disk it exited again ({again}); \
         {} acknowledged writes read back through it after the restart with space back",
        if leader { "leader" } else { "follower" },
        filled / 1024,
        victim + 1,
        acked.len()
    );
}

/// Waits until every operation of `acked` reads back through node `i`.
async fn read_back(pc: &ProcessCluster, i: usize, acked: &[String]) {
    for id in acked {
        let deadline = Instant::now() + T;
        loop {
            let op = pc
                .operator(i)
                .get_operation(pb::GetOperationRequest {
                    operation_id: id.clone(),
                })
                .await
                .ok()
                .and_then(|r| r.into_inner().operation);
            if op.is_some() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "acknowledged {id} lost on node {}\n{}",
                i + 1,
                pc.log_tails(20)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The leader's disk turns slow: every fsync waits 800 ms. Writes go on at
/// the followers' pace (the two of them are a majority: a commit does not
/// wait for the leader's own fsync, which lags behind), the leader says
/// why in its log, and a kill -9 of it with fsyncs queued loses nothing it
/// acknowledged (a write that fails as unavailable, by a leader change
/// meanwhile, is not acknowledged): the new leader has every write, and the old one,
/// restarted on a healed disk, reads them all back. The way out for an
/// operator is `transfer-leader` to a node with a healthy disk.
///
/// Not yet explained (5 of 8 local runs, 2026-12-05): right after its
/// first slow fsync the slow leader logs nothing for about one fsync's
/// length (800 ms), its Raft RPCs time out, and the third node, whose
/// leader lease the leadership transfer cleared, is elected after its
/// election timeout; the write in flight comes back unavailable.
/// What stalls the leader for that long is open (not the commit marker,
/// kept in memory; not log purges, none this early; not the audit file's
/// fsync, off the async workers since).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_with_a_slow_disk_says_so_and_a_crash_loses_nothing_acknowledged() {
    let mut pc = ProcessCluster::start(3, &[("us-east", "us-east-1")]).await.unwrap();
    let first = pc.wait_leader(T).await.unwrap();
    pc.wait_agents_up(T)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", pc.log_tails(30)));
    // The victim restarts on the slow-fsync library (no delay yet) and is
    // handed the leadership.
    let victim = (first + 1) % 3;
    let via = (victim + 1) % 3;
    let disk = SlowFsync::build(pc.dir()).unwrap();
    pc.set_coordinator_env(victim, disk.env());
    pc.kill9_coordinator(victim);
    pc.start_coordinator(victim).unwrap();
    pc.wait_leader(T).await.unwrap();
    let r = pc
        .operator(via)
        .transfer_leadership(pb::TransferLeadershipRequest {
            node_id: victim as u64 + 1,
        })
        .await
        .unwrap_or_else(|e| panic!("transfer: {e}\n{}", pc.log_tails(30)));
    assert_eq!(r.into_inner().leader_id, victim as u64 + 1);

    disk.set_delay_ms(800).unwrap();
    let mut acked = vec![];
    let mut took = vec![];
    let slow_said = |pc: &ProcessCluster| {
        pc.coordinator_log(victim)
            .lines()
            .find(|l| l.contains("the Raft log's disk is slow"))
            .map(str::to_owned)
    };
    // Writes until the leader has said its disk is slow (after its first
    // 800 ms fsync), then three more, so fsyncs are queued at the crash.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut after_warning = 0;
    let mut failed = 0;
    let mut warned = None;
    while after_warning < 3 {
        let n = acked.len() + failed;
        let started = Instant::now();
        match pc.operator(victim).run_task(echo(n, 100)).await {
            Ok(r) => {
                took.push(started.elapsed());
                acked.push(r.into_inner().operation_id);
            }
            // A leader change meanwhile ("commit status unknown"): not
            // acknowledged, so not counted; the next write goes through
            // whichever node leads.
            // With CUTOVER_DEBUG_SLOW_DISK set, the nodes' logs are printed
            // then (see the note above the test).
            Err(e) if e.code() == tonic::Code::Unavailable => {
                println!("write {n} unavailable: {}", e.message());
                if std::env::var_os("CUTOVER_DEBUG_SLOW_DISK").is_some() {
                    println!("{}", pc.log_tails(200));
                }
                failed += 1
            }
            Err(e) => panic!("write {n} on the slow leader: {e}\n{}", pc.log_tails(20)),
        }
        if warned.is_none() {
            warned = slow_said(&pc);
            assert!(
                warned.is_some() || Instant::now() < deadline,
                "the slow leader did not say its disk is slow within 60 s\n{}",
                pc.log_tails(20)
            );
        } else {
            after_warning += 1;
        }
    }
    let warned = warned.expect("checked above");
    assert!(
        acked.len() >= 3,
        "only {} writes acknowledged, {failed} unavailable\n{}",
        acked.len(),
        pc.log_tails(20)
    );
    // Its fsyncs lag behind what it acknowledged: a crash now.
    pc.kill9_coordinator(victim);

    let leader = pc.wait_leader(T).await.unwrap();
    assert_ne!(leader, victim);
    read_back(&pc, leader, &acked).await;

    disk.set_delay_ms(0).unwrap();
    pc.start_coordinator(victim).unwrap();
    read_back(&pc, victim, &acked).await;
    took.sort();
    println!(
        "slow leader (800 ms per fsync): {} writes acknowledged ({failed} unavailable), p50 {:?}, max {:?}; it logged: {warned}\n\
         after its kill -9, all {} read back through the new leader (node {}) and through it, restarted",
        took.len(),
        took[took.len() / 2],
        took[took.len() - 1],
        took.len(),
        leader + 1
    );
}

/// The leader's wall clock jumps an hour forward, then back to the true
/// time, while a step waits for an agent that is down under an
/// `[unreachable] rollback after 8 s` policy. Neither jump changes the
/// decision: the step is given up after the 8 s have passed, measured in
/// elapsed time (not at the forward jump, as "down for an hour", nor an
/// hour late after the jump back), and the operation finished before the
/// jumps reads back unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wall_clock_jump_on_the_leader_changes_no_decision() {
    let regions = [("us-east", "us-east-1"), ("eu-west", "eu-west-1")];
    let mut pc = ProcessCluster::start_with_clocks(3, &regions).await.unwrap();
    pc.wait_leader(T).await.unwrap();
    pc.wait_agents_up(T)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", pc.log_tails(30)));
    let mut spec = cutover_tests::sample_app_spec("shop", &regions);
    spec.waves = vec![vec!["us-east".into()], vec!["eu-west".into()]];
    spec.unreachable = Some(UnreachablePolicy {
        action: UnreachableAction::Rollback,
        after_secs: 8,
    });
    pc.apply_app(&spec).await.unwrap();
    let deploy = async |image: &str| pc.start_deploy_waves("shop", image).await.unwrap();
    let first = deploy("sample:v1").await;
    let before = pc.wait_finished(&first, T).await.unwrap();
    assert_eq!(
        before.state,
        pb::TaskState::Succeeded as i32,
        "{}",
        describe(Some(&before))
    );

    // eu-west's agent dies while the second deploy is in its first wave.
    let second = deploy("sample:v2").await;
    let eu_west = pc.agent_index("eu-west");
    pc.kill9_agent(eu_west);
    let deadline = Instant::now() + T;
    let waiting_since = loop {
        let op = pc.operation(&second).await.unwrap();
        let waits = op.tasks.iter().any(|t| {
            t.task
                .as_ref()
                .and_then(|t| t.target.as_ref())
                .is_some_and(|c| c.region == "eu-west")
                && t.state != pb::TaskState::Succeeded as i32
                && t.state != pb::TaskState::Failed as i32
        });
        let agents = pc
            .any("ListAgents", |mut c| async move {
                c.list_agents(pb::ListAgentsRequest::default()).await
            })
            .await
            .unwrap()
            .agents;
        let down = agents.iter().any(|a| {
            a.cluster.as_ref().is_some_and(|c| c.region == "eu-west") && a.state == pb::AgentState::Down as i32
        });
        if waits && down {
            break Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "no step waits for eu-west: {}",
            describe(Some(&op))
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // An hour forward on the leader: 4 s later nothing was given up.
    let leader = pc.wait_leader(T).await.unwrap();
    pc.set_clock(leader, "+1h").unwrap();
    while waiting_since.elapsed() < Duration::from_secs(5) {
        let op = pc.operation(&second).await.unwrap();
        assert_eq!(op.state, pb::TaskState::Running as i32, "{}", describe(Some(&op)));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Back to the true time, an hour back: the step is given up once its
    // 8 s have passed, not an hour later.
    pc.set_clock(leader, "+0").unwrap();
    let op = pc.wait_finished(&second, T).await.unwrap();
    let waited = waiting_since.elapsed();
    assert_eq!(op.state, pb::TaskState::Failed as i32, "{}", describe(Some(&op)));
    assert!(op.summary.contains("unreachable"), "{}", op.summary);
    assert!(waited >= Duration::from_secs(7), "given up after {waited:?}");
    assert_eq!(
        pc.wait_leader(T).await.unwrap(),
        leader,
        "the leader changed: the test proves nothing"
    );

    // The operation decided before the jumps reads back as it was.
    let after = pc.operation(&first).await.unwrap();
    assert_eq!(after, before);
    println!(
        "leader's wall clock +1h then back: the step was given up {} ms after its agent was seen down \
         (policy: 8 s); {}",
        waited.as_millis(),
        op.summary
    );
}

/// A coordinator whose wall clock was an hour ahead from its start takes
/// over the leadership while a step waits for an agent that is down under
/// an `[unreachable] rollback after 8 s` policy. The state's timestamps
/// (the agent down since, the step started at) were read off the other
/// nodes' clocks; the new leader does not take them for an hour-long
/// outage: it waits the policy's 8 s from when it took over, and gives the
/// step up then. (Before, it gave the step up at once.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_whose_clock_was_wrong_from_its_start_waits_out_the_policy() {
    let regions = [("us-east", "us-east-1"), ("eu-west", "eu-west-1")];
    let mut pc = ProcessCluster::start_with_clocks(3, &regions).await.unwrap();
    let leader = pc.wait_leader(T).await.unwrap();
    pc.wait_agents_up(T)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", pc.log_tails(30)));
    // Another node restarts with its wall clock an hour ahead.
    let skewed = (leader + 1) % 3;
    pc.kill9_coordinator(skewed);
    pc.set_clock(skewed, "+1h").unwrap();
    pc.start_coordinator(skewed).unwrap();
    let mut spec = cutover_tests::sample_app_spec("shop", &regions);
    spec.waves = vec![vec!["us-east".into()], vec!["eu-west".into()]];
    spec.unreachable = Some(UnreachablePolicy {
        action: UnreachableAction::Rollback,
        after_secs: 8,
    });
    pc.apply_app(&spec).await.unwrap();
    let first = pc.start_deploy_waves("shop", "sample:v1").await.unwrap();
    let done = pc.wait_finished(&first, T).await.unwrap();
    assert_eq!(done.state, pb::TaskState::Succeeded as i32, "{}", describe(Some(&done)));

    // eu-west's agent dies while the second deploy is in its first wave.
    let second = pc.start_deploy_waves("shop", "sample:v2").await.unwrap();
    pc.kill9_agent(pc.agent_index("eu-west"));
    let deadline = Instant::now() + T;
    loop {
        // A step for eu-west exists (created by the current leader, on its
        // clock) and its agent is recorded down.
        let op = pc.operation(&second).await.unwrap();
        let waits = op.tasks.iter().any(|t| {
            t.task
                .as_ref()
                .and_then(|t| t.target.as_ref())
                .is_some_and(|c| c.region == "eu-west")
                && t.state != pb::TaskState::Succeeded as i32
                && t.state != pb::TaskState::Failed as i32
        });
        let agents = pc
            .any("ListAgents", |mut c| async move {
                c.list_agents(pb::ListAgentsRequest::default()).await
            })
            .await
            .unwrap()
            .agents;
        if waits
            && agents.iter().any(|a| {
                a.cluster.as_ref().is_some_and(|c| c.region == "eu-west") && a.state == pb::AgentState::Down as i32
            })
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no step waits for eu-west's agent down: {}",
            describe(Some(&op))
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The skewed node takes over.
    let now_leading = pc.wait_leader(T).await.unwrap();
    pc.operator(now_leading)
        .transfer_leadership(pb::TransferLeadershipRequest {
            node_id: skewed as u64 + 1,
        })
        .await
        .unwrap_or_else(|e| panic!("transfer: {e}\n{}", pc.log_tails(30)));
    let took_over = Instant::now();
    // Within the policy's 8 s of taking over, nothing is given up.
    while took_over.elapsed() < Duration::from_secs(6) {
        let op = pc.operation(&second).await.unwrap();
        assert_eq!(
            op.state,
            pb::TaskState::Running as i32,
            "given up {:?} after a leader with a clock an hour ahead took over: {}",
            took_over.elapsed(),
            describe(Some(&op))
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let op = pc.wait_finished(&second, T).await.unwrap();
    let waited = took_over.elapsed();
    assert_eq!(op.state, pb::TaskState::Failed as i32, "{}", describe(Some(&op)));
    assert!(op.summary.contains("unreachable"), "{}", op.summary);
    assert_eq!(
        pc.wait_leader(T).await.unwrap(),
        skewed,
        "the leader changed: the test proves nothing"
    );
    println!(
        "a leader with its clock an hour ahead from its start took over; the step was given up {} ms after it \
         took over (policy: 8 s); {}",
        waited.as_millis(),
        op.summary
    );
}
