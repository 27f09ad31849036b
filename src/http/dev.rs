//! `POST /dev/token` (only with `auth.dev_tokens = true`): a development
//! token for any user name, for the demo chat. Never turn it on where
//! anyone else can reach the hub: it hands out identities.

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

/// A name fit for a demo: 1–64 characters of `[A-Za-z0-9_.-]`, as the
/// demo page's name field asks.
fn demo_name(user: &str) -> bool {
    !user.is_empty()
        && user.len() <= 64
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// The largest body taken (a name of at most 64 bytes fits many times).
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
            "user: 1-64 characters of [A-Za-z0-9_.-]",
        ));
    }
    let token = crate::auth::mint(&state.config.auth, &body.user, None, None, TTL, None)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    tracing::info!(user = %body.user, "development token minted");
    Ok(HttpResponse::Ok()
        .json(json!({"token": token, "user": body.user, "expires_in": TTL.as_secs()})))
}

#[cfg(test)]
mod tests {
    #[test]
    fn demo_names() {
        assert!(super::demo_name("alice_1.x-y"));
        assert!(!super::demo_name(""));
        assert!(!super::demo_name("a b"));
        assert!(!super::demo_name("josé"));
        assert!(!super::demo_name(&"a".repeat(65)));
    }
}
