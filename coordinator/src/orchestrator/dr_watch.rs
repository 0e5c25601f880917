//! The leader's watch over primaries a failover superseded.
//!
//! A forced failover cannot fence the old primary (its region is gone).
//! When that region comes back, its agent reports the database as a
//! writable primary although the app's epoch names another cluster. `due`
//! answers with an operation that fences it (`fence_only`: its app in
//! maintenance, its server read-only), under the current epoch, so it
//! stays fenced until an operator rejoins it. Like the backup schedules,
//! a pure function of the replicated state and a clock reading.

use cutover_shared::domain::{AgentState, Operation, OperationKind, TaskState};
use cutover_shared::dr::DbRole;
use cutover_shared::operation::{FailoverSpec, OperationSpec};

use crate::state::{AuditDraft, Command, State};

/// Who stray primaries are fenced by.
pub const FENCE_ACTOR: &str = "cutover/dr-fence";

/// A fence that failed is tried again after this.
const RETRY_MS: i64 = 60_000;

/// The fence operations the state calls for now.
pub fn due(s: &State, now: i64) -> Vec<Command> {
    let mut out = Vec::new();
    for (app, epoch) in &s.dr_epochs {
        let Some(primary) = &epoch.primary else { continue };
        let Some(dbs) = s.db_status.get(app) else { continue };
        for (key, d) in dbs {
            if key == &primary.to_string() || d.role != Some(DbRole::Primary) || d.fenced {
                continue;
            }
            let Some(agent) = s.agents.get(key) else { continue };
            if agent.state != AgentState::Up || !agent.task_kinds.iter().any(|k| k == "db.failover") {
                continue;
            }
            let Some(cluster) = key
                .split_once('/')
                .and_then(|(r, c)| cutover_shared::domain::ClusterRef::new(r, c).ok())
            else {
                continue;
            };
            if s.running_operation(app, &cluster).is_some() {
                continue;
            }
            let id = super::schedule::derived_id(&format!("dr-fence/{app}/{key}/{}/{}", epoch.epoch, now / RETRY_MS));
            if s.operations.contains_key(&id) {
                continue;
            }
            let operation = Operation {
                id,
                kind: OperationKind::Failover,
                app: Some(app.clone()),
                targets: vec![cluster.clone()],
                spec: OperationSpec {
                    failover: Some(Box::new(FailoverSpec {
                        from: Some(cluster.clone()),
                        to: primary.clone(),
                        epoch: epoch.epoch,
                        fence: true,
                        verify_color: None,
                        data_loss_window_ms: None,
                        wal_behind_bytes: None,
                        force: false,
                        accept_data_loss: false,
                        fence_only: true,
                    })),
                    ..OperationSpec::default()
                },
                state: TaskState::Pending,
                created_by: FENCE_ACTOR.into(),
                created_at_unix_ms: now,
                updated_at_unix_ms: now,
                tasks: vec![],
                summary: String::new(),
                control: Default::default(),
                spec_digest: None,
                bundle_digest: None,
            };
            out.push(Command::CreateOperation {
                audit: AuditDraft {
                    at_unix_ms: now,
                    actor: FENCE_ACTOR.into(),
                    action: "FenceStrayPrimary".into(),
                    parameters: serde_json::json!({
                        "app": app, "cluster": key, "epoch": epoch.epoch, "primary": primary.to_string(),
                    })
                    .to_string(),
                    outcome: "ok".into(),
                },
                operation,
                fix_inputs: true,
            });
        }
    }
    out
}
