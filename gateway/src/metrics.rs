//! Prometheus metrics of the gateway.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::{Arc, RwLock};

/// The agent label of every request for an agent the gateway does not know: names taken from
/// request paths never make new series, so that no client can grow `/metrics` or memory.
pub const UNKNOWN_AGENT: &str = "_unknown";

/// Labels of a finished request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The agent (empty for paths outside `/agents/`).
    pub agent: String,
    /// HTTP status code sent to the client.
    pub code: u16,
}

/// Labels of a per-agent counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AgentLabels {
    /// The agent.
    pub agent: String,
}

/// Labels of a replay outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplayLabels {
    /// The agent.
    pub agent: String,
    /// delivered, failed (will be tried again) or dead.
    pub outcome: String,
}

/// Labels of a step of a replayed delivery.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    /// claim (the etcd write that takes it), forward (to the agent's answer) or finish (the
    /// etcd write of its outcome).
    pub step: &'static str,
}

/// Labels of a breaker transition.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BreakerLabels {
    /// The agent.
    pub agent: String,
    /// The replica.
    pub replica: String,
    /// The state entered: closed, open or half_open.
    pub to: String,
}

/// The gateway's metrics and their registry.
pub struct GatewayMetrics {
    registry: Registry,
    /// Requests by agent and status code.
    pub requests: Family<RequestLabels, Counter>,
    /// Time to response headers by agent and status code.
    pub latency: Family<RequestLabels, Histogram>,
    /// Breaker state changes.
    pub breaker_transitions: Family<BreakerLabels, Counter>,
    /// Retries sent to another replica.
    pub retries: Family<AgentLabels, Counter>,
    /// Requests refused at the concurrency limit.
    pub shed: Family<AgentLabels, Counter>,
    /// Requests queued for replay.
    pub queued: Family<AgentLabels, Counter>,
    /// Replayed deliveries by outcome.
    pub replays: Family<ReplayLabels, Counter>,
    /// Requests waiting in each agent's queue, as this gateway sees it.
    pub queue_depth: Family<AgentLabels, Gauge>,
    /// Body bytes waiting in each agent's queue, as this gateway sees it.
    pub queue_bytes: Family<AgentLabels, Gauge>,
    /// Agents whose queue this gateway replays (`replayers/`).
    pub replaying_agents: Gauge,
    /// Requests held while their agent wakes.
    pub held: Family<AgentLabels, Gauge>,
    /// Time from holding a request for an agent with no replica ready to its answer.
    pub wake_seconds: Family<AgentLabels, Histogram>,
    /// Time of each step of a replayed delivery, resolved once (no label lookup per step).
    pub replay_steps: ReplaySteps,
    /// Time etcd took to answer each group commit of the queue's writes.
    pub commit_seconds: Histogram,
    /// Transactions (a new request, a claim, an outcome) in each group commit.
    pub commit_transactions: Histogram,
}

/// The histograms of `berth_gateway_replay_step_seconds`, one per step.
pub struct ReplaySteps {
    /// The etcd write that claims a request.
    pub claim: Histogram,
    /// From the claim to sending: the wait at the agent's gate of a request claimed ahead.
    pub wait: Histogram,
    /// From sending to the agent to its answer.
    pub forward: Histogram,
    /// The etcd write of the outcome.
    pub finish: Histogram,
}

impl GatewayMetrics {
    /// Registers every metric.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("berth_gateway");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests by agent and the status code sent",
            requests.clone(),
        );
        let latency = Family::<RequestLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0002, 2.0, 18))
        });
        registry.register(
            "request_duration_seconds",
            "Time until the response headers, by agent and status code",
            latency.clone(),
        );
        let breaker_transitions = Family::<BreakerLabels, Counter>::default();
        registry.register(
            "breaker_transitions",
            "Circuit breaker state changes by replica and the state entered",
            breaker_transitions.clone(),
        );
        let retries = Family::<AgentLabels, Counter>::default();
        registry.register(
            "retries",
            "Requests retried on another replica",
            retries.clone(),
        );
        let shed = Family::<AgentLabels, Counter>::default();
        registry.register(
            "shed",
            "Requests refused with 503 at the agent's concurrency limit",
            shed.clone(),
        );
        let queued = Family::<AgentLabels, Counter>::default();
        registry.register(
            "queued",
            "Requests stored for replay because the agent could not take them",
            queued.clone(),
        );
        let replays = Family::<ReplayLabels, Counter>::default();
        registry.register(
            "replays",
            "Replayed deliveries by outcome (delivered, failed, dead)",
            replays.clone(),
        );
        let queue_depth = Family::<AgentLabels, Gauge>::default();
        registry.register(
            "queue_depth",
            "Requests waiting for replay per agent",
            queue_depth.clone(),
        );
        let queue_bytes = Family::<AgentLabels, Gauge>::default();
        registry.register(
            "queue_bytes",
            "Body bytes of the requests waiting for replay per agent",
            queue_bytes.clone(),
        );
        let replaying_agents = Gauge::default();
        registry.register(
            "replaying_agents",
            "Agents whose queue this gateway replays (one gateway at a time per agent, shared \
             evenly among the gateways)",
            replaying_agents.clone(),
        );
        let held = Family::<AgentLabels, Gauge>::default();
        registry.register(
            "held_requests",
            "Requests held (and queued) while their autoscaled agent wakes",
            held.clone(),
        );
        let wake_seconds = Family::<AgentLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.05, 2.0, 12))
        });
        registry.register(
            "wake_seconds",
            "Time from holding a request for an agent with no replica ready to its answer",
            wake_seconds.clone(),
        );
        let replay_step_seconds = Family::<StepLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register(
            "replay_step_seconds",
            "Time of each step of a replayed delivery: claim and finish (etcd writes), forward \
             (to the agent's answer)",
            replay_step_seconds.clone(),
        );
        let commit_seconds = Histogram::new(exponential_buckets(0.0002, 2.0, 16));
        registry.register(
            "store_commit_seconds",
            "Time etcd took to answer each group commit of the replay queue's writes (new \
             requests, claims, outcomes), which a queued request's 202 waits for",
            commit_seconds.clone(),
        );
        let commit_transactions = Histogram::new(exponential_buckets(1.0, 2.0, 7));
        registry.register(
            "store_commit_transactions",
            "Transactions committed together in each group commit of the replay queue's writes",
            commit_transactions.clone(),
        );
        let step = |step| {
            replay_step_seconds
                .get_or_create(&StepLabels { step })
                .clone()
        };
        let replay_steps = ReplaySteps {
            claim: step("claim"),
            wait: step("wait"),
            forward: step("forward"),
            finish: step("finish"),
        };
        Arc::new(Self {
            registry,
            replay_steps,
            commit_seconds,
            commit_transactions,
            replaying_agents,
            held,
            wake_seconds,
            queued,
            replays,
            queue_depth,
            queue_bytes,
            requests,
            latency,
            breaker_transitions,
            retries,
            shed,
        })
    }

    /// Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// One agent's request counter and latency histogram per status code, resolved once each, so
/// that a request does not hash its labels (status codes are few, so the list stays short).
pub struct AgentMetrics {
    agent: String,
    metrics: Arc<GatewayMetrics>,
    by_code: RwLock<Vec<(u16, Counter, Histogram)>>,
}

impl AgentMetrics {
    /// The metrics of `agent` (a known agent, or [`UNKNOWN_AGENT`]).
    pub fn new(agent: &str, metrics: Arc<GatewayMetrics>) -> Self {
        Self {
            agent: agent.to_string(),
            metrics,
            by_code: RwLock::default(),
        }
    }

    /// Counts a request answered with `code` after `seconds`.
    pub fn observe(&self, code: u16, seconds: f64) {
        let known = self
            .by_code
            .read()
            .expect("metrics lock")
            .iter()
            .find(|(c, ..)| *c == code)
            .map(|(_, counter, histogram)| (counter.clone(), histogram.clone()));
        let (counter, histogram) = known.unwrap_or_else(|| {
            let labels = RequestLabels {
                agent: self.agent.clone(),
                code,
            };
            let handles = (
                self.metrics.requests.get_or_create(&labels).clone(),
                self.metrics.latency.get_or_create(&labels).clone(),
            );
            let mut by_code = self.by_code.write().expect("metrics lock");
            if !by_code.iter().any(|(c, ..)| *c == code) {
                by_code.push((code, handles.0.clone(), handles.1.clone()));
            }
            handles
        });
        counter.inc();
        histogram.observe(seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_metrics_count_by_code_under_the_agent_label() {
        let metrics = GatewayMetrics::new();
        let agent = AgentMetrics::new("a", metrics.clone());
        for code in [200, 200, 503] {
            agent.observe(code, 0.001);
        }
        AgentMetrics::new(UNKNOWN_AGENT, metrics.clone()).observe(404, 0.0);
        let page = metrics.encode();
        assert!(
            page.contains("berth_gateway_requests_total{agent=\"a\",code=\"200\"} 2"),
            "{page}"
        );
        assert!(page.contains("berth_gateway_requests_total{agent=\"a\",code=\"503\"} 1"));
        assert!(page.contains("berth_gateway_requests_total{agent=\"_unknown\",code=\"404\"} 1"));
        assert!(page
            .contains("berth_gateway_request_duration_seconds_count{agent=\"a\",code=\"200\"} 2"));
    }
}
