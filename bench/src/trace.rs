//! `trace`: where the time of one write goes. One client writes one
//! attestation at a time to the leader of three `cutover coordinator`
//! processes whose write timeline is on (`RUST_LOG=...,
//! cutover::write_trace=trace`, JSON logs; `coordinator/src/raft/trace.rs`
//! says what each node logs). The bench then joins the client's send and
//! receive times with the nodes' events by log index, and prints each step
//! of a write (client → leader → append and fsync → replicate → follower
//! fsync → commit → apply → reply) with when it starts and how long it
//! takes, like etcd's `--trace`.
//!
//! All processes run on one machine and read one wall clock, so their
//! microsecond timestamps compare directly. A write is matched to the
//! leader's `propose` event that started inside its send-to-receive window
//! (one client, one write at a time: exactly one does).

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde_json::json;

use cutover_shared::config::RaftConfig;

use crate::util::{self, CutoverProcs};

/// One logged stage (see `coordinator/src/raft/trace.rs`).
#[derive(Clone, Debug)]
struct Event {
    stage: String,
    peer: Option<u64>,
    first: u64,
    last: u64,
    start: i64,
    end: i64,
}

impl Event {
    fn covers(&self, index: u64) -> bool {
        self.first <= index && index <= self.last
    }
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// The write-trace events of one node's JSON log.
fn events(log: &std::path::Path) -> Result<Vec<Event>> {
    let text = std::fs::read_to_string(log).with_context(|| log.display().to_string())?;
    let mut out = Vec::new();
    for line in text.lines().filter(|l| l.contains("cutover::write_trace")) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let num = |k: &str| v.get(k).and_then(serde_json::Value::as_i64);
        let (Some(stage), Some(first), Some(last), Some(start), Some(end)) = (
            v.get("stage").and_then(serde_json::Value::as_str),
            num("first"),
            num("last"),
            num("start_us"),
            num("end_us"),
        ) else {
            continue;
        };
        out.push(Event {
            stage: stage.to_owned(),
            peer: num("peer").map(|p| p as u64),
            first: first as u64,
            last: last as u64,
            start,
            end,
        });
    }
    Ok(out)
}

/// The earliest-starting event of `stage` (and `peer`) covering `index`.
fn find<'a>(events: &'a [Event], stage: &str, peer: Option<u64>, index: u64) -> Option<&'a Event> {
    events
        .iter()
        .filter(|e| e.stage == stage && e.covers(index) && (peer.is_none() || e.peer == peer))
        .min_by_key(|e| e.start)
}

/// The steps of a write, as (name, start, end) in µs of the wall clock.
type Steps = Vec<(&'static str, i64, i64)>;

const STEP_NAMES: [&str; 14] = [
    "client -> leader: TLS, HTTP/2, handler, to propose",
    "leader: proposal to its log write (openraft)",
    "leader: log append + fsync",
    "leader: proposal to the append-entries RPC",
    "RPC in flight to the follower (TLS, HTTP/2)",
    "follower: decode to its log write",
    "follower: log append + fsync",
    "follower: fsynced to the reply sent",
    "reply in flight back to the leader",
    "commit (quorum) to apply start on the leader",
    "leader: apply",
    "leader: applied to the response back in the handler",
    "leader -> client: response",
    "total, as the client saw it",
];

/// Joins one write's events. `leader`/`followers` are node ids (1-based).
fn steps(send: i64, recv: i64, nodes: &HashMap<u64, Vec<Event>>, leader: u64, followers: [u64; 2]) -> Option<Steps> {
    let l = &nodes[&leader];
    let propose = l
        .iter()
        .find(|e| e.stage == "propose" && e.start >= send && e.start <= recv)?;
    let index = propose.first;
    let append = find(l, "append", None, index)?;
    let apply = find(l, "apply", None, index)?;
    // The follower whose reply came first made the quorum.
    let (f, send_rpc) = followers
        .iter()
        .filter_map(|&f| Some((f, find(l, "send", Some(f), index)?)))
        .min_by_key(|(_, e)| e.end)?;
    let receive = find(&nodes[&f], "receive", Some(leader), index)?;
    let f_append = find(&nodes[&f], "append", None, index)?;
    let commit = append.end.max(send_rpc.end);
    Some(vec![
        (STEP_NAMES[0], send, propose.start),
        (STEP_NAMES[1], propose.start, append.start),
        (STEP_NAMES[2], append.start, append.end),
        (STEP_NAMES[3], propose.start, send_rpc.start),
        (STEP_NAMES[4], send_rpc.start, receive.start),
        (STEP_NAMES[5], receive.start, f_append.start),
        (STEP_NAMES[6], f_append.start, f_append.end),
        (STEP_NAMES[7], f_append.end, receive.end),
        (STEP_NAMES[8], receive.end, send_rpc.end),
        (STEP_NAMES[9], commit, apply.start),
        (STEP_NAMES[10], apply.start, apply.end),
        (STEP_NAMES[11], apply.end, propose.end),
        (STEP_NAMES[12], propose.end, recv),
        (STEP_NAMES[13], send, recv),
    ])
}

pub async fn run(quick: bool) -> Result<serde_json::Value> {
    let writes = if quick { 30 } else { 1000 };
    let load = util::loadavg();
    let env = [
        (
            "RUST_LOG",
            "info,openraft=warn,h2=warn,tower=warn,cutover::write_trace=trace",
        ),
        ("CUTOVER_LOG_FORMAT", "json"),
    ];
    let c = CutoverProcs::start_env(&[], RaftConfig::default(), &env).await?;
    let leader = c.wait_leader(Duration::from_secs(30)).await?;
    let value = util::value_256();
    let mut client = c.operator(leader);
    // The first write commits the initial membership and opens the
    // connection; a few more warm the path.
    for k in 0..10 {
        client
            .create_attestation(util::attestation(format!("bench/trace:warm{k}"), &value))
            .await?;
    }
    let mut windows = Vec::with_capacity(writes);
    for k in 0..writes {
        let req = util::attestation(format!("bench/trace:{}", k % 64), &value);
        let send = now_us();
        client.create_attestation(req).await?;
        windows.push((send, now_us()));
    }
    // Every node has logged its last stage once it has applied the last write.
    let last = c.status(leader).await.map_or(0, |s| s.commit_index);
    for i in 0..3 {
        c.wait_applied(i, last, Duration::from_secs(30)).await?;
    }
    let mut nodes = HashMap::new();
    for i in 0..3 {
        nodes.insert(i as u64 + 1, events(&c.log_path(i))?);
    }
    let lid = leader as u64 + 1;
    let fids: Vec<u64> = (1..=3).filter(|&i| i != lid).collect();
    let followers = [fids[0], fids[1]];
    let traced: Vec<Steps> = windows
        .iter()
        .filter_map(|&(s, r)| steps(s, r, &nodes, lid, followers))
        .collect();
    if traced.len() < writes / 2 {
        bail!(
            "only {} of {writes} writes could be traced (events per node: {:?})",
            traced.len(),
            nodes.iter().map(|(k, v)| (*k, v.len())).collect::<Vec<_>>()
        );
    }
    println!(
        "trace: where one write goes; one client, {writes} sequential CreateAttestation writes (256-byte value) to the leader of 3 nodes on loopback, fsync on; {} traced",
        traced.len()
    );
    println!("load average before the run: {load}");
    println!(
        "{:<54} {:>11} {:>9} {:>9}",
        "step (ms)", "starts p50", "takes p50", "takes p99"
    );
    let mut rows = Vec::new();
    for (k, name) in STEP_NAMES.iter().enumerate() {
        let starts: Vec<f64> = traced.iter().map(|t| (t[k].1 - t[0].1) as f64 / 1000.0).collect();
        let takes: Vec<f64> = traced.iter().map(|t| (t[k].2 - t[k].1) as f64 / 1000.0).collect();
        let (s50, _, _) = util::summary(starts);
        let (d50, d99, _) = util::summary(takes);
        println!("{name:<54} {s50:>11.3} {d50:>9.3} {d99:>9.3}");
        rows.push(json!({"step": name, "starts_p50_ms": s50, "takes_p50_ms": d50, "takes_p99_ms": d99}));
    }
    println!(
        "(steps overlap: the leader's own fsync runs beside replication; commit is the later of the leader's fsync and the first follower's reply)"
    );
    Ok(json!({
        "scenario": "trace",
        "writes": writes,
        "traced": traced.len(),
        "loadavg_before": load,
        "steps": rows,
    }))
}
