//! Scale simulation: one real `berth control-plane` over a real etcd, and many hollow node
//! agents in this process. A hollow node speaks the real `NodeAgentService.Connect` protocol
//! (hello with its capacity, heartbeats every 2 s, a report per replica) with an in-memory
//! runtime: an assigned replica "starts" at once and is reported running and ready. It
//! measures the time for the nodes to join, for every replica to be placed and to be
//! reported running, placements per second, the control plane's CPU time and peak RSS, and
//! etcd's size; beside them, as the reference, the rate of raw sequential etcd puts of one
//! placement's size in the same run. Writes its table into BENCHMARKS.md.
//!
//! Run: `cargo build --release -p berth-cli -p berth-bench && target/release/fleet`
//! (`--nodes N --agents N --replicas N` change the size; the default is 1,000 nodes and
//! 1,000 agents of 10 replicas).

use berth_bench::cpu_time;
use berth_proto::v1::agent_service_client::AgentServiceClient;
use berth_proto::v1::node_agent_service_client::NodeAgentServiceClient;
use berth_proto::v1::{
    node_message, AgentSpec, Assignment, CreateAgentRequest, Heartbeat, Hello, ListAgentsRequest,
    NodeMessage, ReplicaReport, ReplicaState, ReplicaStatus, Resources,
};
use berth_tests::{ControlPlane, Etcd, ADMIN_TOKEN, JOIN_TOKEN};
use etcd_client::GetOptions;
use prost::Message;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

/// Give up on a phase after this long.
const PHASE_TIMEOUT: Duration = Duration::from_secs(600);
/// Time between progress samples (measurement, not waiting on readiness).
const SAMPLE: Duration = Duration::from_millis(100);
/// Agents created at once through the API.
const CREATE_CONCURRENCY: usize = 16;

struct Size {
    nodes: usize,
    agents: usize,
    replicas: usize,
}

fn size_from_args() -> anyhow::Result<Size> {
    let mut size = Size {
        nodes: 1000,
        agents: 1000,
        replicas: 10,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let value = pair
            .get(1)
            .ok_or_else(|| anyhow::anyhow!("{} needs a value", pair[0]))?;
        let n: usize = value.parse()?;
        match pair[0].as_str() {
            "--nodes" => size.nodes = n,
            "--agents" => size.agents = n,
            "--replicas" => size.replicas = n,
            other => anyhow::bail!("unknown argument {other}: use --nodes, --agents, --replicas"),
        }
    }
    Ok(size)
}

/// Set once the measurement is over: the control plane goes away, and the hollow nodes' broken
/// streams are expected then.
static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Replicas reported running by all hollow nodes (each counted once).
#[derive(Default)]
struct Counters {
    joined: AtomicUsize,
    running: AtomicUsize,
}

/// One hollow node agent: the real stream protocol, an in-memory runtime.
async fn hollow_node(url: String, name: String, counters: Arc<Counters>) -> anyhow::Result<()> {
    let channel = Channel::from_shared(url)?.connect().await?;
    let token: MetadataValue<_> = format!("Bearer {JOIN_TOKEN}").parse()?;
    let mut client =
        NodeAgentServiceClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("authorization", token.clone());
            Ok(req)
        });
    let (tx, rx) = mpsc::channel(256);
    let hello = Hello {
        node: name.clone(),
        capacity: Some(Resources {
            cpu_millis: 16_000,
            memory_bytes: 64 << 30,
        }),
        version: "hollow".into(),
        ..Default::default()
    };
    tx.send(NodeMessage {
        kind: Some(node_message::Kind::Hello(hello)),
    })
    .await?;
    let mut inbound = client.connect(ReceiverStream::new(rx)).await?.into_inner();
    counters.joined.fetch_add(1, Ordering::Relaxed);
    let beats = tx.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tick.tick().await;
            let beat = NodeMessage {
                kind: Some(node_message::Kind::Heartbeat(Heartbeat {
                    time: Some(berth_proto::timestamp(std::time::SystemTime::now())),
                    applied_version: 0,
                })),
            };
            if beats.send(beat).await.is_err() {
                return;
            }
        }
    });
    // The in-memory runtime: replica → generation it runs.
    let mut running: HashMap<String, i64> = HashMap::new();
    let mut ever: std::collections::HashSet<String> = Default::default();
    while let Some(message) = inbound.message().await? {
        let Some(berth_proto::v1::control_message::Kind::Assignments(set)) = message.kind else {
            continue;
        };
        let assigned: HashMap<&str, &Assignment> = set
            .replicas
            .iter()
            .map(|a| (a.replica.as_str(), a))
            .collect();
        running.retain(|replica, _| assigned.contains_key(replica.as_str()));
        for (replica, a) in assigned {
            if running.get(replica) == Some(&a.generation) {
                continue;
            }
            running.insert(replica.to_string(), a.generation);
            if ever.insert(replica.to_string()) {
                counters.running.fetch_add(1, Ordering::Relaxed);
            }
            let report = ReplicaReport {
                agent: a.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default(),
                status: Some(ReplicaStatus {
                    replica: replica.to_string(),
                    container_id: format!("hollow-{replica}"),
                    state: ReplicaState::Running as i32,
                    ready: true,
                    address: format!("{name}:8080"),
                    generation: a.generation,
                    started_at: Some(berth_proto::timestamp(std::time::SystemTime::now())),
                    ..Default::default()
                }),
            };
            tx.send(NodeMessage {
                kind: Some(node_message::Kind::Report(report)),
            })
            .await?;
        }
    }
    Ok(())
}

/// The control plane's peak resident set, from /proc.
fn peak_rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .ok_or_else(|| anyhow::anyhow!("no VmHWM"))?;
    let kib: f64 = line.split_whitespace().nth(1).unwrap_or("0").parse()?;
    Ok(kib / 1024.0)
}

async fn count(etcd: &mut etcd_client::Client, prefix: &str) -> anyhow::Result<usize> {
    let resp = etcd
        .get(
            prefix,
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await?;
    Ok(resp.count() as usize)
}

/// Samples `measure` until it reaches `target`; the time it took from `since`.
async fn until<F, Fut>(
    what: &str,
    target: usize,
    since: Instant,
    mut measure: F,
) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<usize>>,
{
    let mut last = 0;
    loop {
        let now = measure().await?;
        if now >= target {
            return Ok(since.elapsed());
        }
        if now != last {
            last = now;
        }
        anyhow::ensure!(
            since.elapsed() < PHASE_TIMEOUT,
            "{what}: {last} of {target} after {PHASE_TIMEOUT:?}"
        );
        tokio::time::sleep(SAMPLE).await;
    }
}

fn spec(name: String, replicas: usize) -> AgentSpec {
    AgentSpec {
        name,
        image: "bench/hollow:1".into(),
        replicas: Some(replicas as u32),
        resources: Some(Resources {
            cpu_millis: 100,
            memory_bytes: 64 << 20,
        }),
        ..Default::default()
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let size = size_from_args()?;
    let total = size.agents * size.replicas;
    let etcd = Etcd::start().await?;
    let cp = ControlPlane::start(&etcd.url()).await?;
    let pid = cp
        .pid()
        .ok_or_else(|| anyhow::anyhow!("control plane not running"))?;
    let mut kv = etcd.client().await?;
    let cpu_before = cpu_time(pid)?;

    // The nodes join.
    let counters = Arc::new(Counters::default());
    let joining = Instant::now();
    for i in 0..size.nodes {
        let (url, counters) = (cp.url(), counters.clone());
        tokio::spawn(async move {
            let result = hollow_node(url, format!("hollow-{i}"), counters).await;
            if let (Err(e), false) = (result, DONE.load(Ordering::Relaxed)) {
                eprintln!("hollow-{i}: {e:#}");
            }
        });
    }
    let joined = until("nodes joined", size.nodes, joining, || {
        let mut kv = kv.clone();
        async move { count(&mut kv, "/berth/nodes/").await }
    })
    .await?;
    println!("{} nodes joined in {joined:.1?}", size.nodes);

    // The agents are created through the API, as fast as it takes them.
    let channel = Channel::from_shared(cp.url())?.connect().await?;
    let token: MetadataValue<_> = format!("Bearer {ADMIN_TOKEN}").parse()?;
    let api = AgentServiceClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", token.clone());
        Ok(req)
    });
    let creating = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut creators = tokio::task::JoinSet::new();
    for _ in 0..CREATE_CONCURRENCY {
        let (mut api, next, agents, replicas) =
            (api.clone(), next.clone(), size.agents, size.replicas);
        creators.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= agents {
                    return anyhow::Ok(());
                }
                let request = CreateAgentRequest {
                    spec: Some(spec(format!("fleet-{i}"), replicas)),
                    ..Default::default()
                };
                api.create_agent(request).await?;
            }
        });
    }
    while let Some(done) = creators.join_next().await {
        done??;
    }
    let created = creating.elapsed();
    println!("{} agents created in {created:.1?}", size.agents);
    let placed = until("replicas placed", total, creating, || {
        let mut kv = kv.clone();
        async move { count(&mut kv, "/berth/assignments/").await }
    })
    .await?;
    println!("{total} replicas placed {placed:.1?} after the first create");
    let reported = until("replicas running on the nodes", total, creating, || {
        let counters = counters.clone();
        async move { Ok(counters.running.load(Ordering::Relaxed)) }
    })
    .await?;
    let ready = until(
        "replicas ready in the agents' status",
        total,
        creating,
        || {
            let mut api = api.clone();
            async move {
                let listed = api
                    .list_agents(ListAgentsRequest::default())
                    .await?
                    .into_inner();
                Ok(listed
                    .agents
                    .iter()
                    .filter_map(|a| a.status.as_ref())
                    .map(|s| s.ready_replicas as usize)
                    .sum())
            }
        },
    )
    .await?;
    println!("all running on the nodes {reported:.1?}, all ready in the status {ready:.1?}");
    let cpu = cpu_time(pid)? - cpu_before;
    let rss = peak_rss_mib(pid)?;
    let status = kv.status().await?;
    let db_mib = status.db_size() as f64 / (1 << 20) as f64;
    let keys = count(&mut kv, "/berth/").await?;

    // Reference: sequential raw etcd puts of one placement's size.
    let sample = Assignment {
        replica: "fleet-0-0".into(),
        spec: Some(spec("fleet-0".into(), size.replicas)),
        generation: 1,
        ..Default::default()
    }
    .encode_to_vec();
    let puts = 2000;
    let started = Instant::now();
    for i in 0..puts {
        kv.put(format!("/reference/{i}"), sample.clone(), None)
            .await?;
    }
    let raw_rate = puts as f64 / started.elapsed().as_secs_f64();
    kv.delete(
        "/reference/",
        Some(etcd_client::DeleteOptions::new().with_prefix()),
    )
    .await?;

    let rate = total as f64 / placed.as_secs_f64();
    let report = format!(
        "Hollow node agents (real stream protocol, in-memory runtime) against one real control \
         plane and etcd on this 2-core machine: {nodes} nodes, {agents} agents × {replicas} \
         replicas = {total} replicas, agents created through the API {CREATE_CONCURRENCY} at a \
         time.\n\n\
         | measure | value |\n|---|---|\n\
         | {nodes} nodes joined (records in etcd) | {joined:.1?} |\n\
         | {agents} agents created through the API | {created:.1?} ({create_rate:.0}/s) |\n\
         | all {total} replicas placed, from the first create | {placed:.1?} |\n\
         | **placements per second** (target ≥ 500) | **{rate:.0}** |\n\
         | reference: raw sequential etcd puts of one placement's size | {raw_rate:.0}/s |\n\
         | all replicas reported running by their nodes | {reported:.1?} |\n\
         | all replicas ready in the agents' status (ListAgents) | {ready:.1?} |\n\
         | control-plane CPU time over the run | {cpu:.1?} |\n\
         | **control-plane peak RSS** (target < 1 GiB) | **{rss:.0} MiB** |\n\
         | etcd database size | {db_mib:.1} MiB ({keys} keys under /berth/) |\n\n\
         Command: `cargo build --release -p berth-cli -p berth-bench && target/release/fleet`.\n",
        nodes = size.nodes,
        agents = size.agents,
        replicas = size.replicas,
        create_rate = size.agents as f64 / created.as_secs_f64(),
    );
    DONE.store(true, Ordering::Relaxed);
    println!("\n{report}");
    if std::env::args().len() == 1 {
        berth_bench::write_report("fleet", "Fleet scale simulation", &report)?;
    }
    Ok(())
}
