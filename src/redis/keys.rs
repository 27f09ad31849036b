//! Every Redis key and channel name, in one place, laid out for Redis
//! Cluster and used the same way in every mode.
//!
//! The part of a name in braces is its *hash tag*: Redis Cluster places a
//! key by its tag alone, so keys with the same tag share a slot, and one
//! script may touch them together. Everything of a room shares the room's
//! tag, everything of a user the user's, everything of an instance the
//! instance's, and the task queue one tag of its own:
//!
//! | key (prefix `sb`) | kind | content |
//! |---|---|---|
//! | `sb:room:{R}` | channel | the room's messages and presence changes |
//! | `sb:history:{R}` | stream | the room's retained messages (field `b`: the message without its id; the stream id is the id) |
//! | `sb:members:{R}` | hash | connection → user: the room's member connections |
//! | `sb:presence:{R}` | hash | user → how many of its connections are members |
//! | `sb:pub:{R}:{key}` | string, short TTL | the id of a publish made with that key (a retry answers it) |
//! | `sb:user:{U}` | channel | frames for one user: direct messages, task updates, kicks |
//! | `sb:conns:{U}` | hash | connection → `{"instance","connected_at"}`: the user's connections (the per-user limit counts them) |
//! | `sb:instance:{I}` | string, TTL | an instance's heartbeat: `{"connections","users","rooms","at"}` |
//! | `sb:instance_conns:{I}` | hash | connection → user: the connections an instance holds |
//! | `sb:conn_rooms:{I}:{C}` | set | the rooms connection `C` (of instance `I`) is a member of |
//! | `sb:reaping:{I}` | string, TTL | set while a surviving instance drops dead instance `I`'s connections |
//! | `sb:instances` | set | the instances that heartbeat (the reaper's list; small) |
//! | `sb:broadcast` | channel | frames for everyone |
//! | `sb:{tasks}:…` | | the task queue ([`TaskKeys`]) |
//!
//! `R` is a room name (it has no braces); `U` a user id with `%`, `{` and
//! `}` written `%25`, `%7B` and `%7D`; `I` an instance id. So a room's
//! channel is `sb:room:{lobby}`, literally. In cluster mode the channels
//! are sharded (`SPUBLISH`, `SSUBSCRIBE`), placed by the same tags.

use crate::protocol::RoomName;

/// Key and channel names under `redis.prefix`.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

/// A user id as a hash tag: braces and `%` escaped, nothing else changed.
pub fn user_tag(user: &str) -> String {
    let mut tag = String::with_capacity(user.len() + 2);
    for c in user.chars() {
        match c {
            '%' => tag.push_str("%25"),
            '{' => tag.push_str("%7B"),
            '}' => tag.push_str("%7D"),
            c => tag.push(c),
        }
    }
    tag
}

/// The user id a tag stands for (the reverse of [`user_tag`]).
pub fn user_of_tag(tag: &str) -> Option<String> {
    let mut user = String::with_capacity(tag.len());
    let mut rest = tag;
    while let Some(i) = rest.find('%') {
        user.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 3)?;
        user.push(match code {
            "25" => '%',
            "7B" => '{',
            "7D" => '}',
            _ => return None,
        });
        rest = &rest[i + 3..];
    }
    user.push_str(rest);
    Some(user)
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

    /// `{prefix}:{kind}:{tag}`, the tag in braces.
    fn tagged(&self, kind: &str, tag: &str) -> String {
        format!("{}:{kind}:{{{tag}}}", self.prefix)
    }

    pub fn room_channel(&self, room: &RoomName) -> String {
        self.tagged("room", room.as_str())
    }

    pub fn history(&self, room: &RoomName) -> String {
        self.tagged("history", room.as_str())
    }

    pub fn members(&self, room: &RoomName) -> String {
        self.tagged("members", room.as_str())
    }

    pub fn presence(&self, room: &RoomName) -> String {
        self.tagged("presence", room.as_str())
    }

    /// The key recording a publish to `room` made with `key`.
    pub fn publish_key(&self, room: &RoomName, key: &str) -> String {
        format!("{}:{key}", self.tagged("pub", room.as_str()))
    }

    pub fn user_channel(&self, user: &str) -> String {
        self.tagged("user", &user_tag(user))
    }

    pub fn user_conns(&self, user: &str) -> String {
        self.tagged("conns", &user_tag(user))
    }

    pub fn instance(&self, instance: &str) -> String {
        self.tagged("instance", instance)
    }

    /// Held while a reaper drops `instance`'s connections.
    pub fn reaping(&self, instance: &str) -> String {
        self.tagged("reaping", instance)
    }

    pub fn instance_conns(&self, instance: &str) -> String {
        self.tagged("instance_conns", instance)
    }

    pub fn conn_rooms(&self, instance: &str, connection: &str) -> String {
        format!("{}:{connection}", self.tagged("conn_rooms", instance))
    }

    pub fn instances(&self) -> String {
        format!("{}:instances", self.prefix)
    }

    pub fn broadcast_channel(&self) -> String {
        format!("{}:broadcast", self.prefix)
    }

    /// What a channel is for, from its name.
    pub fn channel_target(&self, channel: &str) -> Option<ChannelOf> {
        let name = channel.strip_prefix(&self.prefix)?.strip_prefix(':')?;
        if name == "broadcast" {
            return Some(ChannelOf::Broadcast);
        }
        let (kind, tag) = name.split_once(":{")?;
        let tag = tag.strip_suffix('}')?;
        match kind {
            "room" => RoomName::parse(tag).ok().map(ChannelOf::Room),
            "user" => user_of_tag(tag).map(ChannelOf::User),
            _ => None,
        }
    }
}

/// Whom a channel's messages are for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelOf {
    Room(RoomName),
    User(String),
    Broadcast,
}

/// The task queue's keys: all under the hash tag `{tasks}` (one slot: the
/// queue is one stream anyway, and every task script touches a record, a
/// user's pending set and the stream together).
///
/// | key | kind | content |
/// |---|---|---|
/// | `sb:{tasks}:queue` | stream, group `workers` | one entry per task to run: `task_id`, `name`, `user`, `payload` (JSON) |
/// | `sb:{tasks}:task:{id}` | hash | the record: `task_id`, `name`, `user`, `status`, `attempts`, `progress`, `result` (JSON), `error`, `created_at`, `updated_at` (ms), `payload` (until the task ends) |
/// | `sb:{tasks}:pending:{user}` | sorted set | the user's tasks not ended (the cap): score `+inf` once enqueued, the deadline of a provisional submission before |
/// | `sb:{tasks}:idem:{n}:{user}:{key}` | string | the task an idempotency key named first (`n`: the user id's length in bytes, so users and keys cannot alias) |
/// | `sb:{tasks}:kept:{user}` | sorted set | the user's ended tasks' records: `{bytes}:{id}` → when it ended |
/// | `sb:{tasks}:kept_bytes:{user}` | string | their bytes in all |
/// | `sb:{tasks}:dead` | stream | failed tasks: `task_id`, `name`, `user`, `payload`, `error`, `attempts` |
///
/// (Only `{tasks}` is a hash tag here: the other braces are placeholders.)
#[derive(Debug, Clone)]
pub struct TaskKeys {
    /// `{prefix}:{tasks}`.
    base: String,
    keys: Keys,
}

/// The consumer group every task worker belongs to.
pub const TASK_GROUP: &str = "workers";

impl TaskKeys {
    pub fn new(prefix: &str) -> TaskKeys {
        TaskKeys {
            base: format!("{prefix}:{{tasks}}"),
            keys: Keys::new(prefix),
        }
    }

    pub fn queue(&self) -> String {
        format!("{}:queue", self.base)
    }

    pub fn dead(&self) -> String {
        format!("{}:dead", self.base)
    }

    pub fn record(&self, task_id: &str) -> String {
        format!("{}:task:{task_id}", self.base)
    }

    pub fn pending(&self, user: &str) -> String {
        format!("{}:pending:{user}", self.base)
    }

    /// The user id goes in with its length: user `a` with key `b:c` and
    /// user `a:b` with key `c` are two keys.
    pub fn idempotency(&self, user: &str, key: &str) -> String {
        format!("{}:idem:{}:{user}:{key}", self.base, user.len())
    }

    pub fn kept(&self, user: &str) -> String {
        format!("{}:kept:{user}", self.base)
    }

    pub fn kept_bytes(&self, user: &str) -> String {
        format!("{}:kept_bytes:{user}", self.base)
    }

    /// Where a user's task updates go (the user's channel).
    pub fn user_channel(&self, user: &str) -> String {
        self.keys.user_channel(user)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_their_hash_tags() {
        let keys = Keys::new("sb");
        let room = RoomName::parse("lobby").unwrap();
        assert_eq!(keys.room_channel(&room), "sb:room:{lobby}");
        assert_eq!(keys.history(&room), "sb:history:{lobby}");
        assert_eq!(keys.user_channel("a{b}%"), "sb:user:{a%7Bb%7D%25}");
        assert_eq!(keys.conn_rooms("hub-1", "c9"), "sb:conn_rooms:{hub-1}:c9");
        let tasks = TaskKeys::new("sb");
        assert_eq!(tasks.queue(), "sb:{tasks}:queue");
        assert_eq!(tasks.record("t1"), "sb:{tasks}:task:t1");
    }

    #[test]
    fn channels_name_their_targets() {
        let keys = Keys::new("sb");
        let room = RoomName::parse("lobby").unwrap();
        let of = |c: &str| keys.channel_target(c);
        assert_eq!(of(&keys.room_channel(&room)), Some(ChannelOf::Room(room)));
        let user = "we{ir}d%user";
        assert_eq!(
            of(&keys.user_channel(user)),
            Some(ChannelOf::User(user.to_owned()))
        );
        assert_eq!(of("sb:broadcast"), Some(ChannelOf::Broadcast));
        assert_eq!(of("sb:room:lobby"), None);
        assert_eq!(of("other:room:{lobby}"), None);
    }

    #[test]
    fn users_and_idempotency_keys_cannot_alias() {
        let keys = TaskKeys::new("sb");
        assert_ne!(keys.idempotency("a", "b:c"), keys.idempotency("a:b", "c"));
    }
}
