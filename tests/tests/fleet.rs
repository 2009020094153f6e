//! The fleet on real Docker: three node agents (their own names, one engine), a partition made
//! by stopping a node agent with SIGSTOP, a short blip, etcd standing still past the node
//! lease, a drain, rolling updates, and leader failover between two control planes (the leader
//! killed, or standing still past its term).

use berth_proto::v1::{Agent, Node, NodeStatus};
use berth_tests::docker::{ready, wait_agent, DockerRun, NodeAgent, ECHO_IMAGE};
use berth_tests::{eventually, unique_name, ControlPlane, Etcd};
use prost::Message;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Replica → node, for ready replicas.
fn nodes_of(agent: &Agent) -> HashMap<String, String> {
    agent
        .status
        .iter()
        .flat_map(|s| &s.replicas)
        .filter(|r| r.ready)
        .map(|r| (r.replica.clone(), r.node.clone()))
        .collect()
}

/// The node's record, if it has one.
async fn node_record(etcd: &Etcd, name: &str) -> Option<Node> {
    let mut client = etcd.client().await.ok()?;
    let resp = client
        .get(format!("/berth/nodes/{name}"), None)
        .await
        .ok()?;
    let kv = resp.kvs().first()?;
    Node::decode(kv.value()).ok()
}

/// Running containers of one node, by the node label.
fn containers_of(node: &str) -> Vec<String> {
    berth_tests::docker::containers_labelled(&format!("berth.node={node}"), false)
}

/// etcd, a control plane and three node agents (named `{prefix}0`…), each connected.
struct Fleet {
    run: DockerRun,
    etcd: Etcd,
    cp: ControlPlane,
    nodes: Vec<NodeAgent>,
    api: berth_tests::AgentClient,
}

impl Fleet {
    async fn start(prefix: &str) -> Self {
        let run = DockerRun::new().unwrap();
        let etcd = Etcd::start().await.unwrap();
        let cp = ControlPlane::start(&etcd.url()).await.unwrap();
        let nodes: Vec<NodeAgent> = (0..3)
            .map(|i| {
                NodeAgent::start(&cp.url(), &unique_name(&format!("{prefix}{i}")), &run).unwrap()
            })
            .collect();
        let api = cp.agents().await.unwrap();
        for node in &nodes {
            eventually(Duration::from_secs(20), "the node connected", || async {
                let record = node_record(&etcd, &node.name).await?;
                (record.status == NodeStatus::Ready as i32).then_some(())
            })
            .await
            .unwrap();
        }
        Self {
            run,
            etcd,
            cp,
            nodes,
            api,
        }
    }

    /// Deploys an agent of three replicas (named from `prefix`) and waits until all are ready.
    async fn deploy_three(&self, prefix: &str) -> (String, Agent) {
        let name = unique_name(prefix);
        let out = self
            .cp
            .cli(&["deploy", "-n", &name, "-i", ECHO_IMAGE, "--replicas", "3"]);
        assert!(out.status.success(), "{out:?}");
        let agent = wait_agent(&self.api, &name, "3 ready", |a| ready(a) == 3)
            .await
            .unwrap_or_else(|e| {
                let logs: Vec<String> = self.nodes.iter().map(NodeAgent::log).collect();
                panic!("{e}\n{}\n{}", self.cp.log(), logs.join("\n"))
            });
        (name, agent)
    }
}

/// When each of `containers` started.
fn started_at(run: &DockerRun, containers: &[String]) -> Vec<String> {
    containers
        .iter()
        .map(|c| run.inspect(c, "{{.State.StartedAt}}"))
        .collect()
}

#[tokio::test]
async fn a_partitioned_node_loses_its_replicas_and_a_blip_restarts_nothing() {
    let fleet = Fleet::start("n").await;
    let (name, agent) = fleet.deploy_three("spread").await;
    let Fleet {
        run,
        etcd,
        cp,
        nodes,
        api,
    } = fleet;
    let placed = nodes_of(&agent);
    let mut used: Vec<&String> = placed.values().collect();
    used.sort();
    used.dedup();
    assert_eq!(used.len(), 3, "one replica per node: {placed:?}");
    let out = cp.cli(&["nodes", "-o", "json"]);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ours: Vec<&serde_json::Value> = listed["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| nodes.iter().any(|a| n["name"] == a.name.as_str()))
        .collect();
    assert_eq!(ours.len(), 3, "{listed}");
    assert!(ours
        .iter()
        .all(|n| n["status"] == "NODE_STATUS_READY" && n["replicas"] == 1));

    // A cordoned node gets nothing new.
    assert!(cp.cli(&["cordon", &nodes[2].name]).status.success());
    assert!(cp.cli(&["scale", &name, "4"]).status.success());
    let agent = wait_agent(&api, &name, "4 ready", |a| ready(a) == 4)
        .await
        .unwrap();
    let fourth = &nodes_of(&agent)[&format!("{name}-3")];
    assert_ne!(*fourth, nodes[2].name, "not on the cordoned node");
    assert!(cp.cli(&["scale", &name, "3"]).status.success());
    assert!(cp.cli(&["uncordon", &nodes[2].name]).status.success());
    wait_agent(&api, &name, "back to 3", |a| {
        a.status
            .as_ref()
            .is_some_and(|s| s.replicas.len() == 3 && s.ready_replicas == 3)
    })
    .await
    .unwrap();
    eventually(
        Duration::from_secs(20),
        "the fourth container removed",
        || {
            let n = run.containers().len();
            async move { (n == 3).then_some(()) }
        },
    )
    .await
    .unwrap();

    // A 5 s blip: nothing restarts or moves.
    let containers = run.containers();
    let started = started_at(&run, &containers);
    nodes[0].signal("STOP");
    tokio::time::sleep(Duration::from_secs(5)).await; // the blip itself
    nodes[0].signal("CONT");
    tokio::time::sleep(Duration::from_secs(3)).await; // room for a wrongful reaction
    let agent = wait_agent(&api, &name, "3 ready", |a| ready(a) == 3)
        .await
        .unwrap();
    assert_eq!(nodes_of(&agent), placed, "nothing moved");
    assert_eq!(run.containers(), containers, "nothing replaced");
    let after = started_at(&run, &containers);
    assert_eq!(after, started, "nothing restarted");

    // A partition: unknown after 10 s, down after 20 s, its replica ready elsewhere.
    let lost = &nodes[1];
    let moved: Vec<String> = placed
        .iter()
        .filter(|(_, n)| **n == lost.name)
        .map(|(r, _)| r.clone())
        .collect();
    assert_eq!(moved.len(), 1);
    let cut = Instant::now();
    lost.signal("STOP");
    eventually(Duration::from_secs(20), "the node unknown", || async {
        let record = node_record(&etcd, &lost.name).await?;
        (record.status == NodeStatus::Unknown as i32).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", cp.log()));
    let unknown_after = cut.elapsed();
    let agent = eventually(
        Duration::from_secs(40),
        "the replica ready elsewhere",
        || async {
            let agent = api
                .clone()
                .get_agent(berth_proto::v1::GetAgentRequest {
                    name: name.clone(),
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner();
            let now = nodes_of(&agent);
            let elsewhere = now.get(&moved[0]).is_some_and(|n| *n != lost.name);
            (elsewhere && ready(&agent) == 3).then_some(agent)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", cp.log()));
    let replaced_after = cut.elapsed();
    assert!(
        node_record(&etcd, &lost.name).await.is_none(),
        "down: record gone"
    );
    eprintln!(
        "node loss → unknown {unknown_after:.1?}, → replacement ready {replaced_after:.1?} ({} now on {})",
        moved[0],
        nodes_of(&agent)[&moved[0]]
    );

    // Back from the partition: it stops the replica that now runs elsewhere.
    lost.signal("CONT");
    eventually(Duration::from_secs(30), "the stale replica stopped", || {
        let left = containers_of(&lost.name).len();
        async move { (left == 0).then_some(()) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", lost.log()));
    let agent = wait_agent(&api, &name, "3 ready", |a| ready(a) == 3)
        .await
        .unwrap();
    assert!(nodes_of(&agent).values().all(|n| *n != lost.name));
}

/// etcd standing still past the node lease (20 s) ends every node's lease at once when it goes
/// on: each node comes back under a new lease, and no replica moves or restarts for it.
#[tokio::test]
async fn etcd_standing_still_past_the_node_lease_moves_nothing() {
    let fleet = Fleet::start("s").await;
    let (name, agent) = fleet.deploy_three("still").await;
    let Fleet {
        run,
        etcd,
        cp,
        nodes,
        api,
    } = fleet;
    let placed = nodes_of(&agent);
    let containers = run.containers();
    assert_eq!(containers.len(), 3);
    let started = started_at(&run, &containers);

    etcd.signal("STOP");
    tokio::time::sleep(Duration::from_secs(23)).await; // the fault itself
    etcd.signal("CONT");
    for node in &nodes {
        eventually(Duration::from_secs(30), "the node back", || async {
            let record = node_record(&etcd, &node.name).await?;
            (record.status == NodeStatus::Ready as i32).then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", node.name, cp.log()));
    }
    tokio::time::sleep(Duration::from_secs(3)).await; // room for a wrongful reaction
    let agent = wait_agent(&api, &name, "3 ready", |a| ready(a) == 3)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cp.log()));
    assert_eq!(nodes_of(&agent), placed, "nothing moved\n{}", cp.log());
    assert_eq!(run.containers(), containers, "nothing replaced");
    let after = started_at(&run, &containers);
    assert_eq!(after, started, "nothing restarted");
}

#[tokio::test]
async fn another_control_plane_leads_when_the_leader_dies() {
    let run = DockerRun::new().unwrap();
    let etcd = Etcd::start().await.unwrap();
    let mut first = ControlPlane::start(&etcd.url()).await.unwrap();
    let second = ControlPlane::start(&etcd.url()).await.unwrap();
    let both = format!("{},{}", first.url(), second.url());
    let _node = NodeAgent::start(&both, &unique_name("n"), &run).unwrap();
    let mut client = etcd.client().await.unwrap();
    let leader = client.get("/berth/leader", None).await.unwrap();
    let leader = String::from_utf8_lossy(leader.kvs()[0].value()).into_owned();
    assert!(
        leader.ends_with(&first.addr),
        "the first to start leads: {leader}"
    );

    first.kill();
    let killed = Instant::now();
    let api = second.agents().await.unwrap();
    let name = unique_name("after");
    // The CLI is given both addresses; the first is dead, so it uses the second.
    let out = first
        .cli_command(&["deploy", "-n", &name, "-i", ECHO_IMAGE])
        .env("BERTH_ADDR", &both)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    wait_agent(&api, &name, "placed and ready after failover", |a| {
        ready(a) == 1
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", second.log()));
    let took = killed.elapsed();
    let leader = client.get("/berth/leader", None).await.unwrap();
    let leader = String::from_utf8_lossy(leader.kvs()[0].value()).into_owned();
    assert!(leader.ends_with(&second.addr), "{leader}");
    eprintln!("leader kill -9 → new leader placed a new agent's replica, ready: {took:.1?}");

    // Nothing fits: a condition says why, node by node.
    let huge = unique_name("huge");
    let out = second.cli(&["deploy", "-n", &huge, "-i", ECHO_IMAGE, "-m", "1000G"]);
    assert!(out.status.success(), "{out:?}");
    let agent = wait_agent(&api, &huge, "an Unschedulable condition", |a| {
        a.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.r#type == "Unschedulable" && c.message.contains("needs 1024000 MiB"))
        })
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", second.log()));
    let shown = String::from_utf8_lossy(&second.cli(&["get", &huge]).stdout).into_owned();
    assert!(shown.contains("Unschedulable"), "{shown}");
    assert_eq!(ready(&agent), 0);
    assert!(took < Duration::from_secs(20), "{took:?}");
}

/// Deploys one replica of the example agent named `{prefix}-…` through `cp`; its name, once
/// ready.
async fn deploy_one(cp: &ControlPlane, api: &berth_tests::AgentClient, prefix: &str) -> String {
    let name = unique_name(prefix);
    let out = cp.cli(&["deploy", "-n", &name, "-i", ECHO_IMAGE]);
    assert!(out.status.success(), "{out:?}");
    wait_agent(api, &name, "1 ready", |a| ready(a) == 1)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cp.log()));
    name
}

/// The leader's key and every placement key, as etcd holds them.
async fn leader_and_placements(etcd: &Etcd) -> (String, Vec<String>) {
    let mut client = etcd.client().await.unwrap();
    let leader = client.get("/berth/leader", None).await.unwrap();
    let leader = leader
        .kvs()
        .first()
        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
        .unwrap_or_default();
    let options = etcd_client::GetOptions::new()
        .with_prefix()
        .with_keys_only();
    let placed = client
        .get("/berth/assignments/", Some(options))
        .await
        .unwrap();
    let keys = placed
        .kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect();
    (leader, keys)
}

#[tokio::test]
async fn a_leader_paused_past_its_term_steps_down_and_the_next_ones_placements_stand() {
    let run = DockerRun::new().unwrap();
    let etcd = Etcd::start().await.unwrap();
    let first = ControlPlane::start(&etcd.url()).await.unwrap();
    let second = ControlPlane::start(&etcd.url()).await.unwrap();
    let both = format!("{},{}", first.url(), second.url());
    let _node = NodeAgent::start(&both, &unique_name("n"), &run).unwrap();
    let api = second.agents().await.unwrap();
    let (leader, _) = leader_and_placements(&etcd).await;
    assert!(leader.ends_with(&first.addr), "the first leads: {leader}");
    let name = deploy_one(&second, &api, "paused").await;

    let before = run.containers();
    let started = started_at(&run, &before);
    // The leader stands still past its lease (5 s); the second leads and places meanwhile. The
    // node, whose stream went to the first, finds it standing still and goes to the second.
    first.signal("STOP");
    eventually(Duration::from_secs(30), "the second to lead", || async {
        let (leader, _) = leader_and_placements(&etcd).await;
        leader.ends_with(&second.addr).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", second.log()));
    // The CLI given both addresses, the stopped one first, goes on to the second.
    let mut cli = first
        .cli_command(&["scale", &name, "2"])
        .env("BERTH_ADDR", &both)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = eventually(Duration::from_secs(30), "the CLI to finish", || {
        let status = cli.try_wait().unwrap();
        async move { status }
    })
    .await;
    if status.is_err() {
        cli.kill().unwrap();
    }
    let out = cli.wait_with_output().unwrap();
    assert!(status.unwrap().success(), "{out:?}");
    wait_agent(&api, &name, "2 ready", |a| ready(a) == 2)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", second.log()));
    let (_, placed) = leader_and_placements(&etcd).await;

    // Resumed, the first learns that its term ended and leads no more; what the second
    // placed stands.
    first.signal("CONT");
    eventually(
        Duration::from_secs(30),
        "the first to step down",
        || async { first.log().contains("no longer leading").then_some(()) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", first.log()));
    tokio::time::sleep(Duration::from_secs(3)).await; // room for a wrongful write
    let (leader, after) = leader_and_placements(&etcd).await;
    assert!(leader.ends_with(&second.addr), "{leader}");
    assert_eq!(after, placed, "placements as the second left them");
    let agent = wait_agent(&api, &name, "2 ready", |a| ready(a) == 2)
        .await
        .unwrap();
    assert_eq!(nodes_of(&agent).len(), 2);
    let running = |c: &String| run.inspect(c, "{{.State.Running}}") == "true";
    assert!(before.iter().all(running), "the first replica runs on");
    assert_eq!(started_at(&run, &before), started, "and was not restarted");
}

#[tokio::test]
async fn with_one_etcd_endpoint_silent_the_control_plane_keeps_its_nodes_and_leads() {
    let run = DockerRun::new().unwrap();
    let etcd = Etcd::start().await.unwrap();
    // Two endpoints, the first over a path the test stalls (the same member behind both, as
    // two members of a cluster would be).
    let path =
        berth_tests::stall::StallProxy::start(etcd.url().trim_start_matches("http://")).unwrap();
    let cp = ControlPlane::start(&format!("{},{}", path.url(), etcd.url()))
        .await
        .unwrap();
    let node = NodeAgent::start(&cp.url(), &unique_name("n"), &run).unwrap();
    let api = cp.agents().await.unwrap();
    deploy_one(&cp, &api, "silent").await;
    let containers = run.containers();
    let started = started_at(&run, &containers);

    // Silent past the node lease (20 s) and the leader's (5 s).
    path.stall();
    let stalled = Instant::now();
    let mut worst = NodeStatus::Ready;
    while stalled.elapsed() < Duration::from_secs(30) {
        let status = node_record(&etcd, &node.name)
            .await
            .map_or(NodeStatus::Down, |n| n.status());
        if status != NodeStatus::Ready {
            worst = status;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(worst, NodeStatus::Ready, "the node stayed up\n{}", cp.log());
    let (leader, _) = leader_and_placements(&etcd).await;
    assert!(
        leader.ends_with(&cp.addr),
        "it still leads: {leader}\n{}",
        cp.log()
    );
    // It still serves: a new agent is placed and started.
    deploy_one(&cp, &api, "during").await;
    assert_eq!(started_at(&run, &containers), started, "nothing restarted");
    path.heal();
}

#[tokio::test]
async fn a_new_spec_rolls_out_with_a_surge_replica_and_a_broken_one_halts() {
    let run = DockerRun::new().unwrap();
    let etcd = Etcd::start().await.unwrap();
    let cp = ControlPlane::start(&etcd.url()).await.unwrap();
    let node = NodeAgent::start(&cp.url(), &unique_name("n"), &run).unwrap();
    let api = cp.agents().await.unwrap();
    let name = unique_name("roll");
    let dir = tempfile::tempdir().unwrap();
    let manifest = |extra: &str| {
        let path = dir.path().join(format!("{}.yaml", unique_name("m")));
        let text = format!(
            "name: {name}\nimage: {ECHO_IMAGE}\nreplicas: 2\nhealth: {{path: /health, interval: 1s}}\n{extra}"
        );
        std::fs::write(&path, text).unwrap();
        path
    };
    let apply = |path: &std::path::Path| {
        let out = cp.cli(&["apply", "-f", path.to_str().unwrap()]);
        assert!(out.status.success(), "{out:?}");
    };
    apply(&manifest("env: {VERSION: '1'}\n"));
    wait_agent(&api, &name, "2 ready", |a| ready(a) == 2)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", node.log()));

    // A new environment: replaced one at a time, never with no replica ready.
    let started = Instant::now();
    apply(&manifest("env: {VERSION: '2'}\n"));
    let mut lowest = 2;
    let generation = loop {
        let agent = api
            .clone()
            .get_agent(berth_proto::v1::GetAgentRequest {
                name: name.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        lowest = lowest.min(ready(&agent));
        let generation = agent.meta.as_ref().unwrap().generation;
        let done = agent.status.as_ref().is_some_and(|s| {
            s.replicas.len() == 2
                && s.replicas
                    .iter()
                    .all(|r| r.generation == generation && r.ready)
        });
        if done {
            break generation;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "rollout stuck\n{}",
            cp.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // sampling, not waiting
    };
    eprintln!(
        "rolling update of 2 replicas: {:.1?}, fewest ready during it: {lowest}",
        started.elapsed()
    );
    assert_eq!(
        lowest, 2,
        "surge 1, unavailable 0: never fewer than 2 ready"
    );

    // A broken spec: the new replica fails, the rollout halts, the old ones keep serving.
    apply(&manifest(
        "env: {VERSION: '3'}\ncommand: [/no/such/binary]\n",
    ));
    let agent = wait_agent(&api, &name, "the rollout halted", |a| {
        a.status
            .as_ref()
            .is_some_and(|s| s.conditions.iter().any(|c| c.r#type == "RolloutHalted"))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", cp.log(), node.log()));
    let old: Vec<_> = agent
        .status
        .iter()
        .flat_map(|s| &s.replicas)
        .filter(|r| r.generation == generation && r.ready)
        .collect();
    assert_eq!(old.len(), 2, "both old replicas still serving");
    let shown = String::from_utf8_lossy(&cp.cli(&["get", &name]).stdout).into_owned();
    assert!(shown.contains("RolloutHalted"), "{shown}");
}

#[tokio::test]
async fn a_drain_moves_replicas_with_each_replacement_ready_before_the_old_one_stops() {
    let Fleet {
        run: _run,
        etcd: _etcd,
        cp,
        nodes,
        api,
    } = Fleet::start("d").await;
    let name = unique_name("drain");
    let out = cp.cli(&[
        "deploy",
        "-n",
        &name,
        "-i",
        ECHO_IMAGE,
        "--replicas",
        "3",
        "--health-endpoint",
        "/health",
        "--health-interval",
        "1s",
    ]);
    assert!(out.status.success(), "{out:?}");
    let agent = wait_agent(&api, &name, "3 ready, one per node", |a| {
        ready(a) == 3
            && nodes_of(a)
                .values()
                .collect::<std::collections::HashSet<_>>()
                .len()
                == 3
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", cp.log()));
    let drained = &nodes[0].name;
    let leaving: Vec<String> = nodes_of(&agent)
        .into_iter()
        .filter(|(_, n)| n == drained)
        .map(|(r, _)| r)
        .collect();
    assert_eq!(leaving.len(), 1);

    // `berth drain` blocks until done; the replicas are sampled meanwhile.
    let started = Instant::now();
    let mut drain = cp
        .cli_command(&["drain", drained, "--timeout", "90s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lowest = 3;
    let status = loop {
        if let Some(status) = drain.try_wait().unwrap() {
            break status;
        }
        if let Ok(agent) = api
            .clone()
            .get_agent(berth_proto::v1::GetAgentRequest {
                name: name.clone(),
                ..Default::default()
            })
            .await
        {
            lowest = lowest.min(ready(&agent.into_inner()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await; // sampling, not waiting
    };
    let took = started.elapsed();
    let out = drain.wait_with_output().unwrap();
    assert!(status.success(), "{out:?}\n{}", cp.log());
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(printed.contains("drained"), "{printed}");
    eprintln!("{printed}");
    eprintln!("drain of a node with 1 of 3 replicas: {took:.1?}, fewest ready during it: {lowest}");
    assert_eq!(
        lowest, 3,
        "each replacement ready before the old replica stops"
    );
    let agent = wait_agent(&api, &name, "3 ready, none on the drained node", |a| {
        ready(a) == 3 && nodes_of(a).values().all(|n| n != drained)
    })
    .await
    .unwrap_or_else(|e| {
        let shown = cp.cli(&["get", &name]);
        panic!("{e}\n{}", String::from_utf8_lossy(&shown.stdout))
    });
    assert_eq!(nodes_of(&agent).len(), 3);
    eventually(
        Duration::from_secs(30),
        "the drained node's container removed",
        || {
            let left = containers_of(drained).len();
            async move { (left == 0).then_some(()) }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", nodes[0].log()));
    let listed = String::from_utf8_lossy(&cp.cli(&["nodes"]).stdout).into_owned();
    let row = listed
        .lines()
        .find(|l| l.contains(drained.as_str()))
        .unwrap();
    assert!(
        row.contains("Cordoned") && !row.contains("Draining"),
        "{listed}"
    );
    // Uncordoned, the node takes new replicas again.
    assert!(cp.cli(&["uncordon", drained]).status.success());
    assert!(cp.cli(&["scale", &name, "4"]).status.success());
    let agent = wait_agent(&api, &name, "4 ready", |a| ready(a) == 4)
        .await
        .unwrap();
    assert!(
        nodes_of(&agent).values().any(|n| n == drained),
        "the fourth goes to the emptiest node"
    );
}
