//! The echo server of the WebSocket conformance run: every WebSocket
//! upgrade, on any path, becomes an [`Echo`] session (the hub's own frame
//! reader and socket writer, see [`crate::session::echo`]); any other
//! request gets 404. Built like the hub's server ([`crate::server`]):
//! actix-http's service with an upgrade service that takes the socket.
//!
//! For `examples/autobahn_echo.rs` only: it has no auth and no limits but
//! the message size, so it is never part of the hub's routes.

use std::convert::Infallible;
use std::net::TcpListener;

use actix_codec::Framed;
use actix_http::{HttpService, Request, Response, StatusCode};
use actix_web::dev::fn_service;
use bytes::{Bytes, BytesMut};
use tokio::net::TcpStream;

use super::ws::{answer, refusal};
use crate::session::echo::{Echo, EchoLimits};

/// Serves echo sessions on `listener` (one worker thread) until the
/// process ends.
pub async fn serve(listener: TcpListener, limits: EchoLimits) -> std::io::Result<()> {
    actix_web::dev::Server::build()
        .workers(1)
        .listen("echo", listener, move || {
            let upgrade = fn_service(move |(req, framed): super::ws::Upgrade| async move {
                upgrade(req, framed, limits).await;
                Ok::<_, actix_http::Error>(())
            });
            let not_found = fn_service(|_: Request| async {
                Ok::<_, Infallible>(Response::with_body(StatusCode::NOT_FOUND, "not found"))
            });
            HttpService::build()
                .tcp_nodelay(true)
                .upgrade(upgrade)
                .finish(not_found)
                .tcp()
        })?
        .run()
        .await
}

async fn upgrade(
    req: Request,
    framed: Framed<TcpStream, actix_http::h1::Codec>,
    limits: EchoLimits,
) {
    let parts = framed.into_parts();
    let (mut codec, mut socket) = (parts.codec, parts.io);
    let switching = match actix_http::ws::handshake(req.head()) {
        Ok(mut builder) => builder.finish().drop_body(),
        Err(e) => {
            let res = refusal(Response::from(e).drop_body());
            let _ = answer(&mut socket, &mut codec, res, Some(Bytes::new())).await;
            return;
        }
    };
    if answer(&mut socket, &mut codec, switching, None)
        .await
        .is_err()
    {
        return;
    }
    let leftover = BytesMut::from(&parts.read_buf[..]);
    Echo::start(socket, leftover, limits);
}
