//! The replayer: every gateway runs one. It keeps an index of waiting requests, of claims and
//! of which gateway replays each agent's queue, from three list-watches, with the records of
//! the first [`HEAD`] of each agent's queue. One gateway at a time replays an agent's queue: it
//! takes the agent (a key under its lease) when the queue waits with a replica ready and
//! nobody replays it, and gives it back when the queue is empty or the agent fails, so that
//! gateways do not race for the same requests and the agents spread over the gateways. For
//! each agent it replays, it delivers the oldest waiting requests that nobody has claimed, up
//! to the agent's replay concurrency at the agent at once, started oldest first (at a
//! concurrency of 1, strictly in order). A claim is a key under this gateway's short lease:
//! two gateways never deliver the same request at once, and a crashed gateway's claims (and
//! agents) expire so that another delivers them.

use super::super::forward::{Forward, ForwardBody};
use super::super::metrics::AgentLabels;
use super::super::Gateway;
use super::gate::{Gate, Ticket, HOLD};
use super::{QueueStats, REPLAY_ATTEMPT};
use crate::outcome::{Ending, Verdict};
use berth_proto::v1::{Request, RequestState, StoredResponse};
use berth_store::requests::position;
use berth_store::watch::{list_watch, Change, ListWatch};
use berth_store::{Claim, ClaimOutcome, Finished, StoredRequest};
use berth_store::{Keys, StoreError};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use prost::Message;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Lifetime of this gateway's claims without renewal.
pub const CLAIM_TTL: Duration = Duration::from_secs(10);
/// Time between renewals of the claim lease.
pub const CLAIM_RENEW: Duration = Duration::from_secs(3);
/// Time between passes when nothing changes (a backstop; changes wake the loop at once).
pub const TICK: Duration = Duration::from_millis(500);
/// How soon a claim lease renewal that failed is tried again.
pub const RENEW_RETRY: Duration = Duration::from_millis(500);
/// First wait after a failed delivery; it doubles per attempt.
pub const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// Longest wait after a failed delivery.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long a stopping gateway lets its deliveries in flight finish before it cuts them short.
pub const STOP_GRACE: Duration = Duration::from_secs(30);
/// Added to an attempt's timeout for its deadline (clock skew between gateways, the time the
/// claim takes): a takeover waits this much longer before sending again.
pub const DEADLINE_MARGIN: Duration = Duration::from_secs(2);
/// Largest response body stored for a delivered request.
pub const MAX_STORED_RESPONSE: usize = 1024 * 1024;
/// Records kept in memory from the head of each agent's queue (as the watch or one read of
/// the next ones brought them), so that most deliveries start with their claim, not a read.
pub const HEAD: usize = 16;

/// What a delivery means for what comes next.
#[derive(Clone, Debug, PartialEq, Eq)]
enum After {
    /// Go on with the agent's queue.
    Next,
    /// The agent failed: wait this long before its next delivery.
    Backoff(Duration),
    /// This request waits this long (an interrupted attempt's deadline); the agent's other
    /// requests go on meanwhile unless it is delivered one at a time.
    Defer(Duration),
    /// Another gateway claimed it first, as seen at this store revision: until the watch says
    /// the claim is gone, it is that gateway's (not tried again and again meanwhile).
    HeldBy(Holder, i64),
    /// It no longer waits (finished, perhaps by another gateway), as read at this store
    /// revision: out of the index now, not tried again until the watch catches up.
    Gone(i64),
    /// The record it was claimed with (of this `mod_revision`) was not the latest: the index
    /// lets it go, and the next try reads the record first.
    Stale(i64),
    /// A claim of ours that nothing delivered was let go (or is tried again next pass):
    /// nothing else changes, the agent's backoff included.
    Released,
}

/// How a delivery task ended: the agent, the request, whether its claim is surely gone, and
/// what next.
type Done = (String, u64, bool, After);

/// Who holds a claim: a gateway's name and the claim lease it is under. A gateway restarted
/// under the same name has a new lease: the claims of its previous life are not its own to
/// let go (their deliveries may still run at the agent), and they expire with their lease.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Holder {
    name: String,
    lease: i64,
}

impl Holder {
    fn of(kv: &etcd_client::KeyValue) -> Self {
        Self {
            name: String::from_utf8_lossy(kv.value()).into_owned(),
            lease: kv.lease(),
        }
    }
}

/// The waiting requests, per agent, oldest first.
type Index = HashMap<String, BTreeMap<u64, Waiting>>;

/// A waiting request, as the index knows it.
#[derive(Clone, Debug)]
struct Waiting {
    size: u64,
    /// Its record's `mod_revision`, as last seen.
    revision: i64,
    /// That record, while the request is near the head of its queue.
    record: Option<Arc<StoredRequest>>,
}

/// Records read ahead by a delivery, for the index.
type Fetched = Vec<StoredRequest>;

/// How long an agent waits with nobody replaying it before a gateway that has its fair share
/// of agents takes it too.
pub const TAKE_PATIENCE: Duration = Duration::from_secs(1);
/// How long an agent given back for balance is not given back for balance again: a gateway
/// that others count but that takes nothing (it sees no replica ready, say) costs each agent
/// at most one [`TAKE_PATIENCE`] without replay per this long.
pub const BALANCE_HOLD: Duration = Duration::from_secs(30);

/// Which gateway replays each agent's queue, as the `replayers/` list-watch says, and this
/// gateway's takes and gives under way.
#[derive(Debug, Default)]
struct Owners {
    by_agent: HashMap<String, String>,
    /// The store revision the watch has reached.
    seen: i64,
    listed: bool,
    /// Agents whose take or give-back is under way.
    pending: HashSet<String>,
    /// Agents seen waiting with a replica ready and nobody replaying them, since when.
    unowned_since: HashMap<String, Instant>,
    /// The gateways whose replayer has listed the queue and runs (`gateways/`), this one among
    /// them once it has.
    members: HashSet<String>,
    members_listed: bool,
    /// Agents this gateway gave back for balance, and until when it does not do so again.
    balanced_until: HashMap<String, Instant>,
}

impl Owners {
    /// The gateways that share the agents: those whose replayer runs, those seen replaying,
    /// and `name`.
    fn gateways<'a>(&'a self, name: &'a str) -> HashSet<&'a str> {
        let mut gateways: HashSet<&str> = self.by_agent.values().map(String::as_str).collect();
        gateways.extend(self.members.iter().map(String::as_str));
        gateways.insert(name);
        gateways
    }

    /// The agents `name` replays.
    fn mine(&self, name: &str) -> usize {
        self.by_agent.values().filter(|h| *h == name).count()
    }

    /// How many of `deliverable` agents each gateway replays when they are shared evenly over
    /// [`Owners::gateways`]; worked out once per pass, for taking and giving back alike.
    fn fair_share(&self, name: &str, deliverable: usize) -> usize {
        deliverable.div_ceil(self.gateways(name).len())
    }
}

/// A take or give-back of an agent's replay, done: the agent, and on a take who has it now
/// (`None`: this gateway) at which store revision; on a give-back, the store revision it was
/// given back at (`None`: it failed).
enum Owned {
    Taken(String, Result<(Option<String>, i64), StoreError>),
    Given(String, Option<i64>),
}

/// Runs until `stop` is cancelled. Then it claims nothing more, lets deliveries in flight
/// finish (up to [`STOP_GRACE`]) and gives its claim lease back, so that what it held is
/// free for another gateway at once.
pub async fn run(gateway: Arc<Gateway>, name: String, stop: CancellationToken) {
    while !stop.is_cancelled() {
        if let Err(e) = replay(&gateway, &name, &stop).await {
            tracing::warn!(error = %e, "replayer failed; starting over");
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.cancelled() => {}
            }
        }
    }
}

/// One life of the replayer: a claim lease, an index from the list-watches, and the loop.
/// Returns to start over after a lost lease, or when stopped.
async fn replay(
    gateway: &Arc<Gateway>,
    name: &str,
    stop: &CancellationToken,
) -> Result<(), StoreError> {
    let store = &gateway.store;
    let lease = store.grant_claim_lease(CLAIM_TTL.as_secs() as i64).await?;
    let mut renewer = store.lease_renewer(lease);
    // Announced once its lists are complete (a restarted gateway may list a queue of many
    // thousands first): other gateways give it a share only once it can take it.
    let mut announced = false;
    let listing = Instant::now();
    let mut index: Index = HashMap::new();
    let mut deferred: HashMap<(String, u64), Instant> = HashMap::new();
    // Claims by position, with the gateway that holds each.
    let mut claims: HashMap<(String, u64), Holder> = HashMap::new();
    // The store revision the claims' watch has reached: what it says up to there is known.
    let mut claims_seen: i64 = 0;
    let mut requests = list_watch(store, store.keys().queue());
    // The store revision the requests' watch has reached.
    let mut requests_seen: i64 = 0;
    let mut claim_changes = list_watch(store, store.keys().claims());
    let mut owners = Owners::default();
    let mut owner_changes = list_watch(store, store.keys().replayers());
    let mut member_changes = list_watch(store, store.keys().gateways());
    let (owned_tx, mut owned_rx) = tokio::sync::mpsc::unbounded_channel::<Owned>();
    // Nothing starts before both lists are complete: a claim not yet listed looks free.
    let (mut requests_listed, mut claims_listed) = (false, false);
    let mut routes = gateway.routes.clone();
    // The routes' sender goes away while the gateway stops; deliveries in flight go on.
    let mut routes_open = true;
    let mut deliveries: JoinSet<Done> = JoinSet::new();
    let mut busy: HashSet<(String, u64)> = HashSet::new();
    // Each agent's gate: its deliveries reach it at most at its concurrency, oldest first.
    let mut gates: HashMap<String, Arc<Gate>> = HashMap::new();
    // Deliveries the agent has answered whose outcome is still being written: they no longer
    // take one of the agent's replay slots (the next request starts meanwhile).
    let (answered_tx, mut answered_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut answered: HashSet<(String, u64)> = HashSet::new();
    let (fetched_tx, mut fetched_rx) = tokio::sync::mpsc::unbounded_channel::<Fetched>();
    let mut not_before: HashMap<String, Instant> = HashMap::new();
    let mut renew = tokio::time::interval(CLAIM_RENEW);
    let mut renewed = Instant::now();
    let mut stopping: Option<Instant> = None;
    let mut published = Instant::now()
        .checked_sub(TICK)
        .unwrap_or_else(Instant::now);
    loop {
        if stop.is_cancelled() && stopping.is_none() {
            tracing::info!(in_flight = deliveries.len(), "replayer stopping");
            stopping = Some(Instant::now() + STOP_GRACE);
        }
        match stopping {
            Some(_) if deliveries.is_empty() => {
                store.revoke_lease(lease).await;
                return Ok(());
            }
            Some(deadline) if Instant::now() >= deadline => {
                // Cut short: these stay `Delivering`, and whoever takes them over treats
                // them as interrupted (as after a crash).
                tracing::warn!(
                    in_flight = deliveries.len(),
                    "deliveries did not finish within {STOP_GRACE:?}"
                );
                deliveries.abort_all();
                store.revoke_lease(lease).await;
                return Ok(());
            }
            Some(_) => {}
            None if requests_listed && claims_listed && owners.listed && owners.members_listed => {
                if !announced {
                    store.announce_replayer(name, lease).await?;
                    announced = true;
                    tracing::info!(
                        waiting = index.values().map(BTreeMap::len).sum::<usize>(),
                        took = ?listing.elapsed(),
                        "replayer listed the queue"
                    );
                }
                arrange_owners(
                    gateway,
                    name,
                    lease,
                    &index,
                    &busy,
                    &not_before,
                    &mut owners,
                    &owned_tx,
                );
                start_deliveries(
                    gateway,
                    name,
                    lease,
                    &owners,
                    &index,
                    &claims,
                    &mut busy,
                    &mut gates,
                    &answered,
                    &not_before,
                    &deferred,
                    &mut deliveries,
                    &answered_tx,
                    &fetched_tx,
                )
            }
            None => {}
        }
        // The event that wakes the loop, if it is one for the replayer's state.
        let mut first = None;
        tokio::select! {
            _ = stop.cancelled(), if stopping.is_none() => {}
            change = requests.next() => first = Some(Ready::Queue(change)),
            change = claim_changes.next() => first = Some(Ready::Claim(change)),
            change = owner_changes.next() => match change {
                Change::Init => {
                    owners.listed = false;
                    owners.by_agent.clear();
                }
                Change::InitApply(kv) | Change::Put(kv) => {
                    owners.seen = owners.seen.max(kv.mod_revision());
                    let holder = String::from_utf8_lossy(kv.value()).into_owned();
                    owners.by_agent.insert(Keys::last_segment(kv.key()), holder);
                }
                Change::InitDone { revision } => {
                    owners.seen = owners.seen.max(revision);
                    owners.listed = true;
                }
                Change::Delete(kv) => {
                    owners.seen = owners.seen.max(kv.mod_revision());
                    owners.by_agent.remove(&Keys::last_segment(kv.key()));
                }
            },
            change = member_changes.next() => match change {
                Change::Init => {
                    owners.members_listed = false;
                    owners.members.clear();
                }
                Change::InitApply(kv) | Change::Put(kv) => {
                    owners.members.insert(Keys::last_segment(kv.key()));
                }
                Change::InitDone { .. } => owners.members_listed = true,
                Change::Delete(kv) => {
                    owners.members.remove(&Keys::last_segment(kv.key()));
                }
            },
            Some(owned) = owned_rx.recv() => match owned {
                Owned::Taken(agent, result) => {
                    owners.pending.remove(&agent);
                    match result {
                        // Past what the watch has told: it will tell the same, later.
                        Ok((holder, revision)) if revision > owners.seen => {
                            let holder = holder.unwrap_or_else(|| name.to_string());
                            owners.by_agent.insert(agent, holder);
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(agent = %agent, error = %e, "cannot take an agent's replay"),
                    }
                }
                Owned::Given(agent, given) => {
                    owners.pending.remove(&agent);
                    // Given back past what the watch has told: it will tell the delete, later;
                    // until then the agent is not counted as this gateway's.
                    if given.is_some_and(|revision| revision > owners.seen)
                        && owners.by_agent.get(&agent).is_some_and(|h| h == name)
                    {
                        owners.by_agent.remove(&agent);
                    }
                }
            },
            changed = routes.changed(), if routes_open => {
                if changed.is_err() {
                    routes_open = false;
                    continue;
                }
                // A replica became ready (or left): deliver at once, whatever backoff was due.
                not_before.clear();
                gates.values().for_each(|gate| gate.reopen());
            }
            Some(records) = fetched_rx.recv() => first = Some(Ready::Fetched(records)),
            Some(at) = answered_rx.recv() => first = Some(Ready::Answered(at)),
            Some(done) = deliveries.join_next(), if !deliveries.is_empty() => {
                first = Some(Ready::Ended(done));
            }
            _ = renew.tick() => {
                // Kept alive apart from delivery progress. A lease that may have expired (the
                // gateway was paused or cut off from etcd for about its TTL) means another
                // gateway may hold these claims now: stop at once, cancelling the deliveries
                // in flight (dropping them), rather than let them finish.
                let lost = || StoreError::NotFound { kind: "claim lease", name: lease.to_string() };
                if renewed.elapsed() + CLAIM_RENEW >= CLAIM_TTL {
                    return Err(lost());
                }
                match renewer.renew_within(CLAIM_RENEW).await {
                    Ok(()) => renewed = Instant::now(),
                    Err(StoreError::NotFound { .. }) => return Err(lost()),
                    // etcd down or restarting: tried again soon, not a whole interval later,
                    // so that an outage shorter than the lease costs no delivery.
                    Err(_) => renew.reset_after(RENEW_RETRY),
                }
            }
            _ = tokio::time::sleep(TICK) => {}
        }
        // What else is ready already joins the next pass, rather than a pass each: a busy
        // queue brings thousands of changes, claims and ends of deliveries a second (both
        // gateways' claims come to each), a pass looks at every agent replayed, and a replayer
        // that falls behind its watch makes etcd hold the changes for it.
        let (mut next, mut taken) = (first, 0);
        while let Some(ready) = next {
            taken += 1;
            match ready {
                Ready::Queue(change) => {
                    let (seen, listed) = (&mut requests_seen, &mut requests_listed);
                    apply_change(
                        change,
                        &mut index,
                        &gateway.stats,
                        &mut deferred,
                        seen,
                        listed,
                    );
                }
                Ready::Claim(change) => {
                    claim_change(change, &mut claims, &mut claims_seen, &mut claims_listed);
                }
                Ready::Answered(at) => {
                    // Only while its task runs: one that ended already is out of `busy`.
                    if busy.contains(&at) {
                        answered.insert(at);
                    }
                }
                Ready::Fetched(records) => keep_records(&mut index, records),
                Ready::Ended(done) => {
                    let ended = Ended {
                        index: &mut index,
                        busy: &mut busy,
                        answered: &mut answered,
                        gates: &mut gates,
                        claims: &mut claims,
                        deferred: &mut deferred,
                        not_before: &mut not_before,
                    };
                    ended.take(done, &gateway.stats, lease, claims_seen, requests_seen);
                }
            }
            next = if taken < READY_PER_PASS {
                let (answered, fetched) = (&mut answered_rx, &mut fetched_rx);
                let (queue, claims) = (&mut requests, &mut claim_changes);
                try_ready(queue, claims, answered, fetched, &mut deliveries, taken)
            } else {
                None
            };
        }
        // At most once a tick, not once per change: a busy queue changes thousands of times
        // a second.
        if published.elapsed() >= TICK {
            published = Instant::now();
            gateway
                .metrics
                .replaying_agents
                .set(owners.mine(name) as i64);
            for (agent, depth, bytes) in gateway.stats.snapshot() {
                let labels = AgentLabels { agent };
                let metrics = &gateway.metrics;
                metrics.queue_depth.get_or_create(&labels).set(depth as i64);
                metrics.queue_bytes.get_or_create(&labels).set(bytes as i64);
            }
        }
    }
}

/// Events taken at most before each pass (the one that woke the loop and those already waiting).
const READY_PER_PASS: usize = 1024;

/// An event for the replayer's state: what woke its loop, or one already waiting.
enum Ready {
    /// A change of the queue's list-watch.
    Queue(Change),
    /// A change of the claims' list-watch.
    Claim(Change),
    /// The agent has answered this delivery; its outcome is still to be written.
    Answered((String, u64)),
    /// Records a delivery read ahead.
    Fetched(Fetched),
    /// A delivery task ended.
    Ended(Result<Done, tokio::task::JoinError>),
}

/// An event already waiting, if any, without waiting; the sources are tried in turn from the
/// one `turn` names, so that none waits behind a busy other.
fn try_ready(
    requests: &mut ListWatch,
    claims: &mut ListWatch,
    answered: &mut tokio::sync::mpsc::UnboundedReceiver<(String, u64)>,
    fetched: &mut tokio::sync::mpsc::UnboundedReceiver<Fetched>,
    deliveries: &mut JoinSet<Done>,
    turn: usize,
) -> Option<Ready> {
    (0..5).find_map(|i| match (turn + i) % 5 {
        0 => requests.try_next().map(Ready::Queue),
        1 => claims.try_next().map(Ready::Claim),
        2 => answered.try_recv().ok().map(Ready::Answered),
        3 => fetched.try_recv().ok().map(Ready::Fetched),
        _ => deliveries.try_join_next().map(Ready::Ended),
    })
}

/// One change of the claims' list-watch, into `claims`.
fn claim_change(
    change: Change,
    claims: &mut HashMap<(String, u64), Holder>,
    seen: &mut i64,
    listed: &mut bool,
) {
    match change {
        Change::Init => {
            *listed = false;
            claims.clear();
        }
        Change::InitApply(kv) | Change::Put(kv) => {
            *seen = (*seen).max(kv.mod_revision());
            if let Some(at) = position(&String::from_utf8_lossy(kv.key())) {
                claims.insert(at, Holder::of(&kv));
            }
        }
        Change::InitDone { revision } => {
            *seen = (*seen).max(revision);
            *listed = true;
        }
        Change::Delete(kv) => {
            *seen = (*seen).max(kv.mod_revision());
            if let Some(at) = position(&String::from_utf8_lossy(kv.key())) {
                claims.remove(&at);
            }
        }
    }
}

/// What the end of a delivery task changes in the replayer's state.
struct Ended<'a> {
    index: &'a mut Index,
    busy: &'a mut HashSet<(String, u64)>,
    answered: &'a mut HashSet<(String, u64)>,
    gates: &'a mut HashMap<String, Arc<Gate>>,
    claims: &'a mut HashMap<(String, u64), Holder>,
    deferred: &'a mut HashMap<(String, u64), Instant>,
    not_before: &'a mut HashMap<String, Instant>,
}

impl Ended<'_> {
    /// Takes in how a delivery task ended (`done`), under this life's claim `lease`, with the
    /// store revisions the claims' and the queue's watches have reached.
    fn take(
        self,
        done: Result<Done, tokio::task::JoinError>,
        stats: &QueueStats,
        lease: i64,
        claims_seen: i64,
        requests_seen: i64,
    ) {
        if let Ok((agent, seq, released, after)) = done {
            self.busy.remove(&(agent.clone(), seq));
            self.answered.remove(&(agent.clone(), seq));
            // An agent whose queue is empty here keeps no gate (nor the mean time of
            // its deliveries: it is timed again when its queue fills).
            if !self.index.contains_key(&agent) && self.gates.get(&agent).is_some_and(|g| g.idle())
            {
                self.gates.remove(&agent);
            }
            // Our claim is gone by now; the watch may say so only later.
            if released
                && self
                    .claims
                    .get(&(agent.clone(), seq))
                    .is_some_and(|h| h.lease == lease)
            {
                self.claims.remove(&(agent.clone(), seq));
            }
            match after {
                After::Next => {
                    self.not_before.remove(&agent);
                }
                After::Backoff(wait) => {
                    self.not_before.insert(agent, Instant::now() + wait);
                }
                After::Defer(wait) => {
                    self.deferred.insert((agent, seq), Instant::now() + wait);
                }
                // Past that revision the watch has told all there is (the claim's
                // end included); before it, the watch will tell of its end.
                After::HeldBy(holder, revision) if revision > claims_seen => {
                    self.claims.insert((agent, seq), holder);
                }
                After::HeldBy(..) => {}
                // Read past what the watch has told: the delete is on its way (a
                // request put back later comes with a later revision).
                After::Gone(revision) if revision > requests_seen => {
                    untrack(self.index, stats, &agent, seq);
                    self.deferred.remove(&(agent, seq));
                }
                After::Gone(_) => {}
                After::Released => {}
                After::Stale(revision) => {
                    let kept = self.index.get_mut(&agent).and_then(|q| q.get_mut(&seq));
                    if let Some(waiting) = kept {
                        if waiting
                            .record
                            .as_ref()
                            .is_some_and(|r| r.revision == revision)
                        {
                            waiting.record = None;
                        }
                    }
                }
            }
        }
    }
}

/// One change of the queue's list-watch, into the index.
fn apply_change(
    change: Change,
    index: &mut Index,
    stats: &QueueStats,
    deferred: &mut HashMap<(String, u64), Instant>,
    seen: &mut i64,
    listed: &mut bool,
) {
    match change {
        Change::Init => {
            *listed = false;
            index.clear();
            stats.clear();
        }
        Change::InitApply(kv) | Change::Put(kv) => {
            *seen = (*seen).max(kv.mod_revision());
            let at = (kv.mod_revision(), kv.lease());
            track(index, stats, kv.key(), kv.value(), at)
        }
        Change::InitDone { revision } => {
            *seen = (*seen).max(revision);
            *listed = true;
        }
        Change::Delete(kv) => {
            *seen = (*seen).max(kv.mod_revision());
            if let Some((agent, seq)) = position(&String::from_utf8_lossy(kv.key())) {
                untrack(index, stats, &agent, seq);
                deferred.remove(&(agent, seq));
            }
        }
    }
}

/// Adds a waiting request (its record under `queue/`) to the index, or updates it; its
/// record is kept while it is among the first [`HEAD`] of its agent's queue.
/// `(revision, lease)` are the record's `mod_revision` and lease.
fn track(index: &mut Index, stats: &QueueStats, key: &[u8], value: &[u8], at: (i64, i64)) {
    let Some((agent, seq)) = position(&String::from_utf8_lossy(key)) else {
        return;
    };
    let (revision, lease) = at;
    let queue = index.entry(agent.clone()).or_default();
    let near_head = queue.range(..seq).take(HEAD).count() < HEAD;
    // Past the head only its size is read: the rest of the record (headers, an inline body)
    // is skipped, not decoded and copied, for each of the many requests of a long queue.
    let (size, record) = if near_head {
        let request = Request::decode(value).ok();
        let size = request.as_ref().map_or(0, |r| r.body_bytes);
        let record = request.map(|request| {
            Arc::new(StoredRequest {
                request,
                revision,
                lease,
            })
        });
        (size, record)
    } else {
        (RecordSize::decode(value).map_or(0, |r| r.body_bytes), None)
    };
    let waiting = Waiting {
        size,
        revision,
        record,
    };
    if queue.insert(seq, waiting).is_none() {
        stats.add(&agent, size, 1);
    }
}

/// The one field of a stored [`Request`] that the index needs of a request past the head.
#[derive(Clone, PartialEq, prost::Message)]
struct RecordSize {
    /// `Request.body_bytes`.
    #[prost(uint64, tag = "17")]
    body_bytes: u64,
}

/// Keeps records a delivery read ahead, each only if the index has seen no other version of
/// it (a later one from the watch wins; an earlier one is replaced when the watch catches up).
fn keep_records(index: &mut Index, records: Fetched) {
    for stored in records {
        let r = &stored.request;
        let Some(waiting) = index.get_mut(&r.agent).and_then(|q| q.get_mut(&r.seq)) else {
            continue;
        };
        if waiting.record.is_none() && waiting.revision == stored.revision {
            waiting.record = Some(Arc::new(stored));
        }
    }
}

/// Takes a request that no longer waits out of the index.
fn untrack(index: &mut Index, stats: &QueueStats, agent: &str, seq: u64) {
    if let Some(queue) = index.get_mut(agent) {
        if let Some(gone) = queue.remove(&seq) {
            stats.add(agent, gone.size, -1);
        }
        if queue.is_empty() {
            index.remove(agent);
        }
    }
}

/// Takes the replay of agents whose queue waits, with a replica ready and nobody replaying it:
/// at once while this gateway replays fewer than its fair share of such agents (among the
/// gateways it sees replaying), otherwise after [`TAKE_PATIENCE`]. Gives back the agents it
/// replays whose queue is empty or which are backing off after a failure (another gateway may
/// reach them), once none of their deliveries is under way here.
#[allow(clippy::too_many_arguments)]
fn arrange_owners(
    gateway: &Arc<Gateway>,
    name: &str,
    lease: i64,
    index: &Index,
    busy: &HashSet<(String, u64)>,
    not_before: &HashMap<String, Instant>,
    owners: &mut Owners,
    done: &tokio::sync::mpsc::UnboundedSender<Owned>,
) {
    let now = Instant::now();
    let backing_off = |agent: &str| not_before.get(agent).is_some_and(|t| *t > now);
    let deliverable: Vec<String> = {
        let routes = gateway.routes.borrow();
        index
            .keys()
            .filter(|agent| {
                routes.get(*agent).is_some_and(|r| !r.replicas.is_empty()) && !backing_off(agent)
            })
            .cloned()
            .collect()
    };
    let mut give: Vec<String> = owners
        .by_agent
        .iter()
        .filter(|(agent, holder)| {
            *holder == name
                && (!index.contains_key(*agent) || backing_off(agent))
                && !owners.pending.contains(*agent)
                && !busy.iter().any(|(a, _)| a == *agent)
        })
        .map(|(agent, _)| agent.clone())
        .collect();
    let fair = owners.fair_share(name, deliverable.len());
    give.extend(to_balance(owners, name, fair, &deliverable, busy, now));
    let take = to_take(owners, name, fair, deliverable, now);
    for agent in take {
        owners.pending.insert(agent.clone());
        let (store, name, done) = (gateway.store.clone(), name.to_string(), done.clone());
        tokio::spawn(async move {
            let taken = store.take_replay(&agent, &name, lease).await;
            let _ = done.send(Owned::Taken(agent, taken));
        });
    }
    for agent in give {
        owners.pending.insert(agent.clone());
        let (store, name, done) = (gateway.store.clone(), name.to_string(), done.clone());
        tokio::spawn(async move {
            let given = match store.release_replay(&agent, &name).await {
                Ok(revision) => Some(revision),
                Err(e) => {
                    tracing::warn!(agent = %agent, error = %e, "cannot give back an agent's replay");
                    None
                }
            };
            let _ = done.send(Owned::Given(agent, given));
        });
    }
}

/// The agents of `deliverable` (waiting, with a replica ready) that `name` takes now: those
/// nobody replays or is taking, at once up to its `fair` share ([`Owners::fair_share`]), beyond
/// it once they have waited [`TAKE_PATIENCE`].
fn to_take(
    owners: &mut Owners,
    name: &str,
    fair: usize,
    deliverable: Vec<String>,
    now: Instant,
) -> Vec<String> {
    let mut mine = owners.mine(name);
    let Owners {
        by_agent,
        pending,
        unowned_since,
        ..
    } = owners;
    unowned_since.retain(|agent, _| deliverable.contains(agent) && !by_agent.contains_key(agent));
    let mut take = Vec::new();
    for agent in deliverable {
        if by_agent.contains_key(&agent) || pending.contains(&agent) {
            continue;
        }
        let since = *unowned_since.entry(agent.clone()).or_insert(now);
        if mine >= fair && now < since + TAKE_PATIENCE {
            continue;
        }
        mine += 1;
        take.push(agent);
    }
    take
}

/// The agents `name` gives back for balance: beyond its `fair` share of `deliverable`
/// ([`Owners::fair_share`]), those with the fewest deliveries under way here, so that a
/// gateway that starts (or restarts) gets its share at once instead of when queues empty, and
/// a gateway that dies stops half the agents' replay for its lease, not all of them. Its
/// deliveries under way finish; their claims hold the agent's concurrency meanwhile. Not one
/// given back for balance within [`BALANCE_HOLD`].
fn to_balance(
    owners: &mut Owners,
    name: &str,
    fair: usize,
    deliverable: &[String],
    busy: &HashSet<(String, u64)>,
    now: Instant,
) -> Vec<String> {
    owners.balanced_until.retain(|_, until| *until > now);
    // Less those being given back already.
    let mine = owners
        .by_agent
        .iter()
        .filter(|(agent, holder)| *holder == name && !owners.pending.contains(*agent))
        .count();
    if mine <= fair {
        return Vec::new();
    }
    let deliverable: HashSet<&str> = deliverable.iter().map(String::as_str).collect();
    let mut candidates: Vec<(usize, &String)> = owners
        .by_agent
        .iter()
        .filter(|(agent, holder)| {
            *holder == name
                && deliverable.contains(agent.as_str())
                && !owners.pending.contains(*agent)
                && !owners.balanced_until.contains_key(*agent)
        })
        .map(|(agent, _)| (busy.iter().filter(|(a, _)| a == agent).count(), agent))
        .collect();
    candidates.sort();
    let give: Vec<String> = candidates
        .into_iter()
        .take(mine - fair)
        .map(|(_, agent)| agent.clone())
        .collect();
    for agent in &give {
        owners
            .balanced_until
            .insert(agent.clone(), now + BALANCE_HOLD);
    }
    give
}

/// For each agent with a ready replica that is not backing off: deliver its oldest waiting
/// requests, as many at once as its replay concurrency allows, started oldest first. At a
/// concurrency of 1 the order is strict: a request another gateway holds, or one waiting out
/// an interrupted attempt, is waited for, not overtaken. Looks only at the head of each queue.
#[allow(clippy::too_many_arguments)]
fn start_deliveries(
    gateway: &Arc<Gateway>,
    name: &str,
    lease: i64,
    owners: &Owners,
    index: &Index,
    claims: &HashMap<(String, u64), Holder>,
    busy: &mut HashSet<(String, u64)>,
    gates: &mut HashMap<String, Arc<Gate>>,
    answered: &HashSet<(String, u64)>,
    not_before: &HashMap<String, Instant>,
    deferred: &HashMap<(String, u64), Instant>,
    deliveries: &mut JoinSet<Done>,
    answered_tx: &tokio::sync::mpsc::UnboundedSender<(String, u64)>,
    fetched_tx: &tokio::sync::mpsc::UnboundedSender<Fetched>,
) {
    let now = Instant::now();
    // Our claims that nothing of ours delivers: left behind by a claim or a finish whose
    // outcome was uncertain (etcd timed out, yet had written it). Our lease keeps them alive,
    // so they would never expire, and they count against their agent's concurrency: at its
    // full concurrency, they would stop its queue for good. Let go first, whoever replays the
    // agent now.
    for at in left_behind(claims, busy, lease) {
        busy.insert(at.clone());
        let (store, (agent, seq)) = (gateway.store.clone(), at);
        deliveries.spawn(async move {
            match store.release_claim(&agent, seq, lease).await {
                Ok(()) => (agent, seq, true, After::Released),
                Err(e) => {
                    tracing::warn!(agent = %agent, error = %e, "cannot release a stale claim");
                    (agent, seq, false, After::Released)
                }
            }
        });
    }
    let routes = gateway.routes.borrow();
    // Claims of each agent: by any gateway, and by others than this life of this one.
    let mut claimed: HashMap<&str, (usize, usize)> = HashMap::new();
    for ((agent, _), holder) in claims {
        let counts = claimed.entry(agent.as_str()).or_default();
        counts.0 += 1;
        counts.1 += usize::from(holder.lease != lease);
    }
    // Deliveries of ours per agent: not yet claimed, and answered by the agent.
    let mut ours: HashMap<&str, (usize, usize)> = HashMap::new();
    for at in busy.iter().filter(|at| !claims.contains_key(*at)) {
        if let Some((agent, _)) = index.get_key_value(at.0.as_str()) {
            ours.entry(agent.as_str()).or_default().0 += 1;
        }
    }
    for at in answered {
        if let Some((agent, _)) = index.get_key_value(at.0.as_str()) {
            ours.entry(agent.as_str()).or_default().1 += 1;
        }
    }
    for (agent, queue) in index {
        let Some(route) = routes.get(agent) else {
            continue;
        };
        // Not one being given back (nor taken: not ours yet).
        if owners.by_agent.get(agent).map(String::as_str) != Some(name)
            || owners.pending.contains(agent)
        {
            continue;
        }
        if route.replicas.is_empty() || not_before.get(agent).is_some_and(|t| *t > now) {
            continue;
        }
        // The agent's replay concurrency holds across gateways: what others hold (another
        // gateway, or an earlier life of this one) may run at the agent.
        let concurrency = route.replay.concurrency.max(1) as usize;
        let (all_claims, others) = claimed.get(agent.as_str()).copied().unwrap_or_default();
        let gate = gates
            .entry(agent.clone())
            .or_insert_with(|| Arc::new(Gate::new(concurrency)))
            .clone();
        gate.set_limit(concurrency.saturating_sub(others));
        if gate.closed() {
            continue;
        }
        // As many again claimed ahead, while its deliveries are short: each starts as soon
        // as a slot frees, its claim written meanwhile. Not one at a time, where the next
        // request must wait for the outcome of the one before (which may be tried again), nor
        // while another gateway holds claims on the agent.
        let ahead = if concurrency > 1 && others == 0 && gate.ahead() {
            concurrency
        } else {
            0
        };
        // Deliveries under way: claims, and ours not yet claimed; less ours that the agent has
        // answered (each counted once above, as a claim or as unclaimed).
        let (unclaimed, done_at_agent) = ours.get(agent.as_str()).copied().unwrap_or_default();
        let under_way = (all_claims + unclaimed).saturating_sub(done_at_agent);
        // Slots free at the agent, then those claimed ahead.
        let mut at_agent = concurrency.saturating_sub(under_way);
        let mut free = (concurrency + ahead).saturating_sub(under_way);
        for (&seq, waiting) in queue {
            if free == 0 {
                break;
            }
            let at = (agent.clone(), seq);
            if busy.contains(&at) {
                continue;
            }
            let waits = deferred.get(&at).is_some_and(|t| *t > now);
            // Another gateway's claim (ours would be in `busy`).
            if waits || claims.contains_key(&at) {
                if concurrency == 1 {
                    break;
                }
                continue;
            }
            if at_agent > 0 {
                at_agent -= 1;
            } else if !waiting
                .record
                .as_ref()
                .is_some_and(|r| safe_to_resend(&r.request))
            {
                // Claimed ahead only when safe to send twice: a gateway that crashes before
                // sending it leaves it marked delivering, and one that is not safe would be
                // dead-lettered for a send that never happened. Nor past it: oldest first.
                break;
            }
            free -= 1;
            busy.insert(at);
            let agent = agent.clone();
            // Without its record: read it with the next ones (up to HEAD of them).
            let record = match &waiting.record {
                Some(record) => Ok(record.clone()),
                None => Err(queue
                    .range(seq..)
                    .take(HEAD)
                    .last()
                    .map_or(seq, |(last, _)| *last)),
            };
            let (gateway, name) = (gateway.clone(), name.to_string());
            let (answered, fetched) = (answered_tx.clone(), fetched_tx.clone());
            // In line from now, before its claim: the gate lets requests through oldest first.
            let ticket = gate.line_up(seq);
            deliveries.spawn(async move {
                let reports = Reports { answered, fetched };
                match deliver(&gateway, &name, lease, &agent, record, ticket, &reports).await {
                    Ok(after) => (agent, seq, true, after),
                    Err(e) => {
                        // The claim may still stand; the next pass releases it if it is ours.
                        tracing::warn!(agent = %agent, error = %e, "replay failed");
                        (agent, seq, false, After::Backoff(BACKOFF_MIN))
                    }
                }
            });
        }
    }
}

/// The claims under this life's claim `lease` that none of its deliveries (`busy`) stands
/// behind. Not those of an earlier life under the same name: their deliveries may still run at
/// the agent, so they keep counting against its concurrency until their lease ends.
fn left_behind(
    claims: &HashMap<(String, u64), Holder>,
    busy: &HashSet<(String, u64)>,
    lease: i64,
) -> Vec<(String, u64)> {
    claims
        .iter()
        .filter(|(at, holder)| holder.lease == lease && !busy.contains(*at))
        .map(|(at, _)| at.clone())
        .collect()
}

/// What a delivery tells the replayer while it runs.
struct Reports {
    /// The agent has answered (delivered); its outcome is still to be written.
    answered: tokio::sync::mpsc::UnboundedSender<(String, u64)>,
    /// Records read ahead.
    fetched: tokio::sync::mpsc::UnboundedSender<Fetched>,
}

/// Claims and delivers the request at `(agent, ticket.seq())`, whose record the index holds,
/// or which is read with the next ones up to the position given; it reaches the agent when
/// the agent's gate lets its `ticket` through. Returns the wait before the agent's next
/// delivery when this one failed (or must wait for an interrupted attempt's deadline).
async fn deliver(
    gateway: &Gateway,
    name: &str,
    lease: i64,
    agent: &str,
    record: Result<Arc<StoredRequest>, u64>,
    ticket: Ticket,
    reports: &Reports,
) -> Result<After, StoreError> {
    let store = &gateway.store;
    let seq = ticket.seq();
    let stored = match record {
        Ok(record) => record,
        Err(last) => {
            let (mut records, revision) = store.get_waiting(agent, seq, last).await?;
            if records.first().map(|r| r.request.seq) != Some(seq) {
                return Ok(After::Gone(revision)); // the index has not heard yet
            }
            let first = records.remove(0);
            let _ = reports.fetched.send(records);
            Arc::new(first)
        }
    };
    // A body too large to be kept in the record is read apart.
    let apart = if stored.request.body.is_empty() && stored.request.body_bytes > 0 {
        match store.get_request_body(&stored.request).await? {
            Some(body) => Some(body),
            None => return Ok(After::Next), // gone meanwhile; the watch will tell
        }
    } else {
        None
    };
    if !matches!(
        RequestState::try_from(stored.request.state),
        Ok(RequestState::Queued | RequestState::Delivering)
    ) {
        return Ok(After::Gone(stored.revision));
    }
    // Still marked delivering, with no claim: its gateway stopped, or lost its claim (paused or
    // cut off past its lease) while the attempt may still run at the agent. Nothing is sent
    // before that attempt's deadline; then only a request that is safe to send twice goes.
    let interrupted = stored.request.state == RequestState::Delivering as i32;
    if interrupted {
        if let Some(deadline) = &stored.request.attempt_deadline {
            let left = berth_proto::time::system_time(deadline)
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            if !left.is_zero() {
                return Ok(After::Defer(left));
            }
        }
    }
    let route = gateway.routes.borrow().get(agent).cloned();
    let timeout = route
        .as_ref()
        .map_or(berth_proto::defaults::REQUEST_TIMEOUT, |r| r.timeout);
    // The attempt ends by its deadline, which a takeover waits for: it is sent by `sent_by`
    // (its claim's time and up to HOLD at the gate, within HOLD and half the margin) or not
    // at all, so that it ends at least half the margin (clock skew) before the deadline.
    let deadline = SystemTime::now() + HOLD + timeout + DEADLINE_MARGIN;
    let sent_by = Instant::now() + HOLD + DEADLINE_MARGIN / 2;
    let claiming = Instant::now();
    let claimed = store.claim_request(&stored, name, lease, deadline).await?;
    step(&gateway.metrics.replay_steps.claim, claiming);
    let mut claim = match claimed {
        ClaimOutcome::Claimed(claim) => *claim,
        ClaimOutcome::Held {
            holder,
            lease,
            revision,
        } => {
            let holder = Holder {
                name: holder,
                lease,
            };
            return Ok(After::HeldBy(holder, revision));
        }
        // The record kept was not the latest: read it next time (the watch will tell).
        ClaimOutcome::Changed => return Ok(After::Stale(stored.revision)),
        ClaimOutcome::Gone { revision } => return Ok(After::Gone(revision)),
    };
    let Some(route) = route else {
        // The agent is gone; keep the request for inspection.
        claim.stored.request.state = RequestState::Dead as i32;
        claim.stored.request.last_error = "the agent was deleted".into();
        finish(gateway, &claim, None).await?;
        return Ok(After::Next);
    };
    let mut request = claim.stored.request.clone();
    if let Some(body) = apart {
        request.body = body;
    }
    let forward = to_forward(&request);
    let safe = forward.is_safe();
    if interrupted && !safe {
        claim.stored.request.state = RequestState::Dead as i32;
        claim.stored.request.last_error = "a delivery was interrupted (its gateway stopped) and \
            the agent may have seen it; not safe to send again (berth requests retry ID resends it)"
            .into();
        finish(gateway, &claim, None).await?;
        count(gateway, agent, "dead");
        return Ok(After::Next);
    }
    let waiting = Instant::now();
    let running = match ticket.pass(sent_by).await {
        Ok(running) => {
            step(&gateway.metrics.replay_steps.wait, waiting);
            running
        }
        Err(refused) => {
            // Not sent: the claim is given back with its attempt, and the request waits as
            // it did (the next pass starts it again, unless the agent backs off).
            tracing::debug!(agent = %agent, request_id = %claim.stored.request.id, ?refused, "claimed ahead, not sent");
            let r = &mut claim.stored.request;
            r.state = RequestState::Queued as i32;
            r.attempts = r.attempts.saturating_sub(1);
            r.attempt_deadline = None;
            finish(gateway, &claim, None).await?;
            return Ok(After::Released);
        }
    };
    let stack = gateway.stack(&route);
    let service = stack.service.lock().expect("stack lock").clone();
    let forwarding = Instant::now();
    let result = service.oneshot(forward).await;
    step(&gateway.metrics.replay_steps.forward, forwarding);
    let described = match &result {
        Ok(r) => format!("agent answered {}", r.status()),
        Err(e) => e.to_string(),
    };
    let ending = Ending::of(&result);
    let failure = match ending.verdict(safe) {
        Verdict::Delivered => None,
        Verdict::TryLater => Some(described),
        // The agent may have seen it and a second delivery could do harm: stop here.
        Verdict::Dead => {
            running.end(None);
            claim.stored.request.state = RequestState::Dead as i32;
            claim.stored.request.last_error = format!("{described} (not safe to deliver again)");
            finish(gateway, &claim, None).await?;
            count(gateway, agent, "dead");
            return Ok(After::Next);
        }
    };
    let r = &mut claim.stored.request;
    r.attempt_deadline = None;
    // Claimed as an attempt, but nothing reached the agent (a replica that just went away):
    // it is not one of the deliveries `max_attempts` counts.
    if ending.unsent() {
        r.attempts = r.attempts.saturating_sub(1);
    }
    let (after, answer) = match (failure, result) {
        (None, Ok(response)) => {
            r.state = RequestState::Delivered as i32;
            r.last_error.clear();
            // Read by the attempt's end, as sent by `sent_by`: an answer that stalls is kept
            // cut, and the attempt ends before the deadline a takeover waits for.
            let until = sent_by + timeout;
            let (answer, _) = super::answer::keep(response, MAX_STORED_RESPONSE, until).await;
            count(gateway, agent, "delivered");
            tracing::debug!(agent = %agent, request_id = %r.id, attempts = r.attempts, truncated = answer.truncated, "replayed");
            (After::Next, Some(answer))
        }
        (Some(error), _) if r.attempts >= route.replay.max_attempts => {
            r.state = RequestState::Dead as i32;
            r.last_error = error;
            count(gateway, agent, "dead");
            tracing::warn!(agent = %agent, request_id = %r.id, attempts = r.attempts, "dead-lettered");
            (After::Next, None)
        }
        (Some(error), _) => {
            r.state = RequestState::Queued as i32;
            r.last_error = error;
            count(gateway, agent, "failed");
            let doublings = r.attempts.saturating_sub(1).min(16);
            let wait = (BACKOFF_MIN * 2u32.pow(doublings)).min(BACKOFF_MAX);
            (After::Backoff(wait), None)
        }
        (None, Err(_)) => unreachable!("no failure means an answer"),
    };
    // Over at the agent: its slot goes to the next in line while the outcome is written; after
    // a failure, what waits at the gate waits for the backoff.
    let backoff = match after {
        After::Backoff(wait) => Some(wait),
        _ => None,
    };
    running.end(backoff);
    if answer.is_some() {
        let _ = reports.answered.send((agent.to_string(), seq));
    }
    finish(gateway, &claim, answer.as_ref()).await?;
    Ok(after)
}

/// Writes a delivery's outcome if the claim is still ours; otherwise the next holder decides
/// and this outcome is dropped (logged).
async fn finish(
    gateway: &Gateway,
    claim: &Claim,
    answer: Option<&StoredResponse>,
) -> Result<(), StoreError> {
    let finishing = Instant::now();
    let finished = gateway.store.finish_request(claim, answer).await?;
    step(&gateway.metrics.replay_steps.finish, finishing);
    if finished == Finished::LostClaim {
        let r = &claim.stored.request;
        tracing::warn!(agent = %r.agent, request_id = %r.id, "claim lost during delivery; its outcome is not written");
        count(gateway, &r.agent, "claim_lost");
    }
    Ok(())
}

/// Observes the time of a delivery's step, begun at `since`.
fn step(histogram: &prometheus_client::metrics::histogram::Histogram, since: Instant) {
    histogram.observe(since.elapsed().as_secs_f64());
}

fn count(gateway: &Gateway, agent: &str, outcome: &str) {
    gateway
        .metrics
        .replays
        .get_or_create(&super::super::metrics::ReplayLabels {
            agent: agent.to_string(),
            outcome: outcome.to_string(),
        })
        .inc();
}

/// The stored request as it goes to the agent again: the same headers (the request id among
/// them) and the replay attempt.
/// Whether a stored request is safe to deliver twice: an idempotent method, or an
/// `Idempotency-Key` (as [`Forward::is_safe`] tells of the request it becomes).
fn safe_to_resend(request: &Request) -> bool {
    Method::from_bytes(request.method.as_bytes()).is_ok_and(|m| m.is_idempotent())
        || request.headers.iter().any(|h| {
            h.name
                .eq_ignore_ascii_case(berth_proto::request::IDEMPOTENCY_KEY.as_str())
        })
}

fn to_forward(request: &Request) -> Forward {
    let mut headers = HeaderMap::new();
    for h in &request.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::try_from(h.name.as_str()),
            HeaderValue::from_bytes(&h.value),
        ) {
            headers.append(name, value);
        }
    }
    headers.insert(REPLAY_ATTEMPT, HeaderValue::from(request.attempts));
    let mut path_and_query = request.path.clone();
    if !request.query.is_empty() {
        path_and_query.push('?');
        path_and_query.push_str(&request.query);
    }
    Forward {
        agent: request.agent.clone(),
        method: Method::from_bytes(request.method.as_bytes()).unwrap_or(Method::POST),
        path_and_query,
        headers: Arc::new(headers),
        body: ForwardBody::Buffered(Bytes::from(request.body.clone())),
        tried: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_of_ours_that_no_delivery_stands_behind_are_left_behind() {
        let at = |agent: &str, seq: u64| (agent.to_string(), seq);
        let held = |name: &str, lease: i64| Holder {
            name: name.to_string(),
            lease,
        };
        let claims: HashMap<_, _> = [
            (at("a", 1), held("ga", 7)),
            (at("a", 2), held("ga", 7)),
            (at("a", 3), held("gb", 8)),
            (at("b", 1), held("ga", 7)),
            // The same name's previous life (killed and restarted): not ours to let go.
            (at("b", 2), held("ga", 5)),
        ]
        .into();
        // Every claim of the agent's concurrency is ours and stale: all are let go (before,
        // a full concurrency stopped the queue for good, since only free slots were looked at).
        let mut stale = left_behind(&claims, &HashSet::new(), 7);
        stale.sort();
        assert_eq!(stale, [at("a", 1), at("a", 2), at("b", 1)]);
        // A delivery of ours under way keeps its claim; another gateway's is never ours to go.
        let busy: HashSet<_> = [at("a", 2), at("a", 3)].into();
        let mut stale = left_behind(&claims, &busy, 7);
        stale.sort();
        assert_eq!(stale, [at("a", 1), at("b", 1)]);
    }

    #[test]
    fn only_requests_safe_to_send_twice_count_as_safe_to_resend() {
        let request = |method: &str, header: Option<&str>| Request {
            method: method.into(),
            headers: header
                .map(|name| berth_proto::v1::Header {
                    name: name.into(),
                    value: b"k-1".to_vec(),
                })
                .into_iter()
                .collect(),
            ..Default::default()
        };
        for (method, header, safe) in [
            ("GET", None, true),
            ("PUT", None, true),
            ("DELETE", None, true),
            ("POST", None, false),
            ("PATCH", None, false),
            ("POST", Some("Idempotency-Key"), true),
            ("POST", Some("idempotency-key"), true),
            ("POST", Some("x-idempotency"), false),
            ("", None, false),
        ] {
            let r = request(method, header);
            assert_eq!(safe_to_resend(&r), safe, "{method} {header:?}");
            assert_eq!(to_forward(&r).is_safe(), safe, "{method} {header:?}");
        }
    }

    #[test]
    fn the_index_keeps_the_head_of_each_queue_and_only_the_size_past_it() {
        let (index, stats) = (&mut Index::new(), QueueStats::default());
        let record = |seq: u64| Request {
            agent: "a".into(),
            seq,
            body_bytes: 100 + seq,
            body: vec![b'b'; 10],
            headers: vec![berth_proto::v1::Header {
                name: "x".into(),
                value: b"y".to_vec(),
            }],
            ..Default::default()
        };
        let total = HEAD as u64 + 4;
        for seq in 0..total {
            let key = format!("/berth/queue/a/{seq:020}");
            track(
                index,
                &stats,
                key.as_bytes(),
                &record(seq).encode_to_vec(),
                (seq as i64, 0),
            );
        }
        let queue = &index["a"];
        assert_eq!(queue.len() as u64, total);
        for (seq, waiting) in queue {
            assert_eq!(waiting.size, 100 + seq, "the size of {seq}");
            assert_eq!(
                waiting.record.is_some(),
                *seq < HEAD as u64,
                "the record of {seq}"
            );
        }
        let bytes: u64 = (0..total).map(|s| 100 + s).sum();
        assert_eq!(stats.of("a"), (total as u32, bytes));
    }

    /// [`to_take`] with the fair share the replayer works out.
    fn take(owners: &mut Owners, name: &str, waiting: Vec<String>, now: Instant) -> Vec<String> {
        let fair = owners.fair_share(name, waiting.len());
        to_take(owners, name, fair, waiting, now)
    }

    /// [`to_balance`] with the fair share the replayer works out.
    fn balance(
        owners: &mut Owners,
        name: &str,
        waiting: &[String],
        busy: &HashSet<(String, u64)>,
        now: Instant,
    ) -> Vec<String> {
        let fair = owners.fair_share(name, waiting.len());
        to_balance(owners, name, fair, waiting, busy, now)
    }

    #[tokio::test(start_paused = true)]
    async fn a_gateway_takes_its_fair_share_of_waiting_agents_and_the_rest_after_a_while() {
        let agents = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let mut owners = Owners::default();
        // Alone: it takes every waiting agent at once.
        let now = Instant::now();
        assert_eq!(
            take(&mut owners, "ga", agents(&["a", "b"]), now),
            agents(&["a", "b"])
        );
        // Of six waiting agents, another gateway replays two and this one two: three each is
        // fair, so it takes one of the two free ones at once, the other after the patience.
        let mut owners = Owners::default();
        for (agent, holder) in [("a", "gb"), ("b", "gb"), ("c", "ga"), ("f", "ga")] {
            owners.by_agent.insert(agent.into(), holder.into());
        }
        let waiting = agents(&["a", "b", "c", "d", "e", "f"]);
        assert_eq!(
            take(&mut owners, "ga", waiting.clone(), now),
            agents(&["d"])
        );
        owners.by_agent.insert("d".into(), "ga".into());
        assert!(take(&mut owners, "ga", waiting.clone(), now).is_empty());
        let later = now + TAKE_PATIENCE;
        assert_eq!(
            take(&mut owners, "ga", waiting.clone(), later),
            agents(&["e"])
        );
        // One being taken is not taken twice.
        owners.pending.insert("e".into());
        assert!(take(&mut owners, "ga", waiting, later).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_gateway_with_more_than_its_share_gives_the_least_busy_back_once() {
        let agents = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let waiting = agents(&["a", "b", "c", "d", "e", "f"]);
        let mut owners = Owners::default();
        for agent in &waiting {
            owners.by_agent.insert(agent.clone(), "gb".into());
        }
        let busy: HashSet<(String, u64)> = [("a", 1), ("a", 2), ("b", 3), ("c", 4), ("d", 5)]
            .into_iter()
            .map(|(a, s)| (a.to_string(), s))
            .collect();
        let now = Instant::now();
        // Alone, it keeps them all.
        owners.members.insert("gb".into());
        assert!(balance(&mut owners, "gb", &waiting, &busy, now).is_empty());
        // Another gateway's replayer runs: three each is fair, and it gives back the three
        // with the fewest deliveries under way here (the idle e and f, then one of b, c, d).
        owners.members.insert("ga".into());
        let mut given = balance(&mut owners, "gb", &waiting, &busy, now);
        given.sort();
        assert_eq!(given.len(), 3);
        assert!(given.contains(&"e".to_string()) && given.contains(&"f".to_string()));
        assert!(!given.contains(&"a".to_string()), "{given:?}");
        // While they are being given back it gives no more.
        owners.pending.extend(given.iter().cloned());
        assert!(balance(&mut owners, "gb", &waiting, &busy, now).is_empty());
        // Given back, nobody took them, and it took them again after the patience: those are
        // not given back for balance again until the hold has passed (the other three are,
        // once), so each agent goes without replay for at most the patience per hold.
        owners.pending.clear();
        let later = now + TAKE_PATIENCE;
        let others = balance(&mut owners, "gb", &waiting, &busy, later);
        assert!(others.iter().all(|a| !given.contains(a)), "{others:?}");
        assert!(balance(&mut owners, "gb", &waiting, &busy, later).is_empty());
        let again = balance(&mut owners, "gb", &waiting, &busy, now + BALANCE_HOLD);
        assert_eq!(again.len(), 3);
        // The other gateway counts it as a member and takes what is free at once.
        for agent in &given {
            owners.by_agent.remove(agent);
        }
        owners.pending.clear();
        assert_eq!(
            take(&mut owners, "ga", waiting.clone(), now + BALANCE_HOLD).len(),
            3
        );
    }

    #[test]
    fn the_index_holds_what_the_queue_markers_say() {
        let stats = QueueStats::default();
        let mut index = Index::new();
        let mut marker = |seq: u64, size: u64| {
            let record = Request {
                body_bytes: size,
                ..Default::default()
            };
            let key = format!("/berth/queue/a/{seq:020}");
            track(
                &mut index,
                &stats,
                key.as_bytes(),
                &record.encode_to_vec(),
                (1, 0),
            );
        };
        marker(1, 10);
        marker(1, 10);
        marker(2, 5);
        assert_eq!(stats.of("a"), (2, 15));
        assert_eq!(index["a"].keys().next(), Some(&1));
    }

    #[test]
    fn records_are_kept_near_the_head_and_read_ahead_ones_only_when_current() {
        let stats = QueueStats::default();
        let mut index = Index::new();
        let put = |index: &mut Index, seq: u64, revision: i64| {
            let record = Request {
                agent: "a".into(),
                seq,
                ..Default::default()
            };
            let key = format!("/berth/queue/a/{seq:020}");
            track(
                index,
                &stats,
                key.as_bytes(),
                &record.encode_to_vec(),
                (revision, 7),
            );
        };
        let last = HEAD as u64 + 10;
        for seq in 1..=last {
            put(&mut index, seq, seq as i64);
        }
        let kept = |index: &Index| {
            index["a"]
                .iter()
                .filter(|(_, w)| w.record.is_some())
                .map(|(seq, _)| *seq)
                .collect::<Vec<_>>()
        };
        assert_eq!(kept(&index), (1..=HEAD as u64).collect::<Vec<_>>());
        let first = index["a"][&1].record.clone().unwrap();
        assert_eq!((first.revision, first.lease), (1, 7));
        // One read past the head: what the index last saw is kept, an older or newer
        // version is not.
        let read = |seq: u64, revision: i64| StoredRequest {
            request: Request {
                agent: "a".into(),
                seq,
                ..Default::default()
            },
            revision,
            lease: 7,
        };
        let (current, newer, older) = (HEAD as u64 + 1, HEAD as u64 + 2, HEAD as u64 + 3);
        keep_records(
            &mut index,
            vec![
                read(current, current as i64),
                read(newer, newer as i64 + 100),
                read(older, older as i64 - 1),
                read(last + 1, 1),
            ],
        );
        let now_kept = kept(&index);
        assert!(now_kept.contains(&current));
        assert!(!now_kept.contains(&newer) && !now_kept.contains(&older));
        assert!(!index["a"].contains_key(&(last + 1)));
        // A change near the head replaces the kept record.
        put(&mut index, 1, 1000);
        assert_eq!(index["a"][&1].record.as_ref().unwrap().revision, 1000);
    }
}
