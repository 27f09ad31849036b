//! `kind = "echo"`: the result is the payload.

use async_trait::async_trait;
use serde_json::value::RawValue;

use super::Handler;
use crate::tasks::Job;

pub struct Echo;

#[async_trait]
impl Handler for Echo {
    async fn run(&self, job: &Job) -> Result<Box<RawValue>, String> {
        Ok(job.payload.clone())
    }
}
