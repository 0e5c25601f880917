//! `cargo run --release -p bench -- SCENARIO [--quick]`: starts the systems
//! it measures itself, prints a table and writes the same results as JSON to
//! `bench-results/<scenario>.json`.
//!
//! Scenarios:
//! - `commit`: replicated write throughput and latency with 1, 64 and 256
//!   clients, cutover (`CreateAttestation`) beside etcd (`KV.Put`), 3 nodes
//!   each, fsync on, with the disk's fsync latency; etcd with mutual TLS
//!   (like for like) and plaintext.
//! - `failover`: kill -9 of the leader to the first acknowledged write,
//!   cutover beside etcd at cutover's timings and at its own, broken down
//!   into detection, election and the client finding the new leader.
//! - `fanin`: thousands of simulated agents on the real agent stream: leader
//!   CPU and memory, heartbeat round trip, time to mark a silent agent down.
//! - `switch`: operator call to the new color serving, over many switches,
//!   with the failed-request count of a steady load running throughout, for
//!   1 and 3 regions; then a planned failover's move of traffic to another
//!   region through the front door and through Route 53 (moto).
//! - `backup`: backup and restore of a pgbench database into Garage by the
//!   agent process, beside `pg_dump | zstd | aws s3 cp -` and back, with the
//!   agent's peak memory at two sizes.
//!
//! - `dr`: the RTO and RPO of an automatic failover after losing the primary
//!   region, asynchronous and synchronous replication, cutover's fastest
//!   detection beside Patroni's default timings on the same harness.
//!
//! - `fleet`: hundreds of apps in three regions on simulated agents, a
//!   hundred deploys in waves running at once: the overhead cutover adds
//!   per step, operations per minute, and the orchestrator's cost with 1k
//!   and 10k finished operations kept.
//! - `trace`: where the time of one write goes, step by step, from the
//!   nodes' write timelines (`coordinator/src/raft/trace.rs`).
//!
//! `all` runs every scenario, and exits non-zero if any of them failed.

#![forbid(unsafe_code)]

mod backup;
mod commit;
mod dr;
mod etcd;
mod failover;
mod fanin;
mod fleet;
mod region_switch;
mod trace;
mod util;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use cutover_shared::app::{AppCluster, AppSpec, DriverKind, LoadProbe, Probe};
use cutover_shared::proto as pb;
use cutover_tests::TestCluster;
use cutover_tests::load::SteadyLoad;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Switch latency and failed requests under load.
    Switch {
        /// Fewer switches, for the smoke run.
        #[arg(long)]
        quick: bool,
        #[arg(long, default_value_t = 100)]
        switches: usize,
    },
    /// Replicated write throughput and latency, beside etcd.
    Commit {
        /// Tiny parameters, for the smoke run.
        #[arg(long)]
        quick: bool,
        /// cutover builds a snapshot after this many entries instead of its
        /// default (results go to commit-snapshot-every-N.json).
        #[arg(long)]
        snapshot_every: Option<u64>,
    },
    /// kill -9 of the leader to the first acknowledged write, beside etcd.
    Failover {
        #[arg(long)]
        quick: bool,
        /// Other cutover Raft timings, `HEARTBEAT,ELECTION_MIN,ELECTION_MAX`
        /// in ms (cutover, and etcd at the same timings; results go to
        /// failover-tuned.json).
        #[arg(long, value_name = "MS,MS,MS")]
        raft_timings: Option<String>,
    },
    /// A fleet of apps under many cutovers at once: step overhead,
    /// operations per minute, orchestrator cost.
    Fleet {
        #[arg(long)]
        quick: bool,
        /// Split the same fleet into this many Raft groups (each its own
        /// three coordinators, agents and apps) on this machine; results
        /// go to fleet-groups-N.json.
        #[arg(long, default_value_t = 1)]
        groups: usize,
    },
    /// Where one write's time goes: client, leader, fsync, replication,
    /// commit, apply, reply.
    Trace {
        #[arg(long)]
        quick: bool,
    },
    /// Simulated agents on the agent stream: leader CPU, memory, heartbeats.
    Fanin {
        #[arg(long)]
        quick: bool,
    },
    /// Backup and restore of a PostgreSQL database into Garage, beside
    /// pg_dump | zstd | aws s3 cp.
    Backup {
        #[arg(long)]
        quick: bool,
    },
    /// Automatic failover after losing the primary region: RTO and RPO,
    /// beside Patroni's default timings.
    Dr {
        #[arg(long)]
        quick: bool,
        /// Trials per row.
        #[arg(long, default_value_t = 20)]
        trials: usize,
    },
    /// Run every scenario.
    All {
        #[arg(long)]
        quick: bool,
    },
    /// The sample app the local driver runs (used by the scenarios).
    #[command(hide = true)]
    SampleApp {
        #[arg(long)]
        version: String,
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
}

/// Reads `GET /` bodies over one keep-alive connection.
struct Probe1 {
    conn: BufReader<tokio::net::TcpStream>,
}

impl Probe1 {
    async fn connect(addr: &str) -> Result<Self> {
        Ok(Self {
            conn: BufReader::new(tokio::net::TcpStream::connect(addr).await?),
        })
    }
    async fn get(&mut self) -> Result<String> {
        self.conn
            .get_mut()
            .write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
            .await?;
        let mut line = String::new();
        self.conn.read_line(&mut line).await?;
        let mut len = 0;
        loop {
            let mut h = String::new();
            self.conn.read_line(&mut h).await?;
            if h == "\r\n" || h.is_empty() {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse()?;
            }
        }
        let mut body = vec![0; len];
        self.conn.read_exact(&mut body).await?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }
}

async fn wait_op(c: &TestCluster, node: usize, id: &str) -> Result<()> {
    c.wait_state(node, Duration::from_secs(120), id, |s| {
        s.operations[id].state.is_finished()
    })
    .await?;
    let (state, summary) = c
        .node(node)
        .consensus()
        .read(|s| (s.operations[id].state, s.operations[id].summary.clone()));
    if state != cutover_shared::domain::TaskState::Succeeded {
        bail!("operation {id} failed: {summary}");
    }
    Ok(())
}

const SWITCH_REGIONS: &[(&str, &str)] = &[
    ("us-east", "us-east-1"),
    ("eu-west", "eu-west-1"),
    ("ap-south", "ap-south-1"),
];

/// Switch latency for 1 and for 3 regions: one row each.
async fn switch(quick: bool, switches: usize) -> Result<serde_json::Value> {
    let n = if quick { switches.min(10) } else { switches };
    let mut rows = Vec::new();
    for regions in [1, 3] {
        rows.push(switch_regions(n, &SWITCH_REGIONS[..regions]).await?);
    }
    let between = region_switch::run(quick, 10).await?;
    println!("switch: operator call to every region's new color serving, {n} switches per row, under steady load");
    println!(
        "{:<10} {:>10} {:>10} {:>10} {:>12} {:>10} {:>10}",
        "regions", "p50 ms", "p99 ms", "max ms", "requests ok", "failed", "req/s"
    );
    for r in &rows {
        let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
        let u = |k: &str| r[k].as_u64().unwrap_or(0);
        println!(
            "{:<10} {:>10.1} {:>10.1} {:>10.1} {:>12} {:>10} {:>10.0}",
            u("regions"),
            f("p50_ms"),
            f("p99_ms"),
            f("max_ms"),
            u("requests_ok"),
            u("requests_failed"),
            f("load_rps")
        );
    }
    println!();
    region_switch::print(&between);
    Ok(serde_json::json!({ "scenario": "switch", "switches": n, "rows": rows, "between_regions": between }))
}

/// `n` switches of every region in `regions` at once (one `Switch` call
/// without a region): the latency is from the call to the last region
/// serving the new color.
async fn switch_regions(n: usize, regions: &[(&str, &str)]) -> Result<serde_json::Value> {
    let mut c = TestCluster::builder().nodes(3).regions(regions).start().await?;
    let leader = c.wait_leader(Duration::from_secs(30)).await?;
    for i in 0..regions.len() {
        c.start_agent(i)?;
    }
    c.wait_state(leader, Duration::from_secs(30), "agents up", |s| {
        s.agents.len() == regions.len()
    })
    .await?;
    let exe = std::env::current_exe()?;
    let clusters: Vec<AppCluster> = regions
        .iter()
        .map(|(region, cluster)| AppCluster {
            region: region.to_string(),
            cluster: cluster.to_string(),
            driver: DriverKind::Local,
            local: Some(cutover_tests::sample_app_local(&exe)),
            kubernetes: None,
        })
        .collect();
    let services: Vec<String> = clusters
        .iter()
        .filter_map(|c| c.local.as_ref().map(|l| l.listen.clone()))
        .collect();
    let spec = AppSpec {
        name: "bench".into(),
        clusters,
        health: vec![Probe::Http {
            path: "/health".into(),
            status: 200,
            body_contains: None,
        }],
        load: LoadProbe {
            requests: 50,
            rate_per_sec: 100,
            min_rps: 10.0,
            ..LoadProbe::default()
        },
        bake_secs: 0,
        ..Default::default()
    };
    let mut op = c.operator(leader);
    op.apply_app(pb::ApplyAppRequest { app: Some(spec.into()) }).await?;
    for image in ["bench:v1", "bench:v2"] {
        let req = pb::DeployRequest {
            app: "bench".into(),
            image: image.into(),
            ..Default::default()
        };
        let id = op.deploy(req).await?.into_inner().operation_id;
        wait_op(&c, leader, &id).await?;
    }
    // Steady load on every region: 8 keep-alive connections, 50 requests
    // per second each.
    let loads: Vec<SteadyLoad> = services
        .iter()
        .map(|s| SteadyLoad::start(s, 8, Duration::from_millis(20)))
        .collect();
    let load_started = Instant::now();
    let mut probes = Vec::new();
    for s in &services {
        probes.push(Probe1::connect(s).await?);
    }
    let mut current = probes[0].get().await?;
    let mut latencies = Vec::with_capacity(n);
    for _ in 0..n {
        let expected = if current.contains("bench:v2") {
            "version bench:v1\n"
        } else {
            "version bench:v2\n"
        };
        let t0 = Instant::now();
        let id = op
            .switch(pb::SwitchRequest {
                app: "bench".into(),
                region: String::new(),
            })
            .await?
            .into_inner()
            .operation_id;
        for probe in probes.iter_mut() {
            loop {
                if probe.get().await? == expected {
                    break;
                }
                if t0.elapsed() > Duration::from_secs(30) {
                    bail!("the new color did not serve within 30 s");
                }
            }
        }
        latencies.push(t0.elapsed().as_secs_f64() * 1000.0);
        current = expected.to_owned();
        wait_op(&c, leader, &id).await?;
    }
    let secs = load_started.elapsed().as_secs_f64();
    let (mut ok, mut failed) = (0, 0);
    for l in loads {
        let (o, f) = l.stop().await;
        ok += o;
        failed += f;
    }
    c.shutdown().await;
    latencies.sort_by(|a, b| a.total_cmp(b));
    Ok(serde_json::json!({
        "regions": regions.len(),
        "switches": n,
        "p50_ms": util::percentile(&latencies, 50.0),
        "p99_ms": util::percentile(&latencies, 99.0),
        "max_ms": latencies.last().copied().unwrap_or(0.0),
        "requests_ok": ok,
        "requests_failed": failed,
        "load_rps": ok as f64 / secs,
    }))
}

fn write_results(name: &str, v: &serde_json::Value) -> Result<()> {
    std::fs::create_dir_all("bench-results")?;
    let path = format!("bench-results/{name}.json");
    std::fs::write(&path, serde_json::to_string_pretty(v)?).with_context(|| path.clone())?;
    println!("results written to {path}");
    Ok(())
}

/// Runs one scenario and writes its results.
async fn scenario(name: &str, quick: bool) -> Result<()> {
    let v = match name {
        "commit" => commit::run(quick, None).await?,
        "failover" => failover::run(quick, None).await?,
        "fanin" => fanin::run(quick).await?,
        "trace" => trace::run(quick).await?,
        "fleet" => fleet::run(quick, 1).await?,
        "backup" => backup::run(quick).await?,
        "switch" => switch(quick, 100).await?,
        "dr" => dr::run(quick, 20).await?,
        other => bail!("unknown scenario {other}"),
    };
    write_results(name, &v)
}

fn main() -> Result<()> {
    cutover_shared::tls::install_crypto_provider();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        match cli.scenario {
            Scenario::SampleApp { version, listen } => {
                cutover_agent::sample_app::run(version, listen, async {
                    let _ = tokio::signal::ctrl_c().await;
                })
                .await?;
            }
            Scenario::Switch { quick, switches } => {
                let v = switch(quick, switches).await?;
                write_results("switch", &v)?;
            }
            Scenario::Commit {
                quick,
                snapshot_every: None,
            } => scenario("commit", quick).await?,
            Scenario::Commit {
                quick,
                snapshot_every: Some(n),
            } => {
                let v = commit::run(quick, Some(n)).await?;
                write_results(&format!("commit-snapshot-every-{n}"), &v)?;
            }
            Scenario::Failover {
                quick,
                raft_timings: None,
            } => scenario("failover", quick).await?,
            Scenario::Failover {
                quick,
                raft_timings: Some(t),
            } => {
                let ms: Vec<u64> = t
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()
                    .context("--raft-timings: three numbers")?;
                let [heartbeat, min, max] = ms[..] else {
                    bail!("--raft-timings takes HEARTBEAT,ELECTION_MIN,ELECTION_MAX");
                };
                let raft = cutover_shared::config::RaftConfig {
                    heartbeat_interval_ms: heartbeat,
                    election_timeout_min_ms: min,
                    election_timeout_max_ms: max,
                    ..Default::default()
                };
                let v = failover::run(quick, Some(raft)).await?;
                write_results("failover-tuned", &v)?;
            }
            Scenario::Fanin { quick } => scenario("fanin", quick).await?,
            Scenario::Trace { quick } => scenario("trace", quick).await?,
            Scenario::Fleet { quick, groups: 1 } => scenario("fleet", quick).await?,
            Scenario::Fleet { quick, groups } => {
                let v = fleet::run(quick, groups).await?;
                write_results(&format!("fleet-groups-{groups}"), &v)?;
            }
            Scenario::Backup { quick } => scenario("backup", quick).await?,
            Scenario::Dr { quick, trials } => {
                let v = dr::run(quick, trials).await?;
                write_results("dr", &v)?;
            }
            Scenario::All { quick } => {
                let mut failed = Vec::new();
                for name in [
                    "commit", "trace", "failover", "fanin", "fleet", "switch", "backup", "dr",
                ] {
                    let t = Instant::now();
                    println!("== {name}");
                    match scenario(name, quick).await {
                        Ok(()) => println!("== {name}: done in {:.1} s\n", t.elapsed().as_secs_f64()),
                        Err(e) => {
                            println!("== {name}: FAILED after {:.1} s: {e:#}\n", t.elapsed().as_secs_f64());
                            failed.push(name);
                        }
                    }
                }
                if !failed.is_empty() {
                    bail!("scenarios failed: {}", failed.join(", "));
                }
            }
        }
        Ok(())
    })
}
