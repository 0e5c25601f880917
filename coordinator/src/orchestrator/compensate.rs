//! Compensation: after a failed step or an abort, once nothing runs, the
//! steps that put things back: every switch that may have moved traffic is
//! switched back to the color that served before (named, so a re-sent step
//! converges), then, when the release's migrations are reversible, the
//! schema changes this operation made are undone. An app this operation
//! put in maintenance takes traffic again (a restore onto the primary
//! replaces the database in one transaction, so a failed one left the old
//! data in place).

use cutover_shared::app::Color;
use cutover_shared::domain::{ClusterRef, Operation, OperationKind, TaskRecord, TaskState};
use cutover_shared::release::Bundle;
use cutover_shared::task::{
    FailoverAction, FailoverParams, MigrateAction, TaskParams, TrafficAction, TrafficParams, outputs,
};

use super::{CANARY, Inputs, MAINTENANCE, MIGRATE, SWITCH, Step, is_compensation, params_of};

/// The clusters where a compensation of `kind` already ran.
fn compensated<'a>(op: &'a Operation, kind: &str) -> Vec<&'a ClusterRef> {
    op.tasks
        .iter()
        .filter(|t| is_compensation(t) && t.spec.kind == kind)
        .map(|t| &t.spec.target)
        .collect()
}

/// Whether a failover's promotion was ever sent: from then on the standby
/// may be a primary, so the old one must stay fenced whatever happened.
pub(super) fn promotion_attempted(op: &Operation) -> bool {
    op.tasks
        .iter()
        .any(|t| matches!(params_of(t), Some(TaskParams::DbFailover(f)) if f.action == FailoverAction::Promote))
}

/// A failover that failed before it promoted anything puts the old primary
/// back: the fence lifted (a failed fence may have acted), then its app
/// takes traffic again. Once a promotion was sent nothing is undone: two
/// writable primaries are worse than a failover left for an operator.
/// Either way, requests the traffic driver held are released last, to
/// wherever traffic goes by then.
fn failover_step(op: &Operation) -> Option<Step> {
    // A stray primary that could not be fenced is not unfenced either.
    // A rejoin, once it stopped the server, has nothing to go back to.
    if promotion_attempted(op) || op.spec.failover.as_ref().is_some_and(|f| f.keeps_epoch()) {
        return release_held(op);
    }
    undo_fence(op).or_else(|| release_held(op))
}

/// Releases the requests a failover's traffic hold keeps waiting, unless
/// traffic moved (which released them) or they were released already.
fn release_held(op: &Operation) -> Option<Step> {
    let traffic = |t: &TaskRecord| match params_of(t) {
        Some(TaskParams::TrafficMove(p)) => Some(p),
        _ => None,
    };
    // A hold that failed held nothing.
    let (target, hold) = op.tasks.iter().find_map(|t| {
        traffic(t)
            .filter(|p| p.action == TrafficAction::Hold && t.state == TaskState::Succeeded)
            .map(|p| (t.spec.target.clone(), p))
    })?;
    let released = op.tasks.iter().any(|t| {
        traffic(t).is_some_and(|p| {
            p.action == TrafficAction::Release || (p.action == TrafficAction::Move && t.state == TaskState::Succeeded)
        })
    });
    (!released).then(|| {
        Step::new(
            &target,
            TaskParams::TrafficMove(TrafficParams {
                action: TrafficAction::Release,
                region: None,
                compensate: true,
                ..hold
            }),
        )
    })
}

/// Lifts a fence that acted, then ends the old primary's maintenance.
fn undo_fence(op: &Operation) -> Option<Step> {
    let unfenced = op
        .tasks
        .iter()
        .any(|t| matches!(params_of(t), Some(TaskParams::DbFailover(f)) if f.action == FailoverAction::Unfence));
    let fence = op.tasks.iter().find_map(|t| match params_of(t) {
        Some(TaskParams::DbFailover(f)) if f.action == FailoverAction::Fence && t.state.is_finished() => {
            Some((t.spec.target.clone(), f))
        }
        _ => None,
    });
    if !unfenced && let Some((target, f)) = fence {
        return Some(Step::new(
            &target,
            TaskParams::DbFailover(FailoverParams {
                action: FailoverAction::Unfence,
                wait_for_lsn: None,
                compensate: true,
                ..f
            }),
        ));
    }
    let ended = compensated(op, MAINTENANCE);
    op.tasks
        .iter()
        .filter(|t| t.spec.kind == MAINTENANCE && !ended.contains(&&t.spec.target))
        .find_map(|t| match params_of(t) {
            Some(TaskParams::AppMaintenance { app, on: true, .. }) => Some(Step::new(
                &t.spec.target,
                TaskParams::AppMaintenance {
                    app,
                    on: false,
                    compensate: true,
                },
            )),
            _ => None,
        })
}

/// The forward `db.migrate` up steps that changed a schema.
pub(super) fn migrated(op: &Operation) -> Vec<&TaskRecord> {
    op.tasks
        .iter()
        .filter(|t| t.state == TaskState::Succeeded)
        .filter(|t| {
            matches!(params_of(t), Some(TaskParams::DbMigrate(m)) if m.action == MigrateAction::Up && !m.compensate)
        })
        .filter(|t| t.result.as_ref().is_some_and(|r| outputs::MigrateOutputs::from_wire(&r.outputs).migrated_anything()))
        .collect()
}

/// The next compensating step, or `None` once everything that can be put
/// back has been.
pub(super) fn next_step(op: &Operation, inputs: &Inputs<'_>) -> Option<Step> {
    if op.kind == OperationKind::Failover {
        return failover_step(op);
    }
    // Every switch that may have moved traffic: the ones that succeeded,
    // and the ones that failed after possibly acting (an agent that
    // switched, crashed, and failed on the re-run; a driver that patched
    // one Service of two). Switching back to a named color converges, so
    // compensating a switch that never took effect is harmless. A switch
    // from an older log names no color; only a successful one of those
    // is undone, as before.
    let switched: Vec<&TaskRecord> = op
        .tasks
        .iter()
        .filter(|t| t.spec.kind == SWITCH && !is_compensation(t) && t.state.is_finished())
        .filter(|t| {
            t.state == TaskState::Succeeded || matches!(params_of(t), Some(TaskParams::AppSwitch { to: Some(_), .. }))
        })
        .collect();
    let switched_back = compensated(op, SWITCH);
    if let Some(t) = switched.iter().find(|t| !switched_back.contains(&&t.spec.target)) {
        // Back to the color that served before the switch, named, so a
        // re-sent compensation converges too.
        let Some(TaskParams::AppSwitch { app, to, .. }) = params_of(t) else {
            return None;
        };
        let step = Step::new(
            &t.spec.target,
            TaskParams::AppSwitch {
                app,
                to: to.map(Color::other),
                compensate: true,
            },
        );
        return Some(step);
    }
    // A canary step that may have sent traffic to the new color (one
    // that failed sets its weight back itself, but may have failed to)
    // goes back to 0. A cluster whose switch ran needs none: the switch
    // ended its split, and the switch back left none.
    let unweighted = compensated(op, CANARY);
    let switched: Vec<&ClusterRef> = switched.iter().map(|t| &t.spec.target).collect();
    let weighted = op
        .tasks
        .iter()
        .filter(|t| t.state.is_finished())
        .find_map(|t| match params_of(t) {
            Some(TaskParams::AppCanary {
                app,
                color,
                weight,
                compensate: false,
                ..
            }) if weight > 0 && !unweighted.contains(&&t.spec.target) && !switched.contains(&&t.spec.target) => {
                Some((t, app, color))
            }
            _ => None,
        });
    if let Some((t, app, color)) = weighted {
        return Some(Step::new(
            &t.spec.target,
            TaskParams::AppCanary {
                app,
                color,
                weight: 0,
                pause_secs: 0,
                compensate: true,
            },
        ));
    }
    // Traffic is back on the old code: undo the schema changes this
    // operation made, when its migrations can be undone.
    let migrated = migrated(op);
    let reverted = compensated(op, MIGRATE);
    let reversible = inputs.bundle.is_some_and(Bundle::reversible);
    if reversible && let Some(t) = migrated.iter().find(|t| !reverted.contains(&&t.spec.target)) {
        let Some(TaskParams::DbMigrate(mut m)) = params_of(t) else {
            return None;
        };
        let from = t
            .result
            .as_ref()
            .and_then(|r| outputs::MigrateOutputs::from_wire(&r.outputs).from_version)
            .unwrap_or(0);
        m.action = MigrateAction::Down;
        m.target = Some(from);
        m.compensate = true;
        return Some(Step::new(&t.spec.target, TaskParams::DbMigrate(m)));
    }
    // Maintenance begun (or perhaps begun: a failed step may have acted)
    // and not ended by this operation ends now.
    let ended = compensated(op, MAINTENANCE);
    let held = op.tasks.iter().filter(|t| t.spec.kind == MAINTENANCE).find(|t| {
        matches!(params_of(t), Some(TaskParams::AppMaintenance { on: true, .. }))
            && !ended.contains(&&t.spec.target)
            && !op.tasks.iter().any(|o| {
                o.spec.target == t.spec.target
                    && o.state == TaskState::Succeeded
                    && matches!(params_of(o), Some(TaskParams::AppMaintenance { on: false, .. }))
            })
    });
    if let Some(t) = held
        && let Some(TaskParams::AppMaintenance { app, .. }) = params_of(t)
    {
        return Some(Step::new(
            &t.spec.target,
            TaskParams::AppMaintenance {
                app,
                on: false,
                compensate: true,
            },
        ));
    }
    None
}
