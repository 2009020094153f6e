//! An agent's answer kept for later: its status, headers and body, cut at a limit and marked
//! truncated when longer, so that a large answer is a recorded outcome (delivered, never sent
//! again for it) rather than an error after the agent ran the request.

use axum::body::Body;
use berth_proto::v1::{Header, StoredResponse};
use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::SystemTime;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// Most bytes of response headers kept with a stored answer.
pub const MAX_KEPT_HEADER_BYTES: usize = 64 * 1024;
/// The header that marks a stored answer whose body was cut at the limit.
pub const TRUNCATED: &str = "x-berth-truncated";

/// Reads `response` to keep at most `limit` bytes of its body, until `until` at the latest (an
/// answer still coming then is kept cut and marked, as one that broke off: the agent answered,
/// and a stalled body must not hold what waits on the answer). Returns the answer to store
/// and, for a client waiting on it, the same answer whole (what was read, then the rest).
pub async fn keep(
    response: http::Response<Body>,
    limit: usize,
    until: Instant,
) -> (StoredResponse, http::Response<Body>) {
    let (parts, mut body) = response.into_parts();
    let mut kept = BytesMut::new();
    let mut rest: Option<Bytes> = None;
    let mut truncated = false;
    loop {
        let Ok(frame) = tokio::time::timeout_at(until, body.frame()).await else {
            // Still coming: the client gets the rest as it comes.
            truncated = true;
            rest = Some(Bytes::new());
            break;
        };
        let Some(frame) = frame else { break };
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
    let stored = stored(&parts, kept.to_vec(), truncated);
    let whole = match rest {
        None => Body::from(kept),
        Some(rest) => {
            let head = [kept, rest].into_iter().filter(|b| !b.is_empty());
            let head = futures::stream::iter(head.map(Ok::<_, axum::Error>));
            let tail = body.into_data_stream();
            Body::from_stream(futures::StreamExt::chain(head, tail))
        }
    };
    (stored, http::Response::from_parts(parts, whole))
}

/// The answer to store: status, headers (up to [`MAX_KEPT_HEADER_BYTES`]) and `body`.
fn stored(parts: &http::response::Parts, body: Vec<u8>, truncated: bool) -> StoredResponse {
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
    StoredResponse {
        status: parts.status.as_u16() as u32,
        headers,
        body,
        complete_time: Some(berth_proto::timestamp(SystemTime::now())),
        truncated,
    }
}

/// What has passed of an answer being recorded.
#[derive(Default)]
struct Tape {
    kept: BytesMut,
    truncated: bool,
    /// Nothing more is kept: the body ended, broke off or outgrew the limit, or the time to
    /// record it passed.
    sealed: bool,
}

impl Tape {
    /// Keeps `data`, up to `limit` in all; sealed (cut, marked) past it.
    fn keep(&mut self, data: &[u8], limit: usize) {
        if self.sealed {
            return;
        }
        let room = limit - self.kept.len();
        if data.len() > room {
            self.kept.extend_from_slice(&data[..room]);
            self.seal(true);
        } else {
            self.kept.extend_from_slice(data);
        }
    }

    /// Keeps nothing more (`truncated`: what was kept is not the whole answer).
    fn seal(&mut self, truncated: bool) {
        if !self.sealed {
            self.sealed = true;
            self.truncated |= truncated;
        }
    }
}

type Shared = Arc<Mutex<Tape>>;

/// Sends `response` on to the client as it comes, keeping up to `limit` bytes of its body
/// until `until` at the latest, as [`keep`] does, without holding any of it back: a stream
/// (server-sent events, say) reaches the client event by event. [`Recorded::answer`] gives
/// the answer to store. The body's end reaches the client only once [`Recorded::stored`] is
/// called (or dropped), so that a client that has the whole answer finds it stored. A client
/// that goes away early leaves the rest of the answer read into the record in the background.
pub fn record(
    response: http::Response<Body>,
    limit: usize,
    until: Instant,
) -> (http::Response<Body>, Recorded) {
    let (parts, body) = response.into_parts();
    let tape = Shared::default();
    let (sealed_tx, sealed_rx) = oneshot::channel();
    let (stored_tx, stored_rx) = oneshot::channel();
    let taping = Taping {
        inner: body,
        tape: tape.clone(),
        limit,
        until,
        sealed: Some(sealed_tx),
        stored: Some(stored_rx),
        ended: false,
    };
    let recorded = Recorded {
        head: parts.clone(),
        tape,
        until,
        sealed: sealed_rx,
        stored: stored_tx,
    };
    (
        http::Response::from_parts(parts, Body::new(taping)),
        recorded,
    )
}

/// The answer [`record`] keeps.
pub struct Recorded {
    head: http::response::Parts,
    tape: Shared,
    until: Instant,
    sealed: oneshot::Receiver<()>,
    stored: oneshot::Sender<()>,
}

impl Recorded {
    /// The answer to store, once its body has ended, broken off or outgrown the limit, or at
    /// the recording's time limit (then cut and marked).
    pub async fn answer(&mut self) -> StoredResponse {
        let _ = tokio::time::timeout_at(self.until, &mut self.sealed).await;
        let mut tape = self.tape.lock().expect("tape lock");
        tape.seal(true);
        stored(&self.head, tape.kept.to_vec(), tape.truncated)
    }

    /// The answer is stored (or will not be): the client's body may end.
    pub fn stored(self) {
        let _ = self.stored.send(());
    }
}

/// A body passed on while it is recorded ([`record`]).
struct Taping {
    inner: Body,
    tape: Shared,
    limit: usize,
    until: Instant,
    sealed: Option<oneshot::Sender<()>>,
    stored: Option<oneshot::Receiver<()>>,
    /// The inner body has ended; its end waits for the answer's store.
    ended: bool,
}

/// Keeps a frame of the body on `tape`; tells `sealed` when that seals it.
fn tape_frame(
    tape: &Shared,
    limit: usize,
    sealed: &mut Option<oneshot::Sender<()>>,
    frame: Option<&Result<Frame<Bytes>, axum::Error>>,
) {
    let mut tape = tape.lock().expect("tape lock");
    match frame {
        Some(Ok(frame)) => {
            if let Some(data) = frame.data_ref() {
                tape.keep(data, limit);
            }
        }
        // Broke off: what came, cut.
        Some(Err(_)) => tape.seal(true),
        None => tape.seal(false),
    }
    if tape.sealed {
        if let Some(sealed) = sealed.take() {
            let _ = sealed.send(());
        }
    }
}

impl http_body::Body for Taping {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        if !this.ended {
            let polled = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
            tape_frame(&this.tape, this.limit, &mut this.sealed, polled.as_ref());
            match polled {
                Some(frame) => return Poll::Ready(Some(frame)),
                None => this.ended = true,
            }
        }
        if let Some(stored) = this.stored.as_mut() {
            // Sent or dropped: either way, the answer's fate is settled.
            let _ = std::task::ready!(Pin::new(stored).poll(cx));
            this.stored = None;
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.stored.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Taping {
    fn drop(&mut self) {
        // The client went away before the end: the rest is read for the record, in the
        // background, until it ends, is sealed or the time to record it passes.
        // Once sealed, its sender is gone: nothing more to read.
        let Some(sealed) = self.sealed.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut inner = std::mem::replace(&mut self.inner, Body::empty());
        let (tape, limit, until) = (self.tape.clone(), self.limit, self.until);
        runtime.spawn(async move {
            let mut sealed = Some(sealed);
            while let Ok(frame) = tokio::time::timeout_at(until, inner.frame()).await {
                tape_frame(&tape, limit, &mut sealed, frame.as_ref());
                if frame.is_none() || tape.lock().expect("tape lock").sealed {
                    break;
                }
            }
        });
    }
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
        let until = Instant::now() + std::time::Duration::from_secs(60);
        let (stored, whole) = keep(response, limit, until).await;
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

    /// A body whose frames the test sends, and the sender (dropped: the body ends).
    fn fed() -> (
        futures::channel::mpsc::UnboundedSender<Result<Bytes, std::io::Error>>,
        http::Response<Body>,
    ) {
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let response = http::Response::builder()
            .status(200)
            .header("content-type", "text/event-stream")
            .body(Body::from_stream(rx))
            .unwrap();
        (tx, response)
    }

    fn send(
        tx: &futures::channel::mpsc::UnboundedSender<Result<Bytes, std::io::Error>>,
        s: &'static str,
    ) {
        tx.unbounded_send(Ok(Bytes::from_static(s.as_bytes())))
            .unwrap();
    }

    async fn next(body: &mut Body) -> Option<Bytes> {
        let frame = body.frame().await?.unwrap();
        Some(frame.into_data().unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_that_stalls_is_kept_cut_at_its_time_and_the_client_gets_the_rest() {
        let (tx, response) = fed();
        send(&tx, "event 1");
        let start = Instant::now();
        let until = start + std::time::Duration::from_secs(5);
        let (stored, whole) = keep(response, 1024, until).await;
        assert_eq!(start.elapsed(), std::time::Duration::from_secs(5));
        assert_eq!(
            (stored.body.as_slice(), stored.truncated),
            (&b"event 1"[..], true)
        );
        // The client still gets what comes after.
        let mut body = whole.into_body();
        assert_eq!(next(&mut body).await.as_deref(), Some(&b"event 1"[..]));
        send(&tx, "event 2");
        drop(tx);
        assert_eq!(next(&mut body).await.as_deref(), Some(&b"event 2"[..]));
        assert_eq!(next(&mut body).await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_recorded_stream_reaches_the_client_as_it_comes_and_ends_once_stored() {
        let (tx, response) = fed();
        let until = Instant::now() + std::time::Duration::from_secs(60);
        let (response, mut recorded) = record(response, 1024, until);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        let mut body = response.into_body();
        // Each event arrives before the stream ends.
        send(&tx, "event 1\n");
        assert_eq!(next(&mut body).await.as_deref(), Some(&b"event 1\n"[..]));
        send(&tx, "event 2\n");
        assert_eq!(next(&mut body).await.as_deref(), Some(&b"event 2\n"[..]));
        drop(tx);
        // The end waits for the answer to be stored.
        let end = tokio::spawn(async move { next(&mut body).await });
        let answer = recorded.answer().await;
        assert_eq!(
            (answer.body.as_slice(), answer.truncated),
            (&b"event 1\nevent 2\n"[..], false)
        );
        assert_eq!(answer.status, 200);
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        assert!(!end.is_finished(), "the client's end waits for the store");
        recorded.stored();
        assert_eq!(end.await.unwrap(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_recorded_answer_is_cut_past_the_limit_or_its_time_and_read_on_for_a_client_gone() {
        // Past the limit: the answer is there at once, cut; the client gets it all.
        let (tx, response) = fed();
        let until = Instant::now() + std::time::Duration::from_secs(60);
        let (response, mut recorded) = record(response, 4, until);
        let mut body = response.into_body();
        send(&tx, "abcdef");
        assert_eq!(next(&mut body).await.as_deref(), Some(&b"abcdef"[..]));
        let answer = recorded.answer().await;
        assert_eq!(
            (answer.body.as_slice(), answer.truncated),
            (&b"abcd"[..], true)
        );

        // Stalled: at its time, what passed, cut.
        let (tx, response) = fed();
        let start = Instant::now();
        let (response, mut recorded) =
            record(response, 1024, start + std::time::Duration::from_secs(5));
        let mut body = response.into_body();
        send(&tx, "slow");
        assert_eq!(next(&mut body).await.as_deref(), Some(&b"slow"[..]));
        let answer = recorded.answer().await;
        assert_eq!(start.elapsed(), std::time::Duration::from_secs(5));
        assert_eq!(
            (answer.body.as_slice(), answer.truncated),
            (&b"slow"[..], true)
        );
        drop(tx);

        // The client went away after the first part: the rest is read into the record.
        let (tx, response) = fed();
        let (response, mut recorded) = record(
            response,
            1024,
            Instant::now() + std::time::Duration::from_secs(60),
        );
        let mut body = response.into_body();
        send(&tx, "first ");
        assert_eq!(next(&mut body).await.as_deref(), Some(&b"first "[..]));
        drop(body);
        send(&tx, "rest");
        drop(tx);
        let answer = recorded.answer().await;
        assert_eq!(
            (answer.body.as_slice(), answer.truncated),
            (&b"first rest"[..], false)
        );
    }
}
