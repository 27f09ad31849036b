//! Joins and the replay/live seam.
//!
//! A joining member is first *pending*: live frames for the room are
//! buffered while the hub makes sure the broker delivers the room here
//! (the room's watch, shared by every join that arrives while it is in
//! flight), reads the history after `since` and records presence. Then it
//! sends the ack, the replay, and the buffered live frames newer than the
//! last replayed id, and the member turns live with that id as its floor:
//! a live delivery at or below it (a lagging subscriber's copy of a
//! replayed message) is dropped. So nothing is lost or doubled at the seam.

use std::sync::Arc;

use actix::prelude::*;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::oneshot;

use super::{Hub, Join};
use crate::broker::{Broker, BrokerError, Envelope, History};
use crate::protocol::{Ack, ErrorReply, MessageId, RoomName};
use crate::session::outbound::{Bounds, Full, Outbound, OutboundQueue};
use crate::session::reply::counted_error_frame;
use crate::session::SessionKey;

/// A member's delivery state in one room.
pub(super) enum Membership {
    /// Receives the room's deliveries newer than `floor`, into its
    /// session's queue (kept here: no lookup per delivery).
    Live {
        floor: Option<MessageId>,
        outbound: OutboundQueue,
    },
    /// Join in progress: live frames wait here until the ack and replay are out.
    Pending { join_seq: u64, buffered: Buffered },
}

/// Live frames for a joining member, bounded like its outbound queue.
#[derive(Default)]
pub(super) struct Buffered {
    envelopes: Vec<Arc<Envelope>>,
    bytes: usize,
}

impl Buffered {
    pub fn push(&mut self, envelope: &Arc<Envelope>, bounds: Bounds) -> Result<(), Full> {
        let size = envelope.frame.len();
        if self.envelopes.len() >= bounds.frames || self.bytes + size > bounds.bytes {
            return Err(Full);
        }
        self.bytes += size;
        self.envelopes.push(envelope.clone());
        Ok(())
    }
}

/// A watch in flight or done, shared by the joins that wait for it.
type Watched = Shared<BoxFuture<'static, Result<(), String>>>;

/// One room's members on this hub and the hub's subscription to it.
pub(super) struct Room {
    pub members: std::collections::HashMap<SessionKey, Membership>,
    watched: Watched,
    /// References this hub holds on the room's channel (one, plus one per
    /// watch retried after a failure), all given back with the last member.
    pub watch_refs: usize,
}

fn watch(broker: &Broker, room: &RoomName) -> Watched {
    broker
        .subscriptions
        .watch_room(room)
        .map(|r| r.map_err(|e| e.to_string()))
        .boxed()
        .shared()
}

/// How a join's preparation ended.
enum Prepared {
    Ready(History),
    /// The room's channel or its history could not be had (the broker is
    /// away: `unavailable`, the client may retry): the join is refused.
    Failed(BrokerError),
}

/// Waits for the room's watch (nothing lost at the seam), reads history,
/// and waits for presence (a client sees itself present once acked).
async fn prepare(
    broker: Broker,
    watched: Watched,
    room: RoomName,
    since: Option<MessageId>,
    presence_recorded: oneshot::Receiver<()>,
) -> Prepared {
    let prepared = match (watched.await, since) {
        (Err(e), _) => Prepared::Failed(BrokerError::Unavailable(e)),
        (Ok(()), None) => Prepared::Ready(History::default()),
        (Ok(()), Some(since)) => {
            match broker
                .messages
                .history(&room, Some(since), usize::MAX)
                .await
            {
                Ok(history) => Prepared::Ready(history),
                Err(e) => Prepared::Failed(e),
            }
        }
    };
    let _ = presence_recorded.await;
    prepared
}

impl Hub {
    /// The room's watch for one more join: a new room's first, the one in
    /// flight, or a fresh one when the last failed.
    fn room_watch(&mut self, room: &RoomName) -> Watched {
        let broker = self.broker.clone();
        let state = self.rooms.entry(room.clone()).or_insert_with(|| Room {
            members: Default::default(),
            watched: watch(&broker, room),
            watch_refs: 1,
        });
        if matches!(state.watched.peek(), Some(Err(_))) {
            state.watched = watch(&broker, room);
            state.watch_refs += 1;
        }
        state.watched.clone()
    }

    /// Finishes a join: ack, replay, buffered live frames, then live.
    fn complete_join(&mut self, join: &Join, join_seq: u64, prepared: Prepared) {
        let (key, room) = (join.key, &join.room);
        let pending = self
            .rooms
            .get_mut(room)
            .and_then(|r| r.members.get_mut(&key));
        let (Some(membership), Some(member)) = (pending, self.sessions.get(&key)) else {
            return; // Left (the session is gone) while the join was pending.
        };
        if !matches!(membership, Membership::Pending { join_seq: seq, .. } if *seq == join_seq) {
            return;
        }
        let mut history = match prepared {
            Prepared::Ready(history) => history,
            Prepared::Failed(e) => return self.refuse_join(join, e),
        };
        let last = history.messages.last().map(|m| m.id).or(join.since);
        let live = Membership::Live {
            floor: last,
            outbound: member.outbound.clone(),
        };
        // The replay goes through the member's queue and counts against its
        // byte bound: what does not fit is cut, oldest first, and the
        // client is told to reload (`recovered: false`).
        let room_bytes = member.outbound.room_bytes().saturating_sub(ACK_ROOM);
        let cut = fit_latest(&mut history.messages, room_bytes);
        if cut > 0 {
            tracing::debug!(room = %room, cut, "join replay over the outbound queue's bytes: cut");
        }
        let Membership::Pending { buffered, .. } = std::mem::replace(membership, live) else {
            return;
        };
        let recovered = join.since.map(|_| history.recovered && cut == 0);
        let ack = Ack::to(&join.reference)
            .room(room.as_str())
            .recovered(recovered);
        self.push(key, Outbound::Frame(ack.encode()));
        for entry in history.messages {
            self.push(key, Outbound::Frame(entry.frame));
        }
        for envelope in buffered.envelopes {
            if envelope.id.is_none() || envelope.id > last {
                self.push(key, Outbound::Delivery(envelope));
            }
        }
    }
}

/// Room kept in a member's queue for the join's ack.
const ACK_ROOM: usize = 256;

/// Keeps the latest entries whose frames fit in `bytes`; returns how many
/// older ones were cut.
fn fit_latest(entries: &mut Vec<crate::broker::HistoryEntry>, bytes: usize) -> usize {
    let mut total = 0;
    let keep = entries
        .iter()
        .rev()
        .take_while(|e| {
            total += e.frame.len();
            total <= bytes
        })
        .count();
    let cut = entries.len() - keep;
    entries.drain(..cut);
    cut
}

impl Hub {
    /// The join could not be prepared: no membership, the error to the client.
    fn refuse_join(&mut self, join: &Join, e: BrokerError) {
        tracing::warn!(room = %join.room, "join failed");
        self.remove_membership(join.key, &join.room);
        let frame = counted_error_frame(&ErrorReply::from(&e), &join.reference);
        self.push(join.key, Outbound::Frame(frame));
    }
}

impl Handler<Join> for Hub {
    type Result = ();

    fn handle(&mut self, msg: Join, ctx: &mut Self::Context) {
        if !self.sessions.contains_key(&msg.key) {
            return;
        }
        let watched = self.room_watch(&msg.room);
        let Some(state) = self.rooms.get_mut(&msg.room) else {
            return;
        };
        if let Some(Membership::Live { .. }) = state.members.get(&msg.key) {
            // Already a member: nothing was missed while connected.
            let recovered = msg.since.map(|_| true);
            let ack = Ack::to(&msg.reference)
                .room(msg.room.as_str())
                .recovered(recovered);
            self.push(msg.key, Outbound::Frame(ack.encode()));
            let _ = msg.done.send(());
            return;
        }
        self.next_join_seq += 1;
        let join_seq = self.next_join_seq;
        // A join while an earlier one is pending takes over its buffer.
        let buffered = match state.members.remove(&msg.key) {
            Some(Membership::Pending { buffered, .. }) => buffered,
            _ => Buffered::default(),
        };
        state
            .members
            .insert(msg.key, Membership::Pending { join_seq, buffered });
        if let Some(member) = self.sessions.get_mut(&msg.key) {
            member.rooms.insert(msg.room.clone());
        }
        let (recorded, presence_recorded) = oneshot::channel();
        let subscribed = watched.clone().map(|_| ()).boxed();
        self.record_presence(msg.key, true, &msg.room, Some(recorded), Some(subscribed));
        let (broker, room, since) = (self.broker.clone(), msg.room.clone(), msg.since);
        let work = prepare(broker, watched, room, since, presence_recorded);
        ctx.spawn(work.into_actor(self).map(move |prepared, hub, _| {
            let Join { done, .. } = {
                hub.complete_join(&msg, join_seq, prepared);
                msg
            };
            let _ = done.send(());
        }));
    }
}

#[cfg(test)]
mod tests;
