"""The listener's batch alone: time per batch of a fixed backlog, by parts, run and rolled back many times.

    .venv/bin/python bench/batch_cost.py [--changes 400] [--rounds 5] [--batches 40]

The throughput ratios (bench/capture_overhead.py, bench/listener_parts.py) swing by ±0.05 from run to run on
this shared machine; a change to the batch worth a few percent of the listener's cost cannot be seen in them.
Here nothing else runs: a scratch database with 20,000 payments over 1,000 businesses, consumed (facts,
aggregates and events in place), then a backlog of `--changes` new completed payments. One connection runs
the listener's batch (`dashboard.consume_changes_v2`, as the listener calls it) on that backlog and rolls it
back, `--batches` times, for each variant of bench/listener_parts.py in turn (the rewritten
`consume_changes_body_v2`) and one more, `no_toasts` (events without the payments list for toasts), with a
vacuum of the tables the batch writes before each variant. Prints per variant the median over rounds of the
20th-percentile batch (a batch that a checkpoint or a neighbour's process slowed down says nothing about the
batch), in ms and µs per change, and the median over rounds of its time over the full batch's in that round.
Scratch database, dropped at the end.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import psycopg

from capture_overhead import BUSINESSES, SETUP
from listener_parts import VARIANTS, variant_sources
from scratch import scratch_database

# Beyond bench/listener_parts.py's variants: the events without the payments' toasts (no lookup of the payment,
# no toast JSON, no toast list), the largest single part of building the events.
ALL_VARIANTS = VARIANTS | {
    "no_toasts": [
        (
            "left join payments p on p.id = case when u.first_toast then u.row_id::uuid end and p.status = 'completed'",
            "left join payments p on false",
        )
    ],
}
PAYMENTS = """
insert into payments (business_id, amount_minor, currency, method, status)
select ('00000000-0000-0000-0000-' || lpad((1 + floor(random() * {businesses}))::text, 12, '0'))::uuid,
       100 + n, 'KES', 'mpesa', 'completed'
  from generate_series(1, {n}) as n
"""
BATCH = "select * from dashboard.consume_changes_v2(5000, 'live', 0)"
# Every rolled-back batch leaves dead rows, which would bring autovacuum and autoanalyze in the middle of a
# measurement (new statistics, new plans): the benchmarks that roll batches back vacuum between cases themselves.
AUTOVACUUM_OFF = (
    "do $$ declare t regclass; begin for t in select c.oid from pg_class c join pg_namespace n"
    " on n.oid = c.relnamespace where c.relkind = 'r' and n.nspname in ('public', 'dashboard', 'cdc')"
    " loop execute format('alter table %s set (autovacuum_enabled = off)', t); end loop; end $$"
)
WRITTEN = "dashboard.payment_facts, dashboard.revenue_daily, dashboard.events, cdc.change_log"


def batch_seconds(url: str, source: str, batches: int, batch: str = BATCH) -> float:
    """The 20th percentile of `batches` runs of one batch (`batch`) over the backlog, each rolled back, after
    running `source` (a variant of the batch function)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(source)
        conn.execute(f"vacuum {WRITTEN}")
    with psycopg.connect(url) as conn:
        for _ in range(3):  # plans, caches
            conn.execute(batch)
            conn.rollback()
        times = []
        for _ in range(batches):
            start = time.perf_counter()
            conn.execute(batch).fetchall()
            times.append(time.perf_counter() - start)
            conn.rollback()
    return sorted(times)[len(times) // 5]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--changes", type=int, default=400, help="the backlog one batch consumes")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=40, help="batches timed per variant and round")
    args = parser.parse_args()
    results: dict[str, list[float]] = {name: [] for name in ALL_VARIANTS}
    with scratch_database() as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(SETUP.format(n=BUSINESSES))
            conn.execute("select setseed(0.42)")  # the same businesses in every run (random, as pgbench spreads them)
            conn.execute(PAYMENTS.format(businesses=BUSINESSES, n=20000))
            while (consumed := conn.execute(BATCH).fetchone()) and consumed[0]:
                pass  # the history is consumed: facts, aggregates and events exist
            conn.execute(PAYMENTS.format(businesses=BUSINESSES, n=args.changes))
            conn.execute("vacuum analyze")
            conn.execute(AUTOVACUUM_OFF)
            sources = variant_sources(conn, ALL_VARIANTS)
        for i in range(args.rounds):
            for name in list(ALL_VARIANTS) if i % 2 == 0 else list(reversed(ALL_VARIANTS)):
                results[name].append(batch_seconds(url, sources[name], args.batches))
    for name in ALL_VARIANTS:
        ms = statistics.median(results[name]) * 1000
        # Within a round the variants run seconds apart; the machine's speed drifts more between rounds.
        share = statistics.median(x / f for x, f in zip(results[name], results["full"], strict=True))
        print(
            f"{name:14s} {ms:6.2f} ms per batch of {args.changes}  {ms * 1000 / args.changes:5.1f} µs per change"
            f"  {share:4.2f} of full (median per round)  (rounds: {[round(x * 1000, 2) for x in results[name]]})",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
