//! The pub/sub connection, as a handle to subscribe with and a stream of
//! [`Event`]s.
//!
//! - Standalone and sentinel: one connection with `SUBSCRIBE` (to the
//!   primary the sentinels name when it is opened). Its stream ends when
//!   the connection is lost; the caller opens a new one.
//! - Cluster: redis-rs's cluster connection with RESP3 and a push sender,
//!   `SSUBSCRIBE` (sharded pub/sub), one command per slot (a command's
//!   channels must share one). It reconnects to nodes and follows the
//!   topology itself, and re-subscribes the channels it tracks; but when a
//!   slot moves or its primary is demoted, the server unsubscribes the
//!   slot's channels (an unsolicited `SUNSUBSCRIBE`) and redis-rs drops
//!   them from what it tracks without subscribing them again. Those come
//!   out as [`Event::Unsubscribed`] and node disconnections as
//!   [`Event::Disconnected`]: the subscriber subscribes again and catches
//!   up from history (see `broker/redis/subscriber.rs`).

use futures_util::stream::{self, BoxStream, StreamExt};
use redis::aio::PubSubSink;
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{PushInfo, PushKind, Value};

use std::time::Duration;

use super::error::{classify, RedisError, RedisResult};
use super::group_by_slot;
use super::probe::single_client;
use crate::config::{RedisConfig, RedisMode};

/// What the pub/sub connection reports.
#[derive(Debug)]
pub enum Event {
    /// A message on a channel.
    Message { channel: String, payload: Vec<u8> },
    /// The server unsubscribed this channel (ours, or unsolicited: a slot
    /// moved or its primary was demoted).
    Unsubscribed(String),
    /// The connection (standalone: the whole of it; cluster: to one node)
    /// was lost.
    Disconnected,
}

/// The handle that subscribes; each (un)subscribe gives up after
/// `redis.timeout_s` (a cluster connection has no time-out of its own, and
/// a slot in flux can leave a command unanswered).
#[derive(Clone)]
pub struct PubSub {
    conn: Conn,
    timeout: Duration,
}

#[derive(Clone)]
enum Conn {
    Single(PubSubSink),
    Cluster(ClusterConnection),
}

/// Opens the pub/sub connection of the configured deployment.
pub async fn connect(config: &RedisConfig) -> RedisResult<(PubSub, BoxStream<'static, Event>)> {
    let timeout = Duration::from_secs(config.timeout_s);
    match config.mode {
        RedisMode::Cluster => {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<PushInfo>();
            let client = ClusterClientBuilder::new(config.urls())
                .use_protocol(redis::ProtocolVersion::RESP3)
                .push_sender(tx)
                .build()
                .map_err(|e| classify(&e))?;
            let conn = client
                .get_async_connection()
                .await
                .map_err(|e| classify(&e))?;
            let pushes = stream::poll_fn(move |cx| rx.poll_recv(cx))
                .filter_map(|push| async move { event(push) });
            let pubsub = PubSub {
                conn: Conn::Cluster(conn),
                timeout,
            };
            Ok((pubsub, pushes.boxed()))
        }
        _ => {
            let client = single_client(config).await.map_err(|e| classify(&e))?;
            let pubsub = client.get_async_pubsub().await.map_err(|e| classify(&e))?;
            let (sink, messages) = pubsub.split();
            let events = messages
                .map(|msg| Event::Message {
                    channel: msg.get_channel_name().to_owned(),
                    payload: msg.get_payload_bytes().to_vec(),
                })
                .chain(stream::once(async { Event::Disconnected }));
            let pubsub = PubSub {
                conn: Conn::Single(sink),
                timeout,
            };
            Ok((pubsub, events.boxed()))
        }
    }
}

/// A push as an event (`None`: not one we act on, e.g. a subscribe's
/// confirmation, which the command's answer carries too).
fn event(push: PushInfo) -> Option<Event> {
    let text = |v: &Value| redis::from_redis_value::<String>(v.clone()).ok();
    match push.kind {
        PushKind::Message | PushKind::SMessage => {
            let channel = text(push.data.first()?)?;
            let payload = redis::from_redis_value::<Vec<u8>>(push.data.get(1)?.clone()).ok()?;
            Some(Event::Message { channel, payload })
        }
        PushKind::Unsubscribe | PushKind::SUnsubscribe => {
            Some(Event::Unsubscribed(text(push.data.first()?)?))
        }
        PushKind::Disconnection => Some(Event::Disconnected),
        _ => None,
    }
}

impl PubSub {
    /// Subscribes to `channels`; `Ok` once the server confirmed them.
    pub async fn subscribe(&self, channels: &[String]) -> RedisResult<()> {
        self.within(self.subscribe_now(channels)).await
    }

    /// Unsubscribes from `channels`.
    pub async fn unsubscribe(&self, channels: &[String]) -> RedisResult<()> {
        self.within(self.unsubscribe_now(channels)).await
    }

    async fn within(
        &self,
        work: impl std::future::Future<Output = RedisResult<()>>,
    ) -> RedisResult<()> {
        match tokio::time::timeout(self.timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(RedisError::Unavailable("subscribe timed out".into())),
        }
    }

    async fn subscribe_now(&self, channels: &[String]) -> RedisResult<()> {
        match &self.conn {
            Conn::Single(sink) => {
                let mut sink = sink.clone();
                sink.subscribe(channels).await.map_err(|e| classify(&e))
            }
            Conn::Cluster(conn) => {
                let groups = group_by_slot(channels.iter().map(|c| (c.clone(), c.clone())));
                let subscribed = groups.into_iter().map(|group| {
                    let mut conn = conn.clone();
                    async move { conn.ssubscribe(group).await }
                });
                for result in futures_util::future::join_all(subscribed).await {
                    result.map_err(|e| classify(&e))?;
                }
                Ok(())
            }
        }
    }

    async fn unsubscribe_now(&self, channels: &[String]) -> RedisResult<()> {
        match &self.conn {
            Conn::Single(sink) => {
                let mut sink = sink.clone();
                sink.unsubscribe(channels).await.map_err(|e| classify(&e))
            }
            Conn::Cluster(conn) => {
                let groups = group_by_slot(channels.iter().map(|c| (c.clone(), c.clone())));
                let unsubscribed = groups.into_iter().map(|group| {
                    let mut conn = conn.clone();
                    async move { conn.sunsubscribe(group).await }
                });
                for result in futures_util::future::join_all(unsubscribed).await {
                    result.map_err(|e| classify(&e))?;
                }
                Ok(())
            }
        }
    }
}
