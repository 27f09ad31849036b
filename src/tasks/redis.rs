//! The task queue on Redis (cluster mode), shared by every hub and every
//! `switchboard worker` on the same `redis.prefix`:
//!
//! | key | kind | content |
//! |---|---|---|
//! | `{prefix}:tasks` | stream, group `workers` | one entry per task to run: `task_id`, `name`, `user`, `payload` (JSON) |
//! | `{prefix}:task:{id}` | hash, TTL `tasks.result_ttl_s` | the record: `task_id`, `name`, `user`, `status`, `attempts`, `progress`, `result` (JSON), `error`, `created_at`, `updated_at` (ms), `payload` |
//! | `{prefix}:task_pending:{user}` | set | the user's tasks not finished (the cap) |
//! | `{prefix}:task_idem:{user}:{key}` | string, TTL `tasks.idempotency_ttl_s` | the task id an idempotency key named first |
//! | `{prefix}:tasks:dead` | stream | failed tasks: `task_id`, `name`, `user`, `payload`, `error`, `attempts` |
//!
//! Workers take entries with `XREADGROUP` in batches, start them with
//! `start.lua` (the record says whether to run: a cancelled task is not),
//! `XACK` them when done, and take over entries idle for
//! `tasks.visibility_timeout_s` with `XAUTOCLAIM`. Updates go to the user
//! as `task` frames on `{prefix}:user:{user}`. Every script touches one
//! key (the record, or the user's pending set), so each step is atomic on
//! its own slot; the idempotency key's `SET NX` is the one step that picks
//! the first of two simultaneous submissions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::streams::{StreamId, StreamReadReply};
use redis::Value as RedisValue;
use serde_json::value::RawValue;

use super::record::{outcome_frame, progress_frame, status_frame};
use super::{
    new_task_id, Cancelled, Depth, Job, Outcome, Prepared, Progressed, Submission, TaskError,
    TaskQueue, TaskRecord, TaskResult, TaskStartError,
};
use crate::broker::redis::commands::{Commands, Lua, ScriptCall};
use crate::broker::redis::keys::Keys;
use crate::clock::now_ms;
use crate::config::Config;
use crate::protocol::{MessageId, TaskStatus};

const GROUP: &str = "workers";
/// How long `XREADGROUP` blocks when there is no work: under redis-rs's
/// response timeout (500 ms), or the client gives up on a read Redis still
/// serves, and an entry added then waits in the pending list.
const BLOCK_MS: u64 = 400;
/// Dead letters kept (approximately).
const DEAD_KEPT: usize = 10_000;

struct Scripts {
    cap: Lua,
    start: Lua,
    cancel: Lua,
    progress: Lua,
}

pub struct RedisTasks {
    cmd: Arc<Commands>,
    keys: Keys,
    scripts: Scripts,
    max_pending: usize,
    max_attempts: u32,
    visibility_ms: u64,
    idempotency_ttl_ms: u64,
    result_ttl_ms: u64,
    /// When each worker last looked for tasks to take over.
    last_claim: Mutex<HashMap<String, Instant>>,
    /// Each worker's own connection for its blocking reads.
    readers: Mutex<HashMap<String, deadpool_redis::Connection>>,
    /// Workers that have read their own pending entries since their last
    /// failed read (or start).
    recover: Mutex<std::collections::HashSet<String>>,
    /// Entries this process's workers are running (not to be started
    /// again when a worker reads its own pending entries).
    running: Mutex<std::collections::HashSet<String>>,
}

/// A stream entry's string field.
fn field(entry: &StreamId, name: &str) -> Option<String> {
    entry
        .map
        .get(name)
        .and_then(|v| redis::from_redis_value::<String>(v.clone()).ok())
}

impl RedisTasks {
    /// A pool of its own (workers block on it) and the consumer group,
    /// created when missing (a Redis that is away is retried later).
    pub async fn start(config: &Config) -> Result<RedisTasks, TaskStartError> {
        let cmd = Commands::new(&config.redis).map_err(|e| TaskStartError::Redis(e.to_string()))?;
        let t = &config.tasks;
        let tasks = RedisTasks {
            cmd: Arc::new(cmd),
            keys: Keys::new(&config.redis.prefix),
            scripts: Scripts {
                cap: Lua::new(include_str!("scripts/cap.lua")),
                start: Lua::new(include_str!("scripts/start.lua")),
                cancel: Lua::new(include_str!("scripts/cancel.lua")),
                progress: Lua::new(include_str!("scripts/progress.lua")),
            },
            max_pending: t.max_pending_per_user,
            max_attempts: t.max_attempts,
            visibility_ms: t.visibility_timeout_s.saturating_mul(1000),
            idempotency_ttl_ms: t.idempotency_ttl_s.saturating_mul(1000),
            result_ttl_ms: t.result_ttl_s.saturating_mul(1000),
            last_claim: Mutex::new(HashMap::new()),
            readers: Mutex::new(HashMap::new()),
            recover: Mutex::new(std::collections::HashSet::new()),
            running: Mutex::new(std::collections::HashSet::new()),
        };
        if let Err(e) = tasks.ensure_group().await {
            tracing::warn!(error = %e, "task consumer group not created yet; retrying later");
        }
        Ok(tasks)
    }

    fn stream(&self) -> String {
        format!("{}:tasks", self.keys.prefix())
    }

    fn dead(&self) -> String {
        format!("{}:tasks:dead", self.keys.prefix())
    }

    fn record_key(&self, task_id: &str) -> String {
        format!("{}:task:{task_id}", self.keys.prefix())
    }

    fn pending_key(&self, user: &str) -> String {
        format!("{}:task_pending:{user}", self.keys.prefix())
    }

    fn idempotency_key(&self, user: &str, key: &str) -> String {
        format!("{}:task_idem:{user}:{key}", self.keys.prefix())
    }

    async fn ensure_group(&self) -> TaskResult<()> {
        let stream = self.stream();
        let created: redis::RedisResult<()> = self
            .cmd
            .exec(move |mut c| async move {
                Ok(redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(&stream)
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

    /// The idempotency key's task, or `None` when this submission takes it.
    async fn claim_idempotency(
        &self,
        user: &str,
        key: &str,
        task_id: &str,
    ) -> TaskResult<Option<String>> {
        let (k, id, ttl) = (
            self.idempotency_key(user, key),
            task_id.to_owned(),
            self.idempotency_ttl_ms,
        );
        let (set, existing): (Option<String>, Option<String>) = self
            .cmd
            .exec(move |mut c| async move {
                redis::pipe()
                    .cmd("SET")
                    .arg(&k)
                    .arg(&id)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl)
                    .get(&k)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(match set {
            Some(_) => None,
            None => existing.filter(|e| e != task_id),
        })
    }

    /// Counts the task against the cap, then writes its record; false
    /// when the user is at the cap.
    async fn write_record(&self, task_id: &str, s: &Submission) -> TaskResult<bool> {
        let args = vec![
            self.max_pending.to_string(),
            task_id.to_owned(),
            self.result_ttl_ms.max(self.visibility_ms * 4).to_string(),
        ];
        let keys = vec![self.pending_key(&s.user)];
        let counted: i64 = self.cmd.run_script(&self.scripts.cap, keys, args).await?;
        if counted == 0 {
            return Ok(false);
        }
        let now = now_ms().to_string();
        let key = self.record_key(task_id);
        let fields: Vec<(&str, &str)> = vec![
            ("task_id", task_id),
            ("name", &s.name),
            ("user", &s.user),
            ("status", "queued"),
            ("attempts", "0"),
            ("created_at", &now),
            ("updated_at", &now),
            ("payload", s.payload.get()),
        ];
        let mut pipe = redis::pipe();
        pipe.hset_multiple(&key, &fields).ignore();
        pipe.pexpire(&key, self.result_ttl_ms as i64).ignore();
        self.run_pipe(pipe).await?;
        Ok(true)
    }

    async fn delete(&self, keys: &[String]) -> TaskResult<()> {
        let keys = keys.to_vec();
        self.cmd
            .exec(move |mut c| async move {
                redis::cmd("DEL").arg(&keys).query_async::<()>(&mut c).await
            })
            .await?;
        Ok(())
    }

    fn record_from(fields: HashMap<String, String>) -> Option<TaskRecord> {
        let status: TaskStatus =
            serde_json::from_value(serde_json::Value::String(fields.get("status")?.clone()))
                .ok()?;
        let int = |k: &str| fields.get(k).and_then(|v| v.parse::<u64>().ok());
        Some(TaskRecord {
            task_id: fields.get("task_id")?.clone(),
            name: fields.get("name")?.clone(),
            user: fields.get("user")?.clone(),
            status,
            attempts: int("attempts").unwrap_or(0) as u32,
            progress: int("progress").map(|p| p.min(100) as u8),
            result: fields
                .get("result")
                .and_then(|r| RawValue::from_string(r.clone()).ok()),
            error: fields.get("error").cloned(),
            created_at: int("created_at").unwrap_or(0),
            updated_at: int("updated_at").unwrap_or(0),
        })
    }

    /// Entries for `consumer`: taken over from silent workers now and
    /// then, else new ones (blocking a second when there are none).
    async fn read_entries(&self, consumer: &str, max: usize) -> TaskResult<Vec<StreamId>> {
        let claim_due = {
            let mut last = self
                .last_claim
                .lock()
                .map_err(|_| TaskError::Internal("poisoned".into()))?;
            let due = last
                .get(consumer)
                .is_none_or(|t| t.elapsed().as_millis() as u64 >= self.visibility_ms / 2);
            if due {
                last.insert(consumer.to_owned(), Instant::now());
            }
            due
        };
        if claim_due {
            let claimed = self.autoclaim(consumer, max).await?;
            if !claimed.is_empty() {
                return Ok(claimed);
            }
        }
        // This consumer's own pending entries first (after a start or a
        // failed read, some may have been delivered to it and not seen),
        // then new ones.
        let own = self
            .recover
            .lock()
            .map_err(|_| TaskError::Internal("poisoned".into()))?
            .insert(consumer.to_owned());
        let reply = self
            .read_group(consumer, max, if own { "0" } else { ">" })
            .await;
        if reply.is_err() {
            if let Ok(mut recover) = self.recover.lock() {
                recover.remove(consumer);
            }
        }
        let mut entries: Vec<StreamId> = reply?
            .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
            .unwrap_or_default();
        if own {
            if let Ok(running) = self.running.lock() {
                entries.retain(|e| !running.contains(&e.id));
            }
        }
        Ok(entries)
    }

    /// `XREADGROUP` on the consumer's own connection (it blocks a second
    /// when there is nothing new): `from` `>` for new entries, `0` for the
    /// consumer's own pending ones.
    async fn read_group(
        &self,
        consumer: &str,
        max: usize,
        from: &str,
    ) -> TaskResult<Option<StreamReadReply>> {
        let held = self
            .readers
            .lock()
            .map_err(|_| TaskError::Internal("poisoned".into()))?
            .remove(consumer);
        let mut conn = match held {
            Some(conn) => conn,
            None => self.cmd.dedicated().await?,
        };
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(GROUP)
            .arg(consumer)
            .arg("COUNT")
            .arg(max);
        if from == ">" {
            cmd.arg("BLOCK").arg(BLOCK_MS);
        }
        cmd.arg("STREAMS").arg(self.stream()).arg(from);
        let limit = Duration::from_millis(BLOCK_MS) + Duration::from_secs(2);
        let reply = match tokio::time::timeout(limit, cmd.query_async(&mut *conn)).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(e)) => return Err(crate::broker::redis::commands::classify(&e).into()),
            Err(_) => {
                return Err(TaskError::Unavailable(
                    "reading the task stream timed out".into(),
                ))
            }
        };
        if let Ok(mut readers) = self.readers.lock() {
            readers.insert(consumer.to_owned(), conn);
        }
        Ok(reply)
    }

    /// `XAUTOCLAIM`: entries idle for the visibility timeout.
    async fn autoclaim(&self, consumer: &str, max: usize) -> TaskResult<Vec<StreamId>> {
        let (stream, consumer, idle) = (self.stream(), consumer.to_owned(), self.visibility_ms);
        let reply: redis::streams::StreamAutoClaimReply = self
            .cmd
            .exec(move |mut c| async move {
                redis::cmd("XAUTOCLAIM")
                    .arg(&stream)
                    .arg(GROUP)
                    .arg(&consumer)
                    .arg(idle)
                    .arg("0-0")
                    .arg("COUNT")
                    .arg(max)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        if !reply.claimed.is_empty() {
            tracing::info!(
                tasks = reply.claimed.len(),
                "taking over tasks whose worker went silent"
            );
        }
        Ok(reply.claimed)
    }

    /// Starts a batch of entries in one round trip; returns the jobs to run.
    async fn start_entries(&self, entries: Vec<StreamId>) -> TaskResult<Vec<Job>> {
        struct Taken {
            entry_id: String,
            task_id: String,
            name: String,
            user: String,
            payload: String,
        }
        let taken: Vec<Taken> = entries
            .into_iter()
            .map(|e| Taken {
                task_id: field(&e, "task_id").unwrap_or_default(),
                name: field(&e, "name").unwrap_or_default(),
                user: field(&e, "user").unwrap_or_default(),
                payload: field(&e, "payload").unwrap_or_else(|| "null".into()),
                entry_id: e.id,
            })
            .collect();
        let now = now_ms().to_string();
        let calls: Vec<ScriptCall<'_>> = taken
            .iter()
            .map(|t| {
                let lost = Outcome::Failed("worker lost".into());
                ScriptCall {
                    script: &self.scripts.start,
                    keys: vec![self.record_key(&t.task_id)],
                    args: vec![
                        now.clone(),
                        self.max_attempts.to_string(),
                        self.keys.user_channel(&t.user),
                        status_frame(&t.task_id, TaskStatus::Running).to_string(),
                        outcome_frame(&t.task_id, &lost).to_string(),
                    ],
                }
            })
            .collect();
        let replies = self.cmd.run_scripts(&calls).await?;
        let mut jobs = Vec::new();
        let mut skipped = Vec::new();
        for (t, reply) in taken.into_iter().zip(replies) {
            match reply {
                RedisValue::Int(attempt) if attempt > 0 => {
                    if let Ok(mut running) = self.running.lock() {
                        running.insert(t.entry_id.clone());
                    }
                    jobs.push(Job {
                        task_id: t.task_id,
                        name: t.name,
                        user: t.user,
                        payload: RawValue::from_string(t.payload).unwrap_or_else(|_| {
                            RawValue::from_string("null".into()).expect("null")
                        }),
                        attempt: attempt as u32,
                        token: t.entry_id,
                    })
                }
                RedisValue::Int(-2) => {
                    let job = Job {
                        task_id: t.task_id,
                        name: t.name,
                        user: t.user,
                        payload: RawValue::from_string(t.payload).unwrap_or_else(|_| {
                            RawValue::from_string("null".into()).expect("null")
                        }),
                        attempt: self.max_attempts,
                        token: t.entry_id,
                    };
                    self.bury(&job, "worker lost").await?;
                }
                _ => skipped.push(t.entry_id),
            }
        }
        if !skipped.is_empty() {
            self.ack(&skipped).await?;
        }
        Ok(jobs)
    }

    async fn ack(&self, entry_ids: &[String]) -> TaskResult<()> {
        let (stream, ids) = (self.stream(), entry_ids.to_vec());
        self.cmd
            .exec(move |mut c| async move {
                redis::cmd("XACK")
                    .arg(&stream)
                    .arg(GROUP)
                    .arg(&ids)
                    .query_async::<()>(&mut c)
                    .await
            })
            .await?;
        Ok(())
    }

    /// A task whose attempts are exhausted (already marked failed): acked,
    /// uncounted, copied to the dead letters.
    async fn bury(&self, job: &Job, error: &str) -> TaskResult<()> {
        let mut pipe = redis::pipe();
        self.end_pipe(&mut pipe, job);
        self.dead_letter(&mut pipe, job, error);
        self.run_pipe(pipe).await
    }

    /// XACK and uncount: the end of every job.
    fn end_pipe(&self, pipe: &mut redis::Pipeline, job: &Job) {
        if let Ok(mut running) = self.running.lock() {
            running.remove(&job.token);
        }
        pipe.cmd("XACK")
            .arg(self.stream())
            .arg(GROUP)
            .arg(&job.token)
            .ignore();
        pipe.srem(self.pending_key(&job.user), &job.task_id)
            .ignore();
    }

    fn dead_letter(&self, pipe: &mut redis::Pipeline, job: &Job, error: &str) {
        pipe.cmd("XADD")
            .arg(self.dead())
            .arg("MAXLEN")
            .arg("~")
            .arg(DEAD_KEPT)
            .arg("*")
            .arg(&[
                ("task_id", job.task_id.as_str()),
                ("name", &job.name),
                ("user", &job.user),
                ("payload", job.payload.get()),
                ("error", error),
                ("attempts", &job.attempt.to_string()),
            ])
            .ignore();
    }

    async fn run_pipe(&self, pipe: redis::Pipeline) -> TaskResult<()> {
        self.cmd
            .exec(move |mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await?;
        Ok(())
    }

    /// The group's numbers, the oldest pending entry, the dead letters' length.
    async fn group_state(&self) -> TaskResult<(HashMap<String, RedisValue>, Option<String>, u64)> {
        let (stream, dead) = (self.stream(), self.dead());
        let (groups, oldest, dead_len): (Vec<HashMap<String, RedisValue>>, RedisValue, u64) = self
            .cmd
            .exec(move |mut c| async move {
                redis::pipe()
                    .cmd("XINFO")
                    .arg("GROUPS")
                    .arg(&stream)
                    .cmd("XPENDING")
                    .arg(&stream)
                    .arg(GROUP)
                    .arg("-")
                    .arg("+")
                    .arg(1)
                    .xlen(&dead)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        let name = |g: &HashMap<String, RedisValue>| {
            g.get("name")
                .and_then(|n| redis::from_redis_value::<String>(n.clone()).ok())
        };
        let group = groups
            .into_iter()
            .find(|g| name(g).as_deref() == Some(GROUP))
            .unwrap_or_default();
        let oldest_pending = match oldest {
            RedisValue::Array(items) => items.into_iter().next().and_then(|first| match first {
                RedisValue::Array(entry) => entry
                    .into_iter()
                    .next()
                    .and_then(|id| redis::from_redis_value::<String>(id).ok()),
                _ => None,
            }),
            _ => None,
        };
        Ok((group, oldest_pending, dead_len))
    }

    /// Trims what every consumer has acknowledged: entries older than the
    /// oldest one pending or, with none pending, up to the last delivered.
    async fn trim(&self) -> TaskResult<Depth> {
        let (group, oldest_pending, dead) = self.group_state().await?;
        let int = |k: &str| {
            group
                .get(k)
                .and_then(|v| redis::from_redis_value::<u64>(v.clone()).ok())
        };
        let depth = Depth {
            queued: int("lag").unwrap_or(0),
            running: int("pending").unwrap_or(0),
            dead,
        };
        let last_delivered = group
            .get("last-delivered-id")
            .and_then(|v| redis::from_redis_value::<String>(v.clone()).ok())
            .and_then(|id| id.parse::<MessageId>().ok())
            .filter(|id| *id != MessageId::default());
        let min_id = oldest_pending.or_else(|| {
            last_delivered.map(|id| {
                let next = MessageId {
                    ms: id.ms,
                    seq: id.seq.saturating_add(1),
                };
                next.to_string()
            })
        });
        if let Some(min_id) = min_id {
            let stream = self.stream();
            self.cmd
                .exec(move |mut c| async move {
                    redis::cmd("XTRIM")
                        .arg(&stream)
                        .arg("MINID")
                        .arg(&min_id)
                        .query_async::<()>(&mut c)
                        .await
                })
                .await?;
        }
        Ok(depth)
    }
}

#[async_trait]
impl TaskQueue for RedisTasks {
    async fn prepare(&self, submission: Submission) -> TaskResult<Prepared> {
        let task_id = new_task_id();
        if let Some(key) = &submission.idempotency_key {
            if let Some(first) = self
                .claim_idempotency(&submission.user, key, &task_id)
                .await?
            {
                return Ok(Prepared {
                    task_id: first,
                    created: false,
                    submission,
                });
            }
        }
        if !self.write_record(&task_id, &submission).await? {
            if let Some(key) = &submission.idempotency_key {
                let _ = self
                    .delete(&[self.idempotency_key(&submission.user, key)])
                    .await;
            }
            return Err(TaskError::TooManyPending(self.max_pending));
        }
        Ok(Prepared {
            task_id,
            created: true,
            submission,
        })
    }

    async fn enqueue(&self, prepared: &Prepared) -> TaskResult<()> {
        let s = &prepared.submission;
        let stream = self.stream();
        let fields = [
            ("task_id", prepared.task_id.clone()),
            ("name", s.name.clone()),
            ("user", s.user.clone()),
            ("payload", s.payload.get().to_owned()),
        ];
        self.cmd
            .exec(move |mut c| async move {
                redis::cmd("XADD")
                    .arg(&stream)
                    .arg("*")
                    .arg(&fields)
                    .query_async::<String>(&mut c)
                    .await
            })
            .await?;
        Ok(())
    }

    async fn record(&self, task_id: &str) -> TaskResult<Option<TaskRecord>> {
        let key = self.record_key(task_id);
        let fields: HashMap<String, String> =
            self.cmd
                .exec(move |mut c| async move {
                    redis::cmd("HGETALL").arg(&key).query_async(&mut c).await
                })
                .await?;
        Ok(Self::record_from(fields))
    }

    async fn cancel(&self, task_id: &str, user: &str) -> TaskResult<Cancelled> {
        let outcome = Outcome::Failed("cancelled".into());
        let args = vec![
            user.to_owned(),
            now_ms().to_string(),
            self.keys.user_channel(user),
            outcome_frame(task_id, &outcome).to_string(),
        ];
        let keys = vec![self.record_key(task_id)];
        let n: i64 = self
            .cmd
            .run_script(&self.scripts.cancel, keys, args)
            .await?;
        match n {
            1 => {
                let (key, id) = (self.pending_key(user), task_id.to_owned());
                self.cmd
                    .exec(move |mut c| async move {
                        redis::cmd("SREM")
                            .arg(&key)
                            .arg(&id)
                            .query_async::<()>(&mut c)
                            .await
                    })
                    .await?;
                Ok(Cancelled::Cancelled)
            }
            0 => Ok(Cancelled::Started),
            _ => Ok(Cancelled::NotFound),
        }
    }

    async fn progress(
        &self,
        task_id: &str,
        progress: u8,
        message: Option<&str>,
    ) -> TaskResult<Progressed> {
        let args = vec![
            progress.to_string(),
            now_ms().to_string(),
            self.keys.prefix().to_owned(),
            progress_frame(task_id, progress, message).to_string(),
        ];
        let keys = vec![self.record_key(task_id)];
        let n: i64 = self
            .cmd
            .run_script(&self.scripts.progress, keys, args)
            .await?;
        Ok(match n {
            1 => Progressed::Reported,
            0 => Progressed::NotRunning,
            _ => Progressed::NotFound,
        })
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

    async fn keep(&self, consumer: &str, job: &Job) -> TaskResult<()> {
        let (stream, consumer, id) = (self.stream(), consumer.to_owned(), job.token.clone());
        self.cmd
            .exec(move |mut c| async move {
                redis::cmd("XCLAIM")
                    .arg(&stream)
                    .arg(GROUP)
                    .arg(&consumer)
                    .arg(0)
                    .arg(&id)
                    .arg("JUSTID")
                    .query_async::<()>(&mut c)
                    .await
            })
            .await?;
        Ok(())
    }

    async fn retry(&self, job: &mut Job, error: &str) -> TaskResult<()> {
        let key = self.record_key(&job.task_id);
        let mut pipe = redis::pipe();
        pipe.hincr(&key, "attempts", 1);
        pipe.hset_multiple(
            &key,
            &[
                ("status", "running"),
                ("error", error),
                ("updated_at", &now_ms().to_string()),
            ],
        )
        .ignore();
        pipe.publish(
            self.keys.user_channel(&job.user),
            status_frame(&job.task_id, TaskStatus::Running).to_string(),
        )
        .ignore();
        let (attempt,): (u32,) = self
            .cmd
            .exec(move |mut c| async move { pipe.query_async(&mut c).await })
            .await?;
        job.attempt = attempt;
        Ok(())
    }

    async fn finish(&self, job: &Job, outcome: &Outcome) -> TaskResult<()> {
        let key = self.record_key(&job.task_id);
        let now = now_ms().to_string();
        let mut pipe = redis::pipe();
        match outcome {
            Outcome::Done(result) => {
                pipe.hset_multiple(
                    &key,
                    &[
                        ("status", "done"),
                        ("result", result.get()),
                        ("updated_at", &now),
                    ],
                )
                .ignore();
                pipe.hdel(&key, "error").ignore();
            }
            Outcome::Failed(error) => {
                pipe.hset_multiple(
                    &key,
                    &[
                        ("status", "failed"),
                        ("error", error.as_str()),
                        ("updated_at", &now),
                    ],
                )
                .ignore();
                self.dead_letter(&mut pipe, job, error);
            }
        }
        pipe.pexpire(&key, self.result_ttl_ms as i64).ignore();
        pipe.publish(
            self.keys.user_channel(&job.user),
            outcome_frame(&job.task_id, outcome).to_string(),
        )
        .ignore();
        self.end_pipe(&mut pipe, job);
        self.run_pipe(pipe).await
    }

    async fn maintain(&self) -> TaskResult<Depth> {
        self.trim().await
    }

    async fn ready(&self) -> Result<(), String> {
        let pong: TaskResult<String> = self
            .cmd
            .exec(|mut c| async move { redis::cmd("PING").query_async(&mut c).await })
            .await
            .map_err(TaskError::from);
        pong.map(|_| ()).map_err(|_| "redis unreachable".to_owned())
    }
}
