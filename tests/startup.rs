//! What a newcomer sees when the hub starts: where it listens (loopback
//! only while `auth.dev_tokens` hands out tokens, unless `server.host` says
//! otherwise), the first stdout line tools read, and a log that names the
//! URL to open and the WebSocket URL, without colour codes when it is not
//! a terminal.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use support::*;

const HOST: &str = "SWITCHBOARD__SERVER__HOST";
const DEV_TOKENS: &str = "SWITCHBOARD__AUTH__DEV_TOKENS";

/// A second loopback address: a socket bound to 127.0.0.1 does not answer
/// on it, one bound to every interface (or to it) does.
const OTHER_LOOPBACK: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

fn accepts(ip: impl Into<IpAddr>, port: u16) -> bool {
    TcpStream::connect_timeout(&SocketAddr::new(ip.into(), port), Duration::from_secs(2)).is_ok()
}

/// This machine's address towards the network, when it has one (no packet
/// is sent: a UDP `connect` only picks the route).
fn outward_address() -> Option<IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// Waits until the hub's log holds `text`; the log so far.
fn log_with(hub: &Hub, text: &str) -> String {
    let start = std::time::Instant::now();
    loop {
        let log = hub.log();
        if log.contains(text) {
            return log;
        }
        assert!(
            start.elapsed() < WAIT,
            "the log never said {text:?}; it holds:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn with_dev_tokens_and_no_host_the_hub_listens_on_loopback_only() {
    let hub = Hub::builder(Broker::Memory)
        .unset(HOST)
        .env(DEV_TOKENS, "true")
        .start();
    assert_eq!(
        hub.listening,
        format!("listening on 127.0.0.1:{}", hub.port)
    );
    assert!(accepts(Ipv4Addr::LOCALHOST, hub.port), "127.0.0.1 refused");
    assert!(
        !accepts(OTHER_LOOPBACK, hub.port),
        "a dev-token hub answered on {OTHER_LOOPBACK}: it listens beyond 127.0.0.1"
    );
    if let Some(ip) = outward_address() {
        assert!(
            !accepts(ip, hub.port),
            "a dev-token hub answered on this machine's address {ip}"
        );
    }
    log_with(
        &hub,
        "auth.dev_tokens is on and server.host is not set: listening on 127.0.0.1 only",
    );
}

#[test]
fn with_dev_tokens_a_host_from_the_environment_is_obeyed() {
    let hub = Hub::builder(Broker::Memory)
        .env(HOST, &OTHER_LOOPBACK.to_string())
        .env(DEV_TOKENS, "true")
        .start();
    assert_eq!(
        hub.listening,
        format!("listening on {OTHER_LOOPBACK}:{}", hub.port)
    );
    assert!(
        accepts(OTHER_LOOPBACK, hub.port),
        "{OTHER_LOOPBACK} refused"
    );
    assert!(
        !accepts(Ipv4Addr::LOCALHOST, hub.port),
        "answered on 127.0.0.1, not where it was told"
    );
    let log = log_with(&hub, "WebSocket clients connect to");
    assert!(!log.contains("server.host is not set"), "{log}");
}

#[test]
fn with_dev_tokens_a_host_from_the_file_is_obeyed() {
    let hub = Hub::builder(Broker::Memory)
        .unset(HOST)
        .toml("[server]\nhost = \"0.0.0.0\"\n[auth]\ndev_tokens = true")
        .start();
    assert_eq!(hub.listening, format!("listening on 0.0.0.0:{}", hub.port));
    assert!(
        accepts(OTHER_LOOPBACK, hub.port),
        "{OTHER_LOOPBACK} refused"
    );
}

#[test]
fn without_dev_tokens_and_no_host_the_hub_listens_on_every_interface() {
    let hub = Hub::builder(Broker::Memory).unset(HOST).start();
    assert_eq!(hub.listening, format!("listening on 0.0.0.0:{}", hub.port));
    assert!(
        accepts(OTHER_LOOPBACK, hub.port),
        "{OTHER_LOOPBACK} refused"
    );
}

#[test]
fn the_log_names_the_page_to_open_and_the_websocket_url_without_colour_codes() {
    let web = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        web.path().join("index.html"),
        "<!doctype html><title>demo</title>",
    )
    .expect("index.html");
    let hub = Hub::builder(Broker::Memory)
        .unset(HOST)
        .env(DEV_TOKENS, "true")
        .env(
            "SWITCHBOARD__SERVER__STATIC_DIR",
            &web.path().to_string_lossy(),
        )
        .start();
    let port = hub.port;
    let log = log_with(
        &hub,
        &format!("WebSocket clients connect to ws://localhost:{port}/ws?token=<token>"),
    );
    assert!(
        log.contains(&format!("open http://localhost:{port}/ in a browser")),
        "no URL to open in:\n{log}"
    );
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escape codes in a log that is not a terminal:\n{log}"
    );
}

#[test]
fn without_static_files_the_log_names_no_page_to_open() {
    let hub = Hub::builder(Broker::Memory)
        .env("SWITCHBOARD__SERVER__STATIC_DIR", "")
        .start();
    let port = hub.port;
    let log = log_with(
        &hub,
        &format!("WebSocket clients connect to ws://localhost:{port}/ws"),
    );
    assert!(
        !log.contains("http://"),
        "a page to open, but none is served:\n{log}"
    );
}
