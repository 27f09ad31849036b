//! `leave`: `room` — acked by the hub once the membership is gone (also
//! for a room not joined).

use actix::Context;
use tokio::sync::oneshot;

use super::Session;
use crate::hub::Leave;
use crate::protocol::Ref;

impl Session {
    pub(super) fn on_leave(&mut self, room: &str, reference: Ref, ctx: &mut Context<Self>) {
        let Some(room) = self.room_arg(room, &reference, ctx) else {
            return;
        };
        self.rooms.remove(&room);
        let (done, answered) = oneshot::channel();
        self.hub.do_send(Leave {
            key: self.key,
            room,
            reference,
            quiet: false,
            done,
        });
        self.wait_for(answered, ctx);
    }
}
