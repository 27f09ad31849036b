//! `publish` (`room`, `data`) and `direct` (`to`, `data`): both hand the
//! data to the broker and ack with the id it gave. They are pipelined: a
//! session reads its next frame without waiting for the broker's answer,
//! up to [`MAX_IN_FLIGHT`] publishes at a time, and acks in order.

use actix::prelude::*;
use serde_json::Value;
use tokio::sync::oneshot;

use super::reply::counted_error_frame;
use super::Session;
use crate::broker::{Publish, PublishDone};
use crate::hub::Acked;
use crate::metrics::metrics;
use crate::protocol::{valid_user_id, Ack, ErrorReply, Ref};

/// The most publishes a session has in flight; the next one waits (and so
/// does reading the connection) until they are answered.
pub(super) const MAX_IN_FLIGHT: usize = 32;
/// The longest idempotency key.
const MAX_KEY_BYTES: usize = 256;

impl Session {
    pub(super) fn on_publish(
        &mut self,
        room: &str,
        data: Value,
        key: Option<String>,
        reference: Ref,
        ctx: &mut Context<Self>,
    ) {
        let Some(room) = self.room_arg(room, &reference, ctx) else {
            return;
        };
        if key
            .as_ref()
            .is_some_and(|k| k.is_empty() || k.len() > MAX_KEY_BYTES)
        {
            let err = ErrorReply::bad_request("`idempotency_key` must be 1-256 bytes");
            return self.reply_error(err, &reference, ctx);
        }
        if !self.claims.may_publish(room.as_str()) {
            let err = ErrorReply::forbidden(format!("not allowed to publish to {room}"));
            return self.reply_error(err, &reference, ctx);
        }
        if !self.rooms.contains(&room) {
            let err = ErrorReply::forbidden(format!("join {room} before publishing to it"));
            return self.reply_error(err, &reference, ctx);
        }
        metrics().published.with_label_values(&["room"]).inc();
        let from = self.user.clone();
        self.start_publish(
            Publish::Room {
                room,
                from,
                data,
                key,
            },
            reference,
        );
    }

    pub(super) fn on_direct(
        &mut self,
        to: String,
        data: Value,
        reference: Ref,
        ctx: &mut Context<Self>,
    ) {
        if !valid_user_id(&to) {
            let err = ErrorReply::bad_request("`to` must be a user id of 1-256 bytes");
            return self.reply_error(err, &reference, ctx);
        }
        if !self.claims.may_direct(&to) {
            let err = ErrorReply::forbidden("not allowed to send direct messages to that user");
            return self.reply_error(err, &reference, ctx);
        }
        metrics().published.with_label_values(&["user"]).inc();
        let from = self.user.clone();
        self.start_publish(Publish::User { to, from, data }, reference);
    }

    /// Starts the publish and returns: its ack (or error) goes into the
    /// outbound queue, through the hub's mailbox ([`Acked`]; `done` may run
    /// on the broker's thread), when the broker has answered. The broker keeps a thread's publishes in order, so acks come
    /// in the order of the publishes; [`Session::publishes_pending`] holds
    /// every other reply behind them.
    fn start_publish(&mut self, publish: Publish, reference: Ref) {
        let (answered, answer) = oneshot::channel();
        let (hub, key) = (self.hub.clone(), self.key);
        let done: PublishDone = Box::new(move |result| {
            let frame = match result {
                Ok(id) => Ack::to(&reference).id(id).encode(),
                Err(e) => counted_error_frame(&ErrorReply::from(&e), &reference),
            };
            hub.do_send(Acked {
                key,
                frame,
                answered,
            });
        });
        self.in_flight.push_back(answer);
        self.state
            .broker
            .messages
            .clone()
            .start_publish(publish, done);
    }

    /// The answer of the last publish in flight, when a frame must wait for
    /// it: any frame but a publish while one is in flight (its reply comes
    /// after their acks), a publish when [`MAX_IN_FLIGHT`] are. Answers
    /// come in order, so the last one answered means all were.
    pub(super) fn publishes_pending(&mut self, publish: bool) -> Option<oneshot::Receiver<()>> {
        while let Some(first) = self.in_flight.front_mut() {
            match first.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => break,
                _ => {
                    self.in_flight.pop_front();
                }
            }
        }
        let wait = if publish {
            self.in_flight.len() >= MAX_IN_FLIGHT
        } else {
            !self.in_flight.is_empty()
        };
        if !wait {
            return None;
        }
        let last = self.in_flight.pop_back();
        self.in_flight.clear();
        last
    }
}
