//! `Idempotency-Key` (IETF httpapi draft semantics), per agent, kept `REQUEST_TTL`:
//! the same key with the same payload gets the stored result (or the 202 of the same queued
//! request); the same key while the first request is still in flight gets 409; the same key
//! with a different payload gets 422. A request whose answer was a failure releases its key,
//! so that the client may try again.

use super::super::error::GatewayError;
use super::super::forward::{Forward, ForwardBody, IDEMPOTENCY_KEY};
use super::super::routes::Route;
use super::results::delivered;
use crate::outcome::Ending;
use axum::body::Body;
use axum::response::Response;
use berth_proto::v1::{RequestState, StoredResponse};
use berth_store::{Store, StoreError};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use std::time::SystemTime;

/// Largest direct answer kept for a keyed request; a larger one fails the request with 400.
pub const MAX_KEPT_ANSWER: usize = 1024 * 1024;

/// A request's `Idempotency-Key`, hashed for use in a key, and the digest of its payload.
#[derive(Clone, Debug)]
pub struct Keyed {
    /// Hex SHA-256 of the key.
    pub key: String,
    /// Hex SHA-256 of method, path, query and body.
    pub payload: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The key and payload digest of `forward`, if it carries an `Idempotency-Key`.
pub fn keyed(forward: &Forward) -> Option<Keyed> {
    let key = forward.headers.get(IDEMPOTENCY_KEY)?.as_bytes();
    let mut payload = Sha256::new();
    payload.update(forward.method.as_str());
    payload.update([0]);
    payload.update(&forward.path_and_query);
    payload.update([0]);
    if let ForwardBody::Buffered(body) = &forward.body {
        payload.update(body);
    }
    Some(Keyed {
        key: hex(&Sha256::digest(key)),
        payload: hex(&payload.finalize()),
    })
}

/// What an earlier request with the same key means for this one.
pub enum Begin {
    /// The key is ours: go on.
    Fresh,
    /// Answer this instead of sending.
    Answer(Response),
}

/// Takes the key for request `id`, or answers from the request that holds it.
pub async fn begin(
    store: &Store,
    route: &Route,
    keyed: &Keyed,
    id: &str,
) -> Result<Begin, GatewayError> {
    let agent = route.agent.as_str();
    let not_persisted = |source: StoreError| GatewayError::NotPersisted {
        agent: agent.to_string(),
        source,
    };
    let Some((held_by, payload)) = store
        .take_idempotency_key(agent, &keyed.key, id, &keyed.payload, route.replay.ttl)
        .await
        .map_err(not_persisted)?
    else {
        return Ok(Begin::Fresh);
    };
    if payload != keyed.payload {
        return Err(GatewayError::KeyReused {
            agent: agent.to_string(),
        });
    }
    let stored = match store.get_request(&held_by).await {
        Ok(stored) => stored.request,
        // Taken, but no request stored yet: the first one is still on its way.
        Err(StoreError::NotFound { .. }) => {
            return Err(GatewayError::KeyInFlight {
                agent: agent.to_string(),
            })
        }
        Err(e) => return Err(not_persisted(e)),
    };
    // Delivered: its answer. Queued, on its way or dead-lettered: the same 202.
    Ok(Begin::Answer(
        delivered(&stored).unwrap_or_else(|| super::accepted(&stored.id)),
    ))
}

/// Keeps a direct answer to a keyed request so that a repeat gets it; failures release the
/// key instead. Returns the answer to send (rebuilt when its body was read to keep it).
pub async fn finish(
    store: &Store,
    route: &Route,
    kept: Forward,
    keyed: &Keyed,
    result: Result<Response, GatewayError>,
) -> Result<Response, GatewayError> {
    let final_answer = matches!(&result, Ok(r) if Ending::of_status(r.status()) == Ending::Answered && !r.status().is_server_error());
    if !final_answer {
        release(store, &kept.agent, keyed).await;
        return result;
    }
    let response = result.expect("checked above");
    let (parts, body) = response.into_parts();
    let body = match http_body_util::Limited::new(body, MAX_KEPT_ANSWER)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            return Err(GatewayError::BadRequest(format!(
                "the agent's answer could not be read in full: {e}"
            )))
        }
    };
    let mut request = super::to_request(&kept, Ending::Answered);
    request.state = RequestState::Delivered as i32;
    request.last_error.clear();
    request.response = Some(StoredResponse {
        status: parts.status.as_u16() as u32,
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| berth_proto::v1::Header {
                name: k.as_str().to_string(),
                value: v.as_bytes().to_vec(),
            })
            .collect(),
        body: body.to_vec(),
        complete_time: Some(berth_proto::timestamp(SystemTime::now())),
    });
    if let Err(e) = store.enqueue_request(&mut request, route.replay.ttl).await {
        // The client still gets its answer; the key goes, so a repeat is sent again.
        tracing::warn!(agent = %kept.agent, error = %e, "cannot keep the answer of a keyed request");
        release(store, &kept.agent, keyed).await;
    }
    Ok(Response::from_parts(parts, Body::from(body)))
}

/// Lets a key go, so that a repeat of the request is sent again.
pub async fn release(store: &Store, agent: &str, keyed: &Keyed) {
    if let Err(e) = store.release_idempotency_key(agent, &keyed.key).await {
        tracing::warn!(agent = %agent, error = %e, "cannot release an idempotency key");
    }
}
