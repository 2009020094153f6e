//! The gateway's routing table: every agent's token, timeout and ready replicas, kept current by
//! a watch on the agents' specs and statuses in etcd (never by polling). The table is published
//! through a `tokio::sync::watch`; request handlers read the latest value.

use super::breaker::BreakerConfig;
use crate::defaults;
use crate::store::watch::{watch_prefix, WatchMessage};
use crate::store::{Keys, Store, StoreError};
use berth_proto::v1::Agent;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Wait before re-listing after etcd failed.
pub const RELIST_RETRY: Duration = Duration::from_secs(1);

/// Where and how to reach one agent.
#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    /// The agent's name.
    pub agent: String,
    /// Hex SHA-256 of the gateway token the agent requires, empty when none.
    pub token_sha256: String,
    /// How long a replica may take to start answering.
    pub timeout: Duration,
    /// The per-replica breakers' settings.
    pub breaker: BreakerConfig,
    /// The replay queue's settings.
    pub replay: ReplayConfig,
    /// The replicas ready for traffic, by replica id.
    pub replicas: Vec<Endpoint>,
}

/// A ready replica.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// The replica id, e.g. `hello-0`.
    pub replica: String,
    /// `ip:port`.
    pub address: String,
}

/// An agent's replay settings, defaults where unset.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ReplayConfig {
    /// Requests the agent cannot take fail at once instead of queueing.
    pub disabled: bool,
    /// Largest body buffered (and so replayable).
    pub max_body_bytes: u64,
    /// Most requests queued.
    pub max_queued: u32,
    /// Most bytes queued.
    pub max_queued_bytes: u64,
    /// Deliveries tried before dead-lettering.
    pub max_attempts: u32,
    /// How long queued requests and stored answers are kept.
    pub ttl: Duration,
    /// Requests replayed at once; 1 keeps FIFO order.
    pub concurrency: u32,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        Self {
            disabled: false,
            max_body_bytes: defaults::REPLAY_MAX_BODY_BYTES,
            max_queued: defaults::REPLAY_MAX_QUEUED,
            max_queued_bytes: defaults::REPLAY_MAX_QUEUED_BYTES,
            max_attempts: defaults::REPLAY_MAX_ATTEMPTS,
            ttl: defaults::REPLAY_TTL,
            concurrency: defaults::REPLAY_CONCURRENCY,
        }
    }
}

impl ReplayConfig {
    /// The spec's settings.
    pub fn from_spec(settings: Option<&berth_proto::v1::ReplaySettings>) -> Self {
        let d = Self::default();
        let Some(s) = settings else { return d };
        let or = |v: u64, default: u64| if v == 0 { default } else { v };
        Self {
            disabled: s.disabled,
            max_body_bytes: or(s.max_body_bytes, d.max_body_bytes),
            max_queued: or(s.max_queued.into(), d.max_queued.into()) as u32,
            max_queued_bytes: or(s.max_queued_bytes, d.max_queued_bytes),
            max_attempts: or(s.max_attempts.into(), d.max_attempts.into()) as u32,
            ttl: s
                .ttl
                .map(|t| Duration::new(t.seconds.max(0) as u64, 0))
                .filter(|t| !t.is_zero())
                .unwrap_or(d.ttl),
            concurrency: or(s.concurrency.into(), d.concurrency.into()) as u32,
        }
    }
}

/// Every agent's route.
pub type Routes = HashMap<String, Arc<Route>>;

impl Route {
    /// The route of `agent`: its ready replicas that have an address.
    pub fn of(agent: &Agent) -> Option<Self> {
        let spec = agent.spec.as_ref()?;
        let timeout = spec
            .request_timeout
            .map(|d| Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32))
            .filter(|d| !d.is_zero())
            .unwrap_or(defaults::REQUEST_TIMEOUT);
        let mut replicas: Vec<Endpoint> = agent
            .status
            .iter()
            .flat_map(|s| &s.replicas)
            .filter(|r| r.ready && !r.address.is_empty())
            .map(|r| Endpoint {
                replica: r.replica.clone(),
                address: r.address.clone(),
            })
            .collect();
        replicas.sort_by(|a, b| a.replica.cmp(&b.replica));
        Some(Self {
            agent: spec.name.clone(),
            token_sha256: spec.gateway_token_sha256.clone(),
            timeout,
            breaker: BreakerConfig::from_spec(spec.breaker.as_ref()),
            replay: ReplayConfig::from_spec(spec.replay.as_ref()),
            replicas,
        })
    }
}

/// Keeps `routes` current until the receivers are gone. Lists, then watches specs and statuses
/// from the list's revision; re-lists after compaction or when a watch ends.
pub async fn follow(store: Store, routes: watch::Sender<Arc<Routes>>, ready: watch::Sender<bool>) {
    loop {
        let (agents, revision) = match store.list_agents().await {
            Ok(listed) => listed,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list agents; retrying");
                tokio::time::sleep(RELIST_RETRY).await;
                continue;
            }
        };
        let table: Routes = agents
            .iter()
            .filter_map(Route::of)
            .map(|r| (r.agent.clone(), Arc::new(r)))
            .collect();
        tracing::info!(agents = table.len(), revision, "routes listed");
        routes.send_replace(Arc::new(table));
        ready.send_replace(true);
        let mut specs = watch_prefix(&store, store.keys().agents(), revision + 1);
        let mut statuses = watch_prefix(&store, store.keys().statuses(), revision + 1);
        loop {
            let change = tokio::select! {
                _ = routes.closed() => return,
                change = specs.recv() => change,
                change = statuses.recv() => change,
            };
            let name = match change {
                Some(WatchMessage::Put(kv) | WatchMessage::Delete(kv)) => {
                    Keys::last_segment(kv.key())
                }
                // Compacted, or a watch ended: start over from a fresh list.
                Some(WatchMessage::Compacted) | None => break,
            };
            if let Err(e) = refresh(&store, &routes, &name).await {
                tracing::warn!(agent = %name, error = %e, "cannot read agent; re-listing");
                break;
            }
        }
    }
}

/// Re-reads one agent (level-based: whatever changed, the current value is what counts).
async fn refresh(
    store: &Store,
    routes: &watch::Sender<Arc<Routes>>,
    name: &str,
) -> Result<(), StoreError> {
    let route = match store.get_agent(name).await {
        Ok(agent) => Route::of(&agent),
        Err(StoreError::NotFound { .. }) => None,
        Err(e) => return Err(e),
    };
    routes.send_if_modified(|table| {
        let current = table.get(name);
        if current.map(|r| r.as_ref()) == route.as_ref() {
            return false;
        }
        let mut next = table.as_ref().clone();
        match route {
            Some(route) => next.insert(name.to_string(), Arc::new(route)),
            None => next.remove(name),
        };
        *table = Arc::new(next);
        true
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_proto::v1::{AgentSpec, AgentStatus, ReplicaStatus};

    #[test]
    fn only_ready_replicas_with_an_address_take_traffic() {
        let replica = |id: &str, ready: bool, address: &str| ReplicaStatus {
            replica: id.into(),
            ready,
            address: address.into(),
            ..Default::default()
        };
        let agent = Agent {
            spec: Some(AgentSpec {
                name: "a".into(),
                gateway_token_sha256: "ab".into(),
                ..Default::default()
            }),
            status: Some(AgentStatus {
                replicas: vec![
                    replica("a-1", true, "10.0.0.2:8080"),
                    replica("a-0", true, "10.0.0.1:8080"),
                    replica("a-2", false, "10.0.0.3:8080"),
                    replica("a-3", true, ""),
                ],
                ..Default::default()
            }),
            meta: None,
        };
        let route = Route::of(&agent).unwrap();
        let ids: Vec<_> = route.replicas.iter().map(|e| e.replica.as_str()).collect();
        assert_eq!(ids, ["a-0", "a-1"]);
        assert_eq!(route.timeout, defaults::REQUEST_TIMEOUT);
        assert_eq!(route.token_sha256, "ab");
    }
}
