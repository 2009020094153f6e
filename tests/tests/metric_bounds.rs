//! No label value comes from unauthenticated input: 10,000 requests for agents with random
//! names at the gateway, and 10,000 gRPC calls to random method paths at the control plane,
//! leave each one's `/metrics` page and resident memory where they were; the requests are
//! counted under one label (`agent="_unknown"`, `method="unknown"`).

use berth_tests::docker::http;
use berth_tests::{ControlPlane, Etcd, Gateway};
use std::future::poll_fn;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::codegen::{http as h, Service};

const REQUESTS: u64 = 10_000;

/// Distinct names that look random: 2 KiB for agents (the longest a path may carry easily),
/// 64 characters for gRPC methods.
fn name(i: u64, len: usize) -> String {
    let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

async fn metrics(admin: &str) -> String {
    http(admin, "GET", "/metrics").await.expect("/metrics").1
}

/// One keep-alive request: its status.
async fn get(stream: &mut TcpStream, path: &str) -> u16 {
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.unwrap();
    head[9..12].parse().unwrap()
}

/// Memory may grow by allocator noise, never by what 10,000 new series would hold (before
/// the fix: 46 MB at the gateway for 10,500 requests).
const MAX_GROWTH_KIB: u64 = 8 * 1024;

#[tokio::test]
async fn unknown_agents_and_methods_make_no_new_metric_labels() {
    let etcd = Etcd::start().await.unwrap();
    let cp = ControlPlane::start(&etcd.url()).await.unwrap();
    let gw = Gateway::start(&etcd.url()).await.unwrap();

    // The gateway.
    let mut stream = TcpStream::connect(&gw.addr).await.unwrap();
    assert_eq!(get(&mut stream, "/agents/warm-up/x").await, 404);
    let (page_before, rss_before) = (metrics(&gw.admin_addr).await, rss_kib(gw.pid().unwrap()));
    for i in 0..REQUESTS {
        let path = format!("/agents/{}/x", name(i, 2048));
        assert_eq!(get(&mut stream, &path).await, 404, "{i}");
    }
    let page = metrics(&gw.admin_addr).await;
    let grown = rss_kib(gw.pid().unwrap()).saturating_sub(rss_before);
    assert!(
        page.contains(&format!(
            "berth_gateway_requests_total{{agent=\"_unknown\",code=\"404\"}} {}",
            REQUESTS + 1
        )),
        "{page}"
    );
    assert!(
        !page.contains(&name(7, 2048)),
        "a name from a path became a label"
    );
    // Counts grew by a few digits; no series was added.
    assert!(
        page.len() < page_before.len() + 512,
        "the gateway's /metrics grew from {} to {} bytes",
        page_before.len(),
        page.len()
    );
    assert!(grown < MAX_GROWTH_KIB, "the gateway grew by {grown} KiB");

    // The control plane, before any authentication.
    let channel = tonic::transport::Endpoint::from_shared(cp.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let call = |path: String| {
        let mut channel = channel.clone();
        let uri = format!("{}{path}", cp.url());
        async move {
            let request = h::Request::builder()
                .method("POST")
                .uri(uri)
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(tonic::body::Body::empty())
                .unwrap();
            poll_fn(|cx| channel.poll_ready(cx)).await.unwrap();
            channel.call(request).await.unwrap().status()
        }
    };
    call("/berth.v1.AgentService/Warm".into()).await;
    let (page_before, rss_before) = (metrics(&cp.admin_addr).await, rss_kib(cp.pid().unwrap()));
    for i in 0..REQUESTS {
        let status = call(format!("/berth.v1.{}/{}", name(i, 16), name(i + 1, 64))).await;
        assert_eq!(status, 200, "gRPC errors travel in grpc-status");
    }
    let page = metrics(&cp.admin_addr).await;
    let grown = rss_kib(cp.pid().unwrap()).saturating_sub(rss_before);
    assert!(
        page.contains("method=\"unknown\""),
        "unknown methods counted under one label:\n{page}"
    );
    assert!(!page.contains(&name(8, 64)), "a path became a label");
    assert!(
        page.len() < page_before.len() + 512,
        "the control plane's /metrics grew from {} to {} bytes",
        page_before.len(),
        page.len()
    );
    assert!(
        grown < MAX_GROWTH_KIB,
        "the control plane grew by {grown} KiB"
    );
}
