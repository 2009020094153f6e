//! Prometheus metrics of the control plane, and the tower layer that records gRPC calls.

use futures::future::BoxFuture;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::collections::HashSet;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use tower::{Layer, Service};

/// The method label of every call to a path the control plane does not serve: paths come from
/// the client before it is authenticated, so they never make new series.
pub const UNKNOWN_METHOD: &str = "unknown";

/// Labels of a gRPC call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// `/package.Service/Method`, or [`UNKNOWN_METHOD`].
    pub method: String,
    /// gRPC status code name as sent in the response headers.
    pub code: String,
}

/// Labels of a latency sample.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    /// `/package.Service/Method`, or [`UNKNOWN_METHOD`].
    pub method: String,
}

/// The control plane's metrics and their registry.
pub struct Metrics {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    calls: Family<CallLabels, Counter>,
    latency: Family<MethodLabels, Histogram>,
    /// The paths of every method served: only these are labels.
    known: HashSet<String>,
    /// Finished replay records dropped to keep within the retention bounds.
    pub retention_dropped: Counter,
    /// Bytes of etcd's database, as the leader last read it.
    pub etcd_db_size: Gauge,
    /// The revision etcd was last compacted to.
    pub etcd_compacted_revision: Gauge,
    /// Replicas the autoscaler asks for, per agent.
    autoscale_desired: Family<AgentLabels, Gauge>,
    /// Concurrency over the autoscaler's stable window, per agent.
    autoscale_concurrency: Family<AgentLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
}

/// Labels of an agent's series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AgentLabels {
    /// The agent's name.
    pub agent: String,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("berth");
        let calls = Family::<CallLabels, Counter>::default();
        registry.register(
            "grpc_requests",
            "gRPC calls by method and status code (streams count when they start)",
            calls.clone(),
        );
        let latency = Family::<MethodLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register(
            "grpc_request_duration_seconds",
            "Time until the response headers of a gRPC call",
            latency.clone(),
        );
        let retention_dropped = Counter::default();
        registry.register(
            "replay_retention_dropped",
            "Finished replay records (delivered or dead) dropped, oldest first, to keep within the retention bounds",
            retention_dropped.clone(),
        );
        let etcd_db_size = Gauge::default();
        registry.register(
            "etcd_db_size_bytes",
            "Size of etcd's database file, as the leader last read it (its quota alarm makes etcd read-only)",
            etcd_db_size.clone(),
        );
        let etcd_compacted_revision = Gauge::default();
        registry.register(
            "etcd_compacted_revision",
            "The revision the leader last compacted etcd's history to",
            etcd_compacted_revision.clone(),
        );
        let autoscale_desired = Family::<AgentLabels, Gauge>::default();
        registry.register(
            "autoscale_desired_replicas",
            "Replicas the autoscaler asks for (leader only)",
            autoscale_desired.clone(),
        );
        let autoscale_concurrency =
            Family::<AgentLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "autoscale_stable_concurrency",
            "Requests in flight and queued, averaged over the autoscaler's stable window (leader only)",
            autoscale_concurrency.clone(),
        );
        Arc::new(Self {
            autoscale_desired,
            autoscale_concurrency,
            registry,
            calls,
            latency,
            known: served_methods(),
            retention_dropped,
            etcd_db_size,
            etcd_compacted_revision,
        })
    }

    /// Records the autoscaler's view of `agent`.
    pub fn observe_autoscaled(&self, agent: &str, desired: u32, concurrency: f64) {
        let labels = AgentLabels {
            agent: agent.to_string(),
        };
        self.autoscale_desired
            .get_or_create(&labels)
            .set(i64::from(desired));
        self.autoscale_concurrency
            .get_or_create(&labels)
            .set(concurrency);
    }

    /// Drops the series of a deleted agent.
    pub fn forget_autoscaled(&self, agent: &str) {
        let labels = AgentLabels {
            agent: agent.to_string(),
        };
        self.autoscale_desired.remove(&labels);
        self.autoscale_concurrency.remove(&labels);
    }

    /// Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// `/package.Service/Method` of every method the control plane serves: Berth's API (from its
/// file descriptor set), health checking and server reflection.
fn served_methods() -> HashSet<String> {
    use prost::Message;
    let set = prost_types::FileDescriptorSet::decode(berth_proto::FILE_DESCRIPTOR_SET)
        .expect("the built-in descriptor set decodes");
    let mut known: HashSet<String> = set
        .file
        .iter()
        .flat_map(|file| {
            file.service.iter().flat_map(move |service| {
                service.method.iter().map(move |method| {
                    format!("/{}.{}/{}", file.package(), service.name(), method.name())
                })
            })
        })
        .collect();
    known.extend(
        [
            "/grpc.health.v1.Health/Check",
            "/grpc.health.v1.Health/Watch",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ]
        .map(String::from),
    );
    known
}

/// Records each gRPC call's method, status code and latency.
#[derive(Clone)]
pub struct MetricsLayer(pub Arc<Metrics>);

impl<S> Layer<S> for MetricsLayer {
    type Service = Recorded<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Recorded {
            inner,
            metrics: self.0.clone(),
        }
    }
}

/// The service made by [`MetricsLayer`].
#[derive(Clone)]
pub struct Recorded<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B, ResB> Service<http::Request<B>> for Recorded<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        let method = if self.metrics.known.contains(path) {
            path.to_string()
        } else {
            UNKNOWN_METHOD.to_string()
        };
        let metrics = self.metrics.clone();
        let started = Instant::now();
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = call.await?;
            // An error answered before any message travels in the headers ("trailers only");
            // otherwise the status comes in trailers and the call counts as started fine.
            let code = response
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
                .map_or(tonic::Code::Ok, tonic::Code::from);
            metrics
                .calls
                .get_or_create(&CallLabels {
                    method: method.clone(),
                    code: format!("{code:?}"),
                })
                .inc();
            metrics
                .latency
                .get_or_create(&MethodLabels { method })
                .observe(started.elapsed().as_secs_f64());
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_methods_are_read_from_the_descriptor_set() {
        let known = served_methods();
        assert!(
            known.contains("/berth.v1.AgentService/CreateAgent"),
            "{known:?}"
        );
        assert!(known.contains("/grpc.health.v1.Health/Check"));
        assert!(!known.contains("/berth.v1.AgentService/NoSuchMethod"));
    }
}
