//! The watchdog's own connection (never the pool's, so neither a busy pool
//! nor a long restore can make a live Redis look dead): `PING` to decide
//! whether the instance is in outage mode, and the instance's heartbeat.
//! In sentinel mode every new connection asks the sentinels where the
//! primary is now; in cluster mode it is a cluster connection of its own.

use std::time::Duration;

use redis::cluster::ClusterClient;
use redis::sentinel::{SentinelClient, SentinelServerType};

use super::conn::Conn;
use crate::config::{RedisConfig, RedisMode};

/// A probe slower than this failed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A client for the single server (standalone) or the current primary
/// (sentinel): what a connection of its own is opened from.
pub async fn single_client(config: &RedisConfig) -> redis::RedisResult<redis::Client> {
    let urls = config.urls();
    match config.mode {
        RedisMode::Sentinel => {
            let mut sentinel = SentinelClient::build(
                urls,
                config.sentinel_master.clone(),
                None,
                SentinelServerType::Master,
            )?;
            sentinel.async_get_client().await
        }
        _ => redis::Client::open(urls.first().cloned().unwrap_or_default()),
    }
}

/// A connection of its own, of the configured deployment.
pub async fn connect(config: &RedisConfig) -> redis::RedisResult<Conn> {
    match config.mode {
        RedisMode::Cluster => {
            let client = ClusterClient::new(config.urls())?;
            Ok(Conn::Cluster(client.get_async_connection().await?))
        }
        _ => {
            let client = single_client(config).await?;
            let mut conn = client.get_multiplexed_async_connection().await?;
            conn.set_response_timeout(PROBE_TIMEOUT);
            Ok(Conn::Single(conn))
        }
    }
}

/// The watchdog's connection, opened again after a failure.
pub struct Probe {
    config: RedisConfig,
    conn: Option<Conn>,
    /// Consecutive failed probes.
    pub failures: u32,
}

impl Probe {
    pub fn new(config: &RedisConfig) -> Probe {
        Probe {
            config: config.clone(),
            conn: None,
            failures: 0,
        }
    }

    async fn connection(&mut self) -> Result<Conn, String> {
        if let Some(conn) = &self.conn {
            return Ok(conn.clone());
        }
        let conn = tokio::time::timeout(PROBE_TIMEOUT, connect(&self.config))
            .await
            .map_err(|_| "connect timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        self.conn = Some(conn.clone());
        Ok(conn)
    }

    /// Runs `cmd` within the probe timeout; a failure drops the connection.
    pub async fn query<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> Result<T, String> {
        let mut conn = self.connection().await?;
        let result = match tokio::time::timeout(PROBE_TIMEOUT, cmd.query_async(&mut conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".to_owned()),
        };
        if result.is_err() {
            self.conn = None;
        }
        result
    }
}
