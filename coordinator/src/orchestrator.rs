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
        }
    };
    let mut steps = Vec::new();
    match op.kind {
        OperationKind::Deploy => {
            let image = op.params.get("image").cloned().unwrap_or_default();
            // The color each cluster's deploy step wrote to: the gates check
            // it and the switch moves traffic to it.
            let deployed = |t: &ClusterRef| {
                op.tasks
                    .iter()
                    .find(|r| r.spec.kind == DEPLOY && &r.spec.target == t)
                    .and_then(|r| r.result.as_ref())
                    .and_then(|r| r.outputs.get("color").cloned())
                    .unwrap_or_else(|| "inactive".into())
            };
            for t in &op.targets {
                let mut s = base(DEPLOY, t);
                s.params.insert("image".into(), image.clone());
                steps.push(s);
                let mut g = base(GATES, t);
                g.params.insert("color".into(), deployed(t));
                steps.push(g);
            }
            if op.params.get("no_switch").is_none_or(|v| v != "true") {
                for t in &op.targets {
                    let mut s = base(SWITCH, t);
                    s.params.insert("to".into(), deployed(t));
                    steps.push(s);
                }
            }
        }
        OperationKind::Switch | OperationKind::Rollback => {
            for t in &op.targets {
                let mut s = base(SWITCH, t);
                s.params.insert("to".into(), "inactive".into());
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
    if let Some(last) = op.tasks.last() {
        if !last.state.is_finished() {
            return None;
        }
        // A health check reports on every cluster; other operations stop at
        // the first failure.
        if last.state == TaskState::Failed && op.kind != OperationKind::HealthCheck {
            let why = last.result.as_ref().map_or("no result", |r| r.message.as_str());
            return Some(finish(
                TaskState::Failed,
                format!("{} in {} failed: {why}", last.spec.kind, last.spec.target),
            ));
        }
    }
    let steps = plan(op, spec);
    let index = op.tasks.len();
    match steps.into_iter().nth(index) {
        Some(step) => {
            let task_id = format!("{}-{}", op.id, index + 1);
            Some(Command::AddTask {
                operation_id: op.id.clone(),
                index,
                task: TaskRecord {
                    spec: TaskSpec {
                        task_id,
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
            })
        }
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
