//! Leader election over etcd: one control plane at a time runs the scheduler (placement) and
//! the node monitor. The leader holds `{prefix}/leader` under a lease of `LEADER_TTL`, renewed
//! every `RENEW_EVERY`; when it dies the lease expires and another control plane takes over.
//! A leader that cannot renew in time stops leading before its lease can have expired.

use berth_store::watch::{list_watch, Change};
use berth_store::{Store, StoreError};
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Lifetime of the leader's lease without renewal: the longest a dead leader is waited for.
pub const LEADER_TTL: Duration = Duration::from_secs(5);
/// Time between renewals.
pub const RENEW_EVERY: Duration = Duration::from_secs(1);
/// Time between attempts to become leader when no change is seen.
pub const RETRY_EVERY: Duration = Duration::from_secs(2);

/// How long the leader's work may take to finish its write once leadership ends (lost, or the
/// control plane stopping) before it is aborted. A term ends with at least `RENEW_EVERY` of
/// its lease left, so the work has stopped before another control plane can lead.
pub const WORK_STOP_GRACE: Duration = RENEW_EVERY;

/// Campaigns as `identity` until `stop` is cancelled; while leading, runs `work(term, lease)`
/// (a fresh run each term). `term` is cancelled when leadership ends, and the work is let
/// finish what it is writing (up to [`WORK_STOP_GRACE`]) rather than aborted. `lease` is the
/// term's: the work fences its writes with it ([`Store::fenced`]), since a leader that stood
/// still (SIGSTOP, a stalled VM) resumes its work before it learns that its term has ended. A
/// stopping leader gives its lease back, so another control plane leads at once.
pub async fn run<F, Fut>(store: Store, identity: String, stop: CancellationToken, work: F)
where
    F: Fn(CancellationToken, i64) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    while !stop.is_cancelled() {
        match term(&store, &identity, &stop, &work).await {
            Ok(()) => {}
            Err(e) => tracing::warn!(error = %e, "leader election"),
        }
        // Wait for the leader key to go (or a while) before trying again.
        let mut changes = list_watch(&store, store.keys().leader());
        let vacant = async {
            let mut held = false;
            loop {
                match changes.next().await {
                    Change::Init => held = false,
                    Change::InitApply(_) => held = true,
                    Change::InitDone { .. } if !held => return,
                    Change::Delete(_) => return,
                    Change::InitDone { .. } | Change::Put(_) => {}
                }
            }
        };
        tokio::select! {
            _ = vacant => {}
            _ = tokio::time::sleep(RETRY_EVERY) => {}
            _ = stop.cancelled() => {}
        }
    }
}

/// One attempt: if the key is free, lead until the lease cannot be renewed or `stop`.
async fn term<F, Fut>(
    store: &Store,
    identity: &str,
    stop: &CancellationToken,
    work: &F,
) -> Result<(), StoreError>
where
    F: Fn(CancellationToken, i64) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let lease = store.grant_lease(LEADER_TTL.as_secs() as i64).await?;
    if !store.try_lead(identity, lease).await? {
        store.revoke_lease(lease).await;
        return Ok(());
    }
    tracing::info!(identity, "leading");
    let term = stop.child_token();
    let mut task = tokio::spawn(work(term.clone(), lease));
    let mut renewer = store.lease_renewer(lease);
    let mut renewed = Instant::now();
    let mut tick = tokio::time::interval(RENEW_EVERY);
    let result = loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break Ok(()),
        }
        match renewer.renew_within(RENEW_EVERY).await {
            Ok(()) => renewed = Instant::now(),
            Err(StoreError::NotFound { .. }) => break Ok(()),
            Err(e) if renewed.elapsed() + RENEW_EVERY >= LEADER_TTL => break Err(e),
            Err(_) => {}
        }
    };
    term.cancel();
    if tokio::time::timeout(WORK_STOP_GRACE, &mut task)
        .await
        .is_err()
    {
        tracing::warn!(
            identity,
            "leader work did not stop within {WORK_STOP_GRACE:?}; aborted"
        );
        task.abort();
    }
    if stop.is_cancelled() {
        store.revoke_lease(lease).await;
    }
    tracing::warn!(identity, "no longer leading");
    result
}
