//! `task` (`name`, `payload`, `idempotency_key`?), `task_status`
//! (`task_id`) and `task_cancel` (`task_id`): async tasks
//! (docs/protocol.md §8).
//!
//! A submission is acked with its `task_id` and followed by a `task`
//! frame with status `queued` (for a repeated idempotency key: the first
//! task's id and its current status); only then is it handed to the
//! workers, so no update can overtake the ack. Later updates reach every
//! connection of the user through the broker.

use actix::prelude::*;
use serde_json::value::to_raw_value;
use serde_json::Value;

use super::Session;
use crate::metrics::metrics;
use crate::protocol::{task_record_frame, Ack, ErrorCode, ErrorReply, Ref, TaskEvent};
use crate::tasks::record::status_frame;
use crate::tasks::{Cancelled, Prepared, Submission, TaskError};

/// The longest idempotency key.
const MAX_KEY_BYTES: usize = 256;

impl Session {
    pub(super) fn on_task(
        &mut self,
        name: String,
        payload: Option<Value>,
        idempotency_key: Option<String>,
        reference: Ref,
        ctx: &mut Context<Self>,
    ) {
        if !self.state.tasks.handlers.contains(&name) {
            let err = ErrorReply::new(ErrorCode::NotFound, format!("unknown task {name:?}"));
            return self.reply_error(err, &reference, ctx);
        }
        if idempotency_key
            .as_ref()
            .is_some_and(|k| k.is_empty() || k.len() > MAX_KEY_BYTES)
        {
            let err = ErrorReply::bad_request("`idempotency_key` must be 1-256 bytes");
            return self.reply_error(err, &reference, ctx);
        }
        let Ok(payload) = to_raw_value(&payload.unwrap_or(Value::Null)) else {
            return self.reply_error(ErrorReply::internal(), &reference, ctx);
        };
        let submission = Submission {
            name,
            user: self.user.to_string(),
            payload,
            idempotency_key,
        };
        let queue = self.state.tasks.queue.clone();
        let prepare = async move { queue.prepare(submission).await };
        ctx.wait(
            prepare
                .into_actor(self)
                .map(move |prepared, this, ctx| match prepared {
                    Ok(prepared) => this.submitted(prepared, reference, ctx),
                    Err(e) => this.reply_task_error(e, &reference, ctx),
                }),
        );
    }

    /// Acks, says where the task is, and (for a new one) enqueues it.
    fn submitted(&mut self, prepared: Prepared, reference: Ref, ctx: &mut Context<Self>) {
        self.ack(Ack::to(&reference).task_id(&prepared.task_id), ctx);
        let queue = self.state.tasks.queue.clone();
        if prepared.created {
            metrics()
                .tasks
                .submitted
                .with_label_values(&[&prepared.submission.name])
                .inc();
            self.reply(
                status_frame(&prepared.task_id, crate::protocol::TaskStatus::Queued),
                ctx,
            );
            let (task_id, user) = (prepared.task_id.clone(), self.user.clone());
            let enqueue = async move {
                if let Err(e) = queue.enqueue(&prepared).await {
                    tracing::error!(error = %e, task_id, user = %user, "task not enqueued");
                    return Some(task_id);
                }
                None
            };
            ctx.wait(enqueue.into_actor(self).map(|lost, this, ctx| {
                if let Some(task_id) = lost {
                    let outcome = crate::tasks::Outcome::Failed("not enqueued".into());
                    this.reply(crate::tasks::record::outcome_frame(&task_id, &outcome), ctx);
                }
            }));
            return;
        }
        // A repeated idempotency key: the first task, as it is now.
        let task_id = prepared.task_id.clone();
        let look = async move { queue.record(&task_id).await };
        ctx.wait(look.into_actor(self).map(move |record, this, ctx| {
            if let Ok(Some(record)) = record {
                let event = TaskEvent {
                    task_id: &record.task_id,
                    status: record.status,
                    progress: record.progress,
                    message: None,
                    result: record.result.as_deref(),
                    error: record.error.as_deref(),
                };
                this.reply(event.encode(), ctx);
            }
        }));
    }

    pub(super) fn on_task_status(
        &mut self,
        task_id: String,
        reference: Ref,
        ctx: &mut Context<Self>,
    ) {
        let queue = self.state.tasks.queue.clone();
        let look = async move { queue.record(&task_id).await };
        ctx.wait(
            look.into_actor(self)
                .map(move |record, this, ctx| match record {
                    Ok(Some(record)) if *record.user == *this.user => {
                        this.reply(task_record_frame(&record.to_object(), &reference), ctx);
                    }
                    Ok(_) => {
                        let err = ErrorReply::new(ErrorCode::NotFound, "no such task");
                        this.reply_error(err, &reference, ctx);
                    }
                    Err(e) => this.reply_task_error(e, &reference, ctx),
                }),
        );
    }

    pub(super) fn on_task_cancel(
        &mut self,
        task_id: String,
        reference: Ref,
        ctx: &mut Context<Self>,
    ) {
        let (queue, user) = (self.state.tasks.queue.clone(), self.user.clone());
        let cancel = async move {
            let cancelled = queue.cancel(&task_id, &user).await;
            (task_id, cancelled)
        };
        ctx.wait(cancel.into_actor(self).map(
            move |(task_id, cancelled), this, ctx| match cancelled {
                Ok(Cancelled::Cancelled) => this.ack(Ack::to(&reference).task_id(&task_id), ctx),
                Ok(Cancelled::NotFound) => {
                    let err = ErrorReply::new(ErrorCode::NotFound, "no such task");
                    this.reply_error(err, &reference, ctx);
                }
                Ok(Cancelled::Started) => {
                    let err = ErrorReply::forbidden("the task has started: it cannot be cancelled");
                    this.reply_error(err, &reference, ctx);
                }
                Err(e) => this.reply_task_error(e, &reference, ctx),
            },
        ));
    }

    fn reply_task_error(&mut self, e: TaskError, reference: &Ref, ctx: &mut Context<Self>) {
        self.reply_error(ErrorReply::from(&e), reference, ctx);
    }
}
