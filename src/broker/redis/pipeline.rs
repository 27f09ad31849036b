//! Session publishes, pipelined. Each worker thread has one task per
//! broker that takes the publishes its sessions start, sends all that have
//! queued up in one round trip (one pipeline; on a cluster one per slot,
//! all at once), and calls each publish's `done` in order. A session's
//! publishes therefore reach Redis, and are acked, in the order it sent
//! them, without each waiting for the one before; and under load a round
//! trip carries many publishes instead of one.
//!
//! A batch's replies are read one by one: an error reply fails only its
//! own publish; `NOSCRIPT` (Redis lost its scripts) sends those publishes
//! again behind a `SCRIPT LOAD`; a lost connection, a time-out or Redis
//! being away fails them with `unavailable` (the client may retry: with its
//! `idempotency_key` a retry is not stored twice).

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use redis::{Cmd, Value};
use tokio::sync::mpsc;

use super::messages::to_raw;
use super::RedisBroker;
use crate::broker::{BrokerError, BrokerResult, Publish, PublishDone};
use crate::protocol::MessageId;

/// The most publishes one batch carries.
const MAX_BATCH: usize = 256;

static NEXT_BROKER: AtomicU64 = AtomicU64::new(1);

/// A number telling brokers apart in the threads' pipeline lists.
pub(super) fn broker_key() -> u64 {
    NEXT_BROKER.fetch_add(1, Ordering::Relaxed)
}

struct Job {
    publish: Publish,
    done: PublishDone,
}

thread_local! {
    /// This thread's pipeline task per broker (tests run several brokers).
    static PIPELINES: RefCell<Vec<(u64, mpsc::UnboundedSender<Job>)>> =
        const { RefCell::new(Vec::new()) };
}

/// One publish ready to send: its command, the key that places it (its
/// slot), and the ack's id when it is known beforehand (direct).
struct Prepared {
    cmd: Cmd,
    key: String,
    known_id: Option<String>,
}

/// What one command of a pipeline came to.
enum Outcome {
    Done(BrokerResult<String>),
    NoScript,
}

impl RedisBroker {
    /// Queues a session's publish on this thread's pipeline task (started
    /// on first use). The queue is unbounded here: each session bounds how
    /// many publishes it has in flight.
    pub(super) fn enqueue_publish(self: Arc<Self>, publish: Publish, done: PublishDone) {
        let sender = PIPELINES.with(|pipes| {
            let mut pipes = pipes.borrow_mut();
            pipes.retain(|(_, tx)| !tx.is_closed());
            if let Some((_, tx)) = pipes.iter().find(|(key, _)| *key == self.pipeline_key) {
                return tx.clone();
            }
            let (tx, rx) = mpsc::unbounded_channel();
            actix::spawn(run(Arc::downgrade(&self), rx));
            pipes.push((self.pipeline_key, tx.clone()));
            tx
        });
        if let Err(mpsc::error::SendError(job)) = sender.send(Job { publish, done }) {
            (job.done)(Err(BrokerError::Internal(
                "publish pipeline stopped".into(),
            )));
        }
    }

    /// One publish as a command.
    fn prepare(&self, publish: &Publish) -> BrokerResult<Prepared> {
        match publish {
            Publish::Room {
                room,
                from,
                data,
                key,
            } => {
                let raw = to_raw(data)?;
                let key = key.as_deref().map(|k| crate::broker::publish_key(from, k));
                let (keys, args) = self.publish_room_call(room, from, &raw, key.as_deref());
                let mut cmd = redis::cmd("EVALSHA");
                cmd.arg(self.redis.scripts.publish_room.get_hash())
                    .arg(keys.len())
                    .arg(&keys)
                    .arg(args);
                Ok(Prepared {
                    cmd,
                    key: keys[0].clone(),
                    known_id: None,
                })
            }
            Publish::User { to, from, data } => {
                let (id, channel, frame) = self.direct_publish(to, from, &to_raw(data)?);
                let mut cmd = redis::cmd(self.redis.publish_command());
                cmd.arg(&channel).arg(frame);
                Ok(Prepared {
                    cmd,
                    key: channel,
                    known_id: Some(id),
                })
            }
        }
    }

    /// Sends `calls` (one pipeline per slot, after a `SCRIPT LOAD` when
    /// `load`) and records each one's outcome at its index.
    async fn send_batch(
        &self,
        calls: &[(usize, &Prepared)],
        load: bool,
        outcomes: &mut [Option<Outcome>],
    ) {
        let groups = self
            .redis
            .group(calls.iter().map(|&(i, p)| ((i, p), p.key.as_str())));
        let wait = self.redis.wait_command();
        let pipes = groups
            .iter()
            .map(|group| {
                let mut pipe = redis::pipe();
                pipe.ignore_errors();
                if load {
                    pipe.cmd("SCRIPT")
                        .arg("LOAD")
                        .arg(self.redis.scripts.publish_room.source())
                        .ignore();
                }
                for (_, p) in group {
                    pipe.add_command(p.cmd.clone());
                }
                if let Some(wait) = &wait {
                    pipe.add_command(wait.clone());
                }
                pipe
            })
            .collect();
        let expected = |group: &Vec<(usize, &Prepared)>| group.len() + usize::from(wait.is_some());
        let failure = match self.redis.pipelines(pipes).await {
            Ok(replies) => {
                let mut failure = None;
                for (group, mut replies) in groups.iter().zip(replies) {
                    if replies.len() != expected(group) {
                        failure = Some(BrokerError::Internal(format!(
                            "redis: {} replies to {} publishes",
                            replies.len(),
                            group.len()
                        )));
                        continue;
                    }
                    // With `wait_replicas`, the group's last reply is WAIT's:
                    // too few replicas fail every write of the group.
                    let waited = match wait {
                        Some(_) => replies.pop().map(|w| self.redis.check_wait(&w)),
                        None => None,
                    };
                    for ((i, p), reply) in group.iter().zip(replies) {
                        let mut result = outcome(p, reply);
                        if let (Some(Err(e)), Outcome::Done(Ok(_))) = (&waited, &result) {
                            result = Outcome::Done(Err(BrokerError::from(e.clone())));
                        }
                        outcomes[*i] = Some(result);
                    }
                }
                match failure {
                    None => return,
                    Some(failure) => failure,
                }
            }
            Err(e) => BrokerError::from(e),
        };
        for (i, _) in calls {
            if outcomes[*i].is_none() {
                outcomes[*i] = Some(Outcome::Done(Err(failure.clone())));
            }
        }
    }

    /// Publishes a batch and calls every `done`, in order.
    async fn publish_batch(&self, jobs: Vec<Job>) {
        let prepared: Vec<BrokerResult<Prepared>> = jobs
            .iter()
            .map(|j| {
                self.check_available()?;
                self.prepare(&j.publish)
            })
            .collect();
        let mut outcomes: Vec<Option<Outcome>> = prepared.iter().map(|_| None).collect();
        let ready: Vec<(usize, &Prepared)> = prepared
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().ok().map(|p| (i, p)))
            .collect();
        if !ready.is_empty() {
            self.send_batch(&ready, false, &mut outcomes).await;
            let again: Vec<(usize, &Prepared)> = ready
                .iter()
                .filter(|(i, _)| matches!(outcomes[*i], Some(Outcome::NoScript)))
                .copied()
                .collect();
            if !again.is_empty() {
                self.send_batch(&again, true, &mut outcomes).await;
            }
        }
        drop(ready);
        for ((job, p), outcome) in jobs.into_iter().zip(prepared).zip(outcomes) {
            let result = match (p, outcome) {
                (Err(e), _) => Err(e),
                (Ok(_), Some(Outcome::Done(result))) => result,
                (Ok(_), None) => Err(BrokerError::Internal("publish not sent".into())),
                (Ok(_), Some(Outcome::NoScript)) => Err(BrokerError::Internal(
                    "redis: publish_room.lua missing after SCRIPT LOAD".into(),
                )),
            };
            (job.done)(result);
        }
    }
}

/// What a reply means for its publish: a room publish answers its id.
fn outcome(p: &Prepared, reply: Value) -> Outcome {
    match reply {
        Value::ServerError(e) if e.code() == "NOSCRIPT" => Outcome::NoScript,
        Value::ServerError(e) => {
            let error = redis::RedisError::from(e);
            Outcome::Done(Err(crate::redis::classify(&error).into()))
        }
        reply => Outcome::Done(match &p.known_id {
            Some(id) => Ok(id.clone()),
            None => redis::from_redis_value::<String>(reply)
                .ok()
                .filter(|id| id.parse::<MessageId>().is_ok())
                .ok_or_else(|| BrokerError::Internal("publish_room.lua answered no id".into())),
        }),
    }
}

/// Takes what has queued up, up to [`MAX_BATCH`], publishes it, repeats;
/// ends with the broker or when every sender on this thread is gone.
async fn run(broker: Weak<RedisBroker>, mut queue: mpsc::UnboundedReceiver<Job>) {
    let mut jobs = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut jobs, MAX_BATCH).await > 0 {
        let batch = std::mem::replace(&mut jobs, Vec::with_capacity(MAX_BATCH));
        match broker.upgrade() {
            Some(broker) => broker.publish_batch(batch).await,
            None => {
                for job in batch {
                    (job.done)(Err(BrokerError::Internal("broker stopped".into())));
                }
                return;
            }
        }
    }
}
