//! The gateway's limits on clients, against real `berth gateway` processes in front of the
//! example agent: clients that trickle their headers or send nothing (slowloris), over HTTP and
//! before a TLS handshake, are cut off while other clients are served; a body that does not
//! arrive in time gets 408; headers over the limit get 431; a connection beyond the limit gets
//! 503; an answer that goes quiet past the stream idle timeout is cut. Every refusal the
//! gateway words names its limit.

use berth_tests::docker::{ready, wait_agent, DockerRun, NodeAgent};
use berth_tests::wire::{get, read_response, send, send_tls, wait_routed};
use berth_tests::{eventually, make_certs, unique_name, ControlPlane, Etcd, Gateway};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How a slow client's connection ended.
struct Ended {
    /// Time from connecting until the gateway closed the connection (`None`: still open after
    /// 20 s).
    closed_after: Option<Duration>,
    /// What the gateway sent before closing.
    received: Vec<u8>,
}

/// Connects to `addr`, sends `first`, then one more header byte every 100 ms (nothing at all
/// when `first` is empty) until the gateway closes the connection.
async fn trickle(addr: String, first: String) -> Ended {
    let started = Instant::now();
    let mut stream = TcpStream::connect(&addr).await.expect("connect");
    stream.write_all(first.as_bytes()).await.expect("write");
    let mut received = Vec::new();
    let mut buf = [0u8; 1024];
    let mut pace = tokio::time::interval(Duration::from_millis(100));
    while started.elapsed() < Duration::from_secs(20) {
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) | Err(_) => return Ended { closed_after: Some(started.elapsed()), received },
                Ok(n) => received.extend_from_slice(&buf[..n]),
            },
            _ = pace.tick() => {
                if !first.is_empty() && stream.write_all(b"x").await.is_err() {
                    return Ended { closed_after: Some(started.elapsed()), received };
                }
            }
        }
    }
    Ended {
        closed_after: None,
        received,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_and_greedy_clients_are_cut_off_or_refused_and_others_are_served() {
    let run = DockerRun::new().unwrap();
    let etcd = Etcd::start().await.unwrap();
    let cp = ControlPlane::start(&etcd.url()).await.unwrap();
    let node = NodeAgent::start(&cp.url(), &unique_name("node"), &run).unwrap();
    let strict = [
        "--header-timeout",
        "1s",
        "--body-timeout",
        "1s",
        "--max-header-bytes",
        "4096",
        "--stream-idle-timeout",
        "1s",
    ];
    let gw = Gateway::start_with(&etcd.url(), "strict", &strict)
        .await
        .unwrap();
    // One serving thread, so that connections are taken in the order they were made.
    let narrow = ["--workers", "1", "--max-connections", "8"];
    let narrow = Gateway::start_with(&etcd.url(), "narrow", &narrow)
        .await
        .unwrap();
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path(), &[]);
    let mut tls_flags = strict.to_vec();
    let (cert, key) = (
        certs.path().join("server.pem"),
        certs.path().join("server-key.pem"),
    );
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    tls_flags.extend(["--tls-cert", cert, "--tls-key", key]);
    let tls = Gateway::start_with(&etcd.url(), "tls", &tls_flags)
        .await
        .unwrap();

    let api = cp.agents().await.unwrap();
    let name = unique_name("limits");
    let out = cp.deploy_echo(&name, &[]);
    assert!(out.status.success(), "{out:?}");
    wait_agent(&api, &name, "1 ready", |a| ready(a) == 1)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", cp.log(), node.log()));
    let health = format!("/agents/{name}/health");
    for gateway in [&gw, &narrow] {
        wait_routed(&gateway.addr, &health)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", gateway.log()));
    }

    // Slowloris: eight clients trickle their headers a byte at a time, one sends nothing, and
    // one opens a TLS connection and never starts the handshake. Each is cut off at the header
    // deadline (1 s), and a well-behaved client is answered all the while.
    let head = format!("GET {health} HTTP/1.1\r\nHost: slow\r\nX-Slow: ");
    let mut slow: Vec<_> = (0..8)
        .map(|_| tokio::spawn(trickle(gw.addr.clone(), head.clone())))
        .collect();
    slow.push(tokio::spawn(trickle(gw.addr.clone(), String::new())));
    slow.push(tokio::spawn(trickle(tls.addr.clone(), String::new())));
    let mut answered = 0;
    for _ in 0..20 {
        assert_eq!(get(&gw.addr, &health).await.status, 200);
        answered += 1;
    }
    let mut cut = Vec::new();
    for (i, client) in slow.into_iter().enumerate() {
        let ended = client.await.unwrap();
        let after = ended
            .closed_after
            .unwrap_or_else(|| panic!("slow client {i} still connected after 20 s\n{}", gw.log()));
        assert!(
            after >= Duration::from_millis(900),
            "slow client {i} cut off before its deadline: {after:?}"
        );
        let received = String::from_utf8_lossy(&ended.received);
        assert!(
            !received.contains(" 200 "),
            "slow client {i} was answered: {received}"
        );
        cut.push(after);
    }
    let (fastest, slowest) = (cut.iter().min().unwrap(), cut.iter().max().unwrap());
    println!(
        "slowloris: 10 slow clients cut off after {} to {} ms (header timeout 1 s); {answered} of 20 other requests answered meanwhile",
        fastest.as_millis(),
        slowest.as_millis()
    );
    assert!(*slowest < Duration::from_secs(10), "{cut:?}");
    let over_tls = send_tls(
        &tls.addr,
        &certs.path().join("ca.pem"),
        &format!("GET {health} HTTP/1.1"),
        b"",
    )
    .await;
    assert_eq!(over_tls.status, 200, "the TLS gateway still serves");

    // An idle keep-alive connection is closed at the same deadline after its response.
    let mut idle = TcpStream::connect(&gw.addr).await.unwrap();
    let request = format!("GET {health} HTTP/1.1\r\nHost: idle\r\n\r\n");
    idle.write_all(request.as_bytes()).await.unwrap();
    let started = Instant::now();
    let reply = read_response(&mut idle).await;
    assert_eq!(reply.status, 200, "{}", reply.head);
    let after = started.elapsed();
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_secs(10),
        "an idle keep-alive connection closed after {after:?}"
    );

    // A body the gateway reads whole (a known, small length) must arrive in time: 408.
    let mut stream = TcpStream::connect(&gw.addr).await.unwrap();
    let partial = format!(
        "POST /agents/{name}/echo HTTP/1.1\r\nHost: slow\r\nContent-Length: 100\r\n\r\n0123456789"
    );
    stream.write_all(partial.as_bytes()).await.unwrap();
    let reply = read_response(&mut stream).await;
    assert_eq!(reply.status, 408, "{}", reply.head);
    let message = reply.json()["error"]["message"].to_string();
    assert!(message.contains("--body-timeout"), "{message}");

    // Headers over the limit: 431 naming it; far over it, hyper's own 431 and a closed
    // connection. The gateway serves on.
    let big = format!("GET {health} HTTP/1.1\r\nX-Big: {}", "a".repeat(8 * 1024));
    let reply = send(&gw.addr, &big, b"").await;
    assert_eq!(reply.status, 431, "{}", reply.head);
    assert_eq!(reply.json()["error"]["code"], "headers_too_large");
    let message = reply.json()["error"]["message"].to_string();
    assert!(
        message.contains("4096") && message.contains("--max-header-bytes"),
        "{message}"
    );
    let huge = format!("GET {health} HTTP/1.1\r\nX-Huge: {}", "a".repeat(30 * 1024));
    assert_eq!(send(&gw.addr, &huge, b"").await.status, 431);
    assert_eq!(get(&gw.addr, &health).await.status, 200);

    // Connections: with eight open (and silent), a ninth is answered 503 naming the limit;
    // once one of the eight closes, a new connection is served.
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(TcpStream::connect(&narrow.addr).await.unwrap());
    }
    let refused = get(&narrow.addr, &health).await;
    assert_eq!(refused.status, 503, "{}", refused.head);
    assert_eq!(refused.json()["error"]["code"], "too_many_connections");
    let message = refused.json()["error"]["message"].to_string();
    assert!(
        message.contains('8') && message.contains("--max-connections"),
        "{message}"
    );
    assert_eq!(refused.header("retry-after").as_deref(), Some("1"));
    held.pop();
    eventually(
        Duration::from_secs(10),
        "a connection is served once one of the eight has closed",
        || {
            let (addr, path) = (narrow.addr.clone(), health.clone());
            async move { (get(&addr, &path).await.status == 200).then_some(()) }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", narrow.log()));
    drop(held);

    // An answer that goes quiet past the stream idle timeout (1 s here) is cut; one whose
    // pauses stay within it (the default, 5 minutes) comes whole.
    let stream = format!("/agents/{name}/stream?n=2&ms=2500");
    let (seen, took) = read_until_closed(&gw.addr, &stream).await;
    assert!(seen.contains("data: event 0"), "{seen}");
    assert!(
        !seen.contains("data: event 1"),
        "cut before the second event: {seen}"
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2400),
        "cut after {took:?}"
    );
    let (seen, _) = read_until_closed(&narrow.addr, &stream).await;
    assert!(seen.contains("data: event 1"), "{seen}");
}

/// Sends `GET path` and reads until the gateway closes the connection: what came, and when.
async fn read_until_closed(addr: &str, path: &str) -> (String, Duration) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let sent = Instant::now();
    let mut seen = Vec::new();
    // A cut connection may end with a reset rather than a close: either way it is over.
    let _ = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut seen)).await;
    (String::from_utf8_lossy(&seen).into_owned(), sent.elapsed())
}
