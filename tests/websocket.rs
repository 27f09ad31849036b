//! The WebSocket layer itself, over real sockets: the upgrade, frames sent
//! behind the upgrade request, fragmented messages, pings, and what breaks
//! RFC 6455 (unmasked frames, text that is not UTF-8). Some tests speak the
//! protocol by hand on a raw TCP socket, to send what a well-behaved client
//! library never would. Every bad client is closed alone: another client
//! of the same hub goes on.

mod support;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::raw::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_sent_with_the_upgrade_request_are_answered() {
    let hub = Hub::start(Broker::Memory);
    let path = format!("/ws?token={}", token("alice"));
    let ping = client_frame(1, br#"{"type":"ping","ref":1}"#, MASK);
    let (mut socket, head, mut buf) = raw_upgrade(&hub, &path, &ping).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    assert_eq!(server_json(&mut socket, &mut buf).await["type"], "welcome");
    let pong = server_json(&mut socket, &mut buf).await;
    assert_eq!(pong, json!({"type": "pong", "ref": 1}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmasked_frame_closes_1002_and_others_go_on() {
    let hub = Hub::start(Broker::Memory);
    let mut other = hub.connect("bob").await;
    let path = format!("/ws?token={}", token("alice"));
    let (mut socket, head, mut buf) = raw_upgrade(&hub, &path, b"").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(server_json(&mut socket, &mut buf).await["type"], "welcome");
    let unmasked = client_frame(1, br#"{"type":"ping","ref":1}"#, None);
    socket.write_all(&unmasked).await.expect("write");
    assert_eq!(
        server_close(&mut socket, &mut buf).await,
        (1002, "protocol error".to_owned())
    );
    assert_eq!(other.request(json!({"type": "ping"})).await["type"], "pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_that_is_not_utf8_closes_1007() {
    let hub = Hub::start(Broker::Memory);
    let mut other = hub.connect("bob").await;
    let mut c = hub.connect("alice").await;
    let frame = Frame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(Data::Text), true);
    c.ws.send(Message::Frame(frame)).await.expect("send");
    assert_eq!(
        c.recv_close().await,
        Closed {
            code: 1007,
            reason: "invalid utf-8".into()
        }
    );
    assert_eq!(other.request(json!({"type": "ping"})).await["type"], "pong");
}

/// Sends `text` as fragments of `size` bytes.
async fn send_fragmented(c: &mut Client, text: &str, size: usize) {
    let parts: Vec<&[u8]> = text.as_bytes().chunks(size).collect();
    for (i, part) in parts.iter().enumerate() {
        let opcode = if i == 0 {
            OpCode::Data(Data::Text)
        } else {
            OpCode::Data(Data::Continue)
        };
        let last = i + 1 == parts.len();
        let frame = Frame::message(part.to_vec(), opcode, last);
        c.ws.send(Message::Frame(frame))
            .await
            .expect("send fragment");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fragmented_message_is_one_frame_of_the_protocol() {
    let hub = Hub::start(Broker::Memory);
    let mut c = hub.connect("alice").await;
    let mut bob = hub.connect("bob").await;
    bob.join("lobby").await;
    c.join("lobby").await;
    // A publish in three fragments, a WebSocket ping between two of them.
    let text = r#"{"type":"publish","room":"lobby","data":{"text":"héllo in pieces"},"ref":"f1"}"#;
    let parts: Vec<&[u8]> = text.as_bytes().chunks(30).collect();
    assert_eq!(parts.len(), 3);
    let first = Frame::message(parts[0].to_vec(), OpCode::Data(Data::Text), false);
    c.ws.send(Message::Frame(first)).await.expect("send");
    c.ws.send(Message::Ping(b"between".to_vec().into()))
        .await
        .expect("ping");
    let middle = Frame::message(parts[1].to_vec(), OpCode::Data(Data::Continue), false);
    c.ws.send(Message::Frame(middle)).await.expect("send");
    let last = Frame::message(parts[2].to_vec(), OpCode::Data(Data::Continue), true);
    c.ws.send(Message::Frame(last)).await.expect("send");
    // The pong for the ping comes first, with its payload.
    let pong = tokio::time::timeout(WAIT, async {
        loop {
            match c.ws.next().await {
                Some(Ok(Message::Pong(payload))) => return payload,
                Some(Ok(_)) => continue,
                other => panic!("expected a pong, got {other:?}"),
            }
        }
    })
    .await
    .expect("pong in time");
    assert_eq!(&pong[..], b"between");
    let ack = c.recv_type("ack").await;
    assert_eq!(ack["ref"], "f1");
    let message = bob.recv_type("message").await;
    assert_eq!(message["data"], json!({"text": "héllo in pieces"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragments_adding_up_to_more_than_max_message_bytes_close_1009() {
    let hub = Hub::builder(Broker::Memory)
        .toml("[limits]\nmax_message_bytes = 1024")
        .start();
    let mut other = hub.connect("bob").await;
    let mut c = hub.connect("alice").await;
    // Each fragment is under the limit; together they are not.
    let pad = "x".repeat(1500);
    send_fragmented(&mut c, &format!(r#"{{"type":"ping","ref":"{pad}"}}"#), 500).await;
    assert_eq!(
        c.recv_close().await,
        Closed {
            code: 1009,
            reason: "message too big".into()
        }
    );
    assert_eq!(other.request(json!({"type": "ping"})).await["type"], "pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_elsewhere_is_404_and_ws_without_upgrade_is_400() {
    let hub = Hub::start(Broker::Memory);
    let (_, head, _) = raw_upgrade(&hub, "/health", b"").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    // An upgrade that is not a whole handshake: 400, and the connection ends.
    let mut socket = tcp(&hub).await;
    let request = "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\r\n";
    socket.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, socket.read_to_end(&mut answer))
        .await
        .expect("the connection ends")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let status = reqwest::get(hub.http("/ws"))
        .await
        .expect("GET /ws")
        .status();
    assert_eq!(status.as_u16(), 400);
    // The hub still serves both.
    let mut c = hub.connect("alice").await;
    assert_eq!(c.request(json!({"type": "ping"})).await["type"], "pong");
    let status = reqwest::get(hub.http("/health"))
        .await
        .expect("health")
        .status();
    assert_eq!(status.as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_1013_behind_what_it_was_sent() {
    let hub = Hub::builder(Broker::Memory)
        .toml("[limits]\nmax_outbound_queue = 8\nmessages_per_second = 100000\nburst = 100000")
        .start();
    let path = format!("/ws?token={}", token("sleepy"));
    let (mut sleepy, head, mut buf) = raw_upgrade(&hub, &path, b"").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(server_json(&mut sleepy, &mut buf).await["type"], "welcome");
    let join = client_frame(1, br#"{"type":"join","room":"news","ref":1}"#, MASK);
    sleepy.write_all(&join).await.expect("join");
    assert_eq!(server_json(&mut sleepy, &mut buf).await["type"], "ack");
    // From here on `sleepy` reads nothing until the server has given up on it.
    let mut reader = hub.connect("reader").await;
    reader.join("news").await;
    let mut publisher = hub.connect("publisher").await;
    publisher.join("news").await;
    let api = hub.api().await;
    let pad = "x".repeat(30 * 1024);
    let mut sent = 0;
    loop {
        for _ in 0..20 {
            publisher
                .publish("news", json!({"i": sent, "pad": pad}))
                .await;
            let message = reader.recv_type("message").await;
            assert_eq!(message["data"]["i"], sent, "the reader gets every message");
            sent += 1;
        }
        if api.metric("switchboard_slow_consumer_closes_total").await >= 1.0 {
            break;
        }
        assert!(sent < 2000, "sleepy was never closed");
    }
    // Closed, but its socket is not gone yet: it still holds its place.
    assert_eq!(api.get("/api/stats").await.1["connections"], 3);
    // What the socket had taken comes first, in order and whole, then the close.
    let mut next = 0;
    loop {
        let (opcode, payload) = server_frame(&mut sleepy, &mut buf).await;
        match opcode {
            1 => {
                let message: Value = serde_json::from_slice(&payload).expect("JSON");
                if message["type"] == "message" {
                    assert_eq!(message["data"]["i"], next);
                    next += 1;
                }
            }
            8 => {
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                assert_eq!((code, &payload[2..]), (1013, &b"slow consumer"[..]));
                break;
            }
            _ => {}
        }
    }
    assert!(next < sent, "some messages were dropped with the queue");
    assert_eq!(
        publisher.request(json!({"type": "ping"})).await["type"],
        "pong"
    );
    // Once the client has ended its side, the socket goes, and its place.
    drop(sleepy);
    eventually("the closed socket's place is given back", || async {
        (api.get("/api/stats").await.1["connections"] == 2).then_some(())
    })
    .await;
}
