//! The replay queue's pages (per agent and state, paged; one request with its headers and
//! stored answer) and their actions (retry, drop; of an agent's queue, retry or drop every
//! dead letter).

use super::layout::{html_page, page, time, urlencode, word};
use super::{Caller, Dashboard, PageResult};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect};
use berth_proto::v1::request_service_server::RequestService;
use berth_proto::v1::{
    DropRequestRequest, GetRequestRequest, ListRequestsRequest, RequestState, RetryRequestRequest,
};
use maud::html;
use std::sync::Arc;

type D = State<Arc<Dashboard>>;

/// Requests per page of the queue.
const QUEUE_PAGE: u32 = 50;
/// Bytes of a stored answer's body shown.
const ANSWER_SHOWN: usize = 4096;

const LIST_REQUESTS: &str = "/berth.v1.RequestService/ListRequests";
const RETRY_REQUEST: &str = "/berth.v1.RequestService/RetryRequest";
const DROP_REQUEST: &str = "/berth.v1.RequestService/DropRequest";
/// Dead letters read per page by the actions on all of them.
const DEAD_PAGE: u32 = 1000;

#[derive(serde::Deserialize, Default)]
pub(super) struct QueueQuery {
    #[serde(default)]
    agent: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    page: String,
}

fn request_state(name: &str) -> RequestState {
    match name {
        "queued" => RequestState::Queued,
        "delivering" => RequestState::Delivering,
        "delivered" => RequestState::Delivered,
        "dead" => RequestState::Dead,
        _ => RequestState::Unspecified,
    }
}

pub(super) async fn requests(
    State(d): D,
    headers: HeaderMap,
    Query(q): Query<QueueQuery>,
) -> PageResult {
    let caller = d.caller(&headers, LIST_REQUESTS)?;
    let message = ListRequestsRequest {
        agent: q.agent.clone(),
        state: request_state(&q.state) as i32,
        limit: QUEUE_PAGE,
        page_token: q.page.clone(),
    };
    let listed = d
        .requests
        .list_requests(d.request(&caller, LIST_REQUESTS, message)?)
        .await?
        .into_inner();
    let next = (!listed.next_page_token.is_empty()).then(|| {
        format!(
            "/requests?agent={}&state={}&page={}",
            urlencode(&q.agent),
            urlencode(&q.state),
            urlencode(&listed.next_page_token)
        )
    });
    html_page(page(
        "Replay queue",
        Some(&caller),
        None,
        html! {
            h1 { "Replay queue" }
            form.filter method="get" action="/requests" {
                input #agent type="search" name="agent" value=(q.agent) placeholder="agent";
                select name="state" {
                    @for s in ["", "queued", "delivering", "delivered", "dead"] {
                        option value=(s) selected[s == q.state] { @if s.is_empty() { "every state" } @else { (s) } }
                    }
                }
                button type="submit" { "Show" }
            }
            // An agent's dead letters: every one of them (not just this page) retried or dropped.
            @if caller.admin() && !q.agent.is_empty() && q.state == "dead" && !listed.requests.is_empty() {
                div.actions #actions {
                    form method="post" action={ "/queues/" (q.agent) "/retry-dead" } { button.primary #retry-dead type="submit" { "Retry every dead letter of " (q.agent) } }
                    form method="post" action={ "/queues/" (q.agent) "/drop-dead" } { button.danger #drop-dead type="submit" { "Drop every dead letter of " (q.agent) } }
                }
            }
            table #requests {
                tr { th { "Request" } th { "Agent" } th { "State" } th { "Method and path" } th { "Attempts" } th { "Result" } th { "Received" } }
                @if listed.requests.is_empty() { tr { td colspan="7" .muted { "No requests" } } }
                @for r in &listed.requests {
                    @let state = RequestState::try_from(r.state).map(|s| word(s.as_str_name())).unwrap_or_default();
                    tr data-request=(r.id) data-state=(state) {
                        td { a href={ "/requests/" (r.id) } { (r.id) } }
                        td { (r.agent) }
                        td { (state) }
                        td { (r.method) " " (r.path) @if !r.query.is_empty() { "?" (r.query) } }
                        td.num { (r.attempts) }
                        td { @if r.response_status > 0 { (r.response_status) } @else { (r.last_error) } }
                        td { (time(r.receive_time.as_ref())) }
                    }
                }
            }
            @if let Some(next) = next { p { a #next href=(next) { "Next page" } } }
        },
    ))
}

/// Header names whose values are credentials: never shown.
fn credential(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "authorization",
        "cookie",
        "token",
        "api-key",
        "apikey",
        "secret",
        "password",
    ]
    .iter()
    .any(|c| name.contains(c))
}

pub(super) async fn request(State(d): D, headers: HeaderMap, Path(id): Path<String>) -> PageResult {
    let caller = d.caller(&headers, "/berth.v1.RequestService/GetRequest")?;
    let message = GetRequestRequest { id: id.clone() };
    let r = d
        .requests
        .get_request(d.request(&caller, "/berth.v1.RequestService/GetRequest", message)?)
        .await?
        .into_inner();
    let state = RequestState::try_from(r.state)
        .map(|s| word(s.as_str_name()))
        .unwrap_or_default();
    let shown = |name: &str, value: &[u8]| {
        if credential(name) {
            "<redacted>".to_string()
        } else {
            String::from_utf8_lossy(value).into_owned()
        }
    };
    html_page(page(
        &format!("Request {id}"),
        Some(&caller),
        None,
        html! {
            h1 { "Request " (id) }
            @if caller.admin() {
                div.actions #actions {
                    @if r.state == RequestState::Dead as i32 {
                        form method="post" action={ "/requests/" (id) "/retry" } { button.primary #retry type="submit" { "Retry" } }
                    }
                    form method="post" action={ "/requests/" (id) "/drop" } { button.danger #drop type="submit" { "Drop" } }
                }
            }
            table #request {
                tr { th { "Agent" } td { a href={ "/agents/" (r.agent) } { (r.agent) } } }
                tr { th { "State" } td #request-state { (state) } }
                tr { th { "Method and path" } td { (r.method) " " (r.path) @if !r.query.is_empty() { "?" (r.query) } } }
                tr { th { "Attempts" } td { (r.attempts) } }
                tr { th { "Last error" } td { (r.last_error) } }
                tr { th { "Received" } td { (time(r.receive_time.as_ref())) } }
                tr { th { "Expires" } td { (time(r.expire_time.as_ref())) } }
                tr { th { "Body" } td { (r.body_bytes.max(r.body.len() as u64)) " bytes" } }
            }
            h2 { "Headers" }
            table #headers {
                @for h in &r.headers { tr { th { (h.name) } td { (shown(&h.name, &h.value)) } } }
            }
            @if let Some(answer) = &r.response {
                h2 { "Stored answer" }
                p { "Status " (answer.status) " at " (time(answer.complete_time.as_ref())) }
                table { @for h in &answer.headers { tr { th { (h.name) } td { (shown(&h.name, &h.value)) } } } }
                pre #answer { (String::from_utf8_lossy(&answer.body[..answer.body.len().min(ANSWER_SHOWN)])) }
            }
        },
    ))
}

pub(super) async fn request_action(
    State(d): D,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
) -> PageResult {
    let caller = d.caller(&headers, LIST_REQUESTS)?;
    match action.as_str() {
        "retry" => {
            retry(&d, &caller, id.clone()).await?;
            tracing::info!(request_id = %id, "dashboard: request back in the queue");
            Ok(Redirect::to(&format!("/requests/{id}")).into_response())
        }
        "drop" => {
            drop_one(&d, &caller, id.clone()).await?;
            tracing::info!(request_id = %id, "dashboard: request dropped");
            Ok(Redirect::to("/requests").into_response())
        }
        _ => Err(tonic::Status::not_found(format!("no action {action}")).into()),
    }
}

async fn retry(d: &Dashboard, caller: &Caller, id: String) -> Result<(), tonic::Status> {
    let request = d.request(caller, RETRY_REQUEST, RetryRequestRequest { id })?;
    d.requests.retry_request(request).await.map(drop)
}

async fn drop_one(d: &Dashboard, caller: &Caller, id: String) -> Result<(), tonic::Status> {
    let request = d.request(caller, DROP_REQUEST, DropRequestRequest { id })?;
    d.requests.drop_request(request).await.map(drop)
}

/// Retries (`retry-dead`) or drops (`drop-dead`) every dead letter of `agent`, a page at a
/// time; one that another caller retried or dropped meanwhile is passed over. Then shows the
/// agent's dead letters (none, unless some died meanwhile).
pub(super) async fn dead_letters_action(
    State(d): D,
    headers: HeaderMap,
    Path((agent, action)): Path<(String, String)>,
) -> PageResult {
    let caller = d.caller(&headers, LIST_REQUESTS)?;
    let retrying = match action.as_str() {
        "retry-dead" => true,
        "drop-dead" => false,
        _ => return Err(tonic::Status::not_found(format!("no action {action}")).into()),
    };
    let (mut done, mut passed, mut page_token) = (0usize, 0usize, String::new());
    loop {
        let message = ListRequestsRequest {
            agent: agent.clone(),
            state: RequestState::Dead as i32,
            limit: DEAD_PAGE,
            page_token,
        };
        let listed = d
            .requests
            .list_requests(d.request(&caller, LIST_REQUESTS, message)?)
            .await?
            .into_inner();
        for r in listed.requests {
            let acted = if retrying {
                retry(&d, &caller, r.id).await
            } else {
                drop_one(&d, &caller, r.id).await
            };
            match acted {
                Ok(()) => done += 1,
                Err(s) if passable(&s) => passed += 1,
                Err(s) => return Err(s.into()),
            }
        }
        if listed.next_page_token.is_empty() {
            break;
        }
        page_token = listed.next_page_token;
    }
    tracing::info!(%agent, action = %action, done, passed, "dashboard: every dead letter of an agent");
    Ok(Redirect::to(&format!("/requests?agent={}&state=dead", urlencode(&agent))).into_response())
}

/// A dead letter that changed between its listing and the action on it (retried, dropped or
/// expired meanwhile): nothing left to do.
fn passable(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::NotFound | tonic::Code::FailedPrecondition | tonic::Code::Aborted
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_never_shown() {
        for name in [
            "Authorization",
            "cookie",
            "X-Api-Key",
            "x-auth-token",
            "Proxy-Authorization",
        ] {
            assert!(credential(name), "{name}");
        }
        assert!(!credential("content-type"));
    }
}
