//! The Session actor: one per WebSocket connection, from the moment it is
//! authenticated to its close.
//!
//! The session owns its TCP socket from the upgrade on (see
//! [`crate::http::ws`]): the actor reads it ([`reader`]) and a task of its
//! own writes it ([`writer`]), both on the session's worker thread.
//!
//! Reading: the actor consumes the connection's frame stream, enforces the
//! size limit (1009, from a frame's header), binary frames (1003), text
//! that is not UTF-8 (1007), WebSocket protocol errors (1002), the token
//! bucket with strikes (every frame counts, pings and pongs too),
//! and hands each client frame to its handler: one file per frame of
//! docs/protocol.md §3 ([`join`], [`leave`], [`publish`] (publish and
//! direct), [`presence`], [`task`] (task, task_status, task_cancel),
//! [`refresh`], [`ping`]), all answering
//! through [`reply`].
//!
//! Writing: everything for the client — the session's own replies, its
//! heartbeat pings and the hub's deliveries — goes through one queue
//! ([`outbound`], bounded in frames and in bytes) to the socket writer
//! ([`writer`]). When the queue is full, or the socket has taken nothing
//! for `limits.write_timeout_s`, the session is closed with 1013 `slow
//! consumer` instead of growing. A close is signalled to the writer, which
//! sends it behind what is already queued (except for `slow consumer`).
//!
//! Lifetime: heartbeat pings every `server.heartbeat_s`, each with a
//! random payload; a client that has shown no sign of reading for
//! `server.client_timeout_s` — no frame, no ping, no pong echoing one of
//! ours (an unsolicited pong proves nothing) — is closed; the token's
//! `exp` closes the session with 1008 `token expired` unless a `refresh`
//! moved it. The connection's place among the instance's
//! (`limits.max_connections`) and its entry in the registry (the per-user
//! limit) are held until the socket is gone ([`Held`], owned by the
//! writer), not merely until the session has stopped.

pub mod echo;
mod join;
mod leave;
pub mod outbound;
mod ping;
mod presence;
mod publish;
mod reader;
mod refresh;
pub(crate) mod reply;
mod task;
mod writer;

pub use self::outbound::Outbound;
pub use self::writer::CLOSE_TIMEOUT;

use std::collections::{HashSet, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_ws::AggregatedMessage;
use bytes::BytesMut;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use self::outbound::{Bounds, OutboundQueue};
use self::reader::{FrameReader, ReadError};
use self::writer::SocketWriter;

use crate::auth::Claims;
use crate::broker::Broker;
use crate::hub::{CloseSession, Connect, Disconnect, Hub};
use crate::metrics::metrics;
use crate::protocol::{
    parse_client_frame, ClientFrame, CloseReason, ErrorCode, ErrorReply, Ref, RoomName,
};
use crate::ratelimit::TokenBucket;
use crate::state::{AppState, ConnectionSlot};

/// The longest a session timer waits (a year).
const MAX_TIMER_MS: u64 = 365 * 24 * 3600 * 1000;

/// A session's key, unique within the instance: how its hub knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionKey(u64);

impl SessionKey {
    pub const fn new(n: u64) -> SessionKey {
        SessionKey(n)
    }

    pub const fn get(self) -> u64 {
        self.0
    }
}

/// What a connection holds until its socket is gone: its place among the
/// instance's connections and its entry in the broker's registry (which
/// the per-user limit counts). Owned by the socket writer, so a closed
/// session whose socket lingers (a client taking its close frame, at most
/// [`CLOSE_TIMEOUT`]) still counts against both limits.
pub struct Held {
    slot: Option<ConnectionSlot>,
    registered: Option<(Broker, Arc<str>, Arc<str>)>,
}

impl Held {
    /// Nothing to hold (the echo endpoint's connections).
    pub fn nothing() -> Held {
        Held {
            slot: None,
            registered: None,
        }
    }

    /// A slot, and the registry entry of `connection_id` (of `user`).
    pub fn registered(
        slot: ConnectionSlot,
        broker: Broker,
        connection_id: &str,
        user: &str,
    ) -> Held {
        Held {
            slot: Some(slot),
            registered: Some((broker, connection_id.into(), user.into())),
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.slot = None;
        let Some((broker, id, user)) = self.registered.take() else {
            return;
        };
        // Dropped on a worker thread; at process exit there may be no
        // runtime left, and the broker's shutdown removes the instance's
        // registrations anyway.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { broker.registry.unregister(&id, &user).await });
        }
    }
}

pub struct Session {
    key: SessionKey,
    connection_id: Arc<str>,
    user: Arc<str>,
    claims: Claims,
    state: Arc<AppState>,
    hub: Addr<Hub>,
    outbound: OutboundQueue,
    /// Set once the session has closed (or begun to).
    closed: bool,
    rooms: HashSet<RoomName>,
    bucket: TokenBucket,
    strikes: u32,
    /// When the client last showed it reads (see the module doc).
    last_seen: Instant,
    /// The payload of the last heartbeat ping, which a pong must echo.
    ping_payload: Option<[u8; 8]>,
    expiry: Option<SpawnHandle>,
    /// The answers of the publishes in flight, oldest first.
    in_flight: VecDeque<oneshot::Receiver<()>>,
}

/// What an accepted connection brings to its session. What it holds goes
/// to the socket writer: it is given back once the socket is gone.
pub struct Accepted {
    pub claims: Claims,
    pub connection_id: String,
    pub held: Held,
}

impl Session {
    /// Starts the actor and the socket writer for an accepted connection,
    /// whose handshake is answered. `leftover`: what the client sent
    /// behind its upgrade request.
    pub fn start(
        state: Arc<AppState>,
        hub: Addr<Hub>,
        accepted: Accepted,
        socket: TcpStream,
        leftover: BytesMut,
    ) {
        let limits = &state.config.limits;
        let outbound = OutboundQueue::new(Bounds::from_limits(limits));
        let Accepted {
            claims,
            connection_id,
            held,
        } = accepted;
        let socket = Rc::new(socket);
        let stream = FrameReader::new(socket.clone(), leftover, limits.max_message_bytes);
        let bucket = TokenBucket::new(limits.messages_per_second, limits.burst);
        let key = state.next_session_key();
        let write_timeout = Duration::from_secs(limits.write_timeout_s);
        Session::create(move |ctx| {
            let writer = SocketWriter::new(
                socket,
                outbound.clone(),
                held,
                state.socket_token(),
                ctx.address().recipient(),
                write_timeout,
            );
            actix::spawn(writer);
            ctx.add_stream(stream);
            Session {
                key,
                connection_id: connection_id.into(),
                user: claims.sub.clone().into(),
                claims,
                state,
                hub,
                outbound,
                closed: false,
                rooms: HashSet::new(),
                bucket,
                strikes: 0,
                last_seen: Instant::now(),
                ping_payload: None,
                expiry: None,
                in_flight: VecDeque::new(),
            }
        });
    }

    /// Queues an item for this client; a full queue closes the session.
    fn send(&mut self, item: Outbound, ctx: &mut Context<Self>) {
        if self.outbound.push(item).is_err() {
            self.close(CloseReason::SlowConsumer, ctx);
        }
    }

    fn close(&mut self, reason: CloseReason, ctx: &mut Context<Self>) {
        if std::mem::replace(&mut self.closed, true) {
            return;
        }
        metrics()
            .connections_closed
            .with_label_values(&[reason.label()])
            .inc();
        if reason == CloseReason::SlowConsumer {
            metrics().slow_consumer_closes.inc();
        }
        tracing::debug!(connection_id = %self.connection_id, reason = reason.label(), "closing session");
        self.outbound.close(reason);
        ctx.stop();
    }

    fn schedule_expiry(&mut self, ctx: &mut Context<Self>) {
        if let Some(handle) = self.expiry.take() {
            ctx.cancel_future(handle);
        }
        // A far `exp` waits at most a year per timer (and no time overflows).
        let left = self
            .claims
            .exp
            .saturating_mul(1000)
            .saturating_sub(crate::clock::now_ms())
            .min(MAX_TIMER_MS);
        let expired = left < MAX_TIMER_MS;
        self.expiry = Some(
            ctx.run_later(Duration::from_millis(left), move |this, ctx| {
                if !expired {
                    return this.schedule_expiry(ctx);
                }
                this.close(CloseReason::TokenExpired, ctx);
            }),
        );
    }

    /// Takes a token from the bucket for a client frame. With none left
    /// the frame is refused: a strike, and after `limits.rate_limit_strikes`
    /// in a row the session closes (1008 `rate limit`). `Err(true)`: refused
    /// and the session goes on (a request gets `rate_limited`).
    fn take_token(&mut self, ctx: &mut Context<Self>) -> Result<(), bool> {
        if self.bucket.try_take() {
            self.strikes = 0;
            return Ok(());
        }
        self.strikes += 1;
        if self.strikes >= self.state.config.limits.rate_limit_strikes {
            self.close(CloseReason::RateLimit, ctx);
            return Err(false);
        }
        Err(true)
    }

    /// [`Self::take_token`] for a request: a refusal is answered with
    /// `rate_limited`.
    fn within_rate(&mut self, reference: &Ref, ctx: &mut Context<Self>) -> bool {
        match self.take_token(ctx) {
            Ok(()) => true,
            Err(false) => false,
            Err(true) => {
                let per_second = self.state.config.limits.messages_per_second;
                let message = format!("over {per_second} messages per second");
                let err = ErrorReply::new(ErrorCode::RateLimited, message);
                self.reply_error(err, reference, ctx);
                false
            }
        }
    }

    fn on_text(&mut self, text: &str, ctx: &mut Context<Self>) {
        let parsed = parse_client_frame(text);
        let (kind, reference) = match &parsed {
            Ok((frame, r)) => (frame.kind(), r.clone()),
            Err((_, r)) => ("invalid", r.clone()),
        };
        metrics().frames_received.with_label_values(&[kind]).inc();
        if !self.within_rate(&reference, ctx) {
            return;
        }
        match parsed {
            Ok((frame, reference)) => self.on_frame(frame, reference, ctx),
            Err((err, reference)) => self.reply_error(err, &reference, ctx),
        }
    }

    /// Handles a frame now, or once the publishes in flight are answered
    /// when it must come after them (reading waits meanwhile).
    fn on_frame(&mut self, frame: ClientFrame, reference: Ref, ctx: &mut Context<Self>) {
        let publish = matches!(
            frame,
            ClientFrame::Publish { .. } | ClientFrame::Direct { .. }
        );
        match self.publishes_pending(publish) {
            None => self.handle_frame(frame, reference, ctx),
            Some(answered) => ctx.wait(
                async move {
                    let _ = answered.await;
                }
                .into_actor(self)
                .map(move |(), this, ctx| this.handle_frame(frame, reference, ctx)),
            ),
        }
    }

    /// One handler per client frame.
    fn handle_frame(&mut self, frame: ClientFrame, reference: Ref, ctx: &mut Context<Self>) {
        match frame {
            ClientFrame::Join { room, since } => self.on_join(&room, since, reference, ctx),
            ClientFrame::Leave { room } => self.on_leave(&room, reference, ctx),
            ClientFrame::Publish {
                room,
                data,
                idempotency_key,
            } => self.on_publish(&room, data, idempotency_key, reference, ctx),
            ClientFrame::Direct { to, data } => self.on_direct(to, data, reference, ctx),
            ClientFrame::Presence { room } => self.on_presence(&room, reference, ctx),
            ClientFrame::Task {
                name,
                payload,
                idempotency_key,
            } => self.on_task(name, payload, idempotency_key, reference, ctx),
            ClientFrame::TaskStatus { task_id } => self.on_task_status(task_id, reference, ctx),
            ClientFrame::TaskCancel { task_id } => self.on_task_cancel(task_id, reference, ctx),
            ClientFrame::Refresh { token } => self.on_refresh(&token, reference, ctx),
            ClientFrame::Ping => self.on_ping(reference, ctx),
        }
    }
}

impl Actor for Session {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let state = self.state.clone();
        let cfg = &state.config;
        let welcome = crate::protocol::welcome_frame(
            &self.connection_id,
            &self.user,
            &state.instance_id,
            cfg.server.heartbeat_s,
        );
        self.send(Outbound::Frame(welcome), ctx);
        outbound::hand_over(self.key, self.outbound.clone());
        self.hub.do_send(Connect {
            key: self.key,
            user: self.user.clone(),
            connection_id: self.connection_id.clone(),
            session: ctx.address().recipient(),
        });
        let timeout = Duration::from_secs(cfg.server.client_timeout_s);
        ctx.run_interval(
            Duration::from_secs(cfg.server.heartbeat_s),
            move |this, ctx| {
                if this.last_seen.elapsed() >= timeout {
                    this.close(CloseReason::ClientTimeout, ctx);
                } else {
                    let payload = rand::random::<[u8; 8]>();
                    this.ping_payload = Some(payload);
                    // A ping that cannot be queued: a slow consumer.
                    this.send(Outbound::Ping(payload), ctx);
                }
            },
        );
        self.schedule_expiry(ctx);
        metrics().connections_open.inc();
        metrics().connections_accepted.inc();
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        // Ends the writer if no close was sent (the client went away).
        self.outbound.end();
        outbound::take_handed(self.key);
        self.hub.do_send(Disconnect { key: self.key });
        metrics().connections_open.dec();
        // The registry entry goes with the socket ([`Held`]).
        self.state.broker.subscriptions.unwatch_user(&self.user);
    }
}

impl Handler<CloseSession> for Session {
    type Result = ();

    fn handle(&mut self, msg: CloseSession, ctx: &mut Self::Context) {
        self.close(msg.0, ctx);
    }
}

impl StreamHandler<Result<AggregatedMessage, ReadError>> for Session {
    fn handle(&mut self, item: Result<AggregatedMessage, ReadError>, ctx: &mut Self::Context) {
        let message = match item {
            Ok(message) => message,
            Err(e) => {
                tracing::debug!(error = %e, connection_id = %self.connection_id, "reading the connection ended");
                return match e.close_reason() {
                    Some(reason) => self.close(reason, ctx),
                    // The client went away (reset): there is nobody to close.
                    None => ctx.stop(),
                };
            }
        };
        match message {
            AggregatedMessage::Text(text) => {
                self.last_seen = Instant::now();
                self.on_text(&text, ctx);
            }
            AggregatedMessage::Binary(_) => self.close(CloseReason::BinaryNotSupported, ctx),
            AggregatedMessage::Ping(payload) => {
                if self.take_token(ctx).is_ok() {
                    self.last_seen = Instant::now();
                    self.send(Outbound::Pong(payload), ctx);
                }
            }
            AggregatedMessage::Pong(payload) => {
                let answers_ours = self.ping_payload.is_some_and(|p| payload[..] == p[..]);
                if self.take_token(ctx).is_ok() && answers_ours {
                    self.last_seen = Instant::now();
                }
            }
            AggregatedMessage::Close(_) => self.close(CloseReason::Normal, ctx),
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        ctx.stop();
    }
}
