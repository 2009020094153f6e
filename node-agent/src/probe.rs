//! HTTP health probes, from the node agent straight to the container.

use crate::runtime::ContainerRuntime;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Time between probes until the first one passes (within the first interval).
pub const STARTUP_POLL: Duration = Duration::from_millis(250);

/// One probe's outcome.
#[derive(Debug)]
pub struct ProbeResult {
    /// The replica probed.
    pub replica: String,
    /// The container probed; results for an older container are ignored.
    pub container: String,
    /// Whether it passed.
    pub ok: bool,
}

/// What to probe and how often.
#[derive(Clone, Debug)]
pub struct ProbeSpec {
    pub address: String,
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub start_period: Duration,
}

/// Probes until the task is aborted. Before the first pass it polls quickly and reports
/// failures only after the first interval and the start period, so a slow start is not a fault.
pub async fn run<R: ContainerRuntime>(
    runtime: R,
    spec: ProbeSpec,
    replica: String,
    container: String,
    results: mpsc::Sender<ProbeResult>,
) {
    let started = Instant::now();
    let grace = spec.interval.max(spec.start_period);
    let mut passed_once = false;
    loop {
        let ok = runtime.probe(&spec.address, &spec.path, spec.timeout).await;
        passed_once |= ok;
        if ok || passed_once || started.elapsed() >= grace {
            let result = ProbeResult {
                replica: replica.clone(),
                container: container.clone(),
                ok,
            };
            if results.send(result).await.is_err() {
                return;
            }
        }
        let wait = if passed_once || started.elapsed() >= grace {
            spec.interval
        } else {
            STARTUP_POLL
        };
        tokio::time::sleep(wait).await;
    }
}

/// `GET path` over HTTP/1.1; a 2xx or 3xx status within `timeout` passes.
pub async fn get(address: &str, path: &str, timeout: Duration) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(address).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nUser-Agent: berth-probe\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut head = [0u8; 32];
        let mut read = 0;
        while read < 12 {
            let n = stream.read(&mut head[read..]).await.ok()?;
            if n == 0 {
                break;
            }
            read += n;
        }
        let line = std::str::from_utf8(&head[..read]).ok()?;
        let code: u16 = line.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()?;
        Some((200..400).contains(&code))
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
}
