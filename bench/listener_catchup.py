"""Listener catch-up and sustained throughput.

    .venv/bin/python bench/listener_catchup.py [--changes 30000] [--businesses 1000] [--bulk-update]

With the listener stopped (an outage), writes --changes payments (one change each) spread over --businesses,
as separate committed transactions from 8 connections. Then starts `cdc-dashboard listen` and measures the
time from process start to READY (sd_notify over a real socket: READY is sent only once LISTENing and caught
up) and the changes and events per second consumed during catch-up. Scratch database on CDC_BENCH_ADMIN_URL
(default postgresql://postgres@127.0.0.1:5432/postgres), dropped at the end.

`--bulk-update` measures something else: a new install (the database vacuumed and analysed while empty, as
`vacuumdb --analyze` or autovacuum leave it), a listener running since then, and, once the payments are
consumed, one statement that corrects every payment's amount (a DBA's fix, a backfill). It prints the time from
that statement's commit until the listener has consumed all its changes. Every change then moves an existing
fact, in batches as large as the listener takes them, with the generic plans the listener made while the
statistics said the tables were empty: a plan that joins one batch-sized set to another turns quadratic here.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg

from scratch import backlog, scratch_database, wait_drained


def write(url: str, businesses: list[str], count: int, offset: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for i in range(count):
            conn.execute(
                "insert into payments (business_id, amount_minor, currency, method, status)"
                " values (%s, %s, 'KES', 'mpesa', 'completed')",
                (businesses[(offset + i) % len(businesses)], 100 + i),
            )


def start_listener(url: str, **extra_env: str) -> subprocess.Popen[bytes]:
    """`cdc-dashboard listen` on `url` with default settings (no CDC_* variable of this shell leaks in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
    env.update(CDC_DATABASE_URL=url, **extra_env)
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "cdc-dashboard"), "listen"], env=env, stdout=subprocess.DEVNULL
    )


def bulk_update(url: str, businesses: list[str], changes: int) -> None:
    proc = start_listener(url)
    try:
        time.sleep(2)  # connected, caught up (nothing to catch up), asleep
        per_writer = changes // 8
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda w: write(url, businesses, per_writer, w * per_writer), range(8)))
        wait_drained(url, seconds=300)
        if left := backlog(url):
            raise RuntimeError(f"{left} payments still not consumed after 300 s")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("update payments set amount_minor = amount_minor + 1")
        started = time.monotonic()
        while left := backlog(url):
            if time.monotonic() - started > 300:
                raise RuntimeError(f"{left} changes still waiting after 300 s")
            time.sleep(0.01)
        took = time.monotonic() - started
        print(f"bulk correction of {per_writer * 8} payments consumed {took:.2f} s after its commit")
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--changes", type=int, default=30000)
    parser.add_argument("--businesses", type=int, default=1000)
    parser.add_argument("--bulk-update", action="store_true")
    args = parser.parse_args()
    with scratch_database() as url:
        businesses = [str(uuid.uuid4()) for _ in range(args.businesses)]
        with psycopg.connect(url, autocommit=True) as conn, conn.cursor() as cur:
            cur.executemany("insert into businesses (id, name) values (%s, 'Bench')", [(b,) for b in businesses])
        if args.bulk_update:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("vacuum analyze")
            bulk_update(url, businesses, args.changes)
            return 0
        started = time.monotonic()
        per_writer = args.changes // 8
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda w: write(url, businesses, per_writer, w * per_writer), range(8)))
        total = per_writer * 8
        print(f"wrote {total} changes while the listener was down in {time.monotonic() - started:.1f} s")
        with tempfile.TemporaryDirectory() as tmp, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            address = os.path.join(tmp, "notify.sock")
            sock.bind(address)
            sock.settimeout(120)
            t0 = time.monotonic()
            proc = start_listener(url, NOTIFY_SOCKET=address)
            try:
                while not sock.recv(4096).decode().startswith("READY=1"):
                    pass
                ready = time.monotonic() - t0
            finally:
                proc.terminate()
                proc.wait(10)
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute(
                "select count(*), (select count(*) from cdc.change_log) from dashboard.events"
            ).fetchone()
        assert row is not None
        events, left = row
        print(
            f"live again {ready:.2f} s after start (process start, connect, catch-up); backlog left {left};"
            f" {total / ready:,.0f} changes/s, {events / ready:,.0f} events/s ({events} events)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
