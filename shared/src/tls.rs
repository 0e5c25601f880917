//! Mutual TLS for every port: loading certificates, building tonic server and
//! client configurations, and reading the caller's identity off a request.
//!
//! One crypto provider, aws-lc-rs, is installed as the process default before
//! any TLS object is built: with two providers compiled in, rustls would panic
//! on first use instead of picking one.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, Endpoint};

use crate::Error;
use crate::identity::{DEFAULT_TRUST_DOMAIN, Identity, Role};
use crate::listener::PeerInfo;

/// The CA bundle, certificate and private key of one process, as PEM files,
/// and the trust domain every identity must be in.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TlsFiles {
    /// CA certificate(s) trusted for peers.
    pub ca: PathBuf,
    /// This process's certificate (chain).
    pub cert: PathBuf,
    /// This process's private key.
    pub key: PathBuf,
    /// The SPIFFE trust domain of this system (`spiffe://<trust_domain>/...`).
    /// Certificates naming another domain are refused, even from the same
    /// CA. Default `cutover`.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// A PEM file of certificate revocation lists, re-read like the
    /// certificates. A certificate whose serial it lists is refused, on new
    /// connections and on the next request of open ones. Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl: Option<PathBuf>,
}

fn default_trust_domain() -> String {
    DEFAULT_TRUST_DOMAIN.to_owned()
}

impl Default for TlsFiles {
    fn default() -> Self {
        Self {
            ca: PathBuf::new(),
            cert: PathBuf::new(),
            key: PathBuf::new(),
            trust_domain: default_trust_domain(),
            crl: None,
        }
    }
}

/// How long a client waits for TCP and the TLS handshake together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Installs aws-lc-rs as the process-wide rustls provider. Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

impl TlsFiles {
    /// A lazily connecting mTLS channel to `addr` (`host:port`, optionally with
    /// an `https://` prefix). The TLS server name is the host unless
    /// `server_name` overrides it.
    ///
    /// Why not tonic's TLS: it cannot check what a server certificate says
    /// beyond its name, and any certificate from the CA (an agent's, an
    /// operator's) with a matching name would pass as a coordinator. The
    /// connector here runs rustls with [`CoordinatorVerifier`] and hands
    /// tonic the finished stream.
    pub fn channel(&self, addr: &str, server_name: Option<&str>) -> Result<Channel, Error> {
        let (url, host) = normalize_addr(addr)?;
        let name = ServerName::try_from(server_name.unwrap_or(&host).to_owned())
            .map_err(|e| Error::InvalidArgument(format!("bad server name for {addr:?}: {e}")))?;
        // Loaded now so a bad file set fails here; each connection then
        // takes whatever is current, so rotated files reach new connections.
        let live = crate::material::LiveTls::get(self)?;
        let authority = url.trim_start_matches("https://").trim_end_matches('/').to_owned();
        // The stream is already TLS when tonic gets it, so tonic speaks
        // plain HTTP/2 over it: the URI scheme is http on purpose.
        let endpoint = Endpoint::from_shared(format!("http://{authority}"))
            .map_err(|e| Error::InvalidArgument(format!("bad address {addr:?}: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        let connect = move |_: http::Uri| {
            let connector = tokio_rustls::TlsConnector::from(live.material().client.clone());
            let name = name.clone();
            let authority = authority.clone();
            async move {
                let io = tokio::time::timeout(CONNECT_TIMEOUT, async {
                    let conn = crate::net::dial(&authority).await?;
                    connector.connect(name, conn).await
                })
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
                Ok::<_, std::io::Error>(TokioIo::new(io))
            }
        };
        Ok(endpoint.connect_with_connector_lazy(tower::service_fn(connect)))
    }
}

/// The client's check of a server certificate: the CA's chain and the host
/// name (WebPKI), then the SPIFFE ID: a coordinator in our trust domain.
#[derive(Debug)]
pub(crate) struct CoordinatorVerifier {
    pub(crate) inner: Arc<WebPkiServerVerifier>,
    pub(crate) trust_domain: String,
}

impl ServerCertVerifier for CoordinatorVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        let who = Identity::from_certificate_der(end_entity.as_ref(), &self.trust_domain)
            .map_err(|e| rustls::Error::General(format!("server {e}")))?;
        if who.role != Role::Coordinator {
            return Err(rustls::Error::General(format!(
                "server certificate names {who}, not a coordinator"
            )));
        }
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
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
pub fn peer_identity(extensions: &http::Extensions, trust_domain: &str) -> Result<Identity, Error> {
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
    if let Some(check) = &info.check {
        check
            .still_valid()
            .map_err(|why| Error::Identity(format!("client certificate no longer accepted: {why}")))?;
    }
    let leaf = certs
        .first()
        .ok_or_else(|| Error::Identity("empty client certificate chain".into()))?;
    Identity::from_certificate_der(leaf.as_ref(), trust_domain)
}
