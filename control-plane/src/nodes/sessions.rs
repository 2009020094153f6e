//! The node sessions this control plane holds, and the log streams routed through them.
//!
//! A log request travels down a node's stream as a `LogRequest` with a stream id chosen here;
//! the node answers with `LogData` carrying that id, which [`Sessions::deliver`] forwards to the
//! caller of `StreamLogs`. Dropping the caller's [`LogStream`] cancels its requests on the nodes.

use berth_proto::v1::{control_message, CancelLogs, ControlMessage, LogChunk, LogData, LogRequest};
use futures::Stream;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::sync::mpsc;
use tonic::Status;

/// Output channel of a node session.
pub type ControlSender = mpsc::Sender<Result<ControlMessage, Status>>;
type ChunkSender = mpsc::Sender<Result<LogChunk, Status>>;

/// Chunks buffered per `StreamLogs` call before the node's stream waits for the caller.
const LOG_BUFFER: usize = 256;

/// Every node session of this control plane, and every open log stream.
#[derive(Clone, Default)]
pub struct Sessions {
    inner: Arc<Mutex<Inner>>,
    next_id: Arc<AtomicU64>,
}

#[derive(Default)]
struct Inner {
    /// Node name → its live session.
    nodes: HashMap<String, Session>,
    /// Log stream id → where its chunks go.
    logs: HashMap<u64, Route>,
}

struct Session {
    id: u64,
    tx: ControlSender,
}

struct Route {
    node: String,
    session: u64,
    to: ChunkSender,
}

/// One requested replica of a `StreamLogs` call.
pub struct LogTarget {
    /// Node the replica is placed on.
    pub node: String,
    /// The replica.
    pub replica: String,
}

impl Sessions {
    /// Registers the session of `node`, replacing an older one; returns its id for [`Self::leave`].
    pub fn join(&self, node: &str, tx: ControlSender) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let mut inner = self.inner.lock().expect("sessions lock");
        inner.nodes.insert(node.to_string(), Session { id, tx });
        id
    }

    /// Forgets session `id` of `node` (if a newer one has not replaced it) and ends, with an
    /// error, every log stream that was flowing through it.
    pub fn leave(&self, node: &str, id: u64) {
        let mut inner = self.inner.lock().expect("sessions lock");
        if inner.nodes.get(node).is_some_and(|s| s.id == id) {
            inner.nodes.remove(node);
        }
        let broken: Vec<u64> = inner
            .logs
            .iter()
            .filter(|(_, r)| r.node == node && r.session == id)
            .map(|(stream, _)| *stream)
            .collect();
        for stream in broken {
            if let Some(route) = inner.logs.remove(&stream) {
                let _ = route.to.try_send(Err(Status::unavailable(format!(
                    "node {node} disconnected while streaming logs"
                ))));
            }
        }
    }

    /// Whether `node` has a session here.
    pub fn connected(&self, node: &str) -> bool {
        self.inner
            .lock()
            .expect("sessions lock")
            .nodes
            .contains_key(node)
    }

    /// Asks the nodes of `targets` for their output, merged into one stream. Targets whose
    /// node has no session here are skipped; the caller checks [`Self::connected`] first.
    pub fn open_logs(&self, targets: &[LogTarget], follow: bool, tail: u32) -> LogStream {
        let (to, rx) = mpsc::channel(LOG_BUFFER);
        let mut opened = Vec::new();
        let mut inner = self.inner.lock().expect("sessions lock");
        for target in targets {
            let Some(session) = inner.nodes.get(&target.node) else {
                continue;
            };
            let stream_id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
            let request = ControlMessage {
                kind: Some(control_message::Kind::Logs(LogRequest {
                    stream_id,
                    replica: target.replica.clone(),
                    follow,
                    tail,
                })),
            };
            if session.tx.try_send(Ok(request)).is_err() {
                let _ = to.try_send(Err(Status::unavailable(format!(
                    "node {} is not taking requests",
                    target.node
                ))));
                continue;
            }
            let session = session.id;
            inner.logs.insert(
                stream_id,
                Route {
                    node: target.node.clone(),
                    session,
                    to: to.clone(),
                },
            );
            opened.push(stream_id);
        }
        drop(inner);
        LogStream {
            rx,
            streams: opened,
            sessions: self.clone(),
        }
    }

    /// Hands a node's `LogData` to the caller that asked for it.
    pub async fn deliver(&self, data: LogData) {
        let to = {
            let mut inner = self.inner.lock().expect("sessions lock");
            let finished = data.end || !data.error.is_empty();
            let route = if finished {
                inner.logs.remove(&data.stream_id).map(|r| r.to)
            } else {
                inner.logs.get(&data.stream_id).map(|r| r.to.clone())
            };
            match route {
                Some(to) => to,
                // The caller went away; its cancel is on the way to the node.
                None => return,
            }
        };
        if let Some(chunk) = data.chunk {
            // Waiting here slows the node's stream to the pace of a slow reader, as
            // TCP would; a caller that left is noticed by the send failing.
            let _ = to.send(Ok(chunk)).await;
        }
        if !data.error.is_empty() {
            let _ = to.send(Err(Status::unavailable(data.error))).await;
        }
    }

    fn cancel(&self, streams: &[u64]) {
        let mut inner = self.inner.lock().expect("sessions lock");
        for stream_id in streams {
            let Some(route) = inner.logs.remove(stream_id) else {
                continue;
            };
            if let Some(session) = inner.nodes.get(&route.node) {
                let cancel = ControlMessage {
                    kind: Some(control_message::Kind::CancelLogs(CancelLogs {
                        stream_id: *stream_id,
                    })),
                };
                let _ = session.tx.try_send(Ok(cancel));
            }
        }
    }
}

/// The merged output of a `StreamLogs` call. It ends when every node has finished; dropping it
/// cancels what is still flowing.
pub struct LogStream {
    rx: mpsc::Receiver<Result<LogChunk, Status>>,
    streams: Vec<u64>,
    sessions: Sessions,
}

impl LogStream {
    /// How many node streams were opened.
    #[cfg(test)]
    pub fn opened(&self) -> usize {
        self.streams.len()
    }
}

impl Stream for LogStream {
    type Item = Result<LogChunk, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for LogStream {
    fn drop(&mut self) {
        self.sessions.cancel(&self.streams);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn target(node: &str, replica: &str) -> LogTarget {
        LogTarget {
            node: node.into(),
            replica: replica.into(),
        }
    }

    fn chunk(replica: &str, data: &str) -> LogChunk {
        LogChunk {
            replica: replica.into(),
            data: data.as_bytes().to_vec(),
            ..Default::default()
        }
    }

    async fn requested(rx: &mut mpsc::Receiver<Result<ControlMessage, Status>>) -> LogRequest {
        match rx.recv().await.unwrap().unwrap().kind {
            Some(control_message::Kind::Logs(r)) => r,
            other => panic!("expected a log request, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn merges_nodes_and_ends_when_all_finish() {
        let sessions = Sessions::default();
        let (tx_a, mut rx_a) = mpsc::channel(8);
        let (tx_b, mut rx_b) = mpsc::channel(8);
        sessions.join("a", tx_a);
        sessions.join("b", tx_b);
        let mut logs = sessions.open_logs(&[target("a", "x-0"), target("b", "x-1")], false, 5);
        assert_eq!(logs.opened(), 2);
        let ra = requested(&mut rx_a).await;
        let rb = requested(&mut rx_b).await;
        assert_eq!((ra.replica.as_str(), ra.tail), ("x-0", 5));
        assert_ne!(ra.stream_id, rb.stream_id);
        for (req, replica) in [(&ra, "x-0"), (&rb, "x-1")] {
            sessions
                .deliver(LogData {
                    stream_id: req.stream_id,
                    chunk: Some(chunk(replica, "line")),
                    ..Default::default()
                })
                .await;
            sessions
                .deliver(LogData {
                    stream_id: req.stream_id,
                    end: true,
                    ..Default::default()
                })
                .await;
        }
        let got: Vec<_> = (&mut logs).collect().await;
        let mut replicas: Vec<_> = got.into_iter().map(|c| c.unwrap().replica).collect();
        replicas.sort();
        assert_eq!(replicas, ["x-0", "x-1"]);
    }

    #[tokio::test]
    async fn dropping_the_stream_cancels_on_the_node() {
        let sessions = Sessions::default();
        let (tx, mut rx) = mpsc::channel(8);
        sessions.join("a", tx);
        let logs = sessions.open_logs(&[target("a", "x-0")], true, 0);
        let req = requested(&mut rx).await;
        drop(logs);
        match rx.recv().await.unwrap().unwrap().kind {
            Some(control_message::Kind::CancelLogs(c)) => assert_eq!(c.stream_id, req.stream_id),
            other => panic!("expected a cancel, got {other:?}"),
        }
        // Late data for the cancelled stream goes nowhere and does not block.
        sessions
            .deliver(LogData {
                stream_id: req.stream_id,
                chunk: Some(chunk("x-0", "late")),
                ..Default::default()
            })
            .await;
    }

    #[tokio::test]
    async fn a_node_leaving_ends_its_streams_with_an_error() {
        let sessions = Sessions::default();
        let (tx, _rx) = mpsc::channel(8);
        let id = sessions.join("a", tx);
        let mut logs = sessions.open_logs(&[target("a", "x-0")], true, 0);
        sessions.leave("a", id);
        let err = logs.next().await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(err.message().contains("node a disconnected"), "{err}");
        assert!(logs.next().await.is_none());
        assert!(!sessions.connected("a"));
    }

    #[tokio::test]
    async fn an_old_session_leaving_keeps_the_new_one() {
        let sessions = Sessions::default();
        let (old_tx, _old_rx) = mpsc::channel(8);
        let (new_tx, _new_rx) = mpsc::channel(8);
        let old = sessions.join("a", old_tx);
        sessions.join("a", new_tx);
        sessions.leave("a", old);
        assert!(sessions.connected("a"));
    }

    #[tokio::test]
    async fn node_errors_reach_the_caller() {
        let sessions = Sessions::default();
        let (tx, mut rx) = mpsc::channel(8);
        sessions.join("a", tx);
        let mut logs = sessions.open_logs(&[target("a", "x-0")], false, 0);
        let req = requested(&mut rx).await;
        sessions
            .deliver(LogData {
                stream_id: req.stream_id,
                error: "no such container".into(),
                ..Default::default()
            })
            .await;
        let err = logs.next().await.unwrap().unwrap_err();
        assert!(err.message().contains("no such container"));
        assert!(logs.next().await.is_none());
    }
}
