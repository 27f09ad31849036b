//! Typed configuration: the TOML file of contract section 7, overridden by
//! `SWITCHBOARD__SECTION__KEY` environment variables, validated once at start.
//!
//! Every key has a default (so a file holds only what differs); unknown keys
//! and bad values stop the start with one message naming the key, the value
//! and what was expected.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The development secret used when `auth.jwt_secret` is not set. Using it
/// logs a loud warning at start.
pub const DEV_JWT_SECRET: &str = "switchboard-development-secret-change-me";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
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

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    pub url: String,
    pub prefix: String,
    pub pool_size: usize,
    pub instance_ttl_s: u64,
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
    pub api_keys: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_connections: usize,
    pub max_connections_per_user: usize,
    pub max_message_bytes: usize,
    pub max_rooms_per_connection: usize,
    pub max_outbound_queue: usize,
    pub messages_per_second: u32,
    pub burst: u32,
    pub rate_limit_strikes: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HistoryConfig {
    pub size: usize,
    pub ttl_s: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TasksConfig {
    pub workers: usize,
    pub visibility_timeout_s: u64,
    pub max_attempts: u32,
    pub idempotency_ttl_s: u64,
    pub handlers: BTreeMap<String, toml::Value>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: ServerConfig::default(),
            broker: BrokerConfig::default(),
            redis: RedisConfig::default(),
            auth: AuthConfig::default(),
            limits: LimitsConfig::default(),
            history: HistoryConfig::default(),
            tasks: TasksConfig::default(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: "0.0.0.0".into(),
            port: 8000,
            instance_id: String::new(),
            workers: 0,
            heartbeat_s: 20,
            client_timeout_s: 60,
            allowed_origins: Vec::new(),
            shutdown_grace_s: 10,
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
            url: "redis://127.0.0.1:6379".into(),
            prefix: "sb".into(),
            pool_size: 16,
            instance_ttl_s: 15,
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
            api_keys: Vec::new(),
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
            handlers: BTreeMap::new(),
        }
    }
}
