//! Operator verbs: thin wrappers over `ControlService` with text and JSON output.

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use cutover_shared::proto as pb;
use serde_json::json;

use crate::client::{ConnOpts, Output, call};

#[derive(Subcommand)]
pub enum Verb {
    /// Coordinator cluster membership and progress.
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
        #[command(flatten)]
        conn: ConnOpts,
    },
    /// The web console: serves it on loopback, acting with your
    /// certificate (an operator's may promote, pause, resume, abort and roll
    /// back; a viewer's is read-only), and prints its URL.
    Ui {
        /// Where to serve it (a loopback address; port 0 picks one).
        #[arg(long, default_value = "127.0.0.1:8480")]
        listen: String,
        #[command(flatten)]
        conn: ConnOpts,
    },
    /// Agents and their liveness.
    Agents {
        #[command(subcommand)]
        cmd: AgentsCmd,
        #[command(flatten)]
        conn: ConnOpts,
    },
    /// Per region and cluster: agent state (apps arrive with deploys).
    Status {
        #[arg(long)]
        app: Option<String>,
        #[command(flatten)]
        conn: ConnOpts,
    },
    /// Operations: list, get, watch.
    Operations {
        #[command(subcommand)]
        cmd: OperationsCmd,
        #[command(flatten)]
        conn: ConnOpts,
    },
    /// Run one ad-hoc task on one cluster's agent (diagnostics: noop, echo).
    Task {
        #[command(subcommand)]
        cmd: TaskCmd,
        #[command(flatten)]
        conn: ConnOpts,
    },
    /// Record CI facts about a release image: --check tests=passed.
    Attest {
        #[arg(long)]
        image: String,
        #[arg(long = "check", required = true)]
        checks: Vec<String>,
        #[command(flatten)]
        conn: ConnOpts,
    },
    /// Releases: an image with the migrations it expects.
    Release {
        #[command(subcommand)]
        cmd: crate::migrate::ReleaseCmd,
        #[command(flatten)]
        conn: ConnOpts,
    },
    /// Backups of an app's databases: create, list, get, validate, restore.
    Backup {
        #[command(subcommand)]
        cmd: crate::backup::BackupCmd,
        #[command(flatten)]
        conn: ConnOpts,
    },
    /// An app's metric checks (`[[analysis]]`): run them now.
    Analysis {
        #[command(subcommand)]
        cmd: AnalysisCmd,
        #[command(flatten)]
        conn: ConnOpts,
    },
    /// Disaster recovery: each region's database role and lag, and the
    /// failover runbook.
    Dr {
        #[command(subcommand)]
        cmd: crate::dr::DrCmd,
        #[command(flatten)]
        conn: ConnOpts,
    },
    /// Database migrations against each region's primary: status, plan, up, down.
    Migrate {
        #[command(subcommand)]
        cmd: crate::migrate::MigrateCmd,
        #[command(flatten)]
        conn: ConnOpts,
    },
    /// Apps: apply a definition, list, get.
    Apps {
        #[command(subcommand)]
        cmd: AppsCmd,
        #[command(flatten)]
        conn: ConnOpts,
    },
    /// Deploy an image to the inactive color, run the gates, switch when they pass.
    Deploy {
        #[arg(long)]
        app: String,
        #[arg(long)]
        image: String,
        #[arg(long)]
        region: Option<String>,
        /// Deploy and check, but leave traffic where it is.
        #[arg(long)]
        no_switch: bool,
        /// Waves overriding the app's: regions joined by ',' within a wave,
        /// waves separated by ':' (e.g. us-east:eu-west,ap-south).
        #[arg(long)]
        waves: Option<String>,
        /// `waves` (default) or `atomic`.
        #[arg(long, default_value = "waves")]
        strategy: String,
        /// Wait for `cutover promote` before each wave's switch (before the
        /// one switch of an atomic cutover).
        #[arg(long)]
        manual_promotion: bool,
        /// Return the operation id at once instead of following it.
        #[arg(long)]
        detach: bool,
        #[command(flatten)]
        conn: ConnOpts,
    },
    /// Pass a manual promotion gate of a running cutover.
    Promote {
        /// The operation id.
        operation: String,
        /// Only this gate (1-based; gate N precedes wave N's switch). Default:
        /// the gate the operation waits at.
        #[arg(long, default_value_t = 0)]
        gate: u32,
        #[command(flatten)]
        conn: ConnOpts,
    },
    /// Start no new step of an operation until `cutover resume`.
    Pause {
        operation: String,
        #[command(flatten)]
        conn: ConnOpts,
    },
    /// Let a paused operation go on.
    Resume {
        operation: String,
        #[command(flatten)]
        conn: ConnOpts,
    },
    /// Stop an operation and switch back every region it switched.
    Abort {
        operation: String,
        #[command(flatten)]
        conn: ConnOpts,
    },
    /// Switch traffic to the other color.
    Switch {
        #[arg(long)]
        app: String,
        #[arg(long)]
        region: Option<String>,
        #[arg(long)]
        detach: bool,
        #[command(flatten)]
        conn: ConnOpts,
    },
    /// Switch traffic back to the previous color.
    Rollback {
        #[arg(long)]
        app: String,
        #[arg(long)]
        region: Option<String>,
        #[arg(long)]
        detach: bool,
        #[command(flatten)]
        conn: ConnOpts,
    },
    /// Run the health gates against the inactive color now and print each result.
    HealthCheck {
        #[arg(long)]
        app: String,
        #[arg(long)]
        region: Option<String>,
        #[command(flatten)]
        conn: ConnOpts,
    },
    /// The audit trail, newest first.
    Audit {
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Only events this recent (`90s`, `30m`, `24h`, `30d`); reaches back
        /// past the replicated state into the node's audit file.
        #[arg(long, value_parser = parse_since)]
        since: Option<i64>,
        #[command(flatten)]
        conn: ConnOpts,
    },
}

#[derive(Subcommand)]
pub enum ClusterCmd {
    Status,
    /// Add a coordinator node (learner first, then voter).
    AddNode {
        #[arg(long)]
        id: u64,
        #[arg(long)]
        address: String,
    },
    /// Remove a coordinator node.
    RemoveNode {
        #[arg(long)]
        id: u64,
    },
    /// Hand the leadership to another voter (before stopping the leader
    /// for maintenance or an upgrade); returns once it leads.
    TransferLeader {
        /// The node to lead.
        #[arg(long)]
        to: u64,
    },
}

#[derive(Subcommand)]
pub enum AppsCmd {
    /// Declare or replace an app from a TOML file.
    Apply {
        #[arg(long, short = 'f')]
        file: std::path::PathBuf,
    },
    List,
    Get {
        name: String,
    },
}

#[derive(Subcommand)]
pub enum AnalysisCmd {
    /// Run every metric check of the app now against the serving color of
    /// each region (or of one) and print each check's values.
    Run {
        #[arg(long)]
        app: String,
        /// One region; default every region the app runs in.
        #[arg(long)]
        region: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum AgentsCmd {
    List,
}

#[derive(Subcommand)]
pub enum OperationsCmd {
    List {
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    Get {
        id: String,
    },
    /// Follow an operation until it finishes; exits non-zero if it failed.
    Watch {
        id: String,
    },
}

#[derive(Subcommand)]
pub enum TaskCmd {
    Run {
        #[arg(long)]
        region: String,
        #[arg(long)]
        cluster: String,
        #[arg(long, default_value = "echo")]
        kind: String,
        /// key=value, repeatable.
        #[arg(long = "param")]
        params: Vec<String>,
        /// Return at once instead of following the task.
        #[arg(long)]
        detach: bool,
    },
}

fn kv(items: &[String], what: &str) -> Result<std::collections::HashMap<String, String>> {
    items
        .iter()
        .map(|s| match s.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => bail!("{what} {s:?} is not key=value"),
        })
        .collect()
}

fn state_name(s: i32) -> &'static str {
    match pb::TaskState::try_from(s).unwrap_or(pb::TaskState::Unspecified) {
        pb::TaskState::Pending => "pending",
        pb::TaskState::Running => "running",
        pb::TaskState::Succeeded => "succeeded",
        pb::TaskState::Failed => "failed",
        pb::TaskState::Unspecified => "unknown",
    }
}

fn agent_state(s: i32) -> &'static str {
    match pb::AgentState::try_from(s).unwrap_or(pb::AgentState::Unspecified) {
        pb::AgentState::Up => "up",
        pb::AgentState::Down => "down",
        pb::AgentState::Unspecified => "unknown",
    }
}

fn members_json(m: &[pb::ClusterMember]) -> serde_json::Value {
    json!(
        m.iter()
            .map(|m| json!({
                "node_id": m.node_id, "address": m.address, "leader": m.leader,
                "feature_level": (m.feature_level > 0).then_some(m.feature_level),
                "role": if m.role == pb::MemberRole::Voter as i32 { "voter" } else { "learner" },
            }))
            .collect::<Vec<_>>()
    )
}

/// `cluster status -o json`, and the console's view of the coordinators.
pub(crate) fn cluster_status_json(s: &pb::GetClusterStatusResponse) -> serde_json::Value {
    json!({
        "node_id": s.node_id, "leader_id": s.leader_id, "term": s.term, "server_state": s.server_state,
        "last_log_index": s.last_log_index, "commit_index": s.commit_index, "applied_index": s.applied_index,
        "snapshot_index": s.snapshot_index, "purged_index": s.purged_index, "members": members_json(&s.members),
        "clock_term": s.clock_term,
    })
}

pub(crate) fn agent_json(a: &pb::Agent) -> serde_json::Value {
    let c = a.cluster.clone().unwrap_or_default();
    json!({"region": c.region, "cluster": c.cluster, "state": agent_state(a.state), "since_unix_ms": a.since_unix_ms, "version": a.agent_version, "task_kinds": a.task_kinds})
}

/// `status -o json`: each cluster's agent and, for one app, its colors.
pub(crate) fn status_json(r: &pb::GetStatusResponse) -> serde_json::Value {
    let v: Vec<_> = r
        .clusters
        .iter()
        .map(|s| {
            let c = s.cluster.clone().unwrap_or_default();
            let mut v = json!({"region": c.region, "cluster": c.cluster, "agent": agent_state(s.agent_state)});
            if let Some(a) = &s.app {
                v["active"] = json!(color_name(a.active));
                v["last_switch_unix_ms"] = json!(a.last_switch_unix_ms);
                v["maintenance"] = json!(a.maintenance);
                v["colors"] = json!(
                    a.colors
                        .iter()
                        .map(|k| json!({
                            "color": color_name(k.color), "image": k.image, "replicas_ready": k.replicas_ready,
                            "replicas_desired": k.replicas_desired, "healthy": k.healthy,
                        }))
                        .collect::<Vec<_>>()
                );
            }
            v
        })
        .collect();
    json!({"leader_id": r.leader_id, "clusters": v})
}

pub(crate) fn audit_json(e: &pb::AuditEvent) -> serde_json::Value {
    json!({"sequence": e.sequence, "at_unix_ms": e.at_unix_ms, "actor": e.actor, "action": e.action, "parameters": e.parameters, "outcome": e.outcome})
}

fn print_members(m: &[pb::ClusterMember]) {
    println!("{:<6} {:<24} {:<8} {:<6} LEADER", "NODE", "ADDRESS", "ROLE", "LEVEL");
    for m in m {
        let role = if m.role == pb::MemberRole::Voter as i32 {
            "voter"
        } else {
            "learner"
        };
        // Unknown: an older release, or a member this node has not heard.
        let level = match m.feature_level {
            0 => "-".to_owned(),
            l => l.to_string(),
        };
        println!(
            "{:<6} {:<24} {:<8} {:<6} {}",
            m.node_id,
            m.address,
            role,
            level,
            if m.leader { "*" } else { "" }
        );
    }
}

pub fn operation_json(o: &pb::Operation) -> serde_json::Value {
    json!({
        "id": o.id, "kind": kind_name(o.kind), "app": o.app, "state": state_name(o.state), "created_by": o.created_by,
        "params": o.params, "paused": o.paused, "promoted_gates": o.promoted_gates,
        "awaiting_gate": (o.awaiting_gate > 0).then_some(o.awaiting_gate),
        "aborted_by": (!o.aborted_by.is_empty()).then_some(&o.aborted_by),
        "created_at_unix_ms": o.created_at_unix_ms, "updated_at_unix_ms": o.updated_at_unix_ms,
        "summary": o.summary,
        "tasks": o.tasks.iter().map(|t| {
            let spec = t.task.clone().unwrap_or_default();
            let target = spec.target.clone().unwrap_or_default();
            json!({
                "task_id": spec.task_id, "kind": spec.kind, "target": format!("{}/{}", target.region, target.cluster),
                "state": state_name(t.state), "dispatch_count": t.dispatch_count,
                "created_at_unix_ms": t.created_at_unix_ms,
                "finished_at_unix_ms": t.result.as_ref().map(|r| r.finished_at_unix_ms).filter(|&ms| ms > 0),
                "progress": t.progress.iter().map(|p| json!({"at_unix_ms": p.at_unix_ms, "message": p.message})).collect::<Vec<_>>(),
                "result": t.result.as_ref().map(|r| json!({"success": r.success, "message": r.message, "outputs": r.outputs, "replayed": r.replayed})),
            })
        }).collect::<Vec<_>>(),
    })
}

fn print_operation(o: &pb::Operation) {
    print_operation_new(o, &mut std::collections::HashSet::new(), &Progress { bars: None });
}

/// Prints the lines of `o` not printed before (tracked in `seen`), so a
/// watched operation reads as a log of what happened.
fn print_operation_new(o: &pb::Operation, seen: &mut std::collections::HashSet<String>, progress: &Progress) {
    let mut line = |key: String, text: String| {
        if seen.insert(key) {
            progress.println(&text);
        }
    };
    line(
        format!("op {}", o.id),
        format!("operation {}  {}  by {}", o.id, kind_name(o.kind), o.created_by),
    );
    for t in &o.tasks {
        let spec = t.task.clone().unwrap_or_default();
        let target = spec.target.clone().unwrap_or_default();
        let at = format!("{}/{}", target.region, target.cluster);
        line(format!("task {}", spec.task_id), format!("  {} on {at}", spec.kind));
        for p in &t.progress {
            line(
                format!("p {} {} {}", spec.task_id, p.at_unix_ms, p.message),
                format!("    - {}", p.message),
            );
        }
        if let Some(r) = &t.result {
            let took = (r.finished_at_unix_ms - t.created_at_unix_ms).max(0);
            let took = if t.created_at_unix_ms > 0 {
                format!(" ({took} ms)")
            } else {
                String::new()
            };
            line(
                format!("r {}", spec.task_id),
                format!("    {} {}{took}", if r.success { "ok:" } else { "FAILED:" }, r.message),
            );
        }
    }
    if !finished(o) {
        let n = o.tasks.len();
        if o.awaiting_gate > 0 {
            line(
                format!("gate {}", o.awaiting_gate),
                format!(
                    "  waiting at promotion gate {}: cutover promote {}",
                    o.awaiting_gate, o.id
                ),
            );
        }
        if o.paused {
            line(format!("paused {n}"), format!("  paused: cutover resume {}", o.id));
        }
        if !o.aborted_by.is_empty() {
            line("aborted".into(), format!("  aborted by {}; rolling back", o.aborted_by));
        }
    }
    if finished(o) {
        line(
            format!("end {}", o.id),
            format!("operation {}: {}", state_name(o.state), o.summary),
        );
    }
}

/// What `promote`, `pause`, `resume` and `abort` ask of an operation.
#[derive(Clone, Copy)]
enum Steer {
    Promote(u32),
    Pause,
    Resume,
    Abort,
}

/// Sends one steering call for operation `id` and prints the operation as
/// it then is.
async fn steer(conn: &ConnOpts, id: &str, action: Steer) -> Result<()> {
    let op = call(conn, |mut c| {
        let operation_id = id.to_owned();
        async move {
            let op = match action {
                Steer::Promote(gate) => {
                    let req = pb::PromoteOperationRequest { operation_id, gate };
                    c.promote_operation(req).await?.into_inner().operation
                }
                Steer::Pause => {
                    let req = pb::PauseOperationRequest { operation_id };
                    c.pause_operation(req).await?.into_inner().operation
                }
                Steer::Resume => {
                    let req = pb::ResumeOperationRequest { operation_id };
                    c.resume_operation(req).await?.into_inner().operation
                }
                Steer::Abort => {
                    let req = pb::AbortOperationRequest { operation_id };
                    c.abort_operation(req).await?.into_inner().operation
                }
            };
            Ok(tonic::Response::new(op))
        }
    })
    .await?;
    let what = match action {
        Steer::Promote(_) => "promoted",
        Steer::Pause => "paused",
        Steer::Resume => "resumed",
        Steer::Abort => "aborting (switching back what it switched)",
    };
    print_steered(conn, op, what)
}

/// Prints an operation after a promote / pause / resume / abort.
fn print_steered(conn: &ConnOpts, op: Option<pb::Operation>, what: &str) -> Result<()> {
    let op = op.context("the coordinator returned no operation")?;
    if conn.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&operation_json(&op))?);
    } else {
        println!("operation {}: {what}", op.id);
        if !op.promoted_gates.is_empty() {
            let gates: Vec<String> = op.promoted_gates.iter().map(u32::to_string).collect();
            println!("  promotion gates passed: {}", gates.join(", "));
        }
    }
    Ok(())
}

fn kind_name(k: i32) -> &'static str {
    match pb::OperationKind::try_from(k).unwrap_or(pb::OperationKind::Unspecified) {
        pb::OperationKind::Task => "task",
        pb::OperationKind::Deploy => "deploy",
        pb::OperationKind::Switch => "switch",
        pb::OperationKind::Rollback => "rollback",
        pb::OperationKind::HealthCheck => "health-check",
        pb::OperationKind::Analysis => "analysis",
        pb::OperationKind::Migrate => "migrate",
        pb::OperationKind::Backup => "backup",
        pb::OperationKind::Failover => "failover",
        pb::OperationKind::Drill => "drill",
        pb::OperationKind::Unspecified => "operation",
    }
}

fn finished(o: &pb::Operation) -> bool {
    o.state == pb::TaskState::Succeeded as i32 || o.state == pb::TaskState::Failed as i32
}

/// Live progress while an operation runs: on a terminal, a spinner per
/// cluster (its current task and latest progress, updated in place) below
/// the operation's lines; piped, only the lines.
struct Progress {
    bars: Option<(
        indicatif::MultiProgress,
        std::collections::BTreeMap<String, indicatif::ProgressBar>,
    )>,
}

impl Progress {
    fn new(text: bool) -> Progress {
        use std::io::IsTerminal;
        Progress {
            bars: (text && std::io::stdout().is_terminal()).then(|| {
                (
                    indicatif::MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::stdout()),
                    Default::default(),
                )
            }),
        }
    }

    /// A line above the bars (or plain on a pipe).
    fn println(&self, text: &str) {
        match &self.bars {
            Some((multi, _)) => {
                let _ = multi.println(text);
            }
            None => println!("{text}"),
        }
    }

    /// Each cluster's bar shows its newest task: running (with its last
    /// progress message), or how it ended.
    fn update(&mut self, o: &pb::Operation) {
        let Some((multi, bars)) = &mut self.bars else { return };
        let done = finished(o);
        for t in &o.tasks {
            let spec = t.task.clone().unwrap_or_default();
            let target = spec.target.clone().unwrap_or_default();
            let at = format!("{}/{}", target.region, target.cluster);
            let bar = bars.entry(at.clone()).or_insert_with(|| {
                let b = multi.add(indicatif::ProgressBar::new_spinner());
                b.set_style(
                    indicatif::ProgressStyle::with_template("{spinner} {prefix:<24} {elapsed:>4} {wide_msg}")
                        .expect("a valid template"),
                );
                b.set_prefix(at.clone());
                b.enable_steady_tick(std::time::Duration::from_millis(120));
                b
            });
            let msg = match &t.result {
                Some(r) => format!("{} {}", spec.kind, if r.success { "ok" } else { "FAILED" }),
                None => match t.progress.last() {
                    Some(p) => format!("{}: {}", spec.kind, p.message),
                    None => format!("{} running", spec.kind),
                },
            };
            bar.set_message(msg);
        }
        if done {
            for b in bars.values() {
                b.finish();
            }
        }
    }
}

/// Follows an operation to its end; true if it succeeded.
async fn watch(conn: &ConnOpts, id: &str) -> Result<bool> {
    let mut last: Option<pb::Operation> = None;
    let mut seen = std::collections::HashSet::new();
    let mut progress = Progress::new(conn.output == Output::Text);
    for (addr, mut client) in conn.clients()? {
        let stream = client
            .watch_operation(pb::WatchOperationRequest {
                operation_id: id.to_owned(),
            })
            .await;
        let mut stream = match stream {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == tonic::Code::Unavailable => continue,
            Err(s) => bail!("{}: {}", crate::client::code_name(s.code()), s.message()),
        };
        loop {
            match stream.message().await {
                Ok(Some(update)) => {
                    let Some(op) = update.operation else { continue };
                    if conn.output == Output::Text {
                        print_operation_new(&op, &mut seen, &progress);
                        progress.update(&op);
                    }
                    let done = finished(&op);
                    last = Some(op);
                    if done {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    eprintln!("lost {addr}: {}; trying another node", e.message());
                    break;
                }
            }
        }
        if last.as_ref().is_some_and(finished) {
            break;
        }
    }
    let Some(op) = last else {
        bail!("no coordinator reachable to watch {id}")
    };
    if conn.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&operation_json(&op))?);
    }
    Ok(op.state == pb::TaskState::Succeeded as i32)
}

fn color_name(c: i32) -> &'static str {
    match pb::Color::try_from(c).unwrap_or(pb::Color::Unspecified) {
        pb::Color::Blue => "blue",
        pb::Color::Green => "green",
        pb::Color::Unspecified => "-",
    }
}

pub(crate) fn app_json(a: pb::App) -> Result<serde_json::Value> {
    let spec = cutover_shared::convert::app_from_proto(a)?;
    Ok(serde_json::to_value(spec)?)
}

/// Starts an operation with `start`, then follows it unless detached.
async fn start_and_follow<F, Fut>(conn: &ConnOpts, detach: bool, start: F) -> Result<ExitCode>
where
    F: Fn(ControlClient) -> Fut,
    Fut: std::future::Future<Output = Result<String, tonic::Status>>,
{
    let id = crate::client::call(conn, |c| {
        let fut = start(c);
        async move { fut.await.map(tonic::Response::new) }
    })
    .await?;
    if detach {
        if conn.output == Output::Json {
            println!("{}", json!({ "operation_id": id }));
        } else {
            println!("{id}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    Ok(if watch(conn, &id).await? {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

type ControlClient = cutover_shared::proto::control_service_client::ControlServiceClient<tonic::transport::Channel>;

pub async fn run(v: Verb) -> Result<ExitCode> {
    match v {
        Verb::Ui { listen, conn } => crate::ui::run(&listen, conn).await?,
        Verb::Cluster { cmd, conn } => match cmd {
            ClusterCmd::Status => {
                let s = call(&conn, |mut c| async move {
                    c.get_cluster_status(pb::GetClusterStatusRequest {}).await
                })
                .await?;
                if conn.output == Output::Json {
                    println!("{}", serde_json::to_string_pretty(&cluster_status_json(&s))?);
                } else {
                    println!(
                        "answered by node {} ({}), leader {}, term {}",
                        s.node_id, s.server_state, s.leader_id, s.term
                    );
                    println!(
                        "log: last {} committed {} applied {} snapshot {} purged {}",
                        s.last_log_index, s.commit_index, s.applied_index, s.snapshot_index, s.purged_index
                    );
                    print_members(&s.members);
                    if s.clock_term == 0 {
                        println!(
                            "cluster clock: no tick applied on this node yet (a member runs a release without \
                             the clock, or this node has not caught up)"
                        );
                    } else {
                        println!("cluster clock: last ticked in term {}", s.clock_term);
                    }
                }
                if s.leader_id == 0 {
                    eprintln!("error: no leader");
                    return Ok(ExitCode::FAILURE);
                }
            }
            ClusterCmd::AddNode { id, address } => {
                let r = call(&conn, |mut c| {
                    let address = address.clone();
                    async move { c.add_node(pb::AddNodeRequest { node_id: id, address }).await }
                })
                .await?;
                if conn.output == Output::Json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&json!({"members": members_json(&r.members)}))?
                    );
                } else {
                    println!("node {id} added");
                    print_members(&r.members);
                }
            }
            ClusterCmd::RemoveNode { id } => {
                let r = call(&conn, |mut c| async move {
                    c.remove_node(pb::RemoveNodeRequest { node_id: id }).await
                })
                .await?;
                if conn.output == Output::Json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&json!({"members": members_json(&r.members)}))?
                    );
                } else {
                    println!("node {id} removed");
                    print_members(&r.members);
                }
            }
            ClusterCmd::TransferLeader { to } => {
                let r = call(&conn, |mut c| async move {
                    c.transfer_leadership(pb::TransferLeadershipRequest { node_id: to })
                        .await
                })
                .await?;
                if conn.output == Output::Json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&json!({"leader_id": r.leader_id, "term": r.term}))?
                    );
                } else {
                    println!("node {} leads (term {})", r.leader_id, r.term);
                }
            }
        },
        Verb::Agents {
            cmd: AgentsCmd::List,
            conn,
        } => {
            let agents = crate::client::list_all_agents(&conn.clients()?)
                .await
                .map_err(crate::client::failure_error)?;
            if conn.output == Output::Json {
                let v: Vec<_> = agents.iter().map(agent_json).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{:<12} {:<16} {:<6} VERSION", "REGION", "CLUSTER", "STATE");
                for a in &agents {
                    let c = a.cluster.clone().unwrap_or_default();
                    println!(
                        "{:<12} {:<16} {:<6} {}",
                        c.region,
                        c.cluster,
                        agent_state(a.state),
                        a.agent_version
                    );
                }
            }
        }
        Verb::Status { app, conn } => {
            let app = app.unwrap_or_default();
            // Page by page: a fleet can be larger than one message.
            let mut r = pb::GetStatusResponse::default();
            let mut token = String::new();
            loop {
                let page = call(&conn, |mut c| {
                    let (app, page_token) = (app.clone(), token.clone());
                    async move {
                        c.get_status(pb::GetStatusRequest {
                            app,
                            page_token,
                            ..Default::default()
                        })
                        .await
                    }
                })
                .await?;
                r.leader_id = page.leader_id;
                r.clusters.extend(page.clusters);
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
            let image_of = |s: &pb::AppClusterStatus, color: i32| {
                s.colors.iter().find(|c| c.color == color).map(|c| {
                    let ready = format!("{}/{}", c.replicas_ready, c.replicas_desired);
                    (c.image.clone(), ready, c.healthy)
                })
            };
            if conn.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&status_json(&r))?);
            } else if app.is_empty() {
                println!("{:<12} {:<16} AGENT", "REGION", "CLUSTER");
                for s in &r.clusters {
                    let c = s.cluster.clone().unwrap_or_default();
                    println!("{:<12} {:<16} {}", c.region, c.cluster, agent_state(s.agent_state));
                }
            } else {
                println!(
                    "{:<10} {:<12} {:<6} {:<7} {:<28} {:<28}",
                    "REGION", "CLUSTER", "AGENT", "ACTIVE", "BLUE (ready, health)", "GREEN (ready, health)"
                );
                for s in &r.clusters {
                    let c = s.cluster.clone().unwrap_or_default();
                    let a = s.app.clone().unwrap_or_default();
                    let cell = |color: pb::Color| match image_of(&a, color as i32) {
                        Some((img, ready, ok)) if !img.is_empty() => {
                            format!("{img} ({ready}, {})", if ok { "ok" } else { "UNHEALTHY" })
                        }
                        _ => "-".to_owned(),
                    };
                    println!(
                        "{:<10} {:<12} {:<6} {:<7} {:<28} {:<28}",
                        c.region,
                        c.cluster,
                        agent_state(s.agent_state),
                        // A restore onto the primary holds both colors.
                        if a.maintenance { "MAINT" } else { color_name(a.active) },
                        cell(pb::Color::Blue),
                        cell(pb::Color::Green)
                    );
                }
            }
        }
        Verb::Operations { cmd, conn } => match cmd {
            OperationsCmd::List { limit } => {
                let r = call(&conn, |mut c| async move {
                    c.list_operations(pb::ListOperationsRequest { limit }).await
                })
                .await?;
                if conn.output == Output::Json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&r.operations.iter().map(operation_json).collect::<Vec<_>>())?
                    );
                } else {
                    println!("{:<40} {:<10} CREATED BY", "ID", "STATE");
                    for o in &r.operations {
                        println!("{:<40} {:<10} {}", o.id, state_name(o.state), o.created_by);
                    }
                }
            }
            OperationsCmd::Get { id } => {
                let r = call(&conn, |mut c| {
                    let operation_id = id.clone();
                    async move { c.get_operation(pb::GetOperationRequest { operation_id }).await }
                })
                .await?;
                let op = r.operation.unwrap_or_default();
                if conn.output == Output::Json {
                    println!("{}", serde_json::to_string_pretty(&operation_json(&op))?);
                } else {
                    print_operation(&op);
                }
            }
            OperationsCmd::Watch { id } => {
                if !watch(&conn, &id).await? {
                    return Ok(ExitCode::FAILURE);
                }
            }
        },
        Verb::Task {
            cmd:
                TaskCmd::Run {
                    region,
                    cluster,
                    kind,
                    params,
                    detach,
                },
            conn,
        } => {
            let params = kv(&params, "param")?;
            let r = call(&conn, |mut c| {
                let req = pb::RunTaskRequest {
                    target: Some(pb::ClusterRef {
                        region: region.clone(),
                        cluster: cluster.clone(),
                    }),
                    kind: kind.clone(),
                    params: params.clone(),
                };
                async move { c.run_task(req).await }
            })
            .await?;
            if detach {
                if conn.output == Output::Json {
                    println!("{}", json!({"operation_id": r.operation_id, "task_id": r.task_id}));
                } else {
                    println!("{}", r.operation_id);
                }
            } else if !watch(&conn, &r.operation_id).await? {
                return Ok(ExitCode::FAILURE);
            }
        }
        Verb::Attest { image, checks, conn } => {
            let checks = kv(&checks, "check")?;
            let r = call(&conn, |mut c| {
                let req = pb::CreateAttestationRequest {
                    image: image.clone(),
                    checks: checks.clone(),
                };
                async move { c.create_attestation(req).await }
            })
            .await?;
            if conn.output == Output::Json {
                println!("{}", json!({"image": image, "log_index": r.log_index}));
            } else {
                println!(
                    "attested {image} ({} checks) at log index {}",
                    checks.len(),
                    r.log_index
                );
            }
        }
        Verb::Apps { cmd, conn } => match cmd {
            AppsCmd::Apply { file } => {
                let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
                let spec: cutover_shared::app::AppSpec =
                    toml::from_str(&text).with_context(|| format!("{}", file.display()))?;
                spec.validate().with_context(|| format!("{}", file.display()))?;
                let app: pb::App = spec.into();
                let r = call(&conn, |mut c| {
                    let app = app.clone();
                    async move { c.apply_app(pb::ApplyAppRequest { app: Some(app) }).await }
                })
                .await?;
                let name = r.app.as_ref().map(|a| a.name.clone()).unwrap_or_default();
                if conn.output == Output::Json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&app_json(r.app.unwrap_or_default())?)?
                    );
                } else {
                    println!("app {name} applied");
                    for op in &r.running_operations {
                        println!(
                            "note: operation {op} is running on {name}; it keeps the definition it started with, this one applies to the next operation"
                        );
                    }
                }
            }
            AppsCmd::List => {
                let r = call(&conn, |mut c| async move { c.list_apps(pb::ListAppsRequest {}).await }).await?;
                if conn.output == Output::Json {
                    let v: Vec<_> = r.apps.into_iter().map(app_json).collect::<Result<_>>()?;
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    println!("{:<24} CLUSTERS", "APP");
                    for a in &r.apps {
                        let cl: Vec<String> = a
                            .clusters
                            .iter()
                            .map(|c| format!("{}/{}", c.region, c.cluster))
                            .collect();
                        println!("{:<24} {}", a.name, cl.join(", "));
                    }
                }
            }
            AppsCmd::Get { name } => {
                let r = call(&conn, |mut c| {
                    let name = name.clone();
                    async move { c.get_app(pb::GetAppRequest { name }).await }
                })
                .await?;
                let spec = cutover_shared::convert::app_from_proto(r.app.unwrap_or_default())?;
                if conn.output == Output::Json {
                    println!("{}", serde_json::to_string_pretty(&spec)?);
                } else {
                    // An app file: `apps apply -f` takes it back as it is.
                    print!("{}", spec.to_toml()?);
                }
            }
        },
        Verb::Deploy {
            app,
            image,
            region,
            no_switch,
            waves,
            strategy,
            manual_promotion,
            detach,
            conn,
        } => {
            let region = region.unwrap_or_default();
            let waves: Vec<pb::Wave> = waves
                .map(|w| {
                    w.split(':')
                        .map(|wave| pb::Wave {
                            regions: wave.split(',').map(|r| r.trim().to_owned()).collect(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            let strategy = match strategy.as_str() {
                "waves" => pb::Strategy::Waves,
                "atomic" => pb::Strategy::Atomic,
                other => bail!("unknown strategy {other:?} (waves or atomic)"),
            } as i32;
            return start_and_follow(&conn, detach, |mut c| {
                let req = pb::DeployRequest {
                    app: app.clone(),
                    image: image.clone(),
                    region: region.clone(),
                    no_switch,
                    waves: waves.clone(),
                    strategy,
                    manual_promotion,
                };
                async move { c.deploy(req).await.map(|r| r.into_inner().operation_id) }
            })
            .await;
        }
        Verb::Switch {
            app,
            region,
            detach,
            conn,
        } => {
            let region = region.unwrap_or_default();
            return start_and_follow(&conn, detach, |mut c| {
                let req = pb::SwitchRequest {
                    app: app.clone(),
                    region: region.clone(),
                };
                async move { c.switch(req).await.map(|r| r.into_inner().operation_id) }
            })
            .await;
        }
        Verb::Rollback {
            app,
            region,
            detach,
            conn,
        } => {
            let region = region.unwrap_or_default();
            return start_and_follow(&conn, detach, |mut c| {
                let req = pb::RollbackRequest {
                    app: app.clone(),
                    region: region.clone(),
                };
                async move { c.rollback(req).await.map(|r| r.into_inner().operation_id) }
            })
            .await;
        }
        Verb::HealthCheck { app, region, conn } => {
            let region = region.unwrap_or_default();
            return start_and_follow(&conn, false, |mut c| {
                let req = pb::HealthCheckRequest {
                    app: app.clone(),
                    region: region.clone(),
                };
                async move { c.health_check(req).await.map(|r| r.into_inner().operation_id) }
            })
            .await;
        }
        Verb::Analysis {
            cmd: AnalysisCmd::Run { app, region },
            conn,
        } => {
            let region = region.unwrap_or_default();
            return start_and_follow(&conn, false, |mut c| {
                let req = pb::RunAnalysisRequest {
                    app: app.clone(),
                    region: region.clone(),
                };
                async move { c.run_analysis(req).await.map(|r| r.into_inner().operation_id) }
            })
            .await;
        }
        Verb::Release { cmd, conn } => return crate::migrate::run_release(cmd, conn).await,
        Verb::Migrate { cmd, conn } => return crate::migrate::run_migrate(cmd, conn).await,
        Verb::Backup { cmd, conn } => return crate::backup::run(cmd, conn).await,
        Verb::Dr { cmd, conn } => return crate::dr::run(cmd, conn).await,
        Verb::Promote { operation, gate, conn } => steer(&conn, &operation, Steer::Promote(gate)).await?,
        Verb::Pause { operation, conn } => steer(&conn, &operation, Steer::Pause).await?,
        Verb::Resume { operation, conn } => steer(&conn, &operation, Steer::Resume).await?,
        Verb::Abort { operation, conn } => steer(&conn, &operation, Steer::Abort).await?,
        Verb::Audit { limit, since, conn } => {
            let since_unix_ms = since.map_or(0, |ago| cutover_shared::domain::now_unix_ms() - ago);
            let r = call(&conn, |mut c| async move {
                c.list_audit_events(pb::ListAuditEventsRequest { limit, since_unix_ms })
                    .await
            })
            .await?;
            if conn.output == Output::Json {
                let v: Vec<_> = r.events.iter().map(audit_json).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for e in &r.events {
                    println!(
                        "#{:<5} {} {} {} -> {}",
                        e.sequence, e.actor, e.action, e.parameters, e.outcome
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `--since`: a duration back from now (`90s`, `30m`, `24h`, `30d`), in ms.
fn parse_since(s: &str) -> Result<i64, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = n
        .parse()
        .map_err(|_| format!("{s:?}: expected a number and a unit, e.g. 24h"))?;
    let ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    n.checked_mul(ms).ok_or_else(|| format!("{s:?} is too long ago"))
}
