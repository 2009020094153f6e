//! An agent's answer kept for later: its status, headers and body, cut at a limit and marked
//! truncated when longer, so that a large answer is a recorded outcome (delivered, never sent
//! again for it) rather than an error after the agent ran the request.

use axum::body::Body;
use berth_proto::v1::{Header, StoredResponse};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use std::time::SystemTime;

/// Most bytes of response headers kept with a stored answer.
pub const MAX_KEPT_HEADER_BYTES: usize = 64 * 1024;
/// The header that marks a stored answer whose body was cut at the limit.
pub const TRUNCATED: &str = "x-berth-truncated";

/// Reads `response` to keep at most `limit` bytes of its body. Returns the answer to store
/// and, for a client waiting on it, the same answer whole (what was read, then the rest).
pub async fn keep(
    response: http::Response<Body>,
    limit: usize,
) -> (StoredResponse, http::Response<Body>) {
    let (parts, mut body) = response.into_parts();
    let mut kept = BytesMut::new();
    let mut rest: Option<Bytes> = None;
    let mut truncated = false;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            // The answer broke off: keep what came, marked as cut.
            truncated = true;
            break;
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if kept.len() + data.len() > limit {
            let room = limit - kept.len();
            kept.extend_from_slice(&data[..room]);
            rest = Some(data.slice(room..));
            truncated = true;
            break;
        }
        kept.extend_from_slice(&data);
    }
    let kept = kept.freeze();
    let mut header_bytes = 0;
    let headers = parts
        .headers
        .iter()
        .take_while(|(k, v)| {
            header_bytes += k.as_str().len() + v.len();
            header_bytes <= MAX_KEPT_HEADER_BYTES
        })
        .map(|(k, v)| Header {
            name: k.as_str().to_string(),
            value: v.as_bytes().to_vec(),
        })
        .collect();
    let stored = StoredResponse {
        status: parts.status.as_u16() as u32,
        headers,
        body: kept.to_vec(),
        complete_time: Some(berth_proto::timestamp(SystemTime::now())),
        truncated,
    };
    let whole = match rest {
        None => Body::from(kept),
        Some(rest) => {
            let head = futures::stream::iter([Ok::<_, axum::Error>(kept), Ok(rest)]);
            let tail = body.into_data_stream();
            Body::from_stream(futures::StreamExt::chain(head, tail))
        }
    };
    (stored, http::Response::from_parts(parts, whole))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn kept(body: &'static str, limit: usize) -> (StoredResponse, Bytes) {
        let response = http::Response::builder()
            .status(201)
            .header("x-a", "1")
            .body(Body::from(body))
            .unwrap();
        let (stored, whole) = keep(response, limit).await;
        let whole = whole.into_body().collect().await.unwrap().to_bytes();
        (stored, whole)
    }

    #[tokio::test]
    async fn a_long_answer_is_kept_cut_and_marked_and_the_client_gets_it_whole() {
        let (stored, whole) = kept("hello world", 5).await;
        assert_eq!(stored.body, b"hello");
        assert!(stored.truncated);
        assert_eq!(stored.status, 201);
        assert_eq!(stored.headers[0].name, "x-a");
        assert_eq!(&whole[..], b"hello world");
        let (stored, whole) = kept("hi", 5).await;
        assert_eq!(
            (stored.body.as_slice(), stored.truncated),
            (&b"hi"[..], false)
        );
        assert_eq!(&whole[..], b"hi");
    }
}
