//! The replay queue's speed beside etcd's own: the rate at which the gateway takes requests
//! into the queue (each answered 202 only once committed) against the rate of raw etcd puts
//! of the same size with the same concurrency (kept-alive connections for both), measured in
//! the same run; then the rate at
//! which a queue drains once the agent is back, beside the rate at which the same agent serves
//! the same requests directly through the gateway at the replay concurrency. Writes its table
//! into BENCHMARKS.md.
//!
//! `BERTH_REPLAY_WORK_MS=N` asks the agent for N ms of work per request (`/slow?ms=N`; by
//! default none, `/echo`); `BERTH_REPLAY_KEYED=1` sends each request with an `Idempotency-Key`
//! (safe to send twice, so claimed ahead in the drain).
//!
//! Run: `deploy/build-images.sh echo-agent && cargo build --release -p berth-cli -p berth-bench
//! && target/release/replay`. With `--soak`, the soak at 100,000 requests instead (soak.rs).

mod soak;

use berth_bench::Conn;
use berth_tests::docker::{data_volume, wait_agent, DockerRun, NodeAgent};
use berth_tests::wire::send;
use berth_tests::{eventually, unique_name, ControlPlane, Etcd, Gateway};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Requests (and puts) per measurement, unless `BERTH_REPLAY_REQUESTS` says otherwise.
static COUNT: std::sync::LazyLock<usize> = std::sync::LazyLock::new(|| {
    std::env::var("BERTH_REPLAY_REQUESTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2000)
});
/// Requests (and puts) in flight at once.
const CONCURRENCY: usize = 32;
/// Body (and value) size.
const SIZE: usize = 1024;
/// The agent's replay concurrency (the default), and the direct reference's clients.
const REPLAY_CONCURRENCY: usize = berth_proto::defaults::REPLAY_CONCURRENCY as usize;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let run = async {
        if std::env::args().any(|a| a == "--soak") {
            soak::run().await
        } else {
            enqueue_and_drain().await
        }
    };
    // Stopped by Ctrl-C or SIGTERM (a `timeout`): the run is dropped, and with it what it
    // started (containers, etcd, servers), as when it ends.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = run => result,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted; what it started is removed"),
        _ = term.recv() => anyhow::bail!("terminated; what it started is removed"),
    }
}

/// Enqueue beside raw puts, then the drain (the benchmark without `--soak`).
async fn enqueue_and_drain() -> anyhow::Result<()> {
    let run = DockerRun::new()?;
    let etcd = Etcd::start().await?;
    let cp = ControlPlane::start(&etcd.url()).await?;
    let _node = NodeAgent::start(&cp.url(), &unique_name("bench"), &run)?;
    let gateway = Gateway::start(&etcd.url()).await?;
    let name = unique_name("replay");
    let (data, volume) = data_volume()?;
    // Room for every request: past the queue's bound (10,000 by default) a gateway answers
    // 503, and a rate with refusals in it would not be the queue's.
    let room = COUNT.to_string();
    let out = cp.deploy_echo(&name, &["-v", &volume, "--replay-max-queued", &room]);
    anyhow::ensure!(out.status.success(), "deploy: {out:?}");
    let api = cp.agents().await?;
    let ready = |n: u32| {
        move |a: &berth_proto::v1::Agent| a.status.as_ref().is_some_and(|s| s.ready_replicas == n)
    };
    wait_agent(&api, &name, "ready", ready(1)).await?;
    anyhow::ensure!(cp.cli(&["stop", &name]).status.success());
    wait_agent(&api, &name, "stopped", ready(0)).await?;
    let work_ms = soak::setting("BERTH_REPLAY_WORK_MS", 0)?;
    let keyed = soak::setting("BERTH_REPLAY_KEYED", 0)? > 0;
    let path = if work_ms == 0 {
        format!("/agents/{name}/echo")
    } else {
        format!("/agents/{name}/slow?ms={work_ms}")
    };
    eventually(Duration::from_secs(30), "the gateway to queue", || async {
        (send(
            &gateway.addr,
            &format!("POST {path} HTTP/1.1\r\nX-Berth-Replay: off"),
            b"x",
        )
        .await
        .status
            == 503)
            .then_some(())
    })
    .await?;

    // Raw etcd puts: the floor under any durable write.
    let client = etcd.client().await?;
    let value = vec![b'v'; SIZE];
    let raw_op = Arc::new(move |i: usize| {
        let (mut client, value) = (client.clone(), value.clone());
        async move {
            client
                .put(format!("/bench/raw/{i}"), value, None)
                .await
                .is_ok()
        }
    });
    // The gateway taking requests into the queue, over one kept-alive connection per worker.
    let body = bytes::Bytes::from("b".repeat(SIZE));
    let mut conns = Vec::new();
    for _ in 0..CONCURRENCY {
        let conn = Conn::open(&gateway.addr).await?;
        conns.push(Arc::new(tokio::sync::Mutex::new(conn)));
    }
    let enqueue_path = path.clone();
    let enqueue_body = body.clone();
    let enqueue_op = Arc::new(move |i: usize| {
        let conn = conns[i % CONCURRENCY].clone();
        let (path, body) = (enqueue_path.clone(), enqueue_body.clone());
        async move { matches!(send_one(&conn, &path, body, keyed, "q", i).await, Ok(202)) }
    });
    // A first pass of raw puts unmeasured: etcd's file grows to hold the first MiB, which would
    // slow whichever measure came first. Then raw puts and the enqueue alternate, a third of
    // the requests each time, so that a drift of the machine weighs on both alike.
    timed(CONCURRENCY, *COUNT..2 * *COUNT, raw_op.clone()).await;
    let (mut raw, mut enqueue) = (Timed::default(), Timed::default());
    for round in 0..ROUNDS {
        let span = round * *COUNT / ROUNDS..(round + 1) * *COUNT / ROUNDS;
        raw.add(timed(CONCURRENCY, span.clone(), raw_op.clone()).await);
        enqueue.add(timed(CONCURRENCY, span, enqueue_op.clone()).await);
    }
    let (raw, enqueue) = (raw.result(), enqueue.result());

    println!(
        "enqueue {:.0}/s raw {:.0}/s: {:.2}",
        enqueue.0,
        raw.0,
        enqueue.0 / raw.0
    );
    anyhow::ensure!(
        raw.1 == 0 && enqueue.1 == 0,
        "failures: raw puts {}, enqueue {} (not 202): the rates are not comparable",
        raw.1,
        enqueue.1
    );
    // Draining once the agent is back.
    let started = Instant::now();
    anyhow::ensure!(cp.cli(&["start", &name]).status.success());
    let log = data.path().join("requests.log");
    eventually(Duration::from_secs(60), "the first delivery", || {
        let n = lines(&log);
        async move { (n >= 1).then_some(()) }
    })
    .await?;
    let first = started.elapsed();
    eventually(Duration::from_secs(600), "the queue drained", || {
        let n = lines(&log);
        async move { (n >= *COUNT).then_some(()) }
    })
    .await?;
    let drained = started.elapsed();
    let drain = *COUNT as f64 / drained.as_secs_f64();
    let steady = (*COUNT - 1) as f64 / (drained - first).as_secs_f64();
    println!("{}", soak::steps(&gateway.admin_addr).await?);

    // Reference: the same requests served directly through the gateway, as many at a time as
    // the drain delivers (the replay concurrency), over kept-alive connections.
    let mut conns = Vec::new();
    for _ in 0..REPLAY_CONCURRENCY {
        let conn = Conn::open(&gateway.addr).await?;
        conns.push(Arc::new(tokio::sync::Mutex::new(conn)));
    }
    let direct_path = path.clone();
    let direct_op = Arc::new(move |i: usize| {
        let conn = conns[i % REPLAY_CONCURRENCY].clone();
        let (path, body) = (direct_path.clone(), body.clone());
        async move { matches!(send_one(&conn, &path, body, keyed, "d", i).await, Ok(200)) }
    });
    let direct = timed(REPLAY_CONCURRENCY, 0..*COUNT, direct_op)
        .await
        .result();
    anyhow::ensure!(
        direct.1 == 0,
        "{} direct requests not answered 200",
        direct.1
    );
    let work = if work_ms == 0 {
        "no work per request (`/echo`)".to_string()
    } else {
        format!("{work_ms} ms of work per request (`/slow?ms={work_ms}`)")
    };
    let keys = if keyed {
        "each with an `Idempotency-Key`"
    } else {
        "none with an `Idempotency-Key`"
    };

    let report = format!(
        "{} POSTs of {SIZE} bytes ({keys}), {CONCURRENCY} at a time, one example-agent replica \
         (stopped while queueing) doing {work}; etcd is a single local member ({} cores, all on \
         this machine).\n\n\
         | measure | per second |\n|---|---:|\n\
         | raw etcd put (reference; after a first pass unmeasured, alternated with the enqueue in {ROUNDS} rounds) | {:.0} |\n\
         | requests queued through the gateway (202 after commit) | {:.0} |\n\
         | queue drained once the agent is back (oldest first, replay concurrency {REPLAY_CONCURRENCY}), from `berth start` | {:.0} |\n\
         | the same, from the first delivery ({:.2} s after `berth start`) | {:.0} |\n\
         | the same requests direct through the gateway, {REPLAY_CONCURRENCY} at a time (reference) | {:.0} |\n\n\
         Enqueue / raw put: **{:.2}**. Drain / direct: **{:.2}** (from the first delivery {:.2}). \
         Failures: raw {}, enqueue {}.\n",
        *COUNT,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        raw.0,
        enqueue.0,
        drain,
        first.as_secs_f64(),
        steady,
        direct.0,
        enqueue.0 / raw.0,
        drain / direct.0,
        steady / direct.0,
        raw.1,
        enqueue.1,
    );
    println!("{report}");
    berth_bench::write_report("replay", "Replay queue: enqueue and drain", &report)?;
    Ok(())
}

/// POSTs `body` to `path` on `conn`, with a key unique to `(kind, i)` when `keyed`.
async fn send_one(
    conn: &tokio::sync::Mutex<Conn>,
    path: &str,
    body: bytes::Bytes,
    keyed: bool,
    kind: &str,
    i: usize,
) -> anyhow::Result<u16> {
    let key = format!("bench-{kind}-{i}");
    let headers: &[(&str, &str)] = if keyed {
        &[("Idempotency-Key", key.as_str())]
    } else {
        &[]
    };
    let mut conn = conn.lock().await;
    Ok(conn
        .request(http::Method::POST, path, headers, body)
        .await?
        .0)
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// Rounds of raw puts and of the enqueue, alternated.
const ROUNDS: usize = 3;

/// Operations run, the time they took, and how many failed.
#[derive(Default)]
struct Timed {
    count: usize,
    elapsed: Duration,
    failures: usize,
}

impl Timed {
    fn add(&mut self, other: Timed) {
        self.count += other.count;
        self.elapsed += other.elapsed;
        self.failures += other.failures;
    }

    /// (operations per second, failures).
    fn result(&self) -> (f64, usize) {
        (
            self.count as f64 / self.elapsed.as_secs_f64(),
            self.failures,
        )
    }
}

/// Runs `op(i)` for each i of `span`, `workers` at a time.
async fn timed<F, Fut>(workers: usize, span: std::ops::Range<usize>, op: Arc<F>) -> Timed
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    let count = span.len();
    let end = span.end;
    let next = Arc::new(AtomicUsize::new(span.start));
    let failures = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..workers)
        .map(|_| {
            let (op, next, failures) = (op.clone(), next.clone(), failures.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= end {
                        break;
                    }
                    if !op(i).await {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.await;
    }
    Timed {
        count,
        elapsed: started.elapsed(),
        failures: failures.load(Ordering::Relaxed),
    }
}
