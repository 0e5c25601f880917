//! A writer that numbers its writes, for disaster-recovery tests: what it
//! acknowledged is what a failover must not lose, and which server took
//! each write shows where the primary was.

use std::time::{Duration, Instant};

/// Inserts 1, 2, 3, ... one autocommitted row each, into whichever of
/// `urls` takes writes, and records each number whose commit was
/// acknowledged. A refused or broken write is retried, same number, on
/// the next server: the writer follows the primary across a failover.
pub struct SequenceWriter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    acked: std::sync::Arc<std::sync::Mutex<Vec<(i64, usize, Instant)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl SequenceWriter {
    pub fn start(urls: Vec<String>) -> SequenceWriter {
        Self::start_paced(urls, None)
    }

    /// [`SequenceWriter::start`], offering at most `per_sec` writes a
    /// second (`None`: as fast as the server acknowledges them).
    pub fn start_paced(urls: Vec<String>, per_sec: Option<u32>) -> SequenceWriter {
        use sqlx::Connection;
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (s, a) = (stop.clone(), acked.clone());
        let task = tokio::spawn(async move {
            let mut pace = per_sec.map(|r| {
                let mut i = tokio::time::interval(Duration::from_secs(1) / r.max(1));
                i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                i
            });
            let mut n: i64 = 1;
            let mut at = 0usize;
            let mut conn: Option<sqlx::PgConnection> = None;
            while !s.load(Ordering::Relaxed) {
                if let Some(p) = pace.as_mut() {
                    p.tick().await;
                }
                if conn.is_none() {
                    conn = sqlx::PgConnection::connect(&urls[at]).await.ok();
                }
                let r = match conn.as_mut() {
                    Some(c) => Some(
                        sqlx::query("insert into seq values ($1)")
                            .bind(n)
                            .execute(&mut *c)
                            .await,
                    ),
                    None => None,
                };
                // A number already there committed without its
                // acknowledgement reaching us (the server died between the
                // two): it exists, but it was never acknowledged.
                let exists = matches!(
                    &r,
                    Some(Err(sqlx::Error::Database(e))) if e.code().as_deref() == Some("23505")
                );
                if matches!(r, Some(Ok(_))) {
                    a.lock().unwrap().push((n, at, Instant::now()));
                    n += 1;
                } else if exists {
                    n += 1;
                } else {
                    // Refused (read-only, a standby) or cut off (fenced):
                    // the same number on the other server, after a breath.
                    conn = None;
                    at = (at + 1) % urls.len();
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        });
        SequenceWriter { stop, acked, task }
    }

    /// How many commits server `i` acknowledged so far.
    pub fn acked_on(&self, i: usize) -> usize {
        self.acked.lock().unwrap().iter().filter(|(_, at, _)| *at == i).count()
    }

    /// When server `i` first acknowledged a commit.
    pub fn first_ack_on(&self, i: usize) -> Option<Instant> {
        self.acked
            .lock()
            .unwrap()
            .iter()
            .find(|(_, at, _)| *at == i)
            .map(|(_, _, t)| *t)
    }

    /// Waits until server `i` acknowledged `n` more commits (panics after
    /// 30 s: the writer made no progress there).
    pub async fn wait_acked(&self, i: usize, n: usize) {
        let want = self.acked_on(i) + n;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while self.acked_on(i) < want {
            assert!(
                std::time::Instant::now() < deadline,
                "the writer made no progress on server {i}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops writing; returns every acknowledged number.
    pub async fn finish(self) -> Vec<i64> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.unwrap();
        self.acked.lock().unwrap().iter().map(|(n, _, _)| *n).collect()
    }
}

/// The numbers stored in `pg`'s `shop.seq`: what a writer's
/// acknowledgements are checked against.
pub fn numbers_on(pg: &crate::postgres::TestPostgres) -> std::collections::BTreeSet<i64> {
    pg.psql("shop", "select n from seq")
        .expect("reading seq")
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// A `[[databases]]` entry for `app` in `url_file` with a DR role.
pub fn database(
    app: &str,
    url_file: &std::path::Path,
    role: cutover_shared::dr::DbRole,
    follows: Option<&str>,
) -> cutover_shared::config::DatabaseConfig {
    cutover_shared::config::DatabaseConfig {
        role: Some(role),
        follows: follows.map(str::to_owned),
        ..cutover_shared::config::DatabaseConfig::with_url_file(
            app,
            cutover_shared::config::DbDriver::Postgres,
            url_file.to_owned(),
        )
    }
}
