"""Guarantee 5: every figure equals DESIGN's definition over the base tables, whatever the history of writes.

Hypothesis writes random histories through plain SQL (inserts with amounts up to the schema's bound, status
flips, partial and repeated refunds, refunds of what is left, amount and currency corrections, clients set and
cleared, payments moved between businesses, deletes, bookings), with times minutes either side of midnight and
of the first of the month in each business's timezone, and late rows for old days. At random points - and at
the end - the changes captured in cdc.change_log are consumed by the listener's own batch
(`dashboard.consume_changes_v2`). Then, for every business:

- the `stats` figures equal an independent SQL computation of DESIGN's definitions over the base tables;
- the daily rollup and the hourly series (a view over the facts) equal the same grouping of the base tables;
- a full rebuild finds nothing to repair (the incremental path was exact, not merely repaired later).

And the other way round: after any history the listener has not (fully) consumed, with rollups corrupted on
top, `aggregates rebuild` in chunks of one business makes every figure exact, and the listener consuming what
was left afterwards keeps them exact.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdc_dashboard.figures import reads, rebuild
from cdc_dashboard.sqlfiles import queries

from ..oracle import ORACLE_DAILY, ORACLE_HOURLY, ROLLUP_DAILY, ROLLUP_HOURLY, STALE_FACTS, expected_figures

BUSINESSES = [
    (uuid.UUID("00000000-0000-4000-8000-00000000000a"), "Africa/Nairobi"),
    (uuid.UUID("00000000-0000-4000-8000-00000000000b"), "America/New_York"),  # DST
    (uuid.UUID("00000000-0000-4000-8000-00000000000c"), "Asia/Kolkata"),  # a half-hour offset
]
CLIENTS = [uuid.UUID(f"00000000-0000-4000-9000-00000000000{i}") for i in range(4)]
STATUSES = ["pending", "completed", "failed", "refunded"]
BOOKING_STATUSES = ["pending", "confirmed", "completed", "cancelled", "no_show"]
PAYMENT_STATUSES = ["unpaid", "pending", "partially_paid", "paid", "refunded"]
AMOUNT_BOUND = 10**12  # payments.amount_minor's upper bound (sql/schema/10_base_tables.sql)


def _anchors() -> list[datetime]:
    """Instants where a day or month turns in Nairobi: figures are most fragile there."""
    nairobi = ZoneInfo("Africa/Nairobi")
    now = datetime.now(nairobi)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return [
        midnight,
        midnight.replace(day=1),
        midnight + timedelta(days=1),
        midnight - timedelta(days=400),  # a late row for an old day
        now.astimezone(UTC),
    ]


clients = st.one_of(st.none(), st.integers(0, len(CLIENTS) - 1))
when = st.tuples(st.integers(0, 4), st.integers(-90, 90))
pay = st.tuples(
    st.just("pay"),
    st.integers(0, 2),
    clients,
    st.one_of(st.integers(0, 5_000_000), st.integers(0, AMOUNT_BOUND)),
    st.sampled_from(["KES", "USD"]),
    st.sampled_from(["completed", *STATUSES]),  # mostly completed: those are the figures
    when,
    st.booleans(),
    # created this long before it was paid: a booking paid the next day, an invoice paid a month later
    st.sampled_from([3, 20 * 60, 40 * 24 * 60]),
)
ops = st.one_of(
    pay,
    st.tuples(st.just("status"), st.integers(0, 99), st.sampled_from(STATUSES)),
    st.tuples(
        st.just("amount"), st.integers(0, 99), st.one_of(st.integers(0, 5_000_000), st.integers(0, AMOUNT_BOUND))
    ),
    # a refund of this much (or of what is left, when less is left: the table refuses more)
    st.tuples(
        st.just("refund"), st.integers(0, 99), st.one_of(st.integers(1, 2_000_000), st.integers(1, AMOUNT_BOUND))
    ),
    # refunded in full: what a provider's full refund does
    st.tuples(st.just("refund_all"), st.integers(0, 99)),
    st.tuples(st.just("currency"), st.integers(0, 99), st.sampled_from(["KES", "USD", "TZS"])),
    st.tuples(st.just("client"), st.integers(0, 99), clients),
    st.tuples(st.just("time"), st.integers(0, 99), st.one_of(st.none(), when)),
    st.tuples(st.just("move"), st.integers(0, 99), st.integers(0, 2)),
    st.tuples(st.just("delete"), st.integers(0, 99)),
    st.tuples(st.just("book"), st.integers(0, 2), st.sampled_from(BOOKING_STATUSES), st.sampled_from(PAYMENT_STATUSES)),
    st.tuples(
        st.just("rebook"), st.integers(0, 99), st.sampled_from(BOOKING_STATUSES), st.sampled_from(PAYMENT_STATUSES)
    ),
    st.tuples(st.just("unbook"), st.integers(0, 99)),
    st.tuples(st.just("movebook"), st.integers(0, 99), st.integers(0, 2)),
    st.tuples(st.just("sync")),
)

# What a chunk's rebuild must carry into other chunks (the business a row left or entered): drawn as often as
# all other operations together where that matters.
moves = st.one_of(
    st.tuples(st.just("move"), st.integers(0, 99), st.integers(0, 2)),
    st.tuples(st.just("movebook"), st.integers(0, 99), st.integers(0, 2)),
)

RESET = """
truncate payments, bookings, payment_transactions, client_business_transactions;
truncate cdc.change_log;
truncate dashboard.payment_facts, dashboard.booking_facts, dashboard.revenue_daily,
         dashboard.business_clients, dashboard.business_client_totals, dashboard.booking_counts;
"""
CONSUME = "select consumed, dead_letters::text from dashboard.consume_changes_v2(5000, 'live', 0)"
# Rollup rows that differ from the same aggregation of the facts, for every business: what the listener's deltas
# rely on (a rebuild of some businesses must leave every other business's rollups agreeing with its facts).
ROLLUPS_OFF_FACTS = """
with daily as (
    select business_id, local_day as day, currency, sum(amount_minor) as revenue_minor, count(*) as payments_count
      from dashboard.payment_facts group by 1, 2, 3
), clients as (
    select business_id, client_id, min(local_day) as first_paid_day
      from dashboard.payment_facts where client_id is not null group by 1, 2
), totals as (
    select b.id as business_id, (select count(*) from clients c where c.business_id = b.id) as n,
           coalesce((select t.clients_total from dashboard.business_client_totals t where t.business_id = b.id), 0)
               as held
      from businesses b
), counts as (
    select business_id, status, payment_status, count(*) as bookings from dashboard.booking_facts group by 1, 2, 3
)
select (select count(*) from ((select * from dashboard.revenue_daily except all select * from daily)
                              union all (select * from daily except all select * from dashboard.revenue_daily)) d)
     + (select count(*) from ((select * from dashboard.business_clients except all select * from clients)
                              union all (select * from clients except all select * from dashboard.business_clients)) c)
     + (select count(*) from totals where n <> held)
     + (select count(*) from ((select * from dashboard.booking_counts except all select * from counts)
                              union all (select * from counts except all select * from dashboard.booking_counts)) k)
"""


@pytest.fixture(scope="module")
def exact_db(admin_url: str, template_db: str) -> Iterator[str]:
    """One database for all examples (each example starts by emptying it): cloning per example is too slow."""
    from cdc_dashboard.db import with_database

    from ..pg import clone_database, drop_database

    name = clone_database(admin_url, template_db)
    url = with_database(admin_url, name)
    with psycopg.connect(url, autocommit=True) as conn:
        for business_id, tz in BUSINESSES:
            conn.execute("insert into businesses (id, name, timezone) values (%s, %s, %s)", (business_id, "Salon", tz))
        for client_id in CLIENTS:
            conn.execute("insert into clients (id, name) values (%s, %s)", (client_id, "Client"))
    yield url
    drop_database(admin_url, name)


def consume(conn: psycopg.Connection[Any]) -> None:
    """What the listener does: its batch, until the change log is empty; nothing may be set aside."""
    while True:
        row = conn.execute(CONSUME).fetchone()
        assert row is not None
        assert row[1] == "[]", f"the batch set changes aside: {row[1]}"
        if row[0] == 0:
            return


def run_history(conn: psycopg.Connection[Any], history: list[tuple[Any, ...]], *, consume_all: bool = True) -> None:
    anchors = _anchors()
    payments: list[uuid.UUID] = []
    bookings: list[uuid.UUID] = []

    def at(w: tuple[int, int]) -> datetime:
        return anchors[w[0]] + timedelta(minutes=w[1], seconds=w[1] % 7)

    for op in history:
        kind = op[0]
        if kind == "pay":
            _, b, c, amount, currency, status, w, paid, lag = op
            pid = uuid.uuid4()
            t = at(w)
            conn.execute(
                "insert into payments (id, business_id, client_id, amount_minor, currency, method, status,"
                " paid_at, created_at) values (%s, %s, %s, %s, %s, 'mpesa', %s, %s, %s)",
                (
                    pid,
                    BUSINESSES[b][0],
                    None if c is None else CLIENTS[c],
                    amount,
                    currency,
                    status,
                    t if paid else None,
                    t - timedelta(minutes=lag) if paid else t,
                ),
            )
            payments.append(pid)
        elif kind == "book":
            _, b, status, pstatus = op
            bid = uuid.uuid4()
            conn.execute(
                "insert into bookings (id, business_id, status, payment_status) values (%s, %s, %s, %s)",
                (bid, BUSINESSES[b][0], status, pstatus),
            )
            bookings.append(bid)
        elif kind == "sync":
            consume(conn)
        elif kind in ("rebook", "unbook", "movebook"):
            if not bookings:
                continue
            bid = bookings[op[1] % len(bookings)]
            if kind == "rebook":
                conn.execute("update bookings set status = %s, payment_status = %s where id = %s", (op[2], op[3], bid))
            elif kind == "movebook":
                conn.execute("update bookings set business_id = %s where id = %s", (BUSINESSES[op[2]][0], bid))
            else:
                conn.execute("delete from bookings where id = %s", (bid,))
                bookings.remove(bid)
        else:
            if not payments:
                continue
            pid = payments[op[1] % len(payments)]
            if kind == "status":
                conn.execute("update payments set status = %s where id = %s", (op[2], pid))
            elif kind == "amount":
                # (never below what was refunded: the table refuses that)
                conn.execute(
                    "update payments set amount_minor = greatest(%s, refunded_minor) where id = %s", (op[2], pid)
                )
            elif kind == "refund":
                conn.execute(
                    "update payments set refunded_minor = least(amount_minor, refunded_minor + %s) where id = %s",
                    (op[2], pid),
                )
            elif kind == "refund_all":
                conn.execute(
                    "update payments set refunded_minor = amount_minor, status = 'refunded' where id = %s", (pid,)
                )
            elif kind == "currency":
                conn.execute("update payments set currency = %s where id = %s", (op[2], pid))
            elif kind == "client":
                client = None if op[2] is None else CLIENTS[op[2]]
                conn.execute("update payments set client_id = %s where id = %s", (client, pid))
            elif kind == "time":
                paid_at = None if op[2] is None else at(op[2])
                conn.execute("update payments set paid_at = %s where id = %s", (paid_at, pid))
            elif kind == "move":
                conn.execute("update payments set business_id = %s where id = %s", (BUSINESSES[op[2]][0], pid))
            elif kind == "delete":
                conn.execute("delete from payments where id = %s", (pid,))
                payments.remove(pid)
    if consume_all:
        consume(conn)


async def check_exact(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        # One transaction: the oracle and the stats query share now(), and so the same "today".
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            for business_id, _ in BUSINESSES:
                got = await reads.stats(conn, business_id)
                assert got is not None
                assert got.figures == await expected_figures(conn, business_id), business_id
                assert [tuple(r) for r in await conn.fetch(ROLLUP_HOURLY, business_id)] == [
                    tuple(r) for r in await conn.fetch(ORACLE_HOURLY, business_id)
                ]
                assert [tuple(r) for r in await conn.fetch(ROLLUP_DAILY, business_id)] == [
                    tuple(r) for r in await conn.fetch(ORACLE_DAILY, business_id)
                ]
            assert await conn.fetchval(STALE_FACTS) == 0, "a fact differs from its definition"
        async with conn.transaction():
            # (the rebuild `aggregates rebuild` and manual refresh run)
            repaired = await conn.fetch(queries("figures")["rebuild"], [b for b, _ in BUSINESSES])
        assert [tuple(r) for r in repaired] == [], "the incremental path left something for the rebuild to repair"
    finally:
        await conn.close()


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(first=st.lists(pay, min_size=1, max_size=10), then=st.lists(ops, max_size=30))
def test_figures_equal_their_definition_after_any_history(
    exact_db: str, first: list[tuple[Any, ...]], then: list[tuple[Any, ...]]
) -> None:
    with psycopg.connect(exact_db, autocommit=True) as conn:
        conn.execute(RESET)
        run_history(conn, first + then)
    asyncio.run(check_exact(exact_db))


# What a ledger loaded with capture off, a lost rollup or a bug leaves behind, on top of a history.
CORRUPT = [
    """update dashboard.revenue_daily set revenue_minor = revenue_minor + 7
        where (business_id, day) in (select business_id, max(day) from dashboard.revenue_daily group by 1)""",
    """delete from dashboard.payment_facts
        where payment_id in (select payment_id from dashboard.payment_facts order by payment_id limit 2)""",
    """update dashboard.payment_facts set business_id = %(b)s
        where payment_id = (select payment_id from dashboard.payment_facts order by payment_id desc limit 1)""",
    "delete from dashboard.business_clients where client_id = %(c)s",
    """insert into dashboard.booking_counts values (%(b)s, 'pending', 'unpaid', 3)
       on conflict (business_id, status, payment_status) do update set bookings = 3""",
]


async def rebuild_in_chunks_of_one(url: str, business_ids: list[uuid.UUID] | None) -> list[str]:
    conn = await asyncpg.connect(url)
    try:
        lines: list[str] = []
        await rebuild.rebuild(conn, business_ids, progress=lines.append, chunk_businesses=1, progress_seconds=0)
        return lines
    finally:
        await conn.close()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    first=st.lists(pay, min_size=1, max_size=10),
    # moves are what a chunk's rebuild must carry into other chunks: drawn as often as everything else
    then=st.lists(st.one_of(ops, moves), max_size=30),
    scope=st.one_of(st.none(), st.integers(0, len(BUSINESSES) - 1)),
    corrupt=st.booleans(),
    client=st.integers(0, len(CLIENTS) - 1),
)
def test_rebuild_in_chunks_makes_any_history_exact(
    exact_db: str,
    first: list[tuple[Any, ...]],
    then: list[tuple[Any, ...]],
    scope: int | None,
    corrupt: bool,
    client: int,
) -> None:
    """Every business (or one: `--business`) rebuilt in chunks of one business, so payments and bookings moved
    between businesses cross chunks; then the listener consumes what the history left in the change log."""
    with psycopg.connect(exact_db, autocommit=True) as conn:
        conn.execute(RESET)
        # The listener consumed the first payments, then stopped: what happened since waits in the change log.
        run_history(conn, [*first, ("sync",), *then], consume_all=False)
        if corrupt and scope is None:
            for statement in CORRUPT:
                conn.execute(statement, {"b": BUSINESSES[2][0], "c": CLIENTS[client]})
    chosen = None if scope is None else [BUSINESSES[scope][0]]
    lines = asyncio.run(rebuild_in_chunks_of_one(exact_db, chosen))
    total = len(BUSINESSES) if scope is None else 1
    assert lines[0].startswith(f"aggregates rebuild: {total} businesses") and f"in {total} chunks" in lines[0]
    assert lines[-1].startswith(f"aggregates rebuild: {total}/{total} businesses (100%)"), lines
    with psycopg.connect(exact_db, autocommit=True) as conn:
        assert conn.execute(ROLLUPS_OFF_FACTS).fetchone() == (0,), "a rollup disagrees with the facts"
    if scope is None:
        asyncio.run(check_exact(exact_db))
    # The listener catches up on the same rows: nothing counted twice, nothing lost. (After a rebuild of one
    # business, the others' rollups must still agree with their facts for this to come out exact.)
    with psycopg.connect(exact_db, autocommit=True) as conn:
        consume(conn)
    asyncio.run(check_exact(exact_db))


def test_rebuild_of_one_business_repairs_the_business_a_payment_moved_to(exact_db: str) -> None:
    """`--business A` after a payment moved from A to B (not consumed yet): A's figures lose it, B's gain it
    and B gets an invalidation too, and the listener's later sync of the move counts nothing twice."""
    a, b = BUSINESSES[0][0], BUSINESSES[1][0]
    with psycopg.connect(exact_db, autocommit=True) as conn:
        conn.execute(RESET)
        run_history(conn, [("pay", 0, 0, 1500, "KES", "completed", (0, 5), True, 3)])
        conn.execute("update payments set business_id = %s", (b,))
    report = asyncio.run(rebuild_one(exact_db, a))
    assert report.repaired == {  # (a repaired fact is reported under the business it counts for now, as v2 did)
        str(a): {"revenue_daily": 1, "business_clients": 1, "business_client_totals": 1},
        str(b): {"payment_facts": 1, "revenue_daily": 1, "business_clients": 1, "business_client_totals": 1},
    }
    assert len(report.event_ids) == 2 and report.businesses == 1
    with psycopg.connect(exact_db, autocommit=True) as conn:
        consume(conn)
    asyncio.run(check_exact(exact_db))


async def rebuild_one(url: str, business_id: uuid.UUID) -> rebuild.RebuildReport:
    conn = await asyncpg.connect(url)
    try:
        return await rebuild.rebuild(conn, [business_id])
    finally:
        await conn.close()


def test_rebuild_repairs_and_reports_corrupted_rollups(exact_db: str) -> None:
    """The full path is the safety net: corrupt every rollup, and a rebuild puts each back and says so."""
    b = BUSINESSES[0][0]
    with psycopg.connect(exact_db, autocommit=True) as conn:
        conn.execute(RESET)
        run_history(
            conn,
            [
                ("pay", 0, 0, 1500, "KES", "completed", (0, 5), True, 3),
                ("pay", 0, 1, 700, "USD", "completed", (4, 0), False, 3),
                ("book", 0, "confirmed", "paid"),
            ],
        )
        conn.execute(
            "update dashboard.revenue_daily set revenue_minor = revenue_minor + 1 where business_id = %s", (b,)
        )
        conn.execute("delete from dashboard.business_clients where business_id = %s", (b,))
        conn.execute("update dashboard.business_client_totals set clients_total = 9 where business_id = %s", (b,))
        conn.execute("update dashboard.booking_counts set bookings = 5 where business_id = %s", (b,))

    async def rebuild_it() -> rebuild.RebuildReport:
        conn = await asyncpg.connect(exact_db)
        try:
            return await rebuild.rebuild(conn, [b])
        finally:
            await conn.close()

    report = asyncio.run(rebuild_it())
    assert report.repaired[str(b)] == {
        "revenue_daily": 2,
        "business_clients": 2,
        "business_client_totals": 1,
        "booking_counts": 1,
    }
    assert len(report.event_ids) == 1
    asyncio.run(check_exact(exact_db))

    # Lost facts: the rebuild recomputes them from the base tables, and the figures follow.
    with psycopg.connect(exact_db, autocommit=True) as conn:
        conn.execute("delete from dashboard.payment_facts where business_id = %s", (b,))
    report = asyncio.run(rebuild_it())
    assert report.repaired[str(b)]["payment_facts"] == 2
    asyncio.run(check_exact(exact_db))
    assert asyncio.run(rebuild_it()).repaired == {}, "a second rebuild finds nothing left to repair"
