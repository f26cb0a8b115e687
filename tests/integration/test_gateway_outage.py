"""A database outage seen through a real gateway over HTTP, with a TCP proxy between it and PostgreSQL.

Every endpoint that needs the database answers 503 with `Retry-After` and `{"error": ...}` within seconds
whether the database went away (connections closed, new ones refused) or the path froze (nothing answers);
the same requests answer 200 once it is back, without restarting the gateway; open streams stay open through
the outage and get what was committed meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import psycopg
import pytest

from cdc_dashboard.gateway.database import DatabaseUnavailable, borrow, create_pool
from cdc_dashboard.gateway.pushed_figures import READ_TIMEOUT_SECONDS
from cdc_dashboard.ingest.paystack import sign

from ..listening import wait_for
from ..proxy import FreezableProxy, freezable_proxy
from .gateway_support import Gateway, append_events, open_stream, run_gateway, token_for
from .webhook_server import PAYSTACK_SECRET, charge

# What DESIGN promises ("never a hang past a few seconds"): the gateway's bounds are 2 s to get a connection and
# 5 s for a statement, so every answer comes within about 5 s; the margin is for a busy test machine.
ANSWER_WITHIN = 6.5


def through(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.username + '@' if parts.username else ''}127.0.0.1:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@pytest.fixture
def proxy(db_url: str) -> Iterator[FreezableProxy]:
    parts = urlsplit(db_url)
    if not parts.hostname or parts.hostname.startswith("/") or "host=" in parts.query:
        pytest.skip("needs PostgreSQL over TCP to put a proxy in between")
    with freezable_proxy(parts.hostname, parts.port or 5432) as running:
        yield running


@pytest.fixture
def business(db_url: str) -> str:
    business_id = str(uuid.uuid4())
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("insert into businesses (id, name) values (%s, 'Outage Salon')", (business_id,))
    return business_id


@dataclass(frozen=True)
class Call:
    name: str
    method: str
    path: str
    headers: dict[str, str]
    body: bytes | None = None


def calls(business_id: str) -> list[Call]:
    """One request to every endpoint that needs the database."""
    user = {"Authorization": f"Bearer {token_for(business_id)}"}
    admin = {"Authorization": f"Bearer {token_for(admin=True)}"}
    b = f"/v1/businesses/{business_id}"
    webhook = json.dumps(charge(uuid.UUID(business_id), reference=f"outage-{uuid.uuid4().hex}")).encode()
    return [
        Call("stats", "GET", f"{b}/stats", user),
        Call("business", "GET", b, user),
        Call("revenue", "GET", f"{b}/revenue?granularity=day", user),
        Call("transactions", "GET", f"{b}/transactions", user),
        Call("payments", "GET", f"{b}/payments", user),
        Call("payment-transactions", "GET", f"{b}/payment-transactions", user),
        Call("client-business-transactions", "GET", f"{b}/client-business-transactions", user),
        Call("bookings", "GET", f"{b}/bookings", user),
        Call("refresh", "POST", f"{b}/refresh", user),
        Call("status", "GET", "/v1/status", admin),
        Call("readyz", "GET", "/readyz", {}),
        # Replayed from the database: the gateway keeps no events in memory (sse_replay_memory_events=0).
        Call("stream replay", "GET", f"{b}/events", {**user, "Last-Event-ID": "0"}),
        Call(
            "webhook",
            "POST",
            "/v1/webhooks/paystack",
            {"x-paystack-signature": sign(PAYSTACK_SECRET, webhook), "Content-Type": "application/json"},
            webhook,
        ),
    ]


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float


def client() -> aiohttp.ClientSession:
    # A connection per request: a kept-alive one the server closed while the test waited would fail the next
    # request on the client's side, which is not what these tests are about.
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=30), connector=aiohttp.TCPConnector(force_close=True)
    )


async def call(session: aiohttp.ClientSession, base_url: str, c: Call) -> Answer:
    started = time.monotonic()
    async with session.request(c.method, base_url + c.path, headers=c.headers, data=c.body) as response:
        if response.content_type == "text/event-stream":
            body = b""  # a stream that opened: its headers are the answer
        else:
            body = await response.read()
        return Answer(response.status, dict(response.headers), body, time.monotonic() - started)


def assert_unavailable(c: Call, answer: Answer) -> None:
    assert answer.status == 503, (c.name, answer.status, answer.body[:300])
    assert answer.seconds < ANSWER_WITHIN, (c.name, answer.seconds)
    assert 1 <= int(answer.headers["Retry-After"]) <= 10, c.name
    assert isinstance(json.loads(answer.body)["error"], str), c.name
    assert b"Traceback" not in answer.body


@pytest.fixture
async def gateway(db_url: str, proxy: FreezableProxy) -> AsyncIterator[Gateway]:
    async with run_gateway(
        through(db_url, proxy.port),
        sse_replay_memory_events=0,
        sse_ping_seconds=0.5,
        refresh_cooldown_seconds=0,  # the tests refresh the same business before, during and after the outage
        paystack_secret_key=PAYSTACK_SECRET,
    ) as running:
        yield running


async def answers_when_back(session: aiohttp.ClientSession, gateway: Gateway, business_id: str) -> None:
    """Every call answers 200 again within seconds of the database's return, the same gateway process."""
    deadline = time.monotonic() + 20
    for c in calls(business_id):
        while True:
            answer = await call(session, gateway.url, c)
            if answer.status == 200 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert answer.status == 200, (c.name, answer.status, answer.body[:300])


async def scrape(session: aiohttp.ClientSession, gateway: Gateway) -> str:
    started = time.monotonic()
    async with session.get(f"{gateway.url}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    assert time.monotonic() - started < ANSWER_WITHIN
    return text


async def test_database_cut_answers_503_then_recovers(
    gateway: Gateway, proxy: FreezableProxy, business: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with client() as session:
        await answers_when_back(session, gateway, business)  # before the cut: all served
        assert "cdc_database_up 1.0" in await scrape(session, gateway)

        proxy.cut()
        caplog.clear()
        for c in calls(business):
            assert_unavailable(c, await call(session, gateway.url, c))
        metrics = await scrape(session, gateway)
        assert "cdc_database_up 0.0" in metrics
        assert "cdc_listener_backlog NaN" in metrics
        assert "process_open_fds" in metrics
        # Counted as refusals, all but /readyz (load balancers poll it: its 503 is its answer, not a refusal).
        counted = 'cdc_gateway_rejected_requests_total{reason="unavailable"} '
        assert float(metrics.split(counted)[1].split()[0]) == len(calls(business)) - 1
        # One line per failed request, no traceback, no token.
        outage_lines = [r for r in caplog.records if r.levelname in ("WARNING", "ERROR") and r.exc_info]
        assert outage_lines == []
        assert not any("Bearer" in r.getMessage() or "eyJ" in r.getMessage() for r in caplog.records)

        proxy.restore()
        await answers_when_back(session, gateway, business)
        assert "cdc_database_up 1.0" in await scrape(session, gateway)


async def test_frozen_path_answers_503_within_seconds_not_a_hang(
    gateway: Gateway, proxy: FreezableProxy, business: str
) -> None:
    async with client() as session:
        await answers_when_back(session, gateway, business)

        # The pool's idle connections stay open and answer nothing, and so does every new one. All at once, as
        # a busy gateway gets them: more requests than the pool has connections.
        proxy.freeze()
        frozen_calls = calls(business)
        answers = await asyncio.gather(*(call(session, gateway.url, c) for c in frozen_calls))
        for c, answer in zip(frozen_calls, answers, strict=True):
            assert_unavailable(c, answer)
        assert "cdc_database_up 0.0" in await scrape(session, gateway)

        proxy.restore()
        await answers_when_back(session, gateway, business)


@pytest.mark.parametrize("failure", ["cut", "freeze"])
async def test_open_stream_survives_the_outage_and_gets_what_was_committed_meanwhile(
    db_url: str, gateway: Gateway, proxy: FreezableProxy, business: str, failure: str
) -> None:
    token = token_for(business)
    async with open_stream(gateway.url, business, token) as stream:
        [before] = append_events(db_url, (business, "invalidate"))
        first = await stream.next_event(timeout=10)
        assert first is not None and first.id == str(before)

        proxy.cut() if failure == "cut" else proxy.freeze()
        pings = len(stream.comments)
        # Written straight to PostgreSQL, not through the proxy: committed while the gateway cannot see it.
        [during] = append_events(db_url, (business, "invalidate"))
        # The hub notices: at once when the connection closes, at its next probe's timeout when it froze.
        hub = gateway.app_state.hub
        await wait_for(lambda: not hub.listening.is_set(), timeout=15)
        await asyncio.sleep(1.5)  # an outage of a few heartbeats (every 0.5 s here)
        # A new stream that needs no replay opens during the outage too: it will get what comes once it is over.
        async with open_stream(gateway.url, business, token) as opened:
            assert opened.response.status == 200
        proxy.restore()
        [after] = append_events(db_url, (business, "invalidate"))

        # The same stream, never closed: heartbeats through the outage, then both events in order.
        got = await stream.events(2, timeout=20)
        assert [event.id for event in got] == [str(during), str(after)]
        assert stream.comments[pings:].count("ping") >= 2

    # A client that reconnects with the last id it got resumes after it. After a freeze, the pool's idle
    # connection is still frozen: the first request on it gets a 503 after its timeout, as a client would
    # retry it.
    deadline = time.monotonic() + 15
    while True:
        async with open_stream(gateway.url, business, token, last_event_id=during) as resumed:
            if resumed.response.status == 200 or time.monotonic() > deadline:
                event = await resumed.next_event(timeout=10)
                break
        await asyncio.sleep(0.2)
    assert event is not None and event.id == str(after)


@pytest.mark.parametrize("failure", ["cut", "freeze"])
async def test_a_connection_lost_under_a_request_is_unavailable_and_replaced(
    db_url: str, proxy: FreezableProxy, failure: str
) -> None:
    """The connection dies while a statement runs on it: DatabaseUnavailable (a 503), never asyncpg's
    InterfaceError of a connection the pool already took back (a 500); the next borrow gets a fresh one."""
    pool = await create_pool(through(db_url, proxy.port))
    try:
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable):
            async with borrow(pool) as conn:
                running = asyncio.ensure_future(conn.fetchval("select pg_sleep(3)"))
                await asyncio.sleep(0.3)
                proxy.cut() if failure == "cut" else proxy.freeze()
                await running
        assert time.monotonic() - started < ANSWER_WITHIN
        proxy.restore()
        async with borrow(pool) as conn:
            assert await conn.fetchval("select 1") == 1
    finally:
        pool.terminate()


async def test_a_path_that_freezes_during_the_figures_read_delays_events_by_its_timeout_only(
    db_url: str, gateway: Gateway, proxy: FreezableProxy, business: str
) -> None:
    """The hub reads the figures it pushes with a batch on its LISTEN connection (gateway/pushed_figures.py). The
    path freezes while that read runs: the batch goes out without figures once the read's timeout passes, the
    hub then replaces its connection (the read's cancellation never arrives), and events flow, with figures,
    once the path is back."""
    hub = gateway.app_state.hub
    async with open_stream(gateway.url, business, token_for(business)) as stream:
        with psycopg.connect(db_url) as locker, locker.transaction():
            # Straight to PostgreSQL: the figures read waits for this lock, so it is in flight when the path dies.
            locker.execute("lock table businesses in access exclusive mode")
            [during] = append_events(db_url, (business, "invalidate"))

            def read_waits_for_the_lock() -> bool:
                with psycopg.connect(db_url, autocommit=True) as conn:
                    row = conn.execute(
                        "select count(*) from pg_stat_activity where application_name like 'cdc-dashboard gateway%'"
                        " and wait_event_type = 'Lock'"
                    ).fetchone()
                return row is not None and row[0] == 1

            await wait_for(read_waits_for_the_lock, timeout=10)
            proxy.freeze()
            started = time.monotonic()
            event = await stream.next_event(timeout=10)
            waited = time.monotonic() - started
        assert event is not None and event.id == str(during)
        assert "figures" not in event.json()
        assert waited < READ_TIMEOUT_SECONDS + 1.5, waited
        await wait_for(lambda: not hub.listening.is_set(), timeout=15)
        proxy.restore()
        [after] = append_events(db_url, (business, "invalidate"))
        event = await stream.next_event(timeout=20)
        assert event is not None and event.id == str(after)
        assert event.json()["figures"]["dashboard-stats"]["business_id"] == business
    assert hub.reconnects >= 1
