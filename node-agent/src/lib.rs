//! Berth's node agent: one stream to the control plane, the local Docker engine driven through
//! bollard, health probes, and restarts that do not wait for the control plane.
#![forbid(unsafe_code)]

pub mod docker;
mod probe;
mod reports;
mod restarts;
mod runtime;
mod session;
mod supervisor;

use berth_proto::v1::Resources;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a stopping node agent waits for its session and supervisor to finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Every setting of `berth node-agent`.
#[derive(Clone, Debug)]
pub struct Config {
    /// Control-plane gRPC addresses, tried in turn.
    pub control_planes: Vec<String>,
    /// This node's name (a DNS label).
    pub name: String,
    /// The join token.
    pub join_token: String,
    /// Docker endpoint, e.g. `unix:///var/run/docker.sock`.
    pub docker: String,
    /// Host volume root.
    pub volume_root: PathBuf,
    /// Where the node agent keeps what must outlive it (restart counts).
    pub state_dir: PathBuf,
    /// Docker network the agents' containers join.
    pub network: String,
    /// Node labels, for node selectors.
    pub labels: HashMap<String, String>,
    /// Extra labels on every container (e.g. a test run's id).
    pub container_labels: HashMap<String, String>,
    /// TLS towards `https://` control planes.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    /// How the containers' logs are rotated (`None`: as the engine's own settings say).
    pub container_logs: Option<docker::LogRotation>,
}

/// Why the node agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeAgentError {
    /// Docker is unreachable or refused.
    #[error("{0} (is Docker running, and may this user use its socket?)")]
    Docker(#[from] docker::DockerError),
    /// The state directory cannot be used.
    #[error("state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Runs the node agent until `shutdown` completes. Containers keep running after it stops.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), NodeAgentError> {
    let runtime = docker::Runtime::connect(
        &config.docker,
        &config.name,
        &config.network,
        &config.volume_root,
        config.container_labels.clone(),
        config.container_logs,
    )?;
    runtime.ensure_network().await?;
    runtime.settle_logs().await?;
    let (cpu_millis, memory_bytes) = runtime.capacity().await?;
    let reports = Arc::new(reports::Reports::default());
    let restarts = restarts::RestartCounts::open(&config.state_dir).map_err(|source| {
        NodeAgentError::StateDir {
            path: config.state_dir.clone(),
            source,
        }
    })?;
    let mut supervisor =
        supervisor::Supervisor::new(runtime.clone(), &config.name, reports.clone(), restarts);
    supervisor.adopt().await?;
    supervisor.publish_all();
    let (assignments_tx, assignments_rx) = tokio::sync::watch::channel(None);
    let identity = session::Identity {
        node: config.name.clone(),
        capacity: Resources {
            cpu_millis,
            memory_bytes,
        },
        labels: config.labels.clone(),
        join_token: config.join_token.clone(),
        tls: config.tls.clone(),
    };
    tracing::info!(node = %config.name, network = %config.network, "node agent running");
    // Both loops get `stop` and run on `tasks`: on shutdown the session ends its stream and
    // the supervisor finishes the reconcile under way; containers keep running.
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    tasks.spawn(session::run(
        config.control_planes.clone(),
        identity,
        reports,
        assignments_tx,
        runtime,
        stop.child_token(),
    ));
    tasks.spawn(supervisor.run(assignments_rx, stop.child_token()));
    tasks.close();
    shutdown.await;
    stop.cancel();
    if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("node agent work did not finish within {SHUTDOWN_GRACE:?}");
    }
    tracing::info!("node agent stopped; containers keep running");
    Ok(())
}
