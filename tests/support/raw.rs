//! Speaking the WebSocket protocol by hand on a raw TCP socket, to send
//! what a well-behaved client library never would (and to read without
//! answering pings).

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Hub, WAIT};

/// A client frame: FIN, `opcode`, masked with `mask` (none: unmasked).
pub fn client_frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = vec![0x80 | opcode];
    let masked = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n @ 0..=125 => out.push(masked | n as u8),
        n @ 126..=65535 => {
            out.push(masked | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(masked | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(mask) => {
            out.extend_from_slice(&mask);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// A server frame read off a raw socket: (opcode, payload).
pub async fn server_frame(socket: &mut TcpStream, buf: &mut Vec<u8>) -> (u8, Vec<u8>) {
    loop {
        if buf.len() >= 2 {
            let opcode = buf[0] & 0x0f;
            assert_eq!(buf[1] & 0x80, 0, "server frames are not masked");
            let (len, header) = match buf[1] & 0x7f {
                126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
                127 if buf.len() >= 10 => {
                    let mut n = [0u8; 8];
                    n.copy_from_slice(&buf[2..10]);
                    (u64::from_be_bytes(n) as usize, 10)
                }
                n @ 0..=125 => (n as usize, 2),
                _ => (usize::MAX, 0),
            };
            if header > 0 && buf.len() >= header + len {
                let payload = buf[header..header + len].to_vec();
                buf.drain(..header + len);
                return (opcode, payload);
            }
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, socket.read(&mut chunk))
            .await
            .expect("no frame in time")
            .expect("read");
        assert!(n > 0, "connection ended before a whole frame");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The next text frame as JSON, skipping pings.
pub async fn server_json(socket: &mut TcpStream, buf: &mut Vec<u8>) -> Value {
    loop {
        let (opcode, payload) = server_frame(socket, buf).await;
        match opcode {
            1 => return serde_json::from_slice(&payload).expect("JSON text frame"),
            9 => continue,
            other => panic!("expected a text frame, got opcode {other}: {payload:?}"),
        }
    }
}

/// The close frame's (code, reason).
pub async fn server_close(socket: &mut TcpStream, buf: &mut Vec<u8>) -> (u16, String) {
    loop {
        let (opcode, payload) = server_frame(socket, buf).await;
        if opcode == 8 {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            return (code, String::from_utf8_lossy(&payload[2..]).into_owned());
        }
    }
}

/// A raw TCP connection to the hub.
pub async fn tcp(hub: &Hub) -> TcpStream {
    TcpStream::connect(("127.0.0.1", hub.port))
        .await
        .expect("connect")
}

/// Sends an upgrade request for `path` (and `extra` bytes in the same
/// write); returns the socket, the response head and what followed it.
pub async fn raw_upgrade(hub: &Hub, path: &str, extra: &[u8]) -> (TcpStream, String, Vec<u8>) {
    let mut socket = tcp(hub).await;
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes();
    request.extend_from_slice(extra);
    socket.write_all(&request).await.expect("write request");
    let mut buf = Vec::new();
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, socket.read(&mut chunk))
            .await
            .expect("no response in time")
            .expect("read response");
        assert!(n > 0, "connection ended before the response head");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    (socket, head, buf[end..].to_vec())
}

pub const MASK: Option<[u8; 4]> = Some([0x37, 0xfa, 0x21, 0x3d]);

/// A raw client past its `welcome`: the socket and what was read beyond.
pub async fn raw_client(hub: &Hub, user: &str) -> (TcpStream, Vec<u8>) {
    let path = format!("/ws?token={}", super::token(user));
    let (mut socket, head, mut buf) = raw_upgrade(hub, &path, b"").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(server_json(&mut socket, &mut buf).await["type"], "welcome");
    (socket, buf)
}

/// Sends a JSON client frame.
pub async fn send_json(socket: &mut TcpStream, frame: &Value) {
    let bytes = client_frame(1, frame.to_string().as_bytes(), MASK);
    socket.write_all(&bytes).await.expect("send frame");
}
