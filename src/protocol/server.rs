//! Server → client frames (docs/protocol.md §3, "Server → client"): one encoder
//! per frame type, used by both brokers, so the bytes a client receives are
//! laid out in this file only.
//!
//! Each frame is serialized exactly once per publish; `data` is taken as
//! any `Serialize` (a parsed `Value` or raw JSON) and copied verbatim.

use bytestring::ByteString;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::client::Ref;
use super::codes::{ErrorCode, ErrorReply};

fn to_text<T: Serialize>(value: &T) -> ByteString {
    // Serializing our own frame types cannot fail (string keys, no maps with
    // non-string keys, no non-finite floats).
    let mut text = serde_json::to_string(value).unwrap_or_default();
    // The buffer grew by doubling; a frame kept in history must not hold
    // twice its size (shrinking in place is cheap).
    if text.capacity() > text.len() + 256 {
        text.shrink_to_fit();
    }
    ByteString::from(text)
}

/// `{"type":"welcome","connection_id","user","instance","heartbeat_s"}`.
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

/// An `ack`, built up with what the request produced: `room` and
/// `recovered` for join, `room` for leave, `id` for publish and direct,
/// `task_id` for task, nothing more for refresh.
#[derive(Serialize, Default)]
pub struct Ack<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    reference: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    room: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    recovered: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    task_id: Option<&'a str>,
    /// For refresh: the rooms whose membership ended because the new token
    /// does not allow them.
    #[serde(skip_serializing_if = "Option::is_none")]
    left: Option<&'a [String]>,
}

impl<'a> Ack<'a> {
    /// The ack of the request that carried `reference`.
    pub fn to(reference: &'a Ref) -> Self {
        Ack {
            kind: "ack",
            reference: reference.as_ref(),
            ..Ack::default()
        }
    }
    pub fn room(mut self, room: &'a str) -> Self {
        self.room = Some(room);
        self
    }
    /// Only for a join with `since`; `None` leaves the field out.
    pub fn recovered(mut self, recovered: Option<bool>) -> Self {
        self.recovered = recovered;
        self
    }
    pub fn id(mut self, id: impl ToString) -> Self {
        self.id = Some(id.to_string());
        self
    }
    pub fn task_id(mut self, task_id: &'a str) -> Self {
        self.task_id = Some(task_id);
        self
    }
    /// Left out when empty.
    pub fn left(mut self, rooms: &'a [String]) -> Self {
        self.left = (!rooms.is_empty()).then_some(rooms);
        self
    }
    pub fn encode(&self) -> ByteString {
        to_text(self)
    }
}

/// `{"type":"error","code","message","ref"?}`.
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

/// `{"type":"pong","ref"?}`.
pub fn pong_frame(reference: &Ref) -> ByteString {
    #[derive(Serialize)]
    struct Pong<'a> {
        #[serde(rename = "type")]
        kind: &'a str,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: &'a Ref,
    }
    to_text(&Pong {
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

/// `{"type":"presence","ref"?,"room","users":[{"user","connections"}]}`.
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

/// `{"type":"joined"|"left","room","user"}`.
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
    id: Option<&str>,
    room: &str,
    from: &str,
    data: &D,
    ts: u64,
) -> ByteString {
    #[derive(Serialize)]
    struct Message<'a, D: ?Sized> {
        #[serde(rename = "type")]
        kind: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a str>,
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

/// Where a task is in its life, as clients and the API see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskStatus {
    Queued,
    Running,
    /// Only in `task` frames: a progress report while running.
    Progress,
    Done,
    Failed,
}

impl TaskStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Queued => "queued",
            TaskStatus::Running => "running",
            TaskStatus::Progress => "progress",
            TaskStatus::Done => "done",
            TaskStatus::Failed => "failed",
        }
    }

    /// Done or failed: nothing happens to the task any more.
    pub fn is_final(self) -> bool {
        matches!(self, TaskStatus::Done | TaskStatus::Failed)
    }
}

/// A `task` frame: one step of a task's life, sent to every connection of
/// the user who submitted it.
#[derive(Debug, Serialize)]
pub struct TaskEvent<'a> {
    pub task_id: &'a str,
    pub status: TaskStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<u8>,
    /// With a progress report: what the backend said it is doing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<&'a serde_json::value::RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
}

impl TaskEvent<'_> {
    /// `{"type":"task","task_id","status",...}`.
    pub fn encode(&self) -> ByteString {
        #[derive(Serialize)]
        struct Tagged<'a, 'b> {
            #[serde(rename = "type")]
            kind: &'static str,
            #[serde(flatten)]
            event: &'a TaskEvent<'b>,
        }
        to_text(&Tagged {
            kind: "task",
            event: self,
        })
    }
}

/// The answer to `task_status`: a `task` frame with the whole record
/// (`record` is the record's JSON object, as `GET /api/tasks/{id}` gives it).
pub fn task_record_frame(record: &serde_json::Map<String, Value>, reference: &Ref) -> ByteString {
    #[derive(Serialize)]
    struct Record<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: &'a Ref,
        #[serde(flatten)]
        record: &'a serde_json::Map<String, Value>,
    }
    to_text(&Record {
        kind: "task",
        reference,
        record,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    #[test]
    fn message_frame_keeps_raw_data() {
        let data = RawValue::from_string("{\"b\":1,\"a\":2}".into()).unwrap();
        assert_eq!(
            &*message_frame(Some("1-0"), "r", "u", &*data, 5),
            r#"{"type":"message","id":"1-0","room":"r","from":"u","data":{"b":1,"a":2},"ts":5}"#
        );
    }

    #[test]
    fn acks_carry_what_the_request_produced() {
        let r = Some(Value::from(3));
        assert_eq!(&*Ack::to(&r).encode(), r#"{"type":"ack","ref":3}"#);
        assert_eq!(
            &*Ack::to(&None).room("lobby").recovered(Some(true)).encode(),
            r#"{"type":"ack","room":"lobby","recovered":true}"#
        );
        assert_eq!(
            &*Ack::to(&r).room("lobby").recovered(None).encode(),
            r#"{"type":"ack","ref":3,"room":"lobby"}"#
        );
        assert_eq!(
            &*Ack::to(&r).id("1-2").encode(),
            r#"{"type":"ack","ref":3,"id":"1-2"}"#
        );
    }
}
