//! A worker's side of the stream: reading only what it can start now,
//! taking over what a dead worker held, starting each task, and keeping
//! its claim while an attempt runs.

use std::time::{Duration, Instant};

use redis::streams::{StreamId, StreamReadReply};
use redis::Value as RedisValue;
use serde_json::value::RawValue;

use super::submit::int;
use super::{RedisTasks, DEAD_KEPT};
use crate::clock::now_ms;
use crate::protocol::TaskStatus;
use crate::redis::keys::TASK_GROUP as GROUP;
use crate::tasks::record::{outcome_frame, status_frame};
use crate::tasks::{Job, Outcome, TaskError, TaskResult};

/// How long `XREADGROUP` blocks when there is no work: under redis-rs's
/// response timeout (500 ms), or the client gives up on a read Redis still
/// serves, and an entry added then waits in the pending list.
const BLOCK_MS: u64 = 400;
/// What a task lost with its worker fails with when its attempts are spent.
const LOST: &str = "worker lost";

/// A stream entry's string field.
fn field(entry: &StreamId, name: &str) -> Option<String> {
    entry
        .map
        .get(name)
        .and_then(|v| redis::from_redis_value::<String>(v.clone()).ok())
}

/// An entry read from the stream, with what it names.
struct Taken {
    entry_id: String,
    task_id: String,
    name: String,
    user: String,
    payload: String,
}

impl From<StreamId> for Taken {
    fn from(e: StreamId) -> Taken {
        Taken {
            task_id: field(&e, "task_id").unwrap_or_default(),
            name: field(&e, "name").unwrap_or_default(),
            user: field(&e, "user").unwrap_or_default(),
            payload: field(&e, "payload").unwrap_or_else(|| "null".into()),
            entry_id: e.id,
        }
    }
}

impl RedisTasks {
    /// Up to `max` entries for `consumer`: taken over from silent workers
    /// now and then, else its own unseen ones, else new ones (blocking a
    /// moment when there are none).
    pub(super) async fn read_entries(
        &self,
        consumer: &str,
        max: usize,
    ) -> TaskResult<Vec<StreamId>> {
        let claim_due = {
            let mut claims = self.claims()?;
            let due = claims
                .last_claim
                .get(consumer)
                .is_none_or(|t| t.elapsed().as_millis() as u64 >= self.visibility_ms / 2);
            if due {
                claims
                    .last_claim
                    .insert(consumer.to_owned(), Instant::now());
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
        let own = self.claims()?.recovered.insert(consumer.to_owned());
        let reply = self
            .read_group(consumer, max, if own { "0" } else { ">" })
            .await;
        if reply.is_err() {
            self.claims()?.recovered.remove(consumer);
        }
        let mut entries: Vec<StreamId> = reply?
            .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
            .unwrap_or_default();
        if own {
            let claims = self.claims()?;
            entries.retain(|e| !claims.running.contains(&e.id));
        }
        Ok(entries)
    }

    /// `XREADGROUP` on the consumer's own connection (it blocks a moment
    /// when there is nothing new): `from` `>` for new entries, `0` for the
    /// consumer's own pending ones.
    async fn read_group(
        &self,
        consumer: &str,
        max: usize,
        from: &str,
    ) -> TaskResult<Option<StreamReadReply>> {
        let held = self.claims()?.readers.remove(consumer);
        let pooled = match held {
            Some(pooled) => pooled,
            None => self.redis.dedicated().await?,
        };
        let mut conn = pooled.conn();
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(GROUP)
            .arg(consumer)
            .arg("COUNT")
            .arg(max);
        if from == ">" {
            cmd.arg("BLOCK").arg(BLOCK_MS);
        }
        cmd.arg("STREAMS").arg(self.keys.queue()).arg(from);
        let limit = Duration::from_millis(BLOCK_MS) + Duration::from_secs(2);
        let reply = match tokio::time::timeout(limit, cmd.query_async(&mut conn)).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(e)) => {
                pooled.discard();
                return Err(crate::redis::classify(&e).into());
            }
            Err(_) => {
                pooled.discard();
                return Err(TaskError::Unavailable(
                    "reading the task stream timed out".into(),
                ));
            }
        };
        self.claims()?.readers.insert(consumer.to_owned(), pooled);
        Ok(reply)
    }

    /// `XAUTOCLAIM`: entries idle for the visibility timeout (a running
    /// attempt renews its claim, so only a dead worker's go idle).
    async fn autoclaim(&self, consumer: &str, max: usize) -> TaskResult<Vec<StreamId>> {
        let (queue, consumer, idle) = (self.keys.queue(), consumer.to_owned(), self.visibility_ms);
        let reply: redis::streams::StreamAutoClaimReply = self
            .redis
            .exec(move |mut c| async move {
                redis::cmd("XAUTOCLAIM")
                    .arg(&queue)
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

    /// Starts a batch of entries in one round trip; returns the jobs to
    /// run (a task not to run is acknowledged by the script).
    pub(super) async fn start_entries(&self, entries: Vec<StreamId>) -> TaskResult<Vec<Job>> {
        let taken: Vec<Taken> = entries.into_iter().map(Taken::from).collect();
        let now = now_ms().to_string();
        let calls: Vec<crate::redis::ScriptCall<'_>> = taken
            .iter()
            .map(|t| crate::redis::ScriptCall {
                script: &self.redis.scripts.start,
                keys: vec![
                    self.keys.record(&t.task_id),
                    self.keys.pending(&t.user),
                    self.keys.queue(),
                    self.keys.dead(),
                ],
                args: vec![
                    now.clone(),
                    self.max_attempts.to_string(),
                    t.entry_id.clone(),
                    t.task_id.clone(),
                    DEAD_KEPT.to_string(),
                    LOST.to_owned(),
                ],
            })
            .collect();
        let replies = self.redis.run_scripts(&calls).await?;
        let mut jobs = Vec::new();
        for (t, reply) in taken.into_iter().zip(replies) {
            let answer = match &reply {
                RedisValue::Array(items) => items.as_slice(),
                _ => &[],
            };
            match answer.first().and_then(int) {
                Some(attempt) if attempt > 0 => {
                    self.claims()?.running.insert(t.entry_id.clone());
                    self.tell(&t.user, status_frame(&t.task_id, TaskStatus::Running))
                        .await;
                    jobs.push(Job {
                        payload: RawValue::from_string(t.payload).unwrap_or_else(|_| {
                            RawValue::from_string("null".into()).expect("null is JSON")
                        }),
                        task_id: t.task_id,
                        name: t.name,
                        user: t.user,
                        attempt: attempt as u32,
                        token: t.entry_id,
                    });
                }
                Some(-2) => {
                    // Failed now, attempts spent: keep its record in budget.
                    let error = answer
                        .get(1)
                        .and_then(|v| redis::from_redis_value::<String>(v.clone()).ok())
                        .unwrap_or_else(|| LOST.to_owned());
                    let outcome = Outcome::Failed(error);
                    self.tell(&t.user, outcome_frame(&t.task_id, &outcome))
                        .await;
                    self.retain(&t.task_id, &t.user, &outcome).await;
                }
                Some(_) => {}
                None => {
                    tracing::warn!(task_id = %t.task_id, reply = ?reply, "starting a task failed")
                }
            }
        }
        Ok(jobs)
    }

    /// Keeps a running job's entry ours; `false` when another worker has
    /// taken it over (the attempt should stop).
    pub(super) async fn renew_claim(&self, consumer: &str, job: &Job) -> TaskResult<bool> {
        let keys = vec![self.keys.queue()];
        let args = vec![GROUP.to_owned(), consumer.to_owned(), job.token.clone()];
        let renewed: i64 = self
            .run_script(&self.redis.scripts.renew, keys, args)
            .await?;
        Ok(renewed == 1)
    }
}
