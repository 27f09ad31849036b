//! A task's record: what `GET /api/tasks/{id}` and `task_status` answer
//! (docs/protocol.md §8), and the `task` frames that tell its changes.

use serde::Serialize;
use serde_json::value::RawValue;

use crate::protocol::{TaskEvent, TaskStatus};

/// `{"task_id","name","user","status","attempts","progress"?,"result"?,"error"?,"created_at","updated_at"}`.
#[derive(Debug, Clone, Serialize)]
pub struct TaskRecord {
    pub task_id: String,
    pub name: String,
    pub user: String,
    pub status: TaskStatus,
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Milliseconds since the epoch.
    pub created_at: u64,
    pub updated_at: u64,
}

impl TaskRecord {
    /// The record as a JSON object.
    pub fn to_object(&self) -> serde_json::Map<String, serde_json::Value> {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        }
    }
}

/// The `task` frame for a status change without a result or error.
pub fn status_frame(task_id: &str, status: TaskStatus) -> bytestring::ByteString {
    TaskEvent {
        task_id,
        status,
        progress: None,
        message: None,
        result: None,
        error: None,
    }
    .encode()
}

/// The `task` frame for how a task ended.
pub fn outcome_frame(task_id: &str, outcome: &super::Outcome) -> bytestring::ByteString {
    let (status, result, error) = match outcome {
        super::Outcome::Done(result) => (TaskStatus::Done, Some(&**result), None),
        super::Outcome::Failed(error) => (TaskStatus::Failed, None, Some(error.as_str())),
    };
    TaskEvent {
        task_id,
        status,
        progress: None,
        message: None,
        result,
        error,
    }
    .encode()
}

/// The `task` frame for a progress report.
pub fn progress_frame(
    task_id: &str,
    progress: u8,
    message: Option<&str>,
) -> bytestring::ByteString {
    TaskEvent {
        task_id,
        status: TaskStatus::Progress,
        progress: Some(progress),
        message,
        result: None,
        error: None,
    }
    .encode()
}
