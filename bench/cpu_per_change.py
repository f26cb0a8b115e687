"""CPU cost per payment written, at a fixed write rate: untracked, tracked (write path), and the listener's share.

    .venv/bin/python bench/cpu_per_change.py [--rate 3000] [--seconds 10] [--rounds 2]

Throughput ratios (bench/capture_overhead.py) are what the targets are stated in, but on a shared 2-core machine
they swing by ±0.1 from run to run. Where the writers saturate the CPU, the ratio is decided by CPU time per
payment, and that can be measured at a rate the machine sustains easily, with much less noise: pgbench inserts
at a fixed rate (`-R`) into the untracked copy of `payments`, then into the tracked `payments` with the listener
running, and the script reads the machine's busy time (/proc/stat) and the listener's own processes (its Python
process and its two server backends, from /proc/PID/stat) around each run. Prints microseconds of CPU per
payment: the whole machine untracked, the whole machine tracked, and of that the listener's process and its
backends; and the ratio those costs predict for a CPU-bound run (untracked ÷ tracked).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from capture_overhead import BUSINESSES, SCRIPT, SETUP
from scratch import scratch_database, wait_drained

TICK = os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / TICK


def process_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(parts[11]) + int(parts[12])  # utime + stime
    return total / TICK


def listener_backends(url: str) -> list[int]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "select pid from pg_stat_activity where application_name like 'cdc-dashboard listener%'"
        ).fetchall()
    return [int(r[0]) for r in rows]


def count(url: str, sql: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(sql).fetchone()
    return int(row[0]) if row else 0


def run_pgbench(url: str, table: str, rate: int, seconds: int) -> int:
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(SCRIPT.format(n=BUSINESSES, table=table))
    try:
        subprocess.run(
            ["pgbench", "-n", "-c", "8", "-j", "2", "-R", str(rate), "-T", str(seconds), "-f", f.name, url],
            capture_output=True,
            check=True,
        )
    finally:
        os.unlink(f.name)
    return count(url, f"select count(*) from {table}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rate", type=int, default=3000, help="payments per second (all 8 writers together)")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with scratch_database() as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(SETUP.format(n=BUSINESSES))
        env = dict(os.environ, CDC_DATABASE_URL=url)  # CDC_LISTENER_* tunables pass through
        listener = subprocess.Popen(
            [str(Path(sys.executable).parent / "cdc-dashboard"), "listen"], env=env, stdout=subprocess.DEVNULL
        )
        try:
            time.sleep(2)
            pids = [listener.pid, *listener_backends(url)]
            written = {"payments": 0, "bench_untracked_payments": 0}
            for _ in range(args.rounds):
                for table in ("bench_untracked_payments", "payments"):
                    wait_drained(url)
                    machine0, py0, pg0 = machine_busy_seconds(), process_seconds(pids[:1]), process_seconds(pids[1:])
                    total = run_pgbench(url, table, args.rate, args.seconds)
                    n, written[table] = total - written[table], total
                    wait_drained(url)
                    machine = machine_busy_seconds() - machine0
                    py, pg = process_seconds(pids[:1]) - py0, process_seconds(pids[1:]) - pg0
                    label = "tracked  " if table == "payments" else "untracked"
                    print(
                        f"{label} {n:7d} payments  machine {machine / n * 1e6:6.1f} µs/payment"
                        f"  of which listener process {py / n * 1e6:5.1f}, its backends {pg / n * 1e6:5.1f}",
                        flush=True,
                    )
        finally:
            listener.terminate()
            listener.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
