//! Analysis from real telemetry: a real Prometheus per region scrapes the
//! sample app's colors, and the agents' `prometheus` checks query it during
//! the bake. A release with 3% errors passes the health probes but fails
//! the error-rate check, and every region it was switched to rolls back;
//! `analysis run` judges what serves now; a query with no data follows its
//! own inconclusive limit; a job the agent does not allow is refused before
//! anything starts.

use std::time::Duration;

use cutover_shared::analysis::{AnalysisReport, AnalysisStage, MetricCheck, MetricProvider, Outcome};
use cutover_shared::app::AppSpec;
use cutover_shared::domain::{Operation, TaskState};
use cutover_shared::proto as pb;
use cutover_shared::task::outputs::AppOutputs;
use cutover_tests::load::SteadyLoad;
use cutover_tests::prometheus::Prometheus;
use cutover_tests::{TestCluster, sample_app_spec, serving};

const T: Duration = Duration::from_secs(90);
const REGIONS: &[(&str, &str)] = &[("us-east", "us-east-1"), ("eu-west", "eu-west-1")];

/// The seed's error-rate rule as a check: 5xx responses of the color under
/// test over all its responses, below 1%. (`or vector(0)`: a release with
/// no 5xx at all has no such series, which would otherwise read as no data.)
fn error_rate() -> MetricCheck {
    MetricCheck {
        name: "error-rate".into(),
        provider: MetricProvider::Prometheus,
        query: Some(
            "(sum(rate(http_requests_total{app=\"{{app}}\",color=\"{{color}}\",code=~\"5..\"}[{{interval}}])) or vector(0)) \
             / sum(rate(http_requests_total{app=\"{{app}}\",color=\"{{color}}\"}[{{interval}}]))"
                .into(),
        ),
        percentile: None,
        metrics_path: None,
        url: None,
        command: vec![],
        timeout_secs: None,
        retries: None,
        condition: Some("result < 0.01".parse().unwrap()),
        stage: AnalysisStage::Bake,
        interval_secs: 3,
        count: 3,
        failure_limit: 0,
        // Right after a switch the new series may not have two samples yet.
        inconclusive_limit: 1,
    }
}

struct World {
    c: TestCluster,
    leader: usize,
    spec: AppSpec,
    _prometheus: Vec<Prometheus>,
}

/// A 3-node cluster, one agent and one Prometheus per region, and app
/// `shop` (no analysis yet) serving `sample:v1` everywhere.
async fn world(regions: &[(&str, &str)]) -> World {
    let mut c = TestCluster::builder().nodes(3).regions(regions).start().await.unwrap();
    let leader = c.wait_leader(T).await.unwrap();
    let mut spec = sample_app_spec("shop", regions);
    // The probes judge health, not the error rate: telemetry does that.
    spec.load.enabled = false;
    spec.bake_secs = 0;
    let mut prometheus = Vec::new();
    for (i, cluster) in spec.clusters.iter().enumerate() {
        let local = cluster.local.as_ref().unwrap();
        let p = Prometheus::start(&[local.listen.clone(), local.preview_listen.clone()])
            .await
            .unwrap();
        let mut cfg = c.agent_config(i);
        cfg.prometheus_url = Some(p.url.clone());
        c.start_agent_with(i, cfg).unwrap();
        prometheus.push(p);
    }
    c.wait_state(leader, T, "agents up", |s| s.agents.len() == regions.len())
        .await
        .unwrap();
    apply(&c, leader, &spec).await;
    let op = deploy(&c, leader, "sample:v1").await;
    assert_eq!(op.state, TaskState::Succeeded, "{}", op.summary);
    World {
        c,
        leader,
        spec,
        _prometheus: prometheus,
    }
}

async fn apply(c: &TestCluster, leader: usize, spec: &AppSpec) {
    c.operator(leader)
        .apply_app(pb::ApplyAppRequest {
            app: Some(spec.clone().into()),
        })
        .await
        .unwrap();
}

/// An atomic cutover of `image` in every region, run to its end.
async fn deploy(c: &TestCluster, leader: usize, image: &str) -> Operation {
    let req = pb::DeployRequest {
        app: "shop".into(),
        image: image.into(),
        strategy: pb::Strategy::Atomic as i32,
        ..Default::default()
    };
    c.deploy_and_wait(leader, req, T).await.unwrap()
}

fn steps(op: &Operation) -> Vec<String> {
    cutover_tests::step_lines(op)
}

/// The analysis runs recorded in `op`'s bake results.
fn bake_analyses(op: &Operation) -> Vec<(String, AnalysisReport)> {
    op.tasks
        .iter()
        .filter(|t| t.spec.kind == "app.bake")
        .filter_map(|t| {
            let r = t.result.as_ref()?;
            let a = AppOutputs::from_wire(&r.outputs).analysis?;
            Some((t.spec.target.region.clone(), serde_json::from_str(&a).unwrap()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_percent_errors_fail_the_prometheus_error_rate_and_every_switched_region_rolls_back() {
    let mut w = world(REGIONS).await;
    let addrs: Vec<String> = w
        .spec
        .clusters
        .iter()
        .map(|c| c.local.as_ref().unwrap().listen.clone())
        .collect();
    w.spec.analysis = vec![error_rate()];
    apply(&w.c, w.leader, &w.spec).await;
    // Steady traffic on every region's service address, as users would send.
    let loads: Vec<SteadyLoad> = addrs
        .iter()
        .map(|a| SteadyLoad::start(a, 4, Duration::from_millis(10)))
        .collect();

    // A healthy release passes its analysis in both regions.
    let op = deploy(&w.c, w.leader, "sample:v2").await;
    assert_eq!(op.state, TaskState::Succeeded, "{:#?}", steps(&op));
    let analyses = bake_analyses(&op);
    assert_eq!(analyses.len(), 2, "{:#?}", steps(&op));
    for (region, a) in &analyses {
        assert!(a.passed, "{region}: {a:#?}");
        assert!(
            a.checks[0].count(Outcome::Passed) >= 2,
            "{region}: real values were judged: {a:#?}"
        );
    }

    // 3% errors: the health probes pass, the bake's error rate does not.
    let op = deploy(&w.c, w.leader, "sample:v3-errors-3").await;
    assert_eq!(op.state, TaskState::Failed, "{:#?}", steps(&op));
    assert!(
        op.tasks
            .iter()
            .filter(|t| t.spec.kind == "app.gates")
            .all(|t| t.state == TaskState::Succeeded),
        "the probes pass: {:#?}",
        steps(&op)
    );
    assert_eq!(
        op.tasks
            .iter()
            .filter(|t| t.spec.kind == "app.switch" && t.spec.params.get("compensate").is_none_or(|c| c != "true"))
            .count(),
        2,
        "both regions were switched: {:#?}",
        steps(&op)
    );
    for r in ["us-east/us-east-1 switched back", "eu-west/eu-west-1 switched back"] {
        assert!(op.summary.contains(r), "{r}: {}", op.summary);
    }
    for a in &addrs {
        assert_eq!(serving(a).await, "version sample:v2", "every region back on v2");
    }
    // The recorded values show the failing samples: about 3%.
    let failed: Vec<f64> = bake_analyses(&op)
        .iter()
        .flat_map(|(_, a)| a.checks.iter().flat_map(|c| c.measurements.iter()))
        .filter(|m| m.outcome == Outcome::Failed)
        .filter_map(|m| m.value)
        .collect();
    assert!(!failed.is_empty(), "{:#?}", steps(&op));
    for v in &failed {
        assert!((0.015..0.06).contains(v), "error rate {v} is not about 3%");
    }
    let bake = op
        .tasks
        .iter()
        .find(|t| t.spec.kind == "app.bake" && t.state == TaskState::Failed)
        .expect("a failed bake");
    let msg = &bake.result.as_ref().unwrap().message;
    assert!(msg.contains("FAIL error-rate [prometheus] (result < 0.01): "), "{msg}");
    // `cutover analysis run`: the same check now, against what serves
    // (v2 again), in one region, its values in the step's result.
    let id =
        w.c.operator(w.leader)
            .run_analysis(pb::RunAnalysisRequest {
                app: "shop".into(),
                region: "eu-west".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .operation_id;
    w.c.wait_state(w.leader, T, "the analysis run to finish", |s| {
        s.operations[&id].state.is_finished()
    })
    .await
    .unwrap();
    let op = w.c.node(w.leader).consensus().read(|s| s.operations[&id].clone());
    assert_eq!(op.state, TaskState::Succeeded, "{:#?}", steps(&op));
    assert_eq!(op.tasks.len(), 1, "{:#?}", steps(&op));
    assert_eq!(
        (op.tasks[0].spec.kind.as_str(), op.tasks[0].spec.target.region.as_str()),
        ("app.analysis", "eu-west")
    );
    let r = op.tasks[0].result.as_ref().unwrap();
    assert!(
        r.message.contains("pass error-rate [prometheus] (result < 0.01): "),
        "{}",
        r.message
    );
    let report: AnalysisReport = serde_json::from_str(&AppOutputs::from_wire(&r.outputs).analysis.unwrap()).unwrap();
    assert!(report.checks[0].count(Outcome::Passed) >= 2, "{report:#?}");
    // The failed cutover's message, as `operations get` prints it.
    eprintln!("failed bake: {msg}\nanalysis run: {}", r.message);
    for l in loads {
        l.stop().await;
    }
    w.c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_query_without_data_is_inconclusive_within_its_own_limit() {
    let mut w = world(&REGIONS[..1]).await;
    let no_data = MetricCheck {
        name: "absent".into(),
        query: Some("sum(rate(metric_nobody_exports{app=\"{{app}}\"}[{{interval}}]))".into()),
        interval_secs: 1,
        count: 2,
        inconclusive_limit: 2,
        ..error_rate()
    };
    // Within the limit: every measurement inconclusive, the release passes.
    w.spec.analysis = vec![no_data.clone()];
    apply(&w.c, w.leader, &w.spec).await;
    let op = deploy(&w.c, w.leader, "sample:v2").await;
    assert_eq!(op.state, TaskState::Succeeded, "{:#?}", steps(&op));
    let (_, a) = &bake_analyses(&op)[0];
    assert_eq!(a.checks[0].count(Outcome::Inconclusive), 2, "{a:#?}");
    assert!(a.checks[0].measurements[0].detail.contains("no data"), "{a:#?}");

    // Over it: the second inconclusive measurement fails the bake.
    w.spec.analysis = vec![MetricCheck {
        inconclusive_limit: 1,
        ..no_data
    }];
    apply(&w.c, w.leader, &w.spec).await;
    let op = deploy(&w.c, w.leader, "sample:v3").await;
    assert_eq!(op.state, TaskState::Failed, "{:#?}", steps(&op));
    let (_, a) = &bake_analyses(&op)[0];
    assert_eq!(a.checks[0].reason, "2 inconclusive > inconclusive_limit 1", "{a:#?}");
    let service = w.spec.clusters[0].local.as_ref().unwrap().listen.clone();
    assert_eq!(serving(&service).await, "version sample:v2");

    // `analysis run` on an app without checks is refused.
    w.spec.analysis = vec![];
    apply(&w.c, w.leader, &w.spec).await;
    let e =
        w.c.operator(w.leader)
            .run_analysis(pb::RunAnalysisRequest {
                app: "shop".into(),
                region: String::new(),
            })
            .await
            .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("declares no [[analysis]] checks"), "{e}");

    // A job the agent's job_commands do not allow is refused before
    // anything of the release starts: its deploy step fails.
    w.spec.analysis = vec![MetricCheck {
        name: "zap".into(),
        provider: MetricProvider::Job,
        query: None,
        command: vec!["/usr/bin/zap-baseline.py".into(), "-t".into(), "$PREVIEW_URL".into()],
        condition: None,
        stage: AnalysisStage::Gates,
        count: 1,
        ..error_rate()
    }];
    apply(&w.c, w.leader, &w.spec).await;
    let op = deploy(&w.c, w.leader, "sample:v4").await;
    assert_eq!(op.state, TaskState::Failed, "{:#?}", steps(&op));
    assert_eq!(op.tasks.len(), 1, "nothing after the refused deploy: {:#?}", steps(&op));
    let msg = &op.tasks[0].result.as_ref().unwrap().message;
    assert!(
        msg.contains("this agent may not run \"/usr/bin/zap-baseline.py\" (analysis[0].command)"),
        "{msg}"
    );
    let status = w.c.node(w.leader).consensus().read(|s| s.app_status.clone());
    assert!(
        !format!("{status:?}").contains("sample:v4"),
        "no color runs the refused release: {status:?}"
    );
    assert_eq!(serving(&service).await, "version sample:v2");
    w.c.shutdown().await;
}
