"""The oracle for guarantee 5: DESIGN's "Figure definitions" written straight over the base tables, independently
of the rollups the listener maintains. Shared by the exact-figures property test and the chaos run (bench/chaos.py).
"""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg

from cdc_dashboard.figures import reads

__all__ = [
    "ORACLE_DAILY",
    "ORACLE_HOURLY",
    "ROLLUP_DAILY",
    "ROLLUP_HOURLY",
    "STALE_FACTS",
    "expected_figures",
    "figure_mismatches",
]

# The oracle: DESIGN's "Figure definitions", written straight over the base tables, independently of the
# rollups. `now()` is the transaction's, shared with the stats query run in the same transaction.
ORACLE_REVENUE = """
select p.currency,
       sum(p.amount_minor - p.refunded_minor) as total_minor,
       coalesce(sum(p.amount_minor - p.refunded_minor) filter (
           where (coalesce(p.paid_at, p.created_at) at time zone b.timezone)::date
               = (now() at time zone b.timezone)::date), 0) as today_minor,
       coalesce(sum(p.amount_minor - p.refunded_minor) filter (
           where date_trunc('month', coalesce(p.paid_at, p.created_at) at time zone b.timezone)
               = date_trunc('month', now() at time zone b.timezone)), 0) as month_minor
  from payments p join businesses b on b.id = p.business_id
 where p.business_id = $1 and p.status = 'completed'
 group by p.currency
"""
ORACLE_COUNTS = """
select count(*) as payments_count, count(distinct p.client_id) as clients_total
  from payments p where p.business_id = $1 and p.status = 'completed'
"""
ORACLE_NEW_TODAY = """
select count(*) from (
    select p.client_id, min(coalesce(p.paid_at, p.created_at)) as first_paid
      from payments p where p.business_id = $1 and p.status = 'completed' and p.client_id is not null
     group by p.client_id
) as f, businesses b
 where b.id = $1 and (f.first_paid at time zone b.timezone)::date = (now() at time zone b.timezone)::date
"""
ORACLE_BY_STATUS = "select status, count(*) from bookings where business_id = $1 group by 1"
ORACLE_BY_PAYMENT_STATUS = "select payment_status, count(*) from bookings where business_id = $1 group by 1"
ORACLE_HOURLY = """
select date_trunc('hour', coalesce(p.paid_at, p.created_at), b.timezone) as bucket, p.currency,
       sum(p.amount_minor - p.refunded_minor), count(*)
  from payments p join businesses b on b.id = p.business_id
 where p.business_id = $1 and p.status = 'completed' group by 1, 2 order by 1, 2
"""
ORACLE_DAILY = """
select (coalesce(p.paid_at, p.created_at) at time zone b.timezone)::date as bucket, p.currency,
       sum(p.amount_minor - p.refunded_minor), count(*)
  from payments p join businesses b on b.id = p.business_id
 where p.business_id = $1 and p.status = 'completed' group by 1, 2 order by 1, 2
"""
ROLLUP_HOURLY = """
select hour_start, currency, revenue_minor, payments_count from dashboard.revenue_hourly
 where business_id = $1 order by 1, 2
"""
ROLLUP_DAILY = """
select day, currency, revenue_minor, payments_count from dashboard.revenue_daily
 where business_id = $1 order by 1, 2
"""
# Facts that differ from their definition over the base tables, either way (a fact left behind for a row
# that no longer counts included: the rebuild would fix it without a figure ever showing it).
STALE_FACTS = """
select (select count(*) from (
            (select * from dashboard.payment_facts except all select * from dashboard.completed_payment_facts_v3)
            union all
            (select * from dashboard.completed_payment_facts_v3 except all select * from dashboard.payment_facts)
        ) as payments)
     + (select count(*) from (
            (select * from dashboard.booking_facts
             except all select id, business_id, status, payment_status from bookings)
            union all
            (select id, business_id, status, payment_status from bookings
             except all select * from dashboard.booking_facts)
        ) as bookings)
"""


async def expected_figures(conn: asyncpg.Connection, business_id: uuid.UUID) -> dict[str, Any]:
    revenue = {
        r["currency"]: {k: r[k] for k in ("total_minor", "today_minor", "month_minor")}
        for r in await conn.fetch(ORACLE_REVENUE, business_id)
    }
    counts = await conn.fetchrow(ORACLE_COUNTS, business_id)
    assert counts is not None
    return {
        "revenue": dict(sorted(revenue.items())),
        "payments_count": counts["payments_count"],
        "clients_total": counts["clients_total"],
        "clients_new_today": await conn.fetchval(ORACLE_NEW_TODAY, business_id),
        "bookings": {
            "by_status": dict(sorted((r[0], r[1]) for r in await conn.fetch(ORACLE_BY_STATUS, business_id))),
            "by_payment_status": dict(
                sorted((r[0], r[1]) for r in await conn.fetch(ORACLE_BY_PAYMENT_STATUS, business_id))
            ),
        },
    }


async def figure_mismatches(conn: asyncpg.Connection, business_ids: list[uuid.UUID]) -> list[str]:
    """What differs from the oracle, for each business: its `stats` figures, its hourly and daily series, and the
    facts behind them. Run it in one transaction, so the oracle and the figures share now() and so "today"."""
    found = []
    for business_id in business_ids:
        got = await reads.stats(conn, business_id)
        want = await expected_figures(conn, business_id)
        if got is None or got.figures != want:
            found.append(f"{business_id} stats: {got.figures if got else None} != {want}")
        for name, rollup, oracle in (("hourly", ROLLUP_HOURLY, ORACLE_HOURLY), ("daily", ROLLUP_DAILY, ORACLE_DAILY)):
            if [tuple(r) for r in await conn.fetch(rollup, business_id)] != [
                tuple(r) for r in await conn.fetch(oracle, business_id)
            ]:
                found.append(f"{business_id} {name} series differ from the oracle")
    if stale := await conn.fetchval(STALE_FACTS):
        found.append(f"{stale} facts differ from their definition")
    return found
