//! Consensus: the one module that knows openraft (pinned to one exact
//! version in the workspace manifest). Everything else in the coordinator
//! talks to [`Consensus`]: propose a command, read the state, change
//! membership, look at progress. An openraft upgrade touches only this folder.

pub mod codec;
mod election;
pub mod level;
mod log_store;
mod network;
pub mod service;
mod state_machine;
pub mod trace;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cutover_shared::config::{Member, RaftConfig};
use cutover_shared::proto::{LevelRequest, ProposeRequest, ReadIndexRequest};
use cutover_shared::tls::TlsFiles;
use openraft::async_runtime::WatchReceiver;
use openraft::errors::{ClientWriteError, LinearizableReadError, RaftError};
use openraft::{BasicNode, ChangeMembers, ReadPolicy, ServerState, SnapshotPolicy};
use redb::Database;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use network::MAX_PEER_MESSAGE;
use network::PeerChannels;
use state_machine::{Shared, StateMachineStore};

use crate::state::{Command, CommandResponse, State};

openraft::declare_raft_types!(
    /// cutover's Raft types: commands in, command responses out.
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
);

pub type NodeId = u64;
type Raft = openraft::Raft<TypeConfig, StateMachineStore>;

/// What a node forwards to the leader over `RaftService.Propose`.
// Proposals live for one call and are serialized at once; boxing the common
// variant would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Proposal {
    Command(Command),
    AddNode {
        id: NodeId,
        address: String,
    },
    RemoveNode {
        id: NodeId,
    },
    /// Hand the leadership to voter `to`; done once it leads.
    TransferLeader {
        to: NodeId,
    },
}

/// How long a leadership transfer may take before the caller is told it
/// did not happen: the target must catch up on the log and win an election.
/// Shorter than [`PROPOSE_DEADLINE`], the deadline of the hop that forwards
/// the request to the leader, so a slow transfer is reported as such.
const TRANSFER_DEADLINE: Duration = Duration::from_secs(8);

/// Why a proposal did not take effect.
#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    #[error("not the leader")]
    NotLeader { leader: Option<(NodeId, String)> },
    #[error("no leader elected within {0:?}; is a majority of coordinators up?")]
    NoLeader(Duration),
    #[error("{0}")]
    Rejected(String),
    /// A write of a newer feature level while a member's level is not
    /// known yet (not heard from since this node began leading).
    #[error("{0}")]
    LevelUnknown(String),
    #[error("node {0} is not a member")]
    UnknownNode(NodeId),
    #[error("raft: {0}")]
    Raft(String),
}

/// Errors opening the consensus layer.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("storage in {dir}: {msg}")]
    Storage { dir: String, msg: String },
    #[error("raft configuration: {0}")]
    Config(String),
    #[error("raft: {0}")]
    Raft(String),
}

/// Where agent liveness relayed by followers goes on the leader: the agent
/// hub. The Raft layer only carries it (peer traffic, between members,
/// answered by a leader under a fresh lease) and does not interpret it.
pub trait AgentRelay: Send + Sync + 'static {
    fn relayed(&self, agents: Vec<cutover_shared::proto::RelayedAgent>);
}

/// Raft progress as seen by this node.
#[derive(Clone, Debug)]
pub struct RaftStatus {
    pub node_id: NodeId,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub last_log_index: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub snapshot_index: u64,
    pub purged_index: u64,
    pub server_state: &'static str,
    /// (id, address, is_voter)
    pub members: Vec<(NodeId, String, bool)>,
    /// Each member's feature level as this node last heard it (its own:
    /// [`level::FEATURE_LEVEL`]); absent: not heard from, or a release
    /// that does not say (older than levels).
    pub feature_levels: BTreeMap<NodeId, u32>,
}

/// A running Raft node and the replicated state it applies.
#[derive(Clone)]
pub struct Consensus {
    raft: Raft,
    /// The storage (the log's database, the snapshot's), to know when
    /// shutdown has really let go of it.
    db: std::sync::Weak<Database>,
    snapshots: std::sync::Weak<Database>,
    node_id: NodeId,
    shared: Arc<Shared>,
    peers: PeerChannels,
    /// How long a quorum's acknowledgement keeps this node leading (the
    /// election timeout's minimum less a heartbeat): see [`leads`].
    lease: Duration,
    /// When this node last heard from a leader: the election timer's.
    election: Arc<election::ElectionClock>,
    /// Whether this node leads under a fresh lease, kept by one task
    /// (`spawn_leadership`) for every caller of [`Self::leadership`].
    leadership: watch::Receiver<bool>,
}

/// Whether `m` shows this node leading under a fresh lease: a quorum
/// acknowledged its heartbeats within `lease`, a heartbeat less than the
/// shortest election timeout, so no other node can have been elected
/// since (a voter grants
/// no vote within openraft's lease of hearing from this leader, set to
/// that same shortest timeout: `election.rs`; openraft dates the
/// acknowledgement from when the heartbeat was sent, before the voter
/// heard it).
/// openraft keeps a leader that lost its quorum in the Leader state until
/// it hears of a higher term; past its lease, cutover's leader duties
/// (dispatching tasks, orchestrating, holding agent streams) stop. A lone
/// voter is its own quorum.
fn leads(m: &openraft::RaftMetrics<TypeConfig>, lease: Duration) -> bool {
    m.state == ServerState::Leader
        && (m.membership_config.membership().voter_ids().count() <= 1
            || m.last_quorum_acked
                .as_ref()
                .is_some_and(|t| openraft::async_runtime::Instant::elapsed(&**t) < lease))
}

/// How often, at most, the Raft gauges (`cutover_raft_*_index`, term,
/// leader) are refreshed from openraft's metrics.
const METRICS_REFRESH: Duration = Duration::from_millis(100);

/// How long a write waits for a leader before giving up.
const PROPOSE_DEADLINE: Duration = Duration::from_secs(10);

/// How long a follower waits for the leader's read index in one try.
const READ_INDEX_TIMEOUT: Duration = Duration::from_secs(2);

/// The longest a write or read waits between two tries at the leader it
/// knows, when no other leader is learnt of sooner.
const RETRY_WAIT: Duration = Duration::from_millis(200);

/// Opens the node's redb file. A previous instance in this process may still
/// be closing it (its last holder dropped, the file lock not yet released),
/// so "already open" is retried for a short while before it is an error.
async fn open_database(path: &Path) -> Result<Database, redb::DatabaseError> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match Database::create(path) {
            Err(redb::DatabaseError::DatabaseAlreadyOpen) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

impl Consensus {
    /// Opens (or creates) the node's storage in `data_dir` and starts Raft.
    pub async fn open(
        node_id: NodeId,
        data_dir: &Path,
        timings: &RaftConfig,
        tls: TlsFiles,
    ) -> Result<Self, OpenError> {
        let storage = |e: &dyn std::fmt::Display| OpenError::Storage {
            dir: data_dir.display().to_string(),
            msg: e.to_string(),
        };
        std::fs::create_dir_all(data_dir).map_err(|e| storage(&e))?;
        let db = Arc::new(
            open_database(&data_dir.join("raft.redb"))
                .await
                .map_err(|e| storage(&e))?,
        );
        let config = openraft::Config {
            cluster_name: "cutover".into(),
            heartbeat_interval: timings.heartbeat_interval_ms,
            // `election.rs` runs the election timer; openraft's is off and
            // its timeout bounds serve only as the lease: a voter refuses
            // other candidates for `election_timeout_max` after hearing from
            // its leader, here the shortest configured election timeout.
            // The minimum only has to sit between the heartbeat and that.
            election_timeout_min: (timings.heartbeat_interval_ms + timings.election_timeout_min_ms) / 2,
            election_timeout_max: timings.election_timeout_min_ms,
            enable_elect: false,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(timings.snapshot_every),
            max_in_snapshot_log_to_keep: timings.keep_after_snapshot,
            enable_pre_vote: Some(timings.pre_vote),
            ..Default::default()
        }
        .validate()
        .map_err(|e| OpenError::Config(e.to_string()))?;
        let snapshots = Arc::new(
            open_database(&data_dir.join("snapshot.redb"))
                .await
                .map_err(|e| storage(&e))?,
        );
        // The files may have just been created: their directory entries
        // are durable only once the directory is synced (what redb's own
        // fsyncs do not cover), before anything is acknowledged from them.
        std::fs::File::open(data_dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| storage(&e))?;
        let weak_db = Arc::downgrade(&db);
        let weak_snapshots = Arc::downgrade(&snapshots);
        let log = log_store::LogStore::new(db.clone()).map_err(|e| storage(&e))?;
        let sm = StateMachineStore::open(snapshots, &db, data_dir).map_err(|e| storage(&e))?;
        drop(db);
        let shared = sm.shared.clone();
        let peers = PeerChannels::new(tls);
        let (leadership_tx, leadership) = watch::channel(false);
        let raft = Raft::new(node_id, Arc::new(config), peers.clone(), log, sm)
            .await
            .map_err(|e| OpenError::Raft(e.to_string()))?;
        let this = Self {
            raft,
            db: weak_db,
            snapshots: weak_snapshots,
            node_id,
            shared,
            peers,
            // A heartbeat's worth of margin under the voters' lease (the
            // shortest election timeout): for a pause between checking
            // and acting, and clocks that run at different rates.
            lease: Duration::from_millis(
                timings
                    .election_timeout_min_ms
                    .saturating_sub(timings.heartbeat_interval_ms),
            ),
            election: election::ElectionClock::new(),
            leadership,
        };
        this.spawn_metrics();
        this.spawn_leadership(leadership_tx);
        tokio::spawn(election::run(
            this.raft.clone(),
            this.election.clone(),
            Duration::from_millis(timings.election_timeout_min_ms),
            Duration::from_millis(timings.election_timeout_max_ms),
            timings.pre_vote,
        ));
        Ok(this)
    }

    /// Initializes a brand-new cluster with `members` as voters. Only the
    /// member with the smallest id does it, once; it is a no-op afterwards.
    pub async fn bootstrap(&self, members: &[Member]) -> Result<(), OpenError> {
        let Some(first) = members.iter().map(|m| m.id).min() else {
            return Ok(());
        };
        if first != self.node_id
            || self
                .raft
                .is_initialized()
                .await
                .map_err(|e| OpenError::Raft(e.to_string()))?
        {
            return Ok(());
        }
        let nodes: BTreeMap<NodeId, BasicNode> = members
            .iter()
            .map(|m| {
                (
                    m.id,
                    BasicNode {
                        addr: m.address.clone(),
                    },
                )
            })
            .collect();
        match self.raft.initialize(nodes).await {
            Ok(()) => Ok(()),
            // Another start already initialized it: fine.
            Err(RaftError::APIError(e)) => {
                tracing::info!("cluster already initialized: {e}");
                Ok(())
            }
            Err(e) => Err(OpenError::Raft(e.to_string())),
        }
    }

    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// Reads the replicated state (as applied on this node).
    pub fn read<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        f(&self.shared.data.read().expect("state lock poisoned").state)
    }

    /// Waits until every audit event compaction has moved out of this
    /// node's state so far is in its audit file (`audit_log.rs`: the file
    /// is written off the apply path).
    pub async fn audit_flushed(&self) -> std::io::Result<()> {
        self.shared.audit.flushed_all().await
    }

    /// Fires with the last applied index after every apply.
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.shared.applied.subscribe()
    }

    /// May node `id` take part in Raft with this node: is it in the current
    /// membership (or has this node none yet)? Reads the metrics in place:
    /// it runs on every peer message.
    pub fn accepts_peer(&self, id: NodeId) -> bool {
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        let membership = m.membership_config.membership();
        let mut nodes = membership.nodes().map(|(n, _)| *n).peekable();
        nodes.peek().is_none() || nodes.any(|n| n == id)
    }

    /// In openraft's Leader state, fresh lease or not: false once the node
    /// has seen a higher term or stepped down.
    pub fn in_leader_state(&self) -> bool {
        self.raft.metrics().borrow_watched().state == ServerState::Leader
    }

    /// Leading under a fresh lease (see [`leads`]).
    pub fn is_leader(&self) -> bool {
        leads(&self.raft.metrics().borrow_watched(), self.lease)
    }

    /// The Raft term this node leads in, if it leads (as [`Self::is_leader`]).
    pub fn leader_term(&self) -> Option<u64> {
        // Read in place: the orchestrator asks after every apply, and a
        // clone of the metrics copies the membership and replication maps.
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        leads(&m, self.lease).then_some(m.current_term)
    }

    /// The current leader's id and address, if known.
    pub fn leader(&self) -> Option<(NodeId, String)> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        let id = m.current_leader?;
        let addr = m.membership_config.membership().get_node(&id)?.addr.clone();
        Some((id, addr))
    }

    /// Brings this node's applied state up to date before a read that a
    /// write depends on (does the agent exist?). On the leader this is a
    /// ReadIndex round, which also covers a new leader that has not applied
    /// its predecessor's last entries yet. A follower asks the leader for
    /// that read index (`RaftService.ReadIndex`) and applies up to it: what
    /// the follower itself knows to be committed may lag what the leader
    /// has already committed and other nodes have already answered with.
    /// Without an answer from the leader it applies what it knows.
    pub async fn catch_up(&self) -> Result<(), ProposeError> {
        if self.is_leader() {
            match self.read_index().await {
                Ok(_) => return Ok(()),
                Err(ProposeError::NotLeader { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let committed = self.raft.metrics().borrow_watched().local_committed.map(|l| l.index);
        let leaders = match self.leader() {
            Some((id, addr)) if id != self.node_id => self.remote_read_index(&addr, READ_INDEX_TIMEOUT).await,
            // Elected, not yet under a fresh lease: entries of the previous
            // term it holds count as committed only once its own first entry
            // commits, and its committed index is stale until then (CI saw a
            // RunTask right after a failover miss the agent's AgentUp).
            Some(_) => tokio::time::timeout(Duration::from_secs(2), self.read_index())
                .await
                .ok()
                .and_then(Result::ok),
            None => None,
        };
        self.raft
            .wait(Some(PROPOSE_DEADLINE))
            .applied_index_at_least(committed.max(leaders), "apply what is committed")
            .await
            .map(|_| ())
            .map_err(|e| ProposeError::Raft(e.to_string()))
    }

    /// Resolves once Raft has stopped on a fatal error, with the reason: a
    /// write to the log or the state machine that failed (a full or failing
    /// disk), or a panic inside openraft. Raft does not resume after one, so
    /// the node must restart from its data directory; until this resolves
    /// it never does (a clean shutdown is not fatal).
    ///
    /// It waits on the server metrics (role, leader, membership), not the
    /// full metrics, which change several times per write: the binary's
    /// main thread waits here, and was woken (a futex wake and a context
    /// switch) on each of those changes, a few per write. The core sets
    /// the full metrics' `running_state` when it stops and then drops its
    /// metrics senders, so the server metrics' `changed` ends in an error
    /// once it has stopped, for whatever reason.
    pub async fn fatal(&self) -> String {
        let failed = || match &self.raft.metrics().borrow_watched().running_state {
            Err(f) if !matches!(f, openraft::errors::Fatal::Stopped) => Some(f.to_string()),
            _ => None,
        };
        let mut server = self.raft.server_metrics();
        loop {
            if let Some(reason) = failed() {
                return reason;
            }
            if server.changed().await.is_err() {
                return match failed() {
                    Some(reason) => reason,
                    None => std::future::pending().await,
                };
            }
        }
    }

    /// Makes the next local read linearizable: once this returns, this
    /// node has applied every write acknowledged anywhere before the call.
    /// The leader confirms its leadership with a quorum (ReadIndex); a
    /// follower asks the leader for that index and applies up to it.
    ///
    /// Unlike [`Self::catch_up`], it never settles for what this node
    /// knows: a node cut off from the majority (an old leader, a follower)
    /// cannot tell what it missed, so it waits (bounded) for a leader that
    /// answers and then fails, rather than serve a read from a state that
    /// may be stale. The control API's reads go through here, as etcd's
    /// default reads do.
    pub async fn read_barrier(&self) -> Result<(), ProposeError> {
        let deadline = Instant::now() + PROPOSE_DEADLINE;
        loop {
            let leader = self.leader();
            let index = match &leader {
                Some((id, _)) if *id == self.node_id => self.read_index().await.ok(),
                Some((_, addr)) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    self.remote_read_index(addr, left.min(READ_INDEX_TIMEOUT)).await
                }
                None => None,
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if let Some(index) = index {
                return self
                    .raft
                    .wait(Some(left))
                    .applied_index_at_least(Some(index), "apply up to the read index")
                    .await
                    .map(|_| ())
                    .map_err(|e| ProposeError::Raft(e.to_string()));
            }
            if left.is_zero() {
                return Err(ProposeError::NoLeader(PROPOSE_DEADLINE));
            }
            // The leader openraft knows, even one not in this node's
            // membership yet (`leader()` says None for it): comparing None
            // with it would return at once, a busy loop.
            let known = self.raft.metrics().borrow_watched().current_leader;
            self.leader_change(known, left.min(RETRY_WAIT)).await;
        }
    }

    /// On the leader: a ReadIndex round (leadership confirmed by a quorum);
    /// returns the index to apply up to for a linearizable read, once this
    /// node has applied it.
    pub async fn read_index(&self) -> Result<u64, ProposeError> {
        match self.raft.ensure_linearizable(ReadPolicy::ReadIndex).await {
            Ok(r) => Ok(r.index()),
            Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(_))) => {
                Err(ProposeError::NotLeader { leader: self.leader() })
            }
            Err(e) => Err(ProposeError::Raft(e.to_string())),
        }
    }

    /// The read index of the leader at `addr`, if it answers in time.
    /// The feature level of the node at `addr` (which need not be a member
    /// yet): a release before levels answers UNIMPLEMENTED, and is at
    /// [`level::UNADVERTISED_LEVEL`].
    async fn remote_level(&self, addr: &str) -> Result<u32, String> {
        let mut client = self.peers.client(addr).map_err(|e| e.to_string())?;
        let mut req = tonic::Request::new(LevelRequest {});
        req.set_timeout(Duration::from_secs(5));
        match client.level(req).await {
            Ok(r) => Ok(r.into_inner().level),
            Err(s) if s.code() == tonic::Code::Unimplemented => Ok(level::UNADVERTISED_LEVEL),
            Err(s) => Err(format!(
                "cannot ask the node at {addr} for its feature level: {}",
                s.message()
            )),
        }
    }

    async fn remote_read_index(&self, addr: &str, timeout: Duration) -> Option<u64> {
        if timeout.is_zero() {
            return None;
        }
        let mut client = self.peers.client(addr).ok()?;
        let mut req = tonic::Request::new(ReadIndexRequest {});
        req.set_timeout(timeout);
        match client.read_index(req).await {
            Ok(r) => Some(r.into_inner().index),
            Err(s) => {
                tracing::debug!("read index from {addr}: {}", s.message());
                None
            }
        }
    }

    /// Waits until some leader is known, up to `timeout`.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Option<NodeId> {
        self.raft
            .wait(Some(timeout))
            .metrics(|m| m.current_leader.is_some(), "a leader is known")
            .await
            .ok()
            .and_then(|m| m.current_leader)
    }

    /// Watches for leadership changes of this node (true while it leads
    /// under a fresh lease, see [`leads`]). Every caller shares the one
    /// task that keeps it.
    pub fn leadership(&self) -> watch::Receiver<bool> {
        self.leadership.clone()
    }

    /// Keeps [`Self::leadership`] until Raft stops. A lease runs out without any
    /// change of the metrics, so a node in the Leader state also looks at
    /// them every quarter lease; others wait for a change of role, leader
    /// or membership (the server metrics). Only a node in the Leader state
    /// without a fresh lease (just elected, or cut off) also wakes on the
    /// full metrics, to see its first quorum acknowledgement at once: they
    /// change several times per write, and this task woke on every change.
    fn spawn_leadership(&self, tx: watch::Sender<bool>) {
        let mut metrics = self.raft.metrics();
        let mut server = self.raft.server_metrics();
        let lease = self.lease;
        tokio::spawn(async move {
            loop {
                // The role from the server metrics, which woke this task:
                // openraft sends the full metrics after them, so these may
                // not show the new role yet (CI caught a new leader whose
                // duties never started: woken by the server metrics, it
                // read a Candidate from the full ones, and waited for the
                // server metrics alone). A Leader without a fresh lease
                // then waits for the full metrics too.
                let leader_state = server.borrow_and_update().state == ServerState::Leader;
                let leading = leader_state && leads(&metrics.borrow_and_update(), lease);
                if tx.send_if_modified(|v| std::mem::replace(v, leading) != leading) && !leading {
                    tracing::info!("not leading under a fresh lease: leader duties stop");
                }
                tokio::select! {
                    r = server.changed() => if r.is_err() { break },
                    r = metrics.changed(), if leader_state && !leading => if r.is_err() { break },
                    () = tokio::time::sleep(lease / 4), if leader_state => {}
                }
            }
        });
    }

    /// Applies `proposal` if this node leads.
    pub async fn propose_local(&self, proposal: Proposal) -> Result<CommandResponse, ProposeError> {
        let not_leader = |leader_id: Option<NodeId>, node: Option<BasicNode>| ProposeError::NotLeader {
            leader: leader_id.zip(node.map(|n| n.addr)),
        };
        let map_err = |e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>| match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => not_leader(f.leader_id, f.leader_node),
            RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => ProposeError::Rejected(e.to_string()),
            other => ProposeError::Raft(other.to_string()),
        };
        match proposal {
            Proposal::Command(cmd) => {
                // Nothing a member (voter or learner) of an older release
                // could not apply.
                let needed = level::needed(&cmd);
                if needed > level::UNADVERTISED_LEVEL {
                    let m = self.raft.metrics().borrow_watched().clone();
                    let members = m.membership_config.membership().nodes().map(|(&id, _)| {
                        let heard = if id == self.node_id {
                            Some(Some(level::FEATURE_LEVEL))
                        } else {
                            self.peers.levels.get(id)
                        };
                        (id, heard)
                    });
                    let in_use = self.read(|s| s.level_in_use);
                    level::check(needed, in_use, members.collect::<Vec<_>>()).map_err(|r| match r {
                        level::Refusal::Behind(m) => ProposeError::Rejected(m),
                        level::Refusal::Unheard(m) => ProposeError::LevelUnknown(m),
                    })?;
                }
                // Propose to applied on the leader: append, replicate to a
                // majority, fsync, apply.
                let started = Instant::now();
                let start_us = trace::enabled().then(trace::now_us);
                let resp = self.raft.client_write(cmd).await.map_err(map_err)?.data;
                metrics::histogram!("cutover_raft_commit_seconds").record(started.elapsed().as_secs_f64());
                if let Some(start_us) = start_us {
                    trace::stage("propose", resp.log_index, resp.log_index, start_us, trace::now_us());
                }
                match resp.error {
                    Some(e) => Err(ProposeError::Rejected(e)),
                    None => Ok(resp),
                }
            }
            Proposal::AddNode { id, address } => {
                if !self.is_leader() {
                    let (l, n) = self
                        .leader()
                        .map(|(i, a)| (Some(i), Some(BasicNode { addr: a })))
                        .unwrap_or((None, None));
                    return Err(not_leader(l, n));
                }
                // It will receive the log: refused if the log holds entries
                // its release could not apply (it would stop on them).
                let in_use = self.read(|s| s.level_in_use);
                if in_use > level::UNADVERTISED_LEVEL {
                    let theirs = self.remote_level(&address).await.map_err(ProposeError::Rejected)?;
                    if theirs < in_use {
                        return Err(ProposeError::Rejected(format!(
                            "node {id} at {address} is at feature level {theirs} (an older release), and this \
                             cluster's log holds entries of level {in_use}: start it on this release or later"
                        )));
                    }
                }
                // Learner first: it catches up on the log without affecting
                // the quorum, then becomes a voter.
                self.raft
                    .add_learner(id, BasicNode { addr: address }, true)
                    .await
                    .map_err(map_err)?;
                self.raft
                    .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                    .await
                    .map_err(map_err)?;
                Ok(CommandResponse::default())
            }
            Proposal::RemoveNode { id } => {
                let m = self.raft.metrics().borrow_watched().clone();
                if m.membership_config.membership().get_node(&id).is_none() {
                    return Err(ProposeError::UnknownNode(id));
                }
                if m.state != ServerState::Leader {
                    let l = m.current_leader;
                    let n = l.and_then(|l| m.membership_config.membership().get_node(&l).cloned());
                    return Err(not_leader(l, n));
                }
                let is_voter = m.membership_config.membership().voter_ids().any(|v| v == id);
                let change = if is_voter {
                    ChangeMembers::RemoveVoters(BTreeSet::from([id]))
                } else {
                    ChangeMembers::RemoveNodes(BTreeSet::from([id]))
                };
                self.raft.change_membership(change, false).await.map_err(map_err)?;
                Ok(CommandResponse::default())
            }
            Proposal::TransferLeader { to } => {
                let m = self.raft.metrics().borrow_watched().clone();
                let membership = m.membership_config.membership();
                if membership.get_node(&to).is_none() {
                    return Err(ProposeError::UnknownNode(to));
                }
                if !membership.voter_ids().any(|v| v == to) {
                    return Err(ProposeError::Rejected(format!(
                        "node {to} is a learner: only a voter can lead"
                    )));
                }
                if m.state != ServerState::Leader {
                    let l = m.current_leader;
                    let n = l.and_then(|l| membership.get_node(&l).cloned());
                    return Err(not_leader(l, n));
                }
                if to != self.node_id {
                    self.raft
                        .trigger()
                        .transfer_leader(to)
                        .await
                        .map_err(|e| ProposeError::Raft(e.to_string()))?;
                    self.raft
                        .wait(Some(TRANSFER_DEADLINE))
                        .current_leader(to, "leadership transfer")
                        .await
                        .map_err(|_| {
                            ProposeError::Rejected(format!(
                                "node {to} did not take the leadership within {TRANSFER_DEADLINE:?} (is it \
                                 reachable and caught up?)"
                            ))
                        })?;
                }
                Ok(CommandResponse::default())
            }
        }
    }

    /// Applies `proposal` through the leader, wherever it is: locally when
    /// this node leads, otherwise forwarded over `RaftService.Propose`.
    /// Waits (bounded) for an election in progress.
    pub async fn propose(&self, proposal: Proposal) -> Result<CommandResponse, ProposeError> {
        let deadline = Instant::now() + PROPOSE_DEADLINE;
        loop {
            let mut tried = None;
            let err = match self.propose_local(proposal.clone()).await {
                Err(ProposeError::NotLeader {
                    leader: Some((id, addr)),
                }) if id != self.node_id => {
                    tried = Some(id);
                    // Within the write's own deadline: a forward that
                    // outlived it would answer a caller that gave up.
                    let left = deadline.saturating_duration_since(Instant::now());
                    match self.forward(&addr, &proposal, left).await {
                        Ok(r) => {
                            // Read your writes: answer once this node has
                            // applied the entry too, so that a read through
                            // this node right after (GetOperation,
                            // WatchOperation) sees it.
                            if let Ok(resp) = &r
                                && resp.log_index > 0
                            {
                                let left = deadline.saturating_duration_since(Instant::now());
                                let mut applied = self.applied();
                                let _ = tokio::time::timeout(left, applied.wait_for(|i| *i >= resp.log_index)).await;
                            }
                            return r;
                        }
                        Err(e) => e,
                    }
                }
                Err(ProposeError::NotLeader { .. }) => "no leader".to_owned(),
                other => return other,
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!("giving up on a write: {err}");
                return Err(ProposeError::NoLeader(PROPOSE_DEADLINE));
            }
            if tried.is_some() {
                metrics::counter!("cutover_raft_forward_failures_total").increment(1);
            }
            // The leader tried, or the one known now (even this node, in a
            // transition where it cannot take the write).
            let known = tried.or(self.raft.metrics().borrow_watched().current_leader);
            self.leader_change(known, left.min(RETRY_WAIT)).await;
        }
    }

    /// Waits, at most `max`, until this node knows a leader other than
    /// `known`: what a write or read that found no leader, or could not
    /// reach `known`, waits for before it tries again. A leader that is
    /// down refuses connections at once, so without the wait a follower
    /// retried in a loop until the election ended, a connection attempt
    /// (and a socket) per turn (found by `tests/netsim.rs`: ports
    /// exhausted). Each call's receiver is new, so the first `changed`
    /// answers at once for any change ever made: the leader is compared,
    /// not the notification trusted.
    async fn leader_change(&self, known: Option<NodeId>, max: Duration) {
        let mut m = self.raft.metrics();
        let changed = async {
            loop {
                if m.borrow_watched().current_leader != known {
                    return;
                }
                if m.changed().await.is_err() {
                    return std::future::pending().await;
                }
            }
        };
        let _ = tokio::time::timeout(max, changed).await;
    }

    /// Sends a proposal to the leader at `addr`. The outer error means "try
    /// again" (the leader moved or is unreachable).
    async fn forward(
        &self,
        addr: &str,
        proposal: &Proposal,
        timeout: Duration,
    ) -> Result<Result<CommandResponse, ProposeError>, String> {
        if timeout.is_zero() {
            return Err(format!("forward to {addr}: the write's deadline has passed"));
        }
        let mut client = self.peers.client(addr).map_err(|e| e.to_string())?;
        let command = codec::encode(proposal).map_err(|e| e.to_string())?;
        let mut req = tonic::Request::new(ProposeRequest { command });
        req.set_timeout(timeout);
        let reply = client
            .propose(req)
            .await
            .map_err(|s| format!("forward to {addr}: {}", s.message()))?;
        let r: Result<CommandResponse, String> =
            codec::decode(&reply.into_inner().payload).map_err(|e| e.to_string())?;
        Ok(r.map_err(ProposeError::Rejected))
    }

    /// Relays agent liveness to the leader (`RaftService.RelayAgents`).
    /// `Ok` only when a node leading under a fresh lease took it: then this
    /// node knows that, within `timeout`, a leader with a quorum heard it.
    pub async fn relay_agents(
        &self,
        agents: Vec<cutover_shared::proto::RelayedAgent>,
        timeout: Duration,
    ) -> Result<(), String> {
        let (id, addr) = self.leader().ok_or("no leader known")?;
        if id == self.node_id {
            return Err("this node is the leader".into());
        }
        let mut client = self.peers.client(&addr).map_err(|e| e.to_string())?;
        let mut req = tonic::Request::new(cutover_shared::proto::RelayAgentsRequest { agents });
        req.set_timeout(timeout);
        client
            .relay_agents(req)
            .await
            .map(|_| ())
            .map_err(|s| format!("relay to {addr}: {:?}: {}", s.code(), s.message()))
    }

    /// Raft progress and membership as this node sees them.
    pub fn status(&self) -> RaftStatus {
        let m = self.raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let members: Vec<_> = membership
            .nodes()
            .map(|(id, n)| (*id, n.addr.clone(), voters.contains(id)))
            .collect();
        let feature_levels = members
            .iter()
            .filter_map(|(id, _, _)| {
                let level = if *id == self.node_id {
                    Some(level::FEATURE_LEVEL)
                } else {
                    self.peers.levels.get(*id).flatten()
                };
                level.map(|l| (*id, l))
            })
            .collect();
        RaftStatus {
            node_id: self.node_id,
            leader: m.current_leader,
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            commit_index: m.local_committed.as_ref().map_or(0, |l| l.index),
            applied_index: m.last_applied.as_ref().map_or(0, |l| l.index),
            snapshot_index: m.snapshot.as_ref().map_or(0, |l| l.index),
            purged_index: m.purged.as_ref().map_or(0, |l| l.index),
            server_state: match m.state {
                ServerState::Leader => "leader",
                ServerState::Follower => "follower",
                ServerState::Candidate => "candidate",
                ServerState::Learner => "learner",
                ServerState::Shutdown => "shutdown",
            },
            members,
            feature_levels,
        }
    }

    /// The stored snapshot's last log index and encoded size in bytes.
    pub fn snapshot_size(&self) -> Option<(u64, usize)> {
        let (db, snapshots) = (self.db.upgrade()?, self.snapshots.upgrade()?);
        state_machine::stored_snapshot_size(&snapshots, &db).ok().flatten()
    }

    /// Builds a snapshot now (and lets the log be purged behind it).
    pub async fn snapshot_now(&self) -> Result<(), String> {
        self.raft.trigger().snapshot().await.map_err(|e| e.to_string())
    }

    /// Stops Raft and waits (bounded) until its storage is closed, so the
    /// same data directory can be opened again at once. The storage stays
    /// valid for a restart.
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!("raft shutdown: {e}");
        }
        // The audit file is written by a thread of its own: done with it
        // before a next instance in this process reopens it.
        let shared = self.shared.clone();
        if tokio::task::spawn_blocking(move || shared.audit.close()).await.is_err() {
            tracing::warn!("audit file thread did not stop cleanly");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let holders = || self.db.strong_count() + self.snapshots.strong_count();
        while holders() > 0 {
            if Instant::now() > deadline {
                tracing::warn!("raft storage still open 5 s after shutdown ({} holders)", holders());
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The `RaftService` implementation for this node.
    pub fn grpc_service(
        &self,
        agents: Arc<dyn AgentRelay>,
    ) -> cutover_shared::proto::raft_service_server::RaftServiceServer<service::RaftGrpc> {
        cutover_shared::proto::raft_service_server::RaftServiceServer::new(service::RaftGrpc {
            consensus: self.clone(),
            agents,
        })
        .max_decoding_message_size(MAX_PEER_MESSAGE)
        .max_encoding_message_size(MAX_PEER_MESSAGE)
    }

    /// Exports Raft progress as Prometheus gauges, labelled by node.
    fn spawn_metrics(&self) {
        let mut rx = self.raft.metrics();
        let node = self.node_id.to_string();
        tokio::spawn(async move {
            loop {
                {
                    let m = rx.borrow_and_update();
                    let l = [("node", node.clone())];
                    metrics::gauge!("cutover_raft_term", &l).set(m.current_term as f64);
                    metrics::gauge!("cutover_raft_leader_id", &l).set(m.current_leader.unwrap_or(0) as f64);
                    metrics::gauge!("cutover_raft_is_leader", &l).set(if m.state == ServerState::Leader {
                        1.0
                    } else {
                        0.0
                    });
                    metrics::gauge!("cutover_raft_last_log_index", &l).set(m.last_log_index.unwrap_or(0) as f64);
                    metrics::gauge!("cutover_raft_commit_index", &l)
                        .set(m.local_committed.as_ref().map_or(0, |x| x.index) as f64);
                    metrics::gauge!("cutover_raft_applied_index", &l)
                        .set(m.last_applied.as_ref().map_or(0, |x| x.index) as f64);
                }
                // For a scrape every few seconds: refreshed at most every
                // `METRICS_REFRESH`, not on each of the several changes of
                // the metrics per write (each a wake-up of this task).
                tokio::time::sleep(METRICS_REFRESH).await;
                if rx.changed().await.is_err() {
                    break;
                }
            }
        });
    }
}

/// openraft's own conformance suite for storage (`openraft::testing::log`),
/// run against the log store and state machine as the node opens them: the
/// log store acknowledges appends before they are on disk (readable at
/// once, flushed later), which the suite's reads, truncations, purges and
/// snapshot installs must not tell apart from a plain store.
#[cfg(test)]
mod storage_suite {
    use std::sync::Arc;

    use openraft::StorageError;
    use openraft::errors::ErrorSource;
    use openraft::testing::log::{StoreBuilder, Suite};

    use super::TypeConfig;
    use super::log_store::LogStore;
    use super::state_machine::StateMachineStore;

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for Builder {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError<TypeConfig>> {
            let io = |e: &dyn std::fmt::Display| {
                StorageError::read(
                    <openraft::type_config::alias::ErrorSourceOf<TypeConfig> as ErrorSource>::from_string(e),
                )
            };
            let dir = tempfile::tempdir().map_err(|e| io(&e))?;
            let db = Arc::new(
                super::open_database(&dir.path().join("raft.redb"))
                    .await
                    .map_err(|e| io(&e))?,
            );
            let snapshots = Arc::new(
                super::open_database(&dir.path().join("snapshot.redb"))
                    .await
                    .map_err(|e| io(&e))?,
            );
            let log = LogStore::new(db.clone()).map_err(|e| io(&e))?;
            let sm = StateMachineStore::open(snapshots, &db, dir.path()).map_err(|e| io(&e))?;
            Ok((dir, log, sm))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_stores_pass_openrafts_storage_suite() {
        Suite::test_all(Builder).await.expect("openraft's storage suite");
    }
}
