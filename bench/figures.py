"""Figures: `GET /stats` latency and the cost of keeping the aggregates exact, on a 1M-payment history.

    .venv/bin/python bench/figures.py [--requests 4000] [--concurrency 4] [--keep] [--database NAME]

Creates a scratch database on CDC_BENCH_ADMIN_URL (default postgresql://postgres@127.0.0.1:5432/postgres),
applies the schema, loads bench/figures_data.sql (1M payments over 10k businesses, one of them holding 100k;
300k bookings; generate_series, capture triggers bypassed), and builds the aggregates once (the chunked
rebuild of `aggregates rebuild`). Then:

1. stats query: the `stats` statement alone over asyncpg, one connection, random businesses (and the large one),
   then for batches of 10, 100 and 1,000 businesses (what the gateway reads for the figures it pushes);
2. stats endpoint: `cdc-dashboard serve` in its own process, `--concurrency` aiohttp clients, random businesses;
3. maintenance: `dashboard.sync_payments_v3` (what the listener's batch calls for the payments it consumed) for
   batches of status flips, and the `rebuild` query (manual refresh / `aggregates rebuild`) per business;
   each measured inside a transaction that is rolled back, so every round sees the same history.

The scratch database is dropped at the end unless `--keep`; `--database NAME` reuses a loaded one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psycopg

from cdc_dashboard.figures import rebuild
from cdc_dashboard.migrations import apply
from cdc_dashboard.sqlfiles import queries
from cdc_dashboard.tokens import create_token
from scratch import scratch_database

ROOT = Path(__file__).resolve().parents[1]
SECRET = "bench-figures-" + "f" * 40
FLIP = """
update payments set status = case when status = 'completed' then 'refunded' else 'completed' end
 where id = any($1::uuid[])
"""
# What the listener's batch calls for the payments it consumed (sql/schema/30_aggregates.sql).
SYNC_PAYMENTS = "select dashboard.sync_payments_v3($1::uuid[])"
SAMPLE_PAYMENTS = "select id from payments where business_id = any($1::uuid[]) order by random() limit $2"


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def summary(name: str, ms: list[float]) -> str:
    return (
        f"{name}: n={len(ms)} p50={pct(ms, 50):.2f} ms p95={pct(ms, 95):.2f} ms p99={pct(ms, 99):.2f} ms "
        f"max={max(ms):.2f} ms"
    )


def load(url: str, payments: int = 1_000_000) -> None:
    """Apply the schema, load bench/figures_data.sql (`payments` payments over 10k businesses), build the
    aggregates once. Shared with bench/e2e_latency.py."""
    t0 = time.monotonic()
    apply(url)
    subprocess.run(
        [
            "psql",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-v",
            f"payments={payments}",
            url,
            "-f",
            str(ROOT / "bench" / "figures_data.sql"),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    t1 = time.monotonic()
    asyncio.run(build(url))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("vacuum analyze")
    print(f"loaded in {t1 - t0:.0f} s; aggregates built in {time.monotonic() - t1:.0f} s", flush=True)


async def build(url: str) -> None:
    """Every business's aggregates, as `cdc-dashboard aggregates rebuild` builds them (chunked, linear)."""
    conn = await asyncpg.connect(url)
    try:
        await rebuild.rebuild(conn)
    finally:
        await conn.close()


async def ids(conn: asyncpg.Connection) -> tuple[uuid.UUID, list[uuid.UUID]]:
    whale = await conn.fetchval("select id from businesses where name = 'Business 1'")
    rest = [r["id"] for r in await conn.fetch("select id from businesses where name <> 'Business 1'")]
    return whale, rest


async def bench_query(url: str, n: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        whale, rest = await ids(conn)
        q = queries("figures")["stats"]
        pickers: list[tuple[str, Callable[[], Any]]] = [
            ("stats query, random business", lambda: random.choice(rest)),
            ("stats query, 100k-payment business", lambda: whale),
        ]
        for label, pick in pickers:
            ms: list[float] = []
            for _ in range(n):
                b = pick()
                t = time.perf_counter()
                await conn.fetch(q, [b])
                ms.append((time.perf_counter() - t) * 1000)
            print(summary(label, ms[n // 10 :]), flush=True)  # the first tenth warms plans and caches
        # The same statement for a batch of businesses, as the gateway reads the figures it pushes with a batch
        # of live events (gateway/pushed_figures.py): one statement per batch instead of one GET per dashboard.
        for size in (10, 100, 1000):
            rounds = max(20, n // size)
            ms = []
            for _ in range(rounds):
                batch = random.sample(rest, size)
                t = time.perf_counter()
                rows = await conn.fetch(q, batch)
                ms.append((time.perf_counter() - t) * 1000)
                assert len(rows) == size
            measured = ms[rounds // 10 :]
            per = sorted(measured)[len(measured) // 2] / size * 1000
            print(
                summary(f"stats query, batch of {size} random businesses", measured)
                + f" ({per:.0f} µs per business at p50)",
                flush=True,
            )
    finally:
        await conn.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def bench_http(url: str, n: int, concurrency: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        whale, rest = await ids(conn)
    finally:
        await conn.close()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
    env.update(CDC_DATABASE_URL=url, CDC_SECRET=SECRET, CDC_HTTP_PORT=str(port), CDC_LOG_LEVEL="warning")
    cli = Path(sys.executable).parent / "cdc-dashboard"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(  # noqa: ASYNC220 - started once, before anything is measured
            [str(cli), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            base = f"http://127.0.0.1:{port}"
            token = create_token(SECRET, [], 3600, admin=True)
            headers = {"Authorization": f"Bearer {token}"}
            async with aiohttp.ClientSession() as session:
                for _ in range(300):
                    try:
                        async with session.get(f"{base}/readyz") as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.1)
                ms: list[float] = []

                async def worker(count: int) -> None:
                    for _ in range(count):
                        b = whale if random.random() < 0.01 else random.choice(rest)
                        t = time.perf_counter()
                        async with session.get(f"{base}/v1/businesses/{b}/stats", headers=headers) as r:
                            await r.read()
                            assert r.status == 200, r.status
                        ms.append((time.perf_counter() - t) * 1000)

                await asyncio.gather(*(worker(n // concurrency) for _ in range(concurrency)))
                print(
                    summary(f"GET /stats over HTTP, {concurrency} concurrent clients", ms[len(ms) // 10 :]), flush=True
                )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)


async def bench_maintenance(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        whale, rest = await ids(conn)
        q = queries("figures")
        for size, with_whale in ((1, False), (10, False), (100, False), (100, True)):
            ms: list[float] = []
            for _ in range(15):
                businesses = random.sample(rest, min(size, 50)) + ([whale] if with_whale else [])
                payments = [r["id"] for r in await conn.fetch(SAMPLE_PAYMENTS, businesses, size)]
                tr = conn.transaction()
                await tr.start()
                try:
                    await conn.execute(FLIP, payments)
                    t = time.perf_counter()
                    await conn.execute(SYNC_PAYMENTS, payments)
                    ms.append((time.perf_counter() - t) * 1000)
                finally:
                    await tr.rollback()
            label = f"sync_payments_v3, batch of {size} payment changes" + (
                " incl. the 100k business" if with_whale else ""
            )
            print(summary(label, ms[3:]), flush=True)
        rebuilds: list[tuple[str, Callable[[], list[Any]]]] = [
            ("rebuild, one ~90-payment business", lambda: [random.choice(rest)]),
            ("rebuild, the 100k-payment business", lambda: [whale]),
            ("rebuild, 50 businesses at once", lambda: random.sample(rest, 50)),
        ]
        for label, pick in rebuilds:
            ms = []
            for _ in range(8):
                tr = conn.transaction()
                await tr.start()
                try:
                    t = time.perf_counter()
                    repaired = await conn.fetch(q["rebuild"], pick())
                    ms.append((time.perf_counter() - t) * 1000)
                    assert not repaired, f"the aggregates were not exact: {repaired}"
                finally:
                    await tr.rollback()
            print(summary(label, ms[2:]), flush=True)
    finally:
        await conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    parser.add_argument("--database", help="reuse this already loaded database (never dropped)")
    args = parser.parse_args()
    with scratch_database("bench_figures", reuse=args.database, keep=args.keep, prepare=load) as url:
        asyncio.run(bench_query(url, 2000))
        asyncio.run(bench_http(url, args.requests, args.concurrency))
        asyncio.run(bench_maintenance(url))
    return 0


if __name__ == "__main__":
    sys.exit(main())
