//! Breaker states published by gateways, so that `berth get` can show them: one key per
//! gateway and replica, attached to the gateway's lease, so a gateway that goes away takes
//! its view with it.

use super::{Store, StoreError};
use berth_proto::v1::BreakerState;
use etcd_client::GetOptions;
use std::collections::HashMap;

impl Store {
    /// Records gateway `gateway`'s breaker state of `replica`.
    pub async fn put_breaker(
        &self,
        agent: &str,
        replica: &str,
        gateway: &str,
        state: BreakerState,
        lease: i64,
    ) -> Result<(), StoreError> {
        let key = self.keys.breaker(agent, replica, gateway);
        self.client()
            .txn(crate::put_under_lease(key, state.as_str_name(), lease))
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(())
    }

    /// The worst breaker state any gateway reports for each replica of `agent`
    /// (open, then half-open, then closed).
    pub async fn breaker_states(
        &self,
        agent: &str,
    ) -> Result<HashMap<String, BreakerState>, StoreError> {
        let prefix = self.keys.agent_breakers(agent);
        let resp = self
            .client()
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.unavailable(e))?;
        let mut worst: HashMap<String, BreakerState> = HashMap::new();
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key());
            let Some(replica) = key
                .strip_prefix(prefix.as_str())
                .and_then(|rest| rest.split('/').next())
            else {
                continue;
            };
            let state = std::str::from_utf8(kv.value())
                .ok()
                .and_then(BreakerState::from_str_name)
                .unwrap_or(BreakerState::Unspecified);
            let entry = worst
                .entry(replica.to_string())
                .or_insert(BreakerState::Unspecified);
            if severity(state) > severity(*entry) {
                *entry = state;
            }
        }
        Ok(worst)
    }
}

fn severity(state: BreakerState) -> u8 {
    match state {
        BreakerState::Unspecified => 0,
        BreakerState::Closed => 1,
        BreakerState::HalfOpen => 2,
        BreakerState::Open => 3,
    }
}
