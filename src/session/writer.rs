//! The socket writer: one task per session that owns the WebSocket's
//! sending half and the session's connection slot, and drains the bounded
//! outbound queue into the socket.
//!
//! A close goes behind what is already queued (drained for at most
//! `DRAIN`), except 1013 `slow consumer`, whose queue is dropped at once.
//! Either way the queue is closed when the close is signalled, the close
//! handshake gets at most `HANDSHAKE`, and the connection slot is given
//! back when the writer ends, with the socket.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::{timeout, timeout_at, Instant};

use crate::clock::now_us;
use crate::hub::Outbound;
use crate::metrics;
use crate::protocol::CloseReason;
use crate::state::ConnectionSlot;

/// How long a close waits behind the frames queued before it.
const DRAIN: Duration = Duration::from_secs(2);
/// How long the close frame waits for room in the socket.
const HANDSHAKE: Duration = Duration::from_secs(3);

/// Writes queued items until the queue ends (the session is gone) or a
/// close is signalled, then closes in order.
pub(super) async fn write_loop(
    mut ws: actix_ws::Session,
    mut queue: mpsc::Receiver<Outbound>,
    mut close: oneshot::Receiver<CloseReason>,
    slot: ConnectionSlot,
) {
    let reason = loop {
        tokio::select! {
            biased;
            reason = &mut close => break reason.ok(),
            item = queue.recv() => {
                let Some(item) = item else { break None };
                match write_or_close(&mut ws, item, &mut close).await {
                    Ok(None) => {}
                    Ok(Some(reason)) => break Some(reason),
                    Err(_) => return,
                }
            }
        }
    };
    finish(ws, queue, reason).await;
    drop(slot);
}

/// Writes one item; a close signalled meanwhile lets the write finish
/// (within `DRAIN`) unless it is `slow consumer`.
async fn write_or_close(
    ws: &mut actix_ws::Session,
    item: Outbound,
    close: &mut oneshot::Receiver<CloseReason>,
) -> Result<Option<CloseReason>, actix_ws::Closed> {
    let write = write_one(ws, item);
    tokio::pin!(write);
    tokio::select! {
        biased;
        written = &mut write => written.map(|()| None),
        reason = close => {
            let reason = reason.ok().unwrap_or(CloseReason::Normal);
            if reason != CloseReason::SlowConsumer {
                let _ = timeout(DRAIN, write).await;
            }
            Ok(Some(reason))
        }
    }
}

/// Drains what was queued before the close (not for `slow consumer`),
/// then sends the close frame. `None`: the client went away, nothing to send.
async fn finish(
    mut ws: actix_ws::Session,
    mut queue: mpsc::Receiver<Outbound>,
    reason: Option<CloseReason>,
) {
    let Some(reason) = reason else {
        return;
    };
    queue.close();
    if reason != CloseReason::SlowConsumer {
        let deadline = Instant::now() + DRAIN;
        while let Ok(item) = queue.try_recv() {
            if !matches!(
                timeout_at(deadline, write_one(&mut ws, item)).await,
                Ok(Ok(()))
            ) {
                break;
            }
        }
    }
    drop(queue);
    let _ = timeout(HANDSHAKE, ws.close(Some(reason.to_ws()))).await;
}

async fn write_one(ws: &mut actix_ws::Session, item: Outbound) -> Result<(), actix_ws::Closed> {
    match item {
        Outbound::Frame(text) => ws.text(text).await,
        Outbound::Delivery(envelope) => {
            ws.text(envelope.frame.clone()).await?;
            if envelope.published_us > 0 {
                let latency_us = now_us().saturating_sub(envelope.published_us);
                metrics::record_delivery(latency_us as f64 / 1e6);
            }
            Ok(())
        }
        Outbound::Ping => ws.ping(b"").await,
        Outbound::Pong(payload) => ws.pong(&payload).await,
    }
}
