//! Three coordinators and an agent as they run (openraft, redb on disk,
//! tonic over mutual TLS with real certificates, the agent's task store) on
//! a simulated network (turmoil), seeded: message latency, partitions (both
//! ways and one way, the agent cut off from every coordinator), nodes
//! crashed and restarted from their data directories, while an operator
//! client writes attestations and runs `echo` tasks on the agent through
//! whichever coordinator it picks. What `simulation` does not run
//! (openraft itself and the transport) runs here. Checked after every step
//! of the simulation:
//!
//! - at most one leader per term, across the whole run;
//! - a node's applied index never goes back while it runs, and its term
//!   never goes back, restarts included (both are on disk);
//!
//! and at the end, once the faults stopped and every node runs again:
//!
//! - every write the client saw acknowledged is applied on every node;
//! - the nodes' states agree (the same attestations at the same index);
//! - every task the client saw accepted ended, succeeded, on every node,
//!   and the agent started it exactly once (its store counts starts; the
//!   agent is never crashed, so a second start would be a re-sent task run
//!   again).
//!
//! ```sh
//! cargo test -p cutover-coordinator --test netsim                 # the CI set
//! cargo test -p cutover-coordinator --test netsim -- --seeds 200  # seeds 0..200
//! cargo test -p cutover-coordinator --test netsim -- --seed 17    # one seed, its faults printed
//! ```
//!
//! A seed fixes the fault schedule, the latencies and the client's choices.
//! It does not fix everything below: the election timer
//! (`coordinator/src/raft/election.rs`) draws its timeouts from the thread
//! RNG (seeding it would mean a seeded RNG threaded through production
//! code for the test's sake: not done), and tokio's `select!` picks
//! branches at random (seedable only under `--cfg tokio_unstable`, a
//! different build of every crate), so two runs of one seed can interleave
//! differently; a failure prints the seed and its fault schedule, which
//! replays the same faults. The fully reproducible simulation of the
//! decision layer is `simulation`.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

mod common;

use cutover_coordinator::node::Node;
use cutover_coordinator::raft::Consensus;
use cutover_shared::config::{CoordinatorConfig, Member, RaftConfig};
use cutover_shared::net::{Accepted, BoxFuture, Conn};
use cutover_shared::proto::control_service_client::ControlServiceClient;
use cutover_shared::proto::{self as pb};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Connections dialled over the whole run (a retry loop shows here).
static DIALS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

const NODES: usize = 3;
const AGENT: &str = "agent-us-east";
const PORT: u16 = 7000;
/// Simulated time with faults, then without (in which the cluster must
/// settle and every acknowledged write reach every node).
const FAULTY: Duration = Duration::from_secs(30);
const CALM: Duration = Duration::from_secs(30);
const TICK: Duration = Duration::from_millis(10);
/// The seeds CI runs.
const CI_SEEDS: u64 = 6;

fn host(i: usize) -> String {
    format!("coordinator-{}", i + 1)
}

/// turmoil's stream, as the listener takes it (it needs `peek`).
struct SimConn(turmoil::net::TcpStream);

impl AsyncRead for SimConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for SimConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl Accepted for SimConn {
    fn peek<'a>(&'a mut self, buf: &'a mut [u8]) -> BoxFuture<'a, io::Result<usize>> {
        Box::pin(self.0.peek(buf))
    }
}

struct SimListener(turmoil::net::TcpListener);

impl cutover_shared::net::Listener for SimListener {
    type Conn = SimConn;
    fn accept(&self) -> BoxFuture<'_, io::Result<(SimConn, SocketAddr)>> {
        Box::pin(async move {
            let (s, a) = self.0.accept().await?;
            Ok((SimConn(s), a))
        })
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

/// What the client saw: the writes and tasks acknowledged.
#[derive(Default)]
struct History {
    acked: BTreeSet<String>,
    failed: usize,
    /// Operation id → task id, of each task run accepted.
    tasks: BTreeMap<String, String>,
}

/// The run of one seed.
struct Run {
    seed: u64,
    trace: Vec<String>,
    /// Term → the node that led in it.
    leaders: BTreeMap<u64, usize>,
    /// Per node: the highest (term, applied index) seen while it ran.
    seen: Vec<(u64, u64)>,
    elections: usize,
}

#[derive(Default)]
struct Totals {
    seeds: u64,
    steps: u64,
    acked: usize,
    tasks: usize,
    failed: usize,
    terms: usize,
    crashes: usize,
    partitions: usize,
}

fn config(i: usize, dir: &std::path::Path, pki: &cutover_shared::certs::DevPki) -> CoordinatorConfig {
    CoordinatorConfig {
        node_id: i as u64 + 1,
        listen: format!("0.0.0.0:{PORT}"),
        advertise: Some(format!("{}:{PORT}", host(i))),
        data_dir: dir.join(host(i)),
        ops_listen: None,
        log_format: Default::default(),
        tls: pki.coordinators[i].1.clone(),
        initial_members: (0..NODES)
            .map(|j| Member {
                id: j as u64 + 1,
                address: format!("{}:{PORT}", host(j)),
            })
            .collect(),
        agent_heartbeat_interval_ms: 500,
        raft: RaftConfig {
            heartbeat_interval_ms: 50,
            election_timeout_min_ms: 900,
            election_timeout_max_ms: 1200,
            snapshot_every: 200,
            keep_after_snapshot: 50,
            pre_vote: true,
        },
        retention: Default::default(),
    }
}

impl Run {
    fn note(&mut self, sim_ms: u128, what: String) {
        self.trace.push(format!("{sim_ms:>7} ms  {what}"));
    }

    /// The per-step checks, on every node that runs.
    fn check(&mut self, nodes: &[Option<Consensus>]) -> Result<(), String> {
        for (i, c) in nodes.iter().enumerate() {
            let Some(c) = c else { continue };
            let s = c.status();
            let (term, applied) = self.seen[i];
            if s.term < term {
                return Err(format!("node {} went back from term {term} to {}", i + 1, s.term));
            }
            if s.applied_index < applied {
                return Err(format!(
                    "node {} went back from applied index {applied} to {}",
                    i + 1,
                    s.applied_index
                ));
            }
            self.seen[i] = (s.term, s.applied_index);
            // openraft's Leader state (the lease is read on the node's
            // runtime clock, which this loop outside the simulation has not).
            if c.in_leader_state() {
                match self.leaders.insert(s.term, i) {
                    Some(other) if other != i => {
                        return Err(format!("nodes {} and {} both led term {}", other + 1, i + 1, s.term));
                    }
                    None => self.elections += 1,
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

/// Runs `seed`; its fault schedule, or why it failed and the schedule up
/// to the failure.
fn run_seed(seed: u64, totals: &mut Totals) -> Result<Vec<String>, (String, Vec<String>)> {
    let tmp = tempfile::Builder::new().prefix("cutover-netsim-").tempdir().unwrap();
    let pki = cutover_shared::certs::init_dev_pki(
        &tmp.path().join("certs"),
        cutover_shared::identity::DEFAULT_TRUST_DOMAIN,
        NODES as u64,
        &[("us-east", "c1")],
    )
    .unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .simulation_duration(FAULTY + CALM + Duration::from_secs(60))
        .tick_duration(TICK)
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(20))
        .build();

    // Each node's handle, set by its host while it runs, for the checks.
    let handles: Rc<RefCell<Vec<Option<Consensus>>>> = Rc::new(RefCell::new(vec![None; NODES]));
    for i in 0..NODES {
        let cfg = config(i, tmp.path(), &pki);
        let handles = handles.clone();
        sim.host(host(i), move || {
            let cfg = cfg.clone();
            let handles = handles.clone();
            async move {
                let listener = SimListener(turmoil::net::TcpListener::bind(("0.0.0.0", PORT)).await?);
                let node = Node::start(cfg, listener, None).await?;
                handles.borrow_mut()[i] = Some(node.consensus().clone());
                std::future::pending::<()>().await;
                drop(node);
                Ok(())
            }
        });
    }

    // The agent, never crashed (see the module docs); its task store is
    // read at the end.
    let store: Rc<RefCell<Option<Arc<cutover_agent::store::Store>>>> = Rc::default();
    let agent_cfg = agent_config(tmp.path(), &pki);
    let st = store.clone();
    sim.host(AGENT, move || {
        let cfg = agent_cfg.clone();
        let st = st.clone();
        async move {
            let agent = cutover_agent::Agent::new(cfg)?;
            *st.borrow_mut() = Some(agent.store());
            agent.run(std::future::pending()).await;
            Ok(())
        }
    });

    // The operator: writes through a coordinator it picks, one at a time
    // (every fourth an `echo` task on the agent), until the faults stop.
    let history = Rc::new(RefCell::new(History::default()));
    let picks: Vec<usize> = (0..400).map(|_| rng.random_range(0..NODES)).collect();
    let operator = pki.operator.clone();
    let h = history.clone();
    sim.client("operator", async move {
        let clients: Vec<_> = (0..NODES)
            .map(|i| ControlServiceClient::new(operator.channel(&format!("{}:{PORT}", host(i)), None).unwrap()))
            .collect();
        let started = tokio::time::Instant::now();
        let mut k = 0;
        while started.elapsed() < FAULTY {
            let mut c = clients[picks[k % picks.len()]].clone();
            if k % 4 == 3 {
                let call = c.run_task(echo(k));
                match tokio::time::timeout(Duration::from_secs(5), call).await {
                    Ok(Ok(r)) => {
                        let r = r.into_inner();
                        h.borrow_mut().tasks.insert(r.operation_id, r.task_id);
                    }
                    _ => {
                        h.borrow_mut().failed += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                k += 1;
                continue;
            }
            let image = format!("img:{k}");
            let call = c.create_attestation(pb::CreateAttestationRequest {
                image: image.clone(),
                checks: [("tests".to_string(), "passed".to_string())].into(),
            });
            match tokio::time::timeout(Duration::from_secs(5), call).await {
                Ok(Ok(_)) => {
                    h.borrow_mut().acked.insert(image);
                }
                _ => {
                    h.borrow_mut().failed += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            k += 1;
        }
        Ok(())
    });

    let mut run = Run {
        seed,
        trace: vec![],
        leaders: BTreeMap::new(),
        seen: vec![(0, 0); NODES],
        elections: 0,
    };
    let hosts: Vec<String> = (0..NODES).map(host).collect();
    let mut down: BTreeSet<usize> = BTreeSet::new();
    let mut cut = false;
    let fail = |run: &mut Run, e: String| Err((format!("seed {}: {e}", run.seed), std::mem::take(&mut run.trace)));
    let mut steps = 0u64;
    // Faults every 2 s of simulated time, drawn from the seed.
    let every = (Duration::from_secs(2).as_millis() / TICK.as_millis()) as u64;
    loop {
        let elapsed = sim.elapsed();
        let ms = elapsed.as_millis();
        if elapsed < FAULTY && steps > 0 && steps.is_multiple_of(every) {
            // Heal what the last fault did, then maybe make a new one.
            if std::mem::take(&mut cut) {
                run.note(ms, "network repaired".into());
            }
            heal(&mut sim, &mut run, ms, &mut down, &handles);
            match rng.random_range(0..6) {
                0 => {
                    let i = rng.random_range(0..NODES);
                    handles.borrow_mut()[i] = None;
                    sim.crash(host(i));
                    down.insert(i);
                    totals.crashes += 1;
                    run.note(ms, format!("node {} crashed", i + 1));
                }
                1 => {
                    // One node cut off from the other two (and the
                    // operator from the first node).
                    let i = rng.random_range(0..NODES);
                    for (j, b) in hosts.iter().enumerate() {
                        if j != i {
                            sim.partition(hosts[i].as_str(), b.as_str());
                        }
                    }
                    sim.partition("operator", "coordinator-1");
                    cut = true;
                    totals.partitions += 1;
                    run.note(ms, format!("node {} partitioned from the others", i + 1));
                }
                2 => {
                    // One way: a node's messages to another are lost, the
                    // replies come back.
                    let i = rng.random_range(0..NODES);
                    let j = (i + 1 + rng.random_range(0..NODES - 1)) % NODES;
                    sim.partition_oneway(hosts[i].as_str(), hosts[j].as_str());
                    cut = true;
                    totals.partitions += 1;
                    run.note(ms, format!("node {} to node {} cut one way", i + 1, j + 1));
                }
                3 => {
                    for h in &hosts {
                        sim.partition(AGENT, h.as_str());
                    }
                    cut = true;
                    totals.partitions += 1;
                    run.note(ms, "the agent cut off from every coordinator".into());
                }
                _ => {}
            }
        }
        if elapsed >= FAULTY && (cut || !down.is_empty()) {
            cut = false;
            heal(&mut sim, &mut run, ms, &mut down, &handles);
            run.note(ms, "faults stopped".into());
        }
        let finished = match sim.step() {
            Ok(f) => f,
            Err(e) => return fail(&mut run, format!("the simulation stopped: {e}")),
        };
        steps += 1;
        let nodes = handles.borrow().clone();
        if let Err(e) = run.check(&nodes) {
            return fail(&mut run, e);
        }
        if finished && elapsed >= FAULTY + CALM {
            break;
        }
        if finished && settled(&nodes, &history.borrow()) {
            break;
        }
    }
    // Every node runs; each has applied every acknowledged write, and they
    // agree.
    let nodes = handles.borrow().clone();
    let history = history.borrow();
    let mut views = Vec::new();
    for (i, c) in nodes.iter().enumerate() {
        let Some(c) = c else {
            return fail(&mut run, format!("node {} is not running at the end", i + 1));
        };
        let applied = c.status().applied_index;
        let images = c.read(|s| s.attestations.keys().cloned().collect::<BTreeSet<_>>());
        let missing: Vec<&String> = history.acked.difference(&images).collect();
        if !missing.is_empty() {
            return fail(
                &mut run,
                format!(
                    "node {} lacks {} acknowledged writes: {missing:?}",
                    i + 1,
                    missing.len()
                ),
            );
        }
        for op in history.tasks.keys() {
            let state = c.read(|s| s.operations.get(op).map(|o| (o.state, o.summary.clone())));
            if !matches!(state, Some((cutover_shared::domain::TaskState::Succeeded, _))) {
                return fail(
                    &mut run,
                    format!("node {}: accepted task run {op} did not succeed: {state:?}", i + 1),
                );
            }
        }
        views.push((applied, images));
    }
    let Some(store) = store.borrow().clone() else {
        return fail(&mut run, "the agent is not running at the end".into());
    };
    for (op, task) in &history.tasks {
        let n = store.execution_count(task).unwrap();
        if n != 1 {
            return fail(&mut run, format!("task {task} of {op} started {n} times on the agent"));
        }
    }
    if let Some(w) = views.windows(2).find(|w| w[0] != w[1]) {
        let ((a, x), (b, y)) = (&w[0], &w[1]);
        return fail(
            &mut run,
            format!(
                "the nodes' states differ at the end: applied {a} and {b}; attestations on one only: {:?}",
                x.symmetric_difference(y).collect::<Vec<_>>()
            ),
        );
    }
    if history.acked.is_empty() {
        return fail(&mut run, "no write was acknowledged in the whole run".into());
    }
    totals.seeds += 1;
    totals.steps += steps;
    totals.acked += history.acked.len();
    totals.tasks += history.tasks.len();
    totals.failed += history.failed;
    totals.terms += run.elections;
    Ok(run.trace)
}

/// Repairs every link and restarts every crashed node (from its data
/// directory), its handle dropped first so its files are closed.
fn heal(
    sim: &mut turmoil::Sim<'_>,
    run: &mut Run,
    ms: u128,
    down: &mut BTreeSet<usize>,
    handles: &RefCell<Vec<Option<Consensus>>>,
) {
    let hosts: Vec<String> = (0..NODES).map(host).collect();
    for a in &hosts {
        sim.repair(AGENT, a.as_str());
        for b in &hosts {
            if a != b {
                sim.repair(a.as_str(), b.as_str());
            }
        }
    }
    sim.repair("operator", "coordinator-1");
    for i in std::mem::take(down) {
        handles.borrow_mut()[i] = None;
        sim.bounce(host(i));
        run.seen[i].1 = 0;
        run.note(ms, format!("node {} restarted", i + 1));
    }
}

/// Whether every node runs, has applied every acknowledged write, and
/// has every accepted task run finished.
fn settled(nodes: &[Option<Consensus>], history: &History) -> bool {
    // One applied index on every node: what a write that was not
    // acknowledged (a timeout) committed has reached them all too.
    let applied: BTreeSet<Option<u64>> = nodes
        .iter()
        .map(|c| c.as_ref().map(|c| c.status().applied_index))
        .collect();
    applied.len() == 1
        && nodes.iter().all(|c| {
            c.as_ref().is_some_and(|c| {
                c.read(|s| {
                    history.acked.iter().all(|a| s.attestations.contains_key(a))
                        && history
                            .tasks
                            .keys()
                            .all(|op| s.operations.get(op).is_some_and(|o| o.state.is_finished()))
                })
            })
        })
}

/// An `echo` task on the agent that takes 300 ms.
fn echo(k: usize) -> pb::RunTaskRequest {
    pb::RunTaskRequest {
        target: Some(pb::ClusterRef {
            region: "us-east".into(),
            cluster: "c1".into(),
        }),
        kind: "echo".into(),
        params: [
            ("message".to_string(), format!("task {k}")),
            ("delay_ms".to_string(), "300".to_string()),
        ]
        .into(),
    }
}

fn agent_config(dir: &std::path::Path, pki: &cutover_shared::certs::DevPki) -> cutover_shared::config::AgentConfig {
    cutover_shared::config::AgentConfig {
        coordinators: (0..NODES).map(|i| format!("{}:{PORT}", host(i))).collect(),
        data_dir: dir.join(AGENT),
        server_name: None,
        ops_listen: None,
        log_format: Default::default(),
        tls: pki.agents[0].2.clone(),
        reconnect_min_ms: 50,
        reconnect_max_ms: 500,
        databases: vec![],
        drivers: Default::default(),
        backup: None,
        db_status_interval_ms: 1000,
        lease_secs: 30,
        traffic: None,
        prometheus_url: None,
    }
}

fn main() {
    cutover_shared::tls::install_crypto_provider();
    // A panic anywhere in the simulation (tokio catches those of spawned
    // tasks, and the run would go on without them) fails the run.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        hook(info);
        std::process::exit(101);
    }));
    let dialer: cutover_shared::net::Dialer = Arc::new(|addr: String| {
        Box::pin(async move {
            DIALS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let s = turmoil::net::TcpStream::connect(addr).await?;
            Ok(Box::new(s) as Conn)
        })
    });
    assert!(cutover_shared::net::install_dialer(dialer));
    let (seeds, verbose) = common::seeds_from_args(CI_SEEDS);
    let mut totals = Totals::default();
    for seed in seeds {
        eprintln!("netsim: seed {seed}");
        match run_seed(seed, &mut totals) {
            Ok(trace) => {
                if verbose {
                    for line in trace {
                        println!("{line}");
                    }
                    println!("seed {seed}: ok");
                }
            }
            Err((e, trace)) => {
                for line in trace {
                    println!("{line}");
                }
                eprintln!("{e}\nits faults again: cargo test -p cutover-coordinator --test netsim -- --seed {seed}");
                std::process::exit(1);
            }
        }
    }
    println!(
        "netsim: {} seeds checked, {} steps, {} writes acknowledged and found on every node, {} task runs accepted, \
         each run once and succeeded, {} writes or runs failed or timed out, {} terms with a leader, {} crashes, \
         {} partitions, {} connections dialled: no invariant broken",
        totals.seeds,
        totals.steps,
        totals.acked,
        totals.tasks,
        totals.failed,
        totals.terms,
        totals.crashes,
        totals.partitions,
        DIALS.load(std::sync::atomic::Ordering::Relaxed)
    );
}
