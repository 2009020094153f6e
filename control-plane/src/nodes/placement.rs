//! First placement: puts each agent's replicas on live nodes, spread evenly, and keeps every
//! placement's copy of the spec current. Level-based: it reads agents, nodes and placements,
//! writes the difference, and runs again on any change or after `REQUEUE`.
//! (Resource-aware scheduling, node loss and rolling updates come with the fleet issue.)

use crate::store::watch::watch_prefix;
use crate::store::{Placement, Store, StoreError};
use berth_proto::v1::{Agent, Assignment};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

/// Time between reconciles when nothing changes.
pub const REQUEUE: Duration = Duration::from_secs(5);

/// The replica ids an agent with `replicas` replicas has.
pub fn replica_ids(agent: &str, replicas: u32) -> Vec<String> {
    (0..replicas).map(|i| format!("{agent}-{i}")).collect()
}

/// The assignment `agent`'s replica `replica` should carry.
pub fn assignment_for(agent: &Agent, replica: &str) -> Assignment {
    let meta = agent.meta.clone().unwrap_or_default();
    Assignment {
        replica: replica.to_string(),
        spec: agent.spec.clone(),
        generation: meta.generation,
        desired_state: meta.desired_state,
        restart_time: meta.restart_time,
    }
}

/// Whether an agent's replicas must stay on their node (they use host volumes, whose data
/// lives there).
fn pinned(agent: &Agent) -> bool {
    agent
        .spec
        .as_ref()
        .is_some_and(|s| s.volumes.iter().any(|v| v.source.starts_with('/')))
}

/// What to write so that placements match agents: (puts, deletes). New replicas go to
/// `nodes` (ready ones); a replica whose node has no record any more (`known`: every node
/// with a record, ready or unknown) is down and moves, unless pinned by a host volume.
pub fn plan(
    agents: &[Agent],
    nodes: &[String],
    known: &[String],
    placements: &[Placement],
) -> (Vec<Placement>, Vec<Placement>) {
    let mut load: BTreeMap<&str, usize> = nodes.iter().map(|n| (n.as_str(), 0)).collect();
    for p in placements {
        if let Some(count) = load.get_mut(p.node.as_str()) {
            *count += 1;
        }
    }
    let by_agent: HashMap<&str, &Agent> = agents
        .iter()
        .filter_map(|a| a.spec.as_ref().map(|s| (s.name.as_str(), a)))
        .collect();
    let mut puts = Vec::new();
    let mut deletes = Vec::new();
    let mut placed: HashSet<(String, String)> = HashSet::new();
    for p in placements {
        let agent_name = p
            .assignment
            .spec
            .as_ref()
            .map(|s| s.name.clone())
            .unwrap_or_default();
        let wanted = by_agent.get(agent_name.as_str()).and_then(|agent| {
            let replicas = agent
                .spec
                .as_ref()
                .map(|s| s.replicas())
                .unwrap_or_default();
            replica_ids(&agent_name, replicas)
                .contains(&p.assignment.replica)
                .then_some(*agent)
        });
        let down = !known.contains(&p.node);
        match wanted {
            Some(agent) if down && !pinned(agent) => {
                tracing::warn!(node = %p.node, replica = %p.assignment.replica, "node down: moving its replica");
                deletes.push(p.clone());
            }
            Some(agent) if placed.insert((agent_name.clone(), p.assignment.replica.clone())) => {
                let want = assignment_for(agent, &p.assignment.replica);
                if want != p.assignment {
                    puts.push(Placement {
                        node: p.node.clone(),
                        assignment: want,
                    });
                }
            }
            _ => {
                if let Some(count) = load.get_mut(p.node.as_str()) {
                    *count = count.saturating_sub(1);
                }
                deletes.push(p.clone());
            }
        }
    }
    for agent in agents {
        let Some(spec) = &agent.spec else { continue };
        for replica in replica_ids(&spec.name, spec.replicas()) {
            if placed.contains(&(spec.name.clone(), replica.clone())) {
                continue;
            }
            // Spread: the live node with the fewest placements, ties by name.
            let Some((&node, count)) = load.iter_mut().min_by_key(|(name, count)| (**count, *name))
            else {
                break;
            };
            *count += 1;
            puts.push(Placement {
                node: node.to_string(),
                assignment: assignment_for(agent, &replica),
            });
        }
    }
    (puts, deletes)
}

/// Runs placement until the task is dropped.
pub async fn run(store: Store) {
    // Any change to agents or nodes wakes the loop; otherwise it requeues. The watches stay
    // open across passes and are reopened only when one ends (after compaction).
    let mut agents = watch_prefix(&store, store.keys().agents(), 0);
    let mut nodes = watch_prefix(&store, store.keys().nodes(), 0);
    let mut cordons = watch_prefix(&store, store.keys().cordons(), 0);
    loop {
        if let Err(e) = reconcile(&store).await {
            tracing::warn!(error = %e, "placement failed; retrying");
        }
        tokio::select! {
            change = agents.recv() => if change.is_none() {
                agents = watch_prefix(&store, store.keys().agents(), 0);
            },
            change = nodes.recv() => if change.is_none() {
                nodes = watch_prefix(&store, store.keys().nodes(), 0);
            },
            change = cordons.recv() => if change.is_none() {
                cordons = watch_prefix(&store, store.keys().cordons(), 0);
            },
            _ = tokio::time::sleep(REQUEUE) => {}
        }
    }
}

async fn reconcile(store: &Store) -> Result<(), StoreError> {
    let (agents, _) = store.list_agents().await?;
    let records = store.list_nodes().await?;
    let cordoned = store.cordoned().await?;
    let known: Vec<String> = records.iter().map(|n| n.name.clone()).collect();
    // New replicas go to ready nodes that are not cordoned.
    let ready: Vec<String> = records
        .into_iter()
        .filter(|n| n.status == berth_proto::v1::NodeStatus::Ready as i32)
        .map(|n| n.name)
        .filter(|n| !cordoned.contains(n))
        .collect();
    let (placements, _) = store.list_placements(None).await?;
    let (puts, deletes) = plan(&agents, &ready, &known, &placements);
    for p in &deletes {
        let agent = p
            .assignment
            .spec
            .as_ref()
            .map(|s| s.name.as_str())
            .unwrap_or_default();
        store
            .delete_placement(&p.node, agent, &p.assignment.replica)
            .await?;
        let replica = p.assignment.replica.clone();
        store
            .update_status(agent, |status| {
                let before = status.replicas.len();
                status.replicas.retain(|r| r.replica != replica);
                status.replicas.len() != before
            })
            .await?;
    }
    for p in &puts {
        store.put_placement(p).await?;
    }
    if !puts.is_empty() || !deletes.is_empty() {
        tracing::info!(
            puts = puts.len(),
            deletes = deletes.len(),
            "placements updated"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_proto::v1::{AgentMeta, AgentSpec};

    fn agent(name: &str, replicas: u32, generation: i64) -> Agent {
        Agent {
            spec: Some(AgentSpec {
                name: name.into(),
                replicas: Some(replicas),
                ..Default::default()
            }),
            meta: Some(AgentMeta {
                generation,
                ..Default::default()
            }),
            status: None,
        }
    }

    #[test]
    fn spreads_new_replicas_evenly() {
        let nodes = vec!["n1".to_string(), "n2".to_string()];
        let (puts, deletes) = plan(&[agent("a", 3, 1), agent("b", 1, 1)], &nodes, &nodes, &[]);
        assert!(deletes.is_empty());
        let on = |n: &str| puts.iter().filter(|p| p.node == n).count();
        assert_eq!((on("n1"), on("n2")), (2, 2));
    }

    #[test]
    fn scales_down_updates_in_place_and_forgets_deleted_agents() {
        let nodes = vec!["n1".to_string()];
        let old = agent("a", 2, 1);
        let placements: Vec<_> = replica_ids("a", 2)
            .iter()
            .map(|r| Placement {
                node: "n1".into(),
                assignment: assignment_for(&old, r),
            })
            .chain([Placement {
                node: "n1".into(),
                assignment: assignment_for(&agent("gone", 1, 1), "gone-0"),
            }])
            .collect();
        let (puts, deletes) = plan(&[agent("a", 1, 2)], &nodes, &nodes, &placements);
        let deleted: Vec<_> = deletes
            .iter()
            .map(|p| p.assignment.replica.as_str())
            .collect();
        assert_eq!(deleted, ["a-1", "gone-0"]);
        assert_eq!(puts.len(), 1);
        assert_eq!(
            (
                puts[0].assignment.replica.as_str(),
                puts[0].assignment.generation
            ),
            ("a-0", 2)
        );
    }

    #[test]
    fn without_nodes_nothing_is_placed() {
        let (puts, deletes) = plan(&[agent("a", 2, 1)], &[], &[], &[]);
        assert!(puts.is_empty() && deletes.is_empty());
    }

    #[test]
    fn replicas_of_a_down_node_move_unless_pinned_by_a_host_volume() {
        let a = agent("a", 1, 1);
        let mut b = agent("b", 1, 1);
        b.spec.as_mut().unwrap().volumes = vec![berth_proto::v1::VolumeMount {
            source: "/var/lib/berth/volumes/b".into(),
            target: "/data".into(),
            read_only: false,
        }];
        let on_n1 = |x: &Agent, r: &str| Placement {
            node: "n1".into(),
            assignment: assignment_for(x, r),
        };
        let placements = vec![on_n1(&a, "a-0"), on_n1(&b, "b-0")];
        let alive = vec!["n2".to_string()];
        // n1 unknown (record still there): nothing moves.
        let known = vec!["n1".to_string(), "n2".to_string()];
        let (puts, deletes) = plan(&[a.clone(), b.clone()], &alive, &known, &placements);
        assert!(puts.is_empty() && deletes.is_empty());
        // n1 down (no record): a moves to n2, b stays with its data.
        let (puts, deletes) = plan(&[a, b], &alive, &alive, &placements);
        let moved: Vec<_> = deletes
            .iter()
            .map(|p| p.assignment.replica.as_str())
            .collect();
        assert_eq!(moved, ["a-0"]);
        assert_eq!(puts.len(), 1);
        assert_eq!(
            (puts[0].node.as_str(), puts[0].assignment.replica.as_str()),
            ("n2", "a-0")
        );
    }
}
