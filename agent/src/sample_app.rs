//! The sample app: a tiny HTTP/1.1 service the local driver's demos and
//! tests deploy as "images". Its behaviour is chosen by the version string so
//! that no flags are needed:
//!
//! - `GET /` answers `version <version>\n`;
//! - `GET /health` answers `ok` (200), or 503 when the version contains
//!   `unhealthy` or after `POST /admin/unhealthy` (`POST /admin/healthy`
//!   undoes it);
//! - a version containing `slow` delays every answer to `/` by 2500 ms;
//! - a version containing `errors` answers 1 in 10 requests to `/` with 500,
//!   `errors-N` N in 100 (spread evenly);
//! - `GET /metrics` exports, in Prometheus' text format, the requests to `/`
//!   by color (from `CUTOVER_COLOR`, which the local driver sets) and status
//!   code: `http_requests_total` and the latency histogram
//!   `http_request_duration_seconds`, the names the built-in analysis
//!   checks read.
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

/// The latency histogram's bucket bounds, seconds (Prometheus' defaults).
const BUCKETS: [f64; 11] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Requests with one status code: count, latency sum and buckets.
#[derive(Default)]
struct Series {
    count: u64,
    sum_secs: f64,
    /// Non-cumulative: `buckets[i]` counts latencies in (BUCKETS[i-1], BUCKETS[i]].
    buckets: [u64; BUCKETS.len()],
}

/// How long a `slow` version delays each answer to `/`.
pub const SLOW_DELAY: Duration = Duration::from_millis(2500);

struct App {
    version: String,
    slow: bool,
    /// Requests in 100 answered with 500.
    error_percent: u64,
    unhealthy: AtomicBool,
    requests: AtomicU64,
    app: String,
    color: String,
    /// Status code → its series.
    metrics: std::sync::Mutex<std::collections::BTreeMap<u16, Series>>,
}

/// `errors-N` → N, `errors` → 10, otherwise 0.
fn error_percent(version: &str) -> u64 {
    match version.split_once("errors") {
        None => 0,
        Some((_, rest)) => rest
            .strip_prefix('-')
            .and_then(|n| n.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
            .map_or(10, |n: u64| n.min(100)),
    }
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
        error_percent: error_percent(&version),
        unhealthy: AtomicBool::new(unhealthy_here(
            &version,
            std::env::var("CUTOVER_REGION").ok().as_deref(),
        )),
        requests: AtomicU64::new(0),
        app: std::env::var("CUTOVER_APP").unwrap_or_default(),
        color: std::env::var("CUTOVER_COLOR").unwrap_or_else(|_| "unknown".into()),
        metrics: Default::default(),
        version,
    });
    let routes = Router::new()
        .route("/", get(root))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
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
    let started = std::time::Instant::now();
    let n = app.requests.fetch_add(1, Ordering::Relaxed);
    if app.slow {
        tokio::time::sleep(SLOW_DELAY).await;
    }
    // Request n fails when the running count of failures N·n/100 steps up:
    // N in every 100, evenly spread.
    let p = app.error_percent;
    let answer = if (n + 1) * p / 100 > n * p / 100 {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("version {} failed on purpose\n", app.version),
        )
    } else {
        (StatusCode::OK, format!("version {}\n", app.version))
    };
    app.observe(answer.0.as_u16(), started.elapsed().as_secs_f64());
    answer
}

impl App {
    fn observe(&self, code: u16, secs: f64) {
        let mut m = self.metrics.lock().expect("metrics");
        let s = m.entry(code).or_default();
        s.count += 1;
        s.sum_secs += secs;
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            s.buckets[i] += 1;
        }
    }
}

/// The request metrics in Prometheus' text exposition format.
async fn metrics(State(app): State<Arc<App>>) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    use std::fmt::Write;
    let m = app.metrics.lock().expect("metrics");
    let labels = |code: u16| format!("app=\"{}\",color=\"{}\",code=\"{code}\"", app.app, app.color);
    let mut out = String::new();
    out.push_str("# HELP http_requests_total Requests answered, by color and status code.\n");
    out.push_str("# TYPE http_requests_total counter\n");
    for (code, s) in m.iter() {
        let _ = writeln!(out, "http_requests_total{{{}}} {}", labels(*code), s.count);
    }
    out.push_str("# HELP http_request_duration_seconds Request latency, by color and status code.\n");
    out.push_str("# TYPE http_request_duration_seconds histogram\n");
    for (code, s) in m.iter() {
        let l = labels(*code);
        let mut cumulative = 0;
        for (bound, n) in BUCKETS.iter().zip(s.buckets) {
            cumulative += n;
            let _ = writeln!(
                out,
                "http_request_duration_seconds_bucket{{{l},le=\"{bound}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "http_request_duration_seconds_bucket{{{l},le=\"+Inf\"}} {}",
            s.count
        );
        let _ = writeln!(out, "http_request_duration_seconds_sum{{{l}}} {}", s.sum_secs);
        let _ = writeln!(out, "http_request_duration_seconds_count{{{l}}} {}", s.count);
    }
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
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
        // errors-3: 3 in every 100, and /metrics counts them by code.
        let (addr, _stop3, _h3) = start("v5-errors-3").await;
        let mut failed = 0;
        for _ in 0..200 {
            if request(addr, "GET", "/").await.0 == 500 {
                failed += 1;
            }
        }
        assert_eq!(failed, 6);
        let (status, text) = request(addr, "GET", "/metrics").await;
        assert_eq!(status, 200);
        assert!(text.contains("code=\"200\"} 194\n"), "{text}");
        assert!(text.contains("code=\"500\"} 6\n"), "{text}");
        assert!(text.contains("code=\"200\",le=\"+Inf\"} 194\n"), "{text}");
        assert!(text.contains("http_request_duration_seconds_count{"), "{text}");
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
