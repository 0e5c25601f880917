//! Backups under faults, with coordinators and agents as real processes
//! killed with SIGKILL, a real PostgreSQL and a real S3-protocol server
//! (moto):
//!
//! - the leader killed at a schedule's slot: the slot still runs, once;
//! - an agent killed mid-upload: no catalog entry while it is down; after
//!   it restarts the unfinished multipart upload is aborted, the backup
//!   runs again to completion, and exactly one entry is cataloged.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use cutover_agent::backup::seal::BackupKey;
use cutover_agent::backup::store::ObjectStore;
use cutover_shared::config::{BackupStoreConfig, DatabaseConfig, DbDriver};
use cutover_shared::proto as pb;
use cutover_tests::postgres::TestPostgres;
use cutover_tests::process::ProcessCluster;
use cutover_tests::s3::TestS3;
use cutover_tests::sample_app_spec;

const T: Duration = Duration::from_secs(120);
const REGION: &[(&str, &str)] = &[("us-east", "us-east-1")];

struct Fixture {
    _pg: TestPostgres,
    _s3: TestS3,
    pc: ProcessCluster,
    store_cfg: BackupStoreConfig,
}

/// A database of `rows` rows of about 1.3 KB of random hex each, a
/// versioned bucket, and a process cluster whose agent backs it up.
async fn fixture(rows: u32) -> Fixture {
    let pg = TestPostgres::start().unwrap();
    let url = pg.create_database("shop").unwrap();
    pg.psql(
        "shop",
        &format!(
            "create table orders (id int primary key, item text not null); \
             insert into orders select g, (select string_agg(md5(random()::text || s), '') \
             from generate_series(1, 40 + g % 2) s) from generate_series(1, {rows}) g;"
        ),
    )
    .unwrap();
    let s3 = TestS3::start().unwrap();
    s3.create_bucket("backups", true).unwrap();
    let key = BackupKey::generate("k1").unwrap().to_hex();
    let store_cfg = std::sync::Mutex::new(None);
    let pc = ProcessCluster::start_with(3, REGION, |_, cfg, dir| {
        std::fs::write(dir.join("shop-db-url"), &url).unwrap();
        cfg.databases = vec![DatabaseConfig::with_url_file(
            "shop",
            DbDriver::Postgres,
            dir.join("shop-db-url"),
        )];
        let b = s3
            .backup_config("backups", "", dir, &key, "not-checked-by-moto")
            .unwrap();
        *store_cfg.lock().unwrap() = Some(b.clone());
        cfg.backup = Some(b);
    })
    .await
    .unwrap();
    pc.wait_leader(T).await.unwrap();
    pc.wait_agents_up(T).await.unwrap();
    let spec = sample_app_spec("shop", REGION);
    pc.any("ApplyApp", |mut c| {
        let spec = spec.clone();
        async move { c.apply_app(pb::ApplyAppRequest { app: Some(spec.into()) }).await }
    })
    .await
    .unwrap();
    Fixture {
        _pg: pg,
        _s3: s3,
        pc,
        store_cfg: store_cfg.into_inner().unwrap().unwrap(),
    }
}

impl Fixture {
    async fn backups(&self) -> Result<Vec<pb::Backup>> {
        Ok(self
            .pc
            .any("ListBackups", |mut c| async move {
                c.list_backups(pb::ListBackupsRequest {
                    app: "shop".into(),
                    ..Default::default()
                })
                .await
            })
            .await?
            .backups)
    }

    async fn operations(&self) -> Result<Vec<pb::Operation>> {
        Ok(self
            .pc
            .any("ListOperations", |mut c| async move {
                c.list_operations(pb::ListOperationsRequest { limit: 1000 }).await
            })
            .await?
            .operations)
    }
}

/// Scheduled backup operations by slot.
fn by_slot(ops: &[pb::Operation]) -> BTreeMap<i64, Vec<&pb::Operation>> {
    let mut m: BTreeMap<i64, Vec<&pb::Operation>> = BTreeMap::new();
    for o in ops {
        if let Some(slot) = o.params.get("slot_unix_ms").and_then(|s| s.parse().ok()) {
            m.entry(slot).or_default().push(o);
        }
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leader_killed_at_a_slot_runs_it_exactly_once() {
    let mut f = fixture(200).await;
    // A slot every 10 seconds (cron with seconds).
    let schedule =
        f.pc.any("SetBackupSchedule", |mut c| async move {
            c.set_backup_schedule(pb::SetBackupScheduleRequest {
                app: "shop".into(),
                region: String::new(),
                cron: "*/10 * * * * *".into(),
                retention: "daily=30".into(),
                validate: false,
            })
            .await
        })
        .await
        .unwrap()
        .schedule
        .unwrap();
    // Kill the leader at the second slot from now: the first shows the
    // schedule runs at all.
    let first = schedule.next_slot_unix_ms;
    let slot = first + 10_000;
    let leader = f.pc.wait_leader(T).await.unwrap();
    let now = cutover_shared::domain::now_unix_ms();
    tokio::time::sleep(Duration::from_millis((slot - now).max(0) as u64)).await;
    f.pc.kill9_coordinator(leader);
    f.pc.wait_leader(T).await.unwrap();
    f.pc.start_coordinator(leader).unwrap();

    // Wait for the slot after the kill slot to have run too.
    let deadline = Instant::now() + T;
    let done = loop {
        let ops = f.operations().await.unwrap_or_default();
        let slots = by_slot(&ops);
        let finished = |s: i64| {
            slots.get(&s).is_some_and(|v| {
                v.iter()
                    .all(|o| o.state == pb::TaskState::Succeeded as i32 || o.state == pb::TaskState::Failed as i32)
            })
        };
        if finished(slot) && slots.keys().any(|&s| s > slot && finished(s)) {
            break ops;
        }
        if Instant::now() > deadline {
            panic!("the slots did not run: {:?}", slots.keys().collect::<Vec<_>>());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    f.pc.any("DeleteBackupSchedule", |mut c| async move {
        c.delete_backup_schedule(pb::DeleteBackupScheduleRequest { app: "shop".into() })
            .await
    })
    .await
    .unwrap();
    let slots = by_slot(&done);
    for (s, ops) in &slots {
        assert_eq!(ops.len(), 1, "slot {s} ran {} times", ops.len());
    }
    let at_kill = slots.get(&slot).expect("the slot the leader was killed at ran");
    assert_eq!(
        at_kill[0].state,
        pb::TaskState::Succeeded as i32,
        "{}",
        at_kill[0].summary
    );
    // Each succeeded slot made exactly one backup: one create task, whose
    // backup is in the catalog or was deleted by retention (which keeps
    // the newest of each day: these are all on one day), audited.
    // A retention deletion already under way when the schedule went can
    // still land between two reads (it removes the entry and audits it in
    // one command): read the audit between two equal catalog listings.
    let ids = |b: Vec<pb::Backup>| b.into_iter().map(|b| b.id).collect::<Vec<String>>();
    let deadline = Instant::now() + T;
    let (catalog, audit) = loop {
        let before = ids(f.backups().await.unwrap());
        let audit =
            f.pc.any("ListAuditEvents", |mut c| async move {
                c.list_audit_events(pb::ListAuditEventsRequest {
                    limit: 1000,
                    since_unix_ms: 0,
                })
                .await
            })
            .await
            .unwrap()
            .events;
        if ids(f.backups().await.unwrap()) == before {
            break (before, audit);
        }
        assert!(Instant::now() < deadline, "the catalog kept changing");
    };
    let deleted: Vec<&pb::AuditEvent> = audit
        .iter()
        .filter(|e| e.action == "DeleteBackup" && e.outcome == "deleted")
        .collect();
    for (s, ops) in &slots {
        if ops[0].state != pb::TaskState::Succeeded as i32 {
            continue;
        }
        let creates: Vec<&pb::Task> = ops[0]
            .tasks
            .iter()
            .filter_map(|t| t.task.as_ref())
            .filter(|t| t.kind == "db.backup")
            .collect();
        assert_eq!(creates.len(), 1, "slot {s}");
        let id = &creates[0].params["backup_id"];
        let in_catalog = catalog.contains(id);
        let audited = deleted.iter().filter(|e| e.parameters.contains(id.as_str())).count();
        assert!(
            in_catalog ^ (audited == 1),
            "slot {s}: backup {id} cataloged {in_catalog}, deletions audited {audited}"
        );
    }
}

/// Polls until the store has an unfinished multipart upload under `prefix`.
async fn wait_upload_started(store: &ObjectStore, prefix: &str) -> Result<()> {
    let deadline = Instant::now() + T;
    loop {
        if !store.incomplete(prefix).await?.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("no upload started under {prefix}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_killed_mid_upload_leaves_no_entry_and_no_orphaned_parts() {
    // About 50 MB of hex: several 5 MiB parts, seconds of upload.
    let mut f = fixture(40_000).await;
    let store = ObjectStore::connect(&f.store_cfg).await.unwrap();
    let prefix = "us-east/us-east-1/";
    let id =
        f.pc.any("CreateBackup", |mut c| async move {
            c.create_backup(pb::CreateBackupRequest {
                app: "shop".into(),
                region: String::new(),
            })
            .await
        })
        .await
        .unwrap()
        .operation_id;
    wait_upload_started(&store, prefix).await.unwrap();
    f.pc.kill9_agent(0);

    // While the agent is down: the upload is unfinished, and nothing is
    // cataloged.
    assert!(
        f.backups().await.unwrap().is_empty(),
        "an interrupted upload was cataloged"
    );
    assert!(!store.incomplete(prefix).await.unwrap().is_empty());
    let op = f.pc.operation(&id).await.unwrap();
    assert_ne!(op.state, pb::TaskState::Succeeded as i32);

    // Restarted: the crash's upload is aborted, the task runs again.
    f.pc.start_agent(0).unwrap();
    let op = f.pc.wait_finished(&id, T).await.unwrap();
    assert_eq!(op.state, pb::TaskState::Succeeded as i32, "{}", op.summary);
    let backups = f.backups().await.unwrap();
    assert_eq!(backups.len(), 1, "{backups:?}");
    assert_eq!(
        store.incomplete(prefix).await.unwrap(),
        Vec::<String>::new(),
        "an orphaned multipart upload is left"
    );
    // And what was cataloged restores.
    let v =
        f.pc.any("ValidateBackup", |mut c| {
            let id = backups[0].id.clone();
            async move { c.validate_backup(pb::ValidateBackupRequest { id }).await }
        })
        .await
        .unwrap()
        .operation_id;
    let v = f.pc.wait_finished(&v, T).await.unwrap();
    assert_eq!(v.state, pb::TaskState::Succeeded as i32, "{}", v.summary);
}
