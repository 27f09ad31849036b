//! The messages between sessions and their hub: what a session asks of its
//! hub, what the hub tells a session, and what goes down a session's
//! outbound queue.

use std::sync::Arc;

use actix::{Message, Recipient};
use bytestring::ByteString;
use tokio::sync::oneshot;

use crate::broker::Envelope;
use crate::protocol::{CloseReason, MessageId, Ref, RoomName};

/// What goes down one session's outbound queue to its socket writer.
#[derive(Debug)]
pub enum Outbound {
    /// A frame for this session only (ack, error, presence, pong, welcome).
    Frame(ByteString),
    /// A published frame shared with other recipients.
    Delivery(Arc<Envelope>),
    /// A WebSocket ping (heartbeat).
    Ping,
    /// A WebSocket pong answering the client's ping.
    Pong(bytes::Bytes),
}

/// Hub → session: close yourself with this reason.
#[derive(Message, Clone, Copy)]
#[rtype(result = "()")]
pub struct CloseSession(pub CloseReason);

/// Session → hub: a new session on this worker. Its outbound queue was
/// handed over on this thread ([`super::queue::hand_over`]).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Connect {
    pub key: u64,
    pub user: Arc<str>,
    pub connection_id: Arc<str>,
    pub session: Recipient<CloseSession>,
}

/// Broker → hub, on behalf of a session: the answer to one of its
/// publishes (an ack or an error), for its queue; then tell `answered`.
/// Acks take this way because a broker may answer from another thread,
/// and the queue lives on the session's.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Acked {
    pub key: u64,
    pub frame: ByteString,
    pub answered: oneshot::Sender<()>,
}

/// Session → hub: the session has ended (for any reason).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnect {
    pub key: u64,
}

/// Session → hub: make the session a member of `room` and answer it (the
/// ack and the replay after `since`, or an error), then tell `done`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Join {
    pub key: u64,
    pub room: RoomName,
    pub since: Option<MessageId>,
    pub reference: Ref,
    pub done: oneshot::Sender<()>,
}

/// Session → hub: end the session's membership of `room`; ack it unless
/// `reference` is `None` and `quiet` (a membership ended by the server),
/// then tell `done`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Leave {
    pub key: u64,
    pub room: RoomName,
    pub reference: Ref,
    pub quiet: bool,
    pub done: oneshot::Sender<()>,
}

/// Server → hub: the instance is shutting down; close every session, and
/// every session that connects from now on, with this reason.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown(pub CloseReason);
