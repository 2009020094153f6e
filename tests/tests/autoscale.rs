//! Autoscaling end to end: real etcd, control plane (its autoscaler's stable window shortened
//! to 6 s), node agent, gateway and example-agent containers. An agent with `min 0` goes idle
//! with its containers gone, and a request wakes it; a burst scales an agent up and the end
//! of it back down; a gateway killed while it holds a wake loses nothing; `min 1` never goes
//! to zero.

use berth_proto::v1::Agent;
use berth_tests::docker::{containers_labelled, ready, wait_agent};
use berth_tests::replay::{counts, post, setup_cluster, wait_delivered};
use berth_tests::wire::{get, send};
use berth_tests::{eventually, unique_name, ControlPlane};
use std::time::{Duration, Instant};

/// The autoscaler's stable window in these tests (its panic window is a tenth).
const WINDOW: &[&str] = &["--autoscale-window", "6s"];

fn replicas(agent: &Agent) -> u32 {
    agent.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
}

fn containers_of(agent: &str) -> Vec<String> {
    containers_labelled(&format!("berth.agent={agent}"), true)
}

fn event_reasons(cp: &ControlPlane, agent: &str) -> Vec<String> {
    let out = cp.cli(&["events", agent, "-o", "json"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|e| e["reason"].as_str().map(str::to_string))
        .collect()
}

/// Waits until `agent` is idle: asked for no replica, and none of its containers left.
async fn wait_idle(cp: &ControlPlane, agent: &str) {
    let api = cp.agents().await.unwrap();
    wait_agent(&api, agent, "asked for no replica", |a| replicas(a) == 0)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cp.log()));
    eventually(Duration::from_secs(30), "its containers gone", || async {
        containers_of(agent).is_empty().then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn an_idle_agent_is_woken_by_a_request_and_a_killed_gateway_loses_none_it_held() {
    let s = setup_cluster(
        "idle",
        WINDOW,
        &[
            "--min-replicas",
            "0",
            "--max-replicas",
            "2",
            "--scale-to-zero-after",
            "3s",
        ],
    )
    .await;
    let api = s.cp.agents().await.unwrap();
    // Beside it, an agent whose minimum is 1: it never goes to zero.
    let steady = unique_name("steady");
    let out = s.cp.deploy_echo(
        &steady,
        &["--min-replicas", "1", "--scale-to-zero-after", "1s"],
    );
    assert!(out.status.success(), "{out:?}");
    wait_agent(&api, &steady, "ready", |a| ready(a) == 1)
        .await
        .unwrap();

    // Unused for 3 s: idle, its container removed, and `berth get` and `ls` say so.
    wait_idle(&s.cp, &s.name).await;
    let shown = String::from_utf8_lossy(&s.cp.cli(&["get", &s.name]).stdout).into_owned();
    assert!(shown.contains("State:       idle"), "{shown}");
    assert!(shown.contains("no requests for 3s"), "{shown}");
    assert!(shown.contains("Idle:        for"), "{shown}");
    let listed = String::from_utf8_lossy(&s.cp.cli(&["ls"]).stdout).into_owned();
    let line = listed.lines().find(|l| l.contains(&s.name)).unwrap();
    assert!(line.contains("idle"), "{listed}");

    // A request wakes it and is answered by the agent, held until a replica was ready.
    let base = format!("/agents/{}", s.name);
    let started = Instant::now();
    let r = post(&s.gw, &format!("{base}/echo?wake=1"), "hello", "").await;
    let took = started.elapsed();
    assert_eq!(
        r.status,
        200,
        "{}\n{}",
        String::from_utf8_lossy(&r.body),
        s.gw.log()
    );
    assert_eq!(r.json()["body"], "hello");
    assert_eq!(r.json()["query"], "wake=1");
    eprintln!("wake from zero to first answer: {took:?}");
    let agent = wait_agent(&api, &s.name, "running again", |a| ready(a) >= 1)
        .await
        .unwrap();
    assert!(replicas(&agent) >= 1);
    let reasons = event_reasons(&s.cp, &s.name);
    assert!(
        reasons.iter().any(|r| r == "ScaledToZero") && reasons.iter().any(|r| r == "Woken"),
        "{reasons:?}"
    );
    let metrics = get(&s.gw.admin_addr, "/metrics").await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.lines()
            .any(|l| l.starts_with("berth_gateway_wake_seconds_count") && !l.ends_with(" 0")),
        "{text}"
    );

    // Idle again; `Prefer: respond-async` gets 202 at once, and the agent is woken all the
    // same and gets it.
    wait_idle(&s.cp, &s.name).await;
    let r = post(
        &s.gw,
        &format!("{base}/echo"),
        "later",
        "\r\nPrefer: respond-async",
    )
    .await;
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["request_id"].as_str().unwrap().to_string();
    wait_delivered(&s.gw, &[id], Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", s.gw.log(), s.cp.log()));

    // Idle again; a request is held, and its gateway is killed while it waits: the request
    // is in the queue, so a gateway started again delivers it once the agent is up.
    wait_idle(&s.cp, &s.name).await;
    // The node agent is paused meanwhile, so that no replica can answer before the kill.
    s.node.signal("STOP");
    let mut gw = s.gw;
    let (addr, path) = (gw.addr.clone(), format!("{base}/echo?held=1"));
    let held = tokio::spawn(async move {
        // Whatever comes back before the connection is cut (nothing is expected).
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nX-Berth-Request-Id: held-by-a-killed-gateway\r\n\
             Content-Length: 4\r\n\r\nheld"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        answer
    });
    eventually(Duration::from_secs(10), "the request queued", || async {
        let r = get(&gw.addr, "/requests/held-by-a-killed-gateway").await;
        (r.status == 200).then_some(())
    })
    .await
    .unwrap();
    gw.kill();
    s.node.signal("CONT");
    // The caller's connection went with the gateway, unanswered.
    let answer = held.await.unwrap();
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    gw.resume().await.unwrap();
    wait_delivered(
        &gw,
        &["held-by-a-killed-gateway".to_string()],
        Duration::from_secs(60),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", gw.log(), s.cp.log()));
    assert_eq!(
        counts(s.data.path()).get("held-by-a-killed-gateway"),
        Some(&1),
        "delivered once"
    );

    // All along, the agent whose minimum is 1 kept its replica.
    let steady_agent = wait_agent(&api, &steady, "still one replica", |a| ready(a) == 1)
        .await
        .unwrap();
    assert_eq!(replicas(&steady_agent), 1);
    assert!(!event_reasons(&s.cp, &steady)
        .iter()
        .any(|r| r == "ScaledToZero"));
    drop(gw);
}

#[tokio::test]
async fn a_burst_scales_an_agent_up_and_its_end_back_down() {
    let s = setup_cluster(
        "burst",
        WINDOW,
        &[
            "--min-replicas",
            "1",
            "--max-replicas",
            "3",
            "--target-concurrency",
            "2",
        ],
    )
    .await;
    let api = s.cp.agents().await.unwrap();
    let base = format!("/agents/{}", s.name);
    // Eight callers, each sending 2-second requests back to back: concurrency 8 at target
    // 2 asks for 4, capped at 3.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let callers: Vec<_> = (0..8)
        .map(|_| {
            let (addr, path, stop) = (
                s.gw.addr.clone(),
                format!("{base}/slow?ms=2000"),
                stop.clone(),
            );
            tokio::spawn(async move {
                let mut answered = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let r = send(&addr, &format!("GET {path} HTTP/1.1"), b"").await;
                    if r.status == 200 {
                        answered += 1;
                    }
                }
                answered
            })
        })
        .collect();
    let up = wait_agent(&api, &s.name, "scaled above 1", |a| replicas(a) > 1).await;
    let scaled = wait_agent(&api, &s.name, "more than one ready", |a| ready(a) > 1).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut answered = 0;
    for caller in callers {
        answered += caller.await.unwrap();
    }
    let up = up.unwrap_or_else(|e| panic!("{e}\n{}", s.cp.log()));
    scaled.unwrap();
    assert!(replicas(&up) <= 3);
    assert!(answered > 0);
    // The load ended: back to the minimum once it has left the window.
    wait_agent(&api, &s.name, "back to one", |a| replicas(a) == 1)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", s.cp.log()));
    let reasons = event_reasons(&s.cp, &s.name);
    assert!(
        reasons.iter().any(|r| r == "ScaledUp") && reasons.iter().any(|r| r == "ScaledDown"),
        "{reasons:?}"
    );
    let shown = String::from_utf8_lossy(&s.cp.cli(&["get", &s.name]).stdout).into_owned();
    assert!(
        shown.contains("Autoscale:   1-3 replicas, target concurrency 2"),
        "{shown}"
    );
    assert!(shown.contains("Autoscaler:  1 desired"), "{shown}");
    // The autoscaler owns the count: a manual scale is refused, naming the bounds.
    let out = s.cp.cli(&["scale", &s.name, "3"]);
    assert!(!out.status.success());
    let said = berth_tests::output_text(&out);
    assert!(said.contains("autoscaled between 1 and 3"), "{said}");
}
