//! Agents: registration, liveness transitions, reconnection when their
//! coordinator dies, and task deduplication across restarts.

use std::time::{Duration, Instant};

use cutover_shared::config::DEFAULT_AGENT_HEARTBEAT_MS;
use cutover_shared::domain::{AgentState, TaskState};
use cutover_shared::proto as pb;
use cutover_tests::TestCluster;

const T: Duration = Duration::from_secs(15);
const REGIONS: &[(&str, &str)] = &[("us-east", "us-east-1"), ("eu-west", "eu-west-1")];

fn agent_state(s: &cutover_coordinator::state::State, key: &str) -> Option<AgentState> {
    s.agents.get(key).map(|a| a.state)
}

/// Three coordinators at the product's default heartbeat interval, and the
/// leader's index.
async fn cluster_with_default_heartbeat() -> (TestCluster, usize) {
    let c = TestCluster::builder()
        .nodes(3)
        .regions(REGIONS)
        .configure(|cfg| cfg.agent_heartbeat_interval_ms = DEFAULT_AGENT_HEARTBEAT_MS)
        .start()
        .await
        .unwrap();
    let leader = c.wait_leader(T).await.unwrap();
    (c, leader)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_up_down_within_three_intervals_and_up_again() {
    // The product's default interval: the test clusters' 200 ms leaves too
    // little room for a commit on a loaded 2-core machine to say anything
    // about the 3-interval promise users get.
    let (mut c, leader) = cluster_with_default_heartbeat().await;
    c.start_agent(0).unwrap();
    c.start_agent(1).unwrap();
    c.wait_state(leader, T, "both agents up", |s| {
        agent_state(s, "us-east/us-east-1") == Some(AgentState::Up)
            && agent_state(s, "eu-west/eu-west-1") == Some(AgentState::Up)
    })
    .await
    .unwrap();
    let listed = c
        .operator(leader)
        .list_agents(pb::ListAgentsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.agents.len(), 2);
    assert!(
        listed
            .agents
            .iter()
            .all(|a| a.state == pb::AgentState::Up as i32 && a.task_kinds.contains(&"echo".to_string()))
    );
    assert!(listed.next_page_token.is_empty(), "one page holds them all");
    // Paged: one agent a page, by region/cluster, the token leading on.
    let mut op = c.operator(leader);
    let first = op
        .list_agents(pb::ListAgentsRequest {
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let cluster_of = |a: &pb::Agent| a.cluster.clone().map(|c| format!("{}/{}", c.region, c.cluster));
    assert_eq!(
        first.agents.iter().map(cluster_of).collect::<Vec<_>>(),
        [Some("eu-west/eu-west-1".into())]
    );
    assert!(!first.next_page_token.is_empty());
    let second = op
        .list_agents(pb::ListAgentsRequest {
            page_size: 1,
            page_token: first.next_page_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        second.agents.iter().map(cluster_of).collect::<Vec<_>>(),
        [Some("us-east/us-east-1".into())]
    );
    assert!(second.next_page_token.is_empty(), "the last page says so");
    let bad = op
        .list_agents(pb::ListAgentsRequest {
            page_size: 1,
            page_token: "../etc".into(),
        })
        .await
        .expect_err("a token the service never gave out is refused");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    // GetStatus pages every cluster's state the same way; an app's status
    // is one page, and paging it is refused.
    let status = |page_size, page_token: &str, app: &str| pb::GetStatusRequest {
        app: app.into(),
        page_size,
        page_token: page_token.into(),
    };
    let status_of = |s: &pb::ClusterStatus| {
        let c = s.cluster.clone().unwrap_or_default();
        (format!("{}/{}", c.region, c.cluster), s.agent_state)
    };
    let up = pb::AgentState::Up as i32;
    let all = op.get_status(status(0, "", "")).await.unwrap().into_inner();
    assert_eq!(
        all.clusters.iter().map(status_of).collect::<Vec<_>>(),
        [
            ("eu-west/eu-west-1".to_string(), up),
            ("us-east/us-east-1".to_string(), up)
        ]
    );
    assert!(all.next_page_token.is_empty(), "one page holds them all");
    let first = op.get_status(status(1, "", "")).await.unwrap().into_inner();
    assert_eq!(
        first.clusters.iter().map(status_of).collect::<Vec<_>>(),
        [("eu-west/eu-west-1".to_string(), up)]
    );
    let second = op
        .get_status(status(1, &first.next_page_token, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        second.clusters.iter().map(status_of).collect::<Vec<_>>(),
        [("us-east/us-east-1".to_string(), up)]
    );
    assert!(second.next_page_token.is_empty(), "the last page says so");
    for (req, why) in [
        (status(1, "../etc", ""), "a token the service never gave out"),
        (status(1, "", "shop"), "paging an app's status"),
    ] {
        let e = op.get_status(req).await.expect_err(why);
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{why}: {e:?}");
    }

    let died = Instant::now();
    c.stop_agent(0).await;
    c.wait_state(leader, T, "us-east down", |s| {
        agent_state(s, "us-east/us-east-1") == Some(AgentState::Down)
    })
    .await
    .unwrap();
    let took = died.elapsed();
    assert!(
        took < Duration::from_millis(3 * DEFAULT_AGENT_HEARTBEAT_MS),
        "marked down after {took:?}, more than 3 heartbeat intervals of {DEFAULT_AGENT_HEARTBEAT_MS} ms"
    );
    // The other agent stayed up.
    assert_eq!(
        c.node(leader).consensus().read(|s| agent_state(s, "eu-west/eu-west-1")),
        Some(AgentState::Up)
    );
    c.start_agent(0).unwrap();
    c.wait_state(leader, T, "us-east up again", |s| {
        agent_state(s, "us-east/us-east-1") == Some(AgentState::Up)
    })
    .await
    .unwrap();
    c.shutdown().await;
}

async fn run_echo(c: &TestCluster, node: usize, region: &str, cluster: &str, params: &[(&str, &str)]) -> String {
    let r = c
        .operator(node)
        .run_task(pb::RunTaskRequest {
            target: Some(pb::ClusterRef {
                region: region.into(),
                cluster: cluster.into(),
            }),
            kind: "echo".into(),
            params: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        })
        .await
        .unwrap()
        .into_inner();
    r.operation_id
}

/// Polls `done` until it holds, for at most `T`: what a node keeps in
/// memory alone (its sessions) has no replicated state to wait on.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !done() {
        assert!(Instant::now() < deadline, "not within {T:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A 3-node cluster with the us-east agent registered, and its leader.
async fn cluster_with_us_east_agent() -> (TestCluster, usize) {
    let mut c = TestCluster::builder().nodes(3).regions(REGIONS).start().await.unwrap();
    let leader = c.wait_leader(T).await.unwrap();
    c.start_agent(0).unwrap();
    c.wait_state(leader, T, "agent up", |s| {
        agent_state(s, "us-east/us-east-1") == Some(AgentState::Up)
    })
    .await
    .unwrap();
    (c, leader)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_reconnects_by_itself_when_its_coordinator_dies() {
    let (mut c, leader) = cluster_with_us_east_agent().await;
    // Stop the node the agent streams to (any node serves agents; it lists
    // the stream once it has applied the registration).
    let mut held = None;
    until("a node lists the agent's stream", || {
        held = (0..3).find(|&i| c.node(i).connected_agents() == 1);
        held.is_some()
    })
    .await;
    let held = held.unwrap();
    c.stop_node(held).await;
    let new = if held == leader {
        c.wait_leader(T).await.unwrap()
    } else {
        leader
    };
    // The agent finds the new leader on its own and runs work from it.
    let op = run_echo(&c, new, "us-east", "us-east-1", &[("message", "still here")]).await;
    c.wait_state(new, T, "echo on the new leader", |s| {
        s.operations[&op].state == TaskState::Succeeded
    })
    .await
    .unwrap();
    let result = c
        .node(new)
        .consensus()
        .read(|s| s.operations[&op].tasks[0].result.clone().unwrap());
    assert_eq!(result.message, "still here");
    assert!(!result.replayed);
    c.shutdown().await;
}

/// An agent that dials a follower is served there: registered, sent its
/// tasks, its results committed through the leader, its liveness relayed.
/// When the leader stops, the agent keeps its session (no re-registration)
/// and runs work from the next leader; when the agent stops, the leader
/// marks it down although it never held its stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_on_a_follower_is_served_and_keeps_its_session_across_a_leader_change() {
    let (mut c, leader) = cluster_with_default_heartbeat().await;
    let follower = (leader + 1) % 3;
    until("the follower serves agents", || c.node(follower).serves_agents()).await;
    let mut cfg = c.agent_config(0);
    cfg.coordinators = vec![c.configs[follower].listen.clone()];
    c.start_agent_with(0, cfg).unwrap();
    c.wait_state(leader, T, "agent up", |s| {
        agent_state(s, "us-east/us-east-1") == Some(AgentState::Up)
    })
    .await
    .unwrap();
    // The follower lists the session once it has applied the registration.
    until("the follower lists the agent's stream", || {
        c.node(follower).connected_agents() == 1
    })
    .await;
    assert_eq!(c.node(leader).connected_agents(), 0, "the leader does not hold it");
    let session = |c: &TestCluster, n: usize| c.node(n).consensus().read(|s| s.agents["us-east/us-east-1"].session);
    let registered = session(&c, leader);

    let op = run_echo(&c, leader, "us-east", "us-east-1", &[("message", "via a follower")]).await;
    c.wait_state(leader, T, "echo through the follower", |s| {
        s.operations[&op].state == TaskState::Succeeded
    })
    .await
    .unwrap();
    let message = c
        .node(leader)
        .consensus()
        .read(|s| s.operations[&op].tasks[0].result.clone().unwrap().message);
    assert_eq!(message, "via a follower");

    // Past several heartbeat intervals with only relays to go by, the
    // leader still has the agent up under the same registration.
    tokio::time::sleep(Duration::from_millis(3 * DEFAULT_AGENT_HEARTBEAT_MS)).await;
    assert_eq!(
        c.node(leader).consensus().read(|s| agent_state(s, "us-east/us-east-1")),
        Some(AgentState::Up),
        "relayed heartbeats keep the agent up"
    );

    c.stop_node(leader).await;
    let new = c.wait_leader(T).await.unwrap();
    let op = run_echo(&c, new, "us-east", "us-east-1", &[("message", "after the leader left")]).await;
    c.wait_state(new, T, "echo from the next leader", |s| {
        s.operations[&op].state == TaskState::Succeeded
    })
    .await
    .unwrap();
    assert_eq!(
        session(&c, new),
        registered,
        "the agent kept its session through the leader change"
    );
    assert_eq!(c.node(follower).connected_agents(), 1);

    let stopped = Instant::now();
    c.stop_agent(0).await;
    c.wait_state(new, T, "agent down", |s| {
        agent_state(s, "us-east/us-east-1") == Some(AgentState::Down)
    })
    .await
    .unwrap();
    let down_after = stopped.elapsed();
    assert!(
        down_after < Duration::from_millis(4 * DEFAULT_AGENT_HEARTBEAT_MS),
        "marked down {down_after:?} after the agent stopped"
    );
    c.shutdown().await;
}

/// The agent finishes a task while no coordinator can hear it, is restarted,
/// and the coordinators (restarted from disk) re-send the unfinished task:
/// the agent answers with its recorded result and does not run it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn task_resent_after_agent_restart_is_not_executed_twice() {
    let (mut c, leader) = cluster_with_us_east_agent().await;
    let op = run_echo(
        &c,
        leader,
        "us-east",
        "us-east-1",
        &[("message", "once"), ("delay_ms", "1500")],
    )
    .await;
    let task_id = format!("{op}-1");
    c.wait_state(leader, T, "task running", |s| {
        s.operations[&op].state == TaskState::Running
    })
    .await
    .unwrap();
    // Every coordinator goes away before the task can report.
    for i in 0..3 {
        c.stop_node(i).await;
    }
    let store = c.agents[0].as_ref().unwrap().store.clone();
    let deadline = Instant::now() + T;
    while store.result(&task_id).unwrap().is_none() {
        assert!(Instant::now() < deadline, "agent never finished the task");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(store);
    c.stop_agent(0).await;
    c.start_agent(0).unwrap();
    for i in 0..3 {
        c.start_node(i).await.unwrap();
    }
    let leader = c.wait_leader(T).await.unwrap();
    c.wait_state(leader, T, "task finished after restarts", |s| {
        s.operations[&op].state == TaskState::Succeeded
    })
    .await
    .unwrap();
    let (result, dispatches) = c.node(leader).consensus().read(|s| {
        (
            s.operations[&op].tasks[0].result.clone().unwrap(),
            s.operations[&op].tasks[0].dispatch_count,
        )
    });
    assert!(
        result.replayed,
        "the result came from the agent's record, not a second run"
    );
    assert_eq!(result.message, "once");
    assert!(
        dispatches >= 2,
        "the task was sent again after the restarts ({dispatches} dispatches)"
    );
    let store = c.agents[0].as_ref().unwrap().store.clone();
    assert_eq!(store.execution_count(&task_id).unwrap(), 1, "executed exactly once");
    c.shutdown().await;
}

/// Ad-hoc `RunTask` runs only diagnostic kinds. App and database tasks,
/// which the agent advertises, are refused with INVALID_ARGUMENT naming the
/// verb that does the job: with hand-made params they would skip the gates,
/// the one-operation-per-app lock and the release's pinned migrations.
/// Nothing is committed for a refused call.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_task_refuses_app_and_database_kinds() {
    let (c, leader) = cluster_with_us_east_agent().await;
    let advertised = c
        .node(leader)
        .consensus()
        .read(|s| s.agents["us-east/us-east-1"].task_kinds.clone());
    for (kind, verb) in [
        ("app.switch", "cutover switch"),
        ("app.deploy", "cutover deploy"),
        ("app.gates", "cutover deploy"),
        ("db.migrate", "cutover migrate"),
    ] {
        assert!(advertised.iter().any(|k| k == kind), "the agent advertises {kind}");
        let before = c.node(leader).consensus().read(|s| s.operations.len());
        let err = c
            .operator(leader)
            .run_task(pb::RunTaskRequest {
                target: Some(pb::ClusterRef {
                    region: "us-east".into(),
                    cluster: "us-east-1".into(),
                }),
                kind: kind.into(),
                params: [
                    ("app".to_owned(), "shop".to_owned()),
                    ("to".to_owned(), "green".to_owned()),
                ]
                .into_iter()
                .collect(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{kind}: {err}");
        assert!(err.message().contains(verb), "{kind}: {}", err.message());
        assert!(err.message().contains(kind), "{kind}: {}", err.message());
        assert_eq!(c.node(leader).consensus().read(|s| s.operations.len()), before);
    }
    // The diagnostic kinds still run.
    let op = run_echo(&c, leader, "us-east", "us-east-1", &[("message", "hi")]).await;
    c.wait_state(leader, T, "echo done", |s| {
        s.operations[&op].state == TaskState::Succeeded
    })
    .await
    .unwrap();
    c.shutdown().await;
}

/// `WatchOperation` sends the operation as it is, then its changes, and
/// ends once it finished: the last message is the finished record, as the
/// state holds it. (The watch notices a change by the
/// state's `Arc` for the operation being replaced, not by comparing whole
/// operations on every apply.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_streams_each_change_until_the_operation_ends() {
    let (c, leader) = cluster_with_us_east_agent().await;
    let id = run_echo(&c, leader, "us-east", "us-east-1", &[("delay_ms", "300")]).await;
    let mut stream = c
        .operator(leader)
        .watch_operation(pb::WatchOperationRequest {
            operation_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Some(m) = tokio::time::timeout(T, stream.message()).await.unwrap().unwrap() {
        seen.push(m.operation.unwrap());
    }
    let succeeded = pb::TaskState::Succeeded as i32;
    assert!(seen.len() >= 2, "{} messages: {seen:?}", seen.len());
    assert_ne!(seen[0].state, succeeded, "the first message is the running operation");
    let last = seen.last().unwrap();
    assert_eq!(last.state, succeeded, "{last:?}");
    let stored = c.node(leader).consensus().read(|s| (*s.operations[&id]).clone());
    assert_eq!(last.tasks.len(), stored.tasks.len());
    assert_eq!(last.summary, stored.summary);
    // An unknown operation is refused, not watched forever.
    let err = c
        .operator(leader)
        .watch_operation(pb::WatchOperationRequest {
            operation_id: "op-none".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
    c.shutdown().await;
}

/// A `WatchOperation` client that goes away releases its stream at once,
/// even while the operation it watched runs on unchanged (it used to hold a
/// task until the operation's next change).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_whose_client_went_away_is_released_while_the_operation_runs() {
    let (c, leader) = cluster_with_us_east_agent().await;
    let id = run_echo(&c, leader, "us-east", "us-east-1", &[("delay_ms", "60000")]).await;
    let mut client = c.operator(leader);
    let mut stream = client
        .watch_operation(pb::WatchOperationRequest { operation_id: id })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(
        !first.operation.unwrap().state.eq(&(pb::TaskState::Succeeded as i32)),
        "the echo still runs"
    );
    assert_eq!(c.node(leader).open_watches(), 1);
    drop(stream);
    drop(client);
    // Released within a second or so (the heartbeat and HTTP/2 reset take
    // a moment); before, only when the 60 s echo finished.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while c.node(leader).open_watches() != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the watch task outlived its client"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.shutdown().await;
}

/// An agent spoken by hand on the leader's real stream: region `i`'s
/// certificate, registered as `version` offering `task_kinds`. Returns the
/// sender of its messages (`buffer` deep) and the leader's answers.
async fn hand_spoken_agent(
    c: &TestCluster,
    leader: usize,
    i: usize,
    version: &str,
    task_kinds: &[&str],
    buffer: usize,
) -> (
    tokio::sync::mpsc::Sender<pb::ConnectRequest>,
    tonic::Streaming<pb::ConnectResponse>,
) {
    use cutover_shared::proto::agent_service_client::AgentServiceClient;
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::ConnectRequest>(buffer);
    let register = pb::connect_request::Message::Register(pb::Register {
        cluster: None,
        agent_version: version.into(),
        task_kinds: task_kinds.iter().map(|k| k.to_string()).collect(),
        traffic_apps: vec![],
    });
    tx.send(pb::ConnectRequest {
        message: Some(register),
    })
    .await
    .unwrap();
    let tls = c.pki.agents[i].2.clone();
    let mut client = AgentServiceClient::new(tls.channel(&c.configs[leader].listen, None).unwrap());
    let inbound = client
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, inbound)
}

/// Resident memory of this test process (the coordinators run in it).
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    statm.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 4096
}

/// An agent cannot flood the Raft log: reports for tasks it does not hold
/// are refused before any proposal, progress is coalesced to the latest per
/// task, nothing queues without bound, and the other agent's heartbeats stay
/// on time throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flooding_agent_cannot_grow_the_log_or_starve_other_agents() {
    use pb::connect_request::Message as Up;
    use pb::connect_response::Message as Down;

    let (mut c, leader) = cluster_with_default_heartbeat().await;
    c.start_agent(0).unwrap();
    c.wait_state(leader, T, "us-east up", |s| {
        agent_state(s, "us-east/us-east-1") == Some(AgentState::Up)
    })
    .await
    .unwrap();
    let us_east_session = c
        .node(leader)
        .consensus()
        .read(|s| s.agents["us-east/us-east-1"].session);

    // The flooder: eu-west's own certificate, speaking the protocol by hand.
    let (tx, mut inbound) = hand_spoken_agent(&c, leader, 1, "flood", &["echo"], 4096).await;
    let send = |m: Up| {
        let tx = tx.clone();
        async move { tx.send(pb::ConnectRequest { message: Some(m) }).await.unwrap() }
    };
    let mut seq = 0u64;
    // Sends a heartbeat and waits for its acknowledgement: every message
    // sent before it has then been read by the coordinator.
    let sync = async |seq: &mut u64, inbound: &mut tonic::Streaming<pb::ConnectResponse>| -> Option<String> {
        *seq += 1;
        send(Up::Heartbeat(pb::Heartbeat {
            sequence: *seq,
            sent_at_unix_ms: 0,
        }))
        .await;
        let mut task = None;
        loop {
            match inbound.message().await.unwrap().unwrap().message {
                Some(Down::HeartbeatAck(a)) if a.sequence == *seq => return task,
                Some(Down::Task(t)) => task = Some(t.task_id),
                _ => {}
            }
        }
    };
    sync(&mut seq, &mut inbound).await;
    c.wait_state(leader, T, "eu-west up", |s| {
        agent_state(s, "eu-west/eu-west-1") == Some(AgentState::Up)
    })
    .await
    .unwrap();
    // A real task for the flooder, which it never finishes.
    let op = run_echo(&c, leader, "eu-west", "eu-west-1", &[]).await;
    let task_id = loop {
        if let Some(t) = sync(&mut seq, &mut inbound).await {
            break t;
        }
    };
    let progress = |task: &str, i: u64| {
        Up::Progress(pb::TaskProgress {
            task_id: task.into(),
            message: format!("step {i}"),
            at_unix_ms: 1,
        })
    };
    let commit_index = || c.node(leader).consensus().status().commit_index;

    // 100,000 progress messages for a task that does not exist.
    let rss_before = rss_bytes();
    let before = commit_index();
    for i in 0..100_000u64 {
        send(progress("op-nonexistent-1", i)).await;
        if i % 5_000 == 0 {
            sync(&mut seq, &mut inbound).await;
        }
    }
    sync(&mut seq, &mut inbound).await;
    let grew = commit_index() - before;
    assert!(
        grew <= 5,
        "100,000 reports for an unknown task added {grew} log entries"
    );
    let rss_growth = rss_bytes().saturating_sub(rss_before);
    println!("100,000 reports for an unknown task: {grew} log entries, resident memory +{rss_growth} bytes");
    assert!(
        rss_growth < 64 << 20,
        "memory grew by {rss_growth} bytes while reading the flood"
    );

    // 20,000 for its own task: coalesced, a few entries, the latest kept.
    let before = commit_index();
    for i in 0..20_000u64 {
        send(progress(&task_id, i)).await;
        if i % 5_000 == 0 {
            sync(&mut seq, &mut inbound).await;
        }
    }
    sync(&mut seq, &mut inbound).await;
    c.wait_state(leader, T, "latest progress committed", |s| {
        s.operations[&op].tasks[0]
            .progress
            .last()
            .is_some_and(|p| p.message == "step 19999")
    })
    .await
    .unwrap();
    let grew = commit_index() - before;
    println!("20,000 progress reports for its task: {grew} log entries");
    assert!(grew < 200, "20,000 progress reports added {grew} log entries");

    // The other agent kept its session the whole time.
    let (state, session) = c.node(leader).consensus().read(|s| {
        let a = &s.agents["us-east/us-east-1"];
        (a.state, a.session)
    });
    assert_eq!((state, session), (AgentState::Up, us_east_session));
    drop(tx);
    c.shutdown().await;
}

/// A database report is dated by the leader's clock when it arrives, not
/// by the agent's: an agent whose clock is an hour behind must not make
/// its first "server unreachable" report an hour-old loss (automatic
/// failover counts the loss from it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_report_is_dated_by_the_leader_not_the_agents_clock() {
    use pb::connect_request::Message as Up;

    let c = TestCluster::builder().nodes(1).regions(REGIONS).start().await.unwrap();
    let leader = c.wait_leader(T).await.unwrap();
    let (tx, _inbound) = hand_spoken_agent(&c, leader, 1, "skewed", &[], 16).await;
    let send = |m: Up| {
        let tx = tx.clone();
        async move { tx.send(pb::ConnectRequest { message: Some(m) }).await.unwrap() }
    };
    let an_hour_ago = cutover_shared::clock::now_unix_ms() - 3_600_000;
    let sent_after = cutover_shared::clock::now_unix_ms();
    send(Up::DatabaseStatus(pb::DatabaseStatusReport {
        databases: vec![pb::DatabaseStatus {
            app: "shop".into(),
            driver: "postgres".into(),
            configured_role: pb::DatabaseRole::Primary as i32,
            error: "connection refused".into(),
            observed_at_unix_ms: an_hour_ago,
            observed_age_ms: 1_500,
            ..Default::default()
        }],
    }))
    .await;
    c.wait_state(leader, T, "the report applied", |s| {
        s.db_status
            .get("shop")
            .is_some_and(|m| m.contains_key("eu-west/eu-west-1"))
    })
    .await
    .unwrap();
    let d = c
        .node(leader)
        .consensus()
        .read(|s| s.db_status["shop"]["eu-west/eu-west-1"].clone());
    assert!(
        d.observed_at_unix_ms >= sent_after,
        "dated {} ms before it was sent",
        sent_after - d.observed_at_unix_ms
    );
    assert_eq!(d.unreachable_since_unix_ms, Some(d.observed_at_unix_ms));
    // How old the observation was when sent is kept: the data-loss window
    // counts from then.
    assert_eq!(d.observed_age_ms, 1_500);
    c.shutdown().await;
}
