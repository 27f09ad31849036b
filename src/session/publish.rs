//! `publish` (`room`, `data`) and `direct` (`to`, `data`): both hand the
//! data to the broker and ack with the id it gave.

use std::future::Future;

use actix::prelude::*;
use serde_json::Value;

use super::Session;
use crate::broker::BrokerResult;
use crate::metrics::metrics;
use crate::protocol::{valid_user_id, Ack, ErrorReply, Ref};

impl Session {
    pub(super) fn on_publish(
        &mut self,
        room: &str,
        data: Value,
        reference: Ref,
        ctx: &mut Context<Self>,
    ) {
        let Some(room) = self.room_arg(room, &reference, ctx) else {
            return;
        };
        if !self.claims.may_publish(room.as_str()) {
            let err = ErrorReply::forbidden(format!("not allowed to publish to {room}"));
            return self.reply_error(err, &reference, ctx);
        }
        if !self.rooms.contains(&room) {
            let err = ErrorReply::forbidden(format!("join {room} before publishing to it"));
            return self.reply_error(err, &reference, ctx);
        }
        metrics().published.with_label_values(&["room"]).inc();
        let (messages, user) = (self.state.broker.messages.clone(), self.user.clone());
        let publish = async move {
            let id = messages.publish_room(&room, &user, &data).await?;
            Ok(id.to_string())
        };
        self.publish_and_ack(publish, reference, ctx);
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
        let (messages, user) = (self.state.broker.messages.clone(), self.user.clone());
        let publish = async move { messages.publish_user(&to, &user, &data).await };
        self.publish_and_ack(publish, reference, ctx);
    }

    /// Runs the publish, then acks with its id. `wait`: this connection's
    /// publishes reach the broker in the order it sent them.
    fn publish_and_ack<F>(&mut self, publish: F, reference: Ref, ctx: &mut Context<Self>)
    where
        F: Future<Output = BrokerResult<String>> + 'static,
    {
        ctx.wait(
            publish
                .into_actor(self)
                .map(move |result, this, ctx| match result {
                    Ok(id) => this.ack(Ack::to(&reference).id(id), ctx),
                    Err(e) => this.reply_broker_error(e, &reference, ctx),
                }),
        );
    }
}
