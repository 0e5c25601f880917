//! Development PKI: a throw-away CA and the certificates `cutover certs init`,
//! `cutover dev` and the tests need. Production users bring their own PKI; the
//! fields these certificates carry are what ARCHITECTURE.md documents.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason, RevokedCertParams,
    SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::Error;
use crate::identity::{DEFAULT_TRUST_DOMAIN, Identity, Role};
use crate::tls::TlsFiles;

fn pki(e: impl std::fmt::Display) -> Error {
    Error::Tls(format!("certificate generation failed: {e}"))
}

/// A certificate authority that can issue cutover certificates.
pub struct CertAuthority {
    params: CertificateParams,
    key: KeyPair,
    cert_pem: String,
    /// The trust domain `issue` and `issue_window` name.
    trust_domain: String,
}

impl std::fmt::Debug for CertAuthority {
    // Never the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertAuthority")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

/// A PEM certificate, its PEM private key and its serial number.
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
    /// The serial, as a CRL names it.
    pub serial: Vec<u8>,
}

impl CertAuthority {
    /// A fresh self-signed CA valid for ten years.
    pub fn generate(common_name: &str) -> Result<Self, Error> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "cutover");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(3650);
        let key = KeyPair::generate().map_err(pki)?;
        let cert = params.self_signed(&key).map_err(pki)?;
        Ok(Self {
            cert_pem: cert.pem(),
            params,
            key,
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
        })
    }

    /// Issues in `trust_domain` from now on.
    pub fn with_trust_domain(mut self, trust_domain: &str) -> Result<Self, Error> {
        crate::identity::validate_trust_domain(trust_domain)?;
        self.trust_domain = trust_domain.to_owned();
        Ok(self)
    }

    /// The CA certificate in PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a certificate for `identity`, usable as both TLS server and
    /// client, valid from `not_before` to `not_after` relative to now (the
    /// window may lie in the past, which tests use to make expired certificates).
    pub fn issue_window(
        &self,
        identity: &Identity,
        dns_names: &[&str],
        not_before: Duration,
        not_after_from_now: i64,
    ) -> Result<IssuedCert, Error> {
        self.issue_full(&self.trust_domain, identity, dns_names, not_before, not_after_from_now)
    }

    /// Issues a one-year certificate in another trust domain (for tests of
    /// two systems under one CA).
    pub fn issue_in(&self, trust_domain: &str, identity: &Identity, dns_names: &[&str]) -> Result<IssuedCert, Error> {
        self.issue_full(
            trust_domain,
            identity,
            dns_names,
            Duration::from_secs(3600),
            365 * 24 * 3600,
        )
    }

    fn issue_full(
        &self,
        trust_domain: &str,
        identity: &Identity,
        dns_names: &[&str],
        not_before: Duration,
        not_after_from_now: i64,
    ) -> Result<IssuedCert, Error> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity.to_string());
        dn.push(DnType::OrganizationName, "cutover");
        params.distinguished_name = dn;
        let mut sans = vec![SanType::URI(identity.spiffe_uri(trust_domain).try_into().map_err(pki)?)];
        for name in dns_names {
            sans.push(SanType::DnsName((*name).try_into().map_err(pki)?));
        }
        if identity.role == Role::Coordinator {
            sans.push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
            sans.push(SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)));
        }
        params.subject_alt_names = sans;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::try_from(not_before).map_err(pki)?;
        params.not_after = now + time::Duration::seconds(not_after_from_now);
        let key = KeyPair::generate().map_err(pki)?;
        // A serial unique to the key (its public key's digest), positive and
        // at most 20 octets as RFC 5280 requires.
        let digest = <sha2::Sha256 as sha2::Digest>::digest(key.public_key_raw());
        let mut serial = digest[..16].to_vec();
        serial[0] &= 0x7f;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).map_err(pki)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial,
        })
    }

    /// A PEM CRL signed by this CA listing `revoked` serials (for a key
    /// compromise), valid for a week; `number` must grow with each new CRL.
    pub fn crl(&self, number: u64, revoked: &[&[u8]]) -> Result<String, Error> {
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - time::Duration::minutes(1),
            next_update: now + time::Duration::days(7),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|serial| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(serial),
                    revocation_time: now - time::Duration::minutes(1),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let issuer = Issuer::from_params(&self.params, &self.key);
        params.signed_by(&issuer).map_err(pki)?.pem().map_err(pki)
    }

    /// Issues a certificate valid for one year.
    pub fn issue(&self, identity: &Identity, dns_names: &[&str]) -> Result<IssuedCert, Error> {
        self.issue_window(identity, dns_names, Duration::from_secs(3600), 365 * 24 * 3600)
    }
}

/// Writes `data` to `path`; with `private`, the file is created with mode 0600
/// so that a private key is never readable by others, not even briefly.
pub fn write_file(path: &Path, data: &str, private: bool) -> Result<(), Error> {
    use std::io::Write;
    let io = |e: std::io::Error| Error::Io(format!("writing {}: {e}", path.display()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if private { 0o600 } else { 0o644 });
    }
    let mut f = opts.open(path).map_err(io)?;
    #[cfg(unix)]
    if private {
        // The mode above applies only when the file is created; tighten an
        // existing file too.
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    f.write_all(data.as_bytes()).map_err(io)?;
    Ok(())
}

/// Writes `<dir>/<stem>.crt` and `<dir>/<stem>.key` (0600) and returns the
/// TLS file set for it, with `ca` as the trust root.
pub fn write_issued(dir: &Path, stem: &str, cert: &IssuedCert, ca: &Path) -> Result<TlsFiles, Error> {
    let cert_path = dir.join(format!("{stem}.crt"));
    let key_path = dir.join(format!("{stem}.key"));
    write_file(&cert_path, &cert.cert_pem, false)?;
    write_file(&key_path, &cert.key_pem, true)?;
    Ok(TlsFiles {
        ca: ca.to_owned(),
        cert: cert_path,
        key: key_path,
        trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
        crl: None,
    })
}

/// What `cutover certs init` writes.
#[derive(Clone, Debug)]
pub struct DevPki {
    pub dir: PathBuf,
    pub ca: PathBuf,
    /// The CA itself, for issuing more (tests).
    pub authority: std::sync::Arc<CertAuthority>,
    pub trust_domain: String,
    /// Coordinator node id → files.
    pub coordinators: Vec<(u64, TlsFiles)>,
    /// (region, cluster) → files.
    pub agents: Vec<(String, String, TlsFiles)>,
    pub operator: TlsFiles,
    pub viewer: TlsFiles,
}

/// Writes a development CA plus certificates for `coordinators` coordinator
/// nodes (ids 1..=n, named by id), one agent per `(region, cluster)`, an
/// operator and a viewer into `dir`, all in `trust_domain`.
pub fn init_dev_pki(
    dir: &Path,
    trust_domain: &str,
    coordinators: u64,
    agents: &[(&str, &str)],
) -> Result<DevPki, Error> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Io(format!("creating {}: {e}", dir.display())))?;
    let ca = CertAuthority::generate("cutover development CA")?.with_trust_domain(trust_domain)?;
    let write_issued = |dir: &Path, stem: &str, cert: &IssuedCert, ca: &Path| {
        write_issued(dir, stem, cert, ca).map(|mut t| {
            t.trust_domain = trust_domain.to_owned();
            t
        })
    };
    let ca_path = dir.join("ca.crt");
    write_file(&ca_path, ca.cert_pem(), false)?;
    let mut coordinator_files = Vec::new();
    for id in 1..=coordinators {
        let ident = Identity {
            role: Role::Coordinator,
            name: id.to_string(),
        };
        let host = format!("coordinator-{id}");
        let issued = ca.issue(&ident, &["localhost", &host])?;
        coordinator_files.push((id, write_issued(dir, &host, &issued, &ca_path)?));
    }
    let mut agent_files = Vec::new();
    for (region, cluster) in agents {
        let ident = Identity {
            role: Role::Agent,
            name: format!("{region}/{cluster}"),
        };
        let issued = ca.issue(&ident, &[])?;
        let files = write_issued(dir, &format!("agent-{region}-{cluster}"), &issued, &ca_path)?;
        agent_files.push((region.to_string(), cluster.to_string(), files));
    }
    let op = Identity {
        role: Role::Operator,
        name: "admin".into(),
    };
    let operator = write_issued(dir, "operator", &ca.issue(&op, &[])?, &ca_path)?;
    let viewer = Identity {
        role: Role::Viewer,
        name: "viewer".into(),
    };
    let viewer = write_issued(dir, "viewer", &ca.issue(&viewer, &[])?, &ca_path)?;
    Ok(DevPki {
        dir: dir.to_owned(),
        ca: ca_path,
        authority: std::sync::Arc::new(ca),
        trust_domain: trust_domain.to_owned(),
        coordinators: coordinator_files,
        agents: agent_files,
        operator,
        viewer,
    })
}
