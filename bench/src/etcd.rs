//! A 3-member etcd cluster on loopback, started from the system's `etcd`
//! binary (Debian's `etcd-server`), each member with its own data directory.
//! By default plaintext with etcd's default timings (heartbeat 100 ms,
//! election 1000 ms); `EtcdOpts` asks for mutual TLS on both the client and
//! the peer port (certificates from one CA, the same kind cutover's nodes
//! use) or other timings, so that the two systems can be compared like for
//! like. Dropping it kills every member.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tonic::transport::{Channel, Endpoint};

use cutover_shared::certs::{DevPki, init_dev_pki};
use cutover_shared::identity::DEFAULT_TRUST_DOMAIN;

use crate::util::tail;

/// The generated etcd v3 client (only `KV.Put` and `Maintenance.Status`).
pub mod pb {
    tonic::include_proto!("etcdserverpb");
}

pub type KvClient = pb::kv_client::KvClient<Channel>;

/// How the members run.
#[derive(Clone, Debug)]
pub struct EtcdOpts {
    /// Mutual TLS: `--client-cert-auth` and `--peer-client-cert-auth`, each
    /// member serving a certificate from one development CA and the bench
    /// presenting a client certificate from it.
    pub tls: bool,
    /// `--heartbeat-interval`, ms.
    pub heartbeat_ms: u64,
    /// `--election-timeout`, ms (etcd randomizes each timeout in
    /// [this, 2 × this)).
    pub election_ms: u64,
}

impl Default for EtcdOpts {
    /// etcd's own defaults, plaintext.
    fn default() -> Self {
        EtcdOpts {
            tls: false,
            heartbeat_ms: 100,
            election_ms: 1000,
        }
    }
}

impl EtcdOpts {
    /// How a table names this setup.
    pub fn describe(&self) -> String {
        format!(
            "{}, heartbeat {} ms, election timeout {} ms",
            if self.tls {
                "mutual TLS on client and peer ports"
            } else {
                "plaintext"
            },
            self.heartbeat_ms,
            self.election_ms
        )
    }
}

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
    opts: EtcdOpts,
    /// With TLS: the certificates, written under the temporary directory.
    pki: Option<DevPki>,
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
    pub fn start_with(opts: EtcdOpts) -> Result<EtcdCluster> {
        let bin = etcd_bin()?;
        let tmp = tempfile::Builder::new().prefix("cutover-bench-etcd-").tempdir()?;
        let pki = opts
            .tls
            .then(|| init_dev_pki(&tmp.path().join("pki"), DEFAULT_TRUST_DOMAIN, 3, &[]))
            .transpose()?;
        let scheme = if opts.tls { "https" } else { "http" };
        let mut members = Vec::new();
        for i in 0..3 {
            let addr = cutover_tests::stable_free_addr();
            let client_url = format!("{scheme}://{addr}");
            let channel = channel(pki.as_ref(), &addr)?;
            members.push(Member {
                name: format!("e{}", i + 1),
                client_url,
                peer_url: format!("{scheme}://{}", cutover_tests::stable_free_addr()),
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
            opts,
            pki,
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
        let mut cmd = Command::new(&self.bin);
        if let Some(pki) = &self.pki {
            // Each member serves (and, to its peers, presents) a
            // coordinator's certificate: IP SAN 127.0.0.1, server and client
            // use, one CA; both ports require a client certificate from it.
            let files = &pki.coordinators[i].1;
            for (flag, path) in [
                ("--cert-file", &files.cert),
                ("--key-file", &files.key),
                ("--trusted-ca-file", &pki.ca),
                ("--peer-cert-file", &files.cert),
                ("--peer-key-file", &files.key),
                ("--peer-trusted-ca-file", &pki.ca),
            ] {
                cmd.arg(flag).arg(path);
            }
            cmd.args(["--client-cert-auth", "--peer-client-cert-auth"]);
        }
        let child = cmd
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
            .args(["--heartbeat-interval", &self.opts.heartbeat_ms.to_string()])
            .args(["--election-timeout", &self.opts.election_ms.to_string()])
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
        let addr = self.members[i].client_url.split_once("://").map_or("", |(_, a)| a);
        Ok(pb::kv_client::KvClient::new(channel(self.pki.as_ref(), addr)?))
    }

    /// Member `i`'s Raft term and whether it leads, if it answers.
    pub async fn view(&self, i: usize) -> Option<(u64, bool)> {
        let s = self.status(i).await?;
        let me = s.header.as_ref()?.member_id;
        Some((s.raft_term, me != 0 && s.leader == me))
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

/// A lazily connecting channel to a client URL's `addr`: plaintext, or with
/// `pki` mutual TLS as the operator (the same TLS client cutover's own
/// clients use, so both systems pay the same handshake and record costs).
fn channel(pki: Option<&DevPki>, addr: &str) -> Result<Channel> {
    Ok(match pki {
        Some(pki) => pki.operator.channel(addr, None)?,
        None => Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .connect_lazy(),
    })
}

/// One 256-byte put.
pub fn put(key: String, value: &[u8]) -> pb::PutRequest {
    pb::PutRequest {
        key: key.into_bytes(),
        value: value.to_vec(),
        ..Default::default()
    }
}
