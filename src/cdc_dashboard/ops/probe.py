"""The end-to-end probe of `cdc-dashboard doctor`: one change through the real path, each hop timed.

capture (a write on a tracked table, its trigger, the commit) -> listener (the event committed) -> gateway ->
client (the event on an SSE stream opened before the write).

Probe changes never show in any business's figures (docs/OPERATIONS.md, "The end-to-end probe"). The probe
writes for a business of its own (`PROBE_BUSINESS_ID`), created for the probe and deleted after it: one
transaction inserts and deletes a `payment_transactions` row (a failed attempt of amount 0; no figure reads
payment_transactions), so the row never exists outside that transaction, while the capture trigger records
both changes. The listener turns them into an event for the probe business only, which no dashboard but the
probe's own stream sees. Afterwards the probe deletes its events and its business; a probe that timed out
also takes its unconsumed changes back out of the log. Probes take turns on an advisory lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import Any

import aiohttp
import asyncpg

from ..db.locks import LockKey
from ..sqlfiles import queries
from ..tokens import create_token

__all__ = ["PROBE_BUSINESS_ID", "CheckFailed", "EndToEndProbe"]

# A fixed, recognisable id: a leftover (a doctor killed mid-probe) is found and removed by the next run, and an
# operator who sees it knows what it is.
PROBE_BUSINESS_ID = "00000000-0000-4000-8000-00000000d0c7"
PROBE_TABLE = "public.payment_transactions"
HTTP_TIMEOUT = 5.0
LOCK_WAIT = 15.0
LISTENER_TIMEOUT = 10.0
GATEWAY_TIMEOUT = 5.0
_LISTENER_FIX = (
    "restart the listener: systemctl restart cdc-dashboard-listener, then read journalctl -u cdc-dashboard-listener"
)


class CheckFailed(Exception):
    """A doctor check (the probe's hops among them) failed: what happened, the one thing to do, and what was
    measured so far."""

    def __init__(self, summary: str, fix: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(summary)
        self.summary = summary
        self.fix = fix
        self.details = details or {}


class EndToEndProbe:
    """`await EndToEndProbe(conn, gateway_url, secret).run()` -> (summary, details); raises CheckFailed.

    `conn` is an asyncpg connection of its own (session-level lock, LISTEN)."""

    def __init__(self, conn: asyncpg.Connection, gateway_url: str, secret: str) -> None:
        self._conn = conn
        self._gateway = gateway_url.rstrip("/")
        self._secret = secret
        self._q = queries("doctor")

    async def run(self) -> tuple[str, dict[str, Any]]:
        conn = self._conn
        deadline = time.monotonic() + LOCK_WAIT
        while not await conn.fetchval(self._q["probe_lock"], LockKey.DOCTOR_PROBE):
            if time.monotonic() > deadline:
                raise CheckFailed(
                    f"another doctor's probe has held the probe lock for {LOCK_WAIT:.0f} s",
                    "wait for the other doctor to finish, then run doctor again",
                )
            await asyncio.sleep(0.2)
        try:
            await conn.fetchrow(self._q["probe_cleanup"], PROBE_BUSINESS_ID)
            await conn.execute(self._q["probe_business"], PROBE_BUSINESS_ID)
            position = int(await conn.fetchval(self._q["probe_position"]))
            try:
                return await self._probe(position)
            finally:
                # Never leave anything behind: unconsumed changes (a timed-out probe), events, the business.
                await conn.execute(self._q["probe_withdraw"], position, PROBE_BUSINESS_ID)
                await conn.fetchrow(self._q["probe_cleanup"], PROBE_BUSINESS_ID)
        finally:
            with contextlib.suppress(Exception):
                await conn.fetchval(self._q["probe_unlock"], LockKey.DOCTOR_PROBE)

    async def _probe(self, position: int) -> tuple[str, dict[str, Any]]:
        conn = self._conn
        token = create_token(self._secret, [PROBE_BUSINESS_ID], 120)
        row_id = str(uuid.uuid4())
        stream_url = f"{self._gateway}/v1/businesses/{PROBE_BUSINESS_ID}/events"
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=HTTP_TIMEOUT)
        woken = asyncio.Event()
        notified: list[float] = []

        def on_event_notify(*_: object) -> None:
            # The same NOTIFY the gateways wait for: its arrival times the event's commit.
            notified.append(time.perf_counter())
            woken.set()

        async with aiohttp.ClientSession(timeout=timeout) as session:
            opened = time.perf_counter()
            try:
                async with asyncio.timeout(HTTP_TIMEOUT):
                    response = await session.get(
                        stream_url, headers={"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
                    )
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise CheckFailed(
                    f"cannot open the probe's event stream at {stream_url}: {exc}", "see the gateway check"
                ) from None
            async with response:
                if response.status == 401:
                    raise CheckFailed(
                        f"the gateway refused the probe's token ({(await response.text()).strip()[:200]})",
                        "give doctor the gateway's CDC_SECRET (the same EnvironmentFile)",
                    )
                if response.status != 200:
                    raise CheckFailed(
                        f"the event stream answered {response.status}: {(await response.text()).strip()[:200]}",
                        "read GET /v1/status with an admin token (cdc-dashboard token --admin)",
                    )
                hops: dict[str, float] = {"stream_open_ms": (time.perf_counter() - opened) * 1000}
                arrival = asyncio.create_task(_arrival(response, row_id))
                await conn.add_listener("dashboard_events_v1", on_event_notify)
                try:
                    return await self._write_and_follow(position, row_id, arrival, woken, notified, hops)
                finally:
                    arrival.cancel()
                    with contextlib.suppress(BaseException):
                        await arrival
                    await conn.remove_listener("dashboard_events_v1", on_event_notify)

    async def _write_and_follow(
        self,
        position: int,
        row_id: str,
        arrival: asyncio.Task[float | None],
        woken: asyncio.Event,
        notified: list[float],
        hops: dict[str, float],
    ) -> tuple[str, dict[str, Any]]:
        conn, q = self._conn, self._q
        details: dict[str, Any] = {"business_id": PROBE_BUSINESS_ID, "table": PROBE_TABLE, "row_id": row_id}
        # Hop 1, capture: the writer's transaction, trigger included, until its commit returns.
        started = time.perf_counter()
        async with conn.transaction():
            await conn.execute(q["probe_insert"], row_id, PROBE_BUSINESS_ID)
            await conn.execute(q["probe_delete"], row_id)
            captured = await conn.fetchval(q["probe_captured"], position, row_id)
        committed = time.perf_counter()
        hops["capture_ms"] = (committed - started) * 1000
        details["hops"] = hops
        if captured < 2:
            raise CheckFailed(
                f"the capture trigger recorded {captured} of the probe's 2 changes on {PROBE_TABLE}",
                "see the capture_triggers check; then run cdc-dashboard db apply",
                details,
            )
        # Hop 2, listener: from the commit until the event is committed (the gateways' NOTIFY wakes us).
        event_id = None
        appended: float | None = None
        while appended is None:
            woken.clear()
            event_id = await conn.fetchval(q["probe_event"], PROBE_BUSINESS_ID, row_id)
            if event_id is not None:
                # Found right after a NOTIFY: that NOTIFY was the commit (or a later one, a bound either way).
                appended = notified[-1] if notified and notified[-1] > committed else time.perf_counter()
                break
            if arrival.done() and arrival.result() is not None:
                appended = arrival.result()
                break
            remaining = committed + LISTENER_TIMEOUT - time.perf_counter()
            if remaining <= 0:
                pending = await conn.fetchval(q["probe_pending"], position, PROBE_BUSINESS_ID)
                if pending:
                    raise CheckFailed(
                        f"the listener did not consume the probe's changes within {LISTENER_TIMEOUT:.0f} s",
                        _LISTENER_FIX,
                        details,
                    )
                raise CheckFailed(
                    "the listener consumed the probe's changes but appended no event for them",
                    "inspect dashboard.dead_letters and the listener's log (journalctl -u cdc-dashboard-listener)",
                    details,
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(0.25, remaining)):
                    await woken.wait()
        details["event_id"] = event_id
        # Hop 3, gateway -> client: from the committed event until it arrives on the SSE stream.
        try:
            async with asyncio.timeout(GATEWAY_TIMEOUT):
                arrived = await asyncio.shield(arrival)
        except TimeoutError:
            arrived = None
        if arrived is None:
            raise CheckFailed(
                f"event {event_id} was committed but did not arrive on the gateway's stream within "
                f"{GATEWAY_TIMEOUT:.0f} s",
                "check that --url's gateway uses this database, then read gateway in its GET /v1/status (admin "
                "token) and that no proxy buffers text/event-stream; restart the gateway if its LISTEN is stuck",
                details,
            )
        assert appended is not None
        appended = min(appended, arrived)
        hops["listener_ms"] = (appended - committed) * 1000
        hops["gateway_ms"] = (arrived - appended) * 1000
        hops["total_ms"] = (arrived - started) * 1000
        return (
            f"probe arrived in {hops['total_ms']:.1f} ms: capture {hops['capture_ms']:.1f} -> listener "
            f"{hops['listener_ms']:.1f} -> gateway -> client {hops['gateway_ms']:.1f} ms",
            details,
        )


async def _arrival(response: aiohttp.ClientResponse, row_id: str) -> float | None:
    """perf_counter() when an event naming the probe's row arrives on the stream; None if the stream ends."""
    data: list[str] = []
    while True:
        try:
            raw = await response.content.readline()
        except (aiohttp.ClientError, ValueError):  # cut, or a line beyond aiohttp's limit: no arrival
            return None
        if not raw:
            return None
        line = raw.decode(errors="replace").rstrip("\r\n")
        if line == "":
            if data and _names_row("\n".join(data), row_id):
                return time.perf_counter()
            data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


def _names_row(data: str, row_id: str) -> bool:
    try:
        payload = json.loads(data)
    except ValueError:
        return False
    changes = payload.get("changes") if isinstance(payload, dict) else None
    return isinstance(changes, list) and any(isinstance(c, dict) and c.get("id") == row_id for c in changes)
