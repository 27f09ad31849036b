//! The connection registry in Redis: each user's connections
//! (`sb:conns:{U}`: the per-user limit counts them, atomically, on every
//! instance), each instance's (`sb:instance_conns:{I}`: what the reaper
//! cleans when it dies), and this instance's own copy ([`LocalRegistry`])
//! from which it reconciles.
//!
//! A connect records the connection under the instance first, then under
//! its user (with the limit check); a disconnect removes it in the reverse
//! order (its rooms, its user, then its instance). Every step is
//! idempotent, so one cut short is finished by the reaper (the instance
//! died) or the next reconcile (it lives).

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use redis::AsyncCommands;

use super::payload::KICK;
use super::RedisBroker;
use crate::broker::{BrokerError, BrokerResult, BrokerStats, ConnectionInfo, Registry};
use crate::protocol::RoomName;

/// One of this instance's connections.
#[derive(Clone)]
pub(super) struct LocalConnection {
    pub user: String,
    /// Its registry entry (JSON).
    pub entry: String,
    /// False while its registration is in flight: a reconcile neither
    /// removes nor restores it (the limit check is the registration's).
    pub registered: bool,
}

/// This instance's own connections, kept so they can be re-registered when
/// Redis lost them. Touched on connect, disconnect, join and leave, always
/// before Redis, so it never holds less than Redis holds for this instance.
#[derive(Default, Clone)]
pub(super) struct LocalRegistry {
    pub connections: HashMap<String, LocalConnection>,
    /// connection id → rooms it is a member of.
    pub rooms: HashMap<String, HeldRooms>,
    /// Stamps the room changes, in order (see [`HeldRooms::stamp`]).
    pub changes: u64,
    /// Memberships whose last change failed (connection id → room → when),
    /// Redis's side unknown. Once the connection is gone no reconcile sees
    /// them (they are not under the instance any more), so the maintenance
    /// task leaves them again itself (see `settle_unsure`).
    pub unsure: HashMap<String, HashMap<RoomName, std::time::Instant>>,
}

/// One connection's rooms.
#[derive(Default, Clone)]
pub(super) struct HeldRooms {
    pub set: HashSet<RoomName>,
    /// The stamp of its last change: a reconcile that wrote an older state
    /// sees it changed under it and writes the connection again.
    pub stamp: u64,
}

/// Unsure memberships are kept for at most this many connections (each
/// one that changed a membership while Redis failed).
pub(super) const MAX_UNSURE: usize = 100_000;

impl LocalRegistry {
    /// Adds (`joined`) or removes `conn`'s membership of `room`.
    pub fn change_room(&mut self, conn: &str, room: &RoomName, joined: bool) {
        self.changes += 1;
        let stamp = self.changes;
        if joined {
            let rooms = self.rooms.entry(conn.to_owned()).or_default();
            rooms.set.insert(room.clone());
            rooms.stamp = stamp;
        } else if let Some(rooms) = self.rooms.get_mut(conn) {
            rooms.set.remove(room);
            rooms.stamp = stamp;
            if rooms.set.is_empty() {
                self.rooms.remove(conn);
            }
        }
    }

    /// The stamp of `conn`'s rooms (`None` without any).
    pub fn stamp(&self, conn: &str) -> Option<u64> {
        self.rooms.get(conn).map(|r| r.stamp)
    }

    /// Records that `conn`'s membership of `room` may be wrong in Redis.
    pub fn mark_unsure(&mut self, conn: &str, room: &RoomName) {
        if self.unsure.len() >= MAX_UNSURE && !self.unsure.contains_key(conn) {
            tracing::error!(
                limit = MAX_UNSURE,
                "too many presence changes failed; one is not retried"
            );
            return;
        }
        self.unsure
            .entry(conn.to_owned())
            .or_default()
            .insert(room.clone(), std::time::Instant::now());
    }
}

/// An instance's heartbeat: its numbers, for `/api/stats`.
#[derive(serde::Serialize, serde::Deserialize, Default)]
pub(super) struct Beat {
    pub connections: u64,
    pub users: u64,
    pub rooms: u64,
    pub at: u64,
}

impl RedisBroker {
    /// Changes the local registry (a poisoned lock changes nothing).
    pub(super) fn update_local(&self, f: impl FnOnce(&mut LocalRegistry)) {
        if let Ok(mut local) = self.local.lock() {
            f(&mut local);
        }
    }

    pub(super) fn registry_entry(&self, conn: &ConnectionInfo) -> String {
        serde_json::json!({
            "instance": self.instance_id,
            "connected_at": conn.connected_at_ms,
        })
        .to_string()
    }

    /// Records `id` (of `user`) under this instance.
    pub(super) async fn hold(&self, id: &str, user: &str) -> BrokerResult<()> {
        let (key, id, user) = (
            self.keys.instance_conns(&self.instance_id),
            id.to_owned(),
            user.to_owned(),
        );
        self.redis
            .exec(move |mut c| async move { c.hset::<_, _, _, ()>(&key, &id, &user).await })
            .await?;
        Ok(())
    }

    /// Adds `id` to its user's connections unless the user is at `max`
    /// (`restore`: no limit check). True when it is registered.
    async fn register_user(
        &self,
        id: &str,
        user: &str,
        entry: &str,
        max: usize,
        restore: bool,
    ) -> BrokerResult<bool> {
        let args = vec![
            id.to_owned(),
            entry.to_owned(),
            max.to_string(),
            if restore { "1" } else { "0" }.to_owned(),
        ];
        let keys = vec![self.keys.user_conns(user)];
        let added: i64 = self
            .redis
            .run_script(&self.redis.scripts.register, keys, args)
            .await?;
        Ok(added == 1)
    }

    /// Drops every connection of this instance (shutdown).
    pub(super) async fn deregister_all(&self) -> BrokerResult<()> {
        let ids: Vec<String> = match self.local.lock() {
            Ok(mut local) => {
                local.rooms.clear();
                local.connections.drain().map(|(id, _)| id).collect()
            }
            Err(_) => Vec::new(),
        };
        for batch in ids.chunks(500) {
            self.drop_connections(batch, &self.instance_id).await?;
        }
        Ok(())
    }

    /// This instance's numbers for its heartbeat.
    pub(super) fn numbers(&self) -> Beat {
        let (connections, users) = match self.local.lock() {
            Ok(local) => {
                let users: HashSet<&str> = local
                    .connections
                    .values()
                    .map(|c| c.user.as_str())
                    .collect();
                (local.connections.len() as u64, users.len() as u64)
            }
            Err(_) => (0, 0),
        };
        Beat {
            connections,
            users,
            rooms: self.local_rooms.load(std::sync::atomic::Ordering::Relaxed) as u64,
            at: crate::clock::now_ms(),
        }
    }

    async fn register_steps(
        &self,
        conn: &ConnectionInfo,
        entry: &str,
        max: usize,
    ) -> BrokerResult<bool> {
        let id = &conn.connection_id;
        self.hold(id, &conn.user).await?;
        if self
            .register_user(id, &conn.user, entry, max, false)
            .await?
        {
            return Ok(true);
        }
        // Refused: it is not this instance's either.
        self.drop_connections(&[id.as_str()], &self.instance_id)
            .await?;
        Ok(false)
    }
}

#[async_trait]
impl Registry for RedisBroker {
    async fn register(&self, conn: &ConnectionInfo, max_per_user: usize) -> BrokerResult<()> {
        self.check_available()?;
        let entry = self.registry_entry(conn);
        let id = conn.connection_id.clone();
        let pending = LocalConnection {
            user: conn.user.clone(),
            entry: entry.clone(),
            registered: false,
        };
        self.update_local(|local| {
            local.connections.insert(id.clone(), pending);
        });
        let registered = self.register_steps(conn, &entry, max_per_user).await;
        self.update_local(|local| match registered {
            Ok(true) => {
                if let Some(c) = local.connections.get_mut(&id) {
                    c.registered = true;
                }
            }
            _ => {
                local.connections.remove(&id);
            }
        });
        match registered {
            Ok(true) => Ok(()),
            Ok(false) => Err(BrokerError::ConnectionLimit),
            Err(e) => {
                // A step may have run: the next reconcile removes it.
                self.want_reconcile();
                Err(e)
            }
        }
    }

    async fn unregister(&self, connection_id: &str, user: &str) {
        self.update_local(|local| {
            local.connections.remove(connection_id);
            // A join its lane writes after the drop below is followed there
            // by the leave of its disconnect (or, if that fails, marked
            // unsure).
            local.rooms.remove(connection_id);
            crate::trim::shrink_map(&mut local.connections);
            crate::trim::shrink_map(&mut local.rooms);
        });
        let dropped = self
            .drop_connection(connection_id, Some(user), &self.instance_id)
            .await;
        if let Err(e) = dropped {
            tracing::debug!(error = %e, "connection not removed from the registry yet; the next reconcile will");
            self.want_reconcile();
        }
    }

    async fn user_connections(&self, user: &str) -> BrokerResult<u64> {
        self.check_available()?;
        let key = self.keys.user_conns(user);
        let n: u64 = self
            .redis
            .exec(move |mut c| async move { c.hlen(&key).await })
            .await?;
        Ok(n)
    }

    async fn disconnect_user(&self, user: &str) -> BrokerResult<u64> {
        let n = self.user_connections(user).await?;
        self.redis
            .publish(self.keys.user_channel(user), KICK.to_owned())
            .await?;
        Ok(n)
    }

    /// The sum of the live instances' heartbeats: one read of the
    /// instances' set, one per instance.
    async fn stats(&self) -> BrokerResult<BrokerStats> {
        self.check_available()?;
        let key = self.keys.instances();
        let instances: Vec<String> = self
            .redis
            .exec(move |mut c| async move { c.smembers(&key).await })
            .await?;
        let beats = instances.iter().map(|instance| {
            let key = self.keys.instance(instance);
            self.redis
                .exec(move |mut c| async move { c.get::<_, Option<String>>(&key).await })
        });
        let mut stats = BrokerStats {
            local_rooms: self.local_rooms.load(std::sync::atomic::Ordering::Relaxed) as u64,
            ..BrokerStats::default()
        };
        for beat in futures_util::future::join_all(beats).await {
            let Some(beat) = beat?.and_then(|b| serde_json::from_str::<Beat>(&b).ok()) else {
                continue;
            };
            stats.connections += beat.connections;
            stats.users += beat.users;
            stats.rooms += beat.rooms;
            stats.instances += 1;
        }
        Ok(stats)
    }
}
