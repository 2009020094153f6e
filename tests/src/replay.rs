//! The replay tests' shared setup: a cluster with one example agent whose request log is on a
//! host volume, and what tells where its requests stand.

use crate::docker::{data_volume, ready, wait_agent, DockerRun, NodeAgent};
use crate::wire::{get, send, wait_routed, Raw};
use crate::{eventually, unique_name, ControlPlane, Etcd, Gateway};
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;
use tempfile::TempDir;

/// The request ids that reached the agent, in arrival order.
pub fn arrivals(data: &Path) -> Vec<String> {
    std::fs::read_to_string(data.join("requests.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Which gateway replays each agent's queue (`replayers/`, under the default prefix), by agent.
pub async fn replayed_by(
    etcd: &mut etcd_client::Client,
) -> anyhow::Result<HashMap<String, String>> {
    let keys = berth_store::Keys::new("/berth");
    let options = etcd_client::GetOptions::new().with_prefix();
    let got = etcd.get(keys.replayers(), Some(options)).await?;
    Ok(got
        .kvs()
        .iter()
        .map(|kv| {
            let holder = String::from_utf8_lossy(kv.value()).into_owned();
            (berth_store::Keys::last_segment(kv.key()), holder)
        })
        .collect())
}

pub async fn post(gw: &Gateway, path: &str, body: &str, extra: &str) -> Raw {
    let head = format!("POST {path} HTTP/1.1{extra}");
    send(&gw.addr, &head, body.as_bytes()).await
}

/// A cluster with one example agent whose request log is on a host volume.
pub struct Setup {
    /// Removes the test's containers when dropped.
    pub run: DockerRun,
    /// The etcd.
    pub etcd: Etcd,
    /// The control plane.
    pub cp: ControlPlane,
    /// The node agent.
    pub node: NodeAgent,
    /// The gateway.
    pub gw: Gateway,
    /// The agent's name.
    pub name: String,
    /// The host side of the agent's `/data` volume (its request log).
    pub data: TempDir,
}

pub async fn setup(prefix: &str) -> Setup {
    setup_with(prefix, &[]).await
}

/// As [`setup`], with more `berth deploy` flags.
pub async fn setup_with(prefix: &str, flags: &[&str]) -> Setup {
    setup_cluster(prefix, &[], flags).await
}

/// As [`setup`], with flags of `berth control-plane` and of `berth deploy`.
pub async fn setup_cluster(prefix: &str, cp_flags: &[&str], flags: &[&str]) -> Setup {
    let run = DockerRun::new().unwrap();
    let etcd = Etcd::start().await.unwrap();
    let cp = ControlPlane::start_with(&etcd.url(), cp_flags)
        .await
        .unwrap();
    let node = NodeAgent::start(&cp.url(), &unique_name("node"), &run).unwrap();
    let gw = Gateway::start(&etcd.url()).await.unwrap();
    let name = unique_name(prefix);
    let (data, volume) = data_volume().unwrap();
    let mut args = vec!["-v", volume.as_str()];
    args.extend_from_slice(flags);
    let out = cp.deploy_echo(&name, &args);
    assert!(out.status.success(), "{out:?}");
    let api = cp.agents().await.unwrap();
    wait_agent(&api, &name, "ready", |a| ready(a) == 1)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", cp.log(), node.log()));
    wait_routed(&gw.addr, &format!("/agents/{name}/health"))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", gw.log()));
    Setup {
        run,
        etcd,
        cp,
        node,
        gw,
        name,
        data,
    }
}

/// Polls `GET /requests/{id}` until every id is delivered; on timeout, says where the rest
/// stand.
pub async fn wait_delivered(gw: &Gateway, ids: &[String], within: Duration) -> anyhow::Result<()> {
    let waited = eventually(within, "every queued request delivered", || async {
        for id in ids {
            let r = get(&gw.addr, &format!("/requests/{id}")).await;
            if r.status != 200 || r.json()["status"] != "delivered" {
                return None;
            }
        }
        Some(())
    })
    .await;
    if let Err(e) = waited {
        let mut stands: HashMap<String, usize> = HashMap::new();
        let mut examples = Vec::new();
        for id in ids {
            let r = get(&gw.addr, &format!("/requests/{id}")).await;
            let body = String::from_utf8_lossy(&r.body).into_owned();
            let state = serde_json::from_str::<serde_json::Value>(&body)
                .map(|v| format!("{} {}", r.status, v["status"]))
                .unwrap_or_else(|_| format!("{} {body}", r.status));
            if !state.contains("delivered") && examples.len() < 5 {
                examples.push(body);
            }
            *stands.entry(state).or_default() += 1;
        }
        anyhow::bail!("{e}: {stands:?}; e.g. {examples:?}");
    }
    Ok(())
}

/// Waits until `gw` sees the agent down: an opted-out request gets 503.
pub async fn wait_down(gw: &Gateway, base: &str) {
    eventually(
        Duration::from_secs(20),
        "the gateway sees no ready replica",
        || async {
            let r = post(gw, &format!("{base}/echo"), "x", "\r\nX-Berth-Replay: off").await;
            (r.status == 503).then_some(())
        },
    )
    .await
    .unwrap();
}

/// How often each id reached the agent.
pub fn counts(data: &Path) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for id in arrivals(data) {
        *seen.entry(id).or_default() += 1;
    }
    seen
}

/// Every page of `berth requests {args} -o json --limit {limit}`, followed by its tokens: the
/// request ids in order, and the largest page seen.
pub fn list_request_ids(
    cp: &ControlPlane,
    args: &[&str],
    limit: u32,
) -> anyhow::Result<(Vec<String>, usize)> {
    let (mut ids, mut largest, mut token) = (Vec::new(), 0, String::new());
    let limit = limit.to_string();
    loop {
        let mut all = vec!["requests"];
        all.extend_from_slice(args);
        all.extend(["-o", "json", "--limit", limit.as_str()]);
        if !token.is_empty() {
            all.extend(["--page-token", token.as_str()]);
        }
        let out = cp.cli(&all);
        anyhow::ensure!(out.status.success(), "berth requests: {out:?}");
        let page: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let requests = page["requests"].as_array().cloned().unwrap_or_default();
        largest = largest.max(requests.len());
        ids.extend(
            requests
                .iter()
                .map(|r| r["id"].as_str().unwrap_or_default().to_string()),
        );
        token = page["nextPageToken"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if token.is_empty() {
            return Ok((ids, largest));
        }
    }
}
