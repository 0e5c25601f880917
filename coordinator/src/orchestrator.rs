//! Drives app operations (deploy, switch, rollback, health check) one step
//! at a time. Only the leader runs it. Every decision is a committed command
//! (`AddTask`, `FinishOperation`), and the next decision is derived from the
//! replicated state alone, so a new leader resumes every operation where the
//! old one left it: an unfinished step is re-sent (agents dedupe by task id),
//! a finished one leads to the next.
//!
//! A deploy to one or more clusters is: deploy to the inactive color and run
//! the gates in each cluster, then (unless `no_switch`) switch each. A
//! failing step ends the operation; since switches come last, a color that
//! failed its gates never takes traffic.

use std::collections::BTreeMap;

use cutover_shared::app::{AppSpec, Color};
use cutover_shared::config::RetentionConfig;
use cutover_shared::domain::{ClusterRef, Operation, OperationKind, TaskRecord, TaskSpec, TaskState, now_unix_ms};
use cutover_shared::release::Bundle;
use cutover_shared::task::{self, AppRef, MigrateAction, MigrateParams, TaskParams, outputs};

use crate::raft::{Consensus, Proposal};
use crate::state::Command;

/// Task kind names, for code that compares recorded tasks.
pub const DEPLOY: &str = "app.deploy";
pub const GATES: &str = "app.gates";
pub const SWITCH: &str = "app.switch";

/// One planned step.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub target: ClusterRef,
    pub params: TaskParams,
    /// May start while the previous step still runs (switches of one wave
    /// flip together; bakes watch their clusters at the same time). Such a
    /// group is committed as one log entry: one decision.
    with_previous: bool,
    /// The manual promotion gate in front of this step (1-based), if any.
    pub gate: u32,
}

impl Step {
    fn new(target: &ClusterRef, params: TaskParams) -> Step {
        Step {
            target: target.clone(),
            params,
            with_previous: false,
            gate: 0,
        }
    }
}

pub const BAKE: &str = "app.bake";
/// Runs an app's migrations against its primary database in a cluster.
pub const MIGRATE: &str = "db.migrate";

/// The release image whose migrations `op` uses, if any.
pub fn release_image(op: &Operation) -> Option<&str> {
    op.release_image()
}

/// A recorded task's typed parameters (`None` for a task this version
/// cannot decode, which then counts as no step of any plan).
fn params_of(t: &TaskRecord) -> Option<TaskParams> {
    TaskParams::from_wire(&t.spec.kind, &t.spec.params).ok()
}

fn is_compensation(t: &TaskRecord) -> bool {
    params_of(t).is_some_and(|p| p.is_compensation())
}

/// What an operation acts with, fixed when it was created: the app (by
/// name and definition digest) and the release migrations, if any.
pub struct Inputs<'a> {
    pub app: AppRef,
    pub bundle: Option<&'a Bundle>,
    pub bundle_digest: String,
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
        }
    }
}

/// The per-cluster colors a `Switch` or `Rollback` was created to move
/// traffic to (its `switch_to` parameter, `region/cluster` → color).
pub fn switch_targets(op: &Operation) -> BTreeMap<String, Color> {
    op.params
        .get("switch_to")
        .and_then(|j| serde_json::from_str::<BTreeMap<String, String>>(j).ok())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(k, v)| Some((k, Color::parse(&v)?)))
        .collect()
}

/// The targets of a deploy grouped into waves (its `waves` parameter lists
/// regions; without it, one wave).
fn deploy_waves(op: &Operation) -> Vec<Vec<ClusterRef>> {
    let waves: Vec<Vec<String>> = op
        .params
        .get("waves")
        .and_then(|w| serde_json::from_str(w).ok())
        .unwrap_or_default();
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
fn deployed_color(op: &Operation, t: &ClusterRef) -> Option<Color> {
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
            let image = op.params.get("image").cloned().unwrap_or_default();
            let switch = op.params.get("no_switch").is_none_or(|v| v != "true");
            let atomic = op.params.get("strategy").is_some_and(|s| s == "atomic");
            let bake: u64 = op.params.get("bake_secs").and_then(|b| b.parse().ok()).unwrap_or(0);
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
            let flip = |steps: &mut Vec<Step>, group: &[ClusterRef], gate: u32| {
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
                for (i, w) in waves.iter().enumerate() {
                    prepare(&mut steps, w);
                    if switch {
                        flip(&mut steps, w, i as u32 + 1);
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
            let downs: BTreeMap<String, i64> = op
                .params
                .get("migrate_down")
                .and_then(|d| serde_json::from_str(d).ok())
                .unwrap_or_default();
            if let (Some(_), Some(image)) = (inputs.bundle, op.params.get("release_image")) {
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
            let action = op
                .params
                .get("action")
                .and_then(|a| MigrateAction::parse(a))
                .unwrap_or(MigrateAction::Status);
            let target = op.params.get("target").and_then(|t| t.parse().ok());
            let image = op.params.get("image").cloned().unwrap_or_default();
            let dry_run = op.params.get("dry_run").is_some_and(|d| d == "true");
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
        OperationKind::Task => {}
    }
    steps
}

fn record(op: &Operation, index: usize, step: Step, now: i64) -> TaskRecord {
    let (kind, params) = step.params.to_wire();
    TaskRecord {
        spec: TaskSpec {
            task_id: format!("{}-{}", op.id, index + 1),
            operation_id: op.id.clone(),
            kind,
            params,
            target: step.target,
        },
        created_at_unix_ms: now,
        state: TaskState::Pending,
        progress: vec![],
        result: None,
        dispatch_count: 0,
    }
}

fn task_from(op: &Operation, index: usize, step: Step, now: i64) -> Command {
    Command::AddTasks {
        operation_id: op.id.clone(),
        index,
        tasks: vec![record(op, index, step, now)],
    }
}

/// True when `op` waits for operators at its manual promotion gates.
pub fn has_gates(op: &Operation) -> bool {
    op.params.get("promotion").is_some_and(|p| p == "manual")
}

/// How many manual promotion gates `op` has (0 unless it was started with
/// manual promotion).
pub fn gate_count(op: &Operation, inputs: &Inputs<'_>) -> u32 {
    if !has_gates(op) {
        return 0;
    }
    plan(op, inputs).iter().map(|s| s.gate).max().unwrap_or(0)
}

/// The manual promotion gate `op` waits at now, if any.
pub fn awaiting_gate(op: &Operation, inputs: &Inputs<'_>) -> Option<u32> {
    if !has_gates(op) || op.state.is_finished() || op.control.paused || op.control.aborted_by.is_some() {
        return None;
    }
    if !op.tasks.iter().all(|t| t.state.is_finished()) || op.tasks.iter().any(|t| t.state == TaskState::Failed) {
        return None;
    }
    let step = plan(op, inputs).into_iter().nth(op.tasks.len())?;
    (step.gate > 0 && !op.control.promoted.contains(&step.gate)).then_some(step.gate)
}

/// What to commit next for `op`, if anything.
pub fn next_command(op: &Operation, inputs: &Inputs<'_>, now: i64) -> Option<Command> {
    if op.kind == OperationKind::Task || op.state.is_finished() {
        return None;
    }
    let finish = |state: TaskState, summary: String| Command::FinishOperation {
        operation_id: op.id.clone(),
        state,
        summary,
        at_unix_ms: now,
    };
    let all_done = op.tasks.iter().all(|t| t.state.is_finished());
    // A health check reports on every cluster; other operations stop at the
    // first failure and switch back every cluster they already switched.
    let failure = op
        .tasks
        .iter()
        .find(|t| t.state == TaskState::Failed && !is_compensation(t))
        .filter(|_| op.kind != OperationKind::HealthCheck);
    // An abort is a failure the operator chose: the same rollback follows.
    if failure.is_some() || op.control.aborted_by.is_some() {
        if !all_done {
            return None;
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
                t.state == TaskState::Succeeded
                    || matches!(params_of(t), Some(TaskParams::AppSwitch { to: Some(_), .. }))
            })
            .collect();
        let compensated = |kind: &str| -> Vec<&ClusterRef> {
            op.tasks
                .iter()
                .filter(|t| is_compensation(t) && t.spec.kind == kind)
                .map(|t| &t.spec.target)
                .collect()
        };
        let switched_back = compensated(SWITCH);
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
            return Some(task_from(op, op.tasks.len(), step, now));
        }
        // Traffic is back on the old code: undo the schema changes this
        // operation made, when its migrations can be undone.
        let migrated: Vec<&TaskRecord> = op
            .tasks
            .iter()
            .filter(|t| t.state == TaskState::Succeeded)
            .filter(|t| {
                matches!(params_of(t), Some(TaskParams::DbMigrate(m)) if m.action == MigrateAction::Up && !m.compensate)
            })
            .filter(|t| t.result.as_ref().is_some_and(|r| outputs::migrated_anything(&r.outputs)))
            .collect();
        let reverted = compensated(MIGRATE);
        let reversible = inputs.bundle.is_some_and(Bundle::reversible);
        if reversible && let Some(t) = migrated.iter().find(|t| !reverted.contains(&&t.spec.target)) {
            let Some(TaskParams::DbMigrate(mut m)) = params_of(t) else {
                return None;
            };
            let from = t
                .result
                .as_ref()
                .and_then(|r| outputs::version(&r.outputs, outputs::FROM_VERSION))
                .unwrap_or(0);
            m.action = MigrateAction::Down;
            m.target = Some(from);
            m.compensate = true;
            let step = Step::new(&t.spec.target, TaskParams::DbMigrate(m));
            return Some(task_from(op, op.tasks.len(), step, now));
        }
        let mut summary = match (failure, &op.control.aborted_by) {
            (Some(failed), _) => {
                let why = failed.result.as_ref().map_or("no result", |r| r.message.as_str());
                let why: String = why
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .collect::<Vec<_>>()
                    .join("; ");
                format!("{} in {} failed: {why}", failed.spec.kind, failed.spec.target)
            }
            (None, Some(who)) => format!("aborted by {who}"),
            (None, None) => unreachable!("checked above"),
        };
        let back: Vec<String> = op
            .tasks
            .iter()
            .filter(|t| is_compensation(t))
            .map(|t| {
                let ok = t.state == TaskState::Succeeded;
                match (t.spec.kind.as_str(), ok) {
                    (MIGRATE, true) => format!(
                        "{} schema reverted to version {}",
                        t.spec.target,
                        t.spec.params.get("target").map_or("0", String::as_str)
                    ),
                    (MIGRATE, false) => format!("{} schema NOT reverted", t.spec.target),
                    (_, true) => format!("{} switched back", t.spec.target),
                    (_, false) => format!("{} NOT switched back", t.spec.target),
                }
            })
            .collect();
        if !reversible {
            for t in &migrated {
                let at = t.result.as_ref().and_then(|r| r.outputs.get("to_version"));
                summary.push_str(&format!(
                    "; {} schema left at version {} (the release's migrations are not all reversible)",
                    t.spec.target,
                    at.map_or("?", String::as_str)
                ));
            }
        }
        if !back.is_empty() {
            summary.push_str(&format!("; rolled back: {}", back.join(", ")));
        }
        return Some(finish(TaskState::Failed, summary));
    }
    if op.control.paused {
        return None;
    }
    let index = op.tasks.len();
    let mut steps = plan(op, inputs).into_iter().skip(index).peekable();
    match steps.peek() {
        Some(step) if all_done || step.with_previous => {
            if step.gate > 0 && has_gates(op) && !op.control.promoted.contains(&step.gate) {
                return None;
            }
            // The step and the steps that go with it, as one decision: after
            // a leader change the group is either all committed or not at all.
            let first = steps.next()?;
            let mut group = vec![first];
            while let Some(s) = steps.next_if(|s| s.with_previous) {
                group.push(s);
            }
            let tasks = group
                .into_iter()
                .enumerate()
                .map(|(i, s)| record(op, index + i, s, now))
                .collect();
            Some(Command::AddTasks {
                operation_id: op.id.clone(),
                index,
                tasks,
            })
        }
        Some(_) => None,
        None if !all_done => None,
        None => {
            let failed: Vec<String> = op
                .tasks
                .iter()
                .filter(|t| t.state == TaskState::Failed)
                .map(|t| format!("{} in {} failed", t.spec.kind, t.spec.target))
                .collect();
            Some(if failed.is_empty() {
                finish(TaskState::Succeeded, success_summary(op))
            } else {
                finish(TaskState::Failed, failed.join("; "))
            })
        }
    }
}

fn success_summary(op: &Operation) -> String {
    op.tasks
        .iter()
        .filter_map(|t| {
            t.result
                .as_ref()
                .map(|r| format!("{} {}: {}", t.spec.kind, t.spec.target, r.message))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Proposes the next step of every unfinished app operation.
pub async fn advance(consensus: &Consensus) {
    let now = now_unix_ms();
    let commands: Vec<Command> = consensus.read(|s| {
        s.operations
            .values()
            .filter(|o| o.kind != OperationKind::Task && !o.state.is_finished())
            .filter_map(|o| {
                let (spec, bundle) = s.operation_inputs(o)?;
                next_command(o, &Inputs::new(o, spec, bundle), now)
            })
            .collect()
    });
    for cmd in commands {
        tracing::info!("orchestrator: {cmd}");
        if let Err(e) = consensus.propose(Proposal::Command(cmd)).await {
            tracing::warn!("orchestrator could not commit a step: {e}");
        }
    }
}

/// How often the leader checks the state against the retention policy.
const COMPACT_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Proposes a `Compact` if the state holds more finished history than
/// `retention` allows.
pub async fn compact(consensus: &Consensus, retention: &RetentionConfig) {
    let now = now_unix_ms();
    if !consensus.read(|s| s.needs_compaction(retention, now)) {
        return;
    }
    let cmd = Command::Compact {
        retention: retention.clone(),
        at_unix_ms: now,
    };
    if let Err(e) = consensus.propose(Proposal::Command(cmd)).await {
        tracing::warn!("could not commit a compaction: {e}");
    }
}

/// Runs for the node's lifetime: after every apply (and once a second, for a
/// leader that just took over), advances operations if this node leads; once
/// a minute, the leader also compacts finished history.
pub async fn run(consensus: Consensus, retention: RetentionConfig) {
    let mut applied = consensus.applied();
    let mut last_compaction = std::time::Instant::now();
    loop {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), applied.changed()).await;
        if consensus.is_leader() {
            advance(&consensus).await;
            if last_compaction.elapsed() >= COMPACT_EVERY {
                last_compaction = std::time::Instant::now();
                compact(&consensus, &retention).await;
            }
        }
    }
}
