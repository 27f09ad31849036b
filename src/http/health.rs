//! `/health/live`, `/health/ready` (and `/health`), `/metrics`, for the
//! hub and for `switchboard worker`.

use actix_web::{web, HttpResponse};
use serde_json::json;

use crate::state::AppState;
use crate::tasks::Tasks;

/// 200 while the process serves HTTP.
pub async fn live() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// 200 when the instance can do its job, else 503 with the reason.
pub async fn ready(state: web::Data<AppState>) -> HttpResponse {
    if state.shutting_down() {
        return HttpResponse::ServiceUnavailable()
            .json(json!({"status": "unavailable", "reason": "shutting down"}));
    }
    match state.broker.lifecycle.ready().await {
        Ok(()) => HttpResponse::Ok().json(json!({"status": "ready"})),
        Err(reason) => HttpResponse::ServiceUnavailable()
            .json(json!({"status": "unavailable", "reason": reason})),
    }
}

/// `/health/ready` of a `switchboard worker`: 200 while its task queue
/// answers.
pub async fn worker_ready(tasks: web::Data<Tasks>) -> HttpResponse {
    match tasks.queue.ready().await {
        Ok(()) => HttpResponse::Ok().json(json!({"status": "ready"})),
        Err(reason) => HttpResponse::ServiceUnavailable()
            .json(json!({"status": "unavailable", "reason": reason})),
    }
}

/// Prometheus text format, no auth.
pub async fn metrics() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(crate::metrics::metrics().render())
}
