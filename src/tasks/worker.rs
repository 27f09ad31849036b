//! Worker loops: take tasks in batches, run their handlers, report the
//! outcome; retry a failed attempt after an exponential backoff until
//! `tasks.max_attempts`, then fail it for good (dead letter).
//!
//! [`WorkerPool::start`] runs `n` loops on a runtime thread of their own,
//! never on the threads that serve sockets, so a slow handler never delays
//! a frame. Stopping ([`WorkerPool::stop`]) lets each loop finish what it
//! holds within the grace period; what is still running then is left to
//! be taken over by another worker after `tasks.visibility_timeout_s`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Semaphore};

use super::{backoff, Depth, Job, Outcome, Tasks};
use crate::config::TasksConfig;
use crate::metrics::metrics;

/// Tasks one loop runs at once.
const BATCH: usize = 32;
/// How often the queue is trimmed and the gauges refreshed.
const MAINTAIN_EVERY: Duration = Duration::from_secs(2);

/// Worker loops on their own runtime thread.
pub struct WorkerPool {
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What every loop of a pool shares.
#[derive(Clone)]
struct Context {
    tasks: Tasks,
    max_attempts: u32,
    visibility: Duration,
}

impl WorkerPool {
    /// Starts `loops` worker loops named after `instance` (none: only the
    /// queue's housekeeping and gauges).
    pub fn start(
        tasks: Tasks,
        config: &TasksConfig,
        instance: &str,
        loops: usize,
    ) -> std::io::Result<WorkerPool> {
        let (stop, stopped) = watch::channel(false);
        let ctx = Context {
            tasks,
            max_attempts: config.max_attempts,
            visibility: Duration::from_secs(config.visibility_timeout_s),
        };
        let instance = instance.to_owned();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(loops.clamp(1, 2))
            .thread_name("switchboard-tasks")
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name("switchboard-tasks".into())
            .spawn(move || runtime.block_on(run(ctx, instance, loops, stopped)))?;
        Ok(WorkerPool {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops taking work and waits (at most `grace`) for what the loops hold.
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

async fn run(ctx: Context, instance: String, loops: usize, stopped: watch::Receiver<bool>) {
    let mut handles = Vec::new();
    for n in 0..loops {
        let consumer = format!("{instance}-w{n}");
        handles.push(tokio::spawn(worker_loop(
            ctx.clone(),
            consumer,
            stopped.clone(),
        )));
    }
    handles.push(tokio::spawn(maintain(ctx.clone(), stopped.clone())));
    if loops > 0 {
        tracing::info!(workers = loops, "task workers started");
    }
    for handle in handles {
        let _ = handle.await;
    }
}

/// Takes, runs and reports until stopped: up to `BATCH` tasks at a time,
/// taking more as soon as one ends (a slow task holds one place, not the
/// loop). A take is never cut short (what it took is being started): it
/// waits about a second at most, then the loop sees the stop; the loop
/// returns once its tasks have ended.
async fn worker_loop(ctx: Context, consumer: String, stopped: watch::Receiver<bool>) {
    let places = Arc::new(Semaphore::new(BATCH));
    let mut failures = 0u32;
    while !*stopped.borrow() {
        // Wait for a free place before taking anything.
        match places.clone().acquire_owned().await {
            Ok(place) => drop(place),
            Err(_) => return,
        }
        let free = places.available_permits().max(1);
        match ctx.tasks.queue.take(&consumer, free).await {
            Ok(jobs) => {
                failures = 0;
                for job in jobs {
                    let Ok(place) = places.clone().acquire_owned().await else {
                        return;
                    };
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
    let _ = places.acquire_many(BATCH as u32).await;
}

/// Runs one job's attempts; reports the outcome.
async fn run_job(ctx: &Context, consumer: &str, mut job: Job) {
    let name = job.name.clone();
    let outcome = loop {
        metrics().tasks.started.with_label_values(&[&name]).inc();
        let error = match attempt(ctx, &job).await {
            Ok(result) => break Outcome::Done(result),
            Err(error) => error,
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
        wait_before_retry(ctx, consumer, &job).await;
        if let Err(e) = ctx.tasks.queue.retry(&mut job, &error).await {
            tracing::warn!(error = %e, task_id = %job.task_id, "retry not recorded; the task will be taken over");
            return;
        }
    };
    if let Outcome::Done(_) = outcome {
        metrics().tasks.succeeded.with_label_values(&[&name]).inc();
    }
    if let Err(e) = ctx.tasks.queue.finish(&job, &outcome).await {
        tracing::warn!(error = %e, task_id = %job.task_id, "task outcome not recorded; the task will be taken over");
    }
}

/// One attempt, bounded by the visibility timeout (past it another
/// worker would take the task over anyway).
async fn attempt(ctx: &Context, job: &Job) -> Result<Box<serde_json::value::RawValue>, String> {
    let Some(handler) = ctx.tasks.handlers.get(&job.name) else {
        return Err(format!("no handler for {:?} on this worker", job.name));
    };
    let started = Instant::now();
    let result = match tokio::time::timeout(ctx.visibility, handler.run(job)).await {
        Ok(result) => result,
        Err(_) => Err("handler timed out".into()),
    };
    metrics()
        .tasks
        .run_seconds
        .observe(started.elapsed().as_secs_f64());
    result
}

/// The backoff before the next attempt, keeping the job from being taken
/// over meanwhile.
async fn wait_before_retry(ctx: &Context, consumer: &str, job: &Job) {
    let wait = backoff(
        job.attempt,
        (ctx.visibility / 3).max(Duration::from_secs(1)),
    );
    let keep_every = (ctx.visibility / 3).max(Duration::from_millis(500));
    let until = Instant::now() + wait;
    while Instant::now() < until {
        let step = keep_every.min(until.saturating_duration_since(Instant::now()));
        tokio::time::sleep(step).await;
        if let Err(e) = ctx.tasks.queue.keep(consumer, job).await {
            tracing::debug!(error = %e, "could not keep the task during its backoff");
        }
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
