//! Typed configuration: the TOML file of docs/protocol.md §11 (every key: config/default.toml), overridden by
//! `SWITCHBOARD__SECTION__KEY` environment variables, validated once at start.
//!
//! Every key has a default (so a file holds only what differs); unknown keys
//! and bad values stop the start with one message naming the key, the value
//! and what was expected.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The development secret used when `auth.jwt_secret` is not set. Using it
/// logs a loud warning at start.
pub const DEV_JWT_SECRET: &str = "switchboard-development-secret-change-me";

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub broker: BrokerConfig,
    pub redis: RedisConfig,
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
    pub history: HistoryConfig,
    pub tasks: TasksConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Empty: every interface (`0.0.0.0`), or loopback only (`127.0.0.1`)
    /// while `auth.dev_tokens` is on (see `Config::listen_host`).
    pub host: String,
    pub port: u16,
    /// Empty: hostname plus a random suffix (see `Config::instance_id`).
    pub instance_id: String,
    /// 0: one per CPU core.
    pub workers: usize,
    pub heartbeat_s: u64,
    pub client_timeout_s: u64,
    /// Empty: any origin.
    pub allowed_origins: Vec<String>,
    pub shutdown_grace_s: u64,
    /// A folder served at `/` (the demo); empty, or a folder that does not
    /// exist: nothing is served there.
    pub static_dir: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BrokerKind {
    Memory,
    Redis,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    pub kind: BrokerKind,
}

/// Which Redis deployment `redis.url` names.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    /// One server (or a managed primary behind one name).
    Standalone,
    /// A Redis Cluster: `url` lists seed nodes.
    Cluster,
    /// A primary watched by Sentinels: `url` lists the sentinels.
    Sentinel,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    pub mode: RedisMode,
    /// Comma-separated: the server; a cluster's seed nodes; the sentinels.
    pub url: String,
    /// Sentinel mode: the monitored master's name.
    pub sentinel_master: String,
    pub prefix: String,
    pub pool_size: usize,
    pub instance_ttl_s: u64,
    /// How long a Redis command may take: a Redis that is slow or paused
    /// for less is waited for, not treated as away.
    pub timeout_s: u64,
    /// A publish is acked once this many replicas hold it (`WAIT`); 0
    /// acks when the primary holds it.
    pub wait_replicas: u32,
}

impl RedisConfig {
    /// The URLs of `url`, trimmed, empty ones dropped.
    pub fn urls(&self) -> Vec<String> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum JwtAlgorithm {
    HS256,
    HS384,
    HS512,
    RS256,
    ES256,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub jwt_secret: String,
    pub jwt_algorithm: JwtAlgorithm,
    pub jwt_public_key_file: String,
    pub audience: String,
    pub issuer: String,
    pub default_rooms: Vec<String>,
    /// User-id globs a token without a `direct` claim may send `direct` to.
    pub default_direct: Vec<String>,
    pub api_keys: Vec<String>,
    /// `POST /dev/token` mints a token for any user name: local use only.
    pub dev_tokens: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_connections: usize,
    pub max_connections_per_user: usize,
    pub max_message_bytes: usize,
    pub max_rooms_per_connection: usize,
    pub max_outbound_queue: usize,
    /// Payload bytes queued for one client (with `max_outbound_queue`).
    pub max_outbound_bytes: usize,
    /// How long a client's socket may take nothing that is waiting for it
    /// before the session is closed as a slow consumer.
    pub write_timeout_s: u64,
    pub messages_per_second: u32,
    pub burst: u32,
    pub rate_limit_strikes: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HistoryConfig {
    pub size: usize,
    pub ttl_s: u64,
    /// The memory broker's budget for all rooms' history together.
    pub max_bytes: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TasksConfig {
    pub workers: usize,
    pub visibility_timeout_s: u64,
    pub max_attempts: u32,
    pub idempotency_ttl_s: u64,
    /// Tasks a user may have queued or running at once.
    pub max_pending_per_user: usize,
    /// How long a task's record (status, result) is kept after its last change.
    pub result_ttl_s: u64,
    /// Bytes of ended tasks' records (results, errors) kept per user; the
    /// oldest go first.
    pub max_record_bytes_per_user: usize,
    pub handlers: BTreeMap<String, HandlerConfig>,
}

/// One `[tasks.handlers.NAME]` table.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum HandlerConfig {
    /// Returns the payload.
    Echo {},
    /// Run by a worker outside Switchboard (any language, reading the
    /// stream); Switchboard's own workers must then be off.
    External {},
    /// POSTs the task to `url`; a 2xx JSON answer is the result.
    Webhook {
        url: String,
        #[serde(default = "default_webhook_timeout")]
        timeout_s: u64,
        /// Extra request headers (an `Authorization`, say).
        #[serde(default)]
        headers: BTreeMap<String, String>,
    },
}

fn default_webhook_timeout() -> u64 {
    30
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: String::new(),
            port: 8000,
            instance_id: String::new(),
            workers: 0,
            heartbeat_s: 20,
            client_timeout_s: 60,
            allowed_origins: Vec::new(),
            shutdown_grace_s: 10,
            static_dir: "web".into(),
        }
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            kind: BrokerKind::Memory,
        }
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            mode: RedisMode::Standalone,
            url: "redis://127.0.0.1:6379".into(),
            sentinel_master: String::new(),
            prefix: "sb".into(),
            pool_size: 16,
            instance_ttl_s: 15,
            timeout_s: 5,
            wait_replicas: 0,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            jwt_secret: DEV_JWT_SECRET.into(),
            jwt_algorithm: JwtAlgorithm::HS256,
            jwt_public_key_file: String::new(),
            audience: String::new(),
            issuer: String::new(),
            default_rooms: vec!["*".into()],
            default_direct: vec!["*".into()],
            api_keys: Vec::new(),
            dev_tokens: false,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 100_000,
            max_connections_per_user: 5,
            max_message_bytes: 65_536,
            max_rooms_per_connection: 100,
            max_outbound_queue: 1024,
            max_outbound_bytes: 1024 * 1024,
            write_timeout_s: 10,
            messages_per_second: 50,
            burst: 100,
            rate_limit_strikes: 20,
        }
    }
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            size: 100,
            ttl_s: 3600,
            max_bytes: 64 * 1024 * 1024,
        }
    }
}

impl Default for TasksConfig {
    fn default() -> Self {
        TasksConfig {
            workers: 4,
            visibility_timeout_s: 60,
            max_attempts: 3,
            idempotency_ttl_s: 86_400,
            max_pending_per_user: 100,
            result_ttl_s: 86_400,
            max_record_bytes_per_user: 4 * 1024 * 1024,
            handlers: BTreeMap::new(),
        }
    }
}

/// A configuration that cannot be used: one line naming the key, the value
/// and what was expected.
#[derive(Debug, thiserror::Error)]
#[error("config error: {0}")]
pub struct ConfigError(pub String);

const ENV_PREFIX: &str = "SWITCHBOARD__";

/// The error for `key = value`, naming what was expected.
fn bad(key: &str, value: impl std::fmt::Display, expected: &str) -> Result<(), ConfigError> {
    Err(ConfigError(format!("{key} = {value}: expected {expected}")))
}

impl Config {
    /// Loads `path`, else `$SWITCHBOARD_CONFIG`, else `config/default.toml`
    /// (pure defaults when that file does not exist), applies the
    /// `SWITCHBOARD__SECTION__KEY` overrides and validates the result.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let explicit = path
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("SWITCHBOARD_CONFIG").map(PathBuf::from));
        let text = match &explicit {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?,
            None => std::fs::read_to_string("config/default.toml").unwrap_or_default(),
        };
        let env: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        Self::from_toml_and_env(&text, &env)
    }

    /// Parses TOML text, applies overrides given as (`SWITCHBOARD__…`, value)
    /// pairs, deserializes and validates.
    pub fn from_toml_and_env(text: &str, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let mut value: toml::Table = toml::from_str(text)
            .map_err(|e| ConfigError(format!("invalid TOML: {}", e.message().trim())))?;
        let defaults = toml::Table::try_from(Config::default())
            .map_err(|e| ConfigError(format!("internal: {e}")))?;
        for (name, raw) in env {
            apply_env(&mut value, &defaults, name, raw)?;
        }
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(value.clone()))
            .map_err(|e| describe(&value, e))?;
        config.validate()?;
        Ok(config)
    }

    /// Semantic checks the types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_server()?;
        self.validate_redis()?;
        self.validate_auth()?;
        self.validate_limits()?;
        self.validate_tasks()
    }

    fn validate_tasks(&self) -> Result<(), ConfigError> {
        let t = &self.tasks;
        for (key, value) in [
            ("tasks.visibility_timeout_s", t.visibility_timeout_s),
            ("tasks.max_attempts", u64::from(t.max_attempts)),
            ("tasks.idempotency_ttl_s", t.idempotency_ttl_s),
            ("tasks.max_pending_per_user", t.max_pending_per_user as u64),
            ("tasks.result_ttl_s", t.result_ttl_s),
            (
                "tasks.max_record_bytes_per_user",
                t.max_record_bytes_per_user as u64,
            ),
        ] {
            if value == 0 {
                return bad(key, 0, "at least 1");
            }
        }
        let external = t
            .handlers
            .iter()
            .find(|(_, h)| matches!(h, HandlerConfig::External {}));
        if let Some((name, _)) = external {
            let key = format!("tasks.handlers.{name}.kind");
            if self.broker.kind != BrokerKind::Redis {
                return bad(&key, "\"external\"", "a kind the memory broker can run (external workers need broker.kind = \"redis\")");
            }
            if t.workers > 0 {
                return bad(
                    "tasks.workers",
                    t.workers,
                    &format!("0 with an external handler ({key}): every worker on a prefix takes every task"),
                );
            }
        }
        for (name, handler) in &t.handlers {
            let valid_name = !name.is_empty()
                && name.len() <= 128
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b));
            if !valid_name {
                return bad(
                    &format!("tasks.handlers.{name}"),
                    format!("{name:?}"),
                    "a name of 1-128 characters of [A-Za-z0-9_.:-]",
                );
            }
            if let HandlerConfig::Webhook { url, timeout_s, .. } = handler {
                let host = url
                    .strip_prefix("http://")
                    .or_else(|| url.strip_prefix("https://"))
                    .unwrap_or_default();
                if host.is_empty() || host.starts_with('/') {
                    let key = format!("tasks.handlers.{name}.url");
                    return bad(&key, format!("{url:?}"), "an http:// or https:// URL");
                }
                if *timeout_s == 0 || *timeout_s > 3600 {
                    let key = format!("tasks.handlers.{name}.timeout_s");
                    return bad(&key, timeout_s, "1 to 3600");
                }
            }
        }
        Ok(())
    }

    fn validate_server(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if s.heartbeat_s == 0 {
            return bad("server.heartbeat_s", s.heartbeat_s, "at least 1");
        }
        if s.client_timeout_s <= s.heartbeat_s {
            return bad(
                "server.client_timeout_s",
                s.client_timeout_s,
                "more than server.heartbeat_s",
            );
        }
        for origin in &s.allowed_origins {
            let ok = origin == "*"
                || origin.split_once("://").is_some_and(|(scheme, host)| {
                    !scheme.is_empty() && !host.is_empty() && !host.contains('/')
                });
            if !ok {
                return bad(
                    "server.allowed_origins",
                    format!("{origin:?}"),
                    "\"*\" or scheme://host[:port] entries",
                );
            }
        }
        Ok(())
    }

    fn validate_redis(&self) -> Result<(), ConfigError> {
        let r = &self.redis;
        let urls = r.urls();
        let url = format!("{:?}", mask_url_password(&r.url));
        if urls.is_empty() {
            return bad("redis.url", url, "at least one redis:// URL");
        }
        if let Some(u) = urls
            .iter()
            .find(|u| !u.starts_with("redis://") && !u.starts_with("rediss://"))
        {
            return bad(
                "redis.url",
                format!("{:?}", mask_url_password(u)),
                "redis:// or rediss:// URLs, comma-separated",
            );
        }
        match r.mode {
            RedisMode::Standalone if urls.len() > 1 => {
                return bad(
                    "redis.url",
                    url,
                    "one URL in standalone mode (several: redis.mode = \"cluster\" or \"sentinel\")",
                );
            }
            RedisMode::Sentinel if r.sentinel_master.trim().is_empty() => {
                return bad(
                    "redis.sentinel_master",
                    "\"\"",
                    "the monitored master's name in sentinel mode",
                );
            }
            _ => {}
        }
        if r.prefix.is_empty()
            || r.prefix.contains(char::is_whitespace)
            || r.prefix.contains(['{', '}'])
        {
            return bad(
                "redis.prefix",
                format!("{:?}", r.prefix),
                "a non-empty prefix without spaces or braces",
            );
        }
        if r.timeout_s == 0 {
            return bad("redis.timeout_s", 0, "at least 1");
        }
        if r.wait_replicas > 64 {
            return bad("redis.wait_replicas", r.wait_replicas, "0 to 64");
        }
        if self.redis.pool_size == 0 {
            return bad("redis.pool_size", 0, "at least 1");
        }
        if self.redis.instance_ttl_s == 0 {
            return bad("redis.instance_ttl_s", 0, "at least 1");
        }
        Ok(())
    }

    fn validate_auth(&self) -> Result<(), ConfigError> {
        let a = &self.auth;
        match a.jwt_algorithm {
            JwtAlgorithm::HS256 | JwtAlgorithm::HS384 | JwtAlgorithm::HS512 => {
                if a.jwt_secret.is_empty() {
                    return bad("auth.jwt_secret", "\"\"", "a secret for HS* algorithms");
                }
            }
            JwtAlgorithm::RS256 | JwtAlgorithm::ES256 => {
                if a.dev_tokens {
                    return bad(
                        "auth.dev_tokens",
                        true,
                        "false with RS256/ES256 (the hub holds no private key to sign with)",
                    );
                }
                if a.jwt_public_key_file.is_empty() {
                    return bad(
                        "auth.jwt_public_key_file",
                        "\"\"",
                        "a PEM public key file for RS256/ES256",
                    );
                }
                if let Err(e) = std::fs::metadata(&a.jwt_public_key_file) {
                    return bad(
                        "auth.jwt_public_key_file",
                        format!("{:?}", a.jwt_public_key_file),
                        &format!("a readable file ({e})"),
                    );
                }
            }
        }
        Ok(())
    }

    fn validate_limits(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        for (key, value) in [
            ("limits.max_connections", l.max_connections),
            (
                "limits.max_connections_per_user",
                l.max_connections_per_user,
            ),
            (
                "limits.max_rooms_per_connection",
                l.max_rooms_per_connection,
            ),
            ("limits.max_outbound_queue", l.max_outbound_queue),
            ("limits.write_timeout_s", l.write_timeout_s as usize),
            ("limits.messages_per_second", l.messages_per_second as usize),
            ("limits.burst", l.burst as usize),
            ("limits.rate_limit_strikes", l.rate_limit_strikes as usize),
            ("history.size", self.history.size),
            ("history.ttl_s", self.history.ttl_s as usize),
        ] {
            if value == 0 {
                return bad(key, 0, "at least 1");
            }
        }
        if self.history.max_bytes < 4096 {
            return bad("history.max_bytes", self.history.max_bytes, "at least 4096");
        }
        if l.max_message_bytes < 64 {
            return bad(
                "limits.max_message_bytes",
                l.max_message_bytes,
                "at least 64",
            );
        }
        if l.max_outbound_bytes < l.max_message_bytes {
            return bad(
                "limits.max_outbound_bytes",
                l.max_outbound_bytes,
                "at least limits.max_message_bytes (a client must be able to receive one message)",
            );
        }
        Ok(())
    }

    /// `server.instance_id`, or the hostname plus a random suffix.
    pub fn instance_id(&self) -> String {
        if !self.server.instance_id.is_empty() {
            return self.server.instance_id.clone();
        }
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        let suffix: String = (0..6)
            .map(|_| char::from(b"0123456789abcdefghijklmnopqrstuvwxyz"[rand::random_range(0..36)]))
            .collect();
        format!("{host}-{suffix}")
    }

    /// The address to listen on: `server.host` when set; else loopback only
    /// while `auth.dev_tokens` is on (a hub that hands out tokens for any
    /// name must not be reachable from the network by default), and every
    /// interface otherwise.
    pub fn listen_host(&self) -> &str {
        match self.server.host.as_str() {
            "" if self.auth.dev_tokens => "127.0.0.1",
            "" => "0.0.0.0",
            host => host,
        }
    }

    /// Whether [`Config::listen_host`] fell back to loopback because of
    /// `auth.dev_tokens` (the start-up log says so).
    pub fn loopback_for_dev_tokens(&self) -> bool {
        self.server.host.is_empty() && self.auth.dev_tokens
    }

    /// The folder served at `/` (`server.static_dir`), when set and present.
    pub fn static_dir(&self) -> Option<&Path> {
        let dir = Path::new(&self.server.static_dir);
        (!self.server.static_dir.is_empty() && dir.is_dir()).then_some(dir)
    }

    pub fn uses_dev_secret(&self) -> bool {
        matches!(
            self.auth.jwt_algorithm,
            JwtAlgorithm::HS256 | JwtAlgorithm::HS384 | JwtAlgorithm::HS512
        ) && self.auth.jwt_secret == DEV_JWT_SECRET
    }

    /// A copy with the JWT secret and API keys replaced by `***`.
    pub fn masked(&self) -> Config {
        let mut c = self.clone();
        if !c.auth.jwt_secret.is_empty() {
            c.auth.jwt_secret = "***".into();
        }
        for key in &mut c.auth.api_keys {
            *key = "***".into();
        }
        c.redis.url = c
            .redis
            .url
            .split(',')
            .map(|u| mask_url_password(u.trim()))
            .collect::<Vec<_>>()
            .join(",");
        for handler in c.tasks.handlers.values_mut() {
            if let HandlerConfig::Webhook { headers, .. } = handler {
                headers.values_mut().for_each(|v| *v = "***".into());
            }
        }
        c
    }

    pub fn to_toml_string(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }
}

/// `redis://user:secret@host` → `redis://user:***@host` (a userinfo
/// without `:` may be a password too: all of it is masked).
fn mask_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &rest[..at];
    let masked = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => "***".to_owned(),
    };
    format!("{scheme}://{masked}{}", &rest[at..])
}

/// Applies one `SWITCHBOARD__SECTION__KEY=value`, typed after the default.
fn apply_env(
    table: &mut toml::Table,
    defaults: &toml::Table,
    name: &str,
    raw: &str,
) -> Result<(), ConfigError> {
    let path = name[ENV_PREFIX.len()..].to_ascii_lowercase();
    let (section, key) = path
        .split_once("__")
        .ok_or_else(|| ConfigError(format!("{name}: expected SWITCHBOARD__SECTION__KEY")))?;
    let unknown = || ConfigError(format!("{name}: unknown config key {section}.{key}"));
    let default = defaults
        .get(section)
        .and_then(toml::Value::as_table)
        .ok_or_else(unknown)?
        .get(key)
        .ok_or_else(unknown)?;
    let bad = |expected: &str| {
        ConfigError(format!(
            "{section}.{key} = {raw:?} (from {name}): expected {expected}"
        ))
    };
    let value = match default {
        toml::Value::Integer(_) => {
            toml::Value::Integer(raw.trim().parse::<i64>().map_err(|_| bad("an integer"))?)
        }
        toml::Value::Boolean(_) => toml::Value::Boolean(
            raw.trim()
                .parse::<bool>()
                .map_err(|_| bad("true or false"))?,
        ),
        toml::Value::Array(_) => toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_owned()))
                .collect(),
        ),
        _ => toml::Value::String(raw.to_owned()),
    };
    table
        .entry(section.to_owned())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .ok_or_else(|| ConfigError(format!("{section}: expected a table")))?
        .insert(key.to_owned(), value);
    Ok(())
}

/// One line for a deserialization error: key, value given, expectation.
fn describe(root: &toml::Table, e: serde_path_to_error::Error<toml::de::Error>) -> ConfigError {
    let key = e.path().to_string();
    let inner = e.inner().message().trim().to_owned();
    let given = key
        .split('.')
        .try_fold(None::<&toml::Value>, |at, part| {
            let table = match at {
                None => Some(root),
                Some(v) => v.as_table(),
            }?;
            table.get(part).map(Some)
        })
        .flatten()
        .map(|v| v.to_string());
    // serde names an unknown field inside its message; the path stops at its table.
    if let Some(field) = inner
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split('`').next())
    {
        let full = if key == "." || key.is_empty() {
            field.to_owned()
        } else if key.ends_with(field) {
            key.clone()
        } else {
            format!("{key}.{field}")
        };
        return ConfigError(format!("unknown key {full}: {inner}"));
    }
    match given {
        Some(v) => ConfigError(format!("{key} = {v}: {inner}")),
        None => ConfigError(format!("{key}: {inner}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_toml_and_env(text, &env)
    }

    #[test]
    fn default_file_is_the_defaults() {
        assert_eq!(
            load(include_str!("../config/default.toml"), &[]).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let e = load("[limits]\nburts = 5\n", &[]).unwrap_err().to_string();
        assert!(e.contains("limits.burts:"), "{e}");
        let e = load("[nope]\nx = 1\n", &[]).unwrap_err().to_string();
        assert!(e.contains("unknown key nope:"), "{e}");
    }

    #[test]
    fn bad_value_is_named_with_value() {
        let e = load("[limits]\nburst = \"lots\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("limits.burst") && e.contains("lots"), "{e}");
        let e = load("[server]\nheartbeat_s = 0\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("server.heartbeat_s"), "{e}");
    }

    #[test]
    fn env_overrides() {
        let c = load(
            "",
            &[
                ("SWITCHBOARD__REDIS__URL", "redis://10.0.0.5:6379"),
                ("SWITCHBOARD__AUTH__API_KEYS", "k1, k2"),
                ("SWITCHBOARD__LIMITS__BURST", "7"),
            ],
        )
        .unwrap();
        assert_eq!(c.redis.url, "redis://10.0.0.5:6379");
        assert_eq!(c.auth.api_keys, vec!["k1", "k2"]);
        assert_eq!(c.limits.burst, 7);
        let e = load("", &[("SWITCHBOARD__LIMITS__BURST", "x")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("limits.burst") && e.contains("\"x\""), "{e}");
        let e = load("", &[("SWITCHBOARD__LIMITS__NOPE", "1")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("limits.nope"), "{e}");
    }

    #[test]
    fn listen_host_is_loopback_with_dev_tokens_unless_set() {
        let host = |env: &[(&str, &str)]| load("", env).unwrap().listen_host().to_owned();
        assert_eq!(host(&[]), "0.0.0.0");
        assert_eq!(
            host(&[("SWITCHBOARD__AUTH__DEV_TOKENS", "true")]),
            "127.0.0.1"
        );
        assert_eq!(
            host(&[
                ("SWITCHBOARD__AUTH__DEV_TOKENS", "true"),
                ("SWITCHBOARD__SERVER__HOST", "0.0.0.0")
            ]),
            "0.0.0.0"
        );
        let c = load(
            "[server]\nhost = \"0.0.0.0\"\n[auth]\ndev_tokens = true\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.listen_host(), "0.0.0.0");
        assert!(!c.loopback_for_dev_tokens());
    }

    #[test]
    fn masking() {
        let c = load("[auth]\napi_keys = [\"k\"]\n", &[]).unwrap().masked();
        assert_eq!(c.auth.jwt_secret, "***");
        assert_eq!(c.auth.api_keys, vec!["***"]);
        for (url, shown) in [
            ("redis://u:pa:ss@h:6379/0", "redis://u:***@h:6379/0"),
            ("redis://:secret@h", "redis://:***@h"),
            ("rediss://token@h", "rediss://***@h"),
            ("redis://h:6379", "redis://h:6379"),
            ("unix:///tmp/r.sock", "unix:///tmp/r.sock"),
        ] {
            assert_eq!(mask_url_password(url), shown);
        }
    }
}
