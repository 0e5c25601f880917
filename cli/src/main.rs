//! `cutover`: the single binary. Runs a coordinator node or an agent, creates
//! development certificates, runs a whole local system (`dev`, `demo`), and
//! carries every operator verb.

#![forbid(unsafe_code)]

mod backup;
mod client;
mod demo;
mod demo_canary;
mod demo_dr;
mod dev;
mod devstore;
mod dr;
mod migrate;
mod ui;
mod verbs;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use cutover_shared::config::{AgentConfig, CoordinatorConfig};
use cutover_shared::telemetry;

#[derive(Parser)]
#[command(
    name = "cutover",
    version = concat!(env!("CARGO_PKG_VERSION"), " (git ", env!("CUTOVER_GIT_REV"), ")"),
    about = "Multi-region blue-green cutovers and disaster recovery"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one coordinator node.
    Coordinator {
        #[arg(long)]
        config: PathBuf,
    },
    /// Run one agent.
    Agent {
        #[arg(long)]
        config: PathBuf,
    },
    /// Development certificates.
    Certs {
        #[command(subcommand)]
        cmd: CertsCmd,
    },
    /// A whole local system in one process: 3 coordinators and one agent per region.
    Dev {
        /// Keep data and certificates here instead of a temporary directory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Shell completions for bash, zsh, fish, elvish or PowerShell, on stdout
    /// (e.g. `cutover completions bash > /etc/bash_completion.d/cutover`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// The man page (roff), on stdout (e.g. `cutover man > cutover.1`).
    Man,
    /// Start what `dev` starts, run a scripted scenario, print a report, exit 0 only if it all held.
    Demo {
        #[arg(long, short, value_enum, default_value_t = client::Output::Text)]
        output: client::Output,
        /// Keep data, certificates, logs' inputs and a final metrics dump
        /// (`metrics.prom`) here instead of a temporary directory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// PostgreSQL instead of SQLite for the sample app: a URL in which
        /// `{region}` names each region's database (`-` written as `_`);
        /// the databases must exist.
        #[arg(long, env = "CUTOVER_DEMO_DATABASE_URL", hide_env_values = true)]
        database_url: Option<String>,
        /// Leave out the disaster-recovery chapter, which runs real
        /// PostgreSQL servers (a primary, its standby, a scratch server)
        /// from the installed binaries (`bash scripts/setup --demo`).
        #[arg(long)]
        no_dr: bool,
    },
    /// A small HTTP app for trying cutover: `/` answers its version,
    /// `/health` its health. A version containing "unhealthy", "slow" or
    /// "errors" behaves accordingly.
    SampleApp {
        #[arg(long)]
        version: String,
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
    #[command(flatten)]
    Verb(Box<verbs::Verb>),
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Write a development CA plus coordinator, agent, operator and viewer certificates.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// SPIFFE trust domain the certificates name (set the same
        /// `tls.trust_domain` in every config).
        #[arg(long, default_value = cutover_shared::identity::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Another agent certificate, `region/cluster` (for example
        /// `global/edge`, the front door's agent); repeatable.
        #[arg(long = "agent", value_name = "REGION/CLUSTER")]
        agents: Vec<String>,
    },
}

fn main() -> ExitCode {
    cutover_shared::tls::install_crypto_provider();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Cmd::Coordinator { config } => {
            let cfg: CoordinatorConfig = cutover_shared::config::load(&config)?;
            telemetry::init_tracing(cfg.log_format);
            telemetry::metrics_handle();
            let data_dir = cfg.data_dir.clone();
            let node = cutover_coordinator::Node::bind_and_start(cfg).await?;
            let failed = tokio::select! {
                () = shutdown_signal() => None,
                reason = node.raft_failed() => Some(reason),
            };
            match failed {
                None => {
                    tracing::info!("shutting down");
                    node.shutdown().await;
                    Ok(ExitCode::SUCCESS)
                }
                Some(reason) => {
                    // Exit rather than linger without Raft: a supervisor
                    // (systemd, Kubernetes) restarts the node, which then
                    // rejoins from its data directory and catches up.
                    tracing::error!(
                        "Raft stopped: {reason}. This node serves nothing until it restarts; nothing \
                         acknowledged is lost (the log is fsynced before acknowledging). Check the \
                         disk of {} (space, errors), then restart it.",
                        data_dir.display()
                    );
                    node.shutdown().await;
                    Ok(ExitCode::from(3))
                }
            }
        }
        Cmd::Agent { config } => {
            let cfg: AgentConfig = cutover_shared::config::load(&config)?;
            telemetry::init_tracing(cfg.log_format);
            telemetry::metrics_handle();
            let ops = match &cfg.ops_listen {
                Some(a) => Some(tokio::net::TcpListener::bind(a).await?),
                None => None,
            };
            let agent = cutover_agent::Agent::new(cfg)?;
            if let Some(l) = ops {
                tokio::spawn(telemetry::serve_ops(
                    l,
                    std::sync::Arc::new(|| true),
                    std::future::pending(),
                ));
            }
            agent.run(shutdown_signal()).await;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Certs {
            cmd:
                CertsCmd::Init {
                    dir,
                    trust_domain,
                    agents,
                },
        } => {
            let mut all: Vec<(&str, &str)> = dev::DEV_REGIONS.to_vec();
            for a in &agents {
                let c = a
                    .split_once('/')
                    .and_then(|(r, c)| cutover_shared::domain::ClusterRef::new(r, c).ok())
                    .ok_or_else(|| anyhow::anyhow!("--agent {a:?}: expected region/cluster"))?;
                if !all.iter().any(|(r, k)| *r == c.region && *k == c.cluster) {
                    let (r, k) = a.split_once('/').expect("checked above");
                    all.push((r, k));
                }
            }
            let pki = cutover_shared::certs::init_dev_pki(&dir, &trust_domain, 3, &all)?;
            println!("wrote a development CA and certificates to {}", pki.dir.display());
            println!("  CA:           {}", pki.ca.display());
            for (id, f) in &pki.coordinators {
                println!("  coordinator {id}: {}", f.cert.display());
            }
            for (r, c, f) in &pki.agents {
                println!("  agent {r}/{c}: {}", f.cert.display());
            }
            println!("  operator:     {}", pki.operator.cert.display());
            println!("  viewer:       {}", pki.viewer.cert.display());
            println!("private keys are mode 0600");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Dev { data_dir } => {
            let log = dev::log_path(data_dir.as_deref(), "dev");
            telemetry::init_tracing_file(&log).with_context(|| format!("opening {}", log.display()))?;
            println!("# logs: {}", log.display());
            let mut sys = dev::DevSystem::start(data_dir, dev::DEV_REGIONS).await?;
            sys.wait_ready(std::time::Duration::from_secs(30)).await?;
            let services = sys.install_sample_app("sample:v1").await?;
            for (region, addr) in &services {
                println!("# app \"sample\" (sample:v1) in {region}: http://{addr}/");
            }
            println!(
                "# cutover dev: 3 coordinators, agents for {}; Ctrl-C stops it",
                dev::DEV_REGIONS.iter().map(|r| r.0).collect::<Vec<_>>().join(", ")
            );
            println!("# the web console: `cutover ui` with these exports, then open the URL it prints");
            print!("{}", sys.exports());
            use std::io::Write;
            let _ = std::io::stdout().flush();
            shutdown_signal().await;
            eprintln!("stopping");
            sys.shutdown().await;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "cutover", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Demo {
            output,
            data_dir,
            database_url,
            no_dr,
        } => demo::run(output, data_dir, database_url, !no_dr).await,
        Cmd::SampleApp { version, listen } => {
            cutover_agent::sample_app::run(version, listen, shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Verb(v) => verbs::run(*v).await,
    }
}
