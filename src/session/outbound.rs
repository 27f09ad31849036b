//! A session's outbox: the bounded queue of everything on its way to the
//! client, confined to the session's worker thread.
//!
//! Everything that writes to it runs on that thread: the hub (fan-out, join
//! replays, acks), the session (its own replies, pings) and the socket
//! writer that drains it (a task of its own, [`super::writer`]). So it is a
//! plain `VecDeque` behind an `Rc<RefCell>`: a push is two bounds checks, a
//! `push_back` and at most one wake-up of the writer, with no atomics and
//! no lock. Anything from another thread (a publish's ack from the memory
//! broker's thread) reaches it through the hub's mailbox
//! ([`crate::hub::Acked`]).
//!
//! **Bounds.** At most [`Bounds::frames`] items (`limits.max_outbound_queue`)
//! and [`Bounds::bytes`] bytes of payload (`limits.max_outbound_bytes`); a
//! push past either is refused ([`Full`]) and whoever pushed closes the
//! session with 1013 `slow consumer`. An empty queue takes one item of any
//! size (a large presence list or replayed message must not be refused
//! forever), so what one connection pins here is at most the larger of the
//! byte bound and one frame. A delivery shared with other recipients counts
//! its whole size for each: it stays alive for as long as any queue holds it.
//!
//! Actor messages must be `Send`, so a session hands its queue to its hub
//! through a per-thread slot ([`hand_over`], taken by the hub's
//! [`crate::hub::Connect`] handler on the same thread).
//!
//! The queue also carries the session's end: [`OutboundQueue::close`] (a
//! close frame goes out behind what is queued) or [`OutboundQueue::end`]
//! (the session is gone; nothing more is written). After either, pushes
//! are dropped.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Waker};

use bytestring::ByteString;

use super::SessionKey;
use crate::broker::Envelope;
use crate::protocol::CloseReason;

/// An emptied queue keeps at most this many slots.
const KEEP_SLOTS: usize = 16;

/// What goes down one session's outbound queue to its socket writer.
#[derive(Debug)]
pub enum Outbound {
    /// A frame for this session only (ack, error, presence, pong, welcome).
    Frame(ByteString),
    /// A published frame shared with other recipients.
    Delivery(Arc<Envelope>),
    /// A WebSocket ping (heartbeat) with its payload, which the client's
    /// pong must echo.
    Ping([u8; 8]),
    /// A WebSocket pong answering the client's ping.
    Pong(bytes::Bytes),
    /// A binary message: only the echo endpoint of the WebSocket
    /// conformance run ([`super::echo`]) sends one.
    Binary(bytes::Bytes),
}

impl Outbound {
    /// The bytes it puts on the wire, without the frame header.
    pub fn payload_len(&self) -> usize {
        match self {
            Outbound::Frame(text) => text.len(),
            Outbound::Delivery(envelope) => envelope.frame.len(),
            Outbound::Ping(payload) => payload.len(),
            Outbound::Pong(payload) | Outbound::Binary(payload) => payload.len(),
        }
    }
}

/// How much one queue may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Items (`limits.max_outbound_queue`).
    pub frames: usize,
    /// Payload bytes (`limits.max_outbound_bytes`).
    pub bytes: usize,
}

impl Bounds {
    pub fn from_limits(limits: &crate::config::LimitsConfig) -> Bounds {
        Bounds {
            frames: limits.max_outbound_queue,
            bytes: limits.max_outbound_bytes,
        }
    }
}

/// The queue is at one of its [`Bounds`].
#[derive(Debug)]
pub struct Full;

/// Where the session is, as the writer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Open,
    /// Write what is queued (see the writer), then this close.
    Closing(CloseReason),
    /// Nothing more to write.
    Ended,
}

struct Inner {
    items: VecDeque<Outbound>,
    /// Payload bytes of `items`.
    bytes: usize,
    bounds: Bounds,
    status: Status,
    writer: Option<Waker>,
}

impl Inner {
    /// The writer is woken on the next push or status change.
    fn wake_me(&mut self, cx: &mut Context<'_>) {
        match &self.writer {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => self.writer = Some(cx.waker().clone()),
        }
    }

    fn clear(&mut self) {
        self.items = VecDeque::new();
        self.bytes = 0;
    }
}

/// One handle on a session's queue (the session, its hub and its writer
/// each hold one).
#[derive(Clone)]
pub struct OutboundQueue(Rc<RefCell<Inner>>);

impl OutboundQueue {
    pub fn new(bounds: Bounds) -> OutboundQueue {
        OutboundQueue(Rc::new(RefCell::new(Inner {
            items: VecDeque::new(),
            bytes: 0,
            bounds: Bounds {
                frames: bounds.frames.max(1),
                bytes: bounds.bytes.max(1),
            },
            status: Status::Open,
            writer: None,
        })))
    }

    /// Queues `item`; `Full` at a bound. After a close or the end the
    /// item is dropped (the session is going away).
    pub fn push(&self, item: Outbound) -> Result<(), Full> {
        let waker = {
            let mut inner = self.0.borrow_mut();
            if inner.status != Status::Open {
                return Ok(());
            }
            let size = item.payload_len();
            let over_bytes = inner.bytes + size > inner.bounds.bytes && !inner.items.is_empty();
            if inner.items.len() >= inner.bounds.frames || over_bytes {
                return Err(Full);
            }
            inner.bytes += size;
            inner.items.push_back(item);
            inner.writer.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }

    /// Payload bytes the queue can still take before its byte bound.
    pub fn room_bytes(&self) -> usize {
        let inner = self.0.borrow();
        inner.bounds.bytes.saturating_sub(inner.bytes)
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.0.borrow().items.is_empty()
    }

    /// The session closes with `reason` (the first close wins).
    pub fn close(&self, reason: CloseReason) {
        self.set_status(Status::Closing(reason));
    }

    /// The session is gone without a close: nobody to write to.
    pub fn end(&self) {
        self.set_status(Status::Ended);
    }

    fn set_status(&self, status: Status) {
        let waker = {
            let mut inner = self.0.borrow_mut();
            if inner.status != Status::Open {
                return;
            }
            inner.status = status;
            if status == Status::Ended {
                inner.clear();
            }
            inner.writer.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Writer side: hands queued items to `take` while it returns `true`
    /// (it wants more), and asks to be woken when the queue is empty. A
    /// close or the end is reported before any item is taken.
    pub fn poll_drain(
        &self,
        cx: &mut Context<'_>,
        mut take: impl FnMut(Outbound) -> bool,
    ) -> Status {
        let mut inner = self.0.borrow_mut();
        if inner.status != Status::Open {
            return inner.status;
        }
        while let Some(item) = inner.items.pop_front() {
            inner.bytes -= item.payload_len();
            if !take(item) {
                return Status::Open;
            }
        }
        if inner.items.capacity() > KEEP_SLOTS {
            inner.items.shrink_to(KEEP_SLOTS);
        }
        inner.wake_me(cx);
        Status::Open
    }

    /// Writer side, while it cannot write: the status, and a wake-up when
    /// it changes or an item is pushed.
    pub fn watch(&self, cx: &mut Context<'_>) -> Status {
        let mut inner = self.0.borrow_mut();
        inner.wake_me(cx);
        inner.status
    }

    /// Writer side, once closing: everything still queued, emptying it.
    pub fn take_all(&self) -> VecDeque<Outbound> {
        let mut inner = self.0.borrow_mut();
        inner.bytes = 0;
        std::mem::take(&mut inner.items)
    }

    /// The writer is gone (the connection is): drops what is queued and
    /// everything pushed from now on.
    pub fn abandon(&self) {
        let mut inner = self.0.borrow_mut();
        inner.status = Status::Ended;
        inner.clear();
        inner.writer = None;
    }

    /// The next item if one is queued; for tests.
    #[cfg(test)]
    pub fn try_recv(&self) -> Option<Outbound> {
        let mut inner = self.0.borrow_mut();
        let item = inner.items.pop_front()?;
        inner.bytes -= item.payload_len();
        Some(item)
    }

    /// The next item, waiting for one (`None` once closed or ended); for
    /// tests that stand in for the writer.
    #[cfg(test)]
    pub async fn recv(&self) -> Option<Outbound> {
        use std::task::Poll;
        std::future::poll_fn(|cx| {
            let mut item = None;
            match self.poll_drain(cx, |i| {
                item = Some(i);
                false
            }) {
                Status::Open => item.map_or(Poll::Pending, |i| Poll::Ready(Some(i))),
                _ => Poll::Ready(None),
            }
        })
        .await
    }
}

thread_local! {
    /// Queues handed over by sessions, until their hub takes them.
    static HANDED: RefCell<HashMap<SessionKey, OutboundQueue>> = RefCell::new(HashMap::new());
}

/// Leaves session `key`'s queue for its hub (same thread) to take.
pub fn hand_over(key: SessionKey, queue: OutboundQueue) {
    HANDED.with(|h| h.borrow_mut().insert(key, queue));
}

/// Takes what session `key` handed over (`None` if it is gone already).
pub fn take_handed(key: SessionKey) -> Option<OutboundQueue> {
    HANDED.with(|h| {
        let mut handed = h.borrow_mut();
        let queue = handed.remove(&key);
        if handed.is_empty() && handed.capacity() > KEEP_SLOTS {
            handed.shrink_to(KEEP_SLOTS);
        }
        queue
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(s: &'static str) -> Outbound {
        Outbound::Frame(s.into())
    }

    fn bounds(frames: usize, bytes: usize) -> Bounds {
        Bounds { frames, bytes }
    }

    #[test]
    fn bounded_then_closed_then_dropping() {
        let q = OutboundQueue::new(bounds(2, 1024));
        assert!(q.push(frame("a")).is_ok());
        assert!(q.push(frame("b")).is_ok());
        assert!(q.push(frame("c")).is_err());
        q.close(CloseReason::Normal);
        q.end();
        assert!(q.push(frame("d")).is_ok());
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(
            q.poll_drain(&mut cx, |_| true),
            Status::Closing(CloseReason::Normal)
        );
        assert_eq!(q.take_all().len(), 2);
    }

    #[test]
    fn bounded_in_bytes_but_an_empty_queue_takes_one_large_item() {
        let q = OutboundQueue::new(bounds(100, 10));
        assert!(
            q.push(frame("0123456789abcdef")).is_ok(),
            "empty: one item of any size"
        );
        assert!(q.push(frame("x")).is_err(), "over the byte bound");
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(q.poll_drain(&mut cx, |_| true), Status::Open);
        assert_eq!(q.room_bytes(), 10);
        assert!(q.push(frame("01234")).is_ok());
        assert!(q.push(frame("56789")).is_ok());
        assert_eq!(q.room_bytes(), 0);
        assert!(q.push(frame("a")).is_err());
    }

    #[test]
    fn the_end_drops_what_is_queued() {
        let q = OutboundQueue::new(bounds(4, 1024));
        q.push(frame("a")).unwrap();
        q.end();
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(q.poll_drain(&mut cx, |_| true), Status::Ended);
        assert!(q.take_all().is_empty());
    }
}
