//! Caller identity, taken from the peer's client certificate.
//!
//! A certificate names its holder with one URI SAN of the form
//! `spiffe://<trust-domain>/<role>/<name>`; for agents the name is
//! `<region>/<cluster>`, for coordinators the Raft node id. Nothing a caller
//! sends in a message can change who it is: identity comes from the verified
//! certificate only.
//!
//! The trust domain is configuration (`tls.trust_domain`, default
//! `cutover`), checked on every identity: a staging certificate never acts
//! in production, even when one CA signed both.

use std::fmt;

use serde::{Deserialize, Serialize};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::Error;
use crate::domain::{ClusterRef, validate_name};

/// The trust domain when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "cutover";

/// Checks a trust domain name as SPIFFE defines it: 1..=255 of lowercase
/// letters, digits, `.`, `-` and `_`.
pub fn validate_trust_domain(td: &str) -> Result<(), Error> {
    let ok = !td.is_empty()
        && td.len() <= 255
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "trust domain {td:?} must be 1..=255 lowercase letters, digits, '.', '-' or '_'"
        )))
    }
}

/// What a caller may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Another coordinator node: Raft RPCs and forwarded writes.
    Coordinator,
    /// An agent: may only act for its own region and cluster.
    Agent,
    /// May start operations and change the cluster.
    Operator,
    /// Read-only.
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Agent => "agent",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "coordinator" => Role::Coordinator,
            "agent" => Role::Agent,
            "operator" => Role::Operator,
            "viewer" => Role::Viewer,
            _ => return None,
        })
    }
}

/// Who is calling, as proven by a certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub role: Role,
    /// The principal's name; `region/cluster` for agents.
    pub name: String,
}

impl Identity {
    /// The SPIFFE URI naming this identity in `trust_domain`.
    pub fn spiffe_uri(&self, trust_domain: &str) -> String {
        format!("spiffe://{trust_domain}/{}/{}", self.role.as_str(), self.name)
    }

    /// Parses `spiffe://<trust_domain>/<role>/<name...>`, refusing any other
    /// trust domain.
    pub fn from_spiffe_uri(uri: &str, trust_domain: &str) -> Result<Identity, Error> {
        // Quote at most a prefix: a huge URI must not come back whole.
        let shown: String = uri.chars().take(120).collect();
        let bad = |why: &str| Error::Identity(format!("certificate URI {shown:?}: {why}"));
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| bad("not a spiffe:// URI"))?;
        let (domain, path) = rest.split_once('/').ok_or_else(|| bad("no path"))?;
        if domain != trust_domain {
            return Err(bad(&format!(
                "trust domain {domain:?} is not this system's {trust_domain:?}"
            )));
        }
        let (role, name) = path.split_once('/').ok_or_else(|| bad("expected <role>/<name>"))?;
        let role = Role::parse(role).ok_or_else(|| bad("unknown role"))?;
        let segments: Vec<&str> = name.split('/').collect();
        let expected = if role == Role::Agent { 2 } else { 1 };
        if segments.len() != expected {
            return Err(bad(if role == Role::Agent {
                "agent names are <region>/<cluster>"
            } else {
                "name must be one segment"
            }));
        }
        for s in &segments {
            validate_name("certificate name", s).map_err(|e| bad(&e.to_string()))?;
        }
        Ok(Identity {
            role,
            name: name.to_owned(),
        })
    }

    /// Reads the identity from a DER certificate's URI SANs. Exactly one
    /// `spiffe://` URI must be present, in `trust_domain`.
    pub fn from_certificate_der(der: &[u8], trust_domain: &str) -> Result<Identity, Error> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| Error::Identity(format!("unreadable certificate: {e}")))?;
        let mut found = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::URI(uri) = name
                    && uri.starts_with("spiffe://")
                {
                    found.push(Identity::from_spiffe_uri(uri, trust_domain)?);
                }
            }
        }
        match found.len() {
            1 => Ok(found.remove(0)),
            0 => Err(Error::Identity(format!(
                "certificate has no spiffe://{trust_domain}/<role>/<name> URI SAN"
            ))),
            _ => Err(Error::Identity("certificate has more than one SPIFFE URI SAN".into())),
        }
    }

    /// For agents: the cluster the certificate binds it to.
    pub fn agent_cluster(&self) -> Option<ClusterRef> {
        if self.role != Role::Agent {
            return None;
        }
        let (region, cluster) = self.name.split_once('/')?;
        Some(ClusterRef {
            region: region.to_owned(),
            cluster: cluster.to_owned(),
        })
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.role.as_str(), self.name)
    }
}

/// Reads the identity named by the first certificate in a PEM file.
pub fn identity_from_pem_file(path: &std::path::Path, trust_domain: &str) -> Result<Identity, Error> {
    let pem = std::fs::read(path).map_err(|e| Error::Tls(format!("cannot read {}: {e}", path.display())))?;
    let chain = crate::material::parse_certs(&pem, path)?;
    Identity::from_certificate_der(chain[0].as_ref(), trust_domain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_roles_and_refuses_malformed_uris() {
        let parse = |uri: &str| Identity::from_spiffe_uri(uri, DEFAULT_TRUST_DOMAIN);
        let a = parse("spiffe://cutover/agent/us-east/c1").unwrap();
        assert_eq!(a.role, Role::Agent);
        assert_eq!(a.agent_cluster().unwrap(), ClusterRef::new("us-east", "c1").unwrap());
        let o = parse("spiffe://cutover/operator/alice").unwrap();
        assert_eq!(o.to_string(), "operator/alice");
        for bad in [
            "spiffe://other/operator/alice",
            "spiffe://cutover/root/alice",
            "spiffe://cutover/agent/us-east",
            "spiffe://cutover/agent/../c1",
            "spiffe://cutover/operator/a/b",
            "https://cutover/operator/alice",
        ] {
            assert!(parse(bad).is_err(), "{bad} accepted");
        }
        // Another trust domain is another system, whatever the CA.
        let staging = Identity::from_spiffe_uri("spiffe://staging/operator/alice", "staging").unwrap();
        assert_eq!(staging.to_string(), "operator/alice");
        let err = parse("spiffe://staging/operator/alice").unwrap_err().to_string();
        assert!(err.contains("\"staging\" is not this system's \"cutover\""), "{err}");
        assert!(validate_trust_domain("prod.example.com").is_ok());
        for bad in ["", "Prod", "a/b", "a b"] {
            assert!(validate_trust_domain(bad).is_err(), "{bad:?} accepted");
        }
    }
}
