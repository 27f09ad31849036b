//! `join`: `room`, `since`? — membership checks here, the replay/live seam
//! in the hub; the session reads its next frame once the hub has answered.

use actix::Context;
use tokio::sync::oneshot;

use super::Session;
use crate::hub::Join;
use crate::protocol::{ErrorCode, ErrorReply, MessageId, Ref};

impl Session {
    pub(super) fn on_join(
        &mut self,
        room: &str,
        since: Option<String>,
        reference: Ref,
        ctx: &mut Context<Self>,
    ) {
        let Some(room) = self.room_arg(room, &reference, ctx) else {
            return;
        };
        let since = match since.map(|s| s.parse::<MessageId>()).transpose() {
            Ok(since) => since,
            Err(e) => return self.reply_error(ErrorReply::bad_request(e), &reference, ctx),
        };
        if !self.claims.may_join(room.as_str()) {
            let err = ErrorReply::forbidden(format!("not allowed to join {room}"));
            return self.reply_error(err, &reference, ctx);
        }
        let max = self.state.config.limits.max_rooms_per_connection;
        if !self.rooms.contains(&room) && self.rooms.len() >= max {
            let message = format!("a connection may join at most {max} rooms");
            let err = ErrorReply::new(ErrorCode::LimitExceeded, message);
            return self.reply_error(err, &reference, ctx);
        }
        self.rooms.insert(room.clone());
        let (done, answered) = oneshot::channel();
        self.hub.do_send(Join {
            key: self.key,
            room,
            since,
            reference,
            done,
        });
        self.wait_for(answered, ctx);
    }
}
