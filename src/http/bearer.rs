//! The one `Authorization: Bearer <credential>` parser, for client JWTs on
//! `/ws` and API keys on `/api`.

use actix_web::http::header::HeaderMap;

/// The credential of an `Authorization: Bearer …` header (scheme
/// case-insensitive, surrounding blanks trimmed), if there is a non-empty one.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get("authorization")?.to_str().ok()?;
    let (scheme, credential) = value.split_once(' ')?;
    let credential = credential.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !credential.is_empty()).then_some(credential)
}

#[cfg(test)]
mod tests {
    use super::bearer;
    use actix_web::test::TestRequest;

    #[test]
    fn bearer_credentials() {
        let with = |v: &str| {
            let req = TestRequest::default()
                .insert_header(("authorization", v))
                .to_http_request();
            bearer(req.headers()).map(str::to_owned)
        };
        assert_eq!(with("Bearer abc").as_deref(), Some("abc"));
        assert_eq!(with("bearer  abc ").as_deref(), Some("abc"));
        assert_eq!(with("Basic abc"), None);
        assert_eq!(with("Bearer "), None);
        assert_eq!(with("Bearer"), None);
        assert_eq!(
            bearer(TestRequest::default().to_http_request().headers()),
            None
        );
    }
}
