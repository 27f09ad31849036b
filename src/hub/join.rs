//! Joins and the replay/live seam.
//!
//! A joining member is first *pending*: live frames for the room are
//! buffered while the hub makes sure the broker will deliver the room here
//! (`watch_room`), reads the history after `since` and records presence.
//! Then it sends the ack, the replay, and the buffered live frames newer
//! than the last replayed id, and the member turns live. So nothing is lost
//! or doubled at the seam.

use std::sync::Arc;

use actix::prelude::*;

use super::{Hub, Join, Outbound};
use crate::broker::{Broker, BrokerError, Envelope, History};
use crate::protocol::{Ack, MessageId, RoomName};

/// A member's delivery state in one room.
pub(super) enum Membership {
    Live,
    /// Join in progress: live frames wait here until the ack and replay are out.
    Pending {
        join_seq: u64,
        buffered: Vec<Arc<Envelope>>,
    },
}

/// Who is joining: what the join needs of the session, kept in case the
/// session is gone by the time the join completes.
struct Joiner {
    user: Arc<str>,
    connection_id: Arc<str>,
}

/// Subscribed before history is read (nothing lost at the seam), and
/// presence recorded before the ack (a client sees itself present).
async fn prepare(
    broker: Broker,
    first_here: bool,
    room: RoomName,
    since: Option<MessageId>,
    joiner: &Joiner,
) -> Result<History, BrokerError> {
    let watched = if first_here {
        broker.subscriptions.watch_room(&room).await
    } else {
        Ok(())
    };
    let history = match (watched, since) {
        (Err(e), _) => Err(e),
        (Ok(()), Some(since)) => {
            broker
                .messages
                .history(&room, Some(since), usize::MAX)
                .await
        }
        (Ok(()), None) => Ok(History::default()),
    };
    let presence = broker
        .presence
        .join(&room, &joiner.user, &joiner.connection_id);
    if let Err(e) = presence.await {
        tracing::warn!(error = %e, room = %room, "presence join not recorded");
    }
    history
}

impl Hub {
    /// Finishes a join: ack, replay, buffered live frames, then live.
    fn complete_join(
        &mut self,
        join: &Join,
        join_seq: u64,
        history: Result<History, BrokerError>,
        joiner: Joiner,
    ) {
        let (key, room) = (join.key, &join.room);
        let still_pending = matches!(
            self.rooms.get(room).and_then(|m| m.get(&key)),
            Some(Membership::Pending { join_seq: seq, .. }) if *seq == join_seq
        );
        if !still_pending {
            // Left (or left and joined again) while this join was pending.
            let member_now = self.rooms.get(room).is_some_and(|m| m.contains_key(&key));
            if !member_now {
                self.record_presence_leave(room, joiner.user, joiner.connection_id);
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
        let recovered = join.since.map(|_| history.recovered);
        let ack = Ack::to(&join.reference)
            .room(room.as_str())
            .recovered(recovered);
        self.push(key, Outbound::Frame(ack.encode()));
        self.send_replay(key, join.since, history, buffered);
    }

    /// The replayed messages, then the live frames that arrived meanwhile,
    /// without those already replayed.
    fn send_replay(
        &self,
        key: u64,
        since: Option<MessageId>,
        history: History,
        buffered: Vec<Arc<Envelope>>,
    ) {
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
}

impl Handler<Join> for Hub {
    type Result = ();

    fn handle(&mut self, msg: Join, ctx: &mut Self::Context) {
        let Some(member) = self.sessions.get(&msg.key) else {
            return;
        };
        let joiner = Joiner {
            user: member.user.clone(),
            connection_id: member.connection_id.clone(),
        };
        let members = self.rooms.entry(msg.room.clone()).or_default();
        let first_here = members.is_empty();
        if let Some(Membership::Live) = members.get(&msg.key) {
            // Already a member: nothing was missed while connected.
            let recovered = msg.since.map(|_| true);
            let ack = Ack::to(&msg.reference)
                .room(msg.room.as_str())
                .recovered(recovered);
            self.push(msg.key, Outbound::Frame(ack.encode()));
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
        let (broker, room, since) = (self.broker.clone(), msg.room.clone(), msg.since);
        let work = async move {
            let history = prepare(broker, first_here, room, since, &joiner).await;
            (history, joiner)
        };
        ctx.spawn(work.into_actor(self).map(move |(history, joiner), hub, _| {
            hub.complete_join(&msg, join_seq, history, joiner);
        }));
    }
}

#[cfg(test)]
mod tests;
