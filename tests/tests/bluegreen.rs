//! Blue-green in one cluster through the real coordinator and agent with the
//! `local` driver and the sample app: deploy, gates, switch, status,
//! rollback; failing versions never take traffic; zero failed requests under
//! steady load across a switch and a rollback; bad input refused.

use std::time::{Duration, Instant};

use cutover_shared::app::{AppCluster, AppSpec, DriverKind, LoadProbe, Probe};
use cutover_shared::domain::TaskState;
use cutover_shared::proto as pb;
use cutover_tests::load::SteadyLoad;
use cutover_tests::{TestCluster, cutover_bin, sample_app_local};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(60);

fn app(name: &str) -> AppSpec {
    AppSpec {
        name: name.into(),
        clusters: vec![AppCluster {
            region: "us-east".into(),
            cluster: "us-east-1".into(),
            driver: DriverKind::Local,
            local: Some(sample_app_local(&cutover_bin())),
            kubernetes: None,
        }],
        health: vec![Probe::Http {
            path: "/health".into(),
            status: 200,
            body_contains: None,
        }],
        // Small enough to keep tests quick, with the seed's latency and
        // error thresholds.
        load: LoadProbe {
            requests: 60,
            rate_per_sec: 120,
            min_rps: 50.0,
            ..LoadProbe::default()
        },
        bake_secs: 0,
        ..Default::default()
    }
}

async fn cluster_with_agent() -> (TestCluster, usize) {
    let mut c = TestCluster::builder()
        .nodes(3)
        .regions(&[("us-east", "us-east-1")])
        .start()
        .await
        .unwrap();
    let leader = c.wait_leader(T).await.unwrap();
    c.start_agent(0).unwrap();
    c.wait_state(leader, T, "agent up", |s| s.agents.contains_key("us-east/us-east-1"))
        .await
        .unwrap();
    (c, leader)
}

/// GET `path` on `addr` over a fresh connection; (status, body).
async fn get(addr: &str, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let code = buf.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = buf.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (code, body)
}

/// Runs an operation to its end and returns it.
async fn finish(c: &TestCluster, node: usize, id: &str) -> cutover_shared::domain::Operation {
    c.wait_state(node, T, &format!("operation {id} to finish"), |s| {
        s.operations[id].state.is_finished()
    })
    .await
    .unwrap();
    c.node(node).consensus().read(|s| (*s.operations[id]).clone())
}

async fn deploy(c: &TestCluster, node: usize, app: &str, image: &str) -> Result<String, tonic::Status> {
    c.operator(node)
        .deploy(pb::DeployRequest {
            app: app.into(),
            image: image.into(),
            region: "us-east".into(),
            no_switch: false,
            waves: vec![],
            strategy: 0,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().operation_id)
}

fn summary(op: &cutover_shared::domain::Operation) -> String {
    let steps: Vec<String> = op
        .tasks
        .iter()
        .map(|t| {
            format!(
                "{} {:?}: {}",
                t.spec.kind,
                t.state,
                t.result.as_ref().map_or("", |r| r.message.as_str())
            )
        })
        .collect();
    format!("{:?} {} | {}", op.state, op.summary, steps.join(" | "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deploy_gates_switch_status_and_rollback() {
    let (c, leader) = cluster_with_agent().await;
    let spec = app("shop");
    let service = spec.clusters[0].local.as_ref().unwrap().listen.clone();
    let mut op = c.operator(leader);
    op.apply_app(pb::ApplyAppRequest {
        app: Some(spec.clone().into()),
    })
    .await
    .unwrap();

    let id = deploy(&c, leader, "shop", "sample:v1").await.unwrap();
    let done = finish(&c, leader, &id).await;
    assert_eq!(done.state, TaskState::Succeeded, "{}", summary(&done));
    assert_eq!(get(&service, "/").await, (200, "version sample:v1\n".into()));

    let id = deploy(&c, leader, "shop", "sample:v2").await.unwrap();
    let done = finish(&c, leader, &id).await;
    assert_eq!(done.state, TaskState::Succeeded, "{}", summary(&done));
    let kinds: Vec<&str> = done.tasks.iter().map(|t| t.spec.kind.as_str()).collect();
    assert_eq!(kinds, ["app.deploy", "app.gates", "app.switch"]);
    assert_eq!(get(&service, "/").await.1, "version sample:v2\n");

    // status: v2 active, v1 warm.
    let st = op
        .get_status(pb::GetStatusRequest {
            app: "shop".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let a = st.clusters[0].app.clone().unwrap();
    let active = pb::Color::try_from(a.active).unwrap();
    let img = |color: pb::Color| a.colors.iter().find(|k| k.color == color as i32).unwrap().clone();
    let other = if active == pb::Color::Blue {
        pb::Color::Green
    } else {
        pb::Color::Blue
    };
    assert_eq!(img(active).image, "sample:v2");
    assert_eq!(img(other).image, "sample:v1");
    assert!(img(other).healthy, "the previous color stays warm");

    let id = op
        .rollback(pb::RollbackRequest {
            app: "shop".into(),
            region: "us-east".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .operation_id;
    let done = finish(&c, leader, &id).await;
    assert_eq!(done.state, TaskState::Succeeded, "{}", summary(&done));
    assert_eq!(get(&service, "/").await.1, "version sample:v1\n");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failing_versions_are_never_switched_to() {
    let (c, leader) = cluster_with_agent().await;
    let spec = app("shop");
    let service = spec.clusters[0].local.as_ref().unwrap().listen.clone();
    c.operator(leader)
        .apply_app(pb::ApplyAppRequest { app: Some(spec.into()) })
        .await
        .unwrap();
    let id = deploy(&c, leader, "shop", "sample:v1").await.unwrap();
    assert_eq!(finish(&c, leader, &id).await.state, TaskState::Succeeded);

    for (image, why) in [("sample:v2-unhealthy", "/health"), ("sample:v3-slow", "load")] {
        let id = deploy(&c, leader, "shop", image).await.unwrap();
        let done = finish(&c, leader, &id).await;
        assert_eq!(done.state, TaskState::Failed, "{image}: {}", summary(&done));
        assert!(done.summary.contains("app.gates"), "{image}: {}", done.summary);
        assert!(done.summary.contains(why), "{image}: {}", done.summary);
        assert!(
            done.tasks.iter().all(|t| t.spec.kind != "app.switch"),
            "{image} was switched to"
        );
        assert_eq!(
            get(&service, "/").await,
            (200, "version sample:v1\n".into()),
            "traffic untouched by {image}"
        );
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn zero_failed_requests_across_switch_and_rollback() {
    let (c, leader) = cluster_with_agent().await;
    let spec = app("shop");
    let service = spec.clusters[0].local.as_ref().unwrap().listen.clone();
    let mut op = c.operator(leader);
    op.apply_app(pb::ApplyAppRequest { app: Some(spec.into()) })
        .await
        .unwrap();
    let id = deploy(&c, leader, "shop", "sample:v1").await.unwrap();
    assert_eq!(finish(&c, leader, &id).await.state, TaskState::Succeeded);

    // 8 connections, one request every 20 ms each: 400 requests per second.
    let load = SteadyLoad::start(&service, 8, Duration::from_millis(20));
    let started = Instant::now();
    let id = deploy(&c, leader, "shop", "sample:v2").await.unwrap();
    let d = finish(&c, leader, &id).await;
    assert_eq!(d.state, TaskState::Succeeded, "{}", summary(&d));
    let id = op
        .rollback(pb::RollbackRequest {
            app: "shop".into(),
            region: "us-east".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .operation_id;
    assert_eq!(finish(&c, leader, &id).await.state, TaskState::Succeeded);
    let id = op
        .switch(pb::SwitchRequest {
            app: "shop".into(),
            region: "us-east".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .operation_id;
    assert_eq!(finish(&c, leader, &id).await.state, TaskState::Succeeded);
    let (ok, failed) = load.stop().await;
    let secs = started.elapsed().as_secs_f64();
    let rps = ok as f64 / secs;
    eprintln!("steady load: {ok} ok, {failed} failed in {secs:.1} s ({rps:.0} req/s)");
    assert_eq!(
        failed, 0,
        "{failed} requests failed across a switch, a rollback and a switch"
    );
    assert!(rps >= 300.0, "load was only {rps:.0} req/s");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_apps_and_deploys_are_refused_with_the_field_named() {
    let (c, leader) = cluster_with_agent().await;
    let mut op = c.operator(leader);
    let apply = |a: pb::App| pb::ApplyAppRequest { app: Some(a) };
    let good: pb::App = app("shop").into();

    let mut a = good.clone();
    a.clusters[0].driver = 99;
    let e = op.apply_app(apply(a)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("clusters[0].driver"), "{}", e.message());

    for name in ["../x", "has space", &"x".repeat(300)] {
        let mut a = good.clone();
        a.name = name.into();
        let e = op.apply_app(apply(a)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{name}");
        assert!(e.message().contains("name"), "{}", e.message());
    }

    let mut a = good.clone();
    a.load.as_mut().unwrap().max_error_rate = Some(2.0);
    let e = op.apply_app(apply(a)).await.unwrap_err();
    assert!(e.message().contains("load.max_error_rate"), "{}", e.message());

    let mut a = good.clone();
    a.clusters[0].region = "mars".into();
    let e = op.apply_app(apply(a)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("clusters[0]") && e.message().contains("no agent serves"),
        "{}",
        e.message()
    );
    assert!(
        c.node(leader).consensus().read(|s| s.apps.is_empty()),
        "nothing was half-applied"
    );

    op.apply_app(apply(good)).await.unwrap();
    let e = deploy(&c, leader, "nope", "sample:v1").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = deploy(&c, leader, "shop", "Not An Image").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        c.node(leader).consensus().read(|s| s.operations.is_empty()),
        "no operation started for a bad image"
    );

    // A second operation on the same app and cluster is refused, naming the first.
    let first = deploy(&c, leader, "shop", "sample:v1").await.unwrap();
    let e = deploy(&c, leader, "shop", "sample:v2").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains(&first), "{}", e.message());
    finish(&c, leader, &first).await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crashed_color_is_reported_unhealthy() {
    let (c, leader) = cluster_with_agent().await;
    c.operator(leader)
        .apply_app(pb::ApplyAppRequest {
            app: Some(app("shop").into()),
        })
        .await
        .unwrap();
    let id = deploy(&c, leader, "shop", "sample:v1").await.unwrap();
    assert_eq!(finish(&c, leader, &id).await.state, TaskState::Succeeded);
    let healthy = |s: &cutover_coordinator::state::State| {
        s.app_status
            .get("shop")
            .and_then(|m| m.get("us-east/us-east-1"))
            .map(|st| {
                let active = st.active.unwrap();
                st.colors.iter().find(|k| k.color == active).unwrap().healthy
            })
    };
    assert_eq!(c.node(leader).consensus().read(healthy), Some(true));
    // kill -9 the active color's process, found in the driver's state file.
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(c.agent_config(0).data_dir.join("apps/shop/state.json")).unwrap(),
    )
    .unwrap();
    let active = state["active"].as_str().unwrap().to_owned();
    let pid = state["colors"][&active]["pid"].as_u64().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-9", &pid])
            .status()
            .unwrap()
            .success()
    );
    c.wait_state(leader, T, "the crash to be reported", |s| healthy(s) == Some(false))
        .await
        .unwrap();
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_agent_readopts_its_apps() {
    let (mut c, leader) = cluster_with_agent().await;
    let spec = app("shop");
    let service = spec.clusters[0].local.as_ref().unwrap().listen.clone();
    c.operator(leader)
        .apply_app(pb::ApplyAppRequest { app: Some(spec.into()) })
        .await
        .unwrap();
    let id = deploy(&c, leader, "shop", "sample:v1").await.unwrap();
    assert_eq!(finish(&c, leader, &id).await.state, TaskState::Succeeded);
    let pid_before = std::fs::read_to_string(c.agent_config(0).data_dir.join("apps/shop/state.json")).unwrap();
    c.stop_agent(0).await;
    c.start_agent(0).unwrap();
    // No task is sent: the agent re-adopts the running process by itself.
    let deadline = Instant::now() + T;
    loop {
        if let Ok(mut s) = tokio::net::TcpStream::connect(&service).await {
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut buf = String::new();
            let _ = s.read_to_string(&mut buf).await;
            if buf.contains("version sample:v1") {
                break;
            }
        }
        assert!(Instant::now() < deadline, "service not back after the agent restarted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid_after = std::fs::read_to_string(c.agent_config(0).data_dir.join("apps/shop/state.json")).unwrap();
    let pid = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap()["colors"]["blue"]["pid"].clone();
    assert_eq!(
        pid(&pid_before),
        pid(&pid_after),
        "the same process serves: re-adopted, not restarted"
    );
    c.shutdown().await;
}
