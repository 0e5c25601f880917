//! Backups of an app's databases to an S3-protocol object store, run by the
//! agent next to the database (issue: backups to S3).
//!
//! A backup is one pipeline, streamed end to end with bounded memory:
//!
//! ```text
//! pg_dump -Fc ─▶ zstd ─▶ seal (AES-256-GCM, chunked) ─▶ parts ─▶ S3 multipart upload
//! ```
//!
//! The dump, compression and sealing run on a blocking thread and hand
//! parts over a channel of [`PART_QUEUE`] slots to the uploader, so at most
//! a few parts are in memory whatever the database size, and nothing is
//! written to local disk. The SHA-256 of the whole object is computed on
//! the way and recorded; a download is hashed again and compared.
//!
//! [`verify`] downloads, checks the SHA-256, opens every sealed chunk and
//! decompresses to the end, without writing anything. A restore into a new
//! database ([`restore_scratch`], [`restore_database`]) is one pass too:
//! each chunk is authenticated before `pg_restore` sees its bytes, which it
//! applies in one transaction, and the object's size, SHA-256 and dump
//! length are checked at the end. An object that fails any check is named
//! (corrupt, truncated, wrong key) and its database dropped: it is never
//! restored, not even in part.
//!
//! The encryption keys come from the agent's config and never leave it; a
//! backup's header names the key id that sealed it (see [`seal`]).
//!
//! [`task`] runs the `db.backup` task (create, validate, restore, restore
//! onto the primary, delete) on top of these; the coordinator keeps the
//! catalog and the schedules.

pub mod facts;
pub mod seal;
pub mod store;
pub mod task;

use std::io::{self, Read, Write};
use std::process::Stdio;

use cutover_shared::config::BackupStoreConfig;
use tokio::sync::mpsc;

use crate::migrate::{DbConfig, DbUrl, Driver, MigrateError, pg_tool_command};
use seal::{BackupKey, Opener, SealError, Sealer};
use store::{ObjectStore, Piece, Uploaded};

/// Parts queued between the dump and the upload.
pub const PART_QUEUE: usize = 2;
/// The most of the source read at a time (a pipe gives at most 64 KiB).
const READ_BUFFER: usize = 256 * 1024;
/// zstd level: 3 is zstd's default, fast enough to keep up with pg_dump.
const ZSTD_LEVEL: i32 = 3;

/// Why a backup, validation or restore failed. Messages never carry a
/// connection string, a credential or a key.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("backup config: {0}")]
    Config(String),
    #[error("object store: {0}")]
    Store(String),
    #[error("backup source: {0}")]
    Source(String),
    #[error("backup {key} is corrupt: {why}")]
    Corrupt { key: String, why: String },
    #[error("backup {key} is truncated: {why}")]
    Truncated { key: String, why: String },
    #[error("backup {key} cannot be opened: {why}")]
    Key { key: String, why: String },
    #[error("restore: {0}")]
    Restore(String),
    #[error(transparent)]
    Database(#[from] MigrateError),
}

/// The keys of a store config: the first seals, all open.
pub fn load_keys(cfg: &BackupStoreConfig) -> Result<Vec<BackupKey>, BackupError> {
    cfg.keys
        .iter()
        .map(|k| BackupKey::from_file(&k.id, &k.file).map_err(|e| BackupError::Config(e.to_string())))
        .collect()
}

/// What a finished backup is, for the catalog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupRecord {
    pub object: Uploaded,
    /// The key id that sealed it.
    pub key_id: String,
    /// Bytes of the dump before compression and sealing.
    pub dump_bytes: u64,
}

/// Cuts what is written to it into parts of `size` and sends them.
struct PartWriter {
    tx: mpsc::Sender<Piece>,
    size: usize,
    buf: Vec<u8>,
}

impl Write for PartWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(self.size - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == self.size {
            let part = std::mem::replace(&mut self.buf, Vec::with_capacity(self.size));
            self.tx
                .blocking_send(Piece::Part(part))
                .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped"))?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl PartWriter {
    fn finish(mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            let part = std::mem::take(&mut self.buf);
            self.tx
                .blocking_send(Piece::Part(part))
                .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped"))?;
        }
        self.tx
            .blocking_send(Piece::End)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped"))
    }
}

/// Counts what passes through.
struct Counting<R> {
    inner: R,
    n: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n += n as u64;
        Ok(n)
    }
}

/// Backs up `db` (PostgreSQL) to `name` in `store`, sealed with `keys[0]`.
pub async fn backup(
    db: &DbConfig,
    store: &ObjectStore,
    keys: &[BackupKey],
    name: &str,
) -> Result<BackupRecord, BackupError> {
    backup_at(db, store, keys, name, None).await
}

/// [`backup`], dumping the exported snapshot `snapshot` (see
/// [`facts::Snapshot`]) when given.
pub async fn backup_at(
    db: &DbConfig,
    store: &ObjectStore,
    keys: &[BackupKey],
    name: &str,
    snapshot: Option<&str>,
) -> Result<BackupRecord, BackupError> {
    let key = keys
        .first()
        .ok_or_else(|| BackupError::Config("no encryption key".into()))?
        .clone();
    if db.driver != Driver::Postgres {
        return Err(BackupError::Config(format!(
            "{} databases cannot be backed up to the object store yet",
            db.driver
        )));
    }
    let (mut cmd, pass) = pg_tool_command(db, "pg_dump", None).await?;
    cmd.arg("--format=custom")
        .arg("--compress=0")
        .arg(format!("--lock-wait-timeout={}", db.lock_timeout.as_millis()))
        .args(snapshot.map(|s| format!("--snapshot={s}")))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let object_key = store.key(name);
    let (tx, rx) = mpsc::channel(PART_QUEUE);
    let part_size = store.part_size();
    let key_id = key.id.clone();
    let produce = tokio::task::spawn_blocking(move || -> Result<u64, String> {
        let _pass = pass;
        let fail = |why: String| {
            let _ = tx.blocking_send(Piece::Failed(why.clone()));
            why
        };
        let mut child = cmd.spawn().map_err(|e| fail(format!("cannot run pg_dump: {e}")))?;
        let stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        let err_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let mut input = Counting { inner: stdout, n: 0 };
        let piped = seal_into_parts(&mut input, &tx, part_size, &key);
        if piped.is_err() {
            let _ = child.kill();
        }
        let status = child.wait().map_err(|e| fail(format!("waiting for pg_dump: {e}")))?;
        let errors = err_reader.join().unwrap_or_default();
        let parts = piped.map_err(|e| fail(format!("streaming the dump: {e}")))?;
        // Only a dump that exited cleanly is a backup: the last part is
        // held back until then, so a failed dump never completes an upload.
        if !status.success() {
            return Err(fail(format!("pg_dump failed ({status}): {}", errors.trim())));
        }
        parts
            .finish()
            .map_err(|e| fail(format!("handing over the last part: {e}")))?;
        Ok(input.n)
    });
    let uploaded = store.upload(&object_key, rx).await;
    let produced = produce
        .await
        .map_err(|e| BackupError::Source(format!("the dump thread failed: {e}")))?;
    let dump_bytes = produced.map_err(|why| BackupError::Source(db_clean(db, &why)))?;
    let object = uploaded?;
    Ok(BackupRecord {
        object,
        key_id,
        dump_bytes,
    })
}

/// Compresses and seals everything `input` yields into parts of
/// `part_size` sent down `tx`, except the last, which the caller hands
/// over ([`PartWriter::finish`]) once it knows the source ended well.
fn seal_into_parts(
    input: &mut dyn Read,
    tx: &mpsc::Sender<Piece>,
    part_size: usize,
    key: &BackupKey,
) -> io::Result<PartWriter> {
    let parts = PartWriter {
        tx: tx.clone(),
        size: part_size,
        buf: Vec::with_capacity(part_size),
    };
    let mut z = zstd::stream::write::Encoder::new(Sealer::new(parts, key)?, ZSTD_LEVEL)?;
    // Whole pipe reads (up to 64 KiB) into zstd, rather than io::copy's
    // 8 KiB pieces: fewer, fuller compression calls.
    let mut buf = vec![0u8; READ_BUFFER];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        z.write_all(&buf[..n])?;
    }
    z.finish()?.finish()
}

/// Backs up the file at `path` (a consistent SQLite copy) to `name` in
/// `store`, sealed with `keys[0]`.
pub async fn backup_file(
    path: &std::path::Path,
    store: &ObjectStore,
    keys: &[BackupKey],
    name: &str,
) -> Result<BackupRecord, BackupError> {
    let key = keys
        .first()
        .ok_or_else(|| BackupError::Config("no encryption key".into()))?
        .clone();
    let file =
        std::fs::File::open(path).map_err(|e| BackupError::Source(format!("opening {}: {e}", path.display())))?;
    let (tx, rx) = mpsc::channel(PART_QUEUE);
    let part_size = store.part_size();
    let key_id = key.id.clone();
    let produce = tokio::task::spawn_blocking(move || -> Result<u64, String> {
        let mut input = Counting { inner: file, n: 0 };
        let sealed = seal_into_parts(&mut input, &tx, part_size, &key).and_then(PartWriter::finish);
        if let Err(e) = sealed {
            let why = format!("streaming the copy: {e}");
            let _ = tx.blocking_send(Piece::Failed(why.clone()));
            return Err(why);
        }
        Ok(input.n)
    });
    let uploaded = store.upload(&store.key(name), rx).await;
    let dump_bytes = produce
        .await
        .map_err(|e| BackupError::Source(format!("the copy thread failed: {e}")))?
        .map_err(BackupError::Source)?;
    Ok(BackupRecord {
        object: uploaded?,
        key_id,
        dump_bytes,
    })
}

/// Restores a backup of a file (SQLite) to `to`, which must not exist:
/// written beside it in one pass (checked as [`restore_database`] checks),
/// synced, then renamed into place only once every check passed, so a
/// failure leaves nothing at `to`.
pub async fn restore_file(
    store: &ObjectStore,
    record: &BackupRecord,
    keys: &[BackupKey],
    to: &std::path::Path,
) -> Result<(), BackupError> {
    if to.exists() {
        return Err(BackupError::Restore(format!("{} already exists", to.display())));
    }
    let partial = to.with_extension("partial");
    let target = partial.clone();
    let written = with_plaintext(store, record, keys, move |plain| {
        let mut f = std::fs::File::create(&target)?;
        let n = io::copy(plain, &mut f)?;
        f.sync_all()?;
        Ok(n)
    })
    .await
    .and_then(|n| dump_length(record, n));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, to).map_err(|e| BackupError::Restore(format!("placing {}: {e}", to.display())))
}

/// Removes the connection string from a tool's message.
fn db_clean(db: &DbConfig, msg: &str) -> String {
    crate::migrate::redact(&db.url, msg)
}

/// Feeds an object's chunks to a blocking reader.
struct ChannelReader {
    rx: mpsc::Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    at: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.at == self.chunk.len() {
            match self.rx.blocking_recv() {
                Some(c) => {
                    self.chunk = c;
                    self.at = 0;
                }
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.chunk.len() - self.at);
        out[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Downloads `record`'s object and runs `consume` on its plaintext (opened
/// and decompressed) on a blocking thread. The object's size and SHA-256
/// are checked against the record once the download ends. A damaged
/// object counts in `cutover_backup_corrupt_total`, which alerts.
async fn with_plaintext<T: Send + 'static>(
    store: &ObjectStore,
    record: &BackupRecord,
    keys: &[BackupKey],
    consume: impl FnOnce(&mut dyn Read) -> io::Result<T> + Send + 'static,
) -> Result<T, BackupError> {
    let r = read_object(store, record, keys, consume).await;
    if let Err(BackupError::Corrupt { .. } | BackupError::Truncated { .. }) = &r {
        metrics::counter!("cutover_backup_corrupt_total").increment(1);
    }
    r
}

async fn read_object<T: Send + 'static>(
    store: &ObjectStore,
    record: &BackupRecord,
    keys: &[BackupKey],
    consume: impl FnOnce(&mut dyn Read) -> io::Result<T> + Send + 'static,
) -> Result<T, BackupError> {
    let key = record.object.key.clone();
    let (tx, rx) = mpsc::channel(4);
    let keys = keys.to_vec();
    let reader = tokio::task::spawn_blocking(move || -> io::Result<T> {
        let input = ChannelReader {
            rx,
            chunk: Vec::new(),
            at: 0,
        };
        let opener = Opener::new(input, &keys)?;
        let mut z = zstd::stream::read::Decoder::new(opener)?;
        let out = consume(&mut z)?;
        // Read to the very end so the last chunk's flag is checked.
        io::copy(&mut z, &mut io::sink())?;
        Ok(out)
    });
    let downloaded = store.download(&key, record.object.version_id.as_deref(), tx).await;
    let read = reader
        .await
        .map_err(|e| BackupError::Restore(format!("the restore thread failed: {e}")))?;
    let named = |e: io::Error| match SealError::of(&e) {
        Some(SealError::Truncated) => BackupError::Truncated {
            key: key.clone(),
            why: e.to_string(),
        },
        Some(SealError::UnknownKey(_) | SealError::WrongKey(_)) => BackupError::Key {
            key: key.clone(),
            why: e.to_string(),
        },
        Some(_) => BackupError::Corrupt {
            key: key.clone(),
            why: e.to_string(),
        },
        // Not the seal: the consumer's own failure (pg_restore), or the
        // decompressor refusing bytes that authenticated, which cannot
        // happen with an intact key.
        None => BackupError::Restore(e.to_string()),
    };
    let Some((size, sha)) = downloaded? else {
        // The reader stopped before the end: its error is the verdict.
        return match read {
            Err(e) => Err(named(e)),
            Ok(_) => Err(BackupError::Restore(
                "the reader stopped before the end of the object".into(),
            )),
        };
    };
    // The checksum is the first verdict once the whole object came: a
    // changed object is corrupt whatever else went wrong reading it.
    if size < record.object.size {
        return Err(BackupError::Truncated {
            key,
            why: format!("{size} of {} bytes", record.object.size),
        });
    }
    if sha != record.object.sha256 || size != record.object.size {
        return Err(BackupError::Corrupt {
            key,
            why: format!("SHA-256 {sha}, recorded {}", record.object.sha256),
        });
    }
    read.map_err(named)
}

/// What validating a backup found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// Bytes of the dump inside.
    pub dump_bytes: u64,
}

/// Downloads, checks the SHA-256, opens and decompresses the whole backup
/// without restoring it.
pub async fn verify(store: &ObjectStore, record: &BackupRecord, keys: &[BackupKey]) -> Result<Verified, BackupError> {
    let dump_bytes = with_plaintext(store, record, keys, |r| io::copy(r, &mut io::sink())).await?;
    dump_length(record, dump_bytes)?;
    Ok(Verified { dump_bytes })
}

/// The dump inside is as long as the record says.
fn dump_length(record: &BackupRecord, dump_bytes: u64) -> Result<(), BackupError> {
    if dump_bytes != record.dump_bytes {
        return Err(BackupError::Corrupt {
            key: record.object.key.clone(),
            why: format!("{dump_bytes} dump bytes inside, recorded {}", record.dump_bytes),
        });
    }
    Ok(())
}

/// Restores a backup into a new scratch database next to `db`'s, and
/// returns that database's URL (the caller drops it with [`drop_scratch`]).
/// One pass over the object: every chunk is authenticated before
/// `pg_restore` sees its bytes, pg_restore runs in one transaction, and
/// the whole object's size, SHA-256 and dump length are checked at the end;
/// an object that fails any of them leaves no database behind.
pub async fn restore_scratch(
    db: &DbConfig,
    store: &ObjectStore,
    record: &BackupRecord,
    keys: &[BackupKey],
    scratch: &str,
) -> Result<DbUrl, BackupError> {
    restore_database(db, store, record, keys, scratch, false).await
}

/// [`restore_scratch`], optionally keeping the dump's object owners and
/// privileges (a database that will replace the primary must: its app's
/// role owns what it owned before). Keeping owners needs the agent's role
/// to be that owner, or a superuser.
pub async fn restore_database(
    db: &DbConfig,
    store: &ObjectStore,
    record: &BackupRecord,
    keys: &[BackupKey],
    scratch: &str,
    keep_owners: bool,
) -> Result<DbUrl, BackupError> {
    // create_database refuses a name that is not a plain database name.
    crate::migrate::create_database(db, scratch).await?;
    let (mut cmd, pass) = pg_tool_command(db, "pg_restore", Some(scratch)).await?;
    if !keep_owners {
        cmd.arg("--no-owner");
    }
    cmd.arg("--exit-on-error")
        .arg("--single-transaction")
        .arg(format!("--dbname={scratch}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let url = db.url.clone();
    let restored = with_plaintext(store, record, keys, move |plain| {
        let _pass = pass;
        let mut child = cmd.spawn()?;
        let mut stdin = child.stdin.take().expect("piped");
        let copied = io::copy(plain, &mut stdin);
        drop(stdin);
        let out = child.wait_with_output()?;
        // The seal's verdict first: pg_restore failing on a cut stream is
        // its consequence.
        let copied = copied?;
        if !out.status.success() {
            return Err(io::Error::other(crate::migrate::redact(
                &url,
                &format!(
                    "pg_restore failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            )));
        }
        Ok(copied)
    })
    .await
    .and_then(|n| dump_length(record, n));
    if let Err(e) = restored {
        let _ = crate::migrate::drop_database(db, scratch).await;
        return Err(e);
    }
    Ok(crate::migrate::database_url(db, scratch)?)
}

/// Drops a scratch database made by [`restore_scratch`].
pub async fn drop_scratch(db: &DbConfig, scratch: &str) -> Result<(), BackupError> {
    Ok(crate::migrate::drop_database(db, scratch).await?)
}
