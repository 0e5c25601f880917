//! `commit`: replicated write throughput and latency through each system's
//! public write path, cutover's `ControlService.CreateAttestation` (operator
//! mTLS client, one 256-byte check value) and etcd's `KV.Put` (256-byte
//! value), against 3 nodes on loopback with durable (fsynced) commits, for a
//! fixed time per row with 1, 64 and 256 closed-loop clients. Every client
//! has its own connection to the leader. etcd runs twice: with mutual TLS on
//! its client and peer ports (certificates from one CA, as cutover's), the
//! like-for-like comparison, and plaintext, as a second table.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::json;
use tokio::task::JoinSet;

use cutover_shared::config::RaftConfig;

use crate::etcd::{self, EtcdCluster, EtcdOpts};
use crate::util::{self, CutoverProcs, ms_since};

pub type OpFuture = Pin<Box<dyn Future<Output = Result<()>> + Send>>;
/// One client's write: called with the client's sequence number.
pub type Op = Box<dyn FnMut(u64) -> OpFuture + Send>;

/// One row of the table, for one system.
#[derive(Clone, Debug, Default)]
pub struct Row {
    pub clients: usize,
    pub ops: usize,
    pub ops_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
    /// The leader process's CPU over the row, % of one core.
    pub leader_cpu: f64,
    /// The whole machine's busy share over the row, % of all cores.
    pub machine_busy: f64,
}

impl Row {
    fn json(&self) -> serde_json::Value {
        json!({
            "clients": self.clients,
            "ops": self.ops,
            "ops_per_s": self.ops_per_s,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "errors": self.errors,
            "leader_cpu_pct": self.leader_cpu,
            "machine_busy_pct": self.machine_busy,
        })
    }
}

/// Runs every client in a closed loop for `warmup + dur`; what completes
/// inside the last `dur` counts.
/// Every client first makes one untimed call (which also opens its
/// connection, and for cutover completes its TLS handshake); the clock starts
/// once all have.
pub async fn drive(ops: Vec<Op>, warmup: Duration, dur: Duration, leader_pid: &str) -> Result<Row> {
    let clients = ops.len();
    let ready = std::sync::Arc::new(tokio::sync::Barrier::new(clients + 1));
    let (times_tx, times_rx) = tokio::sync::watch::channel(None::<(Instant, Instant)>);
    let mut set = JoinSet::new();
    for mut op in ops {
        let ready = ready.clone();
        let mut times = times_rx.clone();
        set.spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), op(u64::MAX)).await;
            ready.wait().await;
            let (start, end) = loop {
                if let Some(t) = *times.borrow_and_update() {
                    break t;
                }
                if times.changed().await.is_err() {
                    return (vec![], 0);
                }
            };
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut seq = 0u64;
            while Instant::now() < end {
                let t = Instant::now();
                let r = tokio::time::timeout(Duration::from_secs(10), op(seq)).await;
                seq += 1;
                let done = Instant::now();
                let ok = matches!(r, Ok(Ok(())));
                if done >= start && done <= end {
                    if ok {
                        lat.push(ms_since(t));
                    } else {
                        errors += 1;
                    }
                }
                if !ok {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            (lat, errors)
        });
    }
    ready.wait().await;
    let start = Instant::now() + warmup;
    let end = start + dur;
    let _ = times_tx.send(Some((start, end)));
    tokio::time::sleep_until(start.into()).await;
    let ticks = util::clock_ticks();
    let cpu0 = util::cpu_ticks(leader_pid)?;
    let (idle0, total0) = util::machine_ticks()?;
    tokio::time::sleep_until(end.into()).await;
    let cpu1 = util::cpu_ticks(leader_pid)?;
    let (idle1, total1) = util::machine_ticks()?;
    let mut all = Vec::new();
    let mut errors = 0;
    while let Some(r) = set.join_next().await {
        let (lat, e) = r?;
        all.extend(lat);
        errors += e;
    }
    let ops = all.len();
    let (p50, p99, _) = util::summary(all);
    let busy = 1.0 - (idle1 - idle0) as f64 / (total1 - total0).max(1) as f64;
    Ok(Row {
        clients,
        ops,
        ops_per_s: ops as f64 / dur.as_secs_f64(),
        p50_ms: p50,
        p99_ms: p99,
        errors,
        leader_cpu: (cpu1 - cpu0) as f64 / ticks / dur.as_secs_f64() * 100.0,
        machine_busy: busy * 100.0,
    })
}

/// With `BENCH_PERF_DIR` set: `perf record` (CPU profile) and `perf stat`
/// (fsync and fdatasync calls) on `pid` for `secs`, into that directory.
pub fn maybe_perf(label: &str, pid: &str, secs: f64) -> Vec<std::process::Child> {
    let Ok(dir) = std::env::var("BENCH_PERF_DIR") else {
        return vec![];
    };
    println!("perf: recording {label} (pid {pid}) for {secs:.1} s into {dir}/{label}.perf.data and .stat");
    let secs = format!("{secs:.1}");
    let record = [
        "record",
        "-F",
        "499",
        "--call-graph",
        "dwarf",
        "-p",
        pid,
        "-o",
        &format!("{dir}/{label}.perf.data"),
    ];
    let stat = [
        "stat",
        "-e",
        "syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync",
        "-p",
        pid,
        "-o",
        &format!("{dir}/{label}.stat"),
    ];
    [&record[..], &stat[..]]
        .iter()
        .filter_map(|args| {
            std::process::Command::new("perf")
                .args(*args)
                .args(["--", "sleep", &secs])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .ok()
        })
        .collect()
}

pub struct Params {
    pub clients: Vec<usize>,
    pub warmup: Duration,
    pub dur: Duration,
}

impl Params {
    pub fn new(quick: bool) -> Params {
        if quick {
            Params {
                clients: vec![1, 4, 16],
                warmup: Duration::from_millis(200),
                dur: Duration::from_millis(800),
            }
        } else {
            Params {
                clients: vec![1, 64, 256],
                warmup: Duration::from_millis(500),
                dur: Duration::from_secs(5),
            }
        }
    }
}

/// What the leader spent building snapshots during one row: how many,
/// and the mean of each phase (`cutover_raft_snapshot_seconds`).
#[derive(Default)]
struct Snapshots {
    built: u64,
    copy_ms: f64,
    encode_ms: f64,
    write_ms: f64,
}

const PHASES: [&str; 3] = ["copy", "encode", "write"];

/// The leader's snapshot histograms, (sum, count) per phase.
async fn snapshot_totals(ops: &str) -> Result<Vec<(f64, f64)>> {
    let mut out = Vec::new();
    for phase in PHASES {
        out.push(util::histogram(ops, "cutover_raft_snapshot_seconds", &format!("{{phase=\"{phase}\"}}")).await?);
    }
    Ok(out)
}

fn snapshots_between(before: &[(f64, f64)], after: &[(f64, f64)]) -> Snapshots {
    let mean_ms = |i: usize| {
        let n = after[i].1 - before[i].1;
        if n > 0.0 {
            1000.0 * (after[i].0 - before[i].0) / n
        } else {
            0.0
        }
    };
    Snapshots {
        built: (after[0].1 - before[0].1) as u64,
        copy_ms: mean_ms(0),
        encode_ms: mean_ms(1),
        write_ms: mean_ms(2),
    }
}

async fn cutover_rows(p: &Params, value: &str, raft: RaftConfig) -> Result<(Vec<Row>, Vec<Snapshots>)> {
    let ops_addrs: Vec<String> = (0..3).map(|_| cutover_tests::stable_free_addr()).collect();
    let ops_for_config = ops_addrs.clone();
    let c = CutoverProcs::start_configured(&[], &[], move |cfg| {
        let i = usize::try_from(cfg.node_id).unwrap_or(1).saturating_sub(1);
        cfg.ops_listen = ops_for_config.get(i).cloned();
        cfg.raft = raft.clone();
    })
    .await?;
    let leader = c.wait_leader(Duration::from_secs(30)).await?;
    let ops = ops_addrs[leader].clone();
    let pid = c.pid(leader).expect("leader runs");
    // The first write also commits the initial membership.
    c.operator(leader)
        .create_attestation(util::attestation("bench/commit:warm".into(), value))
        .await?;
    let mut rows = Vec::new();
    let mut snapshots = Vec::new();
    for &n in &p.clients {
        let mut clients: Vec<Op> = Vec::new();
        for k in 0..n {
            let ch = c.tc.pki.operator.channel(&c.addr(leader), None)?;
            let client = cutover_shared::proto::control_service_client::ControlServiceClient::new(ch);
            let value = value.to_string();
            clients.push(Box::new(move |seq| {
                let mut client = client.clone();
                let req = util::attestation(format!("bench/commit:c{k}-{}", seq % 64), &value);
                Box::pin(async move {
                    client.create_attestation(req).await?;
                    Ok(())
                })
            }));
        }
        let perf = maybe_perf(
            &format!("commit-cutover-{n}"),
            &pid,
            p.warmup.as_secs_f64() + p.dur.as_secs_f64(),
        );
        let before = snapshot_totals(&ops).await?;
        let row = drive(clients, p.warmup, p.dur, &pid).await?;
        snapshots.push(snapshots_between(&before, &snapshot_totals(&ops).await?));
        for mut p in perf {
            let _ = p.wait();
        }
        if row.ops == 0 {
            bail!("cutover: no write completed with {n} clients ({} errors)", row.errors);
        }
        rows.push(row);
    }
    Ok((rows, snapshots))
}

async fn etcd_rows(p: &Params, value: &str, opts: EtcdOpts) -> Result<Vec<Row>> {
    let label = if opts.tls { "etcd-tls" } else { "etcd" };
    let e = EtcdCluster::start_with(opts)?;
    let leader = e.wait_leader(Duration::from_secs(30)).await?;
    let pid = e.pid(leader).expect("leader runs");
    e.kv(leader)
        .put(etcd::put("bench/warm".into(), value.as_bytes()))
        .await?;
    let mut rows = Vec::new();
    for &n in &p.clients {
        let mut ops: Vec<Op> = Vec::new();
        for k in 0..n {
            let client = e.kv_own_connection(leader)?;
            let value = value.as_bytes().to_vec();
            ops.push(Box::new(move |seq| {
                let mut client = client.clone();
                let req = etcd::put(format!("bench/commit/c{k}-{}", seq % 64), &value);
                Box::pin(async move {
                    client.put(req).await?;
                    Ok(())
                })
            }));
        }
        let perf = maybe_perf(
            &format!("commit-{label}-{n}"),
            &pid,
            p.warmup.as_secs_f64() + p.dur.as_secs_f64(),
        );
        let row = drive(ops, p.warmup, p.dur, &pid).await?;
        for mut p in perf {
            let _ = p.wait();
        }
        if row.ops == 0 {
            bail!("etcd: no write completed with {n} clients ({} errors)", row.errors);
        }
        rows.push(row);
    }
    Ok(rows)
}

/// With `snapshot_every`, cutover builds a snapshot after that many entries
/// instead of its default 2000 (to show what snapshots cost).
pub async fn run(quick: bool, snapshot_every: Option<u64>) -> Result<serde_json::Value> {
    let p = Params::new(quick);
    let mut raft = RaftConfig::default();
    if let Some(n) = snapshot_every {
        raft.snapshot_every = n;
    }
    let value = util::value_256();
    let load = util::loadavg();
    // Both systems keep their data in temporary directories under this one;
    // measured before either starts, on an otherwise idle harness.
    let probe = tempfile::Builder::new().prefix("cutover-bench-fsync-").tempdir()?;
    let fsync = util::fsync_latency(probe.path(), 200, true)?;
    let fsync_pre = util::fsync_latency(probe.path(), 200, false)?;
    let redb_one = util::redb_commit_latency(probe.path(), 200, 1)?;
    let redb_two = util::redb_commit_latency(probe.path(), 200, 2)?;
    let fsync_dir = std::env::temp_dir();
    drop(probe);
    let (cut, snapshots) = cutover_rows(&p, &value, raft.clone()).await?;
    let tls = EtcdOpts {
        tls: true,
        ..EtcdOpts::default()
    };
    let etc_tls = etcd_rows(&p, &value, tls).await?;
    let etc = etcd_rows(&p, &value, EtcdOpts::default()).await?;
    let version = etcd::etcd_version();
    println!(
        "commit: closed-loop writes to the leader, 3 nodes on loopback, fsync on, 256-byte values, {:.1} s per row (after {:.1} s warm-up)",
        p.dur.as_secs_f64(),
        p.warmup.as_secs_f64()
    );
    println!(
        "cutover: ControlService.CreateAttestation over mTLS, snapshot every {} entries{}; etcd: KV.Put ({version})",
        raft.snapshot_every,
        if snapshot_every.is_some() {
            " (not the default)"
        } else {
            " (the default)"
        }
    );
    println!(
        "disk fsync in {} (both systems' data dirs live there), 4 KiB write + fdatasync, 200 samples: appending p50 {:.2} ms, p99 {:.2} ms; overwriting a preallocated file p50 {:.2} ms, p99 {:.2} ms",
        fsync_dir.display(),
        fsync.0,
        fsync.1,
        fsync_pre.0,
        fsync_pre.1
    );
    println!(
        "redb commit of one 256-byte row (the log writer's commit of one append), 200 per database: one database p50 {:.2} ms, p99 {:.2} ms; two at once p50 {:.2} ms, p99 {:.2} ms",
        redb_one.0, redb_one.1, redb_two.0, redb_two.1
    );
    println!("load average before the run: {load}");
    println!(
        "etcd with mutual TLS on client and peer ports (--client-cert-auth, --peer-client-cert-auth, certificates from cutover's CA):"
    );
    let rows_tls = table(&cut, &etc_tls);
    println!("etcd plaintext:");
    let rows = table(&cut, &etc);
    println!(
        "cutover's leader building snapshots during each row (cutover_raft_snapshot_seconds; the copy holds the state's read lock, so applies wait for it):"
    );
    for (n, sn) in p.clients.iter().zip(&snapshots) {
        println!(
            "{n:>7} clients: {} built, mean copy {:.1} ms, encode {:.1} ms, write {:.1} ms",
            sn.built, sn.copy_ms, sn.encode_ms, sn.write_ms
        );
    }
    Ok(json!({
        "scenario": "commit",
        "seconds_per_row": p.dur.as_secs_f64(),
        "cutover_snapshot_every": raft.snapshot_every,
        "value_bytes": 256,
        "etcd_version": version,
        "cutover_snapshots": p.clients.iter().zip(&snapshots).map(|(n, sn)| json!({
            "clients": n, "built": sn.built, "copy_ms": sn.copy_ms, "encode_ms": sn.encode_ms, "write_ms": sn.write_ms,
        })).collect::<Vec<_>>(),
        "fsync_ms": {
            "dir": fsync_dir.display().to_string(),
            "append": {"p50": fsync.0, "p99": fsync.1},
            "preallocated": {"p50": fsync_pre.0, "p99": fsync_pre.1},
            "redb_commit_one": {"p50": redb_one.0, "p99": redb_one.1},
            "redb_commit_two_at_once": {"p50": redb_two.0, "p99": redb_two.1},
        },
        "loadavg_before": load,
        "rows_etcd_tls": rows_tls,
        "rows": rows,
    }))
}

/// Prints cutover's rows beside etcd's and returns them as JSON.
fn table(cut: &[Row], etc: &[Row]) -> Vec<serde_json::Value> {
    println!(
        "{:>7} | {:>9} {:>8} {:>8} {:>6} {:>5} | {:>9} {:>8} {:>8} {:>6} {:>5} | {:>11} {:>9}",
        "clients",
        "cut op/s",
        "p50 ms",
        "p99 ms",
        "cpu%",
        "err",
        "etcd op/s",
        "p50 ms",
        "p99 ms",
        "cpu%",
        "err",
        "op/s ratio",
        "p99 ratio"
    );
    let mut rows = Vec::new();
    for (a, b) in cut.iter().zip(etc) {
        let tput = a.ops_per_s / b.ops_per_s.max(f64::MIN_POSITIVE);
        let p99 = a.p99_ms / b.p99_ms.max(f64::MIN_POSITIVE);
        println!(
            "{:>7} | {:>9.0} {:>8.2} {:>8.2} {:>6.0} {:>5} | {:>9.0} {:>8.2} {:>8.2} {:>6.0} {:>5} | {:>11.2} {:>9.2}",
            a.clients,
            a.ops_per_s,
            a.p50_ms,
            a.p99_ms,
            a.leader_cpu,
            a.errors,
            b.ops_per_s,
            b.p50_ms,
            b.p99_ms,
            b.leader_cpu,
            b.errors,
            tput,
            p99
        );
        rows.push(json!({
            "clients": a.clients,
            "cutover": a.json(),
            "etcd": b.json(),
            "throughput_ratio": tput,
            "p99_ratio": p99,
        }));
    }
    println!("(cpu% = the leader process, % of one core; both cores' busy share per row, cutover/etcd:");
    let busy: Vec<String> = cut
        .iter()
        .zip(etc)
        .map(|(a, b)| format!("{} clients {:.0}%/{:.0}%", a.clients, a.machine_busy, b.machine_busy))
        .collect();
    println!(" {})", busy.join(", "));
    rows
}
