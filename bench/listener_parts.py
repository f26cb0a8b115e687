"""What the listener's batch costs the writers, by parts: the live capture ratio with parts of the batch removed.

    .venv/bin/python bench/listener_parts.py [--seconds 8] [--rounds 4]

bench/capture_overhead.py's live mode (pgbench, 8 writers, tracked `payments` vs the untracked copy, listener
running) measures the listener's whole cost. Here the one scratch database and the one listener run with
variants of the batch function (`dashboard.consume_changes_body_v2`, rewritten in the scratch database from its
installed source, as bench/trigger_variants.py does with the capture function):
  full           the batch as installed;
  no_aggregates  without bringing the aggregates up to date (sync_payments_v3, sync_bookings_v2);
  no_events      without grouping the changes into events and appending them;
  consume_only   neither: take the changes off the log and record progress.
Every round runs each variant's tracked side next to an untracked run of its own (so that both tables grow
alike: a table that grows faster gets slower to insert into), in an order that alternates; prints per variant
the median tps of its tracked and of its untracked runs, their ratio, the median of its per-pair ratios, and the
most changes left in the log right after one of its runs (a batch or so: the listener kept up). The removed
parts are what DESIGN requires of the listener: the variants are measurements, never a product setting.
Scratch database, dropped at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

from capture_overhead import BUSINESSES, SETUP, pgbench
from scratch import backlog, scratch_database, wait_drained

BATCH_FUNCTION = "dashboard.consume_changes_body_v2(integer, text, bigint, boolean)"
SKIP_AGGREGATES = [
    ("perform dashboard.sync_payments_v3(pay_ids);", "null;"),
    ("perform dashboard.sync_bookings_v2(booking_ids);", "null;"),
]
# The grouping statement starts at its comment and ends with `from planned;`; without it no event is appended.
SKIP_EVENTS = [
    ("    -- One pass over the batch", "    if false then\n    -- One pass over the batch"),
    ("      from planned;\n", "      from planned;\n    end if;\n"),
]
VARIANTS: dict[str, list[tuple[str, str]]] = {
    "full": [],
    "no_aggregates": SKIP_AGGREGATES,
    "no_events": SKIP_EVENTS,
    "consume_only": SKIP_AGGREGATES + SKIP_EVENTS,
}


def variant_sources(conn: psycopg.Connection[Any], variants: dict[str, list[tuple[str, str]]]) -> dict[str, str]:
    """Each variant's `create or replace function` statement, from the batch function installed on `conn`."""
    row = conn.execute("select pg_get_functiondef(%s::regprocedure)", [BATCH_FUNCTION]).fetchone()
    assert row is not None
    sources = {}
    for name, rewrites in variants.items():
        source = row[0]
        for old, new in rewrites:
            if source.count(old) != 1:
                raise RuntimeError(f"the batch function no longer contains {old!r} once: update the variants")
            source = source.replace(old, new)
        sources[name] = source
    return sources


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    with scratch_database() as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(SETUP.format(n=BUSINESSES))
            sources = variant_sources(conn, VARIANTS)
        env = dict(os.environ, CDC_DATABASE_URL=url)  # CDC_LISTENER_* tunables pass through
        listener = subprocess.Popen(
            [str(Path(sys.executable).parent / "cdc-dashboard"), "listen"], env=env, stdout=subprocess.DEVNULL
        )
        tracked: dict[str, list[float]] = {name: [] for name in VARIANTS}
        untracked: dict[str, list[float]] = {name: [] for name in VARIANTS}
        left: dict[str, int] = dict.fromkeys(VARIANTS, 0)
        try:
            time.sleep(2)
            for i in range(args.rounds):
                names = list(VARIANTS) if i % 2 == 0 else list(reversed(VARIANTS))
                for name in names:
                    with psycopg.connect(url, autocommit=True) as conn:
                        conn.execute(sources[name])  # the listener's next batch compiles the new body
                    for side in ("payments", "bench_untracked_payments")[:: 1 if i % 2 == 0 else -1]:
                        runs = tracked if side == "payments" else untracked
                        runs[name].append(pgbench(url, side, args.seconds, args.clients))
                        if side == "payments":
                            left[name] = max(left[name], backlog(url))
                            wait_drained(url)  # the next run starts with an empty log
        finally:
            listener.terminate()
            listener.wait(10)
    for name in VARIANTS:
        t, u = statistics.median(tracked[name]), statistics.median(untracked[name])
        pairs = statistics.median(x / y for x, y in zip(tracked[name], untracked[name], strict=True))
        print(
            f"{name:14s} tracked {t:6.0f} tps  untracked {u:6.0f} tps  ratio {t / u:.2f}  (per pair: median"
            f" {pairs:.2f})  backlog after a run at most {left[name]}  (runs: tracked"
            f" {[round(x) for x in tracked[name]]}, untracked {[round(x) for x in untracked[name]]})",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
