//! The replay queue in etcd, laid out so that it scales (docs/architecture.md, "The replay
//! queue"). One request is a few keys, all under its TTL lease but the claim:
//!
//! - `queue/{agent}/{seq}`: its small record while it waits (queued or delivering): state,
//!   attempts, deadline, headers, and the body when it is small ([`INLINE_BODY_BYTES`]). What
//!   replayers list and watch, so they never read finished requests; claims and state
//!   changes rewrite only this;
//! - `requests/{agent}/{seq}`: the record once delivered or dead (it moves on finish);
//! - `request-bodies/{agent}/{seq}`: a larger body, written once; one over what a write
//!   carries ([`MAX_WRITE_PAYLOAD`]) in pieces of [`BODY_PIECE`], the first there and the rest
//!   at `request-bodies/{agent}/{seq}/{token}/{n}` (the record's `body_pieces`, unique to the
//!   write), written before the record;
//! - `request-answers/{agent}/{seq}`: the agent's stored answer, written once, when it is too
//!   large to ride in the finished record ([`INLINE_BODY_BYTES`] for body and answer together);
//! - `finished/{agent}/{seq}`: there once delivered or dead, holding its bytes: what
//!   retention counts;
//! - `request-ids/{id}`: its id, pointing at its position `{agent}/{seq}`;
//! - `claims/{agent}/{seq}`: which gateway delivers it, under that gateway's claim lease.
//!
//! A finish is conditioned on still holding the claim, so a gateway that lost it (paused past
//! its lease) cannot overwrite what the next holder did.

use super::{decode, Resends, Store, StoreError, TRANSIENT_RETRIES};
use crate::batch::Committed;
use berth_proto::v1::{Request, RequestState, StoredResponse};
use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use prost::Message;
use std::ops::ControlFlow;
use std::time::{Duration, Instant, SystemTime};

/// How long a request and its response are kept unless the agent says otherwise.
pub const REQUEST_TTL: Duration = berth_proto::defaults::REPLAY_TTL;
/// A new request lease (per TTL) is granted at most this often, so requests live between
/// their TTL and TTL + this (one lease per bucket, not one per request); shorter TTLs get
/// buckets of a tenth of the TTL. Short, because when a lease expires etcd deletes all its keys
/// in one step: at 100 requests a second a minute's bucket is some 24,000 keys, where ten
/// minutes' would be ten times that (and etcd 3.4 then copies a write buffer grown to that
/// size for every later transaction until it restarts).
pub const REQUEST_LEASE_BUCKET: Duration = Duration::from_secs(60);
/// Most body and answer bytes one request's write carries (etcd takes 1.5 MiB by default, and
/// headers and records come on top).
pub const MAX_WRITE_PAYLOAD: usize = 1_280 * 1024;
/// Bodies over [`MAX_WRITE_PAYLOAD`] are kept in pieces of this size (the body limit may be set
/// up to 16 MiB; etcd takes 1.5 MiB per request): the first with the record, each other one in a
/// write of its own before it.
pub const BODY_PIECE: usize = 1024 * 1024;
/// Pieces of a body read per etcd call (the client takes answers up to 4 MiB).
const PIECES_PER_READ: i64 = 3;
/// Bodies up to this size ride in the request's record (one key fewer per request; a claim
/// rewrites at most this much besides the metadata); larger ones are kept apart.
pub const INLINE_BODY_BYTES: usize = 4096;
/// The first pause before a claim or a delivery's outcome is sent again to an etcd that did not
/// answer ([`Store::claim_request`], [`Store::finish_request`]).
pub const RESEND_PAUSE_MIN: Duration = Duration::from_millis(100);
/// The longest pause between attempts to write a claim or a delivery's outcome.
pub const RESEND_PAUSE_MAX: Duration = Duration::from_secs(1);
/// What the index of a positional id holds once a reader has settled that no request has it
/// ([`Store::get_request_settled`]).
pub const NEVER_STORED: &str = "never-stored";
/// Most requests a page of `list_requests` holds.
pub const MAX_PAGE: usize = 1000;
/// Keys read per etcd call when scanning for a page with a state filter.
const SCAN_PAGE: i64 = 500;

/// A request as stored (its record, with its body only when inline; `response` filled only by
/// [`Store::get_request`]), with what a later compare-and-swap needs.
#[derive(Clone, Debug)]
pub struct StoredRequest {
    /// The request.
    pub request: Request,
    /// Its record's `mod_revision`.
    pub revision: i64,
    /// The lease it expires with.
    pub lease: i64,
}

impl StoredRequest {
    /// A request record as etcd holds it (from a read or a watch).
    pub fn from_kv(kv: &etcd_client::KeyValue) -> Result<Self, StoreError> {
        Ok(Self {
            request: decode(kv.key(), kv.value())?,
            revision: kv.mod_revision(),
            lease: kv.lease(),
        })
    }
}

/// A request this gateway holds the claim of.
#[derive(Clone, Debug)]
pub struct Claim {
    /// The request as claimed (state delivering, attempts counted).
    pub stored: StoredRequest,
    /// The claim key's revision: a finish succeeds only while the claim is still this one.
    pub revision: i64,
}

/// How a claim attempt ended.
#[derive(Clone, Debug)]
pub enum ClaimOutcome {
    /// Ours now.
    Claimed(Box<Claim>),
    /// Another holder has it (`holder`, the gateway's name, under its claim lease `lease`), as
    /// seen at store revision `revision`: a replayer that has not heard of it yet from its
    /// watch knows it now.
    Held {
        holder: String,
        lease: i64,
        revision: i64,
    },
    /// The request changed since it was read: read it again.
    Changed,
    /// The request no longer waits (finished or dropped), as seen at store revision `revision`.
    Gone { revision: i64 },
}

/// How a finish ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finished {
    /// Written.
    Done,
    /// The claim was no longer ours (expired and perhaps taken over): nothing written.
    LostClaim,
}

/// The cached bucket lease of requests.
#[derive(Debug)]
pub(super) struct RequestLease {
    id: i64,
    granted: Instant,
}

/// Puts `answer` into the finished `record` when the two stay small (its body, inline or
/// kept apart, and the answer's within [`INLINE_BODY_BYTES`]): one key fewer per delivery, and a
/// page of records no larger than one of inline bodies. Otherwise the answer, to be kept apart
/// (not copied: it may be up to the answer limit). The record keeps the answer's status either
/// way, for listings, which read records alone.
fn keep_inline<'a>(
    record: &mut Request,
    answer: Option<&'a StoredResponse>,
) -> Option<&'a StoredResponse> {
    record.response_status = answer.map_or(0, |a| a.status);
    match answer {
        Some(answer) if record.body.len() + answer.body.len() <= INLINE_BODY_BYTES => {
            record.response = Some(answer.clone());
            None
        }
        apart => apart,
    }
}

fn is_waiting(state: i32) -> bool {
    matches!(
        RequestState::try_from(state),
        Ok(RequestState::Queued | RequestState::Delivering)
    )
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

    /// The puts that store a new request under `lease` (a small body inline, a larger one and
    /// the answer apart), and the compares that it is new.
    fn new_request_ops(&self, request: &Request, lease: i64) -> (Vec<Compare>, Vec<TxnOp>) {
        let (agent, seq) = (request.agent.as_str(), request.seq);
        let waiting = is_waiting(request.state);
        let key = if waiting {
            self.keys.queued(agent, seq)
        } else {
            self.keys.request(agent, seq)
        };
        let index = self.keys.request_id(&request.id);
        // A positional id names the request's place: no index to write.
        let indexed = berth_proto::request::parse_positional_id(&request.id) != Some((agent, seq));
        let with_lease = || Some(PutOptions::new().with_lease(lease));
        let mut record = request.clone();
        let mut body = std::mem::take(&mut record.body);
        let answer = record.response.take();
        record.body_bytes = body.len() as u64;
        // A request answered directly (kept for its Idempotency-Key) is written with its answer
        // in one transaction; when both would not fit etcd's request limit, the body (already
        // delivered, kept only to be shown) is left out so that the answer is always kept.
        if answer
            .as_ref()
            .is_some_and(|a| a.body.len() + body.len() > MAX_WRITE_PAYLOAD)
        {
            body.clear();
        }
        if body.len() <= INLINE_BODY_BYTES {
            record.body = std::mem::take(&mut body);
        }
        // The rest of a body in pieces is written before this ([`Store::put_body_pieces`]).
        body.truncate(first_piece(request));
        let apart = keep_inline(&mut record, answer.as_ref());
        let mut ops = vec![TxnOp::put(
            key.as_str(),
            record.encode_to_vec(),
            with_lease(),
        )];
        if indexed {
            ops.push(TxnOp::put(
                index.as_str(),
                format!("{agent}/{seq:020}"),
                with_lease(),
            ));
        }
        if !body.is_empty() {
            ops.push(TxnOp::put(
                self.keys.request_body(agent, seq),
                body,
                with_lease(),
            ));
        }
        if !waiting {
            let answer_bytes = answer.as_ref().map_or(0, |a| a.body.len() as u64);
            ops.push(TxnOp::put(
                self.keys.finished(agent, seq),
                (record.body_bytes + answer_bytes).to_string(),
                with_lease(),
            ));
        }
        if request.state == RequestState::Dead as i32 {
            ops.push(TxnOp::put(self.keys.dead(agent, seq), "", with_lease()));
        }
        if let Some(answer) = apart {
            ops.push(TxnOp::put(
                self.keys.request_answer(agent, seq),
                answer.encode_to_vec(),
                with_lease(),
            ));
        }
        // New: its place is free, waiting or finished, and so is its id.
        let other = if waiting {
            self.keys.request(agent, seq)
        } else {
            self.keys.queued(agent, seq)
        };
        // The id's index is checked for a positional id too: a reader that found no request
        // under an id settles its fate there ([`Store::get_request_settled`]), so that a write
        // etcd applies late cannot store it afterwards.
        let mut compares = vec![
            Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
            Compare::create_revision(index.as_str(), CompareOp::Equal, 0),
        ];
        if !indexed {
            compares.push(Compare::create_revision(
                other.as_str(),
                CompareOp::Equal,
                0,
            ));
        }
        (compares, ops)
    }

    /// Writes the pieces of `request`'s body past its first (none unless it has more than
    /// [`MAX_WRITE_PAYLOAD`]) under `lease`, one write each; the record that refers to them is
    /// written after, so a reader of the record finds them all.
    async fn put_body_pieces(
        &self,
        request: &Request,
        lease: i64,
    ) -> Result<(), etcd_client::Error> {
        let pieces = self.pieces(request, request.seq);
        let first = first_piece(request);
        for (n, piece) in request.body[first..].chunks(BODY_PIECE).enumerate() {
            let options = PutOptions::new().with_lease(lease);
            self.client()
                .put(piece_key(&pieces, n + 1), piece.to_vec(), Some(options))
                .await?;
        }
        Ok(())
    }

    /// Deletes the pieces that `request`'s write put at place `seq` (given up, or not stored),
    /// theirs alone whatever else is there; left to their lease if etcd does not answer.
    async fn delete_body_pieces(&self, request: &Request, seq: u64) {
        let all = etcd_client::DeleteOptions::new().with_prefix();
        let pieces = self.pieces(request, seq);
        if let Err(e) = self.client().delete(pieces, Some(all)).await {
            tracing::debug!(agent = %request.agent, error = %e, "pieces of a body not stored are left to their lease");
        }
    }

    /// Where the pieces of `request`'s body are (at place `seq`): `request-bodies/{agent}/
    /// {seq}/{body_pieces}/`.
    fn pieces(&self, request: &Request, seq: u64) -> String {
        let body = self.keys.request_body(&request.agent, seq);
        format!("{body}/{}/", request.body_pieces)
    }

    /// Stores a new request (queued at the tail of its agent's queue, or already delivered
    /// when it records a direct answer to a request with an `Idempotency-Key`); `seq` and
    /// `expire_time` are set here. Returns only once etcd has committed it. Requests arriving
    /// together share one etcd transaction (group commit, [`Store::commit`]), each still
    /// answered only after it. Sends the write again after a transient failure (same keys: if
    /// the first one was committed after all, its index is there).
    pub async fn enqueue_request(
        &self,
        request: &mut Request,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        match self.store_request(request, ttl, None).await? {
            None => Ok(()),
            Some(_) => unreachable!("no key to be held without a key"),
        }
    }

    /// Takes `Idempotency-Key` `key_sha256` (payload digest `payload`) for `request` and
    /// queues it, in one commit: a keyed request for an agent with no ready replica waits for
    /// one etcd round trip, not two. When the key is held, nothing is stored and the holder
    /// is returned, as [`Store::take_idempotency_key`] does.
    pub async fn enqueue_keyed_request(
        &self,
        request: &mut Request,
        ttl: Duration,
        key_sha256: &str,
        payload: &str,
    ) -> Result<Option<HeldKey>, StoreError> {
        self.store_request(request, ttl, Some((key_sha256, payload)))
            .await
    }

    async fn store_request(
        &self,
        request: &mut Request,
        ttl: Duration,
        key: Option<(&str, &str)>,
    ) -> Result<Option<HeldKey>, StoreError> {
        // Where and under which lease the pieces of a large body were written, under a token
        // of this write's own: a write that loses the place to another touches none of its keys.
        let mut pieces_at: Option<(u64, i64)> = None;
        if first_piece(request) < request.body.len() {
            request.body_pieces = format!("{:016x}", rand::random::<u64>());
        }
        let stored = self
            .store_request_at(request, ttl, key, &mut pieces_at)
            .await;
        if let (Some((seq, _)), Ok(Some(_)) | Err(StoreError::AlreadyExists { .. })) =
            (pieces_at, &stored)
        {
            // Not stored (its key held, or its place or id taken): its pieces go now.
            self.delete_body_pieces(request, seq).await;
        }
        stored
    }

    async fn store_request_at(
        &self,
        request: &mut Request,
        ttl: Duration,
        key: Option<(&str, &str)>,
        pieces_at: &mut Option<(u64, i64)>,
    ) -> Result<Option<HeldKey>, StoreError> {
        let in_record = first_piece(request);
        let mut uncertain = false;
        let mut resends = Resends::new();
        let idempotency = key.map(|(digest, _)| self.keys.idempotency(&request.agent, digest));
        // A positional id fixes the place; any other id gets a new one (drawn again when taken).
        let positional = berth_proto::request::parse_positional_id(&request.id)
            .filter(|(agent, _)| *agent == request.agent)
            .map(|(_, seq)| seq);
        for attempt in 0..3 + TRANSIENT_RETRIES {
            let lease = self.request_lease(ttl, attempt > 0 && !uncertain).await?;
            if !uncertain {
                request.seq = positional.unwrap_or_else(new_seq);
                request.expire_time = Some(berth_proto::timestamp(SystemTime::now() + ttl));
            }
            if in_record < request.body.len() && *pieces_at != Some((request.seq, lease)) {
                if let Some((seq, _)) = pieces_at.filter(|(seq, _)| *seq != request.seq) {
                    // Written for a place given up: they would wait for their lease.
                    self.delete_body_pieces(request, seq).await;
                }
                match self.put_body_pieces(request, lease).await {
                    Ok(()) => *pieces_at = Some((request.seq, lease)),
                    Err(e) if crate::lease_not_found(&e) => {
                        uncertain = false;
                        continue;
                    }
                    Err(e) if resends.allow(&e) => {
                        resends.pause().await;
                        continue;
                    }
                    Err(e) => return Err(self.unavailable(e)),
                }
            }
            let position = format!("{}/{:020}", request.agent, request.seq);
            let index = self.keys.request_id(&request.id);
            let (mut compares, mut ops) = self.new_request_ops(request, lease);
            let mut otherwise = vec![TxnOp::get(index.as_str(), None)];
            if let (Some(at), Some((_, payload))) = (&idempotency, key) {
                compares.push(Compare::create_revision(at.as_str(), CompareOp::Equal, 0));
                ops.push(take_key_op(at, &request.id, payload, lease));
                otherwise.push(TxnOp::get(at.as_str(), None));
            }
            let txn = Txn::new().when(compares).and_then(ops).or_else(otherwise);
            match self.commit(txn, in_record).await {
                Ok(done) if done.succeeded => return Ok(None),
                Ok(done) => {
                    let mut stored_at = None;
                    let mut held = None;
                    for op in done.responses {
                        let TxnOpResponse::Get(get) = op else {
                            continue;
                        };
                        let Some(kv) = get.kvs().first() else {
                            continue;
                        };
                        if kv.key() == index.as_bytes() {
                            stored_at = Some(kv.value().to_vec());
                        } else {
                            held = Some(held_key(kv));
                        }
                    }
                    if uncertain && stored_at.as_deref() == Some(position.as_bytes()) {
                        return Ok(None);
                    }
                    if let Some(held) = held.filter(|h| h.holder != request.id) {
                        return Ok(Some(held));
                    }
                    if stored_at.as_deref() == Some(NEVER_STORED.as_bytes()) {
                        // A reader settled that no request has this id: it is not stored.
                        break;
                    }
                    if positional.is_some() {
                        // Its place is taken: by the write sent before a transient failure,
                        // or by a request that came with the same id.
                        if uncertain {
                            return Ok(None);
                        }
                        break;
                    }
                    // A sequence number taken in the same microsecond: draw again.
                    uncertain = false;
                }
                Err(e) if crate::lease_not_found(&e) => uncertain = false,
                Err(e) if resends.allow(&e) => {
                    uncertain = true;
                    resends.pause().await;
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
    /// `payload`, unless it is taken: then who holds it. Keys taken together share one etcd
    /// transaction (group commit); a transient failure sends the write again.
    pub async fn take_idempotency_key(
        &self,
        agent: &str,
        key_sha256: &str,
        id: &str,
        payload: &str,
        ttl: Duration,
    ) -> Result<Option<HeldKey>, StoreError> {
        let key = self.keys.idempotency(agent, key_sha256);
        let mut resends = Resends::new();
        for attempt in 0..2 + TRANSIENT_RETRIES {
            let lease = self
                .request_lease(ttl, attempt > 0 && !resends.any())
                .await?;
            let txn = Txn::new()
                .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                .and_then([take_key_op(&key, id, payload, lease)])
                .or_else([TxnOp::get(key.as_str(), None)]);
            let resp = match self.commit(txn, 0).await {
                Ok(resp) => resp,
                Err(e) if crate::lease_not_found(&e) => continue,
                Err(e) if resends.allow(&e) => {
                    resends.pause().await;
                    continue;
                }
                Err(e) => return Err(self.unavailable(e)),
            };
            if resp.succeeded {
                return Ok(None);
            }
            let held = resp.responses.into_iter().find_map(|op| match op {
                TxnOpResponse::Get(get) => get.kvs().first().map(held_key),
                _ => None,
            });
            // Gone between the compare and the get: try to take it again.
            let Some(held) = held else {
                continue;
            };
            // Taken by this very request: an earlier attempt was committed after all.
            if held.holder == id {
                return Ok(None);
            }
            return Ok(Some(held));
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

    /// Records `payload` as the payload digest of `Idempotency-Key` `key_sha256` of `agent`,
    /// if request `id` still holds it (a body streamed to the agent is digested only once it
    /// has passed). The key keeps its lease and the time it was taken. Returns whether it did.
    pub async fn complete_idempotency_key(
        &self,
        agent: &str,
        key_sha256: &str,
        id: &str,
        payload: &str,
    ) -> Result<bool, StoreError> {
        let key = self.keys.idempotency(agent, key_sha256);
        let got = self
            .client()
            .get(key.as_str(), None)
            .await
            .map_err(|e| self.unavailable(e))?;
        let Some(kv) = got.kvs().first() else {
            return Ok(false);
        };
        let (holder, _, taken) = key_fields(kv);
        if holder != id {
            return Ok(false);
        }
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.as_str(),
                CompareOp::Equal,
                kv.mod_revision(),
            )])
            .and_then([TxnOp::put(
                key.as_str(),
                key_value(id, payload, taken),
                Some(PutOptions::new().with_ignore_lease()),
            )]);
        self.txn_succeeded(txn).await
    }

    /// Lets a key go only if it is still as `held` saw it (an orphan: taken by a gateway that
    /// died before it stored anything).
    pub async fn release_orphan_key(
        &self,
        agent: &str,
        key_sha256: &str,
        held: &HeldKey,
    ) -> Result<bool, StoreError> {
        let key = self.keys.idempotency(agent, key_sha256);
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.as_str(),
                CompareOp::Equal,
                held.revision,
            )])
            .and_then([TxnOp::delete(key.as_str(), None)]);
        self.txn_succeeded(txn).await
    }

    /// The position `(agent, seq)` of request `id`.
    async fn locate(&self, id: &str) -> Result<(String, u64), StoreError> {
        let not_found = || StoreError::NotFound {
            kind: "request",
            name: id.to_string(),
        };
        if let Some((agent, seq)) = berth_proto::request::parse_positional_id(id) {
            // There, unless a client chose an id that looks positional (one of another agent's,
            // passed on): such an id was indexed.
            let place = self
                .get_all(vec![
                    self.keys.queued(agent, seq),
                    self.keys.request(agent, seq),
                ])
                .await?;
            if place.iter().flatten().next().is_some() {
                return Ok((agent.to_string(), seq));
            }
        }
        let index = self
            .client()
            .get(self.keys.request_id(id), None)
            .await
            .map_err(|e| self.unavailable(e))?;
        let value = index.kvs().first().ok_or_else(not_found)?.value().to_vec();
        position(&String::from_utf8_lossy(&value)).ok_or_else(not_found)
    }

    /// Reads `keys` in one transaction; each key's value, if there.
    async fn get_all(
        &self,
        keys: Vec<String>,
    ) -> Result<Vec<Option<etcd_client::KeyValue>>, StoreError> {
        let reads: Vec<TxnOp> = keys.iter().map(|k| TxnOp::get(k.as_str(), None)).collect();
        let resp = self
            .commit(Txn::new().and_then(reads), 0)
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(resp
            .responses
            .into_iter()
            .map(|op| match op {
                TxnOpResponse::Get(get) => get.kvs().first().cloned(),
                _ => None,
            })
            .collect())
    }

    /// The whole request with id `id`, for a caller asking what became of it (`GET
    /// /requests/{id}`, `GetRequest`): as [`Store::get_request`], except that an id of a
    /// request's place (a positional id) with no request there is settled first. The id's
    /// index is set to [`NEVER_STORED`] (under a request lease), which the write of a new request
    /// checks, so that `NotFound` is final: a write that etcd did not confirm (its gateway
    /// answered 503 with the id) and applies late cannot store the request afterwards.
    pub async fn get_request_settled(&self, id: &str) -> Result<StoredRequest, StoreError> {
        match self.get_request(id).await {
            Err(StoreError::NotFound { .. }) => {}
            found => return found,
        }
        let Some((agent, seq)) = berth_proto::request::parse_positional_id(id) else {
            return Err(StoreError::NotFound {
                kind: "request",
                name: id.to_string(),
            });
        };
        let index = self.keys.request_id(id);
        let lease = self.request_lease(REQUEST_TTL, false).await?;
        let txn = Txn::new()
            .when([
                Compare::create_revision(index.as_str(), CompareOp::Equal, 0),
                Compare::create_revision(self.keys.queued(agent, seq), CompareOp::Equal, 0),
                Compare::create_revision(self.keys.request(agent, seq), CompareOp::Equal, 0),
            ])
            .and_then([crate::leased_put(index.as_str(), NEVER_STORED, lease)]);
        self.client()
            .txn(txn)
            .await
            .map_err(|e| self.unavailable(e))?;
        // Settled now, one way or the other: stored before the mark, or never.
        self.get_request(id).await
    }

    /// The whole request with id `id`: its record, body and stored answer; of a body kept in
    /// pieces only the first ([`BODY_PIECE`]), `body_bytes` telling its size.
    pub async fn get_request(&self, id: &str) -> Result<StoredRequest, StoreError> {
        self.get_request_with(id, true).await
    }

    /// What became of the request with id `id`: its record and stored answer, without a body
    /// kept apart from the record (up to a MiB not read for nothing).
    pub async fn get_request_outcome(&self, id: &str) -> Result<StoredRequest, StoreError> {
        self.get_request_with(id, false).await
    }

    async fn get_request_with(&self, id: &str, body: bool) -> Result<StoredRequest, StoreError> {
        let (agent, seq) = self.locate(id).await?;
        let mut keys = vec![
            self.keys.queued(&agent, seq),
            self.keys.request(&agent, seq),
            self.keys.request_answer(&agent, seq),
        ];
        if body {
            keys.push(self.keys.request_body(&agent, seq));
        }
        let values = self.get_all(keys).await?;
        let record =
            values[0]
                .as_ref()
                .or(values[1].as_ref())
                .ok_or_else(|| StoreError::NotFound {
                    kind: "request",
                    name: id.to_string(),
                })?;
        let mut stored = StoredRequest::from_kv(record)?;
        if let Some(answer) = &values[2] {
            stored.request.response = Some(decode(answer.key(), answer.value())?);
        }
        if let Some(Some(body)) = values.get(3) {
            stored.request.body = body.value().to_vec();
        }
        Ok(stored)
    }

    /// The record of the request at `(agent, seq)` (a small body inline, and a small answer
    /// once finished; larger ones are kept apart), waiting or finished, if it is there.
    pub async fn get_request_record(
        &self,
        agent: &str,
        seq: u64,
    ) -> Result<Option<StoredRequest>, StoreError> {
        let values = self
            .get_all(vec![
                self.keys.queued(agent, seq),
                self.keys.request(agent, seq),
            ])
            .await?;
        values[0]
            .as_ref()
            .or(values[1].as_ref())
            .map(StoredRequest::from_kv)
            .transpose()
    }

    /// The waiting records of `agent` from position `first` to `last` (both included, at most
    /// [`MAX_PAGE`]), oldest first, and the store revision they were read at. One read by a
    /// range that ends just past `last`: etcd 3.4 walks a range to its end whatever the limit.
    /// A body kept apart is not read (see [`Store::get_request_body`]).
    pub async fn get_waiting(
        &self,
        agent: &str,
        first: u64,
        last: u64,
    ) -> Result<(Vec<StoredRequest>, i64), StoreError> {
        let mut end = self.keys.queued(agent, last).into_bytes();
        end.push(0);
        let options = crate::watch::page(end, MAX_PAGE as i64);
        let resp = self
            .client()
            .get(self.keys.queued(agent, first), Some(options))
            .await
            .map_err(|e| self.unavailable(e))?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let records = resp
            .kvs()
            .iter()
            .map(StoredRequest::from_kv)
            .collect::<Result<_, _>>()?;
        Ok((records, revision))
    }

    /// The body of `request` (a record) when it is kept apart from the record (larger than
    /// [`INLINE_BODY_BYTES`]): all its pieces, read a few at a time. `None` when it is gone, or
    /// any piece is.
    pub async fn get_request_body(&self, request: &Request) -> Result<Option<Vec<u8>>, StoreError> {
        let (agent, seq) = (request.agent.as_str(), request.seq);
        let resp = self
            .client()
            .get(self.keys.request_body(agent, seq), None)
            .await
            .map_err(|e| self.unavailable(e))?;
        let Some(mut body) = resp.kvs().first().map(|kv| kv.value().to_vec()) else {
            return Ok(None);
        };
        let bytes = request.body_bytes;
        if (body.len() as u64) < bytes && !request.body_pieces.is_empty() {
            let pieces = self.pieces(request, seq);
            let mut end = pieces.clone().into_bytes();
            end.push(0xff);
            // Never broken off: every piece is read.
            let _read_all = self
                .scan(
                    piece_key(&pieces, 1).into_bytes(),
                    &end,
                    PIECES_PER_READ,
                    |kv, _| {
                        body.extend_from_slice(kv.value());
                        Ok(ControlFlow::Continue(()))
                    },
                )
                .await?;
        }
        Ok((body.len() as u64 == bytes).then_some(body))
    }

    /// The stored answer of the request at `(agent, seq)`, if delivered with an answer too large
    /// to ride in its record (a smaller one is the record's `response`).
    pub async fn get_request_answer(
        &self,
        agent: &str,
        seq: u64,
    ) -> Result<Option<StoredResponse>, StoreError> {
        let resp = self
            .client()
            .get(self.keys.request_answer(agent, seq), None)
            .await
            .map_err(|e| self.unavailable(e))?;
        resp.kvs()
            .first()
            .map(|kv| decode(kv.key(), kv.value()))
            .transpose()
    }

    /// One page of request records of `agent` (every agent when `None`): waiting ones first,
    /// then finished ones, each oldest first per agent; in `state` when it is not 0; at most
    /// `limit` (at most [`MAX_PAGE`]). The token continues after the last one returned; empty
    /// when nothing is left. Reads at most [`SCAN_PAGE`] keys per etcd call, never a whole
    /// prefix; dead letters are found from their index (`dead/`), so listing them costs what
    /// it returns, not a read of every finished record.
    pub async fn list_requests(
        &self,
        agent: Option<&str>,
        state: i32,
        limit: usize,
        page_token: &str,
    ) -> Result<(Vec<Request>, String), StoreError> {
        let within = |root: String| match agent {
            Some(agent) => format!("{root}{agent}/"),
            None => root,
        };
        // The ranges that can hold `state`, tagged for the token.
        let waiting = (b'w', self.keys.queue(), within(self.keys.queue()));
        let finished = (b'f', self.keys.requests(), within(self.keys.requests()));
        let dead = (b'd', self.keys.all_dead(), within(self.keys.all_dead()));
        let ranges = match RequestState::try_from(state) {
            Ok(RequestState::Queued | RequestState::Delivering) => vec![waiting],
            Ok(RequestState::Delivered) => vec![finished],
            Ok(RequestState::Dead) => vec![dead],
            _ => vec![waiting, finished],
        };
        let bad_token = || StoreError::Invalid("page_token does not belong to this listing".into());
        // Where to start: the range the token names, just after its position.
        let (mut current, mut from) = match page_token.split_once(':') {
            None if page_token.is_empty() => (0, None),
            Some((tag, at)) => {
                let i = ranges
                    .iter()
                    .position(|r| tag.as_bytes() == [r.0])
                    .ok_or_else(bad_token)?;
                let mut key = format!("{}{at}", ranges[i].1).into_bytes();
                if !key.starts_with(ranges[i].2.as_bytes()) || at.contains("..") {
                    return Err(bad_token());
                }
                key.push(0);
                (i, Some(key))
            }
            None => return Err(bad_token()),
        };
        let limit = limit.clamp(1, MAX_PAGE);
        let mut out = Vec::new();
        // Dead letters found in their index, whose records are read at the end.
        let mut dead_at = Vec::new();
        let mut token = String::new();
        while current < ranges.len() {
            let (tag, root, prefix) = &ranges[current];
            let end = crate::watch::prefix_end(prefix.as_bytes());
            let start = from.take().unwrap_or_else(|| prefix.as_bytes().to_vec());
            let last_range = current + 1 == ranges.len();
            let stopped = self
                .scan(start, &end, SCAN_PAGE, |kv, more| {
                    if *tag == b'd' {
                        match position(&String::from_utf8_lossy(kv.key())) {
                            Some(at) => dead_at.push(at),
                            None => return Ok(ControlFlow::Continue(())),
                        }
                    } else {
                        let request: Request = decode(kv.key(), kv.value())?;
                        if state != 0 && request.state != state {
                            return Ok(ControlFlow::Continue(()));
                        }
                        out.push(request);
                    }
                    if out.len() + dead_at.len() < limit {
                        return Ok(ControlFlow::Continue(()));
                    }
                    if more || !last_range {
                        let at = String::from_utf8_lossy(kv.key());
                        let at = at.strip_prefix(root.as_str()).unwrap_or_default();
                        token = format!("{}:{at}", *tag as char);
                    }
                    Ok(ControlFlow::Break(()))
                })
                .await?;
            if stopped.is_break() {
                break;
            }
            current += 1;
        }
        out.extend(self.dead_records(&dead_at).await?);
        Ok((out, token))
    }

    /// The records of dead letters found in their index, in its order; one dropped or retried
    /// since is left out.
    async fn dead_records(&self, at: &[(String, u64)]) -> Result<Vec<Request>, StoreError> {
        let mut records = Vec::new();
        for chunk in at.chunks(64) {
            let keys = chunk
                .iter()
                .map(|(agent, seq)| self.keys.request(agent, *seq))
                .collect();
            for kv in self.get_all(keys).await?.into_iter().flatten() {
                let request: Request = decode(kv.key(), kv.value())?;
                if request.state == RequestState::Dead as i32 {
                    records.push(request);
                }
            }
        }
        Ok(records)
    }

    /// Indexes the dead letters that a version before the `dead/` index stored, once per
    /// store: reads every finished record a page at a time, and marks itself done
    /// (`migrations/dead-index`) at the end. Returns how many it indexed.
    pub async fn index_dead_letters(&self) -> Result<u64, StoreError> {
        let done = self.keys.migration("dead-index");
        let found = self
            .client()
            .get(done.as_str(), Some(GetOptions::new().with_count_only()))
            .await
            .map_err(|e| self.unavailable(e))?;
        if found.count() > 0 {
            return Ok(0);
        }
        let mut dead = Vec::new();
        let prefix = self.keys.requests();
        let end = crate::watch::prefix_end(prefix.as_bytes());
        let _ = self
            .scan(prefix.into_bytes(), &end, SCAN_PAGE, |kv, _| {
                let request: Request = decode(kv.key(), kv.value())?;
                if request.state == RequestState::Dead as i32 {
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    dead.push((
                        key,
                        request.agent,
                        request.seq,
                        kv.mod_revision(),
                        kv.lease(),
                    ));
                }
                Ok(ControlFlow::Continue(()))
            })
            .await?;
        let mut indexed = 0;
        for (key, agent, seq, revision, lease) in dead {
            // Only while the record is still the dead one read, and under its lease.
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.as_str(),
                    CompareOp::Equal,
                    revision,
                )])
                .and_then([TxnOp::put(
                    self.keys.dead(&agent, seq),
                    "",
                    Some(PutOptions::new().with_lease(lease)),
                )]);
            match self.client().txn(txn).await {
                Ok(resp) => indexed += u64::from(resp.succeeded()),
                // Its lease ended meanwhile: the record went with it.
                Err(e) if crate::lease_not_found(&e) => {}
                Err(e) => return Err(self.unavailable(e)),
            }
        }
        self.client()
            .put(done, "", None)
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(indexed)
    }

    /// Visits the keys from `start` up to `end` in key order, `page` per etcd call, until
    /// `visit` breaks; `visit` also learns whether any key follows the one it sees.
    async fn scan(
        &self,
        mut start: Vec<u8>,
        end: &[u8],
        page: i64,
        mut visit: impl FnMut(&etcd_client::KeyValue, bool) -> Result<ControlFlow<()>, StoreError>,
    ) -> Result<ControlFlow<()>, StoreError> {
        loop {
            let options = crate::watch::page(end.to_vec(), page);
            let resp = self
                .client()
                .get(start.clone(), Some(options))
                .await
                .map_err(|e| self.unavailable(e))?;
            let kvs = resp.kvs();
            for (i, kv) in kvs.iter().enumerate() {
                if visit(kv, i + 1 < kvs.len() || resp.more())?.is_break() {
                    return Ok(ControlFlow::Break(()));
                }
            }
            match kvs.last() {
                Some(kv) if resp.more() => {
                    start = kv.key().to_vec();
                    start.push(0);
                }
                _ => return Ok(ControlFlow::Continue(())),
            }
        }
    }

    /// Claims `stored` for delivery by `gateway` under `claim_lease`, marking it delivering
    /// with one more attempt that ends by `deadline`; otherwise who holds it, or that it
    /// changed meanwhile. Sent again while etcd cannot be reached, until it answers; after an
    /// attempt whose fate is unknown, a claim that etcd applied is found and returned as
    /// claimed, so that a claim never stands for a delivery that was not sent (its request
    /// would look interrupted and, unless safe to send twice, be dead-lettered).
    pub async fn claim_request(
        &self,
        stored: &StoredRequest,
        gateway: &str,
        claim_lease: i64,
        deadline: SystemTime,
    ) -> Result<ClaimOutcome, StoreError> {
        let r = &stored.request;
        let key = self.keys.queued(&r.agent, r.seq);
        let claim = self.keys.claim(&r.agent, r.seq);
        let mut claimed = r.clone();
        claimed.state = RequestState::Delivering as i32;
        claimed.attempts += 1;
        claimed.attempt_deadline = Some(berth_proto::timestamp(deadline));
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
            ])
            .or_else([
                TxnOp::get(claim.as_str(), None),
                TxnOp::get(key.as_str(), Some(GetOptions::new().with_count_only())),
            ]);
        let (resp, uncertain) = self
            .commit_until_answered(txn, r.body.len(), || {
                format!("the claim of request {}", r.id)
            })
            .await?;
        let revision = resp.revision;
        if !resp.succeeded && uncertain {
            // An earlier attempt's fate was unknown: its claim, if etcd applied it, is ours.
            if let Some(claim) = self.own_claim(&claimed, claim_lease, stored.lease).await? {
                return Ok(ClaimOutcome::Claimed(Box::new(claim)));
            }
        }
        if !resp.succeeded {
            let mut gets = resp.responses.into_iter().filter_map(|op| match op {
                TxnOpResponse::Get(get) => Some(get),
                _ => None,
            });
            let holder = gets.next().and_then(|get| {
                let kv = get.kvs().first()?;
                Some((String::from_utf8_lossy(kv.value()).into_owned(), kv.lease()))
            });
            let waiting = gets.next().is_some_and(|get| get.count() > 0);
            return Ok(match holder {
                Some((holder, lease)) => ClaimOutcome::Held {
                    holder,
                    lease,
                    revision,
                },
                None if !waiting => ClaimOutcome::Gone { revision },
                None => ClaimOutcome::Changed,
            });
        }
        Ok(ClaimOutcome::Claimed(Box::new(Claim {
            stored: StoredRequest {
                request: claimed,
                revision,
                lease: stored.lease,
            },
            revision,
        })))
    }

    /// The claim of `claimed` (the record as a claim under `claim_lease` writes it), if etcd
    /// holds it: the claim key under that lease, and the record as the same transaction wrote
    /// it (its attempt and deadline).
    async fn own_claim(
        &self,
        claimed: &Request,
        claim_lease: i64,
        record_lease: i64,
    ) -> Result<Option<Claim>, StoreError> {
        let claim_key = self.keys.claim(&claimed.agent, claimed.seq);
        let record_key = self.keys.queued(&claimed.agent, claimed.seq);
        let (claim_key, record_key) = (claim_key.as_str(), record_key.as_str());
        let read = self
            .again_if_transient(|mut c| async move {
                c.txn(
                    Txn::new()
                        .and_then([TxnOp::get(claim_key, None), TxnOp::get(record_key, None)]),
                )
                .await
            })
            .await?;
        let mut kvs = read.op_responses().into_iter().map(|op| match op {
            TxnOpResponse::Get(get) => get.kvs().first().cloned(),
            _ => None,
        });
        let (Some(Some(claim)), Some(Some(record))) = (kvs.next(), kvs.next()) else {
            return Ok(None);
        };
        let stands = decode::<Request>(record.key(), record.value()).ok();
        let ours = claim.lease() == claim_lease
            && record.mod_revision() == claim.mod_revision()
            && stands.is_some_and(|r| {
                r.attempts == claimed.attempts && r.attempt_deadline == claimed.attempt_deadline
            });
        Ok(ours.then(|| Claim {
            stored: StoredRequest {
                request: claimed.clone(),
                revision: record.mod_revision(),
                lease: record_lease,
            },
            revision: claim.mod_revision(),
        }))
    }

    /// Writes the outcome of a delivery (`claim.stored.request` as it should now stand, and
    /// the agent's answer if it was delivered) and releases the claim, only while the claim
    /// is still ours. A request that no longer waits moves from the queue to the finished.
    ///
    /// An outcome is known only here, once the agent has answered: while etcd cannot be reached
    /// (down, restarting, no leader) it is sent again, after a pause that grows to
    /// [`RESEND_PAUSE_MAX`], until etcd answers. The caller bounds the wait: a replayer drops
    /// its deliveries once its claim lease may have ended. After an attempt whose fate is
    /// unknown, a compare that fails may be that attempt's own success: the record is read,
    /// and found as this outcome wrote it, it is [`Finished::Done`].
    pub async fn finish_request(
        &self,
        claim: &Claim,
        answer: Option<&StoredResponse>,
    ) -> Result<Finished, StoreError> {
        let r = &claim.stored.request;
        let (agent, seq) = (r.agent.as_str(), r.seq);
        let queued = self.keys.queued(agent, seq);
        let claim_key = self.keys.claim(agent, seq);
        let with_lease = || Some(PutOptions::new().with_lease(claim.stored.lease));
        let mut record = r.clone();
        record.response = None;
        let apart = if is_waiting(r.state) {
            None
        } else {
            keep_inline(&mut record, answer)
        };
        // Where the record goes, and what it holds: read back after an uncertain attempt.
        let record_key = if is_waiting(r.state) {
            queued.clone()
        } else {
            self.keys.request(agent, seq)
        };
        let record_bytes = record.encode_to_vec();
        let ops = if is_waiting(r.state) {
            vec![TxnOp::put(
                record_key.as_str(),
                record_bytes.clone(),
                with_lease(),
            )]
        } else {
            let bytes = r.body_bytes + answer.map_or(0, |a| a.body.len() as u64);
            let mut ops = vec![
                TxnOp::delete(queued.as_str(), None),
                TxnOp::put(record_key.as_str(), record_bytes.clone(), with_lease()),
                TxnOp::put(
                    self.keys.finished(agent, seq),
                    bytes.to_string(),
                    with_lease(),
                ),
            ];
            if let Some(answer) = apart {
                ops.push(TxnOp::put(
                    self.keys.request_answer(agent, seq),
                    answer.encode_to_vec(),
                    with_lease(),
                ));
            }
            if r.state == RequestState::Dead as i32 {
                ops.push(TxnOp::put(self.keys.dead(agent, seq), "", with_lease()));
            }
            ops
        };
        let txn = Txn::new()
            .when([
                // Still our claim, and the request still waiting (not dropped meanwhile).
                Compare::mod_revision(claim_key.as_str(), CompareOp::Equal, claim.revision),
                Compare::create_revision(queued.as_str(), CompareOp::Greater, 0),
            ])
            .and_then(
                ops.into_iter()
                    .chain([TxnOp::delete(claim_key.as_str(), None)])
                    .collect::<Vec<_>>(),
            );
        let bytes = r.body.len() + answer.map_or(0, |a| a.body.len());
        let (resp, uncertain) = self
            .commit_until_answered(txn, bytes, || format!("the outcome of request {}", r.id))
            .await?;
        if resp.succeeded {
            return Ok(Finished::Done);
        }
        if uncertain {
            let key = record_key.as_str();
            let found = self
                .again_if_transient(|mut c| async move { c.get(key, None).await })
                .await?;
            if found
                .kvs()
                .first()
                .is_some_and(|kv| kv.value() == record_bytes)
            {
                return Ok(Finished::Done);
            }
        }
        Ok(Finished::LostClaim)
    }

    /// Commits `txn`, a transaction guarded by its compares, sending it again while etcd
    /// cannot be reached (after a pause growing from [`RESEND_PAUSE_MIN`] to
    /// [`RESEND_PAUSE_MAX`]) until etcd answers; with whether an earlier attempt's fate is
    /// unknown (etcd may have applied it, so that a compare failing now may be its doing).
    /// `what` names the write in the log. The caller bounds the wait (a replayer drops its
    /// deliveries once its claim lease may have ended).
    async fn commit_until_answered(
        &self,
        txn: Txn,
        bytes: usize,
        what: impl Fn() -> String,
    ) -> Result<(Committed, bool), StoreError> {
        let mut pause = RESEND_PAUSE_MIN;
        let mut uncertain = false;
        loop {
            match self.commit(txn.clone(), bytes).await {
                Ok(resp) => return Ok((resp, uncertain)),
                Err(e) if crate::transient(&e) => {
                    if !uncertain {
                        tracing::warn!(error = %e, "cannot write {} yet; trying again until etcd answers", what());
                    }
                    uncertain = true;
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(RESEND_PAUSE_MAX);
                }
                Err(e) => return Err(self.unavailable(e)),
            }
        }
    }

    /// Takes the replay of `agent`'s queue for `gateway` under its claim `lease`: `None` when
    /// taken (or already its own), otherwise the gateway that has it; with the store revision
    /// it was taken or read at. One gateway replays an
    /// agent's queue at a time, so that gateways do not race for the same requests; each
    /// request is still claimed before it is sent.
    pub async fn take_replay(
        &self,
        agent: &str,
        gateway: &str,
        lease: i64,
    ) -> Result<(Option<String>, i64), StoreError> {
        let key = self.keys.replayer(agent);
        let txn = crate::create_under_lease(&key, gateway, lease)
            .or_else([TxnOp::get(key.as_str(), None)]);
        let resp = self.commit(txn, 0).await.map_err(|e| self.unavailable(e))?;
        if resp.succeeded {
            return Ok((None, resp.revision));
        }
        let holder = resp.responses.iter().find_map(|op| match op {
            TxnOpResponse::Get(get) => crate::first_value(get.kvs()),
            _ => None,
        });
        // Already this gateway's (an earlier take, or its previous life under the same name).
        Ok((holder.filter(|h| h != gateway), resp.revision))
    }

    /// Gives back the replay of `agent`'s queue if `gateway` has it; the store revision it was
    /// given back (or found another's) at.
    pub async fn release_replay(&self, agent: &str, gateway: &str) -> Result<i64, StoreError> {
        let key = self.keys.replayer(agent);
        let txn = Txn::new()
            .when([Compare::value(key.as_str(), CompareOp::Equal, gateway)])
            .and_then([TxnOp::delete(key.as_str(), None)]);
        let resp = self.commit(txn, 0).await.map_err(|e| self.unavailable(e))?;
        Ok(resp.revision)
    }

    /// Deletes the claim on a request if it is still under `lease` (a claim its own gateway
    /// left behind): a claim another gateway has taken since is left alone.
    pub async fn release_claim(&self, agent: &str, seq: u64, lease: i64) -> Result<(), StoreError> {
        let key = self.keys.claim(agent, seq);
        let txn = Txn::new()
            .when([Compare::lease(key.as_str(), CompareOp::Equal, lease)])
            .and_then([TxnOp::delete(key.as_str(), None)]);
        self.commit(txn, 0).await.map_err(|e| self.unavailable(e))?;
        Ok(())
    }

    /// Puts a dead-lettered request back in its queue with its attempts reset.
    pub async fn retry_request(&self, id: &str) -> Result<Request, StoreError> {
        let (agent, seq) = self.locate(id).await?;
        loop {
            let Some(stored) = self.get_request_record(&agent, seq).await? else {
                return Err(StoreError::NotFound {
                    kind: "request",
                    name: id.to_string(),
                });
            };
            let mut next = stored.request.clone();
            if next.state != RequestState::Dead as i32 {
                return Err(StoreError::Conflict {
                    kind: "request",
                    name: id.to_string(),
                    current: "not dead-lettered: only a dead request can be retried".into(),
                });
            }
            next.state = RequestState::Queued as i32;
            next.response = None;
            next.response_status = 0;
            next.attempts = 0;
            next.attempt_deadline = None;
            let finished = self.keys.request(&agent, seq);
            let with_lease = || Some(PutOptions::new().with_lease(stored.lease));
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    finished.as_str(),
                    CompareOp::Equal,
                    stored.revision,
                )])
                .and_then([
                    TxnOp::delete(finished.as_str(), None),
                    TxnOp::delete(self.keys.finished(&agent, seq), None),
                    TxnOp::delete(self.keys.dead(&agent, seq), None),
                    TxnOp::put(
                        self.keys.queued(&agent, seq),
                        next.encode_to_vec(),
                        with_lease(),
                    ),
                ]);
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

    /// Removes a request with everything it holds (body, answer, claim, index, and its
    /// `Idempotency-Key`, so that a repeat is sent again); it will not be delivered.
    pub async fn drop_request(&self, id: &str) -> Result<(), StoreError> {
        let (agent, seq) = self.locate(id).await?;
        let stored =
            self.get_request_record(&agent, seq)
                .await?
                .ok_or_else(|| StoreError::NotFound {
                    kind: "request",
                    name: id.to_string(),
                })?;
        self.delete_requests(&[stored.request]).await
    }

    /// Deletes requests whole, in transactions of a bounded size.
    async fn delete_requests(&self, requests: &[Request]) -> Result<(), StoreError> {
        for chunk in requests.chunks(16) {
            let mut ops = Vec::new();
            for r in chunk {
                let (agent, seq) = (r.agent.as_str(), r.seq);
                ops.extend([
                    TxnOp::delete(self.keys.request(agent, seq), None),
                    // With its pieces, if any.
                    TxnOp::delete(
                        self.keys.request_body(agent, seq),
                        Some(etcd_client::DeleteOptions::new().with_prefix()),
                    ),
                    TxnOp::delete(self.keys.request_answer(agent, seq), None),
                    TxnOp::delete(self.keys.queued(agent, seq), None),
                    TxnOp::delete(self.keys.finished(agent, seq), None),
                    TxnOp::delete(self.keys.dead(agent, seq), None),
                    TxnOp::delete(self.keys.claim(agent, seq), None),
                ]);
                if berth_proto::request::parse_positional_id(&r.id) != Some((agent, seq)) {
                    ops.push(TxnOp::delete(self.keys.request_id(&r.id), None));
                }
                if !r.idempotency_key.is_empty() {
                    ops.push(TxnOp::delete(
                        self.keys
                            .idempotency(agent, &key_digest(&r.idempotency_key)),
                        None,
                    ));
                }
            }
            self.client()
                .txn(Txn::new().and_then(ops))
                .await
                .map_err(|e| self.unavailable(e))?;
        }
        Ok(())
    }

    /// Keeps finished (delivered and dead) requests within bounds, per agent and in total,
    /// dropping the oldest first; how many were dropped. Reads only the small `finished/`
    /// markers, a page at a time.
    pub async fn trim_finished(&self, bounds: &Retention) -> Result<u64, StoreError> {
        // (agent, seq, bytes), oldest first per agent.
        let mut finished: Vec<(String, u64, u64)> = Vec::new();
        let prefix = self.keys.all_finished();
        let end = crate::watch::prefix_end(prefix.as_bytes());
        let _ = self
            .scan(prefix.into_bytes(), &end, SCAN_PAGE, |kv, _| {
                if let Some((agent, seq)) = position(&String::from_utf8_lossy(kv.key())) {
                    let bytes = String::from_utf8_lossy(kv.value()).parse().unwrap_or(0);
                    finished.push((agent, seq, bytes));
                }
                Ok(ControlFlow::Continue(()))
            })
            .await?;
        let doomed = over_retention(&finished, bounds);
        for chunk in doomed.chunks(64) {
            // Their records (for the id and key to delete with them), 64 reads a transaction.
            let reads = chunk
                .iter()
                .map(|(agent, seq)| TxnOp::get(self.keys.request(agent, *seq), None));
            let resp = self
                .client()
                .txn(Txn::new().and_then(reads.collect::<Vec<_>>()))
                .await
                .map_err(|e| self.unavailable(e))?;
            let mut records = Vec::new();
            for ((agent, seq), op) in chunk.iter().zip(resp.op_responses()) {
                let record = match op {
                    TxnOpResponse::Get(get) => get.kvs().first().cloned(),
                    _ => None,
                };
                match record {
                    Some(kv) => records.push(decode::<Request>(kv.key(), kv.value())?),
                    // The record expired already: its markers go by position.
                    None => records.push(Request {
                        agent: agent.clone(),
                        seq: *seq,
                        ..Default::default()
                    }),
                }
            }
            self.delete_requests(&records).await?;
        }
        Ok(doomed.len() as u64)
    }

    /// Grants a lease of `ttl` seconds for a gateway's claims.
    pub async fn grant_claim_lease(&self, ttl: i64) -> Result<i64, StoreError> {
        self.grant_lease(ttl).await
    }

    /// Says that `gateway`'s replayer runs, for as long as its claim `lease` lives (a gateway
    /// restarted under the same name takes the key over with its new lease).
    pub async fn announce_replayer(&self, gateway: &str, lease: i64) -> Result<(), StoreError> {
        let key = self.keys.gateway(gateway);
        self.client()
            .txn(crate::put_under_lease(key, gateway, lease))
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(())
    }
}

/// An `Idempotency-Key` another request holds.
#[derive(Clone, Debug)]
pub struct HeldKey {
    /// The id of the request that took it.
    pub holder: String,
    /// That request's payload digest.
    pub payload: String,
    /// How long ago it was taken.
    pub age: Duration,
    /// The key's revision, for a conditional release.
    pub revision: i64,
}

/// How many finished requests are kept (the oldest beyond any bound are dropped).
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    /// Per agent: most records.
    pub per_agent_count: u64,
    /// Per agent: most bytes of bodies and answers.
    pub per_agent_bytes: u64,
    /// All agents together: most records.
    pub total_count: u64,
    /// All agents together: most bytes.
    pub total_bytes: u64,
}

/// Which of `finished` (agent, seq, bytes; oldest first per agent) go to keep within
/// `bounds`: per agent the oldest first, then across agents the oldest by seq first.
pub fn over_retention(finished: &[(String, u64, u64)], bounds: &Retention) -> Vec<(String, u64)> {
    use std::collections::{BTreeMap, HashSet};
    let mut by_agent: BTreeMap<&str, Vec<(u64, u64)>> = BTreeMap::new();
    for (agent, seq, bytes) in finished {
        by_agent.entry(agent).or_default().push((*seq, *bytes));
    }
    let mut doomed: HashSet<(String, u64)> = HashSet::new();
    let mut kept: Vec<(u64, &str, u64)> = Vec::new();
    for (agent, mut records) in by_agent {
        records.sort_unstable();
        let (mut count, mut bytes) = (0u64, 0u64);
        // Newest first: keep while within the agent's bounds.
        for (seq, size) in records.into_iter().rev() {
            if count < bounds.per_agent_count && bytes + size <= bounds.per_agent_bytes {
                count += 1;
                bytes += size;
                kept.push((seq, agent, size));
            } else {
                doomed.insert((agent.to_string(), seq));
            }
        }
    }
    kept.sort_unstable_by_key(|k| std::cmp::Reverse(k.0));
    let (mut count, mut bytes) = (0u64, 0u64);
    for (seq, agent, size) in kept {
        if count < bounds.total_count && bytes + size <= bounds.total_bytes {
            count += 1;
            bytes += size;
        } else {
            doomed.insert((agent.to_string(), seq));
        }
    }
    let mut doomed: Vec<(String, u64)> = doomed.into_iter().collect();
    doomed.sort_unstable();
    doomed
}

/// How much of `request`'s body its record's write carries (in the record or beside it): all
/// of it, unless it is waiting with a body over [`MAX_WRITE_PAYLOAD`], whose first
/// [`BODY_PIECE`] only.
fn first_piece(request: &Request) -> usize {
    if request.response.is_none() && request.body.len() > MAX_WRITE_PAYLOAD {
        BODY_PIECE
    } else {
        request.body.len()
    }
}

/// The key of piece `n` (from 1) of the body whose pieces are under `pieces`.
fn piece_key(pieces: &str, n: usize) -> String {
    format!("{pieces}{n:06}")
}

/// The put that takes an `Idempotency-Key` at `at` for request `id`: who holds it, the
/// payload's digest and when it was taken (so an orphan can be told by its age).
fn take_key_op(at: &str, id: &str, payload: &str, lease: i64) -> TxnOp {
    let now = unix_millis(SystemTime::now());
    TxnOp::put(
        at,
        key_value(id, payload, now),
        Some(PutOptions::new().with_lease(lease)),
    )
}

/// A taken key's value: its holder, the payload's digest, and when it was taken (Unix ms).
fn key_value(holder: &str, payload: &str, taken: u64) -> String {
    format!("{holder}\n{payload}\n{taken}")
}

/// The fields of a taken key's value (as [`key_value`] writes it).
fn key_fields(kv: &etcd_client::KeyValue) -> (String, String, u64) {
    let value = String::from_utf8_lossy(kv.value());
    let mut parts = value.splitn(3, '\n');
    let holder = parts.next().unwrap_or_default().to_string();
    let payload = parts.next().unwrap_or_default().to_string();
    let taken = parts.next().and_then(|t| t.parse().ok()).unwrap_or(0);
    (holder, payload, taken)
}

/// Who holds a taken key, read from its value.
fn held_key(kv: &etcd_client::KeyValue) -> HeldKey {
    let (holder, payload, taken) = key_fields(kv);
    HeldKey {
        holder,
        payload,
        age: Duration::from_millis(unix_millis(SystemTime::now()).saturating_sub(taken)),
        revision: kv.mod_revision(),
    }
}
/// `(agent, seq)` of a key ending in `.../{agent}/{seq}`.
pub fn position(key: &str) -> Option<(String, u64)> {
    let mut parts = key.rsplit('/');
    let seq = parts.next()?.parse().ok()?;
    let agent = parts.next()?.to_string();
    Some((agent, seq))
}

/// The hex SHA-256 of an `Idempotency-Key`, as its etcd key holds it.
pub fn key_digest(key: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// A queue position: microseconds since the epoch times 1000, plus a random 0..1000, so that
/// keys sort by arrival and gateways rarely collide (a collision is retried).
pub fn new_seq() -> u64 {
    let micros = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64;
    micros * 1000 + rand::random_range(0..1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_drops_the_oldest_beyond_each_bound() {
        let rec = |agent: &str, seq: u64, bytes: u64| (agent.to_string(), seq, bytes);
        let finished = [
            rec("a", 1, 10),
            rec("a", 2, 10),
            rec("a", 3, 10),
            rec("b", 4, 100),
            rec("b", 5, 10),
        ];
        let roomy = Retention {
            per_agent_count: 10,
            per_agent_bytes: 1000,
            total_count: 10,
            total_bytes: 1000,
        };
        assert!(over_retention(&finished, &roomy).is_empty());
        let two_each = Retention {
            per_agent_count: 2,
            ..roomy
        };
        assert_eq!(over_retention(&finished, &two_each), [("a".into(), 1)]);
        let small = Retention {
            per_agent_bytes: 50,
            ..roomy
        };
        assert_eq!(over_retention(&finished, &small), [("b".into(), 4)]);
        let three_in_all = Retention {
            total_count: 3,
            ..roomy
        };
        assert_eq!(
            over_retention(&finished, &three_in_all),
            [("a".into(), 1), ("a".into(), 2)]
        );
    }

    #[test]
    fn positions_and_key_digests() {
        assert_eq!(
            position("/berth/queue/echo/00000000000000000042"),
            Some(("echo".into(), 42))
        );
        assert_eq!(position("nothing"), None);
        assert_eq!(key_digest("k").len(), 64);
    }
}
