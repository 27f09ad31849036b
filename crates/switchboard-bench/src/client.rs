//! One WebSocket client of the hub, as every scenario uses it: the URL with
//! its token, connect and wait for `welcome`, `join` a room, read frames
//! until told to stop, and close with a completed close handshake.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
pub type WsSink = SplitSink<Ws, Message>;
pub type WsStream = SplitStream<Ws>;

/// How long the bench's tokens stay valid; longer than any bounded run.
const TOKEN_TTL: Duration = Duration::from_secs(3600);
/// How long to wait for the server's answer to our close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// An HS256 token for `user`, signed with `secret` by the library itself.
pub fn mint_token(secret: &str, user: &str) -> Result<String, String> {
    let auth = switchboard::config::AuthConfig {
        jwt_secret: secret.into(),
        ..Default::default()
    };
    switchboard::auth::mint(&auth, user, None, None, TOKEN_TTL, None)
        .map_err(|e| format!("minting a token: {e}"))
}

/// `ws://host:port` → `ws://host:port/ws`; a URL that already has a path is
/// kept.
pub fn ws_endpoint(url: &str) -> String {
    let url = url.trim_end_matches('/');
    let after_scheme = url.split_once("://").map(|(_, rest)| rest).unwrap_or(url);
    if after_scheme.contains('/') {
        url.to_string()
    } else {
        format!("{url}/ws")
    }
}

pub fn ws_url_with_token(endpoint: &str, token: &str) -> String {
    let sep = if endpoint.contains('?') { '&' } else { '?' };
    format!("{endpoint}{sep}token={token}")
}

/// The fields of a server frame the bench looks at; anything else is skipped
/// without allocating (the padding included).
#[derive(Deserialize)]
pub struct ServerFrame<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    #[serde(default, borrow)]
    pub id: Option<Cow<'a, str>>,
    #[serde(default, rename = "ref", borrow)]
    reference: Option<&'a RawValue>,
    #[serde(default, borrow)]
    pub data: Option<&'a RawValue>,
    #[serde(default, borrow)]
    pub code: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub message: Option<Cow<'a, str>>,
}

impl ServerFrame<'_> {
    /// The `ref` the frame answers, when it is a number.
    pub fn ref_number(&self) -> Option<u64> {
        self.reference
            .and_then(|r| serde_json::from_str::<u64>(r.get()).ok())
    }
}

/// `1000 bye`, or `no close frame`.
pub fn close_description(frame: Option<&CloseFrame>) -> String {
    match frame {
        Some(f) => format!("{} {}", u16::from(f.code), f.reason.as_str()),
        None => "no close frame".into(),
    }
}

/// Connect and wait for `welcome`, which must be the first text frame.
/// Bounded by `limit`.
pub async fn connect_and_welcome(
    url: &str,
    limit: Duration,
    read_buffer_bytes: usize,
) -> Result<Ws, String> {
    let config = WebSocketConfig::default().read_buffer_size(read_buffer_bytes.max(1024));
    let attempt = async {
        let (mut ws, _response) =
            tokio_tungstenite::connect_async_with_config(url, Some(config), true)
                .await
                .map_err(|e| format!("connect: {e}"))?;
        // Bounded by the surrounding timeout.
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => {
                    return match serde_json::from_str::<ServerFrame>(text.as_str()) {
                        Ok(f) if f.kind == "welcome" => Ok(ws),
                        Ok(f) => Err(format!("first frame is {:?}, not welcome", f.kind)),
                        Err(e) => Err(format!("unparsable first frame ({e})")),
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    return Err(format!(
                        "closed before welcome: {}",
                        close_description(frame.as_ref())
                    ))
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(format!("before welcome: {e}")),
                None => return Err("stream ended before welcome".into()),
            }
        }
    };
    timeout(limit, attempt)
        .await
        .map_err(|_| format!("no welcome within {} s", limit.as_secs()))?
}

/// Send `join` with ref 1 and wait for its ack; other frames meanwhile
/// (presence changes, early messages) go to `on_other`.
pub async fn join_room(
    ws: &mut Ws,
    room: &str,
    limit: Duration,
    mut on_other: impl FnMut(&str),
) -> Result<(), String> {
    let join = serde_json::json!({"type": "join", "room": room, "ref": 1}).to_string();
    ws.send(Message::text(join))
        .await
        .map_err(|e| format!("sending join: {e}"))?;
    let wait = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => {
                    let text = text.as_str();
                    match serde_json::from_str::<ServerFrame>(text) {
                        Ok(f) if f.kind == "ack" && f.ref_number() == Some(1) => return Ok(()),
                        Ok(f) if f.kind == "error" && f.ref_number() == Some(1) => {
                            return Err(format!(
                                "join refused: {} {}",
                                f.code.as_deref().unwrap_or("?"),
                                f.message.as_deref().unwrap_or("")
                            ))
                        }
                        _ => on_other(text),
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    return Err(format!(
                        "closed during join: {}",
                        close_description(frame.as_ref())
                    ))
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(format!("during join: {e}")),
                None => return Err("stream ended during join".into()),
            }
        }
    };
    timeout(limit, wait)
        .await
        .map_err(|_| format!("no join ack within {} s", limit.as_secs()))?
}

/// A room member's connection, welcomed and joined.
pub struct Joined {
    pub ws: Ws,
    /// From the start of the attempt to `welcome`, and to the join ack.
    pub welcomed: Duration,
    pub joined: Duration,
}

/// Connect, wait for `welcome`, join `room` (each step bounded by `limit`);
/// frames before the join ack go to `on_other`.
pub async fn connect_and_join(
    url: &str,
    room: &str,
    limit: Duration,
    read_buffer_bytes: usize,
    on_other: impl FnMut(&str),
) -> Result<Joined, String> {
    let started = Instant::now();
    let mut ws = connect_and_welcome(url, limit, read_buffer_bytes).await?;
    let welcomed = started.elapsed();
    join_room(&mut ws, room, limit, on_other).await?;
    Ok(Joined {
        ws,
        welcomed,
        joined: started.elapsed(),
    })
}

/// Why a read loop ended.
pub enum ReadEnd {
    /// Told to stop: the connection is still open.
    Stopped,
    /// The server closed the connection (`code reason`).
    ClosedByServer(String),
    /// The connection failed or ended without a close frame.
    StreamError(String),
}

impl ReadEnd {
    pub fn server_close(&self) -> Option<String> {
        match self {
            ReadEnd::ClosedByServer(c) => Some(c.clone()),
            _ => None,
        }
    }

    pub fn stream_error(&self) -> Option<String> {
        match self {
            ReadEnd::StreamError(e) => Some(e.clone()),
            _ => None,
        }
    }
}

/// Read frames until `stop` turns true, the text ones to `on_text`; reading
/// also answers the server's pings.
pub async fn read_until_stop(
    stream: &mut WsStream,
    stop: &mut watch::Receiver<bool>,
    mut on_text: impl FnMut(&str),
) -> ReadEnd {
    // Bounded by `stop`, which the scenario sets at the end of the run at
    // the latest.
    while !*stop.borrow() {
        tokio::select! {
            next = stream.next() => match next {
                Some(Ok(Message::Text(text))) => on_text(text.as_str()),
                Some(Ok(Message::Close(frame))) => {
                    return ReadEnd::ClosedByServer(close_description(frame.as_ref()));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return ReadEnd::StreamError(e.to_string()),
                None => return ReadEnd::StreamError("stream ended".into()),
            },
            _ = stop.changed() => {}
        }
    }
    ReadEnd::Stopped
}

/// Send a normal close and wait (at most 5 s) for the server's close;
/// whether the close handshake completed.
pub async fn close_cleanly(sink: &mut WsSink, stream: &mut WsStream) -> bool {
    let frame = CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    };
    if sink.send(Message::Close(Some(frame))).await.is_err() {
        return false;
    }
    let wait = async {
        loop {
            match stream.next().await {
                Some(Ok(Message::Close(_))) => return true,
                Some(Ok(_)) => continue,
                // tungstenite reports the completed handshake as ConnectionClosed.
                Some(Err(WsError::ConnectionClosed)) | None => return true,
                Some(Err(_)) => return false,
            }
        }
    };
    timeout(CLOSE_WAIT, wait).await.unwrap_or(false)
}

/// Close cleanly after a read loop that was told to stop; a connection the
/// server closed or that failed does not count as closed cleanly.
pub async fn close_after(end: &ReadEnd, sink: &mut WsSink, stream: &mut WsStream) -> bool {
    match end {
        ReadEnd::Stopped => close_cleanly(sink, stream).await,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_endpoint_adds_ws_only_without_a_path() {
        assert_eq!(ws_endpoint("ws://127.0.0.1:8000"), "ws://127.0.0.1:8000/ws");
        assert_eq!(
            ws_endpoint("ws://127.0.0.1:8000/"),
            "ws://127.0.0.1:8000/ws"
        );
        assert_eq!(ws_endpoint("ws://lb:80/hub/ws"), "ws://lb:80/hub/ws");
        assert_eq!(ws_endpoint("127.0.0.1:8000"), "127.0.0.1:8000/ws");
    }

    #[test]
    fn the_token_is_a_query_parameter() {
        assert_eq!(ws_url_with_token("ws://h:1/ws", "T"), "ws://h:1/ws?token=T");
        assert_eq!(
            ws_url_with_token("ws://h:1/ws?x=1", "T"),
            "ws://h:1/ws?x=1&token=T"
        );
    }

    #[test]
    fn minted_tokens_verify_with_the_same_secret_only() {
        let token = mint_token("bench-secret", "bench-sub-1-0").unwrap();
        let cfg = |secret: &str| switchboard::config::AuthConfig {
            jwt_secret: secret.into(),
            ..Default::default()
        };
        let verifier = switchboard::auth::Verifier::new(&cfg("bench-secret")).unwrap();
        let claims = verifier.verify(&token).map_err(|e| e.to_string()).unwrap();
        assert_eq!(claims.sub, "bench-sub-1-0");
        let other = switchboard::auth::Verifier::new(&cfg("another-secret")).unwrap();
        assert!(other.verify(&token).is_err());
        assert!(mint_token("bench-secret", "").is_err());
    }

    #[test]
    fn server_frames_expose_what_the_bench_reads() {
        let text = r#"{"type":"error","ref":7,"code":"forbidden","message":"no","extra":[1,2]}"#;
        let f: ServerFrame = serde_json::from_str(text).unwrap();
        assert_eq!(f.kind, "error");
        assert_eq!(f.ref_number(), Some(7));
        assert_eq!(f.code.as_deref(), Some("forbidden"));
        let f: ServerFrame = serde_json::from_str(r#"{"type":"ack","ref":"x"}"#).unwrap();
        assert_eq!(f.ref_number(), None);
    }

    #[test]
    fn close_descriptions_name_code_and_reason() {
        let frame = CloseFrame {
            code: CloseCode::Away,
            reason: "shutting down".into(),
        };
        assert_eq!(close_description(Some(&frame)), "1001 shutting down");
        assert_eq!(close_description(None), "no close frame");
    }
}
