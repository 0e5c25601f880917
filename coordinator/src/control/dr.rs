//! The disaster-recovery reads of `ControlService`: `GetDrStatus` and
//! `PlanFailover`. Both are computed from this node's applied state; the
//! plan itself is `cutover_shared::dr::plan`, the same function a failover
//! will run, so what `cutover dr plan` shows is what would happen.

use cutover_shared::backup::{BackupEntry, newest_validated};
use cutover_shared::domain::{AgentState, ClusterRef, OperationKind, now_unix_ms, validate_name};
use cutover_shared::dr::{self, ClusterView, DataSource, FailoverPlan, PlanInput};
use cutover_shared::identity::Identity;
use cutover_shared::operation::{FailoverSpec, OperationSpec};
use cutover_shared::proto as pb;
use cutover_shared::task::TaskKind;

use super::ControlApi;
use super::error::ApiError;
use crate::state::State;

/// Each cluster of `app` with its agent's state and database, in the app's
/// order.
fn cluster_views(s: &State, app: &cutover_shared::app::AppSpec) -> Vec<ClusterView> {
    let dbs = s.db_status.get(&app.name);
    app.clusters
        .iter()
        .map(|c| {
            let cluster = c.cluster_ref();
            let key = cluster.to_string();
            ClusterView {
                agent_up: s.agents.get(&key).is_some_and(|a| a.state == AgentState::Up),
                database: dbs.and_then(|d| d.get(&key)).cloned(),
                cluster,
            }
        })
        .collect()
}

fn app_backups<'a>(s: &'a State, app: &str) -> Vec<&'a BackupEntry> {
    s.backups.values().filter(|b| b.app == app).collect()
}

/// The unfinished operation on any cluster of `app`, if there is one.
fn running_on(s: &State, app: &cutover_shared::app::AppSpec) -> Option<String> {
    app.clusters
        .iter()
        .find_map(|c| s.running_operation(&app.name, &c.cluster_ref()).map(str::to_owned))
}

impl ControlApi {
    pub async fn get_dr_status(&self, r: pb::GetDrStatusRequest) -> Result<pb::GetDrStatusResponse, ApiError> {
        let spec = self.app(&r.app)?;
        let clusters = self.consensus.read(|s| {
            let views = cluster_views(s, &spec);
            let primary_lsn = dr::primaries(&views)
                .first()
                .and_then(|p| p.database.as_ref())
                .and_then(|d| d.lsn);
            let backups = app_backups(s, &spec.name);
            views
                .into_iter()
                .map(|v| {
                    let here: Vec<&BackupEntry> = backups.iter().copied().filter(|b| b.cluster == v.cluster).collect();
                    let last_backup = here
                        .iter()
                        .copied()
                        .max_by(|a, b| (a.finished_at_unix_ms, &a.id).cmp(&(b.finished_at_unix_ms, &b.id)));
                    let last_validated = newest_validated(here.iter().copied());
                    let lag_bytes = v.database.as_ref().and_then(|d| {
                        (d.role == Some(dr::DbRole::Standby))
                            .then(|| primary_lsn.zip(d.lsn).map(|(p, s)| p.saturating_sub(s)))
                            .flatten()
                    });
                    pb::DrClusterStatus {
                        region: v.cluster.region.clone(),
                        cluster: v.cluster.cluster.clone(),
                        agent_up: v.agent_up,
                        database: v.database.map(Into::into),
                        lag_bytes,
                        last_backup: last_backup.cloned().map(Into::into),
                        last_validated_backup: last_validated.cloned().map(Into::into),
                    }
                })
                .collect()
        });
        let epoch = self
            .consensus
            .read(|s| s.dr_epochs.get(&spec.name).cloned())
            .unwrap_or_default();
        Ok(pb::GetDrStatusResponse {
            app: spec.name,
            clusters,
            epoch: epoch.epoch,
            epoch_primary: epoch.primary.map(|p| p.to_string()).unwrap_or_default(),
        })
    }

    pub async fn plan_failover(&self, r: pb::PlanFailoverRequest) -> Result<pb::PlanFailoverResponse, ApiError> {
        let spec = self.app(&r.app)?;
        if !r.to.is_empty() {
            cutover_shared::domain::validate_name("to", &r.to)?;
        }
        let now = cutover_shared::domain::now_unix_ms();
        let plan = self.consensus.read(|s| {
            dr::plan(&PlanInput {
                app: &spec,
                clusters: cluster_views(s, &spec),
                backups: app_backups(s, &spec.name),
                running_operation: running_on(s, &spec),
                to: (!r.to.is_empty()).then_some(r.to.as_str()),
                now_unix_ms: now,
            })
        });
        let plan = plan.map_err(|e| ApiError::invalid_argument(e.to_string()))?;
        Ok(pb::PlanFailoverResponse {
            plan: Some(plan_to_proto(plan)),
        })
    }
}

impl ControlApi {
    /// Starts a failover: the plan again, on caught-up state; refused with
    /// every blocker the request does not override; else one `Failover`
    /// operation whose creation commits the app's next primary epoch.
    pub async fn failover(&self, who: &Identity, r: pb::FailoverRequest) -> Result<pb::FailoverResponse, ApiError> {
        let spec = self.app(&r.app)?;
        if !r.to.is_empty() {
            validate_name("to", &r.to)?;
        }
        self.consensus.catch_up().await?;
        let now = now_unix_ms();
        let (plan, epoch, statuses) = self.consensus.read(|s| {
            let plan = dr::plan(&PlanInput {
                app: &spec,
                clusters: cluster_views(s, &spec),
                backups: app_backups(s, &spec.name),
                running_operation: running_on(s, &spec),
                to: (!r.to.is_empty()).then_some(r.to.as_str()),
                now_unix_ms: now,
            });
            let epoch = s.dr_epochs.get(&spec.name).map_or(0, |e| e.epoch) + 1;
            (plan, epoch, s.app_status.get(&spec.name).cloned().unwrap_or_default())
        });
        let plan = plan.map_err(|e| ApiError::invalid_argument(e.to_string()))?;
        let refused: Vec<String> = plan
            .blockers
            .iter()
            .filter(|b| match b.overridden_by {
                Some("--force") => !r.force,
                Some("--accept-data-loss") => !r.accept_data_loss,
                _ => true,
            })
            .map(|b| match b.overridden_by {
                Some(flag) => format!("{} (override: {flag})", b.reason),
                None => b.reason.clone(),
            })
            .collect();
        if !refused.is_empty() {
            return Err(ApiError::failed_precondition(format!(
                "failover of {} refused: {}",
                spec.name,
                refused.join("; ")
            )));
        }
        let to = plan
            .to
            .clone()
            .ok_or_else(|| ApiError::failed_precondition(format!("{} has no cluster to fail over to", spec.name)))?;
        if !matches!(plan.source, Some(DataSource::Standby { .. })) {
            return Err(ApiError::failed_precondition(format!(
                "{to} has no standby of {}; a failover that restores a backup is not available yet \
                 (restore it with `cutover backup restore --to primary`)",
                spec.name
            )));
        }
        // The old primary is fenced when its agent can be asked to; a
        // forced failover past a lost region supersedes it by the epoch.
        let from_up = plan.from.as_ref().is_some_and(|f| {
            self.consensus.read(|s| s.agents.get(&f.to_string()).map(|a| a.state)) == Some(AgentState::Up)
        });
        let fence = plan.from.is_some() && from_up;
        let mut targets = vec![to.clone()];
        if fence && let Some(f) = &plan.from {
            targets.push(f.clone());
        }
        for t in &targets {
            if !self.agent_offers(t, TaskKind::DbFailover) {
                return Err(ApiError::failed_precondition(format!(
                    "the agent for {t} cannot fail databases over (upgrade it first)"
                )));
            }
        }
        let op_spec = OperationSpec {
            failover: Some(Box::new(FailoverSpec {
                from: plan.from.clone(),
                to: to.clone(),
                epoch,
                fence,
                verify_color: statuses.get(&to.to_string()).and_then(|st| st.active),
                data_loss_window_ms: plan.data_loss_window_ms,
                wal_behind_bytes: plan.wal_behind_bytes,
                force: r.force,
                accept_data_loss: r.accept_data_loss,
                fence_only: false,
            })),
            ..OperationSpec::default()
        };
        let id = self
            .start_app_operation(who, OperationKind::Failover, &spec, targets, op_spec)
            .await?;
        Ok(pb::FailoverResponse {
            operation_id: id,
            epoch,
        })
    }
}

fn plan_to_proto(p: FailoverPlan) -> pb::FailoverPlan {
    let split = |c: Option<ClusterRef>| c.map(|c| (c.region, c.cluster)).unwrap_or_default();
    let (from_region, from_cluster) = split(p.from);
    let (to_region, to_cluster) = split(p.to);
    let (source, backup_id) = match p.source {
        Some(DataSource::Standby { .. }) => ("standby".to_owned(), String::new()),
        Some(DataSource::Backup { id, .. }) => ("backup".to_owned(), id),
        None => (String::new(), String::new()),
    };
    pb::FailoverPlan {
        app: p.app,
        from_region,
        from_cluster,
        to_region,
        to_cluster,
        source,
        data_loss_window_ms: p.data_loss_window_ms,
        wal_behind_bytes: p.wal_behind_bytes,
        max_data_loss_ms: p.max_data_loss_ms,
        backup_id,
        steps: p
            .steps
            .into_iter()
            .map(|s| pb::FailoverStep {
                name: s.name.into(),
                description: s.description,
                expected_ms: s.expected_ms,
            })
            .collect(),
        blockers: p
            .blockers
            .into_iter()
            .map(|b| pb::FailoverBlocker {
                reason: b.reason,
                overridden_by: b.overridden_by.unwrap_or_default().into(),
            })
            .collect(),
    }
}
