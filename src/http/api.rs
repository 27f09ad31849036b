//! The admin API of contract section 5. Every call needs
//! `Authorization: Bearer <key>` with a key from `auth.api_keys` (none
//! configured: every call is refused). Errors are JSON
//! `{"error": code, "message": …}`.

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use super::json_error;
use crate::broker::BrokerError;
use crate::metrics::metrics;
use crate::protocol::{valid_user_id, MessageId, RoomName};
use crate::server::Shared;

/// An API error: its status and the JSON body `{"error": code, "message": …}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl actix_web::ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }
    fn error_response(&self) -> HttpResponse {
        json_error(self.status, self.code, self.message.clone())
    }
}

type ApiResult = Result<HttpResponse, ApiError>;

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError {
        status: StatusCode::BAD_REQUEST,
        code: "bad_request",
        message: message.into(),
    }
}

fn broker_error(e: BrokerError) -> ApiError {
    let (status, code, message) = match e {
        BrokerError::Unavailable(reason) => {
            tracing::warn!(error = %reason, "api call failed: broker unavailable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "broker unavailable",
            )
        }
        e => {
            tracing::error!(error = %e, "api call failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "processing failed",
            )
        }
    };
    ApiError {
        status,
        code,
        message: message.into(),
    }
}

/// Checks the API key (constant time in the key's length).
fn authorize(req: &HttpRequest, shared: &Shared) -> Result<(), ApiError> {
    let presented = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim().as_bytes());
    let ok = presented.is_some_and(|presented| {
        shared
            .config
            .auth
            .api_keys
            .iter()
            .any(|key| constant_time_eq(key.as_bytes(), presented))
    });
    if ok {
        Ok(())
    } else {
        Err(ApiError {
            status: StatusCode::UNAUTHORIZED,
            code: "unauthorized",
            message: "a valid API key is required: Authorization: Bearer <key>".into(),
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn room_param(room: &str) -> Result<RoomName, ApiError> {
    RoomName::parse(room).map_err(bad_request)
}

fn user_param(user: &str) -> Result<&str, ApiError> {
    if valid_user_id(user) {
        Ok(user)
    } else {
        Err(bad_request("a user id is 1-256 bytes"))
    }
}

/// `POST /api/publish` with exactly one of `room`, `user`, `broadcast: true`.
pub async fn publish(req: HttpRequest, shared: web::Data<Shared>, body: web::Bytes) -> ApiResult {
    publish_inner(&req, &shared, &body).await
}

async fn publish_inner(req: &HttpRequest, shared: &Shared, body: &[u8]) -> ApiResult {
    authorize(req, shared)?;
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        room: Option<String>,
        user: Option<String>,
        broadcast: Option<bool>,
        data: Value,
    }
    let body: Body =
        serde_json::from_slice(body).map_err(|e| bad_request(format!("invalid body: {e}")))?;
    let broker = &shared.broker;
    let id = match (body.room, body.user, body.broadcast) {
        (Some(room), None, None | Some(false)) => {
            let room = room_param(&room)?;
            metrics().published.with_label_values(&["room"]).inc();
            broker
                .publish_room(&room, "server", &body.data)
                .await
                .map_err(broker_error)?
                .to_string()
        }
        (None, Some(user), None | Some(false)) => {
            let user = user_param(&user)?;
            metrics().published.with_label_values(&["user"]).inc();
            broker
                .publish_user(user, "server", &body.data)
                .await
                .map_err(broker_error)?
        }
        (None, None, Some(true)) => {
            metrics().published.with_label_values(&["broadcast"]).inc();
            broker.broadcast(&body.data).await.map_err(broker_error)?
        }
        _ => {
            return Err(bad_request(
                "give exactly one of \"room\", \"user\" or \"broadcast\": true, and \"data\"",
            ))
        }
    };
    Ok(HttpResponse::Ok().json(json!({ "id": id })))
}

/// `GET /api/rooms/{room}/presence`
pub async fn presence(
    req: HttpRequest,
    shared: web::Data<Shared>,
    room: web::Path<String>,
) -> ApiResult {
    async {
        authorize(&req, &shared)?;
        let room = room_param(&room)?;
        let users = shared.broker.presence(&room).await.map_err(broker_error)?;
        Ok(HttpResponse::Ok().json(json!({"room": room.as_str(), "users": users})))
    }
    .await
}

/// `GET /api/rooms/{room}/history?since=&limit=`: the retained messages
/// after `since`, oldest first, at most `limit` (default and maximum
/// `history.size`), the latest ones when more are retained. Each message is
/// the `message` frame a member received.
pub async fn history(
    req: HttpRequest,
    shared: web::Data<Shared>,
    room: web::Path<String>,
) -> ApiResult {
    async {
        authorize(&req, &shared)?;
        let room = room_param(&room)?;
        #[derive(Deserialize)]
        struct Query {
            since: Option<String>,
            limit: Option<String>,
        }
        let query = web::Query::<Query>::from_query(req.query_string())
            .map_err(|e| bad_request(format!("invalid query: {e}")))?;
        let since = match query.since.as_deref() {
            None | Some("") => None,
            Some(s) => Some(s.parse::<MessageId>().map_err(bad_request)?),
        };
        let max = shared.config.history.size;
        let limit = match query.limit.as_deref() {
            None | Some("") => max,
            Some(l) => l
                .parse::<usize>()
                .map_err(|_| bad_request("limit must be a non-negative integer"))?
                .min(max),
        };
        let history = shared
            .broker
            .history(&room, since, limit)
            .await
            .map_err(broker_error)?;
        // The frames are already JSON: splice them in, don't re-parse.
        let mut body = String::with_capacity(
            64 + history
                .messages
                .iter()
                .map(|m| m.frame.len() + 1)
                .sum::<usize>(),
        );
        body.push_str("{\"room\":");
        body.push_str(&serde_json::to_string(room.as_str()).unwrap_or_default());
        body.push_str(",\"messages\":[");
        for (i, m) in history.messages.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(&m.frame);
        }
        body.push_str("]}");
        Ok(HttpResponse::Ok()
            .content_type("application/json")
            .body(body))
    }
    .await
}

/// `GET /api/users/{user}/connections`
pub async fn user_connections(
    req: HttpRequest,
    shared: web::Data<Shared>,
    user: web::Path<String>,
) -> ApiResult {
    async {
        authorize(&req, &shared)?;
        let user = user_param(&user)?;
        let n = shared
            .broker
            .user_connections(user)
            .await
            .map_err(broker_error)?;
        Ok(HttpResponse::Ok().json(json!({"user": user, "connections": n})))
    }
    .await
}

/// `POST /api/users/{user}/disconnect`: 1008 `kicked` everywhere.
pub async fn disconnect_user(
    req: HttpRequest,
    shared: web::Data<Shared>,
    user: web::Path<String>,
) -> ApiResult {
    async {
        authorize(&req, &shared)?;
        let user = user_param(&user)?;
        let n = shared
            .broker
            .disconnect_user(user)
            .await
            .map_err(broker_error)?;
        tracing::info!(user, disconnected = n, "user disconnected by the API");
        Ok(HttpResponse::Ok().json(json!({"disconnected": n})))
    }
    .await
}

/// `GET /api/tasks/{id}`: async tasks are not in this build.
pub async fn task(req: HttpRequest, shared: web::Data<Shared>) -> ApiResult {
    authorize(&req, &shared)?;
    Err(ApiError {
        status: StatusCode::NOT_FOUND,
        code: "not_found",
        message: "no such task (async tasks are not available in this build)".into(),
    })
}

/// `GET /api/stats`
pub async fn stats(req: HttpRequest, shared: web::Data<Shared>) -> ApiResult {
    async {
        authorize(&req, &shared)?;
        let stats = shared.broker.stats().await.map_err(broker_error)?;
        Ok(HttpResponse::Ok().json(json!({
            "instance": shared.instance_id,
            "broker": shared.broker.kind(),
            "connections": shared.open_connections(),
            "rooms": stats.rooms,
            "users": stats.users,
            "cluster_connections": stats.connections,
            "uptime_s": shared.started_at.elapsed().as_secs(),
        })))
    }
    .await
}
