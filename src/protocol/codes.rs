//! The tables of codes (docs/protocol.md §4, §5 and §9): every error code the hub answers (in an `error`
//! frame that keeps a connection open, or in an HTTP error body), each with
//! its HTTP status, and every close the server sends, each with its code
//! and reason.

use serde::Serialize;

/// Every error code: those of `error` frames (which keep a connection
/// open) and those of the HTTP API's error bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Forbidden,
    LimitExceeded,
    RateLimited,
    NotFound,
    /// The broker (Redis) or the task queue cannot be reached, or did not
    /// answer in time: retry.
    Unavailable,
    Internal,
    /// HTTP only: no valid API key.
    Unauthorized,
    /// HTTP only: a method the path does not take.
    MethodNotAllowed,
    /// HTTP only: a body over its limit.
    TooLarge,
    /// HTTP only: the request does not fit the resource's state.
    Conflict,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 11] = [
        ErrorCode::BadRequest,
        ErrorCode::Forbidden,
        ErrorCode::LimitExceeded,
        ErrorCode::RateLimited,
        ErrorCode::NotFound,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
        ErrorCode::Unauthorized,
        ErrorCode::MethodNotAllowed,
        ErrorCode::TooLarge,
        ErrorCode::Conflict,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Conflict => "conflict",
        }
    }

    /// The HTTP status an answer with this code has.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::Conflict => 409,
            ErrorCode::TooLarge => 413,
            ErrorCode::LimitExceeded | ErrorCode::RateLimited => 429,
            ErrorCode::Internal => 500,
            ErrorCode::Unavailable => 503,
        }
    }
}

/// An `error` frame's code and message.
#[derive(Debug, Clone)]
pub struct ErrorReply {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorReply {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorReply {
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl ToString) -> Self {
        Self::new(ErrorCode::BadRequest, message.to_string())
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }
    /// `internal` never says more than this; details go to the log.
    pub fn internal() -> Self {
        Self::new(ErrorCode::Internal, "processing failed")
    }
    /// `unavailable` says what is away, never why; details go to the log.
    pub fn unavailable(what: &str) -> Self {
        Self::new(ErrorCode::Unavailable, format!("{what} unavailable, retry"))
    }
}

/// Every way the server closes a WebSocket (docs/protocol.md §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    Normal,
    GoingAway,
    ClientTimeout,
    ProtocolError,
    BinaryNotSupported,
    InvalidPayload,
    Unauthorized,
    TokenExpired,
    ConnectionLimit,
    ForbiddenOrigin,
    RateLimit,
    Kicked,
    MessageTooBig,
    InternalError,
    Overloaded,
    SlowConsumer,
    Unavailable,
}

impl CloseReason {
    pub const ALL: [CloseReason; 17] = [
        CloseReason::Normal,
        CloseReason::GoingAway,
        CloseReason::ClientTimeout,
        CloseReason::ProtocolError,
        CloseReason::BinaryNotSupported,
        CloseReason::InvalidPayload,
        CloseReason::Unauthorized,
        CloseReason::TokenExpired,
        CloseReason::ConnectionLimit,
        CloseReason::ForbiddenOrigin,
        CloseReason::RateLimit,
        CloseReason::Kicked,
        CloseReason::MessageTooBig,
        CloseReason::InternalError,
        CloseReason::Overloaded,
        CloseReason::SlowConsumer,
        CloseReason::Unavailable,
    ];

    pub fn code(self) -> u16 {
        match self {
            CloseReason::Normal => 1000,
            CloseReason::GoingAway | CloseReason::ClientTimeout => 1001,
            CloseReason::ProtocolError => 1002,
            CloseReason::BinaryNotSupported => 1003,
            CloseReason::InvalidPayload => 1007,
            CloseReason::Unauthorized
            | CloseReason::TokenExpired
            | CloseReason::ConnectionLimit
            | CloseReason::ForbiddenOrigin
            | CloseReason::RateLimit
            | CloseReason::Kicked => 1008,
            CloseReason::MessageTooBig => 1009,
            CloseReason::InternalError => 1011,
            CloseReason::Overloaded | CloseReason::SlowConsumer | CloseReason::Unavailable => 1013,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            CloseReason::Normal => "",
            CloseReason::GoingAway => "going away",
            CloseReason::ClientTimeout => "client timeout",
            CloseReason::ProtocolError => "protocol error",
            CloseReason::BinaryNotSupported => "binary not supported",
            CloseReason::InvalidPayload => "invalid utf-8",
            CloseReason::Unauthorized => "unauthorized",
            CloseReason::TokenExpired => "token expired",
            CloseReason::ConnectionLimit => "connection limit",
            CloseReason::ForbiddenOrigin => "forbidden origin",
            CloseReason::RateLimit => "rate limit",
            CloseReason::Kicked => "kicked",
            CloseReason::MessageTooBig => "message too big",
            CloseReason::InternalError => "internal error",
            CloseReason::Overloaded => "overloaded",
            CloseReason::SlowConsumer => "slow consumer",
            CloseReason::Unavailable => "unavailable",
        }
    }

    /// A label for metrics (`connections_rejected_total{reason}` and closes):
    /// the reason in snake case.
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::Normal => "normal",
            CloseReason::GoingAway => "going_away",
            CloseReason::ClientTimeout => "client_timeout",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::BinaryNotSupported => "binary_not_supported",
            CloseReason::InvalidPayload => "invalid_payload",
            CloseReason::Unauthorized => "unauthorized",
            CloseReason::TokenExpired => "token_expired",
            CloseReason::ConnectionLimit => "connection_limit",
            CloseReason::ForbiddenOrigin => "forbidden_origin",
            CloseReason::RateLimit => "rate_limit",
            CloseReason::Kicked => "kicked",
            CloseReason::MessageTooBig => "message_too_big",
            CloseReason::InternalError => "internal_error",
            CloseReason::Overloaded => "overloaded",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::Unavailable => "unavailable",
        }
    }

    pub fn to_ws(self) -> actix_ws::CloseReason {
        let description = match self.reason() {
            "" => None,
            r => Some(r.to_owned()),
        };
        actix_ws::CloseReason {
            code: actix_ws::CloseCode::from(self.code()),
            description,
        }
    }
}
