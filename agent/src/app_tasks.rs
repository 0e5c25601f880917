//! App tasks (`app.deploy`, `app.gates`, `app.switch`, `app.bake`,
//! `app.canary`, `app.analysis`, `app.maintenance`): what the
//! coordinator's orchestrator asks of this agent for one app. Drivers are
//! built once per app definition and kept, because the local driver owns
//! processes and routers.

use std::collections::HashMap;
use std::sync::Arc;

use cutover_shared::analysis::{AnalysisReport, AnalysisStage, MetricCheck, MetricProvider, QueryContext};
use cutover_shared::app::{AppClusterStatus, AppSpec, Color, validate_image_ref};
use cutover_shared::domain::{TaskResult, TaskSpec};
use cutover_shared::task::outputs::AppOutputs;
use cutover_shared::task::{self, TaskKind, TaskParams};
use tokio::sync::Mutex;

use crate::drivers::{DriverContext, DriverError, PlatformDriver, driver_for};
use crate::{analysis, gates};

/// Task kinds handled here.
pub const KINDS: &[TaskKind] = &[
    TaskKind::AppDeploy,
    TaskKind::AppGates,
    TaskKind::AppSwitch,
    TaskKind::AppBake,
    TaskKind::AppCanary,
    TaskKind::AppAnalysis,
    TaskKind::AppMaintenance,
];

/// How often a bake probes the serving color.
const BAKE_PROBE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

struct Entry {
    /// This cluster's driver settings (JSON of the app's `AppCluster` here):
    /// the only part of a definition a driver depends on.
    settings: String,
    driver: Arc<dyn PlatformDriver>,
}

/// The agent's apps and their drivers.
pub struct AppRuntime {
    ctx: DriverContext,
    /// Held only to look up or insert, never across an `.await`: status
    /// polling and the session's heartbeats must not wait for a driver
    /// that is being built (a router waiting for its address, a cluster
    /// API that is slow to answer).
    drivers: std::sync::Mutex<HashMap<String, Entry>>,
    /// Serializes building drivers (and closing the ones they replace).
    build: Mutex<()>,
    /// The region's Prometheus, for the apps' `prometheus` checks.
    prometheus: Option<String>,
}

impl AppRuntime {
    pub fn new(ctx: DriverContext) -> Self {
        Self {
            ctx,
            drivers: Default::default(),
            build: Mutex::new(()),
            prometheus: None,
        }
    }

    /// Queries `url` (the agent's `prometheus_url`) for `prometheus` checks.
    pub fn with_prometheus(mut self, url: Option<String>) -> Self {
        self.prometheus = url;
        self
    }

    /// Where the checks of `color` look, with `address` its way in.
    fn analysis_target(
        &self,
        spec: &AppSpec,
        status: &AppClusterStatus,
        color: Color,
        address: String,
    ) -> analysis::Target {
        analysis::Target {
            address,
            ctx: QueryContext {
                app: spec.name.clone(),
                region: self.ctx.cluster.region.clone(),
                cluster: self.ctx.cluster.cluster.clone(),
                color: color.to_string(),
                image: status
                    .colors
                    .iter()
                    .find(|c| c.color == color)
                    .map(|c| c.image.clone())
                    .unwrap_or_default(),
                interval_secs: 0,
            },
            prometheus: self.prometheus.clone(),
        }
    }

    fn cached(&self, app: &str, settings: &str) -> Option<Arc<dyn PlatformDriver>> {
        let drivers = self.drivers.lock().expect("drivers");
        drivers
            .get(app)
            .filter(|e| e.settings == settings)
            .map(|e| e.driver.clone())
    }

    /// The driver for `spec`. A re-applied definition that leaves this
    /// cluster's driver settings alone (a new bake, new probes) keeps the
    /// driver, its processes and its routers; new settings close the old
    /// driver first, so the new one can bind the same addresses.
    pub(crate) async fn driver(&self, spec: &AppSpec) -> Result<Arc<dyn PlatformDriver>, DriverError> {
        let settings = serde_json::to_string(&spec.cluster(&self.ctx.cluster)).unwrap_or_default();
        let driver = match self.cached(&spec.name, &settings) {
            Some(d) => d,
            None => {
                let _building = self.build.lock().await;
                match self.cached(&spec.name, &settings) {
                    Some(d) => d,
                    None => {
                        let old = self.drivers.lock().expect("drivers").remove(&spec.name);
                        if let Some(old) = old {
                            tracing::info!(app = %spec.name, "driver settings changed: closing the old driver");
                            old.driver.close().await;
                        }
                        let driver = driver_for(spec, &self.ctx).await?;
                        self.drivers.lock().expect("drivers").insert(
                            spec.name.clone(),
                            Entry {
                                settings,
                                driver: driver.clone(),
                            },
                        );
                        driver
                    }
                }
            }
        };
        // Remembered so that a restarted agent re-adopts the app at once
        // (routers listening, status reported) instead of at its next task.
        let dir = self.ctx.data_dir.join("apps").join(&spec.name);
        let json = serde_json::to_string(spec).unwrap_or_default();
        let path = dir.join("spec.json");
        if std::fs::read_to_string(&path).ok().as_deref() != Some(json.as_str())
            && let Err(e) = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, &json))
        {
            tracing::warn!(app = %spec.name, "cannot record the app definition: {e}");
        }
        Ok(driver)
    }

    /// Re-opens the driver of every app this agent ran before it restarted.
    pub async fn readopt(&self) {
        let Ok(apps) = std::fs::read_dir(self.ctx.data_dir.join("apps")) else {
            return;
        };
        for entry in apps.flatten() {
            let Ok(json) = std::fs::read_to_string(entry.path().join("spec.json")) else {
                continue;
            };
            match serde_json::from_str::<AppSpec>(&json) {
                Ok(spec) => match self.driver(&spec).await {
                    Ok(_) => tracing::info!(app = %spec.name, "re-adopted"),
                    Err(e) => tracing::warn!(app = %spec.name, "cannot re-adopt: {e}"),
                },
                Err(e) => tracing::warn!(path = %entry.path().display(), "unreadable app definition: {e}"),
            }
        }
    }

    /// The current status of every app this agent has a driver for.
    pub async fn statuses(&self) -> Vec<(String, AppClusterStatus)> {
        let drivers: Vec<(String, Arc<dyn PlatformDriver>)> = self
            .drivers
            .lock()
            .expect("drivers")
            .iter()
            .map(|(k, e)| (k.clone(), e.driver.clone()))
            .collect();
        let mut out = Vec::new();
        for (name, d) in drivers {
            if let Ok(s) = d.status().await {
                out.push((name, s));
            }
        }
        out
    }

    /// Executes one app task.
    pub async fn execute(&self, task: &TaskSpec, progress: &(dyn Fn(String) + Send + Sync)) -> TaskResult {
        let mut outputs = AppOutputs::default();
        let result = self.run(task, progress, &mut outputs).await;
        let (success, message) = match result {
            Ok(m) => (true, m),
            Err(e) => {
                let mut m = e.message;
                if !e.diagnostics.is_empty() {
                    m.push_str("\n  ");
                    m.push_str(&e.diagnostics.join("\n  "));
                    outputs.diagnostics = e.diagnostics;
                }
                (false, m)
            }
        };
        TaskResult::finished(&task.task_id, success, message, outputs.to_wire())
    }

    async fn run(
        &self,
        task: &TaskSpec,
        progress: &(dyn Fn(String) + Send + Sync),
        outputs: &mut AppOutputs,
    ) -> Result<String, DriverError> {
        let params = TaskParams::from_wire(&task.kind, &task.params).map_err(|e| DriverError::new(e.to_string()))?;
        let spec = task::attached_spec(&task.params)
            .map_err(|e| DriverError::new(format!("task has no valid app spec: {e}")))?;
        spec.validate().map_err(|e| DriverError::new(e.to_string()))?;
        // Like the driver's commands, an analysis job is refused before
        // anything of the app starts (its deploy is the first task).
        for (i, c) in spec.analysis.iter().enumerate() {
            let program = c.command.first().map(String::as_str).unwrap_or_default();
            if c.provider == MetricProvider::Job && !self.ctx.policy.allows_job(program) {
                let allowed = &self.ctx.policy.job_commands;
                return Err(DriverError::new(format!(
                    "app {}: this agent may not run {program:?} (analysis[{i}].command); its [drivers] job_commands allow {}",
                    spec.name,
                    if allowed.is_empty() {
                        "nothing".to_owned()
                    } else {
                        allowed.join(", ")
                    }
                )));
            }
        }
        let driver = self.driver(&spec).await?;
        let before = driver.status().await?;
        match params {
            TaskParams::AppDeploy { image, .. } => {
                let image = image.as_str();
                validate_image_ref(image).map_err(|e| DriverError::new(e.to_string()))?;
                let color = before.active.map_or(Color::Blue, Color::other);
                progress(format!("deploying {image} to {color}"));
                driver.deploy(color, image, progress).await?;
                let after = driver.status().await?;
                outputs.color = Some(color);
                outputs.status = Some(after.clone());
                Ok(format!("{image} deployed to {color}"))
            }
            TaskParams::AppGates { color, .. } => {
                // The color under test: the one a deploy just wrote to, or
                // else the inactive one.
                let color = color.or_else(|| before.active.map(Color::other));
                let deployed = color.filter(|c| before.colors.iter().any(|s| s.color == *c && !s.image.is_empty()));
                let Some(color) = deployed else {
                    return Err(DriverError::new("no inactive color is deployed to check"));
                };
                // A first deploy is already the active color: check it where
                // it serves; otherwise through the preview address.
                let target = if before.active == Some(color) {
                    driver.service_address().await?
                } else {
                    driver.preview_address().await?
                };
                progress(format!("running health gates against {target}"));
                let report = gates::run_gates(&spec, &target).await;
                outputs.report = Some(serde_json::to_string(&report).unwrap_or_default());
                outputs.status = Some(before.clone());
                let mut text = report.lines();
                let checks = stage_checks(&spec, AnalysisStage::Gates);
                // Telemetry is judged only once the probes passed: a color
                // that does not answer has nothing to measure.
                let analysis = if report.passed && !checks.is_empty() {
                    let t = self.analysis_target(&spec, &before, color, target.clone());
                    progress(format!("analysis: {} checks against {target} under load", checks.len()));
                    let load = gates::drive_load(&spec.load, &target);
                    let r = analysis::run(&checks, &t, progress).await;
                    load.abort();
                    record(outputs, &r, &mut text);
                    Some(r)
                } else {
                    None
                };
                if report.passed && analysis.as_ref().is_none_or(|a| a.passed) {
                    Ok(format!("gates passed\n  {text}"))
                } else {
                    Err(DriverError::new(format!("gates failed\n  {text}")))
                }
            }
            TaskParams::AppSwitch { to, .. } => {
                // The coordinator names the color, so running this twice
                // converges. Only tasks from logs written before colors were
                // named leave it to be resolved here.
                let to = match to {
                    Some(c) => c,
                    None => before
                        .active
                        .map(Color::other)
                        .ok_or_else(|| DriverError::new("nothing is deployed yet; nothing to switch"))?,
                };
                if before.active == Some(to) {
                    outputs.status = Some(before.clone());
                    return Ok(format!("{to} is already active"));
                }
                let target = before.colors.iter().find(|c| c.color == to);
                if !target.is_some_and(|c| !c.image.is_empty() && c.healthy) {
                    return Err(DriverError::new(format!(
                        "{to} is not deployed and healthy; refusing to switch to it"
                    )));
                }
                driver.switch(to).await?;
                let after = driver.status().await?;
                outputs.status = Some(after.clone());
                if let Some(delay) = spec.scale_down_delay_secs {
                    let old = to.other();
                    let d = driver.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(std::time::Duration::from_secs(delay)).await;
                        if let Err(e) = d.scale_down(old).await {
                            tracing::warn!("scale-down of {old}: {e}");
                        }
                    });
                }
                Ok(format!("switched to {to}"))
            }
            TaskParams::AppBake { seconds: secs, .. } => {
                // Watch the serving color for a while after a switch: its
                // health probes must keep passing, it must stay up, and the
                // bake's metric checks must pass under its real traffic.
                let target = driver.service_address().await?;
                let Some(serving) = before.active else {
                    return Err(DriverError::new("nothing serves yet; nothing to bake"));
                };
                progress(format!("baking for {secs} s: probing {target}"));
                let w = self
                    .watch(driver.as_ref(), &spec, &before, serving, &target, secs, progress)
                    .await?;
                let mut text = String::new();
                if let Some(r) = &w.analysis {
                    record(outputs, r, &mut text);
                }
                if let Some(why) = w.failure {
                    return Err(DriverError::new(format!("bake failed after {} s: {why}{text}", w.secs)));
                }
                outputs.status = Some(driver.status().await?);
                Ok(format!("baked {} s, {} probe rounds passed{text}", w.secs, w.rounds))
            }
            TaskParams::AppCanary {
                color,
                weight,
                pause_secs,
                compensate,
                ..
            } => {
                let color = match color {
                    Some(c) => c,
                    None => before
                        .active
                        .map(Color::other)
                        .ok_or_else(|| DriverError::new("nothing is deployed yet; no canary to run"))?,
                };
                if before.active == Some(color) && weight > 0 {
                    // A first deploy serves at once: there is nothing to
                    // split (as a switch to the active color converges).
                    outputs.status = Some(before.clone());
                    return Ok(format!("{color} already takes all traffic; no canary step"));
                }
                driver.set_canary(color, weight).await?;
                if weight == 0 || compensate {
                    outputs.status = Some(driver.status().await?);
                    return Ok(format!("canary: {color} takes no traffic"));
                }
                // Judged where only the canary answers: its probes and its
                // own metrics, under its share of the real traffic.
                let target = driver.preview_address().await?;
                progress(format!(
                    "canary: {weight}% of traffic to {color}; judging it at {target} for at least {pause_secs} s"
                ));
                let w = self
                    .watch(driver.as_ref(), &spec, &before, color, &target, pause_secs, progress)
                    .await?;
                let mut text = String::new();
                if let Some(r) = &w.analysis {
                    record(outputs, r, &mut text);
                }
                if let Some(why) = w.failure {
                    // The failing step takes no more traffic, at once; the
                    // coordinator's compensation sets 0 again to be sure.
                    let back = match driver.set_canary(color, 0).await {
                        Ok(()) => format!("{color} set back to 0%"),
                        Err(e) => format!("setting {color} back to 0% failed: {e}"),
                    };
                    outputs.status = driver.status().await.ok();
                    return Err(DriverError::new(format!(
                        "canary at {weight}% failed after {} s: {why}; {back}{text}",
                        w.secs
                    )));
                }
                outputs.status = Some(driver.status().await?);
                Ok(format!(
                    "canary at {weight}%: {color} held {} s, {} probe rounds passed{text}",
                    w.secs, w.rounds
                ))
            }
            TaskParams::AppAnalysis { .. } => {
                // Every check, whatever its stage, against the color that
                // serves, under its real traffic: nothing is sent to it.
                let Some(color) = before.active else {
                    return Err(DriverError::new("nothing serves yet; nothing to analyse"));
                };
                let target = driver.service_address().await?;
                progress(format!(
                    "analysis: {} checks against {color} at {target}",
                    spec.analysis.len()
                ));
                let t = self.analysis_target(&spec, &before, color, target);
                let report = analysis::run(&spec.analysis, &t, progress).await;
                let mut text = String::new();
                record(outputs, &report, &mut text);
                outputs.status = Some(before.clone());
                if report.passed {
                    Ok(format!("analysis of {color} passed{text}"))
                } else {
                    Err(DriverError::new(format!("analysis of {color} failed{text}")))
                }
            }
            TaskParams::AppMaintenance { on, .. } => {
                driver.maintenance(on, progress).await?;
                outputs.status = Some(driver.status().await?);
                Ok(if on {
                    "in maintenance: neither color takes traffic".to_owned()
                } else {
                    "out of maintenance".to_owned()
                })
            }
            other => Err(DriverError::new(format!("{} is not an app task", other.kind()))),
        }
    }
}

/// What watching a color found ([`AppRuntime::watch`]).
struct Watched {
    /// Why it failed, if it did.
    failure: Option<String>,
    analysis: Option<AnalysisReport>,
    rounds: u32,
    secs: u64,
}

impl AppRuntime {
    /// Watches `color`, reached at `target`, for `secs` and until the
    /// bake's metric checks finish: its probes must keep passing, it must
    /// stay up, and the checks must pass. A bake watches the serving color
    /// after a switch; a canary step the new color under its share.
    #[allow(clippy::too_many_arguments)]
    async fn watch(
        &self,
        driver: &dyn PlatformDriver,
        spec: &AppSpec,
        before: &AppClusterStatus,
        color: Color,
        target: &str,
        secs: u64,
        progress: &(dyn Fn(String) + Send + Sync),
    ) -> Result<Watched, DriverError> {
        let started = std::time::Instant::now();
        let until = started + std::time::Duration::from_secs(secs);
        let checks = stage_checks(spec, AnalysisStage::Bake);
        let analysis_run = async {
            if checks.is_empty() {
                return None;
            }
            let t = self.analysis_target(spec, before, color, target.to_owned());
            Some(analysis::run(&checks, &t, progress).await)
        };
        let mut analysis_run = std::pin::pin!(analysis_run);
        let mut analysis: Option<Option<AnalysisReport>> = None;
        let mut rounds = 0u32;
        let failure = loop {
            rounds += 1;
            let failed = gates::failing_probes(spec, target).await;
            if let Some(f) = failed.first() {
                break Some(format!("{} {}", f.name, f.detail));
            }
            let st = driver.status().await?;
            if !st.colors.iter().any(|c| c.color == color && c.healthy) {
                break Some(format!("{color} went unhealthy"));
            }
            if let Some(Some(r)) = &analysis
                && !r.passed
            {
                break Some("analysis failed".to_owned());
            }
            if std::time::Instant::now() >= until && analysis.is_some() {
                break None;
            }
            tokio::select! {
                r = &mut analysis_run, if analysis.is_none() => analysis = Some(r),
                _ = tokio::time::sleep(BAKE_PROBE_INTERVAL) => {}
            }
        };
        Ok(Watched {
            failure,
            analysis: analysis.flatten(),
            rounds,
            secs: started.elapsed().as_secs(),
        })
    }
}

/// The app's checks of one stage.
fn stage_checks(spec: &AppSpec, stage: AnalysisStage) -> Vec<MetricCheck> {
    spec.analysis.iter().filter(|c| c.stage == stage).cloned().collect()
}

/// Keeps an analysis run in the task's outputs and adds its lines to the
/// task message (`text`, one indented line per check).
fn record(outputs: &mut AppOutputs, report: &AnalysisReport, text: &mut String) {
    outputs.analysis = Some(serde_json::to_string(report).unwrap_or_default());
    for line in report.lines() {
        text.push_str("\n  ");
        text.push_str(&line);
    }
}
