//! Running one Switchboard instance: [`run`] starts the broker, one hub per
//! worker thread and the HTTP server on a given listener, serves until the
//! `shutdown` future resolves, then shuts down in order — readiness 503 and
//! new connections refused, every session closed with 1001 `going away`,
//! the close frames written, the broker's registrations removed — all
//! within `server.shutdown_grace_s`.

use std::future::Future;
use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use actix::Actor;
use actix_http::{HttpService, KeepAlive};
use actix_service::map_config;
use actix_web::dev::AppConfig;
use actix_web::{web, App, HttpServer};
use tokio::time::Instant;

use crate::auth::{KeyError, Verifier};
use crate::broker::{Broker, StartError};
use crate::config::Config;
use crate::hub::Hub;
use crate::protocol::CloseReason;
use crate::state::AppState;
use crate::tasks::worker::WorkerPool;
use crate::tasks::{TaskStartError, Tasks};

/// Why an instance could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Broker(#[from] StartError),
    #[error(transparent)]
    Tasks(#[from] TaskStartError),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Serves on `listener` until `shutdown` resolves, then shuts down
/// gracefully and returns. Must run inside an actix system
/// (`actix_web::rt::System`). Prints `listening on HOST:PORT` on stdout once
/// it accepts.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let task_names: Vec<String> = config.tasks.handlers.keys().cloned().collect();
    crate::metrics::init("hub", &task_names);
    let state = Arc::new(start_state(config).await?);
    let workers = match state.config.server.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let grace = Duration::from_secs(state.config.server.shutdown_grace_s.max(1));
    let addr = listener.local_addr()?;
    let server = http_server(state.clone(), listener, workers, grace)?;
    announce(addr, &state, workers);
    let tasks = &state.config.tasks;
    // A worker runs only what it has a handler for: none configured, none run.
    let hands = if tasks.handlers.is_empty() {
        0
    } else {
        tasks.workers
    };
    let pool = WorkerPool::start(state.tasks.clone(), tasks, &state.instance_id, hands)?;
    let handle = server.handle();
    let mut serving = actix_web::rt::spawn(server);
    tokio::select! {
        _ = shutdown => {}
        stopped = &mut serving => {
            pool.stop(grace).await;
            return Ok(stopped.map_err(io::Error::other)??);
        }
    }
    drain(&state, grace).await;
    pool.stop(grace).await;
    handle.stop(true).await;
    Ok(serving.await.map_err(io::Error::other)??)
}

/// The hub's HTTP server on `listener`: actix-web's app for every request,
/// and every WebSocket upgrade handed with its connection to
/// [`crate::http::ws::service`], which gives the socket to its session. (So
/// it is built from actix-http's service, as `HttpServer` builds it, plus
/// the upgrade service `HttpServer` has no place for.) One app, one hub
/// and one upgrade service per worker thread.
fn http_server(
    state: Arc<AppState>,
    listener: TcpListener,
    workers: usize,
    grace: Duration,
) -> io::Result<actix_web::dev::Server> {
    let addr = listener.local_addr()?;
    let server = actix_web::dev::Server::build()
        .workers(workers)
        // actix's own cap counts connections until their upgrade (25,600 per
        // worker by default): never below ours.
        .max_concurrent_connections(state.config.limits.max_connections.max(1))
        .disable_signals()
        .shutdown_timeout(grace.as_secs())
        .listen("switchboard", listener, move || {
            // Runs once on each worker thread: that worker's hub lives here.
            let limits = &state.config.limits;
            let bounds = crate::session::outbound::Bounds::from_limits(limits);
            let hub = Hub::new(state.broker.clone(), bounds).start();
            state.add_hub(hub.clone());
            let app_state = state.clone();
            let app = App::new()
                .app_data(web::Data::from(app_state.clone()))
                .app_data(web::Data::new(hub.clone()))
                .configure(move |cfg| crate::http::routes(cfg, &app_state.config));
            HttpService::build()
                .keep_alive(KeepAlive::default())
                .client_request_timeout(Duration::from_secs(5))
                .client_disconnect_timeout(Duration::from_secs(1))
                // Small frames (acks, a chat line) go out at once instead of
                // waiting for the client's delayed ACK (up to 40 ms on Linux).
                .tcp_nodelay(true)
                .local_addr(addr)
                .upgrade(crate::http::ws::service(state.clone(), hub))
                .finish(map_config(app, |_| AppConfig::default()))
                .tcp()
        })?
        .run();
    Ok(server)
}

/// Runs task workers only (`switchboard worker`): up to `hands` tasks at once on
/// the Redis queue, and `/health/live`, `/health/ready`, `/metrics` on
/// `listener`, until `shutdown` resolves; then the workers finish what
/// they hold within `server.shutdown_grace_s`.
pub async fn run_worker(
    config: Config,
    listener: TcpListener,
    hands: usize,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let task_names: Vec<String> = config.tasks.handlers.keys().cloned().collect();
    crate::metrics::init("worker", &task_names);
    let tasks = Tasks::start(&config, None).await?;
    if !tasks.handlers.runs_any() {
        return Err(ServerError::Io(io::Error::other(
            "no task handler this worker can run (tasks.handlers is empty or external)",
        )));
    }
    let instance_id = config.instance_id();
    let grace = Duration::from_secs(config.server.shutdown_grace_s.max(1));
    let addr = listener.local_addr()?;
    let app_tasks = tasks.clone();
    let server = HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(app_tasks.clone()))
            .configure(crate::http::worker_routes)
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(grace.as_secs())
    .listen(listener)?;
    let pool = WorkerPool::start(tasks, &config.tasks, &instance_id, hands)?;
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "listening on {addr}");
    let _ = out.flush();
    drop(out);
    tracing::info!(%addr, instance = %instance_id, workers = hands, "switchboard worker running");
    let server = server.run();
    let handle = server.handle();
    let serving = actix_web::rt::spawn(server);
    shutdown.await;
    tracing::info!("stopping: finishing the tasks this worker holds");
    pool.stop(grace).await;
    handle.stop(true).await;
    Ok(serving.await.map_err(io::Error::other)??)
}

/// Everything the workers share, with the broker started.
async fn start_state(config: Config) -> Result<AppState, ServerError> {
    let instance_id = config.instance_id();
    if config.auth.dev_tokens {
        tracing::warn!(
            "!!! auth.dev_tokens is on: POST /dev/token hands a token for any user name to anyone who asks. \
             For local demos only. !!!"
        );
    }
    if config.uses_dev_secret() {
        tracing::warn!(
            "!!! auth.jwt_secret is the built-in DEVELOPMENT secret: anyone can mint tokens for this hub. \
             Set auth.jwt_secret (or SWITCHBOARD__AUTH__JWT_SECRET) before exposing it. !!!"
        );
    }
    let verifier = Verifier::new(&config.auth)?;
    let broker = Broker::start(&config, &instance_id).await?;
    let tasks = Tasks::start(&config, Some(&broker)).await?;
    Ok(AppState::new(config, instance_id, verifier, broker, tasks))
}

/// The first stdout line, `listening on HOST:PORT` (tools and tests read
/// it; keep it as it is), then, in the log, where to point a browser and a
/// WebSocket client.
fn announce(addr: SocketAddr, state: &AppState, workers: usize) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "listening on {addr}");
    let _ = out.flush();
    drop(out);
    let config = &state.config;
    tracing::info!(%addr, instance = %state.instance_id, workers, broker = state.broker.kind, "switchboard listening");
    if config.loopback_for_dev_tokens() {
        tracing::info!(
            "auth.dev_tokens is on and server.host is not set: listening on {} only, not reachable \
             from other machines (set server.host, e.g. SWITCHBOARD__SERVER__HOST=0.0.0.0, to change that)",
            addr.ip()
        );
    }
    let base = reachable_at(addr);
    if config.static_dir().is_some() {
        if config.auth.dev_tokens {
            tracing::info!(
                "open http://{base}/ in a browser: the demo chat (and http://{base}/dashboard.html)"
            );
        } else {
            tracing::info!(
                "the demo is served at http://{base}/, but its chat needs development tokens: \
                 start the hub with auth.dev_tokens = true (SWITCHBOARD__AUTH__DEV_TOKENS=true)"
            );
        }
    }
    tracing::info!(
        "WebSocket clients connect to ws://{base}/ws?token=<token>; get a token with \
         `switchboard token --user alice` (from a checkout: `cargo run --release -- token --user alice`)"
    );
}

/// `host:port` a client on this machine can use for `addr`: `localhost`
/// for every interface and for loopback, else the address itself.
fn reachable_at(addr: SocketAddr) -> String {
    let ip = addr.ip();
    let local = ip.is_unspecified()
        || ip == std::net::IpAddr::from([127, 0, 0, 1])
        || ip == std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST);
    if local {
        format!("localhost:{}", addr.port())
    } else {
        addr.to_string()
    }
}

/// The share of `server.shutdown_grace_s` over which sessions are closed
/// (the rest is for their close frames and the broker's clean-up).
const DRAIN_WINDOW: f64 = 0.6;

/// Closes every session with 1001 `going away`, in batches spread over
/// [`DRAIN_WINDOW`] of `grace` (see [`AppState::begin_shutdown`]), and
/// waits for the close frames to be written, then removes this instance
/// from the broker; each step bounded so the whole stays within `grace`.
async fn drain(state: &AppState, grace: Duration) {
    let deadline = Instant::now() + grace;
    let window = grace.mul_f64(DRAIN_WINDOW);
    tracing::info!(
        connections = state.open_connections(),
        window_ms = window.as_millis() as u64,
        "shutting down: closing every session with 1001 going away, in batches"
    );
    state.begin_shutdown(CloseReason::GoingAway, window);
    if tokio::time::timeout_at(deadline, state.sockets_closed())
        .await
        .is_err()
    {
        tracing::warn!(
            "some sessions did not take their close frame within server.shutdown_grace_s"
        );
    }
    let cleanup = state.broker.lifecycle.shutdown();
    if tokio::time::timeout_at(deadline, cleanup).await.is_err() {
        tracing::warn!("broker clean-up did not finish in time; other instances will reap");
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn signal() {
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
