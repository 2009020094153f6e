//! Durable replay end to end: real etcd, control plane, node agent, gateway and example-agent
//! containers. The agent appends every `X-Berth-Request-Id` it receives to a log on a host
//! volume, which survives its crashes: that log tells what reached it, in what order, and how
//! often.

use berth_tests::docker::{ready, wait_agent, ECHO_IMAGE};
use berth_tests::replay::{
    arrivals, counts, list_request_ids, post, setup, setup_with, wait_delivered, wait_down,
};
use berth_tests::wire::{get, send, send_chunked, wait_routed};
use berth_tests::{eventually, unique_name, Gateway};
use std::collections::HashMap;
use std::time::{Duration, Instant};

#[tokio::test]
async fn a_stopped_agent_gets_its_requests_in_order_once_started() {
    // One at a time: strict arrival order (the default starts several at once, oldest first).
    let s = setup_with("fifo", &["--replay-concurrency", "1"]).await;
    let api = s.cp.agents().await.unwrap();
    let base = format!("/agents/{}", s.name);
    assert!(s.cp.cli(&["stop", &s.name]).status.success());
    wait_agent(&api, &s.name, "stopped", |a| ready(a) == 0)
        .await
        .unwrap();
    // Opting out shows when the gateway knows the agent is down: 503, nothing queued.
    eventually(
        Duration::from_secs(20),
        "the gateway sees no ready replica",
        || async {
            let r = post(
                &s.gw,
                &format!("{base}/echo"),
                "x",
                "\r\nX-Berth-Replay: off",
            )
            .await;
            (r.status == 503).then_some(())
        },
    )
    .await
    .unwrap();

    let mut ids = Vec::new();
    for i in 0..20 {
        let r = post(
            &s.gw,
            &format!("{base}/echo?n={i}"),
            &format!("body-{i}"),
            "",
        )
        .await;
        assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
        let id = r.json()["request_id"].as_str().unwrap().to_string();
        assert_eq!(r.header("location"), Some(format!("/requests/{id}")));
        assert_eq!(r.json()["status"], "queued");
        ids.push(id);
    }
    let state = get(&s.gw.addr, &format!("/requests/{}", ids[0])).await;
    assert_eq!(state.json()["status"], "queued");
    // Each 202 waited for its group commit, which the gateway's metrics count and time.
    let (_, metrics) = berth_tests::docker::http(&s.gw.admin_addr, "GET", "/metrics")
        .await
        .unwrap();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} on /metrics:\n{metrics}"))
    };
    assert!(value("berth_gateway_store_commit_transactions_sum") >= 20.0);
    assert!(value("berth_gateway_store_commit_seconds_count") >= 1.0);
    assert!(value("berth_gateway_store_commit_seconds_sum") > 0.0);
    // Too large to keep: 413 naming the limit.
    let big = "x".repeat(1024 * 1024 + 1);
    let r = post(&s.gw, &format!("{base}/echo"), &big, "").await;
    assert_eq!(r.status, 413);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("1048576-byte limit"));

    // The operator's view: in order.
    let out = s.cp.cli(&["requests", &s.name, "-o", "json"]);
    assert!(out.status.success(), "{out:?}");
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed: Vec<&str> = listed["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        listed,
        ids.iter().map(String::as_str).collect::<Vec<_>>(),
        "what the queue lists is what was queued, in order\n{}",
        s.gw.log()
    );
    let table = String::from_utf8_lossy(&s.cp.cli(&["requests", &s.name]).stdout).into_owned();
    assert!(
        table.contains("queued") && table.contains(&ids[0]),
        "{table}"
    );
    let shown = String::from_utf8_lossy(&s.cp.cli(&["get", &s.name]).stdout).into_owned();
    assert!(shown.contains("20 queued for replay"), "{shown}");

    // Prefer: wait holds the connection until the agent's real answer arrives.
    let waiting = {
        let (addr, path) = (s.gw.addr.clone(), format!("{base}/echo?waited=1"));
        tokio::spawn(async move {
            send(
                &addr,
                &format!("POST {path} HTTP/1.1\r\nPrefer: wait=30"),
                b"w",
            )
            .await
        })
    };
    let started = Instant::now();
    assert!(s.cp.cli(&["start", &s.name]).status.success());
    wait_delivered(&s.gw, &ids, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", s.gw.log(), s.node.log()));
    eprintln!(
        "start → 20 queued requests delivered: {:?}",
        started.elapsed()
    );
    let waited = waiting.await.unwrap();
    assert_eq!(
        waited.status,
        200,
        "{}",
        String::from_utf8_lossy(&waited.body)
    );
    assert_eq!(waited.header("x-berth-replayed").as_deref(), Some("1"));
    assert_eq!(waited.json()["query"], "waited=1");

    // FIFO at the agent, each once, with the stored answer readable.
    let arrived: Vec<String> = arrivals(s.data.path())
        .into_iter()
        .filter(|id| ids.contains(id))
        .collect();
    assert_eq!(arrived, ids, "delivered once each, in order");
    let done = get(&s.gw.addr, &format!("/requests/{}", ids[3]))
        .await
        .json();
    assert_eq!(done["status"], "delivered");
    assert_eq!(done["response"]["status"], 200);
    let echoed: serde_json::Value =
        serde_json::from_str(done["response"]["body"].as_str().unwrap()).unwrap();
    assert_eq!(echoed["body"], "body-3");
    assert_eq!(echoed["query"], "n=3");
    let replay_header = echoed["headers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h[0] == "x-berth-replay-attempt")
        .map(|h| h[1].clone());
    assert_eq!(replay_header, Some(serde_json::json!("1")));
    // The operator's view of how each was answered, from records alone.
    let out = s.cp.cli(&["requests", &s.name, "--state", "delivered"]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    for id in &ids {
        let row = table.lines().find(|l| l.contains(id.as_str()));
        assert!(
            row.is_some_and(|r| r.split_whitespace().last() == Some("200")),
            "{id} listed as answered with 200:\n{table}"
        );
    }
}

#[tokio::test]
async fn no_request_is_lost_while_the_agent_is_killed_three_times() {
    let s = setup("kill").await;
    let base = format!("/agents/{}", s.name);
    let total = 2000;
    let rate = 200.0; // requests per second
    let sender = {
        let (addr, path) = (s.gw.addr.clone(), format!("{base}/echo"));
        tokio::spawn(async move {
            let start = Instant::now();
            let mut tasks = Vec::new();
            for i in 0..total {
                let due = start + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
                let (addr, path) = (addr.clone(), path.clone());
                tasks.push(tokio::spawn(async move {
                    // Every other request carries an Idempotency-Key, which makes it safe to
                    // queue even when cut off mid-way.
                    let keyed = i % 2 == 1;
                    let id = format!(
                        "kill-{}-{i:05}-{}",
                        if keyed { "k" } else { "u" },
                        unique_name("r")
                    );
                    let mut head = format!("POST {path} HTTP/1.1\r\nX-Berth-Request-Id: {id}");
                    if keyed {
                        head.push_str(&format!("\r\nIdempotency-Key: {id}"));
                    }
                    (id, send(&addr, &head, b"payload").await)
                }));
            }
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        })
    };
    // Kill the container three times while the load runs; the node agent restarts it.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let ids = s.run.containers();
        let out = std::process::Command::new("docker")
            .args(["kill"])
            .args(&ids)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let answers = sender.await.unwrap();
    let mut direct = Vec::new();
    let mut queued = Vec::new();
    let mut errors = Vec::new();
    for (id, r) in &answers {
        match r.status {
            200 => direct.push(id.clone()),
            202 => queued.push(r.json()["request_id"].as_str().unwrap().to_string()),
            _ => errors.push((
                id.clone(),
                r.status,
                String::from_utf8_lossy(&r.body).into_owned(),
            )),
        }
    }
    // Keyed requests are safe to resend: every one is delivered. An unkeyed one whose replay
    // was cut off after it may have reached the agent is dead-lettered with the reason
    // (docs/architecture.md: resent only if safe), like a 502 on the direct path; it is kept, not lost.
    let (keyed_queued, unkeyed_queued): (Vec<String>, Vec<String>) = queued
        .iter()
        .cloned()
        .partition(|id| id.starts_with("kill-k-"));
    wait_delivered(&s.gw, &keyed_queued, Duration::from_secs(90))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", s.gw.log()));
    let settled = eventually(
        Duration::from_secs(90),
        "unkeyed requests settled",
        || async {
            let mut dead = Vec::new();
            for id in &unkeyed_queued {
                let r = get(&s.gw.addr, &format!("/requests/{id}")).await.json();
                match r["status"].as_str() {
                    Some("delivered") => {}
                    Some("dead") => dead.push((id.clone(), r["last_error"].to_string())),
                    _ => return None,
                }
            }
            Some(dead)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.gw.log()));
    assert!(
        settled.iter().all(|(_, why)| why.contains("not safe")),
        "dead only when not safe to resend: {settled:?}"
    );
    let dead: Vec<&String> = settled.iter().map(|(id, _)| id).collect();
    // The dead letters' listing (from their index, paged) holds exactly these.
    let (mut listed, _) = list_request_ids(&s.cp, &[&s.name, "--state", "dead"], 2).unwrap();
    listed.sort();
    let mut expected: Vec<String> = dead.iter().map(|id| id.to_string()).collect();
    expected.sort();
    assert_eq!(listed, expected, "berth requests --state dead");
    let arrived = arrivals(s.data.path());
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for id in &arrived {
        *seen.entry(id.as_str()).or_default() += 1;
    }
    let duplicates = seen.values().filter(|n| **n > 1).count();
    let keyed_duplicates = seen
        .iter()
        .filter(|(id, n)| id.starts_with("kill-k-") && **n > 1)
        .count();
    let replayed = queued
        .iter()
        .filter(|id| seen.contains_key(id.as_str()))
        .count();
    let lost = direct
        .iter()
        .chain(&queued)
        .filter(|id| !seen.contains_key(id.as_str()) && !dead.contains(id))
        .count();
    eprintln!(
        "sent {} / direct {} / queued {} / replayed {} / errors {} / dead-lettered {} / lost {} / duplicates {} (with Idempotency-Key {keyed_duplicates})",
        answers.len(),
        direct.len(),
        queued.len(),
        replayed,
        errors.len(),
        dead.len(),
        lost,
        duplicates
    );
    assert_eq!(answers.len(), total);
    assert_eq!(lost, 0, "answered 200 or 202 but never reached the agent");
    assert!(!queued.is_empty(), "the kills made the gateway queue");
    assert!(
        errors
            .iter()
            .all(|(id, status, _)| *status == 502 && id.starts_with("kill-u-")),
        "only unkeyed requests cut off mid-way may fail (not safe to resend): {errors:?}"
    );
}

#[tokio::test]
async fn an_agent_that_stands_still_is_restarted_and_gets_what_it_could_not_take() {
    let s = setup_with("frozen", &["--request-timeout", "3s"]).await;
    let base = format!("/agents/{}", s.name);
    let containers = s.run.containers();
    assert_eq!(containers.len(), 1);
    let pid = s.run.inspect(&containers[0], "{{.State.Pid}}");
    // The agent's process stands still: its kernel takes connections, nothing answers.
    let stopped = std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap();
    assert!(stopped.success());
    let started = Instant::now();
    let mut sends = Vec::new();
    for i in 0..12 {
        let gw = s.gw.addr.clone();
        let path = format!("{base}/echo?n={i}");
        sends.push(tokio::spawn(async move {
            let head = format!(
                "POST {path} HTTP/1.1\r\nIdempotency-Key: frozen-{i}\r\nX-Berth-Request-Id: frozen-{i}"
            );
            send(&gw, &head, format!("frozen-{i}").as_bytes()).await
        }));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut queued = Vec::new();
    for sent in sends {
        let r = sent.await.unwrap();
        match r.status {
            // Answered by the agent after its restart, or kept for it.
            200 => {}
            202 => queued.push(r.json()["request_id"].as_str().unwrap().to_string()),
            other => panic!(
                "a keyed request that the agent could not take got {other}: {}\n{}",
                String::from_utf8_lossy(&r.body),
                s.gw.log()
            ),
        }
    }
    assert!(
        !queued.is_empty(),
        "the stalled agent made the gateway queue"
    );
    wait_delivered(&s.gw, &queued, Duration::from_secs(90))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", s.gw.log(), s.node.log()));
    // Its health check failed, and it was restarted: another process answers now.
    let now = s.run.containers();
    let running: Vec<&String> = now
        .iter()
        .filter(|c| s.run.inspect(c, "{{.State.Running}}") == "true")
        .collect();
    assert_eq!(running.len(), 1, "{now:?}");
    assert_ne!(s.run.inspect(running[0], "{{.State.Pid}}"), pid);
    let arrived = arrivals(s.data.path());
    for i in 0..12 {
        let n = arrived
            .iter()
            .filter(|id| **id == format!("frozen-{i}"))
            .count();
        assert!(n >= 1, "frozen-{i} reached the agent: {arrived:?}");
    }
    eprintln!(
        "agent stopped: {} queued of 12, all delivered {:.1?} after the stop",
        queued.len(),
        started.elapsed()
    );
}

#[tokio::test]
async fn two_gateways_share_the_queue_and_survive_kill_9() {
    // A delivery cut by the kill is sent again after its attempt's deadline (the request
    // timeout and a margin): 10 s instead of the default 30 s keeps the wait short.
    let mut s = setup_with("gws", &["--request-timeout", "10s"]).await;
    let mut gw2 = Gateway::start_named(&s.etcd.url(), "gateway-two")
        .await
        .unwrap();
    let api = s.cp.agents().await.unwrap();
    let base = format!("/agents/{}", s.name);

    // Two gateways replay one agent's queue: each request is delivered once.
    assert!(s.cp.cli(&["stop", &s.name]).status.success());
    wait_agent(&api, &s.name, "stopped", |a| ready(a) == 0)
        .await
        .unwrap();
    wait_down(&s.gw, &base).await;
    wait_down(&gw2, &base).await;
    let mut shared = Vec::new();
    for i in 0..100 {
        let gw = if i % 2 == 0 { &s.gw } else { &gw2 };
        let r = post(gw, &format!("{base}/echo"), &format!("shared-{i}"), "").await;
        assert_eq!(r.status, 202);
        shared.push(r.json()["request_id"].as_str().unwrap().to_string());
    }
    assert!(s.cp.cli(&["start", &s.name]).status.success());
    wait_delivered(&gw2, &shared, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", s.gw.log(), gw2.log()));
    let seen = counts(s.data.path());
    let twice = shared.iter().filter(|id| seen.get(*id) != Some(&1)).count();
    eprintln!(
        "two gateways: queued {} / delivered once {} / duplicates or missing {twice}",
        shared.len(),
        shared.len() - twice
    );
    assert_eq!(twice, 0, "each request reached the agent exactly once");

    // kill -9 of the gateways while requests are queued, and again while replay runs.
    assert!(s.cp.cli(&["stop", &s.name]).status.success());
    wait_agent(&api, &s.name, "stopped", |a| ready(a) == 0)
        .await
        .unwrap();
    wait_down(&s.gw, &base).await;
    let mut queued = Vec::new();
    for i in 0..200 {
        let key = format!("\r\nIdempotency-Key: {}", unique_name("k"));
        let r = post(&s.gw, &format!("{base}/echo"), &format!("crash-{i}"), &key).await;
        assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
        queued.push(r.json()["request_id"].as_str().unwrap().to_string());
    }
    s.gw.kill();
    gw2.kill();
    s.gw.resume().await.unwrap();
    gw2.resume().await.unwrap();
    assert!(s.cp.cli(&["start", &s.name]).status.success());
    let before = arrivals(s.data.path()).len();
    eventually(Duration::from_secs(30), "replay under way", || {
        let n = arrivals(s.data.path()).len();
        async move { (n >= before + 20).then_some(()) }
    })
    .await
    .unwrap();
    s.gw.kill();
    gw2.kill();
    s.gw.resume().await.unwrap();
    gw2.resume().await.unwrap();
    let resumed = Instant::now();
    wait_delivered(&s.gw, &queued, Duration::from_secs(90))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", s.gw.log(), gw2.log()));
    let drained = resumed.elapsed();
    let seen = counts(s.data.path());
    let lost = queued.iter().filter(|id| !seen.contains_key(*id)).count();
    let duplicates = queued
        .iter()
        .filter(|id| seen.get(*id).is_some_and(|n| *n > 1))
        .count();
    eprintln!(
        "kill -9 of both gateways twice: queued {} / delivered {} / lost {lost} / duplicates {duplicates}; \
         all delivered {drained:.1?} after the second restart",
        queued.len(),
        queued.len() - lost
    );
    assert_eq!(lost, 0);
    // At least once, not more: a delivery whose gateway is SIGKILLed before it wrote the
    // outcome is sent again (keyed). The agent's replay concurrency holds across gateways (a
    // claim counts wherever it is held): at the kill during replay, at most that many at the
    // agent, and those answered whose outcome was still
    // being written (a few milliseconds' worth; 0 to 4 repeats in 48 runs). The kill while
    // queued had none in flight.
    let concurrency = berth_proto::defaults::REPLAY_CONCURRENCY as usize;
    assert!(
        duplicates <= 2 * concurrency,
        "{duplicates} requests delivered twice: more than the deliveries whose outcome the kill left unknown"
    );
}

#[tokio::test]
async fn without_etcd_nothing_is_promised_and_live_agents_still_answer() {
    let mut s = setup("etcd").await;
    let api = s.cp.agents().await.unwrap();
    let live = unique_name("live");
    let out = s.cp.cli(&["deploy", "-n", &live, "-i", ECHO_IMAGE]);
    assert!(out.status.success(), "{out:?}");
    wait_agent(&api, &live, "ready", |a| ready(a) == 1)
        .await
        .unwrap();
    let live_path = format!("/agents/{live}/echo");
    wait_routed(&s.gw.addr, &live_path).await.unwrap();
    let base = format!("/agents/{}", s.name);
    assert!(s.cp.cli(&["stop", &s.name]).status.success());
    wait_agent(&api, &s.name, "stopped", |a| ready(a) == 0)
        .await
        .unwrap();
    wait_down(&s.gw, &base).await;

    s.etcd.stop();
    let r = post(&s.gw, &format!("{base}/echo"), "cannot keep", "").await;
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"]["code"], "queue_unavailable");
    let refused = r.json()["error"]["request_id"]
        .as_str()
        .unwrap()
        .to_string();
    for _ in 0..20 {
        let r = post(&s.gw, &live_path, "still forwarded", "").await;
        assert_eq!(r.status, 200, "a ready agent does not need etcd");
    }

    s.etcd.resume().await.unwrap();
    let queued = eventually(Duration::from_secs(30), "queueing again", || async {
        let r = post(&s.gw, &format!("{base}/echo"), "kept", "").await;
        (r.status == 202).then(|| r.json()["request_id"].as_str().unwrap().to_string())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.gw.log()));
    // etcd was down, not slow: the request its answer names was never stored.
    let fate = get(&s.gw.addr, &format!("/requests/{refused}")).await;
    assert_eq!(fate.status, 404, "{}", String::from_utf8_lossy(&fate.body));
    assert!(s.cp.cli(&["start", &s.name]).status.success());
    wait_delivered(&s.gw, &[queued], Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", s.gw.log()));
}

#[tokio::test]
async fn an_idempotency_key_gets_one_result() {
    let s = setup("idem").await;
    let api = s.cp.agents().await.unwrap();
    let base = format!("/agents/{}", s.name);
    let key = |k: &str| format!("\r\nIdempotency-Key: {k}");

    // Answered directly: a repeat gets the stored answer, and the agent sees it once.
    let first = post(&s.gw, &format!("{base}/echo"), "pay", &key("k-direct")).await;
    assert_eq!(first.status, 200);
    let again = post(&s.gw, &format!("{base}/echo"), "pay", &key("k-direct")).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.header("x-berth-replayed").as_deref(), Some("1"));
    assert_eq!(again.body, first.body);
    let other = post(
        &s.gw,
        &format!("{base}/echo"),
        "different",
        &key("k-direct"),
    )
    .await;
    assert_eq!(other.status, 422);
    assert_eq!(other.json()["error"]["code"], "idempotency_key_reused");

    // A body too large to keep (2 MiB, the limit 1 MiB) streams on to the agent and is
    // digested as it passes: a repeat with the same body gets the stored answer, streamed with
    // a length or chunked; one with another body of the same size, or a small one, gets 422.
    let large = |fill: u8| vec![fill; 2 << 20];
    let head = format!("POST {base}/digest HTTP/1.1\r\nIdempotency-Key: k-large");
    let large_first = send(&s.gw.addr, &head, &large(b'a')).await;
    assert_eq!(
        large_first.status,
        200,
        "{}",
        String::from_utf8_lossy(&large_first.body)
    );
    assert_eq!(large_first.json()["bytes"], 2 << 20);
    for again in [
        send(&s.gw.addr, &head, &large(b'a')).await,
        send_chunked(&s.gw.addr, &head, &large(b'a'), 64 << 10).await,
    ] {
        assert_eq!(
            again.status,
            200,
            "{}",
            String::from_utf8_lossy(&again.body)
        );
        assert_eq!(again.header("x-berth-replayed").as_deref(), Some("1"));
        assert_eq!(again.body, large_first.body);
    }
    for other in [
        send(&s.gw.addr, &head, &large(b'b')).await,
        send_chunked(&s.gw.addr, &head, &large(b'b'), 64 << 10).await,
        post(&s.gw, &format!("{base}/digest"), "small", &key("k-large")).await,
    ] {
        assert_eq!(
            other.status,
            422,
            "{}",
            String::from_utf8_lossy(&other.body)
        );
        assert_eq!(other.json()["error"]["code"], "idempotency_key_reused");
    }

    // While the first is in flight (it has reached the agent, which takes 2 s): 409.
    let slow_id = unique_name("slow");
    let slow = {
        let (addr, path) = (s.gw.addr.clone(), format!("{base}/slow?ms=2000"));
        let head = format!(
            "GET {path} HTTP/1.1\r\nIdempotency-Key: k-slow\r\nX-Berth-Request-Id: {slow_id}"
        );
        tokio::spawn(async move { send(&addr, &head, b"").await })
    };
    eventually(
        Duration::from_secs(5),
        "the slow request at the agent",
        || {
            let arrived = arrivals(s.data.path()).contains(&slow_id);
            async move { arrived.then_some(()) }
        },
    )
    .await
    .unwrap();
    let conflict = send(
        &s.gw.addr,
        &format!("GET {base}/slow?ms=2000 HTTP/1.1\r\nIdempotency-Key: k-slow"),
        b"",
    )
    .await;
    assert_eq!(conflict.status, 409);
    assert_eq!(
        conflict.json()["error"]["code"],
        "idempotency_key_in_flight"
    );
    assert_eq!(slow.await.unwrap().status, 200);

    // Queued: a repeat points at the same request; once delivered, it gets the answer.
    assert!(s.cp.cli(&["stop", &s.name]).status.success());
    wait_agent(&api, &s.name, "stopped", |a| ready(a) == 0)
        .await
        .unwrap();
    wait_down(&s.gw, &base).await;
    let queued = post(&s.gw, &format!("{base}/echo"), "later", &key("k-queued")).await;
    assert_eq!(queued.status, 202);
    let id = queued.json()["request_id"].as_str().unwrap().to_string();
    let repeat = post(&s.gw, &format!("{base}/echo"), "later", &key("k-queued")).await;
    assert_eq!(repeat.status, 202);
    assert_eq!(repeat.json()["request_id"], id.as_str());
    assert!(s.cp.cli(&["start", &s.name]).status.success());
    wait_delivered(&s.gw, std::slice::from_ref(&id), Duration::from_secs(30))
        .await
        .unwrap();
    let answered = post(&s.gw, &format!("{base}/echo"), "later", &key("k-queued")).await;
    assert_eq!(answered.status, 200);
    assert_eq!(answered.json()["body"], "later");
    let seen = counts(s.data.path());
    assert_eq!(
        seen.get(&id),
        Some(&1),
        "the queued request reached the agent once"
    );
    let direct_id = first.json()["headers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h[0] == "x-berth-request-id")
        .map(|h| h[1].as_str().unwrap().to_string())
        .unwrap();
    assert_eq!(
        seen.get(&direct_id),
        Some(&1),
        "the direct one reached it once"
    );
}

#[tokio::test]
async fn stored_requests_of_a_token_agent_need_its_token_or_an_admin_one() {
    let s = setup("tok").await;
    let api = s.cp.agents().await.unwrap();
    let guarded = unique_name("guarded");
    let token = "guarded-agent-token-0123";
    let out =
        s.cp.cli(&["deploy", "-n", &guarded, "-i", ECHO_IMAGE, "--token", token]);
    assert!(out.status.success(), "{out:?}");
    wait_agent(&api, &guarded, "ready", |a| ready(a) == 1)
        .await
        .unwrap();
    assert!(s.cp.cli(&["stop", &guarded]).status.success());
    wait_agent(&api, &guarded, "stopped", |a| ready(a) == 0)
        .await
        .unwrap();
    let auth = format!("\r\nAuthorization: Bearer {token}");
    let queued = eventually(Duration::from_secs(20), "queued", || async {
        let r = post(&s.gw, &format!("/agents/{guarded}/echo"), "secret", &auth).await;
        (r.status == 202).then(|| r.json()["request_id"].as_str().unwrap().to_string())
    })
    .await
    .unwrap();
    let path = format!("/requests/{queued}");
    assert_eq!(
        get(&s.gw.addr, &path).await.status,
        404,
        "no token: as if unknown"
    );
    let with = |t: &str| format!("GET {path} HTTP/1.1\r\nAuthorization: Bearer {t}");
    assert_eq!(
        send(&s.gw.addr, &with("wrong-token-0000000000"), b"")
            .await
            .status,
        404
    );
    let by_agent = send(&s.gw.addr, &with(token), b"").await;
    assert_eq!(by_agent.status, 200);
    assert_eq!(by_agent.json()["status"], "queued");
    let by_admin = send(&s.gw.addr, &with(berth_tests::ADMIN_TOKEN), b"").await;
    assert_eq!(by_admin.status, 200);
    // The gateway key is not stored with the request.
    let stored = s.cp.cli(&["requests", "show", &queued, "-o", "json"]);
    assert!(stored.status.success(), "{stored:?}");
    let stored = String::from_utf8_lossy(&stored.stdout);
    assert!(
        stored.contains("secret") || stored.contains("c2VjcmV0"),
        "the body is kept: {stored}"
    );
    assert!(!stored.contains("authorization"), "{stored}");
}
