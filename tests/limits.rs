//! Every limit of docs/protocol.md §2, §5 and §6, against both brokers.

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;

both_brokers!(instance_full_closes_1013_overloaded, |broker| async move {
    let hub = Hub::builder(broker)
        .toml("[limits]\nmax_connections = 2")
        .start();
    let _a = hub.connect("a").await;
    let b = hub.connect("b").await;
    let mut c = Client::connect_raw(&format!("{}?token={}", hub.ws_url(), token("c")), &[]).await;
    assert_eq!(
        c.recv_close().await,
        Closed {
            code: 1013,
            reason: "overloaded".into()
        }
    );
    // A place frees up when a connection leaves.
    b.close().await;
    let url = hub.ws_url();
    eventually("a new connection is accepted", || {
        let url = url.clone();
        async move {
            let mut c = Client::connect_raw(&format!("{url}?token={}", token("c")), &[]).await;
            match c.next_event(WAIT).await {
                Some(Ok(w)) if w["type"] == "welcome" => Some(()),
                _ => None,
            }
        }
    })
    .await;
});

both_brokers!(
    per_user_limit_closes_1008_connection_limit,
    |broker| async move {
        let hub = Hub::builder(broker)
            .toml("[limits]\nmax_connections_per_user = 2")
            .start();
        let _a1 = hub.connect("alice").await;
        let a2 = hub.connect("alice").await;
        let _bob = hub.connect("bob").await;
        let mut a3 =
            Client::connect_raw(&format!("{}?token={}", hub.ws_url(), token("alice")), &[]).await;
        assert_eq!(
            a3.recv_close().await,
            Closed {
                code: 1008,
                reason: "connection limit".into()
            }
        );
        a2.close().await;
        let url = hub.ws_url();
        eventually("alice may connect again", || {
            let url = url.clone();
            async move {
                let mut c =
                    Client::connect_raw(&format!("{url}?token={}", token("alice")), &[]).await;
                match c.next_event(WAIT).await {
                    Some(Ok(w)) if w["type"] == "welcome" => Some(()),
                    _ => None,
                }
            }
        })
        .await;
    }
);

both_brokers!(
    frame_over_max_message_bytes_closes_1009,
    |broker| async move {
        let hub = Hub::builder(broker)
            .toml("[limits]\nmax_message_bytes = 1024")
            .start();
        let mut c = hub.connect("alice").await;
        // Exactly at the limit is fine.
        let pad = "x".repeat(1024 - r#"{"type":"ping","ref":""}"#.len());
        c.send_text(&format!(r#"{{"type":"ping","ref":"{pad}"}}"#))
            .await;
        assert_eq!(c.recv().await["type"], "pong");
        c.send_text(&format!(r#"{{"type":"ping","ref":"{pad}x"}}"#))
            .await;
        assert_eq!(
            c.recv_close().await,
            Closed {
                code: 1009,
                reason: "message too big".into()
            }
        );
    }
);

both_brokers!(join_over_max_rooms_is_limit_exceeded, |broker| async move {
    let hub = Hub::builder(broker)
        .toml("[limits]\nmax_rooms_per_connection = 3")
        .start();
    let mut c = hub.connect("alice").await;
    for room in ["a", "b", "c"] {
        c.join(room).await;
    }
    // Joining one already joined does not count again.
    c.join("a").await;
    let e = c.request(json!({"type": "join", "room": "d"})).await;
    assert_eq!(e["type"], "error");
    assert_eq!(e["code"], "limit_exceeded");
    // Leaving makes room.
    c.request(json!({"type": "leave", "room": "a"})).await;
    c.join("d").await;
});

both_brokers!(
    rate_limit_refuses_then_closes_after_strikes,
    |broker| async move {
        let hub = Hub::builder(broker)
            .toml("[limits]\nmessages_per_second = 1\nburst = 3\nrate_limit_strikes = 4")
            .start();
        let mut c = hub.connect("alice").await;
        for i in 0..3 {
            c.send(json!({"type": "ping", "ref": i})).await;
            assert_eq!(c.recv().await["type"], "pong");
        }
        for i in 0..3 {
            c.send(json!({"type": "ping", "ref": 10 + i})).await;
            let e = c.recv().await;
            assert_eq!(e["type"], "error");
            assert_eq!(e["code"], "rate_limited");
            assert_eq!(e["ref"], 10 + i);
        }
        c.send(json!({"type": "ping", "ref": 99})).await;
        assert_eq!(
            c.recv_close().await,
            Closed {
                code: 1008,
                reason: "rate limit".into()
            }
        );
    }
);

both_brokers!(an_accepted_frame_resets_the_strikes, |broker| async move {
    let hub = Hub::builder(broker)
        .toml("[limits]\nmessages_per_second = 1\nburst = 1\nrate_limit_strikes = 2")
        .start();
    let mut c = hub.connect("alice").await;
    for round in 0..3 {
        c.send(json!({"type": "ping", "ref": round})).await;
        let first = c.recv().await;
        assert_eq!(first["type"], "pong", "round {round}: {first}");
        c.send(json!({"type": "ping"})).await;
        assert_eq!(c.recv().await["code"], "rate_limited");
        // Wait for a token: one strike, then an accepted frame resets it.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
});

both_brokers!(
    slow_consumer_is_closed_1013_and_others_unaffected,
    |broker| async move {
        let hub = Hub::builder(broker)
            .toml("[limits]\nmax_outbound_queue = 16\nmax_message_bytes = 200000")
            .start();
        let mut slow = hub.connect("slow").await;
        slow.join("flood").await;
        let mut fine = hub.connect("fine").await;
        fine.join("other").await;
        let api = hub.api().await;
        // `slow` reads nothing while ~12 MB are published to its room; its
        // socket fills, then its queue, and the server closes it.
        let pad = "x".repeat(60_000);
        for i in 0..200 {
            let (status, _) = api
                .post(
                    "/api/publish",
                    json!({"room": "flood", "data": {"i": i, "pad": pad}}),
                )
                .await;
            assert_eq!(status, 200);
        }
        assert_eq!(
            slow.recv_close().await,
            Closed {
                code: 1013,
                reason: "slow consumer".into()
            }
        );
        assert_eq!(fine.request(json!({"type": "ping"})).await["type"], "pong");
        let (_, metrics) = api.get("/metrics").await;
        let text = metrics.as_str().unwrap_or_default().to_owned();
        assert!(
            text.contains("switchboard_slow_consumer_closes_total 1"),
            "{text}"
        );
    }
);
