//! The deployment files in `deploy/`: the ConfigMap's TOML
//! (`deploy/k8s/base/switchboard.toml`) passes `switchboard check-config`
//! with the environment the hub and worker pods get; the grace periods of the
//! Deployments fit `server.shutdown_grace_s`; every metric the Grafana
//! dashboard queries is exported by a hub and a `switchboard worker` run with
//! that very config; the dashboard's shape; and `deploy/validate.sh`
//! (kustomize, Kubernetes schemas, cross-checks) when kubectl and
//! kubernetes-validate are installed.

mod support;

use std::collections::{BTreeSet, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::{json, Value};
use support::*;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

const BASE: &str = "deploy/k8s/base";
const CONFIG: &str = "deploy/k8s/base/switchboard.toml";
const DASHBOARD: &str = "deploy/grafana/switchboard.json";

/// A `switchboard` command with no `SWITCHBOARD…` variable of the caller's.
fn switchboard(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    cmd.args(args);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("SWITCHBOARD") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// The value of `key: value` on the first line of `yaml` that has it
/// (quotes removed); enough for the flat keys of our own manifests.
fn yaml_value(yaml: &str, key: &str) -> String {
    yaml.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .unwrap_or_else(|| panic!("no `{key}:` in the manifest"))
}

/// The `value:` of the env entry `name` in a Deployment's YAML.
fn env_value(yaml: &str, name: &str) -> Option<String> {
    let mut lines = yaml
        .lines()
        .skip_while(|l| l.trim() != format!("- name: {name}"));
    lines.next()?;
    lines
        .next()
        .and_then(|l| l.trim().strip_prefix("value:"))
        .map(|v| v.trim().trim_matches('"').to_owned())
}

/// `switchboard check-config` on the ConfigMap's TOML with `env`; the
/// effective config it prints.
fn effective_config(env: &[(&str, &str)]) -> toml::Table {
    let mut cmd = switchboard(&["check-config", "--config"]);
    cmd.arg(repo(CONFIG));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run check-config");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "check-config {CONFIG}: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .parse::<toml::Table>()
        .unwrap_or_else(|e| panic!("check-config printed no TOML ({e}):\n{stdout}"))
}

fn get<'a>(config: &'a toml::Table, dotted: &str) -> &'a toml::Value {
    let mut parts = dotted.split('.');
    let first = parts.next().expect("key");
    let mut value = config.get(first).unwrap_or_else(|| panic!("no {dotted}"));
    for part in parts {
        value = value.get(part).unwrap_or_else(|| panic!("no {dotted}"));
    }
    value
}

#[test]
fn the_configmap_toml_passes_check_config_as_the_pods_see_it() {
    // The kustomization generates the ConfigMap from this very file, and
    // both Deployments read it from where the ConfigMap is mounted.
    let kustomization = read(&format!("{BASE}/kustomization.yaml"));
    assert!(
        kustomization.contains("configMapGenerator:")
            && kustomization.contains("name: switchboard-config")
            && kustomization.contains("- switchboard.toml"),
        "{BASE}/kustomization.yaml must generate switchboard-config from switchboard.toml"
    );
    let hub = read(&format!("{BASE}/hub-deployment.yaml"));
    let worker = read(&format!("{BASE}/worker-deployment.yaml"));
    for (file, yaml, command) in [("hub", &hub, "serve"), ("worker", &worker, "worker")] {
        assert!(
            yaml.contains(&format!(
                r#"args: ["{command}", "--config", "/etc/switchboard/switchboard.toml""#
            )) && yaml.contains("mountPath: /etc/switchboard")
                && yaml.contains("name: switchboard-config"),
            "{file} Deployment must run `switchboard {command} --config` on the mounted ConfigMap"
        );
    }

    // The hub pod: the Secret's placeholders as env, like the Deployment.
    let secret = read(&format!("{BASE}/secret.yaml"));
    let jwt_secret = yaml_value(&secret, "jwt_secret");
    let api_keys = yaml_value(&secret, "api_keys");
    let config = effective_config(&[
        ("SWITCHBOARD__AUTH__JWT_SECRET", &jwt_secret),
        ("SWITCHBOARD__AUTH__API_KEYS", &api_keys),
    ]);
    assert_eq!(get(&config, "broker.kind").as_str(), Some("redis"));
    assert_eq!(
        get(&config, "redis.url").as_str(),
        Some("redis://redis:6379")
    );
    assert_eq!(get(&config, "server.instance_id").as_str(), Some(""));
    assert_eq!(get(&config, "server.static_dir").as_str(), Some(""));
    assert_eq!(get(&config, "server.port").as_integer(), Some(8000));
    assert_eq!(get(&config, "tasks.workers").as_integer(), Some(0));
    assert_eq!(
        get(&config, "tasks.handlers.echo.kind").as_str(),
        Some("echo")
    );
    assert_ne!(
        get(&config, "auth.jwt_secret").as_str(),
        Some(jwt_secret.as_str()),
        "check-config must mask the secret"
    );

    // Hub pods: SIGTERM comes after the preStop pause, then the hub closes
    // its sessions within server.shutdown_grace_s; the kubelet must wait
    // for both.
    let grace = get(&config, "server.shutdown_grace_s")
        .as_integer()
        .expect("grace");
    let termination: i64 = yaml_value(&hub, "terminationGracePeriodSeconds")
        .parse()
        .expect("terminationGracePeriodSeconds");
    let pre_stop: i64 = yaml_value(&hub, "command")
        .strip_prefix(r#"["sleep", ""#)
        .and_then(|rest| rest.strip_suffix(r#""]"#))
        .expect(r#"hub preStop: command: ["sleep", "N"]"#)
        .parse()
        .expect("preStop seconds");
    assert!(
        termination > pre_stop + grace,
        "hub: terminationGracePeriodSeconds {termination} <= preStop {pre_stop} + shutdown_grace_s {grace}"
    );
    assert!(
        pre_stop >= 5,
        "hub preStop pause {pre_stop} s: too short to drain"
    );

    // Worker pods: their own grace from the environment.
    let worker_grace =
        env_value(&worker, "SWITCHBOARD__SERVER__SHUTDOWN_GRACE_S").unwrap_or(grace.to_string());
    let config = effective_config(&[("SWITCHBOARD__SERVER__SHUTDOWN_GRACE_S", &worker_grace)]);
    let worker_grace = get(&config, "server.shutdown_grace_s")
        .as_integer()
        .expect("grace");
    let termination: i64 = yaml_value(&worker, "terminationGracePeriodSeconds")
        .parse()
        .expect("terminationGracePeriodSeconds");
    assert!(
        termination > worker_grace,
        "worker: terminationGracePeriodSeconds {termination} <= shutdown_grace_s {worker_grace}"
    );
}

/// Every string under an `expr`, `query` or `definition` key: the
/// dashboard's PromQL, panels and variables alike.
fn queries(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "query" | "definition", Value::String(s)) => out.push(s.clone()),
                    _ => queries(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| queries(v, out)),
        _ => {}
    }
}

/// The `switchboard_…` metric names in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("switchboard_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

fn dashboard() -> Value {
    serde_json::from_str(&read(DASHBOARD)).expect("dashboard JSON")
}

#[test]
fn the_dashboard_is_grafana_10_json_on_a_prometheus_datasource_variable() {
    let d = dashboard();
    assert!(
        d["schemaVersion"].as_u64().unwrap_or(0) >= 38,
        "schemaVersion {} (Grafana 10 writes 38+)",
        d["schemaVersion"]
    );
    assert_eq!(d["uid"], "switchboard");
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let ds = vars
        .iter()
        .find(|v| v["type"] == "datasource" && v["query"] == "prometheus")
        .expect("a datasource variable of type prometheus");
    let ds_ref = json!({"type": "prometheus", "uid": format!("${{{}}}", ds["name"].as_str().expect("name"))});
    for v in vars.iter().filter(|v| v["type"] == "query") {
        assert_eq!(v["datasource"], ds_ref, "variable {}", v["name"]);
    }
    let panels = d["panels"].as_array().expect("panels");
    let mut ids = HashSet::new();
    let mut charts = 0;
    for p in panels {
        let title = p["title"].as_str().unwrap_or_default();
        assert!(
            ids.insert(p["id"].as_u64().expect("id")),
            "duplicate id: {title}"
        );
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_u64().expect("x"), g["w"].as_u64().expect("w"));
        assert!(
            x + w <= 24 && g["h"].as_u64().unwrap_or(0) > 0,
            "{title}: {g}"
        );
        if p["type"] == "row" {
            continue;
        }
        charts += 1;
        assert_eq!(p["datasource"], ds_ref, "{title}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            assert_eq!(t["datasource"], ds_ref, "{title}");
            let expr = t["expr"].as_str().expect("expr");
            assert!(
                !metric_names(expr).is_empty(),
                "{title}: {expr} queries no switchboard metric"
            );
        }
    }
    assert!(charts >= 15, "{charts} panels");
    // What the issue asks to see, by metric.
    let mut all = Vec::new();
    queries(&d, &mut all);
    let used: BTreeSet<String> = all.iter().flat_map(|q| metric_names(q)).collect();
    for wanted in [
        "switchboard_connections_open",
        "switchboard_connections_accepted_total",
        "switchboard_connections_rejected_total",
        "switchboard_messages_delivered_total",
        "switchboard_delivery_latency_seconds_bucket",
        "switchboard_errors_total",
        "switchboard_slow_consumer_closes_total",
        "switchboard_redis_reconnects_total",
        "switchboard_fanout_dropped_total",
        "switchboard_tasks_submitted_total",
        "switchboard_tasks_succeeded_total",
        "switchboard_tasks_failed_total",
        "switchboard_tasks_retried_total",
        "switchboard_tasks_dead_lettered_total",
        "switchboard_task_run_seconds_bucket",
        "switchboard_tasks_queued",
        "switchboard_tasks_running",
        "switchboard_tasks_dead_letters",
    ] {
        assert!(
            used.contains(wanted),
            "the dashboard does not show {wanted}"
        );
    }
    assert!(
        all.iter().any(|q| q.contains("histogram_quantile")
            && q.contains("switchboard_delivery_latency_seconds_bucket")),
        "delivery latency quantiles"
    );
}

/// A `switchboard worker` process, killed on drop.
struct Worker {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Worker {
    fn start(config: &Path, redis_url: &str, prefix: &str, env: &[(&str, &str)]) -> Worker {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = switchboard(&["worker", "--workers", "2", "--config"]);
        cmd.arg(config)
            .env("SWITCHBOARD__SERVER__HOST", "127.0.0.1")
            .env("SWITCHBOARD__SERVER__PORT", "0")
            .env("SWITCHBOARD__REDIS__URL", redis_url)
            .env("SWITCHBOARD__REDIS__PREFIX", prefix)
            .env("RUST_LOG", "switchboard=debug,info")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("worker.log")).expect("log"),
            ));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn switchboard worker");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("listening line");
        let port = line
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| {
                let log = std::fs::read_to_string(dir.path().join("worker.log"));
                panic!(
                    "worker did not start: {line:?}\n{}",
                    log.unwrap_or_default()
                )
            });
        Worker { child, port, dir }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.path().join("worker.log"));
            eprintln!("---- worker log ----\n{}", log.unwrap_or_default());
        }
    }
}

/// The metric families of a Prometheus text exposition (`# TYPE` lines).
async fn exported(http: &reqwest::Client, url: &str) -> BTreeSet<String> {
    let text = http
        .get(url)
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text");
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            names.insert(name.to_owned());
            if kind == "histogram" || kind == "summary" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    names
}

/// The task frames of `task_id` until it is done or failed; the last one.
async fn final_update(c: &mut Client, task_id: &str) -> Value {
    loop {
        let frame = c.recv_type("task").await;
        if frame["task_id"] == task_id
            && matches!(frame["status"].as_str(), Some("done" | "failed"))
        {
            return frame;
        }
    }
}

/// A vector metric (one with labels) is in the exposition only once some
/// label value was used, so the test first does what moves every metric:
/// the hub and a worker run the ConfigMap's TOML (pods' env: Redis URL,
/// secrets), as in the cluster, and a client connects, publishes, errs, runs
/// a task that succeeds and one that fails for good, is refused and kicked;
/// the subscriber's Redis connection is killed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_queries_is_exported() {
    let mut wanted = Vec::new();
    queries(&dashboard(), &mut wanted);
    let wanted: BTreeSet<String> = wanted.iter().flat_map(|q| metric_names(q)).collect();
    assert!(!wanted.is_empty());

    let redis = PrivateRedis::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("switchboard.toml");
    let gone = format!("http://127.0.0.1:{}/run", free_port());
    std::fs::write(
        &config,
        format!(
            "{}\n[tasks.handlers.fail]\nkind = \"webhook\"\nurl = \"{gone}\"\ntimeout_s = 1\n",
            read(CONFIG)
        ),
    )
    .expect("config");
    let attempts = ("SWITCHBOARD__TASKS__MAX_ATTEMPTS", "2");
    let hub = Hub::builder(Broker::Redis)
        .redis_url(&redis.url())
        .toml(&std::fs::read_to_string(&config).expect("config"))
        .env(attempts.0, attempts.1)
        .start();
    let worker = Worker::start(&config, &redis.url(), &hub.prefix, &[attempts]);

    let refused = Client::connect_raw(&format!("{}?token=nope", hub.ws_url()), &[]).await;
    drop(refused);
    let mut alice = hub.connect("alice").await;
    alice.join("lobby").await;
    alice.publish("lobby", json!({"text": "hi"})).await;
    alice.recv_type("message").await;
    let error = alice
        .request(json!({"type": "join", "room": "lobby", "since": "yesterday"}))
        .await;
    assert_eq!(error["code"], "bad_request", "{error}");
    for (name, status) in [("echo", "done"), ("fail", "failed")] {
        let ack = alice
            .request(json!({"type": "task", "name": name, "payload": {"n": 1}}))
            .await;
        let id = ack["task_id"].as_str().expect("task_id").to_owned();
        let last = final_update(&mut alice, &id).await;
        assert_eq!(last["status"], status, "{name}: {last}");
    }
    let api = hub.api().await;
    let (status, _) = api.post("/api/users/alice/disconnect", json!({})).await;
    assert_eq!(status, 200);
    redis.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]);

    let http = reqwest::Client::new();
    let hub_metrics = hub.http("/metrics");
    let worker_metrics = format!("http://127.0.0.1:{}/metrics", worker.port);
    // Per-recipient counters are published once a second, the task gauges
    // by the workers' housekeeping: wait for them, a while.
    let deadline = std::time::Instant::now() + WAIT;
    let have = loop {
        let mut have = exported(&http, &hub_metrics).await;
        have.extend(exported(&http, &worker_metrics).await);
        let missing: Vec<&String> = wanted.iter().filter(|m| !have.contains(*m)).collect();
        if missing.is_empty() {
            break have;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the dashboard queries metrics that neither the hub nor the worker exports: {missing:?}\nexported: {have:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    // What is exported and not on the dashboard (information, not a failure).
    let base = |m: &String| {
        ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| m.strip_suffix(s))
            .map(str::to_owned)
            .unwrap_or_else(|| m.clone())
    };
    let shown: BTreeSet<String> = wanted.iter().map(base).collect();
    let unshown: Vec<&String> = have
        .iter()
        .filter(|m| m.starts_with("switchboard_") && !shown.contains(&base(m)))
        .collect();
    if !unshown.is_empty() {
        eprintln!("note: exported but not on the dashboard: {unshown:?}");
    }
}

/// `deploy/validate.sh` when its tools are here (CI installs them; on a bare
/// machine the script would apt-get and pip-install them, which a test must
/// not do).
#[test]
fn validate_sh_passes_when_kubectl_and_kubernetes_validate_are_installed() {
    let on_path = |tool: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let kubectl = std::env::var_os("KUBECTL").is_some() || on_path("kubectl");
    let validator = std::env::var_os("KUBERNETES_VALIDATE").is_some()
        || on_path("kubernetes-validate")
        || repo("target/deploy-venv/bin/kubernetes-validate").exists();
    if !(kubectl && validator) {
        eprintln!(
            "SKIPPED deploy/validate.sh: needs kubectl (found: {kubectl}) and kubernetes-validate \
             (found: {validator}); run `bash deploy/validate.sh` to install them and validate"
        );
        return;
    }
    let out = Command::new("bash")
        .arg(repo("deploy/validate.sh"))
        .current_dir(repo(""))
        .output()
        .expect("run deploy/validate.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "deploy/validate.sh failed:\n{stdout}\n{stderr}"
    );
    eprintln!("{stdout}");
}
