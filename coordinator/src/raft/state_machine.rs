//! Adapts the pure `State` to openraft's state-machine storage, with
//! snapshots persisted in the same redb database as the log.

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
use crate::audit_log::AuditLog;
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
    db: Arc<Database>,
    /// Where compacted audit events go (`<data_dir>/audit.jsonl`).
    audit: Arc<std::sync::Mutex<AuditLog>>,
}

impl StateMachineStore {
    /// Opens the state machine, restoring the latest snapshot if there is one.
    /// Entries after it are re-applied by openraft from the log.
    pub fn open(db: Arc<Database>, data_dir: &std::path::Path) -> io::Result<Self> {
        let audit = AuditLog::open(data_dir).map_err(io_err)?;
        let tx = db.begin_write().map_err(io_err)?;
        tx.open_table(SNAPSHOT).map_err(io_err)?;
        tx.commit().map_err(io_err)?;
        let mut data = SmData::default();
        if let Some(s) = read_snapshot(&db)? {
            data = codec::decode(&s.data).map_err(io_err)?;
            data.state.reindex();
        }
        let applied = data.last_applied.as_ref().map_or(0, |l| l.index);
        let (tx, _) = watch::channel(applied);
        Ok(Self {
            shared: Arc::new(Shared {
                data: RwLock::new(data),
                applied: tx,
            }),
            db,
            audit: Arc::new(std::sync::Mutex::new(audit)),
        })
    }

    /// Stores `s` as the current snapshot unless a newer one is already
    /// stored, and says whether it did. Why the check: a snapshot build
    /// copies the state, then encodes and stores it off the lock; a leader's
    /// snapshot installed meanwhile is newer, and the log before it is gone.
    /// Overwriting it with the older build would leave a restart with a
    /// snapshot that the remaining log does not continue.
    fn save_snapshot(&self, s: &StoredSnapshot) -> io::Result<bool> {
        let meta = codec::encode(&s.meta).map_err(io_err)?;
        let tx = self.db.begin_write().map_err(io_err)?;
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
        Ok(true)
    }
}

/// The stored snapshot's last log index and size in bytes, if there is one.
pub(crate) fn stored_snapshot_size(db: &Database) -> io::Result<Option<(u64, usize)>> {
    Ok(read_snapshot(db)?.map(|s| (s.meta.last_log_id.map_or(0, |l| l.index), s.data.len())))
}

fn read_snapshot(db: &Database) -> io::Result<Option<StoredSnapshot>> {
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
        // A copy under the read lock, encoded and written off the lock:
        // applies, which take the write lock, wait only for the copy. That
        // copy is not cheap: `bench commit` measured 22 ms at 64 clients
        // and 80 ms at 256 (BENCHMARKS.md), the commit tail at 256;
        // structurally shared maps would make it O(1). Each phase's time
        // goes to `cutover_raft_snapshot_seconds{phase}`: the copy is what
        // stalls commits, the rest what a snapshot costs the node.
        let started = std::time::Instant::now();
        let d = self.shared.data.read().map_err(io_err)?.clone();
        snapshot_phase("copy", started);
        let this = self.clone();
        let stored = tokio::task::spawn_blocking(move || {
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
            Ok::<_, io::Error>(stored)
        })
        .await
        .map_err(io_err)??;
        Ok(openraft::Snapshot {
            meta: stored.meta,
            snapshot: stored.data,
        })
    }
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
            let mut pruned = Vec::new();
            let mut response = {
                let mut d = self.shared.data.write().map_err(io_err)?;
                d.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => CommandResponse::default(),
                    EntryPayload::Normal(cmd) => {
                        let r = d.state.apply(cmd);
                        pruned = d.state.take_pruned_audit();
                        r
                    }
                    EntryPayload::Membership(m) => {
                        d.last_membership = StoredMembership::new(Some(entry.log_id), m);
                        CommandResponse::default()
                    }
                }
            };
            if !pruned.is_empty() {
                // Durable before the command counts as applied: events leave
                // the state only into the file. A failure here is a storage
                // failure like a failed log write: Raft stops on this node.
                self.audit.lock().map_err(io_err)?.append(&pruned).map_err(io_err)?;
            }
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
        Ok(read_snapshot(&self.db)?.map(|s| openraft::Snapshot {
            meta: s.meta,
            snapshot: s.data,
        }))
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
        let db = Arc::new(Database::create(dir.path().join("raft.redb")).unwrap());
        let store = StateMachineStore::open(db.clone(), dir.path()).unwrap();
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
        let current = read_snapshot(&db).unwrap().unwrap();
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
}
