//! The example agent: a small HTTP service that behaves like an AI agent would for Berth's
//! purposes, with switches to misbehave on demand.
//!
//! - `GET /health`: 200, or 500 after `POST /health/fail` (until the process restarts)
//! - `ANY /echo`: the request back as JSON (method, path, query, headers, body)
//! - `POST /crash`: answers, then exits with code 1
//! - `ANY /slow?ms=N`: answers after N milliseconds; with a `/data` volume, its start and end
//!   (request id, time) are appended to `/data/slow.log`
//! - `ANY /bytes/{n}`: an answer of n bytes
//! - `ANY /digest`: the request body's size and SHA-256, as JSON (a body of any size)
//! - `GET /stream?n=N&ms=M`: N server-sent events, one every M milliseconds
//! - `GET|POST /state`: a counter, kept in `/data/counter` when `/data` exists; POST adds one
//! - `POST /errors/on`, `POST /errors/off`: while on, every other route but `/health` answers 500
//! - `POST /log`: writes the request body to standard output, as one line
//! - `GET /requests`: how many times each `X-Berth-Request-Id` was seen, and their order; with
//!   a `/data` volume each id is also appended to `/data/requests.log`
//!
//! It listens on `$PORT` (default 8080) and stops gracefully on SIGTERM.
#![forbid(unsafe_code)]

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Router;
use serde_json::json;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Default)]
struct Agent {
    unhealthy: Arc<AtomicBool>,
    /// Every route but `/health` and `/errors/*` answers 500 while set.
    erroring: Arc<AtomicBool>,
    seen: Arc<Mutex<HashMap<String, u64>>>,
    /// Request ids in arrival order.
    order: Arc<Mutex<Vec<String>>>,
    /// The counter when no `/data` volume is mounted.
    state: Arc<tokio::sync::Mutex<u64>>,
}

#[tokio::main]
async fn main() {
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8080);
    let agent = Agent::default();
    let app = Router::new()
        .route("/health", get(health))
        .route("/health/fail", post(fail_health))
        .route("/echo", any(echo))
        .route("/echo/{*rest}", any(echo))
        .route("/crash", post(crash))
        .route("/alloc/{mib}", post(alloc))
        .route("/slow", any(slow))
        .route("/bytes/{n}", any(bytes_of))
        .route(
            "/digest",
            any(digest).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/stream", get(stream))
        .route("/state", get(state).post(state))
        .route("/log", post(log))
        .route("/errors/on", post(errors_on))
        .route("/errors/off", post(errors_off))
        .route("/requests", get(requests))
        .route("/env/{name}", get(env_var))
        .layer(axum::middleware::from_fn_with_state(
            agent.clone(),
            count_request_ids,
        ))
        .with_state(agent);
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port))
        .await
        .expect("bind the port");
    eprintln!("echo-agent listening on port {port}");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            eprintln!("echo-agent: SIGTERM, finishing in-flight requests");
        })
        .await
        .expect("serve");
    eprintln!("echo-agent: stopped");
}

async fn count_request_ids(
    State(agent): State<Agent>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(id) = request
        .headers()
        .get("x-berth-request-id")
        .and_then(|v| v.to_str().ok())
    {
        let mut seen = agent.seen.lock().expect("not poisoned");
        *seen.entry(id.to_string()).or_default() += 1;
        agent
            .order
            .lock()
            .expect("not poisoned")
            .push(id.to_string());
        // With a volume, the log outlives the container: tests read it from the host.
        if std::path::Path::new("/data").is_dir() {
            use std::io::Write;
            if let Ok(mut log) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open("/data/requests.log")
            {
                // One write per line, so that lines from concurrent requests never interleave.
                let _ = log.write_all(format!("{id}\n").as_bytes());
            }
        }
    }
    let path = request.uri().path();
    if agent.erroring.load(Ordering::Relaxed) && path != "/health" && !path.starts_with("/errors/")
    {
        return (StatusCode::INTERNAL_SERVER_ERROR, "failing on purpose\n").into_response();
    }
    next.run(request).await
}

async fn errors_on(State(agent): State<Agent>) -> &'static str {
    agent.erroring.store(true, Ordering::Relaxed);
    eprintln!("echo-agent: answering 500");
    "errors on\n"
}

async fn errors_off(State(agent): State<Agent>) -> &'static str {
    agent.erroring.store(false, Ordering::Relaxed);
    eprintln!("echo-agent: answering normally");
    "errors off\n"
}

async fn health(State(agent): State<Agent>) -> (StatusCode, &'static str) {
    if agent.unhealthy.load(Ordering::Relaxed) {
        (StatusCode::INTERNAL_SERVER_ERROR, "unhealthy\n")
    } else {
        (StatusCode::OK, "ok\n")
    }
}

async fn fail_health(State(agent): State<Agent>) -> &'static str {
    agent.unhealthy.store(true, Ordering::Relaxed);
    eprintln!("echo-agent: health now fails");
    "health now fails\n"
}

async fn echo(method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let headers: Vec<_> = headers
        .iter()
        .map(|(k, v)| json!([k.as_str(), String::from_utf8_lossy(v.as_bytes())]))
        .collect();
    let hex: String = body.iter().map(|b| format!("{b:02x}")).collect();
    let reply = json!({
        "method": method.as_str(),
        "path": uri.path(),
        "query": uri.query().unwrap_or_default(),
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
        "body_hex": hex,
    });
    ([("content-type", "application/json")], reply.to_string()).into_response()
}

async fn log(body: Bytes) -> &'static str {
    println!("{}", String::from_utf8_lossy(&body).trim_end());
    "logged\n"
}

/// Allocates `mib` MiB, touches every page and keeps it: past the container's memory limit
/// the kernel's OOM killer ends the process.
async fn alloc(axum::extract::Path(mib): axum::extract::Path<usize>) -> String {
    static HELD: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());
    eprintln!("echo-agent: allocating {mib} MiB on request");
    let mut held = HELD.lock().expect("held lock");
    for _ in 0..mib {
        held.push(vec![1u8; 1024 * 1024]);
    }
    format!("holding {} MiB\n", held.len())
}

async fn crash() -> &'static str {
    eprintln!("echo-agent: crashing on request");
    tokio::spawn(async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        std::process::exit(1);
    });
    "crashing\n"
}

fn query_number(uri: &Uri, key: &str, default: u64) -> u64 {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(default)
}

async fn slow(uri: Uri, headers: HeaderMap) -> String {
    let ms = query_number(&uri, "ms", 1000);
    let id = headers
        .get("x-berth-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    slow_log("start", &id);
    // The end is logged however the run ends: done, or cut off when the caller goes away
    // (the server drops the handler then), so that a log shows when the work stopped.
    let _end = RunEnd(id);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    format!("slept {ms} ms\n")
}

/// `ANY /digest`: `{"bytes": N, "sha256": HEX}` of the request body.
async fn digest(body: Bytes) -> String {
    use sha2::Digest;
    let hex: String = sha2::Sha256::digest(&body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    serde_json::json!({"bytes": body.len(), "sha256": hex}).to_string()
}

/// Logs the end of a `/slow` run when dropped.
struct RunEnd(String);

impl Drop for RunEnd {
    fn drop(&mut self) {
        slow_log("end", &self.0);
    }
}

/// With a `/data` volume, appends `{what} {request id} {unix ms}` to `/data/slow.log`, so
/// that tests can see whether two runs of one request overlapped.
fn slow_log(what: &str, id: &str) {
    if !std::path::Path::new("/data").is_dir() {
        return;
    }
    use std::io::Write;
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    if let Ok(mut log) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open("/data/slow.log")
    {
        // One write per line, so that lines from concurrent requests never interleave.
        let _ = log.write_all(format!("{what} {id} {ms}\n").as_bytes());
    }
}

/// `n` bytes of `x`: an answer of a chosen size.
async fn bytes_of(axum::extract::Path(n): axum::extract::Path<usize>) -> Vec<u8> {
    vec![b'x'; n.min(64 << 20)]
}

async fn stream(uri: Uri) -> Response {
    let n = query_number(&uri, "n", 10);
    let ms = query_number(&uri, "ms", 100);
    let events = futures::stream::unfold(0, move |i| async move {
        if i >= n {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        Some((
            Ok::<_, std::convert::Infallible>(format!("id: {i}\ndata: event {i}\n\n")),
            i + 1,
        ))
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(events))
        .expect("valid response")
}

async fn state(State(agent): State<Agent>, method: Method) -> Response {
    let mut memory = agent.state.lock().await;
    let dir = PathBuf::from("/data");
    let file = dir.join("counter");
    let persisted = dir.is_dir();
    let mut counter: u64 = if persisted {
        std::fs::read_to_string(&file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    } else {
        *memory
    };
    if method == Method::POST {
        counter += 1;
        *memory = counter;
        if persisted {
            if let Err(e) = std::fs::write(&file, counter.to_string()) {
                return (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("cannot write {}: {e}\n", file.display()),
                )
                    .into_response();
            }
        }
    }
    (
        [("content-type", "application/json")],
        json!({"counter": counter, "persisted": persisted}).to_string(),
    )
        .into_response()
}

async fn requests(State(agent): State<Agent>) -> Response {
    let seen = agent.seen.lock().expect("not poisoned").clone();
    let order = agent.order.lock().expect("not poisoned").clone();
    (
        [("content-type", "application/json")],
        json!({"counts": seen, "order": order}).to_string(),
    )
        .into_response()
}

/// `GET /env/{name}`: the value of one environment variable (404 if unset), so that a test can
/// see what the container was given.
async fn env_var(axum::extract::Path(name): axum::extract::Path<String>) -> (StatusCode, String) {
    match std::env::var(&name) {
        Ok(value) => (StatusCode::OK, value),
        Err(_) => (StatusCode::NOT_FOUND, format!("{name} is not set\n")),
    }
}
