"""Soak: dashboards that disconnect and resume at random, payments flowing, event retention pruning running.

    .venv/bin/python bench/soak.py [--minutes 10] [--dashboards 1000] [--businesses 100] [--rate 50]
        [--retention-seconds 120] [--mean-connected 20]

Creates a scratch database on CDC_BENCH_ADMIN_URL (default postgresql://postgres@127.0.0.1:5432/postgres),
loads bench/figures_data.sql with a small history (bench/figures.py's loader) and starts
`cdc-dashboard serve --with-listener` with CDC_EVENT_RETENTION_DAYS set to `--retention-seconds`, so that the
listener's pruning (every minute, while it is quiet) deletes events during the run rather than after a week.

A client process holds `--dashboards` streams, spread evenly over `--businesses` businesses, each with a
token naming only its business. Each dashboard stays connected for a random time (exponential, mean
`--mean-connected` seconds), closes its socket, waits up to a second and resumes with `Last-Event-ID` (the
last id it received), as a browser's EventSource does. Meanwhile bench/e2e_latency.py's writer inserts
payments at `--rate` per second over those businesses for `--minutes`.

Every 5 s the driver samples the gateway's RSS and open file descriptors, and the events retained and
pruned. At the end (listener backlog 0, then the dashboards stop cutting and resume one last time, and
nothing has arrived for 5 s) it checks, per dashboard: every payment of its business is named by an event it
received (an event lists at most so many changes: truncated events are counted and their payments excused),
and the ids it received strictly increase across all its reconnections (no duplicate, nothing out of order).
A `resync` (its Last-Event-ID older than retained history) is counted: it means the dashboard refetches.

Exit status 0 only when nothing was lost or out of order.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from cdc_dashboard.sqlfiles import queries
from cdc_dashboard.tokens import create_token
from e2e_latency import (
    _free_port,
    _parse_message,
    _raise_fd_limit,
    _uptime,
    writer_command,
)  # bench/ is on sys.path (run as a script)
from figures import load
from scratch import connection_reports, scratch_database, stop, wait_ready

ROOT = Path(__file__).resolve().parents[1]
SECRET = "bench-soak-" + "s" * 40


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- client process -----------------------------------------------------------------------------------------


async def _client(config: dict[str, Any]) -> None:
    """Run the dashboards until stdin says "settle" (stop cutting), then "stop"; write what each received."""
    port: int = config["port"]
    mean_connected: float = config["mean_connected"]
    tokens = {b: create_token(SECRET, [b], 7200) for b in set(config["dashboards"])}
    settling = asyncio.Event()
    received: list[list[list[Any]]] = [[] for _ in config["dashboards"]]  # per dashboard: [event id, kind, [payments]]
    counts = {"connects": 0, "connect_failures": 0, "resyncs": 0, "truncated": 0, "events": 0}
    ready = asyncio.Event()
    connected = [False] * len(received)

    async def session(index: int, business: str, last_id: int, lifetime: float | None) -> int:
        """One connection: resume after `last_id`, read until `lifetime` passes; the last id received."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(
                f"GET /v1/businesses/{business}/events HTTP/1.1\r\nHost: bench\r\nLast-Event-ID: {last_id}\r\n"
                f"Authorization: Bearer {tokens[business]}\r\nAccept: text/event-stream\r\n\r\n".encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head[:60])
            counts["connects"] += 1
            if not connected[index]:
                connected[index] = True
                if all(connected):
                    ready.set()
            buffer = b""
            with_deadline = asyncio.timeout(None if lifetime is None else lifetime)
            try:
                async with with_deadline:
                    while True:
                        size_line = await reader.readline()  # chunked transfer encoding: size, chunk, CRLF
                        if not size_line:
                            return last_id
                        size = int(size_line.split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            return last_id
                        buffer += (await reader.readexactly(size + 2))[:-2].replace(b"\r\n", b"\n")
                        *messages, buffer = buffer.split(b"\n\n")
                        for message in messages:
                            kind, event_id, data = _parse_message(message)
                            if event_id is None:
                                continue
                            body = json.loads(data)
                            named = {c["id"] for c in body.get("changes", []) if c.get("table") == "payments"}
                            named |= {p["id"] for p in body.get("payments", [])}
                            if kind == "resync":
                                counts["resyncs"] += 1
                            if body.get("change_count", 0) > len(body.get("changes", [])):
                                counts["truncated"] += 1
                            received[index].append([event_id, kind, sorted(named)])
                            counts["events"] += 1
                            last_id = event_id
            except TimeoutError:
                pass
            return last_id
        finally:
            writer.close()

    async def dashboard(index: int, business: str) -> None:
        # As the dashboard page does: the first stream resumes from the figures' as_of_event_id, so that an
        # event committed between two sessions of a dashboard that had received nothing yet is not skipped.
        last_id: int = config["start_id"]
        while True:
            # While settling, a session lasts until the process stops: the final catch-up.
            lifetime = None if settling.is_set() else random.expovariate(1 / mean_connected)
            try:
                last_id = await session(index, business, last_id, lifetime)
            except (OSError, RuntimeError, asyncio.IncompleteReadError):
                counts["connect_failures"] += 1
            if settling.is_set() and lifetime is None:
                return
            await asyncio.sleep(random.uniform(0, 1))

    dashboards: list[str] = config["dashboards"]
    tasks = []
    for start in range(0, len(dashboards), 100):
        tasks += [
            asyncio.create_task(dashboard(i, dashboards[i])) for i in range(start, min(start + 100, len(dashboards)))
        ]
        await asyncio.sleep(0.1)
    async with asyncio.timeout(60):
        await ready.wait()
    print(json.dumps({"connected": len(dashboards), "failures": counts["connect_failures"]}), flush=True)

    async def progress() -> None:  # what the driver watches to know when the run has gone quiet
        while True:
            await asyncio.to_thread(Path(config["out"] + ".progress").write_text, json.dumps(counts))
            await asyncio.sleep(0.5)

    reporter = asyncio.create_task(progress())
    await asyncio.to_thread(sys.stdin.readline)  # "settle": stop cutting, resume once more
    settling.set()
    await asyncio.to_thread(sys.stdin.readline)  # "stop"
    reporter.cancel()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    out = {"dashboards": dashboards, "received": received, "counts": counts}
    await asyncio.to_thread(Path(config["out"]).write_text, json.dumps(out))


# -- driver -------------------------------------------------------------------------------------------------


def _check(records: list[list[Any]], out: dict[str, Any]) -> dict[str, Any]:
    """Per dashboard: payments of its business it never saw named, and ids that did not strictly increase."""
    by_business: dict[str, set[str]] = {}
    for payment, business, *_ in records:
        by_business.setdefault(business, set()).add(payment)
    missing = out_of_order = dashboards_with_truncation = 0
    for business, events in zip(out["dashboards"], out["received"], strict=True):
        ids = [event_id for event_id, _kind, _named in events]
        out_of_order += sum(1 for a, b in itertools.pairwise(ids) if b <= a)
        seen = {p for _id, _kind, named in events for p in named}
        lost = by_business.get(business, set()) - seen
        if lost and out["counts"]["truncated"]:
            dashboards_with_truncation += 1
        missing += len(lost)
    return {
        "payment_deliveries_expected": sum(len(by_business.get(b, ())) for b in out["dashboards"]),
        "payment_deliveries_missing": missing,
        "ids_not_increasing": out_of_order,
        "dashboards_missing_with_truncated_events": dashboards_with_truncation,
    }


def run(url: str, args: argparse.Namespace) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        businesses = [
            str(r[0])
            for r in conn.execute(
                "select id from businesses where name <> 'Business 1' order by random() limit %s", (args.businesses,)
            )
        ]
        clients = [str(r[0]) for r in conn.execute("select id from clients order by random() limit 1000")]
        row = conn.execute("select coalesce(max(id), 0) from dashboard.events").fetchone()
        start_id = int(row[0]) if row else 0
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
    env.update(
        CDC_DATABASE_URL=url,
        CDC_SECRET=SECRET,
        CDC_HTTP_PORT=str(port),
        CDC_LOG_LEVEL="WARNING",
        CDC_EVENT_RETENTION_DAYS=repr(args.retention_seconds / 86400),
        # Every dashboard reconnects from 127.0.0.1, many times a minute.
        CDC_RATE_LIMIT_STREAM_OPENS_PER_MINUTE="0",
        CDC_MAX_STREAMS_PER_TOKEN=str(args.dashboards),
    )
    cli = str(Path(sys.executable).parent / "cdc-dashboard")
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    log = (workdir / "services.log").open("wb")
    procs: list[subprocess.Popen[Any]] = []
    try:
        gateway = subprocess.Popen(
            [cli, "serve", "--with-listener"],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_raise_fd_limit,
        )
        procs.append(gateway)
        wait_ready(port, gateway)
        time.sleep(2)
        dashboards = [businesses[i % len(businesses)] for i in range(args.dashboards)]
        out_path = workdir / "client.json"
        config = workdir / "client-config.json"
        config.write_text(
            json.dumps(
                {
                    "port": port,
                    "dashboards": dashboards,
                    "start_id": start_id,
                    "mean_connected": args.mean_connected,
                    "out": str(out_path),
                }
            )
        )
        client = subprocess.Popen(
            [sys.executable, __file__, "--client", str(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(client)
        connected, failures = connection_reports([client])
        print(f"{connected} dashboards connected, {failures} failures; {_uptime()}", flush=True)

        command, writer_out = writer_command(
            workdir,
            url=url,
            businesses=businesses,
            clients=clients,
            rate=args.rate,
            seconds=args.minutes * 60,
            writers=2,
        )
        writer = subprocess.Popen(command)
        procs.append(writer)
        samples: list[dict[str, Any]] = []
        loads: list[str] = []
        with psycopg.connect(url, autocommit=True) as conn:

            def sample() -> None:
                row = conn.execute(
                    "select (select count(*) from dashboard.events),"
                    " (select pruned_through from dashboard.listener_state limit 1)"
                ).fetchone()
                assert row is not None
                samples.append(
                    {
                        "t": round(time.monotonic() - started),
                        "rss_mib": round(_rss_kib(gateway.pid) / 1024, 1),
                        "fds": _open_fds(gateway.pid),
                        "events_retained": row[0],
                        "pruned_through": row[1],
                    }
                )

            started = time.monotonic()
            sample()
            next_load = started
            while writer.poll() is None:
                time.sleep(5)
                sample()
                if time.monotonic() >= next_load:
                    loads.append(_uptime())
                    print(json.dumps(samples[-1]), loads[-1], flush=True)
                    next_load += 60
            if writer.returncode != 0:
                raise RuntimeError("the writer failed")
            # Drain: the listener has turned every change into events, then the dashboards stop cutting and
            # resume once more; done when nothing has arrived for 5 s.
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                row = conn.execute(queries("gateway")["listener_lag"]).fetchone()
                if row is not None and row[0] == 0:
                    break
                time.sleep(0.2)
            assert client.stdin is not None
            client.stdin.write("settle\n")
            client.stdin.flush()
            progress, quiet_since = "", time.monotonic()
            while time.monotonic() - quiet_since < 5 and time.monotonic() < deadline:
                time.sleep(0.25)
                now = Path(f"{out_path}.progress").read_text()
                if now != progress:
                    progress, quiet_since = now, time.monotonic()
            sample()
            client.stdin.write("stop\n")
            client.stdin.flush()
            client.wait(60)
        loads.append(_uptime())
        records = json.loads(writer_out.read_text())
        out = json.loads(out_path.read_text())
        peak = max(samples, key=lambda s: s["rss_mib"])
        result = {
            "minutes": args.minutes,
            "dashboards": args.dashboards,
            "businesses": args.businesses,
            "payments": len(records),
            "retention_seconds": args.retention_seconds,
            **out["counts"],
            **_check(records, out),
            "rss_mib_start_peak_end": [samples[0]["rss_mib"], peak["rss_mib"], samples[-1]["rss_mib"]],
            "fds_start_peak_end": [samples[0]["fds"], max(s["fds"] for s in samples), samples[-1]["fds"]],
            "events_retained_start_end": [samples[0]["events_retained"], samples[-1]["events_retained"]],
            "pruned_through_start_end": [samples[0]["pruned_through"], samples[-1]["pruned_through"]],
            "load": loads,
            "samples": samples,
        }
        print(json.dumps(result, indent=1))
        ok = result["payment_deliveries_missing"] == 0 and result["ids_not_increasing"] == 0
        return 0 if ok else 1
    finally:
        for proc in procs:
            stop(proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--dashboards", type=int, default=1000)
    parser.add_argument("--businesses", type=int, default=100)
    parser.add_argument("--rate", type=float, default=50, help="payments per second (default 50)")
    parser.add_argument("--retention-seconds", type=float, default=120, help="CDC_EVENT_RETENTION_DAYS, in seconds")
    parser.add_argument("--mean-connected", type=float, default=20, help="mean seconds a dashboard stays connected")
    parser.add_argument("--history", type=int, default=10000, help="payments loaded first (default 10,000)")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    args = parser.parse_args()
    _raise_fd_limit()
    if args.client:
        asyncio.run(_client(json.loads(Path(args.client).read_text())))
        return 0
    with scratch_database("bench_soak", prepare=lambda url: load(url, args.history)) as url:
        return run(url, args)


if __name__ == "__main__":
    sys.exit(main())
