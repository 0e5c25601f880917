//! The sockets under cutover's gRPC: what a server accepts connections on
//! and how a client dials. In the processes that is TCP; the simulation of
//! the coordinators under a simulated network (`coordinator/tests/
//! netsim.rs`, on turmoil) hands servers its own listener and installs its
//! own [`Dialer`] for the process, so the same TLS, tonic and openraft code
//! runs over either.
//!
//! Connections are boxed ([`Conn`]): one indirect call per read or write,
//! under a TLS record's cost.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use tokio::io::{AsyncRead, AsyncWrite};

/// A byte stream a connection runs over.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// A connection, whatever network it is on.
pub type Conn = Box<dyn Io>;

/// A future returned by the traits here.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Dials `host:port` and returns the connection.
pub type Dialer = Arc<dyn Fn(String) -> BoxFuture<'static, io::Result<Conn>> + Send + Sync>;

static DIALER: OnceLock<Dialer> = OnceLock::new();

/// Replaces TCP as the way this process dials, for its lifetime (a
/// simulated network). False if a dialer was installed already.
pub fn install_dialer(dialer: Dialer) -> bool {
    DIALER.set(dialer).is_ok()
}

/// Dials `addr` (`host:port`): TCP with Nagle off, or the installed dialer.
pub async fn dial(addr: &str) -> io::Result<Conn> {
    match DIALER.get() {
        Some(d) => d(addr.to_owned()).await,
        None => {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            Ok(Box::new(tcp))
        }
    }
}

/// A connection just accepted, before it is boxed: the listener needs its
/// first byte (TLS or plaintext) without consuming it.
pub trait Accepted: Io {
    /// Reads into `buf` without consuming (as `TcpStream::peek`).
    fn peek<'a>(&'a mut self, buf: &'a mut [u8]) -> BoxFuture<'a, io::Result<usize>>;
}

impl Accepted for tokio::net::TcpStream {
    fn peek<'a>(&'a mut self, buf: &'a mut [u8]) -> BoxFuture<'a, io::Result<usize>> {
        Box::pin(tokio::net::TcpStream::peek(self, buf))
    }
}

/// Where a server accepts connections.
pub trait Listener: Send + 'static {
    type Conn: Accepted;
    /// The next connection and its peer's address.
    fn accept(&self) -> BoxFuture<'_, io::Result<(Self::Conn, SocketAddr)>>;
    /// The address it listens on.
    fn local_addr(&self) -> io::Result<SocketAddr>;
}

impl Listener for tokio::net::TcpListener {
    type Conn = tokio::net::TcpStream;
    fn accept(&self) -> BoxFuture<'_, io::Result<(Self::Conn, SocketAddr)>> {
        Box::pin(async move {
            let (tcp, addr) = tokio::net::TcpListener::accept(self).await?;
            // Small RPCs (Raft heartbeats, votes) must not wait for Nagle.
            let _ = tcp.set_nodelay(true);
            Ok((tcp, addr))
        })
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        tokio::net::TcpListener::local_addr(self)
    }
}

/// A free loopback port below the kernel's ephemeral range, for a process
/// started to listen on it (the local driver's apps; the demo's and tests'
/// servers). A port from `bind(0)`, released, can be taken by another
/// process's outgoing connection or `bind(0)` before the process it was
/// chosen for binds it ("Address already in use"); no kernel-chosen port
/// comes from below the ephemeral range. Falls back to a kernel-chosen
/// port when every port below it is taken.
pub fn free_loopback_port() -> io::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    // Within this process, successive calls walk a permutation of the range
    // (a step coprime with its size), so no port is handed out twice in a
    // row; the start differs between processes.
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static SEED: OnceLock<u32> = OnceLock::new();
    const SPAN: u32 = 12_000;
    const STEP: u32 = 7919;
    let low: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(32768);
    let kernel_chosen = || -> io::Result<u16> { Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()) };
    let first = low.saturating_sub(SPAN).max(1024);
    if low <= first {
        // No unprivileged port lies below the ephemeral range.
        return kernel_chosen();
    }
    let span = low - first;
    let step = coprime_step(STEP, span);
    let seed = *SEED.get_or_init(|| {
        std::process::id().wrapping_mul(2_654_435_761)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
    });
    for _ in 0..span {
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        // At most 12,000 + 11,999 * (7,919 + a few): no overflow.
        let port = first + (seed % span + (k % span) * step) % span;
        if let Ok(port) = u16::try_from(port)
            && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
        {
            return Ok(port);
        }
    }
    kernel_chosen()
}

/// The first step from `from` up that shares no factor with `span`: a
/// step that did would revisit ports before it had tried them all.
fn coprime_step(from: u32, span: u32) -> u32 {
    let mut step = from;
    while gcd(step, span) != 1 {
        step += 1;
    }
    step
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    #[test]
    fn free_loopback_ports_lie_below_the_ephemeral_range_and_do_not_repeat() {
        let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let ports: Vec<u16> = (0..50).map(|_| super::free_loopback_port().unwrap()).collect();
        assert!(ports.iter().all(|p| *p < low && *p >= 1024), "{ports:?}");
        let distinct: std::collections::BTreeSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
    }

    #[test]
    fn the_walk_visits_every_port_even_when_the_span_is_a_multiple_of_the_step() {
        for span in [7919, 12_000, 1, 2] {
            let step = super::coprime_step(7919, span);
            let seen: std::collections::BTreeSet<u32> = (0..span).map(|k| (5 + k * step) % span).collect();
            assert_eq!(seen.len(), span as usize, "span {span}, step {step}");
        }
    }
}
