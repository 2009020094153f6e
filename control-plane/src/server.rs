//! Starts the control plane: the gRPC API (with reflection and health) and the admin endpoint,
//! and stops both on the shutdown signal.

use crate::api::{AgentApi, NodeApi, RequestApi, TokenApi};
use crate::auth::{AuthLayer, IssuedTokens, TokenFileError, TokenSet, Tokens};
use crate::config::{Config, ConfigError};
use crate::metrics::{Metrics, MetricsLayer};
use crate::nodes::{placement, NodeAgentApi, Sessions};
use berth_proto::v1::agent_service_server::AgentServiceServer;
use berth_proto::v1::node_agent_service_server::NodeAgentServiceServer;
use berth_proto::v1::node_service_server::NodeServiceServer;
use berth_proto::v1::request_service_server::RequestServiceServer;
use berth_proto::v1::token_service_server::TokenServiceServer;
use berth_proto::validate::Limits;
use berth_store::token_mirror::mirror_tokens;
use berth_store::{Store, StoreError};
use std::future::Future;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a stopping control plane waits for its background work (the leader's pass, the
/// token mirror) to finish before it exits.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Why the control plane could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A setting is wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A token file is wrong.
    #[error(transparent)]
    Tokens(#[from] TokenFileError),
    /// etcd could not be reached at start.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    /// The reflection service could not be built.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The admin listener cannot start.
    #[error(transparent)]
    Admin(#[from] berth_admin::AdminError),
}

/// Runs the control plane until `shutdown` completes.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    config.validate()?;
    let tokens = Tokens {
        admin: TokenSet::from_file(config.token_file.as_deref().expect("validated"))?,
        join: match &config.join_token_file {
            Some(path) => TokenSet::from_file(path)?,
            None => TokenSet::default(),
        },
        issued: IssuedTokens::default(),
    };
    let store = Store::connect(&config.etcd, &config.prefix, &config.etcd_tls()).await?;
    // Every background loop gets `stop` and runs on `tasks`: on shutdown they finish what
    // they are writing and return, and the server waits for them (up to SHUTDOWN_GRACE).
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    tasks.spawn(mirror_tokens(
        store.clone(),
        tokens.issued.clone(),
        stop.child_token(),
    ));
    if let Err(e) = store.ping().await {
        // Not fatal: the API answers UNAVAILABLE until etcd is back.
        tracing::warn!(error = %e, "etcd does not answer yet");
    }
    let metrics = Metrics::new();

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<AgentServiceServer<AgentApi>>()
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(berth_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(berth_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let limits = Limits {
        volume_root: config.volume_root.clone(),
    };
    let sessions = Sessions::default();
    let denied = crate::nodes::denied::DeniedNodes::default();
    tasks.spawn(crate::nodes::denied::mirror(
        store.clone(),
        denied.clone(),
        stop.child_token(),
    ));
    let store_for_requests = store.clone();
    let agent_api = AgentApi::new(store.clone(), limits, sessions.clone());
    let agents = AgentServiceServer::new(agent_api.clone());
    let node_agents = NodeAgentServiceServer::new(
        NodeAgentApi::new(store.clone(), sessions, denied.clone())
            .require_client_cert(config.require_node_cert),
    );
    // Placement, the node monitor, the autoscaler and housekeeping run in the elected leader
    // only.
    let identity = format!("{}@{}", hostname(), config.listen);
    let leading_store = store.clone();
    let (housekeeping, leading_metrics) = (config.housekeeping(), metrics.clone());
    let autoscale_window = std::time::Duration::from_secs(config.autoscale_window_seconds);
    tasks.spawn(crate::leader::run(
        store.clone(),
        identity,
        stop.child_token(),
        move |term, lease| {
            // Every write of the term is fenced by its lease.
            let (store, metrics) = (leading_store.fenced(lease), leading_metrics.clone());
            async move {
                // All end when the term does.
                tokio::join!(
                    placement::run(store.clone(), term.clone()),
                    crate::nodes::monitor::run(store.clone(), term.clone()),
                    crate::autoscale::run(
                        store.clone(),
                        autoscale_window,
                        metrics.clone(),
                        term.clone()
                    ),
                    crate::housekeeping::run(store, housekeeping, metrics, term),
                );
            }
        },
    ));

    let grpc_listener = bind(config.listen).await?;
    let admin = berth_admin::Admin::bind(
        &config.admin(),
        admin_endpoints(metrics.clone(), store.clone()),
        berth_admin::ServerTokens {
            admin: Some(tokens.admin.clone()),
            issued: Some(tokens.issued.clone()),
        },
    )
    .await?;
    tracing::info!(listen = %config.listen, admin = %format!("{}://{}", admin.scheme(), config.admin_listen), etcd = %config.etcd.join(","), "control plane serving");

    let dashboard = match config.dashboard_listen {
        Some(addr) => {
            let tls = match (&config.tls_cert, &config.tls_key) {
                (Some(cert), Some(key)) => {
                    Some(berth_admin::tls::acceptor(cert, key).map_err(|reason| {
                        ConfigError::Invalid {
                            setting: "tls_cert",
                            reason,
                        }
                    })?)
                }
                _ => None,
            };
            let listener = bind(addr).await?;
            let scheme = if tls.is_some() { "https" } else { "http" };
            tracing::info!(url = %format!("{scheme}://{addr}/"), "dashboard serving");
            let app = crate::dashboard::router(std::sync::Arc::new(crate::dashboard::Dashboard {
                agents: agent_api.clone(),
                nodes: NodeApi::new(store.clone(), denied.clone()),
                requests: RequestApi::new(store.clone()),
                tokens: tokens.clone(),
                store: store.clone(),
                secure: tls.is_some(),
                stop: stop.child_token(),
            }));
            Some((listener, tls, app))
        }
        None => None,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let dashboard = dashboard.map(|(listener, tls, app)| {
        let mut stopped = stop_rx.clone();
        tokio::spawn(berth_admin::serve(listener, tls, app, async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        }))
    });
    let mut admin_stop = stop_rx.clone();
    let admin = tokio::spawn(admin.serve(async move {
        let _ = admin_stop.wait_for(|stop| *stop).await;
    }));

    let mut grpc_stop = stop_rx;
    let mut builder = tonic::transport::Server::builder()
        // What one client connection may hold: streams at once (a stream beyond it is refused
        // with REFUSED_STREAM), bytes of one request's headers (431, then REFUSED_STREAM), and
        // a peer that stops answering pings is dropped.
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL));
    if let Some(tls) = tls_config(&config)? {
        builder = builder.tls_config(tls)?;
    }
    let grpc = builder
        // Metrics sit outside auth so that refused calls are counted too.
        .layer(MetricsLayer(metrics))
        .layer(AuthLayer::new(tokens))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(agents)
        .add_service(node_agents)
        .add_service(RequestServiceServer::new(RequestApi::new(
            store_for_requests.clone(),
        )))
        .add_service(NodeServiceServer::new(NodeApi::new(
            store_for_requests.clone(),
            denied,
        )))
        .add_service(TokenServiceServer::new(TokenApi::new(store_for_requests)))
        .serve_with_incoming_shutdown(
            crate::incoming::guarded(grpc_listener, config.max_connections),
            async move {
                let _ = grpc_stop.wait_for(|stop| *stop).await;
            },
        );
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    });
    grpc.await?;
    stop.cancel();
    tasks.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("background work did not finish within {SHUTDOWN_GRACE:?}");
    }
    admin.await.expect("admin task does not panic");
    if let Some(dashboard) = dashboard {
        dashboard.await.expect("dashboard task does not panic");
    }
    Ok(())
}

/// `/metrics` renders the control plane's metrics; `/readyz` says whether etcd answers.
fn admin_endpoints(metrics: std::sync::Arc<Metrics>, store: Store) -> berth_admin::Endpoints {
    berth_admin::Endpoints {
        metrics: std::sync::Arc::new(move || metrics.encode()),
        ready: std::sync::Arc::new(move || {
            let store = store.clone();
            Box::pin(async move { store.ping().await.map_err(|e| e.to_string()) })
        }),
    }
}

async fn bind(addr: std::net::SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "control-plane".into())
}

/// The gRPC server's TLS settings, when a certificate is configured: its identity, and the CA
/// client certificates are checked against (clients without one are still let through here;
/// the node-agent stream refuses them when node certificates are required).
/// Streams one gRPC connection may have open at once (`SETTINGS_MAX_CONCURRENT_STREAMS`).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 256;
/// Bytes of one request's header list (`SETTINGS_MAX_HEADER_LIST_SIZE`).
pub const MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;
/// Time a client has to finish the TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How often an idle connection is pinged; one that does not answer within 20 s is closed.
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

fn tls_config(config: &Config) -> Result<Option<tonic::transport::ServerTlsConfig>, ServerError> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    let read = |setting: &'static str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| {
            ServerError::Config(ConfigError::Invalid {
                setting,
                reason: format!("cannot read {}: {e}", path.display()),
            })
        })
    };
    let mut tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            read("tls_cert", cert)?,
            read("tls_key", key)?,
        ))
        .timeout(TLS_HANDSHAKE_TIMEOUT);
    if let Some(ca) = &config.tls_ca {
        tls = tls
            .client_ca_root(Certificate::from_pem(read("tls_ca", ca)?))
            .client_auth_optional(true);
    }
    Ok(Some(tls))
}
