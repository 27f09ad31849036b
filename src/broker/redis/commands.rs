//! Redis commands: the deadpool-redis pool, the Lua scripts, one timeout
//! for every command, and the instance's view of whether Redis is
//! reachable (a failed command marks an outage until the maintenance task
//! reaches Redis again).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use deadpool_redis::{Pool, Runtime};
use redis::Script;

use crate::broker::{BrokerError, BrokerResult, StartError};
use crate::config::RedisConfig;

/// Every Redis command gives up after this long (and counts as an outage).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// The Lua scripts of `scripts/`, each one atomic step.
pub struct Scripts {
    pub publish_room: Script,
    pub register: Script,
    pub presence_join: Script,
    pub presence_leave: Script,
    pub drop_connection: Script,
}

impl Scripts {
    fn load() -> Scripts {
        Scripts {
            publish_room: Script::new(include_str!("scripts/publish_room.lua")),
            register: Script::new(include_str!("scripts/register.lua")),
            presence_join: Script::new(include_str!("scripts/presence_join.lua")),
            presence_leave: Script::new(include_str!("scripts/presence_leave.lua")),
            drop_connection: Script::new(include_str!("scripts/drop_connection.lua")),
        }
    }
}

/// The pool and the outage state every part of the Redis broker shares.
pub struct Commands {
    pool: Pool,
    pub scripts: Scripts,
    /// False from a failed command until the maintenance task reaches Redis again.
    ok: AtomicBool,
    last_error: Mutex<String>,
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
            scripts: Scripts::load(),
            ok: AtomicBool::new(true),
            last_error: Mutex::new(String::new()),
        })
    }

    /// Whether Redis answered the last command.
    pub fn available(&self) -> bool {
        self.ok.load(Ordering::Acquire)
    }

    /// Redis answered again (the maintenance task's heartbeat).
    pub fn mark_available(&self) {
        self.ok.store(true, Ordering::Release);
    }

    /// Why Redis is unavailable: the last failure.
    pub fn last_error(&self) -> String {
        self.last_error
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default()
    }

    /// Records a failure as an outage.
    pub fn failed(&self, e: &dyn std::fmt::Display) -> BrokerError {
        if self.ok.swap(false, Ordering::AcqRel) {
            tracing::warn!(error = %e, "redis command failed; serving local traffic until it is back");
        }
        if let Ok(mut last) = self.last_error.lock() {
            *last = e.to_string();
        }
        BrokerError::Unavailable(e.to_string())
    }

    /// Runs `f` on a pooled connection with the command timeout; a failure
    /// or a time-out counts as an outage.
    pub async fn exec<T, F, Fut>(&self, f: F) -> BrokerResult<T>
    where
        F: FnOnce(deadpool_redis::Connection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let conn = match self.pool.get().await {
            Ok(conn) => conn,
            Err(e) => return Err(self.failed(&e)),
        };
        match tokio::time::timeout(COMMAND_TIMEOUT, f(conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(self.failed(&e)),
            Err(_) => Err(self.failed(&"redis command timed out")),
        }
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
}
