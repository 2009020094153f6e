//! The gateway beside nginx: the same load, in the same run, straight to an example-agent
//! container, through `berth gateway`, and through nginx (Debian's package) configured as a
//! reverse proxy with upstream keep-alive to the same container. It measures requests per
//! second at saturation (closed loop) and p50/p99 latency at a fixed rate (open loop, latency
//! counted from each request's scheduled time so that queueing is not hidden), prints a
//! Markdown table and writes it into BENCHMARKS.md.
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

/// Connections of the load generator.
const CONNECTIONS: usize = 64;
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
}

struct Figures {
    rps: f64,
    p50: Duration,
    p99: Duration,
    errors: u64,
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
    let targets = [
        Target {
            name: "direct to the agent",
            addr: address.clone(),
            path: "/echo".into(),
        },
        Target {
            name: "berth gateway",
            addr: gateway.addr.clone(),
            path: format!("/agents/{name}/echo"),
        },
        Target {
            name: "nginx",
            addr: nginx.addr.clone(),
            path: format!("/agents/{name}/echo"),
        },
    ];
    for t in &targets {
        eventually(LIMIT, t.name, || async {
            let mut c = Conn::open(&t.addr).await.ok()?;
            (c.get(&t.path).await.ok()? == 200).then_some(())
        })
        .await?;
    }
    let mut rounds: Vec<Vec<Figures>> = (0..targets.len()).map(|_| Vec::new()).collect();
    for round in 0..ROUNDS {
        for (t, figures) in targets.iter().zip(rounds.iter_mut()) {
            let (rps, errors_a) = saturate(t).await?;
            let (mut latencies, errors_b) = fixed_rate(t).await?;
            latencies.sort();
            let at = |q: f64| {
                latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)]
            };
            eprintln!(
                "round {round}: {}: {rps:.0} rps, p99 {:?}",
                t.name,
                at(0.99)
            );
            figures.push(Figures {
                rps,
                p50: at(0.50),
                p99: at(0.99),
                errors: errors_a + errors_b,
            });
        }
    }
    let results: Vec<Figures> = rounds.into_iter().map(median).collect();
    let report = report(&targets, &results);
    println!("{report}");
    berth_bench::write_report("gateway", "Gateway: direct, berth gateway, nginx", &report)?;
    Ok(())
}

/// The median of each figure over the rounds; errors are summed.
fn median(mut rounds: Vec<Figures>) -> Figures {
    let mid = rounds.len() / 2;
    rounds.sort_by(|a, b| a.rps.total_cmp(&b.rps));
    let rps = rounds[mid].rps;
    rounds.sort_by_key(|f| f.p50);
    let p50 = rounds[mid].p50;
    rounds.sort_by_key(|f| f.p99);
    let p99 = rounds[mid].p99;
    Figures {
        rps,
        p50,
        p99,
        errors: rounds.iter().map(|f| f.errors).sum(),
    }
}

fn report(targets: &[Target], results: &[Figures]) -> String {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut out = String::new();
    out.push_str(&format!(
        "GET of a small JSON echo, {CONNECTIONS} keep-alive connections, one example-agent \
         replica in Docker; saturation over {}s, latency at {RATE} rps over {}s; median of \
         {ROUNDS} interleaved rounds ({} cores, all processes on this machine).\n\n",
        MEASURE.as_secs(),
        MEASURE.as_secs(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
    ));
    out.push_str(
        "| path | requests/s at saturation | p50 at 2,000 rps | p99 at 2,000 rps | errors |\n",
    );
    out.push_str("|---|---:|---:|---:|---:|\n");
    for (t, r) in targets.iter().zip(results) {
        out.push_str(&format!(
            "| {} | {:.0} | {:.2} ms | {:.2} ms | {} |\n",
            t.name,
            r.rps,
            ms(r.p50),
            ms(r.p99),
            r.errors
        ));
    }
    let (direct, berth, nginx) = (&results[0], &results[1], &results[2]);
    out.push_str(&format!(
        "\nberth gateway / nginx throughput: **{:.2}** (target ≥ 0.80). \
         Added p99 at 2,000 rps: berth **{:+.2} ms** (target ≤ 1 ms), nginx {:+.2} ms.\n",
        berth.rps / nginx.rps,
        ms(berth.p99) - ms(direct.p99),
        ms(nginx.p99) - ms(direct.p99),
    ));
    out
}

/// Closed loop: every connection sends its next request as soon as the last one is answered.
async fn saturate(target: &Target) -> anyhow::Result<(f64, u64)> {
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let counting = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_at = Instant::now() + WARM_UP + MEASURE;
    let mut workers = Vec::new();
    for _ in 0..CONNECTIONS {
        let (addr, path) = (target.addr.clone(), target.path.clone());
        let (done, errors, counting) = (done.clone(), errors.clone(), counting.clone());
        workers.push(tokio::spawn(async move {
            let mut conn = Conn::open(&addr).await?;
            while Instant::now() < stop_at {
                let ok = matches!(conn.get(&path).await, Ok(200));
                if !ok {
                    conn = Conn::open(&addr).await?;
                }
                if counting.load(Ordering::Relaxed) {
                    if ok {
                        done.fetch_add(1, Ordering::Relaxed);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(WARM_UP).await;
    counting.store(true, Ordering::Relaxed);
    let started = Instant::now();
    for w in workers {
        w.await??;
    }
    let elapsed = started.elapsed();
    Ok((
        done.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64(),
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
    for _ in 0..CONNECTIONS {
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
