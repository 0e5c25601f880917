//! One coordinator node: opens consensus, serves every gRPC service on one
//! mutual-TLS port, runs the leader duties, and shuts down cleanly.
//!
//! Like mini-redis, [`Node::start`] takes already-bound listeners so tests
//! can bind port 0, and [`Node::shutdown`] stops everything it started.

use std::sync::Arc;
use std::time::Duration;

use cutover_shared::config::CoordinatorConfig;
use cutover_shared::grpc::{GuardLayer, Policy, reflection_services};
use cutover_shared::identity::Role;
use cutover_shared::proto::agent_service_server::AgentServiceServer;
use cutover_shared::proto::control_service_server::ControlServiceServer;
use cutover_shared::telemetry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::agents::{AgentApi, AgentHub};
use crate::control::ControlApi;
use crate::raft::{Consensus, OpenError};

/// Errors starting or running a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] cutover_shared::Error),
    #[error(transparent)]
    Consensus(#[from] OpenError),
    #[error("gRPC server: {0}")]
    Server(String),
    #[error("cannot bind {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
}

const READS: &[Role] = &[Role::Operator, Role::Viewer, Role::Coordinator];
const WRITES: &[Role] = &[Role::Operator];
const PEERS: &[Role] = &[Role::Coordinator];
const AGENTS: &[Role] = &[Role::Agent];

/// Who may call what. A method missing here is refused.
pub fn access_policy(path: &str) -> Option<&'static [Role]> {
    if path.starts_with("/cutover.v1.RaftService/") {
        return Some(PEERS);
    }
    let method = path.strip_prefix("/cutover.v1.ControlService/");
    Some(match (path, method) {
        ("/cutover.v1.AgentService/Connect", _) => AGENTS,
        (
            _,
            Some(
                "AddNode"
                | "RemoveNode"
                | "TransferLeadership"
                | "RunTask"
                | "CreateAttestation"
                | "ApplyApp"
                | "Deploy"
                | "Switch"
                | "Rollback"
                | "HealthCheck"
                | "RunAnalysis"
                | "PromoteOperation"
                | "PauseOperation"
                | "ResumeOperation"
                | "AbortOperation"
                | "CreateRelease"
                | "Migrate"
                | "CreateBackup"
                | "ValidateBackup"
                | "RestoreBackup"
                | "DeleteBackup"
                | "SetBackupSchedule"
                | "DeleteBackupSchedule"
                | "Failover"
                | "Drill"
                | "Rejoin"
                | "SetDrillSchedule"
                | "DeleteDrillSchedule",
            ),
        ) => WRITES,
        (
            _,
            Some(
                "GetClusterStatus"
                | "ListAgents"
                | "GetStatus"
                | "ListOperations"
                | "GetOperation"
                | "WatchOperation"
                | "ListAttestations"
                | "ListAuditEvents"
                | "ListApps"
                | "GetApp"
                | "ListReleases"
                | "GetRelease"
                | "ListBackups"
                | "GetBackup"
                | "ListBackupSchedules"
                | "GetDrStatus"
                | "PlanFailover"
                | "ListDrills",
            ),
        ) => READS,
        _ => return None,
    })
}

/// Concurrent HTTP/2 streams one connection may hold open (an agent holds
/// one, an operator's CLI a few watches).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 128;

/// A running coordinator node.
pub struct Node {
    consensus: Consensus,
    hub: Arc<AgentHub>,
    addr: std::net::SocketAddr,
    ops_addr: Option<std::net::SocketAddr>,
    stop: watch::Sender<bool>,
    watches: Arc<std::sync::atomic::AtomicUsize>,
    /// Cuts every open connection (see `MtlsAcceptor::cut_handle`).
    cut: tokio_util::sync::CancellationToken,
    server: JoinHandle<Result<(), String>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Node {
    /// Starts a node serving on `listener` (and the ops endpoint on
    /// `ops_listener`, if given).
    pub async fn start<L: cutover_shared::net::Listener>(
        cfg: CoordinatorConfig,
        listener: L,
        ops_listener: Option<TcpListener>,
    ) -> Result<Node, NodeError> {
        cfg.validate()?;
        cutover_shared::tls::install_crypto_provider();
        if ops_listener.is_some() {
            // The recorder must exist before Raft publishes its first
            // gauges (right at open): a gauge set with no recorder is lost
            // until it next changes, and /metrics would lack it.
            cutover_shared::telemetry::metrics_handle();
        }
        let acceptor = cutover_shared::listener::MtlsAcceptor::new(&cfg.tls)?;
        let cut = acceptor.cut_handle();
        let addr = listener.local_addr().map_err(|e| NodeError::Server(e.to_string()))?;
        let consensus = Consensus::open(cfg.node_id, &cfg.data_dir, &cfg.raft, cfg.tls.clone()).await?;
        let hub = AgentHub::new(
            consensus.clone(),
            Duration::from_millis(cfg.agent_heartbeat_interval_ms),
        );
        let (stop, stop_rx) = watch::channel(false);

        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<ControlServiceServer<ControlApi>>().await;
        health.set_serving::<AgentServiceServer<AgentApi>>().await;
        let (reflection_v1, reflection_v1alpha) = reflection_services();
        let policy: Policy = Arc::new(access_policy);
        let watches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let control = ControlServiceServer::new(ControlApi {
            consensus: consensus.clone(),
            data_dir: cfg.data_dir.clone(),
            watches: watches.clone(),
        });
        let agent = AgentServiceServer::new(AgentApi { hub: hub.clone() });
        let raft = consensus.grpc_service(hub.clone());
        let mut shutdown = stop_rx.clone();
        let router = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(5)))
            .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
            .layer(GuardLayer::new(policy, &cfg.tls.trust_domain))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(control)
            .add_service(agent)
            .add_service(raft);
        let server = tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(acceptor.incoming(listener), async move {
                    let _ = shutdown.wait_for(|s| *s).await;
                })
                .await
                .map_err(|e| e.to_string())
        });

        let mut tasks = vec![
            tokio::spawn(hub.clone().run()),
            tokio::spawn(hub.clone().relay()),
            tokio::spawn(crate::orchestrator::run(consensus.clone(), cfg.retention.clone())),
        ];
        let ops_addr = ops_listener.as_ref().and_then(|l| l.local_addr().ok());
        if let Some(ops) = ops_listener {
            let c = consensus.clone();
            let ready = Arc::new(move || c.status().leader.is_some());
            let mut shutdown = stop_rx.clone();
            tasks.push(tokio::spawn(async move {
                let stop = async move {
                    let _ = shutdown.wait_for(|s| *s).await;
                };
                if let Err(e) = telemetry::serve_ops(ops, ready, stop).await {
                    tracing::error!("{e}");
                }
            }));
        }

        consensus.bootstrap(&cfg.initial_members).await?;
        tracing::info!(node = cfg.node_id, %addr, "coordinator started");
        Ok(Node {
            consensus,
            hub,
            addr,
            ops_addr,
            stop,
            watches,
            cut,
            server,
            tasks,
        })
    }

    /// Binds the configured addresses and starts.
    pub async fn bind_and_start(cfg: CoordinatorConfig) -> Result<Node, NodeError> {
        let listener = TcpListener::bind(&cfg.listen).await.map_err(|source| NodeError::Bind {
            addr: cfg.listen.clone(),
            source,
        })?;
        let ops = match &cfg.ops_listen {
            Some(a) => Some(TcpListener::bind(a).await.map_err(|source| NodeError::Bind {
                addr: a.clone(),
                source,
            })?),
            None => None,
        };
        Node::start(cfg, listener, ops).await
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served, if anywhere.
    pub fn ops_addr(&self) -> Option<std::net::SocketAddr> {
        self.ops_addr
    }

    pub fn consensus(&self) -> &Consensus {
        &self.consensus
    }

    /// Agents with an open stream to this node.
    pub fn connected_agents(&self) -> usize {
        self.hub.connected()
    }

    /// Whether this node takes agents now: it leads, or its leader answered
    /// its latest relay of agent liveness (`agents.rs`).
    pub fn serves_agents(&self) -> bool {
        self.hub.serving()
    }

    /// Resolves when Raft has stopped on a fatal error (see
    /// [`crate::raft::Consensus::fatal`]): this node then serves no
    /// writes and no linearizable reads, and should be restarted once the
    /// cause (a full disk, say) is fixed. The binary exits on it, so a
    /// supervisor restarts it.
    pub async fn raft_failed(&self) -> String {
        self.consensus.fatal().await
    }

    /// `WatchOperation` streams this node is serving.
    pub fn open_watches(&self) -> usize {
        self.watches.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops Raft (so leadership moves on at once), then the server: open
    /// streams get one second to finish, then every connection is cut, so
    /// nothing keeps the node's services or storage alive afterwards.
    /// Storage stays valid for a restart.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in &self.tasks {
            t.abort();
        }
        self.hub.close_all();
        self.consensus.shutdown().await;
        let mut server = self.server;
        if tokio::time::timeout(Duration::from_secs(1), &mut server).await.is_err() {
            self.cut.cancel();
            if tokio::time::timeout(Duration::from_secs(5), &mut server).await.is_err() {
                tracing::warn!("gRPC server did not stop after its connections were cut");
                server.abort();
            }
        }
    }
}
