//! The `RedisSubscriber` actor: owns the instance's one pub/sub connection
//! and forwards what arrives to every hub, once per hub, as one shared
//! pre-serialized [`Envelope`].
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
//! [`LocalPublish`] delivers to this instance's members only.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures_util::StreamExt;
use redis::aio::PubSubSink;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::oneshot;

use crate::broker::{now_us, Envelope, Fanout, Target};
use crate::metrics::metrics;
use crate::protocol::{broadcast_frame, direct_frame, message_frame, now_ms, MessageId, RoomName};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

struct Channel {
    refs: usize,
    confirmed: bool,
    waiters: Vec<oneshot::Sender<()>>,
}

pub struct RedisSubscriber {
    client: redis::Client,
    prefix: String,
    hubs: Vec<Recipient<Fanout>>,
    channels: HashMap<String, Channel>,
    to_subscribe: HashSet<String>,
    to_unsubscribe: HashSet<String>,
    flush_scheduled: bool,
    sink: Option<PubSubSink>,
    /// Bumped on every (re)connect, so a stale stream's end is ignored.
    generation: u64,
    backoff: Duration,
    connected: Arc<AtomicBool>,
    /// The last id seen or given per room, for messages published straight
    /// into Redis without one and for local delivery during an outage.
    last_ids: HashMap<RoomName, MessageId>,
    last_other_id: MessageId,
}

impl RedisSubscriber {
    pub fn new(client: redis::Client, prefix: String, connected: Arc<AtomicBool>) -> Self {
        RedisSubscriber {
            client,
            prefix,
            hubs: Vec::new(),
            channels: HashMap::new(),
            to_subscribe: HashSet::new(),
            to_unsubscribe: HashSet::new(),
            flush_scheduled: false,
            sink: None,
            generation: 0,
            backoff: BACKOFF_MIN,
            connected,
            last_ids: HashMap::new(),
            last_other_id: MessageId::default(),
        }
    }

    fn broadcast_channel(&self) -> String {
        format!("{}:broadcast", self.prefix)
    }

    fn fanout(&mut self, envelope: Envelope) {
        let envelope = Arc::new(envelope);
        self.hubs.retain(|hub| hub.connected());
        for hub in &self.hubs {
            hub.do_send(Fanout(envelope.clone()));
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
        let subscribe: Vec<String> = self.to_subscribe.drain().collect();
        let unsubscribe: Vec<String> = self.to_unsubscribe.drain().collect();
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

    fn connect(&mut self, ctx: &mut Context<Self>) {
        let client = self.client.clone();
        let mut channels: Vec<String> = self.channels.keys().cloned().collect();
        channels.push(self.broadcast_channel());
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
            Ok((sink, stream, channels)) => {
                if this.generation > 0 {
                    metrics().redis_reconnects.with_label_values(&["subscriber"]).inc();
                    tracing::info!("redis subscriber reconnected; subscriptions restored");
                }
                this.generation += 1;
                let generation = this.generation;
                this.sink = Some(sink);
                this.backoff = BACKOFF_MIN;
                this.connected.store(true, Ordering::Release);
                this.confirm(channels);
                ctx.add_stream(stream.map(move |msg| (generation, msg)));
                // Channels referenced while the connection was being made.
                let missing: Vec<String> = this
                    .channels
                    .iter()
                    .filter(|(_, c)| !c.confirmed)
                    .map(|(name, _)| name.clone())
                    .collect();
                if !missing.is_empty() {
                    this.to_subscribe.extend(missing);
                    this.schedule_flush(ctx);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "redis subscriber cannot connect; retrying with backoff");
                this.reconnect_later(ctx);
            }
        }));
    }

    fn next_room_id(&mut self, room: &RoomName) -> MessageId {
        let last = self.last_ids.entry(room.clone()).or_default();
        *last = last.next(now_ms());
        *last
    }

    fn next_other_id(&mut self) -> MessageId {
        self.last_other_id = self.last_other_id.next(now_ms());
        self.last_other_id
    }

    /// Turns one pub/sub message into an envelope; `None` when malformed.
    fn envelope(&mut self, channel: &str, payload: &[u8]) -> Option<Envelope> {
        let name = channel.strip_prefix(&self.prefix)?.strip_prefix(':')?;
        if name == "broadcast" {
            let p: BroadcastPayload = serde_json::from_slice(payload).ok()?;
            let id = match p.id {
                Some(id) => id,
                None => self.next_other_id().to_string(),
            };
            let ts = p.ts.unwrap_or_else(now_ms);
            return Some(Envelope {
                target: Target::All,
                frame: broadcast_frame(&id, &*p.data, ts),
                id: None,
                published_us: ts * 1000,
            });
        }
        if let Some(room) = name.strip_prefix("room:") {
            let room = RoomName::parse(room).ok()?;
            let p: RoomPayload = serde_json::from_slice(payload).ok()?;
            if let Some(kind) = p.kind.as_deref() {
                // `joined` / `left`, already a complete frame.
                if !matches!(kind, "joined" | "left") {
                    return None;
                }
                let frame = std::str::from_utf8(payload).ok()?;
                return Some(Envelope {
                    target: Target::Room(room),
                    frame: frame.to_owned().into(),
                    id: None,
                    published_us: 0,
                });
            }
            let data = p.data?;
            let id = match p.id.as_deref().map(str::parse::<MessageId>) {
                Some(Ok(id)) => {
                    let last = self.last_ids.entry(room.clone()).or_default();
                    *last = (*last).max(id);
                    id
                }
                Some(Err(_)) => return None,
                None => self.next_room_id(&room),
            };
            let ts = p.ts.unwrap_or_else(now_ms);
            let from = p.from.as_deref().unwrap_or("server");
            let frame = message_frame(&id.to_string(), room.as_str(), from, &*data, ts);
            return Some(Envelope {
                target: Target::Room(room),
                frame,
                id: Some(id),
                published_us: ts * 1000,
            });
        }
        if let Some(user) = name.strip_prefix("user:") {
            let p: UserPayload = serde_json::from_slice(payload).ok()?;
            return match p.kind.as_deref() {
                Some("kick") => Some(Envelope {
                    target: Target::Kick(user.to_owned()),
                    frame: Default::default(),
                    id: None,
                    published_us: 0,
                }),
                // A complete server frame (direct, task update): as it is.
                Some(_) => Some(Envelope {
                    target: Target::User(user.to_owned()),
                    frame: std::str::from_utf8(payload).ok()?.to_owned().into(),
                    id: None,
                    published_us: p.ts.map_or_else(now_us, |ts| ts * 1000),
                }),
                // `{"data":…}` from a backend: a direct frame from the server.
                None => {
                    let data = p.data?;
                    let id = self.next_other_id().to_string();
                    let ts = now_ms();
                    Some(Envelope {
                        target: Target::User(user.to_owned()),
                        frame: direct_frame(&id, "server", &*data, ts),
                        id: None,
                        published_us: ts * 1000,
                    })
                }
            };
        }
        None
    }
}

#[derive(Deserialize)]
struct RoomPayload {
    #[serde(rename = "type")]
    kind: Option<String>,
    id: Option<String>,
    from: Option<String>,
    data: Option<Box<RawValue>>,
    ts: Option<u64>,
}

#[derive(Deserialize)]
struct BroadcastPayload {
    id: Option<String>,
    data: Box<RawValue>,
    ts: Option<u64>,
}

#[derive(Deserialize)]
struct UserPayload {
    #[serde(rename = "type")]
    kind: Option<String>,
    data: Option<Box<RawValue>>,
    ts: Option<u64>,
}

impl Actor for RedisSubscriber {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(4096);
        self.connect(ctx);
    }
}

impl StreamHandler<(u64, redis::Msg)> for RedisSubscriber {
    fn handle(&mut self, (generation, msg): (u64, redis::Msg), _: &mut Self::Context) {
        if generation != self.generation {
            return;
        }
        let channel = msg.get_channel_name();
        match self.envelope(channel, msg.get_payload_bytes()) {
            Some(envelope) => self.fanout(envelope),
            None => {
                metrics().redis_malformed.inc();
                // The payload may carry user data: log its size, not its content.
                tracing::warn!(
                    channel,
                    bytes = msg.get_payload_bytes().len(),
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
        self.hubs.push(msg.0);
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
        let channel = self.channels.entry(msg.channel.clone()).or_insert(Channel {
            refs: 0,
            confirmed: false,
            waiters: Vec::new(),
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
            self.channels.remove(&msg.0);
            self.to_subscribe.remove(&msg.0);
            self.to_unsubscribe.insert(msg.0);
            self.schedule_flush(ctx);
        }
    }
}

/// Delivery to this instance only, while Redis is away.
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
}

impl Handler<LocalPublish> for RedisSubscriber {
    type Result = String;

    fn handle(&mut self, msg: LocalPublish, _: &mut Self::Context) -> String {
        let ts = now_ms();
        let (envelope, id) = match msg {
            LocalPublish::Room { room, from, data } => {
                let id = self.next_room_id(&room);
                let frame = message_frame(&id.to_string(), room.as_str(), &from, &*data, ts);
                let envelope = Envelope {
                    target: Target::Room(room),
                    frame,
                    id: Some(id),
                    published_us: now_us(),
                };
                (envelope, id.to_string())
            }
            LocalPublish::User { user, from, data } => {
                let id = self.next_other_id().to_string();
                let envelope = Envelope {
                    target: Target::User(user),
                    frame: direct_frame(&id, &from, &*data, ts),
                    id: None,
                    published_us: now_us(),
                };
                (envelope, id)
            }
            LocalPublish::Broadcast { data } => {
                let id = self.next_other_id().to_string();
                let envelope = Envelope {
                    target: Target::All,
                    frame: broadcast_frame(&id, &*data, ts),
                    id: None,
                    published_us: now_us(),
                };
                (envelope, id)
            }
        };
        self.fanout(envelope);
        id
    }
}
