//! The sample app: a tiny HTTP/1.1 service the local driver's demos and
//! tests deploy as "images". Its behaviour is chosen by the version string so
//! that no flags are needed:
//!
//! - `GET /` answers `version <version>\n`;
//! - `GET /health` answers `ok` (200), or 503 when the version contains
//!   `unhealthy` or after `POST /admin/unhealthy` (`POST /admin/healthy`
//!   undoes it);
//! - a version containing `slow` delays every answer to `/` by 2500 ms;
//! - a version containing `errors` answers 1 in 10 requests to `/` with 500.
//!
//! Shutdown is graceful: the listener closes, idle connections are closed and
//! requests in flight complete.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};

/// How long a `slow` version delays each answer to `/`.
pub const SLOW_DELAY: Duration = Duration::from_millis(2500);

struct App {
    version: String,
    slow: bool,
    errors: bool,
    unhealthy: AtomicBool,
    requests: AtomicU64,
}

/// A version containing `unhealthy` is unhealthy; `unhealthy-in-<region>`
/// only in that region (the local driver passes it as CUTOVER_REGION), so
/// a demo or test can break one wave of a cutover.
fn unhealthy_here(version: &str, region: Option<&str>) -> bool {
    match version.split_once("unhealthy-in-") {
        Some((_, r)) => region == Some(r),
        None => version.contains("unhealthy"),
    }
}

/// Binds `listen` and serves until `shutdown` completes.
pub async fn run(version: String, listen: SocketAddr, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    serve(version, listener, shutdown).await
}

/// Serves on an already bound listener until `shutdown` completes, then
/// waits for requests in flight.
pub async fn serve(
    version: String,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let app = Arc::new(App {
        slow: version.contains("slow"),
        errors: version.contains("errors"),
        unhealthy: AtomicBool::new(unhealthy_here(
            &version,
            std::env::var("CUTOVER_REGION").ok().as_deref(),
        )),
        requests: AtomicU64::new(0),
        version,
    });
    let routes = Router::new()
        .route("/", get(root))
        .route("/health", get(health))
        .route("/admin/unhealthy", post(make_unhealthy))
        .route("/admin/healthy", post(make_healthy))
        .with_state(app);
    // `with_graceful_shutdown` only takes a `Send + 'static` future: bridge.
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, routes).with_graceful_shutdown(async move {
        let _ = rx.await;
    });
    let mut server = std::pin::pin!(server.into_future());
    tokio::select! {
        r = &mut server => return r,
        _ = shutdown => {}
    }
    let _ = tx.send(());
    server.await
}

async fn root(State(app): State<Arc<App>>) -> (StatusCode, String) {
    let n = app.requests.fetch_add(1, Ordering::Relaxed);
    if app.slow {
        tokio::time::sleep(SLOW_DELAY).await;
    }
    if app.errors && n % 10 == 9 {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("version {} failed on purpose\n", app.version),
        );
    }
    (StatusCode::OK, format!("version {}\n", app.version))
}

async fn health(State(app): State<Arc<App>>) -> (StatusCode, &'static str) {
    if app.unhealthy.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "unhealthy")
    } else {
        (StatusCode::OK, "ok")
    }
}

async fn make_unhealthy(State(app): State<Arc<App>>) -> &'static str {
    app.unhealthy.store(true, Ordering::Relaxed);
    "unhealthy\n"
}

async fn make_healthy(State(app): State<Arc<App>>) -> &'static str {
    app.unhealthy.store(false, Ordering::Relaxed);
    "healthy\n"
}

/// A sample app answering with `version` on a loopback port, for tests:
/// it serves until the value is dropped.
#[cfg(test)]
pub(crate) struct TestApp {
    pub addr: std::net::SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

#[cfg(test)]
impl TestApp {
    pub async fn start(version: &str) -> TestApp {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(version.to_string(), l, async move {
            let _ = rx.await;
        }));
        TestApp { addr, _stop: tx }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One request on a fresh connection; returns (status, body).
    async fn request(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out[9..12].parse().unwrap();
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    async fn start(
        version: &str,
    ) -> (
        SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let v = version.to_string();
        let h = tokio::spawn(async move {
            serve(v, l, async move {
                let _ = rx.await;
            })
            .await
            .unwrap()
        });
        (addr, tx, h)
    }

    #[tokio::test]
    async fn routes_and_admin_switches() {
        let (addr, stop, h) = start("v1").await;
        assert_eq!(request(addr, "GET", "/").await, (200, "version v1\n".into()));
        assert_eq!(request(addr, "GET", "/health").await, (200, "ok".into()));
        assert_eq!(request(addr, "POST", "/admin/unhealthy").await.0, 200);
        assert_eq!(request(addr, "GET", "/health").await.0, 503);
        assert_eq!(request(addr, "POST", "/admin/healthy").await.0, 200);
        assert_eq!(request(addr, "GET", "/health").await.0, 200);
        assert_eq!(request(addr, "GET", "/nope").await.0, 404);
        stop.send(()).unwrap();
        h.await.unwrap();
    }

    #[tokio::test]
    async fn behaviour_by_version() {
        let (addr, _stop, _h) = start("v2-unhealthy").await;
        assert_eq!(request(addr, "GET", "/health").await.0, 503);
        let (addr, _stop2, _h2) = start("v3-errors").await;
        let mut failed = 0;
        for _ in 0..20 {
            if request(addr, "GET", "/").await.0 == 500 {
                failed += 1;
            }
        }
        assert_eq!(failed, 2);
    }

    #[tokio::test]
    async fn graceful_shutdown_finishes_requests_in_flight() {
        let (addr, stop, h) = start("v4-slow").await;
        let inflight = tokio::spawn(request(addr, "GET", "/"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.send(()).unwrap();
        let (status, body) = inflight.await.unwrap();
        assert_eq!((status, body.as_str()), (200, "version v4-slow\n"));
        h.await.unwrap();
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "still listening after shutdown"
        );
    }
}
