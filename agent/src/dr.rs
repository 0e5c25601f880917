//! What this agent observes about its databases for disaster recovery: each
//! one's replication role (asked of the server, not taken from the config:
//! a promoted standby is a primary whatever the file says), WAL position
//! and lag. The session reports them every `db_status_interval_ms`.

use std::path::Path;

use cutover_shared::config::{DatabaseConfig, DbDriver};
use cutover_shared::domain::now_unix_ms;
use cutover_shared::dr::{DatabaseStatus, DbRole};

use crate::migrate;

/// How long one observation may take before it counts as unreachable: a
/// hung server must not hold up the next report.
const OBSERVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Observes one database. Never fails: what went wrong is the status's
/// `error` (redacted), and its role is then unknown.
pub async fn observe(db: &DatabaseConfig, data_dir: &Path) -> DatabaseStatus {
    let mut status = DatabaseStatus {
        app: db.app.clone(),
        driver: db.driver,
        configured_role: db.role(),
        role: None,
        follows: db.follows.clone(),
        lsn: None,
        receive_lsn: None,
        lag_ms: None,
        error: None,
        observed_at_unix_ms: now_unix_ms(),
    };
    if db.driver == DbDriver::Sqlite {
        // A SQLite file has no replication: it is what the config says.
        status.role = Some(db.role());
        return status;
    }
    let observed = async {
        let cfg = migrate::resolve(db, data_dir)?;
        migrate::replication(&cfg).await
    };
    match tokio::time::timeout(OBSERVE_TIMEOUT, observed).await {
        Ok(Ok(Some(r))) => {
            status.role = Some(if r.in_recovery {
                DbRole::Standby
            } else {
                DbRole::Primary
            });
            status.lsn = r.lsn;
            status.receive_lsn = r.receive_lsn;
            status.lag_ms = r.lag_ms;
        }
        Ok(Ok(None)) => status.role = Some(db.role()),
        Ok(Err(e)) => status.error = Some(e.to_string()),
        Err(_) => status.error = Some(format!("no answer within {OBSERVE_TIMEOUT:?}")),
    }
    status.observed_at_unix_ms = now_unix_ms();
    status
}

/// Observes every configured database, concurrently.
pub async fn observe_all(databases: &[DatabaseConfig], data_dir: &Path) -> Vec<DatabaseStatus> {
    futures::future::join_all(databases.iter().map(|d| observe(d, data_dir))).await
}
