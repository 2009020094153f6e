//! Leader election over etcd: one control plane at a time runs the scheduler (placement) and
//! the node monitor. The leader holds `{prefix}/leader` under a lease of `LEADER_TTL`, renewed
//! every `RENEW_EVERY`; when it dies the lease expires and another control plane takes over.
//! A leader that cannot renew in time stops leading before its lease can have expired.

use crate::store::watch::{watch_prefix, WatchMessage};
use crate::store::{Store, StoreError};
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

/// Lifetime of the leader's lease without renewal: the longest a dead leader is waited for.
pub const LEADER_TTL: Duration = Duration::from_secs(5);
/// Time between renewals.
pub const RENEW_EVERY: Duration = Duration::from_secs(1);
/// Time between attempts to become leader when no change is seen.
pub const RETRY_EVERY: Duration = Duration::from_secs(2);

/// Campaigns forever as `identity`; while leading, runs `work()` (a fresh run each term) and
/// stops it when leadership is lost.
pub async fn run<F, Fut>(store: Store, identity: String, work: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match term(&store, &identity, &work).await {
            Ok(()) => {}
            Err(e) => tracing::warn!(error = %e, "leader election"),
        }
        // Wait for the leader key to go (or a while) before trying again.
        let mut changes = watch_prefix(&store, store.keys().leader(), 0);
        tokio::select! {
            _ = async {
                while let Some(change) = changes.recv().await {
                    if matches!(change, WatchMessage::Delete(_) | WatchMessage::Compacted) {
                        return;
                    }
                }
            } => {}
            _ = tokio::time::sleep(RETRY_EVERY) => {}
        }
    }
}

/// One attempt: if the key is free, lead until the lease cannot be renewed.
async fn term<F, Fut>(store: &Store, identity: &str, work: &F) -> Result<(), StoreError>
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let lease = store.grant_lease(LEADER_TTL.as_secs() as i64).await?;
    if !store.try_lead(identity, lease).await? {
        store.revoke_lease(lease).await;
        return Ok(());
    }
    tracing::info!(identity, "leading");
    let task = tokio::spawn(work());
    let mut renewer = store.lease_renewer(lease);
    let mut renewed = Instant::now();
    let mut tick = tokio::time::interval(RENEW_EVERY);
    let result = loop {
        tick.tick().await;
        match tokio::time::timeout(RENEW_EVERY, renewer.renew()).await {
            Ok(Ok(())) => renewed = Instant::now(),
            Ok(Err(StoreError::NotFound { .. })) => break Ok(()),
            Ok(Err(e)) if renewed.elapsed() + RENEW_EVERY >= LEADER_TTL => break Err(e),
            Ok(Err(_)) | Err(_) => {
                if renewed.elapsed() + RENEW_EVERY >= LEADER_TTL {
                    break Ok(());
                }
            }
        }
    };
    task.abort();
    tracing::warn!(identity, "no longer leading");
    result
}
