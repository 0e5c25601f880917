//! Raft cluster behaviour: election, leader loss (in-process and kill -9 of a
//! real process), restart from disk, membership changes under writes.

use std::time::Duration;

use cutover_shared::config::to_toml;
use cutover_shared::proto as pb;
use cutover_tests::{Proc, TestCluster};

const T: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_elect_exactly_one_leader() {
    let c = TestCluster::builder().nodes(3).start().await.unwrap();
    let leader = c.wait_leader(T).await.unwrap();
    for i in 0..3 {
        let s = c
            .operator(i)
            .get_cluster_status(pb::GetClusterStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(s.leader_id, leader as u64 + 1, "node {} disagrees on the leader", i + 1);
        assert_eq!(s.members.len(), 3);
        assert_eq!(s.members.iter().filter(|m| m.leader).count(), 1);
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_loss_then_restart_from_disk_catches_up() {
    let mut c = TestCluster::builder().nodes(3).start().await.unwrap();
    let old = c.wait_leader(T).await.unwrap();
    for k in 0..5 {
        c.write(old, &format!("img:{k}")).await.unwrap();
    }
    c.stop_node(old).await;
    let new = c.wait_leader(T).await.unwrap();
    assert_ne!(new, old);
    // Writes continue, through a follower too (forwarded to the leader).
    let follower = (0..3).find(|&i| i != old && i != new).unwrap();
    let mut last = 0;
    for k in 5..10 {
        last = c.write(follower, &format!("img:{k}")).await.unwrap();
    }
    c.start_node(old).await.unwrap();
    c.wait_state(old, T, "restarted node to catch up", |s| {
        s.attestations.contains_key("img:9")
    })
    .await
    .unwrap();
    assert!(last > 0);
    assert_eq!(c.node(old).consensus().read(|s| s.attestations.len()), 10);
    c.shutdown().await;
}

/// A node of an older release is not added once the log holds entries it
/// could not apply (the cluster clock's ticks, feature level 2): the leader
/// asks the node its level first, and a release before levels answers
/// UNIMPLEMENTED (here a server on the node's address with its
/// certificate that serves no `RaftService`, as such a release serves no
/// `Level`). The error names the node and the fix, and the membership is
/// unchanged; the same node on this release is added.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_of_an_older_release_is_refused_once_the_log_needs_a_newer_one() {
    let mut c = TestCluster::builder().nodes(3).spare_nodes(1).start().await.unwrap();
    let leader = c.wait_leader(T).await.unwrap();
    c.wait_state(leader, T, "the leader's first tick", |s| s.level_in_use >= 2)
        .await
        .unwrap();
    let addr = c.configs[3].listen.clone();
    let listener = c.take_listener(3).unwrap();
    let acceptor = cutover_shared::listener::MtlsAcceptor::new(&c.configs[3].tls).unwrap();
    let (_, health) = tonic_health::server::health_reporter();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let old = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming_shutdown(acceptor.incoming(listener), async {
                let _ = stopped.await;
            }),
    );
    let add = |c: &TestCluster| {
        let mut op = c.operator(leader);
        let address = addr.clone();
        async move { op.add_node(pb::AddNodeRequest { node_id: 4, address }).await }
    };
    let e = add(&c).await.unwrap_err();
    for part in ["node 4", "feature level 1", "level 2", "start it on this release"] {
        assert!(e.message().contains(part), "{part:?} not in {e:?}");
    }
    let members = |c: &TestCluster| {
        let mut op = c.operator(leader);
        async move {
            op.get_cluster_status(pb::GetClusterStatusRequest {})
                .await
                .unwrap()
                .into_inner()
                .members
                .len()
        }
    };
    assert_eq!(members(&c).await, 3, "the membership changed");
    stop.send(()).unwrap();
    old.await.unwrap().unwrap();
    // Its accept loop lets the port go once it sees the server gone.
    let deadline = std::time::Instant::now() + T;
    while std::net::TcpListener::bind(&addr).is_err() {
        assert!(std::time::Instant::now() < deadline, "{addr} still bound");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.start_node(3).await.unwrap();
    add(&c).await.unwrap();
    assert_eq!(members(&c).await, 4);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn membership_three_to_four_to_three_while_writing() {
    let mut c = TestCluster::builder().nodes(3).spare_nodes(1).start().await.unwrap();
    let leader = c.wait_leader(T).await.unwrap();
    // A first write commits the initial membership too.
    c.write(leader, "first").await.unwrap();
    c.start_node(3).await.unwrap();
    let addr = c.configs[3].listen.clone();
    // Writes keep flowing while membership changes.
    let writer = {
        let ops: Vec<_> = (0..3).map(|i| c.operator(i)).collect();
        tokio::spawn(async move {
            let mut n = 0u32;
            for k in 0..40 {
                let mut client = ops[k % 3].clone();
                let r = client
                    .create_attestation(pb::CreateAttestationRequest {
                        image: format!("w:{k}"),
                        checks: [("tests".into(), "passed".into())].into(),
                    })
                    .await;
                if r.is_ok() {
                    n += 1;
                }
            }
            n
        })
    };
    let added = c
        .operator(leader)
        .add_node(pb::AddNodeRequest {
            node_id: 4,
            address: addr,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        added
            .members
            .iter()
            .filter(|m| m.role == pb::MemberRole::Voter as i32)
            .count(),
        4
    );
    c.wait_state(3, T, "new node to apply the log", |s| !s.attestations.is_empty())
        .await
        .unwrap();
    let removed = c
        .operator(leader)
        .remove_node(pb::RemoveNodeRequest { node_id: 4 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(removed.members.len(), 3);
    assert!(removed.members.iter().all(|m| m.node_id != 4));
    assert_eq!(
        writer.await.unwrap(),
        40,
        "every write during the membership changes succeeded"
    );
    // Removing an unknown node is a clear error.
    let err = c
        .operator(leader)
        .remove_node(pb::RemoveNodeRequest { node_id: 42 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    // Both changes are in the audit trail with the operator's identity.
    let audit = c.node(leader).consensus().read(|s| s.audit.clone());
    assert!(
        audit
            .iter()
            .any(|e| e.action == "AddNode" && e.actor == "operator/admin" && e.outcome == "ok")
    );
    assert!(audit.iter().any(|e| e.action == "RemoveNode" && e.outcome == "ok"));
    c.shutdown().await;
}

/// An operator hands the leadership to a follower, asking the other
/// follower (which forwards to the leader): the call answers once that node
/// leads, at a higher term, every node agrees, and writes go on through
/// it. Bad requests change nothing: an unknown node, node 0, a viewer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leadership_moves_to_the_node_an_operator_names() {
    let c = TestCluster::builder().nodes(3).start().await.unwrap();
    let old = c.wait_leader(T).await.unwrap();
    c.write(old, "img:before").await.unwrap();
    let before = c.node(old).consensus().status().term;
    let target = (old + 1) % 3;
    let asked = (old + 2) % 3;
    let r = c
        .operator(asked)
        .transfer_leadership(pb::TransferLeadershipRequest {
            node_id: target as u64 + 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.leader_id, target as u64 + 1);
    assert!(r.term > before, "term {} not above {before}", r.term);
    assert_eq!(c.wait_leader(T).await.unwrap(), target);
    c.write(asked, "img:after").await.unwrap();
    c.wait_state(old, T, "the old leader to apply the write after", |s| {
        s.attestations.contains_key("img:after")
    })
    .await
    .unwrap();

    let term = c.node(target).consensus().status().term;
    for (req, code) in [(42, tonic::Code::NotFound), (0, tonic::Code::InvalidArgument)] {
        let err = c
            .operator(asked)
            .transfer_leadership(pb::TransferLeadershipRequest { node_id: req })
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "node {req}: {err}");
    }
    let err = c
        .client(&c.pki.viewer, asked)
        .unwrap()
        .transfer_leadership(pb::TransferLeadershipRequest { node_id: 1 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert_eq!(c.wait_leader(T).await.unwrap(), target);
    assert_eq!(
        c.node(target).consensus().status().term,
        term,
        "a refused call moved something"
    );
    let audit = c.node(target).consensus().read(|s| s.audit.clone());
    assert!(
        audit
            .iter()
            .any(|e| e.action == "TransferLeadership" && e.actor == "operator/admin" && e.outcome == "ok")
    );
    c.shutdown().await;
}

/// The failed forwards counted so far in this process.
fn forward_failures() -> u64 {
    cutover_shared::telemetry::metrics_handle()
        .render()
        .lines()
        .find_map(|l| l.strip_prefix("cutover_raft_forward_failures_total "))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// The leader stops; a write through a follower that still names it waits
/// for the election to name another instead of retrying the stopped leader
/// in a loop (a connection refused at once, a core and a socket spent per
/// turn until the election ends: found by the network simulation,
/// `coordinator/tests/netsim.rs`, as ports exhausted).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_through_a_follower_waits_out_a_stopped_leader_without_spinning() {
    forward_failures();
    let mut c = TestCluster::builder().nodes(3).start().await.unwrap();
    let old = c.wait_leader(T).await.unwrap();
    c.write(old, "img:before").await.unwrap();
    let follower = (old + 1) % 3;
    c.wait_state(follower, T, "the follower to apply the first write", |s| {
        s.attestations.contains_key("img:before")
    })
    .await
    .unwrap();
    let before = forward_failures();
    c.stop_node(old).await;
    c.write(follower, "img:after").await.unwrap();
    // One election (200 to 400 ms here): a try per 200 ms at most, and
    // other tests of this binary may forward meanwhile; a loop made
    // thousands.
    let failed = forward_failures() - before;
    assert!(
        failed < 50,
        "{failed} failed forwards to the stopped leader during one election"
    );
    c.shutdown().await;
}

/// A region's coordinator is lost, and the leadership then moves (an
/// operator's transfer) to a node that has not heard from the lost one
/// since it (re)started. The new leader still ticks the cluster clock in
/// its term: the log already holds ticks, so the member it cannot hear
/// cannot be one that could not apply them, and failover cooldowns stay on
/// the cluster clock (not the wall clocks) while a region is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_leader_ticks_the_cluster_clock_with_a_coordinator_lost() {
    let mut c = TestCluster::builder().nodes(3).start().await.unwrap();
    let old = c.wait_leader(T).await.unwrap();
    let term = c.node(old).consensus().status().term;
    c.wait_state(old, T, "the first leader's tick", |s| s.clock.term == term)
        .await
        .unwrap();
    let lost = (old + 1) % 3;
    let next = (old + 2) % 3;
    c.stop_node(lost).await;
    // Restarted, so it has heard nothing from the lost node (not even a
    // vote answer from the first election).
    c.stop_node(next).await;
    c.start_node(next).await.unwrap();
    c.wait_state(next, T, "the restarted node to catch up", |s| s.clock.term == term)
        .await
        .unwrap();
    c.operator(old)
        .transfer_leadership(pb::TransferLeadershipRequest {
            node_id: next as u64 + 1,
        })
        .await
        .unwrap();
    assert_eq!(c.wait_leader(T).await.unwrap(), next);
    let term = c.node(next).consensus().status().term;
    c.wait_state(next, T, "the new leader's tick with a member lost", |s| {
        s.clock.term == term
    })
    .await
    .unwrap();
    c.shutdown().await;
}

/// Snapshots and purging keep the log bounded; a restarted node recovers
/// from its snapshot plus the log after it, and a node added after the
/// purge catches up by snapshot installation.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshots_bound_the_log_and_bring_nodes_up_to_date() {
    // The process-wide recorder, before any node: the snapshot metrics are
    // checked at the end.
    cutover_shared::telemetry::metrics_handle();
    let mut c = TestCluster::builder()
        .nodes(3)
        .spare_nodes(1)
        .configure(|cfg| {
            cfg.raft.snapshot_every = 20;
            cfg.raft.keep_after_snapshot = 5;
        })
        .start()
        .await
        .unwrap();
    let leader = c.wait_leader(T).await.unwrap();
    for k in 0..120 {
        c.write(leader, &format!("snap:{k}")).await.unwrap();
    }
    for i in 0..3 {
        let deadline = std::time::Instant::now() + T;
        loop {
            let s = c.node(i).consensus().status();
            if s.purged_index > 0 && s.last_log_index - s.purged_index <= 20 + 5 + 10 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "node {} log not bounded: {s:?}",
                i + 1
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // A follower restarts from snapshot + log.
    let follower = (leader + 1) % 3;
    c.stop_node(follower).await;
    c.start_node(follower).await.unwrap();
    c.wait_state(follower, T, "restarted follower has every write", |s| {
        (0..120).all(|k| s.attestations.contains_key(&format!("snap:{k}")))
    })
    .await
    .unwrap();
    // A new node can only catch up by installing a snapshot.
    c.start_node(3).await.unwrap();
    let addr = c.configs[3].listen.clone();
    c.operator(leader)
        .add_node(pb::AddNodeRequest {
            node_id: 4,
            address: addr,
        })
        .await
        .unwrap();
    c.wait_state(3, T, "new node has every write", |s| {
        (0..120).all(|k| s.attestations.contains_key(&format!("snap:{k}")))
    })
    .await
    .unwrap();
    assert!(
        c.node(3).consensus().status().snapshot_index > 0,
        "the new node installed a snapshot"
    );
    // What building them cost, phase by phase, and how big the last was.
    let metrics = cutover_shared::telemetry::metrics_handle().render();
    for phase in ["copy", "encode", "write"] {
        let count = metrics
            .lines()
            .find(|l| l.starts_with(&format!("cutover_raft_snapshot_seconds_count{{phase=\"{phase}\"}}")))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok());
        assert!(count.is_some_and(|n| n > 0), "no {phase} timings in:\n{metrics}");
    }
    let bytes = metrics
        .lines()
        .find(|l| l.starts_with("cutover_raft_snapshot_bytes "))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
    assert!(bytes.is_some_and(|b| b > 0.0), "no snapshot size in:\n{metrics}");
    c.shutdown().await;
}

/// Real `cutover coordinator` processes: kill -9 the leader, a new one is
/// elected, writes continue, and the killed node restarts from its data
/// directory and catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_leader_process() {
    let mut c = TestCluster::builder().nodes(3).prepare().await.unwrap();
    let dir = c.tmp.path().to_owned();
    let mut procs = Vec::new();
    let mut config_paths = Vec::new();
    for (i, cfg) in c.configs.iter().enumerate() {
        let path = dir.join(format!("coordinator-{}.toml", i + 1));
        std::fs::write(&path, to_toml(cfg).unwrap()).unwrap();
        config_paths.push(path);
    }
    // The harness bound the ports to learn them; processes bind them anew.
    c.release_listeners();
    let (configs, pki) = (c.configs.clone(), c.pki.clone());
    for (i, p) in config_paths.iter().enumerate() {
        procs.push(Some(
            Proc::spawn(
                &["coordinator", "--config", p.to_str().unwrap()],
                &dir.join(format!("node-{i}.log")),
            )
            .unwrap(),
        ));
    }
    let client = |i: usize| {
        pb::control_service_client::ControlServiceClient::new(pki.operator.channel(&configs[i].listen, None).unwrap())
    };
    let leader_of = |i: usize| async move {
        client(i)
            .get_cluster_status(pb::GetClusterStatusRequest {})
            .await
            .ok()
            .map(|s| s.into_inner())
    };
    let find_leader = |alive: Vec<usize>| async move {
        let deadline = std::time::Instant::now() + T;
        loop {
            for &i in &alive {
                if let Some(s) = leader_of(i).await
                    && s.server_state == "leader"
                {
                    return i;
                }
            }
            assert!(std::time::Instant::now() < deadline, "no leader among {alive:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let leader = find_leader(vec![0, 1, 2]).await;
    let write = |i: usize, image: String| async move {
        client(i)
            .create_attestation(pb::CreateAttestationRequest {
                image,
                checks: [("tests".into(), "passed".into())].into(),
            })
            .await
            .map(|r| r.into_inner().log_index)
    };
    write(leader, "before".into()).await.unwrap();
    procs[leader].as_mut().unwrap().kill9();
    let survivors: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let new_leader = find_leader(survivors.clone()).await;
    assert_ne!(new_leader, leader);
    let idx = write(survivors[0], "after".into()).await.unwrap();
    // Restart the killed node from its data directory.
    procs[leader] = Some(
        Proc::spawn(
            &["coordinator", "--config", config_paths[leader].to_str().unwrap()],
            &dir.join("restarted.log"),
        )
        .unwrap(),
    );
    let deadline = std::time::Instant::now() + T;
    loop {
        if let Some(s) = leader_of(leader).await
            && s.applied_index >= idx
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "restarted node did not catch up to {idx}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let atts = client(leader)
        .list_attestations(pb::ListAttestationsRequest { image: "after".into() })
        .await
        .unwrap();
    assert_eq!(
        atts.into_inner().attestations.len(),
        1,
        "the restarted node serves the write made while it was dead"
    );
    drop(procs);
    drop(c);
}
