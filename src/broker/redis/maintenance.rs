//! The maintenance task of a Redis-backed instance, forever until shutdown:
//! refresh this instance's heartbeat, reap the connections of instances
//! whose heartbeat expired, and after an outage (or when the heartbeat key
//! vanished) re-register this instance's connections and presence.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use redis::AsyncCommands;
use serde_json::Value;

use super::RedisBroker;
use crate::broker::BrokerResult;
use crate::clock::now_ms;
use crate::metrics::metrics;

/// Backoff between attempts to reach Redis again after a failure.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

impl RedisBroker {
    /// Heartbeat, reaping of dead instances, restore after an outage.
    pub(super) async fn maintain(self: Arc<Self>) {
        let ttl = Duration::from_secs(self.instance_ttl_s.max(1));
        let tick = (ttl / 6).clamp(Duration::from_millis(200), Duration::from_secs(5));
        let mut registered_once = false;
        let mut retry = Duration::ZERO;
        while !self.stopping.load(Ordering::Acquire) {
            let was_ok = self.cmd.available();
            let present = match self.heartbeat().await {
                Ok(present) => present,
                Err(e) => {
                    tracing::debug!(error = %e, "redis heartbeat failed");
                    // Reconnect attempts back off exponentially, with jitter.
                    retry = (retry * 2).clamp(RETRY_MIN, RETRY_MAX);
                    tokio::time::sleep(retry.mul_f64(rand::random_range(0.5..1.0))).await;
                    continue;
                }
            };
            // The heartbeat key vanished: Redis restarted (empty) or this
            // instance was presumed dead; either way re-register.
            if !was_ok || !registered_once || !present {
                if registered_once {
                    metrics()
                        .redis_reconnects
                        .with_label_values(&["commands"])
                        .inc();
                    tracing::info!("redis reachable again; restoring this instance's registry");
                }
                self.cmd.mark_available();
                match self.restore().await {
                    Ok(()) => registered_once = true,
                    Err(e) => tracing::warn!(error = %e, "restore after outage failed"),
                }
            }
            if let Err(e) = self.reap().await {
                tracing::debug!(error = %e, "reaping dead instances failed");
            }
            retry = Duration::ZERO;
            tokio::time::sleep(tick.mul_f64(rand::random_range(0.8..1.2))).await;
        }
    }

    /// Refreshes `{prefix}:instance:{id}` (expiring after two thirds of
    /// `redis.instance_ttl_s`, so survivors reap a dead instance within the
    /// TTL) and lists the instance in `{prefix}:instances`. Returns whether
    /// the key was still there.
    async fn heartbeat(&self) -> BrokerResult<bool> {
        let key = self.keys.instance(&self.instance_id);
        let instances = self.keys.instances();
        let expiry_ms = (self.instance_ttl_s.max(1) * 2000 / 3).max(500);
        let id = self.instance_id.clone();
        self.cmd
            .exec(move |mut c| async move {
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

    /// Removes the heartbeat and the `instances` entry (shutdown).
    pub(super) async fn remove_heartbeat(&self) -> BrokerResult<()> {
        let (key, instances, id) = (
            self.keys.instance(&self.instance_id),
            self.keys.instances(),
            self.instance_id.clone(),
        );
        self.cmd
            .exec(move |mut c| async move {
                redis::pipe()
                    .del(&key)
                    .ignore()
                    .srem(&instances, &id)
                    .ignore()
                    .query_async::<()>(&mut c)
                    .await
            })
            .await
    }

    /// Re-registers this instance's connections and their rooms (idempotent).
    async fn restore(&self) -> BrokerResult<()> {
        let local = match self.local.lock() {
            Ok(local) => local.clone(),
            Err(_) => return Ok(()),
        };
        for (id, (user, entry)) in &local.connections {
            self.register_entry(id, user, entry, usize::MAX, true)
                .await?;
            for room in local.rooms.get(id).into_iter().flatten() {
                self.presence_script(true, room, user, id).await?;
            }
        }
        Ok(())
    }

    /// Removes the connections of instances whose heartbeat has expired.
    /// Cheap while every instance lives: one SMEMBERS and one EXISTS each.
    async fn reap(&self) -> BrokerResult<()> {
        let key = self.keys.instances();
        let instances: Vec<String> = self
            .cmd
            .exec(move |mut c| async move { c.smembers(&key).await })
            .await?;
        for instance in instances {
            if instance == self.instance_id {
                continue;
            }
            let key = self.keys.instance(&instance);
            let alive: bool = self
                .cmd
                .exec(move |mut c| async move { c.exists(&key).await })
                .await?;
            if !alive {
                self.reap_instance(&instance).await?;
            }
        }
        Ok(())
    }

    /// Drops every registry entry of one dead instance, then forgets it.
    async fn reap_instance(&self, instance: &str) -> BrokerResult<()> {
        let dead = self.connections_of(instance).await?;
        if !dead.is_empty() {
            tracing::info!(
                instance,
                connections = dead.len(),
                "reaping the connections of a dead instance"
            );
        }
        for id in dead {
            self.drop_connection(&id).await?;
        }
        let (key, member) = (self.keys.instances(), instance.to_owned());
        let _: i64 = self
            .cmd
            .exec(move |mut c| async move { c.srem(&key, &member).await })
            .await?;
        Ok(())
    }

    /// The registered connections of `instance` (HSCAN, not HGETALL: the
    /// registry may hold many connections).
    async fn connections_of(&self, instance: &str) -> BrokerResult<Vec<String>> {
        let (key, instance) = (self.keys.connections(), instance.to_owned());
        self.cmd
            .exec(move |mut c| async move {
                let mut entries: redis::AsyncIter<(String, String)> = c.hscan(&key).await?;
                let mut dead = Vec::new();
                while let Some(item) = futures_util::StreamExt::next(&mut entries).await {
                    let (id, entry) = item?;
                    let owner = serde_json::from_str::<Value>(&entry)
                        .ok()
                        .and_then(|v| v.get("instance").and_then(Value::as_str).map(str::to_owned));
                    if owner.as_deref() == Some(instance.as_str()) {
                        dead.push(id);
                    }
                }
                Ok(dead)
            })
            .await
    }
}
