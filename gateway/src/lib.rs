//! The gateway: `ANY /agents/{name}/{path...}` to a ready replica of the agent, through a tower
//! stack of load shedding, a concurrency limit, budgeted retries and per-replica circuit
//! breakers with timeouts. It learns routes from an etcd watch and runs as its own process
//! (`berth gateway`), so that several can serve side by side. It reaches the rest of Berth only
//! through the store and the contract (docs/architecture.md, "A request's path").
#![forbid(unsafe_code)]

mod balance;
mod breaker;
mod breakers;
mod error;
mod forward;
mod load;
mod metrics;
mod outcome;
mod replay;
mod retry;
mod routes;
pub mod serve;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use balance::{Balancer, BreakerChange, Pool};
use berth_store::{Store, StoreError};
use bytes::Bytes;
use error::{to_response, GatewayError};
use forward::{Forward, ForwardBody, Upstream};
use http::{header, HeaderMap, StatusCode};
use http_body_util::BodyExt;
use metrics::{AgentLabels, GatewayMetrics};
use retry::RetryPolicy;
use routes::{Route, Routes};
use serve::ClientLimits;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::util::BoxCloneService;
use tower::{BoxError, ServiceBuilder, ServiceExt};

/// Requests in flight per agent before more are shed with 503.
pub const MAX_CONCURRENCY: usize = 1024;

/// Every setting of `berth gateway`.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// etcd endpoints.
    pub etcd: Vec<String>,
    /// Key prefix in etcd.
    pub prefix: String,
    /// HTTP address of the gateway.
    pub listen: SocketAddr,
    /// HTTP address of `/metrics`, `/healthz` and `/readyz`.
    pub admin_listen: SocketAddr,
    /// Serve the admin listener over TLS with the gateway's certificate (`tls`).
    pub admin_tls: bool,
    /// File of tokens that may read `/metrics`; when set, `/metrics` needs a token (from it,
    /// `token_file`, or an admin or read-only token made through `TokenService`).
    pub admin_token_file: Option<std::path::PathBuf>,
    /// Requests in flight per agent before shedding.
    pub max_concurrency: usize,
    /// This gateway's name in the breaker states it publishes.
    pub name: String,
    /// Serving threads (0: one per CPU).
    pub workers: usize,
    /// File of admin tokens (one per line), which may read any agent's stored requests.
    pub token_file: Option<std::path::PathBuf>,
    /// PEM certificate (chain) and key to serve HTTPS with; plain HTTP when unset.
    pub tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// What each client may hold of the gateway, and for how long.
    pub limits: ClientLimits,
    /// How long an answer's body may go without a byte before it is cut (`None`: never).
    pub stream_idle_timeout: Option<std::time::Duration>,
    /// TLS files for `https://` etcd endpoints.
    pub etcd_tls: berth_store::EtcdTls,
}

/// Why the gateway could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum GatewayStartError {
    /// The TLS certificate or key cannot be used.
    #[error("TLS: {0}")]
    Tls(String),
    /// etcd could not be reached.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// A server failed.
    #[error("gateway server: {0}")]
    Serve(#[source] std::io::Error),
    /// A setting is wrong.
    #[error("invalid {setting}: {reason}")]
    Config {
        setting: &'static str,
        reason: String,
    },
}

/// One agent's stack and the pool it balances over.
struct AgentStack {
    pool: Arc<Pool>,
    /// Its request metrics, resolved once.
    metrics: metrics::AgentMetrics,
    /// A clone serves each request; the lock is held only to clone (the stack is not `Sync`).
    service: Mutex<BoxCloneService<Forward, Response<Body>, GatewayError>>,
}

/// Shared state of the request handlers.
pub struct Gateway {
    routes: watch::Receiver<Arc<Routes>>,
    store: Store,
    stats: Arc<replay::QueueStats>,
    admin_tokens: berth_store::token_mirror::TokenSet,
    stacks: Mutex<HashMap<String, Arc<AgentStack>>>,
    upstream: Upstream,
    metrics: Arc<GatewayMetrics>,
    /// Requests for agents the gateway does not know, all under one label.
    unknown: metrics::AgentMetrics,
    changes: mpsc::UnboundedSender<BreakerChange>,
    max_concurrency: usize,
    limits: ClientLimits,
    /// The load of autoscaled agents, reported for the autoscaler.
    loads: Arc<load::Loads>,
}

impl Gateway {
    /// Counts a request of `agent` queued for replay.
    fn count_queued(&self, agent: &str) {
        self.metrics
            .queued
            .get_or_create(&AgentLabels {
                agent: agent.to_string(),
            })
            .inc();
    }

    /// The stack of `route`'s agent, made on first use; the pool follows the route.
    fn stack(&self, route: &Arc<Route>) -> Arc<AgentStack> {
        let mut stacks = self.stacks.lock().expect("stacks lock");
        if let Some(stack) = stacks.get(&route.agent) {
            stack.pool.update(route.clone());
            return stack.clone();
        }
        let stack = stacks.entry(route.agent.clone()).or_insert_with(|| {
            let pool = Arc::new(Pool::new(route.clone(), self.changes.clone()));
            let service = build_stack(
                &route.agent,
                pool.clone(),
                self.upstream,
                self.metrics.clone(),
                self.max_concurrency,
            );
            Arc::new(AgentStack {
                pool,
                metrics: metrics::AgentMetrics::new(&route.agent, self.metrics.clone()),
                service: Mutex::new(service),
            })
        });
        stack.pool.update(route.clone());
        stack.clone()
    }

    /// The breaker state of every replica this gateway has sent to, by agent and replica.
    pub fn breaker_states(&self) -> Vec<(String, String, berth_proto::v1::BreakerState)> {
        let stacks = self.stacks.lock().expect("stacks lock");
        stacks
            .iter()
            .flat_map(|(agent, stack)| {
                stack
                    .pool
                    .replicas()
                    .iter()
                    .map(|r| (agent.clone(), r.endpoint.replica.clone(), r.breaker.state()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

/// The request path of one agent, outermost layer first. Built here and nowhere else.
fn build_stack(
    agent: &str,
    pool: Arc<Pool>,
    upstream: Upstream,
    metrics: Arc<GatewayMetrics>,
    max_concurrency: usize,
) -> BoxCloneService<Forward, Response<Body>, GatewayError> {
    let name = agent.to_string();
    let service = ServiceBuilder::new()
        // Outermost: whatever a layer below refused with becomes a GatewayError, which the
        // handler turns into the JSON answer.
        .map_err(move |e: BoxError| match e.downcast::<GatewayError>() {
            Ok(e) => *e,
            Err(_) => GatewayError::Overloaded {
                agent: name.clone(),
            },
        })
        // Directly above the limit: when the limit has no permit left, the request is refused
        // at once (503 + Retry-After) instead of waiting, so that overload does not become
        // latency for everyone.
        .load_shed()
        // Above the retries: a request holds one permit however many attempts it takes, so
        // retries cannot multiply the load the limit admits.
        .concurrency_limit(max_concurrency)
        // Above the balancer: each attempt picks a replica again, skipping those tried, and
        // goes through that replica's breaker and timeout (inside the balancer), so that a
        // retry both lands elsewhere and counts against the replica that failed.
        .retry(RetryPolicy::new(agent, pool.clone(), metrics))
        // Innermost: power of two choices over the replicas whose breaker admits, the agent's
        // timeout per attempt, and the breaker told of every outcome.
        .service(Balancer::new(pool, upstream));
    BoxCloneService::new(service)
}

/// Runs the gateway until `shutdown` completes.
pub async fn run(
    config: GatewayConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayStartError> {
    if config.max_concurrency == 0 {
        return Err(GatewayStartError::Config {
            setting: "max_concurrency",
            reason: "must be at least 1".into(),
        });
    }
    config.limits.validate()?;
    if config.admin_tls && config.tls.is_none() {
        return Err(GatewayStartError::Config {
            setting: "admin_tls",
            reason: "needs tls_cert and tls_key: the admin listener serves the same certificate"
                .into(),
        });
    }
    if let Err((setting, reason)) = config.etcd_tls.check(&config.etcd) {
        return Err(GatewayStartError::Config { setting, reason });
    }
    let admin_tokens = match &config.token_file {
        Some(path) => berth_store::token_mirror::TokenSet::from_file(path).map_err(|e| {
            GatewayStartError::Config {
                setting: "token_file",
                reason: e.to_string(),
            }
        })?,
        None => berth_store::token_mirror::TokenSet::default(),
    };
    let store = Store::connect(&config.etcd, &config.prefix, &config.etcd_tls).await?;
    // Every background loop gets `stop` and runs on `tasks`; see the end of this function.
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let (routes_tx, routes_rx) = watch::channel(Arc::new(Routes::new()));
    let (ready_tx, ready_rx) = watch::channel(false);
    tasks.spawn(routes::follow(
        store.clone(),
        routes_tx,
        ready_tx,
        stop.child_token(),
    ));
    let metrics = GatewayMetrics::new();
    {
        let (seconds, sizes) = (
            metrics.commit_seconds.clone(),
            metrics.commit_transactions.clone(),
        );
        store.observe_commits(move |transactions, took| {
            sizes.observe(transactions as f64);
            seconds.observe(took.as_secs_f64());
        });
    }
    let (changes_tx, changes_rx) = mpsc::unbounded_channel();
    tasks.spawn(breakers::publish(
        store.clone(),
        config.name.clone(),
        changes_rx,
        metrics.clone(),
        stop.child_token(),
    ));
    let loads = Arc::new(load::Loads::new(metrics.clone()));
    let stats: Arc<replay::QueueStats> = Arc::default();
    tasks.spawn(load::report(
        store.clone(),
        config.name.clone(),
        routes_rx.clone(),
        loads.clone(),
        stats.clone(),
        stop.child_token(),
    ));
    let gateway = Arc::new(Gateway {
        loads,
        routes: routes_rx,
        store: store.clone(),
        stats,
        admin_tokens: admin_tokens.clone(),
        stacks: Mutex::default(),
        upstream: Upstream {
            stream_idle: config.stream_idle_timeout,
        },
        unknown: metrics::AgentMetrics::new(metrics::UNKNOWN_AGENT, metrics.clone()),
        metrics: metrics.clone(),
        changes: changes_tx,
        max_concurrency: config.max_concurrency,
        limits: config.limits,
    });
    tasks.spawn(replay::replayer::run(
        gateway.clone(),
        config.name.clone(),
        stop.child_token(),
    ));
    let app = Router::new()
        .route("/requests/{id}", get(replay::results::get_request))
        .route("/agents/{name}", any(proxy))
        .route("/agents/{name}/", any(proxy))
        .route("/agents/{name}/{*rest}", any(proxy))
        .fallback(not_found)
        .with_state(gateway);
    // Issued tokens may read /metrics once it is protected; they are mirrored only then.
    let issued = config.admin_token_file.as_ref().map(|_| {
        let issued = berth_store::token_mirror::IssuedTokens::default();
        tasks.spawn(berth_store::token_mirror::mirror_tokens(
            store.clone(),
            issued.clone(),
            stop.child_token(),
        ));
        issued
    });
    let admin = berth_admin::Admin::bind(
        &berth_admin::AdminConfig {
            listen: config.admin_listen,
            tls: config.tls.clone().filter(|_| config.admin_tls),
            token_file: config.admin_token_file.clone(),
        },
        berth_admin::Endpoints {
            metrics: Arc::new(move || metrics.encode()),
            ready: Arc::new(move || {
                let ready = *ready_rx.borrow();
                Box::pin(async move {
                    ready
                        .then_some(())
                        .ok_or_else(|| "routes not listed yet".to_string())
                })
            }),
        },
        berth_admin::ServerTokens {
            admin: config.token_file.as_ref().map(|_| admin_tokens.clone()),
            issued,
        },
    )
    .await
    .map_err(|e| GatewayStartError::Config {
        setting: "admin",
        reason: e.to_string(),
    })?;
    let tls = match &config.tls {
        Some((cert, key)) => {
            Some(berth_admin::tls::acceptor(cert, key).map_err(GatewayStartError::Tls)?)
        }
        None => None,
    };
    let workers = match config.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let listeners = (0..workers)
        .map(|_| serve::bind_shared(config.listen))
        .collect::<Result<Vec<_>, _>>()?;
    tracing::info!(listen = %config.listen, admin = %format!("{}://{}", admin.scheme(), config.admin_listen), workers, etcd = %config.etcd.join(","), "gateway serving");
    let (stop_tx, stop_rx) = watch::channel(false);
    let admin = tokio::spawn(admin.serve({
        let mut stop = stop_rx.clone();
        async move {
            let _ = stop.wait_for(|stop| *stop).await;
        }
    }));
    let serving = serve::Serving {
        app,
        stop: stop_rx,
        tls,
        limits: config.limits,
        connections: Arc::new(tokio::sync::Semaphore::new(config.limits.max_connections)),
    };
    let threads: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(i, listener)| {
            let serving = serving.clone();
            std::thread::Builder::new()
                .name(format!("gateway-{i}"))
                .spawn(move || serve::serve_on_this_thread(listener, serving))
                .map_err(GatewayStartError::Serve)
        })
        .collect::<Result<_, _>>()?;
    shutdown.await;
    tracing::info!("gateway stopping");
    // Stop taking requests and claiming queued ones at once; then wait for what is in flight
    // (client requests up to the drain bound, deliveries up to the replayer's).
    let _ = stop_tx.send(true);
    stop.cancel();
    tasks.close();
    let served = tokio::task::spawn_blocking(move || {
        threads
            .into_iter()
            .map(|t| t.join().expect("serving thread"))
            .collect::<std::io::Result<Vec<()>>>()
    })
    .await
    .expect("joining the serving threads");
    let _ = admin.await;
    tasks.wait().await;
    served.map(|_| ()).map_err(GatewayStartError::Serve)
}

async fn not_found() -> Response {
    let body = serde_json::json!({"error": {"code": "not_found", "message": "the gateway serves /agents/{name}/..."}});
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// `ANY /agents/{name}/{path...}`.
async fn proxy(
    State(gateway): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    let started = Instant::now();
    let agent = berth_proto::request::agent_of(request.uri().path());
    let route = gateway.routes.borrow().get(agent).cloned();
    let Some(route) = route else {
        let e = GatewayError::UnknownAgent {
            agent: agent.to_string(),
        };
        tracing::debug!(error = %e, "answered by the gateway");
        let response = to_response(&e);
        gateway
            .unknown
            .observe(response.status().as_u16(), started.elapsed().as_secs_f64());
        return response;
    };
    let stack = gateway.stack(&route);
    let response = match forward(&gateway, &route, &stack, peer, request).await {
        Ok(response) => response,
        Err(e) => {
            if matches!(e, GatewayError::Overloaded { .. }) {
                gateway
                    .metrics
                    .shed
                    .get_or_create(&AgentLabels {
                        agent: route.agent.clone(),
                    })
                    .inc();
            }
            tracing::debug!(agent = %route.agent, error = %e, "answered by the gateway");
            to_response(&e)
        }
    };
    stack
        .metrics
        .observe(response.status().as_u16(), started.elapsed().as_secs_f64());
    response
}

async fn forward(
    gateway: &Gateway,
    route: &Arc<Route>,
    stack: &AgentStack,
    peer: SocketAddr,
    request: Request,
) -> Result<Response, GatewayError> {
    let agent = route.agent.as_str();
    if !route.token_sha256.is_empty() && !token_matches(request.headers(), &route.token_sha256) {
        return Err(GatewayError::Unauthorized {
            agent: agent.to_string(),
        });
    }
    let (mut parts, body) = request.into_parts();
    let class = berth_proto::request::classify(
        &parts.method,
        &parts.uri,
        &parts.headers,
        gateway.limits.max_header_bytes,
        route.replay.max_body_bytes,
    )?;
    if !route.token_sha256.is_empty() {
        // The gateway key is the gateway's business: the agent never sees it, and it is not
        // stored with a queued request.
        parts.headers.remove(header::AUTHORIZATION);
    }
    let opted_out = class.opted_out || route.replay.disabled;
    // An autoscaled agent's load counts what it is asked for, refused or not.
    let load = route.autoscaled.then(|| gateway.loads.of(agent));
    if let Some(load) = &load {
        load.received();
        if route.replicas.is_empty() {
            // No replica ready: the autoscaler hears of it now, not at the next report.
            gateway.loads.wake();
        }
    }
    // A streamed body is gathered only when it may have to be kept.
    let keep = !opted_out || parts.headers.contains_key(forward::IDEMPOTENCY_KEY);
    let body = read_body(
        class.body,
        body,
        gateway.limits.body_timeout,
        keep.then_some(route.replay.max_body_bytes),
    )
    .await?;
    let mut forward = Forward {
        agent: agent.to_string(),
        method: parts.method,
        path_and_query: class.upstream,
        headers: Arc::new(forward::upstream_headers(
            parts.headers,
            agent,
            Some(peer.ip()),
        )),
        body,
        tried: Vec::new(),
    };
    let safe = class.safe;
    let mut keyed = replay::idempotency::keyed(&forward);
    // A copy for the queue (or for keeping a keyed answer): bodies are reference-counted.
    let kept = if opted_out && keyed.is_none() {
        None
    } else {
        Some(forward.try_clone().unwrap_or_else(|| Forward {
            body: ForwardBody::Streaming(Body::empty()),
            tried: Vec::new(),
            agent: forward.agent.clone(),
            method: forward.method.clone(),
            path_and_query: forward.path_and_query.clone(),
            headers: forward.headers.clone(),
        }))
    };
    if let (Some(keyed), Some(copy)) = (&keyed, kept.as_ref().and_then(Forward::try_clone)) {
        // No replica is ready, so the request can only be queued: its key is taken in the
        // same commit as its record (one etcd round trip instead of two). A key already held
        // goes the usual way below, which answers from its holder.
        if route.replicas.is_empty() && !opted_out {
            let why = outcome::Ending::NoReplica;
            let queued = Box::pin(replay::enqueue(
                &gateway.store,
                &gateway.stats,
                &gateway.loads,
                route,
                copy,
                why,
                Some(keyed),
            ))
            .await?;
            if let Some(accepted) = queued {
                gateway.count_queued(agent);
                return Ok(accepted);
            }
        }
    }
    // The digest of a streamed keyed body's whole payload, once it has passed.
    let mut streamed = None;
    if let Some(keyed) = &mut keyed {
        use replay::idempotency::{begin, Begin};
        let id = forward.request_id().to_string();
        match Box::pin(begin(&gateway.store, route, keyed, &id)).await? {
            Begin::Fresh => {}
            Begin::Answer(answer) => return Ok(answer),
            // A repeat whose body streams: compared body and all, it is answered from the
            // first, or refused; it is never sent (its body is read through).
            Begin::NeedsBody => {
                let whole = replay::idempotency::digest_whole(&mut forward, route.timeout).await?;
                keyed.whole = Some(whole);
                match Box::pin(begin(&gateway.store, route, keyed, &id)).await? {
                    Begin::Answer(answer) => return Ok(answer),
                    // Let go meanwhile (dropped, expired): this one took it, but its body
                    // is gone; the client sends it again.
                    Begin::Fresh | Begin::NeedsBody => {
                        Box::pin(replay::idempotency::release(&gateway.store, agent, keyed)).await;
                        return Err(GatewayError::KeyInFlight {
                            agent: agent.to_string(),
                        });
                    }
                }
            }
        }
        streamed = replay::idempotency::digest_as_it_passes(&mut forward);
    }
    let service = stack.service.lock().expect("stack lock").clone();
    let result = match &load {
        Some(load) => {
            let _in_flight = load.in_flight();
            service.oneshot(forward).await
        }
        None => service.oneshot(forward).await,
    };
    let ending = outcome::Ending::of(&result);
    match (ending.decide(safe, opted_out), kept, keyed) {
        (outcome::Decision::Queue, Some(kept), keyed) => {
            // The store's futures are large: boxed, the paths that use them do not make every
            // request's future (moved a few times on its way) as large.
            let queued = Box::pin(replay::enqueue(
                &gateway.store,
                &gateway.stats,
                &gateway.loads,
                route,
                kept,
                ending,
                None,
            ))
            .await
            .map(|q| q.expect("stored without a key to take"));
            match (&queued, &keyed) {
                (Ok(_), _) => gateway.count_queued(agent),
                (Err(_), Some(keyed)) => {
                    Box::pin(replay::idempotency::release(&gateway.store, agent, keyed)).await
                }
                (Err(_), None) => {}
            }
            queued
        }
        (_, Some(kept), Some(keyed)) => {
            Box::pin(replay::idempotency::finish(
                &gateway.store,
                route,
                kept,
                keyed,
                streamed,
                result,
            ))
            .await
        }
        _ => result,
    }
}

/// How long a streamed body (chunked, no `Content-Length`) is gathered before it is sent on as
/// it comes ([`gather`]).
pub const GATHER_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);

/// Takes the body as `plan` says: a buffered one must arrive within `timeout`; a streamed one is
/// gathered whole when it ends within `gather_limit` bytes (if any) and [`GATHER_WINDOW`].
async fn read_body(
    plan: berth_proto::request::BodyPlan,
    body: Body,
    timeout: std::time::Duration,
    gather_limit: Option<u64>,
) -> Result<ForwardBody, GatewayError> {
    match plan {
        berth_proto::request::BodyPlan::Buffer(_) => {
            let bytes = tokio::time::timeout(timeout, body.collect())
                .await
                .map_err(|_| GatewayError::BodyTimeout { timeout })?
                .map_err(|e| GatewayError::BadRequest(format!("reading the request body: {e}")))?
                .to_bytes();
            Ok(ForwardBody::Buffered(bytes))
        }
        berth_proto::request::BodyPlan::Empty => Ok(ForwardBody::Buffered(Bytes::new())),
        berth_proto::request::BodyPlan::Stream => match gather_limit {
            Some(limit) => gather(body, limit, GATHER_WINDOW).await,
            None => Ok(ForwardBody::Streaming(body)),
        },
    }
}

/// A streamed body, whole when it ends within `limit` bytes and `window`: like one sent with
/// its length, it can then be queued, replayed and kept with its `Idempotency-Key` (many
/// clients stream a body whose length they do not know beforehand, though it is small and
/// ready). A larger or slower one goes on to the agent as it comes, what was gathered first.
async fn gather(
    mut body: Body,
    limit: u64,
    window: std::time::Duration,
) -> Result<ForwardBody, GatewayError> {
    let until = tokio::time::Instant::now() + window;
    let mut gathered = bytes::BytesMut::new();
    let mut trailers = None;
    loop {
        let frame = match tokio::time::timeout_at(until, body.frame()).await {
            Err(_) => break,
            Ok(None) => return Ok(ForwardBody::Buffered(gathered.freeze())),
            Ok(Some(Err(e))) => {
                return Err(GatewayError::BadRequest(format!(
                    "reading the request body: {e}"
                )))
            }
            Ok(Some(Ok(frame))) => frame,
        };
        match frame.into_data() {
            Ok(data) => {
                gathered.extend_from_slice(&data);
                if gathered.len() as u64 > limit {
                    break;
                }
            }
            // Trailers: sent on as they came, after the data.
            Err(other) => {
                trailers = Some(other);
                break;
            }
        }
    }
    let data = (!gathered.is_empty()).then(|| http_body::Frame::data(gathered.freeze()));
    let first = data.into_iter().chain(trailers).map(Ok::<_, axum::Error>);
    let rest = http_body_util::BodyStream::new(body);
    let stream = futures::StreamExt::chain(futures::stream::iter(first), rest);
    Ok(ForwardBody::Streaming(Body::new(
        http_body_util::StreamBody::new(stream),
    )))
}

/// The bearer token of a request, if any.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Whether the request carries the agent's gateway token (`Authorization: Bearer <token>`),
/// compared by SHA-256 in constant time.
pub(crate) fn token_matches(headers: &HeaderMap, sha256_hex: &str) -> bool {
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;
    let Some(token) = bearer(headers) else {
        return false;
    };
    let digest = Sha256::digest(token.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    hex.as_bytes().ct_eq(sha256_hex.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A streamed body whose chunks the test sends, and the sender.
    fn streamed() -> (mpsc::Sender<Bytes>, Body) {
        let (tx, rx) = mpsc::channel::<Bytes>(16);
        let frames =
            futures::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), |b| {
                Ok::<_, std::convert::Infallible>(http_body::Frame::data(b))
            });
        (tx, Body::new(http_body_util::StreamBody::new(frames)))
    }

    async fn all_of(body: ForwardBody) -> Vec<u8> {
        match body {
            ForwardBody::Buffered(b) => b.to_vec(),
            ForwardBody::Streaming(b) => b.collect().await.unwrap().to_bytes().to_vec(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_streamed_body_that_ends_within_the_limit_and_window_is_gathered_whole() {
        let (tx, body) = streamed();
        tokio::spawn(async move {
            for chunk in ["ab", "cd", "ef"] {
                tokio::time::sleep(Duration::from_millis(300)).await;
                tx.send(Bytes::from(chunk)).await.unwrap();
            }
        });
        let gathered = gather(body, 6, GATHER_WINDOW).await.unwrap();
        assert!(matches!(&gathered, ForwardBody::Buffered(b) if b == "abcdef"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_streamed_body_over_the_limit_or_slower_than_the_window_streams_on_whole() {
        // Over the limit: streams on at once, nothing lost or reordered.
        let (tx, body) = streamed();
        for chunk in ["abc", "def", "ghi"] {
            tx.send(Bytes::from(chunk)).await.unwrap();
        }
        let started = tokio::time::Instant::now();
        let over = gather(body, 5, GATHER_WINDOW).await.unwrap();
        assert!(started.elapsed() < GATHER_WINDOW);
        assert!(matches!(over, ForwardBody::Streaming(_)));
        drop(tx);
        assert_eq!(all_of(over).await, b"abcdefghi");

        // Within the limit but still coming after the window: streams on after it.
        let (tx, body) = streamed();
        tx.send(Bytes::from("ab")).await.unwrap();
        let started = tokio::time::Instant::now();
        let slow = gather(body, 1024, GATHER_WINDOW).await.unwrap();
        assert_eq!(started.elapsed(), GATHER_WINDOW);
        assert!(matches!(slow, ForwardBody::Streaming(_)));
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            tx.send(Bytes::from("cd")).await.unwrap();
        });
        assert_eq!(all_of(slow).await, b"abcd");
    }

    fn forward_get(path: &str) -> Forward {
        Forward {
            agent: "a".into(),
            method: http::Method::GET,
            path_and_query: path.into(),
            headers: Arc::default(),
            body: ForwardBody::Buffered(Bytes::new()),
            tried: vec![],
        }
    }

    /// The stack over a real HTTP replica on loopback: with one request in flight and a limit
    /// of one, the next is shed at once; the one in flight ends at the agent's timeout.
    #[tokio::test]
    async fn a_full_agent_sheds_at_once_and_a_hung_replica_times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let replica = Router::new()
            .route("/hang", get(std::future::pending::<&'static str>))
            .route("/ok", get(|| async { "ok" }));
        let server = tokio::spawn(std::future::IntoFuture::into_future(axum::serve(
            listener, replica,
        )));
        let mut route = routes::test_route(&["a-0"]);
        route.timeout = Duration::from_millis(300);
        route.replicas[0].address = address;
        let route = Arc::new(route);
        let pool = Arc::new(Pool::new(route, mpsc::unbounded_channel().0));
        let metrics = GatewayMetrics::new();
        let stack = build_stack("a", pool.clone(), Upstream::default(), metrics, 1);
        let hung = tokio::spawn(stack.clone().oneshot(forward_get("/hang")));
        let a0 = pool.replicas()[0].clone();
        let deadline = Instant::now() + Duration::from_secs(5);
        while a0.outstanding() == 0 {
            assert!(
                Instant::now() < deadline,
                "the first request never reached the replica"
            );
            tokio::task::yield_now().await;
        }
        let shed = stack.clone().oneshot(forward_get("/ok")).await;
        assert!(
            matches!(shed, Err(GatewayError::Overloaded { .. })),
            "{shed:?}"
        );
        let timed_out = hung.await.unwrap();
        assert!(
            matches!(timed_out, Err(GatewayError::Timeout { .. })),
            "{timed_out:?}"
        );
        let ok = stack.oneshot(forward_get("/ok")).await.unwrap();
        assert_eq!(ok.status(), StatusCode::OK);
        server.abort();
    }

    #[test]
    fn tokens_are_checked_by_hash() {
        let hash = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"; // "test"
        let mut headers = HeaderMap::new();
        assert!(!token_matches(&headers, hash));
        headers.insert(header::AUTHORIZATION, "Bearer test".parse().unwrap());
        assert!(token_matches(&headers, hash));
        headers.insert(header::AUTHORIZATION, "Bearer nope".parse().unwrap());
        assert!(!token_matches(&headers, hash));
        headers.insert(header::AUTHORIZATION, "Basic test".parse().unwrap());
        assert!(!token_matches(&headers, hash));
    }
}
