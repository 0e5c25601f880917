//! What a backup records about its database besides the bytes: the server,
//! the newest migration, and each table's row count, all read in the one
//! snapshot the dump is taken in (`pg_export_snapshot`, handed to
//! `pg_dump --snapshot`), so validation can compare a restored copy with
//! exactly what was dumped, however busy the database was.

use std::collections::BTreeMap;

use cutover_shared::backup::MAX_RECORDED_TABLES;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Executor, PgConnection, Row};

use super::BackupError;
use crate::migrate::DbConfig;

/// The facts of one database at one snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    /// `PostgreSQL 16.4`.
    pub engine: String,
    /// The database's name on its server.
    pub database: String,
    /// The newest successfully applied migration (0: none).
    pub migration_version: i64,
    /// `schema.table` → rows.
    pub table_rows: BTreeMap<String, i64>,
}

/// An open read-only transaction whose snapshot `pg_dump` can share. The
/// snapshot stays importable while this lives.
pub struct Snapshot {
    conn: PgConnection,
    /// The exported snapshot's id, for `pg_dump --snapshot`.
    pub id: String,
    pub facts: Facts,
}

impl Snapshot {
    /// Opens a repeatable-read transaction on `db`, exports its snapshot
    /// and reads the facts in it.
    pub async fn take(db: &DbConfig) -> Result<Snapshot, BackupError> {
        let err =
            |what: &str, e: sqlx::Error| BackupError::Source(crate::migrate::redact(&db.url, &format!("{what}: {e}")));
        let mut conn = PgConnection::connect(db.url.expose())
            .await
            .map_err(|e| err("connecting", e))?;
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(|e| err("starting the snapshot", e))?;
        let id: String = sqlx::query_scalar("SELECT pg_export_snapshot()")
            .fetch_one(&mut conn)
            .await
            .map_err(|e| err("exporting the snapshot", e))?;
        let facts = read_facts(&mut conn)
            .await
            .map_err(|e| err("reading the database", e))?;
        Ok(Snapshot { conn, id, facts })
    }

    /// Ends the transaction (the dump has finished with the snapshot).
    pub async fn release(mut self) {
        let _ = self.conn.execute("COMMIT").await;
        let _ = self.conn.close().await;
    }
}

/// Row counts of the user tables of the database `url` names, in a fresh
/// read-only transaction (a restored copy, which nothing else writes).
pub async fn table_rows(db: &DbConfig) -> Result<BTreeMap<String, i64>, BackupError> {
    let err =
        |what: &str, e: sqlx::Error| BackupError::Restore(crate::migrate::redact(&db.url, &format!("{what}: {e}")));
    let mut conn = PgConnection::connect(db.url.expose())
        .await
        .map_err(|e| err("connecting to the restored copy", e))?;
    let rows = read_facts(&mut conn).await.map(|f| f.table_rows);
    let _ = conn.close().await;
    rows.map_err(|e| err("counting the restored rows", e))
}

/// `"name"` with embedded quotes doubled: a safe identifier.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

async fn read_facts(conn: &mut PgConnection) -> Result<Facts, sqlx::Error> {
    let version: String = sqlx::query_scalar("SHOW server_version").fetch_one(&mut *conn).await?;
    let database: String = sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(&mut *conn)
        .await?;
    let has_migrations: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(&mut *conn)
        .await?;
    let migration_version = if has_migrations {
        sqlx::query_scalar::<_, Option<i64>>("SELECT max(version) FROM _sqlx_migrations WHERE success")
            .fetch_one(&mut *conn)
            .await?
            .unwrap_or(0)
    } else {
        0
    };
    let tables = sqlx::query(
        "SELECT n.nspname::text, c.relname::text FROM pg_class c \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
         AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%' \
         ORDER BY 1, 2 LIMIT $1",
    )
    .bind(MAX_RECORDED_TABLES as i64)
    .fetch_all(&mut *conn)
    .await?;
    let mut table_rows = BTreeMap::new();
    for t in tables {
        let (schema, name): (String, String) = (t.try_get(0)?, t.try_get(1)?);
        let sql = format!("SELECT count(*) FROM {}.{}", ident(&schema), ident(&name));
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(sql)).fetch_one(&mut *conn).await?;
        table_rows.insert(format!("{schema}.{name}"), n);
    }
    Ok(Facts {
        engine: format!("PostgreSQL {}", version.split_whitespace().next().unwrap_or(&version)),
        database,
        migration_version,
        table_rows,
    })
}

/// The facts of a SQLite database file (a copy taken for a backup, or a
/// restored one), opened read-only.
pub async fn sqlite_facts(path: &std::path::Path) -> Result<Facts, BackupError> {
    let err = |what: &str, e: sqlx::Error| BackupError::Source(format!("{what} {}: {e}", path.display()));
    let mut conn = SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .disable_statement_logging()
        .connect()
        .await
        .map_err(|e| err("opening", e))?;
    let facts = read_sqlite_facts(&mut conn).await.map_err(|e| err("reading", e));
    let _ = conn.close().await;
    let mut facts = facts?;
    facts.database = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(facts)
}

async fn read_sqlite_facts(conn: &mut SqliteConnection) -> Result<Facts, sqlx::Error> {
    let version: String = sqlx::query_scalar("SELECT sqlite_version()")
        .fetch_one(&mut *conn)
        .await?;
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name LIMIT ?1",
    )
    .bind(MAX_RECORDED_TABLES as i64)
    .fetch_all(&mut *conn)
    .await?;
    let mut table_rows = BTreeMap::new();
    let mut migration_version = 0;
    for name in names {
        let sql = format!("SELECT count(*) FROM {}", ident(&name));
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(sql)).fetch_one(&mut *conn).await?;
        if name == "_sqlx_migrations" {
            migration_version =
                sqlx::query_scalar::<_, Option<i64>>("SELECT max(version) FROM _sqlx_migrations WHERE success")
                    .fetch_one(&mut *conn)
                    .await?
                    .unwrap_or(0);
        }
        table_rows.insert(format!("main.{name}"), n);
    }
    Ok(Facts {
        engine: format!("SQLite {version}"),
        database: String::new(),
        migration_version,
        table_rows,
    })
}
