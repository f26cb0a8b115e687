"""Dashboard tokens: HS256 JWTs signed with CDC_SECRET that name the businesses a dashboard may see.

Made here for everyone who hands a dashboard its token (`cdc-dashboard token`, `run`, the doctor's probe);
the gateway verifies them (gateway/auth.py) with the same algorithm and issuer.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import jwt

__all__ = ["ALGORITHM", "ISSUER", "create_token"]

ALGORITHM = "HS256"
ISSUER = "cdc-dashboard"


def create_token(secret: str, business_ids: list[str], ttl_seconds: int, *, admin: bool = False) -> str:
    """A signed token for these businesses (all of them when `admin`), valid for `ttl_seconds`.

    Raises ValueError for a business id that is not a UUID or a non-positive ttl.
    """
    if ttl_seconds <= 0:
        raise ValueError("ttl_seconds must be positive")
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "admin" if admin else "dashboard",
        "businesses": [str(uuid.UUID(b)) for b in business_ids],
        "admin": admin,
        "iat": now,
        "exp": now + ttl_seconds,
    }
    return jwt.encode(claims, secret, algorithm=ALGORITHM)
