"""Dashboard tokens: HS256 JWTs signed with CDC_SECRET that name the businesses a dashboard may see.

Made here for everyone who hands a dashboard its token (`cdc-dashboard token`, `run`, the doctor's probe);
the gateway verifies them (gateway/auth.py) with the same algorithm and issuer.

Every token carries a `kid` header, `key_id` of the key that signed it, so a gateway that knows several keys
(key rotation: CDC_SECRET_PREVIOUS; admin tokens: CDC_ADMIN_SECRET) verifies with the right one directly.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from typing import Any

import jwt

__all__ = ["ALGORITHM", "ISSUER", "MAX_TTL_SECONDS", "create_token", "key_id"]

ALGORITHM = "HS256"
ISSUER = "cdc-dashboard"
# The longest lifetime a token may be minted with: 366 days. A dashboard link should be renewed at least once a
# year, and after a key rotation the old key must stay in CDC_SECRET_PREVIOUS only until every token it signed
# has expired: at most this long. (An unbounded ttl also minted tokens whose expiry no date could hold.)
MAX_TTL_SECONDS = 366 * 24 * 3600


def key_id(secret: str) -> str:
    """The `kid` of tokens signed with `secret`: 16 hex digits of a SHA-256 of the key, never the key.

    It names the key without revealing it: recovering a 32+ character key from its hash is no easier than from
    any token's signature, which every token holder already has.
    """
    return hashlib.sha256(b"cdc-dashboard token key\x00" + secret.encode()).hexdigest()[:16]


def create_token(secret: str, business_ids: list[str], ttl_seconds: int, *, admin: bool = False) -> str:
    """A signed token for these businesses (all of them when `admin`), valid for `ttl_seconds`.

    Raises ValueError for a business id that is not a UUID or a ttl outside 1..MAX_TTL_SECONDS.
    """
    if not 0 < ttl_seconds <= MAX_TTL_SECONDS:
        raise ValueError(f"the ttl must be from 1 to {MAX_TTL_SECONDS} seconds (366 days)")
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "admin" if admin else "dashboard",
        "businesses": [str(uuid.UUID(b)) for b in business_ids],
        "admin": admin,
        "iat": now,
        "exp": now + ttl_seconds,
    }
    return jwt.encode(claims, secret, algorithm=ALGORITHM, headers={"kid": key_id(secret)})
