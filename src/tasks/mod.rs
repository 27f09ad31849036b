//! Async tasks (docs/protocol.md §8): a client submits work by name, gets
//! an id at once, and follows the task's life in `task` frames on every
//! connection of its user, on any instance.
//!
//! - [`TaskQueue`]: submitting, the records, cancelling, progress, and what
//!   workers take and report; [`memory::MemoryTasks`] (one process) and
//!   [`redis::RedisTasks`] (a stream with consumer group `workers`, the
//!   records, dead letters: [`redis::keys`]).
//! - [`handlers`]: what running a task means, one file per kind.
//! - [`worker`]: the worker loops, on a runtime thread of their own in the
//!   hub process, or alone in `switchboard worker`.
//!
//! Submitting is two steps, [`TaskQueue::prepare`] (id, idempotency key,
//! the per-user cap, the record: one atomic step) and
//! [`TaskQueue::enqueue`]: the session acks in between, so no update of a
//! task can reach the client before the ack that names it. An enqueue that
//! fails undoes the submission.
//!
//! What the user sees is what happens: `running` means a handler has
//! started (a worker takes only what it can start at once, so a task
//! waiting for a free worker is `queued` and can be cancelled, and a
//! cancelled task never runs); a running attempt keeps its claim, so no
//! other worker runs it meanwhile, and every write of an attempt is fenced
//! by its number; an ended task's record keeps its result or error, not
//! its payload, within `tasks.max_record_bytes_per_user` per user.

pub mod handlers;
pub mod memory;
pub mod record;
pub mod redis;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::value::RawValue;

pub use self::record::TaskRecord;
use crate::broker::Broker;
use crate::config::{BrokerKind, Config};
use crate::protocol::{ErrorCode, ErrorReply};

/// Why a task operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// The user already has this many (`tasks.max_pending_per_user`)
    /// tasks not finished.
    #[error("too many pending tasks (at most {0})")]
    TooManyPending(usize),
    /// The queue's backend cannot be reached.
    #[error("task queue unavailable: {0}")]
    Unavailable(String),
    #[error("task queue: {0}")]
    Internal(String),
}

impl From<crate::broker::BrokerError> for TaskError {
    fn from(e: crate::broker::BrokerError) -> TaskError {
        match e {
            crate::broker::BrokerError::Unavailable(e) => TaskError::Unavailable(e),
            other => TaskError::Internal(other.to_string()),
        }
    }
}

pub type TaskResult<T> = Result<T, TaskError>;

/// The one way a task queue failure reaches a client or an API caller.
impl From<&TaskError> for ErrorReply {
    fn from(e: &TaskError) -> ErrorReply {
        match e {
            TaskError::TooManyPending(max) => ErrorReply::new(
                ErrorCode::LimitExceeded,
                format!("at most {max} tasks may be pending per user"),
            ),
            TaskError::Unavailable(detail) => {
                tracing::warn!(error = %detail, "request failed: task queue unavailable");
                ErrorReply::unavailable("task queue")
            }
            TaskError::Internal(detail) => {
                tracing::error!(error = %detail, "request failed: task queue error");
                ErrorReply::internal()
            }
        }
    }
}

/// A client's `task` frame, checked.
#[derive(Debug, Clone)]
pub struct Submission {
    pub name: String,
    pub user: String,
    pub payload: Box<RawValue>,
    pub idempotency_key: Option<String>,
}

/// A submission with its id; `created` is false when the idempotency key
/// named an earlier task (then nothing is enqueued).
#[derive(Debug, Clone)]
pub struct Prepared {
    pub task_id: String,
    pub created: bool,
    pub submission: Submission,
}

/// What `task_cancel` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancelled {
    Cancelled,
    /// No such task of this user's.
    NotFound,
    /// Running or finished: not interrupted.
    Started,
}

/// What a progress report found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progressed {
    Reported,
    NotFound,
    NotRunning,
}

/// A task a worker holds, started (status `running`, `attempt` counted).
#[derive(Debug, Clone)]
pub struct Job {
    pub task_id: String,
    pub name: String,
    pub user: String,
    pub payload: Box<RawValue>,
    /// This attempt's number, from 1.
    pub attempt: u32,
    /// The backend's handle on the job (the stream entry id in Redis).
    pub token: String,
}

/// How an attempt ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    Done(Box<RawValue>),
    Failed(String),
}

/// How many tasks wait, run and died, for the gauges.
#[derive(Debug, Default, Clone, Copy)]
pub struct Depth {
    pub queued: u64,
    pub running: u64,
    pub dead: u64,
}

/// The task queue of a cluster (or of one process).
#[async_trait]
pub trait TaskQueue: Send + Sync {
    /// Gives the submission an id (or the earlier task's, for a repeated
    /// idempotency key), checks the user's cap and writes the record
    /// (`queued`). Nothing runs until [`Self::enqueue`].
    async fn prepare(&self, submission: Submission) -> TaskResult<Prepared>;
    /// Makes a prepared task available to workers. When that fails, the
    /// submission is undone (record, pending entry, idempotency key) and
    /// the task will never run.
    async fn enqueue(&self, prepared: &Prepared) -> TaskResult<()>;
    async fn record(&self, task_id: &str) -> TaskResult<Option<TaskRecord>>;
    /// Cancels `user`'s task if it has not started (it ends `failed` with
    /// error `cancelled`).
    async fn cancel(&self, task_id: &str, user: &str) -> TaskResult<Cancelled>;
    /// A backend's progress report (0–100) for a running task.
    async fn progress(
        &self,
        task_id: &str,
        progress: u8,
        message: Option<&str>,
    ) -> TaskResult<Progressed>;

    /// Up to `max` tasks for worker `consumer` (as many as it can start
    /// now), started; waits a little (under a second) when there is none.
    /// Tasks whose worker went silent for the visibility timeout are taken
    /// over here too.
    async fn take(&self, consumer: &str, max: usize) -> TaskResult<Vec<Job>>;
    /// Keeps a job's claim while it runs (or waits to be retried), so that
    /// no other worker takes it over; `false` when another worker has it.
    async fn renew(&self, consumer: &str, job: &Job) -> TaskResult<bool>;
    /// The next attempt of a job begins (counted, `running` again);
    /// `false` when the claim was lost.
    async fn retry(&self, job: &mut Job, error: &str) -> TaskResult<bool>;
    /// The job ended: `done` with a result, or `failed` for good (copied
    /// to the dead letters); `false` when the claim was lost (nothing is
    /// written).
    async fn finish(&self, job: &Job, outcome: &Outcome) -> TaskResult<bool>;
    /// Housekeeping (trimming, expiry); returns the depth for the gauges.
    async fn maintain(&self) -> TaskResult<Depth>;
    /// `Ok` when the queue's backend answers.
    async fn ready(&self) -> Result<(), String>;
}

/// The task queue and the configured handlers, as the hub and the workers
/// use them.
#[derive(Clone)]
pub struct Tasks {
    pub queue: Arc<dyn TaskQueue>,
    pub handlers: Arc<handlers::Handlers>,
}

impl Tasks {
    /// The configured queue: in process with the memory broker (updates
    /// delivered through it), on Redis in cluster mode.
    pub async fn start(config: &Config, broker: Option<&Broker>) -> Result<Tasks, TaskStartError> {
        let handlers = Arc::new(handlers::Handlers::from_config(&config.tasks)?);
        let queue: Arc<dyn TaskQueue> = match (config.broker.kind, broker) {
            (BrokerKind::Memory, Some(broker)) => Arc::new(memory::MemoryTasks::new(
                &config.tasks,
                broker.messages.clone(),
            )),
            (BrokerKind::Memory, None) => return Err(TaskStartError::NeedsRedis),
            (BrokerKind::Redis, _) => Arc::new(redis::RedisTasks::start(config).await?),
        };
        Ok(Tasks { queue, handlers })
    }
}

/// Why the task system could not start.
#[derive(Debug, thiserror::Error)]
pub enum TaskStartError {
    #[error("switchboard worker needs broker.kind = \"redis\": with the memory broker tasks run inside the hub (tasks.workers)")]
    NeedsRedis,
    #[error(transparent)]
    Handler(#[from] handlers::HandlerError),
    #[error("tasks: {0}")]
    Redis(String),
}

/// Backoff before retry `attempt` (1, 2, 4… seconds), at most `cap`.
pub fn backoff(attempt: u32, cap: Duration) -> Duration {
    let secs = 1u64 << attempt.saturating_sub(1).min(16);
    Duration::from_secs(secs).min(cap)
}

/// A new task id.
pub fn new_task_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}
