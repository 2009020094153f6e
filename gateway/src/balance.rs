//! The innermost service of an agent's stack: it picks a replica by the power of two choices
//! over the replicas whose breaker lets traffic through (fewest requests in flight wins), sends
//! the request with the agent's timeout, and tells the replica's breaker how it went.

use super::breaker::{Admission, Breaker, Outcome, Transition};
use super::error::GatewayError;
use super::forward::{Forward, Upstream};
use super::outcome::Ending;
use super::routes::{Endpoint, Route};
use axum::body::Body;
use futures::future::BoxFuture;
use http::Response;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::sync::mpsc;

/// A breaker change, reported to metrics and to the store.
#[derive(Clone, Debug)]
pub struct BreakerChange {
    /// The agent.
    pub agent: String,
    /// The replica.
    pub replica: String,
    /// What changed.
    pub transition: Transition,
}

/// Which replica answered; set on every response that came from a replica.
#[derive(Clone, Debug)]
pub struct ServedBy(pub String);

/// One replica as the balancer sees it.
#[derive(Debug)]
pub struct Replica {
    /// Where it is.
    pub endpoint: Endpoint,
    /// Its breaker.
    pub breaker: Breaker,
    outstanding: AtomicUsize,
}

impl Replica {
    /// Requests in flight at the replica now.
    #[cfg(test)]
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }
}

/// The current replicas and settings of one agent, shared by every request to it.
pub struct Pool {
    agent: String,
    state: Mutex<PoolState>,
    changes: mpsc::UnboundedSender<BreakerChange>,
}

struct PoolState {
    route: Arc<Route>,
    replicas: Arc<Vec<Arc<Replica>>>,
}

impl Pool {
    /// A pool for `route`; breaker changes go to `changes`.
    pub fn new(route: Arc<Route>, changes: mpsc::UnboundedSender<BreakerChange>) -> Self {
        let pool = Self {
            agent: route.agent.clone(),
            state: Mutex::new(PoolState {
                route: route.clone(),
                replicas: Arc::new(Vec::new()),
            }),
            changes,
        };
        pool.update(route);
        pool
    }

    /// Adopts a new route (replicas joined or left, settings changed). A replica that stays at
    /// the same address keeps its breaker and its in-flight count.
    pub fn update(&self, route: Arc<Route>) {
        let mut state = self.state.lock().expect("pool lock");
        if Arc::ptr_eq(&state.route, &route) && !state.replicas.is_empty() {
            return;
        }
        let same_breakers = state.route.breaker == route.breaker;
        let replicas = route
            .replicas
            .iter()
            .map(|endpoint| {
                state
                    .replicas
                    .iter()
                    .find(|r| &r.endpoint == endpoint && same_breakers)
                    .cloned()
                    .unwrap_or_else(|| {
                        Arc::new(Replica {
                            endpoint: endpoint.clone(),
                            breaker: Breaker::new(route.breaker),
                            outstanding: AtomicUsize::new(0),
                        })
                    })
            })
            .collect();
        state.replicas = Arc::new(replicas);
        state.route = route;
    }

    /// The replicas now.
    pub fn replicas(&self) -> Arc<Vec<Arc<Replica>>> {
        self.state.lock().expect("pool lock").replicas.clone()
    }

    fn snapshot(&self) -> (Arc<Route>, Arc<Vec<Arc<Replica>>>) {
        let state = self.state.lock().expect("pool lock");
        (state.route.clone(), state.replicas.clone())
    }

    fn report(&self, replica: &Replica, transition: Option<Transition>) {
        if let Some(transition) = transition {
            let _ = self.changes.send(BreakerChange {
                agent: self.agent.clone(),
                replica: replica.endpoint.replica.clone(),
                transition,
            });
        }
    }

    /// Whether a replica other than `tried` and `failed` could take a retry now.
    pub fn has_other(&self, tried: &[String], failed: &str) -> bool {
        let (_, replicas) = self.snapshot();
        replicas.iter().any(|r| {
            r.endpoint.replica != failed
                && !tried.contains(&r.endpoint.replica)
                && r.breaker.available()
        })
    }

    /// Picks a replica not in `tried` and gets it admitted by its breaker: two at random among
    /// those available, the one with fewer requests in flight first.
    fn pick(&self, tried: &[String]) -> Result<(Arc<Replica>, Admission), &'static str> {
        let (_, replicas) = self.snapshot();
        if replicas.is_empty() {
            return Err("none is ready");
        }
        let fresh: Vec<&Arc<Replica>> = replicas
            .iter()
            .filter(|r| !tried.contains(&r.endpoint.replica))
            .collect();
        if fresh.is_empty() {
            return Err("every ready replica was tried");
        }
        let mut candidates: Vec<&Arc<Replica>> = fresh
            .iter()
            .copied()
            .filter(|r| r.breaker.available())
            .collect();
        // Power of two choices: the better of two random candidates goes first; the rest
        // follow in case a breaker changed its mind since `available`.
        if candidates.len() >= 2 {
            let n = candidates.len();
            let a = rand::random_range(0..n);
            let b = (a + 1 + rand::random_range(0..n - 1)) % n;
            let load = |r: &Replica| r.outstanding.load(Ordering::Relaxed);
            let first = if load(candidates[b]) < load(candidates[a]) {
                b
            } else {
                a
            };
            candidates.swap(0, first);
        }
        for replica in candidates {
            let (admission, transition) = replica.breaker.admit();
            self.report(replica, transition);
            if let Some(admission) = admission {
                return Ok((replica.clone(), admission));
            }
        }
        // Let a half-open breaker whose probe is overdue reopen, so its state is current.
        for replica in fresh {
            let (_, transition) = replica.breaker.admit();
            self.report(replica, transition);
        }
        Err("the circuit breaker of every ready replica is open")
    }
}

/// Sends a request to one replica of the pool. Cloning is cheap.
#[derive(Clone)]
pub struct Balancer {
    pool: Arc<Pool>,
    upstream: Upstream,
}

impl Balancer {
    /// A balancer over `pool`, sending with `upstream`.
    pub fn new(pool: Arc<Pool>, upstream: Upstream) -> Self {
        Self { pool, upstream }
    }
}

/// Counts a request in flight at a replica for as long as it lives.
struct InFlight(Arc<Replica>);

impl InFlight {
    fn new(replica: Arc<Replica>) -> Self {
        replica.outstanding.fetch_add(1, Ordering::Relaxed);
        Self(replica)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

impl tower::Service<Forward> for Balancer {
    type Response = Response<Body>;
    type Error = GatewayError;
    type Future = BoxFuture<'static, Result<Response<Body>, GatewayError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Replica choice happens per request in `call`; capacity is the layers' business.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Forward) -> Self::Future {
        let pool = self.pool.clone();
        let upstream = self.upstream;
        Box::pin(async move {
            let (replica, admission) =
                pool.pick(&request.tried)
                    .map_err(|reason| GatewayError::NoReplica {
                        agent: request.agent.clone(),
                        reason,
                    })?;
            let (route, _) = pool.snapshot();
            // The timeout sits here, under the breaker's bookkeeping, so that a replica that
            // hangs counts as failing; a probe gets the shorter of its own and the agent's.
            let timeout = match admission {
                Admission::Normal => route.timeout,
                Admission::Probe => route.timeout.min(replica.breaker.config().probe_timeout),
            };
            let in_flight = InFlight::new(replica.clone());
            let agent = request.agent.clone();
            let id = replica.endpoint.replica.clone();
            let sent = tokio::time::timeout(
                timeout,
                upstream.send(&id, &replica.endpoint.address, request),
            )
            .await;
            drop(in_flight);
            let result = match sent {
                Ok(result) => result,
                Err(_) => Err(GatewayError::Timeout {
                    agent,
                    replica: id.clone(),
                    timeout,
                }),
            };
            let outcome = Outcome::from(Ending::of(&result));
            let transition = replica.breaker.record(admission, outcome);
            pool.report(&replica, transition);
            result.map(|mut response| {
                response.extensions_mut().insert(ServedBy(id));
                response
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::breaker::BreakerConfig;

    fn route(replicas: &[&str]) -> Arc<Route> {
        Arc::new(crate::routes::test_route(replicas))
    }

    fn pool(replicas: &[&str]) -> Pool {
        Pool::new(route(replicas), mpsc::unbounded_channel().0)
    }

    fn pool_with_two() -> Pool {
        pool(&["a-0", "a-1"])
    }

    #[test]
    fn the_less_loaded_of_two_wins() {
        let pool = pool(&["a-0", "a-1"]);
        let busy = pool.replicas()[0].clone();
        busy.outstanding.store(10, Ordering::Relaxed);
        for _ in 0..20 {
            let (picked, _) = pool.pick(&[]).unwrap();
            assert_eq!(picked.endpoint.replica, "a-1");
        }
    }

    #[test]
    fn load_spreads_over_equal_replicas() {
        let pool = pool(&["a-0", "a-1", "a-2"]);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..100 {
            seen.insert(pool.pick(&[]).unwrap().0.endpoint.replica.clone());
        }
        assert_eq!(seen.len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn tried_and_open_replicas_are_skipped() {
        let pool = pool(&["a-0", "a-1"]);
        let (picked, _) = pool.pick(&["a-0".to_string()]).unwrap();
        assert_eq!(picked.endpoint.replica, "a-1");
        let a1 = pool.replicas()[1].clone();
        for _ in 0..BreakerConfig::default().failures_to_open {
            a1.breaker.record(Admission::Normal, Outcome::Failure);
        }
        assert_eq!(pool.pick(&[]).unwrap().0.endpoint.replica, "a-0");
        let err = pool.pick(&["a-0".to_string()]).unwrap_err();
        assert!(err.contains("circuit breaker"), "{err}");
        assert_eq!(
            pool.pick(&["a-0".into(), "a-1".into()]).unwrap_err(),
            "every ready replica was tried"
        );
        assert!(!pool.has_other(&[], "a-0"), "a-1 is open");
        assert!(pool_with_two().has_other(&[], "a-0"));
        assert!(!pool_with_two().has_other(&["a-1".into()], "a-0"));
    }

    #[test]
    fn an_update_keeps_the_breakers_of_replicas_that_stay() {
        let pool = pool(&["a-0", "a-1"]);
        let a1 = pool.replicas()[1].clone();
        pool.update(route(&["a-1", "a-2"]));
        let now = pool.replicas();
        assert!(Arc::ptr_eq(&now[0], &a1));
        assert_eq!(now[1].endpoint.replica, "a-2");
        assert!(pool.pick(&["a-1".into(), "a-2".into()]).is_err());
        let empty = Pool::new(route(&[]), mpsc::unbounded_channel().0);
        assert_eq!(empty.pick(&[]).unwrap_err(), "none is ready");
    }
}
