//! What one connection may hold of the control plane's gRPC server, tested with raw HTTP/2
//! frames (a well-behaved client library would never break the limits): the server announces
//! its stream and header limits, a stream beyond the concurrent-stream limit is refused, and a
//! request whose headers are over the limit is answered 431 and reset, not served.

use berth_control_plane::server::{MAX_HEADER_LIST_BYTES, MAX_STREAMS_PER_CONNECTION};
use berth_tests::{ControlPlane, Etcd};
use std::collections::HashMap;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const REFUSED_STREAM: u32 = 0x7;
const MAX_FRAME: usize = 16_384;

struct Frame {
    kind: u8,
    stream: u32,
    payload: Vec<u8>,
}

/// An HTTP/2 connection driven frame by frame.
struct Raw(TcpStream);

impl Raw {
    /// Connects, sends the preface and empty settings, and returns the server's settings
    /// (acknowledged).
    async fn connect(addr: &str) -> (Self, HashMap<u16, u32>) {
        let mut raw = Raw(TcpStream::connect(addr).await.expect("connect"));
        raw.0
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        raw.send(SETTINGS, 0, 0, &[]).await;
        let frame = raw.next().await.expect("the server's settings");
        assert_eq!(frame.kind, SETTINGS);
        let settings = frame
            .payload
            .chunks(6)
            .map(|c| {
                (
                    u16::from_be_bytes([c[0], c[1]]),
                    u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                )
            })
            .collect();
        raw.send(SETTINGS, 0x1, 0, &[]).await;
        (raw, settings)
    }

    async fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let len = payload.len() as u32;
        let mut frame = len.to_be_bytes()[1..].to_vec();
        frame.extend([kind, flags]);
        frame.extend(stream.to_be_bytes());
        frame.extend(payload);
        self.0.write_all(&frame).await.unwrap();
    }

    /// Opens `stream` with a request to `path` and `extra` headers, split into frames the
    /// server accepts; the stream stays open for a body unless `end` is set.
    async fn request(&mut self, stream: u32, path: &str, extra: &[(&str, &str)], end: bool) {
        let mut block = Vec::new();
        let fixed = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ];
        for (name, value) in fixed.iter().chain(extra) {
            // A literal field without indexing, with a new name.
            block.push(0);
            block.extend(hpack_int(name.len()));
            block.extend(name.as_bytes());
            block.extend(hpack_int(value.len()));
            block.extend(value.as_bytes());
        }
        let chunks: Vec<_> = block.chunks(MAX_FRAME).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len();
            let mut flags = if last { END_HEADERS } else { 0 };
            let kind = if i == 0 { HEADERS } else { CONTINUATION };
            if i == 0 && end {
                flags |= END_STREAM;
            }
            self.send(kind, flags, stream, chunk).await;
        }
    }

    /// The next frame, or `None` when the connection closes or 10 s pass without one.
    async fn next(&mut self) -> Option<Frame> {
        let mut head = [0u8; 9];
        tokio::time::timeout(Duration::from_secs(10), self.0.read_exact(&mut head))
            .await
            .ok()?
            .ok()?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        self.0.read_exact(&mut payload).await.ok()?;
        Some(Frame {
            kind: head[3],
            stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
            payload,
        })
    }

    /// Frames until one matches `done`, or the connection ends: the frames seen.
    async fn until(&mut self, done: impl Fn(&Frame) -> bool) -> Vec<Frame> {
        let mut seen = Vec::new();
        while let Some(frame) = self.next().await {
            let stop = done(&frame) || frame.kind == GOAWAY;
            seen.push(frame);
            if stop {
                break;
            }
        }
        seen
    }
}

/// An HPACK integer with a 7-bit prefix (string lengths, not Huffman-coded).
fn hpack_int(mut n: usize) -> Vec<u8> {
    if n < 127 {
        return vec![n as u8];
    }
    let mut out = vec![127];
    n -= 127;
    while n >= 128 {
        out.push((n % 128) as u8 | 0x80);
        n /= 128;
    }
    out.push(n as u8);
    out
}

fn reset_code(frame: &Frame) -> u32 {
    u32::from_be_bytes(frame.payload[..4].try_into().unwrap())
}

#[tokio::test]
async fn a_connection_gets_only_so_many_streams_and_header_bytes() {
    let etcd = Etcd::start().await.unwrap();
    let cp = ControlPlane::start(&etcd.url()).await.unwrap();
    let addr = cp.addr.clone();

    // A well-formed call on a raw connection is answered (the client below is sound).
    let (mut raw, settings) = Raw::connect(&addr).await;
    assert_eq!(settings.get(&0x3), Some(&MAX_STREAMS_PER_CONNECTION));
    assert_eq!(settings.get(&0x6), Some(&MAX_HEADER_LIST_BYTES));
    raw.request(1, "/grpc.health.v1.Health/Check", &[], false)
        .await;
    raw.send(DATA, END_STREAM, 1, &[0, 0, 0, 0, 0]).await;
    let seen = raw.until(|f| f.stream == 1 && f.kind == HEADERS).await;
    assert!(
        seen.iter().any(|f| f.stream == 1 && f.kind == HEADERS),
        "Health/Check answered"
    );

    // Streams: as many as allowed stay open waiting for their request; one more is refused.
    let (mut raw, _) = Raw::connect(&addr).await;
    let allowed = MAX_STREAMS_PER_CONNECTION;
    for i in 0..=allowed {
        raw.request(2 * i + 1, "/grpc.health.v1.Health/Watch", &[], false)
            .await;
    }
    let over = 2 * allowed + 1;
    let seen = raw
        .until(|f| f.kind == RST_STREAM && f.stream == over)
        .await;
    let resets: Vec<_> = seen.iter().filter(|f| f.kind == RST_STREAM).collect();
    assert_eq!(
        resets.len(),
        1,
        "only the stream over the limit is reset: {:?}",
        resets.iter().map(|f| f.stream).collect::<Vec<_>>()
    );
    assert_eq!(resets[0].stream, over);
    assert_eq!(reset_code(resets[0]), REFUSED_STREAM);
    println!(
        "stream {} of one connection refused (REFUSED_STREAM), the {allowed} before it open",
        allowed + 1
    );

    // Headers over the limit: the stream is refused, not served.
    let (mut raw, _) = Raw::connect(&addr).await;
    let big = "a".repeat(MAX_HEADER_LIST_BYTES as usize + 1024);
    raw.request(1, "/grpc.health.v1.Health/Check", &[("x-big", &big)], false)
        .await;
    let seen = raw.until(|f| f.kind == RST_STREAM && f.stream == 1).await;
    let kinds: Vec<_> = seen.iter().map(|f| (f.kind, f.stream)).collect();
    let reset = seen
        .iter()
        .find(|f| f.kind == RST_STREAM && f.stream == 1)
        .unwrap_or_else(|| panic!("no reset for the oversized request: {kinds:?}"));
    // The answer before the reset is `:status: 431` alone: a literal with the indexed name
    // `:status` (0x48) and the Huffman-coded value "431" (0x83, then 0x69 0x90 0xff).
    let answer = seen
        .iter()
        .find(|f| f.kind == HEADERS && f.stream == 1)
        .unwrap_or_else(|| panic!("no answer for the oversized request: {kinds:?}"));
    assert_eq!(answer.payload, [0x48, 0x83, 0x69, 0x90, 0xff], "{kinds:?}");
    assert_ne!(reset_code(reset), 0, "reset with an error code");
    assert!(
        !seen.iter().any(|f| f.kind == DATA && f.stream == 1),
        "the oversized request was served: {kinds:?}"
    );
}

/// What a new connection gets before it sends anything: the bytes the server sent and how
/// long until it closed the connection (`None`: still open after 30 s).
async fn silent(addr: &str) -> (Vec<u8>, Option<Duration>) {
    let started = std::time::Instant::now();
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut received = Vec::new();
    let mut buf = [0u8; 1024];
    while started.elapsed() < Duration::from_secs(30) {
        match tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (received, Some(started.elapsed())),
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    (received, None)
}

#[tokio::test]
async fn silent_connections_are_dropped_and_only_so_many_are_held() {
    use berth_control_plane::incoming::FIRST_BYTES_TIMEOUT;
    let etcd = Etcd::start().await.unwrap();
    let cp = ControlPlane::start_with(&etcd.url(), &["--max-connections", "4"])
        .await
        .unwrap();
    let addr = cp.addr.clone();

    // Four connections are held (each is sent the server's settings); a fifth is closed at
    // once, before any settings.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(Raw::connect(&addr).await.0);
    }
    let (received, closed) = silent(&addr).await;
    assert!(received.is_empty(), "the fifth connection was served");
    let closed = closed.expect("the fifth connection closed");
    assert!(closed < Duration::from_secs(5), "closed after {closed:?}");

    // Once one closes, a new connection is served.
    held.pop();
    berth_tests::eventually(
        Duration::from_secs(10),
        "a connection is served once one of the four has closed",
        || async {
            let mut stream = TcpStream::connect(&addr).await.ok()?;
            let mut head = [0u8; 9];
            tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut head))
                .await
                .ok()?
                .ok()?;
            (head[3] == SETTINGS).then_some(())
        },
    )
    .await
    .unwrap();
    drop(held);

    // A connection that never sends the preface is closed at the deadline. The server learns
    // that the held ones closed a moment after we drop them; until then a new connection may
    // still be over the limit and closed at once, so wait for one that is held.
    let mut tries = 0;
    let closed = loop {
        let (_, closed) = silent(&addr).await;
        let closed = closed.expect("a silent connection is closed");
        tries += 1;
        if closed > Duration::from_secs(1) || tries == 50 {
            break closed;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        closed >= FIRST_BYTES_TIMEOUT - Duration::from_millis(100)
            && closed < FIRST_BYTES_TIMEOUT + Duration::from_secs(5),
        "a silent connection closed after {closed:?}"
    );
    println!(
        "a silent gRPC connection closed after {closed:.1?}; the fifth of 4 allowed closed at once"
    );
}
