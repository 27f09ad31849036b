//! HTTP: the WebSocket upgrade (`/ws`, [`ws`], the server's upgrade
//! service), the admin API (`/api/...`, [`api`], behind [`api_key`]),
//! health and metrics ([`health`]),
//! development tokens ([`dev`], when enabled) and the static demo
//! (`server.static_dir` at `/`). Routes only; each concern has its own file.

mod api;
mod api_key;
mod bearer;
mod dev;
pub mod echo;
mod health;
pub mod ws;

use actix_web::http::StatusCode;
use actix_web::middleware::from_fn;
use actix_web::{web, HttpResponse};
use serde_json::json;

use crate::config::Config;

pub fn routes(cfg: &mut web::ServiceConfig, config: &Config) {
    if config.auth.dev_tokens {
        cfg.route("/dev/token", web::post().to(dev::token));
    } else {
        cfg.route("/dev/token", web::to(dev::disabled));
    }
    cfg.route("/ws", web::get().to(ws::without_upgrade))
        .route("/health", web::get().to(health::ready))
        .route("/health/live", web::get().to(health::live))
        .route("/health/ready", web::get().to(health::ready))
        .route("/metrics", web::get().to(health::metrics))
        .service(
            web::scope("/api")
                .wrap(from_fn(api_key::require_api_key))
                .route("/publish", web::post().to(api::publish))
                .route("/rooms/{room}/presence", web::get().to(api::presence))
                .route("/rooms/{room}/history", web::get().to(api::history))
                .route(
                    "/users/{user}/connections",
                    web::get().to(api::user_connections),
                )
                .route(
                    "/users/{user}/disconnect",
                    web::post().to(api::disconnect_user),
                )
                .route("/tasks/{id}", web::get().to(api::task))
                .route("/tasks/{id}/progress", web::post().to(api::task_progress))
                .route("/stats", web::get().to(api::stats)),
        );
    if let Some(dir) = config.static_dir() {
        cfg.service(
            actix_files::Files::new("/", dir)
                .index_file("index.html")
                .default_handler(web::to(not_found)),
        );
    }
    cfg.default_service(web::to(not_found));
}

/// The routes of a `switchboard worker`: health and metrics only.
pub fn worker_routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/health", web::get().to(health::worker_ready))
        .route("/health/live", web::get().to(health::live))
        .route("/health/ready", web::get().to(health::worker_ready))
        .route("/metrics", web::get().to(health::metrics))
        .default_service(web::to(not_found));
}

async fn not_found() -> HttpResponse {
    json_error(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

/// `{"error": code, "message": message}` with the given status.
pub fn json_error(status: StatusCode, code: &str, message: impl Into<String>) -> HttpResponse {
    HttpResponse::build(status).json(json!({"error": code, "message": message.into()}))
}
