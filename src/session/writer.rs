//! The socket writer: the WebSocket response's body. It owns the
//! session's bounded outbound queue, its connection slot and its place in
//! the shutdown tracker, and is polled by the connection's own task (the
//! HTTP dispatcher) whenever the socket has room: each poll encodes every
//! queued item (up to [`CHUNK`] bytes) straight into one buffer, so a
//! burst of deliveries is one write, and a delivery costs one queue push
//! and at most one wake-up of the connection's task.
//!
//! A close goes behind what is already queued (up to [`CLOSE_BACKLOG`]
//! of it, encoded at once; the rest is dropped), except 1013 `slow
//! consumer`, whose queue is dropped at once. Either way the queue is
//! closed when the close is signalled, the close frame is the last thing
//! written, and the connection slot and the tracker's token are given back
//! as soon as it is encoded (a client that never reads does not hold them).
//! The queue ending without a close (the session is gone because the client
//! went away) ends the body with nothing more to send.
//!
//! It also holds actix-ws's own response body, unpolled: dropping that is
//! how actix-ws's message stream learns that the connection is gone.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use actix_http::ws::{OpCode, Parser};
use actix_web::body::{BodySize, BoxBody, MessageBody};
use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::clock::now_us;
use crate::hub::Outbound;
use crate::metrics;
use crate::protocol::CloseReason;
use crate::state::ConnectionSlot;

/// At most this much is encoded per poll before the socket gets it.
const CHUNK: usize = 64 * 1024;
/// At most this much of what was queued goes out before a close frame.
const CLOSE_BACKLOG: usize = 1024 * 1024;

pub struct SocketWriter {
    queue: mpsc::Receiver<Outbound>,
    close: Option<oneshot::Receiver<CloseReason>>,
    buf: BytesMut,
    /// The close frame is encoded: what is in `buf` is the last.
    closed: bool,
    held: Option<(ConnectionSlot, TaskTrackerToken)>,
    _actix_ws_body: BoxBody,
}

impl SocketWriter {
    pub(super) fn new(
        queue: mpsc::Receiver<Outbound>,
        close: oneshot::Receiver<CloseReason>,
        slot: ConnectionSlot,
        token: TaskTrackerToken,
        actix_ws_body: BoxBody,
    ) -> SocketWriter {
        SocketWriter {
            queue,
            close: Some(close),
            buf: BytesMut::new(),
            closed: false,
            held: Some((slot, token)),
            _actix_ws_body: actix_ws_body,
        }
    }

    /// Encodes one item. `now`: the clock, read once per batch (the first
    /// delivery that needs it), not once per frame.
    fn encode(&mut self, item: Outbound, now: &mut Option<u64>) {
        let (payload, op): (&[u8], OpCode) = match &item {
            Outbound::Frame(text) => (text.as_bytes(), OpCode::Text),
            Outbound::Delivery(envelope) => {
                if envelope.published_us > 0 {
                    let now = *now.get_or_insert_with(now_us);
                    let latency_us = now.saturating_sub(envelope.published_us);
                    metrics::record_delivery(latency_us as f64 / 1e6);
                }
                (envelope.frame.as_bytes(), OpCode::Text)
            }
            Outbound::Ping => (b"", OpCode::Ping),
            Outbound::Pong(payload) => (payload, OpCode::Pong),
        };
        Parser::write_message(&mut self.buf, payload, op, true, false);
    }

    /// Encodes what is queued, up to [`CHUNK`]; `true` when the queue has
    /// ended (every sender is gone).
    fn drain(&mut self, cx: &mut Context<'_>) -> bool {
        let mut now = None;
        while self.buf.len() < CHUNK {
            match self.queue.poll_recv(cx) {
                Poll::Ready(Some(item)) => self.encode(item, &mut now),
                Poll::Ready(None) => return true,
                Poll::Pending => break,
            }
        }
        false
    }

    /// The close: what is queued first (not for `slow consumer`), then the
    /// close frame; the slot and the token go back.
    fn finish(&mut self, reason: CloseReason) {
        self.queue.close();
        if reason == CloseReason::SlowConsumer {
            while self.queue.try_recv().is_ok() {}
        } else {
            let mut now = None;
            while let Ok(item) = self.queue.try_recv() {
                if self.buf.len() >= CLOSE_BACKLOG {
                    // The rest is dropped: the client can recover with `since`.
                    tracing::debug!("close: backlog over 1 MiB dropped");
                    break;
                }
                self.encode(item, &mut now);
            }
        }
        Parser::write_close(&mut self.buf, Some(reason.to_ws()), false);
        self.closed = true;
        self.held = None;
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
            let signalled = match this.close.as_mut().map(|c| Pin::new(c).poll(cx)) {
                Some(Poll::Ready(reason)) => {
                    this.close = None;
                    Some(reason.ok())
                }
                _ => None,
            };
            match signalled {
                Some(Some(reason)) => this.finish(reason),
                // The session is gone without a close: nobody to write to.
                Some(None) => {
                    this.closed = true;
                    this.held = None;
                    this.buf.clear();
                }
                None => {
                    if this.drain(cx) {
                        this.closed = true;
                        this.held = None;
                    }
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
