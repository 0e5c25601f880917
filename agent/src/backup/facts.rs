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
    /// Without row counts until [`Snapshot::count_rows`].
    pub facts: Facts,
    /// The tables whose rows are counted.
    pub tables: Vec<(String, String)>,
    redact: crate::migrate::DbUrl,
}

impl Snapshot {
    /// Opens a repeatable-read transaction on `db`, exports its snapshot
    /// and reads the cheap facts in it (server, database, migration,
    /// tables); the row counts come from [`Snapshot::count_rows`], which
    /// can run while the dump does: they read the same snapshot.
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
        let (facts, tables) = read_facts(&mut conn)
            .await
            .map_err(|e| err("reading the database", e))?;
        Ok(Snapshot {
            conn,
            id,
            facts,
            tables,
            redact: db.url.clone(),
        })
    }

    /// Counts every table's rows in the snapshot, into `facts`.
    pub async fn count_rows(&mut self) -> Result<(), BackupError> {
        self.facts.table_rows = count_rows(&mut self.conn, &self.tables)
            .await
            .map_err(|e| BackupError::Source(crate::migrate::redact(&self.redact, &format!("counting rows: {e}"))))?;
        Ok(())
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
    let rows = match read_facts(&mut conn).await {
        Ok((_, tables)) => count_rows(&mut conn, &tables).await,
        Err(e) => Err(e),
    };
    let _ = conn.close().await;
    rows.map_err(|e| err("counting the restored rows", e))
}

/// `"name"` with embedded quotes doubled: a safe identifier.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The facts but the row counts, and the tables to count.
async fn read_facts(conn: &mut PgConnection) -> Result<(Facts, Vec<(String, String)>), sqlx::Error> {
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
    let tables = tables
        .into_iter()
        .map(|t| Ok((t.try_get(0)?, t.try_get(1)?)))
        .collect::<Result<Vec<(String, String)>, sqlx::Error>>()?;
    let facts = Facts {
        engine: format!("PostgreSQL {}", version.split_whitespace().next().unwrap_or(&version)),
        database,
        migration_version,
        table_rows: BTreeMap::new(),
    };
    Ok((facts, tables))
}

/// `schema.table` → rows, for each of `tables`.
async fn count_rows(
    conn: &mut PgConnection,
    tables: &[(String, String)],
) -> Result<BTreeMap<String, i64>, sqlx::Error> {
    let mut table_rows = BTreeMap::new();
    for (schema, name) in tables {
        let sql = format!("SELECT count(*) FROM {}.{}", ident(schema), ident(name));
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(sql)).fetch_one(&mut *conn).await?;
        table_rows.insert(format!("{schema}.{name}"), n);
    }
    Ok(table_rows)
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
