//! `cargo run --release -p bench -- SCENARIO [--quick]`: starts the systems
//! it measures itself, prints a table and writes the same results as JSON to
//! `bench-results/<scenario>.json`.
//!
//! Scenarios:
//! - `switch`: operator call to the new color serving, over many switches,
//!   with the failed-request count of a steady load running throughout.
//!   (1 region; the 3-region figure needs the multi-region cutover.)

#![forbid(unsafe_code)]

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

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
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

async fn switch(quick: bool, switches: usize) -> Result<serde_json::Value> {
    let n = if quick { switches.min(10) } else { switches };
    let mut c = TestCluster::builder()
        .nodes(3)
        .regions(&[("us-east", "us-east-1")])
        .start()
        .await?;
    let leader = c.wait_leader(Duration::from_secs(30)).await?;
    c.start_agent(0)?;
    c.wait_state(leader, Duration::from_secs(30), "agent up", |s| {
        s.agents.contains_key("us-east/us-east-1")
    })
    .await?;
    let local = cutover_tests::sample_app_local(&std::env::current_exe()?);
    let service = local.listen.clone();
    let spec = AppSpec {
        name: "bench".into(),
        clusters: vec![AppCluster {
            region: "us-east".into(),
            cluster: "us-east-1".into(),
            driver: DriverKind::Local,
            local: Some(local),
            kubernetes: None,
        }],
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
        scale_down_delay_secs: None,
        waves: vec![],
        bake_secs: 0,
        required_attestations: Default::default(),
    };
    let mut op = c.operator(leader);
    op.apply_app(pb::ApplyAppRequest { app: Some(spec.into()) }).await?;
    for image in ["bench:v1", "bench:v2"] {
        let req = pb::DeployRequest {
            app: "bench".into(),
            image: image.into(),
            region: "us-east".into(),
            no_switch: false,
            waves: vec![],
            strategy: 0,
        };
        let id = op.deploy(req).await?.into_inner().operation_id;
        wait_op(&c, leader, &id).await?;
    }
    // Steady load: 8 keep-alive connections, 50 requests per second each.
    let load = SteadyLoad::start(&service, 8, Duration::from_millis(20));
    let load_started = Instant::now();
    let mut probe = Probe1::connect(&service).await?;
    let mut current = probe.get().await?;
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
                region: "us-east".into(),
            })
            .await?
            .into_inner()
            .operation_id;
        loop {
            let body = probe.get().await?;
            if body == expected {
                latencies.push(t0.elapsed().as_secs_f64() * 1000.0);
                current = body;
                break;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("the new color did not serve within 30 s");
            }
        }
        wait_op(&c, leader, &id).await?;
    }
    let secs = load_started.elapsed().as_secs_f64();
    let (ok, failed) = load.stop().await;
    c.shutdown().await;
    latencies.sort_by(|a, b| a.total_cmp(b));
    let p50 = percentile(&latencies, 50.0);
    let p99 = percentile(&latencies, 99.0);
    let max = latencies.last().copied().unwrap_or(0.0);
    println!("switch: operator call to the new color serving, 1 region, {n} switches, under steady load");
    println!(
        "{:<10} {:>10} {:>10} {:>10} {:>12} {:>10} {:>10}",
        "regions", "p50 ms", "p99 ms", "max ms", "requests ok", "failed", "req/s"
    );
    println!(
        "{:<10} {:>10.1} {:>10.1} {:>10.1} {:>12} {:>10} {:>10.0}",
        1,
        p50,
        p99,
        max,
        ok,
        failed,
        ok as f64 / secs
    );
    Ok(serde_json::json!({
        "scenario": "switch",
        "regions": 1,
        "switches": n,
        "p50_ms": p50,
        "p99_ms": p99,
        "max_ms": max,
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
            Scenario::All { quick } => {
                let v = switch(quick, 100).await?;
                write_results("switch", &v)?;
            }
        }
        Ok(())
    })
}
