//! The in-memory broker: one instance, nothing to install.
//!
//! All broker state lives in one actor on its own arbiter thread, so the
//! worker threads share no lock: every call is a closure run on the actor
//! ([`MemoryBroker::call`]). A publish assigns the id, appends to history
//! and fans the serialized frame out to every hub in one step, so id order
//! and delivery order agree by construction. The state is split by
//! concern: [`messages`] (history), [`presence`], [`registry`].
//!
//! Bounds: callers use `Addr::send`, which waits while the mailbox holds
//! `MAILBOX` messages, so publishers slow down instead of growing a queue.

mod messages;
mod presence;
mod registry;

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use async_trait::async_trait;
use futures_util::future::BoxFuture;

use self::messages::HistoryStore;
use self::presence::PresenceTable;
use self::registry::ConnectionTable;
use super::fanout::{HubSet, LocalIds};
use super::{BrokerError, BrokerResult, Fanout, Lifecycle, Subscriptions};
use crate::config::Config;
use crate::protocol::RoomName;

const MAILBOX: usize = 1024;
/// How often markers for fan-outs dropped at a full hub are retried.
const FLUSH_EVERY: Duration = Duration::from_millis(50);

/// Handle to the memory broker actor; cheap to share across workers.
pub struct MemoryBroker {
    addr: Addr<BrokerActor>,
    _arbiter: ArbiterHandle,
}

impl MemoryBroker {
    /// Starts the broker actor on an arbiter thread of its own. Must be
    /// called inside a running actix system.
    pub fn start(config: &Config) -> Arc<MemoryBroker> {
        let arbiter = Arbiter::new().handle();
        let (size, max_bytes) = (config.history.size, config.history.max_bytes);
        let ttl = Duration::from_secs(config.history.ttl_s);
        let addr = BrokerActor::start_in_arbiter(&arbiter, move |ctx| {
            ctx.set_mailbox_capacity(MAILBOX);
            BrokerActor {
                hubs: HubSet::default(),
                ids: LocalIds::default(),
                history: HistoryStore::new(size, ttl, max_bytes),
                publish_keys: messages::PublishKeys::default(),
                presence: PresenceTable::default(),
                registry: ConnectionTable::default(),
            }
        });
        Arc::new(MemoryBroker {
            addr,
            _arbiter: arbiter,
        })
    }

    /// Runs `f` on the broker actor and returns its result.
    async fn call<R, F>(&self, f: F) -> BrokerResult<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut BrokerActor) -> R + Send + 'static,
    {
        self.addr
            .send(Call(Box::new(f)))
            .await
            .map_err(|e| BrokerError::Internal(format!("memory broker mailbox: {e}")))
    }
}

/// A closure to run on the actor's state: the one message type of the actor.
struct Call<R>(Box<dyn FnOnce(&mut BrokerActor) -> R + Send>);

impl<R: Send + 'static> Message for Call<R> {
    type Result = R;
}

struct BrokerActor {
    hubs: HubSet,
    ids: LocalIds,
    history: HistoryStore,
    publish_keys: messages::PublishKeys,
    presence: PresenceTable,
    registry: ConnectionTable,
}

impl Actor for BrokerActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let every = (self.history.ttl() / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
        ctx.run_interval(every, |this, _| this.history.expire());
        ctx.run_interval(FLUSH_EVERY, |this, _| this.hubs.flush());
    }
}

impl<R: Send + 'static> Handler<Call<R>> for BrokerActor {
    type Result = MessageResult<Call<R>>;

    fn handle(&mut self, msg: Call<R>, _: &mut Self::Context) -> Self::Result {
        MessageResult((msg.0)(self))
    }
}

/// One process: every publish reaches every hub, so there is nothing to
/// subscribe to.
impl Subscriptions for MemoryBroker {
    fn attach_hub(&self, hub: Recipient<Fanout>) {
        self.addr.do_send(Call(Box::new(move |b: &mut BrokerActor| {
            b.hubs.attach(hub)
        })));
    }

    fn watch_room(&self, _room: &RoomName) -> BoxFuture<'static, BrokerResult<()>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn unwatch_room(&self, _room: &RoomName) {}

    fn watch_user(&self, _user: &str) -> BoxFuture<'static, BrokerResult<()>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn unwatch_user(&self, _user: &str) {}
}

#[async_trait]
impl Lifecycle for MemoryBroker {
    async fn ready(&self) -> Result<(), String> {
        if self.addr.connected() {
            Ok(())
        } else {
            Err("memory broker stopped".into())
        }
    }

    /// Nothing outlives the process.
    async fn shutdown(&self) {}
}
