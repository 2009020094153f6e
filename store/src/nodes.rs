//! Nodes and placements: node records tied to a session lease, assignments per node, and the
//! observed status that node reports feed.

use super::{decode, Store, StoreError};
use berth_proto::v1::{AgentStatus, Assignment, DeniedNode, Node};
use etcd_client::{
    Compare, CompareOp, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp,
};
use prost::Message;
use std::collections::BTreeMap;

/// The value of a cordon key that also drains the node.
const DRAIN: &str = "drain";

/// Whether new replicas may go to a node, and whether its replicas should move away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cordon {
    /// New replicas may be placed on it.
    Schedulable,
    /// Nothing new is placed on it; what runs there stays.
    Cordoned,
    /// Cordoned, and each of its replicas is replaced elsewhere (the replacement ready
    /// before the old one stops).
    Draining,
}

/// Operations per etcd transaction (etcd refuses more than 128 by default).
const MAX_TXN_OPS: usize = 100;

/// Compare-and-swap attempts of a status update before it gives up.
const MAX_STATUS_ATTEMPTS: usize = 10;

/// One stored placement.
#[derive(Clone, Debug, PartialEq)]
pub struct Placement {
    /// The node it is placed on.
    pub node: String,
    /// What the node should run.
    pub assignment: Assignment,
}

/// Renews one lease over a single keep-alive stream, reopened only when it breaks.
pub struct LeaseRenewer {
    store: Store,
    lease: i64,
    stream: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
}

impl LeaseRenewer {
    /// The lease renewed.
    pub fn lease(&self) -> i64 {
        self.lease
    }

    /// Renews the lease once. [`StoreError::NotFound`] means it has already expired.
    pub async fn renew(&mut self) -> Result<(), StoreError> {
        let result = self.try_renew().await;
        if result.is_err() {
            self.stream = None;
        }
        result
    }

    /// Renews the lease once, giving up after `within`. The keep-alive stream is opened again
    /// at the next renewal after a failure or a renewal that did not finish in time (a stream
    /// to an etcd that was stopped or restarted may never answer).
    pub async fn renew_within(&mut self, within: std::time::Duration) -> Result<(), StoreError> {
        match tokio::time::timeout(within, self.renew()).await {
            Ok(renewed) => renewed,
            Err(_) => {
                self.stream = None;
                Err(self
                    .store
                    .unavailable(etcd_client::Error::LeaseKeepAliveError(format!(
                        "no answer to a renewal within {within:?}"
                    ))))
            }
        }
    }

    /// The lease has expired (or was revoked).
    fn gone(&self) -> StoreError {
        StoreError::NotFound {
            kind: "lease",
            name: format!("{:x}", self.lease),
        }
    }

    async fn try_renew(&mut self) -> Result<(), StoreError> {
        if self.stream.is_none() {
            // Opening the stream for a lease that is gone fails (the client reads etcd's first
            // answer, TTL 0, as an error): the lease has expired, as below, and no retry can
            // bring it back, so it is not told as etcd out of reach (after etcd stood still
            // past a node's lease, the node session would renew in vain and its node stay down).
            let opened = match self.store.client().lease_keep_alive(self.lease).await {
                Ok(opened) => opened,
                Err(e) if lease_gone(&e) => return Err(self.gone()),
                Err(e) => return Err(self.store.unavailable(e)),
            };
            self.stream = Some(opened);
        }
        let (keeper, responses) = self.stream.as_mut().expect("opened above");
        keeper
            .keep_alive()
            .await
            .map_err(|e| self.store.unavailable(e))?;
        let response = responses
            .message()
            .await
            .map_err(|e| self.store.unavailable(e))?;
        match response {
            Some(r) if r.ttl() > 0 => Ok(()),
            Some(_) => Err(self.gone()),
            None => Err(self
                .store
                .unavailable(etcd_client::Error::LeaseKeepAliveError(
                    "the keep-alive stream closed".into(),
                ))),
        }
    }
}

/// Whether opening a keep-alive stream failed because the lease no longer exists.
fn lease_gone(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::LeaseKeepAliveError(m) if m.contains("lease not found"))
}

impl Store {
    /// Grants a lease of `ttl` seconds for a node session.
    pub async fn grant_lease(&self, ttl: i64) -> Result<i64, StoreError> {
        let lease = self
            .client()
            .lease_grant(ttl, None)
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(lease.id())
    }

    /// A renewer of `lease` that keeps one keep-alive stream open across renewals.
    pub fn lease_renewer(&self, lease: i64) -> LeaseRenewer {
        LeaseRenewer {
            store: self.clone(),
            lease,
            stream: None,
        }
    }

    /// Cordons `node` (or drains it, or makes it schedulable again).
    pub async fn set_cordon(&self, node: &str, cordon: Cordon) -> Result<(), StoreError> {
        let key = self.keys.cordon(node);
        let result = match cordon {
            Cordon::Cordoned => self.client().put(key, "", None).await.map(drop),
            Cordon::Draining => self.client().put(key, DRAIN, None).await.map(drop),
            Cordon::Schedulable => self.client().delete(key, None).await.map(drop),
        };
        result.map_err(|e| self.unavailable(e))
    }

    /// The cordoned nodes, each with whether it is being drained.
    pub async fn cordoned(&self) -> Result<BTreeMap<String, bool>, StoreError> {
        let prefix = self.keys.cordons();
        let resp = self
            .client()
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(resp
            .kvs()
            .iter()
            .map(|kv| {
                (
                    super::Keys::last_segment(kv.key()),
                    kv.value() == DRAIN.as_bytes(),
                )
            })
            .collect())
    }

    /// Takes leadership for `identity` under `lease` if nobody holds it.
    pub async fn try_lead(&self, identity: &str, lease: i64) -> Result<bool, StoreError> {
        let key = self.keys.leader();
        let txn = crate::create_under_lease(&key, identity, lease);
        self.txn_succeeded(txn).await
    }

    /// Who leads now, if anyone.
    pub async fn leader(&self) -> Result<Option<String>, StoreError> {
        let resp = self
            .client()
            .get(self.keys.leader(), None)
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(crate::first_value(resp.kvs()))
    }

    /// Gives a lease back (best effort: it expires anyway).
    pub async fn revoke_lease(&self, lease: i64) {
        let _ = self.client().lease_revoke(lease).await;
    }

    /// Writes a node record attached to `lease`.
    pub async fn put_node(&self, node: &Node, lease: i64) -> Result<(), StoreError> {
        self.client()
            .put(
                self.keys.node(&node.name),
                node.encode_to_vec(),
                Some(PutOptions::new().with_lease(lease)),
            )
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(())
    }

    /// Puts `denied` on the deny list and removes the node's record (a session of the node
    /// that is still open renews nothing once it has ended).
    pub async fn deny_node(&self, denied: &DeniedNode) -> Result<(), StoreError> {
        let txn = Txn::new().and_then([
            TxnOp::put(
                self.keys.denied_node(&denied.name),
                denied.encode_to_vec(),
                None,
            ),
            TxnOp::delete(self.keys.node(&denied.name), None),
        ]);
        self.client()
            .txn(txn)
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(())
    }

    /// Takes `node` off the deny list; what was there, if it was.
    pub async fn allow_node(&self, node: &str) -> Result<Option<DeniedNode>, StoreError> {
        let key = self.keys.denied_node(node);
        let resp = self
            .client()
            .delete(
                key.as_str(),
                Some(etcd_client::DeleteOptions::new().with_prev_key()),
            )
            .await
            .map_err(|e| self.unavailable(e))?;
        resp.prev_kvs()
            .first()
            .map(|kv| decode(kv.key(), kv.value()))
            .transpose()
    }

    /// Whether `node` is denied, and since when and why.
    pub async fn node_denied(&self, node: &str) -> Result<Option<DeniedNode>, StoreError> {
        let key = self.keys.denied_node(node);
        let resp = self
            .client()
            .get(key.as_str(), None)
            .await
            .map_err(|e| self.unavailable(e))?;
        resp.kvs()
            .first()
            .map(|kv| decode(kv.key(), kv.value()))
            .transpose()
    }

    /// Every live node, sorted by name.
    pub async fn list_nodes(&self) -> Result<Vec<Node>, StoreError> {
        let records = self.list_node_records().await?;
        Ok(records.into_iter().map(|(node, _, _)| node).collect())
    }

    /// Marks `node` unknown (silent too long), unless it wrote since `revision`; its lease stays.
    /// A leader's write: fenced ([`Store::fenced`]).
    pub async fn mark_node_unknown(
        &self,
        node: &Node,
        revision: i64,
        lease: i64,
    ) -> Result<bool, StoreError> {
        let key = self.keys.node(&node.name);
        let mut marked = node.clone();
        marked.status = berth_proto::v1::NodeStatus::Unknown as i32;
        let compares = vec![Compare::mod_revision(
            key.as_str(),
            CompareOp::Equal,
            revision,
        )];
        let ops = vec![TxnOp::put(
            key.as_str(),
            marked.encode_to_vec(),
            Some(PutOptions::new().with_lease(lease)),
        )];
        self.leader_txn(compares, ops).await
    }

    /// Every live node with its key's revision and lease.
    pub async fn list_node_records(&self) -> Result<Vec<(Node, i64, i64)>, StoreError> {
        let resp = self
            .client()
            .get(self.keys.nodes(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.unavailable(e))?;
        resp.kvs()
            .iter()
            .map(|kv| Ok((decode(kv.key(), kv.value())?, kv.mod_revision(), kv.lease())))
            .collect()
    }

    /// Every placement, or only one node's, with the revision they were read at.
    pub async fn list_placements(
        &self,
        node: Option<&str>,
    ) -> Result<(Vec<Placement>, i64), StoreError> {
        let prefix = match node {
            Some(node) => self.keys.node_assignments(node),
            None => self.keys.assignments(),
        };
        let resp = self
            .client()
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.unavailable(e))?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or_default();
        let base = self.keys.assignments();
        let placements = resp
            .kvs()
            .iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(kv.key());
                let node = key
                    .strip_prefix(&base)
                    .and_then(|rest| rest.split('/').next())
                    .unwrap_or_default();
                Ok(Placement {
                    node: node.to_string(),
                    assignment: decode(kv.key(), kv.value())?,
                })
            })
            .collect::<Result<_, StoreError>>()?;
        Ok((placements, revision))
    }

    /// Writes placements in transactions of up to [`MAX_TXN_OPS`] puts: one round trip per
    /// batch instead of one per placement. A leader's write: fenced ([`Store::fenced`]).
    pub async fn put_placements(&self, placements: &[Placement]) -> Result<(), StoreError> {
        for batch in placements.chunks(MAX_TXN_OPS) {
            let ops: Vec<TxnOp> = batch
                .iter()
                .map(|p| {
                    let a = &p.assignment;
                    let agent = a.spec.as_ref().map(|s| s.name.as_str()).unwrap_or_default();
                    let key = self.keys.assignment(&p.node, agent, &a.replica);
                    TxnOp::put(key, a.encode_to_vec(), None)
                })
                .collect();
            self.leader_txn(Vec::new(), ops).await?;
        }
        Ok(())
    }

    /// Removes a placement. A leader's write: fenced ([`Store::fenced`]).
    pub async fn delete_placement(
        &self,
        node: &str,
        agent: &str,
        replica: &str,
    ) -> Result<(), StoreError> {
        let key = self.keys.assignment(node, agent, replica);
        self.leader_txn(Vec::new(), vec![TxnOp::delete(key, None)])
            .await?;
        Ok(())
    }

    /// Read-modify-write of an agent's observed status; a no-op when the agent is gone.
    /// `change` returns whether it changed anything.
    pub async fn update_status(
        &self,
        agent: &str,
        change: impl FnMut(&mut AgentStatus) -> bool,
    ) -> Result<(), StoreError> {
        self.update_status_while(agent, None, change).await
    }

    /// [`Store::update_status`] of what `node` reports about `replica`: written only while
    /// that replica is placed on that node, checked in the same transaction, so a report
    /// racing the replica's move or removal cannot bring its entry back.
    pub async fn update_replica_status(
        &self,
        agent: &str,
        node: &str,
        replica: &str,
        change: impl FnMut(&mut AgentStatus) -> bool,
    ) -> Result<(), StoreError> {
        let guard = self.keys.assignment(node, agent, replica);
        self.update_status_while(agent, Some(guard), change).await
    }

    async fn update_status_while(
        &self,
        agent: &str,
        guard: Option<String>,
        mut change: impl FnMut(&mut AgentStatus) -> bool,
    ) -> Result<(), StoreError> {
        let agent_key = self.keys.agent(agent);
        let key = self.keys.status(agent);
        for _ in 0..MAX_STATUS_ATTEMPTS {
            let resp = self
                .again_if_transient(|mut c| {
                    let key = key.clone();
                    async move { c.get(key, None).await }
                })
                .await?;
            let (mut status, revision) = match resp.kvs().first() {
                Some(kv) => (
                    decode::<AgentStatus>(kv.key(), kv.value())?,
                    kv.mod_revision(),
                ),
                None => (AgentStatus::default(), 0),
            };
            if !change(&mut status) {
                return Ok(());
            }
            let txn = Txn::new()
                .when(
                    [
                        Compare::mod_revision(key.as_str(), CompareOp::Equal, revision),
                        Compare::create_revision(agent_key.as_str(), CompareOp::Greater, 0),
                    ]
                    .into_iter()
                    .chain(
                        guard
                            .as_deref()
                            .map(|g| Compare::create_revision(g, CompareOp::Greater, 0)),
                    )
                    .collect::<Vec<_>>(),
                )
                .and_then([TxnOp::put(key.as_str(), status.encode_to_vec(), None)]);
            // Safe to send again: an attempt that was committed after all fails the compare.
            let resp = self
                .again_if_transient(|mut c| {
                    let txn = txn.clone();
                    async move { c.txn(txn).await }
                })
                .await?;
            if resp.succeeded() {
                return Ok(());
            }
            // Gone (the agent, or the placement that guards the write): nothing to write.
            for must_exist in [Some(agent_key.as_str()), guard.as_deref()]
                .into_iter()
                .flatten()
            {
                let count = self
                    .client()
                    .get(must_exist, Some(GetOptions::new().with_count_only()))
                    .await
                    .map_err(|e| self.unavailable(e))?
                    .count();
                if count == 0 {
                    return Ok(());
                }
            }
        }
        Err(StoreError::Conflict {
            kind: "status",
            name: agent.to_string(),
            current: "newer".into(),
        })
    }
}
