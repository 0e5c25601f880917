//! A 3-member etcd cluster on loopback, started from the system's `etcd`
//! binary (Debian's `etcd-server`), each member with its own data directory,
//! plaintext, with etcd's default timings (heartbeat 100 ms, election
//! 1000 ms). Dropping it kills every member.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tonic::transport::{Channel, Endpoint};

use crate::util::tail;

/// The generated etcd v3 client (only `KV.Put` and `Maintenance.Status`).
pub mod pb {
    tonic::include_proto!("etcdserverpb");
}

pub type KvClient = pb::kv_client::KvClient<Channel>;

struct Member {
    name: String,
    client_url: String,
    peer_url: String,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    channel: Channel,
}

pub struct EtcdCluster {
    /// Holds every member's data directory and log.
    _tmp: tempfile::TempDir,
    bin: PathBuf,
    initial_cluster: String,
    members: Vec<Member>,
}

/// `$ETCD_BIN`, else `/usr/bin/etcd`.
pub fn etcd_bin() -> Result<PathBuf> {
    let bin = std::env::var("ETCD_BIN").map_or_else(|_| PathBuf::from("/usr/bin/etcd"), PathBuf::from);
    if !bin.exists() {
        bail!(
            "{} is missing: install etcd (`apt-get install -y etcd-server`) or set ETCD_BIN",
            bin.display()
        );
    }
    Ok(bin)
}

/// The version line of the etcd binary.
pub fn etcd_version() -> String {
    etcd_bin()
        .ok()
        .and_then(|b| Command::new(b).arg("--version").output().ok())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "etcd (version unknown)".into())
}

impl EtcdCluster {
    pub fn start() -> Result<EtcdCluster> {
        let bin = etcd_bin()?;
        let tmp = tempfile::Builder::new().prefix("cutover-bench-etcd-").tempdir()?;
        let mut members = Vec::new();
        for i in 0..3 {
            let client_url = format!("http://{}", cutover_tests::stable_free_addr());
            let channel = Endpoint::from_shared(client_url.clone())?
                .connect_timeout(Duration::from_secs(1))
                .tcp_nodelay(true)
                .connect_lazy();
            members.push(Member {
                name: format!("e{}", i + 1),
                client_url,
                peer_url: format!("http://{}", cutover_tests::stable_free_addr()),
                data_dir: tmp.path().join(format!("e{}.etcd", i + 1)),
                log: tmp.path().join(format!("e{}.log", i + 1)),
                child: None,
                channel,
            });
        }
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = EtcdCluster {
            _tmp: tmp,
            bin,
            initial_cluster,
            members,
        };
        for i in 0..3 {
            c.spawn(i)?;
        }
        Ok(c)
    }

    /// Starts (or restarts, from its data directory) member `i`.
    pub fn spawn(&mut self, i: usize) -> Result<()> {
        let m = &self.members[i];
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&m.log)?;
        let child = Command::new(&self.bin)
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &m.client_url])
            .args(["--advertise-client-urls", &m.client_url])
            .args(["--listen-peer-urls", &m.peer_url])
            .args(["--initial-advertise-peer-urls", &m.peer_url])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-token", "cutover-bench"])
            .args(["--initial-cluster-state", "new"])
            // etcd's defaults, spelled out.
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.display()))?;
        self.members[i].child = Some(child);
        Ok(())
    }

    pub fn kill9(&mut self, i: usize) -> Instant {
        let t = Instant::now();
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        t
    }

    pub fn running(&self, i: usize) -> bool {
        self.members[i].child.is_some()
    }

    pub fn pid(&self, i: usize) -> Option<String> {
        self.members[i].child.as_ref().map(|c| c.id().to_string())
    }

    pub fn kv(&self, i: usize) -> KvClient {
        pb::kv_client::KvClient::new(self.members[i].channel.clone())
    }

    /// A client with its own connection to member `i`.
    pub fn kv_own_connection(&self, i: usize) -> Result<KvClient> {
        let ch = Endpoint::from_shared(self.members[i].client_url.clone())?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(pb::kv_client::KvClient::new(ch))
    }

    pub async fn status(&self, i: usize) -> Option<pb::StatusResponse> {
        let mut c = pb::maintenance_client::MaintenanceClient::new(self.members[i].channel.clone());
        let mut req = tonic::Request::new(pb::StatusRequest {});
        req.set_timeout(Duration::from_secs(1));
        match tokio::time::timeout(Duration::from_secs(2), c.status(req)).await {
            Ok(Ok(r)) => Some(r.into_inner()),
            _ => None,
        }
    }

    /// Waits until exactly one running member leads and every running
    /// member names it.
    pub async fn wait_leader(&self, timeout: Duration) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut views = Vec::new();
            for i in (0..3).filter(|&i| self.running(i)) {
                views.push((i, self.status(i).await));
            }
            let leaders: Vec<(usize, u64)> = views
                .iter()
                .filter_map(|(i, s)| {
                    let s = s.as_ref()?;
                    let me = s.header.as_ref()?.member_id;
                    (s.leader == me && me != 0).then_some((*i, me))
                })
                .collect();
            if let [(l, id)] = leaders[..]
                && views.iter().all(|(_, s)| s.as_ref().is_some_and(|s| s.leader == id))
            {
                return Ok(l);
            }
            if Instant::now() > deadline {
                bail!(
                    "etcd: no agreed leader after {timeout:?}; e1 log:\n{}",
                    tail(&self.members[0].log, 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until member `i` has applied at least `index`.
    pub async fn wait_applied(&self, i: usize, index: u64, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.status(i).await.is_some_and(|s| s.raft_applied_index >= index) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "etcd member {} did not apply {index} within {timeout:?}; its log:\n{}",
                    i + 1,
                    tail(&self.members[i].log, 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill9(i);
        }
    }
}

/// One 256-byte put.
pub fn put(key: String, value: &[u8]) -> pb::PutRequest {
    pb::PutRequest {
        key: key.into_bytes(),
        value: value.to_vec(),
        ..Default::default()
    }
}
