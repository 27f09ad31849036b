//! The in-process task queue of the memory broker: the same semantics as
//! the Redis one (records, idempotency per user, the per-user cap,
//! cancelling, dead letters), with updates delivered through the broker.
//!
//! State sits behind one mutex, held only for map and queue operations
//! (never across an await); task updates are not on the message path.
//! Bounds: the queue is bounded by the per-user cap times the users;
//! records and idempotency keys expire; an ended task's record drops its
//! payload and counts against its user's `tasks.max_record_bytes_per_user`
//! (the oldest go first); at most `DEAD_KEPT` dead letters are kept.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;

use super::record::{outcome_frame, progress_frame, status_frame};
use super::{
    new_task_id, Cancelled, Depth, Job, Outcome, Prepared, Progressed, Submission, TaskError,
    TaskQueue, TaskRecord, TaskResult,
};
use crate::broker::Messages;
use crate::clock::now_ms;
use crate::config::TasksConfig;
use crate::protocol::TaskStatus;

/// Dead letters kept (the oldest go first).
const DEAD_KEPT: usize = 10_000;
/// How long `take` waits for work.
const TAKE_WAIT: Duration = Duration::from_secs(1);

struct Entry {
    record: TaskRecord,
    /// Until the task ends.
    payload: Option<Box<serde_json::value::RawValue>>,
}

/// A user's ended tasks' records, oldest first, and their bytes.
#[derive(Default)]
struct Kept {
    records: VecDeque<(String, usize)>,
    bytes: usize,
}

/// What an ended record holds besides its result or error.
const RECORD_OVERHEAD: usize = 256;

#[derive(Default)]
struct State {
    tasks: HashMap<String, Entry>,
    queue: VecDeque<String>,
    /// (user, key) → (task id, expires at ms).
    idempotency: HashMap<(String, String), (String, u64)>,
    /// user → its tasks queued or running.
    pending: HashMap<String, HashSet<String>>,
    dead: VecDeque<String>,
    running: usize,
    kept: HashMap<String, Kept>,
}

pub struct MemoryTasks {
    state: Mutex<State>,
    work: Notify,
    messages: Arc<dyn Messages>,
    max_pending: usize,
    idempotency_ttl_ms: u64,
    result_ttl_ms: u64,
    max_record_bytes: usize,
}

impl MemoryTasks {
    pub fn new(config: &TasksConfig, messages: Arc<dyn Messages>) -> MemoryTasks {
        MemoryTasks {
            state: Mutex::new(State::default()),
            work: Notify::new(),
            messages,
            max_pending: config.max_pending_per_user,
            idempotency_ttl_ms: config.idempotency_ttl_s.saturating_mul(1000),
            result_ttl_ms: config.result_ttl_s.saturating_mul(1000),
            max_record_bytes: config.max_record_bytes_per_user,
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> TaskResult<R> {
        let mut state = self
            .state
            .lock()
            .map_err(|_| TaskError::Internal("task state poisoned".into()))?;
        Ok(f(&mut state))
    }

    async fn tell(&self, user: &str, frame: bytestring::ByteString) {
        if let Err(e) = self.messages.send_frame(user, frame).await {
            tracing::warn!(error = %e, "task update not delivered");
        }
    }
}

impl State {
    fn unpend(&mut self, user: &str, task_id: &str) {
        if let Some(set) = self.pending.get_mut(user) {
            set.remove(task_id);
            if set.is_empty() {
                self.pending.remove(user);
            }
        }
    }

    /// An ended task: its payload goes, its record counts against its
    /// user's budget, and the oldest records past the budget go (the
    /// newest always stays).
    fn ended(&mut self, task_id: &str, budget: usize) {
        let Some(entry) = self.tasks.get_mut(task_id) else {
            return;
        };
        entry.payload = None;
        let bytes = RECORD_OVERHEAD
            + entry.record.result.as_ref().map_or(0, |r| r.get().len())
            + entry.record.error.as_ref().map_or(0, String::len);
        let user = entry.record.user.clone();
        let kept = self.kept.entry(user).or_default();
        kept.records.push_back((task_id.to_owned(), bytes));
        kept.bytes += bytes;
        while kept.bytes > budget && kept.records.len() > 1 {
            if let Some((old, old_bytes)) = kept.records.pop_front() {
                kept.bytes -= old_bytes;
                self.tasks.remove(&old);
            }
        }
    }

    /// Starts a queued task for a worker.
    fn start(&mut self, task_id: &str) -> Option<Job> {
        let entry = self.tasks.get_mut(task_id)?;
        if entry.record.status != TaskStatus::Queued {
            return None;
        }
        let payload = entry.payload.clone()?;
        entry.record.status = TaskStatus::Running;
        entry.record.attempts += 1;
        entry.record.updated_at = now_ms();
        self.running += 1;
        Some(Job {
            task_id: task_id.to_owned(),
            name: entry.record.name.clone(),
            user: entry.record.user.clone(),
            payload,
            attempt: entry.record.attempts,
            token: String::new(),
        })
    }
}

#[async_trait]
impl TaskQueue for MemoryTasks {
    async fn prepare(&self, submission: Submission) -> TaskResult<Prepared> {
        let (max, idem_ttl) = (self.max_pending, self.idempotency_ttl_ms);
        self.with(|s| {
            let now = now_ms();
            let idem = submission
                .idempotency_key
                .clone()
                .map(|key| (submission.user.clone(), key));
            if let Some((task_id, expires)) = idem.as_ref().and_then(|k| s.idempotency.get(k)) {
                if *expires > now {
                    let task_id = task_id.clone();
                    let owner = s.tasks.get(&task_id).map(|e| e.record.user.as_str());
                    if owner.is_some_and(|owner| owner != submission.user) {
                        return Err(TaskError::Internal(format!(
                            "idempotency key names task {task_id} of another user"
                        )));
                    }
                    return Ok(Prepared {
                        task_id,
                        created: false,
                        submission,
                    });
                }
            }
            let pending = s.pending.entry(submission.user.clone()).or_default();
            if pending.len() >= max {
                return Err(TaskError::TooManyPending(max));
            }
            let task_id = new_task_id();
            pending.insert(task_id.clone());
            if let Some(idem) = idem {
                s.idempotency
                    .insert(idem, (task_id.clone(), now + idem_ttl));
            }
            let record = TaskRecord {
                task_id: task_id.clone(),
                name: submission.name.clone(),
                user: submission.user.clone(),
                status: TaskStatus::Queued,
                attempts: 0,
                progress: None,
                result: None,
                error: None,
                created_at: now,
                updated_at: now,
            };
            let payload = Some(submission.payload.clone());
            s.tasks.insert(task_id.clone(), Entry { record, payload });
            Ok(Prepared {
                task_id,
                created: true,
                submission,
            })
        })?
    }

    async fn enqueue(&self, prepared: &Prepared) -> TaskResult<()> {
        let id = prepared.task_id.clone();
        self.with(|s| s.queue.push_back(id))?;
        self.work.notify_one();
        Ok(())
    }

    async fn record(&self, task_id: &str) -> TaskResult<Option<TaskRecord>> {
        self.with(|s| s.tasks.get(task_id).map(|e| e.record.clone()))
    }

    async fn cancel(&self, task_id: &str, user: &str) -> TaskResult<Cancelled> {
        let budget = self.max_record_bytes;
        let cancelled = self.with(|s| {
            let Some(entry) = s.tasks.get_mut(task_id).filter(|e| e.record.user == user) else {
                return Cancelled::NotFound;
            };
            if entry.record.status != TaskStatus::Queued {
                return Cancelled::Started;
            }
            entry.record.status = TaskStatus::Failed;
            entry.record.error = Some("cancelled".into());
            entry.record.updated_at = now_ms();
            s.queue.retain(|id| id != task_id);
            s.unpend(user, task_id);
            s.ended(task_id, budget);
            Cancelled::Cancelled
        })?;
        if cancelled == Cancelled::Cancelled {
            let outcome = Outcome::Failed("cancelled".into());
            self.tell(user, outcome_frame(task_id, &outcome)).await;
        }
        Ok(cancelled)
    }

    async fn progress(
        &self,
        task_id: &str,
        progress: u8,
        message: Option<&str>,
    ) -> TaskResult<Progressed> {
        let found = self.with(|s| match s.tasks.get_mut(task_id) {
            None => Err(Progressed::NotFound),
            Some(e) if e.record.status != TaskStatus::Running => Err(Progressed::NotRunning),
            Some(e) => {
                e.record.progress = Some(progress);
                e.record.updated_at = now_ms();
                Ok(e.record.user.clone())
            }
        })?;
        match found {
            Ok(user) => {
                self.tell(&user, progress_frame(task_id, progress, message))
                    .await;
                Ok(Progressed::Reported)
            }
            Err(other) => Ok(other),
        }
    }

    async fn take(&self, _consumer: &str, max: usize) -> TaskResult<Vec<Job>> {
        let wait = self.work.notified();
        let jobs = self.with(|s| {
            let mut jobs = Vec::new();
            while jobs.len() < max {
                let Some(id) = s.queue.pop_front() else { break };
                jobs.extend(s.start(&id));
            }
            jobs
        })?;
        if jobs.is_empty() {
            let _ = tokio::time::timeout(TAKE_WAIT, wait).await;
            return Ok(Vec::new());
        }
        for job in &jobs {
            self.tell(&job.user, status_frame(&job.task_id, TaskStatus::Running))
                .await;
        }
        Ok(jobs)
    }

    /// One process: nobody else can take a job over.
    async fn renew(&self, _consumer: &str, _job: &Job) -> TaskResult<bool> {
        Ok(true)
    }

    async fn retry(&self, job: &mut Job, error: &str) -> TaskResult<bool> {
        let attempt = self.with(|s| {
            let entry = s.tasks.get_mut(&job.task_id)?;
            entry.record.attempts += 1;
            entry.record.error = Some(error.to_owned());
            entry.record.updated_at = now_ms();
            Some(entry.record.attempts)
        })?;
        job.attempt = attempt.unwrap_or(job.attempt + 1);
        self.tell(&job.user, status_frame(&job.task_id, TaskStatus::Running))
            .await;
        Ok(true)
    }

    async fn finish(&self, job: &Job, outcome: &Outcome) -> TaskResult<bool> {
        let budget = self.max_record_bytes;
        self.with(|s| {
            s.running = s.running.saturating_sub(1);
            s.unpend(&job.user, &job.task_id);
            let Some(entry) = s.tasks.get_mut(&job.task_id) else {
                return;
            };
            entry.record.updated_at = now_ms();
            match outcome {
                Outcome::Done(result) => {
                    entry.record.status = TaskStatus::Done;
                    entry.record.result = Some(result.clone());
                    entry.record.error = None;
                }
                Outcome::Failed(error) => {
                    entry.record.status = TaskStatus::Failed;
                    entry.record.error = Some(error.clone());
                    s.dead.push_back(job.task_id.clone());
                    while s.dead.len() > DEAD_KEPT {
                        s.dead.pop_front();
                    }
                }
            }
            s.ended(&job.task_id, budget);
        })?;
        self.tell(&job.user, outcome_frame(&job.task_id, outcome))
            .await;
        Ok(true)
    }

    async fn maintain(&self) -> TaskResult<Depth> {
        let ttl = self.result_ttl_ms;
        self.with(|s| {
            let now = now_ms();
            s.tasks
                .retain(|_, e| !e.record.status.is_final() || e.record.updated_at + ttl > now);
            s.idempotency.retain(|_, (_, expires)| *expires > now);
            let tasks = &s.tasks;
            s.dead.retain(|id| tasks.contains_key(id));
            s.kept.retain(|_, kept| {
                let gone: usize = kept
                    .records
                    .iter()
                    .filter(|(id, _)| !tasks.contains_key(id))
                    .map(|(_, bytes)| bytes)
                    .sum();
                kept.records.retain(|(id, _)| tasks.contains_key(id));
                kept.bytes -= gone;
                !kept.records.is_empty()
            });
            Depth {
                queued: s.queue.len() as u64,
                running: s.running as u64,
                dead: s.dead.len() as u64,
            }
        })
    }

    async fn ready(&self) -> Result<(), String> {
        Ok(())
    }
}
