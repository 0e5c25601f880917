//! Disk faults on a coordinator's data directory, with real processes: its
//! directory on a small tmpfs that a filler file then fills. Run as root
//! (CI does): the test mounts the tmpfs.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cutover_shared::proto as pb;
use cutover_tests::disk::SmallDisk;
use cutover_tests::process::{ProcessCluster, describe};

const T: Duration = Duration::from_secs(60);

/// An echo task on the us-east agent whose message takes `pad` bytes more:
/// each write grows every node's Raft log by at least that.
fn echo(n: usize, pad: usize) -> pb::RunTaskRequest {
    let params: BTreeMap<String, String> = [("message".to_string(), format!("write {n} {}", "x".repeat(pad)))].into();
    pb::RunTaskRequest {
        target: Some(pb::ClusterRef {
            region: "us-east".into(),
            cluster: "us-east-1".into(),
        }),
        kind: "echo".into(),
        params: params.into_iter().collect(),
    }
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
    let mut pc = ProcessCluster::start(3, &[("us-east", "us-east-1")]).await.unwrap();
    let leader = pc.wait_leader(T).await.unwrap();
    pc.wait_agents_up(T)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", pc.log_tails(30)));
    let victim = (leader + 1) % 3;

    // The follower's data directory moves onto a 16 MiB tmpfs.
    pc.kill9_coordinator(victim);
    let disk = SmallDisk::mount_over(&pc.coordinator_data_dir(victim), 16).unwrap();
    pc.start_coordinator(victim).unwrap();
    assert_eq!(pc.wait_leader(T).await.unwrap(), leader);

    let mut acked = vec![];
    for n in 0..10 {
        acked.extend(write(&pc, leader, n).await);
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
        acked.extend(write(&pc, leader, n).await);
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
        acked.extend(write(&pc, leader, n + m).await);
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
        acked.extend(write(&pc, leader, n).await);
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
    for id in &acked {
        let deadline = Instant::now() + T;
        loop {
            let op = pc
                .operator(victim)
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
                "{id} never read back through node {}: {}\n{}",
                victim + 1,
                describe(op.as_ref()),
                pc.log_tails(20)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let status = pc.cluster_status(victim).await.unwrap();
    assert_eq!(status.server_state, "follower");
    let said = log.lines().find(|l| l.contains("Raft stopped")).unwrap_or_default();
    println!(
        "filler took {} KiB; node {} exited (code 3) after {during} writes on the full disk, \
         saying: {said}\nrestarted on the full disk it exited again ({again}); \
         {} acknowledged writes read back through it after the restart with space back",
        filled / 1024,
        victim + 1,
        acked.len()
    );
}
