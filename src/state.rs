//! The state every worker of one instance shares: config, verifier, broker,
//! the instance's connection places, its hubs and its open sockets.
//! Nothing here is touched per message except through the broker handle.
//!
//! Shutdown uses it too: [`AppState::begin_shutdown`] refuses new
//! connections and asks every hub to close its sessions, and
//! [`AppState::sockets_closed`] resolves once every socket writer has
//! written its close frame (or given up).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use actix::Addr;
use tokio_util::task::TaskTracker;

use crate::auth::Verifier;
use crate::broker::Broker;
use crate::config::Config;
use crate::hub::{Hub, Shutdown};
use crate::protocol::CloseReason;
use crate::session::SessionKey;
use crate::tasks::Tasks;

/// Sessions an instance closes per second at least when it drains (on
/// SIGTERM); more when `server.shutdown_grace_s` would not be enough.
pub const DRAIN_PER_SECOND: usize = 5_000;

pub struct AppState {
    pub config: Config,
    pub instance_id: String,
    pub verifier: Verifier,
    pub broker: Broker,
    pub tasks: Tasks,
    pub started_at: Instant,
    next_session_key: AtomicU64,
    open_connections: AtomicUsize,
    shutting_down: AtomicBool,
    /// Every worker's hub, for shutdown; not used on the message path.
    hubs: Mutex<Vec<Addr<Hub>>>,
    /// Every socket that has a close frame to write (session writers,
    /// refusals).
    sockets: TaskTracker,
}

/// One of the instance's `limits.max_connections` places, held by a
/// session for its whole life and given back on drop.
pub struct ConnectionSlot(Arc<AppState>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::AcqRel);
    }
}

impl AppState {
    pub fn new(
        config: Config,
        instance_id: String,
        verifier: Verifier,
        broker: Broker,
        tasks: Tasks,
    ) -> Self {
        AppState {
            config,
            instance_id,
            verifier,
            broker,
            tasks,
            started_at: Instant::now(),
            next_session_key: AtomicU64::new(1),
            open_connections: AtomicUsize::new(0),
            shutting_down: AtomicBool::new(false),
            hubs: Mutex::new(Vec::new()),
            sockets: TaskTracker::new(),
        }
    }

    /// Takes a connection place unless the instance is full.
    pub fn try_acquire_slot(self: &Arc<Self>) -> Option<ConnectionSlot> {
        let max = self.config.limits.max_connections;
        self.open_connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| ConnectionSlot(self.clone()))
    }

    pub fn open_connections(&self) -> usize {
        self.open_connections.load(Ordering::Acquire)
    }

    /// A key for a new session, unique within the instance.
    pub fn next_session_key(&self) -> SessionKey {
        SessionKey::new(self.next_session_key.fetch_add(1, Ordering::Relaxed))
    }

    pub fn shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// A worker's hub, for shutdown.
    pub fn add_hub(&self, hub: Addr<Hub>) {
        if let Ok(mut hubs) = self.hubs.lock() {
            hubs.push(hub);
        }
    }

    /// A place in the tracker [`Self::sockets_closed`] waits on, held by a
    /// socket writer (or a refused connection) until its close frame is
    /// written.
    pub fn socket_token(&self) -> tokio_util::task::task_tracker::TaskTrackerToken {
        self.sockets.token()
    }

    /// Readiness turns 503, new connections are refused, and every hub
    /// closes its sessions with `reason`, spread over `window`: at least
    /// [`DRAIN_PER_SECOND`] a second per instance, faster when that would
    /// not be done within the window.
    pub fn begin_shutdown(&self, reason: CloseReason, window: std::time::Duration) {
        self.shutting_down.store(true, Ordering::Release);
        let hubs = self.hubs.lock().map(|h| h.clone()).unwrap_or_default();
        let per_second = DRAIN_PER_SECOND / hubs.len().max(1);
        for hub in hubs {
            hub.do_send(Shutdown {
                reason,
                per_second,
                window,
            });
        }
        self.sockets.close();
    }

    /// Resolves when every socket task has finished (after
    /// [`Self::begin_shutdown`]).
    pub async fn sockets_closed(&self) {
        self.sockets.wait().await;
    }
}
