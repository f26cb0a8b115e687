"""End to end: commit → event at an SSE client → `GET /stats` that includes the payment, under steady load.

    .venv/bin/python bench/e2e_latency.py [--rate 500] [--businesses 1000] [--clients 1000] [--seconds 30]
        [--payments-history 1000000] [--database NAME | --keep] [--client-procs 2] [--writers 8]
        [--separate-listener] [--linger-ms N] [--drain 5]

Creates a scratch database on CDC_BENCH_ADMIN_URL (default postgresql://postgres@127.0.0.1:5432/postgres) and
loads bench/figures_data.sql into it with `--payments-history` payments over 10k businesses (bench/figures.py's
loader: schema, generate_series with capture triggers bypassed, aggregates built once); `--database NAME`
reuses an already loaded database instead (never dropped). Then:

1. `cdc-dashboard serve --with-listener` starts as a subprocess on a free port (`--separate-listener`:
   `cdc-dashboard listen` and `cdc-dashboard serve` as two processes);
2. `--client-procs` client processes open `--clients` SSE streams, one per business (`--businesses` random
   ones, not the 10%-of-history business), with raw asyncio sockets, each with a token naming only its
   business, and fetch every business's `stats` once (the baseline);
3. a writer process inserts completed KES payments with `--writers` connections, paced at `--rate` per second
   for `--seconds`, each its own transaction, over those businesses at random; it records every payment's id,
   business, amount and commit time (time.time() right after the commit returns; one host, one clock);
4. on every `invalidate` event a client notes the arrival time and the payments it names (`changes` on
   `payments` and `payments`), and GETs that business's `stats` (aiohttp, keep-alive) noting when the answer
   arrived.

The check that the figures include the payment is exact: the stats carry `as_of_event_id`, so after the run
the expected payments_count and KES revenue total of that answer are the baseline plus the payments named by
that business's events with id ≤ as_of_event_id (amounts from the writer's record). An answer counts as
including the payment when as_of_event_id ≥ the event's id and both figures equal the expectation.

Reported: p50/p99/max of event arrival - commit and of stats answer - commit (per payment, the first event
naming it and the stats fetched on it), the stats request alone, payments whose event never arrived (must be
0) and stats answers that did not include the payment (must be 0), the writer's pacing and `uptime` before and
after. Before the clients stop, the run waits for the listener's backlog to reach 0 and then until the
clients have received nothing for `--drain` seconds (at most 120 s in all). Exit status 0 only when both
counts are 0.

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
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psycopg

from cdc_dashboard.sqlfiles import queries
from cdc_dashboard.tokens import create_token
from figures import load  # bench/figures.py: run as a script, bench/ is on sys.path
from scratch import connection_reports, scratch_database, wait_ready

ROOT = Path(__file__).resolve().parents[1]
SECRET = "bench-e2e-latency-" + "e" * 40
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


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (its children not included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = ticks[3] + ticks[4]
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK"), sum(ticks) / os.sysconf("SC_CLK_TCK")


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


# -- client process: SSE streams and stats fetches ----------------------------------------------------------


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


async def _client(config: dict[str, Any]) -> None:
    """Open one stream per business, fetch the baselines, say so on stdout, then record until stdin says stop."""
    port: int = config["port"]
    base = f"http://127.0.0.1:{port}"
    tokens = {b: create_token(SECRET, [b], 7200) for b in config["businesses"]}
    baseline: dict[str, list[Any]] = {}
    events: list[list[Any]] = []  # [business, event id, arrival, [payment ids], change_count]
    stats: list[list[Any]] = []  # [business, event id, as_of, payments_count, KES total, sent, answered, status]
    failures = 0
    streams: dict[str, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
    fetches: set[asyncio.Task[None]] = set()

    async def connect(business: str) -> None:
        nonlocal failures
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                f"GET /v1/businesses/{business}/events HTTP/1.1\r\nHost: bench\r\n"
                f"Authorization: Bearer {tokens[business]}\r\nAccept: text/event-stream\r\n\r\n".encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200") or b"chunked" not in head.lower():
                raise RuntimeError(head[:60])
            streams[business] = (reader, writer)
        except Exception:
            failures += 1

    async def get_stats(session: aiohttp.ClientSession, business: str) -> tuple[int, dict[str, Any]]:
        headers = {"Authorization": f"Bearer {tokens[business]}"}
        async with session.get(f"{base}/v1/businesses/{business}/stats", headers=headers) as r:
            body = await r.read()
            return r.status, (json.loads(body) if r.status == 200 else {})

    def figures(body: dict[str, Any]) -> tuple[int, int, int]:
        return body["as_of_event_id"], body["payments_count"], body["revenue"].get("KES", {}).get("total_minor", 0)

    async def fetch(session: aiohttp.ClientSession, business: str, event_id: int) -> None:
        sent = time.time()
        try:
            status, body = await get_stats(session, business)
        except Exception:
            status, body = -1, {}
        answered = time.time()
        as_of, count, total = figures(body) if status == 200 else (-1, -1, -1)
        stats.append([business, event_id, as_of, count, total, sent, answered, status])

    async def read(session: aiohttp.ClientSession, business: str, reader: asyncio.StreamReader) -> None:
        buffer = b""
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
                events.append([business, event_id, arrival, sorted(named), body.get("change_count", 0)])
                task = asyncio.create_task(fetch(session, business, event_id))
                fetches.add(task)
                task.add_done_callback(fetches.discard)

    businesses: list[str] = config["businesses"]
    for start in range(0, len(businesses), 100):
        await asyncio.gather(*(connect(b) for b in businesses[start : start + 100]))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
        for start in range(0, len(businesses), 50):
            answers = await asyncio.gather(*(get_stats(session, b) for b in businesses[start : start + 50]))
            for b, (status, body) in zip(businesses[start : start + 50], answers, strict=True):
                if status == 200:
                    baseline[b] = list(figures(body))
                else:
                    failures += 1
        print(json.dumps({"connected": len(streams), "failures": failures}), flush=True)
        readers = [asyncio.create_task(read(session, b, r)) for b, (r, _w) in streams.items()]

        async def progress() -> None:  # what the driver watches to know when the run has gone quiet
            while True:
                await asyncio.to_thread(Path(config["out"] + ".progress").write_text, f"{len(events)} {len(stats)}")
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
    out = {"baseline": baseline, "events": events, "stats": stats, "failures": failures}
    await asyncio.to_thread(Path(config["out"]).write_text, json.dumps(out))


# -- writer process -----------------------------------------------------------------------------------------


async def _writer(config: dict[str, Any]) -> None:
    """Insert completed payments at `rate` per second for `seconds` over `writers` connections."""
    rate: float = config["rate"]
    total = int(rate * config["seconds"])
    businesses = [uuid.UUID(b) for b in config["businesses"]]
    clients = [uuid.UUID(c) for c in config["clients"]]
    conns = [await asyncpg.connect(config["url"]) for _ in range(config["writers"])]
    records: list[list[Any]] = []  # [payment id, business, amount, commit time, commit - due]
    counter = itertools.count()
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
    finally:
        for conn in conns:
            await conn.close()
    await asyncio.to_thread(Path(config["out"]).write_text, json.dumps(records))


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
    watched: set[str],
    seconds: float,
    created: dict[int, float],
) -> dict[str, Any]:
    """Payments to businesses without a stream (`--clients` < `--businesses`) are written but not followed."""
    committed = {pid: (business, amount, at) for pid, business, amount, at, _lag in records if business in watched}
    baseline: dict[str, list[Any]] = {}
    events: list[list[Any]] = []
    stats: dict[int, list[Any]] = {}  # event id → the stats answer fetched on it
    for out in outputs:
        baseline.update(out["baseline"])
        events += out["events"]
        stats.update({s[1]: s for s in out["stats"]})
    first: dict[str, tuple[int, float]] = {}  # payment → (event id, arrival) of the first event naming it
    per_business: dict[str, list[tuple[int, list[str]]]] = defaultdict(list)
    truncated = 0
    for business, event_id, arrival, named, change_count in sorted(events, key=lambda e: e[2]):
        per_business[business].append((event_id, named))
        truncated += change_count > len(named)
        for pid in named:
            if pid not in first:
                first[pid] = (event_id, arrival)
    for history in per_business.values():
        history.sort()

    def includes(answer: list[Any]) -> bool:
        business, event_id, as_of, count, total, _sent, _answered, status = answer
        if status != 200 or as_of < event_id or business not in baseline:
            return False
        seen = {pid for eid, named in per_business[business] if eid <= as_of for pid in named if pid in committed}
        base_count, base_total = baseline[business][1], baseline[business][2]
        return bool(count == base_count + len(seen) and total == base_total + sum(committed[p][1] for p in seen))

    event_lat, stats_lat, missing, wrong = [], [], 0, 0
    to_listener, to_client = [], []
    checked: dict[int, bool] = {}
    for pid, (_business, _amount, at) in committed.items():
        if pid not in first:
            missing += 1
            continue
        event_id, arrival = first[pid]
        event_lat.append(arrival - at)
        if event_id in created:
            to_listener.append(created[event_id] - at)
            to_client.append(arrival - created[event_id])
        answer = stats.get(event_id)
        if answer is None:
            wrong += 1
            continue
        if event_id not in checked:
            checked[event_id] = includes(answer)
        if checked[event_id]:
            stats_lat.append(answer[6] - at)
        else:
            wrong += 1
    requests = [s[6] - s[5] for s in stats.values() if s[7] == 200]
    lags = [r[4] for r in records]
    return {
        "payments_committed": len(records),
        "payments_followed": len(committed),
        "writer_rate_per_s": round(len(records) / seconds, 1),
        "writer_lag_behind_schedule": _summary(lags),
        "events_received": len(events),
        "events_truncated": truncated,
        "event_arrival_minus_commit": _summary(event_lat),
        "event_part_commit_to_listener_txn_start": _summary(to_listener),
        "event_part_listener_txn_start_to_arrival": _summary(to_client),
        "stats_answer_minus_commit": _summary(stats_lat),
        "stats_request_alone": _summary(requests),
        "stats_errors": sum(1 for s in stats.values() if s[7] != 200),
        "payments_without_event": missing,
        "stats_not_including_payment": wrong,
    }


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(url: str, args: argparse.Namespace) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
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
    # Every dashboard is simulated from 127.0.0.1: the per-address limit would hold back the measured opens.
    env.update(CDC_RATE_LIMIT_STREAM_OPENS_PER_MINUTE="0", CDC_RATE_LIMIT_WEBHOOKS_PER_MINUTE="0")
    if args.linger_ms is not None:
        env["CDC_LISTENER_LINGER_MS"] = str(args.linger_ms)
    cli = str(Path(sys.executable).parent / "cdc-dashboard")
    procs: list[subprocess.Popen[Any]] = []
    workdir = Path(tempfile.mkdtemp(prefix="e2e-latency-"))
    log = (workdir / "services.log").open("wb")
    try:
        if args.separate_listener:
            procs.append(subprocess.Popen([cli, "listen"], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
            command = [cli, "serve"]
        else:
            command = [cli, "serve", "--with-listener"]
        gateway = subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_raise_fd_limit
        )
        procs.append(gateway)
        wait_ready(port, gateway)
        time.sleep(2)  # the listener's first catch-up (nothing to catch up: the history bypassed capture)

        watched = businesses[: args.clients]
        shares = [watched[i :: args.client_procs] for i in range(args.client_procs)]
        outs = [workdir / f"client-{i}.json" for i in range(args.client_procs)]
        client_procs: list[subprocess.Popen[str]] = []
        for share, out in zip(shares, outs, strict=True):
            config = workdir / f"{out.stem}-config.json"
            config.write_text(json.dumps({"port": port, "businesses": share, "out": str(out)}))
            client_procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--role", "client", str(config)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        procs += client_procs
        connected, failures = connection_reports(client_procs)
        print(f"{connected} streams connected, {failures} failures", flush=True)

        writer_out = workdir / "writer.json"
        writer_config = workdir / "writer-config.json"
        writer_config.write_text(
            json.dumps(
                {
                    "url": url,
                    "businesses": businesses,
                    "clients": clients,
                    "rate": args.rate,
                    "seconds": args.seconds,
                    "writers": args.writers,
                    "out": str(writer_out),
                }
            )
        )
        load_before = _uptime()
        print(f"before: {load_before}", flush=True)
        started = time.monotonic()
        cpu_before = {proc.pid: _cpu_seconds(proc.pid) for proc in procs}
        busy_before, total_before = _machine_busy_seconds()
        subprocess.run([sys.executable, __file__, "--role", "writer", str(writer_config)], check=True)
        elapsed = time.monotonic() - started
        busy_after, total_after = _machine_busy_seconds()
        cpu = {proc.pid: (_cpu_seconds(proc.pid) - cpu_before[proc.pid]) / elapsed for proc in procs}
        roles = (["listen"] if args.separate_listener else []) + ["serve"] + ["client"] * len(client_procs)
        load_after = _uptime()
        # Drain: until the listener has turned every captured change into events (backlog 0), then until no
        # client has received an event or a stats answer for --drain seconds (at most 120 s in all).
        with psycopg.connect(url, autocommit=True) as conn:
            backlog_started = time.monotonic()
            while True:
                row = conn.execute(queries("gateway")["listener_lag"]).fetchone()
                if (row is not None and row[0] == 0) or time.monotonic() - backlog_started > 120:
                    break
                time.sleep(0.1)
            backlog_seconds = time.monotonic() - backlog_started
            backlog_left = row[0] if row is not None else None
        progress, quiet_since = "", time.monotonic()
        while time.monotonic() - quiet_since < args.drain and time.monotonic() - backlog_started < 120:
            time.sleep(0.25)
            now = "|".join(Path(f"{out}.progress").read_text() for out in outs)
            if now != progress:
                progress, quiet_since = now, time.monotonic()
        drained_seconds = time.monotonic() - backlog_started
        for proc in client_procs:
            assert proc.stdin is not None
            proc.stdin.write("stop\n")
            proc.stdin.flush()
        for proc in client_procs:
            proc.wait(120)
        records = json.loads(writer_out.read_text())
        outputs = [json.loads(out.read_text()) for out in outs]
        # Where the time goes: an event row's created_at is now() of the listener transaction that appended it.
        event_ids = [e[1] for out in outputs for e in out["events"]]
        with psycopg.connect(url, autocommit=True) as conn:
            created = {
                int(r[0]): float(r[1])
                for r in conn.execute(
                    "select id, extract(epoch from created_at) from dashboard.events where id = any(%s)", (event_ids,)
                )
            }
        result = {
            "command": " ".join(sys.argv),
            "mode": "listen + serve" if args.separate_listener else "serve --with-listener",
            "listener_linger_ms": "default" if args.linger_ms is None else args.linger_ms,
            "history_payments": history[0] if history else 0,
            "streams": connected,
            "connect_failures": failures + sum(o["failures"] for o in outputs),
            "writer_seconds": round(elapsed, 1),
            "backlog_drained_after_writer_s": round(backlog_seconds, 1),
            "backlog_left": backlog_left,
            "quiet_after_writer_s": round(drained_seconds - args.drain, 1),
            "machine_cpu_busy_while_writing": f"{100 * (busy_after - busy_before) / (total_after - total_before):.0f}%",
            "process_cpu_while_writing": [
                f"{role}: {100 * cpu[proc.pid]:.0f}% of a core" for role, proc in zip(roles, procs, strict=True)
            ],
            **_analyse(records, outputs, set(watched), args.seconds, created),
            "uptime_before": load_before,
            "uptime_after": load_after,
        }
        print(json.dumps(result, indent=2), flush=True)
        return 0 if result["payments_without_event"] == 0 and result["stats_not_including_payment"] == 0 else 1
    finally:
        for proc in reversed(procs):
            _stop(proc)
        log.close()
        tail = (workdir / "services.log").read_text(errors="replace").splitlines()[-20:]
        if tail:
            print("services log (last lines):\n" + "\n".join(tail), file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rate", type=float, default=500, help="payments per second (default 500)")
    parser.add_argument("--businesses", type=int, default=1000, help="businesses the payments go to (default 1000)")
    parser.add_argument("--clients", type=int, default=1000, help="SSE streams, one per business (default 1000)")
    parser.add_argument("--seconds", type=float, default=30, help="how long the writer runs (default 30)")
    parser.add_argument("--payments-history", type=int, default=1_000_000, help="payments loaded first (default 1M)")
    parser.add_argument("--database", help="reuse this already loaded database (never dropped)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
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
    if args.clients > args.businesses:
        parser.error("--clients cannot exceed --businesses (one stream per business)")
    if args.businesses > 9999:
        parser.error("--businesses: the history has 9,999 businesses besides the large one")

    def prepare(url: str) -> None:
        load(url, args.payments_history)

    with scratch_database("bench_e2e", reuse=args.database, keep=args.keep, prepare=prepare) as url:
        return run(url, args)


if __name__ == "__main__":
    sys.exit(main())
