//! The gateway's routing table: every agent's token, timeout and ready replicas, kept current by
//! a watch on the agents' specs and statuses in etcd (never by polling). The table is published
//! through a `tokio::sync::watch`; request handlers read the latest value.

use super::breaker::BreakerConfig;
use berth_proto::defaults;
use berth_proto::v1::{Agent, NodeStatus};
use berth_store::watch::{list_watch, Change};
use berth_store::{Keys, Store, StoreError};
use prost::Message;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Wait before re-listing after etcd failed.
pub const RELIST_RETRY: Duration = Duration::from_secs(1);

/// Most requests replayed at once for an autoscaled agent (target concurrency × ready
/// replicas, at least its replay concurrency).
pub const MAX_AUTOSCALED_REPLAY: usize = 1024;

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
    /// The agent is autoscaled: the gateway reports its load, and holds a request that finds
    /// no replica ready while one is started.
    pub autoscaled: bool,
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

/// A route of agent `a` over `replicas` at `{replica}:80`, with default settings and a 1 s
/// timeout, for unit tests.
#[cfg(test)]
pub(crate) fn test_route(replicas: &[&str]) -> Route {
    Route {
        agent: "a".into(),
        token_sha256: String::new(),
        timeout: Duration::from_secs(1),
        breaker: BreakerConfig::default(),
        replay: ReplayConfig::default(),
        replicas: replicas
            .iter()
            .map(|r| Endpoint {
                replica: r.to_string(),
                address: format!("{r}:80"),
            })
            .collect(),
        autoscaled: false,
    }
}

/// Every agent's route.
pub type Routes = HashMap<String, Arc<Route>>;

impl Route {
    /// The route of `agent`: its ready replicas that have an address and run on a ready node
    /// (a node silent for 10 s is unknown, and its replicas leave the pool).
    pub fn of(agent: &Agent, ready_nodes: &HashSet<String>) -> Option<Self> {
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
            .filter(|r| r.ready && !r.address.is_empty() && ready_nodes.contains(&r.node))
            .map(|r| Endpoint {
                replica: r.replica.clone(),
                address: r.address.clone(),
            })
            .collect();
        replicas.sort_by(|a, b| a.replica.cmp(&b.replica));
        let mut replay = ReplayConfig::from_spec(spec.replay.as_ref());
        if let Some(autoscale) = &spec.autoscale {
            // An autoscaled agent's queue (the requests held for its wake among them) drains
            // at the pace its replicas are sized for; 1 keeps its strict order.
            if replay.concurrency > 1 {
                let sized = autoscale.target_concurrency as usize * replicas.len();
                replay.concurrency = replay
                    .concurrency
                    .max(sized.min(MAX_AUTOSCALED_REPLAY) as u32);
            }
        }
        Some(Self {
            agent: spec.name.clone(),
            token_sha256: spec.gateway_token_sha256.clone(),
            timeout,
            breaker: BreakerConfig::from_spec(spec.breaker.as_ref()),
            replay,
            replicas,
            // A stopped or paused agent is not woken: its requests wait in the queue.
            autoscaled: spec.autoscale.is_some() && agent.wants_running(),
        })
    }
}

/// Keeps `routes` current until `stop` is cancelled or the receivers are gone, from three
/// list-watches (specs, statuses, nodes). The first table is published, and `ready` set, once
/// all three are listed. Level-based: whatever changed of an agent, its current value is read.
pub async fn follow(
    store: Store,
    routes: watch::Sender<Arc<Routes>>,
    ready: watch::Sender<bool>,
    stop: CancellationToken,
) {
    let mut specs = list_watch(&store, store.keys().agents());
    let mut statuses = list_watch(&store, store.keys().statuses());
    let mut nodes = list_watch(&store, store.keys().nodes());
    let mut known: HashMap<String, Agent> = HashMap::new();
    let mut ready_nodes: HashSet<String> = HashSet::new();
    // Listed: specs, statuses, nodes. An agent list is read whole once specs and statuses
    // are both listed (after a start or a compaction); until then changes wait.
    let mut listed = [false; 3];
    let mut relist = true;
    loop {
        let changed_agent = tokio::select! {
            _ = stop.cancelled() => return,
            _ = routes.closed() => return,
            change = specs.next() => agent_change(change, &mut listed[0], &mut relist),
            change = statuses.next() => agent_change(change, &mut listed[1], &mut relist),
            change = nodes.next() => {
                match change {
                    Change::Init => {
                        listed[2] = false;
                        ready_nodes.clear();
                    }
                    Change::InitApply(kv) | Change::Put(kv) => {
                        let name = Keys::last_segment(kv.key());
                        match berth_proto::v1::Node::decode(kv.value()) {
                            Ok(node) if node.status == NodeStatus::Ready as i32 => ready_nodes.insert(name),
                            _ => ready_nodes.remove(&name),
                        };
                    }
                    Change::Delete(kv) => {
                        ready_nodes.remove(&Keys::last_segment(kv.key()));
                    }
                    Change::InitDone { .. } => listed[2] = true,
                }
                None
            }
        };
        if !(listed[0] && listed[1]) {
            continue;
        }
        if relist {
            match store.list_agents().await {
                Ok((agents, revision)) => {
                    known = agents
                        .into_iter()
                        .filter_map(|a| Some((a.spec.as_ref()?.name.clone(), a)))
                        .collect();
                    relist = false;
                    tracing::info!(agents = known.len(), revision, "routes listed");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list agents; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(RELIST_RETRY) => {}
                    }
                    continue;
                }
            }
        } else if let Some(name) = changed_agent {
            match store.get_agent(&name).await {
                Ok(agent) => known.insert(name, agent),
                Err(StoreError::NotFound { .. }) => known.remove(&name),
                Err(e) => {
                    tracing::warn!(agent = %name, error = %e, "cannot read agent; re-listing");
                    relist = true;
                    continue;
                }
            };
        }
        if listed[2] {
            publish(&routes, &known, &ready_nodes);
            ready.send_if_modified(|ready| !std::mem::replace(ready, true));
        }
    }
}

/// What a change under the specs or statuses prefix means for the table: the agent whose
/// value to read again, or a whole re-list (`relist`) when a list starts.
fn agent_change(change: Change, listed: &mut bool, relist: &mut bool) -> Option<String> {
    match change {
        Change::Init => {
            *listed = false;
            *relist = true;
            None
        }
        Change::InitApply(_) => None,
        Change::InitDone { .. } => {
            *listed = true;
            None
        }
        Change::Put(kv) | Change::Delete(kv) => Some(Keys::last_segment(kv.key())),
    }
}

/// Sends the routes of `agents` over `ready_nodes`, if they changed.
fn publish(
    routes: &watch::Sender<Arc<Routes>>,
    agents: &HashMap<String, Agent>,
    ready_nodes: &HashSet<String>,
) {
    let table: Routes = agents
        .values()
        .filter_map(|a| Route::of(a, ready_nodes))
        .map(|r| {
            // Keep the old Arc when nothing changed, so pools see no change.
            let current = routes.borrow().get(&r.agent).cloned();
            match current {
                Some(old) if *old == r => (r.agent.clone(), old),
                _ => (r.agent.clone(), Arc::new(r)),
            }
        })
        .collect();
    routes.send_if_modified(|current| {
        let same = current.len() == table.len()
            && table
                .iter()
                .all(|(k, v)| current.get(k).is_some_and(|c| Arc::ptr_eq(c, v)));
        if same {
            return false;
        }
        *current = Arc::new(table);
        true
    });
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
            node: if id == "a-4" {
                "n2".into()
            } else {
                "n1".into()
            },
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
                    replica("a-4", true, "10.0.0.5:8080"), // on n2, which is not ready
                ],
                ..Default::default()
            }),
            meta: None,
        };
        let ready_nodes: HashSet<String> = ["n1".to_string()].into();
        let route = Route::of(&agent, &ready_nodes).unwrap();
        let ids: Vec<_> = route.replicas.iter().map(|e| e.replica.as_str()).collect();
        assert_eq!(ids, ["a-0", "a-1"]);
        assert_eq!(route.timeout, defaults::REQUEST_TIMEOUT);
        assert_eq!(route.token_sha256, "ab");
        assert!(!route.autoscaled);
        assert_eq!(route.replay.concurrency, defaults::REPLAY_CONCURRENCY);

        // Autoscaled: its queue drains at target concurrency × ready replicas (here 2 × 10),
        // unless it asked for strict order; stopped, it is not woken.
        let mut autoscaled = agent.clone();
        let spec = autoscaled.spec.as_mut().unwrap();
        spec.autoscale = Some(berth_proto::v1::AutoscaleSettings {
            target_concurrency: 10,
            ..Default::default()
        });
        let route = Route::of(&autoscaled, &ready_nodes).unwrap();
        assert!(route.autoscaled);
        assert_eq!(route.replay.concurrency, 20);
        let spec = autoscaled.spec.as_mut().unwrap();
        spec.replay = Some(berth_proto::v1::ReplaySettings {
            concurrency: 1,
            ..Default::default()
        });
        assert_eq!(
            Route::of(&autoscaled, &ready_nodes)
                .unwrap()
                .replay
                .concurrency,
            1
        );
        autoscaled.meta = Some(berth_proto::v1::AgentMeta {
            desired_state: berth_proto::v1::DesiredState::Stopped as i32,
            ..Default::default()
        });
        assert!(!Route::of(&autoscaled, &ready_nodes).unwrap().autoscaled);
    }
}
