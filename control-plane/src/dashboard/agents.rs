//! The agents' pages: the list (filtered by name or label), one agent (live status, events,
//! logs, spec) and its actions (scale, stop, start, restart).

use super::layout::{age, html_page, page, time, urlencode, word};
use super::{Caller, Dashboard, PageError, PageResult};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect};
use berth_proto::manifest::Manifest;
use berth_proto::v1::agent_service_server::AgentService;
use berth_proto::v1::request_service_server::RequestService;
use berth_proto::v1::{
    Agent, AgentActionRequest, BreakerState, ConditionStatus, DesiredState, GetAgentRequest,
    HealthState, ListAgentsRequest, ListRequestsRequest, ReplicaState, RequestState,
    ScaleAgentRequest, StreamLogsRequest, WatchEventsRequest,
};
use futures::StreamExt;
use maud::{html, Markup};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

type D = State<Arc<Dashboard>>;

/// Events shown on an agent's page when it opens (newer ones arrive live).
const EVENTS_SHOWN: usize = 50;
/// Log lines shown on an agent's page.
const LOG_TAIL: u32 = 40;
/// How long an agent's page waits for its logs before showing what came.
const LOG_WAIT: Duration = Duration::from_secs(2);
/// Requests counted per agent and state on the agents page (more shows as `1000+`).
const COUNT_LIMIT: u32 = 1000;

const LIST_AGENTS: &str = "/berth.v1.AgentService/ListAgents";
const GET_AGENT: &str = "/berth.v1.AgentService/GetAgent";
const LIST_REQUESTS: &str = "/berth.v1.RequestService/ListRequests";

/// What an agent is doing, in a word, and its CSS class.
fn agent_state(agent: &Agent) -> (&'static str, &'static str) {
    let meta = agent.meta.clone().unwrap_or_default();
    let status = agent.status.clone().unwrap_or_default();
    let holds = |kind: &str| status.holding(kind).is_some();
    match DesiredState::try_from(meta.desired_state) {
        Ok(DesiredState::Stopped) => return ("stopped", "muted"),
        Ok(DesiredState::Paused) => return ("paused", "muted"),
        _ => {}
    }
    let spec = agent.spec.as_ref();
    if spec.is_some_and(|s| s.autoscale.is_some() && s.replicas == Some(0)) {
        return ("idle", "muted");
    }
    for (kind, word) in [
        ("ImageMissing", "image missing"),
        ("CrashLoop", "crash loop"),
        ("Unschedulable", "unschedulable"),
        ("RolloutHalted", "rollout halted"),
    ] {
        if holds(kind) {
            return (word, "bad");
        }
    }
    if holds("Available") {
        ("available", "ok")
    } else {
        ("starting", "warn")
    }
}

/// Requests of `agent` in `states`, counted up to [`COUNT_LIMIT`].
async fn count(d: &Dashboard, caller: &Caller, agent: &str, states: &[RequestState]) -> String {
    let mut total = 0;
    for state in states {
        let message = ListRequestsRequest {
            agent: agent.into(),
            state: *state as i32,
            limit: COUNT_LIMIT,
            page_token: String::new(),
        };
        let Ok(request) = d.request(caller, LIST_REQUESTS, message) else {
            return "-".into();
        };
        match d.requests.list_requests(request).await {
            Ok(listed) => total += listed.into_inner().requests.len(),
            Err(_) => return "-".into(),
        }
    }
    if total >= COUNT_LIMIT as usize {
        format!("{COUNT_LIMIT}+")
    } else {
        total.to_string()
    }
}

#[derive(serde::Deserialize, Default)]
pub(super) struct Filter {
    #[serde(default)]
    q: String,
}

/// The agents table: filtered by name (a substring) or by label (`key=value`).
async fn agents_table(d: &Dashboard, caller: &Caller, q: &str) -> Result<Markup, PageError> {
    let mut selector = HashMap::new();
    let mut name_part = q.trim().to_string();
    if let Some((k, v)) = q.trim().split_once('=') {
        selector.insert(k.trim().to_string(), v.trim().to_string());
        name_part.clear();
    }
    let request = d.request(
        caller,
        LIST_AGENTS,
        ListAgentsRequest {
            label_selector: selector,
        },
    )?;
    let mut agents = d.agents.list_agents(request).await?.into_inner().agents;
    agents.retain(|a| a.spec.as_ref().is_some_and(|s| s.name.contains(&name_part)));
    agents.sort_by(|a, b| {
        a.spec
            .as_ref()
            .map(|s| &s.name)
            .cmp(&b.spec.as_ref().map(|s| &s.name))
    });
    let mut rows = Vec::new();
    for agent in &agents {
        let name = agent
            .spec
            .as_ref()
            .map(|s| s.name.clone())
            .unwrap_or_default();
        let queued = count(
            d,
            caller,
            &name,
            &[RequestState::Queued, RequestState::Delivering],
        )
        .await;
        let dead = count(d, caller, &name, &[RequestState::Dead]).await;
        rows.push((agent, name, queued, dead));
    }
    Ok(html! {
        table #agents {
            tr { th { "Name" } th { "State" } th { "Ready" } th { "Restarts" } th { "Queued" } th { "Dead" } th { "Breakers" } th { "Labels" } th { "Age" } }
            @if rows.is_empty() { tr { td colspan="9" .muted { "No agents" } } }
            @for (agent, name, queued, dead) in &rows {
                @let status = agent.status.clone().unwrap_or_default();
                @let (state, class) = agent_state(agent);
                @let open = status.replicas.iter().filter(|r| r.breaker == BreakerState::Open as i32).count();
                tr data-agent=(name) {
                    td { a href={ "/agents/" (name) } { (name) } }
                    td { span class=(class) data-state=(state) { (state) } }
                    td.num data-ready { (status.ready_replicas) "/" (agent.desired_replicas()) }
                    td.num { (status.replicas.iter().map(|r| r.restarts).sum::<u32>()) }
                    td.num { (queued) }
                    td.num { (dead) }
                    td { @if open > 0 { span.bad { (open) " open" } } @else { span.muted { "closed" } } }
                    td.muted { @for (k, v) in agent.spec.iter().flat_map(|s| s.labels.iter()) { (k) "=" (v) " " } }
                    td { (age(agent.meta.as_ref().and_then(|m| m.create_time.as_ref()))) }
                }
            }
        }
    })
}

pub(super) async fn agents(
    State(d): D,
    headers: HeaderMap,
    Query(filter): Query<Filter>,
) -> PageResult {
    let caller = d.caller(&headers, LIST_AGENTS)?;
    let table = agents_table(&d, &caller, &filter.q).await?;
    let fragment = format!("/fragments/agents?q={}", urlencode(&filter.q));
    html_page(page(
        "Agents",
        Some(&caller),
        Some("/live"),
        html! {
            h1 { "Agents" }
            form.filter method="get" action="/agents" {
                input #filter type="search" name="q" value=(filter.q) placeholder="name, or label key=value";
                button type="submit" { "Filter" }
            }
            div data-fragment=(fragment) { (table) }
        },
    ))
}

pub(super) async fn agents_fragment(
    State(d): D,
    headers: HeaderMap,
    Query(filter): Query<Filter>,
) -> PageResult {
    let caller = d.caller(&headers, LIST_AGENTS)?;
    html_page(agents_table(&d, &caller, &filter.q).await?)
}

async fn get_agent(d: &Dashboard, caller: &Caller, name: &str) -> Result<Agent, PageError> {
    let request = d.request(
        caller,
        GET_AGENT,
        GetAgentRequest {
            name: name.into(),
            ..Default::default()
        },
    )?;
    Ok(d.agents.get_agent(request).await?.into_inner())
}

/// An agent's live part: its state, replicas and conditions.
fn agent_status(agent: &Agent) -> Markup {
    let status = agent.status.clone().unwrap_or_default();
    let (state, class) = agent_state(agent);
    html! {
        p { "State: " span #state class=(class) { (state) } " · ready " span #ready { (status.ready_replicas) "/" (agent.desired_replicas()) }
            " · generation " (agent.meta.as_ref().map_or(0, |m| m.generation)) }
        h2 { "Replicas" }
        table #replicas {
            tr { th { "Replica" } th { "Node" } th { "Container" } th { "State" } th { "Ready" } th { "Health" } th { "Restarts" } th { "Last exit" } th { "Address" } th { "Breaker" } }
            @if status.replicas.is_empty() { tr { td colspan="10" .muted { "No replicas" } } }
            @for r in &status.replicas {
                @let replica_state = ReplicaState::try_from(r.state).map(|s| word(s.as_str_name())).unwrap_or_default();
                tr data-replica=(r.replica) {
                    td { (r.replica) }
                    td { (r.node) }
                    td.muted { (r.container_id.chars().take(12).collect::<String>()) }
                    td { (replica_state) @if !r.message.is_empty() { br; span.muted { (r.message) } } }
                    td { @if r.ready { span.ok { "yes" } } @else { span.warn { "no" } } }
                    td { (HealthState::try_from(r.health).map(|s| word(s.as_str_name())).unwrap_or_default()) }
                    td.num data-restarts { (r.restarts) }
                    td { @if let Some(code) = r.last_exit_code { (code) @if r.oom_killed { " " span.bad { "(OOMKilled)" } } } @else { "-" } }
                    td { (r.address) }
                    td { @match BreakerState::try_from(r.breaker) {
                        Ok(BreakerState::Open) => span.bad { "open" },
                        Ok(BreakerState::HalfOpen) => span.warn { "half-open" },
                        Ok(BreakerState::Closed) => "closed",
                        _ => span.muted { "-" },
                    } }
                }
            }
        }
        h2 { "Conditions" }
        table #conditions {
            tr { th { "Type" } th { "Status" } th { "Reason" } th { "Message" } th { "Since" } }
            @for c in &status.conditions {
                tr {
                    td { (c.r#type) }
                    td { (ConditionStatus::try_from(c.status).map(|s| word(s.as_str_name())).unwrap_or_default()) }
                    td { (c.reason) }
                    td { (c.message) }
                    td { (time(c.last_transition_time.as_ref())) }
                }
            }
        }
    }
}

pub(super) async fn agent(State(d): D, headers: HeaderMap, Path(name): Path<String>) -> PageResult {
    let caller = d.caller(&headers, GET_AGENT)?;
    let agent = get_agent(&d, &caller, &name).await?;
    let spec = agent.spec.clone().unwrap_or_default();
    let yaml = serde_yaml::to_string(&Manifest::from_spec(&spec)).unwrap_or_default();
    // History so far (newer events arrive through the live stream).
    let mut events = Vec::new();
    let history = WatchEventsRequest {
        agent: name.clone(),
        since_revision: 0,
        follow: false,
    };
    if let Ok(request) = d.request(&caller, "/berth.v1.AgentService/WatchEvents", history) {
        if let Ok(stream) = d.agents.watch_events(request).await {
            let mut stream = stream.into_inner();
            while let Ok(Some(Ok(event))) =
                tokio::time::timeout(Duration::from_secs(2), stream.next()).await
            {
                events.push(event);
            }
        }
    }
    // Newer ones arrive live, from just after the newest shown.
    let since = events.iter().map(|e| e.revision).max().unwrap_or(0);
    let events: Vec<_> = events.into_iter().rev().take(EVENTS_SHOWN).collect();
    let logs = logs_tail(&d, &caller, &name).await;
    let desired = agent.desired_replicas();
    let stopped = agent
        .meta
        .as_ref()
        .is_some_and(|m| m.desired_state == DesiredState::Stopped as i32);
    html_page(page(
        &name,
        Some(&caller),
        Some(&format!("/live?agent={name}&since={since}")),
        html! {
            h1 { "Agent " (name) }
            @if caller.admin() {
                div.actions #actions {
                    form method="post" action={ "/agents/" (name) "/scale" } {
                        input #replicas type="number" name="replicas" min="0" value=(desired.max(1));
                        button #scale type="submit" { "Scale" }
                    }
                    @if stopped {
                        form method="post" action={ "/agents/" (name) "/start" } { button.primary #start type="submit" { "Start" } }
                    } @else {
                        form method="post" action={ "/agents/" (name) "/stop" } { button.danger #stop type="submit" { "Stop" } }
                    }
                    form method="post" action={ "/agents/" (name) "/restart" } { button #restart type="submit" { "Restart" } }
                }
            }
            div data-fragment={ "/fragments/agents/" (name) } { (agent_status(&agent)) }
            h2 { "Events" }
            table #events {
                tr { th { "Time" } th { "Reason" } th { "Replica" } th { "Message" } }
                @for e in &events {
                    tr { td { (time(e.time.as_ref())) } td { (e.reason) } td { (e.replica) } td { (e.message) } }
                }
            }
            h2 { "Logs (last " (LOG_TAIL) " lines per replica)" }
            pre #logs { (logs) }
            h2 { "Spec" }
            pre #spec { (yaml) }
            p { a href={ "/requests?agent=" (name) } { "Its replay queue" } }
        },
    ))
}

async fn logs_tail(d: &Dashboard, caller: &Caller, name: &str) -> String {
    let message = StreamLogsRequest {
        name: name.into(),
        replica: String::new(),
        follow: false,
        tail: LOG_TAIL,
    };
    let Ok(request) = d.request(caller, "/berth.v1.AgentService/StreamLogs", message) else {
        return "(no permission to read logs)".into();
    };
    let Ok(stream) = d.agents.stream_logs(request).await else {
        return "(logs unavailable)".into();
    };
    let mut stream = stream.into_inner();
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + LOG_WAIT;
    while let Ok(Some(Ok(chunk))) = tokio::time::timeout_at(deadline, stream.next()).await {
        for line in String::from_utf8_lossy(&chunk.data).lines() {
            text.push_str(&format!("[{}] {line}\n", chunk.replica));
        }
    }
    text
}

pub(super) async fn agent_fragment(
    State(d): D,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> PageResult {
    let caller = d.caller(&headers, GET_AGENT)?;
    let agent = get_agent(&d, &caller, &name).await?;
    html_page(agent_status(&agent))
}

/// The `replicas` field of the scale form (`replicas=N`, form-encoded).
fn replicas_field(body: &[u8]) -> Option<u32> {
    std::str::from_utf8(body)
        .ok()?
        .split('&')
        .find_map(|pair| pair.strip_prefix("replicas="))?
        .parse()
        .ok()
}

pub(super) async fn agent_action(
    State(d): D,
    headers: HeaderMap,
    Path((name, action)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> PageResult {
    // Who asks comes first: a refused caller learns nothing from how its form is read.
    let caller = d.caller(&headers, GET_AGENT)?;
    let act = |path: &str| d.request(&caller, path, AgentActionRequest { name: name.clone() });
    match action.as_str() {
        "scale" => {
            let request = d.request(
                &caller,
                "/berth.v1.AgentService/ScaleAgent",
                ScaleAgentRequest {
                    name: name.clone(),
                    replicas: replicas_field(&body).ok_or_else(|| {
                        tonic::Status::invalid_argument("replicas: a whole number is needed")
                    })?,
                },
            )?;
            d.agents.scale_agent(request).await?;
        }
        "stop" => {
            d.agents
                .stop_agent(act("/berth.v1.AgentService/StopAgent")?)
                .await?;
        }
        "start" => {
            d.agents
                .start_agent(act("/berth.v1.AgentService/StartAgent")?)
                .await?;
        }
        "restart" => {
            d.agents
                .restart_agent(act("/berth.v1.AgentService/RestartAgent")?)
                .await?;
        }
        _ => return Err(tonic::Status::not_found(format!("no action {action}")).into()),
    }
    tracing::info!(agent = %name, action, scope = caller.principal.scope_name(), "dashboard action");
    Ok(Redirect::to(&format!("/agents/{name}")).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scale_form_gives_its_replicas() {
        assert_eq!(replicas_field(b"replicas=3"), Some(3));
        assert_eq!(replicas_field(b"x=1&replicas=0"), Some(0));
        assert_eq!(replicas_field(b"replicas=-1"), None);
        assert_eq!(replicas_field(b""), None);
    }
}
