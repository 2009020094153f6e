//! Keeps etcd bounded (run by the leader): finished replay records within their retention
//! bounds (oldest dropped first), etcd's history compacted behind what watchers need, and a
//! warning event when the database nears its space quota (docs/architecture.md, "The replay
//! queue"). Its first pass also indexes the dead letters that an earlier version stored.

use crate::metrics::Metrics;
use berth_proto::v1::{Event, EventSeverity};
use berth_store::{Retention, Store};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Time between housekeeping passes.
pub const EVERY: Duration = Duration::from_secs(30);
/// The share of the quota past which the database size is warned about.
pub const NEAR_QUOTA: f64 = 0.8;
/// Least time between two warnings about the quota.
pub const WARN_EVERY: Duration = Duration::from_secs(3600);

/// What housekeeping keeps to.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Finished replay records kept.
    pub retention: Retention,
    /// History kept behind the current revision, by age; zero turns compaction off.
    pub compaction_retention: Duration,
    /// etcd's space quota (`--quota-backend-bytes`), for the warning.
    pub quota_bytes: u64,
}

/// Picks compaction revisions: revisions seen over time, and the newest one at least
/// `retain` old, like etcd's own periodic auto-compaction.
#[derive(Debug)]
pub struct Compactor {
    retain: Duration,
    samples: VecDeque<(Instant, i64)>,
    compacted: i64,
}

impl Compactor {
    /// Keeps `retain` of history.
    pub fn new(retain: Duration) -> Self {
        Self {
            retain,
            samples: VecDeque::new(),
            compacted: 0,
        }
    }

    /// Records `revision` seen at `now`; the revision to compact to, if one is due.
    pub fn observe(&mut self, now: Instant, revision: i64) -> Option<i64> {
        if self.retain.is_zero() {
            return None;
        }
        self.samples.push_back((now, revision));
        let mut due = None;
        while let Some(&(at, rev)) = self.samples.front() {
            if now.duration_since(at) < self.retain {
                break;
            }
            due = Some(rev);
            self.samples.pop_front();
        }
        let due = due.filter(|rev| *rev > self.compacted)?;
        self.compacted = due;
        Some(due)
    }
}

/// Runs until `stop` is cancelled; a pass under way finishes first.
pub async fn run(store: Store, settings: Settings, metrics: Arc<Metrics>, stop: CancellationToken) {
    let mut compactor = Compactor::new(settings.compaction_retention);
    let mut warned: Option<Instant> = None;
    let mut dead_indexed = false;
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        if !dead_indexed {
            match store.index_dead_letters().await {
                Ok(indexed) => {
                    dead_indexed = true;
                    if indexed > 0 {
                        tracing::info!(indexed, "dead letters stored before their index indexed");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot index the dead letters"),
            }
        }
        match store.trim_finished(&settings.retention).await {
            Ok(0) => {}
            Ok(dropped) => {
                metrics.retention_dropped.inc_by(dropped);
                tracing::info!(dropped, "finished replay records over retention dropped");
            }
            Err(e) => tracing::warn!(error = %e, "cannot apply replay retention"),
        }
        let status = match store.etcd_status().await {
            Ok(status) => status,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read etcd's status");
                continue;
            }
        };
        metrics.etcd_db_size.set(status.db_size);
        if let Some(revision) = compactor.observe(Instant::now(), status.revision) {
            match store.compact(revision).await {
                Ok(()) => {
                    metrics.etcd_compacted_revision.set(revision);
                    tracing::info!(revision, "etcd compacted");
                }
                Err(e) => tracing::warn!(error = %e, revision, "cannot compact etcd"),
            }
        }
        let near = settings.quota_bytes as f64 * NEAR_QUOTA;
        if status.db_size as f64 > near && warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
            warned = Some(Instant::now());
            let message = format!(
                "etcd's database is {} MiB, over {:.0}% of its {} MiB quota: lower the replay \
                 retention, or defragment etcd (etcdctl defrag) after compaction",
                status.db_size >> 20,
                NEAR_QUOTA * 100.0,
                settings.quota_bytes >> 20
            );
            tracing::warn!("{message}");
            let event = Event {
                reason: "EtcdNearQuota".into(),
                message,
                severity: EventSeverity::Warning as i32,
                ..Default::default()
            };
            if let Err(e) = store.record_event(event).await {
                tracing::warn!(error = %e, "cannot record an event");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn compaction_trails_the_revision_by_the_retention() {
        let mut c = Compactor::new(Duration::from_secs(300));
        assert_eq!(c.observe(Instant::now(), 100), None);
        tokio::time::advance(Duration::from_secs(200)).await;
        assert_eq!(c.observe(Instant::now(), 500), None);
        tokio::time::advance(Duration::from_secs(100)).await;
        // 300 s after revision 100 was seen: compact to it, not to anything newer.
        assert_eq!(c.observe(Instant::now(), 900), Some(100));
        assert_eq!(c.observe(Instant::now(), 901), None);
        tokio::time::advance(Duration::from_secs(300)).await;
        assert_eq!(c.observe(Instant::now(), 950), Some(901));
        let mut off = Compactor::new(Duration::ZERO);
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(off.observe(Instant::now(), 5), None);
    }
}
