//! Backup schedules, retention and drill schedules, decided by the leader.
//!
//! Both are pure functions of the replicated state and a clock reading
//! (`now`), so tests drive them with an injected clock, and a new leader
//! decides exactly what the old one would have:
//!
//! - A schedule's slot starts with one `StartScheduledBackup`, which the
//!   state machine applies only if the slot is newer than the schedule's
//!   last one. A leader killed at the slot either committed it (the next
//!   leader sees the slot taken) or did not (the next leader starts it):
//!   each slot runs once. A slot waits while another operation runs on
//!   the app; missed slots collapse into the newest.
//! - Retention: for each scheduled app and cluster, the backups its policy
//!   no longer keeps ([`cutover_shared::backup::expired`]) are deleted by
//!   one `delete` operation on that cluster's agent (which holds the
//!   store's credentials); applying its result removes the catalog entries
//!   and audits each deletion.
//! - Drill schedules start one `StartScheduledDrill` per slot, the same
//!   way, into the schedule's region or the failover plan's target then,
//!   with the release serving there; a slot waits while the target's agent
//!   is down or busy.

use std::collections::BTreeMap;

use cutover_shared::backup::{self, BackupAction, BackupTrigger};
use cutover_shared::domain::{AgentState, ClusterRef, Operation, OperationKind};
use cutover_shared::operation::{BackupSpec, OperationSpec};
use cutover_shared::task::TaskKind;
use sha2::{Digest, Sha256};

use crate::state::{AuditDraft, Command, State};

/// Who scheduled backups, retention deletions and drills are done by.
pub const SCHEDULE_ACTOR: &str = "cutover/backup-schedule";
pub const DRILL_ACTOR: &str = "cutover/drill-schedule";
pub const RETENTION_ACTOR: &str = "cutover/backup-retention";

/// How often retention is reconsidered for one app and cluster (a failed
/// deletion is retried after this).
const RETENTION_RETRY_MS: i64 = 3_600_000;

/// An operation id derived from what it is for, so two leaders proposing
/// the same decision propose the same id (the second is refused).
pub(super) fn derived_id(what: &str) -> String {
    let h = Sha256::digest(what.as_bytes());
    format!("op-{}", &cutover_shared::release::hex(&h)[..32])
}

fn operation(id: String, app: &str, targets: Vec<ClusterRef>, spec: BackupSpec, by: &str, now: i64) -> Operation {
    let spec = OperationSpec {
        backup: Some(Box::new(spec)),
        ..OperationSpec::default()
    };
    Operation::new_app(id, OperationKind::Backup, app, targets, spec, by, now)
}

fn audit(by: &str, action: &str, parameters: serde_json::Value, now: i64) -> AuditDraft {
    AuditDraft {
        at_unix_ms: now,
        actor: by.to_owned(),
        action: action.to_owned(),
        parameters: parameters.to_string(),
        outcome: "accepted".to_owned(),
    }
}

/// What the leader proposes at `now`: the due slot of each schedule whose
/// app is free, a retention deletion for each scheduled app and cluster
/// with expired backups, and the due slot of each drill schedule.
pub fn due(state: &State, now: i64) -> Vec<Command> {
    let mut out = drills_due(state, now);
    for (app, schedule) in &state.backup_schedules {
        let Some(spec) = state.apps.get(app) else { continue };
        let targets: Vec<ClusterRef> = spec
            .clusters
            .iter()
            .filter(|c| schedule.region.as_ref().is_none_or(|r| &c.region == r))
            .map(|c| c.cluster_ref())
            .collect();
        if targets.is_empty() {
            continue;
        }
        let busy = |t: &ClusterRef| state.running_operation(app, t).is_some();
        if let Ok(cron) = backup::parse_cron(&schedule.cron)
            && let Some(slot) = backup::due_slot(&cron, schedule.last_slot_unix_ms, now)
            && !targets.iter().any(busy)
        {
            let spec = BackupSpec {
                trigger: BackupTrigger::Schedule { slot_unix_ms: slot },
                validate: schedule.validate,
                ..BackupSpec::new(BackupAction::Create)
            };
            let id = derived_id(&format!("schedule/{app}/{slot}"));
            out.push(Command::StartScheduledBackup {
                audit: audit(
                    SCHEDULE_ACTOR,
                    "CreateBackup",
                    serde_json::json!({ "app": app, "slot_unix_ms": slot, "cron": schedule.cron }),
                    now,
                ),
                operation: operation(id, app, targets.clone(), spec, SCHEDULE_ACTOR, now),
                slot_unix_ms: slot,
            });
            continue;
        }
        for t in &targets {
            let offers = state.agents.get(&t.to_string()).is_some_and(|a| {
                a.state == AgentState::Up && a.task_kinds.iter().any(|k| k == TaskKind::DbBackup.as_str())
            });
            if busy(t) || !offers {
                continue;
            }
            let expired = backup::expired(
                state.backups.values().filter(|b| &b.app == app && &b.cluster == t),
                &schedule.retention,
                now,
            );
            if expired.is_empty() {
                continue;
            }
            let delete: BTreeMap<String, backup::BackupObject> =
                expired.iter().map(|b| (b.id.clone(), b.object.clone())).collect();
            let ids: Vec<&String> = delete.keys().collect();
            let id = derived_id(&format!(
                "retention/{app}/{t}/{}/{}",
                now / RETENTION_RETRY_MS,
                serde_json::to_string(&ids).unwrap_or_default()
            ));
            if state.operations.contains_key(&id) {
                continue;
            }
            let params = serde_json::json!({
                "app": app, "cluster": t.to_string(), "policy": schedule.retention.to_string(), "delete": ids,
            });
            let spec = BackupSpec {
                delete,
                ..BackupSpec::new(BackupAction::Delete)
            };
            out.push(Command::CreateOperation {
                audit: audit(RETENTION_ACTOR, "PruneBackups", params, now),
                operation: operation(id, app, vec![t.clone()], spec, RETENTION_ACTOR, now),
                fix_inputs: true,
            });
        }
    }
    out
}

/// The due slot of each drill schedule whose target is up and free.
fn drills_due(state: &State, now: i64) -> Vec<Command> {
    let mut out = Vec::new();
    for (app, schedule) in &state.drill_schedules {
        let Some(spec) = state.apps.get(app) else { continue };
        let Some(slot) = backup::parse_cron(&schedule.cron)
            .ok()
            .and_then(|cron| backup::due_slot(&cron, schedule.last_slot_unix_ms, now))
        else {
            continue;
        };
        let target = match &schedule.region {
            Some(r) => spec.clusters.iter().map(|c| c.cluster_ref()).find(|c| &c.region == r),
            None => crate::dr::plan(state, spec, None, now).ok().and_then(|p| p.to),
        };
        let Some(target) = target else { continue };
        let ready = state
            .agents
            .get(&target.to_string())
            .is_some_and(|a| a.state == AgentState::Up && a.task_kinds.iter().any(|k| k == TaskKind::DrDrill.as_str()));
        let image = crate::dr::serving_image(state, spec, &target);
        let (true, Some(image), None) = (ready, image, state.running_operation(app, &target)) else {
            continue;
        };
        // A cold standby with no validated backup: nothing to drill with
        // yet; the slot stays due until there is one.
        let Ok(restore) = crate::dr::drill_restore(state, spec, &target) else {
            continue;
        };
        let spec = OperationSpec {
            image: Some(image),
            restore: restore.map(Box::new),
            ..OperationSpec::default()
        };
        let id = derived_id(&format!("drill-schedule/{app}/{slot}"));
        out.push(Command::StartScheduledDrill {
            audit: audit(
                DRILL_ACTOR,
                "Drill",
                serde_json::json!({ "app": app, "to": target.to_string(), "slot_unix_ms": slot, "cron": schedule.cron }),
                now,
            ),
            operation: Operation::new_app(id, OperationKind::Drill, app, vec![target], spec, DRILL_ACTOR, now),
            slot_unix_ms: slot,
        });
    }
    out
}
