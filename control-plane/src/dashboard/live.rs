//! `/live`: server-sent events that tell an open page what changed, fed by etcd watches (the
//! agents' specs and statuses, the nodes) and by the agent's event stream. A `status` message
//! makes the page fetch its fragments again; an `event` message carries a new event. The
//! stream ends when the control plane stops or the caller's token is revoked.

use super::{Dashboard, PageResult};
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::IntoResponse;
use berth_proto::v1::agent_service_server::AgentService;
use berth_proto::v1::WatchEventsRequest;
use berth_store::watch::{list_watch, Change};
use futures::stream::{self, BoxStream, StreamExt};
use std::convert::Infallible;
use std::sync::Arc;

#[derive(serde::Deserialize)]
pub(super) struct LiveQuery {
    /// One agent's page: its spec, status and events.
    agent: Option<String>,
    /// The nodes page.
    nodes: Option<String>,
    /// The last event revision the page shows.
    #[serde(default)]
    since: i64,
}

/// A `status` message for every change under `prefix` after its first listing, and one when
/// each listing is done: a change made after the page read its parts (on the stream's opening)
/// but before the watch listed comes within the listing, not as a change, and the page would
/// go on showing what it read before.
fn changes(d: &Dashboard, prefix: String) -> BoxStream<'static, Result<Event, Infallible>> {
    let watch = list_watch(&d.store, prefix);
    stream::unfold((watch, false), |(mut watch, mut listed)| async move {
        loop {
            match watch.next().await {
                Change::InitDone { .. } => {
                    listed = true;
                    let message = Event::default().event("status").data("listed");
                    return Some((Ok(message), (watch, listed)));
                }
                Change::Put(_) | Change::Delete(_) if listed => {
                    while watch.try_next().is_some() {}
                    let message = Event::default().event("status").data("changed");
                    return Some((Ok(message), (watch, listed)));
                }
                _ => {}
            }
        }
    })
    .boxed()
}

pub(super) async fn stream(
    State(d): State<Arc<Dashboard>>,
    headers: HeaderMap,
    Query(q): Query<LiveQuery>,
) -> PageResult {
    let watch_events = "/berth.v1.AgentService/WatchEvents";
    let caller = d.caller(&headers, watch_events)?;
    let keys = d.store.keys();
    let messages: BoxStream<'static, Result<Event, Infallible>> = match (&q.agent, &q.nodes) {
        (Some(agent), _) => {
            berth_proto::validate::dns_label("agent", agent)
                .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
            let request = d.request(
                &caller,
                watch_events,
                WatchEventsRequest {
                    agent: agent.clone(),
                    since_revision: q.since.max(0),
                    follow: true,
                },
            )?;
            let events = d.agents.watch_events(request).await?.into_inner();
            let events = events.filter_map(|event| async move {
                let event = event.ok()?;
                let time = event
                    .time
                    .as_ref()
                    .map(|t| {
                        let at = std::time::UNIX_EPOCH
                            + std::time::Duration::new(t.seconds.max(0) as u64, 0);
                        humantime::format_rfc3339_seconds(at).to_string()
                    })
                    .unwrap_or_default();
                let data = serde_json::json!({
                    "time": time,
                    "reason": event.reason,
                    "replica": event.replica,
                    "message": event.message,
                });
                Some(Ok(Event::default().event("event").data(data.to_string())))
            });
            stream::select_all([
                changes(&d, keys.status(agent)),
                changes(&d, keys.agent(agent)),
                events.boxed(),
            ])
            .boxed()
        }
        (None, Some(_)) => {
            stream::select_all([changes(&d, keys.nodes()), changes(&d, keys.cordons())]).boxed()
        }
        (None, None) => {
            stream::select_all([changes(&d, keys.statuses()), changes(&d, keys.agents())]).boxed()
        }
    };
    let stop = d.stop.clone();
    let revoked = d.revoked(&caller);
    let ended = async move {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = revoked => {}
        }
    };
    let messages = messages.take_until(Box::pin(ended));
    Ok(Sse::new(messages)
        .keep_alive(KeepAlive::default())
        .into_response())
}
