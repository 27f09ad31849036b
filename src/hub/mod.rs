//! The Hub actor: one per actix-web worker thread, routing to the sessions
//! of that worker by room, by user and to everyone.
//!
//! Sessions register on connect ([`Connect`]) and deregister on every exit
//! ([`Disconnect`]). The broker sends each hub one [`Fanout`] per publish
//! (an `Arc`'d frame serialized once); the hub hands the same bytes to every
//! local recipient's bounded outbound queue with `try_send`. A full queue
//! closes that session with 1013 `slow consumer`; nobody else waits for it.
//! Joins and their replay/live seam are in [`join`].

mod join;
mod messages;

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::Sender;

use self::join::Membership;
pub use self::messages::{CloseSession, Connect, Disconnect, Join, Leave, Outbound, Shutdown};
use crate::broker::{Broker, Envelope, Fanout, Target};
use crate::metrics;
use crate::protocol::{Ack, CloseReason, RoomName};

struct Member {
    user: Arc<str>,
    connection_id: Arc<str>,
    outbound: Sender<Outbound>,
    session: Recipient<CloseSession>,
}

pub struct Hub {
    broker: Broker,
    max_outbound_queue: usize,
    sessions: HashMap<u64, Member>,
    rooms: HashMap<RoomName, HashMap<u64, Membership>>,
    users: HashMap<Arc<str>, Vec<u64>>,
    next_join_seq: u64,
    /// Set by [`Shutdown`]: sessions that connect later are closed at once.
    closing: Option<CloseReason>,
}

impl Hub {
    pub fn new(broker: Broker, max_outbound_queue: usize) -> Hub {
        Hub {
            broker,
            max_outbound_queue,
            sessions: HashMap::new(),
            rooms: HashMap::new(),
            users: HashMap::new(),
            next_join_seq: 0,
            closing: None,
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

    fn close(&self, key: u64, reason: CloseReason) {
        if let Some(member) = self.sessions.get(&key) {
            member.session.do_send(CloseSession(reason));
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
            self.close(key, CloseReason::SlowConsumer);
        }
    }

    /// Records in the broker that a connection left a room (in the
    /// background: the session may be gone already).
    fn record_presence_leave(&self, room: &RoomName, user: Arc<str>, conn: Arc<str>) {
        let (presence, room) = (self.broker.presence.clone(), room.clone());
        actix::spawn(async move {
            if let Err(e) = presence.leave(&room, &user, &conn).await {
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
            self.broker.subscriptions.unwatch_room(room);
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
        self.broker
            .subscriptions
            .attach_hub(ctx.address().recipient());
        ctx.run_interval(Duration::from_secs(1), |_, _| metrics::flush_local());
    }
}

impl Handler<Connect> for Hub {
    type Result = ();

    fn handle(&mut self, msg: Connect, _: &mut Self::Context) {
        if let Some(reason) = self.closing {
            msg.session.do_send(CloseSession(reason));
        }
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

impl Handler<Leave> for Hub {
    type Result = ();

    fn handle(&mut self, msg: Leave, _: &mut Self::Context) {
        self.remove_membership(msg.key, &msg.room);
        let ack = Ack::to(&msg.reference).room(msg.room.as_str()).encode();
        self.push(msg.key, Outbound::Frame(ack));
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
                    self.close(*key, CloseReason::Kicked);
                }
            }
        }
    }
}

impl Handler<Shutdown> for Hub {
    type Result = ();

    fn handle(&mut self, msg: Shutdown, _: &mut Self::Context) {
        self.closing = Some(msg.0);
        for member in self.sessions.values() {
            member.session.do_send(CloseSession(msg.0));
        }
    }
}
