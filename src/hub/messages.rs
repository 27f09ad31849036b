//! The messages between sessions and their hub: what a session asks of its
//! hub and what the hub tells a session. (What goes down a session's
//! outbound queue is [`crate::session::Outbound`].)

use std::sync::Arc;

use actix::{Message, Recipient};
use bytestring::ByteString;
use tokio::sync::oneshot;

use crate::protocol::{CloseReason, MessageId, Ref, RoomName};
use crate::session::SessionKey;

/// Hub → session: close yourself with this reason.
#[derive(Message, Clone, Copy)]
#[rtype(result = "()")]
pub struct CloseSession(pub CloseReason);

/// Session → hub: a new session on this worker. Its outbound queue was
/// handed over on this thread ([`crate::session::outbound::hand_over`]).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Connect {
    pub key: SessionKey,
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
    pub key: SessionKey,
    pub frame: ByteString,
    pub answered: oneshot::Sender<()>,
}

/// Session → hub: the session has ended (for any reason).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnect {
    pub key: SessionKey,
}

/// Session → hub: make the session a member of `room` and answer it (the
/// ack and the replay after `since`, or an error), then tell `done`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Join {
    pub key: SessionKey,
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
    pub key: SessionKey,
    pub room: RoomName,
    pub reference: Ref,
    pub quiet: bool,
    pub done: oneshot::Sender<()>,
}

/// Server → hub: the instance is shutting down; close every session with
/// `reason`, in batches (at least `per_second` a second, all within
/// `window`), and every session that connects from now on at once.
#[derive(Message, Clone, Copy)]
#[rtype(result = "()")]
pub struct Shutdown {
    pub reason: CloseReason,
    pub per_second: usize,
    pub window: std::time::Duration,
}
