"""Chaos run: the whole product, as operators run it, under every failure DESIGN promises to survive at once.

    .venv/bin/python bench/chaos.py [--seconds 240] [--businesses 6] [--dashboards 3] [--writers 16]
        [--kill-every 4] [--freeze 8] [--slow-pause 45] [--drain 90] [--seed N]

Set up (each piece a real process, as in production):
- one PostgreSQL the run owns: an embedded server in a temporary directory, so it can be restarted; or, with
  CDC_BENCH_ADMIN_URL, a scratch database on that server (then there is no PostgreSQL restart);
- `db apply`, `--businesses` businesses with a few clients each;
- 2 listeners (`cdc-dashboard listen`): one active, one hot standby;
- 2 gateways (`cdc-dashboard serve`); gateway 1 reaches the database through a TCP proxy that can freeze;
- `--dashboards` SSE dashboards per business (aiohttp), each alternating between the gateways on every
  reconnect and resuming with Last-Event-ID; one per business is a slow client: 3-8 s after each pause it opens a
  fresh stream (small socket buffers) and stops reading it for `--slow-pause` seconds, then reads on what
  reached it and resumes with Last-Event-ID where the gateway cut it (see `slow_socket` for why a fresh stream:
  on loopback, a long-lived one is cut only once megabytes wait);
- `--writers` writers, each its own connection, whose transactions commit out of order: begin, insert a payment
  or a booking (and sometimes update an earlier one of the same business: a refund, a status change, a booking's
  payment status), hold the transaction open a random while (a few hold it for seconds), commit.

Faults, on a schedule over `--seconds` (each printed with its time): the active listener's backends terminated
every `--kill-every` seconds (`pg_terminate_backend`: its main connection, and every other time its leadership
connection too); the gateway 1 ↔ database path frozen for `--freeze` seconds; the active listener SIGKILLed
with the standby present (started again, as the new standby); one PostgreSQL restart; gateway 0 restarted with
SIGTERM (a deploy) and gateway 1 with SIGKILL (a crash).

Then the writers stop, the listener drains, every dashboard catches up, and the run verifies:
(a) every committed change reached every dashboard of its business, in event-id order: each dashboard received
    every event the database holds for its business, ids strictly increasing, nothing twice; every committed
    payment and booking id is named in one of them (an event lists at most 100 changes, with change_count
    counting all: for a business that had such an event, its ids are checked by count instead: the
    change_counts a dashboard received add up to exactly the changes the writers committed);
(b) no event of a business reached another business's dashboard, and no event names another business's row;
(c) every figure equals DESIGN's SQL over the base tables (tests/oracle.py): `GET /stats` through each gateway,
    and the stats, hourly and daily series and facts read from the database; nothing was set aside as a dead
    letter.
(d) the slow-client fault happened: when a slow client's pause ran its full length, the gateways cut at least one
    stream (their `cdc_gateway_slow_clients_dropped` counters, summed over restarts), and the cut clients still
    lost nothing by (a).
A transaction whose COMMIT failed (the connection died in it) may or may not have committed: it is settled
after the run by whether its inserted row exists.

Exit status 0 only when nothing was lost, duplicated, out of order or foreign, no figure differs, and the slow
clients were cut.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psycopg
from psycopg.conninfo import conninfo_to_dict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the test suite's proxy, restart helper and oracle are reused, not copied

from tests.oracle import expected_figures, figure_mismatches  # noqa: E402
from tests.pg import restart_embedded  # noqa: E402
from tests.processes import stop_process  # noqa: E402
from tests.proxy import FreezableProxy  # noqa: E402

from cdc_dashboard.migrations import apply  # noqa: E402
from cdc_dashboard.tokens import create_token  # noqa: E402
from scratch import scratch_database, wait_ready  # noqa: E402  (bench/scratch.py)

CLI = str(Path(sys.executable).parent / "cdc-dashboard")
SECRET = "bench-chaos-" + "c" * 40
# Why these gateway settings: heartbeats often enough that a dead stream is noticed within the run; a small
# per-stream buffer (16 events) and send timeout (2 s) so a slow client is cut within seconds of its socket
# filling rather than half a minute; no limit on stream opens per address (every dashboard is on 127.0.0.1).
GATEWAY_ENV = {
    "CDC_SSE_PING_SECONDS": "2",
    "CDC_SSE_QUEUE_SIZE": "16",
    "CDC_SSE_SEND_TIMEOUT_SECONDS": "2",
    "CDC_RATE_LIMIT_STREAM_OPENS_PER_MINUTE": "0",
}
# The gateways' own account of the run (Prometheus counters, summed over restarts).
GATEWAY_COUNTERS = {
    "cdc_gateway_slow_clients_dropped_total": "slow clients cut",
    "cdc_gateway_listen_reconnects_total": "gateway LISTEN reconnects",
    "cdc_gateway_events_replayed_total": "events replayed on resume",
}
METHODS = ["mpesa", "paystack", "card", "cash", "bank_transfer", "other"]
BOOKING_STATUSES = ["pending", "confirmed", "completed", "cancelled", "no_show"]
PAYMENT_STATUSES = ["unpaid", "pending", "partially_paid", "paid", "refunded"]


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Clock:
    def __init__(self) -> None:
        self.start = time.monotonic()
        self.faults: list[tuple[float, str]] = []

    def now(self) -> float:
        return time.monotonic() - self.start

    def fault(self, what: str) -> None:
        self.faults.append((self.now(), what))
        print(f"  t={self.now():6.1f}s  {what}", flush=True)


# -- processes ----------------------------------------------------------------------------------------------


class Processes:
    """The listeners and gateways, started and restarted as an operator (or a crash) would."""

    def __init__(self, url: str, proxied_url: str, logs: Path) -> None:
        self.url, self.proxied_url, self.logs = url, proxied_url, logs
        self.listeners: list[subprocess.Popen[bytes]] = []
        self.ports = [free_port(), free_port()]
        self.gateways: list[subprocess.Popen[bytes] | None] = [None, None]
        self._base_env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
        self._started = 0
        self.counters: dict[str, float] = defaultdict(float)

    def _spawn(self, args: list[str], env: dict[str, str], name: str) -> subprocess.Popen[bytes]:
        self._started += 1
        log = open(self.logs / f"{self._started:02d}-{name}.log", "wb")  # noqa: SIM115 (the child keeps it)
        return subprocess.Popen([CLI, *args], env={**self._base_env, **env}, stdout=log, stderr=subprocess.STDOUT)

    def start_listener(self) -> subprocess.Popen[bytes]:
        proc = self._spawn(["listen"], {"CDC_DATABASE_URL": self.url}, "listener")
        self.listeners.append(proc)
        return proc

    def start_gateway(self, index: int) -> None:
        env = {
            **GATEWAY_ENV,
            "CDC_DATABASE_URL": self.proxied_url if index == 1 else self.url,
            "CDC_SECRET": SECRET,
            "CDC_HTTP_PORT": str(self.ports[index]),
        }
        proc = self._spawn(["serve"], env, f"gateway{index}")
        self.gateways[index] = proc
        wait_ready(self.ports[index], proc)

    def scrape(self, index: int) -> None:
        """Add gateway `index`'s counters to the run's totals (before it stops, and at the end: a restarted
        gateway counts from zero)."""
        with suppress(OSError), socket.create_connection(("127.0.0.1", self.ports[index]), timeout=5) as sock:
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            text = b"".join(iter(lambda: sock.recv(65536), b"")).decode()
            for line in text.splitlines():
                name, _, value = line.partition(" ")
                if name in GATEWAY_COUNTERS:
                    self.counters[GATEWAY_COUNTERS[name]] += float(value)

    def active_listener(self) -> subprocess.Popen[bytes] | None:
        with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
            row = conn.execute("select state, node from dashboard.listener_state").fetchone()
        if not row or row[0] != "live" or not row[1]:
            return None
        pid = int(row[1].rsplit(":", 1)[1])
        return next((p for p in self.listeners if p.pid == pid and p.poll() is None), None)

    def stop_all(self) -> None:
        for proc in [*self.gateways, *self.listeners]:
            if proc is not None:
                stop_process(proc)


# -- writers ------------------------------------------------------------------------------------------------


@dataclass
class Ledger:
    """What the writers know was committed (recorded only after COMMIT returned), per business."""

    ids: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    changes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    payments: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    bookings: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    owner: dict[str, str] = field(default_factory=dict)  # row id -> business
    # (business, table, inserted id, changes, ids) of transactions whose COMMIT raised: settled after the run
    in_doubt: list[tuple[str, str, str, int, list[str]]] = field(default_factory=list)
    committed_tx: int = 0
    failed_tx: int = 0
    long_tx: int = 0

    def record(self, business: str, table: str, inserted: str, changes: int, ids: list[str]) -> None:
        self.committed_tx += 1
        self.changes[business] += changes
        self.ids[business].update(ids)
        for row in ids:
            self.owner[row] = business
        (self.payments if table == "payments" else self.bookings)[business].append(inserted)


def affected(status: str) -> int:
    """Rows a statement wrote, from its command tag ("INSERT 0 1", "UPDATE 1"): one captured change each."""
    return int(status.rsplit(" ", 1)[1])


async def writer(
    url: str, businesses: dict[str, list[str]], ledger: Ledger, stop: asyncio.Event, rng: random.Random
) -> None:
    conn: asyncpg.Connection | None = None
    while not stop.is_set():
        try:
            if conn is None or conn.is_closed():
                conn = await asyncpg.connect(url, timeout=5)
            await asyncio.sleep(rng.uniform(0.02, 0.25))
            await transaction(conn, businesses, ledger, rng)
        except Exception:  # any failure: a cut connection surfaces as several kinds of error
            ledger.failed_tx += 1
            if conn is not None:
                conn.terminate()
            conn = None
            await asyncio.sleep(0.3)  # the server is restarting, or this session was ended
    if conn is not None:
        await conn.close()


async def transaction(
    conn: asyncpg.Connection, businesses: dict[str, list[str]], ledger: Ledger, rng: random.Random
) -> None:
    business = rng.choice(list(businesses))
    client = rng.choice([*businesses[business], None])
    inserted = str(uuid.uuid4())
    changes = 0
    ids = [inserted]
    tx = conn.transaction()
    await tx.start()
    try:
        if rng.random() < 0.65:
            table = "payments"
            status = rng.choices(["completed", "pending", "failed"], [8, 2, 1])[0]
            tag = await conn.execute(
                "insert into payments (id, business_id, client_id, amount_minor, currency, method, status, paid_at)"
                " values ($1, $2, $3, $4, $5, $6, $7, case when $7 = 'completed' then now() end)",
                uuid.UUID(inserted), uuid.UUID(business), client and uuid.UUID(client),
                rng.randint(100, 500_000), rng.choices(["KES", "USD"], [9, 1])[0], rng.choice(METHODS), status,
            )  # fmt: skip
            changes += affected(tag)
            earlier = ledger.payments[business]
            if earlier and rng.random() < 0.4:
                target = rng.choice(earlier)
                ids.append(target)
                update = rng.choice(
                    [
                        # a partial refund (never more than is left: the table refuses that)
                        "update payments set refunded_minor = least(amount_minor, refunded_minor + 5000)"
                        " where id = $1 and status = 'completed'",
                        # refunded in full
                        "update payments set refunded_minor = amount_minor, status = 'refunded'"
                        " where id = $1 and status = 'completed'",
                        # a pending payment that went through
                        "update payments set status = 'completed', paid_at = now()"
                        " where id = $1 and status = 'pending'",
                        "update payments set status = 'failed' where id = $1 and status = 'pending'",
                    ]
                )
                changes += affected(await conn.execute(update, uuid.UUID(target)))
        else:
            table = "bookings"
            tag = await conn.execute(
                "insert into bookings (id, business_id, client_id, amount_due_minor, currency, status)"
                " values ($1, $2, $3, $4, 'KES', $5)",
                uuid.UUID(inserted), uuid.UUID(business), client and uuid.UUID(client),
                rng.randint(1000, 90_000), rng.choice(BOOKING_STATUSES),
            )  # fmt: skip
            changes += affected(tag)
            earlier = ledger.bookings[business]
            if earlier and rng.random() < 0.4:
                target = rng.choice(earlier)
                ids.append(target)
                tag = await conn.execute(
                    "update bookings set payment_status = $2, status = $3 where id = $1",
                    uuid.UUID(target), rng.choice(PAYMENT_STATUSES), rng.choice(BOOKING_STATUSES),
                )  # fmt: skip
                changes += affected(tag)
        # Hold the transaction open, so transactions commit in another order than they began (and took their
        # change-log ids); a few hold for seconds, across batches of the listener and across the faults.
        if rng.random() < 0.04:
            ledger.long_tx += 1
            await asyncio.sleep(rng.uniform(2, 4))
        else:
            await asyncio.sleep(rng.uniform(0, 0.15))
    except BaseException:
        with suppress(Exception):  # the connection may be gone: then so is the transaction
            await tx.rollback()
        raise
    try:
        await tx.commit()
    except Exception:
        # Whether it committed is unknown (the server may have committed and died before answering).
        ledger.in_doubt.append((business, table, inserted, changes, ids))
        raise
    ledger.record(business, table, inserted, changes, ids)


async def settle_in_doubt(url: str, ledger: Ledger) -> int:
    """Record the in-doubt transactions that did commit (their inserted row exists); return how many did."""
    conn = await asyncpg.connect(url)
    settled = 0
    try:
        for business, table, inserted, changes, ids in ledger.in_doubt:
            if await conn.fetchval(f"select exists (select 1 from {table} where id = $1)", uuid.UUID(inserted)):
                ledger.record(business, table, inserted, changes, ids)
                settled += 1
    finally:
        await conn.close()
    return settled


# -- dashboards ---------------------------------------------------------------------------------------------


@dataclass
class Dashboard:
    business: str
    index: int
    slow: bool
    token: str
    received: list[int] = field(default_factory=list)
    listed: set[str] = field(default_factory=set)  # row ids named by the events received
    change_count: int = 0
    truncated: int = 0  # events that listed fewer changes than they counted
    out_of_order: int = 0  # an event id not above the last one: a duplicate or a reordering
    foreign: list[str] = field(default_factory=list)
    resyncs: int = 0
    connections: int = 0
    refused: int = 0
    pauses: int = 0
    full_pauses: int = 0  # pauses that ran their whole length (not ended early by the drain)
    ended_in_pause: int = 0  # paused streams that ended once read on (cut, or a gateway restart), not left
    open_after_pause: int = 0  # full pauses whose stream was still open afterwards: not cut
    pause_next: bool = False  # the next stream opened is one this (slow) client stops reading
    last_id: int = 0
    errors: list[str] = field(default_factory=list)  # this client's own failures (must be none)


def slow_socket(addr_info: Any) -> socket.socket:
    """A slow client's socket, with as little room as the kernel allows between the gateway and this client.

    The minimum receive buffer (about 2 KiB) and a small maximum segment, announced when connecting, keep the
    receiving side small. The gateway's side sizes itself: Linux grows a socket's send buffer to about three
    congestion windows of segments, and on loopback (BBR, no loss, always application-limited) the congestion
    window grows with every segment the connection has delivered: after a minute of events a stream's send
    buffer holds megabytes, a pause of a minute leaves a few hundred kilobytes waiting, and no gateway ever cut
    a slow client (the runs of 2026-12-07). So a slow client stops reading a stream it has just opened: its send
    buffer stays at tens of kilobytes, then uvicorn buffers 64 KiB, then the gateway's send blocks and it cuts
    the stream (CDC_SSE_SEND_TIMEOUT_SECONDS, or CDC_SSE_QUEUE_SIZE events waiting): about 100 KB of events."""
    family, kind, proto, _name, _addr = addr_info
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # (raised to the kernel's minimum)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
    return sock


async def dashboard(
    board: Dashboard,
    ports: list[int],
    stop: asyncio.Event,
    draining: asyncio.Event,
    rng: random.Random,
    slow_pause: float,
) -> None:
    """Follow the business's stream until `stop`, reconnecting (to the other gateway) with Last-Event-ID."""
    # A slow client's connections are never reused (each pause needs a fresh one: see slow_socket), and it
    # takes little into its own buffer once it stops reading (aiohttp stops reading the socket at 2 x 256 B).
    connector = (
        aiohttp.TCPConnector(socket_factory=slow_socket, force_close=True) if board.slow else aiohttp.TCPConnector()
    )
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=15)
    bufsize = 2**8 if board.slow else 2**12
    next_pause = time.monotonic() + rng.uniform(3, 8)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, read_bufsize=bufsize) as session:
        while not stop.is_set():
            paused = paused_in_full = False
            if board.slow and not draining.is_set() and time.monotonic() > next_pause:
                board.pause_next = True  # the stream opened now is the one it stops reading
            port = ports[(board.index + board.connections) % len(ports)]
            board.connections += 1
            headers = {"Authorization": f"Bearer {board.token}", "Last-Event-ID": str(board.last_id)}
            try:
                url = f"http://127.0.0.1:{port}/v1/businesses/{board.business}/events"
                async with session.get(url, headers=headers) as response:
                    if response.status != 200:
                        board.refused += 1  # a gateway restarting or draining: 503 with Retry-After
                        await asyncio.sleep(min(float(response.headers.get("Retry-After", "1")), 2))
                        continue
                    if board.pause_next:
                        board.pause_next = False
                        paused = True
                        full = board.full_pauses
                        await pause(board, response, draining, rng, slow_pause)
                        paused_in_full = board.full_pauses > full
                        next_pause = time.monotonic() + rng.uniform(3, 8)
                    if await read_stream(board, response, draining, next_pause if board.slow else None):
                        board.open_after_pause += paused and paused_in_full
                        continue  # it left the stream itself, to open the one it pauses: at once
                    board.ended_in_pause += paused
            except (aiohttp.ClientError, TimeoutError, ConnectionError):
                board.ended_in_pause += paused  # the gateway went away or cut the stream: resume
            except Exception as exc:  # a bug of this client: reported, and the dashboard carries on
                board.errors.append(repr(exc))
            await asyncio.sleep(rng.uniform(0.1, 0.6))


async def pause(
    board: Dashboard, response: aiohttp.ClientResponse, draining: asyncio.Event, rng: random.Random, seconds: float
) -> None:
    """Stop reading a fresh stream: the gateway's send blocks, its buffer for the stream fills, and it cuts the
    stream; the client then reads on what reached it and resumes, by Last-Event-ID, with what it missed."""
    board.pauses += 1
    try:  # (a pause ends early when the run starts draining)
        await asyncio.wait_for(draining.wait(), rng.uniform(0.8, 1.2) * seconds)
    except TimeoutError:
        board.full_pauses += 1


async def read_stream(
    board: Dashboard, response: aiohttp.ClientResponse, draining: asyncio.Event, leave_at: float | None
) -> bool:
    """Read SSE messages until the stream ends (False), or until the first message after `leave_at` (True; not
    once the run drains)."""
    lines: list[str] = []
    async for line in sse_lines(response):
        if line:
            lines.append(line)
            continue
        handle_message(board, lines)
        lines = []
        if leave_at is not None and time.monotonic() > leave_at and not draining.is_set():
            return True
    return False


async def sse_lines(response: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The stream's lines. Split here rather than by aiohttp's readline, which refuses a line longer than its
    read buffer (kept small for slow clients): an event's data line listing 100 changes is longer."""
    pending = b""
    async for chunk in response.content.iter_any():
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield line.rstrip(b"\r").decode()


def handle_message(board: Dashboard, lines: list[str]) -> None:
    kind, event_id, data = "message", None, []
    for line in lines:
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            kind = value
        elif name == "id":
            event_id = int(value)
        elif name == "data":
            data.append(value)
    if kind == "resync":
        board.resyncs += 1
    if kind != "invalidate" or event_id is None:
        return
    if event_id <= board.last_id:
        board.out_of_order += 1
        return
    board.last_id = event_id
    body = json.loads("\n".join(data))
    board.received.append(event_id)
    if body["business_id"] != board.business:
        board.foreign.append(f"event {event_id} of {body['business_id']}")
    changes = body["changes"]
    board.listed.update(c["id"] for c in changes)
    board.change_count += body["change_count"]
    if body["change_count"] > len(changes):
        board.truncated += 1


# -- faults -------------------------------------------------------------------------------------------------

TERMINATE_MAIN = """
select count(pg_terminate_backend(pid)) from pg_stat_activity where application_name = 'cdc-dashboard listener'
"""
# The leadership lock's holder (pg_advisory_lock(4242000004): classid is the key's high 32 bits, objid the low).
TERMINATE_LEADER = """
select count(pg_terminate_backend(pid)) from pg_locks
 where locktype = 'advisory' and granted and classid = 0 and objid = 4242000004 and objsubid = 1
"""


async def kill_backends(url: str, clock: Clock, stop: asyncio.Event, every: float) -> None:
    rounds = 0
    while not stop.is_set():
        await asyncio.sleep(every)
        rounds += 1
        try:
            conn = await asyncpg.connect(url, timeout=5)
            try:
                main = await conn.fetchval(TERMINATE_MAIN)
                leader = await conn.fetchval(TERMINATE_LEADER) if rounds % 2 == 0 else 0
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            continue  # the server is restarting: this round kills nothing
        clock.fault(f"listener backends terminated: {main} main" + (f", {leader} leadership" if leader else ""))


async def schedule(
    args: argparse.Namespace, clock: Clock, procs: Processes, proxy: FreezableProxy, server: Any
) -> None:
    """The one-off faults, at fixed fractions of the run."""
    seconds = args.seconds

    async def at(fraction: float) -> None:
        await asyncio.sleep(max(0.0, fraction * seconds - clock.now()))

    await at(0.15)
    clock.fault(f"gateway 1 <-> database path frozen for {args.freeze:g} s")
    await asyncio.to_thread(proxy.freeze)
    await asyncio.sleep(args.freeze)
    await asyncio.to_thread(proxy.restore)
    clock.fault("gateway 1 <-> database path restored")

    await at(0.30)
    active = await asyncio.to_thread(procs.active_listener)
    if active is None:
        clock.fault("no live listener to SIGKILL (between restarts); skipped")
    else:
        active.kill()
        await asyncio.to_thread(active.wait)
        clock.fault(f"active listener pid {active.pid} SIGKILLed (standby present)")
        fresh = await asyncio.to_thread(procs.start_listener)
        clock.fault(f"listener pid {fresh.pid} started (the new standby)")

    await at(0.45)
    if server is None:
        clock.fault("PostgreSQL restart skipped (CDC_BENCH_ADMIN_URL: the run does not own the server)")
    else:
        clock.fault("PostgreSQL restart (pg_ctl restart -m fast)")
        await asyncio.to_thread(restart_embedded, server)
        clock.fault("PostgreSQL back")

    await at(0.60)
    gateway = procs.gateways[0]
    assert gateway is not None
    await asyncio.to_thread(procs.scrape, 0)
    clock.fault("gateway 0 SIGTERM (drain)")
    await asyncio.to_thread(stop_process, gateway)
    await asyncio.to_thread(procs.start_gateway, 0)
    clock.fault("gateway 0 ready again")

    await at(0.75)
    gateway = procs.gateways[1]
    assert gateway is not None
    await asyncio.to_thread(procs.scrape, 1)
    gateway.send_signal(signal.SIGKILL)
    await asyncio.to_thread(gateway.wait)
    clock.fault("gateway 1 SIGKILLed")
    await asyncio.to_thread(procs.start_gateway, 1)
    clock.fault("gateway 1 ready again")


# -- the run ------------------------------------------------------------------------------------------------


def setup_businesses(url: str, count: int) -> dict[str, list[str]]:
    businesses: dict[str, list[str]] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        for n in range(count):
            business = str(uuid.uuid4())
            conn.execute("insert into businesses (id, name) values (%s, %s)", (business, f"Chaos Salon {n}"))
            clients = [str(uuid.uuid4()) for _ in range(4)]
            for client in clients:
                conn.execute("insert into clients (id, name) values (%s, 'Client')", (client,))
            businesses[business] = clients
    return businesses


async def wait_caught_up(url: str, boards: list[Dashboard], seconds: float) -> bool:
    """Wait until the change log is empty and every dashboard has its business's newest event."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            conn = await asyncpg.connect(url, timeout=5)
            try:
                backlog = await conn.fetchval("select count(*) from cdc.change_log")
                rows = await conn.fetch("select business_id, max(id) from dashboard.events group by business_id")
                newest: dict[str, int] = {row[0]: row[1] for row in rows}
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            await asyncio.sleep(0.5)
            continue
        if backlog == 0 and all(b.last_id >= newest.get(b.business, 0) for b in boards):
            return True
        await asyncio.sleep(0.5)
    return False


async def verify(url: str, ports: list[int], boards: list[Dashboard], ledger: Ledger) -> dict[str, Any]:
    conn = await asyncpg.connect(url)
    try:
        events: dict[str, list[int]] = defaultdict(list)
        for row in await conn.fetch("select id, business_id from dashboard.events where kind = 'invalidate'"):
            events[row["business_id"]].append(row["id"])
        dead_letters = await conn.fetchval("select count(*) from dashboard.dead_letters")
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            mismatches = await figure_mismatches(conn, [uuid.UUID(b) for b in ledger_businesses(boards)])
            expected = {b: await expected_figures(conn, uuid.UUID(b)) for b in ledger_businesses(boards)}
    finally:
        await conn.close()

    lost_events = lost_ids = by_count = miscounted = 0
    problems: list[str] = []
    for board in boards:
        missing = set(events[board.business]) - set(board.received)
        lost_events += len(missing)
        if missing:
            problems.append(f"dashboard {board.business}/{board.index} missed events {sorted(missing)[:10]}")
        unlisted = ledger.ids[board.business] - board.listed
        if unlisted and board.truncated:
            by_count += len(unlisted)  # in an event that listed only its first 100 changes: checked by count
        elif unlisted:
            lost_ids += len(unlisted)
            problems.append(f"dashboard {board.business}/{board.index} never saw rows {sorted(unlisted)[:5]}")
        if board.change_count != ledger.changes[board.business]:
            miscounted += 1
            problems.append(
                f"dashboard {board.business}/{board.index} counted {board.change_count} changes,"
                f" the writers committed {ledger.changes[board.business]}"
            )
        foreign_rows = [r for r in board.listed if ledger.owner.get(r, board.business) != board.business]
        board.foreign += [f"row {r}" for r in foreign_rows]
        problems += [f"dashboard {board.business}/{board.index}: foreign {f}" for f in board.foreign]
        problems += [f"dashboard {board.business}/{board.index}: client error {e}" for e in board.errors]

    http_mismatches = 0
    async with aiohttp.ClientSession() as session:
        for business, want in expected.items():
            token = create_token(SECRET, [business], 600)
            for port in ports:
                url_stats = f"http://127.0.0.1:{port}/v1/businesses/{business}/stats"
                async with session.get(url_stats, headers={"Authorization": f"Bearer {token}"}) as response:
                    body = await response.json()
                got = {k: v for k, v in body.items() if k not in ("business_id", "as_of_event_id")}
                if got != want or body["as_of_event_id"] < max(events[business], default=0):
                    http_mismatches += 1
                    problems.append(f"GET /stats of {business} on :{port}: {body} != {want}")
    problems += mismatches
    if dead_letters:
        problems.append(f"{dead_letters} changes set aside as dead letters")
    return {
        "lost_events": lost_events,
        "lost_ids": lost_ids,
        "ids_checked_by_count": by_count,
        "miscounted_dashboards": miscounted,
        "dup_or_out_of_order": sum(b.out_of_order for b in boards),
        "foreign": sum(len(b.foreign) for b in boards),
        "resyncs": sum(b.resyncs for b in boards),
        "figure_mismatches": len(mismatches) + http_mismatches,
        "dead_letters": dead_letters,
        "events": sum(len(v) for v in events.values()),
        "problems": problems,
    }


def ledger_businesses(boards: list[Dashboard]) -> list[str]:
    return sorted({b.business for b in boards})


async def chaos(args: argparse.Namespace, url: str, server: Any, logs: Path) -> int:
    clock = Clock()
    rng = random.Random(args.seed)
    info = conninfo_to_dict(url)
    proxy = FreezableProxy(str(info.get("host") or "127.0.0.1"), int(info.get("port") or 5432))
    proxy.start()
    user, dbname = info.get("user") or "postgres", info.get("dbname") or "postgres"
    password = f":{info['password']}" if info.get("password") else ""
    proxied_url = f"postgresql://{user}{password}@127.0.0.1:{proxy.port}/{dbname}"
    procs = Processes(url, proxied_url, logs)
    businesses = setup_businesses(url, args.businesses)
    print(f"load before: {uptime()}", flush=True)
    try:
        procs.start_listener()
        await asyncio.sleep(1)  # the first one becomes the active listener, the second the standby
        procs.start_listener()
        for index in (0, 1):
            await asyncio.to_thread(procs.start_gateway, index)
        print(f"listeners {[p.pid for p in procs.listeners]}, gateways on ports {procs.ports}; logs in {logs}")

        stop_writers, stop_dashboards, draining = asyncio.Event(), asyncio.Event(), asyncio.Event()
        boards = [
            Dashboard(b, i, slow=(i == 0), token=create_token(SECRET, [b], 7200 + i))
            for b in businesses
            for i in range(args.dashboards)
        ]
        board_tasks = [
            asyncio.create_task(
                dashboard(b, procs.ports, stop_dashboards, draining, random.Random(rng.random()), args.slow_pause)
            )
            for b in boards
        ]
        ledger = Ledger()
        clock.start = time.monotonic()
        print(f"chaos for {args.seconds:g} s: {args.writers} writers, {len(boards)} dashboards", flush=True)
        writer_tasks = [
            asyncio.create_task(writer(url, businesses, ledger, stop_writers, random.Random(rng.random())))
            for _ in range(args.writers)
        ]
        killer = asyncio.create_task(kill_backends(url, clock, stop_writers, args.kill_every))
        faults = asyncio.create_task(schedule(args, clock, procs, proxy, server))
        await asyncio.sleep(args.seconds)
        await faults  # (a restart still under way finishes first)
        stop_writers.set()
        await asyncio.gather(*writer_tasks, killer)
        wrote_for = clock.now()
        settled = await settle_in_doubt(url, ledger)
        draining.set()
        caught_up = await wait_caught_up(url, boards, args.drain)
        drained_at = clock.now()
        # A dashboard's task ends only when told to: one that ended early stopped following its stream.
        ended_early = sum(task.done() for task in board_tasks)
        stop_dashboards.set()
        for task in board_tasks:
            task.cancel()
        await asyncio.gather(*board_tasks, return_exceptions=True)
        report = await verify(url, procs.ports, boards, ledger)
        if ended_early:
            report["problems"].append(f"{ended_early} dashboards stopped following their stream before the end")
        for index in (0, 1):
            await asyncio.to_thread(procs.scrape, index)
    finally:
        procs.stop_all()
        proxy.stop()
    load_after = uptime()

    # The slow-client fault must have happened: a pause that ran its length and no cut means it was not tested.
    full_pauses = sum(b.full_pauses for b in boards)
    cuts = procs.counters[GATEWAY_COUNTERS["cdc_gateway_slow_clients_dropped_total"]]
    if full_pauses and not cuts:
        report["problems"].append(f"{full_pauses} slow-client pauses ran their full length and no gateway cut one")
    failed = (
        not caught_up
        or report["problems"]
        or any(report[k] for k in ("lost_events", "lost_ids", "dup_or_out_of_order", "foreign", "figure_mismatches"))
    )
    print("\n== chaos summary")
    print(f"writes: {wrote_for:.1f} s; drained and caught up {drained_at - wrote_for:.1f} s later ({caught_up=})")
    print(
        f"transactions: {ledger.committed_tx} committed ({ledger.long_tx} long ones), {ledger.failed_tx} failed"
        f" (rolled back or cut), {len(ledger.in_doubt)} in doubt of which {settled} had committed"
    )
    print(f"changes committed: {sum(ledger.changes.values())}; rows: {sum(len(v) for v in ledger.ids.values())}")
    print(f"events: {report['events']} over {len(businesses)} businesses; dashboards: {len(boards)}")
    print(
        f"dashboards: {sum(b.connections for b in boards) - len(boards)} reconnects,"
        f" {sum(b.refused for b in boards)} refused (503/429); resyncs {report['resyncs']};"
        f" {sum(b.truncated for b in boards)} events (per dashboard) listed only their first 100 changes"
    )
    print(
        f"slow clients: {sum(b.pauses for b in boards)} pauses ({full_pauses} of {args.slow_pause:g} s ±20% in full,"
        f" the others ended by the drain); {sum(b.ended_in_pause for b in boards)} paused streams found ended when"
        f" read on, {sum(b.open_after_pause for b in boards)} full pauses' streams still open; the gateways cut"
        f" {cuts:g} slow clients"
    )
    print("gateways: " + ", ".join(f"{name} {value:g}" for name, value in sorted(procs.counters.items())))
    print(f"faults ({len(clock.faults)}):")
    for at, what in clock.faults:
        print(f"  t={at:6.1f}s  {what}")
    print(
        f"lost events={report['lost_events']} lost rows={report['lost_ids']}"
        f" (rows checked by count: {report['ids_checked_by_count']}, miscounted dashboards:"
        f" {report['miscounted_dashboards']}) dup/out-of-order={report['dup_or_out_of_order']}"
        f" foreign={report['foreign']} figure mismatches={report['figure_mismatches']}"
        f" dead letters={report['dead_letters']}"
    )
    print(f"load after: {load_after}")
    for problem in report["problems"][:30]:
        print(f"  PROBLEM: {problem}")
    print("RESULT:", "FAIL" if failed else "PASS", flush=True)
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=240, help="how long the writers write under faults")
    parser.add_argument("--businesses", type=int, default=6)
    parser.add_argument("--dashboards", type=int, default=3, help="per business; the first is a slow client")
    parser.add_argument("--writers", type=int, default=16)
    parser.add_argument("--kill-every", type=float, default=4, help="seconds between listener backend kills")
    parser.add_argument("--freeze", type=float, default=8, help="seconds the gateway 1 <-> database path is frozen")
    parser.add_argument("--drain", type=float, default=90, help="at most this long to drain and catch up")
    parser.add_argument(
        "--slow-pause",
        type=float,
        default=45,
        help="seconds a slow client stops reading at a time",
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs after a pass too")
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="cdc-chaos-logs-"))
    if os.environ.get("CDC_BENCH_ADMIN_URL"):
        with scratch_database("cdc_chaos") as url:
            status = asyncio.run(chaos(args, url, None, logs))
    else:
        from cdc_dashboard.db.embedded import start_embedded

        state = tempfile.mkdtemp(prefix="cdc-chaos-pg-")
        server: Any = start_embedded(state, cleanup_mode="delete")
        try:
            url = server.get_uri()
            apply(url)
            status = asyncio.run(chaos(args, url, server, logs))
        finally:
            server.cleanup()
            shutil.rmtree(state, ignore_errors=True)
    if status == 0 and not args.keep_logs:
        shutil.rmtree(logs, ignore_errors=True)
    else:
        print(f"process logs kept in {logs}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
