//! The `RedisSubscriber` actor: owns the instance's pub/sub connection
//! ([`crate::redis::pubsub`]) and forwards what arrives to every hub, once
//! per hub, as one shared pre-serialized envelope ([`super::payload`]).
//! Also the [`Subscriptions`] part of the Redis broker.
//!
//! Subscriptions are reference-counted per channel (each hub counts once per
//! room or user it has local members for) and batched: every subscribe or
//! unsubscribe requested within one turn of the actor goes out together
//! (on a cluster, one `SSUBSCRIBE` per slot). `{prefix}:broadcast` is always
//! subscribed. A `watch` resolves when Redis has confirmed the
//! subscription, which is what lets a join read history afterwards with
//! nothing lost at the seam.
//!
//! **No gap after a loss.** A subscription can be lost: the whole
//! connection (standalone, sentinel: the actor reconnects with exponential
//! backoff and jitter and subscribes to everything still referenced), or,
//! on a cluster, one node's connection (redis-rs reconnects it) or one
//! slot's channels (a failover or a slot migration unsubscribes them, and
//! redis-rs does not subscribe them again: the actor does, with backoff,
//! until it is confirmed). Once a room's channel is confirmed again, the
//! room *catches up*: what reached its history after the last id delivered
//! here (or since it was subscribed) is read and delivered, then the live
//! messages that arrived meanwhile, newer ones only. Members miss nothing
//! that history kept; a direct or task update published while its user's
//! channel was lost is not in history and is lost with it.
//!
//! Bounds: the pub/sub intake is drained as fast as it arrives (redis-rs
//! buffers it unbounded, so the actor never waits on it); a room's live
//! messages wait at most `CATCH_UP_BUFFER` during a catch-up; fan-out to a
//! full hub follows [`crate::broker::fanout`]'s policy.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use tokio::sync::oneshot;

use super::payload;
use super::RedisBroker;
use crate::broker::fanout::{Envelope, HubSet, LocalIds};
use crate::broker::{BrokerError, BrokerResult, Fanout, Subscriptions, Target};
use crate::clock::now_ms;
use crate::config::RedisMode;
use crate::metrics::metrics;
use crate::protocol::{MessageId, RoomName};
use crate::redis::keys::{ChannelOf, Keys};
use crate::redis::pubsub::{self, Event, PubSub};
use crate::redis::Redis;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Live messages of one room held back while it catches up.
const CATCH_UP_BUFFER: usize = 4096;
/// How often markers for fan-outs dropped at a full hub are retried.
const FLUSH_EVERY: Duration = Duration::from_millis(50);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// On a cluster, how long a room subscribed again holds its live messages
/// before it reads history: a subscription made while the slot's topology
/// settles (it may land on the demoted primary, still catching up with the
/// new one) can miss what is published meanwhile, and history cannot.
const SETTLE: Duration = Duration::from_millis(1500);
/// How long after a dropped subscription it is made again (redis-rs needs
/// a moment to learn the new topology).
const RESUBSCRIBE_AFTER: Duration = Duration::from_millis(300);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A room catching up after a lost subscription.
struct CatchUp {
    /// The newest id delivered here when the subscription was lost:
    /// history is read after it, and nothing older is sent, so members
    /// keep receiving in id order.
    floor: Option<MessageId>,
    /// Where the history read starts (`(floor`, or when the channel was
    /// first confirmed).
    start: String,
    /// Whether the history read is scheduled (once subscribed again).
    reading: bool,
    /// Live messages held back meanwhile: from the loss on, since redis-rs
    /// may subscribe again by itself before we do.
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

impl Channel {
    fn new(room: Option<RoomName>) -> Channel {
        Channel {
            refs: 0,
            confirmed: false,
            waiters: Vec::new(),
            room,
            subscribed_at_ms: None,
        }
    }
}

pub struct RedisSubscriber {
    redis: Arc<Redis>,
    keys: Keys,
    history_size: usize,
    /// Rooms with local members, for `/api/stats`.
    local_rooms: Arc<AtomicUsize>,
    /// Rooms catching up after a lost subscription.
    catching_up: HashMap<RoomName, CatchUp>,
    hubs: HubSet,
    /// Every referenced channel, broadcast included (always one reference).
    channels: HashMap<String, Channel>,
    to_subscribe: HashSet<String>,
    to_unsubscribe: HashSet<String>,
    flush_scheduled: bool,
    pubsub: Option<PubSub>,
    /// Bumped on every (re)connect, so a stale stream's end is ignored.
    generation: u64,
    backoff: Duration,
    connected: Arc<AtomicBool>,
    /// Cluster: channels the server unsubscribed (or whose node dropped),
    /// to subscribe again.
    lost: HashSet<String>,
    resubscribe_scheduled: bool,
    resubscribe_backoff: Duration,
    /// The last id delivered per room; ids of direct and broadcast frames
    /// published straight into Redis without one.
    ids: LocalIds,
    /// Cluster: channels released lately, and when. A node's connection
    /// that drops is repaired by the cluster client, which subscribes again
    /// to what it still tracks, and an unsubscribe sent around the drop may
    /// be lost: for a while after a drop these are unsubscribed again.
    released: HashMap<String, Instant>,
    /// Cluster: until when released channels are unsubscribed again.
    unsubscribe_again_until: Option<Instant>,
}

/// How long a released channel is remembered (cluster).
const RELEASED_KEEP: Duration = Duration::from_secs(30);
/// At most this many released channels are remembered.
const RELEASED_MAX: usize = 100_000;
/// How long after a node's connection dropped released channels are
/// unsubscribed again, once a second.
const UNSUBSCRIBE_AGAIN_FOR: Duration = Duration::from_secs(10);

impl RedisSubscriber {
    pub fn new(
        redis: Arc<Redis>,
        keys: Keys,
        connected: Arc<AtomicBool>,
        local_rooms: Arc<AtomicUsize>,
        history_size: usize,
    ) -> Self {
        let mut channels = HashMap::new();
        let mut broadcast = Channel::new(None);
        broadcast.refs = 1;
        channels.insert(keys.broadcast_channel(), broadcast);
        RedisSubscriber {
            redis,
            keys,
            history_size,
            local_rooms,
            catching_up: HashMap::new(),
            hubs: HubSet::default(),
            channels,
            to_subscribe: HashSet::new(),
            to_unsubscribe: HashSet::new(),
            flush_scheduled: false,
            pubsub: None,
            generation: 0,
            backoff: BACKOFF_MIN,
            connected,
            lost: HashSet::new(),
            resubscribe_scheduled: false,
            resubscribe_backoff: BACKOFF_MIN,
            ids: LocalIds::default(),
            released: HashMap::new(),
            unsubscribe_again_until: None,
        }
    }

    /// Cluster: remembers a released channel (see `released`).
    fn remember_released(&mut self, channel: String) {
        if !self.cluster() {
            return;
        }
        if self.released.len() >= RELEASED_MAX {
            self.prune_released();
        }
        if self.released.len() < RELEASED_MAX {
            self.released.insert(channel, Instant::now());
        }
    }

    fn prune_released(&mut self) {
        self.released.retain(|_, at| at.elapsed() < RELEASED_KEEP);
        crate::trim::shrink_map(&mut self.released);
    }

    /// Cluster, once a second: after a node's connection dropped, the
    /// released channels are unsubscribed again (unsubscribing one that is
    /// not subscribed changes nothing).
    fn unsubscribe_again(&mut self, ctx: &mut Context<Self>) {
        let Some(until) = self.unsubscribe_again_until else {
            if !self.released.is_empty() {
                self.prune_released();
            }
            return;
        };
        if Instant::now() > until {
            self.unsubscribe_again_until = None;
        }
        self.prune_released();
        let again: Vec<String> = self
            .released
            .keys()
            .filter(|name| !self.channels.contains_key(*name))
            .cloned()
            .collect();
        if !again.is_empty() {
            self.to_unsubscribe.extend(again);
            self.schedule_flush(ctx);
        }
    }

    fn cluster(&self) -> bool {
        self.redis.mode() == RedisMode::Cluster
    }

    fn schedule_flush(&mut self, ctx: &mut Context<Self>) {
        if !self.flush_scheduled {
            self.flush_scheduled = true;
            ctx.run_later(Duration::ZERO, |this, ctx| this.flush(ctx));
        }
    }

    /// Sends the batched subscribes and unsubscribes.
    fn flush(&mut self, ctx: &mut Context<Self>) {
        self.flush_scheduled = false;
        let Some(pubsub) = self.pubsub.clone() else {
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
            if !unsubscribe.is_empty() {
                pubsub.unsubscribe(&unsubscribe).await?;
            }
            if !subscribe.is_empty() {
                pubsub.subscribe(&subscribe).await?;
            }
            Ok::<_, crate::redis::RedisError>(subscribe)
        };
        ctx.spawn(
            work.into_actor(self)
                .map(move |result, this, ctx| match result {
                    Ok(subscribed) => this.confirm(subscribed, ctx),
                    Err(e) if this.generation == generation => {
                        tracing::warn!(error = %e, "redis subscribe failed");
                        this.subscribe_failed(ctx);
                    }
                    Err(_) => {}
                }),
        );
    }

    /// A subscribe failed: on one connection, start over; on a cluster,
    /// every unconfirmed channel is subscribed again with backoff.
    fn subscribe_failed(&mut self, ctx: &mut Context<Self>) {
        if !self.cluster() {
            return self.lost_connection(ctx);
        }
        let unconfirmed: Vec<String> = self
            .channels
            .iter()
            .filter(|(_, c)| !c.confirmed)
            .map(|(name, _)| name.clone())
            .collect();
        self.lost.extend(unconfirmed);
        self.schedule_resubscribe(ctx);
    }

    /// A subscribe of `channels` completed. One no longer referenced was
    /// released while its subscribe was in flight, and that release's
    /// unsubscribe may have reached Redis first (flushes and resubscribes
    /// run concurrently): it is unsubscribed again, now, behind it.
    fn confirm(&mut self, channels: Vec<String>, ctx: &mut Context<Self>) {
        let mut stale = false;
        for name in channels {
            match self.channels.get_mut(&name) {
                Some(channel) => {
                    channel.confirmed = true;
                    channel.subscribed_at_ms.get_or_insert_with(now_ms);
                    for waiter in channel.waiters.drain(..) {
                        let _ = waiter.send(());
                    }
                }
                None => {
                    stale = true;
                    self.to_unsubscribe.insert(name);
                }
            }
        }
        if stale {
            self.schedule_flush(ctx);
        }
    }

    /// The whole connection is gone (standalone, sentinel): reconnect.
    fn lost_connection(&mut self, ctx: &mut Context<Self>) {
        if self.pubsub.take().is_none() {
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
    /// channel.
    fn connect(&mut self, ctx: &mut Context<Self>) {
        let config = self.redis.config().clone();
        let channels: Vec<String> = self.channels.keys().cloned().collect();
        let work = async move {
            let (pubsub, events) = tokio::time::timeout(CONNECT_TIMEOUT, pubsub::connect(&config))
                .await
                .map_err(|_| "timed out".to_owned())?
                .map_err(|e| e.to_string())?;
            tokio::time::timeout(CONNECT_TIMEOUT * 2, pubsub.subscribe(&channels))
                .await
                .map_err(|_| "subscribe timed out".to_owned())?
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((pubsub, events, channels))
        };
        ctx.spawn(work.into_actor(self).map(|result, this, ctx| match result {
            Ok((pubsub, events, channels)) => this.connected(pubsub, events, channels, ctx),
            Err(e) => {
                tracing::warn!(error = %e, "redis subscriber cannot connect; retrying with backoff");
                this.reconnect_later(ctx);
            }
        }));
    }

    fn connected(
        &mut self,
        pubsub: PubSub,
        events: BoxStream<'static, Event>,
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
        self.pubsub = Some(pubsub);
        self.backoff = BACKOFF_MIN;
        self.connected.store(true, Ordering::Release);
        let reconnect = generation > 1;
        self.confirm(channels.clone(), ctx);
        ctx.add_stream(events.map(move |event| (generation, event)));
        if reconnect {
            self.catch_up_rooms(channels, Duration::ZERO, ctx);
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

/// Cluster: channels the server dropped, subscribed again.
impl RedisSubscriber {
    /// The server unsubscribed a channel we still need (a slot moved or its
    /// primary was demoted), or a node's connection dropped: subscribe
    /// again, then catch up.
    fn mark_lost(&mut self, names: impl IntoIterator<Item = String>, ctx: &mut Context<Self>) {
        let mut lost = Vec::new();
        for name in names {
            let Some(channel) = self.channels.get_mut(&name) else {
                continue;
            };
            channel.confirmed = false;
            self.lost.insert(name.clone());
            lost.push(name);
        }
        self.hold_rooms(&lost);
        self.schedule_resubscribe(ctx);
    }

    fn schedule_resubscribe(&mut self, ctx: &mut Context<Self>) {
        if self.resubscribe_scheduled || self.lost.is_empty() {
            return;
        }
        self.resubscribe_scheduled = true;
        let delay = RESUBSCRIBE_AFTER
            + self
                .resubscribe_backoff
                .mul_f64(rand::random_range(0.0..1.0));
        ctx.run_later(delay, |this, ctx| this.resubscribe(ctx));
    }

    fn resubscribe(&mut self, ctx: &mut Context<Self>) {
        self.resubscribe_scheduled = false;
        let Some(pubsub) = self.pubsub.clone() else {
            return;
        };
        let channels: Vec<String> = std::mem::take(&mut self.lost)
            .into_iter()
            .filter(|name| self.channels.contains_key(name))
            .collect();
        if channels.is_empty() {
            return;
        }
        tracing::info!(
            channels = channels.len(),
            "subscribing again to channels redis dropped"
        );
        let work = async move {
            let result = pubsub.subscribe(&channels).await;
            (channels, result)
        };
        ctx.spawn(work.into_actor(self).map(|(channels, result), this, ctx| match result {
            Ok(()) => {
                tracing::info!(channels = channels.len(), "subscribed again");
                this.resubscribe_backoff = BACKOFF_MIN;
                metrics()
                    .redis_reconnects
                    .with_label_values(&["subscriber"])
                    .inc();
                this.confirm(channels.clone(), ctx);
                this.catch_up_rooms(channels, SETTLE, ctx);
            }
            Err(e) => {
                tracing::warn!(error = %e, "subscribing again failed; retrying with backoff");
                this.resubscribe_backoff = (this.resubscribe_backoff * 2).min(BACKOFF_MAX);
                this.lost.extend(channels);
                this.schedule_resubscribe(ctx);
            }
        }));
    }
}

/// Catching up after a lost subscription.
impl RedisSubscriber {
    /// Holds the live messages of the rooms among `channels` from now on
    /// (a catch-up begins; its history read comes later).
    fn hold_rooms(&mut self, channels: &[String]) {
        for name in channels {
            let Some(c) = self.channels.get(name) else {
                continue;
            };
            let Some(room) = c.room.clone() else {
                continue;
            };
            if self.catching_up.contains_key(&room) {
                continue;
            }
            let floor = self.ids.last_room_id(&room);
            let start = match (floor, c.subscribed_at_ms) {
                (Some(id), _) => format!("({id}"),
                (None, Some(ms)) => format!("{ms}-0"),
                (None, None) => continue,
            };
            let catch_up = CatchUp {
                floor,
                start,
                reading: false,
                held: Vec::new(),
            };
            self.catching_up.insert(room, catch_up);
        }
    }

    /// Catches up the rooms among `channels` (subscribed again): their
    /// live messages are held (since the loss, or from now on), and
    /// history is read after `settle`.
    fn catch_up_rooms(&mut self, channels: Vec<String>, settle: Duration, ctx: &mut Context<Self>) {
        self.hold_rooms(&channels);
        let rooms: Vec<RoomName> = channels
            .iter()
            .filter_map(|name| self.channels.get(name)?.room.clone())
            .collect();
        for room in rooms {
            let Some(catch_up) = self.catching_up.get_mut(&room) else {
                continue;
            };
            if catch_up.reading {
                continue;
            }
            catch_up.reading = true;
            let start = catch_up.start.clone();
            if settle.is_zero() {
                self.catch_up(room, start, ctx);
            } else {
                // Read after whatever was delivered before the hold.
                ctx.run_later(settle, move |this, ctx| this.catch_up(room, start, ctx));
            }
        }
    }

    /// Reads the room's history after `start` and delivers it, then the
    /// live messages held back meanwhile.
    fn catch_up(&mut self, room: RoomName, start: String, ctx: &mut Context<Self>) {
        let (redis, key, count) = (
            self.redis.clone(),
            self.keys.history(&room),
            self.history_size,
        );
        let read = async move {
            redis
                .exec(move |mut c| async move {
                    redis::AsyncCommands::xrange_count(&mut c, &key, &start, "+", count).await
                })
                .await
        };
        ctx.spawn(read.into_actor(self).map(move |result: crate::redis::RedisResult<redis::streams::StreamRangeReply>, this, _| {
            let replay = match result {
                Ok(reply) => payload::history_envelopes(&room, reply),
                Err(e) => {
                    tracing::warn!(error = %e, room = %room, "catch-up failed; members may have missed messages (they recover with since)");
                    Vec::new()
                }
            };
            this.finish_catch_up(room, replay);
        }));
    }

    fn finish_catch_up(&mut self, room: RoomName, replay: Vec<Envelope>) {
        let Some(CatchUp { floor, held, .. }) = self.catching_up.remove(&room) else {
            return;
        };
        tracing::debug!(room = %room, replayed = replay.len(), held = held.len(), "caught up");
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
    /// A room message not newer than the last one delivered here (a late
    /// copy of one a catch-up delivered) is dropped: members receive in id
    /// order, never twice.
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
        if self.cluster() {
            ctx.run_interval(Duration::from_secs(1), |this, ctx| {
                this.unsubscribe_again(ctx)
            });
        }
        self.connect(ctx);
    }
}

impl StreamHandler<(u64, Event)> for RedisSubscriber {
    fn handle(&mut self, (generation, event): (u64, Event), ctx: &mut Self::Context) {
        if generation != self.generation {
            return;
        }
        match event {
            Event::Message { channel, payload } => self.on_message(&channel, &payload),
            // Ours (the channel is no longer referenced), or the server's.
            Event::Unsubscribed(channel) => {
                if self.cluster() && self.channels.contains_key(&channel) {
                    tracing::info!(
                        channel,
                        "redis dropped a subscription (slot moved or failover)"
                    );
                    self.unsubscribe_again_until = Some(Instant::now() + UNSUBSCRIBE_AGAIN_FOR);
                    self.mark_lost([channel], ctx);
                }
            }
            Event::Disconnected if self.cluster() => {
                tracing::warn!("a redis cluster node's pub/sub connection dropped");
                self.unsubscribe_again_until = Some(Instant::now() + UNSUBSCRIBE_AGAIN_FOR);
                let all: Vec<String> = self.channels.keys().cloned().collect();
                self.mark_lost(all, ctx);
            }
            Event::Disconnected => {
                tracing::warn!("redis pub/sub connection lost; reconnecting");
                self.lost_connection(ctx);
            }
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        // The stream of a connection we still use ended.
        if !self.cluster() {
            self.lost_connection(ctx);
        }
    }
}

impl RedisSubscriber {
    fn on_message(&mut self, channel: &str, bytes: &[u8]) {
        let last = match self.keys.channel_target(channel) {
            Some(ChannelOf::Room(room)) => self.ids.last_room_id(&room),
            _ => None,
        };
        match payload::decode(&self.keys, channel, bytes, &mut self.ids) {
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
/// subscription.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Watch {
    pub channel: String,
    pub confirmed: oneshot::Sender<()>,
}

impl Handler<Watch> for RedisSubscriber {
    type Result = ();

    fn handle(&mut self, msg: Watch, ctx: &mut Self::Context) {
        let room = match self.keys.channel_target(&msg.channel) {
            Some(ChannelOf::Room(room)) => Some(room),
            _ => None,
        };
        let local_rooms = &self.local_rooms;
        let channel = self.channels.entry(msg.channel.clone()).or_insert_with(|| {
            if room.is_some() {
                local_rooms.fetch_add(1, Ordering::Relaxed);
            }
            Channel::new(room)
        });
        channel.refs += 1;
        if channel.confirmed {
            let _ = msg.confirmed.send(());
            return;
        }
        channel.waiters.push(msg.confirmed);
        if channel.refs == 1 {
            self.released.remove(&msg.channel);
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
            self.lost.remove(&msg.0);
            crate::trim::shrink_map(&mut self.channels);
            self.to_subscribe.remove(&msg.0);
            self.remember_released(msg.0.clone());
            self.to_unsubscribe.insert(msg.0);
            self.schedule_flush(ctx);
        }
    }
}

impl RedisBroker {
    /// Takes the reference now; the future resolves once Redis confirmed
    /// the subscription, or fails `unavailable` after `redis.timeout_s`.
    fn watch(&self, channel: String) -> BoxFuture<'static, BrokerResult<()>> {
        let (confirmed, rx) = oneshot::channel();
        self.subscriber.do_send(Watch { channel, confirmed });
        let limit = self.redis.timeout();
        Box::pin(async move {
            match tokio::time::timeout(limit, rx).await {
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
