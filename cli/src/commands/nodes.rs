//! `berth nodes`, `berth cordon`, `berth uncordon`, `berth drain`: the fleet.

use crate::client::Client;
use crate::output::{print_object, table, Format};
use anyhow::bail;
use berth_proto::v1::{
    DenyNodeRequest, GetNodeRequest, ListDeniedNodesRequest, ListNodesRequest, Node,
    NodeActionRequest, NodeStatus,
};
use std::time::{Duration, Instant};

fn status_word(node: &Node) -> String {
    let status = match NodeStatus::try_from(node.status) {
        Ok(NodeStatus::Ready) => "Ready",
        Ok(NodeStatus::Unknown) => "Unknown",
        Ok(NodeStatus::Down) => "Down",
        _ => "-",
    };
    match (node.cordoned, node.draining) {
        (_, true) => format!("{status},Draining"),
        (true, false) => format!("{status},Cordoned"),
        _ => status.to_string(),
    }
}

fn cpu(millis: u32) -> String {
    format!("{:.1}", millis as f64 / 1000.0)
}

fn memory(bytes: u64) -> String {
    format!("{:.1}Gi", bytes as f64 / (1u64 << 30) as f64)
}

/// Lists the nodes.
pub async fn list(client: &Client, format: Format) -> anyhow::Result<()> {
    let listed = client
        .nodes()
        .list_nodes(ListNodesRequest {})
        .await
        .map_err(|s| client.explain(s))?
        .into_inner();
    if format != Format::Table {
        return print_object(format, &listed);
    }
    let mut out = table(&[
        "NAME",
        "STATUS",
        "CPU",
        "MEMORY",
        "ALLOCATED CPU",
        "ALLOCATED MEMORY",
        "REPLICAS",
        "LAST SEEN",
    ]);
    for n in &listed.nodes {
        let capacity = n.capacity.unwrap_or_default();
        let allocated = n.allocated.unwrap_or_default();
        let seen = timestamp(n.last_seen.as_ref());
        out.add_row(vec![
            n.name.clone(),
            status_word(n),
            cpu(capacity.cpu_millis),
            memory(capacity.memory_bytes),
            cpu(allocated.cpu_millis),
            memory(allocated.memory_bytes),
            n.replicas.to_string(),
            seen,
        ]);
    }
    outln!("{out}");
    Ok(())
}

fn timestamp(t: Option<&pbjson_types::Timestamp>) -> String {
    t.map(|t| {
        let at = std::time::UNIX_EPOCH + std::time::Duration::new(t.seconds.max(0) as u64, 0);
        humantime::format_rfc3339_seconds(at).to_string()
    })
    .unwrap_or_else(|| "-".into())
}

/// Lists the denied node names.
pub async fn list_denied(client: &Client, format: Format) -> anyhow::Result<()> {
    let listed = client
        .nodes()
        .list_denied_nodes(ListDeniedNodesRequest {})
        .await
        .map_err(|s| client.explain(s))?
        .into_inner();
    if format != Format::Table {
        return print_object(format, &listed);
    }
    let mut out = table(&["NAME", "SINCE", "REASON"]);
    for n in &listed.nodes {
        out.add_row(vec![
            n.name.clone(),
            timestamp(n.since.as_ref()),
            n.reason.clone(),
        ]);
    }
    outln!("{out}");
    Ok(())
}

/// Denies a node name.
pub async fn deny(client: &Client, name: String, reason: String) -> anyhow::Result<()> {
    client
        .nodes()
        .deny_node(DenyNodeRequest {
            name: name.clone(),
            reason,
        })
        .await
        .map_err(|s| client.explain(s))?;
    outln!("node/{name} denied: its stream is refused and its replicas move elsewhere");
    Ok(())
}

/// Takes a node name off the deny list.
pub async fn allow(client: &Client, name: String) -> anyhow::Result<()> {
    client
        .nodes()
        .allow_node(NodeActionRequest { name: name.clone() })
        .await
        .map_err(|s| client.explain(s))?;
    outln!("node/{name} allowed");
    Ok(())
}

/// Cordons or uncordons nodes.
pub async fn cordon(client: &Client, names: Vec<String>, cordoned: bool) -> anyhow::Result<()> {
    let mut nodes = client.nodes();
    for name in names {
        let request = NodeActionRequest { name: name.clone() };
        if cordoned {
            nodes.cordon_node(request).await
        } else {
            nodes.uncordon_node(request).await
        }
        .map_err(|s| client.explain(s))?;
        let word = if cordoned { "cordoned" } else { "uncordoned" };
        outln!("node/{name} {word}");
    }
    Ok(())
}

/// Drains nodes: cordons each, has its replicas replaced elsewhere (the control plane starts
/// each replacement and stops the old replica once it is ready), and waits until nothing
/// that can move is left, or fails after `timeout` saying what is still there.
pub async fn drain(client: &Client, names: Vec<String>, timeout: Duration) -> anyhow::Result<()> {
    let mut nodes = client.nodes();
    for name in &names {
        let node = nodes
            .drain_node(NodeActionRequest { name: name.clone() })
            .await
            .map_err(|s| client.explain(s))?
            .into_inner();
        outln!("node/{name} cordoned, draining {} replicas", node.replicas);
    }
    let deadline = Instant::now() + timeout;
    for name in names {
        let started = Instant::now();
        loop {
            let node = nodes
                .get_node(GetNodeRequest { name: name.clone() })
                .await
                .map_err(|s| client.explain(s))?
                .into_inner();
            if !node.draining {
                let kept = match node.replicas {
                    0 => String::new(),
                    n => format!(" ({n} replicas pinned by host volumes stay)"),
                };
                outln!(
                    "node/{name} drained in {:.1}s{kept}",
                    started.elapsed().as_secs_f64()
                );
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "node/{name} still has {} replicas after {}: see `berth get` for agents \
                     that cannot move (Unschedulable, RolloutHalted); the drain goes on",
                    node.replicas,
                    humantime::format_duration(timeout)
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    Ok(())
}
