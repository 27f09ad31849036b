//! The seam, in process: a join whose subscription is held back while
//! messages are published must deliver each message once, in order.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use async_trait::async_trait;
use futures_util::future::BoxFuture;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::broker::memory::MemoryBroker;
use crate::broker::{Broker, BrokerResult, Fanout, Presence, Subscriptions};
use crate::config::Config;
use crate::hub::{CloseSession, Connect, Disconnect, Hub, Join, Leave};
use crate::protocol::{MessageId, PresenceEntry, RoomName};
use crate::session::outbound::{self, Bounds, Outbound, OutboundQueue};
use crate::session::SessionKey;

const BOUNDS: Bounds = Bounds {
    frames: 64,
    bytes: 1 << 20,
};

/// The memory broker's subscriptions, with `watch_room` held until the
/// test lets it through.
struct Gated {
    inner: Arc<MemoryBroker>,
    gate: Arc<Semaphore>,
    /// `watch` / `unwatch`, in the order the hub called them.
    calls: Arc<Mutex<Vec<&'static str>>>,
}

impl Subscriptions for Gated {
    fn attach_hub(&self, hub: Recipient<Fanout>) {
        self.inner.attach_hub(hub);
    }
    fn watch_room(&self, room: &RoomName) -> BoxFuture<'static, BrokerResult<()>> {
        self.calls.lock().unwrap().push("watch");
        let (gate, inner) = (self.gate.clone(), self.inner.watch_room(room));
        Box::pin(async move {
            let _permit = gate.acquire().await;
            inner.await
        })
    }
    fn unwatch_room(&self, room: &RoomName) {
        self.calls.lock().unwrap().push("unwatch");
        self.inner.unwatch_room(room);
    }
    fn watch_user(&self, user: &str) -> BoxFuture<'static, BrokerResult<()>> {
        self.inner.watch_user(user)
    }
    fn unwatch_user(&self, user: &str) {
        self.inner.unwatch_user(user);
    }
}

/// The memory broker's presence, reporting each recorded change.
struct Reported {
    inner: Arc<MemoryBroker>,
    events: mpsc::UnboundedSender<&'static str>,
}

#[async_trait]
impl Presence for Reported {
    async fn join(&self, room: &RoomName, user: &str, conn: &str) -> BrokerResult<()> {
        self.inner.join(room, user, conn).await?;
        let _ = self.events.send("join");
        Ok(())
    }
    async fn leave(&self, room: &RoomName, user: &str, conn: &str) -> BrokerResult<()> {
        self.inner.leave(room, user, conn).await?;
        let _ = self.events.send("leave");
        Ok(())
    }
    async fn list(&self, room: &RoomName) -> BrokerResult<Vec<PresenceEntry>> {
        self.inner.list(room).await
    }
}

/// Stands in for a session: any close it is asked for fails the test.
struct FakeSession;

impl Actor for FakeSession {
    type Context = Context<Self>;
}

impl Handler<CloseSession> for FakeSession {
    type Result = ();
    fn handle(&mut self, msg: CloseSession, _: &mut Self::Context) {
        panic!("session closed: {:?}", msg.0);
    }
}

struct Setup {
    broker: Broker,
    gate: Arc<Semaphore>,
    calls: Arc<Mutex<Vec<&'static str>>>,
    presence_events: mpsc::UnboundedReceiver<&'static str>,
    hub: Addr<Hub>,
    room: RoomName,
}

async fn setup() -> Setup {
    let memory = MemoryBroker::start(&Config::default());
    let gate = Arc::new(Semaphore::new(0));
    let (events, presence_events) = mpsc::unbounded_channel();
    let mut broker = Broker::from_parts("memory", memory.clone());
    let calls = Arc::new(Mutex::new(Vec::new()));
    broker.subscriptions = Arc::new(Gated {
        inner: memory.clone(),
        gate: gate.clone(),
        calls: calls.clone(),
    });
    broker.presence = Arc::new(Reported {
        inner: memory,
        events,
    });
    let hub = Hub::new(broker.clone(), BOUNDS).start();
    Setup {
        broker,
        gate,
        calls,
        presence_events,
        hub,
        room: RoomName::parse("seam").unwrap(),
    }
}

impl Setup {
    async fn connect(&self, key: u64, user: &str) -> OutboundQueue {
        let queue = OutboundQueue::new(BOUNDS);
        let key = SessionKey::new(key);
        outbound::hand_over(key, queue.clone());
        let session = FakeSession.start().recipient();
        let connect = Connect {
            key,
            user: user.into(),
            connection_id: format!("c{}", key.get()).into(),
            session,
        };
        self.hub.send(connect).await.unwrap();
        queue
    }

    /// Sends a join; the receiver tells when the hub has answered it.
    fn join(&self, key: u64, since: Option<MessageId>, r: u64) -> oneshot::Receiver<()> {
        let (done, answered) = oneshot::channel();
        self.hub.do_send(Join {
            key: SessionKey::new(key),
            room: self.room.clone(),
            since,
            reference: Some(json!(r)),
            done,
        });
        answered
    }

    fn leave(&self, key: u64, r: u64) -> oneshot::Receiver<()> {
        let (done, answered) = oneshot::channel();
        self.hub.do_send(Leave {
            key: SessionKey::new(key),
            room: self.room.clone(),
            reference: Some(json!(r)),
            quiet: false,
            done,
        });
        answered
    }

    async fn publish(&self, n: u64) -> MessageId {
        let data = json!({ "n": n });
        let id = self
            .broker
            .messages
            .publish_room(&self.room, "p", &data, None);
        let id = id.await.unwrap();
        // The hub has handled the fan-out once a later message is through.
        self.hub
            .send(Disconnect {
                key: SessionKey::new(u64::MAX),
            })
            .await
            .unwrap();
        id
    }
}

/// The next frame, as JSON.
async fn next(rx: &mut OutboundQueue) -> Value {
    let item = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a frame within 5 s")
        .expect("queue open");
    let text = match item {
        Outbound::Frame(text) => text,
        Outbound::Delivery(envelope) => envelope.frame.clone(),
        other => panic!("unexpected {other:?}"),
    };
    serde_json::from_str(&text).unwrap()
}

/// Message ids received until `until`, skipping presence changes.
async fn message_ids(rx: &mut OutboundQueue, until: MessageId) -> Vec<String> {
    let mut ids = Vec::new();
    loop {
        let frame = next(rx).await;
        if frame["type"] != "message" {
            continue;
        }
        let id = frame["id"].as_str().unwrap().to_owned();
        let done = id == until.to_string();
        ids.push(id);
        if done {
            return ids;
        }
    }
}

#[actix_rt::test]
async fn a_message_published_while_the_join_is_pending_arrives_once_in_order() {
    let s = setup().await;
    let first = s.publish(1).await;
    let second = s.publish(2).await;
    let mut rx = s.connect(1, "alice").await;
    let _answered = s.join(1, Some(first), 7);
    // Published while the subscription is held back: it is both in the
    // history the join will read and in the live buffer.
    let third = s.publish(3).await;
    s.gate.add_permits(1);
    let ack = next(&mut rx).await;
    assert_eq!(
        ack,
        json!({"type": "ack", "ref": 7, "room": "seam", "recovered": true})
    );
    let fourth = s.publish(4).await;
    let got = message_ids(&mut rx, fourth).await;
    let want: Vec<String> = [second, third, fourth]
        .iter()
        .map(|i| i.to_string())
        .collect();
    assert_eq!(got, want);
}

#[actix_rt::test]
async fn a_leave_while_the_join_is_pending_leaves_no_presence_behind() {
    let mut s = setup().await;
    let mut rx = s.connect(1, "alice").await;
    let _answered = s.join(1, None, 1);
    s.leave(1, 2).await.unwrap();
    assert_eq!(next(&mut rx).await["ref"], 2);
    s.gate.add_permits(1);
    // The pending join records alice's presence, then sees she has left.
    let mut events = Vec::new();
    while events.len() < 2 {
        let event = tokio::time::timeout(Duration::from_secs(5), s.presence_events.recv());
        events.push(event.await.expect("a presence change").expect("open"));
    }
    assert_eq!(events, ["join", "leave"]);
    let users = s.broker.presence.list(&s.room).await.unwrap();
    assert!(users.is_empty(), "alice still present: {users:?}");
}

#[actix_rt::test]
async fn a_second_joiner_waits_for_the_first_joiners_subscription() {
    let s = setup().await;
    let mut first = s.connect(1, "alice").await;
    let mut second = s.connect(2, "bob").await;
    let first_answered = s.join(1, None, 1);
    let mut second_answered = s.join(2, None, 2);
    s.hub
        .send(Disconnect {
            key: SessionKey::new(u64::MAX),
        })
        .await
        .unwrap();
    assert!(
        second_answered.try_recv().is_err(),
        "bob acked before the room was watched"
    );
    assert!(second.try_recv().is_none());
    s.gate.add_permits(1);
    first_answered.await.unwrap();
    second_answered.await.unwrap();
    assert_eq!(next(&mut first).await["ref"], 1);
    assert_eq!(next(&mut second).await["ref"], 2);
    assert_eq!(
        *s.calls.lock().unwrap(),
        ["watch"],
        "one watch for the room"
    );
}

#[actix_rt::test]
async fn a_join_and_a_leave_in_one_turn_give_the_subscription_back() {
    let s = setup().await;
    let _rx = s.connect(1, "alice").await;
    let _joined = s.join(1, None, 1);
    s.leave(1, 2).await.unwrap();
    s.gate.add_permits(1);
    assert_eq!(*s.calls.lock().unwrap(), ["watch", "unwatch"]);
}

#[test]
fn a_replay_keeps_the_latest_entries_that_fit() {
    let entry = |ms: u64, len: usize| crate::broker::HistoryEntry {
        id: MessageId { ms, seq: 0 },
        frame: "x".repeat(len).into(),
    };
    let mut entries = vec![entry(1, 10), entry(2, 10), entry(3, 10)];
    assert_eq!(super::fit_latest(&mut entries, 25), 1);
    assert_eq!(entries.iter().map(|e| e.id.ms).collect::<Vec<_>>(), [2, 3]);
    assert_eq!(super::fit_latest(&mut entries, 100), 0);
    assert_eq!(super::fit_latest(&mut entries, 5), 2);
    assert!(entries.is_empty());
}
