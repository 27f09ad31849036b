//! Switchboard: a real-time WebSocket hub.
pub mod auth;
pub mod config;
