//! Deploy-to-ready, crash-to-running and crash-to-ready times of one replica on the real Docker engine, each
//! measured `RUNS` times, printed as median and worst beside the reference of the same run:
//! `docker run` of the same image until its health endpoint answers (what no orchestrator can
//! beat on this machine).
//!
//! Run: `cargo run -p berth-bench --bin lifecycle` (after `deploy/build-images.sh`).

use berth_proto::v1::{Agent, DeleteAgentRequest, GetAgentRequest, ReplicaState};
use berth_tests::docker::{http, DockerRun, NodeAgent};
use berth_tests::{eventually, unique_name, ControlPlane, Etcd};
use std::time::{Duration, Instant};

const RUNS: usize = 10;
const LIMIT: Duration = Duration::from_secs(60);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let run = DockerRun::new()?;
    let etcd = Etcd::start().await?;
    let cp = ControlPlane::start(&etcd.url()).await?;
    let _node = NodeAgent::start(&cp.url(), &unique_name("bench"), &run)?;
    let api = cp.agents().await?;
    let mut reference = berth_bench::docker_run_reference(&run, RUNS).await?;
    let mut deploy = Vec::new();
    let mut restart = Vec::new();
    let mut crash = Vec::new();
    for _ in 0..RUNS {
        let name = unique_name("bench");
        let started = Instant::now();
        let out = cp.deploy_echo(&name, &[]);
        anyhow::ensure!(out.status.success(), "deploy failed: {out:?}");
        let agent = wait(&api, &name, |a| ready(a, 0)).await?;
        deploy.push(started.elapsed());
        let address = agent.status.unwrap().replicas[0].address.clone();
        http(&address, "POST", "/crash").await;
        let crashed = Instant::now();
        wait(&api, &name, |a| running(a, 1)).await?;
        restart.push(crashed.elapsed());
        wait(&api, &name, |a| ready(a, 1)).await?;
        crash.push(crashed.elapsed());
        let mut api = api.clone();
        api.delete_agent(DeleteAgentRequest {
            name,
            resource_version: String::new(),
        })
        .await?;
    }
    println!("{RUNS} runs each, one replica, health check every 1s:");
    report("reference: docker run → health 200", &mut reference);
    report("berth deploy → ready", &mut deploy);
    report("crash → running again (reported)", &mut restart);
    report("crash → running again and ready", &mut crash);
    Ok(())
}

fn ready(agent: &Agent, restarts: u32) -> bool {
    agent
        .status
        .as_ref()
        .is_some_and(|s| s.ready_replicas == 1 && s.replicas.iter().all(|r| r.restarts == restarts))
}

fn running(agent: &Agent, restarts: u32) -> bool {
    agent.status.as_ref().is_some_and(|s| {
        s.replicas
            .iter()
            .all(|r| r.restarts == restarts && r.state == ReplicaState::Running as i32)
    })
}

async fn wait(
    api: &berth_tests::AgentClient,
    name: &str,
    check: impl Fn(&Agent) -> bool,
) -> anyhow::Result<Agent> {
    eventually(LIMIT, name, || {
        let mut api = api.clone();
        let request = GetAgentRequest {
            name: name.into(),
            ..Default::default()
        };
        let check = &check;
        async move {
            let agent = api.get_agent(request).await.ok()?.into_inner();
            check(&agent).then_some(agent)
        }
    })
    .await
}

fn report(what: &str, times: &mut [Duration]) {
    times.sort();
    let median = times[times.len() / 2];
    let worst = times[times.len() - 1];
    println!(
        "  {what:<40} median {:>7.0} ms   worst {:>7.0} ms",
        median.as_secs_f64() * 1000.0,
        worst.as_secs_f64() * 1000.0
    );
}
