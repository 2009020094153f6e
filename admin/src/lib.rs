//! The admin listener both servers run: `/metrics` (Prometheus), `/healthz` (the process is
//! up) and `/readyz` (the server can do its work). Plain HTTP on loopback by default. With
//! TLS files it serves HTTPS; with a token file `/metrics` needs `Authorization: Bearer` with a
//! token from that file, the server's admin tokens, or an admin or read-only token made
//! through `TokenService`. The health probes stay open, as Kubernetes' do: they tell only
//! whether the server is up, and orchestrators probe them without credentials.

#![forbid(unsafe_code)]

pub mod tls;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use berth_store::token_mirror::{IssuedTokens, Principal, TokenFileError, TokenSet};
use futures::future::BoxFuture;
use http::{header, HeaderMap, StatusCode};
use hyper_util::server::graceful::GracefulShutdown;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Time a client has to finish the TLS handshake and to send its request's headers.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stopping server waits for admin requests in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Where and how the admin listener serves.
#[derive(Clone, Debug)]
pub struct AdminConfig {
    /// Its address (`--admin-listen`).
    pub listen: SocketAddr,
    /// PEM certificate chain and key to serve HTTPS with (`--admin-tls`: the server's own);
    /// plain HTTP when unset.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// File of tokens that may read `/metrics` (`--admin-token-file`); when set, `/metrics`
    /// refuses requests without an accepted token.
    pub token_file: Option<PathBuf>,
}

/// Tokens the server accepts elsewhere that may also read `/metrics` once it is protected.
#[derive(Clone, Default)]
pub struct ServerTokens {
    /// The server's admin tokens (`--token-file`).
    pub admin: Option<TokenSet>,
    /// Tokens made through `TokenService`, mirrored from etcd: admin and read-only ones may
    /// read, node tokens may not.
    pub issued: Option<IssuedTokens>,
}

/// Who may read `/metrics`.
#[derive(Clone)]
struct Readers {
    file: TokenSet,
    server: ServerTokens,
}

impl Readers {
    fn allow(&self, token: &str) -> bool {
        self.file.contains(token)
            || self
                .server
                .admin
                .as_ref()
                .is_some_and(|s| s.contains(token))
            || self.server.issued.as_ref().is_some_and(|issued| {
                matches!(
                    issued.principal(token),
                    Some(Principal::Admin | Principal::ReadOnly)
                )
            })
    }
}

/// The metrics page, rendered on each scrape.
pub type RenderMetrics = Arc<dyn Fn() -> String + Send + Sync>;
/// Whether the server can do its work; the error says why not.
pub type CheckReady = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// What the admin listener serves.
#[derive(Clone)]
pub struct Endpoints {
    /// `/metrics`.
    pub metrics: RenderMetrics,
    /// `/readyz`.
    pub ready: CheckReady,
}

/// Why the admin listener cannot start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The certificate or key cannot be used.
    #[error("admin_tls: {0}")]
    Tls(String),
    /// The token file cannot be used.
    #[error("admin_token_file: {0}")]
    Tokens(#[source] TokenFileError),
    /// The address cannot be bound.
    #[error("cannot listen on {addr} (admin_listen): {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// An admin listener, bound and ready to serve.
pub struct Admin {
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    app: Router,
}

#[derive(Clone)]
struct AdminState {
    endpoints: Endpoints,
    readers: Option<Readers>,
}

impl Admin {
    /// Loads the TLS files and the token file and binds the address; an error names the
    /// setting at fault.
    pub async fn bind(
        config: &AdminConfig,
        endpoints: Endpoints,
        server: ServerTokens,
    ) -> Result<Self, AdminError> {
        let tls = match &config.tls {
            Some((cert, key)) => Some(tls::acceptor(cert, key).map_err(AdminError::Tls)?),
            None => None,
        };
        let readers = match &config.token_file {
            Some(path) => Some(Readers {
                file: TokenSet::from_file(path).map_err(AdminError::Tokens)?,
                server,
            }),
            None => None,
        };
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| AdminError::Bind {
                addr: config.listen,
                source,
            })?;
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(ready))
            .with_state(AdminState { endpoints, readers });
        Ok(Self { listener, tls, app })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Its URL scheme: `https` with TLS.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// Serves until `stop` completes, then lets requests in flight finish (a few seconds at
    /// most).
    pub async fn serve(self, stop: impl Future<Output = ()> + Send + 'static) {
        serve(self.listener, self.tls, self.app, stop).await
    }
}

/// Serves `app` on `listener`, over TLS with `tls`, until `stop` completes; then lets requests
/// in flight finish (a few seconds at most). Each connection runs in a task of its own, so a
/// slow client holds up no other; its TLS handshake and each request's headers must arrive
/// within [`HANDSHAKE_TIMEOUT`]. The admin listener and the control plane's dashboard use it.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    app: Router,
    stop: impl Future<Output = ()> + Send + 'static,
) {
    let graceful = GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        let (tcp, client) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let (app, tls, watcher) = (app.clone(), tls.clone(), graceful.watcher());
        tokio::spawn(async move {
            let service = hyper_util::service::TowerToHyperService::new(app);
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HANDSHAKE_TIMEOUT);
            match tls {
                None => {
                    let io = hyper_util::rt::TokioIo::new(tcp);
                    let _ = watcher.watch(http.serve_connection(io, service)).await;
                }
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let io = hyper_util::rt::TokioIo::new(stream);
                            let _ = watcher.watch(http.serve_connection(io, service)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%client, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%client, "TLS handshake not finished in time"),
                    }
                }
            }
        });
    }
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await;
}

async fn metrics(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    if let Some(readers) = &state.readers {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let refusal = match token {
            None => Some("missing credentials: send `Authorization: Bearer <token>` (an admin or read-only token)\n"),
            Some(token) if !readers.allow(token) => Some("invalid token: /metrics needs an admin or read-only token\n"),
            Some(_) => None,
        };
        if let Some(message) = refusal {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                message,
            )
                .into_response();
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        (state.endpoints.metrics)(),
    )
        .into_response()
}

async fn ready(State(state): State<AdminState>) -> (StatusCode, String) {
    match (state.endpoints.ready)().await {
        Ok(()) => (StatusCode::OK, "ok\n".into()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}
