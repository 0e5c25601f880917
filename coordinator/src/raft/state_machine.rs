//! Adapts the pure `State` to openraft's state-machine storage, with
//! snapshots persisted in their own redb database (`snapshot.redb`), not
//! the log's: redb runs one write transaction at a time per database, and
//! storing a snapshot of a big state takes hundreds of milliseconds
//! (`bench commit`: 168 ms at 256 clients), during which every log append
//! (and so every commit) waited when both lived in `raft.redb`. Snapshots
//! that older releases stored in `raft.redb` are still read, and removed
//! there once a newer one is stored.

use std::io;
use std::sync::{Arc, RwLock};

use futures::{Stream, StreamExt};
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::type_config::alias::{LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf};
use openraft::{EntryPayload, OptionalSend, StoredMembership};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::log_store::io_err;
use super::{TypeConfig, codec};
use crate::audit_log::{AuditLog, AuditWriter};
use crate::state::{CommandResponse, State};

const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");
/// The snapshot as one JSON document (its data a JSON array of numbers):
/// how snapshots were stored first; still read, never written.
const CURRENT: &str = "current";
/// The snapshot's metadata (JSON) and its data (raw bytes), stored apart so
/// the data is written as is.
const CURRENT_META: &str = "current.meta";
const CURRENT_DATA: &str = "current.data";

/// Everything the state machine holds, as snapshotted.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SmData {
    pub last_applied: Option<LogIdOf<TypeConfig>>,
    pub last_membership: StoredMembershipOf<TypeConfig>,
    pub state: State,
}

/// The state shared with the rest of the coordinator: read-mostly, replaced
/// wholesale on snapshot install.
pub struct Shared {
    pub data: RwLock<SmData>,
    /// Last applied log index; watchers wake on every apply.
    pub applied: watch::Sender<u64>,
    /// Where compacted audit events go (`<data_dir>/audit.jsonl`), written
    /// off the apply path.
    pub audit: AuditWriter,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMetaOf<TypeConfig>,
    data: Vec<u8>,
}

/// openraft's view of the state machine.
#[derive(Clone)]
pub struct StateMachineStore {
    pub shared: Arc<Shared>,
    /// `snapshot.redb`: the snapshot, alone.
    snapshots: Arc<Database>,
    /// The log's database, where older releases stored the snapshot; kept
    /// while such a snapshot is there.
    legacy: Option<Arc<Database>>,
}

impl StateMachineStore {
    /// Opens the state machine, restoring the latest snapshot if there is one.
    /// Entries after it are re-applied by openraft from the log.
    /// `snapshots` is `snapshot.redb`, `log` the log's database (read for
    /// a snapshot an older release stored there).
    pub fn open(snapshots: Arc<Database>, log: &Arc<Database>, data_dir: &std::path::Path) -> io::Result<Self> {
        let audit = AuditLog::open(data_dir).map_err(io_err)?;
        for db in [&snapshots, log] {
            let tx = db.begin_write().map_err(io_err)?;
            tx.open_table(SNAPSHOT).map_err(io_err)?;
            tx.commit().map_err(io_err)?;
        }
        let legacy = read_stored(log)?.is_some().then(|| log.clone());
        let mut data = SmData::default();
        if let Some(s) = read_snapshot(&snapshots, legacy.as_deref())? {
            data = codec::decode(&s.data).map_err(io_err)?;
            data.state.reindex();
        }
        let applied = data.last_applied.as_ref().map_or(0, |l| l.index);
        let (tx, _) = watch::channel(applied);
        Ok(Self {
            shared: Arc::new(Shared {
                data: RwLock::new(data),
                applied: tx,
                audit: AuditWriter::start(audit)?,
            }),
            snapshots,
            legacy,
        })
    }

    /// Stores `s` as the current snapshot unless a newer one is already
    /// stored, and says whether it did. Why the check: a snapshot build
    /// copies the state, then encodes and stores it off the lock; a leader's
    /// snapshot installed meanwhile is newer, and the log before it is gone.
    /// Overwriting it with the older build would leave a restart with a
    /// snapshot that the remaining log does not continue.
    /// (A build and an install both store here, so the check in this
    /// database's write transaction is enough: a snapshot in the log's
    /// database is older than any state this node built or installed.)
    fn save_snapshot(&self, s: &StoredSnapshot) -> io::Result<bool> {
        let meta = codec::encode(&s.meta).map_err(io_err)?;
        let tx = self.snapshots.begin_write().map_err(io_err)?;
        {
            let mut t = tx.open_table(SNAPSHOT).map_err(io_err)?;
            let stored: Option<SnapshotMetaOf<TypeConfig>> = match t.get(CURRENT_META).map_err(io_err)? {
                Some(m) => Some(codec::decode(m.value()).map_err(io_err)?),
                None => None,
            };
            if stored.is_some_and(|m| m.last_log_id > s.meta.last_log_id) {
                return Ok(false);
            }
            t.insert(CURRENT_META, meta.as_slice()).map_err(io_err)?;
            t.insert(CURRENT_DATA, s.data.as_slice()).map_err(io_err)?;
            t.remove(CURRENT).map_err(io_err)?;
        }
        tx.commit().map_err(io_err)?;
        if let Some(log) = &self.legacy {
            // Superseded: free its space in the log's database, once (a
            // store that still holds the handle just finds nothing).
            remove_stored(log)?;
        }
        Ok(true)
    }
}

/// Removes the snapshot stored in `db`, if any.
fn remove_stored(db: &Database) -> io::Result<()> {
    if read_stored(db)?.is_none() {
        return Ok(());
    }
    let tx = db.begin_write().map_err(io_err)?;
    {
        let mut t = tx.open_table(SNAPSHOT).map_err(io_err)?;
        for key in [CURRENT, CURRENT_META, CURRENT_DATA] {
            t.remove(key).map_err(io_err)?;
        }
    }
    tx.commit().map_err(io_err)
}

/// The stored snapshot's last log index and size in bytes, if there is one
/// (`snapshots`: `snapshot.redb`; `log`: the log's database).
pub(crate) fn stored_snapshot_size(snapshots: &Database, log: &Database) -> io::Result<Option<(u64, usize)>> {
    Ok(read_snapshot(snapshots, Some(log))?.map(|s| (s.meta.last_log_id.map_or(0, |l| l.index), s.data.len())))
}

/// The current snapshot: the one in `snapshot.redb`, else one an older
/// release left in the log's database.
fn read_snapshot(snapshots: &Database, legacy: Option<&Database>) -> io::Result<Option<StoredSnapshot>> {
    match read_stored(snapshots)? {
        Some(s) => Ok(Some(s)),
        None => match legacy {
            Some(db) => read_stored(db),
            None => Ok(None),
        },
    }
}

fn read_stored(db: &Database) -> io::Result<Option<StoredSnapshot>> {
    let tx = db.begin_read().map_err(io_err)?;
    let table = tx.open_table(SNAPSHOT).map_err(io_err)?;
    if let (Some(meta), Some(data)) = (
        table.get(CURRENT_META).map_err(io_err)?,
        table.get(CURRENT_DATA).map_err(io_err)?,
    ) {
        return Ok(Some(StoredSnapshot {
            meta: codec::decode(meta.value()).map_err(io_err)?,
            data: data.value().to_vec(),
        }));
    }
    match table.get(CURRENT).map_err(io_err)? {
        Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(io_err)?)),
        None => Ok(None),
    }
}

/// Records how long one phase of building a snapshot took.
fn snapshot_phase(phase: &'static str, started: std::time::Instant) {
    metrics::histogram!("cutover_raft_snapshot_seconds", "phase" => phase).record(started.elapsed().as_secs_f64());
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<TypeConfig, Vec<u8>>, io::Error> {
        // A copy under the read lock (O(1): the state's growing maps are
        // persistent), encoded and written off the lock, so applies, which
        // take the write lock, barely wait. Each phase's time goes to
        // `cutover_raft_snapshot_seconds{phase}`: the copy is what stalls
        // commits, the rest what a snapshot costs the node.
        let started = std::time::Instant::now();
        let (d, audit_sent) = {
            let d = self.shared.data.read().map_err(io_err)?;
            (d.clone(), self.shared.audit.sent())
        };
        snapshot_phase("copy", started);
        // Events compacted out of this copy leave the node's keeping only
        // once they are in the audit file.
        self.shared.audit.flushed(audit_sent).await?;
        let this = self.clone();
        // Encoding a big state is 40-180 ms of CPU (`bench commit`) that
        // commits on a busy node should not wait behind: it runs on its
        // own thread at a lower priority (nice 10), which a pooled
        // blocking thread could not be given (nothing unprivileged can
        // raise it back for the pool's next task).
        let (done, result) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("cutover-snapshot".into())
            .spawn(move || {
                #[cfg(target_os = "linux")]
                if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 10) {
                    tracing::debug!("snapshot thread keeps its priority: {e}");
                }
                let _ = done.send(encode_and_store(&this, d));
            })?;
        let stored = result.await.map_err(io_err)??;
        Ok(openraft::Snapshot {
            meta: stored.meta,
            snapshot: stored.data,
        })
    }
}

/// Encodes the copied state `d` and stores it (a build's work off the
/// state's lock).
fn encode_and_store(this: &StateMachineStore, d: SmData) -> io::Result<StoredSnapshot> {
    let started = std::time::Instant::now();
    let stored = StoredSnapshot {
        meta: SnapshotMetaOf::<TypeConfig> {
            last_log_id: d.last_applied,
            last_membership: d.last_membership.clone(),
        },
        data: codec::encode(&d).map_err(io_err)?,
    };
    snapshot_phase("encode", started);
    metrics::gauge!("cutover_raft_snapshot_bytes").set(stored.data.len() as f64);
    let started = std::time::Instant::now();
    if !this.save_snapshot(&stored)? {
        tracing::info!("a newer snapshot was installed while this one was built; keeping the newer");
    }
    snapshot_phase("write", started);
    // The copy is dropped here, off the async workers.
    drop(d);
    Ok(stored)
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotData = Vec<u8>;
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogIdOf<TypeConfig>>, StoredMembershipOf<TypeConfig>), io::Error> {
        let d = self.shared.data.read().map_err(io_err)?;
        Ok((d.last_applied, d.last_membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let start_us = super::trace::enabled().then(super::trace::now_us);
        let mut first = None;
        let mut last = None;
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            first.get_or_insert(entry.log_id.index);
            let mut response = {
                let mut d = self.shared.data.write().map_err(io_err)?;
                d.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => CommandResponse::default(),
                    EntryPayload::Normal(cmd) => {
                        let r = d.state.apply_in(entry.log_id.leader_id.term, cmd);
                        // Handed over under the lock: a snapshot copied
                        // after this apply sees them as sent, and waits
                        // for them to be on disk before it is stored.
                        self.shared.audit.send(d.state.take_pruned_audit())?;
                        r
                    }
                    EntryPayload::Membership(m) => {
                        d.last_membership = StoredMembership::new(Some(entry.log_id), m);
                        CommandResponse::default()
                    }
                }
            };
            response.log_index = entry.log_id.index;
            last = Some(entry.log_id.index);
            if let Some(r) = responder {
                r.send(response);
            }
        }
        if let Some(index) = last {
            self.shared.applied.send_replace(index);
            if let (Some(start_us), Some(first)) = (start_us, first) {
                super::trace::stage("apply", first, index, start_us, super::trace::now_us());
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<TypeConfig>,
        snapshot: Vec<u8>,
    ) -> Result<(), io::Error> {
        let mut data: SmData = codec::decode(&snapshot).map_err(io_err)?;
        data.state.reindex();
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: snapshot,
        };
        // The leader's snapshot replaces this node's state, and the log
        // before it may be purged once it is stored: events this node
        // compacted out earlier must be on disk first.
        self.shared.audit.flushed_all().await?;
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.save_snapshot(&stored))
            .await
            .map_err(io_err)??;
        let index = data.last_applied.as_ref().map_or(0, |l| l.index);
        *self.shared.data.write().map_err(io_err)? = data;
        self.shared.applied.send_replace(index);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<SnapshotOf<TypeConfig, Vec<u8>>>, io::Error> {
        Ok(
            read_snapshot(&self.snapshots, self.legacy.as_deref())?.map(|s| openraft::Snapshot {
                meta: s.meta,
                snapshot: s.data,
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(index: u64) -> SnapshotMetaOf<TypeConfig> {
        SnapshotMetaOf::<TypeConfig> {
            last_log_id: Some(openraft::testing::log_id::<TypeConfig>(1, 1, index)),
            last_membership: Default::default(),
        }
    }

    /// The suspected race, in the order it would happen: a build copies the
    /// state at index 50; a leader's snapshot at index 100 is installed (and
    /// the log before it discarded); the build then stores its copy. The
    /// newer snapshot must survive, or a restart resumes from index 50 with
    /// no log to continue it.
    #[test]
    fn an_older_snapshot_never_replaces_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(Database::create(dir.path().join("raft.redb")).unwrap());
        let db = Arc::new(Database::create(dir.path().join("snapshot.redb")).unwrap());
        let store = StateMachineStore::open(db.clone(), &log, dir.path()).unwrap();
        let newer = StoredSnapshot {
            meta: meta(100),
            data: b"newer".to_vec(),
        };
        let older = StoredSnapshot {
            meta: meta(50),
            data: b"older".to_vec(),
        };
        assert!(store.save_snapshot(&newer).unwrap());
        assert!(!store.save_snapshot(&older).unwrap(), "the older build was stored");
        let current = read_stored(&db).unwrap().unwrap();
        assert_eq!(current.meta.last_log_id.unwrap().index, 100);
        assert_eq!(current.data, b"newer");
        // A newer one still replaces it.
        assert!(
            store
                .save_snapshot(&StoredSnapshot {
                    meta: meta(150),
                    data: b"x".to_vec()
                })
                .unwrap()
        );
    }

    /// A data directory of an older release holds its snapshot in the
    /// log's database: it is restored from there, and the first snapshot
    /// stored since (in `snapshot.redb`) removes it, so it is neither read
    /// again nor kept taking space.
    #[test]
    fn a_snapshot_left_in_the_log_database_is_read_then_superseded() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(Database::create(dir.path().join("raft.redb")).unwrap());
        let mut state = SmData {
            last_applied: meta(40).last_log_id,
            ..Default::default()
        };
        state.state.task_generation = 7;
        let old = StoredSnapshot {
            meta: meta(40),
            data: codec::encode(&state).unwrap(),
        };
        // As an older release stored it.
        let tx = log.begin_write().unwrap();
        {
            let mut t = tx.open_table(SNAPSHOT).unwrap();
            t.insert(CURRENT_META, codec::encode(&old.meta).unwrap().as_slice())
                .unwrap();
            t.insert(CURRENT_DATA, old.data.as_slice()).unwrap();
        }
        tx.commit().unwrap();
        let snapshots = Arc::new(Database::create(dir.path().join("snapshot.redb")).unwrap());
        let store = StateMachineStore::open(snapshots.clone(), &log, dir.path()).unwrap();
        assert_eq!(
            store.shared.data.read().unwrap().state.task_generation,
            7,
            "not restored"
        );
        assert_eq!(
            stored_snapshot_size(&snapshots, &log).unwrap().map(|(i, _)| i),
            Some(40)
        );
        assert!(
            store
                .save_snapshot(&StoredSnapshot {
                    meta: meta(90),
                    data: b"new".to_vec()
                })
                .unwrap()
        );
        assert!(
            read_stored(&log).unwrap().is_none(),
            "the old snapshot was kept in the log's database"
        );
        assert_eq!(read_stored(&snapshots).unwrap().unwrap().data, b"new");
        assert_eq!(
            stored_snapshot_size(&snapshots, &log).unwrap().map(|(i, _)| i),
            Some(90)
        );
    }
}
