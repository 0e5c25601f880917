//! Test harness shared by the integration tests: a [`TestCluster`] builder in
//! the style of Nomad's, with tight Raft timeouts, temporary directories, a
//! fresh development PKI, and a config callback. Nodes and agents run
//! in-process (stoppable and restartable from their data directories) or as
//! real `cutover` processes for kill -9 tests.

#![forbid(unsafe_code)]

pub mod dev;
pub mod disk;
pub mod garage;
pub mod linearizability;
pub mod netns;
pub mod process;
pub mod prometheus;
pub mod s3;
pub mod wan;

pub use cutover_devkit::{ports, postgres, writer};
pub use ports::stable_free_addr;
pub use process::ProcessCluster;

/// The steady load generator, re-exported for tests and benchmarks.
pub use cutover_shared::load;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cutover_agent::Agent;
use cutover_coordinator::Node;
use cutover_shared::certs::{DevPki, init_dev_pki};
use cutover_shared::config::{AgentConfig, CoordinatorConfig, DriverPolicy, Member, RaftConfig};
use cutover_shared::proto as pb;
use cutover_shared::proto::control_service_client::ControlServiceClient;
use cutover_shared::telemetry::LogFormat;
use cutover_shared::tls::TlsFiles;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;

pub use cutover_shared;

/// Agent heartbeat interval used by test clusters.
pub const AGENT_HEARTBEAT_MS: u64 = 200;

type ConfigFn = Box<dyn Fn(&mut CoordinatorConfig) + Send + Sync>;

pub struct TestClusterBuilder {
    nodes: u64,
    regions: Vec<(String, String)>,
    configure: Option<ConfigFn>,
    spare_nodes: u64,
    trust_domain: String,
}

impl TestClusterBuilder {
    pub fn nodes(mut self, n: u64) -> Self {
        self.nodes = n;
        self
    }
    /// How many coordinators the cluster will have.
    pub fn node_count(&self) -> u64 {
        self.nodes
    }
    /// Agents to issue certificates for (and start, with `start_agents`).
    pub fn regions(mut self, r: &[(&str, &str)]) -> Self {
        self.regions = r.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        self
    }
    /// Extra node identities to issue certificates for (membership tests).
    pub fn spare_nodes(mut self, n: u64) -> Self {
        self.spare_nodes = n;
        self
    }
    /// The SPIFFE trust domain of every certificate and config.
    pub fn trust_domain(mut self, td: &str) -> Self {
        self.trust_domain = td.to_owned();
        self
    }
    /// Adjusts every coordinator's config before it starts.
    pub fn configure(mut self, f: impl Fn(&mut CoordinatorConfig) + Send + Sync + 'static) -> Self {
        self.configure = Some(Box::new(f));
        self
    }

    /// Prepares configs and certificates without starting anything.
    pub async fn prepare(self) -> Result<TestCluster> {
        cutover_shared::tls::install_crypto_provider();
        // Logs are captured per test and shown when it fails.
        cutover_shared::telemetry::init_tracing(LogFormat::Human);
        let tmp = tempfile::Builder::new().prefix("cutover-test-").tempdir()?;
        let refs: Vec<(&str, &str)> = self.regions.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        let pki = init_dev_pki(
            &tmp.path().join("certs"),
            &self.trust_domain,
            self.nodes + self.spare_nodes,
            &refs,
        )?;
        let mut listeners = Vec::new();
        for _ in 0..self.nodes + self.spare_nodes {
            listeners.push(TcpListener::bind("127.0.0.1:0").await?);
        }
        let addrs: Vec<String> = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.to_string()))
            .collect::<Result<_, _>>()?;
        let members: Vec<Member> = (0..self.nodes as usize)
            .map(|i| Member {
                id: i as u64 + 1,
                address: addrs[i].clone(),
            })
            .collect();
        let mut configs = Vec::new();
        for (i, addr) in addrs.iter().enumerate() {
            let id = i as u64 + 1;
            let mut cfg = CoordinatorConfig {
                node_id: id,
                listen: addr.clone(),
                advertise: None,
                data_dir: tmp.path().join(format!("coordinator-{id}")),
                ops_listen: None,
                log_format: LogFormat::Human,
                tls: pki.coordinators[i].1.clone(),
                initial_members: if (i as u64) < self.nodes {
                    members.clone()
                } else {
                    vec![]
                },
                agent_heartbeat_interval_ms: AGENT_HEARTBEAT_MS,
                raft: RaftConfig {
                    heartbeat_interval_ms: 50,
                    // 600..800 ms of silence before a follower stands:
                    // short enough that failover tests stay quick, long
                    // enough that a debug build on two loaded cores does
                    // not start needless elections.
                    election_timeout_min_ms: 600,
                    election_timeout_max_ms: 800,
                    snapshot_every: 2000,
                    keep_after_snapshot: 100,
                    pre_vote: true,
                },
                retention: Default::default(),
            };
            if let Some(f) = &self.configure {
                f(&mut cfg);
            }
            configs.push(cfg);
        }
        let n = configs.len();
        Ok(TestCluster {
            tmp,
            pki,
            configs,
            listeners: listeners.into_iter().map(Some).collect(),
            nodes: (0..n).map(|_| None).collect(),
            voters: self.nodes as usize,
            agents: vec![],
        })
    }

    /// Prepares and starts the initial voters in-process.
    pub async fn start(self) -> Result<TestCluster> {
        let mut c = self.prepare().await?;
        for i in 0..c.voters {
            c.start_node(i).await?;
        }
        Ok(c)
    }
}

pub struct RunningAgent {
    pub cluster: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    pub store: std::sync::Arc<cutover_agent::store::Store>,
}

impl RunningAgent {
    /// Stops the agent (its stream closes; its store stays on disk).
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
    }
}

pub struct TestCluster {
    pub tmp: tempfile::TempDir,
    pub pki: DevPki,
    pub configs: Vec<CoordinatorConfig>,
    listeners: Vec<Option<TcpListener>>,
    pub nodes: Vec<Option<Node>>,
    voters: usize,
    pub agents: Vec<Option<RunningAgent>>,
}

impl TestCluster {
    pub fn builder() -> TestClusterBuilder {
        TestClusterBuilder {
            nodes: 3,
            regions: vec![],
            configure: None,
            spare_nodes: 0,
            trust_domain: cutover_shared::identity::DEFAULT_TRUST_DOMAIN.to_owned(),
        }
    }

    pub fn addrs(&self) -> Vec<String> {
        self.configs
            .iter()
            .take(self.voters)
            .map(|c| c.listen.clone())
            .collect()
    }

    /// Frees the ports the harness reserved, so processes can bind them.
    pub fn release_listeners(&mut self) {
        self.listeners.iter_mut().for_each(|l| drop(l.take()));
    }

    /// Takes the port reserved for node `i`, to serve something else on
    /// its address; [`Self::start_node`] binds it again.
    pub fn take_listener(&mut self, i: usize) -> Option<TcpListener> {
        self.listeners[i].take()
    }

    /// Starts (or restarts, from its data directory) node `i` in-process.
    pub async fn start_node(&mut self, i: usize) -> Result<()> {
        let listener = match self.listeners[i].take() {
            Some(l) => l,
            None => TcpListener::bind(&self.configs[i].listen)
                .await
                .with_context(|| format!("rebinding {}", self.configs[i].listen))?,
        };
        let ops = match &self.configs[i].ops_listen {
            Some(a) => Some(TcpListener::bind(a).await?),
            None => None,
        };
        self.nodes[i] = Some(Node::start(self.configs[i].clone(), listener, ops).await?);
        Ok(())
    }

    /// Stops node `i` (server and Raft); its data directory stays.
    pub async fn stop_node(&mut self, i: usize) {
        if let Some(n) = self.nodes[i].take() {
            n.shutdown().await;
        }
    }

    pub fn node(&self, i: usize) -> &Node {
        self.nodes[i].as_ref().expect("node is running")
    }

    fn running(&self) -> impl Iterator<Item = (usize, &Node)> {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| n.as_ref().map(|n| (i, n)))
    }

    /// Waits until the running nodes agree on one leader that is running;
    /// returns its index.
    pub async fn wait_leader(&self, timeout: Duration) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            let leaders: Vec<usize> = self
                .running()
                .filter(|(_, n)| n.consensus().status().server_state == "leader")
                .map(|(i, _)| i)
                .collect();
            if let [l] = leaders[..] {
                let id = l as u64 + 1;
                if self.running().all(|(_, n)| n.consensus().status().leader == Some(id)) {
                    return Ok(l);
                }
            }
            if Instant::now() > deadline {
                bail!("no single leader after {timeout:?}: leaders {leaders:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `pred` holds on node `i`'s applied state.
    pub async fn wait_state(
        &self,
        i: usize,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&cutover_coordinator::state::State) -> bool,
    ) -> Result<()> {
        let node = self.node(i);
        let mut applied = node.consensus().applied();
        let deadline = Instant::now() + timeout;
        loop {
            if node.consensus().read(&pred) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("timed out after {timeout:?} waiting for {what}");
            }
            // Wake on applies, and re-check at least every 50 ms.
            let _ = tokio::time::timeout(left.min(Duration::from_millis(50)), applied.changed()).await;
        }
    }

    /// Starts a deploy through node `i` as the operator and waits, up to
    /// `timeout`, until it finished; returns its record.
    pub async fn deploy_and_wait(
        &self,
        i: usize,
        req: cutover_shared::proto::DeployRequest,
        timeout: Duration,
    ) -> Result<cutover_shared::domain::Operation> {
        let image = req.image.clone();
        let id = self.operator(i).deploy(req).await?.into_inner().operation_id;
        self.wait_state(i, timeout, &format!("the deploy of {image} to finish"), |s| {
            s.operations[&id].state.is_finished()
        })
        .await?;
        Ok(self.node(i).consensus().read(|s| (*s.operations[&id]).clone()))
    }

    /// Operation `id` as node `i`'s API shows it (with the gate it waits at).
    pub async fn api_operation(&self, i: usize, id: &str) -> Result<cutover_shared::proto::Operation> {
        self.operator(i)
            .get_operation(cutover_shared::proto::GetOperationRequest {
                operation_id: id.into(),
            })
            .await?
            .into_inner()
            .operation
            .context("GetOperation answered no operation")
    }

    /// Waits until operation `id` waits at manual promotion gate `gate`.
    pub async fn wait_gate(
        &self,
        i: usize,
        id: &str,
        gate: u32,
        timeout: Duration,
    ) -> Result<cutover_shared::proto::Operation> {
        let deadline = Instant::now() + timeout;
        let mut applied = self.node(i).consensus().applied();
        loop {
            let op = self.api_operation(i, id).await?;
            if op.awaiting_gate == gate {
                return Ok(op);
            }
            if Instant::now() > deadline {
                bail!("gate {gate} never reached: {op:?}");
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), applied.changed()).await;
        }
    }

    /// Starts every region's agent and waits, on node `leader`, until all
    /// are registered.
    pub async fn start_agents(&mut self, leader: usize, timeout: Duration) -> Result<()> {
        let n = self.pki.agents.len();
        for i in 0..n {
            self.start_agent(i)?;
        }
        self.wait_state(leader, timeout, "agents up", |s| s.agents.len() == n)
            .await
    }

    /// A control client speaking as `who` (operator, viewer, or any files).
    pub fn client(&self, who: &TlsFiles, node: usize) -> Result<ControlServiceClient<Channel>> {
        Ok(ControlServiceClient::new(
            who.channel(&self.configs[node].listen, None)?,
        ))
    }

    pub fn operator(&self, node: usize) -> ControlServiceClient<Channel> {
        self.client(&self.pki.operator, node).expect("operator client")
    }

    pub fn agent_config(&self, i: usize) -> AgentConfig {
        let (region, cluster, tls) = &self.pki.agents[i];
        AgentConfig {
            coordinators: self.addrs(),
            data_dir: self.tmp.path().join(format!("agent-{region}-{cluster}")),
            server_name: None,
            ops_listen: None,
            log_format: LogFormat::Human,
            tls: tls.clone(),
            reconnect_min_ms: 50,
            reconnect_max_ms: 500,
            databases: vec![],
            // Tests run the sample app from the build directory and shell
            // scripts; the allowlist itself is tested in the agent crate.
            drivers: DriverPolicy {
                local_commands: vec!["/".into(), "sh".into()],
                kubeconfig: None,
                job_commands: vec![],
            },
            backup: None,
            // Tight, like the Raft timeouts: DR tests wait for reports.
            db_status_interval_ms: 250,
            lease_secs: 30,
            traffic: None,
            prometheus_url: None,
        }
    }

    /// Starts agent `i` in-process.
    pub fn start_agent(&mut self, i: usize) -> Result<()> {
        self.start_agent_with(i, self.agent_config(i))
    }

    /// Starts agent `i` in-process with `cfg` (from [`Self::agent_config`],
    /// adjusted: databases, say).
    pub fn start_agent_with(&mut self, i: usize, cfg: AgentConfig) -> Result<()> {
        let agent = Agent::new(cfg)?;
        let store = agent.store();
        let cluster = agent.cluster().to_string();
        let (stop, rx) = oneshot::channel();
        let task = tokio::spawn(agent.run(async move {
            let _ = rx.await;
        }));
        while self.agents.len() <= i {
            self.agents.push(None);
        }
        self.agents[i] = Some(RunningAgent {
            cluster,
            stop: Some(stop),
            task,
            store,
        });
        Ok(())
    }

    pub async fn stop_agent(&mut self, i: usize) {
        if let Some(a) = self.agents.get_mut(i).and_then(Option::take) {
            a.stop().await;
        }
    }

    /// Writes one attestation through node `i`; returns its log index.
    pub async fn write(&self, node: usize, image: &str) -> Result<u64> {
        let r = self
            .operator(node)
            .create_attestation(pb::CreateAttestationRequest {
                image: image.into(),
                checks: [("tests".to_string(), "passed".to_string())].into(),
            })
            .await?;
        Ok(r.into_inner().log_index)
    }

    pub async fn shutdown(mut self) {
        for i in 0..self.agents.len() {
            self.stop_agent(i).await;
        }
        for i in 0..self.nodes.len() {
            self.stop_node(i).await;
        }
    }
}

impl Drop for TestCluster {
    /// App processes started by the local driver outlive agents by design;
    /// a test's must not outlive the test, even one that panicked.
    fn drop(&mut self) {
        for i in 0..self.pki.agents.len() {
            cutover_agent::drivers::local::kill_all_under(&self.agent_config(i).data_dir);
        }
    }
}

/// Local-driver settings that run `program sample-app` (the `cutover`
/// binary, or the bench binary) on fresh loopback addresses.
pub fn sample_app_local(program: &Path) -> cutover_shared::app::LocalSpec {
    cutover_devkit::sample_app::local(program)
}

/// App `name` running the sample app (this build's `cutover sample-app`)
/// under the local driver in each `(region, cluster)`: an HTTP health
/// probe, a light load probe, no waves, a 1 s bake. Tests adjust the rest.
pub fn sample_app_spec(name: &str, regions: &[(&str, &str)]) -> cutover_shared::app::AppSpec {
    cutover_devkit::sample_app::spec(name, regions, &cutover_bin())
}

/// `[traffic]` for `shop` in us-east and eu-west, us-east serving: the
/// front door on `listen` before the regions' routers, or Route 53 records
/// whose values are the regions' host names.
pub fn shop_traffic_config(
    spec: &cutover_shared::app::AppSpec,
    driver: cutover_shared::config::TrafficDriverKind,
    listen: Option<&str>,
) -> cutover_shared::config::TrafficConfig {
    use cutover_shared::config::{TrafficApp, TrafficConfig, TrafficDriverKind};
    let router = |i: usize| spec.clusters[i].local.as_ref().unwrap().listen.clone();
    let (regions, record) = match driver {
        TrafficDriverKind::FrontDoor => ([("us-east", router(0)), ("eu-west", router(1))], None),
        TrafficDriverKind::Route53 => (
            [
                ("us-east", "shop.us-east.example.com".to_owned()),
                ("eu-west", "shop.eu-west.example.com".to_owned()),
            ],
            Some("shop.example.com.".to_owned()),
        ),
    };
    TrafficConfig {
        driver,
        // Roomier than the default 10 s: the failover must end within it
        // on a loaded CI machine too.
        max_hold_ms: 30_000,
        route53: None,
        probe_interval_ms: 200,
        probe_failures: 2,
        apps: vec![TrafficApp {
            app: "shop".into(),
            regions: regions.into_iter().map(|(r, v)| (r.to_owned(), v)).collect(),
            primary: "us-east".into(),
            listen: listen.map(str::to_owned),
            record,
            record_type: "CNAME".into(),
            ttl: 60,
            health: vec![cutover_shared::app::Probe::http("/health")],
        }],
    }
}

/// An `echo` task for the agent of `region`'s cluster `cluster`,
/// answering `message` after `delay_ms`.
pub fn echo_task(region: &str, cluster: &str, message: &str, delay_ms: u64) -> pb::RunTaskRequest {
    pb::RunTaskRequest {
        target: Some(pb::ClusterRef {
            region: region.into(),
            cluster: cluster.into(),
        }),
        kind: "echo".into(),
        params: [
            ("message".to_string(), message.to_string()),
            ("delay_ms".to_string(), delay_ms.to_string()),
        ]
        .into_iter()
        .collect(),
    }
}

/// The `cutover` binary built alongside the tests (`cargo build --bin cutover`
/// runs first in `scripts/test`).
pub fn cutover_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // A test runs from target/<profile>/deps, a binary (the bench) from
    // target/<profile>.
    let dirs: Vec<&Path> = exe.ancestors().skip(1).take(2).collect();
    let bin = dirs.iter().map(|d| d.join("cutover")).find(|b| b.is_file());
    bin.unwrap_or_else(|| {
        panic!(
            "{} is missing: run `cargo build --bin cutover` first (scripts/test does)",
            dirs.last()
                .map_or_else(String::new, |d| d.join("cutover").display().to_string())
        )
    })
}

/// The previous release's `cutover` binary, for upgrade tests:
/// `CUTOVER_PREVIOUS_BIN`, which `scripts/test` sets to what
/// `scripts/previous-release` built. Missing, the test fails: an upgrade
/// that is not tested is not promised.
pub fn previous_release() -> PathBuf {
    let bin = std::env::var_os("CUTOVER_PREVIOUS_BIN").map(PathBuf::from);
    match bin {
        Some(b) if b.is_file() => b,
        other => panic!(
            "the previous release's binary is missing (CUTOVER_PREVIOUS_BIN={other:?}): \
             run the tests with `bash scripts/test`, or set it to what `bash scripts/previous-release` prints"
        ),
    }
}

/// A `cutover` subprocess, killed with SIGKILL when dropped.
pub struct Proc {
    pub child: Child,
}

impl Proc {
    pub fn spawn(args: &[&str], log: &Path) -> Result<Proc> {
        let out = std::fs::File::create(log)?;
        let child = Command::new(cutover_bin())
            .args(args)
            .stdout(out.try_clone()?)
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .context("spawning cutover")?;
        Ok(Proc { child })
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Everything this test process logs (at debug, the chattiest transport
/// crates at info), from the first call on: tests search it for secrets
/// that must never reach a log. One subscriber per process.
pub fn captured_logs() -> std::sync::Arc<std::sync::Mutex<Vec<u8>>> {
    use std::sync::{Arc, Mutex, OnceLock};
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = buf.clone();
        let make = move || LogWriter(writer.clone());
        let _ = tracing_subscriber::fmt()
            .with_env_filter("debug,h2=info,hyper=info,tower=info,openraft=info,aws=debug,sqlx=debug")
            .with_writer(make)
            .try_init();
        buf
    })
    .clone()
}

/// Appends log output to the shared buffer.
struct LogWriter(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The body of `GET /` at `addr` (the sample app names its version there).
pub async fn serving(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    buf.split("\r\n\r\n").nth(1).unwrap_or("").trim().to_owned()
}

/// One line per task of `op`: kind, region, state and message.
pub fn step_lines(op: &cutover_shared::domain::Operation) -> Vec<String> {
    op.tasks
        .iter()
        .map(|t| {
            format!(
                "{} {} {:?}: {}",
                t.spec.kind,
                t.spec.target.region,
                t.state,
                t.result.as_ref().map_or("", |r| r.message.as_str())
            )
        })
        .collect()
}
