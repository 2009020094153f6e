//! Node liveness (run by the leader): a node whose last heartbeat is older than
//! `NODE_UNKNOWN_AFTER` is marked unknown, so that gateways stop sending to its replicas; its
//! record's lease expires at `NODE_LEASE_TTL`, which makes it down (the record goes) and lets
//! placement move its replicas. A heartbeat marks it ready again.

use super::NODE_UNKNOWN_AFTER;
use berth_proto::v1::NodeStatus;
use berth_store::Store;
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

/// Time between liveness checks.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Runs until `stop` is cancelled; a check under way finishes first.
pub async fn run(store: Store, stop: CancellationToken) {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let records = match store.list_node_records().await {
            Ok(records) => records,
            Err(e) => {
                tracing::warn!(error = %e, "cannot check node liveness");
                continue;
            }
        };
        for (node, revision, lease) in records {
            if node.status != NodeStatus::Ready as i32 || !silent(&node.last_seen) {
                continue;
            }
            match store.mark_node_unknown(&node, revision, lease).await {
                Ok(true) => tracing::warn!(node = %node.name, "node silent: unknown"),
                Ok(false) => {} // it spoke meanwhile
                Err(e) => tracing::warn!(node = %node.name, error = %e, "cannot mark node unknown"),
            }
        }
    }
}

/// Whether `last_seen` is older than `NODE_UNKNOWN_AFTER`.
fn silent(last_seen: &Option<pbjson_types::Timestamp>) -> bool {
    let Some(t) = last_seen else { return true };
    let seen =
        SystemTime::UNIX_EPOCH + Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32);
    SystemTime::now()
        .duration_since(seen)
        .is_ok_and(|age| age > NODE_UNKNOWN_AFTER)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_is_measured_from_the_last_heartbeat() {
        let at = |ago: Duration| Some(berth_proto::timestamp(SystemTime::now() - ago));
        assert!(!silent(&at(Duration::from_secs(2))));
        assert!(silent(&at(NODE_UNKNOWN_AFTER + Duration::from_secs(1))));
        assert!(silent(&None));
    }
}
