//! Client → server frames (docs/protocol.md §3, "Client → server") and the one
//! parser every text frame goes through.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::codes::ErrorReply;

/// A client's `ref`: a string or a number, echoed verbatim.
pub type Ref = Option<Value>;

/// Client → server frames. Serializable too, for clients written in Rust
/// (the load generator).
#[derive(Debug, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ClientFrame {
    Join {
        room: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<String>,
    },
    Leave {
        room: String,
    },
    Publish {
        room: String,
        data: Value,
        /// A publish sent again with the same key (a retry after a
        /// time-out or an `unavailable`) is stored and delivered once.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        idempotency_key: Option<String>,
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
        #[serde(default, skip_serializing_if = "Option::is_none")]
        payload: Option<Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        idempotency_key: Option<String>,
    },
    /// The record of one of the user's own tasks (after a reconnect).
    #[serde(rename = "task_status")]
    TaskStatus {
        task_id: String,
    },
    /// Cancels a task of the user's that has not started.
    #[serde(rename = "task_cancel")]
    TaskCancel {
        task_id: String,
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
            ClientFrame::TaskStatus { .. } => "task_status",
            ClientFrame::TaskCancel { .. } => "task_cancel",
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ErrorCode;

    #[test]
    fn frames_parse_with_ref() {
        let (f, r) =
            parse_client_frame(r#"{"type":"publish","room":"a","data":{"x":[1,2]},"ref":7}"#)
                .unwrap();
        assert_eq!(r, Some(Value::from(7)));
        match f {
            ClientFrame::Publish { room, data, .. } => {
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
    fn frames_serialize_as_they_parse() {
        let frame = ClientFrame::Join {
            room: "lobby".into(),
            since: None,
        };
        let text = serde_json::to_string(&frame).unwrap();
        assert_eq!(text, r#"{"type":"join","room":"lobby"}"#);
        assert!(parse_client_frame(&text).is_ok());
    }
}
