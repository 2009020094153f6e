//! When a failed request is tried again: only if sending it twice is harmless (an idempotent
//! method or an `Idempotency-Key`, or a connection that never opened), only when another
//! replica can take it (otherwise the client gets the real failure, not "no replica"),
//! after an exponential backoff with jitter, and only while the agent's retry budget (20% of
//! its requests) allows. A request that never reached its replica (the connection could not
//! be made) goes to the next replica at once, outside the budget and the attempt count: it
//! cost the agent nothing. tower's `Retry` drives it; budget and backoff are
//! tower's too.

use super::balance::{Pool, ServedBy};
use super::error::GatewayError;
use super::forward::Forward;
use super::metrics::{AgentLabels, GatewayMetrics};
use super::outcome::Ending;
use axum::body::Body;
use http::Response;
use std::sync::Arc;
use std::time::Duration;
use tower::retry::backoff::{Backoff, ExponentialBackoff, ExponentialBackoffMaker, MakeBackoff};
use tower::retry::budget::{Budget, TpsBudget};
use tower::util::rng::HasherRng;

/// Share of requests that may be retries, over `BUDGET_WINDOW`.
pub const RETRY_RATIO: f32 = 0.2;
/// Retries always allowed per second, so that a quiet agent can still retry.
pub const RETRY_MIN_PER_SEC: u32 = 10;
/// How long a request's deposit counts toward the budget.
pub const BUDGET_WINDOW: Duration = Duration::from_secs(10);
/// Most attempts of one request, the first included.
pub const MAX_ATTEMPTS: u32 = 3;
/// First backoff before a retry.
pub const BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest backoff before a retry.
pub const BACKOFF_MAX: Duration = Duration::from_millis(250);

/// The retry policy of one request; [`RetryPolicy::new`] makes the agent's template.
#[derive(Clone)]
pub struct RetryPolicy {
    pool: Arc<Pool>,
    budget: Arc<TpsBudget>,
    /// Made at the first retry: most requests never need one.
    backoff: Option<ExponentialBackoff>,
    metrics: Arc<GatewayMetrics>,
    agent: String,
    attempts: u32,
    deposited: bool,
}

impl RetryPolicy {
    /// The policy of `agent` over `pool`, with a budget shared by all its requests.
    pub fn new(agent: &str, pool: Arc<Pool>, metrics: Arc<GatewayMetrics>) -> Self {
        Self {
            pool,
            budget: Arc::new(TpsBudget::new(
                BUDGET_WINDOW,
                RETRY_MIN_PER_SEC,
                RETRY_RATIO,
            )),
            backoff: None,
            metrics,
            agent: agent.to_string(),
            attempts: 1,
            deposited: false,
        }
    }

    /// Whether the outcome of an attempt of `request` calls for another attempt, and where
    /// the attempt went.
    fn retryable<'a>(
        request: &Forward,
        result: &'a Result<Response<Body>, GatewayError>,
    ) -> Option<&'a str> {
        let replica = match result {
            Ok(response) => response.extensions().get::<ServedBy>()?.0.as_str(),
            Err(e) => e.replica()?,
        };
        Ending::of(result)
            .retry_elsewhere(request.is_safe())
            .then_some(replica)
    }
}

/// Exponential from `BACKOFF_MIN` to `BACKOFF_MAX`, each wait plus up to 100% at random.
fn new_backoff() -> ExponentialBackoff {
    ExponentialBackoffMaker::new(BACKOFF_MIN, BACKOFF_MAX, 1.0, HasherRng::default())
        .expect("constant backoff bounds are valid")
        .make_backoff()
}

impl tower::retry::Policy<Forward, Response<Body>, GatewayError> for RetryPolicy {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        request: &mut Forward,
        result: &mut Result<Response<Body>, GatewayError>,
    ) -> Option<Self::Future> {
        let replica = Self::retryable(request, result)?;
        if !self.pool.has_other(&request.tried, replica) {
            return None;
        }
        // A request that never reached the replica cost the agent nothing: it goes to
        // another replica at once, outside the budget and the attempt count (each replica is
        // tried once, so this ends).
        let never_reached = Ending::of(result) == Ending::ConnectFailed;
        if !never_reached && (self.attempts >= MAX_ATTEMPTS || !self.budget.withdraw()) {
            return None;
        }
        request.tried.push(replica.to_string());
        self.metrics
            .retries
            .get_or_create(&AgentLabels {
                agent: self.agent.clone(),
            })
            .inc();
        if never_reached {
            return Some(tokio::time::sleep(Duration::ZERO));
        }
        self.attempts += 1;
        Some(self.backoff.get_or_insert_with(new_backoff).next_backoff())
    }

    fn clone_request(&mut self, request: &Forward) -> Option<Forward> {
        if !self.deposited {
            // Each original request earns the budget its share of retries, and draws its
            // own jitter (a cloned backoff would repeat the template's sequence).
            self.budget.deposit();
            self.deposited = true;
            self.backoff = None;
        }
        request.try_clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::ForwardBody;
    use bytes::Bytes;
    use http::Method;
    use tower::retry::Policy;

    fn request(method: Method) -> Forward {
        Forward {
            agent: "a".into(),
            method,
            path_and_query: "/".into(),
            headers: Arc::default(),
            body: ForwardBody::Buffered(Bytes::new()),
            tried: vec![],
        }
    }

    fn answered(status: u16, replica: &str) -> Result<Response<Body>, GatewayError> {
        let mut response = Response::new(Body::empty());
        *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
        response.extensions_mut().insert(ServedBy(replica.into()));
        Ok(response)
    }

    fn timed_out(replica: &str) -> Result<Response<Body>, GatewayError> {
        Err(GatewayError::Timeout {
            agent: "a".into(),
            replica: replica.into(),
            timeout: Duration::from_secs(1),
        })
    }

    fn policy() -> RetryPolicy {
        policy_over(&["a-0", "a-1", "a-2", "a-3"])
    }

    fn policy_over(replicas: &[&str]) -> RetryPolicy {
        let route = crate::routes::test_route(replicas);
        let pool = Pool::new(Arc::new(route), tokio::sync::mpsc::unbounded_channel().0);
        RetryPolicy::new("a", Arc::new(pool), GatewayMetrics::new())
    }

    /// The result of sending to a port where nothing listens: a connection refused.
    async fn refused(replica: &str) -> Result<Response<Body>, GatewayError> {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = closed.local_addr().unwrap().to_string();
        drop(closed);
        crate::forward::Upstream::default()
            .send(replica, &address, request(Method::POST))
            .await
    }

    #[tokio::test]
    async fn a_request_that_never_reached_a_replica_goes_to_each_other_one_outside_the_budget() {
        let template = policy();
        // The budget spent, and this request at its last attempt.
        while template.budget.withdraw() {}
        let mut p = template.clone();
        p.attempts = MAX_ATTEMPTS;
        let mut post = request(Method::POST);
        p.clone_request(&post);
        let mut result = refused("a-0").await;
        assert_eq!(Ending::of(&result), Ending::ConnectFailed);
        for (replica, next) in [("a-0", "a-1"), ("a-1", "a-2"), ("a-2", "a-3")] {
            result = refused(replica).await;
            assert!(
                p.retry(&mut post, &mut result).is_some(),
                "{replica} refused: {next} is tried"
            );
        }
        assert_eq!(post.tried, ["a-0", "a-1", "a-2"]);
        // Every replica tried: the failure is the answer.
        assert!(p.retry(&mut post, &mut refused("a-3").await).is_none());
        // A failure after the request may have arrived still needs the budget.
        let mut get = request(Method::GET);
        let mut p = template.clone();
        p.clone_request(&get);
        while template.budget.withdraw() {}
        assert!(p.retry(&mut get, &mut timed_out("a-0")).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn no_retry_without_another_replica() {
        let mut p = policy_over(&["a-0"]);
        let mut get = request(Method::GET);
        p.clone_request(&get);
        assert!(p.retry(&mut get, &mut timed_out("a-0")).is_none());
        let mut p = policy_over(&["a-0", "a-1"]);
        assert!(p.retry(&mut get, &mut timed_out("a-0")).is_some());
        assert!(p.retry(&mut get, &mut timed_out("a-1")).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn safe_failures_retry_elsewhere_unsafe_ones_do_not() {
        let mut p = policy();
        let mut get = request(Method::GET);
        p.clone_request(&get);
        assert!(p.retry(&mut get, &mut answered(503, "a-0")).is_some());
        assert_eq!(get.tried, ["a-0"]);
        let mut post = request(Method::POST);
        assert!(p.retry(&mut post, &mut timed_out("a-0")).is_none());
        assert!(p.retry(&mut post, &mut answered(503, "a-0")).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn answers_that_are_not_failures_are_final() {
        let mut p = policy();
        let mut get = request(Method::GET);
        for status in [200, 404, 429, 501] {
            assert!(p.retry(&mut get, &mut answered(status, "a-0")).is_none());
        }
        assert!(get.tried.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_are_bounded() {
        let mut p = policy();
        let mut get = request(Method::GET);
        p.clone_request(&get);
        let mut retried = 0;
        while p.retry(&mut get, &mut timed_out("a-0")).is_some() {
            retried += 1;
        }
        assert_eq!(retried, MAX_ATTEMPTS - 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_caps_retries_at_a_fifth_of_requests() {
        let template = policy();
        let mut granted = 0;
        let requests = 1000;
        for _ in 0..requests {
            let mut p = template.clone();
            let mut get = request(Method::GET);
            p.clone_request(&get);
            if p.retry(&mut get, &mut timed_out("a-0")).is_some() {
                granted += 1;
            }
        }
        // The floor (RETRY_MIN_PER_SEC over the window) plus 20% of the requests.
        let ceiling = RETRY_MIN_PER_SEC as usize * BUDGET_WINDOW.as_secs() as usize
            + (requests as f32 * RETRY_RATIO) as usize;
        assert!(granted <= ceiling, "{granted} retries > {ceiling}");
        assert!(
            granted >= (requests as f32 * RETRY_RATIO) as usize,
            "{granted}"
        );
    }
}
