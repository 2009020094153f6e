//! Berth's state in etcd, shared by the control plane and the gateway: the key layout, typed
//! reads and writes (every write a compare-and-swap on `mod_revision`), the one
//! list-then-watch primitive ([`watch::list_watch`]) and the token mirror
//! (docs/architecture.md, "Key layout").
#![forbid(unsafe_code)]

mod agents;
mod autoscale;
mod batch;
mod breakers;
mod events;
pub mod keys;
mod nodes;
pub mod requests;
mod tls;
pub mod token_mirror;
mod tokens;
pub mod watch;

pub use events::EventFilter;
pub use keys::Keys;
pub use nodes::{Cordon, LeaseRenewer, Placement};
pub use requests::{Claim, ClaimOutcome, Finished, HeldKey, Retention, StoredRequest, REQUEST_TTL};
pub use tls::EtcdTls;
pub use token_mirror::{IssuedTokens, Principal, TokenSet};

use etcd_client::{Client, ConnectOptions, TlsOptions, Txn};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

/// How long one etcd call may take before the API answers `UNAVAILABLE`.
pub const ETCD_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long connecting to an etcd endpoint may take.
pub const ETCD_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// HTTP/2 pings to each etcd member, and how long one may go unanswered before the connection
/// is given up: the watches and keep-alive streams on a member that went silent (stopped,
/// cut off without a reset) then end within 9 s and resume on another, instead of waiting for
/// TCP to give up. Not more often: etcd's `--grpc-keepalive-min-time` (5 s by default) answers
/// pings that come faster by closing the connection.
pub const ETCD_PING_EVERY: Duration = Duration::from_secs(6);
/// See [`ETCD_PING_EVERY`].
pub const ETCD_PING_TIMEOUT: Duration = Duration::from_secs(3);

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The object does not exist.
    #[error("{kind} {name} not found")]
    NotFound { kind: &'static str, name: String },
    /// Create of an object that exists.
    #[error("{kind} {name} already exists")]
    AlreadyExists { kind: &'static str, name: String },
    /// A compare-and-swap lost: someone else wrote first.
    #[error("{kind} {name} was changed by someone else (now at version {current}): re-read it and retry")]
    Conflict {
        kind: &'static str,
        name: String,
        current: String,
    },
    /// etcd did not answer.
    #[error("etcd at {endpoints} is unavailable: {source}")]
    Unavailable {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    /// A TLS file for etcd cannot be read.
    #[error("TLS to etcd: {0}")]
    Tls(String),
    /// A request to the store is malformed (a bad page token, say).
    #[error("{0}")]
    Invalid(String),
    /// A write of the leader's work not applied: the leadership it was made under has ended
    /// (another control plane may lead now).
    #[error("no longer the leader (term under lease {lease:x} ended): the write was not applied")]
    NotLeader { lease: i64 },
    /// A stored value could not be decoded.
    #[error("stored value at {key} is corrupt: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: prost::DecodeError,
    },
}

/// Times a write that backs a promise to a client (a 202) is sent again after a transient
/// etcd failure, e.g. landing on a member that just stopped, before giving up.
pub const TRANSIENT_RETRIES: usize = 4;
/// The wait before the first resend; each next one waits this much longer.
pub const TRANSIENT_BACKOFF: Duration = Duration::from_millis(250);

/// How long after an operation's first attempt it may still be sent again after a transient
/// failure. A member that is down fails at once, and the operation is resent up to
/// [`TRANSIENT_RETRIES`] times; one that is silent (stalled, cut off) takes
/// [`ETCD_REQUEST_TIMEOUT`] to fail, and the operation gets one more attempt (on another member,
/// once the endpoint check has let the silent one go) instead of holding its caller for every
/// retry.
pub const RESEND_WITHIN: Duration = Duration::from_secs(10);

/// Whether an etcd error may pass on a resend: the member could not be reached, is not serving
/// now, or did not answer in time (tonic reports its own timeout as `CANCELLED`); another
/// member may do better. Not errors that etcd decided (a failed compare, a lease not found, a
/// request too large).
pub fn transient(error: &etcd_client::Error) -> bool {
    match error {
        etcd_client::Error::GRpcStatus(status) => matches!(
            status.code(),
            tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled
                | tonic::Code::Unknown
        ),
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => false,
    }
}

/// The resends one operation has left after transient failures: [`TRANSIENT_RETRIES`], within
/// [`RESEND_WITHIN`] of its first attempt, each after a longer pause.
pub(crate) struct Resends {
    failures: u32,
    started: tokio::time::Instant,
}

impl Resends {
    pub(crate) fn new() -> Self {
        Self {
            failures: 0,
            started: tokio::time::Instant::now(),
        }
    }

    /// Whether `error` may pass on a resend and one is left (then it counts).
    pub(crate) fn allow(&mut self, error: &etcd_client::Error) -> bool {
        let left =
            (self.failures as usize) < TRANSIENT_RETRIES && self.started.elapsed() < RESEND_WITHIN;
        if left && transient(error) {
            self.failures += 1;
            tracing::debug!(%error, "etcd call failed; sending it again");
            return true;
        }
        false
    }

    /// The pause before the resend just allowed.
    pub(crate) async fn pause(&self) {
        tokio::time::sleep(TRANSIENT_BACKOFF * self.failures).await;
    }

    /// Whether any attempt failed transiently.
    pub(crate) fn any(&self) -> bool {
        self.failures > 0
    }
}

/// Time between checks of each etcd endpoint when there are several.
const ENDPOINT_CHECK: Duration = Duration::from_secs(1);

/// Keeps the client's balanced channel to the etcd members that answer. The channel picks an
/// endpoint per request and does not skip one that is down (a stopped member, or one whose
/// name no longer resolves): its requests would fail although a quorum is up. So each member
/// is checked every second on its own connection; one that fails leaves the channel and one
/// that answers again rejoins (the last one never leaves).
async fn track_endpoints(client: Client, endpoints: Vec<String>, tls: Option<TlsOptions>) {
    let mut options = ConnectOptions::new()
        .with_timeout(ENDPOINT_CHECK)
        .with_connect_timeout(ENDPOINT_CHECK);
    if let Some(tls) = tls {
        options = options.with_tls(tls);
    }
    let mut probes = Vec::new();
    for endpoint in &endpoints {
        match Client::connect([endpoint], Some(options.clone())).await {
            Ok(probe) => probes.push((endpoint.clone(), probe, true)),
            Err(e) => tracing::warn!(%endpoint, error = %e, "cannot check etcd endpoint"),
        }
    }
    let mut tick = tokio::time::interval(ENDPOINT_CHECK);
    loop {
        tick.tick().await;
        // All at once, each bounded: a member whose name no longer resolves can hold a
        // lookup for seconds.
        let answers = futures::future::join_all(probes.iter_mut().map(|(_, probe, _)| async {
            matches!(
                tokio::time::timeout(ENDPOINT_CHECK, probe.status()).await,
                Ok(Ok(_))
            )
        }))
        .await;
        let mut joined = probes.iter().filter(|(_, _, joined)| *joined).count();
        for ((endpoint, _, member), up) in probes.iter_mut().zip(answers) {
            if up && !*member && client.add_endpoint(endpoint.as_str()).await.is_ok() {
                tracing::info!(%endpoint, "etcd endpoint answers again: back in use");
                *member = true;
                joined += 1;
            } else if !up
                && *member
                && joined > 1
                && client.remove_endpoint(endpoint.as_str()).await.is_ok()
            {
                tracing::warn!(%endpoint, "etcd endpoint does not answer: out of use");
                *member = false;
                joined -= 1;
            }
        }
    }
}

/// Whether etcd refused a write because the lease it names no longer exists (expired or
/// revoked).
pub(crate) fn lease_not_found(e: &etcd_client::Error) -> bool {
    e.to_string().contains("lease not found")
}

/// Handle on the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    client: Client,
    keys: Keys,
    endpoints: Arc<str>,
    event_lease: Arc<Mutex<Option<events::BucketLease>>>,
    request_leases: Arc<Mutex<std::collections::HashMap<u64, requests::RequestLease>>>,
    /// The batcher that commits the replay queue's transactions together (started on first
    /// use).
    txns: Arc<tokio::sync::OnceCell<batch::TxnBatcher>>,
    /// Told of each group commit, once set ([`Store::observe_commits`]).
    commits: Arc<std::sync::OnceLock<batch::CommitObserver>>,
    /// The runtime the store was connected on: its background tasks run there, so that they
    /// outlive the runtimes of its callers (a gateway's serving threads stop before it does).
    runtime: tokio::runtime::Handle,
    /// The leader lease that the leader's writes are conditioned on ([`Store::fenced`]).
    fence: Option<i64>,
}

impl Store {
    /// Connects to etcd. The connection is lazy: an unreachable etcd shows up as
    /// `Unavailable` errors on calls, and calls succeed again once it is back.
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        tls: &EtcdTls,
    ) -> Result<Self, StoreError> {
        let joined: Arc<str> = endpoints.join(",").into();
        let tls = tls.options()?;
        let mut options = ConnectOptions::new()
            .with_timeout(ETCD_REQUEST_TIMEOUT)
            .with_connect_timeout(ETCD_CONNECT_TIMEOUT)
            .with_keep_alive(ETCD_PING_EVERY, ETCD_PING_TIMEOUT);
        if let Some(tls) = &tls {
            options = options.with_tls(tls.clone());
        }
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|source| StoreError::Unavailable {
                endpoints: joined.to_string(),
                source,
            })?;
        if endpoints.len() > 1 {
            tokio::spawn(track_endpoints(client.clone(), endpoints.to_vec(), tls));
        }
        Ok(Self {
            client,
            keys: Keys::new(prefix),
            endpoints: joined,
            event_lease: Arc::default(),
            request_leases: Arc::default(),
            txns: Arc::default(),
            commits: Arc::default(),
            runtime: tokio::runtime::Handle::current(),
            fence: None,
        })
    }

    /// This store with the leader's writes (placements, node liveness, autoscale status)
    /// fenced by the term's `lease`: each is applied only while `{prefix}/leader` is held under
    /// that lease, and fails with [`StoreError::NotLeader`] otherwise. A leader that stood
    /// still past its term (SIGSTOP, a stalled VM) and resumes in the middle of a pass thus
    /// writes nothing over what the next leader decided.
    pub fn fenced(&self, lease: i64) -> Store {
        Store {
            fence: Some(lease),
            ..self.clone()
        }
    }

    /// Commits a leader's write `ops` (with `compares`, which must hold too), fenced when this
    /// store is: `Ok(false)` when one of `compares` failed, [`StoreError::NotLeader`] when the
    /// fence did.
    pub(crate) async fn leader_txn(
        &self,
        compares: Vec<etcd_client::Compare>,
        ops: Vec<etcd_client::TxnOp>,
    ) -> Result<bool, StoreError> {
        let mut client = self.client();
        let Some(lease) = self.fence else {
            let txn = Txn::new().when(compares).and_then(ops);
            let resp = client.txn(txn).await.map_err(|e| self.unavailable(e))?;
            return Ok(resp.succeeded());
        };
        // The fence outside, the caller's compares inside: which one failed is told apart.
        let fence =
            etcd_client::Compare::lease(self.keys.leader(), etcd_client::CompareOp::Equal, lease);
        let inner = Txn::new().when(compares).and_then(ops);
        let txn = Txn::new()
            .when([fence])
            .and_then([etcd_client::TxnOp::txn(inner)]);
        let resp = client.txn(txn).await.map_err(|e| self.unavailable(e))?;
        if !resp.succeeded() {
            return Err(StoreError::NotLeader { lease });
        }
        Ok(resp
            .op_responses()
            .into_iter()
            .any(|op| matches!(op, etcd_client::TxnOpResponse::Txn(inner) if inner.succeeded())))
    }

    /// The key layout in use.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Checks that etcd answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut client = self.client.clone();
        client.status().await.map_err(|e| self.unavailable(e))?;
        Ok(())
    }

    fn unavailable(&self, source: etcd_client::Error) -> StoreError {
        StoreError::Unavailable {
            endpoints: self.endpoints.to_string(),
            source,
        }
    }

    fn client(&self) -> Client {
        self.client.clone()
    }

    /// Commits `txn` on its own (not batched); whether its compares held.
    async fn txn_succeeded(&self, txn: etcd_client::Txn) -> Result<bool, StoreError> {
        let resp = self
            .client()
            .txn(txn)
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(resp.succeeded())
    }

    /// `op` again after a transient failure (a member down until the client stops using it,
    /// about a second), up to [`TRANSIENT_RETRIES`] times with a growing pause. Only for
    /// operations that are safe to send twice (reads, and writes checked by a compare).
    async fn again_if_transient<T, F, Fut>(&self, mut op: F) -> Result<T, StoreError>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut resends = Resends::new();
        loop {
            match op(self.client()).await {
                Err(e) if resends.allow(&e) => resends.pause().await,
                result => return result.map_err(|e| self.unavailable(e)),
            }
        }
    }
}

/// A transaction that puts `value` at `key` under `lease` only while the key does not exist:
/// the leader's key, an agent's replayer.
fn create_under_lease(key: &str, value: &str, lease: i64) -> etcd_client::Txn {
    use etcd_client::{Compare, CompareOp};
    etcd_client::Txn::new()
        .when([Compare::create_revision(key, CompareOp::Equal, 0)])
        .and_then([leased_put(key, value, lease)])
}

/// The operation that puts `value` at `key` under `lease`.
fn leased_put(
    key: impl Into<Vec<u8>>,
    value: impl Into<Vec<u8>>,
    lease: i64,
) -> etcd_client::TxnOp {
    etcd_client::TxnOp::put(
        key,
        value,
        Some(etcd_client::PutOptions::new().with_lease(lease)),
    )
}

/// A transaction that puts `value` at `key` under `lease`, for a lease that holds many keys
/// (a gateway's breaker states, its claims). Not a plain put: etcd 3.4 lists every key of the
/// lease to check a plain put under it (its auth check, even with auth off), in the apply loop
/// that all writes wait on, so each such put costs in proportion to the lease's keys (measured
/// by `bench`'s `etcd_ops`: 1,464 puts a second with 3,000 keys on the lease, 136–294 with
/// 15,000 or more); within a transaction it does not.
fn put_under_lease(key: String, value: impl Into<Vec<u8>>, lease: i64) -> etcd_client::Txn {
    etcd_client::Txn::new().and_then([leased_put(key, value, lease)])
}

/// The first value a read found, as text (who holds a key).
fn first_value(kvs: &[etcd_client::KeyValue]) -> Option<String> {
    kvs.first()
        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
}

fn decode<M: prost::Message + Default>(key: &[u8], value: &[u8]) -> Result<M, StoreError> {
    M::decode(value).map_err(|source| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    })
}

/// What etcd says of itself: the member's database size and the current revision.
#[derive(Clone, Copy, Debug, Default)]
pub struct EtcdStatus {
    /// Bytes of the member's database file (what its space quota limits).
    pub db_size: i64,
    /// The store's current revision.
    pub revision: i64,
}

impl Store {
    /// The database size and current revision of the etcd member that answers.
    pub async fn etcd_status(&self) -> Result<EtcdStatus, StoreError> {
        let status = self
            .client()
            .status()
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(EtcdStatus {
            db_size: status.db_size(),
            revision: status.header().map_or(0, |h| h.revision()),
        })
    }

    /// Drops every revision of etcd's history before `revision` (what watchers further
    /// behind re-list). A revision already compacted is not an error.
    pub async fn compact(&self, revision: i64) -> Result<(), StoreError> {
        match self.client().compact(revision, None).await {
            Ok(_) => Ok(()),
            Err(e) if watch::compacted(&e) => Ok(()),
            Err(e) => Err(self.unavailable(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(status: tonic::Status) -> etcd_client::Error {
        etcd_client::Error::GRpcStatus(status)
    }

    #[test]
    fn a_member_that_is_down_or_silent_is_worth_a_resend_and_what_etcd_decided_is_not() {
        // tonic's own request timeout (a silent member) comes as CANCELLED.
        assert!(transient(&status(tonic::Status::cancelled(
            "Timeout expired"
        ))));
        assert!(transient(&status(tonic::Status::unavailable("refused"))));
        assert!(!transient(&status(tonic::Status::failed_precondition(
            "etcdserver: requested lease not found"
        ))));
        assert!(!transient(&status(tonic::Status::invalid_argument(
            "etcdserver: request is too large"
        ))));
    }

    #[tokio::test(start_paused = true)]
    async fn resends_stop_after_their_count_or_their_time() {
        let refused = status(tonic::Status::unavailable("refused"));
        let mut fast = Resends::new();
        for _ in 0..TRANSIENT_RETRIES {
            assert!(fast.allow(&refused));
            fast.pause().await;
        }
        assert!(!fast.allow(&refused), "no more than TRANSIENT_RETRIES");
        // A silent member: each attempt takes the request timeout.
        let mut slow = Resends::new();
        tokio::time::advance(ETCD_REQUEST_TIMEOUT).await;
        assert!(slow.allow(&refused), "one more attempt");
        slow.pause().await;
        tokio::time::advance(ETCD_REQUEST_TIMEOUT).await;
        assert!(!slow.allow(&refused), "not past RESEND_WITHIN");
        let mut decided = Resends::new();
        assert!(!decided.allow(&status(tonic::Status::invalid_argument("too large"))));
        assert!(!decided.any());
    }
}
