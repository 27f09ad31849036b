//! The task queue on Redis (`broker.kind = "redis"`), shared by every hub
//! and every `switchboard worker` on the same `redis.prefix`, on the Redis
//! layer ([`crate::redis`]); the keys are [`crate::redis::keys::TaskKeys`],
//! all under one hash tag.
//!
//! - Submitting ([`submit`]): `submit.lua` writes the idempotency key, the
//!   user's pending entry and the record in one step, provisionally; after
//!   the client's ack `enqueue.lua` adds the stream entry and makes them
//!   lasting. A failed enqueue is undone in one step (`unsubmit.lua`), and
//!   what even that could not undo expires with the provisional TTL.
//! - Working ([`claim`], [`finish`]): a worker reads only as many entries
//!   as it can start now (`XREADGROUP … COUNT`), starts each with
//!   `start.lua` (a cancelled task is skipped), renews its claim while the
//!   attempt runs (`renew.lua`), and ends it with `finish.lua`; every write
//!   of an attempt is fenced by its number, so a worker that lost its claim
//!   writes nothing. Entries idle for `tasks.visibility_timeout_s` (their
//!   worker died) are taken over with `XAUTOCLAIM`.
//! - Keeping ([`finish`]): an ended task's record keeps its result or
//!   error, not its payload, for `tasks.result_ttl_s`, within
//!   `tasks.max_record_bytes_per_user` per user (the oldest go first).
//! - Housekeeping ([`maintain`]): trimming the stream, the gauges.
//!
//! Every script touches keys of the one `{tasks}` slot only; updates go to
//! the user as `task` frames on the user's channel, published after the
//! script that made the change (the channel is in the user's slot).

mod claim;
mod finish;
mod maintain;
mod submit;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;

use super::{
    Cancelled, Depth, Job, Outcome, Prepared, Progressed, Submission, TaskError, TaskQueue,
    TaskRecord, TaskResult, TaskStartError,
};
use crate::config::Config;
use crate::redis::keys::{TaskKeys, TASK_GROUP as GROUP};
use crate::redis::scripts::Lua;
use crate::redis::Redis;

/// Dead letters kept (approximately).
const DEAD_KEPT: usize = 10_000;

/// What a worker process knows of its own reads.
#[derive(Default)]
struct Claims {
    /// When each consumer last looked for tasks to take over.
    last_claim: HashMap<String, Instant>,
    /// Each consumer's own connection for its blocking reads.
    readers: HashMap<String, crate::redis::conn::Pooled>,
    /// Consumers that have read their own pending entries since their last
    /// failed read (or start).
    recovered: HashSet<String>,
    /// Entries this process's workers are running (not to be started
    /// again when a consumer reads its own pending entries).
    running: HashSet<String>,
}

pub struct RedisTasks {
    redis: Arc<Redis>,
    keys: TaskKeys,
    max_pending: usize,
    max_attempts: u32,
    visibility_ms: u64,
    idempotency_ttl_ms: u64,
    result_ttl_ms: u64,
    max_record_bytes: usize,
    claims: Mutex<Claims>,
}

impl RedisTasks {
    /// A pool of its own (workers block on it) and the consumer group,
    /// created when missing (a Redis that is away is retried later).
    pub async fn start(config: &Config) -> Result<RedisTasks, TaskStartError> {
        let redis = Redis::new(&config.redis).map_err(TaskStartError::Redis)?;
        let t = &config.tasks;
        let tasks = RedisTasks {
            redis: Arc::new(redis),
            keys: TaskKeys::new(&config.redis.prefix),
            max_pending: t.max_pending_per_user,
            max_attempts: t.max_attempts,
            visibility_ms: t.visibility_timeout_s.saturating_mul(1000),
            idempotency_ttl_ms: t.idempotency_ttl_s.saturating_mul(1000),
            result_ttl_ms: t.result_ttl_s.saturating_mul(1000),
            max_record_bytes: t.max_record_bytes_per_user,
            claims: Mutex::new(Claims::default()),
        };
        if let Err(e) = tasks.ensure_group().await {
            tracing::warn!(error = %e, "task consumer group not created yet; retrying later");
        }
        Ok(tasks)
    }

    fn claims(&self) -> TaskResult<std::sync::MutexGuard<'_, Claims>> {
        self.claims
            .lock()
            .map_err(|_| TaskError::Internal("task claims poisoned".into()))
    }

    async fn ensure_group(&self) -> TaskResult<()> {
        let queue = self.keys.queue();
        let created: redis::RedisResult<()> = self
            .redis
            .exec(move |mut c| async move {
                Ok(redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(&queue)
                    .arg(GROUP)
                    .arg("0")
                    .arg("MKSTREAM")
                    .query_async::<()>(&mut c)
                    .await)
            })
            .await?;
        match created {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(TaskError::Internal(e.to_string())),
        }
    }

    async fn run_script<T: redis::FromRedisValue>(
        &self,
        script: &Lua,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> TaskResult<T> {
        Ok(self.redis.run_script(script, keys, args).await?)
    }

    /// Tells the user about its task (best effort: the record is the
    /// truth, and `task_status` reads it).
    async fn tell(&self, user: &str, frame: bytestring::ByteString) {
        let channel = self.keys.user_channel(user);
        if let Err(e) = self.redis.publish(channel, frame.to_string()).await {
            tracing::debug!(error = %e, "task update not published");
        }
    }
}

#[async_trait]
impl TaskQueue for RedisTasks {
    async fn prepare(&self, submission: Submission) -> TaskResult<Prepared> {
        self.submit(submission).await
    }

    async fn enqueue(&self, prepared: &Prepared) -> TaskResult<()> {
        self.hand_over(prepared).await
    }

    async fn record(&self, task_id: &str) -> TaskResult<Option<TaskRecord>> {
        self.read_record(task_id).await
    }

    async fn cancel(&self, task_id: &str, user: &str) -> TaskResult<Cancelled> {
        self.cancel_queued(task_id, user).await
    }

    async fn progress(
        &self,
        task_id: &str,
        progress: u8,
        message: Option<&str>,
    ) -> TaskResult<Progressed> {
        self.report_progress(task_id, progress, message).await
    }

    async fn take(&self, consumer: &str, max: usize) -> TaskResult<Vec<Job>> {
        let entries = match self.read_entries(consumer, max).await {
            Ok(entries) => entries,
            Err(e) => {
                // A stream or group deleted under us (FLUSHALL): make it again.
                let _ = self.ensure_group().await;
                return Err(e);
            }
        };
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        self.start_entries(entries).await
    }

    async fn renew(&self, consumer: &str, job: &Job) -> TaskResult<bool> {
        self.renew_claim(consumer, job).await
    }

    async fn retry(&self, job: &mut Job, error: &str) -> TaskResult<bool> {
        self.next_attempt(job, error).await
    }

    async fn finish(&self, job: &Job, outcome: &Outcome) -> TaskResult<bool> {
        self.end(job, outcome).await
    }

    async fn maintain(&self) -> TaskResult<Depth> {
        self.trim().await
    }

    async fn ready(&self) -> Result<(), String> {
        let pong: TaskResult<String> = self
            .redis
            .exec(|mut c| async move { redis::cmd("PING").query_async(&mut c).await })
            .await
            .map_err(TaskError::from);
        pong.map(|_| ()).map_err(|_| "redis unreachable".to_owned())
    }
}
