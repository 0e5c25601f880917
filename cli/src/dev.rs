//! `cutover dev`: a whole local system in one process on loopback — three
//! coordinator nodes, one agent per region — with fresh certificates.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cutover_agent::Agent;
use cutover_coordinator::Node;
use cutover_shared::certs::{DevPki, init_dev_pki};
use cutover_shared::config::{
    AgentConfig, CoordinatorConfig, DatabaseConfig, DbDriver, DriverPolicy, Member, RaftConfig,
};
use cutover_shared::domain::AgentState;
use cutover_shared::identity::DEFAULT_TRUST_DOMAIN;
use cutover_shared::telemetry::LogFormat;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const DEV_REGIONS: &[(&str, &str)] = &[("us-east", "us-east-1"), ("eu-west", "eu-west-1")];

/// The demo's three regions.
pub const DEMO_REGIONS: &[(&str, &str)] = &[
    ("us-east", "us-east-1"),
    ("eu-west", "eu-west-1"),
    ("ap-south", "ap-south-1"),
];

/// A PostgreSQL URL for `region`'s sample database: `{region}` in
/// `template` becomes the region's name with `-` as `_`, so that it is a
/// plain database name (`postgres://u:p@host/sample_{region}` →
/// `.../sample_us_east`).
pub fn region_database_url(template: &str, region: &str) -> String {
    template.replace("{region}", &region.replace('-', "_"))
}

pub struct DevAgent {
    pub region: String,
    stop: Option<oneshot::Sender<()>>,
    /// `None` once stopped.
    task: Option<JoinHandle<()>>,
}

/// What some agents get beyond the sample app's database: the demo's
/// disaster-recovery chapter gives us-east and eu-west a replicated
/// PostgreSQL database and a third region the front door.
#[derive(Default)]
pub struct AgentExtras {
    /// Region → more `[[databases]]`.
    pub databases: std::collections::BTreeMap<String, Vec<DatabaseConfig>>,
    /// Region → `[traffic]`.
    pub traffic: std::collections::BTreeMap<String, cutover_shared::config::TrafficConfig>,
}

pub struct DevSystem {
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    pub pki: DevPki,
    pub nodes: Vec<Option<Node>>,
    pub addrs: Vec<String>,
    pub agents: Vec<DevAgent>,
    /// Each region's sample-app database; `None`: a SQLite file per region.
    pub database_url: Option<String>,
    /// The embedded object store the agents back up to.
    pub store: crate::devstore::DevStore,
    pub extras: AgentExtras,
}

/// Where `cutover dev` and `cutover demo` write their logs:
/// `<data_dir>/cutover.log`, or, with no data directory (a temporary one,
/// removed at exit), `cutover-<what>-<pid>.log` in the temporary directory,
/// which outlives the run.
pub fn log_path(data_dir: Option<&std::path::Path>, what: &str) -> PathBuf {
    match data_dir {
        Some(d) => d.join("cutover.log"),
        None => std::env::temp_dir().join(format!("cutover-{what}-{}.log", std::process::id())),
    }
}

impl DevSystem {
    pub async fn start(data_dir: Option<PathBuf>, regions: &[(&str, &str)]) -> Result<DevSystem> {
        Self::start_with(data_dir, regions, None, AgentExtras::default()).await
    }

    /// Like [`DevSystem::start`], with the sample app's databases at
    /// `database_url` (see [`region_database_url`]) instead of SQLite files.
    pub async fn start_with(
        data_dir: Option<PathBuf>,
        regions: &[(&str, &str)],
        database_url: Option<String>,
        extras: AgentExtras,
    ) -> Result<DevSystem> {
        let (dir, tmp) = match data_dir {
            Some(d) => (d, None),
            None => {
                let t = tempfile::Builder::new().prefix("cutover-dev-").tempdir()?;
                (t.path().to_owned(), Some(t))
            }
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let pki = init_dev_pki(&dir.join("certs"), DEFAULT_TRUST_DOMAIN, 3, regions)?;
        let mut listeners = Vec::new();
        for _ in 0..3 {
            listeners.push(TcpListener::bind("127.0.0.1:0").await?);
        }
        let addrs: Vec<String> = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.to_string()))
            .collect::<Result<_, _>>()?;
        let members: Vec<Member> = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| Member {
                id: i as u64 + 1,
                address: a.clone(),
            })
            .collect();
        let mut nodes = Vec::new();
        for (i, listener) in listeners.into_iter().enumerate() {
            let id = i as u64 + 1;
            let cfg = CoordinatorConfig {
                node_id: id,
                listen: addrs[i].clone(),
                advertise: None,
                data_dir: dir.join(format!("coordinator-{id}")),
                ops_listen: None,
                log_format: LogFormat::Human,
                tls: pki.coordinators[i].1.clone(),
                initial_members: members.clone(),
                agent_heartbeat_interval_ms: 1000,
                raft: RaftConfig::default(),
                retention: Default::default(),
            };
            nodes.push(Some(Node::start(cfg, listener, None).await?));
        }
        let store = crate::devstore::DevStore::start(&dir.join("backup")).await?;
        let mut sys = DevSystem {
            dir,
            _tmp: tmp,
            pki,
            nodes,
            addrs,
            agents: vec![],
            database_url,
            store,
            extras,
        };
        for i in 0..regions.len() {
            sys.start_agent(i)?;
        }
        Ok(sys)
    }

    pub fn agent_config(&self, i: usize) -> AgentConfig {
        let (region, cluster, tls) = &self.pki.agents[i];
        // The sample app's database in this region: a SQLite file, primary,
        // unless a URL was given. Its URL sits in a file, as a real secret
        // would (mode 0600: it may carry a password).
        let url_file = self.dir.join(format!("sample-db-url-{region}"));
        let (driver, url) = match &self.database_url {
            Some(template) => (DbDriver::Postgres, region_database_url(template, region)),
            None => {
                let db = self.dir.join(format!("sample-{region}.db"));
                (DbDriver::Sqlite, format!("sqlite://{}?mode=rwc", db.display()))
            }
        };
        if let Err(e) = cutover_shared::certs::write_file(&url_file, &url, true) {
            tracing::warn!("{e}");
        }
        let mut databases = vec![DatabaseConfig::with_url_file("sample", driver, url_file)];
        databases.extend(self.extras.databases.get(region).into_iter().flatten().cloned());
        AgentConfig {
            databases,
            coordinators: self.addrs.clone(),
            data_dir: self.dir.join(format!("agent-{region}-{cluster}")),
            server_name: None,
            ops_listen: None,
            log_format: LogFormat::Human,
            tls: tls.clone(),
            reconnect_min_ms: 100,
            reconnect_max_ms: 2000,
            // The sample app is this very binary, by path or (as in
            // deploy/examples/app-sample.toml) by name on PATH.
            drivers: DriverPolicy {
                local_commands: std::env::current_exe()
                    .map(|p| p.display().to_string())
                    .into_iter()
                    .chain(["cutover".to_owned()])
                    .collect(),
                kubeconfig: None,
                job_commands: vec![],
            },
            backup: Some(self.store.config.clone()),
            db_status_interval_ms: 1000,
            lease_secs: 30,
            traffic: self.extras.traffic.get(region).cloned(),
            prometheus_url: None,
        }
    }

    /// Starts agent `i` (again, after [`DevSystem::stop_agent`]).
    pub fn start_agent(&mut self, i: usize) -> Result<()> {
        let agent = Agent::new(self.agent_config(i))?;
        let (stop, rx) = oneshot::channel();
        let region = agent.cluster().region.clone();
        let task = tokio::spawn(agent.run(async move {
            let _ = rx.await;
        }));
        let a = DevAgent {
            region,
            stop: Some(stop),
            task: Some(task),
        };
        if i < self.agents.len() {
            self.agents[i] = a;
        } else {
            self.agents.push(a);
        }
        Ok(())
    }

    /// Stops agent `i` as its region's loss would: its stream, its tasks
    /// and its routers end (the app's processes, like a lost region's,
    /// are simply no longer reachable through it).
    pub async fn stop_agent(&mut self, i: usize) {
        if let Some(s) = self.agents[i].stop.take() {
            let _ = s.send(());
        }
        if let Some(mut task) = self.agents[i].task.take()
            && tokio::time::timeout(Duration::from_secs(5), &mut task).await.is_err()
        {
            // Never two agents of one cluster: a restart must not race it.
            task.abort();
            let _ = task.await;
        }
    }

    /// Lines a shell can `eval` to drive this system as the operator.
    pub fn exports(&self) -> String {
        let q = |p: &Path| format!("'{}'", p.display());
        format!(
            "export CUTOVER_ADDR={}\nexport CUTOVER_CA={}\nexport CUTOVER_CERT={}\nexport CUTOVER_KEY={}\n",
            self.addrs.join(","),
            q(&self.pki.ca),
            q(&self.pki.operator.cert),
            q(&self.pki.operator.key)
        )
    }

    /// Any running node.
    pub fn any_node(&self) -> &Node {
        self.nodes.iter().flatten().next().expect("at least one node runs")
    }

    /// The index of the node that currently leads, if a running node knows.
    pub fn leader_index(&self) -> Option<usize> {
        let id = self.any_node().consensus().status().leader?;
        let i = id as usize - 1;
        self.nodes.get(i).and_then(|n| n.as_ref()).map(|_| i)
    }

    /// Waits until a leader is elected and every agent is registered up.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let want = self.agents.len();
        loop {
            let node = self.any_node();
            let ups = node
                .consensus()
                .read(|s| s.agents.values().filter(|a| a.state == AgentState::Up).count());
            if node.consensus().status().leader.is_some() && ups >= want {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "system not ready after {timeout:?}: leader={:?}, agents up {ups}/{want}",
                    node.consensus().status().leader
                );
            }
            let mut applied = node.consensus().applied();
            let _ = tokio::time::timeout(Duration::from_millis(100), applied.changed()).await;
        }
    }

    /// Declares the sample app in every region (local driver, the sample
    /// app run by this very binary) and deploys `image` everywhere. Returns
    /// each region's service address.
    pub async fn install_sample_app(&mut self, image: &str) -> Result<Vec<(String, String)>> {
        use cutover_shared::app::{AppCluster, AppSpec, DriverKind, LoadProbe, Probe};
        use cutover_shared::proto as pb;
        let exe = std::env::current_exe()?;
        let mut clusters = Vec::new();
        for (region, cluster, _) in &self.pki.agents {
            clusters.push(AppCluster {
                region: region.clone(),
                cluster: cluster.clone(),
                driver: DriverKind::Local,
                // Ports below the ephemeral range: a `bind(0)` port, released,
                // can be taken by another process's outgoing connection
                // before the router binds it (CI saw "router cannot listen
                // on 127.0.0.1:38413: Address already in use").
                local: Some(cutover_devkit::sample_app::local(&exe)),
                kubernetes: None,
            });
        }
        let spec = AppSpec {
            name: "sample".into(),
            clusters,
            health: vec![Probe::Http {
                path: "/health".into(),
                status: 200,
                body_contains: None,
            }],
            load: LoadProbe::default(),
            waves: {
                let regions: Vec<String> = self.pki.agents.iter().map(|(r, _, _)| r.clone()).collect();
                let (first, rest) = regions.split_at(1);
                [first.to_vec(), rest.to_vec()]
                    .into_iter()
                    .filter(|w| !w.is_empty())
                    .collect()
            },
            bake_secs: 2,
            // The built-in checks, which need no Prometheus, judge each
            // release under the gates' load before it takes traffic.
            analysis: builtin_analysis(),
            ..Default::default()
        };
        let mut client =
            pb::control_service_client::ControlServiceClient::new(self.pki.operator.channel(&self.addrs[0], None)?);
        client
            .apply_app(pb::ApplyAppRequest {
                app: Some(spec.clone().into()),
            })
            .await?;
        for c in &spec.clusters {
            let id = client
                .deploy(pb::DeployRequest {
                    app: "sample".into(),
                    image: image.into(),
                    region: c.region.clone(),
                    no_switch: false,
                    waves: vec![],
                    strategy: 0,
                    ..Default::default()
                })
                .await?
                .into_inner()
                .operation_id;
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let op = client
                    .get_operation(pb::GetOperationRequest {
                        operation_id: id.clone(),
                    })
                    .await?
                    .into_inner()
                    .operation
                    .unwrap_or_default();
                if op.state == pb::TaskState::Succeeded as i32 {
                    break;
                }
                if op.state == pb::TaskState::Failed as i32 {
                    bail!("deploying {image} to {} failed: {}", c.region, op.summary);
                }
                if Instant::now() > deadline {
                    bail!("deploying {image} to {} did not finish within 60 s", c.region);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(spec
            .clusters
            .iter()
            .map(|c| {
                (
                    c.region.clone(),
                    c.local.as_ref().map(|l| l.listen.clone()).unwrap_or_default(),
                )
            })
            .collect())
    }

    /// Stops one coordinator node (in-process, like a clean crash of it).
    pub async fn stop_node(&mut self, i: usize) {
        if let Some(n) = self.nodes[i].take() {
            n.shutdown().await;
        }
    }

    pub async fn shutdown(mut self) {
        // Agents stopped earlier were awaited then; the others now.
        let mut running = Vec::new();
        for a in self.agents.drain(..) {
            if let (Some(s), Some(task)) = (a.stop, a.task) {
                let _ = s.send(());
                running.push(task);
            }
        }
        for task in running {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        for n in self.nodes.iter_mut() {
            if let Some(n) = n.take() {
                n.shutdown().await;
            }
        }
        // The sample app's processes outlive agents by design; not dev's.
        for i in 0..self.pki.agents.len() {
            cutover_agent::drivers::local::kill_all_under(&self.agent_config(i).data_dir);
        }
    }
}

/// The demo's and `cutover dev`'s metric checks: Flagger's two built-ins,
/// at the gates, two one-second measurements each.
fn builtin_analysis() -> Vec<cutover_shared::analysis::MetricCheck> {
    use cutover_shared::analysis::{AnalysisStage, MetricCheck, MetricProvider};
    let gates = |c: MetricCheck| MetricCheck {
        stage: AnalysisStage::Gates,
        interval_secs: 1,
        count: 2,
        ..c
    };
    vec![
        gates(MetricCheck::success_rate("success-rate", 99.0)),
        gates(MetricCheck {
            name: "latency-p95".into(),
            provider: MetricProvider::RequestDuration,
            percentile: Some(95.0),
            condition: Some("result < 500".parse().expect("a valid condition")),
            ..MetricCheck::success_rate("latency-p95", 0.0)
        }),
    ]
}
