//! HTTP: the WebSocket upgrade (`/ws`, [`ws`], the server's upgrade
//! service), the admin API (`/api/...`, [`api`], behind [`api_key`]),
//! health and metrics ([`health`]),
//! development tokens ([`dev`], when enabled), the API's OpenAPI document
//! ([`openapi`]) and the static demo (`server.static_dir` at `/`). Routes
//! only; each concern has its own file.

mod api;
mod api_key;
mod bearer;
mod dev;
pub mod echo;
mod health;
mod openapi;
pub mod ws;

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::middleware::from_fn;
use actix_web::{web, FromRequest, Handler, HttpResponse, Resource, Responder, ResponseError};
use serde_json::json;

use crate::config::Config;
use crate::protocol::ErrorCode;

pub fn routes(cfg: &mut web::ServiceConfig, config: &Config) {
    if config.auth.dev_tokens {
        cfg.service(one_method("/dev/token", Method::POST, dev::token));
    } else {
        cfg.route("/dev/token", web::to(dev::disabled));
    }
    cfg.service(one_method("/ws", Method::GET, ws::without_upgrade))
        .service(one_method("/health", Method::GET, health::ready))
        .service(one_method("/health/live", Method::GET, health::live))
        .service(one_method("/health/ready", Method::GET, health::ready))
        .service(one_method("/metrics", Method::GET, health::metrics))
        .service(one_method("/openapi.yaml", Method::GET, openapi::document))
        .service(
            web::scope("/api")
                .wrap(from_fn(api_key::require_api_key))
                .service(one_method("/publish", Method::POST, api::publish))
                .service(one_method(
                    "/rooms/{room}/presence",
                    Method::GET,
                    api::presence,
                ))
                .service(one_method(
                    "/rooms/{room}/history",
                    Method::GET,
                    api::history,
                ))
                .service(one_method(
                    "/users/{user}/connections",
                    Method::GET,
                    api::user_connections,
                ))
                .service(one_method(
                    "/users/{user}/disconnect",
                    Method::POST,
                    api::disconnect_user,
                ))
                .service(one_method("/tasks/{id}", Method::GET, api::task))
                .service(one_method(
                    "/tasks/{id}/progress",
                    Method::POST,
                    api::task_progress,
                ))
                .service(one_method("/stats", Method::GET, api::stats)),
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
    cfg.service(one_method("/health", Method::GET, health::worker_ready))
        .service(one_method("/health/live", Method::GET, health::live))
        .service(one_method(
            "/health/ready",
            Method::GET,
            health::worker_ready,
        ))
        .service(one_method("/metrics", Method::GET, health::metrics))
        .default_service(web::to(not_found));
}

/// A path served with one method; any other method answers 405 with
/// `Allow` (JSON `method_not_allowed`), not 404: the path exists.
fn one_method<F, Args>(path: &str, method: Method, handler: F) -> Resource
where
    F: Handler<Args>,
    Args: FromRequest + 'static,
    F::Output: Responder + 'static,
{
    let allow = method.clone();
    web::resource(path)
        .route(web::method(method).to(handler))
        .default_service(web::to(move || {
            let allow = allow.clone();
            async move {
                let message = format!("this path takes {allow} only");
                let mut res = ResponseError::error_response(&api::ApiError::new(
                    ErrorCode::MethodNotAllowed,
                    message,
                ));
                if let Ok(value) = HeaderValue::from_str(allow.as_str()) {
                    res.headers_mut().insert(header::ALLOW, value);
                }
                res
            }
        }))
}

async fn not_found() -> HttpResponse {
    json_error(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

/// `{"error": code, "message": message}` with the given status.
pub fn json_error(status: StatusCode, code: &str, message: impl Into<String>) -> HttpResponse {
    HttpResponse::build(status).json(json!({"error": code, "message": message.into()}))
}
