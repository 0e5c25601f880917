//! Disaster recovery in `ControlService`: `GetDrStatus`, `PlanFailover`,
//! `Failover`, `Drill` and `ListDrills`. Reads come from this node's applied state; the plan is
//! `crate::dr::plan`, the same function a failover (an operator's or an
//! automatic one) runs, so what `cutover dr plan` shows is what would
//! happen.

use cutover_shared::backup::{BackupEntry, newest_validated};
use cutover_shared::domain::{ClusterRef, OperationKind, now_unix_ms, validate_name};
use cutover_shared::dr::{self, DataSource, FailoverPlan};
use cutover_shared::identity::Identity;
use cutover_shared::operation::OperationSpec;
use cutover_shared::proto as pb;
use cutover_shared::task::TaskKind;

use super::ControlApi;
use super::error::ApiError;

impl ControlApi {
    pub async fn get_dr_status(&self, r: pb::GetDrStatusRequest) -> Result<pb::GetDrStatusResponse, ApiError> {
        let spec = self.app(&r.app)?;
        let clusters = self.consensus.read(|s| {
            let views = crate::dr::cluster_views(s, &spec);
            let primary_lsn = dr::primaries(&views)
                .first()
                .and_then(|p| p.database.as_ref())
                .and_then(|d| d.lsn);
            let backups = crate::dr::app_backups(s, &spec.name);
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
                    let last_drill = s
                        .drills
                        .get(&spec.name)
                        .and_then(|d| d.iter().rev().find(|d| d.cluster == v.cluster))
                        .cloned()
                        .map(Into::into);
                    pb::DrClusterStatus {
                        last_drill,
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
        let to = (!r.to.is_empty()).then_some(r.to.as_str());
        let plan = self.consensus.read(|s| crate::dr::plan(s, &spec, to, now));
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
        let to = (!r.to.is_empty()).then_some(r.to.as_str());
        let (plan, spec_now) = self.consensus.read(|s| {
            let plan = crate::dr::plan(s, &spec, to, now);
            let failover = plan
                .as_ref()
                .ok()
                .and_then(|p| crate::dr::failover_spec(s, &spec, p, r.force, r.accept_data_loss));
            (plan, failover)
        });
        let plan = plan.map_err(|e| ApiError::invalid_argument(e.to_string()))?;
        let refused = crate::dr::standing_blockers(&plan, r.force, r.accept_data_loss);
        if !refused.is_empty() {
            return Err(ApiError::failed_precondition(format!(
                "failover of {} refused: {}",
                spec.name,
                refused.join("; ")
            )));
        }
        let Some(failover) = spec_now else {
            return Err(ApiError::failed_precondition(format!(
                "{} has no cluster to fail over to",
                spec.name
            )));
        };
        let to = failover.to.clone();
        if !matches!(plan.source, Some(DataSource::Standby { .. })) {
            return Err(ApiError::failed_precondition(format!(
                "{to} has no standby of {}; a failover that restores a backup is not available yet \
                 (restore it with `cutover backup restore --to primary`)",
                spec.name
            )));
        }
        let (fence, epoch) = (failover.fence, failover.epoch);
        let mut targets = vec![to.clone()];
        if fence && let Some(f) = &failover.from {
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
            failover: Some(Box::new(failover)),
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

impl ControlApi {
    /// Starts a drill into `to` (or where a failover would go now): one
    /// `Drill` operation, its one task on that cluster's agent, running the
    /// release that serves there (else the one serving at the primary).
    pub async fn drill(&self, who: &Identity, r: pb::DrillRequest) -> Result<pb::DrillResponse, ApiError> {
        let spec = self.app(&r.app)?;
        if !r.to.is_empty() {
            validate_name("to", &r.to)?;
        }
        self.consensus.catch_up().await?;
        let now = now_unix_ms();
        let target = if r.to.is_empty() {
            let plan = self.consensus.read(|s| crate::dr::plan(s, &spec, None, now));
            plan.map_err(|e| ApiError::invalid_argument(e.to_string()))?
                .to
                .ok_or_else(|| {
                    ApiError::failed_precondition(format!(
                        "{} has no region to drill into; name one with --to",
                        spec.name
                    ))
                })?
        } else {
            spec.clusters
                .iter()
                .map(|c| c.cluster_ref())
                .find(|c| c.region == r.to)
                .ok_or_else(|| {
                    ApiError::invalid_argument(format!("app {} does not run in region {}", spec.name, r.to))
                })?
        };
        let image = self.consensus.read(|s| crate::dr::serving_image(s, &spec, &target));
        let Some(image) = image else {
            return Err(ApiError::failed_precondition(format!(
                "nothing of {} is deployed yet, so there is no release to drill with (deploy one first)",
                spec.name
            )));
        };
        if !self.agent_offers(&target, TaskKind::DrDrill) {
            return Err(ApiError::failed_precondition(format!(
                "the agent for {target} cannot run drills (upgrade it first)"
            )));
        }
        let op_spec = OperationSpec {
            image: Some(image),
            ..OperationSpec::default()
        };
        let id = self
            .start_app_operation(who, OperationKind::Drill, &spec, vec![target], op_spec)
            .await?;
        Ok(pb::DrillResponse { operation_id: id })
    }

    pub async fn list_drills(&self, r: pb::ListDrillsRequest) -> Result<pb::ListDrillsResponse, ApiError> {
        let spec = self.app(&r.app)?;
        let limit = if r.limit == 0 { usize::MAX } else { r.limit as usize };
        let drills = self.consensus.read(|s| {
            s.drills
                .get(&spec.name)
                .map(|d| d.iter().rev().take(limit).cloned().map(Into::into).collect())
                .unwrap_or_default()
        });
        Ok(pb::ListDrillsResponse { drills })
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
