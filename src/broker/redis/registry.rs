//! The connection registry in Redis: `{prefix}:connections` (who is
//! connected where), `{prefix}:user_connections` (the atomic cluster-wide
//! per-user limit), and this instance's own copy ([`LocalRegistry`]) from
//! which it re-registers after an outage.

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
/// Redis comes back empty. Touched on connect, disconnect, join and leave,
/// always before the Redis command, so it never holds less than Redis
/// holds for this instance.
#[derive(Default, Clone)]
pub(super) struct LocalRegistry {
    pub connections: HashMap<String, LocalConnection>,
    /// connection id → rooms it is a member of.
    pub rooms: HashMap<String, HashSet<RoomName>>,
}

impl RedisBroker {
    /// Changes the local registry (a poisoned lock changes nothing).
    pub(super) fn update_local(&self, f: impl FnOnce(&mut LocalRegistry)) {
        if let Ok(mut local) = self.local.lock() {
            f(&mut local);
        }
    }

    fn registry_entry(&self, conn: &ConnectionInfo) -> String {
        serde_json::json!({
            "user": conn.user,
            "instance": self.instance_id,
            "connected_at": conn.connected_at_ms,
        })
        .to_string()
    }

    /// The keys of `register.lua` for this instance.
    pub(super) fn register_keys(&self) -> Vec<String> {
        vec![
            self.keys.connections(),
            self.keys.user_connections(),
            self.keys.instance_conns(&self.instance_id),
        ]
    }

    /// Adds the connection unless the user is at `max`. True when it is
    /// registered.
    async fn register_entry(
        &self,
        id: &str,
        user: &str,
        entry: &str,
        max: usize,
    ) -> BrokerResult<bool> {
        let args = vec![
            id.to_owned(),
            user.to_owned(),
            entry.to_owned(),
            max.to_string(),
            "0".to_owned(),
        ];
        let added: i64 = self
            .cmd
            .run_script(&self.cmd.scripts.register, self.register_keys(), args)
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
}

#[async_trait]
impl Registry for RedisBroker {
    async fn register(&self, conn: &ConnectionInfo, max_per_user: usize) -> BrokerResult<()> {
        if !self.cmd.available() {
            return Err(self.unavailable());
        }
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
        let registered = self
            .register_entry(&id, &conn.user, &entry, max_per_user)
            .await;
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
                // The script may have run: the next reconcile removes it.
                self.want_reconcile();
                Err(e)
            }
        }
    }

    async fn unregister(&self, connection_id: &str, _user: &str) {
        self.update_local(|local| {
            local.connections.remove(connection_id);
            local.rooms.remove(connection_id);
            crate::trim::shrink_map(&mut local.connections);
            crate::trim::shrink_map(&mut local.rooms);
        });
        if let Err(e) = self
            .drop_connections(&[connection_id], &self.instance_id)
            .await
        {
            tracing::debug!(error = %e, "connection not removed from the registry yet; the next reconcile will");
            self.want_reconcile();
        }
    }

    async fn user_connections(&self, user: &str) -> BrokerResult<u64> {
        let (key, user) = (self.keys.user_connections(), user.to_owned());
        let n: Option<i64> = self
            .cmd
            .exec(move |mut c| async move { c.hget(&key, &user).await })
            .await?;
        Ok(n.unwrap_or(0).max(0) as u64)
    }

    async fn disconnect_user(&self, user: &str) -> BrokerResult<u64> {
        let n = self.user_connections(user).await?;
        let channel = self.keys.user_channel(user);
        let _: i64 = self
            .cmd
            .exec(move |mut c| async move { c.publish(&channel, KICK).await })
            .await?;
        Ok(n)
    }

    /// Three O(1) commands: nothing scans the keyspace.
    async fn stats(&self) -> BrokerResult<BrokerStats> {
        let (conns, users) = (self.keys.connections(), self.keys.user_connections());
        let rooms = self.keys.rooms();
        let (connections, users, rooms): (u64, u64, u64) = self
            .cmd
            .exec(move |mut c| async move {
                redis::pipe()
                    .hlen(&conns)
                    .hlen(&users)
                    .scard(&rooms)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(BrokerStats {
            rooms,
            users,
            connections,
            local_rooms: self.local_rooms.load(std::sync::atomic::Ordering::Relaxed) as u64,
        })
    }
}
