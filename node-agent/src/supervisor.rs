//! Keeps this node's containers as the control plane last said: creates, starts, stops,
//! pauses and removes them; restarts crashed or unhealthy ones with backoff, on its own, even
//! while the control plane is unreachable. Level-based: every wake-up reconciles everything.

use crate::docker::{container_digest, DockerError};
use crate::probe::{self, ProbeResult, ProbeSpec};
use crate::reports::Reports;
use crate::restarts::RestartCounts;
use crate::runtime::ContainerRuntime;
use berth_proto::defaults;
use berth_proto::time::std_duration;
use berth_proto::v1::{
    Assignment, Assignments, DesiredState, HealthState, ReplicaReport, ReplicaState, ReplicaStatus,
    RestartPolicy,
};
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// First wait before restarting a crashed container (Docker's own restart policy waits the
/// same); it doubles with each crash up to the agent's `restart.maxBackoff`.
pub const RESTART_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// A container running this long without a crash resets its backoff.
pub const RESTART_BACKOFF_RESET: Duration = Duration::from_secs(600);
/// Time between checks for an image that was missing.
pub const IMAGE_RETRY: Duration = Duration::from_secs(10);
/// How often a replica waiting for its image checks whether the pull finished.
pub const PULL_POLL: Duration = Duration::from_secs(1);
/// Time between reconciles when nothing happens.
pub const TICK: Duration = Duration::from_millis(500);
/// Containers a pass starts at once.
pub const STARTS_AT_ONCE: usize = 8;

#[derive(Default)]
struct Replica {
    agent: String,
    container: Option<String>,
    generation: i64,
    /// [`container_digest`] of the spec the container was made from.
    digest: String,
    status: ReplicaStatus,
    restart_at: Option<Instant>,
    backoff: Duration,
    running_since: Option<Instant>,
    started_wall: Option<SystemTime>,
    probe: Option<JoinHandle<()>>,
    failures: u32,
    /// Its container is being stopped (in a task of its own); what follows once it has.
    stopping: Option<AfterStop>,
    /// The stop grace of its last assignment: kept for its stop once it is unassigned.
    grace: Option<Duration>,
}

/// What becomes of a replica once its container has stopped.
#[derive(Clone, Copy, Debug, PartialEq)]
enum AfterStop {
    /// Stopped on request: it stays, stopped.
    Rest,
    /// Started again: a restart was asked for, or its health checks failed.
    Start,
    /// Removed: unassigned (then forgotten), or made of another spec (then made again).
    Remove,
}

/// A stop begun by [`Supervisor::begin_stop`] has finished.
struct Stopped {
    replica: String,
    container: String,
}

impl Replica {
    fn stop_probe(&mut self) {
        if let Some(p) = self.probe.take() {
            p.abort();
        }
    }
}

/// The supervisor of one node, over a container runtime (Docker, or in memory in tests).
pub struct Supervisor<R: ContainerRuntime> {
    runtime: R,
    node: String,
    replicas: HashMap<String, Replica>,
    desired: Option<Assignments>,
    reports: Arc<Reports>,
    restarts: RestartCounts,
    probe_tx: mpsc::Sender<ProbeResult>,
    probe_rx: mpsc::Receiver<ProbeResult>,
    stopped_tx: mpsc::UnboundedSender<Stopped>,
    stopped_rx: mpsc::UnboundedReceiver<Stopped>,
    /// Replicas whose container a pass decided to start: started together at its end.
    starts: Vec<(String, Assignment)>,
}

impl<R: ContainerRuntime> Supervisor<R> {
    /// A supervisor that publishes replica states to `reports`.
    /// Restart counts carry over from `restarts`.
    pub fn new(runtime: R, node: &str, reports: Arc<Reports>, restarts: RestartCounts) -> Self {
        let (probe_tx, probe_rx) = mpsc::channel(64);
        let (stopped_tx, stopped_rx) = mpsc::unbounded_channel();
        Self {
            runtime,
            node: node.to_string(),
            replicas: HashMap::new(),
            desired: None,
            reports,
            restarts,
            probe_tx,
            probe_rx,
            stopped_tx,
            stopped_rx,
            starts: Vec::new(),
        }
    }

    /// Adopts this node's existing containers, restarting none of them.
    pub async fn adopt(&mut self) -> Result<(), DockerError> {
        let containers = self.runtime.list().await?;
        let live: Vec<&str> = containers.iter().map(|c| c.id.as_str()).collect();
        self.restarts.retain(&live);
        for c in containers {
            let mut r = Replica {
                agent: c.agent.clone(),
                container: Some(c.id.clone()),
                generation: c.generation,
                digest: c.digest.clone(),
                backoff: RESTART_BACKOFF_MIN,
                ..Default::default()
            };
            r.status = ReplicaStatus {
                replica: c.replica.clone(),
                node: self.node.clone(),
                container_id: c.id.clone(),
                generation: c.generation,
                restarts: self.restarts.get(&c.id),
                last_exit_code: c.exit_code.filter(|_| !c.running),
                state: if c.paused {
                    ReplicaState::Paused
                } else if c.running {
                    ReplicaState::Running
                } else {
                    ReplicaState::Stopped
                } as i32,
                ..Default::default()
            };
            if c.running {
                r.running_since = Some(Instant::now());
            }
            tracing::info!(replica = %c.replica, container = %c.id, running = c.running, "adopted container");
            self.replicas.insert(c.replica.clone(), r);
        }
        Ok(())
    }

    /// Current reports of every replica, for the hello.
    pub fn publish_all(&self) {
        for r in self.replicas.values() {
            self.publish(r);
        }
    }

    fn publish(&self, r: &Replica) {
        self.reports.set(ReplicaReport {
            agent: r.agent.clone(),
            status: Some(r.status.clone()),
        });
    }

    /// Runs until the assignments channel closes or `stop` is cancelled; a reconcile under
    /// way finishes first. Containers keep running: the next start adopts them.
    pub async fn run(
        mut self,
        mut assignments: watch::Receiver<Option<Assignments>>,
        stop: CancellationToken,
    ) {
        let mut deaths = self.runtime.deaths();
        let mut tick = tokio::time::interval(TICK);
        self.publish_all();
        loop {
            // A restart already due was acted on by the reconcile just run.
            let now = Instant::now();
            let next_restart = self
                .replicas
                .values()
                .filter_map(|r| r.restart_at.filter(|t| *t > now))
                .min();
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = assignments.changed() => {
                    if changed.is_err() { return; }
                    let latest = assignments.borrow_and_update().clone();
                    if let Some(latest) = latest {
                        if self.desired.as_ref().is_none_or(|d| latest.version >= d.version) {
                            self.desired = Some(latest);
                        }
                    }
                }
                death = deaths.next() => match death {
                    Some(Ok(id)) => self.on_death(&id).await,
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "docker events interrupted; resubscribing");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        deaths = self.runtime.deaths();
                    }
                    None => deaths = self.runtime.deaths().boxed(),
                },
                Some(result) = self.probe_rx.recv() => self.on_probe(result),
                Some(done) = self.stopped_rx.recv() => self.on_stopped(done),
                // A restart is due before the next tick: on time, not up to a tick late.
                _ = tokio::time::sleep_until(next_restart.unwrap_or_else(Instant::now)),
                    if next_restart.is_some() => {}
                _ = tick.tick() => {}
            }
            self.reconcile().await;
        }
    }

    async fn reconcile(&mut self) {
        let Some(desired) = self.desired.clone() else {
            // Nothing heard from the control plane yet: keep what runs, restart what crashed.
            let ids: Vec<String> = self.replicas.keys().cloned().collect();
            for id in ids {
                self.restart_if_due(&id).await;
            }
            self.run_starts().await;
            return;
        };
        let wanted: HashMap<&str, &Assignment> = desired
            .replicas
            .iter()
            .map(|a| (a.replica.as_str(), a))
            .collect();
        let gone: Vec<String> = self
            .replicas
            .keys()
            .filter(|id| !wanted.contains_key(id.as_str()))
            .cloned()
            .collect();
        for id in gone {
            let r = &self.replicas[&id];
            if r.stopping.is_some() {
                // Once stopped, it is still unassigned: the next pass removes it.
                continue;
            }
            if r.container.is_some() {
                let grace = r.grace.unwrap_or(defaults::STOP_GRACE);
                self.begin_stop(&id, grace, AfterStop::Remove, "unassigned");
            } else {
                self.forget(&id);
            }
        }
        for a in desired.replicas {
            self.ensure(&a).await;
        }
        self.run_starts().await;
    }

    fn forget(&mut self, id: &str) {
        if let Some(mut r) = self.replicas.remove(id) {
            r.stop_probe();
        }
        self.reports.remove(id);
        tracing::info!(replica = %id, "removed unassigned replica");
    }

    /// Stops the replica's container in a task of its own, as a stop waits out the grace
    /// period when the process takes it all, and the other replicas' crashes, probes and
    /// starts must not wait with it. The replica is not ready from now on; `after` follows
    /// once the container has stopped ([`Self::on_stopped`]).
    fn begin_stop(&mut self, id: &str, grace: Duration, after: AfterStop, why: &str) {
        let r = self.replicas.get_mut(id).expect("present");
        let Some(container) = r.container.clone() else {
            return;
        };
        let paused = r.status.state == ReplicaState::Paused as i32;
        r.stop_probe();
        r.restart_at = None;
        r.stopping = Some(after);
        r.status.state = ReplicaState::Stopping as i32;
        r.status.ready = false;
        r.status.message = format!("{why}; SIGTERM sent, SIGKILL after {grace:?}");
        tracing::info!(replica = %id, ?after, ?grace, "{why}; stopping");
        let runtime = self.runtime.clone();
        let stopped = self.stopped_tx.clone();
        let replica = id.to_string();
        tokio::spawn(async move {
            if paused {
                // A frozen process cannot act on SIGTERM.
                let _ = runtime.unpause(&container).await;
            }
            if let Err(e) = runtime.stop(&container, grace).await {
                tracing::warn!(%replica, error = %e, "stop failed");
            }
            if after == AfterStop::Remove {
                if let Err(e) = runtime.remove(&container).await {
                    tracing::warn!(%replica, error = %e, "cannot remove container");
                }
            }
            let _ = stopped.send(Stopped { replica, container });
        });
        let r = &self.replicas[id];
        self.publish(r);
    }

    fn on_stopped(&mut self, done: Stopped) {
        let Some(r) = self.replicas.get_mut(&done.replica) else {
            return;
        };
        if r.container.as_deref() != Some(done.container.as_str()) {
            return;
        }
        let Some(after) = r.stopping.take() else {
            return;
        };
        let id = done.replica;
        match after {
            AfterStop::Rest => self.set_state(&id, ReplicaState::Stopped, ""),
            // The next pass starts it (if still wanted running).
            AfterStop::Start => self.set_state(&id, ReplicaState::Pending, ""),
            AfterStop::Remove => {
                r.container = None;
                r.status.container_id.clear();
                if self.assignment_of(&id).is_some() {
                    self.set_state(&id, ReplicaState::Pending, "");
                } else {
                    self.forget(&id);
                }
            }
        }
    }

    async fn ensure(&mut self, a: &Assignment) {
        let spec = a.spec.clone().unwrap_or_default();
        let r = self
            .replicas
            .entry(a.replica.clone())
            .or_insert_with(|| Replica {
                agent: spec.name.clone(),
                backoff: RESTART_BACKOFF_MIN,
                status: ReplicaStatus {
                    replica: a.replica.clone(),
                    state: ReplicaState::Pending as i32,
                    ..Default::default()
                },
                ..Default::default()
            });
        if r.stopping.is_some() {
            // What it should be is looked at again once its container has stopped.
            return;
        }
        r.status.node = self.node.clone();
        r.grace = Some(grace_of(a));
        let digest = container_digest(&spec);
        let replace = r.container.is_some() && r.digest != digest;
        r.generation = a.generation;
        r.digest = digest;
        r.status.generation = a.generation;
        let id = a.replica.clone();
        if replace {
            // What the container is made of changed: replace it (rolling updates come with
            // the fleet issue). Run-state changes keep it.
            self.begin_stop(&id, grace_of(a), AfterStop::Remove, "spec changed");
            return;
        }
        let desired = DesiredState::try_from(a.desired_state).unwrap_or(DesiredState::Running);
        let state = ReplicaState::try_from(r.status.state).unwrap_or(ReplicaState::Pending);
        match desired {
            DesiredState::Stopped => {
                if matches!(
                    state,
                    ReplicaState::Running | ReplicaState::Paused | ReplicaState::Restarting
                ) {
                    let r = self.replicas.get_mut(&id).expect("inserted");
                    if r.container.is_some() {
                        self.begin_stop(&id, grace_of(a), AfterStop::Rest, "asked to stop");
                    } else {
                        r.stop_probe();
                        r.restart_at = None;
                        self.set_state(&id, ReplicaState::Stopped, "");
                    }
                } else if state != ReplicaState::Stopped {
                    tracing::debug!(replica = %id, state = ?state, "asked to stop; nothing running to stop");
                }
            }
            DesiredState::Paused => {
                if state == ReplicaState::Running {
                    let r = self.replicas.get_mut(&id).expect("inserted");
                    r.stop_probe();
                    if let Some(c) = r.container.clone() {
                        match self.runtime.pause(&c).await {
                            Ok(()) => self.set_state(&id, ReplicaState::Paused, ""),
                            Err(e) => tracing::warn!(replica = %id, error = %e, "pause failed"),
                        }
                    }
                }
            }
            DesiredState::Running | DesiredState::Unspecified => {
                let r = self.replicas.get_mut(&id).expect("inserted");
                let restart_requested = match (&a.restart_time, r.started_wall) {
                    (Some(t), Some(started)) => berth_proto::time::system_time(t) > started,
                    _ => false,
                };
                match state {
                    ReplicaState::Paused => {
                        if let Some(c) = r.container.clone() {
                            if self.runtime.unpause(&c).await.is_ok() {
                                self.set_state(&id, ReplicaState::Running, "");
                                self.start_probe(&id, a);
                            }
                        }
                    }
                    ReplicaState::Running if restart_requested => {
                        self.begin_stop(&id, grace_of(a), AfterStop::Start, "restart asked for");
                    }
                    ReplicaState::Running => {
                        if r.probe.is_none() {
                            // Adopted after a node-agent restart: resume probing, no restart.
                            self.refresh_address(&id, a).await;
                            self.start_probe(&id, a);
                        }
                    }
                    ReplicaState::Restarting => self.restart_if_due(&id).await,
                    ReplicaState::Failed if r.restart_at.is_some_and(|t| t <= Instant::now()) => {
                        self.start_container(&id, a)
                    }
                    ReplicaState::Pending | ReplicaState::Stopped | ReplicaState::Unspecified => {
                        self.start_container(&id, a)
                    }
                    // Not while stopping: looked at again once stopped.
                    ReplicaState::Failed | ReplicaState::Stopping => {}
                }
            }
        }
        let r = &self.replicas[&id];
        self.publish(r);
    }

    async fn restart_if_due(&mut self, id: &str) {
        let Some(r) = self.replicas.get(id) else {
            return;
        };
        if r.status.state != ReplicaState::Restarting as i32
            || r.restart_at.is_none_or(|t| t > Instant::now())
        {
            return;
        }
        let assignment = self.assignment_of(id);
        match (assignment, r.container.clone()) {
            (Some(a), _) => {
                self.count_restart(id);
                self.start_container(id, &a);
            }
            (None, Some(c)) => {
                // Not told anything yet (control plane unreachable since start): restart as is.
                self.count_restart(id);
                let r = self.replicas.get_mut(id).expect("present");
                r.restart_at = None;
                match self.runtime.start(&c).await {
                    Ok(()) => {
                        r.running_since = Some(Instant::now());
                        r.started_wall = Some(SystemTime::now());
                        r.status.state = ReplicaState::Running as i32;
                        tracing::info!(replica = %id, "restarted without control plane");
                    }
                    Err(e) => tracing::warn!(replica = %id, error = %e, "restart failed"),
                }
                let r = &self.replicas[id];
                self.publish(r);
            }
            (None, None) => {}
        }
    }

    /// Adds one to a replica's restart count and keeps it on disk.
    fn count_restart(&mut self, id: &str) {
        let r = self.replicas.get_mut(id).expect("present");
        r.status.restarts += 1;
        if let Some(c) = &r.container {
            self.restarts.set(c, r.status.restarts);
        }
    }

    fn assignment_of(&self, id: &str) -> Option<Assignment> {
        self.desired
            .as_ref()?
            .replicas
            .iter()
            .find(|a| a.replica == id)
            .cloned()
    }

    /// Starts the replica's container, creating it first if needed: at the end of the pass,
    /// together with the others it starts ([`Self::run_starts`]).
    fn start_container(&mut self, id: &str, a: &Assignment) {
        let r = self.replicas.get_mut(id).expect("present");
        r.restart_at = None;
        if !self.starts.iter().any(|(queued, _)| queued == id) {
            self.starts.push((id.to_string(), a.clone()));
        }
    }

    /// Starts the containers the pass decided to start, up to [`STARTS_AT_ONCE`] at a time (a
    /// start takes about half a second on Docker: ten one after another would make the last
    /// wait five), each acted on as it comes back, and the probes' results meanwhile. Crashes
    /// wait in Docker's event stream until every start is recorded: a container that dies
    /// at once is then known as its replica's, and its death is not missed.
    async fn run_starts(&mut self) {
        let starts = std::mem::take(&mut self.starts);
        let runtime = self.runtime.clone();
        let jobs: Vec<_> = starts
            .into_iter()
            .filter_map(|(id, a)| {
                let container = self.replicas.get(&id)?.container.clone();
                Some((id, a, container))
            })
            .collect();
        let mut started = futures::stream::iter(jobs)
            .map(|(id, a, container)| {
                let runtime = runtime.clone();
                async move {
                    let outcome = start_one(&runtime, &a, container).await;
                    (id, a, outcome)
                }
            })
            .buffer_unordered(STARTS_AT_ONCE);
        loop {
            tokio::select! {
                next = started.next() => match next {
                    Some((id, a, outcome)) => self.on_started(&id, &a, outcome),
                    None => return,
                },
                // The replicas started first are ready first, not once the last has started.
                Some(result) = self.probe_rx.recv() => self.on_probe(result),
            }
        }
    }

    fn on_started(&mut self, id: &str, a: &Assignment, outcome: StartOutcome) {
        let Some(r) = self.replicas.get_mut(id) else {
            return;
        };
        match outcome {
            StartOutcome::NotCreated(e @ DockerError::ImagePulling { .. }) => {
                r.restart_at = Some(Instant::now() + PULL_POLL);
                self.set_state(id, ReplicaState::Pending, &e.to_string());
            }
            StartOutcome::NotCreated(e) => {
                r.restart_at = Some(Instant::now() + IMAGE_RETRY);
                tracing::warn!(replica = %id, error = %e, "cannot create container");
                self.set_state(id, ReplicaState::Failed, &e.to_string());
            }
            StartOutcome::NotStarted(_, e @ DockerError::NetworkGone(_)) => {
                // Made on a network another node agent removed (`start_one` removed it): the
                // next attempt creates the container again, on the network settled since.
                r.container = None;
                r.status.container_id.clear();
                r.restart_at = Some(Instant::now());
                tracing::warn!(replica = %id, error = %e, "container's network gone; creating it again");
                self.set_state(id, ReplicaState::Restarting, &e.to_string());
            }
            StartOutcome::NotStarted(container, e) => {
                r.status.container_id = container.clone();
                r.container = Some(container);
                r.restart_at = Some(Instant::now() + r.backoff);
                tracing::warn!(replica = %id, error = %e, "cannot start container");
                self.set_state(id, ReplicaState::Restarting, &e.to_string());
            }
            StartOutcome::Running(container, ip) => {
                r.status.container_id = container.clone();
                r.container = Some(container.clone());
                r.running_since = Some(Instant::now());
                r.started_wall = Some(SystemTime::now());
                r.failures = 0;
                r.status.started_at = Some(berth_proto::timestamp(SystemTime::now()));
                if let Some(ip) = ip {
                    r.status.address = address(&ip, a);
                }
                self.set_state(id, ReplicaState::Running, "");
                self.start_probe(id, a);
                tracing::info!(replica = %id, container = %container, "container started");
            }
        }
    }

    async fn refresh_address(&mut self, id: &str, a: &Assignment) {
        let Some(c) = self.replicas[id].container.clone() else {
            return;
        };
        if let Ok(info) = self.runtime.inspect(&c).await {
            let r = self.replicas.get_mut(id).expect("present");
            r.status.address = address(&info.ip, a);
        }
    }

    fn start_probe(&mut self, id: &str, a: &Assignment) {
        let r = self.replicas.get_mut(id).expect("present");
        r.stop_probe();
        let spec = a.spec.clone().unwrap_or_default();
        let Some(health) = spec.health.filter(|h| !h.path.is_empty()) else {
            r.status.health = HealthState::None as i32;
            r.status.ready = r.status.state == ReplicaState::Running as i32;
            return;
        };
        r.status.health = HealthState::Starting as i32;
        r.status.ready = false;
        let d = |p: Option<pbjson_types::Duration>, default: Duration| {
            p.as_ref().and_then(std_duration).unwrap_or(default)
        };
        let probe_spec = ProbeSpec {
            address: r.status.address.clone(),
            path: health.path.clone(),
            interval: d(health.interval, defaults::HEALTH_INTERVAL),
            timeout: d(health.timeout, defaults::HEALTH_TIMEOUT),
            start_period: d(health.start_period, defaults::HEALTH_START_PERIOD),
        };
        let container = r.container.clone().unwrap_or_default();
        r.probe = Some(tokio::spawn(probe::run(
            self.runtime.clone(),
            probe_spec,
            id.to_string(),
            container,
            self.probe_tx.clone(),
        )));
    }

    fn on_probe(&mut self, result: ProbeResult) {
        let Some(r) = self.replicas.get_mut(&result.replica) else {
            return;
        };
        if r.container.as_deref() != Some(result.container.as_str())
            || r.status.state != ReplicaState::Running as i32
            || r.stopping.is_some()
        {
            return;
        }
        if result.ok {
            r.failures = 0;
            r.status.health = HealthState::Healthy as i32;
            r.status.ready = true;
            r.status.message.clear();
        } else {
            r.failures += 1;
            let retries = self
                .assignment_of(&result.replica)
                .and_then(|a| a.spec?.health)
                .map(|h| h.retries)
                .unwrap_or(defaults::HEALTH_RETRIES);
            let r = self.replicas.get_mut(&result.replica).expect("present");
            if r.failures >= retries.max(1) {
                r.status.health = HealthState::Unhealthy as i32;
                r.status.ready = false;
                let why = format!("health check failed {} times in a row", r.failures);
                r.status.message = format!("{why}; restarting");
                r.stop_probe();
                tracing::warn!(replica = %result.replica, failures = r.failures, "unhealthy; restarting");
                self.count_restart(&result.replica);
                if let Some(a) = self.assignment_of(&result.replica) {
                    self.begin_stop(&result.replica, grace_of(&a), AfterStop::Start, &why);
                }
            }
        }
        let r = &self.replicas[&result.replica];
        self.publish(r);
    }

    async fn on_death(&mut self, container: &str) {
        let Some((id, r)) = self
            .replicas
            .iter_mut()
            .find(|(_, r)| r.container.as_deref() == Some(container))
        else {
            return;
        };
        let id = id.clone();
        // Deaths Berth caused (stop, pause paths, restarts) are not crashes.
        if r.status.state != ReplicaState::Running as i32 || r.stopping.is_some() {
            return;
        }
        let info = match self.runtime.inspect(container).await {
            Ok(info) if !info.running => info,
            _ => return, // already running again (a restart we made)
        };
        let r = self.replicas.get_mut(&id).expect("present");
        r.stop_probe();
        r.status.ready = false;
        r.status.last_exit_code = info.exit_code;
        r.status.oom_killed = info.oom_killed;
        let policy = self
            .desired
            .as_ref()
            .and_then(|d| d.replicas.iter().find(|a| a.replica == id))
            .and_then(|a| a.spec.as_ref()?.restart)
            .map(|r| {
                (
                    RestartPolicy::try_from(r.policy).unwrap_or(RestartPolicy::Always),
                    r.max_backoff,
                )
            })
            .unwrap_or((RestartPolicy::Always, None));
        let max_backoff = policy
            .1
            .as_ref()
            .and_then(std_duration)
            .unwrap_or(defaults::RESTART_MAX_BACKOFF)
            .max(Duration::from_secs(1));
        let exit = info.exit_code.unwrap_or(-1);
        let restart = match policy.0 {
            RestartPolicy::Never => false,
            RestartPolicy::OnFailure => exit != 0 || info.oom_killed,
            _ => true,
        };
        let why = if info.oom_killed {
            "killed: out of memory".to_string()
        } else {
            format!("exited with code {exit}")
        };
        if r.running_since
            .is_some_and(|s| s.elapsed() >= RESTART_BACKOFF_RESET)
        {
            r.backoff = RESTART_BACKOFF_MIN;
        }
        if restart {
            let wait = r.backoff;
            r.restart_at = Some(Instant::now() + wait);
            r.backoff = (r.backoff * 2).min(max_backoff);
            tracing::warn!(replica = %id, exit, ?wait, "container died; restarting");
            self.set_state(
                &id,
                ReplicaState::Restarting,
                &format!("{why}; restarting in {wait:?}"),
            );
        } else {
            tracing::warn!(replica = %id, exit, "container died; restart policy says no");
            self.set_state(&id, ReplicaState::Failed, &why);
        }
        let r = &self.replicas[&id];
        self.publish(r);
    }

    fn set_state(&mut self, id: &str, state: ReplicaState, message: &str) {
        let r = self.replicas.get_mut(id).expect("present");
        r.status.state = state as i32;
        if state != ReplicaState::Running {
            r.status.ready = false;
        }
        r.status.message = message.to_string();
        let r = &self.replicas[id];
        self.publish(r);
    }
}

/// How a start made by [`start_one`] ended.
enum StartOutcome {
    /// No container: creating it failed.
    NotCreated(DockerError),
    /// The container (made now or before) did not start.
    NotStarted(String, DockerError),
    /// The container runs; its IP address on the node's network, when Docker told it.
    Running(String, Option<String>),
}

/// Creates the replica's container when it has none, starts it and reads its address.
async fn start_one<R: ContainerRuntime>(
    runtime: &R,
    a: &Assignment,
    container: Option<String>,
) -> StartOutcome {
    let container = match container {
        Some(c) => c,
        None => match runtime.create(a).await {
            Ok(c) => c,
            Err(e) => return StartOutcome::NotCreated(e),
        },
    };
    if let Err(e) = runtime.start(&container).await {
        if let DockerError::NetworkGone(_) = e {
            let _ = runtime.remove(&container).await;
        }
        return StartOutcome::NotStarted(container, e);
    }
    let ip = runtime.inspect(&container).await.ok().map(|info| info.ip);
    StartOutcome::Running(container, ip)
}

/// The replica's address at `ip` on the node's network ("" without an IP).
fn address(ip: &str, a: &Assignment) -> String {
    if ip.is_empty() {
        return String::new();
    }
    let port = a.spec.as_ref().map_or(defaults::PORT, |s| s.port);
    format!("{ip}:{port}")
}

fn grace_of(a: &Assignment) -> Duration {
    a.spec
        .as_ref()
        .and_then(|s| s.stop_grace.as_ref())
        .and_then(std_duration)
        .unwrap_or(defaults::STOP_GRACE)
}

/// The supervisor over the in-memory runtime, on tokio's paused clock: what it does after a
/// crash, a failing health check and its own restart, without Docker.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::docker::ContainerInfo;
    use crate::runtime::memory::MemoryRuntime;
    use berth_proto::time::pb_duration;
    use berth_proto::v1::{AgentSpec, HealthCheck};

    fn assignment(replica: &str, health: bool) -> Assignment {
        Assignment {
            replica: replica.into(),
            generation: 1,
            desired_state: DesiredState::Running as i32,
            spec: Some(AgentSpec {
                name: "a".into(),
                image: "img:1".into(),
                port: 8080,
                health: health.then(|| HealthCheck {
                    path: "/health".into(),
                    interval: Some(pb_duration(Duration::from_secs(10))),
                    timeout: Some(pb_duration(Duration::from_secs(2))),
                    retries: 3,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    struct Node {
        runtime: MemoryRuntime,
        reports: Arc<Reports>,
        assignments: watch::Sender<Option<Assignments>>,
        stop: CancellationToken,
        task: JoinHandle<()>,
        _dir: tempfile::TempDir,
    }

    impl Node {
        /// A supervisor over `runtime` (adopting what it holds), told `replicas`.
        async fn start(runtime: MemoryRuntime, replicas: Vec<Assignment>) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let reports = Arc::new(Reports::default());
            let mut supervisor = Supervisor::new(
                runtime.clone(),
                "n1",
                reports.clone(),
                RestartCounts::open(dir.path()).unwrap(),
            );
            supervisor.adopt().await.unwrap();
            let (tx, rx) = watch::channel(None);
            let stop = CancellationToken::new();
            let task = tokio::spawn(supervisor.run(rx, stop.clone()));
            // As the session does once the control plane answers.
            tx.send_replace(Some(Assignments {
                version: 1,
                replicas,
            }));
            Node {
                runtime,
                reports,
                assignments: tx,
                stop,
                task,
                _dir: dir,
            }
        }

        /// New assignments, as the control plane sends them.
        fn assign(&self, replicas: Vec<Assignment>) {
            self.assignments.send_modify(|current| {
                let version = current.as_ref().map_or(1, |a| a.version + 1);
                *current = Some(Assignments { version, replicas });
            });
        }

        fn status(&self, replica: &str) -> Option<ReplicaStatus> {
            self.reports
                .since(0)
                .0
                .into_iter()
                .filter_map(|r| r.status)
                .find(|s| s.replica == replica)
        }

        /// Waits (on the paused clock) until `replica`'s status satisfies `what`; how long.
        async fn until(&self, replica: &str, what: impl Fn(&ReplicaStatus) -> bool) -> Duration {
            let start = Instant::now();
            while !self.status(replica).is_some_and(|s| what(&s)) {
                assert!(
                    start.elapsed() < Duration::from_secs(600),
                    "{replica} never got there: {:?}",
                    self.status(replica)
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            start.elapsed()
        }

        async fn stop(self) {
            self.stop.cancel();
            self.task.await.unwrap();
        }
    }

    fn running(s: &ReplicaStatus) -> bool {
        s.state == ReplicaState::Running as i32
    }

    /// Ten replicas `a-0`..`a-9` started in one pass, each start a second on a busy Docker
    /// engine.
    async fn ten_started_together(health: bool) -> Node {
        let runtime = MemoryRuntime::default();
        runtime.slow_starts(Duration::from_secs(1));
        let replicas = (0..10)
            .map(|i| assignment(&format!("a-{i}"), health))
            .collect();
        Node::start(runtime, replicas).await
    }

    #[tokio::test(start_paused = true)]
    async fn replicas_start_together_and_each_is_ready_once_probed() {
        let node = ten_started_together(true).await;
        let since = Instant::now();
        node.until("a-0", |s| running(s) && s.ready).await;
        let first = since.elapsed();
        node.until("a-9", |s| running(s) && s.ready).await;
        let last = since.elapsed();
        // Eight at once, then the other two: not ten seconds one after another.
        assert!(
            first <= Duration::from_millis(1100) && last <= Duration::from_millis(2100),
            "the first ready after {first:?}, the last after {last:?}"
        );
        node.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_crash_while_others_start_is_restarted_once_their_starts_are_recorded() {
        let node = ten_started_together(false).await;
        let since = Instant::now();
        node.until("a-0", running).await;
        let container = node.status("a-0").unwrap().container_id;
        node.runtime.crash(&container, 1);
        node.until("a-0", |s| running(s) && s.restarts == 1).await;
        let restarted = since.elapsed();
        // Seen once the second wave of starts is recorded (2 s), restarted 100 ms later, the
        // start taking a second.
        assert!(
            restarted <= Duration::from_millis(3200),
            "a-0 restarted after {restarted:?}"
        );
        let status = node.status("a-0").unwrap();
        assert_eq!(
            (status.last_exit_code, status.container_id),
            (Some(1), container)
        );
        node.stop().await;
    }

    /// `a-0` and `b-0` (stop grace `grace`, longer than the default) running and ready, on an engine where each process
    /// finishes its requests in flight before it ends, longer than any grace.
    async fn slow_to_stop(grace: Duration) -> (Node, Assignment, Assignment) {
        let runtime = MemoryRuntime::default();
        runtime.slow_stops(Duration::from_secs(3600));
        let (mut a, mut b) = (assignment("a-0", false), assignment("b-0", false));
        for x in [&mut a, &mut b] {
            x.spec.as_mut().unwrap().stop_grace = Some(pb_duration(grace));
        }
        let node = Node::start(runtime, vec![a.clone(), b.clone()]).await;
        node.until("a-0", |s| running(s) && s.ready).await;
        node.until("b-0", |s| running(s) && s.ready).await;
        (node, a, b)
    }

    #[tokio::test(start_paused = true)]
    async fn a_crash_is_restarted_on_time_while_another_replica_takes_its_stop_grace() {
        let grace = Duration::from_secs(30);
        let (node, a, b) = slow_to_stop(grace).await;
        let asked = Instant::now();
        let stop = Assignment {
            desired_state: DesiredState::Stopped as i32,
            ..a
        };
        node.assign(vec![stop, b]);
        // Out of the gateway's rotation at once, while its process still finishes.
        node.until("a-0", |s| {
            !s.ready && s.state == ReplicaState::Stopping as i32
        })
        .await;
        let b_container = node.status("b-0").unwrap().container_id;
        node.runtime.crash(&b_container, 1);
        let restarted = node.until("b-0", |s| running(s) && s.restarts == 1).await;
        assert!(
            restarted < Duration::from_secs(1),
            "b-0 restarted {restarted:?} after its crash, waiting for a-0's stop"
        );
        node.until("a-0", |s| s.state == ReplicaState::Stopped as i32)
            .await;
        let stopped = asked.elapsed();
        assert!(
            stopped >= grace && stopped < grace + Duration::from_secs(1),
            "a-0 stopped {stopped:?} after asked, grace {grace:?}"
        );
        node.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_changed_spec_replaces_the_container_once_the_old_one_has_stopped() {
        let grace = Duration::from_secs(20);
        let (node, a, _) = slow_to_stop(grace).await;
        let runtime = node.runtime.clone();
        let old = node.status("a-0").unwrap().container_id;
        let mut changed = a;
        changed.generation = 2;
        changed.spec.as_mut().unwrap().image = "img:2".into();
        // a-0 made of another image, b-0 unassigned.
        let asked = Instant::now();
        node.assign(vec![changed]);
        node.until("a-0", |s| {
            !s.ready
                && s.state == ReplicaState::Stopping as i32
                && s.message.contains("spec changed")
        })
        .await;
        let replaced = node
            .until("a-0", |s| running(s) && s.container_id != old)
            .await;
        assert!(
            replaced >= grace && replaced < grace + Duration::from_secs(1),
            "replaced after {replaced:?}, grace {grace:?}"
        );
        // b-0 is stopped with the grace of its last assignment, then forgotten.
        while node.status("b-0").is_some() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let removed = asked.elapsed();
        assert!(
            removed >= grace && removed < grace + Duration::from_secs(1),
            "b-0 removed after {removed:?}, grace {grace:?}"
        );
        let left = runtime.ids();
        assert_eq!(left, [node.status("a-0").unwrap().container_id]);
        assert_eq!(runtime.counts(), (3, 3));
        assert_eq!(node.status("a-0").unwrap().generation, 2);
        node.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_crashed_container_is_restarted_with_doubling_backoff() {
        let node = Node::start(MemoryRuntime::default(), vec![assignment("a-0", false)]).await;
        node.until("a-0", |s| running(s) && s.ready).await;
        let container = node.status("a-0").unwrap().container_id;
        // It crashes at once on every start: 100 ms, doubling, held at 60 s (the default
        // `restart.maxBackoff`), so a crash loop stays bounded.
        let ms = Duration::from_millis;
        let mut expected: Vec<Duration> = (0..10).map(|i| ms(100 << i)).collect();
        expected.extend([Duration::from_secs(60); 3]);
        for (crash, backoff) in (1..).zip(expected) {
            node.runtime.crash(&container, 3);
            node.until("a-0", |s| s.state == ReplicaState::Restarting as i32)
                .await;
            let status = node.status("a-0").unwrap();
            assert_eq!(status.last_exit_code, Some(3));
            assert!(!status.ready);
            let waited = node.until("a-0", running).await;
            assert!(
                waited >= backoff && waited <= backoff + ms(20),
                "crash {crash}: restarted after {waited:?}, backoff {backoff:?}"
            );
            assert_eq!(node.status("a-0").unwrap().restarts, crash);
        }
        // Ten minutes of running resets it: the next crash restarts after 100 ms again. Less
        // than ten minutes does not: a crash after 9 minutes waits 200 ms.
        for (running_for, backoff) in [
            (RESTART_BACKOFF_RESET, ms(100)),
            (Duration::from_secs(540), ms(200)),
        ] {
            tokio::time::sleep(running_for).await;
            node.runtime.crash(&container, 3);
            node.until("a-0", |s| s.state == ReplicaState::Restarting as i32)
                .await;
            let waited = node.until("a-0", running).await;
            assert!(
                waited >= backoff && waited <= backoff + ms(20),
                "after {running_for:?} of running: restarted after {waited:?}, backoff {backoff:?}"
            );
        }
        // The same container is started again, not replaced.
        assert_eq!(node.runtime.counts(), (1, 16));
        node.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_restart_policy_of_never_leaves_a_crashed_replica_failed() {
        let mut a = assignment("a-0", false);
        a.spec.as_mut().unwrap().restart = Some(berth_proto::v1::RestartSettings {
            policy: RestartPolicy::Never as i32,
            ..Default::default()
        });
        let node = Node::start(MemoryRuntime::default(), vec![a]).await;
        node.until("a-0", running).await;
        let container = node.status("a-0").unwrap().container_id;
        node.runtime.crash(&container, 1);
        node.until("a-0", |s| s.state == ReplicaState::Failed as i32)
            .await;
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert_eq!(
            node.status("a-0").unwrap().state,
            ReplicaState::Failed as i32
        );
        assert_eq!(node.runtime.counts(), (1, 1));
        node.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn failing_health_checks_restart_the_container_after_the_retries() {
        let node = Node::start(MemoryRuntime::default(), vec![assignment("a-0", true)]).await;
        node.until("a-0", |s| s.ready).await;
        let container = node.status("a-0").unwrap().container_id;
        let started = node.status("a-0").unwrap().started_at;
        node.runtime.set_healthy(&container, false);
        let waited = node
            .until("a-0", |s| s.restarts == 1 && s.started_at != started)
            .await;
        // Three failures in a row, one probe interval (10 s) apart.
        assert!(
            waited > Duration::from_secs(20) && waited <= Duration::from_secs(31),
            "restarted after {waited:?}"
        );
        assert_eq!(node.runtime.counts(), (1, 2));
        node.runtime.set_healthy(&container, true);
        node.until("a-0", |s| {
            s.ready && s.health == HealthState::Healthy as i32
        })
        .await;
        assert_eq!(node.status("a-0").unwrap().restarts, 1);
        node.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn its_own_containers_are_adopted_and_unassigned_ones_removed() {
        let runtime = MemoryRuntime::default();
        let spec = assignment("a-0", false).spec.unwrap();
        let left = |id: &str, replica: &str| ContainerInfo {
            id: id.into(),
            replica: replica.into(),
            agent: "a".into(),
            generation: 1,
            digest: container_digest(&spec),
            running: true,
            ip: "10.0.0.9".into(),
            ..Default::default()
        };
        runtime.existing(left("kept", "a-0"));
        runtime.existing(left("stray", "a-9"));
        let node = Node::start(runtime.clone(), vec![assignment("a-0", false)]).await;
        node.until("a-0", |s| running(s) && s.ready).await;
        let status = node.status("a-0").unwrap();
        assert_eq!(status.container_id, "kept");
        assert_eq!(status.address, "10.0.0.9:8080");
        // Nothing created or started: the running container was adopted as it is.
        assert_eq!(runtime.counts(), (0, 0));
        let left = runtime.ids();
        assert_eq!(left, ["kept"]);
        node.stop().await;
        // Stopping the supervisor leaves the container running.
        assert!(runtime.inspect("kept").await.unwrap().running);
    }
}
