//! The Redis broker (`broker.kind = "redis"`): any number of instances
//! sharing one Redis — a standalone server, a Sentinel-managed primary or
//! a Redis Cluster (`redis.mode`) — behave, to every client, as one hub.
//!
//! It is built on the Redis layer ([`crate::redis`]: connections, keys,
//! scripts, pub/sub). The parts: [`messages`] (publishing, history; session
//! publishes pipelined by [`pipeline`]), [`presence`], [`registry`],
//! [`subscriber`] (subscriptions), [`maintenance`] (reaping dead instances,
//! reconciling this one's registry), [`watchdog`] (outage mode, heartbeat).
//!
//! **Every change that spans slots is a sequence of idempotent steps**,
//! each one script or command on one slot, ordered so that a sequence cut
//! short (a crash, a lost connection) is finished by the reaper or the next
//! reconcile: what an instance holds is recorded under its own tag first
//! and removed from there last.
//!
//! **Ids never lie.** A publish is acked with an id only when that is the
//! message's id in history; when Redis is away, or its outcome is unknown
//! (a time-out, a lost connection), the client gets `unavailable` and may
//! retry: with the same `idempotency_key`, a retry is never stored twice.
//! Nothing is delivered on the side while Redis is away.
//!
//! **A stall is not an outage.** Commands wait up to `redis.timeout_s`; the
//! instance is in outage mode (readiness 503, new connections refused with
//! 1013 `unavailable`, requests answered `unavailable` at once) only when
//! the watchdog's probe has failed for as long.

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

use self::registry::LocalRegistry;
use self::subscriber::RedisSubscriber;
use super::{BrokerResult, Lifecycle, StartError};
use crate::config::Config;
use crate::redis::keys::Keys;
use crate::redis::probe::Probe;
use crate::redis::Redis;

pub struct RedisBroker {
    redis: Arc<Redis>,
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
    /// Another instance took this one for dead and is dropping its
    /// connections: once it is done, everything is written again.
    being_reaped: AtomicBool,
    /// Tells this broker's publish pipelines apart from other brokers'.
    pipeline_key: u64,
    _arbiter: ArbiterHandle,
}

impl RedisBroker {
    /// Makes the pool, probes Redis once, starts the subscriber, the
    /// watchdog and the maintenance task. Must be called inside a running
    /// actix system. Fails only on bad settings: an unreachable Redis is an
    /// outage, retried in the background.
    pub async fn start(config: &Config, instance_id: &str) -> Result<Arc<RedisBroker>, StartError> {
        let redis = Arc::new(Redis::new(&config.redis).map_err(StartError::RedisPool)?);
        let keys = Keys::new(&config.redis.prefix);
        let arbiter = Arbiter::new().handle();
        let connected = Arc::new(AtomicBool::new(false));
        let local_rooms = Arc::new(AtomicUsize::new(0));
        let subscriber = {
            let (redis, keys) = (redis.clone(), keys.clone());
            let (connected, rooms) = (connected.clone(), local_rooms.clone());
            let history_size = config.history.size;
            RedisSubscriber::start_in_arbiter(&arbiter, move |_| {
                RedisSubscriber::new(redis, keys, connected, rooms, history_size)
            })
        };
        let broker = Arc::new(RedisBroker {
            redis: redis.clone(),
            keys,
            instance_id: instance_id.to_owned(),
            history_size: config.history.size,
            history_ttl_ms: config.history.ttl_s.saturating_mul(1000),
            instance_ttl_s: config.redis.instance_ttl_s,
            subscriber,
            subscriber_connected: connected,
            local_rooms,
            stopping: AtomicBool::new(false),
            local: Mutex::new(LocalRegistry::default()),
            dirty: AtomicBool::new(true),
            reconcile_wanted: tokio::sync::Notify::new(),
            being_reaped: AtomicBool::new(false),
            pipeline_key: pipeline::broker_key(),
            _arbiter: arbiter.clone(),
        });
        let mut probe = Probe::new(&config.redis);
        broker.first_probe(&mut probe).await;
        let (watched, maintained) = (broker.clone(), broker.clone());
        arbiter.spawn(async move { watched.watchdog(probe).await });
        arbiter.spawn(async move { maintained.maintain().await });
        Ok(broker)
    }

    /// The outage as an error, for calls refused without trying.
    fn unavailable(&self) -> super::BrokerError {
        super::BrokerError::Unavailable(self.redis.health.reason())
    }

    /// `Err(unavailable)` at once while in outage mode.
    fn check_available(&self) -> BrokerResult<()> {
        if self.redis.available() {
            Ok(())
        } else {
            Err(self.unavailable())
        }
    }
}

#[async_trait]
impl Lifecycle for RedisBroker {
    async fn ready(&self) -> Result<(), String> {
        // The reason stays in the log: Redis's error text is not for
        // whoever can reach the health endpoint.
        if !self.redis.available() {
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
