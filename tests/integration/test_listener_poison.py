"""Guarantee 6: no row the tables accept can stop the pipeline.

A change the listener's batch cannot process is isolated and set aside in `dashboard.dead_letters` with its SQL
error; every other change of its batch commits and goes out. Transient errors are retried, never set aside.
The poison here is a check constraint on the facts table that rejects one amount: the shape of a bug or of a
value some function refuses, whatever the cause.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import psycopg
import pytest

from ..listening import event_rows, running_listener, wait_for

POISON_AMOUNT = 666


def new_business(conn: psycopg.Connection[Any]) -> str:
    business = str(uuid.uuid4())
    conn.execute("insert into businesses (id, name) values (%s, 'Salon')", (business,))
    return business


def insert_payments(conn: psycopg.Connection[Any], business: str, amounts: list[int]) -> list[str]:
    ids = [str(uuid.uuid4()) for _ in amounts]
    with conn.cursor() as cur:
        cur.executemany(
            "insert into payments (id, business_id, amount_minor, currency, method, status)"
            " values (%s, %s, %s, 'KES', 'mpesa', 'completed')",
            [(i, business, a) for i, a in zip(ids, amounts, strict=True)],
        )
    return ids


def changes_delivered(db_url: str, business: str) -> int:
    """How many changes of this business the events carry (an event lists at most 100, and counts all)."""
    return sum(
        json.loads(e["payload"])["change_count"] if isinstance(e["payload"], str) else e["payload"]["change_count"]
        for e in event_rows(db_url)
        if e["business_id"] == business
    )


def revenue(conn: psycopg.Connection[Any], business: str) -> tuple[Any, ...] | None:
    return conn.execute(
        "select sum(revenue_minor), sum(payments_count) from dashboard.revenue_daily where business_id = %s",
        (business,),
    ).fetchone()


async def test_a_poison_change_among_a_thousand_is_set_aside_and_the_rest_delivered(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            f"alter table dashboard.payment_facts add constraint poison check (amount_minor <> {POISON_AMOUNT})"
        )
        a, b = new_business(conn), new_business(conn)
        # One transaction, so the poison sits in the middle of one batch with the good ones.
        with conn.transaction():
            good_a = insert_payments(conn, a, list(range(1000, 1500)))
            poison = insert_payments(conn, a, [POISON_AMOUNT])[0]
            good_b = insert_payments(conn, b, list(range(2000, 2500)))
        async with running_listener(db_url) as listener:
            assert await wait_for(lambda: changes_delivered(db_url, b) == 500)
            assert changes_delivered(db_url, a) == 500
            assert listener.status()["state"] == "live"

            letters = conn.execute(
                "select change ->> 'row_id', change ->> 'table', change ->> 'business_id', reason, sqlstate"
                " from dashboard.dead_letters"
            ).fetchall()
            assert len(letters) == 1
            row_id, table, business, reason, sqlstate = letters[0]
            assert (row_id, table, business, sqlstate) == (poison, "public.payments", a, "23514")
            assert 'violates check constraint "poison"' in reason
            assert revenue(conn, a) == (sum(range(1000, 1500)), len(good_a))
            assert revenue(conn, b) == (sum(range(2000, 2500)), len(good_b))
            assert conn.execute("select count(*) from cdc.change_log").fetchone() == (0,)

            # The listener goes on: a later payment of the same business arrives as usual.
            later = insert_payments(conn, a, [7])[0]
            events = await wait_for(
                lambda: [e for e in event_rows(db_url) if later in json.dumps(e["payload"])], timeout=10
            )
            assert events
            assert revenue(conn, a) == (sum(range(1000, 1500)) + 7, len(good_a) + 1)


async def test_transient_errors_are_retried_not_set_aside(db_url: str, admin_url: str) -> None:
    """A lock timeout says nothing about the change: the batch is retried until it goes through."""
    dbname = psycopg.conninfo.conninfo_to_dict(db_url)["dbname"]
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f"alter database \"{dbname}\" set lock_timeout = '100ms'")
    with psycopg.connect(db_url, autocommit=True) as conn, psycopg.connect(db_url) as blocker:
        business = new_business(conn)
        blocker.execute("lock table dashboard.payment_facts in access exclusive mode")
        async with running_listener(db_url, probe_interval=0.5) as listener:
            insert_payments(conn, business, [150000])
            await wait_for(lambda: listener.status()["reconnects"] >= 2)
            assert "LockNotAvailable" in str(listener.status()["last_error"])
            assert event_rows(db_url) == []
            blocker.rollback()  # the lock goes: the next attempt succeeds
            await wait_for(lambda: changes_delivered(db_url, business) == 1, timeout=20)
        assert conn.execute("select count(*) from dashboard.dead_letters").fetchone() == (0,)
        assert revenue(conn, business) == (150000, 1)


async def test_sums_past_the_bigint_range_are_exact(db_url: str) -> None:
    """A database that held amounts past today's bound before it was applied (the bound is NOT VALID there):
    two payments whose sum overflows bigint used to stop every dashboard; the figures are now exact."""
    big = 6_000_000_000_000_000_000  # each fits a bigint, their sum does not
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("alter table payments drop constraint payments_amount_minor_bound")
        business = new_business(conn)
        insert_payments(conn, business, [big, big])
        async with running_listener(db_url):
            await wait_for(lambda: changes_delivered(db_url, business) == 2)
        assert revenue(conn, business) == (2 * big, 2)
        assert conn.execute("select count(*) from dashboard.dead_letters").fetchone() == (0,)


def test_the_table_bounds_amounts(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        business = new_business(conn)
        insert_payments(conn, business, [10**12])
        with pytest.raises(psycopg.errors.CheckViolation):
            insert_payments(conn, business, [10**12 + 1])
        payment = insert_payments(conn, business, [500])[0]
        conn.execute("update payments set refunded_minor = 200 where id = %s", (payment,))
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("update payments set refunded_minor = 501 where id = %s", (payment,))
