//! WAN links between regions: delay, jitter and loss on the TCP
//! connections from one namespace to another, by a small userspace proxy
//! in the test process (what toxiproxy does), because these machines'
//! kernel has no netem. Where the kernel has it, `tc qdisc add dev eth0
//! root netem delay 45ms 5ms loss 0.5%` in each namespace is the same link
//! at the packet level, and this module is not needed.
//!
//! How a connection gets through: in the calling namespace, an nftables
//! DNAT rule (table `ip cutover_wan`, output hook) sends connections to
//! the other namespace's listener to a proxy port on the bridge's own
//! address instead; conntrack keeps the rewrite for the connection, so
//! the client still believes it talks to the original address and
//! verifies the server's certificate by name as before. The proxy, in the
//! root namespace, opens the real connection and carries each direction
//! through a FIFO that holds every chunk for half the round trip, plus
//! jitter. A lost segment is modelled where TCP makes it visible: the
//! chunk, and everything behind it in that direction (head-of-line
//! blocking), arrives one retransmission timeout later (Linux's minimum,
//! 200 ms). Order is kept, as TCP keeps it.
//!
//! Partitions (`Net::partition`) match the namespaces' own addresses; a
//! connection through the proxy is addressed to the bridge, so a test
//! cuts a proxied link by dropping the proxy, not with nftables.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::netns::Net;

/// The nftables table of the DNAT rules, in each namespace.
const TABLE: &str = "cutover_wan";

/// What a lost segment costs: Linux's minimum retransmission timeout.
const RETRANSMIT: Duration = Duration::from_millis(200);

/// One link's character, both directions alike.
#[derive(Clone, Copy, Debug)]
pub struct Link {
    /// Round trip added to the connection (half each way).
    pub rtt: Duration,
    /// Each chunk's one-way delay varies uniformly by up to this, either way.
    pub jitter: Duration,
    /// Probability that a chunk is lost once and retransmitted.
    pub loss: f64,
}

/// What the proxies carried, for the test's report.
#[derive(Default, Debug)]
pub struct WanStats {
    pub connections: AtomicU64,
    pub chunks: AtomicU64,
    /// Chunks that paid a retransmission timeout.
    pub retransmits: AtomicU64,
}

/// The running proxies; dropping it stops them (their connections end).
pub struct Wan {
    pub stats: Arc<WanStats>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Wan {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A small deterministic generator (xorshift64*): the links need noise,
/// not cryptographic randomness.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl Wan {
    /// Puts the proxy on every connection from one namespace to a
    /// `listeners` entry (namespace, port) in another, where `link(from,
    /// to)` (namespace names) gives a link; other connections stay direct.
    /// Call before the processes connect: connections already open keep
    /// their direct path.
    pub async fn start(net: &Net, listeners: &[(&str, u16)], link: impl Fn(&str, &str) -> Option<Link>) -> Result<Wan> {
        let stats = Arc::new(WanStats::default());
        let mut tasks = Vec::new();
        let mut rules: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut seed = 0x853C_49E6_748F_EA9Bu64;
        for &(to, port) in listeners {
            let target = SocketAddr::from((net.addr(to), port));
            for from in net.names() {
                if from == to {
                    continue;
                }
                let Some(l) = link(&from, to) else { continue };
                let proxy = TcpListener::bind((net.gateway(), 0))
                    .await
                    .with_context(|| format!("binding a proxy for {from} -> {to}"))?;
                let local = proxy.local_addr()?;
                rules
                    .entry(from.clone())
                    .or_default()
                    .push(format!("ip daddr {} tcp dport {port} dnat to {local}", target.ip()));
                seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
                tasks.push(tokio::spawn(serve(proxy, target, l, seed, stats.clone())));
            }
        }
        for (from, rules) in rules {
            let text = format!(
                "table ip {TABLE} {{\n chain output {{ type nat hook output priority -100; policy accept;\n  {}\n }}\n}}\n",
                rules.join("\n  ")
            );
            net.nft(&from, &format!("wan-{from}"), &text)?;
        }
        Ok(Wan { stats, tasks })
    }
}

/// Accepts connections for one link and carries each to `target`.
async fn serve(proxy: TcpListener, target: SocketAddr, link: Link, seed: u64, stats: Arc<WanStats>) {
    let mut n = 0u64;
    while let Ok((client, _)) = proxy.accept().await {
        n += 1;
        stats.connections.fetch_add(1, Ordering::Relaxed);
        let stats = stats.clone();
        let seed = seed ^ n.wrapping_mul(0xD6E8_FEB8_6659_FD93);
        tokio::spawn(async move {
            // The far side refusing is the client's connection refused.
            let Ok(upstream) = TcpStream::connect(target).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (ur, uw) = upstream.into_split();
            let there = pump(cr, uw, link, Noise(seed | 1), stats.clone());
            let back = pump(ur, cw, link, Noise((seed >> 1) | 1), stats);
            tokio::join!(there, back);
        });
    }
}

/// One direction of a connection through the link: read as it comes,
/// deliver each chunk once its time has come, in order; end (half-close)
/// when the reader does.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    link: Link,
    mut noise: Noise,
    stats: Arc<WanStats>,
) {
    // Bounded: a slow receiver pushes back on the sender, as a window does.
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(256);
    let one_way = link.rtt.as_secs_f64() / 2.0;
    let read = async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut last = Instant::now();
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let offset = (noise.unit() * 2.0 - 1.0) * link.jitter.as_secs_f64();
            let mut due = Instant::now() + Duration::from_secs_f64((one_way + offset).max(0.0));
            if noise.unit() < link.loss {
                due += RETRANSMIT;
                stats.retransmits.fetch_add(1, Ordering::Relaxed);
            }
            stats.chunks.fetch_add(1, Ordering::Relaxed);
            // Never overtake the chunk before: TCP delivers in order.
            last = due.max(last);
            if tx.send((last, buf[..n].to_vec())).await.is_err() {
                break;
            }
        }
    };
    let write = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}
