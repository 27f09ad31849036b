//! The `RedisSubscriber` actor: owns the instance's one pub/sub connection
//! and forwards what arrives to every hub, once per hub, as one shared
//! pre-serialized envelope ([`super::payload::decode`]). Also the
//! [`Subscriptions`] part of the Redis broker.
//!
//! Subscriptions are reference-counted per channel (each hub counts once per
//! room or user it has local members for) and batched: every SUBSCRIBE or
//! UNSUBSCRIBE requested within one turn of the actor goes out as one
//! command. `{prefix}:broadcast` is always subscribed. A `watch` resolves
//! when Redis has confirmed the subscription, which is what lets a join read
//! history afterwards with nothing lost at the seam.
//!
//! When the connection drops, the actor reconnects with exponential backoff
//! and jitter and resubscribes to everything still referenced; while it is
//! away, watches succeed at once (they are restored on return) and
//! [`LocalPublish`] delivers to this instance's members only. Once back,
//! each room with local members *catches up*: what reached its history
//! after the last id delivered here (or since it was subscribed) is read
//! and delivered, then the live messages that arrived meanwhile, newer
//! ones only, so connected members miss nothing that history kept.
//!
//! Bounds: the pub/sub intake is drained as fast as it arrives (redis-rs
//! buffers it unbounded, so the actor never waits on it); a room's live
//! messages wait at most `CATCH_UP_BUFFER` during a catch-up; fan-out to a
//! full hub follows [`crate::broker::fanout`]'s policy.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use serde_json::value::RawValue;
use tokio::sync::oneshot;

use super::commands::{Commands, COMMAND_TIMEOUT};
use super::keys::Keys;
use super::payload;
use super::RedisBroker;
use crate::broker::fanout::{Envelope, HubSet, LocalIds, Stamp};
use crate::broker::{BrokerError, BrokerResult, Fanout, Subscriptions, Target};
use crate::clock::now_ms;
use crate::metrics::metrics;
use crate::protocol::{MessageId, RoomName};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Live messages of one room held back while it catches up.
const CATCH_UP_BUFFER: usize = 4096;
/// How often markers for fan-outs dropped at a full hub are retried.
const FLUSH_EVERY: Duration = Duration::from_millis(50);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A room catching up after a reconnect.
struct CatchUp {
    /// The newest id delivered here when it began: nothing older is sent,
    /// so members keep receiving in id order (after an outage, messages
    /// numbered here may be newer than what Redis had not yet delivered).
    floor: Option<MessageId>,
    /// Live messages held back meanwhile.
    held: Vec<Envelope>,
}

struct Channel {
    refs: usize,
    confirmed: bool,
    waiters: Vec<oneshot::Sender<()>>,
    /// The room, for a room channel.
    room: Option<RoomName>,
    /// When Redis first confirmed it: a catch-up without a seen id starts here.
    subscribed_at_ms: Option<u64>,
}

pub struct RedisSubscriber {
    client: redis::Client,
    keys: Keys,
    cmd: Arc<Commands>,
    history_size: usize,
    /// Rooms with local members, for `/api/stats`.
    local_rooms: Arc<AtomicUsize>,
    /// Rooms catching up after a reconnect.
    catching_up: HashMap<RoomName, CatchUp>,
    hubs: HubSet,
    channels: HashMap<String, Channel>,
    to_subscribe: HashSet<String>,
    to_unsubscribe: HashSet<String>,
    flush_scheduled: bool,
    sink: Option<PubSubSink>,
    /// Bumped on every (re)connect, so a stale stream's end is ignored.
    generation: u64,
    backoff: Duration,
    connected: Arc<AtomicBool>,
    /// Ids for messages published straight into Redis without one and for
    /// local delivery during an outage.
    ids: LocalIds,
}

impl RedisSubscriber {
    pub fn new(
        client: redis::Client,
        keys: Keys,
        cmd: Arc<Commands>,
        connected: Arc<AtomicBool>,
        local_rooms: Arc<AtomicUsize>,
        history_size: usize,
    ) -> Self {
        RedisSubscriber {
            client,
            keys,
            cmd,
            history_size,
            local_rooms,
            catching_up: HashMap::new(),
            hubs: HubSet::default(),
            channels: HashMap::new(),
            to_subscribe: HashSet::new(),
            to_unsubscribe: HashSet::new(),
            flush_scheduled: false,
            sink: None,
            generation: 0,
            backoff: BACKOFF_MIN,
            connected,
            ids: LocalIds::default(),
        }
    }

    fn schedule_flush(&mut self, ctx: &mut Context<Self>) {
        if !self.flush_scheduled {
            self.flush_scheduled = true;
            ctx.run_later(Duration::ZERO, |this, ctx| this.flush(ctx));
        }
    }

    /// Sends the batched SUBSCRIBE and UNSUBSCRIBE.
    fn flush(&mut self, ctx: &mut Context<Self>) {
        self.flush_scheduled = false;
        let Some(sink) = self.sink.clone() else {
            // Disconnected: the reconnect subscribes to every referenced channel.
            self.to_subscribe.clear();
            self.to_unsubscribe.clear();
            return;
        };
        // Taken whole: a wave of (un)subscriptions leaves no table behind.
        let subscribe: Vec<String> = std::mem::take(&mut self.to_subscribe).into_iter().collect();
        let unsubscribe: Vec<String> = std::mem::take(&mut self.to_unsubscribe)
            .into_iter()
            .collect();
        let generation = self.generation;
        let work = async move {
            let mut sink = sink;
            if !unsubscribe.is_empty() {
                sink.unsubscribe(&unsubscribe).await?;
            }
            if !subscribe.is_empty() {
                sink.subscribe(&subscribe).await?;
            }
            Ok::<_, redis::RedisError>(subscribe)
        };
        ctx.spawn(
            work.into_actor(self)
                .map(move |result, this, ctx| match result {
                    Ok(subscribed) => this.confirm(subscribed),
                    Err(e) if this.generation == generation => {
                        tracing::warn!(error = %e, "redis subscribe failed; reconnecting");
                        this.lost(ctx);
                    }
                    Err(_) => {}
                }),
        );
    }

    fn confirm(&mut self, channels: Vec<String>) {
        for name in channels {
            if let Some(channel) = self.channels.get_mut(&name) {
                channel.confirmed = true;
                channel.subscribed_at_ms.get_or_insert_with(now_ms);
                for waiter in channel.waiters.drain(..) {
                    let _ = waiter.send(());
                }
            }
        }
    }

    fn lost(&mut self, ctx: &mut Context<Self>) {
        if self.sink.take().is_none() {
            return;
        }
        self.generation += 1;
        self.connected.store(false, Ordering::Release);
        for channel in self.channels.values_mut() {
            channel.confirmed = false;
        }
        self.reconnect_later(ctx);
    }

    fn reconnect_later(&mut self, ctx: &mut Context<Self>) {
        let jitter = rand::random_range(0.5..1.0);
        let delay = self.backoff.mul_f64(jitter);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        ctx.run_later(delay, |this, ctx| this.connect(ctx));
    }

    /// Opens the pub/sub connection and subscribes to every referenced
    /// channel plus broadcast.
    fn connect(&mut self, ctx: &mut Context<Self>) {
        let client = self.client.clone();
        let mut channels: Vec<String> = self.channels.keys().cloned().collect();
        channels.push(self.keys.broadcast_channel());
        let work = async move {
            let pubsub = tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_pubsub())
                .await
                .map_err(|_| "timed out".to_owned())?
                .map_err(|e| e.to_string())?;
            let (mut sink, stream) = pubsub.split();
            tokio::time::timeout(CONNECT_TIMEOUT, sink.subscribe(&channels))
                .await
                .map_err(|_| "subscribe timed out".to_owned())?
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((sink, stream, channels))
        };
        ctx.spawn(work.into_actor(self).map(|result, this, ctx| match result {
            Ok((sink, stream, channels)) => this.connected(sink, stream, channels, ctx),
            Err(e) => {
                tracing::warn!(error = %e, "redis subscriber cannot connect; retrying with backoff");
                this.reconnect_later(ctx);
            }
        }));
    }

    fn connected(
        &mut self,
        sink: PubSubSink,
        stream: PubSubStream,
        channels: Vec<String>,
        ctx: &mut Context<Self>,
    ) {
        if self.generation > 0 {
            metrics()
                .redis_reconnects
                .with_label_values(&["subscriber"])
                .inc();
            tracing::info!("redis subscriber reconnected; subscriptions restored");
        }
        self.generation += 1;
        let generation = self.generation;
        self.sink = Some(sink);
        self.backoff = BACKOFF_MIN;
        self.connected.store(true, Ordering::Release);
        let reconnect = generation > 1;
        self.confirm(channels);
        ctx.add_stream(stream.map(move |msg| (generation, msg)));
        if reconnect {
            self.catch_up_all(ctx);
        }
        // Channels referenced while the connection was being made.
        let missing: Vec<String> = self
            .channels
            .iter()
            .filter(|(_, c)| !c.confirmed)
            .map(|(name, _)| name.clone())
            .collect();
        if !missing.is_empty() {
            self.to_subscribe.extend(missing);
            self.schedule_flush(ctx);
        }
    }
}

/// Catching up after a reconnect.
impl RedisSubscriber {
    /// Starts a catch-up of every room with local members.
    fn catch_up_all(&mut self, ctx: &mut Context<Self>) {
        let rooms: Vec<(RoomName, String)> = self
            .channels
            .values()
            .filter_map(|c| {
                let room = c.room.clone()?;
                let start = match self.ids.last_history_id(&room) {
                    Some(id) => format!("({id}"),
                    None => format!("{}-0", c.subscribed_at_ms?),
                };
                Some((room, start))
            })
            .collect();
        for (room, start) in rooms {
            if self.catching_up.contains_key(&room) {
                continue;
            }
            let floor = self.ids.last_room_id(&room);
            let catch_up = CatchUp {
                floor,
                held: Vec::new(),
            };
            self.catching_up.insert(room.clone(), catch_up);
            self.catch_up(room, start, ctx);
        }
    }

    /// Reads the room's history after `start` and delivers it, then the
    /// live messages held back meanwhile.
    fn catch_up(&mut self, room: RoomName, start: String, ctx: &mut Context<Self>) {
        let (cmd, key, count) = (
            self.cmd.clone(),
            self.keys.history(&room),
            self.history_size,
        );
        let read = async move {
            let reply: redis::streams::StreamRangeReply = cmd
                .exec(move |mut c| async move {
                    redis::AsyncCommands::xrange_count(&mut c, &key, &start, "+", count).await
                })
                .await?;
            Ok::<_, crate::broker::BrokerError>(reply)
        };
        ctx.spawn(read.into_actor(self).map(move |result, this, _| {
            let replay = match result {
                Ok(reply) => payload::history_envelopes(&room, reply),
                Err(e) => {
                    tracing::warn!(error = %e, room = %room, "catch-up after reconnect failed; members may have missed messages");
                    Vec::new()
                }
            };
            this.finish_catch_up(room, replay);
        }));
    }

    fn finish_catch_up(&mut self, room: RoomName, replay: Vec<Envelope>) {
        let Some(CatchUp { floor, held }) = self.catching_up.remove(&room) else {
            return;
        };
        let mut last = floor;
        for envelope in replay.into_iter().chain(held) {
            if envelope.id.is_some() && envelope.id <= last {
                continue;
            }
            if let Some(id) = envelope.id {
                self.ids.seen_room(&room, id);
                last = Some(id);
            }
            self.hubs.send(envelope);
        }
    }

    /// Delivers an envelope, or holds it back while its room catches up.
    /// A room message not newer than the last one delivered here (one that
    /// an outage's local numbering overtook) is dropped: members receive
    /// in id order, never twice.
    fn deliver(&mut self, envelope: Envelope, last: Option<MessageId>) {
        if let Target::Room(room) = &envelope.target {
            if envelope.id.is_some() && envelope.id <= last && !self.catching_up.contains_key(room)
            {
                tracing::debug!(room = %room, "message older than one already delivered here dropped");
                return;
            }
            if let Some(catch_up) = self.catching_up.get_mut(room) {
                if catch_up.held.len() < CATCH_UP_BUFFER {
                    catch_up.held.push(envelope);
                    return;
                }
                tracing::warn!(room = %room, "catch-up too slow; delivering live messages without it");
                let room = room.clone();
                self.finish_catch_up(room, Vec::new());
            }
        }
        self.hubs.send(envelope);
    }
}

impl Actor for RedisSubscriber {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(4096);
        ctx.run_interval(FLUSH_EVERY, |this, _| this.hubs.flush());
        self.connect(ctx);
    }
}

impl StreamHandler<(u64, redis::Msg)> for RedisSubscriber {
    fn handle(&mut self, (generation, msg): (u64, redis::Msg), _: &mut Self::Context) {
        if generation != self.generation {
            return;
        }
        let channel = msg.get_channel_name();
        let bytes = msg.get_payload_bytes();
        let last = self
            .keys
            .room_of_channel(channel)
            .and_then(|room| self.ids.last_room_id(&room));
        match payload::decode(self.keys.prefix(), channel, bytes, &mut self.ids) {
            Ok(envelope) => self.deliver(envelope, last),
            Err(payload::Malformed) => {
                metrics().redis_malformed.inc();
                // The payload may carry user data: log its size, not its content.
                tracing::warn!(
                    channel,
                    bytes = bytes.len(),
                    "malformed message on a hub channel ignored"
                );
            }
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        // The connection dropped (CLIENT KILL, Redis restart, network).
        tracing::warn!("redis pub/sub connection lost; reconnecting");
        self.lost(ctx);
    }
}

/// A hub asks for every fan-out.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AttachHub(pub Recipient<Fanout>);

impl Handler<AttachHub> for RedisSubscriber {
    type Result = ();

    fn handle(&mut self, msg: AttachHub, _: &mut Self::Context) {
        self.hubs.attach(msg.0);
    }
}

/// One more reference to a channel; resolves once Redis has confirmed the
/// subscription (at once while Redis is away).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Watch {
    pub channel: String,
    pub confirmed: oneshot::Sender<()>,
}

impl Handler<Watch> for RedisSubscriber {
    type Result = ();

    fn handle(&mut self, msg: Watch, ctx: &mut Self::Context) {
        let room = self.keys.room_of_channel(&msg.channel);
        let local_rooms = &self.local_rooms;
        let channel = self.channels.entry(msg.channel.clone()).or_insert_with(|| {
            if room.is_some() {
                local_rooms.fetch_add(1, Ordering::Relaxed);
            }
            Channel {
                refs: 0,
                confirmed: false,
                waiters: Vec::new(),
                room,
                subscribed_at_ms: None,
            }
        });
        channel.refs += 1;
        // During an outage (connected before, not now) a watch succeeds at
        // once and is restored on reconnect; before the first connection it
        // waits, so early joins are not acked before they are subscribed.
        let outage = self.sink.is_none() && self.generation > 0;
        if channel.confirmed || outage {
            let _ = msg.confirmed.send(());
            return;
        }
        channel.waiters.push(msg.confirmed);
        if channel.refs == 1 {
            self.to_unsubscribe.remove(&msg.channel);
            self.to_subscribe.insert(msg.channel);
            self.schedule_flush(ctx);
        }
    }
}

/// One reference fewer; the last one unsubscribes.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unwatch(pub String);

impl Handler<Unwatch> for RedisSubscriber {
    type Result = ();

    fn handle(&mut self, msg: Unwatch, ctx: &mut Self::Context) {
        let Some(channel) = self.channels.get_mut(&msg.0) else {
            return;
        };
        channel.refs = channel.refs.saturating_sub(1);
        if channel.refs == 0 {
            if let Some(room) = self.channels.remove(&msg.0).and_then(|c| c.room) {
                self.local_rooms.fetch_sub(1, Ordering::Relaxed);
                self.ids.forget_room(&room);
                self.catching_up.remove(&room);
            }
            crate::trim::shrink_map(&mut self.channels);
            self.to_subscribe.remove(&msg.0);
            self.to_unsubscribe.insert(msg.0);
            self.schedule_flush(ctx);
        }
    }
}

/// Delivery to this instance only, while Redis is away. Answers the id given.
#[derive(Message)]
#[rtype(result = "String")]
pub enum LocalPublish {
    Room {
        room: RoomName,
        from: String,
        data: Box<RawValue>,
    },
    User {
        user: String,
        from: String,
        data: Box<RawValue>,
    },
    Broadcast {
        data: Box<RawValue>,
    },
    /// A complete frame for a user (a task update).
    Frame {
        user: String,
        frame: bytestring::ByteString,
    },
}

impl Handler<LocalPublish> for RedisSubscriber {
    type Result = String;

    fn handle(&mut self, msg: LocalPublish, _: &mut Self::Context) -> String {
        let at = Stamp::now();
        let (envelope, id) = match msg {
            LocalPublish::Room { room, from, data } => {
                let id = self.ids.next_room_offline(&room);
                (
                    Envelope::message(room, id, &from, &*data, at),
                    id.to_string(),
                )
            }
            LocalPublish::User { user, from, data } => {
                let id = self.ids.next_other().to_string();
                (Envelope::direct(user, &id, &from, &*data, at), id)
            }
            LocalPublish::Broadcast { data } => {
                let id = self.ids.next_other().to_string();
                (Envelope::broadcast(&id, &*data, at), id)
            }
            LocalPublish::Frame { user, frame } => {
                (Envelope::to_user(user, frame, at), String::new())
            }
        };
        self.hubs.send(envelope);
        id
    }
}

impl RedisBroker {
    /// Takes the reference now; the future resolves once Redis confirmed
    /// the subscription (at once while Redis is away; a connection that
    /// dies mid-subscribe is restored by the reconnect).
    fn watch(&self, channel: String) -> BoxFuture<'static, BrokerResult<()>> {
        let (confirmed, rx) = oneshot::channel();
        self.subscriber.do_send(Watch { channel, confirmed });
        Box::pin(async move {
            match tokio::time::timeout(COMMAND_TIMEOUT, rx).await {
                Ok(Ok(())) => Ok(()),
                _ => Err(BrokerError::Unavailable(
                    "subscription not confirmed".into(),
                )),
            }
        })
    }
}

impl Subscriptions for RedisBroker {
    fn attach_hub(&self, hub: Recipient<Fanout>) {
        self.subscriber.do_send(AttachHub(hub));
    }

    fn watch_room(&self, room: &RoomName) -> BoxFuture<'static, BrokerResult<()>> {
        self.watch(self.keys.room_channel(room))
    }

    fn unwatch_room(&self, room: &RoomName) {
        self.subscriber
            .do_send(Unwatch(self.keys.room_channel(room)));
    }

    fn watch_user(&self, user: &str) -> BoxFuture<'static, BrokerResult<()>> {
        self.watch(self.keys.user_channel(user))
    }

    fn unwatch_user(&self, user: &str) {
        self.subscriber
            .do_send(Unwatch(self.keys.user_channel(user)));
    }
}
