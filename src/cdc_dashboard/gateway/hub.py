"""The gateway's fan-out: one LISTEN connection per process, events delivered in-process to every stream.

The NOTIFY on `dashboard_events_v1` is only a wake-up; the table `dashboard.events` is the truth. The hub keeps
a position (the last event id it dispatched) and, whenever woken, when quiet for `probe_seconds`, and after
every reconnect, reads the events after it in id order. Ids are committed in id order, so reading by id never
skips a late commit, and a cut connection loses nothing: the next catch-up reads what was missed.

Streams register a `Subscriber` before their response starts. Every event the hub dispatches after that moment
reaches the subscriber: written to the connection at once when the stream waits idle, else to its bounded
buffer. The stream replays older events from the database itself and drops the overlap by id. A subscriber
whose buffer is full is cut (it resumes by Last-Event-ID, losing nothing).

Each batch the hub reads goes out with the `dashboard-stats` figures of its businesses spliced into their last
event, read once for the batch (gateway/pushed_figures.py); the hub's memory keeps the events as stored.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from sse_starlette.event import ServerSentEvent

from ..db import connect_dedicated
from ..db.backoff import Backoff
from ..sqlfiles import queries
from .metrics import GatewayMetrics
from .pushed_figures import live_payloads

__all__ = ["CHANNEL", "Hub", "HubEvent", "Subscriber", "encode_event"]

log = logging.getLogger(__name__)

CHANNEL = "dashboard_events_v1"
SEP = "\n"
_BATCH = 1000
_COMMAND_TIMEOUT = 5.0
_CONNECT_TIMEOUT = 5.0
# Loading the latest events into memory at start-up reads up to `recent_events` (10,000) payloads at once.
_LOAD_RECENT_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class HubEvent:
    """One event as the wire carries it; `encoded` is shared by every stream that sends it."""

    id: int
    business_id: str | None
    kind: str
    encoded: bytes


def encode_event(event_id: int, kind: str, payload: str) -> bytes:
    """The SSE frame of an event (`payload` is its JSON text, one line)."""
    return ServerSentEvent(payload, id=str(event_id), event=kind, sep=SEP).encode()


class Subscriber:
    """One stream's buffer of events, and its direct write. Only the event loop's thread touches it.

    Kept small on purpose (a plain list, a future made only while waiting, one timer): a gateway holds one
    per open connection, 10,000 of them and more, and a broadcast reaches every one of them.

    While the stream's task waits in its live loop with nothing buffered and no send under way (`idle`), the
    hub writes an event straight to the connection (`write_now`) instead of buffering it and waking the task:
    no task step, no future, no generator step per delivery. Otherwise events go to the buffer (`push`) and
    the stream's task writes them in order, after any direct write still under way.
    """

    __slots__ = (
        "_inflight",
        "_timer",
        "_waiter",
        "business_id",
        "closed_reason",
        "items",
        "limit",
        "on_cut",
        "sending_since",
        "sent",
        "write",
    )

    def __init__(self, business_id: str, limit: int) -> None:
        self.business_id = business_id
        self.limit = limit
        self.items: list[HubEvent] = []
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        # Set when the stream must end: "slow" (buffer overflow or a send blocked too long), "draining"
        # (SIGTERM), "disconnected" (the client left), "closed" (the stream or the hub stopped).
        self.closed_reason: str | None = None
        # Aborts the response at once (its send may be blocked on a client that stopped reading).
        self.on_cut: Callable[[], None] | None = None
        # Loop time at which the stream's current send began; None when it is not sending.
        self.sending_since: float | None = None
        # The id of the last event written to the stream (or being written): the live events at or below it
        # were replayed already and are dropped.
        self.sent = 0
        # Sends one body chunk on the stream's connection; set by the response once its headers went out.
        self.write: Callable[[bytes], Awaitable[None]] | None = None
        # The rest of a direct write that could not finish at once (the client's transport is paused).
        self._inflight: asyncio.Task[None] | None = None

    @property
    def idle(self) -> bool:
        """The stream's task waits in its live loop (a buffered event or a close would have woken it), its
        response is writing, and no direct write is under way: the hub may write to the connection itself."""
        waiter = self._waiter
        return waiter is not None and not waiter.done() and self.write is not None and self._inflight is None

    def push(self, event: HubEvent) -> bool:
        """Buffer an event; False when the buffer was full (the subscriber is then cut)."""
        if self.closed_reason is not None:
            return True
        if len(self.items) >= self.limit:
            self.cut()
            return False
        self.items.append(event)
        self._wake()
        return True

    def write_now(self, event: HubEvent) -> bool:
        """Write an event to the idle stream's connection, from the hub's dispatch; True when it was sent.

        The send is stepped by hand: a server's send of a body chunk returns without suspending unless the
        connection's transport is paused for flow control. When it does suspend, a small task finishes it;
        until then the stream counts as sending (the hub's stall check can cut it), and later events buffer.
        """
        if event.id <= self.sent:
            return False  # replayed already
        assert self.write is not None  # idle only once the response is writing
        self.sent = event.id
        steps = self.write(event.encoded).__await__()
        try:
            suspended_on = steps.send(None)
        except StopIteration:
            return True
        except Exception:
            log.warning("a stream's write failed; ending it", exc_info=True, extra={"business_id": self.business_id})
            self.cut()
            return False
        loop = asyncio.get_running_loop()
        self.sending_since = loop.time()
        self._inflight = loop.create_task(self._finish_write(_RestOf(steps, suspended_on)))
        return True

    async def _finish_write(self, rest: _RestOf) -> None:
        try:
            await rest
        except Exception:
            log.warning("a stream's write failed; ending it", exc_info=True, extra={"business_id": self.business_id})
            self.cut()
        finally:
            # The stream is idle again if its task still waits (nothing buffered meanwhile); otherwise the task,
            # woken, writes what buffered.
            self.sending_since = None
            self._inflight = None

    def detach(self) -> None:
        """The response ended: no more direct writes, and one still under way is abandoned."""
        self.write = None
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            inflight.cancel()

    def take(self) -> list[HubEvent]:
        """Everything buffered, oldest first; the buffer is empty afterwards."""
        items, self.items = self.items, []
        return items

    def close(self, reason: str) -> None:
        if self.closed_reason is None:
            self.closed_reason = reason
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake()

    def cut(self) -> None:
        """The client stopped reading: end the stream now, even in the middle of a send (once)."""
        self.close("slow")
        on_cut, self.on_cut = self.on_cut, None
        if on_cut is not None:
            on_cut()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def wake_at(self, when: float) -> None:
        """Make `wait` return at loop time `when` (the stream's next heartbeat or its token's expiry).

        One timer per stream, replaced only when the deadline moves: events do not move it, so a delivery
        costs no timer (a timeout around every wait did: one timer made and cancelled per event per stream).
        """
        timer = self._timer
        if timer is not None:
            if timer.when() == when:
                return
            timer.cancel()
        if self.closed_reason is None:
            self._timer = asyncio.get_running_loop().call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._wake()

    async def wait(self) -> None:
        """Until an event is buffered, the subscriber is closed, or the time given to `wake_at` passes; the
        hub writes events directly meanwhile. Returns once no direct write is under way.

        Returns at once when the timer has already fired: the caller reads the clock after every wake."""
        if self.items or self.closed_reason is not None or self._timer is None:
            return
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self._inflight is not None:
            # The stream's own writes come after the direct one (its client is slow; the stall check watches).
            await self._inflight


class _RestOf:
    """Awaiting this finishes an awaitable whose first step was taken by hand and suspended on `suspended_on`.

    It passes what the awaiting task gives back (a result, or an exception such as a cancellation) on to the
    awaitable's steps, as the task would have had it awaited the awaitable itself."""

    __slots__ = ("_steps", "_suspended_on")

    def __init__(self, steps: Generator[Any, None, Any], suspended_on: Any) -> None:
        self._steps = steps
        self._suspended_on = suspended_on

    def __await__(self) -> Generator[Any, None, None]:
        steps, suspended_on = self._steps, self._suspended_on
        while True:
            try:
                yield suspended_on
            except GeneratorExit:
                steps.close()
                raise
            except BaseException as exc:
                try:
                    suspended_on = steps.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    suspended_on = steps.send(None)
                except StopIteration:
                    return


class Hub:
    """Owns the LISTEN connection and the subscribers; `start()` returns once listening and caught up."""

    def __init__(
        self,
        database_url: str,
        metrics: GatewayMetrics,
        *,
        probe_seconds: float = 5.0,
        recent_events: int = 10_000,
        send_timeout: float = 30.0,
    ) -> None:
        self._url = database_url
        self._metrics = metrics
        self._probe_seconds = probe_seconds
        self._send_timeout = send_timeout
        self._stall_check: asyncio.TimerHandle | None = None
        self._by_business: dict[str, set[Subscriber]] = {}
        self._count = 0
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._conn: asyncpg.Connection | None = None
        self.position = 0
        # The latest events of every business, so that a resuming stream (every page load resumes from its
        # `as_of_event_id`, every reconnect from its last id) replays from memory instead of the database.
        # Every event with an id in (_recent_floor, position] is in it.
        self._recent: deque[HubEvent] = deque(maxlen=recent_events)
        self._recent_floor: int | None = None
        self.listening = asyncio.Event()
        self.draining = False
        self.reconnects = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.node = f"{socket.gethostname()}:{os.getpid()}"

    # -- subscribers ---------------------------------------------------------------------------------------

    @property
    def subscriber_count(self) -> int:
        return self._count

    def subscribe(self, business_id: str, limit: int) -> Subscriber:
        """Register before the response starts: every event dispatched from now on reaches the subscriber."""
        sub = Subscriber(business_id, limit)
        self._by_business.setdefault(business_id, set()).add(sub)
        self._count += 1
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        subs = self._by_business.get(sub.business_id)
        if subs is not None and sub in subs:
            subs.discard(sub)
            self._count -= 1
            if not subs:
                del self._by_business[sub.business_id]
        sub.close("closed")

    def recent_after(self, business_id: str, after: int) -> list[HubEvent] | None:
        """The business's events after id `after` up to the hub's position, from memory; None when memory does
        not reach back that far (or `after` is ahead of the hub): the caller then reads the database."""
        floor = self._recent_floor
        if floor is None or self._recent.maxlen == 0 or after < floor or after > self.position:
            return None
        recent = self._recent
        start = bisect.bisect_right(recent, after, key=lambda event: event.id)
        # Indexing walks from the nearer end of the deque: resuming streams are usually near the newest events.
        events = (recent[i] for i in range(start, len(recent)))
        return [event for event in events if event.business_id is None or event.business_id == business_id]

    def drain(self) -> None:
        """SIGTERM: every stream ends (with a jittered retry), and new ones are refused."""
        self.draining = True
        for subs in self._by_business.values():
            for sub in subs:
                sub.close("draining")

    def _cut_stalled(self) -> None:
        """Cut every stream whose send has been blocked longer than `send_timeout`, then look again later.

        A client that stopped reading while no events came never fills its buffer; this is what ends it. One
        timer for the whole hub, not one per send: a broadcast does a send per stream.
        """
        loop = asyncio.get_running_loop()
        too_old = loop.time() - self._send_timeout
        for subs in self._by_business.values():
            for sub in subs:
                if sub.sending_since is not None and sub.sending_since < too_old and sub.on_cut is not None:
                    self._metrics.slow_clients_dropped.inc()
                    log.warning("slow client cut: a send stayed blocked", extra={"business_id": sub.business_id})
                    sub.cut()
        self._stall_check = loop.call_later(max(0.1, self._send_timeout / 4), self._cut_stalled)

    # -- lifecycle -----------------------------------------------------------------------------------------

    async def start(self, timeout: float = 30.0) -> None:
        """Start listening; returns once the first LISTEN is in place (or raises after `timeout`)."""
        self._task = asyncio.create_task(self._run(), name="gateway-hub")
        self._cut_stalled()
        waiter = asyncio.ensure_future(self.listening.wait())
        done, _ = await asyncio.wait({waiter, self._task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            waiter.cancel()
            if self._task in done:
                self._task.result()  # re-raise why it died
            raise TimeoutError(f"the gateway could not LISTEN within {timeout:.0f} s: {self.last_error}")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._stall_check is not None:
            self._stall_check.cancel()
        for subs in list(self._by_business.values()):
            for sub in subs:
                sub.close("closed")
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._close_conn()

    def status(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "listening": self.listening.is_set(),
            "position": self.position,
            "streams": self._count,
            "businesses": len(self._by_business),
            "draining": self.draining,
            "reconnects": self.reconnects,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
        }

    # -- the LISTEN loop -----------------------------------------------------------------------------------

    async def _run(self) -> None:
        # Capped at 5 s: after an outage the streams get what was committed meanwhile within seconds of the
        # database's return (jitter still spreads the gateways' reconnects).
        backoff = Backoff(initial=0.1, cap=5.0)
        sql = queries("gateway")
        first = True
        while not self._stopping:
            try:
                await self._connect()
                assert self._conn is not None
                if first:
                    # A fresh gateway starts at the present, with the latest events in memory for resuming streams.
                    self.position = int(await self._conn.fetchval(sql["hub_position"]))
                    await self._load_recent()
                    first = False
                await self._catch_up()
                self.listening.set()
                backoff.reset()
                while not self._stopping:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self._probe_seconds):
                            await self._wake.wait()
                    # Cleared before the read, never after it: a NOTIFY that arrives while a catch-up runs (its
                    # figures read can take a while) is for rows that read may have missed, and must start the
                    # next catch-up at once rather than wait for the probe.
                    self._wake.clear()
                    if self._conn.is_closed():
                        raise ConnectionError("the LISTEN connection closed")
                    # Woken or quiet: either way read the table. When quiet this doubles as the liveness
                    # probe, and it catches an event whose NOTIFY was lost.
                    await self._catch_up()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Whatever went wrong, the loop must go on: a hub that stopped would silence every stream of
                # this process while /readyz still answered. Reconnecting and catching up by id loses nothing.
                if self._stopping:
                    break
                self.listening.clear()
                self.reconnects += 1
                self._metrics.listen_reconnects.inc()
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.last_error_at = time.time()
                delay = backoff.next_delay()
                expected = isinstance(exc, OSError | asyncpg.PostgresError | asyncpg.InterfaceError | TimeoutError)
                log.warning(
                    "gateway LISTEN connection lost; reconnecting",
                    extra={"error": self.last_error, "retry_in_seconds": round(delay, 3)},
                    exc_info=None if expected else exc,
                )
                await self._close_conn()
                await asyncio.sleep(delay)

    async def _connect(self) -> None:
        await self._close_conn()
        # A catch-up reads at most _BATCH events by primary key, milliseconds: one that takes _COMMAND_TIMEOUT
        # means a dead or frozen path, so the hub reconnects within about probe_seconds + that, and the streams
        # get what was committed meanwhile from the catch-up after the reconnect.
        conn = await connect_dedicated(
            self._url,
            application_name=f"cdc-dashboard gateway {self.node}",
            command_timeout=_COMMAND_TIMEOUT,
            timeout=_CONNECT_TIMEOUT,
        )
        self._conn = conn
        conn.add_termination_listener(self._on_terminated)
        await conn.add_listener(CHANNEL, self._on_notify)

    async def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), timeout=2)
            if not conn.is_closed():
                conn.terminate()

    def _on_notify(self, *_: object) -> None:
        self._wake.set()

    def _on_terminated(self, *_: object) -> None:
        self._wake.set()

    async def _catch_up(self) -> None:
        assert self._conn is not None
        sql = queries("gateway")["hub_catch_up"]
        while True:
            rows = await self._conn.fetch(sql, self.position, _BATCH)
            # The figures of the batch's businesses that have a stream here, read once for the whole batch, go
            # with each one's last event (gateway/pushed_figures.py); a failed read only leaves them out.
            live = await live_payloads(self._conn, rows, self._by_business, self._metrics) if rows else {}
            for row in rows:
                self._dispatch(row, live.get(row["id"]))
                # Let the streams write what they were given before the next event: a burst for one business
                # must not overflow the buffer of a client that is reading.
                await asyncio.sleep(0)
            if len(rows) < _BATCH:
                return

    async def _load_recent(self) -> None:
        assert self._conn is not None
        maxlen = self._recent.maxlen or 0
        sql = queries("gateway")["hub_recent"]
        rows = await self._conn.fetch(sql, self.position, maxlen, timeout=_LOAD_RECENT_TIMEOUT) if maxlen else []
        self._recent.clear()
        self._recent.extend(_event(row) for row in reversed(rows))
        # Conservative: ids below the oldest loaded one may have been pruned, so memory starts just before it.
        self._recent_floor = self._recent[0].id - 1 if self._recent else self.position

    def _dispatch(self, row: asyncpg.Record, live_payload: str | None = None) -> None:
        """Deliver one event to its streams; `live_payload` (the payload with figures) replaces the stored one
        for them, while memory keeps the stored one: replays never carry figures."""
        stored = _event(row)
        event = stored if live_payload is None else _event(row, live_payload)
        if self._recent.maxlen and len(self._recent) == self._recent.maxlen:
            self._recent_floor = self._recent[0].id  # about to be evicted
        self._recent.append(stored)
        if event.business_id is None:
            targets = [sub for subs in self._by_business.values() for sub in subs]
        else:
            targets = list(self._by_business.get(event.business_id, ()))
        written = 0
        for sub in targets:
            if sub.idle:
                written += sub.write_now(event)
            elif not sub.push(event):
                self._metrics.slow_clients_dropped.inc()
                log.warning("slow client cut: its buffer is full", extra={"business_id": sub.business_id})
        if written:
            # Once per broadcast, not per stream: a counter's lock costs more than the write's bookkeeping.
            self._metrics.events_sent.inc(written)
        self.position = event.id
        created: datetime = row["created_at"]
        self._metrics.event_lag.set(max(0.0, time.time() - created.timestamp()))
        self._metrics.position.set(event.id)


def _event(row: asyncpg.Record, payload: str | None = None) -> HubEvent:
    """The event of a row, with its stored payload or the one given."""
    return HubEvent(
        id=row["id"],
        business_id=row["business_id"],
        kind=row["kind"],
        encoded=encode_event(row["id"], row["kind"], row["payload"] if payload is None else payload),
    )
