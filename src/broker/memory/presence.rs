//! Presence in memory: room → user → the user's member connections. Sets,
//! so a repeated join or leave of one connection changes nothing.

use std::collections::{BTreeMap, HashMap, HashSet};

use async_trait::async_trait;

use super::{BrokerActor, MemoryBroker};
use crate::broker::fanout::Envelope;
use crate::broker::{BrokerResult, Presence};
use crate::protocol::{PresenceEntry, RoomName};

#[derive(Default)]
pub(super) struct PresenceTable {
    rooms: HashMap<RoomName, BTreeMap<String, HashSet<String>>>,
}

impl PresenceTable {
    /// Records the change; true when it was the user's first connection in
    /// the room (join) or its last (leave).
    fn change(&mut self, room: &RoomName, user: &str, connection: &str, joined: bool) -> bool {
        let members = self.rooms.entry(room.clone()).or_default();
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
            self.rooms.remove(room);
            crate::trim::shrink_map(&mut self.rooms);
        }
        first_or_last
    }

    fn list(&self, room: &RoomName) -> Vec<PresenceEntry> {
        self.rooms
            .get(room)
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
    }

    /// Rooms with at least one member.
    pub(super) fn rooms(&self) -> usize {
        self.rooms.len()
    }
}

impl BrokerActor {
    fn presence_change(&mut self, room: &RoomName, user: &str, connection: &str, joined: bool) {
        if self.presence.change(room, user, connection, joined) {
            self.hubs
                .send(Envelope::presence_change(room.clone(), joined, user));
        }
    }
}

#[async_trait]
impl Presence for MemoryBroker {
    async fn join(&self, room: &RoomName, user: &str, connection_id: &str) -> BrokerResult<()> {
        let (room, user, conn) = (room.clone(), user.to_owned(), connection_id.to_owned());
        self.call(move |b| b.presence_change(&room, &user, &conn, true))
            .await
    }

    async fn leave(&self, room: &RoomName, user: &str, connection_id: &str) -> BrokerResult<()> {
        let (room, user, conn) = (room.clone(), user.to_owned(), connection_id.to_owned());
        self.call(move |b| b.presence_change(&room, &user, &conn, false))
            .await
    }

    async fn list(&self, room: &RoomName) -> BrokerResult<Vec<PresenceEntry>> {
        let room = room.clone();
        self.call(move |b| b.presence.list(&room)).await
    }
}
