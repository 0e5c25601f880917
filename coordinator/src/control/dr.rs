//! The disaster-recovery reads of `ControlService`: `GetDrStatus` and
//! `PlanFailover`. Both are computed from this node's applied state; the
//! plan itself is `cutover_shared::dr::plan`, the same function a failover
//! will run, so what `cutover dr plan` shows is what would happen.

use cutover_shared::backup::{BackupEntry, newest_validated};
use cutover_shared::domain::{AgentState, ClusterRef};
use cutover_shared::dr::{self, ClusterView, DataSource, FailoverPlan, PlanInput};
use cutover_shared::proto as pb;

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
        Ok(pb::GetDrStatusResponse {
            app: spec.name,
            clusters,
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
