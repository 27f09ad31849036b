//! What travels through Redis (docs/protocol.md §10): the payloads on the
//! room, user and broadcast channels, and the entries of the history
//! streams. Decoding turns a channel message into the [`Envelope`] the hubs
//! deliver; the client-visible bytes are built by [`crate::protocol`] only.
//!
//! Every payload is untrusted (any backend may `PUBLISH`): a payload that
//! does not fit is [`Malformed`] and dropped by the subscriber. A room
//! message published straight into Redis without an id is delivered
//! without one: it is not in history, and an id made up here could be one
//! Redis hands out later.

use bytestring::ByteString;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::broker::fanout::{Envelope, LocalIds, Stamp};
use crate::clock::now_ms;
use crate::protocol::{message_frame, valid_user_id, MessageId, RoomName};
use crate::redis::keys::{ChannelOf, Keys};

/// A channel message that is not one of ours, nor a backend's `{"data":…}`.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed payload on a hub channel")]
pub struct Malformed;

/// The payload that closes every connection of a user (`/api/users/{u}/disconnect`).
pub const KICK: &str = r#"{"type":"kick"}"#;

/// `{"id","data","ts"}` on `{prefix}:broadcast`.
pub fn broadcast_payload(id: &str, data: &RawValue, ts: u64) -> String {
    #[derive(Serialize)]
    struct Broadcast<'a> {
        id: &'a str,
        data: &'a RawValue,
        ts: u64,
    }
    serde_json::to_string(&Broadcast { id, data, ts }).unwrap_or_default()
}

/// A history stream entry's field `b`: the room message without its id
/// (the stream id is the id), as `publish_room.lua` writes it.
#[derive(Deserialize)]
struct StreamBody<'a> {
    #[serde(borrow)]
    room: &'a str,
    #[serde(borrow)]
    from: std::borrow::Cow<'a, str>,
    data: &'a RawValue,
    ts: u64,
}

/// The `message` frame of a history entry; `None` when the entry is not ours.
pub fn history_frame(id: MessageId, body: &str) -> Option<ByteString> {
    // `b` is the message object without its opening brace and id.
    let object = format!("{{{body}");
    let entry: StreamBody<'_> = serde_json::from_str(&object).ok()?;
    Some(message_frame(
        Some(&id.to_string()),
        entry.room,
        &entry.from,
        entry.data,
        entry.ts,
    ))
}

/// The envelopes of a history range (oldest first), for a catch-up.
pub fn history_envelopes(
    room: &RoomName,
    reply: redis::streams::StreamRangeReply,
) -> Vec<Envelope> {
    reply
        .ids
        .into_iter()
        .filter_map(|entry| {
            let id = entry.id.parse::<MessageId>().ok()?;
            let body = entry.map.get("b")?;
            let body = redis::from_redis_value::<String>(body.clone()).ok()?;
            let frame = history_frame(id, &body)?;
            Some(Envelope::replayed(room.clone(), id, frame))
        })
        .collect()
}

/// `data` present, `null` included (a plain `Option` would take `null` for
/// absent).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct RoomPayload {
    #[serde(rename = "type")]
    kind: Option<String>,
    id: Option<String>,
    from: Option<String>,
    user: Option<String>,
    #[serde(default, deserialize_with = "present")]
    data: Option<Box<RawValue>>,
    ts: Option<u64>,
}

#[derive(Deserialize)]
struct BroadcastPayload {
    id: Option<String>,
    data: Box<RawValue>,
    ts: Option<u64>,
}

#[derive(Deserialize)]
struct UserPayload {
    #[serde(rename = "type")]
    kind: Option<String>,
    #[serde(default, deserialize_with = "present")]
    data: Option<Box<RawValue>>,
    ts: Option<u64>,
}

/// Turns one message on `channel` into an envelope. Room ids present are
/// noted in `ids` (the last delivered, for catch-ups); direct and
/// broadcast ids missing from a payload are given from there.
pub fn decode(
    keys: &Keys,
    channel: &str,
    payload: &[u8],
    ids: &mut LocalIds,
) -> Result<Envelope, Malformed> {
    match keys.channel_target(channel).ok_or(Malformed)? {
        ChannelOf::Broadcast => decode_broadcast(payload, ids),
        ChannelOf::Room(room) => decode_room(room, payload, ids),
        ChannelOf::User(user) => decode_user(&user, payload, ids),
    }
}

fn decode_broadcast(payload: &[u8], ids: &mut LocalIds) -> Result<Envelope, Malformed> {
    let p: BroadcastPayload = serde_json::from_slice(payload).map_err(|_| Malformed)?;
    let id = p.id.unwrap_or_else(|| ids.next_other().to_string());
    let at = Stamp::at_ms(p.ts.unwrap_or_else(now_ms));
    Ok(Envelope::broadcast(&id, &*p.data, at))
}

fn decode_room(room: RoomName, payload: &[u8], ids: &mut LocalIds) -> Result<Envelope, Malformed> {
    let p: RoomPayload = serde_json::from_slice(payload).map_err(|_| Malformed)?;
    if let Some(kind) = p.kind.as_deref() {
        // `joined` / `left` (from the presence scripts), encoded here again.
        let joined = match kind {
            "joined" => true,
            "left" => false,
            _ => return Err(Malformed),
        };
        let user = p
            .user
            .as_deref()
            .filter(|u| valid_user_id(u))
            .ok_or(Malformed)?;
        return Ok(Envelope::presence_change(room, joined, user));
    }
    let data = p.data.ok_or(Malformed)?;
    let id = match p.id.as_deref().map(str::parse::<MessageId>) {
        Some(Ok(id)) => {
            ids.seen_room(&room, id);
            Some(id)
        }
        Some(Err(_)) => return Err(Malformed),
        None => None,
    };
    let at = Stamp::at_ms(p.ts.unwrap_or_else(now_ms));
    let from = p.from.as_deref().unwrap_or("server");
    Ok(Envelope::message(room, id, from, &*data, at))
}

fn decode_user(user: &str, payload: &[u8], ids: &mut LocalIds) -> Result<Envelope, Malformed> {
    let p: UserPayload = serde_json::from_slice(payload).map_err(|_| Malformed)?;
    match p.kind.as_deref() {
        Some("kick") => Ok(Envelope::kick(user.to_owned())),
        // A complete server frame (direct, task update): as it is.
        Some(_) => {
            let frame = std::str::from_utf8(payload).map_err(|_| Malformed)?;
            let at = p.ts.map_or_else(Stamp::now, Stamp::at_ms);
            Ok(Envelope::to_user(
                user.to_owned(),
                frame.to_owned().into(),
                at,
            ))
        }
        // `{"data":…}` from a backend: a direct frame from the server.
        None => {
            let data = p.data.ok_or(Malformed)?;
            let id = ids.next_other().to_string();
            Ok(Envelope::direct(
                user.to_owned(),
                &id,
                "server",
                &*data,
                Stamp::now(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::Target;
    use serde_json::Value;

    fn frame(e: &Envelope) -> Value {
        serde_json::from_str(&e.frame).unwrap()
    }

    fn room(name: &str) -> RoomName {
        RoomName::parse(name).unwrap()
    }

    fn keys() -> Keys {
        Keys::new("sb")
    }

    #[test]
    fn a_scripted_room_message_keeps_its_id_and_sender() {
        let mut ids = LocalIds::default();
        let payload = br#"{"id":"5-1","room":"lobby","from":"alice","data":{"a":1},"ts":5}"#;
        let e = decode(&keys(), "sb:room:{lobby}", payload, &mut ids).unwrap();
        assert_eq!(e.target, Target::Room(room("lobby")));
        assert_eq!(e.id, Some(MessageId { ms: 5, seq: 1 }));
        assert_eq!(
            &*e.frame,
            r#"{"type":"message","id":"5-1","room":"lobby","from":"alice","data":{"a":1},"ts":5}"#
        );
        assert_eq!(e.published_us, 5000);
    }

    #[test]
    fn a_raw_room_publish_has_no_id_and_is_from_server() {
        let mut ids = LocalIds::default();
        let e = decode(
            &keys(),
            "sb:room:{r}",
            br#"{"data":{"text":"hi"}}"#,
            &mut ids,
        )
        .unwrap();
        let f = frame(&e);
        assert_eq!(f["from"], "server");
        assert_eq!(f["data"]["text"], "hi");
        assert_eq!(e.id, None);
        assert!(f.get("id").is_none(), "{f}");
    }

    #[test]
    fn presence_changes_are_relayed_as_they_are() {
        let mut ids = LocalIds::default();
        let payload = br#"{"user":"bob","type":"left","room":"r"}"#;
        let e = decode(&keys(), "sb:room:{r}", payload, &mut ids).unwrap();
        assert_eq!(e.id, None);
        assert_eq!(&*e.frame, r#"{"type":"left","room":"r","user":"bob"}"#);
        let other = br#"{"type":"message","data":1}"#;
        assert_eq!(
            decode(&keys(), "sb:room:{r}", other, &mut ids).unwrap_err(),
            Malformed
        );
    }

    #[test]
    fn user_channel_kicks_frames_and_raw_data() {
        let mut ids = LocalIds::default();
        let e = decode(&keys(), "sb:user:{al:ice}", KICK.as_bytes(), &mut ids).unwrap();
        assert_eq!(e.target, Target::Kick("al:ice".into()));
        let direct = br#"{"type":"direct","id":"1-0","from":"bob","data":2,"ts":1}"#;
        let e = decode(&keys(), "sb:user:{alice}", direct, &mut ids).unwrap();
        assert_eq!(e.frame.as_bytes().as_ref(), &direct[..]);
        let e = decode(&keys(), "sb:user:{alice}", br#"{"data":[1]}"#, &mut ids).unwrap();
        let f = frame(&e);
        assert_eq!(
            (f["type"].as_str(), f["from"].as_str()),
            (Some("direct"), Some("server"))
        );
        assert_eq!(f["data"], serde_json::json!([1]));
    }

    #[test]
    fn broadcasts_with_and_without_id() {
        let mut ids = LocalIds::default();
        let payload = broadcast_payload("7-0", &RawValue::from_string("\"x\"".into()).unwrap(), 7);
        let e = decode(&keys(), "sb:broadcast", payload.as_bytes(), &mut ids).unwrap();
        assert_eq!(
            &*e.frame,
            r#"{"type":"broadcast","id":"7-0","data":"x","ts":7}"#
        );
        let e = decode(&keys(), "sb:broadcast", br#"{"data":null}"#, &mut ids).unwrap();
        assert_eq!(e.target, Target::All);
        assert!(frame(&e)["id"].is_string());
    }

    #[test]
    fn any_json_data_is_data_null_included() {
        let mut ids = LocalIds::default();
        for data in ["null", "false", "0", "\"\"", "[]", "{}"] {
            let payload = format!(r#"{{"id":"1-0","room":"r","from":"a","data":{data},"ts":1}}"#);
            let e = decode(&keys(), "sb:room:{r}", payload.as_bytes(), &mut ids).unwrap();
            assert_eq!(
                frame(&e)["data"],
                serde_json::from_str::<Value>(data).unwrap()
            );
            let raw = format!(r#"{{"data":{data}}}"#);
            assert!(
                decode(&keys(), "sb:user:{u}", raw.as_bytes(), &mut ids).is_ok(),
                "{raw}"
            );
        }
    }

    #[test]
    fn what_does_not_fit_is_malformed() {
        let mut ids = LocalIds::default();
        for (channel, payload) in [
            ("sb:room:{r}", &b"not json"[..]),
            ("sb:room:{r}", br#"{"id":"x-1","data":1}"#),
            ("sb:room:{r}", br#"{"from":"a"}"#),
            ("sb:room:{r}", br#"{"type":"joined","room":"r"}"#),
            ("sb:room:{bad room}", br#"{"data":1}"#),
            ("sb:room:r", br#"{"data":1}"#),
            ("sb:broadcast", br#"{"id":"1-0"}"#),
            ("sb:user:{u}", br#"[1]"#),
            ("other:room:{r}", br#"{"data":1}"#),
            ("sb:elsewhere", br#"{"data":1}"#),
        ] {
            assert_eq!(
                decode(&keys(), channel, payload, &mut ids).unwrap_err(),
                Malformed,
                "{channel} {}",
                String::from_utf8_lossy(payload)
            );
        }
    }

    #[test]
    fn history_entries_become_message_frames() {
        let body = r#""room":"r","from":"a\"b","data":{"k":[1]},"ts":9}"#;
        let id = MessageId { ms: 9, seq: 0 };
        assert_eq!(
            &*history_frame(id, body).unwrap(),
            r#"{"type":"message","id":"9-0","room":"r","from":"a\"b","data":{"k":[1]},"ts":9}"#
        );
        assert!(history_frame(id, "garbage").is_none());
    }
}
