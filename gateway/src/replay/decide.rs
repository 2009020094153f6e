//! Which failed requests go to the replay queue: the one table of it (DESIGN.md, "Replay").
//! A failure before the agent could have seen the request is always queued; one after it may
//! have seen it only when sending it again is harmless; an answer the agent meant (2xx, 4xx,
//! and 5xx other than 502/503/504) is final.

use super::super::error::GatewayError;
use http::StatusCode;

/// How a direct attempt ended, as far as replay is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// No replica is ready, or every breaker is open, or every replica was tried.
    NoReplica,
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
    /// Any other answer from the agent.
    Answered,
    /// The gateway refused the request itself (unknown agent, token, overload, bad input).
    Refused,
}

/// What to do with the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Store it and answer 202.
    Queue,
    /// Give the client what happened.
    Answer,
}

/// The table. `safe`: idempotent method or `Idempotency-Key`; `opted_out`: `X-Berth-Replay: off`.
pub fn decide(ending: Ending, safe: bool, opted_out: bool) -> Decision {
    use Decision::*;
    if opted_out {
        return Answer;
    }
    match ending {
        // Before the agent could have seen it: always.
        Ending::NoReplica | Ending::ConnectFailed | Ending::Unavailable503 => Queue,
        // After it may have seen it: only when a second delivery is harmless.
        Ending::TimedOut | Ending::Reset | Ending::BadGateway if safe => Queue,
        Ending::TimedOut | Ending::Reset | Ending::BadGateway => Answer,
        // Meant answers and the gateway's own refusals are final.
        Ending::Answered | Ending::Refused => Answer,
    }
}

/// How an answer from a replica ended.
pub fn ending_of_status(status: StatusCode) -> Ending {
    match status {
        StatusCode::SERVICE_UNAVAILABLE => Ending::Unavailable503,
        StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT => Ending::BadGateway,
        _ => Ending::Answered,
    }
}

/// How a gateway error ended.
pub fn ending_of_error(err: &GatewayError) -> Ending {
    match err {
        GatewayError::NoReplica { .. } => Ending::NoReplica,
        GatewayError::Upstream { .. } if err.before_request() => Ending::ConnectFailed,
        GatewayError::Upstream { .. } => Ending::Reset,
        GatewayError::Timeout { .. } => Ending::TimedOut,
        GatewayError::UnknownAgent { .. }
        | GatewayError::Unauthorized { .. }
        | GatewayError::Overloaded { .. }
        | GatewayError::BadRequest(_)
        | GatewayError::TooLarge { .. }
        | GatewayError::HeadersTooLarge { .. }
        | GatewayError::BodyTimeout { .. }
        | GatewayError::QueueFull { .. }
        | GatewayError::NotPersisted { .. }
        | GatewayError::UnknownRequest { .. }
        | GatewayError::KeyReused { .. }
        | GatewayError::KeyInFlight { .. } => Ending::Refused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            (Refused, true, false, Answer),
            (NoReplica, true, true, Answer),
            (ConnectFailed, false, true, Answer),
        ];
        for (ending, safe, opted_out, want) in rows {
            assert_eq!(
                decide(ending, safe, opted_out),
                want,
                "{ending:?} safe={safe} opted_out={opted_out}"
            );
        }
    }

    #[test]
    fn statuses_map_to_endings() {
        assert_eq!(
            ending_of_status(StatusCode::SERVICE_UNAVAILABLE),
            Ending::Unavailable503
        );
        assert_eq!(
            ending_of_status(StatusCode::BAD_GATEWAY),
            Ending::BadGateway
        );
        assert_eq!(
            ending_of_status(StatusCode::GATEWAY_TIMEOUT),
            Ending::BadGateway
        );
        for answered in [200, 201, 400, 404, 409, 500, 501] {
            let status = StatusCode::from_u16(answered).unwrap();
            assert_eq!(ending_of_status(status), Ending::Answered, "{status}");
        }
    }

    #[test]
    fn gateway_errors_map_to_endings() {
        let no_replica = GatewayError::NoReplica {
            agent: "a".into(),
            reason: "none is ready",
        };
        assert_eq!(ending_of_error(&no_replica), Ending::NoReplica);
        let timeout = GatewayError::Timeout {
            agent: "a".into(),
            replica: "a-0".into(),
            timeout: std::time::Duration::from_secs(1),
        };
        assert_eq!(ending_of_error(&timeout), Ending::TimedOut);
        let overloaded = GatewayError::Overloaded { agent: "a".into() };
        assert_eq!(ending_of_error(&overloaded), Ending::Refused);
    }
}
