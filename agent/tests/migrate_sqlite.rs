//! The migration engine against real SQLite database files.

mod migrate_common;

use migrate_common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_up_down_up_with_status() {
    up_down_up(&Backend::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_failure_halfway_rolls_back_by_downs() {
    failure_halfway_rolls_back_by_downs(&Backend::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_failed_check_rolls_back() {
    failed_check_rolls_back(&Backend::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_missing_down_restores_backup() {
    missing_down_restores_backup(&Backend::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_failing_down_restores_backup() {
    failing_down_restores_backup(&Backend::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_drift_is_refused() {
    drift_is_refused(&Backend::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_plan_changes_nothing() {
    plan_changes_nothing(&Backend::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_standalone_restore() {
    standalone_restore(&Backend::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_no_transaction_failure_restores_backup() {
    no_transaction_failure_restores_backup(&Backend::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_failed_down_run_reapplies_ups() {
    failed_down_run_reapplies_ups(&Backend::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_concurrent_runs_do_not_interleave() {
    concurrent_runs_do_not_interleave(&Backend::sqlite()).await;
}

/// A database in WAL mode stays in WAL mode through a restore, and its
/// leftover journal files do not leak into the restored copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_wal_database_restores() {
    use cutover_agent::migrate::{self, Outcome, Quiet};
    let b = Backend::sqlite();
    let cfg = b.db("wal");
    let wal_source = source(&[
        ("1_wal.sql", "-- no-transaction\nPRAGMA journal_mode = WAL;\n"),
        ("2_t.up.sql", "CREATE TABLE t (x INTEGER);\nINSERT INTO t VALUES (1);\n"),
        ("2_t.down.sql", "DROP TABLE t;\n"),
    ]);
    let r = migrate::up(&cfg, &wal_source, None, &[], &Quiet).await.unwrap();
    assert_eq!(r.outcome, Outcome::Applied, "{r:?}");
    assert_eq!(journal_mode(&cfg).await, "wal");
    let before = checksum(&cfg).await;
    let mut files = vec![
        ("1_wal.sql", "-- no-transaction\nPRAGMA journal_mode = WAL;\n"),
        ("2_t.up.sql", "CREATE TABLE t (x INTEGER);\nINSERT INTO t VALUES (1);\n"),
        ("2_t.down.sql", "DROP TABLE t;\n"),
    ];
    files.push(("3_more.sql", "INSERT INTO t VALUES (2);\n"));
    files.push(("4_bad.sql", "INSERT INTO nowhere VALUES (3);\n"));
    let r = migrate::up(&cfg, &source(&files), None, &[], &Quiet).await.unwrap();
    assert_eq!(r.outcome, Outcome::RestoredFromBackup, "{r:?}");
    assert_eq!(checksum(&cfg).await, before);
    assert_eq!(journal_mode(&cfg).await, "wal");
}

async fn journal_mode(cfg: &cutover_agent::migrate::DbConfig) -> String {
    use sqlx::Connection;
    let mut c = sqlx::SqliteConnection::connect(cfg.url.expose()).await.unwrap();
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut c)
        .await
        .unwrap();
    c.close().await.unwrap();
    mode
}
