//! What a gateway request can fail with, and the one function that turns it into the JSON
//! error response clients see: `{"error": {"code": "...", "message": "..."}}`.

use axum::body::Body;
use axum::response::Response;
use http::{header, HeaderValue, StatusCode};
use std::time::Duration;

/// Seconds a shed or unavailable request is told to wait.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Why the gateway answered instead of a replica.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// No agent of that name.
    #[error("no agent named {agent}")]
    UnknownAgent { agent: String },
    /// The agent requires a gateway token and the request's is missing or wrong.
    #[error("agent {agent} requires its gateway token: Authorization: Bearer <token>")]
    Unauthorized { agent: String },
    /// No replica is ready, or every ready replica's breaker is open.
    #[error("agent {agent} has no replica that can take the request ({reason})")]
    NoReplica { agent: String, reason: &'static str },
    /// The agent's concurrency limit is reached.
    #[error("agent {agent} is at its concurrency limit; retry later")]
    Overloaded { agent: String },
    /// The replica did not start answering within the agent's request timeout.
    #[error("agent {agent}: replica {replica} did not answer within {timeout:?}")]
    Timeout {
        agent: String,
        replica: String,
        timeout: Duration,
    },
    /// The replica could not be reached or broke the connection.
    #[error("agent {agent}: replica {replica}: {source}")]
    Upstream {
        agent: String,
        replica: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    /// The request itself is not acceptable (body too large to read, bad path).
    #[error("{0}")]
    BadRequest(String),
    /// The request's header fields are over the gateway's limit.
    #[error("the request's headers are {bytes} bytes, over the gateway's limit of {limit} (--max-header-bytes)")]
    HeadersTooLarge { bytes: usize, limit: usize },
    /// The client did not send the body within the gateway's limit.
    #[error("the request body did not arrive within {timeout:?} (--body-timeout)")]
    BodyTimeout { timeout: Duration },
    /// The request would have to be queued, but its body is over the agent's replay limit (or,
    /// streamed without a length, did not end within it and the gateway's gathering window).
    #[error("agent {agent} cannot take the request now, and its body is over the {limit}-byte limit for queueing it (replay.maxBody, `berth deploy --replay-max-body`){}", if *.streamed { " or, streamed without a Content-Length, did not end within 1 s" } else { "" })]
    TooLarge {
        agent: String,
        limit: u64,
        streamed: bool,
    },
    /// The agent's queue is at its bound.
    #[error("agent {agent} cannot take the request now and its replay queue is full; retry later")]
    QueueFull { agent: String },
    /// The request could not be stored for replay (etcd unreachable): nothing was promised.
    #[error("agent {agent} cannot take the request now, and it could not be stored for replay: {source}")]
    NotPersisted {
        agent: String,
        #[source]
        source: berth_store::StoreError,
    },
    /// Queueing the request was not confirmed (etcd did not answer): it is not queued, or a
    /// write that etcd holds is applied late and it is. Its id tells which, once etcd answers.
    #[error("agent {agent} cannot take the request now, and etcd did not confirm queueing it for replay ({source}): it is not queued, or etcd applies the write late and it is; GET /requests/{request_id} tells once etcd answers, and a retry with the same Idempotency-Key cannot run it twice")]
    QueueUnconfirmed {
        agent: String,
        request_id: String,
        #[source]
        source: berth_store::StoreError,
    },
    /// The `Idempotency-Key` was used before with a different request.
    #[error("agent {agent}: this Idempotency-Key was used with a different request")]
    KeyReused { agent: String },
    /// The first request with this `Idempotency-Key` is still being answered.
    #[error("agent {agent}: the first request with this Idempotency-Key is still in flight")]
    KeyInFlight { agent: String },
    /// No stored request has that id (or the caller may not read it).
    #[error("no request {id}")]
    UnknownRequest { id: String },
}

impl From<berth_proto::request::RequestError> for GatewayError {
    fn from(e: berth_proto::request::RequestError) -> Self {
        use berth_proto::request::RequestError;
        match e {
            RequestError::HeadersTooLarge { bytes, limit } => {
                Self::HeadersTooLarge { bytes, limit }
            }
            RequestError::BadContentLength => Self::BadRequest(e.to_string()),
        }
    }
}

impl GatewayError {
    /// The replica the failure happened at, if one was tried.
    pub fn replica(&self) -> Option<&str> {
        match self {
            Self::Timeout { replica, .. } | Self::Upstream { replica, .. } => Some(replica),
            _ => None,
        }
    }

    /// Whether the failure may have happened before the replica saw the request at all
    /// (a connection that could not be made), which makes any request safe to retry.
    pub fn before_request(&self) -> bool {
        matches!(self, Self::Upstream { source, .. } if source.is_connect())
    }

    /// The id of the request the failure concerns, when the client may look it up.
    fn request_id(&self) -> Option<&str> {
        match self {
            Self::QueueUnconfirmed { request_id, .. } => Some(request_id),
            _ => None,
        }
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::UnknownAgent { .. } => (StatusCode::NOT_FOUND, "agent_not_found"),
            Self::Unauthorized { .. } => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::NoReplica { .. } => (StatusCode::SERVICE_UNAVAILABLE, "no_ready_replica"),
            Self::Overloaded { .. } => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            Self::Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"),
            Self::Upstream { .. } => (StatusCode::BAD_GATEWAY, "upstream_failed"),
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Self::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            Self::HeadersTooLarge { .. } => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
            ),
            Self::BodyTimeout { .. } => (StatusCode::REQUEST_TIMEOUT, "body_timeout"),
            Self::QueueFull { .. } => (StatusCode::SERVICE_UNAVAILABLE, "queue_full"),
            Self::NotPersisted { .. } | Self::QueueUnconfirmed { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "queue_unavailable")
            }
            Self::UnknownRequest { .. } => (StatusCode::NOT_FOUND, "request_not_found"),
            Self::KeyReused { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused"),
            Self::KeyInFlight { .. } => (StatusCode::CONFLICT, "idempotency_key_in_flight"),
        }
    }
}

/// The HTTP response for `err`.
pub fn to_response(err: &GatewayError) -> Response {
    let (status, code) = err.status_and_code();
    let mut body = serde_json::json!({"error": {"code": code, "message": err.to_string()}});
    if let Some(id) = err.request_id() {
        body["error"]["request_id"] = id.into();
    }
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if status == StatusCode::SERVICE_UNAVAILABLE {
        headers.insert(
            header::RETRY_AFTER,
            HeaderValue::from(RETRY_AFTER.as_secs()),
        );
    }
    if status == StatusCode::UNAUTHORIZED {
        headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}
