//! The replicated state stays bounded: after thousands of operations, each
//! acting with a release that carries a 1 MiB migration bundle, the
//! snapshot a new node installs is sized by the retention policy and the
//! releases, not by how many operations ever ran.

use std::collections::BTreeMap;
use std::time::Duration;

use cutover_coordinator::orchestrator;
use cutover_coordinator::raft::Proposal;
use cutover_coordinator::state::{AuditDraft, Command};
use cutover_shared::domain::{
    ClusterRef, Operation, OperationKind, TaskRecord, TaskResult, TaskSpec, TaskState, now_unix_ms,
};
use cutover_shared::operation::{MigrateSpec, OperationSpec};
use cutover_shared::proto as pb;
use cutover_shared::release::{Bundle, Release};
use cutover_shared::task::{AppRef, MigrateAction, MigrateParams, TaskParams, spec_digest};
use cutover_tests::{TestCluster, sample_app_spec};

const T: Duration = Duration::from_secs(60);
const RELEASES: usize = 20;
const OPERATIONS: usize = 2000;
const KEEP: usize = 100;

fn audit(action: &str) -> AuditDraft {
    AuditDraft {
        at_unix_ms: now_unix_ms(),
        actor: "operator/test".into(),
        action: action.into(),
        parameters: "{}".into(),
        outcome: "ok".into(),
    }
}

/// Release `i`: one migration whose SQL fills the 1 MiB bundle limit.
fn bundle(i: usize) -> Bundle {
    let mut sql = format!("create table t{i} (x int);\n");
    while sql.len() < 1024 * 1024 - 4096 {
        sql.push_str("-- padding to make this release's migration bundle one mebibyte\n");
    }
    Bundle::parse(vec![(format!("{}_t{i}.up.sql", i + 1), sql.into_bytes())]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshots_stay_bounded_by_retention_and_a_new_node_installs_one() {
    let regions = [("us-east", "us-east-1")];
    let mut c = TestCluster::builder()
        .nodes(3)
        .spare_nodes(1)
        .regions(&regions)
        .configure(|cfg| {
            cfg.raft.snapshot_every = 1000;
            // Megabyte entries in a debug build on two cores can hold a
            // follower's append past the harness's 600 ms election timeout;
            // this test is about snapshot size, not failover.
            cfg.raft.election_timeout_min_ms = 4500;
            cfg.raft.election_timeout_max_ms = 6000;
            cfg.raft.keep_after_snapshot = 50;
            cfg.retention.operations = KEEP;
            cfg.retention.audit_events = KEEP;
        })
        .start()
        .await
        .unwrap();
    let leader = c.wait_leader(T).await.unwrap();
    let retention = c.configs[leader].retention.clone();
    let cons = c.node(leader).consensus().clone();
    let propose = |cmd: Command| {
        let cons = cons.clone();
        async move {
            let r = cons.propose(Proposal::Command(cmd)).await.unwrap();
            assert_eq!(r.error, None);
        }
    };
    let spec = sample_app_spec("shop", &regions);
    let target = ClusterRef::new("us-east", "us-east-1").unwrap();
    propose(Command::PutApp {
        spec: spec.clone(),
        audit: audit("ApplyApp"),
    })
    .await;
    let mut digests = Vec::new();
    for i in 0..RELEASES {
        let b = bundle(i);
        digests.push(b.digest());
        propose(Command::CreateRelease {
            release: Release::new("shop", &format!("shop:v{i}"), &b, "operator/test", now_unix_ms()),
            bundle: b,
            audit: audit("CreateRelease"),
        })
        .await;
    }
    let app = AppRef {
        app: "shop".into(),
        spec_digest: spec_digest(&spec),
    };
    let mut sizes = BTreeMap::new();
    for n in 0..OPERATIONS {
        // A finished migration of release n % 20: what a cutover leaves
        // behind, one committed entry per operation.
        let id = format!("op-{n:05}");
        let now = now_unix_ms();
        let (kind, params) = TaskParams::DbMigrate(MigrateParams {
            app: app.clone(),
            action: MigrateAction::Up,
            image: format!("shop:v{}", n % RELEASES),
            bundle_digest: digests[n % RELEASES].clone(),
            target: None,
            dry_run: false,
            compensate: false,
        })
        .to_wire();
        let task_id = format!("{id}-1");
        let op = Operation {
            id: id.clone(),
            kind: OperationKind::Migrate,
            app: Some("shop".into()),
            targets: vec![target.clone()],
            spec: OperationSpec {
                image: Some(format!("shop:v{}", n % RELEASES)),
                migrate: Some(MigrateSpec {
                    action: MigrateAction::Up,
                    target: None,
                    dry_run: false,
                }),
                ..OperationSpec::default()
            },
            state: TaskState::Succeeded,
            created_by: "operator/test".into(),
            created_at_unix_ms: now,
            updated_at_unix_ms: now,
            tasks: vec![TaskRecord {
                spec: TaskSpec {
                    task_id: task_id.clone(),
                    operation_id: id.clone(),
                    kind,
                    params,
                    target: target.clone(),
                },
                created_at_unix_ms: now,
                state: TaskState::Succeeded,
                progress: vec![],
                result: Some(TaskResult {
                    task_id,
                    success: true,
                    message: "up 1; now at version 1".into(),
                    outputs: BTreeMap::from([("applied".to_owned(), "1".to_owned())]),
                    replayed: false,
                    finished_at_unix_ms: now,
                }),
                dispatch_count: 1,
            }],
            summary: "done".into(),
            control: Default::default(),
            spec_digest: None,
            bundle_digest: None,
        };
        propose(Command::CreateOperation {
            operation: op,
            audit: audit("Migrate"),
            fix_inputs: true,
        })
        .await;
        if n + 1 == OPERATIONS / 2 || n + 1 == OPERATIONS {
            let applied = orchestrator::compact(&cons, &retention)
                .await
                .expect("a compaction was due and committed");
            let deadline = std::time::Instant::now() + T;
            // A snapshot of everything applied so far. openraft ignores a
            // trigger while it is building one already, so ask until the
            // stored snapshot covers `applied`.
            let size = loop {
                cons.snapshot_now().await.unwrap();
                match cons.snapshot_size() {
                    Some((index, size)) if index >= applied => break size,
                    _ if std::time::Instant::now() > deadline => panic!("no snapshot at {applied}"),
                    _ => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            };
            let kept = cons.read(|s| s.operations.len());
            println!("after {} operations: {kept} kept, snapshot {size} bytes", n + 1);
            sizes.insert(n + 1, (kept, size));
        }
    }
    let (kept_half, half) = sizes[&(OPERATIONS / 2)];
    let (kept_all, all) = sizes[&OPERATIONS];
    assert_eq!(kept_half, KEEP, "retention keeps {KEEP} finished operations");
    assert_eq!(kept_all, KEEP);
    // Twice the operations, the same snapshot (within 2%: ids grow by no
    // digit here, timestamps may).
    assert!(
        all <= half + half / 50,
        "snapshot grew with the operation count: {half} bytes after {}, {all} after {OPERATIONS}",
        OPERATIONS / 2
    );
    // The releases' bundles are stored once each, not once per operation.
    let floor = RELEASES * 1024 * 1024 * 9 / 10;
    assert!(all >= floor && all < floor * 2, "snapshot of {all} bytes");
    // A new node can only catch up by installing that snapshot (the log
    // behind it is purged), streamed in chunks.
    c.start_node(3).await.unwrap();
    let addr = c.configs[3].listen.clone();
    c.operator(leader)
        .add_node(pb::AddNodeRequest {
            node_id: 4,
            address: addr,
        })
        .await
        .unwrap();
    c.wait_state(3, T, "the new node has the retained state", |s| {
        s.operations.len() == KEEP && s.releases.get("shop").is_some_and(|r| r.len() == RELEASES)
    })
    .await
    .unwrap();
    // The installed snapshot is stored (the metrics may lag the state).
    let (index, size) = c
        .node(3)
        .consensus()
        .snapshot_size()
        .expect("the new node installed a snapshot");
    assert!(index > 0);
    println!("new node installed a snapshot at index {index} ({size} bytes)");
    let newest = c.node(3).consensus().read(|s| s.operations.keys().max().cloned());
    assert_eq!(newest.as_deref(), Some(format!("op-{:05}", OPERATIONS - 1).as_str()));
    c.shutdown().await;
}

/// Audit events that retention moves out of the replicated state are not
/// lost: each node appends them to its hash-chained audit file, and
/// `ListAuditEvents` with `since_unix_ms` (`cutover audit --since`) reads
/// them back, newest first, after the ones still in the state.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compacted_audit_events_read_back_with_since() {
    let c = TestCluster::builder()
        .nodes(3)
        .configure(|cfg| cfg.retention.audit_events = 5)
        .start()
        .await
        .unwrap();
    let leader = c.wait_leader(T).await.unwrap();
    let retention = c.configs[leader].retention.clone();
    let cons = c.node(leader).consensus().clone();
    let start = now_unix_ms();
    for i in 0..20 {
        let mut a = audit("Test");
        a.parameters = format!("{{\"i\":{i}}}");
        let r = cons.propose(Proposal::Command(Command::Audit(a))).await.unwrap();
        assert_eq!(r.error, None);
    }
    orchestrator::compact(&cons, &retention).await.expect("compaction due");
    assert_eq!(cons.read(|s| s.audit.len()), 5);
    // Any node answers from its own file: ask a follower.
    let follower = (leader + 1) % 3;
    c.wait_state(follower, T, "follower compacted", |s| s.audit.len() == 5)
        .await
        .unwrap();
    let list = |since: i64, limit: u32| {
        let mut client = c.operator(follower);
        async move {
            client
                .list_audit_events(pb::ListAuditEventsRequest {
                    limit,
                    since_unix_ms: since,
                })
                .await
                .unwrap()
                .into_inner()
                .events
        }
    };
    assert_eq!(list(0, 100).await.len(), 5, "without since: the state's events");
    let all = list(start, 100).await;
    let seqs: Vec<u64> = all.iter().map(|e| e.sequence).collect();
    assert_eq!(seqs.len(), 20, "{seqs:?}");
    assert!(
        seqs.windows(2).all(|w| w[0] == w[1] + 1),
        "newest first, no gaps: {seqs:?}"
    );
    assert_eq!(list(start, 7).await.len(), 7, "the limit holds across both");
    // The file is a valid chain on every node, once each has applied the
    // compaction and its audit thread has written it.
    for i in 0..3 {
        c.wait_state(i, T, "compacted", |s| s.audit.len() == 5).await.unwrap();
        c.node(i).consensus().audit_flushed().await.unwrap();
        let lines = cutover_coordinator::audit_log::read(&c.configs[i].data_dir.join("audit.jsonl")).unwrap();
        assert_eq!(lines.len(), 15, "node {i}");
    }
    c.shutdown().await;
}
