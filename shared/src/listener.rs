//! The mutual-TLS listener every gRPC port uses.
//!
//! Why not tonic's built-in TLS: it refuses bad callers during the TLS
//! handshake, so a plaintext client, an unknown CA or an expired certificate
//! all surface on the client as a bare "connection closed". Here the
//! handshake completes whenever it can, the verdict on the client
//! certificate is recorded in the connection's [`PeerInfo`], and the access
//! guard (`grpc::authorize`) answers every request on such a connection with
//! `UNAUTHENTICATED` and the reason. No request reaches a service without a
//! verified certificate: the guard refuses anything else.
//!
//! Proof of possession of the private key (the handshake signature) is still
//! checked by rustls during the handshake; only the chain verdict is deferred.
//!
//! Connections do not outlive what was checked at their handshake:
//! - one with a verified certificate is closed when that certificate
//!   expires, or after [`MAX_CONNECTION_AGE`], whichever comes first, so a
//!   long-lived HTTP/2 connection cannot carry an expired identity; the
//!   client reconnects and its certificate is judged again;
//! - it is also re-judged whenever the process's TLS files change (a new
//!   CRL, a CA leaving the bundle, see [`crate::material`]) and closed if it
//!   no longer passes, so a revocation reaches long-lived streams too;
//! - one without (plaintext, no certificate, a rejected chain) can only be
//!   told why it is refused: it is closed after [`UNVERIFIED_LIFETIME`], and
//!   at most [`MAX_UNVERIFIED_CONNECTIONS`] are open at once.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::either::Either;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::Error;
use crate::material::{ConnectionCheck, LiveTls};
use crate::net::{Accepted, Conn, Listener};
use crate::tls::TlsFiles;

/// How long a client gets to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection without a verified certificate stays open: long
/// enough to be told why it is refused.
pub const UNVERIFIED_LIFETIME: Duration = Duration::from_secs(10);
/// Connections without a verified certificate open at once; more are
/// closed as soon as they are accepted.
pub const MAX_UNVERIFIED_CONNECTIONS: usize = 1024;
/// The longest a verified connection lives; the client reconnects and its
/// certificate is checked again (revocation and rotation take effect).
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(3600);

/// What the listener learned about a connection, available to every request
/// on it through its extensions.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    /// False for a plaintext connection.
    pub tls: bool,
    /// The client's certificate chain, leaf first, if it sent one.
    pub certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    /// Why the chain was not accepted (unknown issuer, expired, ...).
    pub cert_error: Option<String>,
    /// For a verified chain: its re-judgement when the TLS material changes
    /// (CRL, CA bundle), which every request consults.
    pub check: Option<Arc<ConnectionCheck>>,
}

/// Accepts the handshake with any client certificate (or none); the chain
/// is judged afterwards by the wrapped WebPKI verifier.
#[derive(Debug)]
pub(crate) struct DeferredVerifier {
    pub(crate) inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for DeferredVerifier {
    fn client_auth_mandatory(&self) -> bool {
        false
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
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

/// The server side of one port's mutual TLS.
#[derive(Clone)]
pub struct MtlsAcceptor {
    /// The certificate to present and the CA bundle and CRL to judge
    /// clients by, re-read when the files change.
    live: Arc<LiveTls>,
    /// Cancelling it cuts every connection this acceptor produced.
    cut: CancellationToken,
    /// See [`UNVERIFIED_LIFETIME`]; tests shorten it.
    unverified_lifetime: Duration,
    /// See [`MAX_CONNECTION_AGE`].
    max_age: Duration,
    /// Connections without a verified certificate open now.
    unverified: Arc<std::sync::atomic::AtomicUsize>,
}

/// Counts one open unverified connection while it lives.
struct UnverifiedSlot(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for UnverifiedSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// When a certificate (DER) stops being valid, as a duration from now.
fn time_left(der: &[u8]) -> Option<Duration> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let not_after = cert.validity().not_after.timestamp();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs() as i64;
    Some(Duration::from_secs(not_after.saturating_sub(now).max(0) as u64))
}

impl MtlsAcceptor {
    pub fn new(files: &TlsFiles) -> Result<Self, Error> {
        Ok(Self {
            live: LiveTls::get(files)?,
            cut: CancellationToken::new(),
            unverified_lifetime: UNVERIFIED_LIFETIME,
            max_age: MAX_CONNECTION_AGE,
            unverified: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        })
    }

    /// Sets how long connections without a verified certificate, and all
    /// connections, may live (tests use short ones).
    pub fn with_lifetimes(mut self, unverified: Duration, max_age: Duration) -> Self {
        self.unverified_lifetime = unverified;
        self.max_age = max_age;
        self
    }

    /// A handle that, when cancelled, makes every connection accepted so far
    /// (and later) fail its next read or write. Graceful shutdown waits for
    /// open streams; this bounds it, so a stopped server lets go of the
    /// services (and storage) it holds.
    pub fn cut_handle(&self) -> CancellationToken {
        self.cut.clone()
    }

    fn stream(&self, io: Either<TlsStream<Conn>, Conn>, info: PeerInfo) -> io::Result<MtlsStream> {
        let verified = info.tls && info.cert_error.is_none() && info.certs.as_ref().is_some_and(|c| !c.is_empty());
        let (lifetime, slot) = if verified {
            let left = info
                .certs
                .as_ref()
                .and_then(|c| c.first())
                .and_then(|leaf| time_left(leaf.as_ref()))
                .unwrap_or(Duration::ZERO);
            (left.min(self.max_age), None)
        } else {
            let open = self.unverified.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let slot = UnverifiedSlot(self.unverified.clone());
            if open >= MAX_UNVERIFIED_CONNECTIONS {
                return Err(io::Error::other("too many unauthenticated connections"));
            }
            (self.unverified_lifetime, Some(slot))
        };
        let refused = info.check.as_ref().map(|c| Box::pin(c.close.clone().cancelled_owned()));
        let watching = info.check.as_ref().map(|c| c.watch());
        Ok(MtlsStream {
            io,
            info,
            cut: Box::pin(self.cut.clone().cancelled_owned()),
            refused,
            _watching: watching,
            expires: Box::pin(tokio::time::sleep(lifetime)),
            _slot: slot,
        })
    }

    /// Sorts a fresh connection: TLS (a handshake record comes first) or
    /// plaintext, and for TLS the verdict on the client's certificate.
    async fn accept<C: Accepted>(&self, mut tcp: C, remote: Option<SocketAddr>) -> io::Result<MtlsStream> {
        let mut first = [0u8; 1];
        let n = tcp.peek(&mut first).await?;
        let tcp: Conn = Box::new(tcp);
        // 0x16: a TLS handshake record.
        if n == 0 || first[0] != 0x16 {
            let info = PeerInfo {
                remote,
                tls: false,
                certs: None,
                cert_error: None,
                check: None,
            };
            return self.stream(Either::Right(tcp), info);
        }
        // The generation is read before the material, so a reload in between
        // only makes the first request judge the chain once more.
        let generation = self.live.generation();
        let material = self.live.material();
        let tls = TlsAcceptor::from(material.server.clone()).accept(tcp).await?;
        let chain = tls.get_ref().1.peer_certificates().map(|c| Arc::new(c.to_vec()));
        let cert_error = chain.as_ref().and_then(|chain| {
            let (leaf, rest) = chain.split_first()?;
            material
                .client_verifier
                .verify_client_cert(leaf, rest, UnixTime::now())
                .err()
                .map(|e| e.to_string())
        });
        let check = match (&chain, &cert_error) {
            (Some(c), None) if !c.is_empty() => {
                Some(Arc::new(ConnectionCheck::new(self.live.clone(), c.clone(), generation)))
            }
            _ => None,
        };
        let info = PeerInfo {
            remote,
            tls: true,
            certs: chain,
            cert_error,
            check,
        };
        self.stream(Either::Left(tls), info)
    }

    /// Accepts connections on `listener` until the returned stream is
    /// dropped. Handshakes run concurrently, bounded by a timeout, so a slow
    /// or silent client never holds up others.
    pub fn incoming<L: Listener>(self, listener: L) -> ReceiverStream<io::Result<MtlsStream>> {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (tcp, remote) = tokio::select! {
                    _ = tx.closed() => return,
                    r = listener.accept() => match r {
                        Ok(accepted) => accepted,
                        Err(e) => {
                            tracing::warn!("accept: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let this = self.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, this.accept(tcp, Some(remote))).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send(Ok(stream)).await;
                        }
                        Ok(Err(e)) => tracing::debug!("TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }
}

/// A connection accepted by [`MtlsAcceptor`].
pub struct MtlsStream {
    io: Either<TlsStream<Conn>, Conn>,
    info: PeerInfo,
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Fires when a request found the certificate no longer valid.
    refused: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    /// Stops the re-judging task when the connection ends.
    _watching: Option<tokio_util::sync::DropGuard>,
    /// When this connection ends: its certificate's expiry or the age
    /// limit, or the short lifetime of an unverified connection.
    expires: Pin<Box<tokio::time::Sleep>>,
    _slot: Option<UnverifiedSlot>,
}

impl MtlsStream {
    /// Fails once the acceptor's connections are cut; registers the waker so
    /// a task parked on this connection wakes up to see it.
    fn check_cut(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.cut.as_mut().poll(cx).is_ready() {
            return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "server shut down"));
        }
        if let Some(refused) = self.refused.as_mut()
            && refused.as_mut().poll(cx).is_ready()
        {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "client certificate no longer valid (revoked, or its CA removed)",
            ));
        }
        if self.expires.as_mut().poll(cx).is_ready() {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection lifetime over (certificate expiry, age limit, or unauthenticated)",
            ));
        }
        Ok(())
    }
}

impl tonic::transport::server::Connected for MtlsStream {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for MtlsStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if let Err(e) = self.check_cut(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for MtlsStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if let Err(e) = self.check_cut(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Err(e) = self.check_cut(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Err(e) = self.check_cut(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
