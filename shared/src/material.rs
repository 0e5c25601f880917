//! The TLS material of a process, kept current: the CA bundle, certificate,
//! private key and CRL named by a [`TlsFiles`], re-read whenever they change
//! on disk.
//!
//! cert-manager, Vault agent and kubelet's secret volumes replace these
//! files every few weeks (kubelet by swapping a symlink, others by writing in
//! place); a process that reads them once would keep an expiring certificate
//! until someone restarts it. So one background thread reads every set of
//! files in use each [`RELOAD_INTERVAL`] and, when the bytes changed and the
//! new set is whole and consistent (the key matches the certificate, the CA
//! and CRL parse), swaps it in. A half-written or mismatched set is logged
//! and counted and the previous material stays: rotation never takes a
//! process down.
//!
//! Why polling and not inotify: a symlink swap in a secret volume replaces
//! the directory the watched files live in, and every watcher has to
//! special-case it; reading four small files every few seconds costs
//! nothing and cannot miss an update.
//!
//! What uses the current material:
//! - the listener ([`crate::listener::MtlsAcceptor`]) presents the current
//!   certificate at each handshake and judges client chains with the current
//!   CA bundle and CRL;
//! - every request re-judges its connection's client chain once per reload
//!   ([`ConnectionCheck`]), so a revoked certificate or a CA taken out of the
//!   bundle stops working at the next request, not at the next connection;
//! - outgoing channels ([`TlsFiles::channel`]) take the current client
//!   configuration at each connect.
//!
//! Every user of one `TlsFiles` shares one [`LiveTls`] (a process-wide
//! registry keyed by the files), so a process reads its files once per
//! interval however many channels and listeners it has.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::{RootCertStore, ServerConfig};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::tls::{CoordinatorVerifier, TlsFiles, install_crypto_provider};

/// How often every process re-reads its TLS files.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// How long a connection whose certificate stopped being valid stays open
/// after the request that found out, so that request's `UNAUTHENTICATED`
/// answer reaches the client before the connection closes.
pub const REFUSED_CONNECTION_GRACE: Duration = Duration::from_secs(1);

/// One consistent set of TLS objects built from one reading of the files.
pub(crate) struct Material {
    pub(crate) server: Arc<ServerConfig>,
    pub(crate) client: Arc<rustls::ClientConfig>,
    /// Judges client chains: the CA bundle and the CRL.
    pub(crate) client_verifier: Arc<dyn ClientCertVerifier>,
    /// What the files held, to notice a change.
    digest: [u8; 32],
    /// The certificate's serial and expiry, for the log and the gauge.
    summary: String,
    not_after: i64,
}

/// The bytes of a [`TlsFiles`] set.
struct Raw {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
    crl: Option<Vec<u8>>,
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| Error::Tls(format!("cannot read {what} {}: {e}", path.display())))
}

impl Raw {
    fn read(files: &TlsFiles) -> Result<Self, Error> {
        Ok(Self {
            ca: read(&files.ca, "CA bundle")?,
            cert: read(&files.cert, "certificate")?,
            key: read(&files.key, "private key")?,
            crl: files.crl.as_deref().map(|p| read(p, "CRL")).transpose()?,
        })
    }

    fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        for part in [&self.ca[..], &self.cert, &self.key, self.crl.as_deref().unwrap_or(b"-")] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        h.finalize().into()
    }
}

/// Every PEM item of type `T` in `pem`; at least one.
fn parse_all<T: PemObject>(pem: &[u8], path: &Path, what: &str) -> Result<Vec<T>, Error> {
    let items = T::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("{}: {e}", path.display())))?;
    if items.is_empty() {
        return Err(Error::Tls(format!("{}: no {what} found", path.display())));
    }
    Ok(items)
}

pub(crate) fn parse_certs(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    parse_all(pem, path, "certificate")
}

fn parse_crls(pem: &[u8], path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, Error> {
    parse_all(pem, path, "CRL")
}

pub(crate) fn parse_key(pem: &[u8], path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => Error::Tls(format!("{}: no private key found", path.display())),
        e => Error::Tls(format!("{}: {e}", path.display())),
    })
}

/// The certificate's serial (hex) and not-after (Unix seconds).
fn describe(der: &[u8]) -> (String, i64) {
    use x509_parser::prelude::{FromDer, X509Certificate};
    match X509Certificate::from_der(der) {
        Ok((_, c)) => (c.raw_serial_as_string(), c.validity().not_after.timestamp()),
        Err(_) => ("?".into(), 0),
    }
}

fn mismatch(files: &TlsFiles, e: rustls::Error) -> Error {
    Error::Tls(format!(
        "{} does not fit {}: {e}",
        files.key.display(),
        files.cert.display()
    ))
}

impl Material {
    fn build(files: &TlsFiles, raw: &Raw) -> Result<Self, Error> {
        install_crypto_provider();
        crate::identity::validate_trust_domain(&files.trust_domain)?;
        let chain = parse_certs(&raw.cert, &files.cert)?;
        let key = parse_key(&raw.key, &files.key)?;
        let mut roots = RootCertStore::empty();
        for ca in parse_certs(&raw.ca, &files.ca)? {
            roots
                .add(ca)
                .map_err(|e| Error::Tls(format!("CA certificate {}: {e}", files.ca.display())))?;
        }
        let roots = Arc::new(roots);
        let crls = match (&raw.crl, &files.crl) {
            (Some(pem), Some(path)) => parse_crls(pem, path)?,
            _ => Vec::new(),
        };
        // Revocation is checked on the leaf only (cutover's chains are CA →
        // leaf), and a leaf whose issuer published no CRL in the file is
        // judged by its chain alone: the CRL file lists what is revoked, it
        // is not an allowlist.
        let client_verifier = WebPkiClientVerifier::builder(roots.clone())
            .with_crls(crls.clone())
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status()
            .build()
            .map_err(|e| Error::Tls(format!("CA bundle {}: {e}", files.ca.display())))?;
        let server_verifier = WebPkiServerVerifier::builder(roots)
            .with_crls(crls)
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status()
            .build()
            .map_err(|e| Error::Tls(format!("CA bundle {}: {e}", files.ca.display())))?;

        let (summary, not_after) = describe(chain[0].as_ref());
        // Both builders check that the key matches the certificate, so a
        // rotation caught between writing the certificate and the key is
        // refused here and picked up whole on the next reading.
        let mut client = rustls::ClientConfig::builder()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(CoordinatorVerifier {
                inner: server_verifier,
                trust_domain: files.trust_domain.clone(),
            }))
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(|e| mismatch(files, e))?;
        client.alpn_protocols = vec![b"h2".to_vec()];
        let mut server = ServerConfig::builder()
            .with_client_cert_verifier(Arc::new(crate::listener::DeferredVerifier {
                inner: client_verifier.clone(),
            }))
            .with_single_cert(chain, key)
            .map_err(|e| mismatch(files, e))?;
        server.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            server: Arc::new(server),
            client: Arc::new(client),
            client_verifier,
            digest: raw.digest(),
            summary,
            not_after,
        })
    }
}

/// The current TLS material for one [`TlsFiles`]; see the module docs.
pub struct LiveTls {
    files: TlsFiles,
    current: RwLock<Arc<Material>>,
    /// Bumped at every change; connections re-judge their chain when it moves.
    generation: AtomicU64,
    /// Tells open connections of each change (see [`ConnectionCheck::watch`]).
    changes: tokio::sync::watch::Sender<u64>,
}

type Registry = Mutex<HashMap<TlsFiles, Weak<LiveTls>>>;

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        std::thread::Builder::new()
            .name("tls-reload".into())
            .spawn(reload_loop)
            .expect("spawning the TLS reload thread");
        Mutex::new(HashMap::new())
    })
}

/// The reload thread: re-reads every live file set each interval, forgets
/// the ones nobody holds any more.
fn reload_loop() {
    loop {
        std::thread::sleep(RELOAD_INTERVAL);
        let live: Vec<Arc<LiveTls>> = {
            let mut map = registry().lock().unwrap_or_else(|e| e.into_inner());
            map.retain(|_, w| w.strong_count() > 0);
            map.values().filter_map(Weak::upgrade).collect()
        };
        for l in live {
            l.reload();
        }
    }
}

impl LiveTls {
    /// The shared live material for `files`, loading it on first use. An
    /// error here (missing file, key not matching) is a configuration error
    /// and fails the caller's start-up.
    pub fn get(files: &TlsFiles) -> Result<Arc<LiveTls>, Error> {
        let mut map = registry().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(live) = map.get(files).and_then(Weak::upgrade) {
            return Ok(live);
        }
        let material = Material::build(files, &Raw::read(files)?)?;
        material.record(files);
        let live = Arc::new(LiveTls {
            files: files.clone(),
            current: RwLock::new(Arc::new(material)),
            generation: AtomicU64::new(0),
            changes: tokio::sync::watch::Sender::new(0),
        });
        map.insert(files.clone(), Arc::downgrade(&live));
        Ok(live)
    }

    pub(crate) fn material(&self) -> Arc<Material> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// How many times the material changed since it was first loaded.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The files this material is read from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Re-reads the files now; swaps in the new material if they changed
    /// and are valid. Returns whether it changed.
    pub fn reload(&self) -> bool {
        let cert = self.files.cert.display().to_string();
        let raw = match Raw::read(&self.files) {
            Ok(r) => r,
            Err(e) => {
                metrics::counter!("cutover_tls_reload_failures_total", "cert" => cert).increment(1);
                tracing::warn!("TLS files not reloaded, keeping the current ones: {e}");
                return false;
            }
        };
        if raw.digest() == self.material().digest {
            return false;
        }
        match Material::build(&self.files, &raw) {
            Ok(m) => {
                m.record(&self.files);
                tracing::info!(
                    cert = %cert,
                    serial = %m.summary,
                    not_after = m.not_after,
                    "reloaded TLS certificate, key, CA bundle and CRL"
                );
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(m);
                let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
                self.changes.send_replace(generation);
                metrics::counter!("cutover_tls_reloads_total", "cert" => cert).increment(1);
                true
            }
            Err(e) => {
                metrics::counter!("cutover_tls_reload_failures_total", "cert" => cert).increment(1);
                tracing::warn!("TLS files changed but are not usable, keeping the current ones: {e}");
                false
            }
        }
    }

    /// Judges a client's chain (leaf first) with the current CA bundle and
    /// CRL, at the current time.
    pub(crate) fn judge(&self, chain: &[CertificateDer<'static>]) -> Result<(), String> {
        let (leaf, rest) = chain.split_first().ok_or("empty certificate chain")?;
        self.material()
            .client_verifier
            .verify_client_cert(leaf, rest, UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

impl Material {
    /// Publishes the certificate's expiry, which alert rules watch.
    fn record(&self, files: &TlsFiles) {
        metrics::gauge!(
            "cutover_tls_certificate_expiry_timestamp_seconds",
            "cert" => files.cert.display().to_string()
        )
        .set(self.not_after as f64);
    }
}

/// The verdict on one connection's client certificate, re-judged whenever
/// the material changes (a CRL naming it, its CA leaving the bundle).
pub struct ConnectionCheck {
    live: Arc<LiveTls>,
    chain: Arc<Vec<CertificateDer<'static>>>,
    /// The generation the chain was last found valid at.
    judged: AtomicU64,
    /// Why it stopped being valid; once set, the connection is closing.
    refused: OnceLock<String>,
    /// Cancelled to close the connection.
    pub(crate) close: CancellationToken,
}

impl std::fmt::Debug for ConnectionCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionCheck")
            .field("judged", &self.judged)
            .field("refused", &self.refused.get())
            .finish_non_exhaustive()
    }
}

impl ConnectionCheck {
    pub(crate) fn new(live: Arc<LiveTls>, chain: Arc<Vec<CertificateDer<'static>>>, judged: u64) -> Self {
        Self {
            live,
            chain,
            judged: AtomicU64::new(judged),
            refused: OnceLock::new(),
            close: CancellationToken::new(),
        }
    }

    /// Re-judges the connection at every change of the material, not only
    /// at its next request: an agent's session or a `WatchOperation` is one
    /// request that lasts for hours, and a revoked certificate must not keep
    /// it. Runs until the returned guard (held by the connection) drops.
    pub(crate) fn watch(self: &Arc<Self>) -> tokio_util::sync::DropGuard {
        let gone = CancellationToken::new();
        let mut changes = self.live.changes.subscribe();
        let this = self.clone();
        let stop = gone.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = changes.changed() => if r.is_err() { return },
                }
                if this.still_valid().is_err() {
                    return;
                }
            }
        });
        gone.drop_guard()
    }

    /// Whether the connection's certificate is still valid. Costs one atomic
    /// load unless the material changed since the last request.
    pub fn still_valid(&self) -> Result<(), String> {
        if let Some(why) = self.refused.get() {
            return Err(why.clone());
        }
        let now = self.live.generation();
        if self.judged.load(Ordering::Acquire) == now {
            return Ok(());
        }
        match self.live.judge(&self.chain) {
            Ok(()) => {
                self.judged.store(now, Ordering::Release);
                Ok(())
            }
            Err(why) => {
                let why = self.refused.get_or_init(|| why).clone();
                let who = self.chain.first().map_or_else(
                    || "?".to_owned(),
                    |leaf| match crate::identity::Identity::from_certificate_der(
                        leaf.as_ref(),
                        &self.live.files.trust_domain,
                    ) {
                        Ok(id) => id.to_string(),
                        Err(_) => "an unnamed certificate".to_owned(),
                    },
                );
                tracing::warn!(peer = %who, "closing a connection: its client certificate is no longer accepted: {why}");
                let close = self.close.clone();
                match tokio::runtime::Handle::try_current() {
                    Ok(rt) => {
                        rt.spawn(async move {
                            tokio::time::sleep(REFUSED_CONNECTION_GRACE).await;
                            close.cancel();
                        });
                    }
                    Err(_) => close.cancel(),
                }
                Err(why)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::{CertAuthority, write_file, write_issued};
    use crate::identity::{Identity, Role};

    fn operator(name: &str) -> Identity {
        Identity {
            role: Role::Operator,
            name: name.into(),
        }
    }

    fn chain_of(pem: &str) -> Vec<CertificateDer<'static>> {
        parse_certs(pem.as_bytes(), Path::new("test")).unwrap()
    }

    /// A rotation caught between writing the certificate and the key must
    /// not take the process's TLS down, nor swap in a pair that cannot sign.
    #[test]
    fn a_half_written_rotation_keeps_the_old_pair_until_both_files_are_new() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertAuthority::generate("test CA").unwrap();
        let ca_path = dir.path().join("ca.crt");
        write_file(&ca_path, ca.cert_pem(), false).unwrap();
        let first = ca.issue(&operator("op"), &[]).unwrap();
        let files = write_issued(dir.path(), "op", &first, &ca_path).unwrap();
        let live = LiveTls::get(&files).unwrap();
        assert!(
            Arc::ptr_eq(&live, &LiveTls::get(&files).unwrap()),
            "one live set per files"
        );
        assert!(!live.reload(), "nothing changed");

        let second = ca.issue(&operator("op"), &[]).unwrap();
        write_file(&files.cert, &second.cert_pem, false).unwrap();
        assert!(!live.reload(), "a certificate without its key was taken");
        assert_eq!(live.generation(), 0);
        // Hex without leading zeros on both sides: a DER integer drops a
        // leading zero byte that rcgen's serial keeps (1 serial in 256).
        let serial = |c: &crate::certs::IssuedCert| {
            let hex: String = c.serial.iter().map(|b| format!("{b:02x}")).collect();
            hex.trim_start_matches('0').to_owned()
        };
        let summary = |live: &LiveTls| {
            let s = live.material().summary.to_lowercase().replace(':', "");
            s.trim_start_matches('0').to_owned()
        };
        assert_eq!(summary(&live), serial(&first));

        write_file(&files.key, &second.key_pem, true).unwrap();
        assert!(live.reload());
        assert_eq!(live.generation(), 1);
        assert_eq!(summary(&live), serial(&second));

        std::fs::write(&files.ca, b"not a certificate").unwrap();
        assert!(!live.reload(), "a broken CA bundle was taken");
        assert_eq!(live.generation(), 1);
    }

    /// The CRL file is part of the material: a chain it names is refused
    /// once the file lists it, and other chains from the same CA are not.
    #[test]
    fn a_crl_naming_a_certificate_refuses_its_chain() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertAuthority::generate("test CA").unwrap();
        let ca_path = dir.path().join("ca.crt");
        write_file(&ca_path, ca.cert_pem(), false).unwrap();
        let crl_path = dir.path().join("revoked.crl");
        write_file(&crl_path, &ca.crl(1, &[]).unwrap(), false).unwrap();
        let server = ca.issue(&operator("server"), &[]).unwrap();
        let mut files = write_issued(dir.path(), "server", &server, &ca_path).unwrap();
        files.crl = Some(crl_path.clone());
        let live = LiveTls::get(&files).unwrap();
        let mallory = ca.issue(&operator("mallory"), &[]).unwrap();
        let alice = ca.issue(&operator("alice"), &[]).unwrap();
        live.judge(&chain_of(&mallory.cert_pem)).unwrap();

        write_file(&crl_path, &ca.crl(2, &[&mallory.serial]).unwrap(), false).unwrap();
        assert!(live.reload());
        let why = live.judge(&chain_of(&mallory.cert_pem)).unwrap_err();
        assert!(why.contains("Revoked"), "{why}");
        live.judge(&chain_of(&alice.cert_pem)).unwrap();
    }
}
