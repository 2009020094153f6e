//! The gate in front of an agent: this replayer's claimed deliveries reach it at most its
//! limit at once (the agent's replay concurrency, less what other gateways' claims hold),
//! oldest first. A replayer may claim an agent's next requests while the ones before
//! them are still at the agent (claiming ahead), so that a delivery slot that frees starts
//! its next request at once instead of waiting on etcd for the claim; the gate keeps what
//! reaches the agent to its replay concurrency and to first-in, first-started order.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// How long a request claimed ahead may wait at the gate. Its attempt's deadline counts this
/// wait, so that a takeover after a crash waits for it too; one not let through in time (the
/// caller's `until`: this and the claim's own time) gives its claim back unsent.
pub const HOLD: Duration = Duration::from_secs(1);
/// An agent's requests are claimed ahead only while its deliveries take less than this on
/// average: then a claim's wait on etcd is a large share of a delivery slot's time, and a
/// request claimed ahead is let through well within [`HOLD`].
pub const AHEAD_BELOW: Duration = Duration::from_millis(250);
/// Weight of the latest delivery in the mean time of an agent's deliveries.
const WEIGHT: f64 = 0.2;

/// One agent's gate.
#[derive(Debug)]
pub struct Gate {
    state: Mutex<State>,
    changed: Notify,
}

#[derive(Debug)]
struct State {
    /// The requests (by position) this replayer delivers that have not reached the agent yet.
    waiting: BTreeSet<u64>,
    /// This replayer's deliveries at the agent now.
    running: usize,
    /// How many of them may be at the agent at once.
    limit: usize,
    /// No request waiting at the gate goes through before this (the agent failed).
    closed_until: Option<Instant>,
    /// Mean time of a delivery at the agent, once one has been timed.
    mean: Option<Duration>,
}

impl State {
    /// Whether the gate is closed now after a failure of the agent.
    fn closed(&self) -> bool {
        self.closed_until.is_some_and(|t| t > Instant::now())
    }
}

/// Why a request did not go through the gate.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// It waited as long as it may (the deliveries ahead of it took long).
    TimedOut,
    /// The agent failed meanwhile: its deliveries wait for its backoff.
    Closed,
}

impl Gate {
    /// A gate that lets `limit` through at once.
    pub fn new(limit: usize) -> Self {
        Self {
            state: Mutex::new(State {
                waiting: BTreeSet::new(),
                running: 0,
                limit,
                closed_until: None,
                mean: None,
            }),
            changed: Notify::new(),
        }
    }

    /// Sets how many of this replayer's deliveries may be at the agent at once: the agent's
    /// replay concurrency less the claims that other gateways (or an earlier life of this one)
    /// hold on it, whose deliveries may run at the agent.
    pub fn set_limit(&self, limit: usize) {
        let mut state = self.state.lock().expect("gate lock");
        let raised = limit > state.limit;
        state.limit = limit;
        drop(state);
        if raised {
            self.changed.notify_waiters();
        }
    }

    /// Whether to claim the agent's requests ahead: its deliveries are timed, and short.
    pub fn ahead(&self) -> bool {
        let state = self.state.lock().expect("gate lock");
        state.mean.is_some_and(|mean| mean < AHEAD_BELOW)
    }

    /// Holds the place of the request at `seq` in the line, from before its claim: requests
    /// go through oldest first. The place is given up when the ticket is dropped.
    pub fn line_up(self: &Arc<Self>, seq: u64) -> Ticket {
        self.state.lock().expect("gate lock").waiting.insert(seq);
        Ticket {
            gate: self.clone(),
            seq,
            waiting: true,
        }
    }

    /// Whether the gate is closed after a failure of the agent.
    pub fn closed(&self) -> bool {
        self.state.lock().expect("gate lock").closed()
    }

    /// Opens the gate closed after a failure (a replica became ready, or left).
    pub fn reopen(&self) {
        self.state.lock().expect("gate lock").closed_until = None;
    }

    /// Whether nothing waits at the gate or goes through it.
    pub fn idle(&self) -> bool {
        let state = self.state.lock().expect("gate lock");
        state.waiting.is_empty() && state.running == 0
    }
}

/// A request's place in the line at its agent's gate.
#[derive(Debug)]
pub struct Ticket {
    gate: Arc<Gate>,
    seq: u64,
    waiting: bool,
}

impl Ticket {
    /// The position of the request in its agent's queue.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Waits, until `until` at the latest, for this request to be the oldest waiting with
    /// fewer than the gate's limit at the agent; then it is at the agent until the returned
    /// [`Running`] ends. Past `until` (a paused process resumed, say), never.
    pub async fn pass(mut self, until: Instant) -> Result<Running, Refused> {
        loop {
            let changed = self.gate.changed.notified();
            tokio::pin!(changed);
            // Registered before the state is read: a change made after the read wakes it.
            changed.as_mut().enable();
            {
                // Checked before all else: a gateway paused (SIGSTOP) while this request waited
                // finds its time over when it resumes, and sends nothing that another gateway
                // may have taken over meanwhile.
                if Instant::now() >= until {
                    return Err(Refused::TimedOut);
                }
                let mut state = self.gate.state.lock().expect("gate lock");
                if state.closed() {
                    return Err(Refused::Closed);
                }
                let first = state.waiting.first() == Some(&self.seq);
                if first && state.running < state.limit {
                    state.waiting.remove(&self.seq);
                    state.running += 1;
                    self.waiting = false;
                    drop(state);
                    // The next in line may go too.
                    self.gate.changed.notify_waiters();
                    return Ok(Running {
                        gate: self.gate.clone(),
                        since: Instant::now(),
                    });
                }
            }
            if tokio::time::timeout_at(until, changed).await.is_err() {
                return Err(Refused::TimedOut);
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.waiting {
            self.gate
                .state
                .lock()
                .expect("gate lock")
                .waiting
                .remove(&self.seq);
            self.gate.changed.notify_waiters();
        }
    }
}

/// A delivery at the agent: it holds one of the agent's replay slots until dropped.
#[derive(Debug)]
pub struct Running {
    gate: Arc<Gate>,
    since: Instant,
}

impl Running {
    /// The delivery is over at the agent: the time it took counts in the mean that
    /// [`Gate::ahead`] reads, and its slot is free. After a failure, `backoff` closes the gate
    /// for that long.
    pub fn end(self, backoff: Option<Duration>) {
        let took = self.since.elapsed();
        let mut state = self.gate.state.lock().expect("gate lock");
        state.mean = Some(match state.mean {
            Some(mean) => mean.mul_f64(1.0 - WEIGHT) + took.mul_f64(WEIGHT),
            None => took,
        });
        if let Some(backoff) = backoff {
            let until = Instant::now() + backoff;
            state.closed_until = Some(state.closed_until.map_or(until, |t| t.max(until)));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.gate.state.lock().expect("gate lock").running -= 1;
        self.gate.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn soon() -> Instant {
        Instant::now() + HOLD
    }

    #[tokio::test(start_paused = true)]
    async fn requests_go_through_oldest_first_and_at_most_the_limit_at_once() {
        let gate = Arc::new(Gate::new(2));
        let (t3, t1, t2) = (gate.line_up(3), gate.line_up(1), gate.line_up(2));
        // The third is not let through before the first, though it asks first.
        let third = tokio::spawn(t3.pass(soon()));
        tokio::task::yield_now().await;
        assert!(!third.is_finished());
        let first = t1.pass(soon()).await.unwrap();
        let second = t2.pass(soon()).await.unwrap();
        // Two at the agent: the third waits for a slot.
        tokio::task::yield_now().await;
        assert!(!third.is_finished());
        drop(first);
        let third = third.await.unwrap().unwrap();
        drop((second, third));
        assert!(gate.idle());
    }

    #[tokio::test(start_paused = true)]
    async fn what_other_gateways_hold_at_the_agent_lowers_the_limit() {
        let gate = Arc::new(Gate::new(2));
        let first = gate.line_up(1).pass(soon()).await.unwrap();
        // Another gateway's claim appears: one slot of two is its.
        gate.set_limit(1);
        let second = tokio::spawn(gate.line_up(2).pass(soon()));
        tokio::task::yield_now().await;
        assert!(!second.is_finished());
        // It is gone: the second goes at once, beside the first.
        gate.set_limit(2);
        let second = second.await.unwrap().unwrap();
        drop((first, second));
    }

    #[tokio::test(start_paused = true)]
    async fn a_place_given_up_lets_the_next_through() {
        let gate = Arc::new(Gate::new(4));
        let (t1, t2) = (gate.line_up(1), gate.line_up(2));
        let second = tokio::spawn(t2.pass(soon()));
        tokio::task::yield_now().await;
        assert!(!second.is_finished());
        drop(t1); // its claim failed
        assert!(second.await.unwrap().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_not_let_through_within_the_hold_is_refused() {
        let gate = Arc::new(Gate::new(1));
        let running = gate.line_up(1).pass(soon()).await.unwrap();
        let started = Instant::now();
        assert_eq!(
            gate.line_up(2).pass(soon()).await.unwrap_err(),
            Refused::TimedOut
        );
        assert_eq!(started.elapsed(), HOLD);
        drop(running);
        assert!(gate.idle());
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_whose_time_passed_before_it_asked_is_refused_though_a_slot_is_free() {
        let gate = Arc::new(Gate::new(1));
        let ticket = gate.line_up(1);
        let until = soon();
        // The process stood still (SIGSTOP) between the claim and the gate.
        tokio::time::advance(HOLD).await;
        assert_eq!(ticket.pass(until).await.unwrap_err(), Refused::TimedOut);
        assert!(gate.idle());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_agent_closes_the_gate_to_what_waits() {
        let gate = Arc::new(Gate::new(1));
        let running = gate.line_up(1).pass(soon()).await.unwrap();
        let waiting = tokio::spawn(gate.line_up(2).pass(soon()));
        tokio::task::yield_now().await;
        running.end(Some(Duration::from_secs(5)));
        assert_eq!(waiting.await.unwrap().unwrap_err(), Refused::Closed);
        assert!(gate.closed());
        gate.reopen();
        assert!(!gate.closed());
        let running = gate.line_up(3).pass(soon()).await.unwrap();
        running.end(Some(Duration::from_secs(5)));
        assert!(gate.closed());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(!gate.closed());
        assert!(gate.line_up(4).pass(soon()).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn only_agents_whose_deliveries_are_short_are_claimed_ahead() {
        let gate = Arc::new(Gate::new(1));
        assert!(!gate.ahead(), "not before a delivery has been timed");
        let running = gate.line_up(1).pass(soon()).await.unwrap();
        tokio::time::advance(Duration::from_millis(20)).await;
        running.end(None);
        assert!(gate.ahead());
        for seq in 2..40 {
            let running = gate.line_up(seq).pass(soon()).await.unwrap();
            tokio::time::advance(Duration::from_secs(2)).await;
            running.end(None);
        }
        assert!(!gate.ahead());
    }
}
