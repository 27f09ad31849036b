//! The wire protocol of docs/protocol.md §3–§7, over real sockets, against both
//! brokers: every client frame, every server frame, the errors that keep
//! the connection open, ordering and recovery.

mod support;

use serde_json::json;
use support::*;

both_brokers!(welcome_is_the_first_frame, |broker| async move {
    let hub = Hub::start(broker);
    let client = hub.connect("alice").await;
    let w = &client.welcome;
    assert_eq!(w["user"], "alice");
    assert!(
        w["connection_id"].as_str().is_some_and(|s| !s.is_empty()),
        "{w}"
    );
    assert!(w["instance"].as_str().is_some_and(|s| !s.is_empty()), "{w}");
    assert_eq!(w["heartbeat_s"], 20);
});

both_brokers!(
    token_in_authorization_header_is_accepted,
    |broker| async move {
        let hub = Hub::start(broker);
        let auth = format!("Bearer {}", token("alice"));
        let mut client = Client::connect_raw(&hub.ws_url(), &[("Authorization", &auth)]).await;
        assert_eq!(client.recv().await["type"], "welcome");
    }
);

both_brokers!(join_publish_and_receive, |broker| async move {
    let hub = Hub::start(broker);
    let mut alice = hub.connect("alice").await;
    let mut bob = hub.connect("bob").await;
    let ack = alice
        .request(json!({"type": "join", "room": "lobby"}))
        .await;
    assert_eq!(ack["type"], "ack");
    assert_eq!(ack["room"], "lobby");
    assert!(
        ack.get("recovered").is_none(),
        "a join without since has no recovered: {ack}"
    );
    bob.join("lobby").await;
    let id = alice
        .publish("lobby", json!({"text": "hi", "n": [1, 2]}))
        .await;
    for client in [&mut alice, &mut bob] {
        let m = client.recv_type("message").await;
        assert_eq!(m["id"], id.as_str());
        assert_eq!(m["room"], "lobby");
        assert_eq!(m["from"], "alice");
        assert_eq!(m["data"], json!({"text": "hi", "n": [1, 2]}));
        assert!(
            m["ts"].as_u64().is_some_and(|ts| ts > 1_600_000_000_000),
            "{m}"
        );
    }
});

both_brokers!(ref_is_echoed_as_string_or_number, |broker| async move {
    let hub = Hub::start(broker);
    let mut c = hub.connect("alice").await;
    c.send(json!({"type": "ping", "ref": "abc"})).await;
    assert_eq!(c.recv().await, json!({"type": "pong", "ref": "abc"}));
    c.send(json!({"type": "ping", "ref": 42})).await;
    assert_eq!(c.recv().await, json!({"type": "pong", "ref": 42}));
    c.send(json!({"type": "ping"})).await;
    assert_eq!(c.recv().await, json!({"type": "pong"}));
});

both_brokers!(from_is_the_authenticated_user, |broker| async move {
    let hub = Hub::start(broker);
    let mut alice = hub.connect("alice").await;
    alice.join("r").await;
    alice
        .send(json!({"type": "publish", "room": "r", "data": 1, "from": "mallory"}))
        .await;
    assert_eq!(alice.recv_type("message").await["from"], "alice");
});

both_brokers!(
    leave_stops_delivery_and_announces_left,
    |broker| async move {
        let hub = Hub::start(broker);
        let mut alice = hub.connect("alice").await;
        let mut bob = hub.connect("bob").await;
        alice.join("r").await;
        bob.join("r").await;
        assert_eq!(
            alice.recv_type("joined").await,
            json!({"type": "joined", "room": "r", "user": "alice"})
        );
        assert_eq!(alice.recv_type("joined").await["user"], "bob");
        let ack = bob.request(json!({"type": "leave", "room": "r"})).await;
        assert_eq!(ack["type"], "ack");
        assert_eq!(ack["room"], "r");
        assert_eq!(
            alice.recv_type("left").await,
            json!({"type": "left", "room": "r", "user": "bob"})
        );
        alice.publish("r", json!("after")).await;
        alice.recv_type("message").await;
        bob.expect_silence(std::time::Duration::from_millis(300))
            .await;
    }
);

both_brokers!(
    joined_and_left_only_for_first_and_last_connection,
    |broker| async move {
        let hub = Hub::start(broker);
        let mut watcher = hub.connect("watcher").await;
        watcher.join("r").await;
        watcher.recv_type("joined").await;
        let mut b1 = hub.connect("bob").await;
        let mut b2 = hub.connect("bob").await;
        b1.join("r").await;
        assert_eq!(watcher.recv_type("joined").await["user"], "bob");
        b2.join("r").await;
        let p = watcher
            .request(json!({"type": "presence", "room": "r"}))
            .await;
        assert_eq!(p["type"], "presence");
        assert_eq!(p["room"], "r");
        assert_eq!(
            p["users"],
            json!([{"user": "bob", "connections": 2}, {"user": "watcher", "connections": 1}])
        );
        b1.close().await;
        let api = hub.api().await;
        eventually("bob's count drops to 1", || async {
            let (_, p) = api.get("/api/rooms/r/presence").await;
            (p["users"][0] == json!({"user": "bob", "connections": 1})).then_some(())
        })
        .await;
        b2.close().await;
        // The first `left` the watcher sees is for bob's last connection.
        assert_eq!(
            watcher.recv_type("left").await,
            json!({"type": "left", "room": "r", "user": "bob"})
        );
    }
);

both_brokers!(
    direct_reaches_every_connection_of_the_user,
    |broker| async move {
        let hub = Hub::start(broker);
        let mut alice = hub.connect("alice").await;
        let mut bob1 = hub.connect("bob").await;
        let mut bob2 = hub.connect("bob").await;
        let mut carol = hub.connect("carol").await;
        let ack = alice
            .request(json!({"type": "direct", "to": "bob", "data": {"x": 1}}))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        let id = ack["id"].clone();
        for bob in [&mut bob1, &mut bob2] {
            let d = bob.recv().await;
            assert_eq!(d["type"], "direct");
            assert_eq!(d["id"], id);
            assert_eq!(d["from"], "alice");
            assert_eq!(d["data"], json!({"x": 1}));
            assert!(d["ts"].is_u64());
        }
        carol
            .expect_silence(std::time::Duration::from_millis(300))
            .await;
    }
);

both_brokers!(
    publishing_without_joining_is_forbidden,
    |broker| async move {
        let hub = Hub::start(broker);
        let mut c = hub.connect("alice").await;
        let e = c
            .request(json!({"type": "publish", "room": "r", "data": 1}))
            .await;
        assert_eq!(e["type"], "error");
        assert_eq!(e["code"], "forbidden");
    }
);

both_brokers!(bad_requests_keep_the_connection_open, |broker| async move {
    let hub = Hub::start(broker);
    let mut c = hub.connect("alice").await;
    for bad in [
        "not json",
        "[1,2]",
        "\"str\"",
        "{}",
        r#"{"type":"dance"}"#,
        r#"{"type":"join"}"#,
        r#"{"type":"join","room":5}"#,
        r#"{"type":"join","room":""}"#,
        r#"{"type":"join","room":"has space"}"#,
        r#"{"type":"publish","room":"r"}"#,
        r#"{"type":"direct","data":1}"#,
        r#"{"type":"leave"}"#,
        r#"{"type":"presence"}"#,
        r#"{"type":"refresh"}"#,
        r#"{"type":"ping","ref":{"a":1}}"#,
    ] {
        c.send_text(bad).await;
        let e = c.recv().await;
        assert_eq!(e["type"], "error", "{bad} -> {e}");
        assert_eq!(e["code"], "bad_request", "{bad} -> {e}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let long = "a".repeat(129);
    let e = c.request(json!({"type": "join", "room": long})).await;
    assert_eq!(e["code"], "bad_request");
    let e = c
        .request(json!({"type": "join", "room": "r", "since": "yesterday"}))
        .await;
    assert_eq!(e["code"], "bad_request", "{e}");
    // Still serving.
    assert_eq!(c.request(json!({"type": "ping"})).await["type"], "pong");
});

both_brokers!(unknown_task_is_not_found, |broker| async move {
    let hub = Hub::start(broker);
    let mut c = hub.connect("alice").await;
    let e = c
        .request(json!({"type": "task", "name": "nope", "payload": {}}))
        .await;
    assert_eq!(e["type"], "error");
    assert_eq!(e["code"], "not_found");
});

both_brokers!(room_names_at_the_limits_are_accepted, |broker| async move {
    let hub = Hub::start(broker);
    let mut c = hub.connect("alice").await;
    c.join(&"a".repeat(128)).await;
    c.join("A-z_0.9:x").await;
});

both_brokers!(
    pipelined_publishes_are_answered_in_the_order_sent,
    |broker| async move {
        // Publishes sent back to back are pipelined (many in flight); every
        // other reply still comes in request order, behind their acks.
        let hub = Hub::builder(broker)
            .toml(
                "[limits]\nmessages_per_second = 100000\nburst = 100000\nmax_outbound_queue = 4096",
            )
            .start();
        let mut alice = hub.connect("alice").await;
        let mut bob = hub.connect("bob").await;
        alice.join("pipe").await;
        bob.join("pipe").await;
        const N: u64 = 300;
        let frame = |r: u64| match r {
            50 => json!({"type": "publish", "room": "not-joined", "data": r, "ref": r}),
            100 => json!({"type": "ping", "ref": r}),
            150 => json!({"type": "direct", "to": "bob", "data": r, "ref": r}),
            250 => json!({"type": "publish", "room": "", "data": r, "ref": r}),
            r if r % 10 == 0 => json!({"type": "join", "room": "pipe", "ref": r}),
            _ => json!({"type": "publish", "room": "pipe", "data": r, "ref": r}),
        };
        for r in 1..=N {
            alice.send(frame(r)).await;
        }
        let mut last_id = (0, 0);
        let mut r = 1;
        while r <= N {
            let reply = alice.recv().await;
            if reply.get("ref").is_none() {
                continue; // a delivery or a presence event
            }
            assert_eq!(reply["ref"], r, "reply out of order: {reply}");
            let expected = match r {
                50 => "error",
                100 => "pong",
                250 => "error",
                _ => "ack",
            };
            assert_eq!(reply["type"], expected, "ref {r}: {reply}");
            if expected == "ack" && r != 150 && r % 10 != 0 {
                let id = id_pair(&reply["id"]);
                assert!(id > last_id, "ack ids out of order at ref {r}");
                last_id = id;
            }
            r += 1;
        }
        let mut got = Vec::new();
        while got.len() < (N - N / 10 + 1) as usize {
            let m = bob.recv().await;
            match m["type"].as_str() {
                Some("message") | Some("direct") => got.push(m["data"].as_u64().expect("data")),
                _ => {}
            }
        }
        let sent: Vec<u64> = (1..=N).filter(|r| r % 10 != 0 || *r == 150).collect();
        assert_eq!(
            got, sent,
            "bob got the room messages and the direct in order"
        );
    }
);

both_brokers!(
    ordering_across_workers_without_gaps_or_duplicates,
    |broker| async move {
        let hub = Hub::builder(broker)
        .toml("[limits]\nmessages_per_second = 100000\nburst = 100000\nmax_outbound_queue = 4096\nmax_connections_per_user = 100")
        .start();
        const PUBLISHERS: usize = 4;
        const EACH: usize = 250;
        let mut members = Vec::new();
        for i in 0..3 {
            let mut m = hub.connect(&format!("member{i}")).await;
            m.join("order").await;
            members.push(m);
        }
        let mut publishers = Vec::new();
        for p in 0..PUBLISHERS {
            let mut c = hub.connect(&format!("pub{p}")).await;
            c.join("order").await;
            publishers.push(c);
        }
        let tasks: Vec<_> = publishers
            .into_iter()
            .enumerate()
            .map(|(p, mut c)| {
                tokio::spawn(async move {
                    for n in 0..EACH {
                        c.send(
                            json!({"type": "publish", "room": "order", "data": {"p": p, "n": n}}),
                        )
                        .await;
                    }
                    c
                })
            })
            .collect();
        for member in &mut members {
            let mut last_id = (0, 0);
            let mut next = [0u64; PUBLISHERS];
            for _ in 0..PUBLISHERS * EACH {
                let m = member.recv_type("message").await;
                let id = id_pair(&m["id"]);
                assert!(id > last_id, "ids out of order: {last_id:?} then {id:?}");
                last_id = id;
                let p = m["data"]["p"].as_u64().expect("p") as usize;
                assert_eq!(
                    m["data"]["n"], next[p],
                    "gap or duplicate from publisher {p}"
                );
                next[p] += 1;
            }
            assert!(next.iter().all(|n| *n == EACH as u64));
        }
        for t in tasks {
            t.await.expect("publisher");
        }
    }
);

both_brokers!(
    recovery_at_the_seam_loses_and_doubles_nothing,
    |broker| async move {
        let hub = Hub::builder(broker)
        .toml("[limits]\nmessages_per_second = 100000\nburst = 100000\nmax_outbound_queue = 4096\n[history]\nsize = 10000")
        .start();
        let mut reader = hub.connect("reader").await;
        reader.join("seam").await;
        let mut publisher = hub.connect("publisher").await;
        publisher.join("seam").await;
        for n in 0..20 {
            publisher.publish("seam", json!({"n": n})).await;
        }
        let mut last = None;
        for _ in 0..20 {
            last = Some(reader.recv_type("message").await);
        }
        let last = last.expect("messages");
        assert_eq!(last["data"]["n"], 19);
        reader.close().await;

        // Keep publishing while the reader reconnects and replays.
        const TOTAL: u64 = 600;
        let task = tokio::spawn(async move {
            for n in 20..TOTAL {
                publisher
                    .send(json!({"type": "publish", "room": "seam", "data": {"n": n}}))
                    .await;
                if n % 50 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            publisher
        });
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let mut reader = hub.connect("reader").await;
        let ack = reader
            .request(json!({"type": "join", "room": "seam", "since": last["id"]}))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        assert_eq!(ack["recovered"], true, "{ack}");
        let mut expected = 20;
        let mut last_id = id_pair(&last["id"]);
        while expected < TOTAL {
            let m = reader.recv_type("message").await;
            let id = id_pair(&m["id"]);
            assert!(id > last_id, "not in id order at the seam");
            last_id = id;
            assert_eq!(m["data"]["n"], expected, "lost or doubled at the seam");
            expected += 1;
        }
        task.await.expect("publisher");
    }
);

both_brokers!(
    recovered_is_false_when_history_was_trimmed,
    |broker| async move {
        let hub = Hub::builder(broker)
            .toml("[history]\nsize = 3\n[limits]\nmessages_per_second = 100000\nburst = 100000")
            .start();
        let mut c = hub.connect("alice").await;
        c.join("small").await;
        let first = c.publish("small", json!(0)).await;
        for n in 1..300 {
            c.publish("small", json!(n)).await;
        }
        let mut d = hub.connect("bob").await;
        let ack = d
            .request(json!({"type": "join", "room": "small", "since": first}))
            .await;
        assert_eq!(ack["recovered"], false, "{ack}");
        // What is retained after `since` still comes, in order, ending with the newest.
        let mut got = Vec::new();
        loop {
            let m = d.recv_type("message").await;
            got.push(m["data"].as_u64().expect("n"));
            if m["data"] == 299 {
                break;
            }
        }
        assert!(
            got.len() >= 3,
            "at least history.size messages retained: {got:?}"
        );
        assert!(got.windows(2).all(|w| w[0] < w[1]));
    }
);

both_brokers!(
    join_with_since_at_the_newest_id_replays_nothing,
    |broker| async move {
        let hub = Hub::start(broker);
        let mut c = hub.connect("alice").await;
        c.join("r").await;
        let id = c.publish("r", json!(1)).await;
        let mut d = hub.connect("bob").await;
        let ack = d
            .request(json!({"type": "join", "room": "r", "since": id}))
            .await;
        assert_eq!(ack["recovered"], true);
        let next = d.recv().await;
        assert_eq!(next["type"], "joined", "no replay expected, got {next}");
    }
);

both_brokers!(
    refresh_with_same_user_is_acked_other_user_forbidden,
    |broker| async move {
        let hub = Hub::start(broker);
        let mut c = hub.connect("alice").await;
        let ack = c
            .request(json!({"type": "refresh", "token": token("alice")}))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        let e = c
            .request(json!({"type": "refresh", "token": token("mallory")}))
            .await;
        assert_eq!(e["code"], "forbidden");
        let e = c
            .request(json!({"type": "refresh", "token": "garbage"}))
            .await;
        assert_eq!(e["code"], "forbidden");
    }
);
