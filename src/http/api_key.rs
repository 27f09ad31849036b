//! The guard on the `/api` scope: every admin call needs
//! `Authorization: Bearer <key>` with a key from `auth.api_keys` (none
//! configured: every call is refused with 401).

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::web;

use super::api::ApiError;
use super::bearer::bearer;
use crate::state::AppState;

/// Middleware: lets the request through only with a configured API key.
pub async fn require_api_key(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let keys = req
        .app_data::<web::Data<AppState>>()
        .map(|state| state.config.auth.api_keys.as_slice())
        .unwrap_or_default();
    if key_allowed(keys, bearer(req.headers())) {
        next.call(req).await
    } else {
        Err(ApiError::unauthorized(!keys.is_empty()).into())
    }
}

/// Whether `presented` is one of `keys` (constant time in the key's length).
fn key_allowed(keys: &[String], presented: Option<&str>) -> bool {
    presented.is_some_and(|presented| {
        keys.iter()
            .any(|key| constant_time_eq(key.as_bytes(), presented.as_bytes()))
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::key_allowed;

    #[test]
    fn keys() {
        let keys = vec!["k1".to_owned(), "k2".to_owned()];
        assert!(key_allowed(&keys, Some("k2")));
        assert!(!key_allowed(&keys, Some("k3")));
        assert!(!key_allowed(&keys, Some("k")));
        assert!(!key_allowed(&keys, None));
        assert!(!key_allowed(&[], Some("")));
    }
}
