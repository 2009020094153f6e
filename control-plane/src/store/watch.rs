//! A prefix watch that resumes from its last revision after errors and reports compaction,
//! so that its consumer re-lists (as kube-runtime's watchers do).

use super::Store;
use etcd_client::{EventType, KeyValue, WatchOptions};
use std::time::Duration;
use tokio::sync::mpsc;
use tower::retry::backoff::{Backoff, ExponentialBackoff, ExponentialBackoffMaker, MakeBackoff};
use tower::util::rng::HasherRng;

/// First wait before re-opening a failed watch.
pub const WATCH_RETRY_MIN: Duration = Duration::from_millis(100);
/// Longest wait before re-opening a failed watch.
pub const WATCH_RETRY_MAX: Duration = Duration::from_secs(5);

/// One change seen by a watch.
#[derive(Debug)]
pub enum WatchMessage {
    /// A key was written.
    Put(KeyValue),
    /// A key was deleted (the value holds the key only).
    Delete(KeyValue),
    /// The start revision was compacted away: re-list, then watch again from the list's revision.
    Compacted,
}

/// Watches every key under `prefix` from `start_revision` on a background task. Ends after
/// `Compacted`, or when the receiver is dropped.
pub fn watch_prefix(
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

fn new_backoff() -> ExponentialBackoff {
    ExponentialBackoffMaker::new(WATCH_RETRY_MIN, WATCH_RETRY_MAX, 0.5, HasherRng::default())
        .expect("constant backoff bounds are valid")
        .make_backoff()
}
