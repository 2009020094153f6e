//! `berth requests`: the replay queue — list an agent's requests, show one, retry
//! dead-lettered ones (one by one or all of an agent's), drop them.

use crate::client::{Client, RequestService};
use crate::output::{print_object, table, Format};
use berth_proto::v1::{
    DropRequestRequest, GetRequestRequest, ListRequestsRequest, Request, RequestState,
    RetryRequestRequest,
};
use clap::{Subcommand, ValueEnum};
use futures::StreamExt;

/// A request state, as typed on the command line.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum StateArg {
    /// Waiting for a ready replica.
    Queued,
    /// Being sent now.
    Delivering,
    /// Answered; the response is kept.
    Delivered,
    /// Given up on; `berth requests retry ID` puts it back.
    Dead,
}

impl From<StateArg> for RequestState {
    fn from(s: StateArg) -> Self {
        match s {
            StateArg::Queued => RequestState::Queued,
            StateArg::Delivering => RequestState::Delivering,
            StateArg::Delivered => RequestState::Delivered,
            StateArg::Dead => RequestState::Dead,
        }
    }
}

/// What to do with one request.
#[derive(Debug, Subcommand)]
pub enum RequestAction {
    /// Show a request with its stored response.
    Show {
        /// The request id.
        id: String,
    },
    /// Put dead-lettered requests back in their agent's queue (attempts reset; each keeps its
    /// place, so the queue's order holds).
    Retry {
        #[command(flatten)]
        which: Which,
    },
    /// Remove requests from the queue; they will not be delivered.
    Drop {
        #[command(flatten)]
        which: Which,
    },
}

/// The requests `retry` and `drop` act on: the ones named, or every dead-lettered one of an
/// agent.
#[derive(Clone, Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub struct Which {
    /// Request ids.
    pub ids: Vec<String>,
    /// Every dead-lettered request of this agent, as many as there are (read a page at a time).
    #[arg(long, value_name = "AGENT")]
    pub all_dead: Option<String>,
}

/// Requests retried or dropped at once by `--all-dead`.
const AT_ONCE: usize = 16;

/// Which page of a listing.
pub struct Page {
    /// Most requests.
    pub limit: u32,
    /// Where the previous page ended; empty for the first.
    pub page_token: String,
}

/// Lists a page of the requests of `agent` (all agents when `None`), oldest first.
pub async fn list(
    client: &Client,
    agent: Option<String>,
    state: Option<StateArg>,
    page: Page,
    format: Format,
) -> anyhow::Result<()> {
    let request = ListRequestsRequest {
        agent: agent.clone().unwrap_or_default(),
        state: state.map(|s| RequestState::from(s) as i32).unwrap_or(0),
        limit: page.limit,
        page_token: page.page_token.clone(),
    };
    let listed = client
        .requests()
        .list_requests(request)
        .await
        .map_err(|s| client.explain(s))?
        .into_inner();
    if format != Format::Table {
        return print_object(format, &listed);
    }
    let mut out = table(&[
        "ID", "AGENT", "STATE", "METHOD", "PATH", "ATTEMPTS", "RESULT",
    ]);
    for r in &listed.requests {
        out.add_row(row(r));
    }
    outln!("{out}");
    if !listed.next_page_token.is_empty() {
        let next = Page {
            page_token: listed.next_page_token,
            ..page
        };
        outln!("more: {}", next_page(agent.as_deref(), state, &next));
    }
    Ok(())
}

/// The command that lists `page` of the same listing: the token belongs to its agent and state.
fn next_page(agent: Option<&str>, state: Option<StateArg>, page: &Page) -> String {
    let mut command = String::from("berth requests");
    if let Some(agent) = agent {
        command.push_str(&format!(" {agent}"));
    }
    if let Some(state) = state.and_then(|s| s.to_possible_value()) {
        command.push_str(&format!(" --state {}", state.get_name()));
    }
    if page.limit != DEFAULT_LIMIT {
        command.push_str(&format!(" --limit {}", page.limit));
    }
    command.push_str(&format!(" --page-token {}", page.page_token));
    command
}

/// "1 dead-lettered request", "2 dead-lettered requests".
fn dead_letters(n: usize) -> String {
    let s = if n == 1 { "" } else { "s" };
    format!("{n} dead-lettered request{s}")
}

/// Requests a page shows unless `--limit` says otherwise.
pub const DEFAULT_LIMIT: u32 = 100;
/// Most requests a page holds (`ListRequests` returns no more).
const MAX_LIMIT: u32 = 1000;

fn state_word(state: i32) -> &'static str {
    match RequestState::try_from(state) {
        Ok(RequestState::Queued) => "queued",
        Ok(RequestState::Delivering) => "delivering",
        Ok(RequestState::Delivered) => "delivered",
        Ok(RequestState::Dead) => "dead",
        _ => "-",
    }
}

fn row(r: &Request) -> Vec<String> {
    // A listing leaves the answer out; its status is in the record.
    let result = match (&r.response, r.response_status) {
        (Some(response), _) => response.status.to_string(),
        (None, 0) => r.last_error.clone(),
        (None, status) => status.to_string(),
    };
    let mut path = r.path.clone();
    if !r.query.is_empty() {
        path = format!("{path}?{}", r.query);
    }
    vec![
        r.id.clone(),
        r.agent.clone(),
        state_word(r.state).into(),
        r.method.clone(),
        path,
        r.attempts.to_string(),
        result,
    ]
}

/// Runs one action on one request.
pub async fn act(client: &Client, action: RequestAction, format: Format) -> anyhow::Result<()> {
    let mut service = client.requests();
    match action {
        RequestAction::Show { id } => {
            let r = service
                .get_request(GetRequestRequest { id })
                .await
                .map_err(|s| client.explain(s))?
                .into_inner();
            if format != Format::Table {
                return print_object(format, &r);
            }
            let mut out = table(&[
                "ID", "AGENT", "STATE", "METHOD", "PATH", "ATTEMPTS", "RESULT",
            ]);
            out.add_row(row(&r));
            outln!("{out}");
            if let Some(response) = &r.response {
                outln!("\nresponse {}:", response.status);
                for h in &response.headers {
                    outln!("{}: {}", h.name, String::from_utf8_lossy(&h.value));
                }
                outln!("\n{}", String::from_utf8_lossy(&response.body));
            }
        }
        RequestAction::Retry { which } => {
            each(
                client,
                which,
                "queued again",
                |mut service, id| async move {
                    service
                        .retry_request(RetryRequestRequest { id })
                        .await
                        .map(drop)
                },
            )
            .await?;
        }
        RequestAction::Drop { which } => {
            each(client, which, "dropped", |mut service, id| async move {
                service
                    .drop_request(DropRequestRequest { id })
                    .await
                    .map(drop)
            })
            .await?;
        }
    }
    Ok(())
}

/// Does `act` to each request `which` names: the ids given, in turn, stopping at the first
/// error; or every dead-lettered request of an agent, page after page of its dead letters,
/// [`AT_ONCE`] at a time, reporting each that fails and going on (a request that another
/// client retried or dropped meanwhile is no longer there to act on).
async fn each<F, Fut>(client: &Client, which: Which, done: &str, act: F) -> anyhow::Result<()>
where
    F: Fn(RequestService, String) -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    let Some(agent) = which.all_dead else {
        for id in which.ids {
            act(client.requests(), id.clone())
                .await
                .map_err(|s| client.explain(s))?;
            outln!("request/{id} {done}");
        }
        return Ok(());
    };
    let (mut acted, mut failed) = (0usize, 0usize);
    let mut page_token = String::new();
    loop {
        let listed = client
            .requests()
            .list_requests(ListRequestsRequest {
                agent: agent.clone(),
                state: RequestState::Dead as i32,
                limit: MAX_LIMIT,
                page_token,
            })
            .await
            .map_err(|s| client.explain(s))?
            .into_inner();
        let mut results = futures::stream::iter(listed.requests)
            .map(|r| {
                let ended = act(client.requests(), r.id.clone());
                async move { (r.id, ended.await) }
            })
            .buffer_unordered(AT_ONCE);
        while let Some((id, ended)) = results.next().await {
            match ended {
                Ok(()) => acted += 1,
                Err(status) => {
                    failed += 1;
                    eprintln!("request/{id}: {}", client.explain(status));
                }
            }
        }
        if listed.next_page_token.is_empty() {
            break;
        }
        page_token = listed.next_page_token;
    }
    outln!("{} of agent/{agent} {done}", dead_letters(acted));
    if failed > 0 {
        anyhow::bail!("{} of agent/{agent} not {done}", dead_letters(failed));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_page_is_asked_for_with_the_same_agent_state_and_limit() {
        let page = |limit: u32| Page {
            limit,
            page_token: "d:echo/00000000000000000042".into(),
        };
        assert_eq!(
            next_page(Some("echo"), Some(StateArg::Dead), &page(20)),
            "berth requests echo --state dead --limit 20 --page-token d:echo/00000000000000000042"
        );
        assert_eq!(
            next_page(None, None, &page(DEFAULT_LIMIT)),
            "berth requests --page-token d:echo/00000000000000000042"
        );
    }
}
