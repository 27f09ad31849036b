//! `switchboard-bench`: the load generator for a running Switchboard hub.
//!
//! Two scenarios, each a subcommand:
//!
//! - `fanout`: many subscribers join one room, a few publishers publish into
//!   it at a fixed aggregate rate; every subscriber checks that it received
//!   every message exactly once and in order (per publisher and by message
//!   id), and measures end-to-end latency from the publisher's wall clock.
//!   With `--publish-url` the publishers talk to another instance, which
//!   measures cross-instance (Redis) latency.
//! - `connections`: open N authenticated connections with bounded
//!   concurrency, measure time to `welcome`, hold them, close them cleanly.
//!
//! Every run prints a header naming the exact command line and the machine,
//! then the numbers. Every phase is bounded by a count and by time
//! (`--duration-s`), so a run always ends by itself.
//!
//! Tokens are minted here (HS256, `--secret`, claims `sub` and `exp`), so the
//! server must use the same secret; `config/bench.toml` keeps the development
//! default and raises the per-connection limits the bench would otherwise
//! hit.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

#[derive(Parser, Debug)]
#[command(
    name = "switchboard-bench",
    version,
    about = "Load generator for a Switchboard hub: room fan-out latency and connection rate.",
    after_help = "Start a hub with limits raised for benchmarking first:\n  \
                  target/release/switchboard serve --config config/bench.toml &\n\
                  then e.g.\n  \
                  switchboard-bench fanout --subscribers 1000 --publishers 2 --messages 2000 --rate 1000\n  \
                  switchboard-bench connections --count 5000 --concurrency 200"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Subscribers in one room, publishers at a fixed rate: delivery, order, latency.
    Fanout(FanoutArgs),
    /// Open many authenticated connections: connect rate and time to welcome.
    Connections(ConnectionsArgs),
}

#[derive(Args, Debug, Clone)]
struct CommonArgs {
    /// Hub address, `ws://HOST:PORT` (the path `/ws` is added when absent).
    #[arg(long, default_value = "ws://127.0.0.1:8000")]
    url: String,
    /// HS256 secret to sign tokens with; must be the server's `auth.jwt_secret`.
    #[arg(long, default_value = switchboard::config::DEV_JWT_SECRET)]
    secret: String,
    /// Admin API key; when given, the server's own connection count is read
    /// from `GET /api/stats` at each phase (a cross-check of its registry).
    #[arg(long)]
    api_key: Option<String>,
    /// Upper bound on the whole run, in seconds; phases still running then are
    /// cut short and reported as such.
    #[arg(long, default_value_t = 300)]
    duration_s: u64,
    /// Time allowed for one connection's TCP connect, upgrade and welcome.
    #[arg(long, default_value_t = 10)]
    connect_timeout_s: u64,
    /// Read buffer per connection in bytes (allocated up front by
    /// tungstenite, whose default of 128 KiB would cost 640 MiB for 5000
    /// connections).
    #[arg(long, default_value_t = 16 * 1024)]
    read_buffer_bytes: usize,
}

#[derive(Args, Debug, Clone)]
struct FanoutArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Where the publishers connect (another instance, for cross-instance
    /// latency); default: `--url`.
    #[arg(long)]
    publish_url: Option<String>,
    /// Subscriber connections, all joined to `--room`.
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Distinct user ids among the subscribers (subscriber i is user i mod
    /// this); default: one user per subscriber. Fewer users means fewer
    /// `joined`/`left` presence frames.
    #[arg(long)]
    users: Option<usize>,
    /// Publisher connections (each its own user, also a room member).
    #[arg(long, default_value_t = 2)]
    publishers: usize,
    /// Messages in total, spread evenly over the publishers.
    #[arg(long, default_value_t = 2000)]
    messages: u64,
    /// Aggregate publish rate, messages per second, over all publishers.
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    /// Approximate size of each message's `data` object in bytes (padded).
    #[arg(long, default_value_t = 100)]
    payload_bytes: usize,
    /// The room everyone joins.
    #[arg(long, default_value = "bench")]
    room: String,
    /// Subscribers connecting at the same time (connections are opened in a
    /// sliding window of this size so the connect storm stays bounded).
    #[arg(long, default_value_t = 100)]
    connect_concurrency: usize,
    /// After the last publish: seconds to wait for outstanding deliveries.
    #[arg(long, default_value_t = 10)]
    drain_s: u64,
}

#[derive(Args, Debug, Clone)]
struct ConnectionsArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Connections to open, each for a distinct user.
    #[arg(long, default_value_t = 5000)]
    count: usize,
    /// Connections being opened at the same time.
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
    /// Seconds to hold all connections open (answering pings) before closing.
    #[arg(long, default_value_t = 2)]
    hold_s: u64,
}

// ---------------------------------------------------------------------------
// Header: command line and machine
// ---------------------------------------------------------------------------

fn shell_quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@+%".contains(c));
    if plain {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

fn print_header() {
    let command: Vec<String> = std::env::args().map(|a| shell_quote(&a)).collect();
    let cores = cores();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0))
        .unwrap_or_else(|| "?".into());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "?".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    println!("# switchboard-bench {}", env!("CARGO_PKG_VERSION"));
    println!("command:  {}", command.join(" "));
    println!("machine:  {host}: {cores} cores ({cpu}), {mem} RAM, Linux {kernel}");
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into());
    println!(
        "started:  {} (unix seconds), load average {load}",
        now_us() / 1_000_000
    );
    if cfg!(debug_assertions) {
        println!("warning:  this is a debug build of the bench; numbers are not representative");
    }
}

// ---------------------------------------------------------------------------
// Small helpers: time, tokens, URLs, the HTTP stats probe
// ---------------------------------------------------------------------------

/// Wall-clock microseconds since the epoch; the latency clock shared by
/// publishers and subscribers (same machine, or NTP-synced machines).
fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[derive(Serialize)]
struct TokenClaims<'a> {
    sub: &'a str,
    exp: u64,
}

fn mint_token(secret: &str, user: &str) -> Result<String, String> {
    let claims = TokenClaims {
        sub: user,
        exp: now_us() / 1_000_000 + 3600,
    };
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| format!("minting a token: {e}"))
}

/// `ws://host:port` → `ws://host:port/ws`; a URL that already has a path is
/// kept.
fn ws_endpoint(url: &str) -> String {
    let url = url.trim_end_matches('/');
    let after_scheme = url.split_once("://").map(|(_, rest)| rest).unwrap_or(url);
    if after_scheme.contains('/') {
        url.to_string()
    } else {
        format!("{url}/ws")
    }
}

fn ws_url_with_token(endpoint: &str, token: &str) -> String {
    let sep = if endpoint.contains('?') { '&' } else { '?' };
    format!("{endpoint}{sep}token={token}")
}

/// `ws://host:port/...` → `host:port` for the plain-HTTP stats probe.
fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    }
}

/// `GET path` over a plain TCP connection (`Connection: close`), with an
/// optional bearer key; the body of a 200 answer, or why there is none.
async fn http_get(url: &str, path: &str, api_key: Option<&str>) -> Result<String, String> {
    let addr = host_port(url);
    let auth = api_key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let probe = async {
        let mut stream = TcpStream::connect(&addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut response = Vec::new();
        stream
            .take(16 << 20)
            .read_to_end(&mut response)
            .await
            .map_err(|e| format!("read: {e}"))?;
        Ok::<_, String>(response)
    };
    let response = timeout(Duration::from_secs(5), probe)
        .await
        .map_err(|_| "timed out".to_string())??;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| "no HTTP header end".to_string())?;
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200") {
        return Err(format!("GET {path}: {status}: {}", body.trim()));
    }
    Ok(
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_string()
        },
    )
}

/// The `connections` field of `GET /api/stats`.
async fn server_connections(url: &str, api_key: &str) -> Result<u64, String> {
    let body = http_get(url, "/api/stats", Some(api_key)).await?;
    let value: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| format!("body is not JSON ({e}): {body}"))?;
    value["connections"]
        .as_u64()
        .ok_or_else(|| format!("no `connections` in {value}"))
}

/// The server's own `switchboard_delivery_latency_seconds` histogram
/// (publish → written to the client's socket), as (upper bound in seconds,
/// cumulative count) pairs.
async fn server_delivery_buckets(url: &str) -> Result<Vec<(f64, u64)>, String> {
    let body = http_get(url, "/metrics", None).await?;
    let mut buckets = Vec::new();
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("switchboard_delivery_latency_seconds_bucket{") else {
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
fn server_latency_summary(before: &[(f64, u64)], after: &[(f64, u64)]) -> String {
    let diff: Vec<(f64, u64)> = after
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

/// Whole-machine and own CPU time, from /proc (USER_HZ is 100 on Linux).
struct CpuMeter {
    machine_busy: u64,
    machine_total: u64,
    own: u64,
    at: Instant,
}

impl CpuMeter {
    fn read() -> CpuMeter {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let fields: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .take(8)
            .filter_map(|v| v.parse().ok())
            .collect();
        let total: u64 = fields.iter().sum();
        // idle and iowait
        let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
        let own_stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        // Fields after the parenthesised command name; utime and stime are
        // fields 14 and 15 of the whole line.
        let own = own_stat
            .rsplit_once(')')
            .map(|(_, rest)| {
                let f: Vec<&str> = rest.split_whitespace().collect();
                let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                get(11) + get(12)
            })
            .unwrap_or(0);
        CpuMeter {
            machine_busy: total - idle.min(total),
            machine_total: total,
            own,
            at: Instant::now(),
        }
    }

    /// `machine 93% busy (of N cores); this bench 4.1 CPU-s (0.8 cores)`.
    fn since(&self, cores: usize) -> String {
        let now = CpuMeter::read();
        let wall = self.at.elapsed().as_secs_f64();
        let total = now.machine_total.saturating_sub(self.machine_total).max(1);
        let busy = now.machine_busy.saturating_sub(self.machine_busy);
        let own = now.own.saturating_sub(self.own) as f64 / 100.0;
        format!(
            "over {wall:.1} s the machine was {:.0}% busy ({:.1} of {:.1} CPU-s on {cores} cores); \
             this bench used {own:.1} CPU-s, the rest is the server and anything else running",
            100.0 * busy as f64 / total as f64,
            busy as f64 / 100.0,
            total as f64 / 100.0,
        )
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    // Bounded: each round consumes at least one line of the body.
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

async fn report_server_connections(common: &CommonArgs, url: &str, when: &str, expect: usize) {
    if let Some(key) = &common.api_key {
        match server_connections(url, key).await {
            Ok(n) => println!(
                "server:   {n} connections reported by /api/stats {when} (bench expects {expect})"
            ),
            Err(e) => println!("server:   /api/stats {when}: {e}"),
        }
    }
}

/// After closing everything: poll `/api/stats` (at most `wait`) until the
/// server reports `expect` connections, and say how long that took.
async fn await_server_connections(common: &CommonArgs, url: &str, expect: u64, wait: Duration) {
    let Some(key) = &common.api_key else { return };
    let started = Instant::now();
    let mut last = Err("not asked".to_string());
    while started.elapsed() < wait {
        last = server_connections(url, key).await;
        if matches!(last, Ok(n) if n == expect) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    match last {
        Ok(n) => println!(
            "server:   {n} connections reported by /api/stats after closing (expected {expect}; \
             waited {:.1} s)",
            started.elapsed().as_secs_f64()
        ),
        Err(e) => println!("server:   /api/stats after closing: {e}"),
    }
}

// ---------------------------------------------------------------------------
// Latency histogram: log-linear buckets, bounded memory per connection
// ---------------------------------------------------------------------------

/// 64 linear sub-buckets per power of two: a value is known to within 1/64
/// (reported at the bucket's middle, so within ±0.8%); the exact maximum is
/// kept aside. Memory is a fixed ~18 KiB whatever the sample count.
#[derive(Clone)]
struct Histogram {
    counts: Vec<u64>,
    total: u64,
    sum: u128,
    max: u64,
}

const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;
/// Values are capped at 2^40 µs (12 days), far beyond any bounded run.
const MAX_EXP: u32 = 40;

impl Histogram {
    fn new() -> Self {
        Histogram {
            counts: Vec::new(),
            total: 0,
            sum: 0,
            max: 0,
        }
    }

    fn index(v: u64) -> usize {
        let v = v.min((1 << MAX_EXP) - 1);
        if v < SUB {
            return v as usize;
        }
        let exp = 63 - v.leading_zeros(); // >= SUB_BITS
        let shift = exp - SUB_BITS;
        let mantissa = v >> shift; // in [SUB, 2*SUB)
        (SUB + u64::from(exp - SUB_BITS) * SUB + (mantissa - SUB)) as usize
    }

    /// The middle of bucket `i`.
    fn value_at(i: usize) -> u64 {
        let i = i as u64;
        if i < SUB {
            return i;
        }
        let octave = (i - SUB) / SUB;
        let mantissa = (i - SUB) % SUB + SUB;
        let low = mantissa << octave;
        let width = 1u64 << octave;
        low + width / 2
    }

    fn record(&mut self, v: u64) {
        if self.counts.is_empty() {
            self.counts = vec![0; Self::index((1 << MAX_EXP) - 1) + 1];
        }
        self.counts[Self::index(v)] += 1;
        self.total += 1;
        self.sum += u128::from(v);
        self.max = self.max.max(v);
    }

    fn merge(&mut self, other: &Histogram) {
        if other.total == 0 {
            return;
        }
        if self.counts.is_empty() {
            self.counts = vec![0; other.counts.len()];
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.sum += other.sum;
        self.max = self.max.max(other.max);
    }

    fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::value_at(i).min(self.max);
            }
        }
        self.max
    }

    fn mean(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum as f64 / self.total as f64
        }
    }

    /// `p50 1.23 ms, p90 …, p99 …, max …` (micros in, milliseconds out).
    fn summary_ms(&self, quantiles: &[(&str, f64)]) -> String {
        if self.total == 0 {
            return "no samples".into();
        }
        let mut parts: Vec<String> = quantiles
            .iter()
            .map(|(name, q)| format!("{name} {:.2}", self.quantile(*q) as f64 / 1000.0))
            .collect();
        parts.push(format!("max {:.2}", self.max as f64 / 1000.0));
        parts.push(format!("mean {:.2}", self.mean() / 1000.0));
        format!("{} ms ({} samples)", parts.join(", "), self.total)
    }
}

// ---------------------------------------------------------------------------
// Server frames as the bench reads them
// ---------------------------------------------------------------------------

/// The fields of a server frame the bench looks at; anything else is skipped
/// without allocating (the padding included).
#[derive(Deserialize)]
struct ServerFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(default, rename = "ref", borrow)]
    reference: Option<&'a RawValue>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
    #[serde(default, borrow)]
    code: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    message: Option<Cow<'a, str>>,
}

impl ServerFrame<'_> {
    fn ref_number(&self) -> Option<u64> {
        self.reference
            .and_then(|r| serde_json::from_str::<u64>(r.get()).ok())
    }
}

/// The `data` the bench's publishers put in each message.
#[derive(Serialize)]
struct BenchData<'a> {
    seq: u64,
    #[serde(rename = "pub")]
    publisher: usize,
    t_us: u64,
    pad: &'a str,
}

/// `BenchData` as a member reads it back (the padding skipped).
#[derive(Deserialize)]
struct BenchDataIn {
    seq: u64,
    #[serde(rename = "pub")]
    publisher: usize,
    t_us: u64,
}

/// `{ms}-{seq}` → (ms, seq).
fn parse_message_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

fn close_description(frame: Option<&CloseFrame>) -> String {
    match frame {
        Some(f) => format!("{} {}", u16::from(f.code), f.reason.as_str()),
        None => "no close frame".into(),
    }
}

/// Connect and wait for `welcome` (frames before it are skipped and
/// counted). Bounded by `limit`.
async fn connect_and_welcome(
    url: &str,
    limit: Duration,
    read_buffer_bytes: usize,
) -> Result<Ws, String> {
    let config = WebSocketConfig::default().read_buffer_size(read_buffer_bytes.max(1024));
    let attempt = async {
        let (mut ws, _response) =
            tokio_tungstenite::connect_async_with_config(url, Some(config), true)
                .await
                .map_err(|e| format!("connect: {e}"))?;
        // Bounded by the surrounding timeout; the server's first frame should
        // be the welcome.
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => {
                    match serde_json::from_str::<ServerFrame>(text.as_str()) {
                        Ok(f) if f.kind == "welcome" => return Ok(ws),
                        Ok(f) => return Err(format!("first frame is {:?}, not welcome", f.kind)),
                        Err(e) => return Err(format!("unparsable first frame ({e})")),
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    return Err(format!(
                        "closed before welcome: {}",
                        close_description(frame.as_ref())
                    ))
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(format!("before welcome: {e}")),
                None => return Err("stream ended before welcome".into()),
            }
        }
    };
    timeout(limit, attempt)
        .await
        .map_err(|_| format!("no welcome within {} s", limit.as_secs()))?
}

/// Send `join` with ref 1 and wait for its ack; other frames meanwhile
/// (presence changes, early messages) go to `on_other`.
async fn join_room(
    ws: &mut Ws,
    room: &str,
    limit: Duration,
    mut on_other: impl FnMut(&str),
) -> Result<(), String> {
    let join = serde_json::json!({"type": "join", "room": room, "ref": 1}).to_string();
    ws.send(Message::text(join))
        .await
        .map_err(|e| format!("sending join: {e}"))?;
    let wait = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => {
                    let text = text.as_str();
                    match serde_json::from_str::<ServerFrame>(text) {
                        Ok(f) if f.kind == "ack" && f.ref_number() == Some(1) => return Ok(()),
                        Ok(f) if f.kind == "error" && f.ref_number() == Some(1) => {
                            return Err(format!(
                                "join refused: {} {}",
                                f.code.as_deref().unwrap_or("?"),
                                f.message.as_deref().unwrap_or("")
                            ))
                        }
                        _ => on_other(text),
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    return Err(format!(
                        "closed during join: {}",
                        close_description(frame.as_ref())
                    ))
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(format!("during join: {e}")),
                None => return Err("stream ended during join".into()),
            }
        }
    };
    timeout(limit, wait)
        .await
        .map_err(|_| format!("no join ack within {} s", limit.as_secs()))?
}

/// Send a normal close and wait (at most 5 s) for the server's close;
/// whether the close handshake completed.
async fn close_cleanly<S>(
    sink: &mut S,
    stream: &mut (impl StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin),
) -> bool
where
    S: SinkExt<Message> + Unpin,
{
    let frame = CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    };
    if sink.send(Message::Close(Some(frame))).await.is_err() {
        return false;
    }
    let wait = async {
        loop {
            match stream.next().await {
                Some(Ok(Message::Close(_))) => return true,
                Some(Ok(_)) => continue,
                // tungstenite reports the completed handshake as ConnectionClosed.
                Some(Err(tokio_tungstenite::tungstenite::Error::ConnectionClosed)) | None => {
                    return true
                }
                Some(Err(_)) => return false,
            }
        }
    };
    timeout(Duration::from_secs(5), wait).await.unwrap_or(false)
}

fn count_into(map: &mut BTreeMap<String, u64>, key: impl Into<String>) {
    *map.entry(key.into()).or_default() += 1;
}

fn merge_counts(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

fn fmt_counts(map: &BTreeMap<String, u64>) -> String {
    if map.is_empty() {
        "none".into()
    } else {
        map.iter()
            .map(|(k, v)| format!("{v}× {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// `1234 unit/s`, or `n/a` for an empty window.
fn per_s(count: u64, seconds: f64, unit: &str) -> String {
    if seconds > 0.0 {
        format!("{:.0} {unit}/s", count as f64 / seconds)
    } else {
        "n/a".into()
    }
}

// ---------------------------------------------------------------------------
// fanout
// ---------------------------------------------------------------------------

/// What one room member saw of the bench's messages.
struct Recorder {
    latency: Histogram,
    /// Per publisher, one bit per sequence number: received at least once.
    seen: Vec<Vec<u64>>,
    highest: Vec<Option<u64>>,
    unique: u64,
    duplicates: u64,
    out_of_order: u64,
    /// Message ids that did not strictly increase (contract: id order).
    id_order_violations: u64,
    last_id: Option<(u64, u64)>,
    /// Messages in the room that were not the bench's (or out of range).
    foreign: u64,
    first_rx_us: u64,
    last_rx_us: u64,
    presence_frames: u64,
    errors: BTreeMap<String, u64>,
    other_frames: BTreeMap<String, u64>,
    /// Unique messages expected; `complete` counts recorders reaching it.
    target: u64,
    complete: Arc<AtomicUsize>,
}

impl Recorder {
    fn new(per_publisher: &[u64], complete: Arc<AtomicUsize>) -> Self {
        Recorder {
            latency: Histogram::new(),
            seen: per_publisher
                .iter()
                .map(|&n| vec![0u64; n.div_ceil(64) as usize])
                .collect(),
            highest: vec![None; per_publisher.len()],
            unique: 0,
            duplicates: 0,
            out_of_order: 0,
            id_order_violations: 0,
            last_id: None,
            foreign: 0,
            first_rx_us: 0,
            last_rx_us: 0,
            presence_frames: 0,
            errors: BTreeMap::new(),
            other_frames: BTreeMap::new(),
            target: per_publisher.iter().sum(),
            complete,
        }
    }

    fn has(&self, publisher: usize, seq: u64) -> bool {
        self.seen
            .get(publisher)
            .and_then(|bits| bits.get((seq / 64) as usize))
            .is_some_and(|word| word & (1 << (seq % 64)) != 0)
    }

    /// One text frame. Returns the parsed frame's kind for callers that care
    /// about acks (publishers) via `on_ack`.
    fn frame(&mut self, text: &str, mut on_reply: impl FnMut(&ServerFrame)) {
        let now = now_us();
        let frame = match serde_json::from_str::<ServerFrame>(text) {
            Ok(f) => f,
            Err(_) => {
                count_into(&mut self.other_frames, "unparsable");
                return;
            }
        };
        match frame.kind.as_ref() {
            "message" => self.message(&frame, now),
            "joined" | "left" => self.presence_frames += 1,
            "ack" => on_reply(&frame),
            "error" => {
                count_into(
                    &mut self.errors,
                    frame.code.as_deref().unwrap_or("?").to_string(),
                );
                on_reply(&frame);
            }
            other => count_into(&mut self.other_frames, other.to_string()),
        }
    }

    fn message(&mut self, frame: &ServerFrame, now: u64) {
        if let Some(id) = frame.id.as_deref().and_then(parse_message_id) {
            if self.last_id.is_some_and(|last| id <= last) {
                self.id_order_violations += 1;
            }
            self.last_id = Some(id);
        }
        let Some(data) = frame
            .data
            .and_then(|d| serde_json::from_str::<BenchDataIn>(d.get()).ok())
        else {
            self.foreign += 1;
            return;
        };
        let (p, seq) = (data.publisher, data.seq);
        let Some(word) = self
            .seen
            .get_mut(p)
            .and_then(|bits| bits.get_mut((seq / 64) as usize))
        else {
            self.foreign += 1;
            return;
        };
        let bit = 1u64 << (seq % 64);
        if *word & bit != 0 {
            self.duplicates += 1;
            return;
        }
        *word |= bit;
        if self.highest[p].is_some_and(|h| seq < h) {
            self.out_of_order += 1;
        }
        self.highest[p] = Some(self.highest[p].map_or(seq, |h| h.max(seq)));
        self.unique += 1;
        self.latency.record(now.saturating_sub(data.t_us));
        if self.first_rx_us == 0 {
            self.first_rx_us = now;
        }
        self.last_rx_us = now;
        if self.unique == self.target {
            self.complete.fetch_add(1, Ordering::Relaxed);
        }
    }
}

struct MemberResult {
    /// Time to welcome and to the join ack, from the start of the attempt.
    setup: Result<(Duration, Duration), String>,
    recorder: Recorder,
    /// Set when the server closed the connection during the run.
    server_close: Option<String>,
    stream_error: Option<String>,
    closed_cleanly: bool,
}

/// Everything a subscriber needs; shared by all subscribers.
struct FanoutShared {
    args: FanoutArgs,
    per_publisher: Vec<u64>,
    complete: Arc<AtomicUsize>,
    connect_limit: Duration,
}

/// Read frames into `recorder` until `stop`; then close.
async fn member_loop(
    ws: Ws,
    recorder: &mut Recorder,
    mut stop: watch::Receiver<bool>,
    mut on_reply: impl FnMut(&ServerFrame),
) -> (Option<String>, Option<String>, bool) {
    let (mut sink, mut stream) = ws.split();
    let mut server_close = None;
    let mut stream_error = None;
    // Bounded by `stop`, which main sets at the end of the run at the latest.
    while !*stop.borrow() {
        tokio::select! {
            next = stream.next() => match next {
                Some(Ok(Message::Text(text))) => recorder.frame(text.as_str(), &mut on_reply),
                Some(Ok(Message::Close(frame))) => {
                    server_close = Some(close_description(frame.as_ref()));
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => { stream_error = Some(e.to_string()); break; }
                None => { stream_error = Some("stream ended".into()); break; }
            },
            _ = stop.changed() => {}
        }
    }
    let closed_cleanly = if server_close.is_none() && stream_error.is_none() {
        close_cleanly(&mut sink, &mut stream).await
    } else {
        false
    };
    (server_close, stream_error, closed_cleanly)
}

async fn subscriber(
    token: String,
    shared: Arc<FanoutShared>,
    connect_slots: Arc<Semaphore>,
    ready: mpsc::UnboundedSender<bool>,
    stop: watch::Receiver<bool>,
) -> MemberResult {
    let mut recorder = Recorder::new(&shared.per_publisher, shared.complete.clone());
    let url = ws_url_with_token(&ws_endpoint(&shared.args.common.url), &token);
    let setup = async {
        let _slot = connect_slots
            .acquire()
            .await
            .map_err(|_| "connect slots closed".to_string())?;
        let started = Instant::now();
        let mut ws = connect_and_welcome(
            &url,
            shared.connect_limit,
            shared.args.common.read_buffer_bytes,
        )
        .await?;
        let welcomed = started.elapsed();
        join_room(&mut ws, &shared.args.room, shared.connect_limit, |text| {
            recorder.frame(text, |_| {})
        })
        .await?;
        Ok::<_, String>((ws, welcomed, started.elapsed()))
    }
    .await;
    let _ = ready.send(setup.is_ok());
    match setup {
        Err(e) => MemberResult {
            setup: Err(e),
            recorder,
            server_close: None,
            stream_error: None,
            closed_cleanly: false,
        },
        Ok((ws, welcomed, joined)) => {
            let (server_close, stream_error, closed_cleanly) =
                member_loop(ws, &mut recorder, stop, |_| {}).await;
            MemberResult {
                setup: Ok((welcomed, joined)),
                recorder,
                server_close,
                stream_error,
                closed_cleanly,
            }
        }
    }
}

/// What one publisher did.
struct PublisherResult {
    member: MemberResult,
    sent: u64,
    acked: u64,
    refused: u64,
    /// Per sequence number: acked with an id (expected to be delivered).
    acked_seqs: Vec<bool>,
    ack_latency: Histogram,
    first_send_us: u64,
    last_send_us: u64,
    /// Sends that started more than 10 ms after their scheduled time.
    late_sends: u64,
}

struct PublisherPlan {
    index: usize,
    count: u64,
    /// Message k of this publisher is sent at `offset + k * interval` after
    /// the common start, interleaving the publishers evenly.
    offset: Duration,
    interval: Duration,
}

#[allow(clippy::too_many_arguments)]
async fn publisher(
    plan: PublisherPlan,
    token: String,
    shared: Arc<FanoutShared>,
    ready: mpsc::UnboundedSender<bool>,
    mut go: watch::Receiver<Option<Instant>>,
    published: mpsc::UnboundedSender<()>,
    acks_outstanding: Arc<AtomicU64>,
    stop: watch::Receiver<bool>,
    deadline: Instant,
) -> PublisherResult {
    let args = &shared.args;
    let base = args.publish_url.as_deref().unwrap_or(&args.common.url);
    let url = ws_url_with_token(&ws_endpoint(base), &token);
    let mut recorder = Recorder::new(&shared.per_publisher, shared.complete.clone());
    // Publishers are members too; their own completion is not counted.
    recorder.complete = Arc::new(AtomicUsize::new(0));
    let mut result = PublisherResult {
        member: MemberResult {
            setup: Err("not started".into()),
            recorder: Recorder::new(&[], Arc::new(AtomicUsize::new(0))),
            server_close: None,
            stream_error: None,
            closed_cleanly: false,
        },
        sent: 0,
        acked: 0,
        refused: 0,
        acked_seqs: vec![false; plan.count as usize],
        ack_latency: Histogram::new(),
        first_send_us: 0,
        last_send_us: 0,
        late_sends: 0,
    };
    let started = Instant::now();
    let setup = async {
        let mut ws = connect_and_welcome(
            &url,
            shared.connect_limit,
            shared.args.common.read_buffer_bytes,
        )
        .await?;
        let welcomed = started.elapsed();
        join_room(&mut ws, &args.room, shared.connect_limit, |text| {
            recorder.frame(text, |_| {})
        })
        .await?;
        Ok::<_, String>((ws, welcomed, started.elapsed()))
    }
    .await;
    let _ = ready.send(setup.is_ok());
    let ws = match setup {
        Ok((ws, welcomed, joined)) => {
            result.member.setup = Ok((welcomed, joined));
            ws
        }
        Err(e) => {
            result.member.setup = Err(e);
            result.member.recorder = recorder;
            let _ = published.send(());
            return result;
        }
    };
    // Wait for the common start (bounded by the run's deadline).
    let start = loop {
        if let Some(start) = *go.borrow() {
            break Some(start);
        }
        if Instant::now() >= deadline
            || timeout(deadline - Instant::now(), go.changed())
                .await
                .is_err()
        {
            break None;
        }
    };
    let (mut sink, mut stream) = ws.split();
    // Send times by sequence number (µs since epoch), read by the reader.
    let send_times: Arc<Vec<AtomicU64>> =
        Arc::new((0..plan.count).map(|_| AtomicU64::new(0)).collect());

    let pad = {
        let probe = serde_json::to_string(&BenchData {
            seq: plan.count,
            publisher: plan.index,
            t_us: now_us(),
            pad: "",
        })
        .unwrap_or_default();
        "x".repeat(args.payload_bytes.saturating_sub(probe.len()))
    };

    // The reader: acks, refusals and the publisher's own deliveries, until
    // stop. It shares the connection with the writer below.
    let reader_times = send_times.clone();
    let acks_outstanding_reader = acks_outstanding.clone();
    let mut acked_seqs = vec![false; plan.count as usize];
    let mut ack_latency = Histogram::new();
    let (mut acked, mut refused) = (0u64, 0u64);
    let mut stop_reader = stop.clone();
    let reader = async {
        let mut server_close = None;
        let mut stream_error = None;
        let mut on_reply = |f: &ServerFrame| {
            let Some(r) = f.ref_number() else { return };
            let Some(seq) = r.checked_sub(2) else { return };
            let Some(sent_at) = reader_times.get(seq as usize) else {
                return;
            };
            let sent_at = sent_at.load(Ordering::Relaxed);
            if sent_at == 0 {
                return;
            }
            if f.kind == "ack" && f.id.is_some() {
                if !acked_seqs[seq as usize] {
                    acked_seqs[seq as usize] = true;
                    acked += 1;
                    ack_latency.record(now_us().saturating_sub(sent_at));
                    acks_outstanding_reader.fetch_sub(1, Ordering::Relaxed);
                }
            } else if f.kind == "error" {
                refused += 1;
                acks_outstanding_reader.fetch_sub(1, Ordering::Relaxed);
            }
        };
        while !*stop_reader.borrow() {
            tokio::select! {
                next = stream.next() => match next {
                    Some(Ok(Message::Text(text))) => recorder.frame(text.as_str(), &mut on_reply),
                    Some(Ok(Message::Close(frame))) => {
                        server_close = Some(close_description(frame.as_ref()));
                        break;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => { stream_error = Some(e.to_string()); break; }
                    None => { stream_error = Some("stream ended".into()); break; }
                },
                _ = stop_reader.changed() => {}
            }
        }
        (server_close, stream_error)
    };

    let writer_times = send_times.clone();
    let mut stats = (0u64, 0u64, 0u64, 0u64); // sent, first, last, late
    let writer = async {
        let Some(start) = start else {
            let _ = published.send(());
            return;
        };
        for k in 0..plan.count {
            let due = start + plan.offset + plan.interval.mul_f64(k as f64);
            if due >= deadline {
                break;
            }
            tokio::time::sleep_until(due.into()).await;
            if Instant::now() > due + Duration::from_millis(10) {
                stats.3 += 1;
            }
            let t_us = now_us();
            let data = BenchData {
                seq: k,
                publisher: plan.index,
                t_us,
                pad: &pad,
            };
            let frame = serde_json::json!({
                "type": "publish", "room": args.room, "data": data, "ref": k + 2,
            })
            .to_string();
            writer_times[k as usize].store(t_us, Ordering::Relaxed);
            acks_outstanding.fetch_add(1, Ordering::Relaxed);
            if sink.send(Message::text(frame)).await.is_err() {
                acks_outstanding.fetch_sub(1, Ordering::Relaxed);
                break;
            }
            if stats.0 == 0 {
                stats.1 = t_us;
            }
            stats.0 += 1;
            stats.2 = t_us;
        }
        let _ = published.send(());
    };
    let ((server_close, stream_error), ()) = tokio::join!(reader, writer);
    let closed_cleanly = if server_close.is_none() && stream_error.is_none() {
        close_cleanly(&mut sink, &mut stream).await
    } else {
        false
    };
    result.member.recorder = recorder;
    result.member.server_close = server_close;
    result.member.stream_error = stream_error;
    result.member.closed_cleanly = closed_cleanly;
    result.sent = stats.0;
    result.first_send_us = stats.1;
    result.last_send_us = stats.2;
    result.late_sends = stats.3;
    result.acked = acked;
    result.refused = refused;
    result.acked_seqs = acked_seqs;
    result.ack_latency = ack_latency;
    result
}

/// Wait until `done()` or `limit` passes (polling every 20 ms); whether it
/// became true.
async fn wait_until(limit: Instant, mut done: impl FnMut() -> bool) -> bool {
    while Instant::now() < limit {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done()
}

/// Collect `n` signals from `rx` until `limit`; how many arrived.
async fn collect_signals(rx: &mut mpsc::UnboundedReceiver<()>, n: usize, limit: Instant) -> usize {
    let mut got = 0;
    while got < n {
        match tokio::time::timeout_at(limit.into(), rx.recv()).await {
            Ok(Some(())) => got += 1,
            _ => break,
        }
    }
    got
}

/// Collect `n` setup outcomes from `rx` until `limit`: (settled, succeeded).
async fn collect_outcomes(
    rx: &mut mpsc::UnboundedReceiver<bool>,
    n: usize,
    limit: Instant,
) -> (usize, usize) {
    let (mut settled, mut ok) = (0, 0);
    while settled < n {
        match tokio::time::timeout_at(limit.into(), rx.recv()).await {
            Ok(Some(success)) => {
                settled += 1;
                ok += usize::from(success);
            }
            _ => break,
        }
    }
    (settled, ok)
}

fn setup_summary(results: &[&MemberResult], label: &str, elapsed: Duration) {
    let mut welcome = Histogram::new();
    let mut joined = Histogram::new();
    let mut failures = BTreeMap::new();
    for r in results {
        match &r.setup {
            Ok((w, j)) => {
                welcome.record(w.as_micros() as u64);
                joined.record(j.as_micros() as u64);
            }
            Err(e) => count_into(&mut failures, e.clone()),
        }
    }
    let q = [("p50", 0.5), ("p99", 0.99)];
    println!(
        "{label}: {} of {} connected and joined in {:.2} s ({})",
        welcome.total,
        results.len(),
        elapsed.as_secs_f64(),
        per_s(welcome.total, elapsed.as_secs_f64(), "connections")
    );
    println!("  time to welcome:  {}", welcome.summary_ms(&q));
    println!("  time to join ack: {}", joined.summary_ms(&q));
    if !failures.is_empty() {
        println!("  FAILURES: {}", fmt_counts(&failures));
    }
}

async fn run_fanout(args: FanoutArgs) -> Result<bool, String> {
    let common = args.common.clone();
    if args.publishers == 0 || args.messages == 0 || args.rate <= 0.0 {
        return Err("--publishers, --messages and --rate must be positive".into());
    }
    let deadline = Instant::now() + Duration::from_secs(common.duration_s);
    let run_id = now_us() % 1_000_000_000;
    let per_publisher: Vec<u64> = (0..args.publishers as u64)
        .map(|p| {
            args.messages / args.publishers as u64
                + u64::from(p < args.messages % args.publishers as u64)
        })
        .collect();
    let users = args.users.unwrap_or(args.subscribers).max(1);
    let complete = Arc::new(AtomicUsize::new(0));
    let shared = Arc::new(FanoutShared {
        args: args.clone(),
        per_publisher: per_publisher.clone(),
        complete: complete.clone(),
        connect_limit: Duration::from_secs(common.connect_timeout_s),
    });
    println!(
        "scenario: fanout: {} subscribers ({} users) on {}, {} publishers on {}, room {:?}, \
         {} messages at {} msg/s, data ~{} bytes",
        args.subscribers,
        users,
        common.url,
        args.publishers,
        args.publish_url.as_deref().unwrap_or(&common.url),
        args.room,
        args.messages,
        args.rate,
        args.payload_bytes
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let (go_tx, go_rx) = watch::channel(None::<Instant>);

    // Phase 1: subscribers connect (a sliding window of connect_concurrency)
    // and join.
    let slots = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let run_cpu = CpuMeter::read();
    let connect_started = Instant::now();
    let mut subscriber_tasks = Vec::with_capacity(args.subscribers);
    for i in 0..args.subscribers {
        let token = mint_token(&common.secret, &format!("bench-sub-{run_id}-{}", i % users))?;
        subscriber_tasks.push(tokio::spawn(subscriber(
            token,
            shared.clone(),
            slots.clone(),
            ready_tx.clone(),
            stop_rx.clone(),
        )));
    }
    let (ready, subs_ok) = collect_outcomes(&mut ready_rx, args.subscribers, deadline).await;
    let connect_elapsed = connect_started.elapsed();
    if ready < args.subscribers {
        println!(
            "TIMED OUT: only {ready} of {} subscribers finished setting up",
            args.subscribers
        );
    }

    // Phase 2: publishers connect and join, then all start together.
    let interval = Duration::from_secs_f64(args.publishers as f64 / args.rate);
    let (pub_ready_tx, mut pub_ready_rx) = mpsc::unbounded_channel();
    let (published_tx, mut published_rx) = mpsc::unbounded_channel();
    let acks_outstanding = Arc::new(AtomicU64::new(0));
    let mut publisher_tasks = Vec::with_capacity(args.publishers);
    for (p, &count) in per_publisher.iter().enumerate() {
        let token = mint_token(&common.secret, &format!("bench-pub-{run_id}-{p}"))?;
        let plan = PublisherPlan {
            index: p,
            count,
            offset: Duration::from_secs_f64(p as f64 / args.rate),
            interval,
        };
        publisher_tasks.push(tokio::spawn(publisher(
            plan,
            token,
            shared.clone(),
            pub_ready_tx.clone(),
            go_rx.clone(),
            published_tx.clone(),
            acks_outstanding.clone(),
            stop_rx.clone(),
            deadline,
        )));
    }
    let (_, pubs_joined) = collect_outcomes(&mut pub_ready_rx, args.publishers, deadline).await;
    report_server_connections(
        &common,
        &common.url,
        "before publishing",
        subs_ok
            + if args.publish_url.is_some() {
                0
            } else {
                pubs_joined
            },
    )
    .await;

    let metrics_before = server_delivery_buckets(&common.url).await;
    let publish_cpu = CpuMeter::read();
    let _ = go_tx.send(Some(Instant::now() + Duration::from_millis(100)));
    let published = collect_signals(&mut published_rx, args.publishers, deadline).await;
    let publish_done = Instant::now();
    if published < args.publishers {
        println!("TIMED OUT: publishing did not finish within --duration-s");
    }
    // Acks, then deliveries: bounded by --drain-s after the last publish.
    let drain_limit = (publish_done + Duration::from_secs(args.drain_s)).min(deadline);
    let acks_in = wait_until(drain_limit, || {
        acks_outstanding.load(Ordering::Relaxed) == 0
    })
    .await;
    // Nothing to wait for when no publisher could publish.
    let all_delivered = pubs_joined == 0
        || wait_until(drain_limit, || complete.load(Ordering::Relaxed) >= subs_ok).await;
    let drained_after = publish_done.elapsed();
    let publish_cpu = publish_cpu.since(cores());
    let metrics_after = if metrics_before.is_ok() {
        // The hub's worker threads publish their buffered delivery metrics
        // once a second: wait for one flush before reading.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        server_delivery_buckets(&common.url).await
    } else {
        Err("not read".into())
    };
    let _ = stop_tx.send(true);

    // Phase 3: collect.
    let mut subs = Vec::with_capacity(args.subscribers);
    for t in subscriber_tasks {
        match t.await {
            Ok(r) => subs.push(r),
            Err(e) => return Err(format!("a subscriber task failed: {e}")),
        }
    }
    let mut pubs = Vec::with_capacity(args.publishers);
    for t in publisher_tasks {
        match t.await {
            Ok(r) => pubs.push(r),
            Err(e) => return Err(format!("a publisher task failed: {e}")),
        }
    }

    // Report.
    println!();
    setup_summary(
        &subs.iter().collect::<Vec<_>>(),
        "subscribers",
        connect_elapsed,
    );
    let pub_members: Vec<&MemberResult> = pubs.iter().map(|p| &p.member).collect();
    let pubs_ok = pub_members.iter().filter(|m| m.setup.is_ok()).count();
    println!(
        "publishers:  {pubs_ok} of {} connected and joined",
        args.publishers
    );
    for m in &pub_members {
        if let Err(e) = &m.setup {
            println!("  FAILURE: {e}");
        }
    }

    let sent: u64 = pubs.iter().map(|p| p.sent).sum();
    let acked: u64 = pubs.iter().map(|p| p.acked).sum();
    let refused: u64 = pubs.iter().map(|p| p.refused).sum();
    let late: u64 = pubs.iter().map(|p| p.late_sends).sum();
    let first_send = pubs
        .iter()
        .map(|p| p.first_send_us)
        .filter(|&t| t > 0)
        .min()
        .unwrap_or(0);
    let last_send = pubs.iter().map(|p| p.last_send_us).max().unwrap_or(0);
    let publish_window_s = last_send.saturating_sub(first_send) as f64 / 1e6;
    let mut ack_latency = Histogram::new();
    for p in &pubs {
        ack_latency.merge(&p.ack_latency);
    }
    println!();
    println!(
        "published:   {sent} of {} sent in {:.2} s ({} achieved, {} msg/s asked), {acked} acked with an id, \
         {refused} refused with an error, {} unanswered",
        args.messages,
        publish_window_s,
        per_s(sent.saturating_sub(1), publish_window_s, "msg"),
        args.rate,
        sent.saturating_sub(acked + refused),
    );
    if sent < args.messages {
        println!(
            "  CUT SHORT: {} messages not sent (--duration-s {} ended the run, or a publisher failed)",
            args.messages - sent,
            common.duration_s
        );
    }
    if late > 0 {
        println!("  note: {late} sends started >10 ms behind schedule (the bench could not keep the rate)");
    }
    println!(
        "  publish ack latency: {}",
        ack_latency.summary_ms(&[("p50", 0.5), ("p99", 0.99)])
    );

    // Deliveries, per subscriber, against what was acked.
    let acked_sets: Vec<&Vec<bool>> = pubs.iter().map(|p| &p.acked_seqs).collect();
    let joined_subs: Vec<&MemberResult> = subs.iter().filter(|s| s.setup.is_ok()).collect();
    let expected = acked * joined_subs.len() as u64;
    let mut latency = Histogram::new();
    let (mut received, mut missing, mut unacked_received) = (0u64, 0u64, 0u64);
    let (mut dups, mut ooo, mut id_viol, mut foreign, mut presence) = (0u64, 0, 0, 0, 0);
    let (mut subs_missing, mut worst_missing) = (0usize, 0u64);
    let (mut first_rx, mut last_rx) = (u64::MAX, 0u64);
    let mut errors = BTreeMap::new();
    let mut other = BTreeMap::new();
    let mut server_closes = BTreeMap::new();
    let mut stream_errors = BTreeMap::new();
    let mut clean = 0usize;
    for s in &joined_subs {
        let r = &s.recorder;
        latency.merge(&r.latency);
        received += r.unique;
        let mut m = 0u64;
        for (p, set) in acked_sets.iter().enumerate() {
            for (seq, &was_acked) in set.iter().enumerate() {
                let got = r.has(p, seq as u64);
                if was_acked && !got {
                    m += 1;
                }
                if !was_acked && got {
                    unacked_received += 1;
                }
            }
        }
        missing += m;
        if m > 0 {
            subs_missing += 1;
            worst_missing = worst_missing.max(m);
        }
        dups += r.duplicates;
        ooo += r.out_of_order;
        id_viol += r.id_order_violations;
        foreign += r.foreign;
        presence += r.presence_frames;
        if r.unique > 0 {
            first_rx = first_rx.min(r.first_rx_us);
            last_rx = last_rx.max(r.last_rx_us);
        }
        merge_counts(&mut errors, &r.errors);
        merge_counts(&mut other, &r.other_frames);
        if let Some(c) = &s.server_close {
            count_into(&mut server_closes, c.clone());
        }
        if let Some(e) = &s.stream_error {
            count_into(&mut stream_errors, e.clone());
        }
        clean += usize::from(s.closed_cleanly);
    }
    let delivery_window_s = last_rx.saturating_sub(first_send) as f64 / 1e6;
    println!();
    println!(
        "deliveries:  {received} received of {expected} expected ({} subscribers × {acked} acked messages); \
         drained {:.2} s after the last publish{}",
        joined_subs.len(),
        drained_after.as_secs_f64(),
        if all_delivered { "" } else { " (drain limit reached)" },
    );
    println!(
        "  missing {missing} (on {subs_missing} subscribers, worst {worst_missing}), duplicates {dups}, \
         out of order {ooo} (by publisher seq), id order violations {id_viol}"
    );
    if unacked_received > 0 || foreign > 0 {
        println!(
            "  also received: {unacked_received} deliveries of messages never acked, \
             {foreign} messages not from this run"
        );
    }
    println!(
        "  throughput: {} (first publish → last delivery, {:.2} s)",
        per_s(received, delivery_window_s, "deliveries"),
        delivery_window_s
    );
    println!(
        "  latency (publisher clock → subscriber): {}",
        latency.summary_ms(&[("p50", 0.5), ("p90", 0.9), ("p99", 0.99)])
    );
    match (&metrics_before, &metrics_after) {
        (Ok(before), Ok(after)) => println!(
            "  server-side latency (publish → written to the socket, from its /metrics): {}",
            server_latency_summary(before, after)
        ),
        (Err(e), _) | (_, Err(e)) => println!("  server-side latency: unavailable ({e})"),
    }
    println!("  cpu while publishing and draining: {publish_cpu}");
    println!("  presence frames (joined/left) received: {presence}");
    if !errors.is_empty() {
        println!("  ERROR frames: {}", fmt_counts(&errors));
    }
    if !other.is_empty() {
        println!("  other frames: {}", fmt_counts(&other));
    }
    if !server_closes.is_empty() {
        println!(
            "  CLOSED BY SERVER during the run: {}",
            fmt_counts(&server_closes)
        );
    }
    if !stream_errors.is_empty() {
        println!("  STREAM ERRORS: {}", fmt_counts(&stream_errors));
    }

    // Publishers' own deliveries (they are members of the room too).
    let mut own = (0u64, 0u64, 0u64, 0u64);
    let mut own_errors = BTreeMap::new();
    let mut own_latency = Histogram::new();
    for p in &pubs {
        let r = &p.member.recorder;
        own_latency.merge(&r.latency);
        own.0 += r.unique;
        own.1 += r.duplicates;
        own.2 += r.out_of_order;
        own.3 += r.id_order_violations;
        merge_counts(&mut own_errors, &r.errors);
        if let Some(c) = &p.member.server_close {
            count_into(&mut server_closes, format!("publisher: {c}"));
            println!("  PUBLISHER CLOSED BY SERVER: {c}");
        }
        if let Some(e) = &p.member.stream_error {
            println!("  PUBLISHER STREAM ERROR: {e}");
        }
        clean += usize::from(p.member.closed_cleanly);
    }
    println!(
        "  publishers' own copies: {} received of {} expected, duplicates {}, out of order {}, \
         id order violations {}{}",
        own.0,
        acked * pubs_ok as u64,
        own.1,
        own.2,
        own.3,
        if own_errors.is_empty() {
            String::new()
        } else {
            format!(", errors: {}", fmt_counts(&own_errors))
        }
    );
    println!(
        "  publishers' own copies latency: {}",
        own_latency.summary_ms(&[("p50", 0.5), ("p99", 0.99)])
    );
    let total_members = joined_subs.len() + pubs_ok;
    println!("closing:     {clean} of {total_members} connections closed with a completed close handshake");
    let still_expected = 0;
    await_server_connections(
        &common,
        &common.url,
        still_expected,
        Duration::from_secs(10),
    )
    .await;

    println!("cpu (whole run): {}", run_cpu.since(cores()));
    let ok = ready == args.subscribers
        && joined_subs.len() == args.subscribers
        && pubs_ok == args.publishers
        && sent == args.messages
        && acked == sent
        && missing == 0
        && dups == 0
        && ooo == 0
        && id_viol == 0
        && own.0 == acked * pubs_ok as u64
        && own.1 + own.2 + own.3 == 0
        && server_closes.is_empty()
        && stream_errors.is_empty()
        && errors.is_empty()
        && acks_in;
    println!();
    println!(
        "result:      {}",
        if ok {
            "OK (every acked message reached every member once, in order)"
        } else {
            "PROBLEMS (see above)"
        }
    );
    Ok(ok)
}

// ---------------------------------------------------------------------------
// connections
// ---------------------------------------------------------------------------

struct ConnectionResult {
    welcome: Result<Duration, String>,
    welcomed_at: Option<Instant>,
    server_close: Option<String>,
    stream_error: Option<String>,
    closed_cleanly: bool,
    close_took: Option<Duration>,
}

async fn hold_connection(
    url: String,
    limit: Duration,
    read_buffer_bytes: usize,
    slots: Arc<Semaphore>,
    ready: mpsc::UnboundedSender<bool>,
    mut stop: watch::Receiver<bool>,
) -> ConnectionResult {
    let mut result = ConnectionResult {
        welcome: Err("not started".into()),
        welcomed_at: None,
        server_close: None,
        stream_error: None,
        closed_cleanly: false,
        close_took: None,
    };
    let ws = {
        let Ok(_slot) = slots.acquire().await else {
            let _ = ready.send(false);
            return result;
        };
        let started = Instant::now();
        match connect_and_welcome(&url, limit, read_buffer_bytes).await {
            Ok(ws) => {
                result.welcome = Ok(started.elapsed());
                result.welcomed_at = Some(Instant::now());
                ws
            }
            Err(e) => {
                result.welcome = Err(e);
                let _ = ready.send(false);
                return result;
            }
        }
    };
    let _ = ready.send(true);
    let (mut sink, mut stream) = ws.split();
    // Read (which answers pings) until stop.
    while !*stop.borrow() {
        tokio::select! {
            next = stream.next() => match next {
                Some(Ok(Message::Close(frame))) => {
                    result.server_close = Some(close_description(frame.as_ref()));
                    return result;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => { result.stream_error = Some(e.to_string()); return result; }
                None => { result.stream_error = Some("stream ended".into()); return result; }
            },
            _ = stop.changed() => {}
        }
    }
    let started = Instant::now();
    result.closed_cleanly = close_cleanly(&mut sink, &mut stream).await;
    result.close_took = Some(started.elapsed());
    result
}

async fn run_connections(args: ConnectionsArgs) -> Result<bool, String> {
    let common = args.common.clone();
    let deadline = Instant::now() + Duration::from_secs(common.duration_s);
    let run_id = now_us() % 1_000_000_000;
    println!(
        "scenario: connections: {} connections (distinct users) to {}, {} at a time, held {} s",
        args.count, common.url, args.concurrency, args.hold_s
    );
    report_server_connections(&common, &common.url, "before connecting", 0).await;
    let endpoint = ws_endpoint(&common.url);
    let mut urls = Vec::with_capacity(args.count);
    for i in 0..args.count {
        let token = mint_token(&common.secret, &format!("bench-conn-{run_id}-{i}"))?;
        urls.push(ws_url_with_token(&endpoint, &token));
    }
    let slots = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    let limit = Duration::from_secs(common.connect_timeout_s);
    let connect_cpu = CpuMeter::read();
    let started = Instant::now();
    let tasks: Vec<_> = urls
        .into_iter()
        .map(|url| {
            tokio::spawn(hold_connection(
                url,
                limit,
                common.read_buffer_bytes,
                slots.clone(),
                ready_tx.clone(),
                stop_rx.clone(),
            ))
        })
        .collect();
    let (settled, opened) = collect_outcomes(&mut ready_rx, args.count, deadline).await;
    let connect_elapsed = started.elapsed();
    let connect_cpu = connect_cpu.since(cores());
    if settled < args.count {
        println!(
            "TIMED OUT: only {settled} of {} attempts settled",
            args.count
        );
    }
    report_server_connections(&common, &common.url, "with all connections open", opened).await;
    let hold_until = (Instant::now() + Duration::from_secs(args.hold_s)).min(deadline);
    tokio::time::sleep_until(hold_until.into()).await;
    let close_started = Instant::now();
    let _ = stop_tx.send(true);
    let mut results = Vec::with_capacity(args.count);
    for t in tasks {
        results.push(
            t.await
                .map_err(|e| format!("a connection task failed: {e}"))?,
        );
    }
    let close_elapsed = close_started.elapsed();

    let mut welcome = Histogram::new();
    let mut close = Histogram::new();
    let mut failures = BTreeMap::new();
    let mut server_closes = BTreeMap::new();
    let mut stream_errors = BTreeMap::new();
    let mut last_welcome = started;
    let mut clean = 0usize;
    for r in &results {
        match &r.welcome {
            Ok(d) => welcome.record(d.as_micros() as u64),
            Err(e) => count_into(&mut failures, e.clone()),
        }
        if let Some(at) = r.welcomed_at {
            last_welcome = last_welcome.max(at);
        }
        if let Some(c) = &r.server_close {
            count_into(&mut server_closes, c.clone());
        }
        if let Some(e) = &r.stream_error {
            count_into(&mut stream_errors, e.clone());
        }
        if let Some(d) = r.close_took {
            close.record(d.as_micros() as u64);
        }
        clean += usize::from(r.closed_cleanly);
    }
    let window = last_welcome.duration_since(started).as_secs_f64();
    println!();
    println!(
        "connected:   {} of {} welcomed in {:.2} s: {} (all attempts settled after {:.2} s)",
        welcome.total,
        args.count,
        window,
        per_s(welcome.total, window, "connects"),
        connect_elapsed.as_secs_f64()
    );
    println!(
        "  time to welcome (TCP connect + upgrade + welcome): {}",
        welcome.summary_ms(&[("p50", 0.5), ("p90", 0.9), ("p99", 0.99)])
    );
    println!("  cpu while connecting: {connect_cpu}");
    if !failures.is_empty() {
        println!("  FAILURES: {}", fmt_counts(&failures));
    }
    if !server_closes.is_empty() {
        println!(
            "  CLOSED BY SERVER while held: {}",
            fmt_counts(&server_closes)
        );
    }
    if !stream_errors.is_empty() {
        println!("  STREAM ERRORS while held: {}", fmt_counts(&stream_errors));
    }
    println!(
        "closed:      {clean} of {} with a completed close handshake in {:.2} s; per connection {}",
        welcome.total,
        close_elapsed.as_secs_f64(),
        close.summary_ms(&[("p50", 0.5), ("p99", 0.99)])
    );
    await_server_connections(&common, &common.url, 0, Duration::from_secs(10)).await;
    let ok = welcome.total as usize == args.count
        && clean == args.count
        && server_closes.is_empty()
        && stream_errors.is_empty();
    println!();
    println!(
        "result:      {}",
        if ok {
            "OK (every connection welcomed and closed cleanly)"
        } else {
            "PROBLEMS (see above)"
        }
    );
    Ok(ok)
}

// ---------------------------------------------------------------------------

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    print_header();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let outcome = runtime.block_on(async {
        match cli.command {
            Command::Fanout(args) => run_fanout(args).await,
            Command::Connections(args) => run_connections(args).await,
        }
    });
    // Tasks still blocked on a dead server must not hold the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match outcome {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::from(2)
        }
    }
}
