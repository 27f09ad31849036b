//! `POST /dev/token` (only with `auth.dev_tokens = true`): a development
//! token for any user name, for the demo chat. Never turn it on where
//! anyone else can reach the hub: it hands out identities. Turned off, the
//! path answers 404 with a message saying how to turn it on.

use std::time::Duration;

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use super::api::{read_body, ApiError};
use crate::state::AppState;

const TTL: Duration = Duration::from_secs(3600);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    user: String,
}

/// A name fit for a demo: 1–64 characters (not bytes: "Zoë" is three) of
/// letters, digits, `_.-`.
fn demo_name(user: &str) -> bool {
    !user.is_empty()
        && user.chars().count() <= 64
        && user
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// The largest body taken (64 characters of up to 4 bytes fit, and more).
const MAX_BODY: usize = 1024;

pub async fn token(
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(payload, MAX_BODY).await?;
    let body: Body = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid body: {e}")))?;
    if !demo_name(&body.user) {
        return Err(ApiError::bad_request(
            "user: 1-64 characters of letters, digits, _ . - (no spaces)",
        ));
    }
    let token = crate::auth::mint(&state.config.auth, &body.user, None, None, TTL, None)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    tracing::info!(user = %body.user, "development token minted");
    Ok(HttpResponse::Ok()
        .json(json!({"token": token, "user": body.user, "expires_in": TTL.as_secs()})))
}

/// `/dev/token` with `auth.dev_tokens` off: 404, saying how to turn it on
/// (the demo chat shows this message).
pub async fn disabled() -> HttpResponse {
    super::json_error(
        actix_web::http::StatusCode::NOT_FOUND,
        "not_found",
        "development tokens are off on this hub: start it with auth.dev_tokens = true \
         (SWITCHBOARD__AUTH__DEV_TOKENS=true), on your own machine only",
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn demo_names() {
        assert!(super::demo_name("alice_1.x-y"));
        assert!(!super::demo_name(""));
        assert!(!super::demo_name("a b"));
        assert!(!super::demo_name(&"a".repeat(65)));
        assert!(super::demo_name(&"é".repeat(64)));
    }
}
