//! This gateway's load of each autoscaled agent, reported to etcd for the leader's autoscaler
//! (`load/{agent}/{gateway}`, under the gateway's lease): requests in flight, requests held
//! while the agent wakes, its queue as the replayer sees it, and requests received. Written
//! each second when it changed, and at once when a request finds an agent with no replica
//! ready (a wake).

use crate::metrics::{AgentLabels, GatewayMetrics};
use crate::replay::QueueStats;
use crate::routes::Routes;
use berth_proto::v1::GatewayLoad;
use berth_store::{LeaseRenewer, Store};
use prometheus_client::metrics::gauge::Gauge;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

/// Time between reports.
pub const REPORT_EVERY: Duration = Duration::from_secs(1);
/// Lifetime of the reports without renewal: a gateway gone this long no longer counts.
pub const LEASE_TTL: Duration = Duration::from_secs(10);
/// Time between lease renewals.
pub const RENEW_EVERY: Duration = Duration::from_secs(3);

/// One agent's counters at this gateway.
#[derive(Debug, Default)]
pub struct AgentLoad {
    in_flight: Gauge,
    held: Gauge,
    received: AtomicU64,
}

impl AgentLoad {
    /// Counts a request received.
    pub fn received(&self) {
        self.received.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request in flight to a replica until the guard is dropped.
    pub fn in_flight(&self) -> Counted {
        Counted::new(self.in_flight.clone())
    }
}

/// A count held up while it lives.
#[derive(Debug)]
pub struct Counted(Gauge);

impl Counted {
    fn new(gauge: Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The load of every autoscaled agent at this gateway.
pub struct Loads {
    agents: Mutex<HashMap<String, Arc<AgentLoad>>>,
    wake: Notify,
    metrics: Arc<GatewayMetrics>,
}

impl Loads {
    /// No load yet; held requests are also counted in `metrics`.
    pub fn new(metrics: Arc<GatewayMetrics>) -> Self {
        Self {
            agents: Mutex::default(),
            wake: Notify::new(),
            metrics,
        }
    }

    /// The counters of `agent`.
    pub fn of(&self, agent: &str) -> Arc<AgentLoad> {
        let mut agents = self.agents.lock().expect("loads lock");
        if let Some(load) = agents.get(agent) {
            return load.clone();
        }
        let labels = AgentLabels {
            agent: agent.to_string(),
        };
        let load = Arc::new(AgentLoad {
            held: self.metrics.held.get_or_create(&labels).clone(),
            ..Default::default()
        });
        agents.insert(agent.to_string(), load.clone());
        load
    }

    /// Counts a request of `agent` held for its wake until the guard is dropped, and reports
    /// at once, so that the autoscaler starts a replica now.
    pub fn hold(&self, agent: &str) -> Counted {
        let counted = Counted::new(self.of(agent).held.clone());
        self.wake.notify_one();
        counted
    }

    /// Reports at once (a request was queued for an agent with no replica ready).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Records the time from hold to answer of a woken request.
    pub fn woken(&self, agent: &str, took: Duration) {
        self.metrics
            .wake_seconds
            .get_or_create(&AgentLabels {
                agent: agent.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    fn report(&self, agent: &str, stats: &QueueStats) -> GatewayLoad {
        let load = self.of(agent);
        GatewayLoad {
            in_flight: load.in_flight.get().max(0) as u32,
            held: load.held.get().max(0) as u32,
            queued: stats.of(agent).0,
            received: load.received.load(Ordering::Relaxed),
        }
    }
}

/// Reports the load of every autoscaled agent in `routes` as gateway `gateway` until `stop`;
/// a stopping gateway gives its lease back, so its reports go at once.
pub async fn report(
    store: Store,
    gateway: String,
    routes: watch::Receiver<Arc<Routes>>,
    loads: Arc<Loads>,
    stats: Arc<QueueStats>,
    stop: CancellationToken,
) {
    let mut renewer: Option<LeaseRenewer> = None;
    let mut written: HashMap<String, GatewayLoad> = HashMap::new();
    let mut tick = tokio::time::interval(REPORT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut renew = tokio::time::interval(RENEW_EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                if let Some(r) = &renewer {
                    store.revoke_lease(r.lease()).await;
                }
                return;
            }
            _ = renew.tick() => {
                if let Some(r) = renewer.as_mut() {
                    // Bounded: a stream on a silent etcd member never answers, and the lease
                    // would lapse (the autoscaler losing this gateway's load) while it waits.
                    match r.renew_within(RENEW_EVERY).await {
                        Ok(()) => {}
                        // Ended: the reports go under a new lease.
                        Err(berth_store::StoreError::NotFound { .. }) => renewer = None,
                        // Renewed again next time, over a new stream.
                        Err(e) => tracing::warn!(error = %e, "cannot renew the load reports' lease"),
                    }
                }
                continue;
            }
            _ = tick.tick() => {}
            _ = loads.wake.notified() => {}
        }
        if renewer.is_none() {
            match store.grant_lease(LEASE_TTL.as_secs() as i64).await {
                Ok(lease) => renewer = Some(store.lease_renewer(lease)),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot report load");
                    continue;
                }
            }
            // A new lease: every report is written again under it.
            written.clear();
        }
        let autoscaled: Vec<String> = routes
            .borrow()
            .values()
            .filter(|r| r.autoscaled)
            .map(|r| r.agent.clone())
            .collect();
        let changed: Vec<(String, GatewayLoad)> = autoscaled
            .iter()
            .map(|agent| (agent.clone(), loads.report(agent, &stats)))
            .filter(|(agent, load)| written.get(agent) != Some(load))
            .collect();
        let gone: Vec<String> = written
            .keys()
            .filter(|agent| !autoscaled.contains(agent))
            .cloned()
            .collect();
        let lease = renewer.as_ref().expect("granted above").lease();
        match store.put_loads(&gateway, &changed, &gone, lease).await {
            Ok(()) => {
                for agent in &gone {
                    written.remove(agent);
                }
                written.extend(changed);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot report load");
                renewer = None;
            }
        }
    }
}
