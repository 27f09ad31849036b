//! Keeping the registry exact, until shutdown, on a timer of its own
//! (never in the watchdog's way):
//!
//! - **drop**: a connection leaves the registry in steps, each one
//!   idempotent and on one slot: its rooms (`presence_leave.lua` in each),
//!   its user's connections, then its instance's records of it. Whatever
//!   cuts the sequence short, the instance's records remain until the last
//!   step, so the sequence can always be run again from the start.
//! - **reconcile**: after an outage, a failover or a lost heartbeat, after
//!   a step that failed, and every [`RECONCILE_EVERY`] anyway, what Redis
//!   holds for this instance is made equal to what it holds: connections
//!   and memberships it holds are written again (idempotently: a write
//!   that is there already changes nothing, one a failover lost comes
//!   back), those it no longer holds are dropped.
//! - **settle**: a join or leave that failed, of a connection that is gone
//!   since, is no longer under the instance, so no reconcile finds it: the
//!   local registry remembers it (`unsure`) and it is left again until a
//!   leave that began well after the failure succeeded.
//! - **reap**: the connections of instances whose heartbeat expired are
//!   dropped, page by page from the dead instance's own records, so reaping
//!   costs what that instance held. A reaper first claims the instance
//!   (`reap_claim.lua`, atomic with the heartbeat's `beat.lua`): an
//!   instance that was only stalled past its TTL sees the claim in its next
//!   heartbeat and reconciles once the reaper is done, so the registry
//!   ends exact either way.
//!
//! Every step works in batches of [`BATCH`] connections; on a cluster each
//! batch is a few round trips per slot, all at once.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use redis::AsyncCommands;

use super::RedisBroker;
use crate::broker::{BrokerError, BrokerResult};
use crate::protocol::RoomName;
use crate::redis::ScriptCall;

/// A connection that went while a reconcile wrote it: id, user, the rooms
/// written.
type Went = (String, String, HashSet<RoomName>);

/// A connection a reconcile writes: id, and once a round wrote it, its user
/// and the rooms written so far.
type Written = (String, Option<String>, HashSet<RoomName>);

/// Connections per batch.
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
            if self.stopping.load(Ordering::Acquire) || !self.redis.available() {
                continue;
            }
            let due = last_reconcile.elapsed() >= RECONCILE_EVERY;
            let wanted = self.dirty.swap(false, Ordering::AcqRel);
            if wanted || due {
                last_reconcile = tokio::time::Instant::now();
                self.reconcile_logged(wanted).await;
            }
            if let Err(e) = self.settle_unsure().await {
                tracing::debug!(error = %e, "leaving unsure memberships failed; retrying");
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
            .hash_fields(&self.keys.instance_conns(&self.instance_id))
            .await?;
        // Each held connection, and whether its registration is done.
        let local: Vec<(String, bool)> = match self.local.lock() {
            Ok(local) => local
                .connections
                .iter()
                .map(|(id, c)| (id.clone(), c.registered))
                .collect(),
            Err(_) => return Ok(0),
        };
        let ours: HashSet<&str> = local.iter().map(|(id, _)| id.as_str()).collect();
        let stale: Vec<String> = held
            .into_iter()
            .filter(|id| !ours.contains(id.as_str()))
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
            .iter()
            .filter(|(_, registered)| *registered)
            .map(|(id, _)| id)
            .collect();
        for batch in ids.chunks(BATCH) {
            self.restore_batch(batch).await?;
        }
        Ok(local.len())
    }

    /// Leaves again the memberships whose last change failed, of the
    /// connections this instance no longer holds (a held one's are made
    /// right by the reconcile, and its disconnect leaves its rooms). One
    /// is forgotten once a leave that began `2 × redis.timeout_s` after
    /// its failure succeeded: by then a write that a paused or failing
    /// Redis held back has been applied or dropped.
    async fn settle_unsure(&self) -> BrokerResult<()> {
        let started = std::time::Instant::now();
        let gone: Vec<(String, RoomName, std::time::Instant)> = match self.local.lock() {
            Ok(mut local) => {
                let local = &mut *local;
                let (unsure, held) = (&local.unsure, &local.connections);
                unsure
                    .iter()
                    .filter(|(conn, _)| !held.contains_key(*conn))
                    .flat_map(|(conn, rooms)| {
                        rooms
                            .iter()
                            .map(|(room, at)| (conn.clone(), room.clone(), *at))
                    })
                    .take(BATCH)
                    .collect()
            }
            Err(_) => return Ok(()),
        };
        if gone.is_empty() {
            return Ok(());
        }
        let leaves: Vec<ScriptCall<'_>> = gone
            .iter()
            .map(|(conn, room, _)| self.presence_call(false, room, "", conn))
            .collect();
        fail_on_errors(self.redis.run_scripts(&leaves).await?)?;
        let mut pipe = redis::pipe();
        for (conn, room, _) in &gone {
            pipe.srem(self.keys.conn_rooms(&self.instance_id, conn), room.as_str())
                .ignore();
        }
        self.redis.pipelines(vec![pipe]).await?;
        let settled = self.redis.timeout() * 2;
        self.update_local(|local| {
            for (conn, room, at) in &gone {
                let Some(rooms) = local.unsure.get_mut(conn) else {
                    continue;
                };
                // Not if it failed again since.
                if rooms.get(room) == Some(at) && *at + settled <= started {
                    rooms.remove(room);
                }
                if rooms.is_empty() {
                    local.unsure.remove(conn);
                }
            }
            crate::trim::shrink_map(&mut local.unsure);
        });
        Ok(())
    }

    /// Writes a batch of held connections again, in the order of a connect
    /// and a join (no limit check; idempotent), and ends the memberships
    /// Redis has that they no longer hold. A join or leave, or a
    /// disconnect, applied while the batch was being written may have
    /// been overwritten with the older state: such connections are written
    /// again (or dropped) until none changed, for a few rounds; past them
    /// the next reconcile goes on.
    async fn restore_batch(&self, ids: &[&String]) -> BrokerResult<()> {
        const ROUNDS: usize = 4;
        // Each connection with what an earlier round wrote for it.
        let mut ids: Vec<Written> = ids
            .iter()
            .map(|id| ((*id).clone(), None, HashSet::new()))
            .collect();
        for _ in 0..ROUNDS {
            let (moved, went) = self.restore_once(&ids).await?;
            if !went.is_empty() {
                // Its own drop may have run before what this round wrote:
                // what it wrote is dropped again, rooms included.
                let (batch, known): (Vec<_>, Vec<_>) = went
                    .into_iter()
                    .map(|(id, user, rooms)| ((id, Some(user)), rooms))
                    .unzip();
                self.drop_batch(&batch, &self.instance_id, &known).await?;
            }
            if moved.is_empty() {
                return Ok(());
            }
            ids = moved;
        }
        self.want_reconcile();
        Ok(())
    }

    /// One round of [`Self::restore_batch`]: returns the connections whose
    /// rooms changed while it wrote (with the rooms it wrote), and those
    /// that went (with their user and the rooms it wrote). A room an
    /// earlier round wrote and the connection no longer holds is left even
    /// when its records no longer list it: a leave applied between that
    /// round's record and its join removed the record, not the join.
    async fn restore_once(&self, ids: &[Written]) -> BrokerResult<(Vec<Written>, Vec<Went>)> {
        struct Held {
            id: String,
            user: String,
            entry: String,
            rooms: HashSet<RoomName>,
            /// Rooms an earlier round wrote.
            written: HashSet<RoomName>,
            stamp: Option<u64>,
        }
        let mut went: Vec<Went> = Vec::new();
        let held: Vec<Held> = match self.local.lock() {
            Ok(local) => ids
                .iter()
                .filter_map(|(id, user, written)| {
                    let Some(c) = local.connections.get(id) else {
                        // Gone since an earlier round wrote it.
                        if let Some(user) = user {
                            went.push((id.clone(), user.clone(), written.clone()));
                        }
                        return None;
                    };
                    Some(Held {
                        id: id.clone(),
                        user: c.user.clone(),
                        entry: c.entry.clone(),
                        rooms: local
                            .rooms
                            .get(id)
                            .map(|r| r.set.clone())
                            .unwrap_or_default(),
                        written: written.clone(),
                        stamp: local.stamp(id),
                    })
                })
                .collect(),
            Err(_) => return Ok((Vec::new(), Vec::new())),
        };
        if held.is_empty() {
            return Ok((Vec::new(), went));
        }
        // 1. Under the instance: the connections and their rooms.
        let key = self.keys.instance_conns(&self.instance_id);
        let mut pipe = redis::pipe();
        for c in &held {
            pipe.hset(&key, &c.id, &c.user).ignore();
            let rooms: Vec<&str> = c.rooms.iter().map(RoomName::as_str).collect();
            if !rooms.is_empty() {
                pipe.sadd(self.keys.conn_rooms(&self.instance_id, &c.id), rooms)
                    .ignore();
            }
        }
        self.redis.pipelines(vec![pipe]).await?;
        // 2. Under each user.
        let scripts = &self.redis.scripts;
        let calls: Vec<ScriptCall<'_>> = held
            .iter()
            .map(|c| ScriptCall {
                script: &scripts.register,
                keys: vec![self.keys.user_conns(&c.user)],
                args: vec![c.id.clone(), c.entry.clone(), "0".into(), "1".into()],
            })
            .collect();
        fail_on_errors(self.redis.run_scripts(&calls).await?)?;
        // 3. In each room: the memberships held, and none other.
        let current = self
            .rooms_of(&held.iter().map(|c| c.id.as_str()).collect::<Vec<_>>())
            .await?;
        let mut changes = Vec::new();
        let mut gone = Vec::new();
        for (c, rooms_now) in held.iter().zip(current) {
            for room in &c.rooms {
                changes.push(self.presence_call(true, room, &c.user, &c.id));
            }
            let recorded = rooms_now.iter().filter_map(|r| RoomName::parse(r).ok());
            let candidates: HashSet<RoomName> = recorded.chain(c.written.iter().cloned()).collect();
            for room in candidates {
                if !c.rooms.contains(&room) {
                    changes.push(self.presence_call(false, &room, &c.user, &c.id));
                    gone.push((c.id.clone(), room));
                }
            }
        }
        fail_on_errors(self.redis.run_scripts(&changes).await?)?;
        if !gone.is_empty() {
            let mut pipe = redis::pipe();
            for (id, room) in &gone {
                pipe.srem(self.keys.conn_rooms(&self.instance_id, id), room.as_str())
                    .ignore();
            }
            self.redis.pipelines(vec![pipe]).await?;
        }
        let mut moved = Vec::new();
        if let Ok(local) = self.local.lock() {
            for c in held {
                let written: HashSet<RoomName> = c.rooms.union(&c.written).cloned().collect();
                if !local.connections.contains_key(&c.id) {
                    went.push((c.id, c.user, written));
                } else if local.stamp(&c.id) != c.stamp {
                    moved.push((c.id, Some(c.user), written));
                }
            }
        }
        Ok((moved, went))
    }

    /// Each connection's rooms (connections of this instance), in one
    /// round trip.
    async fn rooms_of(&self, ids: &[&str]) -> BrokerResult<Vec<HashSet<String>>> {
        self.rooms_under(&self.instance_id, ids).await
    }

    /// Each connection's rooms as `owner` recorded them.
    async fn rooms_under(&self, owner: &str, ids: &[&str]) -> BrokerResult<Vec<HashSet<String>>> {
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.smembers(self.keys.conn_rooms(owner, id));
        }
        let replies = self.redis.pipelines(vec![pipe]).await?;
        let replies = replies.into_iter().next().unwrap_or_default();
        Ok(replies
            .into_iter()
            .map(|v| redis::from_redis_value(v).unwrap_or_default())
            .collect())
    }

    /// Drops one connection (see the module doc); `user` when known, else
    /// read from its instance's records.
    pub(super) async fn drop_connection(
        &self,
        id: &str,
        user: Option<&str>,
        owner: &str,
    ) -> BrokerResult<()> {
        match user {
            Some(user) => {
                self.drop_batch(&[(id.to_owned(), Some(user.to_owned()))], owner, &[])
                    .await
            }
            None => self.drop_connections(&[id], owner).await,
        }
    }

    /// Drops a batch of `owner`'s connections, their users read from its
    /// records.
    pub(super) async fn drop_connections(
        &self,
        ids: &[impl AsRef<str>],
        owner: &str,
    ) -> BrokerResult<()> {
        let key = self.keys.instance_conns(owner);
        let fields: Vec<String> = ids.iter().map(|id| id.as_ref().to_owned()).collect();
        let users: Vec<Option<String>> = if fields.is_empty() {
            Vec::new()
        } else {
            let f = fields.clone();
            self.redis
                .exec(move |mut c| async move {
                    redis::cmd("HMGET")
                        .arg(&key)
                        .arg(&f)
                        .query_async(&mut c)
                        .await
                })
                .await?
        };
        let batch: Vec<(String, Option<String>)> = fields.into_iter().zip(users).collect();
        self.drop_batch(&batch, owner, &[]).await
    }

    /// The steps of a drop, each for the whole batch: rooms, users, then
    /// the instance's records.
    /// `known`: rooms each connection may be in beyond those its records
    /// list (by position; may be shorter than `batch`).
    async fn drop_batch(
        &self,
        batch: &[(String, Option<String>)],
        owner: &str,
        known: &[HashSet<RoomName>],
    ) -> BrokerResult<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = batch.iter().map(|(id, _)| id.as_str()).collect();
        let mut rooms: Vec<HashSet<RoomName>> = self
            .rooms_under(owner, &ids)
            .await?
            .into_iter()
            .map(|names| {
                names
                    .iter()
                    .filter_map(|r| RoomName::parse(r).ok())
                    .collect()
            })
            .collect();
        for (rooms, known) in rooms.iter_mut().zip(known) {
            rooms.extend(known.iter().cloned());
        }
        let leaves: Vec<ScriptCall<'_>> = batch
            .iter()
            .zip(&rooms)
            .flat_map(|((id, _), rooms)| {
                rooms
                    .iter()
                    .map(move |room| self.presence_call(false, room, "", id))
            })
            .collect();
        fail_on_errors(self.redis.run_scripts(&leaves).await?)?;
        let users = batch.iter().filter_map(|(id, user)| {
            let key = self.keys.user_conns(user.as_deref()?);
            Some(((key.clone(), id.as_str()), key))
        });
        let pipes = self
            .redis
            .group(users)
            .into_iter()
            .map(|group| {
                let mut pipe = redis::pipe();
                for (key, id) in group {
                    pipe.hdel(key, id).ignore();
                }
                pipe
            })
            .collect();
        self.redis.pipelines(pipes).await?;
        let key = self.keys.instance_conns(owner);
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.del(self.keys.conn_rooms(owner, id)).ignore();
        }
        pipe.hdel(&key, &ids).ignore();
        self.redis.pipelines(vec![pipe]).await?;
        Ok(())
    }

    /// Every field of a hash, by HSCAN (a hash may be large).
    async fn hash_fields(&self, key: &str) -> BrokerResult<Vec<String>> {
        let key = key.to_owned();
        let limit = self.redis.timeout() * 4;
        let pairs: Vec<(String, String)> = self
            .redis
            .exec_within(limit, move |mut c| async move {
                let mut iter: redis::AsyncIter<(String, String)> = c.hscan(&key).await?;
                let mut all = Vec::new();
                while let Some(pair) = futures_util::StreamExt::next(&mut iter).await {
                    all.push(pair?);
                }
                Ok(all)
            })
            .await?;
        Ok(pairs.into_iter().map(|(field, _)| field).collect())
    }

    /// Drops the connections of instances whose heartbeat has expired.
    /// Cheap while every instance lives: one SMEMBERS and one EXISTS each.
    async fn reap(&self) -> BrokerResult<()> {
        let key = self.keys.instances();
        let instances: Vec<String> = self
            .redis
            .exec(move |mut c| async move { c.smembers(&key).await })
            .await?;
        for instance in instances {
            if instance == self.instance_id {
                continue;
            }
            let keys = vec![self.keys.instance(&instance), self.keys.reaping(&instance)];
            let args = vec![self.instance_id.clone(), self.claim_ms().to_string()];
            let claimed: i64 = self
                .redis
                .run_script(&self.redis.scripts.reap_claim, keys, args)
                .await?;
            if claimed == 1 {
                self.reap_instance(&instance).await?;
            }
        }
        Ok(())
    }

    /// How long a reaper's claim on a dead instance lasts without being
    /// renewed (it is renewed every page): a reaper that dies mid-way
    /// holds a stalled instance's reconcile back this long at most.
    fn claim_ms(&self) -> i64 {
        (self.redis.timeout().as_millis() as i64).saturating_mul(10)
    }

    /// Drops every connection of one dead instance, page by page, then
    /// forgets it (the claim `reap_claim.lua` took is held meanwhile).
    async fn reap_instance(&self, instance: &str) -> BrokerResult<()> {
        let started = std::time::Instant::now();
        let conns = self.keys.instance_conns(instance);
        let mut reaped = 0;
        loop {
            let key = conns.clone();
            let page: Vec<String> = self
                .redis
                .exec(move |mut c| async move {
                    redis::cmd("HRANDFIELD")
                        .arg(&key)
                        .arg(BATCH)
                        .query_async(&mut c)
                        .await
                })
                .await?;
            if page.is_empty() {
                break;
            }
            let (claim, ms) = (self.keys.reaping(instance), self.claim_ms());
            self.redis
                .exec(move |mut c| async move { c.pexpire::<_, ()>(&claim, ms).await })
                .await?;
            self.drop_connections(&page, instance).await?;
            reaped += page.len();
        }
        let (instances, member) = (self.keys.instances(), instance.to_owned());
        self.redis
            .exec(move |mut c| async move { c.srem::<_, _, ()>(&instances, &member).await })
            .await?;
        // Last: an instance that was only stalled waits for this to
        // write its connections back.
        let claim = self.keys.reaping(instance);
        self.redis
            .exec(move |mut c| async move { c.del::<_, ()>(&claim).await })
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

/// An error reply among a batch's replies fails the batch (it is run again).
fn fail_on_errors(replies: Vec<redis::Value>) -> BrokerResult<()> {
    match replies
        .into_iter()
        .find(|r| matches!(r, redis::Value::ServerError(_)))
    {
        Some(redis::Value::ServerError(e)) => {
            let error = redis::RedisError::from(e);
            Err(BrokerError::from(crate::redis::classify(&error)))
        }
        _ => Ok(()),
    }
}
