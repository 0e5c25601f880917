//! The agent side of the coordinator: the `AgentService.Connect` stream,
//! agent liveness, and task dispatch.
//!
//! Every node serves agents, as Nomad's and Consul's servers serve their
//! clients: an agent dials a coordinator at random and stays with it, so
//! each node holds a share of the fleet's connections (HTTP/2 and TLS state
//! is most of what an agent costs a node: BENCHMARKS.md, "fanin"), and a
//! leader change does not make the whole fleet reconnect. A node sends its
//! agents the tasks its replicated state assigns them, and their reports go
//! to the leader as writes (forwarded from a follower).
//!
//! Heartbeats stay out of the log: the node holding a session keeps
//! `last_seen` in memory, a follower relays the sessions heard from to the
//! leader every tenth of an interval (`RaftService.RelayAgents`), and the
//! leader commits only transitions (up on register, down after
//! `DEAD_AFTER_INTERVALS` silent heartbeat intervals, counted from the
//! latest heartbeat any node heard or relayed). A new leader starts every
//! agent's clock at the moment it took over, so agents that nobody relays
//! to it are marked down just as promptly.
//!
//! An agent's heartbeat acknowledgement renews its lease (it fences its own
//! primaries when cut off: `dr`), so a node acknowledges only while it
//! *serves*: it leads under a fresh lease, or the leader answered one of its
//! relays within the last heartbeat interval (only a leader under a fresh
//! lease answers them). A node that does not serve takes no new agents
//! (they are redirected to the leader it knows) and sends no tasks; its
//! agents, unacknowledged, find another node after three intervals.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cutover_shared::domain::{AgentState, ClusterRef, TaskResult, now_unix_ms, validate_name};
use cutover_shared::grpc::caller;
use cutover_shared::proto::agent_service_server::AgentService;
use cutover_shared::proto::{self, ConnectRequest, ConnectResponse, connect_request, connect_response};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::raft::{Consensus, Proposal, ProposeError};
use crate::state::Command;

/// Silent heartbeat intervals after which an agent is marked down. With the
/// reaper ticking every tenth of an interval, "down" is committed well within
/// three intervals.
pub const DEAD_AFTER_INTERVALS: f64 = 2.5;

/// Metadata key carrying the leader's address on a refused agent stream.
pub const LEADER_METADATA: &str = "cutover-leader";

/// Registrations one leader has in flight at once (each waits for its
/// `AgentUp` to commit). Past it, a registration is refused at once with
/// `RESOURCE_EXHAUSTED`, and the agent retries after its jittered backoff:
/// after a leader change the whole fleet reconnects together, and a leader
/// that queued every registration would time them all out together.
pub const MAX_REGISTERING: usize = 512;

/// Admission control for registrations, as Consul and Nomad servers limit
/// concurrent RPCs per client: a bounded number in flight, the rest refused
/// without queueing.
pub struct Admission {
    slots: Arc<tokio::sync::Semaphore>,
}

impl Admission {
    pub fn new(limit: usize) -> Self {
        Self {
            slots: Arc::new(tokio::sync::Semaphore::new(limit)),
        }
    }

    /// A slot held until the permit drops, or a `RESOURCE_EXHAUSTED`
    /// status that tells the agent to back off (with the standard gRPC
    /// retry-pushback hint).
    pub fn admit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        self.slots.clone().try_acquire_owned().map_err(|_| {
            metrics::counter!("cutover_agent_registrations_refused_total").increment(1);
            let mut status = Status::resource_exhausted(
                "too many agents registering with this coordinator at once; retry after a backoff",
            );
            status.metadata_mut().insert(
                "grpc-retry-pushback-ms",
                tonic::metadata::MetadataValue::from_static("1000"),
            );
            status
        })
    }
}

/// What a session's stream sends, boxed: a channel allocates its slots in
/// blocks of 32 up front, and an unboxed `ConnectResponse` made that block
/// kilobytes per agent for messages that are mostly heartbeat acks.
type Outbound = Box<ConnectResponse>;

struct Session {
    id: u64,
    tx: mpsc::Sender<Outbound>,
    last_seen: Instant,
    /// Tasks already sent on this session.
    sent: HashSet<String>,
    /// A task did not fit in the session's queue: the reaper's next tick
    /// sends it (not only the next new task anywhere, which may never come).
    backlogged: bool,
}

/// Agent sessions on this node, and the leader's view of the others'.
pub struct AgentHub {
    consensus: Consensus,
    heartbeat: Duration,
    sessions: Mutex<HashMap<ClusterRef, Session>>,
    /// On the leader: the latest heartbeat other nodes relayed per agent,
    /// with the registration it came on. Emptied when leadership starts.
    relayed: Mutex<HashMap<ClusterRef, (u64, Instant)>>,
    /// When this node's latest relay the leader answered was sent.
    relay_answered: tokio::sync::watch::Sender<Option<Instant>>,
    leader_since: Mutex<Instant>,
    /// Set when the node shuts down: no new sessions after that.
    closed: std::sync::atomic::AtomicBool,
    registering: Admission,
}

fn propose_status(e: ProposeError) -> Status {
    match e {
        ProposeError::Rejected(m) => Status::failed_precondition(m),
        other => Status::unavailable(other.to_string()),
    }
}

impl AgentHub {
    pub fn new(consensus: Consensus, heartbeat: Duration) -> Arc<Self> {
        Arc::new(Self {
            consensus,
            heartbeat,
            sessions: Mutex::new(HashMap::new()),
            relayed: Mutex::new(HashMap::new()),
            relay_answered: tokio::sync::watch::Sender::new(None),
            leader_since: Mutex::new(Instant::now()),
            closed: false.into(),
            registering: Admission::new(MAX_REGISTERING),
        })
    }

    fn dead_after(&self) -> Duration {
        self.heartbeat.mul_f64(DEAD_AFTER_INTERVALS)
    }

    /// Number of agents with an open stream to this node.
    pub fn connected(&self) -> usize {
        self.sessions.lock().expect("sessions").len()
    }

    /// Whether this node may acknowledge heartbeats, take registrations and
    /// send tasks: it leads under a fresh lease, or such a leader answered
    /// a relay of its sent within the last heartbeat interval.
    pub fn serving(&self) -> bool {
        self.consensus.is_leader() || self.relay_fresh(&self.relay_answered.borrow())
    }

    fn relay_fresh(&self, answered: &Option<Instant>) -> bool {
        answered.is_some_and(|t| t.elapsed() < self.heartbeat)
    }

    /// On a follower, every tenth of a heartbeat interval: tells the leader
    /// which of this node's agents heartbeated since the last relay it
    /// answered (an empty relay too: its answer is what lets this node
    /// serve). Runs for as long as the node lives.
    pub async fn relay(self: Arc<Self>) {
        let mut ticker = tokio::time::interval((self.heartbeat / 10).max(Duration::from_millis(10)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Heartbeats heard since this instant are not yet known relayed.
        let mut unrelayed_since = Instant::now();
        loop {
            ticker.tick().await;
            if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            if self.consensus.in_leader_state() {
                continue;
            }
            let started = Instant::now();
            let agents: Vec<proto::RelayedAgent> = self
                .sessions
                .lock()
                .expect("sessions")
                .iter()
                .filter(|(_, s)| s.last_seen >= unrelayed_since)
                .map(|(c, s)| proto::RelayedAgent {
                    region: c.region.clone(),
                    cluster: c.cluster.clone(),
                    session: s.id,
                })
                .collect();
            match self.consensus.relay_agents(agents, self.heartbeat / 2).await {
                Ok(()) => {
                    unrelayed_since = started;
                    self.relay_answered.send_replace(Some(started));
                }
                Err(e) => tracing::debug!("agent liveness not relayed: {e}"),
            }
        }
    }

    /// Ends the sessions whose registration this node's state shows
    /// replaced by another (the agent registered again, elsewhere) or
    /// marked down (the leader judged it silent, say while this node could
    /// not relay): the agent must register again to be served.
    fn end_superseded(&self) {
        let held: Vec<(ClusterRef, u64)> = {
            let sessions = self.sessions.lock().expect("sessions");
            if sessions.is_empty() {
                return;
            }
            sessions.iter().map(|(c, s)| (c.clone(), s.id)).collect()
        };
        // A session is listed only once this node has applied its
        // registration, so a state that shows another one shows a newer one.
        let recorded: Vec<Option<(u64, bool)>> = self.consensus.read(|s| {
            held.iter()
                .map(|(c, _)| {
                    s.agents
                        .get(&c.to_string())
                        .map(|a| (a.session, a.state == AgentState::Up))
                })
                .collect()
        });
        let mut ended = 0;
        {
            let mut sessions = self.sessions.lock().expect("sessions");
            for ((cluster, id), rec) in held.iter().zip(recorded) {
                let current = rec.is_some_and(|(session, up)| session == *id && up);
                if !current && sessions.get(cluster).is_some_and(|s| s.id == *id) {
                    sessions.remove(cluster);
                    ended += 1;
                }
            }
        }
        if ended > 0 {
            tracing::info!(sessions = ended, "agent sessions ended: replaced or marked down");
            self.publish_connected();
        }
    }

    /// Sends what this node has not sent yet, if it serves and the tasks
    /// changed since `seen_generation`.
    fn dispatch_changed(self: &Arc<Self>, seen_generation: &mut u64) {
        if self.sessions.lock().expect("sessions").is_empty() || !self.serving() {
            return;
        }
        let generation = self.consensus.read(|s| s.task_generation);
        if generation != *seen_generation {
            *seen_generation = generation;
            self.dispatch_all();
        }
    }

    /// Runs the node's agent duties for as long as it lives: sending its
    /// agents new tasks, ending sessions the state superseded, and, while
    /// it leads, reaping silent agents.
    pub async fn run(self: Arc<Self>) {
        let mut leadership = self.consensus.leadership();
        let mut applied = self.consensus.applied();
        // A tenth of an interval: the reaper's lag adds to the time a silent
        // agent takes to be marked down.
        let tick = self.heartbeat / 10;
        let mut ticker = tokio::time::interval(tick.max(Duration::from_millis(10)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seen_generation = u64::MAX;
        // The applied index `end_superseded` last looked at: a session is
        // listed only once its registration is applied, so only a later
        // apply can supersede it, and a tick with none has nothing to end.
        let mut superseded_checked = 0;
        self.publish_connected();
        loop {
            tokio::select! {
                r = leadership.changed() => {
                    if r.is_err() { return; }
                    // Sessions stay whatever the role: a deposed leader
                    // relays its agents to the next one. Only the clocks
                    // start over with a leadership.
                    if *leadership.borrow_and_update() {
                        *self.leader_since.lock().expect("leader_since") = Instant::now();
                        self.relayed.lock().expect("relayed").clear();
                    }
                    seen_generation = u64::MAX;
                    self.publish_connected();
                }
                r = applied.changed() => {
                    if r.is_err() { return; }
                    self.dispatch_changed(&mut seen_generation);
                }
                _ = ticker.tick() => {
                    if *leadership.borrow() {
                        self.reap().await;
                    }
                    let applied_now = *applied.borrow();
                    if applied_now != superseded_checked {
                        superseded_checked = applied_now;
                        self.end_superseded();
                    }
                    // A node that did not serve for a while sends what it
                    // missed once it does again.
                    self.dispatch_changed(&mut seen_generation);
                    if self.serving() {
                        self.dispatch_backlog();
                    }
                }
            }
        }
    }

    fn publish_connected(&self) {
        metrics::gauge!("cutover_agents_connected", "node" => self.consensus.node_id().to_string())
            .set(self.connected() as f64);
    }

    /// Commits `AgentDown` for every agent recorded up that has been silent
    /// for too long.
    async fn reap(&self) {
        let now = Instant::now();
        let since = *self.leader_since.lock().expect("leader_since");
        let wall_now = now_unix_ms();
        let up: Vec<(ClusterRef, u64, i64)> = self.consensus.read(|s| {
            s.agents
                .values()
                .filter(|a| a.state == AgentState::Up)
                .map(|a| (a.cluster.clone(), a.session, a.since_unix_ms))
                .collect()
        });
        // Judged under both locks at once (taken once per tick, not per
        // agent: a leader may list tens of thousands), proposed after.
        let silent: Vec<(ClusterRef, u64, Duration)> = {
            let mut sessions = self.sessions.lock().expect("sessions");
            let mut relayed = self.relayed.lock().expect("relayed");
            let mut silent = Vec::new();
            for (cluster, session, up_since_ms) in up {
                // Only the registration the state records counts, heard
                // here or relayed. (A session here under another id is one
                // the state has moved past: `end_superseded` ends it.)
                let ours = |id: u64| id == session || session == 0;
                let local = sessions.get(&cluster).filter(|s| ours(s.id)).map(|s| s.last_seen);
                let far = relayed.get(&cluster).filter(|(id, _)| ours(*id)).map(|(_, t)| *t);
                let last = match local.into_iter().chain(far).max() {
                    Some(heard) => heard.max(since),
                    // Not heard from here or through a relay: the agent is
                    // gone, or its AgentUp has committed and neither the
                    // registration nor a relay of it has arrived yet.
                    // Either way its clock starts at that AgentUp, not
                    // earlier: counting from when this node began leading
                    // marked just-registered agents down.
                    None => {
                        let age = Duration::from_millis(wall_now.saturating_sub(up_since_ms).max(0) as u64);
                        since.max(now.checked_sub(age).unwrap_or(now))
                    }
                };
                if now.duration_since(last) > self.dead_after() {
                    if local.is_some() {
                        sessions.remove(&cluster);
                    }
                    // A session on another node ends there once its state
                    // shows the agent down (`end_superseded`).
                    relayed.remove(&cluster);
                    silent.push((cluster, session, now.duration_since(last)));
                }
            }
            silent
        };
        for (cluster, session, silent_for) in silent {
            tracing::warn!(agent = %cluster, "no heartbeat for {silent_for:?}: marking agent down");
            // Names the registration it judged: if the agent registered
            // again meanwhile, the state machine ignores this.
            let cmd = Command::AgentDown {
                cluster: cluster.clone(),
                at_unix_ms: now_unix_ms(),
                session,
            };
            if let Err(e) = self.consensus.propose(Proposal::Command(cmd)).await {
                tracing::warn!(agent = %cluster, "could not commit agent down: {e}");
            }
        }
    }

    fn dispatch_all(self: &Arc<Self>) {
        let pending = self.consensus.read(|s| s.unfinished_tasks_by_cluster(None));
        self.send(pending);
    }

    /// Retries the sessions whose queue was full at the last dispatch.
    fn dispatch_backlog(self: &Arc<Self>) {
        let backlogged: Vec<ClusterRef> = {
            let mut sessions = self.sessions.lock().expect("sessions");
            sessions
                .iter_mut()
                .filter(|(_, s)| s.backlogged)
                .map(|(c, s)| {
                    s.backlogged = false;
                    c.clone()
                })
                .collect()
        };
        for cluster in backlogged {
            self.dispatch(&cluster);
        }
    }

    /// Sends every unfinished task of `cluster` that this session has not
    /// seen yet. Re-sending after a reconnect is safe: agents dedupe by id.
    fn dispatch(self: &Arc<Self>, cluster: &ClusterRef) {
        let pending = self.consensus.read(|s| s.unfinished_tasks_by_cluster(Some(cluster)));
        self.send(pending);
    }

    /// Sends each session the tasks of `pending` it has not had, in order.
    /// One pass over the state serves every session, and only what goes
    /// out gets its content (the app definition, a bundle) attached: with
    /// many agents and many running operations, hydrating every unfinished
    /// task for every session on every new step was the hub's main cost.
    fn send(self: &Arc<Self>, mut pending: HashMap<ClusterRef, Vec<cutover_shared::domain::TaskSpec>>) {
        {
            let sessions = self.sessions.lock().expect("sessions");
            pending.retain(|cluster, tasks| {
                let Some(session) = sessions.get(cluster) else {
                    return false;
                };
                tasks.retain(|t| !session.sent.contains(&t.task_id));
                !tasks.is_empty()
            });
        }
        if pending.is_empty() {
            return;
        }
        self.consensus.read(|s| {
            for t in pending.values_mut().flatten() {
                s.hydrate(&mut t.params);
            }
        });
        let mut sent_now = Vec::new();
        {
            let mut sessions = self.sessions.lock().expect("sessions");
            for (cluster, tasks) in pending {
                let Some(session) = sessions.get_mut(&cluster) else {
                    continue;
                };
                for t in tasks {
                    if session.sent.contains(&t.task_id) {
                        continue;
                    }
                    let id = t.task_id.clone();
                    let msg = ConnectResponse {
                        message: Some(connect_response::Message::Task(t.into())),
                    };
                    if session.tx.try_send(Box::new(msg)).is_err() {
                        // Full (the reaper's tick retries) or closed (the
                        // agent's reconnect does).
                        session.backlogged = true;
                        break;
                    }
                    session.sent.insert(id.clone());
                    sent_now.push((cluster.clone(), id));
                }
            }
        }
        for (cluster, task_id) in sent_now {
            tracing::info!(agent = %cluster, task = %task_id, "task dispatched");
            let hub = self.clone();
            tokio::spawn(async move {
                let _ = hub
                    .consensus
                    .propose(Proposal::Command(Command::TaskDispatched { task_id }))
                    .await;
            });
        }
    }

    /// Refuses an agent while this node does not serve, with the leader's
    /// address when it knows one. A follower that knows a leader but has
    /// had no relay answered yet (it just started, or a leader was just
    /// elected) waits for one, up to half an interval: refused, the agent
    /// would go to the leader and stay, and a fleet starting with its
    /// coordinators would pile onto one node.
    async fn refuse_unless_serving(&self) -> Result<(), Status> {
        if self.serving() {
            return Ok(());
        }
        if self
            .consensus
            .leader()
            .is_some_and(|(id, _)| id != self.consensus.node_id())
        {
            let mut answered = self.relay_answered.subscribe();
            let fresh = answered.wait_for(|t| self.relay_fresh(t));
            if let Ok(Ok(_)) = tokio::time::timeout(self.heartbeat / 2, fresh).await {
                return Ok(());
            }
        }
        let mut status =
            Status::unavailable("this coordinator cannot reach a leader holding a quorum; reconnect to the leader");
        if let Some((_, addr)) = self.consensus.leader()
            && let Ok(v) = addr.parse()
        {
            status.metadata_mut().insert(LEADER_METADATA, v);
        }
        Err(status)
    }
}

/// `AgentService` over an [`AgentHub`].
pub struct AgentApi {
    pub hub: Arc<AgentHub>,
}

type ConnectStream = Pin<Box<dyn Stream<Item = Result<ConnectResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for AgentApi {
    type ConnectStream = ConnectStream;

    async fn connect(&self, req: Request<Streaming<ConnectRequest>>) -> Result<Response<ConnectStream>, Status> {
        let identity = caller(&req)?;
        let cluster = identity
            .agent_cluster()
            .ok_or_else(|| Status::permission_denied(format!("{identity} is not an agent")))?;
        let hub = self.hub.clone();
        hub.refuse_unless_serving().await?;
        let mut inbound = req.into_inner();
        let first = inbound
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("stream closed before register"))??;
        let Some(connect_request::Message::Register(reg)) = first.message else {
            return Err(Status::invalid_argument("the first message must be register"));
        };
        // Taken once the agent has sent its registration (a client that
        // never does holds no slot), held until it is committed and the
        // session listed.
        let _admitted = hub.registering.admit()?;
        if let Some(claimed) = reg.cluster.as_ref()
            && (!claimed.region.is_empty() || !claimed.cluster.is_empty())
            && (claimed.region != cluster.region || claimed.cluster != cluster.cluster)
        {
            return Err(Status::permission_denied(format!(
                "certificate binds this agent to {cluster}; it cannot act as {}/{}",
                claimed.region, claimed.cluster
            )));
        }
        // Unique across leaders, so a stale AgentDown from any node's reaper
        // names a registration that is not the current one.
        let session_id = loop {
            let id: u64 = rand::random();
            if id != 0 {
                break id;
            }
        };
        let up = Command::AgentUp {
            session: session_id,
            cluster: cluster.clone(),
            agent_version: reg.agent_version.chars().take(64).collect(),
            task_kinds: reg
                .task_kinds
                .into_iter()
                .take(64)
                .map(|k| k.chars().take(63).collect())
                .collect(),
            // Names only: anything else is dropped, as a bad name could
            // never match an app.
            traffic_apps: reg
                .traffic_apps
                .into_iter()
                .take(256)
                .filter(|a| cutover_shared::domain::validate_name("app", a).is_ok())
                .collect(),
            at_unix_ms: now_unix_ms(),
        };
        let committed = hub
            .consensus
            .propose(Proposal::Command(up))
            .await
            .map_err(propose_status)?;
        // What `Registered` carries (the epochs) is read from this node's
        // state, so it must include everything committed before this
        // registration, and the session is listed only once the state
        // shows it (`end_superseded` ends any it does not): a follower
        // answers once it has applied it.
        let mut applied = hub.consensus.applied();
        let caught_up = applied.wait_for(|i| *i >= committed.log_index);
        if !matches!(tokio::time::timeout(hub.heartbeat, caught_up).await, Ok(Ok(_))) {
            return Err(Status::unavailable(
                "this coordinator has not caught up with the agent's registration; retry",
            ));
        }

        let (tx, rx) = mpsc::channel::<Outbound>(256);
        let leader = hub.consensus.leader().map_or(hub.consensus.node_id(), |(id, _)| id);
        tx.try_send(Box::new(ConnectResponse {
            message: Some(connect_response::Message::Registered(proto::Registered {
                session_id: session_id.to_string(),
                leader_node_id: leader,
                heartbeat_interval_ms: hub.heartbeat.as_millis() as u32,
                epochs: hub.consensus.read(|s| {
                    s.dr_epochs
                        .iter()
                        .map(|(app, e)| proto::AppEpoch {
                            app: app.clone(),
                            epoch: e.epoch,
                            primary: e.primary.as_ref().map(ToString::to_string).unwrap_or_default(),
                        })
                        .collect()
                }),
            })),
        }))
        .map_err(|_| Status::internal("session channel closed"))?;
        {
            // Checked under the lock that `close_all` and a leadership loss
            // take: a session registered while the node was stopping or
            // stepping down would otherwise outlive them.
            let mut sessions = hub.sessions.lock().expect("sessions");
            if hub.closed.load(std::sync::atomic::Ordering::SeqCst) || !hub.serving() {
                return Err(Status::unavailable(
                    "this coordinator lost the leader while the agent registered",
                ));
            }
            sessions.insert(
                cluster.clone(),
                Session {
                    id: session_id,
                    tx: tx.clone(),
                    last_seen: Instant::now(),
                    sent: HashSet::new(),
                    backlogged: false,
                },
            );
        }
        hub.publish_connected();
        tracing::info!(agent = %cluster, session = session_id, "agent registered");
        hub.dispatch(&cluster);

        // Reports are committed by one writer per session, so a slow commit
        // never delays heartbeat handling. What waits for it is bounded:
        // progress and app statuses are coalesced to the latest per task and
        // per app, and results queue in a bounded channel (an agent that
        // overfills it loses its session and replays them on reconnect).
        let reports = Arc::new(Reports::default());
        // Boxed for the same reason as `Outbound`: a `Command` is hundreds
        // of bytes, and every session allocates its channel's first block.
        let (result_tx, result_rx) = mpsc::channel::<Box<Command>>(MAX_QUEUED_RESULTS);
        tokio::spawn(write_reports(hub.clone(), reports.clone(), result_rx));
        let reader_hub = hub.clone();
        let reader_cluster = cluster.clone();
        tokio::spawn(async move {
            while let Some(msg) = inbound.next().await {
                let Ok(msg) = msg else { break };
                match msg.message {
                    Some(connect_request::Message::Heartbeat(hb)) => {
                        metrics::counter!("cutover_agent_heartbeats_total").increment(1);
                        // Heard either way (a relay carries it once relays
                        // are answered again); acknowledged, which renews
                        // the agent's lease, only while this node serves.
                        let serving = reader_hub.serving();
                        let sessions = &mut *reader_hub.sessions.lock().expect("sessions");
                        match sessions.get_mut(&reader_cluster) {
                            Some(s) if s.id == session_id => {
                                s.last_seen = Instant::now();
                                if !serving {
                                    continue;
                                }
                                let ack = connect_response::Message::HeartbeatAck(proto::HeartbeatAck {
                                    sequence: hb.sequence,
                                });
                                let _ = s.tx.try_send(Box::new(ConnectResponse { message: Some(ack) }));
                            }
                            // Replaced by a newer session or dropped on a
                            // leadership change: stop reading this one.
                            _ => break,
                        }
                    }
                    Some(connect_request::Message::Progress(p)) => {
                        // Refused before any proposal: a report for a task
                        // this agent does not hold costs no log entry.
                        if !reader_hub
                            .consensus
                            .read(|s| s.task_open_for(&p.task_id, &reader_cluster))
                        {
                            metrics::counter!("cutover_agent_reports_refused_total", "kind" => "progress").increment(1);
                            continue;
                        }
                        reports.progress(Command::TaskProgress {
                            from: reader_cluster.clone(),
                            progress: p.into(),
                        });
                    }
                    Some(connect_request::Message::Result(r)) => {
                        let result: TaskResult = r.into();
                        if !reader_hub
                            .consensus
                            .read(|s| s.task_open_for(&result.task_id, &reader_cluster))
                        {
                            metrics::counter!("cutover_agent_reports_refused_total", "kind" => "result").increment(1);
                            continue;
                        }
                        tracing::info!(agent = %reader_cluster, task = %result.task_id, success = result.success, replayed = result.replayed, "task result");
                        let cmd = Command::TaskFinished {
                            from: reader_cluster.clone(),
                            result,
                            at_unix_ms: now_unix_ms(),
                        };
                        if result_tx.try_send(Box::new(cmd)).is_err() {
                            tracing::warn!(agent = %reader_cluster, "too many results waiting to commit: ending the session (the agent replays them)");
                            break;
                        }
                    }
                    Some(connect_request::Message::AppStatus(r)) => {
                        if validate_name("app", &r.app).is_ok()
                            && let Some(status) = r.status
                        {
                            reports.app_status(Command::AppStatusReported {
                                from: reader_cluster.clone(),
                                app: r.app,
                                status: status.into(),
                            });
                        }
                    }
                    Some(connect_request::Message::DatabaseStatus(r)) => {
                        // Malformed entries are dropped one by one: the
                        // rest of the report still counts. Stamped with
                        // the coordinator's clock on arrival (the leader's:
                        // it re-dates a forwarded report, `stamp_arrival`),
                        // not the agent's:
                        // a database's unreachable-since, a stray
                        // primary's freshness and a standby's data-loss
                        // window are all compared with leader-stamped
                        // times (an agent's up/down), and an agent clock
                        // behind the leader's by more than
                        // `failover_after_secs` would make its first
                        // unreachable report an old loss.
                        let at = now_unix_ms();
                        let databases: Vec<_> = r
                            .databases
                            .into_iter()
                            .take(crate::state::MAX_REPORTED_DATABASES)
                            .filter_map(|d| match cutover_shared::convert::database_status_from_proto(d) {
                                Ok(mut d) => {
                                    d.observed_at_unix_ms = at;
                                    d.session = session_id;
                                    Some(d)
                                }
                                Err(e) => {
                                    tracing::warn!(agent = %reader_cluster, "database status refused: {e}");
                                    None
                                }
                            })
                            .collect();
                        reports.database_status(Command::DatabaseStatusReported {
                            from: reader_cluster.clone(),
                            databases,
                        });
                    }
                    Some(connect_request::Message::RegionHealth(r)) => {
                        match cutover_shared::convert::region_health_from_proto(&r.regions) {
                            Ok(regions) if validate_name("app", &r.app).is_ok() => {
                                reports.region_health(Command::RegionHealthReported {
                                    from: reader_cluster.clone(),
                                    app: r.app,
                                    regions,
                                    at_unix_ms: now_unix_ms(),
                                });
                            }
                            Ok(_) => tracing::warn!(agent = %reader_cluster, "region health refused: invalid app name"),
                            Err(e) => tracing::warn!(agent = %reader_cluster, "region health refused: {e}"),
                        }
                    }
                    Some(connect_request::Message::Register(_)) | None => {
                        tracing::warn!(agent = %reader_cluster, "unexpected message on agent stream");
                    }
                }
            }
            // The session stays, so its last_seen lets the reaper decide when
            // the agent is down; dropping its sender ends our half of the
            // stream even if the agent never resets it.
            if let Some(s) = reader_hub.sessions.lock().expect("sessions").get_mut(&reader_cluster)
                && s.id == session_id
            {
                s.tx = mpsc::channel(1).0;
            }
            tracing::info!(agent = %reader_cluster, session = session_id, "agent stream closed");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(|m| Ok(*m)))))
    }
}

/// Results that may wait for their commit, per session.
const MAX_QUEUED_RESULTS: usize = 1024;
/// Results (with the progress before them) one session proposes at once.
const RESULTS_PER_BATCH: usize = 64;
/// How long the writer gathers progress before committing the latest of
/// each task: at most one progress entry per task per window.
const PROGRESS_WINDOW: Duration = Duration::from_millis(250);

/// A session's progress and app statuses waiting for the writer, the
/// latest per task and per app: their size is bounded by the agent's open
/// tasks and apps, whatever it sends.
#[derive(Default)]
struct Reports {
    pending: Mutex<HashMap<String, Command>>,
    wake: tokio::sync::Notify,
}

impl Reports {
    fn progress(&self, cmd: Command) {
        if let Command::TaskProgress { progress, .. } = &cmd {
            let key = format!("task/{}", progress.task_id);
            self.pending.lock().expect("reports").insert(key, cmd);
            self.wake.notify_one();
        }
    }

    fn app_status(&self, cmd: Command) {
        if let Command::AppStatusReported { app, .. } = &cmd {
            let key = format!("app/{app}");
            self.pending.lock().expect("reports").insert(key, cmd);
            self.wake.notify_one();
        }
    }

    fn region_health(&self, cmd: Command) {
        if let Command::RegionHealthReported { app, .. } = &cmd {
            let key = format!("regions/{app}");
            self.pending.lock().expect("reports").insert(key, cmd);
            self.wake.notify_one();
        }
    }

    fn database_status(&self, cmd: Command) {
        self.pending.lock().expect("reports").insert("db".into(), cmd);
        self.wake.notify_one();
    }

    fn take(&self) -> Vec<Command> {
        self.pending.lock().expect("reports").drain().map(|(_, c)| c).collect()
    }
}

/// Commits a session's reports: results in order as they come, progress and
/// statuses coalesced per `PROGRESS_WINDOW`. Ends when the session's reader
/// does (it holds the result sender).
async fn write_reports(hub: Arc<AgentHub>, reports: Arc<Reports>, mut results: mpsc::Receiver<Box<Command>>) {
    // Boxed: the proposal's future is kilobytes, and inline it would make
    // this task (one per agent, idle nearly always) that size too.
    let propose = |cmd: Command| -> futures::future::BoxFuture<'static, ()> {
        let hub = hub.clone();
        Box::pin(async move {
            if let Err(e) = hub.consensus.propose(Proposal::Command(cmd)).await {
                tracing::warn!("could not commit agent report: {e}");
            }
        })
    };
    loop {
        tokio::select! {
            r = results.recv() => match r {
                Some(cmd) => {
                    // Progress before the result it precedes, then every
                    // result already waiting, proposed together: handed to
                    // Raft in this order and committed as one batch. One
                    // commit after another capped a busy agent's results at
                    // one per commit latency, until its queue overflowed and
                    // the session was ended (`bench fleet` saw it).
                    let mut batch = reports.take();
                    batch.push(*cmd);
                    while batch.len() < RESULTS_PER_BATCH {
                        let Ok(more) = results.try_recv() else { break };
                        batch.push(*more);
                    }
                    futures::future::join_all(batch.into_iter().map(propose)).await;
                }
                None => {
                    for c in reports.take() {
                        propose(c).await;
                    }
                    return;
                }
            },
            _ = reports.wake.notified() => {
                tokio::time::sleep(PROGRESS_WINDOW).await;
                for c in reports.take() {
                    propose(c).await;
                }
            }
        }
    }
}

impl crate::raft::AgentRelay for AgentHub {
    fn relayed(&self, agents: Vec<proto::RelayedAgent>) {
        let now = Instant::now();
        let mut relayed = self.relayed.lock().expect("relayed");
        for a in agents {
            // A name no certificate could carry names no agent: dropped.
            if let Ok(cluster) = ClusterRef::new(&a.region, &a.cluster) {
                relayed.insert(cluster, (a.session, now));
            }
        }
    }
}

impl AgentHub {
    /// Ends every agent stream on this node (shutdown).
    pub fn close_all(&self) {
        let mut sessions = self.sessions.lock().expect("sessions");
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        sessions.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_refuses_past_its_limit_until_a_slot_frees() {
        let a = Admission::new(2);
        let first = a.admit().expect("first slot");
        let _second = a.admit().expect("second slot");
        let refused = a.admit().expect_err("a third registration at once is refused");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            refused
                .metadata()
                .get("grpc-retry-pushback-ms")
                .and_then(|v| v.to_str().ok()),
            Some("1000")
        );
        drop(first);
        let _third = a.admit().expect("a freed slot admits the next registration");
    }
}
