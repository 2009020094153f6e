//! The node deny list as each control plane keeps it: mirrored from etcd by a watch, so that
//! a name denied through any control plane ends that node's stream here within a second.

use berth_proto::v1::DeniedNode;
use berth_store::watch::{list_watch, Change};
use berth_store::{Keys, Store};
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The denied node names, kept current from etcd by [`mirror`]. Every change bumps a
/// generation that [`DeniedNodes::denied`] waits on.
#[derive(Clone)]
pub struct DeniedNodes {
    names: Arc<RwLock<BTreeMap<String, DeniedNode>>>,
    generation: Arc<watch::Sender<u64>>,
    /// Whether the first listing has arrived (the list is not known before).
    listed: Arc<watch::Sender<bool>>,
}

impl Default for DeniedNodes {
    fn default() -> Self {
        Self {
            names: Arc::default(),
            generation: Arc::new(watch::channel(0).0),
            listed: Arc::new(watch::channel(false).0),
        }
    }
}

impl DeniedNodes {
    /// Whether `node` is denied, as last seen.
    pub fn get(&self, node: &str) -> Option<DeniedNode> {
        self.names
            .read()
            .expect("deny list lock")
            .get(node)
            .cloned()
    }

    /// The deny list, sorted by name, once it has been listed from etcd.
    pub async fn list(&self) -> Vec<DeniedNode> {
        let _ = self.listed.subscribe().wait_for(|listed| *listed).await;
        self.names
            .read()
            .expect("deny list lock")
            .values()
            .cloned()
            .collect()
    }

    /// Completes once `node` is denied (at once if it is): what its open stream waits on.
    pub fn denied(
        &self,
        node: &str,
    ) -> impl std::future::Future<Output = DeniedNode> + Send + 'static {
        let (list, node) = (self.clone(), node.to_string());
        let mut changes = self.generation.subscribe();
        async move {
            loop {
                if let Some(denied) = list.get(&node) {
                    return denied;
                }
                if changes.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        }
    }

    fn update(&self, change: impl FnOnce(&mut BTreeMap<String, DeniedNode>)) {
        change(&mut self.names.write().expect("deny list lock"));
        self.generation.send_modify(|g| *g += 1);
    }
}

/// Keeps `denied` equal to the deny list in etcd until `stop` is cancelled.
pub async fn mirror(store: Store, denied: DeniedNodes, stop: CancellationToken) {
    use prost::Message;
    let decode = |kv: &etcd_client::KeyValue| DeniedNode::decode(kv.value()).ok();
    let mut changes = list_watch(&store, store.keys().denied_nodes());
    let mut listed = BTreeMap::new();
    loop {
        let change = tokio::select! {
            _ = stop.cancelled() => return,
            change = changes.next() => change,
        };
        match change {
            Change::Init => listed.clear(),
            Change::InitApply(kv) => {
                if let Some(node) = decode(&kv) {
                    listed.insert(node.name.clone(), node);
                }
            }
            Change::InitDone { .. } => {
                let all = std::mem::take(&mut listed);
                denied.update(|names| *names = all);
                denied.listed.send_replace(true);
            }
            Change::Put(kv) => {
                if let Some(node) = decode(&kv) {
                    denied.update(|names| {
                        names.insert(node.name.clone(), node);
                    });
                }
            }
            Change::Delete(kv) => {
                let name = Keys::last_segment(kv.key());
                denied.update(|names| {
                    names.remove(&name);
                });
            }
        }
    }
}

/// The status a denied node's stream is refused or ended with.
pub fn refusal(denied: &DeniedNode) -> tonic::Status {
    let reason = match denied.reason.as_str() {
        "" => String::new(),
        reason => format!(": {reason}"),
    };
    tonic::Status::permission_denied(format!(
        "node {} is denied (`berth allow {}` lifts it){reason}",
        denied.name, denied.name
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[test]
    fn a_stream_waits_for_its_own_node_to_be_denied() {
        let list = DeniedNodes::default();
        let mut n1 = Box::pin(list.denied("n1"));
        list.update(|names| {
            names.insert(
                "n2".into(),
                DeniedNode {
                    name: "n2".into(),
                    ..Default::default()
                },
            );
        });
        assert!((&mut n1).now_or_never().is_none(), "another node's deny");
        list.update(|names| {
            names.insert(
                "n1".into(),
                DeniedNode {
                    name: "n1".into(),
                    reason: "lost".into(),
                    ..Default::default()
                },
            );
        });
        let denied = n1.now_or_never().expect("denied");
        assert_eq!(denied.reason, "lost");
        assert!(
            list.denied("n1").now_or_never().is_some(),
            "at once when already denied"
        );
        assert!(refusal(&denied).message().contains("berth allow n1"));
    }
}
