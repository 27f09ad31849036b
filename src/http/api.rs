//! The admin API (docs/protocol.md §9, docs/openapi.yaml) (the API key is checked once, by
//! [`super::api_key`], for the whole `/api` scope). Errors are JSON
//! `{"error": code, "message": …}`.

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};

use super::json_error;
use crate::broker::BrokerError;
use crate::metrics::metrics;
use crate::protocol::{valid_user_id, ErrorCode, ErrorReply, MessageId, RoomName};
use crate::state::AppState;

/// An API error: the JSON body `{"error": code, "message": …}` with the
/// code's HTTP status ([`ErrorCode::http_status`]).
#[derive(Debug, thiserror::Error)]
#[error("{}: {}", .0.code.as_str(), .0.message)]
pub struct ApiError(pub ErrorReply);

impl actix_web::ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.0.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
    fn error_response(&self) -> HttpResponse {
        json_error(
            self.status_code(),
            self.0.code.as_str(),
            self.0.message.clone(),
        )
    }
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError(ErrorReply::new(code, message))
    }

    pub fn bad_request(message: impl ToString) -> ApiError {
        ApiError(ErrorReply::bad_request(message))
    }

    pub fn too_large(limit: usize) -> ApiError {
        Self::new(
            ErrorCode::TooLarge,
            format!("data over limits.max_message_bytes ({limit} bytes)"),
        )
    }

    /// A request body over `limit` bytes.
    pub fn body_too_large(limit: usize) -> ApiError {
        Self::new(
            ErrorCode::TooLarge,
            format!("the body is over {limit} bytes"),
        )
    }

    /// A missing or wrong key; `keys_configured` false says the API is
    /// closed whatever the key (a newcomer's first surprise otherwise).
    pub fn unauthorized(keys_configured: bool) -> ApiError {
        let message = if keys_configured {
            "a valid API key is required: Authorization: Bearer <key>, with a key from auth.api_keys"
        } else {
            "the admin API is closed: this hub has no API key (set auth.api_keys, \
             e.g. SWITCHBOARD__AUTH__API_KEYS=KEY, and restart it)"
        };
        Self::new(ErrorCode::Unauthorized, message)
    }
}

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> ApiError {
        ApiError(ErrorReply::from(&e))
    }
}

impl From<crate::tasks::TaskError> for ApiError {
    fn from(e: crate::tasks::TaskError) -> ApiError {
        ApiError(ErrorReply::from(&e))
    }
}

type ApiResult = Result<HttpResponse, ApiError>;

fn room_param(room: &str) -> Result<RoomName, ApiError> {
    RoomName::parse(room).map_err(ApiError::bad_request)
}

fn user_param(user: &str) -> Result<&str, ApiError> {
    if valid_user_id(user) {
        Ok(user)
    } else {
        Err(ApiError::bad_request("a user id is 1-256 bytes"))
    }
}

/// The body of `POST /api/publish`. A target given as `null` is refused,
/// not taken for absent.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    #[serde(default, deserialize_with = "not_null")]
    room: Option<String>,
    #[serde(default, deserialize_with = "not_null")]
    user: Option<String>,
    #[serde(default, deserialize_with = "not_null")]
    broadcast: Option<bool>,
    data: Value,
    /// A room publish sent again with the same key is stored once.
    #[serde(default, deserialize_with = "not_null")]
    idempotency_key: Option<String>,
}

/// A field that, when present, must hold a value of its type (`null`
/// included in "present": it is refused).
fn not_null<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// What a publish body may hold beyond its `data`.
const BODY_OVERHEAD: usize = 1024;

/// The request body, refused with a JSON 413 past `limit` bytes.
pub(super) async fn read_body(
    mut payload: web::Payload,
    limit: usize,
) -> Result<web::BytesMut, ApiError> {
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request(format!("reading the body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::body_too_large(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `POST /api/publish` with exactly one of `room`, `user`, `broadcast: true`.
/// `data` may take `limits.max_message_bytes`, like a client frame.
pub async fn publish(state: web::Data<AppState>, payload: web::Payload) -> ApiResult {
    let max = state.config.limits.max_message_bytes;
    let body = read_body(payload, max + BODY_OVERHEAD).await?;
    let body: PublishBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid body: {e}")))?;
    if serde_json::to_string(&body.data).map_or(0, |d| d.len()) > max {
        return Err(ApiError::too_large(max));
    }
    let messages = &state.broker.messages;
    let key = body.idempotency_key.as_deref();
    if key.is_some_and(|k| k.is_empty() || k.len() > 256) {
        return Err(ApiError::bad_request("idempotency_key must be 1-256 bytes"));
    }
    let id = match (body.room, body.user, body.broadcast) {
        (Some(room), None, None | Some(false)) => {
            let room = room_param(&room)?;
            metrics().published.with_label_values(&["room"]).inc();
            let id = messages
                .publish_room(&room, "server", &body.data, key)
                .await?;
            id.to_string()
        }
        (None, Some(user), None | Some(false)) => {
            let user = user_param(&user)?;
            metrics().published.with_label_values(&["user"]).inc();
            messages.publish_user(user, "server", &body.data).await?
        }
        (None, None, Some(true)) => {
            metrics().published.with_label_values(&["broadcast"]).inc();
            messages.broadcast(&body.data).await?
        }
        _ => {
            return Err(ApiError::bad_request(
                "give exactly one of \"room\", \"user\" or \"broadcast\": true, and \"data\"",
            ))
        }
    };
    Ok(HttpResponse::Ok().json(json!({ "id": id })))
}

/// `GET /api/rooms/{room}/presence`
pub async fn presence(state: web::Data<AppState>, room: web::Path<String>) -> ApiResult {
    let room = room_param(&room)?;
    let users = state.broker.presence.list(&room).await?;
    Ok(HttpResponse::Ok().json(json!({"room": room.as_str(), "users": users})))
}

/// The query of the history endpoint.
#[derive(Deserialize)]
struct HistoryQuery {
    since: Option<String>,
    limit: Option<String>,
}

/// `GET /api/rooms/{room}/history?since=&limit=`: the retained messages
/// after `since`, oldest first, at most `limit` (default and maximum
/// `history.size`), the latest ones when more are retained. Each message is
/// the `message` frame a member received.
pub async fn history(
    req: HttpRequest,
    state: web::Data<AppState>,
    room: web::Path<String>,
) -> ApiResult {
    let room = room_param(&room)?;
    let query = web::Query::<HistoryQuery>::from_query(req.query_string())
        .map_err(|e| ApiError::bad_request(format!("invalid query: {e}")))?;
    let since = match query.since.as_deref() {
        None | Some("") => None,
        Some(s) => Some(s.parse::<MessageId>().map_err(ApiError::bad_request)?),
    };
    let max = state.config.history.size;
    let limit = match query.limit.as_deref() {
        None | Some("") => max,
        Some(l) => l
            .parse::<usize>()
            .map_err(|_| ApiError::bad_request("limit must be a non-negative integer"))?
            .min(max),
    };
    let history = state.broker.messages.history(&room, since, limit).await?;
    // The frames are already JSON: splice them in, don't re-parse.
    let frames: Vec<&str> = history.messages.iter().map(|m| &*m.frame).collect();
    let room_json = serde_json::to_string(room.as_str()).unwrap_or_default();
    let body = format!(
        "{{\"room\":{room_json},\"messages\":[{}]}}",
        frames.join(",")
    );
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .body(body))
}

/// `GET /api/users/{user}/connections`
pub async fn user_connections(state: web::Data<AppState>, user: web::Path<String>) -> ApiResult {
    let user = user_param(&user)?;
    let n = state.broker.registry.user_connections(user).await?;
    Ok(HttpResponse::Ok().json(json!({"user": user, "connections": n})))
}

/// `POST /api/users/{user}/disconnect`: 1008 `kicked` everywhere.
pub async fn disconnect_user(state: web::Data<AppState>, user: web::Path<String>) -> ApiResult {
    let user = user_param(&user)?;
    let n = state.broker.registry.disconnect_user(user).await?;
    tracing::info!(user, disconnected = n, "user disconnected by the API");
    Ok(HttpResponse::Ok().json(json!({"disconnected": n})))
}

fn no_such_task() -> ApiError {
    ApiError(ErrorReply::not_found("no such task"))
}

/// `GET /api/tasks/{id}`: the task's record.
pub async fn task(state: web::Data<AppState>, id: web::Path<String>) -> ApiResult {
    let record = state
        .tasks
        .queue
        .record(&id)
        .await?
        .ok_or_else(no_such_task)?;
    Ok(HttpResponse::Ok().json(record))
}

/// The body of a progress report.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProgressBody {
    progress: u8,
    message: Option<String>,
}

/// `POST /api/tasks/{id}/progress` with `{"progress": 0..100, "message"?}`:
/// a backend reports how far a running task is; its user hears it.
pub async fn task_progress(
    state: web::Data<AppState>,
    id: web::Path<String>,
    payload: web::Payload,
) -> ApiResult {
    let body = read_body(payload, 8 * 1024).await?;
    let body: ProgressBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid body: {e}")))?;
    if body.progress > 100 {
        return Err(ApiError::bad_request("progress must be 0 to 100"));
    }
    let message = body
        .message
        .as_deref()
        .map(|m| crate::protocol::names::truncate(m, 1024));
    let queue = &state.tasks.queue;
    match queue.progress(&id, body.progress, message).await? {
        crate::tasks::Progressed::Reported => Ok(HttpResponse::Ok().json(json!({"ok": true}))),
        crate::tasks::Progressed::NotFound => Err(no_such_task()),
        crate::tasks::Progressed::NotRunning => Err(ApiError::new(
            ErrorCode::Conflict,
            "the task is not running",
        )),
    }
}

/// `GET /api/stats`
pub async fn stats(state: web::Data<AppState>) -> ApiResult {
    let stats = state.broker.registry.stats().await?;
    Ok(HttpResponse::Ok().json(json!({
        "instance": state.instance_id,
        "broker": state.broker.kind,
        "connections": state.open_connections(),
        "rooms": stats.rooms,
        "local_rooms": stats.local_rooms,
        "users": stats.users,
        "cluster_connections": stats.connections,
        "instances": stats.instances,
        "uptime_s": state.started_at.elapsed().as_secs(),
    })))
}
