//! The latest status of each replica, shared between the supervisor (which writes it) and
//! the session (which sends what changed, and everything in its hello after a reconnect).

use berth_proto::v1::ReplicaReport;
use std::collections::HashMap;
use std::sync::Mutex;
use tokio::sync::Notify;

/// The last sequence number given out, and each replica's report with the number of its change.
type Latest = (u64, HashMap<String, (u64, ReplicaReport)>);

/// Latest report per replica, each with the sequence number of its last change.
#[derive(Default)]
pub struct Reports {
    inner: Mutex<Latest>,
    /// Woken on every change.
    pub changed: Notify,
}

impl Reports {
    /// Records `report` if it differs from the last one of its replica.
    pub fn set(&self, report: ReplicaReport) {
        let replica = report
            .status
            .as_ref()
            .map(|s| s.replica.clone())
            .unwrap_or_default();
        let mut inner = self.inner.lock().expect("not poisoned");
        if inner
            .1
            .get(&replica)
            .is_some_and(|(_, last)| *last == report)
        {
            return;
        }
        inner.0 += 1;
        let seq = inner.0;
        inner.1.insert(replica, (seq, report));
        drop(inner);
        self.changed.notify_one();
    }

    /// Forgets a replica.
    pub fn remove(&self, replica: &str) {
        self.inner.lock().expect("not poisoned").1.remove(replica);
    }

    /// Reports changed after `since`, and the sequence number to pass next time.
    pub fn since(&self, since: u64) -> (Vec<ReplicaReport>, u64) {
        let inner = self.inner.lock().expect("not poisoned");
        let reports = inner
            .1
            .values()
            .filter(|(seq, _)| *seq > since)
            .map(|(_, r)| r.clone())
            .collect();
        (reports, inner.0)
    }
}
