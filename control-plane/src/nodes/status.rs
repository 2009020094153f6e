//! Observed status from node reports: per-replica entries, ready count and conditions.

use berth_proto::time::now;
use berth_proto::v1::{
    AgentStatus, Condition, ConditionStatus, Event, EventSeverity, HealthState, ReplicaReport,
    ReplicaState,
};
use berth_store::{Store, StoreError};

/// Restarts after which a restarting replica counts as crash-looping.
pub const CRASH_LOOP_RESTARTS: u32 = 3;

/// Folds one replica report into its agent's status, and records a restart as an event.
pub async fn apply_report(store: &Store, node: &str, report: &ReplicaReport) {
    let Some(mut replica) = report.status.clone() else {
        return;
    };
    replica.node = node.to_string();
    let mut restarted = None;
    // A node back from a partition reports replicas that were moved away while it was down:
    // the replica's status is the new node's business, so only a replica placed on this node
    // is written.
    let id = replica.replica.clone();
    let result = store
        .update_replica_status(&report.agent, node, &id, |status| {
            let previous = status
                .replicas
                .iter()
                .position(|r| r.replica == replica.replica);
            let before = previous.map(|i| status.replicas[i].clone());
            if before.as_ref() == Some(&replica) {
                return false;
            }
            if before
                .as_ref()
                .is_some_and(|b| replica.restarts > b.restarts)
            {
                restarted = Some(replica.clone());
            }
            match previous {
                Some(i) => status.replicas[i] = replica.clone(),
                None => status.replicas.push(replica.clone()),
            }
            status.replicas.sort_by(|a, b| a.replica.cmp(&b.replica));
            refresh(status);
            true
        })
        .await;
    if let Err(e) = result {
        tracing::warn!(agent = %report.agent, node, error = %e, "cannot write status");
        return;
    }
    if let Some(r) = restarted {
        let exit = r
            .last_exit_code
            .map(|c| format!(" (exit code {c})"))
            .unwrap_or_default();
        let (reason, cause) = if r.oom_killed {
            ("ReplicaOOMKilled", " after running out of memory")
        } else {
            ("ReplicaRestarted", "")
        };
        let event = Event {
            agent: report.agent.clone(),
            replica: r.replica.clone(),
            node: node.to_string(),
            reason: reason.into(),
            message: format!(
                "replica {} restarted{cause}{exit}: restart {}",
                r.replica, r.restarts
            ),
            severity: EventSeverity::Warning as i32,
            ..Default::default()
        };
        if let Err(e) = store.record_event(event).await {
            tracing::warn!(agent = %report.agent, error = %e, "cannot record event");
        }
    }
}

/// Removes a replica's entry (its placement is gone), keeping the summary true.
pub async fn forget_replica(store: &Store, agent: &str, replica: &str) -> Result<(), StoreError> {
    store
        .update_status(agent, |status| {
            let before = status.replicas.len();
            status.replicas.retain(|r| r.replica != replica);
            let changed = status.replicas.len() != before;
            if changed {
                refresh(status);
            }
            changed
        })
        .await
}

/// Recomputes the ready count, observed generation and conditions from the replica entries.
fn refresh(status: &mut AgentStatus) {
    status.ready_replicas = status.replicas.iter().filter(|r| r.ready).count() as u32;
    status.observed_generation = status
        .replicas
        .iter()
        .map(|r| r.generation)
        .min()
        .unwrap_or_default();
    let find = |pred: &dyn Fn(&berth_proto::v1::ReplicaStatus) -> bool| {
        status
            .replicas
            .iter()
            .find(|r| pred(r))
            .map(|r| format!("{}: {}", r.replica, r.message))
    };
    let image_missing =
        find(&|r| r.state == ReplicaState::Failed as i32 && r.message.contains("image"));
    let crash_loop =
        find(&|r| r.state == ReplicaState::Restarting as i32 && r.restarts >= CRASH_LOOP_RESTARTS);
    let unhealthy = find(&|r| r.health == HealthState::Unhealthy as i32);
    let available = status.ready_replicas > 0;
    set_condition(
        status,
        "Available",
        available,
        if available {
            "ReplicasReady"
        } else {
            "NoReadyReplica"
        },
        format!("{} replica(s) ready", status.ready_replicas),
    );
    set_condition(
        status,
        "ImageMissing",
        image_missing.is_some(),
        "ImageNotFound",
        image_missing.unwrap_or_default(),
    );
    set_condition(
        status,
        "CrashLoop",
        crash_loop.is_some(),
        "RestartingRepeatedly",
        crash_loop.unwrap_or_default(),
    );
    set_condition(
        status,
        "Unhealthy",
        unhealthy.is_some(),
        "HealthCheckFailing",
        unhealthy.unwrap_or_default(),
    );
    // Problem conditions are listed only while they hold.
    status
        .conditions
        .retain(|c| c.r#type == "Available" || c.status == ConditionStatus::True as i32);
}

/// Sets (message `Some`) or clears (`None`) conditions the scheduler owns — `Unschedulable`,
/// `Progressing`, `RolloutHalted` — given as (type, reason, message). Writes only on change.
pub async fn set_flag(
    store: &Store,
    agent: &str,
    flags: &[(&str, &str, Option<String>)],
) -> Result<(), berth_store::StoreError> {
    store
        .update_status(agent, |status| {
            let mut changed = false;
            for (kind, reason, message) in flags {
                let current = status
                    .conditions
                    .iter()
                    .find(|c| c.r#type == *kind && c.status == ConditionStatus::True as i32)
                    .map(|c| c.message.clone());
                if current == *message {
                    continue;
                }
                changed = true;
                match message {
                    Some(message) => set_condition(status, kind, true, reason, message.clone()),
                    None => status.conditions.retain(|c| c.r#type != *kind),
                }
            }
            changed
        })
        .await
}

fn set_condition(status: &mut AgentStatus, kind: &str, holds: bool, reason: &str, message: String) {
    let value = if holds {
        ConditionStatus::True
    } else {
        ConditionStatus::False
    } as i32;
    match status.conditions.iter_mut().find(|c| c.r#type == kind) {
        Some(c) => {
            if c.status != value {
                c.last_transition_time = Some(now());
            }
            c.status = value;
            c.reason = reason.into();
            c.message = message;
        }
        None => status.conditions.push(Condition {
            r#type: kind.into(),
            status: value,
            reason: reason.into(),
            message,
            last_transition_time: Some(now()),
        }),
    }
}
