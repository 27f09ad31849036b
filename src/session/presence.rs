//! `presence`: `room` — who is in it, cluster-wide. Needs join permission.

use actix::prelude::*;

use super::Session;
use crate::protocol::{presence_frame, ErrorReply, Ref};

impl Session {
    pub(super) fn on_presence(&mut self, room: &str, reference: Ref, ctx: &mut Context<Self>) {
        let Some(room) = self.room_arg(room, &reference, ctx) else {
            return;
        };
        if !self.claims.may_join(room.as_str()) {
            let err = ErrorReply::forbidden(format!("not allowed to see {room}"));
            return self.reply_error(err, &reference, ctx);
        }
        let presence = self.state.broker.presence.clone();
        let list = async move {
            let users = presence.list(&room).await;
            (room, users)
        };
        ctx.wait(
            list.into_actor(self)
                .map(move |(room, result), this, ctx| match result {
                    Ok(users) => this.reply(presence_frame(room.as_str(), &users, &reference), ctx),
                    Err(e) => this.reply_broker_error(e, &reference, ctx),
                }),
        );
    }
}
