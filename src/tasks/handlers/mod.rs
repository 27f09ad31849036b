//! Task handlers: what running a task of a given name does. A kind is one
//! file implementing [`Handler`]; `[tasks.handlers.NAME]` tables pick a
//! kind per name ([`Handlers::from_config`]). `kind = "external"` names a
//! task that workers outside Switchboard run.

mod echo;
mod webhook;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::value::RawValue;

use super::Job;
use crate::config::{HandlerConfig, TasksConfig};

/// A handler that could not be built from its config.
#[derive(Debug, thiserror::Error)]
#[error("config error: tasks.handlers.{name}: {message}")]
pub struct HandlerError {
    name: String,
    message: String,
}

/// Runs tasks of one kind. An `Err` is a failed attempt (retried until
/// `tasks.max_attempts`), its text the task's `error`.
#[async_trait]
pub trait Handler: Send + Sync {
    async fn run(&self, job: &Job) -> Result<Box<RawValue>, String>;
}

/// The configured handlers by task name, and the names external workers
/// run (`kind = "external"`).
#[derive(Default)]
pub struct Handlers {
    handlers: BTreeMap<String, Arc<dyn Handler>>,
    external: Vec<String>,
}

impl Handlers {
    pub fn from_config(config: &TasksConfig) -> Result<Handlers, HandlerError> {
        let mut handlers = BTreeMap::new();
        let mut external = Vec::new();
        for (name, handler) in &config.handlers {
            let built: Arc<dyn Handler> = match handler {
                HandlerConfig::Echo {} => Arc::new(echo::Echo),
                HandlerConfig::External {} => {
                    external.push(name.clone());
                    continue;
                }
                HandlerConfig::Webhook {
                    url,
                    timeout_s,
                    headers,
                } => Arc::new(webhook::Webhook::new(url, *timeout_s, headers).map_err(
                    |message| HandlerError {
                        name: name.clone(),
                        message,
                    },
                )?),
            };
            handlers.insert(name.clone(), built);
        }
        Ok(Handlers { handlers, external })
    }

    /// The handler this process runs tasks named `name` with.
    pub fn get(&self, name: &str) -> Option<Arc<dyn Handler>> {
        self.handlers.get(name).cloned()
    }

    /// Whether a task of this name may be submitted.
    pub fn contains(&self, name: &str) -> bool {
        self.handlers.contains_key(name) || self.external.iter().any(|n| n == name)
    }

    /// Whether this process has any handler to run.
    pub fn runs_any(&self) -> bool {
        !self.handlers.is_empty()
    }
}
