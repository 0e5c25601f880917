//! The replicated state machine: what every coordinator node agrees on.
//!
//! This module knows nothing about Raft. Commands are applied in log order by
//! whichever consensus layer drives it; `apply` is deterministic (no clocks,
//! no randomness: times and ids travel inside the commands).

use std::collections::BTreeMap;
use std::sync::Arc;

use cutover_shared::app::{AppClusterStatus, AppSpec};

pub use crate::cluster_clock::ClusterClock;
use cutover_shared::backup::{BackupAction, BackupEntry, BackupSchedule, MAX_VALIDATIONS, Validation};
use cutover_shared::config::RetentionConfig;
use cutover_shared::domain::{
    AgentRecord, AgentState, Attestation, AuditEvent, ClusterRef, ControlAction, Operation, OperationKind,
    TaskProgress, TaskRecord, TaskResult, TaskState,
};
use cutover_shared::dr::{
    DatabaseStatus, DrEpoch, DrillReport, DrillSchedule, MAX_DRILLS, MAX_REPORTED_REGIONS, RegionHealth,
    RegionHealthView,
};
use cutover_shared::release::{Bundle, Release};
use cutover_shared::task::{self, spec_digest};
use serde::{Deserialize, Serialize};

/// Progress events kept per task; older ones are dropped.
const MAX_PROGRESS_PER_TASK: usize = 100;

/// An audit entry before the state machine numbers it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditDraft {
    pub at_unix_ms: i64,
    pub actor: String,
    pub action: String,
    pub parameters: String,
    pub outcome: String,
}

/// A state transition, as committed to the Raft log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// An agent registered with the leader (only transitions are logged).
    /// `session` identifies the registration.
    AgentUp {
        cluster: ClusterRef,
        agent_version: String,
        task_kinds: Vec<String>,
        at_unix_ms: i64,
        #[serde(default)]
        session: u64,
        /// The apps whose traffic the agent's driver moves.
        #[serde(default)]
        traffic_apps: Vec<String>,
    },
    /// The leader stopped hearing from the agent's registration `session`.
    /// Applied only if that is still the agent's current registration: a
    /// reaper's decision about an old stream, committed after the agent
    /// registered again, must not mark the connected agent down.
    AgentDown {
        cluster: ClusterRef,
        at_unix_ms: i64,
        #[serde(default)]
        session: u64,
    },
    /// A new operation with its tasks. With `fix_inputs` (every command
    /// this version writes), applying it records the app definition and
    /// release migrations in force into the operation, so its plan never
    /// reads later ones. Entries from older logs lack the flag and apply
    /// exactly as they did then: replaying a log must rebuild the same
    /// state whatever version replays it.
    CreateOperation {
        operation: Operation,
        audit: AuditDraft,
        #[serde(default)]
        fix_inputs: bool,
    },
    /// A leader sent a task to its agent.
    TaskDispatched { task_id: String },
    /// An agent reported progress. `from` is the reporting agent's cluster.
    TaskProgress { from: ClusterRef, progress: TaskProgress },
    /// An agent reported a final result.
    TaskFinished {
        from: ClusterRef,
        result: TaskResult,
        at_unix_ms: i64,
    },
    /// CI posted facts about a release image.
    Attest {
        attestations: Vec<Attestation>,
        audit: AuditDraft,
    },
    /// An audited action that changes nothing else here (membership changes).
    Audit(AuditDraft),
    /// Declare or replace an app.
    PutApp { spec: AppSpec, audit: AuditDraft },
    /// Record a release and its migrations (validated by the caller).
    CreateRelease {
        release: Release,
        bundle: Bundle,
        audit: AuditDraft,
    },
    /// The next step of an app operation. `index` is the position the task
    /// takes, so a step proposed twice is applied once.
    AddTask {
        operation_id: String,
        index: usize,
        task: TaskRecord,
    },
    /// Several steps that start together (one wave's switches, an atomic
    /// cutover's switches): one committed decision. `index` is the position
    /// the first takes.
    AddTasks {
        operation_id: String,
        index: usize,
        tasks: Vec<TaskRecord>,
    },
    /// An operator paused, resumed, promoted or aborted an operation.
    ControlOperation {
        operation_id: String,
        action: ControlAction,
        audit: AuditDraft,
    },
    /// An app operation ended (the orchestrator decided).
    FinishOperation {
        operation_id: String,
        state: TaskState,
        summary: String,
        at_unix_ms: i64,
    },
    /// An agent saw an app's state change in its cluster (e.g. a crash).
    AppStatusReported {
        from: ClusterRef,
        app: String,
        status: AppClusterStatus,
    },
    /// Set (create or replace) an app's backup schedule. A replaced
    /// schedule keeps its last slot, so changing it never re-runs a slot.
    PutBackupSchedule {
        schedule: BackupSchedule,
        audit: AuditDraft,
    },
    /// Remove an app's backup schedule.
    DeleteBackupSchedule { app: String, audit: AuditDraft },
    /// The leader starts the backup of a schedule's slot. Applied only if
    /// the slot is newer than the schedule's last one, so each slot runs
    /// once however many leaders propose it.
    StartScheduledBackup {
        operation: Operation,
        slot_unix_ms: i64,
        audit: AuditDraft,
    },
    /// Drop finished history beyond the retention policy (the leader
    /// proposes it; the policy travels in the command so every node prunes
    /// the same).
    Compact {
        retention: RetentionConfig,
        at_unix_ms: i64,
    },
    /// An agent's periodic observation of its databases (role, WAL
    /// position, lag). Replaces everything that cluster reported before.
    DatabaseStatusReported {
        from: ClusterRef,
        databases: Vec<DatabaseStatus>,
    },
    /// Set (create or replace) an app's drill schedule; a replaced one
    /// keeps its last slot.
    PutDrillSchedule { schedule: DrillSchedule, audit: AuditDraft },
    /// Remove an app's drill schedule (its reports stay).
    DeleteDrillSchedule { app: String, audit: AuditDraft },
    /// The leader starts the drill of a schedule's slot; applied only if
    /// the slot is newer than the schedule's last one.
    StartScheduledDrill {
        operation: Operation,
        slot_unix_ms: i64,
        audit: AuditDraft,
    },
    /// A traffic agent's probes of an app's regions (only changes are
    /// sent). A region's `since` moves only when its state changes.
    RegionHealthReported {
        from: ClusterRef,
        app: String,
        regions: Vec<RegionHealth>,
        at_unix_ms: i64,
    },
    /// The leader of `term` has led for `led_ms` by its monotonic clock:
    /// advances the cluster clock ([`ClusterClock`]). Applied only from an
    /// entry of that term (a leader deposed between reading its term and
    /// proposing cannot place its reading on another term's count).
    Tick {
        term: u64,
        led_ms: u64,
        /// The failover epochs (app → epoch) its leader had applied before
        /// reading `led_ms`: the ones this tick may pin.
        #[serde(default)]
        pins: BTreeMap<String, u64>,
    },
}

impl Command {
    /// Dates, with `now_unix_ms` (the leader's clock as the write reaches
    /// it), the times the node holding an agent's session stamps on the
    /// agent's registration and reports as they arrive. They are compared
    /// with leader-stamped times (an agent's down, a failover's wait), and
    /// an entry's times are read on the clock of its term's leader
    /// (`since_term`); any node may hold the session and forward the write,
    /// so the leader re-dates it. Other commands keep their times.
    pub fn stamp_arrival(&mut self, now_unix_ms: i64) {
        match self {
            Command::AgentUp { at_unix_ms, .. }
            | Command::AgentDown { at_unix_ms, .. }
            | Command::TaskFinished { at_unix_ms, .. }
            | Command::RegionHealthReported { at_unix_ms, .. } => *at_unix_ms = now_unix_ms,
            Command::DatabaseStatusReported { databases, .. } => {
                for d in databases {
                    d.observed_at_unix_ms = now_unix_ms;
                }
            }
            _ => {}
        }
    }
}

/// Which kind of schedule a command acts on: backups and drills share the
/// slot rule.
#[derive(Clone, Copy)]
enum Schedule {
    Backup,
    Drill,
}

impl Schedule {
    fn as_str(self) -> &'static str {
        match self {
            Schedule::Backup => "backup",
            Schedule::Drill => "drill",
        }
    }
}

/// Databases one report may carry: an agent has one per app, and a report
/// beyond this is refused rather than stored.
pub const MAX_REPORTED_DATABASES: usize = 256;

/// What applying a command produced.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResponse {
    /// Empty on success, otherwise why the command changed nothing.
    pub error: Option<String>,
    /// Log index the command was committed at (set by the consensus layer).
    #[serde(default)]
    pub log_index: u64,
}

impl CommandResponse {
    fn err(msg: impl Into<String>) -> Self {
        Self {
            error: Some(msg.into()),
            log_index: 0,
        }
    }
}

/// The ids of the operations that may still be running: every unfinished
/// operation is in it; a finished one leaves it when it finishes or is
/// compacted away. Derived from `State::operations`, so neither replicated
/// nor snapshotted, and equal whatever it holds (two states are equal by
/// their data). A state decoded from a snapshot has it unbuilt: readers
/// then scan every operation, and the first command applied builds it.
///
/// Without it, the orchestrator's scan after every apply and the hub's per
/// new step were linear in all operations kept (`bench fleet`: 858 µs at
/// 1,000 finished operations, 1,820 µs at 10,000), not in running ones.
#[derive(Clone, Debug, Default)]
pub struct RunningIndex {
    built: bool,
    ids: std::collections::BTreeSet<String>,
}

impl PartialEq for RunningIndex {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// A map of the state that grows with use, persistent (structurally
/// shared): cloning it is O(1) and a write after a clone copies one path
/// of the tree (a leaf's up to 16 entries with it), not the map, so a
/// snapshot's copy of the state never
/// stalls applies for longer than it takes to bump reference counts. Same
/// order and serialized form as `BTreeMap`: logs and snapshots written
/// before read back unchanged.
pub type Map<K, V> = imbl::OrdMap<K, V>;
/// A list of the state that grows with use, persistent like [`Map`];
/// serialized as a `Vec`.
pub type List<T> = imbl::Vector<T>;

/// Audit events the state may hold beyond what retention keeps before the
/// leader compacts ahead of its schedule ([`State::audit_backlog`]): a
/// few seconds of a busy cluster's writes.
pub const AUDIT_SLACK: usize = 10_000;

/// The replicated state. The maps that grow with the fleet and its history
/// (agents, operations and their tasks, attestations, the audit) are
/// persistent ([`Map`], [`List`]); the rest are small and plain.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Keyed by `region/cluster`.
    pub agents: Map<String, AgentRecord>,
    pub operations: Map<String, Arc<Operation>>,
    /// Task id → operation id.
    pub task_index: Map<String, String>,
    /// Image → check → attestation.
    pub attestations: Map<String, BTreeMap<String, Attestation>>,
    pub audit: List<AuditEvent>,
    /// Bumped whenever tasks are created, so dispatchers know when to look.
    pub task_generation: u64,
    /// Declared apps by name.
    #[serde(default)]
    pub apps: BTreeMap<String, AppSpec>,
    /// App → `region/cluster` → what the agent last reported.
    #[serde(default)]
    pub app_status: BTreeMap<String, BTreeMap<String, AppClusterStatus>>,
    /// App → image → release. Releases are immutable once created.
    #[serde(default)]
    pub releases: BTreeMap<String, BTreeMap<String, Release>>,
    /// Migration bundles by content address ([`Bundle::digest`]): releases
    /// that carry the same migrations share one copy.
    #[serde(default)]
    pub bundles: BTreeMap<String, Bundle>,
    /// App definitions that operations were created with, by
    /// [`spec_digest`]: a re-applied app changes `apps`, never these, so an
    /// operation keeps acting with the definition it started with.
    #[serde(default)]
    pub specs: BTreeMap<String, AppSpec>,
    /// Audit events the last `Compact` removed, for the node to append to
    /// its audit file. Not replicated, not snapshotted.
    #[serde(skip)]
    pub pruned_audit: Vec<AuditEvent>,
    /// Which operations may still be running, so the orchestrator and the
    /// agent hub look at those instead of every operation kept.
    #[serde(skip)]
    pub running: RunningIndex,
    /// The Raft term of the entry being applied ([`Self::apply_in`]; 0
    /// through [`Self::apply`] alone): times a command stamps are recorded
    /// with the term whose leader stamped them.
    #[serde(skip)]
    pub applying_term: u64,
    /// The last audit sequence number given out.
    #[serde(default)]
    pub audit_sequence: u64,
    /// The backup catalog, by backup id. An entry is added when its
    /// upload's task finishes successfully, never before.
    #[serde(default)]
    pub backups: BTreeMap<String, BackupEntry>,
    /// Backup schedules, by app.
    #[serde(default)]
    pub backup_schedules: BTreeMap<String, BackupSchedule>,
    /// App → `region/cluster` → its database as that cluster's agent last
    /// observed it.
    #[serde(default)]
    pub db_status: BTreeMap<String, BTreeMap<String, DatabaseStatus>>,
    /// App → its primary epoch (absent: it never failed over).
    #[serde(default)]
    pub dr_epochs: BTreeMap<String, DrEpoch>,
    /// App → its drill reports, oldest first (at most [`MAX_DRILLS`]).
    /// A report is added when its drill task ends, passed or not.
    #[serde(default)]
    pub drills: BTreeMap<String, Vec<DrillReport>>,
    /// Drill schedules, by app.
    #[serde(default)]
    pub drill_schedules: BTreeMap<String, DrillSchedule>,
    /// App → region → that region as a traffic agent's probes see it from
    /// outside (front door only).
    #[serde(default)]
    pub region_health: BTreeMap<String, BTreeMap<String, RegionHealthView>>,
    /// Real time as the leaders measured it (failover cooldowns).
    #[serde(default)]
    pub clock: ClusterClock,
    /// The highest feature level of a command the log has held
    /// (`raft::level::needed`; 0 reads as 1): a node added must apply it.
    #[serde(default)]
    pub level_in_use: u32,
}

impl State {
    fn audit(&mut self, d: AuditDraft) {
        // Numbers keep counting after compaction empties the list.
        let sequence = self
            .audit
            .last()
            .map_or(1, |e| e.sequence + 1)
            .max(self.audit_sequence + 1);
        self.audit_sequence = sequence;
        self.audit.push_back(AuditEvent {
            sequence,
            at_unix_ms: d.at_unix_ms,
            actor: d.actor,
            action: d.action,
            parameters: d.parameters,
            outcome: d.outcome,
        });
    }

    /// Applies one command of a log entry of Raft term `term`: a `Tick`
    /// that claims another term is ignored (see [`Command::Tick`]).
    pub fn apply_in(&mut self, term: u64, cmd: Command) -> CommandResponse {
        // Whatever it does, the entry is in the log a new member receives.
        self.level_in_use = self.level_in_use.max(crate::raft::level::needed(&cmd));
        if let Command::Tick { term: claimed, .. } = &cmd
            && *claimed != term
        {
            return CommandResponse::default();
        }
        self.applying_term = term;
        self.apply(cmd)
    }

    /// Applies one command.
    pub fn apply(&mut self, cmd: Command) -> CommandResponse {
        if !self.running.built {
            self.reindex();
        }
        match cmd {
            Command::AgentUp {
                cluster,
                agent_version,
                task_kinds,
                at_unix_ms,
                session,
                traffic_apps,
            } => {
                self.agents.insert(
                    cluster.to_string(),
                    AgentRecord {
                        cluster,
                        state: AgentState::Up,
                        since_unix_ms: at_unix_ms,
                        agent_version,
                        task_kinds,
                        traffic_apps,
                        session,
                        since_term: self.applying_term,
                    },
                );
            }
            Command::AgentDown {
                cluster,
                at_unix_ms,
                session,
            } => {
                if let Some(a) = self.agents.get_mut(&cluster.to_string())
                    && a.state == AgentState::Up
                    && (session == 0 || a.session == session)
                {
                    a.state = AgentState::Down;
                    a.since_unix_ms = at_unix_ms;
                    a.since_term = self.applying_term;
                }
            }
            Command::CreateOperation {
                operation,
                audit,
                fix_inputs,
            } => return self.create_operation(operation, audit, fix_inputs),
            Command::PutBackupSchedule { mut schedule, audit } => {
                if !self.apps.contains_key(&schedule.app) {
                    return CommandResponse::err(format!("unknown app {:?}", schedule.app));
                }
                if let Some(last) = self.last_slot(Schedule::Backup, &schedule.app) {
                    schedule.last_slot_unix_ms = schedule.last_slot_unix_ms.max(*last);
                }
                self.backup_schedules.insert(schedule.app.clone(), schedule);
                self.audit(audit);
            }
            Command::DeleteBackupSchedule { app, audit } => return self.delete_schedule(Schedule::Backup, &app, audit),
            Command::StartScheduledBackup {
                operation,
                slot_unix_ms,
                audit,
            } => return self.start_slot(Schedule::Backup, operation, slot_unix_ms, audit),
            Command::PutDrillSchedule { mut schedule, audit } => {
                if !self.apps.contains_key(&schedule.app) {
                    return CommandResponse::err(format!("unknown app {:?}", schedule.app));
                }
                if let Some(last) = self.last_slot(Schedule::Drill, &schedule.app) {
                    schedule.last_slot_unix_ms = schedule.last_slot_unix_ms.max(*last);
                }
                self.drill_schedules.insert(schedule.app.clone(), schedule);
                self.audit(audit);
            }
            Command::DeleteDrillSchedule { app, audit } => return self.delete_schedule(Schedule::Drill, &app, audit),
            Command::StartScheduledDrill {
                operation,
                slot_unix_ms,
                audit,
            } => return self.start_slot(Schedule::Drill, operation, slot_unix_ms, audit),
            Command::TaskDispatched { task_id } => {
                if let Some((op, i)) = self.task_mut(&task_id) {
                    op.tasks[i].dispatch_count += 1;
                }
            }
            Command::TaskProgress { from, progress } => {
                let at = progress.at_unix_ms;
                let Some((op, i)) = self.task_mut(&progress.task_id) else {
                    return CommandResponse::err(format!("unknown task {}", progress.task_id));
                };
                let task = &mut op.tasks[i];
                if task.spec.target != from {
                    return CommandResponse::err(format!(
                        "task {} belongs to {}, not {from}",
                        task.spec.task_id, task.spec.target
                    ));
                }
                if task.state.is_finished() {
                    return CommandResponse::default();
                }
                task.state = TaskState::Running;
                task.progress.push(progress);
                if task.progress.len() > MAX_PROGRESS_PER_TASK {
                    task.progress.remove(0);
                }
                refresh_operation(op, at);
            }
            Command::TaskFinished {
                from,
                result,
                at_unix_ms,
            } => {
                let Some((op, i)) = self.task_mut(&result.task_id) else {
                    return CommandResponse::err(format!("unknown task {}", result.task_id));
                };
                let task = &mut op.tasks[i];
                if task.spec.target != from {
                    return CommandResponse::err(format!(
                        "task {} belongs to {}, not {from}",
                        task.spec.task_id, task.spec.target
                    ));
                }
                if task.state.is_finished() {
                    // A duplicate report (e.g. after a leader change): the first wins.
                    return CommandResponse::default();
                }
                task.state = if result.success {
                    TaskState::Succeeded
                } else {
                    TaskState::Failed
                };
                let reported = task::app_of(&task.spec.params)
                    .map(str::to_owned)
                    .zip(cutover_shared::task::outputs::AppOutputs::from_wire(&result.outputs).status);
                task.result = Some(result);
                let cataloged = catalog_change(op, i, at_unix_ms);
                let drilled = drill_report(op, i);
                refresh_operation(op, at_unix_ms);
                if op.state.is_finished() {
                    let id = op.id.clone();
                    self.running.ids.remove(&id);
                }
                if let Some(d) = drilled {
                    let kept = self.drills.entry(d.app.clone()).or_default();
                    kept.push(d);
                    if kept.len() > MAX_DRILLS {
                        kept.remove(0);
                    }
                }
                if let Some((app, status)) = reported {
                    self.app_status.entry(app).or_default().insert(from.to_string(), status);
                }
                match cataloged {
                    Some(CatalogChange::Add(entry)) => {
                        self.backups.entry(entry.id.clone()).or_insert(*entry);
                    }
                    Some(CatalogChange::Validated { backup_id, validation }) => {
                        if let Some(b) = self.backups.get_mut(&backup_id) {
                            b.validations.push(validation);
                            if b.validations.len() > MAX_VALIDATIONS {
                                b.validations.remove(0);
                            }
                        }
                    }
                    Some(CatalogChange::Deleted { deleted, kept, actor }) => {
                        for id in deleted {
                            if let Some(b) = self.backups.remove(&id) {
                                self.audit(AuditDraft {
                                    at_unix_ms,
                                    actor: actor.clone(),
                                    action: "DeleteBackup".into(),
                                    parameters: serde_json::json!({
                                        "id": b.id, "app": b.app, "cluster": b.cluster.to_string(),
                                        "object_key": b.object.key, "version_id": b.object.version_id,
                                    })
                                    .to_string(),
                                    outcome: "deleted".into(),
                                });
                            }
                        }
                        for (id, why) in kept {
                            self.audit(AuditDraft {
                                at_unix_ms,
                                actor: actor.clone(),
                                action: "DeleteBackup".into(),
                                parameters: serde_json::json!({ "id": id }).to_string(),
                                outcome: format!("kept: {why}"),
                            });
                        }
                    }
                    None => {}
                }
            }
            Command::Attest { attestations, audit } => {
                for a in attestations {
                    self.attestations
                        .entry(a.image.clone())
                        .or_default()
                        .insert(a.check.clone(), a);
                }
                self.audit(audit);
            }
            Command::Audit(d) => self.audit(d),
            Command::PutApp { spec, audit } => {
                self.apps.insert(spec.name.clone(), spec);
                self.audit(audit);
            }
            Command::CreateRelease { release, bundle, audit } => {
                if !self.apps.contains_key(&release.app) {
                    return CommandResponse::err(format!("unknown app {:?}", release.app));
                }
                if let Some(existing) = self.release(&release.app, &release.image) {
                    if existing.digest == release.digest {
                        // The same upload again: nothing changes.
                        return CommandResponse::default();
                    }
                    return CommandResponse::err(format!(
                        "release {} of {} already exists with other migrations (digest {}); releases are immutable",
                        release.image, release.app, existing.digest
                    ));
                }
                self.bundles.entry(release.digest.clone()).or_insert(bundle);
                self.releases
                    .entry(release.app.clone())
                    .or_default()
                    .insert(release.image.clone(), release);
                self.audit(audit);
            }
            Command::AddTask {
                operation_id,
                index,
                task,
            } => return self.add_tasks(operation_id, index, vec![task]),
            Command::AddTasks {
                operation_id,
                index,
                tasks,
            } => return self.add_tasks(operation_id, index, tasks),
            Command::ControlOperation {
                operation_id,
                action,
                audit,
            } => {
                let outcome = self.control_operation(&operation_id, &action, &audit.actor);
                let mut audit = audit;
                audit.outcome = match &outcome {
                    Ok(()) => "ok".to_owned(),
                    Err(e) => format!("refused: {e}"),
                };
                self.audit(audit);
                if let Err(e) = outcome {
                    return CommandResponse::err(e);
                }
            }
            Command::FinishOperation {
                operation_id,
                state,
                summary,
                at_unix_ms,
            } => {
                // Checked before `make_mut`: a finish of a finished
                // operation changes nothing, so it copies nothing.
                if let Some(op) = self
                    .operations
                    .get_mut(&operation_id)
                    .filter(|op| !op.state.is_finished())
                    .map(Arc::make_mut)
                {
                    if state.is_finished() {
                        self.running.ids.remove(&operation_id);
                    }
                    op.state = state;
                    op.summary = summary;
                    op.updated_at_unix_ms = at_unix_ms;
                    // A failover that succeeded names the epoch's primary.
                    if state == TaskState::Succeeded
                        && let (Some(app), Some(f)) = (&op.app, &op.spec.failover)
                        && !f.keeps_epoch()
                        && let Some(e) = self.dr_epochs.get_mut(app)
                        && e.epoch == f.epoch
                    {
                        e.primary = Some(f.to.clone());
                    }
                }
            }
            Command::Compact { retention, at_unix_ms } => self.compact(&retention, at_unix_ms),
            Command::DatabaseStatusReported { from, databases } => {
                if databases.len() > MAX_REPORTED_DATABASES {
                    return CommandResponse::err(format!(
                        "{from} reported {} databases, more than {MAX_REPORTED_DATABASES}",
                        databases.len()
                    ));
                }
                let key = from.to_string();
                let mut before = BTreeMap::new();
                for (app, by_cluster) in self.db_status.iter_mut() {
                    if let Some(d) = by_cluster.remove(&key) {
                        before.insert(app.clone(), d);
                    }
                }
                for mut d in databases {
                    // Unreachable since the first of an unbroken run of
                    // reports that could not ask the server.
                    let run = before
                        .get(&d.app)
                        .and_then(|b| b.unreachable_since_unix_ms.map(|at| (at, b.unreachable_since_term)));
                    let (since, term) = match (d.error.is_some(), run) {
                        (false, _) => (None, 0),
                        (true, Some((at, term))) => (Some(at), term),
                        (true, None) => (Some(d.observed_at_unix_ms), self.applying_term),
                    };
                    d.unreachable_since_unix_ms = since;
                    d.unreachable_since_term = term;
                    self.db_status.entry(d.app.clone()).or_default().insert(key.clone(), d);
                }
                self.db_status.retain(|_, by_cluster| !by_cluster.is_empty());
            }
            Command::AppStatusReported { from, app, status } => {
                let runs_there = self.apps.get(&app).is_some_and(|a| a.cluster(&from).is_some());
                if !runs_there {
                    return CommandResponse::err(format!("app {app} does not run in {from}"));
                }
                self.app_status.entry(app).or_default().insert(from.to_string(), status);
            }
            Command::RegionHealthReported {
                from,
                app,
                regions,
                at_unix_ms,
            } => {
                let by = from.to_string();
                // Bounded by the agent's registered traffic apps; the app
                // itself may be applied later (the report is sent once).
                let moves_it = self.agents.get(&by).is_some_and(|a| a.traffic_apps.contains(&app));
                if !moves_it {
                    return CommandResponse::err(format!("{from} does not move app {app}'s traffic"));
                }
                if regions.len() > MAX_REPORTED_REGIONS {
                    return CommandResponse::err(format!(
                        "{from} reported {} regions of {app}, more than {MAX_REPORTED_REGIONS}",
                        regions.len()
                    ));
                }
                let known = self.region_health.entry(app).or_default();
                for r in regions {
                    let since_unix_ms = match known.get(&r.region) {
                        Some(v) if v.healthy == r.healthy && v.by == by => v.since_unix_ms,
                        _ => at_unix_ms,
                    };
                    known.insert(
                        r.region,
                        RegionHealthView {
                            healthy: r.healthy,
                            detail: r.detail,
                            by: by.clone(),
                            since_unix_ms,
                        },
                    );
                }
            }
            Command::Tick { term, led_ms, pins } => self.clock.tick(term, led_ms, &pins, &self.dr_epochs),
        }
        CommandResponse::default()
    }

    /// The newest slot started by `app`'s schedule of `kind`, if it has one.
    fn last_slot(&mut self, kind: Schedule, app: &str) -> Option<&mut i64> {
        match kind {
            Schedule::Backup => self.backup_schedules.get_mut(app).map(|s| &mut s.last_slot_unix_ms),
            Schedule::Drill => self.drill_schedules.get_mut(app).map(|s| &mut s.last_slot_unix_ms),
        }
    }

    fn delete_schedule(&mut self, kind: Schedule, app: &str, audit: AuditDraft) -> CommandResponse {
        let removed = match kind {
            Schedule::Backup => self.backup_schedules.remove(app).is_some(),
            Schedule::Drill => self.drill_schedules.remove(app).is_some(),
        };
        if !removed {
            return CommandResponse::err(format!("app {app:?} has no {} schedule", kind.as_str()));
        }
        self.audit(audit);
        CommandResponse::default()
    }

    /// Starts the operation of a schedule's slot, only if the slot is newer
    /// than the schedule's last one: each slot runs once however many
    /// leaders propose it.
    fn start_slot(&mut self, kind: Schedule, operation: Operation, slot: i64, audit: AuditDraft) -> CommandResponse {
        let app = operation.app.clone().unwrap_or_default();
        let Some(last) = self.last_slot(kind, &app).map(|l| *l) else {
            return CommandResponse::err(format!("app {app:?} has no {} schedule", kind.as_str()));
        };
        if slot <= last {
            return CommandResponse::err(format!("{} slot {slot} of {app} already started", kind.as_str()));
        }
        let created = self.create_operation(operation, audit, true);
        if created.error.is_none()
            && let Some(l) = self.last_slot(kind, &app)
        {
            *l = slot;
        }
        created
    }

    fn create_operation(&mut self, mut operation: Operation, audit: AuditDraft, fix_inputs: bool) -> CommandResponse {
        if self.operations.contains_key(&operation.id) {
            return CommandResponse::err(format!("operation {} already exists", operation.id));
        }
        if let Some(app) = &operation.app {
            if !self.apps.contains_key(app) {
                return CommandResponse::err(format!("unknown app {app:?}"));
            }
            for t in &operation.targets {
                if let Some(running) = self.running_operation(app, t) {
                    return CommandResponse::err(format!("operation {running} is already running on {app} in {t}"));
                }
            }
        }
        if let (Some(app), Some(f)) = (&operation.app, &operation.spec.failover) {
            // The fence: the new epoch is committed with the decision,
            // before any step acts. Two failovers decided on the same
            // epoch: the second is refused.
            let current = self.dr_epochs.get(app).map_or(0, |e| e.epoch);
            if f.keeps_epoch() {
                // Fencing or rejoining a superseded primary acts for the
                // current epoch.
                if f.epoch != current || current == 0 {
                    return CommandResponse::err(format!(
                        "{app} is at primary epoch {current}; a fence for epoch {} is stale",
                        f.epoch
                    ));
                }
            } else if f.epoch != current + 1 {
                return CommandResponse::err(format!(
                    "{app} is at primary epoch {current}; a failover to epoch {} was decided on a stale view",
                    f.epoch
                ));
            }
            let primary = self.dr_epochs.get(app).and_then(|e| e.primary.clone());
            if !f.keeps_epoch() {
                self.dr_epochs.insert(
                    app.clone(),
                    DrEpoch {
                        epoch: f.epoch,
                        primary,
                        operation_id: operation.id.clone(),
                        at_unix_ms: operation.created_at_unix_ms,
                    },
                );
            }
        }
        if let Some(app) = operation.app.clone()
            && fix_inputs
        {
            // Fix the operation's inputs now: the app definition and
            // the release migrations in force at this log index. Its
            // plan reads these, never what is applied later.
            let spec = self.apps[&app].clone();
            let digest = spec_digest(&spec);
            self.specs.entry(digest.clone()).or_insert(spec);
            operation.spec_digest = Some(digest);
            operation.bundle_digest = operation
                .release_image()
                .and_then(|image| self.release(&app, image))
                .map(|r| r.digest.clone());
        }
        for t in &operation.tasks {
            self.task_index.insert(t.spec.task_id.clone(), operation.id.clone());
        }
        if !operation.state.is_finished() {
            self.running.ids.insert(operation.id.clone());
        }
        self.operations.insert(operation.id.clone(), Arc::new(operation));
        self.task_generation += 1;
        self.audit(audit);
        CommandResponse::default()
    }

    /// The operation holding `task_id` and the task's index in it.
    fn task_mut(&mut self, task_id: &str) -> Option<(&mut Operation, usize)> {
        let op = Arc::make_mut(self.operations.get_mut(self.task_index.get(task_id)?)?);
        let idx = op.tasks.iter().position(|t| t.spec.task_id == task_id)?;
        Some((op, idx))
    }

    fn add_tasks(&mut self, operation_id: String, index: usize, tasks: Vec<TaskRecord>) -> CommandResponse {
        let Some(op) = self.operations.get_mut(&operation_id).map(Arc::make_mut) else {
            return CommandResponse::err(format!("no operation {operation_id}"));
        };
        if op.state.is_finished() || op.tasks.len() != index {
            // Already added (or the operation ended): nothing to do.
            return CommandResponse::default();
        }
        for task in tasks {
            op.updated_at_unix_ms = task.created_at_unix_ms;
            self.task_index.insert(task.spec.task_id.clone(), operation_id.clone());
            op.tasks.push(task);
        }
        op.state = TaskState::Running;
        self.task_generation += 1;
        CommandResponse::default()
    }

    /// Applies an operator's control of a running operation, or says why not.
    fn control_operation(&mut self, id: &str, action: &ControlAction, actor: &str) -> Result<(), String> {
        let op = self
            .operations
            .get_mut(id)
            .map(Arc::make_mut)
            .ok_or_else(|| format!("unknown operation {id:?}"))?;
        if op.state.is_finished() {
            return Err(format!("operation {id} already finished ({:?})", op.state));
        }
        if op.kind == OperationKind::Task {
            return Err(format!(
                "operation {id} is an ad-hoc task; only app operations can be steered"
            ));
        }
        let c = &mut op.control;
        if c.aborted_by.is_some() {
            return Err(format!("operation {id} is being aborted"));
        }
        match action {
            ControlAction::Pause if c.paused => return Err(format!("operation {id} is already paused")),
            ControlAction::Pause => c.paused = true,
            ControlAction::Resume if !c.paused => return Err(format!("operation {id} is not paused")),
            ControlAction::Resume => c.paused = false,
            ControlAction::Promote { gate } => {
                if op.spec.promotion != cutover_shared::operation::Promotion::Manual {
                    return Err(format!("operation {id} was not started with manual promotion"));
                }
                if c.promoted.contains(gate) {
                    return Err(format!("gate {gate} of operation {id} is already passed"));
                }
                c.promoted.push(*gate);
                c.promoted.sort_unstable();
            }
            ControlAction::Abort => c.aborted_by = Some(actor.to_owned()),
        }
        Ok(())
    }

    /// `image`'s release of `app`, if one was created.
    pub fn release(&self, app: &str, image: &str) -> Option<&Release> {
        self.releases.get(app).and_then(|r| r.get(image))
    }

    /// The migrations `image`'s release of `app` carries, if any.
    pub fn release_bundle(&self, app: &str, image: &str) -> Option<&Bundle> {
        self.release(app, image)
            .and_then(|r| self.bundles.get(&r.digest))
            .filter(|b| !b.migrations.is_empty())
    }

    /// What app operation `op` acts with: the definition and release
    /// migrations fixed at its creation, or, for an operation from a log
    /// written before they were fixed, the current ones.
    pub fn operation_inputs(&self, op: &Operation) -> Option<(&AppSpec, Option<&Bundle>)> {
        let app = op.app.as_deref()?;
        let spec = match &op.spec_digest {
            Some(d) => self.specs.get(d)?,
            None => self.apps.get(app)?,
        };
        let bundle = match &op.bundle_digest {
            Some(d) => self.bundles.get(d),
            None if op.spec_digest.is_some() => None,
            None => op.release_image().and_then(|i| self.release_bundle(app, i)),
        };
        Some((spec, bundle.filter(|b| !b.migrations.is_empty())))
    }

    /// The finished operations `retention` would drop at `now`, oldest
    /// first. Unfinished operations stay, and so does each app's last
    /// finished traffic-moving operation (a rollback reads it).
    pub fn expired_operations(&self, retention: &RetentionConfig, now: i64) -> Vec<String> {
        let mut finished: Vec<&Operation> = self.all_operations().filter(|o| o.state.is_finished()).collect();
        // Newest first: the first `retention.operations` are kept by count.
        finished.sort_by(|a, b| (b.updated_at_unix_ms, &b.id).cmp(&(a.updated_at_unix_ms, &a.id)));
        let mut last_traffic: BTreeMap<&str, &str> = BTreeMap::new();
        let mut by_created = finished.clone();
        by_created.sort_by_key(|o| (o.created_at_unix_ms, o.id.as_str()));
        for o in by_created.iter().filter(|o| moves_traffic(o.kind)) {
            if let Some(app) = o.app.as_deref() {
                last_traffic.insert(app, o.id.as_str());
            }
        }
        let max_age = hours_ms(retention.operation_max_age_hours);
        let mut out: Vec<String> = finished
            .iter()
            .enumerate()
            .filter(|(rank, o)| *rank >= retention.operations || now.saturating_sub(o.updated_at_unix_ms) > max_age)
            .map(|(_, o)| *o)
            .filter(|o| {
                o.app
                    .as_deref()
                    .is_none_or(|a| last_traffic.get(a) != Some(&o.id.as_str()))
            })
            .map(|o| o.id.clone())
            .collect();
        out.reverse();
        out
    }

    /// Whether the audit held in the state has outgrown what `retention`
    /// keeps by [`AUDIT_SLACK`] events or by as many again, whichever is
    /// more: then compaction cannot wait for its minute. Every write
    /// appends an event, so a busy cluster (thousands of writes a second)
    /// would otherwise carry hundreds of thousands of them until the next
    /// compaction, and every snapshot in between encodes and writes them
    /// all (`bench commit`: the snapshots were the 64-client p99).
    pub fn audit_backlog(&self, retention: &RetentionConfig) -> bool {
        self.audit.len() >= retention.audit_events + retention.audit_events.max(AUDIT_SLACK)
    }

    /// How many audit events `retention` would move out of the state at `now`.
    pub fn expired_audit(&self, retention: &RetentionConfig, now: i64) -> usize {
        let over = self.audit.len().saturating_sub(retention.audit_events);
        let max_age = hours_ms(retention.audit_max_age_hours);
        let old = self
            .audit
            .iter()
            .take_while(|e| now.saturating_sub(e.at_unix_ms) > max_age)
            .count();
        over.max(old)
    }

    /// True when a `Compact` at `now` would drop anything.
    pub fn needs_compaction(&self, retention: &RetentionConfig, now: i64) -> bool {
        self.expired_audit(retention, now) > 0
            || !self.expired_operations(retention, now).is_empty()
            || !self.expired_releases(retention).is_empty()
    }

    fn compact(&mut self, retention: &RetentionConfig, now: i64) {
        for id in self.expired_operations(retention, now) {
            if let Some(op) = self.operations.remove(&id) {
                for t in &op.tasks {
                    self.task_index.remove(&t.spec.task_id);
                }
                self.running.ids.remove(&id);
            }
        }
        // App definitions no remaining operation was created with.
        let used: std::collections::BTreeSet<&String> = self
            .operations
            .values()
            .filter_map(|o| o.spec_digest.as_ref())
            .collect();
        self.specs.retain(|d, _| used.contains(d));
        self.compact_releases(retention, now);
        let n = self.expired_audit(retention, now);
        let kept = self.audit.split_off(n);
        let pruned = std::mem::replace(&mut self.audit, kept);
        self.pruned_audit.extend(pruned);
    }

    /// Releases compaction drops: beyond each app's newest
    /// `retention.releases`, those nothing uses (no kept operation acts with
    /// it, no cluster runs its image).
    fn expired_releases(&self, retention: &RetentionConfig) -> Vec<(String, String)> {
        use std::collections::BTreeSet;
        let mut in_use: BTreeSet<(&str, &str)> = self
            .operations
            .values()
            .filter_map(|o| Some((o.app.as_deref()?, o.release_image()?)))
            .collect();
        for (app, clusters) in &self.app_status {
            for c in clusters.values().flat_map(|st| &st.colors) {
                in_use.insert((app.as_str(), c.image.as_str()));
            }
        }
        let mut expired = Vec::new();
        for (app, releases) in &self.releases {
            let mut newest: Vec<(&String, i64)> = releases
                .iter()
                .map(|(image, r)| (image, r.created_at_unix_ms))
                .collect();
            newest.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(a.0)));
            expired.extend(
                newest
                    .into_iter()
                    .skip(retention.releases)
                    .filter(|(image, _)| !in_use.contains(&(app.as_str(), image.as_str())))
                    .map(|(image, _)| (app.clone(), image.clone())),
            );
        }
        expired
    }

    /// Drops the expired releases, then the bundles no kept release or
    /// operation refers to, and the attestations of images that have neither
    /// a release nor a use and are older than the operation age limit.
    fn compact_releases(&mut self, retention: &RetentionConfig, now: i64) {
        use std::collections::BTreeSet;
        for (app, image) in self.expired_releases(retention) {
            if let Some(r) = self.releases.get_mut(&app) {
                r.remove(&image);
            }
        }
        self.releases.retain(|_, r| !r.is_empty());
        let digests: BTreeSet<&String> = self
            .releases
            .values()
            .flat_map(|r| r.values().map(|r| &r.digest))
            .chain(self.operations.values().filter_map(|o| o.bundle_digest.as_ref()))
            .collect();
        self.bundles.retain(|d, _| digests.contains(d));
        let images: BTreeSet<&str> = self
            .releases
            .values()
            .flat_map(|r| r.keys().map(String::as_str))
            .chain(self.operations.values().filter_map(|o| o.release_image()))
            .chain(
                self.app_status
                    .values()
                    .flat_map(|m| m.values())
                    .flat_map(|st| st.colors.iter().map(|c| c.image.as_str())),
            )
            .collect();
        let cutoff = now.saturating_sub(hours_ms(retention.operation_max_age_hours));
        // (A persistent map has no `retain`: the expired are removed one
        // by one, each a path copy at most.)
        let expired: Vec<String> = self
            .attestations
            .iter()
            .filter(|(image, checks)| {
                !images.contains(image.as_str()) && checks.values().all(|a| a.at_unix_ms < cutoff)
            })
            .map(|(image, _)| image.clone())
            .collect();
        for image in expired {
            self.attestations.remove(&image);
        }
    }

    /// Takes the audit events compaction removed since the last call.
    pub fn take_pruned_audit(&mut self) -> Vec<AuditEvent> {
        std::mem::take(&mut self.pruned_audit)
    }

    /// Is `task_id` a task of `cluster` that has not finished? Agents' reports
    /// are checked with this before they are proposed, so a report for an
    /// unknown, foreign or finished task costs no log entry.
    pub fn task_open_for(&self, task_id: &str, cluster: &ClusterRef) -> bool {
        self.task_index
            .get(task_id)
            .and_then(|op| self.operations.get(op))
            .and_then(|op| op.tasks.iter().find(|t| t.spec.task_id == task_id))
            .is_some_and(|t| &t.spec.target == cluster && !t.state.is_finished())
    }

    /// Rebuilds [`RunningIndex`] from the operations (after decoding a
    /// snapshot; `apply` does it itself for a state that lacks it).
    pub fn reindex(&mut self) {
        self.running = RunningIndex {
            built: true,
            ids: self
                .operations
                .values()
                .filter(|o| !o.state.is_finished())
                .map(|o| o.id.clone())
                .collect(),
        };
    }

    /// The latest time a leader stamped into the state: agents' up/down,
    /// database and region reports, audit events, failover epochs. A new
    /// leader reads it at takeover to bound how far its clock may run
    /// ahead of its predecessors' (`orchestrator::dr_watch::Leadership`).
    pub fn latest_stamp_unix_ms(&self) -> i64 {
        let agents = self.agents.values().map(|a| a.since_unix_ms);
        let databases = self
            .db_status
            .values()
            .flat_map(|m| m.values())
            .map(|d| d.observed_at_unix_ms);
        let regions = self
            .region_health
            .values()
            .flat_map(|m| m.values())
            .map(|r| r.since_unix_ms);
        // (Not operations' times: an agent's progress report sets one from
        // the agent's clock.)
        let epochs = self.dr_epochs.values().map(|e| e.at_unix_ms);
        let audit = self.audit.last().map(|a| a.at_unix_ms);
        agents
            .chain(databases)
            .chain(regions)
            .chain(epochs)
            .chain(audit)
            .max()
            .unwrap_or(i64::MIN)
    }

    /// Every kept operation, in id order (the map holds each behind an
    /// `Arc`).
    pub fn all_operations(&self) -> impl Iterator<Item = &Operation> + '_ {
        self.operations.values().map(|o| &**o)
    }

    /// The unfinished operations, in id order: through the index, or by
    /// scanning them all while it is unbuilt.
    pub fn running_operations(&self) -> Box<dyn Iterator<Item = &Operation> + '_> {
        if self.running.built {
            Box::new(
                self.running
                    .ids
                    .iter()
                    .filter_map(|id| self.operations.get(id).map(|o| &**o))
                    .filter(|o| !o.state.is_finished()),
            )
        } else {
            Box::new(self.all_operations().filter(|o| !o.state.is_finished()))
        }
    }

    /// The unfinished operation acting on `app` in `cluster`, if any.
    pub fn running_operation(&self, app: &str, cluster: &ClusterRef) -> Option<&str> {
        self.running_operations()
            .find(|o| o.app.as_deref() == Some(app) && o.targets.contains(cluster))
            .map(|o| o.id.as_str())
    }

    /// The unfinished tasks of running operations by target cluster (only
    /// `only`'s, if given), oldest operation first as in
    /// [`State::unfinished_tasks_for`], without their content attached:
    /// one pass for every agent, where the hub attaches content only to
    /// what it has not sent yet.
    pub fn unfinished_tasks_by_cluster(
        &self,
        only: Option<&ClusterRef>,
    ) -> std::collections::HashMap<ClusterRef, Vec<cutover_shared::domain::TaskSpec>> {
        let mut ops: Vec<&Operation> = self.running_operations().collect();
        ops.sort_by_key(|o| o.created_at_unix_ms);
        let mut out: std::collections::HashMap<ClusterRef, Vec<cutover_shared::domain::TaskSpec>> =
            std::collections::HashMap::new();
        for t in ops.iter().flat_map(|o| o.tasks.iter()) {
            if !t.state.is_finished() && only.is_none_or(|c| c == &t.spec.target) {
                out.entry(t.spec.target.clone()).or_default().push(t.spec.clone());
            }
        }
        out
    }

    /// Unfinished tasks addressed to `cluster`, oldest operation first,
    /// with their content attached.
    pub fn unfinished_tasks_for(&self, cluster: &ClusterRef) -> Vec<cutover_shared::domain::TaskSpec> {
        let mut tasks = self
            .unfinished_tasks_by_cluster(Some(cluster))
            .remove(cluster)
            .unwrap_or_default();
        for t in &mut tasks {
            self.hydrate(&mut t.params);
        }
        tasks
    }

    /// The app definition with digest `digest`: one an operation was
    /// created with, or a declared app's current one (operations from logs
    /// written before definitions were stored by digest).
    pub fn spec_by_digest(&self, digest: &str) -> Option<&AppSpec> {
        self.specs
            .get(digest)
            .or_else(|| self.apps.values().find(|a| spec_digest(a) == digest))
    }

    /// Attaches the app definition and migrations a stored task names by
    /// digest, for sending it to its agent.
    pub fn hydrate(&self, params: &mut task::WireParams) {
        task::hydrate(
            params,
            |d| self.spec_by_digest(d).and_then(|s| serde_json::to_string(s).ok()),
            |d| self.bundles.get(d).and_then(|b| serde_json::to_string(b).ok()),
        );
    }
}

/// What a finished `db.backup` task changes in the catalog.
enum CatalogChange {
    Add(Box<BackupEntry>),
    Validated {
        backup_id: String,
        validation: Validation,
    },
    /// Objects deleted (their entries go, audited) or kept by the store.
    Deleted {
        deleted: Vec<String>,
        kept: BTreeMap<String, String>,
        actor: String,
    },
}

/// The catalog change task `i` of `op` makes by finishing with its result:
/// a successful upload adds its entry; a validation, passed or not, is
/// recorded on its backup.
/// The report a finished `dr.drill` task makes, passed or not.
fn drill_report(op: &Operation, i: usize) -> Option<DrillReport> {
    use cutover_shared::task::{TaskParams, outputs::DrillOutputs};
    let t = &op.tasks[i];
    // Every task result passes here: only a drill's is decoded.
    if t.spec.kind != cutover_shared::task::TaskKind::DrDrill.as_str() {
        return None;
    }
    let result = t.result.as_ref()?;
    let Ok(TaskParams::DrDrill { app, image, .. }) = TaskParams::from_wire(&t.spec.kind, &t.spec.params) else {
        return None;
    };
    let out = DrillOutputs::from_wire(&result.outputs);
    Some(DrillReport {
        operation_id: op.id.clone(),
        app: app.app,
        cluster: t.spec.target.clone(),
        passed: result.success,
        verdict: if out.verdict.is_empty() {
            if result.success { "passed" } else { "error" }.to_owned()
        } else {
            out.verdict
        },
        message: result.message.clone(),
        source: out.source,
        started_at_unix_ms: op.created_at_unix_ms,
        finished_at_unix_ms: result.finished_at_unix_ms,
        rto_ms: out.rto_ms.filter(|_| result.success),
        rpo_ms: out.rpo_ms,
        phase_ms: out.phase_ms,
        image,
        requested_by: op.created_by.clone(),
    })
}

fn catalog_change(op: &Operation, i: usize, at: i64) -> Option<CatalogChange> {
    use cutover_shared::task::{TaskParams, outputs::BackupOutputs};
    let t = &op.tasks[i];
    let result = t.result.as_ref()?;
    let p = match TaskParams::from_wire(&t.spec.kind, &t.spec.params) {
        Ok(TaskParams::DbBackup(p)) => p,
        // A migration's backup, uploaded too: cataloged whatever the
        // migration's outcome (the object exists either way).
        Ok(TaskParams::DbMigrate(m)) => {
            let s = cutover_shared::task::outputs::MigrateOutputs::from_wire(&result.outputs).stored?;
            return Some(CatalogChange::Add(Box::new(BackupEntry {
                id: s.id,
                app: m.app.app,
                cluster: t.spec.target.clone(),
                database: s.database,
                engine: s.engine,
                object: s.object,
                migration_version: s.migration_version,
                table_rows: s.table_rows,
                started_at_unix_ms: s.started_at_unix_ms,
                finished_at_unix_ms: result.finished_at_unix_ms,
                requested_by: op.created_by.clone(),
                operation_id: op.id.clone(),
                trigger: cutover_shared::backup::BackupTrigger::Migration,
                validations: Vec::new(),
            })));
        }
        _ => return None,
    };
    let out = BackupOutputs::from_wire(&result.outputs);
    match p.action {
        BackupAction::Create if result.success => {
            let object = out.object?;
            let started = out.started_at_unix_ms.unwrap_or(t.created_at_unix_ms);
            Some(CatalogChange::Add(Box::new(BackupEntry {
                id: p.backup_id,
                app: p.app.app,
                cluster: t.spec.target.clone(),
                database: out.database.unwrap_or_default(),
                engine: out.engine.unwrap_or_default(),
                object,
                migration_version: out.migration_version.unwrap_or(0),
                table_rows: out.table_rows.unwrap_or_default(),
                started_at_unix_ms: started,
                finished_at_unix_ms: result.finished_at_unix_ms,
                requested_by: op.created_by.clone(),
                operation_id: op.id.clone(),
                trigger: op.spec.backup.as_ref().map(|b| b.trigger.clone()).unwrap_or_default(),
                validations: Vec::new(),
            })))
        }
        BackupAction::Validate => Some(CatalogChange::Validated {
            backup_id: p.backup_id,
            validation: Validation {
                operation_id: op.id.clone(),
                at_unix_ms: at,
                passed: result.success,
                verdict: out
                    .verdict
                    .unwrap_or_else(|| if result.success { "passed" } else { "error" }.to_owned()),
                message: result.message.clone(),
                duration_ms: out.duration_ms.unwrap_or(0),
            },
        }),
        BackupAction::Delete => Some(CatalogChange::Deleted {
            deleted: out.deleted.unwrap_or_default(),
            kept: out.kept.unwrap_or_default(),
            actor: op.created_by.clone(),
        }),
        BackupAction::Restore | BackupAction::RestorePrimary | BackupAction::Create => None,
    }
}

/// `hours` in milliseconds, saturating (a huge age means "forever").
fn hours_ms(hours: u64) -> i64 {
    i64::try_from(hours).unwrap_or(i64::MAX).saturating_mul(3_600_000)
}

/// Operations that move traffic: the last finished one of an app decides
/// what a rollback does.
pub fn moves_traffic(kind: OperationKind) -> bool {
    matches!(
        kind,
        OperationKind::Deploy | OperationKind::Switch | OperationKind::Rollback
    )
}

fn refresh_operation(op: &mut Operation, at: i64) {
    op.updated_at_unix_ms = at;
    if op.kind != OperationKind::Task {
        // Multi-step operations end when the orchestrator says so.
        if op.state == TaskState::Pending {
            op.state = TaskState::Running;
        }
        return;
    }
    let all_done = op.tasks.iter().all(|t| t.state.is_finished());
    op.state = if all_done {
        if op.tasks.iter().all(|t| t.state == TaskState::Succeeded) {
            TaskState::Succeeded
        } else {
            TaskState::Failed
        }
    } else if op.tasks.iter().any(|t| t.state != TaskState::Pending) {
        TaskState::Running
    } else {
        TaskState::Pending
    };
    if all_done {
        op.summary = op
            .tasks
            .iter()
            .map(|t| {
                format!(
                    "{}: {}",
                    t.spec.target,
                    t.result.as_ref().map_or("", |r| r.message.as_str())
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
    }
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::AgentUp { cluster, .. } => write!(f, "AgentUp({cluster})"),
            Command::AgentDown { cluster, .. } => write!(f, "AgentDown({cluster})"),
            Command::Tick { term, led_ms, .. } => write!(f, "Tick(term {term}, led {led_ms} ms)"),
            Command::CreateOperation { operation, .. } => write!(f, "CreateOperation({})", operation.id),
            Command::TaskDispatched { task_id } => write!(f, "TaskDispatched({task_id})"),
            Command::TaskProgress { progress, .. } => write!(f, "TaskProgress({})", progress.task_id),
            Command::TaskFinished { result, .. } => write!(f, "TaskFinished({})", result.task_id),
            Command::Attest { attestations, .. } => write!(f, "Attest({} checks)", attestations.len()),
            Command::Audit(d) => write!(f, "Audit({})", d.action),
            Command::PutApp { spec, .. } => write!(f, "PutApp({})", spec.name),
            Command::CreateRelease { release, .. } => write!(f, "CreateRelease({} {})", release.app, release.image),
            Command::AddTask {
                operation_id, index, ..
            } => write!(f, "AddTask({operation_id}#{index})"),
            Command::AddTasks {
                operation_id,
                index,
                tasks,
            } => write!(f, "AddTasks({operation_id}#{index}, {} tasks)", tasks.len()),
            Command::ControlOperation {
                operation_id, action, ..
            } => write!(f, "ControlOperation({operation_id}, {action:?})"),
            Command::FinishOperation {
                operation_id, state, ..
            } => write!(f, "FinishOperation({operation_id}, {state:?})"),
            Command::AppStatusReported { from, app, .. } => write!(f, "AppStatusReported({app} in {from})"),
            Command::Compact { .. } => write!(f, "Compact"),
            Command::DatabaseStatusReported { from, databases } => {
                write!(f, "DatabaseStatusReported({from}, {} databases)", databases.len())
            }
            Command::PutBackupSchedule { schedule, .. } => write!(f, "PutBackupSchedule({})", schedule.app),
            Command::DeleteBackupSchedule { app, .. } => write!(f, "DeleteBackupSchedule({app})"),
            Command::StartScheduledBackup {
                operation,
                slot_unix_ms,
                ..
            } => write!(f, "StartScheduledBackup({}, slot {slot_unix_ms})", operation.id),
            Command::PutDrillSchedule { schedule, .. } => write!(f, "PutDrillSchedule({})", schedule.app),
            Command::RegionHealthReported { from, app, regions, .. } => {
                write!(f, "RegionHealthReported({app} by {from}, {} regions)", regions.len())
            }
            Command::DeleteDrillSchedule { app, .. } => write!(f, "DeleteDrillSchedule({app})"),
            Command::StartScheduledDrill {
                operation,
                slot_unix_ms,
                ..
            } => write!(f, "StartScheduledDrill({}, slot {slot_unix_ms})", operation.id),
        }
    }
}

impl std::fmt::Display for CommandResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.error {
            None => write!(f, "ok"),
            Some(e) => write!(f, "error: {e}"),
        }
    }
}
