//! Async tasks (docs/protocol.md §8): the `task`, `task_status` and
//! `task_cancel` frames, idempotency, webhook handlers and their failures,
//! retries and dead letters, workers in the hub and in `switchboard
//! worker`, a worker killed mid-task, updates across instances, the
//! per-user cap.

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ECHO: &str = "[tasks]\nworkers = 2\n[tasks.handlers.echo]\nkind = \"echo\"\n";

/// Submits a task; returns the ack.
async fn submit(c: &mut Client, name: &str, payload: Value, key: Option<&str>) -> Value {
    let mut frame = json!({"type": "task", "name": name, "payload": payload});
    if let Some(key) = key {
        frame["idempotency_key"] = json!(key);
    }
    c.request(frame).await
}

/// Submits and returns the task id (the ack must carry one).
async fn submit_ok(c: &mut Client, name: &str, payload: Value) -> String {
    let ack = submit(c, name, payload, None).await;
    assert_eq!(ack["type"], "ack", "submit {name}: {ack}");
    ack["task_id"].as_str().expect("task_id").to_owned()
}

/// The `task` frames of `task_id` until it is done or failed.
async fn updates_until_final(c: &mut Client, task_id: &str) -> Vec<Value> {
    let mut updates = Vec::new();
    loop {
        let frame = c.recv_type("task").await;
        if frame["task_id"] != task_id {
            continue;
        }
        let last = matches!(frame["status"].as_str(), Some("done" | "failed"));
        updates.push(frame);
        if last {
            return updates;
        }
    }
}

fn statuses(updates: &[Value]) -> Vec<&str> {
    updates
        .iter()
        .map(|u| u["status"].as_str().unwrap_or_default())
        .collect()
}

/// How a test webhook answers its n-th request (from 0).
#[derive(Clone)]
enum Reply {
    Json(u16, &'static str),
    /// Answers after a while.
    Late(Duration, &'static str),
    /// A 302 to another URL.
    Redirect(String),
    /// A 200 whose body (no `Content-Length`) never ends.
    Endless,
    /// Never answers.
    Hang,
}

/// The requests a backend received: headers (lower case) and JSON body.
type Requests = Arc<Mutex<Vec<(HashMap<String, String>, Value)>>>;

/// A backend for webhook tasks: answers as told, records every request.
struct Backend {
    url: String,
    requests: Requests,
}

impl Backend {
    async fn start(reply: impl Fn(usize) -> Reply + Send + Sync + 'static) -> Backend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/run", listener.local_addr().expect("addr"));
        let requests: Requests = Arc::default();
        let (seen, reply) = (requests.clone(), Arc::new(reply));
        tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                let (seen, reply) = (seen.clone(), reply.clone());
                tokio::spawn(async move { serve(socket, seen, reply).await });
            }
        });
        Backend { url, requests }
    }

    fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }
}

async fn serve(
    mut socket: tokio::net::TcpStream,
    seen: Requests,
    reply: Arc<dyn Fn(usize) -> Reply + Send + Sync>,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let (head_end, headers) = loop {
        let Ok(n) = socket.read(&mut chunk).await else {
            return;
        };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let headers: HashMap<String, String> = head
                .lines()
                .skip(1)
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .collect();
            break (end + 4, headers);
        }
    };
    let length: usize = headers
        .get("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let Ok(n) = socket.read(&mut chunk).await else {
            return;
        };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body: Value =
        serde_json::from_slice(&buf[head_end..head_end + length]).unwrap_or(Value::Null);
    let n = {
        let mut seen = seen.lock().unwrap();
        seen.push((headers, body));
        seen.len() - 1
    };
    let json = |status: u16, body: &str| {
        format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    match reply(n) {
        Reply::Json(status, body) => {
            let _ = socket.write_all(json(status, body).as_bytes()).await;
        }
        Reply::Late(after, body) => {
            tokio::time::sleep(after).await;
            let _ = socket.write_all(json(200, body).as_bytes()).await;
        }
        Reply::Redirect(to) => {
            let response = format!(
                "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let _ = socket.write_all(response.as_bytes()).await;
        }
        Reply::Endless => {
            let head =
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n[";
            if socket.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let chunk = "1,".repeat(32 * 1024);
            while socket.write_all(chunk.as_bytes()).await.is_ok() {}
        }
        Reply::Hang => tokio::time::sleep(Duration::from_secs(3600)).await,
    }
}

fn webhook(name: &str, url: &str, extra: &str) -> String {
    format!("[tasks.handlers.{name}]\nkind = \"webhook\"\nurl = \"{url}\"\n{extra}\n")
}

/// A `switchboard worker` process, killed on drop.
struct Worker {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Worker {
    fn start(redis_url: &str, prefix: &str, toml: &str) -> Worker {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("worker.toml");
        std::fs::write(&path, toml).expect("config");
        let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["worker", "--config"])
            .arg(&path)
            .env_remove("SWITCHBOARD_CONFIG")
            .env("SWITCHBOARD__SERVER__HOST", "127.0.0.1")
            .env("SWITCHBOARD__SERVER__PORT", "0")
            .env("SWITCHBOARD__BROKER__KIND", "redis")
            .env("SWITCHBOARD__REDIS__URL", redis_url)
            .env("SWITCHBOARD__REDIS__PREFIX", prefix)
            .env("SWITCHBOARD__AUTH__JWT_SECRET", SECRET)
            .env("RUST_LOG", "switchboard=debug,info")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("worker.log")).expect("log"),
            ))
            .spawn()
            .expect("spawn switchboard worker");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("listening line");
        let port = line
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("worker did not start: {line:?}"));
        Worker {
            child,
            port,
            _dir: dir,
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

fn redis_query<T: redis::FromRedisValue>(url: &str, args: &[&str]) -> T {
    let client = redis::Client::open(url).expect("redis url");
    let mut con = client.get_connection().expect("redis");
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(&mut con).expect("redis command")
}

both_brokers!(a_task_is_acked_queued_run_and_done, |broker| async move {
    let hub = Hub::builder(broker).toml(ECHO).start();
    let mut c = hub.connect("alice").await;
    let ack = submit(&mut c, "echo", json!({"x": [1, 2]}), None).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let id = ack["task_id"].as_str().expect("task_id").to_owned();
    let updates = updates_until_final(&mut c, &id).await;
    assert_eq!(
        statuses(&updates),
        ["queued", "running", "done"],
        "{updates:?}"
    );
    assert_eq!(updates[2]["result"], json!({"x": [1, 2]}));
    let record = c
        .request(json!({"type": "task_status", "task_id": id}))
        .await;
    assert_eq!(record["type"], "task", "{record}");
    for (k, v) in [
        ("task_id", json!(id)),
        ("name", json!("echo")),
        ("user", json!("alice")),
        ("status", json!("done")),
        ("attempts", json!(1)),
        ("result", json!({"x": [1, 2]})),
    ] {
        assert_eq!(record[k], v, "{k} in {record}");
    }
    assert!(record["created_at"].as_u64() <= record["updated_at"].as_u64());
    let (status, api) = hub.api().await.get(&format!("/api/tasks/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(api["status"], "done");
    assert_eq!(api["result"], json!({"x": [1, 2]}));
});

both_brokers!(
    task_frames_that_do_not_fit_are_errors,
    |broker| async move {
        let hub = Hub::builder(broker).toml(ECHO).start();
        let mut c = hub.connect("alice").await;
        let e = submit(&mut c, "nope", json!({}), None).await;
        assert_eq!(
            (e["type"].as_str(), e["code"].as_str()),
            (Some("error"), Some("not_found")),
            "{e}"
        );
        for frame in [
            json!({"type": "task", "payload": {}}),
            json!({"type": "task", "name": 5}),
            json!({"type": "task", "name": "echo", "idempotency_key": 5}),
            json!({"type": "task", "name": "echo", "idempotency_key": ""}),
            json!({"type": "task_status"}),
            json!({"type": "task_cancel", "task_id": []}),
        ] {
            let e = c.request(frame.clone()).await;
            assert_eq!(e["code"], "bad_request", "{frame} -> {e}");
        }
        for kind in ["task_status", "task_cancel"] {
            let e = c.request(json!({"type": kind, "task_id": "nope"})).await;
            assert_eq!(e["code"], "not_found", "{kind}: {e}");
        }
        // Someone else's task is not found either.
        let id = submit_ok(&mut c, "echo", json!(1)).await;
        let mut bob = hub.connect("bob").await;
        for kind in ["task_status", "task_cancel"] {
            let e = bob.request(json!({"type": kind, "task_id": id})).await;
            assert_eq!(e["code"], "not_found", "{kind}: {e}");
        }
    }
);

both_brokers!(
    an_idempotency_key_returns_the_first_task_and_runs_once,
    |broker| async move {
        let hub = Hub::builder(broker).toml(ECHO).start();
        let mut alice = hub.connect("alice").await;
        let first = submit(&mut alice, "echo", json!("a"), Some("k1")).await;
        let id = first["task_id"].as_str().expect("id").to_owned();
        updates_until_final(&mut alice, &id).await;
        let again = submit(&mut alice, "echo", json!("b"), Some("k1")).await;
        assert_eq!(again["task_id"], id.as_str(), "{again}");
        // The repeat is told the first task's state, and nothing runs again.
        let state = alice.recv_type("task").await;
        assert_eq!(
            (state["task_id"].as_str(), state["status"].as_str()),
            (Some(id.as_str()), Some("done"))
        );
        assert_eq!(state["result"], "a");
        alice.expect_silence(Duration::from_millis(500)).await;
        let mut bob = hub.connect("bob").await;
        let other = submit(&mut bob, "echo", json!("c"), Some("k1")).await;
        assert_ne!(
            other["task_id"],
            id.as_str(),
            "another user's key is another task"
        );
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_receiving_one_key_at_once_run_one_task() {
    let h1 = Hub::builder(Broker::Redis).toml(ECHO).start();
    let h2 = Hub::builder(Broker::Redis)
        .toml(ECHO)
        .prefix(&h1.prefix)
        .start();
    for round in 0..5 {
        let mut a = h1.connect("alice").await;
        let mut b = h2.connect("alice").await;
        let key = format!("same-{round}");
        let fa =
            json!({"type": "task", "name": "echo", "payload": 1, "idempotency_key": key, "ref": 1});
        let fb =
            json!({"type": "task", "name": "echo", "payload": 2, "idempotency_key": key, "ref": 1});
        let (ra, rb) = tokio::join!(
            async {
                a.send(fa).await;
                a.recv_type("ack").await
            },
            async {
                b.send(fb).await;
                b.recv_type("ack").await
            }
        );
        assert_eq!(ra["task_id"], rb["task_id"], "round {round}: {ra} vs {rb}");
        let id = ra["task_id"].as_str().expect("id").to_owned();
        let updates = updates_until_final(&mut a, &id).await;
        let done = updates.iter().filter(|u| u["status"] == "done").count();
        assert_eq!(done, 1);
        let (_, record) = h1.api().await.get(&format!("/api/tasks/{id}")).await;
        assert_eq!(record["attempts"], 1, "ran once: {record}");
    }
}

both_brokers!(a_task_not_started_can_be_cancelled, |broker| async move {
    let backend = Backend::start(|_| Reply::Hang).await;
    let toml = format!("{ECHO}{}", webhook("slow", &backend.url, ""));
    // No worker in the memory hub for the first task: it stays queued.
    let idle = Hub::builder(broker)
        .toml("[tasks]\nworkers = 0\n[tasks.handlers.echo]\nkind = \"echo\"\n")
        .start();
    let mut c = idle.connect("alice").await;
    let id = submit_ok(&mut c, "echo", json!(1)).await;
    assert_eq!(c.recv_type("task").await["status"], "queued");
    let ack = c
        .request(json!({"type": "task_cancel", "task_id": id}))
        .await;
    assert_eq!(
        (ack["type"].as_str(), ack["task_id"].as_str()),
        (Some("ack"), Some(id.as_str())),
        "{ack}"
    );
    let failed = c.recv_type("task").await;
    assert_eq!(
        (failed["status"].as_str(), failed["error"].as_str()),
        (Some("failed"), Some("cancelled"))
    );
    let record = c
        .request(json!({"type": "task_status", "task_id": id}))
        .await;
    assert_eq!(
        (record["status"].as_str(), record["error"].as_str()),
        (Some("failed"), Some("cancelled"))
    );
    // A running task is not interrupted.
    let hub = Hub::builder(broker).toml(&toml).start();
    let mut c = hub.connect("alice").await;
    let id = submit_ok(&mut c, "slow", json!(1)).await;
    loop {
        let u = c.recv_type("task").await;
        if u["status"] == "running" {
            break;
        }
    }
    let e = c
        .request(json!({"type": "task_cancel", "task_id": id}))
        .await;
    assert_eq!(e["code"], "forbidden", "{e}");
});

both_brokers!(a_webhook_answer_is_the_result, |broker| async move {
    let backend = Backend::start(|_| Reply::Json(200, r#"{"report":"ready","rows":3}"#)).await;
    let toml = format!(
        "{ECHO}{}",
        webhook(
            "report",
            &backend.url,
            "headers = { X-Backend-Key = \"k-42\" }"
        )
    );
    let hub = Hub::builder(broker).toml(&toml).start();
    let mut c = hub.connect("alice").await;
    let id = submit_ok(&mut c, "report", json!({"month": 11})).await;
    let updates = updates_until_final(&mut c, &id).await;
    let done = updates.last().expect("final");
    assert_eq!(done["status"], "done", "{updates:?}");
    assert_eq!(done["result"], json!({"report": "ready", "rows": 3}));
    let requests = backend.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 1);
    let (headers, body) = &requests[0];
    assert_eq!(
        headers.get("x-switchboard-task-id").map(String::as_str),
        Some(id.as_str())
    );
    assert_eq!(
        headers.get("x-backend-key").map(String::as_str),
        Some("k-42")
    );
    assert_eq!(
        *body,
        json!({"task_id": id, "name": "report", "user": "alice", "payload": {"month": 11}})
    );
});

both_brokers!(
    failed_attempts_are_retried_then_the_task_fails_and_is_dead_lettered,
    |broker| async move {
        let backend = Backend::start(|_| Reply::Json(500, r#"{"oops":1}"#)).await;
        let toml = format!(
            "[tasks]\nworkers = 2\nmax_attempts = 2\n{}",
            webhook("report", &backend.url, "")
        );
        let hub = Hub::builder(broker).toml(&toml).start();
        let mut c = hub.connect("alice").await;
        let id = submit_ok(&mut c, "report", json!(1)).await;
        let updates = updates_until_final(&mut c, &id).await;
        assert_eq!(
            statuses(&updates),
            ["queued", "running", "running", "failed"],
            "{updates:?}"
        );
        let error = updates[3]["error"].as_str().unwrap_or_default();
        assert!(error.contains("500"), "{error}");
        assert_eq!(backend.count(), 2);
        let (_, record) = hub.api().await.get(&format!("/api/tasks/{id}")).await;
        assert_eq!(
            (record["status"].as_str(), record["attempts"].as_u64()),
            (Some("failed"), Some(2)),
            "{record}"
        );
        if broker == Broker::Redis {
            let dead: redis::streams::StreamRangeReply = redis_query(
                &redis_url(),
                &[
                    "XRANGE",
                    &format!("{}:{{tasks}}:dead", hub.prefix),
                    "-",
                    "+",
                ],
            );
            let ids: Vec<String> = dead
                .ids
                .iter()
                .filter_map(|e| {
                    e.map
                        .get("task_id")
                        .and_then(|v| redis::from_redis_value(v.clone()).ok())
                })
                .collect();
            assert_eq!(ids, std::slice::from_ref(&id));
        }
        let (_, metrics) = hub.api().await.get("/metrics").await;
        let text = metrics.as_str().unwrap_or_default();
        assert!(
            text.contains("switchboard_tasks_dead_lettered_total{name=\"report\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("switchboard_tasks_retried_total{name=\"report\"} 1"),
            "{text}"
        );
    }
);

both_brokers!(
    a_webhook_that_is_slow_or_gone_fails_the_attempt,
    |broker| async move {
        let slow = Backend::start(|_| Reply::Hang).await;
        let gone = format!("http://127.0.0.1:{}/run", free_port());
        let toml = format!(
            "[tasks]\nworkers = 2\nmax_attempts = 1\n{}{}",
            webhook("slow", &slow.url, "timeout_s = 1"),
            webhook("gone", &gone, "")
        );
        let hub = Hub::builder(broker).toml(&toml).start();
        let mut c = hub.connect("alice").await;
        for (name, expected) in [("slow", "timed out"), ("gone", "unreachable")] {
            let id = submit_ok(&mut c, name, json!(1)).await;
            let updates = updates_until_final(&mut c, &id).await;
            let last = updates.last().expect("final");
            assert_eq!(last["status"], "failed", "{name}: {updates:?}");
            let error = last["error"].as_str().unwrap_or_default();
            assert!(error.contains(expected), "{name}: {error}");
        }
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_reach_the_user_on_another_instance_and_status_after_a_reconnect() {
    let h1 = Hub::builder(Broker::Redis).toml(ECHO).start();
    let h2 = Hub::builder(Broker::Redis)
        .toml("[tasks]\nworkers = 0\n[tasks.handlers.echo]\nkind = \"echo\"\n")
        .prefix(&h1.prefix)
        .start();
    let mut here = h1.connect("alice").await;
    let mut there = h2.connect("alice").await;
    let id = submit_ok(&mut here, "echo", json!({"n": 7})).await;
    let seen = updates_until_final(&mut there, &id).await;
    assert_eq!(
        statuses(&seen),
        ["running", "done"],
        "the other connection: {seen:?}"
    );
    updates_until_final(&mut here, &id).await;
    here.close().await;
    there.close().await;
    let mut back = h2.connect("alice").await;
    let record = back
        .request(json!({"type": "task_status", "task_id": id}))
        .await;
    assert_eq!(
        (record["status"].as_str(), record["result"]["n"].as_u64()),
        (Some("done"), Some(7)),
        "{record}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchboard_worker_alone_does_the_work() {
    let toml = "[tasks]\nworkers = 0\n[tasks.handlers.echo]\nkind = \"echo\"\n";
    let hub = Hub::builder(Broker::Redis).toml(toml).start();
    let mut c = hub.connect("alice").await;
    let id = submit_ok(&mut c, "echo", json!("first")).await;
    assert_eq!(c.recv_type("task").await["status"], "queued");
    // Nothing runs it until a worker comes.
    c.expect_silence(Duration::from_millis(800)).await;
    let worker = Worker::start(&redis_url(), &hub.prefix, toml);
    let updates = updates_until_final(&mut c, &id).await;
    assert_eq!(statuses(&updates), ["running", "done"], "{updates:?}");
    let http = reqwest::Client::new();
    for path in ["/health/live", "/health/ready"] {
        let status = http
            .get(format!("http://127.0.0.1:{}{path}", worker.port))
            .send()
            .await
            .expect("worker http")
            .status();
        assert_eq!(status, 200, "{path}");
    }
    let metrics = http
        .get(format!("http://127.0.0.1:{}/metrics", worker.port))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .unwrap_or_default();
    assert!(
        metrics.contains("switchboard_tasks_succeeded_total{name=\"echo\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_whose_worker_was_killed_is_finished_by_another() {
    let backend = Backend::start(|n| {
        if n == 0 {
            Reply::Hang
        } else {
            Reply::Json(200, r#""second try""#)
        }
    })
    .await;
    let toml = format!(
        "[tasks]\nworkers = 0\nvisibility_timeout_s = 2\n{}",
        webhook("job", &backend.url, "")
    );
    let hub = Hub::builder(Broker::Redis).toml(&toml).start();
    let mut c = hub.connect("alice").await;
    let mut first = Worker::start(&redis_url(), &hub.prefix, &toml);
    let id = submit_ok(&mut c, "job", json!(1)).await;
    eventually("the first worker took the task", || {
        std::future::ready((backend.count() == 1).then_some(()))
    })
    .await;
    first.kill();
    let _second = Worker::start(&redis_url(), &hub.prefix, &toml);
    let updates = updates_until_final(&mut c, &id).await;
    let last = updates.last().expect("final");
    assert_eq!(
        (last["status"].as_str(), last["result"].as_str()),
        (Some("done"), Some("second try")),
        "{updates:?}"
    );
    let (_, record) = hub.api().await.get(&format!("/api/tasks/{id}")).await;
    assert_eq!(record["attempts"], 2, "{record}");
}

both_brokers!(
    the_pending_cap_stops_one_users_flood_not_another_user,
    |broker| async move {
        let backend = Backend::start(|_| Reply::Hang).await;
        let toml = format!(
        "[tasks]\nworkers = 4\nmax_pending_per_user = 3\n[tasks.handlers.echo]\nkind = \"echo\"\n{}",
        webhook("slow", &backend.url, "timeout_s = 60")
    );
        let hub = Hub::builder(broker).toml(&toml).start();
        let mut alice = hub.connect("alice").await;
        for _ in 0..3 {
            submit_ok(&mut alice, "slow", json!(1)).await;
        }
        let refused = submit(&mut alice, "slow", json!(1), None).await;
        assert_eq!(refused["code"], "limit_exceeded", "{refused}");
        let mut bob = hub.connect("bob").await;
        let id = submit_ok(&mut bob, "echo", json!("bob's")).await;
        let updates = updates_until_final(&mut bob, &id).await;
        assert_eq!(updates.last().expect("final")["status"], "done");
    }
);

both_brokers!(a_backend_reports_progress, |broker| async move {
    let backend = Backend::start(|_| Reply::Hang).await;
    let toml = format!(
        "[tasks]\nworkers = 1\n{}",
        webhook("slow", &backend.url, "timeout_s = 60")
    );
    let hub = Hub::builder(broker).toml(&toml).start();
    let mut c = hub.connect("alice").await;
    let id = submit_ok(&mut c, "slow", json!(1)).await;
    let api = hub.api().await;
    let (status, _) = api
        .post(
            &format!("/api/tasks/{id}/progress"),
            json!({"progress": 10}),
        )
        .await;
    // Queued or running: either is fine at this instant; wait for running.
    assert!(status == 200 || status == 409, "{status}");
    loop {
        if c.recv_type("task").await["status"] == "running" {
            break;
        }
    }
    let (status, body) = api
        .post(
            &format!("/api/tasks/{id}/progress"),
            json!({"progress": 40, "message": "half way"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let update = loop {
        let u = c.recv_type("task").await;
        if u["status"] == "progress" && u["progress"] == 40 {
            break u;
        }
    };
    assert_eq!(update["message"], "half way");
    let (_, record) = api.get(&format!("/api/tasks/{id}")).await;
    assert_eq!(record["progress"], 40);
    let (status, _) = api
        .post(
            &format!("/api/tasks/{id}/progress"),
            json!({"progress": 101}),
        )
        .await;
    assert_eq!(status, 400);
    let (status, _) = api
        .post("/api/tasks/nope/progress", json!({"progress": 1}))
        .await;
    assert_eq!(status, 404);
});

/// The payloads a backend received, in order.
fn payloads(backend: &Backend) -> Vec<Value> {
    backend
        .requests
        .lock()
        .unwrap()
        .iter()
        .map(|(_, body)| body["payload"].clone())
        .collect()
}

both_brokers!(
    idempotency_keys_of_users_whose_ids_contain_colons_do_not_alias,
    |broker| async move {
        let hub = Hub::builder(broker).toml(ECHO).start();
        let mut a = hub.connect("a").await;
        let mut ab = hub.connect("a:b").await;
        let first = submit(&mut a, "echo", json!("for a"), Some("b:c")).await;
        let second = submit(&mut ab, "echo", json!("for a:b"), Some("c")).await;
        let (first, second) = (
            first["task_id"].as_str().expect("a's task").to_owned(),
            second["task_id"].as_str().expect("a:b's task").to_owned(),
        );
        assert_ne!(first, second, "two users, two tasks");
        let done = updates_until_final(&mut a, &first).await;
        assert_eq!(done.last().expect("final")["result"], "for a");
        let done = updates_until_final(&mut ab, &second).await;
        assert_eq!(done.last().expect("final")["result"], "for a:b");
        // Nobody reads another user's task, even by its id.
        let e = ab
            .request(json!({"type": "task_status", "task_id": first}))
            .await;
        assert_eq!(e["code"], "not_found", "{e}");
    }
);

both_brokers!(
    a_task_waiting_for_a_worker_is_queued_and_can_be_cancelled,
    |broker| async move {
        let backend = Backend::start(|n| {
            if n == 0 {
                Reply::Late(Duration::from_secs(2), r#""slow""#)
            } else {
                Reply::Json(200, r#""fast""#)
            }
        })
        .await;
        let toml = format!("[tasks]\nworkers = 1\n{}", webhook("job", &backend.url, ""));
        let hub = Hub::builder(broker).toml(&toml).start();
        let mut c = hub.connect("alice").await;
        let busy = submit_ok(&mut c, "job", json!("busy")).await;
        loop {
            let u = c.recv_type("task").await;
            if u["task_id"] == busy.as_str() && u["status"] == "running" {
                break;
            }
        }
        // The only worker is busy: these two wait, `queued`.
        let waiting = submit_ok(&mut c, "job", json!("cancelled")).await;
        let next = submit_ok(&mut c, "job", json!("next")).await;
        let record = c
            .request(json!({"type": "task_status", "task_id": waiting}))
            .await;
        assert_eq!(record["status"], "queued", "{record}");
        let ack = c
            .request(json!({"type": "task_cancel", "task_id": waiting}))
            .await;
        assert_eq!(ack["type"], "ack", "a waiting task is cancelled: {ack}");
        let done = updates_until_final(&mut c, &next).await;
        assert_eq!(statuses(&done), ["queued", "running", "done"]);
        assert_eq!(payloads(&backend), [json!("busy"), json!("next")]);
        let record = c
            .request(json!({"type": "task_status", "task_id": waiting}))
            .await;
        assert_eq!(
            (record["status"].as_str(), record["attempts"].as_u64()),
            (Some("failed"), Some(0)),
            "{record}"
        );
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_longer_than_the_visibility_timeout_runs_once() {
    let backend = Backend::start(|_| Reply::Late(Duration::from_secs(4), r#""late""#)).await;
    let toml = format!(
        "[tasks]\nworkers = 2\nvisibility_timeout_s = 1\n{}",
        webhook("long", &backend.url, "timeout_s = 30")
    );
    // Two hubs on one queue: either could take the task over.
    let h1 = Hub::builder(Broker::Redis).toml(&toml).start();
    let h2 = Hub::builder(Broker::Redis)
        .prefix(&h1.prefix)
        .toml(&toml)
        .start();
    let mut c = h2.connect("alice").await;
    let id = submit_ok(&mut c, "long", json!(1)).await;
    let done = updates_until_final(&mut c, &id).await;
    assert_eq!(statuses(&done), ["queued", "running", "done"], "{done:?}");
    assert_eq!(backend.count(), 1, "the task ran once");
    let (_, record) = h1.api().await.get(&format!("/api/tasks/{id}")).await;
    assert_eq!(record["attempts"], 1, "{record}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_that_cannot_be_enqueued_leaves_nothing_behind() {
    let hub = Hub::builder(Broker::Redis).toml(ECHO).start();
    let queue = format!("{}:{{tasks}}:queue", hub.prefix);
    // The queue key is broken: every enqueue fails in Redis.
    let _: () = redis_query(&redis_url(), &["DEL", &queue]);
    let _: () = redis_query(&redis_url(), &["SET", &queue, "not a stream"]);
    let mut c = hub.connect("alice").await;
    let ack = submit(&mut c, "echo", json!(1), Some("k1")).await;
    let id = ack["task_id"].as_str().expect("task_id").to_owned();
    let updates = updates_until_final(&mut c, &id).await;
    assert_eq!(
        updates.last().expect("final")["error"],
        "not enqueued",
        "{updates:?}"
    );
    let left: Vec<String> = redis_query(
        &redis_url(),
        &["KEYS", &format!("{}:{{tasks}}:*", hub.prefix)],
    );
    assert_eq!(
        left,
        std::slice::from_ref(&queue),
        "no record, pending entry or key"
    );
    let e = c
        .request(json!({"type": "task_status", "task_id": id}))
        .await;
    assert_eq!(e["code"], "not_found", "{e}");
    // Repaired: the same key submits a new task, which runs.
    let _: () = redis_query(&redis_url(), &["DEL", &queue]);
    let _: () = redis_query(
        &redis_url(),
        &["XGROUP", "CREATE", &queue, "workers", "0", "MKSTREAM"],
    );
    let ack = submit(&mut c, "echo", json!(2), Some("k1")).await;
    let again = ack["task_id"].as_str().expect("task_id").to_owned();
    assert_ne!(again, id);
    let done = updates_until_final(&mut c, &again).await;
    assert_eq!(done.last().expect("final")["result"], 2);
}

both_brokers!(
    ended_records_drop_their_payload_and_stay_within_the_users_bytes,
    |broker| async move {
        let toml = "[tasks]\nworkers = 2\nmax_record_bytes_per_user = 100000\n\
                    [tasks.handlers.echo]\nkind = \"echo\"\n";
        let hub = Hub::builder(broker).toml(toml).start();
        let mut c = hub.connect("alice").await;
        let pad = "p".repeat(20_000);
        let mut ids = Vec::new();
        for i in 0..20 {
            let id = submit_ok(&mut c, "echo", json!({"i": i, "pad": pad})).await;
            updates_until_final(&mut c, &id).await;
            ids.push(id);
        }
        let status = |id: &String| json!({"type": "task_status", "task_id": id});
        let newest = c.request(status(&ids[19])).await;
        assert_eq!(newest["status"], "done", "{newest}");
        let oldest = c.request(status(&ids[0])).await;
        assert_eq!(oldest["code"], "not_found", "the oldest went: {oldest}");
        let mut kept = 0;
        for id in &ids {
            if c.request(status(id)).await["type"] == "task" {
                kept += 1;
            }
        }
        assert!((1..=5).contains(&kept), "{kept} records of ~20 kB kept");
        if broker == Broker::Redis {
            let record = format!("{}:{{tasks}}:task:{}", hub.prefix, ids[19]);
            let payload: Option<String> = redis_query(&redis_url(), &["HGET", &record, "payload"]);
            assert_eq!(payload, None, "an ended task keeps no payload");
        }
    }
);

both_brokers!(
    a_webhook_follows_no_redirect_and_reads_no_endless_body,
    |broker| async move {
        let elsewhere = Backend::start(|_| Reply::Json(200, r#""elsewhere""#)).await;
        let to = elsewhere.url.clone();
        let backend = Backend::start(move |n| {
            if n == 0 {
                Reply::Redirect(to.clone())
            } else {
                Reply::Endless
            }
        })
        .await;
        let toml = format!(
            "[tasks]\nworkers = 2\nmax_attempts = 1\n{}{}",
            webhook(
                "moved",
                &backend.url,
                "headers = { Authorization = \"Bearer backend-secret\" }"
            ),
            webhook("endless", &backend.url, "")
        );
        let hub = Hub::builder(broker).toml(&toml).start();
        let mut c = hub.connect("alice").await;
        let id = submit_ok(&mut c, "moved", json!(1)).await;
        let failed = updates_until_final(&mut c, &id).await;
        assert_eq!(
            failed.last().expect("final")["error"],
            "webhook answered 302"
        );
        assert_eq!(elsewhere.count(), 0, "the redirect was not followed");
        let id = submit_ok(&mut c, "endless", json!(2)).await;
        let failed = updates_until_final(&mut c, &id).await;
        assert_eq!(
            failed.last().expect("final")["error"],
            "webhook answer over 4 MiB"
        );
        let log = hub.log();
        assert!(!log.contains("backend-secret"), "a header value in the log");
    }
);
