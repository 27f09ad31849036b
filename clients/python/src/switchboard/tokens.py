"""Minting the JWTs the hub accepts (your backend hands them to its users).

The hub pins one algorithm (``auth.jwt_algorithm``): HS256/384/512 are
signed with the shared ``auth.jwt_secret``; RS256 and ES256 with the private
key whose public half is ``auth.jwt_public_key_file``."""

from __future__ import annotations

import base64
import json
import time
from typing import Any, Optional, Sequence, Union

import jwt

ALGORITHMS = ("HS256", "HS384", "HS512", "RS256", "ES256")


def mint_token(
    user: str,
    *,
    secret: Optional[str] = None,
    private_key: Optional[Union[str, bytes]] = None,
    algorithm: str = "HS256",
    ttl_s: float = 3600,
    rooms: Optional[Sequence[str]] = None,
    publish: Optional[Sequence[str]] = None,
    direct: Optional[Sequence[str]] = None,
    audience: Optional[str] = None,
    issuer: Optional[str] = None,
    extra_claims: Optional[dict[str, Any]] = None,
) -> str:
    """A token for ``user`` (the ``sub``), valid ``ttl_s`` seconds.

    ``rooms``, ``publish`` and ``direct`` are glob patterns (``*`` matches
    any run of characters) of the rooms the user may join and publish to and
    the users it may send ``direct`` frames to; left out, the hub's defaults
    apply (``auth.default_rooms``; ``publish`` falls back to ``rooms``).
    ``audience`` and ``issuer`` must match ``auth.audience``/``auth.issuer``
    when the hub sets them. HS* take ``secret``; RS256/ES256 take
    ``private_key`` (PEM text or bytes)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, not {algorithm!r}")
    if not 1 <= len(user.encode()) <= 256:
        raise ValueError("a user id is 1-256 bytes")
    if algorithm.startswith("HS"):
        if not secret:
            raise ValueError(f"{algorithm} needs secret= (the hub's auth.jwt_secret)")
        key: Union[str, bytes] = secret
    else:
        if not private_key:
            raise ValueError(f"{algorithm} needs private_key= (PEM)")
        key = private_key
    now = int(time.time())
    claims: dict[str, Any] = {"sub": user, "iat": now, "exp": now + max(1, int(ttl_s))}
    if rooms is not None:
        claims["rooms"] = list(rooms)
    if publish is not None:
        claims["publish"] = list(publish)
    if direct is not None:
        claims["direct"] = list(direct)
    if audience:
        claims["aud"] = audience
    if issuer:
        claims["iss"] = issuer
    if extra_claims:
        claims.update(extra_claims)
    return jwt.encode(claims, key, algorithm=algorithm)


def decode_unverified(token: str) -> Optional[dict[str, Any]]:
    """A JWT's claims, read without checking the signature (the hub checks);
    ``None`` when it is not a JWT. The client uses it for ``exp``."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        body = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(body))
    except (ValueError, TypeError):
        return None
    return claims if isinstance(claims, dict) else None
