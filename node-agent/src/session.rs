//! The one stream to the control plane: hello, heartbeats and reports out; the full set of
//! assignments in. Reconnects with jittered backoff, trying each control-plane address in turn.

use crate::docker::{DockerError, Runtime};
use crate::reports::Reports;
use berth_proto::v1::node_agent_service_client::NodeAgentServiceClient;
use berth_proto::v1::{
    control_message, node_message, Assignments, Heartbeat, Hello, LogChunk, LogData, LogRequest,
    NodeMessage, Resources,
};
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::{AbortHandle, JoinSet};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataValue;
use tonic::transport::Endpoint;
use tower::retry::backoff::{Backoff, ExponentialBackoff, ExponentialBackoffMaker, MakeBackoff};
use tower::util::rng::HasherRng;

/// Time between heartbeats.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// First wait before reconnecting.
pub const RECONNECT_MIN: Duration = Duration::from_millis(200);
/// Longest wait before reconnecting.
pub const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// Time between HTTP/2 pings to the control plane, and how long one may go unanswered before
/// the session is given up: a control plane that stands still (SIGSTOP, a stalled VM) or a
/// path that drops packets keeps the connection open for minutes, and its nodes would go
/// silent, then down, with their replicas moved, while another control plane is there to
/// take them. Found well within the control planes' [`HEARTBEAT`]-based silence (10 s).
pub const PING_EVERY: Duration = Duration::from_secs(2);
/// See [`PING_EVERY`].
pub const PING_TIMEOUT: Duration = Duration::from_secs(3);

/// Who this node is.
#[derive(Clone, Debug)]
pub struct Identity {
    pub node: String,
    pub capacity: Resources,
    pub labels: HashMap<String, String>,
    pub join_token: String,
    /// TLS towards `https://` control planes: the CA and, for mTLS, this node's certificate.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

/// Holds the session until `stop` is cancelled, reconnecting as needed.
pub async fn run(
    control_planes: Vec<String>,
    identity: Identity,
    reports: Arc<Reports>,
    assignments: watch::Sender<Option<Assignments>>,
    runtime: Runtime,
    stop: CancellationToken,
) {
    let mut backoff = new_backoff();
    let mut next = 0;
    loop {
        let addr = &control_planes[next % control_planes.len()];
        next += 1;
        let ended = tokio::select! {
            // Dropping the session closes its stream: the control plane sees the node leave.
            _ = stop.cancelled() => return,
            ended = session(addr, &identity, &reports, &assignments, &runtime) => ended,
        };
        match ended {
            Ok(()) => tracing::info!(control_plane = %addr, "session ended; reconnecting"),
            Err(e) => {
                tracing::warn!(control_plane = %addr, error = %e, "session failed; reconnecting")
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = backoff.next_backoff() => {}
        }
        if next % control_planes.len() == 0 {
            backoff = new_backoff();
        }
    }
}

async fn session(
    addr: &str,
    identity: &Identity,
    reports: &Reports,
    assignments: &watch::Sender<Option<Assignments>>,
    runtime: &Runtime,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let url = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let mut endpoint = Endpoint::from_shared(url)?
        .connect_timeout(Duration::from_secs(3))
        .http2_keep_alive_interval(PING_EVERY)
        .keep_alive_timeout(PING_TIMEOUT)
        .keep_alive_while_idle(true);
    if let Some(tls) = &identity.tls {
        endpoint = endpoint.tls_config(tls.clone())?;
    }
    let channel = endpoint.connect().await?;
    let token: MetadataValue<_> = format!("Bearer {}", identity.join_token).parse()?;
    let mut client =
        NodeAgentServiceClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("authorization", token.clone());
            Ok(req)
        });
    let (tx, rx) = mpsc::channel(64);
    let (snapshot, mut sent) = reports.since(0);
    let hello = Hello {
        node: identity.node.clone(),
        capacity: Some(identity.capacity),
        labels: identity.labels.clone(),
        replicas: snapshot,
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    tx.send(NodeMessage {
        kind: Some(node_message::Kind::Hello(hello)),
    })
    .await?;
    let mut inbound = client.connect(ReceiverStream::new(rx)).await?.into_inner();
    tracing::info!(control_plane = %addr, node = %identity.node, "connected");
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    // Log streams in flight, by stream id; dropping the set (session over) aborts them all.
    let mut log_tasks = JoinSet::new();
    let mut log_handles: HashMap<u64, AbortHandle> = HashMap::new();
    loop {
        tokio::select! {
            message = inbound.message() => match message?.and_then(|m| m.kind) {
                Some(control_message::Kind::Assignments(a)) => {
                    tracing::debug!(version = a.version, replicas = a.replicas.len(), "assignments");
                    assignments.send_replace(Some(a));
                }
                Some(control_message::Kind::Logs(request)) => {
                    let id = request.stream_id;
                    let task = send_logs(runtime.clone(), identity.node.clone(), request, tx.clone());
                    log_handles.insert(id, log_tasks.spawn(task));
                }
                Some(control_message::Kind::CancelLogs(cancel)) => {
                    if let Some(task) = log_handles.remove(&cancel.stream_id) {
                        task.abort();
                    }
                }
                None => return Ok(()),
            },
            Some(Ok(id)) = log_tasks.join_next(), if !log_tasks.is_empty() => {
                log_handles.remove(&id);
            }
            _ = heartbeat.tick() => {
                let applied = assignments.borrow().as_ref().map(|a| a.version).unwrap_or_default();
                let beat = Heartbeat { time: Some(berth_proto::timestamp(std::time::SystemTime::now())), applied_version: applied };
                tx.send(NodeMessage { kind: Some(node_message::Kind::Heartbeat(beat)) }).await?;
            }
            _ = reports.changed.notified() => {
                let (changed, seq) = reports.since(sent);
                sent = seq;
                for report in changed {
                    tx.send(NodeMessage { kind: Some(node_message::Kind::Report(report)) }).await?;
                }
            }
        }
    }
}

/// Streams one replica's output as `LogData`, ending with a last message that says whether it
/// ended normally. Returns the stream id.
async fn send_logs(
    runtime: Runtime,
    node: String,
    request: LogRequest,
    tx: mpsc::Sender<NodeMessage>,
) -> u64 {
    let id = request.stream_id;
    let message = |data: LogData| NodeMessage {
        kind: Some(node_message::Kind::Log(data)),
    };
    let output = runtime.logs(&request.replica, request.follow, request.tail);
    let mut output = std::pin::pin!(output);
    let mut error = String::new();
    while let Some(item) = output.next().await {
        match item {
            Ok((stream, data)) => {
                let chunk = LogChunk {
                    replica: request.replica.clone(),
                    node: node.clone(),
                    stream: stream as i32,
                    data: data.to_vec(),
                };
                let data = LogData {
                    stream_id: id,
                    chunk: Some(chunk),
                    ..Default::default()
                };
                if tx.send(message(data)).await.is_err() {
                    return id;
                }
            }
            Err(DockerError::Api(bollard::errors::Error::DockerResponseServerError {
                status_code: 404,
                ..
            })) => {
                error = format!(
                    "replica {} has no container on node {node} yet",
                    request.replica
                );
                break;
            }
            Err(e) => {
                error = format!(
                    "reading the logs of {} on node {node}: {e}",
                    request.replica
                );
                break;
            }
        }
    }
    let last = LogData {
        stream_id: id,
        end: error.is_empty(),
        error,
        chunk: None,
    };
    let _ = tx.send(message(last)).await;
    id
}

fn new_backoff() -> ExponentialBackoff {
    ExponentialBackoffMaker::new(RECONNECT_MIN, RECONNECT_MAX, 0.5, HasherRng::default())
        .expect("constant backoff bounds are valid")
        .make_backoff()
}
