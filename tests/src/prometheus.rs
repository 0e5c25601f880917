//! A real Prometheus server (Debian's `prometheus` package, or the binary
//! `CUTOVER_PROMETHEUS` names) per test region, scraping the sample app's
//! colors every second through their service and preview addresses, which
//! is what the agents' `prometheus` analysis checks query.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::stable_free_addr;

/// A running Prometheus, killed (and its data removed) when dropped.
pub struct Prometheus {
    /// `http://127.0.0.1:PORT`: an agent's `prometheus_url`.
    pub url: String,
    addr: String,
    child: Child,
    _dir: tempfile::TempDir,
}

fn binary() -> PathBuf {
    std::env::var_os("CUTOVER_PROMETHEUS").map_or_else(|| "prometheus".into(), PathBuf::from)
}

impl Prometheus {
    /// Starts one scraping `targets` (`host:port`, path `/metrics`) every
    /// second, and waits until it is ready to answer queries.
    pub async fn start(targets: &[String]) -> Result<Prometheus> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("prometheus.yml");
        let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: app\n    static_configs:\n      - targets: [{}]\n",
                list.join(", ")
            ),
        )?;
        let addr = stable_free_addr();
        let log = std::fs::File::create(dir.path().join("prometheus.log"))?;
        let child = Command::new(binary())
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (Debian's prometheus package; scripts/setup installs it)",
                    binary().display()
                )
            })?;
        let mut p = Prometheus {
            url: format!("http://{addr}"),
            addr,
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = p.get("/-/ready").await {
                return Ok(p);
            }
            if let Some(status) = p.child.try_wait()? {
                let log = std::fs::read_to_string(p._dir.path().join("prometheus.log")).unwrap_or_default();
                bail!("prometheus exited with {status} before it was ready:\n{log}");
            }
            if Instant::now() > deadline {
                bail!("prometheus on {} was not ready within 30 s", p.addr);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// GET `path` on a fresh connection: (status, body).
    pub async fn get(&self, path: &str) -> Result<(u16, String)> {
        let mut s = tokio::net::TcpStream::connect(&self.addr).await?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: prometheus\r\nConnection: close\r\n\r\n").as_bytes())
            .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((status, body))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
