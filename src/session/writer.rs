//! The socket writer: one task per session that owns the WebSocket's
//! sending half and drains the session's bounded outbound queue into it,
//! until a close is signalled (or the session is gone).

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::clock::now_us;
use crate::hub::Outbound;
use crate::metrics;
use crate::protocol::CloseReason;

/// Writes queued items until the queue ends or a close is signalled; a
/// close frame waits at most `close_wait` for room in the socket.
pub(super) async fn write_loop(
    mut ws: actix_ws::Session,
    mut queue: mpsc::Receiver<Outbound>,
    mut close: oneshot::Receiver<CloseReason>,
    close_wait: Duration,
) {
    loop {
        // `Err(reason)`: stop, closing with `reason` when there is one.
        let step: Result<(), Option<CloseReason>> = tokio::select! {
            biased;
            reason = &mut close => Err(reason.ok()),
            item = queue.recv() => match item {
                Some(item) => {
                    let write = write_one(&mut ws, item);
                    tokio::select! {
                        biased;
                        reason = &mut close => Err(reason.ok()),
                        written = write => written.map_err(|_| None),
                    }
                }
                None => Err(None),
            },
        };
        if let Err(reason) = step {
            if let Some(reason) = reason {
                let _ = tokio::time::timeout(close_wait, ws.close(Some(reason.to_ws()))).await;
            }
            return;
        }
    }
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
