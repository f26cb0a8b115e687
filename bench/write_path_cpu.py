"""CPU cost of the capture trigger per insert: backend CPU per single-row insert, tracked vs untracked payments.

    .venv/bin/python bench/write_path_cpu.py [--inserts 4000] [--rounds 8]

The throughput ratio of bench/capture_overhead.py swings by ±0.1 here from run to run; this measures what the
trigger adds in CPU alone. One connection inserts `--inserts` payments one statement (one transaction) at a time
into the tracked `payments`, then into its untracked copy (bench/capture_overhead.py's), with
`synchronous_commit = off` so that waiting for the disk is not counted, and reads its server backend's CPU time
from /proc before and after. Rounds alternate the two sides; prints the medians and the overhead per insert.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import psycopg

from capture_overhead import BUSINESSES, SETUP
from scratch import scratch_database

TICK = os.sysconf("SC_CLK_TCK")
INSERT = (
    "insert into {table} (business_id, amount_minor, currency, method, status)"
    " values (('00000000-0000-0000-0000-' || lpad(%s::text, 12, '0'))::uuid, %s, 'KES', 'mpesa', 'completed')"
)


def backend_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / TICK  # utime + stime


def microseconds_per_insert(url: str, table: str, inserts: int) -> float:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("set synchronous_commit = off")
        pid = conn.info.backend_pid
        sql = INSERT.format(table=table)
        for i in range(200):  # warm up: plans, caches
            conn.execute(sql, (1 + i % BUSINESSES, 1000), prepare=True)
        before = backend_cpu_seconds(pid)
        for i in range(inserts):
            conn.execute(sql, (1 + i % BUSINESSES, 1000), prepare=True)
        return (backend_cpu_seconds(pid) - before) / inserts * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--inserts", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    tracked: list[float] = []
    untracked: list[float] = []
    with scratch_database() as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(SETUP.format(n=BUSINESSES))
        for _ in range(args.rounds):
            tracked.append(microseconds_per_insert(url, "payments", args.inserts))
            untracked.append(microseconds_per_insert(url, "bench_untracked_payments", args.inserts))
    t, u = statistics.median(tracked), statistics.median(untracked)
    print(
        f"tracked {t:6.1f} us  untracked {u:6.1f} us  capture overhead {t - u:5.1f} us per insert"
        f"  (CPU ratio {u / t:.2f}; rounds: tracked {[round(x) for x in tracked]},"
        f" untracked {[round(x) for x in untracked]})",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
