//! Canary traffic: `strategy = "canary"` moves each region's traffic to
//! the new color in steps (5, 25, 50, then the switch), each step judged
//! by the bake's analysis under its share of real traffic, region by
//! region in the app's waves. Steady load through each region's service
//! address measures the split at every step from what answered; a broken
//! release is caught at a step, whose weight goes back to 0 at once.

use std::time::Duration;

use cutover_shared::analysis::MetricCheck;
use cutover_shared::app::{AppSpec, CanarySteps, TrafficStrategy};
use cutover_shared::domain::{Operation, TaskRecord, TaskState};
use cutover_shared::load::SteadyLoad;
use cutover_shared::proto as pb;
use cutover_shared::task::TaskParams;
use cutover_shared::task::outputs::AppOutputs;
use cutover_tests::{TestCluster, sample_app_spec};

const T: Duration = Duration::from_secs(120);
const REGIONS: &[(&str, &str)] = &[("us-east", "us-east-1"), ("eu-west", "eu-west-1")];
const WEIGHTS: [u32; 3] = [5, 25, 50];
/// Requests that start this soon after a step begins may still see the
/// previous weight (the agent sets it once the step reaches it).
const SETTLE_MS: i64 = 500;

fn canary_app() -> AppSpec {
    let mut spec = sample_app_spec("shop", REGIONS);
    spec.bake_secs = 1;
    // The probes judge health; the error rate is the analysis's to judge.
    spec.load.enabled = false;
    spec.strategy = TrafficStrategy::Canary;
    spec.canary = Some(CanarySteps {
        weights: vec![5, 25, 50, 100],
        pause_secs: 3,
    });
    // Flagger's built-in: at least 99% of the canary's requests succeed,
    // judged from its own metrics, twice a second apart at each step.
    spec.analysis = vec![MetricCheck {
        interval_secs: 1,
        count: 2,
        ..MetricCheck::success_rate("success-rate", 99.0)
    }];
    spec
}

struct World {
    c: TestCluster,
    leader: usize,
    spec: AppSpec,
}

/// A 3-node cluster, an agent per region, `shop` serving `sample:v1`
/// (deployed before the analysis is applied: nothing took traffic yet to
/// judge), then the canary definition applied.
async fn world() -> World {
    let mut c = TestCluster::builder().nodes(3).regions(REGIONS).start().await.unwrap();
    let leader = c.wait_leader(T).await.unwrap();
    c.start_agents(leader, T).await.unwrap();
    let spec = canary_app();
    let apply = async |spec: &AppSpec| {
        c.operator(leader)
            .apply_app(pb::ApplyAppRequest {
                app: Some(spec.clone().into()),
            })
            .await
            .unwrap();
    };
    apply(&AppSpec {
        analysis: vec![],
        ..spec.clone()
    })
    .await;
    let op = deploy(&c, leader, "sample:v1").await;
    assert_eq!(op.state, TaskState::Succeeded, "{}", op.summary);
    apply(&spec).await;
    World { c, leader, spec }
}

/// A cutover of `image` in the app's waves, run to its end.
async fn deploy(c: &TestCluster, leader: usize, image: &str) -> Operation {
    let req = pb::DeployRequest {
        app: "shop".into(),
        image: image.into(),
        ..Default::default()
    };
    c.deploy_and_wait(leader, req, T).await.unwrap()
}

impl World {
    async fn deploy(&self, image: &str) -> Operation {
        deploy(&self.c, self.leader, image).await
    }

    /// Steady load on each region's service address, in region order.
    fn load(&self) -> Vec<SteadyLoad> {
        self.spec
            .clusters
            .iter()
            .map(|c| SteadyLoad::start(&c.local.as_ref().unwrap().listen, 4, Duration::from_millis(10)))
            .collect()
    }
}

/// The forward canary steps of `op` in `region`: (weight, record).
fn canary_steps<'a>(op: &'a Operation, region: &str) -> Vec<(u32, &'a TaskRecord)> {
    op.tasks
        .iter()
        .filter(|t| t.spec.target.region == region)
        .filter_map(|t| match TaskParams::from_wire(&t.spec.kind, &t.spec.params).ok()? {
            TaskParams::AppCanary {
                weight,
                compensate: false,
                ..
            } => Some((weight, t)),
            _ => None,
        })
        .collect()
}

fn finished_at(t: &TaskRecord) -> i64 {
    t.result.as_ref().expect("a finished step").finished_at_unix_ms
}

/// Percent of the answers in `[from, to]` that came from `version`, and
/// how many answers there were.
fn share(load: &SteadyLoad, from: i64, to: i64, version: &str) -> (f64, usize) {
    let answers = load.answers_between(from, to);
    let hits = answers.iter().filter(|a| a.body.contains(version)).count();
    (100.0 * hits as f64 / answers.len().max(1) as f64, answers.len())
}

fn steps(op: &Operation) -> String {
    cutover_tests::step_lines(op)
        .iter()
        .map(|l| format!("\n  {l}"))
        .collect()
}

/// 5 → 25 → 50 → 100 in each region, wave by wave, under steady load: the
/// share that reaches the new color at each step is its weight within 3
/// points, and no request fails on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_healthy_canary_moves_traffic_in_steps_and_fails_no_request() {
    let w = world().await;
    let loads = w.load();
    let op = w.deploy("sample:v2").await;
    assert_eq!(op.state, TaskState::Succeeded, "{}{}", op.summary, steps(&op));

    for (i, (region, _)) in REGIONS.iter().enumerate() {
        let taken = canary_steps(&op, region);
        assert_eq!(
            taken.iter().map(|(w, _)| *w).collect::<Vec<_>>(),
            WEIGHTS,
            "{region}: every step in order{}",
            steps(&op)
        );
        for (weight, t) in taken {
            assert_eq!(t.state, TaskState::Succeeded);
            let (pct, n) = share(&loads[i], t.created_at_unix_ms + SETTLE_MS, finished_at(t), "v2");
            println!("{region}: weight {weight}%: {pct:.1}% of {n} requests answered by v2");
            assert!(n >= 200, "{region} at {weight}%: only {n} requests measured");
            assert!(
                (pct - f64::from(weight)).abs() <= 3.0,
                "{region} at {weight}%: {pct:.1}% of {n} requests reached the canary"
            );
            // Each step was judged, and its values recorded.
            let out = AppOutputs::from_wire(&t.result.as_ref().unwrap().outputs);
            assert!(out.analysis.is_some_and(|a| a.contains("success-rate")));
        }
        // The waves: the second region's canary began after the first
        // region's switch and bake.
        if i == 1 {
            let first_done = op
                .tasks
                .iter()
                .filter(|t| t.spec.target.region == REGIONS[0].0)
                .map(finished_at)
                .max()
                .unwrap();
            let second_began = canary_steps(&op, region)[0].1.created_at_unix_ms;
            assert!(
                second_began >= first_done,
                "eu-west's canary began before us-east finished"
            );
        }
    }
    let mut failed = 0;
    for (i, l) in loads.into_iter().enumerate() {
        let (ok, bad) = l.stop().await;
        println!("{}: {ok} requests answered 200, {bad} failed", REGIONS[i].0);
        assert!(ok > 1000, "{ok}");
        failed += bad;
    }
    assert_eq!(failed, 0, "a healthy canary fails no request");
    // Switched for good: the status reports no split left.
    let last = op.tasks.last().unwrap();
    let status = AppOutputs::from_wire(&last.result.as_ref().unwrap().outputs)
        .status
        .unwrap();
    assert_eq!(status.canary_weight, 0);
    w.c.shutdown().await;
}

/// A release answering 20% of its requests with 500 passes its probes
/// but fails the success rate at the first step that gives it traffic:
/// that step sets its weight back to 0 at once, nothing later runs, the
/// other region never sees it, and all traffic is back on v1.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_step_sets_the_weight_back_to_0_and_stops_the_canary() {
    let w = world().await;
    let loads = w.load();
    let op = w.deploy("sample:v2-errors-20").await;
    assert_eq!(op.state, TaskState::Failed, "{}{}", op.summary, steps(&op));

    let taken = canary_steps(&op, "us-east");
    let (weight, failed) = taken.last().copied().expect("a canary step ran");
    assert_eq!(failed.state, TaskState::Failed, "{}", steps(&op));
    assert!(
        taken[..taken.len() - 1]
            .iter()
            .all(|(_, t)| t.state == TaskState::Succeeded),
        "{}",
        steps(&op)
    );
    let result = failed.result.as_ref().unwrap();
    assert!(
        result.message.contains(&format!("canary at {weight}% failed")),
        "{}",
        result.message
    );
    assert!(result.message.contains("set back to 0%"), "{}", result.message);
    let out = AppOutputs::from_wire(&result.outputs);
    assert_eq!(out.status.as_ref().unwrap().canary_weight, 0);
    let report: cutover_shared::analysis::AnalysisReport = serde_json::from_str(&out.analysis.unwrap()).unwrap();
    assert!(!report.passed);
    println!("caught at {weight}%: {}", report.lines().join("; "));

    // Nothing switched, eu-west never began, and the weight went back to
    // 0 (the compensation confirms it).
    assert!(!op.tasks.iter().any(|t| t.spec.kind == "app.switch"), "{}", steps(&op));
    assert!(
        !op.tasks.iter().any(|t| t.spec.target.region == "eu-west"),
        "{}",
        steps(&op)
    );
    let compensated = op.tasks.iter().any(|t| {
        matches!(
            TaskParams::from_wire(&t.spec.kind, &t.spec.params),
            Ok(TaskParams::AppCanary {
                weight: 0,
                compensate: true,
                ..
            })
        ) && t.state == TaskState::Succeeded
    });
    assert!(compensated, "{}", steps(&op));

    // From the failure on (the agent set 0% before it reported), every
    // request in us-east went to v1: the next 200 answers say so.
    let from = finished_at(failed);
    while loads[0].answers_between(from, i64::MAX).len() < 200 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (pct, n) = share(&loads[0], from, i64::MAX, "v2");
    assert_eq!(
        pct, 0.0,
        "{pct}% of {n} requests still reached v2 after the failing step"
    );
    // Before it, at its weight, the canary did take its share.
    let (pct, n) = share(
        &loads[0],
        failed.created_at_unix_ms + SETTLE_MS,
        finished_at(failed),
        "v2",
    );
    assert!(
        n > 0 && pct > 0.0,
        "the failing step sent no traffic to v2 ({n} requests)"
    );
    for l in loads {
        l.stop().await;
    }
    w.c.shutdown().await;
}

async fn api_op(w: &World, id: &str) -> pb::Operation {
    w.c.api_operation(w.leader, id).await.unwrap()
}

async fn wait_gate(w: &World, id: &str, gate: u32) -> pb::Operation {
    w.c.wait_gate(w.leader, id, gate, T).await.unwrap()
}

/// With `--manual-promotion`, every canary step and the switch wait for
/// `cutover promote` (gates numbered in plan order: 1 before 5%, 2 before
/// 25%, ...): traffic moves only when promoted. Aborted while at 5%, the
/// weight goes back to 0 and every request goes to v1 again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn manual_promotion_gates_every_step_and_abort_takes_the_weight_back() {
    let w = world().await;
    let loads = w.load();
    let mut o = w.c.operator(w.leader);
    let id = o
        .deploy(pb::DeployRequest {
            app: "shop".into(),
            image: "sample:v2".into(),
            manual_promotion: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .operation_id;
    let kinds = |op: &pb::Operation| -> Vec<String> {
        op.tasks.iter().map(|t| t.task.as_ref().unwrap().kind.clone()).collect()
    };
    let op = wait_gate(&w, &id, 1).await;
    assert!(!kinds(&op).contains(&"app.canary".to_owned()), "{:?}", kinds(&op));
    o.promote_operation(pb::PromoteOperationRequest {
        operation_id: id.clone(),
        gate: 0,
    })
    .await
    .unwrap();
    // Gate 2 is in front of 25%: the 5% step ran and holds its weight.
    let op = wait_gate(&w, &id, 2).await;
    let canaries: Vec<&pb::TaskStatus> = op
        .tasks
        .iter()
        .filter(|t| t.task.as_ref().unwrap().kind == "app.canary")
        .collect();
    assert_eq!(canaries.len(), 1, "{:?}", kinds(&op));
    let five = canaries[0];
    assert_eq!(five.task.as_ref().unwrap().params["weight"], "5");
    let done = five.result.as_ref().unwrap();
    let status = AppOutputs::from_wire(&done.outputs.clone().into_iter().collect())
        .status
        .unwrap();
    assert_eq!(status.canary_weight, 5);
    let from = done.finished_at_unix_ms;
    while loads[0].answers_between(from, i64::MAX).len() < 200 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (pct, n) = share(&loads[0], from, i64::MAX, "v2");
    assert!(
        (pct - 5.0).abs() <= 3.0,
        "waiting at gate 2: {pct:.1}% of {n} requests reached v2"
    );

    o.abort_operation(pb::AbortOperationRequest {
        operation_id: id.clone(),
    })
    .await
    .unwrap();
    w.c.wait_state(w.leader, T, "the abort", |s| s.operations[&id].state.is_finished())
        .await
        .unwrap();
    let op = api_op(&w, &id).await;
    assert_eq!(op.state, pb::TaskState::Failed as i32);
    assert!(
        op.summary.contains("us-east/us-east-1 canary weight back to 0"),
        "{}",
        op.summary
    );
    let back = op.tasks.last().unwrap().result.as_ref().unwrap().finished_at_unix_ms;
    while loads[0].answers_between(back, i64::MAX).len() < 200 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (pct, n) = share(&loads[0], back, i64::MAX, "v2");
    assert_eq!(pct, 0.0, "{pct}% of {n} requests reached v2 after the abort");
    let mut failed = 0;
    for l in loads {
        failed += l.stop().await.1;
    }
    assert_eq!(failed, 0);
    w.c.shutdown().await;
}
