//! The crate every cutover crate uses: the generated API (`proto`), plain
//! domain types (`domain`), conversions between the two (`convert`), caller
//! identity (`identity`), mutual TLS (`tls`, `listener` for the
//! server side, `material` for reloading certificates and CRLs), the development PKI (`certs`),
//! gRPC server plumbing (`grpc`), process configuration (`config`),
//! telemetry (`telemetry`), the typed coordinator-agent task contract
//! (`task`) and what an operation is asked to do (`operation`).

#![forbid(unsafe_code)]

pub mod analysis;
pub mod app;
pub mod backup;
pub mod certs;
pub mod clock;
pub mod config;
pub mod convert;
pub mod domain;
pub mod dr;
pub mod grpc;
pub mod identity;
pub mod listener;
pub mod load;
pub mod material;
pub mod net;
pub mod operation;
pub mod proto;
pub mod release;
pub mod task;
pub mod telemetry;
pub mod tls;

/// How many inputs each fuzz target runs (`CUTOVER_FUZZ_CASES`, default
/// 512: what CI runs). The targets are proptest tests in
/// `shared/tests/fuzz.rs` and the coordinator's Raft codec.
#[doc(hidden)]
pub fn fuzz_cases() -> u32 {
    std::env::var("CUTOVER_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512)
}

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("identity: {0}")]
    Identity(String),
    #[error("tls: {0}")]
    Tls(String),
    #[error("io: {0}")]
    Io(String),
    #[error("config: {0}")]
    Config(String),
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidArgument(m) => tonic::Status::invalid_argument(m),
            Error::Identity(m) => tonic::Status::unauthenticated(m),
            other => tonic::Status::internal(other.to_string()),
        }
    }
}
