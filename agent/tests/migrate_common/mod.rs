//! Scenarios shared by `migrate_postgres.rs` and `migrate_sqlite.rs`: the
//! same migrations, runs and assertions against a real server or file.

#![allow(dead_code)]

use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use cutover_agent::migrate::{
    self, DbConfig, DbUrl, Direction, Driver, MigrateError, MigrationSource, Outcome, Quiet, RunEvent,
};
// The harness of `cutover-tests`, compiled in here so that the agent's
// tests do not build the coordinator.
pub use cutover_devkit::postgres;
pub use postgres::TestPostgres;

/// A place to create databases.
pub enum Backend {
    Sqlite(tempfile::TempDir),
    Postgres(TestPostgres, tempfile::TempDir),
}

impl Backend {
    pub fn sqlite() -> Backend {
        Backend::Sqlite(tempfile::Builder::new().prefix("cutover-sqlite-").tempdir().unwrap())
    }

    /// Starts a real PostgreSQL; failing to is a test failure.
    pub fn postgres() -> Backend {
        let pg = TestPostgres::start().expect("starting PostgreSQL for the test");
        Backend::Postgres(pg, tempfile::Builder::new().prefix("cutover-pgbk-").tempdir().unwrap())
    }

    fn tmp(&self) -> &std::path::Path {
        match self {
            Backend::Sqlite(t) | Backend::Postgres(_, t) => t.path(),
        }
    }

    /// A new, empty database.
    pub fn db(&self, name: &str) -> DbConfig {
        let backups = self.tmp().join(format!("backups-{name}"));
        match self {
            Backend::Sqlite(t) => {
                let url = format!("sqlite://{}", t.path().join(format!("{name}.db")).display());
                DbConfig::new(name, Driver::Sqlite, DbUrl::new(url), backups)
            }
            Backend::Postgres(pg, _) => {
                let url = pg.create_database(name).expect("creating a database");
                let mut cfg = DbConfig::new(name, Driver::Postgres, DbUrl::new(url), backups);
                cfg.pg_bin_dir = Some(pg.bin_dir().to_owned());
                cfg
            }
        }
    }

    /// The secret that must never show (PostgreSQL's password).
    pub fn secret(&self) -> Option<&str> {
        match self {
            Backend::Postgres(pg, _) => Some(pg.password()),
            Backend::Sqlite(_) => None,
        }
    }
}

pub fn source(files: &[(&str, &str)]) -> MigrationSource {
    MigrationSource::from_files(
        files
            .iter()
            .map(|(n, s)| (n.to_string(), s.as_bytes().to_vec()))
            .collect(),
    )
    .expect("a valid source")
}

/// Four reversible migrations, portable between PostgreSQL and SQLite.
pub const BASE: &[(&str, &str)] = &[
    (
        "1_users.up.sql",
        "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL);\nINSERT INTO users VALUES (1, 'ada'), (2, 'bob');\n",
    ),
    ("1_users.down.sql", "DROP TABLE users;\n"),
    (
        "2_orders.up.sql",
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL REFERENCES users (id), total INTEGER NOT NULL);\nINSERT INTO orders VALUES (1, 1, 10), (2, 2, 20);\n",
    ),
    ("2_orders.down.sql", "DROP TABLE orders;\n"),
    (
        "3_email.up.sql",
        "-- a column, filled in\nALTER TABLE users ADD COLUMN email TEXT;\nUPDATE users SET email = name || '@example.com';\n",
    ),
    ("3_email.down.sql", "ALTER TABLE users DROP COLUMN email;\n"),
    ("4_index.up.sql", "CREATE INDEX orders_user ON orders (user_id);\n"),
    ("4_index.down.sql", "DROP INDEX orders_user;\n"),
];

pub fn with(extra: &[(&'static str, &'static str)], upto: i64) -> MigrationSource {
    let mut files: Vec<(&str, &str)> = BASE
        .iter()
        .copied()
        .filter(|(n, _)| n.split('_').next().unwrap().parse::<i64>().unwrap() <= upto)
        .collect();
    files.extend_from_slice(extra);
    source(&files)
}

pub async fn checksum(cfg: &DbConfig) -> String {
    migrate::dump_checksum(cfg).await.expect("dump checksum")
}

pub async fn versions(cfg: &DbConfig, src: &MigrationSource) -> Vec<i64> {
    migrate::status(cfg, src).await.expect("status").applied_versions()
}

/// Up to the newest, down to a target, up again; status at each point,
/// and the content after a round trip is what it was.
pub async fn up_down_up(b: &Backend) {
    let cfg = b.db("roundtrip");
    let src = source(BASE);
    let st = migrate::status(&cfg, &src).await.unwrap();
    assert!(st.applied.is_empty());
    assert_eq!(st.pending, vec![1, 2, 3, 4]);
    assert_eq!(st.newest_applied, None);

    let r = migrate::up(&cfg, &src, None, &[], &Quiet).await.unwrap();
    assert_eq!(r.outcome, Outcome::Applied, "{r:?}");
    assert_eq!(
        r.applied.iter().map(|s| s.version).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert!(r.applied.iter().all(|s| s.direction == Direction::Up));
    let backup = r.backup.as_ref().expect("a backup before migrating");
    assert!(
        backup.path.exists() && backup.size > 0 && backup.sha256.len() == 64,
        "{backup:?}"
    );
    assert_eq!(r.versions_after, vec![1, 2, 3, 4]);
    let st = migrate::status(&cfg, &src).await.unwrap();
    assert_eq!(st.applied_versions(), vec![1, 2, 3, 4]);
    assert!(st.pending.is_empty() && st.drifted.is_empty() && st.dirty.is_empty() && st.unknown.is_empty());
    assert_eq!(st.newest_applied, Some(4));
    assert_eq!(st.applied[1].description, "orders");
    let full = checksum(&cfg).await;

    // Nothing pending: nothing runs, no backup.
    let r = migrate::up(&cfg, &src, None, &[], &Quiet).await.unwrap();
    assert!(r.applied.is_empty() && r.backup.is_none() && r.succeeded());

    let r = migrate::down(&cfg, &src, Some(2), &Quiet).await.unwrap();
    assert_eq!(r.outcome, Outcome::Applied, "{r:?}");
    assert_eq!(r.applied.iter().map(|s| s.version).collect::<Vec<_>>(), vec![4, 3]);
    assert!(r.applied.iter().all(|s| s.direction == Direction::Down));
    let st = migrate::status(&cfg, &src).await.unwrap();
    assert_eq!(st.applied_versions(), vec![1, 2]);
    assert_eq!(st.pending, vec![3, 4]);
    assert_eq!(st.newest_applied, Some(2));
    let at_two = checksum(&cfg).await;

    // The same content as a database migrated straight to 2.
    let other = b.db("straight");
    migrate::up(&other, &src, Some(2), &[], &Quiet).await.unwrap();
    assert_eq!(checksum(&other).await, at_two);

    // No target: only the newest is reverted.
    let r = migrate::down(&cfg, &src, None, &Quiet).await.unwrap();
    assert_eq!(r.applied.iter().map(|s| s.version).collect::<Vec<_>>(), vec![2]);
    assert_eq!(versions(&cfg, &src).await, vec![1]);

    let r = migrate::up(&cfg, &src, Some(3), &[], &Quiet).await.unwrap();
    assert_eq!(r.applied.iter().map(|s| s.version).collect::<Vec<_>>(), vec![2, 3]);
    let r = migrate::up(&cfg, &src, None, &[], &Quiet).await.unwrap();
    assert_eq!(r.applied.iter().map(|s| s.version).collect::<Vec<_>>(), vec![4]);
    assert_eq!(versions(&cfg, &src).await, vec![1, 2, 3, 4]);
    assert_eq!(checksum(&cfg).await, full, "up, down, up again gives the same database");

    // Down to 0 reverts everything.
    migrate::down(&cfg, &src, Some(0), &Quiet).await.unwrap();
    assert!(versions(&cfg, &src).await.is_empty());
    assert!(matches!(
        migrate::up(&cfg, &src, Some(9), &[], &Quiet).await,
        Err(MigrateError::UnknownTarget(9))
    ));
}

/// Migration 4 of 2..=5 violates a constraint after 2 and 3 committed: the
/// downs of 3 and 2 run and the database is exactly as before.
pub async fn failure_halfway_rolls_back_by_downs(b: &Backend) {
    let cfg = b.db("halfway");
    migrate::up(&cfg, &source(BASE), Some(1), &[], &Quiet).await.unwrap();
    let before = checksum(&cfg).await;
    let src = with(
        &[
            (
                "4_dup.up.sql",
                "CREATE TABLE t4 (x INTEGER);\nINSERT INTO users VALUES (1, 'duplicate');\n",
            ),
            ("4_dup.down.sql", "DROP TABLE t4;\n"),
            ("5_never.up.sql", "CREATE TABLE t5 (x INTEGER);\n"),
            ("5_never.down.sql", "DROP TABLE t5;\n"),
        ],
        3,
    );
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = events.clone();
    let obs = move |e: &RunEvent<'_>| ev.lock().unwrap().push(e.to_string());
    let r = migrate::up(&cfg, &src, None, &[], &obs).await.unwrap();
    assert_eq!(r.outcome, Outcome::RolledBackByDowns, "{r:?}");
    assert_eq!(r.applied.iter().map(|s| s.version).collect::<Vec<_>>(), vec![2, 3]);
    assert_eq!(r.compensation.iter().map(|s| s.version).collect::<Vec<_>>(), vec![3, 2]);
    assert!(r.compensation.iter().all(|s| s.direction == Direction::Down));
    let err = r.error.as_deref().unwrap();
    assert!(err.contains("migration 4 up (4_dup.up.sql) failed"), "{err}");
    assert_eq!(r.versions_before, vec![1]);
    assert_eq!(r.versions_after, vec![1]);
    assert_eq!(checksum(&cfg).await, before, "the database is exactly as before");
    assert_eq!(versions(&cfg, &src).await, vec![1]);
    let events = events.lock().unwrap();
    assert!(
        events.iter().any(|e| e.starts_with("undo: running migration 3 down")),
        "{events:?}"
    );
}

/// A check that does not hold after the migrations rolls them back.
pub async fn failed_check_rolls_back(b: &Backend) {
    let cfg = b.db("checks");
    migrate::up(&cfg, &source(BASE), Some(1), &[], &Quiet).await.unwrap();
    let before = checksum(&cfg).await;
    let src = source(BASE);
    let checks = vec![
        "SELECT count(*) = 2 FROM users".to_owned(),
        "SELECT count(*) = 99 FROM orders".to_owned(),
    ];
    let r = migrate::up(&cfg, &src, None, &checks, &Quiet).await.unwrap();
    assert_eq!(r.outcome, Outcome::RolledBackByDowns, "{r:?}");
    assert!(r.error.as_deref().unwrap().contains("count(*) = 99"), "{r:?}");
    assert!(r.error.as_deref().unwrap().contains("returned false"), "{r:?}");
    assert_eq!(checksum(&cfg).await, before);

    // A check must not write.
    let r = migrate::up(
        &cfg,
        &src,
        None,
        &["DELETE FROM users RETURNING true".to_owned()],
        &Quiet,
    )
    .await
    .unwrap();
    assert_eq!(r.outcome, Outcome::RolledBackByDowns, "{r:?}");
    assert_eq!(checksum(&cfg).await, before);

    let ok = vec!["SELECT count(*) = 2 FROM orders".to_owned()];
    let r = migrate::up(&cfg, &src, None, &ok, &Quiet).await.unwrap();
    assert_eq!(r.outcome, Outcome::Applied, "{r:?}");
}

/// An irreversible migration applied, then a later one fails: there is no
/// down to run, so the backup is restored; the table the irreversible
/// migration created is gone again.
pub async fn missing_down_restores_backup(b: &Backend) {
    let cfg = b.db("missingdown");
    migrate::up(&cfg, &source(BASE), Some(1), &[], &Quiet).await.unwrap();
    let before = checksum(&cfg).await;
    let src = with(
        &[
            (
                "2_audit.sql",
                "CREATE TABLE audit (id INTEGER PRIMARY KEY, what TEXT);\nINSERT INTO audit VALUES (1, 'x');\nUPDATE users SET name = 'changed';\n",
            ),
            ("3_broken.sql", "CREATE TABLEX nope (x INTEGER);\n"),
        ],
        1,
    );
    let r = migrate::up(&cfg, &src, None, &[], &Quiet).await.unwrap();
    assert_eq!(r.outcome, Outcome::RestoredFromBackup, "{r:?}");
    assert_eq!(r.applied.iter().map(|s| s.version).collect::<Vec<_>>(), vec![2]);
    assert!(r.compensation.is_empty());
    let err = r.error.as_deref().unwrap();
    assert!(
        err.contains("migration 3 up") && err.contains("no down migration"),
        "{err}"
    );
    assert_eq!(r.versions_after, vec![1]);
    assert_eq!(checksum(&cfg).await, before, "restored exactly");
    assert_eq!(versions(&cfg, &src).await, vec![1]);
    // And the database works on: the run can be repeated once fixed.
    let fixed = with(
        &[(
            "2_audit.sql",
            "CREATE TABLE audit (id INTEGER PRIMARY KEY, what TEXT);\n",
        )],
        1,
    );
    let r = migrate::up(&cfg, &fixed, None, &[], &Quiet).await.unwrap();
    assert_eq!(r.outcome, Outcome::Applied, "{r:?}");
}

/// A down that fails while undoing a failed run: the backup is restored.
pub async fn failing_down_restores_backup(b: &Backend) {
    let cfg = b.db("failingdown");
    migrate::up(&cfg, &source(BASE), Some(1), &[], &Quiet).await.unwrap();
    let before = checksum(&cfg).await;
    let src = with(
        &[
            (
                "2_t2.up.sql",
                "CREATE TABLE t2 (x INTEGER);\nINSERT INTO t2 VALUES (7);\n",
            ),
            ("2_t2.down.sql", "DROP TABLE no_such_table;\n"),
            ("3_bad.up.sql", "SELECT * FROM no_such_table_either;\n"),
            ("3_bad.down.sql", "SELECT 1;\n"),
        ],
        1,
    );
    let r = migrate::up(&cfg, &src, None, &[], &Quiet).await.unwrap();
    assert_eq!(r.outcome, Outcome::RestoredFromBackup, "{r:?}");
    let err = r.error.as_deref().unwrap();
    assert!(err.contains("undoing migration 2 (down) failed"), "{err}");
    assert_eq!(checksum(&cfg).await, before);
    assert_eq!(versions(&cfg, &src).await, vec![1]);
}

/// A changed applied migration is refused, naming it; plan refuses too,
/// and nothing changes.
pub async fn drift_is_refused(b: &Backend) {
    let cfg = b.db("drift");
    migrate::up(&cfg, &source(BASE), Some(2), &[], &Quiet).await.unwrap();
    let before = checksum(&cfg).await;
    let mut files: Vec<(&str, &str)> = BASE.to_vec();
    files[2].1 = "CREATE TABLE orders (id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL, total INTEGER NOT NULL);\n";
    let drifted = source(&files);
    let st = migrate::status(&cfg, &drifted).await.unwrap();
    assert_eq!(st.drifted, vec![2]);
    assert_eq!(st.pending, vec![3, 4]);
    let e = migrate::up(&cfg, &drifted, None, &[], &Quiet).await.unwrap_err();
    assert!(
        matches!(&e, MigrateError::Drift { versions } if versions == &vec![2]),
        "{e:?}"
    );
    assert!(e.to_string().contains("[2]"), "{e}");
    let e = migrate::plan(&cfg, &drifted, None, Direction::Up).await.unwrap_err();
    assert!(matches!(e, MigrateError::Drift { .. }), "{e:?}");
    let e = migrate::down(&cfg, &drifted, Some(0), &Quiet).await.unwrap_err();
    assert!(matches!(e, MigrateError::Drift { .. }), "{e:?}");
    assert_eq!(checksum(&cfg).await, before);

    // An applied version the source lacks is refused as well.
    let short = source(&BASE[..2]);
    let e = migrate::up(&cfg, &short, None, &[], &Quiet).await.unwrap_err();
    assert!(
        matches!(&e, MigrateError::UnknownApplied { versions } if versions == &vec![2]),
        "{e:?}"
    );
}

/// A dry run lists what would run and changes nothing.
pub async fn plan_changes_nothing(b: &Backend) {
    let cfg = b.db("dryrun");
    let src = source(BASE);
    // On a database with nothing in it yet.
    let p = migrate::plan(&cfg, &src, Some(2), Direction::Up).await.unwrap();
    assert_eq!(p.steps.iter().map(|s| s.version).collect::<Vec<_>>(), vec![1, 2]);
    if let Backend::Sqlite(_) = b {
        let path = cfg.url.expose().trim_start_matches("sqlite://").to_owned();
        assert!(!std::path::Path::new(&path).exists(), "plan created the SQLite file");
    }
    migrate::up(&cfg, &src, Some(1), &[], &Quiet).await.unwrap();
    let before = checksum(&cfg).await;
    let p = migrate::plan(&cfg, &src, None, Direction::Up).await.unwrap();
    assert_eq!(p.applied, vec![1]);
    assert_eq!(p.steps.iter().map(|s| s.version).collect::<Vec<_>>(), vec![2, 3, 4]);
    assert_eq!(p.steps[0].file, "2_orders.up.sql");
    assert_eq!(p.steps[0].statements.len(), 2, "{:?}", p.steps[0].statements);
    assert!(p.steps[0].statements[1].starts_with("INSERT INTO orders"));
    assert_eq!(p.steps[1].statements.len(), 2, "{:?}", p.steps[1].statements);
    let p = migrate::plan(&cfg, &src, Some(0), Direction::Down).await.unwrap();
    assert_eq!(p.steps.len(), 1);
    assert_eq!(p.steps[0].file, "1_users.down.sql");
    assert_eq!(p.steps[0].statements, vec!["DROP TABLE users"]);
    assert_eq!(checksum(&cfg).await, before);
    assert_eq!(versions(&cfg, &src).await, vec![1]);

    // Reverting an irreversible migration is refused up front, naming it.
    let src = with(&[("2_seed.sql", "INSERT INTO users VALUES (3, 'cy');\n")], 1);
    migrate::up(&cfg, &src, None, &[], &Quiet).await.unwrap();
    let e = migrate::plan(&cfg, &src, Some(0), Direction::Down).await.unwrap_err();
    assert!(
        matches!(&e, MigrateError::Irreversible { version: 2, file } if file == "2_seed.sql"),
        "{e:?}"
    );
    let e = migrate::down(&cfg, &src, Some(0), &Quiet).await.unwrap_err();
    assert!(matches!(e, MigrateError::Irreversible { version: 2, .. }), "{e:?}");
}

/// `restore` on its own puts a run's backup back, after checking it.
pub async fn standalone_restore(b: &Backend) {
    let cfg = b.db("restore");
    let src = source(BASE);
    migrate::up(&cfg, &src, Some(2), &[], &Quiet).await.unwrap();
    let at_two = checksum(&cfg).await;
    let r = migrate::up(&cfg, &src, None, &[], &Quiet).await.unwrap();
    let backup = r.backup.unwrap();
    assert_eq!(backup.versions, vec![1, 2]);
    assert_ne!(checksum(&cfg).await, at_two);
    migrate::restore(&cfg, &backup).await.unwrap();
    assert_eq!(checksum(&cfg).await, at_two);
    assert_eq!(versions(&cfg, &src).await, vec![1, 2]);

    // A backup that changed since it was taken is refused.
    let mut tampered = backup.clone();
    tampered.sha256 = "0".repeat(64);
    let e = migrate::restore(&cfg, &tampered).await.unwrap_err();
    assert!(e.to_string().contains("changed since it was taken"), "{e}");

    // Only a primary is migrated or restored.
    let mut replica = cfg.clone();
    replica.primary = false;
    assert!(matches!(
        migrate::restore(&replica, &backup).await,
        Err(MigrateError::NotPrimary)
    ));
    assert!(matches!(
        migrate::up(&replica, &src, None, &[], &Quiet).await,
        Err(MigrateError::NotPrimary)
    ));
    migrate::status(&replica, &src).await.unwrap();
}

/// Two runs at once: while one holds the migration lock, another with a
/// short lock timeout fails clearly, and one with a longer timeout waits,
/// then finds nothing left to do. Their migrations never interleave.
pub async fn concurrent_runs_do_not_interleave(b: &Backend) {
    let mut cfg = b.db("concurrent");
    cfg.lock_timeout = Duration::from_secs(20);
    let src = source(BASE);
    let (locked_tx, locked_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let gate = Mutex::new((Some(locked_tx), Some(go_rx)));
    // Holds the first run right after it took the lock, until told to go.
    let hold = move |e: &RunEvent<'_>| {
        if let RunEvent::LockAcquired = e {
            let mut g = gate.lock().unwrap();
            if let Some(tx) = g.0.take() {
                tx.send(()).unwrap();
            }
            if let Some(rx) = g.1.take() {
                // block_in_place: a worker blocked outright would stop
                // driving the runtime's I/O for everyone else.
                tokio::task::block_in_place(|| rx.recv_timeout(Duration::from_secs(60)).unwrap());
            }
        }
    };
    let (cfg1, src1) = (cfg.clone(), src.clone());
    let first = tokio::spawn(async move { migrate::up(&cfg1, &src1, None, &[], &hold).await });
    tokio::task::spawn_blocking(move || locked_rx.recv_timeout(Duration::from_secs(60)))
        .await
        .unwrap()
        .expect("the first run takes the lock");

    let mut impatient = cfg.clone();
    impatient.lock_timeout = Duration::from_millis(300);
    let e = migrate::up(&impatient, &src, None, &[], &Quiet).await.unwrap_err();
    assert!(matches!(e, MigrateError::Locked { .. }), "{e:?}");
    assert!(
        e.to_string().contains("another migration run holds the migration lock"),
        "{e}"
    );
    let e = migrate::down(&impatient, &src, Some(0), &Quiet).await.unwrap_err();
    assert!(matches!(e, MigrateError::Locked { .. }), "{e:?}");

    let order = Arc::new(Mutex::new(Vec::<String>::new()));
    let o = order.clone();
    let (cfg2, src2) = (cfg.clone(), src.clone());
    let second = tokio::spawn(async move {
        let r = migrate::up(&cfg2, &src2, None, &[], &Quiet).await;
        o.lock().unwrap().push("second done".into());
        r
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!second.is_finished(), "the second run waits for the lock");
    order.lock().unwrap().push("first released".into());
    go_tx.send(()).unwrap();
    let r1 = first.await.unwrap().unwrap();
    let r2 = second.await.unwrap().unwrap();
    assert_eq!(r1.applied.len(), 4, "{r1:?}");
    assert!(r2.applied.is_empty() && r2.backup.is_none() && r2.succeeded(), "{r2:?}");
    assert_eq!(*order.lock().unwrap(), vec!["first released", "second done"]);
    assert_eq!(versions(&cfg, &src).await, vec![1, 2, 3, 4]);
}

/// A `-- no-transaction` migration that fails may have done part of its
/// work, which no down migration knows about: the backup is restored.
pub async fn no_transaction_failure_restores_backup(b: &Backend) {
    let cfg = b.db("notx");
    migrate::up(&cfg, &source(BASE), Some(1), &[], &Quiet).await.unwrap();
    let before = checksum(&cfg).await;
    let src = with(
        &[
            (
                "2_notx.up.sql",
                "-- no-transaction\nINSERT INTO users VALUES (3, 'cy');\nINSERT INTO users VALUES (1, 'duplicate');\n",
            ),
            ("2_notx.down.sql", "DELETE FROM users WHERE id = 3;\n"),
        ],
        1,
    );
    let plan = migrate::plan(&cfg, &src, None, Direction::Up).await.unwrap();
    assert!(plan.steps[0].no_transaction);
    let r = migrate::up(&cfg, &src, None, &[], &Quiet).await.unwrap();
    assert_eq!(r.outcome, Outcome::RestoredFromBackup, "{r:?}");
    assert!(r.error.as_deref().unwrap().contains("without a transaction"), "{r:?}");
    assert_eq!(checksum(&cfg).await, before);
    assert_eq!(versions(&cfg, &src).await, vec![1]);
}

/// A `down` run that fails part way re-applies the ups of what it had
/// reverted: the database is as before.
pub async fn failed_down_run_reapplies_ups(b: &Backend) {
    let cfg = b.db("downfail");
    let mut files: Vec<(&str, &str)> = BASE.to_vec();
    // Migration 3's down fails (after 4's ran).
    assert_eq!(files[5].0, "3_email.down.sql");
    files[5].1 = "ALTER TABLE users DROP COLUMN no_such_column;\n";
    let src = source(&files);
    migrate::up(&cfg, &src, None, &[], &Quiet).await.unwrap();
    let before = checksum(&cfg).await;
    let r = migrate::down(&cfg, &src, Some(1), &Quiet).await.unwrap();
    assert_eq!(r.outcome, Outcome::RolledBackByUps, "{r:?}");
    assert_eq!(r.applied.iter().map(|s| s.version).collect::<Vec<_>>(), vec![4]);
    assert_eq!(
        r.compensation
            .iter()
            .map(|s| (s.version, s.direction))
            .collect::<Vec<_>>(),
        vec![(4, Direction::Up)]
    );
    assert!(
        r.error
            .as_deref()
            .unwrap()
            .contains("migration 3 down (3_email.down.sql) failed"),
        "{r:?}"
    );
    assert_eq!(checksum(&cfg).await, before);
    assert_eq!(versions(&cfg, &src).await, vec![1, 2, 3, 4]);
}
