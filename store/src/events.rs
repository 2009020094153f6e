//! Events at `events/{id}`, written in the same transaction as the change they record and
//! expired by etcd leases, one lease per time bucket so that a busy cluster holds few leases.

use super::watch::{list_watch, Change};
use super::{decode, Store, StoreError};
use berth_proto::time::now;
use berth_proto::v1::Event;
use etcd_client::{PutOptions, Txn, TxnOp, TxnResponse};
use prost::Message;
use rand::Rng;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How long events are kept. Each lease is used for half of this, so events live between
/// half of it and all of it.
pub const EVENT_RETENTION: Duration = Duration::from_secs(3600);
/// Events buffered for a slow watcher before the stream applies backpressure.
const WATCH_BUFFER: usize = 256;

/// The lease that events written now are attached to.
pub(super) struct BucketLease {
    id: i64,
    granted: Instant,
}

/// Which events a reader wants.
#[derive(Clone, Debug, Default)]
pub struct EventFilter {
    /// Only events of this agent, when set.
    pub agent: Option<String>,
}

impl EventFilter {
    fn matches(&self, event: &Event) -> bool {
        self.agent
            .as_deref()
            .is_none_or(|agent| event.agent == agent)
    }
}

impl Store {
    /// Runs the transaction that `build` makes from the event's put operation. If the cached
    /// event lease has vanished (etcd lost it), a new one is granted and the write tried again.
    pub(super) async fn commit_with_event(
        &self,
        event: &Event,
        build: impl Fn(TxnOp) -> Txn,
    ) -> Result<TxnResponse, StoreError> {
        let mut event = event.clone();
        if event.time.is_none() {
            event.time = Some(now());
        }
        let key = self.keys.event(&event_id());
        for attempt in 0..2 {
            let lease = self.event_lease(attempt > 0).await?;
            let op = TxnOp::put(
                key.as_str(),
                event.encode_to_vec(),
                Some(PutOptions::new().with_lease(lease)),
            );
            match self.client().txn(build(op)).await {
                Ok(resp) => return Ok(resp),
                Err(e) if attempt == 0 && crate::lease_not_found(&e) => continue,
                Err(e) => return Err(self.unavailable(e)),
            }
        }
        unreachable!("the loop returns on its second attempt")
    }

    /// Records an event on its own.
    pub async fn record_event(&self, event: Event) -> Result<(), StoreError> {
        self.commit_with_event(&event, |op| Txn::new().and_then([op]))
            .await
            .map(drop)
    }

    /// Streams events after `since`: first the retained ones, then, with `follow`, new ones as
    /// they are recorded. Survives etcd outages and compaction (through [`list_watch`], which
    /// lists again; what was already sent is skipped by revision). Ends when the receiver is
    /// dropped.
    pub fn watch_events(
        &self,
        filter: EventFilter,
        since: i64,
        follow: bool,
    ) -> mpsc::Receiver<Result<Event, StoreError>> {
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let store = self.clone();
        tokio::spawn(async move {
            let mut last = since;
            let mut changes = list_watch(&store, store.keys.events());
            // A list comes in key order; events are sent in revision order.
            let mut listed: Vec<Event> = Vec::new();
            loop {
                let change = tokio::select! {
                    _ = tx.closed() => return,
                    change = changes.next() => change,
                };
                let kv = match change {
                    Change::Init => {
                        listed.clear();
                        continue;
                    }
                    Change::InitApply(kv) => {
                        match decode::<Event>(kv.key(), kv.value()) {
                            Ok(mut event) if kv.mod_revision() > last => {
                                event.revision = kv.mod_revision();
                                listed.push(event);
                            }
                            Ok(_) => {}
                            Err(e) => {
                                let _ = tx.send(Err(e)).await;
                                return;
                            }
                        }
                        continue;
                    }
                    Change::InitDone { revision } => {
                        listed.sort_by_key(|e| e.revision);
                        for event in listed.drain(..) {
                            last = event.revision;
                            if filter.matches(&event) && tx.send(Ok(event)).await.is_err() {
                                return;
                            }
                        }
                        if !follow {
                            return;
                        }
                        last = last.max(revision);
                        continue;
                    }
                    Change::Put(kv) => kv,
                    Change::Delete(_) => continue,
                };
                let mut event: Event = match decode(kv.key(), kv.value()) {
                    Ok(event) => event,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                event.revision = kv.mod_revision();
                last = event.revision;
                if filter.matches(&event) && tx.send(Ok(event)).await.is_err() {
                    return;
                }
            }
        });
        rx
    }

    async fn event_lease(&self, renew: bool) -> Result<i64, StoreError> {
        let mut cached = self.event_lease.lock().await;
        if let Some(lease) = cached.as_ref() {
            if !renew && lease.granted.elapsed() < EVENT_RETENTION / 2 {
                return Ok(lease.id);
            }
        }
        let granted = self
            .client()
            .lease_grant(EVENT_RETENTION.as_secs() as i64, None)
            .await
            .map_err(|e| self.unavailable(e))?;
        *cached = Some(BucketLease {
            id: granted.id(),
            granted: Instant::now(),
        });
        Ok(granted.id())
    }
}

/// A key that sorts by time and does not collide between control-plane replicas.
fn event_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("{nanos:020}-{:08x}", rand::rng().random::<u32>())
}
