//! Mutual TLS for every port: loading certificates, building tonic server and
//! client configurations, and reading the caller's identity off a request.
//!
//! One crypto provider, aws-lc-rs, is installed as the process default before
//! any TLS object is built: with two providers compiled in, rustls would panic
//! on first use instead of picking one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity as TlsIdentity};

use crate::Error;
use crate::identity::Identity;
use crate::listener::PeerInfo;

/// The CA bundle, certificate and private key of one process, as PEM files.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsFiles {
    /// CA certificate(s) trusted for peers.
    pub ca: PathBuf,
    /// This process's certificate (chain).
    pub cert: PathBuf,
    /// This process's private key.
    pub key: PathBuf,
}

/// Installs aws-lc-rs as the process-wide rustls provider. Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| Error::Tls(format!("cannot read {what} {}: {e}", path.display())))
}

impl TlsFiles {
    /// Client side: present our certificate, verify the server against our CA
    /// and `server_name`.
    pub fn client_config(&self, server_name: &str) -> Result<ClientTlsConfig, Error> {
        install_crypto_provider();
        let cert = read(&self.cert, "certificate")?;
        let key = read(&self.key, "private key")?;
        let ca = read(&self.ca, "CA certificate")?;
        Ok(ClientTlsConfig::new()
            .identity(TlsIdentity::from_pem(cert, key))
            .ca_certificate(Certificate::from_pem(ca))
            .domain_name(server_name))
    }

    /// A lazily connecting mTLS channel to `addr` (`host:port`, optionally with
    /// an `https://` prefix). The TLS server name is the host unless
    /// `server_name` overrides it.
    pub fn channel(&self, addr: &str, server_name: Option<&str>) -> Result<Channel, Error> {
        let (url, host) = normalize_addr(addr)?;
        let tls = self.client_config(server_name.unwrap_or(&host))?;
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| Error::InvalidArgument(format!("bad address {addr:?}: {e}")))?
            .tls_config(tls)
            .map_err(|e| Error::Tls(format!("TLS setup for {addr}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        Ok(endpoint.connect_lazy())
    }
}

/// Turns `host:port` or `https://host:port` into a URL and its host.
pub fn normalize_addr(addr: &str) -> Result<(String, String), Error> {
    let trimmed = addr.trim();
    if trimmed.starts_with("http://") {
        return Err(Error::InvalidArgument(format!(
            "address {addr:?} uses http://; cutover speaks only mutual TLS (use host:port or https://)"
        )));
    }
    let rest = trimmed.strip_prefix("https://").unwrap_or(trimmed);
    let uri: http::Uri = format!("https://{rest}")
        .parse()
        .map_err(|e| Error::InvalidArgument(format!("bad address {addr:?}: {e}")))?;
    let host = uri
        .host()
        .ok_or_else(|| Error::InvalidArgument(format!("address {addr:?} has no host")))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    if uri.port().is_none() {
        return Err(Error::InvalidArgument(format!("address {addr:?} has no port")));
    }
    Ok((format!("https://{rest}"), host))
}

/// The verified identity of the caller of a request accepted by
/// [`crate::listener::MtlsAcceptor`]. Every way of not having one is an
/// error naming the reason.
pub fn peer_identity(extensions: &http::Extensions) -> Result<Identity, Error> {
    let info = extensions
        .get::<PeerInfo>()
        .ok_or_else(|| Error::Identity("connection not accepted by the mutual-TLS listener".into()))?;
    if !info.tls {
        return Err(Error::Identity(
            "plaintext connection refused: cutover requires mutual TLS (https:// with a client certificate)".into(),
        ));
    }
    let certs = info
        .certs
        .as_ref()
        .ok_or_else(|| Error::Identity("no client certificate presented; cutover requires mutual TLS".into()))?;
    if let Some(why) = &info.cert_error {
        return Err(Error::Identity(format!("client certificate rejected: {why}")));
    }
    let leaf = certs
        .first()
        .ok_or_else(|| Error::Identity("empty client certificate chain".into()))?;
    Identity::from_certificate_der(leaf.as_ref())
}
