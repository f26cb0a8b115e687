"""Authorisation of dashboard requests by their token (made by cdc_dashboard.tokens).

A token travels as `Authorization: Bearer TOKEN`. Only the routes a browser opens by URL, the event stream
(EventSource cannot set headers) and the dashboard page, also take it as `?access_token=TOKEN`: elsewhere a
token in the URL would only end up in proxies' logs and browser history. Every endpoint that concerns a
business calls `authorize`: 401 for a missing, forged, malformed or expired token; 400 for a business id that
is not a canonical UUID; 403 when the token does not name the business. An admin token names every business and
may read `/v1/status`.

Keys (`Keyring`): tokens are verified with CDC_SECRET, or with one of CDC_SECRET_PREVIOUS (earlier keys kept
while their tokens live on), or, for admin tokens, with CDC_ADMIN_SECRET when it is set. A token's `kid` header
names its key; tokens minted before tokens had one are tried against CDC_SECRET and CDC_SECRET_PREVIOUS.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from typing import Any

import jwt
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection

from ..tokens import ALGORITHM, ISSUER, key_id
from .state import gateway_state

__all__ = [
    "LEEWAY_SECONDS",
    "Keyring",
    "TokenClaims",
    "authorize",
    "authorize_admin",
    "canonical_uuid",
    "decode_token",
    "parse_business_id",
    "token_from_request",
]

# A token is still accepted this long after its `exp`: clocks of the host that minted it and of the gateway
# may differ by a few seconds. (A stream still ends at `exp` itself.)
LEEWAY_SECONDS = 5
# An `exp` past what a datetime can hold (tokens minted before --ttl was capped) means "does not expire in
# practice": it is kept as this, rather than overflowing.
_LATEST_EXPIRY = datetime(9999, 12, 31, tzinfo=UTC)


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


@dataclass(frozen=True)
class _Key:
    secret: str = field(repr=False)
    admin: bool  # CDC_ADMIN_SECRET


@dataclass(frozen=True)
class Keyring:
    """The keys a gateway verifies tokens with, by their `kid`. Only `cdc-dashboard token` signs: the gateway
    never needs more than verification."""

    keys: dict[str, _Key]
    # Keys a token without `kid` may be signed with: CDC_SECRET and CDC_SECRET_PREVIOUS, in that order.
    legacy: tuple[_Key, ...]
    # With CDC_ADMIN_SECRET set, an admin token signed with any other key is refused.
    admin_key_required: bool

    @classmethod
    def of(cls, secret: str, previous: tuple[str, ...] = (), admin_secret: str | None = None) -> Keyring:
        business = [_Key(s, admin=False) for s in (secret, *previous)]
        admin = [_Key(admin_secret, admin=True)] if admin_secret else []
        keys = {key_id(k.secret): k for k in reversed([*business, *admin])}  # the first of duplicates wins
        return cls(keys, tuple(business), admin_key_required=bool(admin))

    def candidates(self, kid: object) -> tuple[_Key, ...]:
        if kid is None:
            return self.legacy
        key = self.keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise HTTPException(401, "token is signed with a key this gateway does not accept (a retired key?)")
        return (key,)


def decode_token(keys: Keyring | str, token: str) -> TokenClaims:
    """Verify a token (with a keyring, or one key); raises HTTPException(401) with a reason that never repeats
    the token."""
    keyring = keys if isinstance(keys, Keyring) else Keyring.of(keys)
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.InvalidTokenError:
        raise HTTPException(401, "token is malformed") from None
    for key in keyring.candidates(kid):
        try:
            claims = jwt.decode(
                token,
                key.secret,
                algorithms=[ALGORITHM],
                issuer=ISSUER,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "iat", "iss"]},
            )
        except jwt.InvalidSignatureError:
            continue  # without a kid: maybe the next key
        except jwt.ExpiredSignatureError:
            raise HTTPException(401, "token expired") from None
        except jwt.InvalidTokenError:
            raise HTTPException(401, "token is malformed") from None
        break
    else:
        raise HTTPException(401, "token signature is invalid")
    businesses = claims.get("businesses", [])
    admin = claims.get("admin", False)
    if not isinstance(businesses, list) or not all(isinstance(b, str) for b in businesses):
        raise HTTPException(401, "token is malformed")
    if not isinstance(admin, bool) or not isinstance(claims["exp"], int | float):
        raise HTTPException(401, "token is malformed")
    if admin and keyring.admin_key_required and not key.admin:
        raise HTTPException(401, "admin tokens must be signed with the admin key (CDC_ADMIN_SECRET)")
    expires_at = _LATEST_EXPIRY
    if claims["exp"] < _LATEST_EXPIRY.timestamp():
        expires_at = datetime.fromtimestamp(claims["exp"], UTC)
    return TokenClaims(
        business_ids=frozenset(b.lower() for b in businesses),
        admin=admin,
        expires_at=expires_at,
        subject=str(claims.get("sub", "")),
        token_id=_token_id(claims),
    )


def _token_id(claims: dict[str, Any]) -> str:
    canonical = json.dumps(claims, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def token_from_request(request: HTTPConnection, *, allow_query_token: bool = False) -> str | None:
    """The bearer token of the Authorization header, else (where allowed) the `access_token` query parameter."""
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise HTTPException(401, "Authorization header must be 'Bearer TOKEN'")
        return value.strip()
    in_query = request.query_params.get("access_token")
    if in_query and not allow_query_token:
        raise HTTPException(
            401,
            "send the token as 'Authorization: Bearer TOKEN': ?access_token= is accepted only by the event "
            "stream and the dashboard page",
        )
    return in_query or None


def canonical_uuid(value: str) -> str | None:
    """`value` as a lower-case hyphenated UUID when it is any spelling of one (upper case, no hyphens, braces,
    `urn:uuid:`), else None."""
    try:
        return str(uuid.UUID(value))
    except (ValueError, AttributeError, TypeError):
        return None


def parse_business_id(value: str) -> str:
    """A business id exactly in canonical form (lower-case hyphenated UUID), or HTTPException(400).

    Other spellings of a UUID are refused rather than read: a client keys its caches (TanStack query keys) by
    the id it sends, while events and bodies carry the canonical form, so a client that sent another spelling
    would never see its caches invalidated. A 400 says so at once. (The dashboard page, which people open from
    pasted links, canonicalises instead: page.py.)
    """
    canonical = canonical_uuid(value)
    if canonical is None:
        raise HTTPException(400, "business id must be a UUID, e.g. 123e4567-e89b-12d3-a456-426614174000")
    if canonical != value:
        raise HTTPException(400, f"business id must be written in lower case with hyphens: {canonical}")
    return canonical


@cache
def _keyring(secret: str, previous: tuple[str, ...], admin_secret: str | None) -> Keyring:
    return Keyring.of(secret, previous, admin_secret)


def _keys(request: HTTPConnection) -> Keyring:
    settings = gateway_state(request).settings
    if not settings.secret:
        # `serve` refuses to start without one; reaching this is a deployment bug, not the client's fault. Like
        # every 503 it says when to come back (an operator has to fix it first: not soon).
        raise HTTPException(503, "the gateway has no CDC_SECRET configured", headers={"Retry-After": "60"})
    return _keyring(settings.secret, tuple(settings.secret_previous), settings.admin_secret)


def _claims(request: HTTPConnection, allow_query_token: bool) -> TokenClaims:
    token = token_from_request(request, allow_query_token=allow_query_token)
    if token is None:
        where = " or ?access_token=" if allow_query_token else ""
        raise HTTPException(401, f"missing token: send 'Authorization: Bearer TOKEN'{where}")
    return decode_token(_keys(request), token)


def authorize(request: HTTPConnection, business_id: str, *, allow_query_token: bool = False) -> TokenClaims:
    """The token's claims when it may see `business_id`; else HTTPException 400, 401 or 403.

    `allow_query_token`: only for routes a browser opens by URL (the event stream, the page). A malformed
    business id is a 400, checked after the token so an anonymous caller learns nothing more than 401.
    """
    claims = _claims(request, allow_query_token)
    canonical = parse_business_id(business_id)
    if not claims.allows(canonical):
        raise HTTPException(403, "token does not grant access to this business")
    return claims


def authorize_admin(request: HTTPConnection) -> TokenClaims:
    """The claims of an admin token; else HTTPException 401 or 403."""
    claims = _claims(request, allow_query_token=False)
    if not claims.admin:
        raise HTTPException(403, "an admin token is required")
    return claims
