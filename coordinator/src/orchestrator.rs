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

use cutover_shared::app::AppSpec;
use cutover_shared::domain::{ClusterRef, Operation, OperationKind, TaskRecord, TaskSpec, TaskState, now_unix_ms};
use cutover_shared::release::Bundle;

use crate::raft::{Consensus, Proposal};
use crate::state::Command;

/// Task kinds the agent executes for apps.
pub const DEPLOY: &str = "app.deploy";
pub const GATES: &str = "app.gates";
pub const SWITCH: &str = "app.switch";

/// One planned step.
struct Step {
    kind: &'static str,
    target: ClusterRef,
    params: BTreeMap<String, String>,
    /// May start while the previous step still runs (switches of one wave
    /// flip together; bakes watch their clusters at the same time). Such a
    /// group is committed as one log entry: one decision.
    with_previous: bool,
    /// The manual promotion gate in front of this step (1-based), if any.
    gate: u32,
}

pub const BAKE: &str = "app.bake";
/// Runs an app's migrations against its primary database in a cluster.
pub const MIGRATE: &str = "db.migrate";

/// The release image whose migrations `op` uses, if any.
pub fn release_image(op: &Operation) -> Option<&str> {
    match op.kind {
        OperationKind::Deploy | OperationKind::Migrate => op.params.get("image").map(String::as_str),
        OperationKind::Rollback => op.params.get("release_image").map(String::as_str),
        _ => None,
    }
}

/// A migrate step's parameters.
fn migrate_params(
    params: &mut BTreeMap<String, String>,
    bundle: &Bundle,
    image: &str,
    action: &str,
    target: Option<i64>,
) {
    params.insert("action".into(), action.into());
    params.insert("image".into(), image.into());
    params.insert("bundle".into(), serde_json::to_string(bundle).unwrap_or_default());
    if let Some(t) = target {
        params.insert("target".into(), t.to_string());
    }
}

fn is_compensation(t: &TaskRecord) -> bool {
    t.spec.params.get("compensate").is_some_and(|v| v == "true")
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
fn deployed_color(op: &Operation, t: &ClusterRef) -> Option<String> {
    op.tasks
        .iter()
        .find(|r| r.spec.kind == DEPLOY && &r.spec.target == t)
        .and_then(|r| r.result.as_ref())
        .and_then(|r| r.outputs.get("color").cloned())
}

/// The steps of `op`, given what the finished ones reported and the
/// migrations of its release.
fn plan(op: &Operation, spec: &AppSpec, bundle: Option<&Bundle>) -> Vec<Step> {
    let base = |kind: &'static str, target: &ClusterRef| {
        let mut params = BTreeMap::new();
        params.insert("app".to_owned(), spec.name.clone());
        params.insert("spec".to_owned(), serde_json::to_string(spec).unwrap_or_default());
        Step {
            kind,
            target: target.clone(),
            params,
            with_previous: false,
            gate: 0,
        }
    };
    let mut steps = Vec::new();
    match op.kind {
        OperationKind::Deploy => {
            let image = op.params.get("image").cloned().unwrap_or_default();
            let switch = op.params.get("no_switch").is_none_or(|v| v != "true");
            let atomic = op.params.get("strategy").is_some_and(|s| s == "atomic");
            let bake: u64 = op.params.get("bake_secs").and_then(|b| b.parse().ok()).unwrap_or(0);
            let color = |t: &ClusterRef| deployed_color(op, t).unwrap_or_else(|| "inactive".into());
            let prepare = |steps: &mut Vec<Step>, wave: &[ClusterRef]| {
                for t in wave {
                    let mut s = base(DEPLOY, t);
                    s.params.insert("image".into(), image.clone());
                    steps.push(s);
                    let mut g = base(GATES, t);
                    g.params.insert("color".into(), color(t));
                    steps.push(g);
                }
            };
            let flip = |steps: &mut Vec<Step>, group: &[ClusterRef], gate: u32| {
                for (i, t) in group.iter().enumerate() {
                    let mut s = base(SWITCH, t);
                    s.params.insert("to".into(), color(t));
                    s.with_previous = i > 0;
                    if i == 0 {
                        s.gate = gate;
                    }
                    steps.push(s);
                }
                if bake > 0 {
                    for (i, t) in group.iter().enumerate() {
                        let mut b = base(BAKE, t);
                        b.params.insert("seconds".into(), bake.to_string());
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
            let migrations = bundle.filter(|b| !b.migrations.is_empty());
            let prepare = |steps: &mut Vec<Step>, wave: &[ClusterRef]| {
                if migrations.is_some() {
                    for t in wave {
                        let mut g = base(GATES, t);
                        g.params.insert("color".into(), color(t));
                        steps.push(g);
                    }
                } else {
                    prepare(steps, wave);
                }
            };
            if let Some(b) = migrations {
                for t in waves.iter().flatten() {
                    let mut s = base(DEPLOY, t);
                    s.params.insert("image".into(), image.clone());
                    steps.push(s);
                }
                for (i, t) in waves.iter().flatten().enumerate() {
                    let mut m = base(MIGRATE, t);
                    migrate_params(&mut m.params, b, &image, "up", None);
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
            for (i, t) in op.targets.iter().enumerate() {
                let mut s = base(SWITCH, t);
                s.params.insert("to".into(), "inactive".into());
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
            if let (Some(b), Some(image)) = (bundle, op.params.get("release_image")) {
                for (i, t) in op
                    .targets
                    .iter()
                    .filter(|t| downs.contains_key(&t.to_string()))
                    .enumerate()
                {
                    let mut m = base(MIGRATE, t);
                    migrate_params(&mut m.params, b, image, "down", downs.get(&t.to_string()).copied());
                    m.with_previous = i > 0;
                    steps.push(m);
                }
            }
        }
        OperationKind::Migrate => {
            let action = op.params.get("action").cloned().unwrap_or_else(|| "status".into());
            let target = op.params.get("target").and_then(|t| t.parse().ok());
            let image = op.params.get("image").cloned().unwrap_or_default();
            let empty = Bundle::default();
            for (i, t) in op.targets.iter().enumerate() {
                let mut m = base(MIGRATE, t);
                migrate_params(&mut m.params, bundle.unwrap_or(&empty), &image, &action, target);
                if op.params.get("dry_run").is_some_and(|d| d == "true") {
                    m.params.insert("dry_run".into(), "true".into());
                }
                m.with_previous = i > 0;
                steps.push(m);
            }
        }
        OperationKind::HealthCheck => {
            for t in &op.targets {
                steps.push(base(GATES, t));
            }
        }
        OperationKind::Task => {}
    }
    steps
}

fn record(op: &Operation, index: usize, step: Step, now: i64) -> TaskRecord {
    TaskRecord {
        spec: TaskSpec {
            task_id: format!("{}-{}", op.id, index + 1),
            operation_id: op.id.clone(),
            kind: step.kind.to_owned(),
            params: step.params,
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
pub fn gate_count(op: &Operation, spec: &AppSpec, bundle: Option<&Bundle>) -> u32 {
    if !has_gates(op) {
        return 0;
    }
    plan(op, spec, bundle).iter().map(|s| s.gate).max().unwrap_or(0)
}

/// The manual promotion gate `op` waits at now, if any.
pub fn awaiting_gate(op: &Operation, spec: &AppSpec, bundle: Option<&Bundle>) -> Option<u32> {
    if !has_gates(op) || op.state.is_finished() || op.control.paused || op.control.aborted_by.is_some() {
        return None;
    }
    if !op.tasks.iter().all(|t| t.state.is_finished()) || op.tasks.iter().any(|t| t.state == TaskState::Failed) {
        return None;
    }
    let step = plan(op, spec, bundle).into_iter().nth(op.tasks.len())?;
    (step.gate > 0 && !op.control.promoted.contains(&step.gate)).then_some(step.gate)
}

/// What to commit next for `op`, if anything.
pub fn next_command(op: &Operation, spec: &AppSpec, bundle: Option<&Bundle>, now: i64) -> Option<Command> {
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
        let switched: Vec<&TaskRecord> = op
            .tasks
            .iter()
            .filter(|t| t.spec.kind == SWITCH && !is_compensation(t) && t.state == TaskState::Succeeded)
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
            let mut params = t.spec.params.clone();
            let to = params.get("to").and_then(|c| cutover_shared::app::Color::parse(c));
            params.insert(
                "to".into(),
                to.map_or_else(|| "inactive".into(), |c| c.other().to_string()),
            );
            params.insert("compensate".into(), "true".into());
            let step = Step {
                kind: SWITCH,
                target: t.spec.target.clone(),
                params,
                with_previous: false,
                gate: 0,
            };
            return Some(task_from(op, op.tasks.len(), step, now));
        }
        // Traffic is back on the old code: undo the schema changes this
        // operation made, when its migrations can be undone.
        let migrated: Vec<&TaskRecord> = op
            .tasks
            .iter()
            .filter(|t| t.spec.kind == MIGRATE && !is_compensation(t) && t.state == TaskState::Succeeded)
            .filter(|t| t.spec.params.get("action").is_some_and(|a| a == "up"))
            .filter(|t| {
                t.result
                    .as_ref()
                    .is_some_and(|r| r.outputs.get("applied").is_some_and(|a| !a.is_empty()))
            })
            .collect();
        let reverted = compensated(MIGRATE);
        let reversible = bundle.is_some_and(Bundle::reversible);
        if reversible && let Some(t) = migrated.iter().find(|t| !reverted.contains(&&t.spec.target)) {
            let mut params = t.spec.params.clone();
            let from = t
                .result
                .as_ref()
                .and_then(|r| r.outputs.get("from_version").cloned())
                .unwrap_or_else(|| "0".into());
            params.insert("action".into(), "down".into());
            params.insert("target".into(), from);
            params.insert("compensate".into(), "true".into());
            let step = Step {
                kind: MIGRATE,
                target: t.spec.target.clone(),
                params,
                with_previous: false,
                gate: 0,
            };
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
    let mut steps = plan(op, spec, bundle).into_iter().skip(index).peekable();
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
                let app = o.app.as_ref()?;
                let spec = s.apps.get(app)?;
                let bundle = release_image(o).and_then(|i| s.release_bundle(app, i));
                next_command(o, spec, bundle, now)
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

/// Runs for the node's lifetime: after every apply (and once a second, for a
/// leader that just took over), advances operations if this node leads.
pub async fn run(consensus: Consensus) {
    let mut applied = consensus.applied();
    loop {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), applied.changed()).await;
        if consensus.is_leader() {
            advance(&consensus).await;
        }
    }
}
