//! Test support: start a real `switchboard` process on port 0 (memory or
//! Redis broker, a unique Redis prefix per hub group), mint tokens, and talk
//! to it over real WebSockets and HTTP.
#![allow(dead_code)]

pub mod deployments;
pub mod raw;
pub mod traffic;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "test-secret";
pub const API_KEY: &str = "test-api-key";
pub const WAIT: Duration = Duration::from_secs(10);

/// Which broker a hub runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broker {
    Memory,
    Redis,
}

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A process's resident memory, in MiB.
pub fn rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib / 1024
}

/// A key prefix no other test uses.
pub fn unique_prefix() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "sbtest-{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>()
    )
}

/// Runs the same behavioural test against both brokers.
#[macro_export]
macro_rules! both_brokers {
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() {
                ($body)(Broker::Memory).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                ($body)(Broker::Redis).await
            }
        }
    };
}

/// A running hub process, killed on drop.
pub struct Hub {
    child: Child,
    /// Deletes the Redis prefix's keys on drop (the hub that made the prefix).
    owns_prefix: bool,
    redis_url: String,
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub broker: Broker,
    pub prefix: String,
    /// The first line the hub printed on stdout (`listening on HOST:PORT`).
    pub listening: String,
}

pub struct HubBuilder {
    owns_prefix: bool,
    broker: Broker,
    prefix: String,
    extra: String,
    env: Vec<(String, String)>,
    unset: Vec<String>,
    redis_url: String,
    /// `redis.mode` and `redis.sentinel_master`.
    redis_mode: (String, String),
}

impl HubBuilder {
    /// The config file's TOML. Host, port, broker, Redis URL and prefix, JWT
    /// secret, API key and workers come from the environment (change those
    /// with `.env(…)`).
    pub fn toml(mut self, extra: &str) -> Self {
        self.extra.push_str(extra);
        self.extra.push('\n');
        self
    }
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
    /// Leaves a base variable (`SWITCHBOARD__SERVER__HOST`, …) out of the
    /// hub's environment, so the config file or the default decides.
    pub fn unset(mut self, key: &str) -> Self {
        self.unset.push(key.into());
        self
    }
    /// Share a Redis prefix (a cluster) with another hub.
    pub fn prefix(mut self, prefix: &str) -> Self {
        self.prefix = prefix.into();
        self.owns_prefix = false;
        self
    }
    pub fn redis_url(mut self, url: &str) -> Self {
        self.redis_url = url.into();
        self
    }
    /// Run on this Redis deployment (a private server, a cluster, sentinels).
    pub fn redis(mut self, deployment: &deployments::Deployment) -> Self {
        self.redis_url = deployment.url();
        self.redis_mode = (
            deployment.mode().to_owned(),
            deployment.sentinel_master().to_owned(),
        );
        if deployment.mode() != "standalone" {
            // The deployment goes with the test: nothing to clean up.
            self.owns_prefix = false;
        }
        self
    }
    pub fn start(self) -> Hub {
        let dir = tempfile::tempdir().expect("tempdir");
        let kind = match self.broker {
            Broker::Memory => "memory",
            Broker::Redis => "redis",
        };
        // Base values go through the environment so the test's TOML can
        // declare any section without clashing.
        let path = dir.path().join("switchboard.toml");
        std::fs::write(&path, &self.extra).expect("write config");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
        cmd.args(["serve", "--config"])
            .arg(&path)
            .env_remove("SWITCHBOARD_CONFIG")
            .env("SWITCHBOARD__SERVER__HOST", "127.0.0.1")
            .env("SWITCHBOARD__SERVER__PORT", "0")
            .env("SWITCHBOARD__BROKER__KIND", kind)
            .env("SWITCHBOARD__REDIS__URL", &self.redis_url)
            .env("SWITCHBOARD__REDIS__MODE", &self.redis_mode.0)
            .env("SWITCHBOARD__REDIS__SENTINEL_MASTER", &self.redis_mode.1)
            .env("SWITCHBOARD__REDIS__PREFIX", &self.prefix)
            .env("RUST_LOG", "switchboard=debug,info")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("hub.log")).expect("log file"),
            ));
        // Test defaults; a test changes them with `.env(…)`, which comes later.
        cmd.env("SWITCHBOARD__AUTH__JWT_SECRET", SECRET)
            .env("SWITCHBOARD__AUTH__API_KEYS", API_KEY)
            .env("SWITCHBOARD__SERVER__WORKERS", "2");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        for k in &self.unset {
            cmd.env_remove(k);
        }
        let mut child = cmd.spawn().expect("spawn switchboard");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read listening line");
        let port = line
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| {
                let log = std::fs::read_to_string(dir.path().join("hub.log")).unwrap_or_default();
                panic!("hub did not start: stdout {line:?}\n{log}")
            });
        Hub {
            child,
            owns_prefix: self.owns_prefix,
            redis_url: self.redis_url,
            port,
            dir,
            broker: self.broker,
            prefix: self.prefix,
            listening: line.trim_end().to_owned(),
        }
    }
}

impl Hub {
    pub fn builder(broker: Broker) -> HubBuilder {
        HubBuilder {
            owns_prefix: true,
            broker,
            prefix: unique_prefix(),
            extra: String::new(),
            env: Vec::new(),
            unset: Vec::new(),
            redis_url: redis_url(),
            redis_mode: ("standalone".into(), String::new()),
        }
    }

    /// A hub with the test defaults.
    pub fn start(broker: Broker) -> Hub {
        Self::builder(broker).start()
    }

    /// The hub process's resident memory, in MiB.
    pub fn rss_mib(&self) -> u64 {
        rss_mib(self.pid())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("hub.log")).unwrap_or_default()
    }

    pub async fn connect(&self, user: &str) -> Client {
        Client::connect(&self.ws_url(), &token(user)).await
    }

    /// Sends a signal (`TERM`, `KILL`, …) by PID.
    pub fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status();
    }

    /// Waits for the process to exit; its exit status.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = std::time::Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub async fn api(&self) -> Api {
        Api {
            base: format!("http://127.0.0.1:{}", self.port),
            http: reqwest::Client::new(),
        }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.broker == Broker::Redis && self.owns_prefix {
            delete_prefix(&self.redis_url, &self.prefix);
        }
        if std::thread::panicking() {
            eprintln!("---- hub log (port {}) ----\n{}", self.port, self.log());
        }
    }
}

/// Removes every key under `prefix` (test clean-up; errors ignored).
pub fn delete_prefix(url: &str, prefix: &str) {
    let Ok(client) = redis::Client::open(url) else {
        return;
    };
    let Ok(mut con) = client.get_connection() else {
        return;
    };
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query(&mut con)
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&keys).query(&mut con);
    }
}

/// Mints an HS256 token with the test secret: `sub` and a one-hour `exp`,
/// plus any extra claims.
pub fn token_with(claims: Value) -> String {
    let mut all = json!({"exp": now_s() + 3600});
    if let (Some(all), Some(extra)) = (all.as_object_mut(), claims.as_object()) {
        for (k, v) in extra {
            all.insert(k.clone(), v.clone());
        }
    }
    encode(
        &Header::default(),
        &all,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("encode token")
}

pub fn token(user: &str) -> String {
    token_with(json!({"sub": user}))
}

pub fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// `{ms}-{seq}` as a comparable pair.
pub fn id_pair(id: &Value) -> (u64, u64) {
    let s = id
        .as_str()
        .unwrap_or_else(|| panic!("id {id} is not a string"));
    let (a, b) = s.split_once('-').unwrap_or_else(|| panic!("bad id {s}"));
    (a.parse().expect("ms"), b.parse().expect("seq"))
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket client that skips pings/pongs and times out instead of hanging.
pub struct Client {
    pub ws: Ws,
    pub welcome: Value,
    /// Frames `request`/`recv_type` passed over, handed out first by `recv`.
    pending: std::collections::VecDeque<Value>,
}

/// How a connection ended.
#[derive(Debug, PartialEq, Eq)]
pub struct Closed {
    pub code: u16,
    pub reason: String,
}

impl Client {
    /// Connects with `?token=` and expects `welcome`.
    pub async fn connect(url: &str, token: &str) -> Client {
        let mut client = Self::connect_raw(&format!("{url}?token={token}"), &[]).await;
        let welcome = client.recv().await;
        assert_eq!(
            welcome["type"], "welcome",
            "expected welcome, got {welcome}"
        );
        client.welcome = welcome;
        client
    }

    /// Connects without expecting anything (for refusals).
    pub async fn connect_raw(url: &str, headers: &[(&str, &str)]) -> Client {
        let mut request = url.into_client_request().expect("request");
        for (k, v) in headers {
            request.headers_mut().insert(
                reqwest::header::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                v.parse().expect("header value"),
            );
        }
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
            .await
            .expect("connect timed out")
            .expect("connect");
        Client {
            ws,
            welcome: Value::Null,
            pending: Default::default(),
        }
    }

    pub fn connection_id(&self) -> String {
        self.welcome["connection_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    pub async fn send(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::text(text.to_owned()))
            .await
            .expect("send");
    }

    pub async fn send_binary(&mut self, bytes: &[u8]) {
        self.ws
            .send(Message::binary(bytes.to_vec()))
            .await
            .expect("send binary");
    }

    /// The next JSON frame (pings and pongs skipped); panics on close or timeout.
    pub async fn recv(&mut self) -> Value {
        if let Some(frame) = self.pending.pop_front() {
            return frame;
        }
        self.recv_wire().await
    }

    async fn recv_wire(&mut self) -> Value {
        match self.next_event(WAIT).await {
            Some(Ok(v)) => v,
            Some(Err(closed)) => panic!("connection closed while waiting for a frame: {closed:?}"),
            None => panic!("no frame within {WAIT:?}"),
        }
    }

    /// The next frame of the given type; frames of other types (e.g.
    /// joined/left) before it are dropped.
    pub async fn recv_type(&mut self, kind: &str) -> Value {
        loop {
            let frame = self.recv().await;
            if frame["type"] == kind {
                return frame;
            }
        }
    }

    /// Sends a frame and returns the reply carrying its `ref`, skipping others.
    pub async fn request(&mut self, mut frame: Value) -> Value {
        static REF: AtomicU64 = AtomicU64::new(1_000_000);
        let r = REF.fetch_add(1, Ordering::Relaxed);
        frame["ref"] = json!(r);
        self.send(frame).await;
        // Frames before the reply stay queued for `recv`.
        if let Some(i) = self.pending.iter().position(|f| f["ref"] == json!(r)) {
            return self.pending.remove(i).expect("index");
        }
        loop {
            let reply = self.recv_wire().await;
            if reply["ref"] == json!(r) {
                return reply;
            }
            self.pending.push_back(reply);
        }
    }

    /// Joins and returns the ack.
    pub async fn join(&mut self, room: &str) -> Value {
        let ack = self.request(json!({"type": "join", "room": room})).await;
        assert_eq!(ack["type"], "ack", "join {room}: {ack}");
        ack
    }

    /// Publishes and returns the ack's id.
    pub async fn publish(&mut self, room: &str, data: Value) -> String {
        let ack = self
            .request(json!({"type": "publish", "room": room, "data": data}))
            .await;
        assert_eq!(ack["type"], "ack", "publish to {room}: {ack}");
        ack["id"].as_str().expect("ack id").to_owned()
    }

    /// `Ok(frame)`, `Err(close)` or `None` when nothing came within `limit`.
    pub async fn next_event(&mut self, limit: Duration) -> Option<Result<Value, Closed>> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let msg = match tokio::time::timeout(left, self.ws.next()).await {
                Err(_) => return None,
                Ok(None) => {
                    return Some(Err(Closed {
                        code: 1006,
                        reason: "stream ended".into(),
                    }))
                }
                Ok(Some(Err(e))) => {
                    return Some(Err(Closed {
                        code: 1006,
                        reason: e.to_string(),
                    }))
                }
                Ok(Some(Ok(msg))) => msg,
            };
            match msg {
                Message::Text(text) => {
                    let value: Value = serde_json::from_str(text.as_str())
                        .unwrap_or_else(|e| panic!("server sent invalid JSON {text:?}: {e}"));
                    return Some(Ok(value));
                }
                Message::Close(frame) => {
                    return Some(Err(match frame {
                        Some(f) => Closed {
                            code: u16::from(f.code),
                            reason: f.reason.to_string(),
                        },
                        None => Closed {
                            code: u16::from(CloseCode::Status),
                            reason: String::new(),
                        },
                    }))
                }
                Message::Binary(_) => panic!("server sent a binary frame"),
                _ => continue,
            }
        }
    }

    /// Waits for the close, skipping frames; returns (code, reason).
    pub async fn recv_close(&mut self) -> Closed {
        loop {
            match self.next_event(WAIT).await {
                Some(Ok(_)) => continue,
                Some(Err(closed)) => return closed,
                None => panic!("connection not closed within {WAIT:?}"),
            }
        }
    }

    /// Asserts that no frame arrives within `limit`.
    pub async fn expect_silence(&mut self, limit: Duration) {
        if let Some(event) = self.next_event(limit).await {
            panic!("expected nothing, got {event:?}");
        }
    }

    /// Closes cleanly: sends a close and waits for the server's.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        let _ = tokio::time::timeout(WAIT, async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}

/// Retries `check` (every 50 ms, up to 10 s) until it returns `Some`.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The admin HTTP API.
pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
}

impl Api {
    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.call(
            self.http
                .get(format!("{}{path}", self.base))
                .bearer_auth(API_KEY),
        )
        .await
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(
            self.http
                .post(format!("{}{path}", self.base))
                .bearer_auth(API_KEY)
                .json(&body),
        )
        .await
    }

    pub async fn call(&self, request: reqwest::RequestBuilder) -> (u16, Value) {
        let response = tokio::time::timeout(WAIT, request.send())
            .await
            .expect("http timed out")
            .expect("http");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// A metric's value from `/metrics` (`name` with its labels, as the
    /// line has them; 0 when absent).
    pub async fn metric(&self, name: &str) -> f64 {
        let (_, body) = self
            .call(self.http.get(format!("{}/metrics", self.base)))
            .await;
        let text = body.as_str().unwrap_or_default().to_owned();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    pub async fn publish_room(&self, room: &str, data: Value) -> String {
        let (status, body) = self
            .post("/api/publish", json!({"room": room, "data": data}))
            .await;
        assert_eq!(status, 200, "publish: {body}");
        body["id"].as_str().expect("id").to_owned()
    }
}

/// The path of a test fixture.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

/// A free TCP port on loopback (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A private `redis-server` on a free port, for tests that stop, restart or
/// disturb Redis. Killed by PID on drop.
pub struct PrivateRedis {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// An append-only file fsynced before every reply: a crash loses
    /// nothing acknowledged.
    durable: bool,
}

impl PrivateRedis {
    pub fn start() -> PrivateRedis {
        Self::with(false)
    }

    /// One that keeps every acknowledged write through a crash.
    pub fn durable() -> PrivateRedis {
        Self::with(true)
    }

    fn with(durable: bool) -> PrivateRedis {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut redis = PrivateRedis {
            port: free_port(),
            child: None,
            dir,
            durable,
        };
        redis.spawn();
        redis
    }

    /// SIGKILLs it and, `down` later, starts it again on its port (from its
    /// append-only file when durable).
    pub fn crash_and_restart(&mut self, down: Duration) {
        self.stop();
        std::thread::sleep(down);
        self.spawn();
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                if self.durable { "yes" } else { "no" },
                "--appendfsync",
                "always",
                "--dir",
            ])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (install it: apt-get install redis-server)");
        self.child = Some(child);
        let url = self.url();
        let start = std::time::Instant::now();
        while start.elapsed() < WAIT {
            if self.cmd(&["PING"]).is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("private redis at {url} did not start");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs a command; `None` when Redis does not answer.
    pub fn cmd(&self, args: &[&str]) -> Option<redis::Value> {
        let client = redis::Client::open(self.url()).ok()?;
        let mut con = client
            .get_connection_with_timeout(Duration::from_secs(1))
            .ok()?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut con).ok()
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same port, empty.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}
