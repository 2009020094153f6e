//! Request heads as a client could send them, through the gateway's classification: the
//! agent, the path the replica sees, how the body is taken, whether the request is safe to
//! send twice. Input: method, target and header lines separated by newlines, then two bytes
//! of limits. Nothing may panic, and what comes out must hold to the rules below.
#![no_main]

use berth_proto::request::{agent_of, classify, header_bytes, BodyPlan, RequestError};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((head, limits)) = data.split_last_chunk::<2>() else {
        return;
    };
    let max_header_bytes = 64 * (1 + limits[0] as usize);
    let max_body_bytes = 16 * limits[1] as u64;
    let mut lines = head.split(|b| *b == b'\n');
    let Ok(method) = Method::from_bytes(lines.next().unwrap_or_default()) else {
        return;
    };
    let Ok(uri) = Uri::try_from(lines.next().unwrap_or_default()) else {
        return;
    };
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(&line[colon + 1..]),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    match classify(&method, &uri, &headers, max_header_bytes, max_body_bytes) {
        Ok(class) => {
            assert!(
                header_bytes(&headers) <= max_header_bytes,
                "over the header limit, accepted"
            );
            assert!(
                class.upstream.starts_with('/'),
                "upstream path {:?}",
                class.upstream
            );
            assert_eq!(class.agent, agent_of(uri.path()));
            assert!(!class.agent.contains('/'));
            if let BodyPlan::Buffer(n) = class.body {
                assert!(
                    n <= max_body_bytes,
                    "buffering {n} bytes over {max_body_bytes}"
                );
                assert!(!headers.contains_key(http::header::TRANSFER_ENCODING));
            }
            if method.is_idempotent() {
                assert!(class.safe);
            }
            // The replica sees the target less `/agents/{agent}`, nothing added but a '/'.
            let target = uri.path_and_query().map_or("/", |pq| pq.as_str());
            if let Some(rest) = target.strip_prefix("/agents/") {
                let after = &rest[class.agent.len()..];
                assert!(class.upstream == after || class.upstream == format!("/{after}"));
            }
        }
        Err(RequestError::HeadersTooLarge { bytes, limit }) => {
            assert!(bytes > limit && limit == max_header_bytes);
        }
        Err(RequestError::BadContentLength) => {}
    }
});
