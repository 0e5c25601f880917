//! The Raft log, vote and commit marker, stored durably in redb.
//!
//! Every append is one redb write transaction committed with fsync before
//! openraft is told the entries are flushed; the commit runs on the blocking
//! pool so a slow disk never stalls the async workers.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

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

/// Log storage over a shared redb database.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    pub fn new(db: Arc<Database>) -> io::Result<Self> {
        // Create the tables so that read transactions never find them missing.
        let tx = db.begin_write().map_err(io_err)?;
        tx.open_table(LOG).map_err(io_err)?;
        tx.open_table(META).map_err(io_err)?;
        tx.commit().map_err(io_err)?;
        Ok(Self { db })
    }

    fn read_meta<T: DeserializeOwned>(&self, key: &str) -> io::Result<Option<T>> {
        let tx = self.db.begin_read().map_err(io_err)?;
        let table = tx.open_table(META).map_err(io_err)?;
        match table.get(key).map_err(io_err)? {
            Some(v) => Ok(Some(decode(v.value())?)),
            None => Ok(None),
        }
    }

    /// Writes a metadata value. `durable: false` skips the fsync: the value
    /// reaches the disk with the next durable commit (the next append), and
    /// losing it in a crash before then is harmless (see `save_committed`).
    async fn write_meta<T: Serialize>(&self, key: &'static str, value: &T, durable: bool) -> io::Result<()> {
        let bytes = encode(value)?;
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let mut tx = db.begin_write().map_err(io_err)?;
            if !durable {
                tx.set_durability(redb::Durability::None).map_err(io_err)?;
            }
            tx.open_table(META)
                .map_err(io_err)?
                .insert(key, bytes.as_slice())
                .map_err(io_err)?;
            tx.commit().map_err(io_err)
        })
        .await
        .map_err(io_err)?
    }

    /// Deletes log entries in `range` (and, for purges, records the marker).
    async fn delete(&self, range: (Bound<u64>, Bound<u64>), purged: Option<LogIdOf<TypeConfig>>) -> io::Result<()> {
        let marker = purged.as_ref().map(encode).transpose()?;
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let tx = db.begin_write().map_err(io_err)?;
            {
                let mut log = tx.open_table(LOG).map_err(io_err)?;
                log.retain_in(range, |_, _| false).map_err(io_err)?;
                if let Some(m) = &marker {
                    tx.open_table(META)
                        .map_err(io_err)?
                        .insert(LAST_PURGED, m.as_slice())
                        .map_err(io_err)?;
                }
            }
            tx.commit().map_err(io_err)
        })
        .await
        .map_err(io_err)?
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<EntryOf<TypeConfig>>, io::Error> {
        let tx = self.db.begin_read().map_err(io_err)?;
        let table = tx.open_table(LOG).map_err(io_err)?;
        let bounds = (range.start_bound().cloned(), range.end_bound().cloned());
        let mut out = Vec::new();
        for item in table.range::<u64>(bounds).map_err(io_err)? {
            let (_, v) = item.map_err(io_err)?;
            out.push(decode(v.value())?);
        }
        Ok(out)
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<TypeConfig>>, io::Error> {
        self.read_meta(VOTE)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged_log_id: Option<LogIdOf<TypeConfig>> = self.read_meta(LAST_PURGED)?;
        let tx = self.db.begin_read().map_err(io_err)?;
        let table = tx.open_table(LOG).map_err(io_err)?;
        let last = match table.last().map_err(io_err)? {
            Some((_, v)) => {
                let e: EntryOf<TypeConfig> = decode(v.value())?;
                Some(e.log_id)
            }
            None => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<TypeConfig>) -> Result<(), io::Error> {
        self.write_meta(VOTE, vote, true).await
    }

    async fn save_committed(&mut self, committed: Option<LogIdOf<TypeConfig>>) -> Result<(), io::Error> {
        // Not fsynced on its own: this was the second fsync of every write.
        // A committed index lost in a crash only means the node re-learns it
        // from the leader (Raft's own recovery); the entries themselves were
        // appended durably.
        self.write_meta(COMMITTED, &committed, false).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<TypeConfig>>, io::Error> {
        Ok(self.read_meta::<Option<LogIdOf<TypeConfig>>>(COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = EntryOf<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut rows = Vec::new();
        for e in entries {
            rows.push((e.log_id.index, encode(&e)?));
        }
        let db = self.db.clone();
        let result = tokio::task::spawn_blocking(move || {
            let tx = db.begin_write().map_err(io_err)?;
            {
                let mut log = tx.open_table(LOG).map_err(io_err)?;
                for (index, bytes) in &rows {
                    log.insert(*index, bytes.as_slice()).map_err(io_err)?;
                }
            }
            tx.commit().map_err(io_err)
        })
        .await
        .map_err(io_err)
        .and_then(|r| r);
        let ok = result.as_ref().map(|_| ()).map_err(|e| io::Error::other(e.to_string()));
        callback.io_completed(ok);
        result
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
