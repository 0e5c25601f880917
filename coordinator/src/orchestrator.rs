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
    /// flip together; bakes watch their clusters at the same time).
    with_previous: bool,
}

pub const BAKE: &str = "app.bake";

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

/// The steps of `op`, given what the finished ones reported.
fn plan(op: &Operation, spec: &AppSpec) -> Vec<Step> {
    let base = |kind: &'static str, target: &ClusterRef| {
        let mut params = BTreeMap::new();
        params.insert("app".to_owned(), spec.name.clone());
        params.insert("spec".to_owned(), serde_json::to_string(spec).unwrap_or_default());
        Step {
            kind,
            target: target.clone(),
            params,
            with_previous: false,
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
            let flip = |steps: &mut Vec<Step>, group: &[ClusterRef]| {
                for (i, t) in group.iter().enumerate() {
                    let mut s = base(SWITCH, t);
                    s.params.insert("to".into(), color(t));
                    s.with_previous = i > 0;
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
            if atomic {
                // Every region prepares first; one decision flips them all.
                for w in &waves {
                    prepare(&mut steps, w);
                }
                if switch {
                    let all: Vec<ClusterRef> = waves.concat();
                    flip(&mut steps, &all);
                }
            } else {
                for w in &waves {
                    prepare(&mut steps, w);
                    if switch {
                        flip(&mut steps, w);
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

fn task_from(op: &Operation, index: usize, step: Step, now: i64) -> Command {
    Command::AddTask {
        operation_id: op.id.clone(),
        index,
        task: TaskRecord {
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
        },
    }
}

/// What to commit next for `op`, if anything.
pub fn next_command(op: &Operation, spec: &AppSpec, now: i64) -> Option<Command> {
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
    let failure = op
        .tasks
        .iter()
        .find(|t| t.state == TaskState::Failed && !is_compensation(t));
    // A health check reports on every cluster; other operations stop at the
    // first failure and switch back every cluster they already switched.
    if let Some(failed) = failure
        && op.kind != OperationKind::HealthCheck
    {
        if !all_done {
            return None;
        }
        let why = failed.result.as_ref().map_or("no result", |r| r.message.as_str());
        let why: String = why
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        let switched: Vec<&TaskRecord> = op
            .tasks
            .iter()
            .filter(|t| t.spec.kind == SWITCH && !is_compensation(t) && t.state == TaskState::Succeeded)
            .collect();
        let compensated: Vec<&ClusterRef> = op
            .tasks
            .iter()
            .filter(|t| is_compensation(t))
            .map(|t| &t.spec.target)
            .collect();
        if let Some(t) = switched.iter().find(|t| !compensated.contains(&&t.spec.target)) {
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
            };
            return Some(task_from(op, op.tasks.len(), step, now));
        }
        let mut summary = format!("{} in {} failed: {why}", failed.spec.kind, failed.spec.target);
        let back: Vec<String> = op
            .tasks
            .iter()
            .filter(|t| is_compensation(t))
            .map(|t| {
                if t.state == TaskState::Succeeded {
                    format!("{} switched back", t.spec.target)
                } else {
                    format!("{} NOT switched back", t.spec.target)
                }
            })
            .collect();
        if !back.is_empty() {
            summary.push_str(&format!("; rolled back: {}", back.join(", ")));
        }
        return Some(finish(TaskState::Failed, summary));
    }
    let steps = plan(op, spec);
    let index = op.tasks.len();
    match steps.into_iter().nth(index) {
        Some(step) if all_done || step.with_previous => Some(task_from(op, index, step, now)),
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
                let spec = o.app.as_ref().and_then(|a| s.apps.get(a))?;
                next_command(o, spec, now)
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
