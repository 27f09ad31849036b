//! `ping`: answered with `pong`.

use actix::Context;

use super::Session;
use crate::protocol::{pong_frame, Ref};

impl Session {
    pub(super) fn on_ping(&mut self, reference: Ref, ctx: &mut Context<Self>) {
        self.reply(pong_frame(&reference), ctx);
    }
}
