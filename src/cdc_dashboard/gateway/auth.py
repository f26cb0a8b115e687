"""Authorisation of dashboard requests by their token (made by cdc_dashboard.tokens).

A token travels as `Authorization: Bearer TOKEN` or, for browsers' EventSource (which cannot set headers),
as `?access_token=TOKEN`. Every endpoint that concerns a business calls `authorize`: 401 for a missing,
forged, malformed or expired token; 403 when the token does not name the business. An admin token names
every business and may read `/v1/status`.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jwt
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection

from ..tokens import ALGORITHM, ISSUER
from .state import gateway_state

__all__ = [
    "TokenClaims",
    "authorize",
    "authorize_admin",
    "decode_token",
    "parse_business_id",
    "token_from_request",
]

# A little slack for clocks that differ between the host that signed a token and the gateway.
_LEEWAY_SECONDS = 5


@dataclass(frozen=True)
class TokenClaims:
    """What a verified token allows."""

    business_ids: frozenset[str]
    admin: bool
    expires_at: datetime
    subject: str
    # Tells one token from another (the per-token stream cap) without keeping the token: a digest of its
    # verified claims. Not of its text: base64 padding bits let one token be spelled several ways.
    token_id: str = ""

    def allows(self, business_id: str) -> bool:
        return self.admin or business_id in self.business_ids

    def seconds_left(self) -> float:
        return self.expires_at.timestamp() - time.time()


def decode_token(secret: str, token: str) -> TokenClaims:
    """Verify a token; raises HTTPException(401) with a reason that never repeats the token."""
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            issuer=ISSUER,
            leeway=_LEEWAY_SECONDS,
            options={"require": ["exp", "iat", "iss"]},
        )
    except jwt.ExpiredSignatureError:
        raise HTTPException(401, "token expired") from None
    except jwt.InvalidSignatureError:
        raise HTTPException(401, "token signature is invalid") from None
    except jwt.InvalidTokenError:
        raise HTTPException(401, "token is malformed") from None
    businesses = claims.get("businesses", [])
    admin = claims.get("admin", False)
    if not isinstance(businesses, list) or not all(isinstance(b, str) for b in businesses):
        raise HTTPException(401, "token is malformed")
    if not isinstance(admin, bool) or not isinstance(claims["exp"], int | float):
        raise HTTPException(401, "token is malformed")
    return TokenClaims(
        business_ids=frozenset(b.lower() for b in businesses),
        admin=admin,
        expires_at=datetime.fromtimestamp(claims["exp"], UTC),
        subject=str(claims.get("sub", "")),
        token_id=_token_id(claims),
    )


def _token_id(claims: dict[str, Any]) -> str:
    canonical = json.dumps(claims, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def token_from_request(request: HTTPConnection) -> str | None:
    """The bearer token of the Authorization header, else the `access_token` query parameter."""
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise HTTPException(401, "Authorization header must be 'Bearer TOKEN'")
        return value.strip()
    return request.query_params.get("access_token") or None


def parse_business_id(value: str) -> str:
    """A business id in canonical form (lower-case UUID), or HTTPException(400)."""
    try:
        return str(uuid.UUID(value))
    except (ValueError, AttributeError, TypeError):
        raise HTTPException(400, "business id must be a UUID") from None


def _secret(request: HTTPConnection) -> str:
    secret = gateway_state(request).settings.secret
    if not secret:
        # `serve` refuses to start without one; reaching this is a deployment bug, not the client's fault.
        raise HTTPException(503, "the gateway has no CDC_SECRET configured")
    return secret


def _claims(request: HTTPConnection) -> TokenClaims:
    token = token_from_request(request)
    if token is None:
        raise HTTPException(401, "missing token: send 'Authorization: Bearer TOKEN' or ?access_token=")
    return decode_token(_secret(request), token)


def authorize(request: HTTPConnection, business_id: str) -> TokenClaims:
    """The token's claims when it may see `business_id`; else HTTPException 400, 401 or 403.

    A malformed business id is a 400, checked after the token so an anonymous caller learns nothing more
    than 401.
    """
    claims = _claims(request)
    canonical = parse_business_id(business_id)
    if not claims.allows(canonical):
        raise HTTPException(403, "token does not grant access to this business")
    return claims


def authorize_admin(request: HTTPConnection) -> TokenClaims:
    """The claims of an admin token; else HTTPException 401 or 403."""
    claims = _claims(request)
    if not claims.admin:
        raise HTTPException(403, "an admin token is required")
    return claims
