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
