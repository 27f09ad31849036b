//! Submitting, cancelling, progress reports and reading records: what a
//! session or the admin API asks of the task queue.

use std::collections::HashMap;

use redis::Value as RedisValue;
use serde_json::value::RawValue;

use super::RedisTasks;
use crate::clock::now_ms;
use crate::protocol::TaskStatus;
use crate::tasks::record::{outcome_frame, progress_frame};
use crate::tasks::{
    new_task_id, Cancelled, Outcome, Prepared, Progressed, Submission, TaskError, TaskRecord,
    TaskResult,
};

/// How long a submission stays provisional: past it, a task whose enqueue
/// never happened (nor its undo) is forgotten by itself.
const PROVISIONAL_MS: u64 = 60_000;

impl RedisTasks {
    /// The keys of a submission's one step: record, pending set, and the
    /// idempotency key when there is one.
    fn submission_keys(&self, task_id: &str, s: &Submission) -> Vec<String> {
        let mut keys = vec![self.keys.record(task_id), self.keys.pending(&s.user)];
        if let Some(key) = &s.idempotency_key {
            keys.push(self.keys.idempotency(&s.user, key));
        }
        keys
    }

    pub(super) async fn submit(&self, submission: Submission) -> TaskResult<Prepared> {
        let task_id = new_task_id();
        let keys = self.submission_keys(&task_id, &submission);
        let pending_ttl = self.result_ttl_ms.max(self.visibility_ms * 4);
        let args = vec![
            task_id.clone(),
            submission.name.clone(),
            submission.user.clone(),
            submission.payload.get().to_owned(),
            now_ms().to_string(),
            self.max_pending.to_string(),
            PROVISIONAL_MS.to_string(),
            pending_ttl.to_string(),
        ];
        let (code, id): (i64, String) = self
            .redis
            .run_script_durable(&self.redis.scripts.submit, keys, args)
            .await?;
        match code {
            1 => Ok(Prepared {
                task_id,
                created: true,
                submission,
            }),
            0 => {
                // The earlier task of this key; never another user's.
                let key = self.keys.record(&id);
                let owner: Option<String> = self
                    .redis
                    .exec(move |mut c| async move {
                        redis::cmd("HGET")
                            .arg(&key)
                            .arg("user")
                            .query_async(&mut c)
                            .await
                    })
                    .await?;
                if owner.is_some_and(|owner| owner != submission.user) {
                    return Err(TaskError::Internal(format!(
                        "idempotency key names task {id} of another user"
                    )));
                }
                Ok(Prepared {
                    task_id: id,
                    created: false,
                    submission,
                })
            }
            _ => Err(TaskError::TooManyPending(self.max_pending)),
        }
    }

    /// Enqueues a prepared task; when that fails, undoes the submission in
    /// one step (unless the task has started: then the enqueue did happen).
    pub(super) async fn hand_over(&self, prepared: &Prepared) -> TaskResult<()> {
        let s = &prepared.submission;
        let mut keys = vec![
            self.keys.record(&prepared.task_id),
            self.keys.queue(),
            self.keys.pending(&s.user),
        ];
        if let Some(key) = &s.idempotency_key {
            keys.push(self.keys.idempotency(&s.user, key));
        }
        let args = vec![
            prepared.task_id.clone(),
            self.result_ttl_ms.to_string(),
            self.idempotency_ttl_ms.to_string(),
        ];
        let enqueued: TaskResult<i64> = self
            .run_script(&self.redis.scripts.enqueue, keys, args)
            .await;
        let error = match enqueued {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        tracing::warn!(error = %error, task_id = %prepared.task_id, "enqueue failed: undoing the submission");
        let keys = self.submission_keys(&prepared.task_id, s);
        let undone: TaskResult<i64> = self
            .run_script(
                &self.redis.scripts.unsubmit,
                keys,
                vec![prepared.task_id.clone()],
            )
            .await;
        match undone {
            Ok(0) => Ok(()),
            Ok(_) => Err(error),
            Err(e) => {
                tracing::warn!(error = %e, task_id = %prepared.task_id, "undo failed: the submission expires by itself");
                Err(error)
            }
        }
    }

    pub(super) async fn read_record(&self, task_id: &str) -> TaskResult<Option<TaskRecord>> {
        let key = self.keys.record(task_id);
        let fields: HashMap<String, String> =
            self.redis
                .exec(move |mut c| async move {
                    redis::cmd("HGETALL").arg(&key).query_async(&mut c).await
                })
                .await?;
        Ok(record_from(fields))
    }

    pub(super) async fn cancel_queued(&self, task_id: &str, user: &str) -> TaskResult<Cancelled> {
        let outcome = Outcome::Failed("cancelled".into());
        let args = vec![user.to_owned(), now_ms().to_string(), task_id.to_owned()];
        let keys = vec![self.keys.record(task_id), self.keys.pending(user)];
        let n: i64 = self
            .run_script(&self.redis.scripts.cancel, keys, args)
            .await?;
        match n {
            1 => {
                self.tell(user, outcome_frame(task_id, &outcome)).await;
                self.retain(task_id, user, &outcome).await;
                Ok(Cancelled::Cancelled)
            }
            0 => Ok(Cancelled::Started),
            _ => Ok(Cancelled::NotFound),
        }
    }

    pub(super) async fn report_progress(
        &self,
        task_id: &str,
        progress: u8,
        message: Option<&str>,
    ) -> TaskResult<Progressed> {
        let args = vec![progress.to_string(), now_ms().to_string()];
        let keys = vec![self.keys.record(task_id)];
        let reply: Vec<RedisValue> = self
            .run_script(&self.redis.scripts.progress, keys, args)
            .await?;
        match reply.first().and_then(int) {
            Some(1) => {
                let user = reply
                    .get(1)
                    .and_then(|u| redis::from_redis_value::<String>(u.clone()).ok())
                    .unwrap_or_default();
                self.tell(&user, progress_frame(task_id, progress, message))
                    .await;
                Ok(Progressed::Reported)
            }
            Some(0) => Ok(Progressed::NotRunning),
            _ => Ok(Progressed::NotFound),
        }
    }
}

/// A record from its hash (`None`: no such task, or not a record).
fn record_from(fields: HashMap<String, String>) -> Option<TaskRecord> {
    let status: TaskStatus =
        serde_json::from_value(serde_json::Value::String(fields.get("status")?.clone())).ok()?;
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

/// A script's integer answer, when it is one.
pub(super) fn int(value: &RedisValue) -> Option<i64> {
    match value {
        RedisValue::Int(n) => Some(*n),
        _ => None,
    }
}
