//! Forwarding one request to one replica over HTTP/1.1: the request as the gateway holds it,
//! hop-by-hop headers handled as RFC 9110 §7.6.1 asks of a proxy, and the upstream client.

use super::error::GatewayError;
use axum::body::Body;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

/// The request id header, added when the client did not send one.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-berth-request-id");
/// The client address header.
pub const FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// Marks a request safe to retry whatever its method.
pub use berth_proto::request::{is_safe, IDEMPOTENCY_KEY};
/// Idle upstream connections kept per replica.
pub const POOL_IDLE_PER_HOST: usize = 64;
/// How long an idle upstream connection is kept.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a connection to a replica may take to open. A replica whose container died can
/// leave its address silent (no refusal, only unanswered ARP); past this the attempt counts
/// as a connection that never opened, so the request goes to another replica at once.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Headers that concern one connection only, never forwarded (RFC 9110 §7.6.1), besides those
/// the `Connection` header names.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The body of a request on its way to a replica.
pub enum ForwardBody {
    /// Read in full (small enough): it can be sent again, so the request can be retried.
    Buffered(Bytes),
    /// Streamed through as it arrives: it can be sent once only.
    Streaming(Body),
}

/// A request on its way to a replica of `agent`.
pub struct Forward {
    /// The agent.
    pub agent: String,
    /// Method, as received.
    pub method: Method,
    /// Path and query for the replica (the `/agents/{name}` prefix removed).
    pub path_and_query: String,
    /// Headers to send: the client's, less hop-by-hop, plus the gateway's. Shared, so that
    /// the copies kept for a retry or the queue cost no copy of the headers.
    pub headers: Arc<HeaderMap>,
    /// The body.
    pub body: ForwardBody,
    /// Replicas already tried for this request; a retry goes elsewhere.
    pub tried: Vec<String>,
}

impl Forward {
    /// The request's id (`X-Berth-Request-Id`, set on every request the gateway takes).
    pub fn request_id(&self) -> &str {
        self.headers
            .get(REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    /// Whether sending the request twice is harmless: an idempotent method (RFC 9110 §9.2.2)
    /// or an `Idempotency-Key`.
    pub fn is_safe(&self) -> bool {
        is_safe(&self.method, &self.headers)
    }

    /// A copy for another attempt, if the body allows one.
    pub fn try_clone(&self) -> Option<Self> {
        let ForwardBody::Buffered(bytes) = &self.body else {
            return None;
        };
        Some(Self {
            agent: self.agent.clone(),
            method: self.method.clone(),
            path_and_query: self.path_and_query.clone(),
            headers: self.headers.clone(),
            body: ForwardBody::Buffered(bytes.clone()),
            tried: self.tried.clone(),
        })
    }
}

/// Removes hop-by-hop headers, and those the `Connection` header lists, in place.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// The client's headers made ready for a replica: hop-by-hop ones removed, the client's
/// address appended to `X-Forwarded-For`, and a request id unless the client sent one.
pub fn upstream_headers(mut headers: HeaderMap, agent: &str, client: Option<IpAddr>) -> HeaderMap {
    strip_hop_by_hop(&mut headers);
    if let Some(ip) = client {
        let value = match headers.get(FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            Some(prior) => format!("{prior}, {ip}"),
            None => ip.to_string(),
        };
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(FORWARDED_FOR, value);
        }
    }
    if !headers.contains_key(REQUEST_ID) {
        let id = berth_proto::request::positional_id(agent, berth_store::requests::new_seq());
        headers.insert(
            REQUEST_ID,
            HeaderValue::from_str(&id).expect("a DNS label and digits are a valid header value"),
        );
    }
    headers
}

/// How long an answer's body may go without a byte before the gateway cuts it, as Envoy's
/// `stream_idle_timeout` does: an agent stuck mid-answer whose health check still passes would
/// otherwise hold its client's connection, and the replica's, for good.
pub const STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// The HTTP/1.1 client to replicas, with a pool of kept-alive connections per replica. Each
/// thread has its own client and pool, so that a connection's task runs on the thread that
/// uses it (the serving threads are single-threaded runtimes; see `gateway::run`).
#[derive(Clone, Copy, Debug)]
pub struct Upstream {
    /// An answer's body is cut after this long without a byte (`None`: never).
    pub stream_idle: Option<Duration>,
}

impl Default for Upstream {
    fn default() -> Self {
        Self {
            stream_idle: Some(STREAM_IDLE_TIMEOUT),
        }
    }
}

thread_local! {
    static CLIENT: Client<HttpConnector, Body> = new_client();
}

fn new_client() -> Client<HttpConnector, Body> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(POOL_IDLE_PER_HOST)
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .build(connector)
}

impl Upstream {
    /// Sends `request` to `address` (`ip:port`) as replica `replica`; the response streams.
    pub async fn send(
        &self,
        replica: &str,
        address: &str,
        request: Forward,
    ) -> Result<Response<Body>, GatewayError> {
        let uri = format!("http://{address}{}", request.path_and_query);
        let body = match request.body {
            ForwardBody::Buffered(bytes) => Body::from(bytes),
            ForwardBody::Streaming(body) => body,
        };
        let mut upstream = Request::new(body);
        *upstream.method_mut() = request.method;
        *upstream.uri_mut() = uri
            .parse()
            .map_err(|e| GatewayError::BadRequest(format!("bad path: {e}")))?;
        *upstream.headers_mut() = Arc::unwrap_or_clone(request.headers);
        let client = CLIENT.with(Client::clone);
        let response = client
            .request(upstream)
            .await
            .map_err(|source| GatewayError::Upstream {
                agent: request.agent.clone(),
                replica: replica.to_string(),
                source,
            })?;
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let body = match self.stream_idle {
            Some(idle) => Body::new(Idle::new(body, idle)),
            None => Body::new(body),
        };
        Ok(Response::from_parts(parts, body))
    }
}

/// A body cut (with an error) once it goes `idle` without a frame. The timer is armed only
/// while the body waits, so an answer that is there at once costs none.
pub struct Idle<B> {
    inner: B,
    idle: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> Idle<B> {
    /// `inner`, cut after `idle` without a frame.
    pub fn new(inner: B, idle: Duration) -> Self {
        Self {
            inner,
            idle,
            timer: None,
        }
    }
}

/// An answer's body went too long without a byte.
#[derive(Debug, thiserror::Error)]
#[error("the agent sent nothing of its answer for {0:?}; cut")]
pub struct StreamIdle(Duration);

impl<B> http_body::Body for Idle<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                // Came in time: the next wait starts afresh.
                this.timer = None;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let idle = this.idle;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        this.timer = None;
                        Poll::Ready(Some(Err(StreamIdle(idle).into())))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_the_rest_stay_with_every_value() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, "keep-alive, x-private".parse().unwrap());
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.insert("x-private", "1".parse().unwrap());
        headers.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        headers.append("x-multi", "a".parse().unwrap());
        headers.append("x-multi", "b".parse().unwrap());
        headers.insert(FORWARDED_FOR, "10.0.0.9".parse().unwrap());
        let out = upstream_headers(headers, "hello", Some("192.0.2.1".parse().unwrap()));
        for gone in ["connection", "keep-alive", "x-private", "transfer-encoding"] {
            assert!(!out.contains_key(gone), "{gone} is hop-by-hop");
        }
        let multi: Vec<_> = out.get_all("x-multi").iter().collect();
        assert_eq!(multi, ["a", "b"]);
        assert_eq!(out[FORWARDED_FOR], "10.0.0.9, 192.0.2.1");
        let id = out[REQUEST_ID].to_str().unwrap();
        let (agent, _) = berth_proto::request::parse_positional_id(id).unwrap();
        assert_eq!(agent, "hello");
    }

    #[test]
    fn a_client_request_id_is_kept() {
        let mut headers = HeaderMap::new();
        headers.insert(REQUEST_ID, "abc".parse().unwrap());
        assert_eq!(upstream_headers(headers, "hello", None)[REQUEST_ID], "abc");
    }

    #[test]
    fn safe_means_idempotent_or_keyed() {
        let request = |method: Method, key: bool| {
            let mut headers = HeaderMap::new();
            if key {
                headers.insert(IDEMPOTENCY_KEY, "k1".parse().unwrap());
            }
            Forward {
                agent: "a".into(),
                method,
                path_and_query: "/".into(),
                headers: Arc::new(headers),
                body: ForwardBody::Buffered(Bytes::new()),
                tried: vec![],
            }
        };
        assert!(request(Method::GET, false).is_safe());
        assert!(request(Method::PUT, false).is_safe());
        assert!(!request(Method::POST, false).is_safe());
        assert!(request(Method::POST, true).is_safe());
        let streaming = Forward {
            body: ForwardBody::Streaming(Body::empty()),
            ..request(Method::GET, false)
        };
        assert!(streaming.try_clone().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_idle_past_its_limit_is_cut_and_one_that_keeps_coming_is_not() {
        use http_body_util::BodyExt;
        let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Bytes, std::io::Error>>();
        let idle = Duration::from_secs(300);
        let mut body = Body::new(Idle::new(Body::from_stream(rx), idle));
        let start = tokio::time::Instant::now();
        // Events 4 minutes apart keep it going.
        for i in 0..3u8 {
            let tx = tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(240)).await;
                tx.unbounded_send(Ok(Bytes::from(vec![b'0' + i]))).unwrap();
            });
            let frame = body.frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), Bytes::from(vec![b'0' + i]));
        }
        assert_eq!(start.elapsed(), Duration::from_secs(720));
        // Then nothing: cut once the limit has passed.
        let cut = body.frame().await.unwrap();
        assert!(cut.unwrap_err().to_string().contains("sent nothing"), "cut");
        assert_eq!(start.elapsed(), Duration::from_secs(1020));
        drop(tx);
    }
}
