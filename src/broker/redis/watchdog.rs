//! The watchdog: on a connection of its own and timers of its own
//! ([`Probe`]), it probes Redis (`PING`) to decide whether the instance is
//! in outage mode (readiness 503, new connections refused, requests
//! answered `unavailable` at once), and refreshes the instance's heartbeat.
//! Nothing else runs on it, so neither a busy pool nor a long reconcile can
//! make a live instance look dead.
//!
//! A stall is not an outage: the instance goes into outage mode only once
//! the probe has failed for `redis.timeout_s` (a Redis paused for less
//! keeps it out), and leaves it at the first probe that succeeds.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::RedisBroker;
use crate::broker::BrokerResult;
use crate::metrics::metrics;
use crate::redis::probe::Probe;

/// How often Redis is probed.
const PROBE_EVERY: Duration = Duration::from_millis(500);

impl RedisBroker {
    /// The first probe, at start: the instance starts up or in outage mode.
    pub(super) async fn first_probe(&self, probe: &mut Probe) {
        match probe.query::<String>(&redis::cmd("PING")).await {
            Ok(_) => {
                self.redis.health.set(true, "");
            }
            Err(e) => {
                tracing::warn!(error = %e, "redis unreachable at start; refusing connections until it is");
                self.redis.health.set(false, &e);
            }
        }
    }

    /// Probes and heartbeats until shutdown.
    pub(super) async fn watchdog(self: Arc<Self>, mut probe: Probe) {
        let ttl = Duration::from_secs(self.instance_ttl_s.max(1));
        let beat_every = (ttl / 6).clamp(Duration::from_millis(200), Duration::from_secs(5));
        let mut probes = tokio::time::interval(PROBE_EVERY);
        let mut beats = tokio::time::interval(beat_every);
        let mut failing_since: Option<Instant> = None;
        while !self.stopping.load(Ordering::Acquire) {
            tokio::select! {
                _ = probes.tick() => self.probe_once(&mut probe, &mut failing_since).await,
                _ = beats.tick() => {
                    if self.redis.available() {
                        self.beat(&mut probe).await;
                    }
                }
            }
        }
    }

    async fn probe_once(&self, probe: &mut Probe, failing_since: &mut Option<Instant>) {
        match probe.query::<String>(&redis::cmd("PING")).await {
            Ok(_) => {
                *failing_since = None;
                if self.redis.health.set(true, "") {
                    metrics()
                        .redis_reconnects
                        .with_label_values(&["commands"])
                        .inc();
                    tracing::info!("redis reachable again; reconciling this instance's registry");
                    self.want_reconcile();
                }
            }
            Err(e) => {
                let since = *failing_since.get_or_insert_with(Instant::now);
                let outage = since.elapsed() >= self.redis.timeout();
                if outage && self.redis.health.set(false, &e) {
                    tracing::warn!(error = %e, "redis unreachable; refusing connections and requests until it is back");
                }
            }
        }
    }

    /// Refreshes `{prefix}:instance:{id}` with this instance's numbers
    /// (expiring after two thirds of `redis.instance_ttl_s`, so survivors
    /// reap a dead instance within the TTL) and lists the instance in
    /// `{prefix}:instances`. A key that had vanished (Redis restarted
    /// empty, a failover lost it, or this instance was presumed dead) asks
    /// for a reconcile; when a survivor is reaping this instance (it
    /// stalled past its TTL), the reconcile waits until the reaper is done,
    /// then writes back everything it dropped.
    async fn beat(&self, probe: &mut Probe) {
        let expiry_ms = (self.instance_ttl_s.max(1) * 2000 / 3).max(500);
        let beat = serde_json::to_string(&self.numbers()).unwrap_or_default();
        let mut call = redis::cmd("EVAL");
        call.arg(self.redis.scripts.beat.source())
            .arg(2)
            .arg(self.keys.instance(&self.instance_id))
            .arg(self.keys.reaping(&self.instance_id))
            .arg(beat)
            .arg(expiry_ms);
        match probe.query::<(i64, i64)>(&call).await {
            Ok((_, 1)) => {
                if !self.being_reaped.swap(true, Ordering::AcqRel) {
                    tracing::warn!("another instance took this one for dead (its heartbeat lapsed) and is dropping its connections; they are written again once it is done");
                }
            }
            Ok((had, _)) => {
                if had == 0 || self.being_reaped.swap(false, Ordering::AcqRel) {
                    self.want_reconcile();
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "redis heartbeat failed");
                return;
            }
        }
        let mut listed = redis::cmd("SADD");
        listed.arg(self.keys.instances()).arg(&self.instance_id);
        if let Err(e) = probe.query::<i64>(&listed).await {
            tracing::debug!(error = %e, "redis heartbeat failed");
        }
    }

    /// Removes the heartbeat and the `instances` entry (shutdown).
    pub(super) async fn remove_heartbeat(&self) -> BrokerResult<()> {
        let (key, instances, id) = (
            self.keys.instance(&self.instance_id),
            self.keys.instances(),
            self.instance_id.clone(),
        );
        self.redis
            .exec(move |mut c| async move {
                redis::cmd("DEL").arg(&key).query_async::<()>(&mut c).await
            })
            .await?;
        self.redis
            .exec(move |mut c| async move {
                redis::cmd("SREM")
                    .arg(&instances)
                    .arg(&id)
                    .query_async::<()>(&mut c)
                    .await
            })
            .await?;
        Ok(())
    }
}
