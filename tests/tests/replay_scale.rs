//! The replay queue at the sizes and faults users reach: a queue of many MiB across a gateway
//! restart, a gateway paused (SIGSTOP) past its claim lease mid-delivery (and one replaced by a
//! process of the same name meanwhile), a gateway cut off
//! from etcd mid-delivery (a stalled path, not a closed one), a keyed answer over the
//! stored-answer limit, a dropped request's key, a SIGTERMed gateway during replay, etcd
//! killed while deliveries run, a gateway that starts taking its share of the agents'
//! replay from one that has them all, short deliveries claimed ahead, and dead letters retried
//! and dropped all at once.
//! Real etcd, control plane, node agent, gateways and example-agent containers.

use berth_tests::docker::{ready, wait_agent};
use berth_tests::replay::{
    arrivals, counts, list_request_ids, post, setup, setup_with, wait_delivered, wait_down,
};
use berth_tests::stall::StallProxy;
use berth_tests::wire::{send, send_chunked, wait_routed};
use berth_tests::{eventually, unique_name, Gateway};
use std::path::Path;
use std::time::{Duration, Instant};

/// Stops the agent and waits until the gateway sees it down, so that requests are queued.
async fn stop_agent(s: &berth_tests::replay::Setup) {
    let api = s.cp.agents().await.unwrap();
    assert!(s.cp.cli(&["stop", &s.name]).status.success());
    wait_agent(&api, &s.name, "stopped", |a| ready(a) == 0)
        .await
        .unwrap();
    wait_down(&s.gw, &format!("/agents/{}", s.name)).await;
}

fn queued_id(r: &berth_tests::wire::Raw) -> String {
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    r.json()["request_id"].as_str().unwrap().to_string()
}

/// The runs of `/slow` for request `id` the agent logged: (start, end) in unix ms.
fn slow_runs(data: &Path, id: &str) -> Vec<(u64, Option<u64>)> {
    let log = std::fs::read_to_string(data.join("slow.log")).unwrap_or_default();
    let mut runs: Vec<(u64, Option<u64>)> = Vec::new();
    for line in log.lines() {
        let parts: Vec<&str> = line.split(' ').collect();
        if parts.len() != 3 || parts[1] != id {
            continue;
        }
        let at: u64 = parts[2].parse().unwrap();
        match parts[0] {
            "start" => runs.push((at, None)),
            // An end closes the earliest run still open (runs of one request may overlap,
            // which is what the caller looks for).
            _ => {
                if let Some(run) = runs.iter_mut().find(|r| r.1.is_none()) {
                    run.1 = Some(at);
                }
            }
        }
    }
    runs
}

/// Asserts that no run of `/slow` started before the one before it ended.
fn assert_one_run_at_a_time(runs: &[(u64, Option<u64>)]) {
    for pair in runs.windows(2) {
        let ended = pair[0].1.expect("the earlier run ended");
        assert!(
            pair[1].0 >= ended,
            "two runs of one request at once: {runs:?}"
        );
    }
}

/// A second gateway that reaches etcd only over a path the test can stall, and the agent
/// stopped (both gateways see it down), so that requests are queued.
async fn behind_a_stallable_path(s: &berth_tests::replay::Setup) -> (StallProxy, Gateway) {
    let path = StallProxy::start(s.etcd.url().trim_start_matches("http://")).unwrap();
    let cut = Gateway::start_named(&path.url(), "gateway-cut")
        .await
        .unwrap();
    stop_agent(s).await;
    wait_down(&cut, &format!("/agents/{}", s.name)).await;
    (path, cut)
}

#[tokio::test]
async fn a_queue_of_many_mib_survives_a_gateway_restart_and_drains() {
    let mut s = setup("bigq").await;
    stop_agent(&s).await;
    let base = format!("/agents/{}", s.name);
    let large = "L".repeat(600 * 1024);
    let mut ids = Vec::new();
    let mut bytes = 0;
    for i in 0..200 {
        // Every tenth request is 600 KiB: 20 of them, 12 MiB, besides 180 of 1 KiB.
        let body = if i % 10 == 0 {
            large.clone()
        } else {
            "s".repeat(1024)
        };
        bytes += body.len();
        ids.push(queued_id(
            &post(&s.gw, &format!("{base}/echo?n={i}"), &body, "").await,
        ));
    }
    assert!(bytes > 8 << 20);
    assert!(
        s.gw.terminate(Duration::from_secs(40)).await,
        "{}",
        s.gw.log()
    );
    s.gw.resume().await.unwrap();
    let started = Instant::now();
    assert!(s.cp.cli(&["start", &s.name]).status.success());
    wait_delivered(&s.gw, &ids, Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", s.gw.log()));
    let seen = counts(s.data.path());
    let missing = ids.iter().filter(|id| !seen.contains_key(*id)).count();
    let twice = ids
        .iter()
        .filter(|id| seen.get(*id).is_some_and(|n| *n > 1))
        .count();
    eprintln!(
        "queue of {} requests, {:.1} MiB, across a gateway restart: drained in {:?}; missing {missing}, twice {twice}",
        ids.len(),
        bytes as f64 / (1 << 20) as f64,
        started.elapsed()
    );
    assert_eq!((missing, twice), (0, 0));
    // The operator pages through it: 200 requests, 64 at a time, each once, in order.
    let (listed, largest) = list_request_ids(&s.cp, &[&s.name], 64).unwrap();
    assert!(largest <= 64);
    assert_eq!(listed, ids);
}

#[tokio::test]
async fn a_gateway_paused_past_its_lease_mid_delivery_causes_no_second_run_at_once() {
    let s = setup_with("pause", &["--request-timeout", "20s"]).await;
    stop_agent(&s).await;
    let base = format!("/agents/{}", s.name);
    let key = format!("\r\nIdempotency-Key: {}", unique_name("k"));
    let id = queued_id(&post(&s.gw, &format!("{base}/slow?ms=12000"), "x", &key).await);
    assert!(s.cp.cli(&["start", &s.name]).status.success());
    eventually(Duration::from_secs(60), "the slow delivery starts", || {
        let started = !slow_runs(s.data.path(), &id).is_empty();
        async move { started.then_some(()) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.gw.log()));
    // The gateway holding the claim stops in the middle of the delivery, for longer than its
    // claim lease (10 s); another gateway is there to take over.
    s.gw.signal("STOP");
    let paused = Instant::now();
    let gw2 = Gateway::start_named(&s.etcd.url(), "gateway-two")
        .await
        .unwrap();
    let delivered = wait_delivered(&gw2, std::slice::from_ref(&id), Duration::from_secs(90)).await;
    let held = paused.elapsed();
    s.gw.signal("CONT");
    delivered.unwrap_or_else(|e| panic!("{e}\n{}\n{}", s.gw.log(), gw2.log()));
    let runs = slow_runs(s.data.path(), &id);
    eprintln!("paused gateway (held {held:?}): runs of the request at the agent {runs:?}");
    assert!(
        held > Duration::from_secs(10),
        "paused for less than the lease"
    );
    assert_one_run_at_a_time(&runs);
}

/// The most runs of `/slow` (of `ids`) at the agent at once, with the runs.
fn most_at_once(data: &Path, ids: &[String]) -> (usize, Vec<(u64, Option<u64>)>) {
    let runs: Vec<_> = ids.iter().flat_map(|id| slow_runs(data, id)).collect();
    let most = runs
        .iter()
        .map(|(start, _)| {
            runs.iter()
                .filter(|(s, end)| s <= start && end.is_none_or(|end| end > *start))
                .count()
        })
        .max()
        .unwrap_or(0);
    (most, runs)
}

#[tokio::test]
async fn a_gateway_replacing_a_paused_one_of_the_same_name_keeps_the_agents_replay_concurrency() {
    let s = setup_with(
        "life",
        &["--request-timeout", "20s", "--replay-concurrency", "2"],
    )
    .await;
    stop_agent(&s).await;
    let base = format!("/agents/{}", s.name);
    let mut ids = Vec::new();
    for _ in 0..4 {
        let key = format!("\r\nIdempotency-Key: {}", unique_name("k"));
        // 4 s: over before the frozen gateway's claim lease (10 s, renewed every 3 s) can end.
        let r = post(&s.gw, &format!("{base}/slow?ms=4000"), "x", &key).await;
        ids.push(queued_id(&r));
    }
    assert!(s.cp.cli(&["start", &s.name]).status.success());
    eventually(
        Duration::from_secs(60),
        "two slow deliveries under way",
        || {
            let (under_way, _) = most_at_once(s.data.path(), &ids);
            async move { (under_way == 2).then_some(()) }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.gw.log()));
    // The gateway freezes with both deliveries running at the agent, and a new process takes
    // its place under the same name (as a supervisor would): the claims it finds under that
    // name are its previous life's, whose deliveries still run, not its own to let go.
    s.gw.signal("STOP");
    let same_name = Gateway::start_named(&s.etcd.url(), "test-gateway")
        .await
        .unwrap();
    let delivered = wait_delivered(&same_name, &ids, Duration::from_secs(90)).await;
    s.gw.signal("CONT");
    delivered.unwrap_or_else(|e| panic!("{e}\n{}\n{}", s.gw.log(), same_name.log()));
    let (most, runs) = most_at_once(s.data.path(), &ids);
    eprintln!(
        "replay concurrency 2 across a gateway's two lives: at most {most} at once, runs {runs:?}"
    );
    assert_eq!(
        most, 2,
        "more runs at the agent at once than its replay concurrency"
    );
}

#[tokio::test]
async fn short_deliveries_claimed_ahead_reach_the_agent_at_its_concurrency_oldest_first() {
    // Deliveries of 40 ms, each with an Idempotency-Key (only requests safe to send twice are
    // claimed ahead): the replayer claims the next ones while these run at the agent.
    let s = setup_with("ahead", &["--replay-concurrency", "3"]).await;
    stop_agent(&s).await;
    let mut ids = Vec::new();
    for i in 0..90 {
        let path = format!("/agents/{}/slow?ms=40&n={i}", s.name);
        let key = format!("\r\nIdempotency-Key: {}", unique_name("ahead"));
        ids.push(queued_id(&post(&s.gw, &path, "x", &key).await));
    }
    assert!(s.cp.cli(&["start", &s.name]).status.success());
    assert_eq!(delivered_once(&s, &ids).await, ids.len());
    let (most, runs) = most_at_once(s.data.path(), &ids);
    assert_eq!(
        most, 3,
        "runs at the agent at once against its replay concurrency of 3: {runs:?}"
    );
    // First in, first started. The gate sends them strictly in order; what reaches the agent
    // may swap two sent at nearly the same time, never one that waited rounds behind another:
    // no request began before one queued three rounds (nine places) before it.
    let starts: Vec<u64> = ids
        .iter()
        .map(|id| slow_runs(s.data.path(), id)[0].0)
        .collect();
    for (i, later) in starts.iter().enumerate().skip(9) {
        assert!(
            starts[i - 9] <= *later,
            "request {i} started before request {}: {starts:?}",
            i - 9
        );
    }
    // Every delivery went through the agent's gate; those claimed ahead waited there for a
    // slot (printed: the wait depends on how long etcd takes to claim).
    let (_, metrics) = berth_tests::docker::http(&s.gw.admin_addr, "GET", "/metrics")
        .await
        .unwrap();
    let waited = |what: &str| -> f64 {
        let name = format!("berth_gateway_replay_step_seconds_{what}{{step=\"wait\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&name)?.parse().ok())
            .unwrap_or_else(|| panic!("{name} on /metrics:\n{metrics}"))
    };
    assert_eq!(waited("count") as usize, ids.len());
    eprintln!(
        "90 deliveries of 40 ms at concurrency 3: waited at the gate {:.2} s in all",
        waited("sum")
    );
}

#[tokio::test]
async fn a_gateway_cut_off_from_etcd_mid_delivery_gives_it_up_and_none_runs_twice_at_once() {
    let mut s = setup_with("cut", &["--request-timeout", "20s"]).await;
    // The gateway that delivers reaches etcd over a path the test stalls: silence, no error.
    let (path, cut) = behind_a_stallable_path(&s).await;
    // Only the gateway behind that path runs while the request is queued and delivered.
    assert!(
        s.gw.terminate(Duration::from_secs(40)).await,
        "{}",
        s.gw.log()
    );
    let base = format!("/agents/{}", s.name);
    let key = format!("\r\nIdempotency-Key: {}", unique_name("k"));
    let id = queued_id(&post(&cut, &format!("{base}/slow?ms=12000"), "x", &key).await);
    assert!(s.cp.cli(&["start", &s.name]).status.success());
    eventually(Duration::from_secs(60), "the slow delivery starts", || {
        let started = !slow_runs(s.data.path(), &id).is_empty();
        async move { started.then_some(()) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", cut.log()));
    // Mid-delivery, the gateway loses etcd but goes on running and reaching the agent; the
    // other gateway comes back and takes the request over once the claim lease (10 s) ends.
    path.stall();
    let stalled = Instant::now();
    s.gw.resume().await.unwrap();
    let delivered = wait_delivered(&s.gw, std::slice::from_ref(&id), Duration::from_secs(90)).await;
    let held = stalled.elapsed();
    // The path heals: whatever the cut-off gateway still had to write arrives late.
    path.heal();
    delivered.unwrap_or_else(|e| panic!("{e}\n{}\n{}", cut.log(), s.gw.log()));
    let runs = slow_runs(s.data.path(), &id);
    eprintln!("gateway cut off from etcd ({held:?} until delivered elsewhere): runs {runs:?}");
    assert!(held > Duration::from_secs(10), "delivered within the lease");
    assert_one_run_at_a_time(&runs);
    // The cut-off gateway gave the delivery up itself, not waiting for the agent's 12 s: it
    // could no longer keep its claims alive.
    let (start, end) = (runs[0].0, runs[0].1.expect("the first run ended"));
    assert!(
        end - start < 12_000,
        "the first run went on for {} ms: {runs:?}\n{}",
        end - start,
        cut.log()
    );
    // Once it hears from etcd again, its late writes change nothing: the request stays
    // delivered, read through the gateway that was cut off too.
    wait_delivered(&cut, std::slice::from_ref(&id), Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cut.log()));
    wait_delivered(&s.gw, &[id], Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", cut.log(), s.gw.log()));
}

#[tokio::test]
async fn a_request_etcd_did_not_confirm_is_answered_with_an_id_that_tells_its_fate() {
    let s = setup("unconfirmed").await;
    let (path, cut) = behind_a_stallable_path(&s).await;
    let base = format!("/agents/{}", s.name);
    // One queued first, so that the gateway holds the lease the next one is written under.
    let first = queued_id(&post(&cut, &format!("{base}/echo"), "first", "").await);
    // etcd goes silent while the next is written: the write may still be applied when the
    // path heals, so the gateway cannot say it was not queued.
    path.stall();
    let r = post(&cut, &format!("{base}/echo"), "unconfirmed", "").await;
    path.heal();
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    let error = &r.json()["error"];
    assert_eq!(error["code"], "queue_unavailable");
    let id = error["request_id"]
        .as_str()
        .expect("the request's id")
        .to_string();
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("GET /requests/{id}")),
        "{message}"
    );
    // Once etcd answers, the id tells: queued (the write applied late) or unknown.
    let fate = eventually(Duration::from_secs(30), "the request's fate", || {
        let (addr, id) = (cut.addr.clone(), id.clone());
        async move {
            let status = berth_tests::wire::get(&addr, &format!("/requests/{id}"))
                .await
                .status;
            matches!(status, 200 | 404).then_some(status)
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", cut.log()));
    eprintln!("unconfirmed request {id}: {fate} once etcd answered");
    assert!(s.cp.cli(&["start", &s.name]).status.success());
    let mut ids = vec![first];
    if fate == 200 {
        ids.push(id.clone());
    }
    wait_delivered(&s.gw, &ids, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", s.gw.log()));
    if fate == 404 {
        assert!(
            !counts(s.data.path()).contains_key(&id),
            "a request etcd does not know reached the agent"
        );
    }
}

#[tokio::test]
async fn with_one_etcd_endpoint_silent_requests_are_still_queued_through_the_other() {
    let s = setup("silent").await;
    // A gateway with two endpoints: one over a path the test stalls, one direct (the same
    // member behind both, as two members of a cluster would be to the gateway).
    let path = StallProxy::start(s.etcd.url().trim_start_matches("http://")).unwrap();
    let endpoints = format!("{},{}", path.url(), s.etcd.url());
    let two = Gateway::start_named(&endpoints, "gateway-two")
        .await
        .unwrap();
    stop_agent(&s).await;
    let base = format!("/agents/{}", s.name);
    wait_down(&two, &base).await;
    let mut ids = vec![queued_id(
        &post(&two, &format!("{base}/echo"), "before", "").await,
    )];
    path.stall();
    // Until one of them met the silent endpoint (its first attempt timed out after 5 s),
    // requests go on; each is queued all the same.
    let mut met_silence = false;
    for i in 0..20 {
        let sent = Instant::now();
        let r = post(&two, &format!("{base}/echo?n={i}"), "during", "").await;
        let took = sent.elapsed();
        assert_eq!(
            r.status,
            202,
            "after {took:?}: {}\n{}",
            String::from_utf8_lossy(&r.body),
            two.log()
        );
        ids.push(queued_id(&r));
        if took > Duration::from_secs(4) {
            eprintln!("request {i} met the silent endpoint and was queued after {took:?}");
            met_silence = true;
            break;
        }
    }
    assert!(met_silence, "no request was sent to the silent endpoint");
    path.heal();
    assert!(s.cp.cli(&["start", &s.name]).status.success());
    wait_delivered(&s.gw, &ids, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", s.gw.log()));
}

#[tokio::test]
async fn a_keyed_answer_over_the_limit_is_its_recorded_outcome_never_409() {
    let s = setup("bigans").await;
    let path = format!("/agents/{}/bytes/2000000", s.name);
    let head = format!(
        "GET {path} HTTP/1.1\r\nIdempotency-Key: {}",
        unique_name("k")
    );
    let first = send(&s.gw.addr, &head, b"").await;
    assert_eq!(first.status, 200, "{}", s.gw.log());
    assert_eq!(
        first.body.len(),
        2_000_000,
        "the client gets the answer whole"
    );
    for _ in 0..2 {
        let again = send(&s.gw.addr, &head, b"").await;
        assert_eq!(
            again.status,
            200,
            "{}",
            String::from_utf8_lossy(&again.body[..again.body.len().min(200)])
        );
        assert_eq!(again.header("x-berth-replayed").as_deref(), Some("1"));
        assert_eq!(again.header("x-berth-truncated").as_deref(), Some("true"));
        assert_eq!(
            again.body.len(),
            1 << 20,
            "the stored answer is cut at 1 MiB"
        );
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Keys under the agent's `request-bodies/` in etcd (a body kept apart, and its pieces).
async fn body_keys(s: &berth_tests::replay::Setup) -> usize {
    let mut etcd = s.etcd.client().await.unwrap();
    let options = etcd_client::GetOptions::new()
        .with_prefix()
        .with_keys_only();
    let prefix = format!("/berth/request-bodies/{}/", s.name);
    etcd.get(prefix, Some(options)).await.unwrap().kvs().len()
}

/// With the body limit raised past what one etcd request takes (8 MiB against 1.5 MiB), a
/// body of 5 MiB is queued (in pieces), replayed whole and in order, shown by its first MiB,
/// and dropped with all its pieces; one over the limit gets 413. A body streamed without a
/// length (chunked) is queued and replayed whole as well.
#[tokio::test]
async fn bodies_larger_than_an_etcd_write_or_streamed_are_queued_and_replayed_whole() {
    let s = setup_with("bigbody", &["--replay-max-body", "8MiB"]).await;
    stop_agent(&s).await;
    let head = format!("POST /agents/{}/digest HTTP/1.1", s.name);
    // Not one byte repeated: pieces out of order or cut would show in the digest.
    let body: Vec<u8> = (0..5 * 1024 * 1024 + 7).map(|i| (i % 251) as u8).collect();
    let id = queued_id(&send(&s.gw.addr, &head, &body).await);
    assert_eq!(body_keys(&s).await, 6, "the first MiB and five pieces");
    let dropped = queued_id(&send(&s.gw.addr, &head, &body).await);
    let over = send(&s.gw.addr, &head, &vec![b'x'; 8 * 1024 * 1024 + 1]).await;
    assert_eq!(over.status, 413, "{}", String::from_utf8_lossy(&over.body));
    let streamed: Vec<u8> = body.iter().rev().take(2 * 1024 * 1024).copied().collect();
    let chunked = send_chunked(&s.gw.addr, &head, &streamed, 16 * 1024).await;
    let streamed_id = queued_id(&chunked);

    // Shown (by the API, whose clients take answers of up to 4 MiB) with its first MiB.
    let shown = s.cp.cli(&["requests", "show", &dropped, "-o", "json"]);
    assert!(shown.status.success(), "{shown:?}");
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(
        shown["bodyBytes"],
        (5 * 1024 * 1024 + 7).to_string(),
        "{shown}"
    );
    let out = s.cp.cli(&["requests", "drop", &dropped]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        body_keys(&s).await,
        6 + 2,
        "the dropped one's pieces went with it"
    );

    assert!(s.cp.cli(&["start", &s.name]).status.success());
    wait_delivered(
        &s.gw,
        &[id.clone(), streamed_id.clone()],
        Duration::from_secs(60),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.gw.log()));
    for (id, sent) in [(&id, &body), (&streamed_id, &streamed)] {
        let result = berth_tests::wire::get(&s.gw.addr, &format!("/requests/{id}")).await;
        let answer: serde_json::Value =
            serde_json::from_str(result.json()["response"]["body"].as_str().unwrap()).unwrap();
        assert_eq!(answer["bytes"], sent.len(), "{answer}");
        assert_eq!(
            answer["sha256"],
            sha256_hex(sent),
            "arrived whole and in order"
        );
    }
}

#[tokio::test]
async fn dropping_a_request_releases_its_idempotency_key() {
    let s = setup("dropkey").await;
    stop_agent(&s).await;
    let path = format!("/agents/{}/echo", s.name);
    let key = format!("\r\nIdempotency-Key: {}", unique_name("k"));
    let first = queued_id(&post(&s.gw, &path, "d", &key).await);
    let same = queued_id(&post(&s.gw, &path, "d", &key).await);
    assert_eq!(same, first, "the same key while queued: the same 202");
    let out = s.cp.cli(&["requests", "drop", &first]);
    assert!(out.status.success(), "{out:?}");
    let after = queued_id(&post(&s.gw, &path, "d", &key).await);
    assert_ne!(after, first, "after a drop the key is free: a new request");
}

/// Polls `GET /requests/{id}` until each of `ids` stands as `state` (a 404 as "gone").
async fn wait_state(s: &berth_tests::replay::Setup, ids: &[String], state: &str) {
    eventually(Duration::from_secs(60), state, || async {
        for id in ids {
            let r = berth_tests::wire::get(&s.gw.addr, &format!("/requests/{id}")).await;
            let stands = match r.status {
                404 => "gone".to_string(),
                _ => r.json()["status"].as_str().unwrap_or_default().to_string(),
            };
            if stands != state {
                return None;
            }
        }
        Some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.gw.log()));
}

#[tokio::test]
async fn dead_letters_are_retried_and_dropped_by_id_or_all_of_an_agent_at_once() {
    // Each POST outlasts the request timeout: cut off after the agent saw it, it is dead at
    // its first attempt (not safe to send twice).
    let s = setup_with("redrive", &["--request-timeout", "1s"]).await;
    let ids = queue_slow_then_start(&s, 6, 3000).await;
    wait_state(&s, &ids, "dead").await;
    stop_agent(&s).await;

    // Two by id, then the rest of the agent's dead letters.
    let out = s.cp.cli(&["requests", "retry", &ids[0], &ids[1]]);
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(said.matches("queued again").count(), 2, "{said}");
    wait_state(&s, &ids[..2], "queued").await;
    let out = s.cp.cli(&["requests", "retry", "--all-dead", &s.name]);
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        said.contains(&format!(
            "4 dead-lettered requests of agent/{} queued again",
            s.name
        )),
        "{said}"
    );
    wait_state(&s, &ids, "queued").await;
    let (dead, _) = list_request_ids(&s.cp, &[&s.name, "--state", "dead"], 100).unwrap();
    assert!(dead.is_empty(), "{dead:?}");

    // Started, they are sent again (the log shows each twice now) and die again; then every
    // dead letter of the agent is dropped at once.
    assert!(s.cp.cli(&["start", &s.name]).status.success());
    wait_state(&s, &ids, "dead").await;
    let seen = counts(s.data.path());
    for id in &ids {
        assert_eq!(
            seen.get(id),
            Some(&2),
            "{id} sent again once retried: {seen:?}"
        );
    }
    let out = s.cp.cli(&["requests", "drop", "--all-dead", &s.name]);
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        said.contains(&format!(
            "6 dead-lettered requests of agent/{} dropped",
            s.name
        )),
        "{said}"
    );
    wait_state(&s, &ids, "gone").await;
    // Nothing left to act on: none, said so, and no error.
    let out = s.cp.cli(&["requests", "retry", "--all-dead", &s.name]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 dead-lettered"));
    // An id, or --all-dead, is needed; not both.
    let out = s.cp.cli(&["requests", "drop"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out =
        s.cp.cli(&["requests", "drop", &ids[0], "--all-dead", &s.name]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[tokio::test]
async fn a_replayed_answer_that_does_not_end_is_kept_cut_and_the_queue_goes_on() {
    // One at a time: the stream would hold the agent's only replay slot for a minute.
    let s = setup_with(
        "endless",
        &["--request-timeout", "2s", "--replay-concurrency", "1"],
    )
    .await;
    stop_agent(&s).await;
    let base = format!("/agents/{}", s.name);
    let head = format!("GET {base}/stream?n=600&ms=100 HTTP/1.1");
    let streamed = queued_id(&send(&s.gw.addr, &head, b"").await);
    let after = queued_id(&post(&s.gw, &format!("{base}/echo"), "next", "").await);
    let started = Instant::now();
    assert!(s.cp.cli(&["start", &s.name]).status.success());
    wait_delivered(&s.gw, &[streamed.clone(), after], Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", s.gw.log()));
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "the next request waited {took:?} behind a minute-long answer"
    );
    let done = berth_tests::wire::get(&s.gw.addr, &format!("/requests/{streamed}")).await;
    let done = done.json();
    assert_eq!(done["response"]["status"], 200, "{done}");
    assert_eq!(done["response"]["truncated"], true, "{done}");
    let body = done["response"]["body"].as_str().unwrap();
    assert!(body.starts_with("id: 0\ndata: event 0\n"), "{body}");
    assert!(!body.contains("event 599"), "cut before its end: {body}");
}

/// Stops the agent, queues `count` POSTs to `/slow?ms={ms}` (not safe to send twice: one cut
/// off mid-delivery, or whose outcome was not written, could only be dead-lettered), and starts
/// the agent again; their ids.
async fn queue_slow_then_start(
    s: &berth_tests::replay::Setup,
    count: usize,
    ms: u64,
) -> Vec<String> {
    stop_agent(s).await;
    let base = format!("/agents/{}", s.name);
    let mut ids = Vec::new();
    for i in 0..count {
        let path = format!("{base}/slow?ms={ms}&n={i}");
        ids.push(queued_id(&post(&s.gw, &path, "x", "").await));
    }
    assert!(s.cp.cli(&["start", &s.name]).status.success());
    ids
}

/// Waits until every one of `ids` is delivered (none dead); how many reached the agent once.
async fn delivered_once(s: &berth_tests::replay::Setup, ids: &[String]) -> usize {
    wait_delivered(&s.gw, ids, Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", s.gw.log()));
    let seen = counts(s.data.path());
    ids.iter().filter(|id| seen.get(*id) == Some(&1)).count()
}

#[tokio::test]
async fn a_gateway_stopped_with_sigterm_during_replay_leaves_nothing_dead() {
    let mut s = setup("term").await;
    let ids = queue_slow_then_start(&s, 40, 400).await;
    eventually(Duration::from_secs(60), "replay under way", || {
        let n = arrivals(s.data.path()).len();
        async move { (n >= 6).then_some(()) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.gw.log()));
    let stopping = Instant::now();
    assert!(
        s.gw.terminate(Duration::from_secs(40)).await,
        "{}",
        s.gw.log()
    );
    let stopped_in = stopping.elapsed();
    s.gw.resume().await.unwrap();
    let once = delivered_once(&s, &ids).await;
    eprintln!(
        "SIGTERM during replay: stopped in {stopped_in:?}; {} queued, {once} delivered once, 0 dead",
        ids.len()
    );
    assert_eq!(once, ids.len());
}

#[tokio::test]
async fn etcd_killed_while_deliveries_run_loses_none_of_their_outcomes() {
    let mut s = setup("etcdkill").await;
    let ids = queue_slow_then_start(&s, 12, 1500).await;
    let running = |data: &Path| -> Vec<String> {
        ids.iter()
            .filter(|id| slow_runs(data, id).iter().any(|run| run.1.is_none()))
            .cloned()
            .collect()
    };
    let under_way = eventually(Duration::from_secs(60), "deliveries under way", || {
        let now = running(s.data.path());
        async move { (!now.is_empty()).then_some(now) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.gw.log()));
    s.etcd.stop();
    // etcd stays down until the agent has answered every delivery that was under way: their
    // outcomes are known only to the gateway, which cannot write them meanwhile.
    eventually(Duration::from_secs(30), "the deliveries answered", || {
        let data = s.data.path();
        let answered = under_way
            .iter()
            .all(|id| slow_runs(data, id).iter().all(|run| run.1.is_some()));
        async move { answered.then_some(()) }
    })
    .await
    .unwrap();
    s.etcd.resume().await.unwrap();
    let once = delivered_once(&s, &ids).await;
    eprintln!(
        "etcd killed with {} deliveries under way: {} queued, {once} delivered once, 0 dead",
        under_way.len(),
        ids.len()
    );
    assert_eq!(once, ids.len(), "{}", s.gw.log());
}

/// Which gateway replays each agent's queue, by agent.
async fn replayed_by(s: &berth_tests::replay::Setup) -> std::collections::HashMap<String, String> {
    let mut etcd = s.etcd.client().await.unwrap();
    berth_tests::replay::replayed_by(&mut etcd).await.unwrap()
}

#[tokio::test]
async fn a_gateway_that_starts_gets_its_share_of_the_agents_replay_at_once() {
    let s = setup_with("share", &["--replay-concurrency", "1"]).await;
    let other = unique_name("share");
    let (other_data, volume) = berth_tests::docker::data_volume().unwrap();
    let out =
        s.cp.deploy_echo(&other, &["-v", &volume, "--replay-concurrency", "1"]);
    assert!(out.status.success(), "{out:?}");
    let api = s.cp.agents().await.unwrap();
    wait_agent(&api, &other, "ready", |a| ready(a) == 1)
        .await
        .unwrap();
    wait_routed(&s.gw.addr, &format!("/agents/{other}/health"))
        .await
        .unwrap();
    stop_agent(&s).await;
    assert!(s.cp.cli(&["stop", &other]).status.success());
    wait_agent(&api, &other, "stopped", |a| ready(a) == 0)
        .await
        .unwrap();
    wait_down(&s.gw, &format!("/agents/{other}")).await;
    // 16 requests of 500 ms each, one at a time: each queue takes 8 s to drain.
    let mut ids = Vec::new();
    for agent in [&s.name, &other] {
        for i in 0..16 {
            let path = format!("/agents/{agent}/slow?ms=500&n={i}");
            ids.push(queued_id(&post(&s.gw, &path, "x", "").await));
        }
    }
    for agent in [&s.name, &other] {
        assert!(s.cp.cli(&["start", agent]).status.success());
    }
    // Alone, the gateway replays both.
    eventually(Duration::from_secs(60), "both agents replayed", || async {
        let by = replayed_by(&s).await;
        (by.len() == 2 && by.values().all(|g| g == "test-gateway")).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.gw.log()));
    // A second gateway starts: it gets one of them while both queues still wait, not when
    // they have drained.
    let second = Gateway::start_named(&s.etcd.url(), "gateway-second")
        .await
        .unwrap();
    let started = Instant::now();
    let shared = eventually(Duration::from_secs(5), "one agent each", || async {
        let by = replayed_by(&s).await;
        let mut holders: Vec<&String> = by.values().collect();
        holders.sort();
        (holders == ["gateway-second", "test-gateway"]).then_some(())
    })
    .await;
    if let Err(e) = shared {
        let by = replayed_by(&s).await;
        panic!("{e}: {by:?}\n{}\n{}", s.gw.log(), second.log());
    }
    eprintln!(
        "shared {:?} after the second gateway started",
        started.elapsed()
    );
    // Each says so on its /metrics.
    for gateway in [&s.gw, &second] {
        eventually(Duration::from_secs(5), "replaying_agents 1", || async {
            let (_, page) = berth_tests::docker::http(&gateway.admin_addr, "GET", "/metrics")
                .await
                .unwrap_or_default();
            page.lines()
                .any(|l| l == "berth_gateway_replaying_agents 1")
                .then_some(())
        })
        .await
        .unwrap();
    }
    wait_delivered(&s.gw, &ids, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", s.gw.log(), second.log()));
    // None run twice, and each agent's requests one at a time (its replay concurrency) across
    // the hand-over.
    let mut seen = counts(s.data.path());
    seen.extend(counts(other_data.path()));
    for id in &ids {
        assert_eq!(seen.get(id), Some(&1), "{id} delivered once");
    }
    for (data, ids) in [(s.data.path(), &ids[..16]), (other_data.path(), &ids[16..])] {
        let (most, runs) = most_at_once(data, ids);
        assert_eq!(most, 1, "one at a time: {runs:?}");
    }
}
