//! The Raft log, vote and commit marker, stored durably in redb.
//!
//! `append` returns as soon as the entries are readable, and tells openraft
//! they are flushed only once a redb write transaction holding them has
//! committed with fsync, as openraft's storage contract asks. In between
//! they are held in memory (`unflushed`), where readers find them: so the
//! leader sends new entries to its followers while its own fsync runs,
//! instead of after it (`bench trace` showed the leader's fsync and the
//! follower's running one after the other, a quarter of a write's time).
//!
//! One writer thread per log commits, in order, everything queued since
//! its last commit in one transaction (group commit: one fsync for many
//! appends under load). Truncations and purges go through the same queue,
//! so they apply in the order openraft asked for them, and return once
//! done. The thread keeps disk waits off the async workers.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};

use openraft::OptionalSend;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::type_config::alias::{EntryOf, LogIdOf, VoteOf};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::TypeConfig;

pub(crate) const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";

pub(crate) fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

fn encode<T: Serialize>(v: &T) -> io::Result<Vec<u8>> {
    super::codec::encode(v).map_err(io_err)
}

fn decode<T: DeserializeOwned>(b: &[u8]) -> io::Result<T> {
    super::codec::decode(b).map_err(io_err)
}

/// Entries handed to `append` and not yet committed to redb, by index.
type Unflushed = Arc<Mutex<BTreeMap<u64, EntryOf<TypeConfig>>>>;

/// The last committed log id openraft saved (encoded), not yet written:
/// it goes to disk with the writer's next transaction.
type PendingCommitted = Arc<Mutex<Option<Vec<u8>>>>;

/// What the writer thread does, in the order queued.
enum Job {
    Append {
        rows: Vec<(u64, Vec<u8>)>,
        /// The log ids written, to drop from `unflushed` once committed.
        ids: Vec<LogIdOf<TypeConfig>>,
        callback: IOFlushed<TypeConfig>,
        /// When `append` was called, for the write timeline.
        start_us: Option<i64>,
    },
    /// Deletes the entries in the range (and, for purges, records the
    /// marker), then answers.
    Delete {
        range: (Bound<u64>, Bound<u64>),
        marker: Option<Vec<u8>>,
        done: tokio::sync::oneshot::Sender<io::Result<()>>,
    },
}

/// Log storage over a shared redb database.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    unflushed: Unflushed,
    committed: PendingCommitted,
    writer: Sender<Job>,
}

impl LogStore {
    pub fn new(db: Arc<Database>) -> io::Result<Self> {
        // Create the tables so that read transactions never find them missing.
        let tx = db.begin_write().map_err(io_err)?;
        tx.open_table(LOG).map_err(io_err)?;
        tx.open_table(META).map_err(io_err)?;
        tx.commit().map_err(io_err)?;
        let unflushed = Unflushed::default();
        let committed = PendingCommitted::default();
        let (writer, jobs) = std::sync::mpsc::channel();
        let (w_db, w_unflushed, w_committed) = (db.clone(), unflushed.clone(), committed.clone());
        // Ends when the last store (and so the last sender) is dropped.
        std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || write_loop(&w_db, &w_unflushed, &w_committed, &jobs))?;
        Ok(Self {
            db,
            unflushed,
            committed,
            writer,
        })
    }

    fn queue(&self, job: Job) -> io::Result<()> {
        self.writer
            .send(job)
            .map_err(|_| io::Error::other("the Raft log writer has stopped"))
    }

    fn read_meta<T: DeserializeOwned>(&self, key: &str) -> io::Result<Option<T>> {
        let tx = self.db.begin_read().map_err(io_err)?;
        let table = tx.open_table(META).map_err(io_err)?;
        match table.get(key).map_err(io_err)? {
            Some(v) => Ok(Some(decode(v.value())?)),
            None => Ok(None),
        }
    }

    /// Writes a metadata value durably (with fsync).
    async fn write_meta<T: Serialize>(&self, key: &'static str, value: &T) -> io::Result<()> {
        let bytes = encode(value)?;
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let tx = db.begin_write().map_err(io_err)?;
            tx.open_table(META)
                .map_err(io_err)?
                .insert(key, bytes.as_slice())
                .map_err(io_err)?;
            tx.commit().map_err(io_err)
        })
        .await
        .map_err(io_err)?
    }

    /// Deletes log entries in `range` (and, for purges, records the
    /// marker), after every append queued before, and returns once done.
    async fn delete(&self, range: (Bound<u64>, Bound<u64>), purged: Option<LogIdOf<TypeConfig>>) -> io::Result<()> {
        let marker = purged.as_ref().map(encode).transpose()?;
        // Readers stop seeing the entries now; the disk follows in order.
        self.unflushed.lock().map_err(io_err)?.retain(|i, _| !range.contains(i));
        let (done, wait) = tokio::sync::oneshot::channel();
        self.queue(Job::Delete { range, marker, done })?;
        wait.await
            .map_err(|_| io::Error::other("the Raft log writer has stopped"))?
    }
}

/// The writer thread: takes every job queued since the last commit, applies
/// them in order in one write transaction, commits it (fsync), then reports
/// each job's outcome.
fn write_loop(
    db: &Database,
    unflushed: &Mutex<BTreeMap<u64, EntryOf<TypeConfig>>>,
    committed: &Mutex<Option<Vec<u8>>>,
    jobs: &Receiver<Job>,
) {
    let mut slow = SlowDisk::default();
    let mut marker_written: Option<std::time::Instant> = None;
    while let Ok(first) = jobs.recv() {
        // The commit marker is taken before the queue is drained: openraft
        // queues the entries up to a marker before saving it, so every
        // entry the marker covers is in this batch or an earlier one.
        // At most every `MARKER_EVERY`: at one write at a time every
        // commit carried a new marker, a second table's pages in each
        // fsync, for what only spares a restarted node re-learning its
        // commit index from the leader.
        let committed = if marker_written.is_none_or(|t| t.elapsed() >= MARKER_EVERY) {
            let c = committed.lock().ok().and_then(|mut c| c.take());
            if c.is_some() {
                marker_written = Some(std::time::Instant::now());
            }
            c
        } else {
            None
        };
        let mut batch = vec![first];
        batch.extend(jobs.try_iter());
        let started = std::time::Instant::now();
        let result = commit_batch(db, &batch, committed.as_deref());
        slow.record(started.elapsed());
        let end_us = super::trace::enabled().then(super::trace::now_us);
        for job in batch {
            let outcome = result.as_ref().map(|_| ()).map_err(|e| io::Error::other(e.to_string()));
            match job {
                Job::Append {
                    ids,
                    callback,
                    start_us,
                    ..
                } => {
                    if outcome.is_ok() {
                        // Readers find these in redb now; an entry replaced
                        // meanwhile (a truncation and a new append at its
                        // index) stays.
                        if let Ok(mut u) = unflushed.lock() {
                            for id in &ids {
                                if u.get(&id.index).is_some_and(|e| e.log_id == *id) {
                                    u.remove(&id.index);
                                }
                            }
                        }
                    }
                    if let (Some(start_us), Some(end_us), Some(first), Some(last)) =
                        (start_us, end_us, ids.first(), ids.last())
                    {
                        super::trace::stage("append", first.index, last.index, start_us, end_us);
                    }
                    callback.io_completed(outcome);
                }
                Job::Delete { done, .. } => {
                    let _ = done.send(outcome);
                }
            }
        }
    }
    // Every store is gone (a clean shutdown): a marker saved since the last
    // append goes to disk now, so a restart applies what it knew committed
    // without waiting to hear it from a leader again.
    if let Some(c) = committed.lock().ok().and_then(|mut c| c.take())
        && let Err(e) = commit_batch(db, &[], Some(&c))
    {
        tracing::warn!(error = %e, "could not store the Raft commit marker at shutdown");
    }
}

/// How often, at most, the commit marker goes to disk with the log's
/// entries (and always at a clean shutdown).
const MARKER_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

/// A log commit (write and fsync) slower than this is a disk problem: on
/// a healthy SSD it takes well under 10 ms. etcd warns from 1 s; half that
/// here, since a follower's slow fsync delays every commit it is needed for.
const SLOW_COMMIT: std::time::Duration = std::time::Duration::from_millis(500);

/// Tells operators the disk is slow: every commit's duration goes to the
/// `cutover_raft_log_fsync_seconds` histogram (the `CutoverRaftDiskSlow`
/// alert reads it), and a slow one is logged, at most every 10 s, with the
/// slowest and how many were slow since the last warning.
#[derive(Default)]
struct SlowDisk {
    warned: Option<std::time::Instant>,
    slow: u64,
    worst: std::time::Duration,
}

impl SlowDisk {
    fn record(&mut self, took: std::time::Duration) {
        metrics::histogram!("cutover_raft_log_fsync_seconds").record(took.as_secs_f64());
        if took < SLOW_COMMIT {
            return;
        }
        self.slow += 1;
        self.worst = self.worst.max(took);
        if self
            .warned
            .is_none_or(|w| w.elapsed() >= std::time::Duration::from_secs(10))
        {
            tracing::warn!(
                slowest_ms = self.worst.as_millis() as u64,
                slow_commits = self.slow,
                "the Raft log's disk is slow: a write and fsync took {} ms (healthy: under 10 ms). A \
                 write commits once a majority has it on disk, so this disk delays every write a \
                 majority needs it for (any, with another member slow or down), and this node's \
                 snapshots and restart: if it leads, transfer the leadership away; check its disk \
                 (latency, errors, noisy neighbours)",
                self.worst.as_millis()
            );
            self.warned = Some(std::time::Instant::now());
            self.slow = 0;
            self.worst = std::time::Duration::ZERO;
        }
    }
}

fn commit_batch(db: &Database, batch: &[Job], committed: Option<&[u8]>) -> io::Result<()> {
    let tx = db.begin_write().map_err(io_err)?;
    if let Some(c) = committed {
        tx.open_table(META)
            .map_err(io_err)?
            .insert(COMMITTED, c)
            .map_err(io_err)?;
    }
    {
        let mut log = tx.open_table(LOG).map_err(io_err)?;
        for job in batch {
            match job {
                Job::Append { rows, .. } => {
                    for (index, bytes) in rows {
                        log.insert(*index, bytes.as_slice()).map_err(io_err)?;
                    }
                }
                Job::Delete { range, marker, .. } => {
                    log.retain_in(*range, |_, _| false).map_err(io_err)?;
                    if let Some(m) = marker {
                        tx.open_table(META)
                            .map_err(io_err)?
                            .insert(LAST_PURGED, m.as_slice())
                            .map_err(io_err)?;
                    }
                }
            }
        }
    }
    tx.commit().map_err(io_err)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<EntryOf<TypeConfig>>, io::Error> {
        let bounds = (range.start_bound().cloned(), range.end_bound().cloned());
        // Held across the redb read: the writer drops entries from here only
        // after they are in redb, so each is found in one place or both.
        let unflushed = self.unflushed.lock().map_err(io_err)?;
        let tx = self.db.begin_read().map_err(io_err)?;
        let table = tx.open_table(LOG).map_err(io_err)?;
        let mut out = BTreeMap::new();
        for item in table.range::<u64>(bounds).map_err(io_err)? {
            let (i, v) = item.map_err(io_err)?;
            out.insert(i.value(), decode::<EntryOf<TypeConfig>>(v.value())?);
        }
        for (i, e) in unflushed.range(bounds) {
            out.insert(*i, e.clone());
        }
        Ok(out.into_values().collect())
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<TypeConfig>>, io::Error> {
        self.read_meta(VOTE)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged_log_id: Option<LogIdOf<TypeConfig>> = self.read_meta(LAST_PURGED)?;
        let unflushed = self.unflushed.lock().map_err(io_err)?;
        let tx = self.db.begin_read().map_err(io_err)?;
        let table = tx.open_table(LOG).map_err(io_err)?;
        let on_disk = match table.last().map_err(io_err)? {
            Some((_, v)) => {
                let e: EntryOf<TypeConfig> = decode(v.value())?;
                Some(e.log_id)
            }
            None => None,
        };
        let last = unflushed
            .last_key_value()
            .map(|(_, e)| e.log_id)
            .or(on_disk)
            .or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<TypeConfig>) -> Result<(), io::Error> {
        self.write_meta(VOTE, vote).await
    }

    async fn save_committed(&mut self, committed: Option<LogIdOf<TypeConfig>>) -> Result<(), io::Error> {
        // Neither fsynced nor written here: it goes to disk with the log
        // writer's next transaction (at most every `MARKER_EVERY`, and at
        // a clean shutdown). openraft applies a commit only after
        // this returns, so a write transaction of its own here (it was one,
        // not fsynced) waited behind the writer's fsync on every commit.
        // A committed index lost in a crash only means the node re-learns it
        // from the leader (Raft's own recovery); the entries up to it were
        // queued before it, so they are on disk first.
        let bytes = encode(&committed)?;
        *self.committed.lock().map_err(io_err)? = Some(bytes);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<TypeConfig>>, io::Error> {
        if let Some(bytes) = self.committed.lock().map_err(io_err)?.as_deref() {
            return decode::<Option<LogIdOf<TypeConfig>>>(bytes);
        }
        Ok(self.read_meta::<Option<LogIdOf<TypeConfig>>>(COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = EntryOf<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let start_us = super::trace::enabled().then(super::trace::now_us);
        let mut rows = Vec::new();
        let mut ids = Vec::new();
        let mut readable = Vec::new();
        for e in entries {
            rows.push((e.log_id.index, encode(&e)?));
            ids.push(e.log_id);
            readable.push(e);
        }
        // Readable from here on; flushed when the writer says so.
        {
            let mut u = self.unflushed.lock().map_err(io_err)?;
            for e in readable {
                u.insert(e.log_id.index, e);
            }
        }
        self.queue(Job::Append {
            rows,
            ids,
            callback,
            start_us,
        })
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogIdOf<TypeConfig>>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |l| l.index + 1);
        self.delete((Bound::Included(from), Bound::Unbounded), None).await
    }

    async fn purge(&mut self, log_id: LogIdOf<TypeConfig>) -> Result<(), io::Error> {
        let upto = log_id.index;
        self.delete((Bound::Unbounded, Bound::Included(upto)), Some(log_id))
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use openraft::storage::{IOFlushed, RaftLogStorage};
    use openraft::testing::{blank_ent, log_id};

    use super::{LogStore, TypeConfig};

    /// The commit marker is kept in memory when openraft saves it and
    /// reaches the disk with the writer's next transaction: a store opened
    /// on the same database afterwards reads it back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_commit_marker_reaches_the_disk_with_the_next_append() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(
            super::super::open_database(&dir.path().join("raft.redb"))
                .await
                .unwrap(),
        );
        let mut store = LogStore::new(db.clone()).unwrap();
        let entries = (1..=3).map(|i| blank_ent::<TypeConfig>(1, 1, i)).collect::<Vec<_>>();
        store.append(entries, IOFlushed::noop()).await.unwrap();
        let committed = Some(log_id::<TypeConfig>(1, 1, 2));
        store.save_committed(committed).await.unwrap();
        // Read from memory before anything wrote it.
        assert_eq!(store.read_committed().await.unwrap(), committed);
        // The next append carries it; a truncation after it returns once
        // the writer has committed both (one queue, in order).
        store
            .append([blank_ent::<TypeConfig>(1, 1, 4)], IOFlushed::noop())
            .await
            .unwrap();
        store.truncate_after(Some(log_id::<TypeConfig>(1, 1, 4))).await.unwrap();
        drop(store);
        let mut reopened = LogStore::new(db).unwrap();
        assert_eq!(reopened.read_committed().await.unwrap(), committed);
    }
}
