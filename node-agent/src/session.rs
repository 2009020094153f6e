//! The one stream to the control plane: hello, heartbeats and reports out; the full set of
//! assignments in. Reconnects with jittered backoff, trying each control-plane address in turn.

use crate::reports::Reports;
use berth_proto::v1::node_agent_service_client::NodeAgentServiceClient;
use berth_proto::v1::{
    control_message, node_message, Assignments, Heartbeat, Hello, NodeMessage, Resources,
};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
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

/// Who this node is.
#[derive(Clone, Debug)]
pub struct Identity {
    pub node: String,
    pub capacity: Resources,
    pub labels: HashMap<String, String>,
    pub join_token: String,
}

/// Holds the session forever, reconnecting as needed.
pub async fn run(
    control_planes: Vec<String>,
    identity: Identity,
    reports: Arc<Reports>,
    assignments: watch::Sender<Option<Assignments>>,
) {
    let mut backoff = new_backoff();
    let mut next = 0;
    loop {
        let addr = &control_planes[next % control_planes.len()];
        next += 1;
        match session(addr, &identity, &reports, &assignments).await {
            Ok(()) => tracing::info!(control_plane = %addr, "session ended; reconnecting"),
            Err(e) => {
                tracing::warn!(control_plane = %addr, error = %e, "session failed; reconnecting")
            }
        }
        backoff.next_backoff().await;
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
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let url = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let channel = Endpoint::from_shared(url)?
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await?;
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
    loop {
        tokio::select! {
            message = inbound.message() => match message? {
                Some(m) => {
                    if let Some(control_message::Kind::Assignments(a)) = m.kind {
                        tracing::debug!(version = a.version, replicas = a.replicas.len(), "assignments");
                        assignments.send_replace(Some(a));
                    }
                }
                None => return Ok(()),
            },
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

fn new_backoff() -> ExponentialBackoff {
    ExponentialBackoffMaker::new(RECONNECT_MIN, RECONNECT_MAX, 0.5, HasherRng::default())
        .expect("constant backoff bounds are valid")
        .make_backoff()
}
