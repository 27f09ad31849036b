//! Bad input: a bounded fuzz of random and mutated frames against one
//! connection. Afterwards the same server serves a fresh client normally
//! and a bystander connection never noticed.

mod support;

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use support::*;

const FRAMES: usize = 2000;

fn valid_frames() -> Vec<Value> {
    vec![
        json!({"type": "join", "room": "fuzz", "ref": 1}),
        json!({"type": "join", "room": "fuzz", "since": "1-0", "ref": 2}),
        json!({"type": "leave", "room": "fuzz"}),
        json!({"type": "publish", "room": "fuzz", "data": {"a": [1, 2, {"b": null}]}}),
        json!({"type": "direct", "to": "victim", "data": "x"}),
        json!({"type": "presence", "room": "fuzz"}),
        json!({"type": "task", "name": "t", "payload": {}}),
        json!({"type": "refresh", "token": "x.y.z"}),
        json!({"type": "ping", "ref": "p"}),
    ]
}

fn weird_value(rng: &mut StdRng) -> Value {
    match rng.random_range(0..10) {
        0 => Value::Null,
        1 => json!(rng.random::<i64>()),
        2 => json!(1e308),
        3 => json!("é\u{0}\u{ffff}𝄞"),
        4 => json!([]),
        5 => json!({"nested": {"deeper": [[[[[]]]]]}}),
        6 => json!(true),
        7 => json!("x".repeat(rng.random_range(0..300))),
        8 => json!(-1),
        _ => json!("1-0"),
    }
}

fn mutate(rng: &mut StdRng, mut frame: Value) -> String {
    match rng.random_range(0..8) {
        // Replace a field's value with something of another type.
        0 | 1 => {
            if let Some(obj) = frame.as_object_mut() {
                let keys: Vec<String> = obj.keys().cloned().collect();
                let key = &keys[rng.random_range(0..keys.len())];
                obj.insert(key.clone(), weird_value(rng));
            }
            frame.to_string()
        }
        // Drop a field.
        2 => {
            if let Some(obj) = frame.as_object_mut() {
                let keys: Vec<String> = obj.keys().cloned().collect();
                obj.remove(&keys[rng.random_range(0..keys.len())]);
            }
            frame.to_string()
        }
        // Truncate the text.
        3 => {
            let text = frame.to_string();
            let cut = rng.random_range(0..text.len());
            text.chars().take(cut).collect()
        }
        // Flip some characters.
        4 => {
            let mut chars: Vec<char> = frame.to_string().chars().collect();
            for _ in 0..rng.random_range(1..4) {
                let i = rng.random_range(0..chars.len());
                chars[i] = char::from(rng.random_range(32u8..127));
            }
            chars.into_iter().collect()
        }
        // Deep nesting.
        5 => format!("{}{}", "[".repeat(5000), "]".repeat(5000)),
        // Random printable garbage.
        6 => (0..rng.random_range(0..200))
            .map(|_| char::from(rng.random_range(32u8..127)))
            .collect(),
        // A huge number and a duplicate key.
        _ => r#"{"type":"ping","type":"join","room":"a","ref":123456789012345678901234567890}"#
            .into(),
    }
}

both_brokers!(fuzzed_frames_hurt_nobody, |broker| async move {
    let hub = Hub::builder(broker)
        .toml("[limits]\nmessages_per_second = 100000\nburst = 100000\nmax_connections_per_user = 100")
        .start();
    let mut bystander = hub.connect("bystander").await;
    bystander.join("calm").await;
    let mut rng = StdRng::seed_from_u64(0x5b0a4d);
    let mut fuzzer = hub.connect("fuzzer").await;
    let templates = valid_frames();
    let mut sent = 0;
    let mut reconnects = 0;
    while sent < FRAMES {
        let frame = templates[rng.random_range(0..templates.len())].clone();
        let text = if rng.random_bool(0.2) {
            frame.to_string()
        } else {
            mutate(&mut rng, frame)
        };
        fuzzer.send_text(&text).await;
        sent += 1;
        // Drain what came back; every reply must be valid JSON of a known type.
        while let Some(event) = fuzzer.next_event(Duration::from_millis(2)).await {
            match event {
                Ok(frame) => {
                    let kind = frame["type"].as_str().unwrap_or_default().to_owned();
                    assert!(
                        [
                            "ack", "error", "pong", "presence", "message", "joined", "left",
                            "direct"
                        ]
                        .contains(&kind.as_str()),
                        "unexpected frame {frame}"
                    );
                    if kind == "error" {
                        let code = frame["code"].as_str().unwrap_or_default();
                        assert!(
                            ["bad_request", "forbidden", "not_found", "limit_exceeded"]
                                .contains(&code),
                            "{text} -> {frame}"
                        );
                    }
                }
                Err(closed) => {
                    // Only documented closes are acceptable (e.g. 1009 for the nesting).
                    assert!(
                        [1003, 1009].contains(&closed.code),
                        "closed {closed:?} after {text:?}"
                    );
                    reconnects += 1;
                    fuzzer = hub.connect("fuzzer").await;
                    break;
                }
            }
        }
    }
    // A fresh client is served normally.
    let mut fresh = hub.connect("fresh").await;
    fresh.join("calm").await;
    let id = fresh.publish("calm", json!({"after": "fuzz"})).await;
    // The bystander got exactly the fresh client's join and message, nothing else.
    assert_eq!(bystander.recv_type("joined").await["user"], "bystander");
    let joined = bystander.recv().await;
    assert_eq!(
        joined,
        json!({"type": "joined", "room": "calm", "user": "fresh"})
    );
    let m = bystander.recv().await;
    assert_eq!(m["id"], id.as_str(), "{m}");
    assert_eq!(m["data"], json!({"after": "fuzz"}));
    bystander.expect_silence(Duration::from_millis(200)).await;
    assert!(reconnects < FRAMES / 10, "too many closes: {reconnects}");
});
