//! A session's life over real sockets: heartbeat and client timeout, token
//! expiry and refresh, binary frames, origins, and shutdown on SIGTERM.

mod support;

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;
use support::*;
use tokio_tungstenite::tungstenite::Message;

both_brokers!(binary_frame_closes_1003, |broker| async move {
    let hub = Hub::start(broker);
    let mut other = hub.connect("bob").await;
    let mut c = hub.connect("alice").await;
    c.send_binary(b"\x00\x01").await;
    assert_eq!(
        c.recv_close().await,
        Closed {
            code: 1003,
            reason: "binary not supported".into()
        }
    );
    assert_eq!(other.request(json!({"type": "ping"})).await["type"], "pong");
});

both_brokers!(client_close_is_answered_1000, |broker| async move {
    let hub = Hub::start(broker);
    let mut c = hub.connect("alice").await;
    c.ws.close(None).await.expect("close");
    let closed = c.recv_close().await;
    assert_eq!(closed.code, 1000, "{closed:?}");
});

#[tokio::test]
async fn server_pings_every_heartbeat() {
    let hub = Hub::builder(Broker::Memory)
        .toml("[server]\nheartbeat_s = 1\nclient_timeout_s = 30")
        .start();
    let mut c = hub.connect("alice").await;
    let ping = tokio::time::timeout(WAIT, async {
        loop {
            match c.ws.next().await {
                Some(Ok(Message::Ping(_))) => return true,
                Some(Ok(_)) => continue,
                _ => return false,
            }
        }
    })
    .await;
    assert_eq!(ping, Ok(true), "no ping from the server");
}

#[tokio::test]
async fn silent_client_is_closed_after_client_timeout() {
    let hub = Hub::builder(Broker::Memory)
        .toml("[server]\nheartbeat_s = 1\nclient_timeout_s = 2")
        .start();
    let mut silent = hub.connect("silent").await;
    let mut chatty = hub.connect("chatty").await;
    // The chatty client keeps talking; the silent one reads nothing (so it
    // answers no ping) and sends nothing.
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            chatty.request(json!({"type": "ping"})).await["type"],
            "pong"
        );
    }
    assert_eq!(
        silent.recv_close().await,
        Closed {
            code: 1001,
            reason: "client timeout".into()
        }
    );
}

#[tokio::test]
async fn token_expiry_closes_1008_token_expired() {
    let hub = Hub::start(Broker::Memory);
    let t = token_with(json!({"sub": "alice", "exp": now_s() + 2}));
    let mut c = Client::connect(&hub.ws_url(), &t).await;
    assert_eq!(
        c.recv_close().await,
        Closed {
            code: 1008,
            reason: "token expired".into()
        }
    );
}

#[tokio::test]
async fn refresh_moves_the_expiry_and_a_refused_refresh_does_not() {
    let hub = Hub::start(Broker::Memory);
    let short = |user: &str| token_with(json!({"sub": user, "exp": now_s() + 2}));
    let mut refreshed = Client::connect(&hub.ws_url(), &short("alice")).await;
    let mut refused = Client::connect(&hub.ws_url(), &short("bob")).await;
    let ack = refreshed
        .request(json!({"type": "refresh", "token": token("alice")}))
        .await;
    assert_eq!(ack["type"], "ack");
    let e = refused
        .request(json!({"type": "refresh", "token": token("mallory")}))
        .await;
    assert_eq!(e["code"], "forbidden");
    assert_eq!(
        refused.recv_close().await,
        Closed {
            code: 1008,
            reason: "token expired".into()
        }
    );
    // Past the first token's expiry the refreshed session still answers.
    assert_eq!(
        refreshed.request(json!({"type": "ping"})).await["type"],
        "pong"
    );
}

#[tokio::test]
async fn origins_are_checked_when_configured() {
    let hub = Hub::builder(Broker::Memory)
        .toml(
            "[server]\nallowed_origins = [\"https://app.example.com\", \"http://localhost:3000\"]",
        )
        .start();
    let url = format!("{}?token={}", hub.ws_url(), token("alice"));
    for origin in ["https://app.example.com", "http://localhost:3000"] {
        let mut c = Client::connect_raw(&url, &[("Origin", origin)]).await;
        assert_eq!(c.recv().await["type"], "welcome", "{origin}");
    }
    for origin in [
        "https://evil.example",
        "http://localhost:3001",
        "http://app.example.com",
    ] {
        let mut c = Client::connect_raw(&url, &[("Origin", origin)]).await;
        assert_eq!(
            c.recv_close().await,
            Closed {
                code: 1008,
                reason: "forbidden origin".into()
            },
            "{origin}"
        );
    }
    // No Origin header (not a browser): allowed.
    let mut c = Client::connect_raw(&url, &[]).await;
    assert_eq!(c.recv().await["type"], "welcome");

    let any = Hub::builder(Broker::Memory)
        .toml("[server]\nallowed_origins = [\"*\"]")
        .start();
    let url = format!("{}?token={}", any.ws_url(), token("alice"));
    let mut c = Client::connect_raw(&url, &[("Origin", "https://anything.example")]).await;
    assert_eq!(c.recv().await["type"], "welcome");
}

both_brokers!(
    sigterm_closes_every_session_1001_going_away,
    |broker| async move {
        let mut hub = Hub::builder(broker)
            .toml("[server]\nshutdown_grace_s = 5")
            .start();
        let mut a = hub.connect("alice").await;
        let mut b = hub.connect("bob").await;
        a.join("r").await;
        hub.signal("TERM");
        for c in [&mut a, &mut b] {
            assert_eq!(
                c.recv_close().await,
                Closed {
                    code: 1001,
                    reason: "going away".into()
                }
            );
        }
        let status = hub.wait_exit(Duration::from_secs(8));
        assert!(status.is_some_and(|s| s.success()), "exit: {status:?}");
    }
);

#[tokio::test]
async fn sigint_also_shuts_down() {
    let mut hub = Hub::start(Broker::Memory);
    let mut a = hub.connect("alice").await;
    hub.signal("INT");
    assert_eq!(a.recv_close().await.code, 1001);
    assert!(hub.wait_exit(Duration::from_secs(12)).is_some());
}
