//! What can go wrong talking to Redis, in the two kinds the hub acts on
//! differently.

use crate::broker::BrokerError;
use crate::tasks::TaskError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum RedisError {
    /// Redis could not be reached, did not answer within `redis.timeout_s`,
    /// lost the connection, or cannot take writes now (a read-only replica
    /// after a failover, a cluster slot moving or down): a write's outcome
    /// is unknown; retrying is safe where the write is idempotent.
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    /// Redis answered with an error: a bug, or data not as expected.
    #[error("redis: {0}")]
    Reply(String),
}

pub type RedisResult<T> = Result<T, RedisError>;

/// A failed command as one of the two kinds.
pub fn classify(e: &::redis::RedisError) -> RedisError {
    let transient = e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_cluster_error()
        || matches!(
            e.code(),
            Some(
                "READONLY"
                    | "MASTERDOWN"
                    | "LOADING"
                    | "TRYAGAIN"
                    | "CLUSTERDOWN"
                    | "MOVED"
                    | "ASK"
            )
        );
    if transient {
        RedisError::Unavailable(e.to_string())
    } else {
        RedisError::Reply(e.to_string())
    }
}

impl From<RedisError> for BrokerError {
    fn from(e: RedisError) -> BrokerError {
        match e {
            RedisError::Unavailable(e) => BrokerError::Unavailable(e),
            RedisError::Reply(e) => BrokerError::Internal(format!("redis: {e}")),
        }
    }
}

impl From<RedisError> for TaskError {
    fn from(e: RedisError) -> TaskError {
        match e {
            RedisError::Unavailable(e) => TaskError::Unavailable(e),
            RedisError::Reply(e) => TaskError::Internal(format!("redis: {e}")),
        }
    }
}
