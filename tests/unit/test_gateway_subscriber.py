"""A stream's Subscriber: the hub's direct write to an idle stream, and its hand-over when the send suspends.

The connection here is a stand-in with uvicorn's flow control (a send writes at once unless the transport is
paused, then waits until it resumes); the whole gateway over real sockets is in
tests/integration/test_gateway_stream.py."""

from __future__ import annotations

import asyncio

from cdc_dashboard.gateway.hub import HubEvent, Subscriber


class _Connection:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.writable = asyncio.Event()
        self.writable.set()

    async def send(self, chunk: bytes) -> None:
        if not self.writable.is_set():
            await self.writable.wait()
        self.chunks.append(chunk)


def _event(event_id: int) -> HubEvent:
    return HubEvent(event_id, "b", "invalidate", f"id: {event_id}\n\n".encode())


def _subscriber(connection: _Connection, sent: int = 0) -> Subscriber:
    sub = Subscriber("b", limit=10)
    sub.write = connection.send
    sub.sent = sent
    sub.wake_at(asyncio.get_running_loop().time() + 60)
    return sub


async def _parked(sub: Subscriber) -> asyncio.Task[None]:
    waiting = asyncio.create_task(sub.wait())
    await asyncio.sleep(0)
    assert sub.idle
    return waiting


async def test_an_idle_stream_is_written_at_once_without_waking_its_task() -> None:
    connection = _Connection()
    sub = _subscriber(connection, sent=5)
    waiting = await _parked(sub)
    # At or below the stream's position: the replay sent it already.
    assert not sub.write_now(_event(5))
    assert sub.write_now(_event(6))
    assert sub.write_now(_event(7))
    assert connection.chunks == [_event(6).encoded, _event(7).encoded]
    assert sub.sent == 7 and sub.items == []
    await asyncio.sleep(0)
    assert not waiting.done() and sub.idle and sub.sending_since is None
    sub.close("closed")
    await waiting
    assert not sub.idle


async def test_a_write_that_suspends_holds_later_events_back_until_it_finishes() -> None:
    connection = _Connection()
    sub = _subscriber(connection)
    waiting = await _parked(sub)
    connection.writable.clear()  # the client stopped reading: the transport is paused
    assert sub.write_now(_event(1))
    # Under way: counted as a send (the stall check sees it), and no longer idle, so the next events buffer.
    assert sub.sending_since is not None and not sub.idle
    assert sub.push(_event(2)) and sub.push(_event(3))
    await asyncio.sleep(0.01)
    # The stream's task was woken by the buffered events, but waits for the write under way.
    assert not waiting.done() and connection.chunks == []
    connection.writable.set()
    await asyncio.wait_for(waiting, 1)
    assert connection.chunks == [_event(1).encoded]
    assert sub.sending_since is None
    assert [event.id for event in sub.take()] == [2, 3]


async def test_a_finished_suspended_write_makes_the_waiting_stream_idle_again() -> None:
    connection = _Connection()
    sub = _subscriber(connection)
    waiting = await _parked(sub)
    connection.writable.clear()
    sub.write_now(_event(1))
    connection.writable.set()
    await asyncio.sleep(0.01)
    assert connection.chunks == [_event(1).encoded]
    assert sub.idle and not waiting.done()
    assert sub.write_now(_event(2))
    assert connection.chunks == [_event(1).encoded, _event(2).encoded]
    sub.close("closed")
    await waiting


async def test_detaching_abandons_a_suspended_write() -> None:
    connection = _Connection()
    sub = _subscriber(connection)
    waiting = await _parked(sub)
    connection.writable.clear()
    sub.write_now(_event(1))
    sub.cut()  # what the stall check does; the response then ends and detaches
    sub.detach()
    await asyncio.wait_for(waiting, 1)
    await asyncio.sleep(0.01)
    assert connection.chunks == []
    assert sub.write is None and not sub.idle
    # A closed subscriber takes nothing more.
    assert sub.push(_event(2)) and sub.items == []
