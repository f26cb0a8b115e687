"""Token keys through a real gateway: rotation (CDC_SECRET_PREVIOUS), `kid`, the admin key, tokens without
`kid` from before it, the leeway at its boundary, huge `exp`, where ?access_token= is accepted, and the
`token` command's --ttl cap."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import psycopg
import pytest

from cdc_dashboard.config import ConfigError, load_settings
from cdc_dashboard.gateway.auth import LEEWAY_SECONDS, decode_token
from cdc_dashboard.tokens import MAX_TTL_SECONDS, create_token, key_id

from .gateway_support import SECRET, open_stream, run_gateway, token_for

CLI = str(Path(sys.executable).parent / "cdc-dashboard")
OLD = "the-key-before-the-rotation-" + "o" * 20
OLDER = "the-key-before-that-one-" + "p" * 20
ADMIN = "the-admin-signing-key-" + "a" * 20
UNKNOWN = "a-key-the-gateway-never-knew-" + "u" * 20


def _claims(business: str | None, *, admin: bool = False, exp_in: float = 600, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {
        "iss": "cdc-dashboard",
        "sub": "dashboard",
        "businesses": [business] if business else [],
        "admin": admin,
        "iat": now - 1,
        "exp": now + exp_in,
        **extra,
    }


def _kidless(secret: str, business: str | None, *, admin: bool = False, exp_in: float = 600) -> str:
    """A token as minted before tokens carried a `kid`."""
    return jwt.encode(_claims(business, admin=admin, exp_in=exp_in), secret, algorithm="HS256")


def _with_header(token: str, header: dict[str, Any]) -> str:
    """`token` with another header (PyJWT refuses to write some): the signature no longer matches either."""
    encoded = base64.urlsafe_b64encode(json.dumps(header).encode()).decode().rstrip("=")
    return encoded + token[token.index(".") :]


@pytest.fixture
def business(db_url: str) -> str:
    b = str(uuid.uuid4())
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("insert into businesses (id, name) values (%s, 'Salon')", (b,))
    return b


async def _status(session: aiohttp.ClientSession, url: str, token: str | None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.get(url, headers=headers) as response:
        return response.status, await response.text()


def test_tokens_carry_the_kid_of_their_key_never_the_key() -> None:
    token = create_token(SECRET, [], 60, admin=True)
    header = jwt.get_unverified_header(token)
    assert header["kid"] == key_id(SECRET) and len(header["kid"]) == 16
    assert SECRET not in token and key_id(SECRET) != key_id(OLD)


async def test_rotation_accepts_current_and_previous_keys_only(business: str, db_url: str) -> None:
    stats = f"/v1/businesses/{business}/stats"
    async with (
        run_gateway(db_url, secret_previous=[OLD, OLDER]) as gw,
        aiohttp.ClientSession() as session,
    ):
        for name, token, expected in [
            ("current key", create_token(SECRET, [business], 600), 200),
            ("previous key", create_token(OLD, [business], 600), 200),
            ("the key before", create_token(OLDER, [business], 600), 200),
            ("kid-less, current key", _kidless(SECRET, business), 200),
            ("kid-less, previous key", _kidless(OLD, business), 200),
            ("unknown key", create_token(UNKNOWN, [business], 600), 401),
            ("kid-less, unknown key", _kidless(UNKNOWN, business), 401),
            # A known kid does not make another key's signature valid.
            ("known kid, unknown key", jwt.encode(_claims(business), UNKNOWN, "HS256", {"kid": key_id(OLD)}), 401),
            ("kid not a string", _with_header(create_token(SECRET, [business], 600), {"alg": "HS256", "kid": 7}), 401),
        ]:
            status, body = await _status(session, gw.url + stats, token)
            assert status == expected, (name, body)
            if status == 401:
                assert token not in body and OLD not in body and SECRET not in body
        async with open_stream(gw.url, business, create_token(OLD, [business], 600)) as stream:
            assert stream.response.status == 200


async def test_a_rotated_out_key_is_refused(business: str, db_url: str) -> None:
    async with run_gateway(db_url) as gw, aiohttp.ClientSession() as session:
        status, body = await _status(
            session, f"{gw.url}/v1/businesses/{business}/stats", create_token(OLD, [business], 60)
        )
    assert status == 401 and "key" in body


async def test_with_an_admin_key_only_it_signs_admin_tokens(business: str, db_url: str) -> None:
    async with run_gateway(db_url, secret_previous=[OLD], admin_secret=ADMIN) as gw, aiohttp.ClientSession() as session:
        url = f"{gw.url}/v1/status"
        assert (await _status(session, url, create_token(ADMIN, [], 60, admin=True)))[0] == 200
        for name, token in [
            ("current business key", create_token(SECRET, [], 60, admin=True)),
            ("previous business key", create_token(OLD, [], 60, admin=True)),
            ("kid-less, business key", _kidless(SECRET, None, admin=True)),
            ("kid-less, admin key", _kidless(ADMIN, None, admin=True)),  # the admin key always came with kids
        ]:
            status, body = await _status(session, url, token)
            assert status == 401, (name, body)
        status, body = await _status(session, url, create_token(SECRET, [], 60, admin=True))
        assert "admin key" in body
        # Admin tokens see every business; business tokens are unchanged.
        stats = f"{gw.url}/v1/businesses/{business}/stats"
        assert (await _status(session, stats, create_token(ADMIN, [], 60, admin=True)))[0] == 200
        assert (await _status(session, stats, create_token(SECRET, [business], 60)))[0] == 200


async def test_access_token_in_the_url_only_for_the_stream_and_the_page(business: str, db_url: str) -> None:
    token = token_for(business)
    async with run_gateway(db_url) as gw, aiohttp.ClientSession() as session:
        for path in (f"/v1/businesses/{business}/stats", f"/v1/businesses/{business}/transactions", "/v1/status"):
            async with session.get(gw.url + path, params={"access_token": token_for(business, admin=True)}) as r:
                assert r.status == 401, path
                error = (await r.json())["error"]
                assert "Authorization: Bearer" in error and "access_token" in error and token not in error
        async with session.post(f"{gw.url}/v1/businesses/{business}/refresh", params={"access_token": token}) as r:
            assert r.status == 401
        async with open_stream(gw.url, business, None, query=f"?access_token={token}") as stream:
            assert stream.response.status == 200
        async with session.get(f"{gw.url}/dashboard/{business}", params={"access_token": token}) as r:
            assert r.status == 200


async def test_the_leeway_at_its_boundary(business: str, db_url: str) -> None:
    """Accepted up to LEEWAY_SECONDS after `exp` (clock skew between hosts), refused after; docs/API.md says so."""
    url = f"/v1/businesses/{business}/stats"
    async with run_gateway(db_url) as gw, aiohttp.ClientSession() as session:
        just_expired = jwt.encode(_claims(business, exp_in=-(LEEWAY_SECONDS - 3)), SECRET, "HS256")
        assert (await _status(session, gw.url + url, just_expired))[0] == 200
        past_leeway = jwt.encode(_claims(business, exp_in=-(LEEWAY_SECONDS + 2)), SECRET, "HS256")
        status, body = await _status(session, gw.url + url, past_leeway)
        assert status == 401 and "expired" in body


def test_the_docs_state_the_leeway() -> None:
    assert (
        f"up to {LEEWAY_SECONDS} s after its `exp`"
        in (Path(__file__).resolve().parents[2] / "docs" / "API.md").read_text()
    )


@pytest.mark.parametrize("exp", [10**12, 2**63, 10**30, 1e300])
async def test_a_huge_exp_is_no_500(business: str, db_url: str, exp: float) -> None:
    token = jwt.encode({**_claims(business), "exp": exp}, SECRET, "HS256")
    async with run_gateway(db_url) as gw, aiohttp.ClientSession() as session:
        assert (await _status(session, f"{gw.url}/v1/businesses/{business}/stats", token))[0] == 200
        async with open_stream(gw.url, business, token) as stream:
            assert stream.response.status == 200
            assert (await stream.response.content.readline()).startswith(b"retry:")
    assert decode_token(SECRET, token).seconds_left() > 100 * 365 * 86400


def _env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
    env.update(values)
    return env


def test_token_ttl_beyond_the_cap_is_one_line_and_exit_2(tmp_path: Path) -> None:
    b = str(uuid.uuid4())
    for ttl in (str(MAX_TTL_SECONDS + 1), str(10**20), "0", "-5"):
        result = subprocess.run(
            [CLI, "token", b, "--ttl", ttl], env=_env(CDC_SECRET=SECRET), cwd=tmp_path, capture_output=True, text=True
        )
        assert result.returncode == 2 and result.stdout == "", ttl
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "--ttl must be from 1 to 31622400 seconds (366 days)" in lines[0], result.stderr
    result = subprocess.run(
        [CLI, "token", b, "--ttl", str(MAX_TTL_SECONDS)],
        env=_env(CDC_SECRET=SECRET),
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert MAX_TTL_SECONDS - 60 < decode_token(SECRET, result.stdout.strip()).seconds_left() <= MAX_TTL_SECONDS
    with pytest.raises(ValueError, match="366 days"):
        create_token(SECRET, [b], MAX_TTL_SECONDS + 1)


def test_token_admin_signs_with_the_admin_key(tmp_path: Path) -> None:
    result = subprocess.run(
        [CLI, "token", "--admin"],
        env=_env(CDC_SECRET=SECRET, CDC_ADMIN_SECRET=ADMIN),
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert jwt.get_unverified_header(result.stdout.strip())["kid"] == key_id(ADMIN)


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"CDC_SECRET_PREVIOUS": f"{OLD},too-short"}, "CDC_SECRET_PREVIOUS: each key must be at least 32 characters"),
        ({"CDC_ADMIN_SECRET": "short"}, "CDC_ADMIN_SECRET: must be at least 32 characters"),
        ({"CDC_ADMIN_SECRET": SECRET}, "CDC_ADMIN_SECRET: must differ from CDC_SECRET"),
        ({"CDC_SECRET_PREVIOUS": OLD, "CDC_ADMIN_SECRET": OLD}, "CDC_ADMIN_SECRET: must differ from CDC_SECRET"),
    ],
)
def test_key_settings_are_validated_without_echoing_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str], reason: str
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setenv("CDC_SECRET", SECRET)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith(reason), message
    assert OLD not in message and SECRET not in message and "too-short" not in message


def test_previous_keys_are_a_comma_separated_list(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CDC_SECRET_PREVIOUS", f" {OLD} , {OLDER},")
    assert load_settings().secret_previous == [OLD, OLDER]
