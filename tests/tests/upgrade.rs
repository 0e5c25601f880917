//! Upgrades: a data directory written by an earlier release opens with this
//! one, and what it holds reads back unchanged. The fixture
//! (`tests/fixtures/landed-main/`, see its README) was written by the landed
//! `main` at `cf32b6f`: JSON-encoded log entries and snapshot, tasks with the
//! app definition and migration bundle inline, switches without named
//! colors.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use cutover_coordinator::raft::Proposal;
use cutover_coordinator::state::{AuditDraft, Command};
use cutover_shared::domain::{Operation, TaskState};
use cutover_tests::TestCluster;

const T: Duration = Duration::from_secs(20);

fn fixture() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/landed-main"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_from_the_landed_main_opens_and_reads_back_unchanged() {
    let want: BTreeMap<String, Operation> =
        serde_json::from_slice(&std::fs::read(fixture().join("operations.json")).unwrap()).unwrap();
    assert_eq!(want.len(), 6, "the fixture holds six operations");
    let mut c = TestCluster::builder()
        .nodes(1)
        .regions(&[("us-east", "us-east-1"), ("eu-west", "eu-west-1")])
        .prepare()
        .await
        .unwrap();
    let dir = c.configs[0].data_dir.clone();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture().join("raft.redb"), dir.join("raft.redb")).unwrap();
    c.start_node(0).await.unwrap();
    c.wait_leader(T).await.unwrap();
    c.wait_state(0, T, "the fixture's operations applied", |s| s.operations.len() == 6)
        .await
        .unwrap();
    let check = |c: &TestCluster| {
        let (got, apps, releases, audit) = c.node(0).consensus().read(|s| {
            (
                s.operations
                    .iter()
                    .map(|(k, o)| (k.clone(), (**o).clone()))
                    .collect::<BTreeMap<_, _>>(),
                s.apps.keys().cloned().collect::<Vec<_>>(),
                s.releases.get("shop").map_or(0, |r| r.len()),
                s.audit.len(),
            )
        });
        assert_eq!(got, want, "operations read back unchanged");
        assert!(got.values().all(|o| o.state == TaskState::Succeeded));
        assert_eq!(apps, ["shop"]);
        assert_eq!(releases, 1);
        assert!(audit >= 9, "{audit} audit events");
    };
    check(&c);
    // The upgraded node keeps working: it commits, snapshots in its own
    // encoding, and restarts from that.
    let r = c
        .node(0)
        .consensus()
        .propose(Proposal::Command(Command::Audit(AuditDraft {
            at_unix_ms: 1,
            actor: "operator/test".into(),
            action: "Upgraded".into(),
            parameters: "{}".into(),
            outcome: "ok".into(),
        })))
        .await
        .unwrap();
    assert_eq!(r.error, None);
    c.node(0).consensus().snapshot_now().await.unwrap();
    c.stop_node(0).await;
    c.start_node(0).await.unwrap();
    c.wait_leader(T).await.unwrap();
    c.wait_state(0, T, "state after the restart", |s| {
        s.audit.iter().any(|e| e.action == "Upgraded")
    })
    .await
    .unwrap();
    check(&c);
    c.shutdown().await;
}
