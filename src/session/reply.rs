//! The one way a session answers a client frame: an `ack`, an `error`, or
//! another direct reply, each carrying the request's `ref`. A frame whose
//! answer takes a round trip holds the session's next frame back until it
//! is answered (`ctx.wait`), so every request gets one reply, in order.
//! Publishes are the exception ([`super::publish`]): several can be in
//! flight, acked in order, and any other reply waits behind their acks.

use actix::prelude::*;
use bytestring::ByteString;
use tokio::sync::oneshot;

use super::Outbound;
use super::Session;
use crate::broker::BrokerError;
use crate::metrics::metrics;
use crate::protocol::{error_frame, Ack, ErrorReply, Ref, RoomName};

impl Session {
    /// A direct reply (ack, presence, pong) for this client, behind the
    /// acks of the publishes in flight.
    pub(super) fn reply(&mut self, frame: ByteString, ctx: &mut Context<Self>) {
        match self.publishes_pending(false) {
            None => self.send(Outbound::Frame(frame), ctx),
            Some(answered) => ctx.wait(
                async move {
                    let _ = answered.await;
                }
                .into_actor(self)
                .map(move |(), this, ctx| this.send(Outbound::Frame(frame), ctx)),
            ),
        }
    }

    pub(super) fn ack(&mut self, ack: Ack<'_>, ctx: &mut Context<Self>) {
        self.reply(ack.encode(), ctx);
    }

    pub(super) fn reply_error(
        &mut self,
        err: ErrorReply,
        reference: &Ref,
        ctx: &mut Context<Self>,
    ) {
        self.reply(counted_error_frame(&err, reference), ctx);
    }

    /// A broker failure, as [`ErrorReply::from`] tells it.
    pub(super) fn reply_broker_error(
        &mut self,
        err: BrokerError,
        reference: &Ref,
        ctx: &mut Context<Self>,
    ) {
        self.reply_error(ErrorReply::from(&err), reference, ctx);
    }

    /// Reads no further frame until `answered` resolves (the hub has put
    /// its answer in the queue), so replies come in the order of requests.
    pub(super) fn wait_for(&mut self, answered: oneshot::Receiver<()>, ctx: &mut Context<Self>) {
        ctx.wait(
            async move {
                let _ = answered.await;
            }
            .into_actor(self),
        );
    }

    /// A room name from the client, or `bad_request` sent and `None`.
    pub(super) fn room_arg(
        &mut self,
        room: &str,
        reference: &Ref,
        ctx: &mut Context<Self>,
    ) -> Option<RoomName> {
        match RoomName::parse(room) {
            Ok(room) => Some(room),
            Err(e) => {
                self.reply_error(ErrorReply::bad_request(e), reference, ctx);
                None
            }
        }
    }
}

/// An `error` frame, counted in `switchboard_errors_total`: how every error
/// reaches a client, from its session or its hub.
pub(crate) fn counted_error_frame(err: &ErrorReply, reference: &Ref) -> ByteString {
    metrics()
        .errors
        .with_label_values(&[err.code.as_str()])
        .inc();
    error_frame(err, reference)
}
