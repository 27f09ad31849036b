//! Presence in Redis: `{prefix}:presence:{room}` (user → member
//! connections) and `{prefix}:conn_rooms:{id}`, changed together by one
//! script that also announces `joined` / `left` on the room channel.

use std::collections::HashMap;

use async_trait::async_trait;
use redis::AsyncCommands;

use super::RedisBroker;
use crate::broker::{BrokerResult, Presence};
use crate::protocol::{PresenceEntry, RoomName};

impl RedisBroker {
    /// Runs `presence_join.lua` or `presence_leave.lua` for one connection;
    /// a failure leaves it to the next reconcile.
    async fn presence_script(
        &self,
        join: bool,
        room: &RoomName,
        user: &str,
        conn: &str,
    ) -> BrokerResult<()> {
        let call = self.presence_call(join, room, user, conn);
        let result: BrokerResult<i64> =
            self.cmd.run_script(call.script, call.keys, call.args).await;
        if result.is_err() {
            self.want_reconcile();
        }
        result.map(|_| ())
    }
}

#[async_trait]
impl Presence for RedisBroker {
    async fn join(&self, room: &RoomName, user: &str, connection_id: &str) -> BrokerResult<()> {
        self.update_local(|local| {
            let rooms = local.rooms.entry(connection_id.to_owned()).or_default();
            rooms.insert(room.clone());
        });
        self.presence_script(true, room, user, connection_id).await
    }

    async fn leave(&self, room: &RoomName, user: &str, connection_id: &str) -> BrokerResult<()> {
        self.update_local(|local| {
            if let Some(rooms) = local.rooms.get_mut(connection_id) {
                rooms.remove(room);
            }
        });
        self.presence_script(false, room, user, connection_id).await
    }

    async fn list(&self, room: &RoomName) -> BrokerResult<Vec<PresenceEntry>> {
        let key = self.keys.presence(room);
        let members: HashMap<String, i64> = self
            .cmd
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
}
