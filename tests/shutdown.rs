//! `server::run` in process, with the shutdown trigger injected: it closes
//! every session with 1001 `going away`, waits for the close frames to be
//! written, and returns.

mod support;

use std::net::TcpListener;
use std::time::Duration;

use support::*;
use switchboard::config::Config;

fn config() -> Config {
    let mut config = Config::default();
    config.auth.jwt_secret = SECRET.into();
    config.server.workers = 2;
    config.server.shutdown_grace_s = 5;
    config
}

#[actix_rt::test]
async fn run_returns_once_every_session_was_closed_going_away() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("ws://{}/ws", listener.local_addr().expect("addr"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = actix_rt::spawn(switchboard::server::run(config(), listener, async {
        let _ = stopped.await;
    }));
    let mut clients = Vec::new();
    for user in ["alice", "bob", "carol"] {
        let mut c = Client::connect(&url, &token(user)).await;
        c.join("lobby").await;
        clients.push(c);
    }
    stop.send(()).expect("server running");
    for c in &mut clients {
        let closed = c.recv_close().await;
        assert_eq!(
            closed,
            Closed {
                code: 1001,
                reason: "going away".into()
            }
        );
    }
    let result = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("run returned within the grace period")
        .expect("run did not panic");
    assert!(result.is_ok(), "run failed: {result:?}");
}
