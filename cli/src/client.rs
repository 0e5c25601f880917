//! Connection options shared by every operator verb, and a client that tries
//! each coordinator address in turn (any node answers; writes are forwarded
//! to the leader by the node that receives them).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use cutover_shared::proto::control_service_client::ControlServiceClient;
use cutover_shared::tls::TlsFiles;
use tonic::transport::Channel;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    #[default]
    Text,
    Json,
}

/// Where the coordinator is and who we are.
#[derive(Clone, Debug, Args)]
pub struct ConnOpts {
    /// Coordinator address(es), comma-separated host:port.
    #[arg(long, env = "CUTOVER_ADDR", value_delimiter = ',', global = true)]
    pub addr: Vec<String>,
    /// CA certificate (PEM) that signed the coordinators' certificates.
    #[arg(long, env = "CUTOVER_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) naming an operator or viewer.
    #[arg(long, env = "CUTOVER_CERT", global = true)]
    pub cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, env = "CUTOVER_KEY", global = true)]
    pub key: Option<PathBuf>,
    /// TLS server name to expect instead of the address host.
    #[arg(long, env = "CUTOVER_SERVER_NAME", global = true)]
    pub server_name: Option<String>,
    /// SPIFFE trust domain the coordinators must be in.
    #[arg(long, env = "CUTOVER_TRUST_DOMAIN", global = true,
          default_value = cutover_shared::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// A PEM CRL file: a coordinator certificate it lists is refused.
    #[arg(long, env = "CUTOVER_CRL", global = true)]
    pub crl: Option<PathBuf>,
    /// `text` for people, `json` for scripts.
    #[arg(long, short, value_enum, default_value_t = Output::Text, global = true)]
    pub output: Output,
}

impl ConnOpts {
    pub fn tls(&self) -> Result<TlsFiles> {
        let need = |v: &Option<PathBuf>, flag: &str, env: &str| {
            v.clone()
                .with_context(|| format!("no {flag} given (flag --{flag} or {env})"))
        };
        Ok(TlsFiles {
            ca: need(&self.ca, "ca", "CUTOVER_CA")?,
            cert: need(&self.cert, "cert", "CUTOVER_CERT")?,
            key: need(&self.key, "key", "CUTOVER_KEY")?,
            trust_domain: self.trust_domain.clone(),
            crl: self.crl.clone(),
        })
    }

    /// One control client per configured address, in order.
    pub fn clients(&self) -> Result<Vec<(String, ControlServiceClient<Channel>)>> {
        if self.addr.is_empty() {
            bail!("no coordinator address given (flag --addr or CUTOVER_ADDR)");
        }
        let tls = self.tls()?;
        self.addr
            .iter()
            .map(|a| {
                let ch = tls.channel(a, self.server_name.as_deref())?;
                Ok((a.clone(), ControlServiceClient::new(ch)))
            })
            .collect()
    }
}

/// Is this status a failure to reach the node (try the next one) rather
/// than an answer?
fn unreachable(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::Unavailable || s.code() == tonic::Code::Unknown && s.message().contains("transport")
}

/// Why [`call_each`] got no answer.
pub enum Failure {
    /// A coordinator answered with an error.
    Status(tonic::Status),
    /// None answered: the last transport error, with its address.
    Unreachable(String),
}

/// Runs `f` against each of `clients` in turn until one answers.
pub async fn call_each<T, F, Fut>(clients: &[(String, ControlServiceClient<Channel>)], f: F) -> Result<T, Failure>
where
    F: Fn(ControlServiceClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut last = None;
    for (addr, client) in clients {
        match f(client.clone()).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s) if unreachable(&s) => last = Some(format!("{addr}: {}", s.message())),
            Err(s) => return Err(Failure::Status(s)),
        }
    }
    Err(Failure::Unreachable(last.unwrap_or_default()))
}

/// Every agent, following `ListAgents`' pages (one holds some 15,000).
pub async fn list_all_agents(
    clients: &[(String, ControlServiceClient<Channel>)],
) -> Result<Vec<cutover_shared::proto::Agent>, Failure> {
    let mut agents = Vec::new();
    let mut token = String::new();
    loop {
        let page = call_each(clients, |mut c| {
            let page_token = token.clone();
            async move {
                c.list_agents(cutover_shared::proto::ListAgentsRequest {
                    page_size: 0,
                    page_token,
                })
                .await
            }
        })
        .await?;
        agents.extend(page.agents);
        if page.next_page_token.is_empty() {
            return Ok(agents);
        }
        token = page.next_page_token;
    }
}

/// Fails with what [`call_each`] got, in the CLI's words.
pub fn failure_error(f: Failure) -> anyhow::Error {
    match f {
        Failure::Status(s) => anyhow::anyhow!("{}: {}", code_name(s.code()), s.message()),
        Failure::Unreachable(last) => anyhow::anyhow!("no coordinator reachable ({last})"),
    }
}

/// Runs `f` against the first coordinator that answers.
pub async fn call<T, F, Fut>(opts: &ConnOpts, f: F) -> Result<T>
where
    F: Fn(ControlServiceClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    call_each(&opts.clients()?, f).await.map_err(failure_error)
}

pub fn code_name(c: tonic::Code) -> String {
    format!("{c:?}")
        .chars()
        .flat_map(|ch| {
            if ch.is_uppercase() {
                vec!['_', ch]
            } else {
                vec![ch.to_ascii_uppercase()]
            }
        })
        .collect::<String>()
        .trim_start_matches('_')
        .to_owned()
}
