//! The Redis layer: connections in each deployment, commands and scripts
//! with one time-out, the pub/sub connection, every key, and what can go
//! wrong. The Redis broker ([`crate::broker::redis`]) and the task queue
//! ([`crate::tasks::redis`]) are built on it and nothing else touches Redis.
//!
//! - [`conn`]: deadpool-redis pools for a standalone server, a
//!   Sentinel-managed primary and a Redis Cluster (`redis.mode`), behind
//!   one connection type.
//! - [`keys`]: every key and channel, with the hash tags that keep what one
//!   script touches in one cluster slot.
//! - [`scripts`]: every Lua script.
//! - [`pubsub`]: the pub/sub connection (`SUBSCRIBE` on one server,
//!   sharded `SSUBSCRIBE` on a cluster) as a stream of events.
//! - [`probe`]: the watchdog's own connection.
//! - [`error`]: [`RedisError`], unavailable or a reply.
//!
//! Every command gives up after `redis.timeout_s`: a Redis that is slow or
//! paused for less is waited for. In cluster mode a pipeline or a batch of
//! script calls is split by slot, each part sent to its node.

pub mod conn;
pub mod error;
pub mod keys;
pub mod probe;
pub mod pubsub;
pub mod scripts;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use redis::cluster_routing::Slot;
use redis::Value;

pub use self::conn::Conn;
use self::conn::{Lanes, Pool, Pooled};
pub use self::error::{classify, RedisError, RedisResult};
use self::scripts::{Lua, Scripts};
use crate::config::{RedisConfig, RedisMode};

/// One script call in a batch.
pub struct ScriptCall<'a> {
    pub script: &'a Lua,
    pub keys: Vec<String>,
    pub args: Vec<String>,
}

/// Whether Redis is reachable, as the watchdog last saw it.
#[derive(Default)]
pub struct Health {
    up: AtomicBool,
    reason: Mutex<String>,
}

impl Health {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Records the probe's result; true when the state changed.
    pub fn set(&self, up: bool, reason: &str) -> bool {
        if let Ok(mut r) = self.reason.lock() {
            reason.clone_into(&mut r);
        }
        self.up.swap(up, Ordering::AcqRel) != up
    }

    /// Why Redis is down (for logs; never shown to clients).
    pub fn reason(&self) -> String {
        self.reason.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

/// A handle on one Redis deployment: its pool, scripts and health.
pub struct Redis {
    config: RedisConfig,
    pool: Pool,
    lanes: Lanes,
    pub scripts: Scripts,
    pub health: Health,
}

impl Redis {
    /// The pool of the configured deployment (nothing is connected yet).
    pub fn new(config: &RedisConfig) -> Result<Redis, String> {
        Ok(Redis {
            config: config.clone(),
            pool: Pool::new(config)?,
            lanes: Lanes::default(),
            scripts: Scripts::load(),
            health: Health::default(),
        })
    }

    pub fn config(&self) -> &RedisConfig {
        &self.config
    }

    pub fn mode(&self) -> RedisMode {
        self.config.mode
    }

    /// How long a command may take.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.config.timeout_s)
    }

    /// `SPUBLISH` on a cluster (sharded pub/sub), `PUBLISH` elsewhere.
    pub fn publish_command(&self) -> &'static str {
        match self.config.mode {
            RedisMode::Cluster => "SPUBLISH",
            _ => "PUBLISH",
        }
    }

    /// `WAIT` for `redis.wait_replicas` replicas with half the command
    /// timeout, when set: appended to a pipeline of writes that must
    /// survive the primary's crash before they are acked.
    pub fn wait_command(&self) -> Option<redis::Cmd> {
        if self.config.wait_replicas == 0 {
            return None;
        }
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(self.config.wait_replicas)
            .arg((self.config.timeout_s * 1000 / 2).max(1));
        Some(cmd)
    }

    /// Checks `WAIT`'s reply: fewer replicas than asked is unavailable
    /// (the write is on the primary but may not outlive it).
    pub fn check_wait(&self, reply: &Value) -> RedisResult<()> {
        match reply {
            Value::Int(n) if *n >= i64::from(self.config.wait_replicas) => Ok(()),
            Value::Int(n) => Err(RedisError::Unavailable(format!(
                "written on the primary, {n} of {} replicas acknowledged",
                self.config.wait_replicas
            ))),
            Value::ServerError(e) => Err(classify(&redis::RedisError::from(e.clone()))),
            other => Err(RedisError::Reply(format!("WAIT answered {other:?}"))),
        }
    }

    /// Runs a script like [`Redis::run_script`], then, with
    /// `redis.wait_replicas`, waits for the replicas in the same round
    /// trip: the result is returned only once the write is replicated.
    pub async fn run_script_durable<T: redis::FromRedisValue>(
        &self,
        script: &Lua,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> RedisResult<T> {
        let Some(wait) = self.wait_command() else {
            return self.run_script(script, keys, args).await;
        };
        for load in [false, true] {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            if load {
                pipe.cmd("SCRIPT").arg("LOAD").arg(script.source()).ignore();
            }
            pipe.cmd("EVALSHA")
                .arg(script.get_hash())
                .arg(keys.len())
                .arg(&keys)
                .arg(&args);
            pipe.add_command(wait.clone());
            let replies = self.pipelines(vec![pipe]).await?.pop().unwrap_or_default();
            let [reply, waited]: [Value; 2] = replies
                .try_into()
                .map_err(|r: Vec<Value>| RedisError::Reply(format!("{} replies to 2", r.len())))?;
            match reply {
                Value::ServerError(e) if e.code() == "NOSCRIPT" && !load => continue,
                Value::ServerError(e) => return Err(classify(&redis::RedisError::from(e))),
                reply => {
                    self.check_wait(&waited)?;
                    return redis::from_redis_value(reply)
                        .map_err(|e| RedisError::Reply(e.to_string()));
                }
            }
        }
        Err(RedisError::Reply(format!(
            "{} missing after SCRIPT LOAD",
            script.get_hash()
        )))
    }

    /// Whether the watchdog last found Redis reachable.
    pub fn available(&self) -> bool {
        self.health.is_up()
    }

    /// A connection of its own, for a blocking command.
    pub async fn dedicated(&self) -> RedisResult<Pooled> {
        self.pool.get().await
    }

    /// Runs `f` on this thread's shared connection within `limit`; a
    /// connection that failed or timed out is replaced for the next call.
    pub async fn exec_within<T, F, Fut>(&self, limit: Duration, f: F) -> RedisResult<T>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        self.exec_checked(limit, f, |_| false).await
    }

    /// Runs a pipeline within `limit`. Its error replies are returned
    /// (the pipeline ignores errors), but one saying the server no longer
    /// takes writes (`READONLY`: a primary demoted behind the same name)
    /// drops the connection, so the next command connects afresh.
    async fn exec_pipeline(
        &self,
        limit: Duration,
        pipe: redis::Pipeline,
    ) -> RedisResult<Vec<Value>> {
        self.exec_checked(
            limit,
            move |mut c| async move { pipe.query_async::<Vec<Value>>(&mut c).await },
            |replies: &Vec<Value>| {
                replies
                    .iter()
                    .any(|r| matches!(r, Value::ServerError(e) if e.code() == "READONLY"))
            },
        )
        .await
    }

    async fn exec_checked<T, F, Fut>(
        &self,
        limit: Duration,
        f: F,
        stale: impl FnOnce(&T) -> bool,
    ) -> RedisResult<T>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let mut used = None;
        let work = async {
            let (lane, conn) = self.lanes.get(&self.pool).await?;
            used = Some(lane);
            f(conn).await.map_err(|e| classify(&e))
        };
        let result = match tokio::time::timeout(limit, work).await {
            Ok(result) => result,
            Err(_) => Err(RedisError::Unavailable("redis command timed out".into())),
        };
        let discard = match &result {
            Err(RedisError::Unavailable(_)) => true,
            Ok(value) => stale(value),
            Err(RedisError::Reply(_)) => false,
        };
        if let (true, Some(lane)) = (discard, used) {
            self.lanes.discard(lane);
        }
        result
    }

    /// Runs `f` on a shared connection with the command timeout.
    pub async fn exec<T, F, Fut>(&self, f: F) -> RedisResult<T>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        self.exec_within(self.timeout(), f).await
    }

    /// Publishes on a channel (`PUBLISH`, or `SPUBLISH` on a cluster).
    pub async fn publish(&self, channel: String, payload: String) -> RedisResult<i64> {
        let command = self.publish_command();
        self.exec(move |mut c| async move {
            redis::cmd(command)
                .arg(&channel)
                .arg(payload)
                .query_async(&mut c)
                .await
        })
        .await
    }

    /// Runs one of the scripts (string arguments) with the command timeout.
    pub async fn run_script<T: redis::FromRedisValue>(
        &self,
        script: &Lua,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> RedisResult<T> {
        self.exec(move |mut c| async move {
            let mut invocation = script.prepare_invoke();
            for key in &keys {
                invocation.key(key);
            }
            for arg in &args {
                invocation.arg(arg);
            }
            invocation.invoke_async(&mut c).await
        })
        .await
    }

    /// Runs many script calls, one round trip per slot (one in all on a
    /// single server; the scripts loaded first in the same pipeline); one
    /// reply per call, in order, error replies included.
    pub async fn run_scripts(&self, calls: &[ScriptCall<'_>]) -> RedisResult<Vec<Value>> {
        if calls.is_empty() {
            return Ok(Vec::new());
        }
        let groups = self.by_slot(calls.iter().map(|c| c.keys.first().map(String::as_str)));
        let parts = groups.into_iter().map(|indices| {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            let mut loaded: Vec<&str> = Vec::new();
            for &i in &indices {
                let script = calls[i].script;
                if !loaded.contains(&script.get_hash()) {
                    loaded.push(script.get_hash());
                    pipe.cmd("SCRIPT").arg("LOAD").arg(script.source()).ignore();
                }
            }
            for &i in &indices {
                let call = &calls[i];
                pipe.cmd("EVALSHA")
                    .arg(call.script.get_hash())
                    .arg(call.keys.len())
                    .arg(&call.keys)
                    .arg(&call.args);
            }
            let limit = self.timeout() * 2;
            async move {
                let replies = self.exec_pipeline(limit, pipe).await?;
                if replies.len() != indices.len() {
                    return Err(RedisError::Reply(format!(
                        "{} replies to {} script calls",
                        replies.len(),
                        indices.len()
                    )));
                }
                Ok::<_, RedisError>(indices.into_iter().zip(replies).collect::<Vec<_>>())
            }
        });
        let mut replies: Vec<Option<Value>> = vec![None; calls.len()];
        for part in futures_util::future::join_all(parts).await {
            for (i, reply) in part? {
                replies[i] = Some(reply);
            }
        }
        Ok(replies
            .into_iter()
            .map(|r| r.unwrap_or(Value::Nil))
            .collect())
    }

    /// Sends the pipelines, all at once (on a multiplexed connection they
    /// share the round trip), each to its slot's node on a cluster; their
    /// replies in order. Each pipeline's commands must share a slot.
    pub async fn pipelines(&self, pipes: Vec<redis::Pipeline>) -> RedisResult<Vec<Vec<Value>>> {
        let parts = pipes
            .into_iter()
            .map(|pipe| self.exec_pipeline(self.timeout(), pipe));
        futures_util::future::join_all(parts)
            .await
            .into_iter()
            .collect()
    }

    /// `items` grouped by the cluster slot of their key (one group when
    /// not a cluster), in order within each group.
    pub fn group<T, K: AsRef<[u8]>>(&self, items: impl Iterator<Item = (T, K)>) -> Vec<Vec<T>> {
        if self.mode() != RedisMode::Cluster {
            let all: Vec<T> = items.map(|(item, _)| item).collect();
            return if all.is_empty() {
                Vec::new()
            } else {
                vec![all]
            };
        }
        group_by_slot(items)
    }

    /// The indices of `keys`, grouped by cluster slot (one group when not
    /// a cluster), in order within each group.
    fn by_slot<'a>(&self, keys: impl Iterator<Item = Option<&'a str>>) -> Vec<Vec<usize>> {
        self.group(keys.enumerate().map(|(i, key)| (i, key.unwrap_or(""))))
    }
}

/// Items grouped by the cluster slot of their key, in order within each
/// group.
pub fn group_by_slot<T>(items: impl Iterator<Item = (T, impl AsRef<[u8]>)>) -> Vec<Vec<T>> {
    let mut groups: HashMap<Slot, Vec<T>> = HashMap::new();
    for (item, key) in items {
        groups.entry(Slot::for_key(key)).or_default().push(item);
    }
    groups.into_values().collect()
}
