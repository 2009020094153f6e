//! Server-side defaults (docs/architecture.md, "Timing defaults").
//! They fill unset fields on create and update, so a spec read back shows effective values.

use crate::time::pb_duration;
use crate::v1::{
    AgentSpec, AutoscaleSettings, BreakerSettings, HealthCheck, ReplaySettings, Resources,
    RestartPolicy, RestartSettings,
};
use std::time::Duration;

/// Port the agent listens on when the spec names none.
pub const PORT: u32 = 8080;
/// Replicas when the spec names none.
pub const REPLICAS: u32 = 1;
/// Time between health probes.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(10);
/// Time a health probe may take.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// Consecutive failed probes that restart a replica.
pub const HEALTH_RETRIES: u32 = 3;
/// Grace period after start during which failed probes do not count.
pub const HEALTH_START_PERIOD: Duration = Duration::ZERO;
/// Longest wait between restarts of a crashing container (it starts at 1 s and doubles).
pub const RESTART_MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Time between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// Time the gateway waits for an agent's response.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request body buffered for replay.
pub const REPLAY_MAX_BODY_BYTES: u64 = 1024 * 1024;
/// Most requests queued per agent.
pub const REPLAY_MAX_QUEUED: u32 = 10_000;
/// Most bytes queued per agent.
pub const REPLAY_MAX_QUEUED_BYTES: u64 = 256 * 1024 * 1024;
/// How long queued requests and stored responses are kept.
pub const REPLAY_TTL: Duration = Duration::from_secs(24 * 3600);
/// Deliveries tried before a request is dead-lettered.
pub const REPLAY_MAX_ATTEMPTS: u32 = 10;
/// Requests replayed at once per agent, started oldest first (1 delivers strictly in order).
pub const REPLAY_CONCURRENCY: u32 = 4;
/// Fewest replicas of an autoscaled agent.
pub const AUTOSCALE_MIN: u32 = 1;
/// Most replicas of an autoscaled agent (raised to `min` when that is more).
pub const AUTOSCALE_MAX: u32 = 10;
/// Requests in flight or queued that one replica of an autoscaled agent is meant to carry.
pub const AUTOSCALE_TARGET_CONCURRENCY: u32 = 10;
/// Time without requests before an agent with `autoscale.min` 0 goes to zero.
pub const SCALE_TO_ZERO_AFTER: Duration = Duration::from_secs(300);
/// Consecutive failures that open a replica's breaker.
pub const BREAKER_CONSECUTIVE_FAILURES: u32 = 5;
/// First open period of a breaker.
pub const BREAKER_BASE_PENALTY: Duration = Duration::from_secs(1);
/// Longest open period of a breaker.
pub const BREAKER_MAX_PENALTY: Duration = Duration::from_secs(60);
/// Timeout of a breaker's probe request.
pub const BREAKER_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Fills every unset field of `spec` with its default.
pub fn apply(spec: &mut AgentSpec) {
    if spec.port == 0 {
        spec.port = PORT;
    }
    spec.replicas.get_or_insert(REPLICAS);
    spec.resources.get_or_insert_with(Resources::default);
    if let Some(health) = spec.health.as_mut() {
        fill_health(health);
    }
    let restart = spec.restart.get_or_insert_with(RestartSettings::default);
    if restart.policy == RestartPolicy::Unspecified as i32 {
        restart.policy = RestartPolicy::Always as i32;
    }
    restart
        .max_backoff
        .get_or_insert(pb_duration(RESTART_MAX_BACKOFF));
    spec.stop_grace.get_or_insert(pb_duration(STOP_GRACE));
    spec.request_timeout
        .get_or_insert(pb_duration(REQUEST_TIMEOUT));
    fill_replay(spec.replay.get_or_insert_with(ReplaySettings::default));
    fill_breaker(spec.breaker.get_or_insert_with(BreakerSettings::default));
    if let Some(autoscale) = spec.autoscale.as_mut() {
        fill_autoscale(autoscale);
        // The autoscaler owns the count; one given is kept within the bounds.
        let replicas = spec.replicas.get_or_insert(autoscale.initial());
        *replicas = autoscale.clamp(*replicas);
    }
}

fn fill_autoscale(autoscale: &mut AutoscaleSettings) {
    let min = *autoscale.min.get_or_insert(AUTOSCALE_MIN);
    set_if_zero(&mut autoscale.max, AUTOSCALE_MAX.max(min));
    set_if_zero(
        &mut autoscale.target_concurrency,
        AUTOSCALE_TARGET_CONCURRENCY,
    );
    autoscale
        .scale_to_zero_after
        .get_or_insert(pb_duration(SCALE_TO_ZERO_AFTER));
}

impl AutoscaleSettings {
    /// Its fewest replicas.
    pub fn fewest(&self) -> u32 {
        self.min.unwrap_or(AUTOSCALE_MIN)
    }

    /// `replicas` within `[min, max]`.
    pub fn clamp(&self, replicas: u32) -> u32 {
        replicas.min(self.max.max(self.fewest())).max(self.fewest())
    }

    /// The replicas an agent starts with: `min`, or one when that is 0 (an agent deployed
    /// to scale to zero starts with a replica, and goes idle once unused).
    pub fn initial(&self) -> u32 {
        self.clamp(self.fewest().max(1))
    }
}

fn fill_health(health: &mut HealthCheck) {
    let interval = *health.interval.get_or_insert(pb_duration(HEALTH_INTERVAL));
    // A probe may not outlast its interval, so a short interval shortens the default timeout.
    let interval_std = crate::time::std_duration(&interval).unwrap_or(HEALTH_INTERVAL);
    health
        .timeout
        .get_or_insert(pb_duration(HEALTH_TIMEOUT.min(interval_std)));
    if health.retries == 0 {
        health.retries = HEALTH_RETRIES;
    }
    health
        .start_period
        .get_or_insert(pb_duration(HEALTH_START_PERIOD));
}

fn fill_replay(replay: &mut ReplaySettings) {
    set_if_zero(&mut replay.max_body_bytes, REPLAY_MAX_BODY_BYTES);
    set_if_zero(&mut replay.max_queued, REPLAY_MAX_QUEUED);
    set_if_zero(&mut replay.max_queued_bytes, REPLAY_MAX_QUEUED_BYTES);
    replay.ttl.get_or_insert(pb_duration(REPLAY_TTL));
    set_if_zero(&mut replay.max_attempts, REPLAY_MAX_ATTEMPTS);
    set_if_zero(&mut replay.concurrency, REPLAY_CONCURRENCY);
}

fn fill_breaker(breaker: &mut BreakerSettings) {
    set_if_zero(
        &mut breaker.consecutive_failures,
        BREAKER_CONSECUTIVE_FAILURES,
    );
    breaker
        .base_penalty
        .get_or_insert(pb_duration(BREAKER_BASE_PENALTY));
    breaker
        .max_penalty
        .get_or_insert(pb_duration(BREAKER_MAX_PENALTY));
    breaker
        .probe_timeout
        .get_or_insert(pb_duration(BREAKER_PROBE_TIMEOUT));
}

fn set_if_zero<T: Default + PartialEq>(field: &mut T, default: T) {
    if *field == T::default() {
        *field = default;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_unset_fields_and_keeps_set_ones() {
        let mut spec = AgentSpec {
            port: 9000,
            replicas: Some(0),
            health: Some(HealthCheck {
                path: "/health".into(),
                retries: 7,
                ..Default::default()
            }),
            ..Default::default()
        };
        apply(&mut spec);
        assert_eq!(spec.port, 9000);
        assert_eq!(spec.replicas, Some(0), "0 replicas is a choice, not unset");
        let health = spec.health.unwrap();
        assert_eq!(health.retries, 7);
        assert_eq!(health.interval, Some(pb_duration(HEALTH_INTERVAL)));
        assert_eq!(spec.restart.unwrap().policy, RestartPolicy::Always as i32);
        assert_eq!(spec.replay.unwrap().max_attempts, REPLAY_MAX_ATTEMPTS);
    }

    #[test]
    fn leaves_health_unset_when_absent() {
        let mut spec = AgentSpec::default();
        apply(&mut spec);
        assert!(spec.health.is_none());
        assert_eq!(spec.port, PORT);
        assert_eq!(spec.replicas, Some(REPLICAS));
    }
}
