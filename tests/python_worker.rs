//! The Python worker of `examples/worker.py` (the `switchboard` package's
//! `Worker`) takes part in the consumer group like Switchboard's own: a task
//! declared `kind = "external"` is submitted over the WebSocket, run by the
//! Python process, and its updates reach the submitter.
//!
//! Python comes from a virtual environment with `clients/python` installed:
//! `$SWITCHBOARD_PYTHON`, else `target/venv-python/bin/python`, which
//! `bash clients/python/ci.sh setup` (and `.ci/run`) creates.

mod support;

use std::path::PathBuf;
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

/// The virtual environment's interpreter, with the `switchboard` package.
fn python() -> PathBuf {
    let path = std::env::var_os("SWITCHBOARD_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/venv-python/bin/python")
        });
    let has_package = Command::new(&path)
        .args(["-c", "import switchboard"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has_package,
        "no Python with the switchboard package at {}: run `bash clients/python/ci.sh setup` \
         (it makes target/venv-python), or set SWITCHBOARD_PYTHON to such an interpreter",
        path.display()
    );
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_worker_runs_a_task() {
    let python = python();
    let hub = Hub::builder(Broker::Redis)
        .toml("[tasks]\nworkers = 0\n[tasks.handlers.shout]\nkind = \"external\"\n")
        .start();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/worker.py");
    let _python = Python(
        Command::new(&python)
            .arg(script)
            .env("REDIS_URL", redis_url())
            .env("PREFIX", &hub.prefix)
            .stdout(Stdio::null())
            .spawn()
            .expect("python examples/worker.py"),
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
