"""Figures: `GET /stats` latency and the cost of keeping the aggregates exact, on a 1M-payment history.

    .venv/bin/python bench/figures.py [--requests 4000] [--concurrency 4] [--keep] [--database NAME]
                                      [--pushed-bodies-only]

Creates a scratch database on CDC_BENCH_ADMIN_URL (default postgresql://postgres@127.0.0.1:5432/postgres),
applies the schema, loads bench/figures_data.sql (1M payments over 10k businesses, one of them holding 100k;
300k bookings; generate_series, capture triggers bypassed), and builds the aggregates once (the chunked
rebuild of `aggregates rebuild`). Then:

1. stats query: the `stats` statement alone over asyncpg, one connection, random businesses (and the large one),
   then for batches of 10, 100 and 1,000 businesses (what the gateway reads for the figures it pushes);
2. stats endpoint: `cdc-dashboard serve` in its own process, `--concurrency` aiohttp clients, random businesses;
3. maintenance: `dashboard.sync_payments_v3` (what the listener's batch calls for the payments it consumed) for
   batches of status flips, and the `rebuild` query (manual refresh / `aggregates rebuild`) per business;
   each measured inside a transaction that is rolled back, so every round sees the same history;
4. pushed bodies: for batches of 10, 100 and 1,000 businesses, the `stats` statement (the figures live events
   carry) against one statement reading the first `GET /transactions` page of each, interleaved, and the bytes
   each body adds to an event frame (issue 18: is `['transactions', id]` as cheap to push?). With
   `--pushed-bodies-only`, only this.

The scratch database is dropped at the end unless `--keep`; `--database NAME` reuses a loaded one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psycopg

from cdc_dashboard.figures import reads, rebuild
from cdc_dashboard.figures.reads import Figures, encode_cursor, stats_of
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
# A candidate for pushing `['transactions', id]` with live events (issue 18): the first page `GET /transactions`
# answers (sql/queries/figures.sql `transactions`, its lateral page unchanged) for a batch of businesses in one
# statement, shaped like the `stats` batch. Measured here before anything depends on it.
TRANSACTIONS_BATCH = """
select (select last_event_id from dashboard.listener_state) as as_of_event_id, ids.id as business_id,
       t.sort_at, t.id, t.item
  from (select * from unnest($1::uuid[]) with ordinality as u(id, ord) limit cardinality($1::uuid[])) as ids
  left join lateral (
      select coalesce(p.paid_at, p.created_at) as sort_at, p.id,
             jsonb_build_object(
                 'id', p.id, 'amount_minor', p.amount_minor, 'refunded_minor', p.refunded_minor,
                 'currency', p.currency, 'method', p.method, 'status', p.status, 'client_id', p.client_id,
                 'client_name', c.name, 'booking_id', p.booking_id,
                 'provider', p.provider, 'provider_reference', p.provider_reference,
                 'at', coalesce(p.paid_at, p.created_at), 'paid_at', p.paid_at, 'created_at', p.created_at
             )::text as item
        from payments p left join clients c on c.id = p.client_id
       where p.business_id = ids.id and (coalesce(p.paid_at, p.created_at), p.id) < ($2::timestamptz, $3::uuid)
       order by coalesce(p.paid_at, p.created_at) desc, p.id desc
       limit $4
  ) as t on true
 order by ids.ord, t.sort_at desc, t.id desc
"""
# The first-page cursor list_page passes (figures/reads.py).
FIRST_PAGE = (datetime.max.replace(tzinfo=UTC), uuid.UUID(int=(1 << 128) - 1))
# One payment event as the listener appends it, to size a frame: a completed payment with a client, consumed in a
# transaction that is rolled back.
ONE_PAYMENT = """
insert into payments (business_id, client_id, amount_minor, currency, method, status, provider, provider_reference,
                      paid_at)
select business_id, client_id, 150000, 'KES', 'mpesa', 'completed', 'mpesa', 'BENCH' || gen_random_uuid(), now()
  from payments where business_id = $1 and client_id is not null limit 1
"""


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


def response_bytes(body: Any) -> bytes:
    """A body as the gateway serialises it (starlette's JSONResponse; gateway/pushed_figures.py the same)."""
    return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def stats_from_rows(rows: list[asyncpg.Record]) -> dict[uuid.UUID, Figures]:
    """What figures/reads.py `stats_of` makes of the `stats` rows (its row decoding, called directly so that the
    Python work is timed apart from the statement)."""
    return {r["business_id"]: reads._figures_from_row(r["business_id"], r) for r in rows if r["found"]}


def page_bodies(rows: list[asyncpg.Record], limit: int) -> dict[uuid.UUID, dict[str, Any]]:
    """`GET /transactions?limit=<limit>` bodies from TRANSACTIONS_BATCH rows (fetched with limit + 1), built as
    figures/reads.py `list_page` and gateway/figures.py build them."""
    by_business: dict[uuid.UUID, list[asyncpg.Record]] = {}
    for r in rows:
        by_business.setdefault(r["business_id"], [])
        if r["id"] is not None:
            by_business[r["business_id"]].append(r)
    out: dict[uuid.UUID, dict[str, Any]] = {}
    for business, found in by_business.items():
        more = len(found) > limit
        out[business] = {
            "business_id": str(business),
            "as_of_event_id": rows[0]["as_of_event_id"],
            "items": [json.loads(r["item"]) for r in found[:limit]],
            "next_before": encode_cursor(found[limit - 1]["sort_at"], found[limit - 1]["id"]) if more else None,
        }
    return out


async def bench_pushed_bodies(url: str) -> None:
    """What pushing `['transactions', id]` with each business's last event of a batch would cost, against the
    `stats` read pushed today: for batches of 10, 100 and 1,000 random businesses, interleaved in each round,
    the `stats` statement and the first transactions page of each business in one statement (the default 50
    rows, the 20 the bundled page asks for, and the newest row alone), each then built into the bodies a
    gateway would splice into events (JSON decoded and encoded in Python, on the hub's event loop); and the
    stats and the 50-row page read in one snapshot (a repeatable-read transaction, as the hub would need).
    Then the bytes each body adds to an event frame."""
    conn = await asyncpg.connect(url)
    try:
        whale, rest = await ids(conn)
        stats_sql = queries("figures")["stats"]
        # The candidate measures what it stands for: the bodies GET /transactions answers, key for key.
        for business in [*random.sample(rest, 20), whale]:
            for limit in (50, 20):
                rows = await conn.fetch(TRANSACTIONS_BATCH, [business], *FIRST_PAGE, limit + 1)
                page = await reads.list_page(conn, "transactions", business, None, str(limit))
                assert page is not None
                expected = {
                    "business_id": str(business),
                    "as_of_event_id": page.as_of_event_id,
                    "items": page.items,
                    "next_before": page.next_before,
                }
                assert page_bodies(rows, limit)[business] == expected, business

        def stats_bodies(rows: list[asyncpg.Record]) -> None:
            for figures in stats_from_rows(rows).values():
                response_bytes(figures.stats_body())

        def transactions_bodies(limit: int) -> Callable[[list[asyncpg.Record]], None]:
            def build(rows: list[asyncpg.Record]) -> None:
                for body in page_bodies(rows, limit).values():
                    response_bytes(body)

            return build

        for size in (10, 100, 1000):
            n = max(20, 2000 // size)
            statement: dict[str, list[float]] = {}
            python: dict[str, list[float]] = {}
            for i in range(n):
                batch = random.sample(rest, size)
                variants: list[tuple[str, list[Any], Callable[[list[asyncpg.Record]], None]]] = [
                    ("stats", [stats_sql, batch], stats_bodies),
                    ("transactions, 50 rows", [TRANSACTIONS_BATCH, batch, *FIRST_PAGE, 51], transactions_bodies(50)),
                    ("transactions, 20 rows", [TRANSACTIONS_BATCH, batch, *FIRST_PAGE, 21], transactions_bodies(20)),
                    ("transactions, newest row", [TRANSACTIONS_BATCH, batch, *FIRST_PAGE, 2], transactions_bodies(1)),
                ]
                # Rotate the order so that no variant always runs on the pages the previous one warmed.
                variants = variants[i % len(variants) :] + variants[: i % len(variants)]
                for label, args, build in variants:
                    t = time.perf_counter()
                    rows = await conn.fetch(*args)
                    t1 = time.perf_counter()
                    build(rows)
                    statement.setdefault(label, []).append((t1 - t) * 1000)
                    python.setdefault(label, []).append((time.perf_counter() - t1) * 1000)
                t = time.perf_counter()
                async with conn.transaction(isolation="repeatable_read", readonly=True):
                    await conn.fetch(stats_sql, batch)
                    await conn.fetch(TRANSACTIONS_BATCH, batch, *FIRST_PAGE, 51)
                statement.setdefault("stats + transactions 50 rows, one snapshot", []).append(
                    (time.perf_counter() - t) * 1000
                )
            warm = n // 10  # the first tenth warms plans and caches
            base = pct(statement["stats"][warm:], 50)
            base_python = pct(python["stats"][warm:], 50)
            for label, ms in statement.items():
                p50 = pct(ms[warm:], 50)
                what = "statement" if label in python else "transaction (begin, both statements, commit)"
                line = summary(f"batch of {size}: {label}, {what}", ms[warm:])
                print(f"{line} ({p50 / size * 1000:.0f} µs per business; {p50 / base:.2f}x stats at p50)")
                if label in python:
                    p50 = pct(python[label][warm:], 50)
                    line = summary(f"batch of {size}: {label}, bodies built in Python", python[label][warm:])
                    print(f"{line} ({p50 / base_python:.2f}x stats at p50)")
            sys.stdout.flush()
        # Sizes: what each pushed body adds to the frame of the event it goes with, for 1,000 random businesses
        # and the 100k-payment one; and the frame of one payment event without figures.
        sample = [*random.sample(rest, 1000), whale]
        # `,"figures":{"dashboard-stats":BODY}` today; `,"transactions":BODY` more inside that object.
        stats_added: list[float] = [
            len(response_bytes({"figures": {"dashboard-stats": f.stats_body()}})) - 1
            for f in (await stats_of(conn, sample)).values()
        ]
        added: dict[int, list[float]] = {}
        for limit in (50, 20, 1):
            rows = await conn.fetch(TRANSACTIONS_BATCH, sample, *FIRST_PAGE, limit + 1)
            bodies = page_bodies(rows, limit).values()
            added[limit] = [len(b',"transactions":') + len(response_bytes(b)) for b in bodies]
        tr = conn.transaction()
        await tr.start()
        try:
            await conn.execute(ONE_PAYMENT, random.choice(rest))
            await conn.fetchrow(queries("listener")["consume_batch"], 1000, "live", 0)
            payload = await conn.fetchval("select payload from dashboard.events order by id desc limit 1")
        finally:
            await tr.rollback()
        event = len(f"id: 1842\nevent: invalidate\ndata: {payload}\n\n".encode())
        for label, sizes in (
            ("stats body (today)", stats_added),
            ("transactions body, 50 rows", added[50]),
            ("transactions body, 20 rows", added[20]),
            ("transactions body, newest row", added[1]),
        ):
            print(
                f"bytes added to an event frame by the {label}: p50 {pct(sizes, 50):.0f}, max {max(sizes)} "
                f"(the frame without figures: {event} bytes)",
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
    parser.add_argument(
        "--pushed-bodies-only",
        action="store_true",
        help="only the batch reads of the bodies events could carry (stats against the transactions page)",
    )
    args = parser.parse_args()
    with scratch_database("bench_figures", reuse=args.database, keep=args.keep, prepare=load) as url:
        if not args.pushed_bodies_only:
            asyncio.run(bench_query(url, 2000))
            asyncio.run(bench_http(url, args.requests, args.concurrency))
            asyncio.run(bench_maintenance(url))
        asyncio.run(bench_pushed_bodies(url))
    return 0


if __name__ == "__main__":
    sys.exit(main())
