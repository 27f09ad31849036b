//! The Session actor: one per WebSocket connection, from the moment it is
//! authenticated to its close.
//!
//! Reading: the actor consumes the connection's frame stream, enforces the
//! size limit (1009), binary frames (1003), the token bucket with strikes,
//! and answers each client frame of contract section 3.
//!
//! Writing: everything for the client — the session's own replies and the
//! hub's deliveries — goes through one bounded queue of
//! `limits.max_outbound_queue` items to a writer task that owns the socket.
//! When the queue is full the session is closed with 1013 `slow consumer`
//! instead of growing. A close is signalled to the writer out of band, so it
//! overtakes whatever is still queued.
//!
//! Lifetime: heartbeat pings every `server.heartbeat_s`; a client silent for
//! `server.client_timeout_s` is closed; the token's `exp` closes the session
//! with 1008 `token expired` unless a `refresh` moved it.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_ws::{AggregatedMessage, ProtocolError};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};

use crate::auth::Claims;
use crate::broker::{now_us, BrokerError};
use crate::hub::{CloseSession, Connect, Disconnect, Hub, Join, Leave, Outbound};
use crate::metrics::{self, metrics};
use crate::protocol::{
    ack_frame, error_frame, parse_client_frame, pong_frame, presence_frame, valid_user_id, Ack,
    ClientFrame, CloseReason, ErrorCode, ErrorReply, MessageId, Ref, RoomName,
};
use crate::ratelimit::TokenBucket;
use crate::server::{ConnectionSlot, Shared};

pub struct Session {
    key: u64,
    connection_id: Arc<str>,
    user: Arc<str>,
    claims: Claims,
    shared: Arc<Shared>,
    hub: Addr<Hub>,
    outbound: mpsc::Sender<Outbound>,
    close: Option<oneshot::Sender<CloseReason>>,
    rooms: HashSet<RoomName>,
    bucket: TokenBucket,
    strikes: u32,
    last_seen: Instant,
    expiry: Option<SpawnHandle>,
    _slot: ConnectionSlot,
}

impl Session {
    /// Starts the actor and its socket writer for an accepted connection.
    pub fn start(
        shared: Arc<Shared>,
        hub: Addr<Hub>,
        claims: Claims,
        connection_id: String,
        slot: ConnectionSlot,
        ws: actix_ws::Session,
        stream: actix_ws::MessageStream,
    ) {
        let limits = &shared.config.limits;
        let (outbound, rx) = mpsc::channel(limits.max_outbound_queue);
        let (close, close_rx) = oneshot::channel();
        // A client that reads nothing for the client timeout gets no close
        // frame: the connection is dropped without one.
        let close_wait = Duration::from_secs(shared.config.server.client_timeout_s);
        actix_web::rt::spawn(write_loop(ws, rx, close_rx, close_wait));
        let max_bytes = limits.max_message_bytes;
        let stream = stream
            .max_frame_size(max_bytes)
            .aggregate_continuations()
            .max_continuation_size(max_bytes);
        let bucket = TokenBucket::new(limits.messages_per_second, limits.burst);
        let key = shared.next_session_key.fetch_add(1, Ordering::Relaxed);
        Session::create(move |ctx| {
            ctx.add_stream(stream);
            Session {
                key,
                connection_id: connection_id.into(),
                user: claims.sub.clone().into(),
                claims,
                shared,
                hub,
                outbound,
                close: Some(close),
                rooms: HashSet::new(),
                bucket,
                strikes: 0,
                last_seen: Instant::now(),
                expiry: None,
                _slot: slot,
            }
        });
    }

    /// Queues a frame for this client; a full queue closes the session.
    fn send(&mut self, item: Outbound, ctx: &mut Context<Self>) {
        if let Err(TrySendError::Full(_)) = self.outbound.try_send(item) {
            self.close(CloseReason::SlowConsumer, ctx);
        }
    }

    fn reply_error(&mut self, err: ErrorReply, reference: &Ref, ctx: &mut Context<Self>) {
        metrics()
            .errors
            .with_label_values(&[err.code.as_str()])
            .inc();
        self.send(Outbound::Frame(error_frame(&err, reference)), ctx);
    }

    fn reply_broker_error(&mut self, err: BrokerError, reference: &Ref, ctx: &mut Context<Self>) {
        tracing::error!(error = %err, connection_id = %self.connection_id, "broker call failed");
        self.reply_error(ErrorReply::internal(), reference, ctx);
    }

    fn close(&mut self, reason: CloseReason, ctx: &mut Context<Self>) {
        let Some(close) = self.close.take() else {
            return;
        };
        metrics()
            .connections_closed
            .with_label_values(&[reason.label()])
            .inc();
        if reason == CloseReason::SlowConsumer {
            metrics().slow_consumer_closes.inc();
        }
        tracing::debug!(connection_id = %self.connection_id, reason = reason.label(), "closing session");
        let _ = close.send(reason);
        ctx.stop();
    }

    fn schedule_expiry(&mut self, ctx: &mut Context<Self>) {
        if let Some(handle) = self.expiry.take() {
            ctx.cancel_future(handle);
        }
        let now = crate::protocol::now_ms();
        let left = (self.claims.exp * 1000).saturating_sub(now);
        self.expiry = Some(ctx.run_later(Duration::from_millis(left), |this, ctx| {
            this.close(CloseReason::TokenExpired, ctx);
        }));
    }

    fn room_arg(
        &mut self,
        room: &str,
        reference: &Ref,
        ctx: &mut Context<Self>,
    ) -> Option<RoomName> {
        match RoomName::parse(room) {
            Ok(room) => Some(room),
            Err(message) => {
                self.reply_error(ErrorReply::bad_request(message), reference, ctx);
                None
            }
        }
    }

    fn on_text(&mut self, text: &str, ctx: &mut Context<Self>) {
        let parsed = parse_client_frame(text);
        let kind = match &parsed {
            Ok((frame, _)) => frame.kind(),
            Err(_) => "invalid",
        };
        metrics().frames_received.with_label_values(&[kind]).inc();
        let reference = match &parsed {
            Ok((_, r)) | Err((_, r)) => r.clone(),
        };
        if !self.bucket.try_take() {
            self.strikes += 1;
            if self.strikes >= self.shared.config.limits.rate_limit_strikes {
                self.close(CloseReason::RateLimit, ctx);
            } else {
                let err = ErrorReply::new(
                    ErrorCode::RateLimited,
                    format!(
                        "over {} messages per second",
                        self.shared.config.limits.messages_per_second
                    ),
                );
                self.reply_error(err, &reference, ctx);
            }
            return;
        }
        self.strikes = 0;
        match parsed {
            Ok((frame, reference)) => self.on_frame(frame, reference, ctx),
            Err((err, reference)) => self.reply_error(err, &reference, ctx),
        }
    }

    fn on_frame(&mut self, frame: ClientFrame, reference: Ref, ctx: &mut Context<Self>) {
        match frame {
            ClientFrame::Join { room, since } => {
                let Some(room) = self.room_arg(&room, &reference, ctx) else {
                    return;
                };
                let since = match since.map(|s| s.parse::<MessageId>()).transpose() {
                    Ok(since) => since,
                    Err(message) => {
                        return self.reply_error(ErrorReply::bad_request(message), &reference, ctx)
                    }
                };
                if !self.claims.may_join(room.as_str()) {
                    let err = ErrorReply::forbidden(format!("not allowed to join {room}"));
                    return self.reply_error(err, &reference, ctx);
                }
                if !self.rooms.contains(&room)
                    && self.rooms.len() >= self.shared.config.limits.max_rooms_per_connection
                {
                    let err = ErrorReply::new(
                        ErrorCode::LimitExceeded,
                        format!(
                            "a connection may join at most {} rooms",
                            self.shared.config.limits.max_rooms_per_connection
                        ),
                    );
                    return self.reply_error(err, &reference, ctx);
                }
                self.rooms.insert(room.clone());
                self.hub.do_send(Join {
                    key: self.key,
                    room,
                    since,
                    reference,
                });
            }
            ClientFrame::Leave { room } => {
                let Some(room) = self.room_arg(&room, &reference, ctx) else {
                    return;
                };
                self.rooms.remove(&room);
                self.hub.do_send(Leave {
                    key: self.key,
                    room,
                    reference,
                });
            }
            ClientFrame::Publish { room, data } => {
                let Some(room) = self.room_arg(&room, &reference, ctx) else {
                    return;
                };
                if !self.claims.may_publish(room.as_str()) {
                    let err = ErrorReply::forbidden(format!("not allowed to publish to {room}"));
                    return self.reply_error(err, &reference, ctx);
                }
                if !self.rooms.contains(&room) {
                    let err = ErrorReply::forbidden(format!("join {room} before publishing to it"));
                    return self.reply_error(err, &reference, ctx);
                }
                metrics().published.with_label_values(&["room"]).inc();
                let (broker, user) = (self.shared.broker.clone(), self.user.clone());
                // `wait`: this connection's publishes reach the broker in the
                // order it sent them.
                ctx.wait(
                    async move { broker.publish_room(&room, &user, &data).await }
                        .into_actor(self)
                        .map(move |result, this, ctx| match result {
                            Ok(id) => {
                                let ack = Ack {
                                    reference: reference.as_ref(),
                                    id: Some(id.to_string()),
                                    ..Ack::default()
                                };
                                this.send(Outbound::Frame(ack_frame(&ack)), ctx);
                            }
                            Err(e) => this.reply_broker_error(e, &reference, ctx),
                        }),
                );
            }
            ClientFrame::Direct { to, data } => {
                if !valid_user_id(&to) {
                    let err = ErrorReply::bad_request("`to` must be a user id of 1-256 bytes");
                    return self.reply_error(err, &reference, ctx);
                }
                metrics().published.with_label_values(&["user"]).inc();
                let (broker, user) = (self.shared.broker.clone(), self.user.clone());
                ctx.wait(
                    async move { broker.publish_user(&to, &user, &data).await }
                        .into_actor(self)
                        .map(move |result, this, ctx| match result {
                            Ok(id) => {
                                let ack = Ack {
                                    reference: reference.as_ref(),
                                    id: Some(id),
                                    ..Ack::default()
                                };
                                this.send(Outbound::Frame(ack_frame(&ack)), ctx);
                            }
                            Err(e) => this.reply_broker_error(e, &reference, ctx),
                        }),
                );
            }
            ClientFrame::Presence { room } => {
                let Some(room) = self.room_arg(&room, &reference, ctx) else {
                    return;
                };
                if !self.claims.may_join(room.as_str()) {
                    let err = ErrorReply::forbidden(format!("not allowed to see {room}"));
                    return self.reply_error(err, &reference, ctx);
                }
                let broker = self.shared.broker.clone();
                ctx.spawn(
                    async move {
                        let users = broker.presence(&room).await;
                        (room, users)
                    }
                    .into_actor(self)
                    .map(move |(room, result), this, ctx| match result {
                        Ok(users) => {
                            let frame = presence_frame(room.as_str(), &users, &reference);
                            this.send(Outbound::Frame(frame), ctx);
                        }
                        Err(e) => this.reply_broker_error(e, &reference, ctx),
                    }),
                );
            }
            ClientFrame::Task { name, .. } => {
                // Async tasks (contract section 6) are not in this build, so
                // no task name is configured.
                let err = ErrorReply::new(ErrorCode::NotFound, format!("unknown task {name:?}"));
                self.reply_error(err, &reference, ctx);
            }
            ClientFrame::Refresh { token } => match self.shared.verifier.verify(&token) {
                Ok(claims) if claims.sub == self.claims.sub => {
                    self.claims = claims;
                    self.schedule_expiry(ctx);
                    let ack = Ack {
                        reference: reference.as_ref(),
                        ..Ack::default()
                    };
                    self.send(Outbound::Frame(ack_frame(&ack)), ctx);
                }
                Ok(_) => {
                    let err =
                        ErrorReply::forbidden("refresh refused: the token names another user");
                    self.reply_error(err, &reference, ctx);
                }
                Err(e) => {
                    let err = ErrorReply::forbidden(format!("refresh refused: {e}"));
                    self.reply_error(err, &reference, ctx);
                }
            },
            ClientFrame::Ping => {
                self.send(Outbound::Frame(pong_frame(&reference)), ctx);
            }
        }
    }
}

impl Actor for Session {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let shared = self.shared.clone();
        let cfg = &shared.config;
        let welcome = crate::protocol::welcome_frame(
            &self.connection_id,
            &self.user,
            &shared.instance_id,
            cfg.server.heartbeat_s,
        );
        self.send(Outbound::Frame(welcome), ctx);
        self.hub.do_send(Connect {
            key: self.key,
            user: self.user.clone(),
            connection_id: self.connection_id.clone(),
            outbound: self.outbound.clone(),
            session: ctx.address().recipient(),
        });
        let timeout = Duration::from_secs(cfg.server.client_timeout_s);
        ctx.run_interval(
            Duration::from_secs(cfg.server.heartbeat_s),
            move |this, ctx| {
                if this.last_seen.elapsed() >= timeout {
                    this.close(CloseReason::ClientTimeout, ctx);
                } else {
                    // A full queue already means trouble; the ping can wait.
                    let _ = this.outbound.try_send(Outbound::Ping);
                }
            },
        );
        self.schedule_expiry(ctx);
        metrics().connections_open.inc();
        metrics().connections_accepted.inc();
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        // Ends the writer if no close was sent (the client went away).
        self.close.take();
        self.hub.do_send(Disconnect { key: self.key });
        metrics().connections_open.dec();
        self.shared.broker.unwatch_user(&self.user);
        let (broker, id, user) = (
            self.shared.broker.clone(),
            self.connection_id.clone(),
            self.user.clone(),
        );
        actix::spawn(async move { broker.unregister_connection(&id, &user).await });
    }
}

impl Handler<CloseSession> for Session {
    type Result = ();

    fn handle(&mut self, msg: CloseSession, ctx: &mut Self::Context) {
        self.close(msg.0, ctx);
    }
}

impl StreamHandler<Result<AggregatedMessage, ProtocolError>> for Session {
    fn handle(&mut self, item: Result<AggregatedMessage, ProtocolError>, ctx: &mut Self::Context) {
        self.last_seen = Instant::now();
        match item {
            Ok(AggregatedMessage::Text(text)) => self.on_text(&text, ctx),
            Ok(AggregatedMessage::Binary(_)) => self.close(CloseReason::BinaryNotSupported, ctx),
            Ok(AggregatedMessage::Ping(payload)) => self.send(Outbound::Pong(payload), ctx),
            Ok(AggregatedMessage::Pong(_)) => {}
            Ok(AggregatedMessage::Close(_)) => self.close(CloseReason::Normal, ctx),
            Err(ProtocolError::Overflow) => self.close(CloseReason::MessageTooBig, ctx),
            Err(e) => {
                tracing::debug!(error = %e, connection_id = %self.connection_id, "websocket protocol error");
                self.close(CloseReason::ProtocolError, ctx);
            }
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

/// Owns the socket: drains the outbound queue into it until a close is
/// signalled (or the session is gone).
async fn write_loop(
    mut ws: actix_ws::Session,
    mut queue: mpsc::Receiver<Outbound>,
    mut close: oneshot::Receiver<CloseReason>,
    close_wait: Duration,
) {
    loop {
        // `Err(reason)`: stop, closing with `reason` when there is one.
        let step: Result<(), Option<CloseReason>> = tokio::select! {
            biased;
            reason = &mut close => Err(reason.ok()),
            item = queue.recv() => match item {
                Some(item) => {
                    let write = write_one(&mut ws, item);
                    tokio::select! {
                        biased;
                        reason = &mut close => Err(reason.ok()),
                        written = write => written.map_err(|_| None),
                    }
                }
                None => Err(None),
            },
        };
        if let Err(reason) = step {
            if let Some(reason) = reason {
                let _ = tokio::time::timeout(close_wait, ws.close(Some(reason.to_ws()))).await;
            }
            return;
        }
    }
}

async fn write_one(ws: &mut actix_ws::Session, item: Outbound) -> Result<(), actix_ws::Closed> {
    match item {
        Outbound::Frame(text) => ws.text(text).await,
        Outbound::Delivery(envelope) => {
            ws.text(envelope.frame.clone()).await?;
            if envelope.published_us > 0 {
                let latency_us = now_us().saturating_sub(envelope.published_us);
                metrics::record_delivery(latency_us as f64 / 1e6);
            }
            Ok(())
        }
        Outbound::Ping => ws.ping(b"").await,
        Outbound::Pong(payload) => ws.pong(&payload).await,
    }
}
