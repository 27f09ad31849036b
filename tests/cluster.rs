//! Several hubs on one Redis behave as one, and survive Redis and instance
//! failures (docs/protocol.md §9, §10). Every test runs twice: on a private
//! standalone `redis-server` and on a Redis Cluster of three primaries, each
//! started for the test on free ports (failovers, slot migrations and
//! Sentinel: `tests/failover.rs`).

mod support;

use std::time::Duration;

use serde_json::json;
use support::deployments::{Cluster, Deployment};
use support::*;

/// Runs a test on a standalone Redis and on a Redis Cluster.
macro_rules! on_standalone_and_cluster {
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn standalone() {
                ($body)(Deployment::Standalone(PrivateRedis::start())).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn cluster() {
                ($body)(Deployment::Cluster(Cluster::start(3, 0))).await
            }
        }
    };
}

/// Two hubs sharing one prefix on `redis`.
fn pair(redis: &Deployment, toml: &str) -> (Hub, Hub) {
    let a = Hub::builder(Broker::Redis).redis(redis).toml(toml).start();
    let b = Hub::builder(Broker::Redis)
        .redis(redis)
        .toml(toml)
        .prefix(&a.prefix)
        .start();
    (a, b)
}

/// Publishes probes from `from` until one reaches `to` (another instance).
async fn resumed(from: &mut Client, to: &mut Client, room: &str) -> serde_json::Value {
    for _ in 0..40 {
        let ack = from
            .request(json!({"type": "publish", "room": room, "data": "probe"}))
            .await;
        if ack["type"] != "ack" {
            tokio::time::sleep(Duration::from_millis(250)).await;
            continue;
        }
        loop {
            match to.next_event(Duration::from_millis(250)).await {
                Some(Ok(m)) if m["type"] == "message" && m["data"] == "probe" => return m,
                Some(Ok(_)) => continue,
                _ => break,
            }
        }
    }
    panic!("cross-instance delivery did not resume");
}

on_standalone_and_cluster!(
    room_direct_and_broadcast_cross_instances,
    |redis: Deployment| async move {
        let (h1, h2) = pair(&redis, "");
        assert_ne!(
            h1.connect("x").await.welcome["instance"],
            h2.connect("y").await.welcome["instance"]
        );
        let mut alice = h1.connect("alice").await;
        let mut bob = h2.connect("bob").await;
        alice.join("lobby").await;
        bob.join("lobby").await;
        let id = alice.publish("lobby", json!({"hello": "from h1"})).await;
        let m = bob.recv_type("message").await;
        assert_eq!(m["id"], id.as_str());
        assert_eq!(m["from"], "alice");
        let ack = bob
            .request(json!({"type": "direct", "to": "alice", "data": "psst"}))
            .await;
        assert_eq!(ack["type"], "ack");
        let d = alice.recv_type("direct").await;
        assert_eq!(
            (d["from"].clone(), d["data"].clone()),
            (json!("bob"), json!("psst"))
        );
        let api = h2.api().await;
        let (status, _) = api
            .post("/api/publish", json!({"broadcast": true, "data": "all"}))
            .await;
        assert_eq!(status, 200);
        assert_eq!(alice.recv_type("broadcast").await["data"], "all");
        assert_eq!(bob.recv_type("broadcast").await["data"], "all");
    }
);

on_standalone_and_cluster!(
    presence_and_joined_left_across_instances,
    |redis: Deployment| async move {
        let (h1, h2) = pair(&redis, "");
        let mut alice = h1.connect("alice").await;
        alice.join("r").await;
        assert_eq!(alice.recv_type("joined").await["user"], "alice");
        let mut bob = h2.connect("bob").await;
        bob.join("r").await;
        assert_eq!(alice.recv_type("joined").await["user"], "bob");
        let p = alice
            .request(json!({"type": "presence", "room": "r"}))
            .await;
        assert_eq!(
            p["users"],
            json!([{"user": "alice", "connections": 1}, {"user": "bob", "connections": 1}])
        );
        let (_, body) = h1.api().await.get("/api/rooms/r/presence").await;
        assert_eq!(body["users"].as_array().map(Vec::len), Some(2));
        bob.close().await;
        assert_eq!(
            alice.recv_type("left").await,
            json!({"type": "left", "room": "r", "user": "bob"})
        );
    }
);

on_standalone_and_cluster!(
    history_and_recovery_work_from_any_instance,
    |redis: Deployment| async move {
        let (h1, h2) = pair(&redis, "");
        let mut alice = h1.connect("alice").await;
        alice.join("h").await;
        let first = alice.publish("h", json!(0)).await;
        alice.publish("h", json!(1)).await;
        alice.publish("h", json!(2)).await;
        let mut bob = h2.connect("bob").await;
        let ack = bob
            .request(json!({"type": "join", "room": "h", "since": first}))
            .await;
        assert_eq!(ack["recovered"], true);
        assert_eq!(bob.recv_type("message").await["data"], 1);
        assert_eq!(bob.recv_type("message").await["data"], 2);
    }
);

on_standalone_and_cluster!(
    a_retried_publish_with_its_idempotency_key_is_stored_once,
    |redis: Deployment| async move {
        let (h1, h2) = pair(&redis, "");
        let mut alice = h1.connect("alice").await;
        let mut bob = h2.connect("bob").await;
        alice.join("once").await;
        bob.join("once").await;
        let publish =
            json!({"type": "publish", "room": "once", "data": "hello", "idempotency_key": "k-1"});
        let first = alice.request(publish.clone()).await;
        let again = alice.request(publish.clone()).await;
        assert_eq!(first["type"], "ack", "{first}");
        assert_eq!(again["id"], first["id"], "the retry answers the first id");
        // From another connection of another instance, the same user and key.
        let mut alice2 = h2.connect("alice").await;
        alice2.join("once").await;
        assert_eq!(alice2.request(publish).await["id"], first["id"]);
        let (_, history) = h2.api().await.get("/api/rooms/once/history").await;
        assert_eq!(
            history["messages"].as_array().map(Vec::len),
            Some(1),
            "{history}"
        );
        assert_eq!(bob.recv_type("message").await["id"], first["id"]);
        bob.expect_silence(Duration::from_millis(300)).await;
        // Another user's equal key is another publish.
        let other = bob
            .request(json!({"type": "publish", "room": "once", "data": "mine", "idempotency_key": "k-1"}))
            .await;
        assert_ne!(other["id"], first["id"]);
    }
);

on_standalone_and_cluster!(
    user_limit_holds_cluster_wide_under_concurrent_connects,
    |redis: Deployment| async move {
        let (h1, h2) = pair(&redis, "[limits]\nmax_connections_per_user = 3");
        let mut attempts = Vec::new();
        for i in 0..16 {
            let url = if i % 2 == 0 { h1.ws_url() } else { h2.ws_url() };
            attempts.push(tokio::spawn(async move {
                let mut c =
                    Client::connect_raw(&format!("{url}?token={}", token("carol")), &[]).await;
                match c.next_event(WAIT).await {
                    Some(Ok(w)) if w["type"] == "welcome" => Ok(c),
                    Some(Err(closed)) => Err(closed),
                    other => panic!("unexpected {other:?}"),
                }
            }));
        }
        let mut accepted = Vec::new();
        let mut refused = 0;
        for a in attempts {
            match a.await.expect("task") {
                Ok(c) => accepted.push(c),
                Err(closed) => {
                    assert_eq!(
                        closed,
                        Closed {
                            code: 1008,
                            reason: "connection limit".into()
                        }
                    );
                    refused += 1;
                }
            }
        }
        assert_eq!(accepted.len(), 3, "accepted across the cluster");
        assert_eq!(refused, 13);
        let (_, body) = h1.api().await.get("/api/users/carol/connections").await;
        assert_eq!(body["connections"], 3);
    }
);

on_standalone_and_cluster!(
    kick_reaches_every_instance,
    |redis: Deployment| async move {
        let (h1, h2) = pair(&redis, "");
        let mut a1 = h1.connect("alice").await;
        let mut a2 = h2.connect("alice").await;
        let mut bob = h2.connect("bob").await;
        let (status, body) = h1
            .api()
            .await
            .post("/api/users/alice/disconnect", json!({}))
            .await;
        assert_eq!(status, 200);
        assert_eq!(body["disconnected"], 2);
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
    }
);

on_standalone_and_cluster!(
    stats_add_up_the_instances_heartbeats,
    |redis: Deployment| async move {
        let (h1, h2) = pair(&redis, "[redis]\ninstance_ttl_s = 3");
        let mut a = h1.connect("alice").await;
        a.join("s1").await;
        let mut b = h2.connect("bob").await;
        b.join("s2").await;
        let api = h1.api().await;
        let body = eventually("the heartbeats carry both connections", || async {
            let (_, body) = api.get("/api/stats").await;
            (body["cluster_connections"] == 2 && body["rooms"] == 2).then_some(body)
        })
        .await;
        assert_eq!(body["connections"], 1, "this instance's: {body}");
        assert_eq!(body["users"], 2, "{body}");
        assert_eq!(body["instances"], 2, "{body}");
        assert_eq!(body["local_rooms"], 1, "{body}");
    }
);

on_standalone_and_cluster!(
    a_backend_publishes_straight_into_redis,
    |redis: Deployment| async move {
        let (h1, h2) = pair(&redis, "");
        let mut alice = h1.connect("alice").await;
        let mut bob = h2.connect("bob").await;
        alice.join("news").await;
        bob.join("news").await;
        let channel = format!("{}:room:{{news}}", h1.prefix);
        redis.publish(&channel, r#"{"data":{"headline":"raw"}}"#);
        for c in [&mut alice, &mut bob] {
            let m = c.recv_type("message").await;
            assert_eq!(m["from"], "server");
            assert_eq!(m["room"], "news");
            assert_eq!(m["data"], json!({"headline": "raw"}));
            assert!(m.get("id").is_none(), "not in history: no id ({m})");
            assert!(m["ts"].is_u64());
        }
        // Malformed payloads are logged, counted and dropped.
        redis.publish(&channel, "not json");
        redis.publish(&channel, r#"{"nodata":1}"#);
        redis.publish(&format!("{}:broadcast", h1.prefix), "[]");
        redis.publish(&channel, r#"{"data":"still fine"}"#);
        assert_eq!(alice.recv_type("message").await["data"], "still fine");
        let api = h1.api().await;
        assert_eq!(api.metric("switchboard_redis_malformed_total").await, 3.0);
        // Direct and broadcast too.
        redis.publish(
            &format!("{}:user:{{bob}}", h1.prefix),
            r#"{"data":"hi bob"}"#,
        );
        let d = bob.recv_type("direct").await;
        assert_eq!(
            (d["from"].clone(), d["data"].clone()),
            (json!("server"), json!("hi bob"))
        );
        redis.publish(
            &format!("{}:broadcast", h1.prefix),
            r#"{"data":"everyone"}"#,
        );
        assert_eq!(alice.recv_type("broadcast").await["data"], "everyone");
    }
);

on_standalone_and_cluster!(
    subscriptions_follow_local_membership,
    |redis: Deployment| async move {
        let hub = Hub::builder(Broker::Redis).redis(&redis).start();
        let room = format!("{}:room:{{only-while-joined}}", hub.prefix);
        let user = format!("{}:user:{{alice}}", hub.prefix);
        let broadcast = format!("{}:broadcast", hub.prefix);
        eventually("broadcast channel subscribed", || async {
            redis.channels().contains(&broadcast).then_some(())
        })
        .await;
        let mut alice = hub.connect("alice").await;
        assert!(redis.channels().contains(&user));
        alice.join("only-while-joined").await;
        assert!(redis.channels().contains(&room));
        alice
            .request(json!({"type": "leave", "room": "only-while-joined"}))
            .await;
        eventually("room channel unsubscribed", || async {
            (!redis.channels().contains(&room)).then_some(())
        })
        .await;
        alice.close().await;
        eventually("user channel unsubscribed", || async {
            (!redis.channels().contains(&user)).then_some(())
        })
        .await;
    }
);

on_standalone_and_cluster!(
    client_kill_of_the_subscriber_connection_is_survived,
    |redis: Deployment| async move {
        let (h1, h2) = pair(&redis, "");
        let mut alice = h1.connect("alice").await;
        let mut bob = h2.connect("bob").await;
        alice.join("k").await;
        bob.join("k").await;
        redis.on_every_node(&["CLIENT", "KILL", "TYPE", "pubsub"]);
        // Cross-instance delivery resumes without any client reconnecting.
        let got = resumed(&mut alice, &mut bob, "k").await;
        assert_eq!(got["data"], "probe");
        let api = h2.api().await;
        eventually("the reconnect is counted", || async {
            let reconnects = api
                .metric("switchboard_redis_reconnects_total{connection=\"subscriber\"}")
                .await;
            (reconnects >= 1.0).then_some(())
        })
        .await;
    }
);

on_standalone_and_cluster!(
    a_stalled_instance_taken_for_dead_writes_itself_back,
    |redis: Deployment| async move {
        // A hub frozen past its TTL (a stop-the-world pause, a VM
        // migration) is reaped by the others; when it wakes, its
        // connections, users and memberships are written back.
        let (h1, h2) = pair(&redis, "[redis]\ninstance_ttl_s = 2");
        let mut watcher = h1.connect("watcher").await;
        watcher.join("room").await;
        let mut sleeper = h2.connect("sleeper").await;
        sleeper.join("room").await;
        assert_eq!(watcher.recv_type("joined").await["user"], "watcher");
        assert_eq!(watcher.recv_type("joined").await["user"], "sleeper");
        h2.signal("STOP");
        assert_eq!(watcher.recv_type("left").await["user"], "sleeper");
        let api = h1.api().await;
        eventually("the sleeper's connection is reaped", || async {
            let (_, body) = api.get("/api/users/sleeper/connections").await;
            (body["connections"] == 0).then_some(())
        })
        .await;
        h2.signal("CONT");
        assert_eq!(watcher.recv_type("joined").await["user"], "sleeper");
        eventually("the sleeper's connection is back", || async {
            let (_, body) = api.get("/api/users/sleeper/connections").await;
            (body["connections"] == 1).then_some(())
        })
        .await;
        let (_, presence) = api.get("/api/rooms/room/presence").await;
        let mut users: Vec<String> = presence["users"]
            .as_array()
            .expect("users")
            .iter()
            .map(|u| u["user"].as_str().unwrap_or_default().to_owned())
            .collect();
        users.sort();
        assert_eq!(users, ["sleeper", "watcher"], "{presence}");
        // And it is a member again, everywhere.
        let m = resumed(&mut watcher, &mut sleeper, "room").await;
        assert_eq!(m["from"], "watcher");
    }
);

on_standalone_and_cluster!(
    a_killed_instance_is_reaped_within_instance_ttl,
    |redis: Deployment| async move {
        let toml = "[redis]\ninstance_ttl_s = 2\n[limits]\nmax_connections_per_user = 1";
        let (h1, h2) = pair(&redis, toml);
        let mut watcher = h1.connect("watcher").await;
        watcher.join("room").await;
        let mut doomed = h2.connect("doomed").await;
        doomed.join("room").await;
        assert_eq!(watcher.recv_type("joined").await["user"], "watcher");
        assert_eq!(watcher.recv_type("joined").await["user"], "doomed");
        h2.signal("KILL");
        // Presence: the survivor announces `left`.
        assert_eq!(
            watcher.recv_type("left").await,
            json!({"type": "left", "room": "room", "user": "doomed"})
        );
        // Registry and per-user count: the user can connect elsewhere.
        let api = h1.api().await;
        eventually("doomed's connection is reaped", || async {
            let (_, body) = api.get("/api/users/doomed/connections").await;
            (body["connections"] == 0).then_some(())
        })
        .await;
        let again = h1.connect("doomed").await;
        assert_eq!(again.welcome["user"], "doomed");
        drop(h2);
    }
);

on_standalone_and_cluster!(
    a_stopped_instance_deregisters_itself,
    |redis: Deployment| async move {
        // A long TTL: only the instance's own clean-up can be this quick.
        let (h1, mut h2) = pair(&redis, "[redis]\ninstance_ttl_s = 300");
        let mut watcher = h1.connect("watcher").await;
        watcher.join("room").await;
        let mut leaving = h2.connect("leaving").await;
        leaving.join("room").await;
        assert_eq!(watcher.recv_type("joined").await["user"], "watcher");
        assert_eq!(watcher.recv_type("joined").await["user"], "leaving");
        h2.signal("TERM");
        assert_eq!(leaving.recv_close().await.code, 1001);
        assert_eq!(watcher.recv_type("left").await["user"], "leaving");
        assert!(h2.wait_exit(Duration::from_secs(10)).is_some());
        let instances = format!("{}:instances", h1.prefix);
        let members = redis
            .cmd(&instances, &["SMEMBERS", &instances])
            .map(|v| redis::from_redis_value::<Vec<String>>(v).unwrap_or_default())
            .unwrap_or_default();
        assert_eq!(
            members.len(),
            1,
            "only the live instance is listed: {members:?}"
        );
        let (_, body) = h1.api().await.get("/api/users/leaving/connections").await;
        assert_eq!(body["connections"], 0);
    }
);

on_standalone_and_cluster!(
    publishes_go_on_after_redis_forgets_its_scripts,
    |redis: Deployment| async move {
        // SCRIPT FLUSH (or a Redis restart) drops publish_room.lua: the
        // pipelined publishes that meet NOSCRIPT are sent again after
        // loading it.
        let hub = Hub::builder(Broker::Redis).redis(&redis).start();
        let mut alice = hub.connect("alice").await;
        alice.join("lobby").await;
        let first = alice.publish("lobby", json!(1)).await;
        redis.on_every_node(&["SCRIPT", "FLUSH"]);
        for n in 2..=20 {
            alice
                .send(json!({"type": "publish", "room": "lobby", "data": n, "ref": n}))
                .await;
        }
        let mut last = id_pair(&json!(first));
        let (mut acked, mut data) = (2, Vec::new());
        while acked <= 20 || data.len() < 20 {
            let frame = alice.recv().await;
            match frame["type"].as_str() {
                Some("ack") => {
                    assert_eq!(frame["ref"], acked, "{frame}");
                    let id = id_pair(&frame["id"]);
                    assert!(id > last, "acked ids in order");
                    last = id;
                    acked += 1;
                }
                Some("message") => data.push(frame["data"].clone()),
                _ => {}
            }
        }
        assert_eq!(data, (1..=20).map(|n| json!(n)).collect::<Vec<_>>());
    }
);

on_standalone_and_cluster!(
    an_error_reply_fails_only_its_own_pipelined_publish,
    |redis: Deployment| async move {
        // A history key of the wrong type makes publish_room.lua fail for
        // that room: its publish answers `internal`, the one pipelined
        // behind it (another room) is acked and delivered.
        let hub = Hub::builder(Broker::Redis).redis(&redis).start();
        let mut alice = hub.connect("alice").await;
        alice.join("broken").await;
        alice.join("fine").await;
        let key = format!("{}:history:{{broken}}", hub.prefix);
        redis.cmd(&key, &["SET", &key, "not a stream"]);
        alice
            .send(json!({"type": "publish", "room": "broken", "data": 1, "ref": 1}))
            .await;
        alice
            .send(json!({"type": "publish", "room": "fine", "data": 2, "ref": 2}))
            .await;
        let mut replies = Vec::new();
        let mut delivered = Vec::new();
        while replies.len() < 2 || delivered.is_empty() {
            let frame = alice.recv().await;
            match frame["type"].as_str() {
                Some("ack") | Some("error") => replies.push(frame),
                Some("message") => delivered.push(frame),
                _ => {}
            }
        }
        assert_eq!(replies[0]["ref"], 1, "{replies:?}");
        assert_eq!(replies[0]["type"], "error");
        assert_eq!(replies[0]["code"], "internal");
        assert_eq!(replies[1]["ref"], 2, "{replies:?}");
        assert_eq!(replies[1]["type"], "ack");
        assert_eq!(delivered[0]["room"], "fine");
        assert_eq!(delivered.len(), 1);
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_in_the_middle_of_traffic() {
    let mut redis = PrivateRedis::start();
    let (h1, h2) = {
        let toml = "[limits]\nmessages_per_second = 10000\nburst = 10000\n[redis]\ntimeout_s = 1";
        let a = Hub::builder(Broker::Redis)
            .redis_url(&redis.url())
            .toml(toml)
            .start();
        let b = Hub::builder(Broker::Redis)
            .redis_url(&redis.url())
            .toml(toml)
            .prefix(&a.prefix)
            .start();
        (a, b)
    };
    let mut alice = h1.connect("alice").await;
    let mut local = h1.connect("local").await;
    let mut bob = h2.connect("bob").await;
    for c in [&mut alice, &mut local, &mut bob] {
        c.join("t").await;
    }
    alice.publish("t", json!("before")).await;
    assert_eq!(bob.recv_type("message").await["data"], "before");
    assert_eq!(local.recv_type("message").await["data"], "before");

    redis.stop();
    // Redis away: readiness says so, new connections are refused 1013,
    // open sessions stay, and requests that need Redis answer
    // `unavailable` (retry): nothing is acked that Redis did not store.
    let api = h1.api().await;
    eventually("ready answers 503", || async {
        let (status, body) = api.call(api.http.get(h1.http("/health/ready"))).await;
        (status == 503 && body["reason"].as_str().is_some_and(|r| r.contains("redis")))
            .then_some(())
    })
    .await;
    let mut refused =
        Client::connect_raw(&format!("{}?token={}", h1.ws_url(), token("late")), &[]).await;
    assert_eq!(
        refused.recv_close().await,
        Closed {
            code: 1013,
            reason: "unavailable".into()
        }
    );
    let e = alice
        .request(json!({"type": "publish", "room": "t", "data": "during", "idempotency_key": "d1"}))
        .await;
    assert_eq!(e["code"], "unavailable", "{e}");
    let e = alice
        .request(json!({"type": "direct", "to": "local", "data": "dm during"}))
        .await;
    assert_eq!(e["code"], "unavailable", "{e}");
    let (status, body) = api
        .post(
            "/api/publish",
            json!({"broadcast": true, "data": "all during"}),
        )
        .await;
    assert_eq!((status, body["error"].as_str()), (503, Some("unavailable")));
    local.expect_silence(Duration::from_millis(300)).await;

    redis.restart();
    eventually("ready again", || async {
        let (status, _) = api.call(api.http.get(h1.http("/health/ready"))).await;
        (status == 200).then_some(())
    })
    .await;
    // The retry goes through; cross-instance delivery resumes; nobody
    // reconnected.
    let ack = alice
        .request(json!({"type": "publish", "room": "t", "data": "during", "idempotency_key": "d1"}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let m = resumed(&mut alice, &mut bob, "t").await;
    assert_eq!(m["from"], "alice");
    // The instances re-registered their connections and presence.
    eventually("bob re-registered", || async {
        let (_, body) = api.get("/api/users/bob/connections").await;
        (body["connections"] == 1).then_some(())
    })
    .await;
    eventually("presence restored", || async {
        let (_, body) = api.get("/api/rooms/t/presence").await;
        (body["users"].as_array().map(Vec::len) == Some(3)).then_some(())
    })
    .await;
}
