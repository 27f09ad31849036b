//! Publishing and history in Redis. A room publish is one script
//! (`publish_room.lua`: `XADD` to the room's history and `PUBLISH` — on a
//! cluster `SPUBLISH` — on its channel, both under the room's hash tag), so
//! id order and delivery order agree; direct and broadcast frames are one
//! `PUBLISH`. A publish is acked with its id only once Redis has it; while
//! Redis is away, or when a command's outcome is unknown, it fails with
//! `unavailable` (nothing is delivered on the side).
//!
//! **Publish keys.** A room publish made with a key (the client's
//! `idempotency_key`, scoped to its user) is stored once: a repeat within
//! [`crate::broker::PUBLISH_KEY_TTL_MS`] answers the first id. On a cluster every publish
//! gets a key of its own too, for [`SERVER_KEY_TTL_MS`]: redis-rs resends a
//! command whose connection dropped, and the script must not run twice.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use bytestring::ByteString;
use redis::AsyncCommands;
use serde_json::value::{to_raw_value, RawValue};
use serde_json::Value;

use super::payload::{broadcast_payload, history_frame};
use super::RedisBroker;
use crate::broker::{
    BrokerError, BrokerResult, History, HistoryEntry, Messages, Publish, PublishDone,
};
use crate::clock::now_ms;
use crate::config::RedisMode;
use crate::protocol::{direct_frame, MessageId, RoomName};

/// How long a publish key of the hub's own lasts (a resend after a lost
/// connection comes within a command's time-out).
pub const SERVER_KEY_TTL_MS: u64 = 30_000;

/// What `XINFO STREAM` says of a room's history, as far as `recovered`
/// needs it: the first id it still holds.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct StreamInfo {
    pub first_id: MessageId,
}

impl StreamInfo {
    fn from_reply(info: &HashMap<String, redis::Value>) -> StreamInfo {
        let first_id = info
            .get("recorded-first-entry-id")
            .and_then(|v| redis::from_redis_value::<String>(v.clone()).ok())
            .and_then(|s| s.parse::<MessageId>().ok())
            .unwrap_or_default();
        StreamInfo { first_id }
    }
}

/// Whether nothing after `since` was lost, given the stream (`None`: it
/// expired or was never written) and how many of at most `limit` entries
/// the read returned.
///
/// The same rule as the memory broker's: anything older than the first
/// retained message may have been trimmed, or lost with an earlier
/// incarnation of the room's history (expired, then written again), so
/// only a `since` at or after the first retained id is recovered. When
/// `since` is exactly the last trimmed id this errs on the safe side.
pub(super) fn recovered(
    since: MessageId,
    stream: Option<StreamInfo>,
    returned: usize,
    limit: usize,
) -> bool {
    stream.is_some_and(|info| since >= info.first_id) && returned < limit
}

/// The first id a stream read after `since` starts at (inclusive); `None`
/// when no id can follow `since`. Redis would refuse an exclusive range
/// from the largest id.
fn first_after(since: MessageId) -> Option<MessageId> {
    if since.seq < u64::MAX {
        Some(MessageId {
            ms: since.ms,
            seq: since.seq + 1,
        })
    } else if since.ms < u64::MAX {
        Some(MessageId {
            ms: since.ms + 1,
            seq: 0,
        })
    } else {
        None
    }
}

pub(super) fn to_raw(data: &Value) -> BrokerResult<Box<RawValue>> {
    to_raw_value(data).map_err(|e| BrokerError::Internal(e.to_string()))
}

/// An id unique across instances, for a direct or broadcast frame (not a
/// room's history: two instances' counters would agree).
fn unique_id() -> String {
    format!("{}-{}", now_ms(), rand::random::<u32>())
}

impl RedisBroker {
    /// Publishes `payload` on `channel` and answers `id`.
    async fn publish_on(
        &self,
        channel: String,
        payload: String,
        id: String,
    ) -> BrokerResult<String> {
        self.check_available()?;
        self.redis.publish(channel, payload).await?;
        Ok(id)
    }

    /// `publish_room.lua`'s keys and arguments. `key`: the client's key,
    /// already scoped ([`client_key`]).
    pub(super) fn publish_room_call(
        &self,
        room: &RoomName,
        from: &str,
        data: &RawValue,
        key: Option<&str>,
    ) -> (Vec<String>, Vec<String>) {
        let mut keys = vec![self.keys.history(room), self.keys.room_channel(room)];
        let key_ttl = match key {
            Some(key) => {
                keys.push(self.keys.publish_key(room, key));
                crate::broker::PUBLISH_KEY_TTL_MS
            }
            None if self.redis.mode() == RedisMode::Cluster => {
                let own = format!("s:{}", uuid::Uuid::new_v4().simple());
                keys.push(self.keys.publish_key(room, &own));
                SERVER_KEY_TTL_MS
            }
            None => 0,
        };
        let args = vec![
            self.history_size.to_string(),
            self.history_ttl_ms.to_string(),
            serde_json::to_string(room.as_str()).unwrap_or_default(),
            serde_json::to_string(from).unwrap_or_default(),
            data.get().to_owned(),
            self.redis.publish_command().to_owned(),
            key_ttl.to_string(),
        ];
        (keys, args)
    }

    /// A direct message: its id, its channel and the frame to publish there.
    pub(super) fn direct_publish(
        &self,
        user: &str,
        from: &str,
        data: &RawValue,
    ) -> (String, String, String) {
        let id = unique_id();
        let frame = direct_frame(&id, from, data, now_ms()).to_string();
        (id, self.keys.user_channel(user), frame)
    }

    /// Up to `limit` entries after `since`, newest first from Redis, then
    /// oldest first: "the latest ones".
    async fn read_history(
        &self,
        room: &RoomName,
        since: Option<MessageId>,
        limit: usize,
    ) -> BrokerResult<Vec<HistoryEntry>> {
        let key = self.keys.history(room);
        let start = match since.map(first_after) {
            None => "-".to_owned(),
            Some(Some(first)) => first.to_string(),
            Some(None) => return Ok(Vec::new()),
        };
        let reply: redis::streams::StreamRangeReply = self
            .redis
            .exec(move |mut c| async move { c.xrevrange_count(&key, "+", &start, limit).await })
            .await?;
        let mut messages = Vec::with_capacity(reply.ids.len());
        for entry in reply.ids.into_iter().rev() {
            let Ok(id) = entry.id.parse::<MessageId>() else {
                continue;
            };
            let body = entry
                .map
                .get("b")
                .and_then(|v| redis::from_redis_value::<String>(v.clone()).ok());
            if let Some(frame) = body.and_then(|b| history_frame(id, &b)) {
                messages.push(HistoryEntry { id, frame });
            }
        }
        Ok(messages)
    }

    /// `XINFO STREAM` of the room's history; `None` when there is none.
    async fn stream_info(&self, room: &RoomName) -> BrokerResult<Option<StreamInfo>> {
        let key = self.keys.history(room);
        // A missing stream is an error reply, not an outage: keep it inside.
        let reply: redis::RedisResult<HashMap<String, redis::Value>> = self
            .redis
            .exec(move |mut c| async move {
                Ok(redis::cmd("XINFO")
                    .arg("STREAM")
                    .arg(&key)
                    .query_async(&mut c)
                    .await)
            })
            .await?;
        Ok(reply.ok().map(|info| StreamInfo::from_reply(&info)))
    }
}

#[async_trait]
impl Messages for RedisBroker {
    fn start_publish(self: Arc<Self>, publish: Publish, done: PublishDone) {
        self.enqueue_publish(publish, done);
    }

    async fn publish_room(
        &self,
        room: &RoomName,
        from: &str,
        data: &Value,
        key: Option<&str>,
    ) -> BrokerResult<MessageId> {
        self.check_available()?;
        let raw = to_raw(data)?;
        let key = key.map(|k| crate::broker::publish_key(from, k));
        let (keys, args) = self.publish_room_call(room, from, &raw, key.as_deref());
        let id: String = self
            .redis
            .run_script_durable(&self.redis.scripts.publish_room, keys, args)
            .await?;
        id.parse()
            .map_err(|e: crate::protocol::InvalidMessageId| BrokerError::Internal(e.to_string()))
    }

    async fn publish_user(&self, user: &str, from: &str, data: &Value) -> BrokerResult<String> {
        let (id, channel, frame) = self.direct_publish(user, from, &to_raw(data)?);
        self.publish_on(channel, frame, id).await
    }

    async fn broadcast(&self, data: &Value) -> BrokerResult<String> {
        let raw = to_raw(data)?;
        let id = unique_id();
        let payload = broadcast_payload(&id, &raw, now_ms());
        self.publish_on(self.keys.broadcast_channel(), payload, id)
            .await
    }

    async fn send_frame(&self, user: &str, frame: ByteString) -> BrokerResult<()> {
        let payload = frame.to_string();
        self.publish_on(self.keys.user_channel(user), payload, String::new())
            .await
            .map(|_| ())
    }

    async fn history(
        &self,
        room: &RoomName,
        since: Option<MessageId>,
        limit: usize,
    ) -> BrokerResult<History> {
        let limit = limit.min(i64::MAX as usize);
        let messages = self.read_history(room, since, limit).await?;
        let recovered = match since {
            None => true,
            Some(since) => {
                let stream = self.stream_info(room).await?;
                recovered(since, stream, messages.len(), limit)
            }
        };
        Ok(History {
            messages,
            recovered,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ms: u64, seq: u64) -> MessageId {
        MessageId { ms, seq }
    }

    fn stream(first: MessageId) -> Option<StreamInfo> {
        Some(StreamInfo { first_id: first })
    }

    #[test]
    fn a_since_at_or_after_the_first_retained_id_recovers() {
        let s = stream(id(50, 0));
        assert!(recovered(id(50, 0), s, 99, usize::MAX));
        assert!(recovered(id(70, 3), s, 10, usize::MAX));
        assert!(!recovered(id(49, 9), s, 100, usize::MAX));
    }

    #[test]
    fn no_stream_or_a_full_page_is_not_recovered() {
        assert!(!recovered(id(1, 0), None, 0, usize::MAX));
        assert!(!recovered(id(3, 0), stream(id(2, 0)), 2, 2));
    }

    #[test]
    fn reads_start_after_since_without_overflow() {
        assert_eq!(first_after(id(5, 1)), Some(id(5, 2)));
        assert_eq!(first_after(id(5, u64::MAX)), Some(id(6, 0)));
        assert_eq!(first_after(id(u64::MAX, u64::MAX)), None);
    }

    #[test]
    fn xinfo_fields_are_read_by_name() {
        let info: HashMap<String, redis::Value> = [
            ("length", redis::Value::Int(4)),
            (
                "recorded-first-entry-id",
                redis::Value::BulkString(b"10-2".to_vec()),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let s = StreamInfo::from_reply(&info);
        assert_eq!(s.first_id, id(10, 2));
    }
}
