//! The scheduler: puts each agent's replicas on schedulable nodes where they fit, spread
//! evenly; moves replicas off down nodes; replaces out-of-date replicas and those on draining
//! nodes with surge 1 and unavailable 0; keeps every placement's copy of the spec current.
//! Level-based: it reads agents, nodes and placements, writes the difference, and runs again
//! on any change or after `REQUEUE`. Only the elected leader runs it.

use berth_proto::container_digest;
use berth_proto::v1::{
    Agent, AgentSpec, Assignment, ConditionStatus, HealthState, Node, ReplicaState,
};
use berth_store::watch::{list_watch, Change};
use berth_store::{Keys, Placement, Store, StoreError};
use prost::Message;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The longest one placement pass may take before it is abandoned and run again.
pub const PASS_TIMEOUT: Duration = Duration::from_secs(30);

/// Time between reconciles when nothing changes.
pub const REQUEUE: Duration = Duration::from_secs(5);

/// How long a term leaves the replicas of nodes without a record where they are. etcd standing
/// still past the node lease ends every node's lease at once, and the leader's term with them;
/// each node's session takes a new lease at its next heartbeat (2 s), and a leader that has
/// just started cannot tell those nodes from nodes that are gone. A node still without a record
/// after this has its replicas moved as usual.
pub const DOWN_GRACE: Duration = super::NODE_LEASE_TTL;

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
pub fn pinned(spec: &AgentSpec) -> bool {
    spec.volumes.iter().any(|v| v.source.starts_with('/'))
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

/// Whether an agent should be serving (neither stopped nor paused): only then can a new
/// replica become ready beside an old one.
fn serving(agent: &Agent) -> bool {
    use berth_proto::v1::DesiredState;
    agent.meta.as_ref().is_none_or(|m| {
        m.desired_state != DesiredState::Stopped as i32
            && m.desired_state != DesiredState::Paused as i32
    })
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

/// The nodes placement works with.
#[derive(Debug, Default)]
pub struct Fleet<'a> {
    /// Where new replicas may go: ready and not cordoned.
    pub schedulable: &'a [Node],
    /// Every node with a record (ready or unknown). A placement on any other node is down.
    pub known: HashSet<String>,
    /// Nodes being drained: their replicas are replaced elsewhere.
    pub draining: HashSet<String>,
}

/// What to write so that placements match agents. New replicas go to schedulable nodes
/// where their labels match and their CPU and memory limits fit, spreading each agent's
/// replicas over nodes first and the total load second. A replica on a down node moves at
/// once, unless pinned by a host volume. A replica whose container spec is out of date, or
/// whose node is being drained, is replaced with surge 1 and unavailable 0: one new replica
/// beside the old ones, and an old one stops only once the new one is ready (agents pinned
/// by host volumes are updated in place instead, one at a time).
pub fn plan(agents: &[Agent], fleet: &Fleet, placements: &[Placement]) -> Plan {
    let mut loads: BTreeMap<&str, Load> = fleet
        .schedulable
        .iter()
        .map(|n| (n.name.as_str(), Load::default()))
        .collect();
    let mut plan = Plan::default();
    let mut by_agent: BTreeMap<&str, Vec<&Placement>> = BTreeMap::new();
    for p in placements {
        let name = p.assignment.spec.as_ref().map_or("", |s| s.name.as_str());
        by_agent.entry(name).or_default().push(p);
    }
    // Count what stays where before placing anything new.
    let agents: BTreeMap<&str, &Agent> = agents
        .iter()
        .filter_map(|a| a.spec.as_ref().map(|s| (s.name.as_str(), a)))
        .collect();
    for (name, mine) in &mut by_agent {
        if !agents.contains_key(name) {
            plan.deletes.extend(mine.drain(..).cloned());
            continue;
        }
        let mut seen = HashSet::new();
        for p in std::mem::take(mine) {
            let down =
                !fleet.known.contains(&p.node) && !agents[name].spec.as_ref().is_some_and(pinned);
            if down {
                tracing::warn!(node = %p.node, replica = %p.assignment.replica, "node down: moving its replica");
            }
            if down || !seen.insert(p.assignment.replica.as_str()) {
                plan.deletes.push(p.clone());
            } else {
                if let Some(load) = loads.get_mut(p.node.as_str()) {
                    load.add(&p.assignment);
                }
                mine.push(p);
            }
        }
    }
    for (name, agent) in agents {
        let mine = by_agent.remove(name).unwrap_or_default();
        Reconcile {
            agent,
            fleet,
            mine,
            loads: &mut loads,
            plan: &mut plan,
        }
        .run();
    }
    plan
}

/// Placement of one agent's replicas.
struct Reconcile<'r, 'f, 'p> {
    agent: &'r Agent,
    fleet: &'r Fleet<'f>,
    /// The agent's live placements (none on a down node, no replica twice).
    mine: Vec<&'p Placement>,
    loads: &'r mut BTreeMap<&'f str, Load>,
    plan: &'r mut Plan,
}

impl Reconcile<'_, '_, '_> {
    fn name(&self) -> &str {
        self.agent.spec.as_ref().map_or("", |s| s.name.as_str())
    }

    fn run(mut self) {
        let spec = self.agent.spec.clone().unwrap_or_default();
        let wanted = spec.replicas() as usize;
        let digest = container_digest(&spec);
        let running = serving(self.agent);
        let in_place = self.agent.spec.as_ref().is_some_and(pinned) || !running;
        // Current: at the agent's container spec, on a node that stays. Retiring: the rest.
        let mut current: Vec<&Placement> = Vec::new();
        let mut retiring: Vec<&Placement> = Vec::new();
        let mut outdated: Vec<(&Placement, Assignment)> = Vec::new();
        let mut refreshed: Vec<Placement> = Vec::new();
        for p in std::mem::take(&mut self.mine) {
            let want = assignment_for(self.agent, &p.assignment.replica);
            let same_container =
                p.assignment.spec.as_ref().map(container_digest) == Some(digest.clone());
            if same_container && want != p.assignment {
                // Same container (run state, replicas, health...): updated at once.
                refreshed.push(Placement {
                    node: p.node.clone(),
                    assignment: want.clone(),
                });
            }
            let drained = self.fleet.draining.contains(&p.node)
                && !self.agent.spec.as_ref().is_some_and(pinned);
            if !same_container && in_place {
                outdated.push((p, want));
                current.push(p);
            } else if same_container && !drained {
                current.push(p);
            } else {
                retiring.push(p);
            }
            self.mine.push(p);
        }
        if !outdated.is_empty() {
            self.roll_in_place(&current, outdated, wanted);
        }
        // Scale down: ready replicas and low ids stay; the surplus and every old one go.
        let generation = self.agent.meta.as_ref().map_or(0, |m| m.generation);
        let ready =
            |p: &Placement| observed(self.agent, &p.assignment.replica, p.assignment.generation).0;
        if current.len() > wanted {
            current.sort_by_key(|p| (!ready(p), replica_index(&p.assignment.replica)));
            let surplus = current.split_off(wanted);
            self.plan.deletes.extend(surplus.into_iter().cloned());
            self.plan.deletes.extend(retiring.drain(..).cloned());
        }
        // Retire old replicas while the count stays above `wanted` and the ready ones (new
        // and old) stay at `wanted` or more: unavailable 0. Not-ready old ones go first.
        retiring.sort_by_key(|p| (ready(p), p.assignment.replica.clone()));
        let new_ready = current.iter().filter(|p| ready(p)).count();
        let mut old_ready = retiring.iter().filter(|p| ready(p)).count();
        while let Some(p) = retiring.first() {
            let surplus = current.len() + retiring.len() > wanted;
            let is_ready = ready(p);
            if !surplus || (is_ready && new_ready + old_ready <= wanted) {
                break;
            }
            old_ready -= usize::from(is_ready);
            self.plan.deletes.push((*p).clone());
            retiring.remove(0);
        }
        // What stays gets its refreshed assignment.
        refreshed.retain(|r| {
            !self
                .plan
                .deletes
                .iter()
                .any(|d| d.node == r.node && d.assignment.replica == r.assignment.replica)
        });
        self.plan.puts.extend(refreshed);
        // A new replica at this generation that fails halts the replacement.
        let halted = current
            .iter()
            .find_map(|p| observed(self.agent, &p.assignment.replica, generation).1);
        // Fill up to `wanted`, plus one surge replica while old ones remain.
        let count = current.len() + retiring.len();
        let mut new = wanted.saturating_sub(count);
        if !retiring.is_empty() && count == wanted && halted.is_none() {
            new = 1;
        }
        let placed = self.place(new, &spec);
        let name = self.name().to_string();
        if let Some(why) = halted {
            if !retiring.is_empty() {
                self.plan.rollouts.push((name, Rollout::Halted(why)));
            }
        } else if !retiring.is_empty() {
            let waiting: Vec<&str> = current
                .iter()
                .filter(|p| !ready(p))
                .map(|p| p.assignment.replica.as_str())
                .chain(placed.iter().map(String::as_str))
                .collect();
            let mut message = format!(
                "{} of {wanted} replicas up to date and ready, {} old left",
                new_ready,
                retiring.len()
            );
            if !waiting.is_empty() {
                message.push_str(&format!("; waiting for {}", waiting.join(", ")));
            }
            self.plan
                .rollouts
                .push((name, Rollout::Progressing(message)));
        }
    }

    /// Places `count` new replicas of the agent, each on the best node that fits, under the
    /// lowest free replica ids; the ids placed. What fits nowhere is noted as unschedulable.
    fn place(&mut self, count: usize, spec: &AgentSpec) -> Vec<String> {
        let mut placed = Vec::new();
        let mut taken: HashSet<String> = self
            .mine
            .iter()
            .map(|p| p.assignment.replica.clone())
            .collect();
        let mut next = 0;
        for _ in 0..count {
            let mut reasons = Vec::new();
            let chosen = self
                .fleet
                .schedulable
                .iter()
                .filter(
                    |node| match misfit(spec, node, &self.loads[node.name.as_str()]) {
                        Some(why) => {
                            reasons.push(why);
                            false
                        }
                        None => true,
                    },
                )
                .min_by_key(|node| {
                    let load = &self.loads[node.name.as_str()];
                    let mine = load.by_agent.get(&spec.name).copied().unwrap_or_default();
                    (mine, load.replicas, node.name.as_str())
                });
            let Some(node) = chosen else {
                if self.fleet.schedulable.is_empty() {
                    reasons.push("no ready node".into());
                }
                self.plan
                    .unschedulable
                    .push((spec.name.clone(), reasons.join("; ")));
                break;
            };
            let replica = loop {
                let id = format!("{}-{next}", spec.name);
                next += 1;
                if taken.insert(id.clone()) {
                    break id;
                }
            };
            let assignment = assignment_for(self.agent, &replica);
            self.loads
                .get_mut(node.name.as_str())
                .expect("every schedulable node has a load")
                .add(&assignment);
            self.plan.puts.push(Placement {
                node: node.name.clone(),
                assignment,
            });
            placed.push(replica);
        }
        placed
    }

    /// Updates, in place, the replicas of an agent that cannot surge (pinned by a host
    /// volume, or not running): a running agent with 2 or more replicas one at a time, the
    /// next once every updated one is ready at its generation (a failing one halts it); any
    /// other at once.
    fn roll_in_place(
        &mut self,
        current: &[&Placement],
        mut behind: Vec<(&Placement, Assignment)>,
        wanted: usize,
    ) {
        let name = self.name().to_string();
        let running = serving(self.agent);
        if wanted < 2 || !running {
            for (p, want) in behind {
                self.plan.puts.push(Placement {
                    node: p.node.clone(),
                    assignment: want,
                });
            }
            return;
        }
        behind.sort_by(|a, b| a.0.assignment.replica.cmp(&b.0.assignment.replica));
        let updated: Vec<&&Placement> = current
            .iter()
            .filter(|p| !behind.iter().any(|(b, _)| std::ptr::eq(*b, **p)))
            .collect();
        let mut waiting = None;
        let mut halted = None;
        for p in &updated {
            let (ready, failing) =
                observed(self.agent, &p.assignment.replica, p.assignment.generation);
            if let Some(why) = failing {
                halted = Some(why);
            } else if !ready {
                waiting = Some(p.assignment.replica.clone());
            }
        }
        let total = updated.len() + behind.len();
        if let Some(why) = halted {
            self.plan.rollouts.push((name, Rollout::Halted(why)));
        } else if let Some(replica) = waiting {
            self.plan.rollouts.push((
                name,
                Rollout::Progressing(format!(
                    "waiting for {replica} to be ready ({} of {total} updated)",
                    updated.len()
                )),
            ));
        } else {
            let (p, want) = behind.remove(0);
            self.plan.rollouts.push((
                name,
                Rollout::Progressing(format!(
                    "updating {} ({} of {total} updated)",
                    p.assignment.replica,
                    updated.len()
                )),
            ));
            self.plan.puts.push(Placement {
                node: p.node.clone(),
                assignment: want,
            });
        }
    }
}

/// The number at the end of a replica id (`a-12` → 12).
fn replica_index(replica: &str) -> u64 {
    replica
        .rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_default()
}

/// Runs placement until `stop` is cancelled; a pass under way finishes first.
pub async fn run(store: Store, stop: CancellationToken) {
    let term = tokio::time::Instant::now();
    // Changes to agents, statuses (rollouts wait on readiness), cordons and node liveness wake
    // the loop; a heartbeat that changes only `last_seen` does not. Otherwise it requeues.
    let watch = |prefix: String| list_watch(&store, prefix);
    let mut agents = watch(store.keys().agents());
    let mut statuses = watch(store.keys().statuses());
    let mut nodes = watch(store.keys().nodes());
    let mut cordons = watch(store.keys().cordons());
    let mut liveness: HashMap<String, i32> = HashMap::new();
    let mut dirty = true;
    // A pass every REQUEUE whatever else happens (heartbeats wake the loop without making it
    // dirty, so a timer restarted on each wake would never fire).
    let mut resync = tokio::time::interval(REQUEUE);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if dirty {
            // Bounded: a pass stuck on etcd must not stop placement for good.
            let hold_moves = term.elapsed() < DOWN_GRACE;
            match tokio::time::timeout(PASS_TIMEOUT, reconcile(&store, hold_moves)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "placement failed; retrying"),
                Err(_) => tracing::warn!("placement pass took over {PASS_TIMEOUT:?}; retrying"),
            }
        }
        dirty = tokio::select! {
            _ = stop.cancelled() => return,
            _ = agents.next() => true,
            _ = statuses.next() => true,
            _ = cordons.next() => true,
            change = nodes.next() => node_changed(&mut liveness, change),
            _ = resync.tick() => true,
        };
        // One pass covers every change already queued (a burst of reports after a big
        // placement, say), rather than one pass per change.
        for queue in [&mut agents, &mut statuses, &mut cordons] {
            while queue.try_next().is_some() {
                dirty = true;
            }
        }
        while let Some(change) = nodes.try_next() {
            dirty |= node_changed(&mut liveness, change);
        }
    }
}

/// The nodes placement takes as alive: those with a record, and with `hold_moves` also every
/// node a placement names (see [`DOWN_GRACE`]).
fn known_nodes(records: &[Node], placements: &[Placement], hold_moves: bool) -> HashSet<String> {
    let mut known: HashSet<String> = records.iter().map(|n| n.name.clone()).collect();
    if hold_moves {
        known.extend(placements.iter().map(|p| p.node.clone()));
    }
    known
}

/// Whether a change under the nodes prefix changes a node's liveness (a heartbeat that only
/// moves `last_seen` does not), keeping `liveness` current.
fn node_changed(liveness: &mut HashMap<String, i32>, change: Change) -> bool {
    match change {
        Change::Put(kv) | Change::InitApply(kv) => {
            let name = Keys::last_segment(kv.key());
            let status = Node::decode(kv.value())
                .map(|n| n.status)
                .unwrap_or_default();
            liveness.insert(name, status) != Some(status)
        }
        Change::Delete(kv) => {
            liveness.remove(&Keys::last_segment(kv.key()));
            true
        }
        Change::Init | Change::InitDone { .. } => true,
    }
}

/// One pass; with `hold_moves`, no replica moves off a node for want of its record.
async fn reconcile(store: &Store, hold_moves: bool) -> Result<(), StoreError> {
    let (mut agents, _) = store.list_agents().await?;
    // Assignments carry the secret values (their nodes give them to the containers, and a
    // changed secret changes the container digest); the agents' specs only say `<redacted>`.
    let any_secret = agents
        .iter()
        .any(|a| a.spec.as_ref().is_some_and(|s| !s.secret_env.is_empty()));
    let mut secrets = match any_secret {
        true => store.all_agent_secrets().await?,
        false => Default::default(),
    };
    for spec in agents.iter_mut().filter_map(|a| a.spec.as_mut()) {
        if let Some(stored) = secrets.remove(&spec.name) {
            for (key, value) in stored.env {
                if let Some(slot) = spec.secret_env.get_mut(&key) {
                    *slot = value;
                }
            }
        }
    }
    let records = store.list_nodes().await?;
    let cordoned = store.cordoned().await?;
    let (placements, _) = store.list_placements(None).await?;
    let known = known_nodes(&records, &placements, hold_moves);
    // New replicas go to ready nodes that are not cordoned.
    let schedulable: Vec<Node> = records
        .into_iter()
        .filter(|n| n.status == berth_proto::v1::NodeStatus::Ready as i32)
        .filter(|n| !cordoned.contains_key(&n.name))
        .collect();
    let fleet = Fleet {
        schedulable: &schedulable,
        known,
        draining: cordoned
            .into_iter()
            .filter_map(|(name, draining)| draining.then_some(name))
            .collect(),
    };
    let Plan {
        puts,
        deletes,
        unschedulable,
        rollouts,
    } = plan(&agents, &fleet, &placements);
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
        super::status::forget_replica(store, agent, &p.assignment.replica).await?;
    }
    store.put_placements(&puts).await?;
    tracing::debug!(
        agents = agents.len(),
        placements = placements.len(),
        puts = puts.len(),
        deletes = deletes.len(),
        "placement pass"
    );
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

    /// Plans with `nodes` schedulable and `known` alive.
    fn plan_on(
        agents: &[Agent],
        nodes: &[Node],
        known: &[String],
        placements: &[Placement],
    ) -> Plan {
        let fleet = Fleet {
            schedulable: nodes,
            known: known.iter().cloned().collect(),
            draining: HashSet::new(),
        };
        plan(agents, &fleet, placements)
    }

    fn run(
        agents: &[Agent],
        nodes: &[Node],
        known: &[String],
        placements: &[Placement],
    ) -> (Vec<Placement>, Vec<Placement>) {
        let p = plan_on(agents, nodes, known, placements);
        (p.puts, p.deletes)
    }

    fn ids(placements: &[Placement]) -> Vec<&str> {
        placements
            .iter()
            .map(|p| p.assignment.replica.as_str())
            .collect()
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
        let placements: Vec<_> = ["a-0", "a-1"]
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
        let mut deleted = ids(&deletes);
        deleted.sort();
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
        let p = plan_on(&[agent("a", 2, 1)], &[], &[], &[]);
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
    fn a_new_term_moves_nothing_off_nodes_without_a_record_until_the_grace_ends() {
        let a = agent("a", 2, 1);
        let placements = vec![
            Placement {
                node: "n1".into(),
                assignment: assignment_for(&a, "a-0"),
            },
            Placement {
                node: "n2".into(),
                assignment: assignment_for(&a, "a-1"),
            },
        ];
        // Every lease ended at once (etcd stood still); n2 is back, n1 not yet.
        let alive = vec![node("n2")];
        let held = known_nodes(&alive, &placements, true);
        let (puts, deletes) = run(
            std::slice::from_ref(&a),
            &alive,
            &held.into_iter().collect::<Vec<_>>(),
            &placements,
        );
        assert!(
            puts.is_empty() && deletes.is_empty(),
            "{puts:?} {deletes:?}"
        );
        // After the grace, n1 without a record is down: its replica moves.
        let known = known_nodes(&alive, &placements, false);
        assert_eq!(known, HashSet::from(["n2".to_string()]));
        let (puts, deletes) = run(
            &[a],
            &alive,
            &known.into_iter().collect::<Vec<_>>(),
            &placements,
        );
        assert_eq!(deletes.len(), 1);
        assert_eq!(deletes[0].node, "n1");
        assert_eq!(puts.len(), 1);
        assert_eq!(puts[0].node, "n2");
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
        let p = plan_on(&[a.clone()], &nodes, &names(&nodes), &[]);
        assert!(
            p.puts.iter().all(|p| p.node == "big"),
            "only big has 1 GiB free"
        );
        assert_eq!(p.puts.len(), 2);
        // Five replicas: four fit on big (4 GiB), the fifth nowhere, with the reason per node.
        a.spec.as_mut().unwrap().replicas = Some(5);
        let p = plan_on(&[a.clone()], &nodes, &names(&nodes), &[]);
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
        let p = plan_on(&[g], &nodes, &names(&nodes), &[]);
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
        let p = plan_on(
            &[agent("other", 3, 1), agent("a", 2, 1)],
            &nodes,
            &names(&nodes),
            &busy,
        );
        let mut on: Vec<_> = p.puts.iter().map(|p| p.node.as_str()).collect();
        on.sort();
        assert_eq!(on, ["n1", "n2"], "one per node, though n1 is busier");
    }

    fn status(replicas: Vec<berth_proto::v1::ReplicaStatus>) -> berth_proto::v1::AgentStatus {
        berth_proto::v1::AgentStatus {
            replicas,
            ..Default::default()
        }
    }

    fn replica(
        id: &str,
        generation: i64,
        ready: bool,
        state: ReplicaState,
    ) -> berth_proto::v1::ReplicaStatus {
        berth_proto::v1::ReplicaStatus {
            replica: id.into(),
            generation,
            ready,
            state: state as i32,
            ..Default::default()
        }
    }

    /// Applies a plan to the stored placements, as `reconcile` does.
    fn apply(placements: &mut Vec<Placement>, p: &Plan) {
        placements.retain(|old| {
            !p.deletes
                .iter()
                .any(|d| d.node == old.node && d.assignment.replica == old.assignment.replica)
        });
        for put in &p.puts {
            placements.retain(|old| {
                !(old.node == put.node && old.assignment.replica == put.assignment.replica)
            });
            placements.push(put.clone());
        }
    }

    /// Every placed replica reported ready at its generation.
    fn all_ready(agent: &mut Agent, placements: &[Placement]) {
        agent.status = Some(status(
            placements
                .iter()
                .map(|p| {
                    replica(
                        &p.assignment.replica,
                        p.assignment.generation,
                        true,
                        ReplicaState::Running,
                    )
                })
                .collect(),
        ));
    }

    #[test]
    fn a_new_image_rolls_out_with_surge_one_and_unavailable_zero() {
        let nodes = vec![node("n1"), node("n2")];
        let mut old = agent("a", 2, 1);
        let (puts, _) = run(&[old.clone()], &nodes, &names(&nodes), &[]);
        let mut placements = puts;
        all_ready(&mut old, &placements);
        let mut new = agent("a", 2, 2);
        new.spec.as_mut().unwrap().image = "x:2".into();
        new.status = old.status.clone();
        // One new replica beside the two old ones; nothing stops yet.
        let p = plan_on(&[new.clone()], &nodes, &names(&nodes), &placements);
        assert_eq!(ids(&p.puts), ["a-2"]);
        assert!(p.deletes.is_empty());
        assert!(
            matches!(&p.rollouts[0].1, Rollout::Progressing(m) if m.contains("waiting for a-2"))
        );
        apply(&mut placements, &p);
        // Not ready yet: no change, however often placement runs.
        let p = plan_on(&[new.clone()], &nodes, &names(&nodes), &placements);
        assert!(p.puts.is_empty() && p.deletes.is_empty());
        // Ready: one old replica stops, and the next new one starts.
        let mut steps = 0;
        loop {
            all_ready(&mut new, &placements);
            let p = plan_on(&[new.clone()], &nodes, &names(&nodes), &placements);
            if p.puts.is_empty() && p.deletes.is_empty() {
                break;
            }
            apply(&mut placements, &p);
            // Unavailable 0, surge 1: always 2 ready (they were all reported ready before
            // this step), never more than 3 placed.
            assert!(placements.len() <= 3, "surge 1: {placements:?}");
            assert!(placements.len() >= 2);
            steps += 1;
            assert!(steps < 10, "the rollout ends");
        }
        assert_eq!(placements.len(), 2);
        assert!(placements
            .iter()
            .all(|p| p.assignment.spec.as_ref().unwrap().image == "x:2"));
        assert!(p_rollouts_done(&new, &nodes, &placements));
    }

    fn p_rollouts_done(agent: &Agent, nodes: &[Node], placements: &[Placement]) -> bool {
        plan_on(
            std::slice::from_ref(agent),
            nodes,
            &names(nodes),
            placements,
        )
        .rollouts
        .is_empty()
    }

    #[test]
    fn a_failing_new_replica_halts_the_rollout_and_the_old_ones_keep_serving() {
        let nodes = vec![node("n1"), node("n2")];
        let mut old = agent("a", 2, 1);
        let (mut placements, _) = run(&[old.clone()], &nodes, &names(&nodes), &[]);
        all_ready(&mut old, &placements);
        let mut new = agent("a", 2, 2);
        new.spec.as_mut().unwrap().image = "broken:2".into();
        new.status = old.status.clone();
        let p = plan_on(&[new.clone()], &nodes, &names(&nodes), &placements);
        apply(&mut placements, &p);
        let mut replicas = old.status.clone().unwrap().replicas;
        replicas.push(replica("a-2", 2, false, ReplicaState::Failed));
        new.status = Some(status(replicas));
        let p = plan_on(&[new], &nodes, &names(&nodes), &placements);
        assert!(p.puts.is_empty() && p.deletes.is_empty());
        assert!(matches!(&p.rollouts[0].1, Rollout::Halted(why) if why.contains("a-2")));
    }

    #[test]
    fn old_replicas_that_are_not_ready_are_replaced_without_waiting() {
        let nodes = vec![node("n1")];
        let old = agent("a", 2, 1);
        let (mut placements, _) = run(std::slice::from_ref(&old), &nodes, &names(&nodes), &[]);
        let mut new = agent("a", 2, 2);
        new.spec.as_mut().unwrap().image = "fixed:2".into();
        // The old replicas never became ready (nor do the new ones here): each new one
        // retires an old one at once, at most one over the count at any time.
        let mut steps = 0;
        while placements
            .iter()
            .any(|p| p.assignment.spec.as_ref().unwrap().image != "fixed:2")
        {
            let p = plan_on(&[new.clone()], &nodes, &names(&nodes), &placements);
            apply(&mut placements, &p);
            assert!(placements.len() <= 3);
            steps += 1;
            assert!(steps <= 3, "no waiting on replicas that are not ready");
        }
        assert_eq!(placements.len(), 2);
    }

    #[test]
    fn a_drain_starts_each_replacement_before_stopping_the_old_replica() {
        let nodes = vec![node("n1"), node("n2"), node("n3")];
        let mut a = agent("a", 3, 1);
        let (mut placements, _) = run(&[a.clone()], &nodes, &names(&nodes), &[]);
        all_ready(&mut a, &placements);
        let on_n1 = placements.iter().find(|p| p.node == "n1").unwrap().clone();
        // n1 drains: cordoned (not schedulable) and draining.
        let fleet = Fleet {
            schedulable: &nodes[1..],
            known: names(&nodes).into_iter().collect(),
            draining: ["n1".to_string()].into(),
        };
        let p = plan(&[a.clone()], &fleet, &placements);
        assert!(
            p.deletes.is_empty(),
            "nothing stops before its replacement is ready"
        );
        assert_eq!(p.puts.len(), 1);
        assert_ne!(p.puts[0].node, "n1");
        apply(&mut placements, &p);
        // Not ready: still nothing stops.
        let p = plan(&[a.clone()], &fleet, &placements);
        assert!(p.deletes.is_empty() && p.puts.is_empty());
        // Ready: the replica on n1 stops.
        all_ready(&mut a, &placements);
        let p = plan(&[a.clone()], &fleet, &placements);
        assert_eq!(p.deletes, [on_n1]);
        apply(&mut placements, &p);
        let p = plan(&[a], &fleet, &placements);
        assert!(p.deletes.is_empty() && p.puts.is_empty());
        assert!(placements.iter().all(|p| p.node != "n1"));
        assert_eq!(placements.len(), 3);
    }

    #[test]
    fn a_pinned_agent_stays_on_a_draining_node_and_updates_in_place() {
        let nodes = vec![node("n1"), node("n2")];
        let mut a = agent("a", 2, 1);
        a.spec.as_mut().unwrap().volumes = vec![berth_proto::v1::VolumeMount {
            source: "/var/lib/berth/volumes/a".into(),
            target: "/data".into(),
            read_only: false,
        }];
        let (mut placements, _) = run(&[a.clone()], &nodes, &names(&nodes), &[]);
        all_ready(&mut a, &placements);
        let fleet = Fleet {
            schedulable: &nodes[1..],
            known: names(&nodes).into_iter().collect(),
            draining: ["n1".to_string()].into(),
        };
        let p = plan(&[a.clone()], &fleet, &placements);
        assert!(p.puts.is_empty() && p.deletes.is_empty());
        // A new image: one replica at a time, in place.
        let mut new = a.clone();
        new.spec.as_mut().unwrap().image = "x:2".into();
        new.meta.as_mut().unwrap().generation = 2;
        let p = plan(&[new.clone()], &fleet, &placements);
        assert_eq!(ids(&p.puts), ["a-0"]);
        assert_eq!(p.puts[0].node, placements[0].node);
        assert!(p.deletes.is_empty());
        apply(&mut placements, &p);
        let p = plan(&[new], &fleet, &placements);
        assert!(p.puts.is_empty(), "a-0 is not ready at generation 2 yet");
    }

    #[test]
    fn scaling_down_in_a_rollout_keeps_ready_replicas() {
        let nodes = vec![node("n1")];
        let mut a = agent("a", 3, 1);
        let (mut placements, _) = run(&[a.clone()], &nodes, &names(&nodes), &[]);
        all_ready(&mut a, &placements);
        // a-1 stops being ready; scaling to 2 removes it first.
        a.status.as_mut().unwrap().replicas[1].ready = false;
        let mut smaller = a.clone();
        smaller.spec.as_mut().unwrap().replicas = Some(2);
        let p = plan_on(&[smaller], &nodes, &names(&nodes), &placements);
        assert_eq!(ids(&p.deletes), ["a-1"]);
        apply(&mut placements, &p);
        assert_eq!(placements.len(), 2);
    }
}
