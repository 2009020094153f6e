//! Node sessions: the `NodeAgentService.Connect` stream of each node agent, first placement,
//! and observed status built from node reports.

pub mod denied;
pub mod monitor;
pub mod placement;
pub mod sessions;
mod status;

pub use sessions::Sessions;

use crate::api::{to_status, ApiError};
use berth_proto::time::now;
use berth_proto::v1::node_agent_service_server::NodeAgentService;
use berth_proto::v1::{
    control_message, node_message, Assignments, ControlMessage, Hello, Node, NodeMessage,
    NodeStatus,
};
use berth_proto::validate;
use berth_store::watch::{list_watch, Change};
use berth_store::Store;
use futures::Stream;
use std::pin::Pin;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// Lifetime of a node's record without heartbeats: a node silent this long is down (its
/// record goes) and its replicas are placed elsewhere.
pub const NODE_LEASE_TTL: Duration = Duration::from_secs(20);
/// A node silent this long is unknown: its replicas leave the gateways' pools.
pub const NODE_UNKNOWN_AFTER: Duration = Duration::from_secs(10);
/// How long one renewal of a node's lease may take before it is given up and the next
/// heartbeat renews over a new stream: a stream on an etcd member that went silent never
/// answers, and waiting for it (until the connection's keep-alive ends it) left every node of
/// this control plane silent long enough to be marked unknown.
pub const RENEW_WITHIN: Duration = Duration::from_secs(2);

/// Serves `NodeAgentService`.
#[derive(Clone)]
pub struct NodeAgentApi {
    store: Store,
    sessions: Sessions,
    denied: denied::DeniedNodes,
    require_client_cert: bool,
}

impl NodeAgentApi {
    /// Node sessions over `store`, registered in `sessions` so that log requests reach them,
    /// each ended when its node is on `denied`.
    pub fn new(store: Store, sessions: Sessions, denied: denied::DeniedNodes) -> Self {
        Self {
            store,
            sessions,
            denied,
            require_client_cert: false,
        }
    }

    /// Refuses node agents that present no client certificate (the TLS layer has checked any
    /// presented one against the configured CA).
    pub fn require_client_cert(mut self, required: bool) -> Self {
        self.require_client_cert = required;
        self
    }
}

/// Whether the client certificate (already verified against the CA by TLS) names `node` among
/// its DNS subject alternative names, as `berth certs --node NAME` makes them.
fn certificate_names_node(
    certificate: &rustls_pki_types::CertificateDer<'static>,
    node: &str,
) -> Result<(), Status> {
    let refused = || {
        Status::permission_denied(format!(
            "the client certificate does not name node {node}: make one with `berth certs --dir DIR --node {node}`"
        ))
    };
    let parsed = webpki::EndEntityCert::try_from(certificate).map_err(|_| refused())?;
    let name = rustls_pki_types::ServerName::try_from(node).map_err(|_| refused())?;
    parsed
        .verify_is_valid_for_subject_name(&name)
        .map_err(|_| refused())
}

type ControlStream = Pin<Box<dyn Stream<Item = Result<ControlMessage, Status>> + Send>>;

#[tonic::async_trait]
impl NodeAgentService for NodeAgentApi {
    type ConnectStream = ControlStream;

    async fn connect(
        &self,
        request: Request<Streaming<NodeMessage>>,
    ) -> Result<Response<ControlStream>, Status> {
        let principal = request
            .extensions()
            .get::<crate::auth::Principal>()
            .cloned();
        let certificate = request.peer_certs().and_then(|c| c.first().cloned());
        if self.require_client_cert && certificate.is_none() {
            return Err(Status::unauthenticated(
                "node agents must present a client certificate signed by the cluster's CA \
                 (berth node-agent --tls-cert --tls-key)",
            ));
        }
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await? {
            Some(NodeMessage {
                kind: Some(node_message::Kind::Hello(hello)),
            }) => hello,
            _ => return Err(Status::invalid_argument("the first message must be hello")),
        };
        validate::dns_label("hello.node", &hello.node).map_err(|e| to_status(e.into()))?;
        // A node certificate speaks for the nodes it names only.
        if let Some(certificate) = &certificate {
            certificate_names_node(certificate, &hello.node)?;
        }
        // A node token speaks for its own node only.
        if let Some(crate::auth::Principal::Node(Some(bound))) = &principal {
            if *bound != hello.node {
                return Err(Status::permission_denied(format!(
                    "this token is for node {bound}, not {}",
                    hello.node
                )));
            }
        }
        // A denied name is refused whatever its credentials: read from etcd, not the mirror,
        // which may not have listed yet.
        let denied = self
            .store
            .node_denied(&hello.node)
            .await
            .map_err(|e| to_status(ApiError::Store(e)))?;
        if let Some(denied) = denied {
            return Err(denied::refusal(&denied));
        }
        let node = hello.node.clone();
        let lease = self
            .store
            .grant_lease(NODE_LEASE_TTL.as_secs() as i64)
            .await
            .map_err(|e| to_status(ApiError::Store(e)))?;
        self.store
            .put_node(&node_record(&hello), lease)
            .await
            .map_err(|e| to_status(ApiError::Store(e)))?;
        for report in &hello.replicas {
            status::apply_report(&self.store, &node, report).await;
        }
        tracing::info!(node = %node, replicas = hello.replicas.len(), "node connected");

        let (tx, rx) = mpsc::channel(64);
        let session = self.sessions.join(&node, tx.clone());
        tokio::spawn(push_assignments(
            self.store.clone(),
            node.clone(),
            tx.clone(),
        ));
        let store = self.store.clone();
        let sessions = self.sessions.clone();
        let denied = self.denied.denied(&node);
        tokio::spawn(async move {
            let mut record = node_record(&hello);
            let mut renewer = store.lease_renewer(lease);
            tokio::pin!(denied);
            loop {
                let message = tokio::select! {
                    // Denied while connected: the stream ends with why, no more assignments
                    // or secrets reach it, and its record goes so that its replicas move.
                    denied = &mut denied => {
                        tracing::warn!(node = %node, "node denied: ending its stream");
                        let _ = tx.send(Err(denied::refusal(&denied))).await;
                        store.revoke_lease(renewer.lease()).await;
                        break;
                    }
                    message = inbound.message() => message,
                };
                let message = match message {
                    Ok(Some(message)) => message,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::info!(node = %node, error = %e, "node stream broke");
                        break;
                    }
                };
                match message.kind {
                    Some(node_message::Kind::Heartbeat(_)) => {
                        record.last_seen = Some(now());
                        if let Err(e) = heartbeat(&store, &mut renewer, &record).await {
                            tracing::warn!(node = %node, error = %e, "cannot renew node lease");
                        }
                    }
                    Some(node_message::Kind::Report(report)) => {
                        status::apply_report(&store, &node, &report).await;
                    }
                    Some(node_message::Kind::Log(data)) => sessions.deliver(data).await,
                    Some(node_message::Kind::Hello(_)) | None => {}
                }
            }
            sessions.leave(&node, session);
            tracing::info!(node = %node, "node disconnected");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Renews the node's lease and record; a lease that expired (etcd was out of reach for longer
/// than its TTL) is replaced so that the node reappears.
async fn heartbeat(
    store: &Store,
    renewer: &mut berth_store::LeaseRenewer,
    record: &Node,
) -> Result<(), berth_store::StoreError> {
    match renewer.renew_within(RENEW_WITHIN).await {
        Ok(()) => {}
        Err(berth_store::StoreError::NotFound { .. }) => {
            let lease = store.grant_lease(NODE_LEASE_TTL.as_secs() as i64).await?;
            *renewer = store.lease_renewer(lease);
        }
        Err(e) => return Err(e),
    }
    store.put_node(record, renewer.lease()).await
}

fn node_record(hello: &Hello) -> Node {
    Node {
        name: hello.node.clone(),
        status: NodeStatus::Ready as i32,
        capacity: hello.capacity,
        labels: hello.labels.clone(),
        last_seen: Some(now()),
        version: hello.version.clone(),
        ..Default::default()
    }
}

/// Sends the node its full set of assignments once listed and after every change, until it
/// goes away. Level-based: each push is a fresh read, so changes that queue up meanwhile
/// make one push.
async fn push_assignments(
    store: Store,
    node: String,
    tx: mpsc::Sender<Result<ControlMessage, Status>>,
) {
    let mut changes = list_watch(&store, store.keys().node_assignments(&node));
    let mut listed = false;
    loop {
        let change = tokio::select! {
            _ = tx.closed() => return,
            change = changes.next() => change,
        };
        match change {
            Change::Init | Change::InitApply(_) => continue,
            Change::InitDone { .. } => listed = true,
            Change::Put(_) | Change::Delete(_) if !listed => continue,
            Change::Put(_) | Change::Delete(_) => {}
        }
        while changes.try_next().is_some() {}
        let (placements, revision) = loop {
            match store.list_placements(Some(&node)).await {
                Ok(listed) => break listed,
                Err(e) => {
                    tracing::warn!(node = %node, error = %e, "cannot read assignments");
                    tokio::select! {
                        _ = tx.closed() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        };
        let message = ControlMessage {
            kind: Some(control_message::Kind::Assignments(Assignments {
                version: revision as u64,
                replicas: placements.into_iter().map(|p| p.assignment).collect(),
            })),
        };
        if tx.send(Ok(message)).await.is_err() {
            return;
        }
    }
}
