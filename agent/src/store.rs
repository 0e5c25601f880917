//! The agent's durable memory of tasks: which ids it has started (and how
//! often) and the results of those it finished. This is what makes a
//! re-sent task answer with its earlier result instead of running twice.

use std::path::Path;

use cutover_shared::domain::{TaskResult, now_unix_ms};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

const RESULTS: TableDefinition<&str, &[u8]> = TableDefinition::new("task_results");
const EXECUTIONS: TableDefinition<&str, u64> = TableDefinition::new("task_executions");

/// Results older than this are forgotten; a task re-sent later than that
/// would run again (the coordinator never re-sends finished tasks).
pub const RETENTION_MS: i64 = 7 * 24 * 3600 * 1000;

#[derive(Debug, thiserror::Error)]
#[error("agent store: {0}")]
pub struct StoreError(String);

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

pub struct Store {
    db: Database,
}

/// Opens the store's redb file. A previous agent in this process (a
/// restart) may still be letting go of it: the last task it ran holds the
/// store until its result is sent. "Already open" is retried for a short
/// while before it is an error.
fn open_database(path: &Path) -> Result<Database, redb::DatabaseError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        match Database::create(path) {
            Err(redb::DatabaseError::DatabaseAlreadyOpen) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

impl Store {
    /// Opens `<dir>/agent.redb`, creating it if needed, and drops results past
    /// retention.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError(format!("creating {}: {e}", dir.display())))?;
        let db = open_database(&dir.join("agent.redb")).map_err(err)?;
        let tx = db.begin_write().map_err(err)?;
        {
            let mut results = tx.open_table(RESULTS).map_err(err)?;
            tx.open_table(EXECUTIONS).map_err(err)?;
            let cutoff = now_unix_ms() - RETENTION_MS;
            results
                .retain(|_, v| {
                    serde_json::from_slice::<TaskResult>(v)
                        .map(|r| r.finished_at_unix_ms >= cutoff)
                        .unwrap_or(false)
                })
                .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(Store { db })
    }

    /// The recorded result of a finished task.
    pub fn result(&self, task_id: &str) -> Result<Option<TaskResult>, StoreError> {
        let tx = self.db.begin_read().map_err(err)?;
        let t = tx.open_table(RESULTS).map_err(err)?;
        match t.get(task_id).map_err(err)? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(err)?)),
            None => Ok(None),
        }
    }

    /// Records that execution of `task_id` starts; returns how many times it
    /// has started, this time included.
    pub fn record_start(&self, task_id: &str) -> Result<u64, StoreError> {
        let tx = self.db.begin_write().map_err(err)?;
        let n = {
            let mut t = tx.open_table(EXECUTIONS).map_err(err)?;
            let n = t.get(task_id).map_err(err)?.map_or(0, |v| v.value()) + 1;
            t.insert(task_id, n).map_err(err)?;
            n
        };
        tx.commit().map_err(err)?;
        Ok(n)
    }

    /// How many times execution of `task_id` started on this agent.
    pub fn execution_count(&self, task_id: &str) -> Result<u64, StoreError> {
        let tx = self.db.begin_read().map_err(err)?;
        let t = tx.open_table(EXECUTIONS).map_err(err)?;
        Ok(t.get(task_id).map_err(err)?.map_or(0, |v| v.value()))
    }

    /// Durably records a finished task's result (fsync before returning).
    pub fn save_result(&self, result: &TaskResult) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(result).map_err(err)?;
        let tx = self.db.begin_write().map_err(err)?;
        tx.open_table(RESULTS)
            .map_err(err)?
            .insert(result.task_id.as_str(), bytes.as_slice())
            .map_err(err)?;
        tx.commit().map_err(err)
    }
}
