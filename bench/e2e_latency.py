"""End to end: commit → event at an SSE client → figures at the client that include the payment, under steady load.

    .venv/bin/python bench/e2e_latency.py [--mode refetch|pushed] [--coalesce-ms 75] [--rate 500]
        [--businesses 1000] [--clients 1000] [--dashboards-per-business 1] [--seconds 30] [--payments-history 1000000]
        [--database NAME | --keep] [--src SRC] [--client-procs 2] [--writers 8] [--separate-listener]
        [--linger-ms N] [--drain 5]

Creates a scratch database on CDC_BENCH_ADMIN_URL (default postgresql://postgres@127.0.0.1:5432/postgres) and
loads bench/figures_data.sql into it with `--payments-history` payments over 10k businesses (bench/figures.py's
loader: schema, generate_series with capture triggers bypassed, aggregates built once); `--database NAME`
reuses an already loaded database instead (never dropped). Then:

1. `cdc-dashboard serve --with-listener` starts as a subprocess on a free port (`--separate-listener`:
   `cdc-dashboard listen` and `cdc-dashboard serve` as two processes), running the code of `--src` (its
   PYTHONPATH; default this checkout's `src`; e.g. an earlier version's from `git archive REV src sql`); the
   result names the `cdc_dashboard` package that environment imports;
2. `--client-procs` client processes open `--clients` SSE streams, `--dashboards-per-business` of them per
   business (so `--clients` / N businesses are followed: random ones, not the 10%-of-history business), with raw
   asyncio sockets, each with a token naming only its business, and fetch every followed business's `stats`
   once (the baseline);
3. a writer process inserts completed KES payments with `--writers` connections, paced at `--rate` per second
   for `--seconds`, each its own transaction, over `--businesses` businesses at random (the followed ones
   first); it records every payment's id, business, amount and commit time (time.time() right after the commit
   returns; one host, one clock);
4. on every `invalidate` event a client notes the arrival time and the payments it names (`changes` on
   `payments` and `payments`), and then gets the business's figures:
   - `--mode refetch` (default; what a dashboard does without pushed figures): GETs that business's `stats`
     (aiohttp, keep-alive) and notes when the answer arrived;
   - `--mode pushed`: takes `figures["dashboard-stats"]` from the event and fetches nothing. An event without
     figures (the gateway puts them on a business's last event of a batch) waits `--coalesce-ms` (75, as
     /static/realtime.js's invalidations do) for a later event of the stream with figures, which include it;
     if none comes, the client GETs `stats` once for the events waiting (a fallback, counted).

The check that the figures include the payment is exact: the figures carry `as_of_event_id`, so after the run
the expected payments_count and KES revenue total of that body are the baseline plus the payments named by
that business's events with id ≤ as_of_event_id (amounts from the writer's record). Figures count as
including the payment when as_of_event_id ≥ the event's id and both numbers equal the expectation.

Reported, per payment and dashboard (each stream of the payment's business): p50/p99/max of event arrival -
commit and of figures at the client - commit (the stats answer in refetch mode, the event's own figures in
pushed mode), the stats request alone, payments whose event never arrived (must be 0) and figures that did not
include the payment (must be 0; a stats request that failed, e.g. a 503 from an exhausted pool, counts there
too, and in `stats_errors`), the writer's pacing, `uptime` before and after, and the CPU of each process
from /proc (utime + stime): `serve`, `listen`, the PostgreSQL backends of the bench database by role (by
application_name: the listener's, the gateway's hub and pool, the writer's), the whole PostgreSQL cluster (the
postmaster, its live children and the children it reaped: other databases' work on the same server included),
the writer and the clients. CPU is given while the writer runs (% of a core) and in seconds from the writer's
start to the clients' last receipt, which also gives the gateway's CPU per delivered event (`serve` CPU ÷
events received by all clients). Before the clients stop, the run waits for the listener's backlog to reach 0
and then until the clients have received nothing for `--drain` seconds (at most 120 s in all). Exit status 0
only when both counts are 0.

Caveat: the writer, PostgreSQL, the listener, the gateway and the clients share this machine's cores; the
clients' own time to parse events and send requests is part of every latency.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psycopg

from cdc_dashboard.sqlfiles import queries
from cdc_dashboard.tokens import create_token
from figures import load  # bench/figures.py: run as a script, bench/ is on sys.path
from scratch import connection_reports, scratch_database, stop, wait_ready

ROOT = Path(__file__).resolve().parents[1]
SECRET = "bench-e2e-latency-" + "e" * 40
WRITER_APPLICATION = "bench-e2e writer"
DRIVER_APPLICATION = "bench-e2e driver"
INSERT = """
insert into payments (id, business_id, client_id, amount_minor, currency, method, status, provider,
                      provider_reference, paid_at)
values ($1, $2, $3, $4, 'KES', 'mpesa', 'completed', 'bench-e2e', $5, now())
"""


def _raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: [state, ppid, ...]; utime, stime, cutime, cstime at 11..14."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (its children not included); 0 once it has gone."""
    try:
        fields = _stat_fields(pid)
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cluster_cpu_seconds(postmaster: int) -> float:
    """CPU of a PostgreSQL cluster: the postmaster's own and its reaped children's, plus its live children's.
    A backend that exits moves from the live sum to the reaped one, so the difference of two readings is the
    cluster's CPU in between."""
    fields = _stat_fields(postmaster)
    ticks = sum(int(f) for f in fields[11:15])
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            child = _stat_fields(int(entry.name))
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(child[1]) == postmaster:
            ticks += int(child[11]) + int(child[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _postmaster(conn: psycopg.Connection[Any]) -> int | None:
    """The PostgreSQL server's postmaster on this host (the parent of this connection's backend), or None
    when the server runs elsewhere."""
    row = conn.execute("select pg_backend_pid()").fetchone()
    try:
        parent = int(_stat_fields(int(row[0]))[1]) if row else 0
        comm = Path(f"/proc/{parent}/comm").read_text().strip()
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return None
    return parent if comm in {"postgres", "postmaster"} else None


def _backend_role(application_name: str) -> str:
    if application_name.startswith("cdc-dashboard listener"):
        return "listener"
    if application_name.startswith("cdc-dashboard gateway") or application_name == "":
        return "gateway"  # its hub's connection, and its pool's (asyncpg's default: no application_name)
    return "other"


def _backends(conn: psycopg.Connection[Any]) -> dict[int, str]:
    """The bench database's backends (pid → role), the bench's own connections left out."""
    rows = conn.execute(
        "select pid, coalesce(application_name, '') from pg_stat_activity"
        " where datname = current_database() and backend_type = 'client backend'"
        " and application_name not in (%s, %s)",
        (WRITER_APPLICATION, DRIVER_APPLICATION),
    ).fetchall()
    return {int(pid): _backend_role(name) for pid, name in rows}


def _machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = ticks[3] + ticks[4]
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK"), sum(ticks) / os.sysconf("SC_CLK_TCK")


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


# -- client process: SSE streams, and the figures each event brings or makes it fetch -------------------------


def _parse_message(message: bytes) -> tuple[str, int | None, str]:
    """One SSE message (lines, `\\n`-separated) → (event type, id, data)."""
    kind, event_id, data = "message", None, []
    for line in message.decode().split("\n"):
        if not line or line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            kind = value
        elif field == "id":
            event_id = int(value)
        elif field == "data":
            data.append(value)
    return kind, event_id, "\n".join(data)


def _numbers(body: dict[str, Any]) -> tuple[int, int, int]:
    """(as_of_event_id, payments_count, KES revenue total) of a `stats` body."""
    return body["as_of_event_id"], body["payments_count"], body["revenue"].get("KES", {}).get("total_minor", 0)


async def _client(config: dict[str, Any]) -> None:
    """Open the streams, fetch the baselines, say so on stdout, then record until stdin says stop."""
    port: int = config["port"]
    pushed_mode = config["mode"] == "pushed"
    base = f"http://127.0.0.1:{port}"
    wanted: list[str] = config["streams"]  # "business/k", the k-th dashboard of that business
    tokens = {s.split("/")[0]: create_token(SECRET, [s.split("/")[0]], 7200) for s in wanted}
    baseline: dict[str, list[Any]] = {}
    events: list[list[Any]] = []  # [stream, event id, arrival, [payment ids], change_count, has figures]
    # [stream, event id, as_of, payments_count, KES total, asked, answered, status, "pushed" | "fetched"]
    figures: list[list[Any]] = []
    failures = requests = 0  # requests: the stats GETs made on events
    streams: dict[str, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
    fetches: set[asyncio.Task[None]] = set()

    async def connect(stream: str) -> None:
        nonlocal failures
        business = stream.split("/")[0]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                f"GET /v1/businesses/{business}/events HTTP/1.1\r\nHost: bench\r\n"
                f"Authorization: Bearer {tokens[business]}\r\nAccept: text/event-stream\r\n\r\n".encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200") or b"chunked" not in head.lower():
                raise RuntimeError(head[:60])
            streams[stream] = (reader, writer)
        except Exception:
            failures += 1

    async def get_stats(session: aiohttp.ClientSession, business: str) -> tuple[int, dict[str, Any]]:
        headers = {"Authorization": f"Bearer {tokens[business]}"}
        async with session.get(f"{base}/v1/businesses/{business}/stats", headers=headers) as r:
            body = await r.read()
            return r.status, (json.loads(body) if r.status == 200 else {})

    async def fetch(session: aiohttp.ClientSession, stream: str, event_ids: list[int]) -> None:
        """GET the stats for these events of the stream (one request: the answer must include them all)."""
        nonlocal requests
        requests += 1
        asked = time.time()
        try:
            status, body = await get_stats(session, stream.split("/")[0])
        except Exception:
            status, body = -1, {}
        answered = time.time()
        as_of, count, total = _numbers(body) if status == 200 else (-1, -1, -1)
        for event_id in event_ids:
            figures.append([stream, event_id, as_of, count, total, asked, answered, status, "fetched"])

    def start_fetch(session: aiohttp.ClientSession, stream: str, event_ids: list[int]) -> None:
        task = asyncio.create_task(fetch(session, stream, event_ids))
        fetches.add(task)
        task.add_done_callback(fetches.discard)

    async def read(session: aiohttp.ClientSession, stream: str, reader: asyncio.StreamReader) -> None:
        buffer = b""
        # Pushed mode, as /static/realtime.js does: an event without figures waits `coalesce_ms` for a later
        # one with figures (which include it); the stats are fetched only if none comes.
        waiting: list[int] = []
        timer: asyncio.TimerHandle | None = None

        def fall_back() -> None:
            nonlocal timer
            timer = None
            start_fetch(session, stream, waiting.copy())
            waiting.clear()

        while True:
            size_line = await reader.readline()  # chunked transfer encoding: size, chunk, CRLF
            if not size_line:
                return
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                return
            chunk = await reader.readexactly(size + 2)
            arrival = time.time()
            buffer += chunk[:-2].replace(b"\r\n", b"\n")
            *messages, buffer = buffer.split(b"\n\n")
            for message in messages:
                kind, event_id, data = _parse_message(message)
                if kind != "invalidate" or event_id is None:
                    continue
                body = json.loads(data)
                named = {c["id"] for c in body.get("changes", []) if c.get("table") == "payments"}
                named |= {p["id"] for p in body.get("payments", [])}
                pushed = body.get("figures", {}).get("dashboard-stats")
                events.append([stream, event_id, arrival, sorted(named), body.get("change_count", 0), bool(pushed)])
                if not pushed_mode:
                    start_fetch(session, stream, [event_id])
                elif pushed is None:
                    waiting.append(event_id)
                    if timer is None:
                        timer = asyncio.get_running_loop().call_later(config["coalesce_ms"] / 1000, fall_back)
                else:
                    at = time.time()
                    as_of, count, total = _numbers(pushed)
                    for covered in [*waiting, event_id]:
                        figures.append([stream, covered, as_of, count, total, arrival, at, 200, "pushed"])
                    waiting.clear()
                    if timer is not None:
                        timer.cancel()
                        timer = None

    for start in range(0, len(wanted), 100):
        await asyncio.gather(*(connect(s) for s in wanted[start : start + 100]))
    businesses = sorted({s.split("/")[0] for s in wanted})
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
        for start in range(0, len(businesses), 50):
            answers = await asyncio.gather(*(get_stats(session, b) for b in businesses[start : start + 50]))
            for b, (status, body) in zip(businesses[start : start + 50], answers, strict=True):
                if status == 200:
                    baseline[b] = list(_numbers(body))
                else:
                    failures += 1
        print(json.dumps({"connected": len(streams), "failures": failures}), flush=True)
        readers = [asyncio.create_task(read(session, s, r)) for s, (r, _w) in streams.items()]

        async def progress() -> None:  # what the driver watches to know when the run has gone quiet
            path = Path(config["out"] + ".progress")
            while True:
                # Replaced whole, never rewritten in place: the driver must not read a half-written file as news.
                await asyncio.to_thread(path.with_suffix(".tmp").write_text, f"{len(events)} {len(figures)}")
                await asyncio.to_thread(path.with_suffix(".tmp").replace, path)
                await asyncio.sleep(0.25)

        reporter = asyncio.create_task(progress())
        await asyncio.to_thread(sys.stdin.readline)  # the driver says stop
        reporter.cancel()
        for task in readers:
            task.cancel()
        if fetches:
            await asyncio.wait(set(fetches), timeout=10)
    for _r, writer in streams.values():
        writer.close()
    out = {
        "streams": sorted(streams),
        "baseline": baseline,
        "events": events,
        "figures": figures,
        "failures": failures,
        "stats_requests": requests,
    }
    await asyncio.to_thread(Path(config["out"]).write_text, json.dumps(out))


# -- writer process -----------------------------------------------------------------------------------------


def writer_command(
    workdir: Path, *, url: str, businesses: list[str], clients: list[str], rate: float, seconds: float, writers: int
) -> tuple[list[str], Path]:
    """The command that runs this script's writer role (used by soak.py and rolling_deploy.py too), and the
    file it writes its record of payments to (its CPU goes to that path + ".cpu")."""
    out = workdir / "writer.json"
    config = workdir / "writer-config.json"
    settings = {"url": url, "businesses": businesses, "clients": clients, "rate": rate, "seconds": seconds}
    config.write_text(json.dumps({**settings, "writers": writers, "out": str(out)}))
    return [sys.executable, str(Path(__file__).resolve()), "--role", "writer", str(config)], out


async def _writer(config: dict[str, Any]) -> None:
    """Insert completed payments at `rate` per second for `seconds` over `writers` connections; note its own CPU
    and its backends' in `out`.cpu (they exit with it, before the driver could read them)."""
    rate: float = config["rate"]
    total = int(rate * config["seconds"])
    businesses = [uuid.UUID(b) for b in config["businesses"]]
    clients = [uuid.UUID(c) for c in config["clients"]]
    settings = {"application_name": WRITER_APPLICATION}
    conns = [await asyncpg.connect(config["url"], server_settings=settings) for _ in range(config["writers"])]
    backends = [conn.get_server_pid() for conn in conns]
    records: list[list[Any]] = []  # [payment id, business, amount, commit time, commit - due]
    counter = itertools.count()
    cpu_before, backends_before = time.process_time(), sum(_cpu_seconds(pid) for pid in backends)
    start = time.monotonic() + 0.2
    wall_start = time.time() + 0.2

    async def work(conn: asyncpg.Connection) -> None:
        while (i := next(counter)) < total:
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            payment = uuid.uuid4()
            business = random.choice(businesses)
            client = random.choice(clients) if random.random() < 0.9 else None
            amount = 100 * random.randint(1, 5000)
            await conn.execute(INSERT, payment, business, client, amount, str(payment))
            committed = time.time()
            records.append([str(payment), str(business), amount, committed, committed - (wall_start + i / rate)])

    try:
        await asyncio.gather(*(work(c) for c in conns))
        cpu = time.process_time() - cpu_before
        backends_cpu = sum(_cpu_seconds(pid) for pid in backends) - backends_before
    finally:
        for conn in conns:
            await conn.close()
    await asyncio.to_thread(Path(config["out"]).write_text, json.dumps(records))  # also read by soak, rolling_deploy
    used = {"cpu_s": cpu, "backends_cpu_s": backends_cpu}
    await asyncio.to_thread(Path(config["out"] + ".cpu").write_text, json.dumps(used))


# -- driver -------------------------------------------------------------------------------------------------


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(1000 * ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))], 2)


def _summary(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "p50_ms": _pct(values, 50), "p99_ms": _pct(values, 99), "max_ms": _pct(values, 100)}


def _analyse(
    records: list[list[Any]],
    outputs: list[dict[str, Any]],
    followed: set[str],
    seconds: float,
    created: dict[int, float],
) -> dict[str, Any]:
    """Per payment and dashboard: each stream of the payment's business. Payments to businesses without a stream
    (`--businesses` more than the followed ones) are written but not followed."""
    committed = {pid: (business, amount, at) for pid, business, amount, at, _lag in records if business in followed}
    baseline: dict[str, list[Any]] = {}
    streams_of: dict[str, list[str]] = defaultdict(list)
    events: list[list[Any]] = []
    answers: dict[tuple[str, int], list[Any]] = {}  # (stream, event id) → the figures the client took for it
    for out in outputs:
        baseline.update(out["baseline"])
        for stream in out["streams"]:
            streams_of[stream.split("/")[0]].append(stream)
        events += out["events"]
        answers.update({(f[0], f[1]): f for f in out["figures"]})
    first: dict[tuple[str, str], tuple[int, float]] = {}  # (stream, payment) → (event id, arrival) naming it
    named_by: dict[str, dict[int, list[str]]] = defaultdict(dict)  # business → event id → payments it names
    truncated = 0
    for stream, event_id, arrival, named, change_count, _pushed in sorted(events, key=lambda e: e[2]):
        named_by[stream.split("/")[0]][event_id] = named
        truncated += change_count > len(named)
        for pid in named:
            first.setdefault((stream, pid), (event_id, arrival))

    expected: dict[tuple[str, int], tuple[int, int]] = {}

    def expectation(business: str, as_of: int) -> tuple[int, int]:
        """(payments_count, KES total) the business's figures must show as of event `as_of`."""
        if (business, as_of) not in expected:
            seen = {p for eid, named in named_by[business].items() if eid <= as_of for p in named if p in committed}
            count, total = baseline[business][1], baseline[business][2]
            expected[business, as_of] = (count + len(seen), total + sum(committed[p][1] for p in seen))
        return expected[business, as_of]

    def includes(answer: list[Any]) -> bool:
        stream, event_id, as_of, count, total, _asked, _answered, status, _source = answer
        business = stream.split("/")[0]
        if status != 200 or as_of < event_id or business not in baseline:
            return False
        return (count, total) == expectation(business, as_of)

    event_lat, figures_lat, missing, wrong = [], [], 0, 0
    to_listener, to_client = [], []
    checked: dict[tuple[str, int], bool] = {}
    for pid, (business, _amount, at) in committed.items():
        for stream in streams_of[business]:
            if (stream, pid) not in first:
                missing += 1
                continue
            event_id, arrival = first[stream, pid]
            event_lat.append(arrival - at)
            if event_id in created:
                to_listener.append(created[event_id] - at)
                to_client.append(arrival - created[event_id])
            answer = answers.get((stream, event_id))
            if answer is None:
                wrong += 1
                continue
            if (stream, event_id) not in checked:
                checked[stream, event_id] = includes(answer)
            if checked[stream, event_id]:
                figures_lat.append(answer[6] - at)
            else:
                wrong += 1
    fetched = [a for a in answers.values() if a[8] == "fetched"]
    lags = [r[4] for r in records]
    return {
        "payments_committed": len(records),
        "payments_followed": len(committed),
        "writer_rate_per_s": round(len(records) / seconds, 1),
        "writer_lag_behind_schedule": _summary(lags),
        "events_received": len(events),
        "events_with_figures": sum(1 for e in events if e[5]),
        "events_truncated": truncated,
        "event_arrival_minus_commit": _summary(event_lat),
        "event_part_commit_to_listener_txn_start": _summary(to_listener),
        "event_part_listener_txn_start_to_arrival": _summary(to_client),
        "figures_at_client_minus_commit": _summary(figures_lat),
        "figures_pushed": len(answers) - len(fetched),
        "figures_fetched": len(fetched),
        "stats_request_alone": _summary([a[6] - a[5] for a in fetched if a[7] == 200]),
        "stats_errors": sum(1 for a in fetched if a[7] != 200),
        "payments_without_event": missing,
        "figures_not_including_payment": wrong,
    }


@dataclass
class _CpuReading:
    """CPU seconds used so far by the services, the clients, the bench database's backends and the cluster."""

    processes: dict[int, float]
    backends: dict[int, tuple[str, float]]
    cluster: float | None
    at: float


def _read_cpu(pids: list[int], conn: psycopg.Connection[Any], postmaster: int | None) -> _CpuReading:
    backends = {pid: (role, _cpu_seconds(pid)) for pid, role in _backends(conn).items()}
    cluster = _cluster_cpu_seconds(postmaster) if postmaster is not None else None
    return _CpuReading({pid: _cpu_seconds(pid) for pid in pids}, backends, cluster, time.monotonic())


def _cpu_between(before: _CpuReading, after: _CpuReading, roles: dict[int, str]) -> dict[str, float]:
    """CPU seconds per role between two readings; a backend that appeared in between counts from 0, one that
    left is lost (the writer's are read by the writer itself)."""
    used: dict[str, float] = defaultdict(float)
    for pid, role in roles.items():
        used[role] += after.processes[pid] - before.processes[pid]
    for pid, (role, seconds) in after.backends.items():
        used[f"postgres backends: {role}"] += seconds - before.backends.get(pid, (role, 0.0))[1]
    if after.cluster is not None and before.cluster is not None:
        used["postgres cluster, all processes"] = after.cluster - before.cluster
    return dict(used)


def _connect(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=True, application_name=DRIVER_APPLICATION)


def run(url: str, args: argparse.Namespace) -> int:
    with _connect(url) as conn:
        businesses = [
            str(r[0])
            for r in conn.execute(
                "select id from businesses where name <> 'Business 1' order by random() limit %s", (args.businesses,)
            )
        ]
        clients = [str(r[0]) for r in conn.execute("select id from clients order by random() limit 1000")]
        history = conn.execute("select count(*) from payments").fetchone()
    print(f"history: {history[0] if history else 0} payments; {len(businesses)} businesses", flush=True)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
    env.update(CDC_DATABASE_URL=url, CDC_SECRET=SECRET, CDC_HTTP_PORT=str(port), CDC_LOG_LEVEL="WARNING")
    env["PYTHONPATH"] = str(args.src.resolve())
    # Every dashboard is simulated from 127.0.0.1: the per-address limit would hold back the measured opens.
    env.update(CDC_RATE_LIMIT_STREAM_OPENS_PER_MINUTE="0", CDC_RATE_LIMIT_WEBHOOKS_PER_MINUTE="0")
    if args.linger_ms is not None:
        env["CDC_LISTENER_LINGER_MS"] = str(args.linger_ms)
    cli = str(Path(sys.executable).parent / "cdc-dashboard")
    # The package the services import, with their environment and their interpreter (the `cdc-dashboard` script's).
    service_code = subprocess.run(
        [sys.executable, "-c", "import cdc_dashboard; print(cdc_dashboard.__file__)"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    print(f"services run {service_code}", flush=True)
    procs: list[subprocess.Popen[Any]] = []
    roles: dict[int, str] = {}
    workdir = Path(tempfile.mkdtemp(prefix="e2e-latency-"))
    log = (workdir / "services.log").open("wb")
    try:
        if args.separate_listener:
            listener = subprocess.Popen([cli, "listen"], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            procs.append(listener)
            roles[listener.pid] = "listen"
            command = [cli, "serve"]
        else:
            command = [cli, "serve", "--with-listener"]
        gateway = subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_raise_fd_limit
        )
        procs.append(gateway)
        roles[gateway.pid] = "serve"
        wait_ready(port, gateway)
        time.sleep(2)  # the listener's first catch-up (nothing to catch up: the history bypassed capture)

        per_business = args.dashboards_per_business
        followed = businesses[: args.clients // per_business]
        streams = [f"{b}/{k}" for b in followed for k in range(per_business)]
        shares = [streams[i :: args.client_procs] for i in range(args.client_procs)]
        outs = [workdir / f"client-{i}.json" for i in range(args.client_procs)]
        client_procs: list[subprocess.Popen[str]] = []
        for share, out in zip(shares, outs, strict=True):
            config = workdir / f"{out.stem}-config.json"
            config.write_text(
                json.dumps(
                    {
                        "port": port,
                        "streams": share,
                        "mode": args.mode,
                        "coalesce_ms": args.coalesce_ms,
                        "out": str(out),
                    }
                )
            )
            client = subprocess.Popen(
                [sys.executable, __file__, "--role", "client", str(config)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            client_procs.append(client)
            roles[client.pid] = "clients"
        procs += client_procs
        connected, failures = connection_reports(client_procs)
        print(f"{connected} streams connected, {failures} failures", flush=True)

        writer, writer_out = writer_command(
            workdir,
            url=url,
            businesses=businesses,
            clients=clients,
            rate=args.rate,
            seconds=args.seconds,
            writers=args.writers,
        )
        load_before = _uptime()
        print(f"before: {load_before}", flush=True)
        with _connect(url) as conn:
            postmaster = _postmaster(conn)
            pids = list(roles)
            cpu_start = _read_cpu(pids, conn, postmaster)
            busy_before, total_before = _machine_busy_seconds()
            subprocess.run(writer, check=True)
            writer_done = time.time()
            busy_after, total_after = _machine_busy_seconds()
            cpu_writer_end = _read_cpu(pids, conn, postmaster)
            load_after = _uptime()
            # Drain: until the listener has turned every captured change into events (backlog 0), then until no
            # client has received an event or figures for --drain seconds (at most 120 s in all). The CPU
            # reading taken when the clients' progress last moved closes the per-delivered-event window.
            backlog_started = time.monotonic()
            while True:
                row = conn.execute(queries("gateway")["listener_lag"]).fetchone()
                if (row is not None and row[0] == 0) or time.monotonic() - backlog_started > 120:
                    break
                time.sleep(0.1)
            backlog_seconds = time.monotonic() - backlog_started
            backlog_left = row[0] if row is not None else None
            progress, quiet_since = "", time.monotonic()
            cpu_last_receipt = _read_cpu(pids, conn, postmaster)
            while time.monotonic() - quiet_since < args.drain and time.monotonic() - backlog_started < 120:
                time.sleep(0.25)
                now = "|".join(Path(f"{out}.progress").read_text() for out in outs)
                if now != progress:
                    progress, quiet_since = now, time.monotonic()
                    cpu_last_receipt = _read_cpu(pids, conn, postmaster)
            drained_seconds = time.monotonic() - backlog_started
        for proc in client_procs:
            assert proc.stdin is not None
            proc.stdin.write("stop\n")
            proc.stdin.flush()
        for proc in client_procs:
            proc.wait(120)
        records = json.loads(writer_out.read_text())
        written = json.loads(Path(f"{writer_out}.cpu").read_text())
        outputs = [json.loads(out.read_text()) for out in outs]
        # Where the time goes: an event row's created_at is now() of the listener transaction that appended it.
        event_ids = sorted({e[1] for out in outputs for e in out["events"]})
        with _connect(url) as conn:
            created = {
                int(r[0]): float(r[1])
                for r in conn.execute(
                    "select id, extract(epoch from created_at) from dashboard.events where id = any(%s)", (event_ids,)
                )
            }
        analysis = _analyse(records, outputs, set(followed), args.seconds, created)
        writing = cpu_writer_end.at - cpu_start.at
        while_writing = _cpu_between(cpu_start, cpu_writer_end, roles)
        while_writing["writer"] = written["cpu_s"]
        while_writing["postgres backends: writer"] = written["backends_cpu_s"]
        to_last = _cpu_between(cpu_start, cpu_last_receipt, roles)
        to_last["writer"] = written["cpu_s"]
        to_last["postgres backends: writer"] = written["backends_cpu_s"]
        delivered = analysis["events_received"]
        gateway_side = to_last["serve"] + to_last.get("postgres backends: gateway", 0.0)
        result = {
            "command": " ".join(sys.argv),
            "client_mode": args.mode,
            "service_code": service_code,
            "services": "listen + serve" if args.separate_listener else "serve --with-listener",
            "listener_linger_ms": "default" if args.linger_ms is None else args.linger_ms,
            "history_payments": history[0] if history else 0,
            "followed_businesses": len(followed),
            "dashboards_per_business": per_business,
            "streams": connected,
            "connect_failures": failures + sum(o["failures"] for o in outputs),
            "writer_seconds": round(writing, 1),
            "backlog_drained_after_writer_s": round(backlog_seconds, 1),
            "backlog_left": backlog_left,
            "quiet_after_writer_s": round(drained_seconds - args.drain, 1),
            "last_receipt_after_writer_s": round(
                max(
                    [e[2] for o in outputs for e in o["events"]] + [f[6] for o in outputs for f in o["figures"]],
                    default=writer_done,
                )
                - writer_done,
                2,
            ),
            "machine_cpu_busy_while_writing": f"{100 * (busy_after - busy_before) / (total_after - total_before):.0f}%",
            "cpu_while_writing_pct_of_a_core": {
                k: round(100 * v / writing, 1) for k, v in sorted(while_writing.items())
            },
            "cpu_to_last_receipt_s": {k: round(v, 2) for k, v in sorted(to_last.items())},
            "to_last_receipt_s": round(cpu_last_receipt.at - cpu_start.at, 1),
            "gateway_cpu_per_delivered_event_us": round(1e6 * to_last["serve"] / delivered, 1) if delivered else None,
            "gateway_and_its_backends_cpu_per_delivered_event_us": (
                round(1e6 * gateway_side / delivered, 1) if delivered else None
            ),
            **analysis,
            "stats_requests_on_events": sum(o["stats_requests"] for o in outputs),
            "pushed_mode_fallback_fetches": (
                sum(o["stats_requests"] for o in outputs) if args.mode == "pushed" else None
            ),
            "uptime_before": load_before,
            "uptime_after": load_after,
        }
        print(json.dumps(result, indent=2), flush=True)
        return 0 if result["payments_without_event"] == 0 and result["figures_not_including_payment"] == 0 else 1
    finally:
        for proc in reversed(procs):
            stop(proc)
        log.close()
        tail = (workdir / "services.log").read_text(errors="replace").splitlines()[-20:]
        if tail:
            print("services log (last lines):\n" + "\n".join(tail), file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--mode",
        choices=["refetch", "pushed"],
        default="refetch",
        help="refetch: GET /stats on every event (default); pushed: the event's figures, GET only when it has none",
    )
    parser.add_argument(
        "--coalesce-ms",
        type=float,
        default=75,
        help="pushed mode: how long an event without figures waits for one with them (realtime.js's 75 ms)",
    )
    parser.add_argument("--rate", type=float, default=500, help="payments per second (default 500)")
    parser.add_argument("--businesses", type=int, default=1000, help="businesses the payments go to (default 1000)")
    parser.add_argument("--clients", type=int, default=1000, help="SSE streams in all (default 1000)")
    parser.add_argument(
        "--dashboards-per-business",
        type=int,
        default=1,
        help="streams per followed business (default 1): --clients / N businesses are followed",
    )
    parser.add_argument("--seconds", type=float, default=30, help="how long the writer runs (default 30)")
    parser.add_argument("--payments-history", type=int, default=1_000_000, help="payments loaded first (default 1M)")
    parser.add_argument("--database", help="reuse this already loaded database (never dropped)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    parser.add_argument(
        "--src", type=Path, default=ROOT / "src", help="the `src` whose listen and serve run (default this checkout's)"
    )
    parser.add_argument("--client-procs", type=int, default=2, help="client processes sharing the streams")
    parser.add_argument("--writers", type=int, default=8, help="writer connections (default 8)")
    parser.add_argument("--drain", type=float, default=5, help="stop after this many quiet seconds (default 5)")
    parser.add_argument("--separate-listener", action="store_true", help="`listen` and `serve` as two processes")
    parser.add_argument("--linger-ms", type=float, help="CDC_LISTENER_LINGER_MS for the listener (default: its own)")
    parser.add_argument("--role", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    _raise_fd_limit()
    if args.role:
        role, config_path = args.role
        config = json.loads(Path(config_path).read_text())
        asyncio.run(_client(config) if role == "client" else _writer(config))
        return 0
    if args.dashboards_per_business < 1 or args.clients % args.dashboards_per_business:
        parser.error("--clients must be a multiple of --dashboards-per-business (≥ 1)")
    if args.clients // args.dashboards_per_business > args.businesses:
        parser.error("--clients / --dashboards-per-business cannot exceed --businesses")
    if args.businesses > 9999:
        parser.error("--businesses: the history has 9,999 businesses besides the large one")
    if not (args.src / "cdc_dashboard").is_dir():
        parser.error(f"--src: no cdc_dashboard package in {args.src}")

    def prepare(url: str) -> None:
        load(url, args.payments_history)

    with scratch_database("bench_e2e", reuse=args.database, keep=args.keep, prepare=prepare) as url:
        return run(url, args)


if __name__ == "__main__":
    sys.exit(main())
