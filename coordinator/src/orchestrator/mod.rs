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

mod compensate;
pub mod dr_watch;
pub mod gauges;
mod plan;
pub mod schedule;
mod summary;

use cutover_shared::config::RetentionConfig;
use std::collections::BTreeMap;

use cutover_shared::app::{UnreachableAction, UnreachablePolicy};
use cutover_shared::domain::{
    AgentRecord, AgentState, Operation, OperationKind, TaskRecord, TaskResult, TaskSpec, TaskState, now_unix_ms,
};
use cutover_shared::operation::Promotion;
use cutover_shared::task::TaskParams;

pub use plan::{Inputs, Step, plan, switch_targets};

use crate::cluster_clock::ClusterClock;
use crate::raft::{Consensus, Proposal};
use crate::state::Command;

/// Task kind names, for code that compares recorded tasks.
pub const DEPLOY: &str = "app.deploy";
pub const GATES: &str = "app.gates";
pub const SWITCH: &str = "app.switch";
pub const BAKE: &str = "app.bake";
pub const CANARY: &str = "app.canary";
/// Runs an app's migrations against its primary database in a cluster.
pub const MIGRATE: &str = "db.migrate";
pub const MAINTENANCE: &str = "app.maintenance";
pub const TRAFFIC: &str = "traffic.move";

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
    op.spec.promotion == Promotion::Manual
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

/// What to commit next for `op`, if anything: the next step (or group of
/// steps that start together), a compensating step, or the end.
pub fn next_command(op: &Operation, inputs: &Inputs<'_>, now: i64) -> Option<Command> {
    if op.kind == OperationKind::Task || op.state.is_finished() {
        return None;
    }
    let finish = |(state, summary): (TaskState, String)| Command::FinishOperation {
        operation_id: op.id.clone(),
        state,
        summary,
        at_unix_ms: now,
    };
    let all_done = op.tasks.iter().all(|t| t.state.is_finished());
    // A health check or an analysis run reports on every cluster; other
    // operations stop at the first failure and switch back every cluster
    // they already switched.
    let failure = op
        .tasks
        .iter()
        .find(|t| t.state == TaskState::Failed && !is_compensation(t))
        .filter(|_| !matches!(op.kind, OperationKind::HealthCheck | OperationKind::Analysis));
    // An abort is a failure the operator chose: the same rollback follows.
    if failure.is_some() || op.control.aborted_by.is_some() {
        if !all_done {
            return None;
        }
        if let Some(step) = compensate::next_step(op, inputs) {
            return Some(task_from(op, op.tasks.len(), step, now));
        }
        return Some(finish((TaskState::Failed, summary::failure(op, failure, inputs))));
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
        None => Some(finish(summary::finished(op))),
    }
}

/// With an `[unreachable]` policy of `rollback`: the first unfinished step
/// of `op` whose agent has been down for the policy's `after_secs` (counted
/// from when the agent went down or the step was created, whichever is
/// later) fails. The failure is recorded as that cluster's result, so the
/// agent's own report, should it have run the task while cut off, comes
/// second and is ignored, and nothing re-sends the task once the agent is
/// back. The rollback then follows as after any failed step; compensating
/// steps never give up: what the cut-off region must undo can only be
/// undone there, so they wait for it.
///
/// Waiting also counts from no earlier than `watching_since`, when this
/// leader took over by its own clock: the timestamps in the state were
/// read off other nodes' clocks, and a leader whose clock is ahead of
/// theirs (one that started with a wrong wall clock) would otherwise see
/// an outage of seconds as one of hours and give up at once. A new leader
/// may so wait up to one policy longer; it never gives up early.
pub fn give_up_unreachable(
    op: &Operation,
    policy: Option<&UnreachablePolicy>,
    agents: &crate::state::Map<String, AgentRecord>,
    now: i64,
    watching_since: i64,
) -> Option<Command> {
    let policy = policy.filter(|p| p.action == UnreachableAction::Rollback)?;
    let failing = op
        .tasks
        .iter()
        .any(|t| t.state == TaskState::Failed && !is_compensation(t));
    if op.kind == OperationKind::Task || op.state.is_finished() || failing || op.control.aborted_by.is_some() {
        return None;
    }
    let limit = now - policy.after_secs as i64 * 1000;
    op.tasks
        .iter()
        .filter(|t| !t.state.is_finished() && !is_compensation(t))
        .find_map(|t| {
            let agent = agents.get(&t.spec.target.to_string())?;
            let waiting_since = agent.since_unix_ms.max(t.created_at_unix_ms).max(watching_since);
            (agent.state == AgentState::Down && waiting_since <= limit).then(|| Command::TaskFinished {
                from: t.spec.target.clone(),
                result: TaskResult {
                    task_id: t.spec.task_id.clone(),
                    success: false,
                    message: format!(
                        "agent {} unreachable for {} s (the app's [unreachable] policy: rollback after {} s)",
                        t.spec.target,
                        (now - waiting_since) / 1000,
                        policy.after_secs
                    ),
                    outputs: BTreeMap::new(),
                    replayed: false,
                    finished_at_unix_ms: now,
                },
                at_unix_ms: now,
            })
        })
}

/// The operations whose last scan found no next step, by the address of
/// their record, each held so that the address stays theirs: while it is
/// held, an apply that changes the operation replaces its `Arc` (a new
/// address) rather than writing in place.
///
/// [`next_command`] decides from the operation's record and its inputs
/// alone, and the inputs of an operation that names its definition's
/// digest are fixed (definitions are stored by digest), so an unchanged
/// record has no next step still: the scan skips planning it. Most running
/// operations wait on their agents most of the time, and planning every
/// one of them on every apply was most of a busy leader's scan (`bench
/// fleet`). Only the time-based give-up on an unreachable agent is judged
/// on every scan.
#[derive(Default)]
pub struct Quiet(std::collections::HashMap<usize, std::sync::Arc<Operation>>);

/// Proposes the next step of every unfinished app operation, or the
/// failure of a step whose agent is unreachable past its app's policy.
/// `leading_since`: when this node became leader, by its clock. `quiet`:
/// what the previous scan of this leadership found with nothing to do.
pub async fn advance(consensus: &Consensus, leading_since: i64, quiet: &mut Quiet) {
    let now = now_unix_ms();
    let scan = std::time::Instant::now();
    let commands: Vec<Command> = consensus.read(|s| {
        let mut still = std::collections::HashMap::with_capacity(quiet.0.len());
        let commands = s
            .running_operations()
            .filter(|o| o.kind != OperationKind::Task)
            .filter_map(|o| {
                let (spec, bundle) = s.operation_inputs(o)?;
                if let Some(cmd) = give_up_unreachable(o, spec.unreachable.as_ref(), &s.agents, now, leading_since) {
                    return Some(cmd);
                }
                let address = std::ptr::from_ref(o) as usize;
                if let Some(held) = quiet.0.remove(&address) {
                    still.insert(address, held);
                    return None;
                }
                let cmd = next_command(o, &Inputs::new(o, spec, bundle), now);
                if cmd.is_none()
                    && o.spec_digest.is_some()
                    && let Some(held) = s.operations.get(&o.id)
                    && std::ptr::eq(&**held, o)
                {
                    still.insert(address, held.clone());
                }
                cmd
            })
            .collect();
        quiet.0 = still;
        commands
    });
    // What a tick costs the leader, apart from committing its decisions
    // (`bench fleet` reads it).
    metrics::histogram!("cutover_orchestrator_scan_seconds").record(scan.elapsed().as_secs_f64());
    // Each command moves another operation, so they are proposed together:
    // Raft appends, replicates and fsyncs them as one batch, where one
    // after another each waited for the commit of the one before (a hundred
    // running operations made the last step wait for a hundred commits).
    let proposals = commands.into_iter().map(|cmd| async move {
        tracing::info!("orchestrator: {cmd}");
        if let Err(e) = consensus.propose(Proposal::Command(cmd)).await {
            tracing::warn!("orchestrator could not commit a step: {e}");
        }
    });
    futures::future::join_all(proposals).await;
}

/// Proposes what the backup schedules and their retention, and the
/// primaries a failover superseded, call for now.
/// `lead`: this node's term as leader.
pub async fn run_schedules(consensus: &Consensus, lead: &dr_watch::Leadership) {
    let now = now_unix_ms();
    let commands = consensus.read(|s| {
        let mut c = schedule::due(s, now);
        c.extend(dr_watch::due(s, now, lead));
        c
    });
    for cmd in commands {
        tracing::info!("scheduled: {cmd}");
        match consensus.propose(Proposal::Command(cmd)).await {
            Ok(_) => {}
            // Another leader's decision got there first.
            Err(crate::raft::ProposeError::Rejected(e)) => tracing::debug!("backup schedule: {e}"),
            Err(e) => tracing::warn!("backup schedule: could not commit: {e}"),
        }
    }
}

/// This node's leadership, as the orchestrator keeps it.
struct Led {
    term: u64,
    /// When it began, by the monotonic clock: the cluster clock's origin.
    origin: std::time::Instant,
    lead: dr_watch::Leadership,
    /// Whether it logged that a member cannot apply a tick.
    told_refused: bool,
    quiet: Quiet,
}

/// The cluster clock ([`crate::cluster_clock`]) as the leader of `term`,
/// leading since `origin`, reads it; first proposing the tick the state
/// wants (this term's first, or one that pins a new failover epoch).
/// `told_refused`: whether this term already logged a refused tick.
pub async fn read_clock(
    consensus: &Consensus,
    term: u64,
    origin: std::time::Instant,
    told_refused: &mut bool,
) -> dr_watch::ClusterTime {
    use dr_watch::ClusterTime;
    let led_ms = || u64::try_from(origin.elapsed().as_millis()).unwrap_or(u64::MAX);
    let wants = consensus.read(|s| {
        s.clock
            .wants_tick(term, s.dr_epochs.iter())
            .then(|| ClusterClock::pins(s.dr_epochs.iter()))
    });
    if let Some(pins) = wants {
        // Read after the epochs it pins were applied: never before them.
        let tick = Command::Tick {
            term,
            led_ms: led_ms(),
            pins,
        };
        match consensus.propose(Proposal::Command(tick)).await {
            Ok(_) => {}
            // A member that cannot apply a tick (a rolling upgrade).
            Err(crate::raft::ProposeError::Rejected(e)) => {
                if !std::mem::replace(told_refused, true) {
                    tracing::info!("cluster clock not ticking, failover cooldowns read on wall clocks: {e}");
                }
                return ClusterTime::Unavailable;
            }
            // A member not heard from since this node took over, in a
            // cluster that has never ticked: its level is not known. A
            // leader hears every live member within a heartbeat; one not
            // heard from for longer is down (a lost region), and may be of
            // an older release, so the clock cannot start without it.
            Err(crate::raft::ProposeError::LevelUnknown(e)) => {
                if origin.elapsed() < UNHEARD_GRACE {
                    return ClusterTime::Pending;
                }
                if !std::mem::replace(told_refused, true) {
                    tracing::info!("cluster clock not ticking, failover cooldowns read on wall clocks: {e}");
                }
                return ClusterTime::Unavailable;
            }
            Err(e) => {
                tracing::warn!("cluster clock: could not commit a tick: {e}");
                return ClusterTime::Pending;
            }
        }
    }
    consensus
        .read(|s| s.clock.now(term, led_ms()))
        .map_or(ClusterTime::Pending, ClusterTime::Now)
}

/// How long a new leader waits to hear a member's feature level before
/// taking it for down, in a cluster that has never ticked
/// ([`read_clock`]): many heartbeats and election timeouts.
const UNHEARD_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// How often the leader looks for due backup slots and expired backups.
const SCHEDULE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

const COMPACT_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Proposes a `Compact` if the state holds more finished history than
/// `retention` allows; returns the log index it was committed at.
pub async fn compact(consensus: &Consensus, retention: &RetentionConfig) -> Option<u64> {
    let now = now_unix_ms();
    if !consensus.read(|s| s.needs_compaction(retention, now)) {
        return None;
    }
    let cmd = Command::Compact {
        retention: retention.clone(),
        at_unix_ms: now,
    };
    match consensus.propose(Proposal::Command(cmd)).await {
        Ok(r) => Some(r.log_index),
        Err(e) => {
            tracing::warn!("could not commit a compaction: {e}");
            None
        }
    }
}

/// Runs for the node's lifetime: after every apply (and once a second, for a
/// leader that just took over), advances operations if this node leads; at
/// most once a second the leader starts due backup slots and retention, and
/// once a minute it compacts finished history (sooner when the audit in the
/// state has outgrown retention: [`crate::state::State::audit_backlog`]). Every node exports the
/// state's gauges ([`gauges`]) at most once a second.
pub async fn run(consensus: Consensus, retention: RetentionConfig) {
    let mut applied = consensus.applied();
    let mut last_compaction = std::time::Instant::now();
    let mut last_schedules: Option<std::time::Instant> = None;
    let mut last_gauges: Option<std::time::Instant> = None;
    let mut exported = gauges::Exported::default();
    let node = consensus.node_id().to_string();
    // This node's leadership: its term, when it began by the monotonic
    // clock (the cluster clock's origin) and what it took over. Kept
    // across a lease lapse within the term: the term's leader is the same.
    let mut leading: Option<Led> = None;
    let mut leadership = consensus.leadership();
    loop {
        // A leader acts after every apply; a follower only needs to know
        // when it starts leading (and its gauges once a second), so it is
        // not woken by every apply (on every follower, each write's).
        let leads = *leadership.borrow_and_update();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
            // A closed channel (Raft stopped) waits out the second rather
            // than spinning.
            let open = if leads {
                applied.changed().await.is_ok()
            } else {
                leadership.changed().await.is_ok()
            };
            if !open {
                std::future::pending::<()>().await;
            }
        })
        .await;
        // Every node, from its own applied state, at most once a second.
        if last_gauges.is_none_or(|t| t.elapsed() >= SCHEDULE_EVERY) {
            last_gauges = Some(std::time::Instant::now());
            consensus.read(|s| gauges::export(s, &node, now_unix_ms(), &mut exported));
        }
        let Some(term) = consensus.leader_term() else {
            continue;
        };
        if leading.as_ref().is_none_or(|l| l.term != term) {
            // Every earlier leader's entries applied first: what it took
            // over is the whole state, not a lagging copy of it.
            if let Err(e) = consensus.catch_up().await {
                tracing::debug!("new leader not caught up yet: {e}");
                continue;
            }
            let origin = std::time::Instant::now();
            let lead = consensus.read(|s| dr_watch::Leadership::taking_over(s, term, now_unix_ms()));
            leading = Some(Led {
                term,
                origin,
                lead,
                told_refused: false,
                quiet: Quiet::default(),
            });
        }
        if let Some(Led {
            term,
            origin,
            lead,
            told_refused,
            quiet,
        }) = &mut leading
        {
            advance(&consensus, lead.since_unix_ms, quiet).await;
            // Slots are minutes apart and retention scans every backup, so
            // at most once a second, however busy the log is.
            if last_schedules.is_none_or(|t| t.elapsed() >= SCHEDULE_EVERY) {
                last_schedules = Some(std::time::Instant::now());
                lead.clock = read_clock(&consensus, *term, *origin, told_refused).await;
                run_schedules(&consensus, lead).await;
            }
            if last_compaction.elapsed() >= COMPACT_EVERY || consensus.read(|s| s.audit_backlog(&retention)) {
                last_compaction = std::time::Instant::now();
                compact(&consensus, &retention).await;
            }
        }
    }
}
