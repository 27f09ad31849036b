//! The HTTP API (docs/protocol.md §9, docs/openapi.yaml), against both brokers: every endpoint
//! with and without a key, JSON errors, and what clients receive.

mod support;

use serde_json::{json, Value};
use support::*;

const ADMIN: [(&str, &str); 7] = [
    ("POST", "/api/publish"),
    ("GET", "/api/rooms/lobby/presence"),
    ("GET", "/api/rooms/lobby/history"),
    ("GET", "/api/users/alice/connections"),
    ("POST", "/api/users/alice/disconnect"),
    ("GET", "/api/tasks/abc"),
    ("GET", "/api/stats"),
];

both_brokers!(admin_endpoints_need_a_valid_key, |broker| async move {
    let hub = Hub::start(broker);
    let api = hub.api().await;
    for (method, path) in ADMIN {
        for key in [None, Some("wrong-key")] {
            let mut request = match method {
                "POST" => api
                    .http
                    .post(hub.http(path))
                    .json(&json!({"room": "lobby", "data": 1})),
                _ => api.http.get(hub.http(path)),
            };
            if let Some(key) = key {
                request = request.bearer_auth(key);
            }
            let (status, body) = api.call(request).await;
            assert_eq!(status, 401, "{method} {path} with {key:?}: {body}");
            assert_eq!(body["error"], "unauthorized", "{body}");
            assert!(body["message"].is_string());
        }
    }
});

#[tokio::test]
async fn without_configured_keys_the_api_says_it_is_closed() {
    let hub = Hub::builder(Broker::Memory)
        .env("SWITCHBOARD__AUTH__API_KEYS", "")
        .start();
    let api = hub.api().await;
    let (status, body) = api
        .call(api.http.get(hub.http("/api/stats")).bearer_auth("any-key"))
        .await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"], "unauthorized");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("admin API is closed") && message.contains("auth.api_keys"),
        "{body}"
    );
    // With keys configured, a wrong one is told apart from a closed API.
    let hub = Hub::start(Broker::Memory);
    let (_, body) = api
        .call(
            api.http
                .get(hub.http("/api/stats"))
                .bearer_auth("wrong-key"),
        )
        .await;
    assert!(
        !body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("closed"),
        "{body}"
    );
}

#[tokio::test]
async fn dev_tokens_off_the_path_says_how_to_turn_them_on() {
    let hub = Hub::start(Broker::Memory);
    let api = hub.api().await;
    let (status, body) = api
        .call(
            api.http
                .post(hub.http("/dev/token"))
                .json(&json!({"user": "alice"})),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("auth.dev_tokens = true"),
        "{body}"
    );
}

#[tokio::test]
async fn dev_tokens_refuse_a_name_saying_why() {
    let hub = Hub::builder(Broker::Memory)
        .env("SWITCHBOARD__AUTH__DEV_TOKENS", "true")
        .start();
    let api = hub.api().await;
    let ask = |user: &'static str| {
        api.http
            .post(hub.http("/dev/token"))
            .json(&json!({ "user": user }))
    };
    let (status, body) = api.call(ask("Alice Smith")).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "bad_request");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("no spaces"),
        "{body}"
    );
    let (status, body) = api.call(ask("Zoë")).await;
    assert_eq!(status, 200, "a non-ASCII letter is a letter: {body}");
    assert_eq!(body["user"], "Zoë");
}

both_brokers!(publish_to_room_user_and_everyone, |broker| async move {
    let hub = Hub::start(broker);
    let api = hub.api().await;
    let mut alice = hub.connect("alice").await;
    let mut bob = hub.connect("bob").await;
    alice.join("lobby").await;

    let (status, body) = api
        .post(
            "/api/publish",
            json!({"room": "lobby", "data": {"text": "deploy"}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let m = alice.recv_type("message").await;
    assert_eq!(m["id"], body["id"]);
    assert_eq!(m["from"], "server");
    assert_eq!(m["room"], "lobby");
    assert_eq!(m["data"], json!({"text": "deploy"}));

    let (status, body) = api
        .post("/api/publish", json!({"user": "bob", "data": [1, 2]}))
        .await;
    assert_eq!(status, 200, "{body}");
    let d = bob.recv().await;
    assert_eq!(d["type"], "direct");
    assert_eq!(d["id"], body["id"]);
    assert_eq!(d["from"], "server");
    assert_eq!(d["data"], json!([1, 2]));

    let (status, body) = api
        .post(
            "/api/publish",
            json!({"broadcast": true, "data": "maintenance"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    for c in [&mut alice, &mut bob] {
        let b = c.recv_type("broadcast").await;
        assert_eq!(b["id"], body["id"]);
        assert_eq!(b["data"], "maintenance");
        assert!(b["ts"].is_u64());
        assert!(b.get("from").is_none());
    }
});

both_brokers!(malformed_bodies_are_400_bad_request, |broker| async move {
    let hub = Hub::start(broker);
    let api = hub.api().await;
    for body in [
        "not json",
        "[]",
        r#"{"data": 1}"#,
        r#"{"room": "lobby"}"#,
        r#"{"room": "lobby", "user": "bob", "data": 1}"#,
        r#"{"room": "bad room", "data": 1}"#,
        r#"{"room": "lobby", "data": 1, "extra": true}"#,
        r#"{"broadcast": false, "data": 1}"#,
        // A null target is refused, not taken for absent.
        r#"{"broadcast": null, "user": "bob", "data": 1}"#,
        r#"{"room": null, "user": "bob", "data": 1}"#,
        r#"{"room": "lobby", "user": null, "data": 1}"#,
    ] {
        let request = api
            .http
            .post(hub.http("/api/publish"))
            .bearer_auth(API_KEY)
            .header("content-type", "application/json")
            .body(body);
        let (status, reply) = api.call(request).await;
        assert_eq!(status, 400, "{body} -> {reply}");
        assert_eq!(reply["error"], "bad_request", "{reply}");
        assert!(reply["message"].is_string());
    }
    let (status, reply) = api.get("/api/rooms/bad%20room/presence").await;
    assert_eq!(
        (status, reply["error"].clone()),
        (400, json!("bad_request"))
    );
    let (status, reply) = api.get("/api/rooms/lobby/history?since=nope").await;
    assert_eq!(
        (status, reply["error"].clone()),
        (400, json!("bad_request"))
    );
    let (status, reply) = api.get("/api/rooms/lobby/history?limit=-1").await;
    assert_eq!(
        (status, reply["error"].clone()),
        (400, json!("bad_request"))
    );
});

both_brokers!(presence_endpoint, |broker| async move {
    let hub = Hub::start(broker);
    let api = hub.api().await;
    let mut a1 = hub.connect("alice").await;
    let mut a2 = hub.connect("alice").await;
    a1.join("lobby").await;
    a2.join("lobby").await;
    let mut bob = hub.connect("bob").await;
    bob.join("lobby").await;
    let (status, body) = api.get("/api/rooms/lobby/presence").await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"room": "lobby", "users": [
            {"user": "alice", "connections": 2},
            {"user": "bob", "connections": 1}
        ]})
    );
    let (_, body) = api.get("/api/rooms/empty/presence").await;
    assert_eq!(body, json!({"room": "empty", "users": []}));
});

both_brokers!(history_endpoint_since_and_limit, |broker| async move {
    let hub = Hub::builder(broker).toml("[history]\nsize = 5").start();
    let api = hub.api().await;
    let mut ids = Vec::new();
    for n in 0..8 {
        ids.push(api.publish_room("h", json!({"n": n})).await);
    }
    let ns = |body: &Value| -> Vec<u64> {
        body["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| m["data"]["n"].as_u64().expect("n"))
            .collect()
    };
    let (status, body) = api.get("/api/rooms/h/history").await;
    assert_eq!(status, 200);
    assert_eq!(body["room"], "h");
    let all = ns(&body);
    assert_eq!(
        all,
        (8 - all.len() as u64..8).collect::<Vec<_>>(),
        "the newest, oldest first"
    );
    assert!(all.len() == 5, "limit defaults to history.size: {all:?}");
    let m = &body["messages"][0];
    assert!(m["id"].is_string() && m["from"] == "server" && m["room"] == "h" && m["ts"].is_u64());

    let (_, body) = api
        .get(&format!("/api/rooms/h/history?since={}", ids[5]))
        .await;
    assert_eq!(ns(&body), vec![6, 7]);
    let (_, body) = api.get("/api/rooms/h/history?limit=2").await;
    assert_eq!(
        ns(&body),
        vec![6, 7],
        "the latest ones when more are retained"
    );
    let (_, body) = api.get("/api/rooms/h/history?limit=1000").await;
    assert_eq!(ns(&body).len(), 5, "limit is capped at history.size");
    let (_, body) = api.get("/api/rooms/never/history").await;
    assert_eq!(body, json!({"room": "never", "messages": []}));
});

both_brokers!(user_connections_and_disconnect, |broker| async move {
    let hub = Hub::start(broker);
    let api = hub.api().await;
    let mut a1 = hub.connect("alice").await;
    let mut a2 = hub.connect("alice").await;
    let mut bob = hub.connect("bob").await;
    let (status, body) = api.get("/api/users/alice/connections").await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"user": "alice", "connections": 2}));
    let (status, body) = api.post("/api/users/alice/disconnect", json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"disconnected": 2}));
    for a in [&mut a1, &mut a2] {
        assert_eq!(
            a.recv_close().await,
            Closed {
                code: 1008,
                reason: "kicked".into()
            }
        );
    }
    assert_eq!(bob.request(json!({"type": "ping"})).await["type"], "pong");
    eventually("alice has no connections", || async {
        let (_, body) = api.get("/api/users/alice/connections").await;
        (body["connections"] == 0).then_some(())
    })
    .await;
    let (_, body) = api.get("/api/users/nobody/connections").await;
    assert_eq!(body, json!({"user": "nobody", "connections": 0}));
});

both_brokers!(an_unknown_task_is_404, |broker| async move {
    let hub = Hub::start(broker);
    let (status, body) = hub.api().await.get("/api/tasks/abc").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"], "not_found");
});

both_brokers!(stats_endpoint, |broker| async move {
    let hub = Hub::start(broker);
    let api = hub.api().await;
    let mut a = hub.connect("alice").await;
    a.join("r1").await;
    let _b = hub.connect("bob").await;
    // The cluster-wide numbers come with the instances' heartbeats.
    let body = eventually("the stats count both users", || async {
        let (status, body) = api.get("/api/stats").await;
        assert_eq!(status, 200, "{body}");
        (body["users"] == 2 && body["rooms"] == 1).then_some(body)
    })
    .await;
    assert_eq!(body["instance"], a.welcome["instance"]);
    assert_eq!(body["connections"], 2);
    assert_eq!(body["instances"], 1);
});

both_brokers!(health_and_metrics_need_no_key, |broker| async move {
    let hub = Hub::start(broker);
    let api = hub.api().await;
    for path in ["/health/live", "/health/ready", "/health"] {
        // Ready once the Redis subscriber has connected (at once for memory).
        eventually(path, || async {
            let (status, _) = api.call(api.http.get(hub.http(path))).await;
            (status == 200).then_some(())
        })
        .await;
    }
    let mut c = hub.connect("alice").await;
    c.join("m").await;
    c.publish("m", json!(1)).await;
    c.recv_type("message").await;
    c.send_text("nope").await;
    c.recv_type("error").await;
    let mut refused = Client::connect_raw(&format!("{}?token=bad", hub.ws_url()), &[]).await;
    refused.recv_close().await;
    let text = eventually("metrics show the delivery", || async {
        let (_, body) = api.call(api.http.get(hub.http("/metrics"))).await;
        let text = body.as_str().unwrap_or_default().to_owned();
        text.contains("switchboard_messages_delivered_total 1")
            .then_some(text)
    })
    .await;
    for needle in [
        "switchboard_connections_open 1",
        "switchboard_connections_accepted_total 1",
        "switchboard_connections_rejected_total{reason=\"unauthorized\"} 1",
        "switchboard_frames_received_total{type=\"join\"} 1",
        "switchboard_frames_received_total{type=\"invalid\"} 1",
        "switchboard_delivery_latency_seconds_bucket",
        "switchboard_delivery_latency_seconds_count 1",
        "switchboard_errors_total{code=\"bad_request\"} 1",
        "switchboard_slow_consumer_closes_total 0",
    ] {
        assert!(text.contains(needle), "metrics lack {needle}:\n{text}");
    }
});

both_brokers!(unknown_paths_are_json_404, |broker| async move {
    let hub = Hub::start(broker);
    let api = hub.api().await;
    let (status, body) = api.get("/nope").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"], "not_found");
});

both_brokers!(
    a_method_a_path_does_not_take_is_405_with_allow,
    |broker| async move {
        let hub = Hub::start(broker);
        let api = hub.api().await;
        for (method, path, allow) in [
            ("DELETE", "/api/stats", "GET"),
            ("GET", "/api/publish", "POST"),
            ("PUT", "/api/rooms/lobby/history", "GET"),
            ("POST", "/health/live", "GET"),
            ("TRACE", "/metrics", "GET"),
            ("POST", "/openapi.yaml", "GET"),
        ] {
            let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
            let request = api
                .http
                .request(method.clone(), hub.http(path))
                .bearer_auth(API_KEY);
            let response = request.send().await.expect("http");
            let status = response.status().as_u16();
            let allowed = response
                .headers()
                .get("allow")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body: Value = response.json().await.expect("a JSON body");
            assert_eq!(
                (status, allowed.as_deref(), &body["error"]),
                (405, Some(allow), &json!("method_not_allowed")),
                "{method} {path}: {body}"
            );
        }
        // The API key is still checked first.
        let (status, body) = api.call(api.http.delete(hub.http("/api/stats"))).await;
        assert_eq!((status, &body["error"]), (401, &json!("unauthorized")));
    }
);

both_brokers!(
    the_openapi_document_is_served_without_a_key,
    |broker| async move {
        let hub = Hub::start(broker);
        let response = reqwest::get(hub.http("/openapi.yaml")).await.expect("http");
        assert_eq!(response.status().as_u16(), 200);
        let content_type = response.headers().get("content-type").cloned();
        assert_eq!(
            content_type.as_ref().and_then(|v| v.to_str().ok()),
            Some("application/yaml")
        );
        let text = response.text().await.expect("body");
        let in_repo =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml"))
                .expect("docs/openapi.yaml");
        assert_eq!(text, in_repo, "the served document is docs/openapi.yaml");
    }
);

#[tokio::test]
async fn an_oversized_dev_token_body_is_a_json_413() {
    let hub = Hub::builder(Broker::Memory)
        .toml("[auth]\ndev_tokens = true")
        .start();
    let api = hub.api().await;
    let ask = |user: String| {
        api.http
            .post(hub.http("/dev/token"))
            .json(&json!({ "user": user }))
    };
    // Like every other error of the API (it was actix's plain-text 413).
    let (status, body) = api.call(ask("a".repeat(300_000))).await;
    assert_eq!(
        (status, &body["error"]),
        (413, &json!("too_large")),
        "{body}"
    );
    // 64 characters of 4 bytes each still fit.
    let (status, body) = api.call(ask("𝒜".repeat(64))).await;
    assert_eq!(status, 200, "{body}");
}
