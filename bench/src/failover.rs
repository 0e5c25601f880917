//! `failover`: kill -9 of the leader process while a client writes every
//! 10 ms, round-robin over all three nodes (so a write that fails is followed
//! 10 ms later by one to another node); the figure is the time from the kill
//! to the first acknowledgement of a write sent after the kill. After each
//! trial the killed node restarts from its data directory and catches up
//! before the next trial. cutover runs with its default Raft timings
//! (heartbeat 50 ms, election 150-300 ms); etcd twice, with its own
//! defaults (heartbeat 100 ms, election 1000 ms) and with cutover's
//! election timeout (`--election-timeout 150`: etcd draws each timeout from
//! [150, 300) ms as cutover does; `--heartbeat-interval 30`, as etcd
//! refuses an election timeout under five heartbeats), the like-for-like
//! row.
//!
//! Each trial is broken down by polling the two survivors' status every
//! 2 ms: *detection* is the kill to the first survivor seen in a higher
//! term (its election timer fired), *election* from there to the first
//! survivor seen leading in it, *client* from there to the first
//! acknowledged write (the client finding and reaching the new leader,
//! and the leader committing). The poll adds up to a few ms to where each
//! boundary falls; the total is measured without it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::json;

use cutover_shared::config::RaftConfig;

use crate::commit::OpFuture;
use crate::etcd::{self, EtcdCluster, EtcdOpts};
use crate::util::{self, CutoverProcs};

/// A write to node `i` with sequence number `seq`.
type WriteFn = Arc<dyn Fn(usize, u64) -> OpFuture + Send + Sync>;

/// What a trial needs from a system under test.
trait System {
    async fn leader(&self) -> Result<usize>;
    fn kill9(&mut self, i: usize) -> Instant;
    fn restart(&mut self, i: usize) -> Result<()>;
    /// Waits until node `i` has applied what the leader has committed.
    async fn catch_up(&self, i: usize) -> Result<()>;
    fn writer(&self) -> WriteFn;
    /// Node `i`'s term and whether it leads, if it answers.
    async fn view(&self, i: usize) -> Option<(u64, bool)>;
}

const T: Duration = Duration::from_secs(30);

impl System for CutoverProcs {
    async fn leader(&self) -> Result<usize> {
        self.wait_leader(T).await
    }
    fn kill9(&mut self, i: usize) -> Instant {
        CutoverProcs::kill9(self, i)
    }
    fn restart(&mut self, i: usize) -> Result<()> {
        self.spawn(i)
    }
    async fn catch_up(&self, i: usize) -> Result<()> {
        let l = self.wait_leader(T).await?;
        let index = self.status(l).await.map_or(0, |s| s.commit_index);
        self.wait_applied(i, index, T).await
    }
    async fn view(&self, i: usize) -> Option<(u64, bool)> {
        self.status(i).await.map(|s| (s.term, s.server_state == "leader"))
    }
    fn writer(&self) -> WriteFn {
        let clients: Vec<_> = (0..3).map(|i| self.operator(i)).collect();
        let value = util::value_256();
        Arc::new(move |i, seq| {
            let mut c = clients[i].clone();
            let req = util::attestation(format!("bench/failover:{}", seq % 64), &value);
            Box::pin(async move {
                c.create_attestation(req).await?;
                Ok(())
            })
        })
    }
}

impl System for EtcdCluster {
    async fn leader(&self) -> Result<usize> {
        self.wait_leader(T).await
    }
    fn kill9(&mut self, i: usize) -> Instant {
        EtcdCluster::kill9(self, i)
    }
    fn restart(&mut self, i: usize) -> Result<()> {
        self.spawn(i)
    }
    async fn catch_up(&self, i: usize) -> Result<()> {
        let l = self.wait_leader(T).await?;
        let index = self.status(l).await.map_or(0, |s| s.raft_index);
        self.wait_applied(i, index, T).await
    }
    async fn view(&self, i: usize) -> Option<(u64, bool)> {
        EtcdCluster::view(self, i).await
    }
    fn writer(&self) -> WriteFn {
        let clients: Vec<_> = (0..3).map(|i| self.kv(i)).collect();
        let value = util::value_256().into_bytes();
        Arc::new(move |i, seq| {
            let mut c = clients[i].clone();
            let req = etcd::put(format!("bench/failover/{}", seq % 64), &value);
            Box::pin(async move {
                c.put(req).await?;
                Ok(())
            })
        })
    }
}

/// (sent, acknowledged) of every acknowledged write.
type Acks = Arc<Mutex<Vec<(Instant, Instant)>>>;

/// Writes every 10 ms, each on its own task, round-robin over the nodes.
fn start_writer(write: WriteFn, acks: Acks) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut seq = 0u64;
        loop {
            tick.tick().await;
            seq += 1;
            let fut = write((seq % 3) as usize, seq);
            let acks = acks.clone();
            tokio::spawn(async move {
                let sent = Instant::now();
                if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(15), fut).await {
                    acks.lock().expect("acks").push((sent, Instant::now()));
                }
            });
        }
    })
}

/// One trial, in ms from the kill.
#[derive(Clone, Copy, Debug)]
struct Trial {
    /// To the first acknowledged write sent after the kill.
    total: f64,
    /// To the first survivor seen in a higher term.
    detected: f64,
    /// To the first survivor seen leading in a higher term.
    elected: f64,
}

/// Polls the survivors of a kill every 2 ms for (first seen in a higher
/// term, first seen leading in one), until both are seen.
async fn watch_election<S: System>(s: &S, survivors: [usize; 2], term: u64) -> (Option<Instant>, Option<Instant>) {
    let (mut detected, mut elected) = (None, None);
    let until = Instant::now() + T;
    while elected.is_none() && Instant::now() < until {
        let (a, b) = tokio::join!(s.view(survivors[0]), s.view(survivors[1]));
        let now = Instant::now();
        for (t, leads) in [a, b].into_iter().flatten() {
            if t > term {
                detected.get_or_insert(now);
                if leads {
                    elected.get_or_insert(now);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    (detected, elected)
}

/// One trial: the kill of the leader under writes, and when the
/// survivors noticed, elected, and acknowledged a write again.
async fn trial<S: System>(s: &mut S) -> Result<Trial> {
    let leader = s.leader().await?;
    let term = s.view(leader).await.map_or(0, |(t, _)| t);
    let survivors = match leader {
        0 => [1, 2],
        1 => [0, 2],
        _ => [0, 1],
    };
    let acks: Acks = Default::default();
    let writer = start_writer(s.writer(), acks.clone());
    // Steady writes first.
    let steady = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let recent = acks
            .lock()
            .expect("acks")
            .iter()
            .filter(|(sent, _)| *sent > steady)
            .count();
        if recent >= 10 {
            break;
        }
        if steady.elapsed() > T {
            writer.abort();
            bail!("writes are not being acknowledged before the kill");
        }
    }
    let killed = s.kill9(leader);
    let (detected, elected) = watch_election(s, survivors, term).await;
    let first = loop {
        let first = acks
            .lock()
            .expect("acks")
            .iter()
            .filter(|(sent, _)| *sent >= killed)
            .map(|(_, acked)| *acked)
            .min();
        if let Some(t) = first {
            break t;
        }
        if killed.elapsed() > T {
            writer.abort();
            bail!("no write acknowledged within {T:?} of the kill");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    writer.abort();
    s.restart(leader)?;
    s.catch_up(leader).await?;
    let ms = |t: Instant| (t - killed).as_secs_f64() * 1000.0;
    let total = ms(first);
    // Not seen (the poll missed a short-lived state): the next boundary.
    let elected = elected.map_or(total, ms).min(total);
    Ok(Trial {
        total,
        detected: detected.map_or(elected, ms).min(elected),
        elected,
    })
}

async fn trials<S: System>(s: &mut S, n: usize, name: &str) -> Result<Vec<Trial>> {
    let mut out = Vec::new();
    for k in 0..n {
        let t = trial(s).await?;
        eprintln!(
            "failover {name} trial {}/{n}: {:.0} ms (detected {:.0}, elected {:.0})",
            k + 1,
            t.total,
            t.detected,
            t.elected
        );
        out.push(t);
    }
    Ok(out)
}

pub async fn run(quick: bool, raft: Option<RaftConfig>) -> Result<serde_json::Value> {
    let n = if quick { 3 } else { 30 };
    let load = util::loadavg();
    let tuned = raft.is_some();
    let raft = raft.unwrap_or_default();
    // etcd refuses an election timeout under five heartbeats ("should be at
    // least as 5 times as --heartbeat-interval"): same election timeout,
    // the heartbeat lowered to fit where it must.
    let equal = EtcdOpts {
        heartbeat_ms: raft.heartbeat_interval_ms.min(raft.election_timeout_min_ms / 5),
        election_ms: raft.election_timeout_min_ms,
        ..EtcdOpts::default()
    };
    let mut systems: Vec<(String, String, Vec<Trial>)> = Vec::new();
    {
        let mut c = CutoverProcs::start_with(&[], raft.clone()).await?;
        let t = trials(&mut c, n, "cutover").await?;
        let how = format!(
            "heartbeat {} ms, election timeout {}-{} ms{}",
            raft.heartbeat_interval_ms,
            raft.election_timeout_min_ms,
            raft.election_timeout_max_ms,
            if tuned {
                " (not the defaults)"
            } else {
                " (the defaults)"
            }
        );
        systems.push(("cutover".into(), how, t));
    }
    {
        let mut e = EtcdCluster::start_with(equal.clone())?;
        let t = trials(&mut e, n, "etcd-equal").await?;
        systems.push((
            "etcd-equal".into(),
            format!("{}, cutover's timings", equal.describe()),
            t,
        ));
    }
    // With other cutover timings etcd's own defaults do not change: not rerun.
    if !tuned {
        let opts = EtcdOpts::default();
        let mut e = EtcdCluster::start_with(opts.clone())?;
        let t = trials(&mut e, n, "etcd").await?;
        systems.push(("etcd".into(), format!("{}, etcd's defaults", opts.describe()), t));
    }
    println!(
        "failover: kill -9 of the leader to the first acknowledged write sent after it, writes every 10 ms round-robin over the 3 nodes, {n} trials"
    );
    for (name, how, _) in &systems {
        println!("{name}: {how}");
    }
    println!("load average before the run: {load}");
    println!(
        "{:<10} {:>7} {:>8} {:>8} {:>8} {:>8} | {:>11} {:>11} {:>11}",
        "system", "trials", "p50 ms", "p99 ms", "max ms", "min ms", "detect p50", "elect p50", "client p50"
    );
    let mut out = serde_json::Map::new();
    for (name, how, v) in systems {
        let total: Vec<f64> = v.iter().map(|t| t.total).collect();
        let detect: Vec<f64> = v.iter().map(|t| t.detected).collect();
        let elect: Vec<f64> = v.iter().map(|t| t.elected - t.detected).collect();
        let client: Vec<f64> = v.iter().map(|t| t.total - t.elected).collect();
        let min = total.iter().copied().fold(f64::INFINITY, f64::min);
        let (p50, p99, max) = util::summary(total.clone());
        let (d50, d99, _) = util::summary(detect.clone());
        let (e50, e99, _) = util::summary(elect.clone());
        let (c50, c99, _) = util::summary(client.clone());
        println!(
            "{name:<10} {:>7} {p50:>8.0} {p99:>8.0} {max:>8.0} {min:>8.0} | {d50:>11.0} {e50:>11.0} {c50:>11.0}",
            v.len()
        );
        out.insert(
            name,
            json!({
                "setup": how, "trials": v.len(), "p50_ms": p50, "p99_ms": p99, "max_ms": max, "min_ms": min,
                "samples_ms": total,
                "detection_ms": {"p50": d50, "p99": d99, "samples": detect},
                "election_ms": {"p50": e50, "p99": e99, "samples": elect},
                "client_ms": {"p50": c50, "p99": c99, "samples": client},
            }),
        );
    }
    println!(
        "(detect: kill to a survivor in a higher term; elect: to a survivor leading; client: to the first acknowledged write)"
    );
    out.insert("scenario".into(), "failover".into());
    out.insert("etcd_version".into(), etcd::etcd_version().into());
    out.insert("loadavg_before".into(), load.into());
    out.insert(
        "cutover_raft".into(),
        json!({
            "heartbeat_interval_ms": raft.heartbeat_interval_ms,
            "election_timeout_min_ms": raft.election_timeout_min_ms,
            "election_timeout_max_ms": raft.election_timeout_max_ms,
        }),
    );
    Ok(serde_json::Value::Object(out))
}
