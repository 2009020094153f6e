//! `--wait` of `berth deploy`, `apply`, `start`, `resume`, `restart` and `scale`: follows an agent until every replica of its
//! current generation is ready (Available), printing progress as it changes, and gives up
//! with the reason (and an exit code per reason) when Berth says it cannot get there.
//! `--wait` of `berth stop` and `pause` follows it until every replica has stopped (paused).

use crate::client::Client;
use berth_proto::v1::{Agent, GetAgentRequest, ReplicaState};
use std::time::{Duration, Instant};

/// How often the agent is read while waiting.
const POLL: Duration = Duration::from_millis(250);
/// How long an agent must stay available, with no replica restarting, before the wait ends: a
/// replica without a health check counts as ready as soon as it runs, even one that is about
/// to exit.
const STABLE_FOR: Duration = Duration::from_secs(1);

/// Conditions that mean the agent will not become available without a change, with the exit
/// code `berth` ends with for each. A halted rollout comes first: while one runs, a new
/// replica's missing image or crash loop is what halts it.
const FAILURES: &[(&str, u8)] = &[
    ("RolloutHalted", 6),
    ("ImageMissing", 3),
    ("CrashLoop", 4),
    ("Unschedulable", 5),
];
/// The exit code when `--timeout` passes first.
pub const TIMEOUT_EXIT: u8 = 7;

/// `--wait [--timeout]` of the commands that change what runs.
#[derive(clap::Args, Clone, Debug)]
pub struct WaitArgs {
    /// Wait until the agent is available (every replica of this generation ready), showing
    /// progress; exit 3 ImageMissing, 4 CrashLoop, 5 Unschedulable, 6 RolloutHalted, 7 timeout.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits (e.g. 90s, 5m).
    #[arg(long, requires = "wait", default_value = "5m", value_parser = crate::quantity::parse_duration)]
    pub timeout: Duration,
}

impl WaitArgs {
    /// With `--wait`, waits for each agent in turn (each within `--timeout`); else nothing.
    pub async fn each(&self, client: &Client, names: &[String]) -> anyhow::Result<()> {
        if self.wait {
            for name in names {
                until_available(client, name, self.timeout).await?;
            }
        }
        Ok(())
    }
}

/// `--wait [--timeout]` of `berth stop` and `pause`.
#[derive(clap::Args, Clone, Debug)]
pub struct HaltWaitArgs {
    /// Wait until every replica has stopped (of `pause`: is paused), showing progress; exit 7
    /// on timeout.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits (e.g. 90s, 5m).
    #[arg(long, requires = "wait", default_value = "5m", value_parser = crate::quantity::parse_duration)]
    pub timeout: Duration,
}

impl HaltWaitArgs {
    /// With `--wait`, waits for each agent in turn until every replica is in `state` (each
    /// within `--timeout`); else nothing.
    pub async fn each(
        &self,
        client: &Client,
        names: &[String],
        state: ReplicaState,
    ) -> anyhow::Result<()> {
        if self.wait {
            for name in names {
                follow(client, name, self.timeout, |agent| {
                    Some(halted(agent, state))
                })
                .await?;
            }
        }
        Ok(())
    }
}

/// Why `--wait` gave up.
#[derive(Debug, thiserror::Error)]
#[error("agent/{agent} is not available: {reason}: {message}")]
pub struct WaitFailed {
    /// The agent.
    pub agent: String,
    /// The condition that holds (`ImageMissing`, `CrashLoop`, `Unschedulable`,
    /// `RolloutHalted`), or `Timeout`.
    pub reason: String,
    /// What Berth says of it.
    pub message: String,
}

impl WaitFailed {
    /// The process's exit code for this reason.
    pub fn exit_code(&self) -> u8 {
        FAILURES
            .iter()
            .find(|(reason, _)| *reason == self.reason)
            .map_or(TIMEOUT_EXIT, |(_, code)| *code)
    }
}

/// Where an agent stands, as `--wait` reports it.
#[derive(Debug, PartialEq)]
enum Progress {
    /// Every replica of the current generation ready, and no other left.
    Done(String),
    /// On its way: what to print.
    Waiting(String),
    /// Stuck: the condition and its message.
    Failed(String, String),
}

fn progress(agent: &Agent) -> Progress {
    let meta = agent.meta.clone().unwrap_or_default();
    let status = agent.status.clone().unwrap_or_default();
    let holds = |kind: &str| status.holding(kind);
    let current = status
        .replicas
        .iter()
        .filter(|r| r.generation >= meta.generation)
        .count() as u32;
    let old = status.replicas.len() as u32 - current;
    for (reason, _) in FAILURES {
        // During a rollout the scheduler judges a failing new replica: RolloutHalted.
        if old > 0 && *reason != "RolloutHalted" && *reason != "Unschedulable" {
            continue;
        }
        if let Some(condition) = holds(reason) {
            return Progress::Failed(reason.to_string(), condition.message.clone());
        }
    }
    let desired = agent.desired_replicas();
    let ready = status
        .replicas
        .iter()
        .filter(|r| r.generation >= meta.generation && r.ready)
        .count() as u32;
    let mut line = format!("{ready}/{desired} ready (generation {})", meta.generation);
    if old > 0 {
        line.push_str(&format!(", {old} of an older generation not yet replaced"));
    }
    if let Some(rolling) = holds("Progressing") {
        line.push_str(&format!(": {}", rolling.message));
    }
    if ready >= desired && old == 0 && current == desired {
        Progress::Done(line)
    } else {
        Progress::Waiting(line)
    }
}

/// Where the replicas of a stopping (pausing) agent stand: done once every replica is in
/// `state`.
fn halted(agent: &Agent, state: ReplicaState) -> Progress {
    let replicas = agent.status.as_ref().map_or(&[][..], |s| &s.replicas[..]);
    let word = match state {
        ReplicaState::Paused => "paused",
        _ => "stopped",
    };
    let there = replicas.iter().filter(|r| r.state == state as i32).count();
    if there == replicas.len() {
        Progress::Done(word.into())
    } else {
        Progress::Waiting(format!("{there}/{} {word}", replicas.len()))
    }
}

/// Waits until agent `name` is available and stays so for [`STABLE_FOR`], up to `timeout`,
/// printing each change of progress.
pub async fn until_available(client: &Client, name: &str, timeout: Duration) -> anyhow::Result<()> {
    // Since when it has been available, and with how many restarts in all.
    let mut available: Option<(Instant, u32)> = None;
    follow(client, name, timeout, |agent| {
        let restarts: u32 = agent
            .status
            .iter()
            .flat_map(|s| &s.replicas)
            .map(|r| r.restarts)
            .sum();
        match progress(agent) {
            Progress::Done(line) => match available {
                Some((since, before)) if before == restarts => (since.elapsed() >= STABLE_FOR)
                    .then(|| Progress::Done(format!("{line}: available"))),
                _ => {
                    available = Some((Instant::now(), restarts));
                    None
                }
            },
            other => {
                available = None;
                Some(other)
            }
        }
    })
    .await
}

/// Reads agent `name` every [`POLL`] and asks `judge` where it stands (`None`: nothing to say
/// yet), printing each change, until it is done or failed, or `timeout` passes.
async fn follow(
    client: &Client,
    name: &str,
    timeout: Duration,
    mut judge: impl FnMut(&Agent) -> Option<Progress>,
) -> anyhow::Result<()> {
    let mut api = client.agents();
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        let agent = api
            .get_agent(GetAgentRequest {
                name: name.into(),
                ..Default::default()
            })
            .await
            .map_err(|s| client.explain(s))?
            .into_inner();
        match judge(&agent) {
            Some(Progress::Done(line)) => {
                outln!("agent/{name}: {line}");
                return Ok(());
            }
            Some(Progress::Failed(reason, message)) => {
                return Err(WaitFailed {
                    agent: name.into(),
                    reason,
                    message,
                }
                .into())
            }
            Some(Progress::Waiting(line)) if line != last => {
                outln!("agent/{name}: {line}");
                last = line;
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err(WaitFailed {
                agent: name.into(),
                reason: "Timeout".into(),
                message: format!("still {last} after {}", humantime::format_duration(timeout)),
            }
            .into());
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_proto::v1::{
        AgentMeta, AgentSpec, AgentStatus, Condition, ConditionStatus, DesiredState, ReplicaStatus,
    };

    fn agent(
        replicas: u32,
        generation: i64,
        running: &[(i64, bool)],
        conditions: &[&str],
    ) -> Agent {
        Agent {
            spec: Some(AgentSpec {
                replicas: Some(replicas),
                ..Default::default()
            }),
            meta: Some(AgentMeta {
                generation,
                desired_state: DesiredState::Running as i32,
                ..Default::default()
            }),
            status: Some(AgentStatus {
                replicas: running
                    .iter()
                    .map(|(generation, ready)| ReplicaStatus {
                        generation: *generation,
                        ready: *ready,
                        ..Default::default()
                    })
                    .collect(),
                conditions: conditions
                    .iter()
                    .map(|kind| Condition {
                        r#type: kind.to_string(),
                        status: ConditionStatus::True as i32,
                        message: format!("{kind} says why"),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn done_only_when_every_replica_of_this_generation_is_ready_and_no_old_one_is_left() {
        assert!(matches!(
            progress(&agent(2, 1, &[], &[])),
            Progress::Waiting(_)
        ));
        assert!(matches!(
            progress(&agent(2, 1, &[(1, true), (1, false)], &[])),
            Progress::Waiting(_)
        ));
        assert!(matches!(
            progress(&agent(2, 1, &[(1, true), (1, true)], &[])),
            Progress::Done(_)
        ));
        // A rollout: the new replicas ready, an old one still running.
        let rolling = progress(&agent(
            2,
            2,
            &[(2, true), (2, true), (1, true)],
            &["Progressing"],
        ));
        assert_eq!(
            rolling,
            Progress::Waiting(
                "2/2 ready (generation 2), 1 of an older generation not yet replaced: Progressing says why"
                    .into()
            )
        );
        assert!(matches!(
            progress(&agent(1, 2, &[(1, true)], &[])),
            Progress::Waiting(_)
        ));
    }

    #[test]
    fn a_stop_is_done_once_every_replica_is_stopped_and_a_pause_once_every_one_is_paused() {
        let with = |states: &[ReplicaState]| {
            let mut a = agent(states.len() as u32, 1, &[], &[]);
            a.status.as_mut().unwrap().replicas = states
                .iter()
                .map(|s| ReplicaStatus {
                    state: *s as i32,
                    ..Default::default()
                })
                .collect();
            a
        };
        use ReplicaState::{Paused, Running, Stopped, Stopping};
        assert_eq!(
            halted(&with(&[Stopped, Stopping]), Stopped),
            Progress::Waiting("1/2 stopped".into())
        );
        assert_eq!(
            halted(&with(&[Stopped, Stopped]), Stopped),
            Progress::Done("stopped".into())
        );
        assert_eq!(
            halted(&with(&[]), Stopped),
            Progress::Done("stopped".into())
        );
        assert_eq!(
            halted(&with(&[Paused, Running]), Paused),
            Progress::Waiting("1/2 paused".into())
        );
        assert_eq!(
            halted(&with(&[Paused, Paused]), Paused),
            Progress::Done("paused".into())
        );
    }

    #[test]
    fn each_failure_condition_ends_the_wait_with_its_own_exit_code() {
        for (reason, code) in FAILURES {
            let Progress::Failed(got, message) = progress(&agent(1, 1, &[(1, false)], &[reason]))
            else {
                panic!("{reason} must end the wait");
            };
            assert_eq!(&got, reason);
            let failed = WaitFailed {
                agent: "a".into(),
                reason: got,
                message,
            };
            assert_eq!(failed.exit_code(), *code);
            assert!(failed.to_string().contains(reason), "{failed}");
        }
        // During a rollout a new replica's crash loop waits for the scheduler's verdict.
        let rolling =
            |conditions: &[&str]| progress(&agent(1, 2, &[(1, true), (2, false)], conditions));
        assert!(matches!(rolling(&["CrashLoop"]), Progress::Waiting(_)));
        assert!(matches!(
            rolling(&["CrashLoop", "RolloutHalted"]),
            Progress::Failed(reason, _) if reason == "RolloutHalted"
        ));
        let timeout = WaitFailed {
            agent: "a".into(),
            reason: "Timeout".into(),
            message: String::new(),
        };
        assert_eq!(timeout.exit_code(), TIMEOUT_EXIT);
    }
}
