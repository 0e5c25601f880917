//! Adapts the pure `State` to openraft's state-machine storage, with
//! snapshots persisted in the same redb database as the log.

use std::io;
use std::sync::{Arc, RwLock};

use futures::{Stream, StreamExt};
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::type_config::alias::{LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf};
use openraft::{EntryPayload, OptionalSend, StoredMembership};
use redb::{Database, ReadableDatabase, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::TypeConfig;
use super::log_store::io_err;
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
}

impl StateMachineStore {
    /// Opens the state machine, restoring the latest snapshot if there is one.
    /// Entries after it are re-applied by openraft from the log.
    pub fn open(db: Arc<Database>) -> io::Result<Self> {
        let tx = db.begin_write().map_err(io_err)?;
        tx.open_table(SNAPSHOT).map_err(io_err)?;
        tx.commit().map_err(io_err)?;
        let mut data = SmData::default();
        if let Some(s) = read_snapshot(&db)? {
            data = serde_json::from_slice(&s.data).map_err(io_err)?;
        }
        let applied = data.last_applied.as_ref().map_or(0, |l| l.index);
        let (tx, _) = watch::channel(applied);
        Ok(Self {
            shared: Arc::new(Shared {
                data: RwLock::new(data),
                applied: tx,
            }),
            db,
        })
    }

    fn save_snapshot(&self, s: &StoredSnapshot) -> io::Result<()> {
        let meta = serde_json::to_vec(&s.meta).map_err(io_err)?;
        let tx = self.db.begin_write().map_err(io_err)?;
        {
            let mut t = tx.open_table(SNAPSHOT).map_err(io_err)?;
            t.insert(CURRENT_META, meta.as_slice()).map_err(io_err)?;
            t.insert(CURRENT_DATA, s.data.as_slice()).map_err(io_err)?;
            t.remove(CURRENT).map_err(io_err)?;
        }
        tx.commit().map_err(io_err)
    }
}

fn read_snapshot(db: &Database) -> io::Result<Option<StoredSnapshot>> {
    let tx = db.begin_read().map_err(io_err)?;
    let table = tx.open_table(SNAPSHOT).map_err(io_err)?;
    if let (Some(meta), Some(data)) = (
        table.get(CURRENT_META).map_err(io_err)?,
        table.get(CURRENT_DATA).map_err(io_err)?,
    ) {
        return Ok(Some(StoredSnapshot {
            meta: serde_json::from_slice(meta.value()).map_err(io_err)?,
            data: data.value().to_vec(),
        }));
    }
    match table.get(CURRENT).map_err(io_err)? {
        Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(io_err)?)),
        None => Ok(None),
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<TypeConfig, Vec<u8>>, io::Error> {
        // A copy under the read lock (cheap next to encoding), encoded and
        // written off the lock: applies, which take the write lock, wait
        // only for the copy.
        let d = self.shared.data.read().map_err(io_err)?.clone();
        let this = self.clone();
        let stored = tokio::task::spawn_blocking(move || {
            let stored = StoredSnapshot {
                meta: SnapshotMetaOf::<TypeConfig> {
                    last_log_id: d.last_applied,
                    last_membership: d.last_membership.clone(),
                },
                data: serde_json::to_vec(&d).map_err(io_err)?,
            };
            this.save_snapshot(&stored)?;
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
        let mut last = None;
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let mut response = {
                let mut d = self.shared.data.write().map_err(io_err)?;
                d.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => CommandResponse::default(),
                    EntryPayload::Normal(cmd) => d.state.apply(cmd),
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
        let data: SmData = serde_json::from_slice(&snapshot).map_err(io_err)?;
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
