//! The worker: takes tasks, runs their handlers, reports the outcome;
//! retries a failed attempt after an exponential backoff until
//! `tasks.max_attempts`, then fails it for good (dead letter).
//!
//! A process runs at most `tasks.workers` tasks at once (its hands), and
//! takes from the queue only as many as it has free hands: a task waiting
//! for a hand stays `queued` (and can be cancelled) instead of being taken
//! and held. While an attempt runs, and while it waits for its retry, the
//! worker renews its claim every third of `tasks.visibility_timeout_s`, so
//! no other worker takes the task over however long it runs; if the claim
//! is lost anyway (Redis was away for longer than the visibility timeout
//! and another worker took the task), the attempt is dropped and nothing
//! of it is written. A worker that dies (SIGKILL, OOM) stops renewing:
//! after the visibility timeout another worker takes its tasks over, each
//! takeover counting as an attempt.
//!
//! [`WorkerPool::start`] runs on a runtime thread of its own, never on the
//! threads that serve sockets, so a slow handler never delays a frame.
//! Stopping ([`WorkerPool::stop`]) lets running tasks finish within the
//! grace period; what is still running then is taken over by another
//! worker after the visibility timeout.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::value::RawValue;
use tokio::sync::{watch, Semaphore};

use super::{backoff, Depth, Job, Outcome, Tasks};
use crate::config::TasksConfig;
use crate::metrics::metrics;

/// How often the queue is trimmed and the gauges refreshed.
const MAINTAIN_EVERY: Duration = Duration::from_secs(2);

/// The worker of one process, on its own runtime thread.
pub struct WorkerPool {
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What the worker's tasks share.
#[derive(Clone)]
struct Context {
    tasks: Tasks,
    max_attempts: u32,
    /// How often a running job renews its claim.
    renew_every: Duration,
    /// The longest wait before a retry.
    max_backoff: Duration,
}

/// How one attempt ended.
enum Attempt {
    Done(Box<RawValue>),
    Failed(String),
    /// Another worker has the task now: stop, write nothing.
    Lost,
}

impl WorkerPool {
    /// Starts a worker named after `instance` that runs up to `hands` tasks
    /// at once (none: only the queue's housekeeping and gauges).
    pub fn start(
        tasks: Tasks,
        config: &TasksConfig,
        instance: &str,
        hands: usize,
    ) -> std::io::Result<WorkerPool> {
        let (stop, stopped) = watch::channel(false);
        let visibility = Duration::from_secs(config.visibility_timeout_s);
        let ctx = Context {
            tasks,
            max_attempts: config.max_attempts,
            renew_every: (visibility / 3).max(Duration::from_millis(500)),
            max_backoff: (visibility / 3).max(Duration::from_secs(1)),
        };
        let consumer = instance.to_owned();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(hands.clamp(1, 2))
            .thread_name("switchboard-tasks")
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name("switchboard-tasks".into())
            .spawn(move || runtime.block_on(run(ctx, consumer, hands, stopped)))?;
        Ok(WorkerPool {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops taking work and waits (at most `grace`) for what is running.
    pub async fn stop(mut self, grace: Duration) {
        let _ = self.stop.send(true);
        let Some(thread) = self.thread.take() else {
            return;
        };
        let joined = tokio::task::spawn_blocking(move || thread.join());
        if tokio::time::timeout(grace + Duration::from_secs(1), joined)
            .await
            .is_err()
        {
            tracing::warn!(
                "task workers still busy after the grace period; their tasks will be taken over"
            );
        }
    }
}

async fn run(ctx: Context, consumer: String, hands: usize, stopped: watch::Receiver<bool>) {
    let housekeeping = tokio::spawn(maintain(ctx.clone(), stopped.clone()));
    if hands > 0 {
        tracing::info!(workers = hands, "task workers started");
        take_and_run(ctx, consumer, hands, stopped).await;
    }
    let _ = housekeeping.await;
}

/// Takes, runs and reports until stopped: waits for a free hand, then
/// takes as many tasks as there are free hands, each run on a hand of its
/// own. A take is never cut short (what it took is being started): it
/// waits under a second, then the loop sees the stop; it returns once the
/// running tasks have ended.
async fn take_and_run(
    ctx: Context,
    consumer: String,
    hands: usize,
    stopped: watch::Receiver<bool>,
) {
    let free = Arc::new(Semaphore::new(hands));
    let mut failures = 0u32;
    while !*stopped.borrow() {
        let Ok(first) = free.clone().acquire_owned().await else {
            return;
        };
        let mut places = vec![first];
        while let Ok(place) = free.clone().try_acquire_owned() {
            places.push(place);
        }
        match ctx.tasks.queue.take(&consumer, places.len()).await {
            Ok(jobs) => {
                failures = 0;
                for (job, place) in jobs.into_iter().zip(places.drain(..)) {
                    let (ctx, consumer) = (ctx.clone(), consumer.clone());
                    tokio::spawn(async move {
                        run_job(&ctx, &consumer, job).await;
                        drop(place);
                    });
                }
            }
            Err(e) => {
                failures += 1;
                tracing::debug!(error = %e, "taking tasks failed");
                tokio::time::sleep(backoff(failures, Duration::from_secs(5))).await;
            }
        }
    }
    let _ = free.acquire_many(hands as u32).await;
}

/// Runs one job's attempts; reports the outcome.
async fn run_job(ctx: &Context, consumer: &str, mut job: Job) {
    let name = job.name.clone();
    let outcome = loop {
        metrics().tasks.started.with_label_values(&[&name]).inc();
        let error = match attempt(ctx, consumer, &job).await {
            Attempt::Done(result) => break Outcome::Done(result),
            Attempt::Failed(error) => error,
            Attempt::Lost => return lost(&job),
        };
        metrics().tasks.failed.with_label_values(&[&name]).inc();
        if job.attempt >= ctx.max_attempts {
            metrics()
                .tasks
                .dead_lettered
                .with_label_values(&[&name])
                .inc();
            break Outcome::Failed(error);
        }
        metrics().tasks.retried.with_label_values(&[&name]).inc();
        if !wait_before_retry(ctx, consumer, &job).await {
            return lost(&job);
        }
        match ctx.tasks.queue.retry(&mut job, &error).await {
            Ok(true) => {}
            Ok(false) => return lost(&job),
            Err(e) => {
                tracing::warn!(error = %e, task_id = %job.task_id, "retry not recorded; the task will be taken over");
                return;
            }
        }
    };
    if let Outcome::Done(_) = outcome {
        metrics().tasks.succeeded.with_label_values(&[&name]).inc();
    }
    match ctx.tasks.queue.finish(&job, &outcome).await {
        Ok(true) => {}
        Ok(false) => lost(&job),
        Err(e) => {
            tracing::warn!(error = %e, task_id = %job.task_id, "task outcome not recorded; the task will be taken over")
        }
    }
}

fn lost(job: &Job) {
    tracing::warn!(task_id = %job.task_id, attempt = job.attempt, "another worker took the task over: this attempt is dropped");
}

/// One attempt, renewing the job's claim while it runs. Bounded by the
/// handler's own time-out (a webhook's `timeout_s`).
async fn attempt(ctx: &Context, consumer: &str, job: &Job) -> Attempt {
    let Some(handler) = ctx.tasks.handlers.get(&job.name) else {
        return Attempt::Failed(format!("no handler for {:?} on this worker", job.name));
    };
    let started = Instant::now();
    let outcome = tokio::select! {
        result = handler.run(job) => match result {
            Ok(result) => Attempt::Done(result),
            Err(error) => Attempt::Failed(error),
        },
        () = keep_claim(ctx, consumer, job) => Attempt::Lost,
    };
    metrics()
        .tasks
        .run_seconds
        .observe(started.elapsed().as_secs_f64());
    outcome
}

/// Renews the job's claim until it is lost (then returns).
async fn keep_claim(ctx: &Context, consumer: &str, job: &Job) {
    loop {
        tokio::time::sleep(ctx.renew_every).await;
        match ctx.tasks.queue.renew(consumer, job).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => tracing::debug!(error = %e, task_id = %job.task_id, "claim not renewed"),
        }
    }
}

/// The backoff before the next attempt, keeping the claim meanwhile;
/// `false` when it was lost.
async fn wait_before_retry(ctx: &Context, consumer: &str, job: &Job) -> bool {
    let wait = backoff(job.attempt, ctx.max_backoff);
    tokio::select! {
        () = tokio::time::sleep(wait) => true,
        () = keep_claim(ctx, consumer, job) => false,
    }
}

/// Trims the queue and refreshes the gauges until stopped.
async fn maintain(ctx: Context, mut stopped: watch::Receiver<bool>) {
    let queue = Arc::clone(&ctx.tasks.queue);
    while !*stopped.borrow() {
        match queue.maintain().await {
            Ok(Depth {
                queued,
                running,
                dead,
            }) => {
                let m = metrics();
                m.tasks.queued.set(queued as i64);
                m.tasks.running.set(running as i64);
                m.tasks.dead.set(dead as i64);
            }
            Err(e) => tracing::debug!(error = %e, "task queue housekeeping failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(MAINTAIN_EVERY) => {}
            _ = stopped.changed() => {}
        }
    }
}
