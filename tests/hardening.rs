//! Hardening: behaviour the hub promises under pipelining, edge inputs,
//! closes, churn, stalls and reconnects (docs/protocol.md),
//! over real sockets and HTTP, against both brokers where it is the same.

mod support;

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::SinkExt;
use serde_json::{json, Value};
use support::*;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

// ---- helpers ----

/// Two hubs sharing one Redis prefix (a cluster).
fn pair(toml: &str) -> (Hub, Hub) {
    let a = Hub::builder(Broker::Redis).toml(toml).start();
    let b = Hub::builder(Broker::Redis)
        .toml(toml)
        .prefix(&a.prefix)
        .start();
    (a, b)
}

/// Two hubs sharing one prefix on a private Redis.
fn pair_on(redis: &PrivateRedis, toml: &str) -> (Hub, Hub) {
    let a = Hub::builder(Broker::Redis)
        .redis_url(&redis.url())
        .toml(toml)
        .start();
    let b = Hub::builder(Broker::Redis)
        .redis_url(&redis.url())
        .toml(toml)
        .prefix(&a.prefix)
        .start();
    (a, b)
}

/// Retries `check` every 100 ms until it returns `Ok`, for up to `limit`;
/// on time-out panics with the last thing it saw.
async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + limit;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(last) => {
                if Instant::now() >= deadline {
                    panic!("never happened within {limit:?}: {what}; last seen: {last}");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One Redis command on a fresh connection, typed.
fn redis_query<T: redis::FromRedisValue>(url: &str, args: &[&str]) -> Result<T, String> {
    let client = redis::Client::open(url).map_err(|e| format!("open {url}: {e}"))?;
    let mut con = client
        .get_connection_with_timeout(Duration::from_secs(2))
        .map_err(|e| format!("connect {url}: {e}"))?;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(&mut con)
        .map_err(|e| format!("{}: {e}", args.join(" ")))
}

/// Writes all frames in one flush, without waiting for any reply.
async fn send_batch(c: &mut Client, frames: &[Value]) {
    for f in frames {
        c.ws.feed(Message::text(f.to_string()))
            .await
            .expect("feed frame");
    }
    c.ws.flush().await.expect("flush frames");
}

/// Reads until `n` frames carrying a `ref` arrived, then keeps reading until
/// `drain` passes with nothing new (to catch extra replies). Frames without
/// a `ref` (joined, left, message…) are skipped. Panics with what it has on
/// a close or a time-out.
async fn replies_with_ref(c: &mut Client, n: usize, drain: Duration) -> Vec<Value> {
    let mut replies = Vec::new();
    while replies.len() < n {
        match c.next_event(WAIT).await {
            Some(Ok(f)) if f.get("ref").is_some() => replies.push(f),
            Some(Ok(_)) => {}
            Some(Err(closed)) => {
                panic!(
                    "closed {closed:?} after {} of {n} replies: {replies:?}",
                    replies.len()
                )
            }
            None => panic!(
                "no frame within {WAIT:?} after {} of {n} replies: {replies:?}",
                replies.len()
            ),
        }
    }
    loop {
        match c.next_event(drain).await {
            Some(Ok(f)) if f.get("ref").is_some() => replies.push(f),
            Some(Ok(_)) => {}
            _ => return replies,
        }
    }
}

/// Every frame until the close, and the close.
async fn frames_until_close(c: &mut Client) -> (Vec<Value>, Closed) {
    let mut frames = Vec::new();
    loop {
        match c.next_event(WAIT).await {
            Some(Ok(f)) => frames.push(f),
            Some(Err(closed)) => return (frames, closed),
            None => panic!("no close within {WAIT:?}; frames so far: {frames:?}"),
        }
    }
}

/// Connects and returns the client if the first frame is `welcome`, else
/// what came instead.
async fn try_connect(url: &str, token: &str) -> Result<Client, String> {
    let mut c = Client::connect_raw(&format!("{url}?token={token}"), &[]).await;
    match c.next_event(WAIT).await {
        Some(Ok(w)) if w["type"] == "welcome" => {
            c.welcome = w;
            Ok(c)
        }
        Some(Ok(other)) => Err(format!("first frame {other}")),
        Some(Err(closed)) => Err(format!("closed {closed:?}")),
        None => Err(format!("nothing within {WAIT:?}")),
    }
}

async fn ready(hub: &Hub) -> (u16, Value) {
    let api = hub.api().await;
    api.call(api.http.get(hub.http("/health/ready"))).await
}

/// `[[[…1…]]]`, `depth` arrays deep.
fn nested(depth: usize) -> Value {
    let text = format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
    serde_json::from_str(&text).expect("nested JSON")
}

/// The JSON values every publish path must carry unchanged.
fn edge_values() -> Vec<Value> {
    vec![
        json!(null),
        json!(false),
        json!(0),
        json!(""),
        json!([]),
        json!({}),
        nested(100),
    ]
}

const FAST: &str = "[limits]\nmessages_per_second = 100000\nburst = 100000";

// ---- 1. one reply per request, in request order ----

both_brokers!(
    pipelined_requests_are_answered_once_each_in_order,
    |broker| async move {
        let hub = Hub::start(broker);
        let mut c = hub.connect("alice").await;
        send_batch(
            &mut c,
            &[
                json!({"type": "join", "room": "r1", "ref": 1}),
                json!({"type": "leave", "room": "r1", "ref": 2}),
                json!({"type": "join", "room": "r1", "ref": 3}),
                json!({"type": "ping", "ref": 4}),
                json!({"type": "presence", "room": "r1", "ref": 5}),
            ],
        )
        .await;
        let replies = replies_with_ref(&mut c, 5, Duration::from_millis(500)).await;
        let refs: Vec<Value> = replies.iter().map(|f| f["ref"].clone()).collect();
        assert_eq!(
            refs,
            vec![json!(1), json!(2), json!(3), json!(4), json!(5)],
            "refs of the replies in arrival order (expected left, got right); replies: {replies:?}"
        );
        let types: Vec<Value> = replies.iter().map(|f| f["type"].clone()).collect();
        assert_eq!(
            types,
            vec![
                json!("ack"),
                json!("ack"),
                json!("ack"),
                json!("pong"),
                json!("presence")
            ],
            "reply types; replies: {replies:?}"
        );
    }
);

// ---- 2. edge and out-of-range `since` ----

both_brokers!(
    edge_since_values_are_acked_and_the_instance_stays_in_service,
    |broker| async move {
        let hub = Hub::start(broker);
        let mut writer = hub.connect("writer").await;
        writer.join("hist").await;
        let retained = writer.publish("hist", json!("retained")).await;
        let mut c = hub.connect("alice").await;
        let edges = [
            "18446744073709551615-18446744073709551615",
            "0-0",
            "18446744073709551615-0",
        ];
        for (i, since) in edges.iter().enumerate() {
            for room in ["hist".to_owned(), format!("empty{i}")] {
                let ack = c
                    .request(json!({"type": "join", "room": room, "since": since}))
                    .await;
                assert_eq!(
                    ack["type"], "ack",
                    "join {room} since {since}: expected an ack, got {ack}"
                );
                let ack = c.request(json!({"type": "leave", "room": room})).await;
                assert_eq!(
                    ack["type"], "ack",
                    "leave {room} after since {since}: expected an ack, got {ack}"
                );
            }
            let pong = c.request(json!({"type": "ping"})).await;
            assert_eq!(pong["type"], "pong", "after since {since}: {pong}");
        }
        // `0-0` replays what is retained.
        let mut d = hub.connect("dave").await;
        let ack = d
            .request(json!({"type": "join", "room": "hist", "since": "0-0"}))
            .await;
        assert_eq!(ack["type"], "ack", "join hist since 0-0: {ack}");
        let m = d.recv_type("message").await;
        assert_eq!(
            (m["id"].clone(), m["data"].clone()),
            (json!(retained), json!("retained")),
            "replay after 0-0: expected the retained message, got {m}"
        );
        // An id past u64 is malformed.
        let e = c
            .request(json!({"type": "join", "room": "hist", "since": "99999999999999999999999-0"}))
            .await;
        assert_eq!(
            (e["type"].clone(), e["code"].clone()),
            (json!("error"), json!("bad_request")),
            "since overflowing u64: expected error bad_request, got {e}"
        );
        assert_eq!(c.request(json!({"type": "ping"})).await["type"], "pong");
        // Still in service: ready stays 200 and new connections are welcomed.
        for probe in 0..5 {
            let (status, body) = ready(&hub).await;
            assert_eq!(
                status, 200,
                "/health/ready probe {probe} after edge since values: {body}"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        if let Err(got) = try_connect(&hub.ws_url(), &token("newcomer")).await {
            panic!("a new connection after edge since values: expected welcome, got {got}");
        }
    }
);

// ---- 3. any JSON data round-trips ----

both_brokers!(any_json_data_round_trips, |broker| async move {
    let hub = Hub::start(broker);
    let mut member = hub.connect("member").await;
    member.join("d").await;
    let mut publisher = hub.connect("publisher").await;
    publisher.join("d").await;
    let api = hub.api().await;
    for v in edge_values() {
        let id = publisher.publish("d", v.clone()).await;
        let m = member.recv_type("message").await;
        assert_eq!(m["id"], id.as_str(), "{m}");
        assert_eq!(
            m.get("data"),
            Some(&v),
            "client publish: expected data {v}, got frame {m}"
        );
        let id = api.publish_room("d", v.clone()).await;
        let m = member.recv_type("message").await;
        assert_eq!(m["id"], id.as_str(), "{m}");
        assert_eq!(
            m.get("data"),
            Some(&v),
            "API publish: expected data {v}, got frame {m}"
        );
    }
});

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_and_other_edge_data_cross_instances() {
    let (h1, h2) = pair("");
    let mut member = h1.connect("member").await;
    member.join("n").await;
    let mut publisher = h2.connect("publisher").await;
    publisher.join("n").await;
    for v in edge_values() {
        let id = publisher.publish("n", v.clone()).await;
        let m = member.recv_type("message").await;
        assert_eq!(m["id"], id.as_str(), "{m}");
        assert_eq!(
            m.get("data"),
            Some(&v),
            "published on hub 2, received on hub 1: expected data {v}, got frame {m}"
        );
    }
}

// ---- 4. closes come behind what was queued before them ----

both_brokers!(
    rate_limit_errors_arrive_before_the_rate_limit_close,
    |broker| async move {
        let hub = Hub::builder(broker)
            .toml("[limits]\nmessages_per_second = 1\nburst = 1\nrate_limit_strikes = 3")
            .start();
        let mut c = hub.connect("alice").await;
        let pings: Vec<Value> = (0..5).map(|i| json!({"type": "ping", "ref": i})).collect();
        send_batch(&mut c, &pings).await;
        let (frames, closed) = frames_until_close(&mut c).await;
        assert_eq!(
            frames.first(),
            Some(&json!({"type": "pong", "ref": 0})),
            "first frame: expected the pong; frames before the close: {frames:?}"
        );
        let errors: Vec<&Value> = frames[1..].iter().collect();
        assert!(
            errors
                .iter()
                .all(|e| e["type"] == "error" && e["code"] == "rate_limited"),
            "after the pong only rate_limited errors expected; frames before the close: {frames:?}"
        );
        assert!(
            errors.len() >= 2,
            "expected at least rate_limit_strikes - 1 = 2 rate_limited errors before the close, \
             got {}; frames before the close: {frames:?}",
            errors.len()
        );
        let refs: Vec<Value> = errors.iter().map(|e| e["ref"].clone()).collect();
        let expected: Vec<Value> = (1..=errors.len()).map(|i| json!(i)).collect();
        assert_eq!(refs, expected, "refs of the rate_limited errors");
        assert_eq!(
            closed,
            Closed {
                code: 1008,
                reason: "rate limit".into()
            }
        );
    }
);

both_brokers!(
    messages_published_before_a_kick_arrive_before_the_kicked_close,
    |broker| async move {
        let hub = Hub::start(broker);
        let mut member = hub.connect("member").await;
        member.join("k").await;
        let api = hub.api().await;
        let mut ids = Vec::new();
        for n in 0..3 {
            ids.push(json!(api.publish_room("k", json!({"n": n})).await));
        }
        let (status, body) = api.post("/api/users/member/disconnect", json!({})).await;
        assert_eq!(status, 200, "kick: {body}");
        let (frames, closed) = frames_until_close(&mut member).await;
        let got: Vec<Value> = frames
            .iter()
            .filter(|f| f["type"] == "message")
            .map(|f| f["id"].clone())
            .collect();
        assert_eq!(
            got, ids,
            "ids of the messages received before the close (left) vs published before the kick \
             (right); all frames: {frames:?}"
        );
        assert_eq!(
            closed,
            Closed {
                code: 1008,
                reason: "kicked".into()
            }
        );
    }
);

// ---- 5. churn leaves no Redis subscription behind ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rapid_joins_and_leaves_leave_no_room_subscription_behind() {
    let hub = Hub::builder(Broker::Redis).toml(FAST).start();
    let url = redis_url();
    let pattern = format!("{}:room:{{*", hub.prefix);
    let channels = {
        let (url, pattern) = (url.clone(), pattern.clone());
        move || redis_query::<Vec<String>>(&url, &["PUBSUB", "CHANNELS", &pattern])
    };
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(hub.connect(&format!("churn{i}")).await);
    }
    // The channel exists while a member is joined (so "empty" below means something).
    clients[0].join("room0").await;
    let subscribed = channels().expect("PUBSUB CHANNELS");
    assert!(
        subscribed.contains(&format!("{}:room:{{room0}}", hub.prefix)),
        "room0 joined: expected its channel among {subscribed:?}"
    );
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            tokio::spawn(async move {
                let mut frames = Vec::new();
                let mut r = 0;
                let mut frame = |kind: &str, room: String| {
                    r += 1;
                    json!({"type": kind, "room": room, "ref": r})
                };
                for n in 0..50 {
                    let room = format!("room{}", (n + i) % 5);
                    frames.push(frame("join", room.clone()));
                    frames.push(frame("leave", room));
                }
                for k in 0..5 {
                    frames.push(frame("join", format!("room{k}")));
                }
                for k in 0..5 {
                    frames.push(frame("leave", format!("room{k}")));
                }
                send_batch(&mut c, &frames).await;
                let replies =
                    replies_with_ref(&mut c, frames.len(), Duration::from_millis(200)).await;
                assert_eq!(
                    replies.len(),
                    frames.len(),
                    "connection {i}: one reply per request"
                );
                for (sent, reply) in frames.iter().zip(&replies) {
                    assert_eq!(
                        (reply["type"].clone(), reply["ref"].clone()),
                        (json!("ack"), sent["ref"].clone()),
                        "connection {i}: reply to {sent}: got {reply}"
                    );
                }
                c
            })
        })
        .collect();
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(t.await.expect("churn task"));
    }
    for c in clients {
        c.close().await;
    }
    wait_for(
        "every room channel of the prefix unsubscribed",
        Duration::from_secs(15),
        || {
            let channels = channels.clone();
            async move {
                match channels() {
                    Ok(list) if list.is_empty() => Ok(()),
                    Ok(list) => Err(format!("still subscribed: {list:?}")),
                    Err(e) => Err(e),
                }
            }
        },
    )
    .await;
}

// ---- 6. presence after join/leave/join ----

both_brokers!(
    presence_survives_join_leave_join_of_one_connection,
    |broker| async move {
        let hub = Hub::start(broker);
        let mut c = hub.connect("alice").await;
        let api = hub.api().await;
        let alone = json!([{"user": "alice", "connections": 1}]);
        for round in 0..5u64 {
            let room = format!("p{round}");
            let base = round * 10;
            send_batch(
                &mut c,
                &[
                    json!({"type": "join", "room": room, "ref": base + 1}),
                    json!({"type": "leave", "room": room, "ref": base + 2}),
                    json!({"type": "join", "room": room, "ref": base + 3}),
                ],
            )
            .await;
            let acks = replies_with_ref(&mut c, 3, Duration::from_millis(100)).await;
            assert!(
                acks.iter().all(|a| a["type"] == "ack"),
                "round {round}: join/leave/join replies: {acks:?}"
            );
            c.send(json!({"type": "presence", "room": room, "ref": base + 4}))
                .await;
            let p = replies_with_ref(&mut c, 1, Duration::from_millis(100)).await;
            assert_eq!(
                p[0]["users"], alone,
                "round {round}: presence after join/leave/join: expected {alone}, got {:?}",
                p
            );
            let (status, body) = api.get(&format!("/api/rooms/{room}/presence")).await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(
                body["users"], alone,
                "round {round}: GET /api/rooms/{room}/presence: expected users {alone}, got {body}"
            );
        }
    }
);

// ---- 7. clean-up survives a stalled Redis ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_up_during_a_stalled_redis_frees_the_registry_and_the_users_slot() {
    let redis = PrivateRedis::start();
    let hub = Hub::builder(Broker::Redis)
        .redis_url(&redis.url())
        .toml("[limits]\nmax_connections_per_user = 1")
        .start();
    let url = redis.url();
    let user_key = format!("{}:conns:{{alice}}", hub.prefix);
    let alice = hub.connect("alice").await;
    let registered: i64 = redis_query(&url, &["HLEN", &user_key]).expect("HLEN");
    assert_eq!(registered, 1, "alice registered in {user_key}");
    let paused = redis.cmd(&["CLIENT", "PAUSE", "3000", "ALL"]);
    assert!(paused.is_some(), "CLIENT PAUSE refused");
    let paused_at = Instant::now();
    alice.close().await;
    tokio::time::sleep_until(paused_at + Duration::from_millis(3500)).await;
    wait_for(
        "alice's registry entry and per-user count cleared",
        Duration::from_secs(30),
        || {
            let (url, user_key) = (url.clone(), user_key.clone());
            async move {
                let conns: i64 = redis_query(&url, &["HLEN", &user_key])?;
                if conns == 0 {
                    Ok(())
                } else {
                    Err(format!("HLEN {user_key} = {conns}"))
                }
            }
        },
    )
    .await;
    let ws = hub.ws_url();
    wait_for("alice can connect again", Duration::from_secs(30), || {
        let ws = ws.clone();
        async move { try_connect(&ws, &token("alice")).await.map(|_| ()) }
    })
    .await;
}

// ---- 8. a pub/sub reconnect is not a gap ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pubsub_reconnect_loses_and_doubles_nothing() {
    let redis = PrivateRedis::start();
    let (h1, h2) = pair_on(&redis, "");
    let mut member = h1.connect("member").await;
    member.join("g").await;
    let mut publisher = h2.connect("publisher").await;
    publisher.join("g").await;
    let warm = publisher.publish("g", json!("warm-up")).await;
    let m = member.recv_type("message").await;
    assert_eq!(m["id"], warm.as_str(), "warm-up before the kill: {m}");

    let killed = redis_query::<i64>(&redis.url(), &["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert!(
        matches!(killed, Ok(n) if n >= 2),
        "CLIENT KILL TYPE pubsub: expected both hubs' subscribers killed, got {killed:?}"
    );
    let mut acked = Vec::new();
    for n in 0..20 {
        acked.push(publisher.publish("g", json!({"n": n})).await);
    }
    let mut got: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    // Until all 20 came (or the deadline), then one more second for extras.
    let mut extra_until = None;
    loop {
        let until = extra_until.unwrap_or(deadline);
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match member.next_event(left).await {
            Some(Ok(f)) if f["type"] == "message" && f["data"].get("n").is_some() => {
                got.push(f["id"].as_str().unwrap_or_default().to_owned());
                if got.len() >= acked.len() && extra_until.is_none() {
                    extra_until = Some(Instant::now() + Duration::from_secs(1));
                }
            }
            Some(Ok(_)) => {}
            Some(Err(closed)) => panic!("member closed {closed:?}; received so far {got:?}"),
            None => break,
        }
    }
    assert_eq!(
        got, acked,
        "ids received on hub 1 after the pub/sub kill (left) vs ids acked on hub 2 (right)"
    );
}

// ---- 9. the `direct` claim ----

both_brokers!(direct_respects_the_direct_claim, |broker| async move {
    let hub = Hub::start(broker);
    let mut bob = hub.connect("bob").await;
    let mut carol = hub.connect("carol").await;
    let limited = token_with(json!({"sub": "alice", "direct": ["bob"]}));
    let mut alice = Client::connect(&hub.ws_url(), &limited).await;
    let ack = alice
        .request(json!({"type": "direct", "to": "bob", "data": "hi bob"}))
        .await;
    assert_eq!(ack["type"], "ack", "direct to bob with direct=[bob]: {ack}");
    id_pair(&ack["id"]);
    let d = bob.recv_type("direct").await;
    assert_eq!(
        (d["from"].clone(), d["data"].clone()),
        (json!("alice"), json!("hi bob"))
    );
    let e = alice
        .request(json!({"type": "direct", "to": "carol", "data": "hi carol"}))
        .await;
    assert_eq!(
        (e["type"].clone(), e["code"].clone()),
        (json!("error"), json!("forbidden")),
        "direct to carol with direct=[bob]: expected error forbidden, got {e}"
    );
    carol.expect_silence(Duration::from_millis(300)).await;
    // Without the claim, auth.default_direct = ["*"].
    let mut dave = hub.connect("dave").await;
    let ack = dave
        .request(json!({"type": "direct", "to": "carol", "data": "from dave"}))
        .await;
    assert_eq!(ack["type"], "ack", "direct without a direct claim: {ack}");
    id_pair(&ack["id"]);
    assert_eq!(carol.recv_type("direct").await["data"], "from dave");
});

// ---- 10. refresh to fewer rooms ----

both_brokers!(
    refresh_to_fewer_rooms_leaves_the_rooms_no_longer_allowed,
    |broker| async move {
        let hub = Hub::start(broker);
        let everything = token_with(json!({"sub": "alice", "rooms": ["*"]}));
        let mut alice = Client::connect(&hub.ws_url(), &everything).await;
        alice.join("a.1").await;
        alice.join("b.1").await;
        let narrower = token_with(json!({"sub": "alice", "rooms": ["a.*"]}));
        let ack = alice
            .request(json!({"type": "refresh", "token": narrower}))
            .await;
        assert_eq!(ack["type"], "ack", "refresh: {ack}");
        assert_eq!(
            ack["left"],
            json!(["b.1"]),
            "refresh ack: expected left [\"b.1\"], got {ack}"
        );
        let e = alice
            .request(json!({"type": "publish", "room": "b.1", "data": 1}))
            .await;
        assert_eq!(
            (e["type"].clone(), e["code"].clone()),
            (json!("error"), json!("forbidden")),
            "publish to b.1 after the refresh: expected error forbidden, got {e}"
        );
        let e = alice.request(json!({"type": "join", "room": "b.1"})).await;
        assert_eq!(
            (e["type"].clone(), e["code"].clone()),
            (json!("error"), json!("forbidden")),
            "join b.1 after the refresh: expected error forbidden, got {e}"
        );
        let api = hub.api().await;
        let b = api.publish_room("b.1", json!("for b")).await;
        let a = api.publish_room("a.1", json!("for a")).await;
        loop {
            let m = alice.recv_type("message").await;
            assert_ne!(
                m["room"], "b.1",
                "b.1 message {b} reached alice after the refresh: {m}"
            );
            if m["id"] == a.as_str() {
                assert_eq!(m["room"], "a.1");
                break;
            }
        }
        let b2 = api.publish_room("b.1", json!("for b again")).await;
        if let Some(event) = alice.next_event(Duration::from_millis(300)).await {
            panic!("expected nothing after publishing {b2} to b.1, got {event:?}");
        }
    }
);

// ---- 11. HTTP body limits ----

both_brokers!(oversized_api_publish_gets_a_json_413, |broker| async move {
    let hub = Hub::builder(broker)
        .toml("[limits]\nmax_message_bytes = 1024")
        .start();
    let api = hub.api().await;
    let (status, body) = api
        .post(
            "/api/publish",
            json!({"room": "r", "data": "x".repeat(5000)}),
        )
        .await;
    assert_eq!(
        (status, body["error"].clone()),
        (413, json!("too_large")),
        "5000-byte data over a 1024-byte limit: body {body}"
    );
    let (status, body) = api
        .post(
            "/api/publish",
            json!({"room": "r", "data": "x".repeat(4 * 1024 * 1024)}),
        )
        .await;
    let shown: String = body.to_string().chars().take(300).collect();
    assert_eq!(
        (status, body["error"].clone()),
        (413, json!("too_large")),
        "4 MB body: body {shown}"
    );
    // Under the limit is still fine.
    let (status, body) = api
        .post("/api/publish", json!({"room": "r", "data": "small"}))
        .await;
    assert_eq!(status, 200, "small publish: {body}");
});

// ---- 12. check-config masks the Redis password ----

#[test]
fn check_config_masks_the_redis_password() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("empty.toml");
    std::fs::write(&path, "").expect("write config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("check-config")
        .arg("--config")
        .arg(&path)
        .env_remove("SWITCHBOARD_CONFIG")
        .env(
            "SWITCHBOARD__REDIS__URL",
            "redis://user:hunter2@10.0.0.5:6379/0",
        )
        .output()
        .expect("run switchboard check-config");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "check-config failed: {stderr}");
    assert!(
        !stdout.contains("hunter2") && !stderr.contains("hunter2"),
        "the password is printed:\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains("user:***@10.0.0.5"),
        "expected the masked URL user:***@10.0.0.5 in stdout:\n{stdout}"
    );
}

// ---- 13. readiness shows no raw Redis error ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_reports_redis_unreachable_without_error_text() {
    let mut redis = PrivateRedis::start();
    let hub = Hub::builder(Broker::Redis).redis_url(&redis.url()).start();
    wait_for("ready at start", Duration::from_secs(15), || async {
        match ready(&hub).await {
            (200, _) => Ok(()),
            (s, b) => Err(format!("{s} {b}")),
        }
    })
    .await;
    redis.stop();
    // Every 503 on the way must be free of Redis's error text; the reason
    // settles on "redis unreachable".
    let expected = json!({"status": "unavailable", "reason": "redis unreachable"});
    let mut seen: Vec<Value> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = ready(&hub).await;
        if status == 503 && !seen.contains(&body) {
            seen.push(body.clone());
        }
        if status == 503 && body == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "with Redis down: expected a 503 with body {expected}, last got {status} {body}; \
             503 bodies seen: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for body in &seen {
        let leaks = |text: &str| {
            let lower = text.to_lowercase();
            ["error", "refused", "broken pipe", "reset", "io "]
                .iter()
                .any(|w| lower.contains(w))
        };
        assert!(
            body["status"] == "unavailable"
                && body["reason"].as_str().is_some_and(|r| !leaks(r))
                && body.as_object().map(|o| o.len()) == Some(2),
            "a 503 body with Redis down carries more than a fixed reason: {body}; all seen: {seen:?}"
        );
    }
    redis.restart();
    wait_for(
        "ready again after restart",
        Duration::from_secs(30),
        || async {
            match ready(&hub).await {
                (200, _) => Ok(()),
                (s, b) => Err(format!("{s} {b}")),
            }
        },
    )
    .await;
}

// ---- 14. far expiry ----

both_brokers!(
    a_token_with_an_enormous_exp_is_served,
    |broker| async move {
        let hub = Hub::start(broker);
        let far = token_with(json!({"sub": "alice", "exp": 1u64 << 62}));
        let mut c = match try_connect(&hub.ws_url(), &far).await {
            Ok(c) => c,
            Err(got) => panic!("exp = 2^62: expected welcome, got {got}"),
        };
        let pong = c.request(json!({"type": "ping"})).await;
        assert_eq!(
            pong["type"], "pong",
            "ping with exp = 2^62: expected pong, got {pong}"
        );
        // No expiry timer fired early: still served a moment later.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let pong = c.request(json!({"type": "ping"})).await;
        assert_eq!(
            pong["type"], "pong",
            "second ping with exp = 2^62: expected pong, got {pong}"
        );
    }
);

// ---- 15. no double delivery at the join seam in cluster mode ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rejoining_with_since_on_another_instance_never_doubles_or_reorders() {
    // A long history: every rejoin's gap is retained, so each must recover.
    let toml =
        "[limits]\nmessages_per_second = 100000\nburst = 100000\nmax_outbound_queue = 4096\n\
                [history]\nsize = 10000";
    let (h1, h2) = pair(toml);
    let mut publisher = h1.connect("publisher").await;
    publisher.join("s").await;
    let stop = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut acked: Vec<String> = Vec::new();
            let mut r = 0u64;
            while !stop.load(Ordering::Relaxed) {
                r += 1;
                publisher
                    .send(json!({"type": "publish", "room": "s", "data": {"n": r}, "ref": r}))
                    .await;
                loop {
                    match publisher.next_event(WAIT).await {
                        Some(Ok(f)) if f["ref"] == r => {
                            assert_eq!(f["type"], "ack", "publish {r}: {f}");
                            acked.push(f["id"].as_str().expect("ack id").to_owned());
                            break;
                        }
                        Some(Ok(_)) => {}
                        other => panic!("publisher: {other:?}"),
                    }
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            acked
        }
    });

    let mut j = h2.connect("joiner").await;
    let mut last: Option<String> = None;
    // (ack of the join, ids received during that membership)
    let mut memberships: Vec<(Value, Vec<String>)> = Vec::new();
    let mut r = 0u64;
    for cycle in 0..20 {
        r += 1;
        let join_ref = r;
        let mut frame = json!({"type": "join", "room": "s", "ref": join_ref});
        if let Some(id) = &last {
            frame["since"] = json!(id);
        }
        j.send(frame).await;
        let mut ids = Vec::new();
        let mut ack = None;
        let mut live = 0;
        while ack.is_none() || live < 3 {
            match j.next_event(WAIT).await {
                Some(Ok(f)) if f["ref"] == join_ref => {
                    assert_eq!(f["type"], "ack", "cycle {cycle}: join: {f}");
                    ack = Some(f);
                }
                Some(Ok(f)) if f["type"] == "message" && f["room"] == "s" => {
                    ids.push(f["id"].as_str().expect("id").to_owned());
                    if ack.is_some() {
                        live += 1;
                    }
                }
                Some(Ok(_)) => {}
                other => panic!("cycle {cycle}: waiting for join ack and messages: {other:?}"),
            }
        }
        r += 1;
        let leave_ref = r;
        j.send(json!({"type": "leave", "room": "s", "ref": leave_ref}))
            .await;
        loop {
            match j.next_event(WAIT).await {
                Some(Ok(f)) if f["ref"] == leave_ref => {
                    assert_eq!(f["type"], "ack", "cycle {cycle}: leave: {f}");
                    break;
                }
                Some(Ok(f)) if f["type"] == "message" && f["room"] == "s" => {
                    ids.push(f["id"].as_str().expect("id").to_owned());
                }
                Some(Ok(_)) => {}
                other => panic!("cycle {cycle}: waiting for leave ack: {other:?}"),
            }
        }
        if let Some(id) = ids.last() {
            last = Some(id.clone());
        }
        memberships.push((ack.expect("ack"), ids));
    }
    stop.store(true, Ordering::Relaxed);
    let acked = task.await.expect("publisher task");

    for (cycle, (ack, ids)) in memberships.iter().enumerate() {
        let pairs: Vec<(u64, u64)> = ids.iter().map(|id| id_pair(&json!(id))).collect();
        assert!(
            pairs.windows(2).all(|w| w[0] < w[1]),
            "cycle {cycle} (join ack {ack}): ids not strictly increasing: {ids:?}"
        );
    }
    let mut seen = HashSet::new();
    let mut doubled = Vec::new();
    for (cycle, (_, ids)) in memberships.iter().enumerate() {
        for id in ids {
            if !seen.insert(id.clone()) {
                doubled.push((cycle, id.clone()));
            }
        }
    }
    assert!(
        doubled.is_empty(),
        "ids received twice (cycle, id): expected none, got {doubled:?}; memberships: {memberships:?}"
    );
    for (cycle, (ack, _)) in memberships.iter().enumerate().skip(1) {
        assert_eq!(
            ack["recovered"], true,
            "cycle {cycle}: a rejoin with since inside a 10000-message history: {ack}"
        );
    }
    // Every rejoin recovered: the memberships together are gapless.
    {
        let received: Vec<&String> = memberships.iter().flat_map(|(_, ids)| ids).collect();
        let start = acked
            .iter()
            .position(|id| id == received[0])
            .expect("first received id was acked");
        let expected: Vec<&String> = acked[start..].iter().take(received.len()).collect();
        assert_eq!(
            received, expected,
            "ids received across the 20 memberships (left) vs ids acked to the publisher from \
             the first received one (right)"
        );
    }
}
