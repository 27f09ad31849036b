//! `switchboard demo-feed`: publishes a metric series into a room through
//! the HTTP API, for the demo dashboard (`web/dashboard.html`) to draw.
//! Each point is `{"t": ms since the epoch, "value": …}`, a slow wave with
//! a little noise.

use std::time::Duration;

use serde_json::json;

use crate::clock::now_ms;

/// One point of the series at `t_ms`.
pub fn point(t_ms: u64) -> f64 {
    let t = t_ms as f64 / 1000.0;
    let wave = 50.0 + 30.0 * (t / 10.0).sin() + 10.0 * (t / 3.1).sin();
    let noise = rand::random_range(-3.0..3.0);
    ((wave + noise) * 100.0).round() / 100.0
}

/// Publishes a point every `every` until interrupted (or the hub refuses).
pub async fn feed(url: &str, api_key: &str, room: &str, every: Duration) -> std::io::Result<()> {
    let client = reqwest::Client::new();
    let endpoint = format!("{}/api/publish", url.trim_end_matches('/'));
    tracing::info!(%endpoint, room, every_ms = every.as_millis() as u64, "feeding the demo room");
    let mut ticks = tokio::time::interval(every);
    loop {
        ticks.tick().await;
        let t = now_ms();
        let body = json!({"room": room, "data": {"t": t, "value": point(t)}});
        let response = client
            .post(&endpoint)
            .bearer_auth(api_key)
            .json(&body)
            .send()
            .await;
        match response {
            Ok(r) if r.status().is_success() => {}
            Ok(r) if r.status() == reqwest::StatusCode::UNAUTHORIZED => {
                return Err(std::io::Error::other("the hub refused the API key (401)"));
            }
            Ok(r) => tracing::warn!(status = %r.status(), "publish refused"),
            Err(e) => tracing::warn!(error = %e, "hub unreachable; retrying"),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn points_stay_in_a_drawable_band() {
        for t in (0..600_000).step_by(500) {
            let v = super::point(t);
            assert!((0.0..=100.0).contains(&v), "{v} at {t}");
        }
    }
}
