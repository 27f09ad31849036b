//! The watchdog: on a connection of its own and timers of its own, it
//! probes Redis (`PING`) to decide whether the instance is in outage mode
//! (readiness, refusing connections, local-only delivery), and refreshes
//! the instance's heartbeat. Nothing else runs on it, so neither a busy
//! pool nor a long restore can make a live instance look dead.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;

use super::RedisBroker;
use crate::broker::BrokerResult;
use crate::clock::now_ms;
use crate::metrics::metrics;

/// How often Redis is probed.
const PROBE_EVERY: Duration = Duration::from_millis(500);
/// A probe slower than this failed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Consecutive failed probes that make an outage (one slow reply does not).
const FAILURES_FOR_OUTAGE: u32 = 2;

/// The watchdog's own connection, opened again after a failure.
pub(super) struct Probe {
    client: redis::Client,
    conn: Option<MultiplexedConnection>,
    failures: u32,
}

impl Probe {
    pub(super) fn new(client: redis::Client) -> Probe {
        Probe {
            client,
            conn: None,
            failures: 0,
        }
    }

    async fn connection(&mut self) -> Result<MultiplexedConnection, String> {
        if let Some(conn) = &self.conn {
            return Ok(conn.clone());
        }
        let connect = self.client.get_multiplexed_async_connection();
        let conn = tokio::time::timeout(PROBE_TIMEOUT, connect)
            .await
            .map_err(|_| "connect timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        self.conn = Some(conn.clone());
        Ok(conn)
    }

    /// Runs `cmd` within the probe timeout; a failure drops the connection.
    async fn query<T: redis::FromRedisValue>(
        &mut self,
        cmd: &redis::Pipeline,
    ) -> Result<T, String> {
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

impl RedisBroker {
    /// The first probe, at start: the instance starts up or in outage mode.
    pub(super) async fn first_probe(&self, probe: &mut Probe) {
        let ping = probe.query::<(String,)>(redis::pipe().cmd("PING")).await;
        match ping {
            Ok(_) => {
                self.cmd.health.set(true, "");
            }
            Err(e) => {
                tracing::warn!(error = %e, "redis unreachable at start; serving local traffic until it is");
                self.cmd.health.set(false, &e);
            }
        }
    }

    /// Probes and heartbeats until shutdown.
    pub(super) async fn watchdog(self: Arc<Self>, mut probe: Probe) {
        let ttl = Duration::from_secs(self.instance_ttl_s.max(1));
        let beat_every = (ttl / 6).clamp(Duration::from_millis(200), Duration::from_secs(5));
        let mut probes = tokio::time::interval(PROBE_EVERY);
        let mut beats = tokio::time::interval(beat_every);
        while !self.stopping.load(Ordering::Acquire) {
            tokio::select! {
                _ = probes.tick() => self.probe_once(&mut probe).await,
                _ = beats.tick() => {
                    if self.cmd.available() {
                        self.beat(&mut probe).await;
                    }
                }
            }
        }
    }

    async fn probe_once(&self, probe: &mut Probe) {
        match probe.query::<(String,)>(redis::pipe().cmd("PING")).await {
            Ok(_) => {
                probe.failures = 0;
                if self.cmd.health.set(true, "") {
                    metrics()
                        .redis_reconnects
                        .with_label_values(&["commands"])
                        .inc();
                    tracing::info!("redis reachable again; reconciling this instance's registry");
                    self.want_reconcile();
                }
            }
            Err(e) => {
                probe.failures += 1;
                if probe.failures >= FAILURES_FOR_OUTAGE && self.cmd.health.set(false, &e) {
                    tracing::warn!(error = %e, "redis unreachable; serving local traffic until it is back");
                }
            }
        }
    }

    /// Refreshes `{prefix}:instance:{id}` (expiring after two thirds of
    /// `redis.instance_ttl_s`, so survivors reap a dead instance within the
    /// TTL) and lists the instance in `{prefix}:instances`. A key that had
    /// vanished (Redis restarted empty, or this instance was presumed dead)
    /// asks for a reconcile.
    async fn beat(&self, probe: &mut Probe) {
        let expiry_ms = (self.instance_ttl_s.max(1) * 2000 / 3).max(500);
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(self.keys.instance(&self.instance_id))
            .arg(now_ms())
            .arg("PX")
            .arg(expiry_ms)
            .arg("GET")
            .sadd(self.keys.instances(), &self.instance_id)
            .ignore();
        match probe.query::<(Option<String>,)>(&pipe).await {
            Ok((None,)) => self.want_reconcile(),
            Ok((Some(_),)) => {}
            Err(e) => tracing::debug!(error = %e, "redis heartbeat failed"),
        }
    }

    /// Removes the heartbeat and the `instances` entry (shutdown).
    pub(super) async fn remove_heartbeat(&self) -> BrokerResult<()> {
        let (key, instances, id) = (
            self.keys.instance(&self.instance_id),
            self.keys.instances(),
            self.instance_id.clone(),
        );
        self.cmd
            .exec(move |mut c| async move {
                redis::pipe()
                    .del(&key)
                    .ignore()
                    .srem(&instances, &id)
                    .ignore()
                    .query_async::<()>(&mut c)
                    .await
            })
            .await
    }
}
