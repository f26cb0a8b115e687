"""The listener's batch before and after migration 0010 (sql/schema/migrations/), on the same backlog, alternating.

    .venv/bin/python bench/batch_versions.py [--changes 400] [--rounds 5] [--batches 40]

Two scratch databases built as bench/batch_cost.py builds one (20,000 payments over 1,000 businesses, consumed,
then a backlog of `--changes` new completed payments): `before` has the migrations up to 0009 and runs
`consume_changes_v1` (bigint rollups, gross amounts); `after` has them all and runs `consume_changes_v2` (net
amounts, numeric daily rollup, the batch in a subtransaction that isolates failures). A third case, `poison`,
is `after` with one change in the backlog that the facts table refuses (a check constraint), so the batch fails
whole, is isolated piece by piece and sets that change aside: the price of one bad change. Each batch is run
and rolled back `--batches` times per round, the rounds alternate the order; prints the median over rounds of
the 20th-percentile batch. Scratch databases, dropped at the end.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import psycopg

from batch_cost import AUTOVACUUM_OFF, PAYMENTS, batch_seconds
from capture_overhead import BUSINESSES, SETUP
from cdc_dashboard import migrations
from scratch import scratch_database

BATCHES = {
    "before": "select * from dashboard.consume_changes_v1(5000, 'live', 0)",
    "after": "select * from dashboard.consume_changes_v2(5000, 'live', 0)",
    "poison": "select * from dashboard.consume_changes_v2(5000, 'live', 0)",
}
POISON_AMOUNT = 7  # PAYMENTS writes 100 + n: no other payment has it


def apply_through_0009(url: str) -> object:
    """`db apply` as the previous release shipped it: the migrations up to 0009, the capture, the tracking."""
    every = migrations.schema_files
    migrations.schema_files = lambda: [p for p in every() if p.name < "0010"]
    try:
        return migrations.apply(url, baseline=False)
    finally:
        migrations.schema_files = every


@contextmanager
def prepared(case: str, changes: int) -> Iterator[str]:
    with scratch_database(prepare=apply_through_0009 if case == "before" else migrations.apply) as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(SETUP.format(n=BUSINESSES))
            conn.execute("select setseed(0.42)")
            conn.execute(PAYMENTS.format(businesses=BUSINESSES, n=20000))
            while (consumed := conn.execute(BATCHES[case]).fetchone()) and consumed[0]:
                pass
            conn.execute(PAYMENTS.format(businesses=BUSINESSES, n=changes))
            if case == "poison":
                conn.execute(
                    f"alter table dashboard.payment_facts add constraint poison check (amount_minor <> {POISON_AMOUNT})"
                )
                conn.execute(
                    "update payments set amount_minor = %s"
                    " where id = (select id from payments order by created_at desc, id limit 1 offset %s)",
                    (POISON_AMOUNT, changes // 2),
                )
            conn.execute("vacuum analyze")
            conn.execute(AUTOVACUUM_OFF)
        yield url


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--changes", type=int, default=400, help="the backlog one batch consumes")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=40, help="batches timed per case and round")
    args = parser.parse_args()
    results: dict[str, list[float]] = {case: [] for case in BATCHES}
    with ExitStack() as stack:
        urls = {case: stack.enter_context(prepared(case, args.changes)) for case in BATCHES}
        for i in range(args.rounds):
            for case in list(BATCHES) if i % 2 == 0 else list(reversed(BATCHES)):
                results[case].append(batch_seconds(urls[case], f"select 1 as {case}", args.batches, BATCHES[case]))
    for case in BATCHES:
        ms = statistics.median(results[case]) * 1000
        share = statistics.median(x / b for x, b in zip(results[case], results["before"], strict=True))
        print(
            f"{case:7s} {ms:6.2f} ms per batch of {args.changes} changes  {ms * 1000 / args.changes:5.1f} µs per change"
            f"  {share:4.2f} of before (median per round)  (rounds: {[round(x * 1000, 2) for x in results[case]]})",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
