//! The local fan-out both brokers share: the envelopes a publish becomes,
//! the set of this instance's hubs they are sent to, and the ids an
//! instance gives on its own (direct and broadcast frames, messages
//! published straight into Redis, local delivery during an outage).
//!
//! An [`Envelope`] is built once per publish, with its frame already
//! serialized by [`crate::protocol`], and sent as one `Arc` to every hub
//! ([`HubSet::send`]); hubs hand the same bytes to every local recipient.
//!
//! **When a hub's mailbox is full** ([`crate::hub::MAILBOX`] fan-outs: the
//! worker cannot keep up), the envelope is not queued anywhere else: it is
//! dropped for that hub (`switchboard_fanout_dropped_total`), and so is
//! every later envelope for the same target, until the hub has taken a
//! [`Target::Lost`] marker, on which it closes the local recipients of
//! those targets with 1013 `slow consumer`. So no member ever sees a gap:
//! it gets every message in order, or is closed and recovers with `since`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use actix::dev::SendError;
use actix::{Message, Recipient};
use bytestring::ByteString;
use serde::Serialize;

use crate::clock::{now_ms, now_us};
use crate::metrics::metrics;
use crate::protocol::{
    broadcast_frame, direct_frame, message_frame, presence_change_frame, MessageId, RoomName,
};

/// Who an envelope is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// Every member of the room.
    Room(RoomName),
    /// Every connection of the user.
    User(String),
    /// Every connection.
    All,
    /// Close every connection of the user with 1008 `kicked`; never a frame.
    Kick(String),
    /// Envelopes for these targets were dropped for this hub: close their
    /// local recipients with 1013 `slow consumer`; never a frame.
    Lost(Vec<Target>),
}

/// One publish, serialized once, shared by every recipient on every hub.
#[derive(Debug)]
pub struct Envelope {
    pub target: Target,
    /// The complete server frame, ready for the socket.
    pub frame: ByteString,
    /// The room message id, for the replay/live seam; `None` for frames
    /// that are not history (joined/left, direct, broadcast).
    pub id: Option<MessageId>,
    /// Microseconds since the epoch when it was published, for the delivery
    /// metrics; 0 for frames that are not messages (joined/left, kicks),
    /// which those metrics skip.
    pub published_us: u64,
}

/// When a message was published: its `ts` and, for the latency metrics,
/// the same moment in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct Stamp {
    pub ts_ms: u64,
    pub published_us: u64,
}

impl Stamp {
    pub fn now() -> Stamp {
        let published_us = now_us();
        Stamp {
            ts_ms: published_us / 1000,
            published_us,
        }
    }

    /// A publish known only to the millisecond (stamped by Redis).
    pub fn at_ms(ts_ms: u64) -> Stamp {
        Stamp {
            ts_ms,
            published_us: ts_ms.saturating_mul(1000),
        }
    }
}

impl Envelope {
    /// A room `message`.
    /// A room message; `id` is `None` only for one published straight into
    /// Redis without one (not in history).
    pub fn message<D: Serialize + ?Sized>(
        room: RoomName,
        id: Option<MessageId>,
        from: &str,
        data: &D,
        at: Stamp,
    ) -> Envelope {
        let text = id.map(|id| id.to_string());
        let frame = message_frame(text.as_deref(), room.as_str(), from, data, at.ts_ms);
        Envelope {
            target: Target::Room(room),
            frame,
            id,
            published_us: at.published_us,
        }
    }

    /// A `direct` frame for every connection of `user`.
    pub fn direct<D: Serialize + ?Sized>(
        user: String,
        id: &str,
        from: &str,
        data: &D,
        at: Stamp,
    ) -> Envelope {
        Envelope::to_user(user, direct_frame(id, from, data, at.ts_ms), at)
    }

    /// A complete frame for every connection of `user`.
    pub fn to_user(user: String, frame: ByteString, at: Stamp) -> Envelope {
        Envelope {
            target: Target::User(user),
            frame,
            id: None,
            published_us: at.published_us,
        }
    }

    /// A `broadcast` frame for everyone.
    pub fn broadcast<D: Serialize + ?Sized>(id: &str, data: &D, at: Stamp) -> Envelope {
        Envelope {
            target: Target::All,
            frame: broadcast_frame(id, data, at.ts_ms),
            id: None,
            published_us: at.published_us,
        }
    }

    /// `joined` / `left` for the room's members.
    pub fn presence_change(room: RoomName, joined: bool, user: &str) -> Envelope {
        let frame = presence_change_frame(joined, room.as_str(), user);
        Envelope::room_frame(room, frame)
    }

    /// A complete frame for the room's members that is not a history
    /// message (`joined` / `left` relayed from Redis as they are).
    pub fn room_frame(room: RoomName, frame: ByteString) -> Envelope {
        Envelope {
            target: Target::Room(room),
            frame,
            id: None,
            published_us: 0,
        }
    }

    /// A history message replayed after a lost subscription.
    pub fn replayed(room: RoomName, id: MessageId, frame: ByteString) -> Envelope {
        Envelope {
            target: Target::Room(room),
            frame,
            id: Some(id),
            published_us: id.ms.saturating_mul(1000),
        }
    }

    /// Closes every connection of `user` with 1008 `kicked`.
    pub fn kick(user: String) -> Envelope {
        Envelope {
            target: Target::Kick(user),
            frame: ByteString::default(),
            id: None,
            published_us: 0,
        }
    }
}

/// Broker → hub: deliver this envelope to your local recipients.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct Fanout(pub Arc<Envelope>);

/// One hub and what was dropped for it.
struct HubLink {
    hub: Recipient<Fanout>,
    /// Targets whose envelopes are dropped until the hub took the marker.
    lost: HashSet<Target>,
}

impl HubLink {
    /// Hands the pending [`Target::Lost`] marker over, if the hub has room.
    fn flush(&mut self) {
        if self.lost.is_empty() {
            return;
        }
        let targets: Vec<Target> = self.lost.iter().cloned().collect();
        let marker = Envelope {
            target: Target::Lost(targets),
            frame: ByteString::default(),
            id: None,
            published_us: 0,
        };
        if self.hub.try_send(Fanout(Arc::new(marker))).is_ok() {
            self.lost.clear();
        }
    }

    fn send(&mut self, envelope: &Arc<Envelope>) {
        self.flush();
        if self.lost.contains(&envelope.target) {
            metrics().fanout_dropped.inc();
            return;
        }
        match self.hub.try_send(Fanout(envelope.clone())) {
            Ok(()) => {}
            Err(SendError::Full(_)) => {
                metrics().fanout_dropped.inc();
                self.lost.insert(envelope.target.clone());
            }
            Err(SendError::Closed(_)) => {}
        }
    }
}

/// This instance's hubs, one per worker thread.
#[derive(Default)]
pub struct HubSet(Vec<HubLink>);

impl HubSet {
    pub fn attach(&mut self, hub: Recipient<Fanout>) {
        self.0.push(HubLink {
            hub,
            lost: HashSet::new(),
        });
    }

    /// Sends the envelope to every hub: one `Arc` each, never a copy.
    pub fn send(&mut self, envelope: Envelope) {
        let envelope = Arc::new(envelope);
        self.0.retain(|link| link.hub.connected());
        for link in &mut self.0 {
            link.send(&envelope);
        }
    }

    /// Hands pending [`Target::Lost`] markers over (call it on a timer).
    pub fn flush(&mut self) {
        for link in &mut self.0 {
            link.flush();
        }
    }
}

/// The ids an instance keeps: the last room message id delivered in each
/// room with local members (where a catch-up after a lost subscription
/// starts, and below which a late copy is dropped), and a sequence for
/// direct and broadcast frames published straight into Redis without one.
#[derive(Default)]
pub struct LocalIds {
    rooms: HashMap<RoomName, MessageId>,
    other: MessageId,
}

impl LocalIds {
    /// A history id delivered in `room`.
    pub fn seen_room(&mut self, room: &RoomName, id: MessageId) {
        let last = self.rooms.entry(room.clone()).or_default();
        *last = (*last).max(id);
    }

    /// The newest id delivered in `room`.
    pub fn last_room_id(&self, room: &RoomName) -> Option<MessageId> {
        self.rooms.get(room).copied()
    }

    /// The room has no local member any more: forget it (bounded memory).
    pub fn forget_room(&mut self, room: &RoomName) {
        self.rooms.remove(room);
    }

    /// The next id for a direct or broadcast frame.
    pub fn next_other(&mut self) -> MessageId {
        self.other = self.other.next(now_ms());
        self.other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_delivered_id_only_grows() {
        let mut ids = LocalIds::default();
        let room = RoomName::parse("r").unwrap();
        let (a, b) = (MessageId { ms: 5, seq: 0 }, MessageId { ms: 9, seq: 1 });
        ids.seen_room(&room, b);
        ids.seen_room(&room, a);
        assert_eq!(ids.last_room_id(&room), Some(b));
        let (x, y) = (ids.next_other(), ids.next_other());
        assert!(y > x);
    }
}
