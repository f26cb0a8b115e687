"""Gateways per database: what each gateway's LISTEN connection costs the database, per listener batch.

    .venv/bin/python bench/gateways_per_database.py [--gateways 0,1,4,16,64] [--rate 200] [--seconds 15]

Every gateway process holds one LISTEN connection on `dashboard_events_v1`. Each listener batch that appends
events ends with one NOTIFY, which wakes every backend listening on the channel; each gateway then reads the
new events from its position (the hub's `hub_catch_up` query). So the database's cost of fan-out grows with
gateways times batches, whatever the number of dashboards.

This measures that cost without the gateways' Python: G asyncpg connections each do what a hub does on a
wake-up (LISTEN; on a notification, `hub_catch_up` from its position until it is up to date), while a real
`cdc-dashboard listen` consumes payments inserted at a steady rate over 100 businesses. For each G, over the
same load: the listener's batches, the CPU of the G gateway backends (from /proc, summed) per batch and in all,
the listener backends' CPU per batch, and how busy the machine was. Needs the database server on this host
(its backends' /proc entries); CDC_BENCH_ADMIN_URL as for the other benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import psycopg

from cdc_dashboard.sqlfiles import queries
from scratch import scratch_database, wait_drained

ROOT = Path(__file__).resolve().parents[1]
GATEWAY_APP = "bench gateway"
INSERT = """
insert into payments (id, business_id, amount_minor, currency, method, status, paid_at)
values ($1, $2, $3, 'KES', 'mpesa', 'completed', now())
"""


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy() -> tuple[float, float]:
    ticks = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = ticks[3] + ticks[4]
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK"), sum(ticks) / os.sysconf("SC_CLK_TCK")


def _backend_pids(url: str, pattern: str) -> list[int]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "select pid from pg_stat_activity where datname = current_database() and application_name like %s",
            (pattern,),
        ).fetchall()
    return [int(r[0]) for r in rows]


class SimulatedGateway:
    """One LISTEN connection that reads new events on every wake-up, as the hub does."""

    def __init__(self, conn: asyncpg.Connection, position: int) -> None:
        self.conn = conn
        self.position = position
        self.wakeups = 0
        self.events = 0
        self._dirty = asyncio.Event()

    def on_notify(self, *_: Any) -> None:
        self.wakeups += 1
        self._dirty.set()

    async def run(self) -> None:
        catch_up = queries("gateway")["hub_catch_up"]
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            while rows := await self.conn.fetch(catch_up, self.position, 1000):
                self.position = rows[-1]["id"]
                self.events += len(rows)


async def _measure(url: str, gateways: int, rate: float, seconds: float, businesses: list[uuid.UUID]) -> dict[str, Any]:
    conns = [
        await asyncpg.connect(url, server_settings={"application_name": f"{GATEWAY_APP} {i}"}) for i in range(gateways)
    ]
    start_position = int(await conns[0].fetchval("select coalesce(max(id), 0) from dashboard.events")) if conns else 0
    sims = [SimulatedGateway(c, start_position) for c in conns]
    for sim in sims:
        await sim.conn.add_listener("dashboard_events_v1", sim.on_notify)
    tasks = [asyncio.create_task(s.run()) for s in sims]
    gateway_pids = _backend_pids(url, f"{GATEWAY_APP} %")
    listener_pids = _backend_pids(url, "cdc-dashboard listener%")
    writer = await asyncpg.connect(url)
    events_before = int(await writer.fetchval("select coalesce(max(id), 0) from dashboard.events"))
    gw_cpu = sum(_cpu_seconds(p) for p in gateway_pids)
    ls_cpu = sum(_cpu_seconds(p) for p in listener_pids)
    busy0, total0 = _machine_busy()
    began = time.monotonic()
    for i in range(int(rate * seconds)):
        delay = began + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await writer.execute(INSERT, uuid.uuid4(), random.choice(businesses), 100 * random.randint(1, 5000))
    await asyncio.to_thread(wait_drained, url, 30)
    await asyncio.sleep(0.5)  # the last batch's wake-ups
    elapsed = time.monotonic() - began
    busy1, total1 = _machine_busy()
    gw_cpu = sum(_cpu_seconds(p) for p in gateway_pids) - gw_cpu
    ls_cpu = sum(_cpu_seconds(p) for p in listener_pids) - ls_cpu
    events = int(await writer.fetchval("select coalesce(max(id), 0) from dashboard.events")) - events_before
    # One batch is one transaction, and its events share its now().
    batches = int(
        await writer.fetchval("select count(distinct created_at) from dashboard.events where id > $1", events_before)
    )
    await writer.close()
    for task in tasks:
        task.cancel()
    for conn in conns:
        await conn.close()
    wakeups = sum(s.wakeups for s in sims)
    return {
        "gateways": gateways,
        "payments": int(rate * seconds),
        "seconds": round(elapsed, 1),
        "batches": batches,
        "events": events,
        "wakeups": wakeups,
        "gateway_backends_cpu_ms_per_batch": round(1000 * gw_cpu / max(batches, 1), 3),
        "gateway_backend_us_per_wakeup": round(1e6 * gw_cpu / max(wakeups, 1), 1),
        "gateway_backends_cpu_share": round(gw_cpu / elapsed, 4),
        "listener_backends_cpu_ms_per_batch": round(1000 * ls_cpu / max(batches, 1), 3),
        "machine_busy": round((busy1 - busy0) / max(total1 - total0, 1e-9), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gateways", default="0,1,4,16,64", help="comma-separated gateway counts, measured in turn")
    parser.add_argument("--rate", type=float, default=200.0, help="payments per second")
    parser.add_argument("--seconds", type=float, default=15.0, help="writing time per gateway count")
    parser.add_argument("--rounds", type=int, default=1, help="measure the whole list this many times")
    args = parser.parse_args()
    counts = [int(c) for c in args.gateways.split(",")]
    with scratch_database("bench_gateways") as url:
        with psycopg.connect(url, autocommit=True) as conn:
            ids = [uuid.uuid4() for _ in range(100)]
            for n, b in enumerate(ids):
                conn.execute("insert into businesses (id, name) values (%s, %s)", (b, f"Business {n}"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
        env.update(CDC_DATABASE_URL=url, CDC_LOG_LEVEL="WARNING")
        cli = str(Path(sys.executable).parent / "cdc-dashboard")
        listener = subprocess.Popen([cli, "listen"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        try:
            time.sleep(2)
            print(subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip(), flush=True)
            for _ in range(args.rounds):
                for gateways in counts:
                    print(asyncio.run(_measure(url, gateways, args.rate, args.seconds, ids)), flush=True)
            print(subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip(), flush=True)
        finally:
            listener.terminate()
            listener.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
