//! What several scenarios share: percentiles, the disk's fsync latency,
//! process CPU and memory from `/proc`, and a 3-node cutover cluster of real
//! `cutover coordinator` processes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cutover_shared::config::{CoordinatorConfig, DEFAULT_AGENT_HEARTBEAT_MS, RaftConfig, to_toml};
use cutover_shared::proto as pb;
use cutover_shared::proto::agent_service_client::AgentServiceClient;
use cutover_shared::proto::control_service_client::ControlServiceClient;
use cutover_shared::proto::{ConnectRequest, connect_request, connect_response};
use cutover_shared::tls::TlsFiles;
use cutover_tests::TestCluster;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// Nearest-rank percentile of an ascending slice.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// p50, p99 and max of unsorted samples.
pub fn summary(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (
        percentile(&v, 50.0),
        percentile(&v, 99.0),
        v.last().copied().unwrap_or(0.0),
    )
}

/// Milliseconds since `t`.
pub fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// Latency of `write 4 KiB, fdatasync` in a fresh file under `dir`, in ms:
/// (p50, p99) over `n` samples. With `append`, each write grows the file
/// (as redb's file and an unallocated log grow); otherwise the file is
/// preallocated and synced first, and the writes overwrite it in sequence
/// (as etcd's preallocated WAL segments are written).
pub fn fsync_latency(dir: &Path, n: usize, append: bool) -> Result<(f64, f64)> {
    use std::os::unix::fs::FileExt;
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path).with_context(|| path.display().to_string())?;
    let block = vec![0xa5u8; 4096];
    if !append {
        f.write_all(&vec![0u8; 4096 * n])?;
        f.sync_all()?;
    }
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        if append {
            f.write_all(&block)?;
        } else {
            f.write_all_at(&block, (i * 4096) as u64)?;
        }
        f.sync_data()?;
        samples.push(ms_since(t));
    }
    drop(f);
    std::fs::remove_file(&path)?;
    let (p50, p99, _) = summary(samples);
    Ok((p50, p99))
}

/// Latency of one redb write transaction holding one 256-byte row, with
/// redb's default durability (one fdatasync), as cutover's log writer
/// commits a single append: (p50, p99) in ms over `n` commits in each of
/// `writers` databases under `dir`, committing at once (two: a leader's and
/// a follower's log on one disk). Each database first holds 10,000 rows,
/// as a log between snapshots does.
pub fn redb_commit_latency(dir: &Path, n: usize, writers: usize) -> Result<(f64, f64)> {
    const LOG: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("log");
    let row = vec![0xa5u8; 256];
    let threads: Vec<_> = (0..writers)
        .map(|w| {
            let (path, row) = (dir.join(format!("redb-probe-{w}.redb")), row.clone());
            std::thread::spawn(move || -> Result<Vec<f64>> {
                let db = redb::Database::create(&path)?;
                let tx = db.begin_write()?;
                {
                    let mut t = tx.open_table(LOG)?;
                    for i in 0..10_000u64 {
                        t.insert(i, row.as_slice())?;
                    }
                }
                tx.commit()?;
                let mut samples = Vec::with_capacity(n);
                for i in 10_000..10_000 + n as u64 {
                    let t0 = Instant::now();
                    let tx = db.begin_write()?;
                    tx.open_table(LOG)?.insert(i, row.as_slice())?;
                    tx.commit()?;
                    samples.push(ms_since(t0));
                }
                drop(db);
                std::fs::remove_file(&path)?;
                Ok(samples)
            })
        })
        .collect();
    let mut samples = Vec::with_capacity(n * writers);
    for t in threads {
        samples.extend(t.join().map_err(|_| anyhow::anyhow!("redb probe thread panicked"))??);
    }
    let (p50, p99, _) = summary(samples);
    Ok((p50, p99))
}

/// Clock ticks per second for `/proc/<pid>/stat` times.
pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// User plus system CPU time of a process so far, in clock ticks.
pub fn cpu_ticks(pid: &str) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may contain spaces: fields count from after its ')'.
    let rest = &stat[stat.rfind(')').context("malformed stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 here.
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

/// Resident memory of a process in MiB (`VmRSS`).
pub fn rss_mib(pid: &str) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    let kib: f64 = line.split_whitespace().nth(1).context("no VmRSS value")?.parse()?;
    Ok(kib / 1024.0)
}

/// Idle and total jiffies of the whole machine (`/proc/stat`).
pub fn machine_ticks() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let cpu = stat.lines().next().context("empty /proc/stat")?;
    let v: Vec<u64> = cpu.split_whitespace().skip(1).map(|x| x.parse().unwrap_or(0)).collect();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Ok((idle, v.iter().sum()))
}

/// The 1, 5 and 15 minute load averages (`/proc/loadavg`).
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The soft limit on open files of this process (inherited by children).
pub fn nofile_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// The `cutover` binary next to this one (`target/<profile>/`), or
/// `$CUTOVER_BIN`.
pub fn cutover_bin() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("CUTOVER_BIN") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe()?;
    let bin = exe.parent().context("executable has no directory")?.join("cutover");
    if !bin.exists() {
        bail!(
            "{} is missing: build it first (`cargo build --release --bin cutover` for a release bench)",
            bin.display()
        );
    }
    Ok(bin)
}

/// The last `n` lines of a log file, for error messages.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Three `cutover coordinator` processes on loopback with the default Raft
/// timings and agent heartbeat (1 s), configs and certificates from the
/// test harness. Dropping it kills every process.
pub struct CutoverProcs {
    pub tc: TestCluster,
    bin: PathBuf,
    config_paths: Vec<PathBuf>,
    procs: Vec<Option<Child>>,
    channels: Vec<Channel>,
    /// Extra environment of every process (e.g. `RUST_LOG`).
    env: Vec<(String, String)>,
}

impl CutoverProcs {
    /// Issues certificates for `agents` (region, cluster) pairs too.
    pub async fn start(agents: &[(String, String)]) -> Result<CutoverProcs> {
        Self::start_with(agents, RaftConfig::default()).await
    }

    /// Like `start`, with other Raft timings.
    pub async fn start_with(agents: &[(String, String)], raft: RaftConfig) -> Result<CutoverProcs> {
        Self::start_env(agents, raft, &[]).await
    }

    /// Like `start_with`, each process with `env` added to its environment.
    pub async fn start_env(
        agents: &[(String, String)],
        raft: RaftConfig,
        env: &[(&str, &str)],
    ) -> Result<CutoverProcs> {
        Self::start_configured(agents, env, move |cfg| cfg.raft = raft.clone()).await
    }

    /// The most general start: `configure` adjusts each node's config
    /// after the harness's, with Raft timings and the agent heartbeat at
    /// the product's defaults.
    pub async fn start_configured(
        agents: &[(String, String)],
        env: &[(&str, &str)],
        configure: impl Fn(&mut CoordinatorConfig) + Send + Sync + 'static,
    ) -> Result<CutoverProcs> {
        let bin = cutover_bin()?;
        let refs: Vec<(&str, &str)> = agents.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        let mut tc = TestCluster::builder()
            .nodes(3)
            .regions(&refs)
            .configure(move |cfg| {
                // The product's defaults, not the harness's test timings.
                cfg.raft = RaftConfig::default();
                cfg.agent_heartbeat_interval_ms = DEFAULT_AGENT_HEARTBEAT_MS;
                configure(cfg);
            })
            .prepare()
            .await?;
        let dir = tc.tmp.path().to_owned();
        let mut config_paths = Vec::new();
        for (i, cfg) in tc.configs.iter().enumerate() {
            let path = dir.join(format!("coordinator-{}.toml", i + 1));
            std::fs::write(&path, to_toml(cfg)?)?;
            config_paths.push(path);
        }
        // The harness bound the ports to learn them; the processes bind them anew.
        tc.release_listeners();
        let channels = (0..3)
            .map(|i| tc.pki.operator.channel(&tc.configs[i].listen, None))
            .collect::<Result<_, _>>()?;
        let mut c = CutoverProcs {
            tc,
            bin,
            config_paths,
            procs: vec![None, None, None],
            channels,
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        for i in 0..3 {
            c.spawn(i)?;
        }
        Ok(c)
    }

    pub fn dir(&self) -> &Path {
        self.tc.tmp.path()
    }

    pub fn log_path(&self, i: usize) -> PathBuf {
        self.dir().join(format!("node-{}.log", i + 1))
    }

    /// Starts (or restarts, from its data directory) node `i`.
    pub fn spawn(&mut self, i: usize) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))?;
        let child = Command::new(&self.bin)
            .arg("coordinator")
            .arg("--config")
            .arg(&self.config_paths[i])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.display()))?;
        self.procs[i] = Some(child);
        Ok(())
    }

    /// kill -9 of node `i`; returns the instant the kill was sent.
    pub fn kill9(&mut self, i: usize) -> Instant {
        let t = Instant::now();
        if let Some(mut c) = self.procs[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        t
    }

    pub fn pid(&self, i: usize) -> Option<String> {
        self.procs[i].as_ref().map(|c| c.id().to_string())
    }

    pub fn addr(&self, i: usize) -> String {
        self.tc.configs[i].listen.clone()
    }

    pub fn operator(&self, i: usize) -> ControlServiceClient<Channel> {
        ControlServiceClient::new(self.channels[i].clone())
    }

    /// Node `i`'s view of the cluster, if it answers within a second.
    pub async fn status(&self, i: usize) -> Option<pb::GetClusterStatusResponse> {
        let mut req = tonic::Request::new(pb::GetClusterStatusRequest {});
        req.set_timeout(Duration::from_secs(1));
        let mut c = self.operator(i);
        match tokio::time::timeout(Duration::from_secs(2), c.get_cluster_status(req)).await {
            Ok(Ok(r)) => Some(r.into_inner()),
            _ => None,
        }
    }

    /// Waits until one running node leads and every running node agrees.
    pub async fn wait_leader(&self, timeout: Duration) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut views = Vec::new();
            for i in (0..3).filter(|&i| self.procs[i].is_some()) {
                views.push((i, self.status(i).await));
            }
            let leaders: Vec<usize> = views
                .iter()
                .filter(|(_, s)| s.as_ref().is_some_and(|s| s.server_state == "leader"))
                .map(|(i, _)| *i)
                .collect();
            if let [l] = leaders[..]
                && views
                    .iter()
                    .all(|(_, s)| s.as_ref().is_some_and(|s| s.leader_id == l as u64 + 1))
            {
                return Ok(l);
            }
            if Instant::now() > deadline {
                bail!(
                    "no agreed leader after {timeout:?}; node 1 log:\n{}",
                    tail(&self.log_path(0), 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until node `i` has applied at least `index`.
    pub async fn wait_applied(&self, i: usize, index: u64, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.status(i).await.is_some_and(|s| s.applied_index >= index) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "node {} did not apply {index} within {timeout:?}; its log:\n{}",
                    i + 1,
                    tail(&self.log_path(i), 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for CutoverProcs {
    fn drop(&mut self) {
        for i in 0..self.procs.len() {
            self.kill9(i);
        }
    }
}

/// One attestation with a 256-byte check value: the cutover write of the
/// commit and failover scenarios.
pub fn attestation(image: String, value: &str) -> pb::CreateAttestationRequest {
    pb::CreateAttestationRequest {
        image,
        checks: [("value".to_string(), value.to_string())].into(),
    }
}

/// A printable 256-byte value.
pub fn value_256() -> String {
    (0..256).map(|i| (b'a' + (i % 26) as u8) as char).collect()
}

/// The metadata key a follower names the leader's address in.
const LEADER_METADATA: &str = "cutover-leader";

/// Registers on the agent stream (following a leader redirect) offering
/// `kinds`; returns the sender, the inbound stream and the heartbeat
/// interval.
pub async fn register_agent(
    tls: &TlsFiles,
    addr: &mut String,
    kinds: &[&str],
) -> Result<(
    mpsc::Sender<ConnectRequest>,
    tonic::Streaming<pb::ConnectResponse>,
    Duration,
)> {
    let mut attempts = 0u64;
    loop {
        attempts += 1;
        let mut client = AgentServiceClient::new(tls.channel(addr, None)?);
        let (tx, rx) = mpsc::channel::<ConnectRequest>(64);
        tx.send(ConnectRequest {
            message: Some(connect_request::Message::Register(pb::Register {
                cluster: None,
                agent_version: "bench".into(),
                task_kinds: kinds.iter().map(|k| k.to_string()).collect(),
                traffic_apps: vec![],
            })),
        })
        .await?;
        match client.connect(ReceiverStream::new(rx)).await {
            Ok(r) => {
                let mut inbound = r.into_inner();
                match inbound.message().await? {
                    Some(pb::ConnectResponse {
                        message: Some(connect_response::Message::Registered(r)),
                    }) => {
                        let interval = Duration::from_millis(u64::from(r.heartbeat_interval_ms.max(10)));
                        return Ok((tx, inbound, interval));
                    }
                    other => bail!("unexpected first message {other:?}"),
                }
            }
            Err(status) => {
                if let Some(leader) = status.metadata().get(LEADER_METADATA).and_then(|v| v.to_str().ok()) {
                    *addr = leader.to_owned();
                } else if attempts >= 20 {
                    bail!("{status}");
                }
                tokio::time::sleep(Duration::from_millis(100 * attempts.min(10))).await;
            }
        }
    }
}

/// `GET /metrics` on the ops port `ops`: the sum and count of histogram
/// `name`, of its series with exactly `labels` (e.g. `{phase="copy"}`), or
/// with `""` of its first series.
pub async fn histogram(ops: &str, name: &str, labels: &str) -> Result<(f64, f64)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(ops)
        .await
        .with_context(|| format!("connecting to {ops}"))?;
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {ops}\r\n\r\n").as_bytes())
        .await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    // `name_sum{labels} value` or `name_sum value`.
    let value = |suffix: &str| {
        let series = format!("{name}_{suffix}{labels}");
        body.lines()
            .filter(|l| {
                l.strip_prefix(&series)
                    .is_some_and(|rest| rest.starts_with(' ') || (labels.is_empty() && rest.starts_with('{')))
            })
            .find_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok((value("sum"), value("count")))
}
