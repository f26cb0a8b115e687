"""Limits against a real uvicorn and PostgreSQL: the per-token stream cap, the refresh cooldown, the rate
limits per client address (X-Forwarded-For from a trusted proxy, every line of it), and every refusal counted
by reason in /metrics and logged once without a token."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

import aiohttp
import httpx
import psycopg

from cdc_dashboard.gateway.auth import decode_token
from cdc_dashboard.ingest.paystack import sign

from .gateway_support import SECRET, Gateway, free_port, open_stream, run_gateway, serve_subprocess, token_for
from .webhook_server import MPESA_TOKEN, fixture, serve_webhooks


def _business(db_url: str) -> str:
    business = str(uuid.uuid4())
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("insert into businesses (id, name) values (%s, 'Limits')", (business,))
    return business


def _rejected(metrics_text: str) -> dict[str, float]:
    """cdc_gateway_rejected_requests_total by reason."""
    prefix = 'cdc_gateway_rejected_requests_total{reason="'
    counts: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith(prefix):
            reason, _, value = line.removeprefix(prefix).partition('"} ')
            counts[reason] = float(value)
    return counts


async def _metrics(base_url: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as session, session.get(f"{base_url}/metrics") as r:
        return _rejected(await r.text())


async def test_eleventh_stream_of_a_token_is_429_while_another_token_opens(db_url: str) -> None:
    b = str(uuid.uuid4())
    token, other_token = token_for(b), token_for(b, ttl=601)  # (other claims: another token)
    async with run_gateway(db_url) as gw, contextlib.AsyncExitStack() as streams:
        opened = [await streams.enter_async_context(open_stream(gw.url, b, token)) for _ in range(10)]
        assert [s.response.status for s in opened] == [200] * 10
        # The same token by the query string is the same token.
        async with open_stream(gw.url, b, None, query=f"?access_token={token}") as eleventh:
            assert eleventh.response.status == 429
            assert 1 <= int(eleventh.response.headers["Retry-After"]) <= 60
            assert "10 open streams" in (await eleventh.response.json())["error"]
        async with open_stream(gw.url, b, other_token) as other:
            assert other.response.status == 200
        # A stream that ends gives its place back, here by the client going away.
        first = opened[0]
        first.response.close()
        for _ in range(100):
            async with open_stream(gw.url, b, token) as again:
                if again.response.status == 200:
                    break
            await asyncio.sleep(0.05)
        assert again.response.status == 200
        assert (await _metrics(gw.url))["stream_cap"] == 1
        # Every stream closed: the token leaves no entry behind.
        await streams.aclose()
        assert await _held_drops_to_zero(gw, token)


def _token_id(token: str) -> str:
    return decode_token(SECRET, token).token_id


async def _held_drops_to_zero(gw: Gateway, token: str) -> bool:
    for _ in range(100):
        if gw.app_state.limits.streams_per_token.held(_token_id(token)) == 0:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_stream_count_drops_when_the_token_expires(db_url: str) -> None:
    b = str(uuid.uuid4())
    token = token_for(b, ttl=2)
    async with run_gateway(db_url, max_streams_per_token=1) as gw:
        async with open_stream(gw.url, b, token) as stream:
            assert stream.response.status == 200
            await stream.until_closed(timeout=10)  # the gateway ends it at the token's expiry
            assert "token expired" in stream.comments
        assert await _held_drops_to_zero(gw, token)


async def test_refresh_within_the_cooldown_is_429_with_the_seconds_left(db_url: str) -> None:
    b, other = _business(db_url), _business(db_url)
    async with run_gateway(db_url, refresh_cooldown_seconds=2) as gw, aiohttp.ClientSession() as session:

        async def refresh(business: str) -> aiohttp.ClientResponse:
            headers = {"Authorization": f"Bearer {token_for(business)}"}
            async with session.post(f"{gw.url}/v1/businesses/{business}/refresh", headers=headers) as r:
                await r.read()
                return r

        assert (await refresh(b)).status == 200
        again = await refresh(b)
        assert again.status == 429
        assert int(again.headers["Retry-After"]) in (1, 2)
        assert "refreshed less than 2 s ago" in json.loads(await again.text())["error"]
        assert (await refresh(other)).status == 200  # per business
        unknown = str(uuid.uuid4())
        assert [(await refresh(unknown)).status for _ in range(2)] == [404, 404]  # nothing refreshed: no cooldown
        # Retry-After is a promise: after waiting that long, the refresh runs.
        await asyncio.sleep(int(again.headers["Retry-After"]))
        assert (await refresh(b)).status == 200
        # An unknown token learns nothing about the cooldown: 401 first.
        async with session.post(f"{gw.url}/v1/businesses/{b}/refresh") as r:
            assert r.status == 401
        assert (await _metrics(gw.url))["refresh_cooldown"] == 1


async def test_rate_limits_per_forwarded_address(db_url: str) -> None:
    b = str(uuid.uuid4())
    async with (
        run_gateway(
            db_url,
            trusted_proxies=["127.0.0.1"],
            rate_limit_stream_opens_per_minute=3,
            rate_limit_webhooks_per_minute=2,
            paystack_secret_key="sk_test_" + "x" * 40,
        ) as gw,
        aiohttp.ClientSession() as session,
    ):

        async def stream_open(client: str) -> aiohttp.ClientResponse:
            # Without a token (401): refused opens count against the address too.
            url = f"{gw.url}/v1/businesses/{b}/events"
            async with session.get(url, headers={"X-Forwarded-For": client}) as r:
                await r.read()
                return r

        async def webhook(client: str) -> aiohttp.ClientResponse:
            headers = {"X-Forwarded-For": client, "x-paystack-signature": "0" * 128}
            async with session.post(f"{gw.url}/v1/webhooks/paystack", data=b"{}", headers=headers) as r:
                await r.read()
                return r

        assert [(await stream_open("203.0.113.1")).status for _ in range(3)] == [401] * 3
        limited = await stream_open("203.0.113.1")
        assert limited.status == 429
        assert 1 <= int(limited.headers["Retry-After"]) <= 20  # one open every 20 s
        assert (await stream_open("203.0.113.2")).status == 401  # another address is not limited
        # A client cannot pick a fresh address by writing its own hop: the proxy's hop (rightmost) counts.
        assert (await stream_open("198.51.100.7, 203.0.113.1")).status == 429

        assert [(await webhook("203.0.113.1")).status for _ in range(2)] == [401] * 2
        limited = await webhook("203.0.113.1")
        assert limited.status == 429 and int(limited.headers["Retry-After"]) >= 1
        assert (await webhook("203.0.113.2")).status == 401
        counts = await _metrics(gw.url)
        assert (counts["rate_limited"], counts["bad_signature"], counts["unauthorized"]) == (3, 3, 4)


async def test_default_limits_let_a_reconnect_storm_through(db_url: str) -> None:
    """Every dashboard of an office behind one address reconnecting at once (after a deploy) is not limited."""
    b = str(uuid.uuid4())
    async with run_gateway(db_url, max_streams_per_token=1000) as gw, contextlib.AsyncExitStack() as streams:
        token = token_for(b)
        opened = [await streams.enter_async_context(open_stream(gw.url, b, token)) for _ in range(200)]
        assert {s.response.status for s in opened} == {200}


def test_forwarded_for_sent_as_two_lines_cannot_pass_the_mpesa_allow_list(db_url: str) -> None:
    body = json.dumps(fixture("mpesa/c2b_confirmation_v2")).encode()
    url = f"/v1/webhooks/mpesa/{MPESA_TOKEN}/c2b/confirmation"
    with serve_webhooks(db_url, mpesa_allowed_ips=["196.201.214.0/24"], trusted_proxies=["127.0.0.1"]) as server:
        server.business(shortcode="600966")
        # The caller wrote an allowed address; the proxy appended the real one on a line of its own.
        forged = [("content-type", "application/json"), ("x-forwarded-for", "196.201.214.200")]
        forged.append(("x-forwarded-for", "203.0.113.9"))
        assert server.http.post(url, content=body, headers=forged).status_code == 403
        assert server.one("select count(*) from payments") == 0
        # Safaricom's address appended by the proxy after whatever came before: allowed.
        good = [("content-type", "application/json"), ("x-forwarded-for", "203.0.113.9")]
        good.append(("x-forwarded-for", "196.201.214.200"))
        assert server.http.post(url, content=body, headers=good).status_code == 200
        assert server.one("select count(*) from payments") == 1
        text = server.http.get("/metrics").text
        assert 'cdc_gateway_rejected_requests_total{reason="address_not_allowed"} 1.0' in text


def test_every_refusal_is_counted_by_reason_and_logged_once_without_a_token(db_url: str) -> None:
    """The real `serve` process and its JSON log lines."""
    b, other, unknown = _business(db_url), str(uuid.uuid4()), str(uuid.uuid4())
    token, paystack_key = token_for(b), "sk_test_" + "p" * 40
    port = free_port()
    env = {"CDC_PAYSTACK_SECRET_KEY": paystack_key, "CDC_MPESA_CALLBACK_TOKEN": MPESA_TOKEN, "PYTHONUNBUFFERED": "1"}
    with serve_subprocess(db_url, port, **env) as served, httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
        bearer = {"Authorization": f"Bearer {token}"}
        body = b'{"event": "charge.success"}'
        signature = sign(paystack_key, b"another body")
        answers = [
            http.get(f"/v1/businesses/{other}/events", params={"access_token": token}).status_code,
            http.get(f"/v1/businesses/{b}/stats", headers={"Authorization": "Bearer " + token[:-4]}).status_code,
            http.get(f"/v1/businesses/{b}/revenue", headers=bearer, params={"granularity": "week"}).status_code,
            http.get(
                f"/v1/businesses/{unknown}", headers={"Authorization": f"Bearer {token_for(unknown)}"}
            ).status_code,
            http.post(f"/v1/webhooks/mpesa/{MPESA_TOKEN}/nowhere", content=b"{}").status_code,  # no such route
            http.post("/v1/webhooks/paystack", content=body, headers={"x-paystack-signature": signature}).status_code,
            http.post(f"/v1/webhooks/mpesa/{MPESA_TOKEN}x/stk", content=b"{}").status_code,
            http.get(f"/dashboard/{other}", params={"access_token": token}).status_code,
        ]
        http.post(f"/v1/businesses/{b}/refresh", headers=bearer)
        answers.append(http.post(f"/v1/businesses/{b}/refresh", headers=bearer).status_code)
        assert answers == [403, 401, 400, 404, 404, 401, 401, 403, 429]
        counts = _rejected(http.get("/metrics").text)
        expected = {
            "forbidden": 2,
            "unauthorized": 1,
            "bad_request": 1,
            "not_found": 2,
            "bad_signature": 1,
            "bad_token": 1,
            "refresh_cooldown": 1,
        }
        assert {reason: counts.get(reason) for reason in expected} == expected
        deadline = time.monotonic() + 5
        while len(lines := _rejection_lines(served.output())) < len(answers):
            assert time.monotonic() < deadline, lines
            time.sleep(0.05)
        output = served.output()
    assert [(line["status"], line["reason"]) for line in lines] == [
        (403, "forbidden"),
        (401, "unauthorized"),
        (400, "bad_request"),
        (404, "not_found"),
        (404, "not_found"),
        (401, "bad_signature"),
        (401, "bad_token"),
        (403, "forbidden"),
        (429, "refresh_cooldown"),
    ]
    assert {line["client"] for line in lines} == {"127.0.0.1"}
    assert lines[0]["route"] == "/v1/businesses/{business_id}/events" and lines[0]["method"] == "GET"
    assert lines[4]["route"] == "-"  # no route matched: the raw path (with the M-Pesa token) is not logged
    assert lines[6]["route"] == "/v1/webhooks/mpesa/{token}/stk"
    for secret in (token, token[:-4], token_for(unknown), MPESA_TOKEN, signature, paystack_key, SECRET):
        assert secret not in output
    assert "access_token" not in output


def _rejection_lines(output: str) -> list[dict[str, object]]:
    """The gateway's log lines (JSON) about refused requests ("request rejected: ...", "webhook rejected: ...")."""
    lines = []
    for raw in output.splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(raw)
            if isinstance(entry, dict) and " rejected: " in str(entry.get("msg", "")):
                lines.append(entry)
    return lines


async def test_metrics_backlog_without_counting_the_whole_change_log(db_url: str) -> None:
    """A scrape reads the backlog exactly while it is small, and from the ends of the queue once it is large."""

    def capture(count: int) -> None:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(
                "insert into cdc.change_log (table_name, op, business_id, row_id)"
                " select 'public.payments', 'INSERT', 'b', g::text from generate_series(1, %s) g",
                (count,),
            )

    async def backlog() -> float:
        async with aiohttp.ClientSession() as session, session.get(f"{gw.url}/metrics") as r:
            text = await r.text()
        [line] = [line for line in text.splitlines() if line.startswith("cdc_listener_backlog ")]
        return float(line.split()[1])

    async with run_gateway(db_url) as gw:
        before = await backlog()
        capture(5)
        assert await backlog() == before + 5
        capture(20_000)
        assert await backlog() == before + 20_005  # estimated from the ids: no gaps here, so exact
