//! App tasks (`app.deploy`, `app.gates`, `app.switch`, `app.bake`,
//! `app.maintenance`): what the
//! coordinator's orchestrator asks of this agent for one app. Drivers are
//! built once per app definition and kept, because the local driver owns
//! processes and routers.

use std::collections::HashMap;
use std::sync::Arc;

use cutover_shared::app::{AppClusterStatus, AppSpec, Color, validate_image_ref};
use cutover_shared::domain::{TaskResult, TaskSpec};
use cutover_shared::task::outputs::AppOutputs;
use cutover_shared::task::{self, TaskKind, TaskParams};
use tokio::sync::Mutex;

use crate::drivers::{DriverContext, DriverError, PlatformDriver, driver_for};
use crate::gates;

/// Task kinds handled here.
pub const KINDS: &[TaskKind] = &[
    TaskKind::AppDeploy,
    TaskKind::AppGates,
    TaskKind::AppSwitch,
    TaskKind::AppBake,
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
}

impl AppRuntime {
    pub fn new(ctx: DriverContext) -> Self {
        Self {
            ctx,
            drivers: Default::default(),
            build: Mutex::new(()),
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
                let text = report.lines();
                if report.passed {
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
                // health probes must keep passing and it must stay up.
                let target = driver.service_address().await?;
                progress(format!("baking for {secs} s: probing {target}"));
                let until = std::time::Instant::now() + std::time::Duration::from_secs(secs);
                let mut rounds = 0u32;
                loop {
                    rounds += 1;
                    let failed = gates::failing_probes(&spec, &target).await;
                    if let Some(f) = failed.first() {
                        return Err(DriverError::new(format!(
                            "bake failed after {} s: {} {}",
                            secs.saturating_sub(until.saturating_duration_since(std::time::Instant::now()).as_secs()),
                            f.name,
                            f.detail
                        )));
                    }
                    let st = driver.status().await?;
                    let serving = st.active.and_then(|a| st.colors.iter().find(|c| c.color == a));
                    if !serving.is_some_and(|c| c.healthy) {
                        return Err(DriverError::new("bake failed: the serving color went unhealthy"));
                    }
                    if std::time::Instant::now() >= until {
                        break;
                    }
                    tokio::time::sleep(BAKE_PROBE_INTERVAL).await;
                }
                outputs.status = Some(driver.status().await?);
                Ok(format!("baked {secs} s, {rounds} probe rounds passed"))
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
