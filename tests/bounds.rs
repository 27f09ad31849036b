//! One client cannot hurt the hub: what a connection can make the hub hold
//! is bounded in bytes and in time, whatever the client sends or fails to
//! read. Each test plays the attacker on a raw socket and checks what the
//! hub's other users see and the hub process's memory (RSS).

mod support;

use serde_json::{json, Value};
use support::raw::*;
use support::*;
use tokio::io::AsyncWriteExt;

/// How far the hub's RSS may grow in the tests that flood one client.
const SLACK_MIB: u64 = 24;

/// Waits until the hub's RSS is at most `base + slack` MiB (jemalloc hands
/// freed pages back after a moment); fails with the RSS it saw.
async fn rss_settles(hub: &Hub, base: u64, slack: u64) {
    let mut last = 0;
    let settled = tokio::time::timeout(WAIT, async {
        loop {
            last = hub.rss_mib();
            if last <= base + slack {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        settled.is_ok(),
        "RSS {last} MiB, expected at most {base} + {slack} MiB"
    );
}

/// A text frame header declaring `len` bytes, masked.
fn text_header(len: u64) -> Vec<u8> {
    let mut header = vec![0x81, 0x80 | 127];
    header.extend_from_slice(&len.to_be_bytes());
    header.extend_from_slice(&MASK.expect("mask"));
    header
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_declaring_a_gibibyte_is_refused_from_its_header() {
    let hub = Hub::start(Broker::Memory);
    let base = hub.rss_mib();
    let (mut attacker, mut buf) = raw_client(&hub, "mallory").await;
    attacker
        .write_all(&text_header(1 << 30))
        .await
        .expect("header");
    // 32 MiB of the body: the hub reads and drops it (or the connection
    // is gone before: either way nothing is kept).
    let chunk = vec![b'x'; 1 << 20];
    for _ in 0..32 {
        if attacker.write_all(&chunk).await.is_err() {
            break;
        }
    }
    assert_eq!(
        server_close(&mut attacker, &mut buf).await,
        (1009, "message too big".to_owned())
    );
    rss_settles(&hub, base, 8).await;
    let mut other = hub.connect("alice").await;
    assert_eq!(other.request(json!({"type": "ping"})).await["type"], "pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_bits_without_an_extension_close_1002() {
    let hub = Hub::start(Broker::Memory);
    for first_byte in [0xC1u8, 0xA1, 0x91] {
        let (mut socket, mut buf) = raw_client(&hub, "rsv").await;
        let mut frame = client_frame(1, br#"{"type":"ping"}"#, MASK);
        frame[0] = first_byte;
        socket.write_all(&frame).await.expect("frame");
        assert_eq!(
            server_close(&mut socket, &mut buf).await,
            (1002, "protocol error".to_owned()),
            "first byte {first_byte:#x}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_frame_over_125_bytes_closes_1002_from_its_header() {
    let hub = Hub::start(Broker::Memory);
    let (mut socket, mut buf) = raw_client(&hub, "big-ping").await;
    // A ping declaring 64 KiB, and only its header sent.
    let mut header = vec![0x89, 0x80 | 126];
    header.extend_from_slice(&65_535u16.to_be_bytes());
    header.extend_from_slice(&MASK.expect("mask"));
    socket.write_all(&header).await.expect("header");
    assert_eq!(
        server_close(&mut socket, &mut buf).await,
        (1002, "protocol error".to_owned())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_flood_is_rate_limited() {
    let hub = Hub::builder(Broker::Memory)
        .toml("[limits]\nmessages_per_second = 5\nburst = 10\nrate_limit_strikes = 20")
        .start();
    let (mut flooder, mut buf) = raw_client(&hub, "flooder").await;
    let ping = client_frame(9, b"are you there", MASK);
    let mut flood = Vec::new();
    for _ in 0..1000 {
        flood.extend_from_slice(&ping);
    }
    flooder.write_all(&flood).await.expect("flood");
    let mut pongs = 0;
    let close = loop {
        let (opcode, payload) = server_frame(&mut flooder, &mut buf).await;
        match opcode {
            0xA => pongs += 1,
            8 => {
                break (
                    u16::from_be_bytes([payload[0], payload[1]]),
                    payload[2..].to_vec(),
                )
            }
            _ => {}
        }
    };
    assert_eq!(close, (1008, b"rate limit".to_vec()));
    assert!(pongs < 100, "{pongs} pongs: pings are not free");
    let mut other = hub.connect("alice").await;
    assert_eq!(other.request(json!({"type": "ping"})).await["type"], "pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsolicited_pongs_do_not_keep_a_silent_client_alive() {
    let hub = Hub::builder(Broker::Memory)
        .toml("[server]\nheartbeat_s = 1\nclient_timeout_s = 3")
        .start();
    let (mut silent, mut buf) = raw_client(&hub, "silent").await;
    let api = hub.api().await;
    // Pongs of its own every 200 ms, and it never reads our pings.
    let pong = client_frame(0xA, b"still here", MASK);
    let closed = "switchboard_connections_closed_total{reason=\"client_timeout\"}";
    let deadline = tokio::time::Instant::now() + WAIT;
    while api.metric(closed).await < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the silent client was never closed"
        );
        let _ = silent.write_all(&pong).await;
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(
        server_close(&mut silent, &mut buf).await,
        (1001, "client timeout".to_owned())
    );
}

both_brokers!(
    a_member_that_stops_reading_costs_a_bounded_amount_of_memory,
    |broker| async move {
        let hub = Hub::builder(broker)
            .toml("[limits]\nmessages_per_second = 100000\nburst = 100000")
            .start();
        let (mut sleepy, mut buf) = raw_client(&hub, "sleepy").await;
        send_json(
            &mut sleepy,
            &json!({"type": "join", "room": "feed", "ref": 1}),
        )
        .await;
        assert_eq!(server_json(&mut sleepy, &mut buf).await["type"], "ack");
        // From here on `sleepy` reads nothing.
        let mut reader = hub.connect("reader").await;
        reader.join("feed").await;
        let api = hub.api().await;
        let base = hub.rss_mib();
        let pad = "x".repeat(60_000);
        for i in 0..800 {
            api.publish_room("feed", json!({"i": i, "pad": pad})).await;
            let message = reader.recv_type("message").await;
            assert_eq!(
                message["data"]["i"], i,
                "the reader gets every message in order"
            );
        }
        assert!(
            api.metric("switchboard_slow_consumer_closes_total").await >= 1.0,
            "the member that stopped reading was closed"
        );
        rss_settles(&hub, base, SLACK_MIB).await;
    }
);

both_brokers!(
    join_and_leave_loops_with_since_from_a_non_reading_client_stay_bounded,
    |broker| async move {
        let hub = Hub::builder(broker)
            .toml("[limits]\nmessages_per_second = 100000\nburst = 100000\nwrite_timeout_s = 2")
            .start();
        let api = hub.api().await;
        let pad = "y".repeat(60_000);
        for i in 0..100 {
            api.publish_room("archive", json!({"i": i, "pad": pad}))
                .await;
        }
        let base = hub.rss_mib();
        let (mut sleepy, _buf) = raw_client(&hub, "sleepy").await;
        for r in 0..20 {
            let join = json!({"type": "join", "room": "archive", "since": "0-0", "ref": r});
            send_json(&mut sleepy, &join).await;
            send_json(&mut sleepy, &json!({"type": "leave", "room": "archive"})).await;
        }
        // Each replay is cut to what the client's queue can take, so the
        // queue stays within its bytes; the stalled socket ends it.
        eventually(
            "the non-reading client is closed as a slow consumer",
            || async {
                let closes = api.metric("switchboard_slow_consumer_closes_total").await;
                (closes >= 1.0).then_some(())
            },
        )
        .await;
        rss_settles(&hub, base, SLACK_MIB).await;
        let mut other = hub.connect("alice").await;
        assert_eq!(other.request(json!({"type": "ping"})).await["type"], "pong");
    }
);

both_brokers!(
    a_replay_larger_than_the_outbound_bytes_is_cut_and_not_recovered,
    |broker| async move {
        let hub = Hub::builder(broker)
            .toml("[limits]\nmax_message_bytes = 65536\nmax_outbound_bytes = 200000")
            .start();
        let api = hub.api().await;
        let pad = "z".repeat(30_000);
        let mut ids = Vec::new();
        for i in 0..20 {
            ids.push(api.publish_room("big", json!({"i": i, "pad": pad})).await);
        }
        let mut c = hub.connect("alice").await;
        let ack = c
            .request(json!({"type": "join", "room": "big", "since": ids[0]}))
            .await;
        assert_eq!(ack["recovered"], false, "{ack}");
        let mut replayed = Vec::new();
        while replayed.last() != ids.last() {
            let message = c.recv_type("message").await;
            replayed.push(message["id"].as_str().expect("id").to_owned());
        }
        assert!(
            replayed.len() < 19,
            "{} replayed: nothing was cut",
            replayed.len()
        );
        assert_eq!(
            replayed[..],
            ids[ids.len() - replayed.len()..],
            "the latest messages, in order"
        );
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_takes_nothing_closes_1013_after_the_write_timeout() {
    let hub = Hub::builder(Broker::Memory)
        .toml(
            "[limits]\nwrite_timeout_s = 1\nmax_outbound_queue = 100000\n\
             max_outbound_bytes = 268435456\nmessages_per_second = 100000\nburst = 100000",
        )
        .start();
    let (mut sleepy, mut buf) = raw_client(&hub, "sleepy").await;
    send_json(
        &mut sleepy,
        &json!({"type": "join", "room": "feed", "ref": 1}),
    )
    .await;
    assert_eq!(server_json(&mut sleepy, &mut buf).await["type"], "ack");
    let api = hub.api().await;
    let pad = "x".repeat(60_000);
    let mut sent = 0;
    // The queue's bounds are far away: only the stalled socket can end it.
    while api.metric("switchboard_slow_consumer_closes_total").await < 1.0 {
        for _ in 0..20 {
            api.publish_room("feed", json!({"i": sent, "pad": pad}))
                .await;
            sent += 1;
        }
        assert!(sent < 4000, "the stalled client was never closed");
    }
    // What the socket took comes whole and in order, then the close.
    let mut next = 0;
    let close = loop {
        let (opcode, payload) = server_frame(&mut sleepy, &mut buf).await;
        match opcode {
            1 => {
                let message: Value = serde_json::from_slice(&payload).expect("JSON");
                if message["type"] == "message" {
                    assert_eq!(message["data"]["i"], next);
                    next += 1;
                }
            }
            8 => {
                break (
                    u16::from_be_bytes([payload[0], payload[1]]),
                    payload[2..].to_vec(),
                )
            }
            _ => {}
        }
    };
    assert_eq!(close, (1013, b"slow consumer".to_vec()));
}

both_brokers!(
    a_lingering_closed_socket_counts_against_the_per_user_limit,
    |broker| async move {
        let hub = Hub::builder(broker)
            .toml("[limits]\nmax_connections_per_user = 1")
            .start();
        let api = hub.api().await;
        let (mut first, _buf) = raw_client(&hub, "alice").await;
        // Kicked: the hub closes the session, but the client neither reads
        // the close frame nor ends its side, so the socket lingers.
        let (status, _) = api.post("/api/users/alice/disconnect", json!({})).await;
        assert_eq!(status, 200);
        let refused =
            Client::connect_raw(&format!("{}?token={}", hub.ws_url(), token("alice")), &[])
                .await
                .recv_close()
                .await;
        assert_eq!(
            refused,
            Closed {
                code: 1008,
                reason: "connection limit".into()
            }
        );
        // Once the client ends its side, the socket goes, and its place.
        first.shutdown().await.expect("shutdown");
        drop(first);
        let url = format!("{}?token={}", hub.ws_url(), token("alice"));
        let mut second = eventually("alice can connect again", || async {
            let mut c = Client::connect_raw(&url, &[]).await;
            match c.next_event(WAIT).await {
                Some(Ok(welcome)) if welcome["type"] == "welcome" => Some(c),
                _ => None,
            }
        })
        .await;
        assert_eq!(
            second.request(json!({"type": "ping"})).await["type"],
            "pong"
        );
    }
);
