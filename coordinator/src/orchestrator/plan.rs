//! Planning: the full list of steps of an operation, as a pure function of
//! its record (its typed spec, the inputs fixed at its creation, and what its
//! finished steps reported). Nothing here reads live state.

use std::collections::BTreeMap;

use cutover_shared::app::{AppSpec, Color};
use cutover_shared::backup::{self, BackupAction};
use cutover_shared::domain::{ClusterRef, Operation, OperationKind};
use cutover_shared::operation::{MigrateSpec, Strategy};
use cutover_shared::release::Bundle;
use cutover_shared::task::{
    self, AppRef, BackupParams, FailoverAction, FailoverParams, MigrateAction, MigrateParams, TaskKind, TaskParams,
    TrafficAction, TrafficParams, outputs,
};

use super::DEPLOY;

/// One planned step.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub target: ClusterRef,
    pub params: TaskParams,
    /// May start while the previous step still runs (switches of one wave
    /// flip together; bakes watch their clusters at the same time). Such a
    /// group is committed as one log entry: one decision.
    pub with_previous: bool,
    /// The manual promotion gate in front of this step (1-based), if any.
    pub gate: u32,
}

impl Step {
    pub(super) fn new(target: &ClusterRef, params: TaskParams) -> Step {
        Step {
            target: target.clone(),
            params,
            with_previous: false,
            gate: 0,
        }
    }
}

/// What an operation acts with, fixed when it was created: the app (by
/// name and definition digest) and the release migrations, if any.
pub struct Inputs<'a> {
    pub app: AppRef,
    pub bundle: Option<&'a Bundle>,
    pub bundle_digest: String,
    /// The canary's weights before the switch (empty: blue-green) and how
    /// long each step holds at least, from the same definition.
    pub canary: Vec<u32>,
    pub canary_pause_secs: u64,
}

impl<'a> Inputs<'a> {
    /// `spec` is the definition `op` was created with (or, for operations
    /// from older logs, the app's current one) and `bundle` its release's
    /// migrations.
    pub fn new(op: &Operation, spec: &AppSpec, bundle: Option<&'a Bundle>) -> Inputs<'a> {
        Inputs {
            app: AppRef {
                app: spec.name.clone(),
                spec_digest: op.spec_digest.clone().unwrap_or_else(|| task::spec_digest(spec)),
            },
            bundle,
            bundle_digest: op
                .bundle_digest
                .clone()
                .or_else(|| bundle.map(Bundle::digest))
                .unwrap_or_default(),
            canary: spec.canary_weights(),
            canary_pause_secs: spec.canary.as_ref().map_or(0, |c| c.pause_secs),
        }
    }
}

/// The per-cluster colors a `Switch` or `Rollback` was created to move
/// traffic to (its `switch_to` parameter, `region/cluster` → color).
pub fn switch_targets(op: &Operation) -> BTreeMap<String, Color> {
    op.spec.switch_to.clone()
}

/// The targets of a deploy grouped into waves (its `waves` parameter lists
/// regions; without it, one wave).
pub(super) fn deploy_waves(op: &Operation) -> Vec<Vec<ClusterRef>> {
    let waves = &op.spec.waves;
    if waves.is_empty() {
        return vec![op.targets.clone()];
    }
    waves
        .iter()
        .map(|regions| {
            op.targets
                .iter()
                .filter(|t| regions.contains(&t.region))
                .cloned()
                .collect()
        })
        .filter(|w: &Vec<ClusterRef>| !w.is_empty())
        .collect()
}

/// The color a deploy step wrote to in `t`, once known.
pub(super) fn deployed_color(op: &Operation, t: &ClusterRef) -> Option<Color> {
    op.tasks
        .iter()
        .find(|r| r.spec.kind == DEPLOY && &r.spec.target == t)
        .and_then(|r| r.result.as_ref())
        .and_then(|r| outputs::deployed_color(&r.outputs))
}

/// The steps of `op`: a pure function of the operation record (its
/// parameters, the inputs fixed at creation, and what its finished steps
/// reported). Nothing applied after the operation was created changes it.
pub fn plan(op: &Operation, inputs: &Inputs<'_>) -> Vec<Step> {
    let app = || inputs.app.clone();
    let migrate = |action: MigrateAction, image: &str, target: Option<i64>| {
        TaskParams::DbMigrate(MigrateParams {
            app: app(),
            action,
            image: image.to_owned(),
            bundle_digest: inputs.bundle_digest.clone(),
            target,
            dry_run: false,
            compensate: false,
        })
    };
    let mut steps = Vec::new();
    match op.kind {
        OperationKind::Deploy => {
            let image = op.spec.image.clone().unwrap_or_default();
            let switch = !op.spec.no_switch;
            let atomic = op.spec.strategy == Strategy::Atomic;
            let bake = op.spec.bake_secs;
            let deploy = |t: &ClusterRef| {
                Step::new(
                    t,
                    TaskParams::AppDeploy {
                        app: app(),
                        image: image.clone(),
                    },
                )
            };
            let gates = |t: &ClusterRef| {
                Step::new(
                    t,
                    TaskParams::AppGates {
                        app: app(),
                        color: deployed_color(op, t),
                    },
                )
            };
            // Returns the next gate number: gates are numbered in plan
            // order, one in front of each traffic move of a group.
            let flip = |steps: &mut Vec<Step>, group: &[ClusterRef], first_gate: u32| -> u32 {
                // A canary moves the group's traffic in steps first, the
                // clusters of a step together (one decision), each step
                // judged before the next; with manual promotion, each step
                // and the switch wait for `cutover promote`.
                let mut gate = first_gate;
                for weight in &inputs.canary {
                    for (i, t) in group.iter().enumerate() {
                        let mut s = Step::new(
                            t,
                            TaskParams::AppCanary {
                                app: app(),
                                color: deployed_color(op, t),
                                weight: *weight,
                                pause_secs: inputs.canary_pause_secs,
                                compensate: false,
                            },
                        );
                        s.with_previous = i > 0;
                        if i == 0 {
                            s.gate = gate;
                        }
                        steps.push(s);
                    }
                    gate += 1;
                }
                for (i, t) in group.iter().enumerate() {
                    // The color the deploy step reported; a switch step is
                    // only committed once that step finished, so by then it
                    // is always named.
                    let mut s = Step::new(
                        t,
                        TaskParams::AppSwitch {
                            app: app(),
                            to: deployed_color(op, t),
                            compensate: false,
                        },
                    );
                    s.with_previous = i > 0;
                    if i == 0 {
                        s.gate = gate;
                    }
                    steps.push(s);
                }
                if bake > 0 {
                    for (i, t) in group.iter().enumerate() {
                        let mut b = Step::new(
                            t,
                            TaskParams::AppBake {
                                app: app(),
                                seconds: bake,
                            },
                        );
                        b.with_previous = i > 0;
                        steps.push(b);
                    }
                }
                gate + 1
            };
            let waves = deploy_waves(op);
            // Expand first: with migrations, every region deploys the new
            // color, then each primary database migrates (one decision, in
            // parallel), and only then do gates and switches begin. A failed
            // migration thus aborts before any traffic moves.
            let migrations = inputs.bundle.is_some_and(|b| !b.migrations.is_empty());
            let prepare = |steps: &mut Vec<Step>, wave: &[ClusterRef]| {
                for t in wave {
                    if !migrations {
                        steps.push(deploy(t));
                    }
                    steps.push(gates(t));
                }
            };
            if migrations {
                for t in waves.iter().flatten() {
                    steps.push(deploy(t));
                }
                for (i, t) in waves.iter().flatten().enumerate() {
                    let mut m = Step::new(t, migrate(MigrateAction::Up, &image, None));
                    m.with_previous = i > 0;
                    steps.push(m);
                }
            }
            if atomic {
                // Every region prepares first; one decision flips them all.
                for w in &waves {
                    prepare(&mut steps, w);
                }
                if switch {
                    let all: Vec<ClusterRef> = waves.concat();
                    flip(&mut steps, &all, 1);
                }
            } else {
                let mut gate = 1;
                for w in &waves {
                    prepare(&mut steps, w);
                    if switch {
                        gate = flip(&mut steps, w, gate);
                    }
                }
            }
        }
        OperationKind::Switch | OperationKind::Rollback => {
            // Each cluster's target color was resolved when the operation
            // was created, so a re-sent switch converges instead of flipping
            // traffic back.
            let to = switch_targets(op);
            for (i, t) in op.targets.iter().enumerate() {
                let mut s = Step::new(
                    t,
                    TaskParams::AppSwitch {
                        app: app(),
                        to: to.get(&t.to_string()).copied(),
                        compensate: false,
                    },
                );
                s.with_previous = i > 0;
                steps.push(s);
            }
            // A rollback across a release's (reversible) migrations runs
            // their downs once traffic is back on the old code.
            let downs = &op.spec.migrate_down;
            if let (Some(_), Some(image)) = (inputs.bundle, op.spec.release_image.as_ref()) {
                for (i, t) in op
                    .targets
                    .iter()
                    .filter(|t| downs.contains_key(&t.to_string()))
                    .enumerate()
                {
                    let mut m = Step::new(
                        t,
                        migrate(MigrateAction::Down, image, downs.get(&t.to_string()).copied()),
                    );
                    m.with_previous = i > 0;
                    steps.push(m);
                }
            }
        }
        OperationKind::Migrate => {
            let MigrateSpec {
                action,
                target,
                dry_run,
            } = op.spec.migrate.clone().unwrap_or(MigrateSpec {
                action: MigrateAction::Status,
                target: None,
                dry_run: false,
            });
            let image = op.spec.image.clone().unwrap_or_default();
            for (i, t) in op.targets.iter().enumerate() {
                let mut params = migrate(action, &image, target);
                if let TaskParams::DbMigrate(m) = &mut params {
                    m.dry_run = dry_run;
                }
                let mut m = Step::new(t, params);
                m.with_previous = i > 0;
                steps.push(m);
            }
        }
        OperationKind::Backup => {
            // Each target's step is its own: the clusters back up (or the one
            // cluster validates, restores or deletes) at the same time.
            let Some(b) = op.spec.backup.as_deref() else {
                return steps;
            };
            let step = |t: &ClusterRef, action: BackupAction, backup_id: String, object, table_rows| {
                Step::new(
                    t,
                    TaskParams::DbBackup(BackupParams {
                        app: app(),
                        action,
                        backup_id,
                        object,
                        table_rows,
                        delete: if action == BackupAction::Delete {
                            b.delete.clone()
                        } else {
                            BTreeMap::new()
                        },
                    }),
                )
            };
            let id_of = |t: &ClusterRef| {
                b.backup_id
                    .clone()
                    .unwrap_or_else(|| backup::backup_id(&inputs.app.app, t, &op.id, op.created_at_unix_ms))
            };
            if b.action == BackupAction::RestorePrimary {
                // The app stops taking traffic (so writing) first; then a
                // safety backup of the data about to be replaced; then the
                // restore; then traffic again. A failure on the way ends
                // the maintenance (see compensate).
                let maintenance = |t: &ClusterRef, on| {
                    Step::new(
                        t,
                        TaskParams::AppMaintenance {
                            app: app(),
                            on,
                            compensate: false,
                        },
                    )
                };
                for t in &op.targets {
                    let safety = backup::backup_id(&inputs.app.app, t, &op.id, op.created_at_unix_ms);
                    steps.push(maintenance(t, true));
                    steps.push(step(t, BackupAction::Create, safety, None, BTreeMap::new()));
                    steps.push(step(t, b.action, id_of(t), b.object.clone(), b.table_rows.clone()));
                    steps.push(maintenance(t, false));
                }
                return steps;
            }
            for (i, t) in op.targets.iter().enumerate() {
                let mut s = step(t, b.action, id_of(t), b.object.clone(), b.table_rows.clone());
                s.with_previous = i > 0;
                steps.push(s);
            }
            if b.action == BackupAction::Create && b.validate {
                // Then each new backup is validated by restore, with what its
                // create step reported (committed only once every create
                // step finished).
                for (i, t) in op.targets.iter().enumerate() {
                    let out = op
                        .tasks
                        .iter()
                        .find(|r| &r.spec.target == t && r.spec.kind == TaskKind::DbBackup.as_str())
                        .and_then(|r| r.result.as_ref())
                        .map(|r| outputs::BackupOutputs::from_wire(&r.outputs))
                        .unwrap_or_default();
                    let mut s = step(
                        t,
                        BackupAction::Validate,
                        id_of(t),
                        out.object,
                        out.table_rows.unwrap_or_default(),
                    );
                    s.with_previous = i > 0;
                    steps.push(s);
                }
            }
        }
        OperationKind::HealthCheck => {
            for t in &op.targets {
                steps.push(Step::new(
                    t,
                    TaskParams::AppGates {
                        app: app(),
                        color: None,
                    },
                ));
            }
        }
        OperationKind::Analysis => {
            for t in &op.targets {
                steps.push(Step::new(t, TaskParams::AppAnalysis { app: app() }));
            }
        }
        OperationKind::Failover => {
            // The old primary is fenced (its app stops taking traffic, its
            // database stops taking writes) before the standby is promoted,
            // and the promotion waits until the standby replayed the
            // fence's last write: a planned failover loses nothing.
            let Some(f) = op.spec.failover.as_deref() else {
                return steps;
            };
            let failover = |t: &ClusterRef, action, wait_for_lsn| {
                Step::new(
                    t,
                    TaskParams::DbFailover(FailoverParams {
                        app: app(),
                        action,
                        epoch: f.epoch,
                        wait_for_lsn,
                        source: (action == FailoverAction::Rejoin).then(|| f.to.clone()),
                        compensate: false,
                    }),
                )
            };
            // Rebuilding the old primary as a standby of the new one, then
            // letting its app take traffic again (it reads from the
            // standby, as the new primary's region did before).
            let rejoin = |steps: &mut Vec<Step>, from: &ClusterRef| {
                steps.push(failover(from, FailoverAction::Rejoin, None));
                steps.push(Step::new(
                    from,
                    TaskParams::AppMaintenance {
                        app: app(),
                        on: false,
                        compensate: false,
                    },
                ));
            };
            if f.rejoin_only {
                if let Some(from) = &f.from {
                    rejoin(&mut steps, from);
                }
                return steps;
            }
            // The traffic driver holds new requests from before the fence
            // until the new primary takes them, so a planned failover
            // fails none: those in flight finish on the old primary, the
            // held ones go to the new. Traffic moves right after the
            // promotion, before the verifying gates: once a standby is
            // promoted there is nowhere else for it to go, and every held
            // request would wait for the gates too.
            let traffic = |action, region: Option<String>| {
                f.traffic.as_ref().map(|t| {
                    Step::new(
                        t,
                        TaskParams::TrafficMove(TrafficParams {
                            app: app(),
                            action,
                            region,
                            epoch: f.epoch,
                            compensate: false,
                        }),
                    )
                })
            };
            steps.extend(traffic(TrafficAction::Hold, Some(f.to.region.clone())));
            let mut fenced_at = None;
            if f.fence
                && let Some(from) = &f.from
            {
                steps.push(Step::new(
                    from,
                    TaskParams::AppMaintenance {
                        app: app(),
                        on: true,
                        compensate: false,
                    },
                ));
                steps.push(failover(from, FailoverAction::Fence, None));
                if f.fence_only {
                    return steps;
                }
                fenced_at = op
                    .tasks
                    .iter()
                    .find(|r| &r.spec.target == from && r.spec.kind == TaskKind::DbFailover.as_str())
                    .and_then(|r| r.result.as_ref())
                    .and_then(|r| outputs::FailoverOutputs::from_wire(&r.outputs).lsn);
            }
            steps.push(failover(&f.to, FailoverAction::Promote, fenced_at));
            // No standby in `to`: the promotion claimed its (fenced, cold)
            // database for the new epoch; the newest validated backup is
            // restored onto it, checked against the rows recorded when it
            // was taken, before anything serves from it.
            if let Some(r) = &f.restore {
                steps.push(Step::new(
                    &f.to,
                    TaskParams::DbBackup(BackupParams {
                        app: app(),
                        action: BackupAction::RestorePrimary,
                        backup_id: r.backup_id.clone(),
                        object: Some(r.object.clone()),
                        table_rows: r.table_rows.clone(),
                        delete: BTreeMap::new(),
                    }),
                ));
            }
            // Repoint: nothing served in `to`, so the release goes there
            // (its inactive color), passes its gates and takes its traffic,
            // all before traffic moves to the region.
            if let Some(image) = &f.deploy_image {
                steps.push(Step::new(
                    &f.to,
                    TaskParams::AppDeploy {
                        app: app(),
                        image: image.clone(),
                    },
                ));
                if let Some(color) = deployed_color(op, &f.to) {
                    steps.push(Step::new(
                        &f.to,
                        TaskParams::AppGates {
                            app: app(),
                            color: Some(color),
                        },
                    ));
                    steps.push(Step::new(
                        &f.to,
                        TaskParams::AppSwitch {
                            app: app(),
                            to: Some(color),
                            compensate: false,
                        },
                    ));
                }
            }
            steps.extend(traffic(TrafficAction::Move, Some(f.to.region.clone())));
            if let Some(color) = f.verify_color {
                steps.push(Step::new(
                    &f.to,
                    TaskParams::AppGates {
                        app: app(),
                        color: Some(color),
                    },
                ));
            }
            if f.rejoin
                && let Some(from) = &f.from
            {
                rejoin(&mut steps, from);
            }
        }
        OperationKind::Drill => {
            // One task per target: the agent clones, serves, checks,
            // measures and tears down itself, so a drill interrupted
            // anywhere leaves nothing half-built for another step to undo.
            let image = op.spec.image.clone().unwrap_or_default();
            for t in &op.targets {
                steps.push(Step::new(
                    t,
                    TaskParams::DrDrill {
                        app: app(),
                        image: image.clone(),
                        restore: op.spec.restore.as_deref().cloned(),
                    },
                ));
            }
        }
        OperationKind::Task => {}
    }
    steps
}
