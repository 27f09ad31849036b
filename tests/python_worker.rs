//! The Python worker of `examples/worker.py` takes part in the consumer
//! group like Switchboard's own: a task declared `kind = "external"` is
//! submitted over the WebSocket, run by the Python process, and its
//! updates reach the submitter.

mod support;

use std::process::{Child, Command, Stdio};

use serde_json::json;
use support::*;

struct Python(Child);

impl Drop for Python {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_worker_runs_a_task() {
    let has_redis_py = Command::new("python3")
        .args(["-c", "import redis"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has_redis_py,
        "python3 with redis-py is needed: pip install redis (bash .ci/run does)"
    );
    let hub = Hub::builder(Broker::Redis)
        .toml("[tasks]\nworkers = 0\n[tasks.handlers.shout]\nkind = \"external\"\n")
        .start();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/worker.py");
    let _python = Python(
        Command::new("python3")
            .arg(script)
            .env("REDIS_URL", redis_url())
            .env("PREFIX", &hub.prefix)
            .stdout(Stdio::null())
            .spawn()
            .expect("python3 examples/worker.py"),
    );
    let mut c = hub.connect("alice").await;
    let ack = c
        .request(json!({"type": "task", "name": "shout", "payload": {"text": "hello"}}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let id = ack["task_id"].as_str().expect("task_id").to_owned();
    let mut statuses = Vec::new();
    let done = loop {
        let update = c.recv_type("task").await;
        assert_eq!(update["task_id"], id.as_str());
        statuses.push(update["status"].as_str().unwrap_or_default().to_owned());
        if update["status"] == "done" {
            break update;
        }
    };
    assert_eq!(statuses, ["queued", "running", "done"]);
    assert_eq!(done["result"], json!({"text": "HELLO"}));
    let (_, record) = hub.api().await.get(&format!("/api/tasks/{id}")).await;
    assert_eq!(
        (record["status"].as_str(), record["attempts"].as_u64()),
        (Some("done"), Some(1)),
        "{record}"
    );
    assert_eq!(record["result"], json!({"text": "HELLO"}));
}
