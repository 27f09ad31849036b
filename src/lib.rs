//! Switchboard: a real-time WebSocket hub.
//!
//! ```text
//! browser ──ws──▶ Session actor ──▶ Hub actor (one per worker thread)
//!                                      ▲
//!                      Broker ─────────┘  (memory: one actor; redis: cluster)
//! POST /api/publish ──▶ Broker
//! ```
//!
//! - [`session`]: one actor per WebSocket; auth is checked before it starts
//!   ([`http::ws`], actix-http's upgrade service, which hands it the TCP
//!   socket), it reads the socket, answers client frames (one file per
//!   frame) and owns a bounded outbound queue that its writer task drains
//!   into the socket.
//! - [`hub`]: one actor per actix-web worker thread; routes by room, user and
//!   to everyone; owns the join replay/live seam.
//! - [`broker`]: ids, history, presence, the connection registry and
//!   fan-out to every hub, in parts ([`broker::Messages`],
//!   [`broker::Presence`], [`broker::Registry`], [`broker::Subscriptions`]),
//!   each with a memory ([`broker::memory`]) and a Redis
//!   ([`broker::redis`]) implementation.
//! - [`protocol`]: every frame, error code and close code (docs/protocol.md).
//! - [`auth`]: JWT verification and minting, room globs.
//! - [`config`]: the TOML file and `SWITCHBOARD__…` overrides.
//! - [`state`]: what every worker shares; connection places; shutdown.
//! - [`http`]: `/ws`, the admin API, health and metrics; [`metrics`].
//! - [`tasks`]: async tasks: the queue (memory, Redis streams), workers,
//!   handlers.
//! - [`redis`]: the Redis layer under the Redis broker and task queue:
//!   connections (standalone, cluster, sentinel), keys, scripts, pub/sub.
//! - [`server`]: [`server::run`]: start, serve, shut down.
pub mod auth;
pub mod broker;
pub mod clock;
pub mod config;
pub mod demo;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod protocol;
pub mod ratelimit;
pub mod redis;
pub mod server;
pub mod session;
pub mod state;
pub mod tasks;
pub mod trim;
