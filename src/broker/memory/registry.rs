//! The connection registry in memory: connection → user, and each user's
//! connection count for `limits.max_connections_per_user`.

use std::collections::HashMap;

use async_trait::async_trait;

use super::MemoryBroker;
use crate::broker::fanout::Envelope;
use crate::broker::{BrokerError, BrokerResult, BrokerStats, ConnectionInfo, Registry};

#[derive(Default)]
pub(super) struct ConnectionTable {
    /// connection id → user.
    connections: HashMap<String, String>,
    /// user → connection count.
    per_user: HashMap<String, u64>,
}

impl ConnectionTable {
    fn add(&mut self, conn: ConnectionInfo, max_per_user: usize) -> BrokerResult<()> {
        let n = self.per_user.entry(conn.user.clone()).or_insert(0);
        if *n as usize >= max_per_user {
            return Err(BrokerError::ConnectionLimit);
        }
        *n += 1;
        self.connections.insert(conn.connection_id, conn.user);
        Ok(())
    }

    fn remove(&mut self, connection_id: &str) {
        let Some(user) = self.connections.remove(connection_id) else {
            return;
        };
        if let Some(n) = self.per_user.get_mut(&user) {
            *n -= 1;
            if *n == 0 {
                self.per_user.remove(&user);
            }
        }
        crate::trim::shrink_map(&mut self.connections);
        crate::trim::shrink_map(&mut self.per_user);
    }

    fn of_user(&self, user: &str) -> u64 {
        self.per_user.get(user).copied().unwrap_or(0)
    }
}

#[async_trait]
impl Registry for MemoryBroker {
    async fn register(&self, conn: &ConnectionInfo, max_per_user: usize) -> BrokerResult<()> {
        let conn = conn.clone();
        self.call(move |b| b.registry.add(conn, max_per_user))
            .await?
    }

    async fn unregister(&self, connection_id: &str, _user: &str) {
        let id = connection_id.to_owned();
        let _ = self.call(move |b| b.registry.remove(&id)).await;
    }

    async fn user_connections(&self, user: &str) -> BrokerResult<u64> {
        let user = user.to_owned();
        self.call(move |b| b.registry.of_user(&user)).await
    }

    async fn disconnect_user(&self, user: &str) -> BrokerResult<u64> {
        let user = user.to_owned();
        self.call(move |b| {
            let n = b.registry.of_user(&user);
            b.hubs.send(Envelope::kick(user));
            n
        })
        .await
    }

    async fn stats(&self) -> BrokerResult<BrokerStats> {
        self.call(|b| BrokerStats {
            rooms: b.presence.rooms() as u64,
            local_rooms: b.presence.rooms() as u64,
            users: b.registry.per_user.len() as u64,
            connections: b.registry.connections.len() as u64,
            instances: 1,
        })
        .await
    }
}
