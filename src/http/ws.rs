//! `GET /ws`: the checks of contract section 2, in order — origin, token,
//! instance full, per-user limit — then a `Session` actor. A refused client
//! is accepted and closed at once with the contract's code and reason.

use std::sync::Arc;

use actix::Addr;
use actix_web::{web, HttpRequest, HttpResponse};

use super::bearer::bearer;
use crate::auth::AuthError;
use crate::broker::{BrokerError, ConnectionInfo};
use crate::clock::now_ms;
use crate::hub::Hub;
use crate::metrics::metrics;
use crate::protocol::CloseReason;
use crate::session::{Accepted, Session};
use crate::state::AppState;

pub async fn upgrade(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
    hub: web::Data<Addr<Hub>>,
) -> actix_web::Result<HttpResponse> {
    let (response, ws, stream) = actix_ws::handle(&req, body)?;
    let state = state.into_inner();
    match admit(&req, &state).await {
        Ok(accepted) => {
            tracing::debug!(connection_id = %accepted.connection_id, user = %accepted.claims.sub, "session accepted");
            // Our writer is the body; actix-ws's goes inside it, unpolled.
            let (head, actix_ws_body) = response.into_parts();
            let writer = Session::start(
                state,
                hub.get_ref().clone(),
                accepted,
                actix_ws_body,
                stream,
            );
            return Ok(head.set_body(writer).map_into_boxed_body());
        }
        Err(reason) => {
            metrics()
                .connections_rejected
                .with_label_values(&[reason.label()])
                .inc();
            tracing::debug!(reason = reason.label(), "connection refused");
            state.spawn_socket_task(async move {
                let _ = ws.close(Some(reason.to_ws())).await;
            });
        }
    }
    Ok(response)
}

/// The checks of contract section 2, in order; on success the connection
/// holds an instance slot and is in the broker's registry.
async fn admit(req: &HttpRequest, state: &Arc<AppState>) -> Result<Accepted, CloseReason> {
    if state.shutting_down() {
        return Err(CloseReason::GoingAway);
    }
    if let Some(origin) = req.headers().get("origin") {
        let allowed = &state.config.server.allowed_origins;
        let ok = origin
            .to_str()
            .is_ok_and(|origin| origin_allowed(allowed, origin));
        if !ok {
            return Err(CloseReason::ForbiddenOrigin);
        }
    }
    let token = bearer(req)
        .map(str::to_owned)
        .or_else(|| query_token(req))
        .ok_or(CloseReason::Unauthorized)?;
    let claims = state.verifier.verify(&token).map_err(|e| match e {
        AuthError::Expired => CloseReason::TokenExpired,
        _ => CloseReason::Unauthorized,
    })?;
    let slot = state.try_acquire_slot().ok_or(CloseReason::Overloaded)?;
    let connection_id = uuid::Uuid::new_v4().simple().to_string();
    register(state, &claims.sub, &connection_id).await?;
    Ok(Accepted {
        claims,
        connection_id,
        slot,
    })
}

/// Adds the connection to the registry (the per-user limit) and watches
/// the user's channel, so that a direct sent the moment after `welcome`
/// arrives; the session unwatches it when it stops.
async fn register(state: &AppState, user: &str, connection_id: &str) -> Result<(), CloseReason> {
    let info = ConnectionInfo {
        connection_id: connection_id.to_owned(),
        user: user.to_owned(),
        connected_at_ms: now_ms(),
    };
    let max_per_user = state.config.limits.max_connections_per_user;
    match state.broker.registry.register(&info, max_per_user).await {
        Ok(()) => {
            if let Err(e) = state.broker.subscriptions.watch_user(user).await {
                tracing::warn!(error = %e, "user channel not confirmed");
            }
            Ok(())
        }
        Err(BrokerError::ConnectionLimit) => Err(CloseReason::ConnectionLimit),
        Err(BrokerError::Unavailable(e)) => {
            tracing::warn!(error = %e, "refusing connection: broker unavailable");
            Err(CloseReason::Unavailable)
        }
        Err(e) => {
            tracing::error!(error = %e, "refusing connection: registry failed");
            Err(CloseReason::InternalError)
        }
    }
}

fn query_token(req: &HttpRequest) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Query {
        token: Option<String>,
    }
    web::Query::<Query>::from_query(req.query_string())
        .ok()?
        .into_inner()
        .token
        .filter(|t| !t.is_empty())
}

/// `allowed` empty or listing `*`: any origin. Otherwise an exact match of
/// scheme, host and port (default ports made explicit, case-insensitive).
pub fn origin_allowed(allowed: &[String], origin: &str) -> bool {
    if allowed.is_empty() || allowed.iter().any(|a| a == "*") {
        return true;
    }
    let Some(origin) = normalize_origin(origin) else {
        return false;
    };
    allowed
        .iter()
        .filter_map(|a| normalize_origin(a))
        .any(|a| a == origin)
}

fn normalize_origin(origin: &str) -> Option<(String, String, u16)> {
    let (scheme, rest) = origin.trim().split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let hostport = rest.trim_end_matches('/');
    if hostport.is_empty() || hostport.contains('/') {
        return None;
    }
    let default_port = match scheme.as_str() {
        "http" | "ws" => 80,
        "https" | "wss" => 443,
        _ => 0,
    };
    // IPv6 literals keep their brackets: `[::1]:8080`.
    let (host, port) = match hostport.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => (host, port.parse().ok()?),
        _ => (hostport, default_port),
    };
    Some((scheme, host.to_ascii_lowercase(), port))
}

#[cfg(test)]
mod tests {
    use super::origin_allowed;

    #[test]
    fn origins() {
        let allowed = vec![
            "https://app.example.com".to_owned(),
            "http://localhost:3000".to_owned(),
        ];
        assert!(origin_allowed(&allowed, "https://app.example.com"));
        assert!(origin_allowed(&allowed, "https://APP.example.com:443"));
        assert!(origin_allowed(&allowed, "http://localhost:3000"));
        assert!(!origin_allowed(&allowed, "http://localhost:3001"));
        assert!(!origin_allowed(&allowed, "http://app.example.com"));
        assert!(!origin_allowed(&allowed, "null"));
        assert!(origin_allowed(&[], "null"));
        assert!(origin_allowed(&["*".to_owned()], "https://evil.example"));
    }
}
