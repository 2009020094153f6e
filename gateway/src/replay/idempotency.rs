//! `Idempotency-Key` (IETF httpapi draft semantics), per agent, kept `REQUEST_TTL`:
//! the same key with the same payload gets the stored result (or the 202 of the same queued
//! request); the same key while the first request is still in flight gets 409; the same key
//! with a different payload gets 422. A request whose answer was a failure releases its key,
//! so that the client may try again.
//!
//! The payload is method, path, query and body. A body streamed on to the agent (too large to
//! keep) is digested as it passes ([`Digesting`]): its key is taken with the digest of the rest
//! (`p:` before it), and completed with the whole payload's once the body has ended and the
//! agent has answered. A repeat whose body streams is read through, digested and compared
//! before it is answered.

use super::super::error::GatewayError;
use super::super::forward::{Forward, ForwardBody, IDEMPOTENCY_KEY};
use super::super::routes::Route;
use super::results::delivered;
use crate::outcome::Ending;
use axum::response::Response;
use berth_proto::v1::{RequestState, StoredResponse};
use berth_store::{Store, StoreError};
use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use sha2::{Digest, Sha256};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::oneshot;

/// Largest direct answer body kept for a keyed request; a longer one is kept cut (marked
/// truncated) while the client gets it whole.
pub const MAX_KEPT_ANSWER: usize = 1024 * 1024;
/// How much longer than an agent's request timeout a key taken without a stored request is
/// held before it counts as orphaned (its gateway died) and is let go.
pub const ORPHAN_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// What a taken key's payload digest stands for when it starts so: the payload without its
/// body (streamed, and not yet, or never, digested whole).
const WITHOUT_BODY: &str = "p:";

/// A request's `Idempotency-Key`, hashed for use in a key, and the digests of its payload.
#[derive(Clone, Debug)]
pub struct Keyed {
    /// Hex SHA-256 of the key.
    pub key: String,
    /// Hex SHA-256 of method, path and query (the payload up to its body).
    pub head: String,
    /// Hex SHA-256 of method, path, query and body, once the body is known: at once for a
    /// buffered body, at its end for a streamed one.
    pub whole: Option<String>,
    /// When the request came: its key is taken after this.
    pub since: tokio::time::Instant,
}

impl Keyed {
    /// The payload digest the key is taken with.
    pub fn payload(&self) -> String {
        match &self.whole {
            Some(whole) => whole.clone(),
            None => format!("{WITHOUT_BODY}{}", self.head),
        }
    }

    /// How this request's payload compares with `held`, the digest its key was taken with.
    fn compare(&self, held: &str) -> Compared {
        match (held.strip_prefix(WITHOUT_BODY), &self.whole) {
            // The first one's body streamed and was not digested: only the rest compares.
            (Some(head), _) if head == self.head => Compared::Same,
            (Some(_), _) => Compared::Differs,
            (None, Some(whole)) if whole == held => Compared::Same,
            (None, Some(_)) => Compared::Differs,
            (None, None) => Compared::NeedsBody,
        }
    }
}

/// How a repeat's payload compares with the first's.
#[derive(Debug, PartialEq)]
enum Compared {
    Same,
    Differs,
    /// This one's body streams: known once it has been read.
    NeedsBody,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The digest of a payload, up to its body.
fn head_digest(forward: &Forward) -> Sha256 {
    let mut payload = Sha256::new();
    payload.update(forward.method.as_str());
    payload.update([0]);
    payload.update(&forward.path_and_query);
    payload.update([0]);
    payload
}

/// The key and payload digests of `forward`, if it carries an `Idempotency-Key`.
pub fn keyed(forward: &Forward) -> Option<Keyed> {
    let key = forward.headers.get(IDEMPOTENCY_KEY)?.as_bytes();
    let head = head_digest(forward);
    let whole = match &forward.body {
        ForwardBody::Buffered(body) => {
            let mut whole = head.clone();
            whole.update(body);
            Some(hex(&whole.finalize()))
        }
        ForwardBody::Streaming(_) => None,
    };
    Some(Keyed {
        key: hex(&Sha256::digest(key)),
        head: hex(&head.finalize()),
        whole,
        since: tokio::time::Instant::now(),
    })
}

/// Digests the payload of `forward` (whose body streams) as its body passes: the body is
/// wrapped, and the receiver gets the whole payload's digest once the body has ended (nothing
/// if it fails or is left unread).
pub fn digest_as_it_passes(forward: &mut Forward) -> Option<oneshot::Receiver<String>> {
    let payload = head_digest(forward);
    // A sender stops once it has sent the length it declared, without asking for the end.
    let declared = forward
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok());
    let ForwardBody::Streaming(body) = &mut forward.body else {
        return None;
    };
    let (done, digest) = oneshot::channel();
    let inner = std::mem::replace(body, axum::body::Body::empty());
    *body = axum::body::Body::new(Digesting {
        declared: inner.size_hint().exact().or(declared),
        inner,
        seen: 0,
        payload: Some(payload),
        done: Some(done),
    });
    Some(digest)
}

/// Reads the streamed body of `forward` through (within `timeout`) for its payload's digest
/// alone; the body is gone after.
pub async fn digest_whole(
    forward: &mut Forward,
    timeout: std::time::Duration,
) -> Result<String, GatewayError> {
    let digest = digest_as_it_passes(forward).expect("digested only when it streams");
    let ForwardBody::Streaming(body) =
        std::mem::replace(&mut forward.body, ForwardBody::Buffered(Bytes::new()))
    else {
        unreachable!("digested only when it streams");
    };
    let read = async {
        let mut body = body;
        while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
            frame
                .map_err(|e| GatewayError::BadRequest(format!("reading the request body: {e}")))?;
        }
        Ok::<_, GatewayError>(())
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| GatewayError::BodyTimeout { timeout })??;
    digest
        .await
        .map_err(|_| GatewayError::BadRequest("reading the request body: it ended early".into()))
}

/// A body that digests what passes through it (after the payload's head), and sends the
/// digest once the body has ended.
struct Digesting {
    inner: axum::body::Body,
    /// The body's length, when known: it has ended once that much has passed.
    declared: Option<u64>,
    /// Bytes passed so far.
    seen: u64,
    payload: Option<Sha256>,
    done: Option<oneshot::Sender<String>>,
}

impl Digesting {
    fn finish(&mut self) {
        if let (Some(payload), Some(done)) = (self.payload.take(), self.done.take()) {
            let _ = done.send(hex(&payload.finalize()));
        }
    }
}

impl http_body::Body for Digesting {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(payload)) = (frame.data_ref(), &mut this.payload) {
                    payload.update(data);
                    this.seen += data.len() as u64;
                }
                // A sender stops polling once the body says it has ended, or once it has
                // sent the length it declared.
                if this.inner.is_end_stream() || this.declared == Some(this.seen) {
                    this.finish();
                }
            }
            Poll::Ready(None) => this.finish(),
            Poll::Ready(Some(Err(_))) => {
                this.payload = None;
                this.done = None;
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What an earlier request with the same key means for this one.
pub enum Begin {
    /// The key is ours: go on.
    Fresh,
    /// Answer this instead of sending.
    Answer(Response),
    /// The key is held, and this request's body streams: read it through for its digest
    /// ([`digest_whole`]), then begin again.
    NeedsBody,
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
            .take_idempotency_key(agent, &keyed.key, id, &keyed.payload(), route.replay.ttl)
            .await
            .map_err(not_persisted)?
        else {
            return Ok(Begin::Fresh);
        };
        match keyed.compare(&held.payload) {
            Compared::Same => {}
            Compared::Differs => {
                return Err(GatewayError::KeyReused {
                    agent: agent.to_string(),
                })
            }
            Compared::NeedsBody => return Ok(Begin::NeedsBody),
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
/// key instead. Returns the answer to send. `streamed` gives the digest of a streamed body's
/// whole payload once the body has ended: the key is completed with it, so that a repeat is
/// compared body and all.
///
/// An answer of a known length within [`MAX_KEPT_ANSWER`] is read and stored before it is
/// sent. Any other (a stream such as server-sent events, or a long answer) goes to the client
/// as it comes and is recorded on the way, stored in the background; its end reaches the
/// client once it is stored. Either way the answer is recorded until the request's timeout
/// and half of [`ORPHAN_GRACE`] have passed since it came (cut and marked if it is still
/// coming then): its key completes before it could count as orphaned.
pub async fn finish(
    store: &Store,
    route: &Route,
    kept: Forward,
    keyed: Keyed,
    streamed: Option<oneshot::Receiver<String>>,
    result: Result<Response, GatewayError>,
) -> Result<Response, GatewayError> {
    let final_answer = matches!(&result, Ok(r) if Ending::of_status(r.status()) == Ending::Answered && !r.status().is_server_error());
    if !final_answer {
        release(store, &kept.agent, &keyed).await;
        return result;
    }
    let response = result.expect("checked above");
    let until = keyed.since + route.timeout + ORPHAN_GRACE / 2;
    let known = response
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    let answered = Answered {
        store: store.clone(),
        timeout: route.timeout,
        ttl: route.replay.ttl,
        kept,
        keyed,
        streamed,
    };
    if known.is_some_and(|bytes| bytes <= MAX_KEPT_ANSWER) {
        let (answer, whole) = super::answer::keep(response, MAX_KEPT_ANSWER, until).await;
        answered.store(answer).await;
        return Ok(whole);
    }
    let (response, mut recorded) = super::answer::record(response, MAX_KEPT_ANSWER, until);
    tokio::spawn(async move {
        let answer = recorded.answer().await;
        answered.store(answer).await;
        recorded.stored();
    });
    Ok(response)
}

/// A keyed request the agent answered, for its answer to be kept.
struct Answered {
    store: Store,
    timeout: std::time::Duration,
    ttl: std::time::Duration,
    kept: Forward,
    keyed: Keyed,
    streamed: Option<oneshot::Receiver<String>>,
}

impl Answered {
    /// Completes the key with `answer`, whole up to the limit or cut and marked beyond it:
    /// either way a repeat gets this outcome, never 409. If it cannot be kept, the key goes,
    /// so that a repeat is sent again.
    async fn store(self, answer: StoredResponse) {
        let Self {
            store,
            timeout,
            ttl,
            kept,
            keyed,
            streamed,
        } = self;
        // The digest comes once the body has passed whole, or never (the sender goes with the
        // body): cut short, or left unread by an agent that answered without it. Then the key
        // keeps the digest without the body, and a repeat is compared without it.
        let payload = match streamed {
            Some(digest) => tokio::time::timeout(timeout, digest)
                .await
                .ok()
                .and_then(Result::ok),
            None => None,
        };
        if let Some(payload) = payload {
            if let Err(e) = store
                .complete_idempotency_key(&kept.agent, &keyed.key, kept.request_id(), &payload)
                .await
            {
                tracing::warn!(agent = %kept.agent, error = %e, "cannot complete an idempotency key with its body's digest");
            }
        }
        let mut request = super::to_request(&kept, Ending::Answered);
        request.state = RequestState::Delivered as i32;
        request.last_error.clear();
        request.response = Some(answer);
        if let Err(e) = store.enqueue_request(&mut request, ttl).await {
            tracing::warn!(agent = %kept.agent, error = %e, "cannot keep the answer of a keyed request");
            release(&store, &kept.agent, &keyed).await;
        }
    }
}

/// Lets a key go, so that a repeat of the request is sent again.
pub async fn release(store: &Store, agent: &str, keyed: &Keyed) {
    if let Err(e) = store.release_idempotency_key(agent, &keyed.key).await {
        tracing::warn!(agent = %agent, error = %e, "cannot release an idempotency key");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderValue, Method};
    use http_body_util::BodyExt;
    use std::sync::Arc;

    fn forward(body: ForwardBody) -> Forward {
        let mut headers = HeaderMap::new();
        headers.insert(IDEMPOTENCY_KEY, HeaderValue::from_static("k-1"));
        Forward {
            agent: "a".into(),
            method: Method::POST,
            path_and_query: "/digest?x=1".into(),
            headers: Arc::new(headers),
            body,
            tried: Vec::new(),
        }
    }

    /// A body streamed in `chunks`, then ended, or cut by an error after them.
    fn streamed(chunks: &[&'static [u8]], cut: bool) -> ForwardBody {
        let mut frames: Vec<Result<Frame<Bytes>, std::io::Error>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c))))
            .collect();
        if cut {
            frames.push(Err(std::io::Error::other("cut")));
        }
        let stream = futures::stream::iter(frames);
        ForwardBody::Streaming(axum::body::Body::new(http_body_util::StreamBody::new(
            stream,
        )))
    }

    #[test]
    fn a_payload_compares_body_and_all_once_its_body_is_known() {
        let buffered = |b: &'static [u8]| keyed(&forward(ForwardBody::Buffered(b.into()))).unwrap();
        let (one, two) = (buffered(b"one"), buffered(b"two"));
        let unread = keyed(&forward(streamed(&[b"one"], false))).unwrap();
        assert_eq!(one.head, unread.head);
        assert_eq!(one.key, unread.key);
        assert!(unread.whole.is_none());
        assert_eq!(unread.payload(), format!("p:{}", one.head));
        // Known bodies: the same, or not.
        assert_eq!(one.compare(&one.payload()), Compared::Same);
        assert_eq!(two.compare(&one.payload()), Compared::Differs);
        // The first one's body was not digested: only method, path and query compare.
        assert_eq!(two.compare(&unread.payload()), Compared::Same);
        assert_eq!(unread.compare(&unread.payload()), Compared::Same);
        let mut elsewhere = forward(ForwardBody::Buffered("one".into()));
        elsewhere.path_and_query = "/digest?x=2".into();
        let elsewhere = keyed(&elsewhere).unwrap();
        assert_eq!(elsewhere.compare(&unread.payload()), Compared::Differs);
        // The first one's body is known, this one's streams: it must be read to compare.
        assert_eq!(unread.compare(&one.payload()), Compared::NeedsBody);
    }

    #[tokio::test]
    async fn a_streamed_body_is_digested_as_it_passes_as_a_buffered_one_would_be() {
        let whole = keyed(&forward(ForwardBody::Buffered("one two".into())))
            .unwrap()
            .whole
            .unwrap();
        // Passed on whole: the same digest as the body buffered, and the same bytes.
        let mut f = forward(streamed(&[b"one", b" ", b"two"], false));
        let digest = digest_as_it_passes(&mut f).unwrap();
        let ForwardBody::Streaming(body) = f.body else {
            panic!("still streams")
        };
        let passed = body.collect().await.unwrap().to_bytes();
        assert_eq!(&passed[..], b"one two");
        assert_eq!(digest.await.unwrap(), whole);
        // Read through for the digest alone.
        let mut f = forward(streamed(&[b"one ", b"two"], false));
        assert_eq!(
            digest_whole(&mut f, std::time::Duration::from_secs(5))
                .await
                .unwrap(),
            whole
        );
        // Cut short: no digest at all, never one of a part.
        let mut f = forward(streamed(&[b"one "], true));
        let digest = digest_as_it_passes(&mut f).unwrap();
        let ForwardBody::Streaming(body) = f.body else {
            panic!("still streams")
        };
        assert!(body.collect().await.is_err());
        assert!(digest.await.is_err());
        let mut f = forward(streamed(&[b"one "], true));
        assert!(digest_whole(&mut f, std::time::Duration::from_secs(5))
            .await
            .is_err());
        // Of a declared length: digested once that much has passed, though its end is never
        // asked for (a sender stops there).
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(2);
        let body = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let mut f = forward(ForwardBody::Streaming(axum::body::Body::new(body)));
        Arc::make_mut(&mut f.headers)
            .insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("7"));
        let mut digest = digest_as_it_passes(&mut f).unwrap();
        let ForwardBody::Streaming(mut body) = f.body else {
            panic!("still streams")
        };
        tx.send(Ok(Frame::data(Bytes::from_static(b"one "))))
            .await
            .unwrap();
        body.frame().await.unwrap().unwrap();
        assert!(digest.try_recv().is_err(), "not before it has all passed");
        tx.send(Ok(Frame::data(Bytes::from_static(b"two"))))
            .await
            .unwrap();
        body.frame().await.unwrap().unwrap();
        assert_eq!(digest.await.unwrap(), whole);
        // Left unread: none either.
        let mut f = forward(streamed(&[b"one "], false));
        let mut digest = digest_as_it_passes(&mut f).unwrap();
        assert!(digest.try_recv().is_err());
        drop(f);
        assert!(digest.await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_does_not_end_is_given_up_after_the_timeout() {
        let (_tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
        let body = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let mut f = forward(ForwardBody::Streaming(axum::body::Body::new(body)));
        let read = digest_whole(&mut f, std::time::Duration::from_secs(30)).await;
        assert!(
            matches!(read, Err(GatewayError::BodyTimeout { .. })),
            "{read:?}"
        );
    }
}
