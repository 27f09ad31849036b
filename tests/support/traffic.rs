//! Traffic for fault tests: members of a room that read everything, and
//! publishers that publish numbered messages, retrying with the same
//! `idempotency_key` when the answer is `unavailable` (Redis away, or the
//! outcome unknown). Once stopped, the invariants are checked: no two
//! acked publishes share an id, every acked message is in history, and
//! every member got every acked message once, in id order (a member that
//! was disconnected rejoins with `since` and must still end up with all).

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::task::JoinHandle;

use super::{id_pair, token, Api, Client, WAIT};

/// What one publisher had acked: its message number → the id.
type Acked = BTreeMap<u64, String>;
/// What one member received: ids (and data), in order.
type Received = Arc<Mutex<Vec<(String, Value)>>>;

pub struct Traffic {
    room: String,
    stop: Arc<AtomicBool>,
    publishers: Vec<JoinHandle<Acked>>,
    members: Vec<(JoinHandle<()>, Received)>,
    members_done: Arc<AtomicBool>,
}

/// Connects, retrying while the hub refuses (Redis away).
async fn connect(url: &str, user: &str) -> Client {
    for _ in 0..200 {
        let mut c = Client::connect_raw(&format!("{url}?token={}", token(user)), &[]).await;
        if let Some(Ok(w)) = c.next_event(WAIT).await {
            if w["type"] == "welcome" {
                c.welcome = w;
                return c;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{user} could not connect");
}

/// Joins (with `since` after a reconnect), retrying on `unavailable`.
async fn join(c: &mut Client, room: &str, since: Option<&str>) -> Value {
    let mut frame = json!({"type": "join", "room": room});
    if let Some(since) = since {
        frame["since"] = json!(since);
    }
    for _ in 0..200 {
        let ack = c.request(frame.clone()).await;
        if ack["type"] == "ack" {
            return ack;
        }
        assert_eq!(ack["code"], "unavailable", "join {room}: {ack}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("could not join {room}");
}

impl Traffic {
    /// `members` readers and `publishers` writers of `room`, spread over
    /// the hubs' WebSocket URLs.
    pub async fn start(urls: &[String], room: &str, members: usize, publishers: usize) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let members_done = Arc::new(AtomicBool::new(false));
        let mut readers = Vec::new();
        for m in 0..members {
            let url = urls[m % urls.len()].clone();
            let mut c = connect(&url, &format!("member{m}")).await;
            join(&mut c, room, None).await;
            let (room, done) = (room.to_owned(), members_done.clone());
            let got = Received::default();
            let task = tokio::spawn(read_all(c, url, m, room, done, got.clone()));
            readers.push((task, got));
        }
        let mut writers = Vec::new();
        for p in 0..publishers {
            let url = urls[(p + 1) % urls.len()].clone();
            let (room, stop) = (room.to_owned(), stop.clone());
            writers.push(tokio::spawn(publish_until(url, p, room, stop)));
        }
        Traffic {
            room: room.to_owned(),
            stop,
            publishers: writers,
            members: readers,
            members_done,
        }
    }

    /// Stops publishing, waits until every member has every acked message
    /// (or `limit`), and checks the invariants; returns how many messages
    /// were acked.
    pub async fn finish(self, api: &Api, limit: Duration) -> usize {
        self.stop.store(true, Ordering::Release);
        let mut acked: Vec<(String, String)> = Vec::new();
        for (p, w) in self.publishers.into_iter().enumerate() {
            for (k, id) in w.await.expect("publisher") {
                acked.push((format!("{p}:{k}"), id));
            }
        }
        let ids: HashSet<&str> = acked.iter().map(|(_, id)| id.as_str()).collect();
        assert_eq!(ids.len(), acked.len(), "two acked publishes share an id");
        // Every acked message is in history.
        let (_, history) = api.get(&format!("/api/rooms/{}/history", self.room)).await;
        let stored: HashSet<String> = history["messages"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["id"].as_str().map(str::to_owned))
            .collect();
        for (what, id) in &acked {
            assert!(stored.contains(id), "acked {what} ({id}) is not in history");
        }
        // Members: once and in order, nothing acked missing.
        let wanted: HashSet<String> = acked.iter().map(|(_, id)| id.clone()).collect();
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            let all = self.members.iter().all(|(_, got)| {
                let got = got.lock().unwrap();
                let ids: HashSet<&str> = got.iter().map(|(id, _)| id.as_str()).collect();
                wanted.iter().all(|id| ids.contains(id.as_str()))
            });
            if all {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.members_done.store(true, Ordering::Release);
        for (m, (reader, got)) in self.members.into_iter().enumerate() {
            reader.await.expect("member");
            let got = got.lock().unwrap().clone();
            let mut seen = HashSet::new();
            let mut last = (0, 0);
            for (id, _) in &got {
                assert!(seen.insert(id.clone()), "member{m} got {id} twice");
                let pair = id_pair(&json!(id));
                assert!(pair > last, "member{m}: {id} after {last:?}: out of order");
                last = pair;
            }
            let mut missing: Vec<&String> =
                wanted.iter().filter(|id| !seen.contains(*id)).collect();
            missing.sort();
            assert!(
                missing.is_empty(),
                "member{m} never got {} acked message(s) of {}: {:?}… (it got {}, the last {:?})",
                missing.len(),
                wanted.len(),
                &missing[..missing.len().min(5)],
                got.len(),
                got.last().map(|(id, _)| id)
            );
        }
        acked.len()
    }
}

/// A member: reads every message; after a close, reconnects and rejoins
/// with `since` the last id it got. Stops when `done` and quiet.
async fn read_all(
    mut c: Client,
    url: String,
    m: usize,
    room: String,
    done: Arc<AtomicBool>,
    got: Received,
) {
    loop {
        match c.next_event(Duration::from_millis(200)).await {
            Some(Ok(frame)) if frame["type"] == "message" => {
                if let Some(id) = frame["id"].as_str() {
                    got.lock()
                        .unwrap()
                        .push((id.to_owned(), frame["data"].clone()));
                }
            }
            Some(Ok(_)) => {}
            Some(Err(_closed)) => {
                c = connect(&url, &format!("member{m}")).await;
                let since = got.lock().unwrap().last().map(|(id, _)| id.clone());
                join(&mut c, &room, since.as_deref()).await;
            }
            None if done.load(Ordering::Acquire) => return,
            None => {}
        }
    }
}

/// A publisher: numbered messages every 20 ms until `stop`; an
/// `unavailable` answer is retried with the same key until acked.
async fn publish_until(url: String, p: usize, room: String, stop: Arc<AtomicBool>) -> Acked {
    let user = format!("publisher{p}");
    let mut c = connect(&url, &user).await;
    join(&mut c, &room, None).await;
    let mut acked = Acked::new();
    let mut k = 0u64;
    while !stop.load(Ordering::Acquire) {
        let frame = json!({"type": "publish", "room": room, "data": {"p": p, "k": k},
                           "idempotency_key": format!("{p}-{k}")});
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "publisher{p}: still unavailable after 60 s: {frame}"
            );
            let reply = match tokio::time::timeout(WAIT, c.request(frame.clone())).await {
                Ok(reply) => reply,
                Err(_) => panic!("publisher{p}: no answer to {frame}"),
            };
            match reply["type"].as_str() {
                Some("ack") => {
                    acked.insert(k, reply["id"].as_str().expect("id").to_owned());
                    break;
                }
                _ if reply["code"] == "unavailable" => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                _ => panic!("publisher{p}: {reply}"),
            }
        }
        k += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    acked
}
