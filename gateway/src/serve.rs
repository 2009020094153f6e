//! The gateway's client side: the accept loop of each serving thread (plain HTTP or HTTPS) and
//! the limits every client is held to, so that slow or greedy clients cannot take the gateway
//! away from everyone else: a deadline for the TLS handshake and for each request's headers
//! (slowloris), one for a body the gateway reads whole, a bound on header bytes, and a bound on
//! open connections.

use super::GatewayStartError;
use axum::Router;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

/// What one client may hold of a gateway, and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientLimits {
    /// Time to finish the TLS handshake, and then to send each request's headers.
    pub header_timeout: Duration,
    /// Time to send a body the gateway reads whole before forwarding (one it may retry or
    /// queue: a known length up to the agent's replay limit).
    pub body_timeout: Duration,
    /// Bytes of a request's header fields, names and values.
    pub max_header_bytes: usize,
    /// Open client connections per gateway; one beyond it is answered 503 and closed.
    pub max_connections: usize,
}

impl Default for ClientLimits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(60),
            max_header_bytes: 32 * 1024,
            max_connections: 4096,
        }
    }
}

impl ClientLimits {
    /// Refuses limits that would make the gateway unusable, naming the setting.
    pub fn validate(&self) -> Result<(), GatewayStartError> {
        let bad = |setting: &'static str, reason: &str| {
            Err(GatewayStartError::Config {
                setting,
                reason: reason.to_string(),
            })
        };
        if self.header_timeout < Duration::from_millis(100) {
            return bad("header_timeout", "must be at least 100ms");
        }
        if self.body_timeout < Duration::from_millis(100) {
            return bad("body_timeout", "must be at least 100ms");
        }
        if !(1024..=1024 * 1024).contains(&self.max_header_bytes) {
            return bad("max_header_bytes", "must be from 1024 to 1048576");
        }
        if self.max_connections == 0 {
            return bad("max_connections", "must be at least 1");
        }
        Ok(())
    }

    /// Where hyper itself stops reading a request head (431 with no body, connection closed):
    /// well above `max_header_bytes`, which the handler checks and answers with a JSON error
    /// that names the limit, so that only a head far over the limit meets this one.
    fn head_backstop(&self) -> usize {
        2 * self.max_header_bytes + 16 * 1024
    }
}

/// How long a stopping gateway waits for open requests to finish.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// The pause after a failed accept (most likely out of file descriptors), so as not to spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// How long a refused connection is given to take its 503 before it is closed.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// A listening socket on `addr` that other threads may also listen on (`SO_REUSEPORT`): the
/// kernel spreads connections over them.
pub(super) fn bind_shared(addr: SocketAddr) -> Result<std::net::TcpListener, GatewayStartError> {
    let bound = (|| {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        socket.set_nodelay(true)?;
        socket.bind(addr)?;
        socket.listen(1024)?.into_std()
    })();
    bound.map_err(|source| GatewayStartError::Bind { addr, source })
}

/// What every serving thread shares.
#[derive(Clone)]
pub(super) struct Serving {
    pub app: Router,
    pub stop: watch::Receiver<bool>,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub limits: ClientLimits,
    /// One permit per open client connection, shared by all serving threads.
    pub connections: Arc<Semaphore>,
}

/// One serving thread: a single-threaded runtime with its own accept loop, like an nginx
/// worker, so that a request and its upstream call never hop between threads.
pub(super) fn serve_on_this_thread(
    listener: std::net::TcpListener,
    serving: Serving,
) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        accept_loop(listener, serving).await
    })
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Each connection (its handshake, then its requests) in a task of its own, so that a slow
/// client holds up no other; on stop, no new connections and the open ones finish their
/// requests, up to [`DRAIN_TIMEOUT`].
async fn accept_loop(listener: tokio::net::TcpListener, serving: Serving) -> std::io::Result<()> {
    let graceful = GracefulShutdown::new();
    loop {
        let (tcp, client) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            _ = stopped(serving.stop.clone()) => break,
        };
        let _ = tcp.set_nodelay(true);
        let permit = serving.connections.clone().try_acquire_owned().ok();
        let (serving, watcher) = (serving.clone(), graceful.watcher());
        tokio::spawn(async move {
            let limits = serving.limits;
            match &serving.tls {
                None => connection(tcp, client, serving.app, limits, permit, watcher).await,
                Some(acceptor) => {
                    match tokio::time::timeout(limits.header_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            connection(tls, client, serving.app, limits, permit, watcher).await
                        }
                        Ok(Err(e)) => tracing::debug!(%client, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%client, "TLS handshake not finished in time"),
                    }
                }
            }
        });
    }
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after {DRAIN_TIMEOUT:?}; closing them");
    }
    Ok(())
}

/// Serves the requests of one client connection, or refuses it when the gateway has no
/// connection left (`permit` is `None`).
async fn connection<I>(
    io: I,
    client: SocketAddr,
    app: Router,
    limits: ClientLimits,
    permit: Option<OwnedSemaphorePermit>,
    watcher: Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use tower::ServiceExt;
    let Some(_permit) = permit else {
        tracing::debug!(%client, limit = limits.max_connections, "connection refused: too many open");
        refuse(io, limits.max_connections).await;
        return;
    };
    let service = app.map_request(move |mut request: http::Request<hyper::body::Incoming>| {
        request
            .extensions_mut()
            .insert(axum::extract::ConnectInfo(client));
        request
    });
    let connection = hyper::server::conn::http1::Builder::new()
        // The deadline runs from the connection's start for the first request: a client that
        // sends nothing, or trickles its headers, is cut off.
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_header_size(limits.head_backstop())
        .serve_connection(
            hyper_util::rt::TokioIo::new(io),
            hyper_util::service::TowerToHyperService::new(service),
        );
    let _ = watcher.watch(connection).await;
}

/// Answers a connection the gateway has no room for with a 503 that names the limit, then
/// closes it (after reading what the client sent, for up to [`REFUSAL_LINGER`], so that the
/// close does not reset the connection before the client has read the answer).
async fn refuse<I: AsyncRead + AsyncWrite + Unpin>(mut io: I, limit: usize) {
    let body = serde_json::json!({"error": {
        "code": "too_many_connections",
        "message": format!("the gateway has {limit} open connections, its limit (--max-connections); retry later"),
    }})
    .to_string();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        io.write_all(response.as_bytes()).await?;
        io.shutdown().await?;
        let mut sink = [0u8; 4096];
        while io.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}
