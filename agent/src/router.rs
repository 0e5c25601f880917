//! The local driver's built-in HTTP/1.1 reverse proxy.
//!
//! A [`Router`] listens on one address and forwards every request to its
//! current upstream. Routing is decided per request, never per connection:
//! a client's keep-alive connection to the router survives any number of
//! flips, and after [`Router::set_upstream`] the very next request goes to
//! the new upstream while requests already in flight finish on the old one.
//!
//! Given several upstreams ([`Router::bind_balanced`]), it spreads requests
//! over them round-robin: that is the front door `cutover demo` puts before
//! its regions, the way a global load balancer sits before regional ones.
//!
//! Upstream connections come from one pooled hyper-util client, keyed by
//! address, so a flip neither closes nor reuses the other upstream's
//! connections. Idle pooled connections are dropped after
//! [`POOL_IDLE_TIMEOUT`], shorter than the usual server keep-alive timeouts,
//! so the proxy does not reuse a connection the upstream is about to close.
//!
//! The only retry: a request without a body whose connection attempt failed
//! (nothing was sent) is tried once more on the then-current upstream. That
//! covers a flip away from a process that has just exited. Everything else
//! that fails is answered 502 with a short body.
//!
//! In maintenance ([`Router::set_maintenance`]) every new request is answered
//! `503 Service Unavailable` with `Retry-After`, without reaching an
//! upstream: the app takes no traffic, so makes no writes, while a restore
//! replaces its database. Its processes keep running, so leaving
//! maintenance is instant.
//!
//! With an unreachable wait ([`Router::set_unreachable_wait`]), a request
//! without a body whose upstream refuses connections waits, bounded, for
//! traffic to move and goes where it moved: a front door before a region
//! that was just lost delays requests until the failover, not fails them.
//!
//! On hold ([`Router::hold`]) new requests wait, at most until the hold's
//! deadline, and then go wherever the router sends traffic by then: the
//! front door holds an app's requests while a failover moves its primary
//! and releases them to the new region, so a planned failover fails none
//! (what Vitess's vtgate does for a planned reparent).

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long an idle upstream connection stays pooled.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// Default for how long [`Router::shutdown`] lets requests in flight finish.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// What a router in maintenance tells clients to wait before retrying.
pub const MAINTENANCE_RETRY_AFTER_SECS: u32 = 30;
/// How long [`Router::bind`] retries an address still held by a router that
/// is shutting down.
const BIND_RETRY: Duration = Duration::from_secs(3);

type ProxyBody = UnsyncBoxBody<Bytes, hyper::Error>;

/// An HTTP reverse proxy with an atomically switchable upstream.
pub struct Router {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    /// Dropping the sender (with the router) also stops the accept loop.
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

struct Shared {
    /// Never empty; more than one only for a balanced router.
    upstream: RwLock<Vec<SocketAddr>>,
    /// Round-robin position over `upstream`.
    next: std::sync::atomic::AtomicUsize,
    client: Client<HttpConnector, ProxyBody>,
    /// Requests in flight (until their response body ends), per upstream.
    inflight: watch::Sender<HashMap<SocketAddr, usize>>,
    drain_ms: AtomicU64,
    /// Answer 503 instead of forwarding.
    maintenance: AtomicBool,
    /// While `Some`, new requests wait until it is `None` again or the
    /// deadline passes.
    hold: watch::Sender<Option<Instant>>,
    /// When the current hold's first request began waiting, and how many
    /// waited.
    held: std::sync::Mutex<(Option<Instant>, u64)>,
    /// How long a request whose upstream cannot be reached waits for
    /// traffic to move, ms (0: it is answered 502 at once).
    unreachable_wait_ms: AtomicU64,
    /// Bumped by every [`Router::set_upstream`] that changes it.
    moves: watch::Sender<u64>,
    /// Requests waiting for traffic to move away from an unreachable
    /// upstream.
    awaiting_move: AtomicU64,
    /// A canary: this upstream takes this percent of new requests.
    split: RwLock<Option<(SocketAddr, u32)>>,
    /// Requests routed while a split is set, for the exact share.
    split_seq: AtomicU64,
}

/// What a hold kept waiting, reported when it is released.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HoldStats {
    /// Requests that waited.
    pub held: u64,
    /// The longest wait, ms (the first request held waited longest).
    pub longest_ms: u64,
}

impl Router {
    /// Listens on `listen` and forwards to `upstream`.
    pub async fn bind(listen: SocketAddr, upstream: SocketAddr) -> io::Result<Router> {
        Self::bind_balanced(listen, vec![upstream]).await
    }

    /// Listens on `listen` and spreads requests over `upstreams` round-robin.
    pub async fn bind_balanced(listen: SocketAddr, upstreams: Vec<SocketAddr>) -> io::Result<Router> {
        if upstreams.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a router needs an upstream",
            ));
        }
        let upstream = upstreams[0];
        let listener = bind_listener(listen).await?;
        let local_addr = listener.local_addr()?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .build(connector);
        let shared = Arc::new(Shared {
            upstream: RwLock::new(upstreams),
            next: std::sync::atomic::AtomicUsize::new(0),
            client,
            inflight: watch::Sender::new(HashMap::new()),
            drain_ms: AtomicU64::new(DEFAULT_DRAIN_TIMEOUT.as_millis() as u64),
            maintenance: AtomicBool::new(false),
            hold: watch::Sender::new(None),
            held: std::sync::Mutex::new((None, 0)),
            unreachable_wait_ms: AtomicU64::new(0),
            moves: watch::Sender::new(0),
            awaiting_move: AtomicU64::new(0),
            split: RwLock::new(None),
            split_seq: AtomicU64::new(0),
        });
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, shared.clone(), stop_rx));
        tracing::debug!(listen = %local_addr, %upstream, "router listening");
        Ok(Router {
            shared,
            local_addr,
            stop,
            task,
        })
    }

    /// Sends new requests to `addr`; requests in flight finish where they are.
    pub fn set_upstream(&self, addr: SocketAddr) {
        let old = std::mem::replace(&mut *self.shared.upstream.write().expect("upstream lock"), vec![addr])[0];
        if old != addr {
            self.shared.moves.send_modify(|n| *n += 1);
            tracing::info!(listen = %self.local_addr, from = %old, to = %addr, "router upstream switched");
        }
    }

    /// Sends `weight` percent of new requests to `canary` (a canary step),
    /// the rest to the upstream; `None` or 0 sends it none. The share is
    /// exact over every hundred requests, not random: request n goes to
    /// the canary when `n * weight / 100` steps up, so 25% is every fourth.
    pub fn set_split(&self, split: Option<(SocketAddr, u32)>) {
        let split = split.filter(|(_, w)| *w > 0).map(|(a, w)| (a, w.min(100)));
        let old = std::mem::replace(&mut *self.shared.split.write().expect("split lock"), split);
        if old != split {
            self.shared.split_seq.store(0, Ordering::Relaxed);
            match split {
                Some((to, weight)) => tracing::info!(listen = %self.local_addr, %to, weight, "router canary split"),
                None => tracing::info!(listen = %self.local_addr, "router canary split ended"),
            }
        }
    }

    /// A request without a body whose upstream cannot be reached (its
    /// region is lost) waits up to `wait` for [`Router::set_upstream`] to
    /// send traffic elsewhere, then goes there; zero (the default) answers
    /// 502 at once. The front door sets it, so a failover that ends within
    /// the wait fails none of the requests that arrived during it.
    pub fn set_unreachable_wait(&self, wait: Duration) {
        self.shared
            .unreachable_wait_ms
            .store(wait.as_millis().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    /// In maintenance, new requests are answered 503 and reach no upstream;
    /// requests already forwarded finish (see [`Router::drain`]).
    pub fn set_maintenance(&self, on: bool) {
        if self.shared.maintenance.swap(on, Ordering::SeqCst) != on {
            tracing::info!(listen = %self.local_addr, on, "router maintenance");
        }
    }

    /// Holds new requests for at most `max`: each waits until
    /// [`Router::release`], or the deadline, then is forwarded as usual.
    /// Holding again moves the deadline.
    pub fn hold(&self, max: Duration) {
        // A hold that ended by its deadline counts as none: its figures
        // are not this one's.
        let mut held = self.shared.held.lock().expect("held lock");
        if !self.holding() {
            *held = (None, 0);
            tracing::info!(listen = %self.local_addr, max_ms = max.as_millis() as u64, "router holding new requests");
        }
        self.shared.hold.send_replace(Some(Instant::now() + max));
    }

    /// Lets held requests go (to the upstream current now) and says how
    /// many waited and for how long.
    pub fn release(&self) -> HoldStats {
        let was = self.shared.hold.send_replace(None);
        let (first, held) = std::mem::take(&mut *self.shared.held.lock().expect("held lock"));
        let stats = HoldStats {
            held,
            longest_ms: first.map_or(0, |f| f.elapsed().as_millis() as u64),
        };
        if was.is_some() {
            tracing::info!(listen = %self.local_addr, held = stats.held, longest_ms = stats.longest_ms, "router released held requests");
        }
        stats
    }

    /// Requests waiting now for traffic to move away from an upstream that
    /// cannot be reached.
    pub fn awaiting_move(&self) -> u64 {
        self.shared.awaiting_move.load(Ordering::Relaxed)
    }

    /// Requests held since the current hold began (released ones too).
    pub fn held(&self) -> u64 {
        self.shared.held.lock().expect("held lock").1
    }

    /// Whether new requests are being held now.
    pub fn holding(&self) -> bool {
        self.shared.hold.borrow().is_some_and(|d| d > Instant::now())
    }

    /// The upstream new requests go to.
    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream.read().expect("upstream lock")[0]
    }

    /// The address the router listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// How long [`Router::shutdown`] waits for requests in flight.
    pub fn set_drain_timeout(&self, d: Duration) {
        self.shared
            .drain_ms
            .store(d.as_millis().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    /// Requests in flight to `addr` (counted until their response body ends).
    pub fn in_flight(&self, addr: SocketAddr) -> usize {
        self.shared.inflight.borrow().get(&addr).copied().unwrap_or(0)
    }

    /// Waits until no request is in flight to `addr`, at most `timeout`.
    /// Returns whether it drained.
    pub async fn drain(&self, addr: SocketAddr, timeout: Duration) -> bool {
        let mut rx = self.shared.inflight.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|m| m.get(&addr).copied().unwrap_or(0) == 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Like [`Router::drain`], but requests waiting for traffic to move
    /// away from an unreachable `addr` do not count: they reached nothing,
    /// and the move they wait for may be what the caller does next.
    pub async fn drain_reached(&self, addr: SocketAddr, timeout: Duration) -> bool {
        let mut rx = self.shared.inflight.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let inflight = rx.borrow_and_update().get(&addr).copied().unwrap_or(0) as u64;
            if inflight <= self.awaiting_move() {
                return true;
            }
            // A request that starts waiting for a move changes no count:
            // look again every 10 ms as well.
            let tick = tokio::time::sleep(Duration::from_millis(10));
            tokio::select! {
                _ = rx.changed() => {}
                _ = tick => {}
                _ = tokio::time::sleep_until(deadline) => return false,
            }
        }
    }

    /// Stops accepting, lets requests in flight finish (at most the drain
    /// timeout) and closes every connection.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

impl Shared {
    /// Waits while the router holds new requests, at most until the hold's
    /// deadline.
    async fn wait_while_held(&self) {
        let mut rx = self.hold.subscribe();
        let mut counted = false;
        loop {
            let Some(deadline) = *rx.borrow_and_update() else {
                return;
            };
            if deadline <= Instant::now() {
                return;
            }
            if !counted {
                counted = true;
                let mut h = self.held.lock().expect("held lock");
                h.0.get_or_insert_with(Instant::now);
                h.1 += 1;
            }
            // A change is a release or a new deadline: look again.
            match tokio::time::timeout_at(deadline.into(), rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return,
            }
        }
    }

    fn current(&self) -> SocketAddr {
        if let Some((canary, weight)) = *self.split.read().expect("split lock") {
            let n = self.split_seq.fetch_add(1, Ordering::Relaxed);
            let w = u64::from(weight);
            if (n + 1) * w / 100 > n * w / 100 {
                return canary;
            }
        }
        let all = self.upstream.read().expect("upstream lock");
        all[self.next.fetch_add(1, Ordering::Relaxed) % all.len()]
    }

    fn track(self: &Arc<Self>, addr: SocketAddr) -> InFlight {
        self.inflight.send_modify(|m| *m.entry(addr).or_insert(0) += 1);
        InFlight {
            shared: self.clone(),
            addr,
        }
    }
}

/// Counts one request in flight to `addr` while alive.
struct InFlight {
    shared: Arc<Shared>,
    addr: SocketAddr,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.shared.inflight.send_modify(|m| {
            if let Some(n) = m.get_mut(&self.addr) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&self.addr);
                }
            }
        });
    }
}

/// A response body that keeps its request counted until it ends.
struct Tracked {
    inner: ProxyBody,
    guard: Option<InFlight>,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(r, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.guard = None;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

async fn bind_listener(listen: SocketAddr) -> io::Result<TcpListener> {
    let deadline = Instant::now() + BIND_RETRY;
    loop {
        let socket = if listen.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(listen).and_then(|()| socket.listen(1024)) {
            Ok(l) => return Ok(l),
            // A router on this address that is shutting down releases it soon.
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("router cannot listen on {listen}: {e}"),
                ));
            }
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            // A value or a dropped router: stop either way.
            _ = stop.changed() => break,
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let shared = shared.clone();
                    let service = hyper::service::service_fn(move |req| proxy(shared.clone(), peer, req));
                    let conn = hyper::server::conn::http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), service);
                    let conn = graceful.watch(conn);
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(%peer, "router connection: {e}");
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off a little.
                    tracing::warn!("router accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    let local = listener.local_addr().ok();
    drop(listener);
    let drain = Duration::from_millis(shared.drain_ms.load(Ordering::Relaxed));
    if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
        tracing::warn!(listen = ?local, "router drain timeout: closing connections with requests in flight");
    }
}

/// Headers that describe one connection, not the message.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in HOP_BY_HOP.iter().chain(named.iter()) {
        headers.remove(n);
    }
    headers.remove("proxy-connection");
}

fn plain(status: StatusCode, message: String) -> Response<ProxyBody> {
    let mut r = Response::new(
        Full::new(Bytes::from(message))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn bad_gateway(message: String) -> Response<ProxyBody> {
    plain(StatusCode::BAD_GATEWAY, message)
}

fn in_maintenance() -> Response<ProxyBody> {
    let mut r = plain(
        StatusCode::SERVICE_UNAVAILABLE,
        "503 service unavailable: in maintenance (a database restore is running)\n".into(),
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(MAINTENANCE_RETRY_AFTER_SECS));
    r
}

fn upstream_request(parts: &hyper::http::request::Parts, addr: SocketAddr, body: ProxyBody) -> Request<ProxyBody> {
    let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let uri: Uri = format!("http://{addr}{path}")
        .parse()
        .unwrap_or_else(|_| Uri::from_static("/"));
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = parts.headers.clone();
    req
}

async fn proxy(
    shared: Arc<Shared>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    // hyper answered any `Expect: 100-continue` itself when the body is read.
    parts.headers.remove(header::EXPECT);
    let forwarded = match parts.headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&forwarded) {
        parts.headers.insert("x-forwarded-for", v);
    }
    shared.wait_while_held().await;
    if shared.maintenance.load(Ordering::SeqCst) {
        return Ok(in_maintenance());
    }
    let bodiless = body.is_end_stream();
    let mut addr = shared.current();
    let mut guard = shared.track(addr);
    let mut result = shared
        .client
        .request(upstream_request(&parts, addr, body.boxed_unsync()))
        .await;
    if let Err(e) = &result
        && e.is_connect()
        && bodiless
    {
        // Nothing reached the upstream: one more try on the current one.
        let retry = shared.current();
        tracing::debug!(from = %addr, to = %retry, "connect to upstream failed ({e:?}); retrying once");
        addr = retry;
        guard = shared.track(addr);
        let empty = Empty::new().map_err(|never| match never {}).boxed_unsync();
        result = shared.client.request(upstream_request(&parts, addr, empty)).await;
    }
    // Still unreachable: with a wait configured (the front door's), wait
    // for traffic to move elsewhere, as a failover of the lost region
    // will, and send the request there; 502 only once the wait ends.
    let wait = Duration::from_millis(shared.unreachable_wait_ms.load(Ordering::Relaxed));
    if !wait.is_zero()
        && bodiless
        && result
            .as_ref()
            .is_err_and(hyper_util::client::legacy::Error::is_connect)
    {
        let mut moved = shared.moves.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        shared.awaiting_move.fetch_add(1, Ordering::Relaxed);
        while result
            .as_ref()
            .is_err_and(hyper_util::client::legacy::Error::is_connect)
        {
            if shared.current() == addr {
                match tokio::time::timeout_at(deadline, moved.changed()).await {
                    Ok(Ok(())) => continue,
                    _ => break,
                }
            }
            addr = shared.current();
            tracing::debug!(to = %addr, "upstream unreachable; trying where traffic moved");
            guard = shared.track(addr);
            let empty = Empty::new().map_err(|never| match never {}).boxed_unsync();
            result = shared.client.request(upstream_request(&parts, addr, empty)).await;
        }
        shared.awaiting_move.fetch_sub(1, Ordering::Relaxed);
    }
    match result {
        Ok(resp) => {
            let (mut rparts, rbody) = resp.into_parts();
            strip_hop_by_hop(&mut rparts.headers);
            let body = Tracked {
                inner: rbody.boxed_unsync(),
                guard: Some(guard),
            };
            Ok(Response::from_parts(rparts, body.boxed_unsync()))
        }
        Err(e) => {
            let why = match std::error::Error::source(&e) {
                Some(src) => format!("{e}: {src}"),
                None => e.to_string(),
            };
            tracing::warn!(upstream = %addr, "proxy error: {why}");
            Ok(bad_gateway(format!("502 bad gateway: upstream {addr}: {why}\n")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample_app;
    use std::sync::atomic::AtomicUsize;

    /// A sample app answering with `version` (a region's name here).
    async fn app(version: &str) -> sample_app::TestApp {
        sample_app::TestApp::start(version).await
    }

    fn client() -> Client<HttpConnector, Empty<Bytes>> {
        Client::builder(TokioExecutor::new()).build(HttpConnector::new())
    }

    async fn get(
        c: &Client<HttpConnector, Empty<Bytes>>,
        addr: SocketAddr,
        path: &str,
    ) -> Result<(u16, String), String> {
        let uri: Uri = format!("http://{addr}{path}").parse().unwrap();
        let resp = c.get(uri).await.map_err(|e| format!("{e:?}"))?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    fn any_local() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    /// In maintenance every request is answered 503 with Retry-After and
    /// none reaches the app; out of it, the app answers again.
    #[tokio::test]
    async fn maintenance_answers_503_and_forwards_nothing() {
        let a = app("v1").await;
        let router = Router::bind(any_local(), a.addr).await.unwrap();
        let c = client();
        assert_eq!(get(&c, router.local_addr(), "/").await.unwrap().0, 200);
        router.set_maintenance(true);
        let uri: Uri = format!("http://{}/orders", router.local_addr()).parse().unwrap();
        let resp = c.get(uri).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            resp.headers().get(header::RETRY_AFTER).unwrap(),
            &MAINTENANCE_RETRY_AFTER_SECS.to_string()
        );
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains("maintenance"));
        assert_eq!(router.in_flight(a.addr), 0);
        router.set_maintenance(false);
        assert_eq!(get(&c, router.local_addr(), "/").await.unwrap().0, 200);
        router.shutdown().await;
    }

    /// A split sends exactly its percent of requests to the canary (every
    /// fourth for 25), the rest to the upstream; 0 or `None` ends it, and
    /// moving the split starts the count again.
    #[tokio::test]
    async fn a_split_sends_its_exact_share_to_the_canary() {
        let (stable, canary) = (app("v1").await, app("v2").await);
        let router = Router::bind(any_local(), stable.addr).await.unwrap();
        let c = client();
        let count = async |n: usize| {
            let mut to_canary = 0;
            for _ in 0..n {
                let (status, body) = get(&c, router.local_addr(), "/").await.unwrap();
                assert_eq!(status, 200);
                to_canary += usize::from(body.contains("v2"));
            }
            to_canary
        };
        for weight in [5, 25, 50] {
            router.set_split(Some((canary.addr, weight)));
            assert_eq!(count(200).await, 2 * weight as usize, "{weight}% of 200 requests");
        }
        router.set_split(Some((canary.addr, 0)));
        assert_eq!(count(20).await, 0);
        router.set_split(Some((canary.addr, 25)));
        assert_eq!(count(8).await, 2);
        router.set_split(None);
        assert_eq!(count(20).await, 0);
        router.shutdown().await;
    }

    /// Waits until `router` has held `n` requests.
    async fn until_held(router: &Router, n: u64) {
        while router.held() < n {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A held request waits for the release and then goes to the upstream
    /// current at that moment, not the one current when it arrived.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_held_request_goes_where_traffic_goes_when_released() {
        let (a, b) = (app("us-east").await, app("eu-west").await);
        let router = Router::bind(any_local(), a.addr).await.unwrap();
        let c = client();
        router.hold(Duration::from_secs(30));
        assert!(router.holding());
        let addr = router.local_addr();
        let pending = tokio::spawn({
            let c = c.clone();
            async move { get(&c, addr, "/").await }
        });
        until_held(&router, 1).await;
        assert!(!pending.is_finished(), "a held request was answered before the release");
        router.set_upstream(b.addr);
        let stats = router.release();
        assert_eq!(stats.held, 1);
        let (status, body) = pending.await.unwrap().unwrap();
        assert_eq!(status, 200);
        assert!(body.contains("eu-west"), "{body}");
        assert!(!router.holding());
        // Released: requests flow without waiting.
        assert!(get(&c, addr, "/").await.unwrap().1.contains("eu-west"));
        router.shutdown().await;
    }

    /// Before a lost upstream (nothing listens), a request is answered 502
    /// at once, unless the router waits for traffic to move: then it goes
    /// where traffic moved.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreachable_upstream_waits_for_traffic_to_move() {
        let lost = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let b = app("eu-west").await;
        let router = Router::bind(any_local(), lost).await.unwrap();
        let c = client();
        assert_eq!(get(&c, router.local_addr(), "/").await.unwrap().0, 502);

        router.set_unreachable_wait(Duration::from_secs(30));
        let addr = router.local_addr();
        let pending = tokio::spawn({
            let c = c.clone();
            async move { get(&c, addr, "/").await }
        });
        while router.awaiting_move() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(!pending.is_finished());
        // A hold's drain does not wait for it: it reached nothing.
        assert!(router.drain_reached(lost, Duration::from_millis(500)).await);
        assert!(!router.drain(lost, Duration::from_millis(50)).await);
        router.set_upstream(b.addr);
        let (status, body) = pending.await.unwrap().unwrap();
        assert_eq!(status, 200);
        assert!(body.contains("eu-west"), "{body}");
        router.shutdown().await;
    }

    /// A hold nobody releases ends at its deadline: the request then goes
    /// where traffic goes, so a failover that stalls holds no one forever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hold_ends_by_itself_at_its_deadline() {
        let a = app("us-east").await;
        let router = Router::bind(any_local(), a.addr).await.unwrap();
        router.hold(Duration::from_millis(300));
        let started = Instant::now();
        let (status, body) = get(&client(), router.local_addr(), "/").await.unwrap();
        assert_eq!(status, 200);
        assert!(body.contains("us-east"), "{body}");
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(router.held(), 1);
        router.shutdown().await;
    }

    /// ≥300 req/s for ~2 s through the router while the upstream flips 10
    /// times between two apps: no request may fail, and both answer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn flip_under_steady_load_loses_nothing() {
        let (a, b) = (app("v1").await, app("v2").await);
        let router = Arc::new(Router::bind(any_local(), a.addr).await.unwrap());
        let target = router.local_addr();
        let c = client();
        let ok = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let seen = Arc::new(std::sync::Mutex::new(HashMap::<String, usize>::new()));

        let load = {
            let (ok, failures, seen) = (ok.clone(), failures.clone(), seen.clone());
            tokio::spawn(async move {
                // 500 requests per second for 2 s.
                let mut tick = tokio::time::interval(Duration::from_millis(2));
                let mut set = tokio::task::JoinSet::new();
                let started = Instant::now();
                for _ in 0..1000 {
                    tick.tick().await;
                    let (c, ok, failures, seen) = (c.clone(), ok.clone(), failures.clone(), seen.clone());
                    set.spawn(async move {
                        match get(&c, target, "/").await {
                            Ok((200, body)) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                *seen.lock().unwrap().entry(body).or_default() += 1;
                            }
                            Ok((status, body)) => failures.lock().unwrap().push(format!("{status}: {body}")),
                            Err(e) => failures.lock().unwrap().push(e),
                        }
                    });
                }
                while set.join_next().await.is_some() {}
                started.elapsed()
            })
        };
        let flipper = {
            let router = router.clone();
            tokio::spawn(async move {
                for i in 0..10 {
                    tokio::time::sleep(Duration::from_millis(180)).await;
                    router.set_upstream(if i % 2 == 0 { b.addr } else { a.addr });
                }
                (a, b)
            })
        };
        let elapsed = load.await.unwrap();
        let _apps = flipper.await.unwrap();
        let failures = failures.lock().unwrap().clone();
        let seen = seen.lock().unwrap().clone();
        let total = ok.load(Ordering::Relaxed) + failures.len();
        let rate = total as f64 / elapsed.as_secs_f64();
        eprintln!(
            "router flip: {total} requests in {elapsed:?} ({rate:.0} req/s), {} failed, 10 flips, seen {seen:?}",
            failures.len()
        );
        assert!(
            failures.is_empty(),
            "{} failed requests, first: {:?}",
            failures.len(),
            failures.first()
        );
        assert_eq!(total, 1000);
        assert!(rate >= 300.0, "only {rate:.0} req/s");
        assert!(seen.get("version v1\n").is_some_and(|n| *n > 0), "{seen:?}");
        assert!(seen.get("version v2\n").is_some_and(|n| *n > 0), "{seen:?}");
    }

    #[tokio::test]
    async fn a_balanced_router_spreads_requests_over_its_upstreams() {
        let (a, b) = (app("v1").await, app("v2").await);
        let router = Router::bind_balanced(any_local(), vec![a.addr, b.addr]).await.unwrap();
        let c = client();
        let mut seen = HashMap::<String, usize>::new();
        for _ in 0..10 {
            let (status, body) = get(&c, router.local_addr(), "/").await.unwrap();
            assert_eq!(status, 200);
            *seen.entry(body).or_default() += 1;
        }
        assert_eq!(seen.get("version v1\n"), Some(&5), "{seen:?}");
        assert_eq!(seen.get("version v2\n"), Some(&5), "{seen:?}");
        assert!(Router::bind_balanced(any_local(), vec![]).await.is_err());
        router.shutdown().await;
    }

    #[tokio::test]
    async fn in_flight_requests_finish_on_the_old_upstream() {
        let (slow, fast) = (app("v1-slow").await, app("v2").await);
        let router = Router::bind(any_local(), slow.addr).await.unwrap();
        let target = router.local_addr();
        let c = client();
        let pending = tokio::spawn({
            let c = c.clone();
            async move { get(&c, target, "/").await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(router.in_flight(slow.addr), 1);
        router.set_upstream(fast.addr);
        assert_eq!(router.upstream(), fast.addr);
        assert_eq!(get(&c, target, "/").await.unwrap(), (200, "version v2\n".into()));
        assert!(!router.drain(slow.addr, Duration::from_millis(100)).await);
        assert_eq!(pending.await.unwrap().unwrap(), (200, "version v1-slow\n".into()));
        assert!(router.drain(slow.addr, Duration::from_secs(1)).await);
        assert_eq!(router.in_flight(slow.addr), 0);
        router.shutdown().await;
    }

    #[tokio::test]
    async fn dead_upstream_is_a_502_and_a_retry_reaches_the_new_one() {
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let router = Router::bind(any_local(), dead).await.unwrap();
        let c = client();
        let (status, body) = get(&c, router.local_addr(), "/").await.unwrap();
        assert_eq!(status, 502);
        assert!(body.starts_with("502 bad gateway: upstream"), "{body}");
        let live = app("v3").await;
        router.set_upstream(live.addr);
        assert_eq!(
            get(&c, router.local_addr(), "/").await.unwrap(),
            (200, "version v3\n".into())
        );
        router.shutdown().await;
    }

    #[tokio::test]
    async fn shutdown_drains_and_releases_the_address() {
        let slow = app("v1-slow").await;
        let router = Router::bind(any_local(), slow.addr).await.unwrap();
        let target = router.local_addr();
        let c = client();
        let pending = tokio::spawn({
            let c = c.clone();
            async move { get(&c, target, "/").await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        router.shutdown().await;
        assert_eq!(pending.await.unwrap().unwrap(), (200, "version v1-slow\n".into()));
        // The address is free again right away.
        let again = Router::bind(target, slow.addr).await.unwrap();
        again.shutdown().await;
    }
}
