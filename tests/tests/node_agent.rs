//! The node agent against the real Docker engine: deploy to ready, crash and restart, a failing
//! health check, kill -9 of the node agent (adoption), removal; stop, start, pause and resume;
//! logs, and their rotation; host volumes; crashes restarted while the control plane is down;
//! etcd standing still past the node lease.

use berth_proto::v1::{
    Agent, AgentSpec, CreateAgentRequest, DeleteAgentRequest, DesiredState, HealthCheck,
    ReplicaState, ReplicaStatus, UpdateAgentRequest,
};
use berth_tests::docker::{
    containers_labelled, data_volume, http, http_body, ready, wait_agent, DockerRun, NodeAgent,
    ECHO_IMAGE,
};
use berth_tests::{unique_name, ControlPlane, Etcd};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};

fn replica<'a>(agent: &'a Agent, id: &str) -> Option<&'a ReplicaStatus> {
    agent
        .status
        .as_ref()?
        .replicas
        .iter()
        .find(|r| r.replica == id)
}

#[tokio::test]
async fn agents_run_restart_and_survive_a_node_agent_restart() {
    let run = DockerRun::new().unwrap();
    let etcd = Etcd::start().await.unwrap();
    let cp = ControlPlane::start(&etcd.url()).await.unwrap();
    // Node names are unique per test: two node agents of one name on one engine would
    // adopt each other's containers.
    let mut node = NodeAgent::start(&cp.url(), &unique_name("node"), &run).unwrap();
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
    assert_eq!(first.node, node.name);
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
    let agent = wait_agent(
        &api,
        &name,
        "both replicas ready after the node agent restart",
        |a| ready(a) == 2,
    )
    .await
    .unwrap();
    for r in [&first, &second] {
        assert_eq!(
            replica(&agent, &r.replica).unwrap().restarts,
            1,
            "restart counts outlive the node agent"
        );
    }
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

fn state(agent: &Agent, id: &str) -> Option<ReplicaState> {
    replica(agent, id).and_then(|r| ReplicaState::try_from(r.state).ok())
}

/// The example agent's counter and whether it is kept on a volume.
async fn counter(address: &str) -> (u64, bool) {
    let (_, body) = http(address, "GET", "/state").await.expect("GET /state");
    let state: serde_json::Value = serde_json::from_str(&body).expect("JSON state");
    (
        state["counter"].as_u64().expect("counter"),
        state["persisted"].as_bool().expect("persisted"),
    )
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn lifecycle_logs_volumes_and_a_control_plane_outage() {
    let run = DockerRun::new().unwrap();
    let etcd = Etcd::start().await.unwrap();
    let mut cp = ControlPlane::start(&etcd.url()).await.unwrap();
    let node = NodeAgent::start(&cp.url(), &unique_name("node"), &run).unwrap();
    let api = cp.agents().await.unwrap();
    let name = unique_name("life");
    let id = format!("{name}-0");
    let (_data, volume) = data_volume().unwrap(); // kept until the end: the host volume
    let out = cp.deploy_echo(&name, &["-v", &volume]);
    assert!(out.status.success(), "{out:?}");
    let agent = wait_agent(&api, &name, "ready", |a| ready(a) == 1)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", cp.log(), node.log()));
    let address = replica(&agent, &id).unwrap().address.clone();
    for _ in 0..2 {
        http(&address, "POST", "/state").await.unwrap();
    }
    assert_eq!(counter(&address).await, (2, true));

    // Logs: what the container wrote so far, then, following, a line written afterwards.
    let out = cp.cli(&["logs", &name]);
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("[{id}] echo-agent listening on port 8080")),
        "the container's stderr, prefixed by replica: {out:?}"
    );
    let mut follow = tokio::process::Command::from(cp.cli_command(&[
        "logs",
        &name,
        "-f",
        "--tail",
        "1",
        "--replica",
        &id,
    ]));
    let mut follow = follow
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(follow.stdout.take().unwrap()).lines();
    let marker = format!("marker-{}", unique_name("line"));
    // The follower may attach after the first write; write until it shows the marker.
    let seen = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            http_body(&address, "POST", "/log", &marker).await.unwrap();
            match tokio::time::timeout(Duration::from_millis(500), lines.next_line()).await {
                Ok(Ok(Some(line))) if line == marker => return true,
                Ok(Ok(Some(_))) | Err(_) => continue,
                Ok(_) => return false,
            }
        }
    })
    .await;
    assert_eq!(
        seen,
        Ok(true),
        "`berth logs -f` shows new output\n{}",
        node.log()
    );
    follow.kill().await.unwrap();
    let out = cp.cli(&["logs", &name, "--replica", &format!("{name}-7")]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("has no replica {name}-7")),
        "{out:?}"
    );

    // Stop: the process ends (SIGTERM), the container stays; start runs it again.
    let container = run.containers().pop().unwrap();
    assert!(cp.cli(&["stop", &name]).status.success());
    wait_agent(&api, &name, "stopped", |a| {
        state(a, &id) == Some(ReplicaState::Stopped)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", cp.log(), node.log()));
    assert_eq!(run.inspect(&container, "{{.State.Running}}"), "false");
    assert_eq!(
        run.inspect(&container, "{{.State.ExitCode}}"),
        "0",
        "graceful stop"
    );
    assert!(cp.cli(&["start", &name]).status.success());
    let agent = wait_agent(&api, &name, "started and ready", |a| ready(a) == 1)
        .await
        .unwrap();
    assert_eq!(run.inspect(&container, "{{.State.Running}}"), "true");
    let address = replica(&agent, &id).unwrap().address.clone();

    // Pause freezes the process; resume thaws it.
    assert!(cp.cli(&["pause", &name]).status.success());
    wait_agent(&api, &name, "paused", |a| {
        state(a, &id) == Some(ReplicaState::Paused)
    })
    .await
    .unwrap();
    assert_eq!(run.inspect(&container, "{{.State.Paused}}"), "true");
    assert!(cp.cli(&["resume", &name]).status.success());
    wait_agent(&api, &name, "resumed", |a| {
        state(a, &id) == Some(ReplicaState::Running) && ready(a) == 1
    })
    .await
    .unwrap();
    assert_eq!(run.inspect(&container, "{{.State.Paused}}"), "false");

    // With the control plane down, a crash is still restarted by the node agent, and the
    // status catches up when the control plane is back.
    let started = run.inspect(&container, "{{.State.StartedAt}}");
    cp.kill();
    http(&address, "POST", "/crash").await.unwrap();
    berth_tests::eventually(
        Duration::from_secs(20),
        "the node agent restarts the crash alone",
        || {
            let again = run.inspect(&container, "{{.State.StartedAt}}") != started
                && run.inspect(&container, "{{.State.Running}}") == "true";
            async move { again.then_some(()) }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", node.log()));
    cp.resume().await.unwrap();
    let api = cp.agents().await.unwrap();
    wait_agent(&api, &name, "the restart reported after the outage", |a| {
        replica(a, &id).is_some_and(|r| r.restarts == 1 && r.ready && r.last_exit_code == Some(1))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", cp.log(), node.log()));

    // The host volume outlives the agent: remove it, deploy it again, the counter is kept.
    assert!(cp.cli(&["rm", &name]).status.success());
    berth_tests::eventually(Duration::from_secs(30), "container removed", || {
        let gone = run.containers().is_empty();
        async move { gone.then_some(()) }
    })
    .await
    .unwrap();
    let out = cp.deploy_echo(&name, &["-v", &volume]);
    assert!(out.status.success(), "{out:?}");
    let agent = wait_agent(&api, &name, "ready again", |a| ready(a) == 1)
        .await
        .unwrap();
    let address = replica(&agent, &id).unwrap().address.clone();
    assert_eq!(
        counter(&address).await,
        (2, true),
        "state kept in the host volume"
    );
    assert_eq!(
        stdout(&cp.cli(&["rm", &name])).trim(),
        format!("agent/{name} deleted")
    );
    berth_tests::eventually(Duration::from_secs(30), "container removed", || {
        let gone = run.containers().is_empty();
        async move { gone.then_some(()) }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_replica_over_its_memory_limit_is_oom_killed_reported_and_restarted() {
    let run = DockerRun::new().unwrap();
    let etcd = Etcd::start().await.unwrap();
    let cp = ControlPlane::start(&etcd.url()).await.unwrap();
    let node = NodeAgent::start(&cp.url(), &unique_name("node"), &run).unwrap();
    let api = cp.agents().await.unwrap();
    let name = unique_name("oom");
    let out = cp.deploy_echo(&name, &["--memory", "48M"]);
    assert!(out.status.success(), "{out:?}");
    let agent = wait_agent(&api, &name, "1 ready", |a| ready(a) == 1)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", cp.log(), node.log()));
    let first = replica(&agent, &format!("{name}-0")).unwrap().clone();
    assert!(!first.oom_killed);

    // 200 MiB in a 48 MiB container: the kernel's OOM killer ends it (no answer comes).
    let _ = http(&first.address, "POST", "/alloc/200").await;
    let agent = wait_agent(&api, &name, "the OOM-killed replica back and ready", |a| {
        replica(a, &first.replica).is_some_and(|r| r.restarts == 1 && r.ready)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", node.log()));
    let restarted = replica(&agent, &first.replica).unwrap();
    assert!(restarted.oom_killed, "{restarted:?}");
    assert_eq!(restarted.last_exit_code, Some(137));

    let shown = cp.cli(&["get", &name]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("137 (OOMKilled)"), "{shown}");
    let events = cp.cli(&["events", &name]);
    let events = String::from_utf8_lossy(&events.stdout);
    assert!(
        events.contains("ReplicaOOMKilled") && events.contains("out of memory"),
        "{events}"
    );
}

/// busybox from Debian's busybox-static (`deploy/build-images.sh busybox`): a shell in a
/// container, with no registry.
const BUSYBOX_IMAGE: &str = "berth/busybox:local";

#[tokio::test]
async fn a_symbolic_link_swapped_into_a_volume_does_not_survive_a_restart() {
    let run = DockerRun::new().unwrap();
    let etcd = Etcd::start().await.unwrap();
    let cp = ControlPlane::start(&etcd.url()).await.unwrap();
    let node = NodeAgent::start(&cp.url(), &unique_name("node"), &run).unwrap();
    let api = cp.agents().await.unwrap();
    let name = unique_name("escape");
    let dir = tempfile::tempdir_in(berth_tests::volume_root()).unwrap();
    let outer = dir.path().join("outer");
    std::fs::create_dir_all(outer.join("inner")).unwrap();
    // Two volumes, one inside the other. On its first run the container replaces the inner
    // one's host directory, which it can write through the outer volume, with a link to `/`,
    // and crashes; Docker resolves a bind's source at every start, so a restart that did not
    // check again would mount the host's root at /inner (and the container would list it).
    let script = "if [ ! -L /outer/inner ]; then busybox rm -rf /outer/inner && \
                  busybox ln -s / /outer/inner && exit 1; fi; \
                  busybox ls /inner > /outer/seen; exec busybox sleep 3600";
    let (outer_volume, inner_volume) = (
        format!("{}:/outer", outer.display()),
        format!("{}:/inner", outer.join("inner").display()),
    );
    let out = cp.cli(&[
        "deploy",
        "-n",
        &name,
        "-i",
        BUSYBOX_IMAGE,
        "-v",
        &outer_volume,
        "-v",
        &inner_volume,
        "--command",
        "/usr/local/bin/busybox",
        "--",
        "sh",
        "-c",
        script,
    ]);
    assert!(out.status.success(), "{out:?}");
    let id = format!("{name}-0");
    let refused = wait_agent(&api, &name, "the restart refused", |a| {
        replica(a, &id).is_some_and(|r| r.message.contains("through a symbolic link"))
    })
    .await;
    let link = std::fs::read_link(outer.join("inner"));
    let seen = std::fs::read_to_string(outer.join("seen")).ok();
    // The link first, so that nothing below follows it.
    let _ = std::fs::remove_file(outer.join("inner"));
    refused.unwrap_or_else(|e| panic!("{e}\n{}", node.log()));
    assert_eq!(
        link.unwrap(),
        std::path::Path::new("/"),
        "the container made its link"
    );
    assert_eq!(
        seen, None,
        "the container never ran with the host's root mounted"
    );
    let out = cp.cli(&["delete", &name]);
    assert!(out.status.success(), "{out:?}");
}

/// Node agents that start together on one engine may each create the shared network and then
/// remove each other's duplicate. One whose network went from under it settles again and
/// creates its container again, instead of failing every start on the network it settled on.
#[tokio::test]
async fn a_node_agent_whose_network_was_replaced_settles_again_and_runs_its_replicas() {
    let run = DockerRun::new().unwrap();
    let etcd = Etcd::start().await.unwrap();
    let cp = ControlPlane::start(&etcd.url()).await.unwrap();
    let node_name = unique_name("node");
    let node = NodeAgent::start(&cp.url(), &node_name, &run).unwrap();
    // The node agent connects to the control plane only after settling its network.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !stdout(&cp.cli(&["nodes"])).contains(&node_name) {
        assert!(
            Instant::now() < deadline,
            "node never joined\n{}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let docker = |args: &[&str]| {
        let out = std::process::Command::new("docker")
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "docker {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let settled = docker(&["network", "inspect", "-f", "{{.Id}}", &run.network]);
    docker(&["network", "rm", &settled]);
    let replaced = docker(&["network", "create", &run.network]);
    assert_ne!(settled, replaced);

    let api = cp.agents().await.unwrap();
    let name = unique_name("echo");
    let out = cp.deploy_echo(&name, &[]);
    assert!(out.status.success(), "{out:?}");
    let agent = wait_agent(&api, &name, "1 ready", |a| ready(a) == 1)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", cp.log(), node.log()));
    let container = &replica(&agent, &format!("{name}-0")).unwrap().container_id;
    let networks = run.inspect(
        container,
        "{{range $k, $v := .NetworkSettings.Networks}}{{$v.NetworkID}}{{end}}",
    );
    assert_eq!(networks.trim(), replaced);
}

/// etcd standing still for longer than a node's lease (20 s) ends that lease when it goes on:
/// the node record is gone, and the node must come back under a new lease by itself (its
/// session renewed the ended lease in vain before, and the node stayed down for good). Its
/// replicas stay where they run.
#[tokio::test]
async fn a_node_comes_back_after_etcd_stood_still_past_its_lease() {
    let run = DockerRun::new().unwrap();
    let etcd = Etcd::start().await.unwrap();
    let cp = ControlPlane::start(&etcd.url()).await.unwrap();
    let node_name = unique_name("node");
    let node = NodeAgent::start(&cp.url(), &node_name, &run).unwrap();
    let api = cp.agents().await.unwrap();
    let name = unique_name("echo");
    let out = cp.deploy_echo(&name, &[]);
    assert!(out.status.success(), "{out:?}");
    let agent = wait_agent(&api, &name, "1 ready", |a| ready(a) == 1)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", cp.log(), node.log()));
    let container = replica(&agent, &format!("{name}-0"))
        .unwrap()
        .container_id
        .clone();

    // The fault lasts past the node's lease: this wait is the fault, not a readiness poll.
    etcd.signal("STOP");
    tokio::time::sleep(Duration::from_secs(23)).await;
    etcd.signal("CONT");

    let node_ready = |nodes: &str| {
        nodes.lines().any(|l| {
            l.split_whitespace()
                .take(2)
                .eq([node_name.as_str(), "Ready"])
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let nodes = stdout(&cp.cli(&["nodes"]));
        if node_ready(&nodes) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the node did not come back within 30 s of etcd going on:\n{nodes}\n{}",
            cp.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let agent = wait_agent(&api, &name, "1 ready", |a| ready(a) == 1)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", cp.log(), node.log()));
    let now = replica(&agent, &format!("{name}-0")).map(|r| r.container_id.clone());
    assert_eq!(
        now.as_deref(),
        Some(container.as_str()),
        "the replica was replaced\n{}",
        cp.log()
    );
}

/// A request of a minute to the example agent at `address`, once the agent has started it (its
/// `/data` volume at `data`); the connection is kept open until dropped.
async fn a_minute_long_request(address: &str, data: &std::path::Path) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut in_flight = tokio::net::TcpStream::connect(address).await.unwrap();
    in_flight
        .write_all(b"GET /slow?ms=60000 HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let log = data.join("slow.log");
    berth_tests::eventually(Duration::from_secs(10), "the slow request started", || {
        let started = std::fs::read_to_string(&log).is_ok_and(|l| l.contains("start"));
        async move { started.then_some(()) }
    })
    .await
    .unwrap();
    in_flight
}

/// A replica that takes all of its stop grace (a request in flight outlasting it) holds up
/// nothing else on its node: another agent's crash is restarted meanwhile, and the stopping
/// replica is out of rotation from the moment it is asked to stop.
#[tokio::test]
async fn a_crash_is_restarted_while_another_agent_takes_its_stop_grace() {
    let run = DockerRun::new().unwrap();
    let etcd = Etcd::start().await.unwrap();
    let cp = ControlPlane::start(&etcd.url()).await.unwrap();
    let node = NodeAgent::start(&cp.url(), &unique_name("node"), &run).unwrap();
    let api = cp.agents().await.unwrap();
    let (slow, crashy) = (unique_name("slowstop"), unique_name("crashy"));
    let (data, volume) = data_volume().unwrap();
    let grace = Duration::from_secs(20);
    for out in [
        cp.deploy_echo(&slow, &["--stop-grace", "20s", "-v", &volume]),
        cp.deploy_echo(&crashy, &[]),
    ] {
        assert!(out.status.success(), "{out:?}");
    }
    let mut address = Vec::new();
    for name in [&slow, &crashy] {
        let agent = wait_agent(&api, name, "ready", |a| ready(a) == 1)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}\n{}", cp.log(), node.log()));
        address.push(
            replica(&agent, &format!("{name}-0"))
                .unwrap()
                .address
                .clone(),
        );
    }
    let slow_id = format!("{slow}-0");
    let container = replica(
        &wait_agent(&api, &slow, "listed", |_| true).await.unwrap(),
        &slow_id,
    )
    .unwrap()
    .container_id
    .clone();

    // A request for a minute, kept open: the echo agent finishes it before it ends on SIGTERM.
    let in_flight = a_minute_long_request(&address[0], data.path()).await;

    let asked = Instant::now();
    assert!(cp.cli(&["stop", &slow]).status.success());
    wait_agent(&api, &slow, "out of rotation while stopping", |a| {
        replica(a, &slow_id).is_some_and(|r| r.state == ReplicaState::Stopping as i32 && !r.ready)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", node.log()));
    let shown = stdout(&cp.cli(&["get", &slow]));
    assert!(
        shown.contains(" stopping ")
            && shown.contains(&format!(
                "{slow_id}: asked to stop; SIGTERM sent, SIGKILL after 20s"
            )),
        "{shown}"
    );
    http(&address[1], "POST", "/crash").await.unwrap();
    wait_agent(&api, &crashy, "the crash restarted and ready", |a| {
        replica(a, &format!("{crashy}-0")).is_some_and(|r| r.restarts == 1 && r.ready)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", node.log()));
    let restarted = asked.elapsed();
    let agent = wait_agent(&api, &slow, "listed", |_| true).await.unwrap();
    assert_ne!(
        state(&agent, &slow_id),
        Some(ReplicaState::Stopped),
        "the crash was restarted only after the other stop ended ({restarted:?})\n{}",
        node.log()
    );
    assert!(restarted < grace, "restarted after {restarted:?}");

    // The stop itself took its whole grace, then SIGKILL.
    wait_agent(&api, &slow, "stopped", |a| {
        state(a, &slow_id) == Some(ReplicaState::Stopped)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", node.log()));
    let stopped = asked.elapsed();
    assert!(
        stopped >= grace - Duration::from_secs(1),
        "stopped after {stopped:?}"
    );
    assert_eq!(run.inspect(&container, "{{.State.ExitCode}}"), "137");
    drop(in_flight);
}

/// A node agent killed while a replica takes its stop grace (its spec replaced, a request in
/// flight outlasting the grace) leaves that stop to Docker; the node agent started again
/// replaces the old container with one of the new spec, and the two never run at once.
#[tokio::test]
async fn a_node_agent_killed_mid_stop_finishes_the_replacement_when_it_is_back() {
    let run = DockerRun::new().unwrap();
    let etcd = Etcd::start().await.unwrap();
    let cp = ControlPlane::start(&etcd.url()).await.unwrap();
    let mut node = NodeAgent::start(&cp.url(), &unique_name("node"), &run).unwrap();
    let mut api = cp.agents().await.unwrap();
    let name = unique_name("slowstop");
    let id = format!("{name}-0");
    let (data, volume) = data_volume().unwrap();
    let out = cp.deploy_echo(&name, &["--stop-grace", "8s", "-v", &volume]);
    assert!(out.status.success(), "{out:?}");
    let agent = wait_agent(&api, &name, "ready", |a| ready(a) == 1)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", cp.log(), node.log()));
    let old = replica(&agent, &id).unwrap().clone();

    let in_flight = a_minute_long_request(&old.address, data.path()).await;

    // A new spec: the old container is asked to stop (SIGTERM, SIGKILL after 8 s) ...
    let mut spec = agent.spec.clone().unwrap();
    spec.env.insert("GENERATION".into(), "2".into());
    api.update_agent(UpdateAgentRequest {
        spec: Some(spec),
        resource_version: String::new(),
    })
    .await
    .unwrap();
    wait_agent(&api, &name, "the old container stopping", |a| {
        state(a, &id) == Some(ReplicaState::Stopping)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", node.log()));
    // ... and the node agent is killed during that stop, then started again.
    node.kill();
    let killed = Instant::now();
    node.resume().unwrap();

    let label = format!("berth.agent={name}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let new = loop {
        let running = containers_labelled(&label, false);
        assert!(
            running.len() <= 1,
            "old and new containers running at once: {running:?}\n{}",
            node.log()
        );
        let agent = wait_agent(&api, &name, "listed", |_| true).await.unwrap();
        if let Some(r) = replica(&agent, &id)
            .filter(|r| r.ready && r.container_id != old.container_id && !r.container_id.is_empty())
        {
            break r.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no new container ready within 60 s: {agent:?}\n{}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let replaced = killed.elapsed();
    assert!(
        replaced >= Duration::from_secs(5),
        "the new container ran {replaced:?} after the kill, before the old one's grace ended"
    );
    assert_eq!(
        run.inspect(
            &new.container_id,
            "{{range .Config.Env}}{{println .}}{{end}}"
        )
        .lines()
        .filter(|l| *l == "GENERATION=2")
        .count(),
        1,
        "the new container has the new spec"
    );
    assert_eq!(
        run.containers(),
        vec![new.container_id.clone()],
        "the old container is removed"
    );
    drop(in_flight);
}

#[tokio::test]
async fn a_containers_log_is_rotated_and_its_files_stay_bounded() {
    let run = DockerRun::new().unwrap();
    let etcd = Etcd::start().await.unwrap();
    let cp = ControlPlane::start(&etcd.url()).await.unwrap();
    let node = NodeAgent::start_with(
        &cp.url(),
        &unique_name("node"),
        &run,
        &[
            "--container-log-max-size",
            "256KiB",
            "--container-log-max-files",
            "2",
        ],
    )
    .unwrap();
    let api = cp.agents().await.unwrap();
    let name = unique_name("logs");
    let out = cp.deploy_echo(&name, &[]);
    assert!(out.status.success(), "{out:?}");
    let agent = wait_agent(&api, &name, "ready", |a| ready(a) == 1)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", cp.log(), node.log()));
    let address = replica(&agent, &format!("{name}-0"))
        .unwrap()
        .address
        .clone();
    let container = run.containers().pop().expect("the replica's container");
    let driver = std::process::Command::new("docker")
        .args(["info", "-f", "{{.LoggingDriver}}"])
        .output()
        .unwrap();
    let driver = String::from_utf8_lossy(&driver.stdout).trim().to_string();
    let config: serde_json::Value =
        serde_json::from_str(&run.inspect(&container, "{{json .HostConfig.LogConfig}}")).unwrap();
    if !matches!(driver.as_str(), "json-file" | "local") {
        // An engine whose driver keeps logs elsewhere rotates them by its own settings.
        assert_eq!(config["Config"], serde_json::json!({}), "{config}");
        return;
    }
    assert_eq!(config["Type"], driver.as_str(), "{config}");
    assert_eq!(
        config["Config"],
        serde_json::json!({"max-size": "262144", "max-file": "2"}),
        "{config}"
    );

    // 2.5 MiB of output: ten times what one file holds.
    let line = "x".repeat(64 << 10);
    for _ in 0..40 {
        http_body(&address, "POST", "/log", &line).await.unwrap();
    }
    let marker = unique_name("last-line");
    http_body(&address, "POST", "/log", &marker).await.unwrap();
    let path = std::path::PathBuf::from(run.inspect(&container, "{{.LogPath}}"));
    let dir = path.parent().unwrap();
    // The engine's files, where this user may read them (root; CI runs as root).
    if let (Ok(entries), true) = (std::fs::read_dir(dir), driver == "json-file") {
        let stem = path.file_name().unwrap().to_string_lossy().into_owned();
        let files: Vec<u64> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with(&stem))
            .map(|e| e.metadata().unwrap().len())
            .collect();
        assert!(files.len() <= 2, "at most two files: {files:?}");
        // A file is rotated once past the size: by at most one log message (16 KiB of
        // output, JSON-encoded) over it.
        assert!(
            files.iter().all(|&bytes| bytes <= (256 << 10) + (20 << 10)),
            "{files:?}"
        );
    }
    // What was logged last is still there to read.
    let out = cp.cli(&["logs", &name, "--tail", "1"]);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains(&marker), "{out:?}");
}
