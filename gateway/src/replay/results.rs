//! What became of a queued request: `GET /requests/{id}`, and `Prefer: wait=N`, which holds
//! the client's connection until the agent's answer is stored.

use super::super::error::{to_response, GatewayError};
use super::super::Gateway;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::Response;
use berth_proto::v1::{Request, RequestState};
use berth_store::watch::{list_watch, Change};
use berth_store::{Store, StoreError};
use http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use prost::Message;
use std::sync::Arc;
use std::time::Duration;

/// The header telling a client that the response is a stored one, delivered by replay.
pub const REPLAYED: HeaderName = HeaderName::from_static("x-berth-replayed");

/// Waits up to `wait` for `request` to be delivered; its stored answer if it was.
pub async fn wait_for_response(
    store: &Store,
    request: &Request,
    wait: Duration,
) -> Option<Response> {
    // Its record reaches `requests/` once it is delivered (or dead).
    let key = store.keys().request(&request.agent, request.seq);
    let mut changes = list_watch(store, key.clone());
    let waiting = async {
        loop {
            match changes.next().await {
                Change::InitApply(kv) | Change::Put(kv) if kv.key() == key.as_bytes() => {
                    let mut request = Request::decode(kv.value()).ok()?;
                    if request.state != RequestState::Delivered as i32 {
                        return None; // dead: no answer will come
                    }
                    // A small answer rides in the record; a larger one is kept apart.
                    if request.response.is_none() {
                        request.response = store
                            .get_request_answer(&request.agent, request.seq)
                            .await
                            .ok()?;
                    }
                    return delivered(&request);
                }
                // Dropped or expired: nothing will come.
                Change::Delete(kv) if kv.key() == key.as_bytes() => return None,
                _ => {}
            }
        }
    };
    tokio::time::timeout(wait, waiting).await.ok().flatten()
}

/// The agent's stored answer, if the request was delivered.
pub(crate) fn delivered(request: &Request) -> Option<Response> {
    if request.state != RequestState::Delivered as i32 {
        return None;
    }
    let stored = request.response.as_ref()?;
    let mut response = Response::new(Body::from(stored.body.clone()));
    *response.status_mut() =
        StatusCode::from_u16(stored.status as u16).unwrap_or(StatusCode::BAD_GATEWAY);
    let headers = response.headers_mut();
    for h in &stored.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::try_from(h.name.as_str()),
            HeaderValue::from_bytes(&h.value),
        ) {
            headers.append(name, value);
        }
    }
    headers.remove(header::CONTENT_LENGTH);
    headers.remove(header::TRANSFER_ENCODING);
    headers.insert(REPLAYED, HeaderValue::from_static("1"));
    if stored.truncated {
        headers.insert(super::answer::TRUNCATED, HeaderValue::from_static("true"));
    }
    Some(response)
}

/// `GET /requests/{id}`: the request's state, and the agent's answer once delivered.
pub async fn get_request(
    State(gateway): State<Arc<Gateway>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    match describe(&gateway, &id, &headers).await {
        Ok(response) => response,
        Err(e) => to_response(&e),
    }
}

async fn describe(
    gateway: &Gateway,
    id: &str,
    headers: &HeaderMap,
) -> Result<Response, GatewayError> {
    let unknown = || GatewayError::UnknownRequest { id: id.to_string() };
    let stored = match gateway.store.get_request_settled(id).await {
        Ok(stored) => stored,
        Err(StoreError::NotFound { .. }) => return Err(unknown()),
        Err(source) => {
            return Err(GatewayError::NotPersisted {
                agent: String::new(),
                source,
            })
        }
    };
    let request = stored.request;
    // Readable with the agent's gateway token when it has one, or an admin token; an
    // unknown id and a forbidden one look the same.
    let route = gateway.routes.borrow().get(&request.agent).cloned();
    let admin = super::super::bearer(headers).is_some_and(|t| gateway.admin_tokens.contains(t));
    if let Some(route) = route {
        if !route.token_sha256.is_empty()
            && !admin
            && !super::super::token_matches(headers, &route.token_sha256)
        {
            return Err(unknown());
        }
    }
    let state = RequestState::try_from(request.state).unwrap_or(RequestState::Unspecified);
    let word = match state {
        RequestState::Queued => "queued",
        RequestState::Delivering => "delivering",
        RequestState::Delivered => "delivered",
        RequestState::Dead => "dead",
        RequestState::Unspecified => "unknown",
    };
    let response = request.response.as_ref().map(|r| {
        let headers: Vec<_> = r
            .headers
            .iter()
            .map(|h| serde_json::json!([h.name, String::from_utf8_lossy(&h.value)]))
            .collect();
        match std::str::from_utf8(&r.body) {
            Ok(text) => serde_json::json!({"status": r.status, "headers": headers, "body": text, "truncated": r.truncated}),
            Err(_) => {
                let hex: String = r.body.iter().map(|b| format!("{b:02x}")).collect();
                serde_json::json!({"status": r.status, "headers": headers, "body_hex": hex, "truncated": r.truncated})
            }
        }
    });
    let body = serde_json::json!({
        "request_id": request.id,
        "agent": request.agent,
        "status": word,
        "attempts": request.attempts,
        "last_error": request.last_error,
        "response": response,
    });
    let mut out = Response::new(Body::from(body.to_string()));
    out.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(out)
}
