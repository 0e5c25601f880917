//! `db.backup`: the backup task. The coordinator names the app, the
//! action and the backup; this module finds the app's database in the
//! agent's own config, and the store and keys in its `[backup]` section
//! (neither ever leaves this process), and runs the pipeline of
//! [`super`]:
//!
//! - `create`: dump the database at one exported snapshot, recording the
//!   server, the newest migration and each table's rows in the same
//!   snapshot, and upload it under `<region>/<cluster>/<app>/<id>.cbk`.
//!   The result carries what the catalog records; the coordinator commits
//!   the entry only from a successful result, so an interrupted upload
//!   leaves none.
//! - `validate`: verify the object (size, SHA-256, every sealed chunk),
//!   restore it into a scratch database, run the app's checks, compare the
//!   row counts with the recorded ones, and drop the scratch database.
//! - `restore`: restore into a new scratch database, kept for the operator.
//!
//! Metrics, labelled by app, region and database:
//! `cutover_backup_last_success_timestamp_seconds`, `cutover_backup_bytes`,
//! `cutover_backup_duration_seconds`,
//! `cutover_backup_validation_last_success_timestamp_seconds`, and the
//! counters `cutover_backup_failures_total` and
//! `cutover_backup_validation_failures_total` (labelled by verdict too).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use cutover_shared::backup::{self as catalog, BackupAction, BackupObject};
use cutover_shared::config::{BackupStoreConfig, DatabaseConfig};
use cutover_shared::domain::{ClusterRef, TaskResult, TaskSpec, now_unix_ms};
use cutover_shared::task::outputs::{BackupOutputs, StoredBackup};
use cutover_shared::task::{self, BackupParams, TaskKind, TaskParams};
use tokio::sync::OnceCell;

use super::facts::{self, Snapshot};
use super::seal::BackupKey;
use super::store::ObjectStore;
use super::{BackupError, BackupRecord};
use crate::migrate::{self, DbConfig, Driver};

/// Kinds this module executes (offered only when `[backup]` is configured).
pub const KINDS: &[TaskKind] = &[TaskKind::DbBackup];

/// The connected store and its keys, once the start-up checks ran.
struct Ready {
    store: ObjectStore,
    keys: Vec<BackupKey>,
    /// The bucket's default Object Lock retention, read at start.
    lock: Option<super::store::LockDefault>,
}

/// Runs `db.backup` tasks for this agent's databases.
pub struct BackupRuntime {
    databases: BTreeMap<String, DatabaseConfig>,
    data_dir: PathBuf,
    cluster: ClusterRef,
    cfg: Option<BackupStoreConfig>,
    ready: OnceCell<Ready>,
}

/// A step's failure: a verdict word for the catalog and the message.
type Failure = (String, String);

fn verdict(e: &BackupError) -> &'static str {
    match e {
        BackupError::Corrupt { .. } => "corrupt",
        BackupError::Truncated { .. } => "truncated",
        BackupError::Key { .. } => "wrong-key",
        BackupError::Restore(_) | BackupError::Database(_) => "restore-failed",
        _ => "error",
    }
}

fn fail(e: BackupError) -> Failure {
    (verdict(&e).to_owned(), e.to_string())
}

impl BackupRuntime {
    pub fn new(
        databases: &[DatabaseConfig],
        data_dir: &Path,
        cluster: ClusterRef,
        cfg: Option<BackupStoreConfig>,
    ) -> BackupRuntime {
        BackupRuntime {
            databases: databases.iter().map(|d| (d.app.clone(), d.clone())).collect(),
            data_dir: data_dir.to_owned(),
            cluster,
            cfg,
            ready: OnceCell::new(),
        }
    }

    /// True when this agent has a backup store.
    pub fn configured(&self) -> bool {
        self.cfg.is_some()
    }

    /// Connects to the store and runs the start-up checks, once: the
    /// bucket keeps versions (a warning if not), and no upload a crash
    /// interrupted is left unfinished under this cluster's prefix. Tasks
    /// wait for this, so the clean-up never races a new upload. A failure
    /// is not remembered: the next call tries again.
    pub async fn start(&self) -> Result<(), BackupError> {
        self.ready().await.map(|_| ())
    }

    /// Restores the backup `object` into a new database `name` on
    /// `server`'s PostgreSQL (a drill's scratch copy), checked as every
    /// restore is (checksum, seal), owners dropped.
    pub async fn restore_into(&self, server: &DbConfig, object: &BackupObject, name: &str) -> Result<(), BackupError> {
        let ready = self.ready().await?;
        super::restore_database(server, &ready.store, &record_of(object), &ready.keys, name, false)
            .await
            .map(|_| ())
    }

    async fn ready(&self) -> Result<&Ready, BackupError> {
        let cfg = self
            .cfg
            .as_ref()
            .ok_or_else(|| BackupError::Config("this agent has no [backup] store".into()))?;
        self.ready
            .get_or_try_init(|| async {
                let keys = super::load_keys(cfg)?;
                let store = ObjectStore::connect(cfg).await?;
                // Both checks only warn: a store that cannot answer them
                // (the in-process development store) still takes backups.
                match store.versioning_enabled().await {
                    Ok(true) => {}
                    Ok(false) => tracing::warn!(
                        bucket = %cfg.bucket,
                        "backup bucket does not keep versions: an overwritten or deleted backup cannot be \
                         recovered; enable versioning on it"
                    ),
                    Err(e) => tracing::warn!("backup store: cannot tell whether the bucket keeps versions: {e}"),
                }
                let own = store.key(&format!("{}/{}/", self.cluster.region, self.cluster.cluster));
                match store.abort_incomplete(&own).await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(bucket = %cfg.bucket, "aborted {n} unfinished backup upload(s) left by a crash")
                    }
                    Err(e) => tracing::warn!("backup store: cannot clean up unfinished uploads: {e}"),
                }
                let lock = match store.lock_default().await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!("backup store: cannot read the bucket's Object Lock configuration: {e}");
                        None
                    }
                };
                if let Some(l) = &lock {
                    tracing::info!(
                        bucket = %cfg.bucket,
                        "backups are kept under Object Lock ({}, {} days)",
                        l.mode.as_str(),
                        l.period.as_secs() / 86_400
                    );
                }
                Ok(Ready { store, keys, lock })
            })
            .await
    }

    /// Uploads a migration's pre-migration backup (a local file, taken by
    /// the migration engine) to the store, for the catalog: one copy of
    /// the safety net off the machine.
    pub async fn store_migration_backup(
        &self,
        app: &str,
        db: &DbConfig,
        info: &migrate::BackupInfo,
        operation_id: &str,
    ) -> Result<StoredBackup, BackupError> {
        let ready = self.ready().await?;
        let started = i64::try_from(info.created_unix_ms).unwrap_or(0);
        let id = catalog::backup_id(app, &self.cluster, operation_id, started);
        let name = catalog::object_name(&self.cluster, app, &id);
        let record = super::backup_file(&info.path, &ready.store, &ready.keys, &name).await?;
        let retain_until = lock_in(ready, &record).await;
        let (engine, database, table_rows) = if db.driver == Driver::Sqlite {
            let f = facts::sqlite_facts(&info.path).await?;
            let file = migrate::sqlite_path(db)?
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (f.engine, file, f.table_rows)
        } else {
            ("PostgreSQL".to_owned(), migrate_db_name(db), BTreeMap::new())
        };
        Ok(StoredBackup {
            id,
            object: object_of(record, retain_until),
            database,
            engine,
            migration_version: info.versions.iter().max().copied().unwrap_or(0),
            table_rows,
            started_at_unix_ms: started,
        })
    }

    pub async fn execute(&self, spec: &TaskSpec, progress: &(dyn Fn(String) + Send + Sync)) -> TaskResult {
        let (success, message, outputs) = match self.run(spec, progress).await {
            Ok((msg, out)) => (true, msg, out),
            Err((out, (verdict, msg))) => (
                false,
                msg,
                BackupOutputs {
                    verdict: Some(verdict),
                    ..out
                },
            ),
        };
        TaskResult::finished(&spec.task_id, success, message, outputs.to_wire())
    }

    fn database(&self, app: &str) -> Result<DbConfig, BackupError> {
        let d = self.databases.get(app).ok_or_else(|| {
            BackupError::Config(format!(
                "no database is configured for app {app} on {} (add a [[databases]] entry to the agent's config)",
                self.cluster
            ))
        })?;
        Ok(migrate::resolve(d, &self.data_dir)?)
    }

    /// Takes the backup of `db` to `name`: PostgreSQL dumped at one
    /// exported snapshot; SQLite copied (`VACUUM INTO`, beside the agent's
    /// data, then removed) and the copy uploaded. The facts come from the
    /// same snapshot or copy.
    async fn take(
        &self,
        db: &DbConfig,
        ready: &Ready,
        name: &str,
        id: &str,
        progress: &(dyn Fn(String) + Send + Sync),
    ) -> Result<(BackupRecord, facts::Facts), BackupError> {
        let say = |database: &str, tables: usize| {
            progress(format!(
                "backing up {database} ({tables} tables) to {}",
                ready.store.key(name)
            ))
        };
        if db.driver == Driver::Postgres {
            let mut snapshot = Snapshot::take(db).await?;
            say(&snapshot.facts.database, snapshot.tables.len());
            // The rows are counted while the dump runs: both read the same
            // snapshot, on two server backends.
            let snapshot_id = snapshot.id.clone();
            let (record, counted) = tokio::join!(
                super::backup_at(db, &ready.store, &ready.keys, name, Some(&snapshot_id)),
                snapshot.count_rows()
            );
            let facts = snapshot.facts.clone();
            snapshot.release().await;
            let record = record?;
            if let Err(e) = counted {
                // Uploaded but not described: not a backup the catalog
                // could validate, so it does not stay.
                let _ = ready
                    .store
                    .delete(&record.object.key, record.object.version_id.as_deref())
                    .await;
                return Err(e);
            }
            return Ok((record, facts));
        }
        let stage = self.data_dir.join("backup-stage");
        std::fs::create_dir_all(&stage).map_err(|e| BackupError::Source(format!("{}: {e}", stage.display())))?;
        let copy = stage.join(format!("{id}.sqlite"));
        let _ = std::fs::remove_file(&copy);
        let taken = async {
            migrate::sqlite_copy(db, &copy).await?;
            let mut f = facts::sqlite_facts(&copy).await?;
            f.database = migrate::sqlite_path(db)?
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            say(&f.database, f.table_rows.len());
            Ok::<_, BackupError>((super::backup_file(&copy, &ready.store, &ready.keys, name).await?, f))
        }
        .await;
        let _ = std::fs::remove_file(&copy);
        taken
    }

    async fn run(
        &self,
        spec: &TaskSpec,
        progress: &(dyn Fn(String) + Send + Sync),
    ) -> Result<(String, BackupOutputs), (BackupOutputs, Failure)> {
        let none = |f: Failure| (BackupOutputs::default(), f);
        let p = match TaskParams::from_wire(&spec.kind, &spec.params) {
            Ok(TaskParams::DbBackup(p)) => p,
            Ok(other) => return Err(none(("error".into(), format!("{} is not a backup task", other.kind())))),
            Err(e) => return Err(none(("error".into(), e.to_string()))),
        };
        catalog::validate_backup_id(&p.backup_id).map_err(|e| none(("error".into(), e.to_string())))?;
        let db = self.database(&p.app.app).map_err(|e| none(fail(e)))?;
        let ready = self.ready().await.map_err(|e| none(fail(e)))?;
        let labels = Labels::new(&p.app.app, &self.cluster, &db);
        match p.action {
            BackupAction::Create => self.create(&p, &db, ready, &labels, progress).await,
            BackupAction::Delete => Ok(delete(&p, ready, progress).await),
            BackupAction::Validate | BackupAction::Restore | BackupAction::RestorePrimary => {
                let checks = task::attached_spec(&spec.params)
                    .map(|s| s.migration_checks)
                    .unwrap_or_default();
                self.read(&p, &db, ready, &labels, &checks, &spec.task_id, progress)
                    .await
            }
        }
    }

    async fn create(
        &self,
        p: &BackupParams,
        db: &DbConfig,
        ready: &Ready,
        labels: &Labels,
        progress: &(dyn Fn(String) + Send + Sync),
    ) -> Result<(String, BackupOutputs), (BackupOutputs, Failure)> {
        let started_ms = now_unix_ms();
        let started = Instant::now();
        let failed = |e: BackupError| {
            metrics::counter!("cutover_backup_failures_total", &labels.0[..]).increment(1);
            (BackupOutputs::default(), fail(e))
        };
        let name = catalog::object_name(&self.cluster, &p.app.app, &p.backup_id);
        let (record, facts) = self
            .take(db, ready, &name, &p.backup_id, progress)
            .await
            .map_err(failed)?;
        let elapsed = started.elapsed();
        let retain_until = lock_in(ready, &record).await;
        metrics::gauge!("cutover_backup_last_success_timestamp_seconds", &labels.0[..])
            .set(now_unix_ms() as f64 / 1000.0);
        metrics::gauge!("cutover_backup_bytes", &labels.0[..]).set(record.object.size as f64);
        metrics::gauge!("cutover_backup_duration_seconds", &labels.0[..]).set(elapsed.as_secs_f64());
        let msg = format!(
            "backed up {} ({} dumped, {} stored, {} part(s)) in {:.1} s as {}",
            facts.database,
            bytes(record.dump_bytes),
            bytes(record.object.size),
            record.object.parts,
            elapsed.as_secs_f64(),
            p.backup_id
        );
        Ok((
            msg,
            BackupOutputs {
                object: Some(object_of(record, retain_until)),
                database: Some(facts.database),
                engine: Some(facts.engine),
                migration_version: Some(facts.migration_version),
                table_rows: Some(facts.table_rows),
                started_at_unix_ms: Some(started_ms),
                duration_ms: Some(elapsed.as_millis() as u64),
                ..Default::default()
            },
        ))
    }

    /// Validate (restore into a scratch database, check, drop it), restore
    /// (into a scratch database that is kept), or restore onto the primary
    /// (into a new database, checked like a validation, which then takes
    /// the primary's place; the replaced one is kept under another name).
    #[allow(clippy::too_many_arguments)]
    async fn read(
        &self,
        p: &BackupParams,
        db: &DbConfig,
        ready: &Ready,
        labels: &Labels,
        checks: &[String],
        task_id: &str,
        progress: &(dyn Fn(String) + Send + Sync),
    ) -> Result<(String, BackupOutputs), (BackupOutputs, Failure)> {
        let started = Instant::now();
        let validate = p.action == BackupAction::Validate;
        let timed = |out: BackupOutputs| BackupOutputs {
            duration_ms: Some(started.elapsed().as_millis() as u64),
            ..out
        };
        let failed = |(verdict, msg): Failure| {
            if validate {
                metrics::counter!(
                    "cutover_backup_validation_failures_total",
                    &labels.with("verdict", &verdict)[..]
                )
                .increment(1);
            }
            (timed(BackupOutputs::default()), (verdict, msg))
        };
        let object = p
            .object
            .clone()
            .ok_or_else(|| failed(("error".into(), "the task names no backup object".into())))?;
        let record = record_of(&object);
        let onto_primary = p.action == BackupAction::RestorePrimary;
        let scratch = scratch_name(&p.app.app, p.action.as_str(), task_id);
        progress(format!(
            "checking {} and restoring it into database {scratch}",
            p.backup_id
        ));
        let copy = restore_copy(db, ready, &record, &scratch, onto_primary)
            .await
            .map_err(|e| failed(fail(e)))?;
        if onto_primary {
            progress(format!("running {} check(s) and comparing row counts", checks.len()));
            if let Err(f) = check_copy(&copy, checks, &p.table_rows).await {
                copy.remove(db).await;
                return Err(failed(f));
            }
            let keep = scratch_name(&p.app.app, "replaced", task_id);
            progress(format!(
                "putting {} in the primary's place; the replaced data stays as {keep}",
                copy.name()
            ));
            let (replaced, described) = match replace_primary(db, &copy, &keep).await {
                Ok(r) => r,
                Err(e) => {
                    copy.remove(db).await;
                    return Err(failed(fail(e)));
                }
            };
            return Ok((
                format!(
                    "restored {} onto the primary; the data it replaced is kept as {described} (drop it when done)",
                    p.backup_id
                ),
                timed(BackupOutputs {
                    replaced: Some(replaced),
                    ..Default::default()
                }),
            ));
        }
        if !validate {
            return Ok((
                format!("restored {} into {} (drop it when done)", p.backup_id, copy.name()),
                timed(BackupOutputs {
                    scratch: Some(copy.id()),
                    ..Default::default()
                }),
            ));
        }
        progress(format!("running {} check(s) and comparing row counts", checks.len()));
        let verdict = check_copy(&copy, checks, &p.table_rows).await;
        copy.remove(db).await;
        verdict.map_err(failed)?;
        metrics::gauge!(
            "cutover_backup_validation_last_success_timestamp_seconds",
            &labels.0[..]
        )
        .set(now_unix_ms() as f64 / 1000.0);
        Ok((
            format!(
                "{} restores: checksum, decryption and restore passed, {} check(s) passed, {} table(s) have the \
                 recorded row counts ({:.1} s)",
                p.backup_id,
                checks.len(),
                p.table_rows.len(),
                started.elapsed().as_secs_f64()
            ),
            timed(BackupOutputs {
                verdict: Some("passed".into()),
                ..Default::default()
            }),
        ))
    }
}

/// Deletes the objects of the backups retention let go. One the store
/// refuses (Object Lock) is kept and named; the task still succeeds, so
/// the catalog drops exactly the deleted ones.
async fn delete(p: &BackupParams, ready: &Ready, progress: &(dyn Fn(String) + Send + Sync)) -> (String, BackupOutputs) {
    progress(format!("deleting {} backup(s)", p.delete.len()));
    let mut deleted = Vec::new();
    let mut kept = BTreeMap::new();
    for (id, object) in &p.delete {
        match ready.store.delete(&object.key, object.version_id.as_deref()).await {
            Ok(()) => deleted.push(id.clone()),
            Err(e) => {
                kept.insert(id.clone(), e.to_string());
            }
        }
    }
    let msg = if kept.is_empty() {
        format!("deleted {} backup(s)", deleted.len())
    } else {
        format!(
            "deleted {} backup(s); the store kept {}: {}",
            deleted.len(),
            kept.len(),
            kept.values().next().cloned().unwrap_or_default()
        )
    };
    (
        msg,
        BackupOutputs {
            deleted: Some(deleted),
            kept: Some(kept),
            ..Default::default()
        },
    )
}

/// Object Lock makes a backup immutable until the returned time;
/// retention leaves it alone meanwhile. A bucket with a default retention
/// applies it to new objects, but not every store does so for multipart
/// uploads: one the store left unlocked is locked here for the bucket's
/// default period. Failing that, the backup still stands, unlocked.
async fn lock_in(ready: &Ready, record: &BackupRecord) -> Option<i64> {
    let (key, version) = (&record.object.key, record.object.version_id.as_deref());
    let head = match ready.store.head(key, version).await {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!("backup: {e}");
            return None;
        }
    };
    if head.retain_until_unix_ms.is_some() {
        return head.retain_until_unix_ms;
    }
    let lock = ready.lock.as_ref()?;
    let until = now_unix_ms().saturating_add(i64::try_from(lock.period.as_millis()).unwrap_or(i64::MAX));
    match ready.store.retain(key, version, lock.mode.clone(), until).await {
        Ok(()) => Some(until),
        Err(e) => {
            tracing::warn!("backup: the bucket has Object Lock, but {e}");
            None
        }
    }
}

/// What the catalog records of an upload.
fn object_of(record: BackupRecord, retain_until_unix_ms: Option<i64>) -> BackupObject {
    BackupObject {
        key: record.object.key,
        version_id: record.object.version_id,
        size: record.object.size,
        sha256: record.object.sha256,
        parts: record.object.parts,
        key_id: record.key_id,
        dump_bytes: record.dump_bytes,
        retain_until_unix_ms,
    }
}

/// A restored copy: a scratch database on the primary's PostgreSQL
/// server, or a SQLite file beside the database's.
enum Copy {
    Pg { cfg: DbConfig, name: String },
    Sqlite { cfg: DbConfig, path: PathBuf },
}

impl Copy {
    fn cfg(&self) -> &DbConfig {
        match self {
            Copy::Pg { cfg, .. } | Copy::Sqlite { cfg, .. } => cfg,
        }
    }

    /// The scratch database's name, or the file's path.
    fn id(&self) -> String {
        match self {
            Copy::Pg { name, .. } => name.clone(),
            Copy::Sqlite { path, .. } => path.display().to_string(),
        }
    }

    /// What the operator finds it by.
    fn name(&self) -> String {
        match self {
            Copy::Pg { name, .. } => format!("database {name} on the primary's server"),
            Copy::Sqlite { path, .. } => format!("SQLite file {}", path.display()),
        }
    }

    async fn remove(&self, db: &DbConfig) {
        match self {
            Copy::Pg { name, .. } => {
                if let Err(e) = super::drop_scratch(db, name).await {
                    tracing::warn!("could not drop the scratch database {name}: {e}");
                }
            }
            Copy::Sqlite { path, .. } => {
                for suffix in ["", "-wal", "-shm"] {
                    let mut p = path.as_os_str().to_owned();
                    p.push(suffix);
                    let _ = std::fs::remove_file(PathBuf::from(p));
                }
            }
        }
    }
}

/// Restores `record` (verified first) into a new copy named `scratch`.
/// `keep_owners`: see [`super::restore_database`].
async fn restore_copy(
    db: &DbConfig,
    ready: &Ready,
    record: &BackupRecord,
    scratch: &str,
    keep_owners: bool,
) -> Result<Copy, BackupError> {
    if db.driver == Driver::Postgres {
        let url = super::restore_database(db, &ready.store, record, &ready.keys, scratch, keep_owners).await?;
        return Ok(Copy::Pg {
            cfg: DbConfig { url, ..db.clone() },
            name: scratch.to_owned(),
        });
    }
    let live = migrate::sqlite_path(db)?;
    let path = live
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join(format!("{scratch}.sqlite"));
    super::restore_file(&ready.store, record, &ready.keys, &path).await?;
    let url = migrate::DbUrl::new(format!("sqlite://{}", path.display()));
    Ok(Copy::Sqlite {
        cfg: DbConfig { url, ..db.clone() },
        path,
    })
}

/// Puts a checked restored copy in the primary's place and returns where
/// the replaced data is kept (its database name or file path, and how to
/// find it). PostgreSQL: the copy's database takes the primary's name in
/// one transaction and the primary is renamed `keep`. SQLite: the live
/// file is copied to `<keep>.sqlite` beside it, its content replaced with
/// the copy's in one transaction (running processes keep the file open,
/// so it is not swapped under them), and the copy removed.
async fn replace_primary(db: &DbConfig, copy: &Copy, keep: &str) -> Result<(String, String), BackupError> {
    match copy {
        Copy::Pg { name, .. } => {
            migrate::swap_databases(db, name, keep).await?;
            Ok((keep.to_owned(), format!("database {keep}")))
        }
        Copy::Sqlite { path, .. } => {
            let live = migrate::sqlite_path(db)?;
            let kept = live
                .parent()
                .unwrap_or_else(|| Path::new("."))
                .join(format!("{keep}.sqlite"));
            migrate::sqlite_copy(db, &kept).await?;
            if let Err(e) = migrate::sqlite_replace(db, path).await {
                // Nothing was replaced: nothing to keep.
                let _ = std::fs::remove_file(&kept);
                return Err(e.into());
            }
            copy.remove(db).await;
            Ok((kept.display().to_string(), format!("SQLite file {}", kept.display())))
        }
    }
}

/// Runs the app's checks on a restored copy and compares its row counts
/// with those recorded at backup time.
async fn check_copy(copy: &Copy, checks: &[String], recorded: &BTreeMap<String, i64>) -> Result<(), Failure> {
    migrate::run_checks(copy.cfg(), checks)
        .await
        .map_err(|e| ("check-failed".to_owned(), e))?;
    let rows = match copy {
        Copy::Pg { cfg, .. } => facts::table_rows(cfg).await,
        Copy::Sqlite { path, .. } => facts::sqlite_facts(path).await.map(|f| f.table_rows),
    }
    .map_err(fail)?;
    let differ: Vec<String> = recorded
        .iter()
        .filter(|(t, n)| rows.get(*t) != Some(n))
        .map(|(t, n)| {
            format!(
                "{t}: recorded {n}, restored {}",
                rows.get(t).map_or("no table".to_owned(), |r| r.to_string())
            )
        })
        .collect();
    if differ.is_empty() {
        Ok(())
    } else {
        Err((
            "rows-differ".into(),
            format!("row counts differ: {}", differ.join("; ")),
        ))
    }
}

/// The scratch database of a validate, restore or drill task: `<app>_<what>_<8
/// hex of the task id>`, a valid PostgreSQL name whatever the app is called.
pub(crate) fn scratch_name(app: &str, what: &str, task_id: &str) -> String {
    use sha2::Digest;
    let h = cutover_shared::release::hex(&sha2::Sha256::digest(task_id.as_bytes()));
    let what = what.replace('-', "_");
    // 63 bytes at most: two `_` and 8 hex digits besides the two names.
    let app: String = app.replace('-', "_").chars().take(63 - 10 - what.len()).collect();
    format!("{app}_{what}_{}", &h[..8])
}

fn bytes(n: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    if n as f64 >= MIB {
        format!("{:.1} MiB", n as f64 / MIB)
    } else {
        format!("{n} B")
    }
}

/// The labels every backup metric carries.
struct Labels(Vec<(&'static str, String)>);

impl Labels {
    fn new(app: &str, cluster: &ClusterRef, db: &DbConfig) -> Labels {
        let database = migrate_db_name(db);
        Labels(vec![
            ("app", app.to_owned()),
            ("region", cluster.region.clone()),
            ("database", database),
        ])
    }

    fn with(&self, k: &'static str, v: &str) -> Vec<(&'static str, String)> {
        let mut l = self.0.clone();
        l.push((k, v.to_owned()));
        l
    }
}

/// The database's name from its URL's path (never the URL itself).
fn migrate_db_name(db: &DbConfig) -> String {
    url::Url::parse(db.url.expose())
        .ok()
        .map(|u| u.path().trim_start_matches('/').to_owned())
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| db.app.clone())
}

/// What the store needs to fetch and check a cataloged object.
fn record_of(object: &BackupObject) -> BackupRecord {
    BackupRecord {
        object: super::store::Uploaded {
            key: object.key.clone(),
            version_id: object.version_id.clone(),
            size: object.size,
            sha256: object.sha256.clone(),
            parts: object.parts,
        },
        key_id: object.key_id.clone(),
        dump_bytes: object.dump_bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_names_are_valid_database_names() {
        let n = scratch_name("shop-eu", BackupAction::Validate.as_str(), "op-abc-1");
        assert!(n.starts_with("shop_eu_validate_"), "{n}");
        assert!(n.len() <= 63);
        assert!(
            n.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        );
        let long = scratch_name(&"a".repeat(63), BackupAction::RestorePrimary.as_str(), "t");
        assert!(long.len() <= 63, "{long}");
        assert!(long.contains("_restore_primary_"), "{long}");
    }
}
