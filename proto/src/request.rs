//! What a request to `/agents/{agent}/...` means, from its head alone, before a replica or the
//! store is involved: the agent it is for, the path the replica sees, whether the body is read
//! whole first, and whether the request may be sent twice or queued. The gateway acts on it;
//! it is part of the contract because clients rely on it. Pure, so that it is fuzzed
//! (`fuzz/fuzz_targets/request_classification.rs`).

use http::{header, HeaderMap, HeaderName, Method, Uri};

/// The header that makes a non-idempotent request safe to send twice.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// The header with which a client opts out of replay (`X-Berth-Replay: off`).
pub const REPLAY_HEADER: &str = "x-berth-replay";

/// The id the gateway gives a request that came without one: `{agent}.{seq:020}`, where `seq`
/// orders the agent's replay queue (`berth_store::requests::new_seq`). The id names the
/// request's place in the store, so the store needs no index to find it; an id a client chose
/// is kept as it is (and indexed).
pub fn positional_id(agent: &str, seq: u64) -> String {
    format!("{agent}.{seq:020}")
}

/// The `(agent, seq)` a [`positional_id`] names; `None` for any other id.
pub fn parse_positional_id(id: &str) -> Option<(&str, u64)> {
    let (agent, seq) = id.rsplit_once('.')?;
    let label = !agent.is_empty()
        && agent.len() <= 63
        && agent
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !label || seq.len() != 20 || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((agent, seq.parse().ok()?))
}

/// A request head the gateway refuses before anything else.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// Header names and values over the limit.
    #[error("request headers are {bytes} bytes, over the limit of {limit} (--max-header-bytes)")]
    HeadersTooLarge { bytes: usize, limit: usize },
    /// A `Content-Length` that is not a number.
    #[error("Content-Length is not a number of bytes")]
    BadContentLength,
}

/// Bytes of header names and values, as the header limit counts them.
pub fn header_bytes(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum()
}

/// Whether a request with `method` and `headers` may be sent twice: an idempotent method
/// (RFC 9110 §9.2.2) or an `Idempotency-Key`.
pub fn is_safe(method: &Method, headers: &HeaderMap) -> bool {
    method.is_idempotent() || headers.contains_key(IDEMPOTENCY_KEY)
}

/// Whether the client opted out of replay with `X-Berth-Replay: off`.
pub fn opted_out(headers: &HeaderMap) -> bool {
    headers
        .get(REPLAY_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("off"))
}

/// How the gateway takes a request's body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyPlan {
    /// No body (no length and not chunked).
    Empty,
    /// Read whole before forwarding, so that the request can be retried or queued: a known
    /// length within the agent's replay limit.
    Buffer(u64),
    /// Streamed through as it arrives: chunked, or longer than the replay limit.
    Stream,
}

/// A request as the gateway classifies it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Classified {
    /// The agent the path names: `/agents/{agent}/...`.
    pub agent: String,
    /// Path and query as the replica sees them; always starts with `/`.
    pub upstream: String,
    /// How the body is taken.
    pub body: BodyPlan,
    /// Sending it twice is harmless: an idempotent method (RFC 9110 §9.2.2) or an
    /// `Idempotency-Key`.
    pub safe: bool,
    /// The client opted out of replay (`X-Berth-Replay: off`).
    pub opted_out: bool,
}

/// The agent `path` names (`/agents/{agent}` or `/agents/{agent}/...`); empty when none.
pub fn agent_of(path: &str) -> &str {
    let rest = path.strip_prefix("/agents/").unwrap_or_default();
    rest.split_once('/').map_or(rest, |(agent, _)| agent)
}

/// Classifies a request head. Refuses header fields over `max_header_bytes` (names and
/// values) and a `Content-Length` that is not a number.
pub fn classify(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    max_header_bytes: usize,
    max_body_bytes: u64,
) -> Result<Classified, RequestError> {
    let bytes = header_bytes(headers);
    if bytes > max_header_bytes {
        return Err(RequestError::HeadersTooLarge {
            bytes,
            limit: max_header_bytes,
        });
    }
    let agent = agent_of(uri.path()).to_string();
    let path_and_query = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let after = path_and_query
        .strip_prefix("/agents/")
        .and_then(|rest| rest.strip_prefix(agent.as_str()))
        .unwrap_or_default();
    let upstream = if after.starts_with('/') {
        after.to_string()
    } else {
        format!("/{after}")
    };
    let length = match headers.get(header::CONTENT_LENGTH) {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or(RequestError::BadContentLength)?,
        ),
    };
    let chunked = headers.contains_key(header::TRANSFER_ENCODING);
    let body = match length {
        _ if chunked => BodyPlan::Stream,
        Some(n) if n <= max_body_bytes => BodyPlan::Buffer(n),
        Some(_) => BodyPlan::Stream,
        None => BodyPlan::Empty,
    };
    Ok(Classified {
        agent,
        upstream,
        body,
        safe: is_safe(method, headers),
        opted_out: opted_out(headers),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(method: &str, uri: &str, headers: &[(&str, &str)]) -> (Method, Uri, HeaderMap) {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        (method.parse().unwrap(), uri.parse().unwrap(), map)
    }

    fn of(method: &str, uri: &str, headers: &[(&str, &str)]) -> Result<Classified, RequestError> {
        let (method, uri, headers) = head(method, uri, headers);
        classify(&method, &uri, &headers, 1024, 100)
    }

    #[test]
    fn the_agent_and_the_path_the_replica_sees() {
        let c = of("GET", "/agents/echo/a/b?x=1", &[]).unwrap();
        assert_eq!(
            (c.agent.as_str(), c.upstream.as_str()),
            ("echo", "/a/b?x=1")
        );
        let c = of("GET", "/agents/echo", &[]).unwrap();
        assert_eq!((c.agent.as_str(), c.upstream.as_str()), ("echo", "/"));
        let c = of("GET", "/agents/echo?x=1", &[]).unwrap();
        assert_eq!((c.agent.as_str(), c.upstream.as_str()), ("echo", "/?x=1"));
        let c = of("GET", "http://gw/agents/echo/", &[]).unwrap();
        assert_eq!((c.agent.as_str(), c.upstream.as_str()), ("echo", "/"));
    }

    #[test]
    fn bodies_safety_and_opting_out() {
        let c = of("POST", "/agents/a/x", &[("content-length", "10")]).unwrap();
        assert_eq!(
            (c.body, c.safe, c.opted_out),
            (BodyPlan::Buffer(10), false, false)
        );
        let c = of("POST", "/agents/a/x", &[("content-length", "101")]).unwrap();
        assert_eq!(c.body, BodyPlan::Stream);
        let chunked = [("content-length", "10"), ("transfer-encoding", "chunked")];
        assert_eq!(
            of("POST", "/agents/a/x", &chunked).unwrap().body,
            BodyPlan::Stream
        );
        let c = of("POST", "/agents/a/x", &[("idempotency-key", "k")]).unwrap();
        assert_eq!((c.body, c.safe), (BodyPlan::Empty, true));
        assert!(of("PUT", "/agents/a/x", &[]).unwrap().safe);
        let off = [("x-berth-replay", " OFF ")];
        assert!(of("POST", "/agents/a/x", &off).unwrap().opted_out);
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let big = "v".repeat(1100);
        let err = of("GET", "/agents/a/", &[("x-big", &big)]).unwrap_err();
        assert!(
            matches!(err, RequestError::HeadersTooLarge { limit: 1024, .. }),
            "{err}"
        );
        let err = of("POST", "/agents/a/", &[("content-length", "ten")]).unwrap_err();
        assert!(err.to_string().contains("Content-Length"), "{err}");
    }
}

#[cfg(test)]
mod positional_tests {
    use super::*;

    #[test]
    fn positional_ids_name_their_agent_and_seq_and_nothing_else_parses() {
        let id = positional_id("my-agent-2", 1_732_990_000_000_000_123);
        assert_eq!(id, "my-agent-2.01732990000000000123");
        assert_eq!(
            parse_positional_id(&id),
            Some(("my-agent-2", 1_732_990_000_000_000_123))
        );
        for other in [
            "0123456789abcdef0123456789abcdef",
            "abc",
            ".01732990000000000123",
            "Agent.01732990000000000123",
            "a.b.0173299000000000012",
            "a.0173299000000000012x",
            "a.99999999999999999999",
        ] {
            assert_eq!(parse_positional_id(other), None, "{other}");
        }
    }
}
