//! Platform drivers: how an agent runs the two colors of an app in its
//! cluster and moves traffic between them. One trait, one module per driver;
//! adding a driver touches this file's `driver_for` and its own module.

use std::path::PathBuf;
use std::sync::Arc;

use cutover_shared::app::{AppClusterStatus, AppSpec, Color, DriverKind};
use cutover_shared::config::DriverPolicy;
use cutover_shared::domain::{ClusterRef, quote};

pub mod kubernetes;
pub mod local;

/// Why a driver operation failed, with whatever helps diagnose it
/// (for Kubernetes: the Deployment's recent Events).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct DriverError {
    pub message: String,
    pub diagnostics: Vec<String>,
}

impl DriverError {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            diagnostics: vec![],
        }
    }
}

/// Progress reporting for long operations.
pub type Progress<'a> = &'a (dyn Fn(String) + Send + Sync);

/// What a platform driver does for one app in one cluster.
#[async_trait::async_trait]
pub trait PlatformDriver: Send + Sync {
    /// Both colors and which one takes traffic.
    async fn status(&self) -> Result<AppClusterStatus, DriverError>;
    /// Deploys `image` to `color` and waits until it is ready. Never called
    /// for the active color.
    async fn deploy(&self, color: Color, image: &str, progress: Progress<'_>) -> Result<(), DriverError>;
    /// Sends new traffic to `color`; requests in flight on the other color
    /// complete.
    async fn switch(&self, to: Color) -> Result<(), DriverError>;
    /// Sends `weight` percent of new requests to `color`, the inactive
    /// color, and the rest to the active one (a canary step); 0 sends it
    /// none. A switch ends the split. Idempotent.
    async fn set_canary(&self, color: Color, weight: u32) -> Result<(), DriverError> {
        let _ = (color, weight);
        Err(DriverError::new(
            "this driver cannot split traffic, so canaries cannot run here",
        ))
    }
    /// Stops `color` (the previous color, after the scale-down delay).
    async fn scale_down(&self, color: Color) -> Result<(), DriverError>;
    /// Puts the app in maintenance (`on`: neither color takes traffic, so
    /// the app makes no writes; requests in flight finish first) or takes
    /// it out. Idempotent, and kept across agent restarts.
    async fn maintenance(&self, on: bool, progress: Progress<'_>) -> Result<(), DriverError>;
    /// `host:port` where probes reach the inactive (preview) color.
    async fn preview_address(&self) -> Result<String, DriverError>;
    /// `host:port` of the stable service address (the active color).
    async fn service_address(&self) -> Result<String, DriverError>;
    /// Starts `image` as a scratch color: one more copy of the app that no
    /// router or service sends traffic to (a drill's), replacing a scratch
    /// color left over from before, and waits until it answers. Returns
    /// the `host:port` that reaches it.
    async fn start_scratch(&self, image: &str, progress: Progress<'_>) -> Result<String, DriverError> {
        let _ = (image, progress);
        Err(DriverError::new(
            "this driver cannot run a scratch color, so drills cannot run here",
        ))
    }
    /// Stops the scratch color, if one runs.
    async fn stop_scratch(&self) -> Result<(), DriverError> {
        Ok(())
    }
    /// Lets go of what the driver holds in this process (the local
    /// driver's listening routers) before a driver with other settings
    /// replaces it. The app's colors keep running.
    async fn close(&self) {}
}

/// What drivers may use from the agent.
#[derive(Clone, Debug)]
pub struct DriverContext {
    /// The agent's data directory; drivers keep state under `apps/<app>/`.
    pub data_dir: PathBuf,
    pub cluster: ClusterRef,
    /// What this agent's config lets app definitions run.
    pub policy: DriverPolicy,
}

/// Builds the driver for `app` in this agent's cluster, after checking
/// its settings against the agent's [`DriverPolicy`]: nothing starts for a
/// definition the agent does not allow.
pub async fn driver_for(app: &AppSpec, ctx: &DriverContext) -> Result<Arc<dyn PlatformDriver>, DriverError> {
    let c = app
        .cluster(&ctx.cluster)
        .ok_or_else(|| DriverError::new(format!("app {} does not run in {}", app.name, ctx.cluster)))?;
    match c.driver {
        DriverKind::Local => {
            let spec = c
                .local
                .clone()
                .ok_or_else(|| DriverError::new("driver local without [local] settings"))?;
            let program = spec.command.first().map(String::as_str).unwrap_or_default();
            if !ctx.policy.allows_program(program) {
                return Err(DriverError::new(format!(
                    "app {}: this agent may not run {} (local.command); its [drivers] local_commands allow {}",
                    app.name,
                    quote(program),
                    if ctx.policy.local_commands.is_empty() {
                        "nothing".to_owned()
                    } else {
                        ctx.policy.local_commands.join(", ")
                    }
                )));
            }
            Ok(Arc::new(local::LocalDriver::open(&app.name, spec, ctx).await?))
        }
        DriverKind::Kubernetes => {
            let mut spec = c
                .kubernetes
                .clone()
                .ok_or_else(|| DriverError::new("driver kubernetes without [kubernetes] settings"))?;
            // The agent's config picks the credentials; a definition may
            // only repeat that choice.
            match (&spec.kubeconfig, &ctx.policy.kubeconfig) {
                (Some(asked), Some(allowed)) if asked == allowed => {}
                (Some(asked), allowed) => {
                    return Err(DriverError::new(format!(
                        "app {}: this agent may not use kubeconfig {} (kubernetes.kubeconfig); it uses {}",
                        app.name,
                        quote(&asked.display().to_string()),
                        allowed
                            .as_ref()
                            .map_or("its in-cluster service account".to_owned(), |p| p.display().to_string())
                    )));
                }
                (None, allowed) => spec.kubeconfig = allowed.clone(),
            }
            Ok(Arc::new(kubernetes::KubeDriver::connect(&app.name, spec).await?))
        }
    }
}
