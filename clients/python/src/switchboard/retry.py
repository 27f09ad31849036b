"""What makes a room publish safe to retry, for the client and the HTTP API:
its idempotency key and the backoff between attempts.

The hub stores a room publish made with an ``idempotency_key`` once per
user (``server`` for the HTTP API), room and key for 120 s and answers a
repeat with the first publish's id. So a publish answered
``unavailable`` (HTTP 503: Redis did not answer; it may or may not have
taken effect) is sent again, with the same key, until it is answered or its
time is up."""

from __future__ import annotations

import random
import uuid
from typing import Optional

MAX_KEY_BYTES = 256
"""The longest idempotency key the hub accepts, in UTF-8 bytes."""

RETRY_INITIAL_S = 0.1
RETRY_MAX_S = 2.0


def publish_key(key: Optional[str]) -> str:
    """The caller's key, checked (1-256 bytes of UTF-8), or a new one
    (32 hex digits) when ``None``. ``TypeError`` for a key that is not a
    string, ``ValueError`` for one of the wrong length."""
    if key is None:
        return uuid.uuid4().hex
    if not isinstance(key, str):
        raise TypeError(f"idempotency_key must be a string, not {type(key).__name__}")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError("idempotency_key must be valid UTF-8 (no lone surrogates)") from None
    if not 1 <= size <= MAX_KEY_BYTES:
        raise ValueError(f"idempotency_key must be 1-{MAX_KEY_BYTES} bytes of UTF-8, not {size}")
    return key


class Backoff:
    """Delays between retries: 0.1 s doubling up to 2 s, each drawn at random
    in its upper half (so that many clients do not retry in step)."""

    def __init__(self, initial_s: float = RETRY_INITIAL_S, max_s: float = RETRY_MAX_S) -> None:
        self._next = initial_s
        self._max = max_s

    def next(self) -> float:
        cap = self._next
        self._next = min(self._max, cap * 2)
        return random.uniform(cap / 2, cap)
