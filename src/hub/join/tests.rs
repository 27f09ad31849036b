//! The seam, in process: a join whose subscription is held back while
//! messages are published must deliver each message once, in order.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use async_trait::async_trait;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};

use crate::broker::memory::MemoryBroker;
use crate::broker::{Broker, BrokerResult, Fanout, Presence, Subscriptions};
use crate::config::Config;
use crate::hub::{CloseSession, Connect, Disconnect, Hub, Join, Leave, Outbound};
use crate::protocol::{MessageId, PresenceEntry, RoomName};

/// The memory broker's subscriptions, with `watch_room` held until the
/// test lets it through.
struct Gated {
    inner: Arc<MemoryBroker>,
    gate: Arc<Semaphore>,
}

#[async_trait]
impl Subscriptions for Gated {
    fn attach_hub(&self, hub: Recipient<Fanout>) {
        self.inner.attach_hub(hub);
    }
    async fn watch_room(&self, room: &RoomName) -> BrokerResult<()> {
        let _permit = self.gate.acquire().await;
        self.inner.watch_room(room).await
    }
    fn unwatch_room(&self, room: &RoomName) {
        self.inner.unwatch_room(room);
    }
    async fn watch_user(&self, user: &str) -> BrokerResult<()> {
        self.inner.watch_user(user).await
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
    presence_events: mpsc::UnboundedReceiver<&'static str>,
    hub: Addr<Hub>,
    room: RoomName,
}

async fn setup() -> Setup {
    let memory = MemoryBroker::start(&Config::default());
    let gate = Arc::new(Semaphore::new(0));
    let (events, presence_events) = mpsc::unbounded_channel();
    let mut broker = Broker::from_parts("memory", memory.clone());
    broker.subscriptions = Arc::new(Gated {
        inner: memory.clone(),
        gate: gate.clone(),
    });
    broker.presence = Arc::new(Reported {
        inner: memory,
        events,
    });
    let hub = Hub::new(broker.clone(), 64).start();
    Setup {
        broker,
        gate,
        presence_events,
        hub,
        room: RoomName::parse("seam").unwrap(),
    }
}

impl Setup {
    async fn connect(&self, key: u64, user: &str) -> mpsc::Receiver<Outbound> {
        let (outbound, rx) = mpsc::channel(64);
        let session = FakeSession.start().recipient();
        let connect = Connect {
            key,
            user: user.into(),
            connection_id: format!("c{key}").into(),
            outbound,
            session,
        };
        self.hub.send(connect).await.unwrap();
        rx
    }

    async fn publish(&self, n: u64) -> MessageId {
        let data = json!({ "n": n });
        let id = self.broker.messages.publish_room(&self.room, "p", &data);
        let id = id.await.unwrap();
        // The hub has handled the fan-out once a later message is through.
        self.hub.send(Disconnect { key: u64::MAX }).await.unwrap();
        id
    }
}

/// The next frame, as JSON.
async fn next(rx: &mut mpsc::Receiver<Outbound>) -> Value {
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
async fn message_ids(rx: &mut mpsc::Receiver<Outbound>, until: MessageId) -> Vec<String> {
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
    let join = Join {
        key: 1,
        room: s.room.clone(),
        since: Some(first),
        reference: Some(json!(7)),
    };
    s.hub.send(join).await.unwrap();
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
    let join = Join {
        key: 1,
        room: s.room.clone(),
        since: None,
        reference: Some(json!(1)),
    };
    s.hub.send(join).await.unwrap();
    let leave = Leave {
        key: 1,
        room: s.room.clone(),
        reference: Some(json!(2)),
    };
    s.hub.send(leave).await.unwrap();
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
