//! The maintenance task of a Redis-backed instance, until shutdown, on its
//! own timer (never in the watchdog's way):
//!
//! - **reconcile**: after an outage, when the heartbeat key had vanished,
//!   after a clean-up that failed, and every `RECONCILE_EVERY` anyway, the
//!   registry, per-user counts and presence this instance owns are made
//!   equal to what it actually holds: connections and rooms it holds are
//!   added back, those it no longer holds removed;
//! - **reap**: the connections of instances whose heartbeat expired are
//!   removed, reading each dead instance's own set
//!   (`{prefix}:instance_conns:{id}`), so reaping costs what that instance
//!   held.
//!
//! Every step works in batches of `BATCH` connections, each batch two
//! pipelined round trips with its own time-out.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use redis::AsyncCommands;

use super::commands::ScriptCall;
use super::registry::LocalRegistry;
use super::RedisBroker;
use crate::broker::{BrokerError, BrokerResult};
use crate::protocol::{presence_change_frame, RoomName};

/// Connections per pipelined batch.
const BATCH: usize = 500;
/// A reconcile at least this often, whatever happened.
const RECONCILE_EVERY: Duration = Duration::from_secs(60);

impl RedisBroker {
    /// Asks the maintenance task for a reconcile as soon as Redis is up.
    pub(super) fn want_reconcile(&self) {
        self.dirty.store(true, Ordering::Release);
        self.reconcile_wanted.notify_one();
    }

    /// Reconciles and reaps until shutdown.
    pub(super) async fn maintain(self: Arc<Self>) {
        let ttl = Duration::from_secs(self.instance_ttl_s.max(1));
        let tick = (ttl / 6).clamp(Duration::from_millis(200), Duration::from_secs(5));
        let mut last_reconcile = tokio::time::Instant::now();
        while !self.stopping.load(Ordering::Acquire) {
            tokio::select! {
                _ = self.reconcile_wanted.notified() => {}
                _ = tokio::time::sleep(tick.mul_f64(rand::random_range(0.8..1.2))) => {}
            }
            if self.stopping.load(Ordering::Acquire) || !self.cmd.available() {
                continue;
            }
            let due = last_reconcile.elapsed() >= RECONCILE_EVERY;
            let wanted = self.dirty.swap(false, Ordering::AcqRel);
            if wanted || due {
                last_reconcile = tokio::time::Instant::now();
                self.reconcile_logged(wanted).await;
            }
            if let Err(e) = self.reap().await {
                tracing::debug!(error = %e, "reaping dead instances failed");
            }
        }
    }

    /// Reconciles; an asked-for reconcile is logged at info, a routine one
    /// at debug; a failure asks again.
    async fn reconcile_logged(&self, wanted: bool) {
        let started = std::time::Instant::now();
        match self.reconcile().await {
            Ok(n) => {
                let elapsed_ms = started.elapsed().as_millis() as u64;
                if wanted {
                    tracing::info!(connections = n, elapsed_ms, "registry reconciled");
                } else {
                    tracing::debug!(connections = n, elapsed_ms, "registry reconciled");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "reconcile failed; retrying");
                self.dirty.store(true, Ordering::Release);
            }
        }
    }

    /// Makes Redis hold exactly this instance's connections and their
    /// rooms. Returns how many connections it holds.
    pub(super) async fn reconcile(&self) -> BrokerResult<usize> {
        // Redis first: a connection registered after this read is not
        // taken for stale, and the local registry, updated before Redis,
        // holds every connection Redis held for us when it was read.
        let held = self
            .members(&self.keys.instance_conns(&self.instance_id))
            .await?;
        let local = match self.local.lock() {
            Ok(local) => local.clone(),
            Err(_) => return Ok(0),
        };
        let stale: Vec<String> = held
            .into_iter()
            .filter(|id| !local.connections.contains_key(id))
            .collect();
        if !stale.is_empty() {
            tracing::info!(
                connections = stale.len(),
                "removing registrations this instance no longer holds"
            );
        }
        for batch in stale.chunks(BATCH) {
            self.drop_connections(batch, &self.instance_id).await?;
        }
        let ids: Vec<&String> = local
            .connections
            .iter()
            .filter(|(_, c)| c.registered)
            .map(|(id, _)| id)
            .collect();
        for batch in ids.chunks(BATCH) {
            self.restore_batch(&local, batch).await?;
        }
        Ok(local.connections.len())
    }

    /// Registers a batch of held connections (no limit check; idempotent)
    /// and sets each one's rooms to the ones it holds.
    async fn restore_batch(&self, local: &LocalRegistry, ids: &[&String]) -> BrokerResult<()> {
        let scripts = &self.cmd.scripts;
        let calls: Vec<ScriptCall<'_>> = ids
            .iter()
            .filter_map(|id| local.connections.get(*id).map(|c| (*id, c)))
            .map(|(id, c)| ScriptCall {
                script: &scripts.register,
                keys: self.register_keys(),
                args: vec![
                    id.clone(),
                    c.user.clone(),
                    c.entry.clone(),
                    "0".into(),
                    "1".into(),
                ],
            })
            .collect();
        self.cmd.run_scripts(&calls).await?;
        let current = self.rooms_of(ids).await?;
        // Against the local registry as it is now, not as it was: a join
        // or leave since the snapshot has been applied already.
        let now = match self.local.lock() {
            Ok(local) => local.clone(),
            Err(_) => return Ok(()),
        };
        let mut changes = Vec::new();
        for (id, rooms_now) in ids.iter().zip(current) {
            let Some(user) = now.connections.get(*id).map(|c| &c.user) else {
                continue;
            };
            let wanted = now.rooms.get(*id).cloned().unwrap_or_default();
            for room in wanted.iter().filter(|r| !rooms_now.contains(r.as_str())) {
                changes.push(self.presence_call(true, room, user, id));
            }
            for room in rooms_now.iter().filter_map(|r| RoomName::parse(r).ok()) {
                if !wanted.contains(&room) {
                    changes.push(self.presence_call(false, &room, user, id));
                }
            }
        }
        self.cmd.run_scripts(&changes).await?;
        Ok(())
    }

    /// A `presence_join.lua` / `presence_leave.lua` call.
    pub(super) fn presence_call(
        &self,
        join: bool,
        room: &RoomName,
        user: &str,
        conn: &str,
    ) -> ScriptCall<'_> {
        let scripts = &self.cmd.scripts;
        ScriptCall {
            script: if join {
                &scripts.presence_join
            } else {
                &scripts.presence_leave
            },
            keys: vec![
                self.keys.presence(room),
                self.keys.conn_rooms(conn),
                self.keys.rooms(),
            ],
            args: vec![
                user.to_owned(),
                room.as_str().to_owned(),
                presence_change_frame(join, room.as_str(), user).to_string(),
                self.keys.room_channel(room),
            ],
        }
    }

    /// Each connection's room set, in one round trip.
    async fn rooms_of(&self, ids: &[impl AsRef<str>]) -> BrokerResult<Vec<HashSet<String>>> {
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.smembers(self.keys.conn_rooms(id.as_ref()));
        }
        self.cmd
            .exec(move |mut c| async move { pipe.query_async(&mut c).await })
            .await
    }

    /// Removes a batch of connections owned by `owner` from the registry,
    /// per-user counts, presence and `owner`'s set.
    pub(super) async fn drop_connections(
        &self,
        ids: &[impl AsRef<str>],
        owner: &str,
    ) -> BrokerResult<()> {
        let mut left: Vec<String> = ids.iter().map(|id| id.as_ref().to_owned()).collect();
        // A room joined between reading and dropping: read again (twice at most).
        for _ in 0..3 {
            let rooms = self.rooms_of(&left).await?;
            let calls: Vec<ScriptCall<'_>> = left
                .iter()
                .zip(&rooms)
                .map(|(id, rooms)| self.drop_call(id, owner, rooms))
                .collect();
            let replies = self.cmd.run_scripts(&calls).await?;
            left = left
                .into_iter()
                .zip(replies)
                .filter(|(_, reply)| !matches!(reply, redis::Value::Int(0 | 1)))
                .map(|(id, _)| id)
                .collect();
            if left.is_empty() {
                return Ok(());
            }
        }
        Err(BrokerError::Internal(format!(
            "{} connections could not be dropped",
            left.len()
        )))
    }

    fn drop_call(&self, id: &str, owner: &str, rooms: &HashSet<String>) -> ScriptCall<'_> {
        let mut keys = vec![
            self.keys.connections(),
            self.keys.user_connections(),
            self.keys.conn_rooms(id),
            self.keys.instance_conns(owner),
            self.keys.rooms(),
        ];
        let mut args = vec![id.to_owned()];
        for room in rooms.iter().filter_map(|r| RoomName::parse(r).ok()) {
            keys.push(self.keys.presence(&room));
            args.push(room.as_str().to_owned());
            args.push(self.keys.room_channel(&room));
        }
        ScriptCall {
            script: &self.cmd.scripts.drop_connection,
            keys,
            args,
        }
    }

    /// Every member of a set, by SSCAN (a set may be large).
    async fn members(&self, key: &str) -> BrokerResult<Vec<String>> {
        let key = key.to_owned();
        self.cmd
            .exec_within(Duration::from_secs(10), move |mut c| async move {
                let mut iter: redis::AsyncIter<String> = c.sscan(&key).await?;
                let mut all = Vec::new();
                while let Some(member) = futures_util::StreamExt::next(&mut iter).await {
                    all.push(member?);
                }
                Ok(all)
            })
            .await
    }

    /// Removes the connections of instances whose heartbeat has expired.
    /// Cheap while every instance lives: one SMEMBERS and one EXISTS each.
    async fn reap(&self) -> BrokerResult<()> {
        let key = self.keys.instances();
        let instances: Vec<String> = self
            .cmd
            .exec(move |mut c| async move { c.smembers(&key).await })
            .await?;
        for instance in instances {
            if instance == self.instance_id {
                continue;
            }
            let key = self.keys.instance(&instance);
            let alive: bool = self
                .cmd
                .exec(move |mut c| async move { c.exists(&key).await })
                .await?;
            if !alive {
                self.reap_instance(&instance).await?;
            }
        }
        Ok(())
    }

    /// Drops every connection of one dead instance, page by page, then
    /// forgets it.
    async fn reap_instance(&self, instance: &str) -> BrokerResult<()> {
        let started = std::time::Instant::now();
        let set = self.keys.instance_conns(instance);
        let mut reaped = 0;
        loop {
            let key = set.clone();
            let page: Vec<String> = self
                .cmd
                .exec(move |mut c| async move {
                    redis::cmd("SRANDMEMBER")
                        .arg(&key)
                        .arg(BATCH)
                        .query_async(&mut c)
                        .await
                })
                .await?;
            if page.is_empty() {
                break;
            }
            self.drop_connections(&page, instance).await?;
            reaped += page.len();
        }
        let (instances, member) = (self.keys.instances(), instance.to_owned());
        self.cmd
            .exec(move |mut c| async move {
                redis::pipe()
                    .del(&set)
                    .ignore()
                    .srem(&instances, &member)
                    .ignore()
                    .query_async::<()>(&mut c)
                    .await
            })
            .await?;
        if reaped > 0 {
            let elapsed_ms = started.elapsed().as_millis() as u64;
            tracing::info!(
                instance,
                connections = reaped,
                elapsed_ms,
                "reaped the connections of a dead instance"
            );
        }
        Ok(())
    }
}
