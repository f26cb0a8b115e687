"""Live events carry the `dashboard-stats` figures (gateway/pushed_figures.py), against a real uvicorn and
PostgreSQL: equal to `GET /stats`, on each business's last event of a batch only, one read per batch, never on
replays, never older than the event, and a failed read costs the figures, not the events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import jsonschema_rs
import psycopg
import pytest

from cdc_dashboard.gateway.openapi import document

from ..listening import wait_for
from .gateway_support import Gateway, SSEEvent, SSEStream, append_events, open_stream, run_gateway, token_for
from .test_figures_http import pay


def _businesses(db_url: str, count: int) -> list[str]:
    ids = [str(uuid.uuid4()) for _ in range(count)]
    with psycopg.connect(db_url, autocommit=True) as conn:
        for n, b in enumerate(ids):
            conn.execute("insert into businesses (id, name) values (%s, %s)", (b, f"Shop {n}"))
    return ids


def _consume_one_batch(db_url: str, payments: list[tuple[str, int]]) -> None:
    """Commit the payments, then turn them into events (one per payment, as the listener's batch does with a
    batch size of one) in ONE transaction: its events become visible together, so the hub reads them in one
    catch-up batch."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        for business, amount in payments:
            pay(conn, business, None, amount)
    with psycopg.connect(db_url) as conn, conn.transaction():
        for _ in payments:
            row = conn.execute("select consumed from dashboard.consume_changes_v2(1, 'live', 0)").fetchone()
            assert row is not None and row[0] == 1


async def _stats(gw: Gateway, business: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token_for(business)}"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{gw.url}/v1/businesses/{business}/stats", headers=headers) as r,
    ):
        assert r.status == 200
        body: dict[str, Any] = await r.json()
        return body


async def _metric(gw: Gateway, name: str, suffix: str = "_total") -> float:
    async with aiohttp.ClientSession() as session, session.get(f"{gw.url}/metrics") as r:
        text = await r.text()
    match = re.search(rf"^{name}{suffix} (\S+)$", text, re.MULTILINE)
    assert match is not None, f"{name} is not in /metrics"
    return float(match.group(1))


def _figures(event: SSEEvent) -> dict[str, Any] | None:
    data = event.json()
    if "figures" not in data:
        return None
    assert list(data["figures"]) == ["dashboard-stats"]
    figures: dict[str, Any] = data["figures"]["dashboard-stats"]
    return figures


def _stored_payload(db_url: str, event_id: int) -> Any:
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute("select payload::text from dashboard.events where id = %s", (event_id,)).fetchone()
    assert row is not None
    return json.loads(row[0])


@contextlib.asynccontextmanager
async def _streams(gw: Gateway, *businesses: str) -> AsyncIterator[list[SSEStream]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(open_stream(gw.url, b, token_for(b))) for b in businesses]


async def test_a_payment_event_carries_the_figures_get_stats_returns(db_url: str) -> None:
    [b] = _businesses(db_url, 1)
    async with run_gateway(db_url) as gw, open_stream(gw.url, b, token_for(b)) as stream:
        before = await _stats(gw, b)
        _consume_one_batch(db_url, [(b, 150_000)])
        event = await stream.next_event()
        assert event is not None and event.event == "invalidate"
        after = await _stats(gw, b)
    figures = _figures(event)
    assert figures is not None
    # Key for key (and in the same order) the body GET /stats returns: nothing happened in between.
    assert list(figures.items()) == list(after.items())
    assert figures["as_of_event_id"] >= int(event.id or 0)
    assert figures["business_id"] == b
    assert before["payments_count"] == 0
    assert figures["payments_count"] == 1
    assert figures["revenue"]["KES"]["total_minor"] == 150_000
    assert figures["revenue"]["KES"]["today_minor"] == 150_000
    # The event matches the OpenAPI document's event schema (Stats included), and the rest of it is the stored
    # payload, unchanged.
    doc = document()
    event_schema = doc["components"]["schemas"]["StreamEvent"]["properties"]["data"]["contentSchema"]
    validator = jsonschema_rs.validator_for({"components": doc["components"], **event_schema})
    assert validator.is_valid(event.json()), list(validator.iter_errors(event.json()))
    assert not validator.is_valid({**event.json(), "figures": {"dashboard-stats": {"business_id": b}}})
    data = event.json()
    del data["figures"]
    assert data == _stored_payload(db_url, int(event.id or 0))


async def test_only_the_last_event_of_each_business_in_a_batch_carries_figures(db_url: str) -> None:
    b1, b2 = _businesses(db_url, 2)
    async with run_gateway(db_url) as gw, _streams(gw, b1, b2) as (s1, s2):
        _consume_one_batch(db_url, [(b1, 100), (b2, 7), (b1, 200), (b1, 300), (b2, 8)])
        got1, got2 = await s1.events(3), await s2.events(2)
    assert [_figures(e) is not None for e in got1] == [False, False, True]
    assert [_figures(e) is not None for e in got2] == [False, True]
    last1, last2 = _figures(got1[-1]), _figures(got2[-1])
    assert last1 is not None and last2 is not None
    assert (last1["payments_count"], last1["revenue"]["KES"]["total_minor"]) == (3, 600)
    assert (last2["payments_count"], last2["revenue"]["KES"]["total_minor"]) == (2, 15)
    # One read for the batch: both businesses' figures are as of the same event, at least the batch's last.
    assert last1["as_of_event_id"] == last2["as_of_event_id"] >= max(int(e.id or 0) for e in got1 + got2)


async def test_one_figures_read_per_batch_whatever_the_streams_and_businesses(db_url: str) -> None:
    b1, b2, unwatched = _businesses(db_url, 3)
    async with run_gateway(db_url) as gw:
        # Events of a business with no stream here: no read at all.
        reads = await _metric(gw, "cdc_gateway_figures_reads")
        ids = append_events(db_url, (unwatched, "invalidate"), (unwatched, "invalidate"))
        await wait_for(lambda: gw.app_state.hub.position >= ids[-1], timeout=5)
        assert await _metric(gw, "cdc_gateway_figures_reads") == reads

        async with _streams(gw, b1, b1, b2) as streams:
            reads = await _metric(gw, "cdc_gateway_figures_reads")
            pushed = await _metric(gw, "cdc_gateway_figures_pushed")
            _consume_one_batch(db_url, [(b1, 100), (b2, 5), (unwatched, 9), (b1, 200), (b2, 6), (unwatched, 10)])
            got = [await stream.events(2) for stream in streams]
            assert all(_figures(events[-1]) is not None for events in got)
            # The two streams of b1 got the same figures (one read, one frame).
            assert got[0][-1].data == got[1][-1].data
            assert await _metric(gw, "cdc_gateway_figures_reads") == reads + 1
            assert await _metric(gw, "cdc_gateway_figures_read_seconds", "_count") == reads + 1
            # Two events carried figures (b1's and b2's last), counted once each, not per stream.
            assert await _metric(gw, "cdc_gateway_figures_pushed") == pushed + 2

            # A second batch: one more read.
            _consume_one_batch(db_url, [(b1, 300), (b2, 7)])
            second = [await stream.events(1) for stream in streams]
            assert all(_figures(events[0]) is not None for events in second)
            assert await _metric(gw, "cdc_gateway_figures_reads") == reads + 2


# The replay comes from the hub's memory, or from the database when memory does not reach back.
@pytest.mark.parametrize("memory", [10_000, 0], ids=["memory", "database"])
async def test_replayed_events_carry_no_figures_and_live_ones_do(db_url: str, memory: int) -> None:
    [b] = _businesses(db_url, 1)
    async with run_gateway(db_url, sse_replay_memory_events=memory) as gw:
        async with open_stream(gw.url, b, token_for(b)) as stream:
            live = []
            for amount in (100, 200, 300):
                _consume_one_batch(db_url, [(b, amount)])
                live += await stream.events(1)
        assert all(_figures(e) is not None for e in live)
        first = int(live[0].id or 0)
        async with open_stream(gw.url, b, token_for(b), last_event_id=first) as stream:
            replayed = await stream.events(2)
            assert [e.id for e in replayed] == [e.id for e in live[1:]]
            assert all(_figures(e) is None for e in replayed)
            # Each replayed event is exactly its stored payload.
            assert [e.json() for e in replayed] == [_stored_payload(db_url, int(e.id or 0)) for e in replayed]
            _consume_one_batch(db_url, [(b, 400)])
            event = await stream.next_event()
            assert event is not None
            figures = _figures(event)
            assert figures is not None and figures["payments_count"] == 4


async def test_an_event_newer_than_the_figures_carries_none(db_url: str) -> None:
    """A refresh event whose id is above `listener_state.last_event_id` (as if appended by a path that does not
    move it): figures read now would not include it, so none are sent (guarantee 2). An ordinary manual refresh
    moves last_event_id with its event, and its event carries the repaired figures."""
    [b] = _businesses(db_url, 1)
    _consume_one_batch(db_url, [(b, 500)])
    async with run_gateway(db_url, refresh_cooldown_seconds=0) as gw, open_stream(gw.url, b, token_for(b)) as stream:
        withheld = await _metric(gw, "cdc_gateway_figures_withheld")
        with psycopg.connect(db_url) as conn, conn.transaction():
            row = conn.execute("select last_event_id from dashboard.listener_state").fetchone()
            assert row is not None
            conn.execute("select dashboard.append_refresh_events_v1(array[%s])", (b,))
            conn.execute("update dashboard.listener_state set last_event_id = %s", (row[0],))
        event = await stream.next_event()
        assert event is not None and event.json()["reason"] == "manual_refresh"
        assert int(event.id or 0) > row[0]
        assert _figures(event) is None
        assert await _metric(gw, "cdc_gateway_figures_withheld") == withheld + 1

        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{gw.url}/v1/businesses/{b}/refresh", headers={"Authorization": f"Bearer {token_for(b)}"}
            ) as r,
        ):
            assert r.status == 200
            refresh = await r.json()
        event = await stream.next_event()
        assert event is not None and int(event.id or 0) == refresh["event_id"]
        figures = _figures(event)
        assert figures is not None and figures["as_of_event_id"] >= refresh["event_id"]
        assert figures["revenue"]["KES"]["total_minor"] == 500


@contextlib.contextmanager
def _businesses_locked(db_url: str) -> Iterator[None]:
    """Hold a lock that every figures read waits for (the stats query reads `businesses`)."""
    with psycopg.connect(db_url) as conn, conn.transaction():
        conn.execute("lock table businesses in access exclusive mode")
        yield


async def test_a_failed_figures_read_delivers_the_events_without_figures(db_url: str) -> None:
    from cdc_dashboard.gateway.pushed_figures import READ_TIMEOUT_SECONDS

    b, other = _businesses(db_url, 2)
    async with run_gateway(db_url) as gw, _streams(gw, b, other) as (stream, other_stream):
        failures = await _metric(gw, "cdc_gateway_figures_read_failures")
        with _businesses_locked(db_url):
            started = time.monotonic()
            # (append_events_v1 does not read `businesses`; the listener's batch would wait for the lock)
            ids = append_events(db_url, (b, "invalidate"), (other, "invalidate"), (b, "invalidate"))
            got = await stream.events(2, timeout=READ_TIMEOUT_SECONDS + 3)
            got_other = await other_stream.events(1, timeout=READ_TIMEOUT_SECONDS + 3)
            waited = time.monotonic() - started
            # The lock is still held: the events did not wait for it, only for the read's timeout.
        assert [int(e.id or 0) for e in got] == [ids[0], ids[2]]
        assert [int(e.id or 0) for e in got_other] == [ids[1]]
        assert all(_figures(e) is None for e in got + got_other)
        assert waited < READ_TIMEOUT_SECONDS + 1.5, waited
        assert await _metric(gw, "cdc_gateway_figures_read_failures") == failures + 1
        # Once the lock is gone the next batch carries figures again, on the same LISTEN connection.
        _consume_one_batch(db_url, [(b, 250)])
        event = await stream.next_event()
        assert event is not None
        figures = _figures(event)
        assert figures is not None and figures["revenue"]["KES"]["total_minor"] == 250
        assert gw.app_state.hub.reconnects == 0


async def test_an_event_committed_during_a_figures_read_is_delivered_at_once(db_url: str) -> None:
    """Its NOTIFY arrives while the hub is busy with the batch before it: the hub must read again at once,
    not wait for its quiet-time probe (5 s)."""
    b = _businesses(db_url, 1)[0]
    async with run_gateway(db_url) as gw, _streams(gw, b) as (stream,):
        with _businesses_locked(db_url):
            first = append_events(db_url, (b, "invalidate"))
            # The hub has read `first` and now waits in its figures read, held by the lock.
            await asyncio.sleep(0.3)
            second = append_events(db_url, (b, "invalidate"))
            await asyncio.sleep(0.2)
        appended = time.monotonic()
        got = await stream.events(2, timeout=4.5)
        waited = time.monotonic() - appended
    assert [int(e.id or 0) for e in got] == first + second
    assert waited < 2.0, waited
