"""Capture overhead: insert throughput into a tracked vs an untracked payments table, 8 writers (pgbench).

    .venv/bin/python bench/capture_overhead.py [--seconds 15] [--rounds 3] [--clients 8] [--mode both]

Creates a scratch database on CDC_BENCH_ADMIN_URL (default postgresql://postgres@127.0.0.1:5432/postgres),
applies the schema, and builds `bench_untracked_payments`: a copy of `payments` with the same columns,
defaults, checks, indexes, foreign keys and updated_at trigger, but no capture trigger. pgbench then inserts
into the tracked `payments` and the untracked copy in alternating runs of the same length, so that whatever
else the machine does hits both sides alike. Modes:
  live     `cdc-dashboard listen` runs and keeps up (it consumes, rebuilds aggregates and appends events);
  stopped  no listener: the write path alone (the change log just grows).
Prints the median tps of each side and their ratio per mode, and the median of the per-round ratios (each
round's tracked run over its untracked run, which ran next to it: less swayed by drift over the whole run); the
scratch database is dropped at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from scratch import backlog, scratch_database

ROOT = Path(__file__).resolve().parents[1]
BUSINESSES = 1000

SETUP = """
insert into businesses (id, name)
select ('00000000-0000-0000-0000-' || lpad(n::text, 12, '0'))::uuid, 'Bench ' || n from generate_series(1, {n}) n;
create table bench_untracked_payments (like payments including all);
alter table bench_untracked_payments
    add foreign key (business_id) references businesses (id) on delete cascade,
    add foreign key (client_id) references clients (id) on delete set null,
    add foreign key (booking_id) references bookings (id) on delete set null;
create trigger touch_updated_at_v1 before update on bench_untracked_payments
    for each row execute function touch_updated_at_v1();
"""

SCRIPT = """\\set b random(1, {n})
\\set amount random(100, 500000)
insert into {table} (business_id, amount_minor, currency, method, status)
values (('00000000-0000-0000-0000-' || lpad(:b::text, 12, '0'))::uuid, :amount, 'KES', 'mpesa', 'completed');
"""


def pgbench(url: str, table: str, seconds: int, clients: int) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(SCRIPT.format(n=BUSINESSES, table=table))
    try:
        out = subprocess.run(
            ["pgbench", "-n", "-c", str(clients), "-j", "2", "-T", str(seconds), "-f", f.name, url],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        os.unlink(f.name)
    match = re.search(r"tps = ([\d.]+)", out)
    if not match:
        raise RuntimeError(f"pgbench printed no tps:\n{out}")
    return float(match.group(1))


def measure(url: str, seconds: int, rounds: int, clients: int) -> tuple[float, float, list[float], list[float]]:
    tracked: list[float] = []
    untracked: list[float] = []
    for i in range(rounds):
        # Alternate which side goes first so a drift in machine load does not favour one.
        order = [("payments", tracked), ("bench_untracked_payments", untracked)]
        for table, results in order if i % 2 == 0 else reversed(order):
            results.append(pgbench(url, table, seconds, clients))
    return statistics.median(tracked), statistics.median(untracked), tracked, untracked


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--mode", choices=["live", "stopped", "both"], default="both")
    args = parser.parse_args()
    with scratch_database() as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(SETUP.format(n=BUSINESSES))
        modes = ["stopped", "live"] if args.mode == "both" else [args.mode]
        for mode in modes:
            listener = None
            if mode == "live":
                env = dict(os.environ, CDC_DATABASE_URL=url)  # CDC_LISTENER_* tunables pass through
                listener = subprocess.Popen(
                    [str(Path(sys.executable).parent / "cdc-dashboard"), "listen"],
                    env=env,
                    stdout=subprocess.DEVNULL,
                )
                time.sleep(2)
            try:
                t, u, ts, us = measure(url, args.seconds, args.rounds, args.clients)
                left = backlog(url)
            finally:
                if listener:
                    listener.terminate()
                    listener.wait(10)
            print(
                f"{mode:8s} tracked {t:8.0f} tps  untracked {u:8.0f} tps  ratio {t / u:.2f}"
                f"  (per round: median {statistics.median(x / y for x, y in zip(ts, us, strict=True)):.2f})"
                f"  (runs: tracked {[round(x) for x in ts]}, untracked {[round(x) for x in us]};"
                f" change-log backlog at end {left})",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
