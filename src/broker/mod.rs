//! The broker: what one hub instance needs from the world outside its own
//! worker threads, in five parts, each a trait with a memory and a Redis
//! implementation in files named after it:
//!
//! | part | trait | memory | redis |
//! |---|---|---|---|
//! | publishing and history | [`Messages`] | `memory/messages.rs` | `redis/messages.rs` |
//! | presence | [`Presence`] | `memory/presence.rs` | `redis/presence.rs` |
//! | connection registry and limits | [`Registry`] | `memory/registry.rs` | `redis/registry.rs` |
//! | subscriptions (fan-out to hubs) | [`Subscriptions`] | `memory/mod.rs` | `redis/subscriber.rs` |
//! | readiness and shutdown | [`Lifecycle`] | `memory/mod.rs` | `redis/mod.rs` |
//!
//! [`Broker`] holds one handle per part. Hubs attach themselves with
//! [`Subscriptions::attach_hub`] and from then on receive [`Fanout`]
//! messages: one `Arc`'d, already-serialized [`Envelope`] per publish per
//! hub, never one per recipient ([`fanout`], shared by both brokers).

pub mod fanout;
pub mod memory;
pub mod redis;

use std::sync::Arc;

use actix::Recipient;
use async_trait::async_trait;
use bytestring::ByteString;
use futures_util::future::BoxFuture;
use serde_json::Value;

pub use self::fanout::{Envelope, Fanout, Target};
use crate::config::{BrokerKind, Config};
use crate::protocol::{ErrorCode, ErrorReply, MessageId, PresenceEntry, RoomName};

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
    /// Rooms with at least one member on this instance.
    pub local_rooms: u64,
    /// Live instances.
    pub instances: u64,
}

#[derive(Debug, Clone, thiserror::Error)]
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

/// The one way a broker failure reaches a client or an API caller: what it
/// may know (a limit, "retry"), with the details in the log only.
impl From<&BrokerError> for ErrorReply {
    fn from(e: &BrokerError) -> ErrorReply {
        match e {
            BrokerError::ConnectionLimit => {
                ErrorReply::new(ErrorCode::LimitExceeded, "connection limit reached")
            }
            BrokerError::Unavailable(detail) => {
                tracing::warn!(error = %detail, "request failed: broker unavailable");
                ErrorReply::unavailable("broker")
            }
            BrokerError::Internal(detail) => {
                tracing::error!(error = %detail, "request failed: broker error");
                ErrorReply::internal()
            }
        }
    }
}

/// Why a broker could not be started (bad settings; an unreachable Redis is
/// not one: it is an outage, retried in the background).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("redis pool: {0}")]
    RedisPool(String),
}

/// A session's publish, started with [`Messages::start_publish`].
pub enum Publish {
    /// `publish`: to the members of `room`; with the client's
    /// `idempotency_key`, stored once however often it is sent.
    Room {
        room: RoomName,
        from: Arc<str>,
        data: Value,
        key: Option<String>,
    },
    /// `direct`: to every connection of `to`.
    User {
        to: String,
        from: Arc<str>,
        data: Value,
    },
}

/// How long a publish made with an idempotency key answers its first id
/// (a client's retry comes within it).
pub const PUBLISH_KEY_TTL_MS: u64 = 120_000;

/// A client's idempotency key for a publish, scoped to its user (the user's
/// length first, so users and keys cannot alias).
pub fn publish_key(user: &str, key: &str) -> String {
    format!("c:{}:{user}:{key}", user.len())
}

/// Called once a started publish has its id (or failed).
pub type PublishDone = Box<dyn FnOnce(BrokerResult<String>) + Send>;

/// Publishing and history. Every publish is serialized once and fanned out
/// to every hub with a recipient for it.
#[async_trait]
pub trait Messages: Send + Sync {
    /// Starts a session's publish without waiting for it. Publishes started
    /// on one thread reach the broker in the order they were started, and
    /// their `done` is called in that order, so a session can have many in
    /// flight (pipelined) and still ack them in order. The caller bounds
    /// how many it has in flight. Call it on a worker thread (it may spawn
    /// a local task).
    fn start_publish(self: Arc<Self>, publish: Publish, done: PublishDone);
    /// Appends to the room's history and fans out, atomically, so that id
    /// order and delivery order agree. Returns the new id. With `key` (an
    /// idempotency key of `from`'s), a publish made already answers its id
    /// and is not stored again.
    async fn publish_room(
        &self,
        room: &RoomName,
        from: &str,
        data: &Value,
        key: Option<&str>,
    ) -> BrokerResult<MessageId>;
    /// A `direct` frame to every connection of `user`. Returns its id.
    async fn publish_user(&self, user: &str, from: &str, data: &Value) -> BrokerResult<String>;
    /// A `broadcast` frame to every connection. Returns its id.
    async fn broadcast(&self, data: &Value) -> BrokerResult<String>;
    /// A complete server frame (a task update) to every connection of `user`.
    async fn send_frame(&self, user: &str, frame: ByteString) -> BrokerResult<()>;
    /// The retained messages after `since` (all when `None`), oldest first,
    /// at most `limit`, the latest ones when more are retained.
    async fn history(
        &self,
        room: &RoomName,
        since: Option<MessageId>,
        limit: usize,
    ) -> BrokerResult<History>;
}

/// Who is in which room, cluster-wide.
#[async_trait]
pub trait Presence: Send + Sync {
    /// A connection became a member of the room; emits `joined` to the room
    /// when it is the user's first connection in it. Idempotent.
    async fn join(&self, room: &RoomName, user: &str, connection_id: &str) -> BrokerResult<()>;
    /// The reverse; emits `left` when it was the user's last connection.
    async fn leave(&self, room: &RoomName, user: &str, connection_id: &str) -> BrokerResult<()>;
    /// Each user in the room with the number of its member connections.
    async fn list(&self, room: &RoomName) -> BrokerResult<Vec<PresenceEntry>>;
}

/// The connection registry and the limits it enforces.
#[async_trait]
pub trait Registry: Send + Sync {
    /// Adds a connection unless its user already holds `max_per_user`
    /// connections (checked atomically, cluster-wide).
    async fn register(&self, conn: &ConnectionInfo, max_per_user: usize) -> BrokerResult<()>;
    /// Removes it (and what presence it still had).
    async fn unregister(&self, connection_id: &str, user: &str);
    /// How many connections the user holds, on all instances.
    async fn user_connections(&self, user: &str) -> BrokerResult<u64>;
    /// Closes every connection of the user (1008 `kicked`) everywhere;
    /// returns how many there were.
    async fn disconnect_user(&self, user: &str) -> BrokerResult<u64>;
    async fn stats(&self) -> BrokerResult<BrokerStats>;
}

/// Which fan-out reaches this instance's hubs.
///
/// `watch_*` take a reference at once, when called (so a watch and an
/// unwatch issued in that order are counted in that order), and return a
/// future that resolves once deliveries are guaranteed.
pub trait Subscriptions: Send + Sync {
    /// A hub (one per worker thread) asks to receive every fan-out.
    fn attach_hub(&self, hub: Recipient<Fanout>);
    /// Called by a hub before it relies on receiving a room's fan-out (a
    /// no-op in memory mode; a Redis SUBSCRIBE, confirmed, in cluster mode).
    fn watch_room(&self, room: &RoomName) -> BoxFuture<'static, BrokerResult<()>>;
    /// Gives back one reference taken by `watch_room`.
    fn unwatch_room(&self, room: &RoomName);
    /// Same for a user's direct messages.
    fn watch_user(&self, user: &str) -> BoxFuture<'static, BrokerResult<()>>;
    fn unwatch_user(&self, user: &str);
}

/// Readiness and shutdown.
#[async_trait]
pub trait Lifecycle: Send + Sync {
    /// `Ok` when the broker can do its job; else the reason.
    async fn ready(&self) -> Result<(), String>;
    /// The instance is stopping: remove what it registered (its connections,
    /// their presence, its heartbeat) instead of waiting to be reaped.
    async fn shutdown(&self);
}

/// Every part a broker implements.
pub trait BrokerParts:
    Messages + Presence + Registry + Subscriptions + Lifecycle + 'static
{
}
impl<T: Messages + Presence + Registry + Subscriptions + Lifecycle + 'static> BrokerParts for T {}

/// The broker of one instance: one handle per part. Cheap to clone; every
/// part may be used from any worker thread.
#[derive(Clone)]
pub struct Broker {
    /// `"memory"` or `"redis"`.
    pub kind: &'static str,
    pub messages: Arc<dyn Messages>,
    pub presence: Arc<dyn Presence>,
    pub registry: Arc<dyn Registry>,
    pub subscriptions: Arc<dyn Subscriptions>,
    pub lifecycle: Arc<dyn Lifecycle>,
}

impl Broker {
    /// A broker whose every part is `parts`.
    pub fn from_parts<B: BrokerParts>(kind: &'static str, parts: Arc<B>) -> Broker {
        Broker {
            kind,
            messages: parts.clone(),
            presence: parts.clone(),
            registry: parts.clone(),
            subscriptions: parts.clone(),
            lifecycle: parts,
        }
    }

    /// Starts the configured broker. Must be called inside a running actix
    /// system.
    pub async fn start(config: &Config, instance_id: &str) -> Result<Broker, StartError> {
        Ok(match config.broker.kind {
            BrokerKind::Memory => Broker::from_parts("memory", memory::MemoryBroker::start(config)),
            BrokerKind::Redis => {
                let redis = redis::RedisBroker::start(config, instance_id).await?;
                Broker::from_parts("redis", redis)
            }
        })
    }
}
