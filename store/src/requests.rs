//! The replay queue: requests an agent could not take, kept in etcd until delivered, under
//! leases that expire them after `REQUEST_TTL`. A gateway claims a request (a key under its own
//! short lease) before delivering it, so that two gateways never deliver it at once and a
//! crashed gateway's claim expires.

use super::{decode, transient, Store, StoreError, TRANSIENT_BACKOFF, TRANSIENT_RETRIES};
use berth_proto::v1::{Request, RequestState};
use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp};
use prost::Message;
use std::time::{Duration, Instant, SystemTime};

/// How long a request and its response are kept unless the agent says otherwise.
pub const REQUEST_TTL: Duration = berth_proto::defaults::REPLAY_TTL;
/// A new request lease (per TTL) is granted at most this often, so requests live between
/// their TTL and TTL + this (one lease per bucket, not one per request); shorter TTLs get
/// buckets of a tenth of the TTL.
pub const REQUEST_LEASE_BUCKET: Duration = Duration::from_secs(600);

/// A request as stored, with what a later compare-and-swap needs.
#[derive(Clone, Debug)]
pub struct StoredRequest {
    /// The request.
    pub request: Request,
    /// Its key's `mod_revision`.
    pub revision: i64,
    /// The lease it expires with.
    pub lease: i64,
}

impl StoredRequest {
    fn from_kv(kv: &etcd_client::KeyValue) -> Result<Self, StoreError> {
        Ok(Self {
            request: decode(kv.key(), kv.value())?,
            revision: kv.mod_revision(),
            lease: kv.lease(),
        })
    }
}

/// The cached bucket lease of requests.
#[derive(Debug)]
pub(super) struct RequestLease {
    id: i64,
    granted: Instant,
}

impl Store {
    async fn request_lease(&self, ttl: Duration, renew: bool) -> Result<i64, StoreError> {
        let bucket = REQUEST_LEASE_BUCKET
            .min(ttl / 10)
            .max(Duration::from_secs(1));
        let mut cached = self.request_leases.lock().await;
        if let Some(lease) = cached.get(&ttl.as_secs()) {
            if !renew && lease.granted.elapsed() < bucket {
                return Ok(lease.id);
            }
        }
        let granted = self
            .client()
            .lease_grant((ttl + bucket).as_secs() as i64, None)
            .await
            .map_err(|e| self.unavailable(e))?;
        cached.insert(
            ttl.as_secs(),
            RequestLease {
                id: granted.id(),
                granted: Instant::now(),
            },
        );
        Ok(granted.id())
    }

    /// Stores a new request (queued at the tail of its agent's queue, or already delivered
    /// when it records a direct answer to a request with an `Idempotency-Key`); `seq` and
    /// `expire_time` are set here. Returns only once etcd has committed it.
    pub async fn enqueue_request(
        &self,
        request: &mut Request,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        // After a transient failure the same write is sent again (same key): if the first
        // one was committed after all, its index is there and the request is stored.
        let mut uncertain = false;
        let mut transient_failures = 0;
        for attempt in 0..3 + TRANSIENT_RETRIES {
            let lease = self.request_lease(ttl, attempt > 0 && !uncertain).await?;
            if !uncertain {
                request.seq = new_seq();
                request.expire_time = Some(berth_proto::timestamp(SystemTime::now() + ttl));
            }
            let key = self.keys.request(&request.agent, request.seq);
            let index = self.keys.request_id(&request.id);
            let txn = Txn::new()
                .when([
                    Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
                    Compare::create_revision(index.as_str(), CompareOp::Equal, 0),
                ])
                .and_then([
                    TxnOp::put(
                        key.as_str(),
                        request.encode_to_vec(),
                        Some(PutOptions::new().with_lease(lease)),
                    ),
                    TxnOp::put(
                        index.as_str(),
                        key.as_str(),
                        Some(PutOptions::new().with_lease(lease)),
                    ),
                ])
                .or_else([TxnOp::get(index.as_str(), None)]);
            match self.client().txn(txn).await {
                Ok(resp) if resp.succeeded() => return Ok(()),
                Ok(resp) => {
                    let stored_at = resp.op_responses().into_iter().find_map(|op| match op {
                        etcd_client::TxnOpResponse::Get(get) => {
                            get.kvs().first().map(|kv| kv.value().to_vec())
                        }
                        _ => None,
                    });
                    if uncertain && stored_at.as_deref() == Some(key.as_bytes()) {
                        return Ok(());
                    }
                    // A sequence number taken in the same microsecond: draw again.
                    uncertain = false;
                }
                Err(e) if e.to_string().contains("lease not found") => uncertain = false,
                Err(e) if transient(&e) && transient_failures < TRANSIENT_RETRIES => {
                    transient_failures += 1;
                    uncertain = true;
                    tracing::debug!(error = %e, "etcd write failed; sending it again");
                    tokio::time::sleep(TRANSIENT_BACKOFF * transient_failures as u32).await;
                }
                Err(e) => return Err(self.unavailable(e)),
            }
        }
        Err(StoreError::AlreadyExists {
            kind: "request",
            name: request.id.clone(),
        })
    }

    /// Takes `Idempotency-Key` `key_sha256` of `agent` for request `id` with payload digest
    /// `payload`, unless it is taken: then the holder's `(request id, payload digest)`.
    pub async fn take_idempotency_key(
        &self,
        agent: &str,
        key_sha256: &str,
        id: &str,
        payload: &str,
        ttl: Duration,
    ) -> Result<Option<(String, String)>, StoreError> {
        let key = self.keys.idempotency(agent, key_sha256);
        let mut transient_failures = 0;
        for attempt in 0..2 + TRANSIENT_RETRIES {
            let lease = self
                .request_lease(ttl, attempt > 0 && transient_failures == 0)
                .await?;
            let txn = Txn::new()
                .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key.as_str(),
                    format!("{id}\n{payload}"),
                    Some(PutOptions::new().with_lease(lease)),
                )])
                .or_else([TxnOp::get(key.as_str(), None)]);
            let resp = match self.client().txn(txn).await {
                Ok(resp) => resp,
                Err(e) if e.to_string().contains("lease not found") => continue,
                Err(e) if transient(&e) && transient_failures < TRANSIENT_RETRIES => {
                    transient_failures += 1;
                    tokio::time::sleep(TRANSIENT_BACKOFF * transient_failures as u32).await;
                    continue;
                }
                Err(e) => return Err(self.unavailable(e)),
            };
            if resp.succeeded() {
                return Ok(None);
            }
            let held = resp.op_responses().into_iter().find_map(|op| match op {
                etcd_client::TxnOpResponse::Get(get) => get
                    .kvs()
                    .first()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
                _ => None,
            });
            // Gone between the compare and the get: try to take it again.
            let Some(held) = held else { continue };
            let (holder, payload) = held.split_once('\n').unwrap_or((held.as_str(), ""));
            // Taken by this very request: an earlier attempt was committed after all.
            if holder == id {
                return Ok(None);
            }
            return Ok(Some((holder.to_string(), payload.to_string())));
        }
        Err(StoreError::Conflict {
            kind: "idempotency key",
            name: key_sha256.to_string(),
            current: "changing".into(),
        })
    }

    /// Lets an `Idempotency-Key` go (its request failed without a result worth keeping).
    pub async fn release_idempotency_key(
        &self,
        agent: &str,
        key_sha256: &str,
    ) -> Result<(), StoreError> {
        self.client()
            .delete(self.keys.idempotency(agent, key_sha256), None)
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(())
    }

    /// The request with id `id`.
    pub async fn get_request(&self, id: &str) -> Result<StoredRequest, StoreError> {
        let not_found = || StoreError::NotFound {
            kind: "request",
            name: id.to_string(),
        };
        let index = self
            .client()
            .get(self.keys.request_id(id), None)
            .await
            .map_err(|e| self.unavailable(e))?;
        let key = index.kvs().first().ok_or_else(not_found)?.value().to_vec();
        self.get_request_at(&key).await?.ok_or_else(not_found)
    }

    /// The request stored at `key`, if it is still there.
    pub async fn get_request_at(&self, key: &[u8]) -> Result<Option<StoredRequest>, StoreError> {
        let resp = self
            .client()
            .get(key, None)
            .await
            .map_err(|e| self.unavailable(e))?;
        resp.kvs().first().map(StoredRequest::from_kv).transpose()
    }

    /// Requests of `agent` (every agent when `None`), oldest first, and the revision read at.
    pub async fn list_requests(
        &self,
        agent: Option<&str>,
    ) -> Result<(Vec<StoredRequest>, i64), StoreError> {
        let prefix = match agent {
            Some(agent) => self.keys.agent_requests(agent),
            None => self.keys.requests(),
        };
        let options = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Key, SortOrder::Ascend);
        let resp = self
            .client()
            .get(prefix.as_str(), Some(options))
            .await
            .map_err(|e| self.unavailable(e))?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or_default();
        let requests = resp
            .kvs()
            .iter()
            .map(StoredRequest::from_kv)
            .collect::<Result<_, StoreError>>()?;
        Ok((requests, revision))
    }

    /// Claims `stored` for delivery by `gateway` under `claim_lease`, marking it delivering
    /// with one more attempt. False when another gateway holds it or it changed meanwhile.
    pub async fn claim_request(
        &self,
        stored: &StoredRequest,
        gateway: &str,
        claim_lease: i64,
    ) -> Result<Option<StoredRequest>, StoreError> {
        let r = &stored.request;
        let key = self.keys.request(&r.agent, r.seq);
        let claim = self.keys.claim(&r.agent, r.seq);
        let mut claimed = r.clone();
        claimed.state = RequestState::Delivering as i32;
        claimed.attempts += 1;
        let txn = Txn::new()
            .when([
                Compare::create_revision(claim.as_str(), CompareOp::Equal, 0),
                Compare::mod_revision(key.as_str(), CompareOp::Equal, stored.revision),
            ])
            .and_then([
                TxnOp::put(
                    claim.as_str(),
                    gateway,
                    Some(PutOptions::new().with_lease(claim_lease)),
                ),
                TxnOp::put(
                    key.as_str(),
                    claimed.encode_to_vec(),
                    Some(PutOptions::new().with_lease(stored.lease)),
                ),
            ]);
        let resp = self
            .client()
            .txn(txn)
            .await
            .map_err(|e| self.unavailable(e))?;
        if !resp.succeeded() {
            return Ok(None);
        }
        let revision = resp.header().map(|h| h.revision()).unwrap_or_default();
        Ok(Some(StoredRequest {
            request: claimed,
            revision,
            lease: stored.lease,
        }))
    }

    /// Writes the outcome of a delivery and releases the claim. Does nothing if the request
    /// was dropped meanwhile.
    pub async fn finish_request(&self, stored: &StoredRequest) -> Result<(), StoreError> {
        let r = &stored.request;
        let key = self.keys.request(&r.agent, r.seq);
        let txn = Txn::new()
            .when([Compare::create_revision(
                key.as_str(),
                CompareOp::Greater,
                0,
            )])
            .and_then([
                TxnOp::put(
                    key.as_str(),
                    r.encode_to_vec(),
                    Some(PutOptions::new().with_lease(stored.lease)),
                ),
                TxnOp::delete(self.keys.claim(&r.agent, r.seq), None),
            ])
            .or_else([TxnOp::delete(self.keys.claim(&r.agent, r.seq), None)]);
        self.client()
            .txn(txn)
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(())
    }

    /// Deletes the claim on a request (a claim its own gateway left behind).
    pub async fn release_claim(&self, agent: &str, seq: u64) -> Result<(), StoreError> {
        self.client()
            .delete(self.keys.claim(agent, seq), None)
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(())
    }

    /// Replaces a request by `change(request)` with compare-and-swap, retrying on conflict.
    pub async fn update_request(
        &self,
        id: &str,
        change: impl Fn(&mut Request) -> Result<(), StoreError>,
    ) -> Result<Request, StoreError> {
        loop {
            let stored = self.get_request(id).await?;
            let mut next = stored.request.clone();
            change(&mut next)?;
            let key = self.keys.request(&next.agent, next.seq);
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.as_str(),
                    CompareOp::Equal,
                    stored.revision,
                )])
                .and_then([TxnOp::put(
                    key.as_str(),
                    next.encode_to_vec(),
                    Some(PutOptions::new().with_lease(stored.lease)),
                )]);
            let resp = self
                .client()
                .txn(txn)
                .await
                .map_err(|e| self.unavailable(e))?;
            if resp.succeeded() {
                return Ok(next);
            }
        }
    }

    /// Removes a request and its index; it will not be delivered.
    pub async fn drop_request(&self, id: &str) -> Result<(), StoreError> {
        let stored = self.get_request(id).await?;
        let r = &stored.request;
        let txn = Txn::new().and_then([
            TxnOp::delete(self.keys.request(&r.agent, r.seq), None),
            TxnOp::delete(self.keys.request_id(id), None),
            TxnOp::delete(self.keys.claim(&r.agent, r.seq), None),
        ]);
        self.client()
            .txn(txn)
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(())
    }

    /// Every key under `prefix` with its value, as text.
    pub async fn list_values(&self, prefix: &str) -> Result<Vec<(String, String)>, StoreError> {
        let resp = self
            .client()
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(resp
            .kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    String::from_utf8_lossy(kv.value()).into_owned(),
                )
            })
            .collect())
    }

    /// Grants a lease of `ttl` seconds for a gateway's claims.
    pub async fn grant_claim_lease(&self, ttl: i64) -> Result<i64, StoreError> {
        self.grant_lease(ttl).await
    }
}

/// A queue position: microseconds since the epoch times 1000, plus a random 0..1000, so that
/// keys sort by arrival and gateways rarely collide (a collision is retried).
fn new_seq() -> u64 {
    let micros = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64;
    micros * 1000 + rand::random_range(0..1000)
}
