//! `cutover-sample-app --version V --listen ADDR`: the sample app as its own
//! binary, for the agent's tests (the `cutover sample-app` subcommand runs the
//! same code). Stops gracefully on SIGTERM or Ctrl-C.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::process::ExitCode;

fn usage(why: &str) -> ExitCode {
    eprintln!("cutover-sample-app: {why}\nusage: cutover-sample-app --version V --listen ADDR");
    ExitCode::from(2)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let mut version = None;
    let mut listen = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) => (f.to_string(), Some(v.to_string())),
            None => (a, None),
        };
        let value = match inline.or_else(|| args.next()) {
            Some(v) => v,
            None => return usage(&format!("{flag} needs a value")),
        };
        match flag.as_str() {
            "--version" => version = Some(value),
            "--listen" => listen = Some(value),
            other => return usage(&format!("unknown argument {other:?}")),
        }
    }
    let Some(version) = version else {
        return usage("--version is required");
    };
    let Some(listen) = listen else {
        return usage("--listen is required");
    };
    let listen: SocketAddr = match listen.parse() {
        Ok(a) => a,
        Err(e) => return usage(&format!("--listen {listen:?}: {e}")),
    };
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    eprintln!("sample app {version} listening on {listen}");
    match cutover_agent::sample_app::run(version, listen, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cutover-sample-app: {listen}: {e}");
            ExitCode::FAILURE
        }
    }
}
