//! The gateway beside nginx: the same load, in the same run, straight to an example-agent
//! container, through `berth gateway`, and through nginx (Debian's package) configured as a
//! reverse proxy with upstream keep-alive to the same container. It measures requests per
//! second and p99 at saturation (closed loop, at 32 and at 64 connections), p50/p99 latency at
//! a fixed rate (open loop, latency counted from each request's scheduled time so that queueing
//! is not hidden) and each proxy's resident memory after the load, prints a Markdown table and
//! writes it into BENCHMARKS.md. Where the time goes: `bench/gateway-profile/run.sh`.
//!
//! Run: `deploy/build-images.sh echo-agent && cargo build --release -p berth-cli -p berth-bench
//! && target/release/gateway` (nginx from `apt-get install nginx`).

use berth_bench::Conn;
use berth_tests::docker::{DockerRun, NodeAgent, ECHO_IMAGE};
use berth_tests::{eventually, free_port, unique_name, ControlPlane, Etcd, Gateway};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Connections of the load generator at saturation, each a measurement of its own.
const CONNECTIONS: [usize; 2] = [32, 64];
/// Connections of the fixed-rate measurement.
const RATE_CONNECTIONS: usize = 64;
/// Length of each measurement.
const MEASURE: Duration = Duration::from_secs(3);
/// Rounds over the three paths, interleaved so that drift on the machine hits all three; each
/// figure is the median of its rounds.
const ROUNDS: usize = 3;
/// Load before each measurement, not counted.
const WARM_UP: Duration = Duration::from_secs(1);
/// The fixed rate of the latency measurement.
const RATE: u64 = 2000;
const LIMIT: Duration = Duration::from_secs(60);

struct Target {
    name: &'static str,
    addr: String,
    path: String,
    /// The proxy's processes, whose memory is measured.
    pids: Vec<u32>,
}

struct Figures {
    /// Requests per second and p99 at saturation, per entry of CONNECTIONS.
    saturated: Vec<(f64, Duration)>,
    p50: Duration,
    p99: Duration,
    errors: u64,
    /// Resident memory of the proxy after the load (bytes), none for the agent itself.
    rss: Option<u64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let run = DockerRun::new()?;
    let etcd = Etcd::start().await?;
    let cp = ControlPlane::start(&etcd.url()).await?;
    let _node = NodeAgent::start(&cp.url(), &unique_name("bench"), &run)?;
    let gateway = Gateway::start(&etcd.url()).await?;
    let name = unique_name("bench");
    let out = cp.cli(&[
        "deploy",
        "-n",
        &name,
        "-i",
        ECHO_IMAGE,
        "--health-endpoint",
        "/health",
    ]);
    anyhow::ensure!(out.status.success(), "deploy: {out:?}");
    let api = cp.agents().await?;
    let agent = berth_tests::docker::wait_agent(&api, &name, "ready", |a| {
        a.status.as_ref().is_some_and(|s| s.ready_replicas == 1)
    })
    .await?;
    let address = agent.status.unwrap().replicas[0].address.clone();
    let nginx = Nginx::start(&address, &name)?;
    let mut targets = [
        Target {
            name: "direct to the agent",
            addr: address.clone(),
            path: "/echo".into(),
            pids: Vec::new(),
        },
        Target {
            name: "berth gateway",
            addr: gateway.addr.clone(),
            path: format!("/agents/{name}/echo"),
            pids: gateway.pid().into_iter().collect(),
        },
        Target {
            name: "nginx",
            addr: nginx.addr.clone(),
            path: format!("/agents/{name}/echo"),
            // Known once it answers (nginx writes its pid file after it starts).
            pids: Vec::new(),
        },
    ];
    for t in &targets {
        eventually(LIMIT, t.name, || async {
            let mut c = Conn::open(&t.addr).await.ok()?;
            (c.get(&t.path).await.ok()? == 200).then_some(())
        })
        .await?;
    }
    targets[2].pids = nginx.pids();
    let mut rounds: Vec<Vec<Figures>> = (0..targets.len()).map(|_| Vec::new()).collect();
    for round in 0..ROUNDS {
        for (t, figures) in targets.iter().zip(rounds.iter_mut()) {
            let mut saturated = Vec::new();
            let mut errors = 0;
            for connections in CONNECTIONS {
                let (rps, mut latencies, failed) = saturate(t, connections).await?;
                latencies.sort();
                saturated.push((rps, quantile(&latencies, 0.99)));
                errors += failed;
            }
            let (mut latencies, failed) = fixed_rate(t).await?;
            latencies.sort();
            let rss = (!t.pids.is_empty()).then(|| t.pids.iter().map(|&p| rss_of(p)).sum());
            eprintln!(
                "round {round}: {}: {:.0} / {:.0} rps at {:?} connections, p99 {:?} at {RATE} rps, RSS {:.1} MB",
                t.name,
                saturated[0].0,
                saturated[1].0,
                CONNECTIONS,
                quantile(&latencies, 0.99),
                rss.unwrap_or(0) as f64 / 1e6,
            );
            figures.push(Figures {
                saturated,
                p50: quantile(&latencies, 0.50),
                p99: quantile(&latencies, 0.99),
                errors: errors + failed,
                rss,
            });
        }
    }
    let results: Vec<Figures> = rounds.into_iter().map(median).collect();
    let report = report(&targets, &results);
    println!("{report}");
    berth_bench::write_report("gateway", "Gateway: direct, berth gateway, nginx", &report)?;
    Ok(())
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted
        .get(((sorted.len() as f64 * q) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

/// Resident memory of process `pid` in bytes (0 if it is gone).
fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn median_of<T: Copy + PartialOrd>(mut values: Vec<T>) -> T {
    values.sort_by(|a, b| a.partial_cmp(b).expect("comparable"));
    values[values.len() / 2]
}

/// The median of each figure over the rounds; errors are summed.
fn median(rounds: Vec<Figures>) -> Figures {
    let saturated = (0..CONNECTIONS.len())
        .map(|i| {
            (
                median_of(rounds.iter().map(|f| f.saturated[i].0).collect()),
                median_of(rounds.iter().map(|f| f.saturated[i].1).collect()),
            )
        })
        .collect();
    Figures {
        saturated,
        p50: median_of(rounds.iter().map(|f| f.p50).collect()),
        p99: median_of(rounds.iter().map(|f| f.p99).collect()),
        errors: rounds.iter().map(|f| f.errors).sum(),
        rss: rounds.iter().filter_map(|f| f.rss).max(),
    }
}

fn report(targets: &[Target], results: &[Figures]) -> String {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut out = String::new();
    out.push_str(&format!(
        "GET of a small JSON echo, one example-agent replica in Docker; saturation (closed loop) \
         over {}s at {} and {} keep-alive connections, latency at {RATE} rps over {}s on \
         {RATE_CONNECTIONS}; resident memory of the proxy after the load (the largest of the \
         rounds); median of {ROUNDS} interleaved rounds ({} cores, all processes on this \
         machine, the load generator among them).\n\n",
        MEASURE.as_secs(),
        CONNECTIONS[0],
        CONNECTIONS[1],
        MEASURE.as_secs(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
    ));
    out.push_str(&format!(
        "| path | req/s, {0} conns | p99, {0} conns | req/s, {1} conns | p99, {1} conns | p50 at {RATE} rps | p99 at {RATE} rps | RSS | errors |\n",
        CONNECTIONS[0], CONNECTIONS[1]
    ));
    out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (t, r) in targets.iter().zip(results) {
        out.push_str(&format!(
            "| {} | {:.0} | {:.2} ms | {:.0} | {:.2} ms | {:.2} ms | {:.2} ms | {} | {} |\n",
            t.name,
            r.saturated[0].0,
            ms(r.saturated[0].1),
            r.saturated[1].0,
            ms(r.saturated[1].1),
            ms(r.p50),
            ms(r.p99),
            r.rss
                .map_or("–".to_string(), |b| format!("{:.1} MB", b as f64 / 1e6)),
            r.errors
        ));
    }
    let (direct, berth, nginx) = (&results[0], &results[1], &results[2]);
    out.push_str(&format!(
        "\nberth gateway / nginx throughput: **{:.2}** at {} connections, **{:.2}** at {} \
         (target ≥ 1.0). p99 at saturation, berth / nginx: {:.2} and {:.2} (target ≤ 1). Added \
         p99 at {RATE} rps: berth **{:+.2} ms** (target ≤ 1 ms), nginx {:+.2} ms. Gateway RSS \
         {:.1} MB (target ≤ 30 MB).\n",
        berth.saturated[0].0 / nginx.saturated[0].0,
        CONNECTIONS[0],
        berth.saturated[1].0 / nginx.saturated[1].0,
        CONNECTIONS[1],
        ms(berth.saturated[0].1) / ms(nginx.saturated[0].1),
        ms(berth.saturated[1].1) / ms(nginx.saturated[1].1),
        ms(berth.p99) - ms(direct.p99),
        ms(nginx.p99) - ms(direct.p99),
        berth.rss.unwrap_or(0) as f64 / 1e6,
    ));
    out
}

/// Closed loop: every connection sends its next request as soon as the last one is answered.
/// Requests per second, the latencies of the measured window, and errors.
async fn saturate(
    target: &Target,
    connections: usize,
) -> anyhow::Result<(f64, Vec<Duration>, u64)> {
    let errors = Arc::new(AtomicU64::new(0));
    let counting = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_at = Instant::now() + WARM_UP + MEASURE;
    let mut workers = Vec::new();
    for _ in 0..connections {
        let (addr, path) = (target.addr.clone(), target.path.clone());
        let (errors, counting) = (errors.clone(), counting.clone());
        workers.push(tokio::spawn(async move {
            let mut conn = Conn::open(&addr).await?;
            let mut latencies = Vec::new();
            while Instant::now() < stop_at {
                let sent = Instant::now();
                let ok = matches!(conn.get(&path).await, Ok(200));
                let latency = sent.elapsed();
                if !ok {
                    conn = Conn::open(&addr).await?;
                }
                if counting.load(Ordering::Relaxed) {
                    if ok {
                        latencies.push(latency);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            anyhow::Ok(latencies)
        }));
    }
    tokio::time::sleep(WARM_UP).await;
    counting.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await??);
    }
    let elapsed = started.elapsed();
    Ok((
        all.len() as f64 / elapsed.as_secs_f64(),
        all,
        errors.load(Ordering::Relaxed),
    ))
}

/// Open loop at `RATE`: request i is due at start + i/RATE whatever happened before; its
/// latency runs from then.
async fn fixed_rate(target: &Target) -> anyhow::Result<(Vec<Duration>, u64)> {
    let warm = RATE * WARM_UP.as_secs();
    let total = warm + RATE * MEASURE.as_secs();
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    let mut workers = Vec::new();
    for _ in 0..RATE_CONNECTIONS {
        let (addr, path) = (target.addr.clone(), target.path.clone());
        let (next, errors) = (next.clone(), errors.clone());
        workers.push(tokio::spawn(async move {
            let mut conn = Conn::open(&addr).await?;
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let due = start + Duration::from_nanos(i * 1_000_000_000 / RATE);
                tokio::time::sleep_until(due).await;
                let ok = matches!(conn.get(&path).await, Ok(200));
                let latency = due.elapsed();
                if !ok {
                    conn = Conn::open(&addr).await?;
                }
                if i >= warm {
                    if ok {
                        latencies.push(latency);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await??);
    }
    Ok((all, errors.load(Ordering::Relaxed)))
}

/// nginx as a reverse proxy to `upstream`, stopped on drop.
struct Nginx {
    dir: tempfile::TempDir,
    addr: String,
}

impl Nginx {
    fn start(upstream: &str, agent: &str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("berth-nginx-").tempdir()?;
        let addr = format!("127.0.0.1:{}", free_port());
        let d = dir.path().display();
        let conf = format!(
            "worker_processes auto;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n\
               client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
               upstream agent {{ server {upstream}; keepalive 128; }}\n\
               keepalive_requests 1000000;\n\
               server {{\n    listen {addr};\n\
                 location /agents/{agent}/ {{\n      proxy_pass http://agent/;\n\
                   proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n\
                   proxy_buffering off;\n    }}\n  }}\n}}\n"
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let out = Command::new(nginx_bin())
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(dir.path())
            .output()?;
        anyhow::ensure!(out.status.success(), "nginx: {out:?}");
        Ok(Self { dir, addr })
    }
}

impl Nginx {
    /// The master and worker processes.
    fn pids(&self) -> Vec<u32> {
        let Ok(master) = std::fs::read_to_string(self.dir.path().join("nginx.pid")) else {
            return Vec::new();
        };
        let master = master.trim().to_string();
        let children = Command::new("pgrep")
            .args(["-P", &master])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        std::iter::once(master.as_str())
            .chain(children.lines())
            .filter_map(|p| p.trim().parse().ok())
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.path().join("nginx.pid")) {
            let _ = Command::new("kill").args(["-TERM", pid.trim()]).output();
        }
    }
}

fn nginx_bin() -> PathBuf {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nginx"))
}
