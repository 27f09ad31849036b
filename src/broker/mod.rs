//! The broker: what one hub instance needs from the world outside its own
//! worker threads — ids, history, presence, the connection registry and the
//! fan-out of every publish to every hub that has a recipient for it.
//!
//! Two implementations sit behind [`Broker`]: [`memory::MemoryBroker`] (one
//! instance, nothing to install) and the Redis broker (cluster mode). Hubs
//! attach themselves with [`Broker::attach_hub`] and from then on receive
//! [`Fanout`] messages: one `Arc`'d, already-serialized [`Envelope`] per
//! publish per hub, never one per recipient.

pub mod memory;
pub mod redis;

use std::sync::Arc;

use actix::{Message, Recipient};
use async_trait::async_trait;
use bytestring::ByteString;
use serde_json::Value;

use crate::protocol::{MessageId, PresenceEntry, RoomName};

/// Who an envelope is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every member of the room.
    Room(RoomName),
    /// Every connection of the user.
    User(String),
    /// Every connection.
    All,
    /// Close every connection of the user with 1008 `kicked`; never a frame.
    Kick(String),
}

/// One publish, serialized once, shared by every recipient on every hub.
#[derive(Debug)]
pub struct Envelope {
    pub target: Target,
    /// The complete server frame, ready for the socket.
    pub frame: ByteString,
    /// The room message id, for the replay/live seam; `None` for frames
    /// that are not history (joined/left, and messages published straight
    /// into Redis without an id).
    pub id: Option<MessageId>,
    /// Microseconds since the epoch when it was published, for the delivery
    /// metrics; 0 for frames that are not messages (joined/left, kicks),
    /// which those metrics skip.
    pub published_us: u64,
}

/// Broker → hub: deliver this envelope to your local recipients.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct Fanout(pub Arc<Envelope>);

/// A connection as the registry knows it.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub connection_id: String,
    pub user: String,
    pub connected_at_ms: u64,
}

/// One retained room message: its id and its complete `message` frame.
#[derive(Debug, Clone)]
pub struct HistoryEntry {
    pub id: MessageId,
    pub frame: ByteString,
}

/// What a room's history holds after a given id.
#[derive(Debug, Default)]
pub struct History {
    /// Oldest first.
    pub messages: Vec<HistoryEntry>,
    /// False when messages after `since` may no longer be retained.
    pub recovered: bool,
}

/// Instance-wide numbers for `/api/stats`.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct BrokerStats {
    /// Rooms with at least one member.
    pub rooms: u64,
    /// Distinct users connected.
    pub users: u64,
    /// Connections in the registry.
    pub connections: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The user already holds `max_connections_per_user` connections.
    #[error("connection limit reached")]
    ConnectionLimit,
    /// The broker's backend cannot be reached (cluster mode).
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    #[error("broker internal error: {0}")]
    Internal(String),
}

pub type BrokerResult<T> = Result<T, BrokerError>;

/// What a hub instance asks of its broker. Every method may be called from
/// any worker thread.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// `"memory"` or `"redis"`.
    fn kind(&self) -> &'static str;

    /// A hub (one per worker thread) asks to receive every fan-out.
    fn attach_hub(&self, hub: Recipient<Fanout>);

    /// Adds a connection to the registry unless its user already holds
    /// `max_per_user` connections (checked atomically, cluster-wide).
    async fn register_connection(
        &self,
        conn: &ConnectionInfo,
        max_per_user: usize,
    ) -> BrokerResult<()>;
    async fn unregister_connection(&self, connection_id: &str, user: &str);

    /// Called by a hub before it relies on receiving a room's fan-out (a
    /// no-op in memory mode; a Redis SUBSCRIBE, confirmed, in cluster mode).
    async fn watch_room(&self, _room: &RoomName) -> BrokerResult<()> {
        Ok(())
    }
    /// The hub's last local member of the room left.
    fn unwatch_room(&self, _room: &RoomName) {}
    /// Same for a user's direct messages.
    async fn watch_user(&self, _user: &str) -> BrokerResult<()> {
        Ok(())
    }
    fn unwatch_user(&self, _user: &str) {}

    /// Appends to the room's history and fans out, atomically, so that id
    /// order and delivery order agree. Returns the new id.
    async fn publish_room(
        &self,
        room: &RoomName,
        from: &str,
        data: &Value,
    ) -> BrokerResult<MessageId>;
    /// A `direct` frame to every connection of `user`. Returns its id.
    async fn publish_user(&self, user: &str, from: &str, data: &Value) -> BrokerResult<String>;
    /// A `broadcast` frame to every connection. Returns its id.
    async fn broadcast(&self, data: &Value) -> BrokerResult<String>;

    /// The retained messages after `since` (all when `None`), oldest first,
    /// at most `limit`, the latest ones when more are retained.
    async fn history(
        &self,
        room: &RoomName,
        since: Option<MessageId>,
        limit: usize,
    ) -> BrokerResult<History>;

    /// A connection became a member of the room; emits `joined` to the room
    /// when it is the user's first connection in it.
    async fn presence_join(
        &self,
        room: &RoomName,
        user: &str,
        connection_id: &str,
    ) -> BrokerResult<()>;
    /// The reverse; emits `left` when it was the user's last connection.
    async fn presence_leave(
        &self,
        room: &RoomName,
        user: &str,
        connection_id: &str,
    ) -> BrokerResult<()>;
    async fn presence(&self, room: &RoomName) -> BrokerResult<Vec<PresenceEntry>>;

    /// How many connections the user holds, on all instances.
    async fn user_connections(&self, user: &str) -> BrokerResult<u64>;
    /// Closes every connection of the user (1008 `kicked`) everywhere;
    /// returns how many there were.
    async fn disconnect_user(&self, user: &str) -> BrokerResult<u64>;

    async fn stats(&self) -> BrokerResult<BrokerStats>;
    /// The instance is stopping: remove what it registered (its connections,
    /// their presence, its heartbeat) instead of waiting to be reaped.
    async fn shutdown(&self) {}
    /// `Ok` when the broker can do its job; else the reason.
    async fn ready(&self) -> Result<(), String>;
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}
