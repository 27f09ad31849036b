//! The hub's own view of a run, over plain HTTP to the `--url` hub: its
//! connection count from `GET /api/stats` (only with `--api-key`), a
//! cross-check of its registry, and its delivery-latency histogram from
//! `GET /metrics`.

use std::error::Error as _;
use std::time::{Duration, Instant};

/// A probe's whole answer must arrive within this.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Larger answers are refused (`/metrics` is a few KiB).
const MAX_BODY_BYTES: usize = 16 << 20;
/// The server's histogram of publish → written to the client's socket.
const DELIVERY_BUCKET: &str = "switchboard_delivery_latency_seconds_bucket{";

/// (upper bound in seconds, cumulative count) of a Prometheus histogram.
pub type Buckets = Vec<(f64, u64)>;

/// The HTTP side of one hub.
pub struct ServerStats {
    http: reqwest::Client,
    /// `http://host:port`.
    base: String,
    api_key: Option<String>,
}

impl ServerStats {
    /// For the hub at `ws_url` (`ws://host:port/...`).
    pub fn new(ws_url: &str, api_key: Option<String>) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(PROBE_TIMEOUT)
            // Straight to the hub, one connection per probe, as a plain
            // `Connection: close` request would.
            .no_proxy()
            .pool_max_idle_per_host(0)
            .build()
            .map_err(|e| format!("building the HTTP client: {e}"))?;
        Ok(ServerStats {
            http,
            base: http_base(ws_url),
            api_key,
        })
    }

    /// `GET path`, with the bearer key when `authorized`; the body of a 200
    /// answer, or why there is none.
    async fn get(&self, path: &str, authorized: bool) -> Result<String, String> {
        let mut request = self.http.get(format!("{}{path}", self.base));
        if let (true, Some(key)) = (authorized, &self.api_key) {
            request = request.bearer_auth(key);
        }
        let mut response = request.send().await.map_err(|e| self.describe(path, e))?;
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| self.describe(path, e))? {
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(format!("GET {path}: answer over {MAX_BODY_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        let body = String::from_utf8_lossy(&body).into_owned();
        if response.status() != reqwest::StatusCode::OK {
            let status = format!("{:?} {}", response.version(), response.status());
            return Err(format!("GET {path}: {status}: {}", body.trim()));
        }
        Ok(body)
    }

    /// `timed out`, `connect host:port: <cause>`, or the whole error chain.
    fn describe(&self, path: &str, e: reqwest::Error) -> String {
        if e.is_timeout() {
            return "timed out".into();
        }
        let mut causes = vec![e.to_string()];
        let mut source = e.source();
        while let Some(s) = source {
            causes.push(s.to_string());
            source = s.source();
        }
        if e.is_connect() {
            let authority = self.base.trim_start_matches("http://");
            let cause = causes.last().map_or("", String::as_str);
            return format!("connect {authority}: {cause}");
        }
        format!("GET {path}: {}", causes.join(": "))
    }

    /// The `connections` field of `GET /api/stats`; `None` without a key.
    async fn connections(&self) -> Option<Result<u64, String>> {
        self.api_key.as_ref()?;
        let read = async {
            let body = self.get("/api/stats", true).await?;
            let value: serde_json::Value = serde_json::from_str(&body)
                .map_err(|e| format!("body is not JSON ({e}): {body}"))?;
            value["connections"]
                .as_u64()
                .ok_or_else(|| format!("no `connections` in {value}"))
        };
        Some(read.await)
    }

    /// `server:   N connections reported by /api/stats {when} (bench expects M)`.
    pub async fn report_connections(&self, when: &str, expect: usize) {
        match self.connections().await {
            None => {}
            Some(Ok(n)) => println!(
                "server:   {n} connections reported by /api/stats {when} (bench expects {expect})"
            ),
            Some(Err(e)) => println!("server:   /api/stats {when}: {e}"),
        }
    }

    /// After closing everything: poll `/api/stats` (at most `wait`) until the
    /// server reports `expect` connections, say how long that took, and
    /// return the last count (`None`: no API key, or the endpoint failed).
    pub async fn await_connections(&self, expect: u64, wait: Duration) -> Option<u64> {
        self.api_key.as_ref()?;
        let started = Instant::now();
        let mut last = Err("not asked".to_string());
        while started.elapsed() < wait {
            last = self.connections().await.unwrap_or(last);
            if matches!(last, Ok(n) if n == expect) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        match last {
            Ok(n) => {
                println!(
                    "server:   {n} connections reported by /api/stats after closing (expected {expect}; \
                     waited {:.1} s)",
                    started.elapsed().as_secs_f64()
                );
                Some(n)
            }
            Err(e) => {
                println!("server:   /api/stats after closing: {e}");
                None
            }
        }
    }

    /// The server's own `switchboard_delivery_latency_seconds` histogram.
    pub async fn delivery_buckets(&self) -> Result<Buckets, String> {
        parse_delivery_buckets(&self.get("/metrics", false).await?)
    }
}

/// `ws://host:port/...` → `http://host:port` (port 80 when absent): the
/// probes speak plain HTTP to the same host and port.
fn http_base(ws_url: &str) -> String {
    let rest = ws_url.split_once("://").map(|(_, r)| r).unwrap_or(ws_url);
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    if authority.contains(':') {
        format!("http://{authority}")
    } else {
        format!("http://{authority}:80")
    }
}

/// The delivery-latency buckets of a `/metrics` body, sorted by bound.
fn parse_delivery_buckets(body: &str) -> Result<Buckets, String> {
    let mut buckets = Vec::new();
    for line in body.lines() {
        let Some(rest) = line.strip_prefix(DELIVERY_BUCKET) else {
            continue;
        };
        let Some((labels, count)) = rest.split_once("} ") else {
            continue;
        };
        let Some(le) = labels
            .split(',')
            .find_map(|l| l.trim().strip_prefix("le=\""))
            .map(|v| v.trim_end_matches('"'))
        else {
            continue;
        };
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().map_err(|_| format!("bad bucket bound {le:?}"))?
        };
        let count = count
            .trim()
            .parse::<f64>()
            .map_err(|_| format!("bad bucket count {count:?}"))?;
        buckets.push((le, count as u64));
    }
    if buckets.is_empty() {
        return Err("no switchboard_delivery_latency_seconds in /metrics".into());
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(buckets)
}

/// The server-side delivery latency over the run: the difference of two
/// scrapes, reported as the bucket bounds the quantiles fall under.
pub fn latency_summary(before: &[(f64, u64)], after: &[(f64, u64)]) -> String {
    let diff: Buckets = after
        .iter()
        .map(|&(le, n)| {
            let was = before.iter().find(|(b, _)| *b == le).map_or(0, |&(_, c)| c);
            (le, n.saturating_sub(was))
        })
        .collect();
    let total = diff.last().map_or(0, |&(_, n)| n);
    if total == 0 {
        return "no deliveries recorded".into();
    }
    let bound = |q: f64| {
        let rank = (q * total as f64).ceil() as u64;
        diff.iter()
            .find(|&&(_, n)| n >= rank)
            .map_or("?".to_string(), |&(le, _)| {
                if le.is_infinite() {
                    "> largest bucket".to_string()
                } else {
                    format!("≤ {}", le * 1000.0)
                }
            })
    };
    format!(
        "p50 {}, p90 {}, p99 {} ms ({total} deliveries; resolution: the server's buckets)",
        bound(0.5),
        bound(0.9),
        bound(0.99)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_base_keeps_host_and_port() {
        assert_eq!(http_base("ws://127.0.0.1:8000"), "http://127.0.0.1:8000");
        assert_eq!(
            http_base("ws://127.0.0.1:18000/ws?x=1"),
            "http://127.0.0.1:18000"
        );
        assert_eq!(http_base("ws://hub.local/ws"), "http://hub.local:80");
        assert_eq!(http_base("localhost:9000"), "http://localhost:9000");
    }

    const METRICS: &str = "\
# HELP switchboard_delivery_latency_seconds publish to socket
# TYPE switchboard_delivery_latency_seconds histogram
switchboard_delivery_latency_seconds_bucket{le=\"0.025\"} 90
switchboard_delivery_latency_seconds_bucket{le=\"0.005\"} 40
switchboard_delivery_latency_seconds_bucket{le=\"+Inf\"} 100
switchboard_delivery_latency_seconds_bucket{le=\"0.1\"} 99
switchboard_delivery_latency_seconds_sum 1.5
switchboard_connections 3
";

    #[test]
    fn delivery_buckets_are_parsed_and_sorted() {
        let b = parse_delivery_buckets(METRICS).unwrap();
        assert_eq!(
            b,
            vec![(0.005, 40), (0.025, 90), (0.1, 99), (f64::INFINITY, 100)]
        );
        assert!(parse_delivery_buckets("switchboard_connections 3\n").is_err());
        let bad = "switchboard_delivery_latency_seconds_bucket{le=\"x\"} 1\n";
        assert_eq!(
            parse_delivery_buckets(bad).unwrap_err(),
            "bad bucket bound \"x\""
        );
    }

    #[test]
    fn latency_summary_is_the_difference_of_two_scrapes() {
        let before = vec![(0.005, 10), (0.025, 10), (f64::INFINITY, 10)];
        let after = vec![(0.005, 60), (0.025, 105), (f64::INFINITY, 110)];
        assert_eq!(
            latency_summary(&before, &after),
            "p50 ≤ 5, p90 ≤ 25, p99 > largest bucket ms \
             (100 deliveries; resolution: the server's buckets)"
        );
        assert_eq!(latency_summary(&after, &after), "no deliveries recorded");
    }
}
