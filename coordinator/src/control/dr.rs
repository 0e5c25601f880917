//! Disaster recovery in `ControlService`: `GetDrStatus`, `PlanFailover`,
//! `Failover`, `Drill` and `ListDrills`. Reads come from this node's applied state; the plan is
//! `crate::dr::plan`, the same function a failover (an operator's or an
//! automatic one) runs, so what `cutover dr plan` shows is what would
//! happen.

use cutover_shared::backup::{self, BackupEntry, newest_validated};
use cutover_shared::domain::{ClusterRef, OperationKind, now_unix_ms, validate_name};
use cutover_shared::dr::{self, DataSource, DrillSchedule, FailoverPlan};
use cutover_shared::identity::Identity;
use cutover_shared::operation::{FailoverSpec, OperationSpec};
use cutover_shared::proto as pb;
use cutover_shared::task::TaskKind;

use super::ControlApi;
use super::error::ApiError;
use crate::raft::Proposal;
use crate::state::Command;

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
                    let front_door = s
                        .region_health
                        .get(&spec.name)
                        .and_then(|m| m.get(&v.cluster.region))
                        .map(|h| pb::RegionProbe {
                            healthy: h.healthy,
                            detail: h.detail.clone().unwrap_or_default(),
                            by: h.by.clone(),
                            since_unix_ms: h.since_unix_ms,
                        });
                    pb::DrClusterStatus {
                        front_door,
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
        let Some(mut failover) = spec_now else {
            return Err(ApiError::failed_precondition(format!(
                "{} has no cluster to fail over to",
                spec.name
            )));
        };
        failover.rejoin = r.rejoin;
        if r.rejoin && !failover.fence {
            return Err(ApiError::failed_precondition(format!(
                "the old primary of {} cannot be reached, so it cannot be rejoined in the same failover; \
                 fail over, then `cutover dr rejoin` it once its region is back",
                spec.name
            )));
        }
        let to = failover.to.clone();
        if failover.restore.is_some() && !self.agent_offers(&to, TaskKind::DbBackup) {
            return Err(ApiError::failed_precondition(format!(
                "{to} has no standby of {} and its agent has no backup store to restore one from \
                 (configure [backup] there)",
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
    /// Starts rebuilding `region`'s superseded primary as a standby of the
    /// app's current primary: a `Failover` operation with `rejoin_only`,
    /// acting for the current epoch.
    pub async fn rejoin(&self, who: &Identity, r: pb::RejoinRequest) -> Result<pb::RejoinResponse, ApiError> {
        let spec = self.app(&r.app)?;
        validate_name("region", &r.region)?;
        let cluster = spec
            .clusters
            .iter()
            .map(|c| c.cluster_ref())
            .find(|c| c.region == r.region)
            .ok_or_else(|| {
                ApiError::invalid_argument(format!("app {} does not run in region {}", spec.name, r.region))
            })?;
        self.consensus.catch_up().await?;
        let epoch = self.consensus.read(|s| s.dr_epochs.get(&spec.name).cloned());
        let Some((epoch, primary)) = epoch.and_then(|e| e.primary.clone().map(|p| (e.epoch, p))) else {
            return Err(ApiError::failed_precondition(format!(
                "{} has not failed over, so no primary was superseded; nothing to rejoin",
                spec.name
            )));
        };
        if primary == cluster {
            return Err(ApiError::failed_precondition(format!(
                "{cluster} holds {}'s primary (epoch {epoch}); rejoin the region it replaced",
                spec.name
            )));
        }
        if !self.agent_offers(&cluster, TaskKind::DbFailover) {
            return Err(ApiError::failed_precondition(format!(
                "the agent for {cluster} cannot rejoin databases (upgrade it first)"
            )));
        }
        let op_spec = OperationSpec {
            failover: Some(Box::new(FailoverSpec {
                from: Some(cluster.clone()),
                to: primary,
                epoch,
                fence: false,
                verify_color: None,
                data_loss_window_ms: None,
                wal_behind_bytes: None,
                force: false,
                accept_data_loss: false,
                fence_only: false,
                rejoin: false,
                rejoin_only: true,
                traffic: None,
                deploy_image: None,
                restore: None,
            })),
            ..OperationSpec::default()
        };
        let id = self
            .start_app_operation(who, OperationKind::Failover, &spec, vec![cluster], op_spec)
            .await?;
        Ok(pb::RejoinResponse { operation_id: id })
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
        let restore = self
            .consensus
            .read(|s| crate::dr::drill_restore(s, &spec, &target))
            .map_err(ApiError::failed_precondition)?;
        if restore.is_some() && !self.agent_offers(&target, TaskKind::DbBackup) {
            return Err(ApiError::failed_precondition(format!(
                "{target} has no standby of {} and its agent has no backup store to restore one from \
                 (configure [backup] there)",
                spec.name
            )));
        }
        let op_spec = OperationSpec {
            image: Some(image),
            restore: restore.map(Box::new),
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
        let (drills, schedule) = self.consensus.read(|s| {
            let drills = s
                .drills
                .get(&spec.name)
                .map(|d| d.iter().rev().take(limit).cloned().map(Into::into).collect())
                .unwrap_or_default();
            (drills, s.drill_schedules.get(&spec.name).cloned())
        });
        Ok(pb::ListDrillsResponse {
            drills,
            schedule: schedule.map(drill_schedule_proto),
        })
    }

    pub async fn set_drill_schedule(
        &self,
        who: &Identity,
        r: pb::SetDrillScheduleRequest,
    ) -> Result<pb::SetDrillScheduleResponse, ApiError> {
        let spec = self.app(&r.app)?;
        let region = (!r.region.is_empty()).then(|| r.region.clone());
        if let Some(region) = &region {
            validate_name("region", region)?;
            if !spec.clusters.iter().any(|c| &c.region == region) {
                return Err(ApiError::invalid_argument(format!(
                    "app {} does not run in region {region}",
                    spec.name
                )));
            }
        }
        backup::parse_cron(&r.cron)?;
        let now = now_unix_ms();
        let schedule = DrillSchedule {
            app: spec.name.clone(),
            region,
            cron: r.cron.clone(),
            updated_by: who.to_string(),
            updated_at_unix_ms: now,
            // From now on: setting a schedule never starts a past slot.
            last_slot_unix_ms: now,
        };
        let params = serde_json::json!({ "app": spec.name, "region": r.region, "cron": r.cron });
        self.consensus
            .propose(Proposal::Command(Command::PutDrillSchedule {
                schedule,
                audit: super::audit(who, "SetDrillSchedule", params, "ok"),
            }))
            .await?;
        let stored = self
            .consensus
            .read(|s| s.drill_schedules.get(&spec.name).cloned())
            .ok_or_else(|| ApiError::unavailable("the schedule is not applied on this node yet"))?;
        Ok(pb::SetDrillScheduleResponse {
            schedule: Some(drill_schedule_proto(stored)),
        })
    }

    pub async fn delete_drill_schedule(
        &self,
        who: &Identity,
        r: pb::DeleteDrillScheduleRequest,
    ) -> Result<pb::DeleteDrillScheduleResponse, ApiError> {
        validate_name("app", &r.app)?;
        self.consensus.catch_up().await?;
        if !self.consensus.read(|s| s.drill_schedules.contains_key(&r.app)) {
            return Err(ApiError::not_found(format!("app {:?} has no drill schedule", r.app)));
        }
        self.consensus
            .propose(Proposal::Command(Command::DeleteDrillSchedule {
                app: r.app.clone(),
                audit: super::audit(who, "DeleteDrillSchedule", serde_json::json!({ "app": r.app }), "ok"),
            }))
            .await?;
        Ok(pb::DeleteDrillScheduleResponse {})
    }
}

fn drill_schedule_proto(s: DrillSchedule) -> pb::DrillSchedule {
    let next = backup::parse_cron(&s.cron)
        .ok()
        .and_then(|c| backup::next_slot(&c, s.last_slot_unix_ms.max(now_unix_ms())))
        .unwrap_or(0);
    pb::DrillSchedule {
        app: s.app,
        region: s.region.unwrap_or_default(),
        cron: s.cron,
        updated_by: s.updated_by,
        updated_at_unix_ms: s.updated_at_unix_ms,
        last_slot_unix_ms: s.last_slot_unix_ms,
        next_slot_unix_ms: next,
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
