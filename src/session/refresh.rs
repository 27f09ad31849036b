//! `refresh`: `token` — a new JWT for the same `sub` moves the session's
//! expiry; anything else is `forbidden` and the old token stays. Rooms the
//! new token does not allow are left, and named in the ack (`left`).

use actix::Context;
use tokio::sync::oneshot;

use super::Session;
use crate::hub::Leave;
use crate::protocol::{Ack, ErrorReply, Ref, RoomName};

impl Session {
    pub(super) fn on_refresh(&mut self, token: &str, reference: Ref, ctx: &mut Context<Self>) {
        match self.state.verifier.verify(token) {
            Ok(claims) if claims.sub == self.claims.sub => {
                self.claims = claims;
                self.schedule_expiry(ctx);
                let left = self.leave_disallowed_rooms(ctx);
                self.ack(Ack::to(&reference).left(&left), ctx);
            }
            Ok(_) => {
                let err = ErrorReply::forbidden("refresh refused: the token names another user");
                self.reply_error(err, &reference, ctx);
            }
            Err(e) => {
                let err = ErrorReply::forbidden(format!("refresh refused: {e}"));
                self.reply_error(err, &reference, ctx);
            }
        }
    }

    /// Ends the memberships the current token no longer allows; their names.
    fn leave_disallowed_rooms(&mut self, ctx: &mut Context<Self>) -> Vec<String> {
        let gone: Vec<RoomName> = self
            .rooms
            .iter()
            .filter(|room| !self.claims.may_join(room.as_str()))
            .cloned()
            .collect();
        for room in &gone {
            self.rooms.remove(room);
            let (done, answered) = oneshot::channel();
            self.hub.do_send(Leave {
                key: self.key,
                room: room.clone(),
                reference: None,
                quiet: true,
                done,
            });
            self.wait_for(answered, ctx);
        }
        let mut names: Vec<String> = gone.iter().map(|r| r.as_str().to_owned()).collect();
        names.sort();
        names
    }
}
