//! Redis commands: the deadpool-redis pool (each thread shares one
//! multiplexed connection taken from it, so commands pipeline instead of
//! paying a checkout each), the Lua scripts, one timeout for every
//! command, and batches of script calls in one round trip.
//!
//! A failed command is that request's failure, never the instance's: an
//! error reply is [`BrokerError::Internal`], a lost connection, an empty
//! pool or a time-out is [`BrokerError::Unavailable`]. Whether Redis is
//! reachable is the watchdog's call ([`Health`], set by
//! `watchdog.rs`), from a probe on its own connection.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use deadpool_redis::{Pool, Runtime};
use redis::aio::MultiplexedConnection;
use redis::{RedisError, Script};

use crate::broker::{BrokerError, BrokerResult, StartError};
use crate::config::RedisConfig;

/// Every Redis command gives up after this long.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// One Lua script: its source (for `SCRIPT LOAD` in pipelines) and the
/// redis-rs handle (EVALSHA, loading it when Redis lost it).
pub struct Lua {
    script: Script,
    source: &'static str,
}

impl Lua {
    pub fn new(source: &'static str) -> Lua {
        Lua {
            script: Script::new(source),
            source,
        }
    }

    /// The script's source, for `SCRIPT LOAD`.
    pub fn source(&self) -> &'static str {
        self.source
    }
}

impl std::ops::Deref for Lua {
    type Target = Script;
    fn deref(&self) -> &Script {
        &self.script
    }
}

/// The Lua scripts of `scripts/`, each one atomic step.
pub struct Scripts {
    pub publish_room: Lua,
    pub register: Lua,
    pub presence_join: Lua,
    pub presence_leave: Lua,
    pub drop_connection: Lua,
}

impl Scripts {
    fn load() -> Scripts {
        Scripts {
            publish_room: Lua::new(include_str!("scripts/publish_room.lua")),
            register: Lua::new(include_str!("scripts/register.lua")),
            presence_join: Lua::new(include_str!("scripts/presence_join.lua")),
            presence_leave: Lua::new(include_str!("scripts/presence_leave.lua")),
            drop_connection: Lua::new(include_str!("scripts/drop_connection.lua")),
        }
    }
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

/// A failed command as a broker error: the connection's failures are
/// `Unavailable`, Redis's error replies `Internal`.
pub fn classify(e: &RedisError) -> BrokerError {
    if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout() {
        BrokerError::Unavailable(e.to_string())
    } else {
        BrokerError::Internal(format!("redis: {e}"))
    }
}

/// One script call in a batch.
pub struct ScriptCall<'a> {
    pub script: &'a Lua,
    pub keys: Vec<String>,
    pub args: Vec<String>,
}

/// Connections kept checked out of the pool and shared (they are
/// multiplexed): a pooled connection is checked on every checkout with an
/// `UNWATCH` + `PING` round trip, which would double every command's cost.
const LANES: usize = 8;

static NEXT_LANE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// The lane this thread uses: threads keep to their own, mostly.
    static LANE: usize = NEXT_LANE.fetch_add(1, Ordering::Relaxed) % LANES;
}

/// A connection held out of the pool for sharing.
struct Held {
    _object: deadpool_redis::Connection,
    mux: MultiplexedConnection,
}

/// The pool and the scripts every part of the Redis broker shares.
pub struct Commands {
    pool: Pool,
    lanes: Vec<Mutex<Option<Held>>>,
    pub scripts: Scripts,
    pub health: Health,
}

impl Commands {
    pub fn new(config: &RedisConfig) -> Result<Commands, StartError> {
        let mut pool_cfg = deadpool_redis::Config::from_url(config.url.clone());
        pool_cfg.pool = Some(deadpool_redis::PoolConfig {
            max_size: config.pool_size,
            timeouts: deadpool_redis::Timeouts {
                wait: Some(COMMAND_TIMEOUT),
                create: Some(COMMAND_TIMEOUT),
                recycle: Some(COMMAND_TIMEOUT),
            },
            ..Default::default()
        });
        let pool = pool_cfg
            .create_pool(Some(Runtime::Tokio1))
            .map_err(|e| StartError::RedisPool(e.to_string()))?;
        Ok(Commands {
            pool,
            lanes: (0..LANES).map(|_| Mutex::new(None)).collect(),
            scripts: Scripts::load(),
            health: Health::default(),
        })
    }

    /// This thread's shared connection (checked out of the pool once).
    async fn shared(&self) -> BrokerResult<(usize, MultiplexedConnection)> {
        let lane = LANE.with(|l| *l);
        let held = self.lanes[lane]
            .lock()
            .ok()
            .and_then(|h| h.as_ref().map(|h| h.mux.clone()));
        if let Some(mux) = held {
            return Ok((lane, mux));
        }
        let object = self
            .pool
            .get()
            .await
            .map_err(|e| BrokerError::Unavailable(format!("redis pool: {e}")))?;
        let mux: MultiplexedConnection = (*object).clone();
        if let Ok(mut slot) = self.lanes[lane].lock() {
            if slot.is_none() {
                *slot = Some(Held {
                    _object: object,
                    mux: mux.clone(),
                });
            }
        }
        Ok((lane, mux))
    }

    /// A connection that failed is not shared any more.
    fn drop_lane(&self, lane: usize) {
        if let Ok(mut slot) = self.lanes[lane].lock() {
            *slot = None;
        }
    }

    /// A connection of its own, for a blocking command (a shared one would
    /// block every other caller): held until dropped, then back in the pool.
    pub async fn dedicated(&self) -> BrokerResult<deadpool_redis::Connection> {
        self.pool
            .get()
            .await
            .map_err(|e| BrokerError::Unavailable(format!("redis pool: {e}")))
    }

    /// Whether the watchdog last found Redis reachable.
    pub fn available(&self) -> bool {
        self.health.is_up()
    }

    /// Runs `f` on this thread's shared connection within `limit`; a
    /// connection that failed or timed out is replaced for the next call.
    pub async fn exec_within<T, F, Fut>(&self, limit: Duration, f: F) -> BrokerResult<T>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let mut used = None;
        let work = async {
            let (lane, conn) = self.shared().await?;
            used = Some(lane);
            f(conn).await.map_err(|e| classify(&e))
        };
        let result = match tokio::time::timeout(limit, work).await {
            Ok(result) => result,
            Err(_) => Err(BrokerError::Unavailable("redis command timed out".into())),
        };
        if let (Err(BrokerError::Unavailable(_)), Some(lane)) = (&result, used) {
            self.drop_lane(lane);
        }
        result
    }

    /// Runs `f` on a shared connection with the command timeout.
    pub async fn exec<T, F, Fut>(&self, f: F) -> BrokerResult<T>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        self.exec_within(COMMAND_TIMEOUT, f).await
    }

    /// Runs one of our Lua scripts (string arguments) with the command timeout.
    pub async fn run_script<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> BrokerResult<T> {
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

    /// Runs many script calls in one round trip (the scripts loaded first
    /// in the same pipeline); one reply per call, error replies included.
    pub async fn run_scripts(&self, calls: &[ScriptCall<'_>]) -> BrokerResult<Vec<redis::Value>> {
        if calls.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let mut loaded: Vec<&str> = Vec::new();
        for call in calls {
            if !loaded.contains(&call.script.get_hash()) {
                loaded.push(call.script.get_hash());
                pipe.cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(call.script.source)
                    .ignore();
            }
        }
        for call in calls {
            pipe.cmd("EVALSHA")
                .arg(call.script.get_hash())
                .arg(call.keys.len())
                .arg(&call.keys)
                .arg(&call.args);
        }
        let limit = COMMAND_TIMEOUT * 2;
        self.exec_within(limit, move |mut c| async move {
            pipe.query_async::<Vec<redis::Value>>(&mut c).await
        })
        .await
    }
}
