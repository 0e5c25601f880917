//! Deterministic simulation of the decision layer, seeded: the state
//! machine and the orchestrator as they are, a leader that proposes and
//! commits through a simulated log, model agents that execute and report
//! through a simulated network, and a fault schedule drawn from the seed:
//! leaders that crash with proposals in flight (some already replicated,
//! some lost), messages dropped, duplicated, delayed and reordered, agents
//! that crash and reconnect, the clock jumping forward, and operators
//! starting cutovers of two apps that share clusters at random times. After
//! every step the invariants are checked:
//!
//! - at most one running operation per app and cluster;
//! - no task executed twice (a re-sent task is answered from the agent's
//!   store, as the real agent's task store does);
//! - no traffic on a color that did not pass its gates: an agent switches
//!   to a color only after that operation's gates passed for it there;
//! - never two writable primaries of the app's database: failovers of
//!   `shop` between us-east and eu-west are requested on the view the
//!   operator had (so some carry a stale epoch and must be refused), and a
//!   model database per cluster is fenced, unfenced and promoted by the
//!   tasks, refusing any task for an epoch older than one it has seen;
//! - once the faults stop, every operation ends.
//!
//! What it does not simulate: openraft itself (its own storage and
//! protocol suites run against cutover's stores, `raft::storage_suite`,
//! and real elections and partitions run in `tests/tests/partition.rs`),
//! and the transport (real tonic over real sockets in the process tests).
//! Runs without the libtest harness so that it takes arguments:
//!
//! ```sh
//! cargo test -p cutover-coordinator --test simulation                 # the CI set, seeds 0..200
//! cargo test -p cutover-coordinator --test simulation -- --seeds 5000 # seeds 0..5000
//! cargo test -p cutover-coordinator --test simulation -- --seed 1234  # one seed, its trace printed
//! ```
//!
//! A failing seed prints its number and its trace; the same seed replays
//! the same run (each seed's trace digest is checked against a second run
//! for the first seeds of every invocation).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};

use cutover_coordinator::orchestrator::{self, Inputs};
use cutover_coordinator::state::{Command, State};
use cutover_shared::app::{AppClusterStatus, AppSpec, Color};
use cutover_shared::domain::{ClusterRef, Operation, OperationKind, TaskResult, TaskSpec, TaskState};
use cutover_shared::operation::{FailoverSpec, OperationSpec, Strategy};
use cutover_shared::task::{self, FailoverAction, TaskParams};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use common::{audit, cluster};

const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];
/// App name and the regions it runs in: two apps share two clusters, so
/// their cutovers interleave on the same agents.
const APPS: [(&str, &[&str]); 2] = [("shop", &REGIONS), ("cart", &["us-east", "eu-west"])];
/// Steps with faults and operators starting deploys, then steps without
/// either, in which every operation must end (a few hundred suffice; the
/// bound is ten times that).
const FAULT_STEPS: usize = 400;
const CALM_STEPS: usize = 5000;

fn spec(name: &str, regions: &[&str]) -> AppSpec {
    common::app_spec(name, regions, 5)
}

/// A deploy of `app` to `image`, as `ControlService.Deploy` creates it.
fn deploy(id: &str, app: &str, regions: &[&str], image: &str, atomic: bool, now: i64) -> Operation {
    Operation {
        id: id.into(),
        kind: OperationKind::Deploy,
        app: Some(app.into()),
        targets: regions.iter().map(|r| cluster(r)).collect(),
        spec: OperationSpec {
            image: Some(image.into()),
            strategy: if atomic { Strategy::Atomic } else { Strategy::Waves },
            waves: regions.iter().map(|r| vec![r.to_string()]).collect(),
            bake_secs: 5,
            ..OperationSpec::default()
        },
        state: TaskState::Pending,
        created_by: "operator/sim".into(),
        created_at_unix_ms: now,
        updated_at_unix_ms: now,
        tasks: vec![],
        summary: String::new(),
        control: Default::default(),
        spec_digest: None,
        bundle_digest: None,
    }
}

/// A failover of `shop`'s database from `from` to `to` under `epoch`, as
/// `ControlService.Failover` creates it with both agents up.
fn failover(id: &str, from: &str, to: &str, epoch: u64, now: i64) -> Operation {
    let mut op = deploy(id, "shop", &[to, from], "unused", false, now);
    op.kind = OperationKind::Failover;
    op.spec = OperationSpec {
        failover: Some(Box::new(FailoverSpec {
            from: Some(cluster(from)),
            to: cluster(to),
            epoch,
            fence: true,
            verify_color: Some(Color::Blue),
            data_loss_window_ms: Some(0),
            wal_behind_bytes: None,
            force: false,
            accept_data_loss: false,
            fence_only: false,
            rejoin: true,
            rejoin_only: false,
            traffic: None,
            deploy_image: None,
            restore: None,
        })),
        ..OperationSpec::default()
    };
    op
}

/// `shop`'s database in one cluster, as the model agent's server is.
#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq)]
enum Db {
    #[default]
    Standby,
    /// Accepts writes.
    Primary,
    /// A primary made read-only.
    Fenced,
}

/// One app in one cluster, as the model agent runs it.
#[derive(Clone, Debug, Default, Hash)]
struct Served {
    active: Option<Color>,
    images: BTreeMap<Color, String>,
    /// (operation, color) whose gates passed here.
    gates_passed: BTreeSet<(String, Color)>,
}

/// A model agent: what it serves, and its durable task store.
#[derive(Debug, Default)]
struct Agent {
    up: bool,
    apps: BTreeMap<String, Served>,
    /// Finished tasks and their results: a task sent again is answered
    /// from here, never executed again.
    done: BTreeMap<String, TaskResult>,
    /// Results not yet known committed: re-sent on every reconnect.
    unacked: BTreeSet<String>,
    /// `shop`'s database here, and the newest primary epoch it has seen.
    db: Db,
    db_epoch: u64,
}

/// Counters over a run.
#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    steps: usize,
    leader_changes: usize,
    dropped: usize,
    duplicated: usize,
    agent_crashes: usize,
    clock_jumps: usize,
    operations: usize,
    succeeded: usize,
    failed: usize,
    executions: usize,
    replays: usize,
    failovers: usize,
    failovers_succeeded: usize,
    stale_refused: usize,
}

struct Sim {
    seed: u64,
    rng: StdRng,
    state: State,
    now: i64,
    /// Proposed by the current leader, not yet committed, in log order.
    pending: Vec<Command>,
    /// Dispatches in flight: (region of the agent, task with content).
    to_agents: Vec<(String, TaskSpec)>,
    /// Results in flight to the leader.
    to_leader: Vec<(ClusterRef, TaskResult)>,
    agents: BTreeMap<String, Agent>,
    /// Tasks the current leader has sent in its term (a new leader, or an
    /// agent's reconnect, sends every unfinished task again).
    sent: BTreeSet<String>,
    /// Executions per task id, over the whole run.
    executions: BTreeMap<String, u32>,
    next_op: u64,
    trace: Vec<String>,
    faults: bool,
    /// An invariant an agent saw broken while executing.
    violation: Option<String>,
    stats: Stats,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut s = Sim {
            seed,
            rng: StdRng::seed_from_u64(seed),
            state: State::default(),
            now: 1_000_000,
            pending: vec![],
            to_agents: vec![],
            to_leader: vec![],
            agents: BTreeMap::new(),
            sent: BTreeSet::new(),
            executions: BTreeMap::new(),
            next_op: 0,
            trace: vec![],
            faults: true,
            violation: None,
            stats: Stats::default(),
        };
        for (app, regions) in APPS {
            s.commit(Command::PutApp {
                spec: spec(app, regions),
                audit: audit(s.now),
            });
            for r in regions {
                let served = Served {
                    active: Some(Color::Blue),
                    images: BTreeMap::from([(Color::Blue, format!("{app}:v0"))]),
                    gates_passed: BTreeSet::new(),
                };
                let agent = s.agents.entry(r.to_string()).or_default();
                agent.up = true;
                if *r == "us-east" {
                    agent.db = Db::Primary;
                }
                agent.apps.insert(app.to_string(), served);
                s.commit(Command::AppStatusReported {
                    from: cluster(r),
                    app: app.into(),
                    status: AppClusterStatus {
                        canary_weight: 0,
                        active: Some(Color::Blue),
                        colors: vec![],
                        last_switch_unix_ms: None,
                        maintenance: false,
                    },
                });
            }
        }
        s
    }

    fn note(&mut self, what: String) {
        self.trace.push(format!("{:>5} {}", self.stats.steps, what));
    }

    /// Applies a committed command; refusals are part of the protocol (a
    /// decision proposed twice, a deploy while one runs) and change nothing.
    fn commit(&mut self, cmd: Command) {
        let label = cmd.to_string();
        // A committed result is acknowledged to its agent.
        if let Command::TaskFinished { from, result, .. } = &cmd
            && let Some(a) = self.agents.get_mut(&from.region)
        {
            a.unacked.remove(&result.task_id);
        }
        let r = self.state.apply(cmd);
        match r.error {
            None => self.note(format!("commit {label}")),
            Some(e) => {
                if e.contains("stale view") {
                    self.stats.stale_refused += 1;
                }
                self.note(format!("commit {label}: refused: {e}"))
            }
        }
    }

    fn step(&mut self) -> Result<(), String> {
        self.stats.steps += 1;
        let roll = self.rng.random_range(0..100u32);
        match roll {
            0..=19 => self.decide(),
            20..=34 => self.commit_some(),
            35..=49 => self.dispatch(),
            50..=64 => self.deliver_task(),
            65..=79 => self.deliver_result(),
            80..=83 => self.advance_clock(),
            _ if !self.faults => self.advance_clock(),
            84 => self.start_deploy(),
            85 => self.start_failover(),
            86..=88 => self.crash_leader(),
            89..=92 => self.drop_message(),
            93..=95 => self.duplicate_message(),
            96..=97 => self.crash_agent(),
            _ => self.jump_clock(),
        }
        self.check()
    }

    /// The leader's orchestrator: one decision per running operation that
    /// has none in flight.
    fn decide(&mut self) {
        let ops: Vec<Operation> = self.state.running_operations().cloned().collect();
        for op in ops {
            let in_flight = self.pending.iter().any(|c| match c {
                Command::AddTask { operation_id, .. }
                | Command::AddTasks { operation_id, .. }
                | Command::FinishOperation { operation_id, .. } => operation_id == &op.id,
                _ => false,
            });
            if in_flight {
                continue;
            }
            let Some((spec, bundle)) = self.state.operation_inputs(&op) else {
                continue;
            };
            if let Some(cmd) = orchestrator::next_command(&op, &Inputs::new(&op, spec, bundle), self.now) {
                self.note(format!("propose {cmd}"));
                self.pending.push(cmd);
            }
        }
    }

    /// Raft commits a prefix of what was proposed, in order.
    fn commit_some(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let n = self.rng.random_range(1..=self.pending.len());
        for cmd in self.pending.drain(..n).collect::<Vec<_>>() {
            self.commit(cmd);
        }
    }

    /// The leader sends each unfinished task it has not sent this term to
    /// its agent, if connected.
    fn dispatch(&mut self) {
        let clusters: Vec<String> = self.agents.keys().cloned().collect();
        for c in clusters {
            if !self.agents[&c].up {
                continue;
            }
            for t in self.state.unfinished_tasks_for(&cluster(&c)) {
                if self.sent.insert(t.task_id.clone()) {
                    self.note(format!("send {} to {c}", t.task_id));
                    self.to_agents.push((c.clone(), t));
                }
            }
        }
    }

    fn pick<T>(&mut self, v: &mut Vec<T>) -> Option<T> {
        if v.is_empty() {
            return None;
        }
        // Reordering: any message in flight may arrive next.
        let i = self.rng.random_range(0..v.len());
        Some(v.remove(i))
    }

    fn deliver_task(&mut self) {
        let mut q = std::mem::take(&mut self.to_agents);
        let msg = self.pick(&mut q);
        self.to_agents = q;
        let Some((c, spec)) = msg else { return };
        if !self.agents[&c].up {
            self.note(format!("lost {} (agent {c} down)", spec.task_id));
            return;
        }
        let target = spec.target.clone();
        if let Some(r) = self.agents[&c].done.get(&spec.task_id).cloned() {
            self.stats.replays += 1;
            self.note(format!("{c} replays {}", spec.task_id));
            self.to_leader.push((target, TaskResult { replayed: true, ..r }));
            return;
        }
        let result = self.execute(&c, &spec);
        let agent = self.agents.get_mut(&c).unwrap();
        agent.done.insert(spec.task_id.clone(), result.clone());
        agent.unacked.insert(spec.task_id.clone());
        self.to_leader.push((target, result));
    }

    /// The model agent executes a task: what it changes, and its result.
    /// Forward steps fail now and then, so rollbacks are exercised too.
    fn execute(&mut self, c: &str, spec: &TaskSpec) -> TaskResult {
        *self.executions.entry(spec.task_id.clone()).or_default() += 1;
        self.stats.executions += 1;
        let params = TaskParams::from_wire(&spec.kind, &spec.params).expect("typed params");
        let mut fail = !params.is_compensation() && self.rng.random_bool(0.08);
        if let TaskParams::DbFailover(f) = &params {
            let agent = self.agents.get_mut(c).expect("agent");
            // The real agent refuses a task for an epoch older than one it
            // has seen; the database acts only on the rest.
            if f.epoch < agent.db_epoch {
                fail = true;
            } else if !fail {
                agent.db_epoch = f.epoch;
                agent.db = match f.action {
                    FailoverAction::Fence => Db::Fenced,
                    FailoverAction::Unfence | FailoverAction::Promote => Db::Primary,
                    FailoverAction::Rejoin => Db::Standby,
                };
            }
            let primaries: Vec<&String> = self
                .agents
                .iter()
                .filter(|(_, a)| a.db == Db::Primary)
                .map(|(c, _)| c)
                .collect();
            if primaries.len() > 1 {
                self.violation = Some(format!("two writable primaries: {primaries:?} after {}", spec.task_id));
            }
        }
        let app = params.app().map(|a| a.app.clone()).unwrap_or_default();
        let op = spec.operation_id.clone();
        let served = self
            .agents
            .get_mut(c)
            .and_then(|a| a.apps.get_mut(&app))
            .expect("the agent serves the app");
        let mut outputs = BTreeMap::new();
        match params {
            TaskParams::AppDeploy { image, .. } => {
                let color = served.active.map_or(Color::Blue, Color::other);
                if !fail {
                    served.images.insert(color, image);
                }
                outputs = task::outputs::AppOutputs {
                    color: Some(color),
                    ..Default::default()
                }
                .to_wire();
            }
            TaskParams::AppGates { color, .. } => {
                let color = color.unwrap_or_else(|| served.active.map_or(Color::Blue, Color::other));
                if !fail {
                    served.gates_passed.insert((op.clone(), color));
                }
            }
            TaskParams::AppSwitch { to, compensate, .. } => {
                let to = to.expect("every switch names its color");
                if !fail {
                    // The invariant: traffic moves forward only to a color
                    // whose gates passed in this operation, here.
                    if !compensate && !served.gates_passed.contains(&(op.clone(), to)) {
                        self.violation = Some(format!("{c} switched {app} to {to:?} without passed gates ({op})"));
                    }
                    served.active = Some(to);
                }
            }
            TaskParams::DbFailover(f) => {
                if !fail {
                    outputs = task::outputs::FailoverOutputs {
                        lsn: Some(100 + f.epoch),
                        epoch: Some(f.epoch),
                        caught_up_ms: None,
                        method: None,
                    }
                    .to_wire();
                }
            }
            TaskParams::AppBake { .. } | TaskParams::AppMaintenance { .. } => {}
            other => panic!("the simulation plans no {other:?}"),
        }
        self.note(format!(
            "{c} executes {} {} {}",
            spec.kind,
            spec.task_id,
            if fail { "FAILED" } else { "ok" }
        ));
        TaskResult {
            task_id: spec.task_id.clone(),
            success: !fail,
            message: if fail { "failed".into() } else { "ok".into() },
            outputs,
            replayed: false,
            finished_at_unix_ms: self.now,
        }
    }

    fn deliver_result(&mut self) {
        let mut q = std::mem::take(&mut self.to_leader);
        let msg = self.pick(&mut q);
        self.to_leader = q;
        let Some((from, result)) = msg else { return };
        self.note(format!("leader hears {} from {from}", result.task_id));
        self.pending.push(Command::TaskFinished {
            from,
            result,
            at_unix_ms: self.now,
        });
    }

    fn advance_clock(&mut self) {
        self.now += self.rng.random_range(1..2_000);
    }

    /// NTP steps the clock, or a VM resumes: forward only (the leader's
    /// decision clock never goes back).
    fn jump_clock(&mut self) {
        self.stats.clock_jumps += 1;
        let by = self.rng.random_range(10_000..3_600_000);
        self.note(format!("clock jumps {by} ms"));
        self.now += by;
    }

    /// An operator fails `shop`'s database over from its primary to the
    /// other region's standby, rebuilding the old primary as a standby
    /// (`dr failback`), as `ControlService.Failover` plans it: refused at
    /// once while an operation runs on the app, or while no primary is
    /// known. Now and then on a view one failover behind (a console open
    /// for a while): a proposal whose epoch another failover has taken
    /// must be refused when it commits.
    fn start_failover(&mut self) {
        let busy = ["us-east", "eu-west"]
            .iter()
            .any(|r| self.state.running_operation("shop", &cluster(r)).is_some());
        let e = self.state.dr_epochs.get("shop");
        let current = e.map_or(0, |e| e.epoch);
        let primary = match e.and_then(|e| e.primary.as_ref()) {
            Some(c) => c.region.clone(),
            None if current == 0 => "us-east".to_string(),
            None => return,
        };
        if busy {
            return;
        }
        let stale = self.rng.random_bool(0.3);
        let epoch = current.saturating_sub(u64::from(stale));
        let (from, to) = if primary == "us-east" {
            ("us-east", "eu-west")
        } else {
            ("eu-west", "us-east")
        };
        self.next_op += 1;
        let id = format!("op-{}", self.next_op);
        self.note(format!(
            "operator fails over {from} -> {to} at epoch {} as {id}",
            epoch + 1
        ));
        self.stats.failovers += 1;
        self.pending.push(Command::CreateOperation {
            operation: failover(&id, from, to, epoch + 1, self.now),
            audit: audit(self.now),
            fix_inputs: true,
        });
    }

    fn start_deploy(&mut self) {
        let (app, regions) = APPS[self.rng.random_range(0..APPS.len())];
        self.next_op += 1;
        let id = format!("op-{}", self.next_op);
        let image = format!("{app}:v{}", self.next_op);
        let atomic = self.rng.random_bool(0.3);
        self.note(format!("operator deploys {image} as {id}"));
        self.stats.operations += 1;
        self.pending.push(Command::CreateOperation {
            operation: deploy(&id, app, regions, &image, atomic, self.now),
            audit: audit(self.now),
            fix_inputs: true,
        });
    }

    /// The leader crashes: what it had replicated commits under the next
    /// leader, the rest is lost; results in flight to it are lost; the new
    /// leader sends every unfinished task again and the agents re-send
    /// every result not known committed.
    fn crash_leader(&mut self) {
        self.stats.leader_changes += 1;
        let keep = self.rng.random_range(0..=self.pending.len());
        let lost = self.pending.len() - keep;
        self.pending.truncate(keep);
        self.to_leader.clear();
        self.sent.clear();
        self.note(format!("leader crashes: {keep} proposals survive, {lost} lost"));
        let pending = std::mem::take(&mut self.pending);
        for cmd in pending {
            self.commit(cmd);
        }
        self.resend_results(None);
    }

    fn resend_results(&mut self, only: Option<&str>) {
        for (c, a) in &self.agents {
            if !a.up || only.is_some_and(|o| o != c) {
                continue;
            }
            let target = cluster(c);
            for id in &a.unacked {
                let r = a.done[id].clone();
                self.to_leader
                    .push((target.clone(), TaskResult { replayed: true, ..r }));
            }
        }
    }

    fn drop_message(&mut self) {
        self.stats.dropped += 1;
        if self.rng.random_bool(0.5) {
            let mut q = std::mem::take(&mut self.to_agents);
            if let Some((c, t)) = self.pick(&mut q) {
                self.note(format!("drop {} to {c}", t.task_id));
            }
            self.to_agents = q;
        } else {
            let mut q = std::mem::take(&mut self.to_leader);
            if let Some((c, r)) = self.pick(&mut q) {
                self.note(format!("drop result {} from {c}", r.task_id));
            }
            self.to_leader = q;
        }
    }

    fn duplicate_message(&mut self) {
        self.stats.duplicated += 1;
        if self.rng.random_bool(0.5) && !self.to_agents.is_empty() {
            let i = self.rng.random_range(0..self.to_agents.len());
            let m = self.to_agents[i].clone();
            self.note(format!("duplicate {} to {}", m.1.task_id, m.0));
            self.to_agents.push(m);
        } else if !self.to_leader.is_empty() {
            let i = self.rng.random_range(0..self.to_leader.len());
            let m = self.to_leader[i].clone();
            self.note(format!("duplicate result {}", m.1.task_id));
            self.to_leader.push(m);
        }
    }

    /// An agent crashes (its store survives, what was in flight to it is
    /// lost) and reconnects: the leader sends its unfinished tasks again,
    /// and it re-sends its unacknowledged results.
    fn crash_agent(&mut self) {
        self.stats.agent_crashes += 1;
        let names: Vec<String> = self.agents.keys().cloned().collect();
        let c = names[self.rng.random_range(0..names.len())].clone();
        self.to_agents.retain(|(to, _)| to != &c);
        for t in self.state.unfinished_tasks_for(&cluster(&c)) {
            self.sent.remove(&t.task_id);
        }
        self.note(format!("agent {c} crashes and reconnects"));
        self.resend_results(Some(&c));
    }

    fn check(&mut self) -> Result<(), String> {
        if let Some(v) = self.violation.take() {
            return Err(v);
        }
        let mut running: BTreeMap<(String, String), String> = BTreeMap::new();
        for op in self.state.running_operations() {
            for t in &op.targets {
                let key = (op.app.clone().unwrap_or_default(), t.to_string());
                if let Some(other) = running.insert(key.clone(), op.id.clone()) {
                    return Err(format!(
                        "two running operations on {} in {}: {other} and {}",
                        key.0, key.1, op.id
                    ));
                }
            }
        }
        if let Some((t, n)) = self.executions.iter().find(|(_, n)| **n > 1) {
            return Err(format!("task {t} executed {n} times"));
        }
        Ok(())
    }

    /// Runs the seed: faults, then calm until every operation has ended.
    fn run(&mut self) -> Result<Stats, String> {
        for _ in 0..FAULT_STEPS {
            self.step()?;
        }
        self.faults = false;
        for _ in 0..CALM_STEPS {
            if self.state.running_operations().next().is_none() && self.pending.is_empty() {
                break;
            }
            self.step()?;
            // Calm: nothing is lost any more, so an agent that was mid-way
            // reconnects and the leader re-sends.
            if self.stats.steps.is_multiple_of(200) {
                self.sent.clear();
                self.resend_results(None);
            }
        }
        let stuck: Vec<String> = self
            .state
            .running_operations()
            .map(|o| format!("{} ({} tasks)", o.id, o.tasks.len()))
            .collect();
        if !stuck.is_empty() {
            return Err(format!("operations still running once faults stopped: {stuck:?}"));
        }
        for op in self.state.operations.values() {
            if op.kind == OperationKind::Failover && op.state == TaskState::Succeeded {
                self.stats.failovers_succeeded += 1;
            }
            match op.state {
                TaskState::Succeeded => self.stats.succeeded += 1,
                TaskState::Failed => self.stats.failed += 1,
                _ => {}
            }
        }
        Ok(self.stats)
    }

    fn digest(&self) -> u64 {
        let mut h = DefaultHasher::new();
        self.trace.hash(&mut h);
        for a in self.agents.values() {
            a.apps.hash(&mut h);
            (a.db, a.db_epoch).hash(&mut h);
        }
        h.finish()
    }
}

fn main() {
    let (seeds, verbose) = common::seeds_from_args(200);
    let mut total = Stats::default();
    for &seed in &seeds {
        let mut sim = Sim::new(seed);
        let outcome = sim.run();
        if verbose || outcome.is_err() {
            for line in &sim.trace {
                println!("{line}");
            }
        }
        let stats = match outcome {
            Ok(s) => s,
            Err(e) => {
                eprintln!(
                    "seed {} failed at step {}: {e}\nreplay it: cargo test -p cutover-coordinator --test simulation -- --seed {}",
                    sim.seed, sim.stats.steps, sim.seed
                );
                std::process::exit(1);
            }
        };
        // The same seed replays the same run.
        if seed < 5 {
            let mut again = Sim::new(seed);
            again.run().expect("the replay fails where the run did not");
            assert_eq!(again.digest(), sim.digest(), "seed {seed} did not replay the same run");
        }
        total.steps += stats.steps;
        total.leader_changes += stats.leader_changes;
        total.dropped += stats.dropped;
        total.duplicated += stats.duplicated;
        total.agent_crashes += stats.agent_crashes;
        total.clock_jumps += stats.clock_jumps;
        total.operations += stats.operations;
        total.succeeded += stats.succeeded;
        total.failed += stats.failed;
        total.executions += stats.executions;
        total.replays += stats.replays;
        total.failovers += stats.failovers;
        total.failovers_succeeded += stats.failovers_succeeded;
        total.stale_refused += stats.stale_refused;
    }
    println!(
        "simulation: {} seeds checked ({}..{}), {} steps; faults: {} leader crashes, {} messages dropped, {} \
         duplicated, {} agent crashes, {} clock jumps; {} deploys and {} failovers requested, {} operations \
         succeeded ({} failovers), {} failed, the rest refused ({} failovers decided on a stale epoch); {} task \
         executions, {} re-sent tasks answered from the agents' stores; every invariant held after every step",
        seeds.len(),
        seeds.first().unwrap_or(&0),
        seeds.last().map_or(0, |s| s + 1),
        total.steps,
        total.leader_changes,
        total.dropped,
        total.duplicated,
        total.agent_crashes,
        total.clock_jumps,
        total.operations,
        total.failovers,
        total.succeeded,
        total.failovers_succeeded,
        total.failed,
        total.stale_refused,
        total.executions,
        total.replays
    );
}
