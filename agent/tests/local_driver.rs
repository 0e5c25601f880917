//! The local driver end to end, with the sample app (the
//! `cutover-sample-app` test binary) as the "image": deploy, preview,
//! switch, scale-down, crash reporting and re-adoption after a restart.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use cutover_agent::drivers::local::LocalDriver;
use cutover_agent::drivers::{DriverContext, PlatformDriver};
use cutover_shared::app::{Color, LocalSpec};
use cutover_shared::config::DriverPolicy;
use cutover_shared::domain::ClusterRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// The harness's port picker, included rather than depended on (the harness
// depends on this crate). A port from `bind(0)`, released, was taken by
// another test's app process before the router bound it.
use cutover_devkit::ports;

fn free_port() -> SocketAddr {
    ports::stable_free_addr().parse().unwrap()
}

fn spec(command: Vec<String>) -> LocalSpec {
    LocalSpec {
        command,
        listen: free_port().to_string(),
        preview_listen: free_port().to_string(),
        drain_timeout_ms: 2000,
    }
}

fn sample_app_command() -> Vec<String> {
    [
        env!("CARGO_BIN_EXE_cutover-sample-app"),
        "--version",
        "{image}",
        "--listen",
        "{listen}",
    ]
    .map(String::from)
    .to_vec()
}

/// A context whose policy allows the sample app (by its path).
fn ctx(dir: &Path) -> DriverContext {
    DriverContext {
        data_dir: dir.to_path_buf(),
        cluster: ClusterRef {
            region: "local".into(),
            cluster: "dev".into(),
        },
        policy: DriverPolicy {
            local_commands: vec![env!("CARGO_BIN_EXE_cutover-sample-app").into()],
            kubeconfig: None,
            job_commands: vec![],
        },
    }
}

/// Kills whatever the app's state file records, even if the test panicked:
/// the processes deliberately outlive the driver.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let Ok(text) = std::fs::read_to_string(self.0.join("apps/web/state.json")) else {
            return;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            return;
        };
        for c in ["blue", "green"] {
            if let Some(pid) = v["colors"][c]["pid"].as_u64() {
                let _ = std::process::Command::new("kill")
                    .args(["-s", "KILL", "--", &format!("-{pid}")])
                    .stderr(std::process::Stdio::null())
                    .status();
            }
        }
    }
}

/// GET on a fresh connection: (status, body), or the error.
async fn get(addr: &str, path: &str) -> Result<(u16, String), String> {
    let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| e.to_string())?;
    let status = out
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not HTTP: {out:?}"))?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

async fn body(addr: &str) -> String {
    match get(addr, "/").await {
        Ok((200, b)) => b,
        other => panic!("GET {addr}/: {other:?}"),
    }
}

fn recorder() -> (impl Fn(String) + Send + Sync, std::sync::Arc<Mutex<Vec<String>>>) {
    let log = std::sync::Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    (move |m: String| l.lock().unwrap().push(m), log)
}

fn images(st: &cutover_shared::app::AppClusterStatus) -> Vec<(Color, String, u32, u32, bool)> {
    st.colors
        .iter()
        .map(|c| {
            (
                c.color,
                c.image.clone(),
                c.replicas_ready,
                c.replicas_desired,
                c.healthy,
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_preview_switch_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup(dir.path().to_path_buf());
    let spec = spec(sample_app_command());
    let (service, preview) = (spec.listen.clone(), spec.preview_listen.clone());
    let d = LocalDriver::open("web", spec, &ctx(dir.path())).await.unwrap();

    let st = d.status().await.unwrap();
    assert_eq!(st.active, None);
    assert_eq!(
        images(&st),
        vec![
            (Color::Blue, "".into(), 0, 0, false),
            (Color::Green, "".into(), 0, 0, false)
        ]
    );
    assert!(
        get(&service, "/").await.is_err(),
        "nothing routes before the first deploy"
    );

    // First deploy: becomes active and takes the service address.
    let (progress, log) = recorder();
    d.deploy(Color::Blue, "v1", &progress).await.unwrap();
    let log = log.lock().unwrap().clone();
    assert!(log.iter().any(|m| m.contains("ready after")), "{log:?}");
    assert!(log.iter().any(|m| m.contains("now active")), "{log:?}");
    assert_eq!(body(&service).await, "version v1\n");
    assert!(
        get(&preview, "/").await.is_err(),
        "no preview without an inactive color"
    );
    assert_eq!(d.status().await.unwrap().active, Some(Color::Blue));

    // The active color cannot be redeployed.
    let e = d.deploy(Color::Blue, "v9", &|_| {}).await.unwrap_err();
    assert!(e.message.contains("active"), "{e}");

    // The second color is only on the preview address.
    d.deploy(Color::Green, "v2", &|_| {}).await.unwrap();
    assert_eq!(body(&service).await, "version v1\n");
    assert_eq!(body(&preview).await, "version v2\n");
    let st = d.status().await.unwrap();
    assert_eq!(st.active, Some(Color::Blue));
    assert_eq!(st.last_switch_unix_ms, None);
    assert_eq!(
        images(&st),
        vec![
            (Color::Blue, "v1".into(), 1, 1, true),
            (Color::Green, "v2".into(), 1, 1, true)
        ]
    );
    assert_eq!(d.preview_address().await.unwrap(), preview);
    assert_eq!(d.service_address().await.unwrap(), service);

    d.switch(Color::Green).await.unwrap();
    assert_eq!(body(&service).await, "version v2\n");
    assert_eq!(body(&preview).await, "version v1\n");
    let st = d.status().await.unwrap();
    assert_eq!(st.active, Some(Color::Green));
    let first_switch = st.last_switch_unix_ms.expect("switch time recorded");

    d.switch(Color::Blue).await.unwrap();
    assert_eq!(body(&service).await, "version v1\n");
    assert_eq!(body(&preview).await, "version v2\n");
    let st = d.status().await.unwrap();
    assert_eq!(st.active, Some(Color::Blue));
    assert!(st.last_switch_unix_ms.unwrap() >= first_switch);

    // Scale-down: refused for the active color; the other stops, its
    // preview goes away and switching to it is refused.
    assert!(d.scale_down(Color::Blue).await.unwrap_err().message.contains("active"));
    d.scale_down(Color::Green).await.unwrap();
    assert!(get(&preview, "/").await.is_err());
    assert_eq!(body(&service).await, "version v1\n");
    let st = d.status().await.unwrap();
    assert_eq!(images(&st)[1], (Color::Green, "v2".into(), 0, 0, false));
    let e = d.switch(Color::Green).await.unwrap_err();
    assert!(e.message.contains("no green process"), "{e}");

    // Redeploying the stopped color brings the preview back.
    d.deploy(Color::Green, "v3", &|_| {}).await.unwrap();
    assert_eq!(body(&preview).await, "version v3\n");

    d.stop_all().await.unwrap();
    assert!(get(&service, "/").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_driver_readopts_running_processes() {
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup(dir.path().to_path_buf());
    let spec = spec(sample_app_command());
    let (service, preview) = (spec.listen.clone(), spec.preview_listen.clone());
    let d = LocalDriver::open("web", spec.clone(), &ctx(dir.path())).await.unwrap();
    d.deploy(Color::Blue, "v1", &|_| {}).await.unwrap();
    d.deploy(Color::Green, "v2", &|_| {}).await.unwrap();
    d.switch(Color::Green).await.unwrap();
    let before = d.status().await.unwrap();
    drop(d);

    // "Agent restart": the processes keep running, the routers come back.
    let d = LocalDriver::open("web", spec, &ctx(dir.path())).await.unwrap();
    assert_eq!(body(&service).await, "version v2\n");
    assert_eq!(body(&preview).await, "version v1\n");
    let after = d.status().await.unwrap();
    assert_eq!(after, before);
    assert_eq!(
        images(&after),
        vec![
            (Color::Blue, "v1".into(), 1, 1, true),
            (Color::Green, "v2".into(), 1, 1, true)
        ]
    );

    // The re-adopted processes can still be switched and stopped.
    d.switch(Color::Blue).await.unwrap();
    assert_eq!(body(&service).await, "version v1\n");
    d.scale_down(Color::Green).await.unwrap();
    assert_eq!(
        images(&d.status().await.unwrap())[1],
        (Color::Green, "v2".into(), 0, 0, false)
    );

    // A crashed process is reported unhealthy, not stopped.
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("apps/web/state.json")).unwrap()).unwrap();
    let pid = state["colors"]["blue"]["pid"].as_u64().unwrap();
    std::process::Command::new("kill")
        .args(["-s", "KILL", &pid.to_string()])
        .status()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let st = d.status().await.unwrap();
    assert_eq!(images(&st)[0], (Color::Blue, "v1".into(), 0, 1, false));
    assert_eq!(get(&service, "/").await.unwrap().0, 502);
}

#[tokio::test]
async fn a_process_that_never_gets_ready_fails_the_deploy() {
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup(dir.path().to_path_buf());
    let command = ["sh", "-c", "echo starting {image} on {listen} as {color}; exit 3"]
        .map(String::from)
        .to_vec();
    let d = LocalDriver::open("web", spec(command), &ctx(dir.path())).await.unwrap();
    let e = d.deploy(Color::Blue, "v1", &|_| {}).await.unwrap_err();
    assert!(e.message.contains("exited before it was ready"), "{e}");
    assert!(
        e.diagnostics
            .iter()
            .any(|l| l.starts_with("starting v1 on 127.0.0.1:") && l.ends_with("as blue")),
        "{:?}",
        e.diagnostics
    );
    let st = d.status().await.unwrap();
    assert_eq!(st.active, None);
    assert_eq!(images(&st)[0], (Color::Blue, "v1".into(), 0, 0, false));
}

/// Steady load through the service address (keep-alive connections) while
/// the driver switches colors 10 times and then scales the old color down:
/// no request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switches_and_scale_down_under_load_lose_nothing() {
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;
    use hyper_util::client::legacy::Client;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioExecutor;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let dir = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup(dir.path().to_path_buf());
    let spec = spec(sample_app_command());
    let service = spec.listen.clone();
    let d = Arc::new(LocalDriver::open("web", spec, &ctx(dir.path())).await.unwrap());
    d.deploy(Color::Blue, "v1", &|_| {}).await.unwrap();
    d.deploy(Color::Green, "v2", &|_| {}).await.unwrap();

    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let uri: hyper::Uri = format!("http://{service}/").parse().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let results = Arc::new(Mutex::new(Vec::<Result<String, String>>::new()));
    let load = {
        let (stop, results) = (stop.clone(), results.clone());
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(2));
            let mut set = tokio::task::JoinSet::new();
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let (client, uri, results) = (client.clone(), uri.clone(), results.clone());
                set.spawn(async move {
                    let r = async {
                        let resp = client.get(uri).await.map_err(|e| format!("{e:?}"))?;
                        let status = resp.status();
                        let b = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
                        let b = String::from_utf8_lossy(&b).into_owned();
                        if status == 200 {
                            Ok(b)
                        } else {
                            Err(format!("{status}: {b}"))
                        }
                    }
                    .await;
                    results.lock().unwrap().push(r);
                });
            }
            while set.join_next().await.is_some() {}
            started.elapsed()
        })
    };
    for i in 0..10 {
        tokio::time::sleep(Duration::from_millis(180)).await;
        d.switch(if i % 2 == 0 { Color::Green } else { Color::Blue })
            .await
            .unwrap();
    }
    // Ends on blue; green (idle now) is stopped while the load goes on.
    d.scale_down(Color::Green).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = load.await.unwrap();

    let results = std::mem::take(&mut *results.lock().unwrap());
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    let v1 = results.iter().filter(|r| r.as_deref() == Ok("version v1\n")).count();
    let v2 = results.iter().filter(|r| r.as_deref() == Ok("version v2\n")).count();
    let rate = results.len() as f64 / elapsed.as_secs_f64();
    eprintln!(
        "driver switch: {} requests in {elapsed:?} ({rate:.0} req/s), {} failed, v1 {v1}, v2 {v2}",
        results.len(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} failed, first: {:?}",
        failed.len(),
        failed.first()
    );
    assert!(rate >= 300.0, "only {rate:.0} req/s");
    assert!(v1 > 0 && v2 > 0 && v1 + v2 == results.len());
    d.stop_all().await.unwrap();
}

/// An `AppRuntime` task for app `web` in this test's cluster, the app's
/// definition attached the way the coordinator attaches it.
fn app_task(
    id: &str,
    app: &cutover_shared::app::AppSpec,
    params: cutover_shared::task::TaskParams,
) -> cutover_shared::domain::TaskSpec {
    let (kind, mut wire) = params.to_wire();
    wire.insert("spec".into(), serde_json::to_string(app).unwrap());
    cutover_shared::domain::TaskSpec {
        task_id: id.into(),
        operation_id: "op".into(),
        kind,
        params: wire,
        target: ctx(Path::new("/")).cluster,
    }
}

/// Problem 1 of the typed-contract issue: re-applying an app with only its
/// bake changed rebuilt the local driver, whose new router could not bind
/// the address the old one still held ("Address already in use"), and
/// every later deploy failed the same way. Now a definition whose driver
/// settings are unchanged keeps its driver, and new settings close the old
/// driver (releasing its addresses) before the new one opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reapplied_app_keeps_deploying() {
    use cutover_shared::app::{AppCluster, AppSpec, DriverKind};
    use cutover_shared::task::{AppRef, TaskParams, spec_digest};
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup(dir.path().to_path_buf());
    let rt = cutover_agent::app_tasks::AppRuntime::new(ctx(dir.path()));
    let local = spec(sample_app_command());
    let mut app: AppSpec = serde_json::from_value(serde_json::json!({"name": "web", "clusters": []})).unwrap();
    app.clusters = vec![AppCluster {
        region: "local".into(),
        cluster: "dev".into(),
        driver: DriverKind::Local,
        local: Some(local.clone()),
        kubernetes: None,
    }];
    let deploy = |app: &AppSpec, id: &str, image: &str| {
        app_task(
            id,
            app,
            TaskParams::AppDeploy {
                app: AppRef {
                    app: "web".into(),
                    spec_digest: spec_digest(app),
                },
                image: image.into(),
            },
        )
    };
    let switch = |app: &AppSpec, id: &str, to: Color| {
        app_task(
            id,
            app,
            TaskParams::AppSwitch {
                app: AppRef {
                    app: "web".into(),
                    spec_digest: spec_digest(app),
                },
                to: Some(to),
                compensate: false,
            },
        )
    };
    let r = rt.execute(&deploy(&app, "t1", "v1"), &|_| {}).await;
    assert!(r.success, "{}", r.message);
    assert_eq!(body(&local.listen).await, "version v1\n");
    // Only the bake changes: the same driver serves on.
    app.bake_secs += 5;
    for (i, image) in ["v2", "v3"].into_iter().enumerate() {
        let r = rt.execute(&deploy(&app, &format!("t2{i}"), image), &|_| {}).await;
        assert!(r.success, "deploy {image} after a re-apply: {}", r.message);
        let color = Color::parse(&r.outputs["color"]).unwrap();
        let r = rt.execute(&switch(&app, &format!("t3{i}"), color), &|_| {}).await;
        assert!(r.success, "{}", r.message);
        assert_eq!(body(&local.listen).await, format!("version {image}\n"));
    }
    // New addresses: the old routers let go, the new ones serve.
    let moved = spec(sample_app_command());
    app.clusters[0].local = Some(LocalSpec {
        command: local.command.clone(),
        ..moved.clone()
    });
    let r = rt.execute(&deploy(&app, "t4", "v4"), &|_| {}).await;
    assert!(r.success, "deploy after moving addresses: {}", r.message);
    assert!(
        tokio::net::TcpStream::connect(&local.listen).await.is_err(),
        "the old service address is released"
    );
    assert_eq!(body(&moved.listen).await, "version v3\n");
}

/// The agent's own config bounds what app definitions (which any operator
/// can apply) make it run: a command or kubeconfig outside its `[drivers]`
/// fails before anything starts, with a message naming the setting.
#[tokio::test]
async fn a_definition_outside_the_agents_driver_policy_starts_nothing() {
    use cutover_agent::drivers::driver_for;
    use cutover_shared::app::{AppCluster, AppSpec, DriverKind, KubeSpec};
    let dir = tempfile::tempdir().unwrap();
    let mut context = ctx(dir.path());
    context.policy.local_commands.push("/opt/apps/".into());
    let app = |local: Option<LocalSpec>, kubernetes: Option<KubeSpec>| {
        let mut a: AppSpec = serde_json::from_value(serde_json::json!({"name": "web", "clusters": []})).unwrap();
        a.clusters = vec![AppCluster {
            region: "local".into(),
            cluster: "dev".into(),
            driver: if local.is_some() {
                DriverKind::Local
            } else {
                DriverKind::Kubernetes
            },
            local,
            kubernetes,
        }];
        a
    };
    for program in ["sh", "/bin/sh", "/opt/apps/../../bin/sh", "/opt/appsx/run", ""] {
        let command = vec![program.to_owned(), "-c".into(), "touch pwned".into()];
        let err = match driver_for(&app(Some(spec(command)), None), &context).await {
            Ok(_) => panic!("{program:?} was allowed"),
            Err(e) => e.message,
        };
        assert!(err.contains("this agent may not run"), "{err}");
        assert!(err.contains("local_commands allow"), "{err}");
    }
    assert!(
        !dir.path().join("apps").exists(),
        "a refused definition left state behind"
    );
    // The listed program and a program under a listed directory pass.
    assert!(context.policy.allows_program(env!("CARGO_BIN_EXE_cutover-sample-app")));
    assert!(context.policy.allows_program("/opt/apps/web/run"));

    // Kubernetes: a definition may not pick credentials the agent does not use.
    let kube: KubeSpec = serde_json::from_value(serde_json::json!({
        "namespace": "shop",
        "kubeconfig": "/root/.kube/admin.conf",
    }))
    .unwrap();
    let err = match driver_for(&app(None, Some(kube)), &context).await {
        Ok(_) => panic!("a foreign kubeconfig was allowed"),
        Err(e) => e.message,
    };
    assert!(err.contains("may not use kubeconfig"), "{err}");
    assert!(err.contains("in-cluster service account"), "{err}");
}
