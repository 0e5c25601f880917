//! `cutover demo`: the README's main job on the embedded default. It starts
//! what `cutover dev` starts and runs a scripted scenario through the public
//! gRPC API over mutual TLS, then prints a report and exits 0 only if every
//! expectation held.
//!
//! The scenario grows with the product. Today it exercises the foundation:
//! cluster formation, agent registration in every region, a task per region,
//! a replicated write, loss of the Raft leader, and the same again on the
//! new leader.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cutover_shared::proto as pb;
use serde_json::json;

use crate::client::{ConnOpts, Output, call};
use crate::dev::{DEV_REGIONS, DevSystem};

struct Step {
    name: String,
    ok: bool,
    millis: u128,
    detail: String,
}

async fn echo_everywhere(conn: &ConnOpts, label: &str) -> Result<String> {
    let mut ids = Vec::new();
    for (region, cluster) in DEV_REGIONS {
        let req = pb::RunTaskRequest {
            target: Some(pb::ClusterRef {
                region: region.to_string(),
                cluster: cluster.to_string(),
            }),
            kind: "echo".into(),
            params: [("message".to_string(), format!("{label} from {region}"))].into(),
        };
        let r = call(conn, |mut c| {
            let req = req.clone();
            async move { c.run_task(req).await }
        })
        .await?;
        ids.push((region, r.operation_id));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut replies = Vec::new();
    for (region, id) in ids {
        loop {
            let r = call(conn, |mut c| {
                let operation_id = id.clone();
                async move { c.get_operation(pb::GetOperationRequest { operation_id }).await }
            })
            .await?;
            let op = r.operation.context("operation missing")?;
            if op.state == pb::TaskState::Succeeded as i32 {
                let msg = op
                    .tasks
                    .first()
                    .and_then(|t| t.result.as_ref())
                    .map(|r| r.message.clone())
                    .unwrap_or_default();
                replies.push(format!("{region}: {msg:?}"));
                break;
            }
            if op.state == pb::TaskState::Failed as i32 {
                bail!("task in {region} failed: {}", op.summary);
            }
            if Instant::now() > deadline {
                bail!("task in {region} did not finish within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(replies.join(", "))
}

async fn attest(conn: &ConnOpts, image: &str) -> Result<String> {
    let req = pb::CreateAttestationRequest {
        image: image.into(),
        checks: [("tests".to_string(), "passed".to_string())].into(),
    };
    let r = call(conn, |mut c| {
        let req = req.clone();
        async move { c.create_attestation(req).await }
    })
    .await?;
    Ok(format!("committed at log index {}", r.log_index))
}

pub async fn run(output: Output) -> Result<ExitCode> {
    cutover_shared::telemetry::init_tracing(cutover_shared::telemetry::LogFormat::Human);
    let started = Instant::now();
    let mut sys = DevSystem::start(None, DEV_REGIONS).await?;
    let conn = ConnOpts {
        addr: sys.addrs.clone(),
        ca: Some(sys.pki.ca.clone()),
        cert: Some(sys.pki.operator.cert.clone()),
        key: Some(sys.pki.operator.key.clone()),
        server_name: None,
        output,
    };
    let mut steps: Vec<Step> = Vec::new();
    macro_rules! step {
        ($name:expr, $fut:expr) => {{
            let t = Instant::now();
            let r: Result<String> = $fut.await;
            let ok = r.is_ok();
            steps.push(Step {
                name: $name.to_string(),
                ok,
                millis: t.elapsed().as_millis(),
                detail: r.unwrap_or_else(|e| format!("{e:#}")),
            });
            ok
        }};
    }

    let mut all_ok = step!("cluster forms, agents register", async {
        sys.wait_ready(Duration::from_secs(30)).await?;
        Ok(format!(
            "leader node {}, {} agents up",
            sys.any_node().consensus().status().leader.unwrap_or(0),
            DEV_REGIONS.len()
        ))
    });
    all_ok &= all_ok && step!("echo task in every region", echo_everywhere(&conn, "hello"));
    all_ok &= all_ok
        && step!(
            "replicated write (attestation)",
            attest(&conn, "registry.example/demo:v1")
        );
    let mut failover_ms = 0;
    if all_ok {
        let leader = sys.leader_index().context("no leader")?;
        let t = Instant::now();
        sys.stop_node(leader).await;
        all_ok &= step!(
            format!("leader (node {}) lost: first write on the new leader", leader + 1),
            async {
                let d = attest(&conn, "registry.example/demo:v2").await?;
                failover_ms = t.elapsed().as_millis();
                Ok(format!("{d}, {failover_ms} ms after the leader stopped"))
            }
        );
        all_ok &= all_ok
            && step!("agents follow the new leader: echo in every region", async {
                sys.wait_ready(Duration::from_secs(30)).await?;
                echo_everywhere(&conn, "hello again").await
            });
    }
    let total = started.elapsed();
    sys.shutdown().await;

    if output == Output::Json {
        let report = json!({
            "ok": all_ok,
            "total_ms": total.as_millis(),
            "failover_ms": failover_ms,
            "steps": steps.iter().map(|s| json!({"step": s.name, "ok": s.ok, "ms": s.millis, "detail": s.detail})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "cutover demo: 3 coordinators, agents in {}",
            DEV_REGIONS.iter().map(|r| r.0).collect::<Vec<_>>().join(", ")
        );
        for s in &steps {
            println!(
                "  [{}] {:<58} {:>6} ms  {}",
                if s.ok { " ok " } else { "FAIL" },
                s.name,
                s.millis,
                s.detail
            );
        }
        println!(
            "{} in {:.1} s",
            if all_ok { "all expectations held" } else { "DEMO FAILED" },
            total.as_secs_f64()
        );
    }
    Ok(if all_ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
