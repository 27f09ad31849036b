//! JWT rules of docs/protocol.md §2, over real connections: algorithms,
//! claims, room globs. Auth does not depend on the broker, so these run
//! against the memory broker only.

mod support;

use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::{json, Value};
use support::*;

async fn refused(hub: &Hub, token: &str) -> Closed {
    let mut c = Client::connect_raw(&format!("{}?token={token}", hub.ws_url()), &[]).await;
    c.recv_close().await
}

fn unauthorized() -> Closed {
    Closed {
        code: 1008,
        reason: "unauthorized".into(),
    }
}

fn sign(alg: jsonwebtoken::Algorithm, key: &EncodingKey, claims: Value) -> String {
    encode(&Header::new(alg), &claims, key).expect("sign")
}

fn claims(user: &str) -> Value {
    json!({"sub": user, "exp": now_s() + 600})
}

#[tokio::test]
async fn missing_malformed_and_badly_signed_tokens_are_unauthorized() {
    let hub = Hub::start(Broker::Memory);
    let mut c = Client::connect_raw(&hub.ws_url(), &[]).await;
    assert_eq!(c.recv_close().await, unauthorized());
    assert_eq!(refused(&hub, "not-a-jwt").await, unauthorized());
    let wrong = sign(
        jsonwebtoken::Algorithm::HS256,
        &EncodingKey::from_secret(b"another secret"),
        claims("alice"),
    );
    assert_eq!(refused(&hub, &wrong).await, unauthorized());
    let mut c = Client::connect_raw(&hub.ws_url(), &[("Authorization", "Bearer nope")]).await;
    assert_eq!(c.recv_close().await, unauthorized());
}

#[tokio::test]
async fn alg_none_and_other_algorithms_are_rejected() {
    let hub = Hub::start(Broker::Memory);
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let none = format!(
        "{}.{}.",
        b64(r#"{"alg":"none","typ":"JWT"}"#),
        b64(&claims("alice").to_string())
    );
    assert_eq!(refused(&hub, &none).await, unauthorized());
    let hs384 = sign(
        jsonwebtoken::Algorithm::HS384,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        claims("alice"),
    );
    assert_eq!(refused(&hub, &hs384).await, unauthorized());
}

#[tokio::test]
async fn hs384_and_hs512_when_configured() {
    for (name, alg) in [
        ("HS384", jsonwebtoken::Algorithm::HS384),
        ("HS512", jsonwebtoken::Algorithm::HS512),
    ] {
        let hub = Hub::builder(Broker::Memory)
            .env("SWITCHBOARD__AUTH__JWT_ALGORITHM", name)
            .start();
        let key = EncodingKey::from_secret(SECRET.as_bytes());
        let c = Client::connect(&hub.ws_url(), &sign(alg, &key, claims("alice"))).await;
        assert_eq!(c.welcome["user"], "alice");
        // The default HS256 is now refused.
        assert_eq!(refused(&hub, &token("alice")).await, unauthorized());
    }
}

#[tokio::test]
async fn rs256_and_es256_with_a_public_key_file() {
    for (name, alg, private, public) in [
        (
            "RS256",
            jsonwebtoken::Algorithm::RS256,
            "rsa_private.pem",
            "rsa_public.pem",
        ),
        (
            "ES256",
            jsonwebtoken::Algorithm::ES256,
            "ec_private.pem",
            "ec_public.pem",
        ),
    ] {
        let hub = Hub::builder(Broker::Memory)
            .env("SWITCHBOARD__AUTH__JWT_ALGORITHM", name)
            .env(
                "SWITCHBOARD__AUTH__JWT_PUBLIC_KEY_FILE",
                fixture(public).to_str().expect("path"),
            )
            .start();
        let pem = std::fs::read(fixture(private)).expect("key");
        let key = match alg {
            jsonwebtoken::Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
            _ => EncodingKey::from_ec_pem(&pem),
        }
        .expect("private key");
        let c = Client::connect(&hub.ws_url(), &sign(alg, &key, claims("alice"))).await;
        assert_eq!(c.welcome["user"], "alice", "{name}");
        // An HS256 token signed with the public key's bytes must not pass.
        let public_pem = std::fs::read(fixture(public)).expect("public key");
        let confused = sign(
            jsonwebtoken::Algorithm::HS256,
            &EncodingKey::from_secret(&public_pem),
            claims("alice"),
        );
        assert_eq!(refused(&hub, &confused).await, unauthorized(), "{name}");
    }
}

#[tokio::test]
async fn expired_is_token_expired_and_nbf_in_future_is_unauthorized() {
    let hub = Hub::start(Broker::Memory);
    let expired = token_with(json!({"sub": "alice", "exp": now_s() - 10}));
    assert_eq!(
        refused(&hub, &expired).await,
        Closed {
            code: 1008,
            reason: "token expired".into()
        }
    );
    let early = token_with(json!({"sub": "alice", "nbf": now_s() + 600}));
    assert_eq!(refused(&hub, &early).await, unauthorized());
    let no_exp = encode(
        &Header::default(),
        &json!({"sub": "alice"}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign");
    assert_eq!(refused(&hub, &no_exp).await, unauthorized());
    let no_sub = token_with(json!({"x": 1}));
    assert_eq!(refused(&hub, &no_sub).await, unauthorized());
    let long_sub = token("u".repeat(257).as_str());
    assert_eq!(refused(&hub, &long_sub).await, unauthorized());
}

/// An issuer whose clock runs a little ahead: `nbf` (and `iat`) up to a
/// minute in the future are accepted, as a JWT library's leeway would.
#[tokio::test]
async fn nbf_and_iat_a_little_ahead_are_accepted() {
    let hub = Hub::start(Broker::Memory);
    let now = now_s();
    for claims in [
        json!({"sub": "alice", "nbf": now + 1, "iat": now + 1}),
        json!({"sub": "alice", "nbf": now + 55}),
    ] {
        let mut c = Client::connect(&hub.ws_url(), &token_with(claims.clone())).await;
        assert_eq!(c.welcome["user"], "alice", "{claims}");
        assert_eq!(c.request(json!({"type": "ping"})).await["type"], "pong");
    }
    let late = token_with(json!({"sub": "alice", "nbf": now + 120}));
    assert_eq!(refused(&hub, &late).await, unauthorized());
}

#[tokio::test]
async fn audience_and_issuer_must_match_when_configured() {
    let hub = Hub::builder(Broker::Memory)
        .env("SWITCHBOARD__AUTH__AUDIENCE", "chat")
        .env("SWITCHBOARD__AUTH__ISSUER", "https://auth.example")
        .start();
    let good = token_with(json!({"sub": "a", "aud": "chat", "iss": "https://auth.example"}));
    Client::connect(&hub.ws_url(), &good).await;
    for bad in [
        json!({"sub": "a", "aud": "other", "iss": "https://auth.example"}),
        json!({"sub": "a", "aud": "chat", "iss": "https://evil.example"}),
        json!({"sub": "a", "iss": "https://auth.example"}),
        json!({"sub": "a", "aud": "chat"}),
    ] {
        assert_eq!(
            refused(&hub, &token_with(bad.clone())).await,
            unauthorized(),
            "{bad}"
        );
    }
}

#[tokio::test]
async fn rooms_and_publish_globs_decide_permissions() {
    let hub = Hub::start(Broker::Memory);
    let t = token_with(json!({"sub": "alice", "rooms": ["chat.*", "news"], "publish": ["chat.*"]}));
    let mut c = Client::connect(&hub.ws_url(), &t).await;
    c.join("chat.general").await;
    c.join("chat.a.b").await;
    c.join("news").await;
    for room in ["chat", "newsroom", "other"] {
        let e = c.request(json!({"type": "join", "room": room})).await;
        assert_eq!(e["code"], "forbidden", "{room}: {e}");
    }
    c.publish("chat.general", json!(1)).await;
    let e = c
        .request(json!({"type": "publish", "room": "news", "data": 1}))
        .await;
    assert_eq!(
        e["code"], "forbidden",
        "publish is narrower than rooms: {e}"
    );
    let e = c
        .request(json!({"type": "presence", "room": "other"}))
        .await;
    assert_eq!(e["code"], "forbidden");
}

#[tokio::test]
async fn publish_claim_defaults_to_rooms_and_rooms_to_default_rooms() {
    let hub = Hub::builder(Broker::Memory)
        .toml("[auth]\ndefault_rooms = [\"public.*\"]")
        .start();
    let mut c = hub.connect("alice").await;
    c.join("public.x").await;
    assert_eq!(
        c.request(json!({"type": "join", "room": "private"})).await["code"],
        "forbidden"
    );
    c.publish("public.x", json!(1)).await;
    let t = token_with(json!({"sub": "bob", "rooms": ["team"]}));
    let mut b = Client::connect(&hub.ws_url(), &t).await;
    b.join("team").await;
    b.publish("team", json!(1)).await;
}
