//! Autoscaling in etcd: each gateway's load of each autoscaled agent at
//! `load/{agent}/{gateway}` (under the gateway's lease, so a gateway that goes away takes its
//! load with it), and the autoscaler's status of each agent at `autoscale/{agent}`.

use super::{Store, StoreError};
use berth_proto::v1::{AutoscaleStatus, GatewayLoad};
use etcd_client::{PutOptions, Txn, TxnOp};
use prost::Message;

impl Store {
    /// Writes gateway `gateway`'s `loads` (by agent) under `lease`, and deletes its reports of
    /// the agents in `gone`, in one transaction.
    pub async fn put_loads(
        &self,
        gateway: &str,
        loads: &[(String, GatewayLoad)],
        gone: &[String],
        lease: i64,
    ) -> Result<(), StoreError> {
        let ops: Vec<TxnOp> = loads
            .iter()
            .map(|(agent, load)| {
                TxnOp::put(
                    self.keys.load(agent, gateway),
                    load.encode_to_vec(),
                    Some(PutOptions::new().with_lease(lease)),
                )
            })
            .chain(
                gone.iter()
                    .map(|agent| TxnOp::delete(self.keys.load(agent, gateway), None)),
            )
            .collect();
        if ops.is_empty() {
            return Ok(());
        }
        self.client()
            .txn(Txn::new().and_then(ops))
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(())
    }

    /// The `(agent, gateway)` a load report's key names.
    pub fn load_of(&self, key: &[u8]) -> Option<(String, String)> {
        let key = std::str::from_utf8(key).ok()?;
        let rest = key.strip_prefix(self.keys.loads().as_str())?;
        let (agent, gateway) = rest.split_once('/')?;
        Some((agent.to_string(), gateway.to_string()))
    }

    /// Records the autoscaler's `status` of `agent`. A leader's write: fenced
    /// ([`Store::fenced`]).
    pub async fn put_autoscale_status(
        &self,
        agent: &str,
        status: &AutoscaleStatus,
    ) -> Result<(), StoreError> {
        let put = TxnOp::put(self.keys.autoscale(agent), status.encode_to_vec(), None);
        self.leader_txn(Vec::new(), vec![put]).await?;
        Ok(())
    }
}
