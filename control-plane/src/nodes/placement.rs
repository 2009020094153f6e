//! First placement: puts each agent's replicas on live nodes, spread evenly, and keeps every
//! placement's copy of the spec current. Level-based: it reads agents, nodes and placements,
//! writes the difference, and runs again on any change or after `REQUEUE`.
//! (Resource-aware scheduling, node loss and rolling updates come with the fleet issue.)

use crate::store::watch::{watch_prefix, WatchMessage};
use crate::store::{Keys, Placement, Store, StoreError};
use berth_proto::container_digest;
use berth_proto::v1::{
    Agent, AgentSpec, Assignment, ConditionStatus, HealthState, Node, ReplicaState,
};
use prost::Message;
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

/// What placement decided.
#[derive(Debug, Default)]
pub struct Plan {
    /// Placements to write.
    pub puts: Vec<Placement>,
    /// Placements to remove.
    pub deletes: Vec<Placement>,
    /// Agents with replicas that fit nowhere, and why, node by node.
    pub unschedulable: Vec<(String, String)>,
    /// Agents whose rollout is under way (`Progressing`) or halted (`RolloutHalted`), and how.
    pub rollouts: Vec<(String, Rollout)>,
}

/// Where an agent's rolling update stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rollout {
    /// Replacing replicas one at a time.
    Progressing(String),
    /// A new replica failed; the others keep the old spec.
    Halted(String),
}

/// A replica's observed status, if it reports running `generation` and ready; or why it
/// fails at that generation.
fn observed(agent: &Agent, replica: &str, generation: i64) -> (bool, Option<String>) {
    let Some(r) = agent
        .status
        .iter()
        .flat_map(|s| &s.replicas)
        .find(|r| r.replica == replica && r.generation == generation)
    else {
        return (false, None);
    };
    let failing = r.state == ReplicaState::Failed as i32
        || r.health == HealthState::Unhealthy as i32
        || (r.state == ReplicaState::Restarting as i32 && r.restarts >= 2);
    let why = failing.then(|| {
        format!(
            "replica {replica} at generation {generation}: {}",
            if r.message.is_empty() {
                "not starting"
            } else {
                &r.message
            }
        )
    });
    (r.ready, why)
}

/// What is already on a node.
#[derive(Default)]
struct Load {
    replicas: usize,
    by_agent: HashMap<String, usize>,
    cpu_millis: u64,
    memory_bytes: u64,
}

impl Load {
    fn add(&mut self, assignment: &Assignment) {
        let spec = assignment.spec.clone().unwrap_or_default();
        let limits = spec.resources.unwrap_or_default();
        self.replicas += 1;
        *self.by_agent.entry(spec.name).or_default() += 1;
        self.cpu_millis += limits.cpu_millis as u64;
        self.memory_bytes += limits.memory_bytes;
    }
}

/// Why `spec` does not fit on `node`, if it does not: a missing label or too little free
/// CPU or memory (a node that reports no capacity is taken as unbounded).
fn misfit(spec: &AgentSpec, node: &Node, load: &Load) -> Option<String> {
    for (k, v) in &spec.node_selector {
        if node.labels.get(k) != Some(v) {
            return Some(format!("{}: label {k}={v} missing", node.name));
        }
    }
    let want = spec.resources.unwrap_or_default();
    let capacity = node.capacity.unwrap_or_default();
    let free_cpu = (capacity.cpu_millis as u64).saturating_sub(load.cpu_millis);
    if capacity.cpu_millis > 0 && want.cpu_millis as u64 > free_cpu {
        return Some(format!(
            "{}: {} CPU free, needs {}",
            node.name,
            free_cpu as f64 / 1000.0,
            want.cpu_millis as f64 / 1000.0
        ));
    }
    let free_memory = capacity.memory_bytes.saturating_sub(load.memory_bytes);
    if capacity.memory_bytes > 0 && want.memory_bytes > free_memory {
        return Some(format!(
            "{}: {} MiB free, needs {} MiB",
            node.name,
            free_memory >> 20,
            want.memory_bytes >> 20
        ));
    }
    None
}

/// What to write so that placements match agents. New replicas go to `nodes` (ready and not
/// cordoned) where their labels match and their CPU and memory limits fit, spreading each
/// agent's replicas over nodes first and the total load second. A replica whose node has no
/// record any more (`known`: every node with a record, ready or unknown) is down and moves,
/// unless pinned by a host volume.
pub fn plan(agents: &[Agent], nodes: &[Node], known: &[String], placements: &[Placement]) -> Plan {
    let mut loads: BTreeMap<&str, Load> = nodes
        .iter()
        .map(|n| (n.name.as_str(), Load::default()))
        .collect();
    let by_agent: HashMap<&str, &Agent> = agents
        .iter()
        .filter_map(|a| a.spec.as_ref().map(|s| (s.name.as_str(), a)))
        .collect();
    let mut plan = Plan::default();
    let mut placed: HashSet<(String, String)> = HashSet::new();
    // Placements already at their agent's container spec, and those still behind it.
    let mut kept: Vec<(&Agent, Placement)> = Vec::new();
    let mut outdated: Vec<(&Agent, Placement, Assignment)> = Vec::new();
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
                plan.deletes.push(p.clone());
            }
            Some(agent) if placed.insert((agent_name.clone(), p.assignment.replica.clone())) => {
                let want = assignment_for(agent, &p.assignment.replica);
                if let Some(load) = loads.get_mut(p.node.as_str()) {
                    load.add(&want);
                }
                let digest = |a: &Assignment| a.spec.as_ref().map(container_digest);
                if want == p.assignment {
                    if digest(&want) == digest(&p.assignment) {
                        kept.push((agent, p.clone()));
                    }
                } else if digest(&want) == digest(&p.assignment) {
                    // Same container (run state, replicas, health...): at once.
                    kept.push((agent, p.clone()));
                    plan.puts.push(Placement {
                        node: p.node.clone(),
                        assignment: want,
                    });
                } else {
                    outdated.push((agent, p.clone(), want));
                }
            }
            _ => plan.deletes.push(p.clone()),
        }
    }
    roll(&mut plan, &kept, outdated);
    for agent in agents {
        let Some(spec) = &agent.spec else { continue };
        for replica in replica_ids(&spec.name, spec.replicas()) {
            if placed.contains(&(spec.name.clone(), replica.clone())) {
                continue;
            }
            let mut reasons = Vec::new();
            let chosen = nodes
                .iter()
                .filter(
                    |node| match misfit(spec, node, &loads[node.name.as_str()]) {
                        Some(why) => {
                            reasons.push(why);
                            false
                        }
                        None => true,
                    },
                )
                .min_by_key(|node| {
                    let load = &loads[node.name.as_str()];
                    let mine = load.by_agent.get(&spec.name).copied().unwrap_or_default();
                    (mine, load.replicas, node.name.clone())
                });
            let Some(node) = chosen else {
                if nodes.is_empty() {
                    reasons.push("no ready node".into());
                }
                plan.unschedulable
                    .push((spec.name.clone(), reasons.join("; ")));
                break;
            };
            let assignment = assignment_for(agent, &replica);
            loads
                .get_mut(node.name.as_str())
                .expect("every node has a load")
                .add(&assignment);
            plan.puts.push(Placement {
                node: node.name.clone(),
                assignment,
            });
        }
    }
    plan
}

/// Rolling updates: a replica whose container spec changed is updated (its node replaces the
/// container) one at a time per agent, the next only once every updated replica reports
/// ready at its generation; a new replica that fails halts the rollout and the rest keep the
/// old spec. An agent with a single replica is updated at once.
fn roll(
    plan: &mut Plan,
    kept: &[(&Agent, Placement)],
    outdated: Vec<(&Agent, Placement, Assignment)>,
) {
    let mut by_agent: BTreeMap<String, Vec<(&Agent, Placement, Assignment)>> = BTreeMap::new();
    for item in outdated {
        let name = item
            .0
            .spec
            .as_ref()
            .map(|s| s.name.clone())
            .unwrap_or_default();
        by_agent.entry(name).or_default().push(item);
    }
    for (name, mut behind) in by_agent {
        behind.sort_by(|a, b| a.1.assignment.replica.cmp(&b.1.assignment.replica));
        let agent = behind[0].0;
        let replicas = agent
            .spec
            .as_ref()
            .map(|s| s.replicas())
            .unwrap_or_default();
        if replicas < 2 {
            for (_, p, want) in behind {
                plan.puts.push(Placement {
                    node: p.node,
                    assignment: want,
                });
            }
            continue;
        }
        let updated: Vec<&Placement> = kept
            .iter()
            .filter(|(a, _)| std::ptr::eq(*a, agent))
            .map(|(_, p)| p)
            .collect();
        let mut waiting = None;
        let mut halted = None;
        for p in &updated {
            let (ready, failing) = observed(agent, &p.assignment.replica, p.assignment.generation);
            if let Some(why) = failing {
                halted = Some(why);
            } else if !ready {
                waiting = Some(p.assignment.replica.clone());
            }
        }
        let total = updated.len() + behind.len();
        if let Some(why) = halted {
            plan.rollouts.push((name, Rollout::Halted(why)));
        } else if let Some(replica) = waiting {
            plan.rollouts.push((
                name,
                Rollout::Progressing(format!(
                    "waiting for {replica} to be ready ({} of {total} updated)",
                    updated.len()
                )),
            ));
        } else {
            let (_, p, want) = behind.remove(0);
            plan.rollouts.push((
                name,
                Rollout::Progressing(format!(
                    "updating {} ({} of {total} updated)",
                    p.assignment.replica,
                    updated.len()
                )),
            ));
            plan.puts.push(Placement {
                node: p.node,
                assignment: want,
            });
        }
    }
}

/// Runs placement until the task is dropped.
pub async fn run(store: Store) {
    // Changes to agents, statuses (rollouts wait on readiness), cordons and node liveness wake
    // the loop; a heartbeat that changes only `last_seen` does not. Otherwise it requeues. The
    // watches stay open across passes and are reopened only when one ends (after compaction).
    let watch = |prefix: String| watch_prefix(&store, prefix, 0);
    let mut agents = watch(store.keys().agents());
    let mut statuses = watch(store.keys().statuses());
    let mut nodes = watch(store.keys().nodes());
    let mut cordons = watch(store.keys().cordons());
    let mut liveness: HashMap<String, i32> = HashMap::new();
    let mut dirty = true;
    loop {
        if dirty {
            if let Err(e) = reconcile(&store).await {
                tracing::warn!(error = %e, "placement failed; retrying");
            }
        }
        dirty = tokio::select! {
            change = agents.recv() => {
                if change.is_none() {
                    agents = watch(store.keys().agents());
                }
                true
            }
            change = statuses.recv() => {
                if change.is_none() {
                    statuses = watch(store.keys().statuses());
                }
                true
            }
            change = cordons.recv() => {
                if change.is_none() {
                    cordons = watch(store.keys().cordons());
                }
                true
            }
            change = nodes.recv() => match change {
                Some(WatchMessage::Put(kv)) => {
                    let name = Keys::last_segment(kv.key());
                    let status = Node::decode(kv.value()).map(|n| n.status).unwrap_or_default();
                    liveness.insert(name, status) != Some(status)
                }
                Some(WatchMessage::Delete(kv)) => {
                    liveness.remove(&Keys::last_segment(kv.key()));
                    true
                }
                Some(WatchMessage::Compacted) | None => {
                    nodes = watch(store.keys().nodes());
                    true
                }
            },
            _ = tokio::time::sleep(REQUEUE) => true,
        };
    }
}

async fn reconcile(store: &Store) -> Result<(), StoreError> {
    let (agents, _) = store.list_agents().await?;
    let records = store.list_nodes().await?;
    let cordoned = store.cordoned().await?;
    let known: Vec<String> = records.iter().map(|n| n.name.clone()).collect();
    // New replicas go to ready nodes that are not cordoned.
    let ready: Vec<Node> = records
        .into_iter()
        .filter(|n| n.status == berth_proto::v1::NodeStatus::Ready as i32)
        .filter(|n| !cordoned.contains(&n.name))
        .collect();
    let (placements, _) = store.list_placements(None).await?;
    let Plan {
        puts,
        deletes,
        unschedulable,
        rollouts,
    } = plan(&agents, &ready, &known, &placements);
    for agent in &agents {
        let Some(name) = agent.spec.as_ref().map(|s| s.name.as_str()) else {
            continue;
        };
        let why = unschedulable
            .iter()
            .find(|(a, _)| a == name)
            .map(|(_, why)| why.clone());
        let rollout = rollouts.iter().find(|(a, _)| a == name).map(|(_, r)| r);
        let progressing = match rollout {
            Some(Rollout::Progressing(m)) => Some(m.clone()),
            _ => None,
        };
        let halted = match rollout {
            Some(Rollout::Halted(m)) => Some(m.clone()),
            _ => None,
        };
        let flags = [
            ("Unschedulable", "NoNodeFits", why),
            ("Progressing", "RollingUpdate", progressing),
            ("RolloutHalted", "NewReplicaFailing", halted),
        ];
        // Read-modify-write only when the status just read differs.
        let current = |kind: &str| {
            agent
                .status
                .iter()
                .flat_map(|s| &s.conditions)
                .find(|c| c.r#type == kind && c.status == ConditionStatus::True as i32)
                .map(|c| c.message.clone())
        };
        if flags.iter().any(|(kind, _, want)| current(kind) != *want) {
            super::status::set_flag(store, name, &flags).await?;
        }
    }
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
    use berth_proto::v1::{AgentMeta, Resources};

    fn node(name: &str) -> Node {
        Node {
            name: name.into(),
            ..Default::default()
        }
    }

    fn names(nodes: &[Node]) -> Vec<String> {
        nodes.iter().map(|n| n.name.clone()).collect()
    }

    fn run(
        agents: &[Agent],
        nodes: &[Node],
        known: &[String],
        placements: &[Placement],
    ) -> (Vec<Placement>, Vec<Placement>) {
        let p = plan(agents, nodes, known, placements);
        (p.puts, p.deletes)
    }

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
        let nodes = vec![node("n1"), node("n2")];
        let (puts, deletes) = run(
            &[agent("a", 3, 1), agent("b", 1, 1)],
            &nodes,
            &names(&nodes),
            &[],
        );
        assert!(deletes.is_empty());
        let on = |n: &str| puts.iter().filter(|p| p.node == n).count();
        assert_eq!((on("n1"), on("n2")), (2, 2));
    }

    #[test]
    fn scales_down_updates_in_place_and_forgets_deleted_agents() {
        let nodes = vec![node("n1")];
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
        let (puts, deletes) = run(&[agent("a", 1, 2)], &nodes, &names(&nodes), &placements);
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
        let p = plan(&[agent("a", 2, 1)], &[], &[], &[]);
        assert!(p.puts.is_empty() && p.deletes.is_empty());
        assert_eq!(
            p.unschedulable,
            [("a".to_string(), "no ready node".to_string())]
        );
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
        let alive = vec![node("n2")];
        // n1 unknown (record still there): nothing moves.
        let known = vec!["n1".to_string(), "n2".to_string()];
        let (puts, deletes) = run(&[a.clone(), b.clone()], &alive, &known, &placements);
        assert!(puts.is_empty() && deletes.is_empty());
        // n1 down (no record): a moves to n2, b stays with its data.
        let (puts, deletes) = run(&[a, b], &alive, &names(&alive), &placements);
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

    #[test]
    fn replicas_go_where_they_fit_and_say_why_when_nowhere() {
        let gib = 1u64 << 30;
        let sized = |name: &str, memory: u64, cpu: u32, labels: &[(&str, &str)]| Node {
            name: name.into(),
            capacity: Some(Resources {
                cpu_millis: cpu,
                memory_bytes: memory,
            }),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        let nodes = vec![
            sized("small", gib / 2, 4000, &[]),
            sized("big", 4 * gib, 4000, &[("gpu", "true")]),
        ];
        let mut a = agent("a", 2, 1);
        a.spec.as_mut().unwrap().resources = Some(Resources {
            cpu_millis: 500,
            memory_bytes: gib,
        });
        let p = plan(&[a.clone()], &nodes, &names(&nodes), &[]);
        assert!(
            p.puts.iter().all(|p| p.node == "big"),
            "only big has 1 GiB free"
        );
        assert_eq!(p.puts.len(), 2);
        // Five replicas: four fit on big (4 GiB), the fifth nowhere, with the reason per node.
        a.spec.as_mut().unwrap().replicas = Some(5);
        let p = plan(&[a.clone()], &nodes, &names(&nodes), &[]);
        assert_eq!(p.puts.len(), 4);
        assert_eq!(
            p.unschedulable,
            [(
                "a".to_string(),
                "small: 512 MiB free, needs 1024 MiB; big: 0 MiB free, needs 1024 MiB".to_string()
            )]
        );
        // A node selector narrows the choice.
        let mut g = agent("g", 1, 1);
        g.spec.as_mut().unwrap().node_selector = [("gpu".to_string(), "true".to_string())].into();
        let p = plan(&[g], &nodes, &names(&nodes), &[]);
        assert_eq!(p.puts[0].node, "big");
    }

    #[test]
    fn an_agents_replicas_spread_before_the_load_evens_out() {
        let nodes = vec![node("n1"), node("n2")];
        let busy: Vec<Placement> = (0..3)
            .map(|i| Placement {
                node: "n1".into(),
                assignment: assignment_for(&agent("other", 3, 1), &format!("other-{i}")),
            })
            .collect();
        let p = plan(
            &[agent("other", 3, 1), agent("a", 2, 1)],
            &nodes,
            &names(&nodes),
            &busy,
        );
        let mut on: Vec<_> = p.puts.iter().map(|p| p.node.as_str()).collect();
        on.sort();
        assert_eq!(on, ["n1", "n2"], "one per node, though n1 is busier");
    }

    #[test]
    fn a_new_image_rolls_out_one_replica_at_a_time_and_halts_on_failure() {
        use berth_proto::v1::{AgentStatus, ReplicaStatus};
        let nodes = vec![node("n1"), node("n2")];
        let old = agent("a", 2, 1);
        let placements: Vec<Placement> = ["a-0", "a-1"]
            .iter()
            .zip(["n1", "n2"])
            .map(|(r, n)| Placement {
                node: n.into(),
                assignment: assignment_for(&old, r),
            })
            .collect();
        let mut new = agent("a", 2, 2);
        new.spec.as_mut().unwrap().image = "x:2".into();
        let status = |replicas: Vec<ReplicaStatus>| AgentStatus {
            replicas,
            ..Default::default()
        };
        let replica = |id: &str, generation: i64, ready: bool, state: ReplicaState| ReplicaStatus {
            replica: id.into(),
            generation,
            ready,
            state: state as i32,
            ..Default::default()
        };
        // First pass: only a-0 is updated.
        let p = plan(&[new.clone()], &nodes, &names(&nodes), &placements);
        let updated: Vec<_> = p
            .puts
            .iter()
            .map(|p| p.assignment.replica.as_str())
            .collect();
        assert_eq!(updated, ["a-0"]);
        assert!(matches!(p.rollouts[0].1, Rollout::Progressing(_)));
        let mut placements = placements;
        placements[0] = p.puts[0].clone();
        // a-0 not ready at generation 2 yet: wait.
        new.status = Some(status(vec![
            replica("a-0", 2, false, ReplicaState::Running),
            replica("a-1", 1, true, ReplicaState::Running),
        ]));
        let p = plan(&[new.clone()], &nodes, &names(&nodes), &placements);
        assert!(p.puts.is_empty());
        // a-0 ready: a-1 goes next.
        new.status = Some(status(vec![
            replica("a-0", 2, true, ReplicaState::Running),
            replica("a-1", 1, true, ReplicaState::Running),
        ]));
        let p = plan(&[new.clone()], &nodes, &names(&nodes), &placements);
        let updated: Vec<_> = p
            .puts
            .iter()
            .map(|p| p.assignment.replica.as_str())
            .collect();
        assert_eq!(updated, ["a-1"]);
        // a-0 failing at generation 2: halt, a-1 keeps the old image.
        new.status = Some(status(vec![
            replica("a-0", 2, false, ReplicaState::Failed),
            replica("a-1", 1, true, ReplicaState::Running),
        ]));
        let p = plan(&[new], &nodes, &names(&nodes), &placements);
        assert!(p.puts.is_empty());
        assert!(matches!(&p.rollouts[0].1, Rollout::Halted(why) if why.contains("a-0")));
    }
}
