//! Redis deployments a test starts for itself on free loopback ports: a
//! Redis Cluster (`redis-server --cluster-enabled yes`, joined with
//! `redis-cli --cluster create`) and a Sentinel-managed primary (a primary,
//! a replica, three `redis-server --sentinel`), with the faults the tests
//! inject (failovers, a killed primary, a slot moved). Every process is
//! killed when the value is dropped.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, PrivateRedis, WAIT};

/// How long a cluster or sentinel takes to notice a dead primary.
const NODE_TIMEOUT_MS: u64 = 1500;

/// One `redis-server` process.
struct Node {
    port: u16,
    child: Option<Child>,
}

impl Node {
    fn spawn(port: u16, dir: &std::path::Path, extra: &[&str]) -> Node {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (install it: apt-get install redis-server)");
        let node = Node {
            port,
            child: Some(child),
        };
        let start = Instant::now();
        while start.elapsed() < WAIT {
            if node.cmd(&["PING"]).is_some() {
                return node;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("redis-server on port {port} did not start");
    }

    fn cmd(&self, args: &[&str]) -> Option<redis::Value> {
        node_cmd(self.port, args)
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A command to the server on `port` (`None` when it does not answer).
pub fn node_cmd(port: u16, args: &[&str]) -> Option<redis::Value> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
    let mut con = client
        .get_connection_with_timeout(Duration::from_secs(1))
        .ok()?;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(&mut con).ok()
}

/// What `ROLE` says a server is (`master`, `slave`).
fn role(port: u16) -> String {
    node_cmd(port, &["ROLE"])
        .and_then(|v| redis::from_redis_value::<Vec<redis::Value>>(v).ok())
        .and_then(|role| role.into_iter().next())
        .and_then(|r| redis::from_redis_value::<String>(r).ok())
        .unwrap_or_default()
}

fn text(v: Option<redis::Value>) -> String {
    v.and_then(|v| redis::from_redis_value::<String>(v).ok())
        .unwrap_or_default()
}

/// Waits until `check` holds (every 100 ms, up to `limit`).
fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < limit, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A Redis Cluster on loopback.
pub struct Cluster {
    nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

/// A cluster node as `CLUSTER NODES` describes it.
#[derive(Debug, Clone)]
pub struct ClusterNode {
    pub id: String,
    pub port: u16,
    pub master: bool,
    /// A replica's master's id.
    pub master_id: Option<String>,
    pub slots: Vec<(u16, u16)>,
    pub failed: bool,
}

impl Cluster {
    /// `masters` primaries with `replicas` replicas each.
    pub fn start(masters: usize, replicas: usize) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let count = masters * (1 + replicas);
        let timeout = NODE_TIMEOUT_MS.to_string();
        let nodes: Vec<Node> = (0..count)
            .map(|_| {
                let port = free_port();
                let conf = format!("nodes-{port}.conf");
                Node::spawn(
                    port,
                    dir.path(),
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        &conf,
                        "--cluster-node-timeout",
                        &timeout,
                        // A replica may take over however long it was cut off.
                        "--cluster-replica-validity-factor",
                        "0",
                    ],
                )
            })
            .collect();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let status = create
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli --cluster create");
        assert!(status.success(), "redis-cli --cluster create failed");
        let cluster = Cluster { nodes, _dir: dir };
        cluster.wait_ok();
        cluster
    }

    /// Every live node says `cluster_state:ok` and agrees on who serves
    /// every slot.
    pub fn wait_ok(&self) {
        wait_until(
            "cluster_state:ok on every node",
            Duration::from_secs(30),
            || {
                self.nodes
                    .iter()
                    .filter(|n| n.child.is_some())
                    .all(|n| text(n.cmd(&["CLUSTER", "INFO"])).contains("cluster_state:ok"))
            },
        );
        wait_until(
            "every replica in sync with its primary",
            Duration::from_secs(30),
            || {
                self.live().all(|n| {
                    let info = text(n.cmd(&["INFO", "replication"]));
                    info.contains("role:master") || info.contains("master_link_status:up")
                })
            },
        );
    }

    /// The seed URLs, comma-separated (`redis.url` in cluster mode).
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn live(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| n.child.is_some())
    }

    /// The topology, as a live node sees it.
    pub fn topology(&self) -> Vec<ClusterNode> {
        let Some(node) = self.live().next() else {
            return Vec::new();
        };
        let nodes = text(node.cmd(&["CLUSTER", "NODES"]));
        nodes
            .lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                let port = f
                    .get(1)?
                    .split('@')
                    .next()?
                    .rsplit(':')
                    .next()?
                    .parse()
                    .ok()?;
                let flags = f.get(2)?;
                let slots = f
                    .iter()
                    .skip(8)
                    .filter(|s| !s.starts_with('['))
                    .filter_map(|s| match s.split_once('-') {
                        Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                        None => s.parse().ok().map(|n| (n, n)),
                    })
                    .collect();
                Some(ClusterNode {
                    id: f[0].to_owned(),
                    port,
                    master: flags.contains("master"),
                    master_id: f.get(3).filter(|m| **m != "-").map(|m| (*m).to_owned()),
                    slots,
                    failed: flags.contains("fail"),
                })
            })
            .collect()
    }

    /// The slot of a key (or a channel).
    pub fn slot(&self, key: &str) -> u16 {
        let node = self.live().next().expect("a live node");
        redis::from_redis_value(node.cmd(&["CLUSTER", "KEYSLOT", key]).expect("KEYSLOT"))
            .expect("slot")
    }

    /// The primary that serves `key`'s slot.
    pub fn master_of(&self, key: &str) -> ClusterNode {
        self.try_master_of(key).expect("a primary for the slot")
    }

    fn try_master_of(&self, key: &str) -> Option<ClusterNode> {
        let slot = self.slot(key);
        self.topology().into_iter().find(|n| {
            n.master && !n.failed && n.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot))
        })
    }

    /// Runs a command on the node that serves its first key.
    pub fn cmd(&self, key: &str, args: &[&str]) -> Option<redis::Value> {
        node_cmd(self.master_of(key).port, args)
    }

    /// Publishes on a shard channel, as a backend would (`SPUBLISH`).
    pub fn spublish(&self, channel: &str, payload: &str) -> Option<redis::Value> {
        self.cmd(channel, &["SPUBLISH", channel, payload])
    }

    /// Every shard channel some client is subscribed to.
    pub fn shard_channels(&self) -> Vec<String> {
        let mut all = Vec::new();
        for node in self.live() {
            if let Some(v) = node.cmd(&["PUBSUB", "SHARDCHANNELS"]) {
                all.extend(redis::from_redis_value::<Vec<String>>(v).unwrap_or_default());
            }
        }
        all.sort();
        all.dedup();
        all
    }

    /// `CLUSTER FAILOVER` on a replica of `key`'s primary: the replica
    /// takes over, the old primary becomes its replica.
    pub fn failover(&self, key: &str) {
        let master = self.master_of(key);
        let replica = self
            .topology()
            .into_iter()
            .find(|n| n.master_id.as_deref() == Some(master.id.as_str()) && !n.failed)
            .expect("a replica");
        node_cmd(replica.port, &["CLUSTER", "FAILOVER"]);
        wait_until("the replica took over", Duration::from_secs(30), || {
            self.master_of(key).port == replica.port
        });
        self.wait_ok();
    }

    /// SIGKILLs `key`'s primary and waits for a replica to take over.
    pub fn kill_master(&mut self, key: &str) {
        let port = self.master_of(key).port;
        if let Some(node) = self.nodes.iter_mut().find(|n| n.port == port) {
            node.kill();
        }
        wait_until("a replica took over", Duration::from_secs(60), || {
            self.try_master_of(key).is_some_and(|m| m.port != port)
        });
        self.wait_ok();
    }

    /// Moves `key`'s slot, with its keys, to another primary (the steps
    /// `redis-cli --cluster reshard` takes, for one slot).
    pub fn move_slot(&self, key: &str) {
        let slot = self.slot(key).to_string();
        let topology = self.topology();
        let from = self.master_of(key);
        let to = topology
            .iter()
            .find(|n| n.master && !n.failed && n.id != from.id)
            .expect("another primary")
            .clone();
        node_cmd(
            to.port,
            &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from.id],
        );
        node_cmd(
            from.port,
            &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to.id],
        );
        loop {
            let keys: Vec<String> =
                node_cmd(from.port, &["CLUSTER", "GETKEYSINSLOT", &slot, "100"])
                    .and_then(|v| redis::from_redis_value(v).ok())
                    .unwrap_or_default();
            if keys.is_empty() {
                break;
            }
            let port = to.port.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            args.extend(keys.iter().map(String::as_str));
            node_cmd(from.port, &args).expect("MIGRATE");
        }
        for node in topology.iter().filter(|n| n.master && !n.failed) {
            node_cmd(node.port, &["CLUSTER", "SETSLOT", &slot, "NODE", &to.id]);
        }
        wait_until("the slot moved", Duration::from_secs(30), || {
            self.master_of(key).port == to.port
        });
    }
}

/// A primary and its replica watched by three sentinels.
pub struct Sentinels {
    pub master_name: String,
    redis: Vec<Node>,
    sentinels: Vec<Node>,
    _dir: tempfile::TempDir,
}

impl Sentinels {
    pub fn start() -> Sentinels {
        let dir = tempfile::tempdir().expect("tempdir");
        let master = Node::spawn(free_port(), dir.path(), &[]);
        let primary = master.port.to_string();
        let replica = Node::spawn(
            free_port(),
            dir.path(),
            &["--replicaof", "127.0.0.1", &primary],
        );
        let master_name = "sbmaster".to_owned();
        let sentinels = (0..3)
            .map(|i| {
                let port = free_port();
                let conf = dir.path().join(format!("sentinel-{i}.conf"));
                std::fs::write(
                    &conf,
                    format!(
                        "port {port}\nbind 127.0.0.1\n\
                         sentinel monitor {master_name} 127.0.0.1 {primary} 2\n\
                         sentinel down-after-milliseconds {master_name} {NODE_TIMEOUT_MS}\n\
                         sentinel failover-timeout {master_name} 10000\n"
                    ),
                )
                .expect("sentinel.conf");
                let child = Command::new("redis-server")
                    .arg(&conf)
                    .arg("--sentinel")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("redis-server --sentinel");
                let node = Node {
                    port,
                    child: Some(child),
                };
                wait_until("the sentinel answers", WAIT, || {
                    node.cmd(&["PING"]).is_some()
                });
                node
            })
            .collect();
        let setup = Sentinels {
            master_name,
            redis: vec![master, replica],
            sentinels,
            _dir: dir,
        };
        wait_until("the replica is in sync", Duration::from_secs(30), || {
            text(node_cmd(setup.redis[1].port, &["INFO", "replication"]))
                .contains("master_link_status:up")
        });
        let replica = format!("127.0.0.1:{}", setup.redis[1].port);
        wait_until(
            "every sentinel knows the replica",
            Duration::from_secs(30),
            || {
                setup.sentinels.iter().all(|s| {
                    let replicas: Vec<Vec<String>> =
                        node_cmd(s.port, &["SENTINEL", "REPLICAS", &setup.master_name])
                            .and_then(|v| redis::from_redis_value(v).ok())
                            .unwrap_or_default();
                    replicas.iter().flatten().any(|f| *f == replica)
                })
            },
        );
        setup
    }

    /// The sentinels' URLs, comma-separated (`redis.url` in sentinel mode).
    pub fn url(&self) -> String {
        self.sentinels
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The port of the primary the sentinels name.
    pub fn master_port(&self) -> u16 {
        let addr: Vec<String> = node_cmd(
            self.sentinels[0].port,
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", &self.master_name],
        )
        .and_then(|v| redis::from_redis_value(v).ok())
        .unwrap_or_default();
        addr.get(1).and_then(|p| p.parse().ok()).unwrap_or(0)
    }

    /// A command on the current primary.
    pub fn cmd(&self, args: &[&str]) -> Option<redis::Value> {
        node_cmd(self.master_port(), args)
    }

    /// Fails over to the replica (`SENTINEL FAILOVER`) and waits until the
    /// sentinels name it.
    pub fn failover(&self) {
        let before = self.master_port();
        wait_until(
            "a sentinel starts the failover",
            Duration::from_secs(30),
            || {
                node_cmd(
                    self.sentinels[0].port,
                    &["SENTINEL", "FAILOVER", &self.master_name],
                )
                .is_some()
            },
        );
        wait_until(
            "the sentinels name the new primary",
            Duration::from_secs(30),
            || {
                let now = self.master_port();
                now != before && now != 0 && role(now) == "master"
            },
        );
    }
}

/// Where a hub's Redis is.
pub enum Deployment {
    Standalone(PrivateRedis),
    Cluster(Cluster),
    Sentinel(Sentinels),
}

impl Deployment {
    /// `redis.mode`.
    pub fn mode(&self) -> &'static str {
        match self {
            Deployment::Standalone(_) => "standalone",
            Deployment::Cluster(_) => "cluster",
            Deployment::Sentinel(_) => "sentinel",
        }
    }

    /// `redis.url`.
    pub fn url(&self) -> String {
        match self {
            Deployment::Standalone(r) => r.url(),
            Deployment::Cluster(c) => c.url(),
            Deployment::Sentinel(s) => s.url(),
        }
    }

    /// `redis.sentinel_master`.
    pub fn sentinel_master(&self) -> &str {
        match self {
            Deployment::Sentinel(s) => &s.master_name,
            _ => "",
        }
    }

    /// A command on the node that holds `key` (any node on one server).
    pub fn cmd(&self, key: &str, args: &[&str]) -> Option<redis::Value> {
        match self {
            Deployment::Standalone(r) => r.cmd(args),
            Deployment::Cluster(c) => c.cmd(key, args),
            Deployment::Sentinel(s) => s.cmd(args),
        }
    }

    /// Publishes as a backend would: `PUBLISH`, or `SPUBLISH` on a cluster.
    pub fn publish(&self, channel: &str, payload: &str) {
        match self {
            Deployment::Cluster(c) => {
                c.spublish(channel, payload);
            }
            other => {
                other.cmd(channel, &["PUBLISH", channel, payload]);
            }
        }
    }

    /// Runs a command on every node (every primary of a cluster).
    pub fn on_every_node(&self, args: &[&str]) {
        match self {
            Deployment::Cluster(c) => {
                for node in c.topology().iter().filter(|n| n.master && !n.failed) {
                    node_cmd(node.port, args);
                }
            }
            other => {
                other.cmd("", args);
            }
        }
    }

    /// The keys matching `pattern`, on every primary.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let on = |port: u16| -> Vec<String> {
            node_cmd(port, &["KEYS", pattern])
                .and_then(|v| redis::from_redis_value(v).ok())
                .unwrap_or_default()
        };
        let mut all: Vec<String> = match self {
            Deployment::Cluster(c) => c
                .topology()
                .iter()
                .filter(|n| n.master && !n.failed)
                .flat_map(|n| on(n.port))
                .collect(),
            other => other
                .cmd("", &["KEYS", pattern])
                .and_then(|v| redis::from_redis_value(v).ok())
                .unwrap_or_default(),
        };
        all.sort();
        all
    }

    /// The channels subscribed to (shard channels on a cluster).
    pub fn channels(&self) -> Vec<String> {
        match self {
            Deployment::Cluster(c) => c.shard_channels(),
            other => other
                .cmd("", &["PUBSUB", "CHANNELS"])
                .and_then(|v| redis::from_redis_value(v).ok())
                .unwrap_or_default(),
        }
    }
}
