//! The command line (docs/protocol.md §12) and config errors (§11).

mod support;

use std::process::Command;

use support::*;

fn switchboard(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    cmd.args(args).env_remove("SWITCHBOARD_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run switchboard");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn config_file(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("c.toml");
    std::fs::write(&path, text).expect("write");
    let path = path.to_str().expect("path").to_owned();
    (dir, path)
}

#[test]
fn bad_value_stops_the_start_naming_key_value_and_expectation() {
    let (_dir, path) = config_file("[limits]\nburst = \"lots\"\n");
    let (code, _, err) = switchboard(&["serve", "--config", &path], &[]);
    assert_ne!(code, 0);
    assert!(
        err.contains("limits.burst") && err.contains("lots") && err.contains("expected"),
        "{err}"
    );
}

#[test]
fn unknown_key_stops_the_start() {
    let (_dir, path) = config_file("[server]\nprot = 8000\n");
    let (code, _, err) = switchboard(&["serve", "--config", &path], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("server.prot"), "{err}");
    let (_dir, path) = config_file("[nosuch]\n");
    let (code, _, err) = switchboard(&["check-config", "--config", &path], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("nosuch"), "{err}");
}

#[test]
fn environment_overrides_are_validated_too() {
    let (_dir, path) = config_file("");
    let (code, _, err) = switchboard(
        &["serve", "--config", &path],
        &[("SWITCHBOARD__LIMITS__BURST", "x")],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("limits.burst") && err.contains("\"x\""),
        "{err}"
    );
    let (code, _, err) = switchboard(
        &["check-config", "--config", &path],
        &[("SWITCHBOARD__LIMITS__NOPE", "1")],
    );
    assert_ne!(code, 0);
    assert!(err.contains("limits.nope"), "{err}");
    let (code, _, err) = switchboard(
        &["check-config", "--config", &path],
        &[("SWITCHBOARD__SERVER__HEARTBEAT_S", "0")],
    );
    assert_ne!(code, 0);
    assert!(err.contains("server.heartbeat_s"), "{err}");
}

#[test]
fn missing_config_file_is_an_error() {
    let (code, _, err) = switchboard(&["check-config", "--config", "/nonexistent/x.toml"], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("/nonexistent/x.toml"), "{err}");
}

#[test]
fn check_config_prints_effective_values_with_secrets_masked() {
    let (_dir, path) =
        config_file("[auth]\njwt_secret = \"s3cr3t-value\"\napi_keys = [\"key-one\"]\n");
    let (code, out, err) = switchboard(
        &["check-config", "--config", &path],
        &[
            ("SWITCHBOARD__SERVER__PORT", "9123"),
            ("SWITCHBOARD__AUTH__API_KEYS", "k1,k2"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    let effective: toml::Table = toml::from_str(&out).expect("TOML output");
    assert_eq!(effective["server"]["port"].as_integer(), Some(9123));
    assert_eq!(effective["auth"]["jwt_secret"].as_str(), Some("***"));
    assert_eq!(
        effective["auth"]["api_keys"].as_array().map(|a| a.len()),
        Some(2)
    );
    assert!(!out.contains("s3cr3t-value") && !out.contains("k1") && !out.contains("key-one"));
    assert_eq!(
        effective["history"]["size"].as_integer(),
        Some(100),
        "defaults filled in"
    );
}

#[tokio::test]
async fn token_command_mints_a_token_the_hub_accepts() {
    let hub = Hub::start(Broker::Memory);
    let (code, out, err) = switchboard(
        &[
            "token", "--user", "alice", "--rooms", "chat.*", "news", "--ttl", "15m",
        ],
        &[("SWITCHBOARD__AUTH__JWT_SECRET", SECRET)],
    );
    assert_eq!(code, 0, "{err}");
    let token = out.trim();
    assert_eq!(token.split('.').count(), 3, "{out}");
    let mut c = Client::connect(&hub.ws_url(), token).await;
    assert_eq!(c.welcome["user"], "alice");
    c.join("chat.x").await;
    c.join("news").await;
    let e = c
        .request(serde_json::json!({"type": "join", "room": "other"}))
        .await;
    assert_eq!(e["code"], "forbidden");
    for ttl in ["30s", "2h", "7d"] {
        let (code, _, err) = switchboard(&["token", "--user", "u", "--ttl", ttl], &[]);
        assert_eq!(code, 0, "{ttl}: {err}");
    }
    let (code, _, _) = switchboard(&["token", "--user", "u", "--ttl", "soon"], &[]);
    assert_ne!(code, 0);
}

#[test]
fn worker_with_the_memory_broker_is_a_clear_error() {
    let (code, _, err) = switchboard(&["worker"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("broker.kind = \"redis\""), "{err}");
}

#[test]
fn handler_config_errors_name_the_key() {
    for (toml, key) in [
        ("[tasks.handlers.r]\nkind = \"nope\"\n", "tasks.handlers.r"),
        ("[tasks.handlers.r]\nkind = \"webhook\"\n", "url"),
        (
            "[tasks.handlers.r]\nkind = \"webhook\"\nurl = \"ftp://x\"\n",
            "tasks.handlers.r.url",
        ),
        (
            "[tasks.handlers.r]\nkind = \"webhook\"\nurl = \"http://x\"\ntimeout_s = 0\n",
            "tasks.handlers.r.timeout_s",
        ),
        (
            "[tasks.handlers.r]\nkind = \"echo\"\nurl = \"http://x\"\n",
            "tasks.handlers.r",
        ),
    ] {
        let (_dir, path) = config_file(toml);
        let (code, _, err) = switchboard(&["check-config", "--config", &path], &[]);
        assert_ne!(code, 0, "{toml}");
        assert!(err.contains(key), "{toml}: expected {key} in {err}");
    }
}

#[test]
fn check_config_masks_webhook_headers() {
    let toml = "[tasks.handlers.r]\nkind = \"webhook\"\nurl = \"http://x\"\nheaders = { Authorization = \"Bearer s3cr3t\" }\n";
    let (_dir, path) = config_file(toml);
    let (code, out, err) = switchboard(&["check-config", "--config", &path], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("s3cr3t") && out.contains("***"), "{out}");
}

#[test]
fn the_shipped_configs_are_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml");
    let (code, out, err) = switchboard(&["check-config", "--config", path], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("kind = \"memory\""));
    let bench = concat!(env!("CARGO_MANIFEST_DIR"), "/config/bench.toml");
    let (code, _, err) = switchboard(&["check-config", "--config", bench], &[]);
    assert_eq!(code, 0, "{err}");
}
