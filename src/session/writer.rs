//! The socket writer: the WebSocket response's body. It drains the
//! session's bounded outbound queue ([`crate::hub::queue`]), holds its
//! connection slot and its place in the shutdown tracker, and is polled by
//! the connection's own task (the HTTP dispatcher) whenever the socket has
//! room: each poll encodes every queued item (up to [`CHUNK`] bytes)
//! straight into one buffer, allocated once at its size, so a burst of
//! deliveries is one write, and a delivery costs one queue push and at
//! most one wake-up of the connection's task, all on one thread.
//! (Tried: sending each delivery as its envelope's bytes, encoded once per
//! publish and shared, to save the copy. Slower in the harness, 505k
//! against 707k deliveries/s: the dispatcher's per-chunk work costs more
//! than a 150-byte copy.)
//!
//! A close goes behind what is already queued (up to [`CLOSE_BACKLOG`]
//! of it, encoded at once; the rest is dropped), except 1013 `slow
//! consumer`, whose queue is dropped at once. Either way the queue takes
//! no more once the close is signalled, the close frame is the last thing
//! written, and the connection slot and the tracker's token are given back
//! as soon as it is encoded (a client that never reads does not hold them).
//! The queue ending without a close (the session is gone because the client
//! went away) ends the body with nothing more to send; the writer going
//! away (the connection is gone) ends the queue.
//!
//! It also holds actix-ws's own response body, unpolled: dropping that is
//! how actix-ws's message stream learns that the connection is gone.

use std::pin::Pin;
use std::task::{Context, Poll};

use actix_http::ws::{OpCode, Parser};
use actix_web::body::{BodySize, BoxBody, MessageBody};
use bytes::{Bytes, BytesMut};
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::clock::now_us;
use crate::hub::queue::Status;
use crate::hub::{Outbound, OutboundQueue};
use crate::metrics;
use crate::protocol::CloseReason;
use crate::state::ConnectionSlot;

/// At most this much is encoded per poll before the socket gets it.
const CHUNK: usize = 64 * 1024;
/// At most this much of what was queued goes out before a close frame.
const CLOSE_BACKLOG: usize = 1024 * 1024;
/// An unmasked (server) frame's size on the wire for `len` payload bytes:
/// exact, so that a batch's buffer is full when frozen and becomes the
/// chunk without a second allocation.
fn frame_size(len: usize) -> usize {
    let header = match len {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    };
    header + len
}

pub struct SocketWriter {
    queue: OutboundQueue,
    buf: BytesMut,
    /// The close frame is encoded: what is in `buf` is the last.
    closed: bool,
    held: Option<(ConnectionSlot, TaskTrackerToken)>,
    _actix_ws_body: BoxBody,
}

/// What an item puts on the wire, and its opcode.
fn payload(item: &Outbound) -> (&[u8], OpCode) {
    match item {
        Outbound::Frame(text) => (text.as_bytes(), OpCode::Text),
        Outbound::Delivery(envelope) => (envelope.frame.as_bytes(), OpCode::Text),
        Outbound::Ping => (b"", OpCode::Ping),
        Outbound::Pong(payload) => (payload, OpCode::Pong),
    }
}

impl SocketWriter {
    pub(super) fn new(
        queue: OutboundQueue,
        slot: ConnectionSlot,
        token: TaskTrackerToken,
        actix_ws_body: BoxBody,
    ) -> SocketWriter {
        SocketWriter {
            queue,
            buf: BytesMut::new(),
            closed: false,
            held: Some((slot, token)),
            _actix_ws_body: actix_ws_body,
        }
    }

    /// Encodes one item. `now`: the clock, read once per batch (the first
    /// delivery that needs it), not once per frame.
    fn encode(buf: &mut BytesMut, item: &Outbound, now: &mut Option<u64>) {
        if let Outbound::Delivery(envelope) = item {
            if envelope.published_us > 0 {
                let now = *now.get_or_insert_with(now_us);
                let latency_us = now.saturating_sub(envelope.published_us);
                metrics::record_delivery(latency_us as f64 / 1e6);
            }
        }
        let (payload, op) = payload(item);
        Parser::write_message(buf, payload, op, true, false);
    }

    /// Encodes what is queued, up to [`CHUNK`]; the session's status.
    fn drain(&mut self, cx: &mut Context<'_>) -> Status {
        let mut now = None;
        let buf = &mut self.buf;
        // One allocation per batch, of its exact size: nothing kept while
        // idle, and nothing to copy or box when it becomes the chunk.
        buf.reserve(
            self.queue
                .queued_size(|i| frame_size(payload(i).0.len()), CHUNK),
        );
        self.queue.poll_drain(cx, |item| {
            Self::encode(buf, &item, &mut now);
            buf.len() < CHUNK
        })
    }

    /// The close: what is queued first (not for `slow consumer`), then the
    /// close frame; the slot and the token go back.
    fn finish(&mut self, reason: CloseReason) {
        let backlog = self.queue.take_all();
        if reason != CloseReason::SlowConsumer {
            let mut now = None;
            for item in &backlog {
                if self.buf.len() >= CLOSE_BACKLOG {
                    // The rest is dropped: the client can recover with `since`.
                    tracing::debug!("close: backlog over 1 MiB dropped");
                    break;
                }
                Self::encode(&mut self.buf, item, &mut now);
            }
        }
        Parser::write_close(&mut self.buf, Some(reason.to_ws()), false);
        self.closed = true;
        self.held = None;
    }
}

impl Drop for SocketWriter {
    fn drop(&mut self) {
        // The connection is gone: nothing queued from now on is kept.
        self.queue.abandon();
    }
}

impl MessageBody for SocketWriter {
    type Error = std::convert::Infallible;

    fn size(&self) -> BodySize {
        BodySize::Stream
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let this = self.get_mut();
        if !this.closed {
            match this.drain(cx) {
                Status::Open => {}
                Status::Closing(reason) => this.finish(reason),
                // The session is gone without a close: nobody to write to.
                Status::Ended => {
                    this.closed = true;
                    this.held = None;
                    this.buf.clear();
                }
            }
        }
        if !this.buf.is_empty() {
            return Poll::Ready(Some(Ok(std::mem::take(&mut this.buf).freeze())));
        }
        if this.closed {
            return Poll::Ready(None);
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_size_is_what_the_parser_writes() {
        for len in [0, 1, 125, 126, 127, 65535, 65536, 70000] {
            let payload = vec![b'x'; len];
            let mut buf = BytesMut::new();
            Parser::write_message(&mut buf, &payload[..], OpCode::Text, true, false);
            assert_eq!(buf.len(), frame_size(len), "payload of {len} bytes");
        }
    }
}
