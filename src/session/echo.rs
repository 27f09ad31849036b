//! An echo session, for the WebSocket conformance run (the Autobahn
//! TestSuite, `tests/autobahn/`): it reads with the session's frame reader
//! ([`super::reader`]) and writes through the session's outbound queue and
//! socket writer ([`super::outbound`], [`super::writer`]), exactly as a
//! [`super::Session`] does, and sends every message back as it came (text
//! as text, binary as binary). Nothing else of a session is here: no auth,
//! no hub, no rate limit. It is served only by the `autobahn_echo` example
//! binary ([`crate::http::echo`]), never by the hub.

use std::rc::Rc;
use std::time::Duration;

use actix::prelude::*;
use actix_ws::AggregatedMessage;
use bytes::BytesMut;
use tokio::net::TcpStream;
use tokio_util::task::TaskTracker;

use super::outbound::{Bounds, Outbound, OutboundQueue};
use super::reader::{FrameReader, ReadError};
use super::writer::SocketWriter;
use super::Held;
use crate::hub::CloseSession;
use crate::protocol::CloseReason;

/// What an echo session may hold.
#[derive(Debug, Clone, Copy)]
pub struct EchoLimits {
    /// The largest message it takes (a frame or a fragmented message).
    pub max_message_bytes: usize,
    /// Its outbound queue's bounds.
    pub outbound: Bounds,
    /// How long its socket may take nothing before it is closed.
    pub write_timeout: Duration,
}

pub struct Echo {
    outbound: OutboundQueue,
    closed: bool,
}

impl Echo {
    /// Starts an echo session on an upgraded connection. `leftover`: what
    /// the client sent behind its upgrade request.
    pub fn start(socket: TcpStream, leftover: BytesMut, limits: EchoLimits) {
        let outbound = OutboundQueue::new(limits.outbound);
        let socket = Rc::new(socket);
        let stream = FrameReader::new(socket.clone(), leftover, limits.max_message_bytes);
        Echo::create(move |ctx| {
            let writer = SocketWriter::new(
                socket,
                outbound.clone(),
                Held::nothing(),
                TaskTracker::new().token(),
                ctx.address().recipient(),
                limits.write_timeout,
            );
            actix::spawn(writer);
            ctx.add_stream(stream);
            Echo {
                outbound,
                closed: false,
            }
        });
    }

    fn send(&mut self, item: Outbound, ctx: &mut Context<Self>) {
        if self.outbound.push(item).is_err() {
            self.close(CloseReason::SlowConsumer, ctx);
        }
    }

    fn close(&mut self, reason: CloseReason, ctx: &mut Context<Self>) {
        if std::mem::replace(&mut self.closed, true) {
            return;
        }
        self.outbound.close(reason);
        ctx.stop();
    }
}

impl Actor for Echo {
    type Context = Context<Self>;

    fn stopped(&mut self, _: &mut Self::Context) {
        self.outbound.end();
    }
}

impl Handler<CloseSession> for Echo {
    type Result = ();

    fn handle(&mut self, msg: CloseSession, ctx: &mut Self::Context) {
        self.close(msg.0, ctx);
    }
}

impl StreamHandler<Result<AggregatedMessage, ReadError>> for Echo {
    fn handle(&mut self, item: Result<AggregatedMessage, ReadError>, ctx: &mut Self::Context) {
        match item {
            Ok(AggregatedMessage::Text(text)) => self.send(Outbound::Frame(text), ctx),
            Ok(AggregatedMessage::Binary(bytes)) => self.send(Outbound::Binary(bytes), ctx),
            Ok(AggregatedMessage::Ping(payload)) => self.send(Outbound::Pong(payload), ctx),
            Ok(AggregatedMessage::Pong(_)) => {}
            Ok(AggregatedMessage::Close(_)) => self.close(CloseReason::Normal, ctx),
            Err(e) => match e.close_reason() {
                Some(reason) => self.close(reason, ctx),
                None => ctx.stop(),
            },
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        ctx.stop();
    }
}
