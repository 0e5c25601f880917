//! Releases and migrations through real coordinators and agents: uploads
//! refused with the offending file named, `migrate` up / down / status
//! against a real PostgreSQL started by the harness, a cutover whose
//! migration fails moving no traffic (SQLite), rollbacks across a release's
//! migrations, and the connection string kept out of results and logs.

use std::path::Path;
use std::time::Duration;

use cutover_shared::app::AppSpec;
use cutover_shared::config::{AgentConfig, DatabaseConfig, DbDriver};
use cutover_shared::proto as pb;
use cutover_tests::postgres::TestPostgres;
use cutover_tests::{TestCluster, captured_logs, sample_app_spec, serving};

const T: Duration = Duration::from_secs(90);
const REGIONS: &[(&str, &str)] = &[("us-east", "us-east-1"), ("eu-west", "eu-west-1")];

fn files(list: &[(&str, &str)]) -> Vec<pb::MigrationFile> {
    list.iter()
        .map(|(n, s)| pb::MigrationFile {
            name: n.to_string(),
            content: s.as_bytes().to_vec(),
        })
        .collect()
}

/// A database config whose URL the agent reads from a file.
fn database(app: &str, driver: DbDriver, url: &str, dir: &Path, primary: bool) -> DatabaseConfig {
    // One file per database: agents read it at each task.
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let url_file = dir.join(format!(
        "{app}-db-url-{}",
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::write(&url_file, url).unwrap();
    DatabaseConfig {
        primary: Some(primary),
        ..DatabaseConfig::with_url_file(app, driver, url_file)
    }
}

/// A started cluster with one agent per region, each given `databases(i)`.
async fn cluster(
    regions: &[(&str, &str)],
    databases: impl Fn(usize, &Path) -> Vec<DatabaseConfig>,
) -> (TestCluster, usize) {
    // Install the capturing subscriber before the harness installs its
    // own: tests run in parallel, and the first global subscriber wins.
    captured_logs();
    let mut c = TestCluster::builder().nodes(3).regions(regions).start().await.unwrap();
    let leader = c.wait_leader(T).await.unwrap();
    for i in 0..regions.len() {
        let mut cfg: AgentConfig = c.agent_config(i);
        cfg.databases = databases(i, c.tmp.path());
        c.start_agent_with(i, cfg).unwrap();
    }
    c.wait_state(leader, T, "agents up", |s| s.agents.len() == regions.len())
        .await
        .unwrap();
    (c, leader)
}

async fn apply(c: &TestCluster, leader: usize, spec: &AppSpec) {
    c.operator(leader)
        .apply_app(pb::ApplyAppRequest {
            app: Some(spec.clone().into()),
        })
        .await
        .unwrap();
}

async fn finished(c: &TestCluster, leader: usize, id: &str) -> pb::Operation {
    c.wait_state(leader, T, &format!("{id} to finish"), |s| {
        s.operations[id].state.is_finished()
    })
    .await
    .unwrap();
    c.operator(leader)
        .get_operation(pb::GetOperationRequest {
            operation_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .operation
        .unwrap()
}

async fn migrate(
    c: &TestCluster,
    leader: usize,
    app: &str,
    region: &str,
    action: pb::MigrateAction,
    target: Option<i64>,
    dry_run: bool,
) -> pb::Operation {
    let id = c
        .operator(leader)
        .migrate(pb::MigrateRequest {
            app: app.into(),
            region: region.into(),
            action: action as i32,
            target,
            dry_run,
            image: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .operation_id;
    finished(c, leader, &id).await
}

/// `output` of the task on `region`.
fn out(op: &pb::Operation, region: &str, key: &str) -> String {
    let t = op
        .tasks
        .iter()
        .find(|t| t.task.as_ref().unwrap().target.as_ref().unwrap().region == region)
        .unwrap_or_else(|| panic!("no task in {region}: {op:?}"));
    let r = t.result.as_ref().unwrap();
    r.outputs.get(key).cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn releases_are_validated_at_upload() {
    let (c, leader) = cluster(&REGIONS[..1], |_, _| vec![]).await;
    apply(&c, leader, &sample_app_spec("shop", &REGIONS[..1])).await;
    let mut o = c.operator(leader);
    let create = |image: &str, list: Vec<pb::MigrationFile>| pb::CreateReleaseRequest {
        app: "shop".into(),
        image: image.into(),
        migrations: list,
    };
    let big = "x".repeat(cutover_shared::release::MAX_BUNDLE_BYTES as usize + 1);
    let cases: Vec<(Vec<pb::MigrationFile>, &str)> = vec![
        (files(&[("users.sql", "select 1;")]), "\"users.sql\""),
        (files(&[("../1_users.sql", "select 1;")]), "\"../1_users.sql\""),
        (
            files(&[("1_users.up.sql", "select 1;"), ("1_accounts.sql", "select 1;")]),
            "\"1_accounts.sql\"",
        ),
        (
            files(&[
                ("1_users.up.sql", "select 1;"),
                ("1_users.down.sql", "select 1;"),
                ("2_orders.up.sql", "select 1;"),
            ]),
            "\"2_orders.up.sql\"",
        ),
        (files(&[("1_big.sql", &big)]), "over the limit"),
    ];
    for (list, named) in cases {
        let e = o.create_release(create("shop:v2", list)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(named), "{} should name {named}", e.message());
    }
    // Refusals changed nothing.
    let list = o
        .list_releases(pb::ListReleasesRequest { app: "shop".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(list.releases.is_empty());
    let e = o
        .create_release(pb::CreateReleaseRequest {
            app: "nope".into(),
            image: "shop:v2".into(),
            migrations: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);

    let good = files(&[
        ("1_users.up.sql", "create table users (id int);"),
        ("1_users.down.sql", "drop table users;"),
    ]);
    let r = o
        .create_release(create("shop:v2", good.clone()))
        .await
        .unwrap()
        .into_inner()
        .release
        .unwrap();
    assert_eq!(r.newest_version, 1);
    assert!(r.reversible);
    assert_eq!(r.files.len(), 2);
    // The same upload again is a no-op; other migrations under the same
    // image are refused: releases are immutable.
    o.create_release(create("shop:v2", good)).await.unwrap();
    let e = o
        .create_release(create("shop:v2", files(&[("1_users.sql", "create table u (id int);")])))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("immutable"), "{}", e.message());
    let got = o
        .get_release(pb::GetReleaseRequest {
            app: "shop".into(),
            image: "shop:v2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.migrations.len(), 2);
    assert_eq!(got.migrations[0].name, "1_users.up.sql");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrate_up_down_status_against_postgres_keeps_the_url_secret() {
    let logs = captured_logs();
    let pg = TestPostgres::start().unwrap();
    let url = pg.create_database("shop").unwrap();
    let password = pg.password().to_owned();
    assert!(url.contains(&password));
    let db_url = url.clone();
    // us-east holds the primary; eu-west a replica of it.
    let (c, leader) = cluster(REGIONS, move |i, dir| {
        vec![database("shop", DbDriver::Postgres, &db_url, dir, i == 0)]
    })
    .await;
    apply(&c, leader, &sample_app_spec("shop", REGIONS)).await;
    c.operator(leader)
        .create_release(pb::CreateReleaseRequest {
            app: "shop".into(),
            image: "shop:v2".into(),
            migrations: files(&[
                (
                    "1_users.up.sql",
                    "create table users (id bigint primary key, name text not null);",
                ),
                ("1_users.down.sql", "drop table users;"),
                (
                    "2_orders.up.sql",
                    "create table orders (id bigint primary key, user_id bigint references users(id));",
                ),
                ("2_orders.down.sql", "drop table orders;"),
                (
                    "3_orders_by_user.up.sql",
                    "create index orders_by_user on orders (user_id);",
                ),
                ("3_orders_by_user.down.sql", "drop index orders_by_user;"),
            ]),
        })
        .await
        .unwrap();
    use pb::MigrateAction::{Down, Plan, Status, Up};

    let st = migrate(&c, leader, "shop", "", Status, None, false).await;
    assert_eq!(st.state, pb::TaskState::Succeeded as i32, "{}", st.summary);
    assert_eq!(out(&st, "us-east", "applied_version"), "0");
    assert_eq!(out(&st, "us-east", "pending"), "1,2,3");

    // Up and down refuse to run everywhere at once.
    let e = c
        .operator(leader)
        .migrate(pb::MigrateRequest {
            app: "shop".into(),
            action: Up as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    let up = migrate(&c, leader, "shop", "us-east", Up, None, false).await;
    assert_eq!(up.state, pb::TaskState::Succeeded as i32, "{}", up.summary);
    assert_eq!(out(&up, "us-east", "applied"), "1,2,3");
    assert_eq!(out(&up, "us-east", "to_version"), "3");
    assert!(!out(&up, "us-east", "backup_sha256").is_empty());
    assert_eq!(pg.psql("shop", "select count(*) from orders").unwrap(), "0");
    let st = migrate(&c, leader, "shop", "", Status, None, false).await;
    assert_eq!(out(&st, "us-east", "applied_version"), "3");
    assert_eq!(out(&st, "us-east", "pending"), "");
    // The replica reads the same database and reports, but never migrates.
    let replica = migrate(&c, leader, "shop", "eu-west", Down, Some(0), false).await;
    assert!(out(&replica, "eu-west", "skipped").contains("not the primary"));

    // A dry run shows the downs, statement by statement, and changes nothing.
    let plan = migrate(&c, leader, "shop", "us-east", Down, Some(1), true).await;
    let text = out(&plan, "us-east", "plan");
    assert!(
        text.contains("down 3") && text.contains("drop index orders_by_user"),
        "{text}"
    );
    assert!(text.contains("down 2") && !text.contains("down 1 "), "{text}");
    let st = migrate(&c, leader, "shop", "", Status, None, false).await;
    assert_eq!(out(&st, "us-east", "applied_version"), "3");

    let down = migrate(&c, leader, "shop", "us-east", Down, Some(1), false).await;
    assert_eq!(down.state, pb::TaskState::Succeeded as i32, "{}", down.summary);
    let st = migrate(&c, leader, "shop", "", Status, None, false).await;
    assert_eq!(out(&st, "us-east", "applied_version"), "1");
    assert_eq!(out(&st, "us-east", "pending"), "2,3");
    let plan = migrate(&c, leader, "shop", "us-east", Plan, None, false).await;
    assert!(out(&plan, "us-east", "plan").contains("up 2"), "{plan:?}");
    let up = migrate(&c, leader, "shop", "us-east", Up, None, false).await;
    assert_eq!(up.state, pb::TaskState::Succeeded as i32, "{}", up.summary);
    let st = migrate(&c, leader, "shop", "", Status, None, false).await;
    assert_eq!(out(&st, "us-east", "applied_version"), "3");

    // Drift: an applied migration's SQL changed in a later release.
    c.operator(leader)
        .create_release(pb::CreateReleaseRequest {
            app: "shop".into(),
            image: "shop:v3".into(),
            migrations: files(&[
                (
                    "1_users.up.sql",
                    "create table users (id bigint primary key, name text);",
                ),
                ("1_users.down.sql", "drop table users;"),
                (
                    "2_orders.up.sql",
                    "create table orders (id bigint primary key, user_id bigint references users(id));",
                ),
                ("2_orders.down.sql", "drop table orders;"),
                (
                    "3_orders_by_user.up.sql",
                    "create index orders_by_user on orders (user_id);",
                ),
                ("3_orders_by_user.down.sql", "drop index orders_by_user;"),
            ]),
        })
        .await
        .unwrap();
    let st = migrate(&c, leader, "shop", "", Status, None, false).await;
    assert_eq!(out(&st, "us-east", "drift"), "1");
    let refused = migrate(&c, leader, "shop", "us-east", Down, Some(0), false).await;
    assert_eq!(refused.state, pb::TaskState::Failed as i32);
    assert!(refused.summary.contains("[1]"), "{}", refused.summary);
    assert_eq!(pg.psql("shop", "select count(*) from orders").unwrap(), "0");

    // The connection string (and its password) appears nowhere: not in
    // operations, not in the audit trail, not in the logs.
    let mut o = c.operator(leader);
    let ops = o
        .list_operations(pb::ListOperationsRequest { limit: 1000 })
        .await
        .unwrap()
        .into_inner()
        .operations;
    let audit = o
        .list_audit_events(pb::ListAuditEventsRequest {
            limit: 1000,
            since_unix_ms: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let seen = format!("{ops:?}{audit:?}");
    assert!(
        !seen.contains(&password),
        "the password leaked into operations or audit"
    );
    assert!(!seen.contains(&url));
    c.shutdown().await;
    let logs = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(logs.contains("db.migrate"), "the test captured no agent logs");
    assert!(!logs.contains(&password), "the password leaked into the logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cutover_whose_migration_fails_moves_no_traffic_and_rollbacks_respect_the_schema() {
    let dbs = tempfile::tempdir().unwrap();
    let db_dir = dbs.path().to_owned();
    let (c, leader) = cluster(REGIONS, move |i, dir| {
        let url = format!("sqlite://{}?mode=rwc", db_dir.join(format!("shop-{i}.db")).display());
        vec![database("shop", DbDriver::Sqlite, &url, dir, true)]
    })
    .await;
    let mut spec = sample_app_spec("shop", REGIONS);
    spec.migration_checks = vec!["select count(*) = 0 from orders".into()];
    apply(&c, leader, &spec).await;
    let addrs: Vec<String> = spec
        .clusters
        .iter()
        .map(|c| c.local.as_ref().unwrap().listen.clone())
        .collect();
    let mut o = c.operator(leader);
    let deploy = |image: &str| pb::DeployRequest {
        app: "shop".into(),
        image: image.into(),
        ..Default::default()
    };
    let release = |image: &str, list: &[(&str, &str)]| pb::CreateReleaseRequest {
        app: "shop".into(),
        image: image.into(),
        migrations: files(list),
    };
    let id = o.deploy(deploy("sample:v1")).await.unwrap().into_inner().operation_id;
    assert_eq!(finished(&c, leader, &id).await.state, pb::TaskState::Succeeded as i32);

    // v2's second migration fails: every region's database is back where
    // it was, and no region switched.
    o.create_release(release(
        "sample:v2",
        &[
            ("1_orders.up.sql", "create table orders (id integer primary key);"),
            ("1_orders.down.sql", "drop table orders;"),
            ("2_broken.up.sql", "alter table no_such_table add column x int;"),
            ("2_broken.down.sql", "select 1;"),
        ],
    ))
    .await
    .unwrap();
    let id = o.deploy(deploy("sample:v2")).await.unwrap().into_inner().operation_id;
    let op = finished(&c, leader, &id).await;
    assert_eq!(op.state, pb::TaskState::Failed as i32);
    assert!(op.summary.contains("db.migrate"), "{}", op.summary);
    assert!(
        op.tasks.iter().all(|t| t.task.as_ref().unwrap().kind != "app.switch"),
        "a switch ran: {op:?}"
    );
    for a in &addrs {
        assert_eq!(serving(a).await, "version sample:v1");
    }
    let st = migrate(&c, leader, "shop", "", pb::MigrateAction::Status, None, false).await;
    for (region, _) in REGIONS {
        assert_eq!(out(&st, region, "applied_version"), "0", "{region}");
    }

    // v3's migrations are reversible: the cutover migrates, then switches;
    // a rollback switches back, then runs the downs.
    o.create_release(release(
        "sample:v3",
        &[
            ("1_orders.up.sql", "create table orders (id integer primary key);"),
            ("1_orders.down.sql", "drop table orders;"),
        ],
    ))
    .await
    .unwrap();
    let id = o.deploy(deploy("sample:v3")).await.unwrap().into_inner().operation_id;
    let op = finished(&c, leader, &id).await;
    assert_eq!(op.state, pb::TaskState::Succeeded as i32, "{}", op.summary);
    let deployed = format!("{op:?}");
    let kinds: Vec<&str> = op
        .tasks
        .iter()
        .map(|t| t.task.as_ref().unwrap().kind.as_str())
        .collect();
    let first_migrate = kinds.iter().position(|k| *k == "db.migrate").unwrap();
    let first_switch = kinds.iter().position(|k| *k == "app.switch").unwrap();
    assert!(first_migrate < first_switch, "{kinds:?}");
    for a in &addrs {
        assert_eq!(serving(a).await, "version sample:v3");
    }
    let id = o
        .rollback(pb::RollbackRequest {
            app: "shop".into(),
            region: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .operation_id;
    let op = finished(&c, leader, &id).await;
    assert_eq!(op.state, pb::TaskState::Succeeded as i32, "{}", op.summary);
    let kinds: Vec<&str> = op
        .tasks
        .iter()
        .map(|t| t.task.as_ref().unwrap().kind.as_str())
        .collect();
    assert_eq!(
        kinds,
        ["app.switch", "app.switch", "db.migrate", "db.migrate"],
        "{deployed}\n{op:?}"
    );
    for a in &addrs {
        assert_eq!(serving(a).await, "version sample:v1");
    }
    let st = migrate(&c, leader, "shop", "", pb::MigrateAction::Status, None, false).await;
    for (region, _) in REGIONS {
        assert_eq!(out(&st, region, "applied_version"), "0", "{region}");
    }

    // v4's migration is irreversible: rolling back across it is refused.
    o.create_release(release(
        "sample:v4",
        &[("1_orders.sql", "create table orders (id integer primary key);")],
    ))
    .await
    .unwrap();
    let id = o.deploy(deploy("sample:v4")).await.unwrap().into_inner().operation_id;
    assert_eq!(finished(&c, leader, &id).await.state, pb::TaskState::Succeeded as i32);
    let e = o
        .rollback(pb::RollbackRequest {
            app: "shop".into(),
            region: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("1_orders.sql"), "{}", e.message());
    for a in &addrs {
        assert_eq!(serving(a).await, "version sample:v4");
    }
    c.shutdown().await;
}
