//! Task handlers: what running a task of a given name does. A kind is one
//! file implementing [`Handler`]; `[tasks.handlers.NAME]` tables pick a
//! kind per name ([`Handlers::from_config`]).

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

/// The configured handlers by task name.
#[derive(Default)]
pub struct Handlers(BTreeMap<String, Arc<dyn Handler>>);

impl Handlers {
    pub fn from_config(config: &TasksConfig) -> Result<Handlers, HandlerError> {
        let mut handlers = BTreeMap::new();
        for (name, handler) in &config.handlers {
            let built: Arc<dyn Handler> = match handler {
                HandlerConfig::Echo {} => Arc::new(echo::Echo),
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
        Ok(Handlers(handlers))
    }

    pub fn get(&self, name: &str) -> Option<Arc<dyn Handler>> {
        self.0.get(name).cloned()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    /// A fixed set, for tests.
    pub fn with(handlers: Vec<(&str, Arc<dyn Handler>)>) -> Handlers {
        Handlers(
            handlers
                .into_iter()
                .map(|(name, h)| (name.to_owned(), h))
                .collect(),
        )
    }
}
