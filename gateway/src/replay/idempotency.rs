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
use axum::response::Response;
use berth_proto::v1::RequestState;
use berth_store::{Store, StoreError};
use sha2::{Digest, Sha256};

/// Largest direct answer body kept for a keyed request; a longer one is kept cut (marked
/// truncated) while the client gets it whole.
pub const MAX_KEPT_ANSWER: usize = 1024 * 1024;
/// How much longer than an agent's request timeout a key taken without a stored request is
/// held before it counts as orphaned (its gateway died) and is let go.
pub const ORPHAN_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

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
    // At most twice: a second pass only after an orphaned key was let go.
    for _ in 0..2 {
        let Some(held) = store
            .take_idempotency_key(agent, &keyed.key, id, &keyed.payload, route.replay.ttl)
            .await
            .map_err(not_persisted)?
        else {
            return Ok(Begin::Fresh);
        };
        if held.payload != keyed.payload {
            return Err(GatewayError::KeyReused {
                agent: agent.to_string(),
            });
        }
        let stored = match store.get_request_outcome(&held.holder).await {
            Ok(stored) => stored.request,
            // Taken, but no request stored: the first one is still on its way, unless it has
            // been longer than any attempt can take (its gateway died between taking the
            // key and storing the request). Such an orphan is let go, so a key never wedges.
            Err(StoreError::NotFound { .. }) if held.age > route.timeout + ORPHAN_GRACE => {
                tracing::warn!(agent, age = ?held.age, "releasing an orphaned idempotency key");
                store
                    .release_orphan_key(agent, &keyed.key, &held)
                    .await
                    .map_err(not_persisted)?;
                continue;
            }
            Err(StoreError::NotFound { .. }) => {
                return Err(GatewayError::KeyInFlight {
                    agent: agent.to_string(),
                })
            }
            Err(e) => return Err(not_persisted(e)),
        };
        // Delivered: its answer. Queued, on its way or dead-lettered: the same 202.
        return Ok(Begin::Answer(
            delivered(&stored).unwrap_or_else(|| super::accepted(&stored.id)),
        ));
    }
    Err(GatewayError::KeyInFlight {
        agent: agent.to_string(),
    })
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
    // Kept whole up to the limit, cut and marked beyond it: either way the key completes,
    // and a repeat gets this outcome, never 409.
    let (answer, whole) = super::answer::keep(response, MAX_KEPT_ANSWER).await;
    let mut request = super::to_request(&kept, Ending::Answered);
    request.state = RequestState::Delivered as i32;
    request.last_error.clear();
    request.response = Some(answer);
    if let Err(e) = store.enqueue_request(&mut request, route.replay.ttl).await {
        // The client still gets its answer; the key goes, so a repeat is sent again.
        tracing::warn!(agent = %kept.agent, error = %e, "cannot keep the answer of a keyed request");
        release(store, &kept.agent, keyed).await;
    }
    Ok(whole)
}

/// Lets a key go, so that a repeat of the request is sent again.
pub async fn release(store: &Store, agent: &str, keyed: &Keyed) {
    if let Err(e) = store.release_idempotency_key(agent, &keyed.key).await {
        tracing::warn!(agent = %agent, error = %e, "cannot release an idempotency key");
    }
}
