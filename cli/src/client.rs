//! The connection to the control plane, and the one place gRPC errors become messages that
//! say what happened and what to do.

use anyhow::anyhow;
use berth_proto::v1::agent_service_client::AgentServiceClient;
use std::time::Duration;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

/// How long connecting to the control plane may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a control plane that took the connection has to answer a first call (its health)
/// before the next address is tried: one that stands still (SIGSTOP, a stalled VM) has its
/// connections accepted by its kernel and never answers them.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(3);
/// HTTP/2 pings on the connection, and how long one may go unanswered: a control plane that
/// stands still during a long call (`logs -f`, `events --watch`) ends it with an error instead
/// of leaving it hanging.
pub const PING_EVERY: Duration = Duration::from_secs(5);
/// See [`PING_EVERY`].
pub const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct BearerToken(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        Ok(request)
    }
}

/// Whether the control plane on `channel` answers a call (its gRPC health; any answer, an
/// error status included, says it is there) within [`ANSWER_TIMEOUT`].
async fn answers(channel: &Channel) -> Result<(), String> {
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let check = health.check(tonic_health::pb::HealthCheckRequest::default());
    match tokio::time::timeout(ANSWER_TIMEOUT, check).await {
        Err(_) => Err(format!(
            "connected, but no answer within {ANSWER_TIMEOUT:?} (is it stopped or overloaded?)"
        )),
        Ok(Err(status)) if status.code() == Code::Unavailable => {
            Err(format!("unavailable: {}", status.message()))
        }
        Ok(_) => Ok(()),
    }
}

/// A client of the control plane at one address.
pub struct Client {
    /// The address, for messages.
    pub addr: String,
    channel: Channel,
    token: BearerToken,
}

/// A client of the request (replay queue) service.
pub type RequestService = berth_proto::v1::request_service_client::RequestServiceClient<
    InterceptedService<Channel, BearerToken>,
>;

impl Client {
    /// Connects to the first control plane of `addrs` that answers (a comma-separated list,
    /// e.g. `http://10.0.0.1:7070,http://10.0.0.2:7070`: any of them serves the whole API).
    pub async fn connect(
        addrs: &str,
        token: Option<&str>,
        tls: Option<&tonic::transport::ClientTlsConfig>,
    ) -> anyhow::Result<Self> {
        let mut failures = Vec::new();
        let mut reached = None;
        for addr in addrs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            let url = if addr.contains("://") {
                addr.to_string()
            } else {
                format!("http://{addr}")
            };
            let endpoint = Endpoint::from_shared(url.clone())
                .map_err(|e| {
                    anyhow!("BERTH_ADDR {addr:?} is not a URL like http://127.0.0.1:7070: {e}")
                })?
                .connect_timeout(CONNECT_TIMEOUT)
                .http2_keep_alive_interval(PING_EVERY)
                .keep_alive_timeout(PING_TIMEOUT)
                .keep_alive_while_idle(true);
            let endpoint = match (url.starts_with("https://"), tls) {
                (true, Some(tls)) => endpoint.tls_config(tls.clone())?,
                (true, None) => {
                    return Err(anyhow!(
                        "{addr} is https: give the CA to verify it with (--tls-ca, BERTH_TLS_CA, \
                         or `ca:` in the CLI config that `berth up` writes)"
                    ))
                }
                (false, _) => endpoint,
            };
            let connected = tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect()).await;
            match connected {
                Ok(Ok(channel)) => match answers(&channel).await {
                    Ok(()) => {
                        reached = Some((addr.to_string(), channel));
                        break;
                    }
                    Err(why) => failures.push(format!("{addr}: {why}")),
                },
                Ok(Err(e)) => failures.push(format!("{addr}: {}", source_chain(&e))),
                Err(_) => {
                    failures.push(format!("{addr}: no connection within {CONNECT_TIMEOUT:?}"))
                }
            }
        }
        let Some((addr, channel)) = reached else {
            return Err(anyhow!(
                "cannot reach the control plane at {}.\n\
                 Is `berth control-plane` running there? Set BERTH_ADDR or --addr to its address \
                 (several, comma-separated, are tried in turn).",
                failures.join("; ")
            ));
        };
        let token = token
            .map(|t| {
                format!("Bearer {t}").parse().map_err(|_| {
                    anyhow!("the API token holds characters that cannot be sent in a header")
                })
            })
            .transpose()?;
        Ok(Self {
            addr,
            channel,
            token: BearerToken(token),
        })
    }

    /// The agent service.
    pub fn agents(&self) -> AgentServiceClient<InterceptedService<Channel, BearerToken>> {
        AgentServiceClient::with_interceptor(self.channel.clone(), self.token.clone())
    }

    /// The node service.
    pub fn nodes(
        &self,
    ) -> berth_proto::v1::node_service_client::NodeServiceClient<
        InterceptedService<Channel, BearerToken>,
    > {
        berth_proto::v1::node_service_client::NodeServiceClient::with_interceptor(
            self.channel.clone(),
            self.token.clone(),
        )
    }

    /// The request (replay queue) service.
    pub fn requests(&self) -> RequestService {
        berth_proto::v1::request_service_client::RequestServiceClient::with_interceptor(
            self.channel.clone(),
            self.token.clone(),
        )
    }

    /// The token service.
    pub fn tokens(
        &self,
    ) -> berth_proto::v1::token_service_client::TokenServiceClient<
        InterceptedService<Channel, BearerToken>,
    > {
        berth_proto::v1::token_service_client::TokenServiceClient::with_interceptor(
            self.channel.clone(),
            self.token.clone(),
        )
    }

    /// Turns a gRPC error into a message for the user.
    pub fn explain(&self, status: Status) -> anyhow::Error {
        let message = status.message();
        let addr = &self.addr;
        // A status the connection made (reset, closed mid-call), not one the server sent.
        if let (Code::Unknown | Code::Cancelled, Some(cause)) =
            (status.code(), std::error::Error::source(&status))
        {
            return anyhow!(
                "the control plane at {addr} is unavailable: the connection failed: {}",
                source_chain(cause)
            );
        }
        match status.code() {
            Code::Unauthenticated => anyhow!(
                "the control plane at {addr} refused the credentials: {message}.\n\
                 Set BERTH_TOKEN or --api-token to an admin token from the control plane's token file."
            ),
            Code::PermissionDenied => anyhow!(
                "the control plane at {addr} refused the call: {message}. Use a token whose \
                 scope allows it (`berth token create --scope admin`)."
            ),
            Code::Unavailable => anyhow!("the control plane at {addr} is unavailable: {message}"),
            Code::NotFound => anyhow!("{message} (berth ls lists the agents)"),
            Code::AlreadyExists => anyhow!(
                "{message}: use `berth apply -f FILE` to change it, or `berth rm NAME` first"
            ),
            Code::Aborted => anyhow!("conflict: {message}"),
            Code::InvalidArgument => anyhow!("{message}"),
            Code::FailedPrecondition => anyhow!("{message}"),
            Code::DeadlineExceeded => anyhow!("the control plane at {addr} did not answer in time: {message}"),
            code => anyhow!("the control plane at {addr} answered {code:?}: {message}"),
        }
    }
}

fn source_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
