//! The docker-compose topology without Docker: Redis, two hubs, and nginx
//! running the very config template the compose file mounts. A client that
//! connects through nginx reaches a client connected to the other hub.

mod support;

use std::process::{Child, Command, Stdio};

use serde_json::json;
use support::*;

struct Nginx {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nginx_binary() -> String {
    for candidate in ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"] {
        if std::path::Path::new(candidate).exists() {
            return candidate.into();
        }
    }
    panic!("nginx is not installed (bash .ci/run installs it: apt-get install nginx-light)");
}

fn start_nginx(hub1: u16, hub2: u16) -> Nginx {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let template = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/nginx/switchboard.conf.template"
    ))
    .expect("template");
    // What nginx's image does with envsubst, for our three variables.
    let site = template
        .replace("${HUB_1}", &format!("127.0.0.1:{hub1}"))
        .replace("${HUB_2}", &format!("127.0.0.1:{hub2}"))
        .replace("${LISTEN_PORT}", &format!("127.0.0.1:{port}"));
    let d = dir.path().display();
    std::fs::write(dir.path().join("switchboard.conf"), site).expect("site");
    let main = format!(
        "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 256; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         include {d}/switchboard.conf;\n}}\n"
    );
    std::fs::write(dir.path().join("nginx.conf"), main).expect("main conf");
    let child = Command::new(nginx_binary())
        .arg("-p")
        .arg(dir.path())
        .arg("-c")
        .arg(dir.path().join("nginx.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nginx");
    let nginx = Nginx {
        child,
        port,
        _dir: dir,
    };
    let start = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < WAIT, "nginx did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    nginx
}

#[tokio::test]
async fn a_client_through_nginx_reaches_a_client_on_the_other_hub() {
    let h1 = Hub::start(Broker::Redis);
    let h2 = Hub::builder(Broker::Redis).prefix(&h1.prefix).start();
    let nginx = start_nginx(h1.port, h2.port);

    let (status, _) = {
        let api = h1.api().await;
        api.call(
            api.http
                .get(format!("http://127.0.0.1:{}/nginx-health", nginx.port)),
        )
        .await
    };
    assert_eq!(status, 200);

    let via_nginx = format!("ws://127.0.0.1:{}/ws", nginx.port);
    let mut alice = Client::connect(&via_nginx, &token("alice")).await;
    // Which hub did nginx pick? Connect bob directly to the other one.
    let api1 = h1.api().await;
    let (_, stats1) = api1.get("/api/stats").await;
    let other = if alice.welcome["instance"] == stats1["instance"] {
        &h2
    } else {
        &h1
    };
    let mut bob = other.connect("bob").await;
    assert_ne!(alice.welcome["instance"], bob.welcome["instance"]);

    alice.join("lb").await;
    bob.join("lb").await;
    alice.publish("lb", json!("through nginx")).await;
    assert_eq!(bob.recv_type("message").await["data"], "through nginx");
    bob.publish("lb", json!("back")).await;
    assert_eq!(alice.request(json!({"type": "ping"})).await["type"], "pong");
    loop {
        let m = alice.recv_type("message").await;
        if m["data"] == "back" {
            break;
        }
    }
    // The HTTP API works through nginx too.
    let api = h1.api().await;
    let (status, body) = api
        .call(
            api.http
                .get(format!(
                    "http://127.0.0.1:{}/api/rooms/lb/presence",
                    nginx.port
                ))
                .bearer_auth(API_KEY),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["users"].as_array().map(Vec::len), Some(2));
}
