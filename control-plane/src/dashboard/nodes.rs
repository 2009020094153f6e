//! The nodes' page and its actions (cordon, uncordon, drain).

use super::layout::{html_page, page, time, word};
use super::{Caller, Dashboard, PageError, PageResult};
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect};
use berth_proto::v1::node_service_server::NodeService;
use berth_proto::v1::{ListNodesRequest, NodeActionRequest, NodeStatus};
use maud::{html, Markup};
use std::sync::Arc;

type D = State<Arc<Dashboard>>;

const LIST_NODES: &str = "/berth.v1.NodeService/ListNodes";

async fn nodes_table(d: &Dashboard, caller: &Caller) -> Result<Markup, PageError> {
    let request = d.request(caller, LIST_NODES, ListNodesRequest {})?;
    let nodes = d.nodes.list_nodes(request).await?.into_inner().nodes;
    Ok(html! {
        table #nodes {
            tr { th { "Name" } th { "Status" } th { "CPU" } th { "Memory" } th { "Allocated" } th { "Replicas" } th { "Last seen" } @if caller.admin() { th { "Actions" } } }
            @if nodes.is_empty() { tr { td colspan="8" .muted { "No nodes" } } }
            @for n in &nodes {
                @let capacity = n.capacity.unwrap_or_default();
                @let allocated = n.allocated.unwrap_or_default();
                @let status = NodeStatus::try_from(n.status).map(|s| word(s.as_str_name())).unwrap_or_default();
                tr data-node=(n.name) {
                    td { (n.name) }
                    td { span class=(if status == "ready" { "ok" } else { "bad" }) { (status) }
                        @if n.draining { " " span.warn { "draining" } } @else if n.cordoned { " " span.warn { "cordoned" } } }
                    td.num { (format!("{:.1}", capacity.cpu_millis as f64 / 1000.0)) }
                    td.num { (format!("{:.1} GiB", capacity.memory_bytes as f64 / (1u64 << 30) as f64)) }
                    td.num { (format!("{:.1} CPU, {:.1} GiB", allocated.cpu_millis as f64 / 1000.0, allocated.memory_bytes as f64 / (1u64 << 30) as f64)) }
                    td.num { (n.replicas) }
                    td { (time(n.last_seen.as_ref())) }
                    @if caller.admin() {
                        td.actions {
                            @if n.cordoned {
                                form method="post" action={ "/nodes/" (n.name) "/uncordon" } { button type="submit" { "Uncordon" } }
                            } @else {
                                form method="post" action={ "/nodes/" (n.name) "/cordon" } { button type="submit" { "Cordon" } }
                                form method="post" action={ "/nodes/" (n.name) "/drain" } { button.danger type="submit" { "Drain" } }
                            }
                        }
                    }
                }
            }
        }
    })
}

pub(super) async fn nodes(State(d): D, headers: HeaderMap) -> PageResult {
    let caller = d.caller(&headers, LIST_NODES)?;
    let table = nodes_table(&d, &caller).await?;
    html_page(page(
        "Nodes",
        Some(&caller),
        Some("/live?nodes=1"),
        html! { h1 { "Nodes" } div data-fragment="/fragments/nodes" { (table) } },
    ))
}

pub(super) async fn nodes_fragment(State(d): D, headers: HeaderMap) -> PageResult {
    let caller = d.caller(&headers, LIST_NODES)?;
    html_page(nodes_table(&d, &caller).await?)
}

pub(super) async fn node_action(
    State(d): D,
    headers: HeaderMap,
    Path((name, action)): Path<(String, String)>,
) -> PageResult {
    let caller = d.caller(&headers, LIST_NODES)?;
    let path = match action.as_str() {
        "cordon" => "/berth.v1.NodeService/CordonNode",
        "uncordon" => "/berth.v1.NodeService/UncordonNode",
        "drain" => "/berth.v1.NodeService/DrainNode",
        _ => return Err(tonic::Status::not_found(format!("no action {action}")).into()),
    };
    let request = d.request(&caller, path, NodeActionRequest { name: name.clone() })?;
    match action.as_str() {
        "cordon" => d.nodes.cordon_node(request).await?,
        "uncordon" => d.nodes.uncordon_node(request).await?,
        _ => d.nodes.drain_node(request).await?,
    };
    tracing::info!(node = %name, action, "dashboard action");
    Ok(Redirect::to("/nodes").into_response())
}
