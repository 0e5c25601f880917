//! Backups through real coordinators and agents (issue: backups to S3): a
//! real PostgreSQL and a real S3-protocol server (moto), both started here,
//! real TLS between the processes' parts.
//!
//! - `cutover backup create` uploads and catalogs; the entry names the
//!   object's version, size, checksum, schema version and row counts.
//! - Validation restores into a scratch database, runs the app's checks,
//!   compares row counts, records the verdict in the catalog, and drops
//!   the scratch database.
//! - Restore to scratch leaves a copy equal to the source (content
//!   checksums); restore onto the primary without confirm is refused and
//!   changes nothing.
//! - A corrupted object is named corrupt, never restored, and counted in
//!   an alertable metric.
//! - The store's credentials and the encryption key appear in no log,
//!   operation, audit event, catalog entry or metric.

use std::time::Duration;

use cutover_agent::backup::seal::BackupKey;
use cutover_agent::backup::store::ObjectStore;
use cutover_agent::migrate::{DbConfig, DbUrl, Driver, dump_checksum};
use cutover_shared::config::{BackupStoreConfig, DatabaseConfig, DbDriver};
use cutover_shared::proto as pb;
use cutover_tests::garage::TestGarage;
use cutover_tests::postgres::TestPostgres;
use cutover_tests::s3::TestS3;
use cutover_tests::{TestCluster, captured_logs, sample_app_spec};

const T: Duration = Duration::from_secs(90);
const REGION: &[(&str, &str)] = &[("us-east", "us-east-1")];

/// Everything one test needs: the servers, the cluster with one agent
/// whose config lists the database and the store, and the secrets.
struct Fixture {
    pg: TestPostgres,
    /// The object store's server (moto or Garage), stopped on drop.
    _store: Box<dyn std::any::Any>,
    c: TestCluster,
    leader: usize,
    store_cfg: BackupStoreConfig,
    source: DbConfig,
    secret_key: String,
    encryption_key: String,
}

/// Which database the agent backs up.
#[derive(Clone, Copy, PartialEq)]
enum Db {
    Postgres,
    Sqlite,
}

const SCHEMA: &str = "create table orders (id int primary key, item text not null); \
                      create table customers (id int primary key, name text); \
                      insert into customers values (1, 'ada'), (2, 'grace');";

/// The bucket the agent writes to.
#[derive(Clone, Copy, PartialEq)]
enum Bucket {
    Plain,
    Versioned,
    /// Object Lock with a default retention of one day (COMPLIANCE).
    Locked,
    /// Garage's bucket instead of moto's (no versions).
    Garage,
}

async fn fixture(versioned: bool) -> Fixture {
    fixture_on(versioned, Db::Postgres).await
}

async fn fixture_on(versioned: bool, engine: Db) -> Fixture {
    let bucket = if versioned { Bucket::Versioned } else { Bucket::Plain };
    fixture_with(bucket, engine, |_| {}).await
}

/// The fixture, with `tweak` applied to the agent's store config.
async fn fixture_with(bucket: Bucket, engine: Db, tweak: impl FnOnce(&mut BackupStoreConfig)) -> Fixture {
    captured_logs();
    cutover_shared::telemetry::metrics_handle();
    let pg = TestPostgres::start().unwrap();
    let (s3, garage) = if bucket == Bucket::Garage {
        (None, Some(TestGarage::start("backups").unwrap()))
    } else {
        (Some(TestS3::start().unwrap()), None)
    };
    if let Some(s3) = &s3 {
        match bucket {
            Bucket::Plain => s3.create_bucket("backups", false).unwrap(),
            Bucket::Versioned => s3.create_bucket("backups", true).unwrap(),
            Bucket::Locked => s3.create_locked_bucket("backups", 1).unwrap(),
            Bucket::Garage => unreachable!(),
        }
    }
    let mut c = TestCluster::builder().nodes(3).regions(REGION).start().await.unwrap();
    let leader = c.wait_leader(T).await.unwrap();
    let dir = c.tmp.path().to_owned();
    let (url, driver) = match engine {
        Db::Postgres => {
            let url = pg.create_database("shop").unwrap();
            pg.psql(
                "shop",
                &format!("{SCHEMA} insert into orders select g, md5(g::text) from generate_series(1, 5000) g;"),
            )
            .unwrap();
            (url, DbDriver::Postgres)
        }
        Db::Sqlite => {
            use sqlx::{ConnectOptions, Connection};
            let url = format!("sqlite://{}", dir.join("shop.db").display());
            let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(dir.join("shop.db"))
                .create_if_missing(true)
                .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                .connect()
                .await
                .unwrap();
            sqlx::raw_sql(SCHEMA).execute(&mut conn).await.unwrap();
            sqlx::raw_sql(
                "with recursive g(n) as (select 1 union all select n + 1 from g where n < 5000) \
                 insert into orders select n, hex(randomblob(16)) from g",
            )
            .execute(&mut conn)
            .await
            .unwrap();
            conn.close().await.unwrap();
            (url, DbDriver::Sqlite)
        }
    };
    let encryption_key = BackupKey::generate("k1").unwrap().to_hex();
    let (secret_key, mut store_cfg) = match (&s3, &garage) {
        (Some(s3), _) => {
            let secret = format!("s3cret-{}", std::process::id());
            let cfg = s3
                .backup_config("backups", "cutover/", &dir, &encryption_key, &secret)
                .unwrap();
            (secret, cfg)
        }
        (None, Some(g)) => (
            g.secret_key().to_owned(),
            g.backup_config("cutover/", &dir, &encryption_key).unwrap(),
        ),
        (None, None) => unreachable!(),
    };
    tweak(&mut store_cfg);
    let url_file = dir.join("shop-db-url");
    std::fs::write(&url_file, &url).unwrap();
    let mut cfg = c.agent_config(0);
    cfg.databases = vec![DatabaseConfig::with_url_file("shop", driver, url_file)];
    cfg.backup = Some(store_cfg.clone());
    c.start_agent_with(0, cfg).unwrap();
    c.wait_state(leader, T, "the agent up, offering db.backup", |s| {
        s.agents.values().any(|a| a.task_kinds.iter().any(|k| k == "db.backup"))
    })
    .await
    .unwrap();
    let mut spec = sample_app_spec("shop", REGION);
    spec.migration_checks = vec!["select count(*) = 2 from customers".into()];
    c.operator(leader)
        .apply_app(pb::ApplyAppRequest { app: Some(spec.into()) })
        .await
        .unwrap();
    let source_driver = match engine {
        Db::Postgres => Driver::Postgres,
        Db::Sqlite => Driver::Sqlite,
    };
    let source = DbConfig::new("shop", source_driver, DbUrl::new(url), dir.join("work"));
    Fixture {
        pg,
        _store: match (s3, garage) {
            (Some(s3), _) => Box::new(s3),
            (None, g) => Box::new(g),
        },
        c,
        leader,
        store_cfg,
        source,
        secret_key,
        encryption_key,
    }
}

impl Fixture {
    fn op(&self) -> pb::control_service_client::ControlServiceClient<tonic::transport::Channel> {
        self.c.operator(self.leader)
    }

    async fn finished(&self, id: &str) -> pb::Operation {
        self.c
            .wait_state(self.leader, T, &format!("{id} to finish"), |s| {
                s.operations[id].state.is_finished()
            })
            .await
            .unwrap();
        self.op()
            .get_operation(pb::GetOperationRequest {
                operation_id: id.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .operation
            .unwrap()
    }

    async fn create(&self) -> pb::Backup {
        let id = self
            .op()
            .create_backup(pb::CreateBackupRequest {
                app: "shop".into(),
                region: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .operation_id;
        let op = self.finished(&id).await;
        assert_eq!(op.state, pb::TaskState::Succeeded as i32, "{op:?}");
        let list = self.list().await;
        list.into_iter()
            .find(|b| b.operation_id == id)
            .expect("the finished backup is in the catalog")
    }

    async fn list(&self) -> Vec<pb::Backup> {
        self.op()
            .list_backups(pb::ListBackupsRequest {
                app: "shop".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .backups
    }

    async fn get(&self, id: &str) -> pb::Backup {
        self.op()
            .get_backup(pb::GetBackupRequest { id: id.into() })
            .await
            .unwrap()
            .into_inner()
            .backup
            .unwrap()
    }

    async fn validate(&self, id: &str) -> pb::Operation {
        let op = self
            .op()
            .validate_backup(pb::ValidateBackupRequest { id: id.into() })
            .await
            .unwrap()
            .into_inner()
            .operation_id;
        self.finished(&op).await
    }

    async fn restore_scratch(&self, id: &str) -> pb::Operation {
        self.restore(id, pb::RestoreTarget::Scratch).await
    }

    /// `cutover backup restore ID --to primary --confirm`, to its end.
    async fn restore_primary(&self, id: &str) -> pb::Operation {
        self.restore(id, pb::RestoreTarget::Primary).await
    }

    async fn restore(&self, id: &str, to: pb::RestoreTarget) -> pb::Operation {
        let op = self
            .op()
            .restore_backup(pb::RestoreBackupRequest {
                id: id.into(),
                to: to as i32,
                confirm: to == pb::RestoreTarget::Primary,
            })
            .await
            .unwrap()
            .into_inner()
            .operation_id;
        self.finished(&op).await
    }

    /// Database `name` on the source's server.
    fn database(&self, name: &str) -> DbConfig {
        DbConfig {
            url: cutover_agent::migrate::database_url(&self.source, name).unwrap(),
            ..self.source.clone()
        }
    }

    fn databases(&self) -> Vec<String> {
        self.pg
            .psql("postgres", "select datname from pg_database order by 1")
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

fn outputs(op: &pb::Operation) -> std::collections::HashMap<String, String> {
    op.tasks[0].result.as_ref().unwrap().outputs.clone()
}

/// Each step of `op`: its kind and what it did (`on` of a maintenance
/// step, `action` of a backup step), and whether it was a compensation.
fn steps(op: &pb::Operation) -> Vec<(String, String, bool)> {
    op.tasks
        .iter()
        .map(|t| {
            let task = t.task.as_ref().unwrap();
            let p = &task.params;
            let what = p.get("on").or_else(|| p.get("action")).cloned().unwrap_or_default();
            (
                task.kind.clone(),
                what,
                p.get("compensate").is_some_and(|c| c == "true"),
            )
        })
        .collect()
}

/// The steps of a restore onto the primary: maintenance, a safety backup,
/// the restore, and the end of maintenance (a compensation after a failure).
fn restore_primary_steps(compensated: bool) -> Vec<(String, String, bool)> {
    [
        ("app.maintenance", "true", false),
        ("db.backup", "create", false),
        ("db.backup", "restore-primary", false),
        ("app.maintenance", "false", compensated),
    ]
    .iter()
    .map(|(k, w, c)| (k.to_string(), w.to_string(), *c))
    .collect()
}

/// Restore onto the primary with confirm: the app goes into maintenance,
/// a safety backup of the data about to be replaced is taken and
/// cataloged, the backup (checked like a validation) takes the primary's
/// place in one step, the replaced data stays as a database of its own,
/// and the app takes traffic again. The audit names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_confirmed_restore_replaces_the_primary_after_a_safety_backup() {
    let f = fixture(true).await;
    let original = dump_checksum(&f.source).await.unwrap();
    let b = f.create().await;
    f.pg.psql(
        "shop",
        "delete from orders where id > 100; insert into customers values (3, 'linus'); \
         create table refunds (id int primary key);",
    )
    .unwrap();
    let changed = dump_checksum(&f.source).await.unwrap();
    assert_ne!(changed, original);

    let r = f.restore_primary(&b.id).await;
    assert_eq!(r.state, pb::TaskState::Succeeded as i32, "{r:?}");
    assert_eq!(steps(&r), restore_primary_steps(false));
    assert_eq!(
        dump_checksum(&f.source).await.unwrap(),
        original,
        "the primary does not hold the backup's data"
    );
    // What the restore replaced is kept, whole.
    let replaced = r.tasks[2].result.as_ref().unwrap().outputs["replaced"].clone();
    assert!(f.databases().contains(&replaced), "{replaced} is gone");
    let kept = f.database(&replaced);
    assert_eq!(dump_checksum(&kept).await.unwrap(), changed);
    // So is a safety backup of it, in the catalog beside the others.
    let safety = f
        .list()
        .await
        .into_iter()
        .find(|x| x.trigger == "safety")
        .expect("the safety backup is cataloged");
    assert_eq!(safety.operation_id, r.id);
    assert_eq!(safety.table_rows.get("public.orders"), Some(&100));
    assert_eq!(safety.table_rows.get("public.customers"), Some(&3));
    // The operator's request is in the audit.
    let audited = f.c.node(f.leader).consensus().read(|s| {
        s.audit.iter().any(|a| {
            a.action == "RestoreBackupOntoPrimary" && a.parameters.contains(&b.id) && a.actor.contains("operator")
        })
    });
    assert!(audited, "the restore onto the primary is not audited");
    f.c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_is_cataloged_validated_by_restore_and_restorable() {
    let f = fixture(true).await;
    let before = f.databases();
    let b = f.create().await;
    assert_eq!((b.app.as_str(), b.region.as_str()), ("shop", "us-east"));
    assert!(
        b.id.starts_with("shop-") && b.id.contains("-us-east-us-east-1-"),
        "{}",
        b.id
    );
    assert_eq!(b.database, "shop");
    assert!(b.engine.starts_with("PostgreSQL "), "{}", b.engine);
    assert_eq!(
        b.object_key,
        format!("cutover/us-east/us-east-1/shop/{}.cbk", b.id),
        "the object sits in the agent's own part of the bucket"
    );
    assert!(!b.version_id.is_empty(), "a versioned bucket gives a version id");
    assert!(b.size_bytes > 0 && b.dump_bytes > b.size_bytes, "{b:?}");
    assert_eq!(b.sha256.len(), 64);
    assert_eq!(b.key_id, "k1");
    assert_eq!(b.table_rows.get("public.orders"), Some(&5000));
    assert_eq!(b.table_rows.get("public.customers"), Some(&2));
    assert_eq!(b.trigger, "manual");
    assert!(b.requested_by.contains("operator"), "{}", b.requested_by);
    assert!(b.validations.is_empty());

    // Validation by restore: passes, is recorded, leaves no database.
    let v = f.validate(&b.id).await;
    assert_eq!(v.state, pb::TaskState::Succeeded as i32, "{v:?}");
    let after = f.get(&b.id).await;
    assert_eq!(after.validations.len(), 1);
    let rec = &after.validations[0];
    assert!(rec.passed && rec.verdict == "passed", "{rec:?}");
    assert!(rec.duration_ms > 0);
    assert_eq!(f.databases(), before, "validation left a database behind");

    // Restore to a scratch database: the same content as the source.
    let r = f.restore_scratch(&b.id).await;
    assert_eq!(r.state, pb::TaskState::Succeeded as i32, "{r:?}");
    let scratch = outputs(&r)["scratch"].clone();
    assert!(f.databases().contains(&scratch), "{scratch} not created");
    let copy = f.database(&scratch);
    assert_eq!(
        dump_checksum(&copy).await.unwrap(),
        dump_checksum(&f.source).await.unwrap(),
        "the restored copy differs from the source"
    );

    // Onto the primary without confirm: refused, nothing changes.
    let ops_before = f.c.node(f.leader).consensus().read(|s| s.operations.len());
    let audit_before = f.c.node(f.leader).consensus().read(|s| s.audit.len());
    let err = f
        .op()
        .restore_backup(pb::RestoreBackupRequest {
            id: b.id.clone(),
            to: pb::RestoreTarget::Primary as i32,
            confirm: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("--confirm"), "{}", err.message());
    assert_eq!(f.c.node(f.leader).consensus().read(|s| s.operations.len()), ops_before);
    assert_eq!(f.c.node(f.leader).consensus().read(|s| s.audit.len()), audit_before);

    // Bad input: a path in the id, an unknown id, an unknown app.
    let e = f
        .op()
        .get_backup(pb::GetBackupRequest { id: "../x".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let e = f
        .op()
        .validate_backup(pb::ValidateBackupRequest { id: "shop-nope".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    let e = f
        .op()
        .create_backup(pb::CreateBackupRequest {
            app: "nope".into(),
            region: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");

    // No secret anywhere an operator or a scraper can read.
    let ops =
        f.c.node(f.leader)
            .consensus()
            .read(|s| serde_json::to_string(&s.operations).unwrap());
    let audit =
        f.c.node(f.leader)
            .consensus()
            .read(|s| serde_json::to_string(&s.audit).unwrap());
    let catalog =
        f.c.node(f.leader)
            .consensus()
            .read(|s| serde_json::to_string(&s.backups).unwrap());
    let metrics = cutover_shared::telemetry::metrics_handle().render();
    assert!(
        metrics.contains("cutover_backup_last_success_timestamp_seconds{"),
        "{metrics}"
    );
    assert!(metrics.contains("cutover_backup_validation_last_success_timestamp_seconds{"));
    let logs = String::from_utf8_lossy(&captured_logs().lock().unwrap()).into_owned();
    assert!(logs.contains("db.backup"), "the capture saw the agent's logs");
    for (what, text) in [
        ("operations", &ops),
        ("audit", &audit),
        ("catalog", &catalog),
        ("metrics", &metrics),
        ("logs", &logs),
    ] {
        assert!(!text.contains(&f.secret_key), "the S3 secret key is in the {what}");
        assert!(!text.contains(&f.encryption_key), "the encryption key is in the {what}");
        assert!(
            !text.contains(f.pg.password()),
            "the database password is in the {what}"
        );
    }
    f.c.shutdown().await;
}

/// Downloads an object whole (small) through the agent's store code.
async fn object_bytes(store: &ObjectStore, key: &str) -> Vec<u8> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let (s, k) = (store.clone(), key.to_owned());
    let dl = tokio::spawn(async move { s.download(&k, None, tx).await });
    let mut all = Vec::new();
    while let Some(c) = rx.recv().await {
        all.extend(c);
    }
    dl.await.unwrap().unwrap().expect("read to the end");
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupted_object_is_named_and_never_restored() {
    // A bucket without versions: what a store that damaged an object in
    // place serves is all there is.
    let f = fixture(false).await;
    let before = f.databases();
    let b = f.create().await;
    assert!(b.version_id.is_empty() || b.version_id == "null", "{b:?}");
    let store = ObjectStore::connect(&f.store_cfg).await.unwrap();
    let mut bytes = object_bytes(&store, &b.object_key).await;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    store.put(&b.object_key, bytes).await.unwrap();

    let v = f.validate(&b.id).await;
    assert_eq!(v.state, pb::TaskState::Failed as i32, "{v:?}");
    assert_eq!(outputs(&v)["verdict"], "corrupt", "{v:?}");
    let msg = &v.tasks[0].result.as_ref().unwrap().message;
    assert!(msg.contains("corrupt") && msg.contains(&b.object_key), "{msg}");
    let rec = f.get(&b.id).await;
    let last = rec.validations.last().unwrap();
    assert!(!last.passed && last.verdict == "corrupt", "{last:?}");
    assert_eq!(f.databases(), before, "a corrupt backup was restored");

    // Restore refuses it the same way.
    let r = f.restore_scratch(&b.id).await;
    assert_eq!(r.state, pb::TaskState::Failed as i32);
    assert_eq!(outputs(&r)["verdict"], "corrupt");
    assert_eq!(f.databases(), before, "a corrupt backup was restored");

    // Onto the primary too: the primary keeps its data, and the app leaves
    // maintenance (a compensation) though the restore failed.
    let primary = dump_checksum(&f.source).await.unwrap();
    let r = f.restore_primary(&b.id).await;
    assert_eq!(r.state, pb::TaskState::Failed as i32, "{r:?}");
    assert_eq!(steps(&r), restore_primary_steps(true));
    assert_eq!(r.tasks[3].state, pb::TaskState::Succeeded as i32, "{r:?}");
    assert!(r.tasks[2].result.as_ref().unwrap().message.contains("corrupt"), "{r:?}");
    assert_eq!(dump_checksum(&f.source).await.unwrap(), primary, "the primary changed");
    assert_eq!(f.databases(), before, "a corrupt backup was restored");

    let metrics = cutover_shared::telemetry::metrics_handle().render();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("cutover_backup_validation_failures_total{") && l.contains("verdict=\"corrupt\"")),
        "{metrics}"
    );
    f.c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sqlite_backup_round_trips_through_the_store() {
    let f = fixture_on(true, Db::Sqlite).await;
    let b = f.create().await;
    assert!(b.engine.starts_with("SQLite "), "{}", b.engine);
    assert_eq!(b.database, "shop.db");
    assert_eq!(b.table_rows.get("main.orders"), Some(&5000));
    assert!(b.dump_bytes > 0 && !b.version_id.is_empty(), "{b:?}");
    let stage = f.c.tmp.path().join("agent-us-east-us-east-1").join("backup-stage");
    assert_eq!(
        std::fs::read_dir(&stage).map(|d| d.count()).unwrap_or(0),
        0,
        "the staged copy was left behind"
    );

    let v = f.validate(&b.id).await;
    assert_eq!(v.state, pb::TaskState::Succeeded as i32, "{v:?}");
    assert!(f.get(&b.id).await.validations[0].passed);

    let r = f.restore_scratch(&b.id).await;
    assert_eq!(r.state, pb::TaskState::Succeeded as i32, "{r:?}");
    let copy_path = outputs(&r)["scratch"].clone();
    let copy = DbConfig {
        url: DbUrl::new(format!("sqlite://{copy_path}")),
        ..f.source.clone()
    };
    assert_eq!(
        dump_checksum(&copy).await.unwrap(),
        dump_checksum(&f.source).await.unwrap(),
        "the restored copy differs from the source"
    );
    f.c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_migrations_backup_is_uploaded_and_cataloged_beside_the_others() {
    let f = fixture_on(true, Db::Sqlite).await;
    let scheduled = f.create().await;
    f.op()
        .create_release(pb::CreateReleaseRequest {
            app: "shop".into(),
            image: "shop:v2".into(),
            migrations: vec![
                pb::MigrationFile {
                    name: "1_notes.up.sql".into(),
                    content: b"create table notes (id int primary key);".to_vec(),
                },
                pb::MigrationFile {
                    name: "1_notes.down.sql".into(),
                    content: b"drop table notes;".to_vec(),
                },
            ],
        })
        .await
        .unwrap();
    let id = f
        .op()
        .migrate(pb::MigrateRequest {
            app: "shop".into(),
            region: "us-east".into(),
            action: pb::MigrateAction::Up as i32,
            target: None,
            dry_run: false,
            image: "shop:v2".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .operation_id;
    let op = f.finished(&id).await;
    assert_eq!(op.state, pb::TaskState::Succeeded as i32, "{op:?}");
    let list = f.list().await;
    assert_eq!(list.len(), 2, "{list:?}");
    let m = list
        .iter()
        .find(|b| b.operation_id == id)
        .expect("the migration's backup is cataloged");
    assert_eq!(m.trigger, "migration");
    assert_eq!(m.migration_version, 0, "taken before the migration ran");
    assert_eq!(m.table_rows.get("main.orders"), Some(&5000));
    assert!(list.iter().any(|b| b.id == scheduled.id));
    // It is a backup like any other: it validates by restore.
    let v = f.validate(&m.id).await;
    assert_eq!(v.state, pb::TaskState::Succeeded as i32, "{v:?}");
    f.c.shutdown().await;
}

/// A bucket with Object Lock: each backup is locked for the bucket's
/// default period (the agent locks it when the store did not, as moto does
/// not for multipart uploads), the catalog shows until when, the store
/// refuses to delete it, and so does `cutover backup delete`. The
/// configured server-side encryption is requested on top of cutover's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn object_lock_keeps_backups_and_server_side_encryption_is_requested() {
    let f = fixture_with(Bucket::Locked, Db::Postgres, |c| {
        c.server_side_encryption = Some("AES256".into())
    })
    .await;
    let b = f.create().await;
    let now = cutover_shared::domain::now_unix_ms();
    let day = 86_400_000;
    assert!(
        b.retain_until_unix_ms > now + day - 3_600_000 && b.retain_until_unix_ms <= now + day,
        "locked until {} (now {now})",
        b.retain_until_unix_ms
    );
    let store = ObjectStore::connect(&f.store_cfg).await.unwrap();
    let version = Some(b.version_id.as_str());
    let head = store.head(&b.object_key, version).await.unwrap();
    assert_eq!(head.server_side_encryption.as_deref(), Some("AES256"));
    assert_eq!(head.retain_until_unix_ms, Some(b.retain_until_unix_ms));

    // Not even the agent's own credentials can delete it.
    let e = store.delete(&b.object_key, version).await.unwrap_err();
    assert!(e.to_string().contains("AccessDenied"), "{e}");
    store
        .head(&b.object_key, version)
        .await
        .expect("the locked object is still there");

    // Nor the operator, and the refusal changes nothing.
    let ops_before = f.c.node(f.leader).consensus().read(|s| s.operations.len());
    let err = f
        .op()
        .delete_backup(pb::DeleteBackupRequest {
            id: b.id.clone(),
            force: true,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("Object Lock until"), "{}", err.message());
    assert_eq!(f.c.node(f.leader).consensus().read(|s| s.operations.len()), ops_before);
    assert_eq!(f.get(&b.id).await.id, b.id);
    f.c.shutdown().await;
}

/// `cutover backup delete`: the object version goes from the store and the
/// entry from the catalog, audited; the newest validated backup of its app
/// and cluster needs force; bad ids are refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deleted_backup_leaves_the_store_and_the_catalog() {
    let f = fixture(true).await;
    let validated = f.create().await;
    assert_eq!(f.validate(&validated.id).await.state, pb::TaskState::Succeeded as i32);
    let newer = f.create().await;
    let delete = |id: &str, force: bool| {
        let mut op = f.op();
        let id = id.to_owned();
        async move { op.delete_backup(pb::DeleteBackupRequest { id, force }).await }
    };

    let err = delete(&validated.id, false).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("--force"), "{}", err.message());

    let store = ObjectStore::connect(&f.store_cfg).await.unwrap();
    for (b, force) in [(&newer, false), (&validated, true)] {
        let id = delete(&b.id, force).await.unwrap().into_inner().operation_id;
        let op = f.finished(&id).await;
        assert_eq!(op.state, pb::TaskState::Succeeded as i32, "{op:?}");
        assert!(f.list().await.iter().all(|x| x.id != b.id), "{} still cataloged", b.id);
        assert!(
            store.head(&b.object_key, Some(&b.version_id)).await.is_err(),
            "{} is still stored",
            b.id
        );
        let audited = f.c.node(f.leader).consensus().read(|s| {
            s.audit
                .iter()
                .any(|a| a.action == "DeleteBackup" && a.outcome == "deleted" && a.parameters.contains(&b.id))
        });
        assert!(audited, "the deletion of {} is not audited", b.id);
    }

    for (id, code) in [
        ("../x", tonic::Code::InvalidArgument),
        ("shop-nope", tonic::Code::NotFound),
    ] {
        assert_eq!(delete(id, true).await.unwrap_err().code(), code, "{id}");
    }
    f.c.shutdown().await;
}

/// The same round trip against Garage, a production object store (no
/// versions, SHA-256 checked per part): backup, validation by restore,
/// restore to scratch equal to the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_round_trips_through_garage() {
    let f = fixture_with(Bucket::Garage, Db::Postgres, |_| {}).await;
    let b = f.create().await;
    assert!(b.size_bytes > 0 && b.sha256.len() == 64, "{b:?}");
    assert!(b.version_id.is_empty(), "Garage keeps no versions: {b:?}");
    let v = f.validate(&b.id).await;
    assert_eq!(v.state, pb::TaskState::Succeeded as i32, "{v:?}");
    let r = f.restore_scratch(&b.id).await;
    assert_eq!(r.state, pb::TaskState::Succeeded as i32, "{r:?}");
    let copy = f.database(&outputs(&r)["scratch"]);
    assert_eq!(
        dump_checksum(&copy).await.unwrap(),
        dump_checksum(&f.source).await.unwrap(),
        "the copy restored from Garage differs from the source"
    );
    let logs = String::from_utf8_lossy(&captured_logs().lock().unwrap()).into_owned();
    assert!(!logs.contains(&f.secret_key), "Garage's secret key is in the logs");
    f.c.shutdown().await;
}

/// A SQLite primary is restored in place: the live file keeps its inode
/// (running processes hold it open) and gets the backup's content in one
/// transaction, after a safety backup; the replaced content is kept as a
/// file beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sqlite_primary_is_restored_in_place() {
    use sqlx::{ConnectOptions, Connection};
    let f = fixture_on(true, Db::Sqlite).await;
    let live = f.c.tmp.path().join("shop.db");
    let original = dump_checksum(&f.source).await.unwrap();
    let b = f.create().await;
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&live)
        .connect()
        .await
        .unwrap();
    sqlx::raw_sql(
        "delete from orders where id > 100; insert into customers values (3, 'linus'); \
         create table refunds (id integer primary key autoincrement, amount int); \
         insert into refunds (amount) values (7);",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let changed = dump_checksum(&f.source).await.unwrap();
    assert_ne!(changed, original);
    let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&live).unwrap());

    let r = f.restore_primary(&b.id).await;
    assert_eq!(r.state, pb::TaskState::Succeeded as i32, "{r:?}");
    assert_eq!(steps(&r), restore_primary_steps(false));
    assert_eq!(dump_checksum(&f.source).await.unwrap(), original);
    // An open connection sees the restored content, in the same file.
    let customers: i64 = sqlx::query_scalar("select count(*) from customers")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(customers, 2);
    conn.close().await.unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&live).unwrap()),
        inode
    );
    let kept = r.tasks[2].result.as_ref().unwrap().outputs["replaced"].clone();
    let kept_db = DbConfig::new(
        "shop",
        Driver::Sqlite,
        DbUrl::new(format!("sqlite://{kept}")),
        f.c.tmp.path().join("work"),
    );
    assert_eq!(dump_checksum(&kept_db).await.unwrap(), changed);
    let safety = f.list().await.into_iter().find(|x| x.trigger == "safety").unwrap();
    assert_eq!(safety.table_rows.get("main.customers"), Some(&3));
    f.c.shutdown().await;
}
