//! The one error type of the control service's application layer, and the
//! one place it becomes a gRPC status.

use tonic::Status;

use crate::raft::ProposeError;

/// Why a control call was refused or failed. Each variant names the gRPC
/// code clients see; the message is for the operator and never holds a
/// secret.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or names something impossible; retrying it
    /// unchanged fails again.
    #[error("{0}")]
    InvalidArgument(String),
    /// An app, release, operation, node or agent that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Already there (a voter added twice).
    #[error("{0}")]
    AlreadyExists(String),
    /// Valid, but not now: an operation already runs, an agent is down, a
    /// required attestation is missing.
    #[error("{0}")]
    FailedPrecondition(String),
    /// No leader, or this node cannot reach it: retry.
    #[error("{0}")]
    Unavailable(String),
    /// Stored data could not be read back (the audit file's chain broke).
    #[error("{0}")]
    DataLoss(String),
    /// A bug or an I/O failure on this node.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn invalid_argument(m: impl Into<String>) -> Self {
        Self::InvalidArgument(m.into())
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::NotFound(m.into())
    }
    pub fn already_exists(m: impl Into<String>) -> Self {
        Self::AlreadyExists(m.into())
    }
    pub fn failed_precondition(m: impl Into<String>) -> Self {
        Self::FailedPrecondition(m.into())
    }
    pub fn unavailable(m: impl Into<String>) -> Self {
        Self::Unavailable(m.into())
    }
    pub fn data_loss(m: impl Into<String>) -> Self {
        Self::DataLoss(m.into())
    }
    pub fn internal(m: impl Into<String>) -> Self {
        Self::Internal(m.into())
    }
}

/// The one mapping from the application layer's errors to gRPC codes.
impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        match e {
            ApiError::InvalidArgument(m) => Status::invalid_argument(m),
            ApiError::NotFound(m) => Status::not_found(m),
            ApiError::AlreadyExists(m) => Status::already_exists(m),
            ApiError::FailedPrecondition(m) => Status::failed_precondition(m),
            ApiError::Unavailable(m) => Status::unavailable(m),
            ApiError::DataLoss(m) => Status::data_loss(m),
            ApiError::Internal(m) => Status::internal(m),
        }
    }
}

impl From<ProposeError> for ApiError {
    fn from(e: ProposeError) -> Self {
        match e {
            ProposeError::Rejected(m) => ApiError::FailedPrecondition(m),
            ProposeError::UnknownNode(id) => ApiError::NotFound(format!("node {id} is not a member of the cluster")),
            ProposeError::NotLeader { .. } | ProposeError::NoLeader(_) | ProposeError::LevelUnknown(_) => {
                ApiError::Unavailable(e.to_string())
            }
            ProposeError::Raft(m) => ApiError::Unavailable(format!("raft: {m}")),
        }
    }
}

impl From<cutover_shared::Error> for ApiError {
    fn from(e: cutover_shared::Error) -> Self {
        match e {
            cutover_shared::Error::InvalidArgument(m) => ApiError::InvalidArgument(m),
            other => ApiError::Internal(other.to_string()),
        }
    }
}
