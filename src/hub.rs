//! The Hub actor: one per actix-web worker thread, routing to the sessions
//! of that worker by room, by user and to everyone.
//!
//! Sessions register on connect and deregister on every exit. The broker
//! sends each hub one [`Fanout`] per publish (an `Arc`'d frame serialized
//! once); the hub hands the same bytes to every local recipient's bounded
//! outbound queue with `try_send`. A full queue closes that session with 1013
//! `slow consumer`; nobody else waits for it.
//!
//! Joins own the replay/live seam: a joining member is first *pending* —
//! live frames for the room are buffered — while the hub makes sure the
//! broker will deliver the room here (`watch_room`) and reads the history
//! after `since`; then it sends the ack, the replay, and the buffered live
//! frames newer than the last replayed id, and the member turns live. So
//! nothing is lost or doubled at the seam.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bytestring::ByteString;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::Sender;

use crate::broker::{Broker, BrokerError, Envelope, Fanout, History, Target};
use crate::metrics;
use crate::protocol::{ack_frame, Ack, CloseReason, MessageId, Ref, RoomName};

/// What goes down one session's outbound queue to its socket writer.
#[derive(Debug)]
pub enum Outbound {
    /// A frame for this session only (ack, error, presence, pong, welcome).
    Frame(ByteString),
    /// A published frame shared with other recipients.
    Delivery(Arc<Envelope>),
    /// A WebSocket ping (heartbeat).
    Ping,
    /// A WebSocket pong answering the client's ping.
    Pong(bytes::Bytes),
}

/// Hub → session: close yourself with this reason.
#[derive(Message, Clone, Copy)]
#[rtype(result = "()")]
pub struct CloseSession(pub CloseReason);

/// Session → hub: a new session on this worker.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Connect {
    pub key: u64,
    pub user: Arc<str>,
    pub connection_id: Arc<str>,
    pub outbound: Sender<Outbound>,
    pub session: Recipient<CloseSession>,
}

/// Session → hub: the session has ended (for any reason).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnect {
    pub key: u64,
}

/// Session → hub: make the session a member of `room`, ack it (with the
/// replay after `since` when given).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Join {
    pub key: u64,
    pub room: RoomName,
    pub since: Option<MessageId>,
    pub reference: Ref,
}

/// Session → hub: leave `room` and ack it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Leave {
    pub key: u64,
    pub room: RoomName,
    pub reference: Ref,
}

/// Server → hub: the instance is shutting down; close every session.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown(pub CloseReason);

/// A member's delivery state in one room.
enum Membership {
    Live,
    /// Join in progress: live frames wait here until the ack and replay are out.
    Pending {
        join_seq: u64,
        buffered: Vec<Arc<Envelope>>,
    },
}

struct Member {
    user: Arc<str>,
    connection_id: Arc<str>,
    outbound: Sender<Outbound>,
    session: Recipient<CloseSession>,
}

pub struct Hub {
    broker: Arc<dyn Broker>,
    max_outbound_queue: usize,
    sessions: HashMap<u64, Member>,
    rooms: HashMap<RoomName, HashMap<u64, Membership>>,
    users: HashMap<Arc<str>, Vec<u64>>,
    next_join_seq: u64,
}

impl Hub {
    pub fn new(broker: Arc<dyn Broker>, max_outbound_queue: usize) -> Hub {
        Hub {
            broker,
            max_outbound_queue,
            sessions: HashMap::new(),
            rooms: HashMap::new(),
            users: HashMap::new(),
            next_join_seq: 0,
        }
    }

    /// Hands `item` to the session's queue; a full queue closes the session.
    fn push(&self, key: u64, item: Outbound) {
        let Some(member) = self.sessions.get(&key) else {
            return;
        };
        if let Err(TrySendError::Full(_)) = member.outbound.try_send(item) {
            member
                .session
                .do_send(CloseSession(CloseReason::SlowConsumer));
        }
    }

    fn deliver_room(&mut self, room: &RoomName, envelope: &Arc<Envelope>) {
        let Some(members) = self.rooms.get_mut(room) else {
            return;
        };
        let mut overflowing = Vec::new();
        for (key, membership) in members.iter_mut() {
            match membership {
                Membership::Live => {
                    let Some(member) = self.sessions.get(key) else {
                        continue;
                    };
                    if let Err(TrySendError::Full(_)) = member
                        .outbound
                        .try_send(Outbound::Delivery(envelope.clone()))
                    {
                        overflowing.push(*key);
                    }
                }
                Membership::Pending { buffered, .. } => {
                    if buffered.len() >= self.max_outbound_queue {
                        overflowing.push(*key);
                    } else {
                        buffered.push(envelope.clone());
                    }
                }
            }
        }
        for key in overflowing {
            if let Some(member) = self.sessions.get(&key) {
                member
                    .session
                    .do_send(CloseSession(CloseReason::SlowConsumer));
            }
        }
    }

    /// Finishes a join: ack, replay, buffered live frames, then live.
    fn complete_join(
        &mut self,
        join: &Join,
        join_seq: u64,
        history: Result<History, BrokerError>,
        member: (Arc<str>, Arc<str>),
    ) {
        let (key, room, since, reference) = (join.key, &join.room, join.since, &join.reference);
        let still_pending = matches!(
            self.rooms.get(room).and_then(|m| m.get(&key)),
            Some(Membership::Pending { join_seq: seq, .. }) if *seq == join_seq
        );
        if !still_pending {
            // Left (or left and joined again) while this join was pending.
            let member_now = self.rooms.get(room).is_some_and(|m| m.contains_key(&key));
            if !member_now {
                // The session may be gone already: use what the join knew.
                self.record_presence_leave(room, member.0, member.1);
            }
            return;
        }
        let Some(Membership::Pending { buffered, .. }) = self
            .rooms
            .get_mut(room)
            .and_then(|m| m.insert(key, Membership::Live))
        else {
            return;
        };
        // Without the broker (Redis away) the join still works locally; the
        // client is told it may have missed messages.
        let history = history.unwrap_or_else(|e| {
            tracing::warn!(error = %e, room = %room, "join without history: broker unavailable");
            History {
                messages: Vec::new(),
                recovered: false,
            }
        });
        let ack = Ack {
            reference: reference.as_ref(),
            room: Some(room.as_str()),
            recovered: since.map(|_| history.recovered),
            ..Ack::default()
        };
        self.push(key, Outbound::Frame(ack_frame(&ack)));
        let mut last = since;
        for entry in history.messages {
            last = Some(entry.id);
            self.push(key, Outbound::Frame(entry.frame));
        }
        for envelope in buffered {
            let newer = match (envelope.id, last) {
                (Some(id), Some(last)) => id > last,
                _ => true,
            };
            if newer {
                self.push(key, Outbound::Delivery(envelope));
            }
        }
    }

    fn record_presence_leave(&self, room: &RoomName, user: Arc<str>, conn: Arc<str>) {
        let (broker, room) = (self.broker.clone(), room.clone());
        actix::spawn(async move {
            if let Err(e) = broker.presence_leave(&room, &user, &conn).await {
                tracing::warn!(error = %e, room = %room, "presence leave not recorded");
            }
        });
    }

    /// Removes `key` from `room`; records the presence change.
    fn remove_membership(&mut self, key: u64, room: &RoomName) -> bool {
        let Some(members) = self.rooms.get_mut(room) else {
            return false;
        };
        let Some(membership) = members.remove(&key) else {
            return false;
        };
        if members.is_empty() {
            self.rooms.remove(room);
            self.broker.unwatch_room(room);
        }
        // A pending join records its presence when it completes, and sees
        // then that the member has gone.
        if let (Membership::Live, Some(member)) = (membership, self.sessions.get(&key)) {
            self.record_presence_leave(room, member.user.clone(), member.connection_id.clone());
        }
        true
    }
}

impl Actor for Hub {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.broker.attach_hub(ctx.address().recipient());
        ctx.run_interval(Duration::from_secs(1), |_, _| metrics::flush_local());
    }
}

impl Handler<Connect> for Hub {
    type Result = ();

    fn handle(&mut self, msg: Connect, _: &mut Self::Context) {
        self.users
            .entry(msg.user.clone())
            .or_default()
            .push(msg.key);
        self.sessions.insert(
            msg.key,
            Member {
                user: msg.user,
                connection_id: msg.connection_id,
                outbound: msg.outbound,
                session: msg.session,
            },
        );
    }
}

impl Handler<Disconnect> for Hub {
    type Result = ();

    fn handle(&mut self, msg: Disconnect, _: &mut Self::Context) {
        let rooms: Vec<RoomName> = self
            .rooms
            .iter()
            .filter(|(_, members)| members.contains_key(&msg.key))
            .map(|(room, _)| room.clone())
            .collect();
        for room in rooms {
            self.remove_membership(msg.key, &room);
        }
        if let Some(member) = self.sessions.remove(&msg.key) {
            if let Entry::Occupied(mut keys) = self.users.entry(member.user.clone()) {
                keys.get_mut().retain(|k| *k != msg.key);
                if keys.get().is_empty() {
                    keys.remove();
                }
            }
        }
    }
}

impl Handler<Join> for Hub {
    type Result = ();

    fn handle(&mut self, msg: Join, ctx: &mut Self::Context) {
        if !self.sessions.contains_key(&msg.key) {
            return;
        }
        let members = self.rooms.entry(msg.room.clone()).or_default();
        let first_here = members.is_empty();
        if let Some(Membership::Live) = members.get(&msg.key) {
            // Already a member: nothing was missed while connected.
            let ack = Ack {
                reference: msg.reference.as_ref(),
                room: Some(msg.room.as_str()),
                recovered: msg.since.map(|_| true),
                ..Ack::default()
            };
            self.push(msg.key, Outbound::Frame(ack_frame(&ack)));
            return;
        }
        self.next_join_seq += 1;
        let join_seq = self.next_join_seq;
        // A join while an earlier one is pending takes over its buffer, so
        // frames that arrived in between are not dropped.
        let buffered = match members.remove(&msg.key) {
            Some(Membership::Pending { buffered, .. }) => buffered,
            _ => Vec::new(),
        };
        members.insert(msg.key, Membership::Pending { join_seq, buffered });
        let Some(member) = self.sessions.get(&msg.key) else {
            return;
        };
        let (broker, user, conn) = (
            self.broker.clone(),
            member.user.clone(),
            member.connection_id.clone(),
        );
        let (room, since) = (msg.room.clone(), msg.since);
        let identity = (user.clone(), conn.clone());
        // Subscribed before history is read (nothing lost at the seam), and
        // presence recorded before the ack (a client sees itself present).
        let work = async move {
            let watched = if first_here {
                broker.watch_room(&room).await
            } else {
                Ok(())
            };
            let history = match (watched, since) {
                (Err(e), _) => Err(e),
                (Ok(()), Some(since)) => broker.history(&room, Some(since), usize::MAX).await,
                (Ok(()), None) => Ok(History::default()),
            };
            if let Err(e) = broker.presence_join(&room, &user, &conn).await {
                tracing::warn!(error = %e, room = %room, "presence join not recorded");
            }
            history
        };
        ctx.spawn(work.into_actor(self).map(move |history, hub, _| {
            hub.complete_join(&msg, join_seq, history, identity);
        }));
    }
}

impl Handler<Leave> for Hub {
    type Result = ();

    fn handle(&mut self, msg: Leave, _: &mut Self::Context) {
        self.remove_membership(msg.key, &msg.room);
        let ack = Ack {
            reference: msg.reference.as_ref(),
            room: Some(msg.room.as_str()),
            ..Ack::default()
        };
        self.push(msg.key, Outbound::Frame(ack_frame(&ack)));
    }
}

impl Handler<Fanout> for Hub {
    type Result = ();

    fn handle(&mut self, Fanout(envelope): Fanout, _: &mut Self::Context) {
        match &envelope.target {
            Target::Room(room) => self.deliver_room(room, &envelope),
            Target::User(user) => {
                for key in self.users.get(user.as_str()).into_iter().flatten() {
                    self.push(*key, Outbound::Delivery(envelope.clone()));
                }
            }
            Target::All => {
                for key in self.sessions.keys() {
                    self.push(*key, Outbound::Delivery(envelope.clone()));
                }
            }
            Target::Kick(user) => {
                for key in self.users.get(user.as_str()).into_iter().flatten() {
                    if let Some(member) = self.sessions.get(key) {
                        member.session.do_send(CloseSession(CloseReason::Kicked));
                    }
                }
            }
        }
    }
}

impl Handler<Shutdown> for Hub {
    type Result = ();

    fn handle(&mut self, msg: Shutdown, _: &mut Self::Context) {
        for member in self.sessions.values() {
            member.session.do_send(CloseSession(msg.0));
        }
    }
}
