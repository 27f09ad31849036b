//! The in-memory broker: one instance, nothing to install.
//!
//! All broker state lives in one actor on its own arbiter thread, so the
//! worker threads share no lock: a publish is a message into this actor's
//! mailbox, which assigns the id, appends to history and fans the serialized
//! frame out to every hub in one step. Because one actor does all three, id
//! order and delivery order agree by construction.
//!
//! Bounds: callers use `Addr::send`, which waits while the mailbox holds
//! `MAILBOX` messages, so publishers slow down instead of growing a queue.
//! History holds `history.size` messages per room and expires
//! `history.ttl_s` after the room's last publish.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use async_trait::async_trait;
use serde_json::Value;

use super::{
    now_us, Broker, BrokerError, BrokerResult, BrokerStats, ConnectionInfo, Envelope, Fanout,
    History, HistoryEntry, Target,
};
use crate::config::HistoryConfig;
use crate::protocol::{
    broadcast_frame, direct_frame, message_frame, now_ms, presence_change_frame, MessageId,
    PresenceEntry, RoomName,
};

const MAILBOX: usize = 1024;

/// Handle to the memory broker actor; cheap to share across workers.
pub struct MemoryBroker {
    addr: Addr<BrokerActor>,
    _arbiter: ArbiterHandle,
}

impl MemoryBroker {
    /// Starts the broker actor on an arbiter thread of its own. Must be
    /// called inside a running actix system.
    pub fn start(history: &HistoryConfig) -> Arc<MemoryBroker> {
        let arbiter = Arbiter::new().handle();
        let size = history.size;
        let ttl = Duration::from_secs(history.ttl_s);
        let addr = BrokerActor::start_in_arbiter(&arbiter, move |ctx| {
            ctx.set_mailbox_capacity(MAILBOX);
            BrokerActor::new(size, ttl)
        });
        Arc::new(MemoryBroker {
            addr,
            _arbiter: arbiter,
        })
    }

    /// Runs `f` on the broker actor and returns its result.
    async fn call<R, F>(&self, f: F) -> BrokerResult<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut BrokerActor) -> R + Send + 'static,
    {
        self.addr
            .send(Call(Box::new(f)))
            .await
            .map_err(|e| BrokerError::Internal(format!("memory broker mailbox: {e}")))
    }
}

/// A closure to run on the actor's state: the one message type of the actor.
struct Call<R>(Box<dyn FnOnce(&mut BrokerActor) -> R + Send>);

impl<R: Send + 'static> Message for Call<R> {
    type Result = R;
}

struct RoomHistory {
    last_id: MessageId,
    /// The newest id dropped from `messages` by the size cap, if any.
    trimmed_through: Option<MessageId>,
    messages: VecDeque<HistoryEntry>,
    last_publish: Instant,
}

struct BrokerActor {
    history_size: usize,
    history_ttl: Duration,
    hubs: Vec<Recipient<Fanout>>,
    history: HashMap<RoomName, RoomHistory>,
    /// room → user → the user's connections that are members. Sets, so a
    /// repeated join or leave of one connection changes nothing.
    presence: HashMap<RoomName, BTreeMap<String, HashSet<String>>>,
    /// connection id → user.
    connections: HashMap<String, String>,
    /// user → connection count.
    user_connections: HashMap<String, u64>,
    /// The last id given to a direct or broadcast frame.
    last_other_id: MessageId,
}

impl Actor for BrokerActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let every = (self.history_ttl / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
        ctx.run_interval(every, |this, _| this.expire_history());
    }
}

impl<R: Send + 'static> Handler<Call<R>> for BrokerActor {
    type Result = MessageResult<Call<R>>;

    fn handle(&mut self, msg: Call<R>, _: &mut Self::Context) -> Self::Result {
        MessageResult((msg.0)(self))
    }
}

impl BrokerActor {
    fn new(history_size: usize, history_ttl: Duration) -> Self {
        BrokerActor {
            history_size,
            history_ttl,
            hubs: Vec::new(),
            history: HashMap::new(),
            presence: HashMap::new(),
            connections: HashMap::new(),
            user_connections: HashMap::new(),
            last_other_id: MessageId::default(),
        }
    }

    fn fanout(&mut self, envelope: Envelope) {
        let envelope = Arc::new(envelope);
        self.hubs.retain(|hub| hub.connected());
        for hub in &self.hubs {
            hub.do_send(Fanout(envelope.clone()));
        }
    }

    fn expire_history(&mut self) {
        let ttl = self.history_ttl;
        self.history.retain(|_, h| h.last_publish.elapsed() < ttl);
    }

    /// The room's live history, dropping it first if it has expired.
    fn room_history(&mut self, room: &RoomName) -> Option<&mut RoomHistory> {
        let ttl = self.history_ttl;
        if self
            .history
            .get(room)
            .is_some_and(|h| h.last_publish.elapsed() >= ttl)
        {
            self.history.remove(room);
        }
        self.history.get_mut(room)
    }

    fn publish_room(&mut self, room: RoomName, from: &str, data: &Value) -> MessageId {
        let now = now_ms();
        let size = self.history_size;
        self.room_history(&room);
        let history = self
            .history
            .entry(room.clone())
            .or_insert_with(|| RoomHistory {
                last_id: MessageId::default(),
                trimmed_through: None,
                messages: VecDeque::new(),
                last_publish: Instant::now(),
            });
        let id = history.last_id.next(now);
        let frame = message_frame(&id.to_string(), room.as_str(), from, data, now);
        history.last_id = id;
        history.last_publish = Instant::now();
        history.messages.push_back(HistoryEntry {
            id,
            frame: frame.clone(),
        });
        while history.messages.len() > size {
            if let Some(dropped) = history.messages.pop_front() {
                history.trimmed_through = Some(dropped.id);
            }
        }
        self.fanout(Envelope {
            target: Target::Room(room),
            frame,
            id: Some(id),
            published_us: now_us(),
        });
        id
    }

    fn next_other_id(&mut self) -> MessageId {
        self.last_other_id = self.last_other_id.next(now_ms());
        self.last_other_id
    }

    fn history(&mut self, room: &RoomName, since: Option<MessageId>, limit: usize) -> History {
        let Some(h) = self.room_history(room) else {
            // Nothing retained: a client that names an id may have missed
            // messages that expired with the room's history.
            return History {
                messages: Vec::new(),
                recovered: since.is_none(),
            };
        };
        let after: Vec<&HistoryEntry> = h
            .messages
            .iter()
            .filter(|m| since.is_none_or(|s| m.id > s))
            .collect();
        let skip = after.len().saturating_sub(limit);
        let recovered = match (since, h.trimmed_through) {
            (Some(s), Some(t)) => s >= t && skip == 0,
            _ => skip == 0,
        };
        History {
            messages: after.into_iter().skip(skip).cloned().collect(),
            recovered,
        }
    }

    fn presence_change(&mut self, room: &RoomName, user: &str, connection: &str, joined: bool) {
        let members = self.presence.entry(room.clone()).or_default();
        let first_or_last = if joined {
            let connections = members.entry(user.to_owned()).or_default();
            connections.insert(connection.to_owned()) && connections.len() == 1
        } else {
            let removed = members
                .get_mut(user)
                .is_some_and(|connections| connections.remove(connection));
            let last = removed && members.get(user).is_some_and(HashSet::is_empty);
            if last {
                members.remove(user);
            }
            last
        };
        if members.is_empty() {
            self.presence.remove(room);
        }
        if first_or_last {
            let frame = presence_change_frame(joined, room.as_str(), user);
            self.fanout(Envelope {
                target: Target::Room(room.clone()),
                frame,
                id: None,
                published_us: 0,
            });
        }
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn attach_hub(&self, hub: Recipient<Fanout>) {
        self.addr.do_send(Call(Box::new(move |b: &mut BrokerActor| {
            b.hubs.push(hub);
        })));
    }

    async fn register_connection(
        &self,
        conn: &ConnectionInfo,
        max_per_user: usize,
    ) -> BrokerResult<()> {
        let conn = conn.clone();
        self.call(move |b| {
            let n = b.user_connections.entry(conn.user.clone()).or_insert(0);
            if *n as usize >= max_per_user {
                return Err(BrokerError::ConnectionLimit);
            }
            *n += 1;
            b.connections.insert(conn.connection_id, conn.user);
            Ok(())
        })
        .await?
    }

    async fn unregister_connection(&self, connection_id: &str, user: &str) {
        let (id, user) = (connection_id.to_owned(), user.to_owned());
        let _ = self
            .call(move |b| {
                if b.connections.remove(&id).is_some() {
                    if let Some(n) = b.user_connections.get_mut(&user) {
                        *n -= 1;
                        if *n == 0 {
                            b.user_connections.remove(&user);
                        }
                    }
                }
            })
            .await;
    }

    async fn publish_room(
        &self,
        room: &RoomName,
        from: &str,
        data: &Value,
    ) -> BrokerResult<MessageId> {
        let (room, from, data) = (room.clone(), from.to_owned(), data.clone());
        self.call(move |b| b.publish_room(room, &from, &data)).await
    }

    async fn publish_user(&self, user: &str, from: &str, data: &Value) -> BrokerResult<String> {
        let (user, from, data) = (user.to_owned(), from.to_owned(), data.clone());
        self.call(move |b| {
            let id = b.next_other_id().to_string();
            let frame = direct_frame(&id, &from, &data, now_ms());
            b.fanout(Envelope {
                target: Target::User(user),
                frame,
                id: None,
                published_us: now_us(),
            });
            id
        })
        .await
    }

    async fn broadcast(&self, data: &Value) -> BrokerResult<String> {
        let data = data.clone();
        self.call(move |b| {
            let id = b.next_other_id().to_string();
            let frame = broadcast_frame(&id, &data, now_ms());
            b.fanout(Envelope {
                target: Target::All,
                frame,
                id: None,
                published_us: now_us(),
            });
            id
        })
        .await
    }

    async fn history(
        &self,
        room: &RoomName,
        since: Option<MessageId>,
        limit: usize,
    ) -> BrokerResult<History> {
        let room = room.clone();
        self.call(move |b| b.history(&room, since, limit)).await
    }

    async fn presence_join(
        &self,
        room: &RoomName,
        user: &str,
        connection_id: &str,
    ) -> BrokerResult<()> {
        let (room, user, conn) = (room.clone(), user.to_owned(), connection_id.to_owned());
        self.call(move |b| b.presence_change(&room, &user, &conn, true))
            .await
    }

    async fn presence_leave(
        &self,
        room: &RoomName,
        user: &str,
        connection_id: &str,
    ) -> BrokerResult<()> {
        let (room, user, conn) = (room.clone(), user.to_owned(), connection_id.to_owned());
        self.call(move |b| b.presence_change(&room, &user, &conn, false))
            .await
    }

    async fn presence(&self, room: &RoomName) -> BrokerResult<Vec<PresenceEntry>> {
        let room = room.clone();
        self.call(move |b| {
            b.presence
                .get(&room)
                .map(|members| {
                    members
                        .iter()
                        .map(|(user, connections)| PresenceEntry {
                            user: user.clone(),
                            connections: connections.len() as u64,
                        })
                        .collect()
                })
                .unwrap_or_default()
        })
        .await
    }

    async fn user_connections(&self, user: &str) -> BrokerResult<u64> {
        let user = user.to_owned();
        self.call(move |b| b.user_connections.get(&user).copied().unwrap_or(0))
            .await
    }

    async fn disconnect_user(&self, user: &str) -> BrokerResult<u64> {
        let user = user.to_owned();
        self.call(move |b| {
            let n = b.user_connections.get(&user).copied().unwrap_or(0);
            b.fanout(Envelope {
                target: Target::Kick(user),
                frame: Default::default(),
                id: None,
                published_us: 0,
            });
            n
        })
        .await
    }

    async fn stats(&self) -> BrokerResult<BrokerStats> {
        self.call(|b| BrokerStats {
            rooms: b.presence.len() as u64,
            users: b.user_connections.len() as u64,
            connections: b.connections.len() as u64,
        })
        .await
    }

    async fn ready(&self) -> Result<(), String> {
        if self.addr.connected() {
            Ok(())
        } else {
            Err("memory broker stopped".into())
        }
    }
}
