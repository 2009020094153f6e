//! The one list-then-watch primitive every watcher is built on (as kube-runtime's `watcher`):
//! a paged list of a prefix at one revision, then the changes after it; a watch that breaks
//! resumes from the last revision it saw, and one whose revision was compacted away lists
//! again. Consumers see [`Change`]s and never write this loop themselves.

use crate::{Store, StoreError};
use etcd_client::{EventType, GetOptions, KeyValue, WatchOptions};
use std::time::Duration;
use tokio::sync::mpsc;
use tower::retry::backoff::{Backoff, ExponentialBackoff, ExponentialBackoffMaker, MakeBackoff};
use tower::util::rng::HasherRng;

/// First wait before re-opening a failed watch or list.
pub const WATCH_RETRY_MIN: Duration = Duration::from_millis(100);
/// Longest wait before re-opening a failed watch or list.
pub const WATCH_RETRY_MAX: Duration = Duration::from_secs(5);
/// Keys per page of a list: a list never asks etcd for an unbounded range with values.
pub const LIST_PAGE: i64 = 256;
/// Keys listed per etcd call (keys only) before their values are read [`LIST_PAGE`] at a time.
pub const LIST_KEYS_PAGE: i64 = 4096;
/// Changes buffered between the watch task and its consumer.
const BUFFER: usize = 64;

/// What a [`ListWatch`] yields.
#[derive(Debug)]
pub enum Change {
    /// A list starts (the first, or again after compaction): forget what was known.
    Init,
    /// A key as listed.
    InitApply(KeyValue),
    /// The list is complete at `revision`; what follows are changes after it.
    InitDone { revision: i64 },
    /// A key was written.
    Put(KeyValue),
    /// A key was deleted (the value holds the key only; `mod_revision` is the delete's).
    Delete(KeyValue),
}

/// A prefix listed, then watched; see the module's doc. Dropping it stops its task.
pub struct ListWatch(mpsc::Receiver<Change>);

impl ListWatch {
    /// The next change. Waits while nothing changes; the task behind it never ends on its
    /// own, so this always yields eventually.
    pub async fn next(&mut self) -> Change {
        match self.0.recv().await {
            Some(change) => change,
            // The task ended only by panicking; nothing will come.
            None => std::future::pending().await,
        }
    }

    /// A change already queued, without waiting.
    pub fn try_next(&mut self) -> Option<Change> {
        self.0.try_recv().ok()
    }
}

/// Lists every key under `prefix`, then follows it (see the module's doc).
pub fn list_watch(store: &Store, prefix: String) -> ListWatch {
    let (tx, rx) = mpsc::channel(BUFFER);
    let store = store.clone();
    tokio::spawn(async move {
        let mut backoff = new_backoff();
        loop {
            if tx.send(Change::Init).await.is_err() {
                return;
            }
            let revision = match list_pages(&store, &prefix, &tx).await {
                Ok(Some(revision)) => revision,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(prefix, error = %e, "list failed; listing again");
                    backoff.next_backoff().await;
                    continue;
                }
            };
            backoff = new_backoff();
            if tx.send(Change::InitDone { revision }).await.is_err() {
                return;
            }
            let mut changes = watch_prefix(&store, prefix.clone(), revision + 1);
            loop {
                let change = tokio::select! {
                    _ = tx.closed() => return,
                    change = changes.recv() => change,
                };
                let change = match change {
                    Some(WatchMessage::Put(kv)) => Change::Put(kv),
                    Some(WatchMessage::Delete(kv)) => Change::Delete(kv),
                    // Compacted past what was seen: list again.
                    Some(WatchMessage::Compacted) | None => break,
                };
                if tx.send(change).await.is_err() {
                    return;
                }
            }
        }
    });
    ListWatch(rx)
}

/// Options for one page of keys from a start up to `end`: at most `limit`, in key order.
///
/// No sort is asked for: etcd returns a range in key order already, and a range with any sort
/// order makes etcd ignore the limit, read every key left in the range (values and all), sort
/// them and only then truncate — each page of a large prefix would cost as much as the whole.
pub fn page(end: Vec<u8>, limit: i64) -> GetOptions {
    GetOptions::new().with_range(end).with_limit(limit)
}

/// Sends every key under `prefix` as `InitApply`, a page at a time at one revision; the
/// revision, or `None` when the consumer is gone.
///
/// Keys are listed first ([`LIST_KEYS_PAGE`] per call, keys only), then the values of each
/// [`LIST_PAGE`] of them by a range that ends just past its last key: etcd 3.4 walks its key
/// index to the end of a range whatever the limit, so pages of values over the whole rest of a
/// large prefix would cost about n²/2 / page index steps in all (9.5 million for 70,000 waiting
/// requests in pages of 256); bounded ranges cost what they return.
async fn list_pages(
    store: &Store,
    prefix: &str,
    tx: &mpsc::Sender<Change>,
) -> Result<Option<i64>, StoreError> {
    let end = prefix_end(prefix.as_bytes());
    let mut from = prefix.as_bytes().to_vec();
    let mut revision = 0;
    loop {
        let mut options = page(end.clone(), LIST_KEYS_PAGE).with_keys_only();
        if revision > 0 {
            options = options.with_revision(revision);
        }
        let resp = store
            .client()
            .get(from.clone(), Some(options))
            .await
            .map_err(|e| store.unavailable(e))?;
        if revision == 0 {
            revision = resp.header().map_or(0, |h| h.revision());
        }
        let more = resp.more();
        let keys: Vec<Vec<u8>> = resp.kvs().iter().map(|kv| kv.key().to_vec()).collect();
        for chunk in keys.chunks(LIST_PAGE as usize) {
            let (Some(first), Some(last)) = (chunk.first(), chunk.last()) else {
                continue;
            };
            let mut past_last = last.clone();
            past_last.push(0);
            // At the listing's revision these are exactly the chunk's keys.
            let options = GetOptions::new()
                .with_range(past_last)
                .with_revision(revision);
            let resp = store
                .client()
                .get(first.clone(), Some(options))
                .await
                .map_err(|e| store.unavailable(e))?;
            for kv in resp.kvs() {
                if tx.send(Change::InitApply(kv.clone())).await.is_err() {
                    return Ok(None);
                }
            }
        }
        match keys.last() {
            Some(last) if more => {
                from = last.clone();
                from.push(0);
            }
            _ => return Ok(Some(revision)),
        }
    }
}

/// One change seen by a raw watch.
#[derive(Debug)]
enum WatchMessage {
    Put(KeyValue),
    Delete(KeyValue),
    /// The start revision was compacted away.
    Compacted,
}

/// Watches every key under `prefix` from `start_revision` (0: from now) on a background task.
/// Ends after `Compacted`, or when the receiver is dropped.
fn watch_prefix(
    store: &Store,
    prefix: String,
    start_revision: i64,
) -> mpsc::Receiver<WatchMessage> {
    let (tx, rx) = mpsc::channel(64);
    let mut client = store.client();
    tokio::spawn(async move {
        let mut next = start_revision;
        let mut backoff = new_backoff();
        loop {
            let options = WatchOptions::new().with_prefix().with_start_revision(next);
            let mut stream = tokio::select! {
                _ = tx.closed() => return,
                opened = client.watch(prefix.as_str(), Some(options)) => match opened {
                    Ok(stream) => stream,
                    Err(e) => {
                        tracing::warn!(prefix, error = %e, "watch failed to open; retrying");
                        backoff.next_backoff().await;
                        continue;
                    }
                },
            };
            loop {
                let message = tokio::select! {
                    _ = tx.closed() => return,
                    message = stream.message() => message,
                };
                match message {
                    Ok(Some(resp)) => {
                        backoff = new_backoff();
                        // A watch from "now" learns its start from the first response, so
                        // that a resume after a break also gets what changed in between.
                        if next == 0 {
                            if let Some(header) = resp.header() {
                                next = header.revision() + 1;
                            }
                        }
                        if resp.compact_revision() > 0 {
                            let _ = tx.send(WatchMessage::Compacted).await;
                            return;
                        }
                        for event in resp.events() {
                            let Some(kv) = event.kv() else { continue };
                            next = next.max(kv.mod_revision() + 1);
                            let message = match event.event_type() {
                                EventType::Put => WatchMessage::Put(kv.clone()),
                                EventType::Delete => WatchMessage::Delete(kv.clone()),
                            };
                            if tx.send(message).await.is_err() {
                                return;
                            }
                        }
                        if resp.canceled() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    // Resuming would fail the same way forever: list again instead (a fresh
                    // watch starts in step, with no backlog).
                    Err(e) if list_again(&e) => {
                        tracing::warn!(prefix, error = %e, "watch cannot resume; listing again");
                        let _ = tx.send(WatchMessage::Compacted).await;
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(prefix, error = %e, "watch interrupted; resuming");
                        break;
                    }
                }
            }
            backoff.next_backoff().await;
        }
    });
    rx
}

/// Whether etcd refused a request because its revision was compacted away.
pub(crate) fn compacted(e: &etcd_client::Error) -> bool {
    e.to_string()
        .contains("required revision has been compacted")
}

/// Whether a broken watch must list again rather than resume: its revision was compacted
/// away, or etcd sent more than the client decodes in one message (both OUT_OF_RANGE). The
/// latter comes when a watcher fell behind: etcd then sends up to 1,000 revisions of changes
/// in one message, and resuming from the same revision gets the same message again.
pub(crate) fn list_again(e: &etcd_client::Error) -> bool {
    compacted(e)
        || matches!(e, etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::OutOfRange)
}

/// The first key after every key that starts with `prefix` (etcd's range end for a prefix).
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte 0xff: to the end of the keyspace.
    vec![0]
}

fn new_backoff() -> ExponentialBackoff {
    ExponentialBackoffMaker::new(WATCH_RETRY_MIN, WATCH_RETRY_MAX, 0.5, HasherRng::default())
        .expect("constant backoff bounds are valid")
        .make_backoff()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watch_lists_again_after_compaction_or_an_oversized_message_only() {
        let status = |s| etcd_client::Error::GRpcStatus(s);
        let compaction = status(tonic::Status::out_of_range(
            "etcdserver: mvcc: required revision has been compacted",
        ));
        assert!(compacted(&compaction) && list_again(&compaction));
        // As tonic reports a message over the decoding limit (seen from a watch that fell
        // behind a busy queue).
        let oversized = status(tonic::Status::out_of_range(
            "Error, decoded message length too large: found 5273826 bytes, the limit is: \
             4194304 bytes",
        ));
        assert!(!compacted(&oversized) && list_again(&oversized));
        let future = status(tonic::Status::unknown(
            "etcdserver: mvcc: required revision is a future revision",
        ));
        assert!(!compacted(&future) && !list_again(&future));
        let down = status(tonic::Status::unavailable("connection refused"));
        assert!(!list_again(&down));
        assert!(!list_again(&etcd_client::Error::WatchError(
            "the watch stream ended".into()
        )));
    }
}
