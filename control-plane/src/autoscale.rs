//! The autoscaler (run by the leader), in the manner of Knative's KPA (docs/architecture.md,
//! "Autoscaling"). Every gateway reports, for each autoscaled agent, its requests in flight,
//! held and queued (`load/{agent}/{gateway}`). Each second the leader samples each agent's
//! concurrency (in flight everywhere, plus its queue) and averages it over a stable window (60s
//! by default) and a panic window (a tenth of it). It asks for `ceil(average / target)`
//! replicas within `[min, max]` by writing the agent's `replicas`, which the scheduler places:
//!
//! - stable mode follows the stable average, so a steady load gives a steady count and a load
//!   that stops is scaled down only once it has left the window;
//! - panic mode starts when the panic average asks for at least twice the current replicas;
//!   it scales up on the panic average at once and never down, until a stable window has
//!   passed without a new panic;
//! - an agent with `min` 0 goes to zero (Idle) after `scale_to_zero_after` without requests;
//!   a report of demand for an idle agent wakes it at once, without waiting for the next
//!   sample.

use crate::metrics::Metrics;
use berth_proto::v1::{
    Agent, AutoscaleSettings, AutoscaleStatus, Event, EventSeverity, GatewayLoad,
};
use berth_store::watch::{list_watch, Change};
use berth_store::Store;
use prost::Message;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Time between samples.
pub const TICK: Duration = Duration::from_secs(1);
/// The panic window's share of the stable window (Knative's `panic-window-percentage`).
pub const PANIC_WINDOW_SHARE: u32 = 10;
/// Panic starts when the panic window asks for this many times the current replicas.
pub const PANIC_THRESHOLD: f64 = 2.0;

/// One agent's load as all gateways report it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Demand {
    /// Concurrency: requests in flight at every gateway, plus its queue (which holds the
    /// requests held for a wake).
    pub concurrency: f64,
    /// Whether a request arrived since the last sample (or one is in flight or queued).
    pub active: bool,
}

/// What the autoscaler asks for, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// Replicas.
    pub desired: u32,
    /// Why, for humans.
    pub reason: String,
    /// Concurrency averaged over the stable window.
    pub stable: f64,
    /// Concurrency averaged over the panic window.
    pub panic_average: f64,
    /// In panic mode.
    pub panic: bool,
}

/// One agent's samples and modes.
#[derive(Debug)]
pub struct Scaler {
    window: Duration,
    samples: VecDeque<(Instant, f64)>,
    panic_until: Option<Instant>,
    /// When a request was last seen; `None` when none was seen since the scaler was made.
    last_active: Option<Instant>,
    made: Instant,
}

impl Scaler {
    /// A scaler with stable window `window`, made at `now`.
    pub fn new(window: Duration, now: Instant) -> Self {
        Self {
            window,
            samples: VecDeque::new(),
            panic_until: None,
            last_active: None,
            made: now,
        }
    }

    fn panic_window(&self) -> Duration {
        (self.window / PANIC_WINDOW_SHARE).max(TICK)
    }

    /// Records `demand` at `now`.
    pub fn observe(&mut self, now: Instant, demand: Demand) {
        self.samples.push_back((now, demand.concurrency));
        while let Some(&(at, _)) = self.samples.front() {
            if now.duration_since(at) < self.window {
                break;
            }
            self.samples.pop_front();
        }
        if demand.active || demand.concurrency > 0.0 {
            self.last_active = Some(now);
        }
    }

    fn average(&self, now: Instant, window: Duration) -> f64 {
        let recent: Vec<f64> = self
            .samples
            .iter()
            .filter(|(at, _)| now.duration_since(*at) < window)
            .map(|(_, c)| *c)
            .collect();
        if recent.is_empty() {
            return 0.0;
        }
        recent.iter().sum::<f64>() / recent.len() as f64
    }

    /// The replicas to run at `now` for `settings`, with `current` replicas asked for now.
    pub fn decide(&mut self, now: Instant, settings: &AutoscaleSettings, current: u32) -> Decision {
        let target = f64::from(settings.target_concurrency.max(1));
        let stable = self.average(now, self.window);
        let panic_average = self.average(now, self.panic_window());
        let want = |average: f64| (average / target).ceil() as u32;
        let (stable_want, panic_want) = (want(stable), want(panic_average));
        if current > 0
            && panic_want > current
            && f64::from(panic_want) >= PANIC_THRESHOLD * f64::from(current)
        {
            self.panic_until = Some(now + self.window);
        }
        let panic = self.panic_until.is_some_and(|until| now < until);
        if !panic {
            self.panic_until = None;
        }
        let min = settings.fewest();
        let max = settings.max.max(min).max(1);
        let quiet_for = now.duration_since(self.last_active.unwrap_or(self.made));
        let after = settings
            .scale_to_zero_after
            .as_ref()
            .and_then(berth_proto::time::std_duration)
            .unwrap_or(berth_proto::defaults::SCALE_TO_ZERO_AFTER);
        // Idle: nothing seen for `after`; an agent found idle (at zero, nothing seen since)
        // stays so.
        let idle = min == 0 && (quiet_for >= after || (current == 0 && self.last_active.is_none()));
        let decision = |desired: u32, reason: String| Decision {
            desired,
            reason,
            stable,
            panic_average,
            panic,
        };
        if idle {
            return decision(
                0,
                format!("no requests for {}", humantime::format_duration(after)),
            );
        }
        let (wanted, reason) = if current == 0 {
            (
                panic_want.max(1),
                format!("woken: concurrency {panic_average:.1}, target {target}"),
            )
        } else if panic {
            (
                panic_want.max(current),
                format!(
                    "panic: concurrency {panic_average:.1} over {}, target {target}",
                    humantime::format_duration(self.panic_window())
                ),
            )
        } else {
            (
                stable_want,
                format!(
                    "stable: concurrency {stable:.1} over {}, target {target}",
                    humantime::format_duration(self.window)
                ),
            )
        };
        let desired = wanted.clamp(min.max(1), max);
        let reason = match desired.cmp(&wanted) {
            std::cmp::Ordering::Less => format!("{reason}; at most {max}"),
            std::cmp::Ordering::Greater if min > 0 => format!("{reason}; at least {min}"),
            _ => reason,
        };
        decision(desired, reason)
    }
}

/// The event a change from `from` to `to` replicas records.
pub fn event_reason(from: u32, to: u32) -> &'static str {
    match (from, to) {
        (0, _) => "Woken",
        (_, 0) => "ScaledToZero",
        (from, to) if to > from => "ScaledUp",
        _ => "ScaledDown",
    }
}

/// The demand every gateway reports for each agent, and what was last seen of each.
#[derive(Debug, Default)]
struct Loads {
    reports: HashMap<String, HashMap<String, GatewayLoad>>,
    /// Requests received per (agent, gateway) at the last sample.
    sampled: HashMap<(String, String), u64>,
}

impl Loads {
    /// The demand of `agent`; with `sample`, remembers what was received, so that the next
    /// sample sees only new requests.
    fn demand(&mut self, agent: &str, sample: bool) -> Demand {
        let Some(reports) = self.reports.get(agent) else {
            return Demand::default();
        };
        let in_flight: u32 = reports.values().map(|r| r.in_flight).sum();
        let held: u32 = reports.values().map(|r| r.held).sum();
        let queued = reports.values().map(|r| r.queued).max().unwrap_or(0);
        let mut arrived = false;
        for (gateway, report) in reports {
            let key = (agent.to_string(), gateway.clone());
            let seen = self.sampled.get(&key).copied();
            // A gateway first seen tells only where its count starts (it counts since it
            // started, and a new leader must not take that for new requests); a restarted
            // one's count went back, which is a change too.
            arrived |= seen.is_some_and(|seen| report.received != seen);
            if sample {
                self.sampled.insert(key, report.received);
            }
        }
        let concurrency = f64::from(in_flight) + f64::from(queued.max(held));
        Demand {
            concurrency,
            active: arrived || concurrency > 0.0,
        }
    }
}

/// Runs until `stop` is cancelled.
pub async fn run(store: Store, window: Duration, metrics: Arc<Metrics>, stop: CancellationToken) {
    let mut load_changes = list_watch(&store, store.keys().loads());
    let mut agent_changes = list_watch(&store, store.keys().agents());
    let mut agents: HashMap<String, Agent> = HashMap::new();
    let mut loads = Loads::default();
    let mut scalers: HashMap<String, Scaler> = HashMap::new();
    // What was last recorded of each agent (from the previous leader too, so that an idle
    // agent keeps its `idle_since`).
    let mut written: HashMap<String, AutoscaleStatus> = match store.list_agents().await {
        Ok((list, _)) => list
            .into_iter()
            .filter_map(|a| {
                let name = a.spec.as_ref()?.name.clone();
                Some((name, a.status?.autoscale?))
            })
            .collect(),
        Err(_) => HashMap::new(),
    };
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let woken = tokio::select! {
            _ = stop.cancelled() => return,
            change = agent_changes.next() => {
                match change {
                    Change::Init => agents.clear(),
                    Change::InitApply(kv) | Change::Put(kv) => {
                        if let Ok(agent) = Agent::decode(kv.value()) {
                            let name = agent.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default();
                            agents.insert(name, agent);
                        }
                    }
                    Change::Delete(kv) => {
                        let name = berth_store::keys::Keys::last_segment(kv.key());
                        agents.remove(&name);
                        scalers.remove(&name);
                        written.remove(&name);
                        metrics.forget_autoscaled(&name);
                    }
                    Change::InitDone { .. } => {}
                }
                continue;
            }
            change = load_changes.next() => {
                match change {
                    Change::Init => {
                        loads.reports.clear();
                        None
                    }
                    Change::InitApply(kv) | Change::Put(kv) => {
                        if let (Some((agent, gateway)), Ok(load)) =
                            (store.load_of(kv.key()), GatewayLoad::decode(kv.value()))
                        {
                            loads.reports.entry(agent.clone()).or_default().insert(gateway, load);
                            // Demand for an agent at zero wakes it now, not at the next sample.
                            let at_zero = agents.get(&agent).is_some_and(|a| a.desired_replicas() == 0);
                            if at_zero && loads.demand(&agent, false).active {
                                Some(agent)
                            } else {
                                None
                            }
                        } else {
                            None
                        }
                    }
                    Change::Delete(kv) => {
                        if let Some((agent, gateway)) = store.load_of(kv.key()) {
                            if let Some(reports) = loads.reports.get_mut(&agent) {
                                reports.remove(&gateway);
                            }
                        }
                        None
                    }
                    Change::InitDone { .. } => None,
                }
            }
            _ = tick.tick() => None,
        };
        let now = Instant::now();
        let names: Vec<String> = match &woken {
            Some(agent) => vec![agent.clone()],
            None => agents.keys().cloned().collect(),
        };
        for name in names {
            let Some(agent) = agents.get(&name) else {
                continue;
            };
            let Some(settings) = agent.spec.as_ref().and_then(|s| s.autoscale) else {
                if scalers.remove(&name).is_some() {
                    metrics.forget_autoscaled(&name);
                }
                continue;
            };
            if !agent.wants_running() {
                continue;
            }
            let current = agent.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            let scaler = scalers
                .entry(name.clone())
                .or_insert_with(|| Scaler::new(window, now));
            let demand = loads.demand(&name, woken.is_none());
            if woken.is_some() {
                // A wake is decided on the demand seen now; the next sample counts as usual.
                scaler.last_active = Some(now);
            } else {
                scaler.observe(now, demand);
            }
            let decision = scaler.decide(now, &settings, current);
            metrics.observe_autoscaled(&name, decision.desired, decision.stable);
            if decision.desired != current {
                let scaled = scale(&store, &name, current, &decision).await;
                if let Some(updated) = scaled {
                    agents.insert(name.clone(), updated);
                } else {
                    continue;
                }
            }
            let previous = written.get(&name);
            if previous.is_some_and(|p| {
                (p.desired_replicas, p.panic) == (decision.desired, decision.panic)
            }) {
                continue;
            }
            let changed = previous.is_none_or(|p| p.desired_replicas != decision.desired);
            let status = AutoscaleStatus {
                desired_replicas: decision.desired,
                reason: decision.reason.clone(),
                stable_concurrency: decision.stable,
                panic_concurrency: decision.panic_average,
                panic: decision.panic,
                idle_since: match (decision.desired, previous) {
                    (0, Some(p)) if !changed => p.idle_since,
                    (0, _) => Some(berth_proto::time::now()),
                    _ => None,
                },
                last_scale_time: match previous {
                    Some(p) if !changed => p.last_scale_time,
                    _ => Some(berth_proto::time::now()),
                },
            };
            match store.put_autoscale_status(&name, &status).await {
                Ok(()) => {
                    written.insert(name.clone(), status);
                }
                Err(e) => {
                    tracing::warn!(agent = %name, error = %e, "cannot record the autoscaler's status")
                }
            }
        }
    }
}

/// Writes `decision` as the agent's replicas (unless it changed meanwhile: no longer
/// autoscaled, or not running); the agent as written.
async fn scale(store: &Store, name: &str, current: u32, decision: &Decision) -> Option<Agent> {
    let reason = event_reason(current, decision.desired);
    let result = store
        .update_agent(name, None, |agent| {
            let running = agent.wants_running();
            let Some(spec) = agent.spec.as_mut().filter(|s| s.autoscale.is_some()) else {
                return Ok::<_, berth_store::StoreError>(None);
            };
            if !running || spec.replicas == Some(decision.desired) {
                return Ok(None);
            }
            let from = spec.replicas.unwrap_or(current);
            spec.replicas = Some(decision.desired);
            Ok(Some(Event {
                agent: name.to_string(),
                reason: reason.to_string(),
                message: format!(
                    "from {from} to {} replica(s): {}",
                    decision.desired, decision.reason
                ),
                severity: EventSeverity::Normal as i32,
                time: Some(berth_proto::time::now()),
                ..Default::default()
            }))
        })
        .await;
    match result {
        Ok(agent) => {
            tracing::info!(agent = %name, from = current, to = decision.desired, reason = %decision.reason, "{reason}");
            Some(agent)
        }
        Err(e) => {
            tracing::warn!(agent = %name, error = %e, "cannot scale");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(60);

    fn settings(min: u32, max: u32, target: u32, to_zero: Duration) -> AutoscaleSettings {
        AutoscaleSettings {
            min: Some(min),
            max,
            target_concurrency: target,
            scale_to_zero_after: Some(berth_proto::time::pb_duration(to_zero)),
        }
    }

    /// Samples `concurrency` each second for `seconds`, applying each decision as the leader
    /// does; every count asked for along the way.
    async fn run_for(
        scaler: &mut Scaler,
        settings: &AutoscaleSettings,
        current: &mut u32,
        seconds: u32,
        concurrency: f64,
    ) -> Vec<u32> {
        let mut counts = Vec::new();
        for _ in 0..seconds {
            tokio::time::advance(TICK).await;
            let now = Instant::now();
            scaler.observe(
                now,
                Demand {
                    concurrency,
                    active: concurrency > 0.0,
                },
            );
            *current = scaler.decide(now, settings, *current).desired;
            counts.push(*current);
        }
        counts
    }

    #[tokio::test(start_paused = true)]
    async fn a_steady_load_gives_a_steady_count_without_flapping() {
        let s = settings(1, 10, 10, Duration::from_secs(300));
        let mut scaler = Scaler::new(WINDOW, Instant::now());
        let mut current = 3;
        // 25 in flight at target 10: three replicas, every second for ten minutes.
        let counts = run_for(&mut scaler, &s, &mut current, 600, 25.0).await;
        assert!(counts.iter().all(|&c| c == 3), "{counts:?}");
        // A load that wobbles around the same mean does not move the count either.
        let mut wobble = Vec::new();
        for i in 0..600 {
            let load = if i % 2 == 0 { 22.0 } else { 28.0 };
            wobble.extend(run_for(&mut scaler, &s, &mut current, 1, load).await);
        }
        assert!(wobble.iter().all(|&c| c == 3), "{wobble:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_panics_up_within_seconds_and_scales_down_only_after_the_window() {
        let s = settings(1, 10, 10, Duration::from_secs(300));
        let mut scaler = Scaler::new(WINDOW, Instant::now());
        let mut current = 1;
        run_for(&mut scaler, &s, &mut current, 120, 5.0).await;
        assert_eq!(current, 1);
        // A burst to 80: the panic window (6 s) scales up from the first second, and reaches
        // the 8 replicas the burst needs once it fills the window.
        let burst = run_for(&mut scaler, &s, &mut current, 6, 80.0).await;
        assert!(burst[0] > 1, "{burst:?}");
        assert_eq!(*burst.last().unwrap(), 8, "{burst:?}");
        assert!(scaler.decide(Instant::now(), &s, current).panic);
        // The burst ends: in panic, never down, for a stable window after the last panic.
        let after = run_for(&mut scaler, &s, &mut current, 50, 0.0).await;
        assert!(after.iter().all(|&c| c == 8), "{after:?}");
        // Then the stable average (which still holds the burst) brings it down step by step,
        // to the minimum once the burst has left the window.
        let down = run_for(&mut scaler, &s, &mut current, 75, 0.0).await;
        assert_eq!(*down.last().unwrap(), 1, "{down:?}");
        assert!(down.windows(2).all(|w| w[1] <= w[0]), "{down:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_count_stays_within_min_and_max() {
        let s = settings(2, 4, 10, Duration::from_secs(1));
        let mut scaler = Scaler::new(WINDOW, Instant::now());
        let mut current = 2;
        let up = run_for(&mut scaler, &s, &mut current, 70, 1000.0).await;
        assert_eq!(*up.last().unwrap(), 4);
        assert!(up.iter().all(|&c| (2..=4).contains(&c)), "{up:?}");
        let d = scaler.decide(Instant::now(), &s, current);
        assert!(d.reason.contains("at most 4"), "{}", d.reason);
        let down = run_for(&mut scaler, &s, &mut current, 300, 0.0).await;
        assert!(
            down.iter().all(|&c| c >= 2),
            "min 2 is never left: {down:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn min_zero_goes_idle_after_the_quiet_time_and_a_request_wakes_it() {
        let to_zero = Duration::from_secs(300);
        let s = settings(0, 10, 10, to_zero);
        let mut scaler = Scaler::new(WINDOW, Instant::now());
        let mut current = 1;
        run_for(&mut scaler, &s, &mut current, 30, 2.0).await;
        // Quiet: one replica until 5 minutes have passed without a request, then zero.
        let quiet = run_for(&mut scaler, &s, &mut current, 299, 0.0).await;
        assert!(quiet.iter().all(|&c| c == 1), "{quiet:?}");
        let idle = run_for(&mut scaler, &s, &mut current, 2, 0.0).await;
        assert_eq!(idle, vec![0, 0]);
        let d = scaler.decide(Instant::now(), &s, 0);
        assert!(d.reason.contains("no requests for 5m"), "{}", d.reason);
        // It stays idle without requests...
        let still = run_for(&mut scaler, &s, &mut current, 600, 0.0).await;
        assert!(still.iter().all(|&c| c == 0));
        // ...and one request wakes it with the next decision.
        let woken = run_for(&mut scaler, &s, &mut current, 1, 1.0).await;
        assert_eq!(woken, vec![1]);
        assert_eq!(event_reason(0, 1), "Woken");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_only_arrived_keeps_the_agent_awake() {
        let to_zero = Duration::from_secs(10);
        let s = settings(0, 10, 10, to_zero);
        let mut scaler = Scaler::new(WINDOW, Instant::now());
        let mut current = 1;
        // A short request every 8 s is never in flight at a sample, but is seen arriving.
        for _ in 0..20 {
            run_for(&mut scaler, &s, &mut current, 7, 0.0).await;
            tokio::time::advance(TICK).await;
            let now = Instant::now();
            scaler.observe(
                now,
                Demand {
                    concurrency: 0.0,
                    active: true,
                },
            );
            current = scaler.decide(now, &s, current).desired;
            assert_eq!(current, 1);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn min_one_never_goes_to_zero_and_a_new_leader_leaves_an_idle_agent_idle() {
        let s = settings(1, 3, 10, Duration::from_secs(1));
        let mut scaler = Scaler::new(WINDOW, Instant::now());
        let mut current = 1;
        let counts = run_for(&mut scaler, &s, &mut current, 3600, 0.0).await;
        assert!(counts.iter().all(|&c| c == 1));
        // A leader that starts while an agent is idle keeps it idle until a request comes.
        let s = settings(0, 3, 10, Duration::from_secs(300));
        let mut scaler = Scaler::new(WINDOW, Instant::now());
        let mut current = 0;
        let counts = run_for(&mut scaler, &s, &mut current, 10, 0.0).await;
        assert!(counts.iter().all(|&c| c == 0), "{counts:?}");
    }

    #[test]
    fn demand_counts_in_flight_everywhere_and_the_queue_once() {
        let mut loads = Loads::default();
        let report = |in_flight, held, queued, received| GatewayLoad {
            in_flight,
            held,
            queued,
            received,
        };
        let reports = loads.reports.entry("a".into()).or_default();
        reports.insert("g1".into(), report(3, 2, 5, 10));
        reports.insert("g2".into(), report(4, 1, 4, 7));
        // In flight 3 + 4; the queue (5, as the gateway that sees most of it says) holds the
        // held requests, which are not counted again.
        let d = loads.demand("a", true);
        assert_eq!(d.concurrency, 12.0);
        // Held requests not yet seen in the queue count.
        loads
            .reports
            .get_mut("a")
            .unwrap()
            .get_mut("g1")
            .unwrap()
            .held = 9;
        assert_eq!(loads.demand("a", true).concurrency, 3.0 + 4.0 + 10.0);
        // Nothing in flight and nothing new: inactive.
        let reports = loads.reports.get_mut("a").unwrap();
        reports.insert("g1".into(), report(0, 0, 0, 10));
        reports.insert("g2".into(), report(0, 0, 0, 7));
        assert!(!loads.demand("a", true).active);
        // One more request received: active, though nothing is in flight now.
        loads
            .reports
            .get_mut("a")
            .unwrap()
            .get_mut("g2")
            .unwrap()
            .received = 8;
        assert!(loads.demand("a", true).active);
        assert!(!loads.demand("a", true).active);
        assert_eq!(loads.demand("b", true), Demand::default());
    }
}
