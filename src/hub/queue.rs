//! A session's outbound queue: bounded, and confined to the session's
//! worker thread.
//!
//! Everything that writes to it runs on that thread: the hub (fan-out, join
//! replays, acks), the session (its own replies, pings) and the socket
//! writer that drains it (a task of its own). So it is a
//! plain `VecDeque` behind an `Rc<RefCell>`: a push is a bounds check, a
//! `push_back` and at most one wake-up of the writer, with no atomics and
//! no lock. Anything from another thread (a publish's ack from the memory
//! broker's thread) reaches it through the hub's mailbox ([`super::Acked`]).
//!
//! Actor messages must be `Send`, so a session hands its queue to its hub
//! through a per-thread slot ([`hand_over`], taken by the hub's
//! [`super::Connect`] handler on the same thread).
//!
//! The queue also carries the session's end: [`OutboundQueue::close`] (a
//! close frame goes out behind what is queued) or [`OutboundQueue::end`]
//! (the session is gone; nothing more is written). After either, pushes
//! are dropped.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::task::{Context, Waker};

use super::Outbound;
use crate::protocol::CloseReason;

/// An emptied queue keeps at most this many slots.
const KEEP_SLOTS: usize = 16;

/// The queue is at `limits.max_outbound_queue` items.
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
    capacity: usize,
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
}

/// One handle on a session's queue (the session, its hub and its writer
/// each hold one).
#[derive(Clone)]
pub struct OutboundQueue(Rc<RefCell<Inner>>);

impl OutboundQueue {
    pub fn new(capacity: usize) -> OutboundQueue {
        OutboundQueue(Rc::new(RefCell::new(Inner {
            items: VecDeque::new(),
            capacity: capacity.max(1),
            status: Status::Open,
            writer: None,
        })))
    }

    /// Queues `item`; `Full` at the bound. After a close or the end the
    /// item is dropped (the session is going away).
    pub fn push(&self, item: Outbound) -> Result<(), Full> {
        let waker = {
            let mut inner = self.0.borrow_mut();
            if inner.status != Status::Open {
                return Ok(());
            }
            if inner.items.len() >= inner.capacity {
                return Err(Full);
            }
            inner.items.push_back(item);
            inner.writer.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
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
                inner.items = VecDeque::new();
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
        std::mem::take(&mut self.0.borrow_mut().items)
    }

    /// The writer is gone (the connection is): drops what is queued and
    /// everything pushed from now on.
    pub fn abandon(&self) {
        let mut inner = self.0.borrow_mut();
        inner.status = Status::Ended;
        inner.items = VecDeque::new();
        inner.writer = None;
    }

    /// The next item if one is queued; for tests.
    #[cfg(test)]
    pub fn try_recv(&self) -> Option<Outbound> {
        self.0.borrow_mut().items.pop_front()
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
    static HANDED: RefCell<HashMap<u64, OutboundQueue>> = RefCell::new(HashMap::new());
}

/// Leaves session `key`'s queue for its hub (same thread) to take.
pub fn hand_over(key: u64, queue: OutboundQueue) {
    HANDED.with(|h| h.borrow_mut().insert(key, queue));
}

/// Takes what session `key` handed over (`None` if it is gone already).
pub fn take_handed(key: u64) -> Option<OutboundQueue> {
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

    #[test]
    fn bounded_then_closed_then_dropping() {
        let q = OutboundQueue::new(2);
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
    fn the_end_drops_what_is_queued() {
        let q = OutboundQueue::new(4);
        q.push(frame("a")).unwrap();
        q.end();
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(q.poll_drain(&mut cx, |_| true), Status::Ended);
        assert!(q.take_all().is_empty());
    }
}
