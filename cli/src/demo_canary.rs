//! The demo's canary chapter: `sample` becomes a canary app (weights 5,
//! 25, 50, then the switch; the built-in success-rate check judging each
//! step), and a release answering 3% of its requests with 500 is deployed
//! under steady load on us-east. The gates cannot see it (the probes pass;
//! telemetry is the analysis's job), 5% of the traffic is too little to
//! meet one of its errors, and at 25% the check measures the error rate
//! and fails the step: the weight goes back to 0 at once, the other
//! regions never see the release, and the definition is put back.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use cutover_shared::analysis::AnalysisReport;
use cutover_shared::load::SteadyLoad;
use cutover_shared::proto as pb;
use cutover_shared::task::outputs::AppOutputs;

use crate::client::{ConnOpts, call};
use crate::demo::{TaskTime, all_serve, cutover, task_times};

/// The release the canary catches.
const BROKEN: &str = "sample:v5-errors-3";

async fn apply(conn: &ConnOpts, app: pb::App) -> Result<()> {
    call(conn, |mut c| {
        let app = app.clone();
        async move { c.apply_app(pb::ApplyAppRequest { app: Some(app) }).await }
    })
    .await?;
    Ok(())
}

/// Runs the chapter; `services` is (region, service address) in wave order.
pub(crate) async fn run(conn: &ConnOpts, services: &[(String, String)]) -> Result<(String, Vec<TaskTime>)> {
    let before = call(conn, |mut c| async move {
        c.get_app(pb::GetAppRequest { name: "sample".into() }).await
    })
    .await?
    .app
    .context("app sample missing")?;
    let serving = crate::demo::serving(&services[0].1).await?;
    let serving = serving.strip_prefix("version ").unwrap_or(&serving).to_owned();
    // The canary is judged under real traffic, so the gates' load probe
    // and their checks step aside: what the probes see, the release passes.
    let mut canary = before.clone();
    canary.strategy = pb::TrafficStrategy::Canary as i32;
    canary.canary = Some(pb::CanarySteps {
        weights: vec![5, 25, 50, 100],
        pause_secs: 0,
    });
    if let Some(load) = canary.load.as_mut() {
        load.disabled = true;
    }
    // Flagger's built-in: at least 99% of the canary's requests succeed,
    // measured from its own metrics twice, a second apart, at each step.
    canary.analysis = vec![pb::MetricCheck {
        name: "success-rate".into(),
        provider: pb::MetricProvider::RequestSuccessRate as i32,
        condition: "result >= 99".into(),
        stage: pb::AnalysisStage::Bake as i32,
        interval_secs: Some(1),
        count: Some(2),
        ..Default::default()
    }];
    apply(conn, canary).await?;
    // 100 requests a second at us-east's own service address.
    let load = SteadyLoad::start(&services[0].1, 2, Duration::from_millis(20));
    let op = cutover(conn, BROKEN, pb::Strategy::Waves).await;
    let (ok, failed) = load.stop().await;
    apply(conn, before).await?;
    let op = op?;
    if op.state != pb::TaskState::Failed as i32 {
        bail!("the canary of {BROKEN} was not caught: {}", op.summary);
    }
    // Each canary step: (region, weight, succeeded, its analysis).
    let mut steps = vec![];
    for t in &op.tasks {
        let Some(spec) = &t.task else { continue };
        if spec.kind != "app.canary" || spec.params.contains_key("compensate") {
            continue;
        }
        let region = spec.target.as_ref().map(|c| c.region.clone()).unwrap_or_default();
        let weight = spec.params.get("weight").cloned().unwrap_or_default();
        let result = t.result.clone().unwrap_or_default();
        let outputs = AppOutputs::from_wire(&result.outputs.into_iter().collect());
        let report: Option<AnalysisReport> = outputs.analysis.and_then(|a| serde_json::from_str(&a).ok());
        steps.push((region, weight, result.success, report));
    }
    let shown: Vec<String> = steps
        .iter()
        .map(|(region, weight, ok, report)| {
            format!(
                "{region} at {weight}%: {}{}",
                if *ok { "passed" } else { "FAILED" },
                report
                    .as_ref()
                    .map(|r| format!(" ({})", r.lines().join("; ")))
                    .unwrap_or_default()
            )
        })
        .collect();
    let first = &services[0].0;
    let caught = steps.iter().find(|(_, _, ok, _)| !ok);
    match caught {
        Some((region, weight, _, _)) if region == first && weight == "25" => {}
        _ => bail!("expected the 25% step in {first} to fail: {}", shown.join(" | ")),
    }
    if steps.iter().any(|(region, ..)| region != first) {
        bail!("the canary reached another region: {}", shown.join(" | "));
    }
    if !op.summary.contains("canary weight back to 0") && !op.summary.contains("set back to 0%") {
        bail!("the weight was not set back: {}", op.summary);
    }
    all_serve(services, &serving).await?;
    Ok((
        format!(
            "{}; {ok} requests answered 200 and {failed} failed in {first} during the canary; every region serves {serving}",
            shown.join(" | ")
        ),
        task_times(&op),
    ))
}
