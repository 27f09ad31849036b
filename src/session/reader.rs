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
//! It grows to exactly what the frame at its head needs, never by doubling:
//! with the limits below it never holds more than one frame header, one
//! payload of at most `limits.max_message_bytes` and one read
//! ([`READ_SIZE`]); a fragmented message is put together in a buffer of
//! its own, again never over the limit.
//!
//! Limits, checked from each frame's header before its payload is read
//! (actix-http's codec would buffer a frame whole before looking at its
//! length): a data frame over `limits.max_message_bytes`, or one that
//! would take a fragmented message past it, is refused
//! ([`ReadError::TooBig`], 1009); a control frame over 125 bytes, or a
//! frame with a reserved bit set (no extension is negotiated), is a
//! protocol error (1002).

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

/// The largest control frame payload (RFC 6455 §5.5).
const MAX_CONTROL: u64 = 125;

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

impl ReadError {
    /// How the session closes for it; `None`: the connection is gone, there
    /// is nobody to close.
    pub fn close_reason(&self) -> Option<crate::protocol::CloseReason> {
        use crate::protocol::CloseReason;
        match self {
            ReadError::TooBig => Some(CloseReason::MessageTooBig),
            ReadError::InvalidUtf8 => Some(CloseReason::InvalidPayload),
            ReadError::Protocol(_) => Some(CloseReason::ProtocolError),
            ReadError::Io(_) => None,
        }
    }
}

impl From<ProtocolError> for ReadError {
    fn from(e: ProtocolError) -> Self {
        match e {
            ProtocolError::Overflow => ReadError::TooBig,
            // The codec does no I/O: its `Io` errors are frames it refused
            // (reserved bits set, a close reason that is not UTF-8).
            e => ReadError::Protocol(e),
        }
    }
}

/// What a frame's header says, once enough of it is in.
#[derive(Debug, PartialEq, Eq)]
struct Header {
    /// Header bytes (with the mask).
    len: usize,
    opcode: u8,
    payload: u64,
}

/// Reads the header at the head of `buf`: `None` until it is complete.
fn peek_header(buf: &[u8]) -> Result<Option<Header>, ReadError> {
    let (Some(&first), Some(&second)) = (buf.first(), buf.get(1)) else {
        return Ok(None);
    };
    if first & 0x70 != 0 {
        return Err(ReadError::Protocol(ProtocolError::Io(io::Error::new(
            io::ErrorKind::InvalidData,
            "reserved bits set without an extension",
        ))));
    }
    let (len, payload) = match second & 0x7f {
        126 => match buf.get(2..4) {
            Some(b) => (4, u64::from(u16::from_be_bytes([b[0], b[1]]))),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => (10, u64::from_be_bytes(b.try_into().unwrap_or_default())),
            None => return Ok(None),
        },
        n => (2, u64::from(n)),
    };
    let masked = second & 0x80 != 0;
    Ok(Some(Header {
        len: len + if masked { 4 } else { 0 },
        opcode: first & 0x0f,
        payload,
    }))
}

/// Grows `buf` to hold `total` bytes, allocating exactly that (`reserve`
/// may double the capacity).
fn grow_exact(buf: &mut BytesMut, total: usize) {
    if buf.capacity() >= total {
        return;
    }
    let mut grown = BytesMut::with_capacity(total);
    grown.extend_from_slice(buf);
    *buf = grown;
}

/// A fragmented message being put together. The fragments are copied:
/// each one's bytes would otherwise keep the whole read buffer it arrived
/// in alive (a client sending one-byte fragments one at a time would hold
/// a buffer per byte).
struct Fragments {
    text: bool,
    whole: Vec<u8>,
    /// How much of a text message is known to be valid UTF-8: it is
    /// checked fragment by fragment, so invalid text fails at once (1007)
    /// instead of after the last fragment.
    valid: usize,
}

pub struct FrameReader {
    socket: Rc<TcpStream>,
    buf: BytesMut,
    codec: Codec,
    max_bytes: usize,
    fragments: Option<Fragments>,
    /// The size of the incomplete frame at the head of the buffer (the
    /// buffer was made exactly that big), else 0.
    want: usize,
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
            want: 0,
            done: false,
        }
    }

    /// Checks the header of the frame at the head of the buffer against
    /// the limits; returns the bytes the whole frame takes, once known.
    fn check_head(&self) -> Result<Option<usize>, ReadError> {
        let Some(header) = peek_header(&self.buf)? else {
            return Ok(None);
        };
        let control = header.opcode & 0x08 != 0;
        if control && header.payload > MAX_CONTROL {
            return Err(ReadError::Protocol(ProtocolError::InvalidLength(
                usize::try_from(header.payload).unwrap_or(usize::MAX),
            )));
        }
        let so_far = match (&self.fragments, header.opcode) {
            (Some(fragments), 0) => fragments.whole.len() as u64,
            _ => 0,
        };
        if !control && so_far.saturating_add(header.payload) > self.max_bytes as u64 {
            return Err(ReadError::TooBig);
        }
        // Within the limit, so it fits a usize.
        Ok(Some(header.len + header.payload as usize))
    }

    /// The next whole message in the buffer, if there is one.
    fn decode(&mut self) -> Result<Option<AggregatedMessage>, ReadError> {
        loop {
            let Some(frame_len) = self.check_head()? else {
                return Ok(None);
            };
            if self.buf.len() < frame_len {
                grow_exact(&mut self.buf, frame_len);
                self.want = frame_len;
                return Ok(None);
            }
            self.want = 0;
            let Some(frame) = self.codec.decode(&mut self.buf)? else {
                return Ok(None);
            };
            let message = match frame {
                Frame::Text(bytes) => AggregatedMessage::Text(text(bytes)?),
                Frame::Binary(bytes) => AggregatedMessage::Binary(bytes),
                // Copied (at most 125 bytes): a ping's payload waits in the
                // outbound queue as the pong's, and must not keep the read
                // buffer it came in alive meanwhile.
                Frame::Ping(bytes) => AggregatedMessage::Ping(Bytes::copy_from_slice(&bytes)),
                // Copied too: the session compares it with its last ping.
                Frame::Pong(bytes) => AggregatedMessage::Pong(Bytes::copy_from_slice(&bytes)),
                Frame::Close(reason) => AggregatedMessage::Close(reason),
                Frame::Continuation(item) => match self.fragment(item)? {
                    Some(message) => message,
                    None => continue,
                },
            };
            return Ok(Some(message));
        }
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
                whole: Vec::new(),
                valid: 0,
            });
        }
        let Some(fragments) = self.fragments.as_mut() else {
            return Err(ReadError::Protocol(ProtocolError::ContinuationNotStarted));
        };
        if fragments.whole.len() + bytes.len() > self.max_bytes {
            return Err(ReadError::TooBig);
        }
        fragments.whole.reserve_exact(bytes.len());
        fragments.whole.extend_from_slice(&bytes);
        if fragments.text {
            match std::str::from_utf8(&fragments.whole[fragments.valid..]) {
                Ok(_) => fragments.valid = fragments.whole.len(),
                // A character cut at the fragment's end may be completed
                // by the next one.
                Err(e) if e.error_len().is_none() => fragments.valid += e.valid_up_to(),
                Err(_) => return Err(ReadError::InvalidUtf8),
            }
        }
        if !last {
            return Ok(None);
        }
        let Fragments {
            text: is_text,
            whole,
            ..
        } = self.fragments.take().expect("checked above");
        let whole = Bytes::from(whole);
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
                self.want = 0;
            }
            if let Err(e) = std::task::ready!(self.socket.poll_read_ready(cx)) {
                return Poll::Ready(Err(ReadError::Io(e)));
            }
            let spare = self.buf.capacity() - self.buf.len();
            // The frame being read has its room already; else make some.
            let sized = self.buf.len() < self.want && spare > 0;
            if !sized && spare < READ_SIZE / 4 {
                let total = self.buf.len() + READ_SIZE;
                grow_exact(&mut self.buf, total);
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
