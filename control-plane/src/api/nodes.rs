//! `berth.v1.NodeService`: the fleet as operators see it, cordoning and draining.

use super::to_status;
use crate::nodes::denied::DeniedNodes;
use crate::nodes::placement::pinned;
use berth_proto::v1::node_service_server::NodeService;
use berth_proto::v1::{
    DeniedNode, DenyNodeRequest, GetNodeRequest, ListDeniedNodesRequest, ListDeniedNodesResponse,
    ListNodesRequest, ListNodesResponse, Node, NodeActionRequest, NodeStatus, Resources,
};
use berth_proto::validate;
use berth_store::{Cordon, Placement, Store};
use std::collections::BTreeMap;
use tonic::{Request, Response, Status};

/// Serves `NodeService`.
#[derive(Clone)]
pub struct NodeApi {
    store: Store,
    denied: DeniedNodes,
}

/// Bytes of a deny's reason.
pub const MAX_DENY_REASON_BYTES: usize = 256;

impl NodeApi {
    /// The service over `store`, listing the deny list from `denied`.
    pub fn new(store: Store, denied: DeniedNodes) -> Self {
        Self { store, denied }
    }

    /// Every node: those with a record (ready or unknown), and those that still have
    /// placements but no record (down), with what is placed on each.
    async fn nodes(&self) -> Result<Vec<Node>, Status> {
        let records = self
            .store
            .list_nodes()
            .await
            .map_err(|e| to_status(e.into()))?;
        let cordoned = self
            .store
            .cordoned()
            .await
            .map_err(|e| to_status(e.into()))?;
        let (placements, _) = self
            .store
            .list_placements(None)
            .await
            .map_err(|e| to_status(e.into()))?;
        let mut nodes: BTreeMap<String, Node> =
            records.into_iter().map(|n| (n.name.clone(), n)).collect();
        for p in &placements {
            let node = nodes.entry(p.node.clone()).or_insert_with(|| Node {
                name: p.node.clone(),
                status: NodeStatus::Down as i32,
                ..Default::default()
            });
            add(node, p);
        }
        for (name, draining) in cordoned {
            if let Some(node) = nodes.get_mut(&name) {
                node.cordoned = true;
                // A drain is done once nothing that can move is left on the node.
                node.draining = draining
                    && placements
                        .iter()
                        .any(|p| p.node == name && !p.assignment.spec.as_ref().is_some_and(pinned));
            }
        }
        Ok(nodes.into_values().collect())
    }

    /// Cordons, drains or uncordons `name`; the node as it now stands.
    async fn set_cordon(&self, name: &str, cordon: Cordon) -> Result<Response<Node>, Status> {
        self.one(name).await?;
        self.store
            .set_cordon(name, cordon)
            .await
            .map_err(|e| to_status(e.into()))?;
        tracing::info!(node = %name, ?cordon, "cordon changed");
        Ok(Response::new(self.one(name).await?))
    }

    async fn one(&self, name: &str) -> Result<Node, Status> {
        validate::dns_label("name", name).map_err(|e| to_status(e.into()))?;
        self.nodes()
            .await?
            .into_iter()
            .find(|n| n.name == name)
            .ok_or_else(|| Status::not_found(format!("node {name} not found")))
    }
}

/// Counts a placement against its node.
fn add(node: &mut Node, p: &Placement) {
    node.replicas += 1;
    let limits = p
        .assignment
        .spec
        .as_ref()
        .and_then(|s| s.resources)
        .unwrap_or_default();
    let allocated = node.allocated.get_or_insert_with(Resources::default);
    allocated.cpu_millis += limits.cpu_millis;
    allocated.memory_bytes += limits.memory_bytes;
}

#[tonic::async_trait]
impl NodeService for NodeApi {
    async fn list_nodes(
        &self,
        _: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        Ok(Response::new(ListNodesResponse {
            nodes: self.nodes().await?,
        }))
    }

    async fn get_node(&self, request: Request<GetNodeRequest>) -> Result<Response<Node>, Status> {
        Ok(Response::new(self.one(&request.into_inner().name).await?))
    }

    async fn cordon_node(
        &self,
        request: Request<NodeActionRequest>,
    ) -> Result<Response<Node>, Status> {
        self.set_cordon(&request.into_inner().name, Cordon::Cordoned)
            .await
    }

    async fn uncordon_node(
        &self,
        request: Request<NodeActionRequest>,
    ) -> Result<Response<Node>, Status> {
        self.set_cordon(&request.into_inner().name, Cordon::Schedulable)
            .await
    }

    async fn drain_node(
        &self,
        request: Request<NodeActionRequest>,
    ) -> Result<Response<Node>, Status> {
        self.set_cordon(&request.into_inner().name, Cordon::Draining)
            .await
    }

    async fn deny_node(
        &self,
        request: Request<DenyNodeRequest>,
    ) -> Result<Response<DeniedNode>, Status> {
        let request = request.into_inner();
        validate::dns_label("name", &request.name).map_err(|e| to_status(e.into()))?;
        if request.reason.len() > MAX_DENY_REASON_BYTES {
            return Err(Status::invalid_argument(format!(
                "reason: {} bytes, more than {MAX_DENY_REASON_BYTES}",
                request.reason.len()
            )));
        }
        let denied = DeniedNode {
            name: request.name,
            reason: request.reason,
            since: Some(berth_proto::time::now()),
        };
        self.store
            .deny_node(&denied)
            .await
            .map_err(|e| to_status(e.into()))?;
        tracing::warn!(node = %denied.name, reason = %denied.reason, "node denied");
        Ok(Response::new(denied))
    }

    async fn allow_node(
        &self,
        request: Request<NodeActionRequest>,
    ) -> Result<Response<DeniedNode>, Status> {
        let name = request.into_inner().name;
        validate::dns_label("name", &name).map_err(|e| to_status(e.into()))?;
        let allowed = self
            .store
            .allow_node(&name)
            .await
            .map_err(|e| to_status(e.into()))?
            .ok_or_else(|| Status::not_found(format!("node {name} is not denied")))?;
        tracing::info!(node = %name, "node allowed again");
        Ok(Response::new(allowed))
    }

    async fn list_denied_nodes(
        &self,
        _: Request<ListDeniedNodesRequest>,
    ) -> Result<Response<ListDeniedNodesResponse>, Status> {
        Ok(Response::new(ListDeniedNodesResponse {
            nodes: self.denied.list().await,
        }))
    }
}
