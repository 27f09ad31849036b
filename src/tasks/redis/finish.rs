//! The end of an attempt: the next one after a failure, or the task's end
//! (fenced by the attempt's number), and keeping ended records within the
//! user's byte budget.

use super::{RedisTasks, DEAD_KEPT};
use crate::clock::now_ms;
use crate::protocol::TaskStatus;
use crate::tasks::record::{outcome_frame, status_frame};
use crate::tasks::{Job, Outcome, TaskResult};

/// What a record holds besides its result or error (ids, name, user,
/// numbers), counted against the user's budget.
const RECORD_OVERHEAD: usize = 256;

impl RedisTasks {
    /// The next attempt begins (counted, `running` again); `false` when
    /// the claim was lost.
    pub(super) async fn next_attempt(&self, job: &mut Job, error: &str) -> TaskResult<bool> {
        let keys = vec![self.keys.record(&job.task_id)];
        let args = vec![
            job.attempt.to_string(),
            error.to_owned(),
            now_ms().to_string(),
        ];
        let attempt: i64 = self
            .run_script(&self.redis.scripts.retry, keys, args)
            .await?;
        if attempt <= 0 {
            self.forget_running(job);
            return Ok(false);
        }
        job.attempt = attempt as u32;
        self.tell(&job.user, status_frame(&job.task_id, TaskStatus::Running))
            .await;
        Ok(true)
    }

    /// The job ends: `done` with its result or `failed` for good (copied
    /// to the dead letters); `false` when the claim was lost (nothing
    /// written).
    pub(super) async fn end(&self, job: &Job, outcome: &Outcome) -> TaskResult<bool> {
        self.forget_running(job);
        let (status, value) = match outcome {
            Outcome::Done(result) => ("done", result.get()),
            Outcome::Failed(error) => ("failed", error.as_str()),
        };
        let keys = vec![
            self.keys.record(&job.task_id),
            self.keys.pending(&job.user),
            self.keys.queue(),
            self.keys.dead(),
        ];
        let args = vec![
            job.attempt.to_string(),
            status.to_owned(),
            value.to_owned(),
            now_ms().to_string(),
            self.result_ttl_ms.to_string(),
            job.token.clone(),
            job.task_id.clone(),
            DEAD_KEPT.to_string(),
        ];
        let written: i64 = self
            .run_script(&self.redis.scripts.finish, keys, args)
            .await?;
        if written != 1 {
            return Ok(false);
        }
        self.tell(&job.user, outcome_frame(&job.task_id, outcome))
            .await;
        self.retain(&job.task_id, &job.user, outcome).await;
        Ok(true)
    }

    fn forget_running(&self, job: &Job) {
        if let Ok(mut claims) = self.claims() {
            claims.running.remove(&job.token);
        }
    }

    /// Counts an ended task's record against its user's budget and deletes
    /// the oldest records past it. Best effort: what is not deleted here
    /// expires with `tasks.result_ttl_s`.
    pub(super) async fn retain(&self, task_id: &str, user: &str, outcome: &Outcome) {
        let bytes = RECORD_OVERHEAD
            + match outcome {
                Outcome::Done(result) => result.get().len(),
                Outcome::Failed(error) => error.len(),
            };
        let keys = vec![self.keys.kept(user), self.keys.kept_bytes(user)];
        let args = vec![
            task_id.to_owned(),
            bytes.to_string(),
            now_ms().to_string(),
            self.result_ttl_ms.to_string(),
            self.max_record_bytes.to_string(),
        ];
        let evicted: TaskResult<Vec<String>> = self
            .run_script(&self.redis.scripts.retain, keys, args)
            .await;
        let evicted = match evicted {
            Ok(evicted) if !evicted.is_empty() => evicted,
            Ok(_) => return,
            Err(e) => {
                tracing::debug!(error = %e, "task records not counted; they expire by themselves");
                return;
            }
        };
        let records: Vec<String> = evicted.iter().map(|id| self.keys.record(id)).collect();
        let deleted = self
            .redis
            .exec(move |mut c| async move {
                redis::cmd("DEL")
                    .arg(&records)
                    .query_async::<()>(&mut c)
                    .await
            })
            .await;
        if let Err(e) = deleted {
            tracing::debug!(error = %e, "old task records not deleted; they expire by themselves");
        }
    }
}
