"""The listener daemon (`cdc-dashboard listen`), a.k.a. the EnhancedRealtimeManager.

Life of the loop, on every (re)connect:
  1. leadership: a session advisory lock on a dedicated connection; without it, wait as a hot standby.
  2. LISTEN on `cdc_wake_v1` first, then catch up: consume the change log until it is empty.
  3. live: consume batches while there are changes; when there are none, announce sleep (so writers start
     to NOTIFY), make sure no writer that missed the announcement is still open, look once more, and wait
     for a wake-up or the probe interval.
Each batch is one statement, `dashboard.consume_changes_v2`, and so one transaction: it deletes the changes,
brings the touched businesses' figures up to date, appends their events (which NOTIFYs the gateways once) and
records progress, all on the server: the listener shares its cores with the writers. A failure anywhere
rolls the batch back; the changes stay in the log for the next attempt, so a crash, a cut connection or a
PostgreSQL restart loses nothing. A change that cannot be processed (a value a function rejects, an overflow, a
bug) is isolated on the server and set aside in `dashboard.dead_letters` with its error; the rest of its batch
goes on (`cdc-dashboard dead-letters` lists, retries and discards them).

Reconnects back off exponentially with jitter and never give up. A quiet connection is probed every few
seconds with a timeout, so a dead one is noticed within 10 s even when TCP says nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from typing import TypedDict

import asyncpg

from .config import Settings
from .db import connect_dedicated
from .db.backoff import Backoff
from .db.locks import LockKey
from .errors import UserError
from .sqlfiles import queries
from .systemd import Notifier

__all__ = ["EnhancedRealtimeManager", "ListenerStatus", "run_until_signalled"]

log = logging.getLogger("cdc_dashboard.listener")

WAKE_CHANNEL = "cdc_wake_v1"

# Failures that mean "the connection or the server is gone": reconnect.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.InvalidCatalogNameError,
    asyncpg.exceptions.InternalClientError,
)


class ListenerStatus(TypedDict):
    state: str
    node: str
    reconnects: int
    last_error: str | None
    changes_consumed: int
    events_appended: int


class LostLeadership(Exception):
    """The leadership connection died: another listener may be active now."""


# A batch that fails with a database error is retried after a backoff, on fresh connections: the batch
# function raises only errors that say nothing about the changes (a deadlock, a lock or statement timeout, a
# shutdown, a schema a deploy has not finished), and sets a change that fails on its own data aside in
# dashboard.dead_letters (sql/schema/0010). No error from the database stops the daemon.
RECONNECT_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, LostLeadership, asyncpg.PostgresError)
# A goodbye (the last statements, a close) that fails leaves nothing to do: the next listener cleans up.
_GOODBYE_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, asyncpg.PostgresError)


class EnhancedRealtimeManager:
    """The listener. `await run()` until `stop()`; `ready` is set once LISTENing and caught up."""

    batch_size = 5000
    probe_interval = 4.0  # seconds of quiet before a probe; probe timeout below: detection < 10 s
    probe_timeout = 4.0
    standby_poll = 1.0
    sleep_announcement = 60.0  # writers stop notifying this long after a listener vanished
    prune_every = 60.0
    idle_polls_before_sleep = 5
    linger_from = 8  # changes in a batch that make the listener linger before the next one
    linger_per_change = 0.0005  # seconds of lingering per change in the last batch, up to the configured most
    idle_poll_interval = 0.002
    prune_batch = 10000
    # While changes keep flowing, pruning goes a small chunk at a time between batches, so that no batch waits
    # behind a large delete; it keeps going chunk by chunk, batch after batch, until nothing old is left.
    prune_batch_busy = 1000
    # While busy, a batch looks only at changes newer than (newest consumed - scan_window); the index entries of
    # older, consumed changes stay until vacuum and would be stepped over on every batch. A transaction that
    # stays open that long has its changes found by the full look every full_scan_every seconds, and before
    # the listener sleeps: delayed, never lost.
    scan_window = 1000
    full_scan_every = 1.0

    def __init__(self, settings: Settings, *, notifier: Notifier | None = None) -> None:
        self._url = settings.require_database_url()
        self._retention_seconds = settings.event_retention_days * 86400
        self._linger = settings.listener_linger_ms / 1000
        self._q = queries("listener")
        self._notifier = notifier or Notifier()
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self.ready = asyncio.Event()
        self.node = f"{socket.gethostname()}:{os.getpid()}"
        self._state = "connecting"
        self._reconnects = 0
        self._last_error: str | None = None
        self._events_appended = 0
        self._changes_consumed = 0
        self._last_prune = 0.0
        self._prune_behind = False  # the last prune left old events: the next chance prunes again
        self._newest_consumed = 0
        self._last_full_scan = 0.0
        self._lock_conn: asyncpg.Connection | None = None
        self._previous_pids: list[int] = []  # server pids of our last session, reaped on reconnect
        self._conn: asyncpg.Connection | None = None

    # -- public -------------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Finish the current batch, then return from run()."""
        self._stopping.set()
        self._wake.set()

    def status(self) -> ListenerStatus:
        return {
            "state": self._state,
            "node": self.node,
            "reconnects": self._reconnects,
            "last_error": self._last_error,
            "changes_consumed": self._changes_consumed,
            "events_appended": self._events_appended,
        }

    async def run(self) -> None:
        backoff = Backoff(initial=0.1, cap=10.0)
        while not self._stopping.is_set():
            try:
                await self._session()
                backoff.reset()
            except RECONNECT_ERRORS as exc:
                self._reconnects += 1
                self._last_error = f"{type(exc).__name__}: {exc}"[:500]
                self._state = "connecting"
                delay = backoff.next_delay()
                log.warning(
                    "listener session failed; reconnecting",
                    extra={"error": self._last_error, "retry_in": round(delay, 3), "attempt": backoff.attempts},
                )
                self._notifier.status(f"reconnecting: {self._last_error}")
                await self._close(graceful=False)
                await self._interruptible_sleep(delay)
            finally:
                if self._stopping.is_set():
                    await self._shutdown()
        await self._close()

    # -- one connected session ----------------------------------------------------------------------------

    async def _session(self) -> None:
        self._state = "connecting"
        self._lock_conn = await self._connect("cdc-dashboard listener (leader lock)")
        if not await self._lock_conn.fetchval(self._q["schema_ready"], timeout=self.probe_timeout):
            # Not an outage to wait out: this version needs a `db apply` first. systemd restarts us after it.
            raise UserError("the database's schema is older than this listener: run `cdc-dashboard db apply`")
        await self._reap_previous_sessions(self._lock_conn)
        await self._wait_for_leadership(self._lock_conn)
        if self._stopping.is_set():
            return
        conn = self._conn = await self._connect("cdc-dashboard listener")
        self._previous_pids = [self._lock_conn.get_server_pid(), conn.get_server_pid()]
        await conn.add_listener(WAKE_CHANNEL, self._on_wake)
        if self._reconnects:
            await conn.execute(self._q["record_error"], self._last_error)
        await self._set_state(conn, "catching_up")
        caught_up = await self._drain(conn)
        await self._set_state(conn, "live")
        log.info("listener live", extra={"caught_up_changes": caught_up, "node": self.node})
        if not self.ready.is_set():
            self.ready.set()
            self._notifier.ready("live")
        else:
            self._notifier.status("live")
        await self._live(conn)

    async def _connect(self, application_name: str) -> asyncpg.Connection:
        # A batch or a probe that hangs longer than this means a dead connection: reconnect.
        return await connect_dedicated(self._url, application_name=application_name, command_timeout=10)

    async def _reap_previous_sessions(self, conn: asyncpg.Connection) -> None:
        """End our own previous sessions if the server still thinks they are alive.

        When a connection dies silently (a frozen network path, a proxy that keeps the server side open), the
        server keeps the old session - with the leadership lock, maybe row locks and the events lock of a
        half-done batch - until its keepalive gives up. The new session would wait for it as if it were
        another listener. It is ours: end it now. Best effort: without the privilege, keepalives still win.
        """
        if not self._previous_pids:
            return
        try:
            await conn.fetchval(self._q["end_sessions"], self._previous_pids, timeout=self.probe_timeout)
        except asyncpg.PostgresError as exc:
            log.warning("could not end the previous listener sessions", extra={"error": str(exc)})
        self._previous_pids = []

    async def _wait_for_leadership(self, lock_conn: asyncpg.Connection) -> None:
        announced = False
        while not self._stopping.is_set():
            if await lock_conn.fetchval(
                self._q["try_leadership"], LockKey.LISTENER_LEADERSHIP, timeout=self.probe_timeout
            ):
                if announced:
                    log.info("standby taking over as the active listener", extra={"node": self.node})
                return
            if not announced:
                self._state = "standby"
                log.info("another listener is active; waiting as hot standby", extra={"node": self.node})
                # A standby is a healthy, started service: systemd should not time it out.
                if not self.ready.is_set():
                    self.ready.set()
                    self._notifier.ready("standby")
                announced = True
            self._notifier.watchdog()
            await self._interruptible_sleep(self.standby_poll)

    async def _live(self, conn: asyncpg.Connection) -> None:
        settle_wait = 0.005
        idle_polls = 0
        while not self._stopping.is_set():
            self._notifier.watchdog()
            consumed = await self._consume(conn)
            if consumed:
                idle_polls = 0
                # A listener that is never quiet must still prune: a steady stream of payments would otherwise
                # keep the events table growing for as long as it lasts.
                await self._maybe_prune(conn, busy=True)
                if self.linger_from <= consumed < self.batch_size and self._linger:
                    # Under load (a batch found many changes) but not saturated: let more gather, so a stream of
                    # single-row writes becomes fewer, larger batches. A batch has a fixed cost (a commit, the
                    # statement's set-up), and the listener shares the cores with the writers.
                    # The wait grows with the load, up to CDC_LISTENER_LINGER_MS: at a trickle (small batches)
                    # nothing waits, since latency matters more than throughput there.
                    await self._interruptible_sleep(min(self._linger, consumed * self.linger_per_change))
                continue
            if idle_polls < self.idle_polls_before_sleep:
                # Changes were flowing a moment ago: a brief poll is cheaper than a sleep/wake round trip
                # (two updates and, for the writers, NOTIFYs).
                idle_polls += 1
                await self._interruptible_sleep(self.idle_poll_interval)
                continue
            await self._maybe_prune(conn)
            # Quiet: announce sleep, then make sure every writer that might have read "awake" has finished.
            await conn.execute(self._q["announce_sleep"], int(self.sleep_announcement))
            if not await conn.fetchval(self._q["writers_settled"], timeout=self.probe_timeout):
                # A writer is mid-transaction and may not notify: look again shortly instead of sleeping.
                await self._wait_wake(settle_wait)
                settle_wait = min(settle_wait * 2, 0.5)
                await conn.execute(self._q["announce_awake"])
                continue
            settle_wait = 0.005
            if await self._consume(conn, full=True):
                await conn.execute(self._q["announce_awake"])
                continue
            woken = await self._wait_wake(self.probe_interval)
            await conn.execute(self._q["announce_awake"], timeout=self.probe_timeout)
            if not woken:
                await self._probe(conn)

    async def _probe(self, conn: asyncpg.Connection) -> None:
        """Quiet for a while: prove both connections alive (a dead one raises or times out) and beat."""
        await conn.execute(self._q["heartbeat"], "live", timeout=self.probe_timeout)
        assert self._lock_conn is not None
        try:
            await self._lock_conn.fetchval("select 1", timeout=self.probe_timeout)
        except CONNECTION_ERRORS as exc:
            raise LostLeadership(f"leadership connection lost: {exc}") from exc

    async def _drain(self, conn: asyncpg.Connection) -> int:
        total = 0
        while not self._stopping.is_set():
            self._notifier.watchdog()
            consumed = await self._consume(conn, full=True)
            total += consumed
            if consumed < self.batch_size:
                return total
        return total

    # -- one batch ----------------------------------------------------------------------------------------

    async def _consume(self, conn: asyncpg.Connection, *, full: bool = False) -> int:
        """Consume up to batch_size changes; return how many. One statement, so one transaction (autocommit):
        the server consumes, updates the figures, appends the events and records progress together."""
        now = asyncio.get_running_loop().time()
        if full or now - self._last_full_scan >= self.full_scan_every:
            from_id, self._last_full_scan = 0, now
        else:
            from_id = max(0, self._newest_consumed - self.scan_window)
        row = await conn.fetchrow(self._q["consume_batch"], self.batch_size, self._state, from_id)
        assert row is not None
        for rejected in json.loads(row["dead_letters"]):
            log.error("change set aside in dead_letters", extra=rejected)
        if row["consumed"]:
            # After a full look, its newest id is the truth (the log may have been reinstalled, ids restarting).
            newest = row["last_change_id"]
            self._newest_consumed = newest if from_id == 0 else max(self._newest_consumed, newest)
        self._changes_consumed += row["consumed"]
        self._events_appended += row["events_appended"]
        return int(row["consumed"])

    # -- housekeeping -------------------------------------------------------------------------------------

    async def _maybe_prune(self, conn: asyncpg.Connection, *, busy: bool = False) -> None:
        """Delete events older than the retention, at most every prune_every seconds unless the last prune left
        some: when quiet until none is left; when busy one small chunk per call (between batches)."""
        loop = asyncio.get_running_loop()
        if not self._prune_behind and loop.time() - self._last_prune < self.prune_every:
            return
        self._last_prune = loop.time()
        chunk = self.prune_batch_busy if busy else self.prune_batch
        while not self._stopping.is_set():
            deleted = await conn.fetchval(self._q["prune_events"], self._retention_seconds, chunk)
            if deleted:
                log.info("pruned old events", extra={"deleted": deleted})
            self._prune_behind = deleted >= chunk
            if busy or not self._prune_behind:
                return

    async def _set_state(self, conn: asyncpg.Connection, state: str) -> None:
        self._state = state
        await conn.execute(self._q["record_state"], state, self.node)

    async def _shutdown(self) -> None:
        """Clean stop: writers must not keep notifying a listener that is gone."""
        self._notifier.stopping()
        conn = self._conn
        if conn is not None and not conn.is_closed():
            try:
                await conn.execute(self._q["announce_awake"], timeout=2)
                await conn.execute(self._q["heartbeat"], "stopped", timeout=2)
            except _GOODBYE_ERRORS:
                pass  # nothing more to do: the next listener resets both
        self._state = "stopped"
        log.info("listener stopped", extra={"node": self.node})

    async def _close(self, *, graceful: bool = True) -> None:
        """Close both connections. After a failure they are presumed dead: abort them rather than wait for a
        goodbye that a frozen network path would never deliver."""
        for conn in (self._conn, self._lock_conn):
            if conn is None or conn.is_closed():
                continue
            if not graceful:
                conn.terminate()
                continue
            try:
                await asyncio.wait_for(conn.close(), timeout=2)
            except _GOODBYE_ERRORS:
                conn.terminate()
        self._conn = self._lock_conn = None

    # -- waiting ------------------------------------------------------------------------------------------

    def _on_wake(self, *_: object) -> None:
        self._wake.set()

    async def _wait_wake(self, timeout: float) -> bool:
        """Wait for a NOTIFY (or stop()); a wake-up that came while we were busy counts at once."""
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self._wake.clear()
            if self._stopping.is_set():
                self._wake.set()  # stop() is sticky: every later wait returns at once

    async def _interruptible_sleep(self, seconds: float) -> None:
        """Sleep (backoff, standby) unless stopped. Waiting for the database is healthy: pet the watchdog,
        which exists to catch a hung loop, not an outage that reconnecting already handles."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not self._stopping.is_set() and loop.time() < deadline:
            self._notifier.watchdog()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), min(1.0, deadline - loop.time()))


async def run_until_signalled(manager: EnhancedRealtimeManager) -> None:
    """Run the manager; SIGTERM/SIGINT stop it after the current batch."""
    import signal

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, manager.stop)
    try:
        await manager.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
