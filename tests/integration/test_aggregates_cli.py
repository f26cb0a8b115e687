"""`cdc-dashboard aggregates rebuild [--business ID]` as an operator runs it: repairs reported, invalidations
emitted, mistakes as one line."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import subprocess
import sys
import uuid

import asyncpg
import psycopg
import pytest

from cdc_dashboard.figures import rebuild
from cdc_dashboard.sqlfiles import queries

CLI = [sys.executable, "-m", "cdc_dashboard.cli"]


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
    return subprocess.run([*CLI, *args], env={**clean, **env}, capture_output=True, text=True, timeout=120)


def test_rebuild_reports_repairs_and_emits_events(db_url: str) -> None:
    b, other = str(uuid.uuid4()), str(uuid.uuid4())
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("insert into businesses (id, name) values (%s, 'Salon'), (%s, 'Other')", (b, other))
        # Nobody consumed these changes: the rollups know nothing of the payments yet.
        conn.execute(
            "insert into payments (business_id, amount_minor, currency, method, status)"
            " values (%s, 1000, 'KES', 'cash', 'completed'), (%s, 5, 'KES', 'cash', 'completed')",
            (b, other),
        )
    first = run_cli("aggregates", "rebuild", "--business", b, CDC_DATABASE_URL=db_url)
    assert first.returncode == 0, first.stderr
    assert f"{b}: repaired" in first.stdout
    assert "payment_facts 1 rows" in first.stdout  # the unseen payment, counted through its fact
    assert "rebuilt 1 businesses; repaired 1 of them; emitted 1 invalidation events" in first.stdout
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert conn.execute("select sum(revenue_minor) from dashboard.revenue_daily").fetchone() == (1000,)
        events = conn.execute("select business_id, payload->>'reason' from dashboard.events").fetchall()
    assert events == [(b, "manual_refresh")]

    everything = run_cli("aggregates", "rebuild", CDC_DATABASE_URL=db_url)
    assert everything.returncode == 0, everything.stderr
    assert f"{other}: repaired" in everything.stdout and f"{b}: repaired" not in everything.stdout
    assert "rebuilt 2 businesses" in everything.stdout

    again = run_cli("aggregates", "rebuild", CDC_DATABASE_URL=db_url)
    assert "nothing needed repair" in again.stdout


def test_rebuild_mistakes_are_one_line(db_url: str) -> None:
    for business, reason in [("nope", "must be a business id"), (str(uuid.uuid4()), "no such business")]:
        result = run_cli("aggregates", "rebuild", "--business", business, CDC_DATABASE_URL=db_url)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and reason in lines[0], result.stderr


# -- a rebuild of many businesses, in chunks ---------------------------------------------------------------

# A ledger for `n` businesses, loaded with capture off (as a restore or a bulk load would): the aggregates know
# nothing of it. Business k has k % 5 payments (mixed statuses, currencies, clients, days) and k % 3 bookings.
LEDGER = """
set session_replication_role = replica;
insert into clients (id, name) select ('00000000-0000-4000-9000-' || lpad(c::text, 12, '0'))::uuid, 'Client'
  from generate_series(1, 20) as c;
insert into businesses (id, name, timezone)
select ('00000000-0000-4000-8000-' || lpad(k::text, 12, '0'))::uuid, 'Business ' || k,
       (array['Africa/Nairobi', 'America/New_York', 'Asia/Kolkata'])[1 + k % 3]
  from generate_series(1, NUMBER) as k;
insert into payments (business_id, client_id, amount_minor, refunded_minor, currency, method, status, paid_at,
                      created_at)
select ('00000000-0000-4000-8000-' || lpad(k::text, 12, '0'))::uuid,
       case when i <> 3 then ('00000000-0000-4000-9000-' || lpad((1 + (k * 7 + i) % 20)::text, 12, '0'))::uuid end,
       100 * (k + i), case when i = 2 then 50 else 0 end, (array['KES', 'USD'])[1 + (k + i) % 2], 'cash',
       (array['completed', 'completed', 'pending', 'refunded'])[1 + (k * i) % 4],
       now() - (k % 40) * interval '1 day' - i * interval '7 hours', now() - (k % 40) * interval '1 day'
  from generate_series(1, NUMBER) as k, generate_series(1, k % 5) as i;
insert into bookings (business_id, status, payment_status)
select ('00000000-0000-4000-8000-' || lpad(k::text, 12, '0'))::uuid,
       (array['pending', 'confirmed', 'completed'])[1 + (k + j) % 3],
       (array['unpaid', 'paid'])[1 + (k * j) % 2]
  from generate_series(1, NUMBER) as k, generate_series(1, k % 3) as j;
reset session_replication_role;
"""

# Rollup rows that differ from DESIGN's definitions computed straight from the base tables, every business.
OFF_THE_LEDGER = """
with facts as (
    select p.id, p.business_id, p.currency, p.amount_minor - p.refunded_minor as amount, p.client_id,
           (coalesce(p.paid_at, p.created_at) at time zone b.timezone)::date as day
      from payments p join businesses b on b.id = p.business_id where p.status = 'completed'
), daily as (
    select business_id, day, currency, sum(amount) as revenue_minor, count(*) as payments_count
      from facts group by 1, 2, 3
), clients as (
    select business_id, client_id, min(day) as first_paid_day from facts where client_id is not null group by 1, 2
), totals as (
    select b.id, (select count(*) from clients c where c.business_id = b.id) as n,
           coalesce((select t.clients_total from dashboard.business_client_totals t where t.business_id = b.id), 0)
               as held
      from businesses b
), counts as (
    select business_id, status, payment_status, count(*) as bookings from bookings group by 1, 2, 3
)
select (select count(*) from ((select * from dashboard.revenue_daily except all select * from daily)
                              union all (select * from daily except all select * from dashboard.revenue_daily)) d)
     + (select count(*) from ((select * from dashboard.business_clients except all select * from clients)
                              union all (select * from clients except all select * from dashboard.business_clients)) c)
     + (select count(*) from totals where n <> held)
     + (select count(*) from ((select * from dashboard.booking_counts except all select * from counts)
                              union all (select * from counts except all select * from dashboard.booking_counts)) k)
     + (select count(*) from ((select id, business_id, currency, amount, client_id from facts
                               except all select payment_id, business_id, currency, amount_minor, client_id
                                            from dashboard.payment_facts)
                              union all (select payment_id, business_id, currency, amount_minor, client_id
                                           from dashboard.payment_facts
                                         except all select id, business_id, currency, amount, client_id from facts)) f)
"""


def ledger(n: int) -> bytes:
    return LEDGER.replace("NUMBER", str(n)).encode()


def business(k: int) -> uuid.UUID:
    return uuid.UUID(f"00000000-0000-4000-8000-{k:012d}")


async def rebuild_in_small_chunks(url: str) -> tuple[rebuild.RebuildReport, list[str]]:
    conn = await asyncpg.connect(url)
    try:
        lines: list[str] = []
        report = await rebuild.rebuild(
            conn, progress=lines.append, chunk_businesses=7, chunk_rows=40, progress_seconds=0
        )
        return report, lines
    finally:
        await conn.close()


def test_rebuild_of_every_business_in_chunks_shows_progress_and_leaves_figures_exact(db_url: str) -> None:
    n = 300
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(ledger(n))
        rows = conn.execute("select (select count(*) from payments) + (select count(*) from bookings)").fetchone()
        counted = conn.execute(
            "select count(*) from (select business_id from payments where status = 'completed'"
            " union select business_id from bookings) as b"
        ).fetchone()
        assert conn.execute(OFF_THE_LEDGER).fetchone() != (0,)  # nothing built yet
    assert rows is not None and counted is not None

    report, lines = asyncio.run(rebuild_in_small_chunks(db_url))
    assert report.businesses == n and len(report.event_ids) == n
    assert len(report.repaired) == counted[0] > n // 2  # each business that counts a row
    first = re.fullmatch(rf"aggregates rebuild: {n} businesses, {rows[0]} rows .*, in (\d+) chunks", lines[0])
    assert first is not None, lines[0]
    chunks = int(first[1])
    assert chunks >= n // 7
    done = [int(m[1]) for m in (re.match(r"aggregates rebuild: (\d+)/300 businesses", line) for line in lines[1:]) if m]
    assert len(done) == len(lines) - 1 == chunks  # a line per chunk (progress_seconds=0), the last one the summary
    assert done == sorted(done) and done[-1] == n and all(0 < b - a <= 7 for a, b in itertools.pairwise(done))
    assert lines[-1].startswith(f"aggregates rebuild: {n}/{n} businesses (100%), {rows[0]}/{rows[0]} rows")
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert conn.execute(OFF_THE_LEDGER).fetchone() == (0,)

        # Drift, in businesses that land in different chunks; a rebuild puts back exactly those.
        def first_after(k: int, table: str) -> uuid.UUID:
            row = conn.execute(
                f"select business_id from {table} where business_id > %s order by 1 limit 1", (business(k),)
            )
            found = row.fetchone()
            assert found is not None and found[0] is not None
            return uuid.UUID(str(found[0]))

        drifted = {
            first_after(10, "dashboard.revenue_daily"): {"revenue_daily"},
            first_after(100, "dashboard.payment_facts"): {"payment_facts"},  # (the rollups still count it)
            first_after(200, "dashboard.business_clients"): {"business_clients", "business_client_totals"},
            first_after(290, "dashboard.booking_counts"): {"booking_counts"},
        }
        a, b, c, d = drifted
        conn.execute(
            "update dashboard.revenue_daily set revenue_minor = revenue_minor + 1 where business_id = %s", (a,)
        )
        conn.execute(
            "delete from dashboard.payment_facts where payment_id ="
            " (select payment_id from dashboard.payment_facts where business_id = %s limit 1)",
            (b,),
        )
        conn.execute("delete from dashboard.business_clients where business_id = %s", (c,))
        conn.execute("update dashboard.business_client_totals set clients_total = 0 where business_id = %s", (c,))
        conn.execute("update dashboard.booking_counts set bookings = 9 where business_id = %s", (d,))
        assert conn.execute(OFF_THE_LEDGER).fetchone() != (0,)
    report, _ = asyncio.run(rebuild_in_small_chunks(db_url))
    assert {b: set(r) for b, r in report.repaired.items()} == {str(k): v for k, v in drifted.items()}
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert conn.execute(OFF_THE_LEDGER).fetchone() == (0,)
    assert asyncio.run(rebuild_in_small_chunks(db_url))[0].repaired == {}


def test_rebuild_prints_progress_on_stderr_and_the_report_on_stdout(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(ledger(250))
    result = run_cli("aggregates", "rebuild", CDC_DATABASE_URL=db_url)
    assert result.returncode == 0, result.stderr
    progress = result.stderr.strip().splitlines()
    assert progress[0].startswith("aggregates rebuild: 250 businesses, ") and " chunks" in progress[0]
    assert progress[-1].startswith("aggregates rebuild: 250/250 businesses (100%)"), progress
    assert all(line.startswith("aggregates rebuild: ") for line in progress)
    out = result.stdout.strip().splitlines()
    assert not any(line.startswith("aggregates rebuild") for line in out)
    assert out[-1].startswith("rebuilt 250 businesses; repaired ")
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert conn.execute(OFF_THE_LEDGER).fetchone() == (0,)


def test_a_chunk_reads_its_rows_through_indexes(db_url: str) -> None:
    """Every statement of the rebuild function, as planned for a chunk: no sequential scan anywhere (a scan per
    chunk would make a rebuild of every business quadratic), and the chunk's payments found by their business."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(ledger(40))
        conn.execute("analyze")
        try:
            conn.execute("load 'auto_explain'")
        except psycopg.Error:
            pytest.skip("auto_explain is not available on this server")
        for setting in (
            "auto_explain.log_min_duration = 0",
            "auto_explain.log_nested_statements = on",
            "auto_explain.log_level = notice",
            "client_min_messages = notice",
        ):
            conn.execute(f"set {setting}")
        plans: list[str] = []
        conn.add_notice_handler(lambda d: plans.append(d.message_primary or ""))
        with conn.transaction():
            conn.execute(queries("figures")["rebuild"].replace("$1", "%s"), ([business(k) for k in range(1, 15)],))
    statements = [p for p in plans if "rebuild_aggregates" not in p.split("\n", 2)[1]]
    assert len(statements) > 8, plans
    assert not [p for p in statements if "Seq Scan" in p], "a statement scans a whole table per chunk"
    assert any("Index Cond: (p.business_id = ANY" in p or ("on payments p" in p and "Index" in p) for p in statements)
