//! The election timer: when a follower stands for election.
//!
//! Raft's rule (and etcd's, and what an operator reads in
//! `election_timeout_min_ms..election_timeout_max_ms`): a follower that has
//! heard nothing from a leader, and granted no vote, for a randomized
//! election timeout stands for election. openraft (0.10.0-alpha.37) waits
//! longer: its follower stands only once the leader lease *and* an election
//! timeout have passed since the leader's last contact, and it fixes the
//! lease at `election_timeout_max`, so 150..300 ms became 450..600 ms of
//! silence before a leader's loss was even noticed (BENCHMARKS.md,
//! "failover"). No setting of that release separates the two.
//!
//! So cutover runs the timer itself, here, and turns openraft's off
//! (`enable_elect: false`): this task stands for election (through
//! `Trigger::elect`, with Pre-Vote when configured) after the configured
//! timeout of silence, and openraft is given `election_timeout_max =
//! election_timeout_min_ms`, which makes its lease, the time a voter refuses
//! other candidates after hearing from its leader, the shortest election
//! timeout: a candidate that waited out its own timeout finds the other
//! voters' leases over too, as etcd's check-quorum lease does. The leader's
//! own lease ([`super::leads`]) is no longer than that.
//!
//! What resets the timer: what the RaftService server sees (`service.rs`),
//! an append-entries as it arrives and again once accepted (heartbeats are
//! empty append-entries; a slow log flush delays the reply, not the
//! reset), a snapshot accepted, a vote granted; any change of this node's
//! vote, role or known leader (openraft's server metrics: a leader that
//! learnt it was deposed starts a whole timeout then); and standing, so a
//! split vote is retried after a fresh random timeout.
//!
//! Lost with openraft's timer: its longer wait after seeing a longer log
//! than its own (with Pre-Vote, on by default, such a node is refused
//! anyway), and a lone voter electing itself at once at start (it now
//! waits one timeout).

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use rand::Rng;
use tokio::time::Instant;

use super::Raft;

/// When this node last heard from a leader (or granted a vote, or stood).
pub(crate) struct ElectionClock {
    last: Mutex<Instant>,
}

impl ElectionClock {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            last: Mutex::new(Instant::now()),
        })
    }

    /// The node heard from its leader, or granted a vote: no election for
    /// another timeout.
    pub(crate) fn reset(&self) {
        *self.last.lock().expect("election clock poisoned") = Instant::now();
    }

    fn last(&self) -> Instant {
        *self.last.lock().expect("election clock poisoned")
    }
}

/// Runs the timer until Raft shuts down. `min..max` is the election
/// timeout, drawn afresh each time the clock is reset or the node stands.
pub(crate) async fn run(raft: Raft, clock: Arc<ElectionClock>, min: Duration, max: Duration, pre_vote: bool) {
    // Vote, role, leader and membership: changes only on those events,
    // not on every apply.
    let mut server = raft.server_metrics();
    loop {
        let timeout = rand::rng().random_range(min..max);
        // Sleep until `timeout` after the last reset. A reset only moves
        // the deadline later, so waking at the old one and looking again is
        // enough: no need to be woken by each heartbeat.
        loop {
            let deadline = clock.last() + timeout;
            if Instant::now() >= deadline {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {}
                changed = server.changed() => {
                    // The sender lives in openraft's core task: closed, Raft
                    // has shut down.
                    if changed.is_err() {
                        return;
                    }
                    // A new term or vote, or a role or leader change (a
                    // leader that learnt it was deposed, a vote granted):
                    // Raft restarts the timer.
                    clock.reset();
                }
            }
        }
        let (leading, voter, voters) = {
            let m = server.borrow_watched();
            let membership = m.membership_config.membership();
            (
                m.state == ServerState::Leader,
                membership.voter_ids().any(|id| id == m.id),
                membership.voter_ids().count(),
            )
        };
        clock.reset();
        // A learner (a node being added, catching up) does not stand; a
        // lone voter is its own quorum and has no one to ask first.
        if leading || !voter {
            continue;
        }
        let pre_vote = pre_vote && voters > 1;
        tracing::info!(
            timeout_ms = timeout.as_millis() as u64,
            pre_vote,
            "no leader heard from within the election timeout: standing for election"
        );
        if raft.trigger().elect(pre_vote).await.is_err() {
            return;
        }
    }
}
