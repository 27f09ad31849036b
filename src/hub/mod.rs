//! The Hub actor: one per actix-web worker thread, routing to the sessions
//! of that worker by room, by user and to everyone.
//!
//! Sessions register on connect ([`Connect`]) and deregister on every exit
//! ([`Disconnect`]). The broker sends each hub one [`Fanout`] per publish
//! (an `Arc`'d frame serialized once); the hub hands the same bytes to every
//! local recipient's bounded outbound queue ([`crate::session::outbound`]). A full queue
//! closes that session with 1013 `slow consumer`; nobody else waits for it.
//! Joins and their replay/live seam are in [`join`]; presence changes go
//! through per-connection ordered lanes ([`presence`]).
//!
//! Subscriptions: the first local member of a room takes the hub's
//! reference to the room's channel, in the handler itself, and the last one
//! gives it back there too, so a watch and an unwatch are always counted in
//! the order the hub saw the join and the leave.

mod join;
mod messages;
mod presence;

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::oneshot;

use self::join::{Membership, Room};
pub use self::messages::{Acked, CloseSession, Connect, Disconnect, Join, Leave, Shutdown};
use self::presence::{Change, Lanes};
use crate::broker::{Broker, Envelope, Fanout, Target};
use crate::metrics;
use crate::protocol::{Ack, CloseReason, RoomName};
use crate::session::outbound::{self, Bounds, Outbound, OutboundQueue};
use crate::session::SessionKey;

/// How many fan-out messages a hub's mailbox holds; past it the broker's
/// fan-out policy applies (see [`crate::broker::fanout`]).
pub const MAILBOX: usize = 16 * 1024;

struct Member {
    user: Arc<str>,
    connection_id: Arc<str>,
    outbound: OutboundQueue,
    session: Recipient<CloseSession>,
    /// The rooms it is a member of (live or joining) on this hub.
    rooms: HashSet<RoomName>,
}

pub struct Hub {
    broker: Broker,
    /// What one session's queue may hold; a joining member's live buffer
    /// has the same bounds.
    bounds: Bounds,
    sessions: HashMap<SessionKey, Member>,
    rooms: HashMap<RoomName, Room>,
    users: HashMap<Arc<str>, Vec<SessionKey>>,
    next_join_seq: u64,
    presence: Option<Lanes>,
    /// Set by [`Shutdown`]: sessions that connect later are closed at once.
    closing: Option<CloseReason>,
}

impl Hub {
    pub fn new(broker: Broker, bounds: Bounds) -> Hub {
        Hub {
            broker,
            bounds,
            sessions: HashMap::new(),
            rooms: HashMap::new(),
            users: HashMap::new(),
            next_join_seq: 0,
            presence: None,
            closing: None,
        }
    }

    /// Hands `item` to the session's queue; a full queue closes the session.
    fn push(&self, key: SessionKey, item: Outbound) {
        let Some(member) = self.sessions.get(&key) else {
            return;
        };
        if member.outbound.push(item).is_err() {
            member
                .session
                .do_send(CloseSession(CloseReason::SlowConsumer));
        }
    }

    fn close(&self, key: SessionKey, reason: CloseReason) {
        if let Some(member) = self.sessions.get(&key) {
            member.session.do_send(CloseSession(reason));
        }
    }

    fn deliver_room(&mut self, room: &RoomName, envelope: &Arc<Envelope>) {
        let Some(room) = self.rooms.get_mut(room) else {
            return;
        };
        let mut overflowing = Vec::new();
        for (key, membership) in room.members.iter_mut() {
            match membership {
                Membership::Live { floor, outbound } => {
                    // Already replayed to this member at its join.
                    if envelope.id.is_some() && envelope.id <= *floor {
                        continue;
                    }
                    if outbound.push(Outbound::Delivery(envelope.clone())).is_err() {
                        overflowing.push(*key);
                    }
                }
                Membership::Pending { buffered, .. } => {
                    if buffered.push(envelope, self.bounds).is_err() {
                        overflowing.push(*key);
                    }
                }
            }
        }
        for key in overflowing {
            self.close(key, CloseReason::SlowConsumer);
        }
    }

    /// Queues a presence change of session `key` behind its earlier ones.
    fn record_presence(
        &self,
        key: SessionKey,
        joined: bool,
        room: &RoomName,
        done: Option<oneshot::Sender<()>>,
        after: Option<futures_util::future::BoxFuture<'static, ()>>,
    ) {
        let (Some(lanes), Some(member)) = (&self.presence, self.sessions.get(&key)) else {
            return;
        };
        let change = Change {
            joined,
            room: room.clone(),
            user: member.user.clone(),
            connection_id: member.connection_id.clone(),
            done,
            after,
        };
        lanes.push(key, change);
    }

    /// Ends `key`'s membership of `room` (live or joining): presence leave
    /// queued, and the room's subscription given back with its last member.
    fn remove_membership(&mut self, key: SessionKey, room: &RoomName) -> bool {
        let Some(state) = self.rooms.get_mut(room) else {
            return false;
        };
        if state.members.remove(&key).is_none() {
            return false;
        }
        crate::trim::shrink_map(&mut state.members);
        if state.members.is_empty() {
            if let Some(state) = self.rooms.remove(room) {
                for _ in 0..state.watch_refs {
                    self.broker.subscriptions.unwatch_room(room);
                }
            }
            crate::trim::shrink_map(&mut self.rooms);
        }
        // The join's presence change went down the lane when the join
        // began, so this leave follows it there.
        self.record_presence(key, false, room, None, None);
        if let Some(member) = self.sessions.get_mut(&key) {
            member.rooms.remove(room);
        }
        true
    }
}

impl Actor for Hub {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX);
        self.presence = Some(Lanes::start(self.broker.presence.clone()));
        self.broker
            .subscriptions
            .attach_hub(ctx.address().recipient());
        ctx.run_interval(Duration::from_secs(1), |_, _| metrics::flush_local());
    }
}

impl Handler<Connect> for Hub {
    type Result = ();

    fn handle(&mut self, msg: Connect, _: &mut Self::Context) {
        // Handed over on this thread just before; gone if the session is.
        let Some(outbound) = outbound::take_handed(msg.key) else {
            return;
        };
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
                outbound,
                session: msg.session,
                rooms: HashSet::new(),
            },
        );
    }
}

impl Handler<Disconnect> for Hub {
    type Result = ();

    fn handle(&mut self, msg: Disconnect, _: &mut Self::Context) {
        let rooms: Vec<RoomName> = self
            .sessions
            .get(&msg.key)
            .map(|m| m.rooms.iter().cloned().collect())
            .unwrap_or_default();
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
        crate::trim::shrink_map(&mut self.sessions);
        crate::trim::shrink_map(&mut self.users);
    }
}

impl Handler<Leave> for Hub {
    type Result = ();

    fn handle(&mut self, msg: Leave, _: &mut Self::Context) {
        self.remove_membership(msg.key, &msg.room);
        if !msg.quiet {
            let ack = Ack::to(&msg.reference).room(msg.room.as_str()).encode();
            self.push(msg.key, Outbound::Frame(ack));
        }
        let _ = msg.done.send(());
    }
}

impl Handler<Acked> for Hub {
    type Result = ();

    fn handle(&mut self, msg: Acked, _: &mut Self::Context) {
        self.push(msg.key, Outbound::Frame(msg.frame));
        let _ = msg.answered.send(());
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
            Target::Lost(targets) => {
                for target in targets {
                    for key in self.recipients(target) {
                        self.close(key, CloseReason::SlowConsumer);
                    }
                }
            }
        }
    }
}

impl Hub {
    /// The local sessions a target reaches.
    fn recipients(&self, target: &Target) -> Vec<SessionKey> {
        match target {
            Target::Room(room) => self
                .rooms
                .get(room)
                .map(|r| r.members.keys().copied().collect())
                .unwrap_or_default(),
            Target::User(user) => self.users.get(user.as_str()).cloned().unwrap_or_default(),
            Target::All => self.sessions.keys().copied().collect(),
            Target::Kick(_) | Target::Lost(_) => Vec::new(),
        }
    }
}

/// How often a draining hub closes its next batch of sessions.
const DRAIN_TICK: Duration = Duration::from_millis(100);

impl Handler<Shutdown> for Hub {
    type Result = ();

    /// Closes the sessions in batches, one every [`DRAIN_TICK`]: at least
    /// `per_second` a second, more when that would not end within the
    /// window, so that clients do not all reconnect elsewhere at once.
    fn handle(&mut self, msg: Shutdown, ctx: &mut Self::Context) {
        if self.closing.is_some() {
            return;
        }
        self.closing = Some(msg.reason);
        let left: Vec<SessionKey> = self.sessions.keys().copied().collect();
        let batch = drain_batch(left.len(), msg.per_second, msg.window);
        self.drain(left, batch, msg.reason, ctx);
    }
}

/// How many of `sessions` a draining hub closes every [`DRAIN_TICK`]: at
/// least `per_second` a second, and enough to be done within `window`.
fn drain_batch(sessions: usize, per_second: usize, window: Duration) -> usize {
    let ticks = (window.as_millis() / DRAIN_TICK.as_millis()).max(1) as usize;
    let by_rate = per_second * DRAIN_TICK.as_millis() as usize / 1000;
    sessions.div_ceil(ticks).max(by_rate).max(1)
}

impl Hub {
    /// Closes the next `batch` of `left`, and the rest later.
    fn drain(
        &mut self,
        mut left: Vec<SessionKey>,
        batch: usize,
        reason: CloseReason,
        ctx: &mut Context<Self>,
    ) {
        let rest = left.split_off(left.len().saturating_sub(batch));
        for key in rest {
            self.close(key, reason);
        }
        if !left.is_empty() {
            ctx.run_later(DRAIN_TICK, move |hub, ctx| {
                hub.drain(left, batch, reason, ctx)
            });
        }
    }
}

#[cfg(test)]
mod drain_tests {
    use super::drain_batch;
    use std::time::Duration;

    #[test]
    fn batches_keep_the_rate_and_fit_the_window() {
        let window = Duration::from_secs(6);
        // 2,500 a second per hub: 250 per 100 ms tick.
        assert_eq!(drain_batch(10, 2_500, window), 250, "a few: all at once");
        assert_eq!(drain_batch(10_000, 2_500, window), 250, "40 ticks: 4 s");
        assert_eq!(
            drain_batch(60_000, 2_500, window),
            1_000,
            "60 ticks: the window"
        );
        assert_eq!(drain_batch(0, 0, Duration::ZERO), 1);
    }
}
