//! The names and ids of the protocol: room names, user ids, message ids.
//! Each is constructible only valid, so code past parsing never re-checks.

use std::fmt;
use std::str::FromStr;

/// A room name that is not 1–128 characters of `[A-Za-z0-9_.:-]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid room name {0:?}: expected 1-128 characters of [A-Za-z0-9_.:-]")]
pub struct InvalidRoomName(String);

/// A message id that is not `{ms}-{seq}` with two decimal numbers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid message id {0:?}: expected {{ms}}-{{seq}}")]
pub struct InvalidMessageId(String);

/// A room name: 1–128 characters of `[A-Za-z0-9_.:-]`. Only constructible valid.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomName(String);

impl RoomName {
    pub fn parse(s: &str) -> Result<RoomName, InvalidRoomName> {
        let ok = !s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'));
        if ok {
            Ok(RoomName(s.to_owned()))
        } else {
            Err(InvalidRoomName(truncate(s, 140).to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A user id (the JWT `sub`): 1–256 bytes.
pub fn valid_user_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 256
}

/// A message id `{ms}-{seq}`, compared numerically as the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MessageId {
    pub ms: u64,
    pub seq: u64,
}

impl MessageId {
    /// The next id after `self` for a publish at `now_ms`: ids strictly
    /// increase even when the clock stands still or goes back.
    pub fn next(self, now_ms: u64) -> MessageId {
        if now_ms > self.ms {
            MessageId { ms: now_ms, seq: 0 }
        } else {
            MessageId {
                ms: self.ms,
                seq: self.seq + 1,
            }
        }
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl FromStr for MessageId {
    type Err = InvalidMessageId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidMessageId(truncate(s, 64).to_owned());
        let (ms, seq) = s.split_once('-').ok_or_else(bad)?;
        let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
        if !digits(ms) || !digits(seq) {
            return Err(bad());
        }
        Ok(MessageId {
            ms: ms.parse().map_err(|_| bad())?,
            seq: seq.parse().map_err(|_| bad())?,
        })
    }
}

/// At most `max` bytes of `s`, cut on a character boundary (for messages
/// that quote client input).
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_parse_and_order() {
        let a: MessageId = "1732438800123-0".parse().unwrap();
        let b: MessageId = "1732438800123-10".parse().unwrap();
        let c: MessageId = "1732438800124-2".parse().unwrap();
        assert!(a < b && b < c);
        assert_eq!(a.to_string(), "1732438800123-0");
        for bad in [
            "",
            "1",
            "-1",
            "1-",
            "a-1",
            "1-2-3",
            "1 -2",
            "+1-2",
            "99999999999999999999999-0",
        ] {
            assert!(bad.parse::<MessageId>().is_err(), "{bad}");
        }
        assert_eq!(a.next(a.ms), MessageId { ms: a.ms, seq: 1 });
        assert_eq!(a.next(a.ms - 5), MessageId { ms: a.ms, seq: 1 });
        assert_eq!(
            a.next(a.ms + 1),
            MessageId {
                ms: a.ms + 1,
                seq: 0
            }
        );
    }

    #[test]
    fn room_names() {
        assert!(RoomName::parse("chat.general:1_-").is_ok());
        assert!(RoomName::parse("").is_err());
        assert!(RoomName::parse(&"a".repeat(129)).is_err());
        assert!(RoomName::parse("a b").is_err());
        assert!(RoomName::parse("é").is_err());
    }

    #[test]
    fn invalid_input_is_quoted_truncated() {
        let e = RoomName::parse(&"é".repeat(100)).unwrap_err().to_string();
        assert_eq!(e.matches('é').count(), 70, "{e}");
    }
}
