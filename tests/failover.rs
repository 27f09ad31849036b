//! The production Redis deployments and their faults, while members
//! publish: a Redis Cluster failing over (`CLUSTER FAILOVER`, a primary
//! SIGKILLed) and moving a busy room's slot, a Sentinel-managed primary
//! failing over, a primary that fails over under the same address, and a
//! Redis paused for two seconds. Every time: no two acked publishes share
//! an id, every acked message is in history, and every member gets every
//! acked message once, in order (see `tests/support/traffic.rs`).

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use support::deployments::{node_cmd, Cluster, Deployment, Sentinels};
use support::traffic::Traffic;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

const FAST: &str = "[limits]\nmessages_per_second = 10000\nburst = 10000\n\
                    [redis]\ninstance_ttl_s = 10\n[history]\nsize = 100000\n";

/// Two hubs on `redis`.
fn pair(redis: &Deployment) -> (Hub, Hub) {
    let a = Hub::builder(Broker::Redis).redis(redis).toml(FAST).start();
    let b = Hub::builder(Broker::Redis)
        .redis(redis)
        .toml(FAST)
        .prefix(&a.prefix)
        .start();
    (a, b)
}

/// Runs traffic on `room`, calls `fault` in the middle of it, and checks
/// the invariants once it settles.
async fn through(hubs: &(Hub, Hub), room: &str, fault: impl FnOnce()) {
    let urls = [hubs.0.ws_url(), hubs.1.ws_url()];
    let traffic = Traffic::start(&urls, room, 4, 2).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    tokio::task::block_in_place(fault);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let api = hubs.0.api().await;
    let result = futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(
        traffic.finish(&api, Duration::from_secs(30)),
    ))
    .await;
    let acked = match result {
        Ok(acked) => acked,
        Err(panic) => {
            if std::env::var_os("FAILOVER_LOGS").is_some() {
                eprintln!("---- hub 1\n{}\n---- hub 2\n{}", hubs.0.log(), hubs.1.log());
            }
            std::panic::resume_unwind(panic)
        }
    };
    assert!(acked > 20, "only {acked} publishes acked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_failover_loses_nothing_acked() {
    let redis = Deployment::Cluster(Cluster::start(3, 1));
    let hubs = pair(&redis);
    let Deployment::Cluster(cluster) = &redis else {
        unreachable!()
    };
    let channel = format!("{}:room:{{busy}}", hubs.0.prefix);
    through(&hubs, "busy", || cluster.failover(&channel)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_cluster_primary_loses_nothing_acked() {
    // A crashed primary takes what it had not replicated yet with it: a
    // publish is acked only once a replica holds it (`wait_replicas`);
    // two replicas each, so that one is left to acknowledge after.
    let mut cluster = Cluster::start(3, 2);
    let url = cluster.url();
    // The deployment for the hubs: same nodes (the test keeps the cluster).
    let hubs = {
        let a = Hub::builder(Broker::Redis)
            .redis_url(&url)
            .env("SWITCHBOARD__REDIS__MODE", "cluster")
            .env("SWITCHBOARD__REDIS__WAIT_REPLICAS", "1")
            .toml(FAST)
            .start();
        let b = Hub::builder(Broker::Redis)
            .redis_url(&url)
            .env("SWITCHBOARD__REDIS__MODE", "cluster")
            .env("SWITCHBOARD__REDIS__WAIT_REPLICAS", "1")
            .toml(FAST)
            .prefix(&a.prefix)
            .start();
        (a, b)
    };
    let channel = format!("{}:room:{{busy}}", hubs.0.prefix);
    let cluster_ref = &mut cluster;
    through(&hubs, "busy", || cluster_ref.kill_master(&channel)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_busy_rooms_slot_moving_loses_nothing_acked() {
    let redis = Deployment::Cluster(Cluster::start(3, 0));
    let hubs = pair(&redis);
    let Deployment::Cluster(cluster) = &redis else {
        unreachable!()
    };
    let channel = format!("{}:room:{{busy}}", hubs.0.prefix);
    through(&hubs, "busy", || cluster.move_slot(&channel)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sentinel_failover_loses_nothing_acked() {
    let redis = Deployment::Sentinel(Sentinels::start());
    let hubs = pair(&redis);
    let Deployment::Sentinel(sentinels) = &redis else {
        unreachable!()
    };
    let before = sentinels.master_port();
    through(&hubs, "busy", || sentinels.failover()).await;
    assert_ne!(sentinels.master_port(), before, "the primary changed");
    // New connections go to the new primary.
    let mut late = hubs.1.connect("late").await;
    late.join("busy").await;
}

/// A TCP proxy in front of a Redis whose target can be switched: the
/// "same name" a managed primary keeps when it fails over. Connections
/// made before a switch stay on the old target.
struct Proxy {
    port: u16,
    target: Arc<Mutex<u16>>,
}

impl Proxy {
    async fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let target = Arc::new(Mutex::new(target));
        let to = target.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let port = *to.lock().unwrap();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(("127.0.0.1", port)).await else {
                        let _ = client.shutdown().await;
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        });
        Proxy { port, target }
    }

    fn switch(&self, port: u16) {
        *self.target.lock().unwrap() = port;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_primary_failing_over_under_its_name_is_followed() {
    let primary = PrivateRedis::start();
    let replica = PrivateRedis::start();
    let primary_port = port_of(&primary.url());
    let replica_port = port_of(&replica.url());
    replica.cmd(&["REPLICAOF", "127.0.0.1", &primary_port.to_string()]);
    eventually_sync("the replica is in sync", || {
        node_cmd(replica_port, &["INFO", "replication"])
            .and_then(|v| redis::from_redis_value::<String>(v).ok())
            .is_some_and(|i| i.contains("master_link_status:up"))
    });
    let proxy = Proxy::start(primary_port).await;
    let url = format!("redis://127.0.0.1:{}", proxy.port);
    let a = Hub::builder(Broker::Redis)
        .redis_url(&url)
        .toml(FAST)
        .start();
    let b = Hub::builder(Broker::Redis)
        .redis_url(&url)
        .toml(FAST)
        .prefix(&a.prefix)
        .start();
    let hubs = (a, b);
    through(&hubs, "busy", || {
        // The managed failover: the replica is promoted, the old primary
        // demoted (it answers READONLY to writes), the name points at the
        // new one; open connections stay where they were.
        node_cmd(replica_port, &["REPLICAOF", "NO", "ONE"]);
        node_cmd(
            primary_port,
            &["REPLICAOF", "127.0.0.1", &replica_port.to_string()],
        );
        proxy.switch(replica_port);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_redis_delays_requests_but_refuses_none() {
    let redis = PrivateRedis::start();
    let hub = Hub::builder(Broker::Redis)
        .redis_url(&redis.url())
        .toml(FAST)
        .start();
    let mut alice = hub.connect("alice").await;
    alice.join("calm").await;
    alice.publish("calm", json!("before")).await;
    let api = hub.api().await;
    redis.cmd(&["CLIENT", "PAUSE", "2000", "WRITE"]);
    // During the pause: a connect, a join, presence and publishes wait
    // and succeed; readiness stays 200.
    let (status, _) = api.call(api.http.get(hub.http("/health/ready"))).await;
    assert_eq!(status, 200, "a stall is not an outage");
    let mut bob = hub.connect("bob").await;
    bob.join("calm").await;
    let presence = bob
        .request(json!({"type": "presence", "room": "calm"}))
        .await;
    assert_eq!(presence["type"], "presence", "{presence}");
    let id = alice.publish("calm", json!("during")).await;
    assert_eq!(bob.recv_type("message").await["id"], id.as_str());
    let (status, _) = api.call(api.http.get(hub.http("/health/ready"))).await;
    assert_eq!(status, 200);
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port")
}

fn eventually_sync(what: &str, mut check: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !check() {
        assert!(start.elapsed() < WAIT, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
