//! The soak (`target/release/replay --soak`): the replay queue at the size users reach. About
//! 100,000 requests of 1 KiB over 10 agents and 50 large ones (45 of 900 KiB, 5 of 3 MiB, which
//! etcd keeps in pieces) are queued while the agents are stopped (half of the small ones with an `Idempotency-Key`, half without), then replayed
//! while the gateways are restarted, one with SIGTERM and one with SIGKILL. Every request
//! asks the agent for 20 ms of work (`/slow?ms=20`), which the agent logs with its start and
//! end. Prints sent / delivered / lost / overlapping duplicates / dead, etcd's database size
//! before, at peak and after compaction (and after a defragmentation), the enqueue rate beside
//! raw etcd puts and the drain rate beside the same agents served directly, all measured in
//! this run; writes them to BENCHMARKS.md.
//!
//! With `--pauses`, the drain also goes through two stalls: etcd SIGSTOPped for
//! [`ETCD_PAUSE`] at 45 % (`BERTH_SOAK_ETCD_PAUSE=S` for S seconds instead: past the claim
//! lease, 10 s, every claim ends while etcd stands still), and gateway a SIGSTOPped at 80 % for
//! longer than its claim lease ([`GATEWAY_PAUSE`]), each then SIGCONTed. The drain rate then
//! includes the stalls.
//!
//! With `--etcd-kill`, etcd is killed (SIGKILL) at 50 % of the drain and started again on its
//! data [`ETCD_DOWN`] later: every write of the queue fails meanwhile (new requests, claims,
//! outcomes), and the leases live on through the restart.
//!
//! Over time: `BERTH_SOAK_ROUNDS=N` queues and drains N times in one cluster (restarts and
//! pauses each round), printing per round what etcd keeps after compaction and the gateways'
//! memory, so that growth from round to round shows.
//!
//! `--no-restarts` leaves out the SIGTERM and the SIGKILL, so that with rounds the gateways
//! live through the whole run and their memory shows what a long life does to it.
//!
//! To take the enqueue apart: `--enqueue-only` stops after the enqueue and its ratio;
//! `BERTH_SOAK_GATEWAYS=1` sends every request to one gateway (the other still runs);
//! `BERTH_SOAK_KEYED=0` sends none with an `Idempotency-Key`, `BERTH_SOAK_KEYED=2` sends every
//! one with a key (safe to send twice, so claimed ahead while short); `BERTH_SOAK_REQUESTS=N`
//! queues N small requests instead of 100,000 (only a full run writes BENCHMARKS.md);
//! `BERTH_SOAK_CONCURRENCY=N` sends with N clients at once instead of 32 (raw puts, the store
//! alone and the enqueue alike).

use berth_bench::{queued_request, Conn};
use berth_store::{EtcdTls, Store};
use berth_tests::docker::{data_volume, wait_agent, DockerRun, NodeAgent};
use berth_tests::wire::send;
use berth_tests::{eventually, unique_name, ControlPlane, Etcd, Gateway};
use bytes::Bytes;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tempfile::TempDir;

const AGENTS: usize = 10;
/// Small requests, unless `BERTH_SOAK_REQUESTS` says otherwise (a shorter run while working).
const SMALL: usize = 100_000;
const SMALL_SIZE: usize = 1024;
const LARGE: usize = 50;
const LARGE_SIZE: usize = 900 * 1024;
/// Every tenth large request is this large instead: over what one etcd write carries, so kept
/// in pieces (the agents' body limit is raised to 4 MiB for them).
const HUGE_SIZE: usize = 3 * 1024 * 1024;
const HUGE_EVERY: usize = 10;
/// Clients at once for the large requests.
const LARGE_CLIENTS: usize = 8;
/// Clients at once, for enqueueing and for raw puts alike, unless `BERTH_SOAK_CONCURRENCY`
/// says otherwise.
static CONCURRENCY: std::sync::LazyLock<usize> = std::sync::LazyLock::new(|| {
    setting("BERTH_SOAK_CONCURRENCY", 32)
        .expect("BERTH_SOAK_CONCURRENCY")
        .max(1)
});
/// Work each request asks of the agent.
const WORK_MS: u64 = 20;
/// Replay concurrency per agent (the default), and direct clients per agent for the reference.
const PER_AGENT: usize = 4;
/// Requests of the direct reference.
const DIRECT: usize = 4000;
/// Raw puts of the reference.
const RAW: usize = 20_000;
/// Finished records kept per agent in this run, so that retention shows.
const KEPT_PER_AGENT: &str = "1000";
/// The agents' request timeout: a delivery cut by the SIGKILL is sent again (or
/// dead-lettered) only once its attempt's deadline, this plus 2 s, has passed.
const REQUEST_TIMEOUT: &str = "5s";

/// How long `--pauses` stops etcd, unless `BERTH_SOAK_ETCD_PAUSE` says otherwise (less than
/// the leases, so none ends for it).
const ETCD_PAUSE: Duration = Duration::from_secs(5);
/// How long `--etcd-kill` keeps etcd down before starting it again.
const ETCD_DOWN: Duration = Duration::from_secs(3);
/// How long `--pauses` stops gateway a: past its claim lease (10 s), so that its claims and
/// agents pass to gateway b while its deliveries may still be under way.
const GATEWAY_PAUSE: Duration = Duration::from_secs(15);

struct Agent {
    name: String,
    data: TempDir,
}

/// The version of the first `etcd` on PATH (the one the soak starts), as it prints it.
fn etcd_version() -> String {
    std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .ok()
        .and_then(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .find_map(|l| l.strip_prefix("etcd Version: ").map(str::to_string))
        })
        .unwrap_or_else(|| "(version unknown)".into())
}

/// The number in environment variable `name`, or `default` when it is not set.
pub fn setting(name: &str, default: usize) -> anyhow::Result<usize> {
    match std::env::var(name) {
        Ok(n) => n
            .parse()
            .map_err(|e| anyhow::anyhow!("{name}={n:?} is not a count: {e}")),
        Err(_) => Ok(default),
    }
}

/// The resident memory of process `pid`, in MiB (0 when it cannot be read).
fn rss_mib(pid: Option<u32>) -> f64 {
    let status = pid
        .and_then(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// Sizes of etcd's database: the file, and what is in use.
#[derive(Clone, Copy, Debug)]
struct Size {
    file: i64,
    in_use: i64,
}

async fn size(client: &mut etcd_client::Client) -> anyhow::Result<Size> {
    let status = client.status().await?;
    Ok(Size {
        file: status.db_size(),
        in_use: status.raft_used_db_size(),
    })
}

fn mib(bytes: i64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// Runs `op(i)` for i in 0..count, `workers` at a time: (per second, failures).
async fn timed<F, Fut>(count: usize, workers: usize, op: F) -> (f64, usize)
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let (op, next, failures) = (op.clone(), next.clone(), failures.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    if !op(w, i).await {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    (
        count as f64 / started.elapsed().as_secs_f64(),
        failures.load(Ordering::Relaxed),
    )
}

/// Keys deleted by one request when a measurement's keys are cleaned up.
const DELETE_CHUNK: usize = 500;

const RAW_PREFIX: &str = "/bench/raw/";

fn raw_key(i: usize) -> String {
    format!("{RAW_PREFIX}{i:08}")
}

/// RAW puts of SMALL_SIZE bytes, CONCURRENCY at a time, then deleted: (per second, failures).
async fn raw_puts(etcd: &Etcd) -> anyhow::Result<(f64, usize)> {
    let client = etcd.client().await?;
    let rate = timed(RAW, *CONCURRENCY, move |_, i| {
        let mut client = client.clone();
        async move {
            client
                .put(raw_key(i), vec![b'v'; SMALL_SIZE], None)
                .await
                .is_ok()
        }
    })
    .await;
    delete_prefix(etcd, RAW_PREFIX).await?;
    Ok(rate)
}

/// Deletes every key under `prefix` a few hundred at a time, as Berth deletes: etcd 3.4 keeps
/// the write buffer's largest size for good, and copies all of it for every later
/// transaction, so one delete of 20,000 keys would slow every transaction after it (the
/// queue's among them).
async fn delete_prefix(etcd: &Etcd, prefix: &str) -> anyhow::Result<()> {
    let mut client = etcd.client().await?;
    let page = etcd_client::GetOptions::new()
        .with_prefix()
        .with_keys_only()
        .with_limit(DELETE_CHUNK as i64);
    loop {
        let keys = client.get(prefix, Some(page.clone())).await?;
        let (Some(first), Some(last)) = (keys.kvs().first(), keys.kvs().last()) else {
            return Ok(());
        };
        let mut end = last.key().to_vec();
        end.push(0);
        let options = etcd_client::DeleteOptions::new().with_range(end);
        client.delete(first.key(), Some(options)).await?;
    }
}

/// The queue's own write path without the gateways' HTTP hop: RAW requests of SMALL_SIZE stored
/// by `Store::enqueue_request` (every other one with an `Idempotency-Key` when `keyed`, taken
/// in the same commit, as a gateway does for an agent with no ready replica) through two
/// stores, as two gateways would, CONCURRENCY at a time; under a prefix of their own, deleted
/// after as the raw puts are: (per second, failures).
async fn store_enqueue(etcd: &Etcd, keyed: bool) -> anyhow::Result<(f64, usize)> {
    const PREFIX: &str = "/bench/store";
    let mut stores = Vec::new();
    for _ in 0..2 {
        stores.push(Store::connect(&[etcd.url()], PREFIX, &EtcdTls::default()).await?);
    }
    let stores = Arc::new(stores);
    let rate = timed(RAW, *CONCURRENCY, move |_, i| {
        let store = stores[i % 2].clone();
        async move {
            let agent = format!("agent-{}", i % AGENTS);
            let mut request = queued_request(agent, vec![b's'; SMALL_SIZE]);
            let ttl = Duration::from_secs(3600);
            if keyed && i % 2 == 0 {
                let key = berth_store::requests::key_digest(&format!("store-{i}"));
                matches!(
                    store
                        .enqueue_keyed_request(&mut request, ttl, &key, "p")
                        .await,
                    Ok(None)
                )
            } else {
                store.enqueue_request(&mut request, ttl).await.is_ok()
            }
        }
    })
    .await;
    delete_prefix(etcd, PREFIX).await?;
    Ok(rate)
}

/// Connections to `addrs`, `n` in all, spread over them.
async fn connections(
    addrs: &[String],
    n: usize,
) -> anyhow::Result<Vec<Arc<tokio::sync::Mutex<Conn>>>> {
    let mut conns = Vec::new();
    for i in 0..n {
        conns.push(Arc::new(tokio::sync::Mutex::new(
            Conn::open(&addrs[i % addrs.len()]).await?,
        )));
    }
    Ok(conns)
}

/// The ids each agent logged, and how often, read on from where the last reading stopped: the
/// drain polls this twice a second, and by the last of many rounds the logs hold millions of
/// lines, which reading whole each time would make the soak's own load grow round by round.
#[derive(Default)]
struct Arrivals {
    /// Bytes of each agent's log read so far (whole lines only).
    read: HashMap<String, u64>,
    seen: HashMap<String, usize>,
}

impl Arrivals {
    /// Reads the lines logged since the last call; every id seen so far, and how often.
    fn update(&mut self, agents: &[Agent]) -> anyhow::Result<&HashMap<String, usize>> {
        use std::io::{Read, Seek, SeekFrom};
        for agent in agents {
            let path = agent.data.path().join("requests.log");
            let Ok(mut file) = std::fs::File::open(&path) else {
                continue;
            };
            let read = self.read.entry(agent.name.clone()).or_default();
            file.seek(SeekFrom::Start(*read))?;
            let mut new = Vec::new();
            file.read_to_end(&mut new)?;
            // A line being written is read whole next time.
            let Some(end) = new.iter().rposition(|b| *b == b'\n') else {
                continue;
            };
            for id in String::from_utf8_lossy(&new[..end]).lines() {
                *self.seen.entry(id.to_string()).or_insert(0) += 1;
            }
            *read += end as u64 + 1;
        }
        Ok(&self.seen)
    }
}

/// Requests whose runs at the agent overlapped in time (from `/slow`'s start and end log).
fn overlapping(data: &Path) -> usize {
    let log = std::fs::read_to_string(data.join("slow.log")).unwrap_or_default();
    let mut open: HashMap<&str, usize> = HashMap::new();
    let mut overlapped: HashSet<&str> = HashSet::new();
    for line in log.lines() {
        let mut parts = line.split(' ');
        let (Some(what), Some(id)) = (parts.next(), parts.next()) else {
            continue;
        };
        let runs = open.entry(id).or_insert(0);
        if what == "start" {
            *runs += 1;
            if *runs > 1 {
                overlapped.insert(id);
            }
        } else {
            *runs = runs.saturating_sub(1);
        }
    }
    overlapped.len()
}

/// Dead-lettered requests of every agent, through the API (paged).
fn dead(cp: &ControlPlane) -> anyhow::Result<HashSet<String>> {
    let args = ["--state", "dead"];
    Ok(berth_tests::replay::list_request_ids(cp, &args, 1000)?
        .0
        .into_iter()
        .collect())
}

/// How many agents each gateway replays (`replayers/`), for the progress log.
async fn replayers(client: &mut etcd_client::Client) -> String {
    let Ok(by_agent) = berth_tests::replay::replayed_by(client).await else {
        return "(unknown)".into();
    };
    let mut by: std::collections::BTreeMap<String, usize> = Default::default();
    for gateway in by_agent.into_values() {
        *by.entry(gateway).or_default() += 1;
    }
    let each: Vec<String> = by.iter().map(|(g, n)| format!("{g} {n}")).collect();
    if each.is_empty() {
        "none".into()
    } else {
        each.join(", ")
    }
}

/// A metric's value from a Prometheus text page.
fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// What the gateways' metrics say so far, summed over them: their 202s and their group commits.
#[derive(Clone, Copy, Default)]
struct Accepted {
    /// 202s sent, and their seconds from each request's arrival to its response headers
    /// (`berth_gateway_request_duration_seconds`).
    count: f64,
    seconds: f64,
    /// Group commits, the seconds etcd took to answer them, and the transactions they held
    /// (`berth_gateway_store_commit_seconds`, `berth_gateway_store_commit_transactions`).
    commits: f64,
    commit_seconds: f64,
    transactions: f64,
}

impl Accepted {
    /// What happened between `before` and `self`.
    fn since(self, before: Self) -> Self {
        Self {
            count: self.count - before.count,
            seconds: self.seconds - before.seconds,
            commits: self.commits - before.commits,
            commit_seconds: self.commit_seconds - before.commit_seconds,
            transactions: self.transactions - before.transactions,
        }
    }
}

async fn accepted(gateways: &[Gateway]) -> anyhow::Result<Accepted> {
    let mut total = Accepted::default();
    for gateway in gateways {
        let admin = &gateway.admin_addr;
        let (_, page) = berth_tests::docker::http(admin, "GET", "/metrics")
            .await
            .ok_or_else(|| anyhow::anyhow!("no /metrics from {admin}"))?;
        let sum_of = |what: &str| -> f64 {
            let name = format!("berth_gateway_request_duration_seconds_{what}{{");
            page.lines()
                .filter(|l| l.starts_with(&name) && l.contains("code=\"202\""))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        total.count += sum_of("count");
        total.seconds += sum_of("sum");
        total.commits += metric(&page, "berth_gateway_store_commit_seconds_count");
        total.commit_seconds += metric(&page, "berth_gateway_store_commit_seconds_sum");
        total.transactions += metric(&page, "berth_gateway_store_commit_transactions_sum");
    }
    Ok(total)
}

/// Mean time of each step of the replayed deliveries one gateway has made (its
/// `berth_gateway_replay_step_seconds`), for the progress log.
pub async fn steps(admin: &str) -> anyhow::Result<String> {
    let (_, page) = berth_tests::docker::http(admin, "GET", "/metrics")
        .await
        .ok_or_else(|| anyhow::anyhow!("no /metrics from {admin}"))?;
    let mut line = format!("gateway {admin}: mean");
    for step in ["claim", "wait", "forward", "finish"] {
        let at = |what: &str| {
            metric(
                &page,
                &format!("berth_gateway_replay_step_seconds_{what}{{step=\"{step}\"}}"),
            )
        };
        let (sum, count) = (at("sum"), at("count"));
        let mean_ms = if count > 0.0 {
            sum / count * 1000.0
        } else {
            0.0
        };
        line.push_str(&format!(" {step} {mean_ms:.1} ms ({count:.0})"));
    }
    Ok(line)
}

pub async fn run() -> anyhow::Result<()> {
    let started = Instant::now();
    let small_count: usize = setting("BERTH_SOAK_REQUESTS", SMALL)?;
    let enqueue_gateways: usize = setting("BERTH_SOAK_GATEWAYS", 2)?;
    // 0: no request with an Idempotency-Key; 1: every other one; 2: all of them.
    let keyed_share = setting("BERTH_SOAK_KEYED", 1)?;
    let is_keyed = move |i: usize| keyed_share >= 2 || (keyed_share == 1 && i.is_multiple_of(2));
    let keyed_words = match keyed_share {
        0 => "none with an `Idempotency-Key`",
        1 => "half with an `Idempotency-Key`",
        _ => "each with an `Idempotency-Key`",
    };
    let enqueue_only = std::env::args().any(|a| a == "--enqueue-only");
    let pauses = std::env::args().any(|a| a == "--pauses");
    let etcd_pause = Duration::from_secs(setting(
        "BERTH_SOAK_ETCD_PAUSE",
        ETCD_PAUSE.as_secs() as usize,
    )? as u64);
    let etcd_kill = std::env::args().any(|a| a == "--etcd-kill");
    let restarts = !std::env::args().any(|a| a == "--no-restarts");
    let run = DockerRun::new()?;
    let mut etcd = Etcd::start().await?;
    let cp = ControlPlane::start_with(
        &etcd.url(),
        &[
            "--compaction-retention",
            "15s",
            "--finished-per-agent",
            KEPT_PER_AGENT,
        ],
    )
    .await?;
    let _node = NodeAgent::start(&cp.url(), &unique_name("soak"), &run)?;
    let mut gateways = [
        Gateway::start_named(&etcd.url(), "soak-a").await?,
        Gateway::start_named(&etcd.url(), "soak-b").await?,
    ];
    let addrs: Vec<String> = gateways.iter().map(|g| g.addr.clone()).collect();
    let mut agents = Vec::new();
    for _ in 0..AGENTS {
        let name = unique_name("soak");
        let (data, volume) = data_volume()?;
        let out = cp.deploy_echo(
            &name,
            &[
                "-v",
                &volume,
                "--replay-max-queued",
                "20000",
                "--replay-max-body",
                "4MiB",
                "--request-timeout",
                REQUEST_TIMEOUT,
            ],
        );
        anyhow::ensure!(out.status.success(), "deploy: {out:?}");
        agents.push(Agent { name, data });
    }
    let api = cp.agents().await?;
    let ready = |n: u32| {
        move |a: &berth_proto::v1::Agent| a.status.as_ref().is_some_and(|s| s.ready_replicas == n)
    };
    for agent in &agents {
        wait_agent(&api, &agent.name, "ready", ready(1)).await?;
    }
    for agent in &agents {
        let path = format!("/agents/{}/health", agent.name);
        for addr in &addrs {
            eventually(Duration::from_secs(30), "the gateways route", || async {
                (send(addr, &format!("GET {path} HTTP/1.1"), b"")
                    .await
                    .status
                    == 200)
                    .then_some(())
            })
            .await?;
        }
    }
    let names: Arc<Vec<String>> = Arc::new(agents.iter().map(|a| a.name.clone()).collect());

    // Reference: the same agents served directly through the gateway, PER_AGENT at a time each.
    let conns = connections(&addrs, AGENTS * PER_AGENT).await?;
    let direct = {
        let (conns, names) = (conns.clone(), names.clone());
        timed(DIRECT, AGENTS * PER_AGENT, move |w, _| {
            let (conn, names) = (conns[w].clone(), names.clone());
            async move {
                let path = format!("/agents/{}/slow?ms={WORK_MS}", names[w % AGENTS]);
                let sent = conn
                    .lock()
                    .await
                    .request(http::Method::POST, &path, &[], Bytes::from_static(b"d"))
                    .await;
                matches!(sent, Ok((200, _)))
            }
        })
        .await
    };

    // Reference: raw etcd puts of the same size, CONCURRENCY at a time; and the queue's
    // writes through the store alone, to tell its own cost from the HTTP hop's.
    // A first pass unmeasured: etcd's file grows to hold the first few MiB (and is reused
    // after), which would otherwise slow whichever measure came first.
    raw_puts(&etcd).await?;
    // The phases are marked for bench/cpu-share/run.sh.
    println!(
        "raw puts: {RAW} of {SMALL_SIZE} bytes, {} at a time",
        *CONCURRENCY
    );
    let raw = raw_puts(&etcd).await?;
    println!(
        "the store alone: {RAW} requests, {} at a time",
        *CONCURRENCY
    );
    let store = store_enqueue(&etcd, keyed_share != 0).await?;
    println!(
        "raw put {:.0}/s; through the store alone {:.0}/s: {:.2} of raw",
        raw.0,
        store.0,
        store.0 / raw.0
    );
    let mut status = etcd.client().await?;

    let rounds = setting("BERTH_SOAK_ROUNDS", 1)?.max(1);
    // One row per round: what a long run does to etcd and the gateways over time.
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    let mut arrivals = Arrivals::default();
    for round in 0..rounds {
        let last = round + 1 == rounds;
        for agent in &agents {
            anyhow::ensure!(cp.cli(&["stop", &agent.name]).status.success());
        }
        for agent in &agents {
            wait_agent(&api, &agent.name, "stopped", ready(0)).await?;
            let path = format!("/agents/{}/echo", agent.name);
            for addr in &addrs {
                eventually(Duration::from_secs(30), "the gateways to queue", || async {
                    let head = format!("POST {path} HTTP/1.1\r\nX-Berth-Replay: off");
                    (send(addr, &head, b"x").await.status == 503).then_some(())
                })
                .await?;
            }
        }
        let before = size(&mut status).await?;

        // Enqueue: 100,000 small requests over both gateways, half with an Idempotency-Key.
        let sent: Arc<Mutex<Vec<String>>> = Arc::default();
        let keyed: Arc<Mutex<HashSet<String>>> = Arc::default();
        let conns = connections(&addrs[..enqueue_gateways.clamp(1, 2)], *CONCURRENCY).await?;
        println!(
            "enqueueing {small_count} requests through {} gateway(s), {} at a time, {}",
            enqueue_gateways.clamp(1, 2),
            *CONCURRENCY,
            keyed_words
        );
        let accepted_before = accepted(&gateways).await?;
        let small = Bytes::from(vec![b's'; SMALL_SIZE]);
        let enqueue = {
            let (conns, names, sent, keyed) =
                (conns.clone(), names.clone(), sent.clone(), keyed.clone());
            timed(small_count, *CONCURRENCY, move |w, i| {
                let (conn, names, sent, body) =
                    (conns[w].clone(), names.clone(), sent.clone(), small.clone());
                let keyed = keyed.clone();
                async move {
                    let path = format!("/agents/{}/slow?ms={WORK_MS}&n={i}", names[i % AGENTS]);
                    let key = format!("soak-{round}-{i}");
                    let headers: &[(&str, &str)] = if is_keyed(i) {
                        &[("idempotency-key", key.as_str())]
                    } else {
                        &[]
                    };
                    let queued = conn
                        .lock()
                        .await
                        .request(http::Method::POST, &path, headers, body)
                        .await;
                    match queued {
                        Ok((202, body)) => {
                            let json: serde_json::Value =
                                serde_json::from_slice(&body).unwrap_or_default();
                            let id = json["request_id"].as_str().unwrap_or_default().to_string();
                            if is_keyed(i) {
                                keyed.lock().unwrap().insert(id.clone());
                            }
                            sent.lock().unwrap().push(id);
                            true
                        }
                        _ => false,
                    }
                }
            })
            .await
        };
        // Where a request's time goes: inside the gateways (arrival to 202), against what the
        // clients saw (CONCURRENCY at a time, so CONCURRENCY / rate each).
        let inside = accepted(&gateways).await?.since(accepted_before);
        println!(
            "a request's time: {:.2} ms at the client, {:.2} ms inside the gateway; group \
             commits: {:.1} transactions each, answered by etcd in {:.2} ms",
            *CONCURRENCY as f64 / enqueue.0 * 1000.0,
            inside.seconds / inside.count.max(1.0) * 1000.0,
            inside.transactions / inside.commits.max(1.0),
            inside.commit_seconds / inside.commits.max(1.0) * 1000.0,
        );
        let large = Bytes::from(vec![b'L'; LARGE_SIZE]);
        let huge = Bytes::from(vec![b'H'; HUGE_SIZE]);
        let large_failures = {
            let (conns, names, sent) = (conns.clone(), names.clone(), sent.clone());
            // At most one client per connection (fewer than 8 with `BERTH_SOAK_CONCURRENCY`).
            timed(LARGE, LARGE_CLIENTS.min(conns.len()), move |w, i| {
                let body = if i % HUGE_EVERY == 0 { &huge } else { &large };
                let (conn, names, sent, body) =
                    (conns[w].clone(), names.clone(), sent.clone(), body.clone());
                async move {
                    let path = format!("/agents/{}/slow?ms={WORK_MS}&large={i}", names[i % AGENTS]);
                    match conn
                        .lock()
                        .await
                        .request(http::Method::POST, &path, &[], body)
                        .await
                    {
                        Ok((202, body)) => {
                            let json: serde_json::Value =
                                serde_json::from_slice(&body).unwrap_or_default();
                            sent.lock()
                                .unwrap()
                                .push(json["request_id"].as_str().unwrap_or_default().to_string());
                            true
                        }
                        _ => false,
                    }
                }
            })
            .await
            .1
        };
        let sent: Vec<String> = sent.lock().unwrap().clone();
        println!("enqueued {} at {:.0}/s", sent.len(), enqueue.0);
        let peak_queued = size(&mut status).await?;
        // The same raw puts again, with etcd as full as the queue made it: what etcd itself does
        // at this size.
        let raw_full = raw_puts(&etcd).await?;
        println!(
            "queued {} by {:?} into the soak (enqueue {:.0}/s, raw put {:.0}/s, again {:.0}/s); etcd {:.1} MiB",
            sent.len(),
            started.elapsed(),
            enqueue.0,
            raw.0,
            raw_full.0,
            mib(peak_queued.file)
        );
        println!(
            "enqueue / raw put: {:.2} (again: {:.2})",
            enqueue.0 / raw.0,
            enqueue.0 / raw_full.0
        );
        if enqueue_only {
            return Ok(());
        }

        // Drain, while one gateway is stopped with SIGTERM and the other with SIGKILL.
        let drain_started = Instant::now();
        for agent in &agents {
            anyhow::ensure!(cp.cli(&["start", &agent.name]).status.success());
        }
        let total = sent.len();
        let wanted: HashSet<&str> = sent.iter().map(String::as_str).collect();
        // Dead requests of this round (retention keeps earlier rounds' too).
        let this_round = |ids: HashSet<String>| {
            ids.into_iter()
                .filter(|id| wanted.contains(id.as_str()))
                .collect::<Vec<_>>()
        };
        let (mut termed, mut killed) = (None, None);
        let (mut etcd_paused, mut gateway_paused) = (!pauses, !pauses);
        // When the stopped etcd or gateway a is to be continued: the loop goes on meanwhile, so
        // that the progress and the drain's end are seen while a process is stopped.
        let (mut etcd_until, mut gateway_until): (Option<Instant>, Option<Instant>) = (None, None);
        // When the killed etcd is to be started again (`--etcd-kill`).
        let (mut etcd_killed, mut etcd_down_until) = (!etcd_kill, None::<Instant>);
        let mut killed_at = None;
        let mut dead_seen: HashSet<String> = HashSet::new();
        let mut last_dead_check = Instant::now();
        let mut last_progress = Instant::now();
        let mut most = None;
        let mut first = None;
        let drained = loop {
            let seen = arrivals.update(&agents)?;
            let delivered = seen
                .keys()
                .filter(|id| wanted.contains(id.as_str()))
                .count();
            // Each second while the deliveries the SIGKILL cut are dead-lettered (once their
            // deadline, the request timeout and 2 s, has passed): retention may drop them within
            // seconds, as the oldest finished records.
            let after_kill =
                killed_at.is_some_and(|t: Instant| t.elapsed() < Duration::from_secs(20));
            let every = if after_kill { 1 } else { 10 };
            // Not while etcd is stopped or down: the listing would wait for it.
            if etcd_until.is_none()
                && etcd_down_until.is_none()
                && last_dead_check.elapsed() > Duration::from_secs(every)
            {
                // A union: retention drops old finished records (every 30 s), dead ones included.
                // Each listing reads only the dead letters' index and their records, but runs the
                // CLI: not more often than needed.
                dead_seen.extend(this_round(dead(&cp)?));
                last_dead_check = Instant::now();
            }
            let done = delivered
                + dead_seen
                    .iter()
                    .filter(|id| !seen.contains_key(*id))
                    .count();
            if done >= total {
                let drained = drain_started.elapsed();
                // Drained while a process was stopped: continued now, before what follows.
                if etcd_until.take().is_some() {
                    etcd.signal("CONT");
                }
                if etcd_down_until.take().is_some() {
                    etcd.resume().await?;
                }
                if gateway_until.take().is_some() {
                    gateways[0].signal("CONT");
                }
                break drained;
            }
            if first.is_none() && delivered > 0 {
                first = Some(drain_started.elapsed());
                println!(
                    "first delivery {:.2?} after `berth start` (the agents' start and readiness)",
                    drain_started.elapsed()
                );
            }
            if most.is_none() && done >= total * 99 / 100 {
                most = Some(drain_started.elapsed());
            }
            if restarts && termed.is_none() && done >= total * 3 / 10 {
                for gateway in &gateways {
                    println!("{}", steps(&gateway.admin_addr).await?);
                }
                let t = Instant::now();
                anyhow::ensure!(
                    gateways[0].terminate(Duration::from_secs(60)).await,
                    "SIGTERM: {}",
                    gateways[0].log()
                );
                termed = Some(t.elapsed());
                gateways[0].resume().await?;
                println!(
                    "gateway a stopped by SIGTERM in {:?} at {done} of {total}; restarted",
                    t.elapsed()
                );
            }
            if restarts && killed.is_none() && done >= total * 6 / 10 {
                gateways[1].kill();
                killed = Some(done);
                killed_at = Some(Instant::now());
                gateways[1].resume().await?;
                println!("gateway b killed (SIGKILL) at {done} of {total}; restarted");
            }
            if !etcd_paused && done >= total * 45 / 100 {
                etcd_paused = true;
                etcd.signal("STOP");
                etcd_until = Some(Instant::now() + etcd_pause);
                println!("etcd paused (SIGSTOP) for {etcd_pause:?} at {done} of {total}");
            }
            if etcd_until.is_some_and(|t| Instant::now() >= t) {
                etcd_until = None;
                etcd.signal("CONT");
                println!("etcd continued at {done} of {total}");
            }
            if !etcd_killed && done >= total / 2 {
                etcd_killed = true;
                etcd.stop();
                etcd_down_until = Some(Instant::now() + ETCD_DOWN);
                println!("etcd killed (SIGKILL) at {done} of {total}");
            }
            if etcd_down_until.is_some_and(|t| Instant::now() >= t) {
                etcd_down_until = None;
                let t = Instant::now();
                etcd.resume().await?;
                println!(
                    "etcd started again at {done} of {total}, answering in {:?}",
                    t.elapsed()
                );
            }
            if !gateway_paused && done >= total * 8 / 10 {
                gateway_paused = true;
                gateways[0].signal("STOP");
                gateway_until = Some(Instant::now() + GATEWAY_PAUSE);
                println!("gateway a paused (SIGSTOP) for {GATEWAY_PAUSE:?} at {done} of {total}");
            }
            if gateway_until.is_some_and(|t| Instant::now() >= t) {
                gateway_until = None;
                gateways[0].signal("CONT");
                println!("gateway a continued at {done} of {total}");
            }
            anyhow::ensure!(
                drain_started.elapsed() < Duration::from_secs(1800),
                "not drained after 30 minutes: {done} of {total}"
            );
            if last_progress.elapsed() >= Duration::from_secs(5) {
                let by = if etcd_until.is_some() || etcd_down_until.is_some() {
                    "(etcd stopped)".to_string()
                } else {
                    replayers(&mut status).await
                };
                println!(
                    "{:>5.0?} delivered {delivered} of {total}; agents replayed by {by}",
                    drain_started.elapsed(),
                );
                last_progress = Instant::now();
            }
            // Often until the first delivery, so that its time is seen within 50 ms.
            let poll = if first.is_some() { 500 } else { 50 };
            tokio::time::sleep(Duration::from_millis(poll)).await;
        };
        let drain_rate = total as f64 / drained.as_secs_f64();
        let most = most.unwrap_or(drained);
        let most_rate = (total * 99 / 100) as f64 / most.as_secs_f64();
        let peak = size(&mut status).await?;
        let seen = arrivals.update(&agents)?.clone();
        let mut dead_set = dead_seen.clone();
        dead_set.extend(this_round(dead(&cp)?));
        let delivered = sent.iter().filter(|id| seen.contains_key(*id)).count();
        let lost = sent
            .iter()
            .filter(|id| !seen.contains_key(*id) && !dead_set.contains(*id))
            .count();
        let duplicates = sent
            .iter()
            .filter(|id| seen.get(*id).is_some_and(|n| *n > 1))
            .count();
        let overlaps: usize = agents.iter().map(|a| overlapping(a.data.path())).sum();
        let dead_keyed = dead_set.intersection(&keyed.lock().unwrap()).count();
        println!("drained in {drained:?}; delivered {delivered}, dead {} ({dead_keyed} with a key), lost {lost}, duplicates {duplicates}, overlapping {overlaps}", dead_set.len());
        // How long each replayer took to list the queue when it (re)started.
        for (gateway, label) in gateways.iter().zip(["a", "b"]) {
            for line in gateway
                .log()
                .lines()
                .filter(|l| l.contains("replayer listed"))
            {
                println!("gateway {label}: {line}");
            }
        }

        // Retention and compaction by the leader's housekeeping.
        let revision = status.status().await?.header().map_or(0, |h| h.revision());
        // Retention drops records only once more have finished than it keeps.
        let kept: usize = KEPT_PER_AGENT.parse()?;
        let over_retention = (round + 1) * sent.len() > AGENTS * kept;
        let compacted = eventually(
            Duration::from_secs(180),
            "retention and a compaction past the drain",
            || async {
                let (_, page) =
                    berth_tests::docker::http(&cp.admin_addr, "GET", "/metrics").await?;
                let dropped = metric(&page, "berth_replay_retention_dropped_total");
                let compacted = metric(&page, "berth_etcd_compacted_revision");
                ((dropped > 0.0 || !over_retention) && compacted >= revision as f64)
                    .then_some(dropped)
            },
        )
        .await?;
        // Then a compaction past what retention deleted, so that "in use" counts what is kept.
        let trimmed = status.status().await?.header().map_or(0, |h| h.revision());
        eventually(
            Duration::from_secs(180),
            "a compaction past retention",
            || async {
                let (_, page) =
                    berth_tests::docker::http(&cp.admin_addr, "GET", "/metrics").await?;
                (metric(&page, "berth_etcd_compacted_revision") >= trimmed as f64).then_some(())
            },
        )
        .await?;
        let after = size(&mut status).await?;
        // Defragmented only at the end: the file's size from round to round shows whether
        // etcd reuses the space compaction freed.
        let defragmented = if last {
            status.defragment().await?;
            size(&mut status).await?
        } else {
            after
        };

        let mut happened = Vec::new();
        if restarts {
            happened.push(format!(
                "gateway a was stopped with SIGTERM (at 30 %, stopped in {:?}) and gateway b \
                 with SIGKILL (at 60 %), each restarted",
                termed.unwrap_or_default()
            ));
        }
        if pauses {
            happened.push(format!(
                "etcd was paused (SIGSTOP) for {etcd_pause:?} at 45 % and gateway a for \
                 {GATEWAY_PAUSE:?} at 80 %, past its claim lease"
            ));
        }
        if etcd_kill {
            happened.push(format!(
                "etcd was killed (SIGKILL) at 50 % and started again on its data {ETCD_DOWN:?} \
                 later"
            ));
        }
        let faults = if happened.is_empty() {
            String::new()
        } else {
            format!(" while {}", happened.join("; and "))
        };
        let report = format!(
            "{AGENTS} agents (one example-agent replica each, {WORK_MS} ms of work per request, replay \
             concurrency {PER_AGENT}, request timeout {REQUEST_TIMEOUT}), two gateways, one local etcd {} member, one control plane \
             (compaction 15 s behind, {KEPT_PER_AGENT} finished records kept per agent), {} cores \
             for everything. {small_count} requests of {SMALL_SIZE} B ({keyed_words}) \
             and {LARGE} large ones ({} of {} KiB, {} of {} MiB kept in pieces) queued while the agents were stopped, then drained{faults}.\n\n\
             | measure | value |\n|---|---:|\n\
             | sent (202 after commit) | {} |\n\
             | enqueue failures (small, large) | {}, {} |\n\
             | delivered | {delivered} |\n\
             | lost | **{lost}** |\n\
             | dead-lettered (unkeyed, cut by the SIGKILL{}) | {} |\n\
             | dead-lettered with a key | {dead_keyed} |\n\
             | delivered twice (at least once, after the SIGKILL) | {duplicates} |\n\
             | overlapping duplicates (two runs at once at the agent) | **{overlaps}** |\n\
             | raw etcd put, {} at a time (reference) | {:.0}/s |\n\
             | the same requests through the store alone (two stores, no HTTP), {} at a time | {:.0}/s ({:.2} of raw) |\n\
             | enqueue through the gateways, {} at a time | {:.0}/s |\n\
             | **enqueue / raw put** | **{:.2}** |\n\
             | raw etcd put again, with the queue in etcd | {:.0}/s |\n\
             | enqueue / raw put with the queue in etcd | {:.2} |\n\
             | direct through the gateway, {PER_AGENT} per agent (reference) | {:.0}/s |\n\
             | drain, from `berth start` to the last delivery | {:.0}/s ({drained:.1?}) |\n\
             | **drain / direct** | **{:.2}** |\n\
             | drain to 99 % (before the tail that waits out the cut deliveries' deadlines) | {most_rate:.0}/s ({most:.1?}) |\n\
             | drain to 99 % / direct | {:.2} |\n\
             | etcd database before / queued / drained | {:.1} / {:.1} / {:.1} MiB |\n\
             | etcd in use after retention ({compacted:.0} records dropped) and compaction | {:.1} MiB (file {:.1} MiB) |\n\
             | etcd file after `etcdctl defrag` | {:.1} MiB |\n\
             | whole soak | {:.0?} |\n",
            etcd_version(),
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            LARGE - LARGE.div_ceil(HUGE_EVERY),
            LARGE_SIZE / 1024,
            LARGE.div_ceil(HUGE_EVERY),
            HUGE_SIZE >> 20,
            sent.len(),
            enqueue.1,
            large_failures,
            if pauses || etcd_kill {
                " or another fault"
            } else {
                ""
            },
            dead_set.len(),
            *CONCURRENCY,
            raw.0,
            *CONCURRENCY,
            store.0,
            store.0 / raw.0,
            *CONCURRENCY,
            enqueue.0,
            enqueue.0 / raw.0,
            raw_full.0,
            enqueue.0 / raw_full.0,
            direct.0,
            drain_rate,
            drain_rate / direct.0,
            most_rate / direct.0,
            mib(before.file),
            mib(peak_queued.file),
            mib(peak.file),
            mib(after.in_use),
            mib(after.file),
            mib(defragmented.file),
            started.elapsed(),
        );
        let row = format!(
            "| {} | {} | {delivered} | {lost} | {overlaps} | {} | {:.0}/s | {:.0}/s | {:.1} MiB | {:.1} MiB | {:.0} / {:.0} MiB |",
            round + 1,
            sent.len(),
            dead_set.len(),
            enqueue.0,
            drain_rate,
            mib(after.in_use),
            mib(after.file),
            rss_mib(gateways[0].pid()),
            rss_mib(gateways[1].pid()),
        );
        println!("round {row}");
        rows.push(row);
        if lost > 0 || overlaps > 0 {
            failed.push(format!(
                "round {}: lost {lost}, overlapping {overlaps}",
                round + 1
            ));
        }
        if !last {
            continue;
        }
        let mut report = report;
        if rounds > 1 {
            report.push_str(&format!(
                "\n{rounds} rounds, each queueing and draining as above (the table is the last \
                 round's; overlapping duplicates count every round so far):\n\n\
                 | round | sent | delivered | lost | overlapping | dead | enqueue | drain | \
                 etcd in use after compaction | etcd file | gateway a / b RSS |\n\
                 |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n{}\n",
                rows.join("\n")
            ));
        }
        println!("{report}");
        if small_count == SMALL
            && enqueue_gateways == 2
            && keyed_share == 1
            && !pauses
            && !etcd_kill
            && restarts
            && rounds == 1
        {
            berth_bench::write_report(
                "replay-soak",
                "Replay queue: soak at 100,000 requests",
                &report,
            )?;
        }
    }
    anyhow::ensure!(failed.is_empty(), "{}", failed.join("; "));
    Ok(())
}
