//! Durable replay: requests an agent could not take are stored in etcd (answered `202` only
//! once committed) and delivered later, in order, by whichever gateway claims them.

pub mod answer;
pub mod gate;
pub mod idempotency;
pub mod replayer;
pub mod results;

use super::error::GatewayError;
use super::forward::{Forward, ForwardBody};
use super::load::Loads;
use super::routes::Route;
use crate::outcome::Ending;
use axum::body::Body;
use axum::response::Response;
use berth_proto::v1::{Header, Request, RequestState};
use berth_store::Store;
use http::{header, HeaderValue, StatusCode};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// The header that numbers a replayed delivery (1 for the first replay).
pub const REPLAY_ATTEMPT: &str = "x-berth-replay-attempt";
/// Longest `Prefer: wait=N` honoured.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// Requests waiting per agent, as this gateway last saw them: (count, bytes). The replayer
/// keeps it from its watch; enqueueing checks the agent's bounds against it.
#[derive(Debug, Default)]
pub struct QueueStats {
    pending: Mutex<HashMap<String, (u32, u64)>>,
}

impl QueueStats {
    /// (count, bytes) waiting for `agent`.
    pub fn of(&self, agent: &str) -> (u32, u64) {
        let pending = self.pending.lock().expect("stats lock");
        pending.get(agent).copied().unwrap_or_default()
    }

    /// Adds (or with `sign` -1 removes) one request of `bytes`.
    pub fn add(&self, agent: &str, bytes: u64, sign: i64) {
        let mut pending = self.pending.lock().expect("stats lock");
        let entry = pending.entry(agent.to_string()).or_default();
        if sign > 0 {
            entry.0 += 1;
            entry.1 += bytes;
        } else {
            entry.0 = entry.0.saturating_sub(1);
            entry.1 = entry.1.saturating_sub(bytes);
        }
    }

    /// Forgets everything (before a re-list).
    pub fn clear(&self) {
        self.pending.lock().expect("stats lock").clear();
    }

    /// Every agent's count and bytes, for metrics.
    pub fn snapshot(&self) -> Vec<(String, u32, u64)> {
        let pending = self.pending.lock().expect("stats lock");
        pending
            .iter()
            .map(|(a, (n, bytes))| (a.clone(), *n, *bytes))
            .collect()
    }
}

/// Whether the client asked for 202 at once (`Prefer: respond-async`), without `wait`.
pub fn respond_async(headers: &http::HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case("respond-async"))
}

/// The `N` of `Prefer: wait=N`, capped at [`MAX_WAIT`].
pub fn prefer_wait(headers: &http::HeaderMap) -> Option<Duration> {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix("wait=")?.trim().parse::<u64>().ok())
        .map(|n| Duration::from_secs(n).min(MAX_WAIT))
}

/// The stored form of `forward`.
pub fn to_request(forward: &Forward, why: Ending) -> Request {
    let (path, query) = match forward.path_and_query.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (forward.path_and_query.clone(), String::new()),
    };
    let body = match &forward.body {
        ForwardBody::Buffered(bytes) => bytes.to_vec(),
        ForwardBody::Streaming(_) => Vec::new(),
    };
    Request {
        id: forward.request_id().to_string(),
        agent: forward.agent.clone(),
        state: RequestState::Queued as i32,
        method: forward.method.to_string(),
        path,
        query,
        headers: forward
            .headers
            .iter()
            .map(|(k, v)| Header {
                name: k.as_str().to_string(),
                value: v.as_bytes().to_vec(),
            })
            .collect(),
        body,
        receive_time: Some(berth_proto::timestamp(SystemTime::now())),
        last_error: format!("{why:?}"),
        idempotency_key: forward
            .headers
            .get(super::forward::IDEMPOTENCY_KEY)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string(),
        ..Default::default()
    }
}

/// Stores `kept` in its agent's queue and answers 202, or, with `Prefer: wait`, the agent's
/// answer if it comes in time. Never a 202 that was not committed. With `take_key`, its
/// `Idempotency-Key` is taken in the same commit; `None` then says the key is held by another
/// request and nothing was stored.
pub async fn enqueue(
    store: &Store,
    stats: &QueueStats,
    loads: &Loads,
    route: &Route,
    kept: Forward,
    why: Ending,
    take_key: Option<&idempotency::Keyed>,
) -> Result<Option<Response>, GatewayError> {
    let agent = route.agent.clone();
    let size = match &kept.body {
        ForwardBody::Buffered(bytes) => bytes.len() as u64,
        ForwardBody::Streaming(_) => u64::MAX,
    };
    if size > route.replay.max_body_bytes {
        return Err(GatewayError::TooLarge {
            agent,
            limit: route.replay.max_body_bytes,
            streamed: size == u64::MAX,
        });
    }
    let (count, bytes) = stats.of(&agent);
    if count >= route.replay.max_queued || bytes + size > route.replay.max_queued_bytes {
        return Err(GatewayError::QueueFull { agent });
    }
    let wait = prefer_wait(&kept.headers);
    let mut request = to_request(&kept, why);
    let stored = match take_key {
        None => store
            .enqueue_request(&mut request, route.replay.ttl)
            .await
            .map(|()| None),
        Some(keyed) => {
            store
                .enqueue_keyed_request(&mut request, route.replay.ttl, &keyed.key, &keyed.payload())
                .await
        }
    };
    let held = stored.map_err(|source| GatewayError::QueueUnconfirmed {
        agent: agent.clone(),
        request_id: request.id.clone(),
        source,
    })?;
    if held.is_some() {
        return Ok(None);
    }
    tracing::debug!(agent = %agent, request_id = %request.id, why = ?why, "queued for replay");
    // An autoscaled agent with no replica ready (idle, or all its replicas starting): the
    // autoscaler is told at once, and the caller is held for the answer up to the agent's
    // request timeout, unless it asked not to be (`Prefer: respond-async`). The request is
    // in the queue already, so a gateway that dies meanwhile loses nothing.
    let cold = route.autoscaled && route.replicas.is_empty();
    let hold = match wait {
        None if cold && !respond_async(&kept.headers) => Some(route.timeout),
        _ => None,
    };
    let _held = match hold {
        Some(_) => Some(loads.hold(&agent)),
        None => {
            if cold {
                loads.wake();
            }
            None
        }
    };
    if let Some(wait) = wait.or(hold) {
        let started = Instant::now();
        if let Some(done) = results::wait_for_response(store, &request, wait).await {
            if hold.is_some() {
                loads.woken(&agent, started.elapsed());
            }
            return Ok(Some(done));
        }
    }
    Ok(Some(accepted(&request.id)))
}

/// `202 Accepted` pointing at the stored request.
pub fn accepted(id: &str) -> Response {
    let body = serde_json::json!({"request_id": id, "status": "queued"});
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = StatusCode::ACCEPTED;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(location) = HeaderValue::from_str(&format!("/requests/{id}")) {
        headers.insert(header::LOCATION, location);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_proto::request::{opted_out, REPLAY_HEADER};
    use http::HeaderMap;

    #[test]
    fn prefer_wait_and_opt_out_are_read_from_headers() {
        let mut headers = HeaderMap::new();
        assert_eq!(prefer_wait(&headers), None);
        headers.insert("prefer", "respond-async, wait=5".parse().unwrap());
        assert_eq!(prefer_wait(&headers), Some(Duration::from_secs(5)));
        headers.insert("prefer", "wait=100000".parse().unwrap());
        assert_eq!(prefer_wait(&headers), Some(MAX_WAIT));
        assert!(!opted_out(&headers));
        headers.insert(REPLAY_HEADER, "Off".parse().unwrap());
        assert!(opted_out(&headers));
    }

    #[test]
    fn queue_stats_count_and_bytes() {
        let stats = QueueStats::default();
        stats.add("a", 10, 1);
        stats.add("a", 5, 1);
        assert_eq!(stats.of("a"), (2, 15));
        stats.add("a", 10, -1);
        assert_eq!(stats.of("a"), (1, 5));
        assert_eq!(stats.of("b"), (0, 0));
    }
}
