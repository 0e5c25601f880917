//! `WatchOperation`'s fan-out: one task follows the applied state for every
//! open watch, and wakes a watch only when its operation changed.
//!
//! Each watch used to wake on every applied index, take the state's read
//! lock and look its operation up: with a hundred watches open (`bench
//! fleet`), a hundred task wake-ups per apply batch on the leader, about
//! 8% of its CPU, almost all of them to learn that nothing changed. Now one
//! pass per apply batch compares each watched operation's `Arc` with the
//! one last sent (the state replaces the `Arc` whenever an apply changes
//! the operation), under one read lock, and hands the new one to its watch.

use std::sync::{Arc, Mutex};

use cutover_shared::domain::Operation;
use tokio::sync::{Notify, watch};

use crate::raft::Consensus;

/// The open watches of one node, and the pass that feeds them.
#[derive(Default)]
pub struct OperationWatches {
    watchers: Mutex<Vec<Watcher>>,
    /// Wakes an idle [`OperationWatches::run`] when the first watch opens.
    registered: Notify,
}

struct Watcher {
    id: String,
    /// What the watch was last given.
    last: Arc<Operation>,
    tx: watch::Sender<Arc<Operation>>,
}

impl OperationWatches {
    /// Starts watching operation `id`: its state now, and a receiver that
    /// sees each later change (changes in between coalesce: a watch gets
    /// the newest). The sender is dropped (so `changed` fails) when the
    /// operation leaves the state. `None` if there is no such operation.
    pub fn watch(&self, consensus: &Consensus, id: &str) -> Option<watch::Receiver<Arc<Operation>>> {
        // Read under the watchers' lock, as a pass reads: every apply after
        // this read is seen by a later pass, so no change falls between.
        let mut watchers = self.watchers.lock().expect("watchers");
        let now = consensus.read(|s| s.operations.get(id).cloned())?;
        let (tx, rx) = watch::channel(now.clone());
        if !now.state.is_finished() {
            watchers.push(Watcher {
                id: id.to_owned(),
                last: now,
                tx,
            });
            self.registered.notify_one();
        }
        Some(rx)
    }

    /// Feeds the watches after every apply batch, for as long as the node
    /// runs; idle while none is open.
    pub async fn run(&self, consensus: Consensus) {
        let mut applied = consensus.applied();
        loop {
            let idle = self.watchers.lock().expect("watchers").is_empty();
            if idle {
                self.registered.notified().await;
            } else if applied.changed().await.is_err() {
                return;
            }
            self.pass(&consensus);
        }
    }

    /// Hands every changed operation to its watch; forgets the watches
    /// whose client went away, whose operation finished (after handing it
    /// over) or left the state.
    fn pass(&self, consensus: &Consensus) {
        let mut watchers = self.watchers.lock().expect("watchers");
        consensus.read(|s| {
            watchers.retain_mut(|w| {
                if w.tx.is_closed() {
                    return false;
                }
                let Some(now) = s.operations.get(&w.id) else {
                    return false;
                };
                if !Arc::ptr_eq(now, &w.last) && now != &w.last {
                    w.last = now.clone();
                    w.tx.send_replace(now.clone());
                }
                !w.last.state.is_finished()
            });
        });
    }
}
