//! The queue's etcd write taken apart (`target/release/etcd_ops`): on one etcd, 1 KiB values
//! written N at a time as a plain put, a put under a lease, the transaction an unkeyed enqueue
//! sends (two compares and a put under a lease), and `Store::enqueue_request` itself (that
//! transaction through the store's group commit). Each is measured twice, in turn, so that
//! etcd's growth and the machine's noise show; rates are requests a second.
//!
//! `BERTH_OPS=N` writes N of each (default 10,000); `BERTH_OPS_CONCURRENCY=1,32` the
//! concurrencies to measure at; `BERTH_OPS_WRITES=put,lease,txn,store` which writes (a put
//! under a lease slows as keys pile up on it, to minutes at low concurrencies); `BERTH_OPS_WATCHERS=N` watches everything written with N
//! watches (each on a connection of its own, read as it comes, as each gateway's replayer
//! watches the queue). Beside each rate, the CPU etcd spent per write (from `/proc`).

use berth_bench::{cpu_time, queued_request};
use berth_store::{EtcdTls, Store};
use berth_tests::Etcd;
use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const VALUE: usize = 1024;

#[derive(Clone, Copy, Debug)]
enum Op {
    Put,
    PutLease,
    Txn,
    Store,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let count: usize = std::env::var("BERTH_OPS")
        .ok()
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(10_000);
    let concurrencies: Vec<usize> = std::env::var("BERTH_OPS_CONCURRENCY")
        .unwrap_or_else(|_| "1,32".into())
        .split(',')
        .map(|n| n.trim().parse())
        .collect::<Result<_, _>>()?;
    let etcd = Etcd::start().await?;
    let client = etcd.client().await?;
    let lease = client.clone().lease_grant(3600, None).await?.id();
    let store = Store::connect(&[etcd.url()], "/ops", &EtcdTls::default()).await?;
    let writes: Vec<Op> = std::env::var("BERTH_OPS_WRITES")
        .unwrap_or_else(|_| "put,lease,txn,store".into())
        .split(',')
        .map(|w| match w.trim() {
            "put" => Ok(Op::Put),
            "lease" => Ok(Op::PutLease),
            "txn" => Ok(Op::Txn),
            "store" => Ok(Op::Store),
            other => Err(anyhow::anyhow!(
                "BERTH_OPS_WRITES: {other:?} is not one of put, lease, txn, store"
            )),
        })
        .collect::<Result<_, _>>()?;
    let watchers: usize = std::env::var("BERTH_OPS_WATCHERS")
        .ok()
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(0);
    let events = Arc::new(AtomicUsize::new(0));
    for _ in 0..watchers {
        let mut client = etcd.client().await?;
        let events = events.clone();
        let options = etcd_client::WatchOptions::new().with_prefix();
        let mut stream = client.watch("/ops/", Some(options)).await?;
        tokio::spawn(async move {
            while let Ok(Some(batch)) = stream.message().await {
                events.fetch_add(batch.events().len(), Ordering::Relaxed);
            }
        });
    }
    let round = Arc::new(AtomicUsize::new(0));
    for &concurrency in &concurrencies {
        for pass in 1..=2 {
            let mut line = format!("{concurrency:>3} at a time, pass {pass}:");
            for &op in &writes {
                let r = round.fetch_add(1, Ordering::Relaxed);
                let pid = etcd
                    .pid()
                    .ok_or_else(|| anyhow::anyhow!("etcd is not running"))?;
                let before = cpu_time(pid)?;
                let rate = run(op, count, concurrency, r, &client, lease, &store).await;
                let spent = cpu_time(pid)? - before;
                let per_write = spent.as_secs_f64() / count as f64 * 1e6;
                line.push_str(&format!(" {op:?} {rate:.0}/s ({per_write:.0} µs)"));
            }
            if watchers > 0 {
                line.push_str(&format!(
                    " (events watched {})",
                    events.load(Ordering::Relaxed)
                ));
            }
            println!("{line}");
        }
    }
    Ok(())
}

async fn run(
    op: Op,
    count: usize,
    concurrency: usize,
    round: usize,
    client: &etcd_client::Client,
    lease: i64,
    store: &Store,
) -> f64 {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (next, mut client, store) = (next.clone(), client.clone(), store.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    let key = format!("/ops/{round:03}/{i:08}");
                    let value = vec![b'v'; VALUE];
                    let with_lease = Some(PutOptions::new().with_lease(lease));
                    let done = match op {
                        Op::Put => client.put(key, value, None).await.is_ok(),
                        Op::PutLease => client.put(key, value, with_lease).await.is_ok(),
                        Op::Txn => {
                            let other = format!("{key}/other");
                            let txn = Txn::new()
                                .when([
                                    Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
                                    Compare::create_revision(other, CompareOp::Equal, 0),
                                ])
                                .and_then([TxnOp::put(key.as_str(), value, with_lease)]);
                            client.txn(txn).await.is_ok_and(|r| r.succeeded())
                        }
                        Op::Store => {
                            let mut request = queued_request(format!("agent-{}", i % 10), value);
                            let ttl = Duration::from_secs(3600);
                            store.enqueue_request(&mut request, ttl).await.is_ok()
                        }
                    };
                    assert!(done, "{op:?} {i} failed");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("a writer");
    }
    count as f64 / started.elapsed().as_secs_f64()
}
