//! The `kubernetes` platform driver: blue-green with two Deployments and two
//! Services, the way Argo Rollouts' blue-green strategy and the seed's
//! `blue-deployment.yaml` / `green-deployment.yaml` / `active-services.yaml`
//! lay it out.
//!
//! In `spec.namespace`:
//! - Deployments `<app>-blue` and `<app>-green`, pods labelled
//!   `app=<app>,color=<color>`;
//! - Service `<app>` selecting `app=<app>,color=<active>` (takes traffic);
//! - Service `<app>-preview` selecting the inactive color (probes);
//! - for drills, Deployment and Service `<app>-drill` (replicas 0, pods
//!   labelled `app=<app>,color=drill`): the scratch color.
//!
//! - with `strategy = "canary"`, a Gateway API `HTTPRoute`
//!   (`spec.http_route`) with a rule whose backendRefs name Services
//!   `<app>` (stable) and `<app>-preview` (canary): the split of the
//!   canary's steps is those two backends' weights, the way Argo Rollouts'
//!   Gateway API plugin and Flagger's Gateway API provider do it.
//!
//! The driver never creates these objects; it changes the image of a
//! Deployment's container (server-side apply, field manager `cutover`), its
//! replica count (merge patch), the Services' `color` selector (merge
//! patch) and the two backends' weights (a JSON Patch whose `test`
//! operations check, in the same write, that each index still names the
//! backend it read). Everything else in the manifests stays owned by
//! whoever applied them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use cutover_shared::app::{AppClusterStatus, Color, ColorStatus, KubeSpec};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Event, Pod, Service};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::json;

use super::{DriverError, PlatformDriver, Progress};

/// Field manager of every write, so `kubectl get -o yaml --show-managed-fields`
/// shows what cutover owns.
const FIELD_MANAGER: &str = "cutover";
/// Annotation on Service `<app>`: when the last switch happened, ms since the epoch.
pub const LAST_SWITCH_ANNOTATION: &str = "cutover.dev/last-switch";
/// Annotation on a scaled-down Deployment: its replica count before, restored
/// by the next deploy to that color.
pub const SCALED_DOWN_FROM_ANNOTATION: &str = "cutover.dev/scaled-down-from";
/// Annotation on a Deployment scaled to zero for maintenance: its replica
/// count before, restored when maintenance ends.
pub const MAINTENANCE_FROM_ANNOTATION: &str = "cutover.dev/maintenance-from";
/// The deployment controller's revision annotation on ReplicaSets.
const REVISION_ANNOTATION: &str = "deployment.kubernetes.io/revision";
/// Events kept per object in a failure's diagnostics.
const MAX_EVENTS: usize = 10;
/// Consecutive failed GETs tolerated while waiting for a rollout.
const MAX_POLL_ERRORS: u32 = 3;

/// Runs one app's two colors as two Deployments behind two Services.
pub struct KubeDriver {
    app: String,
    spec: KubeSpec,
    client: Client,
    poll_interval: Duration,
    /// A rollout whose status does not change for this long fails
    /// (`spec.progress_deadline_secs`).
    progress_deadline: Duration,
}

impl std::fmt::Debug for KubeDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeDriver")
            .field("app", &self.app)
            .field("namespace", &self.spec.namespace)
            .field("poll_interval", &self.poll_interval)
            .field("progress_deadline", &self.progress_deadline)
            .finish_non_exhaustive()
    }
}

impl KubeDriver {
    /// Connects with the kubeconfig at `spec.kubeconfig` (its current
    /// context), or with the in-cluster service account when it is absent.
    pub async fn connect(app: &str, spec: KubeSpec) -> Result<KubeDriver, DriverError> {
        let config = match &spec.kubeconfig {
            Some(path) => {
                let kubeconfig = Kubeconfig::read_from(path)
                    .map_err(|e| DriverError::new(format!("reading kubeconfig {}: {e}", path.display())))?;
                Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                    .await
                    .map_err(|e| DriverError::new(format!("kubeconfig {}: {e}", path.display())))?
            }
            None => Config::incluster().map_err(|e| {
                DriverError::new(format!(
                    "in-cluster Kubernetes configuration (set kubernetes.kubeconfig outside a cluster): {e}"
                ))
            })?,
        };
        let client =
            Client::try_from(config).map_err(|e| DriverError::new(format!("building the Kubernetes client: {e}")))?;
        Ok(Self::with_client(app, spec, client))
    }

    /// A driver on an existing client (tests use a mock service).
    pub fn with_client(app: &str, spec: KubeSpec, client: Client) -> KubeDriver {
        let progress_deadline = Duration::from_secs(spec.progress_deadline_secs);
        KubeDriver {
            app: app.to_string(),
            spec,
            client,
            poll_interval: Duration::from_secs(2),
            progress_deadline,
        }
    }

    /// How often a deploy polls the Deployment while waiting for its rollout.
    pub fn with_poll_interval(mut self, interval: Duration) -> KubeDriver {
        self.poll_interval = interval;
        self
    }

    fn deployment_name(&self, color: Color) -> String {
        format!("{}-{}", self.app, color)
    }

    /// Server-side apply of the image alone: cutover owns only
    /// `containers[name=<container>].image`; `force` takes that field over
    /// from whoever applied the manifest (kubectl, Helm, Argo CD).
    async fn apply_image(&self, name: &str, container: &str, image: &str) -> Result<(), DriverError> {
        let body = json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {"template": {"spec": {"containers": [{"name": container, "image": image}]}}},
        });
        self.deployments()
            .patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body))
            .await
            .map_err(|e| kube_error(&format!("apply image to deployment {}", self.qualified(name)), e))?;
        Ok(())
    }

    /// The scratch color's Deployment and Service (drills).
    fn scratch_name(&self) -> String {
        format!("{}-drill", self.app)
    }

    fn preview_service_name(&self) -> String {
        format!("{}-preview", self.app)
    }

    fn deployments(&self) -> Api<Deployment> {
        Api::namespaced(self.client.clone(), &self.spec.namespace)
    }

    fn services(&self) -> Api<Service> {
        Api::namespaced(self.client.clone(), &self.spec.namespace)
    }

    /// The HTTPRoute's API path (Gateway API v1).
    fn route_path(&self, route: &str) -> String {
        format!(
            "/apis/gateway.networking.k8s.io/v1/namespaces/{}/httproutes/{route}",
            self.spec.namespace
        )
    }

    /// Reads HTTPRoute `route` as JSON (no typed HTTPRoute in
    /// k8s-openapi; only the backendRefs are read).
    async fn get_route(&self, route: &str) -> Result<serde_json::Value, DriverError> {
        let req = http::Request::get(self.route_path(route))
            .body(vec![])
            .map_err(|e| DriverError::new(e.to_string()))?;
        self.client
            .request::<serde_json::Value>(req)
            .await
            .map_err(|e| kube_error(&format!("get httproute {}", self.qualified(route)), e))
    }

    /// Sets the canary backend (`<app>-preview`) of every rule of the
    /// HTTPRoute that names both Services to `weight` and the stable one
    /// (`<app>`) to `100 - weight`.
    async fn set_route_weights(&self, route: &str, weight: u32) -> Result<(), DriverError> {
        let what = format!("httproute {}", self.qualified(route));
        let r = self.get_route(route).await?;
        let ops = weight_patch(&r, &self.app, &self.preview_service_name(), weight).ok_or_else(|| {
            DriverError::new(format!(
                "{what} has no rule with backendRefs to both services {} and {}",
                self.app,
                self.preview_service_name()
            ))
        })?;
        let req = http::Request::patch(format!("{}?&fieldManager={FIELD_MANAGER}", self.route_path(route)))
            .header(http::header::CONTENT_TYPE, "application/json-patch+json")
            .body(serde_json::to_vec(&ops).map_err(|e| DriverError::new(e.to_string()))?)
            .map_err(|e| DriverError::new(e.to_string()))?;
        self.client
            .request::<serde_json::Value>(req)
            .await
            .map_err(|e| kube_error(&format!("set canary weight {weight}% on {what}"), e))?;
        Ok(())
    }

    /// `namespace/name`, for messages.
    fn qualified(&self, name: &str) -> String {
        format!("{}/{}", self.spec.namespace, name)
    }

    /// `<service>.<namespace>.svc:<port>` with the Service's first port (the
    /// cluster DNS name; the agent runs in the cluster).
    async fn cluster_address(&self, name: &str) -> Result<String, DriverError> {
        let svc = self
            .services()
            .get(name)
            .await
            .map_err(|e| kube_error(&format!("get service {}", self.qualified(name)), e))?;
        let port = svc
            .spec
            .as_ref()
            .and_then(|s| s.ports.as_ref())
            .and_then(|p| p.first())
            .map(|p| p.port)
            .ok_or_else(|| DriverError::new(format!("service {} has no ports", self.qualified(name))))?;
        Ok(format!("{name}.{}.svc:{port}", self.spec.namespace))
    }

    /// The active color according to Service `<app>`'s selector, and the
    /// Service itself (None if it does not exist).
    async fn active_service(&self) -> Result<Option<Service>, DriverError> {
        self.services()
            .get_opt(&self.app)
            .await
            .map_err(|e| kube_error(&format!("get service {}", self.qualified(&self.app)), e))
    }

    /// Picks the container a deploy changes: `spec.container`, else the one
    /// named like the app, else the only one. Applying a name the pod
    /// template does not have would add a second container, so this refuses
    /// instead of guessing.
    fn target_container(&self, d: &Deployment) -> Result<String, DriverError> {
        let names: Vec<&str> = containers(d).iter().map(|c| c.name.as_str()).collect();
        let name = d.metadata.name.as_deref().unwrap_or_default();
        if let Some(want) = &self.spec.container {
            return if names.contains(&want.as_str()) {
                Ok(want.clone())
            } else {
                Err(DriverError::new(format!(
                    "deployment {} has no container {want:?} (kubernetes.container); containers: {names:?}",
                    self.qualified(name)
                )))
            };
        }
        if names.contains(&self.app.as_str()) {
            return Ok(self.app.clone());
        }
        match names.as_slice() {
            [only] => Ok(only.to_string()),
            _ => Err(DriverError::new(format!(
                "deployment {} has no container named {:?} and {} containers {names:?}; set kubernetes.container",
                self.qualified(name),
                self.app,
                names.len()
            ))),
        }
    }

    /// The image of the app's container in `d` (`spec.container`, else the
    /// container named like the app, else the first).
    fn image(&self, d: &Deployment) -> String {
        let cs = containers(d);
        let want = self.spec.container.as_deref().unwrap_or(&self.app);
        cs.iter()
            .find(|c| c.name == want)
            .or_else(|| cs.first())
            .and_then(|c| c.image.clone())
            .unwrap_or_default()
    }

    fn color_status(&self, color: Color, d: Option<&Deployment>) -> ColorStatus {
        let Some(d) = d else {
            return ColorStatus {
                color,
                image: String::new(),
                replicas_ready: 0,
                replicas_desired: 0,
                healthy: false,
            };
        };
        let image = self.image(d);
        let desired = desired_replicas(d);
        let ready = d.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0).max(0) as u32;
        ColorStatus {
            color,
            image,
            replicas_ready: ready,
            replicas_desired: desired,
            healthy: desired > 0 && ready >= desired,
        }
    }

    /// Polls the Deployment until its rollout completes, fails, or stops
    /// progressing for `progress_deadline`.
    async fn wait_for_rollout(&self, name: &str, image: &str, progress: Progress<'_>) -> Result<(), DriverError> {
        let api = self.deployments();
        let mut last_change = tokio::time::Instant::now();
        let mut last_key = None;
        let mut last_message = String::new();
        let mut errors = 0;
        loop {
            match api.get(name).await {
                Ok(d) => {
                    errors = 0;
                    let r = Rollout::of(&d);
                    match r.state() {
                        RolloutState::Complete => {
                            progress(format!(
                                "rollout: {}/{} updated, {}/{} available",
                                r.updated, r.desired, r.available, r.desired
                            ));
                            return Ok(());
                        }
                        RolloutState::Failed(why) => {
                            let message = format!(
                                "rollout of {} to {image} failed: {why} ({})",
                                self.qualified(name),
                                r.counts()
                            );
                            return Err(self.rollout_error(message, &d).await);
                        }
                        RolloutState::InProgress(message) => {
                            if message != last_message {
                                progress(message.clone());
                                last_message = message;
                            }
                        }
                    }
                    let key = r.key();
                    if last_key != Some(key) {
                        last_key = Some(key);
                        last_change = tokio::time::Instant::now();
                    } else if last_change.elapsed() >= self.progress_deadline {
                        let message = format!(
                            "rollout of {} to {image} made no progress for {}s ({})",
                            self.qualified(name),
                            self.progress_deadline.as_secs_f64(),
                            r.counts()
                        );
                        return Err(self.rollout_error(message, &d).await);
                    }
                }
                Err(e) => {
                    let e = kube_error(&format!("get deployment {}", self.qualified(name)), e);
                    errors += 1;
                    if errors > MAX_POLL_ERRORS || last_change.elapsed() >= self.progress_deadline {
                        return Err(e);
                    }
                    progress(format!("rollout: {e} (retrying)"));
                }
            }
            tokio::time::sleep(self.poll_interval).await;
        }
    }

    /// A rollout failure with its diagnostics: the Deployment's recent
    /// Events, its newest ReplicaSet's Events, and why that ReplicaSet's
    /// pods are not ready. Collecting them is best effort.
    async fn rollout_error(&self, message: String, d: &Deployment) -> DriverError {
        let name = d.metadata.name.clone().unwrap_or_default();
        let mut diagnostics = vec![];
        self.push_events(&mut diagnostics, "Deployment", &name).await;
        match self.newest_replica_set(d).await {
            Ok(Some(rs)) => {
                let rs_name = rs.metadata.name.clone().unwrap_or_default();
                self.push_events(&mut diagnostics, "ReplicaSet", &rs_name).await;
                self.push_pod_states(&mut diagnostics, &rs).await;
            }
            Ok(None) => {}
            Err(e) => diagnostics.push(format!("could not list replica sets: {}", e.message)),
        }
        DriverError { message, diagnostics }
    }

    /// Appends `<Kind> <name>: <reason>: <message>` for the object's most
    /// recent Events, oldest first.
    async fn push_events(&self, out: &mut Vec<String>, kind: &str, name: &str) {
        let api: Api<Event> = Api::namespaced(self.client.clone(), &self.spec.namespace);
        let lp = ListParams::default().fields(&format!("involvedObject.name={name},involvedObject.kind={kind}"));
        match api.list(&lp).await {
            Ok(list) => {
                let mut events = list.items;
                events.sort_by_key(event_time);
                let skip = events.len().saturating_sub(MAX_EVENTS);
                for e in &events[skip..] {
                    let mut line = format!(
                        "{kind} {name}: {}: {}",
                        e.reason.as_deref().unwrap_or("-"),
                        e.message.as_deref().unwrap_or("").trim()
                    );
                    if let Some(n) = e.count.filter(|n| *n > 1) {
                        let _ = write!(line, " (x{n})");
                    }
                    out.push(line);
                }
            }
            Err(e) => out.push(format!(
                "could not list events of {kind} {name}: {}",
                kube_error("list events", e).message
            )),
        }
    }

    /// The Deployment's ReplicaSet with the highest revision.
    async fn newest_replica_set(&self, d: &Deployment) -> Result<Option<ReplicaSet>, DriverError> {
        let Some(selector) = d.spec.selector.match_labels.as_ref().map(label_selector) else {
            return Ok(None);
        };
        let api: Api<ReplicaSet> = Api::namespaced(self.client.clone(), &self.spec.namespace);
        let list = api
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|e| kube_error(&format!("list replica sets {selector}"), e))?;
        let owner_uid = d.metadata.uid.as_deref();
        let owner_name = d.metadata.name.as_deref();
        Ok(list
            .items
            .into_iter()
            .filter(|rs| {
                rs.metadata.owner_references.iter().flatten().any(|o| {
                    o.kind == "Deployment"
                        && match owner_uid {
                            Some(uid) => o.uid == uid,
                            None => Some(o.name.as_str()) == owner_name,
                        }
                })
            })
            .max_by_key(|rs| {
                rs.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(REVISION_ANNOTATION))
                    .and_then(|r| r.parse::<i64>().ok())
            }))
    }

    /// Polls until no pod of Deployment `d` exists any more (terminating
    /// ones included: they may still write), or fails after the progress
    /// deadline.
    async fn wait_no_pods(&self, name: &str, d: &Deployment, progress: Progress<'_>) -> Result<(), DriverError> {
        let Some(selector) = d.spec.selector.match_labels.as_ref().map(label_selector) else {
            return Ok(());
        };
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &self.spec.namespace);
        let started = tokio::time::Instant::now();
        let mut last = usize::MAX;
        loop {
            let pods = api
                .list(&ListParams::default().labels(&selector))
                .await
                .map_err(|e| kube_error(&format!("list pods {selector}"), e))?
                .items
                .len();
            if pods == 0 {
                return Ok(());
            }
            if pods != last {
                progress(format!("{}: waiting for {pods} pod(s) to stop", self.qualified(name)));
                last = pods;
            }
            if started.elapsed() >= self.progress_deadline {
                return Err(DriverError::new(format!(
                    "{pods} pod(s) of {} still exist {} s after scaling it to 0 for maintenance",
                    self.qualified(name),
                    self.progress_deadline.as_secs()
                )));
            }
            tokio::time::sleep(self.poll_interval).await;
        }
    }

    /// Appends why the ReplicaSet's pods are not ready (waiting or
    /// terminated containers).
    async fn push_pod_states(&self, out: &mut Vec<String>, rs: &ReplicaSet) {
        let Some(selector) = rs.spec.selector.match_labels.as_ref().map(label_selector) else {
            return;
        };
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &self.spec.namespace);
        match api.list(&ListParams::default().labels(&selector)).await {
            Ok(list) => {
                for pod in list.items.iter().take(MAX_EVENTS) {
                    let pod_name = pod.metadata.name.as_deref().unwrap_or_default();
                    let statuses = pod.status.iter().flat_map(|s| {
                        s.init_container_statuses
                            .iter()
                            .flatten()
                            .chain(s.container_statuses.iter().flatten())
                    });
                    for c in statuses.filter(|c| !c.ready) {
                        let state = c.state.as_ref();
                        if let Some(w) = state.and_then(|s| s.waiting.as_ref()) {
                            out.push(format!(
                                "Pod {pod_name}: container {} waiting: {}: {}",
                                c.name,
                                w.reason.as_deref().unwrap_or("-"),
                                w.message.as_deref().unwrap_or("").trim()
                            ));
                        } else if let Some(t) = state.and_then(|s| s.terminated.as_ref()) {
                            out.push(format!(
                                "Pod {pod_name}: container {} terminated: {} (exit code {}): {}",
                                c.name,
                                t.reason.as_deref().unwrap_or("-"),
                                t.exit_code,
                                t.message.as_deref().unwrap_or("").trim()
                            ));
                        }
                    }
                }
            }
            Err(e) => out.push(format!(
                "could not list pods {selector}: {}",
                kube_error("list pods", e).message
            )),
        }
    }
}

#[async_trait::async_trait]
impl PlatformDriver for KubeDriver {
    async fn status(&self) -> Result<AppClusterStatus, DriverError> {
        let api = self.deployments();
        let mut colors = vec![];
        let mut maintenance = false;
        for color in [Color::Blue, Color::Green] {
            let name = self.deployment_name(color);
            let d = api
                .get_opt(&name)
                .await
                .map_err(|e| kube_error(&format!("get deployment {}", self.qualified(&name)), e))?;
            maintenance |= d.as_ref().and_then(maintenance_from).is_some();
            colors.push(self.color_status(color, d.as_ref()));
        }
        let svc = self.active_service().await?;
        let active = svc.as_ref().and_then(service_color);
        let last_switch_unix_ms = svc
            .as_ref()
            .and_then(|s| s.metadata.annotations.as_ref())
            .and_then(|a| a.get(LAST_SWITCH_ANNOTATION))
            .and_then(|v| v.trim().parse::<i64>().ok());
        let canary_weight = match &self.spec.http_route {
            Some(route) => route_canary_weight(&self.get_route(route).await?, &self.app, &self.preview_service_name()),
            None => 0,
        };
        Ok(AppClusterStatus {
            canary_weight,
            active,
            colors,
            last_switch_unix_ms,
            maintenance,
        })
    }

    /// On: both Deployments go to zero replicas (the count before is kept
    /// in an annotation) and the driver waits until their pods are gone, so
    /// nothing of the app writes. Off: each comes back at that count and
    /// the driver waits for its rollout.
    async fn maintenance(&self, on: bool, progress: Progress<'_>) -> Result<(), DriverError> {
        let api = self.deployments();
        let pp = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        let mut changed = Vec::new();
        for color in [Color::Blue, Color::Green] {
            let name = self.deployment_name(color);
            let Some(d) = api
                .get_opt(&name)
                .await
                .map_err(|e| kube_error(&format!("get deployment {}", self.qualified(&name)), e))?
            else {
                continue;
            };
            let from = maintenance_from(&d);
            let patch = match (on, from) {
                // Already held: keep the count recorded first.
                (true, Some(_)) => json!({"spec": {"replicas": 0}}),
                (true, None) => json!({
                    "metadata": {"annotations": {MAINTENANCE_FROM_ANNOTATION: desired_replicas(&d).to_string()}},
                    "spec": {"replicas": 0},
                }),
                // JSON merge patch: `null` removes the annotation.
                (false, Some(n)) => json!({
                    "metadata": {"annotations": {MAINTENANCE_FROM_ANNOTATION: null}},
                    "spec": {"replicas": n},
                }),
                (false, None) => continue,
            };
            api.patch(&name, &pp, &Patch::Merge(&patch)).await.map_err(|e| {
                kube_error(
                    &format!(
                        "{} maintenance for deployment {}",
                        if on { "start" } else { "end" },
                        self.qualified(&name)
                    ),
                    e,
                )
            })?;
            progress(format!(
                "{}: {}",
                self.qualified(&name),
                if on {
                    "scaled to 0 for maintenance".to_owned()
                } else {
                    format!("back to {} replicas", from.unwrap_or(0))
                }
            ));
            changed.push((name, d));
        }
        for (name, d) in changed {
            if on {
                self.wait_no_pods(&name, &d, progress).await?;
            } else if maintenance_from(&d).is_some_and(|n| n > 0) {
                self.wait_for_rollout(&name, &self.image(&d), progress).await?;
            }
        }
        Ok(())
    }

    async fn deploy(&self, color: Color, image: &str, progress: Progress<'_>) -> Result<(), DriverError> {
        let name = self.deployment_name(color);
        // The trait promises never to deploy to the active color; a stale
        // task must not roll the pods that take traffic.
        if let Some(active) = self.active_service().await?.as_ref().and_then(service_color)
            && active == color
        {
            return Err(DriverError::new(format!(
                "refusing to deploy to {color}: service {} sends traffic to it",
                self.qualified(&self.app)
            )));
        }
        let api = self.deployments();
        let current = api
            .get_opt(&name)
            .await
            .map_err(|e| kube_error(&format!("get deployment {}", self.qualified(&name)), e))?
            .ok_or_else(|| {
                DriverError::new(format!(
                    "deployment {} does not exist; create {}-blue and {}-green (pods labelled app={},color=<color>) first",
                    self.qualified(&name),
                    self.app,
                    self.app,
                    self.app
                ))
            })?;
        if current.spec.paused == Some(true) {
            return Err(DriverError::new(format!(
                "deployment {} is paused; resume it first",
                self.qualified(&name)
            )));
        }
        let container = self.target_container(&current)?;

        // A color stopped by scale_down comes back at its previous size.
        if current.spec.replicas == Some(0) {
            let restore = current
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(SCALED_DOWN_FROM_ANNOTATION))
                .and_then(|v| v.parse::<i32>().ok())
                .filter(|n| *n > 0)
                .unwrap_or(1);
            progress(format!("scaling {name} back up to {restore} replicas"));
            // JSON merge patch: `null` removes the annotation.
            let patch = json!({
                "metadata": {"annotations": {SCALED_DOWN_FROM_ANNOTATION: null}},
                "spec": {"replicas": restore},
            });
            api.patch(
                &name,
                &PatchParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..Default::default()
                },
                &Patch::Merge(&patch),
            )
            .await
            .map_err(|e| kube_error(&format!("scale up deployment {}", self.qualified(&name)), e))?;
        }

        progress(format!("applying image {image} to {}", self.qualified(&name)));
        self.apply_image(&name, &container, image).await?;
        self.wait_for_rollout(&name, image, progress).await
    }

    async fn switch(&self, to: Color) -> Result<(), DriverError> {
        let pp = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        // JSON merge patches (RFC 7386): a map in the patch is merged into
        // the Service's map, so only the `color` key of the selector (and the
        // one annotation) changes; `app=<app>` and any other keys stay. The
        // selector and the annotation change in one write.
        let active = json!({
            "metadata": {"annotations": {LAST_SWITCH_ANNOTATION: now_ms.to_string()}},
            "spec": {"selector": {"color": to.as_str()}},
        });
        let api = self.services();
        api.patch(&self.app, &pp, &Patch::Merge(&active))
            .await
            .map_err(|e| kube_error(&format!("switch service {} to {to}", self.qualified(&self.app)), e))?;
        // Both Services select `to` now. A canary's weight returns to the
        // stable backend before the preview selects the old color, so at
        // no moment does traffic go back to it.
        if let Some(route) = &self.spec.http_route {
            self.set_route_weights(route, 0).await?;
        }
        let preview_name = self.preview_service_name();
        let preview = json!({"spec": {"selector": {"color": to.other().as_str()}}});
        api.patch(&preview_name, &pp, &Patch::Merge(&preview))
            .await
            .map_err(|e| {
                kube_error(
                    &format!(
                        "traffic now goes to {to}, but pointing preview service {} at {} failed",
                        self.qualified(&preview_name),
                        to.other()
                    ),
                    e,
                )
            })?;
        Ok(())
    }

    async fn set_canary(&self, color: Color, weight: u32) -> Result<(), DriverError> {
        let route = self.spec.http_route.as_ref().ok_or_else(|| {
            DriverError::new(format!(
                "a canary needs kubernetes.http_route: the HTTPRoute whose backends {} and {} carry the weights",
                self.app,
                self.preview_service_name()
            ))
        })?;
        if weight > 0 {
            // The canary backend is Service <app>-preview: it must select
            // the color the weight is for.
            let name = self.preview_service_name();
            let preview = self
                .services()
                .get(&name)
                .await
                .map_err(|e| kube_error(&format!("get service {}", self.qualified(&name)), e))?;
            let selects = service_color(&preview);
            if selects != Some(color) {
                return Err(DriverError::new(format!(
                    "service {} selects {}, not {color}; refusing to send {weight}% to it",
                    self.qualified(&name),
                    selects.map_or_else(|| "no color".to_owned(), |c| c.to_string())
                )));
            }
        }
        self.set_route_weights(route, weight).await
    }

    async fn scale_down(&self, color: Color) -> Result<(), DriverError> {
        if let Some(active) = self.active_service().await?.as_ref().and_then(service_color)
            && active == color
        {
            return Err(DriverError::new(format!(
                "refusing to scale down {color}: service {} sends traffic to it",
                self.qualified(&self.app)
            )));
        }
        let name = self.deployment_name(color);
        let api = self.deployments();
        let d = api
            .get(&name)
            .await
            .map_err(|e| kube_error(&format!("get deployment {}", self.qualified(&name)), e))?;
        let replicas = desired_replicas(&d);
        // JSON merge patch of spec.replicas; the previous count is kept in an
        // annotation so the next deploy to this color restores it. Scaling
        // down an already stopped color keeps the annotation it has.
        let patch = if replicas > 0 {
            json!({
                "metadata": {"annotations": {SCALED_DOWN_FROM_ANNOTATION: replicas.to_string()}},
                "spec": {"replicas": 0},
            })
        } else {
            json!({"spec": {"replicas": 0}})
        };
        api.patch(
            &name,
            &PatchParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            },
            &Patch::Merge(&patch),
        )
        .await
        .map_err(|e| kube_error(&format!("scale down deployment {}", self.qualified(&name)), e))?;
        Ok(())
    }

    async fn preview_address(&self) -> Result<String, DriverError> {
        self.cluster_address(&self.preview_service_name()).await
    }

    async fn service_address(&self) -> Result<String, DriverError> {
        self.cluster_address(&self.app).await
    }

    /// The scratch color is Deployment `<app>-drill` behind Service
    /// `<app>-drill`, both applied beside the colors' (replicas 0, pods
    /// labelled `app=<app>,color=drill`): no Service that takes traffic
    /// selects them. The driver scales it to one pod with the image and
    /// waits for the rollout; as with the colors, it creates nothing.
    async fn start_scratch(&self, image: &str, progress: Progress<'_>) -> Result<String, DriverError> {
        let name = self.scratch_name();
        let api = self.deployments();
        let current = api
            .get_opt(&name)
            .await
            .map_err(|e| kube_error(&format!("get deployment {}", self.qualified(&name)), e))?
            .ok_or_else(|| {
                DriverError::new(format!(
                    "deployment {} does not exist; drills need it and service {name} beside the colors \
                     (replicas 0, pods labelled app={},color=drill, selected by no other service)",
                    self.qualified(&name),
                    self.app
                ))
            })?;
        let container = self.target_container(&current)?;
        let pp = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        if desired_replicas(&current) != 1 {
            api.patch(&name, &pp, &Patch::Merge(&json!({"spec": {"replicas": 1}})))
                .await
                .map_err(|e| kube_error(&format!("scale up deployment {}", self.qualified(&name)), e))?;
        }
        progress(format!(
            "scratch color: applying image {image} to {}",
            self.qualified(&name)
        ));
        self.apply_image(&name, &container, image).await?;
        if let Err(e) = self.wait_for_rollout(&name, image, progress).await {
            let _ = self.stop_scratch().await;
            return Err(e);
        }
        self.cluster_address(&name).await
    }

    /// Scales `<app>-drill` back to zero (absent: nothing runs).
    async fn stop_scratch(&self) -> Result<(), DriverError> {
        let name = self.scratch_name();
        let api = self.deployments();
        let Some(d) = api
            .get_opt(&name)
            .await
            .map_err(|e| kube_error(&format!("get deployment {}", self.qualified(&name)), e))?
        else {
            return Ok(());
        };
        if desired_replicas(&d) == 0 {
            return Ok(());
        }
        let pp = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        api.patch(&name, &pp, &Patch::Merge(&json!({"spec": {"replicas": 0}})))
            .await
            .map_err(|e| kube_error(&format!("scale down deployment {}", self.qualified(&name)), e))?;
        Ok(())
    }
}

/// Where a rollout stands, from the Deployment alone (the same rules as
/// `kubectl rollout status`).
struct Rollout {
    generation: i64,
    observed: i64,
    desired: u32,
    /// Pods of any revision (old ones still terminating count).
    total: u32,
    updated: u32,
    ready: u32,
    available: u32,
    deadline_exceeded: Option<String>,
}

enum RolloutState {
    Complete,
    Failed(String),
    InProgress(String),
}

impl Rollout {
    fn of(d: &Deployment) -> Rollout {
        let st = d.status.clone().unwrap_or_default();
        let n = |v: Option<i32>| v.unwrap_or(0).max(0) as u32;
        let deadline_exceeded = st
            .conditions
            .iter()
            .flatten()
            .find(|c| {
                c.type_.as_deref() == Some("Progressing") && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
            })
            .map(|c| {
                format!(
                    "ProgressDeadlineExceeded: {}",
                    c.message.as_deref().unwrap_or("").trim()
                )
            });
        Rollout {
            generation: d.metadata.generation.unwrap_or(0),
            observed: st.observed_generation.unwrap_or(0),
            desired: desired_replicas(d),
            total: n(st.replicas),
            updated: n(st.updated_replicas),
            ready: n(st.ready_replicas),
            available: n(st.available_replicas),
            deadline_exceeded,
        }
    }

    fn state(&self) -> RolloutState {
        if self.observed < self.generation {
            // Conditions describe an older generation (a failed previous
            // rollout's ProgressDeadlineExceeded among them).
            return RolloutState::InProgress(format!(
                "rollout: waiting for the deployment controller to observe generation {}",
                self.generation
            ));
        }
        if let Some(why) = &self.deadline_exceeded {
            return RolloutState::Failed(why.clone());
        }
        if self.desired > 0
            && self.updated == self.desired
            && self.available == self.desired
            && self.total <= self.updated
        {
            return RolloutState::Complete;
        }
        let mut m = format!(
            "rollout: {}/{} updated, {}/{} available",
            self.updated, self.desired, self.available, self.desired
        );
        if self.total > self.updated && self.updated == self.desired {
            let _ = write!(m, ", {} old replicas terminating", self.total - self.updated);
        }
        RolloutState::InProgress(m)
    }

    /// What counts as progress: any change of these.
    fn key(&self) -> (i64, u32, u32, u32, u32) {
        (self.observed, self.total, self.updated, self.ready, self.available)
    }

    fn counts(&self) -> String {
        format!(
            "{}/{} updated, {}/{} ready, {}/{} available",
            self.updated, self.desired, self.ready, self.desired, self.available, self.desired
        )
    }
}

/// The replica count a Deployment had before maintenance scaled it to
/// zero, while it is in maintenance.
fn maintenance_from(d: &Deployment) -> Option<u32> {
    d.metadata
        .annotations
        .as_ref()?
        .get(MAINTENANCE_FROM_ANNOTATION)?
        .parse()
        .ok()
}

/// `spec.replicas`, which the API server defaults to 1.
fn desired_replicas(d: &Deployment) -> u32 {
    d.spec.replicas.unwrap_or(1).max(0) as u32
}

fn containers(d: &Deployment) -> &[k8s_openapi::api::core::v1::Container] {
    d.spec
        .template
        .spec
        .as_ref()
        .map(|p| p.containers.as_slice())
        .unwrap_or(&[])
}

/// A JSON Patch (RFC 6902) setting, in every rule of HTTPRoute `route`
/// that names both, backend `canary`'s weight to `weight` and `stable`'s
/// to `100 - weight`; each index is first tested to still name its
/// backend. `None` if no rule names both.
fn weight_patch(route: &serde_json::Value, stable: &str, canary: &str, weight: u32) -> Option<serde_json::Value> {
    let mut ops = vec![];
    let rules = route["spec"]["rules"].as_array()?;
    for (i, rule) in rules.iter().enumerate() {
        let refs = rule["backendRefs"].as_array().map(Vec::as_slice).unwrap_or_default();
        let index = |name: &str| {
            refs.iter()
                .position(|b| b["name"] == name && b["kind"].as_str().is_none_or(|k| k == "Service"))
        };
        if let (Some(s), Some(c)) = (index(stable), index(canary)) {
            for (j, name, w) in [(s, stable, 100 - weight), (c, canary, weight)] {
                let at = format!("/spec/rules/{i}/backendRefs/{j}");
                ops.push(json!({"op": "test", "path": format!("{at}/name"), "value": name}));
                // `add` sets a member whether or not it exists (an
                // unweighted backend has none: weight 1).
                ops.push(json!({"op": "add", "path": format!("{at}/weight"), "value": w}));
            }
        }
    }
    (!ops.is_empty()).then_some(serde_json::Value::Array(ops))
}

/// The canary's percent in HTTPRoute `route`: the first rule naming both
/// backends, `canary`'s weight over the two.
fn route_canary_weight(route: &serde_json::Value, stable: &str, canary: &str) -> u32 {
    let weight = |refs: &[serde_json::Value], name: &str| {
        refs.iter()
            .find(|b| b["name"] == name)
            .map(|b| b["weight"].as_u64().unwrap_or(1))
    };
    route["spec"]["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|rule| {
            let refs = rule["backendRefs"].as_array()?;
            let (s, c) = (weight(refs, stable)?, weight(refs, canary)?);
            Some((c * 100).checked_div(s + c).unwrap_or(0) as u32)
        })
        .unwrap_or(0)
}

/// The color a Service selects, if any.
fn service_color(s: &Service) -> Option<Color> {
    s.spec
        .as_ref()?
        .selector
        .as_ref()?
        .get("color")
        .and_then(|c| Color::parse(c))
}

/// `k=v,k=v` for a label selector's matchLabels.
fn label_selector(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// When an Event last happened, for ordering.
fn event_time(e: &Event) -> Option<k8s_openapi::jiff::Timestamp> {
    e.last_timestamp
        .as_ref()
        .map(|t| t.0)
        .or_else(|| e.event_time.as_ref().map(|t| t.0))
        .or_else(|| e.first_timestamp.as_ref().map(|t| t.0))
        .or_else(|| e.metadata.creation_timestamp.as_ref().map(|t| t.0))
}

/// A kube error with what was being done; API errors show the server's
/// message and reason rather than kube's debug dump.
fn kube_error(what: &str, e: kube::Error) -> DriverError {
    match e {
        kube::Error::Api(s) => DriverError::new(format!("{what}: {} ({}, HTTP {})", s.message, s.reason, s.code)),
        e => DriverError::new(format!("{what}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    //! Against kube's mock service: every request the driver sends is
    //! logged (method, path with query, content type, JSON body) and
    //! answered by a handler, either a fixed script or a small stateful fake
    //! of the API server. Each test asserts the exact request sequence.

    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use http::{Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::Value;
    use tower_test::mock;

    use super::*;

    const NS: &str = "shop";
    const APP: &str = "oatie-backend";
    const SVC: &str = "/api/v1/namespaces/shop/services/oatie-backend";
    const PREVIEW: &str = "/api/v1/namespaces/shop/services/oatie-backend-preview";
    const BLUE: &str = "/apis/apps/v1/namespaces/shop/deployments/oatie-backend-blue";
    const GREEN: &str = "/apis/apps/v1/namespaces/shop/deployments/oatie-backend-green";
    const GREEN_APPLY: &str =
        "/apis/apps/v1/namespaces/shop/deployments/oatie-backend-green?&force=true&fieldManager=cutover";
    const GREEN_MERGE: &str = "/apis/apps/v1/namespaces/shop/deployments/oatie-backend-green?&fieldManager=cutover";
    const SVC_MERGE: &str = "/api/v1/namespaces/shop/services/oatie-backend?&fieldManager=cutover";
    const PREVIEW_MERGE: &str = "/api/v1/namespaces/shop/services/oatie-backend-preview?&fieldManager=cutover";
    const GREEN_EVENTS: &str = "/api/v1/namespaces/shop/events?&fieldSelector=involvedObject.name%3Doatie-backend-green%2CinvolvedObject.kind%3DDeployment";
    const GREEN_RS: &str =
        "/apis/apps/v1/namespaces/shop/replicasets?&labelSelector=app%3Doatie-backend%2Ccolor%3Dgreen";
    const NEW_RS_EVENTS: &str = "/api/v1/namespaces/shop/events?&fieldSelector=involvedObject.name%3Doatie-backend-green-7d9f8c6b5d%2CinvolvedObject.kind%3DReplicaSet";
    const NEW_RS_PODS: &str = "/api/v1/namespaces/shop/pods?&labelSelector=app%3Doatie-backend%2Ccolor%3Dgreen%2Cpod-template-hash%3D7d9f8c6b5d";
    const ROUTE: &str = "/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes/oatie-backend";
    const ROUTE_PATCH: &str =
        "/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes/oatie-backend?&fieldManager=cutover";
    const JSON_PATCH: &str = "application/json-patch+json";
    const APPLY: &str = "application/apply-patch+yaml";
    const MERGE: &str = "application/merge-patch+json";
    const V1: &str = "registry.example/shop/oatie-backend:v1";
    const V2: &str = "registry.example/shop/oatie-backend:v2";

    /// One request as the API server saw it.
    #[derive(Clone, Debug, PartialEq)]
    struct Req {
        method: String,
        path: String,
        content_type: Option<String>,
        body: Option<Value>,
    }

    type Handler = Box<dyn FnMut(&Req) -> (StatusCode, Value) + Send>;

    fn spec() -> KubeSpec {
        KubeSpec {
            namespace: NS.into(),
            kubeconfig: None,
            progress_deadline_secs: 600,
            container: None,
            http_route: None,
        }
    }

    /// A driver whose client talks to `handler`; the join handle yields the
    /// request log once the driver is dropped.
    fn start(spec: KubeSpec, mut handler: Handler) -> (KubeDriver, tokio::task::JoinHandle<Vec<Req>>) {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let server = tokio::spawn(async move {
            let mut log = vec![];
            while let Some((request, send)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                let bytes = body.collect_bytes().await.expect("request body");
                let req = Req {
                    method: parts.method.to_string(),
                    path: parts.uri.path_and_query().map(|p| p.to_string()).unwrap_or_default(),
                    content_type: parts
                        .headers
                        .get(http::header::CONTENT_TYPE)
                        .map(|v| v.to_str().unwrap().to_string()),
                    body: (!bytes.is_empty()).then(|| serde_json::from_slice(&bytes).expect("JSON request body")),
                };
                let (status, answer) = handler(&req);
                log.push(req);
                let response = Response::builder()
                    .status(status)
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap();
                send.send_response(response);
            }
            log
        });
        let driver = KubeDriver::with_client(APP, spec, Client::new(service, "default"))
            .with_poll_interval(Duration::from_millis(5));
        (driver, server)
    }

    /// Drops the driver and returns the request log (re-raising a panic of
    /// the handler, such as an unexpected request).
    async fn finish(driver: KubeDriver, server: tokio::task::JoinHandle<Vec<Req>>) -> Vec<Req> {
        drop(driver);
        match tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("server did not stop")
        {
            Ok(log) => log,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    /// Answers requests in order, checking each one's method and path.
    fn script(steps: Vec<(&'static str, &'static str, Value)>) -> Handler {
        let mut steps: VecDeque<_> = steps.into();
        Box::new(move |req: &Req| {
            let Some((method, path, answer)) = steps.pop_front() else {
                panic!("unexpected request {} {}", req.method, req.path);
            };
            assert_eq!(
                (req.method.as_str(), req.path.as_str()),
                (method, path),
                "request out of script"
            );
            (StatusCode::OK, answer)
        })
    }

    /// (method, path) of each request.
    fn calls(log: &[Req]) -> Vec<(&str, &str)> {
        log.iter().map(|r| (r.method.as_str(), r.path.as_str())).collect()
    }

    /// Runs `f` with a test timeout, so a driver stuck on an unanswered
    /// request fails instead of hanging.
    async fn within<F: std::future::Future>(f: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(20), f)
            .await
            .expect("test timed out")
    }

    fn progress_log() -> (Arc<Mutex<Vec<String>>>, impl Fn(String) + Send + Sync) {
        let seen = Arc::new(Mutex::new(vec![]));
        let s = seen.clone();
        (seen, move |m: String| s.lock().unwrap().push(m))
    }

    // ---- realistic API objects ----

    /// Deployment `<app>-<color>` as `kubectl get -o json` shows it.
    fn deployment(color: &str, image: &str, generation: i64, replicas: i64, status: Value) -> Value {
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": format!("oatie-backend-{color}"),
                "namespace": NS,
                "uid": format!("0d6c4a52-3f1e-4b8e-9a51-{color}00000000"),
                "resourceVersion": format!("{}", 81200 + generation),
                "generation": generation,
                "creationTimestamp": "2025-03-01T09:00:00Z",
                "labels": {"app": APP, "color": color},
                "annotations": {"deployment.kubernetes.io/revision": format!("{generation}")}
            },
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": APP, "color": color}},
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}},
                "revisionHistoryLimit": 10,
                "progressDeadlineSeconds": 600,
                "template": {
                    "metadata": {"labels": {"app": APP, "color": color}},
                    "spec": {
                        "containers": [{
                            "name": APP,
                            "image": image,
                            "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                            "readinessProbe": {"httpGet": {"path": "/health", "port": 8080}, "periodSeconds": 5}
                        }],
                        "restartPolicy": "Always"
                    }
                }
            },
            "status": status
        })
    }

    fn condition(type_: &str, status: &str, reason: &str, message: &str) -> Value {
        json!({
            "type": type_, "status": status, "reason": reason, "message": message,
            "lastUpdateTime": "2025-03-01T10:00:00Z", "lastTransitionTime": "2025-03-01T10:00:00Z"
        })
    }

    fn rollout_status(
        observed: i64,
        replicas: i64,
        updated: i64,
        ready: i64,
        available: i64,
        conditions: Vec<Value>,
    ) -> Value {
        json!({
            "observedGeneration": observed,
            "replicas": replicas,
            "updatedReplicas": updated,
            "readyReplicas": ready,
            "availableReplicas": available,
            "unavailableReplicas": replicas - available,
            "conditions": conditions
        })
    }

    fn complete_status(generation: i64, n: i64) -> Value {
        rollout_status(
            generation,
            n,
            n,
            n,
            n,
            vec![
                condition(
                    "Available",
                    "True",
                    "MinimumReplicasAvailable",
                    "Deployment has minimum availability.",
                ),
                condition(
                    "Progressing",
                    "True",
                    "NewReplicaSetAvailable",
                    "ReplicaSet \"oatie-backend-green-7d9f8c6b5d\" has successfully progressed.",
                ),
            ],
        )
    }

    fn service(name: &str, color: &str, port: i64, annotations: Value) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": NS, "uid": "7f0c9a1e-1111-4c3b-8d2e-000000000001",
                         "resourceVersion": "80001", "annotations": annotations},
            "spec": {
                "type": "ClusterIP",
                "clusterIP": "10.96.14.7",
                "selector": {"app": APP, "color": color},
                "ports": [{"name": "http", "port": port, "targetPort": 8080, "protocol": "TCP"}]
            }
        })
    }

    fn list(kind: &str, items: Vec<Value>) -> Value {
        let api_version = if kind == "ReplicaSetList" { "apps/v1" } else { "v1" };
        json!({"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": "81300"}, "items": items})
    }

    fn event(name: &str, kind: &str, reason: &str, message: &str, last: &str, count: i64) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": format!("{name}.182a6f{count}"), "namespace": NS, "creationTimestamp": last},
            "involvedObject": {"kind": kind, "namespace": NS, "name": name, "apiVersion": "apps/v1"},
            "reason": reason, "message": message, "type": "Normal",
            "source": {"component": "deployment-controller"},
            "firstTimestamp": last, "lastTimestamp": last, "count": count
        })
    }

    fn replica_set(hash: &str, revision: i64, image: &str, owner: &str) -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {
                "name": format!("oatie-backend-green-{hash}"), "namespace": NS,
                "labels": {"app": APP, "color": "green", "pod-template-hash": hash},
                "annotations": {"deployment.kubernetes.io/revision": revision.to_string(),
                                "deployment.kubernetes.io/desired-replicas": "3"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": owner,
                                     "uid": if owner == "oatie-backend-green" { "0d6c4a52-3f1e-4b8e-9a51-green00000000" }
                                            else { "5b1d0c3e-0000-4000-8000-000000000000" },
                                     "controller": true,
                                     "blockOwnerDeletion": true}]
            },
            "spec": {
                "replicas": 3,
                "selector": {"matchLabels": {"app": APP, "color": "green", "pod-template-hash": hash}},
                "template": {"metadata": {"labels": {"app": APP, "color": "green", "pod-template-hash": hash}},
                             "spec": {"containers": [{"name": APP, "image": image}]}}
            },
            "status": {"replicas": 1, "observedGeneration": 1}
        })
    }

    // ---- deploy ----

    #[tokio::test]
    async fn deploy_applies_image_and_waits_for_rollout() {
        within(async {
            // Green's previous rollout had failed: its stale
            // ProgressDeadlineExceeded must not fail the new one before the
            // controller observes generation 5.
            let stale = vec![condition(
                "Progressing",
                "False",
                "ProgressDeadlineExceeded",
                "ReplicaSet \"oatie-backend-green-5c4b7d9f6\" has timed out progressing.",
            )];
            let (driver, server) = start(
                spec(),
                script(vec![
                    ("GET", SVC, service(APP, "blue", 80, json!({}))),
                    (
                        "GET",
                        GREEN,
                        deployment("green", V1, 4, 3, rollout_status(4, 3, 3, 0, 0, stale.clone())),
                    ),
                    (
                        "PATCH",
                        GREEN_APPLY,
                        deployment("green", V2, 5, 3, rollout_status(4, 3, 3, 0, 0, stale.clone())),
                    ),
                    (
                        "GET",
                        GREEN,
                        deployment("green", V2, 5, 3, rollout_status(4, 3, 3, 0, 0, stale)),
                    ),
                    (
                        "GET",
                        GREEN,
                        deployment(
                            "green",
                            V2,
                            5,
                            3,
                            rollout_status(
                                5,
                                4,
                                1,
                                0,
                                0,
                                vec![condition(
                                    "Progressing",
                                    "True",
                                    "ReplicaSetUpdated",
                                    "ReplicaSet is progressing.",
                                )],
                            ),
                        ),
                    ),
                    (
                        "GET",
                        GREEN,
                        deployment("green", V2, 5, 3, rollout_status(5, 4, 3, 3, 3, vec![])),
                    ),
                    ("GET", GREEN, deployment("green", V2, 5, 3, complete_status(5, 3))),
                ]),
            );
            let (seen, progress) = progress_log();
            let result = driver.deploy(Color::Green, V2, &progress).await;
            let log = finish(driver, server).await;
            result.expect("deploy");
            assert_eq!(
                calls(&log),
                [
                    ("GET", SVC),
                    ("GET", GREEN),
                    ("PATCH", GREEN_APPLY),
                    ("GET", GREEN),
                    ("GET", GREEN),
                    ("GET", GREEN),
                    ("GET", GREEN)
                ]
            );
            assert_eq!(log[2].content_type.as_deref(), Some(APPLY));
            assert_eq!(
                log[2].body,
                Some(json!({
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "metadata": {"name": "oatie-backend-green"},
                    "spec": {"template": {"spec": {"containers": [{"name": "oatie-backend", "image": V2}]}}}
                }))
            );
            assert!(log.iter().filter(|r| r.method == "GET").all(|r| r.body.is_none()));
            assert_eq!(
                *seen.lock().unwrap(),
                [
                    format!("applying image {V2} to shop/oatie-backend-green"),
                    "rollout: waiting for the deployment controller to observe generation 5".to_string(),
                    "rollout: 1/3 updated, 0/3 available".to_string(),
                    "rollout: 3/3 updated, 3/3 available, 1 old replicas terminating".to_string(),
                    "rollout: 3/3 updated, 3/3 available".to_string(),
                ]
            );
        })
        .await
    }

    #[tokio::test]
    async fn deploy_fails_on_progress_deadline_with_events() {
        within(async {
            let pde = condition(
                "Progressing",
                "False",
                "ProgressDeadlineExceeded",
                "ReplicaSet \"oatie-backend-green-7d9f8c6b5d\" has timed out progressing.",
            );
            let available = condition("Available", "True", "MinimumReplicasAvailable", "Deployment has minimum availability.");
            let pod = json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "oatie-backend-green-7d9f8c6b5d-x2v9q", "namespace": NS,
                             "labels": {"app": APP, "color": "green", "pod-template-hash": "7d9f8c6b5d"}},
                "spec": {"containers": [{"name": APP, "image": V2}]},
                "status": {
                    "phase": "Pending",
                    "containerStatuses": [{
                        "name": APP, "image": V2, "imageID": "", "ready": false, "restartCount": 0, "started": false,
                        "state": {"waiting": {"reason": "ImagePullBackOff",
                                              "message": "Back-off pulling image \"registry.example/shop/oatie-backend:v2\""}}
                    }]
                }
            });
            let (driver, server) = start(
                spec(),
                script(vec![
                    ("GET", SVC, service(APP, "blue", 80, json!({}))),
                    ("GET", GREEN, deployment("green", V1, 4, 3, complete_status(4, 3))),
                    ("PATCH", GREEN_APPLY, deployment("green", V2, 5, 3, complete_status(4, 3))),
                    (
                        "GET",
                        GREEN,
                        deployment("green", V2, 5, 3, rollout_status(5, 4, 1, 3, 3, vec![available.clone()])),
                    ),
                    ("GET", GREEN, deployment("green", V2, 5, 3, rollout_status(5, 4, 1, 3, 3, vec![available, pde]))),
                    (
                        "GET",
                        GREEN_EVENTS,
                        list(
                            "EventList",
                            vec![
                                // Listed out of order: diagnostics sort by time.
                                event(
                                    "oatie-backend-green",
                                    "Deployment",
                                    "ScalingReplicaSet",
                                    "Scaled up replica set oatie-backend-green-7d9f8c6b5d from 0 to 1",
                                    "2025-03-01T10:00:02Z",
                                    1,
                                ),
                                event(
                                    "oatie-backend-green",
                                    "Deployment",
                                    "ScalingReplicaSet",
                                    "Scaled up replica set oatie-backend-green-5c4b7d9f6 from 0 to 3",
                                    "2025-02-27T08:00:00Z",
                                    1,
                                ),
                            ],
                        ),
                    ),
                    (
                        "GET",
                        GREEN_RS,
                        list(
                            "ReplicaSetList",
                            vec![
                                replica_set("5c4b7d9f6", 4, V1, "oatie-backend-green"),
                                replica_set("7d9f8c6b5d", 5, V2, "oatie-backend-green"),
                                // Same labels, another owner: never chosen.
                                replica_set("9a9a9a9a9a", 9, V2, "someone-else"),
                            ],
                        ),
                    ),
                    (
                        "GET",
                        NEW_RS_EVENTS,
                        list(
                            "EventList",
                            vec![event(
                                "oatie-backend-green-7d9f8c6b5d",
                                "ReplicaSet",
                                "SuccessfulCreate",
                                "Created pod: oatie-backend-green-7d9f8c6b5d-x2v9q",
                                "2025-03-01T10:00:02Z",
                                1,
                            )],
                        ),
                    ),
                    ("GET", NEW_RS_PODS, list("PodList", vec![pod])),
                ]),
            );
            let (seen, progress) = progress_log();
            let result = driver.deploy(Color::Green, V2, &progress).await;
            let log = finish(driver, server).await;
            let err = result.expect_err("deploy must fail");
            assert_eq!(
                calls(&log),
                [
                    ("GET", SVC),
                    ("GET", GREEN),
                    ("PATCH", GREEN_APPLY),
                    ("GET", GREEN),
                    ("GET", GREEN),
                    ("GET", GREEN_EVENTS),
                    ("GET", GREEN_RS),
                    ("GET", NEW_RS_EVENTS),
                    ("GET", NEW_RS_PODS),
                ]
            );
            assert_eq!(
                err.message,
                format!(
                    "rollout of shop/oatie-backend-green to {V2} failed: ProgressDeadlineExceeded: ReplicaSet \
                     \"oatie-backend-green-7d9f8c6b5d\" has timed out progressing. (1/3 updated, 3/3 ready, 3/3 available)"
                )
            );
            assert_eq!(
                err.diagnostics,
                [
                    "Deployment oatie-backend-green: ScalingReplicaSet: Scaled up replica set oatie-backend-green-5c4b7d9f6 from 0 to 3",
                    "Deployment oatie-backend-green: ScalingReplicaSet: Scaled up replica set oatie-backend-green-7d9f8c6b5d from 0 to 1",
                    "ReplicaSet oatie-backend-green-7d9f8c6b5d: SuccessfulCreate: Created pod: oatie-backend-green-7d9f8c6b5d-x2v9q",
                    "Pod oatie-backend-green-7d9f8c6b5d-x2v9q: container oatie-backend waiting: ImagePullBackOff: \
                     Back-off pulling image \"registry.example/shop/oatie-backend:v2\"",
                ]
            );
            assert!(seen.lock().unwrap().contains(&"rollout: 1/3 updated, 3/3 available".to_string()));
        })
        .await
    }

    #[tokio::test]
    async fn deploy_fails_when_the_rollout_makes_no_progress() {
        within(async {
            let stuck = deployment("green", V2, 5, 3, rollout_status(5, 4, 1, 3, 3, vec![]));
            let applied = stuck.clone();
            let empty_events = list("EventList", vec![]);
            let mut polls = 0;
            let handler: Handler = Box::new(move |req: &Req| {
                let answer = match (req.method.as_str(), req.path.as_str()) {
                    ("GET", SVC) => service(APP, "blue", 80, json!({})),
                    ("GET", GREEN) if polls == 0 => {
                        polls += 1;
                        deployment("green", V1, 4, 3, complete_status(4, 3))
                    }
                    ("GET", GREEN) => stuck.clone(),
                    ("PATCH", GREEN_APPLY) => applied.clone(),
                    ("GET", GREEN_EVENTS) => empty_events.clone(),
                    ("GET", GREEN_RS) => list("ReplicaSetList", vec![]),
                    _ => panic!("unexpected request {} {}", req.method, req.path),
                };
                (StatusCode::OK, answer)
            });
            let (mut driver, server) = start(spec(), handler);
            driver.progress_deadline = Duration::from_millis(60);
            let started = std::time::Instant::now();
            let result = driver.deploy(Color::Green, V2, &|_| {}).await;
            let log = finish(driver, server).await;
            let err = result.expect_err("a stuck rollout must fail");
            assert!(started.elapsed() >= Duration::from_millis(60));
            assert_eq!(
                err.message,
                format!("rollout of shop/oatie-backend-green to {V2} made no progress for 0.06s (1/3 updated, 3/3 ready, 3/3 available)")
            );
            assert!(err.diagnostics.is_empty(), "{:?}", err.diagnostics);
            let c = calls(&log);
            assert_eq!(c[..3], [("GET", SVC), ("GET", GREEN), ("PATCH", GREEN_APPLY)]);
            assert_eq!(c[c.len() - 2..], [("GET", GREEN_EVENTS), ("GET", GREEN_RS)]);
            let polls = &c[3..c.len() - 2];
            assert!(polls.len() >= 3 && polls.iter().all(|p| *p == ("GET", GREEN)), "{polls:?}");
        })
        .await
    }

    #[tokio::test]
    async fn deploy_restores_a_scaled_down_color_first() {
        within(async {
            let mut stopped = deployment("green", V1, 6, 0, rollout_status(6, 0, 0, 0, 0, vec![]));
            stopped["metadata"]["annotations"][SCALED_DOWN_FROM_ANNOTATION] = json!("4");
            let (driver, server) = start(
                spec(),
                script(vec![
                    ("GET", SVC, service(APP, "blue", 80, json!({}))),
                    ("GET", GREEN, stopped),
                    (
                        "PATCH",
                        GREEN_MERGE,
                        deployment("green", V1, 7, 4, rollout_status(6, 0, 0, 0, 0, vec![])),
                    ),
                    (
                        "PATCH",
                        GREEN_APPLY,
                        deployment("green", V2, 8, 4, rollout_status(6, 0, 0, 0, 0, vec![])),
                    ),
                    ("GET", GREEN, deployment("green", V2, 8, 4, complete_status(8, 4))),
                ]),
            );
            let result = driver.deploy(Color::Green, V2, &|_| {}).await;
            let log = finish(driver, server).await;
            result.expect("deploy");
            assert_eq!(
                calls(&log),
                [
                    ("GET", SVC),
                    ("GET", GREEN),
                    ("PATCH", GREEN_MERGE),
                    ("PATCH", GREEN_APPLY),
                    ("GET", GREEN)
                ]
            );
            assert_eq!(log[2].content_type.as_deref(), Some(MERGE));
            assert_eq!(
                log[2].body,
                Some(
                    json!({"metadata": {"annotations": {SCALED_DOWN_FROM_ANNOTATION: null}}, "spec": {"replicas": 4}})
                )
            );
        })
        .await
    }

    #[tokio::test]
    async fn deploy_refuses_the_active_color_and_unknown_containers() {
        within(async {
            let (driver, server) = start(spec(), script(vec![("GET", SVC, service(APP, "green", 80, json!({})))]));
            let err = driver
                .deploy(Color::Green, V2, &|_| {})
                .await
                .expect_err("active color");
            assert_eq!(calls(&finish(driver, server).await), [("GET", SVC)]);
            assert!(err.message.contains("refusing to deploy to green"), "{}", err.message);

            // kubernetes.container names a container the Deployment lacks:
            // nothing is written (an apply would add a second container).
            let spec = KubeSpec {
                container: Some("api".into()),
                ..spec()
            };
            let (driver, server) = start(
                spec,
                script(vec![
                    ("GET", SVC, service(APP, "blue", 80, json!({}))),
                    ("GET", GREEN, deployment("green", V1, 4, 3, complete_status(4, 3))),
                ]),
            );
            let err = driver
                .deploy(Color::Green, V2, &|_| {})
                .await
                .expect_err("unknown container");
            assert_eq!(calls(&finish(driver, server).await), [("GET", SVC), ("GET", GREEN)]);
            assert!(err.message.contains("has no container \"api\""), "{}", err.message);
        })
        .await
    }

    /// Maintenance scales both colors to zero, remembering each count, and
    /// waits until their pods (terminating ones too) are gone; ending it
    /// restores the counts and waits for the rollouts. Status reports it.
    #[tokio::test]
    async fn maintenance_scales_both_colors_to_zero_and_back() {
        const BLUE_MERGE: &str = "/apis/apps/v1/namespaces/shop/deployments/oatie-backend-blue?&fieldManager=cutover";
        const BLUE_PODS: &str = "/api/v1/namespaces/shop/pods?&labelSelector=app%3Doatie-backend%2Ccolor%3Dblue";
        const GREEN_PODS: &str = "/api/v1/namespaces/shop/pods?&labelSelector=app%3Doatie-backend%2Ccolor%3Dgreen";
        let held = |color: &str, image: &str, generation: i64, from: &str| {
            let mut d = deployment(
                color,
                image,
                generation,
                0,
                rollout_status(generation, 0, 0, 0, 0, vec![]),
            );
            d["metadata"]["annotations"][MAINTENANCE_FROM_ANNOTATION] = json!(from);
            d
        };
        let terminating = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "oatie-backend-blue-7d9f8c6b5d-x2x9k", "namespace": NS,
                         "labels": {"app": APP, "color": "blue", "pod-template-hash": "7d9f8c6b5d"},
                         "deletionTimestamp": "2025-03-01T10:05:00Z"},
            "status": {"phase": "Running"}
        });
        within(async {
            let (seen, progress) = progress_log();
            let (driver, server) = start(
                spec(),
                script(vec![
                    ("GET", BLUE, deployment("blue", V1, 4, 3, complete_status(4, 3))),
                    ("PATCH", BLUE_MERGE, held("blue", V1, 5, "3")),
                    ("GET", GREEN, deployment("green", V2, 6, 2, complete_status(6, 2))),
                    ("PATCH", GREEN_MERGE, held("green", V2, 7, "2")),
                    ("GET", BLUE_PODS, list("PodList", vec![terminating.clone()])),
                    ("GET", BLUE_PODS, list("PodList", vec![])),
                    ("GET", GREEN_PODS, list("PodList", vec![])),
                ]),
            );
            driver.maintenance(true, &progress).await.expect("maintenance on");
            let log = finish(driver, server).await;
            assert_eq!(log.len(), 7);
            for (i, from) in [(1, "3"), (3, "2")] {
                assert_eq!(log[i].content_type.as_deref(), Some(MERGE));
                assert_eq!(
                    log[i].body,
                    Some(json!({"metadata": {"annotations": {MAINTENANCE_FROM_ANNOTATION: from}}, "spec": {"replicas": 0}}))
                );
            }
            let seen = seen.lock().unwrap().join("\n");
            assert!(seen.contains("waiting for 1 pod(s) to stop"), "{seen}");

            let (driver, server) = start(
                spec(),
                script(vec![
                    ("GET", BLUE, held("blue", V1, 5, "3")),
                    ("GET", GREEN, held("green", V2, 7, "2")),
                    ("GET", SVC, service(APP, "blue", 80, json!({}))),
                ]),
            );
            let st = driver.status().await.expect("status");
            finish(driver, server).await;
            assert!(st.maintenance, "{st:?}");

            let (driver, server) = start(
                spec(),
                script(vec![
                    ("GET", BLUE, held("blue", V1, 5, "3")),
                    ("PATCH", BLUE_MERGE, deployment("blue", V1, 6, 3, rollout_status(5, 0, 0, 0, 0, vec![]))),
                    ("GET", GREEN, held("green", V2, 7, "2")),
                    ("PATCH", GREEN_MERGE, deployment("green", V2, 8, 2, rollout_status(7, 0, 0, 0, 0, vec![]))),
                    ("GET", BLUE, deployment("blue", V1, 6, 3, complete_status(6, 3))),
                    ("GET", GREEN, deployment("green", V2, 8, 2, complete_status(8, 2))),
                ]),
            );
            driver.maintenance(false, &|_| {}).await.expect("maintenance off");
            let log = finish(driver, server).await;
            for (i, n) in [(1, 3), (3, 2)] {
                assert_eq!(
                    log[i].body,
                    Some(json!({"metadata": {"annotations": {MAINTENANCE_FROM_ANNOTATION: null}}, "spec": {"replicas": n}}))
                );
            }
        })
        .await
    }

    // ---- switch, rollback, status against a stateful fake ----

    /// RFC 7386 JSON merge patch.
    fn merge(target: &mut Value, patch: &Value) {
        match (target, patch) {
            (Value::Object(t), Value::Object(p)) => {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
            (t, p) => *t = p.clone(),
        }
    }

    /// An API server holding objects by path: GET returns them, a merge
    /// PATCH (`?&fieldManager=cutover`) merges into them.
    fn fake(objects: Arc<Mutex<BTreeMap<String, Value>>>) -> Handler {
        Box::new(move |req: &Req| {
            let mut objects = objects.lock().unwrap();
            match req.method.as_str() {
                "GET" => match objects.get(&req.path) {
                    Some(o) => (StatusCode::OK, o.clone()),
                    None => (
                        StatusCode::NOT_FOUND,
                        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                               "message": format!("{} not found", req.path), "reason": "NotFound", "code": 404}),
                    ),
                },
                "PATCH" => {
                    let path = req
                        .path
                        .strip_suffix("?&fieldManager=cutover")
                        .expect("field manager cutover");
                    let o = objects
                        .get_mut(path)
                        .unwrap_or_else(|| panic!("PATCH of missing {path}"));
                    let body = req.body.as_ref().expect("patch body");
                    match req.content_type.as_deref() {
                        Some(MERGE) => merge(o, body),
                        Some(JSON_PATCH) => {
                            if let Err(status) = json_patch(o, body) {
                                return (StatusCode::UNPROCESSABLE_ENTITY, status);
                            }
                        }
                        other => panic!("unexpected patch type {other:?}"),
                    }
                    (StatusCode::OK, o.clone())
                }
                m => panic!("unexpected {m} {}", req.path),
            }
        })
    }

    fn cluster(active: &str) -> Arc<Mutex<BTreeMap<String, Value>>> {
        let mut blue_status = complete_status(3, 3);
        blue_status["readyReplicas"] = json!(3);
        Arc::new(Mutex::new(BTreeMap::from([
            (
                SVC.to_string(),
                service(APP, active, 80, json!({LAST_SWITCH_ANNOTATION: "1740819600000"})),
            ),
            (
                PREVIEW.to_string(),
                service(
                    "oatie-backend-preview",
                    if active == "blue" { "green" } else { "blue" },
                    8080,
                    json!({}),
                ),
            ),
            (BLUE.to_string(), deployment("blue", V1, 3, 3, blue_status)),
            (GREEN.to_string(), deployment("green", V2, 5, 3, complete_status(5, 3))),
        ])))
    }

    /// The `test` and `add` operations of RFC 6902, as the API server
    /// applies them: all or nothing.
    fn json_patch(o: &mut Value, ops: &Value) -> Result<(), Value> {
        let mut next = o.clone();
        for op in ops.as_array().expect("a JSON Patch is an array") {
            let path = op["path"].as_str().unwrap();
            match op["op"].as_str().unwrap() {
                "test" if next.pointer(path) == Some(&op["value"]) => {}
                "test" => {
                    return Err(
                        json!({"kind": "Status", "status": "Failure", "code": 422, "reason": "Invalid",
                                      "message": format!("the server rejected our request due to an error in our request: testing value {path} failed")}),
                    );
                }
                "add" => {
                    let (parent, key) = path.rsplit_once('/').unwrap();
                    next.pointer_mut(parent).unwrap()[key] = op["value"].clone();
                }
                other => panic!("unexpected JSON Patch op {other}"),
            }
        }
        *o = next;
        Ok(())
    }

    /// HTTPRoute `oatie-backend` as `kubectl get -o json` shows it: the
    /// app's rule splits between its two Services with `weights` (stable,
    /// canary); a second rule sends /admin elsewhere.
    fn http_route(weights: (u32, u32)) -> Value {
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": APP, "namespace": NS, "generation": 3, "resourceVersion": "81422",
                         "uid": "c1a7e0f2-2222-4d3b-9e2f-000000000002"},
            "spec": {
                "parentRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                "name": "public", "namespace": "gateway"}],
                "hostnames": ["shop.example.com"],
                "rules": [
                    {"matches": [{"path": {"type": "PathPrefix", "value": "/admin"}}],
                     "backendRefs": [{"group": "", "kind": "Service", "name": "admin", "port": 80, "weight": 1}]},
                    {"matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                     "backendRefs": [
                        {"group": "", "kind": "Service", "name": APP, "port": 80, "weight": weights.0},
                        {"group": "", "kind": "Service", "name": "oatie-backend-preview", "port": 8080, "weight": weights.1}
                     ]}
                ]
            },
            "status": {"parents": [{"parentRef": {"name": "public", "namespace": "gateway"},
                                    "controllerName": "example.net/gateway-controller",
                                    "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                                                    "message": "", "lastTransitionTime": "2025-03-01T09:00:00Z",
                                                    "observedGeneration": 3}]}]}
        })
    }

    fn route_spec() -> KubeSpec {
        KubeSpec {
            http_route: Some(APP.into()),
            ..spec()
        }
    }

    /// The (stable, canary) weights of the app's rule.
    fn route_weights(objects: &Mutex<BTreeMap<String, Value>>) -> (Value, Value) {
        let refs = objects.lock().unwrap()[ROUTE]["spec"]["rules"][1]["backendRefs"].clone();
        (refs[0]["weight"].clone(), refs[1]["weight"].clone())
    }

    /// The exact JSON Patch of a canary step at `weight`.
    fn weight_ops(weight: u32) -> Value {
        json!([
            {"op": "test", "path": "/spec/rules/1/backendRefs/0/name", "value": APP},
            {"op": "add", "path": "/spec/rules/1/backendRefs/0/weight", "value": 100 - weight},
            {"op": "test", "path": "/spec/rules/1/backendRefs/1/name", "value": "oatie-backend-preview"},
            {"op": "add", "path": "/spec/rules/1/backendRefs/1/weight", "value": weight},
        ])
    }

    /// A canary step sets the two backends' weights in one JSON Patch that
    /// tests each index first, after checking that the preview Service
    /// selects the canary's color; the status reads the split back; the
    /// /admin rule is left alone.
    #[tokio::test]
    async fn canary_steps_set_the_httproute_backend_weights() {
        within(async {
            let objects = cluster("blue");
            objects.lock().unwrap().insert(ROUTE.into(), http_route((100, 0)));
            let (driver, server) = start(route_spec(), fake(objects.clone()));
            driver.set_canary(Color::Green, 25).await.expect("5 -> 25");
            let status = driver.status().await.expect("status");
            driver.set_canary(Color::Green, 0).await.expect("back to 0");
            let log = finish(driver, server).await;
            assert_eq!(status.canary_weight, 25);
            assert_eq!(
                calls(&log),
                [
                    ("GET", PREVIEW),
                    ("GET", ROUTE),
                    ("PATCH", ROUTE_PATCH),
                    ("GET", BLUE),
                    ("GET", GREEN),
                    ("GET", SVC),
                    ("GET", ROUTE),
                    ("GET", ROUTE),
                    ("PATCH", ROUTE_PATCH),
                ]
            );
            assert_eq!(log[2].content_type.as_deref(), Some(JSON_PATCH));
            assert_eq!(log[2].body, Some(weight_ops(25)));
            assert_eq!(log[8].body, Some(weight_ops(0)));
            assert_eq!(route_weights(&objects), (json!(100), json!(0)));
            let admin = objects.lock().unwrap()[ROUTE]["spec"]["rules"][0].clone();
            assert_eq!(admin, http_route((100, 0))["spec"]["rules"][0]);
        })
        .await;
    }

    /// A weight for a color the preview Service does not select, or a
    /// route without both backends, is refused and patches nothing.
    #[tokio::test]
    async fn a_canary_that_cannot_be_routed_is_refused_before_any_write() {
        within(async {
            let objects = cluster("blue");
            let mut other = http_route((100, 0));
            other["spec"]["rules"][1]["backendRefs"][1]["name"] = json!("someone-else");
            objects.lock().unwrap().insert(ROUTE.into(), other);
            let (driver, server) = start(route_spec(), fake(objects.clone()));
            let wrong = driver.set_canary(Color::Blue, 25).await.unwrap_err();
            let unrouted = driver.set_canary(Color::Green, 25).await.unwrap_err();
            let log = finish(driver, server).await;
            assert!(wrong.message.contains("selects green, not blue"), "{}", wrong.message);
            assert!(
                unrouted
                    .message
                    .contains("no rule with backendRefs to both services oatie-backend and oatie-backend-preview"),
                "{}",
                unrouted.message
            );
            assert!(log.iter().all(|r| r.method == "GET"), "{:?}", calls(&log));
            // Without a route, the driver says what it needs.
            let (driver, server) = start(spec(), fake(cluster("blue")));
            let e = driver.set_canary(Color::Green, 5).await.unwrap_err();
            assert!(finish(driver, server).await.is_empty());
            assert!(e.message.contains("kubernetes.http_route"), "{}", e.message);
        })
        .await;
    }

    /// The switch that ends a canary: Service <app> moves first (both
    /// Services then select green), the weight returns to the stable
    /// backend, and only then does the preview select blue: no request
    /// goes back to blue on the way.
    #[tokio::test]
    async fn a_switch_ends_the_canary_before_the_preview_moves() {
        within(async {
            let objects = cluster("blue");
            objects.lock().unwrap().insert(ROUTE.into(), http_route((50, 50)));
            let (driver, server) = start(route_spec(), fake(objects.clone()));
            driver.switch(Color::Green).await.expect("switch");
            let log = finish(driver, server).await;
            assert_eq!(
                calls(&log),
                [
                    ("PATCH", SVC_MERGE),
                    ("GET", ROUTE),
                    ("PATCH", ROUTE_PATCH),
                    ("PATCH", PREVIEW_MERGE)
                ]
            );
            assert_eq!(log[2].body, Some(weight_ops(0)));
            assert_eq!(route_weights(&objects), (json!(100), json!(0)));
            assert_eq!(selector_color(&objects, SVC), json!({"app": APP, "color": "green"}));
            assert_eq!(selector_color(&objects, PREVIEW), json!({"app": APP, "color": "blue"}));
        })
        .await;
    }

    fn selector_color(objects: &Mutex<BTreeMap<String, Value>>, path: &str) -> Value {
        objects.lock().unwrap()[path]["spec"]["selector"].clone()
    }

    fn now_ms() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    }

    #[tokio::test]
    async fn switch_moves_the_service_and_the_preview() {
        within(async {
            let objects = cluster("blue");
            let (driver, server) = start(spec(), fake(objects.clone()));
            let before = now_ms();
            let result = driver.switch(Color::Green).await;
            let after = now_ms();
            let log = finish(driver, server).await;
            result.expect("switch");
            assert_eq!(calls(&log), [("PATCH", SVC_MERGE), ("PATCH", PREVIEW_MERGE)]);
            assert!(log.iter().all(|r| r.content_type.as_deref() == Some(MERGE)));
            let stamp: i64 = log[0].body.as_ref().unwrap()["metadata"]["annotations"][LAST_SWITCH_ANNOTATION]
                .as_str()
                .expect("annotation is a string")
                .parse()
                .unwrap();
            assert!((before..=after).contains(&stamp), "{before} <= {stamp} <= {after}");
            assert_eq!(
                log[0].body,
                Some(
                    json!({"metadata": {"annotations": {LAST_SWITCH_ANNOTATION: stamp.to_string()}},
                            "spec": {"selector": {"color": "green"}}})
                )
            );
            assert_eq!(log[1].body, Some(json!({"spec": {"selector": {"color": "blue"}}})));
            // The merge keeps app=<app> in both selectors.
            assert_eq!(selector_color(&objects, SVC), json!({"app": APP, "color": "green"}));
            assert_eq!(selector_color(&objects, PREVIEW), json!({"app": APP, "color": "blue"}));
        })
        .await
    }

    #[tokio::test]
    async fn rollback_is_a_switch_back() {
        within(async {
            let objects = cluster("blue");
            let (driver, server) = start(spec(), fake(objects.clone()));
            driver.switch(Color::Green).await.expect("cutover");
            assert_eq!(driver.status().await.expect("status").active, Some(Color::Green));
            driver.switch(Color::Blue).await.expect("rollback");
            let st = driver.status().await.expect("status");
            let log = finish(driver, server).await;
            assert_eq!(st.active, Some(Color::Blue));
            let status_calls = [("GET", BLUE), ("GET", GREEN), ("GET", SVC)];
            let mut want = vec![("PATCH", SVC_MERGE), ("PATCH", PREVIEW_MERGE)];
            want.extend(status_calls);
            want.extend([("PATCH", SVC_MERGE), ("PATCH", PREVIEW_MERGE)]);
            want.extend(status_calls);
            assert_eq!(calls(&log), want);
            assert_eq!(
                log[5].body.as_ref().unwrap()["spec"],
                json!({"selector": {"color": "blue"}})
            );
            assert_eq!(log[6].body, Some(json!({"spec": {"selector": {"color": "green"}}})));
            let rollback_stamp =
                log[5].body.as_ref().unwrap()["metadata"]["annotations"][LAST_SWITCH_ANNOTATION].clone();
            assert_eq!(
                st.last_switch_unix_ms.map(|v| json!(v.to_string())),
                Some(rollback_stamp)
            );
            assert_eq!(selector_color(&objects, SVC), json!({"app": APP, "color": "blue"}));
            assert_eq!(selector_color(&objects, PREVIEW), json!({"app": APP, "color": "green"}));
        })
        .await
    }

    #[tokio::test]
    async fn status_reads_both_deployments_and_the_service() {
        within(async {
            let objects = cluster("blue");
            {
                let mut o = objects.lock().unwrap();
                // Green mid-rollout: 1 of 3 ready. Its image sits in the
                // second container (a sidecar comes first).
                let g = o.get_mut(GREEN).unwrap();
                g["status"] = rollout_status(5, 3, 3, 1, 1, vec![]);
                let main = g["spec"]["template"]["spec"]["containers"][0].clone();
                g["spec"]["template"]["spec"]["containers"] =
                    json!([{"name": "envoy", "image": "envoyproxy/envoy:v1.31.0"}, main]);
            }
            let (driver, server) = start(spec(), fake(objects.clone()));
            let st = driver.status().await.expect("status");
            let log = finish(driver, server).await;
            assert_eq!(calls(&log), [("GET", BLUE), ("GET", GREEN), ("GET", SVC)]);
            assert_eq!(
                st,
                AppClusterStatus {
                    canary_weight: 0,
                    active: Some(Color::Blue),
                    colors: vec![
                        ColorStatus {
                            color: Color::Blue,
                            image: V1.into(),
                            replicas_ready: 3,
                            replicas_desired: 3,
                            healthy: true
                        },
                        ColorStatus {
                            color: Color::Green,
                            image: V2.into(),
                            replicas_ready: 1,
                            replicas_desired: 3,
                            healthy: false
                        },
                    ],
                    last_switch_unix_ms: Some(1_740_819_600_000),
                    maintenance: false,
                }
            );

            // No color selector and no annotation yet; green does not exist.
            {
                let mut o = objects.lock().unwrap();
                o.get_mut(SVC).unwrap()["spec"]["selector"] = json!({"app": APP});
                o.get_mut(SVC).unwrap()["metadata"]["annotations"] = json!({});
                o.remove(GREEN);
            }
            let (driver, server) = start(spec(), fake(objects));
            let st = driver.status().await.expect("status");
            finish(driver, server).await;
            assert_eq!(st.active, None);
            assert_eq!(st.last_switch_unix_ms, None);
            assert_eq!(
                st.colors[1],
                ColorStatus {
                    color: Color::Green,
                    image: String::new(),
                    replicas_ready: 0,
                    replicas_desired: 0,
                    healthy: false
                }
            );
        })
        .await
    }

    #[tokio::test]
    async fn scale_down_and_addresses() {
        within(async {
            let objects = cluster("blue");
            let (driver, server) = start(spec(), fake(objects.clone()));
            driver.scale_down(Color::Green).await.expect("scale down");
            let refused = driver.scale_down(Color::Blue).await.expect_err("blue is active");
            let addr = driver.preview_address().await.expect("preview address");
            let service_addr = driver.service_address().await.expect("service address");
            let log = finish(driver, server).await;
            assert_eq!(
                calls(&log),
                [
                    ("GET", SVC),
                    ("GET", GREEN),
                    ("PATCH", GREEN_MERGE),
                    ("GET", SVC),
                    ("GET", PREVIEW),
                    ("GET", SVC),
                ]
            );
            assert_eq!(
                log[2].body,
                Some(json!({"metadata": {"annotations": {SCALED_DOWN_FROM_ANNOTATION: "3"}}, "spec": {"replicas": 0}}))
            );
            assert_eq!(objects.lock().unwrap()[GREEN]["spec"]["replicas"], json!(0));
            assert!(
                refused.message.contains("refusing to scale down blue"),
                "{}",
                refused.message
            );
            assert_eq!(addr, "oatie-backend-preview.shop.svc:8080");
            assert_eq!(service_addr, "oatie-backend.shop.svc:80");
        })
        .await
    }

    // ---- scratch color (drills) ----

    const DRILL: &str = "/apis/apps/v1/namespaces/shop/deployments/oatie-backend-drill";
    const DRILL_APPLY: &str =
        "/apis/apps/v1/namespaces/shop/deployments/oatie-backend-drill?&force=true&fieldManager=cutover";
    const DRILL_MERGE: &str = "/apis/apps/v1/namespaces/shop/deployments/oatie-backend-drill?&fieldManager=cutover";
    const DRILL_SVC: &str = "/api/v1/namespaces/shop/services/oatie-backend-drill";

    /// A drill's scratch color: the operator's `<app>-drill` Deployment,
    /// stopped, is scaled to one pod with the image, rolled out, and reached
    /// through Service `<app>-drill`; stopping it scales it back to zero.
    #[tokio::test]
    async fn a_scratch_color_scales_the_drill_deployment_up_and_back_down() {
        within(async {
            let stopped = deployment("drill", V1, 3, 0, rollout_status(3, 0, 0, 0, 0, vec![]));
            let (driver, server) = start(
                spec(),
                script(vec![
                    ("GET", DRILL, stopped),
                    (
                        "PATCH",
                        DRILL_MERGE,
                        deployment("drill", V1, 4, 1, rollout_status(3, 0, 0, 0, 0, vec![])),
                    ),
                    (
                        "PATCH",
                        DRILL_APPLY,
                        deployment("drill", V2, 5, 1, rollout_status(3, 0, 0, 0, 0, vec![])),
                    ),
                    ("GET", DRILL, deployment("drill", V2, 5, 1, complete_status(5, 1))),
                    ("GET", DRILL_SVC, service("oatie-backend-drill", "drill", 80, json!({}))),
                    ("GET", DRILL, deployment("drill", V2, 5, 1, complete_status(5, 1))),
                    (
                        "PATCH",
                        DRILL_MERGE,
                        deployment("drill", V2, 6, 0, complete_status(5, 1)),
                    ),
                ]),
            );
            let (seen, progress) = progress_log();
            let addr = driver.start_scratch(V2, &progress).await;
            let stopped = driver.stop_scratch().await;
            let log = finish(driver, server).await;
            assert_eq!(addr.expect("start_scratch"), "oatie-backend-drill.shop.svc:80");
            stopped.expect("stop_scratch");
            assert_eq!(
                calls(&log),
                [
                    ("GET", DRILL),
                    ("PATCH", DRILL_MERGE),
                    ("PATCH", DRILL_APPLY),
                    ("GET", DRILL),
                    ("GET", DRILL_SVC),
                    ("GET", DRILL),
                    ("PATCH", DRILL_MERGE)
                ]
            );
            assert_eq!(
                (log[1].content_type.as_deref(), log[1].body.clone()),
                (Some(MERGE), Some(json!({"spec": {"replicas": 1}})))
            );
            assert_eq!(log[2].content_type.as_deref(), Some(APPLY));
            assert_eq!(
                log[2].body,
                Some(json!({
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "metadata": {"name": "oatie-backend-drill"},
                    "spec": {"template": {"spec": {"containers": [{"name": "oatie-backend", "image": V2}]}}}
                }))
            );
            assert_eq!(log[6].body, Some(json!({"spec": {"replicas": 0}})));
            assert_eq!(
                seen.lock().unwrap().first().map(String::as_str),
                Some(format!("scratch color: applying image {V2} to shop/oatie-backend-drill").as_str())
            );
        })
        .await
    }

    /// Without the drill Deployment a drill is refused, saying what to
    /// apply; stopping a scratch color that never ran changes nothing.
    #[tokio::test]
    async fn a_scratch_color_without_the_drill_deployment_is_refused_naming_it() {
        within(async {
            let objects = Arc::new(Mutex::new(BTreeMap::new()));
            let (driver, server) = start(spec(), fake(objects));
            let e = driver.start_scratch(V2, &|_| {}).await.unwrap_err();
            let stopped = driver.stop_scratch().await;
            let log = finish(driver, server).await;
            assert!(
                e.message.contains("deployment shop/oatie-backend-drill does not exist")
                    && e.message.contains("app=oatie-backend,color=drill"),
                "{}",
                e.message
            );
            stopped.expect("stop_scratch of nothing");
            assert_eq!(calls(&log), [("GET", DRILL), ("GET", DRILL)]);
        })
        .await
    }
}
