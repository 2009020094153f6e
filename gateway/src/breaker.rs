//! The per-replica circuit breaker (docs/architecture.md, "A request's path through the gateway"): it opens after
//! `failures_to_open` consecutive failures (default 5), stays open for a penalty that starts at
//! `penalty_min` (1 s) and doubles up to `penalty_max` (60 s), each less up to `JITTER` of
//! itself so that gateways do not probe in step, then lets exactly one probe through. The probe
//! has its own deadline, `probe_timeout` (5 s): a probe that never answers counts as a failure,
//! so the breaker can never stay half-open. A success closes it and resets the penalty. Outcomes that say nothing
//! about the replica's health (4xx, 501) are successes.

use berth_proto::defaults;
use berth_proto::v1::{BreakerSettings, BreakerState};
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Largest fraction taken off a penalty at random.
pub const JITTER: f64 = 0.2;

/// An agent's breaker settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker.
    pub failures_to_open: u32,
    /// First time open.
    pub penalty_min: Duration,
    /// Longest time open.
    pub penalty_max: Duration,
    /// How long a probe may take before it counts as failed.
    pub probe_timeout: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failures_to_open: defaults::BREAKER_CONSECUTIVE_FAILURES,
            penalty_min: defaults::BREAKER_BASE_PENALTY,
            penalty_max: defaults::BREAKER_MAX_PENALTY,
            probe_timeout: defaults::BREAKER_PROBE_TIMEOUT,
        }
    }
}

impl BreakerConfig {
    /// The spec's settings, defaults where unset.
    pub fn from_spec(settings: Option<&BreakerSettings>) -> Self {
        let d = Self::default();
        let Some(s) = settings else { return d };
        let dur = |p: Option<pbjson_types::Duration>, default: Duration| {
            p.map(|p| Duration::new(p.seconds.max(0) as u64, p.nanos.max(0) as u32))
                .filter(|p| !p.is_zero())
                .unwrap_or(default)
        };
        Self {
            failures_to_open: Some(s.consecutive_failures)
                .filter(|n| *n > 0)
                .unwrap_or(d.failures_to_open),
            penalty_min: dur(s.base_penalty, d.penalty_min),
            penalty_max: dur(s.max_penalty, d.penalty_max),
            probe_timeout: dur(s.probe_timeout, d.probe_timeout),
        }
    }
}

/// What a request learned about the replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The replica answered sensibly (2xx-4xx, 501).
    Success,
    /// Connect error, timeout, reset, or a 5xx other than 501.
    Failure,
}

impl From<crate::outcome::Ending> for Outcome {
    /// What an attempt's ending says about the replica ([`crate::outcome::Ending::replica_failed`]).
    fn from(ending: crate::outcome::Ending) -> Self {
        if ending.replica_failed() {
            Self::Failure
        } else {
            Self::Success
        }
    }
}

/// How a request got through the breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// The breaker is closed.
    Normal,
    /// The one probe of a half-open breaker; it must finish within the probe timeout.
    Probe,
}

/// A change of state, for metrics and for `berth get`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    /// The state before.
    pub from: BreakerState,
    /// The state after.
    pub to: BreakerState,
}

#[derive(Debug)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probe_deadline: Instant },
}

#[derive(Debug)]
struct Inner {
    state: State,
    /// The penalty the next opening will use (before jitter).
    next_penalty: Duration,
}

/// One replica's breaker. Cheap to consult on every request.
#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    inner: Mutex<Inner>,
    /// Returns a number in `[0, 1)`; injected so that tests can pin the jitter.
    random: fn() -> f64,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        Self::with_random(config, rand::random::<f64>)
    }

    /// A closed breaker whose jitter draws from `random` (`[0, 1)`).
    pub fn with_random(config: BreakerConfig, random: fn() -> f64) -> Self {
        Self {
            config,
            inner: Mutex::new(Inner {
                state: State::Closed { failures: 0 },
                next_penalty: config.penalty_min,
            }),
            random,
        }
    }

    /// The settings it was made with.
    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    /// The current state, as the API shows it.
    pub fn state(&self) -> BreakerState {
        let inner = self.inner.lock().expect("breaker lock");
        match inner.state {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Whether a request may go to the replica now, and how. An open breaker whose penalty is
    /// over admits one probe; a probe past its deadline reopens the breaker.
    pub fn admit(&self) -> (Option<Admission>, Option<Transition>) {
        let mut inner = self.inner.lock().expect("breaker lock");
        let now = Instant::now();
        match inner.state {
            State::Closed { .. } => (Some(Admission::Normal), None),
            State::Open { until } if now >= until => {
                inner.state = State::HalfOpen {
                    probe_deadline: now + self.config.probe_timeout,
                };
                (
                    Some(Admission::Probe),
                    Some(Transition {
                        from: BreakerState::Open,
                        to: BreakerState::HalfOpen,
                    }),
                )
            }
            State::Open { .. } => (None, None),
            State::HalfOpen { probe_deadline } if now >= probe_deadline => {
                // The probe never reported back: it failed.
                self.open(&mut inner, now);
                (
                    None,
                    Some(Transition {
                        from: BreakerState::HalfOpen,
                        to: BreakerState::Open,
                    }),
                )
            }
            State::HalfOpen { .. } => (None, None),
        }
    }

    /// Whether `admit` would let a request through now, without taking the probe.
    pub fn available(&self) -> bool {
        let inner = self.inner.lock().expect("breaker lock");
        match inner.state {
            State::Closed { .. } => true,
            State::Open { until } => Instant::now() >= until,
            State::HalfOpen { .. } => false,
        }
    }

    /// Records what a request admitted as `admission` learned.
    pub fn record(&self, admission: Admission, outcome: Outcome) -> Option<Transition> {
        let mut inner = self.inner.lock().expect("breaker lock");
        let now = Instant::now();
        match (&mut inner.state, admission, outcome) {
            (State::Closed { failures }, Admission::Normal, Outcome::Success) => {
                *failures = 0;
                None
            }
            (State::Closed { failures }, Admission::Normal, Outcome::Failure) => {
                *failures += 1;
                if *failures < self.config.failures_to_open {
                    return None;
                }
                self.open(&mut inner, now);
                Some(Transition {
                    from: BreakerState::Closed,
                    to: BreakerState::Open,
                })
            }
            (State::HalfOpen { .. }, Admission::Probe, Outcome::Success) => {
                inner.state = State::Closed { failures: 0 };
                inner.next_penalty = self.config.penalty_min;
                Some(Transition {
                    from: BreakerState::HalfOpen,
                    to: BreakerState::Closed,
                })
            }
            (State::HalfOpen { .. }, Admission::Probe, Outcome::Failure) => {
                self.open(&mut inner, now);
                Some(Transition {
                    from: BreakerState::HalfOpen,
                    to: BreakerState::Open,
                })
            }
            // A late answer of a request admitted before the breaker changed state (or of a
            // probe that already timed out): the state already moved on without it.
            _ => None,
        }
    }

    fn open(&self, inner: &mut Inner, now: Instant) {
        let penalty = inner.next_penalty;
        let jittered = penalty.mul_f64(1.0 - JITTER * (self.random)().clamp(0.0, 1.0));
        inner.state = State::Open {
            until: now + jittered,
        };
        inner.next_penalty = (penalty * 2).min(self.config.penalty_max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAILURES_TO_OPEN: u32 = defaults::BREAKER_CONSECUTIVE_FAILURES;
    const PENALTY_MIN: Duration = defaults::BREAKER_BASE_PENALTY;
    const PENALTY_MAX: Duration = defaults::BREAKER_MAX_PENALTY;
    const PROBE_TIMEOUT: Duration = defaults::BREAKER_PROBE_TIMEOUT;

    fn no_jitter() -> Breaker {
        Breaker::with_random(BreakerConfig::default(), || 0.0)
    }

    fn fail_until_open(b: &Breaker) {
        for i in 0..FAILURES_TO_OPEN {
            assert_eq!(b.admit().0, Some(Admission::Normal), "failure {i}");
            b.record(Admission::Normal, Outcome::Failure);
        }
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_five_consecutive_failures_only() {
        let b = no_jitter();
        for _ in 0..FAILURES_TO_OPEN - 1 {
            b.record(Admission::Normal, Outcome::Failure);
        }
        // A success in between resets the count.
        b.record(Admission::Normal, Outcome::Success);
        for _ in 0..FAILURES_TO_OPEN - 1 {
            assert_eq!(b.record(Admission::Normal, Outcome::Failure), None);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        let t = b.record(Admission::Normal, Outcome::Failure);
        assert_eq!(
            t,
            Some(Transition {
                from: BreakerState::Closed,
                to: BreakerState::Open
            })
        );
        assert_eq!(b.admit().0, None, "open refuses");
        assert!(!b.available());
    }

    #[tokio::test(start_paused = true)]
    async fn one_probe_after_the_penalty_and_success_closes() {
        let b = no_jitter();
        fail_until_open(&b);
        tokio::time::advance(PENALTY_MIN - Duration::from_millis(1)).await;
        assert_eq!(b.admit().0, None, "still in its penalty");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(b.available());
        assert_eq!(b.admit().0, Some(Admission::Probe));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.admit().0, None, "only one probe at a time");
        let t = b.record(Admission::Probe, Outcome::Success);
        assert_eq!(t.map(|t| t.to), Some(BreakerState::Closed));
        assert_eq!(b.admit().0, Some(Admission::Normal));
        // Closed again, the penalty starts over.
        fail_until_open(&b);
        tokio::time::advance(PENALTY_MIN).await;
        assert_eq!(b.admit().0, Some(Admission::Probe));
    }

    #[tokio::test(start_paused = true)]
    async fn penalty_doubles_up_to_the_maximum() {
        let b = no_jitter();
        fail_until_open(&b);
        let mut expected = PENALTY_MIN;
        for _ in 0..10 {
            tokio::time::advance(expected - Duration::from_millis(1)).await;
            assert_eq!(b.admit().0, None, "open for {expected:?}");
            tokio::time::advance(Duration::from_millis(1)).await;
            assert_eq!(b.admit().0, Some(Admission::Probe));
            b.record(Admission::Probe, Outcome::Failure);
            expected = (expected * 2).min(PENALTY_MAX);
        }
        assert_eq!(expected, PENALTY_MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_shortens_the_penalty_by_at_most_its_bound() {
        // The largest draw takes JITTER off; the penalty is never longer than without jitter.
        let b = Breaker::with_random(BreakerConfig::default(), || 0.999_999);
        fail_until_open(&b);
        let shortest = PENALTY_MIN.mul_f64(1.0 - JITTER);
        tokio::time::advance(shortest - Duration::from_millis(2)).await;
        assert_eq!(b.admit().0, None, "not shorter than {shortest:?}");
        tokio::time::advance(Duration::from_millis(3)).await;
        assert_eq!(b.admit().0, Some(Admission::Probe));
        // With real randomness every penalty lies in [(1 - JITTER) p, p].
        for _ in 0..50 {
            let b = Breaker::new(BreakerConfig::default());
            fail_until_open(&b);
            tokio::time::advance(shortest - Duration::from_millis(1)).await;
            assert!(!b.available());
            tokio::time::advance(PENALTY_MIN - shortest + Duration::from_millis(1)).await;
            assert!(b.available());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_never_answers_reopens_the_breaker() {
        let b = no_jitter();
        fail_until_open(&b);
        tokio::time::advance(PENALTY_MIN).await;
        assert_eq!(b.admit().0, Some(Admission::Probe));
        tokio::time::advance(PROBE_TIMEOUT).await;
        let (admitted, t) = b.admit();
        assert_eq!(admitted, None);
        assert_eq!(t.map(|t| t.to), Some(BreakerState::Open));
        // The timed-out probe counts as a failure: the next penalty is the doubled one.
        tokio::time::advance(PENALTY_MIN * 2 - Duration::from_millis(1)).await;
        assert_eq!(b.admit().0, None);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(b.admit().0, Some(Admission::Probe));
        // The old probe's late answer changes nothing.
        assert_eq!(b.state(), BreakerState::HalfOpen);
    }

    #[tokio::test(start_paused = true)]
    async fn client_errors_never_open_it() {
        let b = no_jitter();
        for status in [400, 401, 404, 409, 422, 429, 501] {
            let status = http::StatusCode::from_u16(status).unwrap();
            for _ in 0..FAILURES_TO_OPEN * 2 {
                b.record(
                    Admission::Normal,
                    Outcome::from(crate::outcome::Ending::of_status(status)),
                );
            }
        }
        assert_eq!(b.state(), BreakerState::Closed);
        for status in [500, 502, 503, 504] {
            assert_eq!(
                Outcome::from(crate::outcome::Ending::of_status(
                    http::StatusCode::from_u16(status).unwrap()
                )),
                Outcome::Failure
            );
        }
    }

    #[test]
    fn spec_settings_replace_the_defaults() {
        let settings = BreakerSettings {
            consecutive_failures: 2,
            base_penalty: Some(pbjson_types::Duration {
                seconds: 3,
                nanos: 0,
            }),
            ..Default::default()
        };
        let config = BreakerConfig::from_spec(Some(&settings));
        assert_eq!(config.failures_to_open, 2);
        assert_eq!(config.penalty_min, Duration::from_secs(3));
        assert_eq!(config.penalty_max, PENALTY_MAX);
        assert_eq!(BreakerConfig::from_spec(None), BreakerConfig::default());
    }

    #[tokio::test(start_paused = true)]
    async fn late_answers_from_before_opening_are_ignored() {
        let b = no_jitter();
        fail_until_open(&b);
        assert_eq!(b.record(Admission::Normal, Outcome::Success), None);
        assert_eq!(b.state(), BreakerState::Open);
    }
}
