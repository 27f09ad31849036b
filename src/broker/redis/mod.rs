//! The Redis broker (cluster mode): any number of instances sharing one
//! Redis behave, to every client, as one hub.
//!
//! Commands go through a deadpool-redis pool ([`commands`]); the pub/sub
//! connection belongs to the [`subscriber::RedisSubscriber`] actor. Keys
//! ([`keys`]; prefix `sb` by default; docs/protocol.md §10; keys only
//! the hub itself uses marked *):
//!
//! | key | kind | content |
//! |---|---|---|
//! | `sb:room:{room}` / `sb:user:{user}` / `sb:broadcast` | channels | see docs/protocol.md §10 ([`payload`]) |
//! | `sb:history:{room}` | stream | field `b`: the message without its id (the stream id is the id) |
//! | `sb:connections` | hash | connection id → `{"user","instance","connected_at"}` |
//! | `sb:user_connections` * | hash | user → connections, cluster-wide (the per-user limit) |
//! | `sb:conn_rooms:{id}` * | set | rooms a connection is a member of (for cleanup) |
//! | `sb:instance:{id}` | string, expires after ⅔ of `redis.instance_ttl_s` | heartbeat |
//! | `sb:instances` * | set | ids of instances that have heartbeated (for the reaper) |
//! | `sb:presence:{room}` | hash | user → connections in the room |
//!
//! Every multi-key change is one Lua script (`scripts/*.lua`), so the
//! registry, presence and per-user counts never disagree. The parts:
//! [`messages`] (publishing, history), [`presence`], [`registry`],
//! [`subscriber`] (subscriptions), [`maintenance`] (heartbeat, reaping dead
//! instances, restoring this one's registry after an outage).
//!
//! Whether Redis is away is the [`watchdog`]'s call, from a probe on its
//! own connection; a failed command is only that request's failure.
//! While Redis is away: sessions stay open; room, direct and broadcast
//! messages reach members on this instance through the subscriber
//! ([`subscriber::LocalPublish`]); new connections are refused with 1013
//! `unavailable`; `/health/ready` answers 503.

pub mod commands;
pub mod keys;
mod maintenance;
mod messages;
pub mod payload;
mod pipeline;
mod presence;
mod registry;
pub mod subscriber;
mod watchdog;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use actix::prelude::*;
use async_trait::async_trait;

use self::commands::Commands;
use self::keys::Keys;
use self::registry::LocalRegistry;
use self::subscriber::RedisSubscriber;
use self::watchdog::Probe;
use super::{BrokerResult, Lifecycle, StartError};
use crate::config::Config;

pub struct RedisBroker {
    cmd: Arc<Commands>,
    keys: Keys,
    instance_id: String,
    history_size: usize,
    history_ttl_ms: u64,
    instance_ttl_s: u64,
    subscriber: Addr<RedisSubscriber>,
    subscriber_connected: Arc<AtomicBool>,
    /// Rooms with members on this instance (the subscriber's room channels).
    local_rooms: Arc<AtomicUsize>,
    /// Set by `shutdown`: the watchdog and the maintenance task stop.
    stopping: AtomicBool,
    /// This instance's own connections and rooms: what reconciles restore.
    local: Mutex<LocalRegistry>,
    /// A reconcile is due (after an outage or a failed clean-up).
    dirty: AtomicBool,
    reconcile_wanted: tokio::sync::Notify,
    /// Tells this broker's publish pipelines apart from other brokers'.
    pipeline_key: u64,
    _arbiter: ArbiterHandle,
}

impl RedisBroker {
    /// Connects the pool, probes Redis once, starts the subscriber, the
    /// watchdog and the maintenance task. Must be called inside a running
    /// actix system. Fails only on bad settings: an unreachable Redis is an
    /// outage, retried in the background.
    pub async fn start(config: &Config, instance_id: &str) -> Result<Arc<RedisBroker>, StartError> {
        let redis = &config.redis;
        let client = redis::Client::open(redis.url.as_str()).map_err(StartError::RedisUrl)?;
        let cmd = Arc::new(Commands::new(redis)?);
        let keys = Keys::new(&redis.prefix);
        let arbiter = Arbiter::new().handle();
        let connected = Arc::new(AtomicBool::new(false));
        let local_rooms = Arc::new(AtomicUsize::new(0));
        let subscriber = {
            let (client, keys, cmd) = (client.clone(), keys.clone(), cmd.clone());
            let (connected, rooms) = (connected.clone(), local_rooms.clone());
            let history_size = config.history.size;
            RedisSubscriber::start_in_arbiter(&arbiter, move |_| {
                RedisSubscriber::new(client, keys, cmd, connected, rooms, history_size)
            })
        };
        let broker = Arc::new(RedisBroker {
            cmd,
            keys,
            instance_id: instance_id.to_owned(),
            history_size: config.history.size,
            history_ttl_ms: config.history.ttl_s.saturating_mul(1000),
            instance_ttl_s: redis.instance_ttl_s,
            subscriber,
            subscriber_connected: connected,
            local_rooms,
            stopping: AtomicBool::new(false),
            local: Mutex::new(LocalRegistry::default()),
            dirty: AtomicBool::new(true),
            reconcile_wanted: tokio::sync::Notify::new(),
            pipeline_key: pipeline::broker_key(),
            _arbiter: arbiter.clone(),
        });
        let mut probe = Probe::new(client);
        broker.first_probe(&mut probe).await;
        let (watched, maintained) = (broker.clone(), broker.clone());
        arbiter.spawn(async move { watched.watchdog(probe).await });
        arbiter.spawn(async move { maintained.maintain().await });
        Ok(broker)
    }

    /// The outage as an error, for calls refused without trying.
    fn unavailable(&self) -> super::BrokerError {
        super::BrokerError::Unavailable(self.cmd.health.reason())
    }
}

#[async_trait]
impl Lifecycle for RedisBroker {
    async fn ready(&self) -> Result<(), String> {
        // The reason stays in the log: Redis's error text is not for
        // whoever can reach the health endpoint.
        if !self.cmd.available() {
            return Err("redis unreachable".into());
        }
        if !self.subscriber_connected.load(Ordering::Acquire) {
            return Err("redis pub/sub connection is down".into());
        }
        Ok(())
    }

    async fn shutdown(&self) {
        self.stopping.store(true, Ordering::Release);
        if self.deregister_all().await.is_err() {
            return;
        }
        let result: BrokerResult<()> = self.remove_heartbeat().await;
        if result.is_ok() {
            tracing::info!("deregistered from redis");
        }
    }
}
