//! How an attempt to reach an agent ended: the one classification that the circuit breaker,
//! the retry policy, the replay decision and the replayer all read (docs/architecture.md,
//! "A request's path"). What matters is whether the agent may have seen the request: before
//! it could have, sending it again costs the agent nothing; after, only a request that is
//! safe to send twice goes again.

use super::error::GatewayError;
use http::StatusCode;

/// How an attempt ended. Kept as the reason of a queued request (`last_error`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// No replica is ready, or every breaker is open, or every replica was tried.
    NoReplica,
    /// The gateway shed the request (its concurrency limit for the agent was reached).
    Shed,
    /// The connection to the replica could not be made.
    ConnectFailed,
    /// The agent answered 503: it is up but cannot take requests.
    Unavailable503,
    /// The replica did not answer within the timeout.
    TimedOut,
    /// The connection broke after the request was sent.
    Reset,
    /// The agent (or something in front of it) answered 502 or 504.
    BadGateway,
    /// The agent answered another 5xx (not 501): it ran the request and failed.
    AgentError,
    /// Any other answer from the agent (2xx to 4xx, 501).
    Answered,
    /// The gateway refused the request itself (unknown agent, token, bad input).
    Refused,
}

/// Whether the agent may have seen the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// Surely not: the request never left the gateway, or the agent refused it unseen.
    No,
    /// It may have: the request was written and then the attempt broke.
    Maybe,
    /// It did: the agent answered.
    Yes,
}

/// What to do with a direct request that did not get an answer the client should see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Store it and answer 202.
    Queue,
    /// Give the client what happened.
    Answer,
}

/// What the replayer does after a delivery attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The agent answered: store the answer.
    Delivered,
    /// Try again later (with backoff, up to the attempt limit).
    TryLater,
    /// The agent may have seen it and a second delivery could do harm: dead-letter it.
    Dead,
}

impl Ending {
    /// How an answer from a replica ended.
    pub fn of_status(status: StatusCode) -> Self {
        match status {
            StatusCode::SERVICE_UNAVAILABLE => Self::Unavailable503,
            StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT => Self::BadGateway,
            StatusCode::NOT_IMPLEMENTED => Self::Answered,
            s if s.is_server_error() => Self::AgentError,
            _ => Self::Answered,
        }
    }

    /// How a gateway error ended.
    pub fn of_error(err: &GatewayError) -> Self {
        match err {
            GatewayError::NoReplica { .. } => Self::NoReplica,
            GatewayError::Overloaded { .. } => Self::Shed,
            GatewayError::Upstream { .. } if err.before_request() => Self::ConnectFailed,
            GatewayError::Upstream { .. } => Self::Reset,
            GatewayError::Timeout { .. } => Self::TimedOut,
            GatewayError::UnknownAgent { .. }
            | GatewayError::Unauthorized { .. }
            | GatewayError::BadRequest(_)
            | GatewayError::TooLarge { .. }
            | GatewayError::HeadersTooLarge { .. }
            | GatewayError::BodyTimeout { .. }
            | GatewayError::QueueFull { .. }
            | GatewayError::NotPersisted { .. }
            | GatewayError::QueueUnconfirmed { .. }
            | GatewayError::UnknownRequest { .. }
            | GatewayError::KeyReused { .. }
            | GatewayError::KeyInFlight { .. } => Self::Refused,
        }
    }

    /// How an attempt's result ended.
    pub fn of<B>(result: &Result<http::Response<B>, GatewayError>) -> Self {
        match result {
            Ok(response) => Self::of_status(response.status()),
            Err(e) => Self::of_error(e),
        }
    }

    /// Whether the agent may have seen the request.
    pub fn reach(self) -> Reach {
        match self {
            Self::NoReplica | Self::Shed | Self::ConnectFailed | Self::Unavailable503 => Reach::No,
            Self::Refused => Reach::No,
            Self::TimedOut | Self::Reset | Self::BadGateway => Reach::Maybe,
            Self::AgentError | Self::Answered => Reach::Yes,
        }
    }

    /// Whether the request never left the gateway (no replica, shed, no connection): such an
    /// attempt delivered nothing, so it does not use up one of a queued request's attempts.
    pub fn unsent(self) -> bool {
        matches!(self, Self::NoReplica | Self::Shed | Self::ConnectFailed)
    }

    /// For the circuit breaker: whether the attempt counts against the replica (connect
    /// errors, timeouts, resets, 5xx other than 501). 4xx is the caller's problem.
    pub fn replica_failed(self) -> bool {
        matches!(
            self,
            Self::ConnectFailed
                | Self::TimedOut
                | Self::Reset
                | Self::Unavailable503
                | Self::BadGateway
                | Self::AgentError
        )
    }

    /// For the retry policy: whether another replica should get the request. A connection
    /// that was never made always; a failure the agent may have seen, or a 5xx, only when
    /// the request is `safe` to send twice.
    pub fn retry_elsewhere(self, safe: bool) -> bool {
        match self {
            Self::ConnectFailed => true,
            Self::TimedOut
            | Self::Reset
            | Self::BadGateway
            | Self::Unavailable503
            | Self::AgentError => safe,
            Self::NoReplica | Self::Shed | Self::Answered | Self::Refused => false,
        }
    }

    /// For a direct request: queue it for replay, or answer. `safe`: idempotent method or
    /// `Idempotency-Key`; `opted_out`: `X-Berth-Replay: off`.
    pub fn decide(self, safe: bool, opted_out: bool) -> Decision {
        if opted_out {
            return Decision::Answer;
        }
        match (self, self.reach()) {
            // The gateway's own refusals are final.
            (Self::Shed | Self::Refused, _) => Decision::Answer,
            // Before the agent could have seen it: always.
            (_, Reach::No) => Decision::Queue,
            // After it may have seen it: only when a second delivery is harmless.
            (_, Reach::Maybe) if safe => Decision::Queue,
            // Meant answers, and what is not safe to send again.
            _ => Decision::Answer,
        }
    }

    /// For the replayer: what a delivery attempt means for the queued request.
    pub fn verdict(self, safe: bool) -> Verdict {
        match self.reach() {
            Reach::Yes => Verdict::Delivered,
            Reach::No if self != Self::Refused => Verdict::TryLater,
            // The agent may have seen it (or the gateway cannot send it): again only if safe.
            _ if safe => Verdict::TryLater,
            _ => Verdict::Dead,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_attempts_that_left_the_gateway_count() {
        use Ending::*;
        for ending in [NoReplica, Shed, ConnectFailed] {
            assert!(ending.unsent(), "{ending:?}");
        }
        for ending in [
            Unavailable503,
            TimedOut,
            Reset,
            BadGateway,
            AgentError,
            Answered,
            Refused,
        ] {
            assert!(!ending.unsent(), "{ending:?}");
        }
    }

    /// One row per line: ending, safe, opted out, decision.
    #[test]
    fn the_table() {
        use Decision::*;
        use Ending::*;
        let rows = [
            (NoReplica, false, false, Queue),
            (ConnectFailed, false, false, Queue),
            (Unavailable503, false, false, Queue),
            (TimedOut, true, false, Queue),
            (TimedOut, false, false, Answer),
            (Reset, true, false, Queue),
            (Reset, false, false, Answer),
            (BadGateway, true, false, Queue),
            (BadGateway, false, false, Answer),
            (Answered, true, false, Answer),
            (AgentError, true, false, Answer),
            (Shed, true, false, Answer),
            (Refused, true, false, Answer),
            (NoReplica, true, true, Answer),
            (ConnectFailed, false, true, Answer),
        ];
        for (ending, safe, opted_out, want) in rows {
            assert_eq!(
                ending.decide(safe, opted_out),
                want,
                "{ending:?} safe={safe} opted_out={opted_out}"
            );
        }
    }

    #[test]
    fn statuses_map_to_endings() {
        assert_eq!(
            Ending::of_status(StatusCode::SERVICE_UNAVAILABLE),
            Ending::Unavailable503
        );
        assert_eq!(
            Ending::of_status(StatusCode::BAD_GATEWAY),
            Ending::BadGateway
        );
        assert_eq!(
            Ending::of_status(StatusCode::GATEWAY_TIMEOUT),
            Ending::BadGateway
        );
        assert_eq!(
            Ending::of_status(StatusCode::INTERNAL_SERVER_ERROR),
            Ending::AgentError
        );
        for answered in [200, 201, 400, 404, 409, 501] {
            let status = StatusCode::from_u16(answered).unwrap();
            assert_eq!(Ending::of_status(status), Ending::Answered, "{status}");
        }
    }

    #[test]
    fn gateway_errors_map_to_endings() {
        let no_replica = GatewayError::NoReplica {
            agent: "a".into(),
            reason: "none is ready",
        };
        assert_eq!(Ending::of_error(&no_replica), Ending::NoReplica);
        let timeout = GatewayError::Timeout {
            agent: "a".into(),
            replica: "a-0".into(),
            timeout: std::time::Duration::from_secs(1),
        };
        assert_eq!(Ending::of_error(&timeout), Ending::TimedOut);
        let overloaded = GatewayError::Overloaded { agent: "a".into() };
        assert_eq!(Ending::of_error(&overloaded), Ending::Shed);
    }

    /// The breaker, the retry policy and the replayer read the same endings; one row each:
    /// ending, counts against the replica, retried elsewhere (unsafe, safe), replay verdict
    /// (unsafe, safe).
    #[test]
    fn every_reader_of_an_ending() {
        use Ending::*;
        use Verdict::*;
        let rows = [
            (NoReplica, false, (false, false), (TryLater, TryLater)),
            (Shed, false, (false, false), (TryLater, TryLater)),
            (ConnectFailed, true, (true, true), (TryLater, TryLater)),
            (Unavailable503, true, (false, true), (TryLater, TryLater)),
            (TimedOut, true, (false, true), (Dead, TryLater)),
            (Reset, true, (false, true), (Dead, TryLater)),
            (BadGateway, true, (false, true), (Dead, TryLater)),
            (AgentError, true, (false, true), (Delivered, Delivered)),
            (Answered, false, (false, false), (Delivered, Delivered)),
            (Refused, false, (false, false), (Dead, TryLater)),
        ];
        for (ending, fails, retried, verdicts) in rows {
            assert_eq!(ending.replica_failed(), fails, "{ending:?} breaker");
            assert_eq!(
                (ending.retry_elsewhere(false), ending.retry_elsewhere(true)),
                retried,
                "{ending:?} retry"
            );
            assert_eq!(
                (ending.verdict(false), ending.verdict(true)),
                verdicts,
                "{ending:?} replay"
            );
        }
    }
}
