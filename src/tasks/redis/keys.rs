//! The task queue's Redis keys, every one in one place. They all carry the
//! hash tag `{tasks}`, so that every script touches keys of one Redis
//! Cluster slot (the queue is one stream anyway); the channel that tells a
//! user about its tasks is the broker's user channel.
//!
//! | key | kind | content |
//! |---|---|---|
//! | `{prefix}:{tasks}:queue` | stream, group `workers` | one entry per task to run: `task_id`, `name`, `user`, `payload` (JSON) |
//! | `{prefix}:{tasks}:task:{id}` | hash | the record: `task_id`, `name`, `user`, `status`, `attempts`, `progress`, `result` (JSON), `error`, `created_at`, `updated_at` (ms), `payload` (until the task ends) |
//! | `{prefix}:{tasks}:pending:{user}` | sorted set | the user's tasks not ended (the cap): score `+inf` once enqueued, the deadline of a provisional submission before |
//! | `{prefix}:{tasks}:idem:{n}:{user}:{key}` | string | the task an idempotency key named first (`n`: the user id's length in bytes, so users and keys cannot alias) |
//! | `{prefix}:{tasks}:kept:{user}` | sorted set | the user's ended tasks' records: `{bytes}:{id}` → when it ended |
//! | `{prefix}:{tasks}:kept_bytes:{user}` | string | their bytes in all |
//! | `{prefix}:{tasks}:dead` | stream | failed tasks: `task_id`, `name`, `user`, `payload`, `error`, `attempts` |

use crate::broker::redis::keys::Keys;

/// The consumer group every worker belongs to.
pub const GROUP: &str = "workers";

#[derive(Debug, Clone)]
pub struct TaskKeys {
    /// `{prefix}:{tasks}`.
    base: String,
    channels: Keys,
}

impl TaskKeys {
    pub fn new(prefix: &str) -> TaskKeys {
        TaskKeys {
            base: format!("{prefix}:{{tasks}}"),
            channels: Keys::new(prefix),
        }
    }

    pub fn queue(&self) -> String {
        format!("{}:queue", self.base)
    }

    pub fn dead(&self) -> String {
        format!("{}:dead", self.base)
    }

    pub fn record(&self, task_id: &str) -> String {
        format!("{}:task:{task_id}", self.base)
    }

    pub fn pending(&self, user: &str) -> String {
        format!("{}:pending:{user}", self.base)
    }

    /// The user id goes in with its length: user `a` with key `b:c` and
    /// user `a:b` with key `c` are two keys.
    pub fn idempotency(&self, user: &str, key: &str) -> String {
        format!("{}:idem:{}:{user}:{key}", self.base, user.len())
    }

    pub fn kept(&self, user: &str) -> String {
        format!("{}:kept:{user}", self.base)
    }

    pub fn kept_bytes(&self, user: &str) -> String {
        format!("{}:kept_bytes:{user}", self.base)
    }

    /// Where a user's task updates go (the broker's user channel).
    pub fn user_channel(&self, user: &str) -> String {
        self.channels.user_channel(user)
    }

    /// `redis.prefix`.
    pub fn prefix(&self) -> &str {
        self.channels.prefix()
    }
}

#[cfg(test)]
mod tests {
    use super::TaskKeys;

    #[test]
    fn users_and_idempotency_keys_cannot_alias() {
        let keys = TaskKeys::new("sb");
        assert_ne!(keys.idempotency("a", "b:c"), keys.idempotency("a:b", "c"));
        assert_eq!(keys.queue(), "sb:{tasks}:queue");
        assert_eq!(keys.record("t1"), "sb:{tasks}:task:t1");
    }
}
