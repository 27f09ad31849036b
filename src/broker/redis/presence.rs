//! Presence in Redis: a room's members (`sb:members:{R}`, connection →
//! user) and presence (`sb:presence:{R}`, user → member connections),
//! changed together by one script that also announces `joined` / `left` on
//! the room's channel; and each connection's rooms under its instance's tag
//! (`sb:conn_rooms:{I}:{C}`), so that whoever cleans up after it knows
//! which rooms to leave.
//!
//! A join records the room under the instance first, then in the room; a
//! leave removes it from the room first, then from the instance. Both
//! steps are idempotent, so a change cut short is finished by the next
//! reconcile or by the reaper.

use std::collections::HashMap;

use async_trait::async_trait;
use redis::AsyncCommands;

use super::RedisBroker;
use crate::broker::{BrokerResult, Presence};
use crate::protocol::{presence_change_frame, PresenceEntry, RoomName};
use crate::redis::ScriptCall;

impl RedisBroker {
    /// A `presence_join.lua` / `presence_leave.lua` call.
    pub(super) fn presence_call(
        &self,
        join: bool,
        room: &RoomName,
        user: &str,
        conn: &str,
    ) -> ScriptCall<'_> {
        let scripts = &self.redis.scripts;
        let keys = vec![
            self.keys.members(room),
            self.keys.presence(room),
            self.keys.room_channel(room),
        ];
        let publish = self.redis.publish_command().to_owned();
        if join {
            let frame = presence_change_frame(true, room.as_str(), user).to_string();
            ScriptCall {
                script: &scripts.presence_join,
                keys,
                args: vec![conn.to_owned(), user.to_owned(), frame, publish],
            }
        } else {
            let room_json = serde_json::to_string(room.as_str()).unwrap_or_default();
            let start = format!(r#"{{"type":"left","room":{room_json},"user":"#);
            ScriptCall {
                script: &scripts.presence_leave,
                keys,
                args: vec![conn.to_owned(), start, publish],
            }
        }
    }

    /// Records the membership under the instance, then in the room.
    async fn join_room(&self, room: &RoomName, user: &str, conn: &str) -> BrokerResult<()> {
        let (key, member) = (
            self.keys.conn_rooms(&self.instance_id, conn),
            room.as_str().to_owned(),
        );
        self.redis
            .exec(move |mut c| async move { c.sadd::<_, _, ()>(&key, &member).await })
            .await?;
        let call = self.presence_call(true, room, user, conn);
        let _: i64 = self
            .redis
            .run_script(call.script, call.keys, call.args)
            .await?;
        Ok(())
    }

    /// Ends the membership in the room, then under the instance.
    async fn leave_room(&self, room: &RoomName, user: &str, conn: &str) -> BrokerResult<()> {
        let call = self.presence_call(false, room, user, conn);
        let _: i64 = self
            .redis
            .run_script(call.script, call.keys, call.args)
            .await?;
        let (key, member) = (
            self.keys.conn_rooms(&self.instance_id, conn),
            room.as_str().to_owned(),
        );
        self.redis
            .exec(move |mut c| async move { c.srem::<_, _, ()>(&key, &member).await })
            .await?;
        Ok(())
    }
}

#[async_trait]
impl Presence for RedisBroker {
    async fn join(&self, room: &RoomName, user: &str, connection_id: &str) -> BrokerResult<()> {
        let mut held = false;
        self.update_local(|local| {
            // A connection gone already (its lane ran behind its
            // disconnect) is not written back.
            if local.connections.contains_key(connection_id) {
                held = true;
                local.change_room(connection_id, room, true);
            }
        });
        if !held {
            return Ok(());
        }
        let joined = self.join_room(room, user, connection_id).await;
        if joined.is_err() {
            self.update_local(|local| local.mark_unsure(connection_id, room));
            self.want_reconcile();
        }
        joined
    }

    async fn leave(&self, room: &RoomName, user: &str, connection_id: &str) -> BrokerResult<()> {
        self.update_local(|local| local.change_room(connection_id, room, false));
        let left = self.leave_room(room, user, connection_id).await;
        if left.is_err() {
            self.update_local(|local| local.mark_unsure(connection_id, room));
            self.want_reconcile();
        }
        left
    }

    async fn list(&self, room: &RoomName) -> BrokerResult<Vec<PresenceEntry>> {
        self.check_available()?;
        let key = self.keys.presence(room);
        let members: HashMap<String, i64> = self
            .redis
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
