//! `fanin`: many simulated agents on the real agent stream
//! (`AgentService.Connect`, bidirectional, mTLS with one client certificate
//! per agent naming `spiffe://cutover/agent/bench/aNNNNN`) against three
//! `cutover coordinator` processes with the default 1 s heartbeat. Each
//! simulated agent speaks the protocol of `cutover-agent`: `Register`, then
//! a `Heartbeat` every interval, each answered by a `HeartbeatAck` carrying
//! its sequence number; the round trip is send to ack, measured in this
//! process. Reported per row: the leader process's CPU and resident memory,
//! the heartbeat round trip, and how long after its last heartbeat a
//! silenced agent (stream left open, heartbeats stopped) is listed down.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cutover_shared::proto::{self as pb, ConnectRequest, connect_request, connect_response};
use cutover_shared::tls::TlsFiles;
use serde_json::json;
use tokio::sync::Semaphore;

use crate::util::{self, CutoverProcs};

const REGION: &str = "bench";

fn cluster_name(i: usize) -> String {
    format!("a{i:05}")
}

#[derive(Default)]
struct Shared {
    measuring: AtomicBool,
    rtts: Mutex<Vec<f64>>,
    registered: AtomicUsize,
    sessions_lost: AtomicU64,
    heartbeats_sent: AtomicU64,
}

#[derive(Default)]
struct Ctl {
    silenced: AtomicBool,
    last_heartbeat: Mutex<Option<Instant>>,
}

/// One simulated agent: connect (following a redirect), register, then
/// heartbeat until the task is aborted. A lost session reconnects after a
/// jittered 0.5-1.5 s (the real agent backs off exponentially with jitter,
/// so a fleet that lost its leader does not return in lockstep), unless the
/// agent was silenced.
async fn agent(i: usize, tls: TlsFiles, mut addr: String, shared: Arc<Shared>, ctl: Arc<Ctl>, ramp: Arc<Semaphore>) {
    let mut first = true;
    let mut attempt = 0usize;
    loop {
        attempt += 1;
        let permit = if first {
            ramp.clone().acquire_owned().await.ok()
        } else {
            None
        };
        // A failed or ended session counts as lost; its cause does not matter here.
        let _ = session(i, &tls, &mut addr, &shared, &ctl, permit).await;
        first = false;
        if ctl.silenced.load(Ordering::SeqCst) {
            // Silenced: stay quiet (and do not re-register).
            std::future::pending::<()>().await;
        }
        shared.sessions_lost.fetch_add(1, Ordering::Relaxed);
        let jitter = (i * 7919 + attempt * 104_729) % 1000;
        tokio::time::sleep(Duration::from_millis(500 + jitter as u64)).await;
    }
}

async fn session(
    i: usize,
    tls: &TlsFiles,
    addr: &mut String,
    shared: &Shared,
    ctl: &Ctl,
    mut permit: Option<tokio::sync::OwnedSemaphorePermit>,
) -> Result<()> {
    let (tx, mut inbound, interval) = util::register_agent(tls, addr, &[])
        .await
        .with_context(|| format!("agent {i}"))?;
    shared.registered.fetch_add(1, Ordering::SeqCst);
    drop(permit.take());
    // Spread the fleet's heartbeats over the interval.
    let phase = interval.mul_f64((i * 7919 % 1000) as f64 / 1000.0);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + phase, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let mut sent: HashMap<u64, Instant> = HashMap::new();
    let result = loop {
        tokio::select! {
            _ = ticker.tick() => {
                if ctl.silenced.load(Ordering::SeqCst) {
                    continue;
                }
                seq += 1;
                let now = Instant::now();
                sent.insert(seq, now);
                *ctl.last_heartbeat.lock().expect("last heartbeat") = Some(now);
                shared.heartbeats_sent.fetch_add(1, Ordering::Relaxed);
                let hb = pb::Heartbeat { sequence: seq, sent_at_unix_ms: 0 };
                if tx.send(ConnectRequest { message: Some(connect_request::Message::Heartbeat(hb)) }).await.is_err() {
                    break Ok(());
                }
            }
            msg = inbound.message() => match msg {
                Ok(Some(pb::ConnectResponse { message: Some(connect_response::Message::HeartbeatAck(ack)) })) => {
                    if let Some(t) = sent.remove(&ack.sequence)
                        && shared.measuring.load(Ordering::Relaxed)
                    {
                        shared.rtts.lock().expect("rtts").push(util::ms_since(t));
                    }
                    sent.retain(|s, _| *s > ack.sequence);
                }
                Ok(Some(_)) => {}
                Ok(None) => break Ok(()),
                Err(s) => break Err(anyhow::anyhow!("{s}")),
            }
        }
    };
    shared.registered.fetch_sub(1, Ordering::SeqCst);
    result
}

struct RowOut {
    agents: usize,
    registered: usize,
    connect_secs: f64,
    hb_p50: f64,
    hb_p99: f64,
    hb_max: f64,
    acks: usize,
    leader_cpu: f64,
    leader_rss: f64,
    /// All three coordinators: the largest resident set, and their CPU
    /// together (% of one core).
    max_rss: f64,
    all_cpu: f64,
    bench_cpu: f64,
    machine_busy: f64,
    down_after: f64,
    sessions_lost: u64,
    /// Raft term changes from the row's start to its end: a leader
    /// election under the registration load shows here.
    elections: u64,
}

pub async fn run(quick: bool) -> Result<serde_json::Value> {
    // `BENCH_FANIN_AGENTS=5000,15000` picks other rows (ascending), to find
    // the largest fleet one leader holds.
    let counts: Vec<usize> = match std::env::var("BENCH_FANIN_AGENTS") {
        Ok(v) => {
            let c: Vec<usize> = v
                .split(',')
                .map(|n| n.trim().parse())
                .collect::<Result<_, _>>()
                .context("BENCH_FANIN_AGENTS: comma-separated agent counts")?;
            if c.is_empty() || c.windows(2).any(|w| w[0] >= w[1]) || c[0] == 0 {
                bail!("BENCH_FANIN_AGENTS: counts must be positive and ascending, got {v:?}");
            }
            c
        }
        Err(_) if quick => vec![50, 200],
        Err(_) => vec![1000, 5000, 10000],
    };
    let settle = Duration::from_secs(if quick { 2 } else { 3 });
    let window = Duration::from_secs(if quick { 3 } else { 10 });
    let max = *counts.last().expect("rows");
    let load = util::loadavg();
    if let Some(limit) = util::nofile_limit()
        && limit < max as u64 + 1024
    {
        bail!(
            "open-file limit {limit} is too low for {max} agents (this process and the leader each hold one socket per agent): run under `ulimit -n {}`",
            max + 4096
        );
    }
    let agents: Vec<(String, String)> = (0..max).map(|i| (REGION.to_string(), cluster_name(i))).collect();
    let t = Instant::now();
    let c = CutoverProcs::start(&agents).await?;
    eprintln!(
        "fanin: issued {max} agent certificates in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let leader = c.wait_leader(Duration::from_secs(30)).await?;
    let pid = c.pid(leader).expect("leader runs");
    let leader_addr = c.addr(leader);
    // Agents dial a coordinator of the three in turn, as real agents pick
    // one at random and stay; `BENCH_FANIN_DIAL=leader` sends them all to
    // the leader (every node serves agents since 2026-12-06; before, only
    // the leader did, and these rows measured that).
    let spread = std::env::var("BENCH_FANIN_DIAL").as_deref() != Ok("leader");
    let pids: Vec<String> = (0..3).filter_map(|i| c.pid(i)).collect();
    let shared = Arc::new(Shared::default());
    let ramp = Arc::new(Semaphore::new(64));
    let mut tasks = tokio::task::JoinSet::new();
    let mut ctls: Vec<Arc<Ctl>> = Vec::new();
    let ticks = util::clock_ticks();
    let self_pid = std::process::id().to_string();
    let mut rows = Vec::new();
    // Row k starts with the k agents silenced by the rows before it.
    for (silenced, &n) in counts.iter().enumerate() {
        let t0 = Instant::now();
        let term0 = c.status(leader).await.map(|s| s.term);
        while ctls.len() < n {
            let i = ctls.len();
            let ctl = Arc::new(Ctl::default());
            ctls.push(ctl.clone());
            tasks.spawn(agent(
                i,
                c.tc.pki.agents[i].2.clone(),
                if spread { c.addr(i % 3) } else { leader_addr.clone() },
                shared.clone(),
                ctl,
                ramp.clone(),
            ));
        }
        let expected = n - silenced;
        loop {
            let r = shared.registered.load(Ordering::SeqCst);
            if r >= expected {
                break;
            }
            if t0.elapsed() > Duration::from_secs(300) {
                bail!("only {r} of {expected} agents registered within 300 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let connect_secs = t0.elapsed().as_secs_f64();
        eprintln!("fanin: {n} agents registered in {connect_secs:.1} s");
        tokio::time::sleep(settle).await;
        // Measurement window.
        let lost0 = shared.sessions_lost.load(Ordering::SeqCst);
        shared.rtts.lock().expect("rtts").clear();
        let cpu0 = util::cpu_ticks(&pid)?;
        let all0: u64 = pids.iter().map(|p| util::cpu_ticks(p)).sum::<Result<u64>>()?;
        let self0 = util::cpu_ticks(&self_pid)?;
        let (idle0, total0) = util::machine_ticks()?;
        shared.measuring.store(true, Ordering::SeqCst);
        let perf = crate::commit::maybe_perf(&format!("fanin-{n}"), &pid, window.as_secs_f64());
        tokio::time::sleep(window).await;
        shared.measuring.store(false, Ordering::SeqCst);
        let cpu1 = util::cpu_ticks(&pid)?;
        let all1: u64 = pids.iter().map(|p| util::cpu_ticks(p)).sum::<Result<u64>>()?;
        let self1 = util::cpu_ticks(&self_pid)?;
        let (idle1, total1) = util::machine_ticks()?;
        for mut p in perf {
            let _ = p.wait();
        }
        let rss = util::rss_mib(&pid)?;
        let max_rss = pids
            .iter()
            .map(|p| util::rss_mib(p))
            .collect::<Result<Vec<f64>>>()?
            .into_iter()
            .fold(0.0, f64::max);
        let rtts = std::mem::take(&mut *shared.rtts.lock().expect("rtts"));
        let acks = rtts.len();
        let (hb_p50, hb_p99, hb_max) = util::summary(rtts);
        let w = window.as_secs_f64();
        // Silence one agent (its stream stays open) and wait for "down".
        let victim = ctls.len() - 1;
        ctls[victim].silenced.store(true, Ordering::SeqCst);
        let name = cluster_name(victim);
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut op = c.operator(leader);
        // The one page holding the victim: listing all 10,000 agents each
        // poll measured the listing more than the detection.
        let page_token = victim
            .checked_sub(1)
            .map(|v| format!("{REGION}/{}", cluster_name(v)))
            .unwrap_or_default();
        let down_at = loop {
            let list = op
                .list_agents(pb::ListAgentsRequest {
                    page_size: 1,
                    page_token: page_token.clone(),
                })
                .await
                .context("ListAgents")?
                .into_inner();
            let down = list.agents.iter().any(|a| {
                a.cluster.as_ref().is_some_and(|r| r.cluster == name) && a.state == pb::AgentState::Down as i32
            });
            if down {
                break Instant::now();
            }
            if Instant::now() > deadline {
                bail!("silenced agent {name} was not listed down within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let last = ctls[victim]
            .last_heartbeat
            .lock()
            .expect("last heartbeat")
            .context("silenced agent never sent a heartbeat")?;
        rows.push(RowOut {
            agents: n,
            registered: expected,
            connect_secs,
            hb_p50,
            hb_p99,
            hb_max,
            acks,
            leader_cpu: (cpu1 - cpu0) as f64 / ticks / w * 100.0,
            leader_rss: rss,
            max_rss,
            all_cpu: (all1 - all0) as f64 / ticks / w * 100.0,
            bench_cpu: (self1 - self0) as f64 / ticks / w * 100.0,
            machine_busy: (1.0 - (idle1 - idle0) as f64 / (total1 - total0).max(1) as f64) * 100.0,
            down_after: (down_at - last).as_secs_f64(),
            sessions_lost: shared.sessions_lost.load(Ordering::SeqCst) - lost0,
            elections: match (term0, c.status(leader).await.map(|s| s.term)) {
                (Some(a), Some(b)) => b.saturating_sub(a),
                // The first leader no longer answers: it lost at least once.
                _ => 1,
            },
        });
        if let Some(r) = rows.last()
            && r.elections > 0
        {
            eprintln!("fanin: {} Raft term change(s) during the {n}-agent row", r.elections);
        }
    }
    tasks.abort_all();
    drop(c);
    println!(
        "fanin: simulated agents on AgentService.Connect (mTLS, one certificate and connection each), 1 s heartbeats, 3 coordinator processes, agents dialing {}; {:.0} s window per row",
        if spread { "the three in turn" } else { "the leader" },
        window.as_secs_f64()
    );
    println!("load average before the run: {load}");
    println!(
        "{:>7} {:>10} {:>9} {:>9} {:>9} {:>8} {:>8} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>7} {:>6}",
        "agents",
        "connect s",
        "hb p50",
        "hb p99",
        "hb max",
        "acks/s",
        "ldr cpu%",
        "ldr RSS",
        "max RSS",
        "all cpu%",
        "gen cpu%",
        "busy%",
        "down s",
        "lost",
        "terms"
    );
    let mut out = Vec::new();
    for r in &rows {
        println!(
            "{:>7} {:>10.1} {:>6.1} ms {:>6.1} ms {:>6.1} ms {:>8.0} {:>8.0} {:>5.0} MiB {:>5.0} MiB {:>8.0} {:>8.0} {:>8.0} {:>8.2} {:>7} {:>6}",
            r.agents,
            r.connect_secs,
            r.hb_p50,
            r.hb_p99,
            r.hb_max,
            r.acks as f64 / window.as_secs_f64(),
            r.leader_cpu,
            r.leader_rss,
            r.max_rss,
            r.all_cpu,
            r.bench_cpu,
            r.machine_busy,
            r.down_after,
            r.sessions_lost,
            r.elections
        );
        out.push(json!({
            "agents": r.agents,
            "registered": r.registered,
            "connect_secs": r.connect_secs,
            "heartbeat_rtt_ms": {"p50": r.hb_p50, "p99": r.hb_p99, "max": r.hb_max},
            "acks_per_s": r.acks as f64 / window.as_secs_f64(),
            "leader_cpu_pct": r.leader_cpu,
            "leader_rss_mib": r.leader_rss,
            "max_node_rss_mib": r.max_rss,
            "coordinators_cpu_pct": r.all_cpu,
            "generator_cpu_pct": r.bench_cpu,
            "machine_busy_pct": r.machine_busy,
            "silenced_down_after_last_heartbeat_s": r.down_after,
            "sessions_lost": r.sessions_lost,
            "raft_term_changes": r.elections,
        }));
    }
    println!(
        "(hb = heartbeat sent to its ack received, in this process; ldr = the leader process; max RSS = the largest of the three coordinators; all cpu% = the three together; gen = this load generator, % of one core; busy = both cores; down s = last heartbeat of a silenced agent to ListAgents showing it down; lost = sessions lost in the window; terms = Raft term changes over the row)"
    );
    Ok(json!({
        "scenario": "fanin",
        "heartbeat_interval_ms": 1000,
        "agents_dial": if spread { "spread" } else { "leader" },
        "window_secs": window.as_secs_f64(),
        "loadavg_before": load,
        "rows": out,
    }))
}
