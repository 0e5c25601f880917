//! `ControlService`: what operators, CI and dashboards call. Reads are served
//! from this node's applied state; writes go through [`Consensus::propose`],
//! which forwards them to the leader, so any node accepts any call.
//!
//! Every handler validates its input completely before proposing anything:
//! a refused call changes nothing.
//!
//! This module is the application layer: `ControlApi`'s methods take the
//! caller and the request and return the response or an [`ApiError`].
//! `grpc` is the service's gRPC face, and `error` maps `ApiError` to a
//! status in one place.

mod dr;
mod error;
mod grpc;

pub use error::ApiError;

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use cutover_shared::app::{AppSpec, Color, validate_image_ref};
use cutover_shared::backup::{
    self, BackupAction, BackupEntry, BackupSchedule, BackupTrigger, RetentionPolicy, validate_backup_id,
};
use cutover_shared::convert::cluster_from_proto;
use cutover_shared::domain::{
    self, AgentState, Attestation, ClusterRef, OperationKind, TaskRecord, TaskSpec, TaskState, now_unix_ms,
    validate_name,
};
use cutover_shared::identity::Identity;
use cutover_shared::operation::{BackupSpec, MigrateSpec, OperationSpec, Promotion, Strategy};
use cutover_shared::proto::{self as pb};
use cutover_shared::release::{Bundle, Release};
use cutover_shared::task::{MigrateAction, TaskKind};
use cutover_shared::tls::normalize_addr;
use futures::Stream;
use tokio_stream::wrappers::ReceiverStream;

use crate::orchestrator::Inputs;
use crate::raft::{Consensus, Proposal, RaftStatus};
use crate::state::{AuditDraft, Command};

/// Bounds on user input, so one call cannot bloat the replicated state.
const MAX_PARAMS: usize = 64;
const MAX_PARAM_VALUE: usize = 4096;
const MAX_IMAGE_LEN: usize = 512;
const MAX_CHECK_VALUE: usize = 256;
const MAX_ID_LEN: usize = 128;

pub struct ControlApi {
    pub consensus: Consensus,
    /// This node's data directory (its audit file lives there).
    pub data_dir: std::path::PathBuf,
    /// Open `WatchOperation` streams (each holds a task until its client
    /// goes away or the operation ends).
    pub watches: Arc<std::sync::atomic::AtomicUsize>,
}

/// Counts one open watch stream while it lives.
struct WatchGuard(Arc<std::sync::atomic::AtomicUsize>);

impl WatchGuard {
    fn new(count: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

fn audit(who: &Identity, action: &str, params: serde_json::Value, outcome: &str) -> AuditDraft {
    AuditDraft {
        at_unix_ms: now_unix_ms(),
        actor: who.to_string(),
        action: action.to_owned(),
        parameters: params.to_string(),
        outcome: outcome.to_owned(),
    }
}

/// The operation as the API shows it, with the gate it waits at (which only
/// the orchestrator can tell).
fn operation_proto(consensus: &Consensus, op: domain::Operation) -> pb::Operation {
    // Only an unfinished operation with manual promotion can wait at a gate;
    // the others (most of a listing) need no app or bundle copied.
    let gate = if crate::orchestrator::has_gates(&op) && !op.state.is_finished() {
        consensus.read(|s| {
            let (spec, bundle) = s.operation_inputs(&op)?;
            crate::orchestrator::awaiting_gate(&op, &Inputs::new(&op, spec, bundle))
        })
    } else {
        None
    };
    let mut p: pb::Operation = op.into();
    p.awaiting_gate = gate.unwrap_or(0);
    p
}

fn members(s: &RaftStatus) -> Vec<pb::ClusterMember> {
    s.members
        .iter()
        .map(|(id, addr, voter)| pb::ClusterMember {
            node_id: *id,
            address: addr.clone(),
            role: if *voter {
                pb::MemberRole::Voter
            } else {
                pb::MemberRole::Learner
            } as i32,
            leader: s.leader == Some(*id),
            feature_level: s.feature_levels.get(id).copied().unwrap_or(0),
        })
        .collect()
}

/// Checks an image reference: non-empty, bounded, no whitespace or control
/// characters. (Full reference parsing arrives with deploys.)
pub fn validate_image(image: &str) -> Result<(), ApiError> {
    if image.is_empty() {
        return Err(ApiError::invalid_argument("image must not be empty"));
    }
    if image.len() > MAX_IMAGE_LEN {
        return Err(ApiError::invalid_argument(format!(
            "image is longer than {MAX_IMAGE_LEN} characters"
        )));
    }
    if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ApiError::invalid_argument(format!(
            "image {} contains whitespace or control characters",
            domain::quote(image)
        )));
    }
    Ok(())
}

/// Task parameter names: like names, but `_` is allowed (`delay_ms`).
fn validate_param_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= domain::MAX_NAME_LEN
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid_argument(format!(
            "param name {} must be 1..{} lowercase letters, digits, '-' or '_', starting with a letter",
            domain::quote(name),
            domain::MAX_NAME_LEN
        )))
    }
}

/// Entries a listing returns when the request names no limit.
const DEFAULT_LIST_LIMIT: usize = 100;
/// Most entries one listing returns, whatever the request asks.
pub const MAX_LIST_LIMIT: usize = 1000;
/// An agent page's size when the request names none: below tonic's 4 MiB
/// message limit with room to spare (one unpaged answer passed it at
/// 18,000 agents, `bench fanin`).
pub const AGENT_PAGE_BYTES: usize = 3 << 20;

/// A page token as [`agent_page`] gives them out (a `region/cluster`
/// key), or `None` for the first page; anything else is refused.
fn page_token(token: &str) -> Result<Option<String>, ApiError> {
    if token.is_empty() {
        return Ok(None);
    }
    let valid = token
        .split_once('/')
        .is_some_and(|(region, cluster)| ClusterRef::new(region, cluster).is_ok());
    if !valid {
        return Err(ApiError::InvalidArgument(format!(
            "page_token {} is not one this service gave out",
            domain::quote(token)
        )));
    }
    Ok(Some(token.to_owned()))
}

/// The page of `agents` after the key `after`: `page_size` entries
/// (capped at [`MAX_LIST_LIMIT`]), or with none asked as many as fit in
/// [`AGENT_PAGE_BYTES`] encoded; and the token of the next page, empty on
/// the last. Keys are `region/cluster`, so pages follow that order.
fn agent_page<T: prost::Message>(
    agents: &crate::state::Map<String, domain::AgentRecord>,
    after: Option<&String>,
    page_size: u32,
    entry: impl Fn(&domain::AgentRecord) -> T,
) -> (Vec<T>, String) {
    use std::ops::Bound::{Excluded, Unbounded};
    let size = match page_size {
        0 => usize::MAX,
        n => (n as usize).min(MAX_LIST_LIMIT),
    };
    let range = match after {
        Some(k) => agents.range::<_, String>((Excluded(k), Unbounded)),
        None => agents.range::<_, String>(..),
    };
    let mut page = Vec::new();
    let mut bytes = 0;
    let mut last: Option<&String> = None;
    for (key, a) in range {
        let item = entry(a);
        // The field's tag and length prefix: a few bytes more.
        let len = item.encoded_len() + 8;
        if page.len() == size || (!page.is_empty() && bytes + len > AGENT_PAGE_BYTES) {
            return (page, last.cloned().unwrap_or_default());
        }
        bytes += len;
        last = Some(key);
        page.push(item);
    }
    (page, String::new())
}

fn list_limit(asked: u32) -> usize {
    match asked {
        0 => DEFAULT_LIST_LIMIT,
        n => (n as usize).min(MAX_LIST_LIMIT),
    }
}

fn validate_id(field: &str, id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > MAX_ID_LEN || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(ApiError::invalid_argument(format!(
            "{field} {} is not a valid id",
            domain::quote(id)
        )));
    }
    Ok(())
}

impl ControlApi {
    /// Called before every read of the control API: the answer reflects
    /// every write acknowledged before the call, on whichever node it is
    /// asked ([`crate::raft::Consensus::read_barrier`]). A node that cannot
    /// reach a leader answers UNAVAILABLE instead of its own, possibly
    /// stale, state.
    pub(crate) async fn linearizable(&self) -> Result<(), ApiError> {
        Ok(self.consensus.read_barrier().await?)
    }

    fn app(&self, name: &str) -> Result<AppSpec, ApiError> {
        validate_name("app", name)?;
        self.consensus
            .read(|s| s.apps.get(name).cloned())
            .ok_or_else(|| ApiError::not_found(format!("unknown app {name:?}")))
    }

    /// The clusters of `spec` in `region` (all of them if `region` is empty
    /// and `all_if_empty`), refusing a region the app does not run in.
    fn targets(spec: &AppSpec, region: &str, all_if_empty: bool) -> Result<Vec<ClusterRef>, ApiError> {
        let regions: Vec<&str> = spec.clusters.iter().map(|c| c.region.as_str()).collect();
        if region.is_empty() {
            if all_if_empty || spec.clusters.len() == 1 {
                return Ok(spec.clusters.iter().map(|c| c.cluster_ref()).collect());
            }
            return Err(ApiError::invalid_argument(format!(
                "region is required: app {} runs in {}",
                spec.name,
                regions.join(", ")
            )));
        }
        validate_name("region", region)?;
        let targets: Vec<ClusterRef> = spec
            .clusters
            .iter()
            .filter(|c| c.region == region)
            .map(|c| c.cluster_ref())
            .collect();
        if targets.is_empty() {
            return Err(ApiError::invalid_argument(format!(
                "app {} does not run in region {region:?} (it runs in {})",
                spec.name,
                regions.join(", ")
            )));
        }
        Ok(targets)
    }

    /// Starts an app operation after checking nothing else runs on it.
    async fn start_app_operation(
        &self,
        who: &Identity,
        kind: OperationKind,
        spec: &AppSpec,
        targets: Vec<ClusterRef>,
        op_spec: OperationSpec,
    ) -> Result<String, ApiError> {
        self.consensus.catch_up().await?;
        for t in &targets {
            if let Some(running) = self
                .consensus
                .read(|s| s.running_operation(&spec.name, t).map(str::to_owned))
            {
                return Err(ApiError::failed_precondition(format!(
                    "operation {running} is already running on {} in {t}",
                    spec.name
                )));
            }
            let up = self.consensus.read(|s| s.agents.get(&t.to_string()).map(|a| a.state));
            if up != Some(AgentState::Up) {
                return Err(ApiError::failed_precondition(format!("the agent for {t} is not up")));
            }
        }
        let now = now_unix_ms();
        let id = format!("op-{}", uuid::Uuid::new_v4().simple());
        let action = match kind {
            OperationKind::Deploy => "Deploy",
            OperationKind::Switch => "Switch",
            OperationKind::Rollback => "Rollback",
            OperationKind::HealthCheck => "HealthCheck",
            OperationKind::Analysis => "RunAnalysis",
            OperationKind::Migrate => "Migrate",
            OperationKind::Backup => match op_spec.backup.as_ref().map(|b| b.action) {
                Some(BackupAction::Validate) => "ValidateBackup",
                Some(BackupAction::Restore) => "RestoreBackup",
                Some(BackupAction::RestorePrimary) => "RestoreBackupOntoPrimary",
                Some(BackupAction::Delete) => "DeleteBackup",
                _ => "CreateBackup",
            },
            OperationKind::Failover if op_spec.failover.as_ref().is_some_and(|f| f.rejoin_only) => "Rejoin",
            OperationKind::Failover => "Failover",
            OperationKind::Drill => "Drill",
            OperationKind::Task => "RunTask",
        };
        let audit_params = serde_json::json!({
            "app": spec.name,
            "targets": targets.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
            "params": op_spec.to_display(),
        });
        let operation =
            domain::Operation::new_app(id.clone(), kind, &spec.name, targets, op_spec, &who.to_string(), now);
        let cmd = Command::CreateOperation {
            operation,
            audit: audit(who, action, audit_params, "accepted"),
            fix_inputs: true,
        };
        self.consensus.propose(Proposal::Command(cmd)).await?;
        Ok(id)
    }

    /// Unfinished operations on `app`, oldest first.
    fn running_on(&self, app: &str) -> Vec<String> {
        self.consensus.read(|s| {
            let mut ops: Vec<&domain::Operation> = s
                .all_operations()
                .filter(|o| !o.state.is_finished() && o.app.as_deref() == Some(app))
                .collect();
            ops.sort_by_key(|o| o.created_at_unix_ms);
            ops.into_iter().map(|o| o.id.clone()).collect()
        })
    }

    fn operation(&self, id: &str) -> Result<domain::Operation, ApiError> {
        validate_id("operation_id", id)?;
        self.consensus
            .read(|s| s.operations.get(id).map(|o| domain::Operation::clone(o)))
            .ok_or_else(|| ApiError::not_found(format!("no operation {id}")))
    }

    /// What a rollback of `targets` must do about the schema. The last
    /// traffic-moving operation of the app decides: if it was a cutover that
    /// migrated databases, rolling back crosses the point after which the
    /// old code may not run against the schema. That is refused unless every
    /// migration of the release has a down; then the rollback runs the downs
    /// after switching traffic back (the returned parameters say which).
    fn rollback_migrations(&self, spec: &AppSpec, targets: &[ClusterRef]) -> Result<OperationSpec, ApiError> {
        let crossing = self.consensus.read(|s| {
            let mut ops: Vec<&domain::Operation> = s
                .all_operations()
                .filter(|o| o.app.as_deref() == Some(spec.name.as_str()) && o.state.is_finished())
                .filter(|o| {
                    matches!(
                        o.kind,
                        OperationKind::Deploy | OperationKind::Switch | OperationKind::Rollback
                    )
                })
                .collect();
            ops.sort_by_key(|o| o.created_at_unix_ms);
            let last = ops.last().copied()?;
            if last.kind != OperationKind::Deploy || last.state != TaskState::Succeeded {
                return None;
            }
            let image = last.spec.image.clone()?;
            let migrated: BTreeMap<String, i64> = last
                .tasks
                .iter()
                .filter(|t| t.spec.kind == crate::orchestrator::MIGRATE && t.state == TaskState::Succeeded)
                .filter(|t| targets.contains(&t.spec.target))
                .filter_map(|t| {
                    let out = &t.result.as_ref()?.outputs;
                    let out = cutover_shared::task::outputs::MigrateOutputs::from_wire(out);
                    if !out.migrated_anything() {
                        return None;
                    }
                    Some((t.spec.target.to_string(), out.from_version?))
                })
                .collect();
            if migrated.is_empty() {
                return None;
            }
            let bundle = s.release_bundle(&spec.name, &image)?.clone();
            Some((image, bundle, migrated))
        });
        let Some((image, bundle, migrated)) = crossing else {
            return Ok(OperationSpec::default());
        };
        if let Some(m) = bundle.migrations.iter().find(|m| m.down_sql.is_none()) {
            return Err(ApiError::failed_precondition(format!(
                "rolling back {} would cross the migrations of release {image}, and {} has no down migration: the previous release may not run against the new schema. Fix forward with a new release, or restore the pre-migration backups first",
                spec.name, m.up_file
            )));
        }
        Ok(OperationSpec {
            release_image: Some(image),
            migrate_down: migrated,
            ..OperationSpec::default()
        })
    }

    /// The color each target must serve after a switch or rollback: the one
    /// not serving now, as its agent last reported. Resolved here, once, and
    /// recorded in the operation (`switch_to`), so a switch task that runs
    /// twice (an agent crashed before reporting) lands on the same color
    /// instead of flipping traffic back.
    fn switch_to(&self, spec: &AppSpec, targets: &[ClusterRef]) -> Result<BTreeMap<String, Color>, ApiError> {
        let mut to = BTreeMap::new();
        for t in targets {
            let active = self.consensus.read(|s| {
                s.app_status
                    .get(&spec.name)
                    .and_then(|m| m.get(&t.to_string()))
                    .and_then(|st| st.active)
            });
            let Some(active) = active else {
                return Err(ApiError::failed_precondition(format!(
                    "{} has no active color in {t} yet (nothing deployed there); nothing to switch",
                    spec.name
                )));
            };
            to.insert(t.to_string(), active.other());
        }
        Ok(to)
    }

    /// Commits an operator's control of operation `id` and returns the
    /// operation as it then is.
    async fn steer(&self, who: &Identity, id: &str, action: domain::ControlAction) -> Result<pb::Operation, ApiError> {
        validate_id("operation_id", id)?;
        self.consensus.catch_up().await?;
        let op = self.operation(id)?;
        if op.state.is_finished() {
            return Err(ApiError::failed_precondition(format!(
                "operation {id} already finished ({})",
                op.summary
            )));
        }
        let action = match action {
            domain::ControlAction::Promote { gate } => {
                let (count, awaiting) = self.consensus.read(|s| {
                    s.operation_inputs(&op).map_or((0, None), |(spec, bundle)| {
                        let inputs = Inputs::new(&op, spec, bundle);
                        (
                            crate::orchestrator::gate_count(&op, &inputs),
                            crate::orchestrator::awaiting_gate(&op, &inputs),
                        )
                    })
                });
                if count == 0 {
                    return Err(ApiError::failed_precondition(format!(
                        "operation {id} has no manual promotion gates (start it with --manual-promotion)"
                    )));
                }
                let gate = if gate == 0 {
                    // The gate it waits at, else the next one not yet passed.
                    awaiting
                        .or_else(|| (1..=count).find(|g| !op.control.promoted.contains(g)))
                        .ok_or_else(|| {
                            ApiError::failed_precondition(format!("every gate of operation {id} is already passed"))
                        })?
                } else {
                    gate
                };
                if gate > count {
                    return Err(ApiError::invalid_argument(format!(
                        "operation {id} has {count} promotion gate(s); there is no gate {gate}"
                    )));
                }
                domain::ControlAction::Promote { gate }
            }
            other => other,
        };
        let name = match &action {
            domain::ControlAction::Pause => "PauseOperation",
            domain::ControlAction::Resume => "ResumeOperation",
            domain::ControlAction::Promote { .. } => "PromoteOperation",
            domain::ControlAction::Abort => "AbortOperation",
        };
        let params = serde_json::json!({ "operation_id": id, "action": format!("{action:?}") });
        let cmd = Command::ControlOperation {
            operation_id: id.to_owned(),
            action,
            audit: audit(who, name, params, "ok"),
        };
        self.consensus.propose(Proposal::Command(cmd)).await?;
        let op = self.operation(id)?;
        Ok(operation_proto(&self.consensus, op))
    }

    async fn membership_change(
        &self,
        who: &Identity,
        proposal: Proposal,
        action: &str,
        params: serde_json::Value,
    ) -> Result<Vec<pb::ClusterMember>, ApiError> {
        let result = self.consensus.propose(proposal).await;
        let outcome = match &result {
            Ok(_) => "ok".to_owned(),
            Err(e) => format!("error: {e}"),
        };
        // Record the attempt either way; the change itself is already decided.
        let _ = self
            .consensus
            .propose(Proposal::Command(Command::Audit(audit(who, action, params, &outcome))))
            .await;
        result?;
        Ok(members(&self.consensus.status()))
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchOperationResponse, tonic::Status>> + Send>>;

/// The application layer: one method per API call, taking the caller and
/// the request and returning the response or an [`ApiError`]. The gRPC
/// service (`grpc.rs`) only unwraps requests and maps errors.
impl ControlApi {
    pub async fn get_cluster_status(
        &self,
        _r: pb::GetClusterStatusRequest,
    ) -> Result<pb::GetClusterStatusResponse, ApiError> {
        let s = self.consensus.status();
        Ok(pb::GetClusterStatusResponse {
            node_id: s.node_id,
            leader_id: s.leader.unwrap_or(0),
            term: s.term,
            last_log_index: s.last_log_index,
            commit_index: s.commit_index,
            applied_index: s.applied_index,
            snapshot_index: s.snapshot_index,
            purged_index: s.purged_index,
            members: members(&s),
            server_state: s.server_state.to_owned(),
            clock_term: self.consensus.read(|st| st.clock.term),
        })
    }

    pub async fn add_node(&self, who: &Identity, r: pb::AddNodeRequest) -> Result<pb::AddNodeResponse, ApiError> {
        if r.node_id == 0 {
            return Err(ApiError::invalid_argument("node_id must be non-zero"));
        }
        normalize_addr(&r.address)?;
        if self
            .consensus
            .status()
            .members
            .iter()
            .any(|(id, _, voter)| *id == r.node_id && *voter)
        {
            return Err(ApiError::already_exists(format!(
                "node {} is already a voter",
                r.node_id
            )));
        }
        let params = serde_json::json!({ "node_id": r.node_id, "address": r.address });
        let members = self
            .membership_change(
                who,
                Proposal::AddNode {
                    id: r.node_id,
                    address: r.address,
                },
                "AddNode",
                params,
            )
            .await?;
        Ok(pb::AddNodeResponse { members })
    }

    pub async fn remove_node(
        &self,
        who: &Identity,
        r: pb::RemoveNodeRequest,
    ) -> Result<pb::RemoveNodeResponse, ApiError> {
        let status = self.consensus.status();
        if !status.members.iter().any(|(id, _, _)| *id == r.node_id) {
            return Err(ApiError::not_found(format!(
                "node {} is not a member of the cluster",
                r.node_id
            )));
        }
        let voters = status.members.iter().filter(|(_, _, v)| *v).count();
        if voters <= 1 && status.members.iter().any(|(id, _, v)| *id == r.node_id && *v) {
            return Err(ApiError::failed_precondition("cannot remove the last voter"));
        }
        let params = serde_json::json!({ "node_id": r.node_id });
        let members = self
            .membership_change(who, Proposal::RemoveNode { id: r.node_id }, "RemoveNode", params)
            .await?;
        Ok(pb::RemoveNodeResponse { members })
    }

    /// Hands the leadership to voter `node_id`, through the leader
    /// wherever it is; answers once that node leads.
    pub async fn transfer_leadership(
        &self,
        who: &Identity,
        r: pb::TransferLeadershipRequest,
    ) -> Result<pb::TransferLeadershipResponse, ApiError> {
        if r.node_id == 0 {
            return Err(ApiError::invalid_argument("node_id must be non-zero"));
        }
        let params = serde_json::json!({ "node_id": r.node_id });
        self.membership_change(
            who,
            Proposal::TransferLeader { to: r.node_id },
            "TransferLeadership",
            params,
        )
        .await?;
        let s = self.consensus.status();
        Ok(pb::TransferLeadershipResponse {
            leader_id: s.leader.unwrap_or(0),
            term: s.term,
        })
    }

    /// One page of agents, by `region/cluster`: `page_size` of them, or
    /// with none asked as many as fit in [`AGENT_PAGE_BYTES`]. The token is
    /// the last key of the page before (clients treat it as opaque).
    pub async fn list_agents(&self, r: pb::ListAgentsRequest) -> Result<pb::ListAgentsResponse, ApiError> {
        let after = page_token(&r.page_token)?;
        let (agents, next_page_token) = self
            .consensus
            .read(|s| agent_page(&s.agents, after.as_ref(), r.page_size, |a| pb::Agent::from(a.clone())));
        Ok(pb::ListAgentsResponse {
            agents,
            next_page_token,
        })
    }

    /// Every cluster's agent state, in pages as [`Self::list_agents`]; or,
    /// with an app, its clusters and its state in each (one message: an
    /// app runs in a handful of clusters, and paging is refused there).
    pub async fn get_status(&self, r: pb::GetStatusRequest) -> Result<pb::GetStatusResponse, ApiError> {
        let (clusters, next_page_token) = if r.app.is_empty() {
            let after = page_token(&r.page_token)?;
            self.consensus.read(|s| {
                agent_page(&s.agents, after.as_ref(), r.page_size, |a| pb::ClusterStatus {
                    cluster: Some(a.cluster.clone().into()),
                    agent_state: pb::AgentState::from(a.state) as i32,
                    app: None,
                })
            })
        } else {
            if r.page_size != 0 || !r.page_token.is_empty() {
                return Err(ApiError::invalid_argument(
                    "page_size and page_token page the status of every cluster; an app's status is one page",
                ));
            }
            let spec = self.app(&r.app)?;
            let clusters = self.consensus.read(|s| {
                spec.clusters
                    .iter()
                    .map(|c| {
                        let key = c.cluster_ref().to_string();
                        pb::ClusterStatus {
                            cluster: Some(c.cluster_ref().into()),
                            agent_state: s
                                .agents
                                .get(&key)
                                .map_or(pb::AgentState::Unspecified, |a| a.state.into())
                                as i32,
                            app: s
                                .app_status
                                .get(&spec.name)
                                .and_then(|m| m.get(&key))
                                .cloned()
                                .map(Into::into),
                        }
                    })
                    .collect()
            });
            (clusters, String::new())
        };
        Ok(pb::GetStatusResponse {
            clusters,
            leader_id: self.consensus.status().leader.unwrap_or(0),
            next_page_token,
        })
    }

    pub async fn run_task(&self, who: &Identity, r: pb::RunTaskRequest) -> Result<pb::RunTaskResponse, ApiError> {
        let target = cluster_from_proto(r.target, "target")?;
        // Only diagnostic kinds run ad hoc. App and database tasks run only
        // inside the operations that lock the app, gate the switch and pin
        // the release; hand-made params would skip all three.
        match TaskKind::parse(&r.kind) {
            Some(k) if k.is_diagnostic() => {}
            Some(k) => {
                return Err(ApiError::invalid_argument(format!(
                    "{k} tasks cannot be run ad hoc: they run inside operations; use {}",
                    k.verb()
                )));
            }
            None => validate_name("kind", &r.kind)?,
        }
        if r.params.len() > MAX_PARAMS {
            return Err(ApiError::invalid_argument(format!(
                "at most {MAX_PARAMS} params are allowed"
            )));
        }
        for (k, v) in &r.params {
            validate_param_name(k)?;
            if v.len() > MAX_PARAM_VALUE {
                return Err(ApiError::invalid_argument(format!(
                    "param {k} is longer than {MAX_PARAM_VALUE} bytes"
                )));
            }
        }
        self.consensus.catch_up().await?;
        let agent = self
            .consensus
            .read(|s| s.agents.get(&target.to_string()).cloned())
            .ok_or_else(|| ApiError::not_found(format!("no agent serves {target}")))?;
        if !agent.task_kinds.iter().any(|k| k == &r.kind) {
            return Err(ApiError::invalid_argument(format!(
                "agent {target} does not run {:?} tasks (it runs: {})",
                r.kind,
                agent.task_kinds.join(", ")
            )));
        }
        let now = now_unix_ms();
        let op_id = format!("op-{}", uuid::Uuid::new_v4().simple());
        let task_id = format!("{op_id}-1");
        let params: BTreeMap<String, String> = r.params.into_iter().collect();
        let audit_params = serde_json::json!({ "target": target.to_string(), "kind": r.kind, "params": params });
        let operation = domain::Operation {
            id: op_id.clone(),
            kind: OperationKind::Task,
            state: TaskState::Pending,
            created_by: who.to_string(),
            created_at_unix_ms: now,
            updated_at_unix_ms: now,
            app: None,
            targets: vec![target.clone()],
            spec: OperationSpec::default(),
            tasks: vec![TaskRecord {
                created_at_unix_ms: now,
                spec: TaskSpec {
                    task_id: task_id.clone(),
                    operation_id: op_id.clone(),
                    kind: r.kind,
                    params,
                    target,
                },
                state: TaskState::Pending,
                progress: vec![],
                result: None,
                dispatch_count: 0,
            }],
            summary: String::new(),
            control: Default::default(),
            spec_digest: None,
            bundle_digest: None,
        };
        let cmd = Command::CreateOperation {
            operation,
            audit: audit(who, "RunTask", audit_params, "accepted"),
            fix_inputs: true,
        };
        self.consensus.propose(Proposal::Command(cmd)).await?;
        Ok(pb::RunTaskResponse {
            operation_id: op_id,
            task_id,
        })
    }

    pub async fn list_operations(&self, r: pb::ListOperationsRequest) -> Result<pb::ListOperationsResponse, ApiError> {
        let limit = list_limit(r.limit);
        // Sort references and copy only the page: a listing costs the page,
        // not the whole history.
        let ops: Vec<domain::Operation> = self.consensus.read(|s| {
            let mut refs: Vec<&domain::Operation> = s.all_operations().collect();
            refs.sort_by(|a, b| b.created_at_unix_ms.cmp(&a.created_at_unix_ms).then(b.id.cmp(&a.id)));
            refs.into_iter().take(limit).cloned().collect()
        });
        Ok(pb::ListOperationsResponse {
            operations: ops.into_iter().map(|o| operation_proto(&self.consensus, o)).collect(),
        })
    }

    pub async fn get_operation(&self, r: pb::GetOperationRequest) -> Result<pb::GetOperationResponse, ApiError> {
        let op = self.operation(&r.operation_id)?;
        Ok(pb::GetOperationResponse {
            operation: Some(operation_proto(&self.consensus, op)),
        })
    }

    pub async fn watch_operation(&self, r: pb::WatchOperationRequest) -> Result<WatchStream, ApiError> {
        let id = r.operation_id;
        validate_id("operation_id", &id)?;
        // The state holds each operation behind an `Arc` that an apply
        // replaces when it changes the operation while anyone else holds
        // it, so holding `last` makes "unchanged" one pointer comparison:
        // with a hundred watchers, cloning and comparing whole operations
        // on every apply was a quarter of a busy leader's CPU (`bench
        // fleet`).
        let Some(mut last) = self.consensus.read(|s| s.operations.get(&id).cloned()) else {
            return Err(ApiError::not_found(format!("no operation {id}")));
        };
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let consensus = self.consensus.clone();
        let mut applied = consensus.applied();
        let guard = WatchGuard::new(&self.watches);
        tokio::spawn(async move {
            let _guard = guard;
            if tx
                .send(Ok(pb::WatchOperationResponse {
                    operation: Some(operation_proto(&consensus, domain::Operation::clone(&last))),
                }))
                .await
                .is_err()
            {
                return;
            }
            while !last.state.is_finished() {
                // A periodic wake-up as well, in case this node stops applying
                // (it lost contact with the leader): the client then still
                // sees the stream alive. A client that went away ends the
                // task at once, not at the operation's next change.
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::timeout(Duration::from_secs(5), applied.changed()) => {}
                }
                let Some(now) = consensus.read(|s| s.operations.get(&id).cloned()) else {
                    return;
                };
                if !Arc::ptr_eq(&now, &last) && now != last {
                    last = now;
                    if tx
                        .send(Ok(pb::WatchOperationResponse {
                            operation: Some(operation_proto(&consensus, domain::Operation::clone(&last))),
                        }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    pub async fn create_attestation(
        &self,
        who: &Identity,
        r: pb::CreateAttestationRequest,
    ) -> Result<pb::CreateAttestationResponse, ApiError> {
        validate_image(&r.image)?;
        if r.checks.is_empty() {
            return Err(ApiError::invalid_argument("at least one check is required"));
        }
        if r.checks.len() > MAX_PARAMS {
            return Err(ApiError::invalid_argument(format!(
                "at most {MAX_PARAMS} checks are allowed"
            )));
        }
        let now = now_unix_ms();
        let mut attestations = Vec::new();
        for (check, value) in &r.checks {
            validate_name("check", check)?;
            if value.is_empty() || value.len() > MAX_CHECK_VALUE || value.chars().any(char::is_control) {
                return Err(ApiError::invalid_argument(format!(
                    "check {check}: value must be 1..{MAX_CHECK_VALUE} printable characters"
                )));
            }
            attestations.push(Attestation {
                image: r.image.clone(),
                check: check.clone(),
                value: value.clone(),
                attested_by: who.to_string(),
                at_unix_ms: now,
            });
        }
        let params = serde_json::json!({ "image": r.image, "checks": r.checks });
        let cmd = Command::Attest {
            attestations,
            audit: audit(who, "CreateAttestation", params, "accepted"),
        };
        let resp = self.consensus.propose(Proposal::Command(cmd)).await?;
        Ok(pb::CreateAttestationResponse {
            log_index: resp.log_index,
        })
    }

    pub async fn list_attestations(
        &self,
        r: pb::ListAttestationsRequest,
    ) -> Result<pb::ListAttestationsResponse, ApiError> {
        let image = r.image;
        validate_image(&image)?;
        let attestations = self.consensus.read(|s| {
            s.attestations
                .get(&image)
                .map(|m| m.values().cloned().map(Into::into).collect())
                .unwrap_or_default()
        });
        Ok(pb::ListAttestationsResponse { attestations })
    }

    pub async fn list_audit_events(
        &self,
        r: pb::ListAuditEventsRequest,
    ) -> Result<pb::ListAuditEventsResponse, ApiError> {
        let limit = list_limit(r.limit);
        let since = r.since_unix_ms;
        // Newest first: the replicated state's events, then (with a `since`
        // reaching back past them) the ones compaction moved to this node's
        // audit file.
        let (mut events, oldest_in_state): (Vec<domain::AuditEvent>, Option<u64>) = self.consensus.read(|s| {
            (
                s.audit
                    .iter()
                    .rev()
                    .filter(|e| e.at_unix_ms >= since)
                    .take(limit)
                    .cloned()
                    .collect(),
                s.audit.front().map(|e| e.sequence),
            )
        });
        if since > 0 && events.len() < limit {
            // Events that left the state before the read above are in the
            // file once this returns.
            self.consensus
                .audit_flushed()
                .await
                .map_err(|e| ApiError::data_loss(e.to_string()))?;
            let path = self.data_dir.join("audit.jsonl");
            let archived = tokio::task::spawn_blocking(move || crate::audit_log::read(&path))
                .await
                .map_err(|e| ApiError::internal(e.to_string()))?
                .map_err(|e| ApiError::data_loss(e.to_string()))?;
            let older = archived
                .into_iter()
                .rev()
                .map(|l| l.event)
                .filter(|e| e.at_unix_ms >= since && oldest_in_state.is_none_or(|o| e.sequence < o));
            events.extend(older.take(limit - events.len()));
        }
        let events = events.into_iter().map(Into::into).collect();
        Ok(pb::ListAuditEventsResponse { events })
    }

    pub async fn apply_app(&self, who: &Identity, r: pb::ApplyAppRequest) -> Result<pb::ApplyAppResponse, ApiError> {
        let app = r.app.ok_or_else(|| ApiError::invalid_argument("app is required"))?;
        let spec = cutover_shared::convert::app_from_proto(app)?;
        self.consensus.catch_up().await?;
        for (i, c) in spec.clusters.iter().enumerate() {
            let key = c.cluster_ref().to_string();
            if self.consensus.read(|s| !s.agents.contains_key(&key)) {
                return Err(ApiError::invalid_argument(format!(
                    "clusters[{i}]: no agent serves {key}"
                )));
            }
        }
        let params = serde_json::to_value(&spec).unwrap_or_default();
        let cmd = Command::PutApp {
            spec: spec.clone(),
            audit: audit(who, "ApplyApp", params, "accepted"),
        };
        self.consensus.propose(Proposal::Command(cmd)).await?;
        let running_operations = self.running_on(&spec.name);
        Ok(pb::ApplyAppResponse {
            app: Some(spec.into()),
            running_operations,
        })
    }

    pub async fn list_apps(&self, _r: pb::ListAppsRequest) -> Result<pb::ListAppsResponse, ApiError> {
        let apps = self
            .consensus
            .read(|s| s.apps.values().cloned().map(Into::into).collect());
        Ok(pb::ListAppsResponse { apps })
    }

    pub async fn get_app(&self, r: pb::GetAppRequest) -> Result<pb::GetAppResponse, ApiError> {
        let spec = self.app(&r.name)?;
        Ok(pb::GetAppResponse { app: Some(spec.into()) })
    }

    pub async fn deploy(&self, who: &Identity, r: pb::DeployRequest) -> Result<pb::DeployResponse, ApiError> {
        let spec = self.app(&r.app)?;
        validate_image_ref(&r.image)?;
        // The waves: one region, the request's plan, or the app's.
        let waves: Vec<Vec<String>> = if !r.region.is_empty() {
            if !r.waves.is_empty() {
                return Err(ApiError::invalid_argument("give either region or waves, not both"));
            }
            Self::targets(&spec, &r.region, false)?;
            vec![vec![r.region.clone()]]
        } else if !r.waves.is_empty() {
            let waves: Vec<Vec<String>> = r.waves.into_iter().map(|w| w.regions).collect();
            spec.check_waves(&waves, "waves")?;
            waves
        } else {
            spec.effective_waves()
        };
        let targets: Vec<ClusterRef> = waves
            .iter()
            .flatten()
            .flat_map(|region| {
                spec.clusters
                    .iter()
                    .filter(move |c| &c.region == region)
                    .map(|c| c.cluster_ref())
            })
            .collect();
        // The pre-deployment checklist, made enforceable.
        self.consensus.catch_up().await?;
        let missing: Vec<String> = self.consensus.read(|s| {
            spec.required_attestations
                .iter()
                .filter(|(check, want)| {
                    s.attestations
                        .get(&r.image)
                        .and_then(|m| m.get(*check))
                        .is_none_or(|a| &a.value != *want)
                })
                .map(|(check, want)| format!("{check}={want}"))
                .collect()
        });
        if !missing.is_empty() {
            return Err(ApiError::failed_precondition(format!(
                "release {} lacks required attestations: {} (post them with cutover attest)",
                r.image,
                missing.join(", ")
            )));
        }
        let strategy = match pb::Strategy::try_from(r.strategy) {
            Ok(pb::Strategy::Atomic) => Strategy::Atomic,
            Ok(pb::Strategy::Waves | pb::Strategy::Unspecified) => Strategy::Waves,
            Err(_) => return Err(ApiError::invalid_argument("unknown strategy")),
        };
        if r.manual_promotion && r.no_switch {
            return Err(ApiError::invalid_argument(
                "manual promotion gates the switches; with no_switch there is nothing to promote",
            ));
        }
        let op_spec = OperationSpec {
            image: Some(r.image),
            strategy,
            waves,
            // Bake-stage metric checks need a bake step to run in, even
            // when the app asks for no timed bake.
            bake_secs: if spec
                .analysis
                .iter()
                .any(|c| c.stage == cutover_shared::analysis::AnalysisStage::Bake)
            {
                spec.bake_secs.max(1)
            } else {
                spec.bake_secs
            },
            no_switch: r.no_switch,
            promotion: if r.manual_promotion {
                Promotion::Manual
            } else {
                Promotion::Automatic
            },
            ..OperationSpec::default()
        };
        let id = self
            .start_app_operation(who, OperationKind::Deploy, &spec, targets, op_spec)
            .await?;
        Ok(pb::DeployResponse { operation_id: id })
    }

    pub async fn switch(&self, who: &Identity, r: pb::SwitchRequest) -> Result<pb::SwitchResponse, ApiError> {
        let spec = self.app(&r.app)?;
        let targets = Self::targets(&spec, &r.region, true)?;
        self.consensus.catch_up().await?;
        let op_spec = OperationSpec {
            switch_to: self.switch_to(&spec, &targets)?,
            ..OperationSpec::default()
        };
        let id = self
            .start_app_operation(who, OperationKind::Switch, &spec, targets, op_spec)
            .await?;
        Ok(pb::SwitchResponse { operation_id: id })
    }

    pub async fn rollback(&self, who: &Identity, r: pb::RollbackRequest) -> Result<pb::RollbackResponse, ApiError> {
        let spec = self.app(&r.app)?;
        let targets = Self::targets(&spec, &r.region, true)?;
        self.consensus.catch_up().await?;
        let mut op_spec = self.rollback_migrations(&spec, &targets)?;
        op_spec.switch_to = self.switch_to(&spec, &targets)?;
        let id = self
            .start_app_operation(who, OperationKind::Rollback, &spec, targets, op_spec)
            .await?;
        Ok(pb::RollbackResponse { operation_id: id })
    }

    pub async fn health_check(
        &self,
        who: &Identity,
        r: pb::HealthCheckRequest,
    ) -> Result<pb::HealthCheckResponse, ApiError> {
        let spec = self.app(&r.app)?;
        let targets = Self::targets(&spec, &r.region, true)?;
        let id = self
            .start_app_operation(
                who,
                OperationKind::HealthCheck,
                &spec,
                targets,
                OperationSpec::default(),
            )
            .await?;
        Ok(pb::HealthCheckResponse { operation_id: id })
    }

    pub async fn run_analysis(
        &self,
        who: &Identity,
        r: pb::RunAnalysisRequest,
    ) -> Result<pb::RunAnalysisResponse, ApiError> {
        let spec = self.app(&r.app)?;
        if spec.analysis.is_empty() {
            return Err(ApiError::failed_precondition(format!(
                "app {} declares no [[analysis]] checks",
                spec.name
            )));
        }
        let targets = Self::targets(&spec, &r.region, true)?;
        let id = self
            .start_app_operation(who, OperationKind::Analysis, &spec, targets, OperationSpec::default())
            .await?;
        Ok(pb::RunAnalysisResponse { operation_id: id })
    }

    pub async fn promote_operation(
        &self,
        who: &Identity,
        r: pb::PromoteOperationRequest,
    ) -> Result<pb::PromoteOperationResponse, ApiError> {
        let op = self
            .steer(who, &r.operation_id, domain::ControlAction::Promote { gate: r.gate })
            .await?;
        Ok(pb::PromoteOperationResponse { operation: Some(op) })
    }

    pub async fn pause_operation(
        &self,
        who: &Identity,
        r: pb::PauseOperationRequest,
    ) -> Result<pb::PauseOperationResponse, ApiError> {
        let id = r.operation_id;
        let op = self.steer(who, &id, domain::ControlAction::Pause).await?;
        Ok(pb::PauseOperationResponse { operation: Some(op) })
    }

    pub async fn resume_operation(
        &self,
        who: &Identity,
        r: pb::ResumeOperationRequest,
    ) -> Result<pb::ResumeOperationResponse, ApiError> {
        let id = r.operation_id;
        let op = self.steer(who, &id, domain::ControlAction::Resume).await?;
        Ok(pb::ResumeOperationResponse { operation: Some(op) })
    }

    pub async fn abort_operation(
        &self,
        who: &Identity,
        r: pb::AbortOperationRequest,
    ) -> Result<pb::AbortOperationResponse, ApiError> {
        let id = r.operation_id;
        let op = self.steer(who, &id, domain::ControlAction::Abort).await?;
        Ok(pb::AbortOperationResponse { operation: Some(op) })
    }

    pub async fn create_release(
        &self,
        who: &Identity,
        r: pb::CreateReleaseRequest,
    ) -> Result<pb::CreateReleaseResponse, ApiError> {
        let spec = self.app(&r.app)?;
        validate_image_ref(&r.image)?;
        let files = r.migrations.into_iter().map(|f| (f.name, f.content)).collect();
        let bundle = Bundle::parse(files).map_err(|e| ApiError::invalid_argument(e.to_string()))?;
        let release = Release::new(&spec.name, &r.image, &bundle, &who.to_string(), now_unix_ms());
        let params = serde_json::json!({
            "app": spec.name, "image": r.image, "digest": release.digest,
            "files": release.files.iter().map(|f| &f.name).collect::<Vec<_>>(),
        });
        let cmd = Command::CreateRelease {
            release,
            bundle,
            audit: audit(who, "CreateRelease", params, "ok"),
        };
        self.consensus.propose(Proposal::Command(cmd)).await?;
        let release = self
            .consensus
            .read(|s| s.release(&spec.name, &r.image).cloned())
            .ok_or_else(|| ApiError::internal("the release vanished after it was committed"))?;
        Ok(pb::CreateReleaseResponse {
            release: Some(release.into()),
            running_operations: self.running_on(&spec.name),
        })
    }

    pub async fn list_releases(&self, r: pb::ListReleasesRequest) -> Result<pb::ListReleasesResponse, ApiError> {
        let spec = self.app(&r.app)?;
        let mut releases: Vec<Release> = self.consensus.read(|s| {
            s.releases
                .get(&spec.name)
                .map(|r| r.values().cloned().collect())
                .unwrap_or_default()
        });
        releases.sort_by_key(|r| std::cmp::Reverse(r.created_at_unix_ms));
        Ok(pb::ListReleasesResponse {
            releases: releases.into_iter().map(Into::into).collect(),
        })
    }

    pub async fn get_release(&self, r: pb::GetReleaseRequest) -> Result<pb::GetReleaseResponse, ApiError> {
        let spec = self.app(&r.app)?;
        let (release, bundle) = self
            .consensus
            .read(|s| {
                let release = s.release(&spec.name, &r.image)?.clone();
                let bundle = s.bundles.get(&release.digest).cloned().unwrap_or_default();
                Some((release, bundle))
            })
            .ok_or_else(|| ApiError::not_found(format!("app {} has no release {:?}", spec.name, r.image)))?;
        Ok(pb::GetReleaseResponse {
            release: Some(release.into()),
            migrations: bundle
                .files()
                .into_iter()
                .map(|(name, sql)| pb::MigrationFile {
                    name,
                    content: sql.into_bytes(),
                })
                .collect(),
        })
    }

    pub async fn migrate(&self, who: &Identity, r: pb::MigrateRequest) -> Result<pb::MigrateResponse, ApiError> {
        let spec = self.app(&r.app)?;
        let action = match pb::MigrateAction::try_from(r.action) {
            Ok(pb::MigrateAction::Status) => "status",
            Ok(pb::MigrateAction::Plan) => "plan",
            Ok(pb::MigrateAction::Up) => "up",
            Ok(pb::MigrateAction::Down) => "down",
            _ => return Err(ApiError::invalid_argument("action must be status, plan, up or down")),
        };
        if matches!(action, "up" | "down") && r.region.is_empty() && !r.dry_run {
            return Err(ApiError::invalid_argument(format!(
                "{action} changes one region at a time: give a region"
            )));
        }
        let targets = Self::targets(&spec, &r.region, true)?;
        self.consensus.catch_up().await?;
        // The release: the one named, or the app's newest.
        let image = if r.image.is_empty() {
            self.consensus
                .read(|s| {
                    s.releases
                        .get(&spec.name)?
                        .values()
                        .max_by_key(|r| r.created_at_unix_ms)
                        .map(|r| r.image.clone())
                })
                .ok_or_else(|| {
                    ApiError::failed_precondition(format!(
                        "app {} has no release yet (create one with cutover release create)",
                        spec.name
                    ))
                })?
        } else {
            validate_image_ref(&r.image)?;
            r.image.clone()
        };
        let bundle = self
            .consensus
            .read(|s| {
                let release = s.release(&spec.name, &image)?;
                Some(s.bundles.get(&release.digest).cloned().unwrap_or_default())
            })
            .ok_or_else(|| ApiError::not_found(format!("app {} has no release {image:?}", spec.name)))?;
        let versions: Vec<i64> = bundle.migrations.iter().map(|m| m.version).collect();
        match (action, r.target) {
            ("down", None) => {
                return Err(ApiError::invalid_argument(
                    "down needs a target version (0 reverts every migration)",
                ));
            }
            (_, Some(t)) if t != 0 && !versions.contains(&t) => {
                return Err(ApiError::invalid_argument(format!(
                    "target {t} is not a migration of release {image} (it has {versions:?})"
                )));
            }
            ("up", Some(0)) => return Err(ApiError::invalid_argument("up to version 0 would apply nothing")),
            _ => {}
        }
        let op_spec = OperationSpec {
            image: Some(image),
            migrate: Some(MigrateSpec {
                action: MigrateAction::parse(action).unwrap_or(MigrateAction::Status),
                target: r.target,
                dry_run: r.dry_run,
            }),
            ..OperationSpec::default()
        };
        let id = self
            .start_app_operation(who, OperationKind::Migrate, &spec, targets, op_spec)
            .await?;
        Ok(pb::MigrateResponse { operation_id: id })
    }

    /// Whether the agent of `t` runs tasks of `kind`.
    fn agent_offers(&self, t: &ClusterRef, kind: TaskKind) -> bool {
        self.consensus.read(|s| {
            s.agents
                .get(&t.to_string())
                .is_some_and(|a| a.task_kinds.iter().any(|k| k == kind.as_str()))
        })
    }

    /// Refuses targets whose agent cannot back up (no `[backup]` store in
    /// its config, so it does not offer `db.backup`).
    fn check_backup_store(&self, targets: &[ClusterRef]) -> Result<(), ApiError> {
        for t in targets {
            if !self.agent_offers(t, TaskKind::DbBackup) {
                return Err(ApiError::failed_precondition(format!(
                    "the agent for {t} has no backup store (add a [backup] section to its config)"
                )));
            }
        }
        Ok(())
    }

    fn backup(&self, id: &str) -> Result<BackupEntry, ApiError> {
        validate_backup_id(id)?;
        self.consensus
            .read(|s| s.backups.get(id).cloned())
            .ok_or_else(|| ApiError::not_found(format!("no backup {id}")))
    }

    pub async fn create_backup(
        &self,
        who: &Identity,
        r: pb::CreateBackupRequest,
    ) -> Result<pb::CreateBackupResponse, ApiError> {
        let spec = self.app(&r.app)?;
        let targets = Self::targets(&spec, &r.region, true)?;
        self.consensus.catch_up().await?;
        self.check_backup_store(&targets)?;
        let op_spec = OperationSpec {
            backup: Some(Box::new(BackupSpec::new(BackupAction::Create))),
            ..OperationSpec::default()
        };
        let id = self
            .start_app_operation(who, OperationKind::Backup, &spec, targets, op_spec)
            .await?;
        Ok(pb::CreateBackupResponse { operation_id: id })
    }

    pub async fn list_backups(&self, r: pb::ListBackupsRequest) -> Result<pb::ListBackupsResponse, ApiError> {
        if !r.app.is_empty() {
            validate_name("app", &r.app)?;
        }
        if !r.region.is_empty() {
            validate_name("region", &r.region)?;
        }
        let mut backups: Vec<BackupEntry> = self.consensus.read(|s| {
            s.backups
                .values()
                .filter(|b| r.app.is_empty() || b.app == r.app)
                .filter(|b| r.region.is_empty() || b.cluster.region == r.region)
                .cloned()
                .collect()
        });
        backups.sort_by(|a, b| (b.finished_at_unix_ms, &b.id).cmp(&(a.finished_at_unix_ms, &a.id)));
        backups.truncate(list_limit(r.limit));
        Ok(pb::ListBackupsResponse {
            backups: backups.into_iter().map(Into::into).collect(),
        })
    }

    pub async fn get_backup(&self, r: pb::GetBackupRequest) -> Result<pb::GetBackupResponse, ApiError> {
        Ok(pb::GetBackupResponse {
            backup: Some(self.backup(&r.id)?.into()),
        })
    }

    /// Starts a validate or restore of backup `id` on the cluster it was
    /// taken in (where its store and keys are).
    async fn read_backup(&self, who: &Identity, id: &str, action: BackupAction) -> Result<String, ApiError> {
        let entry = self.backup(id)?;
        let spec = self.app(&entry.app)?;
        if spec.cluster(&entry.cluster).is_none() {
            return Err(ApiError::failed_precondition(format!(
                "app {} no longer runs in {}, where backup {id} was taken",
                entry.app, entry.cluster
            )));
        }
        let targets = vec![entry.cluster.clone()];
        self.consensus.catch_up().await?;
        self.check_backup_store(&targets)?;
        if action == BackupAction::RestorePrimary {
            let t = &targets[0];
            if !self.agent_offers(t, TaskKind::AppMaintenance) {
                return Err(ApiError::failed_precondition(format!(
                    "the agent for {t} cannot put {} in maintenance (upgrade it first)",
                    entry.app
                )));
            }
        }
        let op_spec = OperationSpec {
            backup: Some(Box::new(BackupSpec {
                backup_id: Some(entry.id),
                object: Some(entry.object),
                table_rows: entry.table_rows,
                // Onto the primary, the backup taken first is a safety net.
                trigger: if action == BackupAction::RestorePrimary {
                    BackupTrigger::Safety
                } else {
                    BackupTrigger::Manual
                },
                ..BackupSpec::new(action)
            })),
            ..OperationSpec::default()
        };
        self.start_app_operation(who, OperationKind::Backup, &spec, targets, op_spec)
            .await
    }

    pub async fn validate_backup(
        &self,
        who: &Identity,
        r: pb::ValidateBackupRequest,
    ) -> Result<pb::ValidateBackupResponse, ApiError> {
        let id = self.read_backup(who, &r.id, BackupAction::Validate).await?;
        Ok(pb::ValidateBackupResponse { operation_id: id })
    }

    pub async fn restore_backup(
        &self,
        who: &Identity,
        r: pb::RestoreBackupRequest,
    ) -> Result<pb::RestoreBackupResponse, ApiError> {
        let action = match pb::RestoreTarget::try_from(r.to) {
            Ok(pb::RestoreTarget::Scratch) => BackupAction::Restore,
            Ok(pb::RestoreTarget::Primary) => {
                self.backup(&r.id)?;
                if !r.confirm {
                    return Err(ApiError::failed_precondition(format!(
                        "restoring backup {} onto the primary replaces its data: the app goes into maintenance \
                         and a safety backup is taken first; repeat with confirm (cutover backup restore {} \
                         --to primary --confirm)",
                        r.id, r.id
                    )));
                }
                BackupAction::RestorePrimary
            }
            _ => return Err(ApiError::invalid_argument("to must be scratch or primary")),
        };
        let id = self.read_backup(who, &r.id, action).await?;
        Ok(pb::RestoreBackupResponse { operation_id: id })
    }

    pub async fn delete_backup(
        &self,
        who: &Identity,
        r: pb::DeleteBackupRequest,
    ) -> Result<pb::DeleteBackupResponse, ApiError> {
        let entry = self.backup(&r.id)?;
        if let Some(until) = entry.locked_until(now_unix_ms()) {
            return Err(ApiError::failed_precondition(format!(
                "backup {} is under Object Lock until {} and cannot be deleted before then",
                entry.id,
                backup::format_unix_ms(until)
            )));
        }
        if !r.force {
            let newest_validated = self.consensus.read(|s| {
                backup::newest_validated(
                    s.backups
                        .values()
                        .filter(|b| b.app == entry.app && b.cluster == entry.cluster),
                )
                .map(|b| b.id.clone())
            });
            if newest_validated.as_deref() == Some(entry.id.as_str()) {
                return Err(ApiError::failed_precondition(format!(
                    "backup {} is the newest of {} in {} that passed validation; repeat with force to delete it \
                     anyway (cutover backup delete {} --force)",
                    entry.id, entry.app, entry.cluster, entry.id
                )));
            }
        }
        let spec = self.app(&entry.app)?;
        let targets = vec![entry.cluster.clone()];
        self.consensus.catch_up().await?;
        self.check_backup_store(&targets)?;
        let op_spec = OperationSpec {
            backup: Some(Box::new(BackupSpec {
                delete: std::collections::BTreeMap::from([(entry.id.clone(), entry.object)]),
                ..BackupSpec::new(BackupAction::Delete)
            })),
            ..OperationSpec::default()
        };
        let id = self
            .start_app_operation(who, OperationKind::Backup, &spec, targets, op_spec)
            .await?;
        Ok(pb::DeleteBackupResponse { operation_id: id })
    }

    pub async fn set_backup_schedule(
        &self,
        who: &Identity,
        r: pb::SetBackupScheduleRequest,
    ) -> Result<pb::SetBackupScheduleResponse, ApiError> {
        let spec = self.app(&r.app)?;
        let region = (!r.region.is_empty()).then(|| r.region.clone());
        // Refuses a region the app does not run in.
        Self::targets(&spec, &r.region, true)?;
        backup::parse_cron(&r.cron)?;
        let retention = if r.retention.is_empty() {
            RetentionPolicy::default()
        } else {
            RetentionPolicy::parse(&r.retention)?
        };
        let now = now_unix_ms();
        let schedule = BackupSchedule {
            app: spec.name.clone(),
            region,
            cron: r.cron.clone(),
            retention,
            validate: r.validate,
            updated_by: who.to_string(),
            updated_at_unix_ms: now,
            // From now on: setting a schedule never starts a past slot.
            last_slot_unix_ms: now,
        };
        let params = serde_json::json!({
            "app": spec.name, "region": r.region, "cron": r.cron, "retention": retention.to_string(),
            "validate": r.validate,
        });
        self.consensus
            .propose(Proposal::Command(Command::PutBackupSchedule {
                schedule,
                audit: audit(who, "SetBackupSchedule", params, "ok"),
            }))
            .await?;
        let stored = self
            .consensus
            .read(|s| s.backup_schedules.get(&spec.name).cloned())
            .ok_or_else(|| ApiError::unavailable("the schedule is not applied on this node yet"))?;
        Ok(pb::SetBackupScheduleResponse {
            schedule: Some(schedule_proto(stored)),
        })
    }

    pub async fn list_backup_schedules(
        &self,
        _r: pb::ListBackupSchedulesRequest,
    ) -> Result<pb::ListBackupSchedulesResponse, ApiError> {
        let schedules: Vec<BackupSchedule> = self.consensus.read(|s| s.backup_schedules.values().cloned().collect());
        Ok(pb::ListBackupSchedulesResponse {
            schedules: schedules.into_iter().map(schedule_proto).collect(),
        })
    }

    pub async fn delete_backup_schedule(
        &self,
        who: &Identity,
        r: pb::DeleteBackupScheduleRequest,
    ) -> Result<pb::DeleteBackupScheduleResponse, ApiError> {
        validate_name("app", &r.app)?;
        self.consensus.catch_up().await?;
        if !self.consensus.read(|s| s.backup_schedules.contains_key(&r.app)) {
            return Err(ApiError::not_found(format!("app {:?} has no backup schedule", r.app)));
        }
        self.consensus
            .propose(Proposal::Command(Command::DeleteBackupSchedule {
                app: r.app.clone(),
                audit: audit(who, "DeleteBackupSchedule", serde_json::json!({ "app": r.app }), "ok"),
            }))
            .await?;
        Ok(pb::DeleteBackupScheduleResponse {})
    }
}

fn schedule_proto(s: BackupSchedule) -> pb::BackupSchedule {
    let next = backup::parse_cron(&s.cron)
        .ok()
        .and_then(|c| backup::next_slot(&c, s.last_slot_unix_ms.max(now_unix_ms())))
        .unwrap_or(0);
    pb::BackupSchedule {
        app: s.app,
        region: s.region.unwrap_or_default(),
        cron: s.cron,
        retention: s.retention.to_string(),
        validate: s.validate,
        updated_by: s.updated_by,
        updated_at_unix_ms: s.updated_at_unix_ms,
        last_slot_unix_ms: s.last_slot_unix_ms,
        next_slot_unix_ms: next,
    }
}
