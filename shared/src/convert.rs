//! The one place where protobuf types and domain types meet.

use crate::Error;
use crate::domain::{self, AgentState, TaskState};
use crate::proto;

impl From<domain::ClusterRef> for proto::ClusterRef {
    fn from(c: domain::ClusterRef) -> Self {
        proto::ClusterRef {
            region: c.region,
            cluster: c.cluster,
        }
    }
}

/// Validates a protobuf cluster reference.
pub fn cluster_from_proto(c: Option<proto::ClusterRef>, field: &str) -> Result<domain::ClusterRef, Error> {
    let c = c.ok_or_else(|| Error::InvalidArgument(format!("{field} is required")))?;
    domain::ClusterRef::new(&c.region, &c.cluster)
}

impl From<TaskState> for proto::TaskState {
    fn from(s: TaskState) -> Self {
        match s {
            TaskState::Pending => proto::TaskState::Pending,
            TaskState::Running => proto::TaskState::Running,
            TaskState::Succeeded => proto::TaskState::Succeeded,
            TaskState::Failed => proto::TaskState::Failed,
        }
    }
}

impl From<AgentState> for proto::AgentState {
    fn from(s: AgentState) -> Self {
        match s {
            AgentState::Up => proto::AgentState::Up,
            AgentState::Down => proto::AgentState::Down,
        }
    }
}

impl From<domain::TaskSpec> for proto::Task {
    fn from(t: domain::TaskSpec) -> Self {
        proto::Task {
            task_id: t.task_id,
            operation_id: t.operation_id,
            kind: t.kind,
            params: t.params.into_iter().collect(),
            target: Some(t.target.into()),
        }
    }
}

impl TryFrom<proto::Task> for domain::TaskSpec {
    type Error = Error;
    fn try_from(t: proto::Task) -> Result<Self, Error> {
        Ok(domain::TaskSpec {
            task_id: t.task_id,
            operation_id: t.operation_id,
            kind: t.kind,
            params: t.params.into_iter().collect(),
            target: cluster_from_proto(t.target, "target")?,
        })
    }
}

impl From<domain::TaskProgress> for proto::TaskProgress {
    fn from(p: domain::TaskProgress) -> Self {
        proto::TaskProgress {
            task_id: p.task_id,
            message: p.message,
            at_unix_ms: p.at_unix_ms,
        }
    }
}

impl From<proto::TaskProgress> for domain::TaskProgress {
    fn from(p: proto::TaskProgress) -> Self {
        domain::TaskProgress {
            task_id: p.task_id,
            message: p.message,
            at_unix_ms: p.at_unix_ms,
        }
    }
}

impl From<domain::TaskResult> for proto::TaskResult {
    fn from(r: domain::TaskResult) -> Self {
        proto::TaskResult {
            task_id: r.task_id,
            success: r.success,
            message: r.message,
            outputs: r.outputs.into_iter().collect(),
            replayed: r.replayed,
            finished_at_unix_ms: r.finished_at_unix_ms,
        }
    }
}

impl From<proto::TaskResult> for domain::TaskResult {
    fn from(r: proto::TaskResult) -> Self {
        domain::TaskResult {
            task_id: r.task_id,
            success: r.success,
            message: r.message,
            outputs: r.outputs.into_iter().collect(),
            replayed: r.replayed,
            finished_at_unix_ms: r.finished_at_unix_ms,
        }
    }
}

impl From<domain::TaskRecord> for proto::TaskStatus {
    fn from(t: domain::TaskRecord) -> Self {
        proto::TaskStatus {
            task: Some(t.spec.into()),
            state: proto::TaskState::from(t.state) as i32,
            progress: t.progress.into_iter().map(Into::into).collect(),
            result: t.result.map(Into::into),
            dispatch_count: t.dispatch_count,
        }
    }
}

impl From<domain::Operation> for proto::Operation {
    fn from(o: domain::Operation) -> Self {
        let kind = match o.kind {
            domain::OperationKind::Task => proto::OperationKind::Task,
        };
        proto::Operation {
            id: o.id,
            kind: kind as i32,
            state: proto::TaskState::from(o.state) as i32,
            created_by: o.created_by,
            created_at_unix_ms: o.created_at_unix_ms,
            updated_at_unix_ms: o.updated_at_unix_ms,
            tasks: o.tasks.into_iter().map(Into::into).collect(),
            summary: o.summary,
        }
    }
}

impl From<domain::AgentRecord> for proto::Agent {
    fn from(a: domain::AgentRecord) -> Self {
        proto::Agent {
            cluster: Some(a.cluster.into()),
            state: proto::AgentState::from(a.state) as i32,
            since_unix_ms: a.since_unix_ms,
            agent_version: a.agent_version,
            task_kinds: a.task_kinds,
        }
    }
}

impl From<domain::Attestation> for proto::Attestation {
    fn from(a: domain::Attestation) -> Self {
        proto::Attestation {
            image: a.image,
            check: a.check,
            value: a.value,
            attested_by: a.attested_by,
            at_unix_ms: a.at_unix_ms,
        }
    }
}

impl From<domain::AuditEvent> for proto::AuditEvent {
    fn from(a: domain::AuditEvent) -> Self {
        proto::AuditEvent {
            sequence: a.sequence,
            at_unix_ms: a.at_unix_ms,
            actor: a.actor,
            action: a.action,
            parameters: a.parameters,
            outcome: a.outcome,
        }
    }
}
