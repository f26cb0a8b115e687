"""Authorisation on every business endpoint of the real app: 401 missing/forged/malformed/expired, 403 other
business, 4xx for a business id that is not a UUID, and the admin-only status endpoint."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import aiohttp
import jwt
import pytest
from starlette.routing import Route

from .gateway_support import SECRET, Gateway, open_stream, run_gateway, token_for

B = str(uuid.uuid4())
OTHER = str(uuid.uuid4())


def _expired() -> str:
    now = int(time.time())
    claims = {"iss": "cdc-dashboard", "sub": "dashboard", "businesses": [B], "admin": False}
    return jwt.encode({**claims, "iat": now - 120, "exp": now - 60}, SECRET, algorithm="HS256")


def _forged() -> str:
    return token_for(B).rsplit(".", 1)[0] + "." + jwt.encode({"x": 1}, "another-secret-" + "x" * 32).rsplit(".", 1)[1]


def _other_key() -> str:
    now = int(time.time())
    claims = {"iss": "cdc-dashboard", "businesses": [B], "admin": True, "iat": now, "exp": now + 600}
    return jwt.encode(claims, "another-secret-" + "x" * 32, algorithm="HS256")


def _unsigned() -> str:
    now = int(time.time())
    claims = {"iss": "cdc-dashboard", "businesses": [B], "admin": True, "iat": now, "exp": now + 600}
    return jwt.encode(claims, None, algorithm="none")


# (case, Authorization header value or None, expected status)
CASES: list[tuple[str, Callable[[], str | None], int]] = [
    ("missing", lambda: None, 401),
    ("forged signature", _forged, 401),
    ("signed with another key", _other_key, 401),
    ("alg none", _unsigned, 401),
    ("malformed", lambda: "not-a-token", 401),
    ("expired", _expired, 401),
    ("another business", lambda: token_for(OTHER), 403),
]


def _business_paths(gw: Gateway) -> list[tuple[str, str]]:
    """(method, path) of every mounted route that concerns one business, with B filled in."""
    out: list[tuple[str, str]] = []
    for route in gw.app.routes:
        if isinstance(route, Route) and "{business_id}" in route.path:
            for method in sorted((route.methods or {"GET"}) - {"HEAD"}):
                out.append((method, route.path.replace("{business_id}", B)))
    return out


async def _status(session: aiohttp.ClientSession, method: str, url: str, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with session.request(method, url, headers=headers, timeout=aiohttp.ClientTimeout(total=10)) as response:
        if response.status >= 400 and url.split("/", 3)[3].startswith("v1/"):  # the page answers in HTML
            body = await response.json(content_type=None)
            assert isinstance(body.get("error"), str) and body["error"], f"{method} {url}: no error reason"
        return response.status


@pytest.mark.parametrize(("case", "make", "expected"), CASES, ids=[c[0] for c in CASES])
async def test_every_business_endpoint_refuses(
    db_url: str, case: str, make: Callable[[], str | None], expected: int
) -> None:
    async with run_gateway(db_url) as gw, aiohttp.ClientSession() as session:
        paths = _business_paths(gw)
        assert ("GET", f"/v1/businesses/{B}/events") in paths
        token = make()
        for method, path in paths:
            assert await _status(session, method, gw.url + path, token) == expected, f"{case}: {method} {path}"


async def test_token_in_query_and_admin_token_are_accepted(db_url: str) -> None:
    async with run_gateway(db_url) as gw:
        async with open_stream(gw.url, B, None, query=f"?access_token={token_for(B)}") as stream:
            assert stream.response.status == 200
        async with open_stream(gw.url, B, token_for(admin=True)) as stream:
            assert stream.response.status == 200
        async with open_stream(gw.url, B, None, query="?access_token=") as stream:
            assert stream.response.status == 401


async def test_wrong_authorization_scheme_is_401(db_url: str) -> None:
    async with (
        run_gateway(db_url) as gw,
        aiohttp.ClientSession() as session,
        session.get(f"{gw.url}/v1/businesses/{B}/events", headers={"Authorization": f"Basic {token_for(B)}"}) as r,
    ):
        assert r.status == 401
        assert "Bearer" in (await r.json())["error"]


@pytest.mark.parametrize("bad_id", ["not-a-uuid", "1", "%27%3B--"])
async def test_business_id_that_is_not_a_uuid_is_4xx(db_url: str, bad_id: str) -> None:
    async with run_gateway(db_url) as gw, aiohttp.ClientSession() as session:
        for method, path in _business_paths(gw):
            status = await _status(session, method, gw.url + path.replace(B, bad_id), token_for(admin=True))
            assert 400 <= status < 500, f"{method} {path}: {status}"


async def test_status_needs_an_admin_token(db_url: str) -> None:
    async with run_gateway(db_url) as gw, aiohttp.ClientSession() as session:
        assert await _status(session, "GET", f"{gw.url}/v1/status", None) == 401
        assert await _status(session, "GET", f"{gw.url}/v1/status", _expired()) == 401
        assert await _status(session, "GET", f"{gw.url}/v1/status", token_for(B)) == 403
        headers = {"Authorization": f"Bearer {token_for(admin=True)}"}
        async with session.get(f"{gw.url}/v1/status", headers=headers) as response:
            assert response.status == 200
            body = await response.json()
        assert body["gateway"]["listening"] is True
        assert body["listener_state"]["state"] in {"stopped", "connecting", "catching_up", "live", "standby"}
