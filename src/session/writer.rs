//! The socket writer: a task of its own on the session's worker thread that
//! drains the session's bounded outbound queue ([`super::outbound`])
//! straight into its TCP socket.
//!
//! Each time it runs it encodes every queued item (up to [`CHUNK`] bytes)
//! into the thread's scratch buffer and hands it to the socket in one
//! write: a burst of deliveries is one `sendto`, a delivery costs one queue
//! push and at most one wake-up of this task, and an idle connection holds
//! no write buffer. Only what the socket does not take (the client reads
//! slowly) is copied into a buffer of the connection's own; while that is
//! there, nothing more is taken from the queue, so the queue's bounds are
//! what a slow client runs into (1013 `slow consumer`, decided by whoever
//! pushes). A socket that takes nothing for `limits.write_timeout_s` while
//! something waits for it closes the session as a slow consumer too (the
//! writer asks the session to close). So what one connection holds for its
//! client is the queue's bounds plus at most one unsent batch
//! ([`CHUNK`] plus one frame), for at most the write timeout.
//!
//! A close goes behind what is already queued (up to [`CLOSE_BACKLOG`] of
//! it, encoded at once; the rest is dropped), except 1013 `slow consumer`,
//! whose queue is dropped at once. Either way the queue takes no more once
//! the close is signalled and the close frame is the last thing written.
//! The shutdown tracker's token is given back once the socket has taken the
//! close frame; the connection's place and registry entry ([`Held`]) when
//! the writer ends, the socket with it. Then the
//! writer shuts down its side of the connection and reads (and drops)
//! whatever the client still sends until it closes its side too, so that
//! the client reads our close frame before the socket goes (closing a
//! socket with unread input resets the connection). A client that takes
//! neither the close frame nor its end within [`CLOSE_TIMEOUT`] is reset.
//!
//! The queue ending without a close (the session is gone because the client
//! went away) ends the writer with nothing more to send; the writer ending
//! (the socket failed) ends the queue.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix::Recipient;
use actix_http::ws::{OpCode, Parser};
use bytes::{Buf, BytesMut};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_util::task::task_tracker::TaskTrackerToken;

use super::outbound::{Outbound, OutboundQueue, Status};
use super::Held;
use crate::clock::now_us;
use crate::hub::CloseSession;
use crate::metrics;
use crate::protocol::CloseReason;

/// At most this much is encoded per write.
const CHUNK: usize = 64 * 1024;
/// At most this many chunks per run before other tasks get the thread.
const CHUNKS_PER_RUN: usize = 4;
/// At most this much of what was queued goes out before a close frame.
const CLOSE_BACKLOG: usize = 1024 * 1024;
/// How long a closing client has to take the close frame and end its side.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

thread_local! {
    /// Where every writer of this thread encodes its batch: one buffer for
    /// all of them, since a batch is encoded and written without yielding.
    static SCRATCH: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

enum Phase {
    Open,
    /// The close frame is in `unsent`: write it, then end our side.
    Closing,
    /// Our side is ended: wait for the client's end.
    Lingering,
}

pub struct SocketWriter {
    socket: Rc<TcpStream>,
    queue: OutboundQueue,
    /// What the socket has not taken yet (only when the client reads slower
    /// than we write).
    unsent: BytesMut,
    phase: Phase,
    /// Given back when the writer ends (the socket is gone).
    _held: Held,
    token: Option<TaskTrackerToken>,
    /// Set once closing: when the client's time is up.
    deadline: Option<Pin<Box<Sleep>>>,
    /// Who to ask for a close when the socket stalls.
    session: Recipient<CloseSession>,
    write_timeout: Duration,
    /// When the socket last took bytes (or the wait for it began).
    progressed: Instant,
    /// Running while the socket takes nothing of what waits for it.
    stall: Option<Pin<Box<Sleep>>>,
    /// The session was asked to close for a stalled socket.
    stall_reported: bool,
}

/// What an item puts on the wire, and its opcode.
fn payload(item: &Outbound) -> (&[u8], OpCode) {
    match item {
        Outbound::Frame(text) => (text.as_bytes(), OpCode::Text),
        Outbound::Delivery(envelope) => (envelope.frame.as_bytes(), OpCode::Text),
        Outbound::Ping(payload) => (payload, OpCode::Ping),
        Outbound::Pong(payload) => (payload, OpCode::Pong),
        Outbound::Binary(payload) => (payload, OpCode::Binary),
    }
}

/// Encodes one item. `now`: the clock, read once per batch (the first
/// delivery that needs it), not once per frame.
fn encode(buf: &mut BytesMut, item: &Outbound, now: &mut Option<u64>) {
    if let Outbound::Delivery(envelope) = item {
        if envelope.published_us > 0 {
            let now = *now.get_or_insert_with(now_us);
            let latency_us = now.saturating_sub(envelope.published_us);
            metrics::record_delivery(latency_us as f64 / 1e6);
        }
    }
    let (payload, op) = payload(item);
    Parser::write_message(buf, payload, op, true, false);
}

/// Writes as much of `data` as the socket takes now.
fn write_some(socket: &TcpStream, data: &[u8]) -> io::Result<usize> {
    let mut written = 0;
    while written < data.len() {
        match socket.try_write(&data[written..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}

impl SocketWriter {
    pub(super) fn new(
        socket: Rc<TcpStream>,
        queue: OutboundQueue,
        held: Held,
        token: TaskTrackerToken,
        session: Recipient<CloseSession>,
        write_timeout: Duration,
    ) -> SocketWriter {
        SocketWriter {
            socket,
            queue,
            unsent: BytesMut::new(),
            phase: Phase::Open,
            _held: held,
            token: Some(token),
            deadline: None,
            session,
            write_timeout,
            progressed: Instant::now(),
            stall: None,
            stall_reported: false,
        }
    }

    /// Writes what the socket did not take before; `Ready(Ok)` once all of
    /// it is gone, `Pending` (woken when the socket has room) otherwise.
    fn poll_unsent(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.unsent.is_empty() {
            let n = write_some(&self.socket, &self.unsent)?;
            if n > 0 {
                self.progressed = Instant::now();
            }
            self.unsent.advance(n);
            if !self.unsent.is_empty() {
                std::task::ready!(self.socket.poll_write_ready(cx))?;
            }
        }
        // Nothing kept while the client keeps up.
        self.unsent = BytesMut::new();
        Poll::Ready(Ok(()))
    }

    /// Encodes what is queued (up to [`CHUNK`]) and writes it; what the
    /// socket does not take goes to `unsent`. The session's status, and
    /// whether more is queued.
    fn write_queued(&mut self, cx: &mut Context<'_>) -> io::Result<(Status, bool)> {
        SCRATCH.with(|scratch| {
            let mut buf = scratch.borrow_mut();
            buf.clear();
            let mut now = None;
            // Stopped at CHUNK: more may be queued (no wake-up will say so).
            let mut full = false;
            let status = self.queue.poll_drain(cx, |item| {
                encode(&mut buf, &item, &mut now);
                full = buf.len() >= CHUNK;
                !full
            });
            if !buf.is_empty() {
                let n = write_some(&self.socket, &buf)?;
                if n < buf.len() {
                    if n > 0 || self.unsent.is_empty() {
                        // The wait for the socket starts now.
                        self.progressed = Instant::now();
                    }
                    self.unsent.extend_from_slice(&buf[n..]);
                }
            }
            if buf.capacity() > 2 * CHUNK {
                *buf = BytesMut::new();
            }
            Ok((status, full))
        })
    }

    /// The session is closing: what is queued (not for `slow consumer`),
    /// then the close frame, behind anything the socket has not taken.
    fn begin_close(&mut self, reason: CloseReason) {
        let backlog = self.queue.take_all();
        if reason != CloseReason::SlowConsumer {
            let mut now = None;
            let limit = self.unsent.len() + CLOSE_BACKLOG;
            for item in &backlog {
                if self.unsent.len() >= limit {
                    // The rest is dropped: the client can recover with `since`.
                    tracing::debug!("close: backlog over 1 MiB dropped");
                    break;
                }
                encode(&mut self.unsent, item, &mut now);
            }
        }
        Parser::write_close(&mut self.unsent, Some(reason.to_ws()), false);
        self.stall = None;
        self.deadline = Some(Box::pin(tokio::time::sleep(CLOSE_TIMEOUT)));
        self.phase = Phase::Closing;
    }

    /// The socket takes nothing of what waits for it: once that has lasted
    /// the write timeout, the session is asked (once) to close as a slow
    /// consumer; its close reaches the writer through the queue.
    fn poll_stall(&mut self, cx: &mut Context<'_>) {
        if self.stall_reported {
            return;
        }
        let deadline = self.progressed + self.write_timeout;
        let stall = self
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if stall.deadline() != deadline {
            stall.as_mut().reset(deadline);
        }
        if stall.as_mut().poll(cx).is_ready() {
            tracing::debug!("the client's socket took nothing within limits.write_timeout_s");
            self.stall_reported = true;
            self.session
                .do_send(CloseSession(CloseReason::SlowConsumer));
        }
    }

    /// The open phase: `Ready` when the session closes or ends.
    fn poll_open(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Status>> {
        for _ in 0..CHUNKS_PER_RUN {
            if self.poll_unsent(cx)?.is_pending() {
                // Blocked on the client: only a close, the end or the
                // write timeout matter now.
                return match self.queue.watch(cx) {
                    Status::Open => {
                        self.poll_stall(cx);
                        Poll::Pending
                    }
                    status => Poll::Ready(Ok(status)),
                };
            }
            self.stall = None;
            let (status, more) = self.write_queued(cx)?;
            if status != Status::Open {
                return Poll::Ready(Ok(status));
            }
            if !more && self.unsent.is_empty() {
                // Drained: the queue wakes us on its next push.
                return Poll::Pending;
            }
        }
        // Others get the thread; we go on at once after them.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Closing and lingering: `Ready` when the connection can go.
    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(deadline) = self.deadline.as_mut() {
            if deadline.as_mut().poll(cx).is_ready() {
                tracing::debug!("closing client did not finish in time: connection reset");
                let _ = socket2::SockRef::from(&*self.socket).set_linger(Some(Duration::ZERO));
                return Poll::Ready(());
            }
        }
        if let Phase::Closing = self.phase {
            match self.poll_unsent(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(())) => {
                    // The close frame is the kernel's now.
                    self.token = None;
                    let socket = socket2::SockRef::from(&*self.socket);
                    if socket.shutdown(std::net::Shutdown::Write).is_err() {
                        return Poll::Ready(());
                    }
                    self.phase = Phase::Lingering;
                }
            }
        }
        let mut sink = [0u8; 512];
        loop {
            match self.socket.poll_read_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(())) => {}
            }
            match self.socket.try_read(&mut sink) {
                Ok(0) => return Poll::Ready(()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return Poll::Ready(()),
            }
        }
    }
}

impl Future for SocketWriter {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if let Phase::Open = this.phase {
            match this.poll_open(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(Status::Closing(reason))) => this.begin_close(reason),
                // The session is gone without a close, or the socket failed:
                // nobody to write to.
                Poll::Ready(Ok(_)) | Poll::Ready(Err(_)) => return Poll::Ready(()),
            }
        }
        this.poll_close(cx)
    }
}

impl Drop for SocketWriter {
    fn drop(&mut self) {
        // The connection is gone: nothing queued from now on is kept.
        self.queue.abandon();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_item_is_one_frame() {
        let mut buf = BytesMut::new();
        let mut now = None;
        encode(&mut buf, &Outbound::Frame("hello".into()), &mut now);
        encode(&mut buf, &Outbound::Ping(*b"12345678"), &mut now);
        // FIN + text, 5 bytes, "hello"; FIN + ping, 8 bytes.
        assert_eq!(&buf[..], b"\x81\x05hello\x89\x0812345678");
    }
}
