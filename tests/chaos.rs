//! Seeded, bounded chaos: three hubs on one Redis deployment, listeners
//! that stay connected, publishers, and churning clients that join, leave,
//! publish and drop at random, while the test injects faults in a seeded
//! order:
//!
//! - on one Redis (an append-only file fsynced before every reply): the
//!   pub/sub connections killed, Redis paused for writes for 2 s, Redis
//!   SIGKILLed and restarted from its data, one hub SIGKILLed;
//! - on a Redis Cluster: the pub/sub connections killed, every primary
//!   paused for writes for 2 s, a room's primary failing over, one hub
//!   SIGKILLed.
//!
//! Publishers retry an `unavailable` answer with the same
//! `idempotency_key`. After it settles, the cluster state is exact: the
//! live instances, each one's connections, each user's connections, each
//! connection's rooms, each room's members and presence, the channels
//! subscribed, and no other registry key. And every acked message is in
//! history once, and every listener received every acked message of its
//! rooms, in order, exactly once, without being closed.
//!
//! `CHAOS_SEED=n cargo test --test chaos` replays one run's faults and
//! choices; `CHAOS_LOGS=1` prints the hubs' logs when a check fails.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use support::deployments::{Cluster, Deployment};
use support::*;

const ROOMS: [&str; 4] = ["c0", "c1", "c2", "c3"];
const LISTENERS: usize = 8;
const PUBLISHERS: usize = 3;
const CHURNERS: usize = 6;
/// How long clients churn and publish while faults are injected.
const CHURN: Duration = Duration::from_secs(30);

const CONFIG: &str = "[redis]\ninstance_ttl_s = 3\n\
    [limits]\nmessages_per_second = 10000\nburst = 10000\nmax_connections_per_user = 100\n\
    [history]\nsize = 100000\n";

/// A connection that stays: who, where, which rooms.
#[derive(Clone)]
struct Member {
    user: String,
    connection_id: String,
    instance: String,
    rooms: Vec<String>,
}

impl Member {
    fn of(client: &Client, user: &str, rooms: Vec<String>) -> Member {
        Member {
            user: user.to_owned(),
            connection_id: client.connection_id(),
            instance: client.welcome["instance"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            rooms,
        }
    }
}

/// What a listener received, per room, in order.
type Received = Arc<Mutex<HashMap<String, Vec<String>>>>;

struct Listener {
    member: Member,
    received: Received,
    closed: Arc<Mutex<Option<Closed>>>,
}

async fn start_listener(
    hub: &Hub,
    user: &str,
    rooms: Vec<String>,
    stop: Arc<AtomicBool>,
) -> Listener {
    let mut client = hub.connect(user).await;
    for room in &rooms {
        client.join(room).await;
    }
    let received: Received = Arc::default();
    let closed = Arc::new(Mutex::new(None));
    let listener = Listener {
        member: Member::of(&client, user, rooms),
        received: received.clone(),
        closed: closed.clone(),
    };
    tokio::spawn(async move {
        while !stop.load(Ordering::Acquire) {
            match client.next_event(Duration::from_millis(200)).await {
                Some(Ok(frame)) if frame["type"] == "message" => {
                    let room = frame["room"].as_str().unwrap_or_default().to_owned();
                    let id = frame["id"].as_str().unwrap_or_default().to_owned();
                    received.lock().unwrap().entry(room).or_default().push(id);
                }
                Some(Ok(_)) | None => {}
                Some(Err(c)) => {
                    *closed.lock().unwrap() = Some(c);
                    return;
                }
            }
        }
        drop(client);
    });
    listener
}

/// Acked message ids per room.
/// Per room, each acked publish: its id and its (publisher, n).
type Acked = Arc<Mutex<HashMap<String, Vec<(String, (String, String))>>>>;

/// A publisher: joins every room, publishes at random until `stop`,
/// retrying `unavailable` with the same key.
async fn start_publisher(
    hub: &Hub,
    p: usize,
    seed: u64,
    acked: Acked,
    stop: Arc<AtomicBool>,
) -> (Member, tokio::task::JoinHandle<Client>) {
    let user = format!("p{p}");
    let mut client = hub.connect(&user).await;
    for room in ROOMS {
        client.join(room).await;
    }
    let member = Member::of(
        &client,
        &user,
        ROOMS.iter().map(|r| r.to_string()).collect(),
    );
    let task = tokio::spawn(async move {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut n = 0u64;
        while !stop.load(Ordering::Acquire) {
            let room = ROOMS[rng.random_range(0..ROOMS.len())];
            n += 1;
            let frame = json!({"type": "publish", "room": room, "data": {"p": p, "n": n},
                               "idempotency_key": format!("p{p}-{n}")});
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "p{p}: still unavailable after 60 s"
                );
                let reply = request(&mut client, frame.clone(), n)
                    .await
                    .unwrap_or_else(|| panic!("p{p} was closed during the chaos"));
                if reply["type"] == "ack" {
                    let id = reply["id"].as_str().unwrap_or_default().to_owned();
                    acked
                        .lock()
                        .unwrap()
                        .entry(room.to_owned())
                        .or_default()
                        .push((id, (json!(p).to_string(), json!(n).to_string())));
                    break;
                }
                assert_eq!(reply["code"], "unavailable", "p{p}: {reply}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(5..40))).await;
        }
        client
    });
    (member, task)
}

/// Sends `frame` with `ref` = `r` and returns the reply carrying it
/// (frames in between are dropped); `None` when the connection closed.
async fn request(client: &mut Client, mut frame: Value, r: u64) -> Option<Value> {
    frame["ref"] = json!(r);
    client.send(frame).await;
    loop {
        match client.next_event(WAIT).await {
            Some(Ok(reply)) if reply["ref"] == json!(r) => return Some(reply),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return None,
        }
    }
}

/// A client that connects to a random hub, joins, publishes, and leaves
/// or drops, over and over, until `stop`. Refusals (1013 during an
/// outage) and errors are part of the game.
fn start_churner(
    ports: Vec<u16>,
    k: usize,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    tokio::spawn(async move {
        let mut rng = StdRng::seed_from_u64(seed);
        let user = format!("churn{k}");
        while !stop.load(Ordering::Acquire) {
            let port = ports[rng.random_range(0..ports.len())];
            let url = format!("ws://127.0.0.1:{port}/ws?token={}", token(&user));
            let connect = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url));
            let Ok(Ok((mut ws, _))) = connect.await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            for _ in 0..rng.random_range(1..4) {
                let room = ROOMS[rng.random_range(0..ROOMS.len())];
                let kind = if rng.random_bool(0.7) {
                    "join"
                } else {
                    "leave"
                };
                let frame = json!({"type": kind, "room": room}).to_string();
                let _ = ws.send(Message::text(frame)).await;
                if rng.random_bool(0.3) {
                    let frame = json!({"type": "publish", "room": room, "data": "churn"});
                    let _ = ws.send(Message::text(frame.to_string())).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(50..600))).await;
            if rng.random_bool(0.5) {
                let _ = tokio::time::timeout(WAIT, ws.close(None)).await;
            }
            drop(ws);
        }
    })
}

fn seed() -> u64 {
    std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_on_one_redis_leaves_an_exact_state_and_loses_nothing_acked() {
    chaos(Deployment::Standalone(PrivateRedis::durable())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_on_a_redis_cluster_leaves_an_exact_state_and_loses_nothing_acked() {
    chaos(Deployment::Cluster(Cluster::start(3, 1))).await;
}

/// Reads a Redis reply into `T` (its default when absent).
fn read<T: redis::FromRedisValue + Default>(v: Option<redis::Value>) -> T {
    v.and_then(|v| redis::from_redis_value(v).ok())
        .unwrap_or_default()
}

async fn chaos(mut redis: Deployment) {
    let seed = seed();
    eprintln!(
        "chaos seed {seed} on {} (CHAOS_SEED={seed} to replay)",
        redis.mode()
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let first = Hub::builder(Broker::Redis)
        .redis(&redis)
        .toml(CONFIG)
        .start();
    let prefix = first.prefix.clone();
    let second = Hub::builder(Broker::Redis)
        .redis(&redis)
        .prefix(&prefix)
        .toml(CONFIG)
        .start();
    let doomed = Hub::builder(Broker::Redis)
        .redis(&redis)
        .prefix(&prefix)
        .toml(CONFIG)
        .start();
    let hubs = [&first, &second];
    let stop = Arc::new(AtomicBool::new(false));
    let stop_listeners = Arc::new(AtomicBool::new(false));

    let mut listeners = Vec::new();
    for i in 0..LISTENERS {
        let mut rooms: Vec<String> = ROOMS
            .iter()
            .filter(|_| rng.random_bool(0.6))
            .map(|r| r.to_string())
            .collect();
        if rooms.is_empty() {
            rooms.push(ROOMS[i % ROOMS.len()].to_owned());
        }
        let hub = hubs[i % hubs.len()];
        listeners.push(start_listener(hub, &format!("l{i}"), rooms, stop_listeners.clone()).await);
    }
    let acked: Acked = Arc::default();
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let hub = hubs[p % hubs.len()];
        let seed = rng.random();
        publishers.push(start_publisher(hub, p, seed, acked.clone(), stop.clone()).await);
    }
    let ports = vec![first.port, second.port, doomed.port];
    let churners: Vec<_> = (0..CHURNERS)
        .map(|k| start_churner(ports.clone(), k, rng.random(), stop.clone()))
        .collect();

    // The faults, in a seeded order, spread over the churn.
    let mut faults = match redis {
        Deployment::Cluster(_) => ["kill-pubsub", "pause", "failover", "kill-hub"],
        _ => ["kill-pubsub", "pause", "restart", "kill-hub"],
    };
    for i in (1..faults.len()).rev() {
        faults.swap(i, rng.random_range(0..=i));
    }
    let step = CHURN / (faults.len() as u32 + 1);
    let mut doomed = Some(doomed);
    for fault in faults {
        tokio::time::sleep(step).await;
        eprintln!("fault: {fault}");
        match fault {
            "kill-pubsub" => redis.on_every_node(&["CLIENT", "KILL", "TYPE", "pubsub"]),
            "pause" => redis.on_every_node(&["CLIENT", "PAUSE", "2000", "WRITE"]),
            "restart" => {
                let down = Duration::from_millis(rng.random_range(500..2000));
                if let Deployment::Standalone(r) = &mut redis {
                    tokio::task::block_in_place(|| r.crash_and_restart(down));
                }
            }
            "failover" => {
                if let Deployment::Cluster(c) = &redis {
                    let channel = format!("{prefix}:room:{{c0}}");
                    tokio::task::block_in_place(|| c.failover(&channel));
                }
            }
            _ => {
                if let Some(hub) = doomed.take() {
                    hub.signal("KILL");
                    drop(hub);
                }
            }
        }
    }
    tokio::time::sleep(step).await;
    stop.store(true, Ordering::Release);
    for churner in churners {
        churner.await.expect("churner");
    }
    let mut members: Vec<Member> = listeners.iter().map(|l| l.member.clone()).collect();
    let mut publisher_clients = Vec::new();
    for (member, task) in publishers {
        members.push(member);
        publisher_clients.push(task.await.expect("publisher"));
    }

    let checks = async {
        check_state(&redis, &prefix, &members).await;
        check_messages(&redis, &prefix, &listeners, &acked, seed).await;
    };
    let result = futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(checks)).await;
    if let Err(panic) = result {
        if std::env::var_os("CHAOS_LOGS").is_some() {
            eprintln!("---- hub 1\n{}\n---- hub 2\n{}", first.log(), second.log());
        }
        std::panic::resume_unwind(panic);
    }
    stop_listeners.store(true, Ordering::Release);
    drop(publisher_clients);
}

/// Waits until `get` answers `want` (panics with the last answer after
/// 20 s).
async fn settled<T: PartialEq + std::fmt::Debug>(what: &str, want: &T, mut get: impl FnMut() -> T) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let got = get();
        if &got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: wanted {want:?}, Redis holds {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Once it settles, Redis holds exactly the live connections, rooms,
/// presence and subscriptions, and no other registry key.
async fn check_state(redis: &Deployment, prefix: &str, members: &[Member]) {
    let live_instances: BTreeSet<String> = members.iter().map(|m| m.instance.clone()).collect();
    settled("the live instances", &live_instances, || {
        let key = format!("{prefix}:instances");
        read(redis.cmd(&key, &["SMEMBERS", &key]))
    })
    .await;

    // The registry keys there should be, and what each holds.
    let mut want: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut hash = |key: String, field: &str, value: String| {
        want.entry(key).or_default().insert(field.to_owned(), value);
    };
    for m in members {
        let c = &m.connection_id;
        hash(
            format!("{prefix}:instance_conns:{{{}}}", m.instance),
            c,
            m.user.clone(),
        );
        hash(format!("{prefix}:conns:{{{}}}", m.user), c, String::new());
        for room in &m.rooms {
            hash(
                format!("{prefix}:conn_rooms:{{{}}}:{c}", m.instance),
                room,
                String::new(),
            );
            hash(format!("{prefix}:members:{{{room}}}"), c, m.user.clone());
        }
    }
    let mut presence: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for m in members {
        for room in &m.rooms {
            *presence
                .entry(format!("{prefix}:presence:{{{room}}}"))
                .or_default()
                .entry(m.user.clone())
                .or_default() += 1;
        }
    }
    for key in presence.keys() {
        want.entry(key.clone()).or_default();
    }
    let kinds = [
        "instance_conns",
        "conns",
        "conn_rooms",
        "members",
        "presence",
    ];
    let registry_keys = || -> BTreeSet<String> {
        kinds
            .iter()
            .flat_map(|k| redis.keys(&format!("{prefix}:{k}:*")))
            .collect()
    };
    let want_keys: BTreeSet<String> = want.keys().cloned().collect();
    settled("exactly the live registry keys", &want_keys, registry_keys).await;

    // What each key holds, as "field=value" lines, against what it should.
    let held = |key: &str| -> BTreeSet<String> {
        if key.contains(":presence:") {
            let got: BTreeMap<String, i64> = read(redis.cmd(key, &["HGETALL", key]));
            got.iter().map(|(f, v)| format!("{f}={v}")).collect()
        } else if key.contains(":conn_rooms:") {
            read(redis.cmd(key, &["SMEMBERS", key]))
        } else if key.contains(":conns:") {
            read(redis.cmd(key, &["HKEYS", key]))
        } else {
            let got: BTreeMap<String, String> = read(redis.cmd(key, &["HGETALL", key]));
            got.iter().map(|(f, v)| format!("{f}={v}")).collect()
        }
    };
    let wanted = |key: &str, fields: &BTreeMap<String, String>| -> BTreeSet<String> {
        if key.contains(":presence:") {
            presence[key]
                .iter()
                .map(|(f, v)| format!("{f}={v}"))
                .collect()
        } else if key.contains(":conn_rooms:") || key.contains(":conns:") {
            fields.keys().cloned().collect()
        } else {
            fields.iter().map(|(f, v)| format!("{f}={v}")).collect()
        }
    };
    let want_contents: BTreeMap<String, BTreeSet<String>> = want
        .iter()
        .map(|(key, fields)| (key.clone(), wanted(key, fields)))
        .collect();
    // A connection closed at the end may still be leaving its rooms.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let wrong: Vec<String> = want_contents
            .iter()
            .filter_map(|(key, fields)| {
                let got = held(key);
                (&got != fields).then(|| format!("{key}: wanted {fields:?}, Redis holds {got:?}"))
            })
            .collect();
        if wrong.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "registry contents differ:\n{}",
            wrong.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut want_channels: BTreeSet<String> = ROOMS
        .iter()
        .map(|r| format!("{prefix}:room:{{{r}}}"))
        .collect();
    for m in members {
        want_channels.insert(format!("{prefix}:user:{{{}}}", m.user));
    }
    want_channels.insert(format!("{prefix}:broadcast"));
    let ours = |c: &String| c.starts_with(&format!("{prefix}:"));
    settled(
        "the channels of the live rooms and users",
        &want_channels,
        || redis.channels().into_iter().filter(ours).collect(),
    )
    .await;
}

/// Every acked message is in history once, and reached every listener of
/// its room in order, once.
async fn check_messages(
    redis: &Deployment,
    prefix: &str,
    listeners: &[Listener],
    acked: &Acked,
    seed: u64,
) {
    let acked = acked.lock().unwrap().clone();
    for room in ROOMS {
        let key = format!("{prefix}:history:{{{room}}}");
        let history: redis::streams::StreamRangeReply = redis
            .cmd(&key, &["XRANGE", &key, "-", "+"])
            .and_then(|v| redis::from_redis_value(v).ok())
            .expect("history");
        // History: id -> the publish stored under it.
        let mut stored: BTreeMap<String, Option<(String, String)>> = BTreeMap::new();
        let mut published = BTreeSet::new();
        for entry in &history.ids {
            // The stored body is the frame after its `{"id":"…",`.
            let body: Value = entry
                .get::<String>("b")
                .and_then(|b| serde_json::from_str(&format!("{{{b}")).ok())
                .unwrap_or_else(|| panic!("{room}'s history entry {} is not a frame", entry.id));
            let data = &body["data"];
            let publish = data
                .get("p")
                .map(|p| (p.to_string(), data["n"].to_string()));
            if let Some(publish) = &publish {
                assert!(
                    published.insert(publish.clone()),
                    "{publish:?} stored twice in {room} (seed {seed})"
                );
            }
            stored.insert(entry.id.clone(), publish);
        }
        let acks = acked.get(room).cloned().unwrap_or_default();
        assert!(!acks.is_empty(), "nothing acked into {room}");
        // Each ack names the history entry of that very publish: so no two
        // publishes were acked with one id, and none acked is missing.
        for (id, publish) in &acks {
            match stored.get(id) {
                Some(Some(held)) => assert_eq!(
                    held, publish,
                    "{publish:?} was acked with {id}, which is {held:?} in {room}'s history (seed {seed})"
                ),
                _ => panic!("acked {id} ({publish:?}) is not in {room}'s history (seed {seed})"),
            }
        }
        let must: Vec<String> = acks.into_iter().map(|(id, _)| id).collect();
        for l in listeners
            .iter()
            .filter(|l| l.member.rooms.iter().any(|r| r == room))
        {
            let user = &l.member.user;
            assert_eq!(
                *l.closed.lock().unwrap(),
                None,
                "listener {user} was closed (seed {seed})"
            );
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            let got = loop {
                let got = l
                    .received
                    .lock()
                    .unwrap()
                    .get(room)
                    .cloned()
                    .unwrap_or_default();
                let missing: Vec<&String> = must.iter().filter(|id| !got.contains(id)).collect();
                if missing.is_empty() {
                    break got;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{user} missed {} of {} acked messages in {room}: {:?}… (seed {seed})",
                    missing.len(),
                    must.len(),
                    &missing[..missing.len().min(8)]
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            let pairs: Vec<(u64, u64)> = got.iter().map(|id| id_pair(&json!(id))).collect();
            for w in pairs.windows(2) {
                assert!(
                    w[0] < w[1],
                    "{user} in {room}: {:?} then {:?}, out of order or twice (seed {seed})",
                    w[0],
                    w[1]
                );
            }
        }
    }
}
