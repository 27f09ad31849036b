//! `GET /ws`: the WebSocket upgrade.
//!
//! actix-http hands every request that asks for a WebSocket upgrade, with
//! its connection, to [`service`] (the HTTP server's upgrade service; see
//! [`crate::server`]). It answers the handshake (actix-http's), makes the
//! checks of docs/protocol.md §2 ("Admission"), in order — origin, token, instance full,
//! per-user limit — and gives the socket to a [`Session`]: from then on the
//! session reads and writes it itself, with no HTTP machinery in between and
//! no per-connection buffer while it is idle. A refused client is accepted
//! and closed at once with the documented code and reason.
//!
//! An upgrade request for another path is answered 404; `/ws` without an
//! upgrade reaches the app's route ([`without_upgrade`]) and gets 400.

use std::sync::Arc;

use actix::Addr;
use actix_codec::{Encoder, Framed};
use actix_http::body::BodySize;
use actix_http::h1::{Codec, Message};
use actix_http::ws::{HandshakeError, Parser};
use actix_http::{ConnectionType, Request, RequestHead, Response, StatusCode};
use actix_web::dev::{fn_service, ServiceFactory};
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::bearer::bearer;
use crate::auth::AuthError;
use crate::broker::{BrokerError, ConnectionInfo};
use crate::clock::now_ms;
use crate::hub::Hub;
use crate::metrics::metrics;
use crate::protocol::CloseReason;
use crate::session::{Accepted, Held, Session, CLOSE_TIMEOUT};
use crate::state::AppState;

/// What actix-http hands the upgrade service: the request and its connection.
pub type Upgrade = (Request, Framed<TcpStream, Codec>);

/// The upgrade service of one worker, whose hub is `hub`.
pub fn service(
    state: Arc<AppState>,
    hub: Addr<Hub>,
) -> impl ServiceFactory<Upgrade, Config = (), Response = (), Error = actix_http::Error, InitError = ()>
{
    fn_service(move |(req, framed): Upgrade| {
        let (state, hub) = (state.clone(), hub.clone());
        async move {
            upgrade(req, framed, state, hub).await;
            Ok(())
        }
    })
}

/// `GET /ws` without an upgrade: the handshake's own error (400).
pub async fn without_upgrade(req: HttpRequest) -> HttpResponse {
    match actix_http::ws::verify_handshake(req.head()) {
        Err(e) => e.error_response(),
        Ok(()) => HandshakeError::NoWebsocketUpgrade.error_response(),
    }
}

async fn upgrade(
    req: Request,
    framed: Framed<TcpStream, Codec>,
    state: Arc<AppState>,
    hub: Addr<Hub>,
) {
    let parts = framed.into_parts();
    let (mut codec, mut socket) = (parts.codec, parts.io);
    let head = req.head();
    if head.uri.path() != "/ws" {
        let (res, body) = not_found();
        let _ = answer(&mut socket, &mut codec, res, Some(body)).await;
        return;
    }
    let mut handshake = match actix_http::ws::handshake(head) {
        Ok(builder) => builder,
        Err(e) => {
            let res = refusal(Response::from(e).drop_body());
            let _ = answer(&mut socket, &mut codec, res, Some(Bytes::new())).await;
            return;
        }
    };
    let admitted = admit(head, &state).await;
    let switching = handshake.finish().drop_body();
    // If the client is gone already, an accepted session finds out at once
    // and cleans up as any other.
    let answered = answer(&mut socket, &mut codec, switching, None).await;
    match admitted {
        Ok(accepted) => {
            tracing::debug!(connection_id = %accepted.connection_id, user = %accepted.claims.sub, "session accepted");
            // What the client sent behind its request, without the
            // dispatcher's 8 KiB buffer around it.
            let leftover = if parts.read_buf.is_empty() {
                BytesMut::new()
            } else {
                BytesMut::from(&parts.read_buf[..])
            };
            Session::start(state, hub, accepted, socket, leftover);
        }
        Err(reason) => {
            metrics()
                .connections_rejected
                .with_label_values(&[reason.label()])
                .inc();
            tracing::debug!(reason = reason.label(), "connection refused");
            if answered.is_ok() {
                let _token = state.socket_token();
                refuse(socket, reason).await;
            }
        }
    }
}

/// The app's 404 (JSON `not_found`), for an upgrade request elsewhere.
fn not_found() -> (Response<()>, Bytes) {
    let body = Bytes::from_static(br#"{"error":"not_found","message":"no such endpoint"}"#);
    let mut res = Response::with_body(StatusCode::NOT_FOUND, ());
    res.headers_mut().insert(
        actix_http::header::CONTENT_TYPE,
        actix_http::header::HeaderValue::from_static("application/json"),
    );
    (refusal(res), body)
}

/// An error answer to an upgrade request: the connection ends after it.
pub(crate) fn refusal(mut res: Response<()>) -> Response<()> {
    res.head_mut().set_connection_type(ConnectionType::Close);
    res
}

/// Writes an HTTP response (head, and `body` if any) on the connection.
pub(crate) async fn answer(
    socket: &mut TcpStream,
    codec: &mut Codec,
    res: Response<()>,
    body: Option<Bytes>,
) -> std::io::Result<()> {
    let mut buf = BytesMut::new();
    let size = body
        .as_ref()
        .map_or(BodySize::None, |b| BodySize::Sized(b.len() as u64));
    codec.encode(Message::Item((res, size)), &mut buf)?;
    if let Some(body) = body {
        codec.encode(Message::Chunk(Some(body)), &mut buf)?;
        codec.encode(Message::Chunk(None), &mut buf)?;
    }
    socket.write_all(&buf).await
}

/// A refused connection: the close frame, our end, then the client's end
/// (or [`CLOSE_TIMEOUT`]).
async fn refuse(mut socket: TcpStream, reason: CloseReason) {
    let mut frame = BytesMut::new();
    Parser::write_close(&mut frame, Some(reason.to_ws()), false);
    let close = async {
        socket.write_all(&frame).await?;
        socket.shutdown().await?;
        let mut sink = [0u8; 512];
        while socket.read(&mut sink).await? > 0 {}
        std::io::Result::Ok(())
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, close).await;
}

/// The admission checks, in order (origin, token, instance full, per-user
/// limit); on success the connection holds an instance slot and is in the
/// broker's registry, until its socket is gone ([`Held`]).
async fn admit(head: &RequestHead, state: &Arc<AppState>) -> Result<Accepted, CloseReason> {
    if state.shutting_down() {
        return Err(CloseReason::GoingAway);
    }
    if let Some(origin) = head.headers().get("origin") {
        let allowed = &state.config.server.allowed_origins;
        let ok = origin
            .to_str()
            .is_ok_and(|origin| origin_allowed(allowed, origin));
        if !ok {
            return Err(CloseReason::ForbiddenOrigin);
        }
    }
    let token = bearer(head.headers())
        .map(str::to_owned)
        .or_else(|| query_token(head.uri.query().unwrap_or("")))
        .ok_or(CloseReason::Unauthorized)?;
    let claims = state.verifier.verify(&token).map_err(|e| match e {
        AuthError::Expired => CloseReason::TokenExpired,
        _ => CloseReason::Unauthorized,
    })?;
    let slot = state.try_acquire_slot().ok_or(CloseReason::Overloaded)?;
    let connection_id = uuid::Uuid::new_v4().simple().to_string();
    register(state, &claims.sub, &connection_id).await?;
    let held = Held::registered(slot, state.broker.clone(), &connection_id, &claims.sub);
    Ok(Accepted {
        claims,
        connection_id,
        held,
    })
}

/// Adds the connection to the registry (the per-user limit) and watches
/// the user's channel, so that a direct sent the moment after `welcome`
/// arrives; the session unwatches it when it stops.
async fn register(state: &AppState, user: &str, connection_id: &str) -> Result<(), CloseReason> {
    let info = ConnectionInfo {
        connection_id: connection_id.to_owned(),
        user: user.to_owned(),
        connected_at_ms: now_ms(),
    };
    let max_per_user = state.config.limits.max_connections_per_user;
    match state.broker.registry.register(&info, max_per_user).await {
        Ok(()) => {
            if let Err(e) = state.broker.subscriptions.watch_user(user).await {
                tracing::warn!(error = %e, "user channel not confirmed");
            }
            Ok(())
        }
        Err(BrokerError::ConnectionLimit) => Err(CloseReason::ConnectionLimit),
        Err(BrokerError::Unavailable(e)) => {
            tracing::warn!(error = %e, "refusing connection: broker unavailable");
            Err(CloseReason::Unavailable)
        }
        Err(e) => {
            tracing::error!(error = %e, "refusing connection: registry failed");
            Err(CloseReason::InternalError)
        }
    }
}

fn query_token(query: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Query {
        token: Option<String>,
    }
    web::Query::<Query>::from_query(query)
        .ok()?
        .into_inner()
        .token
        .filter(|t| !t.is_empty())
}
/// `allowed` empty or listing `*`: any origin. Otherwise an exact match of
/// scheme, host and port (default ports made explicit, case-insensitive).
pub fn origin_allowed(allowed: &[String], origin: &str) -> bool {
    if allowed.is_empty() || allowed.iter().any(|a| a == "*") {
        return true;
    }
    let Some(origin) = normalize_origin(origin) else {
        return false;
    };
    allowed
        .iter()
        .filter_map(|a| normalize_origin(a))
        .any(|a| a == origin)
}

fn normalize_origin(origin: &str) -> Option<(String, String, u16)> {
    let (scheme, rest) = origin.trim().split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let hostport = rest.trim_end_matches('/');
    if hostport.is_empty() || hostport.contains('/') {
        return None;
    }
    let default_port = match scheme.as_str() {
        "http" | "ws" => 80,
        "https" | "wss" => 443,
        _ => 0,
    };
    // IPv6 literals keep their brackets: `[::1]:8080`.
    let (host, port) = match hostport.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => (host, port.parse().ok()?),
        _ => (hostport, default_port),
    };
    Some((scheme, host.to_ascii_lowercase(), port))
}

#[cfg(test)]
mod tests {
    use super::origin_allowed;

    #[test]
    fn origins() {
        let allowed = vec![
            "https://app.example.com".to_owned(),
            "http://localhost:3000".to_owned(),
        ];
        assert!(origin_allowed(&allowed, "https://app.example.com"));
        assert!(origin_allowed(&allowed, "https://APP.example.com:443"));
        assert!(origin_allowed(&allowed, "http://localhost:3000"));
        assert!(!origin_allowed(&allowed, "http://localhost:3001"));
        assert!(!origin_allowed(&allowed, "http://app.example.com"));
        assert!(!origin_allowed(&allowed, "null"));
        assert!(origin_allowed(&[], "null"));
        assert!(origin_allowed(&["*".to_owned()], "https://evil.example"));
    }
}
