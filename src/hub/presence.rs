//! Presence changes of this worker's sessions, applied in order per
//! connection: each connection's joins and leaves go down one of a few
//! lanes (by session key), and a lane applies its changes one after the
//! other, so a leave and a later join of one connection never race.
//!
//! Bound: a session waits for its join's change before its next request,
//! so a lane holds at most, per session, one join plus the leaves of the
//! rooms it holds (`limits.max_rooms_per_connection`).

use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};

use crate::broker::Presence;
use crate::protocol::RoomName;
use crate::session::SessionKey;

const LANES: usize = 8;

/// One presence change.
pub(super) struct Change {
    pub joined: bool,
    pub room: RoomName,
    pub user: Arc<str>,
    pub connection_id: Arc<str>,
    /// Told when the change is recorded (or failed).
    pub done: Option<oneshot::Sender<()>>,
    /// Applied only once this resolves (a join waits for the room's watch,
    /// so that the joiner hears its own `joined`).
    pub after: Option<BoxFuture<'static, ()>>,
}

pub(super) struct Lanes(Vec<mpsc::UnboundedSender<Change>>);

impl Lanes {
    /// Starts the lanes' tasks on the current arbiter.
    pub(super) fn start(presence: Arc<dyn Presence>) -> Lanes {
        let lanes = (0..LANES)
            .map(|_| {
                let (tx, rx) = mpsc::unbounded_channel();
                actix::spawn(apply(presence.clone(), rx));
                tx
            })
            .collect();
        Lanes(lanes)
    }

    /// Queues a change of session `key`'s presence behind its earlier ones.
    pub(super) fn push(&self, key: SessionKey, change: Change) {
        let lane = &self.0[(key.get() % self.0.len() as u64) as usize];
        if lane.send(change).is_err() {
            tracing::error!("presence lane stopped; change not recorded");
        }
    }
}

async fn apply(presence: Arc<dyn Presence>, mut changes: mpsc::UnboundedReceiver<Change>) {
    while let Some(mut change) = changes.recv().await {
        if let Some(after) = change.after.take() {
            after.await;
        }
        let (room, user, conn) = (&change.room, &change.user, &change.connection_id);
        let result = if change.joined {
            presence.join(room, user, conn).await
        } else {
            presence.leave(room, user, conn).await
        };
        if let Err(e) = result {
            let what = if change.joined { "join" } else { "leave" };
            tracing::warn!(error = %e, room = %room, "presence {what} not recorded");
        }
        if let Some(done) = change.done {
            let _ = done.send(());
        }
    }
}
