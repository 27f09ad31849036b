//! Housekeeping of the queue: trimming what every worker has acknowledged,
//! and the gauges (tasks waiting, running, dead letters).

use std::collections::HashMap;

use redis::Value as RedisValue;

use super::RedisTasks;
use crate::protocol::MessageId;
use crate::redis::keys::TASK_GROUP as GROUP;
use crate::tasks::{Depth, TaskResult};

impl RedisTasks {
    /// The group's numbers, the oldest pending entry, the dead letters' length.
    async fn group_state(&self) -> TaskResult<(HashMap<String, RedisValue>, Option<String>, u64)> {
        let (queue, dead) = (self.keys.queue(), self.keys.dead());
        let (groups, oldest, dead_len): (Vec<HashMap<String, RedisValue>>, RedisValue, u64) = self
            .redis
            .exec(move |mut c| async move {
                redis::pipe()
                    .cmd("XINFO")
                    .arg("GROUPS")
                    .arg(&queue)
                    .cmd("XPENDING")
                    .arg(&queue)
                    .arg(GROUP)
                    .arg("-")
                    .arg("+")
                    .arg(1)
                    .xlen(&dead)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        let name = |g: &HashMap<String, RedisValue>| {
            g.get("name")
                .and_then(|n| redis::from_redis_value::<String>(n.clone()).ok())
        };
        let group = groups
            .into_iter()
            .find(|g| name(g).as_deref() == Some(GROUP))
            .unwrap_or_default();
        let oldest_pending = match oldest {
            RedisValue::Array(items) => items.into_iter().next().and_then(|first| match first {
                RedisValue::Array(entry) => entry
                    .into_iter()
                    .next()
                    .and_then(|id| redis::from_redis_value::<String>(id).ok()),
                _ => None,
            }),
            _ => None,
        };
        Ok((group, oldest_pending, dead_len))
    }

    /// Trims what every consumer has acknowledged: entries older than the
    /// oldest one pending or, with none pending, up to the last delivered.
    pub(super) async fn trim(&self) -> TaskResult<Depth> {
        let (group, oldest_pending, dead) = self.group_state().await?;
        let int = |k: &str| {
            group
                .get(k)
                .and_then(|v| redis::from_redis_value::<u64>(v.clone()).ok())
        };
        let depth = Depth {
            queued: int("lag").unwrap_or(0),
            running: int("pending").unwrap_or(0),
            dead,
        };
        let last_delivered = group
            .get("last-delivered-id")
            .and_then(|v| redis::from_redis_value::<String>(v.clone()).ok())
            .and_then(|id| id.parse::<MessageId>().ok())
            .filter(|id| *id != MessageId::default());
        let min_id = oldest_pending.or_else(|| {
            last_delivered.map(|id| {
                let next = MessageId {
                    ms: id.ms,
                    seq: id.seq.saturating_add(1),
                };
                next.to_string()
            })
        });
        if let Some(min_id) = min_id {
            let queue = self.keys.queue();
            self.redis
                .exec(move |mut c| async move {
                    redis::cmd("XTRIM")
                        .arg(&queue)
                        .arg("MINID")
                        .arg(&min_id)
                        .query_async::<()>(&mut c)
                        .await
                })
                .await?;
        }
        Ok(depth)
    }
}
