//! `kind = "webhook"`: POSTs `{"task_id","name","user","payload"}` to `url`
//! with an `X-Switchboard-Task-Id` header and the configured headers,
//! within `timeout_s`. A 2xx answer with a JSON body of at most 4 MiB is
//! the result; a non-2xx answer (a redirect included: none is followed, so
//! the configured headers never go to another host), a body that is not
//! JSON or is larger (read with a running cap, never whole first), a
//! time-out or a connection error is a failed attempt. The error the user
//! sees says which in a few words; the details (without the URL, which
//! may carry credentials) go to the log.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use serde::Serialize;
use serde_json::value::RawValue;

use super::Handler;
use crate::tasks::Job;

/// The largest answer body taken as a result.
const MAX_ANSWER: usize = 4 * 1024 * 1024;

pub struct Webhook {
    url: String,
    client: reqwest::Client,
}

impl Webhook {
    pub fn new(
        url: &str,
        timeout_s: u64,
        headers: &BTreeMap<String, String>,
    ) -> Result<Webhook, String> {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            let name = HeaderName::try_from(name.as_str())
                .map_err(|_| format!("headers: {name:?} is not a header name"))?;
            let mut value = HeaderValue::try_from(value.as_str())
                .map_err(|_| format!("headers.{name}: not a valid header value"))?;
            value.set_sensitive(true);
            map.insert(name, value);
        }
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(timeout_s))
            .redirect(reqwest::redirect::Policy::none())
            .default_headers(map)
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Webhook {
            url: url.to_owned(),
            client,
        })
    }
}

#[derive(Serialize)]
struct Request<'a> {
    task_id: &'a str,
    name: &'a str,
    user: &'a str,
    payload: &'a RawValue,
}

#[async_trait]
impl Handler for Webhook {
    async fn run(&self, job: &Job) -> Result<Box<RawValue>, String> {
        let body = serde_json::to_vec(&Request {
            task_id: &job.task_id,
            name: &job.name,
            user: &job.user,
            payload: &job.payload,
        })
        .map_err(|e| e.to_string())?;
        let response = self
            .client
            .post(&self.url)
            .header(CONTENT_TYPE, "application/json")
            .header("X-Switchboard-Task-Id", &job.task_id)
            .body(body)
            .send()
            .await
            .map_err(|e| describe(e, job))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("webhook answered {}", status.as_u16()));
        }
        let body = read_capped(response, job).await?;
        let text = String::from_utf8(body).map_err(|_| "webhook answer is not UTF-8")?;
        RawValue::from_string(text).map_err(|_| "webhook answer is not JSON".to_owned())
    }
}

/// The answer's body, chunk by chunk, refused as soon as it passes
/// [`MAX_ANSWER`] (a `Content-Length` over it is refused before reading).
async fn read_capped(mut response: reqwest::Response, job: &Job) -> Result<Vec<u8>, String> {
    let too_large = || format!("webhook answer over {} MiB", MAX_ANSWER >> 20);
    if response
        .content_length()
        .is_some_and(|n| n > MAX_ANSWER as u64)
    {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| describe(e, job))? {
        if body.len() + chunk.len() > MAX_ANSWER {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A request failure in a few words for the user; the details, without
/// the URL (it may carry credentials), to the log.
fn describe(e: reqwest::Error, job: &Job) -> String {
    let e = e.without_url();
    tracing::warn!(error = %e, task_id = %job.task_id, name = %job.name, "webhook attempt failed");
    if e.is_timeout() {
        "webhook timed out".into()
    } else if e.is_connect() {
        "webhook unreachable".into()
    } else {
        "webhook failed".into()
    }
}
