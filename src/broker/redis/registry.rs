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

/// This instance's own connections, kept so they can be re-registered when
/// Redis comes back empty. Touched on connect, disconnect, join and leave.
#[derive(Default, Clone)]
pub(super) struct LocalRegistry {
    /// connection id → (user, registry entry JSON).
    pub connections: HashMap<String, (String, String)>,
    /// connection id → rooms it is a member of.
    pub rooms: HashMap<String, HashSet<RoomName>>,
}

impl RedisBroker {
    fn registry_entry(&self, conn: &ConnectionInfo) -> String {
        serde_json::json!({
            "user": conn.user,
            "instance": self.instance_id,
            "connected_at": conn.connected_at_ms,
        })
        .to_string()
    }

    /// Adds the connection unless the user is at `max` (`restore`: no
    /// limit check, idempotent). True when it is registered.
    pub(super) async fn register_entry(
        &self,
        id: &str,
        user: &str,
        entry: &str,
        max: usize,
        restore: bool,
    ) -> BrokerResult<bool> {
        let keys = vec![self.keys.connections(), self.keys.user_connections()];
        let args = vec![
            id.to_owned(),
            user.to_owned(),
            entry.to_owned(),
            max.to_string(),
            if restore { "1" } else { "0" }.to_owned(),
        ];
        let added: i64 = self
            .cmd
            .run_script(&self.cmd.scripts.register, keys, args)
            .await?;
        Ok(added == 1)
    }

    /// Removes a connection from the registry, the per-user counts and the
    /// presence of its rooms (one script; idempotent).
    pub(super) async fn drop_connection(&self, conn: &str) -> BrokerResult<()> {
        let keys = vec![
            self.keys.connections(),
            self.keys.user_connections(),
            self.keys.conn_rooms(conn),
        ];
        let args = vec![conn.to_owned(), self.keys.prefix().to_owned()];
        let _: i64 = self
            .cmd
            .run_script(&self.cmd.scripts.drop_connection, keys, args)
            .await?;
        Ok(())
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
        for id in ids {
            self.drop_connection(&id).await?;
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
        if !self
            .register_entry(&conn.connection_id, &conn.user, &entry, max_per_user, false)
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

    async fn unregister(&self, connection_id: &str, _user: &str) {
        if let Ok(mut local) = self.local.lock() {
            local.connections.remove(connection_id);
            local.rooms.remove(connection_id);
        }
        if let Err(e) = self.drop_connection(connection_id).await {
            tracing::debug!(error = %e, "connection not removed from the registry (the reaper or a restore will)");
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

    async fn stats(&self) -> BrokerResult<BrokerStats> {
        let (conns, users) = (self.keys.connections(), self.keys.user_connections());
        let pattern = self.keys.presence_pattern();
        let (connections, users, rooms): (u64, u64, u64) = self
            .cmd
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
            users,
            connections,
        })
    }
}
