//! `fleet`: a fleet of apps under many cutovers at once. Apps, each in three
//! regions, run on simulated agents (in this process, on the real agent
//! stream, one certificate and connection each) whose tasks succeed after a
//! set delay; a fixed number of blue-green deploys in waves (region by
//! region) run at all times against three `cutover coordinator` processes.
//! What is measured is what cutover adds around the agents' work:
//!
//! - **step overhead**: from an agent sending a step's last result to the
//!   next step's first task arriving (the result committed, the
//!   orchestrator deciding, the next step committed and dispatched), and
//!   from `Deploy` answering to the first task;
//! - **operations completed per minute** with that many running;
//! - **the orchestrator's cost**: the leader's scan of the state per
//!   orchestrator tick (`cutover_orchestrator_scan_seconds` on its
//!   `/metrics`) and the leader's CPU per dispatched task.
//!
//! Rows differ by how much finished history the state holds (filled with
//! ad-hoc `noop` operations before the row, retention raised to keep it),
//! to show that the orchestrator's cost follows running operations, not
//! all operations ever run.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cutover_shared::proto::{self as pb, ConnectRequest, connect_request, connect_response};
use cutover_shared::tls::TlsFiles;
use serde_json::json;

use crate::util::{self, CutoverProcs};

const REGIONS: [&str; 3] = ["r1", "r2", "r3"];
/// What the simulated agents offer.
const KINDS: [&str; 5] = ["noop", "app.deploy", "app.gates", "app.switch", "app.bake"];

struct Params {
    apps: usize,
    clusters_per_region: usize,
    running: usize,
    task_delay: Duration,
    window: Duration,
    /// Finished operations in the history at each row.
    history: Vec<usize>,
}

impl Params {
    fn new(quick: bool) -> Params {
        if quick {
            Params {
                apps: 12,
                clusters_per_region: 2,
                running: 4,
                task_delay: Duration::from_millis(20),
                window: Duration::from_secs(4),
                history: vec![0, 50],
            }
        } else {
            Params {
                apps: 500,
                clusters_per_region: 10,
                running: 100,
                task_delay: Duration::from_millis(50),
                window: Duration::from_secs(60),
                history: vec![1000, 10_000],
            }
        }
    }
}

/// Per operation: when its last result went up, or when `Deploy` answered,
/// not yet followed by a task.
#[derive(Default)]
struct Waiting {
    since: Option<Instant>,
    first: bool,
}

#[derive(Default)]
struct Shared {
    waiting: Mutex<HashMap<String, Waiting>>,
    /// Result sent to the next step's first task, ms.
    step: Mutex<Vec<f64>>,
    /// `Deploy` answered to the first task, ms.
    first: Mutex<Vec<f64>>,
    tasks: AtomicU64,
    noops_done: AtomicU64,
    sessions_lost: AtomicU64,
}

impl Shared {
    fn started(&self, op: &str) {
        let mut w = self.waiting.lock().expect("waiting");
        w.insert(
            op.to_owned(),
            Waiting {
                since: Some(Instant::now()),
                first: true,
            },
        );
    }

    fn task_arrived(&self, op: &str) {
        let now = Instant::now();
        let mut w = self.waiting.lock().expect("waiting");
        let Some(entry) = w.get_mut(op) else { return };
        if let Some(since) = entry.since.take() {
            let ms = (now - since).as_secs_f64() * 1000.0;
            let into = if std::mem::take(&mut entry.first) {
                &self.first
            } else {
                &self.step
            };
            into.lock().expect("samples").push(ms);
        }
    }

    fn result_sent(&self, op: &str) {
        if let Some(entry) = self.waiting.lock().expect("waiting").get_mut(op) {
            entry.since = Some(Instant::now());
        }
    }

    fn finished(&self, op: &str) {
        self.waiting.lock().expect("waiting").remove(op);
    }
}

/// One simulated agent: a session at a time, reconnecting a second after
/// one is lost (counted), like the real agent.
async fn agent(tls: TlsFiles, mut addr: String, delay: Duration, shared: Arc<Shared>) -> Result<()> {
    loop {
        if let Err(e) = session(&tls, &mut addr, delay, &shared).await
            && shared.sessions_lost.fetch_add(1, Ordering::Relaxed) == 0
        {
            eprintln!("fleet: an agent session was lost (reconnecting): {e:#}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Heartbeats, and answers every task with success after `delay` (`noop`
/// at once), until the stream ends.
async fn session(tls: &TlsFiles, addr: &mut String, delay: Duration, shared: &Arc<Shared>) -> Result<()> {
    let (tx, mut inbound, interval) = util::register_agent(tls, addr, &KINDS).await?;
    let mut ticker = tokio::time::interval(interval);
    let mut seq = 0u64;
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                seq += 1;
                let hb = pb::Heartbeat { sequence: seq, sent_at_unix_ms: 0 };
                tx.send(ConnectRequest { message: Some(connect_request::Message::Heartbeat(hb)) }).await?;
            }
            msg = inbound.message() => match msg? {
                Some(pb::ConnectResponse { message: Some(connect_response::Message::Task(task)) }) => {
                    let noop = task.kind == "noop";
                    if !noop {
                        shared.tasks.fetch_add(1, Ordering::Relaxed);
                        shared.task_arrived(&task.operation_id);
                    }
                    let tx = tx.clone();
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        if !noop {
                            tokio::time::sleep(delay).await;
                        }
                        let result = pb::TaskResult {
                            task_id: task.task_id,
                            success: true,
                            message: "simulated".into(),
                            outputs: Default::default(),
                            replayed: false,
                            finished_at_unix_ms: cutover_shared::domain::now_unix_ms(),
                        };
                        if noop {
                            shared.noops_done.fetch_add(1, Ordering::Relaxed);
                        } else {
                            shared.result_sent(&task.operation_id);
                        }
                        let _ = tx.send(ConnectRequest { message: Some(connect_request::Message::Result(result)) }).await;
                    });
                }
                Some(_) => {}
                None => bail!("the coordinator ended the agent stream"),
            }
        }
    }
}

/// Runs `n` more ad-hoc `noop` operations, 64 at a time, and waits until
/// the agents answered them all.
async fn fill_history(
    c: &CutoverProcs,
    leader: usize,
    clusters: &[(String, String)],
    n: usize,
    shared: &Shared,
) -> Result<()> {
    let target = shared.noops_done.load(Ordering::SeqCst) + n as u64;
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut set = tokio::task::JoinSet::new();
    for k in 0..n {
        let permit = sem.clone().acquire_owned().await?;
        let (region, cluster) = clusters[k % clusters.len()].clone();
        let mut op = c.operator(leader);
        set.spawn(async move {
            let r = op
                .run_task(pb::RunTaskRequest {
                    target: Some(pb::ClusterRef { region, cluster }),
                    kind: "noop".into(),
                    params: Default::default(),
                })
                .await;
            drop(permit);
            r.map(|_| ())
        });
        while let Some(r) = set.try_join_next() {
            r??;
        }
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while shared.noops_done.load(Ordering::SeqCst) < target {
        if Instant::now() > deadline {
            bail!(
                "filler operations not all answered within 120 s: {} of {target} ({} agent sessions lost)",
                shared.noops_done.load(Ordering::SeqCst),
                shared.sessions_lost.load(Ordering::SeqCst)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// One group's figures for one row (raw, so that groups can be merged).
struct GroupRow {
    history: usize,
    completed: usize,
    failed: usize,
    refused: u64,
    step: Vec<f64>,
    first: Vec<f64>,
    tasks: u64,
    /// Leader CPU seconds over the window, and the window's length.
    cpu_s: f64,
    secs: f64,
    /// The orchestrator's scan seconds summed, and the scans counted.
    scan_s: f64,
    scans: f64,
    sessions_lost: u64,
}

struct RowOut {
    history: usize,
    completed: usize,
    failed: usize,
    refused: u64,
    per_min: f64,
    step: (f64, f64, f64),
    first: (f64, f64),
    tasks: u64,
    /// Per group.
    leader_cpu: Vec<f64>,
    cpu_ms_per_task: f64,
    scan_us: f64,
    scans_per_s: f64,
    sessions_lost: u64,
}

impl RowOut {
    /// One row from every group's figures for it.
    fn merge(rows: &[GroupRow], window: Duration) -> RowOut {
        let sum = |f: &dyn Fn(&GroupRow) -> f64| rows.iter().map(f).sum::<f64>();
        let completed = rows.iter().map(|r| r.completed).sum::<usize>();
        let tasks = rows.iter().map(|r| r.tasks).sum::<u64>();
        let step = util::summary(rows.iter().flat_map(|r| r.step.iter().copied()).collect());
        let first = util::summary(rows.iter().flat_map(|r| r.first.iter().copied()).collect());
        let scans = sum(&|r| r.scans).max(1.0);
        RowOut {
            history: rows.iter().map(|r| r.history).sum(),
            completed,
            failed: rows.iter().map(|r| r.failed).sum(),
            refused: rows.iter().map(|r| r.refused).sum(),
            per_min: completed as f64 / window.as_secs_f64() * 60.0,
            step,
            first: (first.0, first.1),
            tasks,
            leader_cpu: rows.iter().map(|r| r.cpu_s / r.secs * 100.0).collect(),
            cpu_ms_per_task: sum(&|r| r.cpu_s) * 1000.0 / tasks.max(1) as f64,
            scan_us: sum(&|r| r.scan_s) / scans * 1e6,
            scans_per_s: rows.iter().map(|r| r.scans / r.secs).sum(),
            sessions_lost: rows.iter().map(|r| r.sessions_lost).sum(),
        }
    }
}

/// Keeps `p.running` deploys going for the window; returns (completed,
/// failed, refused calls).
async fn cutovers(
    c: &CutoverProcs,
    leader: usize,
    apps: Arc<Mutex<VecDeque<String>>>,
    p: &Params,
    shared: Arc<Shared>,
) -> Result<(usize, usize, u64)> {
    let end = Instant::now() + p.window;
    let version = Arc::new(AtomicU64::new(cutover_shared::domain::now_unix_ms() as u64));
    let refused = Arc::new(AtomicU64::new(0));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..p.running {
        let mut op = c.operator(leader);
        let apps = apps.clone();
        let shared = shared.clone();
        let version = version.clone();
        let refused = refused.clone();
        set.spawn(async move {
            let (mut ok, mut failed) = (0usize, 0usize);
            while Instant::now() < end {
                let Some(app) = apps.lock().expect("apps").pop_front() else {
                    bail!("more running deploys than apps");
                };
                let image = format!("fleet:v{}", version.fetch_add(1, Ordering::Relaxed));
                let req = pb::DeployRequest {
                    app: app.clone(),
                    image,
                    strategy: pb::Strategy::Waves as i32,
                    ..Default::default()
                };
                let id = match op.deploy(req).await {
                    Ok(r) => r.into_inner().operation_id,
                    Err(_) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        apps.lock().expect("apps").push_back(app);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                shared.started(&id);
                let mut watch = op
                    .watch_operation(pb::WatchOperationRequest {
                        operation_id: id.clone(),
                    })
                    .await?
                    .into_inner();
                let mut state = 0;
                while let Some(r) = watch.message().await? {
                    state = r.operation.map_or(0, |o| o.state);
                    if state == pb::TaskState::Succeeded as i32 || state == pb::TaskState::Failed as i32 {
                        break;
                    }
                }
                shared.finished(&id);
                // Only what finished inside the window counts.
                if Instant::now() <= end {
                    if state == pb::TaskState::Succeeded as i32 {
                        ok += 1;
                    } else {
                        failed += 1;
                    }
                }
                apps.lock().expect("apps").push_back(app);
            }
            Ok((ok, failed))
        });
    }
    let (mut ok, mut failed) = (0, 0);
    while let Some(r) = set.join_next().await {
        let (o, f) = r??;
        ok += o;
        failed += f;
    }
    Ok((ok, failed, refused.load(Ordering::SeqCst)))
}

/// The whole fleet in `groups` independent Raft groups (the apps, the
/// clusters, the running deploys and the history split evenly, each group
/// with its own three coordinator processes and agents), measured over
/// the same windows: what splitting one group into several buys on the
/// same machine.
pub async fn run(quick: bool, groups: usize) -> Result<serde_json::Value> {
    let groups = groups.max(1);
    let full = Params::new(quick);
    let split = |n: usize| (n / groups).max(1);
    let p = Arc::new(Params {
        apps: split(full.apps),
        clusters_per_region: split(full.clusters_per_region),
        running: split(full.running),
        task_delay: full.task_delay,
        window: full.window,
        history: full.history.iter().map(|&h| h / groups).collect(),
    });
    let load = util::loadavg();
    // Every group starts each row's window together.
    let barrier = Arc::new(tokio::sync::Barrier::new(groups));
    let mut set = tokio::task::JoinSet::new();
    for g in 0..groups {
        set.spawn(group(g, p.clone(), barrier.clone()));
    }
    let mut per_group = Vec::new();
    while let Some(r) = set.join_next().await {
        per_group.push(r??);
    }
    let rows: Vec<RowOut> = (0..p.history.len())
        .map(|_| {
            let row: Vec<GroupRow> = per_group.iter_mut().map(|g| g.remove(0)).collect();
            RowOut::merge(&row, p.window)
        })
        .collect();
    print_rows(&rows, &p, groups, &load)
}

/// One group: its coordinators, agents and apps; a row per history size.
async fn group(g: usize, p: Arc<Params>, barrier: Arc<tokio::sync::Barrier>) -> Result<Vec<GroupRow>> {
    let clusters: Vec<(String, String)> = REGIONS
        .iter()
        .flat_map(|r| (0..p.clusters_per_region).map(move |k| (r.to_string(), format!("c{k:02}"))))
        .collect();
    let ops_addrs: Vec<String> = (0..3).map(|_| cutover_tests::stable_free_addr()).collect();
    let keep = p.history.iter().max().copied().unwrap_or(0) + p.apps * 4;
    let ops_for_config = ops_addrs.clone();
    let c = CutoverProcs::start_configured(&clusters, &[], move |cfg| {
        let i = usize::try_from(cfg.node_id).unwrap_or(1).saturating_sub(1);
        cfg.ops_listen = ops_for_config.get(i).cloned();
        cfg.retention.operations = keep;
    })
    .await?;
    let leader = c.wait_leader(Duration::from_secs(30)).await?;
    let pid = c.pid(leader).expect("leader runs");
    let shared = Arc::new(Shared::default());
    let mut agents = tokio::task::JoinSet::new();
    for (i, _) in clusters.iter().enumerate() {
        agents.spawn(agent(
            c.tc.pki.agents[i].2.clone(),
            c.addr(leader),
            p.task_delay,
            shared.clone(),
        ));
    }
    // Every agent up before the apps.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let up = c
            .operator(leader)
            .list_agents(pb::ListAgentsRequest::default())
            .await?
            .into_inner()
            .agents
            .iter()
            .filter(|a| a.state == pb::AgentState::Up as i32)
            .count();
        if up == clusters.len() {
            break;
        }
        if let Some(r) = agents.try_join_next() {
            r??;
        }
        if Instant::now() > deadline {
            bail!("only {up} of {} agents up after 60 s", clusters.len());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t = Instant::now();
    let mut names = VecDeque::new();
    for a in 0..p.apps {
        let name = format!("app{a:04}");
        let k = a % p.clusters_per_region;
        let regions: Vec<(&str, String)> = REGIONS.iter().map(|r| (*r, format!("c{k:02}"))).collect();
        let refs: Vec<(&str, &str)> = regions.iter().map(|(r, c)| (*r, c.as_str())).collect();
        let mut spec = cutover_tests::sample_app_spec(&name, &refs);
        spec.bake_secs = 0;
        c.operator(leader)
            .apply_app(pb::ApplyAppRequest { app: Some(spec.into()) })
            .await
            .with_context(|| format!("ApplyApp {name}"))?;
        names.push_back(name);
    }
    eprintln!(
        "fleet: group {g}: {} apps applied in {:.1} s",
        p.apps,
        t.elapsed().as_secs_f64()
    );
    let apps = Arc::new(Mutex::new(names));
    let ticks = util::clock_ticks();
    let ops = ops_addrs[leader].clone();
    let mut rows = Vec::new();
    let mut history = 0;
    for &target in &p.history {
        if target > history {
            let t = Instant::now();
            fill_history(&c, leader, &clusters, target - history, &shared).await?;
            eprintln!(
                "fleet: group {g}: {} filler operations in {:.1} s",
                target - history,
                t.elapsed().as_secs_f64()
            );
            history = target;
        }
        barrier.wait().await;
        shared.step.lock().expect("samples").clear();
        shared.first.lock().expect("samples").clear();
        let tasks0 = shared.tasks.load(Ordering::SeqCst);
        let cpu0 = util::cpu_ticks(&pid)?;
        let scan0 = util::histogram(&ops, "cutover_orchestrator_scan_seconds", "").await?;
        let t0 = Instant::now();
        let (completed, failed, refused) = cutovers(&c, leader, apps.clone(), &p, shared.clone()).await?;
        let secs = t0.elapsed().as_secs_f64();
        let cpu1 = util::cpu_ticks(&pid)?;
        let scan1 = util::histogram(&ops, "cutover_orchestrator_scan_seconds", "").await?;
        let tasks = shared.tasks.load(Ordering::SeqCst) - tasks0;
        let cpu_s = (cpu1 - cpu0) as f64 / ticks;
        let step = std::mem::take(&mut *shared.step.lock().expect("samples"));
        let first = std::mem::take(&mut *shared.first.lock().expect("samples"));
        if completed == 0 {
            bail!("group {g}: no deploy completed in the window with {history} finished operations kept");
        }
        let (p50, p99, _) = util::summary(step.clone());
        let sessions_lost = shared.sessions_lost.load(Ordering::SeqCst);
        eprintln!(
            "fleet: group {g}, history {history}: {completed} deploys completed ({failed} failed), step overhead p50 {p50:.1} p99 {p99:.1} ms, {sessions_lost} agent sessions lost so far",
        );
        rows.push(GroupRow {
            history,
            completed,
            failed,
            refused,
            step,
            first,
            tasks,
            cpu_s,
            secs,
            scan_s: scan1.0 - scan0.0,
            scans: scan1.1 - scan0.1,
            sessions_lost,
        });
        // Let what the window left running finish before the next row.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    agents.abort_all();
    Ok(rows)
}

/// Prints the table and returns the results as JSON.
fn print_rows(rows: &[RowOut], p: &Params, groups: usize, load: &str) -> Result<serde_json::Value> {
    // Per group, as "2 x 250", where there are several.
    let shown = |n: usize| {
        if groups == 1 {
            n.to_string()
        } else {
            format!("{groups} x {n}")
        }
    };
    println!(
        "fleet: {} apps in 3 regions ({} clusters each, one simulated agent per cluster, tasks succeed after {} ms), {} deploys in waves running at all times for {:.0} s per row, {}",
        shown(p.apps),
        shown(p.clusters_per_region),
        p.task_delay.as_millis(),
        shown(p.running),
        p.window.as_secs_f64(),
        if groups == 1 {
            "3 coordinator processes".to_owned()
        } else {
            format!("{groups} Raft groups of 3 coordinator processes each, all on this machine")
        }
    );
    println!("load average before the run: {load}");
    println!(
        "{:>8} {:>6} {:>5} {:>7} {:>8} {:>9} {:>9} {:>9} {:>10} {:>10} {:>8} {:>9} {:>9} {:>8}",
        "history",
        "done",
        "fail",
        "refused",
        "ops/min",
        "step p50",
        "step p99",
        "step max",
        "first p50",
        "first p99",
        "ldr cpu%",
        "cpu/task",
        "scan",
        "scans/s"
    );
    let mut out = Vec::new();
    for r in rows {
        let cpu: Vec<String> = r.leader_cpu.iter().map(|c| format!("{c:.0}")).collect();
        println!(
            "{:>8} {:>6} {:>5} {:>7} {:>8.0} {:>6.1} ms {:>6.1} ms {:>6.1} ms {:>7.1} ms {:>7.1} ms {:>8} {:>6.2} ms {:>6.0} us {:>8.0}",
            r.history,
            r.completed,
            r.failed,
            r.refused,
            r.per_min,
            r.step.0,
            r.step.1,
            r.step.2,
            r.first.0,
            r.first.1,
            cpu.join("+"),
            r.cpu_ms_per_task,
            r.scan_us,
            r.scans_per_s
        );
        out.push(json!({
            "finished_operations_kept": r.history,
            "completed": r.completed,
            "failed": r.failed,
            "deploys_refused": r.refused,
            "operations_per_min": r.per_min,
            "step_overhead_ms": {"p50": r.step.0, "p99": r.step.1, "max": r.step.2},
            "first_task_ms": {"p50": r.first.0, "p99": r.first.1},
            "tasks": r.tasks,
            "leader_cpu_pct": r.leader_cpu,
            "leader_cpu_ms_per_task": r.cpu_ms_per_task,
            "orchestrator_scan_us": r.scan_us,
            "orchestrator_scans_per_s": r.scans_per_s,
            "agent_sessions_lost": r.sessions_lost,
        }));
    }
    println!(
        "(history = finished operations kept in the state, all groups; ldr cpu% = each group's leader; step = an agent's last result of a step to the next step's first task; first = Deploy answered to the first task; cpu/task = leader CPU per task dispatched; scan = the orchestrator's scan of the state per tick, mean)"
    );
    Ok(json!({
        "scenario": "fleet",
        "groups": groups,
        "apps": p.apps * groups,
        "clusters_per_region": p.clusters_per_region * groups,
        "running": p.running * groups,
        "task_delay_ms": p.task_delay.as_millis() as u64,
        "window_secs": p.window.as_secs_f64(),
        "loadavg_before": load,
        "rows": out,
    }))
}
