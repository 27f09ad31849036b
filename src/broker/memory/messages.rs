//! Publishing and history in memory: each room keeps its last
//! `history.size` messages, dropped `history.ttl_s` after its last publish.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tokio::time::Instant;

use super::{BrokerActor, MemoryBroker};
use crate::broker::fanout::{Envelope, Stamp};
use crate::broker::{BrokerResult, History, HistoryEntry, Messages};
use crate::protocol::{MessageId, RoomName};

struct RoomHistory {
    last_id: MessageId,
    /// The newest id dropped from `messages` by the size cap, if any.
    trimmed_through: Option<MessageId>,
    messages: VecDeque<HistoryEntry>,
    last_publish: Instant,
}

/// Every room's retained messages.
pub(super) struct HistoryStore {
    size: usize,
    ttl: Duration,
    rooms: HashMap<RoomName, RoomHistory>,
}

impl HistoryStore {
    pub(super) fn new(size: usize, ttl: Duration) -> HistoryStore {
        HistoryStore {
            size,
            ttl,
            rooms: HashMap::new(),
        }
    }

    pub(super) fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Drops the history of every room without a publish for the TTL.
    pub(super) fn expire(&mut self) {
        let ttl = self.ttl;
        self.rooms.retain(|_, h| h.last_publish.elapsed() < ttl);
    }

    /// The room's live history, dropping it first if it has expired.
    fn room(&mut self, room: &RoomName) -> Option<&mut RoomHistory> {
        if self
            .rooms
            .get(room)
            .is_some_and(|h| h.last_publish.elapsed() >= self.ttl)
        {
            self.rooms.remove(room);
        }
        self.rooms.get_mut(room)
    }

    /// The id of the room's next message, published at `now_ms`.
    fn next_id(&mut self, room: &RoomName, now_ms: u64) -> MessageId {
        let last = self.room(room).map(|h| h.last_id).unwrap_or_default();
        last.next(now_ms)
    }

    /// Appends the room's next message (its id from [`Self::next_id`]).
    fn append(&mut self, room: &RoomName, entry: HistoryEntry) {
        let history = self
            .rooms
            .entry(room.clone())
            .or_insert_with(|| RoomHistory {
                last_id: MessageId::default(),
                trimmed_through: None,
                messages: VecDeque::new(),
                last_publish: Instant::now(),
            });
        history.last_id = entry.id;
        history.last_publish = Instant::now();
        history.messages.push_back(entry);
        while history.messages.len() > self.size {
            if let Some(dropped) = history.messages.pop_front() {
                history.trimmed_through = Some(dropped.id);
            }
        }
    }

    /// The retained messages after `since`, at most `limit` (the latest);
    /// `recovered` is false when anything after `since` is gone.
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
        let recovered = match (since, h.trimmed_through) {
            (Some(s), Some(t)) => s >= t && skip == 0,
            _ => skip == 0,
        };
        History {
            messages: after.into_iter().skip(skip).cloned().collect(),
            recovered,
        }
    }
}

impl BrokerActor {
    fn publish_room(&mut self, room: RoomName, from: &str, data: &Value) -> MessageId {
        let at = Stamp::now();
        let id = self.history.next_id(&room, at.ts_ms);
        let envelope = Envelope::message(room.clone(), id, from, data, at);
        let entry = HistoryEntry {
            id,
            frame: envelope.frame.clone(),
        };
        self.history.append(&room, entry);
        self.hubs.send(envelope);
        id
    }
}

#[async_trait]
impl Messages for MemoryBroker {
    async fn publish_room(
        &self,
        room: &RoomName,
        from: &str,
        data: &Value,
    ) -> BrokerResult<MessageId> {
        let (room, from, data) = (room.clone(), from.to_owned(), data.clone());
        self.call(move |b| b.publish_room(room, &from, &data)).await
    }

    async fn publish_user(&self, user: &str, from: &str, data: &Value) -> BrokerResult<String> {
        let (user, from, data) = (user.to_owned(), from.to_owned(), data.clone());
        self.call(move |b| {
            let id = b.ids.next_other().to_string();
            b.hubs
                .send(Envelope::direct(user, &id, &from, &data, Stamp::now()));
            id
        })
        .await
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

    fn store_with(n: u64, size: usize) -> (HistoryStore, RoomName, Vec<MessageId>) {
        let mut store = HistoryStore::new(size, Duration::from_secs(60));
        let room = RoomName::parse("r").unwrap();
        let ids = (0..n)
            .map(|i| {
                let id = store.next_id(&room, 1000 + i);
                store.append(
                    &room,
                    HistoryEntry {
                        id,
                        frame: id.to_string().into(),
                    },
                );
                id
            })
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
        // Since the newest trimmed id: nothing after it is lost.
        let h = store.after(&room, Some(all[2]), usize::MAX);
        assert!(h.recovered);
        assert_eq!(ids(&h), all[3..]);
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
