//! Scale to zero and back on the real Docker engine, beside the reference of the same run
//! (`docker run` of the same image until its health endpoint answers):
//!
//! - wake: a request to an idle agent (`--min-replicas 0`), timed to its answer, `WAKES`
//!   times (p50, p95, worst);
//! - burst: `BURST` callers at once on an idle agent, each request taking a second at the
//!   agent: all answered? in how long? how many replicas did the autoscaler ask for?
//! - the gateway SIGKILLed while it holds `HELD` requests for a wake: how many were lost
//!   (each is looked up by its id after the gateway is started again).
//!
//! The control plane's autoscaler runs with a 6 s stable window and the agent goes idle after
//! 1 s without requests, so that the runs follow each other quickly.
//!
//! Run: `cargo build --release -p berth-cli -p berth-bench && BERTH_BIN=target/release/berth
//! target/release/autoscale` (after `deploy/build-images.sh`).

use berth_bench::Conn;
use berth_proto::v1::{Agent, GetAgentRequest};
use berth_tests::docker::{containers_labelled, DockerRun, NodeAgent};
use berth_tests::wire::get;
use berth_tests::{eventually, unique_name, ControlPlane, Etcd, Gateway};
use bytes::Bytes;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WAKES: usize = 20;
const REFERENCE_RUNS: usize = 10;
const BURST: usize = 50;
const HELD: usize = 10;
const LIMIT: Duration = Duration::from_secs(120);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let run = DockerRun::new()?;
    let etcd = Etcd::start().await?;
    let cp = ControlPlane::start_with(&etcd.url(), &["--autoscale-window", "6s"]).await?;
    let _node = NodeAgent::start(&cp.url(), &unique_name("bench"), &run)?;
    let mut gw = Gateway::start(&etcd.url()).await?;
    let api = cp.agents().await?;
    let mut reference = berth_bench::docker_run_reference(&run, REFERENCE_RUNS).await?;

    let name = unique_name("wake");
    let out = cp.deploy_echo(
        &name,
        &[
            "--min-replicas",
            "0",
            "--max-replicas",
            "10",
            "--target-concurrency",
            "10",
            "--scale-to-zero-after",
            "1s",
        ],
    );
    anyhow::ensure!(out.status.success(), "deploy failed: {out:?}");
    let path = format!("/agents/{name}/echo");
    // The burst's requests take a second each, as an agent's work does.
    let slow = format!("/agents/{name}/slow?ms=1000");

    let mut wakes = Vec::new();
    for i in 0..WAKES {
        wait_idle(&api, &name).await?;
        let started = Instant::now();
        let mut conn = Conn::open(&gw.addr).await?;
        let status = conn.post(&path, Bytes::from("wake")).await?;
        anyhow::ensure!(status == 200, "wake {i} answered {status}");
        wakes.push(started.elapsed());
        eprintln!("wake {i}: {:?}", wakes[i]);
    }

    // A burst from zero: every caller at once, each on its own connection.
    wait_idle(&api, &name).await?;
    let started = Instant::now();
    let callers: Vec<_> = (0..BURST)
        .map(|i| {
            let (addr, path) = (gw.addr.clone(), slow.clone());
            tokio::spawn(async move {
                let mut conn = Conn::open(&addr).await?;
                let status = conn.post(&path, Bytes::from(format!("burst {i}"))).await?;
                anyhow::Ok((status, Instant::now()))
            })
        })
        .collect();
    let most = Arc::new(AtomicU32::new(0));
    let watching = {
        let (api, name, most) = (api.clone(), name.clone(), most.clone());
        tokio::spawn(async move {
            loop {
                if let Ok(agent) = agent(&api, &name).await {
                    most.fetch_max(replicas(&agent), Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let mut answered = 0;
    let mut last = started;
    for caller in callers {
        if let Ok(Ok((200, at))) = caller.await {
            answered += 1;
            last = last.max(at);
        }
    }
    let burst_took = last - started;
    // The count the autoscaler reached, watched until the load has left its window.
    tokio::time::sleep(Duration::from_secs(8)).await;
    watching.abort();
    let reached = most.load(Ordering::Relaxed);

    // The gateway killed while it holds requests for a wake.
    wait_idle(&api, &name).await?;
    let ids: Vec<String> = (0..HELD)
        .map(|i| unique_name(&format!("held{i}")))
        .collect();
    let _held: Vec<_> = ids
        .iter()
        .map(|id| {
            let (addr, path, id) = (gw.addr.clone(), path.clone(), id.clone());
            tokio::spawn(async move {
                let mut conn = Conn::open(&addr).await?;
                conn.request(
                    http::Method::POST,
                    &path,
                    &[("x-berth-request-id", id.as_str())],
                    Bytes::from("held"),
                )
                .await
            })
        })
        .collect();
    eventually(LIMIT, "every held request queued", || async {
        for id in &ids {
            if get(&gw.addr, &format!("/requests/{id}")).await.status != 200 {
                return None;
            }
        }
        Some(())
    })
    .await?;
    gw.kill();
    let killed = Instant::now();
    gw.resume().await?;
    let delivered = eventually(LIMIT, "every held request delivered", || async {
        for id in &ids {
            let r = get(&gw.addr, &format!("/requests/{id}")).await;
            if r.status != 200 || r.json()["status"] != "delivered" {
                return None;
            }
        }
        Some(())
    })
    .await;
    let after_kill = killed.elapsed();
    let mut lost = 0;
    for id in &ids {
        let r = get(&gw.addr, &format!("/requests/{id}")).await;
        if r.status != 200 || r.json()["status"] != "delivered" {
            lost += 1;
        }
    }
    if let Err(e) = &delivered {
        eprintln!("{e}");
    }

    let row = |what: &str, times: &mut Vec<Duration>| {
        times.sort();
        let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
        format!(
            "| {what} | {} | {:.0} ms | {:.0} ms | {:.0} ms |\n",
            times.len(),
            at(0.5).as_secs_f64() * 1000.0,
            at(0.95).as_secs_f64() * 1000.0,
            at(1.0).as_secs_f64() * 1000.0
        )
    };
    let mut report =
        String::from("| path | runs | p50 | p95 | worst |\n|---|---:|---:|---:|---:|\n");
    report += &row("reference: `docker run` → `/health` 200", &mut reference);
    report += &row("request to an idle agent → its answer (wake)", &mut wakes);
    report += &format!(
        "\n- burst: {BURST} callers at once on an idle agent (target concurrency 10), each \
         request taking 1 s at the agent: \
         {answered}/{BURST} answered 200, the last after {:.1} s; the autoscaler asked for \
         {reached} replicas at most\n",
        burst_took.as_secs_f64()
    );
    report += &format!(
        "- gateway SIGKILLed while holding {HELD} requests for a wake, started again: \
         lost {lost}, all delivered {:.1} s after the kill\n",
        after_kill.as_secs_f64()
    );
    print!("{report}");
    berth_bench::write_report(
        "autoscale",
        "Autoscale: wake from zero, burst, gateway killed during a wake",
        &report,
    )?;
    anyhow::ensure!(lost == 0, "{lost} held requests lost");
    Ok(())
}

fn replicas(agent: &Agent) -> u32 {
    agent.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
}

async fn agent(api: &berth_tests::AgentClient, name: &str) -> anyhow::Result<Agent> {
    let mut api = api.clone();
    Ok(api
        .get_agent(GetAgentRequest {
            name: name.into(),
            ..Default::default()
        })
        .await?
        .into_inner())
}

/// Waits until the agent asks for no replica and none of its containers is left.
async fn wait_idle(api: &berth_tests::AgentClient, name: &str) -> anyhow::Result<()> {
    eventually(LIMIT, "the agent idle", || async {
        let agent = agent(api, name).await.ok()?;
        let gone = containers_labelled(&format!("berth.agent={name}"), true).is_empty();
        (replicas(&agent) == 0 && gone).then_some(())
    })
    .await
}
