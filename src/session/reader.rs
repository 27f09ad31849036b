//! The socket reader: the client's frames, as the session actor's stream.
//!
//! After the upgrade the session owns its TCP socket (see [`crate::http::ws`]).
//! This stream reads it and decodes frames with actix-http's WebSocket codec
//! (the one actix-ws wraps), joins fragmented messages, and hands the session
//! one [`AggregatedMessage`] at a time. It reads only when the session asks for
//! the next message, so a session that is busy (waiting on its publishes)
//! stops reading and TCP pushes back on the client.
//!
//! Memory: the read buffer exists only while bytes are in it. It is
//! allocated when a read needs room and given back as soon as everything in
//! it has been decoded, so an idle connection holds no read buffer at all.
//!
//! Limits: a frame over `limits.max_message_bytes` is refused from its
//! header, before its payload is read ([`ReadError::TooBig`]); so is a
//! fragmented message whose fragments add up to more.

use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use actix_codec::Decoder;
use actix_http::ws::{Codec, Frame, Item, ProtocolError};
use actix_ws::AggregatedMessage;
use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use futures_util::Stream;
use tokio::net::TcpStream;

/// Room made for each read (more if a frame needs it).
const READ_SIZE: usize = 4096;

/// Why reading stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// A frame, or a fragmented message, over the size limit.
    #[error("message over the size limit")]
    TooBig,
    /// A text message that is not UTF-8.
    #[error("text message is not valid UTF-8")]
    InvalidUtf8,
    /// A frame that breaks RFC 6455 (unmasked, bad opcode, bad fragment).
    #[error("websocket protocol error: {0}")]
    Protocol(ProtocolError),
    /// The connection failed (reset).
    #[error("connection lost: {0}")]
    Io(io::Error),
}

impl From<ProtocolError> for ReadError {
    fn from(e: ProtocolError) -> Self {
        match e {
            ProtocolError::Overflow => ReadError::TooBig,
            ProtocolError::Io(e) => ReadError::Io(e),
            e => ReadError::Protocol(e),
        }
    }
}

/// A fragmented message being put together. The fragments are copied:
/// each one's bytes would otherwise keep the whole read buffer it arrived
/// in alive (a client sending one-byte fragments one at a time would hold
/// a buffer per byte).
struct Fragments {
    text: bool,
    whole: BytesMut,
}

pub struct FrameReader {
    socket: Rc<TcpStream>,
    buf: BytesMut,
    codec: Codec,
    max_bytes: usize,
    fragments: Option<Fragments>,
    /// The client closed its side (or an error ended the stream).
    done: bool,
}

impl FrameReader {
    /// `leftover`: bytes read with the upgrade request (a client may send
    /// frames before it sees the handshake's answer).
    pub fn new(socket: Rc<TcpStream>, leftover: BytesMut, max_bytes: usize) -> FrameReader {
        FrameReader {
            socket,
            buf: leftover,
            codec: Codec::new().max_size(max_bytes),
            max_bytes,
            fragments: None,
            done: false,
        }
    }

    /// The next whole message in the buffer, if there is one.
    fn decode(&mut self) -> Result<Option<AggregatedMessage>, ReadError> {
        while let Some(frame) = self.codec.decode(&mut self.buf)? {
            let message = match frame {
                Frame::Text(bytes) => AggregatedMessage::Text(text(bytes)?),
                Frame::Binary(bytes) => AggregatedMessage::Binary(bytes),
                // Copied (at most 125 bytes): a ping's payload waits in the
                // outbound queue as the pong's, and must not keep the read
                // buffer it came in alive meanwhile.
                Frame::Ping(bytes) => AggregatedMessage::Ping(Bytes::copy_from_slice(&bytes)),
                Frame::Pong(_) => AggregatedMessage::Pong(Bytes::new()),
                Frame::Close(reason) => AggregatedMessage::Close(reason),
                Frame::Continuation(item) => match self.fragment(item)? {
                    Some(message) => message,
                    None => continue,
                },
            };
            return Ok(Some(message));
        }
        Ok(None)
    }

    /// Adds one fragment; the whole message once the last one is in. The
    /// codec has already checked that fragments start and end in order.
    fn fragment(&mut self, item: Item) -> Result<Option<AggregatedMessage>, ReadError> {
        let (bytes, first, last) = match item {
            Item::FirstText(bytes) => (bytes, Some(true), false),
            Item::FirstBinary(bytes) => (bytes, Some(false), false),
            Item::Continue(bytes) => (bytes, None, false),
            Item::Last(bytes) => (bytes, None, true),
        };
        if let Some(text) = first {
            self.fragments = Some(Fragments {
                text,
                whole: BytesMut::new(),
            });
        }
        let Some(fragments) = self.fragments.as_mut() else {
            return Err(ReadError::Protocol(ProtocolError::ContinuationNotStarted));
        };
        if fragments.whole.len() + bytes.len() > self.max_bytes {
            return Err(ReadError::TooBig);
        }
        fragments.whole.extend_from_slice(&bytes);
        if !last {
            return Ok(None);
        }
        let Fragments {
            text: is_text,
            whole,
        } = self.fragments.take().expect("checked above");
        let whole = whole.freeze();
        Ok(Some(if is_text {
            AggregatedMessage::Text(text(whole)?)
        } else {
            AggregatedMessage::Binary(whole)
        }))
    }

    /// Reads what the socket has; `Ready(Ok(false))` at the end of the
    /// stream.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, ReadError>> {
        loop {
            if self.buf.is_empty() {
                // Everything read is decoded: no buffer held while waiting.
                self.buf = BytesMut::new();
            }
            if let Err(e) = std::task::ready!(self.socket.poll_read_ready(cx)) {
                return Poll::Ready(Err(ReadError::Io(e)));
            }
            if self.buf.capacity() - self.buf.len() < READ_SIZE / 4 {
                self.buf.reserve(READ_SIZE);
            }
            match self.socket.try_read_buf(&mut self.buf) {
                Ok(0) => return Poll::Ready(Ok(false)),
                Ok(_) => return Poll::Ready(Ok(true)),
                // Readiness was stale: wait for the next.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(ReadError::Io(e))),
            }
        }
    }
}

fn text(bytes: Bytes) -> Result<ByteString, ReadError> {
    ByteString::try_from(bytes).map_err(|_| ReadError::InvalidUtf8)
}

impl Stream for FrameReader {
    type Item = Result<AggregatedMessage, ReadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            match this.decode() {
                Ok(Some(message)) => return Poll::Ready(Some(Ok(message))),
                Ok(None) => {}
                Err(e) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            match this.poll_read(cx) {
                Poll::Ready(Ok(true)) => {}
                Poll::Ready(Ok(false)) => {
                    this.done = true;
                    return Poll::Ready(None);
                }
                Poll::Ready(Err(e)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
