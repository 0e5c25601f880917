//! `failover`: kill -9 of the leader process while a client writes every
//! 10 ms, round-robin over all three nodes (so a write that fails is followed
//! 10 ms later by one to another node); the figure is the time from the kill
//! to the first acknowledgement of a write sent after the kill. After each
//! trial the killed node restarts from its data directory and catches up
//! before the next trial. cutover runs with its default Raft timings
//! (heartbeat 100 ms, election 400-800 ms), etcd with its own (heartbeat
//! 100 ms, election 1000 ms).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::json;

use cutover_shared::config::RaftConfig;

use crate::commit::OpFuture;
use crate::etcd::{self, EtcdCluster};
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

/// One trial: milliseconds from the kill to the first acknowledged write
/// sent after it.
async fn trial<S: System>(s: &mut S) -> Result<f64> {
    let leader = s.leader().await?;
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
    Ok((first - killed).as_secs_f64() * 1000.0)
}

async fn trials<S: System>(s: &mut S, n: usize, name: &str) -> Result<Vec<f64>> {
    let mut out = Vec::new();
    for k in 0..n {
        let ms = trial(s).await?;
        eprintln!("failover {name} trial {}/{n}: {ms:.0} ms", k + 1);
        out.push(ms);
    }
    Ok(out)
}

pub async fn run(quick: bool, raft: Option<RaftConfig>) -> Result<serde_json::Value> {
    let n = if quick { 3 } else { 30 };
    let load = util::loadavg();
    let tuned = raft.is_some();
    let raft = raft.unwrap_or_default();
    let cut = {
        let mut c = CutoverProcs::start_with(&[], raft.clone()).await?;
        trials(&mut c, n, "cutover").await?
    };
    // With other cutover timings only cutover runs: etcd's figure does not change.
    let etc = if tuned {
        None
    } else {
        let mut e = EtcdCluster::start()?;
        Some(trials(&mut e, n, "etcd").await?)
    };
    println!(
        "failover: kill -9 of the leader to the first acknowledged write sent after it, writes every 10 ms round-robin over the 3 nodes, {n} trials"
    );
    println!(
        "cutover: Raft heartbeat {} ms, election timeout {}-{} ms ({}); etcd: heartbeat 100 ms, election timeout 1000 ms",
        raft.heartbeat_interval_ms,
        raft.election_timeout_min_ms,
        raft.election_timeout_max_ms,
        if tuned {
            "not the defaults; etcd not run"
        } else {
            "the defaults"
        }
    );
    println!("load average before the run: {load}");
    println!(
        "{:<8} {:>7} {:>10} {:>10} {:>10} {:>10}",
        "system", "trials", "p50 ms", "p99 ms", "max ms", "min ms"
    );
    let mut out = serde_json::Map::new();
    for (name, v) in [("cutover", Some(cut)), ("etcd", etc)] {
        let Some(v) = v else { continue };
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let (p50, p99, max) = util::summary(v.clone());
        println!(
            "{name:<8} {:>7} {p50:>10.0} {p99:>10.0} {max:>10.0} {min:>10.0}",
            v.len()
        );
        out.insert(
            name.into(),
            json!({"trials": v.len(), "p50_ms": p50, "p99_ms": p99, "max_ms": max, "min_ms": min, "samples_ms": v}),
        );
    }
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
