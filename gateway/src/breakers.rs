//! Publishes this gateway's breaker changes: a metric for each, and the new state in etcd
//! under the gateway's lease, for `berth get`.

use super::balance::BreakerChange;
use super::metrics::{BreakerLabels, GatewayMetrics};
use berth_proto::v1::BreakerState;
use berth_store::Store;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Lifetime of the published states without renewal: a gateway gone this long drops out.
pub const LEASE_TTL: Duration = Duration::from_secs(15);
/// Time between lease renewals.
pub const RENEW_EVERY: Duration = Duration::from_secs(5);

/// Runs until the change channel closes or `stop` is cancelled; a stopping gateway gives its
/// lease back, so its published states go at once.
pub async fn publish(
    store: Store,
    gateway: String,
    mut changes: mpsc::UnboundedReceiver<BreakerChange>,
    metrics: Arc<GatewayMetrics>,
    stop: CancellationToken,
) {
    let mut renewer: Option<berth_store::LeaseRenewer> = None;
    let mut renew = tokio::time::interval(RENEW_EVERY);
    loop {
        let change = tokio::select! {
            _ = stop.cancelled() => {
                if let Some(r) = &renewer {
                    store.revoke_lease(r.lease()).await;
                }
                return;
            }
            change = changes.recv() => match change {
                Some(change) => change,
                None => return,
            },
            _ = renew.tick() => {
                if let Some(r) = renewer.as_mut() {
                    if let Err(e) = berth_store::LeaseRenewer::renew(r).await {
                        tracing::warn!(error = %e, "cannot renew the gateway's lease");
                        renewer = None;
                    }
                }
                continue;
            }
        };
        let to = change.transition.to;
        tracing::info!(agent = %change.agent, replica = %change.replica, from = ?change.transition.from, ?to, "breaker");
        metrics
            .breaker_transitions
            .get_or_create(&BreakerLabels {
                agent: change.agent.clone(),
                replica: change.replica.clone(),
                to: match to {
                    BreakerState::Open => "open",
                    BreakerState::HalfOpen => "half_open",
                    _ => "closed",
                }
                .into(),
            })
            .inc();
        if renewer.is_none() {
            match store.grant_lease(LEASE_TTL.as_secs() as i64).await {
                Ok(lease) => renewer = Some(store.lease_renewer(lease)),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot publish breaker state");
                    continue;
                }
            }
        }
        let lease = renewer.as_ref().expect("set above").lease();
        if let Err(e) = store
            .put_breaker(&change.agent, &change.replica, &gateway, to, lease)
            .await
        {
            tracing::warn!(error = %e, "cannot publish breaker state");
            renewer = None;
        }
    }
}
