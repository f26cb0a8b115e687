"""The event stream against a real uvicorn and PostgreSQL: delivery, resume, resync, expiry, limits, cuts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import uuid
from typing import Any

import aiohttp
import psycopg
import pytest

from cdc_dashboard.gateway import streams
from cdc_dashboard.gateway.hub import HubEvent, Subscriber

from .gateway_support import append_events, open_stream, run_gateway, token_for


def _new_business() -> str:
    return str(uuid.uuid4())


async def test_delivers_the_business_events_with_sse_headers(db_url: str) -> None:
    b, other = _new_business(), _new_business()
    async with run_gateway(db_url) as gw, open_stream(gw.url, b, token_for(b)) as stream:
        assert stream.response.status == 200
        assert stream.response.headers["Content-Type"].startswith("text/event-stream")
        assert stream.response.headers["Cache-Control"] == "no-cache, no-transform"
        assert stream.response.headers["X-Accel-Buffering"] == "no"
        [other_id] = append_events(db_url, (other, "invalidate"))
        [mine] = append_events(db_url, (b, "invalidate"))
        event = await stream.next_event()
        assert event is not None
        assert stream.retries == [2000]
        # The other business's event (committed first) never reaches this stream.
        assert (event.id, event.event) == (str(mine), "invalidate")
        assert event.json()["business_id"] == b
        assert other_id < mine


async def test_upper_case_business_id_is_refused_naming_the_canonical_one(db_url: str) -> None:
    """Events carry the canonical id, so a client keying its caches by another spelling would never see them
    invalidated: a 400 says so at once (docs/API.md, "Business ids"; other spellings: test_gateway_inputs.py)."""
    b = _new_business()
    async with run_gateway(db_url) as gw, open_stream(gw.url, b.upper(), token_for(b)) as stream:
        assert stream.response.status == 400
        assert b in (await stream.response.json())["error"]


async def test_event_for_every_business_reaches_all_streams(db_url: str) -> None:
    b1, b2 = _new_business(), _new_business()
    async with (
        run_gateway(db_url) as gw,
        open_stream(gw.url, b1, token_for(b1)) as s1,
        open_stream(gw.url, b2, token_for(b2)) as s2,
    ):
        [resync] = append_events(db_url, (None, "resync"))
        for stream in (s1, s2):
            event = await stream.next_event()
            assert event is not None and (event.id, event.event) == (str(resync), "resync")


async def test_change_committed_right_after_headers_is_delivered(db_url: str) -> None:
    """The stream is ready when its response starts: no "subscribed but not yet listening" window."""
    b = _new_business()
    async with run_gateway(db_url) as gw:
        for _ in range(5):
            async with open_stream(gw.url, b, token_for(b)) as stream:
                # aiohttp returns the response once the headers arrived; commit at once.
                [event_id] = append_events(db_url, (b, "invalidate"))
                event = await stream.next_event(timeout=3)
                assert event is not None and event.id == str(event_id)


# Resuming streams replay from the hub's memory of the latest events, or from the database when memory does
# not reach back far enough: both paths must give the same stream.
REPLAY_SOURCES = pytest.mark.parametrize("memory", [10_000, 0, 3], ids=["memory", "database", "memory-evicted"])


@REPLAY_SOURCES
async def test_resume_replays_then_continues_live_without_gap_or_duplicate(db_url: str, memory: int) -> None:
    b, other = _new_business(), _new_business()
    before = append_events(db_url, *[(b, "invalidate"), (other, "invalidate")] * 5)
    mine_before = before[0::2]
    resume_from = mine_before[1]
    async with run_gateway(db_url, sse_replay_memory_events=memory) as gw:
        # Events keep arriving while the stream replays: the seam must neither drop nor repeat any.
        async def writer() -> list[int]:
            ids: list[int] = []
            for _ in range(10):
                ids += append_events(db_url, (b, "invalidate"))
                await asyncio.sleep(0.01)
            return ids

        async with open_stream(gw.url, b, token_for(b), last_event_id=resume_from) as stream:
            written = await writer()
            expected = [i for i in mine_before if i > resume_from] + written
            got = await stream.events(len(expected))
            assert [int(e.id or 0) for e in got] == expected
            assert all(e.event == "invalidate" for e in got)

        # A reconnect with the last id seen, here by query parameter as EventSource-less clients may do.
        last = expected[-1]
        later = append_events(db_url, (b, "invalidate"), (b, "invalidate"))
        async with open_stream(gw.url, b, token_for(b), query=f"?last_event_id={last}") as stream:
            got = await stream.events(2)
            assert [int(e.id or 0) for e in got] == later
            more = append_events(db_url, (b, "invalidate"))
            event = await stream.next_event()
            assert event is not None and [int(event.id or 0)] == more


@REPLAY_SOURCES
async def test_last_event_id_past_retention_gets_resync_first(db_url: str, memory: int) -> None:
    b = _new_business()
    old = append_events(db_url, *[(b, "invalidate")] * 4)
    with psycopg.connect(db_url, autocommit=True) as conn:
        # What the listener's pruning does: delete old events and raise the horizon.
        conn.execute("delete from dashboard.events where id <= %s", (old[2],))
        conn.execute("update dashboard.listener_state set pruned_through = %s", (old[2],))
    async with run_gateway(db_url, sse_replay_memory_events=memory) as gw:
        async with open_stream(gw.url, b, token_for(b), last_event_id=old[0]) as stream:
            first = await stream.next_event()
            assert first is not None and first.event == "resync"
            assert first.id is not None and int(first.id) >= old[0]
            [live] = append_events(db_url, (b, "invalidate"))
            event = await stream.next_event()
            # After a resync the client refetches everything; the stream continues from the present.
            assert event is not None and (event.id, event.event) == (str(live), "invalidate")
        # At the horizon itself nothing is missing: a plain replay.
        async with open_stream(gw.url, b, token_for(b), last_event_id=old[2]) as stream:
            got = await stream.events(2)
            assert [(e.event, int(e.id or 0)) for e in got] == [("invalidate", old[3]), ("invalidate", live)]


@REPLAY_SOURCES
async def test_last_event_id_from_the_future_gets_resync(db_url: str, memory: int) -> None:
    """An id this database never gave (e.g. it was recreated) must not silence the stream."""
    b = _new_business()
    async with (
        run_gateway(db_url, sse_replay_memory_events=memory) as gw,
        open_stream(gw.url, b, token_for(b), last_event_id=10_000) as stream,
    ):
        first = await stream.next_event()
        assert first is not None and first.event == "resync"
        [live] = append_events(db_url, (b, "invalidate"))
        event = await stream.next_event()
        assert event is not None and event.id == str(live)


async def test_resume_within_memory_needs_no_database_row(db_url: str) -> None:
    """Events the gateway still holds in memory are replayed even once pruned from the table."""
    b = _new_business()
    async with run_gateway(db_url) as gw:
        ids = append_events(db_url, *[(b, "invalidate")] * 3)
        # Wait until this gateway has dispatched them (a stream sees the last one, and the hub is past it: the
        # stream may have read it from the table while the hub was still reading the batch's figures).
        async with open_stream(gw.url, b, token_for(b), last_event_id=ids[1]) as stream:
            event = await stream.next_event()
            assert event is not None and event.id == str(ids[2])
        for _ in range(500):  # up to 5 s; a hub that never gets there fails below, with a resync
            if gw.app_state.hub.position >= ids[2]:
                break
            await asyncio.sleep(0.01)
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("delete from dashboard.events where id <= %s", (ids[2],))
            conn.execute("update dashboard.listener_state set pruned_through = %s", (ids[2],))
        async with open_stream(gw.url, b, token_for(b), last_event_id=ids[0]) as stream:
            got = await stream.events(2)
            assert [(e.event, int(e.id or 0)) for e in got] == [("invalidate", ids[1]), ("invalidate", ids[2])]
        assert "cdc_gateway_resyncs_sent_total 0.0" in await _metrics(gw.url)


async def _metrics(base_url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"{base_url}/metrics") as response:
        return await response.text()


async def test_bad_last_event_id_is_400(db_url: str) -> None:
    b = _new_business()
    async with run_gateway(db_url) as gw, open_stream(gw.url, b, token_for(b), query="?last_event_id=abc") as stream:
        assert stream.response.status == 400
        assert "Last-Event-ID" in (await stream.response.json())["error"]


async def test_heartbeat_comment_every_ping_interval(db_url: str) -> None:
    b = _new_business()
    async with run_gateway(db_url, sse_ping_seconds=0.2) as gw, open_stream(gw.url, b, token_for(b)) as stream:
        with contextlib.suppress(TimeoutError):
            await stream.next_event(timeout=1.0)
        assert stream.comments.count("ping") >= 3


async def test_stream_ends_when_the_token_expires(db_url: str) -> None:
    b = _new_business()
    async with run_gateway(db_url) as gw, open_stream(gw.url, b, token_for(b, ttl=2)) as stream:
        loop = asyncio.get_running_loop()
        started = loop.time()
        [event_id] = append_events(db_url, (b, "invalidate"))
        events = await stream.until_closed(timeout=5)
        assert [e.id for e in events] == [str(event_id)]
        assert 0.5 <= loop.time() - started <= 4.0
        assert "token expired" in stream.comments


async def test_connection_limit_answers_503_with_retry_after(db_url: str) -> None:
    b = _new_business()
    async with (
        run_gateway(db_url, max_connections=2) as gw,
        open_stream(gw.url, b, token_for(b)) as s1,
    ):
        async with open_stream(gw.url, b, token_for(b)) as s2:
            assert (s1.response.status, s2.response.status) == (200, 200)
            async with open_stream(gw.url, b, token_for(b)) as s3:
                assert s3.response.status == 503
                assert int(s3.response.headers["Retry-After"]) >= 1
                assert (await s3.response.json())["error"] == "too many connections"
        # A closed stream frees its place.
        for _ in range(50):
            async with open_stream(gw.url, b, token_for(b)) as s4:
                if s4.response.status == 200:
                    break
            await asyncio.sleep(0.05)
        assert s4.response.status == 200


async def _open_stream_socket(gateway_url: str, business: str) -> socket.socket:
    """A raw stream connection with a small receive buffer, past its 200 response head: a client the test can
    make stop reading."""
    port = int(gateway_url.rsplit(":", 1)[1])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    headers = f"Host: x\r\nAuthorization: Bearer {token_for(business)}\r\n"
    request = f"GET /v1/businesses/{business}/events HTTP/1.1\r\n{headers}\r\n"
    await loop.sock_sendall(sock, request.encode())
    head = await asyncio.wait_for(loop.sock_recv(sock, 256), 5)
    assert head.startswith(b"HTTP/1.1 200")
    return sock


async def test_client_that_stops_reading_is_cut(db_url: str) -> None:
    """A client that stops reading is disconnected once its bounded buffer fills; others are unaffected."""
    b = _new_business()
    async with run_gateway(db_url, sse_queue_size=8) as gw, open_stream(gw.url, b, token_for(b)) as reader:
        loop = asyncio.get_running_loop()
        sock = await _open_stream_socket(gw.url, b)
        reading = asyncio.create_task(reader.events(1000, timeout=10))
        # Now stop reading. Big events fill the socket buffers, then the transport, then the stream's buffer.
        big = "x" * 8000
        with psycopg.connect(db_url, autocommit=True) as conn:
            for _ in range(10):
                conn.execute(
                    "select dashboard.append_events_v1(array_fill(%s::text, array[100]), "
                    "array_fill('invalidate'::text, array[100]), array_fill(%s::jsonb, array[100]))",
                    (b, json.dumps({"business_id": b, "pad": big})),
                )
        dropped = 0.0
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                async with session.get(f"{gw.url}/metrics") as response:
                    text = await response.text()
                dropped = next(
                    float(line.split()[1])
                    for line in text.splitlines()
                    if line.startswith("cdc_gateway_slow_clients_dropped_total")
                )
                if dropped >= 1:
                    break
                await asyncio.sleep(0.05)
        assert dropped == 1
        # The cut connection reaches end of file once the client drains what was already sent.
        total = 0
        async with asyncio.timeout(10):
            while chunk := await loop.sock_recv(sock, 65536):
                total += len(chunk)
        sock.close()
        assert total < 1000 * 8000
        # The reader that kept reading got everything.
        got = await reading
        assert len(got) == 1000


async def test_gateway_reconnects_its_listen_connection_and_loses_nothing(db_url: str) -> None:
    b = _new_business()
    async with run_gateway(db_url) as gw, open_stream(gw.url, b, token_for(b)) as stream:
        with psycopg.connect(db_url, autocommit=True) as conn:
            killed = conn.execute(
                "select count(pg_terminate_backend(pid)) from pg_stat_activity "
                "where datname = current_database() and application_name like 'cdc-dashboard gateway%%'"
            ).fetchone()
        assert killed is not None and killed[0] == 1
        # Appended while the gateway's LISTEN connection is down: caught up after the reconnect.
        ids = append_events(db_url, (b, "invalidate"), (b, "invalidate"))
        got = await stream.events(2, timeout=10)
        assert [int(e.id or 0) for e in got] == ids
        assert gw.app_state.hub.reconnects >= 1


async def test_client_whose_send_stays_blocked_is_cut_without_more_events(db_url: str) -> None:
    """A client that stops reading while few events come never fills its buffer: the blocked send is what
    gives it away, and the hub cuts it after CDC_SSE_SEND_TIMEOUT_SECONDS."""
    b = _new_business()
    async with run_gateway(db_url, sse_queue_size=10_000, sse_send_timeout_seconds=0.5) as gw:
        loop = asyncio.get_running_loop()
        sock = await _open_stream_socket(gw.url, b)
        # One burst, then nothing: far more than the socket buffers hold, far less than the stream's buffer.
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(
                "select dashboard.append_events_v1(array_fill(%s::text, array[1000]), "
                "array_fill('invalidate'::text, array[1000]), array_fill(%s::jsonb, array[1000]))",
                (b, json.dumps({"business_id": b, "pad": "x" * 8000})),
            )
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                async with session.get(f"{gw.url}/metrics") as response:
                    text = await response.text()
                if "cdc_gateway_slow_clients_dropped_total 1.0" in text and "cdc_gateway_open_streams 0.0" in text:
                    break
                await asyncio.sleep(0.1)
        assert "cdc_gateway_slow_clients_dropped_total 1.0" in text
        assert "cdc_gateway_open_streams 0.0" in text
        total = 0
        async with asyncio.timeout(10):
            while chunk := await loop.sock_recv(sock, 65536):
                total += len(chunk)
        sock.close()
        assert total < 1000 * 8000


async def test_head_answers_the_stream_headers_without_a_body(db_url: str) -> None:
    b = _new_business()
    async with run_gateway(db_url) as gw, aiohttp.ClientSession() as session:
        url = f"{gw.url}/v1/businesses/{b}/events"
        async with asyncio.timeout(5), session.head(url, headers={"Authorization": f"Bearer {token_for(b)}"}) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/event-stream")
            assert r.headers["Cache-Control"] == "no-cache, no-transform"
        # The HEAD request held no place in the hub.
        assert gw.app_state.hub.subscriber_count == 0


# -- the hub's direct writes to idle streams (Subscriber.write_now) ---------------------------------------


class _Spy:
    """Counts what the hub writes straight to idle streams, and the direct writes that had to suspend."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.written: list[tuple[int, bool]] = []
        self.suspended = 0
        write_now, finish_write = Subscriber.write_now, Subscriber._finish_write

        def spy_write_now(sub: Subscriber, event: HubEvent) -> bool:
            result = write_now(sub, event)
            self.written.append((event.id, result))
            return result

        async def spy_finish_write(sub: Subscriber, rest: Any) -> None:
            self.suspended += 1
            await finish_write(sub, rest)

        monkeypatch.setattr(Subscriber, "write_now", spy_write_now)
        monkeypatch.setattr(Subscriber, "_finish_write", spy_finish_write)


# A complete event frame as the gateway writes it. Chunked framing never falls inside one (a response's chunks
# hold whole frames), so a frame cut short by the end of the connection does not match.
_FRAME = re.compile(rb"id: (\d+)\nevent: [^\n]*\ndata: [^\n]*\n\n")


async def _read_event_ids(sock: socket.socket, *, until: int | None = None) -> list[int]:
    """The ids of the complete events a raw stream connection receives, until `until` is among them or, without
    it, until the connection ends."""
    loop = asyncio.get_running_loop()
    ids: list[int] = []
    pending = b""
    while until is None or until not in ids:
        chunk = await loop.sock_recv(sock, 65536)
        if not chunk:
            assert until is None, "the stream ended"
            break
        pending += chunk
        end = 0
        for frame in _FRAME.finditer(pending):
            ids.append(int(frame[1]))
            end = frame.end()
        pending = pending[end:]
    return ids


def _append_one_by_one(db_url: str, business: str, count: int, pad: int) -> list[int]:
    """`count` events of about `pad` bytes, each in its own transaction: each is a broadcast of its own."""
    ids: list[int] = []
    with psycopg.connect(db_url, autocommit=True) as conn:
        for _ in range(count):
            row = conn.execute(
                "select dashboard.append_events_v1(array[%s], array['invalidate'], array[%s::jsonb])",
                (business, json.dumps({"business_id": business, "pad": "x" * pad})),
            ).fetchone()
            assert row is not None
            ids += row[0]
    return ids


async def _metric(base_url: str, name: str) -> float:
    text = await _metrics(base_url)
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " "))


async def test_an_event_both_replayed_and_dispatched_to_the_idle_stream_is_sent_once(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replay's overlap with live events is dropped by id on the direct path too: an event committed
    between the subscription and the replay's read is in the replay, and the hub dispatches it once the
    stream waits live (here: it is appended without its NOTIFY, so the hub reads it with the next one)."""
    b = _new_business()
    [resume_from] = append_events(db_url, (b, "invalidate"))
    injected: list[int] = []
    read_page = streams._replay_page

    async def page_after_a_quiet_commit(request: Any, business_id: str, after: int) -> Any:
        if not injected:
            with psycopg.connect(db_url, autocommit=True) as conn:
                row = conn.execute(
                    "insert into dashboard.events (id, business_id, kind, payload) "
                    "values (nextval('dashboard.event_id_seq'), %s, 'invalidate', %s) returning id",
                    (b, json.dumps({"business_id": b, "query_keys": []})),
                ).fetchone()
                assert row is not None
                conn.execute("update dashboard.listener_state set last_event_id = %s", (row[0],))
                injected.append(row[0])
        return await read_page(request, business_id, after)

    monkeypatch.setattr(streams, "_replay_page", page_after_a_quiet_commit)
    spy = _Spy(monkeypatch)
    async with (
        run_gateway(db_url, sse_replay_memory_events=0) as gw,
        open_stream(gw.url, b, token_for(b), last_event_id=resume_from) as stream,
    ):
        replayed = await stream.next_event()
        assert replayed is not None and [int(replayed.id or 0)] == injected
        assert gw.app_state.hub.position < injected[0]  # not dispatched yet
        await asyncio.sleep(0.2)  # the stream now waits live, with nothing buffered
        later = append_events(db_url, (b, "invalidate"))
        event = await stream.next_event()
        assert event is not None and [int(event.id or 0)] == later
        # The hub offered the replayed event to the idle stream, which dropped it, and wrote the next one.
        assert spy.written == [(injected[0], False), (later[0], True)]
        with pytest.raises(TimeoutError):
            await stream.next_event(timeout=0.5)


async def test_a_burst_to_a_paused_stream_is_buffered_and_delivered_in_order(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Events broadcast one by one to a client that is not reading: the first go straight to the connection
    until its transport pauses; that write finishes later, the rest wait in the stream's buffer. Once the
    client reads again it gets every event, once, in order, and is never cut."""
    b = _new_business()
    spy = _Spy(monkeypatch)
    async with run_gateway(db_url, sse_queue_size=10_000) as gw:
        with await _open_stream_socket(gw.url, b) as sock:
            await asyncio.sleep(0.2)  # live, waiting: the first events are written directly
            ids = await asyncio.to_thread(_append_one_by_one, db_url, b, 150, 50_000)
            for _ in range(200):
                if gw.app_state.hub.position >= ids[-1]:
                    break
                await asyncio.sleep(0.05)
            assert spy.suspended >= 1
            assert any(written for _, written in spy.written)
            async with asyncio.timeout(10):
                got = await _read_event_ids(sock, until=ids[-1])
        assert got == ids
        assert await _metric(gw.url, "cdc_gateway_slow_clients_dropped_total") == 0
        assert await _metric(gw.url, "cdc_gateway_events_sent_total") == len(ids)


@pytest.mark.parametrize("cut_by", ["buffer", "send_timeout"])
async def test_a_client_that_stops_reading_during_broadcasts_is_cut_and_loses_nothing_on_resume(
    db_url: str, monkeypatch: pytest.MonkeyPatch, cut_by: str
) -> None:
    """Cut with a direct write under way (and events buffered behind it): what the client received is a
    prefix of the events, and resuming from its last id gives the rest, without a gap or a repeat."""
    b = _new_business()
    spy = _Spy(monkeypatch)
    limits = {"sse_queue_size": 8} if cut_by == "buffer" else {"sse_queue_size": 10_000, "sse_send_timeout_seconds": 1}
    async with run_gateway(db_url, **limits) as gw:
        with await _open_stream_socket(gw.url, b) as sock:
            await asyncio.sleep(0.2)
            ids = await asyncio.to_thread(_append_one_by_one, db_url, b, 150, 50_000)
            for _ in range(200):
                if await _metric(gw.url, "cdc_gateway_slow_clients_dropped_total") >= 1:
                    break
                await asyncio.sleep(0.05)
            # Cut: the client reads again, what was sent before the cut, up to the end of the stream.
            async with asyncio.timeout(10):
                got = await _read_event_ids(sock)
        assert spy.suspended >= 1
        assert await _metric(gw.url, "cdc_gateway_slow_clients_dropped_total") == 1
        assert 0 < len(got) < len(ids)
        assert got == ids[: len(got)]
        async with open_stream(gw.url, b, token_for(b), last_event_id=got[-1]) as stream:
            rest = await stream.events(len(ids) - len(got))
            assert [int(e.id or 0) for e in rest] == ids[len(got) :]
