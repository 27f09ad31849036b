//! Connections for commands, in each deployment: one deadpool-redis pool
//! per [`Redis`](super::Redis) handle — a standalone server's, a
//! Sentinel-managed primary's (a new connection asks the sentinels where
//! the primary is now) or a Redis Cluster's (redis-rs discovers the
//! topology from the seed nodes and follows its changes) — and the
//! connection type they all hand out, [`Conn`].
//!
//! Connections are multiplexed: a handful are checked out of the pool and
//! shared by every caller on a lane ([`Lanes`]), since a checkout costs a
//! round trip. A shared connection that failed is taken out of the pool
//! for good (not returned to it): a demoted primary still answers the
//! pool's `PING`, and only a new connection finds the new one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use deadpool_redis::Runtime;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use super::error::{RedisError, RedisResult};
use crate::config::{RedisConfig, RedisMode};

/// A command connection of any deployment.
#[derive(Clone)]
pub enum Conn {
    /// A standalone server or a Sentinel-managed primary.
    Single(MultiplexedConnection),
    /// A Redis Cluster (routed by key slot).
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// A connection checked out of a pool.
pub enum Pooled {
    Single(deadpool_redis::Connection),
    Sentinel(deadpool_redis::sentinel::Connection),
    Cluster(deadpool_redis::cluster::Connection),
}

impl Pooled {
    /// A handle on it that can be shared.
    pub fn conn(&self) -> Conn {
        match self {
            Pooled::Single(c) => Conn::Single((**c).clone()),
            Pooled::Sentinel(c) => Conn::Single((**c).clone()),
            Pooled::Cluster(c) => Conn::Cluster((**c).clone()),
        }
    }

    /// Takes it out of the pool for good (it failed).
    pub fn discard(self) {
        match self {
            Pooled::Single(c) => drop(deadpool_redis::Connection::take(c)),
            Pooled::Sentinel(c) => drop(deadpool_redis::sentinel::Connection::take(c)),
            Pooled::Cluster(c) => drop(deadpool_redis::cluster::Connection::take(c)),
        }
    }
}

/// One deadpool-redis pool, of the configured deployment, and how long a
/// command may wait for its answer (`redis.timeout_s`: redis-rs's own
/// default, 500 ms, would take a short stall for a failure).
pub struct Pool {
    kind: PoolKind,
    response_timeout: Duration,
}

enum PoolKind {
    Single(deadpool_redis::Pool),
    Sentinel(deadpool_redis::sentinel::Pool),
    Cluster(deadpool_redis::cluster::Pool),
}

impl Pool {
    pub fn new(config: &RedisConfig) -> Result<Pool, String> {
        let timeout = Duration::from_secs(config.timeout_s);
        let pool_config = deadpool_redis::PoolConfig {
            max_size: config.pool_size,
            timeouts: deadpool_redis::Timeouts {
                wait: Some(timeout),
                create: Some(timeout),
                recycle: Some(timeout),
            },
            ..Default::default()
        };
        let urls = config.urls();
        let runtime = Some(Runtime::Tokio1);
        let kind = match config.mode {
            RedisMode::Standalone => {
                let url = urls.first().cloned().unwrap_or_default();
                let mut cfg = deadpool_redis::Config::from_url(url);
                cfg.pool = Some(pool_config);
                cfg.create_pool(runtime)
                    .map(PoolKind::Single)
                    .map_err(|e| e.to_string())
            }
            RedisMode::Sentinel => {
                let mut cfg = deadpool_redis::sentinel::Config::from_urls(
                    urls,
                    config.sentinel_master.clone(),
                    deadpool_redis::sentinel::SentinelServerType::Master,
                );
                cfg.pool = Some(pool_config);
                cfg.create_pool(runtime)
                    .map(PoolKind::Sentinel)
                    .map_err(|e| e.to_string())
            }
            RedisMode::Cluster => {
                let mut cfg = deadpool_redis::cluster::Config::from_urls(urls);
                cfg.pool = Some(pool_config);
                cfg.create_pool(runtime)
                    .map(PoolKind::Cluster)
                    .map_err(|e| e.to_string())
            }
        }?;
        Ok(Pool {
            kind,
            response_timeout: timeout,
        })
    }

    /// A connection of its own (a blocking command would hold up every
    /// caller of a shared one); back in the pool when dropped.
    pub async fn get(&self) -> RedisResult<Pooled> {
        let unavailable = |e: String| RedisError::Unavailable(format!("redis pool: {e}"));
        let timeout = self.response_timeout;
        match &self.kind {
            PoolKind::Single(p) => {
                let mut c = p.get().await.map_err(|e| unavailable(e.to_string()))?;
                c.set_response_timeout(timeout);
                Ok(Pooled::Single(c))
            }
            PoolKind::Sentinel(p) => {
                let mut c = p.get().await.map_err(|e| unavailable(e.to_string()))?;
                c.set_response_timeout(timeout);
                Ok(Pooled::Sentinel(c))
            }
            // A cluster connection has no response time-out of its own.
            PoolKind::Cluster(p) => p
                .get()
                .await
                .map(Pooled::Cluster)
                .map_err(|e| unavailable(e.to_string())),
        }
    }
}

/// How many connections are kept checked out and shared.
const LANES: usize = 8;

static NEXT_LANE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// The lane this thread uses: threads keep to their own, mostly.
    static LANE: usize = NEXT_LANE.fetch_add(1, Ordering::Relaxed) % LANES;
}

/// Connections held out of the pool and shared, one per lane.
pub struct Lanes {
    held: Vec<Mutex<Option<(Pooled, Conn)>>>,
}

impl Default for Lanes {
    fn default() -> Lanes {
        Lanes {
            held: (0..LANES).map(|_| Mutex::new(None)).collect(),
        }
    }
}

impl Lanes {
    /// This thread's shared connection (checked out of `pool` once).
    pub async fn get(&self, pool: &Pool) -> RedisResult<(usize, Conn)> {
        let lane = LANE.with(|l| *l);
        let held = self.held[lane]
            .lock()
            .ok()
            .and_then(|h| h.as_ref().map(|(_, conn)| conn.clone()));
        if let Some(conn) = held {
            return Ok((lane, conn));
        }
        let pooled = pool.get().await?;
        let conn = pooled.conn();
        if let Ok(mut slot) = self.held[lane].lock() {
            if slot.is_none() {
                *slot = Some((pooled, conn.clone()));
            }
        }
        Ok((lane, conn))
    }

    /// A lane's connection failed: the next call makes a new one.
    pub fn discard(&self, lane: usize) {
        let failed = self.held[lane].lock().ok().and_then(|mut slot| slot.take());
        if let Some((pooled, _)) = failed {
            pooled.discard();
        }
    }
}
