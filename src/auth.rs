//! JWT authentication (docs/protocol.md §2): verifying client tokens,
//! minting development tokens, and the `rooms` / `publish` glob claims.
//!
//! The accepted algorithm is pinned by `auth.jwt_algorithm`: a token whose
//! header names any other (`none` included) is rejected. `exp` is required;
//! `nbf` and `iat` are checked when present; `aud` and `iss` are required
//! and must match when configured. `exp` has no leeway: a token is expired
//! the second its `exp` passes, as the session's expiry timer assumes.
//! `nbf` and `iat` may be up to [`CLOCK_SKEW_S`] in the future, so that an
//! issuer whose clock runs a little ahead is not refused its fresh tokens.

use std::path::Path;
use std::time::Duration;

use jsonwebtoken::{
    decode, decode_header, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation,
};
use serde::{Deserialize, Serialize};

use crate::config::{AuthConfig, JwtAlgorithm};
use crate::protocol::valid_user_id;

/// How far in the future `nbf` and `iat` may be (the issuer's clock may
/// run ahead of ours).
pub const CLOCK_SKEW_S: u64 = 60;

/// Why a token was refused; decides the close reason.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// `token expired`
    #[error("token expired")]
    Expired,
    /// `unauthorized`: malformed, bad signature, wrong algorithm, audience,
    /// issuer, not yet valid, bad `sub`.
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Why the configured verification key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("auth.jwt_public_key_file = {path:?}: cannot read: {source}")]
    Unreadable {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "auth.jwt_public_key_file = {path:?}: not a {algorithm:?} public key in PEM: {source}"
    )]
    NotAKey {
        path: String,
        algorithm: JwtAlgorithm,
        source: jsonwebtoken::errors::Error,
    },
}

/// Why `switchboard token` could not sign a token.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("the user id must be 1-256 bytes")]
    BadUser,
    #[error("auth.jwt_algorithm = {0:?} signs with a private key: pass --private-key FILE")]
    NeedsPrivateKey(JwtAlgorithm),
    #[error("{path}: {source}")]
    Unreadable {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a private key in PEM: {source}")]
    NotAKey {
        path: String,
        source: jsonwebtoken::errors::Error,
    },
    #[error("signing: {0}")]
    Sign(#[source] jsonwebtoken::errors::Error),
}

/// What a verified token grants.
#[derive(Debug, Clone)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    /// Glob patterns of rooms the user may join.
    pub rooms: Vec<String>,
    /// Glob patterns of rooms the user may publish to.
    pub publish: Vec<String>,
    /// Glob patterns of user ids the user may send `direct` frames to.
    pub direct: Vec<String>,
}

impl Claims {
    pub fn may_join(&self, room: &str) -> bool {
        self.rooms.iter().any(|p| glob_match(p, room))
    }

    pub fn may_publish(&self, room: &str) -> bool {
        self.publish.iter().any(|p| glob_match(p, room))
    }

    pub fn may_direct(&self, user: &str) -> bool {
        self.direct.iter().any(|p| glob_match(p, user))
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct RawClaims {
    sub: String,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    aud: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rooms: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    publish: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    direct: Option<Vec<String>>,
}

fn algorithm(alg: JwtAlgorithm) -> Algorithm {
    match alg {
        JwtAlgorithm::HS256 => Algorithm::HS256,
        JwtAlgorithm::HS384 => Algorithm::HS384,
        JwtAlgorithm::HS512 => Algorithm::HS512,
        JwtAlgorithm::RS256 => Algorithm::RS256,
        JwtAlgorithm::ES256 => Algorithm::ES256,
    }
}

fn is_hmac(alg: JwtAlgorithm) -> bool {
    matches!(
        alg,
        JwtAlgorithm::HS256 | JwtAlgorithm::HS384 | JwtAlgorithm::HS512
    )
}

/// Verifies client tokens with the configured key and rules. Built once.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    default_rooms: Vec<String>,
    default_direct: Vec<String>,
}

impl Verifier {
    pub fn new(cfg: &AuthConfig) -> Result<Verifier, KeyError> {
        let alg = algorithm(cfg.jwt_algorithm);
        let key = if is_hmac(cfg.jwt_algorithm) {
            DecodingKey::from_secret(cfg.jwt_secret.as_bytes())
        } else {
            let path = cfg.jwt_public_key_file.clone();
            let pem = std::fs::read(&path).map_err(|source| KeyError::Unreadable {
                path: path.clone(),
                source,
            })?;
            let parsed = if cfg.jwt_algorithm == JwtAlgorithm::RS256 {
                DecodingKey::from_rsa_pem(&pem)
            } else {
                DecodingKey::from_ec_pem(&pem)
            };
            parsed.map_err(|source| KeyError::NotAKey {
                path,
                algorithm: cfg.jwt_algorithm,
                source,
            })?
        };
        let mut validation = Validation::new(alg);
        validation.leeway = 0;
        validation.validate_exp = true;
        // `nbf` is checked below, with the clock skew allowed.
        validation.validate_nbf = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        if cfg.audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&[cfg.audience.as_str()]);
            validation.required_spec_claims.insert("aud".into());
        }
        if !cfg.issuer.is_empty() {
            validation.set_issuer(&[cfg.issuer.as_str()]);
            validation.required_spec_claims.insert("iss".into());
        }
        Ok(Verifier {
            key,
            validation,
            default_rooms: cfg.default_rooms.clone(),
            default_direct: cfg.default_direct.clone(),
        })
    }

    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let header = decode_header(token).map_err(|e| AuthError::Invalid(e.to_string()))?;
        if header.alg != self.validation.algorithms[0] {
            return Err(AuthError::Invalid(format!(
                "algorithm {:?} not accepted",
                header.alg
            )));
        }
        let data = decode::<RawClaims>(token, &self.key, &self.validation).map_err(|e| match e
            .kind()
        {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
            _ => AuthError::Invalid(e.to_string()),
        })?;
        let claims = data.claims;
        let now = crate::clock::now_ms() / 1000;
        if claims.exp <= now {
            return Err(AuthError::Expired);
        }
        if claims.iat.is_some_and(|iat| iat > now + CLOCK_SKEW_S) {
            return Err(AuthError::Invalid("iat is in the future".into()));
        }
        if claims.nbf.is_some_and(|nbf| nbf > now + CLOCK_SKEW_S) {
            return Err(AuthError::Invalid("token not valid yet (nbf)".into()));
        }
        if !valid_user_id(&claims.sub) {
            return Err(AuthError::Invalid("sub must be 1-256 bytes".into()));
        }
        let rooms = claims.rooms.unwrap_or_else(|| self.default_rooms.clone());
        let publish = claims.publish.unwrap_or_else(|| rooms.clone());
        let direct = claims.direct.unwrap_or_else(|| self.default_direct.clone());
        Ok(Claims {
            sub: claims.sub,
            exp: claims.exp,
            rooms,
            publish,
            direct,
        })
    }
}

/// Signs a token for `user` with the configured algorithm (for development
/// and tests). HS* use `auth.jwt_secret`; RS256/ES256 need the private key,
/// which the config does not hold, as a PEM file.
pub fn mint(
    cfg: &AuthConfig,
    user: &str,
    rooms: Option<Vec<String>>,
    publish: Option<Vec<String>>,
    ttl: Duration,
    private_key_pem: Option<&Path>,
) -> Result<String, MintError> {
    if !valid_user_id(user) {
        return Err(MintError::BadUser);
    }
    let key = signing_key(cfg, private_key_pem)?;
    let now = crate::clock::now_ms() / 1000;
    let claims = RawClaims {
        sub: user.to_owned(),
        exp: now + ttl.as_secs().max(1),
        nbf: None,
        iat: Some(now),
        aud: (!cfg.audience.is_empty()).then(|| serde_json::Value::from(cfg.audience.clone())),
        iss: (!cfg.issuer.is_empty()).then(|| cfg.issuer.clone()),
        rooms,
        publish,
        direct: None,
    };
    encode(&Header::new(algorithm(cfg.jwt_algorithm)), &claims, &key).map_err(MintError::Sign)
}

/// The secret (HS*) or the private key from `private_key_pem` (RS256, ES256).
fn signing_key(cfg: &AuthConfig, private_key_pem: Option<&Path>) -> Result<EncodingKey, MintError> {
    if is_hmac(cfg.jwt_algorithm) {
        return Ok(EncodingKey::from_secret(cfg.jwt_secret.as_bytes()));
    }
    let path = private_key_pem.ok_or(MintError::NeedsPrivateKey(cfg.jwt_algorithm))?;
    let shown = path.display().to_string();
    let pem = std::fs::read(path).map_err(|source| MintError::Unreadable {
        path: shown.clone(),
        source,
    })?;
    let parsed = if cfg.jwt_algorithm == JwtAlgorithm::RS256 {
        EncodingKey::from_rsa_pem(&pem)
    } else {
        EncodingKey::from_ec_pem(&pem)
    };
    parsed.map_err(|source| MintError::NotAKey {
        path: shown,
        source,
    })
}

/// `*` matches any run of characters (`.` included, possibly none); every
/// other character matches itself. Linear in practice: backtracks only to
/// the last star.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AuthConfig {
        AuthConfig {
            jwt_secret: "s3cret".into(),
            ..AuthConfig::default()
        }
    }

    #[test]
    fn globs() {
        assert!(glob_match("*", ""));
        assert!(glob_match("*", "a.b.c"));
        assert!(glob_match("chat.*", "chat.general"));
        assert!(glob_match("chat.*", "chat."));
        assert!(!glob_match("chat.*", "chat"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
        assert!(glob_match("lobby", "lobby"));
        assert!(!glob_match("lobby", "lobby2"));
        assert!(!glob_match("a?c", "abc"));
        assert!(!glob_match(&"*a".repeat(50), &"a".repeat(49)));
    }

    #[test]
    fn roundtrip_and_defaults() {
        let c = cfg();
        let token = mint(&c, "alice", None, None, Duration::from_secs(60), None).unwrap();
        let claims = Verifier::new(&c).unwrap().verify(&token).unwrap();
        assert_eq!(claims.sub, "alice");
        assert_eq!(claims.rooms, vec!["*".to_owned()]);
        assert!(claims.may_publish("anything"));
        let token = mint(
            &c,
            "bob",
            Some(vec!["chat.*".into()]),
            None,
            Duration::from_secs(60),
            None,
        )
        .unwrap();
        let claims = Verifier::new(&c).unwrap().verify(&token).unwrap();
        assert!(
            claims.may_join("chat.x") && claims.may_publish("chat.x") && !claims.may_join("news")
        );
    }

    #[test]
    fn wrong_secret_and_algorithm_are_invalid() {
        let c = cfg();
        let token = mint(&c, "alice", None, None, Duration::from_secs(60), None).unwrap();
        let other = AuthConfig {
            jwt_secret: "other".into(),
            ..cfg()
        };
        assert!(matches!(
            Verifier::new(&other).unwrap().verify(&token),
            Err(AuthError::Invalid(_))
        ));
        let hs384 = AuthConfig {
            jwt_algorithm: JwtAlgorithm::HS384,
            ..cfg()
        };
        let token = mint(&hs384, "alice", None, None, Duration::from_secs(60), None).unwrap();
        assert!(matches!(
            Verifier::new(&c).unwrap().verify(&token),
            Err(AuthError::Invalid(_))
        ));
    }
}
