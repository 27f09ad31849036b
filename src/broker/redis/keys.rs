//! Every Redis key and channel name, in one place (the layout of
//! docs/protocol.md §10, also listed in [`super`]).

use crate::protocol::RoomName;

/// Key and channel names under `redis.prefix`.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_owned(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut key = self.prefix.clone();
        for part in parts {
            key.push(':');
            key.push_str(part);
        }
        key
    }

    /// `{prefix}:room:{room}`: the room's pub/sub channel.
    pub fn room_channel(&self, room: &RoomName) -> String {
        self.key(&["room", room.as_str()])
    }

    /// The room of a room channel name.
    pub fn room_of_channel(&self, channel: &str) -> Option<RoomName> {
        let name = channel.strip_prefix(&self.prefix)?.strip_prefix(":room:")?;
        RoomName::parse(name).ok()
    }

    /// `{prefix}:user:{user}`: the user's pub/sub channel.
    pub fn user_channel(&self, user: &str) -> String {
        self.key(&["user", user])
    }

    /// `{prefix}:broadcast`.
    pub fn broadcast_channel(&self) -> String {
        self.key(&["broadcast"])
    }

    /// `{prefix}:history:{room}`: the room's stream.
    pub fn history(&self, room: &RoomName) -> String {
        self.key(&["history", room.as_str()])
    }

    /// `{prefix}:presence:{room}`: user → member connections.
    pub fn presence(&self, room: &RoomName) -> String {
        self.key(&["presence", room.as_str()])
    }

    /// `{prefix}:rooms`: the rooms with at least one member, cluster-wide.
    pub fn rooms(&self) -> String {
        self.key(&["rooms"])
    }

    /// `{prefix}:connections`: connection id → registry entry.
    pub fn connections(&self) -> String {
        self.key(&["connections"])
    }

    /// `{prefix}:user_connections`: user → connections, cluster-wide.
    pub fn user_connections(&self) -> String {
        self.key(&["user_connections"])
    }

    /// `{prefix}:conn_rooms:{id}`: the rooms a connection is a member of.
    pub fn conn_rooms(&self, connection_id: &str) -> String {
        self.key(&["conn_rooms", connection_id])
    }

    /// `{prefix}:instance:{id}`: an instance's heartbeat.
    pub fn instance(&self, instance_id: &str) -> String {
        self.key(&["instance", instance_id])
    }

    /// `{prefix}:instance_conns:{id}`: the connections an instance registered.
    pub fn instance_conns(&self, instance_id: &str) -> String {
        self.key(&["instance_conns", instance_id])
    }

    /// `{prefix}:instances`: every instance that has heartbeated.
    pub fn instances(&self) -> String {
        self.key(&["instances"])
    }
}
