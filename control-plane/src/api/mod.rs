//! The gRPC API. Errors become `tonic::Status` in exactly one place: [`to_status`].

mod agents;
mod nodes;
mod requests;
mod tokens;

pub use agents::AgentApi;
pub use nodes::NodeApi;
pub use requests::RequestApi;
pub use tokens::TokenApi;

use berth_proto::validate::FieldError;
use berth_store::StoreError;
use tonic::Status;

/// What an API call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A field of the request is not valid.
    #[error(transparent)]
    Invalid(#[from] FieldError),
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The request does not fit the object's current state.
    #[error("{0}")]
    FailedPrecondition(String),
}

/// Maps an API error to the gRPC status clients see.
pub fn to_status(err: ApiError) -> Status {
    match err {
        ApiError::Invalid(e) => Status::invalid_argument(e.to_string()),
        ApiError::FailedPrecondition(message) => Status::failed_precondition(message),
        ApiError::Store(e) => match e {
            StoreError::NotFound { .. } => Status::not_found(e.to_string()),
            StoreError::AlreadyExists { .. } => Status::already_exists(e.to_string()),
            StoreError::Conflict { .. } | StoreError::NotLeader { .. } => {
                Status::aborted(e.to_string())
            }
            StoreError::Unavailable { .. } => {
                tracing::warn!(error = %e, "store unavailable");
                Status::unavailable(e.to_string())
            }
            StoreError::Tls(_) => Status::unavailable(e.to_string()),
            StoreError::Invalid(_) => Status::invalid_argument(e.to_string()),
            StoreError::Corrupt { .. } => {
                tracing::error!(error = %e, "corrupt value in store");
                Status::internal(e.to_string())
            }
        },
    }
}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Self {
        to_status(err)
    }
}
