//! `refresh`: `token` — a new JWT for the same `sub` moves the session's
//! expiry; anything else is `forbidden` and the old token stays.

use actix::Context;

use super::Session;
use crate::protocol::{Ack, ErrorReply, Ref};

impl Session {
    pub(super) fn on_refresh(&mut self, token: &str, reference: Ref, ctx: &mut Context<Self>) {
        match self.state.verifier.verify(token) {
            Ok(claims) if claims.sub == self.claims.sub => {
                self.claims = claims;
                self.schedule_expiry(ctx);
                self.ack(Ack::to(&reference), ctx);
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
}
