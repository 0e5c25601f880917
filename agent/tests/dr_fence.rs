//! A failover's fence and its compensation against a real PostgreSQL
//! server (started by the test harness; a test that cannot start one
//! fails): the compensation puts the fence back where the failover found
//! it.

use std::sync::Arc;

use cutover_agent::app_tasks::AppRuntime;
use cutover_agent::backup::task::BackupRuntime;
use cutover_agent::dr::DrRuntime;
use cutover_agent::drivers::DriverContext;
use cutover_devkit::postgres::TestPostgres;
use cutover_devkit::writer::database;
use cutover_shared::domain::{ClusterRef, TaskResult, TaskSpec};
use cutover_shared::dr::DbRole;
use cutover_shared::task::{AppRef, FailoverAction, FailoverParams, TaskParams};

/// A `db.failover` task for `shop` of `epoch`.
fn task(id: &str, action: FailoverAction, epoch: u64, compensate: bool) -> TaskSpec {
    let (kind, params) = TaskParams::DbFailover(FailoverParams {
        app: AppRef {
            app: "shop".into(),
            spec_digest: String::new(),
        },
        action,
        epoch,
        wait_for_lsn: None,
        source: None,
        compensate,
    })
    .to_wire();
    TaskSpec {
        task_id: id.into(),
        operation_id: format!("op-{epoch}"),
        kind,
        params,
        target: ClusterRef::new("us-east", "c1").unwrap(),
    }
}

async fn run(dr: &DrRuntime, t: TaskSpec) -> TaskResult {
    let r = dr.execute(&t, &|_| {}).await;
    assert!(r.success, "{} failed: {}", t.task_id, r.message);
    r
}

fn read_only(pg: &TestPostgres) -> String {
    pg.psql("shop", "show default_transaction_read_only").unwrap()
}

/// An operator fenced the primary (read-only, by hand) before a failover
/// that then failed before promoting anything: the failover's fence finds
/// it fenced, and its compensation leaves it so, saying why; a re-sent
/// fence does not change what was found. A primary the failover found
/// writable, fenced twice (a re-sent task), is writable again after the
/// compensation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_failover_puts_the_fence_back_where_it_found_it() {
    let pg = TestPostgres::start().unwrap();
    let url = pg.create_database("shop").unwrap();
    pg.psql("shop", "create table seq (n bigint primary key)").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url_file = dir.path().join("primary-url");
    std::fs::write(&url_file, url).unwrap();
    let dbs = [database("shop", &url_file, DbRole::Primary, None)];
    let cluster = ClusterRef::new("us-east", "c1").unwrap();
    let apps = Arc::new(AppRuntime::new(DriverContext {
        data_dir: dir.path().to_owned(),
        cluster: cluster.clone(),
        policy: Default::default(),
    }));
    let backups = Arc::new(BackupRuntime::new(&dbs, dir.path(), cluster, None));
    let dr = DrRuntime::new(&dbs, dir.path(), apps, backups);

    // Found writable: fenced (twice, as a re-sent task), then unfenced.
    run(&dr, task("fence-1", FailoverAction::Fence, 1, false)).await;
    assert_eq!(read_only(&pg), "on");
    run(&dr, task("fence-1", FailoverAction::Fence, 1, false)).await;
    let r = run(&dr, task("unfence-1", FailoverAction::Unfence, 1, true)).await;
    assert!(r.message.contains("takes writes again"), "{}", r.message);
    assert_eq!(read_only(&pg), "off");
    pg.psql("shop", "insert into seq values (1)").unwrap();

    // An operator's fence, then a failover (epoch 2) that fails after its
    // fence: the compensation leaves the server read-only.
    pg.psql("shop", "alter system set default_transaction_read_only = on")
        .unwrap();
    pg.psql("shop", "select pg_reload_conf()").unwrap();
    // Reloaded by the server in its own time: polled.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while read_only(&pg) != "on" {
        assert!(std::time::Instant::now() < deadline, "the operator's fence never took");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    run(&dr, task("fence-2", FailoverAction::Fence, 2, false)).await;
    run(&dr, task("fence-2", FailoverAction::Fence, 2, false)).await;
    let r = run(&dr, task("unfence-2", FailoverAction::Unfence, 2, true)).await;
    assert!(
        r.message.contains("stays read-only") && r.message.contains("already was"),
        "{}",
        r.message
    );
    assert_eq!(read_only(&pg), "on");
    let e = pg.psql("shop", "insert into seq values (2)").unwrap_err().to_string();
    assert!(e.contains("read-only transaction"), "{e}");
}
