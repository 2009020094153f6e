//! The gateway end to end: real etcd, control plane, node agent, gateway and example-agent
//! containers. Fidelity (method, path, query, repeated headers, binary body, added headers),
//! streaming, tokens, errors, a crash hidden by retries, and a replica answering 500s cut off by
//! its breaker and let back in by a probe.

use berth_proto::v1::{Agent, BreakerState};
use berth_tests::docker::{get_agent, http, ready, wait_agent, DockerRun, NodeAgent, ECHO_IMAGE};
use berth_tests::wire::{get, send, wait_routed};
use berth_tests::{eventually, unique_name, ControlPlane, Etcd, Gateway};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn breaker(agent: &Agent, replica: &str) -> BreakerState {
    agent
        .status
        .iter()
        .flat_map(|s| &s.replicas)
        .find(|r| r.replica == replica)
        .and_then(|r| BreakerState::try_from(r.breaker).ok())
        .unwrap_or(BreakerState::Unspecified)
}

#[tokio::test]
async fn the_gateway_forwards_faithfully_hides_failures_and_cuts_off_bad_replicas() {
    let run = DockerRun::new().unwrap();
    let etcd = Etcd::start().await.unwrap();
    let cp = ControlPlane::start(&etcd.url()).await.unwrap();
    let node = NodeAgent::start(&cp.url(), &unique_name("node"), &run).unwrap();
    let gw = Gateway::start(&etcd.url()).await.unwrap();
    let api = cp.agents().await.unwrap();
    let name = unique_name("gw");
    let secured = unique_name("sec");
    let health = ["--health-endpoint", "/health", "--health-interval", "1s"];
    let mut deploy = vec!["deploy", "-n", &name, "-i", ECHO_IMAGE, "--replicas", "2"];
    deploy.extend(health);
    let out = cp.cli(&deploy);
    assert!(out.status.success(), "{out:?}");
    let mut deploy = vec![
        "deploy",
        "-n",
        &secured,
        "-i",
        ECHO_IMAGE,
        "--token",
        "s3cret-gateway-key-0123",
        "--request-timeout",
        "1s",
    ];
    deploy.extend(health);
    let out = cp.cli(&deploy);
    assert!(out.status.success(), "{out:?}");
    let agent = wait_agent(&api, &name, "2 ready", |a| ready(a) == 2)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", cp.log(), node.log()));
    wait_agent(&api, &secured, "1 ready", |a| ready(a) == 1)
        .await
        .unwrap();
    let base = format!("/agents/{name}");
    wait_routed(&gw.addr, &format!("{base}/health"))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", gw.log()));

    // Fidelity: method, path, query, every header value, a binary body; the gateway adds a
    // request id and the client's address, and drops hop-by-hop headers.
    let body: Vec<u8> = (0..=255u8).rev().collect();
    let reply = send(
        &gw.addr,
        &format!("PUT {base}/echo/a%20b/c?x=1&x=2&y=%C3%A9 HTTP/1.1\r\nX-Multi: one\r\nX-Multi: two\r\nX-Hop: 1\r\nConnection: X-Hop"),
        &body,
    )
    .await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let echo = reply.json();
    assert_eq!(echo["method"], "PUT");
    assert_eq!(echo["path"], "/echo/a%20b/c");
    assert_eq!(echo["query"], "x=1&x=2&y=%C3%A9");
    let hex: String = body.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(echo["body_hex"], hex);
    let headers: Vec<(String, String)> = echo["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h[0].as_str().unwrap().into(), h[1].as_str().unwrap().into()))
        .collect();
    let values = |name: &str| -> Vec<&str> {
        headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    assert_eq!(values("x-multi"), ["one", "two"]);
    assert_eq!(values("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(values("x-berth-request-id").len(), 1);
    assert!(
        values("x-hop").is_empty(),
        "named in Connection: hop-by-hop"
    );

    // Server-sent events arrive one by one, not when the stream ends; with an
    // Idempotency-Key too (the answer is kept as it passes), and a repeat then gets it whole.
    let key = format!("Idempotency-Key: {}\r\n", unique_name("sse"));
    for extra in ["", key.as_str()] {
        let mut stream = TcpStream::connect(&gw.addr).await.unwrap();
        let request = format!(
            "GET {base}/stream?n=4&ms=500 HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let sent = Instant::now();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        let mut first_event = None;
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if first_event.is_none() && String::from_utf8_lossy(&seen).contains("data:") {
                first_event = Some(sent.elapsed());
            }
        }
        let total = sent.elapsed();
        let first_event = first_event.expect("an event");
        assert!(
            total - first_event >= Duration::from_millis(1000),
            "{extra}: first event after {first_event:?}, stream ended after {total:?}"
        );
        assert!(String::from_utf8_lossy(&seen).contains("data: event 3"));
    }
    let repeat = send(
        &gw.addr,
        &format!(
            "GET {base}/stream?n=4&ms=500 HTTP/1.1\r\n{}",
            key.trim_end()
        ),
        b"",
    )
    .await;
    assert_eq!(repeat.status, 200);
    assert_eq!(
        repeat.header("x-berth-replayed").as_deref(),
        Some("1"),
        "{}",
        repeat.head
    );
    assert_eq!(repeat.header("x-berth-truncated"), None, "{}", repeat.head);
    let events = String::from_utf8_lossy(&repeat.body).into_owned();
    assert!(
        (0..4).all(|i| events.contains(&format!("data: event {i}\n"))),
        "the stored stream, whole: {events}"
    );

    // Errors: unknown agent, missing or wrong token.
    let unknown = get(&gw.addr, "/agents/no-such-agent/x").await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["error"]["code"], "agent_not_found");
    let refused = get(&gw.addr, &format!("/agents/{secured}/echo")).await;
    assert_eq!(refused.status, 401);
    assert_eq!(refused.json()["error"]["code"], "unauthorized");
    let wrong = send(
        &gw.addr,
        &format!("GET /agents/{secured}/echo HTTP/1.1\r\nAuthorization: Bearer nope"),
        b"",
    )
    .await;
    assert_eq!(wrong.status, 401);
    let allowed = send(
        &gw.addr,
        &format!(
            "GET /agents/{secured}/echo HTTP/1.1\r\nAuthorization: Bearer s3cret-gateway-key-0123"
        ),
        b"",
    )
    .await;
    assert_eq!(allowed.status, 200);
    let seen_headers = allowed.json()["headers"].to_string();
    assert!(
        !seen_headers.contains("s3cret-gateway-key"),
        "the gateway key is not passed to the agent: {seen_headers}"
    );
    // A replica slower than the agent's request timeout: 504 (replay off, else a GET queues).
    let started = Instant::now();
    let slow = send(
        &gw.addr,
        &format!(
            "GET /agents/{secured}/slow?ms=5000 HTTP/1.1\r\nAuthorization: Bearer s3cret-gateway-key-0123\r\nX-Berth-Replay: off"
        ),
        b"",
    )
    .await;
    assert_eq!(slow.status, 504, "{}", String::from_utf8_lossy(&slow.body));
    assert_eq!(slow.json()["error"]["code"], "upstream_timeout");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );

    // A replica crashes under GET traffic: no client sees an error.
    let replicas = agent.status.clone().unwrap().replicas;
    let (first, second) = (&replicas[0], &replicas[1]);
    let traffic = {
        let (addr, path) = (gw.addr.clone(), format!("{base}/echo"));
        tokio::spawn(async move {
            let mut failures = Vec::new();
            let started = Instant::now();
            let mut count = 0;
            while started.elapsed() < Duration::from_secs(4) {
                let r = get(&addr, &path).await;
                if r.status != 200 {
                    failures.push((r.status, String::from_utf8_lossy(&r.body).into_owned()));
                }
                count += 1;
            }
            (count, failures)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await; // let traffic flow first
    http(&first.address, "POST", "/crash").await.unwrap();
    let (count, failures) = traffic.await.unwrap();
    assert!(count > 50, "only {count} requests sent");
    assert!(
        failures.is_empty(),
        "{} of {count} requests failed: {failures:?}\n{}",
        failures.len(),
        gw.log()
    );
    wait_agent(&api, &name, "the crashed replica back", |a| ready(a) == 2)
        .await
        .unwrap();

    // A replica that answers 500 is cut off after 5 failures (GETs retried elsewhere meanwhile),
    // then probed back in once it recovers.
    let agent = get_agent(&api, &name).await;
    let bad = agent.status.unwrap().replicas[1].clone();
    assert_eq!(bad.replica, second.replica);
    http(&bad.address, "POST", "/errors/on").await.unwrap();
    let path = format!("{base}/echo");
    let failures = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let opened = eventually(
        Duration::from_secs(20),
        "the bad replica's breaker open",
        || {
            let (addr, path, api, name, replica) = (
                gw.addr.clone(),
                path.clone(),
                api.clone(),
                name.clone(),
                bad.replica.clone(),
            );
            let failures = failures.clone();
            async move {
                for _ in 0..10 {
                    if get(&addr, &path).await.status != 200 {
                        failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                (breaker(&get_agent(&api, &name).await, &replica) == BreakerState::Open)
                    .then_some(())
            }
        },
    )
    .await;
    opened.unwrap_or_else(|e| panic!("{e}\n{}", gw.log()));
    assert_eq!(
        failures.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "500s were retried on the healthy replica"
    );
    let metrics = http(&gw.admin_addr, "GET", "/metrics").await.unwrap().1;
    let open_line = format!(
        "berth_gateway_breaker_transitions_total{{agent=\"{name}\",replica=\"{}\",to=\"open\"}} 1",
        bad.replica
    );
    assert!(metrics.contains(&open_line), "{open_line} in\n{metrics}");
    assert!(metrics.contains(&format!("berth_gateway_retries_total{{agent=\"{name}\"}}")));
    // While open, the bad replica gets no traffic at all.
    let seen_before = http(&bad.address, "GET", "/health").await.unwrap();
    assert_eq!(seen_before.0, 200);
    http(&bad.address, "POST", "/errors/off").await.unwrap();
    eventually(
        Duration::from_secs(30),
        "the breaker closed by a probe",
        || {
            let (addr, path, api, name, replica) = (
                gw.addr.clone(),
                path.clone(),
                api.clone(),
                name.clone(),
                bad.replica.clone(),
            );
            async move {
                for _ in 0..5 {
                    get(&addr, &path).await;
                }
                (breaker(&get_agent(&api, &name).await, &replica) == BreakerState::Closed)
                    .then_some(())
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", gw.log()));
    let out = cp.cli(&["get", &name]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("BREAKER") && table.contains("closed"),
        "{table}"
    );

    // No ready replica and replay off: 503 with Retry-After.
    assert!(cp.cli(&["stop", &secured]).status.success());
    let unavailable = eventually(Duration::from_secs(30), "503 once stopped", || {
        let (addr, path) = (gw.addr.clone(), format!("/agents/{secured}/echo"));
        async move {
            let r = send(
                &addr,
                &format!("GET {path} HTTP/1.1\r\nAuthorization: Bearer s3cret-gateway-key-0123\r\nX-Berth-Replay: off"),
                b"",
            )
            .await;
            (r.status == 503).then_some(r)
        }
    })
    .await
    .unwrap();
    assert_eq!(unavailable.json()["error"]["code"], "no_ready_replica");
    assert_eq!(unavailable.header("retry-after").as_deref(), Some("1"));
}

#[tokio::test]
async fn requests_that_never_reached_a_crashed_replica_go_to_the_healthy_one() {
    let run = DockerRun::new().unwrap();
    let etcd = Etcd::start().await.unwrap();
    let cp = ControlPlane::start(&etcd.url()).await.unwrap();
    let node = NodeAgent::start(&cp.url(), &unique_name("node"), &run).unwrap();
    let gw = Gateway::start(&etcd.url()).await.unwrap();
    let api = cp.agents().await.unwrap();
    let name = unique_name("crash");
    // Never restarted: the crashed replica stays down while the requests go.
    let out = cp.cli(&[
        "deploy",
        "-n",
        &name,
        "-i",
        ECHO_IMAGE,
        "--replicas",
        "2",
        "--restart",
        "never",
        "--health-endpoint",
        "/health",
        "--health-interval",
        "1s",
    ]);
    assert!(out.status.success(), "{out:?}");
    let agent = wait_agent(&api, &name, "2 ready", |a| ready(a) == 2)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", cp.log(), node.log()));
    let base = format!("/agents/{name}");
    // Both replicas in the gateway's pool, with kept-alive connections to each.
    let replicas = agent.status.unwrap().replicas;
    let (crashed, healthy) = (&replicas[0], &replicas[1]);
    eventually(Duration::from_secs(20), "traffic to both replicas", || {
        let (addr, path) = (gw.addr.clone(), format!("{base}/echo"));
        let addresses = [crashed.address.clone(), healthy.address.clone()];
        async move {
            for _ in 0..20 {
                get(&addr, &path).await;
            }
            let mut seen = 0;
            for address in &addresses {
                let (_, body) = http(address, "GET", "/requests").await?;
                let counts: serde_json::Value = serde_json::from_str(&body).ok()?;
                seen += usize::from(counts["counts"].as_object()?.len() > 1);
            }
            (seen == 2).then_some(())
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", gw.log()));

    // The crash, with the node agent paused so that the gateway does not learn of it: to the
    // gateway the replica is still ready, but it refuses every connection.
    node.signal("STOP");
    http(&crashed.address, "POST", "/crash").await.unwrap();
    eventually(Duration::from_secs(10), "the replica gone", || {
        let address = crashed.address.clone();
        async move {
            http(&address, "GET", "/health")
                .await
                .is_none()
                .then_some(())
        }
    })
    .await
    .unwrap();
    let mut ids = Vec::new();
    let mut wrong = Vec::new();
    for i in 0..200 {
        let id = format!("{:032x}", 0x00c0_ffee_0000_u64 + i);
        let method = if i < 100 { "GET" } else { "POST" };
        let head = format!("{method} {base}/echo HTTP/1.1\r\nX-Berth-Request-Id: {id}");
        let reply = send(&gw.addr, &head, b"x").await;
        if reply.status != 200 {
            wrong.push((
                i,
                reply.status,
                String::from_utf8_lossy(&reply.body).into_owned(),
            ));
        }
        ids.push(id);
    }
    node.signal("CONT");
    assert!(
        wrong.is_empty(),
        "{} of 200 not answered 200: {wrong:?}\n{}",
        wrong.len(),
        gw.log()
    );
    // Each one ran once, at the healthy replica.
    let (_, body) = http(&healthy.address, "GET", "/requests").await.unwrap();
    let counts: serde_json::Value = serde_json::from_str(&body).unwrap();
    for id in &ids {
        assert_eq!(counts["counts"][id], 1, "{id} at the healthy replica");
    }
    let out = cp.cli(&["delete", &name]);
    assert!(out.status.success(), "{out:?}");
}
