//! The cutover agent: one per cluster. It dials out to the coordinator (so
//! clusters need no inbound port), follows redirects to the leader, keeps one
//! `AgentService.Connect` stream open, heartbeats, and executes tasks.
//!
//! Tasks are deduplicated by id through the on-disk [`store::Store`]: a task
//! the coordinator re-sends (after a reconnect, a leader change or an agent
//! restart) is answered with the recorded result, never executed twice.

#![forbid(unsafe_code)]

pub mod analysis;
pub mod app_tasks;
pub mod aws;
pub mod backup;
pub mod db_tasks;
pub mod dr;
pub mod drill;
pub mod drivers;
pub mod gates;
pub mod migrate;
pub mod rejoin;
pub mod router;
pub mod sample_app;
pub mod store;
pub mod tasks;
pub mod traffic;

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cutover_shared::config::AgentConfig;
use cutover_shared::domain::{ClusterRef, TaskProgress, TaskSpec, now_unix_ms};
use cutover_shared::proto::agent_service_client::AgentServiceClient;
use cutover_shared::proto::{self, ConnectRequest, connect_request, connect_response};
use cutover_shared::task::TaskKind;
use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use store::Store;

/// How often the agent looks at its apps for changes outside tasks.
const STATUS_INTERVAL: Duration = Duration::from_secs(2);

/// Metadata key with the leader's address on a refused stream.
const LEADER_METADATA: &str = "cutover-leader";

/// Errors that stop an agent from starting.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] cutover_shared::Error),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("agent certificate {0}: {1}")]
    Certificate(String, String),
}

/// Why one session with a coordinator ended.
enum SessionEnd {
    Shutdown,
    Redirect(String),
    Lost(String),
}

type Outbox = Arc<Mutex<Option<mpsc::Sender<ConnectRequest>>>>;

/// A configured agent.
pub struct Agent {
    cfg: AgentConfig,
    cluster: ClusterRef,
    store: Arc<Store>,
    apps: Arc<app_tasks::AppRuntime>,
    dbs: Arc<db_tasks::DbRuntime>,
    backups: Arc<backup::task::BackupRuntime>,
    dr: Arc<dr::DrRuntime>,
    traffic: Arc<traffic::TrafficRuntime>,
    /// When a leader last acknowledged a heartbeat (or registered this
    /// agent): the lease, which a coordinator majority renews.
    renewed: Arc<Mutex<Instant>>,
    /// The current session's sender; tasks send through whatever session is
    /// open when they finish.
    outbox: Outbox,
    running: Arc<Mutex<HashSet<String>>>,
}

/// Reads the region and cluster an agent certificate binds it to.
pub fn cluster_from_cert(path: &std::path::Path, trust_domain: &str) -> Result<ClusterRef, AgentError> {
    let id = cutover_shared::identity::identity_from_pem_file(path, trust_domain)?;
    id.agent_cluster()
        .ok_or_else(|| AgentError::Certificate(path.display().to_string(), format!("names {id}, not an agent")))
}

impl Agent {
    pub fn new(cfg: AgentConfig) -> Result<Agent, AgentError> {
        cfg.validate()?;
        cutover_shared::tls::install_crypto_provider();
        let cluster = cluster_from_cert(&cfg.tls.cert, &cfg.tls.trust_domain)?;
        let store = Arc::new(Store::open(&cfg.data_dir)?);
        let apps = Arc::new(
            app_tasks::AppRuntime::new(drivers::DriverContext {
                data_dir: cfg.data_dir.clone(),
                cluster: cluster.clone(),
                policy: cfg.drivers.clone(),
            })
            .with_prometheus(cfg.prometheus_url.clone()),
        );
        let backups = Arc::new(backup::task::BackupRuntime::new(
            &cfg.databases,
            &cfg.data_dir,
            cluster.clone(),
            cfg.backup.clone(),
        ));
        let dbs = Arc::new(db_tasks::DbRuntime::new(
            &cfg.databases,
            &cfg.data_dir,
            Some(backups.clone()),
        ));
        let dr = Arc::new(dr::DrRuntime::new(
            &cfg.databases,
            &cfg.data_dir,
            apps.clone(),
            backups.clone(),
        ));
        let traffic = Arc::new(
            traffic::TrafficRuntime::new(cfg.traffic.clone(), &cfg.data_dir)
                .map_err(|e| AgentError::Config(cutover_shared::Error::Config(format!("traffic: {e}"))))?,
        );
        Ok(Agent {
            dr,
            traffic,
            renewed: Arc::new(Mutex::new(Instant::now())),
            cfg,
            cluster,
            store,
            apps,
            dbs,
            backups,
            outbox: Default::default(),
            running: Default::default(),
        })
    }

    pub fn cluster(&self) -> &ClusterRef {
        &self.cluster
    }

    pub fn store(&self) -> Arc<Store> {
        self.store.clone()
    }

    /// Runs until `shutdown` completes: connect, serve, and on any loss
    /// reconnect to the next coordinator with jittered exponential backoff.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        self.apps.readopt().await;
        for e in self.traffic.start().await {
            tracing::error!("traffic driver: {e}");
        }
        if self.backups.configured() {
            // The store's start-up checks (versioning, uploads a crash left
            // unfinished) run now; a backup task waits for them.
            let backups = self.backups.clone();
            tokio::spawn(async move {
                if let Err(e) = backups.start().await {
                    tracing::warn!("backup store: {e}");
                }
            });
        }
        // The lease: cut off from every leader for `lease_secs`, the agent
        // fences its own primaries, as Patroni does, so a region that lost
        // the coordinators stops taking writes before another region's
        // standby may be promoted past it.
        let _lease = (self.cfg.lease_secs > 0).then(|| {
            AbortOnDrop(tokio::spawn(dr::watch_lease(
                self.dr.clone(),
                self.renewed.clone(),
                Duration::from_secs(self.cfg.lease_secs),
            )))
        });
        let n = self.cfg.coordinators.len();
        let mut next = rand::rng().random_range(0..n);
        let mut failures: u32 = 0;
        let mut redirect: Option<String> = None;
        loop {
            let addr = redirect.take().unwrap_or_else(|| {
                let a = self.cfg.coordinators[next % n].clone();
                next += 1;
                a
            });
            let started = Instant::now();
            let end = tokio::select! {
                _ = &mut shutdown => SessionEnd::Shutdown,
                end = self.session(&addr) => end,
            };
            *self.outbox.lock().expect("outbox") = None;
            match end {
                SessionEnd::Shutdown => {
                    tracing::info!("agent stopping");
                    return;
                }
                SessionEnd::Redirect(leader) => {
                    tracing::info!(from = %addr, to = %leader, "redirected to the leader");
                    redirect = Some(leader);
                    failures = failures.saturating_add(1).min(3);
                    if failures < 3 {
                        continue;
                    }
                }
                SessionEnd::Lost(why) => {
                    tracing::warn!(coordinator = %addr, "session ended: {why}");
                    // A session that lived a while was healthy: start over.
                    if started.elapsed() > Duration::from_secs(10) {
                        failures = 0;
                    }
                    failures = failures.saturating_add(1);
                }
            }
            let delay = self.backoff(failures);
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Exponential backoff with equal jitter: half fixed, half random, so
    /// a fleet that lost the same node does not reconnect in lockstep.
    fn backoff(&self, failures: u32) -> Duration {
        let exp = self
            .cfg
            .reconnect_min_ms
            .saturating_mul(1u64 << failures.min(16).saturating_sub(1));
        let cap = exp.min(self.cfg.reconnect_max_ms).max(1);
        Duration::from_millis(cap / 2 + rand::rng().random_range(0..=cap / 2))
    }

    async fn session(&self, addr: &str) -> SessionEnd {
        let channel = match self.cfg.tls.channel(addr, self.cfg.server_name.as_deref()) {
            Ok(c) => c,
            Err(e) => return SessionEnd::Lost(e.to_string()),
        };
        let mut client = AgentServiceClient::new(channel);
        let (tx, rx) = mpsc::channel::<ConnectRequest>(256);
        let register = proto::Register {
            cluster: Some(self.cluster.clone().into()),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            task_kinds: tasks::KINDS
                .iter()
                .chain(app_tasks::KINDS)
                .chain(db_tasks::KINDS)
                .chain(dr::KINDS)
                .chain(if self.backups.configured() {
                    backup::task::KINDS
                } else {
                    &[]
                })
                .chain(if self.traffic.configured() { traffic::KINDS } else { &[] })
                .map(|k| k.as_str().to_owned())
                .collect(),
            traffic_apps: self.traffic.apps(),
        };
        let _ = tx
            .send(ConnectRequest {
                message: Some(connect_request::Message::Register(register)),
            })
            .await;
        let mut inbound = match client.connect(ReceiverStream::new(rx)).await {
            Ok(r) => r.into_inner(),
            Err(status) => {
                if let Some(leader) = status.metadata().get(LEADER_METADATA).and_then(|v| v.to_str().ok())
                    && leader != addr
                {
                    return SessionEnd::Redirect(leader.to_owned());
                }
                return SessionEnd::Lost(format!("{:?}: {}", status.code(), status.message()));
            }
        };
        let interval = match inbound.message().await {
            Ok(Some(proto::ConnectResponse {
                message: Some(connect_response::Message::Registered(r)),
            })) => {
                tracing::info!(coordinator = %addr, leader = r.leader_node_id, cluster = %self.cluster, "registered");
                *self.renewed.lock().expect("lease") = Instant::now();
                let (dr, epochs, me) = (self.dr.clone(), r.epochs.clone(), self.cluster.clone());
                tokio::spawn(async move { dr.after_register(&epochs, &me).await });
                Duration::from_millis(u64::from(r.heartbeat_interval_ms.max(10)))
            }
            Ok(other) => return SessionEnd::Lost(format!("unexpected first message {other:?}")),
            Err(s) => return SessionEnd::Lost(format!("{:?}: {}", s.code(), s.message())),
        };
        *self.outbox.lock().expect("outbox") = Some(tx.clone());
        let mut ticker = tokio::time::interval(interval);
        let mut seq = 0u64;
        let mut last_ack = Instant::now();
        let mut sent_at = std::collections::HashMap::new();
        // App statuses are polled on their own task: a driver that is slow
        // to answer (a router waiting for its address, a cluster API under
        // load) must never delay this loop's heartbeats.
        let _status_task = AbortOnDrop(tokio::spawn(report_app_statuses(self.apps.clone(), tx.clone())));
        let _db_status_task = AbortOnDrop(tokio::spawn(report_database_statuses(
            self.dr.clone(),
            self.cfg.databases.clone(),
            self.cfg.data_dir.clone(),
            Duration::from_millis(self.cfg.db_status_interval_ms),
            tx.clone(),
        )));
        let _region_health_task = AbortOnDrop(tokio::spawn(traffic::report_region_health(
            self.traffic.clone(),
            tx.clone(),
        )));
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    // No acknowledgement for three intervals: the connection is
                    // half-open or the leader is gone. Find another.
                    if last_ack.elapsed() > interval * 3 {
                        return SessionEnd::Lost("no heartbeat acknowledgement for 3 intervals".into());
                    }
                    seq += 1;
                    sent_at.insert(seq, Instant::now());
                    let hb = proto::Heartbeat { sequence: seq, sent_at_unix_ms: now_unix_ms() };
                    if tx.send(ConnectRequest { message: Some(connect_request::Message::Heartbeat(hb)) }).await.is_err() {
                        return SessionEnd::Lost("outbound stream closed".into());
                    }
                }
                msg = inbound.message() => match msg {
                    Ok(Some(m)) => match m.message {
                        Some(connect_response::Message::HeartbeatAck(ack)) => {
                            last_ack = Instant::now();
                            *self.renewed.lock().expect("lease") = last_ack;
                            if let Some(t) = sent_at.remove(&ack.sequence) {
                                metrics::histogram!("cutover_agent_heartbeat_rtt_seconds").record(t.elapsed().as_secs_f64());
                            }
                            sent_at.retain(|s, _| *s > ack.sequence);
                        }
                        Some(connect_response::Message::Task(t)) => match TaskSpec::try_from(t) {
                            Ok(spec) => self.accept(spec),
                            Err(e) => tracing::warn!("malformed task: {e}"),
                        },
                        _ => {}
                    },
                    Ok(None) => return SessionEnd::Lost("coordinator closed the stream".into()),
                    Err(s) => return SessionEnd::Lost(format!("{:?}: {}", s.code(), s.message())),
                }
            }
        }
    }

    /// Takes a task from the coordinator: replays a recorded result, ignores
    /// one already running, runs a new one.
    fn accept(&self, spec: TaskSpec) {
        if spec.target != self.cluster {
            tracing::warn!(task = %spec.task_id, target = %spec.target, "task addressed to another cluster; ignored");
            return;
        }
        // The store is read under the `running` lock. A run records its
        // result before it leaves `running`, so a re-send racing the end of
        // that run finds either the result or the run, and never starts the
        // task a second time.
        let mut running = self.running.lock().expect("running");
        match self.store.result(&spec.task_id) {
            Ok(Some(mut earlier)) => {
                drop(running);
                tracing::info!(task = %spec.task_id, "task already finished; replaying its result");
                earlier.replayed = true;
                send(&self.outbox, connect_request::Message::Result(earlier.into()));
                return;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(task = %spec.task_id, "cannot read task store, refusing to run: {e}");
                return;
            }
        }
        if !running.insert(spec.task_id.clone()) {
            return;
        }
        drop(running);
        let store = self.store.clone();
        let outbox = self.outbox.clone();
        let running = self.running.clone();
        let apps = self.apps.clone();
        let dbs = self.dbs.clone();
        let backups = self.backups.clone();
        let dr = self.dr.clone();
        let traffic = self.traffic.clone();
        tokio::spawn(async move {
            let task_id = spec.task_id.clone();
            // redb commits fsync: off the async workers, which carry every
            // agent's heartbeats in a process that runs several.
            let started = {
                let (store, id) = (store.clone(), task_id.clone());
                tokio::task::spawn_blocking(move || store.record_start(&id)).await
            };
            let started = match started {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match started {
                Ok(n) => tracing::info!(task = %task_id, kind = %spec.kind, attempt = n, "task started"),
                Err(e) => {
                    tracing::error!(task = %task_id, "cannot record task start, refusing to run: {e}");
                    running.lock().expect("running").remove(&task_id);
                    return;
                }
            }
            metrics::counter!("cutover_agent_tasks_started_total", "kind" => spec.kind.clone()).increment(1);
            let progress_outbox = outbox.clone();
            let progress_id = task_id.clone();
            let progress = move |message: String| {
                let p = TaskProgress {
                    task_id: progress_id.clone(),
                    message,
                    at_unix_ms: now_unix_ms(),
                };
                send(&progress_outbox, connect_request::Message::Progress(p.into()));
            };
            let kind = TaskKind::parse(&spec.kind);
            let ran = Instant::now();
            let result = if kind.is_some_and(|k| app_tasks::KINDS.contains(&k)) {
                apps.execute(&spec, &progress).await
            } else if kind.is_some_and(|k| db_tasks::KINDS.contains(&k)) {
                dbs.execute(&spec, &progress).await
            } else if kind.is_some_and(|k| backup::task::KINDS.contains(&k)) {
                backups.execute(&spec, &progress).await
            } else if kind.is_some_and(|k| dr::KINDS.contains(&k)) {
                dr.execute(&spec, &progress).await
            } else if kind.is_some_and(|k| traffic::KINDS.contains(&k)) {
                traffic.execute(&spec, &progress).await
            } else {
                tasks::execute(&spec, progress).await
            };
            // By kind and outcome: switch durations and gate verdicts for
            // the dashboards, as each agent (region) sees them.
            metrics::histogram!(
                "cutover_agent_task_duration_seconds",
                "kind" => spec.kind.clone(),
                "outcome" => if result.success { "succeeded" } else { "failed" },
            )
            .record(ran.elapsed().as_secs_f64());
            // Durable before reported: a crash after this line replays.
            let saved = {
                let (store, result) = (store.clone(), result.clone());
                tokio::task::spawn_blocking(move || store.save_result(&result).map_err(|e| e.to_string())).await
            };
            if let Err(e) = saved.map_err(|e| e.to_string()).and_then(|r| r) {
                tracing::error!(task = %task_id, "cannot record task result: {e}");
            }
            tracing::info!(task = %task_id, success = result.success, "task finished");
            send(&outbox, connect_request::Message::Result(result.into()));
            running.lock().expect("running").remove(&task_id);
        });
    }
}

/// Compares each app's driver status with what this session last
/// reported, every `STATUS_INTERVAL`, and reports changes (a crashed
/// process, a pod gone unready). Ends when the session's stream closes.
async fn report_app_statuses(apps: Arc<app_tasks::AppRuntime>, tx: mpsc::Sender<ConnectRequest>) {
    let mut reported: std::collections::HashMap<String, cutover_shared::app::AppClusterStatus> = Default::default();
    let mut ticker = tokio::time::interval(STATUS_INTERVAL);
    loop {
        ticker.tick().await;
        for (app, status) in apps.statuses().await {
            if reported.get(&app) != Some(&status) {
                reported.insert(app.clone(), status.clone());
                let r = proto::AppStatusReport {
                    app,
                    status: Some(status.into()),
                };
                let msg = ConnectRequest {
                    message: Some(connect_request::Message::AppStatus(r)),
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Observes the databases every `interval` and reports them all, on their
/// own task for the same reason as app statuses: a database that is slow to
/// answer must not delay heartbeats. Ends when the session's stream closes.
async fn report_database_statuses(
    dr: Arc<dr::DrRuntime>,
    databases: Vec<cutover_shared::config::DatabaseConfig>,
    data_dir: std::path::PathBuf,
    interval: Duration,
    tx: mpsc::Sender<ConnectRequest>,
) {
    if databases.is_empty() {
        return;
    }
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let mut statuses = dr::observe_all(&databases, &data_dir).await;
        // A standby configured as one but taking writes is fenced first,
        // and reported as it is then.
        for (st, db) in statuses.iter_mut().zip(&databases) {
            let cold = st.configured_role == cutover_shared::dr::DbRole::Standby
                && st.role == Some(cutover_shared::dr::DbRole::Primary)
                && !st.fenced;
            if cold && dr.fence_if_cold(&db.app).await {
                *st = dr::observe(db, &data_dir).await;
            }
        }
        // How old each observation is as it leaves (the leader dates the
        // report by its own clock on arrival).
        let now = cutover_shared::domain::now_unix_ms();
        for st in &mut statuses {
            st.observed_age_ms = u64::try_from(now.saturating_sub(st.observed_at_unix_ms))
                .unwrap_or(0)
                .min(cutover_shared::dr::MAX_OBSERVED_AGE_MS);
        }
        let msg = ConnectRequest {
            message: Some(connect_request::Message::DatabaseStatus(proto::DatabaseStatusReport {
                databases: statuses.into_iter().map(Into::into).collect(),
            })),
        };
        if tx.send(msg).await.is_err() {
            return;
        }
    }
}

/// A spawned task that ends with its owner (a session).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends on the current session, if any. A message that finds no session is
/// dropped: results are on disk and the coordinator re-sends the task.
fn send(outbox: &Outbox, message: connect_request::Message) {
    if let Some(tx) = outbox.lock().expect("outbox").as_ref() {
        let _ = tx.try_send(ConnectRequest { message: Some(message) });
    }
}
