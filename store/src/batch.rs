//! Group commit: writes that arrive while earlier ones are being committed wait, and are then
//! committed together in one etcd transaction; each caller is answered only after the commit.
//! The busier the store, the larger the batches.

use crate::Store;
use etcd_client::{Txn, TxnOp, TxnOpResponse};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Batches being committed at once; what arrives meanwhile forms the next batch. One: under
/// load the batches grow instead, and etcd applies fewer, larger transactions (2 in flight
/// queued 20-50 % fewer requests a second in `bench/replay`).
pub const COMMITS_IN_FLIGHT: usize = 1;

/// One write waiting for its batch, and where its outcome goes.
pub(crate) struct Job<T, R> {
    pub item: T,
    pub reply: oneshot::Sender<R>,
}

/// How large a batch may grow: items, and their summed weight (a job that would pass it starts
/// the next batch; one over it alone goes alone).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub items: usize,
    pub weight: usize,
}

/// The sending side of a batching task.
pub(crate) struct Batcher<T, R> {
    jobs: mpsc::Sender<Job<T, R>>,
}

impl<T: Send + 'static, R: Send + 'static> Batcher<T, R> {
    /// Starts the task on `runtime`; `commit` writes a batch and answers every job in it.
    pub fn start<F, Fut>(
        runtime: &tokio::runtime::Handle,
        limits: Limits,
        weight: fn(&T) -> usize,
        commit: F,
    ) -> Self
    where
        F: Fn(Vec<Job<T, R>>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (jobs, pending) = mpsc::channel(4 * limits.items);
        runtime.spawn(run(pending, limits, weight, commit));
        Self { jobs }
    }

    /// `item`'s outcome once its batch is committed; `None` if the batcher is gone.
    pub async fn submit(&self, item: T) -> Option<R> {
        let (reply, answer) = oneshot::channel();
        self.jobs.send(Job { item, reply }).await.ok()?;
        answer.await.ok()
    }
}

async fn run<T, R, F, Fut>(
    mut pending: mpsc::Receiver<Job<T, R>>,
    limits: Limits,
    weight: fn(&T) -> usize,
    commit: F,
) where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(Vec<Job<T, R>>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let in_flight = Arc::new(Semaphore::new(COMMITS_IN_FLIGHT));
    // A job that did not fit in the last batch starts the next one.
    let mut carried: Option<Job<T, R>> = None;
    loop {
        let first = match carried.take() {
            Some(first) => first,
            None => match pending.recv().await {
                Some(first) => first,
                None => return,
            },
        };
        // While the commits in flight finish, what arrives meanwhile waits to join this batch.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let mut total = weight(&first.item);
        let mut batch = vec![first];
        while batch.len() < limits.items {
            match pending.try_recv() {
                Ok(next) if total + weight(&next.item) > limits.weight => {
                    carried = Some(next);
                    break;
                }
                Ok(next) => {
                    total += weight(&next.item);
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        let committing = commit(batch);
        tokio::spawn(async move {
            committing.await;
            drop(permit);
        });
    }
}

/// Most transactions committed together (etcd's default `--max-txn-ops` is 128, and each
/// nested transaction's own operations count against what the batch leaves of it).
pub const TXN_BATCH: usize = 64;
/// Most value bytes in one batch, so that it stays under etcd's request limit (1.5 MiB by
/// default); a transaction that would pass it starts the next batch, one over it goes alone.
pub const TXN_BATCH_BYTES: usize = 512 * 1024;

/// A transaction's outcome, committed alone or within a batch.
#[derive(Debug)]
pub(crate) struct Committed {
    /// Whether its compares held (its success branch ran).
    pub succeeded: bool,
    /// The responses of the branch that ran.
    pub responses: Vec<TxnOpResponse>,
    /// The store revision it was committed (or read) at.
    pub revision: i64,
}

/// Told of each group commit: the transactions it held and how long etcd took to answer it
/// (a batch etcd refused as a whole is told as such, before its transactions go alone).
pub type CommitObserver = Box<dyn Fn(usize, Duration) + Send + Sync>;

/// The batcher of [`Store::commit`].
pub(crate) type TxnBatcher = Batcher<(Txn, usize), Result<Committed, etcd_client::Error>>;

impl Store {
    /// Tells `observer` of every group commit from now on, this store's clones' included (the
    /// first observer set stays).
    pub fn observe_commits(&self, observer: impl Fn(usize, Duration) + Send + Sync + 'static) {
        let _ = self.commits.set(Box::new(observer));
    }

    /// Tells the observer, if any, of a commit of `transactions` that etcd answered after
    /// `took`.
    fn committed(&self, transactions: usize, took: Duration) {
        if let Some(observe) = self.commits.get() {
            observe(transactions, took);
        }
    }

    /// Commits `txn` (carrying about `bytes` of values) together with the transactions submitted
    /// meanwhile: one etcd transaction holds each as a nested transaction with its own compares,
    /// so each succeeds or fails on its own while the batch pays etcd's cost per transaction
    /// once (etcd 3.4 copies its whole pending write buffer for every transaction it applies,
    /// which under load costs more than the writes). Answers only after the commit.
    pub(crate) async fn commit(
        &self,
        txn: Txn,
        bytes: usize,
    ) -> Result<Committed, etcd_client::Error> {
        let batcher = self
            .txns
            .get_or_init(|| async {
                let store = self.clone();
                let limits = Limits {
                    items: TXN_BATCH,
                    weight: TXN_BATCH_BYTES,
                };
                Batcher::start(
                    &self.runtime,
                    limits,
                    |(_, bytes)| *bytes,
                    move |batch| {
                        let store = store.clone();
                        async move { store.commit_batch(batch).await }
                    },
                )
            })
            .await;
        match batcher.submit((txn, bytes)).await {
            Some(result) => result,
            None => Err(etcd_client::Error::Internal(
                "the store's transaction batcher stopped".into(),
            )),
        }
    }

    async fn commit_batch(
        &self,
        batch: Vec<Job<(Txn, usize), Result<Committed, etcd_client::Error>>>,
    ) {
        if batch.len() > 1 {
            let nested: Vec<TxnOp> = batch
                .iter()
                .map(|job| TxnOp::txn(job.item.0.clone()))
                .collect();
            let started = Instant::now();
            let answered = self.client().txn(Txn::new().and_then(nested)).await;
            self.committed(batch.len(), started.elapsed());
            match answered {
                Ok(resp) => {
                    let revision = resp.header().map_or(0, |h| h.revision());
                    for (job, op) in batch.into_iter().zip(resp.op_responses()) {
                        let result = match op {
                            TxnOpResponse::Txn(t) => Ok(Committed {
                                succeeded: t.succeeded(),
                                responses: t.op_responses(),
                                revision,
                            }),
                            _ => Err(etcd_client::Error::Internal(
                                "a batch answered without its transaction".into(),
                            )),
                        };
                        let _ = job.reply.send(result);
                    }
                    return;
                }
                // Down or uncertain: every caller decides, as after its own write.
                Err(e) if crate::transient(&e) => {
                    for job in batch {
                        let _ = job.reply.send(Err(shared(&e)));
                    }
                    return;
                }
                // Refused as a whole (the same key in two of them, a lease gone): each alone,
                // so that only the one at fault fails.
                Err(_) => {}
            }
        }
        for job in batch {
            let result = self.commit_alone(job.item.0).await;
            let _ = job.reply.send(result);
        }
    }

    async fn commit_alone(&self, txn: Txn) -> Result<Committed, etcd_client::Error> {
        let started = Instant::now();
        let answered = self.client().txn(txn).await;
        self.committed(1, started.elapsed());
        let resp = answered?;
        Ok(Committed {
            succeeded: resp.succeeded(),
            revision: resp.header().map_or(0, |h| h.revision()),
            responses: resp.op_responses(),
        })
    }
}

/// A copy of a batch's error for each of its callers (etcd's error type cannot be cloned),
/// transient as the original was.
fn shared(e: &etcd_client::Error) -> etcd_client::Error {
    match e {
        etcd_client::Error::GRpcStatus(status) => etcd_client::Error::GRpcStatus(status.clone()),
        other => etcd_client::Error::GRpcStatus(tonic::Status::unavailable(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[tokio::test]
    async fn jobs_arriving_during_commits_form_the_next_batch_within_the_limits() {
        let within = std::time::Duration::from_secs(10);
        tokio::time::timeout(within, batches_form())
            .await
            .expect("the batches within 10 s");
    }

    async fn batches_form() {
        let sizes: Arc<Mutex<Vec<usize>>> = Arc::default();
        let (open, gate) = tokio::sync::watch::channel(false);
        let batcher = {
            let sizes = sizes.clone();
            Arc::new(Batcher::start(
                &tokio::runtime::Handle::current(),
                Limits {
                    items: 4,
                    weight: 10,
                },
                |w: &usize| *w,
                move |batch: Vec<Job<usize, usize>>| {
                    let (sizes, mut gate) = (sizes.clone(), gate.clone());
                    async move {
                        sizes.lock().unwrap().push(batch.len());
                        let _ = gate.wait_for(|open| *open).await;
                        for job in batch {
                            let _ = job.reply.send(job.item * 2);
                        }
                    }
                },
            ))
        };
        let submit = |w: usize| {
            let batcher = batcher.clone();
            tokio::spawn(async move { batcher.submit(w).await })
        };
        // Batches of one take every commit slot and wait at the gate.
        let mut first = Vec::new();
        for n in 1..=COMMITS_IN_FLIGHT {
            first.push(submit(1));
            while sizes.lock().unwrap().len() < n {
                tokio::task::yield_now().await;
            }
        }
        // Meanwhile five more arrive: the batcher holds one, four wait in the channel.
        let rest: Vec<_> = [3, 3, 3, 3, 9].into_iter().map(submit).collect();
        while batcher.jobs.max_capacity() - batcher.jobs.capacity() < 4 {
            tokio::task::yield_now().await;
        }
        open.send_replace(true);
        for task in first {
            assert_eq!(task.await.unwrap(), Some(2));
        }
        for (task, w) in rest.into_iter().zip([3, 3, 3, 3, 9]) {
            assert_eq!(task.await.unwrap(), Some(w * 2));
        }
        // 3 + 3 + 3 fits the weight of 10; the fourth 3 would not, nor 3 + 9.
        let mut expected = vec![1; COMMITS_IN_FLIGHT];
        expected.extend([3, 1, 1]);
        assert_eq!(*sizes.lock().unwrap(), expected);
    }
}
