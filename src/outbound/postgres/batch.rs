//! Group commit: the hot calls of many commands in one statement.
//!
//! Each command makes its durable steps one call at a time (`rtm_begin`,
//! `rtm_append`), and under load a hundred commands make them at once. One
//! statement per call paid PostgreSQL's per-statement and per-commit work
//! for every one of them: the control plane used twice the database's CPU
//! of the bare writes. Measured with pgbench on this machine, five calls
//! of one function in one statement went 2.8 times as fast as five
//! statements.
//!
//! So each kind of call has a [`Batcher`]: a task that takes every call
//! queued while its batches in flight ran (at most [`MAX_BATCH`], with at
//! most [`IN_FLIGHT`] batches at once) and makes them all in one
//! statement, one round trip and one commit. Nothing waits for a batch to
//! fill: a call that finds a slot free and no call queued is made at once,
//! alone, in its caller's task, so a lone command pays no latency for it
//! (going through the batcher's task and a batch's task cost it two
//! wake-ups of other threads per call, a tenth of a millisecond or more
//! each on a busy virtual machine).
//!
//! A call made in its caller's task ends with it: a caller that gives up
//! mid-statement (its future dropped) may or may not have committed, as
//! when a connection drops, which every call is written to survive (an
//! append finds its own event id, a fence taken twice only fences out more).
//! A call that went to the batcher is made all the same.
//!
//! What does not change: each call's own checks (its fence, its inbox row,
//! its idempotent event id) run as before, inside the function, and its
//! answer is its own. A call is durable when its batch commits, and a
//! caller is answered only after that. Two things are new, and handled:
//!
//! - The calls of a batch hold their row locks until the batch commits. A
//!   batch makes its calls in the order of their game ids, so two batches
//!   (of this worker or another) take game rows in one order and cannot
//!   deadlock on them; if they ever do, PostgreSQL cancels one (SQLSTATE
//!   40P01), which is `Unavailable`, and its callers retry.
//! - One call the database refuses fails the whole statement. The batch is
//!   then made again one call at a time, so only that call gets its error.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures_util::future::BoxFuture;

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::ports::StoreError;

/// The most calls one statement makes.
pub(super) const MAX_BATCH: usize = 64;

/// Batches of one kind in flight at once. One at a time left the machine
/// half idle, every call waiting out the commit of the batch before; a few
/// keep the database busy while the calls that arrive meanwhile gather.
/// Measured on 2 cores (rejected patches over 100 games): 1 gave 1,008/s,
/// 2 gave 1,393/s, 4 gave 1,960-1,979/s, 8 gave 1,580/s (smaller batches,
/// more of the database's time per call).
pub(super) const IN_FLIGHT: usize = 4;

type Reply<R> = oneshot::Sender<Result<R, StoreError>>;

/// Makes one batch: every call's answer, in order.
type Run<A, R> =
    Arc<dyn Fn(Vec<A>) -> BoxFuture<'static, Vec<Result<R, StoreError>>> + Send + Sync>;

/// The queue of one kind of call, drained a batch at a time by its task.
/// Dropping the last handle ends the task once its batch is answered.
pub(super) struct Batcher<A, R> {
    queue: mpsc::UnboundedSender<(A, Reply<R>)>,
    run: Run<A, R>,
    /// One permit per batch in flight, [`IN_FLIGHT`] in all; the task
    /// holds one while it waits for calls.
    slots: Arc<Semaphore>,
    /// Calls sent to the task and not yet taken into a batch.
    queued: Arc<AtomicUsize>,
}

impl<A, R> Batcher<A, R>
where
    A: Send + 'static,
    R: Send + 'static,
{
    /// Starts the task that makes the calls: `run` makes one batch and
    /// answers each call, in order.
    pub(super) fn spawn<F, Fut>(run: F) -> Self
    where
        F: Fn(Vec<A>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<Result<R, StoreError>>> + Send + 'static,
    {
        let (queue, mut calls) = mpsc::unbounded_channel::<(A, Reply<R>)>();
        let run: Run<A, R> = Arc::new(move |args| Box::pin(run(args)));
        let slots = Arc::new(Semaphore::new(IN_FLIGHT));
        let queued = Arc::new(AtomicUsize::new(0));
        let this = Self {
            queue,
            run: run.clone(),
            slots: slots.clone(),
            queued: queued.clone(),
        };
        tokio::spawn(async move {
            loop {
                // A free slot first, then the calls: what queues while
                // every slot is busy makes the next batch.
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let Some(first) = calls.recv().await else {
                    return;
                };
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match calls.try_recv() {
                        Ok(call) => batch.push(call),
                        Err(_) => break,
                    }
                }
                queued.fetch_sub(batch.len(), Ordering::SeqCst);
                let run = run.clone();
                tokio::spawn(async move {
                    let (args, replies): (Vec<A>, Vec<Reply<R>>) = batch.into_iter().unzip();
                    let n = args.len();
                    let mut answers = run(args).await.into_iter();
                    drop(slot);
                    for reply in replies {
                        let answer = answers.next().unwrap_or_else(|| {
                            Err(StoreError::Corrupt(format!(
                                "a batch of {n} calls gave fewer answers"
                            )))
                        });
                        // A caller that gave up (its future dropped) is
                        // gone; its call was made all the same, like a sent
                        // query.
                        let _ = reply.send(answer);
                    }
                });
            }
        });
        this
    }

    /// Makes `args` in the next batch and returns its own answer; alone and
    /// at once when a slot is free and no call is queued.
    pub(super) async fn call(&self, args: A) -> Result<R, StoreError> {
        if self.queued.load(Ordering::SeqCst) == 0
            && let Ok(slot) = self.slots.clone().try_acquire_owned()
        {
            let answer = (self.run)(vec![args]).await.pop();
            drop(slot);
            return answer.unwrap_or_else(|| {
                Err(StoreError::Corrupt(
                    "a batch of one call gave no answer".into(),
                ))
            });
        }
        let (reply, answer) = oneshot::channel();
        self.queued.fetch_add(1, Ordering::SeqCst);
        self.queue.send((args, reply)).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            StoreError::Unavailable("the database batcher has stopped".into())
        })?;
        answer.await.map_err(|_| {
            StoreError::Unavailable("the database batcher stopped before answering".into())
        })?
    }
}

/// One column of a batch statement's arrays: `field` of every call, in
/// the batch's order.
pub(super) fn column<A, T>(calls: &[&A], field: impl Fn(&A) -> T) -> Vec<T> {
    calls.iter().map(|c| field(c)).collect()
}

/// Makes `calls` with `statement` (one statement for all, in the order of
/// `key`), answering each in its original order. When the statement fails
/// for one call the database refuses (`Corrupt`), each call is made again
/// alone; when it fails for want of the database, every call gets that
/// error and its caller retries.
pub(super) async fn in_key_order<A, R, K, S, Fut>(
    mut calls: Vec<A>,
    key: impl Fn(&A) -> K,
    statement: S,
) -> Vec<Result<R, StoreError>>
where
    K: Ord,
    S: Fn(Vec<&A>) -> Fut,
    Fut: Future<Output = Result<Vec<R>, StoreError>>,
{
    let n = calls.len();
    let mut order: Vec<usize> = (0..n).collect();
    // Each key once: a sort asks for keys O(n log n) times.
    order.sort_by_cached_key(|&i| key(&calls[i]));
    let sorted: Vec<&A> = order.iter().map(|&i| &calls[i]).collect();
    match statement(sorted).await {
        Ok(answers) if answers.len() == n => {
            let mut out: Vec<Option<R>> = (0..n).map(|_| None).collect();
            for (slot, answer) in order.into_iter().zip(answers) {
                out[slot] = Some(answer);
            }
            out.into_iter()
                .map(|a| a.ok_or_else(|| StoreError::Corrupt("a batch lost an answer".into())))
                .collect()
        }
        Ok(answers) => {
            let e = StoreError::Corrupt(format!(
                "a batch of {n} calls gave {} answers",
                answers.len()
            ));
            (0..n).map(|_| Err(e.clone())).collect()
        }
        Err(StoreError::Corrupt(_)) if n > 1 => {
            let mut out = Vec::with_capacity(n);
            for call in calls.drain(..) {
                out.push(match statement(vec![&call]).await {
                    Ok(mut answers) if answers.len() == 1 => Ok(answers.remove(0)),
                    Ok(_) => Err(StoreError::Corrupt("a call gave no answer".into())),
                    Err(e) => Err(e),
                });
            }
            out
        }
        Err(e) => (0..n).map(|_| Err(e.clone())).collect(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn calls_made_together_share_a_batch_and_each_gets_its_own_answer() {
        let batches = Arc::new(AtomicUsize::new(0));
        let seen = batches.clone();
        let batcher = Arc::new(Batcher::spawn(move |args: Vec<u32>| {
            seen.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                args.into_iter().map(|a| Ok(a * 10)).collect()
            }
        }));
        let calls: Vec<_> = (0..50u32)
            .map(|i| {
                let b = batcher.clone();
                tokio::spawn(async move { b.call(i).await })
            })
            .collect();
        for (i, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.unwrap().unwrap(), i as u32 * 10);
        }
        let made = batches.load(Ordering::SeqCst);
        assert!(made < 50, "50 calls at once took {made} batches");
    }

    /// A lone call runs in its caller's task (no hop through the batcher's
    /// tasks); calls that find every slot busy wait for the batcher.
    #[tokio::test]
    async fn a_lone_call_is_made_in_its_callers_task() {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let held = gate.clone();
        let batcher = Arc::new(Batcher::spawn(move |args: Vec<u32>| {
            let held = held.clone();
            async move {
                // Call 0 holds its slot until the test lets it go.
                if args.contains(&0) {
                    let _ = held.acquire().await;
                }
                let task = tokio::task::try_id();
                args.into_iter().map(|_| Ok(task)).collect()
            }
        }));
        let caller = tokio::spawn({
            let b = batcher.clone();
            async move { (tokio::task::try_id(), b.call(1).await.unwrap()) }
        });
        let (caller_task, ran_in) = caller.await.unwrap();
        assert_eq!(ran_in, caller_task, "a lone call is made by its caller");

        // Every free slot busy (the batcher's task holds the last one).
        let busy: Vec<_> = (0..IN_FLIGHT - 1)
            .map(|_| {
                let b = batcher.clone();
                tokio::spawn(async move { b.call(0).await })
            })
            .collect();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let queued = tokio::spawn({
            let b = batcher.clone();
            async move { (tokio::task::try_id(), b.call(2).await.unwrap()) }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        gate.add_permits(IN_FLIGHT);
        let (caller_task, ran_in) = queued.await.unwrap();
        assert_ne!(ran_in, caller_task, "with no slot free it waits its batch");
        for call in busy {
            call.await.unwrap().unwrap();
        }
    }

    #[tokio::test]
    async fn a_refused_call_fails_alone_and_an_outage_fails_all() {
        // The statement refuses any batch holding 3, and 3 alone.
        let statement = |args: Vec<&u32>| {
            let refused = args.iter().any(|a| **a == 3);
            let answers: Vec<u32> = args.iter().map(|a| **a).collect();
            async move {
                if refused {
                    Err(StoreError::Corrupt("3 is refused".into()))
                } else {
                    Ok(answers)
                }
            }
        };
        let answers = in_key_order(vec![5, 3, 1], |a| *a, statement).await;
        assert_eq!(answers[0], Ok(5));
        assert!(matches!(answers[1], Err(StoreError::Corrupt(_))));
        assert_eq!(answers[2], Ok(1));

        let down =
            |_: Vec<&u32>| async { Err::<Vec<u32>, _>(StoreError::Unavailable("down".into())) };
        let answers = in_key_order(vec![1, 2], |a| *a, down).await;
        assert!(
            answers
                .iter()
                .all(|a| matches!(a, Err(StoreError::Unavailable(_))))
        );
    }

    #[tokio::test]
    async fn calls_are_made_in_key_order_and_answered_in_theirs() {
        let order = std::sync::Mutex::new(Vec::new());
        let statement = |args: Vec<&&str>| {
            order
                .lock()
                .unwrap()
                .extend(args.iter().map(|a| a.to_string()));
            let answers: Vec<String> = args.iter().map(|a| a.to_uppercase()).collect();
            async move { Ok(answers) }
        };
        let answers = in_key_order(vec!["b", "c", "a"], |a| *a, statement).await;
        assert_eq!(*order.lock().unwrap(), ["a", "b", "c"]);
        assert_eq!(
            answers,
            [
                Ok("B".to_string()),
                Ok("C".to_string()),
                Ok("A".to_string())
            ]
        );
    }
}
