//! A whole system as real `cutover` processes, for kill -9 tests: N
//! `cutover coordinator` processes and one `cutover agent` process per
//! region, each with its own config file in a temporary directory and its
//! output in a log file. Any process can be killed with SIGKILL and started
//! again from its data directory; every start writes a new log file, so a
//! test can tell what each incarnation did.
//!
//! [`ProcessCluster::start_in_namespaces`] runs each coordinator and each
//! agent in its own network namespace ([`crate::netns::Net`]), so a test
//! can partition them.
//!
//! Agents log as JSON (`log_format = "json"`), which is what
//! [`ProcessCluster::agent_task_events`] reads to tell how often each task
//! was started (executed, not replayed) and finished.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cutover_shared::config::to_toml;
use cutover_shared::proto as pb;
use cutover_shared::proto::control_service_client::ControlServiceClient;
use cutover_shared::telemetry::LogFormat;
use tonic::transport::Channel;

use crate::{Proc, TestCluster, cutover_bin, stable_free_addr};

/// What the processes log: info, without the chattiest dependencies.
const LOG_FILTER: &str = "info,openraft=warn,h2=warn,tower=warn,hyper=warn,hyper_util=warn";

/// One task event an agent logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskEvent {
    /// Which run of the agent process logged it (0 = the first).
    pub incarnation: usize,
    pub task_id: String,
    pub kind: TaskEventKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskEventKind {
    /// "task started": the agent executes it (`attempt` counts starts, from
    /// the agent's durable store).
    Started { attempt: u64 },
    /// "task finished": the result is recorded (fsynced) and reported.
    Finished { success: bool },
    /// "task already finished; replaying its result".
    Replayed,
}

/// Coordinators and agents as real processes.
pub struct ProcessCluster {
    /// Configs, certificates and the temporary directory. Dropping it kills
    /// the app processes the agents started.
    pub harness: TestCluster,
    coordinator_configs: Vec<PathBuf>,
    agent_configs: Vec<PathBuf>,
    coordinators: Vec<Option<Proc>>,
    agents: Vec<Option<Proc>>,
    coordinator_logs: Vec<Vec<PathBuf>>,
    agent_logs: Vec<Vec<PathBuf>>,
    /// libfaketime, when the coordinators run under it
    /// ([`Self::start_with_clocks`]).
    libfaketime: Option<PathBuf>,
    /// The WAN proxies between regions ([`Self::start_across_wan`]).
    pub wan: Option<crate::wan::Wan>,
    /// The binary each coordinator and each agent runs on its next start.
    coordinator_bins: Vec<PathBuf>,
    /// Extra environment for each coordinator's next start.
    coordinator_env: Vec<Vec<(String, String)>>,
    agent_bins: Vec<PathBuf>,
    /// The namespaces, when the processes run in them: coordinator `i` in
    /// `coordinator-<i+1>`, each agent in its region's. Dropped after the
    /// processes (a struct's fields drop after its `Drop`).
    pub net: Option<crate::netns::Net>,
}

/// Config keys this release added since the previous one (the release
/// `scripts/previous-release` builds), whose config parser refuses keys
/// it does not know. An upgrade keeps the operator's config file as it
/// was, so the files are written without them, and this release reads
/// them with their defaults.
const KEYS_SINCE_PREVIOUS: &[&str] = &["pre_vote"];

/// `text`, a coordinator config, as the previous release reads it.
fn previous_release_config(text: &str) -> String {
    text.lines()
        .filter(|l| {
            !KEYS_SINCE_PREVIOUS
                .iter()
                .any(|k| l.trim_start().starts_with(&format!("{k} =")))
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The port every coordinator listens on in its namespace.
const NETNS_PORT: u16 = 7000;

impl ProcessCluster {
    /// Writes configs for `nodes` coordinators (the harness's tight Raft
    /// timings) and one agent per region, then starts every process.
    pub async fn start(nodes: u64, regions: &[(&str, &str)]) -> Result<ProcessCluster> {
        Self::start_with(nodes, regions, |_, _, _| {}).await
    }

    /// [`Self::start`], with `agent(i, config, dir)` adjusting agent `i`'s
    /// config (its databases, its backup store) before it is written.
    pub async fn start_with(
        nodes: u64,
        regions: &[(&str, &str)],
        agent: impl Fn(usize, &mut cutover_shared::config::AgentConfig, &Path),
    ) -> Result<ProcessCluster> {
        let builder = TestCluster::builder().nodes(nodes).regions(regions);
        Self::start_inner(builder, regions, agent, None, None, false, None).await
    }

    /// [`Self::start`], each coordinator under libfaketime with its own
    /// wall clock offset (`+0` to begin with), which [`Self::set_clock`]
    /// jumps. Only the wall clock: monotonic time stays true, as it does
    /// when NTP steps a clock or a VM resumes.
    pub async fn start_with_clocks(nodes: u64, regions: &[(&str, &str)]) -> Result<ProcessCluster> {
        let builder = TestCluster::builder().nodes(nodes).regions(regions);
        Self::start_inner(builder, regions, |_, _, _| {}, None, None, true, None).await
    }

    /// [`Self::start`] on the previous release's binary (`previous`, see
    /// [`crate::previous_release`]): every coordinator and agent runs it,
    /// with config files as that release reads them, until
    /// [`Self::set_coordinator_binary`] and [`Self::set_agent_binary`]
    /// move them to another.
    pub async fn start_on_previous(nodes: u64, regions: &[(&str, &str)], previous: &Path) -> Result<ProcessCluster> {
        let builder = TestCluster::builder().nodes(nodes).regions(regions);
        Self::start_inner(builder, regions, |_, _, _| {}, None, None, false, Some(previous)).await
    }

    /// Sets coordinator `i`'s wall clock to the true time plus `offset`
    /// (libfaketime's syntax: `+0`, `+1h`, `-30m`); seen within a second.
    /// Needs [`Self::start_with_clocks`].
    pub fn set_clock(&self, i: usize, offset: &str) -> Result<()> {
        std::fs::write(self.clock_file(i), offset)?;
        Ok(())
    }

    fn clock_file(&self, i: usize) -> PathBuf {
        self.dir().join(format!("clock-{}", i + 1))
    }

    /// [`Self::start`] with every coordinator and agent in its own network
    /// namespace on one bridge. Coordinators listen on their namespace's
    /// address and reach each other, and agents reach them, as
    /// `coordinator-<n>`, the name their certificates carry.
    pub async fn start_in_namespaces(nodes: u64, regions: &[(&str, &str)]) -> Result<ProcessCluster> {
        Self::start_in_namespaces_with(nodes, regions, |_| {}).await
    }

    /// [`Self::start_in_namespaces`], with `coordinator` adjusting every
    /// coordinator's config before it is written.
    pub async fn start_in_namespaces_with(
        nodes: u64,
        regions: &[(&str, &str)],
        coordinator: impl Fn(&mut cutover_shared::config::CoordinatorConfig) + Send + Sync + 'static,
    ) -> Result<ProcessCluster> {
        let names: Vec<String> = (1..=nodes)
            .map(|i| format!("coordinator-{i}"))
            .chain(regions.iter().map(|(r, _)| r.to_string()))
            .collect();
        let net = crate::netns::Net::new(&names.iter().map(String::as_str).collect::<Vec<_>>())?;
        let builder = TestCluster::builder()
            .nodes(nodes)
            .regions(regions)
            .configure(coordinator);
        Self::start_inner(builder, regions, |_, _, _| {}, Some(net), None, false, None).await
    }

    /// One coordinator per region, each process in its own namespace as
    /// in [`Self::start_in_namespaces`], with coordinator `i` sited in
    /// region `i`: connections between namespaces of different regions go
    /// through the WAN proxy ([`crate::wan`]) with `link(region, region)`.
    /// Raft and agent heartbeats get WAN timings (etcd's advice: heartbeat
    /// about one round trip, election about ten): heartbeat 100 ms,
    /// election 1–2 s, agent heartbeat 1 s.
    pub async fn start_across_wan(
        regions: &[(&str, &str)],
        link: impl Fn(&str, &str) -> Option<crate::wan::Link>,
    ) -> Result<ProcessCluster> {
        let nodes = regions.len() as u64;
        let names: Vec<String> = (1..=nodes)
            .map(|i| format!("coordinator-{i}"))
            .chain(regions.iter().map(|(r, _)| r.to_string()))
            .collect();
        let net = crate::netns::Net::new(&names.iter().map(String::as_str).collect::<Vec<_>>())?;
        let site = |space: &str| -> String {
            match space.strip_prefix("coordinator-").and_then(|n| n.parse::<usize>().ok()) {
                Some(n) => regions[n - 1].0.to_string(),
                None => space.to_string(),
            }
        };
        let listeners: Vec<(String, u16)> = (1..=nodes).map(|i| (format!("coordinator-{i}"), NETNS_PORT)).collect();
        let listeners: Vec<(&str, u16)> = listeners.iter().map(|(n, p)| (n.as_str(), *p)).collect();
        let wan = crate::wan::Wan::start(&net, &listeners, |from, to| {
            let (a, b) = (site(from), site(to));
            if a == b { None } else { link(&a, &b) }
        })
        .await?;
        let builder = TestCluster::builder().nodes(nodes).regions(regions).configure(|cfg| {
            cfg.raft.heartbeat_interval_ms = 100;
            cfg.raft.election_timeout_min_ms = 3000;
            cfg.raft.election_timeout_max_ms = 4000;
            cfg.agent_heartbeat_interval_ms = 1000;
        });
        Self::start_inner(builder, regions, |_, _, _| {}, Some(net), Some(wan), false, None).await
    }

    async fn start_inner(
        builder: crate::TestClusterBuilder,
        regions: &[(&str, &str)],
        agent: impl Fn(usize, &mut cutover_shared::config::AgentConfig, &Path),
        net: Option<crate::netns::Net>,
        wan: Option<crate::wan::Wan>,
        clocks: bool,
        previous: Option<&Path>,
    ) -> Result<ProcessCluster> {
        let nodes = builder.node_count();
        let mut harness = builder.prepare().await?;
        let dir = harness.tmp.path().to_owned();
        std::fs::create_dir_all(dir.join("logs"))?;
        // The harness bound ports to learn them; processes bind their own,
        // taken below the ephemeral range (see `stable_free_addr`), or one
        // port on their namespace's own address.
        harness.release_listeners();
        let (listen, member): (Vec<String>, Vec<String>) = match &net {
            None => harness
                .configs
                .iter()
                .map(|_| {
                    let a = stable_free_addr();
                    (a.clone(), a)
                })
                .unzip(),
            Some(net) => (1..=nodes)
                .map(|i| {
                    let name = format!("coordinator-{i}");
                    (
                        format!("{}:{NETNS_PORT}", net.addr(&name)),
                        format!("{name}:{NETNS_PORT}"),
                    )
                })
                .unzip(),
        };
        for cfg in harness.configs.iter_mut() {
            cfg.listen = listen[cfg.node_id as usize - 1].clone();
            for m in cfg.initial_members.iter_mut() {
                m.address = member[m.id as usize - 1].clone();
            }
        }
        let mut coordinator_configs = Vec::new();
        for (i, cfg) in harness.configs.iter().enumerate() {
            let path = dir.join(format!("coordinator-{}.toml", i + 1));
            let mut text = to_toml(cfg)?;
            if previous.is_some() {
                text = previous_release_config(&text);
            }
            std::fs::write(&path, text)?;
            coordinator_configs.push(path);
        }
        let mut agent_configs = Vec::new();
        for (i, (region, _)) in regions.iter().enumerate() {
            let mut cfg = harness.agent_config(i);
            cfg.log_format = LogFormat::Json;
            if net.is_some() {
                cfg.coordinators = member.clone();
            }
            agent(i, &mut cfg, &dir);
            let path = dir.join(format!("agent-{region}.toml"));
            std::fs::write(&path, to_toml(&cfg)?)?;
            agent_configs.push(path);
        }
        let n = coordinator_configs.len();
        let a = agent_configs.len();
        let mut pc = ProcessCluster {
            harness,
            coordinator_configs,
            agent_configs,
            coordinators: (0..n).map(|_| None).collect(),
            agents: (0..a).map(|_| None).collect(),
            coordinator_logs: vec![vec![]; n],
            agent_logs: vec![vec![]; a],
            wan,
            net,
            libfaketime: if clocks { Some(libfaketime()?) } else { None },
            coordinator_bins: vec![previous.map_or_else(cutover_bin, Path::to_owned); n],
            coordinator_env: vec![vec![]; n],
            agent_bins: vec![previous.map_or_else(cutover_bin, Path::to_owned); a],
        };
        if clocks {
            for i in 0..n {
                pc.set_clock(i, "+0")?;
            }
        }
        for i in 0..n {
            pc.start_coordinator(i)?;
        }
        for i in 0..a {
            pc.start_agent(i)?;
        }
        Ok(pc)
    }

    pub fn dir(&self) -> &Path {
        self.harness.tmp.path()
    }

    /// Starts `cutover args`, in namespace `space` when there are any.
    fn spawn(
        &self,
        bin: &Path,
        space: &str,
        args: &[&str],
        log: &Path,
        format: &str,
        env: &[(&str, String)],
    ) -> Result<Proc> {
        let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut command = match &self.net {
            Some(net) => net.command(space, bin),
            None => Command::new(bin),
        };
        command.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        let child = command
            .args(args)
            .env("RUST_LOG", LOG_FILTER)
            .env("NO_COLOR", "1")
            .env("CUTOVER_LOG_FORMAT", format)
            .env_remove("CUTOVER_DATA_DIR")
            .stdout(out.try_clone()?)
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .context("spawning cutover")?;
        Ok(Proc { child })
    }

    /// Starts (or restarts, from its data directory) coordinator `i`.
    pub fn start_coordinator(&mut self, i: usize) -> Result<()> {
        assert!(self.coordinators[i].is_none(), "coordinator {} already runs", i + 1);
        let log = self
            .dir()
            .join("logs")
            .join(format!("coordinator-{}.{}.log", i + 1, self.coordinator_logs[i].len()));
        let config = self.coordinator_configs[i].display().to_string();
        let space = format!("coordinator-{}", i + 1);
        let mut env: Vec<(&str, String)> = match &self.libfaketime {
            None => vec![],
            Some(lib) => vec![
                ("LD_PRELOAD", lib.display().to_string()),
                ("FAKETIME_TIMESTAMP_FILE", self.clock_file(i).display().to_string()),
                ("FAKETIME_CACHE_DURATION", "1".into()),
                ("FAKETIME_DONT_FAKE_MONOTONIC", "1".into()),
                ("DONT_FAKE_MONOTONIC", "1".into()),
            ],
        };
        env.extend(self.coordinator_env[i].iter().map(|(k, v)| (k.as_str(), v.clone())));
        let bin = &self.coordinator_bins[i];
        self.coordinators[i] =
            Some(self.spawn(bin, &space, &["coordinator", "--config", &config], &log, "human", &env)?);
        self.coordinator_logs[i].push(log);
        Ok(())
    }

    /// Stops coordinator `i` as a supervisor does (SIGTERM), and waits for
    /// it to exit: what a rolling upgrade does to each node in turn.
    pub async fn stop_coordinator(&mut self, i: usize, timeout: Duration) -> Result<std::process::ExitStatus> {
        let mut p = self.coordinators[i].take().context("coordinator not running")?;
        let pid = p.child.id().to_string();
        let term = Command::new("kill").args(["-TERM", &pid]).status()?;
        anyhow::ensure!(term.success(), "kill -TERM {pid} failed");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = p.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("coordinator {} did not exit within {timeout:?} of SIGTERM", i + 1);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Extra environment for coordinator `i` from its next start on (an
    /// `LD_PRELOAD` fault library, say).
    pub fn set_coordinator_env(&mut self, i: usize, env: Vec<(String, String)>) {
        self.coordinator_env[i] = env;
    }

    /// The binary coordinator `i` runs from its next start on: how a test
    /// upgrades a node (stop it, set this, start it on its data directory).
    pub fn set_coordinator_binary(&mut self, i: usize, bin: &Path) {
        self.coordinator_bins[i] = bin.to_owned();
    }

    /// The binary agent `i` runs from its next start on.
    pub fn set_agent_binary(&mut self, i: usize, bin: &Path) {
        self.agent_bins[i] = bin.to_owned();
    }

    /// Coordinator `i`'s exit status, once its process has exited on its
    /// own (`None` while it runs, or when it was killed or never started).
    pub fn coordinator_exited(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        let status = self.coordinators[i].as_mut()?.child.try_wait().ok()??;
        self.coordinators[i] = None;
        Some(status)
    }

    /// Coordinator `i`'s data directory.
    pub fn coordinator_data_dir(&self, i: usize) -> PathBuf {
        self.harness.configs[i].data_dir.clone()
    }

    /// kill -9 of coordinator `i`.
    pub fn kill9_coordinator(&mut self, i: usize) {
        if let Some(mut p) = self.coordinators[i].take() {
            p.kill9();
        }
    }

    /// Starts (or restarts, from its data directory) agent `i`.
    pub fn start_agent(&mut self, i: usize) -> Result<()> {
        assert!(self.agents[i].is_none(), "agent {i} already runs");
        let region = &self.harness.pki.agents[i].0;
        let log = self
            .dir()
            .join("logs")
            .join(format!("agent-{region}.{}.log", self.agent_logs[i].len()));
        let config = self.agent_configs[i].display().to_string();
        let space = region.clone();
        let bin = &self.agent_bins[i];
        self.agents[i] = Some(self.spawn(bin, &space, &["agent", "--config", &config], &log, "json", &[])?);
        self.agent_logs[i].push(log);
        Ok(())
    }

    /// kill -9 of agent `i` (its app processes keep running, by design).
    /// The process id of agent `i`, while it runs.
    pub fn agent_pid(&self, i: usize) -> Option<u32> {
        self.agents[i].as_ref().map(|p| p.child.id())
    }

    pub fn kill9_agent(&mut self, i: usize) {
        if let Some(mut p) = self.agents[i].take() {
            p.kill9();
        }
    }

    /// Indexes of the coordinators whose processes run.
    pub fn running_coordinators(&self) -> Vec<usize> {
        (0..self.coordinators.len())
            .filter(|&i| self.coordinators[i].is_some())
            .collect()
    }

    pub fn addr(&self, i: usize) -> &str {
        &self.harness.configs[i].listen
    }

    /// An operator client for coordinator `i` (connects lazily). In
    /// namespaces it dials the node's address and expects the name its
    /// certificate carries.
    pub fn operator(&self, i: usize) -> ControlServiceClient<Channel> {
        match &self.net {
            None => self.harness.operator(i),
            Some(_) => {
                let name = format!("coordinator-{}", i + 1);
                let channel = self.harness.pki.operator.channel(self.addr(i), Some(&name));
                ControlServiceClient::new(channel.expect("operator channel"))
            }
        }
    }

    /// Coordinator `i`'s view of the cluster, if it answers within 2 s.
    pub async fn cluster_status(&self, i: usize) -> Option<pb::GetClusterStatusResponse> {
        let mut client = self.operator(i);
        let call = client.get_cluster_status(pb::GetClusterStatusRequest {});
        match tokio::time::timeout(Duration::from_secs(2), call).await {
            Ok(Ok(r)) => Some(r.into_inner()),
            _ => None,
        }
    }

    /// Waits until every running coordinator answers and names the same
    /// leader, which runs and calls itself leader; returns its index.
    pub async fn wait_leader(&self, timeout: Duration) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            let running = self.running_coordinators();
            let mut views = Vec::new();
            for &i in &running {
                views.push(self.cluster_status(i).await);
            }
            let ids: Vec<Option<u64>> = views.iter().map(|v| v.as_ref().map(|s| s.leader_id)).collect();
            if let Some(Some(id)) = ids.first().copied()
                && id > 0
                && ids.iter().all(|v| *v == Some(id))
            {
                let l = id as usize - 1;
                let leads = running
                    .iter()
                    .position(|&i| i == l)
                    .and_then(|k| views[k].as_ref())
                    .is_some_and(|s| s.server_state == "leader");
                if leads {
                    return Ok(l);
                }
            }
            if Instant::now() > deadline {
                bail!("no agreed leader among coordinators {running:?} after {timeout:?}: leader ids {ids:?}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Asks each running coordinator in turn until one answers.
    pub async fn any<T, F, Fut>(&self, what: &str, call: F) -> Result<T>
    where
        F: Fn(ControlServiceClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut errors = Vec::new();
        for i in self.running_coordinators() {
            match tokio::time::timeout(Duration::from_secs(5), call(self.operator(i))).await {
                Ok(Ok(r)) => return Ok(r.into_inner()),
                Ok(Err(s)) => errors.push(format!("node {}: {:?} {}", i + 1, s.code(), s.message())),
                Err(_) => errors.push(format!("node {}: timed out", i + 1)),
            }
        }
        bail!("{what}: no coordinator answered: {}", errors.join("; "))
    }

    /// The operation as the first running coordinator that answers has it.
    pub async fn operation(&self, id: &str) -> Result<pb::Operation> {
        let r = self
            .any("GetOperation", |mut c| {
                let id = id.to_owned();
                async move { c.get_operation(pb::GetOperationRequest { operation_id: id }).await }
            })
            .await?;
        r.operation.context("GetOperation answered no operation")
    }

    /// Applies `spec` through any coordinator.
    pub async fn apply_app(&self, spec: &cutover_shared::app::AppSpec) -> Result<()> {
        let app: pb::App = spec.clone().into();
        self.any("ApplyApp", |mut c| {
            let app = app.clone();
            async move { c.apply_app(pb::ApplyAppRequest { app: Some(app) }).await }
        })
        .await?;
        Ok(())
    }

    /// Starts a deploy of `app` to `image` in waves through any
    /// coordinator; returns the operation's id.
    pub async fn start_deploy_waves(&self, app: &str, image: &str) -> Result<String> {
        let r = self
            .any("Deploy", |mut c| async move {
                c.deploy(pb::DeployRequest {
                    app: app.into(),
                    image: image.into(),
                    strategy: pb::Strategy::Waves as i32,
                    ..Default::default()
                })
                .await
            })
            .await?;
        Ok(r.operation_id)
    }

    /// Polls until the operation is finished (succeeded or failed).
    pub async fn wait_finished(&self, id: &str, timeout: Duration) -> Result<pb::Operation> {
        let deadline = Instant::now() + timeout;
        loop {
            let op = self.operation(id).await;
            if let Ok(op) = &op
                && (op.state == pb::TaskState::Succeeded as i32 || op.state == pb::TaskState::Failed as i32)
            {
                return Ok(op.clone());
            }
            if Instant::now() > deadline {
                bail!(
                    "operation {id} not finished after {timeout:?}; last seen: {}",
                    describe(op.ok().as_ref())
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every agent is registered up.
    pub async fn wait_agents_up(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let want = self.agents.len();
        loop {
            let up = self
                .any("ListAgents", |mut c| async move {
                    c.list_agents(pb::ListAgentsRequest::default()).await
                })
                .await
                .map(|r| r.agents.iter().filter(|a| a.state == pb::AgentState::Up as i32).count())
                .unwrap_or(0);
            if up == want {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{up}/{want} agents up after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Index of the agent serving `region`.
    pub fn agent_index(&self, region: &str) -> usize {
        self.harness
            .pki
            .agents
            .iter()
            .position(|(r, _, _)| r == region)
            .unwrap_or_else(|| panic!("no agent for region {region}"))
    }

    /// Every task event agent `i` logged, over all its runs, in order.
    pub fn agent_task_events(&self, i: usize) -> Vec<TaskEvent> {
        let mut out = Vec::new();
        for (incarnation, path) in self.agent_logs[i].iter().enumerate() {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            // A line cut by kill -9 does not parse and is skipped.
            for v in text
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            {
                let Some(task_id) = v.get("task").and_then(|t| t.as_str()) else {
                    continue;
                };
                let kind = match v.get("message").and_then(|m| m.as_str()) {
                    Some("task started") => TaskEventKind::Started {
                        attempt: v.get("attempt").and_then(|a| a.as_u64()).unwrap_or(0),
                    },
                    Some("task finished") => TaskEventKind::Finished {
                        success: v.get("success").and_then(|s| s.as_bool()).unwrap_or(false),
                    },
                    Some(m) if m.starts_with("task already finished") => TaskEventKind::Replayed,
                    _ => continue,
                };
                out.push(TaskEvent {
                    incarnation,
                    task_id: task_id.to_owned(),
                    kind,
                });
            }
        }
        out
    }

    /// Everything coordinator `i` logged, over all its runs.
    pub fn coordinator_log(&self, i: usize) -> String {
        self.coordinator_logs[i]
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .collect()
    }

    /// Everything agent `i` logged (JSON lines), over all its runs.
    pub fn agent_log(&self, i: usize) -> String {
        self.agent_logs[i]
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .collect()
    }

    /// The last `lines` lines of every log, for failure messages.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for path in self.coordinator_logs.iter().chain(&self.agent_logs).flatten() {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            out.push_str(&format!("==> {} <==\n", path.display()));
            for l in &all[all.len().saturating_sub(lines)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

/// One line per task, for failure messages.
pub fn describe(op: Option<&pb::Operation>) -> String {
    let Some(op) = op else { return "(none)".into() };
    let state = |s: i32| pb::TaskState::try_from(s).map_or("?".into(), |s| format!("{s:?}"));
    let mut out = format!("{} {}: {}", op.id, state(op.state), op.summary);
    for t in &op.tasks {
        let spec = t.task.clone().unwrap_or_default();
        let target = spec.target.map(|c| c.region).unwrap_or_default();
        let (msg, replayed) = t
            .result
            .as_ref()
            .map_or((String::new(), false), |r| (r.message.replace('\n', " "), r.replayed));
        out.push_str(&format!(
            "\n  {} {} {} {} dispatched {}x{} {}",
            spec.task_id,
            spec.kind,
            target,
            state(t.state),
            t.dispatch_count,
            if replayed { " (replayed)" } else { "" },
            msg
        ));
    }
    out
}

impl Drop for ProcessCluster {
    fn drop(&mut self) {
        for i in 0..self.agents.len() {
            self.kill9_agent(i);
        }
        for i in 0..self.coordinators.len() {
            self.kill9_coordinator(i);
        }
        // The harness's own drop then kills the app processes.
    }
}

/// libfaketime's multithreaded library: `CUTOVER_LIBFAKETIME`, or where
/// Debian's `libfaketime` puts it (`scripts/setup` installs it).
fn libfaketime() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("CUTOVER_LIBFAKETIME") {
        return Ok(PathBuf::from(p));
    }
    for dir in std::fs::read_dir("/usr/lib")?.flatten() {
        let lib = dir.path().join("faketime/libfaketimeMT.so.1");
        if lib.is_file() {
            return Ok(lib);
        }
    }
    bail!("libfaketime is missing: run scripts/setup (it installs Debian's libfaketime), or set CUTOVER_LIBFAKETIME")
}
