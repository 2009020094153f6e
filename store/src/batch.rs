//! Group commit: writes that arrive while earlier ones are being committed wait, and are then
//! committed together in one etcd transaction; each caller is answered only after the commit.
//! The busier the store, the larger the batches.

use std::future::Future;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Batches being committed at once; what arrives meanwhile forms the next batch.
pub const COMMITS_IN_FLIGHT: usize = 2;

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
    /// Starts the task; `commit` writes a batch and answers every job in it.
    pub fn start<F, Fut>(limits: Limits, weight: fn(&T) -> usize, commit: F) -> Self
    where
        F: Fn(Vec<Job<T, R>>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (jobs, pending) = mpsc::channel(4 * limits.items);
        tokio::spawn(run(pending, limits, weight, commit));
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
        // Two batches of one take both commit slots and wait at the gate.
        let mut first = Vec::new();
        for n in 1..=2 {
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
        assert_eq!(*sizes.lock().unwrap(), [1, 1, 3, 1, 1]);
    }
}
