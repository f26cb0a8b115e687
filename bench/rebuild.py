"""`cdc-dashboard aggregates rebuild` of every business: time, progress lines, exactness (docs/BENCHMARKS.md).

    .venv/bin/python bench/rebuild.py [--payments 1000000] [--before SRC] [--timeout 900] [--database NAME] [--keep]

Creates a scratch database on CDC_BENCH_ADMIN_URL (default postgresql://postgres@127.0.0.1:5432/postgres),
applies the schema and loads bench/figures_data.sql with `--payments` payments (10k businesses, one of them
holding 10% of the payments; 3 bookings per 10 payments), with the capture triggers bypassed and no aggregate
built: the state a ledger loaded with capture disabled, or restored, is in. Then, for each code version (this
checkout, and `--before SRC`, a `src` directory of another version, e.g. `git archive main src | tar -x -C
/tmp/before`; before first):

1. cold: the aggregates emptied and analyzed empty (as right after such a load), then the real CLI,
   `python -m cdc_dashboard.cli aggregates rebuild`, in a subprocess: it builds every fact and rollup;
2. steady, after every version's cold run (on what this checkout's cold run built): the same command again,
   with nothing left to repair (the routine run).

Each run prints its wall time, the number of progress lines on stderr and the longest silence between two
(from the start to the first, and from the last to the exit included), and the CLI's summary line; a run
longer than `--timeout` seconds is stopped and reported with how many payment facts it had built. After the
last run the figures are checked against the ledger (DESIGN's definitions over the base tables). The scratch
database is dropped at the end unless `--keep`; `--database NAME` reuses one that has the schema and data.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg

from cdc_dashboard.migrations import apply
from scratch import scratch_database

ROOT = Path(__file__).resolve().parents[1]
AGGREGATES = (
    "dashboard.payment_facts, dashboard.booking_facts, dashboard.revenue_daily, dashboard.business_clients,"
    " dashboard.business_client_totals, dashboard.booking_counts"
)
# Rows of the rollups and facts that differ from DESIGN's definitions computed from the base tables.
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
    select business_id, count(*) as n from clients group by 1
), counts as (
    select business_id, status, payment_status, count(*) as bookings from bookings group by 1, 2, 3
)
select (select count(*) from ((select * from dashboard.revenue_daily except all select * from daily)
                              union all (select * from daily except all select * from dashboard.revenue_daily)) d)
     + (select count(*) from ((select * from dashboard.business_clients except all select * from clients)
                              union all (select * from clients except all select * from dashboard.business_clients)) c)
     + (select count(*) from totals t full join dashboard.business_client_totals h using (business_id)
         where coalesce(t.n, 0) <> coalesce(h.clients_total, 0))
     + (select count(*) from ((select * from dashboard.booking_counts except all select * from counts)
                              union all (select * from counts except all select * from dashboard.booking_counts)) k)
     + (select count(*) from ((select id, business_id, currency, amount, client_id from facts
                               except all select payment_id, business_id, currency, amount_minor, client_id
                                            from dashboard.payment_facts)
                              union all (select payment_id, business_id, currency, amount_minor, client_id
                                           from dashboard.payment_facts
                                         except all select id, business_id, currency, amount, client_id from facts)) f)
"""


def load(url: str, payments: int) -> None:
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
    print(f"loaded {payments} payments in {time.monotonic() - t0:.0f} s", flush=True)


def make_cold(url: str) -> None:
    """No aggregate built, and the planner's statistics saying so (what the data file's final analyze leaves)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"truncate {AGGREGATES}")
        conn.execute(f"analyze {AGGREGATES}")
        conn.execute("checkpoint")


def facts_built(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("select count(*) from dashboard.payment_facts").fetchone()
    return int(row[0]) if row else -1


def run_rebuild(url: str, src: Path, label: str, timeout: float) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
    env.update(CDC_DATABASE_URL=url, PYTHONPATH=str(src))
    load_before = os.getloadavg()[0]
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cdc_dashboard.cli", "aggregates", "rebuild"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stamps: list[float] = []  # when each stderr (progress) line came
    last: list[str] = []  # the last stderr line
    summary: list[str] = []  # the last stdout line

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            stamps.append(time.monotonic())
            last[:] = [line.strip()]

    def read_stdout() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            summary[:] = [line.strip()]

    readers = [threading.Thread(target=read_stderr), threading.Thread(target=read_stdout)]
    for r in readers:
        r.start()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        proc.wait(30)
        for r in readers:
            r.join()
        print(
            f"{label}: stopped after {timeout:.0f} s, {facts_built(url)} payment facts built; "
            f"{len(stamps)} progress lines (load average {load_before:.1f} -> {os.getloadavg()[0]:.1f})",
            flush=True,
        )
        return
    end = time.monotonic()
    for r in readers:
        r.join()
    assert proc.returncode == 0, f"{label}: exit {proc.returncode}: {last}"
    marks = [t0, *stamps, end]
    gap = max(b - a for a, b in itertools.pairwise(marks))
    print(
        f"{label}: {end - t0:.1f} s, {len(stamps)} progress lines, longest silence {gap:.1f} s, "
        f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}; {summary[-1] if summary else '(no summary)'}",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--payments", type=int, default=1_000_000)
    parser.add_argument("--before", type=Path, help="a `src` directory of the version to compare with")
    parser.add_argument("--timeout", type=float, default=900, help="stop a run after this many seconds")
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    parser.add_argument("--database", help="reuse this database (schema applied, data loaded; never dropped)")
    args = parser.parse_args()

    def prepare(url: str) -> None:
        load(url, args.payments)

    versions = ([("before", args.before)] if args.before else []) + [("after", ROOT / "src")]
    with scratch_database("bench_rebuild", reuse=args.database, keep=args.keep, prepare=prepare) as url:
        if args.database:
            apply(url)
        # Cold for each version (before first), then steady for each on what the last cold run (this checkout's,
        # which finishes) built: a cold run that was stopped leaves no fair state for its own steady run.
        for name, src in versions:
            make_cold(url)
            run_rebuild(url, src, f"{name} cold ({args.payments} payments)", args.timeout)
        for name, src in reversed(versions):
            run_rebuild(url, src, f"{name} steady ({args.payments} payments)", args.timeout)
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute(OFF_THE_LEDGER).fetchone()
        print(f"figures off the ledger after the last run: {row[0] if row else '?'} rows", flush=True)
        assert row == (0,), "the rebuild left figures that differ from the ledger"
    return 0


if __name__ == "__main__":
    sys.exit(main())
