//! Plain Rust domain types: what the coordinator replicates and the agent
//! executes. Protobuf types never appear here; `convert` maps between the two.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::operation::OperationSpec;

/// Longest name accepted for a region, cluster, app or principal.
pub const MAX_NAME_LEN: usize = 63;

/// `s` quoted for an error message, cut to its first 64 characters: bad
/// input never comes back whole (a 1 MiB value in a status message exceeds
/// gRPC's metadata limit and turns INVALID_ARGUMENT into
/// RESOURCE_EXHAUSTED).
pub fn quote(s: &str) -> String {
    const MAX: usize = 64;
    if s.chars().count() <= MAX {
        format!("{s:?}")
    } else {
        let prefix: String = s.chars().take(MAX).collect();
        format!("{prefix:?}... ({} bytes)", s.len())
    }
}

/// Checks that `value` is a plain DNS-style label: lowercase ASCII letters,
/// digits and `-`, starting with a letter or digit, at most 63 characters.
/// This is what keeps `../x`, spaces and oversize names out of paths, metric
/// labels and Kubernetes object names.
pub fn validate_name(field: &str, value: &str) -> Result<(), Error> {
    let bad = |why: &str| Error::InvalidArgument(format!("{field} {} {why}", quote(value)));
    if value.is_empty() {
        return Err(Error::InvalidArgument(format!("{field} must not be empty")));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(Error::InvalidArgument(format!(
            "{field} is {} characters long; at most {MAX_NAME_LEN} are allowed",
            value.len()
        )));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(bad("may contain only lowercase letters, digits and '-'"));
    }
    if value.starts_with('-') || value.ends_with('-') {
        return Err(bad("must start and end with a letter or digit"));
    }
    Ok(())
}

/// One cluster in one region: the unit an agent serves.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ClusterRef {
    pub region: String,
    pub cluster: String,
}

impl ClusterRef {
    /// Builds a validated reference.
    pub fn new(region: &str, cluster: &str) -> Result<Self, Error> {
        validate_name("region", region)?;
        validate_name("cluster", cluster)?;
        Ok(Self {
            region: region.to_owned(),
            cluster: cluster.to_owned(),
        })
    }
}

impl fmt::Display for ClusterRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.region, self.cluster)
    }
}

/// Liveness of an agent as committed to the log (transitions only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentState {
    Up,
    Down,
}

/// Lifecycle of a task and of an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskState {
    Pending,
    Running,
    Succeeded,
    Failed,
}

impl TaskState {
    /// True once nothing more will happen.
    pub fn is_finished(self) -> bool {
        matches!(self, TaskState::Succeeded | TaskState::Failed)
    }
}

/// One idempotent instruction for one agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub task_id: String,
    pub operation_id: String,
    pub kind: String,
    pub params: BTreeMap<String, String>,
    pub target: ClusterRef,
}

/// A progress event reported while a task runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskProgress {
    pub task_id: String,
    pub message: String,
    pub at_unix_ms: i64,
}

/// The final result of a task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskResult {
    pub task_id: String,
    pub success: bool,
    pub message: String,
    pub outputs: BTreeMap<String, String>,
    /// True when the agent answered from its record instead of executing.
    pub replayed: bool,
    pub finished_at_unix_ms: i64,
}

impl TaskResult {
    /// The result of task `task_id`, finished now (not a replay).
    pub fn finished(task_id: &str, success: bool, message: String, outputs: BTreeMap<String, String>) -> TaskResult {
        TaskResult {
            task_id: task_id.to_owned(),
            success,
            message,
            outputs,
            replayed: false,
            finished_at_unix_ms: now_unix_ms(),
        }
    }
}

/// Milliseconds since the Unix epoch, from the wall clock with its jumps
/// taken out ([`crate::clock`]).
pub fn now_unix_ms() -> i64 {
    crate::clock::now_unix_ms()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_refuse_paths_spaces_and_oversize() {
        for bad in ["../x", "a b", "", "UPPER", "-x", "x-", &"a".repeat(300), "a/b", "a.b"] {
            assert!(validate_name("app", bad).is_err(), "{bad:?} accepted");
        }
        for good in ["us-east", "oatie-backend", "a", "x1"] {
            validate_name("app", good).unwrap();
        }
        let err = validate_name("app", "../x").unwrap_err().to_string();
        assert!(err.contains("app") && err.contains("../x"), "{err}");
    }
}

/// What an operation does. More kinds (cutover, rollback, migration, backup,
/// restore, failover, drill) arrive with their capabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OperationKind {
    /// One ad-hoc task on one agent.
    Task,
    /// Deploy an image to the inactive color, run the gates, switch.
    Deploy,
    /// Switch traffic to the other color.
    Switch,
    /// Switch traffic back to the previous color.
    Rollback,
    /// Run the health gates against the inactive color now.
    HealthCheck,
    /// Run an app's metric checks against the serving color now.
    Analysis,
    /// Show, plan, apply or revert an app's database migrations.
    Migrate,
    /// Back up an app's databases, or validate or restore a backup.
    Backup,
    /// Move an app's primary database (and the app's writes) to another
    /// region.
    Failover,
    /// Rehearse a failover into a region on a scratch copy, touching
    /// nothing in production, and measure RTO and RPO.
    Drill,
}

impl OperationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OperationKind::Task => "task",
            OperationKind::Deploy => "deploy",
            OperationKind::Switch => "switch",
            OperationKind::Rollback => "rollback",
            OperationKind::HealthCheck => "health-check",
            OperationKind::Analysis => "analysis",
            OperationKind::Migrate => "migrate",
            OperationKind::Backup => "backup",
            OperationKind::Failover => "failover",
            OperationKind::Drill => "drill",
        }
    }
}

/// A task as the coordinator tracks it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub spec: TaskSpec,
    /// When the coordinator created the task (the step started).
    #[serde(default)]
    pub created_at_unix_ms: i64,
    pub state: TaskState,
    pub progress: Vec<TaskProgress>,
    pub result: Option<TaskResult>,
    /// How many times a leader sent the task to the agent.
    pub dispatch_count: u32,
}

/// One durable orchestration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    pub id: String,
    pub kind: OperationKind,
    /// The app it acts on (none for ad-hoc tasks).
    #[serde(default)]
    pub app: Option<String>,
    /// The clusters it acts on.
    #[serde(default)]
    pub targets: Vec<ClusterRef>,
    /// What it was asked to do, fixed at creation. Stored as `params` (a
    /// string map) by versions before the typed spec; either form reads.
    #[serde(default, alias = "params", deserialize_with = "crate::operation::deserialize_stored")]
    pub spec: OperationSpec,
    pub state: TaskState,
    pub created_by: String,
    pub created_at_unix_ms: i64,
    pub updated_at_unix_ms: i64,
    pub tasks: Vec<TaskRecord>,
    pub summary: String,
    /// Operator controls (pause, promote, abort), committed like any step.
    #[serde(default)]
    pub control: OperationControl,
    /// The app definition in force when the operation was created, by
    /// digest (`task::spec_digest`). Set by the state machine when it
    /// applies the creation; the plan uses this definition, never a later
    /// one. `None` for ad-hoc tasks and operations from older logs.
    #[serde(default)]
    pub spec_digest: Option<String>,
    /// The release migrations in force at creation (`Bundle::digest`), for
    /// operations that act with a release. Set like `spec_digest`.
    #[serde(default)]
    pub bundle_digest: Option<String>,
}

impl Operation {
    /// A new, pending operation on `app` with no tasks yet (the
    /// orchestrator adds them): what the control API, the backup schedules
    /// and the DR watch create.
    pub fn new_app(
        id: String,
        kind: OperationKind,
        app: &str,
        targets: Vec<ClusterRef>,
        spec: OperationSpec,
        created_by: &str,
        now_unix_ms: i64,
    ) -> Operation {
        Operation {
            id,
            kind,
            app: Some(app.to_owned()),
            targets,
            spec,
            state: TaskState::Pending,
            created_by: created_by.to_owned(),
            created_at_unix_ms: now_unix_ms,
            updated_at_unix_ms: now_unix_ms,
            tasks: vec![],
            summary: String::new(),
            control: Default::default(),
            spec_digest: None,
            bundle_digest: None,
        }
    }

    /// The release image whose migrations the operation acts with, if any.
    pub fn release_image(&self) -> Option<&str> {
        match self.kind {
            OperationKind::Deploy | OperationKind::Migrate => self.spec.image.as_deref(),
            OperationKind::Rollback => self.spec.release_image.as_deref(),
            _ => None,
        }
    }
}

/// What operators asked of a running operation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationControl {
    /// No new step starts while set; steps already running finish, and a
    /// rollback after a failure still runs (safety beats the pause).
    pub paused: bool,
    /// Manual promotion gates passed, 1-based (gate N precedes wave N's
    /// switch; an atomic cutover has one gate).
    pub promoted: Vec<u32>,
    /// Who aborted the operation, once someone did.
    pub aborted_by: Option<String>,
}

/// An operator's request to steer a running operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlAction {
    Pause,
    Resume,
    /// Passes manual promotion gate `gate` (1-based).
    Promote {
        gate: u32,
    },
    Abort,
}

/// An agent as the coordinator knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub cluster: ClusterRef,
    pub state: AgentState,
    pub since_unix_ms: i64,
    pub agent_version: String,
    pub task_kinds: Vec<String>,
    /// The apps whose traffic this agent's traffic driver moves.
    #[serde(default)]
    pub traffic_apps: Vec<String>,
    /// The registration (stream) this record's `Up` came from; an `AgentDown`
    /// naming an older session is stale and changes nothing. 0 in records
    /// from logs written before sessions were recorded.
    #[serde(default)]
    pub session: u64,
    /// The Raft term of the entry that set `since_unix_ms`: the leader of
    /// that term stamped it, by its clock (0: unknown, a log from before
    /// terms were recorded). A later leader cannot read another's stamp
    /// on its own clock.
    #[serde(default)]
    pub since_term: u64,
}

/// A fact CI established about a release image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attestation {
    pub image: String,
    pub check: String,
    pub value: String,
    pub attested_by: String,
    pub at_unix_ms: i64,
}

/// One entry of the audit trail.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub sequence: u64,
    pub at_unix_ms: i64,
    pub actor: String,
    pub action: String,
    pub parameters: String,
    pub outcome: String,
}
