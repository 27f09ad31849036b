//! `task`: `name`, `payload`, `idempotency_key`? — async tasks (contract
//! section 6) are not in this build, so no task name is configured.

use actix::Context;

use super::Session;
use crate::protocol::{ErrorCode, ErrorReply, Ref};

impl Session {
    pub(super) fn on_task(&mut self, name: &str, reference: Ref, ctx: &mut Context<Self>) {
        let err = ErrorReply::new(ErrorCode::NotFound, format!("unknown task {name:?}"));
        self.reply_error(err, &reference, ctx);
    }
}
