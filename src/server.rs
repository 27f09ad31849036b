//! Starting and stopping one Switchboard instance: the shared state every
//! worker sees, one hub per worker thread, the HTTP server, and shutdown on
//! SIGTERM/SIGINT (stop accepting, close every session with 1001
//! `going away`, exit within `server.shutdown_grace_s`).

use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::{Actor, Addr};
use actix_web::{web, App, HttpServer};

use crate::auth::Verifier;
use crate::broker::memory::MemoryBroker;
use crate::broker::redis::RedisBroker;
use crate::broker::Broker;
use crate::config::{BrokerKind, Config};
use crate::hub::{Hub, Shutdown};
use crate::protocol::CloseReason;

/// State shared by every worker. Nothing here is touched per message except
/// through the broker handle (itself lock-free on the hot path).
pub struct Shared {
    pub config: Config,
    pub instance_id: String,
    pub verifier: Verifier,
    pub broker: Arc<dyn Broker>,
    pub started_at: Instant,
    pub next_session_key: AtomicU64,
    open_connections: AtomicUsize,
    shutting_down: AtomicBool,
    /// Every worker's hub, for shutdown; not used on the message path.
    hubs: Mutex<Vec<Addr<Hub>>>,
}

/// One of the instance's `limits.max_connections` places, held by a
/// session for its whole life and given back on drop.
pub struct ConnectionSlot(Arc<Shared>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Shared {
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

    pub fn shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }
}

/// Runs the hub until SIGTERM or SIGINT. Blocking: builds its own actix
/// system. Prints `listening on HOST:PORT` on stdout once it accepts.
pub fn run(config: Config) -> io::Result<()> {
    actix_web::rt::System::new().block_on(serve(config))
}

async fn serve(config: Config) -> io::Result<()> {
    let instance_id = config.instance_id();
    if config.uses_dev_secret() {
        tracing::warn!(
            "!!! auth.jwt_secret is the built-in DEVELOPMENT secret: anyone can mint tokens for this hub. \
             Set auth.jwt_secret (or SWITCHBOARD__AUTH__JWT_SECRET) before exposing it. !!!"
        );
    }
    let verifier = Verifier::new(&config.auth).map_err(io::Error::other)?;
    let broker: Arc<dyn Broker> = match config.broker.kind {
        BrokerKind::Memory => MemoryBroker::start(&config.history),
        BrokerKind::Redis => RedisBroker::start(&config, &instance_id).map_err(io::Error::other)?,
    };
    let workers = match config.server.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let grace = config.server.shutdown_grace_s;
    let bind = (config.server.host.clone(), config.server.port);
    let shared = Arc::new(Shared {
        config,
        instance_id,
        verifier,
        broker,
        started_at: Instant::now(),
        next_session_key: AtomicU64::new(1),
        open_connections: AtomicUsize::new(0),
        shutting_down: AtomicBool::new(false),
        hubs: Mutex::new(Vec::new()),
    });

    let app_shared = shared.clone();
    let server = HttpServer::new(move || {
        // Runs once on each worker thread: that worker's hub lives here.
        let hub = Hub::new(
            app_shared.broker.clone(),
            app_shared.config.limits.max_outbound_queue,
        )
        .start();
        if let Ok(mut hubs) = app_shared.hubs.lock() {
            hubs.push(hub.clone());
        }
        App::new()
            .app_data(web::Data::from(app_shared.clone()))
            .app_data(web::Data::new(hub))
            .configure(crate::http::routes)
    })
    .workers(workers)
    // Small frames (acks, a chat line) go out at once instead of waiting
    // for the client's delayed ACK (up to 40 ms on Linux).
    .tcp_nodelay(true)
    .disable_signals()
    .shutdown_timeout(grace)
    .bind(bind)?;
    let addr: Option<SocketAddr> = server.addrs().first().copied();
    let server = server.run();
    if let Some(addr) = addr {
        let mut out = io::stdout().lock();
        let _ = writeln!(out, "listening on {addr}");
        let _ = out.flush();
        tracing::info!(%addr, instance = %shared.instance_id, workers, broker = shared.broker.kind(), "switchboard listening");
        tracing::info!(
            "get a token: `switchboard token --user alice` (from a checkout: `cargo run --release -- token --user alice`), \
             then connect to ws://{addr}/ws?token=<token>"
        );
    }
    let handle = server.handle();
    actix_web::rt::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down: closing every session with 1001 going away");
        shared.shutting_down.store(true, Ordering::Release);
        let hubs = shared.hubs.lock().map(|h| h.clone()).unwrap_or_default();
        for hub in hubs {
            hub.do_send(Shutdown(CloseReason::GoingAway));
        }
        // Give the close frames a moment to be written before workers stop.
        actix_web::rt::time::sleep(Duration::from_millis(200)).await;
        let grace = Duration::from_secs(shared.config.server.shutdown_grace_s.max(1));
        if tokio::time::timeout(grace / 2, shared.broker.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("broker clean-up did not finish in time; other instances will reap");
        }
        handle.stop(true).await;
    });
    server.await
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
