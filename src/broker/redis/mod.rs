//! The Redis broker (cluster mode): any number of instances sharing one
//! Redis behave, to every client, as one hub.
//!
//! Commands go through a deadpool-redis pool; the pub/sub connection belongs
//! to the [`subscriber::RedisSubscriber`] actor. Keys (prefix `sb` by
//! default; contract section 4, plus two helper keys marked *):
//!
//! | key | kind | content |
//! |---|---|---|
//! | `sb:room:{room}` / `sb:user:{user}` / `sb:broadcast` | channels | see the contract |
//! | `sb:history:{room}` | stream | field `b`: the message without its id (the stream id is the id) |
//! | `sb:connections` | hash | connection id → `{"user","instance","connected_at"}` |
//! | `sb:user_connections` * | hash | user → connections, cluster-wide (the per-user limit) |
//! | `sb:conn_rooms:{id}` * | set | rooms a connection is a member of (for cleanup) |
//! | `sb:instance:{id}` | string, expires after ⅔ of `redis.instance_ttl_s` | heartbeat |
//! | `sb:instances` * | set | ids of instances that have heartbeated (for the reaper) |
//! | `sb:presence:{room}` | hash | user → connections in the room |
//!
//! Every multi-key change is one Lua script (`scripts/*.lua`), so the
//! registry, presence and per-user counts never disagree. A maintenance task
//! refreshes the heartbeat, reaps the connections of instances whose
//! heartbeat expired, and, after an outage, re-registers this instance's
//! connections and presence.
//!
//! While Redis is away: sessions stay open; room, direct and broadcast
//! messages reach members on this instance through the subscriber
//! ([`subscriber::LocalPublish`]); new connections are refused with 1013
//! `unavailable`; `/health/ready` answers 503.

pub mod subscriber;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use async_trait::async_trait;
use deadpool_redis::{Pool, Runtime};
use redis::{AsyncCommands, Script};
use serde_json::value::to_raw_value;
use serde_json::Value;
use tokio::sync::oneshot;

use self::subscriber::{AttachHub, LocalPublish, RedisSubscriber, Unwatch, Watch};
use super::{
    Broker, BrokerError, BrokerResult, BrokerStats, ConnectionInfo, Fanout, History, HistoryEntry,
};
use crate::config::Config;
use crate::metrics::metrics;
use crate::protocol::{
    direct_frame, now_ms, presence_change_frame, MessageId, PresenceEntry, RoomName,
};

/// Every Redis command gives up after this long (and counts as an outage).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Backoff between attempts to reach Redis again after a failure.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

struct Scripts {
    publish_room: Script,
    register: Script,
    presence_join: Script,
    presence_leave: Script,
    drop_connection: Script,
}

/// This instance's own connections, kept so they can be re-registered when
/// Redis comes back empty. Touched on connect, disconnect, join and leave.
#[derive(Default)]
struct LocalRegistry {
    connections: HashMap<String, (String, String)>,
    rooms: HashMap<String, HashSet<RoomName>>,
}

pub struct RedisBroker {
    pool: Pool,
    prefix: String,
    instance_id: String,
    history_size: usize,
    history_ttl_ms: u64,
    instance_ttl_s: u64,
    subscriber: Addr<RedisSubscriber>,
    subscriber_connected: Arc<AtomicBool>,
    /// False from a failed command until the maintenance task reaches Redis again.
    commands_ok: AtomicBool,
    /// Set by `shutdown`: the maintenance task stops heartbeating.
    stopping: AtomicBool,
    last_error: Mutex<String>,
    local: Mutex<LocalRegistry>,
    scripts: Scripts,
    _arbiter: ArbiterHandle,
}

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

impl RedisBroker {
    /// Connects the pool, starts the subscriber and the maintenance task.
    /// Must be called inside a running actix system. Fails only on a bad URL:
    /// an unreachable Redis is an outage, retried in the background.
    pub fn start(config: &Config, instance_id: &str) -> Result<Arc<RedisBroker>, String> {
        let redis = &config.redis;
        let client =
            redis::Client::open(redis.url.as_str()).map_err(|e| format!("redis.url: {e}"))?;
        let mut pool_cfg = deadpool_redis::Config::from_url(redis.url.clone());
        pool_cfg.pool = Some(deadpool_redis::PoolConfig {
            max_size: redis.pool_size,
            timeouts: deadpool_redis::Timeouts {
                wait: Some(COMMAND_TIMEOUT),
                create: Some(COMMAND_TIMEOUT),
                recycle: Some(COMMAND_TIMEOUT),
            },
            ..Default::default()
        });
        let pool = pool_cfg
            .create_pool(Some(Runtime::Tokio1))
            .map_err(|e| format!("redis pool: {e}"))?;
        let arbiter = Arbiter::new().handle();
        let connected = Arc::new(AtomicBool::new(false));
        let (sub_client, prefix, sub_connected) =
            (client.clone(), redis.prefix.clone(), connected.clone());
        let subscriber = RedisSubscriber::start_in_arbiter(&arbiter, move |_| {
            RedisSubscriber::new(sub_client, prefix, sub_connected)
        });
        let broker = Arc::new(RedisBroker {
            pool,
            prefix: redis.prefix.clone(),
            instance_id: instance_id.to_owned(),
            history_size: config.history.size,
            history_ttl_ms: config.history.ttl_s.saturating_mul(1000),
            instance_ttl_s: redis.instance_ttl_s,
            subscriber,
            subscriber_connected: connected,
            commands_ok: AtomicBool::new(true),
            stopping: AtomicBool::new(false),
            last_error: Mutex::new(String::new()),
            local: Mutex::new(LocalRegistry::default()),
            scripts: Scripts {
                publish_room: Script::new(include_str!("scripts/publish_room.lua")),
                register: Script::new(include_str!("scripts/register.lua")),
                presence_join: Script::new(include_str!("scripts/presence_join.lua")),
                presence_leave: Script::new(include_str!("scripts/presence_leave.lua")),
                drop_connection: Script::new(include_str!("scripts/drop_connection.lua")),
            },
            _arbiter: arbiter.clone(),
        });
        let maintained = broker.clone();
        arbiter.spawn(async move { maintained.maintain().await });
        Ok(broker)
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut key = self.prefix.clone();
        for part in parts {
            key.push(':');
            key.push_str(part);
        }
        key
    }

    fn failed(&self, e: &dyn std::fmt::Display) -> BrokerError {
        if self.commands_ok.swap(false, Ordering::AcqRel) {
            tracing::warn!(error = %e, "redis command failed; serving local traffic until it is back");
        }
        if let Ok(mut last) = self.last_error.lock() {
            *last = e.to_string();
        }
        unavailable(e)
    }

    /// A pooled connection, or the outage as an error.
    async fn conn(&self) -> BrokerResult<deadpool_redis::Connection> {
        match self.pool.get().await {
            Ok(conn) => Ok(conn),
            Err(e) => Err(self.failed(&e)),
        }
    }

    /// Awaits one command (or script) with the command timeout.
    async fn timed<T>(
        &self,
        command: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> BrokerResult<T> {
        match tokio::time::timeout(COMMAND_TIMEOUT, command).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(self.failed(&e)),
            Err(_) => Err(self.failed(&"redis command timed out")),
        }
    }

    /// Runs `f` on a pooled connection with the command timeout; a failure
    /// or a time-out counts as an outage.
    async fn exec<T, F, Fut>(&self, f: F) -> BrokerResult<T>
    where
        F: FnOnce(deadpool_redis::Connection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let conn = self.conn().await?;
        self.timed(f(conn)).await
    }

    fn available(&self) -> bool {
        self.commands_ok.load(Ordering::Acquire)
    }

    /// Runs one of our Lua scripts (string arguments) with the command timeout.
    async fn run_script<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> BrokerResult<T> {
        self.exec(move |mut c| async move {
            let mut invocation = script.prepare_invoke();
            for key in &keys {
                invocation.key(key);
            }
            for arg in &args {
                invocation.arg(arg);
            }
            invocation.invoke_async(&mut c).await
        })
        .await
    }

    /// PUBLISHes `payload` and answers `id`; while Redis is away, delivers
    /// `local` to this instance's members instead (answering its local id).
    async fn publish_or_local(
        &self,
        channel: String,
        payload: String,
        id: String,
        local: LocalPublish,
    ) -> BrokerResult<String> {
        if self.available() {
            let sent: BrokerResult<i64> = self
                .exec(move |mut c| async move { c.publish(&channel, payload).await })
                .await;
            match sent {
                Ok(_) => return Ok(id),
                Err(BrokerError::Unavailable(_)) => {}
                Err(e) => return Err(e),
            }
        }
        self.local_publish(local).await
    }

    async fn local_publish(&self, msg: LocalPublish) -> BrokerResult<String> {
        self.subscriber
            .send(msg)
            .await
            .map_err(|e| BrokerError::Internal(e.to_string()))
    }

    fn registry_entry(&self, conn: &ConnectionInfo) -> String {
        serde_json::json!({
            "user": conn.user,
            "instance": self.instance_id,
            "connected_at": conn.connected_at_ms,
        })
        .to_string()
    }

    async fn register(
        &self,
        id: &str,
        user: &str,
        entry: &str,
        max: usize,
        restore: bool,
    ) -> BrokerResult<bool> {
        let added: i64 = self
            .run_script(
                &self.scripts.register,
                vec![self.key(&["connections"]), self.key(&["user_connections"])],
                vec![
                    id.to_owned(),
                    user.to_owned(),
                    entry.to_owned(),
                    max.to_string(),
                    if restore { "1" } else { "0" }.to_owned(),
                ],
            )
            .await?;
        Ok(added == 1)
    }

    async fn presence_script(
        &self,
        join: bool,
        room: &RoomName,
        user: &str,
        conn: &str,
    ) -> BrokerResult<()> {
        let keys = vec![
            self.key(&["presence", room.as_str()]),
            self.key(&["conn_rooms", conn]),
            self.key(&["room", room.as_str()]),
        ];
        let frame = presence_change_frame(join, room.as_str(), user).to_string();
        let script = if join {
            &self.scripts.presence_join
        } else {
            &self.scripts.presence_leave
        };
        let args = vec![user.to_owned(), room.as_str().to_owned(), frame];
        let _: i64 = self.run_script(script, keys, args).await?;
        Ok(())
    }

    async fn drop_connection(&self, conn: &str) -> BrokerResult<()> {
        let keys = vec![
            self.key(&["connections"]),
            self.key(&["user_connections"]),
            self.key(&["conn_rooms", conn]),
        ];
        let args = vec![conn.to_owned(), self.prefix.clone()];
        let _: i64 = self
            .run_script(&self.scripts.drop_connection, keys, args)
            .await?;
        Ok(())
    }

    /// Heartbeat, reaping of dead instances, restore after an outage; forever.
    async fn maintain(self: Arc<Self>) {
        let ttl = Duration::from_secs(self.instance_ttl_s.max(1));
        let tick = (ttl / 6).clamp(Duration::from_millis(200), Duration::from_secs(5));
        let mut registered_once = false;
        let mut retry = Duration::ZERO;
        while !self.stopping.load(Ordering::Acquire) {
            let was_ok = self.available();
            match self.heartbeat().await {
                Ok(present) => {
                    // The heartbeat key vanished: Redis restarted (empty) or
                    // this instance was presumed dead; either way re-register.
                    if !was_ok || !registered_once || !present {
                        if registered_once {
                            metrics()
                                .redis_reconnects
                                .with_label_values(&["commands"])
                                .inc();
                            tracing::info!(
                                "redis reachable again; restoring this instance's registry"
                            );
                        }
                        self.commands_ok.store(true, Ordering::Release);
                        match self.restore().await {
                            Ok(()) => registered_once = true,
                            Err(e) => tracing::warn!(error = %e, "restore after outage failed"),
                        }
                    }
                    if let Err(e) = self.reap().await {
                        tracing::debug!(error = %e, "reaping dead instances failed");
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "redis heartbeat failed");
                    // Reconnect attempts back off exponentially, with jitter.
                    retry = (retry * 2).clamp(RETRY_MIN, RETRY_MAX);
                    tokio::time::sleep(retry.mul_f64(rand::random_range(0.5..1.0))).await;
                    continue;
                }
            }
            retry = Duration::ZERO;
            let jitter = rand::random_range(0.8..1.2);
            tokio::time::sleep(tick.mul_f64(jitter)).await;
        }
    }

    /// Refreshes `{prefix}:instance:{id}` (expiring after two thirds of
    /// `redis.instance_ttl_s`, so survivors reap a dead instance within the
    /// TTL) and lists the instance in `{prefix}:instances`. Returns whether
    /// the key was still there.
    async fn heartbeat(&self) -> BrokerResult<bool> {
        let key = self.key(&["instance", &self.instance_id]);
        let instances = self.key(&["instances"]);
        let expiry_ms = (self.instance_ttl_s.max(1) * 2000 / 3).max(500);
        let id = self.instance_id.clone();
        self.exec(move |mut c| async move {
            redis::pipe()
                .cmd("SET")
                .arg(&key)
                .arg(now_ms())
                .arg("PX")
                .arg(expiry_ms)
                .arg("GET")
                .sadd(&instances, &id)
                .ignore()
                .query_async::<(Option<String>,)>(&mut c)
                .await
        })
        .await
        .map(|(previous,)| previous.is_some())
    }

    /// Re-registers this instance's connections and their rooms (idempotent).
    async fn restore(&self) -> BrokerResult<()> {
        let (connections, rooms) = match self.local.lock() {
            Ok(local) => (local.connections.clone(), local.rooms.clone()),
            Err(_) => return Ok(()),
        };
        for (id, (user, entry)) in &connections {
            self.register(id, user, entry, usize::MAX, true).await?;
            for room in rooms.get(id).into_iter().flatten() {
                self.presence_script(true, room, user, id).await?;
            }
        }
        Ok(())
    }

    /// Removes the connections of instances whose heartbeat has expired.
    /// Cheap while every instance lives: one SMEMBERS and one EXISTS each.
    async fn reap(&self) -> BrokerResult<()> {
        let instances_key = self.key(&["instances"]);
        let instances: Vec<String> = {
            let key = instances_key.clone();
            self.exec(move |mut c| async move { c.smembers(&key).await })
                .await
        }?;
        for instance in instances {
            if instance == self.instance_id {
                continue;
            }
            let key = self.key(&["instance", &instance]);
            let alive: bool = self
                .exec(move |mut c| async move { c.exists(&key).await })
                .await?;
            if alive {
                continue;
            }
            // HSCAN, not HGETALL: the registry may hold many connections.
            let (key, dead_instance) = (self.key(&["connections"]), instance.clone());
            let dead: Vec<String> = self
                .exec(move |mut c| async move {
                    let mut entries: redis::AsyncIter<(String, String)> = c.hscan(&key).await?;
                    let mut dead = Vec::new();
                    while let Some(item) = futures_util::StreamExt::next(&mut entries).await {
                        let (id, entry) = item?;
                        let owner = serde_json::from_str::<Value>(&entry).ok().and_then(|v| {
                            v.get("instance").and_then(Value::as_str).map(str::to_owned)
                        });
                        if owner.as_deref() == Some(dead_instance.as_str()) {
                            dead.push(id);
                        }
                    }
                    Ok(dead)
                })
                .await?;
            if !dead.is_empty() {
                tracing::info!(instance = %instance, connections = dead.len(), "reaping the connections of a dead instance");
            }
            for id in dead {
                self.drop_connection(&id).await?;
            }
            let (key, member) = (instances_key.clone(), instance.clone());
            let _: i64 = self
                .exec(move |mut c| async move { c.srem(&key, &member).await })
                .await?;
        }
        Ok(())
    }
}

#[async_trait]
impl Broker for RedisBroker {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn attach_hub(&self, hub: Recipient<Fanout>) {
        self.subscriber.do_send(AttachHub(hub));
    }

    async fn register_connection(
        &self,
        conn: &ConnectionInfo,
        max_per_user: usize,
    ) -> BrokerResult<()> {
        if !self.available() {
            return Err(unavailable(
                self.last_error
                    .lock()
                    .map(|e| e.clone())
                    .unwrap_or_default(),
            ));
        }
        let entry = self.registry_entry(conn);
        if !self
            .register(&conn.connection_id, &conn.user, &entry, max_per_user, false)
            .await?
        {
            return Err(BrokerError::ConnectionLimit);
        }
        if let Ok(mut local) = self.local.lock() {
            local
                .connections
                .insert(conn.connection_id.clone(), (conn.user.clone(), entry));
        }
        Ok(())
    }

    async fn unregister_connection(&self, connection_id: &str, _user: &str) {
        if let Ok(mut local) = self.local.lock() {
            local.connections.remove(connection_id);
            local.rooms.remove(connection_id);
        }
        if let Err(e) = self.drop_connection(connection_id).await {
            tracing::debug!(error = %e, "connection not removed from the registry (the reaper or a restore will)");
        }
    }

    async fn watch_room(&self, room: &RoomName) -> BrokerResult<()> {
        self.watch(self.key(&["room", room.as_str()])).await
    }

    fn unwatch_room(&self, room: &RoomName) {
        self.subscriber
            .do_send(Unwatch(self.key(&["room", room.as_str()])));
    }

    async fn watch_user(&self, user: &str) -> BrokerResult<()> {
        self.watch(self.key(&["user", user])).await
    }

    fn unwatch_user(&self, user: &str) {
        self.subscriber.do_send(Unwatch(self.key(&["user", user])));
    }

    async fn publish_room(
        &self,
        room: &RoomName,
        from: &str,
        data: &Value,
    ) -> BrokerResult<MessageId> {
        let raw = to_raw_value(data).map_err(|e| BrokerError::Internal(e.to_string()))?;
        if self.available() {
            let keys = vec![
                self.key(&["history", room.as_str()]),
                self.key(&["room", room.as_str()]),
            ];
            let args = vec![
                self.history_size.to_string(),
                self.history_ttl_ms.to_string(),
                serde_json::to_string(room.as_str()).unwrap_or_default(),
                serde_json::to_string(from).unwrap_or_default(),
                raw.get().to_owned(),
            ];
            let result: BrokerResult<String> = self
                .run_script(&self.scripts.publish_room, keys, args)
                .await;
            match result {
                Ok(id) => {
                    return id.parse().map_err(|e: String| BrokerError::Internal(e));
                }
                Err(BrokerError::Unavailable(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let id = self
            .local_publish(LocalPublish::Room {
                room: room.clone(),
                from: from.to_owned(),
                data: raw,
            })
            .await?;
        id.parse().map_err(BrokerError::Internal)
    }

    async fn publish_user(&self, user: &str, from: &str, data: &Value) -> BrokerResult<String> {
        let raw = to_raw_value(data).map_err(|e| BrokerError::Internal(e.to_string()))?;
        // Unique across instances: an instance's own counter would not be.
        let id = format!("{}-{}", now_ms(), rand::random::<u32>());
        let frame = direct_frame(&id, from, &*raw, now_ms()).to_string();
        let local = LocalPublish::User {
            user: user.to_owned(),
            from: from.to_owned(),
            data: raw,
        };
        self.publish_or_local(self.key(&["user", user]), frame, id, local)
            .await
    }

    async fn broadcast(&self, data: &Value) -> BrokerResult<String> {
        let raw = to_raw_value(data).map_err(|e| BrokerError::Internal(e.to_string()))?;
        let id = format!("{}-{}", now_ms(), rand::random::<u32>());
        let payload = format!(
            "{{\"id\":\"{id}\",\"data\":{},\"ts\":{}}}",
            raw.get(),
            now_ms()
        );
        let local = LocalPublish::Broadcast { data: raw };
        self.publish_or_local(self.key(&["broadcast"]), payload, id, local)
            .await
    }

    async fn history(
        &self,
        room: &RoomName,
        since: Option<MessageId>,
        limit: usize,
    ) -> BrokerResult<History> {
        let key = self.key(&["history", room.as_str()]);
        let start = since.map_or_else(|| "-".to_owned(), |s| format!("({s}"));
        let count = limit.min(i64::MAX as usize);
        let (k1, k2) = (key.clone(), key);
        // Newest first, at most `limit`, then reversed: "the latest ones".
        let entries: Vec<(String, HashMap<String, String>)> = self
            .exec(move |mut c| async move {
                let reply: redis::streams::StreamRangeReply =
                    c.xrevrange_count(&k1, "+", &start, count).await?;
                Ok(reply
                    .ids
                    .into_iter()
                    .map(|e| {
                        let fields = e
                            .map
                            .into_iter()
                            .filter_map(|(k, v)| {
                                redis::from_redis_value::<String>(v).ok().map(|v| (k, v))
                            })
                            .collect();
                        (e.id, fields)
                    })
                    .collect())
            })
            .await?;
        let mut messages = Vec::with_capacity(entries.len());
        for (id, fields) in entries.into_iter().rev() {
            let (Ok(parsed), Some(body)) = (id.parse::<MessageId>(), fields.get("b")) else {
                continue;
            };
            let frame = format!("{{\"type\":\"message\",\"id\":\"{id}\",{body}");
            messages.push(HistoryEntry {
                id: parsed,
                frame: frame.into(),
            });
        }
        let recovered = match since {
            None => true,
            Some(since) => {
                // Whatever was trimmed or expired after `since` is lost.
                let mut conn = self.conn().await?;
                let info: redis::RedisResult<HashMap<String, redis::Value>> =
                    match tokio::time::timeout(
                        COMMAND_TIMEOUT,
                        redis::cmd("XINFO")
                            .arg("STREAM")
                            .arg(&k2)
                            .query_async(&mut conn),
                    )
                    .await
                    {
                        Ok(result) => result,
                        Err(_) => return Err(self.failed(&"redis command timed out")),
                    };
                match info {
                    Ok(info) => {
                        // Trimming drops the oldest entries (Redis does not
                        // update max-deleted-entry-id for it): something after
                        // `since` may be lost when entries were trimmed and
                        // `since` is older than the first one retained. When
                        // `since` is exactly the last trimmed id this errs on
                        // the safe side (recovered: false).
                        let int = |k: &str| {
                            info.get(k)
                                .and_then(|v| redis::from_redis_value::<u64>(v.clone()).ok())
                                .unwrap_or(0)
                        };
                        let first = info
                            .get("recorded-first-entry-id")
                            .and_then(|v| redis::from_redis_value::<String>(v.clone()).ok())
                            .and_then(|s| s.parse::<MessageId>().ok())
                            .unwrap_or_default();
                        let trimmed = int("entries-added") > int("length");
                        (!trimmed || since >= first) && messages.len() < count
                    }
                    // No stream: expired or never written.
                    Err(_) => false,
                }
            }
        };
        Ok(History {
            messages,
            recovered,
        })
    }

    async fn presence_join(
        &self,
        room: &RoomName,
        user: &str,
        connection_id: &str,
    ) -> BrokerResult<()> {
        if let Ok(mut local) = self.local.lock() {
            local
                .rooms
                .entry(connection_id.to_owned())
                .or_default()
                .insert(room.clone());
        }
        self.presence_script(true, room, user, connection_id).await
    }

    async fn presence_leave(
        &self,
        room: &RoomName,
        user: &str,
        connection_id: &str,
    ) -> BrokerResult<()> {
        if let Ok(mut local) = self.local.lock() {
            if let Some(rooms) = local.rooms.get_mut(connection_id) {
                rooms.remove(room);
            }
        }
        self.presence_script(false, room, user, connection_id).await
    }

    async fn presence(&self, room: &RoomName) -> BrokerResult<Vec<PresenceEntry>> {
        let key = self.key(&["presence", room.as_str()]);
        let members: HashMap<String, i64> = self
            .exec(move |mut c| async move { c.hgetall(&key).await })
            .await?;
        let mut users: Vec<PresenceEntry> = members
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(user, n)| PresenceEntry {
                user,
                connections: n as u64,
            })
            .collect();
        users.sort_by(|a, b| a.user.cmp(&b.user));
        Ok(users)
    }

    async fn user_connections(&self, user: &str) -> BrokerResult<u64> {
        let (key, user) = (self.key(&["user_connections"]), user.to_owned());
        let n: Option<i64> = self
            .exec(move |mut c| async move { c.hget(&key, &user).await })
            .await?;
        Ok(n.unwrap_or(0).max(0) as u64)
    }

    async fn disconnect_user(&self, user: &str) -> BrokerResult<u64> {
        let n = self.user_connections(user).await?;
        let channel = self.key(&["user", user]);
        let _: i64 = self
            .exec(move |mut c| async move { c.publish(&channel, r#"{"type":"kick"}"#).await })
            .await?;
        Ok(n)
    }

    async fn stats(&self) -> BrokerResult<BrokerStats> {
        let (conns, users) = (self.key(&["connections"]), self.key(&["user_connections"]));
        let pattern = self.key(&["presence", "*"]);
        let (connections, user_count, rooms): (u64, u64, u64) = self
            .exec(move |mut c| async move {
                let connections: u64 = c.hlen(&conns).await?;
                let users: u64 = c.hlen(&users).await?;
                let mut rooms = 0u64;
                let mut iter: redis::AsyncIter<String> = c.scan_match(&pattern).await?;
                while let Some(key) = futures_util::StreamExt::next(&mut iter).await {
                    key?;
                    rooms += 1;
                }
                Ok((connections, users, rooms))
            })
            .await?;
        Ok(BrokerStats {
            rooms,
            users: user_count,
            connections,
        })
    }

    async fn shutdown(&self) {
        self.stopping.store(true, Ordering::Release);
        let ids: Vec<String> = match self.local.lock() {
            Ok(mut local) => {
                local.rooms.clear();
                local.connections.drain().map(|(id, _)| id).collect()
            }
            Err(_) => Vec::new(),
        };
        for id in ids {
            if self.drop_connection(&id).await.is_err() {
                return;
            }
        }
        let (key, instances, id) = (
            self.key(&["instance", &self.instance_id]),
            self.key(&["instances"]),
            self.instance_id.clone(),
        );
        let _: BrokerResult<()> = self
            .exec(move |mut c| async move {
                redis::pipe()
                    .del(&key)
                    .ignore()
                    .srem(&instances, &id)
                    .ignore()
                    .query_async::<()>(&mut c)
                    .await
            })
            .await;
        tracing::info!("deregistered from redis");
    }

    async fn ready(&self) -> Result<(), String> {
        if !self.available() {
            let reason = self
                .last_error
                .lock()
                .map(|e| e.clone())
                .unwrap_or_default();
            return Err(format!("redis unreachable: {reason}"));
        }
        if !self.subscriber_connected.load(Ordering::Acquire) {
            return Err("redis pub/sub connection is down".into());
        }
        Ok(())
    }
}

impl RedisBroker {
    async fn watch(&self, channel: String) -> BrokerResult<()> {
        let (confirmed, rx) = oneshot::channel();
        self.subscriber.do_send(Watch { channel, confirmed });
        // The subscriber answers at once while Redis is away; a connection
        // that dies mid-subscribe is restored by the reconnect.
        match tokio::time::timeout(COMMAND_TIMEOUT, rx).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(unavailable("subscription not confirmed")),
        }
    }
}
