//! The wire protocol of contract section 3: client frames, server frames,
//! error codes, close codes, room names and message ids.
//!
//! Everything a client can see is defined here, so the contract's tables are
//! visible in one place: [`ClientFrame`] (client → server), the `*_frame`
//! builders (server → client), [`ErrorCode`] and [`CloseReason`].

use std::fmt;
use std::str::FromStr;

use bytestring::ByteString;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A room name: 1–128 characters of `[A-Za-z0-9_.:-]`. Only constructible valid.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomName(String);

impl RoomName {
    pub fn parse(s: &str) -> Result<RoomName, String> {
        let ok = !s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'));
        if ok {
            Ok(RoomName(s.to_owned()))
        } else {
            Err(format!(
                "invalid room name {:?}: expected 1-128 characters of [A-Za-z0-9_.:-]",
                truncate(s, 140)
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A user id (the JWT `sub`): 1–256 bytes.
pub fn valid_user_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 256
}

/// A message id `{ms}-{seq}`, compared numerically as the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MessageId {
    pub ms: u64,
    pub seq: u64,
}

impl MessageId {
    /// The next id after `self` for a publish at `now_ms`: ids strictly
    /// increase even when the clock stands still or goes back.
    pub fn next(self, now_ms: u64) -> MessageId {
        if now_ms > self.ms {
            MessageId { ms: now_ms, seq: 0 }
        } else {
            MessageId {
                ms: self.ms,
                seq: self.seq + 1,
            }
        }
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl FromStr for MessageId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "invalid message id {:?}: expected {{ms}}-{{seq}}",
                truncate(s, 64)
            )
        };
        let (ms, seq) = s.split_once('-').ok_or_else(bad)?;
        let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
        if !digits(ms) || !digits(seq) {
            return Err(bad());
        }
        Ok(MessageId {
            ms: ms.parse().map_err(|_| bad())?,
            seq: seq.parse().map_err(|_| bad())?,
        })
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A client's `ref`: a string or a number, echoed verbatim.
pub type Ref = Option<Value>;

/// Client → server frames (contract section 3, first table).
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ClientFrame {
    Join {
        room: String,
        #[serde(default)]
        since: Option<String>,
    },
    Leave {
        room: String,
    },
    Publish {
        room: String,
        data: Value,
    },
    Direct {
        to: String,
        data: Value,
    },
    Presence {
        room: String,
    },
    Task {
        name: String,
        #[serde(default)]
        payload: Option<Value>,
        #[serde(default)]
        idempotency_key: Option<String>,
    },
    Refresh {
        token: String,
    },
    Ping,
}

impl ClientFrame {
    /// The frame's `type`, for metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientFrame::Join { .. } => "join",
            ClientFrame::Leave { .. } => "leave",
            ClientFrame::Publish { .. } => "publish",
            ClientFrame::Direct { .. } => "direct",
            ClientFrame::Presence { .. } => "presence",
            ClientFrame::Task { .. } => "task",
            ClientFrame::Refresh { .. } => "refresh",
            ClientFrame::Ping => "ping",
        }
    }
}

/// Parses one text frame. On failure returns the `bad_request` error with
/// whatever valid `ref` could be recovered, so the reply can still carry it.
pub fn parse_client_frame(text: &str) -> Result<(ClientFrame, Ref), (ErrorReply, Ref)> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| (ErrorReply::bad_request(format!("not JSON: {e}")), None))?;
    let Value::Object(mut obj) = value else {
        return Err((
            ErrorReply::bad_request("a frame must be a JSON object"),
            None,
        ));
    };
    let reference = match obj.remove("ref") {
        None | Some(Value::Null) => None,
        Some(v @ (Value::String(_) | Value::Number(_))) => Some(v),
        Some(_) => {
            return Err((
                ErrorReply::bad_request("`ref` must be a string or a number"),
                None,
            ))
        }
    };
    match ClientFrame::deserialize(Value::Object(obj)) {
        Ok(frame) => Ok((frame, reference)),
        Err(e) => Err((ErrorReply::bad_request(describe_serde_error(&e)), reference)),
    }
}

fn describe_serde_error(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    // serde's messages end with " at line L column C", meaningless for a frame.
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_owned(),
        None => msg,
    }
}

/// The error codes of contract section 3 ("Errors that keep the connection open").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Forbidden,
    LimitExceeded,
    RateLimited,
    NotFound,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Internal => "internal",
        }
    }
}

/// An `error` frame's code and message.
#[derive(Debug, Clone)]
pub struct ErrorReply {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorReply {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorReply {
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }
    /// `internal` never says more than this; details go to the log.
    pub fn internal() -> Self {
        Self::new(ErrorCode::Internal, "processing failed")
    }
}

/// Every way the server closes a WebSocket (contract section 3, "Closes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    Normal,
    GoingAway,
    ClientTimeout,
    ProtocolError,
    BinaryNotSupported,
    Unauthorized,
    TokenExpired,
    ConnectionLimit,
    ForbiddenOrigin,
    RateLimit,
    Kicked,
    MessageTooBig,
    InternalError,
    Overloaded,
    SlowConsumer,
    Unavailable,
}

impl CloseReason {
    pub fn code(self) -> u16 {
        match self {
            CloseReason::Normal => 1000,
            CloseReason::GoingAway | CloseReason::ClientTimeout => 1001,
            CloseReason::ProtocolError => 1002,
            CloseReason::BinaryNotSupported => 1003,
            CloseReason::Unauthorized
            | CloseReason::TokenExpired
            | CloseReason::ConnectionLimit
            | CloseReason::ForbiddenOrigin
            | CloseReason::RateLimit
            | CloseReason::Kicked => 1008,
            CloseReason::MessageTooBig => 1009,
            CloseReason::InternalError => 1011,
            CloseReason::Overloaded | CloseReason::SlowConsumer | CloseReason::Unavailable => 1013,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            CloseReason::Normal => "",
            CloseReason::GoingAway => "going away",
            CloseReason::ClientTimeout => "client timeout",
            CloseReason::ProtocolError => "protocol error",
            CloseReason::BinaryNotSupported => "binary not supported",
            CloseReason::Unauthorized => "unauthorized",
            CloseReason::TokenExpired => "token expired",
            CloseReason::ConnectionLimit => "connection limit",
            CloseReason::ForbiddenOrigin => "forbidden origin",
            CloseReason::RateLimit => "rate limit",
            CloseReason::Kicked => "kicked",
            CloseReason::MessageTooBig => "message too big",
            CloseReason::InternalError => "internal error",
            CloseReason::Overloaded => "overloaded",
            CloseReason::SlowConsumer => "slow consumer",
            CloseReason::Unavailable => "unavailable",
        }
    }

    /// A label for metrics (`connections_rejected_total{reason}` and closes).
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::Normal => "normal",
            CloseReason::GoingAway => "going_away",
            CloseReason::ClientTimeout => "client_timeout",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::BinaryNotSupported => "binary_not_supported",
            CloseReason::Unauthorized => "unauthorized",
            CloseReason::TokenExpired => "token_expired",
            CloseReason::ConnectionLimit => "connection_limit",
            CloseReason::ForbiddenOrigin => "forbidden_origin",
            CloseReason::RateLimit => "rate_limit",
            CloseReason::Kicked => "kicked",
            CloseReason::MessageTooBig => "message_too_big",
            CloseReason::InternalError => "internal_error",
            CloseReason::Overloaded => "overloaded",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::Unavailable => "unavailable",
        }
    }

    pub fn to_ws(self) -> actix_ws::CloseReason {
        let description = match self.reason() {
            "" => None,
            r => Some(r.to_owned()),
        };
        actix_ws::CloseReason {
            code: actix_ws::CloseCode::from(self.code()),
            description,
        }
    }
}

// ---- server → client frames ------------------------------------------------
//
// Built with serde_json's `json!`-free writers so that `data` (kept as raw
// JSON) is copied verbatim and each frame is serialized exactly once.

#[derive(Serialize)]
struct RefOnly<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    reference: &'a Ref,
}

fn to_text<T: Serialize>(value: &T) -> ByteString {
    // Serializing our own frame types cannot fail (string keys, no maps with
    // non-string keys, no non-finite floats).
    ByteString::from(serde_json::to_string(value).unwrap_or_default())
}

pub fn welcome_frame(
    connection_id: &str,
    user: &str,
    instance: &str,
    heartbeat_s: u64,
) -> ByteString {
    #[derive(Serialize)]
    struct Welcome<'a> {
        #[serde(rename = "type")]
        kind: &'a str,
        connection_id: &'a str,
        user: &'a str,
        instance: &'a str,
        heartbeat_s: u64,
    }
    to_text(&Welcome {
        kind: "welcome",
        connection_id,
        user,
        instance,
        heartbeat_s,
    })
}

/// `ack` for join (`room`, `recovered`?), leave (`room`), publish/direct
/// (`id`), refresh (nothing else).
#[derive(Serialize, Default)]
pub struct Ack<'a> {
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    pub reference: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub room: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovered: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_id: Option<&'a str>,
}

pub fn ack_frame(ack: &Ack<'_>) -> ByteString {
    #[derive(Serialize)]
    struct Tagged<'a, 'b> {
        #[serde(rename = "type")]
        kind: &'static str,
        #[serde(flatten)]
        ack: &'a Ack<'b>,
    }
    to_text(&Tagged { kind: "ack", ack })
}

pub fn error_frame(err: &ErrorReply, reference: &Ref) -> ByteString {
    #[derive(Serialize)]
    struct Error<'a> {
        #[serde(rename = "type")]
        kind: &'a str,
        code: ErrorCode,
        message: &'a str,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: &'a Ref,
    }
    to_text(&Error {
        kind: "error",
        code: err.code,
        message: &err.message,
        reference,
    })
}

pub fn pong_frame(reference: &Ref) -> ByteString {
    to_text(&RefOnly {
        kind: "pong",
        reference,
    })
}

/// One user's entry in a presence answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PresenceEntry {
    pub user: String,
    pub connections: u64,
}

pub fn presence_frame(room: &str, users: &[PresenceEntry], reference: &Ref) -> ByteString {
    #[derive(Serialize)]
    struct Presence<'a> {
        #[serde(rename = "type")]
        kind: &'a str,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: &'a Ref,
        room: &'a str,
        users: &'a [PresenceEntry],
    }
    to_text(&Presence {
        kind: "presence",
        reference,
        room,
        users,
    })
}

/// `joined` / `left`.
pub fn presence_change_frame(joined: bool, room: &str, user: &str) -> ByteString {
    #[derive(Serialize)]
    struct Change<'a> {
        #[serde(rename = "type")]
        kind: &'a str,
        room: &'a str,
        user: &'a str,
    }
    to_text(&Change {
        kind: if joined { "joined" } else { "left" },
        room,
        user,
    })
}

/// `{"type":"message","id","room","from","data","ts"}`.
pub fn message_frame<D: Serialize + ?Sized>(
    id: &str,
    room: &str,
    from: &str,
    data: &D,
    ts: u64,
) -> ByteString {
    #[derive(Serialize)]
    struct Message<'a, D: ?Sized> {
        #[serde(rename = "type")]
        kind: &'a str,
        id: &'a str,
        room: &'a str,
        from: &'a str,
        data: &'a D,
        ts: u64,
    }
    to_text(&Message {
        kind: "message",
        id,
        room,
        from,
        data,
        ts,
    })
}

/// `{"type":"direct","id","from","data","ts"}`.
pub fn direct_frame<D: Serialize + ?Sized>(id: &str, from: &str, data: &D, ts: u64) -> ByteString {
    #[derive(Serialize)]
    struct Direct<'a, D: ?Sized> {
        #[serde(rename = "type")]
        kind: &'a str,
        id: &'a str,
        from: &'a str,
        data: &'a D,
        ts: u64,
    }
    to_text(&Direct {
        kind: "direct",
        id,
        from,
        data,
        ts,
    })
}

/// `{"type":"broadcast","id","data","ts"}`.
pub fn broadcast_frame<D: Serialize + ?Sized>(id: &str, data: &D, ts: u64) -> ByteString {
    #[derive(Serialize)]
    struct Broadcast<'a, D: ?Sized> {
        #[serde(rename = "type")]
        kind: &'a str,
        id: &'a str,
        data: &'a D,
        ts: u64,
    }
    to_text(&Broadcast {
        kind: "broadcast",
        id,
        data,
        ts,
    })
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    #[test]
    fn message_ids_parse_and_order() {
        let a: MessageId = "1732438800123-0".parse().unwrap();
        let b: MessageId = "1732438800123-10".parse().unwrap();
        let c: MessageId = "1732438800124-2".parse().unwrap();
        assert!(a < b && b < c);
        assert_eq!(a.to_string(), "1732438800123-0");
        for bad in [
            "",
            "1",
            "-1",
            "1-",
            "a-1",
            "1-2-3",
            "1 -2",
            "+1-2",
            "99999999999999999999999-0",
        ] {
            assert!(bad.parse::<MessageId>().is_err(), "{bad}");
        }
        assert_eq!(a.next(a.ms), MessageId { ms: a.ms, seq: 1 });
        assert_eq!(a.next(a.ms - 5), MessageId { ms: a.ms, seq: 1 });
        assert_eq!(
            a.next(a.ms + 1),
            MessageId {
                ms: a.ms + 1,
                seq: 0
            }
        );
    }

    #[test]
    fn room_names() {
        assert!(RoomName::parse("chat.general:1_-").is_ok());
        assert!(RoomName::parse("").is_err());
        assert!(RoomName::parse(&"a".repeat(129)).is_err());
        assert!(RoomName::parse("a b").is_err());
        assert!(RoomName::parse("é").is_err());
    }

    #[test]
    fn frames_parse_with_ref() {
        let (f, r) =
            parse_client_frame(r#"{"type":"publish","room":"a","data":{"x":[1,2]},"ref":7}"#)
                .unwrap();
        assert_eq!(r, Some(Value::from(7)));
        match f {
            ClientFrame::Publish { room, data } => {
                assert_eq!(room, "a");
                assert_eq!(data.to_string(), r#"{"x":[1,2]}"#);
            }
            other => panic!("got {other:?}"),
        }
        let (e, r) = parse_client_frame(r#"{"type":"nope","ref":"x"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert_eq!(r, Some(Value::from("x")));
        assert!(parse_client_frame("[1]").is_err());
        assert!(parse_client_frame("{").is_err());
        assert!(parse_client_frame(r#"{"type":"join","room":5}"#).is_err());
    }

    #[test]
    fn message_frame_keeps_raw_data() {
        let data = RawValue::from_string("{\"b\":1,\"a\":2}".into()).unwrap();
        assert_eq!(
            &*message_frame("1-0", "r", "u", &*data, 5),
            r#"{"type":"message","id":"1-0","room":"r","from":"u","data":{"b":1,"a":2},"ts":5}"#
        );
    }
}
