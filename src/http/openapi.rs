//! `GET /openapi.yaml`: the OpenAPI document of the HTTP API
//! (`docs/openapi.yaml`, built into the binary), without auth. CI checks
//! the running hub against it (`.ci/openapi.sh`).

use actix_web::HttpResponse;

/// The document, as it is in the repository.
pub const DOCUMENT: &str = include_str!("../../docs/openapi.yaml");

pub async fn document() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/yaml")
        .body(DOCUMENT)
}
