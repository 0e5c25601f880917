//! Health gates: an app's probes and its bounded load probe, run against one
//! address (a color's preview address before a switch, the service address
//! during a bake).
//!
//! Every probe runs (with a 5 s timeout each) so the report names all that
//! failed; the load probe runs only when every probe passed.

use std::time::{Duration, Instant};

use cutover_shared::app::{AppSpec, LoadProbe, Probe};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::Uri;
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::{Deserialize, Serialize};

/// Time limit of one probe.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Time limit of one load-probe request; a request that takes longer counts
/// as an error.
pub const LOAD_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Most of a probe's response body that is read.
const MAX_BODY: usize = 1 << 20;

/// The verdict of one gate run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct GateReport {
    pub passed: bool,
    pub probes: Vec<ProbeResult>,
    /// Absent when the load probe is disabled or a probe failed.
    pub load: Option<LoadResult>,
}

impl GateReport {
    /// One line per probe and one for the load probe, for task messages.
    pub fn lines(&self) -> String {
        let mut lines = Vec::new();
        for p in &self.probes {
            lines.push(format!(
                "{} {}: {} ({} ms)",
                if p.passed { "pass" } else { "FAIL" },
                p.name,
                p.detail,
                p.millis
            ));
        }
        if let Some(l) = &self.load {
            lines.push(format!(
                "{} load: {} requests, {} errors, avg {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, {:.0} rps{}",
                if l.passed { "pass" } else { "FAIL" },
                l.requests,
                l.errors,
                l.avg_ms,
                l.p95_ms,
                l.p99_ms,
                l.rps,
                if l.violations.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", l.violations.join("; "))
                }
            ));
        }
        lines.join("\n  ")
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ProbeResult {
    pub name: String,
    pub passed: bool,
    pub detail: String,
    pub millis: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct LoadResult {
    pub requests: u32,
    pub errors: u32,
    pub avg_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    /// Requests completed per second of wall time.
    pub rps: f64,
    pub passed: bool,
    /// One line per threshold exceeded, e.g. `p95 2512 ms > 2000 ms`.
    pub violations: Vec<String>,
}

pub(crate) type HttpClient = Client<HttpConnector, Empty<Bytes>>;

pub(crate) fn http_client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(PROBE_TIMEOUT));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(4))
        .pool_timer(TokioTimer::new())
        .build(connector)
}

/// Runs `spec`'s probes, then (if they all passed and it is enabled) its
/// load probe, against `target` (`host:port`).
pub async fn run_gates(spec: &AppSpec, target: &str) -> GateReport {
    let client = http_client();
    let mut probes = Vec::with_capacity(spec.health.len());
    for probe in &spec.health {
        probes.push(run_probe(&client, probe, target).await);
    }
    let probes_passed = probes.iter().all(|p| p.passed);
    let load = if probes_passed && spec.load.enabled {
        Some(run_load(&client, &spec.load, target).await)
    } else {
        None
    };
    let passed = probes_passed && load.as_ref().is_none_or(|l| l.passed);
    GateReport { passed, probes, load }
}

/// Sends requests to `target` at the load probe's rate and path until the
/// returned task is aborted: traffic for the gate-stage metric checks to
/// judge before the color serves anyone (what Flagger's load tester does).
pub fn drive_load(load: &LoadProbe, target: &str) -> tokio::task::JoinHandle<()> {
    let client = http_client();
    let uri: Option<Uri> = format!("http://{target}{}", load.path).parse().ok();
    let period = Duration::from_secs_f64(1.0 / f64::from(load.rate_per_sec.max(1)));
    tokio::spawn(async move {
        let Some(uri) = uri else { return };
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut inflight = tokio::task::JoinSet::new();
        loop {
            tick.tick().await;
            // Bounded: a color that stops answering must not pile up tasks.
            while inflight.try_join_next().is_some() {}
            if inflight.len() >= 256 {
                continue;
            }
            let (client, uri) = (client.clone(), uri.clone());
            inflight.spawn(async move {
                let _ = tokio::time::timeout(LOAD_REQUEST_TIMEOUT, async {
                    if let Ok(resp) = client.get(uri).await {
                        let _ = resp.into_body().collect().await;
                    }
                })
                .await;
            });
        }
    })
}

/// Runs only `spec`'s health probes against `target` (the bake's checks);
/// the failures, if any.
pub async fn failing_probes(spec: &AppSpec, target: &str) -> Vec<ProbeResult> {
    failing(&spec.health, target).await
}

/// Runs `probes` against `target`; the failures, if any.
pub async fn failing(probes: &[Probe], target: &str) -> Vec<ProbeResult> {
    let client = http_client();
    let mut failed = Vec::new();
    for probe in probes {
        let r = run_probe(&client, probe, target).await;
        if !r.passed {
            failed.push(r);
        }
    }
    failed
}

fn probe_name(probe: &Probe) -> String {
    match probe {
        Probe::Http { path, .. } => format!("http GET {path}"),
        Probe::Tcp => "tcp".into(),
        Probe::Grpc { service } if service.is_empty() => "grpc health".into(),
        Probe::Grpc { service } => format!("grpc health {service}"),
    }
}

async fn run_probe(client: &HttpClient, probe: &Probe, target: &str) -> ProbeResult {
    let started = Instant::now();
    let outcome = match tokio::time::timeout(PROBE_TIMEOUT, probe_once(client, probe, target)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} s", PROBE_TIMEOUT.as_secs())),
    };
    let (passed, detail) = match outcome {
        Ok(d) => (true, d),
        Err(d) => (false, d),
    };
    ProbeResult {
        name: probe_name(probe),
        passed,
        detail,
        millis: started.elapsed().as_millis() as u64,
    }
}

/// `Ok(detail)` if the probe passed, `Err(detail)` if not.
async fn probe_once(client: &HttpClient, probe: &Probe, target: &str) -> Result<String, String> {
    match probe {
        Probe::Http {
            path,
            status,
            body_contains,
        } => {
            let uri: Uri = format!("http://{target}{path}")
                .parse()
                .map_err(|e| format!("bad address: {e}"))?;
            let resp = client.get(uri).await.map_err(|e| transport_error(&e))?;
            let got = resp.status().as_u16();
            let body = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| format!("status {got}, reading the body: {e}"))?
                .to_bytes();
            if got != *status {
                return Err(format!("status {got}, expected {status}{}", snippet(&body)));
            }
            if let Some(want) = body_contains
                && !String::from_utf8_lossy(&body).contains(want.as_str())
            {
                return Err(format!(
                    "status {got}, body does not contain {want:?}{}",
                    snippet(&body)
                ));
            }
            Ok(format!("status {got}"))
        }
        Probe::Tcp => {
            tokio::net::TcpStream::connect(target)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            Ok("connected".into())
        }
        Probe::Grpc { service } => {
            use tonic_health::pb::health_check_response::ServingStatus;
            use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
            let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{target}"))
                .map_err(|e| format!("bad address: {e}"))?
                .connect_timeout(PROBE_TIMEOUT)
                .timeout(PROBE_TIMEOUT);
            let channel = endpoint
                .connect()
                .await
                .map_err(|e| format!("connect: {}", error_chain(&e)))?;
            let resp = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: service.clone(),
                })
                .await
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
            let status = ServingStatus::try_from(resp.into_inner().status).unwrap_or(ServingStatus::Unknown);
            match status {
                ServingStatus::Serving => Ok("SERVING".into()),
                other => Err(other.as_str_name().to_string()),
            }
        }
    }
}

/// The first bytes of a body, for a failed probe's detail.
fn snippet(body: &Bytes) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return String::new();
    }
    let short: String = text.chars().take(120).collect();
    format!(" (body: {short:?})")
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

fn transport_error(e: &hyper_util::client::legacy::Error) -> String {
    error_chain(e)
}

/// One load-probe request: its latency and whether it succeeded.
struct Sample {
    millis: f64,
    ok: bool,
}

async fn run_load(client: &HttpClient, load: &LoadProbe, target: &str) -> LoadResult {
    let uri: Uri = match format!("http://{target}{}", load.path).parse() {
        Ok(u) => u,
        Err(e) => {
            return LoadResult {
                requests: 0,
                errors: 0,
                avg_ms: 0.0,
                p95_ms: 0.0,
                p99_ms: 0.0,
                rps: 0.0,
                passed: false,
                violations: vec![format!("bad address {target:?}: {e}")],
            };
        }
    };
    let period = Duration::from_secs_f64(1.0 / f64::from(load.rate_per_sec.max(1)));
    let mut tick = tokio::time::interval(period);
    let mut set = tokio::task::JoinSet::new();
    let started = Instant::now();
    for _ in 0..load.requests {
        tick.tick().await;
        let (client, uri) = (client.clone(), uri.clone());
        set.spawn(async move {
            let t = Instant::now();
            let ok = tokio::time::timeout(LOAD_REQUEST_TIMEOUT, async {
                let resp = client.get(uri).await.ok()?;
                let success = resp.status().is_success();
                resp.into_body().collect().await.ok()?;
                Some(success)
            })
            .await
            .ok()
            .flatten()
            .unwrap_or(false);
            Sample {
                millis: t.elapsed().as_secs_f64() * 1000.0,
                ok,
            }
        });
    }
    let mut samples = Vec::with_capacity(load.requests as usize);
    while let Some(r) = set.join_next().await {
        // A panicked request task counts as a failed request.
        samples.push(r.unwrap_or(Sample {
            millis: LOAD_REQUEST_TIMEOUT.as_secs_f64() * 1000.0,
            ok: false,
        }));
    }
    let wall = started.elapsed().as_secs_f64();
    evaluate(load, &samples, wall)
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn evaluate(load: &LoadProbe, samples: &[Sample], wall_secs: f64) -> LoadResult {
    let requests = samples.len() as u32;
    let errors = samples.iter().filter(|s| !s.ok).count() as u32;
    let mut lat: Vec<f64> = samples.iter().map(|s| s.millis).collect();
    lat.sort_by(f64::total_cmp);
    let avg_ms = if lat.is_empty() {
        0.0
    } else {
        lat.iter().sum::<f64>() / lat.len() as f64
    };
    let p95_ms = percentile(&lat, 95.0);
    let p99_ms = percentile(&lat, 99.0);
    let rps = if wall_secs > 0.0 {
        f64::from(requests) / wall_secs
    } else {
        0.0
    };
    let error_rate = if requests == 0 {
        1.0
    } else {
        f64::from(errors) / f64::from(requests)
    };
    let mut violations = Vec::new();
    for (name, got, max) in [
        ("avg", avg_ms, load.max_avg_ms),
        ("p95", p95_ms, load.max_p95_ms),
        ("p99", p99_ms, load.max_p99_ms),
    ] {
        if got > max {
            violations.push(format!("{name} {got:.0} ms > {max:.0} ms"));
        }
    }
    if error_rate > load.max_error_rate {
        violations.push(format!(
            "error rate {:.2}% ({errors}/{requests}) > {:.2}%",
            error_rate * 100.0,
            load.max_error_rate * 100.0
        ));
    }
    if rps < load.min_rps {
        violations.push(format!("throughput {rps:.1} req/s < {:.1} req/s", load.min_rps));
    }
    LoadResult {
        requests,
        errors,
        avg_ms,
        p95_ms,
        p99_ms,
        rps,
        passed: violations.is_empty(),
        violations,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample_app;
    use cutover_shared::app::LoadProbe;

    struct App {
        addr: String,
        _stop: tokio::sync::oneshot::Sender<()>,
    }

    async fn app(version: &str) -> App {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(sample_app::serve(version.to_string(), l, async move {
            let _ = rx.await;
        }));
        App { addr, _stop: tx }
    }

    fn spec(health: Vec<Probe>) -> AppSpec {
        AppSpec {
            name: "web".into(),
            clusters: vec![],
            health,
            load: LoadProbe {
                enabled: true,
                path: "/".into(),
                requests: 40,
                rate_per_sec: 100,
                max_avg_ms: 2000.0,
                max_p95_ms: 2000.0,
                max_p99_ms: 3000.0,
                max_error_rate: 0.01,
                min_rps: 0.0,
            },
            bake_secs: 0,
            ..Default::default()
        }
    }

    fn http_health() -> Probe {
        Probe::Http {
            path: "/health".into(),
            status: 200,
            body_contains: Some("ok".into()),
        }
    }

    #[tokio::test]
    async fn healthy_version_passes_probes_and_load() {
        let a = app("v1").await;
        let s = spec(vec![
            http_health(),
            Probe::Tcp,
            Probe::Http {
                path: "/".into(),
                status: 200,
                body_contains: Some("version v1".into()),
            },
        ]);
        let r = run_gates(&s, &a.addr).await;
        assert!(r.passed, "{r:#?}");
        assert_eq!(r.probes.len(), 3);
        let load = r.load.expect("load ran");
        assert_eq!((load.requests, load.errors), (40, 0));
        assert!(load.violations.is_empty() && load.rps > 0.0, "{load:?}");
    }

    #[tokio::test]
    async fn unhealthy_version_fails_the_http_probe_and_skips_load() {
        let a = app("v2-unhealthy").await;
        let r = run_gates(&spec(vec![Probe::Tcp, http_health()]), &a.addr).await;
        assert!(!r.passed);
        assert!(r.probes[0].passed, "{r:?}");
        assert!(!r.probes[1].passed);
        assert_eq!(r.probes[1].name, "http GET /health");
        assert!(
            r.probes[1].detail.starts_with("status 503, expected 200"),
            "{}",
            r.probes[1].detail
        );
        assert!(r.load.is_none());
    }

    #[tokio::test]
    async fn slow_version_fails_the_load_probe() {
        let a = app("v3-slow").await;
        let r = run_gates(&spec(vec![http_health()]), &a.addr).await;
        assert!(r.probes[0].passed, "{r:?}");
        let load = r.load.clone().expect("load ran");
        assert!(!r.passed && !load.passed, "{r:?}");
        assert_eq!(load.errors, 0);
        assert!(load.p95_ms >= 2500.0, "{load:?}");
        assert!(
            load.violations
                .iter()
                .any(|v| v.starts_with("avg ") && v.ends_with("> 2000 ms")),
            "{load:?}"
        );
        assert!(
            load.violations
                .iter()
                .any(|v| v.starts_with("p95 ") && v.ends_with("> 2000 ms")),
            "{load:?}"
        );
    }

    #[tokio::test]
    async fn errors_version_fails_the_error_rate() {
        let a = app("v4-errors").await;
        let r = run_gates(&spec(vec![]), &a.addr).await;
        let load = r.load.expect("load ran");
        assert_eq!(load.errors, 4, "{load:?}");
        assert!(!r.passed);
        assert!(
            load.violations
                .iter()
                .any(|v| v.starts_with("error rate 10.00% (4/40) > 1.00%")),
            "{load:?}"
        );
    }

    #[tokio::test]
    async fn unreachable_target_fails_tcp_http_and_grpc() {
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string();
        let r = run_gates(
            &spec(vec![Probe::Tcp, http_health(), Probe::Grpc { service: String::new() }]),
            &dead,
        )
        .await;
        assert!(!r.passed);
        assert!(r.probes.iter().all(|p| !p.passed), "{r:?}");
        assert!(r.load.is_none());
    }

    #[tokio::test]
    async fn grpc_probe_reads_the_serving_status() {
        let (reporter, service) = tonic_health::server::health_reporter();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
        );
        let mut s = spec(vec![
            Probe::Grpc { service: String::new() },
            Probe::Grpc { service: "web".into() },
        ]);
        s.load.enabled = false;
        reporter
            .set_service_status("web", tonic_health::ServingStatus::NotServing)
            .await;
        let r = run_gates(&s, &addr).await;
        assert!(r.probes[0].passed, "{r:?}");
        assert_eq!(
            (r.probes[1].passed, r.probes[1].detail.as_str()),
            (false, "NOT_SERVING")
        );
        reporter
            .set_service_status("web", tonic_health::ServingStatus::Serving)
            .await;
        let r = run_gates(&s, &addr).await;
        assert!(r.passed && r.load.is_none(), "{r:?}");
    }

    #[test]
    fn percentiles_and_violation_text() {
        let samples: Vec<Sample> = (1..=100)
            .map(|i| Sample {
                millis: f64::from(i) * 10.0,
                ok: true,
            })
            .collect();
        let load = LoadProbe {
            max_avg_ms: 100.0,
            max_p95_ms: 900.0,
            max_p99_ms: 2000.0,
            min_rps: 50.0,
            ..LoadProbe::default()
        };
        let r = evaluate(&load, &samples, 4.0);
        assert_eq!((r.p95_ms, r.p99_ms, r.avg_ms, r.rps), (950.0, 990.0, 505.0, 25.0));
        assert_eq!(
            r.violations,
            vec![
                "avg 505 ms > 100 ms",
                "p95 950 ms > 900 ms",
                "throughput 25.0 req/s < 50.0 req/s"
            ]
        );
        assert!(!r.passed);
    }
}
