//! The node agent against the real Docker engine: deploy to ready, crash and restart, a failing
//! health check, kill -9 of the node agent (adoption), and removal.

use berth_proto::v1::{
    Agent, AgentSpec, CreateAgentRequest, DeleteAgentRequest, DesiredState, HealthCheck,
    ReplicaStatus,
};
use berth_tests::docker::{http, wait_agent, DockerRun, NodeAgent, ECHO_IMAGE};
use berth_tests::{unique_name, ControlPlane, Etcd};
use std::time::{Duration, Instant};

fn replica<'a>(agent: &'a Agent, id: &str) -> Option<&'a ReplicaStatus> {
    agent
        .status
        .as_ref()?
        .replicas
        .iter()
        .find(|r| r.replica == id)
}

fn ready(agent: &Agent) -> u32 {
    agent
        .status
        .as_ref()
        .map(|s| s.ready_replicas)
        .unwrap_or_default()
}

#[tokio::test]
async fn agents_run_restart_and_survive_a_node_agent_restart() {
    let run = DockerRun::new().unwrap();
    let etcd = Etcd::start().await.unwrap();
    let cp = ControlPlane::start(&etcd.url()).await.unwrap();
    let mut node = NodeAgent::start(&cp.url(), "node-1", &run).unwrap();
    let mut api = cp.agents().await.unwrap();
    let name = unique_name("echo");
    let spec = AgentSpec {
        name: name.clone(),
        image: ECHO_IMAGE.into(),
        replicas: Some(2),
        health: Some(HealthCheck {
            path: "/health".into(),
            interval: Some(pbjson_types::Duration {
                seconds: 1,
                nanos: 0,
            }),
            retries: 2,
            ..Default::default()
        }),
        ..Default::default()
    };
    let deployed = Instant::now();
    api.create_agent(CreateAgentRequest {
        spec: Some(spec),
        desired_state: DesiredState::Running as i32,
    })
    .await
    .unwrap();
    let agent = wait_agent(&api, &name, "2 ready replicas", |a| ready(a) == 2)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", cp.log(), node.log()));
    eprintln!("deploy to 2 ready: {:?}", deployed.elapsed());
    let first = replica(&agent, &format!("{name}-0")).unwrap().clone();
    assert_eq!(first.node, "node-1");
    assert!(!first.container_id.is_empty());
    let (code, body) = http(&first.address, "GET", "/health")
        .await
        .expect("the replica answers at its address");
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    assert_eq!(run.containers().len(), 2);

    // A crash is restarted by the node agent itself, and reported.
    http(&first.address, "POST", "/crash").await.unwrap();
    let crashed = Instant::now();
    let agent = wait_agent(&api, &name, "the crashed replica back and ready", |a| {
        replica(a, &first.replica).is_some_and(|r| r.restarts == 1 && r.ready)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", node.log()));
    eprintln!("crash to ready again: {:?}", crashed.elapsed());
    let restarted = replica(&agent, &first.replica).unwrap();
    assert_eq!(restarted.last_exit_code, Some(1));
    assert_eq!(
        restarted.container_id, first.container_id,
        "the same container is restarted"
    );

    // A failing health check restarts the replica after `retries` failures.
    let second = replica(&agent, &format!("{name}-1")).unwrap().clone();
    http(&second.address, "POST", "/health/fail").await.unwrap();
    wait_agent(
        &api,
        &name,
        "the unhealthy replica restarted and healthy",
        |a| replica(a, &second.replica).is_some_and(|r| r.restarts == 1 && r.ready),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", node.log()));

    // kill -9 of the node agent and a fresh start: the same containers, none restarted.
    let containers = run.containers();
    let started: Vec<String> = containers
        .iter()
        .map(|c| run.inspect(c, "{{.State.StartedAt}}"))
        .collect();
    node.kill();
    node.resume().unwrap();
    wait_agent(
        &api,
        &name,
        "both replicas ready after the node agent restart",
        |a| ready(a) == 2,
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await; // let a wrongful restart show, if any
    assert_eq!(
        run.containers(),
        containers,
        "containers were adopted, not replaced\n{}",
        node.log()
    );
    let after: Vec<String> = containers
        .iter()
        .map(|c| run.inspect(c, "{{.State.StartedAt}}"))
        .collect();
    assert_eq!(started, after, "no container was restarted");

    // Deleting the agent removes its containers.
    api.delete_agent(DeleteAgentRequest {
        name: name.clone(),
        resource_version: String::new(),
    })
    .await
    .unwrap();
    berth_tests::eventually(Duration::from_secs(30), "containers removed", || {
        let empty = run.containers().is_empty();
        async move { empty.then_some(()) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", node.log()));
}
