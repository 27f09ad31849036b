//! Publishing and history in memory: each room keeps its last
//! `history.size` messages, dropped `history.ttl_s` after its last publish,
//! and all rooms together stay within `history.max_bytes`: past it, the
//! least recently published rooms lose their history first (a join with
//! `since` into such a room is told `recovered: false`). A publish with an
//! idempotency key is stored once ([`PublishKeys`]), as with Redis.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytestring::ByteString;
use serde_json::Value;
use tokio::time::Instant;

use super::{BrokerActor, Call, MemoryBroker};
use crate::broker::fanout::{Envelope, Stamp};
use crate::broker::{BrokerResult, History, HistoryEntry, Messages, Publish, PublishDone};
use crate::protocol::{MessageId, RoomName};

/// What one retained message costs beyond its frame (deque slot, id, `Arc`).
const ENTRY_OVERHEAD: usize = 64;
/// What one room with history costs beyond its messages.
const ROOM_OVERHEAD: usize = 192;

struct RoomHistory {
    last_id: MessageId,
    messages: VecDeque<HistoryEntry>,
    last_publish: Instant,
    /// What its messages cost, overheads included.
    bytes: usize,
    /// Its place in the least-recently-published order.
    lru: u64,
}

/// How long a publish key answers its first id.
const KEY_TTL: Duration = Duration::from_millis(crate::broker::PUBLISH_KEY_TTL_MS);
/// The most publish keys kept (the oldest go first).
const MAX_KEYS: usize = 100_000;

/// Publishes made with an idempotency key, for [`KEY_TTL`], so a repeat
/// answers the first id instead of publishing again.
#[derive(Default)]
pub(super) struct PublishKeys {
    ids: HashMap<String, MessageId>,
    order: VecDeque<(Instant, String)>,
}

impl PublishKeys {
    fn expire(&mut self) {
        let now = Instant::now();
        while let Some((at, _)) = self.order.front() {
            if now.duration_since(*at) < KEY_TTL && self.order.len() <= MAX_KEYS {
                break;
            }
            if let Some((_, key)) = self.order.pop_front() {
                self.ids.remove(&key);
            }
        }
    }

    fn get(&mut self, key: &str) -> Option<MessageId> {
        self.expire();
        self.ids.get(key).copied()
    }

    fn insert(&mut self, key: String, id: MessageId) {
        self.ids.insert(key.clone(), id);
        self.order.push_back((Instant::now(), key));
        self.expire();
    }
}

fn entry_cost(entry: &HistoryEntry) -> usize {
    entry.frame.len() + ENTRY_OVERHEAD
}

fn room_cost(room: &RoomName) -> usize {
    room.as_str().len() + ROOM_OVERHEAD
}

/// Every room's retained messages, within a byte budget.
pub(super) struct HistoryStore {
    size: usize,
    ttl: Duration,
    max_bytes: usize,
    bytes: usize,
    rooms: HashMap<RoomName, RoomHistory>,
    /// Rooms by last publish, oldest first.
    lru: BTreeMap<u64, RoomName>,
    next_lru: u64,
}

impl HistoryStore {
    pub(super) fn new(size: usize, ttl: Duration, max_bytes: usize) -> HistoryStore {
        HistoryStore {
            size,
            ttl,
            max_bytes,
            bytes: 0,
            rooms: HashMap::new(),
            lru: BTreeMap::new(),
            next_lru: 0,
        }
    }

    pub(super) fn ttl(&self) -> Duration {
        self.ttl
    }

    /// What all history costs now.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.bytes
    }

    fn remove(&mut self, room: &RoomName) {
        if let Some(h) = self.rooms.remove(room) {
            self.bytes -= h.bytes + room_cost(room);
            self.lru.remove(&h.lru);
        }
    }

    /// Drops the history of every room without a publish for the TTL.
    pub(super) fn expire(&mut self) {
        let ttl = self.ttl;
        let expired: Vec<RoomName> = self
            .rooms
            .iter()
            .filter(|(_, h)| h.last_publish.elapsed() >= ttl)
            .map(|(room, _)| room.clone())
            .collect();
        for room in expired {
            self.remove(&room);
        }
    }

    /// The room's live history, dropping it first if it has expired.
    fn room(&mut self, room: &RoomName) -> Option<&mut RoomHistory> {
        if self
            .rooms
            .get(room)
            .is_some_and(|h| h.last_publish.elapsed() >= self.ttl)
        {
            self.remove(room);
        }
        self.rooms.get_mut(room)
    }

    /// The id of the room's next message, published at `now_ms`.
    fn next_id(&mut self, room: &RoomName, now_ms: u64) -> MessageId {
        let last = self.room(room).map(|h| h.last_id).unwrap_or_default();
        last.next(now_ms)
    }

    /// Appends the room's next message (its id from [`Self::next_id`]),
    /// then trims the room to `history.size` and all rooms to the budget.
    fn append(&mut self, room: &RoomName, entry: HistoryEntry) {
        if !self.rooms.contains_key(room) {
            self.bytes += room_cost(room);
        }
        let lru = self.next_lru;
        self.next_lru += 1;
        let history = self
            .rooms
            .entry(room.clone())
            .or_insert_with(|| RoomHistory {
                last_id: MessageId::default(),
                messages: VecDeque::new(),
                last_publish: Instant::now(),
                bytes: 0,
                lru,
            });
        self.lru.remove(&history.lru);
        self.lru.insert(lru, room.clone());
        history.lru = lru;
        history.last_id = entry.id;
        history.last_publish = Instant::now();
        history.bytes += entry_cost(&entry);
        self.bytes += entry_cost(&entry);
        history.messages.push_back(entry);
        while history.messages.len() > self.size {
            if let Some(dropped) = history.messages.pop_front() {
                history.bytes -= entry_cost(&dropped);
                self.bytes -= entry_cost(&dropped);
            }
        }
        self.evict(room);
    }

    /// Drops the least recently published rooms (never `keep`) until all
    /// history fits the budget.
    fn evict(&mut self, keep: &RoomName) {
        while self.bytes > self.max_bytes {
            let oldest = self.lru.values().find(|r| *r != keep).cloned();
            match oldest {
                Some(room) => self.remove(&room),
                None => return,
            }
        }
    }

    /// The retained messages after `since`, at most `limit` (the latest).
    /// `recovered`: nothing after `since` is gone, i.e. `since` is at or
    /// after the first retained message (anything older may have been
    /// trimmed, evicted or expired) and `limit` left nothing out.
    pub(super) fn after(
        &mut self,
        room: &RoomName,
        since: Option<MessageId>,
        limit: usize,
    ) -> History {
        let Some(h) = self.room(room) else {
            // Nothing retained: a client that names an id may have missed
            // messages that expired with the room's history.
            return History {
                messages: Vec::new(),
                recovered: since.is_none(),
            };
        };
        let after: Vec<&HistoryEntry> = h
            .messages
            .iter()
            .filter(|m| since.is_none_or(|s| m.id > s))
            .collect();
        let skip = after.len().saturating_sub(limit);
        let first = h.messages.front().map(|m| m.id);
        let kept_since = match since {
            None => true,
            Some(s) => first.is_some_and(|first| s >= first),
        };
        History {
            messages: after.into_iter().skip(skip).cloned().collect(),
            recovered: kept_since && skip == 0,
        }
    }
}

impl BrokerActor {
    fn publish_room(
        &mut self,
        room: RoomName,
        from: &str,
        data: &Value,
        key: Option<&str>,
    ) -> MessageId {
        let key = key.map(|k| format!("{room}\0{}", crate::broker::publish_key(from, k)));
        if let Some(id) = key.as_deref().and_then(|k| self.publish_keys.get(k)) {
            return id;
        }
        let id = self.publish_new(room, from, data);
        if let Some(key) = key {
            self.publish_keys.insert(key, id);
        }
        id
    }

    fn publish_new(&mut self, room: RoomName, from: &str, data: &Value) -> MessageId {
        let at = Stamp::now();
        let id = self.history.next_id(&room, at.ts_ms);
        let envelope = Envelope::message(room.clone(), Some(id), from, data, at);
        let entry = HistoryEntry {
            id,
            frame: envelope.frame.clone(),
        };
        self.history.append(&room, entry);
        self.hubs.send(envelope);
        id
    }

    fn publish_user(&mut self, user: String, from: &str, data: &Value) -> String {
        let id = self.ids.next_other().to_string();
        self.hubs
            .send(Envelope::direct(user, &id, from, data, Stamp::now()));
        id
    }
}

#[async_trait]
impl Messages for MemoryBroker {
    /// One mailbox message, not waited for: the actor handles a thread's
    /// messages in the order they were sent and calls `done` on its own
    /// thread. A stopped actor drops `done` uncalled.
    fn start_publish(self: Arc<Self>, publish: Publish, done: PublishDone) {
        self.addr.do_send(Call(Box::new(move |b: &mut BrokerActor| {
            let id = match publish {
                Publish::Room {
                    room,
                    from,
                    data,
                    key,
                } => b
                    .publish_room(room, &from, &data, key.as_deref())
                    .to_string(),
                Publish::User { to, from, data } => b.publish_user(to, &from, &data),
            };
            done(Ok(id));
        })));
    }

    async fn publish_room(
        &self,
        room: &RoomName,
        from: &str,
        data: &Value,
        key: Option<&str>,
    ) -> BrokerResult<MessageId> {
        let (room, from, data) = (room.clone(), from.to_owned(), data.clone());
        let key = key.map(str::to_owned);
        self.call(move |b| b.publish_room(room, &from, &data, key.as_deref()))
            .await
    }

    async fn publish_user(&self, user: &str, from: &str, data: &Value) -> BrokerResult<String> {
        let (user, from, data) = (user.to_owned(), from.to_owned(), data.clone());
        self.call(move |b| b.publish_user(user, &from, &data)).await
    }

    async fn broadcast(&self, data: &Value) -> BrokerResult<String> {
        let data = data.clone();
        self.call(move |b| {
            let id = b.ids.next_other().to_string();
            b.hubs.send(Envelope::broadcast(&id, &data, Stamp::now()));
            id
        })
        .await
    }

    async fn send_frame(&self, user: &str, frame: ByteString) -> BrokerResult<()> {
        let user = user.to_owned();
        self.call(move |b| b.hubs.send(Envelope::to_user(user, frame, Stamp::now())))
            .await
    }

    async fn history(
        &self,
        room: &RoomName,
        since: Option<MessageId>,
        limit: usize,
    ) -> BrokerResult<History> {
        let room = room.clone();
        self.call(move |b| b.history.after(&room, since, limit))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(store: &mut HistoryStore, room: &RoomName, at: u64, bytes: usize) -> MessageId {
        let id = store.next_id(room, at);
        let frame = "x".repeat(bytes).into();
        store.append(room, HistoryEntry { id, frame });
        id
    }

    fn store_with(n: u64, size: usize) -> (HistoryStore, RoomName, Vec<MessageId>) {
        let mut store = HistoryStore::new(size, Duration::from_secs(60), 1 << 20);
        let room = RoomName::parse("r").unwrap();
        let ids = (0..n)
            .map(|i| publish(&mut store, &room, 1000 + i, 10))
            .collect();
        (store, room, ids)
    }

    fn ids(history: &History) -> Vec<MessageId> {
        history.messages.iter().map(|m| m.id).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn since_a_retained_id_recovers_everything_after_it() {
        let (mut store, room, all) = store_with(5, 10);
        let h = store.after(&room, Some(all[1]), usize::MAX);
        assert!(h.recovered);
        assert_eq!(ids(&h), all[2..]);
        let h = store.after(&room, Some(all[4]), usize::MAX);
        assert!(h.recovered && h.messages.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn since_a_trimmed_id_is_not_recovered_but_replays_what_is_kept() {
        let (mut store, room, all) = store_with(8, 5);
        // all[0..3] were trimmed; all[2] is the newest trimmed id.
        let h = store.after(&room, Some(all[1]), usize::MAX);
        assert!(!h.recovered);
        assert_eq!(ids(&h), all[3..]);
        // Since the newest trimmed id: nothing after it is lost, but the
        // store cannot tell that from an older one, so it errs on the safe side.
        let h = store.after(&room, Some(all[2]), usize::MAX);
        assert!(!h.recovered);
        assert_eq!(ids(&h), all[3..]);
        // Since the first retained id: recovered.
        assert!(store.after(&room, Some(all[3]), usize::MAX).recovered);
    }

    #[tokio::test(start_paused = true)]
    async fn a_limit_keeps_the_latest_and_says_what_it_left_out() {
        let (mut store, room, all) = store_with(5, 10);
        let h = store.after(&room, None, 2);
        assert_eq!(ids(&h), all[3..]);
        assert!(!h.recovered);
        let h = store.after(&room, Some(all[2]), 2);
        assert!(h.recovered);
        assert_eq!(ids(&h), all[3..]);
    }

    #[tokio::test(start_paused = true)]
    async fn history_stays_within_its_budget_evicting_the_least_recently_published() {
        let budget = 20 * (1000 + ENTRY_OVERHEAD + ROOM_OVERHEAD + 8);
        let mut store = HistoryStore::new(100, Duration::from_secs(60), budget);
        let rooms: Vec<RoomName> = (0..100)
            .map(|i| RoomName::parse(&format!("room-{i}")).unwrap())
            .collect();
        let first: Vec<MessageId> = rooms
            .iter()
            .enumerate()
            .map(|(i, room)| publish(&mut store, room, 1000 + i as u64, 1000))
            .collect();
        assert!(store.bytes() <= budget, "{} > {budget}", store.bytes());
        // The oldest rooms were evicted: a join with since is not recovered.
        let h = store.after(&rooms[0], Some(first[0]), usize::MAX);
        assert!(!h.recovered && h.messages.is_empty());
        // The newest are kept.
        assert!(
            store
                .after(&rooms[99], Some(first[99]), usize::MAX)
                .recovered
        );
        // A room published again moves to the back of the queue.
        publish(&mut store, &rooms[85], 5000, 1000);
        for (i, room) in rooms.iter().enumerate().take(10) {
            publish(&mut store, room, 6000 + i as u64, 1000);
        }
        assert!(store.after(&rooms[85], None, usize::MAX).messages.len() == 2);
        assert!(store
            .after(&rooms[86], None, usize::MAX)
            .messages
            .is_empty());
        assert!(store.bytes() <= budget);
    }

    #[tokio::test(start_paused = true)]
    async fn history_expires_a_ttl_after_the_last_publish() {
        let (mut store, room, all) = store_with(3, 10);
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(store.after(&room, Some(all[0]), usize::MAX).recovered);
        tokio::time::advance(Duration::from_secs(1)).await;
        let h = store.after(&room, Some(all[0]), usize::MAX);
        assert!(!h.recovered && h.messages.is_empty());
        assert!(store.after(&room, None, usize::MAX).recovered);
    }
}
